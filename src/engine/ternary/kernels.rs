//! Packed 2-bit × int8 kernels: the exact integer product of a [`TernaryMatrix`] with int8
//! activations, portable and AVX2 / AVX-512 VNNI.
//!
//! With code = w + 1 ∈ {0, 1, 2}, Σ w·x = Σ code·x − Σ x, so the kernels multiply the raw
//! codes (unsigned bytes after a shift and `& 3`) with the int8 activations and subtract each
//! token's Σ x once: no per-weight sign handling. The activations are rearranged once per
//! product ([`BlockedActivations`]) so that the inner loops only stream.

use super::pack::{decode_table, native_row_bytes};
use super::TernaryMatrix;
use rayon::prelude::*;

/// Output rows per rayon task.
const TASK_ROWS: usize = 16;

/// Tokens computed together against each unpacked block of codes.
const TOKEN_GROUP: usize = 4;

/// Below this many multiply-adds one thread beats splitting the rows across threads.
const PARALLEL_MIN_MACS: usize = 1 << 18;

/// Blocks whose 16-bit partial sums fit in i16 before they are widened to i32. Per block a
/// lane adds at most 4 · 2 products of |code·x| ≤ 2·128 (AVX2 pairs): 2048; 16 blocks reach
/// −32768 at worst (every x = −128, every code 2), which is still i16.
const I16_BLOCKS: usize = 16;

/// Which instructions compute the packed 2-bit × int8 inner products. All give the same exact
/// sums; [`Kernel::detect`] picks the fastest one the CPU runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kernel {
    /// Plain Rust that the compiler vectorizes as wide as the target allows.
    Portable,
    /// x86-64 AVX2: `vpmaddubsw` of codes with activations, 16-bit partial sums.
    Avx2,
    /// x86-64 AVX-512 VNNI: `vpdpbusd` sums four code·activation products straight into i32.
    Avx512Vnni,
}

impl Kernel {
    /// Every kernel, fastest first.
    pub const ALL: [Kernel; 3] = [Kernel::Avx512Vnni, Kernel::Avx2, Kernel::Portable];

    /// The fastest kernel this CPU runs.
    pub fn detect() -> Kernel {
        Kernel::ALL
            .into_iter()
            .find(|k| k.is_available())
            .unwrap_or(Kernel::Portable)
    }

    /// Whether this CPU has the kernel's instructions.
    pub fn is_available(self) -> bool {
        match self {
            Kernel::Portable => PortableDot::available(),
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx2 => Avx2Dot::available(),
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx512Vnni => Avx512VnniDot::available(),
            #[cfg(not(target_arch = "x86_64"))]
            _ => false,
        }
    }
}

impl TernaryMatrix {
    /// [`TernaryMatrix::matmul_i8`] with a chosen kernel; every kernel gives the same exact
    /// sums. Panics if this CPU lacks the kernel's instructions ([`Kernel::is_available`]).
    pub fn matmul_i8_with(&self, kernel: Kernel, xq: &[i8], tokens: usize) -> Vec<i32> {
        assert_eq!(
            xq.len(),
            tokens * self.cols,
            "activation buffer does not match"
        );
        assert!(
            kernel.is_available(),
            "this CPU cannot run the {kernel:?} kernel"
        );
        match kernel {
            Kernel::Portable => self.matmul_blocked::<PortableDot>(xq, tokens),
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx2 => self.matmul_blocked::<Avx2Dot>(xq, tokens),
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx512Vnni => self.matmul_blocked::<Avx512VnniDot>(xq, tokens),
            #[cfg(not(target_arch = "x86_64"))]
            _ => unreachable!("x86 kernels are never available elsewhere"),
        }
    }

