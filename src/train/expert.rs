//! Stage 2: training one SVF expert (DESIGN.md §3) — REINFORCE with verifier rewards ±1 and a
//! KL(π_ref‖π) penalty against the unadapted model, or next-token SFT on the reference answers.
//!
//! Per step: draw prompts from the training split, sample completions from the current expert
//! (temperature 1), reward +1 when the verifier accepts and −1 otherwise, and minimise
//! −mean((r − b)·Σ_t log π(y_t)) + λ·mean_t KL(π_ref(·|y<t) ‖ π(·|y<t)) over z only. Validation
//! accuracy (greedy) every `eval_every` steps keeps the best z; training stops early after
//! `patience` evaluations without improvement, or at a perfect validation accuracy.

use crate::dist::{all_sum, is_root, map, Comm, Solo};
use crate::engine::checkpoint::st::OwnedTensor;
use crate::engine::checkpoint::Checkpoint;
use crate::engine::model::{GenerateOptions, Model, ModelOptions, NamedVar, WeightMode};
use crate::engine::tokenizer::Tokenizer;
use crate::error::{Error, Result};
use crate::eval::batch::{batch_from_pairs, sft_pairs};
use crate::eval::{answers, prompt_ids, score_batch};
use crate::svf::attach::{init_vars, packed_svf_model, set_z, svf_model, var_tensors};
use crate::svf::base::{Base, Factors};
use crate::svf::expert::{Expert, ExpertMeta};
use crate::svf::factors::z_lengths;
use crate::svf::svd::Svd;
use crate::tasks::DataSource;
use crate::tasks::{answer_from_completion, Item, MAX_ANSWER_CHARS};
use crate::train::checkpointed::sft_gradients_checkpointed;
use crate::train::config::{Objective, TrainConfig};
use crate::train::loss::{advantages, empty_grads, reinforce_loss_part, sft_gradients};
use crate::train::optim::{Adam, AdamConfig, ResumeState};
use crate::train::plan::{cap_pairs, memory_plan, MemoryPlan};
use candle_core::backprop::GradStore;
use candle_core::{DType, Tensor};
use rand::{rngs::StdRng, Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;
use std::sync::Arc;

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
    /// Stopped before the step budget: by patience or at a perfect validation accuracy.
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
    train_expert_on(&Solo, base, tok, data, cfg, out, resume, on_step)
}

/// [`train_expert`] by the ranks of `group`, data-parallel: every rank draws the same prompts,
/// computes its share of each step's SFT passes (the batch split into `ranks` passes, or the
/// micro-batches dealt round the ranks) and the shares' gradients are summed before the
/// optimizer step, so every rank holds the same z, bit for bit — the same training as one
/// process with the whole batch, to float rounding. Rank 0 of the group writes `out`, its
/// state and its metrics; the others write nothing. Validation items are shared out over the
/// group too, and so are a REINFORCE step's prompts (each rank samples and scores the rollouts
/// of its prompts; the policy and KL terms are normalized over the whole step).
#[allow(clippy::too_many_arguments)]
pub fn train_expert_on(
    group: &dyn Comm,
    base: &Base,
    tok: &dyn Tokenizer,
    data: &DataSource,
    cfg: &TrainConfig,
    out: &Path,
    resume: bool,
    on_step: impl FnMut(usize, &StepStats) -> bool,
) -> Result<TrainSummary> {
    let plan = training_plan(base.ck(), tok, data, cfg)?;
    train_planned_on(group, base, tok, data, cfg, &plan, out, resume, on_step)
}

/// The factors training `cfg` under `plan` needs (the top k for the packed base, the full
/// SVD for the dense one, none for the alpha forms), loaded once per base;
/// `progress(done, total)` as a partial SVD finishes each matrix.
pub fn factors_for(
    base: &Base,
    cfg: &TrainConfig,
    plan: &MemoryPlan,
    progress: impl FnMut(usize, usize),
) -> Result<Option<Arc<Factors>>> {
    Ok(match (plan.packed, cfg.parameterization.uses_svd()) {
        (true, _) => Some(base.top_factors(cfg.targets, cfg.rank, progress)?),
        (false, true) => Some(base.factors(cfg.targets)?),
        (false, false) => None,
    })
}

/// [`train_expert`] on the base `plan` chose (made by [`training_plan`] for these settings,
/// so that a caller that shows the plan trains on the base it showed).
#[allow(clippy::too_many_arguments)]
pub fn train_expert_planned(
    base: &Base,
    tok: &dyn Tokenizer,
    data: &DataSource,
    cfg: &TrainConfig,
    plan: &MemoryPlan,
    out: &Path,
    resume: bool,
    on_step: impl FnMut(usize, &StepStats) -> bool,
) -> Result<TrainSummary> {
    train_planned_on(&Solo, base, tok, data, cfg, plan, out, resume, on_step)
}

