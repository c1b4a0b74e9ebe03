//! `bitsvf pretrain`: train the default model from scratch.

use crate::common::step_bar;
use anyhow::Result;
use bitsvf::train::pretrain::{pretrain, PretrainConfig};
use bitsvf::train::PretrainOverrides;
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct Args {
    /// Output native model file.
    #[arg(long, default_value = "models/default.safetensors")]
    out: PathBuf,
    /// Optimizer steps.
    #[arg(long)]
    steps: Option<usize>,
    /// Sequences per step.
    #[arg(long)]
    batch_size: Option<usize>,
    /// Peak learning rate.
    #[arg(long)]
    lr: Option<f64>,
    /// Seed of init and data.
    #[arg(long)]
    seed: Option<u64>,
    /// Model width (d); FFN is 2.5·d.
    #[arg(long)]
    hidden: Option<usize>,
    /// Decoder layers.
    #[arg(long)]
    layers: Option<usize>,
    /// Continue an interrupted run from its saved state.
    #[arg(long)]
    resume: bool,
    /// Print the summary as JSON.
    #[arg(long)]
    json: bool,
}

pub fn run(a: Args) -> Result<()> {
    let mut cfg = PretrainConfig::default();
    cfg.apply(&PretrainOverrides {
        steps: a.steps,
        batch_size: a.batch_size,
        lr: a.lr,
        seed: a.seed,
        hidden: a.hidden,
        layers: a.layers,
    });
    let bar = step_bar(cfg.steps)?;
    let summary = pretrain(&cfg, &a.out, a.resume, |step, loss, lr| {
        bar.set_position(step as u64);
        bar.set_message(format!("loss {loss:.3} lr {lr:.2e}"));
        true
    })?;
    bar.finish();
    if a.json {
        println!("{}", serde_json::to_string_pretty(&summary)?);
    } else {
        println!("{}", summary.to_text(&a.out));
    }
    Ok(())
}
