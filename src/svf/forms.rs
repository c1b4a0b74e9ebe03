//! The adapted linear forms SVF trains and deploys: W' = U diag(s(z)) Vᵀ in factored form (full
//! or the hybrid low-rank delta) and the BitNet-aware row scaling diag(z)·W, as the engine's
//! [`AdaptedLinear`].

use crate::engine::model::AdaptedLinear;
use crate::error::{Error, Result};
use crate::svf::param::{Parameterization, OFFICIAL_MAX_MULT};
use crate::svf::svd::Svd;
use candle_core::{DType, Device, Tensor};

/// A linear layer in SVF form: the factors of W and the z that scales them.
#[derive(Debug, Clone)]
pub struct SvfWeight {
    /// V, `[in, r]` (`[in, k]` for low-rank).
    pub v: Tensor,
    /// Uᵀ, `[r, out]` (`[k, out]` for low-rank).
    pub u_t: Tensor,
    /// σ, `[r]` (`[k]` for low-rank).
    pub sigma: Tensor,
    /// Σσ (for the official rescale).
    pub sigma_sum: f64,
    /// How z is applied.
    pub param: Parameterization,
    /// z, `[r]` or `[k]` — a variable while training.
    pub z: Tensor,
    /// Low-rank only: the unchanged base Wᵀ `[in, out]` the delta is added to.
    pub base: Option<Tensor>,
}

impl SvfWeight {
    /// The factors of `svd` (W = U diag(σ) Vᵀ) scaled by `z` (paper or official form).
    pub fn new(
        svd: &Svd,
        z: Tensor,
        param: Parameterization,
        dtype: DType,
        dev: &Device,
    ) -> Result<Self> {
        if !matches!(param, Parameterization::Paper | Parameterization::Official) {
            return Err(Error::Input(format!(
                "{} is not a full-rank SVF parameterization",
                param.name()
            )));
        }
        Self::from_factors(svd, svd.sigma.len(), z, param, None, dtype, dev)
    }

    /// The hybrid low-rank form: `base_t` (Wᵀ, `[in, out]`) plus the SVF delta on the top
    /// `z.len()` singular directions of `svd`.
    pub fn low_rank(
        svd: &Svd,
        z: Tensor,
        base_t: Tensor,
        dtype: DType,
        dev: &Device,
    ) -> Result<Self> {
        if base_t.dims() != [svd.cols, svd.rows] {
            return Err(Error::Input(format!(
                "low-rank SVF: base {:?} does not fit a {}×{} matrix",
                base_t.dims(),
                svd.rows,
                svd.cols
            )));
        }
        let mut w = Self::low_rank_delta(svd, z, dtype, dev)?;
        w.base = Some(base_t.to_dtype(dtype)?);
        Ok(w)
    }

    /// The low-rank delta alone, U_k diag(σ_k⊙(z−1)) V_kᵀ (the hybrid runtime adds it to the
    /// packed base).
    pub fn low_rank_delta(svd: &Svd, z: Tensor, dtype: DType, dev: &Device) -> Result<Self> {
        let k = z.dims1()?;
        if k == 0 || k > svd.sigma.len() {
            return Err(Error::Input(format!(
                "low-rank SVF: z of length {k} does not fit a {}×{} matrix of rank {}",
                svd.rows,
                svd.cols,
                svd.sigma.len()
            )));
        }
        Self::from_factors(svd, k, z, Parameterization::LowRank, None, dtype, dev)
    }

    fn from_factors(
        svd: &Svd,
        k: usize,
        z: Tensor,
        param: Parameterization,
        base: Option<Tensor>,
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
        if u.len() != rows * r || v.len() != cols * r || z.dims() != [k] {
            return Err(Error::Input(format!(
                "SVF factors do not fit a {rows}×{cols} matrix of rank {r} (z has shape {:?})",
                z.dims()
            )));
        }
        // The first k columns of the row-major U `[rows, r]` and V `[cols, r]`.
        let first = |m: &[f32], n: usize| -> Vec<f32> {
            m.chunks(r)
                .take(n)
                .flat_map(|row| &row[..k])
                .copied()
                .collect()
        };
        let sigma = &sigma[..k];
        Ok(SvfWeight {
            v: Tensor::from_vec(first(v, cols), (cols, k), dev)?.to_dtype(dtype)?,
            u_t: Tensor::from_vec(first(u, rows), (rows, k), dev)?
                .to_dtype(dtype)?
                .t()?
                .contiguous()?,
            sigma: Tensor::from_slice(sigma, k, dev)?.to_dtype(dtype)?,
            sigma_sum: sigma.iter().map(|&s| s as f64).sum(),
            param,
            z,
            base,
        })
    }

