//! x · Wᵀ for a constant W kept row by row in its stored dtype (the output head over the
//! embedding matrix): `matmul_rows`, whose backward pass computes only ∂L/∂x.

use super::kernels::{dot, gemm_raw, matmul, tile_gemm, View};
use super::matmul_const;
use super::storage::{input, rows_cols, shape_error, tensor, with_last, CResult, CpuView};
use crate::engine::checkpoint::{FloatMatrix, StoredDtype};
use crate::error::Result;
use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp1, DType, Layout, Shape, Tensor, D};
use gemm::Parallelism;
use rayon::prelude::*;

/// Rows of a bf16 / f16 matrix converted to f32 at a time by one task of the forward pass:
/// 64 rows of 2560 are 640 KiB, which stay in the core's L2 between conversion and use.
const FORWARD_BLOCK_ROWS: usize = 64;
/// Up to this many rows of x, the forward pass converts w row by row and takes dot products
/// (a matrix–vector product streams w once; a block product would convert it in blocks). A
/// Q8_0 w multiplies these rows quantized to Q8_0 in integers, as llama.cpp decodes: the
/// logits differ from the many-row path's by the rounding of x (`bitsvf inspect --head q8_0`
/// measures it on this path).
const FEW_ROWS: usize = 4;
/// Rows of w per task of that path.
const FEW_ROWS_TASK: usize = 512;
/// Rows converted at a time in the backward pass, whose product is split over all threads.
const BACKWARD_BLOCK_ROWS: usize = 1024;

/// `x` `[.., k]` times the transpose of `w` `[n, k]`: `[.., n]`. An f32 `w` is used in place;
/// a bf16 / f16 / Q8_0 `w` is converted to f32 a block of rows at a time (never as a whole), so the
/// memory read per call is the stored matrix once. The backward pass returns only
/// ∂L/∂x = ∂L/∂y · w. An `x` that is not f32 takes [`matmul_const`] over an f32 copy of `w`.
pub fn matmul_rows(x: &Tensor, w: &FloatMatrix) -> Result<Tensor> {
    let k = x.dim(D::Minus1)?;
    if k != w.cols {
        return Err(shape_error(format!(
            "matmul_rows: x has {k} features, the weight {}",
            w.cols
        )));
    }
    if x.dtype() != DType::F32 || !x.device().is_cpu() {
        let wt = Tensor::from_vec(w.to_f32(), (w.rows, w.cols), x.device())?.to_dtype(x.dtype())?;
        return matmul_const(x, &wt.t()?);
    }
    Ok(x.contiguous()?.apply_op1(MatmulRows { w: w.clone() })?)
}

/// Σ x[i]·w[i] for bf16 bits `w`, with AVX-512 or AVX2 when the CPU has it (the same bits
/// either way: the lanes are explicit).
fn dot_bf16(x: &[f32], w: &[u16]) -> f32 {
    #[inline(always)]
    fn body(x: &[f32], w: &[u16]) -> f32 {
        const L: usize = 32;
        let widen = |b: u16| f32::from_bits((b as u32) << 16);
        let mut acc = [0f32; L];
        let (xc, wc) = (x.chunks_exact(L), w.chunks_exact(L));
        let tail: f32 = (xc.remainder().iter().zip(wc.remainder()))
            .map(|(&a, &b)| a * widen(b))
            .sum();
        for (a, b) in xc.zip(wc) {
            for i in 0..L {
                acc[i] += a[i] * widen(b[i]);
            }
        }
        acc.iter().sum::<f32>() + tail
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    unsafe fn avx512(x: &[f32], w: &[u16]) -> f32 {
        body(x, w)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    unsafe fn avx2(x: &[f32], w: &[u16]) -> f32 {
        body(x, w)
    }

    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        // Safety: the CPU has the features `avx512` is compiled for.
        return unsafe { avx512(x, w) };
    }
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // Safety: the CPU has the features `avx2` is compiled for.
        return unsafe { avx2(x, w) };
    }
    body(x, w)
}

