//! Stage 2: training one SVF expert (DESIGN.md §3) — REINFORCE with verifier rewards ±1 and a
//! KL(π_ref‖π) penalty against the unadapted model, or next-token SFT on the reference answers.
//!
//! Per step: draw prompts from the training split, sample completions from the current expert
//! (temperature 1), reward +1 when the verifier accepts and −1 otherwise, and minimise
//! −mean((r − b)·Σ_t log π(y_t)) + λ·mean_t KL(π_ref(·|y<t) ‖ π(·|y<t)) over z only. Validation
//! accuracy (greedy) every `eval_every` steps keeps the best z; training stops early after
//! `patience` evaluations without improvement.

use crate::engine::checkpoint::st::OwnedTensor;
use crate::engine::checkpoint::Checkpoint;
use crate::engine::model::{GenerateOptions, Model, ModelOptions, NamedVar, WeightMode};
use crate::engine::tokenizer::Tokenizer;
use crate::error::{Error, Result};
use crate::eval::batch::{batch_from_pairs, sft_pairs};
use crate::eval::{prompt_ids, score_items};
use crate::svf::attach::{init_vars, packed_svf_model, set_z, svf_model, var_tensors};
use crate::svf::base::Base;
use crate::svf::expert::{Expert, ExpertMeta};
use crate::svf::factors::z_lengths;
use crate::svf::svd::Svd;
use crate::tasks::DataSource;
use crate::tasks::{answer_from_completion, Item, MAX_ANSWER_CHARS};
use crate::train::config::{Objective, TrainConfig};
use crate::train::loss::{advantages, reinforce_loss, sft_gradients};
use crate::train::optim::{Adam, AdamConfig, ResumeState};
use crate::train::plan::{cap_pairs, memory_plan, MemoryPlan};
use candle_core::{DType, Tensor};
use rand::{rngs::StdRng, Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;

/// What a training run reports.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainSummary {
    /// Expert name.
    pub expert: String,
    /// Steps run.
    pub steps: usize,
    /// Validation accuracy of the unadapted model.
    pub base_val_accuracy: f64,
    /// Best validation accuracy (the saved checkpoint).
    pub best_val_accuracy: f64,
    /// Step of the best checkpoint.
    pub best_step: usize,
    /// Stopped by patience.
    pub early_stopped: bool,
    /// Wall time, seconds.
    pub seconds: f64,
    /// Validation accuracy after each validation, as (step, accuracy), the resumed part of
    /// an interrupted run included (empty in summaries written before bitsvf recorded it).
    #[serde(default)]
    pub val_curve: Vec<(usize, f64)>,
}

impl TrainSummary {
    /// One line: the validation accuracy before and after, where and why training stopped, and
    /// where the expert went.
    pub fn to_text(&self, out: &Path) -> String {
        format!(
            "expert `{}`: validation accuracy {:.1}% → {:.1}% (best at step {} of {}{}) in {:.0} s; wrote {}",
            self.expert,
            100.0 * self.base_val_accuracy,
            100.0 * self.best_val_accuracy,
            self.best_step,
            self.steps,
            if self.early_stopped { ", early stop" } else { "" },
            self.seconds,
            out.display()
        )
    }
}

/// Per-step statistics.
#[derive(Debug, Clone, Copy, Default)]
pub struct StepStats {
    /// Mean reward (REINFORCE) or 0.
    pub reward: f64,
    /// Mean KL(π_ref‖π) per supervised position.
    pub kl: f64,
    /// Loss value.
    pub loss: f64,
}

fn frozen(vars: &[NamedVar]) -> BTreeMap<String, Tensor> {
    vars.iter()
        .map(|(n, v)| (n.clone(), v.as_tensor().detach()))
        .collect()
}

fn z_values(vars: &[NamedVar]) -> Result<BTreeMap<String, Vec<f32>>> {
    vars.iter()
        .map(|(n, v)| Ok((n.clone(), v.as_tensor().to_dtype(DType::F32)?.to_vec1()?)))
        .collect()
}

/// The learning rate of optimizer step `step` (0-based).
pub fn lr_at(cfg: &TrainConfig, step: usize) -> f64 {
    if !cfg.cosine {
        return cfg.lr;
    }
    crate::train::optim::cosine_lr(cfg.lr, 0.1, step as f64 / cfg.steps.max(1) as f64)
}