    /// The product with block kernel `K`. Rayon tasks take [`TASK_ROWS`] output rows each;
    /// within a task, groups of [`TOKEN_GROUP`] tokens (kept in L1) run against every row, so
    /// each unpacked block of codes is reused from registers for the whole group.
    fn matmul_blocked<K: BlockDot>(&self, xq: &[i8], tokens: usize) -> Vec<i32> {
        assert!(K::available(), "kernel run on a CPU without its features");
        let (rows, cols) = (self.rows, self.cols);
        let mut out = vec![0i32; tokens * rows]; // [tokens, rows]
        if tokens == 0 || rows == 0 || cols == 0 {
            return out;
        }
        let x = BlockedActivations::new(xq, tokens, cols, K::BLOCK_BYTES);
        let row_bytes = native_row_bytes(cols);
        let body_bytes = x.blocks * K::BLOCK_BYTES;
        let tail_col = 4 * body_bytes;
        // Task i writes rows TASK_ROWS·i.. of every token: its slices of `out`, token-major,
        // so results land in [tokens, rows] order with no transposition pass.
        let tasks = rows.div_ceil(TASK_ROWS);
        let mut per_token: Vec<_> = out
            .chunks_mut(rows)
            .map(|o| o.chunks_mut(TASK_ROWS))
            .collect();
        let mut slices: Vec<&mut [i32]> = Vec::with_capacity(tasks * tokens);
        for _ in 0..tasks {
            for chunks in per_token.iter_mut() {
                slices.push(chunks.next().expect("every token has one chunk per task"));
            }
        }
        let work = |(task, outs): (usize, &mut [&mut [i32]])| {
            let r0 = task * TASK_ROWS;
            let codes = &self.packed[r0 * row_bytes..(r0 + outs[0].len()) * row_bytes];
            // Σ w·x = Σ code·x − Σ x over the blocks, plus the ragged tail.
            let finish = |t: usize, i: usize, code_dot: i32| {
                let tail = &codes[i * row_bytes + body_bytes..(i + 1) * row_bytes];
                let tail_sum = match tail.is_empty() {
                    true => 0,
                    false => tail_dot(tail, &xq[t * cols + tail_col..(t + 1) * cols]),
                };
                code_dot - x.sums[t] + tail_sum
            };
            let grouped = tokens / TOKEN_GROUP * TOKEN_GROUP;
            for t0 in (0..grouped).step_by(TOKEN_GROUP) {
                for (i, row) in codes.chunks_exact(row_bytes).enumerate() {
                    // SAFETY: `K::available()` was asserted above.
                    let dots = unsafe {
                        K::dot::<TOKEN_GROUP>(
                            &row[..body_bytes],
                            std::array::from_fn(|u| x.token(t0 + u)),
                        )
                    };
                    for (u, d) in dots.into_iter().enumerate() {
                        outs[t0 + u][i] = finish(t0 + u, i, d);
                    }
                }
            }
            // The tokens after the last whole group (every token when decoding): all the
            // task's rows in one call per token.
            for (t, out) in outs.iter_mut().enumerate().skip(grouped) {
                // SAFETY: `K::available()` was asserted above.
                unsafe { K::dot_rows(codes, row_bytes, x.token(t), out) };
                for (i, o) in out.iter_mut().enumerate() {
                    *o = finish(t, i, *o);
                }
            }
        };
        if rows * cols * tokens >= PARALLEL_MIN_MACS {
            slices.par_chunks_mut(tokens).enumerate().for_each(work);
        } else {
            slices.chunks_mut(tokens).enumerate().for_each(work);
        }
        out
    }
}

/// Int8 activations rearranged into the order the packed codes unpack in. A block of `B`
/// packed bytes holds columns 4j + k (j < B, k < 4); shifting it right by 2k and masking with
/// 3 leaves in byte j the code of column 4j + k. So block b of a token stores, for k = 0..3,
/// the `B` activations x[4(B·b + j) + k], j = 0..B.
struct BlockedActivations {
    /// Whole blocks per row; the columns after them are the ragged tail.
    blocks: usize,
    /// `[tokens, blocks, 4, B]`.
    x: Vec<i8>,
    /// Σ of each token's blocked activations, `[tokens]`.
    sums: Vec<i32>,
    /// Bytes of `x` per token.
    per_token: usize,
}

impl BlockedActivations {
    /// Rearrange `xq` `[tokens, cols]` into blocks of `block_bytes` packed bytes.
    fn new(xq: &[i8], tokens: usize, cols: usize, block_bytes: usize) -> Self {
        let block_cols = 4 * block_bytes;
        let blocks = cols / block_cols;
        let per_token = blocks * block_cols;
        let mut x = vec![0i8; tokens * per_token];
        let mut sums = Vec::with_capacity(tokens);
        for t in 0..tokens {
            let src = &xq[t * cols..t * cols + per_token];
            let dst = &mut x[t * per_token..(t + 1) * per_token];
            for (s, d) in src
                .chunks_exact(block_cols)
                .zip(dst.chunks_exact_mut(block_cols))
            {
                for (k, dk) in d.chunks_exact_mut(block_bytes).enumerate() {
                    for (j, v) in dk.iter_mut().enumerate() {
                        *v = s[4 * j + k];
                    }
                }
            }
            sums.push(src.iter().map(|&v| v as i32).sum());
        }
        BlockedActivations {
            blocks,
            x,
            sums,
            per_token,
        }
    }

