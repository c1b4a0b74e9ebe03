//! The settings of one expert's training: the objective, the parameterization and its
//! targets, the optimizer and validation schedule, their defaults per objective and the
//! ranges a settings file is checked against.

use crate::error::{Checks, Result};
use crate::svf::{Parameterization, Targets};
use crate::train::plan::TrainBase;
use serde::{Deserialize, Serialize};

/// The training objective.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Objective {
    /// Policy gradient with verifier rewards and a KL penalty.
    Reinforce,
    /// Next-token cross-entropy on the reference answers.
    Sft,
}

crate::value_names!(
    Objective,
    "objective",
    [(Reinforce, "reinforce", ""), (Sft, "sft", "")]
);

/// Settings of one expert's training. Defaults work on the default model without tuning.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TrainConfig {
    /// Objective.
    pub objective: Objective,
    /// z parameterization.
    pub parameterization: Parameterization,
    /// Target matrices.
    pub targets: Targets,
    /// Width k of the low-rank parameterization (top-k singular directions).
    #[serde(default = "default_rank")]
    pub rank: usize,
    /// Most optimizer steps.
    pub steps: usize,
    /// Prompts per step.
    pub batch_prompts: usize,
    /// Sampled completions per prompt (REINFORCE).
    pub samples: usize,
    /// Peak Adam learning rate (official: 2e-3).
    pub lr: f64,
    /// Decay the learning rate along a half cosine to 10% of `lr` by the last step
    /// (false: constant, as in the official code).
    #[serde(default)]
    pub cosine: bool,
    /// Global grad-norm clip (official: 1e-3).
    pub max_grad_norm: Option<f64>,
    /// AdamW weight decay (0 = Adam).
    pub weight_decay: f64,
    /// KL coefficient λ.
    pub kl_coeff: f64,
    /// Subtract the per-prompt mean reward.
    pub baseline: bool,
    /// Grokfast EMA gradient filter (α, λ); None = off.
    pub grokfast: Option<(f64, f64)>,
    /// Sampling temperature for REINFORCE rollouts.
    pub temperature: f64,
    /// Validate every this many steps (an "epoch").
    pub eval_every: usize,
    /// Validation items.
    pub val_n: usize,
    /// Stop after this many validations without improvement (or at a perfect validation
    /// accuracy, which cannot improve).
    pub patience: usize,
    /// Seed of init, data and sampling.
    pub seed: u64,
    /// Where the base weights live: dense f32, packed ternary (low-rank only), or chosen
    /// from the memory free ([`crate::train::plan`]).
    #[serde(default, skip_serializing_if = "TrainBase::is_auto")]
    pub base: TrainBase,
    /// Prompts per forward/backward pass; the step's gradient is accumulated over
    /// `batch_prompts / micro_batch` passes (None: the whole batch in one pass).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub micro_batch: Option<usize>,
    /// Longest training sequence in tokens: longer ones are cut, the answer's tail first
    /// (None: no limit).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_seq: Option<usize>,
    /// Keep only each block's input in the forward pass and recompute the block in the
    /// backward pass (one more forward's time for one block's activations instead of all).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub checkpoint_activations: bool,
}

/// Most steps any setting may ask for (a bound on untrusted numbers, far above any real run).
pub const MAX_STEPS: usize = 10_000_000;

/// Most items any setting may ask for.
pub const MAX_ITEMS: usize = 1_000_000;

/// The low-rank width k when none is given.
pub const DEFAULT_RANK: usize = 64;

fn default_rank() -> usize {
    DEFAULT_RANK
}

impl Default for TrainConfig {
    /// The SFT recipe: on the default model it is the objective that gains (README, "SVF
    /// experts"), and one expert trains in a few minutes.
    fn default() -> Self {
        TrainConfig::for_objective(Objective::Sft)
    }
}

