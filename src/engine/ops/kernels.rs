//! The numeric building blocks of the fused ops: the `Real` scalar trait, vectorizable row loops
//! (sum, dot, max, exp, softmax in place), subnormal flushing, the AVX-512 / AVX2 `simd_fn!`
//! wrapper, rayon task sizing and `matmul`, gemm on strided slices.

use candle_core::CpuStorage;
use gemm::Parallelism;
use rayon::prelude::*;
use std::ops::{Add, AddAssign, Div, Mul, MulAssign, Neg, Sub, SubAssign};

// ---------------------------------------------------------------------------------------------
// Scalars and vector loops

/// The float types the kernels run on (f32 for training, f64 for gradient checks).
pub(super) trait Real:
    Copy
    + Send
    + Sync
    + PartialOrd
    + std::fmt::Debug
    + 'static
    + Add<Output = Self>
    + Sub<Output = Self>
    + Mul<Output = Self>
    + Div<Output = Self>
    + Neg<Output = Self>
    + AddAssign
    + SubAssign
    + MulAssign
{
    const ZERO: Self;
    const ONE: Self;
    /// The smallest normal number.
    const MIN_NORMAL: Self;
    fn abs(self) -> Self;
    fn ln(self) -> Self;
    fn from_f64(v: f64) -> Self;
    fn exp(self) -> Self;
    fn max(self, other: Self) -> Self;
    fn slice(s: &CpuStorage) -> Option<&[Self]>;
    fn into_storage(v: Vec<Self>) -> CpuStorage;
}

/// [`Real`] for a float type `$t` held in `CpuStorage::$variant`, with `$exp` as e^x.
macro_rules! impl_real {
    ($t:ident, $variant:ident, $exp:path) => {
        impl Real for $t {
            const ZERO: Self = 0.0;
            const ONE: Self = 1.0;
            const MIN_NORMAL: Self = $t::MIN_POSITIVE;
            #[inline(always)]
            fn abs(self) -> Self {
                $t::abs(self)
            }
            fn ln(self) -> Self {
                $t::ln(self)
            }
            fn from_f64(v: f64) -> Self {
                v as $t
            }
            #[inline(always)]
            fn exp(self) -> Self {
                $exp(self)
            }
            #[inline(always)]
            fn max(self, other: Self) -> Self {
                $t::max(self, other)
            }
            fn slice(s: &CpuStorage) -> Option<&[Self]> {
                match s {
                    CpuStorage::$variant(v) => Some(v),
                    _ => None,
                }
            }
            fn into_storage(v: Vec<Self>) -> CpuStorage {
                CpuStorage::$variant(v)
            }
        }
    };
}

impl_real!(f32, F32, exp_f32);
impl_real!(f64, F64, f64::exp);

/// e^x in f32 without a libm call, so loops over it vectorize: Cody–Waite reduction
/// x = k·ln2 + r with |r| ≤ ln2/2, then the degree-7 Taylor polynomial of e^r (truncation
/// error < 1e-8 relative; about 1 ulp in all). libm's `expf`, one call per element, would be
/// the largest cost of the log-softmax over a 32000-token vocabulary.
#[inline(always)]
fn exp_f32(x: f32) -> f32 {
    // 1.5·2²³: adding it rounds to an integer held in the low mantissa bits.
    const MAGIC: f32 = 12_582_912.0;
    const HI: f32 = 88.376_26;
    const LO: f32 = -87.336_54;
    // ln 2 split so that k·LN2_A is exact (Cephes).
    const LN2_A: f32 = 0.693_359_4;
    const LN2_B: f32 = -2.121_944_4e-4;
    let xc = x.clamp(LO, HI);
    let t = xc * std::f32::consts::LOG2_E + MAGIC;
    let k = t - MAGIC;
    let n = (t.to_bits() as i32).wrapping_sub(MAGIC.to_bits() as i32);
    let r = (xc - k * LN2_A) - k * LN2_B;
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0
                    + r * (1.0 / 24.0
                        + r * (1.0 / 120.0 + r * (1.0 / 720.0 + r * (1.0 / 5040.0)))))));
    let y = p * f32::from_bits(((n + 127) << 23) as u32);
    if x < LO {
        0.0
    } else if x > HI {
        f32::INFINITY
    } else {
        y
    }
}

