//! Presets and optional overrides of the training configurations — what a caller (the command
//! line, a script) lays over [`TrainConfig`] and [`PretrainConfig`] defaults.

use crate::error::{Error, Result};
use crate::train::pretrain::PretrainConfig;
use crate::train::TrainConfig;

/// Optional settings laid over a [`TrainConfig`]; `None` keeps the config's value.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct TrainOverrides {
    /// Most optimizer steps.
    pub steps: Option<usize>,
    /// KL coefficient λ.
    pub kl_coeff: Option<f64>,
    /// Peak learning rate.
    pub lr: Option<f64>,
    /// Prompts per optimizer step (> 0).
    pub batch_prompts: Option<usize>,
    /// Sampled completions per prompt (> 0).
    pub samples: Option<usize>,
    /// Validate every this many steps (> 0).
    pub eval_every: Option<usize>,
    /// Validation items (> 0).
    pub val_n: Option<usize>,
    /// Validations without improvement before stopping (> 0).
    pub patience: Option<usize>,
}

impl TrainConfig {
    /// Lay `o` over this config; the counts that must be positive are checked.
    pub fn apply(&mut self, o: &TrainOverrides) -> Result<()> {
        if let Some(v) = o.steps {
            self.steps = v;
        }
        if let Some(v) = o.kl_coeff {
            self.kl_coeff = v;
        }
        for (slot, v) in [
            (&mut self.batch_prompts, o.batch_prompts),
            (&mut self.samples, o.samples),
            (&mut self.eval_every, o.eval_every),
            (&mut self.val_n, o.val_n),
            (&mut self.patience, o.patience),
        ] {
            if let Some(v) = v {
                if v == 0 {
                    return Err(Error::Input("train options must be positive".into()));
                }
                *slot = v;
            }
        }
        if let Some(v) = o.lr {
            self.lr = v;
        }
        Ok(())
    }

    /// A short run for smoke tests (`bitsvf compare-options --quick`): 20 steps of 16 prompts,
    /// validating every 10 steps on 20 items.
    pub fn quick(self) -> TrainConfig {
        TrainConfig {
            steps: 20,
            batch_prompts: 16,
            eval_every: 10,
            val_n: 20,
            ..self
        }
    }
}

/// Optional settings laid over a [`PretrainConfig`]; `None` keeps the config's value.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct PretrainOverrides {
    /// Optimizer steps.
    pub steps: Option<usize>,
    /// Sequences per step.
    pub batch_size: Option<usize>,
    /// Peak learning rate.
    pub lr: Option<f64>,
    /// Seed of init and data.
    pub seed: Option<u64>,
    /// Model width d ([`PretrainConfig::set_width`]).
    pub hidden: Option<usize>,
    /// Decoder layers.
    pub layers: Option<usize>,
}

impl PretrainConfig {
    /// Lay `o` over this config.
    pub fn apply(&mut self, o: &PretrainOverrides) {
        if let Some(v) = o.steps {
            self.steps = v;
        }
        if let Some(v) = o.batch_size {
            self.batch_size = v;
        }
        if let Some(v) = o.lr {
            self.lr = v;
        }
        if let Some(v) = o.seed {
            self.seed = v;
        }
        if let Some(d) = o.hidden {
            self.set_width(d);
        }
        if let Some(l) = o.layers {
            self.arch.num_hidden_layers = l;
        }
    }

    /// Model width `d`, with the FFN at 2.5·d rounded up to a multiple of 4 (the default
    /// architecture's ratio).
    pub fn set_width(&mut self, d: usize) {
        self.arch.hidden_size = d;
        self.arch.intermediate_size = (d * 5 / 2).div_ceil(4) * 4;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overrides_replace_only_what_they_set() {
        let base = TrainConfig::default();
        let mut cfg = base.clone();
        cfg.apply(&TrainOverrides {
            steps: Some(7),
            val_n: Some(9),
            ..Default::default()
        })
        .unwrap();
        assert_eq!((cfg.steps, cfg.val_n), (7, 9));
        assert_eq!((cfg.lr, cfg.batch_prompts), (base.lr, base.batch_prompts));
        let zero = TrainOverrides {
            patience: Some(0),
            ..Default::default()
        };
        let err = cfg.apply(&zero).unwrap_err().to_string();
        assert_eq!(err, "train options must be positive");
    }

    #[test]
    fn the_width_sets_the_ffn_at_two_and_a_half_times() {
        let mut cfg = PretrainConfig::default();
        cfg.apply(&PretrainOverrides {
            hidden: Some(100),
            layers: Some(3),
            ..Default::default()
        });
        assert_eq!(cfg.arch.hidden_size, 100);
        assert_eq!(cfg.arch.intermediate_size, 252);
        assert_eq!(cfg.arch.num_hidden_layers, 3);
        cfg.set_width(256);
        assert_eq!(cfg.arch.intermediate_size, 640);
    }
}
