//! Ternary (BitNet b1.58) weights: absmean quantization, 2-bit packing in our native layout and
//! in Hugging Face's layout, dequantization, and the exact packed 2-bit × int8 matrix product
//! used by the model's ternary mode.
//!
//! Arithmetic (DESIGN.md §2): γ = mean|W| (clamped ≥ 1e-5), W_t = clamp(round(W/γ), −1, 1),
//! W ≈ γ·W_t. Activations are quantized per token with s = 127 / max|x|,
//! x_q = clamp(round(x·s), −128, 127), and a linear layer outputs (x_q · W_tᵀ) · γ / s.
//! Rounding is half-to-even, as `torch.round` does, so our codes match PyTorch-made ones.

pub mod requant;

use rayon::prelude::*;
use serde::{Deserialize, Serialize};

/// Smallest scale allowed by BitNet's absmean and absmax formulas.
pub const MIN_SCALE: f32 = 1e-5;

/// How many weights share one scale.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "granularity", rename_all = "snake_case")]
pub enum Quantization {
    /// One γ per matrix, zero where |W/γ| rounds to 0 (BitNet b1.58).
    PerTensor,
    /// One γ per output row, zero where |W| < τ·γ_row (the origin pipeline's Phase 4).
    PerChannel {
        /// The zero threshold τ, as a fraction of the row's mean |W|.
        threshold: f32,
    },
}

impl Quantization {
    /// Human-readable name.
    pub fn name(&self) -> String {
        match self {
            Quantization::PerTensor => "per-tensor absmean".into(),
            Quantization::PerChannel { threshold } => {
                format!("per-channel absmean, zero threshold {threshold}")
            }
        }
    }
}

/// Round half to even, like `torch.round`.
#[inline]
pub fn round_even(x: f32) -> f32 {
    x.round_ties_even()
}

/// Per-tensor absmean ternarization of a row-major `rows × cols` matrix.
/// Returns the ternary values and γ.
pub fn ternarize_per_tensor(w: &[f32]) -> (Vec<i8>, f32) {
    let gamma = if w.is_empty() {
        MIN_SCALE
    } else {
        ((w.iter().map(|x| x.abs() as f64).sum::<f64>() / w.len() as f64) as f32).max(MIN_SCALE)
    };
    let q = w
        .iter()
        .map(|&x| round_even(x / gamma).clamp(-1.0, 1.0) as i8)
        .collect();
    (q, gamma)
}

/// Per-output-channel ternarization with a zero threshold: γ_o = mean|W[o,:]|,
/// W_t = sign(W) where |W| ≥ τ·γ_o, else 0. With τ = 0.5 each row matches the per-tensor rule.
pub fn ternarize_per_channel(w: &[f32], rows: usize, cols: usize, tau: f32) -> (Vec<i8>, Vec<f32>) {
    assert_eq!(
        w.len(),
        rows * cols,
        "matrix buffer does not match its shape"
    );
    let mut q = vec![0i8; w.len()];
    let mut scales = Vec::with_capacity(rows);
    for (row, qrow) in w.chunks(cols.max(1)).zip(q.chunks_mut(cols.max(1))) {
        let gamma = ((row.iter().map(|x| x.abs() as f64).sum::<f64>() / cols.max(1) as f64) as f32)
            .max(MIN_SCALE);
        for (x, out) in row.iter().zip(qrow.iter_mut()) {
            *out = if x.abs() >= tau * gamma {
                x.signum() as i8
            } else {
                0
            };
        }
        scales.push(gamma);
    }
    (q, scales)
}

/// Bytes per row in the native packed layout.
pub fn native_row_bytes(cols: usize) -> usize {
    cols.div_ceil(4)
}

