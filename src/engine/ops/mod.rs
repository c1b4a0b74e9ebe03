//! Fused CPU kernels with hand-written backward passes for the dense and SVF forward pass.
//!
//! Built from candle's composable ops, one SVF training step (`benches/svf_step.rs`) spent most
//! of its time outside the matrix products: every small op allocates its output and runs on
//! candle's element-wise thread pool, and in the backward pass each graph node (reshapes and
//! transposes included) allocates a zero gradient that the real one is then added to. Each
//! function here is one `CustomOp` instead — forward and backward written out side by side
//! (llm.c style), matrix products through `gemm` on the storage slices, rows spread over rayon:
//!
//! - [`matmul_const`], [`svf_linear`]: x·W and ((x·V) ⊙ s)·Uᵀ with constant factors;
//! - [`rms_norm`], [`softmax`], [`log_softmax`], [`target_log_probs`], [`gated_activation`],
//!   [`fake_quant_ste`]: row-wise and element-wise layers;
//! - [`causal_attention`]: RoPE, grouped-query causal attention and the head layout in one op.
//!
//! Every op takes f32 or f64 CPU tensors (made contiguous first). Any other dtype or device
//! falls back to the composable version in [`composable`], which is also the reference the
//! tests compare against (forward values, and finite differences for the backward).

use crate::engine::config::Activation;
use crate::error::Result;
use candle_core::backend::BackendStorage;
use candle_core::{
    bail, CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Shape, Storage, StorageRef,
    Tensor, D,
};
use gemm::Parallelism;
use rayon::prelude::*;
use std::ops::{Add, AddAssign, Div, Mul, MulAssign, Neg, Sub, SubAssign};
use std::sync::Mutex;

type CResult<T> = candle_core::Result<T>;

// ---------------------------------------------------------------------------------------------
// Scalars and vector loops

/// The float types the kernels run on (f32 for training, f64 for gradient checks).
trait Real:
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

impl Real for f32 {
    const ZERO: Self = 0.0;
    const ONE: Self = 1.0;
    const MIN_NORMAL: Self = f32::MIN_POSITIVE;
    #[inline(always)]
    fn abs(self) -> Self {
        f32::abs(self)
    }
    fn ln(self) -> Self {
        f32::ln(self)
    }
    fn from_f64(v: f64) -> Self {
        v as f32
    }
    #[inline(always)]
    fn exp(self) -> Self {
        exp_f32(self)
    }
    #[inline(always)]
    fn max(self, other: Self) -> Self {
        f32::max(self, other)
    }
    fn slice(s: &CpuStorage) -> Option<&[Self]> {
        match s {
            CpuStorage::F32(v) => Some(v),
            _ => None,
        }
    }
    fn into_storage(v: Vec<Self>) -> CpuStorage {
        CpuStorage::F32(v)
    }
}

impl Real for f64 {
    const ZERO: Self = 0.0;
    const ONE: Self = 1.0;
    const MIN_NORMAL: Self = f64::MIN_POSITIVE;
    #[inline(always)]
    fn abs(self) -> Self {
        f64::abs(self)
    }
    fn ln(self) -> Self {
        f64::ln(self)
    }
    fn from_f64(v: f64) -> Self {
        v
    }
    fn exp(self) -> Self {
        f64::exp(self)
    }
    #[inline(always)]
    fn max(self, other: Self) -> Self {
        f64::max(self, other)
    }
    fn slice(s: &CpuStorage) -> Option<&[Self]> {
        match s {
            CpuStorage::F64(v) => Some(v),
            _ => None,
        }
    }
    fn into_storage(v: Vec<Self>) -> CpuStorage {
        CpuStorage::F64(v)
    }
}

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
const LANES: usize = 16;

