//! RMSNorm over the last dim, differentiable in x and in the weight.

use super::composable;
use super::kernels::{dot, task_rows, Real};
use super::storage::{
    fast, input, required, rows_cols, saved_slice, shape_error, tensor, with_real, CResult,
    CpuView, Saved,
};
use crate::error::Result;
use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp2, DType, Layout, Shape, Tensor, D};
use rayon::prelude::*;

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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::ops::testing::*;

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
}
