//! `bitsvf mix`: a mixture of expert files as one expert file.

use crate::common::svd_cache;
use anyhow::Result;
use bitsvf::svf::expert::mixture_of_files;
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct Args {
    /// Expert files.
    #[arg(required = true)]
    experts: Vec<PathBuf>,
    /// Comma-separated mixture weights, one per expert.
    #[arg(long, value_delimiter = ',', required = true)]
    alpha: Vec<f64>,
    /// Base model the experts were trained on; default: the embedded model.
    #[arg(long)]
    model: Option<PathBuf>,
    /// Ternarize a float model's linears on load (BitNet b1.58's per-tensor absmean rule);
    /// without it a float model runs as float.
    #[arg(long)]
    ternarize: bool,
    /// Output expert file.
    #[arg(long)]
    out: PathBuf,
    /// SVD cache directory (default: $BITSVF_CACHE or ~/.cache/bitsvf).
    #[arg(long)]
    cache_dir: Option<PathBuf>,
}

pub fn run(a: Args) -> Result<()> {
    anyhow::ensure!(
        a.alpha.iter().all(|a| a.is_finite()),
        "--alpha: weights must be finite numbers"
    );
    let ck = crate::common::load_model(a.model.as_deref(), a.ternarize)?;
    let mixed = mixture_of_files(&ck, &a.experts, &a.alpha, &svd_cache(a.cache_dir))?;
    mixed.save(&a.out)?;
    println!("wrote {} ({})", a.out.display(), mixed.meta.name);
    Ok(())
}
