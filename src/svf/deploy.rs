//! The seed's integration options as deployed (DESIGN.md §5), each holding a set of experts
//! resident so a server can switch between them:
//!
//! | option | base as deployed | an expert is | switching does |
//! |---|---|---|---|
//! | dequantize (Option 1) | f32 W + the targets' SVD factors | z per target (paper SVF) | W' = U diag(σ⊙z) Vᵀ per target |
//! | alpha-layer (Option 2) | packed W_t, γ | one z per target | γ' = γ·z |
//! | alpha-channel (Option 2) | packed W_t, γ | z per output channel | γ'_r = γ·z_r |
//! | hybrid-lowrank (Option 3) | packed W_t + U_k, σ_k, V_k in f16 | z_k per target | swap the diagonal |
//! | requantize (Phase 8) | packed non-targets | packed ternary W' per target | swap packed matrices |
//! | requantize-channel | packed non-targets | packed W' with per-row scales | swap packed matrices |
//!
//! Ternary options run the model's ternary mode (the integer kernel); the hybrid delta runs on
//! the same quantized activations. [`Deployment::bytes`] counts what has to be resident.

use crate::engine::checkpoint::{linear_name, Checkpoint, LinearKind};
use crate::engine::model::{LinearWeight, Model, ModelOptions, WeightMode};
use crate::engine::ternary::requant::requantize;
use crate::engine::ternary::TernaryMatrix;
use crate::error::{Error, Result};
use crate::svf::attach::adapted_model;
use crate::svf::base::Base;
use crate::svf::expert::Expert;
use crate::svf::svd::Svd;
use crate::svf::{Parameterization, SvfWeight};
use candle_core::{DType, Device, Tensor};
use std::sync::Arc;

/// One of the integration options compared by `bitsvf compare-options`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeployOption {
    /// Option 1: dequantized f32 base, full SVF.
    Dequantize,
    /// Option 2: z scales each ternary matrix.
    AlphaLayer,
    /// Option 2: z scales each output channel's ternary scale.
    AlphaChannel,
    /// Option 3: packed base plus a runtime low-rank SVF delta.
    HybridLowRank,
    /// Full SVF experts re-quantized to ternary with one scale per matrix (the Phase 8 form).
    Requantize,
    /// The same with one scale per output channel.
    RequantizeChannel,
}

crate::value_names!(
    DeployOption,
    "option",
    [
        (Dequantize, "dequantize", ""),
        (AlphaLayer, "alpha-layer", ""),
        (AlphaChannel, "alpha-channel", ""),
        (HybridLowRank, "hybrid-lowrank", ""),
        (Requantize, "requantize", ""),
        (RequantizeChannel, "requantize-channel", ""),
    ]
);

impl DeployOption {
    /// The parameterization its experts are trained with.
    pub fn parameterization(self) -> Parameterization {
        match self {
            DeployOption::Dequantize
            | DeployOption::Requantize
            | DeployOption::RequantizeChannel => Parameterization::Paper,
            DeployOption::AlphaLayer => Parameterization::AlphaLayer,
            DeployOption::AlphaChannel => Parameterization::AlphaChannel,
            DeployOption::HybridLowRank => Parameterization::LowRank,
        }
    }

    fn requantizes(self) -> bool {
        matches!(
            self,
            DeployOption::Requantize | DeployOption::RequantizeChannel
        )
    }

    fn mode(self) -> WeightMode {
        match self {
            DeployOption::Dequantize => WeightMode::Dense,
            _ => WeightMode::Ternary,
        }
    }
}

/// What one target linear keeps resident to switch experts.
enum Resident {
    /// Dequantize: the factors (an SVF weight whose z is replaced per expert).
    Factors(SvfWeight),
    /// Alpha: the unscaled γ of the matrix (one or per row).
    Scales(Vec<f32>),
    /// Hybrid: nothing beyond the delta already in the model (its U_k, σ_k, V_k hold
    /// `factor_elems` numbers, stored in f16).
    Delta { factor_elems: usize },
    /// Requantize: the packed W' of every expert.
    Packed(Vec<Arc<TernaryMatrix>>),
}

