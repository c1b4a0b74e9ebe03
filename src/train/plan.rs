//! Where an expert's training keeps the base model and what its memory comes to: the dense f32
//! model with full SVD factors (today's trainer, exact to the paper), or the packed ternary
//! base with the top-k factors (the low-rank parameterization at the size of real models),
//! chosen up front from the weights' sizes and the memory this machine has free; and how one
//! step's batch is cut into passes (gradient accumulation) and sequences capped (`max_seq`).

use crate::engine::checkpoint::Checkpoint;
use crate::error::{Error, Result};
use crate::svf::Parameterization;
use crate::train::TrainConfig;
use serde::{Deserialize, Serialize};

/// Where the base weights live while an expert trains.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TrainBase {
    /// Packed when the dense form would take more than half of the free memory (and the
    /// parameterization is low-rank), dense otherwise.
    #[default]
    Auto,
    /// Dequantized f32 weights and full SVD factors.
    Dense,
    /// Packed ternary weights through the integer kernel (a float model: its stored
    /// matrices) and the top-k factors (low-rank).
    Packed,
}

impl TrainBase {
    /// Whether this is [`TrainBase::Auto`] (settings files leave the default out).
    pub fn is_auto(&self) -> bool {
        *self == TrainBase::Auto
    }
}

crate::value_names!(
    TrainBase,
    "training base",
    [
        (
            Auto,
            "auto",
            "Packed when the dense model would not fit comfortably (low-rank only)"
        ),
        (
            Dense,
            "dense",
            "Dequantized f32 weights with full SVD factors"
        ),
        (
            Packed,
            "packed",
            "Packed ternary weights (a float model: as stored) and the top-k factors (low-rank \
             parameterization)"
        ),
    ]
);

/// The memory one expert's training takes, by part, and the base it runs on.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct MemoryPlan {
    /// Whether the base stays packed.
    pub packed: bool,
    /// Weights: the packed codes and the stored embeddings / head once, or two dense f32
    /// models (trained, whose copy for sampling shares its tensors, and reference), in bytes.
    pub base: u64,
    /// The SVD factors the targets hold (top-k when packed, full otherwise).
    pub factors: u64,
    /// Activations one forward/backward pass keeps (estimate: the layers' saved tensors and
    /// the log-probabilities over the vocabulary).
    pub activations: u64,
    /// z, its gradient and Adam's two moments.
    pub optimizer: u64,
    /// Prompts per forward/backward pass.
    pub pass_prompts: usize,
    /// Tokens per sequence the estimate assumes (the longest validation item, capped).
    pub seq: usize,
    /// MemAvailable of /proc/meminfo, where there is one.
    pub available: Option<u64>,
}

impl MemoryPlan {
    /// All parts together.
    pub fn total(&self) -> u64 {
        self.base + self.factors + self.activations + self.optimizer
    }
}

impl std::fmt::Display for MemoryPlan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let size = |b: u64| match b {
            b if b >= 1 << 30 => format!("{:.2} GB", b as f64 / 1e9),
            b => format!("{:.1} MB", b as f64 / 1e6),
        };
        write!(
            f,
            "memory plan ({} base): weights {} + factors {} + activations {} ({} prompts × {} \
             tokens per pass) + optimizer {} = {}",
            if self.packed { "packed" } else { "dense" },
            size(self.base),
            size(self.factors),
            size(self.activations),
            self.pass_prompts,
            self.seq,
            size(self.optimizer),
            size(self.total()),
        )?;
        if let Some(a) = self.available {
            write!(f, " of {} available", size(a))?;
        }
        Ok(())
    }
}

/// MemAvailable in bytes, from /proc/meminfo.
fn available_memory() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Bytes of the dense f32 linears of `ck`.
fn dense_linear_bytes(ck: &Checkpoint) -> u64 {
    (ck.linears())
        .map(|(_, _, l)| (l.matrix.rows() * l.matrix.cols() * 4) as u64)
        .sum()
}

