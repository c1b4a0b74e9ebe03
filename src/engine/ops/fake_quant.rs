//! Per-token int8 fake-quantization of activations with the straight-through estimator.

use super::composable;
use super::storage::{fast, input, rows_cols, CResult};
use crate::error::Result;
use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp1, Layout, Shape, Tensor};

/// Per-token int8 fake-quantization of activations `[.., in]` with the straight-through
/// estimator: the value is x_q/s ([`crate::engine::ternary::quantize_activations`]), the gradient the
/// identity (BitNet training, docs/DESIGN.md §2).
pub fn fake_quant_ste(x: &Tensor) -> Result<Tensor> {
    if !fast(&[x]) {
        return composable::fake_quant_ste(x);
    }

    Ok(x.contiguous()?.apply_op1(FakeQuant)?)
}

struct FakeQuant;

impl CustomOp1 for FakeQuant {
    fn name(&self) -> &'static str {
        "fake-quant-ste"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> CResult<(CpuStorage, Shape)> {
        let (_, cols) = rows_cols(l.shape())?;
        let deq = |x: &[f32]| -> Vec<f32> {
            let (q, scales) = crate::engine::ternary::quantize_activations(x, cols);
            q.chunks(cols.max(1))
                .zip(&scales)
                .flat_map(|(row, &s)| row.iter().map(move |&v| v as f32 / s))
                .collect()
        };
        let out = match s {
            CpuStorage::F32(_) => CpuStorage::F32(deq(input::<f32>(s, l, self.name())?)),
            CpuStorage::F64(_) => {
                let x: Vec<f32> = input::<f64>(s, l, self.name())?
                    .iter()
                    .map(|&v| v as f32)
                    .collect();
                CpuStorage::F64(deq(&x).into_iter().map(f64::from).collect())
            }
            other => bail!("{}: unsupported dtype {:?}", self.name(), other.dtype()),
        };
        Ok((out, l.shape().clone()))
    }

    fn bwd(&self, _x: &Tensor, _y: &Tensor, dy: &Tensor) -> CResult<Option<Tensor>> {
        Ok(Some(dy.clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::ops::testing::*;
    use candle_core::Var;

    #[test]
    fn fake_quant_matches_and_passes_gradients_straight_through() {
        let x = uniform(&[7, 13], 19);
        same_forward(
            std::slice::from_ref(&x),
            &|a| fake_quant_ste(&a[0]),
            &|a| composable::fake_quant_ste(&a[0]),
            1e-6,
        );
        let v = Var::from_tensor(&x).unwrap();
        let r = uniform(&[7, 13], 20);
        let g = (fake_quant_ste(v.as_tensor()).unwrap() * &r)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        assert_eq!(max_diff(g.get(v.as_tensor()).unwrap(), &r), 0.0);
    }
}