/// Pack ternary values (row-major `rows × cols`) into the native layout: row-major
/// `[rows, ceil(cols/4)]` bytes, weight `4j+k` of a row in bits `2k..2k+1` of byte `j`, code =
/// value + 1. Rows stay contiguous so the matrix-vector kernel streams one row at a time.
pub fn pack_native(values: &[i8], rows: usize, cols: usize) -> Vec<u8> {
    assert_eq!(
        values.len(),
        rows * cols,
        "matrix buffer does not match its shape"
    );
    let rb = native_row_bytes(cols);
    let mut out = vec![0u8; rows * rb];
    for r in 0..rows {
        for c in 0..cols {
            let code = (values[r * cols + c] + 1) as u8;
            out[r * rb + c / 4] |= code << (2 * (c % 4));
        }
    }
    // Padding weights beyond `cols` are encoded as 0 (code 1) so that code 3 never appears.
    for r in 0..rows {
        for c in cols..rb * 4 {
            out[r * rb + c / 4] |= 1 << (2 * (c % 4));
        }
    }
    out
}

/// Position of the first invalid code (3) in a packed buffer, as (byte index, bit position).
fn find_code3(packed: &[u8]) -> Option<(usize, usize)> {
    packed
        .iter()
        .enumerate()
        .find_map(|(i, &b)| (0..4).find(|k| (b >> (2 * k)) & 3 == 3).map(|k| (i, 2 * k)))
}

/// Unpack the native layout. Errors with a description if a code 3 occurs.
pub fn unpack_native(
    packed: &[u8],
    rows: usize,
    cols: usize,
) -> std::result::Result<Vec<i8>, String> {
    let rb = native_row_bytes(cols);
    if packed.len() != rows * rb {
        return Err(format!(
            "packed buffer has {} bytes, expected {} for a {rows}×{cols} matrix",
            packed.len(),
            rows * rb
        ));
    }
    if let Some((i, bit)) = find_code3(packed) {
        return Err(format!(
            "invalid ternary code 3 in byte {i} (row {}, bits {bit}..{})",
            i / rb.max(1),
            bit + 1
        ));
    }
    let mut out = Vec::with_capacity(rows * cols);
    for r in 0..rows {
        for c in 0..cols {
            out.push(((packed[r * rb + c / 4] >> (2 * (c % 4))) & 3) as i8 - 1);
        }
    }
    Ok(out)
}

/// Pack ternary values into Hugging Face's BitNet layout: uint8 `[rows/4, cols]`, where bits
/// `2i..2i+1` of packed row `p` hold output row `i·(rows/4) + p` (four concatenated blocks).
pub fn pack_hf(values: &[i8], rows: usize, cols: usize) -> Vec<u8> {
    assert_eq!(
        values.len(),
        rows * cols,
        "matrix buffer does not match its shape"
    );
    assert_eq!(rows % 4, 0, "HF packing needs rows divisible by 4");
    let pr = rows / 4;
    let mut out = vec![0u8; pr * cols];
    for i in 0..4 {
        for p in 0..pr {
            let r = i * pr + p;
            for c in 0..cols {
                out[p * cols + c] |= ((values[r * cols + c] + 1) as u8) << (2 * i);
            }
        }
    }
    out
}

/// Unpack Hugging Face's layout (see [`pack_hf`]) into row-major `rows × cols` values.
pub fn unpack_hf(packed: &[u8], rows: usize, cols: usize) -> std::result::Result<Vec<i8>, String> {
    if !rows.is_multiple_of(4) {
        return Err(format!("{rows} output rows is not a multiple of 4"));
    }
    let pr = rows / 4;
    if packed.len() != pr * cols {
        return Err(format!(
            "packed buffer has {} bytes, expected {} for a {rows}×{cols} matrix",
            packed.len(),
            pr * cols
        ));
    }
    if let Some((i, bit)) = find_code3(packed) {
        return Err(format!(
            "invalid ternary code 3 at packed row {}, column {}, bits {bit}..{} (output row {})",
            i / cols.max(1),
            i % cols.max(1),
            bit + 1,
            (bit / 2) * pr + i / cols.max(1)
        ));
    }
    let mut out = vec![0i8; rows * cols];
    for p in 0..pr {
        for c in 0..cols {
            let b = packed[p * cols + c];
            for i in 0..4 {
                out[(i * pr + p) * cols + c] = ((b >> (2 * i)) & 3) as i8 - 1;
            }
        }
    }
    Ok(out)
}