/// Train one expert of `base` on `data` (with the base's factors of `cfg.targets` when the
/// parameterization uses them); writes it to `out` (and resumable state beside it).
pub fn train_expert(
    base: &Base,
    tok: &dyn Tokenizer,
    data: &DataSource,
    cfg: &TrainConfig,
    out: &Path,
    resume: bool,
    on_step: impl FnMut(usize, &StepStats) -> bool,
) -> Result<TrainSummary> {
    let plan = training_plan(base.ck(), tok, data, cfg)?;
    let held;
    let no_factors = BTreeMap::new();
    let factors = if plan.packed {
        held = base.top_factors(cfg.targets, cfg.rank, |_, _| {})?;
        &held.svd
    } else if cfg.parameterization.uses_svd() {
        held = base.factors(cfg.targets)?;
        &held.svd
    } else {
        &no_factors
    };
    let (ck, hash) = (base.ck(), base.hash());
    train(
        ck,
        hash,
        factors,
        plan.packed,
        tok,
        data,
        cfg,
        out,
        resume,
        on_step,
    )
}

/// The [`MemoryPlan`] of training `cfg` on `ck` over `data`, for sequences as long as the
/// longest validation item (capped at `max_seq`): which base the trainer runs on and what
/// each part of its memory comes to. Checked before any work starts.
pub fn training_plan(
    ck: &Checkpoint,
    tok: &dyn Tokenizer,
    data: &DataSource,
    cfg: &TrainConfig,
) -> Result<MemoryPlan> {
    cfg.validate("training settings")?;
    let val = data.validation(cfg.val_n.min(64), cfg.seed)?;
    let mut pairs = sft_pairs(tok, &val)?;
    cap_pairs(&mut pairs, cfg.max_seq);
    let seq = pairs
        .iter()
        .map(|(p, a)| p.len() + a.len())
        .max()
        .unwrap_or(1);
    memory_plan(ck, cfg, seq)
}