struct Target {
    layer: usize,
    kind: LinearKind,
    name: String,
    resident: Resident,
}

/// A model deployed under one option with its experts resident.
pub struct Deployment {
    /// The option.
    pub option: DeployOption,
    /// The model as it runs, with the last applied expert (expert 0 after [`Deployment::new`]).
    pub model: Model,
    experts: Vec<Expert>,
    targets: Vec<Target>,
    float_bytes: usize,
}

/// Round to f16 and back: the hybrid factors are stored in half precision.
fn half_rounded(svd: &Svd) -> Svd {
    let h =
        |v: &[f32]| -> Vec<f32> { v.iter().map(|&x| half::f16::from_f32(x).to_f32()).collect() };
    Svd {
        rows: svd.rows,
        cols: svd.cols,
        u: h(&svd.u),
        sigma: h(&svd.sigma),
        v: h(&svd.v),
    }
}

impl Deployment {
    /// Deploy `base` under `option` with `experts` resident (all trained for this option's
    /// parameterization on this model, with the same targets).
    pub fn new(base: &Base, option: DeployOption, experts: Vec<Expert>) -> Result<Self> {
        let ck = base.ck();
        let param = option.parameterization();
        let first = experts
            .first()
            .ok_or_else(|| Error::Input("a deployment needs at least one expert".into()))?;
        let targets_kind = first.meta.targets;
        for e in &experts {
            if e.meta.parameterization != param || e.meta.targets != targets_kind {
                return Err(Error::Input(format!(
                    "expert `{}` is a {} expert on {:?}; option {} needs {} experts on {:?}",
                    e.meta.name,
                    e.meta.parameterization.name(),
                    e.meta.targets,
                    option.name(),
                    param.name(),
                    targets_kind
                )));
            }
            if e.meta.base_hash != base.hash() {
                return Err(Error::Input(format!(
                    "expert `{}` was trained on another base model",
                    e.meta.name
                )));
            }
        }
        // f32 with BitNet's int8 activations (ModelOptions' default), in the option's mode:
        // the ternary ones start from (a copy of) the base's packed model.
        let mut model = match option.mode() {
            WeightMode::Ternary => base.packed()?.clone(),
            mode => Model::new(
                ck,
                ModelOptions {
                    mode,
                    ..Default::default()
                },
            )?,
        };
        let held;
        let no_factors = Default::default();
        let f: &std::collections::BTreeMap<String, Svd> = if param.uses_svd() {
            held = base.factors(targets_kind)?;
            &held.svd
        } else {
            &no_factors
        };
        // Requantize: every expert's model in SVF form, whose W' is ternarized below.
        let mut adapted: Vec<Model> = Vec::new();
        if option.requantizes() {
            let dense = ModelOptions {
                mode: WeightMode::Dense,
                ..Default::default()
            };
            for e in &experts {
                adapted.push(adapted_model(base, e, dense)?);
            }
        }
        let dev = Device::Cpu;
        let mut targets = Vec::new();
        let linears = ck.layers.iter().enumerate().flat_map(|(l, layer)| {
            LinearKind::ALL
                .into_iter()
                .map(move |k| (l, k, linear_name(l, k), layer.linear(k)))
        });
        for (layer, kind, name, lin) in linears {
            if !targets_kind.includes(kind) {
                continue;
            }
            let z_len = first.z.get(&name).map(Vec::len).ok_or_else(|| {
                Error::Input(format!(
                    "expert `{}` has no z for `{name}`",
                    first.meta.name
                ))
            })?;
            let svd = || {
                f.get(&name)
                    .ok_or_else(|| Error::Input(format!("no SVD factors for `{name}`")))
            };
            let ones = Tensor::ones(z_len, DType::F32, &dev)?;
            let ternary = || {
                lin.matrix.ternary().ok_or_else(|| {
                    Error::Input(format!(
                        "the {} option needs a ternary base, but `{name}` is float ({})",
                        option.name(),
                        lin.matrix.dtype_name()
                    ))
                })
            };
            let resident = match option {
                DeployOption::Dequantize => Resident::Factors(SvfWeight::new(
                    svd()?,
                    ones,
                    Parameterization::Paper,
                    DType::F32,
                    &dev,
                )?),
                DeployOption::AlphaLayer | DeployOption::AlphaChannel => {
                    Resident::Scales(ternary()?.scales.clone())
                }
                DeployOption::HybridLowRank => {
                    let delta =
                        SvfWeight::low_rank_delta(&half_rounded(svd()?), ones, DType::F32, &dev)?;
                    let factor_elems =
                        delta.u_t.elem_count() + delta.v.elem_count() + delta.sigma.elem_count();
                    model.blocks[layer].linears[kind as usize].weight =
                        LinearWeight::Hybrid(lin.matrix.clone(), Box::new(delta));
                    Resident::Delta { factor_elems }
                }
                DeployOption::Requantize | DeployOption::RequantizeChannel => {
                    let per_channel = option == DeployOption::RequantizeChannel;
                    let mut packed = Vec::new();
                    for m in &adapted {
                        let Some(svf) = svf_form(&m.blocks[layer].linears[kind as usize].weight)
                        else {
                            return Err(Error::Input(format!("`{name}` is not an SVF linear")));
                        };
                        let (rows, cols) = (lin.matrix.rows(), lin.matrix.cols());
                        let w = svf.adapted_weight()?;
                        packed.push(Arc::new(requantize(&w, rows, cols, per_channel)));
                    }
                    Resident::Packed(packed)
                }
            };
            targets.push(Target {
                layer,
                kind,
                name,
                resident,
            });
        }
        let mut d = Deployment {
            option,
            model,
            experts,
            targets,
            float_bytes: float_bytes(ck),
        };
        d.apply(0)?;
        Ok(d)
    }