    /// Token `t`'s blocks.
    fn token(&self, t: usize) -> &[i8] {
        let n = self.per_token;
        &self.x[t * n..(t + 1) * n]
    }
}

/// Σ w·x over a row's ragged tail (under one block of columns) through the decode table.
fn tail_dot(codes: &[u8], x: &[i8]) -> i32 {
    let table = decode_table();
    codes
        .iter()
        .flat_map(|&b| table[b as usize])
        .zip(x)
        .map(|(w, &v)| w as i32 * v as i32)
        .sum()
}

/// Σ code·x over the whole blocks of one packed row for `T` tokens at once, each unpacked
/// block of codes reused for all `T`.
trait BlockDot {
    /// Packed bytes per block (4× as many columns).
    const BLOCK_BYTES: usize;

    /// Whether this CPU has the instructions `dot` is compiled for.
    fn available() -> bool;

    /// `codes`: whole blocks of one packed row; `xs[t]`: token t's [`BlockedActivations`]
    /// (4 bytes per code byte). Panics if the lengths disagree.
    ///
    /// # Safety
    /// The CPU must have the kernel's instructions: [`BlockDot::available`] returned true.
    unsafe fn dot<const T: usize>(codes: &[u8], xs: [&[i8]; T]) -> [i32; T];

    /// Σ code·x of consecutive packed rows against one token's blocked activations `x`, one
    /// sum per row into `out`: `codes` holds `out.len()` rows of `row_bytes` bytes each, whose
    /// first `x.len() / 4` bytes are the whole blocks (the ragged tail is the caller's).
    ///
    /// # Safety
    /// As for [`BlockDot::dot`].
    unsafe fn dot_rows(codes: &[u8], row_bytes: usize, x: &[i8], out: &mut [i32]) {
        let body = x.len() / 4;
        for (o, row) in out.iter_mut().zip(codes.chunks_exact(row_bytes)) {
            // SAFETY: passed on from the caller.
            *o = unsafe { Self::dot::<1>(&row[..body], [x]) }[0];
        }
    }
}

/// Plain Rust, in the same order as the SIMD kernels: 32 lanes of i16 partial sums.
struct PortableDot;

impl BlockDot for PortableDot {
    const BLOCK_BYTES: usize = 32;

    fn available() -> bool {
        true
    }

    unsafe fn dot<const T: usize>(codes: &[u8], xs: [&[i8]; T]) -> [i32; T] {
        const B: usize = PortableDot::BLOCK_BYTES;
        assert!(codes.len().is_multiple_of(B) && xs.iter().all(|x| x.len() == 4 * codes.len()));
        let mut acc = [0i32; T];
        for (g, group) in codes.chunks(B * I16_BLOCKS).enumerate() {
            // One product |code·x| ≤ 256 per lane and k: 1024 per block, within i16 for
            // I16_BLOCKS blocks.
            let mut lanes = [[0i16; B]; T];
            for (b, block) in group.chunks_exact(B).enumerate() {
                let block: &[u8; B] = block.try_into().expect("chunks_exact");
                let at = 4 * B * (g * I16_BLOCKS + b);
                for (lane, x) in lanes.iter_mut().zip(&xs) {
                    for k in 0..4 {
                        let xk: &[i8; B] = x[at + k * B..at + (k + 1) * B]
                            .try_into()
                            .expect("B activations");
                        for j in 0..B {
                            lane[j] += ((block[j] >> (2 * k)) & 3) as i16 * xk[j] as i16;
                        }
                    }
                }
            }
            for (a, lane) in acc.iter_mut().zip(&lanes) {
                *a += lane.iter().map(|&v| v as i32).sum::<i32>();
            }
        }
        acc
    }
}

/// AVX2: per 32 packed bytes, three shifts and four `& 3` give four vectors of codes, each
/// `vpmaddubsw`-ed (u8 × i8, adjacent pairs summed to i16) with 32 activations.
#[cfg(target_arch = "x86_64")]
struct Avx2Dot;

#[cfg(target_arch = "x86_64")]
impl BlockDot for Avx2Dot {
    const BLOCK_BYTES: usize = 32;

    fn available() -> bool {
        is_x86_feature_detected!("avx2")
    }

