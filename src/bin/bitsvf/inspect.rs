//! `bitsvf inspect`: a model's report, or a handoff directory's summary.

use anyhow::Result;
use bitsvf::engine::{checkpoint, inspect};
use bitsvf::pipeline::Handoff;
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct Args {
    /// Model file or directory (any supported format), or a handoff directory; default: the
    /// embedded model.
    model: Option<PathBuf>,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
}

pub fn run(a: Args) -> Result<()> {
    if let Some(dir) = a
        .model
        .as_deref()
        .filter(|m| m.join("manifest.json").is_file())
    {
        let h = Handoff::open(dir)?;
        if a.json {
            println!("{}", serde_json::to_string_pretty(&h.manifest)?);
        } else {
            print!("{}", h.summary()?);
        }
        return Ok(());
    }
    let report = inspect::inspect(&checkpoint::load_or_default(a.model.as_deref())?);
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", report.to_text());
    }
    Ok(())
}
