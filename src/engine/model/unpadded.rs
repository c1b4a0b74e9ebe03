//! The forward pass over a right-padded batch that computes only its real tokens: the rows'
//! tokens run through the blocks as one run of tokens (attention per row, as in
//! [`Model::step_ragged`]), and the padding positions come back as zero rows at the end. Its
//! stages — embeddings, each block, the final norm — are public for callers that keep only some
//! of the activations (activation checkpointing in training).
//!
//! Training batches mix prompts of different lengths: padded to the longest, a batch of the
//! default task suite is 1.2–1.7× its real tokens, all of them through every linear. Right
//! padding never reaches a real token through causal attention, so the real positions are the
//! padded pass's to float rounding, at the cost of the real tokens alone.

use super::Model;
use crate::engine::ops::rms_norm;
use crate::error::{Error, Result};
use candle_core::{Device, Tensor};

/// Where the real tokens of right-padded rows `[B, T]` lie: row r holds `lens[r]` tokens, then
/// padding. The real tokens, row after row, are the run `[1, N, ..]` the blocks compute on.
pub struct Unpadded {
    /// Rows B and padded length T.
    rows: usize,
    t: usize,
    /// Real tokens of each row, and where each row starts in the run.
    lens: Vec<usize>,
    starts: Vec<usize>,
    /// The padded position (r·T + i) of each token of the run, `[N]`.
    gather: Tensor,
    /// For each padded position its token of the run, or N (a zero row) for padding, `[B·T]`.
    scatter: Tensor,
}

impl Unpadded {
    /// The layout of rows of `lens` tokens padded to `t`. Every row holds 1 to `t` tokens.
    pub fn new(lens: &[usize], t: usize, device: &Device) -> Result<Self> {
        if let Some((r, &l)) = lens.iter().enumerate().find(|(_, &l)| l == 0 || l > t) {
            return Err(Error::Input(format!(
                "row {r} of the batch has {l} tokens; expected 1 to {t} (its padded length)"
            )));
        }
        let n: usize = lens.iter().sum();
        let (mut gather, mut scatter) = (Vec::with_capacity(n), vec![n as u32; lens.len() * t]);
        let mut starts = Vec::with_capacity(lens.len());
        for (r, &l) in lens.iter().enumerate() {
            starts.push(gather.len());
            for i in 0..l {
                scatter[r * t + i] = gather.len() as u32;
                gather.push((r * t + i) as u32);
            }
        }
        Ok(Unpadded {
            rows: lens.len(),
            t,
            lens: lens.to_vec(),
            starts,
            gather: Tensor::from_vec(gather, n, device)?,
            scatter: Tensor::from_vec(scatter, lens.len() * t, device)?,
        })
    }

    /// Real tokens N.
    pub fn tokens(&self) -> usize {
        self.gather.dims1().unwrap_or(0)
    }

    /// Whether no row is padded (the padded pass computes nothing extra).
    pub fn is_full(&self) -> bool {
        self.lens.iter().all(|&l| l == self.t)
    }
}

impl Model {
    /// The embeddings of the real tokens of ids `[B, T]`, `[1, N, d]`.
    pub fn embeddings_unpadded(&self, ids: &Tensor, u: &Unpadded) -> Result<Tensor> {
        let (b, t) = ids.dims2()?;
        if (b, t) != (u.rows, u.t) {
            return Err(Error::Input(format!(
                "ids [{b}, {t}] do not match a layout of {} rows of {}",
                u.rows, u.t
            )));
        }
        if t > self.config.max_position_embeddings {
            return Err(Error::Input(format!(
                "sequence of {t} tokens exceeds max_position_embeddings {}",
                self.config.max_position_embeddings
            )));
        }
        let ids = ids.flatten_all()?.index_select(&u.gather, 0)?;
        let d = self.config.hidden_size;
        Ok(self.embed(&ids)?.reshape((1, u.tokens(), d))?)
    }

    /// Decoder block `l` over the run `x` `[1, N, d]` of `u`'s rows: the linears over every
    /// token at once, causal attention within each row from its position 0.
    pub fn block_unpadded(&self, l: usize, x: &Tensor, u: &Unpadded) -> Result<Tensor> {
        let block = self.blocks.get(l).ok_or_else(|| {
            Error::Input(format!("block {l} of a model with {}", self.blocks.len()))
        })?;
        self.block_forward(l, block, x, None, &mut |q, k, v| {
            let rows = (u.starts.iter().zip(&u.lens)).map(|(&a, &t)| (a, t, None));
            self.attend_rows((q, k, v), rows)
        })
    }

    /// The final RMS norm of the last block's output.
    pub fn final_norm(&self, x: &Tensor) -> Result<Tensor> {
        rms_norm(x, &self.norm, self.config.rms_norm_eps)
    }

