//! Softmax and log-softmax over the last dim, row by row, with their backward passes.

use super::composable;
use super::kernels::{dot, exp_shifted, flush, max, simd_fn, sum, task_rows, Real};
use super::storage::{fast, input, rows_cols, tensor, with_real, CResult, CpuView};
use crate::error::Result;
use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp1, DType, Layout, Shape, Tensor};
use rayon::prelude::*;

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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::ops::testing::*;

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
}
