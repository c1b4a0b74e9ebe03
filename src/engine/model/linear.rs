//! The linear layers of the decoder: one BitNet linear over several weight forms (packed ternary,
//! dense, quantization-aware master weights, adapted by z, hybrid), with int8 activations.

use crate::engine::checkpoint::{FloatMatrix, LinearMatrix};
use crate::engine::ops::{self, fake_quant_ste, matmul_const, matmul_rows};
use crate::engine::ternary::TernaryMatrix;
use crate::error::Result;
use candle_core::Tensor;
use std::sync::Arc;

/// Weights of one BitLinear.
#[derive(Debug, Clone)]
pub enum LinearWeight {
    /// Packed ternary, integer kernel.
    Ternary(Arc<TernaryMatrix>),
    /// W transposed, `[in, out]`, f32/f64.
    Dense(Tensor),
    /// Quantization-aware training: float master weights `[out, in]` (a variable) that the
    /// forward pass ternarizes per tensor with the straight-through estimator.
    Qat(Tensor),
    /// A weight reparameterized by a trainable vector z (SVF, BitNet-aware scaling; the
    /// forms live in [`crate::svf`]), on the (fake-)quantized activations.
    Adapted(Box<dyn AdaptedLinear>),
    /// Hybrid runtime expert (Option 3): the base as stored — packed ternary through the
    /// integer kernel, or a float matrix row by row — plus an adapted low-rank delta (no base
    /// of its own) on the same (quantized) activations.
    Hybrid(LinearMatrix, Box<dyn AdaptedLinear>),
    /// A float base linear `[out, in]` in its stored dtype (inference; no gradient to W).
    Float(FloatMatrix),
}

/// A linear whose weight an adaptation method reparameterizes with a vector z. The engine only
/// runs it; SVF and its BitNet-aware kin implement it in [`crate::svf`], so the engine does not
/// depend on them.
pub trait AdaptedLinear: std::fmt::Debug + Send + Sync {
    /// y for `x` `[.., in]`, differentiable in z.
    fn forward(&self, x: &Tensor) -> Result<Tensor>;
    /// z — a variable while training.
    fn z_mut(&mut self) -> &mut Tensor;
    /// (out, in) of W'.
    fn shape(&self) -> Result<(usize, usize)>;
    /// W' (for a delta form: the delta alone), row-major `[out, in]` f32.
    fn adapted_weight(&self) -> Result<Vec<f32>>;
    /// Whether to re-quantize W' with one scale per output channel, given what the caller
    /// asked (a form whose W' is exactly ternary per channel overrides it).
    fn requant_per_channel(&self, asked: bool) -> bool {
        asked
    }
    /// A boxed copy (models are cloned per expert).
    fn clone_box(&self) -> Box<dyn AdaptedLinear>;
    /// For callers that know the concrete form (deployment reads SVF factors back).
    fn as_any(&self) -> &dyn std::any::Any;
}

impl Clone for Box<dyn AdaptedLinear> {
    fn clone(&self) -> Self {
        self.clone_box()
    }
}

impl LinearWeight {
    /// The z of an adapted linear (SVF or scaled), if any.
    pub fn z_mut(&mut self) -> Option<&mut Tensor> {
        match self {
            LinearWeight::Adapted(w) | LinearWeight::Hybrid(_, w) => Some(w.z_mut()),
            _ => None,
        }
    }
}

/// Ternarize float master weights in the forward pass with the straight-through estimator:
/// value γ·clamp(round(W/γ), −1, 1) with γ = mean|W|, gradient the identity (BitNet b1.58).
pub fn ternarize_ste(w: &Tensor) -> Result<Tensor> {
    let wd = w.detach();
    let gamma = wd
        .abs()?
        .mean_all()?
        .maximum(crate::engine::ternary::MIN_SCALE as f64)?;
    let wq = wd
        .broadcast_div(&gamma)?
        .round()?
        .clamp(-1.0, 1.0)?
        .broadcast_mul(&gamma)?;
    Ok((w + (wq - wd)?)?)
}

/// A BitNet linear layer: y = quant(x) · Wᵀ (+ b).
#[derive(Debug, Clone)]
pub struct BitLinear {
    /// The weights.
    pub weight: LinearWeight,
    /// Optional bias `[out]`.
    pub bias: Option<Tensor>,
    /// Whether activations are int8-quantized (never for a float base linear).
    pub act_quant: bool,
    /// Whether the base weight is float (a Llama-style model) rather than ternary: its
    /// activations stay float and [`crate::engine::model::Model::to_checkpoint`] keeps it float.
    pub float: bool,
    /// Output features.
    pub out_features: usize,
}

impl BitLinear {
    /// Forward `x` `[.., in]` → `[.., out]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let ternary = |m: &Arc<TernaryMatrix>| ops::ternary_linear(x, m, self.act_quant);
        // Float paths fake-quantize with the STE (the ternary kernel quantizes itself).
        let quantized = || {
            if self.act_quant {
                fake_quant_ste(x)
            } else {
                Ok(x.clone())
            }
        };
        let y = match &self.weight {
            LinearWeight::Ternary(m) => ternary(m)?,
            LinearWeight::Hybrid(m, delta) => {
                let base = match m {
                    LinearMatrix::Ternary(t) => ternary(t)?,
                    LinearMatrix::Float(f) => matmul_rows(&quantized()?, f)?,
                };
                (base + delta.forward(&quantized()?)?)?
            }
            LinearWeight::Dense(wt) => matmul_const(&quantized()?, wt)?,
            LinearWeight::Qat(w) => {
                ops::composable::matmul_2d(&quantized()?, &ternarize_ste(w)?.t()?)?
            }
            LinearWeight::Adapted(w) => w.forward(&quantized()?)?,
            LinearWeight::Float(m) => matmul_rows(&quantized()?, m)?,
        };
        match &self.bias {
            Some(b) => Ok(y.broadcast_add(b)?),
            None => Ok(y),
        }
    }
}
