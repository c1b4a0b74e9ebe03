//! What several commands share: the progress bar of a training loop, the SVD cache and the
//! probe set of a check.

use bitsvf::engine::chat::{self, TemplateChoice};
use bitsvf::engine::checkpoint::{self, Checkpoint};
use bitsvf::engine::tokenizer::Tokenizer;
use bitsvf::svf::svd::SvdCache;
use bitsvf::tasks::Dataset;
use std::path::{Path, PathBuf};

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

/// The random probe set of a check (`dequantize --verify`, `inspect --head`): token rows drawn
/// uniformly from the vocabulary, seeded.
#[derive(clap::Args)]
pub struct ProbeArgs {
    /// Probe rows (1 to 65536).
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..=65536))]
    pub probe_rows: u32,
    /// Probe tokens per row (capped by the model's context).
    #[arg(long, default_value_t = 64)]
    pub probe_len: usize,
    /// Seed of the probe set.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

/// `--chat-template` of the commands that read JSONL datasets: every prompt of `datasets`
/// becomes one user turn of the template `choice` names for `model` (`auto` without a
/// template in the model leaves them as they are, and says so).
pub fn wrap_in_chat_template(
    choice: &TemplateChoice,
    model: Option<&Path>,
    tok: &dyn Tokenizer,
    datasets: &mut [Dataset],
) -> anyhow::Result<()> {
    if *choice == TemplateChoice::None || datasets.is_empty() {
        return Ok(());
    }
    let Some(template) = chat::choose(choice, model, tok)? else {
        eprintln!("--chat-template auto: the model has no chat template; prompts stay as they are");
        return Ok(());
    };
    for d in datasets.iter_mut() {
        for item in &mut d.items {
            item.prompt = template.wrap(&item.prompt)?;
        }
    }
    eprintln!(
        "prompts wrapped in the chat template of {}",
        template.origin
    );
    Ok(())
}

/// The model at `path` (default: the embedded model), with its float linears ternarized when
/// `ternarize` (a note on stderr says so).
pub fn load_model(path: Option<&Path>, ternarize: bool) -> anyhow::Result<Checkpoint> {
    let ck = checkpoint::load_or_default(path)?;
    if !ternarize || ck.is_ternary() {
        return Ok(ck);
    }
    eprintln!(
        "ternarizing the float ({}) linears: per-tensor absmean, int8 activations",
        ck.linear_dtypes()
    );
    Ok(ck.ternarized())
}
