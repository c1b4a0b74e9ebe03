//! SVF experts: the z vectors of one skill, their files, and attaching them to a model.
//!
//! An expert file is a safetensors file with one F32 tensor `<linear>.z` per target matrix and
//! header metadata: `format = "bitsvf-expert"`, the base model's content hash, the
//! parameterization, targets, domain, training config and validation accuracy. Loading an
//! expert onto a different base model is an error.

use crate::checkpoint::st::{write_safetensors, OwnedTensor, TensorFiles};
use crate::checkpoint::{linear_name, Checkpoint, LinearKind};
use crate::error::{Error, Result};
use crate::model::{LinearWeight, Model, ModelOptions, NamedVar, WeightMode};
use crate::svd::{Svd, SvdCache};
use crate::svf::{init_z, Parameterization, SvfWeight, Targets};
use candle_core::{Tensor, Var};
use rand::{rngs::StdRng, SeedableRng};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

const EXPERT_FORMAT: &str = "bitsvf-expert";

/// What an expert file says about itself.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ExpertMeta {
    /// Expert name.
    pub name: String,
    /// Content hash of the base model it was trained on.
    pub base_hash: String,
    /// How z is applied.
    pub parameterization: Parameterization,
    /// Which matrices carry z.
    pub targets: Targets,
    /// Domain(s) it was trained on.
    pub domains: Vec<String>,
    /// Best validation accuracy during training.
    pub val_accuracy: f64,
    /// The training settings, as JSON.
    pub training: serde_json::Value,
}

/// An expert: z per target matrix plus its metadata.
#[derive(Debug, Clone)]
pub struct Expert {
    /// Metadata.
    pub meta: ExpertMeta,
    /// z by linear name.
    pub z: BTreeMap<String, Vec<f32>>,
}

impl Expert {
    /// Write atomically.
    pub fn save(&self, path: &Path) -> Result<()> {
        let t: BTreeMap<String, OwnedTensor> = self
            .z
            .iter()
            .map(|(n, z)| (format!("{n}.z"), OwnedTensor::f32(vec![z.len()], z)))
            .collect();
        let meta = HashMap::from([
            ("format".to_string(), EXPERT_FORMAT.to_string()),
            (
                "expert".to_string(),
                serde_json::to_string(&self.meta).expect("json"),
            ),
        ]);
        write_safetensors(path, &t, Some(meta))
    }

    /// Read an expert file.
    pub fn load(path: &Path) -> Result<Expert> {
        let tf = TensorFiles::open(&[path.to_path_buf()])?;
        if tf.metadata("format") != Some(EXPERT_FORMAT) {
            return Err(Error::UnknownFormat {
                path: path.to_path_buf(),
                msg: "not a bitsvf expert file (header metadata format ≠ bitsvf-expert)".into(),
            });
        }
        let meta: ExpertMeta = serde_json::from_str(tf.metadata("expert").unwrap_or("null"))
            .map_err(|e| Error::config(path, "expert", e.to_string()))?;
        let mut z = BTreeMap::new();
        let names: Vec<String> = tf.names().map(str::to_string).collect();
        for n in names {
            let Some(base) = n.strip_suffix(".z") else {
                continue;
            };
            z.insert(base.to_string(), tf.get(&n)?.to_f32()?);
        }
        Ok(Expert { meta, z })
    }

    /// Error unless this expert was trained on `ck`.
    pub fn check_base(&self, ck: &Checkpoint, path: &Path) -> Result<()> {
        let hash = ck.content_hash();
        if self.meta.base_hash != hash {
            return Err(Error::config(
                path,
                "base_hash",
                format!(
                    "expert `{}` was trained on base model {}…, not on this model ({}…)",
                    self.meta.name,
                    &self.meta.base_hash[..12.min(self.meta.base_hash.len())],
                    &hash[..12]
                ),
            ));
        }
        Ok(())
    }
}

/// The target matrices of `ck` as (name, W, rows, cols), W = γ·W_t in f32.
pub fn target_matrices(ck: &Checkpoint, targets: Targets) -> Vec<(String, Vec<f32>, usize, usize)> {
    ck.linears()
        .filter(|(_, k, _)| targets.includes(*k))
        .map(|(n, _, l)| (n, l.matrix.dequantize(), l.matrix.rows, l.matrix.cols))
        .collect()
}

