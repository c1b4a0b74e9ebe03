//! SVF experts: the z vectors of one skill, their files, and attaching them to a model.
//!
//! An expert file is a safetensors file with one F32 tensor `<linear>.z` per target matrix and
//! header metadata: `format = "bitsvf-expert"`, the base model's content hash, the
//! parameterization, targets, domain, training config and validation accuracy. Loading an
//! expert onto a different base model is an error.

use crate::engine::checkpoint::st::{write_safetensors, OwnedTensor, TensorFiles};
use crate::engine::checkpoint::{linear_name, Checkpoint, LinearKind};
use crate::engine::model::{LinearWeight, Model, ModelOptions, NamedVar, WeightMode};
use crate::error::{Error, Result};
use crate::svf::base::Base;
use crate::svf::svd::{Svd, SvdCache};
use crate::svf::{init_z, Parameterization, ScaleWeight, SvfWeight, Targets};
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
    /// Best validation accuracy during training (NaN, written as null, for a mixture).
    #[serde(deserialize_with = "nan_if_null")]
    pub val_accuracy: f64,
    /// The training settings, as JSON.
    pub training: serde_json::Value,
}

impl ExpertMeta {
    /// Whether `key` names this expert or one of the domains it was trained on (how settings
    /// such as `search.alpha_bounds` address experts).
    pub fn answers_to(&self, key: &str) -> bool {
        self.name == key || self.domains.iter().any(|d| d == key)
    }
}

