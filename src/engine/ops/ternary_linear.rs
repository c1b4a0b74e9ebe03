//! y = quant(x)·Wᵀ over a packed ternary W = γ·W_t through the integer kernel, differentiable
//! in x: the linear that training over the packed base goes through.

use super::kernels::{gemm_raw, Real, View};
use super::storage::{
    input, rows_cols, shape_error, tensor, with_last, with_real, CResult, CpuView,
};
use crate::engine::ternary::TernaryMatrix;
use crate::error::Result;
use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp1, DType, Layout, Shape, Tensor, D};
use gemm::Parallelism;
use std::sync::Arc;

/// Rows of W decoded to f32 at a time in the backward pass: 256 rows of 2560 are 2.5 MiB,
/// one product's worth of work for every thread without the dense matrix in memory.
const BACKWARD_BLOCK_ROWS: usize = 256;

/// BitNet's linear over the packed `w` `[out, in]`: `x` `[.., in]` is quantized to int8 per
/// token (when `act_quant`), multiplied by W_t with exact integer sums and rescaled by γ/s
/// ([`TernaryMatrix::forward`]), giving `[.., out]`. The backward pass returns
/// ∂L/∂x = ∂L/∂y · γ·W_t, straight through the activation quantizer as the dense path's
/// [`super::fake_quant_ste`] does, with W decoded a block of rows at a time — the packed codes
/// are the only copy of W. f64 inputs run the same integer kernel on an f32 copy.
pub fn ternary_linear(x: &Tensor, w: &Arc<TernaryMatrix>, act_quant: bool) -> Result<Tensor> {
    let k = x.dim(D::Minus1)?;
    if k != w.cols {
        return Err(shape_error(format!(
            "ternary_linear: x has {k} features, the weight {}",
            w.cols
        )));
    }
    if !matches!(x.dtype(), DType::F32 | DType::F64) || !x.device().is_cpu() {
        let y = ternary_linear(&x.to_dtype(DType::F32)?, w, act_quant)?;
        return Ok(y.to_dtype(x.dtype())?);
    }
    let op = TernaryLinear {
        w: Arc::clone(w),
        act_quant,
    };
    Ok(x.contiguous()?.apply_op1(op)?)
}

struct TernaryLinear {
    w: Arc<TernaryMatrix>,
    act_quant: bool,
}

impl TernaryLinear {
    /// dx `[m, k]` = dy `[m, n]` · W, W decoded in blocks of rows.
    fn backward<T: Real>(&self, dy: &[T], m: usize) -> Vec<T> {
        let (n, k) = (self.w.rows, self.w.cols);
        let mut dx = vec![T::ZERO; m * k];
        let block = BACKWARD_BLOCK_ROWS.min(n).max(1);
        let mut decoded = vec![0f32; block * k];
        let mut tmp = vec![T::ZERO; block * k];
        let par = Parallelism::Rayon(rayon::current_num_threads());
        for j0 in (0..n).step_by(block) {
            let rows = block.min(n - j0);
            self.w.rows_into(j0, &mut decoded[..rows * k]);
            for (t, &d) in tmp.iter_mut().zip(&decoded[..rows * k]) {
                *t = T::from_f64(f64::from(d));
            }
            // Safety: dy[:, j0..j0 + rows] (row stride n) is m × rows, tmp is rows × k, dx is
            // m × k and written by this call alone.
            unsafe {
                let lhs = View::rows(&dy[j0..], n);
                let (dst, acc) = (dx.as_mut_ptr(), j0 > 0);
                gemm_raw(
                    (m, k, rows),
                    dst,
                    k,
                    acc,
                    lhs,
                    View::rows(&tmp, k),
                    T::ONE,
                    par,
                );
            }
        }
        dx
    }
}