#[inline(always)]
fn sum<T: Real>(x: &[T]) -> T {
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
fn dot<T: Real>(x: &[T], y: &[T]) -> T {
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
fn max<T: Real>(x: &[T]) -> T {
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
fn exp_shifted<T: Real>(x: &[T], m: T, out: &mut [T]) -> T {
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
fn softmax_in_place<T: Real>(row: &mut [T]) {
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
const NEGLIGIBLE_PROB: f64 = 5.421_010_862_427_522e-20;

#[inline(always)]
fn flush<T: Real>(v: T, below: T) -> T {
    if v.abs() < below {
        T::ZERO
    } else {
        v
    }
}

/// Set the subnormal entries of `x` to 0.
fn flush_subnormals<T: Real>(x: &mut [T]) {
    x.par_chunks_mut(TASK_ELEMS).for_each(|c| {
        for v in c {
            *v = flush(*v, T::MIN_NORMAL);
        }
    });
}

/// Defines `fn $name` that runs its body compiled for AVX-512 when the CPU has it. The row
/// kernels are plain Rust loops, which the compiler vectorizes only as wide as the target
/// allows (4 lanes of SSE2 for the default x86-64 target); the AVX-512 copy uses 16. (A
/// closure cannot carry `#[target_feature]`, hence named functions.)
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
            if std::arch::is_x86_feature_detected!("avx512f") {
                // Safety: the CPU has the features `avx512` is compiled for.
                return unsafe { avx512($($arg),*) };
            }
            body($($arg),*)
        }
    };
}

/// Elements per rayon task in element-wise and row loops: below this, splitting costs more
/// than it saves.
const TASK_ELEMS: usize = 1 << 13;

/// Minimum rows per rayon task for rows of `cols` elements.
fn task_rows(cols: usize) -> usize {
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
struct SendPtr<T>(*mut T);
unsafe impl<T> Send for SendPtr<T> {}
unsafe impl<T> Sync for SendPtr<T> {}
impl<T> SendPtr<T> {
    /// The pointer advanced by `off` elements (a method, so closures capture the wrapper).
    fn at(self, off: usize) -> *mut T {
        self.0.wrapping_add(off)
    }
}

// ---------------------------------------------------------------------------------------------
// gemm on slices

/// A strided matrix view: element (i, j) at `ptr + i·rs + j·cs`.
#[derive(Clone, Copy)]
struct View<T> {
    ptr: *const T,
    rs: usize,
    cs: usize,
}

impl<T> View<T> {
    /// The row-major matrix with `cols` columns that starts at `s[0]`.
    fn rows(s: &[T], cols: usize) -> Self {
        View {
            ptr: s.as_ptr(),
            rs: cols,
            cs: 1,
        }
    }
    fn t(self) -> Self {
        View {
            ptr: self.ptr,
            rs: self.cs,
            cs: self.rs,
        }
    }
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
    if threads < 2 || m * n * k < 1 << 20 || rayon::current_thread_index().is_some() {
        Split::None
    } else if k > n && m >= MIN_BAND_ROWS * 2 {
        // Bands of whole multiples of 8 rows (the microkernel's row block).
        Split::Rows(m.div_ceil(threads).next_multiple_of(8).max(MIN_BAND_ROWS))
    } else {
        Split::Gemm(threads)
    }
}

/// dst (m × n, element (i, j) at `dst + i·dst_rs + j`) ← [dst +] scale · lhs · rhs.
///
/// # Safety
/// The views must address `m × k`, `k × n` and `m × n` valid elements, and `dst` must not
/// overlap the inputs or memory another thread writes.
#[allow(clippy::too_many_arguments)]
unsafe fn gemm_raw<T: Real>(
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
fn matmul<T: Real>(
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

// ---------------------------------------------------------------------------------------------
// Storage access

/// Whether the fused kernels apply: all on the CPU, one dtype, f32 or f64.
fn fast(ts: &[&Tensor]) -> bool {
    let dt = ts[0].dtype();
    matches!(dt, DType::F32 | DType::F64)
        && ts.iter().all(|t| t.device().is_cpu() && t.dtype() == dt)
}

/// The contiguous data of a CPU tensor, read-locked for as long as the view lives.
struct CpuView<'a> {
    storage: StorageRef<'a>,
    start: usize,
    end: usize,
}

impl<'a> CpuView<'a> {
    fn of(t: &'a Tensor) -> CResult<Self> {
        let (storage, layout) = t.storage_and_layout();
        let Some((start, end)) = layout.contiguous_offsets() else {
            bail!("fused op: tensor of shape {:?} is not contiguous", t.dims())
        };
        Ok(CpuView {
            storage,
            start,
            end,
        })
    }

    fn get<T: Real>(&self) -> CResult<&[T]> {
        match &*self.storage {
            Storage::Cpu(s) => match T::slice(s) {
                Some(v) => Ok(&v[self.start..self.end]),
                None => bail!("fused op: unexpected dtype {:?}", s.dtype()),
            },
            _ => bail!("fused op: tensor is not on the CPU"),
        }
    }
}

/// The data of a `cpu_fwd` argument.
fn input<'a, T: Real>(s: &'a CpuStorage, l: &Layout, op: &str) -> CResult<&'a [T]> {
    let Some((start, end)) = l.contiguous_offsets() else {
        bail!("{op}: input of shape {:?} is not contiguous", l.dims())
    };
    match T::slice(s) {
        Some(v) => Ok(&v[start..end]),
        None => bail!("{op}: mixed dtypes ({:?})", s.dtype()),
    }
}

/// State an op's forward pass leaves for its backward pass.
struct Saved<S>(Mutex<Option<S>>);

impl<S> Saved<S> {
    fn empty() -> Self {
        Saved(Mutex::new(None))
    }

    fn put(&self, state: S) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = Some(state);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<S>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The state in a [`Saved::lock`] guard, or an error naming `op` if no forward pass saved it.
fn required<'a, S>(guard: &'a Option<S>, op: &str) -> CResult<&'a S> {
    match guard.as_ref() {
        Some(s) => Ok(s),
        None => bail!("{op}: backward without a saved forward pass"),
    }
}

/// State an op saved in its forward pass, in the dtype of its arguments.
fn saved_slice<T: Real>(c: &CpuStorage) -> &[T] {
    T::slice(c).expect("an op's saved state has the dtype of its arguments")
}

/// A CPU tensor owning `v` (no copy).
fn tensor<T: Real>(v: Vec<T>, shape: impl Into<Shape>) -> CResult<Tensor> {
    let (shape, dev) = (shape.into(), candle_core::Device::Cpu);
    match T::into_storage(v) {
        CpuStorage::F32(v) => Tensor::from_vec(v, shape, &dev),
        CpuStorage::F64(v) => Tensor::from_vec(v, shape, &dev),
        other => bail!("fused op: unexpected dtype {:?}", other.dtype()),
    }
}

/// Run `$body` with `$T` bound to the Rust type of `$dtype` (f32 or f64).
macro_rules! with_real {
    ($dtype:expr, $op:expr, $T:ident => $body:expr) => {
        match $dtype {
            DType::F32 => {
                type $T = f32;
                $body
            }
            DType::F64 => {
                type $T = f64;
                $body
            }
            dt => bail!("{}: unsupported dtype {dt:?}", $op),
        }
    };
}

/// A shape mismatch between the arguments of a fused op (a bug in the caller).
fn shape_error(msg: String) -> crate::Error {
    candle_core::Error::Msg(msg).into()
}

/// A shape `[.., cols]` seen as a `rows × cols` matrix. The ops take N-d tensors as they are:
/// a reshape would be one more graph node whose backward allocates and adds a full gradient.
fn rows_cols(shape: &Shape) -> CResult<(usize, usize)> {
    let Some((&cols, lead)) = shape.dims().split_last() else {
        bail!("fused op: a scalar has no feature dim")
    };
    Ok((lead.iter().product(), cols))
}

/// `shape` with its last dim replaced by `last`.
fn with_last(shape: &Shape, last: usize) -> Shape {
    let mut d = shape.dims().to_vec();
    *d.last_mut().expect("tensor has a feature dim") = last;
    d.into()
}

// ---------------------------------------------------------------------------------------------
// x · W for a constant W

/// `x` `[.., in]` times a constant `wt` `[in, out]`; the backward pass returns only
/// ∂L/∂x = ∂L/∂y · wtᵀ (candle's matmul backward always computes the weight gradient too, an
/// extra product per layer that SVF training never needs). A `wt` that tracks gradients takes
/// the ordinary differentiable path.
pub fn matmul_const(x: &Tensor, wt: &Tensor) -> Result<Tensor> {
    if wt.track_op() || !fast(&[x, wt]) {
        return composable::matmul_2d(x, wt);
    }
    let k = wt.dim(0)?;
    let cols = x.dim(D::Minus1)?;
    if cols != k {
        return Err(shape_error(format!(
            "matmul_const: x has {cols} features, the weight expects {k}"
        )));
    }
    let y = x.contiguous()?.apply_op1(MatmulConst {
        wt: wt.contiguous()?,
    })?;
    Ok(y)
}

struct MatmulConst {
    /// `[in, out]`, contiguous.
    wt: Tensor,
}

impl CustomOp1 for MatmulConst {
    fn name(&self) -> &'static str {
        "matmul-const"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> CResult<(CpuStorage, Shape)> {
        let (m, k) = rows_cols(l.shape())?;
        let n = self.wt.dim(1)?;
        let w = CpuView::of(&self.wt)?;
        with_real!(s.dtype(), self.name(), T => {
            let y = matmul((m, n, k), input::<T>(s, l, self.name())?, false, w.get()?, false);
            Ok((T::into_storage(y), with_last(l.shape(), n)))
        })
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, dy: &Tensor) -> CResult<Option<Tensor>> {
        let (m, k) = rows_cols(x.shape())?;
        let n = self.wt.dim(1)?;
        let dy = dy.contiguous()?;
        let (dyv, w) = (CpuView::of(&dy)?, CpuView::of(&self.wt)?);
        with_real!(x.dtype(), self.name(), T => {
            // dx = dy · wtᵀ
            let dx = matmul((m, k, n), dyv.get::<T>()?, false, w.get()?, true);
            Ok(Some(tensor(dx, x.shape().clone())?))
        })
    }
}

// ---------------------------------------------------------------------------------------------
// SVF linear

/// y = ((x·V) ⊙ s)·Uᵀ for `x` `[.., in]`, constant `v` `[in, r]` and `u_t` `[r, out]`, and a
/// differentiable scale `s` `[r]` (Transformer²'s SVF, see [`crate::svf`]). The backward
/// pass returns ∂L/∂x = ((∂L/∂y·U) ⊙ s)·Vᵀ and ∂L/∂s = Σ_tokens (x·V) ⊙ (∂L/∂y·U), reusing
/// x·V from the forward pass.
pub fn svf_linear(x: &Tensor, v: &Tensor, s: &Tensor, u_t: &Tensor) -> Result<Tensor> {
    if v.track_op() || u_t.track_op() || !fast(&[x, v, s, u_t]) {
        return composable::svf_linear(x, v, s, u_t);
    }
    let (k, r) = v.dims2()?;
    let (r2, n) = u_t.dims2()?;
    let cols = x.dim(D::Minus1)?;
    if cols != k || r2 != r || s.dims() != [r] {
        return Err(shape_error(format!(
            "svf_linear: x has {cols} features, V is {k}×{r}, Uᵀ is {r2}×{n}, s has shape {:?}",
            s.dims()
        )));
    }
    let op = SvfLinear {
        v: v.contiguous()?,
        u_t: u_t.contiguous()?,
        keep_h: x.track_op() || s.track_op(),
        h: Saved::empty(),
    };
    Ok(x.contiguous()?.apply_op2(&s.contiguous()?, op)?)
}

/// Multiplies every row of the row-major `m` (rows of `s.len()`) by `s` element-wise.
fn scale_columns<T: Real>(m: &mut [T], s: &[T]) {
    let r = s.len();
    m.par_chunks_mut(r.max(1))
        .with_min_len(task_rows(r))
        .for_each(|row| {
            for (a, &b) in row.iter_mut().zip(s) {
                *a *= b;
            }
        });
}

struct SvfLinear {
    /// V `[in, r]`.
    v: Tensor,
    /// Uᵀ `[r, out]`.
    u_t: Tensor,
    /// Whether a backward pass may follow (then h is kept).
    keep_h: bool,
    /// h = x·V `[rows, r]` from the forward pass.
    h: Saved<CpuStorage>,
}

impl CustomOp2 for SvfLinear {
    fn name(&self) -> &'static str {
        "svf-linear"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ss: &CpuStorage,
        sl: &Layout,
    ) -> CResult<(CpuStorage, Shape)> {
        let (m, k) = rows_cols(xl.shape())?;
        let (r, n) = self.u_t.dims2()?;
        let (v, u_t) = (CpuView::of(&self.v)?, CpuView::of(&self.u_t)?);
        with_real!(xs.dtype(), self.name(), T => {
            let x = input::<T>(xs, xl, self.name())?;
            let s = input::<T>(ss, sl, self.name())?;
            let h = matmul((m, r, k), x, false, v.get()?, false);
            let mut g = h.clone();
            scale_columns(&mut g, s);
            let y = matmul((m, n, r), &g, false, u_t.get()?, false);
            if self.keep_h {
                self.h.put(T::into_storage(h));
            }
            Ok((T::into_storage(y), with_last(xl.shape(), n)))
        })
    }

    fn bwd(
        &self,
        x: &Tensor,
        s: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> CResult<(Option<Tensor>, Option<Tensor>)> {
        let (m, k) = rows_cols(x.shape())?;
        let (r, n) = self.u_t.dims2()?;
        let (dy, s_c) = (dy.contiguous()?, s.contiguous()?);
        let (dyv, sv) = (CpuView::of(&dy)?, CpuView::of(&s_c)?);
        let (v, u_t) = (CpuView::of(&self.v)?, CpuView::of(&self.u_t)?);
        let saved = self.h.lock();
        let h = required(&saved, self.name())?;
        with_real!(x.dtype(), self.name(), T => {
            let h = saved_slice::<T>(h);
            let sc = sv.get::<T>()?;
            // dg = dy · U  [m, r]
            let mut dg = matmul::<T>((m, r, n), dyv.get()?, false, u_t.get()?, true);
            // ds = Σ_rows h ⊙ dg
            let ds = s.track_op().then(|| {
                let mut ds = vec![T::ZERO; r];
                for (hr, gr) in h.chunks_exact(r.max(1)).zip(dg.chunks_exact(r.max(1))) {
                    for ((a, &p), &q) in ds.iter_mut().zip(hr).zip(gr) {
                        *a += p * q;
                    }
                }
                ds
            });
            let dx = if x.track_op() {
                // dx = (dg ⊙ s) · Vᵀ
                scale_columns(&mut dg, sc);
                let dx = matmul((m, k, r), &dg, false, v.get()?, true);
                Some(tensor(dx, x.shape().clone())?)
            } else {
                None
            };
            Ok((dx, ds.map(|d| tensor(d, r)).transpose()?))
        })
    }
}

// ---------------------------------------------------------------------------------------------
// RMSNorm

/// RMSNorm over the last dim: x · rsqrt(mean(x²) + ε) · w. Differentiable in x and in w (w is a
/// variable during pretraining).
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    if !fast(&[x, w]) {
        return composable::rms_norm(x, w, eps);
    }
    let d = x.dim(D::Minus1)?;
    if w.dims() != [d] {
        return Err(shape_error(format!(
            "rms_norm: weight has shape {:?}, expected [{d}]",
            w.dims()
        )));
    }
    let op = RmsNorm {
        eps,
        inv_rms: Saved::empty(),
    };
    Ok(x.contiguous()?.apply_op2(&w.contiguous()?, op)?)
}

