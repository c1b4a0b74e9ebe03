//! Attaching z to a model: the SVF model whose target linears carry z (variables while
//! training, constants otherwise), fresh z variables, and an expert's model on its base.

use crate::engine::checkpoint::{linear_name, Checkpoint, LinearKind, LinearMatrix};
use crate::engine::model::{
    AdaptedLinear, LinearWeight, Model, ModelOptions, NamedVar, WeightMode,
};
use crate::error::{Error, Result};
use crate::svf::base::Base;
use crate::svf::expert::Expert;
use crate::svf::factors::z_lengths;
use crate::svf::svd::{Svd, SvdCache};
use crate::svf::{init_z, Parameterization, ScaleWeight, SvfWeight};
use candle_core::{Device, Tensor, Var};
use rand::{rngs::StdRng, SeedableRng};
use std::collections::BTreeMap;
use std::path::Path;

/// `ck`'s model in weight `mode` with the linear of every name in `z` replaced by
/// `adapt(name, its weight, its z, device)`.
fn with_targets(
    ck: &Checkpoint,
    options: ModelOptions,
    mode: WeightMode,
    z: &BTreeMap<String, Tensor>,
    mut adapt: impl FnMut(&str, &LinearWeight, &Tensor, &Device) -> Result<LinearWeight>,
) -> Result<Model> {
    let mut model = Model::new(ck, ModelOptions { mode, ..options })?;
    let dev = model.device().clone();
    for (l, block) in model.blocks.iter_mut().enumerate() {
        for kind in LinearKind::ALL {
            let name = linear_name(l, kind);
            if let Some(zt) = z.get(&name) {
                let slot = &mut block.linears[kind as usize].weight;
                *slot = adapt(&name, slot, zt, &dev)?;
            }
        }
    }
    Ok(model)
}

/// The SVD factors of target `name`, or an error naming it.
fn factors_of<'a>(factors: &'a BTreeMap<String, Svd>, name: &str) -> Result<&'a Svd> {
    factors
        .get(name)
        .ok_or_else(|| Error::Input(format!("no SVD factors for `{name}`")))
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
    let dt = options.dtype;
    with_targets(
        ck,
        options,
        WeightMode::Dense,
        z,
        |name, weight, zt, dev| {
            let LinearWeight::Dense(wt) = weight else {
                return Err(Error::Input(format!("`{name}` is not a dense linear")));
            };
            let (zt, wt) = (zt.clone(), wt.clone());
            let adapted: Box<dyn AdaptedLinear> =
                match param {
                    Parameterization::Paper | Parameterization::Official => Box::new(
                        SvfWeight::new(factors_of(factors, name)?, zt, param, dt, dev)?,
                    ),
                    Parameterization::LowRank => Box::new(SvfWeight::low_rank(
                        factors_of(factors, name)?,
                        zt,
                        wt,
                        dt,
                        dev,
                    )?),
                    Parameterization::AlphaLayer | Parameterization::AlphaChannel => {
                        Box::new(ScaleWeight::new(wt, zt)?)
                    }
                };
            Ok(LinearWeight::Adapted(adapted))
        },
    )
}

/// The low-rank SVF model over the packed base, the form training takes at scale: every
/// linear keeps its packed ternary codes and runs the integer kernel (differentiable in x,
/// [`crate::engine::ops::ternary_linear`]) — a float base keeps its stored matrices and runs
/// [`crate::engine::ops::matmul_rows`]; each target in `z` adds the delta
/// U_k diag(σ_k⊙(z − 1)) V_kᵀ on the same int8-quantized activations. No dense W and no full
/// U/V are held: the factors need only the top k triplets. Equal, to float rounding, to
/// [`svf_model`] with [`Parameterization::LowRank`] on the same factors.
pub fn packed_svf_model(
    ck: &Checkpoint,
    options: ModelOptions,
    factors: &BTreeMap<String, Svd>,
    z: &BTreeMap<String, Tensor>,
) -> Result<Model> {
    with_targets(
        ck,
        options,
        WeightMode::Ternary,
        z,
        |name, weight, zt, dev| {
            let base = match weight {
                LinearWeight::Ternary(m) => LinearMatrix::Ternary(m.clone()),
                LinearWeight::Float(m) => LinearMatrix::Float(m.clone()),
                _ => return Err(Error::Input(format!("`{name}` is not a stored linear"))),
            };
            let svd = factors_of(factors, name)?;
            let delta = SvfWeight::low_rank_delta(svd, zt.clone(), options.dtype, dev)?;
            Ok(LinearWeight::Hybrid(base, Box::new(delta)))
        },
    )
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

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::svf::expert::test_expert;
    use crate::svf::Targets;
    use candle_core::DType;

    /// The tiny model the SVF unit tests share.
    pub(crate) fn tiny() -> Checkpoint {
        Checkpoint::tiny(16, 24, 3)
    }

    /// Dense f32 weights with int8 activations.
    pub(crate) const OPTIONS: ModelOptions = ModelOptions {
        mode: WeightMode::Dense,
        act_quant: true,
        dtype: DType::F32,
        head: crate::engine::model::HeadFormat::Stored,
        defer_head_copy: false,
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
                assert_eq!(
                    before.matrix.ternary().unwrap().values(),
                    after.matrix.ternary().unwrap().values(),
                    "{name}"
                );
                for r in 0..before.matrix.rows() {
                    let zr = z
                        .get(&name)
                        .map_or(1.0, |z| z[if z.len() == 1 { 0 } else { r }]);
                    let want = before.matrix.ternary().unwrap().scale(r) * zr;
                    let got = after.matrix.ternary().unwrap().scale(r);
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
}
