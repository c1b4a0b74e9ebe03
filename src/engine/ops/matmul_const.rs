//! x · W for a constant W: `matmul_const`, whose backward pass computes only ∂L/∂x.

use super::composable;
use super::kernels::{matmul, Real};
use super::storage::{
    fast, input, rows_cols, shape_error, tensor, with_last, with_real, CResult, CpuView,
};
use crate::error::Result;
use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp1, DType, Layout, Shape, Tensor, D};

/// `x` `[.., in]` times a constant `wt` `[in, out]`; the backward pass returns only
/// ∂L/∂x = ∂L/∂y · wtᵀ (candle's matmul backward always computes the weight gradient too, an
/// extra product per layer that SVF training never needs). A `wt` that tracks gradients takes
/// the ordinary differentiable path.
pub fn matmul_const(x: &Tensor, wt: &Tensor) -> Result<Tensor> {
    if wt.track_op() || !fast(&[x, wt]) {
        return composable::matmul_2d(x, wt);
    }
    let k = wt.dim(0)?;
    let cols = x.dim(D::Minus1)?;
    if cols != k {
        return Err(shape_error(format!(
            "matmul_const: x has {cols} features, the weight expects {k}"
        )));
    }
    let y = x.contiguous()?.apply_op1(MatmulConst {
        wt: wt.contiguous()?,
    })?;
    Ok(y)
}

struct MatmulConst {
    /// `[in, out]`, contiguous.
    wt: Tensor,
}

impl CustomOp1 for MatmulConst {
    fn name(&self) -> &'static str {
        "matmul-const"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> CResult<(CpuStorage, Shape)> {
        let (m, k) = rows_cols(l.shape())?;
        let n = self.wt.dim(1)?;
        let w = CpuView::of(&self.wt)?;
        with_real!(s.dtype(), self.name(), T => {
            let y = matmul((m, n, k), input::<T>(s, l, self.name())?, false, w.get()?, false);
            Ok((T::into_storage(y), with_last(l.shape(), n)))
        })
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, dy: &Tensor) -> CResult<Option<Tensor>> {
        let (m, k) = rows_cols(x.shape())?;
        let n = self.wt.dim(1)?;
        let dy = dy.contiguous()?;
        let (dyv, w) = (CpuView::of(&dy)?, CpuView::of(&self.wt)?);
        with_real!(x.dtype(), self.name(), T => {
            // dx = dy · wtᵀ
            let dx = matmul((m, k, n), dyv.get::<T>()?, false, w.get()?, true);
            Ok(Some(tensor(dx, x.shape().clone())?))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::ops::testing::*;

    #[test]
    fn matmul_const_matches_and_differentiates() {
        for (x, w) in [(vec![3, 5], vec![5, 7]), (vec![2, 7, 13], vec![13, 4])] {
            let inputs = [uniform(&x, 1), uniform(&w, 2)];
            same_forward(
                &inputs,
                &|a| matmul_const(&a[0], &a[1]),
                &|a| composable::matmul_2d(&a[0], &a[1]),
                1e-5,
            );
            check_gradients(&inputs, &[true, false], &|a| matmul_const(&a[0], &a[1]));
            // A weight that is a variable takes the ordinary path and gets its gradient.
            check_gradients(&inputs, &[true, true], &|a| matmul_const(&a[0], &a[1]));
        }
    }
}