    /// The resident experts.
    pub fn experts(&self) -> &[Expert] {
        &self.experts
    }

    /// Replace resident expert `i` by `expert` (same parameterization and z lengths) and
    /// switch to it: how a search tries one mixture after another in the deployed form.
    pub fn set_expert(&mut self, i: usize, expert: Expert) -> Result<()> {
        let old = self
            .experts
            .get(i)
            .ok_or_else(|| Error::Input(format!("no expert {i} in this deployment")))?;
        let same_shape = expert.meta.parameterization == old.meta.parameterization
            && expert.z.len() == old.z.len()
            && (old.z.iter()).all(|(n, z)| expert.z.get(n).map(Vec::len) == Some(z.len()));
        if !same_shape {
            return Err(Error::Input(format!(
                "expert `{}` does not have the parameterization and z lengths of `{}`",
                expert.meta.name, old.meta.name
            )));
        }
        self.experts[i] = expert;
        self.apply(i)
    }

    /// Switch the model to expert `i`.
    pub fn apply(&mut self, i: usize) -> Result<()> {
        let expert = self
            .experts
            .get(i)
            .ok_or_else(|| Error::Input(format!("no expert {i} in this deployment")))?;
        for t in &mut self.targets {
            let z = expert.z.get(&t.name).ok_or_else(|| {
                Error::Input(format!(
                    "expert `{}` has no z for `{}`",
                    expert.meta.name, t.name
                ))
            })?;
            let slot = &mut self.model.blocks[t.layer].linears[t.kind as usize].weight;
            match (&mut t.resident, slot) {
                (Resident::Factors(svf), slot) => {
                    svf.z = Tensor::from_slice(z, z.len(), &Device::Cpu)?;
                    let (rows, cols) = (svf.u_t.dim(1)?, svf.v.dim(0)?);
                    let wt = Tensor::from_vec(svf.adapted_weight()?, (rows, cols), &Device::Cpu)?
                        .t()?
                        .contiguous()?;
                    *slot = LinearWeight::Dense(wt);
                }
                (Resident::Scales(base), LinearWeight::Ternary(m)) => {
                    let rows = m.rows;
                    let scales: Vec<f32> = if z.len() == 1 && base.len() == 1 {
                        vec![base[0] * z[0]]
                    } else {
                        (0..rows)
                            .map(|r| {
                                base[if base.len() == 1 { 0 } else { r }]
                                    * z[if z.len() == 1 { 0 } else { r }]
                            })
                            .collect()
                    };
                    // The deployment owns the matrix: scales change in place, codes stay.
                    Arc::make_mut(m).scales = scales;
                }
                (Resident::Delta { .. }, LinearWeight::Hybrid(_, delta)) => {
                    *delta.z_mut() = Tensor::from_slice(z, z.len(), &Device::Cpu)?;
                }
                (Resident::Packed(per_expert), slot) => {
                    *slot = LinearWeight::Ternary(per_expert[i].clone());
                }
                _ => unreachable!("targets are built to match their linears"),
            }
        }
        Ok(())
    }