    unsafe fn dot<const T: usize>(codes: &[u8], xs: [&[i8]; T]) -> [i32; T] {
        assert!(
            codes.len().is_multiple_of(Self::BLOCK_BYTES)
                && xs.iter().all(|x| x.len() == 4 * codes.len())
        );
        // SAFETY: the caller guarantees AVX2; the lengths were checked above.
        unsafe { dot_avx2(codes, xs) }
    }

    unsafe fn dot_rows(codes: &[u8], row_bytes: usize, x: &[i8], out: &mut [i32]) {
        assert!(
            x.len().is_multiple_of(4 * Self::BLOCK_BYTES)
                && x.len() / 4 <= row_bytes
                && codes.len() == out.len() * row_bytes
        );
        // SAFETY: the caller guarantees AVX2; the lengths were checked above.
        unsafe { dot_rows_avx2(codes, row_bytes, x, out) }
    }
}

/// See [`Avx2Dot`].
///
/// # Safety
/// The CPU must have AVX2; `codes.len()` must be a multiple of 32 and every `xs[t]` hold
/// `4 · codes.len()` bytes.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn dot_avx2<const T: usize>(codes: &[u8], xs: [&[i8]; T]) -> [i32; T] {
    // SAFETY: passed on from the caller.
    horizontal_sums_avx2(unsafe { code_sums_avx2(codes, xs, false) })
}

/// [`dot_avx2`]'s sums before the horizontal add: eight i32 lanes per token. With `prefetch`,
/// the codes [`PREFETCH_AHEAD`] bytes on are requested as each block is read.
///
/// # Safety
/// As for [`dot_avx2`].
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
#[inline]
unsafe fn code_sums_avx2<const T: usize>(
    codes: &[u8],
    xs: [&[i8]; T],
    prefetch: bool,
) -> [std::arch::x86_64::__m256i; T] {
    use std::arch::x86_64::*;
    let blocks = codes.len() / 32;
    let mask = _mm256_set1_epi8(3);
    let ones = _mm256_set1_epi16(1);
    let mut acc = [_mm256_setzero_si256(); T];
    let mut b0 = 0;
    while b0 < blocks {
        let b1 = (b0 + I16_BLOCKS).min(blocks);
        let mut acc16 = [_mm256_setzero_si256(); T];
        for b in b0..b1 {
            let at = codes.as_ptr().wrapping_add(32 * b);
            if prefetch {
                // A prefetch never faults, whatever the address.
                _mm_prefetch::<_MM_HINT_T0>(at.wrapping_add(PREFETCH_AHEAD).cast());
            }
            // SAFETY: block b lies in `codes` (b < codes.len() / 32).
            let p = unsafe { _mm256_loadu_si256(at.cast()) };
            let c0 = _mm256_and_si256(p, mask);
            let c1 = _mm256_and_si256(_mm256_srli_epi16::<2>(p), mask);
            let c2 = _mm256_and_si256(_mm256_srli_epi16::<4>(p), mask);
            let c3 = _mm256_and_si256(_mm256_srli_epi16::<6>(p), mask);
            for (a, x) in acc16.iter_mut().zip(&xs) {
                // SAFETY: x holds 128 bytes per block of `codes`.
                let [x0, x1, x2, x3] = std::array::from_fn(|k| unsafe {
                    _mm256_loadu_si256(x.as_ptr().add(128 * b + 32 * k).cast())
                });
                // |code·x| ≤ 256, so neither the pair sums nor this tree saturate i16.
                let s01 =
                    _mm256_add_epi16(_mm256_maddubs_epi16(c0, x0), _mm256_maddubs_epi16(c1, x1));
                let s23 =
                    _mm256_add_epi16(_mm256_maddubs_epi16(c2, x2), _mm256_maddubs_epi16(c3, x3));
                *a = _mm256_add_epi16(*a, _mm256_add_epi16(s01, s23));
            }
        }
        for (a, s) in acc.iter_mut().zip(acc16) {
            *a = _mm256_add_epi32(*a, _mm256_madd_epi16(s, ones));
        }
        b0 = b1;
    }
    acc
}