/// Blocks whose scales are widened together (one `vcvtph2ps`) in the Q8_0 dot product.
const SCALE_GROUP: usize = 8;

/// Σ over the Q8_0 blocks of a row (`wq`, scales `wd`) and an x quantized to Q8_0 the same way
/// (`xq`, scales `xd` already f32), as ggml's `vec_dot_q8_0_q8_0`: per block the exact integer
/// dot of the int8 values times both scales, accumulated in 8 f32 lanes (lane i takes the
/// block's products 4i..4i + 3). With AVX2 (+ FMA, F16C) when the CPU has it — the same bits
/// either way: the lanes are explicit and the portable code fuses the same multiply-adds.
fn dot_q8_0(xq: &[i8], xd: &[f32], wq: &[i8], wd: &[half::f16]) -> f32 {
    let (wq, wd) = (&wq[..xq.len()], &wd[..xd.len()]);
    #[cfg(target_arch = "x86_64")]
    if q8_0_avx2_available() {
        // Safety: the CPU has the features; the rows are whole blocks of x's length.
        return unsafe { dot_q8_0_avx2(xq, xd, wq, wd) };
    }
    dot_q8_0_portable(xq, xd, wq, wd)
}

/// Lane i + 4, then i + 2, then 1 added to lane i: the order of the AVX2 reduction.
fn reduce_lanes(a: [f32; 8]) -> f32 {
    let h: [f32; 4] = std::array::from_fn(|i| a[i] + a[i + 4]);
    let q = [h[0] + h[2], h[1] + h[3]];
    q[0] + q[1]
}

/// [`dot_q8_0`] in plain Rust.
fn dot_q8_0_portable(xq: &[i8], xd: &[f32], wq: &[i8], wd: &[half::f16]) -> f32 {
    const B: usize = crate::engine::checkpoint::Q8_0_BLOCK;
    let mut acc = [0f32; 8];
    let blocks = xq.chunks_exact(B).zip(wq.chunks_exact(B));
    for ((xb, wb), (dx, dw)) in blocks.zip(xd.iter().zip(wd)) {
        let s = dx * dw.to_f32();
        for (i, a) in acc.iter_mut().enumerate() {
            let p: i32 = (4 * i..4 * i + 4)
                .map(|j| xb[j] as i32 * wb[j] as i32)
                .sum();
            *a = (p as f32).mul_add(s, *a);
        }
    }
    reduce_lanes(acc)
}

#[cfg(target_arch = "x86_64")]
fn q8_0_avx2_available() -> bool {
    use std::arch::is_x86_feature_detected as has;
    has!("avx2") && has!("fma") && has!("f16c")
}

