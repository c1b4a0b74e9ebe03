//! Ternary (BitNet b1.58) weights: absmean quantization, 2-bit packing in our native layout and
//! in Hugging Face's layout, dequantization, and the exact packed 2-bit × int8 matrix product
//! used by the model's ternary mode.
//!
//! Arithmetic (docs/DESIGN.md §2): γ = mean|W| (clamped ≥ 1e-5), W_t = clamp(round(W/γ), −1, 1),
//! W ≈ γ·W_t. Activations are quantized per token with s = 127 / max|x|,
//! x_q = clamp(round(x·s), −128, 127), and a linear layer outputs (x_q · W_tᵀ) · γ / s.
//! Rounding is half-to-even, as `torch.round` does, so our codes match PyTorch-made ones.

pub mod ggml;
pub mod i2s;
mod kernels;
mod pack;
pub mod requant;

pub use kernels::Kernel;
pub use pack::{hf_to_native, native_row_bytes, pack_hf, pack_native, unpack_hf, unpack_native};

use crate::engine::checkpoint::st::SharedBytes;
use pack::decode_table;
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

/// Per-token int8 activation quantization of a row-major `[tokens, cols]` buffer.
/// Returns the int8 codes and the scale s of each token (x ≈ x_q / s).
pub fn quantize_activations(x: &[f32], cols: usize) -> (Vec<i8>, Vec<f32>) {
    use rayon::prelude::*;
    let mut q = vec![0i8; x.len()];
    let c = cols.max(1);
    let scales = (x.par_chunks(c).zip(q.par_chunks_mut(c)))
        .map(|(row, qrow)| quantize_row(row, qrow))
        .collect();
    (q, scales)
}

