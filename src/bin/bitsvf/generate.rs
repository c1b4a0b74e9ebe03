//! `bitsvf generate`: two-pass inference with the experts of a handoff directory.

use crate::common::svd_cache;
use anyhow::Result;
use bitsvf::adapt::dispatch::{Library, Strategy};
use bitsvf::adapt::two_pass::{pass1, pass2};
use bitsvf::engine::{checkpoint, tokenizer};
use bitsvf::pipeline::Handoff;
use bitsvf::tasks::Dataset;
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct Args {
    /// The base model (default: the handoff's `model/`); it must be the model the experts
    /// were trained on.
    model: Option<PathBuf>,
    /// Handoff directory of `bitsvf run` (its experts, classifier and base model).
    #[arg(long)]
    experts: PathBuf,
    /// The prompt.
    #[arg(long)]
    prompt: String,
    /// How pass 1 chooses: prompt (the model labels its own prompt), classifier (the
    /// classifier expert labels it), cem (α fitted on --shots), none (base model).
    #[arg(long, default_value = "classifier")]
    dispatch: String,
    /// Labelled examples for --dispatch cem: JSONL lines {"prompt", "answer"}.
    #[arg(long)]
    shots: Option<PathBuf>,
    /// Most new tokens.
    #[arg(long, default_value_t = 32)]
    max_tokens: usize,
    /// Sampling temperature (0 = greedy).
    #[arg(long, default_value_t = 0.0)]
    temperature: f64,
    /// Sampling seed.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// SVD cache directory (default: $BITSVF_CACHE or ~/.cache/bitsvf).
    #[arg(long)]
    cache_dir: Option<PathBuf>,
}

pub fn run(a: Args) -> Result<()> {
    let strategy: Strategy = a.dispatch.parse()?;
    let h = Handoff::open(&a.experts)?;
    if let Some(m) = &a.model {
        checkpoint::load(m)?.check_is_base_of(m, &h.ck, &a.experts)?;
    }
    let model_dir = a.model.unwrap_or_else(|| a.experts.join("model"));
    let tok = tokenizer::for_model(Some(&model_dir), &h.ck.config)?;
    let cache = svd_cache(a.cache_dir);
    let classifier = h.classifier()?;
    let mut lib = Library::new(&h.ck, h.experts()?, classifier.as_ref(), &cache)?;
    let alpha = match (strategy, &a.shots) {
        (Strategy::Cem, Some(path)) => {
            let shots = Dataset::load_jsonl(path, "exact".parse()?)?;
            let fit = lib
                .mixer
                .fit_cem(tok.as_ref(), &shots.items, &h.manifest.options.cem)?;
            Some(fit.best)
        }
        (Strategy::Cem, None) => {
            anyhow::bail!("--dispatch cem needs --shots FILE.jsonl (labelled examples)")
        }
        _ => None,
    };
    let (model, chosen) = pass1(
        &mut lib,
        tok.as_ref(),
        strategy,
        &a.prompt,
        alpha.as_deref(),
    )?;
    eprintln!("{chosen}");
    let answer = pass2(
        model,
        tok.as_ref(),
        &a.prompt,
        a.max_tokens,
        a.temperature,
        a.seed,
    )?;
    println!("{answer}");
    Ok(())
}