/// Independent accumulators per reduction, so that sums and maxima vectorize (float addition
/// is not associative, so the compiler will not split one accumulator by itself).
pub(super) const LANES: usize = 16;

#[inline(always)]
pub(super) fn sum<T: Real>(x: &[T]) -> T {
    let mut acc = [T::ZERO; LANES];
    let chunks = x.chunks_exact(LANES);
    let mut s = chunks.remainder().iter().fold(T::ZERO, |a, &v| a + v);
    for c in chunks {
        let c: &[T; LANES] = c.try_into().expect("exact chunk");
        for i in 0..LANES {
            acc[i] += c[i];
        }
    }
    for a in acc {
        s += a;
    }
    s
}

#[inline(always)]
pub(super) fn dot<T: Real>(x: &[T], y: &[T]) -> T {
    debug_assert_eq!(x.len(), y.len());
    let mut acc = [T::ZERO; LANES];
    let (xc, yc) = (x.chunks_exact(LANES), y.chunks_exact(LANES));
    let mut s = xc
        .remainder()
        .iter()
        .zip(yc.remainder())
        .fold(T::ZERO, |a, (&u, &v)| a + u * v);
    for (a, b) in xc.zip(yc) {
        let a: &[T; LANES] = a.try_into().expect("exact chunk");
        let b: &[T; LANES] = b.try_into().expect("exact chunk");
        for i in 0..LANES {
            acc[i] += a[i] * b[i];
        }
    }
    for a in acc {
        s += a;
    }
    s
}

#[inline(always)]
pub(super) fn max<T: Real>(x: &[T]) -> T {
    let Some(&first) = x.first() else {
        return T::from_f64(f64::NEG_INFINITY);
    };
    let mut acc = [first; LANES];
    let chunks = x.chunks_exact(LANES);
    let mut m = chunks.remainder().iter().fold(first, |a, &v| a.max(v));
    for c in chunks {
        let c: &[T; LANES] = c.try_into().expect("exact chunk");
        for i in 0..LANES {
            acc[i] = acc[i].max(c[i]);
        }
    }
    for a in acc {
        m = m.max(a);
    }
    m
}

/// `out[i] = e^(x[i] − m)`, returning Σ out.
#[inline(always)]
pub(super) fn exp_shifted<T: Real>(x: &[T], m: T, out: &mut [T]) -> T {
    debug_assert_eq!(x.len(), out.len());
    let mut acc = [T::ZERO; LANES];
    let xc = x.chunks_exact(LANES);
    let tail = xc.remainder();
    let mut oc = out.chunks_exact_mut(LANES);
    for (a, o) in xc.zip(&mut oc) {
        let a: &[T; LANES] = a.try_into().expect("exact chunk");
        let o: &mut [T; LANES] = o.try_into().expect("exact chunk");
        for i in 0..LANES {
            o[i] = (a[i] - m).exp();
            acc[i] += o[i];
        }
    }
    let mut s = T::ZERO;
    for (&v, o) in tail.iter().zip(oc.into_remainder()) {
        *o = (v - m).exp();
        s += *o;
    }
    for a in acc {
        s += a;
    }
    s
}

/// Softmax of one row in place.
#[inline(always)]
pub(super) fn softmax_in_place<T: Real>(row: &mut [T]) {
    let m = max(row);
    let mut acc = [T::ZERO; LANES];
    let mut chunks = row.chunks_exact_mut(LANES);
    for c in &mut chunks {
        let c: &mut [T; LANES] = c.try_into().expect("exact chunk");
        for i in 0..LANES {
            c[i] = (c[i] - m).exp();
            acc[i] += c[i];
        }
    }
    let mut s = T::ZERO;
    for v in chunks.into_remainder() {
        *v = (*v - m).exp();
        s += *v;
    }
    for a in acc {
        s += a;
    }
    let inv = T::ONE / s;
    for v in row.iter_mut() {
        *v *= inv;
    }
}