/// One token's codes into `out`; returns its scale. With AVX-512 or AVX2 the rounding is a
/// vector instruction instead of a libm call per element (the same values: round-half-even is
/// exact either way).
fn quantize_row(row: &[f32], out: &mut [i8]) -> f32 {
    #[inline(always)]
    fn body(row: &[f32], out: &mut [i8]) -> f32 {
        let s = 127.0 / row.iter().fold(0f32, |m, v| m.max(v.abs())).max(MIN_SCALE);
        for (v, o) in row.iter().zip(out.iter_mut()) {
            *o = round_even(v * s).clamp(-128.0, 127.0) as i8;
        }
        s
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    unsafe fn avx512(row: &[f32], out: &mut [i8]) -> f32 {
        body(row, out)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    unsafe fn avx2(row: &[f32], out: &mut [i8]) -> f32 {
        body(row, out)
    }

    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        // Safety: the CPU has the features `avx512` is compiled for.
        return unsafe { avx512(row, out) };
    }
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // Safety: the CPU has the features `avx2` is compiled for.
        return unsafe { avx2(row, out) };
    }
    body(row, out)
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
    /// Native packed codes, `[rows, ceil(cols/4)]`, shared by clones (a large matrix in
    /// huge-page memory: see [`SharedBytes::resident`]).
    pub packed: SharedBytes,
    /// γ: one value (per tensor) or one per output row.
    pub scales: Vec<f32>,
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

    /// The matrix `w` (row-major `[rows, cols]`) holds exactly, when every row is ±a_r or 0
    /// for one a_r > 0 per row: one scale when all rows share it, else one per row (a row of
    /// zeros takes the first row's). `None` for any other matrix — this recovers a ternary
    /// matrix written in a float type; it does not ternarize.
    pub fn from_exact(w: &[f32], rows: usize, cols: usize) -> Option<Self> {
        if w.len() != rows * cols || cols == 0 {
            return None;
        }
        let mut values = vec![0i8; w.len()];
        let mut scales = vec![0f32; rows];
        for ((row, v), a) in w.chunks(cols).zip(values.chunks_mut(cols)).zip(&mut scales) {
            *a = row.iter().fold(0f32, |m, x| m.max(x.abs()));
            for (x, v) in row.iter().zip(v) {
                *v = match *x {
                    0.0 => 0,
                    x if x == *a => 1,
                    x if x == -*a => -1,
                    _ => return None,
                };
            }
        }
        let first = scales.iter().copied().find(|&a| a > 0.0)?;
        if !first.is_finite() {
            return None;
        }
        scales
            .iter_mut()
            .filter(|a| **a == 0.0)
            .for_each(|a| *a = first);
        if scales.iter().all(|&a| a == first) {
            scales = vec![first];
        }
        Some(Self::from_values(&values, rows, cols, scales))
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

    /// Rows `r0..r0 + out.len() / cols` of W = γ·W_t decoded into `out` (row-major f32): a
    /// block of the dense matrix without the whole of it.
    pub fn rows_into(&self, r0: usize, out: &mut [f32]) {
        let t = decode_table();
        let rb = native_row_bytes(self.cols);
        for (i, row) in out.chunks_exact_mut(self.cols.max(1)).enumerate() {
            let r = r0 + i;
            let g = self.scale(r);
            let codes = self.packed[r * rb..(r + 1) * rb].iter();
            let values = codes.flat_map(|&b| t[b as usize]);
            for (o, v) in row.iter_mut().zip(values) {
                *o = v as f32 * g;
            }
        }
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

    /// BitLinear forward in ternary mode: quantize `x` `[tokens, cols]` per token, integer
    /// product, rescale by γ/s. Without activation quantization the f32 activations multiply
    /// the ternary values directly.
    pub fn forward(&self, x: &[f32], tokens: usize, act_quant: bool) -> Vec<f32> {
        use rayon::prelude::*;
        if act_quant {
            let (xq, s) = quantize_activations(x, self.cols);
            let acc = self.matmul_i8(&xq, tokens);
            let rows = self.rows.max(1);
            let mut y = vec![0f32; acc.len()];
            (y.par_chunks_mut(rows).zip(acc.par_chunks(rows)).zip(&s))
                .with_min_len((1 << 14) / rows + 1)
                .for_each(|((y, acc), &s)| {
                    for (r, (y, &a)) in y.iter_mut().zip(acc).enumerate() {
                        *y = a as f32 * (self.scale(r) / s);
                    }
                });
            y
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

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A matrix that is ±a or 0 per row is recovered exactly (one scale when the rows share
    /// it); anything else is not ternary.
    #[test]
    fn exact_ternary_is_recovered_and_nothing_else() {
        let w = [0.5, -0.5, 0.0, 0.5, 0.0, 0.0, 0.0, 0.0, -0.5, 0.5, 0.5, 0.0];
        let m = TernaryMatrix::from_exact(&w, 3, 4).unwrap();
        assert_eq!(m.scales, vec![0.5]);
        assert_eq!(m.dequantize(), w);
        let w = [0.5, -0.5, 0.0, 0.25, -0.25, 0.25];
        let m = TernaryMatrix::from_exact(&w, 2, 3).unwrap();
        assert_eq!(m.scales, vec![0.5, 0.25]);
        assert_eq!(m.dequantize(), w);
        assert!(TernaryMatrix::from_exact(&[0.5, 0.25, 0.0], 1, 3).is_none());
        assert!(TernaryMatrix::from_exact(&[0.0; 4], 2, 2).is_none());
        assert!(TernaryMatrix::from_exact(&[f32::INFINITY, 0.0], 1, 2).is_none());
    }

    pub(super) fn ternary_vec(n: usize) -> impl Strategy<Value = Vec<i8>> {
        proptest::collection::vec(-1i8..=1, n)
    }

    /// The exact product by the definition: unpacked values, triple loop, i32 sums.
    pub(super) fn reference_matmul(values: &[i8], rows: usize, cols: usize, xq: &[i8]) -> Vec<i32> {
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
    fn activation_quant_rounds_half_to_even() {
        // max|x| = 127 → s = 1: 2.5 → 2, 3.5 → 4, −0.5 → 0 (torch.round semantics)
        let (q, s) = quantize_activations(&[2.5, 3.5, -0.5, 127.0], 4);
        assert_eq!(s, vec![1.0]);
        assert_eq!(q, vec![2, 4, 0, 127]);
    }
}
