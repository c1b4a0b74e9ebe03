//! Test helpers shared by the fused ops' tests: random inputs, forward comparison with the
//! composable reference, and gradient checks against central finite differences.

use crate::error::Result;
use candle_core::{DType, Device, Tensor, Var};
use rand::{rngs::StdRng, Rng, SeedableRng};

/// f64 values uniform in [−1, 1).
pub(super) fn uniform(dims: &[usize], seed: u64) -> Tensor {
    let mut rng = StdRng::seed_from_u64(seed);
    let n = dims.iter().product::<usize>();
    let v: Vec<f64> = (0..n).map(|_| rng.gen_range(-1.0..1.0)).collect();
    Tensor::from_vec(v, dims, &Device::Cpu).unwrap()
}

pub(super) fn values(t: &Tensor) -> Vec<f64> {
    t.to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

/// Largest |a − b| after checking the shapes agree.
pub(super) fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.dims(), b.dims());
    values(a)
        .iter()
        .zip(values(b))
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f64::max)
}

/// The fused op equals its composable reference: f64 to 1e-12, f32 to `tol32`.
pub(super) fn same_forward(
    inputs: &[Tensor],
    fused: &dyn Fn(&[Tensor]) -> Result<Tensor>,
    reference: &dyn Fn(&[Tensor]) -> Result<Tensor>,
    tol32: f64,
) {
    let d = max_diff(&fused(inputs).unwrap(), &reference(inputs).unwrap());
    assert!(d < 1e-12, "f64: max |Δ| {d:e}");
    let f32s: Vec<Tensor> = inputs
        .iter()
        .map(|t| t.to_dtype(DType::F32).unwrap())
        .collect();
    let y = fused(&f32s).unwrap();
    assert_eq!(y.dtype(), DType::F32);
    let d = max_diff(&y, &reference(inputs).unwrap());
    assert!(d < tol32, "f32: max |Δ| {d:e}");
}

/// Autograd gradients of L = Σ f(inputs) ⊙ R (R fixed and random) against central
/// differences, for the inputs marked in `vary`; the others stay constants and must get no
/// gradient computed.
pub(super) fn check_gradients(
    inputs: &[Tensor],
    vary: &[bool],
    f: &dyn Fn(&[Tensor]) -> Result<Tensor>,
) {
    let vars: Vec<Option<Var>> = inputs
        .iter()
        .zip(vary)
        .map(|(t, &v)| v.then(|| Var::from_tensor(t).unwrap()))
        .collect();
    let args: Vec<Tensor> = inputs
        .iter()
        .zip(&vars)
        .map(|(t, v)| v.as_ref().map_or(t.clone(), |v| v.as_tensor().clone()))
        .collect();
    let y = f(&args).unwrap();
    let r = uniform(y.dims(), 99);
    let loss = |a: &[Tensor]| -> f64 {
        (f(a).unwrap() * &r)
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
    };
    let grads = (y * &r).unwrap().sum_all().unwrap().backward().unwrap();
    let eps = 1e-6;
    for (i, var) in vars.iter().enumerate() {
        let Some(var) = var else {
            assert!(grads.get(&args[i]).is_none(), "input {i} is a constant");
            continue;
        };
        let g = values(grads.get(var.as_tensor()).expect("a gradient"));
        let x0 = values(&inputs[i]);
        for j in 0..x0.len() {
            let at = |d: f64| {
                let mut x = x0.clone();
                x[j] += d;
                let mut a = inputs.to_vec();
                a[i] = Tensor::from_vec(x, inputs[i].dims(), &Device::Cpu).unwrap();
                loss(&a)
            };
            let fd = (at(eps) - at(-eps)) / (2.0 * eps);
            let tol = 1e-7 + 1e-6 * fd.abs().max(g[j].abs());
            assert!(
                (fd - g[j]).abs() < tol,
                "input {i}[{j}]: finite difference {fd:e}, autograd {:e}",
                g[j]
            );
        }
    }
}