    /// The run `h` `[1, N, d]` back in the padded layout `[B, T, d]`, zero at the padding.
    pub fn repad(&self, h: &Tensor, u: &Unpadded) -> Result<Tensor> {
        let d = h.dim(2)?;
        let zero = Tensor::zeros((1, d), h.dtype(), h.device())?;
        let rows = Tensor::cat(&[&h.squeeze(0)?, &zero], 0)?;
        Ok(rows
            .index_select(&u.scatter, 0)?
            .reshape((u.rows, u.t, d))?)
    }

    /// [`Model::hidden_states`] of right-padded ids `[B, T]` whose row r holds `lens[r]` real
    /// tokens, computed over the real tokens only; `[B, T, d]`, zero at the padding.
    pub fn hidden_states_unpadded(&self, ids: &Tensor, lens: &[usize]) -> Result<Tensor> {
        let (_, t) = ids.dims2()?;
        let u = Unpadded::new(lens, t, ids.device())?;
        if u.is_full() {
            return self.hidden_states(ids, None);
        }
        let mut x = self.embeddings_unpadded(ids, &u)?;
        for l in 0..self.blocks.len() {
            x = self.block_unpadded(l, &x, &u)?;
        }
        self.repad(&self.final_norm(&x)?, &u)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::model::Model;
    use candle_core::D;

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        let d = (a - b).unwrap().abs().unwrap().flatten_all().unwrap();
        d.max(D::Minus1).unwrap().to_scalar::<f32>().unwrap()
    }

    /// Rows of 5, 2 and 7 tokens padded to 7, through a model whose every tensor is a
    /// variable: the real positions' hidden states and every gradient of a loss on them equal
    /// the padded pass's; the padding comes out zero.
    #[test]
    fn the_unpadded_pass_equals_the_padded_one_on_the_real_tokens() {
        let ck = crate::engine::checkpoint::load_or_default(None).unwrap();
        let (model, vars) = Model::trainable(ck.config.clone(), true, 3).unwrap();
        let lens = [5usize, 2, 7];
        let dev = Device::Cpu;
        let vocab = ck.config.vocab_size;
        let ids: Vec<u32> = (0..21).map(|i| (i * 37 % (vocab - 2) + 2) as u32).collect();
        let ids = Tensor::from_vec(ids, (3, 7), &dev).unwrap();
        let mask: Vec<f32> = (0..21)
            .map(|p| ((p % 7) < lens[p / 7]) as u8 as f32)
            .collect();
        let mask = Tensor::from_vec(mask, (3, 7, 1), &dev).unwrap();
        let d = ck.config.hidden_size;
        let r: Vec<f32> = (0..21 * d)
            .map(|i| ((i * 7919 % 101) as f32 - 50.0) / 50.0)
            .collect();
        let r = Tensor::from_vec(r, (3, 7, d), &dev).unwrap();
        let real = |h: &Tensor| h.broadcast_mul(&mask).unwrap();

        let padded = model.hidden_states(&ids, None).unwrap();
        let got = model.hidden_states_unpadded(&ids, &lens).unwrap();
        assert!(max_diff(&real(&got), &real(&padded)) < 1e-5);
        assert_eq!(max_diff(&real(&got), &got), 0.0, "padding is zero");

        let loss = |h: &Tensor| (real(h) * &r).unwrap().sum_all().unwrap();
        let (a, b) = (
            loss(&got).backward().unwrap(),
            loss(&padded).backward().unwrap(),
        );
        let mut compared = 0;
        for (name, v) in &vars {
            let (ga, gb) = match (a.get(v.as_tensor()), b.get(v.as_tensor())) {
                (Some(ga), Some(gb)) => (ga, gb),
                (None, None) => continue, // the output head: not in the hidden states
                _ => panic!("{name}: a gradient in one pass only"),
            };
            compared += 1;
            let scale = gb
                .abs()
                .unwrap()
                .flatten_all()
                .unwrap()
                .max(D::Minus1)
                .unwrap();
            let tol = 1e-4 * scale.to_scalar::<f32>().unwrap().max(1e-3);
            assert!(
                max_diff(ga, gb) <= tol,
                "{name}: {} > {tol}",
                max_diff(ga, gb)
            );
        }
        assert!(
            compared + 1 >= vars.len(),
            "{compared} of {} compared",
            vars.len()
        );

        assert!(Unpadded::new(&[3, 0], 4, &dev).is_err());
        assert!(Unpadded::new(&[5], 4, &dev).is_err());
        assert!(Unpadded::new(&[4, 4], 4, &dev).unwrap().is_full());
    }
}