/// [`dot_q8_0`] with AVX2: per block `vpmaddubsw` of |w| with x·sign(w), `vpmaddwd` to 8 i32
/// lanes, then one multiply-add by the blocks' scale product (widened 8 at a time).
///
/// # Safety
/// The CPU must have AVX2, FMA and F16C ([`q8_0_avx2_available`]); `xq`, `wq` hold 32 values
/// per scale of `xd`, `wd` (equal lengths).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_q8_0_avx2(xq: &[i8], xd: &[f32], wq: &[i8], wd: &[half::f16]) -> f32 {
    use std::arch::x86_64::*;
    const B: usize = crate::engine::checkpoint::Q8_0_BLOCK;
    assert!(wd.len() == xd.len() && xq.len() == B * xd.len() && wq.len() == xq.len());
    let blocks = xd.len();
    let ones = _mm256_set1_epi16(1);
    let mut acc = _mm256_setzero_ps();
    let mut s = [0f32; SCALE_GROUP];
    for g in (0..blocks).step_by(SCALE_GROUP) {
        let n = SCALE_GROUP.min(blocks - g);
        if n == SCALE_GROUP {
            // Safety: blocks g..g + 8 exist in `wd` and `xd`.
            unsafe {
                let w = _mm256_cvtph_ps(_mm_loadu_si128(wd.as_ptr().add(g).cast()));
                let x = _mm256_loadu_ps(xd.as_ptr().add(g));
                _mm256_storeu_ps(s.as_mut_ptr(), _mm256_mul_ps(x, w));
            }
        } else {
            for j in 0..n {
                s[j] = xd[g + j] * wd[g + j].to_f32();
            }
        }
        // The head reads each weight once per token: fetch ahead of the hardware prefetcher
        // (a prefetch never faults, whatever the address).
        _mm_prefetch::<_MM_HINT_T0>(wd.as_ptr().wrapping_add(g + PREFETCH_AHEAD / B).cast());
        for (j, &sj) in s[..n].iter().enumerate() {
            let at = (g + j) * B;
            _mm_prefetch::<_MM_HINT_T0>(wq.as_ptr().wrapping_add(at + PREFETCH_AHEAD).cast());
            // Safety: block g + j lies in both rows.
            let (w, x) = unsafe {
                (
                    _mm256_loadu_si256(wq.as_ptr().add(at).cast()),
                    _mm256_loadu_si256(xq.as_ptr().add(at).cast()),
                )
            };
            // |w|·(x·sign w) pairs: at most 2·127·127, never saturating i16.
            let pairs = _mm256_maddubs_epi16(_mm256_sign_epi8(w, w), _mm256_sign_epi8(x, w));
            let quads = _mm256_cvtepi32_ps(_mm256_madd_epi16(pairs, ones));
            acc = _mm256_fmadd_ps(quads, _mm256_set1_ps(sj), acc);
        }
    }
    let mut lanes = [0f32; 8];
    // Safety: `lanes` holds 8 f32.
    unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), acc) };
    reduce_lanes(lanes)
}

/// Bytes of Q8_0 weights ahead of the block being read that [`dot_q8_0_avx2`] asks the cache
/// to fetch.
#[cfg(target_arch = "x86_64")]
const PREFETCH_AHEAD: usize = 2048;

/// Rows of x quantized to Q8_0 for [`dot_q8_0`] (ggml quantizes a Q8_0 product's activations
/// the same way): int8 values and the f16 block scales widened to f32.
fn quantize_rows_q8_0(x: &[f32], k: usize) -> (Vec<i8>, Vec<f32>) {
    let blocks = k / crate::engine::checkpoint::Q8_0_BLOCK;
    let rows = x.len() / k.max(1);
    let (mut q, mut d) = (vec![0i8; x.len()], vec![half::f16::ZERO; rows * blocks]);
    for ((xr, qr), dr) in (x.chunks_exact(k).zip(q.chunks_exact_mut(k))).zip(d.chunks_mut(blocks)) {
        crate::engine::checkpoint::quantize_q8_0_row(xr, qr, dr);
    }
    (q, d.iter().map(|v| v.to_f32()).collect())
}

struct MatmulRows {
    w: FloatMatrix,
}

impl MatmulRows {
    /// y `[m, n]` = x `[m, k]` · wᵀ.
    fn forward(&self, x: &[f32], m: usize) -> Vec<f32> {
        let (n, k) = (self.w.rows, self.w.cols);
        if let Some(w) = self.w.as_f32() {
            return matmul((m, n, k), x, false, w, true);
        }
        if m <= FEW_ROWS {
            return self.forward_few(x, m);
        }
        let mut y = vec![0f32; m * n];
        let y_ptr = super::kernels::SendPtr(y.as_mut_ptr());
        let blocks = n.div_ceil(FORWARD_BLOCK_ROWS);
        (0..blocks).into_par_iter().for_each_init(
            || vec![0f32; FORWARD_BLOCK_ROWS * k],
            |tmp, b| {
                let j0 = b * FORWARD_BLOCK_ROWS;
                let rows = FORWARD_BLOCK_ROWS.min(n - j0);
                let tmp = &mut tmp[..rows * k];
                self.w.rows_into(j0, tmp);
                // Safety: x is m × k, tmp is rows × k, and this task alone writes columns
                // j0..j0 + rows of y (row stride n).
                unsafe {
                    let (lhs, rhs) = (View::rows(x, k), View::rows(tmp, k).t());
                    tile_gemm((m, rows, k), (y_ptr.at(j0), n), false, (lhs, rhs), 1.0);
                }
            },
        );
        y
    }