/// [`train_expert`] of `ck`, whose content hash is `hash`, with these factors.
#[allow(clippy::too_many_arguments)]
fn train(
    ck: &Checkpoint,
    hash: &str,
    factors: &BTreeMap<String, Svd>,
    packed: bool,
    tok: &dyn Tokenizer,
    data: &DataSource,
    cfg: &TrainConfig,
    out: &Path,
    resume: bool,
    mut on_step: impl FnMut(usize, &StepStats) -> bool,
) -> Result<TrainSummary> {
    cfg.validate("training settings")?;
    let start = std::time::Instant::now();
    let name = data.name();
    crate::eval::check_fits(ck.config.max_position_embeddings, tok, data)?;
    if let Some(dir) = out.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    }
    let options = ModelOptions {
        mode: match packed {
            true => WeightMode::Ternary,
            false => WeightMode::Dense,
        },
        act_quant: true,
        dtype: DType::F32,
    };
    let reference = Model::new(ck, options)?;
    let lengths = z_lengths(ck, cfg.targets, cfg.parameterization, factors, cfg.rank)?;
    let vars = init_vars(&lengths, cfg.parameterization, options, cfg.seed)?;
    let z_tensors = var_tensors(&vars);
    let model = match packed {
        true => packed_svf_model(ck, options, factors, &z_tensors)?,
        false => svf_model(ck, options, factors, &z_tensors, cfg.parameterization)?,
    };
    let mut opt = Adam::new(
        vars.clone(),
        AdamConfig {
            lr: cfg.lr,
            weight_decay: cfg.weight_decay,
            max_grad_norm: cfg.max_grad_norm,
            ..Default::default()
        },
    )?;
    let val = data.validation(cfg.val_n, cfg.seed)?;
    let val_refs: Vec<&Item> = val.iter().collect();
    let verify = |e: &str, c: &str| data.verify(e, c);
    // One copy of the model with constant z serves sampling and validation; only its z
    // vectors are refreshed from the variables before each use. It shares every weight and
    // factor with the trained model.
    let mut frozen_model = model.clone();
    set_z(&mut frozen_model, &frozen(&vars));
    let validate = |m: &mut Model, vars: &[NamedVar]| -> Result<f64> {
        set_z(m, &frozen(vars));
        Ok(score_items(m, tok, &val_refs, verify, |_| {})?.accuracy)
    };
    let base_val = score_items(&reference, tok, &val_refs, verify, |_| {})?.accuracy;

    let mut first = 0;
    let mut best = (
        validate(&mut frozen_model, &vars)?,
        0usize,
        z_values(&vars)?,
    );
    let mut since_best = 0;
    let mut val_curve: Vec<(usize, f64)> = Vec::new();
    // What the state must have been saved for: this data (its name, and its validation items
    // as a fingerprint of the file's contents) on this base.
    let data_id = data_fingerprint(&name, hash, &val);
    if resume {
        if let Some(state) = ResumeState::open(out, "train_config", cfg)? {
            let saved = state.files().metadata("data").unwrap_or("(none)");
            if saved != data_id {
                return Err(Error::config(
                    &state.path,
                    "data",
                    format!(
                        "the saved run trained on `{saved}`, not on `{data_id}` (another domain, \
                         dataset or base model); rerun without --resume, or with another --out"
                    ),
                ));
            }
            first = state.step;
            opt.load_state(state.files(), first)?;
            since_best = state.get("since_best")?;
            if let Some(curve) = state.files().metadata("val_curve") {
                val_curve = serde_json::from_str(curve)
                    .map_err(|e| Error::config(&state.path, "val_curve", e.to_string()))?;
            }
            let mut bz = BTreeMap::new();
            for (n, _) in &vars {
                bz.insert(
                    n.clone(),
                    state.files().get(&format!("{n}.best"))?.to_f32()?,
                );
            }
            best = (state.get("best_val_accuracy")?, state.get("best_step")?, bz);
        }
    }
    let mp = out.with_extension("metrics.jsonl");
    trim_metrics(&mp, first)?;
    let mut metrics = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&mp)
        .map_err(|e| Error::io(&mp, e))?;
    let key = |k: &str| format!("stage2/expert_{name}/{k}");
    let mut grok: Option<Vec<Tensor>> = None;
    let mut early = false;
    let mut step = first;
    while step < cfg.steps {
        let mut rng =
            StdRng::seed_from_u64(cfg.seed ^ (step as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15));
        let items = data.draw(&mut rng, cfg.batch_prompts)?;
        opt.config.lr = lr_at(cfg, step);
        let mut stats = StepStats::default();
        let mut grads = match cfg.objective {
            Objective::Sft => {
                let mut pairs = sft_pairs(tok, &items)?;
                cap_pairs(&mut pairs, cfg.max_seq);
                let per_pass = cfg.micro_batch.unwrap_or(pairs.len());
                let (loss, kl, grads) = sft_gradients(&model, &reference, &pairs, per_pass)?;
                (stats.loss, stats.kl) = (loss, kl);
                grads
            }
            Objective::Reinforce => {
                set_z(&mut frozen_model, &frozen(&vars));
                let sampler = &frozen_model;
                let mut pairs = Vec::new();
                let mut rewards = Vec::new();
                for it in &items {
                    let p = prompt_ids(tok, &it.prompt)?;
                    for _ in 0..cfg.samples {
                        let out = sampler.generate(
                            &p,
                            &GenerateOptions {
                                max_new_tokens: MAX_ANSWER_CHARS + 2,
                                temperature: cfg.temperature,
                                top_p: 1.0,
                                seed: rng.gen(),
                                stop: tok.stop_ids(),
                            },
                        )?;
                        let text = tok.decode(&out);
                        let ok = data.verify(&it.answer, answer_from_completion(&text));
                        rewards.push(if ok { 1.0f32 } else { -1.0 });
                        pairs.push((p.clone(), out));
                    }
                }
                stats.reward =
                    rewards.iter().map(|&r| r as f64).sum::<f64>() / rewards.len() as f64;
                let batch = batch_from_pairs(&pairs, model.device())?;
                let seq_len = batch.input.dim(1)?;
                let adv = advantages(&rewards, cfg.samples, cfg.baseline);
                let (loss, kl) =
                    reinforce_loss(&model, &reference, &batch, &adv, seq_len, cfg.kl_coeff)?;
                stats.kl = kl;
                stats.loss = loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
                loss.backward()?
            }
        };
        if let Some((alpha, lamb)) = cfg.grokfast {
            // Grokfast-EMA: g ← g + λ·EMA_α(g), the slow component amplified.
            let mut ema = grok.take().unwrap_or_default();
            for (i, (_, var)) in vars.iter().enumerate() {
                if let Some(g) = grads.get(var.as_tensor()).cloned() {
                    let e = match ema.get(i) {
                        Some(prev) => ((prev * alpha)? + (&g * (1.0 - alpha))?)?,
                        None => g.clone(),
                    };
                    grads.insert(var.as_tensor(), (&g + (&e * lamb)?)?);
                    if ema.len() <= i {
                        ema.push(e);
                    } else {
                        ema[i] = e;
                    }
                }
            }
            grok = Some(ema);
        }
        opt.step(&grads)?;
        step += 1;
        let zs = z_values(&vars)?;
        let all: Vec<f32> = zs.values().flatten().copied().collect();
        let mean = all.iter().map(|&x| x as f64).sum::<f64>() / all.len().max(1) as f64;
        let std = (all.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>()
            / all.len().max(1) as f64)
            .sqrt();
        let mut record = serde_json::json!({"step": step});
        record[key("reward")] = stats.reward.into();
        record[key("kl")] = stats.kl.into();
        record[key("loss")] = stats.loss.into();
        record[key("z_mean")] = mean.into();
        record[key("z_std")] = std.into();
        if step % cfg.eval_every == 0 || step == cfg.steps {
            let acc = validate(&mut frozen_model, &vars)?;
            record[key("val_accuracy")] = acc.into();
            val_curve.push((step, acc));
            if acc > best.0 {
                best = (acc, step, zs);
                since_best = 0;
            } else {
                since_best += 1;
            }
            save_state(
                &opt, cfg, step, &best, since_best, &val_curve, &data_id, out,
            )?;
            if since_best >= cfg.patience {
                early = true;
            }
        }
        writeln!(metrics, "{record}").map_err(|e| Error::io(&mp, e))?;
        if !on_step(step, &stats) {
            return Ok(TrainSummary {
                expert: name,
                steps: step,
                base_val_accuracy: base_val,
                best_val_accuracy: best.0,
                best_step: best.1,
                early_stopped: false,
                seconds: start.elapsed().as_secs_f64(),
                val_curve,
            });
        }
        if early {
            break;
        }
    }
    let expert = Expert {
        meta: ExpertMeta {
            name: name.clone(),
            base_hash: hash.to_string(),
            parameterization: cfg.parameterization,
            targets: cfg.targets,
            domains: vec![name.clone()],
            val_accuracy: best.0,
            training: serde_json::to_value(cfg).expect("json"),
        },
        z: best.2.clone(),
    };
    expert.save(out)?;
    Ok(TrainSummary {
        expert: name,
        steps: step,
        base_val_accuracy: base_val,
        best_val_accuracy: best.0,
        best_step: best.1,
        early_stopped: early,
        seconds: start.elapsed().as_secs_f64(),
        val_curve,
    })
}