/// Per-token int8 activation quantization of a row-major `[tokens, cols]` buffer.
/// Returns the int8 codes and the scale s of each token (x ≈ x_q / s).
pub fn quantize_activations(x: &[f32], cols: usize) -> (Vec<i8>, Vec<f32>) {
    let mut q = vec![0i8; x.len()];
    let mut scales = Vec::with_capacity(x.len() / cols.max(1));
    for (row, qrow) in x.chunks(cols.max(1)).zip(q.chunks_mut(cols.max(1))) {
        let s = 127.0 / row.iter().fold(0f32, |m, v| m.max(v.abs())).max(MIN_SCALE);
        for (v, out) in row.iter().zip(qrow.iter_mut()) {
            *out = round_even(v * s).clamp(-128.0, 127.0) as i8;
        }
        scales.push(s);
    }
    (q, scales)
}

/// Statistics of a ternary matrix, for `bitsvf inspect`.
#[derive(Debug, Clone, Serialize)]
pub struct TernaryStats {
    /// Share of weights equal to 0.
    pub zeros: f64,
    /// Share equal to +1.
    pub plus: f64,
    /// Share equal to −1.
    pub minus: f64,
    /// Smallest scale γ.
    pub scale_min: f32,
    /// Largest scale γ.
    pub scale_max: f32,
}

/// A ternary matrix `rows × cols` (out × in) in the native packed layout with its scales.
#[derive(Debug, Clone)]
pub struct TernaryMatrix {
    /// Output features.
    pub rows: usize,
    /// Input features.
    pub cols: usize,
    /// Native packed codes, `[rows, ceil(cols/4)]`.
    pub packed: Vec<u8>,
    /// γ: one value (per tensor) or one per output row.
    pub scales: Vec<f32>,
}

/// 256-entry table: a packed byte → its four ternary values.
fn decode_table() -> &'static [[i8; 4]; 256] {
    static TABLE: std::sync::OnceLock<[[i8; 4]; 256]> = std::sync::OnceLock::new();
    TABLE.get_or_init(|| {
        let mut t = [[0i8; 4]; 256];
        for (b, row) in t.iter_mut().enumerate() {
            for (k, v) in row.iter_mut().enumerate() {
                *v = ((b >> (2 * k)) & 3) as i8 - 1;
            }
        }
        t
    })
}

impl TernaryMatrix {
    /// Build from row-major ternary values and scales (1 or `rows` of them).
    pub fn from_values(values: &[i8], rows: usize, cols: usize, scales: Vec<f32>) -> Self {
        assert!(
            scales.len() == 1 || scales.len() == rows,
            "scales must be per tensor or per row"
        );
        TernaryMatrix {
            rows,
            cols,
            packed: pack_native(values, rows, cols),
            scales,
        }
    }

    /// Ternarize a float matrix.
    pub fn quantize(w: &[f32], rows: usize, cols: usize, q: Quantization) -> Self {
        match q {
            Quantization::PerTensor => {
                let (v, g) = ternarize_per_tensor(w);
                Self::from_values(&v, rows, cols, vec![g])
            }
            Quantization::PerChannel { threshold } => {
                let (v, g) = ternarize_per_channel(w, rows, cols, threshold);
                Self::from_values(&v, rows, cols, g)
            }
        }
    }

    /// The ternary values, row-major.
    pub fn values(&self) -> Vec<i8> {
        let t = decode_table();
        let rb = native_row_bytes(self.cols);
        let mut out = Vec::with_capacity(self.rows * self.cols);
        for r in 0..self.rows {
            let row = &self.packed[r * rb..(r + 1) * rb];
            out.extend(row.iter().flat_map(|&b| t[b as usize]).take(self.cols));
        }
        out
    }

    /// γ of output row `r`.
    #[inline]
    pub fn scale(&self, r: usize) -> f32 {
        if self.scales.len() == 1 {
            self.scales[0]
        } else {
            self.scales[r]
        }
    }

    /// W = γ·W_t as a row-major f32 buffer.
    pub fn dequantize(&self) -> Vec<f32> {
        let v = self.values();
        v.chunks(self.cols.max(1))
            .enumerate()
            .flat_map(|(r, row)| {
                let g = self.scale(r);
                row.iter().map(move |&x| x as f32 * g)
            })
            .collect()
    }