    /// [`Self::forward`] for a few rows of x (decoding): each row of w is converted once into
    /// an L1-sized buffer and dotted with every row of x, so w streams from memory once.
    fn forward_few(&self, x: &[f32], m: usize) -> Vec<f32> {
        let (n, k) = (self.w.rows, self.w.cols);
        let bf16 = self.w.half_bits().is_some() && self.w.dtype() == StoredDtype::Bf16;
        let q8 = self.w.q8_0();
        let per_row = k / crate::engine::checkpoint::Q8_0_BLOCK;
        let (xq, xd) = match q8 {
            Some(_) => quantize_rows_q8_0(x, k),
            None => (Vec::new(), Vec::new()),
        };
        let mut yt = vec![0f32; n * m];
        let task = |buf: &mut Vec<f32>, (c, out): (usize, &mut [f32])| {
            if bf16 {
                // Rows still in the file's pages are mapped in at once, not a fault at a time.
                self.w.populate_rows(c * FEW_ROWS_TASK, out.len() / m);
            }
            for (jj, o) in out.chunks_mut(m).enumerate() {
                let j = c * FEW_ROWS_TASK + jj;
                if let Some((qs, scales)) = q8 {
                    // Q8_0 × Q8_0 in integers, as llama.cpp decodes with a Q8_0 head.
                    let (row, s) = (&qs[j * k..(j + 1) * k], &scales[j * per_row..]);
                    for (i, oi) in o.iter_mut().enumerate() {
                        let xs = (&xq[i * k..(i + 1) * k], &xd[i * per_row..(i + 1) * per_row]);
                        *oi = dot_q8_0(xs.0, xs.1, row, s);
                    }
                    continue;
                }
                if bf16 {
                    // bf16 → f32 is a shift: fused into the dot product, no buffer. The row
                    // comes from the huge-page copy once that part of it is made.
                    let row = self.w.half_row(j).expect("a 2-aligned bf16 matrix");
                    for (i, oi) in o.iter_mut().enumerate() {
                        *oi = dot_bf16(&x[i * k..(i + 1) * k], row);
                    }
                    continue;
                }
                self.w.row_into(j, buf);
                for (i, oi) in o.iter_mut().enumerate() {
                    *oi = dot(&x[i * k..(i + 1) * k], buf);
                }
            }
        };
        let chunks = yt.par_chunks_mut(FEW_ROWS_TASK * m).enumerate();
        chunks.for_each_init(|| vec![0f32; k], task);
        let mut y = vec![0f32; m * n];
        for (j, col) in yt.chunks(m).enumerate() {
            for (i, &v) in col.iter().enumerate() {
                y[i * n + j] = v;
            }
        }
        y
    }

    /// dx `[m, k]` = dy `[m, n]` · w.
    fn backward(&self, dy: &[f32], m: usize) -> Vec<f32> {
        let (n, k) = (self.w.rows, self.w.cols);
        if let Some(w) = self.w.as_f32() {
            return matmul((m, k, n), dy, false, w, false);
        }
        let mut dx = vec![0f32; m * k];
        let mut tmp = vec![0f32; BACKWARD_BLOCK_ROWS.min(n) * k];
        let par = Parallelism::Rayon(rayon::current_num_threads());
        for j0 in (0..n).step_by(BACKWARD_BLOCK_ROWS) {
            let rows = BACKWARD_BLOCK_ROWS.min(n - j0);
            let tmp = &mut tmp[..rows * k];
            self.w.rows_into(j0, tmp);
            // Safety: dy[:, j0..j0 + rows] (row stride n) is m × rows, tmp is rows × k, dx is
            // m × k and written by this call alone.
            unsafe {
                let lhs = View::rows(&dy[j0..], n);
                let (dst, acc) = (dx.as_mut_ptr(), j0 > 0);
                gemm_raw((m, k, rows), dst, k, acc, lhs, View::rows(tmp, k), 1.0, par);
            }
        }
        dx
    }
}

