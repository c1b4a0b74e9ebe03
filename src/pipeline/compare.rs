//! `bitsvf compare-options`: the seed's integration options measured side by side
//! (DESIGN.md §5). For every option it trains (or reuses) one expert per domain with that
//! option's parameterization, deploys them together ([`Deployment`]) and measures accuracy on
//! each expert's own held-out domain, resident bytes, decode speed and the cost of switching
//! experts. Experts are saved as `<parameterization>_<domain>.safetensors` in the experts
//! directory, so an interrupted or repeated comparison reuses what is done.

use crate::engine::checkpoint::Checkpoint;
use crate::engine::model::{Model, ModelOptions, WeightMode};
use crate::engine::tokenizer::Tokenizer;
use crate::error::{Error, Result};
use crate::eval::score_items;
use crate::eval::speed::decode_speed;
use crate::eval::speed::median;
use crate::svf::attach::adapted_model;
use crate::svf::base::Base;
use crate::svf::deploy::{f32_bytes, packed_bytes, DeployOption, Deployment};
use crate::svf::expert::{mixture, Expert};
use crate::svf::svd::SvdCache;
use crate::tasks::eval_items;
use crate::tasks::DataSource;
use crate::tasks::{Domain, Item, Split};
use crate::train::{train_expert, TrainConfig};
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Instant;

/// What to compare and how hard.
#[derive(Debug, Clone)]
pub struct CompareConfig {
    /// The experts' domains (one expert per domain and option).
    pub domains: Vec<Domain>,
    /// Held-out test items per domain.
    pub n: usize,
    /// Training settings (the parameterization is set per option).
    pub train: TrainConfig,
    /// Where experts are read from and trained into.
    pub experts_dir: PathBuf,
    /// New tokens per decode-speed run, and runs.
    pub decode_tokens: usize,
    /// Decode-speed runs (the median is reported).
    pub decode_runs: usize,
    /// Seed of the evaluation draw.
    pub seed: u64,
}

impl CompareConfig {
    /// The full comparison, or the quick one (the first domain, 40 items, the trainer's quick
    /// settings), with `rank`, and `steps`, `n` and `experts_dir` where given.
    pub fn preset(
        quick: bool,
        mut domains: Vec<Domain>,
        rank: usize,
        steps: Option<usize>,
        n: Option<usize>,
        experts_dir: Option<PathBuf>,
    ) -> Result<CompareConfig> {
        if domains.is_empty() {
            return Err(Error::Input("--domains is empty".into()));
        }
        let mut train = TrainConfig {
            rank,
            ..TrainConfig::default()
        };
        if quick {
            domains.truncate(1);
            train = train.quick();
        }
        if let Some(s) = steps {
            train.steps = s;
        }
        train.validate("compare-options settings")?;
        Ok(CompareConfig {
            domains,
            n: n.unwrap_or(if quick { 40 } else { 500 }),
            train,
            experts_dir: experts_dir.unwrap_or_else(|| {
                PathBuf::from(if quick {
                    "compare-options/experts-quick"
                } else {
                    "compare-options/experts"
                })
            }),
            decode_tokens: if quick { 32 } else { 96 },
            decode_runs: if quick { 3 } else { 7 },
            seed: 0,
        })
    }
}

/// One option's measurements.
#[derive(Debug, Clone, Serialize)]
pub struct OptionResult {
    /// Option name.
    pub name: String,
    /// Mean accuracy of each expert on its own domain.
    pub accuracy: f64,
    /// Accuracy per domain.
    pub per_domain: BTreeMap<String, f64>,
    /// Resident bytes of the base and all experts as deployed.
    pub bytes: usize,
    /// `bytes` over the f32 model's bytes.
    pub bytes_vs_f32: f64,
    /// Greedy decode speed with one expert applied, tokens per second (median of runs).
    pub tokens_per_s: f64,
    /// Median time to switch the running model to another expert, milliseconds.
    pub switch_ms: f64,
    /// Time to build the deployment from the base and the expert files, seconds.
    pub prepare_s: f64,
    /// The expert files used.
    pub experts: Vec<PathBuf>,
}

/// The comparison.
#[derive(Debug, Clone, Serialize)]
pub struct CompareReport {
    /// The packed base model without experts (ternary kernel).
    pub base: OptionResult,
    /// Bytes of the model with every weight in f32.
    pub f32_bytes: usize,
    /// One entry per option, in [`DeployOption::ALL`] order.
    pub options: Vec<OptionResult>,
    /// Share of the full-SVF experts' gain over the base that survives re-quantization, per
    /// re-quantizing option and domain: (requantized − base) / (dequantize − base); absent
    /// where there is no gain.
    pub requantize_gain_kept: BTreeMap<String, BTreeMap<String, f64>>,
    /// The equal-weight mixture of the full-SVF experts, before and after re-quantization
    /// (with two or more domains).
    pub mixture: Option<MixtureResult>,
}