    /// Bytes resident for the base and all experts, as deployed.
    pub fn bytes(&self) -> usize {
        let is_target =
            |l: usize, k: LinearKind| self.targets.iter().any(|t| t.layer == l && t.kind == k);
        let mut total = self.float_bytes;
        for (l, b) in self.model.blocks.iter().enumerate() {
            for (kind, lin) in LinearKind::ALL.into_iter().zip(&b.linears) {
                total += lin.bias.as_ref().map_or(0, |b| 4 * b.elem_count());
                if self.option.requantizes() && is_target(l, kind) {
                    continue; // counted with the experts' packed matrices below
                }
                total += match &lin.weight {
                    LinearWeight::Dense(wt) => 4 * wt.elem_count(),
                    LinearWeight::Ternary(m) => m.packed_bytes(),
                    LinearWeight::Hybrid(m, _) => m.stored_bytes(),
                    LinearWeight::Float(m) => m.stored_bytes(),
                    _ => 0,
                };
            }
        }
        for t in &self.targets {
            total += match &t.resident {
                Resident::Factors(svf) => {
                    4 * (svf.u_t.elem_count() + svf.v.elem_count() + svf.sigma.elem_count())
                }
                Resident::Scales(s) => 4 * s.len(),
                Resident::Delta { factor_elems } => HALF * factor_elems,
                Resident::Packed(p) => p.iter().map(|m| m.packed_bytes()).sum(),
            };
        }
        // Requantized experts are their packed matrices; the others add their z vectors.
        if !self.option.requantizes() {
            total += (self.experts.iter())
                .map(|e| 4 * e.z.values().map(Vec::len).sum::<usize>())
                .sum::<usize>();
        }
        total
    }
}

/// Bytes per element of the hybrid factors (f16).
const HALF: usize = 2;

/// Bytes of the f32 tensors that are not ternary linears (embeddings, lm_head, norms).
pub fn float_bytes(ck: &Checkpoint) -> usize {
    let lm_head = if ck.config.tie_word_embeddings {
        0
    } else {
        ck.lm_head().len()
    };
    let norms: usize = ck
        .layers
        .iter()
        .map(|l| {
            l.input_layernorm.len()
                + l.post_attention_layernorm.len()
                + l.attn_sub_norm.as_ref().map_or(0, Vec::len)
                + l.ffn_sub_norm.as_ref().map_or(0, Vec::len)
        })
        .sum();
    4 * (ck.embed_tokens.len() + lm_head + ck.norm.len() + norms)
}

/// Bytes of `ck` as shipped: packed ternary linears, their biases and the f32 rest.
pub fn packed_bytes(ck: &Checkpoint) -> usize {
    float_bytes(ck)
        + ck.linears()
            .map(|(_, _, l)| l.matrix.stored_bytes() + 4 * l.bias.as_ref().map_or(0, Vec::len))
            .sum::<usize>()
}