/// The sum of each vector's eight i32 lanes.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn horizontal_sums_avx2<const N: usize>(acc: [std::arch::x86_64::__m256i; N]) -> [i32; N] {
    use std::arch::x86_64::*;
    if N == 4 {
        // Four horizontal sums at once: two rounds of pairwise adds leave, in each 128-bit
        // half, one partial sum per vector; adding the halves finishes them.
        let a01 = _mm256_hadd_epi32(acc[0], acc[1]);
        let a23 = _mm256_hadd_epi32(acc[2], acc[3]);
        let a = _mm256_hadd_epi32(a01, a23);
        let s = _mm_add_epi32(_mm256_castsi256_si128(a), _mm256_extracti128_si256::<1>(a));
        let mut out = [0i32; N];
        // SAFETY: `out` holds N = 4 i32, the 16 bytes stored.
        unsafe { _mm_storeu_si128(out.as_mut_ptr().cast(), s) };
        return out;
    }
    acc.map(|v| {
        let s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256::<1>(v));
        let s = _mm_add_epi32(s, _mm_shuffle_epi32::<0b01_00_11_10>(s));
        let s = _mm_add_epi32(s, _mm_shuffle_epi32::<0b10_11_00_01>(s));
        _mm_cvtsi128_si32(s)
    })
}

/// Bytes ahead of the block being read that [`dot_rows_avx2`] asks the cache to fetch: a
/// one-token product reads each code once, so the hardware prefetcher alone lets the core
/// wait on memory.
const PREFETCH_AHEAD: usize = 2048;

/// See [`Avx2Dot::dot_rows`]: [`dot_avx2`]'s sums of every row in turn, prefetching ahead,
/// the rows' lanes reduced four at a time.
///
/// # Safety
/// The CPU must have AVX2; `x.len()` must be a multiple of 128, at most `4 · row_bytes`, and
/// `codes` hold `out.len()` rows of `row_bytes` bytes.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn dot_rows_avx2(codes: &[u8], row_bytes: usize, x: &[i8], out: &mut [i32]) {
    use std::arch::x86_64::*;
    let body = x.len() / 4;
    // SAFETY: each row's first `body` bytes are whole blocks for x (checked by the caller).
    let row_sum = |row: &[u8]| unsafe { code_sums_avx2(&row[..body], [x], true) }[0];
    let mut rows = codes.chunks_exact(row_bytes);
    let mut outs = out.chunks_exact_mut(4);
    for o in outs.by_ref() {
        let acc: [__m256i; 4] = std::array::from_fn(|_| row_sum(rows.next().expect("4 rows")));
        o.copy_from_slice(&horizontal_sums_avx2(acc));
    }
    for (o, row) in outs.into_remainder().iter_mut().zip(rows) {
        *o = horizontal_sums_avx2([row_sum(row)])[0];
    }
}

/// AVX-512 VNNI: per 64 packed bytes, four vectors of codes, each `vpdpbusd`-ed (u8 × i8,
/// four products summed into i32 lanes) with 64 activations.
#[cfg(target_arch = "x86_64")]
struct Avx512VnniDot;

#[cfg(target_arch = "x86_64")]
impl BlockDot for Avx512VnniDot {
    const BLOCK_BYTES: usize = 64;

    fn available() -> bool {
        is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512bw")
            && is_x86_feature_detected!("avx512vnni")
    }

    unsafe fn dot<const T: usize>(codes: &[u8], xs: [&[i8]; T]) -> [i32; T] {
        assert!(
            codes.len().is_multiple_of(Self::BLOCK_BYTES)
                && xs.iter().all(|x| x.len() == 4 * codes.len())
        );
        // SAFETY: the caller guarantees AVX-512 F/BW/VNNI; the lengths were checked above.
        unsafe { dot_avx512_vnni(codes, xs) }
    }
}

