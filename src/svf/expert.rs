//! SVF experts: the z vectors of one skill, their files, and attaching them to a model.
//!
//! An expert file is a safetensors file with one F32 tensor `<linear>.z` per target matrix and
//! header metadata: `format = "bitsvf-expert"`, the base model's content hash, the
//! parameterization, targets, domain, training config and validation accuracy. Loading an
//! expert onto a different base model is an error.

use crate::engine::checkpoint::st::{write_safetensors, OwnedTensor, TensorFiles};
use crate::engine::checkpoint::Checkpoint;
use crate::error::{Error, Result};
use crate::svf::factors::factors;
use crate::svf::svd::{Svd, SvdCache};
use crate::svf::{Parameterization, Targets};
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
            let (rows, cols) = (l.matrix.rows(), l.matrix.cols());
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
    let f = match first.parameterization.uses_svd() {
        true => factors(ck, first.targets, cache)?.0,
        false => BTreeMap::new(),
    };
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
    let z = crate::svf::factors::z_lengths(ck, Targets::Mlp, Parameterization::Paper, factors, 0)
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
    let factors = crate::svf::factors::factors(&ck, Targets::Mlp, &cache)
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
    use crate::svf::attach::expert_model;
    use crate::svf::attach::tests::{tiny, OPTIONS};
    use crate::svf::factors::z_lengths;

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
