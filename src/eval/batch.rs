//! Token batches for teacher-forced scoring: prompt/answer pairs padded into one tensor with a
//! mask over the answer positions, and the log-probability of every answer token.

use crate::engine::model::Model;
use crate::engine::ops::log_softmax;
use crate::engine::tokenizer::Tokenizer;
use crate::error::Result;
use crate::eval::prompt_ids;
use crate::tasks::Item;
use candle_core::{Device, Tensor, D};

/// One training batch: inputs `[B, T]`, targets and loss mask flattened `[B·T]`.
pub struct Batch {
    /// Input ids.
    pub input: Tensor,
    /// Next-token targets.
    pub target: Tensor,
    /// 1 on answer (and terminator) positions, 0 elsewhere.
    pub mask: Tensor,
    /// Number of supervised positions.
    pub supervised: usize,
    /// Real (unpadded) positions of each row.
    pub lens: Vec<usize>,
}

/// Token rows (prompt ids, answer ids incl. terminator) → a right-padded batch supervising only
/// the answer tokens.
pub fn batch_from_pairs(pairs: &[(Vec<u32>, Vec<u32>)], dev: &Device) -> Result<Batch> {
    let t = pairs
        .iter()
        .map(|(p, a)| p.len() + a.len() - 1)
        .max()
        .unwrap_or(1);
    let b = pairs.len();
    let (mut input, mut target, mut mask) =
        (vec![0u32; b * t], vec![0u32; b * t], vec![0f32; b * t]);
    let mut supervised = 0;
    for (r, (p, a)) in pairs.iter().enumerate() {
        let seq: Vec<u32> = p.iter().chain(a).copied().collect();
        for i in 0..seq.len() - 1 {
            input[r * t + i] = seq[i];
            target[r * t + i] = seq[i + 1];
            if i + 1 >= p.len() {
                mask[r * t + i] = 1.0;
                supervised += 1;
            }
        }
    }
    Ok(Batch {
        input: Tensor::from_vec(input, (b, t), dev)?,
        target: Tensor::from_vec(target, b * t, dev)?,
        mask: Tensor::from_vec(mask, b * t, dev)?,
        supervised,
        lens: pairs.iter().map(|(p, a)| p.len() + a.len() - 1).collect(),
    })
}

/// (prompt, answer + EOS) token pairs of `items`, the SFT targets.
pub fn sft_pairs(tok: &dyn Tokenizer, items: &[Item]) -> Result<Vec<(Vec<u32>, Vec<u32>)>> {
    items
        .iter()
        .map(|it| {
            let mut a = tok.encode(&it.answer)?;
            a.push(tok.eos());
            Ok((prompt_ids(tok, &it.prompt)?, a))
        })
        .collect()
}

/// The logits `[B, T, vocab]` of `batch`, its blocks computed over the real tokens only
/// ([`Model::hidden_states_unpadded`]); the padding positions' logits are the head's at a zero
/// hidden state.
pub fn batch_logits(model: &Model, batch: &Batch) -> Result<Tensor> {
    model.logits(&model.hidden_states_unpadded(&batch.input, &batch.lens)?)
}

/// Log-probabilities `[B·T, vocab]` of `model` on `batch`.
pub fn flat_log_probs(model: &Model, batch: &Batch) -> Result<Tensor> {
    let logits = batch_logits(model, batch)?;
    let v = logits.dim(D::Minus1)?;
    log_softmax(&logits.reshape(((), v))?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_supervise_only_the_answer() {
        // prompt [2, 49, 61] ("1=" after BOS), answer [50, 10] ("2\n")
        let b = batch_from_pairs(&[(vec![2, 49, 61], vec![50, 10])], &Device::Cpu).unwrap();
        assert_eq!(b.input.to_vec2::<u32>().unwrap(), vec![vec![2, 49, 61, 50]]);
        assert_eq!(b.target.to_vec1::<u32>().unwrap(), vec![49, 61, 50, 10]);
        assert_eq!(b.mask.to_vec1::<f32>().unwrap(), vec![0.0, 0.0, 1.0, 1.0]);
        assert_eq!(b.supervised, 2);
    }
}
