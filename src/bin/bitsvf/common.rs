//! What several commands share: the progress bar of a training loop and the SVD cache.

use bitsvf::svf::svd::SvdCache;
use std::path::PathBuf;

/// The progress bar of a training loop of `steps` optimizer steps.
pub fn step_bar(steps: usize) -> anyhow::Result<indicatif::ProgressBar> {
    Ok(indicatif::ProgressBar::new(steps as u64).with_style(
        indicatif::ProgressStyle::with_template(
            "{elapsed_precise} [{bar:30}] {pos}/{len} steps, eta {eta} {msg}",
        )?,
    ))
}

/// The SVD cache in `--cache-dir`, else in $BITSVF_CACHE or ~/.cache/bitsvf.
pub fn svd_cache(dir: Option<PathBuf>) -> SvdCache {
    SvdCache::new(dir.unwrap_or_else(SvdCache::default_dir))
}