/// [`train_expert_on`] on the base `plan` chose.
#[allow(clippy::too_many_arguments)]
fn train_planned_on(
    group: &dyn Comm,
    base: &Base,
    tok: &dyn Tokenizer,
    data: &DataSource,
    cfg: &TrainConfig,
    plan: &MemoryPlan,
    out: &Path,
    resume: bool,
    on_step: impl FnMut(usize, &StepStats) -> bool,
) -> Result<TrainSummary> {
    let held = factors_for(base, cfg, plan, |_, _| {})?;
    let no_factors = BTreeMap::new();
    let factors = held.as_ref().map_or(&no_factors, |f| &f.svd);
    let (ck, hash) = (base.ck(), base.hash());
    let trained = (ck, hash, factors, plan.packed);
    Ok(train(group, trained, tok, data, cfg, out, resume, on_step)?.0)
}

/// What [`train`] trains: the base checkpoint, its content hash, the factors and whether
/// the base stays packed.
type Trained<'a> = (&'a Checkpoint, &'a str, &'a BTreeMap<String, Svd>, bool);

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

/// [`train_expert_on`] of `ck`, whose content hash is `hash`, with these factors; also
/// returns the last step's z (every rank's own).
#[allow(clippy::too_many_arguments)]
fn train(
    group: &dyn Comm,
    (ck, hash, factors, packed): Trained,
    tok: &dyn Tokenizer,
    data: &DataSource,
    cfg: &TrainConfig,
    out: &Path,
    resume: bool,
    mut on_step: impl FnMut(usize, &StepStats) -> bool,
) -> Result<(TrainSummary, BTreeMap<String, Vec<f32>>)> {
    cfg.validate("training settings")?;
    let start = std::time::Instant::now();
    let name = data.name();
    crate::eval::check_fits(ck.config.max_position_embeddings, tok, data)?;
    let writes = is_root(group);
    if let Some(dir) = (out.parent()).filter(|p| writes && !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    }
    let options = ModelOptions {
        mode: match packed {
            true => WeightMode::Ternary,
            false => WeightMode::Dense,
        },
        act_quant: true,
        dtype: DType::F32,
        head: crate::engine::model::HeadFormat::Stored,
        defer_head_copy: false,
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
    // Greedy accuracy on the validation items, decoded in batches that are shared out over
    // the group's ranks (the batches do not depend on the number of ranks, so the share is
    // the same as one process's).
    let accuracy = |m: &Model| -> Result<f64> {
        let batches: Vec<&[&Item]> = val_refs.chunks(score_batch(m)).collect();
        let right = map(group, "validation", batches.len(), |b| {
            let answers = answers(m, tok, batches[b])?;
            Ok((batches[b].iter().zip(answers))
                .map(|(it, a)| verify(&it.answer, &a))
                .collect::<Vec<bool>>())
        })?;
        let right: Vec<bool> = right.into_iter().flatten().collect();
        Ok(right.iter().filter(|&&r| r).count() as f64 / right.len().max(1) as f64)
    };
    let validate = |m: &mut Model, vars: &[NamedVar]| -> Result<f64> {
        set_z(m, &frozen(vars));
        accuracy(m)
    };
    let base_val = accuracy(&reference)?;

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
    let mut metrics = match writes {
        true => {
            trim_metrics(&mp, first)?;
            let mut f = std::fs::OpenOptions::new();
            f.create(true).append(true);
            Some(f.open(&mp).map_err(|e| Error::io(&mp, e))?)
        }
        false => None,
    };
    let key = |k: &str| format!("stage2/expert_{name}/{k}");
    let mut grok: Option<Vec<Tensor>> = None;
    let mut early = false;
    let mut step = first;
    while step < cfg.steps {
        let step_start = std::time::Instant::now();
        let mut rng =
            StdRng::seed_from_u64(cfg.seed ^ (step as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15));
        let items = data.draw(&mut rng, cfg.batch_prompts)?;
        opt.config.lr = lr_at(cfg, step);
        let mut stats = StepStats::default();
        let mut grads = match cfg.objective {
            Objective::Sft => {
                let mut pairs = sft_pairs(tok, &items)?;
                cap_pairs(&mut pairs, cfg.max_seq);
                let ranks = group.size();
                let per_pass = (cfg.micro_batch).unwrap_or(pairs.len().div_ceil(ranks));
                // The KL statistic costs the reference's forward pass: measured on the first
                // step and on the steps that validate, NaN (null in the metrics) between.
                let validates = (step + 1).is_multiple_of(cfg.eval_every.max(1));
                let measured = step == first || validates || step + 1 == cfg.steps;
                let reference = measured.then_some(&reference);
                let pass = match cfg.checkpoint_activations {
                    true => sft_gradients_checkpointed,
                    false => sft_gradients,
                };
                let share = (group.rank(), ranks);
                let (loss, kl, mut grads) =
                    pass(&model, reference, &pairs, per_pass, share, &vars)?;
                let mut sums = [loss, kl];
                all_sum(group, "the step's loss", &mut sums)?;
                [stats.loss, stats.kl] = sums;
                sum_gradients(group, &mut grads, &vars)?;
                grads
            }
            Objective::Reinforce => {
                set_z(&mut frozen_model, &frozen(&vars));
                let sampler = &frozen_model;
                // Every rollout's seed is drawn in item order on every rank, so a rollout is
                // the same whichever rank samples it. The ranks share the prompts out (rank r
                // takes r, r + ranks, …); a prompt's samples stay together for its baseline.
                let seeds: Vec<u64> = (0..items.len() * cfg.samples).map(|_| rng.gen()).collect();
                let mut pairs = Vec::new();
                let mut rewards = Vec::new();
                for i in (group.rank()..items.len()).step_by(group.size()) {
                    let it = &items[i];
                    let p = prompt_ids(tok, &it.prompt)?;
                    for &seed in &seeds[i * cfg.samples..(i + 1) * cfg.samples] {
                        let out = sampler.generate(
                            &p,
                            &GenerateOptions {
                                max_new_tokens: MAX_ANSWER_CHARS + 2,
                                temperature: cfg.temperature,
                                top_p: 1.0,
                                seed,
                                stop: tok.stop_ids(),
                            },
                        )?;
                        let text = tok.decode(&out);
                        let ok = data.verify(&it.answer, answer_from_completion(&text));
                        rewards.push(if ok { 1.0f32 } else { -1.0 });
                        pairs.push((p.clone(), out));
                    }
                }
                let batch = match pairs.is_empty() {
                    true => None,
                    false => Some(batch_from_pairs(&pairs, model.device())?),
                };
                // The step's rollouts, rewards and supervised positions over the group: the
                // normalizers that make the ranks' parts sum to the whole step.
                let mut whole = [
                    rewards.iter().map(|&r| r as f64).sum::<f64>(),
                    rewards.len() as f64,
                    batch.as_ref().map_or(0, |b| b.supervised) as f64,
                ];
                all_sum(group, "the step's rollouts", &mut whole)?;
                stats.reward = whole[0] / whole[1].max(1.0);
                let (mut sums, mut grads) = ([0.0; 2], empty_grads()?);
                if let Some(batch) = batch {
                    let seq_len = batch.input.dim(1)?;
                    let adv = advantages(&rewards, cfg.samples, cfg.baseline);
                    let counts = (whole[1] as usize, whole[2] as usize);
                    let (loss, kl) = reinforce_loss_part(
                        &model,
                        &reference,
                        &batch,
                        &adv,
                        seq_len,
                        cfg.kl_coeff,
                        counts,
                    )?;
                    sums = [loss.to_dtype(DType::F64)?.to_scalar::<f64>()?, kl];
                    grads = loss.backward()?;
                }
                all_sum(group, "the step's loss", &mut sums)?;
                [stats.loss, stats.kl] = sums;
                sum_gradients(group, &mut grads, &vars)?;
                grads
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
        record[key("step_seconds")] = step_start.elapsed().as_secs_f64().into();
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
            if writes {
                save_state(
                    &opt, cfg, step, &best, since_best, &val_curve, &data_id, out,
                )?;
            }
            // Patience runs out, or every validation item is right: nothing left to gain.
            if since_best >= cfg.patience || acc >= 1.0 {
                early = true;
            }
        }
        if let Some(m) = metrics.as_mut() {
            writeln!(m, "{record}").map_err(|e| Error::io(&mp, e))?;
        }
        if !on_step(step, &stats) {
            let last = z_values(&vars)?;
            return Ok((
                TrainSummary {
                    expert: name,
                    steps: step,
                    base_val_accuracy: base_val,
                    best_val_accuracy: best.0,
                    best_step: best.1,
                    early_stopped: false,
                    seconds: start.elapsed().as_secs_f64(),
                    val_curve,
                },
                last,
            ));
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
    if writes {
        expert.save(out)?;
    }
    let last = z_values(&vars)?;
    Ok((
        TrainSummary {
            expert: name,
            steps: step,
            base_val_accuracy: base_val,
            best_val_accuracy: best.0,
            best_step: best.1,
            early_stopped: early,
            seconds: start.elapsed().as_secs_f64(),
            val_curve,
        },
        last,
    ))
}

/// The gradients of `vars` in `grads` summed over the ranks of `group` (a variable without a
/// gradient on a rank counts as zeros there).
fn sum_gradients(group: &dyn Comm, grads: &mut GradStore, vars: &[NamedVar]) -> Result<()> {
    if group.size() == 1 {
        return Ok(());
    }
    let mut flat = Vec::new();
    for (_, var) in vars {
        match grads.get(var.as_tensor()) {
            Some(g) => flat.extend(g.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?),
            None => flat.extend(std::iter::repeat_n(0f32, var.as_tensor().elem_count())),
        }
    }
    all_sum(group, "the step's gradients", &mut flat)?;
    let mut at = 0;
    for (_, var) in vars {
        let t = var.as_tensor();
        let n = t.elem_count();
        let g = Tensor::from_slice(&flat[at..at + n], t.shape(), t.device())?;
        grads.insert(t, g.to_dtype(t.dtype())?);
        at += n;
    }
    Ok(())
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
#[path = "expert_tests.rs"]
mod tests;