/// The plan for training `cfg` on `ck` with sequences of about `seq` tokens. Errors if the
/// packed base is asked for with a parameterization it cannot train.
pub fn memory_plan(ck: &Checkpoint, cfg: &TrainConfig, seq: usize) -> Result<MemoryPlan> {
    let low_rank = cfg.parameterization == Parameterization::LowRank;
    if cfg.base == TrainBase::Packed && !low_rank {
        return Err(Error::Input(format!(
            "training over the packed base needs --parameterization low-rank (the paper's SVF \
             on the top-k directions is that delta), not {}",
            cfg.parameterization.name()
        )));
    }
    let available = available_memory();
    let c = &ck.config;
    let (d, ffn, vocab) = (c.hidden_size, c.intermediate_size, c.vocab_size);
    let table = (ck.embed_tokens.rows * ck.embed_tokens.cols) as u64;
    let head = if ck.lm_head.is_some() { table } else { 0 };
    let targets: Vec<(usize, usize)> = (ck.linears())
        .filter(|(_, k, _)| cfg.targets.includes(*k))
        .map(|(_, _, l)| (l.matrix.rows(), l.matrix.cols()))
        .collect();
    let r_of = |rows: usize, cols: usize, packed: bool| match packed {
        true => cfg.rank.min(rows).min(cols),
        false => rows.min(cols),
    };
    let factor_bytes = |packed: bool| -> u64 {
        (targets.iter())
            .map(|&(rows, cols)| ((rows + cols + 1) * r_of(rows, cols, packed) * 4) as u64)
            .sum()
    };
    // Three dense models (trained, frozen copy for sampling, reference) each hold f32 weights
    // and an f32 head — the frozen copy shares the trained model's tensors, but the
    // reference builds its own; the factors are held by the base and by the adapted model.
    let dense_total = 2 * (dense_linear_bytes(ck) + 4 * (table + head)) + 2 * factor_bytes(false);
    let packed = match cfg.base {
        TrainBase::Dense => false,
        TrainBase::Packed => true,
        TrainBase::Auto => low_rank && available.is_some_and(|a| dense_total > a / 2),
    };
    let base = match packed {
        true => {
            let codes: u64 = (ck.linears())
                .map(|(_, _, l)| l.matrix.stored_bytes() as u64)
                .sum();
            let stored = ck.embed_tokens.stored_bytes() as u64
                + ck.lm_head.as_ref().map_or(0, |h| h.stored_bytes() as u64);
            codes + stored
        }
        false => 2 * (dense_linear_bytes(ck) + 4 * (table + head)),
    };
    let pass_prompts = cfg
        .micro_batch
        .unwrap_or(cfg.batch_prompts)
        .min(cfg.batch_prompts);
    let tokens = (pass_prompts * seq) as u64;
    // Per token and layer: about ten d-wide and five ffn-wide f32 tensors are saved for the
    // backward pass; per token: logits, log-probabilities and their gradients, the
    // reference's log-probabilities and their exponent (six vocab-wide f32 rows).
    // With checkpointing, one block's tensors and every block's input (d wide).
    let layers = c.num_hidden_layers as u64;
    let per_layer = (10 * d + 5 * ffn) as u64;
    let per_token = 4 * match cfg.checkpoint_activations {
        true => layers * d as u64 + per_layer + 6 * vocab as u64,
        false => layers * per_layer + 6 * vocab as u64,
    };
    let z: u64 = (targets.iter())
        .map(|&(rows, cols)| cfg.parameterization.z_len(rows, rows.min(cols), cfg.rank) as u64)
        .sum();
    Ok(MemoryPlan {
        packed,
        base,
        factors: 2 * factor_bytes(packed),
        activations: tokens * per_token,
        optimizer: 4 * 4 * z,
        pass_prompts,
        seq,
        available,
    })
}

/// `pairs` (prompt, answer) cut to at most `max_seq` tokens each: the answer's tail goes
/// first; a prompt that alone reaches the limit keeps its last `max_seq − 1` tokens and one
/// answer token. Returns how many pairs were cut.
pub fn cap_pairs(pairs: &mut [(Vec<u32>, Vec<u32>)], max_seq: Option<usize>) -> usize {
    let Some(max) = max_seq.map(|m| m.max(2)) else {
        return 0;
    };
    let mut cut = 0;
    for (p, a) in pairs.iter_mut() {
        if p.len() + a.len() <= max {
            continue;
        }
        cut += 1;
        if p.len() < max {
            a.truncate(max - p.len());
        } else {
            p.drain(..p.len() - (max - 1));
            a.truncate(1);
        }
    }
    cut
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sequences_are_capped_answer_first() {
        let mut pairs = vec![
            (vec![1, 2, 3], vec![4, 5, 6]),
            (vec![1, 2], vec![3]),
            (vec![1, 2, 3, 4, 5, 6], vec![7, 8]),
        ];
        assert_eq!(cap_pairs(&mut pairs, Some(4)), 2);
        assert_eq!(pairs[0], (vec![1, 2, 3], vec![4]));
        assert_eq!(pairs[1], (vec![1, 2], vec![3]));
        assert_eq!(pairs[2], (vec![4, 5, 6], vec![7]));
        assert_eq!(cap_pairs(&mut pairs, None), 0);
    }

    #[test]
    fn the_plan_counts_the_packed_base_once_and_refuses_other_forms() {
        let ck = Checkpoint::tiny(16, 24, 3);
        let mut cfg = TrainConfig {
            parameterization: Parameterization::LowRank,
            rank: 4,
            base: TrainBase::Packed,
            ..TrainConfig::default()
        };
        let packed = memory_plan(&ck, &cfg, 10).unwrap();
        cfg.base = TrainBase::Dense;
        let dense = memory_plan(&ck, &cfg, 10).unwrap();
        assert!(packed.packed && !dense.packed);
        assert!(packed.base < dense.base && packed.factors < dense.factors);
        assert_eq!(packed.activations, dense.activations);
        assert!(packed.to_string().contains("packed base"), "{packed}");
        cfg.checkpoint_activations = true;
        assert!(memory_plan(&ck, &cfg, 10).unwrap().activations < dense.activations);
        cfg.checkpoint_activations = false;
        // The tiny model always fits: auto keeps today's dense trainer.
        cfg.base = TrainBase::Auto;
        assert!(!memory_plan(&ck, &cfg, 10).unwrap().packed);
        cfg.parameterization = Parameterization::Paper;
        cfg.base = TrainBase::Packed;
        let err = memory_plan(&ck, &cfg, 10).unwrap_err().to_string();
        assert!(err.contains("low-rank"), "{err}");
    }
}
