//! The gated FFN activation act(g) ⊙ u (SiLU or ReLU²) with its backward pass.

use super::composable;
use super::kernels::{simd_fn, Real, TASK_ELEMS};
use super::storage::{fast, input, tensor, with_real, CResult, CpuView};
use crate::engine::config::Activation;
use crate::error::Result;
use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp2, DType, Layout, Shape, Tensor};
use rayon::prelude::*;

/// act(g) ⊙ u for the gate and up projections of the FFN (ReLU² for BitNet b1.58, SiLU for
/// Llama-style models).
pub fn gated_activation(g: &Tensor, u: &Tensor, act: Activation) -> Result<Tensor> {
    if !fast(&[g, u]) || g.dims() != u.dims() {
        return composable::gated_activation(g, u, act);
    }
    Ok(g.contiguous()?.apply_op2(&u.contiguous()?, Gated { act })?)
}

struct Gated {
    act: Activation,
}

/// SiLU: g·σ(g) and σ(g)·(1 + g·(1 − σ(g))).
#[inline(always)]
fn silu_and_grad<T: Real>(g: T) -> (T, T) {
    let sig = T::ONE / (T::ONE + (-g).exp());
    (g * sig, sig * (T::ONE + g * (T::ONE - sig)))
}

/// ReLU²: max(g, 0)² and 2·max(g, 0).
#[inline(always)]
fn relu2_and_grad<T: Real>(g: T) -> (T, T) {
    let r = g.max(T::ZERO);
    (r * r, r + r)
}

simd_fn! {
    /// y = act(g) ⊙ u over one chunk.
    fn gated_chunk<T: Real>(act: Activation, g: &[T], u: &[T], y: &mut [T]) {
        match act {
            Activation::Silu => {
                for ((y, &g), &u) in y.iter_mut().zip(g).zip(u) {
                    *y = silu_and_grad(g).0 * u;
                }
            }
            Activation::Relu2 => {
                for ((y, &g), &u) in y.iter_mut().zip(g).zip(u) {
                    *y = relu2_and_grad(g).0 * u;
                }
            }
        }
    }
}

simd_fn! {
    /// dg = dy ⊙ u ⊙ act'(g) and du = dy ⊙ act(g) over one chunk.
    fn gated_chunk_bwd<T: Real>(
        act: Activation,
        g: &[T],
        u: &[T],
        dy: &[T],
        dg: &mut [T],
        du: &mut [T],
    ) {
        let rows = dg.iter_mut().zip(du.iter_mut()).zip(g).zip(u).zip(dy);
        match act {
            Activation::Silu => {
                for ((((dg, du), &g), &u), &dy) in rows {
                    let (a, da) = silu_and_grad(g);
                    *dg = dy * u * da;
                    *du = dy * a;
                }
            }
            Activation::Relu2 => {
                for ((((dg, du), &g), &u), &dy) in rows {
                    let (a, da) = relu2_and_grad(g);
                    *dg = dy * u * da;
                    *du = dy * a;
                }
            }
        }
    }
}

impl Gated {
    fn forward<T: Real>(&self, g: &[T], u: &[T]) -> Vec<T> {
        let mut y = vec![T::ZERO; g.len()];
        y.par_chunks_mut(TASK_ELEMS)
            .zip(g.par_chunks(TASK_ELEMS).zip(u.par_chunks(TASK_ELEMS)))
            .for_each(|(y, (g, u))| gated_chunk(self.act, g, u, y));
        y
    }

    fn backward<T: Real>(&self, g: &[T], u: &[T], dy: &[T]) -> (Vec<T>, Vec<T>) {
        let (mut dg, mut du) = (vec![T::ZERO; g.len()], vec![T::ZERO; g.len()]);
        dg.par_chunks_mut(TASK_ELEMS)
            .zip(du.par_chunks_mut(TASK_ELEMS))
            .zip(g.par_chunks(TASK_ELEMS).zip(u.par_chunks(TASK_ELEMS)))
            .zip(dy.par_chunks(TASK_ELEMS))
            .for_each(|(((dg, du), (g, u)), dy)| gated_chunk_bwd(self.act, g, u, dy, dg, du));
        (dg, du)
    }
}

impl CustomOp2 for Gated {
    fn name(&self) -> &'static str {
        "gated-activation"
    }

    fn cpu_fwd(
        &self,
        gs: &CpuStorage,
        gl: &Layout,
        us: &CpuStorage,
        ul: &Layout,
    ) -> CResult<(CpuStorage, Shape)> {
        with_real!(gs.dtype(), self.name(), T => {
            let (g, u) = (input::<T>(gs, gl, self.name())?, input::<T>(us, ul, self.name())?);
            let y = self.forward(g, u);
            Ok((T::into_storage(y), gl.shape().clone()))
        })
    }

    fn bwd(
        &self,
        g: &Tensor,
        u: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> CResult<(Option<Tensor>, Option<Tensor>)> {
        let dy = dy.contiguous()?;
        let (gv, uv, dyv) = (CpuView::of(g)?, CpuView::of(u)?, CpuView::of(&dy)?);
        with_real!(g.dtype(), self.name(), T => {
            let (gs, us, dys) = (gv.get::<T>()?, uv.get::<T>()?, dyv.get::<T>()?);
            let (dg, du) = self.backward(gs, us, dys);
            let dg = g.track_op().then(|| tensor(dg, g.shape().clone())).transpose()?;
            let du = u.track_op().then(|| tensor(du, u.shape().clone())).transpose()?;
            Ok((dg, du))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::ops::testing::*;

    #[test]
    fn gated_activation_matches_and_differentiates() {
        for act in [Activation::Silu, Activation::Relu2] {
            for x in [vec![3, 5], vec![7, 13]] {
                let inputs = [(uniform(&x, 17) * 3.0).unwrap(), uniform(&x, 18)];
                let fused = |a: &[Tensor]| gated_activation(&a[0], &a[1], act);
                same_forward(
                    &inputs,
                    &fused,
                    &|a| composable::gated_activation(&a[0], &a[1], act),
                    1e-5,
                );
                for vary in [[true, true], [true, false], [false, true]] {
                    check_gradients(&inputs, &vary, &fused);
                }
            }
        }
    }
}