    /// Share of zeros / ±1 and the scale range.
    pub fn stats(&self) -> TernaryStats {
        let (mut z, mut p, mut m) = (0usize, 0usize, 0usize);
        for v in self.values() {
            match v {
                0 => z += 1,
                1 => p += 1,
                _ => m += 1,
            }
        }
        let n = (self.rows * self.cols).max(1) as f64;
        TernaryStats {
            zeros: z as f64 / n,
            plus: p as f64 / n,
            minus: m as f64 / n,
            scale_min: self.scales.iter().cloned().fold(f32::INFINITY, f32::min),
            scale_max: self
                .scales
                .iter()
                .cloned()
                .fold(f32::NEG_INFINITY, f32::max),
        }
    }

    /// Exact integer product of int8 activations `[tokens, cols]` with W_tᵀ, giving
    /// `[tokens, rows]` i32 sums, with the fastest [`Kernel`] this CPU runs.
    pub fn matmul_i8(&self, xq: &[i8], tokens: usize) -> Vec<i32> {
        self.matmul_i8_with(Kernel::detect(), xq, tokens)
    }

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
            for t0 in (0..tokens).step_by(TOKEN_GROUP) {
                for (i, row) in codes.chunks_exact(row_bytes).enumerate() {
                    let (body, tail) = row.split_at(body_bytes);
                    // Σ w·x = Σ code·x − Σ x over the blocks, plus the ragged tail.
                    let mut put = |t: usize, code_dot: i32| {
                        let x_tail = &xq[t * cols + tail_col..(t + 1) * cols];
                        outs[t][i] = code_dot - x.sums[t] + tail_dot(tail, x_tail);
                    };
                    if tokens - t0 >= TOKEN_GROUP {
                        // SAFETY: `K::available()` was asserted above.
                        let dots = unsafe {
                            K::dot::<TOKEN_GROUP>(body, std::array::from_fn(|u| x.token(t0 + u)))
                        };
                        for (u, d) in dots.into_iter().enumerate() {
                            put(t0 + u, d);
                        }
                    } else {
                        for t in t0..tokens {
                            // SAFETY: `K::available()` was asserted above.
                            let [d] = unsafe { K::dot::<1>(body, [x.token(t)]) };
                            put(t, d);
                        }
                    }
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

    /// BitLinear forward in ternary mode: quantize `x` `[tokens, cols]` per token, integer
    /// product, rescale by γ/s. Without activation quantization the f32 activations multiply
    /// the ternary values directly.
    pub fn forward(&self, x: &[f32], tokens: usize, act_quant: bool) -> Vec<f32> {
        if act_quant {
            let (xq, s) = quantize_activations(x, self.cols);
            let acc = self.matmul_i8(&xq, tokens);
            acc.chunks(self.rows.max(1))
                .zip(&s)
                .flat_map(|(row, &s)| {
                    row.iter()
                        .enumerate()
                        .map(move |(r, &a)| a as f32 * (self.scale(r) / s))
                })
                .collect()
        } else {
            let w = self.dequantize();
            let mut out = vec![0f32; tokens * self.rows];
            for tok in 0..tokens {
                let xr = &x[tok * self.cols..(tok + 1) * self.cols];
                for r in 0..self.rows {
                    let wr = &w[r * self.cols..(r + 1) * self.cols];
                    out[tok * self.rows + r] = xr.iter().zip(wr).map(|(a, b)| a * b).sum();
                }
            }
            out
        }
    }

    /// Bytes of the packed codes plus f32 scales.
    pub fn packed_bytes(&self) -> usize {
        self.packed.len() + 4 * self.scales.len()
    }
}

// ---------------------------------------------------------------------------------------------
// Packed 2-bit × int8 kernels.
//
// With code = w + 1 ∈ {0, 1, 2}, Σ w·x = Σ code·x − Σ x, so the kernels multiply the raw
// codes (unsigned bytes after a shift and `& 3`) with the int8 activations and subtract each
// token's Σ x once: no per-weight sign handling. The activations are rearranged once per
// product ([`BlockedActivations`]) so that the inner loops only stream.

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
        BlockedActivations { blocks, x, sums }
    }