struct RmsNorm {
    eps: f64,
    /// rsqrt(mean(x²) + ε) per row, from the forward pass.
    inv_rms: Saved<CpuStorage>,
}

impl CustomOp2 for RmsNorm {
    fn name(&self) -> &'static str {
        "rms-norm"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
    ) -> CResult<(CpuStorage, Shape)> {
        let (m, d) = rows_cols(xl.shape())?;
        with_real!(xs.dtype(), self.name(), T => {
            let x = input::<T>(xs, xl, self.name())?;
            let w = input::<T>(ws, wl, self.name())?;
            let eps = T::from_f64(self.eps);
            let inv_d = T::ONE / T::from_f64(d as f64);
            let mut y = vec![T::ZERO; m * d];
            let mut inv_rms = vec![T::ZERO; m];
            if d > 0 {
                y.par_chunks_mut(d)
                    .zip(inv_rms.par_iter_mut())
                    .zip(x.par_chunks(d))
                    .with_min_len(task_rows(d))
                    .for_each(|((y, ir), x)| {
                        let r = T::ONE / (dot(x, x) * inv_d + eps).sqrt();
                        *ir = r;
                        for ((y, &x), &w) in y.iter_mut().zip(x).zip(w) {
                            *y = x * r * w;
                        }
                    });
            }
            self.inv_rms.put(T::into_storage(inv_rms));
            Ok((T::into_storage(y), xl.shape().clone()))
        })
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> CResult<(Option<Tensor>, Option<Tensor>)> {
        let (m, d) = rows_cols(x.shape())?;
        let dy = dy.contiguous()?;
        let (xv, wv, dyv) = (CpuView::of(x)?, CpuView::of(w)?, CpuView::of(&dy)?);
        let saved = self.inv_rms.lock();
        let inv_rms = required(&saved, self.name())?;
        if d == 0 {
            return Ok((None, None));
        }
        with_real!(x.dtype(), self.name(), T => {
            let (xs, ws, dys) = (xv.get::<T>()?, wv.get::<T>()?, dyv.get::<T>()?);
            let inv_rms = saved_slice::<T>(inv_rms);
            let inv_d = T::ONE / T::from_f64(d as f64);
            // With n = x·r and dn = dy ⊙ w: dx = r·(dn − n·mean(dn ⊙ n)).
            let dx = if x.track_op() {
                let mut dx = vec![T::ZERO; m * d];
                dx.par_chunks_mut(d)
                    .zip(xs.par_chunks(d))
                    .zip(dys.par_chunks(d))
                    .zip(inv_rms.par_iter())
                    .with_min_len(task_rows(d))
                    .for_each(|(((dx, x), dy), &r)| {
                        let mut acc = T::ZERO;
                        for ((&g, &w), &x) in dy.iter().zip(ws).zip(x) {
                            acc += g * w * x;
                        }
                        let c = acc * r * r * inv_d;
                        for (((o, &g), &w), &x) in dx.iter_mut().zip(dy).zip(ws).zip(x) {
                            *o = r * (g * w - x * c);
                        }
                    });
                Some(tensor(dx, x.shape().clone())?)
            } else {
                None
            };
            // dw = Σ_rows dy ⊙ x·r
            let dw = if w.track_op() {
                let dw = xs
                    .par_chunks(d)
                    .zip(dys.par_chunks(d))
                    .zip(inv_rms.par_iter())
                    .with_min_len(task_rows(d))
                    .fold(
                        || vec![T::ZERO; d],
                        |mut acc, ((x, dy), &r)| {
                            for ((a, &x), &g) in acc.iter_mut().zip(x).zip(dy) {
                                *a += g * x * r;
                            }
                            acc
                        },
                    )
                    .reduce(
                        || vec![T::ZERO; d],
                        |mut a, b| {
                            for (a, b) in a.iter_mut().zip(b) {
                                *a += b;
                            }
                            a
                        },
                    );
                Some(tensor(dw, d)?)
            } else {
                None
            };
            Ok((dx, dw))
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Softmax, log-softmax and the log-probabilities of targets

simd_fn! {
    /// Softmax (or log-softmax, `log`) of the row `x` into `y`.
    fn softmax_row<T: Real>(x: &[T], y: &mut [T], log: bool) {
        let mx = max(x);
        let total = exp_shifted(x, mx, y);
        if log {
            // log p = x − max − ln Σ e^(x − max)
            let shift = mx + total.ln();
            for (y, &x) in y.iter_mut().zip(x) {
                *y = x - shift;
            }
        } else {
            let inv = T::ONE / total;
            for y in y.iter_mut() {
                *y *= inv;
            }
        }
    }
}

simd_fn! {
    /// Backward of [`softmax_row`]: dx from the output `y` and its gradient `dy`.
    fn softmax_row_bwd<T: Real>(y: &[T], dy: &[T], dx: &mut [T], log: bool) {
        if log {
            // dx = dy − e^y · Σ dy
            let total = sum(dy);
            for ((o, &y), &g) in dx.iter_mut().zip(y).zip(dy) {
                *o = flush(g - y.exp() * total, T::MIN_NORMAL);
            }
        } else {
            // dx = y ⊙ (dy − Σ dy ⊙ y)
            let c = dot(dy, y);
            for ((o, &y), &g) in dx.iter_mut().zip(y).zip(dy) {
                *o = flush(y * (g - c), T::MIN_NORMAL);
            }
        }
    }
}

/// Softmax over the last dim (the row max subtracted first).
pub fn softmax(x: &Tensor) -> Result<Tensor> {
    softmax_op(x, false)
}

/// Log-softmax over the last dim (the row max subtracted first).
pub fn log_softmax(x: &Tensor) -> Result<Tensor> {
    softmax_op(x, true)
}

fn softmax_op(x: &Tensor, log: bool) -> Result<Tensor> {
    if !fast(&[x]) {
        return if log {
            composable::log_softmax(x)
        } else {
            composable::softmax(x)
        };
    }
    Ok(x.contiguous()?.apply_op1(Softmax { log })?)
}

struct Softmax {
    log: bool,
}

impl CustomOp1 for Softmax {
    fn name(&self) -> &'static str {
        if self.log {
            "log-softmax"
        } else {
            "softmax"
        }
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> CResult<(CpuStorage, Shape)> {
        let (m, v) = rows_cols(l.shape())?;
        with_real!(s.dtype(), self.name(), T => {
            let x = input::<T>(s, l, self.name())?;
            let mut y = vec![T::ZERO; m * v];
            if v > 0 {
                y.par_chunks_mut(v)
                    .zip(x.par_chunks(v))
                    .with_min_len(task_rows(v))
                    .for_each(|(y, x)| softmax_row(x, y, self.log));
            }
            Ok((T::into_storage(y), l.shape().clone()))
        })
    }

    fn bwd(&self, x: &Tensor, y: &Tensor, dy: &Tensor) -> CResult<Option<Tensor>> {
        let (m, v) = rows_cols(x.shape())?;
        if v == 0 {
            return Ok(None);
        }
        let dy = dy.contiguous()?;
        let (yv, dyv) = (CpuView::of(y)?, CpuView::of(&dy)?);
        with_real!(x.dtype(), self.name(), T => {
            let (ys, dys) = (yv.get::<T>()?, dyv.get::<T>()?);
            let mut dx = vec![T::ZERO; m * v];
            dx.par_chunks_mut(v)
                .zip(ys.par_chunks(v))
                .zip(dys.par_chunks(v))
                .with_min_len(task_rows(v))
                .for_each(|((dx, y), dy)| softmax_row_bwd(y, dy, dx, self.log));
            Ok(Some(tensor(dx, x.shape().clone())?))
        })
    }
}

simd_fn! {
    /// ln Σ_j e^(x_j) of the row `x`, computed with the max subtracted.
    fn log_sum_exp<T: Real>(x: &[T]) -> T {
        let mx = max(x);
        let mut acc = [T::ZERO; LANES];
        let chunks = x.chunks_exact(LANES);
        let mut s = chunks
            .remainder()
            .iter()
            .fold(T::ZERO, |a, &v| a + (v - mx).exp());
        for c in chunks {
            let c: &[T; LANES] = c.try_into().expect("exact chunk");
            for i in 0..LANES {
                acc[i] += (c[i] - mx).exp();
            }
        }
        for a in acc {
            s += a;
        }
        mx + s.ln()
    }
}

simd_fn! {
    /// Backward of one row of [`target_log_probs`]: dx_j = g·(δ_{j,target} − e^(x_j − lse)).
    fn target_log_prob_row_bwd<T: Real>(x: &[T], lse: T, target: usize, g: T, dx: &mut [T]) {
        for (o, &v) in dx.iter_mut().zip(x) {
            *o = flush(-(g * (v - lse).exp()), T::MIN_NORMAL);
        }
        dx[target] += g;
    }
}

/// log softmax(logits)[target] for every row: `logits` `[.., V]`, `targets` `[rows]` (u32)
/// → `[rows]`. The same as gathering [`log_softmax`] at the targets, without its `[rows, V]`
/// output: over a 32000-token vocabulary, that tensor, the gather's backward (a zero tensor
/// of its size scattered into) and the accumulation of both gradients were most of the
/// element-wise work of a training step. The backward pass writes the one `[rows, V]`
/// gradient, softmax − one-hot, from the logits and the saved log-sum-exp of each row.
pub fn target_log_probs(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let (rows, v) = rows_cols(logits.shape())?;
    if targets.dims() != [rows] || targets.dtype() != DType::U32 {
        return Err(shape_error(format!(
            "target_log_probs: targets {:?} ({:?}) do not fit logits {:?}: expected [{rows}] u32",
            targets.dims(),
            targets.dtype(),
            logits.dims()
        )));
    }
    if !fast(&[logits]) || !targets.device().is_cpu() || v == 0 {
        return composable::target_log_probs(logits, targets);
    }
    let op = TargetLogProbs {
        lse: Saved::empty(),
    };
    Ok(logits.contiguous()?.apply_op2(&targets.contiguous()?, op)?)
}

struct TargetLogProbs {
    /// ln Σ e^logits of each row, from the forward pass.
    lse: Saved<CpuStorage>,
}

/// The target ids of a `target_log_probs` call, checked against the vocabulary size.
fn target_ids<'a>(s: &'a CpuStorage, l: &Layout, vocab: usize) -> CResult<&'a [u32]> {
    let (CpuStorage::U32(ids), Some((start, end))) = (s, l.contiguous_offsets()) else {
        bail!("target-log-probs: targets must be contiguous u32")
    };
    let ids = &ids[start..end];
    if let Some(&bad) = ids.iter().find(|&&t| t as usize >= vocab) {
        bail!("target-log-probs: target id {bad} is outside the vocabulary of {vocab}");
    }
    Ok(ids)
}

impl CustomOp2 for TargetLogProbs {
    fn name(&self) -> &'static str {
        "target-log-probs"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ts: &CpuStorage,
        tl: &Layout,
    ) -> CResult<(CpuStorage, Shape)> {
        let (m, v) = rows_cols(xl.shape())?;
        let ids = target_ids(ts, tl, v)?;
        with_real!(xs.dtype(), self.name(), T => {
            let x = input::<T>(xs, xl, self.name())?;
            let mut lse = vec![T::ZERO; m];
            lse.par_iter_mut()
                .zip(x.par_chunks(v))
                .for_each(|(l, x)| *l = log_sum_exp(x));
            let picked: Vec<T> = (0..m).map(|r| x[r * v + ids[r] as usize] - lse[r]).collect();
            self.lse.put(T::into_storage(lse));
            Ok((T::into_storage(picked), Shape::from(m)))
        })
    }

    fn bwd(
        &self,
        x: &Tensor,
        targets: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> CResult<(Option<Tensor>, Option<Tensor>)> {
        let (m, v) = rows_cols(x.shape())?;
        let dy = dy.contiguous()?;
        let (xv, dyv) = (CpuView::of(x)?, CpuView::of(&dy)?);
        let (ts, tl) = targets.storage_and_layout();
        let Storage::Cpu(ts) = &*ts else {
            bail!("target-log-probs: targets are not on the CPU")
        };
        let ids = target_ids(ts, tl, v)?;
        let saved = self.lse.lock();
        let lse = required(&saved, self.name())?;
        with_real!(x.dtype(), self.name(), T => {
            let (xs, dys, lse) = (xv.get::<T>()?, dyv.get::<T>()?, saved_slice::<T>(lse));
            let mut dx = vec![T::ZERO; m * v];
            dx.par_chunks_mut(v)
                .zip(xs.par_chunks(v))
                .enumerate()
                .with_min_len(task_rows(v))
                .for_each(|(r, (dx, x))| {
                    target_log_prob_row_bwd(x, lse[r], ids[r] as usize, dys[r], dx)
                });
            Ok((Some(tensor(dx, x.shape().clone())?), None))
        })
    }
}

// ---------------------------------------------------------------------------------------------
// RoPE and causal attention

/// Rotate-half RoPE (HF convention) of `x` `[B, L, n·hd]`, position `first + l` for row l of
/// each batch, tables `cos`, `sin` `[≥ first + L, hd]`. `inverse` applies the transposed
/// rotation (the backward pass).
#[allow(clippy::too_many_arguments)]
fn rope_rows<T: Real>(
    x: &[T],
    len: usize,
    row: usize,
    hd: usize,
    first: usize,
    cos: &[T],
    sin: &[T],
    inverse: bool,
) -> Vec<T> {
    let half = hd / 2;
    let mut y = vec![T::ZERO; x.len()];
    if row == 0 || len == 0 {
        return y;
    }
    y.par_chunks_mut(row)
        .zip(x.par_chunks(row))
        .enumerate()
        .with_min_len(task_rows(row))
        .for_each(|(bl, (y, x))| {
            let p = first + bl % len;
            let (c, s) = (&cos[p * hd..(p + 1) * hd], &sin[p * hd..(p + 1) * hd]);
            let (c1, c2) = c.split_at(half);
            let (s1, s2) = s.split_at(half);
            for (y, x) in y.chunks_exact_mut(hd).zip(x.chunks_exact(hd)) {
                let (x1, x2) = x.split_at(half);
                let (y1, y2) = y.split_at_mut(half);
                for i in 0..half {
                    if inverse {
                        y1[i] = x1[i] * c1[i] + x2[i] * s2[i];
                        y2[i] = x2[i] * c2[i] - x1[i] * s1[i];
                    } else {
                        y1[i] = x1[i] * c1[i] - x2[i] * s1[i];
                        y2[i] = x2[i] * c2[i] + x1[i] * s2[i];
                    }
                }
            }
        });
    y
}

/// Causal grouped-query attention with rotate-half RoPE: softmax(q̃·k̃ᵀ/√hd + mask)·v, where q̃,
/// k̃ are q, k rotated by the tables `cos`, `sin` `[max_pos, hd]`.
///
/// `q` is `[B, T, heads·hd]`, `k` and `v` are `[B, S, kv_heads·hd]` (unrotated), S ≥ T: the
/// queries are the last T of the S positions, so a KV cache is the first S − T. Query head h
/// reads kv head h·kv_heads/heads. Returns `[B, T, heads·hd]`.
///
/// One op in the token-major layout of the projections: the head transposes, RoPE, the mask
/// and the softmax never become tensors (graph nodes) of their own, and the backward pass
/// reuses the rotated q, k and the attention probabilities of the forward pass.
pub fn causal_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    kv_heads: usize,
    cos: &Tensor,
    sin: &Tensor,
) -> Result<Tensor> {
    if !fast(&[q, k, v, cos, sin]) {
        return composable::causal_attention(q, k, v, heads, kv_heads, cos, sin);
    }
    let (b, t, qw) = q.dims3()?;
    let (b2, s, kw) = k.dims3()?;
    let hd = qw.checked_div(heads).unwrap_or(0);
    let fits = heads > 0
        && kv_heads > 0
        && heads.is_multiple_of(kv_heads)
        && qw == heads * hd
        && hd % 2 == 0
        && b2 == b
        && kw == kv_heads * hd
        && v.dims() == k.dims()
        && s >= t
        && cos.dims2()?.1 == hd
        && cos.dim(0)? >= s
        && sin.dims() == cos.dims();
    if !fits {
        return Err(shape_error(format!(
            "causal_attention: q {:?}, k {:?}, v {:?} with {heads}/{kv_heads} heads and RoPE \
             tables {:?} do not fit [B,T,H·hd], [B,S,KV·hd], [≥S, hd]",
            q.dims(),
            k.dims(),
            v.dims(),
            cos.dims()
        )));
    }
    let op = Attention {
        heads,
        kv_heads,
        scale: 1.0 / (hd as f64).sqrt(),
        cos: cos.narrow(0, 0, s)?.contiguous()?,
        sin: sin.narrow(0, 0, s)?.contiguous()?,
        keep: q.track_op() || k.track_op() || v.track_op(),
        saved: Saved::empty(),
    };
    Ok(q.contiguous()?
        .apply_op3(&k.contiguous()?, &v.contiguous()?, op)?)
}

struct Attention {
    heads: usize,
    kv_heads: usize,
    scale: f64,
    /// RoPE tables of positions 0..S, `[S, hd]`.
    cos: Tensor,
    sin: Tensor,
    /// Whether a backward pass may follow (then `saved` is filled).
    keep: bool,
    saved: Saved<AttentionSaved>,
}

/// What the backward pass reuses from the forward pass.
struct AttentionSaved {
    /// Rotated q `[B, T, H·hd]` and k `[B, S, KV·hd]`.
    q: CpuStorage,
    k: CpuStorage,
    /// Attention probabilities `[B, H, T, S]`.
    probs: CpuStorage,
}

simd_fn! {
    /// Rows of `p` (length `s`; query i sees keys 0..=offset + i) from scores to causal
    /// softmax probabilities, negligible ones flushed to 0.
    fn causal_softmax_rows<T: Real>(p: &mut [T], s: usize, offset: usize) {
        let negligible = T::from_f64(NEGLIGIBLE_PROB);
        for (i, row) in p.chunks_exact_mut(s).enumerate() {
            let (keep, masked) = row.split_at_mut(offset + i + 1);
            softmax_in_place(keep);
            for p in keep.iter_mut() {
                *p = flush(*p, negligible);
            }
            masked.fill(T::ZERO);
        }
    }
}

simd_fn! {
    /// ∂L/∂scores from ∂L/∂p (in `ds`, overwritten) and p, rows of length `s`:
    /// ds = p ⊙ (dp − Σ_j p ⊙ dp) · scale (masked entries have p = 0).
    fn attention_score_grads<T: Real>(ds: &mut [T], p: &[T], s: usize, scale: T) {
        for (dsr, pr) in ds.chunks_exact_mut(s).zip(p.chunks_exact(s)) {
            let c = dot(dsr, pr);
            for (a, &pv) in dsr.iter_mut().zip(pr) {
                *a = flush(pv * (*a - c) * scale, T::MIN_NORMAL);
            }
        }
    }
}

/// (B, T, S, H, KV, hd) of an attention call.
type AttnDims = (usize, usize, usize, usize, usize, usize);

impl Attention {
    fn dims(&self, q: &Shape, k: &Shape) -> CResult<AttnDims> {
        let (b, t, qw) = q.dims3()?;
        let s = k.dims3()?.1;
        Ok((b, t, s, self.heads, self.kv_heads, qw / self.heads))
    }

    /// Rotate `x` `[B, L, n·hd]` whose rows sit at positions `S − L..S`.
    fn rope<T: Real>(&self, x: &[T], d: AttnDims, len: usize, inverse: bool) -> CResult<Vec<T>> {
        let (_, _, s, _, _, hd) = d;
        let (cv, sv) = (CpuView::of(&self.cos)?, CpuView::of(&self.sin)?);
        let row = x.len() / (d.0 * len).max(1);
        Ok(rope_rows(
            x,
            len,
            row,
            hd,
            s - len,
            cv.get()?,
            sv.get()?,
            inverse,
        ))
    }

    fn forward<T: Real>(&self, q: &[T], k: &[T], v: &[T], d: AttnDims) -> (Vec<T>, Vec<T>) {
        let (b, t, s, h, kv, hd) = d;
        let (rep, offset) = (h / kv, s - t);
        let scale = T::from_f64(self.scale);
        let mut out = vec![T::ZERO; b * t * h * hd];
        let mut probs = vec![T::ZERO; b * h * t * s];
        let out_ptr = SendPtr(out.as_mut_ptr());
        if t * s > 0 {
            probs.par_chunks_mut(t * s).enumerate().for_each(|(bh, p)| {
                let (bi, hi) = (bh / h, bh % h);
                let q_off = bi * t * h * hd + hi * hd;
                let kv_off = bi * s * kv * hd + (hi / rep) * hd;
                let qm = View {
                    ptr: q[q_off..].as_ptr(),
                    rs: h * hd,
                    cs: 1,
                };
                let km = View {
                    ptr: k[kv_off..].as_ptr(),
                    rs: kv * hd,
                    cs: 1,
                };
                let vm = View {
                    ptr: v[kv_off..].as_ptr(),
                    rs: kv * hd,
                    cs: 1,
                };
                // Safety: q/k/v views stay inside their slices for these shapes (checked
                // in `causal_attention`); `p` is this task's own chunk and each task writes
                // the disjoint columns of head `hi` in batch `bi` of `out`.
                unsafe {
                    gemm_raw(
                        (t, s, hd),
                        p.as_mut_ptr(),
                        s,
                        false,
                        qm,
                        km.t(),
                        scale,
                        Parallelism::None,
                    );
                }
                causal_softmax_rows(p, s, offset);
                unsafe {
                    gemm_raw(
                        (t, hd, s),
                        out_ptr.at(q_off),
                        h * hd,
                        false,
                        View::rows(p, s),
                        vm,
                        T::ONE,
                        Parallelism::None,
                    );
                }
            });
        }
        (out, probs)
    }

    #[allow(clippy::type_complexity)]
    fn backward<T: Real>(
        &self,
        (q, k, v): (&[T], &[T], &[T]),
        dout: &[T],
        probs: &[T],
        d: AttnDims,
    ) -> (Vec<T>, Vec<T>, Vec<T>) {
        let (b, t, s, h, kv, hd) = d;
        let rep = h / kv;
        let scale = T::from_f64(self.scale);
        let (mut dq, mut dk, mut dv) = (
            vec![T::ZERO; q.len()],
            vec![T::ZERO; k.len()],
            vec![T::ZERO; v.len()],
        );
        if t * s * hd == 0 {
            return (dq, dk, dv);
        }
        let (dq_ptr, dk_ptr, dv_ptr) = (
            SendPtr(dq.as_mut_ptr()),
            SendPtr(dk.as_mut_ptr()),
            SendPtr(dv.as_mut_ptr()),
        );
        // One task per kv head: the query heads that share it accumulate into its dk, dv.
        (0..b * kv).into_par_iter().for_each(|bg| {
            let (bi, g) = (bg / kv, bg % kv);
            let kv_off = bi * s * kv * hd + g * hd;
            let km = View {
                ptr: k[kv_off..].as_ptr(),
                rs: kv * hd,
                cs: 1,
            };
            let vm = View {
                ptr: v[kv_off..].as_ptr(),
                rs: kv * hd,
                cs: 1,
            };
            let mut ds = vec![T::ZERO; t * s];
            for hi in g * rep..(g + 1) * rep {
                let p = &probs[(bi * h + hi) * t * s..][..t * s];
                let q_off = bi * t * h * hd + hi * hd;
                let qm = View {
                    ptr: q[q_off..].as_ptr(),
                    rs: h * hd,
                    cs: 1,
                };
                let dom = View {
                    ptr: dout[q_off..].as_ptr(),
                    rs: h * hd,
                    cs: 1,
                };
                let pm = View::rows(p, s);
                // Safety: views as in the forward pass; this task alone writes the columns of
                // kv head `g` in batch `bi` of dk, dv and those of its query heads in dq.
                unsafe {
                    // dv += pᵀ · dout
                    gemm_raw(
                        (s, hd, t),
                        dv_ptr.at(kv_off),
                        kv * hd,
                        true,
                        pm.t(),
                        dom,
                        T::ONE,
                        Parallelism::None,
                    );
                    // dp = dout · vᵀ
                    gemm_raw(
                        (t, s, hd),
                        ds.as_mut_ptr(),
                        s,
                        false,
                        dom,
                        vm.t(),
                        T::ONE,
                        Parallelism::None,
                    );
                }
                attention_score_grads(&mut ds, p, s, scale);
                let dsm = View::rows(&ds, s);
                unsafe {
                    // dq = ds · k
                    gemm_raw(
                        (t, hd, s),
                        dq_ptr.at(q_off),
                        h * hd,
                        false,
                        dsm,
                        km,
                        T::ONE,
                        Parallelism::None,
                    );
                    // dk += dsᵀ · q
                    gemm_raw(
                        (s, hd, t),
                        dk_ptr.at(kv_off),
                        kv * hd,
                        true,
                        dsm.t(),
                        qm,
                        T::ONE,
                        Parallelism::None,
                    );
                }
            }
        });
        for g in [&mut dq, &mut dk, &mut dv] {
            flush_subnormals(g);
        }
        (dq, dk, dv)
    }
}

impl CustomOp3 for Attention {
    fn name(&self) -> &'static str {
        "causal-attention"
    }

    fn cpu_fwd(
        &self,
        qs: &CpuStorage,
        ql: &Layout,
        ks: &CpuStorage,
        kl: &Layout,
        vs: &CpuStorage,
        vl: &Layout,
    ) -> CResult<(CpuStorage, Shape)> {
        let d = self.dims(ql.shape(), kl.shape())?;
        let (t, s) = (d.1, d.2);
        with_real!(qs.dtype(), self.name(), T => {
            let q = self.rope(input::<T>(qs, ql, self.name())?, d, t, false)?;
            let k = self.rope(input::<T>(ks, kl, self.name())?, d, s, false)?;
            let (out, probs) = self.forward(&q, &k, input::<T>(vs, vl, self.name())?, d);
            if self.keep {
                self.saved.put(AttentionSaved {
                    q: T::into_storage(q),
                    k: T::into_storage(k),
                    probs: T::into_storage(probs),
                });
            }
            Ok((T::into_storage(out), ql.shape().clone()))
        })
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        _out: &Tensor,
        dout: &Tensor,
    ) -> CResult<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let d = self.dims(q.shape(), k.shape())?;
        let (t, s) = (d.1, d.2);
        let dout = dout.contiguous()?;
        let (vv, dv) = (CpuView::of(v)?, CpuView::of(&dout)?);
        let guard = self.saved.lock();
        let saved = required(&guard, self.name())?;
        with_real!(q.dtype(), self.name(), T => {
            let (gq, gk, gv) = self.backward(
                (saved_slice(&saved.q), saved_slice(&saved.k), vv.get::<T>()?),
                dv.get::<T>()?,
                saved_slice(&saved.probs),
                d,
            );
            // Gradients w.r.t. the rotated q, k → w.r.t. q, k: the inverse rotation.
            let gq = if q.track_op() { self.rope(&gq, d, t, true)? } else { gq };
            let gk = if k.track_op() { self.rope(&gk, d, s, true)? } else { gk };
            let grad = |g: Vec<T>, like: &Tensor| -> CResult<Option<Tensor>> {
                like.track_op().then(|| tensor(g, like.shape().clone())).transpose()
            };
            Ok((grad(gq, q)?, grad(gk, k)?, grad(gv, v)?))
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Gated FFN activation

/// act(g) ⊙ u for the gate and up projections of the FFN (ReLU² for BitNet b1.58, SiLU for
/// Llama-style models).
pub fn gated_activation(g: &Tensor, u: &Tensor, act: Activation) -> Result<Tensor> {
    if !fast(&[g, u]) || g.dims() != u.dims() {
        return composable::gated_activation(g, u, act);
    }
    Ok(g.contiguous()?.apply_op2(&u.contiguous()?, Gated { act })?)
}

struct Gated {
    act: Activation,
}

/// SiLU: g·σ(g) and σ(g)·(1 + g·(1 − σ(g))).
#[inline(always)]
fn silu_and_grad<T: Real>(g: T) -> (T, T) {
    let sig = T::ONE / (T::ONE + (-g).exp());
    (g * sig, sig * (T::ONE + g * (T::ONE - sig)))
}

/// ReLU²: max(g, 0)² and 2·max(g, 0).
#[inline(always)]
fn relu2_and_grad<T: Real>(g: T) -> (T, T) {
    let r = g.max(T::ZERO);
    (r * r, r + r)
}

simd_fn! {
    /// y = act(g) ⊙ u over one chunk.
    fn gated_chunk<T: Real>(act: Activation, g: &[T], u: &[T], y: &mut [T]) {
        match act {
            Activation::Silu => {
                for ((y, &g), &u) in y.iter_mut().zip(g).zip(u) {
                    *y = silu_and_grad(g).0 * u;
                }
            }
            Activation::Relu2 => {
                for ((y, &g), &u) in y.iter_mut().zip(g).zip(u) {
                    *y = relu2_and_grad(g).0 * u;
                }
            }
        }
    }
}

simd_fn! {
    /// dg = dy ⊙ u ⊙ act'(g) and du = dy ⊙ act(g) over one chunk.
    fn gated_chunk_bwd<T: Real>(
        act: Activation,
        g: &[T],
        u: &[T],
        dy: &[T],
        dg: &mut [T],
        du: &mut [T],
    ) {
        let rows = dg.iter_mut().zip(du.iter_mut()).zip(g).zip(u).zip(dy);
        match act {
            Activation::Silu => {
                for ((((dg, du), &g), &u), &dy) in rows {
                    let (a, da) = silu_and_grad(g);
                    *dg = dy * u * da;
                    *du = dy * a;
                }
            }
            Activation::Relu2 => {
                for ((((dg, du), &g), &u), &dy) in rows {
                    let (a, da) = relu2_and_grad(g);
                    *dg = dy * u * da;
                    *du = dy * a;
                }
            }
        }
    }
}

impl Gated {
    fn forward<T: Real>(&self, g: &[T], u: &[T]) -> Vec<T> {
        let mut y = vec![T::ZERO; g.len()];
        y.par_chunks_mut(TASK_ELEMS)
            .zip(g.par_chunks(TASK_ELEMS).zip(u.par_chunks(TASK_ELEMS)))
            .for_each(|(y, (g, u))| gated_chunk(self.act, g, u, y));
        y
    }

    fn backward<T: Real>(&self, g: &[T], u: &[T], dy: &[T]) -> (Vec<T>, Vec<T>) {
        let (mut dg, mut du) = (vec![T::ZERO; g.len()], vec![T::ZERO; g.len()]);
        dg.par_chunks_mut(TASK_ELEMS)
            .zip(du.par_chunks_mut(TASK_ELEMS))
            .zip(g.par_chunks(TASK_ELEMS).zip(u.par_chunks(TASK_ELEMS)))
            .zip(dy.par_chunks(TASK_ELEMS))
            .for_each(|(((dg, du), (g, u)), dy)| gated_chunk_bwd(self.act, g, u, dy, dg, du));
        (dg, du)
    }
}

impl CustomOp2 for Gated {
    fn name(&self) -> &'static str {
        "gated-activation"
    }

    fn cpu_fwd(
        &self,
        gs: &CpuStorage,
        gl: &Layout,
        us: &CpuStorage,
        ul: &Layout,
    ) -> CResult<(CpuStorage, Shape)> {
        with_real!(gs.dtype(), self.name(), T => {
            let (g, u) = (input::<T>(gs, gl, self.name())?, input::<T>(us, ul, self.name())?);
            let y = self.forward(g, u);
            Ok((T::into_storage(y), gl.shape().clone()))
        })
    }

    fn bwd(
        &self,
        g: &Tensor,
        u: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> CResult<(Option<Tensor>, Option<Tensor>)> {
        let dy = dy.contiguous()?;
        let (gv, uv, dyv) = (CpuView::of(g)?, CpuView::of(u)?, CpuView::of(&dy)?);
        with_real!(g.dtype(), self.name(), T => {
            let (gs, us, dys) = (gv.get::<T>()?, uv.get::<T>()?, dyv.get::<T>()?);
            let (dg, du) = self.backward(gs, us, dys);
            let dg = g.track_op().then(|| tensor(dg, g.shape().clone())).transpose()?;
            let du = u.track_op().then(|| tensor(du, u.shape().clone())).transpose()?;
            Ok((dg, du))
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Activation fake-quantization

/// Per-token int8 fake-quantization of activations `[.., in]` with the straight-through
/// estimator: the value is x_q/s ([`crate::engine::ternary::quantize_activations`]), the gradient the
/// identity (BitNet training, DESIGN.md §2).
pub fn fake_quant_ste(x: &Tensor) -> Result<Tensor> {
    if !fast(&[x]) {
        return composable::fake_quant_ste(x);
    }

    Ok(x.contiguous()?.apply_op1(FakeQuant)?)
}

struct FakeQuant;

impl CustomOp1 for FakeQuant {
    fn name(&self) -> &'static str {
        "fake-quant-ste"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> CResult<(CpuStorage, Shape)> {
        let (_, cols) = rows_cols(l.shape())?;
        let deq = |x: &[f32]| -> Vec<f32> {
            let (q, scales) = crate::engine::ternary::quantize_activations(x, cols);
            q.chunks(cols.max(1))
                .zip(&scales)
                .flat_map(|(row, &s)| row.iter().map(move |&v| v as f32 / s))
                .collect()
        };
        let out = match s {
            CpuStorage::F32(_) => CpuStorage::F32(deq(input::<f32>(s, l, self.name())?)),
            CpuStorage::F64(_) => {
                let x: Vec<f32> = input::<f64>(s, l, self.name())?
                    .iter()
                    .map(|&v| v as f32)
                    .collect();
                CpuStorage::F64(deq(&x).into_iter().map(f64::from).collect())
            }
            other => bail!("{}: unsupported dtype {:?}", self.name(), other.dtype()),
        };
        Ok((out, l.shape().clone()))
    }

    fn bwd(&self, _x: &Tensor, _y: &Tensor, dy: &Tensor) -> CResult<Option<Tensor>> {
        Ok(Some(dy.clone()))
    }
}

// ---------------------------------------------------------------------------------------------
// Composable references

/// The same functions from candle's composable ops: the fallback for dtypes and devices the
/// fused kernels do not cover, and the reference the tests compare them with.
pub mod composable {
    use super::*;
    use crate::engine::ternary::quantize_activations;

    /// `x` `[.., in]` times `wt` `[in, out]` as one 2-D matmul (cheaper than a broadcast
    /// matmul, forward and backward).
    pub fn matmul_2d(x: &Tensor, wt: &Tensor) -> Result<Tensor> {
        let cols = x.dim(D::Minus1)?;
        let y = x.reshape(((), cols))?.matmul(wt)?;
        Ok(y.reshape(with_last(x.shape(), wt.dim(1)?))?)
    }

    /// ((x·V) ⊙ s)·Uᵀ.
    pub fn svf_linear(x: &Tensor, v: &Tensor, s: &Tensor, u_t: &Tensor) -> Result<Tensor> {
        let h = matmul_2d(x, v)?.broadcast_mul(s)?;
        matmul_2d(&h, u_t)
    }

    /// x · rsqrt(mean(x²) + ε) · w.
    pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
        let ms = x.sqr()?.mean_keepdim(D::Minus1)?;
        let x = x.broadcast_div(&(ms + eps)?.sqrt()?)?;
        Ok(x.broadcast_mul(weight)?)
    }

    /// Softmax over the last dim (the max is a constant shift, detached).
    pub fn softmax(x: &Tensor) -> Result<Tensor> {
        let m = x.max_keepdim(D::Minus1)?.detach();
        let e = x.broadcast_sub(&m)?.exp()?;
        Ok(e.broadcast_div(&e.sum_keepdim(D::Minus1)?)?)
    }

    /// Log-softmax over the last dim.
    pub fn log_softmax(x: &Tensor) -> Result<Tensor> {
        let m = x.max_keepdim(D::Minus1)?.detach();
        let shifted = x.broadcast_sub(&m)?;
        let lse = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?;
        Ok(shifted.broadcast_sub(&lse)?)
    }

    /// log_softmax(logits) gathered at the targets.
    pub fn target_log_probs(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
        let v = logits.dim(D::Minus1)?;
        let lp = log_softmax(&logits.reshape(((), v))?)?;
        Ok(lp.gather(&targets.unsqueeze(1)?, 1)?.squeeze(1)?)
    }

    /// Rotate-half RoPE of `x` `[B, T, heads, hd]`.
    pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor, offset: usize) -> Result<Tensor> {
        let (_, t, _, hd) = x.dims4()?;
        let cos = cos.narrow(0, offset, t)?.unsqueeze(1)?; // [T, 1, hd]
        let sin = sin.narrow(0, offset, t)?.unsqueeze(1)?;
        let x1 = x.narrow(D::Minus1, 0, hd / 2)?;
        let x2 = x.narrow(D::Minus1, hd / 2, hd / 2)?;
        let rot = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
        Ok((x.broadcast_mul(&cos)? + rot.broadcast_mul(&sin)?)?)
    }

    /// Additive mask `[T, S]`: 0 where key j ≤ query position S − T + i, −∞ after.
    fn causal_mask(t: usize, s: usize, like: &Tensor) -> Result<Tensor> {
        let offset = s - t;
        let m: Vec<f32> = (0..t)
            .flat_map(|i| {
                (0..s).map(move |j| {
                    if j > offset + i {
                        f32::NEG_INFINITY
                    } else {
                        0.0
                    }
                })
            })
            .collect();
        Ok(Tensor::from_vec(m, (t, s), like.device())?.to_dtype(like.dtype())?)
    }

    /// Causal grouped-query attention with RoPE, q `[B, T, H·hd]`, k, v `[B, S, KV·hd]`.
    pub fn causal_attention(
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        heads: usize,
        kv_heads: usize,
        cos: &Tensor,
        sin: &Tensor,
    ) -> Result<Tensor> {
        let (b, t, qw) = q.dims3()?;
        let s = k.dim(1)?;
        let hd = qw / heads;
        // [B, L, n·hd] → [B, n, L, hd]
        let split = |y: &Tensor, n: usize| -> Result<Tensor> {
            let l = y.dim(1)?;
            Ok(y.reshape((b, l, n, hd))?.transpose(1, 2)?.contiguous()?)
        };
        let rope_heads = |y: &Tensor, n: usize, offset: usize| -> Result<Tensor> {
            let l = y.dim(1)?;
            split(
                &rope(&y.reshape((b, l, n, hd))?, cos, sin, offset)?.reshape((b, l, n * hd))?,
                n,
            )
        };
        let q = rope_heads(q, heads, s - t)?; // [B, H, T, hd]
        let (k, v) = (rope_heads(k, kv_heads, 0)?, split(v, kv_heads)?); // [B, KV, S, hd]
        let rep = heads / kv_heads;
        let repeat = |y: &Tensor| -> Result<Tensor> {
            if rep == 1 {
                return Ok(y.clone());
            }
            let (b, n, s, hd) = y.dims4()?;
            Ok(y.unsqueeze(2)?
                .expand((b, n, rep, s, hd))?
                .reshape((b, n * rep, s, hd))?)
        };
        let (k, v) = (repeat(&k)?, repeat(&v)?);
        let mut scores = (q.matmul(&k.t()?.contiguous()?)? * (1.0 / (hd as f64).sqrt()))?;
        if t > 1 {
            scores = scores.broadcast_add(&causal_mask(t, s, &scores)?)?;
        }
        let att = softmax(&scores)?.matmul(&v.contiguous()?)?; // [B, H, T, hd]
        Ok(att.transpose(1, 2)?.reshape((b, t, heads * hd))?)
    }

    /// act(g) ⊙ u.
    pub fn gated_activation(g: &Tensor, u: &Tensor, act: Activation) -> Result<Tensor> {
        let a = match act {
            Activation::Relu2 => g.relu()?.sqr()?,
            Activation::Silu => g.silu()?,
        };
        Ok((a * u)?)
    }

    /// x + (q(x) − x) with the bracket detached: value q(x), gradient 1.
    pub fn fake_quant_ste(x: &Tensor) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        let cols = *dims.last().expect("activations have a feature dim");
        let flat: Vec<f32> = x.detach().to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
        let (q, s) = quantize_activations(&flat, cols);
        let deq: Vec<f32> = q
            .chunks(cols)
            .zip(&s)
            .flat_map(|(row, &s)| row.iter().map(move |&v| v as f32 / s))
            .collect();
        let deq = Tensor::from_vec(deq, dims, x.device())?.to_dtype(x.dtype())?;
        Ok((x + (deq - x.detach())?)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};
    use rand::{rngs::StdRng, Rng, SeedableRng};

    /// f64 values uniform in [−1, 1).
    fn uniform(dims: &[usize], seed: u64) -> Tensor {
        let mut rng = StdRng::seed_from_u64(seed);
        let n = dims.iter().product::<usize>();
        let v: Vec<f64> = (0..n).map(|_| rng.gen_range(-1.0..1.0)).collect();
        Tensor::from_vec(v, dims, &Device::Cpu).unwrap()
    }

    fn values(t: &Tensor) -> Vec<f64> {
        t.to_dtype(DType::F64)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    }

    /// Largest |a − b| after checking the shapes agree.
    fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
        assert_eq!(a.dims(), b.dims());
        values(a)
            .iter()
            .zip(values(b))
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f64::max)
    }

    /// The fused op equals its composable reference: f64 to 1e-12, f32 to `tol32`.
    fn same_forward(
        inputs: &[Tensor],
        fused: &dyn Fn(&[Tensor]) -> Result<Tensor>,
        reference: &dyn Fn(&[Tensor]) -> Result<Tensor>,
        tol32: f64,
    ) {
        let d = max_diff(&fused(inputs).unwrap(), &reference(inputs).unwrap());
        assert!(d < 1e-12, "f64: max |Δ| {d:e}");
        let f32s: Vec<Tensor> = inputs
            .iter()
            .map(|t| t.to_dtype(DType::F32).unwrap())
            .collect();
        let y = fused(&f32s).unwrap();
        assert_eq!(y.dtype(), DType::F32);
        let d = max_diff(&y, &reference(inputs).unwrap());
        assert!(d < tol32, "f32: max |Δ| {d:e}");
    }

    /// Autograd gradients of L = Σ f(inputs) ⊙ R (R fixed and random) against central
    /// differences, for the inputs marked in `vary`; the others stay constants and must get no
    /// gradient computed.
    fn check_gradients(inputs: &[Tensor], vary: &[bool], f: &dyn Fn(&[Tensor]) -> Result<Tensor>) {
        let vars: Vec<Option<Var>> = inputs
            .iter()
            .zip(vary)
            .map(|(t, &v)| v.then(|| Var::from_tensor(t).unwrap()))
            .collect();
        let args: Vec<Tensor> = inputs
            .iter()
            .zip(&vars)
            .map(|(t, v)| v.as_ref().map_or(t.clone(), |v| v.as_tensor().clone()))
            .collect();
        let y = f(&args).unwrap();
        let r = uniform(y.dims(), 99);
        let loss = |a: &[Tensor]| -> f64 {
            (f(a).unwrap() * &r)
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f64>()
                .unwrap()
        };
        let grads = (y * &r).unwrap().sum_all().unwrap().backward().unwrap();
        let eps = 1e-6;
        for (i, var) in vars.iter().enumerate() {
            let Some(var) = var else {
                assert!(grads.get(&args[i]).is_none(), "input {i} is a constant");
                continue;
            };
            let g = values(grads.get(var.as_tensor()).expect("a gradient"));
            let x0 = values(&inputs[i]);
            for j in 0..x0.len() {
                let at = |d: f64| {
                    let mut x = x0.clone();
                    x[j] += d;
                    let mut a = inputs.to_vec();
                    a[i] = Tensor::from_vec(x, inputs[i].dims(), &Device::Cpu).unwrap();
                    loss(&a)
                };
                let fd = (at(eps) - at(-eps)) / (2.0 * eps);
                let tol = 1e-7 + 1e-6 * fd.abs().max(g[j].abs());
                assert!(
                    (fd - g[j]).abs() < tol,
                    "input {i}[{j}]: finite difference {fd:e}, autograd {:e}",
                    g[j]
                );
            }
        }
    }

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

    #[test]
    fn matmul_const_matches_and_differentiates() {
        for (x, w) in [(vec![3, 5], vec![5, 7]), (vec![2, 7, 13], vec![13, 4])] {
            let inputs = [uniform(&x, 1), uniform(&w, 2)];
            same_forward(
                &inputs,
                &|a| matmul_const(&a[0], &a[1]),
                &|a| composable::matmul_2d(&a[0], &a[1]),
                1e-5,
            );
            check_gradients(&inputs, &[true, false], &|a| matmul_const(&a[0], &a[1]));
            // A weight that is a variable takes the ordinary path and gets its gradient.
            check_gradients(&inputs, &[true, true], &|a| matmul_const(&a[0], &a[1]));
        }
    }

    #[test]
    fn svf_linear_matches_and_differentiates() {
        // (x dims, r, out): ragged shapes, r below and above the input width.
        for (x, r, out) in [
            (vec![3, 5], 4, 6),
            (vec![7, 13], 13, 9),
            (vec![2, 3, 5], 5, 5),
        ] {
            let k = *x.last().unwrap();
            let inputs = [
                uniform(&x, 3),
                uniform(&[k, r], 4),
                uniform(&[r], 5),
                uniform(&[r, out], 6),
            ];
            let fused = |a: &[Tensor]| svf_linear(&a[0], &a[1], &a[2], &a[3]);
            same_forward(
                &inputs,
                &fused,
                &|a| composable::svf_linear(&a[0], &a[1], &a[2], &a[3]),
                1e-5,
            );
            for vary in [
                [true, false, true, false],
                [false, false, true, false],
                [true, false, false, false],
            ] {
                check_gradients(&inputs, &vary, &fused);
            }
        }
    }

    #[test]
    fn rms_norm_matches_and_differentiates() {
        for x in [vec![3, 5], vec![7, 13], vec![2, 3, 17]] {
            let d = *x.last().unwrap();
            let inputs = [uniform(&x, 7), uniform(&[d], 8)];
            let fused = |a: &[Tensor]| rms_norm(&a[0], &a[1], 1e-5);
            same_forward(
                &inputs,
                &fused,
                &|a| composable::rms_norm(&a[0], &a[1], 1e-5),
                1e-5,
            );
            for vary in [[true, true], [true, false], [false, true]] {
                check_gradients(&inputs, &vary, &fused);
            }
        }
    }

    #[test]
    fn softmax_and_log_softmax_match_and_differentiate() {
        for x in [vec![3, 5], vec![7, 13], vec![2, 3, 40]] {
            let inputs = [(uniform(&x, 9) * 4.0).unwrap()];
            same_forward(
                &inputs,
                &|a| softmax(&a[0]),
                &|a| composable::softmax(&a[0]),
                1e-6,
            );
            same_forward(
                &inputs,
                &|a| log_softmax(&a[0]),
                &|a| composable::log_softmax(&a[0]),
                1e-5,
            );
            check_gradients(&inputs, &[true], &|a| softmax(&a[0]));
            check_gradients(&inputs, &[true], &|a| log_softmax(&a[0]));
        }
        // A vocabulary-sized row in f32 (the vectorized exp) and large logits (the max shift).
        let x = (uniform(&[3, 32000], 10) * 30.0).unwrap();
        same_forward(
            &[x],
            &|a| log_softmax(&a[0]),
            &|a| composable::log_softmax(&a[0]),
            2e-5,
        );
    }

    #[test]
    fn target_log_probs_match_and_differentiate() {
        for (x, ids) in [
            (vec![3, 5], vec![0u32, 4, 2]),
            (vec![7, 13], vec![12, 0, 5, 5, 1, 7, 3]),
            (vec![2, 2, 17], vec![16, 3, 9, 0]),
        ] {
            let targets = Tensor::new(ids.as_slice(), &Device::Cpu).unwrap();
            let inputs = [(uniform(&x, 21) * 5.0).unwrap()];
            let fused = |a: &[Tensor]| target_log_probs(&a[0], &targets);
            same_forward(
                &inputs,
                &fused,
                &|a| composable::target_log_probs(&a[0], &targets),
                1e-5,
            );
            check_gradients(&inputs, &[true], &fused);
        }
        let bad = Tensor::new(&[5u32], &Device::Cpu).unwrap();
        let msg = target_log_probs(&uniform(&[1, 5], 22), &bad)
            .unwrap_err()
            .to_string();
        assert!(msg.contains("outside the vocabulary"), "{msg}");
    }

    #[test]
    fn causal_attention_matches_and_differentiates() {
        // (B, T, S, H, KV, hd): plain, grouped-query, a KV cache (S > T), one query token.
        for (b, t, s, h, kv, hd) in [
            (1, 3, 3, 2, 2, 4),
            (2, 4, 4, 4, 2, 6),
            (1, 3, 5, 2, 1, 4),
            (2, 1, 4, 2, 2, 2),
        ] {
            // RoPE tables longer than S: only positions 0..S are read.
            let (cos, sin) = (uniform(&[s + 2, hd], 11), uniform(&[s + 2, hd], 12));
            let inputs = [
                uniform(&[b, t, h * hd], 14),
                uniform(&[b, s, kv * hd], 15),
                uniform(&[b, s, kv * hd], 16),
                cos,
                sin,
            ];
            let fused = |a: &[Tensor]| causal_attention(&a[0], &a[1], &a[2], h, kv, &a[3], &a[4]);
            same_forward(
                &inputs,
                &fused,
                &|a| composable::causal_attention(&a[0], &a[1], &a[2], h, kv, &a[3], &a[4]),
                1e-6,
            );
            check_gradients(&inputs, &[true, true, true, false, false], &fused);
            check_gradients(&inputs, &[false, true, false, false, false], &fused);
        }
    }

    #[test]
    fn rope_rotates_pairs_of_features() {
        // Pair (i, i + hd/2) rotated by θ: cos = cos θ and sin = sin θ at every position.
        let (theta, hd) = (0.3f64, 4);
        let cos = vec![theta.cos(); 2 * hd];
        let sin = vec![theta.sin(); 2 * hd];
        let x = [1.0, 2.0, 3.0, 4.0];
        let y = rope_rows(&x, 1, hd, hd, 1, &cos, &sin, false);
        let (c, s) = (theta.cos(), theta.sin());
        let want = [
            c - 3.0 * s,
            2.0 * c - 4.0 * s,
            3.0 * c + s,
            4.0 * c + 2.0 * s,
        ];
        for (a, b) in y.iter().zip(want) {
            assert!((a - b).abs() < 1e-15);
        }
        // The inverse rotation undoes it.
        let back = rope_rows(&y, 1, hd, hd, 1, &cos, &sin, true);
        for (a, b) in back.iter().zip(x) {
            assert!((a - b).abs() < 1e-15);
        }
    }

    #[test]
    fn gated_activation_matches_and_differentiates() {
        for act in [Activation::Silu, Activation::Relu2] {
            for x in [vec![3, 5], vec![7, 13]] {
                let inputs = [(uniform(&x, 17) * 3.0).unwrap(), uniform(&x, 18)];
                let fused = |a: &[Tensor]| gated_activation(&a[0], &a[1], act);
                same_forward(
                    &inputs,
                    &fused,
                    &|a| composable::gated_activation(&a[0], &a[1], act),
                    1e-5,
                );
                for vary in [[true, true], [true, false], [false, true]] {
                    check_gradients(&inputs, &vary, &fused);
                }
            }
        }
    }

    #[test]
    fn fake_quant_matches_and_passes_gradients_straight_through() {
        let x = uniform(&[7, 13], 19);
        same_forward(
            std::slice::from_ref(&x),
            &|a| fake_quant_ste(&a[0]),
            &|a| composable::fake_quant_ste(&a[0]),
            1e-6,
        );
        let v = Var::from_tensor(&x).unwrap();
        let r = uniform(&[7, 13], 20);
        let g = (fake_quant_ste(v.as_tensor()).unwrap() * &r)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        assert_eq!(max_diff(g.get(v.as_tensor()).unwrap(), &r), 0.0);
    }
}