/// Subnormal numbers. Attention probabilities of far-off keys underflow below 2⁻¹²⁶, and so do
/// their products with gradients; every multiply-add that touches a subnormal takes a
/// microcode assist, and with a few percent of them in the attention gradients the matrix
/// products of the SVF backward pass ran 4× slower (39 vs 156 GFLOP/s at 508×512×512). The
/// kernels that make them flush them: probabilities below 2⁻⁶⁴ (they change no f32 output, as
/// every row has one probability ≥ 1/S, and keep their products with gradients normal) and
/// gradients below the smallest normal number (what FTZ would do) become 0.
pub(super) const NEGLIGIBLE_PROB: f64 = 5.421_010_862_427_522e-20;

#[inline(always)]
pub(super) fn flush<T: Real>(v: T, below: T) -> T {
    if v.abs() < below {
        T::ZERO
    } else {
        v
    }
}

/// Set the subnormal entries of `x` to 0.
pub(super) fn flush_subnormals<T: Real>(x: &mut [T]) {
    x.par_chunks_mut(TASK_ELEMS).for_each(|c| {
        for v in c {
            *v = flush(*v, T::MIN_NORMAL);
        }
    });
}

/// Defines `fn $name` that runs its body compiled for AVX-512, or else AVX2, when the CPU has
/// it. The row kernels are plain Rust loops, which the compiler vectorizes only as wide as the
/// target allows (4 lanes of SSE2 for the default x86-64 target); the AVX2 copy uses 8 and the
/// AVX-512 copy 16. The compiler neither reorders nor fuses float operations, so every copy
/// computes the same bits. (A closure cannot carry `#[target_feature]`, hence named
/// functions.)
macro_rules! simd_fn {
    ($(#[$doc:meta])* fn $name:ident<T: Real>($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block) => {
        $(#[$doc])*
        fn $name<T: Real>($($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            fn body<T: Real>($($arg: $ty),*) $(-> $ret)? $body

            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx512f")]
            unsafe fn avx512<T: Real>($($arg: $ty),*) $(-> $ret)? {
                body($($arg),*)
            }

            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx2")]
            unsafe fn avx2<T: Real>($($arg: $ty),*) $(-> $ret)? {
                body($($arg),*)
            }

            #[cfg(target_arch = "x86_64")]
            if std::arch::is_x86_feature_detected!("avx512f") {
                // Safety: the CPU has the features `avx512` is compiled for.
                return unsafe { avx512($($arg),*) };
            }
            #[cfg(target_arch = "x86_64")]
            if std::arch::is_x86_feature_detected!("avx2") {
                // Safety: the CPU has the features `avx2` is compiled for.
                return unsafe { avx2($($arg),*) };
            }
            body($($arg),*)
        }
    };
}
pub(super) use simd_fn;

/// Elements per rayon task in element-wise and row loops: below this, splitting costs more
/// than it saves.
pub(super) const TASK_ELEMS: usize = 1 << 13;

/// Minimum rows per rayon task for rows of `cols` elements.
pub(super) fn task_rows(cols: usize) -> usize {
    TASK_ELEMS.div_ceil(cols.max(1))
}

/// A read-only raw pointer that rayon tasks may share.
#[derive(Clone, Copy)]
struct SendConst<T>(*const T);
unsafe impl<T> Send for SendConst<T> {}
unsafe impl<T> Sync for SendConst<T> {}
impl<T> SendConst<T> {
    /// The pointer (a method, so closures capture the wrapper).
    fn get(self) -> *const T {
        self.0
    }
}

/// A raw pointer that rayon tasks may share; each task writes a disjoint part.
#[derive(Clone, Copy)]
pub(super) struct SendPtr<T>(pub(super) *mut T);
unsafe impl<T> Send for SendPtr<T> {}
unsafe impl<T> Sync for SendPtr<T> {}
impl<T> SendPtr<T> {
    /// The pointer advanced by `off` elements (a method, so closures capture the wrapper).
    pub(super) fn at(self, off: usize) -> *mut T {
        self.0.wrapping_add(off)
    }
}

// ---------------------------------------------------------------------------------------------
// gemm on slices

/// A strided matrix view: element (i, j) at `ptr + i·rs + j·cs`.
#[derive(Clone, Copy)]
pub(super) struct View<T> {
    pub(super) ptr: *const T,
    pub(super) rs: usize,
    pub(super) cs: usize,
}

impl<T> View<T> {
    /// The row-major matrix with `cols` columns that starts at `s[0]`.
    pub(super) fn rows(s: &[T], cols: usize) -> Self {
        View {
            ptr: s.as_ptr(),
            rs: cols,
            cs: 1,
        }
    }
    pub(super) fn t(self) -> Self {
        View {
            ptr: self.ptr,
            rs: self.cs,
            cs: self.rs,
        }
    }
}

thread_local! {
    /// Whether this rayon worker runs [`on_pool`]'s closure: its products may still split.
    static DRIVER: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Runs `f` on a worker thread of the current rayon pool and returns its result.
///
/// From a thread outside the pool every parallel region is a hand-off: the job is queued, a
/// worker wakes, and the caller sleeps until the region ends — two futex round trips, a few
/// µs each, for each of the ~250 regions of one decoded token of a 30-layer model. On a worker
/// a region splits in place (`join`) and the calling thread takes its own share, so a whole
/// forward pass costs one hand-off. Nested calls run `f` inline.
pub fn on_pool<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    struct Restore(bool);
    impl Drop for Restore {
        fn drop(&mut self) {
            DRIVER.with(|d| d.set(self.0));
        }
    }
    let drive = || {
        let _restore = Restore(DRIVER.with(|d| d.replace(true)));
        f()
    };
    match rayon::current_thread_index() {
        Some(_) => drive(),
        None => rayon::scope(|_| drive()),
    }
}

/// Whether the calling thread is a rayon worker inside a parallel task (not [`on_pool`]'s
/// driver): the pool's other threads are then busy with their own tasks.
fn in_parallel_task() -> bool {
    rayon::current_thread_index().is_some() && !DRIVER.with(|d| d.get())
}

/// How one `m × n × k` product of [`matmul`] is spread over the rayon threads.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Split {
    /// One thread (below ~1M multiply-adds the split is not worth it, and inside a rayon task
    /// the other threads are busy).
    None,
    /// Each thread takes a band of this many rows and packs its own copy of rhs. Used for
    /// long reductions (k > n), which gemm's own split handles poorly: on 2 threads the LM
    /// head's backward, 508×512×32000, ran at 170–190 GFLOP/s split by gemm and 235–285 in
    /// row bands (the other shapes of the SVF step were equal or slower in bands).
    Rows(usize),
    /// gemm's own splitting.
    Gemm(usize),
}

const MIN_BAND_ROWS: usize = 64;

fn split(m: usize, n: usize, k: usize) -> Split {
    let threads = rayon::current_num_threads();
    if threads < 2 || m * n * k < 1 << 20 || in_parallel_task() {
        Split::None
    } else if k > n && m >= MIN_BAND_ROWS * 2 {
        // Bands of whole multiples of 8 rows (the microkernel's row block).
        Split::Rows(m.div_ceil(threads).next_multiple_of(8).max(MIN_BAND_ROWS))
    } else {
        Split::Gemm(threads)
    }
}

/// [`gemm_raw`] on the calling thread alone (one tile of work inside a rayon task), `dst` with
/// row stride `dst_rs`.
///
/// # Safety
/// As for [`gemm_raw`].
pub(super) unsafe fn tile_gemm<T: Real>(
    mnk: (usize, usize, usize),
    (dst, dst_rs): (*mut T, usize),
    accumulate: bool,
    (lhs, rhs): (View<T>, View<T>),
    scale: T,
) {
    let par = Parallelism::None;
    gemm_raw(mnk, dst, dst_rs, accumulate, lhs, rhs, scale, par)
}

/// dst (m × n, element (i, j) at `dst + i·dst_rs + j`) ← [dst +] scale · lhs · rhs.
///
/// # Safety
/// The views must address `m × k`, `k × n` and `m × n` valid elements, and `dst` must not
/// overlap the inputs or memory another thread writes.
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn gemm_raw<T: Real>(
    (m, n, k): (usize, usize, usize),
    dst: *mut T,
    dst_rs: usize,
    accumulate: bool,
    lhs: View<T>,
    rhs: View<T>,
    scale: T,
    par: Parallelism,
) {
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            for i in 0..m {
                std::slice::from_raw_parts_mut(dst.add(i * dst_rs), n).fill(T::ZERO);
            }
        }
        return;
    }
    gemm::gemm(
        m,
        n,
        k,
        dst,
        1,
        dst_rs as isize,
        accumulate,
        lhs.ptr,
        lhs.cs as isize,
        lhs.rs as isize,
        rhs.ptr,
        rhs.cs as isize,
        rhs.rs as isize,
        T::ONE,
        scale,
        false,
        false,
        false,
        par,
    );
}

