//! log softmax(logits)[target] per row without the `[rows, V]` log-softmax tensor, and its
//! backward pass (softmax − one-hot).

use super::composable;
use super::kernels::{flush, max, simd_fn, task_rows, Real, LANES};
use super::storage::{
    fast, input, required, rows_cols, saved_slice, shape_error, tensor, with_real, CResult,
    CpuView, Saved,
};
use crate::error::Result;
use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp2, DType, Layout, Shape, Storage, Tensor};
use rayon::prelude::*;

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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::ops::testing::*;
    use candle_core::Device;

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
}
