//! Dequantization and its recovery report (seed Option 1, docs/DESIGN.md §1 step 2): is the f32
//! model W = γ·W_t an exact stand-in for the ternary one?
//!
//! Two things are checked. Per matrix, that W re-ternarizes to the same W_t (so nothing was
//! lost). Per model, that the dense f32 forward pass reproduces the ternary model's next-token
//! argmax on a probe set — with BitNet's int8 activation quantization kept (the faithful
//! dequantized model; gated at ≥ 99%) and dropped (plain f32 activations; reported, since the
//! training path may run that way).

use crate::engine::checkpoint::Checkpoint;
use crate::engine::model::{argmax, HeadFormat, Model, ModelOptions, WeightMode};
use crate::engine::ternary::TernaryMatrix;
use crate::error::{Error, Result};
use candle_core::{DType, Tensor};
use rand::{rngs::StdRng, Rng, SeedableRng};
use serde::{Deserialize, Serialize};

/// Required argmax agreement of the dequantized model (docs/DESIGN.md §1).
pub const MIN_AGREEMENT: f64 = 0.99;

/// Exactness of one matrix.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MatrixRecovery {
    /// HF tensor prefix.
    pub name: String,
    /// max |W − γ·W_t| over the matrix (0 when exact).
    pub max_abs_error: f32,
    /// ‖W − γ·W_t‖ / ‖W‖.
    pub relative_error: f64,
    /// Ternarizing W again gives back W_t exactly.
    pub requantizes_exactly: bool,
}

/// Agreement of the dense model with the ternary model on the probe set.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ForwardRecovery {
    /// Activation quantization in the dense model.
    pub act_quant: bool,
    /// Share of positions whose argmax equals the ternary model's.
    pub argmax_agreement: f64,
    /// Mean KL(ternary ‖ dense) over positions, in nats.
    pub mean_kl: f64,
    /// Largest |Δ logit|.
    pub max_abs_logit_diff: f32,
    /// Whether agreement ≥ [`MIN_AGREEMENT`].
    pub passed: bool,
}

/// The report of `bitsvf dequantize --verify`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RecoveryReport {
    /// Per-matrix exactness.
    pub matrices: Vec<MatrixRecovery>,
    /// Whether every matrix re-ternarizes exactly.
    pub all_exact: bool,
    /// Probe rows × tokens.
    pub probe_positions: usize,
    /// Dense with int8 activations (gated).
    pub act_quant_kept: ForwardRecovery,
    /// Dense with f32 activations (reported).
    pub act_quant_dropped: ForwardRecovery,
}

/// Probe token rows: `rows` sequences of `len` ids drawn uniformly (seeded).
pub fn random_probe(vocab: usize, rows: usize, len: usize, seed: u64) -> Vec<Vec<u32>> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..rows)
        .map(|_| (0..len).map(|_| rng.gen_range(0..vocab as u32)).collect())
        .collect()
}

fn matrix_recovery(
    name: String,
    m: &TernaryMatrix,
    q: crate::engine::ternary::Quantization,
) -> MatrixRecovery {
    let w = m.dequantize();
    let values = m.values();
    let (mut max, mut num, mut den) = (0f32, 0f64, 0f64);
    for (r, row) in w.chunks(m.cols.max(1)).enumerate() {
        let g = m.scale(r);
        for (c, &x) in row.iter().enumerate() {
            let e = (x - g * values[r * m.cols + c] as f32).abs();
            max = max.max(e);
            num += (e as f64).powi(2);
            den += (x as f64).powi(2);
        }
    }
    let again = TernaryMatrix::quantize(&w, m.rows, m.cols, q);
    MatrixRecovery {
        name,
        max_abs_error: max,
        relative_error: if den > 0.0 { (num / den).sqrt() } else { 0.0 },
        requantizes_exactly: again.values() == values,
    }
}

fn log_softmax_vec(v: &[f32]) -> Vec<f64> {
    let m = v.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
    let lse = v.iter().map(|&x| (x as f64 - m).exp()).sum::<f64>().ln() + m;
    v.iter().map(|&x| x as f64 - lse).collect()
}

/// Logits of `model` on `probe`, flattened `[rows·T, vocab]`.
fn probe_logits(model: &Model, probe: &[Vec<u32>]) -> Result<Vec<f32>> {
    let ids = model.ids_tensor(probe)?;
    Ok(model
        .forward(&ids, None)?
        .to_dtype(DType::F32)?
        .flatten_all()?
        .to_vec1()?)
}

