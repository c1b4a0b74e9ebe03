//! Adam / AdamW with global grad-norm clipping, whose state can be saved and restored so an
//! interrupted run resumes exactly (candle-nn's optimizers keep their moments private).

use crate::engine::checkpoint::st::OwnedTensor;
use crate::engine::model::NamedVar;
use crate::error::{Error, Result};
use candle_core::backprop::GradStore;
use candle_core::{DType, Tensor};
use std::collections::BTreeMap;

/// Hyper-parameters.
#[derive(Debug, Clone, Copy, serde::Serialize, serde::Deserialize)]
pub struct AdamConfig {
    /// Learning rate.
    pub lr: f64,
    /// β₁.
    pub beta1: f64,
    /// β₂.
    pub beta2: f64,
    /// ε.
    pub eps: f64,
    /// Decoupled weight decay (AdamW); 0 = Adam.
    pub weight_decay: f64,
    /// Clip the global gradient norm to this value (None = no clipping).
    pub max_grad_norm: Option<f64>,
}

impl Default for AdamConfig {
    fn default() -> Self {
        AdamConfig {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
            max_grad_norm: None,
        }
    }
}

/// Adam(W) over named variables.
pub struct Adam {
    /// Settings (lr may be changed between steps for schedules).
    pub config: AdamConfig,
    vars: Vec<NamedVar>,
    m: Vec<Tensor>,
    v: Vec<Tensor>,
    /// Steps taken.
    pub step: usize,
}

impl Adam {
    /// A fresh optimizer with zero moments.
    pub fn new(vars: Vec<NamedVar>, config: AdamConfig) -> Result<Self> {
        let m = vars
            .iter()
            .map(|(_, v)| v.zeros_like())
            .collect::<candle_core::Result<Vec<_>>>()?;
        let v = m.clone();
        Ok(Adam {
            config,
            vars,
            m,
            v,
            step: 0,
        })
    }

    /// The variables optimised.
    pub fn vars(&self) -> &[NamedVar] {
        &self.vars
    }

    /// Global L2 norm of the gradients (missing gradients count as zero).
    pub fn grad_norm(&self, grads: &GradStore) -> Result<f64> {
        let mut sq = 0f64;
        for (_, var) in &self.vars {
            if let Some(g) = grads.get(var.as_tensor()) {
                sq += g
                    .to_dtype(DType::F64)?
                    .sqr()?
                    .sum_all()?
                    .to_scalar::<f64>()?;
            }
        }
        Ok(sq.sqrt())
    }

    /// One update; returns the gradient norm before clipping.
    pub fn step(&mut self, grads: &GradStore) -> Result<f64> {
        let norm = self.grad_norm(grads)?;
        let clip = match self.config.max_grad_norm {
            Some(max) if norm > max && norm > 0.0 => max / norm,
            _ => 1.0,
        };
        self.step += 1;
        let c = self.config;
        let (b1, b2) = (c.beta1, c.beta2);
        let bc1 = 1.0 - b1.powi(self.step as i32);
        let bc2 = 1.0 - b2.powi(self.step as i32);
        for (i, (_, var)) in self.vars.iter().enumerate() {
            let Some(g) = grads.get(var.as_tensor()) else {
                continue;
            };
            let g = (g.detach() * clip)?;
            self.m[i] = ((&self.m[i] * b1)? + (&g * (1.0 - b1))?)?;
            self.v[i] = ((&self.v[i] * b2)? + (g.sqr()? * (1.0 - b2))?)?;
            let mhat = (&self.m[i] / bc1)?;
            let vhat = (&self.v[i] / bc2)?;
            let update = (mhat / (vhat.sqrt()? + c.eps)?)?;
            let w = var.as_tensor().detach();
            let w = if c.weight_decay > 0.0 {
                (&w * (1.0 - c.lr * c.weight_decay))?
            } else {
                w
            };
            var.set(&(w - (update * c.lr)?)?)?;
        }
        Ok(norm)
    }

    /// Parameters and moments as named f32 tensors (`<name>`, `<name>.adam_m`, `<name>.adam_v`).
    pub fn state(&self) -> Result<BTreeMap<String, OwnedTensor>> {
        let mut out = BTreeMap::new();
        let flat = |t: &Tensor| -> Result<(Vec<usize>, Vec<f32>)> {
            Ok((
                t.dims().to_vec(),
                t.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?,
            ))
        };
        for (i, (name, var)) in self.vars.iter().enumerate() {
            for (suffix, t) in [
                ("", var.as_tensor()),
                (".adam_m", &self.m[i]),
                (".adam_v", &self.v[i]),
            ] {
                let (shape, v) = flat(t)?;
                out.insert(format!("{name}{suffix}"), OwnedTensor::f32(shape, &v));
            }
        }
        Ok(out)
    }

    /// Restore parameters and moments saved by [`Adam::state`] (read back from `path`).
    pub fn load_state(
        &mut self,
        tf: &crate::engine::checkpoint::st::TensorFiles,
        step: usize,
    ) -> Result<()> {
        for (i, (name, var)) in self.vars.iter().enumerate() {
            let dims = var.dims().to_vec();
            let read = |n: String| -> Result<Tensor> {
                let t = tf.get(&n)?;
                t.expect_shape(&dims)?;
                Ok(Tensor::from_vec(t.to_f32()?, dims.clone(), var.device())?)
            };
            var.set(&read(name.clone())?)?;
            self.m[i] = read(format!("{name}.adam_m"))?;
            self.v[i] = read(format!("{name}.adam_v"))?;
        }
        if step == 0 {
            return Err(Error::Input("resumed optimizer state has step 0".into()));
        }
        self.step = step;
        Ok(())
    }
}

