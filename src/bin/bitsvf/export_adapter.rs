//! `bitsvf export-adapter`: an SVF expert as a LoRA adapter for PEFT or llama.cpp.

use crate::common::svd_cache;
use anyhow::{Context, Result};
use bitsvf::engine::checkpoint::{self, gguf_architecture, Checkpoint};
use bitsvf::pipeline::Handoff;
use bitsvf::svf::base::Base;
use bitsvf::svf::expert::{mixture, Expert};
use bitsvf::svf::lora::expert_lora;
use std::path::PathBuf;

/// The adapter formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// A PEFT LoRA directory (adapter_config.json + adapter_model.safetensors).
    Peft,
    /// A llama.cpp GGUF LoRA adapter (`--lora` of llama-cli / llama-server).
    GgufLora,
}

#[derive(clap::Args)]
pub struct Args {
    /// An expert file, or a handoff directory of `bitsvf run` (then --expert names one).
    expert: PathBuf,
    /// In a handoff: the expert's name, or `mixture` for the handed-off mixture.
    #[arg(long)]
    name: Option<String>,
    /// Base model of an expert file (default: the embedded model).
    #[arg(long)]
    model: Option<PathBuf>,
    /// Adapter format.
    #[arg(long, value_enum)]
    format: Format,
    /// LoRA rank (default: the exact rank, the most non-zero singular-value changes of any
    /// target); fewer keep the largest changes, and the share of the delta's energy kept is
    /// printed.
    #[arg(long)]
    rank: Option<usize>,
    /// Output: a directory (peft) or a file (gguf-lora); it must not exist.
    #[arg(long)]
    out: PathBuf,
    /// SVD cache directory (default: $BITSVF_CACHE or ~/.cache/bitsvf).
    #[arg(long)]
    cache_dir: Option<PathBuf>,
}

pub fn run(a: Args) -> Result<()> {
    anyhow::ensure!(a.rank != Some(0), "--rank must be at least 1");
    anyhow::ensure!(
        !a.out.exists(),
        "{} already exists; bitsvf writes an adapter only to a new path",
        a.out.display()
    );
    let cache = svd_cache(a.cache_dir.clone());
    let (ck, expert, base_name): (Checkpoint, Expert, String) =
        if a.expert.join("manifest.json").is_file() {
            let h = Handoff::open(&a.expert)?;
            let name = a.name.clone().with_context(|| {
                let names: Vec<String> =
                    h.manifest.experts.iter().map(|e| e.name.clone()).collect();
                format!(
                    "{} is a handoff: say which expert with --name ({} or mixture)",
                    a.expert.display(),
                    names.join(", ")
                )
            })?;
            let expert = if name == "mixture" {
                let m = h
                    .mixture()?
                    .with_context(|| format!("{} handed off no mixture", a.expert.display()))?;
                let svd = h.base(&cache).factors(m.experts[0].meta.targets)?;
                let refs: Vec<&Expert> = m.experts.iter().collect();
                let mut e = mixture(&refs, &m.alpha, &svd.svd)?;
                e.meta.name = "mixture".into();
                e
            } else {
                (h.experts()?.into_iter())
                    .find(|e| e.meta.name == name)
                    .with_context(|| format!("{} has no expert `{name}`", a.expert.display()))?
            };
            let base_name = h.manifest.base_model.name.clone();
            (h.ck, expert, base_name)
        } else {
            anyhow::ensure!(a.name.is_none(), "--name is for a handoff directory");
            let ck = checkpoint::load_or_default(a.model.as_deref())?;
            let e = Expert::load_for(&a.expert, &ck)?;
            let base_name = a
                .model
                .as_ref()
                .map_or("bitsvf default model".to_string(), |m| {
                    m.display().to_string()
                });
            (ck, e, base_name)
        };
    let base = Base::new(&ck, &cache);
    let svd = base.factors(expert.meta.targets)?;
    let lora = expert_lora(&expert, &svd.svd, ck.layers.len(), a.rank)?;
    match a.format {
        Format::Peft => lora.write_peft(&a.out, Some(&base_name))?,
        Format::GgufLora => lora.write_gguf(&a.out, gguf_architecture(&ck), &ck.config)?,
    }
    let params: usize = (lora.targets.iter())
        .map(|t| lora.rank * (t.rows + t.cols))
        .sum();
    println!(
        "wrote {} ({:?}): expert `{}` as a rank-{} LoRA on {} matrices, {} parameters; it keeps \
         {:.2}% of the expert's delta energy (exact at rank {})",
        a.out.display(),
        a.format,
        lora.name,
        lora.rank,
        lora.targets.len(),
        params,
        100.0 * lora.energy_kept,
        lora.exact_rank
    );
    Ok(())
}
