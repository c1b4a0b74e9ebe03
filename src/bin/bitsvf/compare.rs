//! `bitsvf compare-options`: the seed's integration options side by side.

use crate::common::{step_bar, svd_cache};
use anyhow::Result;
use bitsvf::engine::tokenizer;
use bitsvf::pipeline::compare::{compare_options, CompareConfig, Event};
use bitsvf::tasks::Domain;
use bitsvf::train::DEFAULT_RANK;
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct Args {
    /// Base model; default: the embedded model.
    model: Option<PathBuf>,
    /// Ternarize a float model's linears on load (BitNet b1.58's per-tensor absmean rule);
    /// without it a float model runs as float.
    #[arg(long)]
    ternarize: bool,
    /// Comma-separated domains, one expert each.
    #[arg(long, default_value = "count,sort,compare")]
    domains: String,
    /// Held-out test items per domain.
    #[arg(long)]
    n: Option<usize>,
    /// Directory of experts `<parameterization>_<domain>.safetensors`; missing ones are
    /// trained there with the default settings (default: compare-options/experts, or
    /// compare-options/experts-quick with --quick).
    #[arg(long)]
    experts: Option<PathBuf>,
    /// Small and fast: the first domain only, 40 items, 20 training steps.
    #[arg(long)]
    quick: bool,
    /// Training steps per expert (default: the trainer's default, 20 with --quick).
    #[arg(long)]
    steps: Option<usize>,
    /// Width k of the hybrid low-rank experts.
    #[arg(long, default_value_t = DEFAULT_RANK)]
    rank: usize,
    /// SVD cache directory (default: $BITSVF_CACHE or ~/.cache/bitsvf).
    #[arg(long)]
    cache_dir: Option<PathBuf>,
    /// Print `{"options": [{"name", "accuracy", "bytes", "tokens_per_s", …}]}`.
    #[arg(long)]
    json: bool,
}

pub fn run(a: Args) -> Result<()> {
    anyhow::ensure!(a.rank > 0, "--rank must be positive");
    let ck = crate::common::load_model(a.model.as_deref(), a.ternarize)?;
    let tok = tokenizer::for_model(a.model.as_deref(), &ck.config)?;
    let cfg = config(&a)?;
    let cache = svd_cache(a.cache_dir);
    let bar = step_bar(cfg.train.steps)?;
    let report = compare_options(&ck, tok.as_ref(), &cfg, &cache, |e| match e {
        Event::Training(param, domain, step, steps) => {
            bar.set_length(steps as u64);
            bar.set_position(step as u64);
            bar.set_message(format!("training {param} expert for {domain}"));
        }
        Event::Evaluating(what) => {
            bar.set_message(format!("evaluating {what}"));
        }
    })?;
    bar.finish_and_clear();
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", report.markdown());
        println!(
            "f32 model: {:.2} MB; experts in {}",
            report.f32_bytes as f64 / 1e6,
            cfg.experts_dir.display()
        );
    }
    Ok(())
}

/// The comparison's settings ([`CompareConfig::preset`]) from the flags.
fn config(a: &Args) -> Result<CompareConfig> {
    let names: Vec<&str> = a.domains.split(',').collect();
    let domains = Domain::list(Some(&names))?;
    Ok(CompareConfig::preset(
        a.quick,
        domains,
        a.rank,
        a.steps,
        a.n,
        a.experts.clone(),
    )?)
}
