//! `bitsvf bench`: prefill and decode speed, memory and bandwidth use of a model at its real
//! size, as ternary (packed 2-bit kernels) and as dense f32, for comparison with llama.cpp's
//! `llama-bench` on the same machine.

use anyhow::Result;
use bitsvf::engine::model::{HeadFormat, Model, ModelOptions, WeightMode};
use bitsvf::eval::bench::{self, BenchOptions};
use std::path::PathBuf;
use std::time::Instant;

#[derive(clap::Args)]
pub struct Args {
    /// Model file or directory; default: the embedded model.
    model: Option<PathBuf>,
    /// Ternarize a float model's linears on load (BitNet b1.58's per-tensor absmean rule);
    /// without it a float model runs as float.
    #[arg(long)]
    ternarize: bool,
    /// Prompt tokens (random ids) per repeat.
    #[arg(long, default_value_t = 64)]
    prompt_tokens: usize,
    /// Tokens decoded greedily after the prompt.
    #[arg(long, default_value_t = 32)]
    gen_tokens: usize,
    /// Timed repeats (after one untimed warm-up).
    #[arg(long, default_value_t = 3)]
    repeats: usize,
    /// Weight modes to measure, one after the other (dense holds every linear as f32: 4
    /// bytes per weight).
    #[arg(long, value_enum, value_delimiter = ',', default_value = "ternary")]
    mode: Vec<WeightMode>,
    /// How the output head is held.
    #[arg(long, value_enum, default_value = "stored")]
    head: HeadFormat,
    /// MB read by the memory bandwidth probe (far more than the CPU's caches; 1 to 65536).
    #[arg(long, default_value_t = 1024, value_parser = clap::value_parser!(u32).range(1..=65536))]
    bandwidth_mb: u32,
    /// Seed of the prompt ids.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Print JSON lines instead of text.
    #[arg(long)]
    json: bool,
}

pub fn run(a: Args) -> Result<()> {
    // The bandwidth probe first, and the peak counter reset after it, so that the memory
    // figures are the model's alone.
    let bandwidth = bench::read_bandwidth_gb_s((a.bandwidth_mb as usize) << 20);
    bench::reset_peak_rss();
    let t = Instant::now();
    let ck = crate::common::load_model(a.model.as_deref(), a.ternarize)?;
    let load = t.elapsed().as_secs_f64();
    let options = BenchOptions {
        prompt_tokens: a.prompt_tokens,
        gen_tokens: a.gen_tokens,
        repeats: a.repeats.max(1),
        seed: a.seed,
    };
    if !a.json {
        println!(
            "model {} (load {load:.2} s); memory read bandwidth {bandwidth:.1} GB/s; {} threads",
            a.model
                .as_deref()
                .map_or("<default model>".into(), |p| p.display().to_string()),
            rayon::current_num_threads()
        );
        println!(
            "| mode | head | build s | pp{} tok/s | tg{} tok/s | weights/token | decode GB/s (share) | resident MB | peak MB |",
            options.prompt_tokens, options.gen_tokens
        );
        println!("|---|---|---|---|---|---|---|---|---|");
    }
    for mode in a.mode {
        bench::reset_peak_rss();
        let t = Instant::now();
        let model_options = ModelOptions {
            mode,
            head: a.head,
            ..Default::default()
        };
        let model = Model::new(&ck, model_options)?;
        let build = t.elapsed().as_secs_f64();
        let r = bench::bench(&model, &options)?;
        let gb_s = r.decode_gb_s();
        if a.json {
            let mut v = serde_json::to_value(&r)?;
            v["mode"] = mode.name().into();
            v["head"] = model.head_dtype().into();
            v["build_seconds"] = build.into();
            v["load_seconds"] = load.into();
            v["read_bandwidth_gb_s"] = bandwidth.into();
            println!("{v}");
            continue;
        }
        let mb = |m: Option<f64>| m.map_or("-".into(), |m| format!("{m:.0}"));
        println!(
            "| {} | {} | {build:.2} | {:.2} ± {:.2} | {:.2} ± {:.2} | {:.1} MB | {gb_s:.1} ({:.0}%) | {} | {} |",
            mode.name(),
            model.head_dtype(),
            r.prefill.mean,
            r.prefill.sd,
            r.decode.mean,
            r.decode.sd,
            r.weight_bytes_per_token as f64 / 1e6,
            100.0 * gb_s / bandwidth,
            mb(r.resident_mb),
            mb(r.peak_mb),
        );
    }
    Ok(())
}
