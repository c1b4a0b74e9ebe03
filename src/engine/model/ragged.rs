//! One decoding step over several sequences at once, each with its own length, KV cache and
//! adapter: the packed base's linears run once over every row of the step, and per-row deltas
//! ([`RowDeltas`]) add each row's adapter (how `bitsvf serve` batches mixed-expert requests).

use super::{Cache, LayerKv, Model};
use crate::engine::checkpoint::LinearKind;
use crate::engine::ops::rms_norm;
use crate::error::{Error, Result};
use candle_core::{DType, Tensor};

/// One sequence of a ragged step: its new tokens (the prompt, or the last sampled token) and
/// its own KV cache, which the step extends.
pub struct Segment<'a> {
    /// The tokens to run.
    pub ids: &'a [u32],
    /// The sequence's cache.
    pub cache: &'a mut Cache,
}

/// What the rows of a step add to a linear's output beyond the shared base: the rows' own
/// adapters (S-LoRA/Punica-style heterogeneous batching).
pub trait RowDeltas: Sync {
    /// The delta `[N, out]` that linear `kind` of layer `layer` adds for the step's rows `x`
    /// `[1, N, in]` (the linear's input; `act_quant` says whether the linear quantizes it to
    /// int8 per row first), or `None` when no row adds anything.
    fn delta(
        &self,
        layer: usize,
        kind: LinearKind,
        x: &Tensor,
        act_quant: bool,
    ) -> Result<Option<Tensor>>;
}