/// `name` and a short hash of the base and of the validation items: what a resumed run must
/// train on.
fn data_fingerprint(name: &str, base_hash: &str, val: &[Item]) -> String {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    h.update(base_hash.as_bytes());
    for it in val {
        for part in [&it.domain, &it.prompt, &it.answer] {
            h.update((part.len() as u64).to_le_bytes());
            h.update(part.as_bytes());
        }
    }
    let digest = h.finalize();
    let hex: String = digest[..8].iter().map(|b| format!("{b:02x}")).collect();
    format!("{name} {hex}")
}

/// Keep only the lines of the metrics log `path` up to `step` (all of them gone for 0): the
/// steps after the resumed state are run again, and must not be logged twice.
fn trim_metrics(path: &Path, step: usize) -> Result<()> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(Error::io(path, e)),
    };
    let kept: String = (text.lines())
        .filter(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap_or_default();
            v.get("step")
                .and_then(|s| s.as_u64())
                .is_some_and(|s| s as usize <= step)
        })
        .map(|l| format!("{l}\n"))
        .collect();
    crate::io::write_atomic(path, kept.as_bytes())
}

#[allow(clippy::too_many_arguments)]
fn save_state(
    opt: &Adam,
    cfg: &TrainConfig,
    step: usize,
    best: &(f64, usize, BTreeMap<String, Vec<f32>>),
    since_best: usize,
    val_curve: &[(usize, f64)],
    data_id: &str,
    out: &Path,
) -> Result<()> {
    let tensors = best
        .2
        .iter()
        .map(|(n, z)| (format!("{n}.best"), OwnedTensor::f32(vec![z.len()], z)))
        .collect();
    let meta = [
        ("since_best", since_best.to_string()),
        ("best_val_accuracy", best.0.to_string()),
        ("best_step", best.1.to_string()),
        ("val_curve", serde_json::to_string(val_curve).expect("json")),
        ("data", data_id.to_string()),
    ];
    ResumeState::save(out, opt, step, ("train_config", cfg), &meta, tensors)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::eval::batch::{flat_log_probs, Batch};
    use crate::svf::{Parameterization, Targets};
    use crate::tasks::Domain;
    use crate::train::loss::masked_nll;

    fn tiny() -> Checkpoint {
        Checkpoint::tiny(16, 24, 11)
    }

    /// The tiny model, the factors of all its linears and dense options.
    fn dense_setup(
        act_quant: bool,
        dtype: DType,
    ) -> (Checkpoint, BTreeMap<String, Svd>, ModelOptions) {
        let ck = tiny();
        let f = all_factors(&ck);
        let options = ModelOptions {
            mode: crate::engine::model::WeightMode::Dense,
            act_quant,
            dtype,
        };
        (ck, f, options)
    }

    fn all_factors(ck: &Checkpoint) -> BTreeMap<String, Svd> {
        crate::svf::factors::decompose(ck, Targets::All)
    }

    fn batch() -> Batch {
        let pairs = vec![
            (vec![2u32, 49, 43, 50, 61], vec![51u32, 10]),
            (vec![2u32, 114, 101, 118], vec![99u32, 98, 97, 10]),
        ];
        batch_from_pairs(&pairs, &candle_core::Device::Cpu).unwrap()
    }

    /// Loss as a function of the z variables, for one objective.
    fn loss_of(
        ck: &Checkpoint,
        f: &BTreeMap<String, Svd>,
        vars: &[NamedVar],
        param: Parameterization,
        objective: Objective,
    ) -> Tensor {
        let options = ModelOptions {
            mode: crate::engine::model::WeightMode::Dense,
            act_quant: false,
            dtype: DType::F64,
        };
        let z = var_tensors(vars);
        let model = svf_model(ck, options, f, &z, param).unwrap();
        let b = batch();
        match objective {
            Objective::Sft => masked_nll(&flat_log_probs(&model, &b).unwrap(), &b).unwrap(),
            Objective::Reinforce => {
                let reference = Model::new(ck, options).unwrap();
                let seq = b.input.dim(1).unwrap();
                reinforce_loss(&model, &reference, &b, &[0.75, -0.5], seq, 0.3)
                    .unwrap()
                    .0
            }
        }
    }

    #[test]
    fn gradients_match_finite_differences() {
        // f64, activation quantization off (the STE is not differentiable): ∂loss/∂z from
        // autograd vs central differences, every parameterization and both objectives.
        let (ck, f, options) = dense_setup(false, DType::F64);
        for param in Parameterization::ALL {
            for objective in [Objective::Sft, Objective::Reinforce] {
                let lengths = z_lengths(&ck, Targets::All, param, &f, 3).unwrap();
                let vars = init_vars(&lengths, param, options, 5).unwrap();
                // Move away from z = 1 so every term of the official rescale is exercised.
                for (i, (_, v)) in vars.iter().enumerate() {
                    let n = v.dims()[0];
                    let z: Vec<f64> = v
                        .as_tensor()
                        .to_vec1::<f64>()
                        .unwrap()
                        .iter()
                        .enumerate()
                        .map(|(j, x)| x + 0.05 * (((i * 7 + j * 3) % 11) as f64 / 11.0 - 0.5))
                        .collect();
                    v.set(&Tensor::from_vec(z, n, &candle_core::Device::Cpu).unwrap())
                        .unwrap();
                }
                let loss = loss_of(&ck, &f, &vars, param, objective);
                let grads = loss.backward().unwrap();
                let mut checked = 0;
                for (vi, (name, var)) in vars.iter().enumerate() {
                    let g: Vec<f64> = grads.get(var.as_tensor()).unwrap().to_vec1().unwrap();
                    let z0: Vec<f64> = var.as_tensor().to_vec1().unwrap();
                    for j in [0, z0.len() / 2, z0.len() - 1] {
                        let eps = 1e-5;
                        let at = |d: f64| {
                            let mut z = z0.clone();
                            z[j] += d;
                            var.set(
                                &Tensor::from_vec(z, z0.len(), &candle_core::Device::Cpu).unwrap(),
                            )
                            .unwrap();
                            let l = loss_of(&ck, &f, &vars, param, objective)
                                .to_scalar::<f64>()
                                .unwrap();
                            var.set(
                                &Tensor::from_vec(z0.clone(), z0.len(), &candle_core::Device::Cpu)
                                    .unwrap(),
                            )
                            .unwrap();
                            l
                        };
                        let fd = (at(eps) - at(-eps)) / (2.0 * eps);
                        let tol = 1e-6 + 1e-5 * fd.abs().max(g[j].abs());
                        assert!((fd - g[j]).abs() < tol, "{param:?} {objective:?} {name}[{j}] (var {vi}): fd {fd:e} vs autograd {:e}", g[j]);
                        checked += 1;
                    }
                }
                assert_eq!(checked, 3 * 14);
            }
        }
    }

    #[test]
    fn every_z_receives_a_nonzero_gradient() {
        // With BitNet's int8 activations (STE) and f32, as in training.
        let (ck, f, options) = dense_setup(true, DType::F32);
        for param in Parameterization::ALL {
            let lengths = z_lengths(&ck, Targets::All, param, &f, 3).unwrap();
            let vars = init_vars(&lengths, param, options, 1).unwrap();
            let z = var_tensors(&vars);
            let model = svf_model(&ck, options, &f, &z, param).unwrap();
            let reference = Model::new(&ck, options).unwrap();
            let b = batch();
            let seq = b.input.dim(1).unwrap();
            let (loss, _) = reinforce_loss(&model, &reference, &b, &[1.0, -1.0], seq, 0.1).unwrap();
            let grads = loss.backward().unwrap();
            let what = format!("{param:?}");
            crate::engine::model::assert_every_var_has_a_gradient(&grads, &vars, &what);
        }
    }

    /// The z of every target after `cfg`'s steps of SFT on the tiny model with the full SVD's
    /// factors, over the packed or the dense base.
    fn trained_z(cfg: &TrainConfig, packed: bool) -> Vec<(String, Vec<f32>)> {
        let ck = tiny();
        let f = crate::svf::factors::decompose(&ck, cfg.targets);
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("e.safetensors");
        let data = DataSource::Domain(Domain::Copy);
        let tok = crate::engine::tokenizer::ByteTokenizer;
        let run = train(
            &ck,
            "h",
            &f,
            packed,
            &tok,
            &data,
            cfg,
            &out,
            false,
            |_, _| true,
        );
        run.unwrap();
        let tf = crate::engine::checkpoint::st::TensorFiles::open(&[
            out.with_extension("train-state.safetensors")
        ])
        .unwrap();
        let mut names: Vec<String> = (tf.names().map(str::to_string))
            .filter(|n| n.ends_with("_proj"))
            .collect();
        names.sort();
        (names.into_iter())
            .map(|n| (n.clone(), tf.get(&n).unwrap().to_f32().unwrap()))
            .collect()
    }

    fn max_z_diff(a: &[(String, Vec<f32>)], b: &[(String, Vec<f32>)]) -> f32 {
        assert_eq!(a.len(), b.len());
        (a.iter().zip(b))
            .flat_map(|((na, x), (nb, y))| {
                assert_eq!(na, nb);
                x.iter().zip(y).map(|(p, q)| (p - q).abs())
            })
            .fold(0f32, f32::max)
    }

    #[test]
    fn the_packed_base_trains_the_same_z_as_the_dense_one() {
        // Low-rank SVF on the same factors: the integer kernel over the packed codes with the
        // backward through them against the dequantized f32 model, 4 steps of 4 prompts.
        let cfg = TrainConfig {
            parameterization: Parameterization::LowRank,
            rank: 4,
            steps: 4,
            batch_prompts: 4,
            eval_every: 4,
            val_n: 4,
            ..Default::default()
        };
        let (dense, packed) = (trained_z(&cfg, false), trained_z(&cfg, true));
        assert_eq!(dense.len(), 6, "the MLP targets of two layers");
        assert!(dense.iter().all(|(_, z)| z.len() == 4));
        let moved = (dense.iter()).any(|(_, z)| z.iter().any(|&x| (x - 1.0).abs() > 1e-3));
        assert!(moved, "training moved z");
        let diff = max_z_diff(&dense, &packed);
        assert!(diff < 1e-4, "packed vs dense z after 4 steps: {diff}");
        // Gradient accumulation over passes of one prompt gives the same steps.
        let micro = TrainConfig {
            micro_batch: Some(1),
            ..cfg.clone()
        };
        let diff = max_z_diff(&packed, &trained_z(&micro, true));
        assert!(diff < 1e-4, "4 passes of 1 prompt vs 1 pass of 4: {diff}");
    }

    #[test]
    fn resume_continues_exactly() {
        // The z vectors and Adam moments after 4 steps equal those of a run interrupted after
        // step 3 (state saved at step 2) and resumed.
        let ck = tiny();
        let tmp = tempfile::tempdir().unwrap();
        let cache = crate::svf::svd::SvdCache::new(tmp.path().join("svd"));
        let base = Base::new(&ck, &cache);
        let cfg = TrainConfig {
            objective: Objective::Reinforce,
            steps: 4,
            batch_prompts: 2,
            samples: 2,
            eval_every: 2,
            val_n: 2,
            patience: 10,
            ..Default::default()
        };
        let data = DataSource::Domain(Domain::Copy);
        let tok = crate::engine::tokenizer::ByteTokenizer;
        let (a, b) = (
            tmp.path().join("a.safetensors"),
            tmp.path().join("b.safetensors"),
        );
        let full = train_expert(&base, &tok, &data, &cfg, &a, false, |_, _| true).unwrap();
        let s = train_expert(&base, &tok, &data, &cfg, &b, false, |step, _| step < 3).unwrap();
        assert_eq!(s.steps, 3);
        assert!(!b.exists());
        let resumed = train_expert(&base, &tok, &data, &cfg, &b, true, |_, _| true).unwrap();
        // The validation curve survives the interruption.
        assert_eq!(full.val_curve.len(), 2, "validations at steps 2 and 4");
        assert_eq!(resumed.val_curve, full.val_curve);
        let state = |p: &Path| {
            let tf = crate::engine::checkpoint::st::TensorFiles::open(&[
                p.with_extension("train-state.safetensors")
            ])
            .unwrap();
            let mut names: Vec<String> = tf.names().map(str::to_string).collect();
            names.sort();
            names
                .iter()
                .map(|n| (n.clone(), tf.get(n).unwrap().to_f32().unwrap()))
                .collect::<Vec<_>>()
        };
        let (sa, sb) = (state(&a), state(&b));
        assert_eq!(
            sa.len(),
            3 * 3 * 2 + 3 * 2,
            "z, m, v and best z for 6 matrices"
        );
        assert_eq!(sa, sb);
        // Every step logged once, as in the uninterrupted run.
        let steps = |p: &Path| -> Vec<u64> {
            let text = std::fs::read_to_string(p.with_extension("metrics.jsonl")).unwrap();
            (text.lines())
                .map(|l| {
                    serde_json::from_str::<serde_json::Value>(l).unwrap()["step"]
                        .as_u64()
                        .unwrap()
                })
                .collect()
        };
        assert_eq!(steps(&b), vec![1, 2, 3, 4]);
        assert_eq!(steps(&a), steps(&b));
        // A state saved for another domain is refused, naming the file and both.
        let s = train_expert(&base, &tok, &data, &cfg, &b, false, |step, _| step < 3);
        assert_eq!(s.unwrap().steps, 3);
        let other = DataSource::Domain(Domain::Reverse);
        let err = train_expert(&base, &tok, &other, &cfg, &b, true, |_, _| true)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("train-state") && err.contains("copy") && err.contains("reverse"),
            "{err}"
        );
        // The run moved z away from its initial value.
        let z = &sa
            .iter()
            .find(|(n, _)| n.ends_with("mlp.up_proj"))
            .unwrap()
            .1;
        assert!(z.iter().any(|&x| (x - 1.0).abs() > 1e-6));
        // An expert file was written and loads onto its base model only.
        let e = Expert::load(&a).unwrap();
        e.check_base(&ck, &a).unwrap();
        let other = Checkpoint::random(ck.config.clone(), 99);
        let msg = e.check_base(&other, &a).unwrap_err().to_string();
        assert!(msg.contains("trained on base model"), "{msg}");
    }
}
