//! Decode speed of a model: the median tokens per second of greedy decoding after a short
//! prompt, used by the mixture search (latency objective) and by `compare-options`.

use crate::engine::model::{GenerateOptions, Model};
use crate::engine::tokenizer::Tokenizer;
use crate::error::Result;
use crate::eval::prompt_ids;
use std::time::Instant;

/// Median greedy decode speed: `tokens` new tokens after a short prompt, no stop token.
pub fn decode_speed(model: &Model, tok: &dyn Tokenizer, tokens: usize, runs: usize) -> Result<f64> {
    let prompt = prompt_ids(tok, "count a in banana?")?;
    let opts = GenerateOptions {
        max_new_tokens: tokens,
        stop: vec![],
        ..Default::default()
    };
    let mut speeds = Vec::new();
    for _ in 0..runs.max(1) {
        let t = Instant::now();
        let out = model.generate(&prompt, &opts)?;
        speeds.push(out.len() as f64 / t.elapsed().as_secs_f64());
    }
    Ok(median(&mut speeds))
}

pub fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}
