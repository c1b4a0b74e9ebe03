//! SFT gradients with activation checkpointing: the forward pass keeps only each block's
//! input; the backward pass recomputes one block at a time from it, so a pass holds one
//! block's activations instead of all of them, for one more forward's worth of time.
//!
//! Per pass: x₀ = embeddings, x_{l+1} = block_l(x_l) without a graph (each x_l kept); the
//! head's loss is differentiated with respect to x_L; then for l = L−1 … 0, block_l is run
//! again from x_l with the graph, and Σ(block_l(x_l) ⊙ ∂L/∂x_{l+1}) is differentiated, which
//! gives ∂L/∂x_l and the gradients of block l's z. The result equals the whole-graph
//! gradient to float rounding (the same ops on the same values).

use crate::engine::model::{Model, NamedVar, Unpadded};
use crate::error::{Error, Result};
use crate::train::loss::{accumulate, empty_grads, pass_loss, sft_passes, Share};
use candle_core::backprop::GradStore;
use candle_core::{DType, Tensor, Var, D};

/// [`crate::train::loss::sft_gradients`] with activation checkpointing: the same loss, KL
/// statistic and gradients of `vars`, over this `share`'s passes of at most `per_pass` pairs.
pub fn sft_gradients_checkpointed(
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
        // Forward over the real tokens ([`Unpadded`]), keeping each block's input only.
        let u = Unpadded::new(&batch.lens, batch.input.dim(1)?, batch.input.device())?;
        let mut x = model.embeddings_unpadded(&batch.input, &u)?.detach();
        let mut inputs = Vec::with_capacity(model.blocks.len());
        for l in 0..model.blocks.len() {
            inputs.push(x.clone());
            x = model.block_unpadded(l, &x, &u)?.detach();
        }
        // The head's loss, differentiated with respect to the last block's output.
        let last = Var::from_tensor(&x)?;
        let logits = model.logits(&model.repad(&model.final_norm(last.as_tensor())?, &u)?)?;
        let v = logits.dim(D::Minus1)?;
        let lp = crate::engine::ops::log_softmax(&logits.reshape(((), v))?)?;
        let (loss, kl) = pass_loss(&lp, reference, &batch, w)?;
        kl_sum += kl;
        loss_sum += loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        let mut head = loss.backward()?;
        drop((logits, lp, loss));
        let mut dx: Tensor = head
            .remove(last.as_tensor())
            .ok_or_else(|| Error::Check("the loss does not depend on the hidden states".into()))?;
        drop(head);
        // Backward, one recomputed block at a time.
        for l in (0..model.blocks.len()).rev() {
            let input = Var::from_tensor(&inputs.pop().expect("one input per block"))?;
            let y = model.block_unpadded(l, input.as_tensor(), &u)?;
            let g = (y * &dx)?.sum_all()?.backward()?;
            accumulate(&mut grads, &g, vars)?;
            if l > 0 {
                dx = g
                    .get(input.as_tensor())
                    .ok_or_else(|| Error::Check(format!("block {l} does not depend on its input")))?
                    .clone();
            }
        }
    }
    Ok((loss_sum, kl_sum, grads))
}