impl CustomOp1 for MatmulRows {
    fn name(&self) -> &'static str {
        "matmul-rows"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> CResult<(CpuStorage, Shape)> {
        if s.dtype() != DType::F32 {
            bail!("{}: expected f32, got {:?}", self.name(), s.dtype());
        }
        let (m, _) = rows_cols(l.shape())?;
        let y = self.forward(input::<f32>(s, l, self.name())?, m);
        Ok((CpuStorage::F32(y), with_last(l.shape(), self.w.rows)))
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, dy: &Tensor) -> CResult<Option<Tensor>> {
        let (m, _) = rows_cols(x.shape())?;
        let dy = dy.contiguous()?;
        let dyv = CpuView::of(&dy)?;
        let dx = self.backward(dyv.get::<f32>()?, m);
        Ok(Some(tensor(dx, x.shape().clone())?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::ops::testing::*;

    /// A `rows × cols` matrix in `dtype` (F32, BF16 or F16) and its f32 values.
    fn stored(rows: usize, cols: usize, dtype: safetensors::Dtype) -> (FloatMatrix, Vec<f32>) {
        use crate::engine::checkpoint::st::{write_safetensors, OwnedTensor, TensorFiles};
        let values: Vec<f32> = (0..rows * cols)
            .map(|i| ((i * 7919 % 97) as f32 - 48.0) / 32.0)
            .collect();
        if dtype == safetensors::Dtype::F32 {
            return (FloatMatrix::from_f32(values.clone(), rows, cols), values);
        }
        let bytes: Vec<u8> = match dtype {
            safetensors::Dtype::BF16 => values
                .iter()
                .flat_map(|&v| half::bf16::from_f32(v).to_le_bytes())
                .collect(),
            _ => values
                .iter()
                .flat_map(|&v| half::f16::from_f32(v).to_le_bytes())
                .collect(),
        };
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("w.safetensors");
        let tensors = [(
            "w".to_string(),
            OwnedTensor::raw(dtype, vec![rows, cols], bytes),
        )];
        write_safetensors(&path, &tensors.into_iter().collect(), None).unwrap();
        let tf = TensorFiles::open(&[path]).unwrap();
        let m = FloatMatrix::read(&tf.get("w").unwrap(), rows, cols).unwrap();
        let f = m.to_f32();
        (m, f)
    }

    /// `x` `[.., k]` through Q8_0 and back: what a Q8_0 head's decoding path multiplies.
    fn q8_0_values(x: &Tensor) -> Tensor {
        let k = x.dim(D::Minus1).unwrap();
        let flat: Vec<f32> = x.flatten_all().unwrap().to_vec1().unwrap();
        let (q, d) = quantize_rows_q8_0(&flat, k);
        let v: Vec<f32> = q
            .iter()
            .enumerate()
            .map(|(i, &q)| q as f32 * d[i / 32])
            .collect();
        Tensor::from_vec(v, x.shape(), x.device()).unwrap()
    }

    /// The AVX2 Q8_0 dot product gives the portable one's bits, over whole and partial groups
    /// of scales and the int8 extremes.
    #[test]
    fn q8_0_dot_products_agree_bit_for_bit() {
        use rand::{rngs::StdRng, Rng, SeedableRng};
        #[cfg(target_arch = "x86_64")]
        if !q8_0_avx2_available() {
            return;
        }
        let mut rng = StdRng::seed_from_u64(9);
        for blocks in [1, 8, 11, 80] {
            let n = 32 * blocks;
            for extreme in [false, true] {
                let draw = |rng: &mut StdRng| -> i8 {
                    match extreme {
                        true => [-127, 127][rng.gen_range(0..2)],
                        false => rng.gen_range(-127..=127),
                    }
                };
                let xq: Vec<i8> = (0..n).map(|_| draw(&mut rng)).collect();
                let wq: Vec<i8> = (0..n).map(|_| draw(&mut rng)).collect();
                let xd: Vec<f32> = (0..blocks).map(|_| rng.gen_range(0.0..0.1)).collect();
                let wd: Vec<half::f16> = (0..blocks)
                    .map(|_| half::f16::from_f32(rng.gen_range(0.0..0.1)))
                    .collect();
                let want = dot_q8_0_portable(&xq, &xd, &wq, &wd);
                #[cfg(target_arch = "x86_64")]
                {
                    // Safety: checked above; whole blocks of equal lengths.
                    let got = unsafe { dot_q8_0_avx2(&xq, &xd, &wq, &wd) };
                    assert_eq!(got.to_bits(), want.to_bits(), "{blocks} blocks");
                }
                let exact: f64 = (0..n)
                    .map(|i| xq[i] as f64 * wq[i] as f64 * xd[i / 32] as f64 * wd[i / 32].to_f64())
                    .sum();
                assert!((want as f64 - exact).abs() <= 1e-4 * exact.abs().max(1.0));
            }
        }
    }

    #[test]
    fn matches_the_dense_product_and_differentiates() {
        use safetensors::Dtype;
        // 150 rows: two full forward blocks and a partial one.
        // Q8_0 (blocks of 32, so 64 columns) against the product with its own f32 values.
        let q8 = |(m, _): (FloatMatrix, Vec<f32>)| {
            let q = m.to_q8_0().unwrap();
            let f = q.to_f32();
            (q, f)
        };
        let cases = [Dtype::F32, Dtype::BF16, Dtype::F16]
            .map(|d| (format!("{d:?}"), stored(150, 24, d)))
            .into_iter()
            .chain([("Q8_0".into(), q8(stored(150, 64, Dtype::BF16)))]);
        for (dtype, (w, values)) in cases {
            let k = w.cols;
            let dense = Tensor::from_vec(values, (150, k), &candle_core::Device::Cpu).unwrap();
            for shape in [vec![1, k], vec![3, 5, k]] {
                let x = uniform(&shape, 4).to_dtype(DType::F32).unwrap();
                let dense_t = dense.t().unwrap();
                // A Q8_0 head quantizes a few rows of x to Q8_0 too: against their values.
                let decoding = dtype == "Q8_0" && x.elem_count() / k <= FEW_ROWS;
                let want = match decoding {
                    true => matmul_const(&q8_0_values(&x), &dense_t).unwrap(),
                    false => matmul_const(&x, &dense_t).unwrap(),
                };
                let got = matmul_rows(&x, &w).unwrap();
                let err = max_diff(&got, &want);
                assert!(err < 1e-4, "{dtype:?} {shape:?}: {err}");
                // ∂L/∂x against matmul_const's (checked by finite differences in its tests).
                let r = uniform(got.dims(), 5).to_dtype(DType::F32).unwrap();
                let grad = |f: &dyn Fn(&Tensor) -> Tensor| {
                    let v = candle_core::Var::from_tensor(&x).unwrap();
                    let loss = (f(v.as_tensor()) * &r).unwrap().sum_all().unwrap();
                    loss.backward().unwrap().get(v.as_tensor()).unwrap().clone()
                };
                let a = grad(&|x| matmul_rows(x, &w).unwrap());
                let b = grad(&|x| matmul_const(x, &dense_t).unwrap());
                let err = max_diff(&a, &b);
                assert!(err < 1e-4, "{dtype:?} {shape:?} gradient: {err}");
            }
            // f64 inputs take the matmul_const path over an f32 copy, with its gradients.
            let x = uniform(&[2, k], 6);
            check_gradients(&[x], &[true], &|a| matmul_rows(&a[0], &w));
        }
    }
}
