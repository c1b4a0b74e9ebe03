//! Token sampling for generation: temperature and nucleus (top-p) sampling, and argmax.

use rand::Rng;

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