/// Half-cosine decay from `peak` at progress 0 to `min_ratio`·`peak` at progress ≥ 1.
pub fn cosine_lr(peak: f64, min_ratio: f64, progress: f64) -> f64 {
    let min = peak * min_ratio;
    min + 0.5 * (peak - min) * (1.0 + (std::f64::consts::PI * progress.min(1.0)).cos())
}

/// The resumable state a training loop keeps beside its output `out`
/// (`out.train-state.safetensors`): the optimizer's moments, the step reached, the settings the
/// run used (under `config_key`, JSON) and any loop-specific metadata and tensors.
pub struct ResumeState {
    /// The state file.
    pub path: std::path::PathBuf,
    files: crate::engine::checkpoint::st::TensorFiles,
    /// The step the saved run had reached.
    pub step: usize,
}

impl ResumeState {
    /// Where the state of a run writing `out` lives.
    pub fn path_for(out: &std::path::Path) -> std::path::PathBuf {
        out.with_extension("train-state.safetensors")
    }

    /// Opens the state of a run writing `out`, if any, refusing one saved with other settings.
    pub fn open<C>(out: &std::path::Path, config_key: &str, config: &C) -> Result<Option<Self>>
    where
        C: serde::de::DeserializeOwned + PartialEq,
    {
        let path = Self::path_for(out);
        if !path.is_file() {
            return Ok(None);
        }
        let files = crate::engine::checkpoint::st::TensorFiles::open(std::slice::from_ref(&path))?;
        let saved: C = serde_json::from_str(files.metadata(config_key).unwrap_or("null"))
            .map_err(|e| Error::config(&path, config_key, e.to_string()))?;
        if &saved != config {
            return Err(Error::config(
                &path,
                config_key,
                "the saved run used different settings; rerun without --resume to start afresh",
            ));
        }
        let mut state = ResumeState {
            path,
            files,
            step: 0,
        };
        state.step = state.get("step")?;
        Ok(Some(state))
    }

    /// A metadata value, parsed.
    pub fn get<T: std::str::FromStr>(&self, key: &str) -> Result<T> {
        self.files
            .metadata(key)
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| Error::config(&self.path, key, "missing or not a number"))
    }

    /// The stored tensors (optimizer moments and the loop's own).
    pub fn files(&self) -> &crate::engine::checkpoint::st::TensorFiles {
        &self.files
    }

    /// Writes (atomically) the state of a run writing `out` after `step` steps.
    pub fn save<C: serde::Serialize>(
        out: &std::path::Path,
        opt: &Adam,
        step: usize,
        (config_key, config): (&str, &C),
        meta: &[(&str, String)],
        tensors: BTreeMap<String, OwnedTensor>,
    ) -> Result<()> {
        let mut all = opt.state()?;
        all.extend(tensors);
        let mut m: std::collections::HashMap<String, String> = meta
            .iter()
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect();
        m.insert("step".into(), step.to_string());
        m.insert(
            config_key.into(),
            serde_json::to_string(config).expect("settings serialize"),
        );
        crate::engine::checkpoint::st::write_safetensors(&Self::path_for(out), &all, Some(m))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn matches_hand_computed_adam_step() {
        // One Adam step from w = [1, −2] on L = ½‖w‖²: g = w, m̂ = g, v̂ = g², update = sign(g)·lr
        // (up to ε), so w' = w − lr·sign(w).
        let w = Var::from_vec(vec![1f32, -2.0], 2, &Device::Cpu).unwrap();
        let mut opt = Adam::new(
            vec![("w".into(), w.clone())],
            AdamConfig {
                lr: 0.1,
                ..Default::default()
            },
        )
        .unwrap();
        let loss = (w.as_tensor().sqr().unwrap().sum_all().unwrap() * 0.5).unwrap();
        let norm = opt.step(&loss.backward().unwrap()).unwrap();
        assert!((norm - 5f64.sqrt()).abs() < 1e-6);
        let got: Vec<f32> = w.as_tensor().to_vec1().unwrap();
        assert!(
            (got[0] - 0.9).abs() < 1e-6 && (got[1] + 1.9).abs() < 1e-6,
            "{got:?}"
        );
    }

    #[test]
    fn clipping_scales_the_gradient() {
        // Clipping rescales g but Adam's first step is scale-invariant; the second step is not:
        // compare against the update computed by hand with the clipped gradient.
        let w = Var::from_vec(vec![3f32, 4.0], 2, &Device::Cpu).unwrap();
        let cfg = AdamConfig {
            lr: 0.1,
            max_grad_norm: Some(1.0),
            ..Default::default()
        };
        let mut opt = Adam::new(vec![("w".into(), w.clone())], cfg).unwrap();
        let loss = (w.as_tensor().sqr().unwrap().sum_all().unwrap() * 0.5).unwrap();
        let norm = opt.step(&loss.backward().unwrap()).unwrap();
        assert!((norm - 5.0).abs() < 1e-6);
        // m = 0.1·g_c, v = 0.001·g_c², with g_c = g/5 → update = lr·sign(g).
        let got: Vec<f32> = w.as_tensor().to_vec1().unwrap();
        assert!(
            (got[0] - 2.9).abs() < 1e-5 && (got[1] - 3.9).abs() < 1e-5,
            "{got:?}"
        );
        let m: Vec<f32> = opt.m[0].to_vec1().unwrap();
        assert!(
            (m[0] - 0.1 * 0.6).abs() < 1e-6 && (m[1] - 0.1 * 0.8).abs() < 1e-6,
            "{m:?}"
        );
    }
}
