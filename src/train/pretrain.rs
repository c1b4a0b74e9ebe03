//! Pretraining the default model from scratch with quantization-aware training (BitNet b1.58:
//! ternary weights in the forward pass with the straight-through estimator, int8 activations)
//! on a mix of the task suite's training split.
//!
//! Each step's batch is drawn from an RNG seeded by (seed, step), and the optimizer state is
//! saved with the weights, so an interrupted run resumed with `--resume` continues exactly.

use crate::engine::checkpoint::{save_native, Checkpoint};
use crate::engine::config::ModelConfig;
use crate::engine::model::default_arch;
use crate::engine::model::{Model, ModelOptions, WeightMode};
use crate::engine::tokenizer::{ByteTokenizer, Tokenizer};
use crate::error::{Error, Result};
use crate::eval::batch::Batch;
use crate::eval::batch::{batch_from_pairs, batch_logits};
use crate::eval::{evaluate, EvalSpec};
use crate::tasks::{Difficulty, Domain, Split};
use crate::train::loss::masked_cross_entropy;
use crate::train::optim::{Adam, AdamConfig, ResumeState};
use candle_core::{DType, Device};
use rand::{rngs::StdRng, Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

/// Settings of a pretraining run.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct PretrainConfig {
    /// Architecture of the model to train.
    pub arch: ModelConfig,
    /// Optimizer steps.
    pub steps: usize,
    /// Sequences per step.
    pub batch_size: usize,
    /// Peak learning rate.
    pub lr: f64,
    /// Linear warm-up steps.
    pub warmup: usize,
    /// Final learning rate as a fraction of the peak (cosine decay).
    pub min_lr_ratio: f64,
    /// AdamW weight decay.
    pub weight_decay: f64,
    /// Global grad-norm clip.
    pub max_grad_norm: f64,
    /// Seed of init and data.
    pub seed: u64,
    /// Validate and save a resumable state every this many steps.
    pub eval_every: usize,
    /// Validation items per domain.
    pub eval_n: usize,
    /// Domains mixed into training (uniformly), difficulty uniform over levels 1..=5.
    pub domains: Vec<String>,
}

impl Default for PretrainConfig {
    fn default() -> Self {
        PretrainConfig {
            arch: default_arch(),
            steps: 5000,
            batch_size: 32,
            lr: 2e-3,
            warmup: 100,
            min_lr_ratio: 0.1,
            weight_decay: 0.01,
            max_grad_norm: 1.0,
            seed: 0,
            eval_every: 250,
            eval_n: 20,
            domains: Domain::ALL.iter().map(|d| d.name().to_string()).collect(),
        }
    }
}

fn step_rng(seed: u64, step: usize) -> StdRng {
    StdRng::seed_from_u64(seed ^ (step as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15))
}

/// Draw step `step`'s batch: training-split items, domains uniform, levels uniform.
pub fn draw_batch(
    cfg: &PretrainConfig,
    domains: &[Domain],
    step: usize,
    dev: &Device,
) -> Result<Batch> {
    let tok = ByteTokenizer;
    let mut rng = step_rng(cfg.seed, step);
    let mut pairs = Vec::with_capacity(cfg.batch_size);
    while pairs.len() < cfg.batch_size {
        let d = domains[rng.gen_range(0..domains.len())];
        let level =
            Difficulty::new(rng.gen_range(Difficulty::MIN.level()..=Difficulty::MAX.level()))?;
        let item = d.generate(&mut rng, level);
        if Split::of(d.name(), &item.prompt) != Split::Train {
            continue;
        }
        let prompt = crate::eval::prompt_ids(&tok, &item.prompt)?;
        let mut answer = tok.encode(&item.answer)?;
        answer.push(tok.eos());
        pairs.push((prompt, answer));
    }
    batch_from_pairs(&pairs, dev)
}

