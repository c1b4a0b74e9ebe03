//! `bitsvf eval`: greedy accuracy per domain (or on a JSONL dataset), or the mixture figures
//! of a handoff directory measured again.

use crate::common::svd_cache;
use anyhow::Result;
use bitsvf::engine::chat::TemplateChoice;
use bitsvf::engine::model::{Model, ModelOptions};
use bitsvf::engine::{checkpoint, tokenizer};
use bitsvf::eval::{evaluate, evaluate_dataset, EvalSpec};
use bitsvf::pipeline::{self, Handoff};
use bitsvf::svf::attach;
use bitsvf::tasks::{Dataset, Domain, Split};
use std::path::{Path, PathBuf};

#[derive(clap::Args)]
pub struct Args {
    /// Model file or directory; default: the embedded model.
    model: Option<PathBuf>,
    /// Ternarize a float model's linears on load (BitNet b1.58's per-tensor absmean rule);
    /// without it a float model runs as float.
    #[arg(long)]
    ternarize: bool,
    /// Comma-separated domains (default: all).
    #[arg(long, value_delimiter = ',')]
    domains: Option<Vec<String>>,
    /// Items per domain (spread over difficulty levels 1–5).
    #[arg(long, default_value_t = 100)]
    n: usize,
    /// Seed of the item draw.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Held-out split.
    #[arg(long, value_enum, default_value = "test")]
    split: Split,
    /// Apply this SVF expert before evaluating.
    #[arg(long)]
    expert: Option<PathBuf>,
    /// SVD cache directory for --expert.
    #[arg(long)]
    cache_dir: Option<PathBuf>,
    /// Evaluate a user JSONL dataset ({"prompt", "answer", "domain"} per line) instead.
    #[arg(long, conflicts_with = "domains")]
    data: Option<PathBuf>,
    /// Re-measure the mixture α* of a `bitsvf run` handoff directory on its test items,
    /// full SVF and as deployed, beside the manifest's figures (fails if they differ).
    #[arg(long, conflicts_with_all = ["data", "expert", "model"])]
    mixture: Option<PathBuf>,
    /// Verifier of --data: exact, numeric[:TOL], choice:A,B or regex:PATTERN.
    #[arg(long, default_value = "exact", requires = "data")]
    verifier: String,
    /// Wrap the prompts of --data in a chat template as one user turn each: none, auto (the
    /// model's own, if it has one) or a Jinja FILE.
    #[arg(long, default_value = "none")]
    chat_template: TemplateChoice,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

pub fn run(a: Args) -> Result<()> {
    if let Some(dir) = &a.mixture {
        return mixture(dir, a.cache_dir, a.json);
    }
    let ck = crate::common::load_model(a.model.as_deref(), a.ternarize)?;
    let domains = Domain::list(a.domains.as_deref())?;
    let tok = tokenizer::for_model(a.model.as_deref(), &ck.config)?;
    let net = match &a.expert {
        Some(p) => attach::load_expert_model(&ck, p, &svd_cache(a.cache_dir))?,
        None => Model::new(&ck, ModelOptions::default())?,
    };
    let name = checkpoint::display_name(a.model.as_deref());
    let bar = indicatif::ProgressBar::new((a.n * domains.len()) as u64);
    let report = match &a.data {
        Some(path) => {
            let mut d = [Dataset::load_jsonl(path, a.verifier.parse()?)?];
            let (choice, model) = (&a.chat_template, a.model.as_deref());
            crate::common::wrap_in_chat_template(choice, model, tok.as_ref(), &mut d)?;
            let [dataset] = d;
            evaluate_dataset(&net, tok.as_ref(), &name, &dataset, a.n, a.split, |k| {
                bar.inc(k as u64)
            })?
        }
        None => {
            let spec = EvalSpec {
                domains,
                n: a.n,
                seed: a.seed,
                split: a.split,
            };
            evaluate(&net, tok.as_ref(), &name, &spec, |k| bar.inc(k as u64))?
        }
    };
    bar.finish_and_clear();
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", report.to_text());
    }
    Ok(())
}

/// `--mixture DIR`: the manifest's mixture figures measured again; an error if any differs.
fn mixture(dir: &Path, cache_dir: Option<PathBuf>, json: bool) -> Result<()> {
    let h = Handoff::open(dir)?;
    let tok = tokenizer::for_model(Some(&dir.join("model")), &h.ck.config)?;
    let bar = indicatif::ProgressBar::new(0);
    let rows = pipeline::reproduce(&h, tok.as_ref(), &svd_cache(cache_dir), |i, n| {
        bar.set_length(n as u64);
        bar.set_position(i as u64);
    })?;
    bar.finish_and_clear();
    if json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
    } else {
        print!("{}", pipeline::reproduced_table(&rows));
    }
    let differ = rows.iter().filter(|r| r.manifest != r.measured).count();
    anyhow::ensure!(
        differ == 0,
        "{differ} of {} figures differ from the manifest",
        rows.len()
    );
    eprintln!(
        "all {} mixture figures of the manifest reproduced",
        rows.len()
    );
    Ok(())
}