    /// Token `t`'s blocks.
    fn token(&self, t: usize) -> &[i8] {
        let n = self.x.len() / self.sums.len();
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
}

/// See [`Avx2Dot`].
///
/// # Safety
/// The CPU must have AVX2; `codes.len()` must be a multiple of 32 and every `xs[t]` hold
/// `4 · codes.len()` bytes.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn dot_avx2<const T: usize>(codes: &[u8], xs: [&[i8]; T]) -> [i32; T] {
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
            // SAFETY: block b lies in `codes` (b < codes.len() / 32).
            let p = unsafe { _mm256_loadu_si256(codes.as_ptr().add(32 * b).cast()) };
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
    acc.map(|v| {
        let s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256::<1>(v));
        let s = _mm_add_epi32(s, _mm_shuffle_epi32::<0b01_00_11_10>(s));
        let s = _mm_add_epi32(s, _mm_shuffle_epi32::<0b10_11_00_01>(s));
        _mm_cvtsi128_si32(s)
    })
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
    use super::*;
    use proptest::prelude::*;

    fn ternary_vec(n: usize) -> impl Strategy<Value = Vec<i8>> {
        proptest::collection::vec(-1i8..=1, n)
    }

    /// The exact product by the definition: unpacked values, triple loop, i32 sums.
    fn reference_matmul(values: &[i8], rows: usize, cols: usize, xq: &[i8]) -> Vec<i32> {
        let tokens = xq.len() / cols;
        let mut out = vec![0i32; tokens * rows];
        for t in 0..tokens {
            for r in 0..rows {
                for c in 0..cols {
                    out[t * rows + r] += values[r * cols + c] as i32 * xq[t * cols + c] as i32;
                }
            }
        }
        out
    }

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

    #[test]
    fn forward_applies_per_row_scales() {
        use rand::{rngs::StdRng, Rng, SeedableRng};
        let mut rng = StdRng::seed_from_u64(8);
        let (rows, cols, tokens) = (7, 300, 5);
        let v: Vec<i8> = (0..rows * cols).map(|_| rng.gen_range(-1..=1)).collect();
        let scales: Vec<f32> = (0..rows).map(|r| 0.25 * (r + 1) as f32).collect();
        let x: Vec<f32> = (0..tokens * cols)
            .map(|_| rng.gen_range(-3.0..3.0))
            .collect();
        let m = TernaryMatrix::from_values(&v, rows, cols, scales.clone());
        let (xq, s) = quantize_activations(&x, cols);
        let acc = reference_matmul(&v, rows, cols, &xq);
        let y = m.forward(&x, tokens, true);
        for t in 0..tokens {
            for r in 0..rows {
                let exact = acc[t * rows + r] as f64 * scales[r] as f64 / s[t] as f64;
                let got = y[t * rows + r] as f64;
                assert!(
                    (got - exact).abs() <= 1e-6 * (1.0 + exact.abs()),
                    "token {t}, row {r}: {got} vs {exact}"
                );
            }
        }
    }

    proptest! {
        #[test]
        fn native_pack_roundtrip((rows, cols, v) in (1usize..9, 1usize..23)
            .prop_flat_map(|(r, c)| (Just(r), Just(c), ternary_vec(r * c)))) {
            let p = pack_native(&v, rows, cols);
            prop_assert_eq!(unpack_native(&p, rows, cols).unwrap(), v.clone());
            prop_assert_eq!(TernaryMatrix::from_values(&v, rows, cols, vec![1.0]).values(), v);
        }

        #[test]
        fn hf_pack_roundtrip((rows, cols, v) in (1usize..5, 1usize..17)
            .prop_flat_map(|(r, c)| (Just(4 * r), Just(c), ternary_vec(4 * r * c)))) {
            let p = pack_hf(&v, rows, cols);
            prop_assert_eq!(unpack_hf(&p, rows, cols).unwrap(), v);
        }

        #[test]
        fn quantize_dequantize_is_identity((rows, cols, v, g) in (1usize..6, 1usize..20)
            .prop_flat_map(|(r, c)| (Just(r), Just(c), ternary_vec(r * c), 0.01f32..10.0))) {
            // quantize(dequantize(q)) == q: per tensor γ' = γ·share_nonzero ≤ γ, so W/γ' keeps
            // its sign and rounds to ±1 after clamping; zeros stay zero.
            let m = TernaryMatrix::from_values(&v, rows, cols, vec![g]);
            let back = TernaryMatrix::quantize(&m.dequantize(), rows, cols, Quantization::PerTensor);
            prop_assert_eq!(back.values(), v.clone());
            let back = TernaryMatrix::quantize(&m.dequantize(), rows, cols,
                Quantization::PerChannel { threshold: 0.5 });
            prop_assert_eq!(back.values(), v);
        }

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

        #[test]
        fn integer_kernel_matches_dense((rows, cols, tokens, v, x) in (1usize..13, 1usize..37, 1usize..5)
            .prop_flat_map(|(r, c, t)| (Just(r), Just(c), Just(t), ternary_vec(r * c),
                proptest::collection::vec(-3.0f32..3.0, t * c)))) {
            let m = TernaryMatrix::from_values(&v, rows, cols, vec![0.7]);
            let (xq, s) = quantize_activations(&x, cols);
            let y = m.forward(&x, tokens, true);
            for t in 0..tokens {
                for r in 0..rows {
                    let exact: f64 = (0..cols).map(|c| xq[t * cols + c] as f64 / s[t] as f64
                        * v[r * cols + c] as f64 * 0.7).sum();
                    prop_assert!((y[t * rows + r] as f64 - exact).abs() < 1e-4 * (1.0 + exact.abs()));
                }
            }
        }
    }

    #[test]
    fn absmean_hand_computed() {
        // mean|W| = (0.2+0.4+0.9+0.1+0.0+1.2)/6 = 0.4667; W/γ = 0.43,−0.86,1.93,−0.21,0,2.57
        let (q, g) = ternarize_per_tensor(&[0.2, -0.4, 0.9, -0.1, 0.0, 1.2]);
        assert!((g - 2.8 / 6.0).abs() < 1e-6);
        assert_eq!(q, vec![0, -1, 1, 0, 0, 1]);
        // An all-zero matrix uses the clamped γ and stays zero.
        let (q, g) = ternarize_per_tensor(&[0.0; 4]);
        assert_eq!((q, g), (vec![0; 4], MIN_SCALE));
    }

    #[test]
    fn per_channel_threshold_hand_computed() {
        // row 0: γ=0.5, τγ=0.25 → [1,0,-1]; row 1: γ=2, τγ=1 → [0,1,-1] with τ = 0.5
        let w = [1.0, 0.2, -0.3, 0.5, 3.0, -2.5];
        let (q, g) = ternarize_per_channel(&w, 2, 3, 0.5);
        assert_eq!(q, vec![1, 0, -1, 0, 1, -1]);
        assert!((g[0] - 0.5).abs() < 1e-6 && (g[1] - 2.0).abs() < 1e-6);
    }

    #[test]
    fn known_packing_bytes() {
        // native: row [-1,0,1,1] → codes 0,1,2,2 → 0b10_10_01_00
        assert_eq!(pack_native(&[-1, 0, 1, 1], 1, 4), vec![0b1010_0100]);
        // a 5-column row pads with code 1 (value 0)
        assert_eq!(
            pack_native(&[1, 1, 1, 1, -1], 1, 5),
            vec![0xAA, 0b0101_0100]
        );
        // hf: rows 0..4 of one column → bits 2i..2i+1 hold row i
        assert_eq!(pack_hf(&[-1, 0, 1, 0], 4, 1), vec![0b01_10_01_00]);
        assert!(unpack_hf(&[0xFF], 4, 1).unwrap_err().contains("code 3"));
        assert!(unpack_native(&[0b1100_0000], 1, 4)
            .unwrap_err()
            .contains("code 3"));
    }

    #[test]
    fn activation_quant_rounds_half_to_even() {
        // max|x| = 127 → s = 1: 2.5 → 2, 3.5 → 4, −0.5 → 0 (torch.round semantics)
        let (q, s) = quantize_activations(&[2.5, 3.5, -0.5, 127.0], 4);
        assert_eq!(s, vec![1.0]);
        assert_eq!(q, vec![2, 4, 0, 127]);
    }
}
