//! Singular Value Fine-tuning (Transformer², arXiv 2501.06252, DESIGN.md §3).
//!
//! Each target matrix W = U diag(σ) Vᵀ gets one vector z ∈ ℝʳ. The forward pass never builds
//! W': y = ((x V) ⊙ s) Uᵀ with the applied scale s
//! - *paper*: s = σ ⊙ z, z₀ = 1 (so W' = W at the start);
//! - *official code*: m = sigmoid(p)·max_mult, s = (Σσ / Σ(σ⊙m)) · σ ⊙ m, p₀ = 0.1 + 0.01·N(0,1)
//!   (keeps the sum of singular values).
//!
//! Mixtures combine the *applied* scales, s' = Σ α_k s_k, and are expressed as a paper-form
//! z' = s'/σ, so a one-hot α reproduces that expert exactly under either parameterization.

use crate::checkpoint::LinearKind;
use crate::error::{Error, Result};
use crate::svd::Svd;
use candle_core::{DType, Device, Tensor};
use rand::Rng;
use serde::{Deserialize, Serialize};

/// How z maps to the applied singular-value scale.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Parameterization {
    /// s = σ ⊙ z, z₀ = 1.
    Paper,
    /// s = (Σσ / Σ(σ⊙m))·σ⊙m with m = sigmoid(z)·max_mult (max_mult = 1).
    Official,
}

/// The official code's `max_mult`.
pub const OFFICIAL_MAX_MULT: f64 = 1.0;

/// Which matrices carry a z vector.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Targets {
    /// gate/up/down of every layer (the official default).
    Mlp,
    /// q/k/v/o of every layer.
    Attn,
    /// All seven linears.
    All,
}

impl Targets {
    /// Whether `kind` is a target.
    pub fn includes(self, kind: LinearKind) -> bool {
        match self {
            Targets::Mlp => kind.is_mlp(),
            Targets::Attn => !kind.is_mlp(),
            Targets::All => true,
        }
    }
}

impl std::str::FromStr for Targets {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "mlp" => Ok(Targets::Mlp),
            "attn" => Ok(Targets::Attn),
            "all" => Ok(Targets::All),
            _ => Err(Error::Input(format!(
                "targets `{s}`: expected mlp, attn or all"
            ))),
        }
    }
}

/// Initial z of length `r`.
pub fn init_z(param: Parameterization, r: usize, rng: &mut impl Rng) -> Vec<f32> {
    match param {
        Parameterization::Paper => vec![1.0; r],
        Parameterization::Official => (0..r)
            .map(|_| {
                let (u1, u2): (f32, f32) = (rng.gen::<f32>().max(1e-7), rng.gen());
                let n = (-2.0 * u1.ln()).sqrt() * (std::f32::consts::TAU * u2).cos();
                0.1 + 0.01 * n
            })
            .collect(),
    }
}

/// The applied scale s (see module docs) as plain numbers, in f64.
pub fn applied_scale(param: Parameterization, sigma: &[f32], z: &[f32]) -> Vec<f64> {
    match param {
        Parameterization::Paper => sigma
            .iter()
            .zip(z)
            .map(|(&s, &z)| s as f64 * z as f64)
            .collect(),
        Parameterization::Official => {
            let m: Vec<f64> = z
                .iter()
                .map(|&p| OFFICIAL_MAX_MULT / (1.0 + (-(p as f64)).exp()))
                .collect();
            let sum: f64 = sigma.iter().map(|&s| s as f64).sum();
            let sm: Vec<f64> = sigma.iter().zip(&m).map(|(&s, m)| s as f64 * m).collect();
            let denom: f64 = sm.iter().sum();
            let k = if denom > 0.0 { sum / denom } else { 1.0 };
            sm.iter().map(|x| x * k).collect()
        }
    }
}

/// Paper-form z' whose applied scale is Σ_k α_k s_k (s_k = the applied scale of expert k).
/// Directions with σ = 0 carry nothing and get z' = 1.
pub fn mix(param: Parameterization, sigma: &[f32], experts: &[&[f32]], alpha: &[f64]) -> Vec<f32> {
    assert_eq!(experts.len(), alpha.len(), "one α per expert");
    let mut s = vec![0f64; sigma.len()];
    for (z, &a) in experts.iter().zip(alpha) {
        for (acc, x) in s.iter_mut().zip(applied_scale(param, sigma, z)) {
            *acc += a * x;
        }
    }
    s.iter()
        .zip(sigma)
        .map(|(&x, &sg)| {
            if sg > 0.0 {
                (x / sg as f64) as f32
            } else {
                1.0
            }
        })
        .collect()
}

/// A linear layer in SVF form: the factors of W and the z that scales them.
#[derive(Debug, Clone)]
pub struct SvfWeight {
    /// V, `[in, r]`.
    pub v: Tensor,
    /// Uᵀ, `[r, out]`.
    pub u_t: Tensor,
    /// σ, `[r]`.
    pub sigma: Tensor,
    /// Σσ (for the official rescale).
    pub sigma_sum: f64,
    /// How z is applied.
    pub param: Parameterization,
    /// z, `[r]` — a variable while training.
    pub z: Tensor,
}