/// A mixture of the full-SVF experts, dequantized and re-quantized.
#[derive(Debug, Clone, Serialize)]
pub struct MixtureResult {
    /// Mixture weights, in domain order.
    pub alpha: Vec<f64>,
    /// Accuracy per domain with the f32 adapted weights.
    pub dequantized: BTreeMap<String, f64>,
    /// Accuracy per domain with W' ternarized again, one scale per matrix.
    pub requantized: BTreeMap<String, f64>,
    /// The same with one scale per output channel.
    pub requantized_channel: BTreeMap<String, f64>,
}

/// Progress events, for the command's progress bar.
pub enum Event<'a> {
    /// Training an expert (option, domain, step, steps).
    Training(&'a str, &'a str, usize, usize),
    /// Evaluating (what).
    Evaluating(&'a str),
}

fn accuracy(model: &Model, tok: &dyn Tokenizer, items: &[Item], d: Domain) -> Result<f64> {
    let refs: Vec<&Item> = items.iter().collect();
    Ok(score_items(model, tok, &refs, |e, c| d.verify(e, c), |_| {})?.accuracy)
}

/// The expert of `option`'s parameterization for `domain`: read from the experts directory,
/// or trained there (resumably) with `cfg.train`.
fn expert_for(
    base: &Base,
    tok: &dyn Tokenizer,
    cfg: &CompareConfig,
    option: DeployOption,
    domain: Domain,
    progress: &mut dyn FnMut(Event),
) -> Result<(Expert, PathBuf)> {
    let param = option.parameterization();
    let path = cfg
        .experts_dir
        .join(format!("{}_{}.safetensors", param.name(), domain.name()));
    if !path.exists() {
        let train = TrainConfig {
            parameterization: param,
            ..cfg.train.clone()
        };
        train_expert(
            base,
            tok,
            &DataSource::Domain(domain),
            &train,
            &path,
            true,
            |step, _| {
                progress(Event::Training(
                    param.name(),
                    domain.name(),
                    step,
                    train.steps,
                ));
                true
            },
        )?;
    }
    let e = Expert::load(&path)?;
    base.check(&e, &path)?;
    Ok((e, path))
}

/// Run the comparison.
pub fn compare_options(
    ck: &Checkpoint,
    tok: &dyn Tokenizer,
    cfg: &CompareConfig,
    cache: &SvdCache,
    mut progress: impl FnMut(Event),
) -> Result<CompareReport> {
    // One base for every option: hashed once, the packed model and the factors built once.
    let shared = Base::new(ck, cache);
    let f32b = f32_bytes(ck);
    let items: Vec<Vec<Item>> = cfg
        .domains
        .iter()
        .map(|&d| eval_items(d, Split::Test, cfg.n, cfg.seed))
        .collect::<Result<_>>()?;
    let names = |f: &dyn Fn(usize) -> f64| -> BTreeMap<String, f64> {
        (cfg.domains.iter().enumerate())
            .map(|(i, d)| (d.name().to_string(), f(i)))
            .collect()
    };
    let mean = |m: &BTreeMap<String, f64>| m.values().sum::<f64>() / m.len().max(1) as f64;

    progress(Event::Evaluating("base"));
    // Deployed models run BitNet's int8 activations in f32 (ModelOptions' default).
    let base_model = shared.packed()?;
    let mut base_acc = Vec::new();
    for (d, it) in cfg.domains.iter().zip(&items) {
        base_acc.push(accuracy(base_model, tok, it, *d)?);
    }
    let per_domain = names(&|i| base_acc[i]);
    let base_bytes = packed_bytes(ck);
    let base = OptionResult {
        name: "base (packed, no expert)".into(),
        accuracy: mean(&per_domain),
        per_domain,
        bytes: base_bytes,
        bytes_vs_f32: base_bytes as f64 / f32b as f64,
        tokens_per_s: decode_speed(base_model, tok, cfg.decode_tokens, cfg.decode_runs)?,
        switch_ms: 0.0,
        prepare_s: 0.0,
        experts: vec![],
    };

    let mut options = Vec::new();
    let mut paper_experts = Vec::new();
    for option in DeployOption::ALL {
        let mut experts = Vec::new();
        let mut paths = Vec::new();
        for &d in &cfg.domains {
            let (e, p) = expert_for(&shared, tok, cfg, option, d, &mut progress)?;
            experts.push(e);
            paths.push(p);
        }
        progress(Event::Evaluating(option.name()));
        if option == DeployOption::Dequantize {
            paper_experts = experts.clone();
        }
        let t = Instant::now();
        let mut dep = Deployment::new(&shared, option, experts)?;
        let prepare_s = t.elapsed().as_secs_f64();
        let mut acc = Vec::new();
        let mut switch = Vec::new();
        for (i, (d, it)) in cfg.domains.iter().zip(&items).enumerate() {
            // Switch from the previous expert (the last one before the first).
            let from = (i + cfg.domains.len() - 1) % cfg.domains.len();
            dep.apply(from)?;
            let t = Instant::now();
            dep.apply(i)?;
            switch.push(1e3 * t.elapsed().as_secs_f64());
            acc.push(accuracy(&dep.model, tok, it, *d)?);
        }
        dep.apply(0)?;
        let per_domain = names(&|i| acc[i]);
        let bytes = dep.bytes();
        options.push(OptionResult {
            name: option.name().into(),
            accuracy: mean(&per_domain),
            per_domain,
            bytes,
            bytes_vs_f32: bytes as f64 / f32b as f64,
            tokens_per_s: decode_speed(&dep.model, tok, cfg.decode_tokens, cfg.decode_runs)?,
            switch_ms: median(&mut switch),
            prepare_s,
            experts: paths,
        });
    }
    let mixture = if paper_experts.len() >= 2 {
        progress(Event::Evaluating("mixture"));
        let e = paper_experts.len();
        let alpha = vec![1.0 / e as f64; e];
        let refs: Vec<&Expert> = paper_experts.iter().collect();
        let f = shared.factors(paper_experts[0].meta.targets)?;
        let mix = mixture(&refs, &alpha, &f.svd)?;
        let dense = adapted_model(
            &shared,
            &mix,
            ModelOptions {
                mode: WeightMode::Dense,
                ..Default::default()
            },
        )?;
        let ternary = |per_channel: bool| {
            Model::new(
                &dense.requantized_checkpoint(per_channel)?,
                ModelOptions::default(),
            )
        };
        let (requantized, requantized_channel) = (ternary(false)?, ternary(true)?);
        let (mut a, mut b, mut c) = (Vec::new(), Vec::new(), Vec::new());
        for (d, it) in cfg.domains.iter().zip(&items) {
            a.push(accuracy(&dense, tok, it, *d)?);
            b.push(accuracy(&requantized, tok, it, *d)?);
            c.push(accuracy(&requantized_channel, tok, it, *d)?);
        }
        Some(MixtureResult {
            alpha,
            dequantized: names(&|i| a[i]),
            requantized: names(&|i| b[i]),
            requantized_channel: names(&|i| c[i]),
        })
    } else {
        None
    };
    let by_name = |n: &str| {
        options
            .iter()
            .find(|o| o.name == n)
            .expect("every option runs")
    };
    let deq = by_name("dequantize");
    let requantize_gain_kept = ["requantize", "requantize-channel"]
        .into_iter()
        .map(|n| {
            let req = by_name(n);
            let kept = (base.per_domain.iter())
                .filter_map(|(d, &b)| {
                    let gain = deq.per_domain[d] - b;
                    (gain > 0.0).then(|| (d.clone(), (req.per_domain[d] - b) / gain))
                })
                .collect();
            (n.to_string(), kept)
        })
        .collect();
    Ok(CompareReport {
        base,
        f32_bytes: f32b,
        options,
        requantize_gain_kept,
        mixture,
    })
}