/// Compare two logit sets position by position.
pub fn compare_logits(
    reference: &[f32],
    other: &[f32],
    vocab: usize,
    act_quant: bool,
) -> ForwardRecovery {
    let (mut agree, mut kl, mut n, mut max) = (0usize, 0f64, 0usize, 0f32);
    for (a, b) in reference.chunks(vocab).zip(other.chunks(vocab)) {
        if argmax(a) == argmax(b) {
            agree += 1;
        }
        let (la, lb) = (log_softmax_vec(a), log_softmax_vec(b));
        kl += la
            .iter()
            .zip(&lb)
            .map(|(p, q)| p.exp() * (p - q))
            .sum::<f64>();
        max = a.iter().zip(b).fold(max, |m, (x, y)| m.max((x - y).abs()));
        n += 1;
    }
    let agreement = agree as f64 / n.max(1) as f64;
    ForwardRecovery {
        act_quant,
        argmax_agreement: agreement,
        mean_kl: kl / n.max(1) as f64,
        max_abs_logit_diff: max,
        passed: agreement >= MIN_AGREEMENT,
    }
}

/// How closely the output head held as another format reproduces the stored head: both
/// heads over the same final hidden states of the ternary model, the other format's one
/// position at a time as generation runs it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HeadRecovery {
    /// The format compared with the stored head.
    pub format: String,
    /// The stored head's dtype.
    pub stored: String,
    /// Bytes of the head in that format.
    pub bytes: usize,
    /// Bytes of the stored head.
    pub stored_bytes: usize,
    /// Probe positions compared.
    pub positions: usize,
    /// Share of positions whose argmax equals the stored head's.
    pub argmax_agreement: f64,
    /// Mean KL(stored ‖ format) over positions, in nats.
    pub mean_kl: f64,
    /// Largest |Δ logit|.
    pub max_abs_logit_diff: f32,
}

/// [`HeadRecovery`] of `format` on a [`random_probe`] of `rows` sequences of `len` ids (capped
/// by the model's context), one row at a time.
pub fn head_recovery(
    ck: &Checkpoint,
    format: HeadFormat,
    rows: usize,
    len: usize,
    seed: u64,
) -> Result<HeadRecovery> {
    let len = len.min(ck.config.max_position_embeddings);
    let probe = random_probe(ck.config.vocab_size, rows, len, seed);
    let stored = Model::new(ck, ModelOptions::default())?;
    let other = stored.clone().with_head(format)?;
    let vocab = ck.config.vocab_size;
    let (mut agree, mut kl, mut max, mut n) = (0f64, 0f64, 0f32, 0usize);
    for row in &probe {
        let h = stored.hidden_states(&stored.ids_tensor(std::slice::from_ref(row))?, None)?;
        let flat = |h: &Tensor, m: &Model| -> Result<Vec<f32>> {
            Ok(m.logits(h)?
                .flatten_all()?
                .to_dtype(DType::F32)?
                .to_vec1()?)
        };
        // The format's logits one position at a time: the head's decoding path, which
        // generation runs (a Q8_0 head quantizes its input there, as llama.cpp does).
        let mut decoded = Vec::with_capacity(row.len() * vocab);
        for i in 0..h.dim(1)? {
            decoded.extend(flat(&h.narrow(1, i, 1)?, &other)?);
        }
        let r = compare_logits(&flat(&h, &stored)?, &decoded, vocab, true);
        agree += r.argmax_agreement * row.len() as f64;
        kl += r.mean_kl * row.len() as f64;
        max = max.max(r.max_abs_logit_diff);
        n += row.len();
    }
    let n_f = n.max(1) as f64;
    let lm = ck.lm_head();
    Ok(HeadRecovery {
        format: format.name().to_string(),
        stored: lm.dtype().name().to_string(),
        bytes: match format {
            HeadFormat::Stored => lm.stored_bytes(),
            HeadFormat::Q8_0 => crate::engine::checkpoint::StoredDtype::Q8_0.bytes(lm.len()),
        },
        stored_bytes: lm.stored_bytes(),
        positions: n,
        argmax_agreement: agree / n_f,
        mean_kl: kl / n_f,
        max_abs_logit_diff: max,
    })
}

