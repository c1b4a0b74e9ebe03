//! `bitsvf dequantize`: the f32 model W = γ·W_t, optionally verified first.

use anyhow::{Context, Result};
use bitsvf::engine::checkpoint;
use bitsvf::eval::recovery;
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct Args {
    /// Model file or directory; default: the embedded model.
    model: Option<PathBuf>,
    /// Ternarize a float model's linears on load (BitNet b1.58's per-tensor absmean rule);
    /// without it a float model runs as float.
    #[arg(long)]
    ternarize: bool,
    /// Output directory (model.safetensors + config.json).
    #[arg(long)]
    out: PathBuf,
    /// Check exactness per matrix and argmax agreement ternary-vs-float (fails below 99%).
    #[arg(long)]
    verify: bool,
    #[command(flatten)]
    probe: crate::common::ProbeArgs,
    /// Replace a non-empty output directory.
    #[arg(long)]
    force: bool,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

pub fn run(a: Args) -> Result<()> {
    let ck = crate::common::load_model(a.model.as_deref(), a.ternarize)?;
    if a.verify {
        let r = recovery::verify_random(
            &ck,
            a.probe.probe_rows as usize,
            a.probe.probe_len,
            a.probe.seed,
        )?;
        if a.json {
            println!("{}", serde_json::to_string_pretty(&r)?);
        } else {
            print!("{}", r.to_text());
        }
        // Fail loudly and write nothing when the recovery is not faithful.
        r.check()?;
    }
    checkpoint::save_dequantized(&ck, &a.out, a.force)
        .with_context(|| format!("writing the dequantized model to {}", a.out.display()))?;
    eprintln!("wrote dequantized f32 model to {}", a.out.display());
    Ok(())
}
