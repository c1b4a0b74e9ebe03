//! One layer's KV cache in buffers with room to grow, so that a decoded token is written in
//! place instead of the whole cache being copied (a concatenation per token costs O(S) per
//! layer: 150 KB per cached token per token on a 2B-4T-sized model).

use crate::error::Result;
use candle_core::Tensor;

/// Tokens a new cache has room for before it first grows.
const FIRST_CAPACITY: usize = 64;

/// Cached keys (rotated to their positions) and values `[B, S, KV·hd]` of one layer: the
/// first `len` positions of buffers of `capacity` positions, which double when full.
#[derive(Debug)]
pub(super) struct LayerKv {
    k: Tensor,
    v: Tensor,
    len: usize,
}

impl LayerKv {
    /// A cache holding `k`, `v` `[B, T, KV·hd]`.
    pub(super) fn new(k: &Tensor, v: &Tensor) -> Result<Self> {
        let mut kv = LayerKv {
            k: room(k, FIRST_CAPACITY)?,
            v: room(v, FIRST_CAPACITY)?,
            len: 0,
        };
        kv.append(k, v)?;
        Ok(kv)
    }

    /// Cached positions.
    pub(super) fn len(&self) -> usize {
        self.len
    }

    /// Append `k`, `v` `[B, T, KV·hd]`, growing the buffers (to twice the room needed) first
    /// when they are full.
    pub(super) fn append(&mut self, k: &Tensor, v: &Tensor) -> Result<()> {
        let t = k.dim(1)?;
        if self.len + t > self.k.dim(1)? {
            let capacity = 2 * (self.len + t);
            let (ok, ov) = self.view()?;
            self.k = room(&ok, capacity)?;
            self.v = room(&ov, capacity)?;
            self.k.slice_set(&ok, 1, 0)?;
            self.v.slice_set(&ov, 1, 0)?;
        }
        self.k.slice_set(&k.contiguous()?, 1, self.len)?;
        self.v.slice_set(&v.contiguous()?, 1, self.len)?;
        self.len += t;
        Ok(())
    }

    /// The cached keys and values, `[B, len, KV·hd]` (views of the buffers: contiguous for
    /// B = 1).
    pub(super) fn view(&self) -> Result<(Tensor, Tensor)> {
        Ok((
            self.k.narrow(1, 0, self.len)?,
            self.v.narrow(1, 0, self.len)?,
        ))
    }
}

impl Clone for LayerKv {
    /// A copy with buffers of its own (a clone sharing them would write into the original's).
    fn clone(&self) -> Self {
        let copy = |t: &Tensor| t.copy().expect("copying a cache buffer in memory");
        LayerKv {
            k: copy(&self.k),
            v: copy(&self.v),
            len: self.len,
        }
    }
}

/// A zero buffer like `x` `[B, T, W]` with room for `positions` positions.
fn room(x: &Tensor, positions: usize) -> Result<Tensor> {
    let (b, t, w) = x.dims3()?;
    Ok(Tensor::zeros(
        (b, positions.max(t), w),
        x.dtype(),
        x.device(),
    )?)
}
