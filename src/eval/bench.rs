//! `bitsvf bench`: a model's prefill and decode speed at its real size, its resident memory,
//! the weight bytes it streams per decoded token, and how much of this machine's measured
//! memory read bandwidth that makes — the figures to set beside `llama-bench`'s.

use crate::engine::model::{GenerateOptions, Model};
use crate::error::Result;
use crate::eval::recovery::random_probe;
use rayon::prelude::*;
use serde::Serialize;
use std::time::Instant;

/// What to measure.
#[derive(Debug, Clone, Copy)]
pub struct BenchOptions {
    /// Prompt tokens (random ids) per repeat: the prefill.
    pub prompt_tokens: usize,
    /// Tokens decoded greedily after the prompt.
    pub gen_tokens: usize,
    /// Timed repeats, after one untimed warm-up.
    pub repeats: usize,
    /// Seed of the prompt ids.
    pub seed: u64,
}

/// Mean and sample standard deviation of the repeats.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Rate {
    /// Mean tokens per second.
    pub mean: f64,
    /// Standard deviation over the repeats (0 for one).
    pub sd: f64,
}

impl Rate {
    fn of(v: &[f64]) -> Rate {
        let n = v.len().max(1) as f64;
        let mean = v.iter().sum::<f64>() / n;
        let var = v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0).max(1.0);
        Rate {
            mean,
            sd: var.sqrt(),
        }
    }
}

/// The measurements of one model.
#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    /// Prompt tokens per repeat.
    pub prompt_tokens: usize,
    /// Decoded tokens per repeat.
    pub gen_tokens: usize,
    /// Timed repeats.
    pub repeats: usize,
    /// Prefill tokens per second.
    pub prefill: Rate,
    /// Decode tokens per second (after the prompt).
    pub decode: Rate,
    /// Bytes of weights read per decoded token: the linears and the output head.
    pub weight_bytes_per_token: u64,
    /// Resident memory after the first repeat, MB (None where the OS does not say).
    pub resident_mb: Option<f64>,
    /// Peak resident memory of the process, MB.
    pub peak_mb: Option<f64>,
}

/// Measure `model` (built by the caller, who times the build).
pub fn bench(model: &Model, o: &BenchOptions) -> Result<BenchReport> {
    let len = o.prompt_tokens.clamp(
        1,
        model
            .config
            .max_position_embeddings
            .saturating_sub(o.gen_tokens.saturating_add(1))
            .max(1),
    );
    let vocab = model.config.vocab_size;
    let prompts = random_probe(vocab, o.repeats + 1, len, o.seed);
    let opts = GenerateOptions {
        // The first new token comes from the prompt's pass.
        max_new_tokens: o.gen_tokens.saturating_add(1),
        stop: vec![],
        ..Default::default()
    };
    let (mut prefill, mut decode, mut resident) = (Vec::new(), Vec::new(), None);
    for (i, prompt) in prompts.iter().enumerate() {
        let stats = model.generate_streaming(prompt, &opts, |_| true)?;
        if i == 0 {
            continue;
        }
        resident = resident.or_else(|| proc_status_mb("VmRSS:"));
        prefill.extend(stats.prefill_rate());
        decode.extend(stats.decode_rate());
    }
    Ok(BenchReport {
        prompt_tokens: len,
        gen_tokens: o.gen_tokens,
        repeats: o.repeats,
        prefill: Rate::of(&prefill),
        decode: Rate::of(&decode),
        weight_bytes_per_token: model.weight_bytes_per_token() as u64,
        resident_mb: resident,
        peak_mb: peak_rss_mb(),
    })
}

impl BenchReport {
    /// Weight bytes streamed per second while decoding, GB/s.
    pub fn decode_gb_s(&self) -> f64 {
        self.weight_bytes_per_token as f64 * self.decode.mean / 1e9
    }
}

/// This machine's memory read bandwidth in GB/s: the best of three passes of all threads
/// summing a freshly written buffer of `bytes` (make it far larger than the caches). The
/// buffer is freed before returning.
pub fn read_bandwidth_gb_s(bytes: usize) -> f64 {
    const CHUNK: usize = 1 << 17; // 1 MiB of u64s per task
    let mut buf = vec![0u64; bytes / 8];
    buf.par_chunks_mut(CHUNK)
        .enumerate()
        .for_each(|(i, c)| c.iter_mut().for_each(|x| *x = i as u64));
    let mut best = f64::INFINITY;
    for _ in 0..3 {
        let t = Instant::now();
        let s: u64 = buf
            .par_chunks(CHUNK)
            .map(|c| c.iter().fold(0u64, |a, &x| a.wrapping_add(x)))
            .reduce(|| 0, u64::wrapping_add);
        std::hint::black_box(s);
        best = best.min(t.elapsed().as_secs_f64());
    }
    buf.len() as f64 * 8.0 / best / 1e9
}

/// A `kB` line of /proc/self/status in MB (Linux).
fn proc_status_mb(key: &str) -> Option<f64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with(key))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

/// Peak resident memory since the start or the last [`reset_peak_rss`], MB (Linux).
pub fn peak_rss_mb() -> Option<f64> {
    proc_status_mb("VmHWM:")
}

/// Reset the peak-resident counter (Linux ≥ 4.0).
pub fn reset_peak_rss() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::model::ModelOptions;

    #[test]
    fn bench_times_every_repeat_and_counts_the_weights() {
        let ck = crate::engine::checkpoint::load_or_default(None).unwrap();
        let model = Model::new(&ck, ModelOptions::default()).unwrap();
        let o = BenchOptions {
            prompt_tokens: 16,
            gen_tokens: 4,
            repeats: 2,
            seed: 1,
        };
        let r = bench(&model, &o).unwrap();
        assert_eq!((r.prompt_tokens, r.gen_tokens, r.repeats), (16, 4, 2));
        assert!(r.prefill.mean > 0.0 && r.decode.mean > 0.0);
        // The packed linears and the f32 head: 2 bits per weight plus scales, 4 bytes each.
        let packed: usize = ck.linears().map(|(_, _, l)| l.matrix.stored_bytes()).sum();
        assert_eq!(r.weight_bytes_per_token as usize, packed + 4 * 128 * 256);
        assert!(read_bandwidth_gb_s(1 << 24) > 0.0);
    }
}
