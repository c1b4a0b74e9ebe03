//! The forward pass one stage at a time — embeddings, each decoder block, the final norm — for
//! callers that keep only some of the activations (activation checkpointing in training).

use super::Model;
use crate::engine::ops::rms_norm;
use crate::error::{Error, Result};
use candle_core::Tensor;

impl Model {
    /// The embeddings of ids `[B, T]`, `[B, T, d]`.
    pub fn embeddings(&self, ids: &Tensor) -> Result<Tensor> {
        let (b, t) = ids.dims2()?;
        Ok(self.embed(ids)?.reshape((b, t, self.config.hidden_size))?)
    }

    /// Decoder block `l` over `x` `[B, T, d]` from position 0 (causal attention over `x`'s own
    /// positions, no cache): [`Model::hidden_states`] is the embeddings through every block,
    /// then [`Model::final_norm`].
    pub fn block(&self, l: usize, x: &Tensor) -> Result<Tensor> {
        let block = self.blocks.get(l).ok_or_else(|| {
            Error::Input(format!("block {l} of a model with {}", self.blocks.len()))
        })?;
        self.block_forward(l, block, x, None, &mut |q, k, v| self.attend(q, k, v, None))
    }

    /// The final RMS norm of the last block's output.
    pub fn final_norm(&self, x: &Tensor) -> Result<Tensor> {
        rms_norm(x, &self.norm, self.config.rms_norm_eps)
    }
}
