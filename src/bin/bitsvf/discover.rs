//! `bitsvf discover`: stage 1 on its own — which experts to train.

use crate::common::{step_bar, svd_cache};
use anyhow::Result;
use bitsvf::adapt::discover::{discover_domains, GroupRule};
use bitsvf::engine::tokenizer;
use bitsvf::tasks::Domain;
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct Args {
    /// Base model; default: the embedded model.
    model: Option<PathBuf>,
    /// Ternarize a float model's linears on load (BitNet b1.58's per-tensor absmean rule);
    /// without it a float model runs as float.
    #[arg(long)]
    ternarize: bool,
    /// Validation items per domain for the capability report.
    #[arg(long, default_value_t = 200)]
    n: usize,
    /// Training items per domain for the gradient direction.
    #[arg(long, default_value_t = 64)]
    grad_items: usize,
    /// Merge domains whose gradient directions have at least this average cosine.
    #[arg(long, default_value_t = 0.5)]
    threshold: f64,
    /// SVD cache directory (default: $BITSVF_CACHE or ~/.cache/bitsvf).
    #[arg(long)]
    cache_dir: Option<PathBuf>,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

pub fn run(a: Args) -> Result<()> {
    anyhow::ensure!(
        a.n > 0 && a.grad_items > 0,
        "--n and --grad-items must be positive"
    );
    let ck = crate::common::load_model(a.model.as_deref(), a.ternarize)?;
    let tok = tokenizer::for_model(a.model.as_deref(), &ck.config)?;
    let rule = GroupRule {
        threshold: a.threshold,
        ..Default::default()
    };
    let bar = step_bar(Domain::ALL.len())?;
    let found = discover_domains(
        &ck,
        tok.as_ref(),
        &svd_cache(a.cache_dir),
        a.n,
        a.grad_items,
        rule,
        |i, name| {
            bar.set_position(i as u64);
            bar.set_message(format!("measuring {name}"));
        },
    )?;
    bar.finish_and_clear();
    if a.json {
        println!("{}", serde_json::to_string_pretty(&found.to_json())?);
    } else {
        print!("{}", found.to_text());
    }
    Ok(())
}