impl HeadRecovery {
    /// One line for `bitsvf inspect`.
    pub fn to_text(&self) -> String {
        format!(
            "\nhead as {}: {} ({:.2}× the stored {}); against the stored head over {} probe \
             positions: argmax agreement {:.2}%, mean KL {:.2e} nats, max |Δlogit| {:.2e}\n",
            self.format,
            crate::engine::inspect::human_bytes(self.bytes as u64),
            self.bytes as f64 / self.stored_bytes.max(1) as f64,
            self.stored,
            self.positions,
            100.0 * self.argmax_agreement,
            self.mean_kl,
            self.max_abs_logit_diff
        )
    }
}

/// [`verify`] on a [`random_probe`] of `rows` sequences of `len` ids (capped by the model's
/// context), seeded by `seed`.
pub fn verify_random(
    ck: &Checkpoint,
    rows: usize,
    len: usize,
    seed: u64,
) -> Result<RecoveryReport> {
    let len = len.min(ck.config.max_position_embeddings);
    verify(ck, &random_probe(ck.config.vocab_size, rows, len, seed))
}

/// Verify the dequantized model against the ternary one on `probe`.
pub fn verify(ck: &Checkpoint, probe: &[Vec<u32>]) -> Result<RecoveryReport> {
    let matrices: Vec<MatrixRecovery> = ck
        .linears()
        .filter_map(|(name, _, lin)| Some((name, lin.matrix.ternary()?)))
        .map(|(name, m)| matrix_recovery(name, m, ck.quantization))
        .collect();
    let build = |mode, act_quant| {
        Model::new(
            ck,
            ModelOptions {
                mode,
                act_quant,
                dtype: DType::F32,
                head: crate::engine::model::HeadFormat::Stored,
                defer_head_copy: false,
            },
        )
    };
    let reference = probe_logits(&build(WeightMode::Ternary, true)?, probe)?;
    let vocab = ck.config.vocab_size;
    let kept = compare_logits(
        &reference,
        &probe_logits(&build(WeightMode::Dense, true)?, probe)?,
        vocab,
        true,
    );
    let dropped = compare_logits(
        &reference,
        &probe_logits(&build(WeightMode::Dense, false)?, probe)?,
        vocab,
        false,
    );
    Ok(RecoveryReport {
        all_exact: matrices
            .iter()
            .all(|m| m.requantizes_exactly && m.max_abs_error == 0.0),
        matrices,
        probe_positions: probe.iter().map(Vec::len).sum(),
        act_quant_kept: kept,
        act_quant_dropped: dropped,
    })
}

impl RecoveryReport {
    /// Error unless the gated checks pass.
    pub fn check(&self) -> Result<()> {
        if !self.all_exact {
            let bad: Vec<&str> = self
                .matrices
                .iter()
                .filter(|m| !(m.requantizes_exactly && m.max_abs_error == 0.0))
                .map(|m| m.name.as_str())
                .collect();
            return Err(Error::Check(format!(
                "dequantized weights are not exactly γ·W_t for {} matrices (first: {})",
                bad.len(),
                bad[0]
            )));
        }
        if !self.act_quant_kept.passed {
            return Err(Error::Check(format!(
                "dequantized model reproduces the ternary argmax on only {:.2}% of {} probe \
                 positions (need ≥ {:.0}%)",
                100.0 * self.act_quant_kept.argmax_agreement,
                self.probe_positions,
                100.0 * MIN_AGREEMENT
            )));
        }
        Ok(())
    }

    /// Human-readable summary.
    pub fn to_text(&self) -> String {
        let exact = self
            .matrices
            .iter()
            .filter(|m| m.requantizes_exactly)
            .count();
        let worst = self
            .matrices
            .iter()
            .map(|m| m.max_abs_error)
            .fold(0f32, f32::max);
        let mut s = format!(
            "weights: {exact}/{} matrices re-ternarize exactly; max |W − γ·W_t| = {worst:e}\n",
            self.matrices.len()
        );
        for f in [&self.act_quant_kept, &self.act_quant_dropped] {
            s.push_str(&format!(
                "dense vs ternary, int8 activations {:<4}: argmax agreement {:>7.3}% over {} \
                 positions, mean KL {:.3e} nats, max |Δlogit| {:.3e}{}\n",
                if f.act_quant { "kept" } else { "off" },
                100.0 * f.argmax_agreement,
                self.probe_positions,
                f.mean_kl,
                f.max_abs_logit_diff,
                match (f.act_quant, f.passed) {
                    (true, true) => "  PASS (≥ 99%)",
                    (true, false) => "  FAIL (< 99%)",
                    (false, _) => "  (informational)",
                }
            ));
        }
        s
    }
}