fn nan_if_null<'de, D: serde::Deserializer<'de>>(d: D) -> std::result::Result<f64, D::Error> {
    Ok(Option::<f64>::deserialize(d)?.unwrap_or(f64::NAN))
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
            let t = tf.get(&n)?;
            if t.shape.len() != 1 {
                return Err(Error::Shape {
                    path: path.to_path_buf(),
                    tensor: n.clone(),
                    expected: vec![t.shape.iter().product()],
                    got: t.shape.to_vec(),
                });
            }
            let v = t.to_f32()?;
            if let Some(i) = v.iter().position(|x| !x.is_finite()) {
                return Err(Error::bad_value(path, &n, format!("entry {i} is {}", v[i])));
            }
            z.insert(base.to_string(), v);
        }
        if z.is_empty() {
            return Err(Error::MissingTensor {
                path: path.to_path_buf(),
                tensor: "<linear>.z (the file holds no z at all)".into(),
            });
        }
        Ok(Expert { meta, z })
    }

    /// Error unless this expert fits `ck`: a z for every target matrix of its target set and
    /// for nothing else, each of the length its parameterization needs on that matrix
    /// (paper/official: min(rows, cols); alpha-layer: 1; alpha-channel: rows; low-rank: the
    /// expert's own width k, or min(rows, cols) where that is smaller).
    pub fn check_shapes(&self, ck: &Checkpoint, path: &Path) -> Result<()> {
        let param = self.meta.parameterization;
        let k = self.z.values().map(Vec::len).max().unwrap_or(0);
        let mut want = BTreeMap::new();
        for (name, _, l) in ck
            .linears()
            .filter(|(_, kind, _)| self.meta.targets.includes(*kind))
        {
            let (rows, cols) = (l.matrix.rows, l.matrix.cols);
            want.insert(name, param.z_len(rows, rows.min(cols), k));
        }
        if let Some(name) = self.z.keys().find(|n| !want.contains_key(*n)) {
            return Err(Error::bad_value(
                path,
                format!("{name}.z"),
                format!(
                    "not a linear of the expert's target set `{}` on this model",
                    self.meta.targets.name()
                ),
            ));
        }
        for (name, &n) in &want {
            let Some(z) = self.z.get(name) else {
                return Err(Error::MissingTensor {
                    path: path.to_path_buf(),
                    tensor: format!("{name}.z (targets `{}`)", self.meta.targets.name()),
                });
            };
            if z.len() != n {
                return Err(Error::bad_value(
                    path,
                    format!("{name}.z"),
                    format!(
                        "has {} entries; a {} expert of this model needs {n}",
                        z.len(),
                        param.name()
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Read an expert file and check that it was trained on `ck` ([`Expert::check_base`]).
    pub fn load_for(path: &Path, ck: &Checkpoint) -> Result<Expert> {
        let e = Expert::load(path)?;
        e.check_base(ck, path)?;
        Ok(e)
    }

    /// Error unless this expert was trained on `ck` and fits it ([`Expert::check_shapes`]).
    pub fn check_base(&self, ck: &Checkpoint, path: &Path) -> Result<()> {
        self.check_base_hashed(ck, &ck.content_hash(), path)
    }

    /// [`Expert::check_base`] of `ck`, whose content hash `hash` the caller holds already.
    pub fn check_base_hashed(&self, ck: &Checkpoint, hash: &str, path: &Path) -> Result<()> {
        self.check_hash(hash, path)?;
        self.check_shapes(ck, path)
    }

    /// Error unless this expert was trained on the model of content hash `hash`.
    pub fn check_hash(&self, hash: &str, path: &Path) -> Result<()> {
        if self.meta.base_hash != hash {
            return Err(Error::config(
                path,
                "base_hash",
                format!(
                    "expert `{}` was trained on base model {}…, not on this model ({}…)",
                    self.meta.name,
                    &self.meta.base_hash[..12.min(self.meta.base_hash.len())],
                    hash.get(..12).unwrap_or(hash)
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
/// (A command that needs them more than once holds a [`Base`], which loads them once.)
pub fn factors(
    ck: &Checkpoint,
    targets: Targets,
    cache: &SvdCache,
) -> Result<(BTreeMap<String, Svd>, crate::svf::svd::CacheStats)> {
    factors_hashed(ck, &ck.content_hash(), targets, cache)
}

/// [`factors`] of `ck` whose content hash is `hash`.
pub(crate) fn factors_hashed(
    ck: &Checkpoint,
    hash: &str,
    targets: Targets,
    cache: &SvdCache,
) -> Result<(BTreeMap<String, Svd>, crate::svf::svd::CacheStats)> {
    let mats = target_matrices(ck, targets);
    let (out, stats) = cache
        .get_or_compute(hash, &mats, |_, _| {})
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

/// What getting the factors of a model's targets took: how many matrices, how many came from
/// the cache, and the worst reconstruction error.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct FactorsReport {
    /// Target matrices decomposed (0 when the parameterization needs no SVD).
    pub matrices: usize,
    /// Matrices read from the cache.
    pub cache_hits: usize,
    /// Matrices decomposed in this call.
    pub computed: usize,
    /// Wall time, seconds.
    pub seconds: f64,
    /// Largest `‖W − UΣVᵀ‖_F / ‖W‖_F`.
    pub max_relative_error: f64,
}

impl std::fmt::Display for FactorsReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "SVD of {} matrices: {} from the cache, {} computed in {:.1} s; largest ‖W − UΣVᵀ‖/‖W‖ = {:.1e}",
            self.matrices, self.cache_hits, self.computed, self.seconds, self.max_relative_error
        )
    }
}

/// The [`factors`] an expert of `param` on `targets` needs: none (and an empty report) for
/// the parameterizations that do not act on singular directions.
pub fn factors_for(
    ck: &Checkpoint,
    param: Parameterization,
    targets: Targets,
    cache: &SvdCache,
) -> Result<(BTreeMap<String, Svd>, FactorsReport)> {
    if !param.uses_svd() {
        return Ok(Default::default());
    }
    let (f, stats) = factors(ck, targets, cache)?;
    let report = FactorsReport {
        matrices: f.len(),
        cache_hits: stats.hits,
        computed: stats.computed,
        seconds: stats.seconds,
        max_relative_error: stats.max_relative_error,
    };
    Ok((f, report))
}

/// Largest accepted `‖W − UΣVᵀ‖_F / ‖W‖_F` of a target matrix.
pub const MAX_SVD_ERROR: f64 = 1e-4;

/// The length of z for every target matrix of `ck` under `param` (`rank`: the low-rank width
/// k). Parameterizations on singular directions need the target's factors in `factors`.
pub fn z_lengths(
    ck: &Checkpoint,
    targets: Targets,
    param: Parameterization,
    factors: &BTreeMap<String, Svd>,
    rank: usize,
) -> Result<BTreeMap<String, usize>> {
    ck.linears()
        .filter(|(_, k, _)| targets.includes(*k))
        .map(|(name, _, l)| {
            let (rows, cols) = (l.matrix.rows, l.matrix.cols);
            let r = if param.uses_svd() {
                factors
                    .get(&name)
                    .ok_or_else(|| Error::Input(format!("no SVD factors for `{name}`")))?
                    .sigma
                    .len()
            } else {
                rows.min(cols)
            };
            Ok((name, param.z_len(rows, r, rank)))
        })
        .collect()
}

/// A model whose target linears carry the given z tensors (variables while training,
/// constants otherwise) under `param`: in SVF form (paper, official), as the base plus a
/// low-rank delta, or as scaled rows (alpha). Other linears stay dense (dequantized).
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
            let Some(zt) = z.get(&name) else {
                continue;
            };
            let slot = &mut block.linears[kind as usize].weight;
            let LinearWeight::Dense(wt) = slot else {
                return Err(Error::Input(format!("`{name}` is not a dense linear")));
            };
            let svd = || {
                factors
                    .get(&name)
                    .ok_or_else(|| Error::Input(format!("no SVD factors for `{name}`")))
            };
            *slot =
                match param {
                    Parameterization::Paper | Parameterization::Official => {
                        LinearWeight::Adapted(Box::new(SvfWeight::new(
                            svd()?,
                            zt.clone(),
                            param,
                            options.dtype,
                            &dev,
                        )?))
                    }
                    Parameterization::LowRank => LinearWeight::Adapted(Box::new(
                        SvfWeight::low_rank(svd()?, zt.clone(), wt.clone(), options.dtype, &dev)?,
                    )),
                    Parameterization::AlphaLayer | Parameterization::AlphaChannel => {
                        LinearWeight::Adapted(Box::new(ScaleWeight::new(wt.clone(), zt.clone())?))
                    }
                };
        }
    }
    Ok(model)
}

/// Replace the z of every adapted linear of `model` named in `z` (the factors stay).
pub fn set_z(model: &mut Model, z: &BTreeMap<String, Tensor>) {
    for (l, block) in model.blocks.iter_mut().enumerate() {
        for kind in LinearKind::ALL {
            if let (Some(slot), Some(zt)) = (
                block.linears[kind as usize].weight.z_mut(),
                z.get(&linear_name(l, kind)),
            ) {
                *slot = zt.clone();
            }
        }
    }
}

/// Fresh z variables of the given lengths (z₀ per the parameterization), seeded.
pub fn init_vars(
    lengths: &BTreeMap<String, usize>,
    param: Parameterization,
    options: ModelOptions,
    seed: u64,
) -> Result<Vec<NamedVar>> {
    let mut rng = StdRng::seed_from_u64(seed);
    lengths
        .iter()
        .map(|(name, &n)| {
            let z = init_z(param, n, &mut rng);
            let t = Tensor::from_vec(z, n, &candle_core::Device::Cpu)?.to_dtype(options.dtype)?;
            Ok((name.clone(), Var::from_tensor(&t)?))
        })
        .collect()
}

/// The z variables as tensors that track gradients (the z map of [`svf_model`] in training).
pub fn var_tensors(vars: &[NamedVar]) -> BTreeMap<String, Tensor> {
    vars.iter()
        .map(|(n, v)| (n.clone(), v.as_tensor().clone()))
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

/// The expert's model: `ck` with the expert's z applied (a one-off [`Base`]; see
/// [`adapted_model`]).
pub fn expert_model(
    ck: &Checkpoint,
    expert: &Expert,
    cache: &SvdCache,
    options: ModelOptions,
) -> Result<Model> {
    adapted_model(&Base::new(ck, cache), expert, options)
}

/// The expert's model: the base with the expert's z applied.
pub fn adapted_model(base: &Base, expert: &Expert, options: ModelOptions) -> Result<Model> {
    let ck = base.ck();
    let param = expert.meta.parameterization;
    let held;
    let no_factors = BTreeMap::new();
    let f = if param.uses_svd() {
        held = base.factors(expert.meta.targets)?;
        &held.svd
    } else {
        &no_factors
    };
    // Low-rank experts carry their own width k; the others must match the matrix exactly.
    expert.check_shapes(ck, Path::new(&format!("expert `{}`", expert.meta.name)))?;
    let k = expert.z.values().map(Vec::len).max().unwrap_or(0);
    let want = z_lengths(ck, expert.meta.targets, param, f, k)?;
    if let Some((name, z)) = (expert.z.iter()).find(|(n, z)| want.get(*n) != Some(&z.len())) {
        return Err(Error::Input(format!(
            "expert `{}`: z of `{name}` has {} entries; the SVD factors of this model give {:?}",
            expert.meta.name,
            z.len(),
            want.get(name)
        )));
    }
    svf_model(ck, options, f, &z_tensors(&expert.z, options)?, param)
}

/// The model of the expert file at `path` on `ck`, as it was trained (dense f32 weights), after
/// checking that the expert was trained on `ck`.
pub fn load_expert_model(ck: &Checkpoint, path: &Path, cache: &SvdCache) -> Result<Model> {
    let e = Expert::load_for(path, ck)?;
    let options = ModelOptions {
        mode: WeightMode::Dense,
        ..Default::default()
    };
    expert_model(ck, &e, cache, options)
}

/// The mixture Σ_k α_k of experts of one parameterization and target set, as one expert
/// ([`crate::svf::mix`]): paper-form z' for the SVD parameterizations (`factors` gives σ),
/// Σ α_k z_k for the others. A one-hot α reproduces that expert exactly.
pub fn mixture(
    experts: &[&Expert],
    alpha: &[f64],
    factors: &BTreeMap<String, Svd>,
) -> Result<Expert> {
    let first = experts
        .first()
        .ok_or_else(|| Error::Input("a mixture needs at least one expert".into()))?;
    if alpha.len() != experts.len() {
        return Err(Error::Input(format!(
            "{} mixture weights for {} experts",
            alpha.len(),
            experts.len()
        )));
    }
    let param = first.meta.parameterization;
    for e in experts {
        if e.meta.parameterization != param
            || e.meta.targets != first.meta.targets
            || e.meta.base_hash != first.meta.base_hash
            || e.z.keys().ne(first.z.keys())
        {
            return Err(Error::Input(format!(
                "experts `{}` and `{}` differ in parameterization, targets or base model and cannot be mixed",
                first.meta.name, e.meta.name
            )));
        }
    }
    let mut z = BTreeMap::new();
    for name in first.z.keys() {
        let zs: Vec<&[f32]> = experts.iter().map(|e| e.z[name].as_slice()).collect();
        let sigma: &[f32] = match factors.get(name) {
            Some(f) => &f.sigma,
            None if param.uses_svd() => {
                return Err(Error::Input(format!("no SVD factors for `{name}`")))
            }
            None => &[],
        };
        z.insert(name.clone(), crate::svf::mix(param, sigma, &zs, alpha));
    }
    let out_param = if param.uses_svd() && param != Parameterization::LowRank {
        Parameterization::Paper
    } else {
        param
    };
    Ok(Expert {
        meta: ExpertMeta {
            name: format!(
                "mixture({})",
                experts
                    .iter()
                    .zip(alpha)
                    .map(|(e, a)| format!("{}:{a:.3}", e.meta.name))
                    .collect::<Vec<_>>()
                    .join(",")
            ),
            parameterization: out_param,
            domains: experts
                .iter()
                .flat_map(|e| e.meta.domains.clone())
                .collect(),
            val_accuracy: f64::NAN,
            training: serde_json::json!({ "mixture": alpha }),
            ..first.meta.clone()
        },
        z,
    })
}

/// [`mixture`] of the expert files at `paths`, each checked against the base model `ck`.
pub fn mixture_of_files(
    ck: &Checkpoint,
    paths: &[std::path::PathBuf],
    alpha: &[f64],
    cache: &SvdCache,
) -> Result<Expert> {
    let experts = (paths.iter())
        .map(|p| Expert::load_for(p, ck))
        .collect::<Result<Vec<_>>>()?;
    let first = &experts
        .first()
        .ok_or_else(|| Error::Input("a mixture needs at least one expert".into()))?
        .meta;
    let (f, _) = factors_for(ck, first.parameterization, first.targets, cache)?;
    let refs: Vec<&Expert> = experts.iter().collect();
    mixture(&refs, alpha, &f)
}

/// A paper-SVF expert on the MLP targets of `ck` with every z = `value` (1 = the base),
/// for unit tests.
#[cfg(test)]
pub(crate) fn flat_paper_expert(
    ck: &Checkpoint,
    factors: &BTreeMap<String, Svd>,
    name: &str,
    value: f32,
) -> Expert {
    let z = z_lengths(ck, Targets::Mlp, Parameterization::Paper, factors, 0)
        .expect("z lengths of a test model")
        .into_iter()
        .map(|(n, len)| (n, vec![value; len]))
        .collect();
    test_expert(ck, name, Parameterization::Paper, z)
}

/// An MLP expert of `ck` named `name` with these z vectors, for unit tests.
#[cfg(test)]
pub(crate) fn test_expert(
    ck: &Checkpoint,
    name: &str,
    parameterization: Parameterization,
    z: BTreeMap<String, Vec<f32>>,
) -> Expert {
    Expert {
        meta: ExpertMeta {
            name: name.into(),
            base_hash: ck.content_hash(),
            parameterization,
            targets: Targets::Mlp,
            domains: vec![],
            val_accuracy: 0.0,
            training: serde_json::Value::Null,
        },
        z,
    }
}

/// A tiny model (`hidden`, `intermediate`, `seed`), its SVD cache in a scratch directory,
/// and flat paper experts `(name, z value)` on it, for unit tests.
#[cfg(test)]
pub(crate) struct FlatFixture {
    pub ck: Checkpoint,
    pub dir: tempfile::TempDir,
    pub cache: SvdCache,
    pub experts: Vec<Expert>,
}

#[cfg(test)]
pub(crate) fn flat_fixture(dims: (usize, usize, u64), experts: &[(&str, f32)]) -> FlatFixture {
    let ck = Checkpoint::tiny(dims.0, dims.1, dims.2);
    let dir = tempfile::tempdir().expect("scratch directory");
    let cache = SvdCache::new(dir.path().to_path_buf());
    let factors = factors(&ck, Targets::Mlp, &cache)
        .expect("factors of a test model")
        .0;
    let experts = (experts.iter())
        .map(|&(name, v)| flat_paper_expert(&ck, &factors, name, v))
        .collect();
    FlatFixture {
        ck,
        dir,
        cache,
        experts,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::DType;

    fn tiny() -> Checkpoint {
        Checkpoint::tiny(16, 24, 3)
    }

    const OPTIONS: ModelOptions = ModelOptions {
        mode: WeightMode::Dense,
        act_quant: true,
        dtype: DType::F32,
    };

    #[test]
    fn alpha_experts_fold_into_the_ternary_scales_exactly() {
        // Option 2's deployed form: W_t unchanged, γ multiplied by z (per matrix or per row).
        let ck = tiny();
        for param in [Parameterization::AlphaLayer, Parameterization::AlphaChannel] {
            let lengths = z_lengths(&ck, Targets::Mlp, param, &BTreeMap::new(), 0).unwrap();
            let z: BTreeMap<String, Vec<f32>> = lengths
                .iter()
                .map(|(n, &len)| (n.clone(), (0..len).map(|i| 0.5 + 0.1 * i as f32).collect()))
                .collect();
            let model = svf_model(
                &ck,
                OPTIONS,
                &BTreeMap::new(),
                &z_tensors(&z, OPTIONS).unwrap(),
                param,
            )
            .unwrap();
            let out = model.to_checkpoint().unwrap();
            for ((name, _, before), (_, _, after)) in ck.linears().zip(out.linears()) {
                assert_eq!(before.matrix.values(), after.matrix.values(), "{name}");
                for r in 0..before.matrix.rows {
                    let zr = z
                        .get(&name)
                        .map_or(1.0, |z| z[if z.len() == 1 { 0 } else { r }]);
                    let want = before.matrix.scale(r) * zr;
                    let got = after.matrix.scale(r);
                    assert!(
                        (got - want).abs() < 1e-6 * want,
                        "{name} row {r}: {got} vs {want}"
                    );
                }
            }
        }
    }

    #[test]
    fn expert_of_the_wrong_shape_is_a_clear_error() {
        let ck = tiny();
        let dir = tempfile::tempdir().unwrap();
        let cache = SvdCache::new(dir.path().to_path_buf());
        let lengths = z_lengths(
            &ck,
            Targets::Mlp,
            Parameterization::AlphaChannel,
            &BTreeMap::new(),
            0,
        )
        .unwrap();
        let mut z: BTreeMap<String, Vec<f32>> = lengths
            .iter()
            .map(|(n, &len)| (n.clone(), vec![1.0; len]))
            .collect();
        let first = z.keys().next().unwrap().clone();
        z.get_mut(&first).unwrap().push(1.0);
        let expert = test_expert(&ck, "x", Parameterization::AlphaChannel, z);
        let err = expert_model(&ck, &expert, &cache, OPTIONS)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains(&first) && err.contains("alpha-channel"),
            "{err}"
        );
    }

    #[test]
    fn one_hot_mixture_model_is_the_expert_model() {
        let ck = tiny();
        let dir = tempfile::tempdir().unwrap();
        let cache = SvdCache::new(dir.path().to_path_buf());
        let f = factors(&ck, Targets::Mlp, &cache).unwrap().0;
        for param in [Parameterization::Official, Parameterization::AlphaChannel] {
            let lengths = z_lengths(&ck, Targets::Mlp, param, &f, 0).unwrap();
            let make = |k: f32| {
                let z = (lengths.iter())
                    .map(|(n, &len)| {
                        (
                            n.clone(),
                            (0..len).map(|i| 0.5 + k * (i % 5) as f32).collect(),
                        )
                    })
                    .collect();
                test_expert(&ck, &format!("e{k}"), param, z)
            };
            let (a, b) = (make(0.1), make(0.2));
            let m = mixture(&[&a, &b], &[0.0, 1.0], &f).unwrap();
            let ids =
                candle_core::Tensor::new(&[[1u32, 4, 2, 7]], &candle_core::Device::Cpu).unwrap();
            let run = |e: &Expert| -> Vec<f32> {
                let model = expert_model(&ck, e, &cache, OPTIONS).unwrap();
                model
                    .forward(&ids, None)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1()
                    .unwrap()
            };
            let (want, got) = (run(&b), run(&m));
            let diff = want
                .iter()
                .zip(&got)
                .map(|(x, y)| (x - y).abs())
                .fold(0f32, f32::max);
            assert!(diff < 1e-4, "{param:?}: {diff}");
        }
        let a = Expert {
            meta: ExpertMeta {
                name: "a".into(),
                base_hash: ck.content_hash(),
                parameterization: Parameterization::Paper,
                targets: Targets::Mlp,
                domains: vec![],
                val_accuracy: 0.0,
                training: serde_json::Value::Null,
            },
            z: BTreeMap::new(),
        };
        let mut b = a.clone();
        b.meta.parameterization = Parameterization::AlphaLayer;
        assert!(mixture(&[&a, &b], &[0.5, 0.5], &f).is_err());
        assert!(mixture(&[&a], &[0.5, 0.5], &f).is_err());
    }

    /// A tiny model, a scratch directory and a flat paper expert on it.
    fn flat_expert_in_tempdir(name: &str) -> (Checkpoint, tempfile::TempDir, Expert) {
        let mut fx = flat_fixture((16, 24, 2), &[(name, 1.0)]);
        (fx.ck, fx.dir, fx.experts.remove(0))
    }

    /// Expert files that do not fit the base are refused by name: a z of the wrong shape,
    /// no z at all, one z missing, a target set the z do not cover.
    #[test]
    fn expert_files_that_do_not_fit_the_base_are_refused() {
        let (ck, dir, good) = flat_expert_in_tempdir("good");
        let path = dir.path().join("e.safetensors");
        good.save(&path).unwrap();
        Expert::load_for(&path, &ck).unwrap();
        let first = good.z.keys().next().unwrap().clone();
        type Edit = Box<dyn Fn(&mut Expert)>;
        let cases: Vec<(&str, Edit, &str)> = vec![
            (
                "short",
                Box::new(|e: &mut Expert| {
                    e.z.values_mut().next().unwrap().pop();
                }),
                "entries",
            ),
            (
                "missing",
                Box::new(|e: &mut Expert| {
                    e.z.pop_first();
                }),
                "missing tensor",
            ),
            (
                "all",
                Box::new(|e: &mut Expert| e.meta.targets = Targets::All),
                "missing tensor",
            ),
            (
                "extra",
                Box::new(|e: &mut Expert| {
                    e.z.insert("model.nowhere".into(), vec![1.0]);
                }),
                "model.nowhere",
            ),
        ];
        for (name, edit, says) in cases {
            let mut e = good.clone();
            edit(&mut e);
            let p = dir.path().join(format!("{name}.safetensors"));
            e.save(&p).unwrap();
            let err = Expert::load_for(&p, &ck).unwrap_err().to_string();
            assert!(
                err.contains(says) && err.contains(&format!("{name}.safetensors")),
                "{name}: {err}"
            );
        }
        // No z at all, a 2-D z, a NaN z: refused when read.
        let write = |name: &str, t: BTreeMap<String, OwnedTensor>| {
            let p = dir.path().join(format!("{name}.safetensors"));
            let meta = HashMap::from([
                ("format".to_string(), EXPERT_FORMAT.to_string()),
                (
                    "expert".to_string(),
                    serde_json::to_string(&good.meta).unwrap(),
                ),
            ]);
            write_safetensors(&p, &t, Some(meta)).unwrap();
            Expert::load(&p).unwrap_err().to_string()
        };
        assert!(write("none", BTreeMap::new()).contains("no z at all"));
        let n = good.z[&first].len();
        let flat2 = OwnedTensor::f32(vec![1, n], &good.z[&first]);
        assert!(
            write("matrix", BTreeMap::from([(format!("{first}.z"), flat2)]))
                .contains("has shape [1,")
        );
        let mut nan = good.z[&first].clone();
        nan[0] = f32::NAN;
        let t = OwnedTensor::f32(vec![n], &nan);
        assert!(write("nan", BTreeMap::from([(format!("{first}.z"), t)])).contains("NaN"));
    }

    /// The same expert always gives the same bytes (header metadata in key order).
    #[test]
    fn expert_files_are_deterministic_bytes() {
        let (_, dir, e) = flat_expert_in_tempdir("same");
        let bytes: Vec<Vec<u8>> = (0..8)
            .map(|i| {
                let p = dir.path().join(format!("{i}.safetensors"));
                e.save(&p).unwrap();
                std::fs::read(&p).unwrap()
            })
            .collect();
        assert!(bytes.windows(2).all(|w| w[0] == w[1]));
        let back = Expert::load(&dir.path().join("0.safetensors")).unwrap();
        assert_eq!((back.meta, back.z), (e.meta, e.z));
    }
}