impl SvfWeight {
    /// The factors of `svd` (W = U diag(σ) Vᵀ) scaled by `z`.
    pub fn new(
        svd: &Svd,
        z: Tensor,
        param: Parameterization,
        dtype: DType,
        dev: &Device,
    ) -> Result<Self> {
        let Svd {
            rows,
            cols,
            u,
            sigma,
            v,
        } = svd;
        let (rows, cols, r) = (*rows, *cols, sigma.len());
        if u.len() != rows * r || v.len() != cols * r || z.dims() != [r] {
            return Err(Error::Input(format!(
                "SVF factors do not fit a {rows}×{cols} matrix of rank {r} (z has shape {:?})",
                z.dims()
            )));
        }
        Ok(SvfWeight {
            v: Tensor::from_slice(v, (cols, r), dev)?.to_dtype(dtype)?,
            u_t: Tensor::from_slice(u, (rows, r), dev)?
                .to_dtype(dtype)?
                .t()?
                .contiguous()?,
            sigma: Tensor::from_slice(sigma, r, dev)?.to_dtype(dtype)?,
            sigma_sum: sigma.iter().map(|&s| s as f64).sum(),
            param,
            z,
        })
    }

    /// The applied scale s `[r]` as a differentiable function of z.
    pub fn scale(&self) -> Result<Tensor> {
        match self.param {
            Parameterization::Paper => Ok((&self.sigma * &self.z)?),
            Parameterization::Official => {
                // sigmoid from composable ops so the gradient reaches z.
                let m = ((self.z.neg()?.exp()? + 1.0)?.recip()? * OFFICIAL_MAX_MULT)?;
                let sm = (&self.sigma * m)?;
                let denom = sm.sum_all()?;
                Ok(sm.broadcast_mul(&(denom.recip()? * self.sigma_sum)?)?)
            }
        }
    }

    /// y = ((x V) ⊙ s) Uᵀ for `x` `[.., in]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        crate::ops::svf_linear(x, &self.v, &self.scale()?, &self.u_t)
    }

    /// W' = U diag(s) Vᵀ, row-major `[out, in]` f32.
    pub fn adapted_weight(&self) -> Result<Vec<f32>> {
        let w = self
            .u_t
            .t()?
            .broadcast_mul(&self.scale()?)?
            .matmul(&self.v.t()?)?;
        Ok(w.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn official_scale_keeps_the_sum_of_singular_values() {
        let sigma = [3.0f32, 2.0, 0.5];
        let s = applied_scale(Parameterization::Official, &sigma, &[0.3, -1.0, 2.0]);
        assert!((s.iter().sum::<f64>() - 5.5).abs() < 1e-9);
        // Equal p everywhere: m constant, so s = σ exactly.
        let s = applied_scale(Parameterization::Official, &sigma, &[0.7; 3]);
        for (a, b) in s.iter().zip(sigma) {
            assert!((a - b as f64).abs() < 1e-6);
        }
    }

    #[test]
    fn one_hot_mixture_reproduces_the_expert() {
        let sigma = [3.0f32, 2.0, 0.0];
        for param in [Parameterization::Paper, Parameterization::Official] {
            let (a, b) = ([0.9f32, 1.2, 1.0], [1.5f32, 0.4, 1.0]);
            let z = mix(param, &sigma, &[&a, &b], &[0.0, 1.0]);
            let want = applied_scale(param, &sigma, &b);
            let got = applied_scale(Parameterization::Paper, &sigma, &z);
            for (x, y) in got.iter().zip(&want).take(2) {
                assert!((x - y).abs() < 1e-5, "{param:?}: {got:?} vs {want:?}");
            }
            // An even mixture is the mean of the applied scales.
            let z = mix(param, &sigma, &[&a, &b], &[0.5, 0.5]);
            let got = applied_scale(Parameterization::Paper, &sigma, &z);
            let (sa, sb) = (
                applied_scale(param, &sigma, &a),
                applied_scale(param, &sigma, &b),
            );
            assert!((got[0] - 0.5 * (sa[0] + sb[0])).abs() < 1e-5);
        }
    }

    #[test]
    fn factored_forward_equals_the_adapted_matrix() {
        // W' = U diag(σ⊙z) Vᵀ with hand-made orthonormal U (2×2 rotation) and V (identity).
        let dev = Device::Cpu;
        let (c, s) = (0.6f32, 0.8f32);
        let u = [c, -s, s, c];
        let v = [1.0f32, 0.0, 0.0, 1.0];
        let z = Tensor::new(&[2.0f32, 0.5], &dev).unwrap();
        let svd = Svd {
            rows: 2,
            cols: 2,
            u: u.to_vec(),
            sigma: vec![3.0, 1.0],
            v: v.to_vec(),
        };
        let w = SvfWeight::new(&svd, z, Parameterization::Paper, DType::F32, &dev).unwrap();
        // s = [6, 0.5]; W' = [[c·6, −s·0.5], [s·6, c·0.5]]
        let want = [c * 6.0, -s * 0.5, s * 6.0, c * 0.5];
        let got = w.adapted_weight().unwrap();
        for (a, b) in got.iter().zip(want) {
            assert!((a - b).abs() < 1e-6);
        }
        let x = Tensor::new(&[[1.0f32, 2.0]], &dev).unwrap();
        let y: Vec<Vec<f32>> = w.forward(&x).unwrap().to_vec2().unwrap();
        // y = W' x
        assert!((y[0][0] - (want[0] + 2.0 * want[1])).abs() < 1e-6);
        assert!((y[0][1] - (want[2] + 2.0 * want[3])).abs() < 1e-6);
    }

    #[test]
    fn init_matches_the_two_conventions() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(0);
        use rand::SeedableRng;
        assert_eq!(init_z(Parameterization::Paper, 3, &mut rng), vec![1.0; 3]);
        let p = init_z(Parameterization::Official, 1000, &mut rng);
        let mean = p.iter().sum::<f32>() / 1000.0;
        assert!((mean - 0.1).abs() < 0.002, "{mean}");
    }
}