/// lhs · rhs as a new row-major m × n buffer, where `lhs` holds m × k row-major (or k × m
/// when `lhs_t`, used transposed) and `rhs` holds k × n (or n × k when `rhs_t`). The buffer is
/// never zero-filled: gemm overwrites it, and a memset would touch every page once more.
pub(super) fn matmul<T: Real>(
    (m, n, k): (usize, usize, usize),
    lhs: &[T],
    lhs_t: bool,
    rhs: &[T],
    rhs_t: bool,
) -> Vec<T> {
    assert!(
        lhs.len() == m * k && rhs.len() == k * n,
        "matmul: buffers do not fit {m}×{k} · {k}×{n}"
    );
    let l = if lhs_t {
        View::rows(lhs, m).t()
    } else {
        View::rows(lhs, k)
    };
    let r = if rhs_t {
        View::rows(rhs, k).t()
    } else {
        View::rows(rhs, n)
    };
    let mut dst: Vec<T> = Vec::with_capacity(m * n);
    let out = SendPtr(dst.as_mut_ptr());
    let (lhs_ptr, rhs_ptr) = (SendConst(l.ptr), SendConst(r.ptr));
    // Safety: the lengths were checked against the shapes above, and `dst` has room for m × n;
    // each band writes its own rows; gemm without `accumulate` writes every element of them
    // (gemm_raw zero-fills when k = 0), so `dst` is fully initialised before `set_len`.
    let band = |rows: std::ops::Range<usize>, par: Parallelism| unsafe {
        let l = View {
            ptr: lhs_ptr.get().add(rows.start * l.rs),
            ..l
        };
        let r = View {
            ptr: rhs_ptr.get(),
            ..r
        };
        gemm_raw(
            (rows.len(), n, k),
            out.at(rows.start * n),
            n,
            false,
            l,
            r,
            T::ONE,
            par,
        );
    };
    match split(m, n, k) {
        Split::None => band(0..m, Parallelism::None),
        Split::Gemm(threads) => band(0..m, Parallelism::Rayon(threads)),
        Split::Rows(rows) => (0..m.div_ceil(rows))
            .into_par_iter()
            .for_each(|b| band(b * rows..m.min((b + 1) * rows), Parallelism::None)),
    }
    // Safety: see above.
    unsafe { dst.set_len(m * n) };
    dst
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fast_exp_is_accurate_to_a_few_ulp() {
        let mut worst = 0f64;
        for i in 0..=200_000 {
            let x = -87.0 + 175.0 * i as f64 / 200_000.0;
            let (got, want) = (exp_f32(x as f32) as f64, (x as f32 as f64).exp());
            worst = worst.max(((got - want) / want).abs());
        }
        assert!(worst < 3e-7, "relative error {worst:e}");
        assert_eq!(exp_f32(0.0), 1.0);
        assert_eq!(exp_f32(-100.0), 0.0);
        assert_eq!(exp_f32(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp_f32(100.0), f32::INFINITY);
        assert!(exp_f32(f32::NAN).is_nan());
    }
}