/// Learning rate at `step`: linear warm-up, then cosine to `min_lr_ratio`·lr.
pub fn lr_at(cfg: &PretrainConfig, step: usize) -> f64 {
    if step < cfg.warmup {
        return cfg.lr * (step + 1) as f64 / cfg.warmup as f64;
    }
    let p = (step - cfg.warmup) as f64 / (cfg.steps - cfg.warmup).max(1) as f64;
    crate::train::optim::cosine_lr(cfg.lr, cfg.min_lr_ratio, p)
}

/// Metrics file of a run writing `out`.
pub fn metrics_path(out: &Path) -> PathBuf {
    out.with_extension("metrics.jsonl")
}

/// What a finished run reports.
#[derive(Debug, Clone, Serialize)]
pub struct PretrainSummary {
    /// Steps run in total.
    pub steps: usize,
    /// Final training loss (mean of the last 50 steps).
    pub final_loss: f64,
    /// Mean validation accuracy at the end.
    pub val_accuracy: f64,
    /// Wall time of this invocation, seconds.
    pub seconds: f64,
    /// Whether the run reached its last step and wrote the model.
    pub finished: bool,
}

impl PretrainSummary {
    /// One line: steps, time, final loss and validation accuracy, and where the model went.
    pub fn to_text(&self, out: &Path) -> String {
        format!(
            "trained {} steps in {:.0} s: final loss {:.3}, validation accuracy {:.1}%; wrote {}",
            self.steps,
            self.seconds,
            self.final_loss,
            100.0 * self.val_accuracy,
            out.display()
        )
    }
}

