//! The same functions from candle's composable ops: the fallback for dtypes and devices the
//! fused kernels do not cover, and the reference the tests compare them with.

use super::storage::with_last;
use crate::engine::config::Activation;
use crate::engine::ternary::quantize_activations;
use crate::error::Result;
use candle_core::{DType, Tensor, D};

/// `x` `[.., in]` times `wt` `[in, out]` as one 2-D matmul (cheaper than a broadcast
/// matmul, forward and backward).
pub fn matmul_2d(x: &Tensor, wt: &Tensor) -> Result<Tensor> {
    let cols = x.dim(D::Minus1)?;
    let y = x.reshape(((), cols))?.matmul(wt)?;
    Ok(y.reshape(with_last(x.shape(), wt.dim(1)?))?)
}

/// ((x·V) ⊙ s)·Uᵀ.
pub fn svf_linear(x: &Tensor, v: &Tensor, s: &Tensor, u_t: &Tensor) -> Result<Tensor> {
    let h = matmul_2d(x, v)?.broadcast_mul(s)?;
    matmul_2d(&h, u_t)
}

/// x · rsqrt(mean(x²) + ε) · w.
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    let ms = x.sqr()?.mean_keepdim(D::Minus1)?;
    let x = x.broadcast_div(&(ms + eps)?.sqrt()?)?;
    Ok(x.broadcast_mul(weight)?)
}

/// Softmax over the last dim (the max is a constant shift, detached).
pub fn softmax(x: &Tensor) -> Result<Tensor> {
    let m = x.max_keepdim(D::Minus1)?.detach();
    let e = x.broadcast_sub(&m)?.exp()?;
    Ok(e.broadcast_div(&e.sum_keepdim(D::Minus1)?)?)
}

/// Log-softmax over the last dim.
pub fn log_softmax(x: &Tensor) -> Result<Tensor> {
    let m = x.max_keepdim(D::Minus1)?.detach();
    let shifted = x.broadcast_sub(&m)?;
    let lse = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?;
    Ok(shifted.broadcast_sub(&lse)?)
}

/// log_softmax(logits) gathered at the targets.
pub fn target_log_probs(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let v = logits.dim(D::Minus1)?;
    let lp = log_softmax(&logits.reshape(((), v))?)?;
    Ok(lp.gather(&targets.unsqueeze(1)?, 1)?.squeeze(1)?)
}

/// Rotate-half RoPE of `x` `[B, T, heads, hd]`.
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor, offset: usize) -> Result<Tensor> {
    let (_, t, _, hd) = x.dims4()?;
    let cos = cos.narrow(0, offset, t)?.unsqueeze(1)?; // [T, 1, hd]
    let sin = sin.narrow(0, offset, t)?.unsqueeze(1)?;
    let x1 = x.narrow(D::Minus1, 0, hd / 2)?;
    let x2 = x.narrow(D::Minus1, hd / 2, hd / 2)?;
    let rot = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
    Ok((x.broadcast_mul(&cos)? + rot.broadcast_mul(&sin)?)?)
}

/// Additive mask `[T, S]`: 0 where key j ≤ query position S − T + i, −∞ after.
fn causal_mask(t: usize, s: usize, like: &Tensor) -> Result<Tensor> {
    let offset = s - t;
    let m: Vec<f32> = (0..t)
        .flat_map(|i| {
            (0..s).map(move |j| {
                if j > offset + i {
                    f32::NEG_INFINITY
                } else {
                    0.0
                }
            })
        })
        .collect();
    Ok(Tensor::from_vec(m, (t, s), like.device())?.to_dtype(like.dtype())?)
}

/// Causal grouped-query attention with RoPE, q `[B, T, H·hd]`, k, v `[B, S, KV·hd]`, the
/// RoPE tables `(cos, sin)` `[≥S, hd]`.
pub fn causal_attention(
    (q, k, v): (&Tensor, &Tensor, &Tensor),
    (heads, kv_heads): (usize, usize),
    (cos, sin): (&Tensor, &Tensor),
) -> Result<Tensor> {
    causal_attention_keys((q, k, v), (heads, kv_heads), (cos, sin), false)
}

/// [`causal_attention`], with `keys_rotated`: k is already rotated to its positions.
pub(super) fn causal_attention_keys(
    (q, k, v): (&Tensor, &Tensor, &Tensor),
    (heads, kv_heads): (usize, usize),
    (cos, sin): (&Tensor, &Tensor),
    keys_rotated: bool,
) -> Result<Tensor> {
    let (b, t, qw) = q.dims3()?;
    let s = k.dim(1)?;
    let hd = qw / heads;
    // [B, L, n·hd] → [B, n, L, hd]
    let split = |y: &Tensor, n: usize| -> Result<Tensor> {
        let l = y.dim(1)?;
        Ok(y.reshape((b, l, n, hd))?.transpose(1, 2)?.contiguous()?)
    };
    let rope_heads = |y: &Tensor, n: usize, offset: usize| -> Result<Tensor> {
        let l = y.dim(1)?;
        split(
            &rope(&y.reshape((b, l, n, hd))?, cos, sin, offset)?.reshape((b, l, n * hd))?,
            n,
        )
    };
    let q = rope_heads(q, heads, s - t)?; // [B, H, T, hd]
    let k = match keys_rotated {
        true => split(k, kv_heads)?,
        false => rope_heads(k, kv_heads, 0)?,
    };
    let v = split(v, kv_heads)?; // k, v [B, KV, S, hd]
    let rep = heads / kv_heads;
    let repeat = |y: &Tensor| -> Result<Tensor> {
        if rep == 1 {
            return Ok(y.clone());
        }
        let (b, n, s, hd) = y.dims4()?;
        Ok(y.unsqueeze(2)?
            .expand((b, n, rep, s, hd))?
            .reshape((b, n * rep, s, hd))?)
    };
    let (k, v) = (repeat(&k)?, repeat(&v)?);
    let mut scores = (q.matmul(&k.t()?.contiguous()?)? * (1.0 / (hd as f64).sqrt()))?;
    if t > 1 {
        scores = scores.broadcast_add(&causal_mask(t, s, &scores)?)?;
    }
    let att = softmax(&scores)?.matmul(&v.contiguous()?)?; // [B, H, T, hd]
    Ok(att.transpose(1, 2)?.reshape((b, t, heads * hd))?)
}

/// act(g) ⊙ u.
pub fn gated_activation(g: &Tensor, u: &Tensor, act: Activation) -> Result<Tensor> {
    let a = match act {
        Activation::Relu2 => g.relu()?.sqr()?,
        Activation::Silu => g.silu()?,
    };
    Ok((a * u)?)
}

/// x + (q(x) − x) with the bracket detached: value q(x), gradient 1.
pub fn fake_quant_ste(x: &Tensor) -> Result<Tensor> {
    let dims = x.dims().to_vec();
    let cols = *dims.last().expect("activations have a feature dim");
    let flat: Vec<f32> = x.detach().to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
    let (q, s) = quantize_activations(&flat, cols);
    let deq: Vec<f32> = q
        .chunks(cols)
        .zip(&s)
        .flat_map(|(row, &s)| row.iter().map(move |&v| v as f32 / s))
        .collect();
    let deq = Tensor::from_vec(deq, dims, x.device())?.to_dtype(x.dtype())?;
    Ok((x + (deq - x.detach())?)?)
}