impl Model {
    /// One step over `segments`: every segment's tokens run through the linears as one batch
    /// of rows (plus `deltas`), attention runs per segment over its own cache. Returns the
    /// next-token logits of each segment's last position, `[vocab]` each.
    pub fn step_ragged(
        &self,
        segments: &mut [Segment<'_>],
        deltas: Option<&dyn RowDeltas>,
    ) -> Result<Vec<Vec<f32>>> {
        crate::engine::ops::on_pool(|| self.step_ragged_here(segments, deltas))
    }

    /// [`Model::step_ragged`] on the calling thread.
    fn step_ragged_here(
        &self,
        segments: &mut [Segment<'_>],
        deltas: Option<&dyn RowDeltas>,
    ) -> Result<Vec<Vec<f32>>> {
        if segments.is_empty() {
            return Ok(Vec::new());
        }
        let max = self.config.max_position_embeddings;
        let mut starts = Vec::with_capacity(segments.len());
        let mut ids = Vec::new();
        for (i, s) in segments.iter().enumerate() {
            if s.ids.is_empty() {
                return Err(Error::Input(format!(
                    "sequence {i} of the step has no tokens"
                )));
            }
            if s.cache.kv.len() != self.blocks.len() {
                return Err(Error::Input(format!(
                    "sequence {i}'s cache is not this model's"
                )));
            }
            if s.cache.len() + s.ids.len() > max {
                return Err(Error::Input(format!(
                    "sequence of {} tokens exceeds max_position_embeddings {max}",
                    s.cache.len() + s.ids.len()
                )));
            }
            starts.push(ids.len());
            ids.extend_from_slice(s.ids);
        }
        let n = ids.len();
        let ids = self.ids_tensor(&[ids])?;
        let mut x = self.embed(&ids)?.reshape((1, n, self.config.hidden_size))?;
        for (l, block) in self.blocks.iter().enumerate() {
            x = self.block_forward(l, block, &x, deltas, &mut |q, k, v| {
                let rows = (segments.iter_mut().zip(&starts))
                    .map(|(s, &a)| (a, s.ids.len(), Some(&mut s.cache.kv[l])));
                self.attend_rows((q, k, v), rows)
            })?;
        }
        let last: Vec<u32> = (segments.iter().zip(&starts))
            .map(|(s, &a)| (a + s.ids.len() - 1) as u32)
            .collect();
        let last = Tensor::from_vec(last, segments.len(), x.device())?;
        let h = x.squeeze(0)?.index_select(&last, 0)?;
        let h = rms_norm(&h, &self.norm, self.config.rms_norm_eps)?;
        let logits = self.logits(&h)?.to_dtype(DType::F32)?;
        Ok(logits.to_vec2()?)
    }
}

impl Model {
    /// Attention within each row of a run of tokens `[1, N, ..]`: row (start, len, cache)
    /// attends over its own tokens (after its cache's, when given), outputs concatenated in
    /// run order.
    pub(super) fn attend_rows<'c>(
        &self,
        (q, k, v): (&Tensor, &Tensor, &Tensor),
        rows: impl Iterator<Item = (usize, usize, Option<&'c mut Option<LayerKv>>)>,
    ) -> Result<Tensor> {
        let mut out = Vec::new();
        for (a, t, cache) in rows {
            let (q, k, v) = (q.narrow(1, a, t)?, k.narrow(1, a, t)?, v.narrow(1, a, t)?);
            out.push(self.attend(&q, &k, &v, cache)?);
        }
        Ok(Tensor::cat(&out, 1)?)
    }

    /// Greedy continuations of several prompts decoded together: each step runs every
    /// unfinished sequence as one ragged batch ([`Model::step_ragged`]). Sequence i gets up
    /// to `max_new_tokens` new tokens (fewer where the context ends) and stops after a token
    /// of `stop`, which is included — what [`Model::generate`] gives each prompt alone at
    /// temperature 0.
    pub fn generate_greedy_batch(
        &self,
        prompts: &[Vec<u32>],
        max_new_tokens: usize,
        stop: &[u32],
    ) -> Result<Vec<Vec<u32>>> {
        let max = self.config.max_position_embeddings;
        let budget: Vec<usize> = (prompts.iter())
            .map(|p| max_new_tokens.min(max.saturating_sub(p.len())))
            .collect();
        let mut caches: Vec<Cache> = prompts.iter().map(|_| self.new_cache()).collect();
        let mut next: Vec<Vec<u32>> = prompts.to_vec();
        let mut done: Vec<bool> = budget.iter().map(|&b| b == 0).collect();
        let mut out = vec![Vec::new(); prompts.len()];
        while done.iter().any(|d| !d) {
            let mut segments: Vec<Segment> = (caches.iter_mut().zip(&next).zip(&done))
                .filter(|(_, &d)| !d)
                .map(|((cache, ids), _)| Segment { ids, cache })
                .collect();
            let logits = self.step_ragged(&mut segments, None)?;
            drop(segments);
            let live: Vec<usize> = (0..prompts.len()).filter(|&i| !done[i]).collect();
            for (i, row) in live.into_iter().zip(logits) {
                let id = super::argmax(&row) as u32;
                out[i].push(id);
                done[i] = stop.contains(&id) || out[i].len() >= budget[i];
                next[i] = vec![id];
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use crate::engine::model::{GenerateOptions, Model, ModelOptions};

    /// Decoding prompts of different lengths together gives each one's own greedy
    /// continuation, stops and length limits included.
    #[test]
    fn batched_greedy_decoding_matches_one_prompt_at_a_time() {
        let ck = crate::engine::checkpoint::load_or_default(None).unwrap();
        let model = Model::new(&ck, ModelOptions::default()).unwrap();
        let prompts: Vec<Vec<u32>> = ["Q: count a in banana\nA:", "Q: sort 3 1 2\nA:", "x"]
            .iter()
            .map(|p| p.bytes().map(u32::from).collect())
            .collect();
        for (max_new, stop) in [(12, vec![b'\n' as u32]), (5, vec![])] {
            let got = model
                .generate_greedy_batch(&prompts, max_new, &stop)
                .unwrap();
            for (p, g) in prompts.iter().zip(&got) {
                let opts = GenerateOptions {
                    max_new_tokens: max_new,
                    stop: stop.clone(),
                    ..Default::default()
                };
                assert_eq!(g, &model.generate(p, &opts).unwrap(), "prompt {p:?}");
            }
        }
        assert!(model.generate_greedy_batch(&[], 4, &[]).unwrap().is_empty());
    }
}