/// See [`Avx512VnniDot`].
///
/// # Safety
/// The CPU must have AVX-512 F, BW and VNNI; `codes.len()` must be a multiple of 64 and every
/// `xs[t]` hold `4 · codes.len()` bytes.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
unsafe fn dot_avx512_vnni<const T: usize>(codes: &[u8], xs: [&[i8]; T]) -> [i32; T] {
    use std::arch::x86_64::*;
    let mask = _mm512_set1_epi8(3);
    // One accumulator per token and k: four independent `vpdpbusd` chains hide its latency.
    let mut acc = [[_mm512_setzero_si512(); 4]; T];
    for b in 0..codes.len() / 64 {
        // SAFETY: block b lies in `codes` (b < codes.len() / 64).
        let p = unsafe { _mm512_loadu_si512(codes.as_ptr().add(64 * b).cast()) };
        let c = [
            _mm512_and_si512(p, mask),
            _mm512_and_si512(_mm512_srli_epi16::<2>(p), mask),
            _mm512_and_si512(_mm512_srli_epi16::<4>(p), mask),
            _mm512_and_si512(_mm512_srli_epi16::<6>(p), mask),
        ];
        for (a, x) in acc.iter_mut().zip(&xs) {
            for k in 0..4 {
                // SAFETY: x holds 256 bytes per block of `codes`.
                let xk = unsafe { _mm512_loadu_si512(x.as_ptr().add(256 * b + 64 * k).cast()) };
                a[k] = _mm512_dpbusd_epi32(a[k], c[k], xk);
            }
        }
    }
    acc.map(|[a0, a1, a2, a3]| {
        _mm512_reduce_add_epi32(_mm512_add_epi32(
            _mm512_add_epi32(a0, a1),
            _mm512_add_epi32(a2, a3),
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::super::tests::{reference_matmul, ternary_vec};
    use super::*;
    use proptest::prelude::*;

    fn available_kernels() -> Vec<Kernel> {
        Kernel::ALL
            .into_iter()
            .filter(|k| k.is_available())
            .collect()
    }

    /// Every kernel on this CPU, and the dispatching `matmul_i8`, equal the reference bit for
    /// bit.
    fn assert_kernels_exact(values: &[i8], rows: usize, cols: usize, xq: &[i8], what: &str) {
        let m = TernaryMatrix::from_values(values, rows, cols, vec![1.0]);
        let tokens = xq.len() / cols;
        let expected = reference_matmul(values, rows, cols, xq);
        for k in available_kernels() {
            assert_eq!(
                m.matmul_i8_with(k, xq, tokens),
                expected,
                "{k:?}, {rows}×{cols}, {tokens} tokens, {what}"
            );
        }
        assert_eq!(m.matmul_i8(xq, tokens), expected, "dispatch, {what}");
    }

    #[test]
    fn kernels_match_reference_on_ragged_shapes() {
        use rand::{rngs::StdRng, Rng, SeedableRng};
        let mut rng = StdRng::seed_from_u64(6);
        // Ragged columns around the 128- and 256-column blocks, rows around the 16-row tasks,
        // tokens around the 4-token groups.
        for cols in [1, 3, 5, 127, 128, 129, 255, 256, 300, 513] {
            for rows in [1, 7, 33] {
                for tokens in [1, 2, 5, 17] {
                    let v: Vec<i8> = (0..rows * cols).map(|_| rng.gen_range(-1..=1)).collect();
                    let x: Vec<i8> = (0..tokens * cols).map(|_| rng.gen()).collect();
                    assert_kernels_exact(&v, rows, cols, &x, "random");
                }
            }
        }
    }

    #[test]
    fn kernels_exact_at_extreme_activations() {
        use rand::{rngs::StdRng, Rng, SeedableRng};
        let mut rng = StdRng::seed_from_u64(7);
        // 4101 columns: more than two runs of 16-bit partial sums (16 blocks of 128) plus a
        // tail; 33 rows × 17 tokens also takes the multi-threaded path.
        let (rows, cols, tokens) = (33, 4101, 17);
        let random: Vec<i8> = (0..rows * cols).map(|_| rng.gen_range(-1..=1)).collect();
        for (weights, v) in [
            ("all +1", vec![1i8; rows * cols]),
            ("all -1", vec![-1i8; rows * cols]),
            ("random", random),
        ] {
            for x in [-128i8, 127] {
                let xq = vec![x; tokens * cols];
                assert_kernels_exact(&v, rows, cols, &xq, &format!("{weights}, x = {x}"));
            }
        }
        // Hand-checked corner: every product at its most negative, −128 · 4101.
        let m = TernaryMatrix::from_values(&vec![1i8; cols], 1, cols, vec![1.0]);
        assert_eq!(m.matmul_i8(&vec![-128i8; cols], 1), vec![-128 * 4101]);
    }

    #[test]
    fn kernels_handle_empty_products() {
        let m = TernaryMatrix::from_values(&[1, 0, -1], 1, 3, vec![1.0]);
        for k in available_kernels() {
            assert!(m.matmul_i8_with(k, &[], 0).is_empty());
        }
    }

    proptest! {
        #[test]
        fn kernels_match_reference((rows, cols, tokens, v, x) in (1usize..40, 1usize..700, 1usize..9)
            .prop_flat_map(|(r, c, t)| (Just(r), Just(c), Just(t), ternary_vec(r * c),
                proptest::collection::vec(any::<i8>(), t * c)))) {
            let m = TernaryMatrix::from_values(&v, rows, cols, vec![1.0]);
            let expected = reference_matmul(&v, rows, cols, &x);
            for k in available_kernels() {
                prop_assert_eq!(m.matmul_i8_with(k, &x, tokens), expected.clone(), "{:?}", k);
            }
        }
    }
}