impl CustomOp1 for TernaryLinear {
    fn name(&self) -> &'static str {
        "ternary-linear"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> CResult<(CpuStorage, Shape)> {
        let (m, _) = rows_cols(l.shape())?;
        let shape = with_last(l.shape(), self.w.rows);
        let y = match s.dtype() {
            DType::F32 => {
                let x = input::<f32>(s, l, self.name())?;
                CpuStorage::F32(self.w.forward(x, m, self.act_quant))
            }
            DType::F64 => {
                let x: Vec<f32> = (input::<f64>(s, l, self.name())?.iter())
                    .map(|&v| v as f32)
                    .collect();
                let y = self.w.forward(&x, m, self.act_quant);
                CpuStorage::F64(y.into_iter().map(f64::from).collect())
            }
            dt => bail!("{}: unsupported dtype {dt:?}", self.name()),
        };
        Ok((y, shape))
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, dy: &Tensor) -> CResult<Option<Tensor>> {
        let (m, _) = rows_cols(x.shape())?;
        let dy = dy.contiguous()?;
        let dyv = CpuView::of(&dy)?;
        with_real!(x.dtype(), self.name(), T => {
            let dx = self.backward(dyv.get::<T>()?, m);
            Ok(Some(tensor(dx, x.shape().clone())?))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::ops::testing::*;
    use crate::engine::ops::{fake_quant_ste, matmul_const};
    use crate::engine::ternary::Quantization;

    /// A random ternary `rows × cols` matrix with per-row scales, and its dense Wᵀ `[in, out]`.
    fn matrix(rows: usize, cols: usize, seed: u64) -> (Arc<TernaryMatrix>, Tensor) {
        let w = uniform(&[rows, cols], seed);
        let values: Vec<f32> = w
            .flatten_all()
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap()
            .to_vec1()
            .unwrap();
        let q = Quantization::PerChannel { threshold: 0.5 };
        let m = TernaryMatrix::quantize(&values, rows, cols, q);
        let dense = Tensor::from_vec(m.dequantize(), (rows, cols), &candle_core::Device::Cpu)
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap();
        (Arc::new(m), dense.t().unwrap().contiguous().unwrap())
    }

    #[test]
    fn matches_the_dense_product_and_differentiates() {
        // 600 rows: two full backward blocks and a partial one; 13 columns: a partial byte.
        for (rows, cols, shape) in [(600, 13, vec![3, 13]), (7, 40, vec![2, 5, 40])] {
            let (w, wt) = matrix(rows, cols, 7);
            let x = uniform(&shape, 8);
            for act_quant in [true, false] {
                // The dense path: (fake-quantized) x times the dequantized W.
                let dense = |x: &Tensor| {
                    let xq = if act_quant {
                        fake_quant_ste(x).unwrap()
                    } else {
                        x.clone()
                    };
                    matmul_const(&xq, &wt).unwrap()
                };
                let got = ternary_linear(&x, &w, act_quant).unwrap();
                let err = max_diff(&got, &dense(&x));
                assert!(err < 1e-4, "{rows}×{cols} act_quant {act_quant}: {err}");
                // ∂L/∂x against the dense path's, which matmul_const's tests check by finite
                // differences (the kernel's f32 products are too coarse for them here).
                let r = uniform(got.dims(), 9);
                let grad = |f: &dyn Fn(&Tensor) -> Tensor| {
                    let v = candle_core::Var::from_tensor(&x).unwrap();
                    let loss = (f(v.as_tensor()) * &r).unwrap().sum_all().unwrap();
                    loss.backward().unwrap().get(v.as_tensor()).unwrap().clone()
                };
                let a = grad(&|x| ternary_linear(x, &w, act_quant).unwrap());
                let b = grad(&dense);
                let err = max_diff(&a, &b);
                assert!(
                    err < 1e-9,
                    "{rows}×{cols} act_quant {act_quant} gradient: {err}"
                );
            }
            // f32 in, f32 out, the same values.
            let x32 = x.to_dtype(DType::F32).unwrap();
            let y32 = ternary_linear(&x32, &w, true).unwrap();
            assert_eq!(y32.dtype(), DType::F32);
            let y64 = ternary_linear(&x, &w, true).unwrap();
            assert!(max_diff(&y32.to_dtype(DType::F64).unwrap(), &y64) < 1e-5);
        }
    }

    #[test]
    fn a_width_mismatch_is_an_error() {
        let (w, _) = matrix(4, 8, 1);
        assert!(ternary_linear(&uniform(&[2, 7], 2), &w, true).is_err());
    }
}
