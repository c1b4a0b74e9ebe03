//! `bitsvf train`: one SVF expert on a domain or a JSONL dataset.

use crate::common::{step_bar, svd_cache};
use anyhow::Result;
use bitsvf::engine::chat::TemplateChoice;
use bitsvf::engine::tokenizer;
use bitsvf::svf::factors::FactorsReport;
use bitsvf::svf::{Base, Parameterization};
use bitsvf::tasks::{DataSource, Dataset, Domain};
use bitsvf::train::expert::{factors_for, train_expert_planned, training_plan};
use bitsvf::train::{Objective, TrainBase, TrainConfig, TrainOverrides, DEFAULT_RANK};
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct Args {
    /// Base model; default: the embedded model.
    model: Option<PathBuf>,
    /// Ternarize a float model's linears on load (BitNet b1.58's per-tensor absmean rule);
    /// without it a float model runs as float.
    #[arg(long)]
    ternarize: bool,
    /// Built-in domain to specialise on.
    #[arg(long, required_unless_present = "data", conflicts_with = "data")]
    domain: Option<String>,
    /// User JSONL dataset instead of a domain.
    #[arg(long)]
    data: Option<PathBuf>,
    /// Verifier of --data.
    #[arg(long, default_value = "exact")]
    verifier: String,
    /// Wrap the prompts of --data in a chat template as one user turn each: none, auto (the
    /// model's own, if it has one) or a Jinja FILE.
    #[arg(long, default_value = "none")]
    chat_template: TemplateChoice,
    /// Output expert file.
    #[arg(long)]
    out: PathBuf,
    /// Objective.
    #[arg(long, value_enum, default_value = "sft")]
    objective: Objective,
    /// z parameterization.
    #[arg(long, value_enum, default_value = "paper")]
    parameterization: Parameterization,
    /// Width k of the low-rank parameterization (top-k singular directions).
    #[arg(long, default_value_t = DEFAULT_RANK)]
    rank: usize,
    /// Where the base weights live while training: dense f32 with full SVD factors, packed
    /// ternary with the top-k factors (low-rank only; for models whose dense form does not
    /// fit), or auto (packed when the dense form would take over half the free memory).
    #[arg(long, value_enum, default_value = "auto")]
    base: TrainBase,
    /// Prompts per forward/backward pass: the step's gradient is accumulated over
    /// batch-prompts / micro-batch passes, trading time for activation memory (SFT).
    #[arg(long)]
    micro_batch: Option<usize>,
    /// Longest training sequence in tokens; longer ones are cut, the answer's tail first.
    #[arg(long)]
    max_seq: Option<usize>,
    /// Activation checkpointing: keep each block's input only and recompute the block in
    /// the backward pass (about one more forward's time; SFT).
    #[arg(long)]
    checkpoint_activations: bool,
    /// Target matrices: mlp, attn or all.
    #[arg(long, default_value = "mlp")]
    targets: String,
    /// Most optimizer steps.
    #[arg(long)]
    steps: Option<usize>,
    /// KL coefficient λ.
    #[arg(long)]
    kl_coeff: Option<f64>,
    /// Learning rate.
    #[arg(long)]
    lr: Option<f64>,
    /// Keep the learning rate constant (default: cosine decay to 10%).
    #[arg(long)]
    constant_lr: bool,
    /// REINFORCE without the per-prompt mean-reward baseline.
    #[arg(long)]
    no_baseline: bool,
    /// Prompts per optimizer step.
    #[arg(long)]
    batch_prompts: Option<usize>,
    /// Sampled completions per prompt (REINFORCE).
    #[arg(long)]
    samples: Option<usize>,
    /// Validate every this many steps.
    #[arg(long)]
    eval_every: Option<usize>,
    /// Validation items.
    #[arg(long)]
    val_n: Option<usize>,
    /// Stop after this many validations without improvement.
    #[arg(long)]
    patience: Option<usize>,
    /// Seed.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// SVD cache directory (default: $BITSVF_CACHE or ~/.cache/bitsvf).
    #[arg(long)]
    cache_dir: Option<PathBuf>,
    /// Continue an interrupted run.
    #[arg(long)]
    resume: bool,
    /// Print the summary as JSON.
    #[arg(long)]
    json: bool,
}

pub fn run(a: Args) -> Result<()> {
    let ck = crate::common::load_model(a.model.as_deref(), a.ternarize)?;
    let tok = tokenizer::for_model(a.model.as_deref(), &ck.config)?;
    let data = match (&a.domain, &a.data) {
        (Some(d), _) => DataSource::Domain(Domain::by_name(d)?),
        (None, Some(p)) => {
            let mut d = [Dataset::load_jsonl(p, a.verifier.parse()?)?];
            let (choice, model) = (&a.chat_template, a.model.as_deref());
            crate::common::wrap_in_chat_template(choice, model, tok.as_ref(), &mut d)?;
            let [d] = d;
            DataSource::Dataset(d)
        }
        (None, None) => anyhow::bail!("give --domain or --data"),
    };
    let mut cfg = TrainConfig {
        parameterization: a.parameterization,
        rank: a.rank,
        targets: a.targets.parse()?,
        cosine: !a.constant_lr,
        baseline: !a.no_baseline,
        seed: a.seed,
        base: a.base,
        micro_batch: a.micro_batch,
        max_seq: a.max_seq,
        checkpoint_activations: a.checkpoint_activations,
        ..TrainConfig::for_objective(a.objective)
    };
    cfg.apply(&TrainOverrides {
        steps: a.steps,
        kl_coeff: a.kl_coeff,
        lr: a.lr,
        batch_prompts: a.batch_prompts,
        samples: a.samples,
        eval_every: a.eval_every,
        val_n: a.val_n,
        patience: a.patience,
    })?;
    let cache = svd_cache(a.cache_dir);
    anyhow::ensure!(a.rank > 0, "--rank must be positive");
    let plan = training_plan(&ck, tok.as_ref(), &data, &cfg)?;
    if !a.json {
        println!("{plan}");
    }
    let base = Base::new(&ck, &cache);
    let bar = indicatif::ProgressBar::new(0).with_style(indicatif::ProgressStyle::with_template(
        "{elapsed_precise} [{bar:30}] {pos}/{len} matrices, eta {eta} {msg}",
    )?);
    let factors = factors_for(&base, &cfg, &plan, |done, total| {
        bar.set_length(total as u64);
        bar.set_position(done as u64);
        bar.set_message(format!("top-{} SVD of the targets", cfg.rank));
    })?;
    bar.finish_and_clear();
    let svd = factors.map_or_else(FactorsReport::default, |f| FactorsReport::from(&*f));
    if !a.json && cfg.parameterization.uses_svd() {
        println!("{svd}");
    }
    let bar = step_bar(cfg.steps)?;
    let summary = train_expert_planned(
        &base,
        tok.as_ref(),
        &data,
        &cfg,
        &plan,
        &a.out,
        a.resume,
        |step, s| {
            bar.set_position(step as u64);
            bar.set_message(format!("reward {:+.2} kl {:.3}", s.reward, s.kl));
            true
        },
    )?;
    bar.finish_and_clear();
    if a.json {
        let mut v = serde_json::to_value(&summary)?;
        v["svd"] = serde_json::to_value(svd)?;
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        println!("{}", summary.to_text(&a.out));
    }
    Ok(())
}
