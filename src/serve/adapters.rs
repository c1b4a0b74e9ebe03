//! Experts resident over one packed base, as the server runs them: the SVD factors of the
//! target matrices are shared (V_k `[in, k]`, U_kᵀ `[k, out]`), and an adapter is one scale
//! vector per target, the change of the singular values it applies (σ ⊙ (z − 1) in the paper
//! form). A step of mixed-expert rows adds `((x_q V_k) ⊙ S) U_kᵀ`, S holding each row's
//! adapter (zeros for the base): the base's packed matrices are read once for every row.

use crate::engine::checkpoint::{linear_name, LinearKind};
use crate::engine::model::RowDeltas;
use crate::engine::ops::fake_quant_ste;
use crate::error::{Error, Result};
use crate::svf::expert::Expert;
use crate::svf::svd::Svd;
use crate::svf::{applied_scale, Targets};
use candle_core::{Device, Tensor};
use std::collections::BTreeMap;

/// One target's shared factors, truncated to the served rank.
struct TargetFactors {
    name: String,
    sigma: Vec<f32>,
    /// V_k `[in, k]`.
    v: Tensor,
    /// U_kᵀ `[k, out]`.
    u_t: Tensor,
}

/// One adapter: per target, in [`Factors`] order, the change of the applied singular values
/// over the served directions.
#[derive(Debug)]
pub struct Adapter {
    /// Its name (an expert, `mixture`, or a per-request mixture).
    pub name: String,
    delta: Vec<Vec<f32>>,
    /// Share of the adapter's delta energy (Σ over targets of the squared singular-value
    /// changes) that the served rank keeps: 1 at full rank.
    pub energy_kept: f64,
}

/// The shared factors of the target matrices.
pub struct Factors {
    /// The target set.
    pub targets: Targets,
    /// Directions served per matrix.
    pub rank: usize,
    index: BTreeMap<(usize, LinearKind), usize>,
    matrices: Vec<TargetFactors>,
}

impl Factors {
    /// The factors of `svd` (every `targets` matrix of a `layers`-layer model), each kept to its
    /// top `rank` directions (`None`: all of them, which serves every expert exactly).
    pub fn new(
        svd: &BTreeMap<String, Svd>,
        targets: Targets,
        layers: usize,
        rank: Option<usize>,
    ) -> Result<Self> {
        let (mut index, mut matrices, mut served) = (BTreeMap::new(), Vec::new(), 0);
        for layer in 0..layers {
            for kind in LinearKind::ALL.into_iter().filter(|&k| targets.includes(k)) {
                let name = linear_name(layer, kind);
                let f = svd
                    .get(&name)
                    .ok_or_else(|| Error::Input(format!("no SVD factors for `{name}`")))?;
                let r = f.sigma.len();
                let k = rank.unwrap_or(r).min(r);
                if k == 0 {
                    return Err(Error::Input("the served rank must be at least 1".into()));
                }
                served = served.max(k);
                let top = f.truncate(k);
                let dev = &Device::Cpu;
                index.insert((layer, kind), matrices.len());
                matrices.push(TargetFactors {
                    v: Tensor::from_vec(top.v, (f.cols, k), dev)?,
                    u_t: Tensor::from_vec(top.u, (f.rows, k), dev)?
                        .t()?
                        .contiguous()?,
                    sigma: top.sigma,
                    name,
                });
            }
        }
        Ok(Factors {
            targets,
            rank: served,
            index,
            matrices,
        })
    }

    /// `expert` as an adapter over these factors (paper, official or low-rank SVF on these
    /// targets), on at most `rank` directions (`None`: all served); `svd` gives the full
    /// spectra, to measure the energy the served rank drops.
    pub fn adapter(
        &self,
        expert: &Expert,
        svd: &BTreeMap<String, Svd>,
        rank: Option<usize>,
    ) -> Result<Adapter> {
        let param = expert.meta.parameterization;
        if !param.uses_svd() || expert.meta.targets != self.targets {
            return Err(Error::Input(format!(
                "expert `{}` ({} on {}) cannot be served over the {} factors: serving needs SVF \
                 experts on the same targets",
                expert.meta.name,
                param.name(),
                expert.meta.targets.name(),
                self.targets.name()
            )));
        }
        let (mut kept, mut total) = (0.0, 0.0);
        let mut delta = Vec::with_capacity(self.matrices.len());
        for t in &self.matrices {
            let z = expert.z.get(&t.name).ok_or_else(|| {
                Error::Input(format!(
                    "expert `{}` has no z for `{}`",
                    expert.meta.name, t.name
                ))
            })?;
            let full = &svd[&t.name].sigma;
            if z.len() > full.len() {
                return Err(Error::Input(format!(
                    "expert `{}`: z of `{}` has {} entries for a matrix of rank {}",
                    expert.meta.name,
                    t.name,
                    z.len(),
                    full.len()
                )));
            }
            let applied = applied_scale(param, &full[..z.len()], z);
            let change: Vec<f64> = (applied.iter().zip(full))
                .map(|(a, &s)| a - s as f64)
                .collect();
            total += change.iter().map(|d| d * d).sum::<f64>();
            let k = rank.unwrap_or(usize::MAX).min(t.sigma.len());
            let mut d: Vec<f32> = change.iter().take(k).map(|&d| d as f32).collect();
            kept += change.iter().take(k).map(|d| d * d).sum::<f64>();
            d.resize(t.sigma.len(), 0.0);
            delta.push(d);
        }
        Ok(Adapter {
            name: expert.meta.name.clone(),
            delta,
            energy_kept: if total > 0.0 { kept / total } else { 1.0 },
        })
    }
}

/// The rows of one step and their adapters: what the packed base's linears add per row.
pub struct StepRows<'a> {
    factors: &'a Factors,
    /// Per row of the step, its adapter (`None`: the base).
    rows: Vec<Option<&'a Adapter>>,
}

impl<'a> StepRows<'a> {
    /// Rows in step order, each with its adapter.
    pub fn new(factors: &'a Factors, rows: Vec<Option<&'a Adapter>>) -> Self {
        StepRows { factors, rows }
    }
}

impl RowDeltas for StepRows<'_> {
    fn delta(
        &self,
        layer: usize,
        kind: LinearKind,
        x: &Tensor,
        act_quant: bool,
    ) -> Result<Option<Tensor>> {
        let Some(&i) = self.factors.index.get(&(layer, kind)) else {
            return Ok(None);
        };
        if self.rows.iter().all(Option::is_none) {
            return Ok(None);
        }
        let t = &self.factors.matrices[i];
        let k = t.sigma.len();
        let n = self.rows.len();
        let x = x.reshape((n, x.dim(candle_core::D::Minus1)?))?;
        let xq = if act_quant { fake_quant_ste(&x)? } else { x };
        let mut s = vec![0f32; n * k];
        for (row, a) in s.chunks_mut(k).zip(&self.rows) {
            if let Some(a) = a {
                row.copy_from_slice(&a.delta[i]);
            }
        }
        let s = Tensor::from_vec(s, (n, k), &Device::Cpu)?;
        let y = (xq.matmul(&t.v)? * s)?.matmul(&t.u_t)?;
        Ok(Some(y))
    }
}
