//! Training losses over a [`Batch`]: masked next-token NLL and cross-entropy, the KL penalty
//! against the reference model, and the REINFORCE policy-gradient loss with its advantages.

use crate::engine::model::{Model, NamedVar};
use crate::error::Result;
use crate::eval::batch::flat_log_probs;
use crate::eval::batch::{batch_from_pairs, Batch};
use candle_core::backprop::GradStore;
use candle_core::{DType, Tensor, D};

/// Mean cross-entropy over the masked positions. Composable ops only (gradients flow).
pub fn masked_cross_entropy(logits: &Tensor, batch: &Batch) -> Result<Tensor> {
    // Fused: log-softmax at the targets without the [B·T, vocab] log-prob tensor.
    masked_mean_nll(
        &crate::engine::ops::target_log_probs(logits, &batch.target)?,
        batch,
    )
}

/// Mean negative log-likelihood of the targets over the masked positions, from log-probs
/// `[B·T, vocab]`.
pub fn masked_nll(lp: &Tensor, batch: &Batch) -> Result<Tensor> {
    masked_mean_nll(
        &lp.gather(&batch.target.unsqueeze(1)?, 1)?.squeeze(1)?,
        batch,
    )
}

/// −mean of the target log-probs `picked` `[B·T]` over the masked positions.
fn masked_mean_nll(picked: &Tensor, batch: &Batch) -> Result<Tensor> {
    let nll = (picked * batch.mask.to_dtype(picked.dtype())?)?
        .sum_all()?
        .neg()?;
    Ok((nll / batch.supervised.max(1) as f64)?)
}

/// Mean KL(ref ‖ cur) over the masked positions; `ref_lp` is constant.
pub fn masked_kl(ref_lp: &Tensor, cur_lp: &Tensor, batch: &Batch) -> Result<Tensor> {
    masked_kl_over(ref_lp, cur_lp, batch, batch.supervised)
}

/// The KL(ref ‖ cur) summed over the masked positions of `batch`, divided by `supervised`
/// (the batch's own count, or a whole step's of which the batch is a part).
fn masked_kl_over(
    ref_lp: &Tensor,
    cur_lp: &Tensor,
    batch: &Batch,
    supervised: usize,
) -> Result<Tensor> {
    let p = ref_lp.exp()?;
    let kl = (p * (ref_lp - cur_lp)?)?.sum(D::Minus1)?; // [N]
    let mask = batch.mask.to_dtype(kl.dtype())?;
    Ok(((kl * mask)?.sum_all()? / supervised.max(1) as f64)?)
}

/// A gradient store with nothing in it but a scalar of its own (candle has no public
/// constructor): what [`accumulate`] fills with the variables' gradients alone. The store a
/// backward pass returns also holds the gradients of intermediate tensors that do not depend
/// on a variable — on a 2B-4T-sized model, gigabytes that a pass would otherwise keep alive.
pub(crate) fn empty_grads() -> Result<GradStore> {
    let v = candle_core::Var::new(0f32, &candle_core::Device::Cpu)?;
    Ok(v.as_tensor().backward()?)
}

/// Adds the gradients of `vars` in `g` to `acc`.
pub(crate) fn accumulate(acc: &mut GradStore, g: &GradStore, vars: &[NamedVar]) -> Result<()> {
    for (_, var) in vars {
        if let Some(add) = g.get(var.as_tensor()) {
            let sum = match acc.get(var.as_tensor()) {
                Some(prev) => (prev + add)?,
                None => add.clone(),
            };
            acc.insert(var.as_tensor(), sum);
        }
    }
    Ok(())
}

/// Which passes of an SFT step a rank of a data-parallel group computes: `(rank, ranks)` —
/// passes `rank`, `rank + ranks`, … . `(0, 1)` is the whole step.
pub type Share = (usize, usize);

/// One SFT step's gradient over `pairs` (prompt, answer) in passes of at most `per_pass`
/// pairs, accumulated: each pass's masked NLL is weighted by its share of the supervised
/// tokens, so the sum is the whole batch's loss and gradient (to float rounding) in the
/// memory of one pass. Returns the loss, the mean KL(ref ‖ model) over the supervised
/// positions (a statistic; `reference` is not differentiated; NaN without one) and the
/// gradients of `vars`.
/// With a `share` of a data-parallel group, only this rank's passes: the group's sum is the
/// step's.
pub fn sft_gradients(
    model: &Model,
    reference: Option<&Model>,
    pairs: &[(Vec<u32>, Vec<u32>)],
    per_pass: usize,
    share: Share,
    vars: &[NamedVar],
) -> Result<(f64, f64, GradStore)> {
    let (mut loss_sum, mut kl_sum) = (0.0, 0.0);
    let mut grads = empty_grads()?;
    for (batch, w) in sft_passes(model, pairs, per_pass, share)? {
        let lp = flat_log_probs(model, &batch)?;
        let (loss, kl) = pass_loss(&lp, reference, &batch, w)?;
        kl_sum += kl;
        loss_sum += loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        let g = loss.backward()?;
        drop((lp, loss));
        accumulate(&mut grads, &g, vars)?;
    }
    Ok((loss_sum, kl_sum, grads))
}