/// Thin SVDs of the target matrices, from the disk cache keyed by the model's content hash.
pub fn factors(
    ck: &Checkpoint,
    targets: Targets,
    cache: &SvdCache,
) -> Result<(BTreeMap<String, Svd>, crate::svd::CacheStats)> {
    let mats = target_matrices(ck, targets);
    let (out, stats) = cache
        .get_or_compute(&ck.content_hash(), &mats, |_, _| {})
        .map_err(|e| Error::Input(format!("SVD cache: {e}")))?;
    // Factors are stored in f32: a faithful decomposition reconstructs W to ~1e-7.
    if stats.max_relative_error > MAX_SVD_ERROR {
        return Err(Error::Check(format!(
            "SVD reconstruction error {:.2e} exceeds {MAX_SVD_ERROR:.0e} (‖W − UΣVᵀ‖/‖W‖)",
            stats.max_relative_error
        )));
    }
    Ok((out.into_iter().collect(), stats))
}

/// Largest accepted `‖W − UΣVᵀ‖_F / ‖W‖_F` of a target matrix.
pub const MAX_SVD_ERROR: f64 = 1e-4;

/// A model whose target linears run in SVF form with the given z tensors (variables while
/// training, constants otherwise). Non-target linears stay dense (dequantized).
pub fn svf_model(
    ck: &Checkpoint,
    options: ModelOptions,
    factors: &BTreeMap<String, Svd>,
    z: &BTreeMap<String, Tensor>,
    param: Parameterization,
) -> Result<Model> {
    let mut model = Model::new(
        ck,
        ModelOptions {
            mode: WeightMode::Dense,
            ..options
        },
    )?;
    let dev = model.device().clone();
    for (l, block) in model.blocks.iter_mut().enumerate() {
        for kind in LinearKind::ALL {
            let name = linear_name(l, kind);
            let (Some(f), Some(zt)) = (factors.get(&name), z.get(&name)) else {
                continue;
            };
            let w = SvfWeight::new(f, zt.clone(), param, options.dtype, &dev)?;
            block.linears[kind as usize].weight = LinearWeight::Svf(w);
        }
    }
    Ok(model)
}

/// Replace the z of every SVF linear of `model` named in `z` (the factors stay).
pub fn set_z(model: &mut Model, z: &BTreeMap<String, Tensor>) {
    for (l, block) in model.blocks.iter_mut().enumerate() {
        for kind in LinearKind::ALL {
            if let (LinearWeight::Svf(w), Some(zt)) = (
                &mut block.linears[kind as usize].weight,
                z.get(&linear_name(l, kind)),
            ) {
                w.z = zt.clone();
            }
        }
    }
}

/// Fresh z variables for every factored matrix (z₀ per the parameterization), seeded.
pub fn init_vars(
    factors: &BTreeMap<String, Svd>,
    param: Parameterization,
    options: ModelOptions,
    seed: u64,
) -> Result<Vec<NamedVar>> {
    let mut rng = StdRng::seed_from_u64(seed);
    factors
        .iter()
        .map(|(name, f)| {
            let z = init_z(param, f.sigma.len(), &mut rng);
            let t = Tensor::from_vec(z, f.sigma.len(), &candle_core::Device::Cpu)?
                .to_dtype(options.dtype)?;
            Ok((name.clone(), Var::from_tensor(&t)?))
        })
        .collect()
}

/// Constant z tensors from plain vectors.
pub fn z_tensors(
    z: &BTreeMap<String, Vec<f32>>,
    options: ModelOptions,
) -> Result<BTreeMap<String, Tensor>> {
    z.iter()
        .map(|(n, v)| {
            Ok((
                n.clone(),
                Tensor::from_slice(v, v.len(), &candle_core::Device::Cpu)?
                    .to_dtype(options.dtype)?,
            ))
        })
        .collect()
}

/// The expert's model: `ck` with the expert's z applied.
pub fn expert_model(
    ck: &Checkpoint,
    expert: &Expert,
    cache: &SvdCache,
    options: ModelOptions,
) -> Result<Model> {
    let (f, _) = factors(ck, expert.meta.targets, cache)?;
    for (name, z) in &expert.z {
        let Some(svd) = f.get(name) else {
            return Err(Error::Input(format!(
                "expert `{}` has a z for `{name}`, which is not a {:?} target of this model",
                expert.meta.name, expert.meta.targets
            )));
        };
        if svd.sigma.len() != z.len() {
            return Err(Error::Input(format!(
                "expert `{}`: z of `{name}` has {} entries, the matrix has rank {}",
                expert.meta.name,
                z.len(),
                svd.sigma.len()
            )));
        }
    }
    svf_model(
        ck,
        options,
        &f,
        &z_tensors(&expert.z, options)?,
        expert.meta.parameterization,
    )
}
