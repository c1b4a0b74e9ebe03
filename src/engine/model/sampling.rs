//! Generation with a KV cache, and its token sampling: temperature and nucleus (top-p)
//! sampling, and argmax.

use super::Model;
use crate::error::Result;
use candle_core::Tensor;
use rand::{rngs::StdRng, Rng, SeedableRng};

/// Sampling settings for [`Model::generate`].
#[derive(Debug, Clone)]
pub struct GenerateOptions {
    /// Most tokens to produce.
    pub max_new_tokens: usize,
    /// 0 = greedy.
    pub temperature: f64,
    /// Nucleus mass (1 = off).
    pub top_p: f64,
    /// RNG seed.
    pub seed: u64,
    /// Tokens that end generation.
    pub stop: Vec<u32>,
}

impl Default for GenerateOptions {
    fn default() -> Self {
        GenerateOptions {
            max_new_tokens: 32,
            temperature: 0.0,
            top_p: 1.0,
            seed: 0,
            stop: Vec::new(),
        }
    }
}

/// Pick a token from logits: argmax at temperature 0 (first index on ties), else sample from
/// the temperature-scaled softmax restricted to the smallest set with mass ≥ `top_p`.
pub fn sample(logits: &[f32], temperature: f64, top_p: f64, rng: &mut impl Rng) -> u32 {
    if temperature <= 0.0 {
        return argmax(logits) as u32;
    }
    let m = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
    let mut p: Vec<(usize, f64)> = logits
        .iter()
        .enumerate()
        .map(|(i, &l)| (i, ((l as f64 - m) / temperature).exp()))
        .collect();
    let z: f64 = p.iter().map(|x| x.1).sum();
    p.iter_mut().for_each(|x| x.1 /= z);
    p.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    let mut keep = p.len();
    let mut acc = 0.0;
    for (i, x) in p.iter().enumerate() {
        acc += x.1;
        if acc >= top_p {
            keep = i + 1;
            break;
        }
    }
    p.truncate(keep);
    let total: f64 = p.iter().map(|x| x.1).sum();
    let mut r = rng.gen::<f64>() * total;
    for &(i, w) in &p {
        if r < w {
            return i as u32;
        }
        r -= w;
    }
    p.last().map_or(0, |x| x.0 as u32)
}

/// Index of the largest value (first on ties).
pub fn argmax(v: &[f32]) -> usize {
    let mut best = 0;
    for (i, &x) in v.iter().enumerate() {
        if x > v[best] {
            best = i;
        }
    }
    best
}

impl Model {
    /// Generate up to `opts.max_new_tokens` after `prompt`, with a KV cache. Returns only the
    /// new tokens (stopping after `stop` tokens, which are included).
    pub fn generate(&self, prompt: &[u32], opts: &GenerateOptions) -> Result<Vec<u32>> {
        let mut out = Vec::new();
        self.generate_streaming(prompt, opts, |id| {
            out.push(id);
            true
        })?;
        Ok(out)
    }

    /// [`Model::generate`], handing each new token to `on_token` as soon as it is chosen
    /// (return false to stop), and timing the prompt (prefill) and the new tokens (decode).
    pub fn generate_streaming(
        &self,
        prompt: &[u32],
        opts: &GenerateOptions,
        mut on_token: impl FnMut(u32) -> bool,
    ) -> Result<GenerateStats> {
        let mut cache = self.new_cache();
        let mut rng = StdRng::seed_from_u64(opts.seed);
        let mut stats = GenerateStats {
            prompt_tokens: prompt.len(),
            ..Default::default()
        };
        let mut input = self.ids_tensor(&[prompt.to_vec()])?;
        let room = self
            .config
            .max_position_embeddings
            .saturating_sub(prompt.len());
        for step in 0..opts.max_new_tokens.min(room) {
            let start = std::time::Instant::now();
            let last = self.next_logits(&input, Some(&mut cache))?;
            let next = sample(&last, opts.temperature, opts.top_p, &mut rng);
            match step {
                0 => stats.prefill_seconds = start.elapsed().as_secs_f64(),
                _ => stats.decode_seconds += start.elapsed().as_secs_f64(),
            }
            stats.new_tokens += 1;
            if !on_token(next) || opts.stop.contains(&next) {
                break;
            }
            input = Tensor::from_vec(vec![next], (1, 1), &self.device)?;
        }
        Ok(stats)
    }
}

/// What one generation took.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct GenerateStats {
    /// Tokens of the prompt.
    pub prompt_tokens: usize,
    /// Tokens generated (the first comes from the prompt's pass).
    pub new_tokens: usize,
    /// Seconds of the prompt's pass, which also yields the first new token.
    pub prefill_seconds: f64,
    /// Seconds of the passes for the remaining new tokens.
    pub decode_seconds: f64,
}

impl GenerateStats {
    /// Prompt tokens per second; None when the prompt's pass did not run (no new token asked).
    pub fn prefill_rate(&self) -> Option<f64> {
        (self.new_tokens > 0).then(|| self.prompt_tokens as f64 / self.prefill_seconds)
    }

    /// New tokens per second after the first; None when there was no second token.
    pub fn decode_rate(&self) -> Option<f64> {
        (self.new_tokens > 1).then(|| (self.new_tokens - 1) as f64 / self.decode_seconds)
    }
}