    /// The applied scale s `[r]` as a differentiable function of z (for low-rank, the scale of
    /// the delta: σ_k⊙(z − 1)).
    pub fn scale(&self) -> Result<Tensor> {
        match self.param {
            Parameterization::Official => {
                // sigmoid from composable ops so the gradient reaches z.
                let m = ((self.z.neg()?.exp()? + 1.0)?.recip()? * OFFICIAL_MAX_MULT)?;
                let sm = (&self.sigma * m)?;
                let denom = sm.sum_all()?;
                Ok(sm.broadcast_mul(&(denom.recip()? * self.sigma_sum)?)?)
            }
            Parameterization::LowRank => Ok((&self.sigma * (&self.z - 1.0)?)?),
            _ => Ok((&self.sigma * &self.z)?),
        }
    }

    /// y = ((x V) ⊙ s) Uᵀ (+ x·Wᵀ for low-rank) for `x` `[.., in]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let delta = crate::engine::ops::svf_linear(x, &self.v, &self.scale()?, &self.u_t)?;
        match &self.base {
            Some(wt) => Ok((crate::engine::ops::matmul_const(x, wt)? + delta)?),
            None => Ok(delta),
        }
    }

    /// W' = U diag(s) Vᵀ (+ W for low-rank), row-major `[out, in]` f32.
    pub fn adapted_weight(&self) -> Result<Vec<f32>> {
        let mut w = self
            .u_t
            .t()?
            .broadcast_mul(&self.scale()?)?
            .matmul(&self.v.t()?)?;
        if let Some(b) = &self.base {
            w = (w + b.t()?)?;
        }
        Ok(w.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?)
    }
}

/// A linear layer whose rows W = γ·W_t are scaled by z (BitNet-aware SVF, Option 2): one z
/// for the whole matrix or one per output channel.
#[derive(Debug, Clone)]
pub struct ScaleWeight {
    /// Wᵀ, `[in, out]`.
    pub wt: Tensor,
    /// z, `[1]` or `[out]` — a variable while training.
    pub z: Tensor,
}

impl ScaleWeight {
    /// Scale `wt` (Wᵀ, `[in, out]`) by `z` (`[1]` or `[out]`).
    pub fn new(wt: Tensor, z: Tensor) -> Result<Self> {
        let out = wt.dim(1)?;
        let n = z.dims1()?;
        if n != 1 && n != out {
            return Err(Error::Input(format!(
                "scale vector of length {n} fits neither one matrix nor its {out} output channels"
            )));
        }
        Ok(ScaleWeight { wt, z })
    }

    /// y = (x·Wᵀ) ⊙ z for `x` `[.., in]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(crate::engine::ops::matmul_const(x, &self.wt)?.broadcast_mul(&self.z)?)
    }

    /// W' = diag(z)·W, row-major `[out, in]` f32.
    pub fn adapted_weight(&self) -> Result<Vec<f32>> {
        let w = self.wt.t()?.broadcast_mul(&self.z.unsqueeze(1)?)?;
        Ok(w.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?)
    }
}

impl AdaptedLinear for SvfWeight {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        SvfWeight::forward(self, x)
    }
    fn z_mut(&mut self) -> &mut Tensor {
        &mut self.z
    }
    fn shape(&self) -> Result<(usize, usize)> {
        Ok((self.u_t.dim(1)?, self.v.dim(0)?))
    }
    fn adapted_weight(&self) -> Result<Vec<f32>> {
        SvfWeight::adapted_weight(self)
    }
    fn clone_box(&self) -> Box<dyn AdaptedLinear> {
        Box::new(self.clone())
    }
    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}

impl AdaptedLinear for ScaleWeight {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        ScaleWeight::forward(self, x)
    }
    fn z_mut(&mut self) -> &mut Tensor {
        &mut self.z
    }
    fn shape(&self) -> Result<(usize, usize)> {
        Ok((self.wt.dim(1)?, self.wt.dim(0)?))
    }
    fn adapted_weight(&self) -> Result<Vec<f32>> {
        ScaleWeight::adapted_weight(self)
    }
    /// diag(z)·γ·W_t is ternary with per-channel scales γ·z: exact when z is per channel.
    fn requant_per_channel(&self, _asked: bool) -> bool {
        self.z.dims1().is_ok_and(|n| n > 1)
    }
    fn clone_box(&self) -> Box<dyn AdaptedLinear> {
        Box::new(self.clone())
    }
    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}
