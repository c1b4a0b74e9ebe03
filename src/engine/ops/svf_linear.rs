//! The SVF linear layer y = ((x·V) ⊙ s)·Uᵀ as one op, differentiable in x and in the scale s.

use super::composable;
use super::kernels::{matmul, task_rows, Real};
use super::storage::{
    fast, input, required, rows_cols, saved_slice, shape_error, tensor, with_last, with_real,
    CResult, CpuView, Saved,
};
use crate::error::Result;
use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp2, DType, Layout, Shape, Tensor, D};
use rayon::prelude::*;

/// y = ((x·V) ⊙ s)·Uᵀ for `x` `[.., in]`, constant `v` `[in, r]` and `u_t` `[r, out]`, and a
/// differentiable scale `s` `[r]` (Transformer²'s SVF, see [`crate::svf`]). The backward
/// pass returns ∂L/∂x = ((∂L/∂y·U) ⊙ s)·Vᵀ and ∂L/∂s = Σ_tokens (x·V) ⊙ (∂L/∂y·U), reusing
/// x·V from the forward pass.
pub fn svf_linear(x: &Tensor, v: &Tensor, s: &Tensor, u_t: &Tensor) -> Result<Tensor> {
    if v.track_op() || u_t.track_op() || !fast(&[x, v, s, u_t]) {
        return composable::svf_linear(x, v, s, u_t);
    }
    let (k, r) = v.dims2()?;
    let (r2, n) = u_t.dims2()?;
    let cols = x.dim(D::Minus1)?;
    if cols != k || r2 != r || s.dims() != [r] {
        return Err(shape_error(format!(
            "svf_linear: x has {cols} features, V is {k}×{r}, Uᵀ is {r2}×{n}, s has shape {:?}",
            s.dims()
        )));
    }
    let op = SvfLinear {
        v: v.contiguous()?,
        u_t: u_t.contiguous()?,
        keep_h: x.track_op() || s.track_op(),
        h: Saved::empty(),
    };
    Ok(x.contiguous()?.apply_op2(&s.contiguous()?, op)?)
}

/// Multiplies every row of the row-major `m` (rows of `s.len()`) by `s` element-wise.
fn scale_columns<T: Real>(m: &mut [T], s: &[T]) {
    let r = s.len();
    m.par_chunks_mut(r.max(1))
        .with_min_len(task_rows(r))
        .for_each(|row| {
            for (a, &b) in row.iter_mut().zip(s) {
                *a *= b;
            }
        });
}

struct SvfLinear {
    /// V `[in, r]`.
    v: Tensor,
    /// Uᵀ `[r, out]`.
    u_t: Tensor,
    /// Whether a backward pass may follow (then h is kept).
    keep_h: bool,
    /// h = x·V `[rows, r]` from the forward pass.
    h: Saved<CpuStorage>,
}

impl CustomOp2 for SvfLinear {
    fn name(&self) -> &'static str {
        "svf-linear"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ss: &CpuStorage,
        sl: &Layout,
    ) -> CResult<(CpuStorage, Shape)> {
        let (m, k) = rows_cols(xl.shape())?;
        let (r, n) = self.u_t.dims2()?;
        let (v, u_t) = (CpuView::of(&self.v)?, CpuView::of(&self.u_t)?);
        with_real!(xs.dtype(), self.name(), T => {
            let x = input::<T>(xs, xl, self.name())?;
            let s = input::<T>(ss, sl, self.name())?;
            let h = matmul((m, r, k), x, false, v.get()?, false);
            let mut g = h.clone();
            scale_columns(&mut g, s);
            let y = matmul((m, n, r), &g, false, u_t.get()?, false);
            if self.keep_h {
                self.h.put(T::into_storage(h));
            }
            Ok((T::into_storage(y), with_last(xl.shape(), n)))
        })
    }

    fn bwd(
        &self,
        x: &Tensor,
        s: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> CResult<(Option<Tensor>, Option<Tensor>)> {
        let (m, k) = rows_cols(x.shape())?;
        let (r, n) = self.u_t.dims2()?;
        let (dy, s_c) = (dy.contiguous()?, s.contiguous()?);
        let (dyv, sv) = (CpuView::of(&dy)?, CpuView::of(&s_c)?);
        let (v, u_t) = (CpuView::of(&self.v)?, CpuView::of(&self.u_t)?);
        let saved = self.h.lock();
        let h = required(&saved, self.name())?;
        with_real!(x.dtype(), self.name(), T => {
            let h = saved_slice::<T>(h);
            let sc = sv.get::<T>()?;
            // dg = dy · U  [m, r]
            let mut dg = matmul::<T>((m, r, n), dyv.get()?, false, u_t.get()?, true);
            // ds = Σ_rows h ⊙ dg
            let ds = s.track_op().then(|| {
                let mut ds = vec![T::ZERO; r];
                for (hr, gr) in h.chunks_exact(r.max(1)).zip(dg.chunks_exact(r.max(1))) {
                    for ((a, &p), &q) in ds.iter_mut().zip(hr).zip(gr) {
                        *a += p * q;
                    }
                }
                ds
            });
            let dx = if x.track_op() {
                // dx = (dg ⊙ s) · Vᵀ
                scale_columns(&mut dg, sc);
                let dx = matmul((m, k, r), &dg, false, v.get()?, true);
                Some(tensor(dx, x.shape().clone())?)
            } else {
                None
            };
            Ok((dx, ds.map(|d| tensor(d, r)).transpose()?))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::ops::testing::*;

    #[test]
    fn svf_linear_matches_and_differentiates() {
        // (x dims, r, out): ragged shapes, r below and above the input width.
        for (x, r, out) in [
            (vec![3, 5], 4, 6),
            (vec![7, 13], 13, 9),
            (vec![2, 3, 5], 5, 5),
        ] {
            let k = *x.last().unwrap();
            let inputs = [
                uniform(&x, 3),
                uniform(&[k, r], 4),
                uniform(&[r], 5),
                uniform(&[r, out], 6),
            ];
            let fused = |a: &[Tensor]| svf_linear(&a[0], &a[1], &a[2], &a[3]);
            same_forward(
                &inputs,
                &fused,
                &|a| composable::svf_linear(&a[0], &a[1], &a[2], &a[3]),
                1e-5,
            );
            for vary in [
                [true, false, true, false],
                [false, false, true, false],
                [true, false, false, false],
            ] {
                check_gradients(&inputs, &vary, &fused);
            }
        }
    }
}
