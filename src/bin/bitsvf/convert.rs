//! `bitsvf convert`: any supported model to the native format.

use anyhow::Result;
use bitsvf::engine::checkpoint;
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct Args {
    /// Model file or directory; default: the embedded model.
    model: Option<PathBuf>,
    /// Output .safetensors file.
    #[arg(long)]
    out: PathBuf,
}

pub fn run(a: Args) -> Result<()> {
    let ck = checkpoint::load_or_default(a.model.as_deref())?;
    checkpoint::save_native(&ck, &a.out)?;
    eprintln!(
        "wrote {} ({} → native, {} bytes)",
        a.out.display(),
        ck.format.name(),
        std::fs::metadata(&a.out).map(|m| m.len()).unwrap_or(0)
    );
    Ok(())
}