/// Bytes of `ck` with every weight in f32 (the reference the deployed forms are compared to).
pub fn f32_bytes(ck: &Checkpoint) -> usize {
    let linear: usize = ck
        .linears()
        .map(|(_, _, l)| l.matrix.rows() * l.matrix.cols() + l.bias.as_ref().map_or(0, Vec::len))
        .sum();
    4 * linear + float_bytes(ck)
}

/// The SVF form of an adapted linear, if it is one.
fn svf_form(w: &LinearWeight) -> Option<&SvfWeight> {
    match w {
        LinearWeight::Adapted(a) => a.as_any().downcast_ref::<SvfWeight>(),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::svf::attach::expert_model;
    use crate::svf::factors::{factors, z_lengths};
    use crate::svf::svd::SvdCache;
    use crate::svf::Targets;
    use std::collections::BTreeMap;

    fn tiny() -> Checkpoint {
        Checkpoint::tiny(32, 48, 7)
    }

    /// A made-up expert: z = 1 + a seeded wiggle (k = 8 for low-rank).
    fn expert(ck: &Checkpoint, cache: &SvdCache, param: Parameterization, seed: usize) -> Expert {
        let f = if param.uses_svd() {
            factors(ck, Targets::Mlp, cache).unwrap().0
        } else {
            BTreeMap::new()
        };
        let z = z_lengths(ck, Targets::Mlp, param, &f, 8)
            .unwrap()
            .into_iter()
            .map(|(n, len)| {
                let z = (0..len)
                    .map(|i| 1.0 + 0.3 * (((i * 13 + seed * 7) % 17) as f32 / 17.0 - 0.4))
                    .collect();
                (n, z)
            })
            .collect();
        crate::svf::expert::test_expert(ck, &format!("e{seed}"), param, z)
    }

    fn max_diff(a: &[f32], b: &[f32]) -> f32 {
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f32::max)
    }

    #[test]
    fn each_option_runs_its_expert_as_trained() {
        // The deployed forward equals the training-time model of the same expert: exactly up
        // to float order for the dense and folded forms, up to f16 factors for the hybrid.
        let ck = tiny();
        let dir = tempfile::tempdir().unwrap();
        let cache = SvdCache::new(dir.path().to_path_buf());
        let dense = ModelOptions {
            mode: WeightMode::Dense,
            ..Default::default()
        };
        for (option, tol) in [
            (DeployOption::Dequantize, 1e-3),
            (DeployOption::AlphaLayer, 1e-3),
            (DeployOption::AlphaChannel, 1e-3),
            (DeployOption::HybridLowRank, 2e-2),
        ] {
            let param = option.parameterization();
            let experts = vec![expert(&ck, &cache, param, 1), expert(&ck, &cache, param, 2)];
            let base = Base::new(&ck, &cache);
            let mut d = Deployment::new(&base, option, experts.clone()).unwrap();
            for i in [0, 1, 0] {
                d.apply(i).unwrap();
                let want = expert_model(&ck, &experts[i], &cache, dense)
                    .unwrap()
                    .probe_logits();
                let got = d.model.probe_logits();
                let diff = max_diff(&got, &want);
                assert!(diff < tol, "{} expert {i}: {diff}", option.name());
            }
            // Switching really changes the model.
            let a = d.model.probe_logits();
            d.apply(1).unwrap();
            assert!(
                max_diff(&a, &d.model.probe_logits()) > 1e-3,
                "{}",
                option.name()
            );
        }
    }

    #[test]
    fn requantize_runs_the_ternarized_adapted_weights() {
        let ck = tiny();
        let dir = tempfile::tempdir().unwrap();
        let cache = SvdCache::new(dir.path().to_path_buf());
        let experts: Vec<Expert> = (1..=2)
            .map(|s| expert(&ck, &cache, Parameterization::Paper, s))
            .collect();
        let dense = ModelOptions {
            mode: WeightMode::Dense,
            ..Default::default()
        };
        let base = Base::new(&ck, &cache);
        let mut d = Deployment::new(&base, DeployOption::Requantize, experts.clone()).unwrap();
        let mut dc =
            Deployment::new(&base, DeployOption::RequantizeChannel, experts.clone()).unwrap();
        for i in [1, 0] {
            d.apply(i).unwrap();
            dc.apply(i).unwrap();
            let adapted = expert_model(&ck, &experts[i], &cache, dense).unwrap();
            // Per matrix: what `to_checkpoint` hands to the next stage.
            let q = adapted.to_checkpoint().unwrap();
            assert_eq!(
                d.model.probe_logits(),
                Model::new(&q, ModelOptions::default())
                    .unwrap()
                    .probe_logits()
            );
            // Per channel: every MLP target ternarized row by row.
            let mut qc = ck.clone();
            for (l, layer) in qc.layers.iter_mut().enumerate() {
                for kind in [LinearKind::Gate, LinearKind::Up, LinearKind::Down] {
                    let Some(svf) = svf_form(&adapted.blocks[l].linears[kind as usize].weight)
                    else {
                        panic!("MLP targets are SVF linears")
                    };
                    let m = &mut layer.linears[kind as usize].matrix;
                    let (rows, cols) = (m.rows(), m.cols());
                    let q = requantize(&svf.adapted_weight().unwrap(), rows, cols, true);
                    assert_eq!(q.scales.len(), rows);
                    *m = q.into();
                }
            }
            assert_eq!(
                dc.model.probe_logits(),
                Model::new(&qc, ModelOptions::default())
                    .unwrap()
                    .probe_logits()
            );
        }
    }

    #[test]
    fn bytes_count_what_each_option_keeps() {
        let ck = tiny();
        let dir = tempfile::tempdir().unwrap();
        let cache = SvdCache::new(dir.path().to_path_buf());
        let packed: usize = ck.linears().map(|(_, _, l)| l.matrix.stored_bytes()).sum();
        let floats = float_bytes(&ck);
        let mlp: Vec<(usize, usize)> = ck
            .linears()
            .filter(|(_, k, _)| k.is_mlp())
            .map(|(_, _, l)| (l.matrix.rows(), l.matrix.cols()))
            .collect();
        let bytes = |option: DeployOption| {
            let param = option.parameterization();
            let e = vec![expert(&ck, &cache, param, 1), expert(&ck, &cache, param, 2)];
            Deployment::new(&Base::new(&ck, &cache), option, e)
                .unwrap()
                .bytes()
        };
        // Two experts of one z per matrix, plus the unscaled γ per matrix.
        assert_eq!(
            bytes(DeployOption::AlphaLayer),
            packed + floats + 4 * mlp.len() + 2 * 4 * mlp.len()
        );
        let rows: usize = mlp.iter().map(|(r, _)| r).sum();
        // The running matrices carry per-row scales γ·z_r instead of one γ.
        assert_eq!(
            bytes(DeployOption::AlphaChannel),
            packed + 4 * (rows - mlp.len()) + floats + 4 * mlp.len() + 2 * 4 * rows
        );
        let k = 8;
        let factors: usize = mlp.iter().map(|(r, c)| 2 * (r + c + 1) * k).sum();
        assert_eq!(
            bytes(DeployOption::HybridLowRank),
            packed + floats + factors + 2 * 4 * k * mlp.len()
        );
        assert_eq!(
            f32_bytes(&ck),
            4 * ck
                .linears()
                .map(|(_, _, l)| l.matrix.rows() * l.matrix.cols())
                .sum::<usize>()
                + floats
        );
        assert!(bytes(DeployOption::Dequantize) > f32_bytes(&ck));
        // Requantize: the non-targets once, the targets once per expert (same packed size).
        let mlp_packed: usize = ck
            .linears()
            .filter(|(_, k, _)| k.is_mlp())
            .map(|(_, _, l)| l.matrix.stored_bytes())
            .sum();
        assert_eq!(
            bytes(DeployOption::Requantize),
            packed + floats + mlp_packed
        );
    }
}