/// Train from scratch (or resume) and write the ternary model to `out` in the native format
/// (its directory is created if needed).
pub fn pretrain(
    cfg: &PretrainConfig,
    out: &Path,
    resume: bool,
    mut on_step: impl FnMut(usize, f64, f64) -> bool,
) -> Result<PretrainSummary> {
    if let Some(dir) = out.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)
            .map_err(|e| Error::Input(format!("creating {}: {e}", dir.display())))?;
    }
    let start = std::time::Instant::now();
    let domains: Vec<Domain> = cfg
        .domains
        .iter()
        .map(|n| Domain::by_name(n).map_err(Error::from))
        .collect::<Result<_>>()?;
    let (model, vars) = Model::trainable(cfg.arch.clone(), true, cfg.seed)?;
    let mut opt = Adam::new(
        vars,
        AdamConfig {
            lr: cfg.lr,
            weight_decay: cfg.weight_decay,
            max_grad_norm: Some(cfg.max_grad_norm),
            beta2: 0.95,
            ..Default::default()
        },
    )?;
    let mut first = 0;
    if resume {
        if let Some(state) = ResumeState::open(out, "pretrain_config", cfg)? {
            first = state.step;
            opt.load_state(state.files(), first)?;
        }
    }
    let mp = metrics_path(out);
    let mut metrics = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&mp)
        .map_err(|e| Error::io(&mp, e))?;
    let mut recent = std::collections::VecDeque::new();
    let mut val_accuracy = f64::NAN;
    for step in first..cfg.steps {
        let batch = draw_batch(cfg, &domains, step, model.device())?;
        let logits = batch_logits(&model, &batch)?;
        let loss = masked_cross_entropy(&logits, &batch)?;
        let loss_v = loss.to_scalar::<f32>()? as f64;
        opt.config.lr = lr_at(cfg, step);
        let grads = loss.backward()?;
        let gnorm = opt.step(&grads)?;
        recent.push_back(loss_v);
        if recent.len() > 50 {
            recent.pop_front();
        }
        let keep_going = on_step(step + 1, loss_v, opt.config.lr);
        let mut record = serde_json::json!({
            "step": step + 1,
            "pretrain/loss": loss_v,
            "pretrain/lr": opt.config.lr,
            "pretrain/grad_norm": gnorm,
        });
        let done = step + 1 == cfg.steps;
        if (step + 1) % cfg.eval_every == 0 || done {
            let ck = model.to_checkpoint()?;
            let net = Model::new(
                &ck,
                ModelOptions {
                    mode: WeightMode::Ternary,
                    act_quant: true,
                    dtype: DType::F32,
                    head: crate::engine::model::HeadFormat::Stored,
                    defer_head_copy: false,
                },
            )?;
            let spec = EvalSpec {
                domains: domains.clone(),
                n: cfg.eval_n,
                seed: cfg.seed,
                split: Split::Validation,
            };
            let report = evaluate(&net, &ByteTokenizer, "training", &spec, |_| {})?;
            val_accuracy = report.mean_accuracy();
            record["pretrain/val_accuracy"] = val_accuracy.into();
            for (name, d) in &report.domains {
                record[format!("pretrain/val_accuracy/{name}")] = d.accuracy.into();
            }
            ResumeState::save(
                out,
                &opt,
                step + 1,
                ("pretrain_config", cfg),
                &[],
                BTreeMap::new(),
            )?;
        }
        writeln!(metrics, "{record}").map_err(|e| Error::io(&mp, e))?;
        if !keep_going {
            // Stopped by the caller: the state saved at the last validation is where
            // `--resume` picks up; no model is written.
            return Ok(PretrainSummary {
                steps: step + 1,
                final_loss: recent.iter().sum::<f64>() / recent.len().max(1) as f64,
                val_accuracy,
                seconds: start.elapsed().as_secs_f64(),
                finished: false,
            });
        }
    }
    let ck: Checkpoint = model.to_checkpoint()?;
    save_native(&ck, out)?;
    Ok(PretrainSummary {
        finished: true,
        steps: cfg.steps,
        final_loss: recent.iter().sum::<f64>() / recent.len().max(1) as f64,
        val_accuracy,
        seconds: start.elapsed().as_secs_f64(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny() -> PretrainConfig {
        let arch = crate::engine::model::test_arch(32, 80, 1, (2, 1), 64);
        PretrainConfig {
            arch,
            steps: 4,
            batch_size: 4,
            warmup: 2,
            eval_every: 2,
            eval_n: 1,
            domains: vec!["add".into(), "copy".into()],
            ..Default::default()
        }
    }

    #[test]
    fn every_parameter_receives_a_gradient() {
        let cfg = tiny();
        let (model, vars) = Model::trainable(cfg.arch.clone(), true, 1).unwrap();
        let domains = [Domain::Add, Domain::Copy];
        let batch = draw_batch(&cfg, &domains, 0, model.device()).unwrap();
        let loss = masked_cross_entropy(&batch_logits(&model, &batch).unwrap(), &batch).unwrap();
        let grads = loss.backward().unwrap();
        crate::engine::model::assert_every_var_has_a_gradient(&grads, &vars, "pretrain");
    }

    #[test]
    fn resume_continues_exactly() {
        let cfg = tiny();
        let tmp = tempfile::tempdir().unwrap();
        let a = tmp.path().join("a.safetensors");
        let s = pretrain(&cfg, &a, false, |_, _, _| true).unwrap();
        assert!(s.finished);
        // Interrupted after step 3 (state saved at step 2), then resumed.
        let b = tmp.path().join("b.safetensors");
        let s = pretrain(&cfg, &b, false, |step, _, _| step < 3).unwrap();
        assert!(!s.finished && !b.exists());
        let s = pretrain(&cfg, &b, true, |_, _, _| true).unwrap();
        assert!(s.finished);
        let (ca, cb) = (
            crate::engine::checkpoint::load(&a).unwrap(),
            crate::engine::checkpoint::load(&b).unwrap(),
        );
        assert_eq!(ca.content_hash(), cb.content_hash());
        // A changed setting is refused on resume.
        let mut other = cfg.clone();
        other.lr *= 2.0;
        let e = pretrain(&other, &b, true, |_, _, _| true)
            .unwrap_err()
            .to_string();
        assert!(e.contains("different settings"), "{e}");
    }
}
