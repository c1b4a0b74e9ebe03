//! Rotate-half RoPE tables (HF convention), grown on demand with the positions a sequence uses.

use crate::engine::config::ModelConfig;
use crate::error::Result;
use candle_core::{DType, Device, Tensor};
use std::sync::{Arc, RwLock};

/// Rotate-half RoPE tables `cos`, `sin` of shape `[positions, head_dim]` (HF convention),
/// grown on demand up to `max_position_embeddings`: the config's number is untrusted, so the
/// tables are sized by the positions actually used, never by the config alone.
#[derive(Debug, Clone)]
pub(crate) struct Rope {
    /// Inverse frequencies `[head_dim / 2]`.
    inv: Vec<f64>,
    max_positions: usize,
    dtype: DType,
    device: Device,
    /// (cos, sin), shared by clones of the model.
    tables: Arc<RwLock<(Tensor, Tensor)>>,
}

/// Positions of the first RoPE tables (grown by doubling when a longer sequence comes).
pub(crate) const ROPE_INITIAL_POSITIONS: usize = 256;

impl Rope {
    pub(crate) fn new(cfg: &ModelConfig, dtype: DType, dev: &Device) -> Result<Self> {
        let hd = cfg.head_dim();
        let inv: Vec<f64> = (0..hd / 2)
            .map(|i| 1.0 / cfg.rope_theta.powf((2 * i) as f64 / hd as f64))
            .collect();
        let n = cfg.max_position_embeddings.min(ROPE_INITIAL_POSITIONS);
        let tables = Self::build(&inv, n, dtype, dev)?;
        Ok(Rope {
            inv,
            max_positions: cfg.max_position_embeddings,
            dtype,
            device: dev.clone(),
            tables: Arc::new(RwLock::new(tables)),
        })
    }

    fn build(inv: &[f64], n: usize, dtype: DType, dev: &Device) -> Result<(Tensor, Tensor)> {
        let hd = 2 * inv.len();
        let mut cos = Vec::with_capacity(n * hd);
        let mut sin = Vec::with_capacity(n * hd);
        for p in 0..n {
            for _half in 0..2 {
                for f in inv {
                    // HF computes the angle in f32; match it before taking cos/sin.
                    let a = (p as f32 * *f as f32) as f64;
                    cos.push(a.cos());
                    sin.push(a.sin());
                }
            }
        }
        Ok((
            Tensor::from_vec(cos, (n, hd), dev)?.to_dtype(dtype)?,
            Tensor::from_vec(sin, (n, hd), dev)?.to_dtype(dtype)?,
        ))
    }

    /// Tables covering at least `positions` positions (the caller has checked
    /// `positions ≤ max_position_embeddings`).
    pub(crate) fn tables(&self, positions: usize) -> Result<(Tensor, Tensor)> {
        {
            let t = self.tables.read().unwrap_or_else(|e| e.into_inner());
            if t.0.dim(0)? >= positions {
                return Ok(t.clone());
            }
        }
        let mut t = self.tables.write().unwrap_or_else(|e| e.into_inner());
        let have = t.0.dim(0)?;
        if have < positions {
            let n = positions.max(2 * have).min(self.max_positions);
            *t = Self::build(&self.inv, n, self.dtype, &self.device)?;
        }
        Ok(t.clone())
    }
}