impl TrainConfig {
    /// Every field's range (counts at least 1 and bounded, rates finite and positive),
    /// recorded in `c` under the field's name.
    pub fn check(&self, c: &mut Checks) {
        c.count("rank", self.rank, 1 << 16);
        c.count("steps", self.steps, MAX_STEPS);
        c.count("batch_prompts", self.batch_prompts, 1 << 16);
        c.count("samples", self.samples, 1024);
        c.that(
            self.lr.is_finite() && self.lr > 0.0 && self.lr <= 10.0,
            "lr",
            || format!("got {}; expected a finite rate in (0, 10]", self.lr),
        );
        if let Some(n) = self.max_grad_norm {
            c.that(n.is_finite() && n > 0.0, "max_grad_norm", || {
                format!("got {n}; expected a finite norm > 0, or null for no clipping")
            });
        }
        c.number("weight_decay", self.weight_decay, 0.0, 1e3);
        c.number("kl_coeff", self.kl_coeff, 0.0, 1e6);
        if let Some((a, l)) = self.grokfast {
            c.that((0.0..1.0).contains(&a), "grokfast", || {
                format!("got α = {a}; expected an EMA weight in [0, 1)")
            });
            c.number("grokfast", l, 0.0, 1e6);
        }
        c.that(
            self.temperature.is_finite() && self.temperature > 0.0 && self.temperature <= 100.0,
            "temperature",
            || {
                format!(
                    "got {}; expected a finite value in (0, 100]",
                    self.temperature
                )
            },
        );
        c.count("eval_every", self.eval_every, MAX_STEPS);
        c.count("val_n", self.val_n, MAX_ITEMS);
        c.count("patience", self.patience, MAX_STEPS);
        if let Some(n) = self.micro_batch {
            c.count("micro_batch", n, 1 << 16);
            c.that(
                self.objective == Objective::Sft || n >= self.batch_prompts,
                "micro_batch",
                || "gradient accumulation is for the SFT objective; REINFORCE takes the whole batch in one pass".into(),
            );
        }
        c.that(
            self.objective == Objective::Sft || !self.checkpoint_activations,
            "checkpoint_activations",
            || "activation checkpointing is for the SFT objective".into(),
        );
        if let Some(n) = self.max_seq {
            c.that((2..=1 << 20).contains(&n), "max_seq", || {
                format!("got {n}; expected 2 to 1048576 tokens")
            });
        }
    }

    /// The settings that serialization leaves out at their defaults (so that manifests and
    /// states written before them read and compare unchanged), with those defaults: a
    /// settings file may set them all the same.
    pub fn omitted_defaults() -> serde_json::Map<String, serde_json::Value> {
        let d = TrainConfig::default();
        let mut m = serde_json::Map::new();
        m.insert("base".into(), serde_json::json!(d.base));
        m.insert("micro_batch".into(), serde_json::json!(d.micro_batch));
        m.insert("max_seq".into(), serde_json::json!(d.max_seq));
        let ckpt = d.checkpoint_activations;
        m.insert("checkpoint_activations".into(), serde_json::json!(ckpt));
        m
    }

    /// [`TrainConfig::check`] as a result naming `source` (where the settings came from).
    pub fn validate(&self, source: &str) -> Result<()> {
        let mut c = Checks::new();
        self.check(&mut c);
        c.into_result(source)
    }

    /// Measured defaults per objective (README, "SVF experts"). SFT: 64 prompts per step,
    /// lr 1e-2 with cosine decay, 500 steps, patience 10. REINFORCE: the official recipe (16 prompts × 4
    /// samples, lr 2e-3, clip 1e-3, λ = 0.1), 200 steps. Both validate on 300 items.
    pub fn for_objective(objective: Objective) -> Self {
        let common = TrainConfig {
            objective,
            parameterization: Parameterization::Paper,
            targets: Targets::Mlp,
            rank: DEFAULT_RANK,
            steps: 200,
            batch_prompts: 16,
            samples: 4,
            lr: 2e-3,
            cosine: true,
            max_grad_norm: Some(1e-3),
            weight_decay: 0.0,
            kl_coeff: 0.1,
            baseline: true,
            grokfast: None,
            temperature: 1.0,
            eval_every: 20,
            val_n: 300,
            patience: 4,
            seed: 0,
            base: TrainBase::Auto,
            micro_batch: None,
            max_seq: None,
            checkpoint_activations: false,
        };
        match objective {
            Objective::Reinforce => common,
            Objective::Sft => TrainConfig {
                steps: 500,
                batch_prompts: 64,
                lr: 1e-2,
                eval_every: 25,
                patience: 10,
                ..common
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn objective_names_are_its_serde_names() {
        for o in Objective::ALL {
            assert_eq!(
                <Objective as clap::ValueEnum>::from_str(o.name(), false),
                Ok(o)
            );
            assert_eq!(serde_json::to_value(o).unwrap(), o.name());
        }
    }
}