impl CompareReport {
    /// The report as a Markdown table.
    pub fn markdown(&self) -> String {
        let domains: Vec<&String> = self.base.per_domain.keys().collect();
        let mut s = format!(
            "| option | accuracy (own domain) | {} | bytes (base + {} experts) | × f32 | decode tokens/s | switch expert |\n|---|---|{}---|---|---|---|\n",
            domains.iter().map(|d| d.as_str()).collect::<Vec<_>>().join(" | "),
            domains.len(),
            "---|".repeat(domains.len())
        );
        for r in std::iter::once(&self.base).chain(&self.options) {
            s += &format!(
                "| {} | {:.1} | {} | {:.2} MB | {:.3} | {:.0} | {} |\n",
                r.name,
                100.0 * r.accuracy,
                r.per_domain
                    .values()
                    .map(|a| format!("{:.1}", 100.0 * a))
                    .collect::<Vec<_>>()
                    .join(" | "),
                r.bytes as f64 / 1e6,
                r.bytes_vs_f32,
                r.tokens_per_s,
                if r.experts.is_empty() {
                    "—".to_string()
                } else {
                    format!("{:.3} ms", r.switch_ms)
                }
            );
        }
        if let Some(m) = &self.mixture {
            let row = |acc: &BTreeMap<String, f64>| {
                acc.values()
                    .map(|a| format!("{:.1}", 100.0 * a))
                    .collect::<Vec<_>>()
                    .join(" | ")
            };
            s += &format!(
                "\n| equal mixture of the full-SVF experts (α = {:.3} each) | {} |\n|---|{}\n| dequantized | {} |\n| re-quantized, per matrix | {} |\n| re-quantized, per channel | {} |\n",
                m.alpha[0],
                domains.iter().map(|d| d.as_str()).collect::<Vec<_>>().join(" | "),
                "---|".repeat(domains.len()),
                row(&m.dequantized),
                row(&m.requantized),
                row(&m.requantized_channel)
            );
        }
        for (option, kept) in &self.requantize_gain_kept {
            if kept.is_empty() {
                continue;
            }
            s += &format!(
                "\nGain of the full-SVF experts kept by {option}: {}\n",
                kept.iter()
                    .map(|(d, k)| format!("{d} {:.0}%", 100.0 * k))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
        s
    }
}