/// The passes of one SFT step over `pairs` that `share` computes: batches of at most
/// `per_pass` pairs, each with its share of the whole step's supervised tokens (`None` for a
/// step of a single pass, whose loss is not scaled).
pub(crate) fn sft_passes(
    model: &Model,
    pairs: &[(Vec<u32>, Vec<u32>)],
    per_pass: usize,
    (rank, ranks): Share,
) -> Result<Vec<(Batch, Option<f64>)>> {
    let chunks: Vec<_> = pairs.chunks(per_pass.max(1)).collect();
    // The positions `batch_from_pairs` supervises: the answer's, predicted from the last prompt
    // token on.
    let supervised = |c: &[(Vec<u32>, Vec<u32>)]| -> usize {
        (c.iter())
            .map(|(p, a)| (p.len() + a.len()).saturating_sub(1) - p.len().max(1) + 1)
            .sum()
    };
    let total = chunks.iter().map(|c| supervised(c)).sum::<usize>().max(1);
    let single = chunks.len() == 1;
    (chunks.iter().skip(rank).step_by(ranks.max(1)))
        .map(|c| {
            let b = batch_from_pairs(c, model.device())?;
            let w = (!single).then(|| b.supervised as f64 / total as f64);
            Ok((b, w))
        })
        .collect()
}

/// One pass's masked NLL from the model's log-probs `lp` and the KL(ref ‖ model) statistic
/// against `reference` (NaN without one: the reference's forward pass is skipped), both scaled
/// by the pass's share `w`.
pub(crate) fn pass_loss(
    lp: &Tensor,
    reference: Option<&Model>,
    batch: &Batch,
    w: Option<f64>,
) -> Result<(Tensor, f64)> {
    let loss = masked_nll(lp, batch)?;
    let kl = match reference {
        Some(reference) => {
            let ref_lp = flat_log_probs(reference, batch)?.detach();
            masked_kl(&ref_lp, lp, batch)?
                .to_dtype(DType::F64)?
                .to_scalar::<f64>()?
        }
        None => f64::NAN,
    };
    Ok(match w {
        Some(w) => ((loss * w)?, kl * w),
        None => (loss, kl),
    })
}

/// The REINFORCE loss for one batch of rollouts (see module docs); also returns statistics.
pub fn reinforce_loss(
    model: &Model,
    reference: &Model,
    batch: &Batch,
    advantages: &[f32],
    seq_len: usize,
    kl_coeff: f64,
) -> Result<(Tensor, f64)> {
    let whole = (advantages.len(), batch.supervised);
    reinforce_loss_part(
        model, reference, batch, advantages, seq_len, kl_coeff, whole,
    )
}

/// [`reinforce_loss`] of one rank's part of a step whose rollouts a data-parallel group shares:
/// the policy term is averaged over the step's `whole.0` rollouts and the KL over its `whole.1`
/// supervised positions, so the parts' losses and gradients sum to the whole step's.
pub fn reinforce_loss_part(
    model: &Model,
    reference: &Model,
    batch: &Batch,
    advantages: &[f32],
    seq_len: usize,
    kl_coeff: f64,
    (rollouts, supervised): (usize, usize),
) -> Result<(Tensor, f64)> {
    let lp = flat_log_probs(model, batch)?; // [N·T, V]
    let picked = lp.gather(&batch.target.unsqueeze(1)?, 1)?.squeeze(1)?; // [N·T]
    let per_pos = (picked * batch.mask.to_dtype(lp.dtype())?)?;
    let n = advantages.len();
    let seq_lp = per_pos.reshape((n, seq_len))?.sum(1)?; // [N]
    let adv = Tensor::from_slice(advantages, n, lp.device())?.to_dtype(lp.dtype())?;
    let pg = ((seq_lp * adv)?.sum_all()? / rollouts.max(1) as f64)?.neg()?;
    let ref_lp = flat_log_probs(reference, batch)?.detach();
    let kl = masked_kl_over(&ref_lp, &lp, batch, supervised)?;
    let kl_v = kl.to_dtype(DType::F64)?.to_scalar::<f64>()?;
    Ok(((pg + (kl * kl_coeff)?)?, kl_v))
}

/// Group-baselined advantages: r − mean of its prompt's samples (or r itself).
pub fn advantages(rewards: &[f32], samples: usize, baseline: bool) -> Vec<f32> {
    rewards
        .chunks(samples)
        .flat_map(|g| {
            let b = if baseline {
                g.iter().sum::<f32>() / g.len() as f32
            } else {
                0.0
            };
            g.iter().map(move |r| r - b)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::eval::batch::batch_from_pairs;
    use candle_core::Device;

    #[test]
    fn masked_cross_entropy_matches_hand_computation() {
        // Uniform logits over V: loss = ln V on every supervised position.
        let b = batch_from_pairs(&[(vec![2, 49], vec![50, 10])], &Device::Cpu).unwrap();
        let logits = Tensor::zeros((1, 3, 128), DType::F32, &Device::Cpu).unwrap();
        let l = masked_cross_entropy(&logits, &b)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!((l - (128f32).ln()).abs() < 1e-5);
    }

    #[test]
    fn advantages_use_the_group_mean() {
        assert_eq!(
            advantages(&[1.0, -1.0, 1.0, 1.0], 2, true),
            vec![1.0, -1.0, 0.0, 0.0]
        );
        assert_eq!(advantages(&[1.0, -1.0], 2, false), vec![1.0, -1.0]);
    }
}
