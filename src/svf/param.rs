//! Singular Value Fine-tuning (Transformer², arXiv 2501.06252, docs/DESIGN.md §3).
//!
//! Each target matrix W = U diag(σ) Vᵀ gets one vector z ∈ ℝʳ. The forward pass never builds
//! W': y = ((x V) ⊙ s) Uᵀ with the applied scale s
//! - *paper*: s = σ ⊙ z, z₀ = 1 (so W' = W at the start);
//! - *official code*: m = sigmoid(p)·max_mult, s = (Σσ / Σ(σ⊙m)) · σ ⊙ m, p₀ = 0.1 + 0.01·N(0,1)
//!   (keeps the sum of singular values).
//!
//! Mixtures combine the *applied* scales, s' = Σ α_k s_k, and are expressed as a paper-form
//! z' = s'/σ, so a one-hot α reproduces that expert exactly under either parameterization.
//!
//! Two further families of the seed's integration options (docs/DESIGN.md §5) train through the same
//! machinery, each with z₀ = 1 and mixtures z' = Σ α_k z_k:
//! - *BitNet-aware* (Option 2): z scales the rows of W = γ·W_t without any SVD — one value per
//!   matrix (`alpha_layer`, W' = z·W) or one per output channel (`alpha_channel`,
//!   W' = diag(z)·W). Both fold into the ternary scale after the integer matmul.
//! - *Hybrid low-rank* (Option 3): only the top-k singular directions carry z and the base stays
//!   as it is: y = x·Wᵀ + ((x V_k) ⊙ σ_k⊙(z − 1)) U_kᵀ, so W' = W + U_k diag(σ_k⊙(z−1)) V_kᵀ.

use crate::engine::checkpoint::LinearKind;
use rand::Rng;
use serde::{Deserialize, Serialize};

/// How z maps to the applied singular-value scale.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Parameterization {
    /// s = σ ⊙ z, z₀ = 1.
    Paper,
    /// s = (Σσ / Σ(σ⊙m))·σ⊙m with m = sigmoid(z)·max_mult (max_mult = 1).
    Official,
    /// W' = z·W, one z per matrix (the seed's Option 2).
    AlphaLayer,
    /// W' = diag(z)·W, one z per output channel (Option 2, per channel).
    AlphaChannel,
    /// W' = W + U_k diag(σ_k⊙(z−1)) V_kᵀ on the top-k directions (Option 3).
    LowRank,
}

crate::value_names!(
    Parameterization,
    "parameterization",
    [
        (Paper, "paper", "W' = U diag(σ⊙z) Vᵀ, z₀ = 1 (the paper)"),
        (
            Official,
            "official",
            "Sigmoid scales with the Σσ-preserving rescale (the official code)"
        ),
        (
            AlphaLayer,
            "alpha-layer",
            "W' = z·W, one z per matrix (BitNet-aware, Option 2)"
        ),
        (
            AlphaChannel,
            "alpha-channel",
            "W' = diag(z)·W, one z per output channel (BitNet-aware, Option 2)"
        ),
        (
            LowRank,
            "low-rank",
            "W + SVF delta on the top-k singular directions (hybrid, Option 3; k = --rank)"
        ),
    ]
);

/// Command-line names are [`Parameterization::name`]; files keep their serde names (e.g.
/// `alpha_layer`) for compatibility.
impl Parameterization {
    /// Whether z acts on singular directions (and so needs the SVD of each target).
    pub fn uses_svd(self) -> bool {
        !matches!(
            self,
            Parameterization::AlphaLayer | Parameterization::AlphaChannel
        )
    }

    /// Length of z for an `rows × cols` matrix of rank `r`; `k` is the low-rank width.
    pub fn z_len(self, rows: usize, r: usize, k: usize) -> usize {
        match self {
            Parameterization::Paper | Parameterization::Official => r,
            Parameterization::AlphaLayer => 1,
            Parameterization::AlphaChannel => rows,
            Parameterization::LowRank => k.min(r),
        }
    }
}

/// The official code's `max_mult`.
pub const OFFICIAL_MAX_MULT: f64 = 1.0;

/// Which matrices carry a z vector.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Targets {
    /// gate/up/down of every layer (the official default).
    Mlp,
    /// q/k/v/o of every layer.
    Attn,
    /// All seven linears.
    All,
}

crate::value_names!(
    Targets,
    "targets",
    [(Mlp, "mlp", ""), (Attn, "attn", ""), (All, "all", "")]
);

impl Targets {
    /// Whether `kind` is a target.
    pub fn includes(self, kind: LinearKind) -> bool {
        match self {
            Targets::Mlp => kind.is_mlp(),
            Targets::Attn => !kind.is_mlp(),
            Targets::All => true,
        }
    }
}

/// Initial z of length `r`.
pub fn init_z(param: Parameterization, r: usize, rng: &mut impl Rng) -> Vec<f32> {
    match param {
        Parameterization::Official => (0..r)
            .map(|_| {
                let (u1, u2): (f32, f32) = (rng.gen::<f32>().max(1e-7), rng.gen());
                let n = (-2.0 * u1.ln()).sqrt() * (std::f32::consts::TAU * u2).cos();
                0.1 + 0.01 * n
            })
            .collect(),
        _ => vec![1.0; r],
    }
}

/// The applied scale s (see module docs) as plain numbers, in f64. For the parameterizations
/// without singular directions (alpha) the scale is z itself; for low-rank it is σ_k⊙z on the
/// first `z.len()` directions.
pub fn applied_scale(param: Parameterization, sigma: &[f32], z: &[f32]) -> Vec<f64> {
    match param {
        Parameterization::AlphaLayer | Parameterization::AlphaChannel => {
            z.iter().map(|&z| z as f64).collect()
        }
        Parameterization::Paper | Parameterization::LowRank => sigma
            .iter()
            .zip(z)
            .map(|(&s, &z)| s as f64 * z as f64)
            .collect(),
        Parameterization::Official => {
            let m: Vec<f64> = z
                .iter()
                .map(|&p| OFFICIAL_MAX_MULT / (1.0 + (-(p as f64)).exp()))
                .collect();
            let sum: f64 = sigma.iter().map(|&s| s as f64).sum();
            let sm: Vec<f64> = sigma.iter().zip(&m).map(|(&s, m)| s as f64 * m).collect();
            let denom: f64 = sm.iter().sum();
            let k = if denom > 0.0 { sum / denom } else { 1.0 };
            sm.iter().map(|x| x * k).collect()
        }
    }
}

/// The z' whose applied scale is Σ_k α_k s_k (s_k = the applied scale of expert k): in paper form
/// for the paper and official parameterizations (directions with σ = 0 carry nothing and get
/// z' = 1), and Σ_k α_k z_k in the expert's own form for the others.
pub fn mix(param: Parameterization, sigma: &[f32], experts: &[&[f32]], alpha: &[f64]) -> Vec<f32> {
    assert_eq!(experts.len(), alpha.len(), "one α per expert");
    if !matches!(param, Parameterization::Paper | Parameterization::Official) {
        let n = experts.first().map_or(0, |z| z.len());
        return (0..n)
            .map(|i| {
                experts
                    .iter()
                    .zip(alpha)
                    .map(|(z, a)| a * z[i] as f64)
                    .sum::<f64>() as f32
            })
            .collect();
    }
    let mut s = vec![0f64; sigma.len()];
    for (z, &a) in experts.iter().zip(alpha) {
        for (acc, x) in s.iter_mut().zip(applied_scale(param, sigma, z)) {
            *acc += a * x;
        }
    }
    s.iter()
        .zip(sigma)
        .map(|(&x, &sg)| {
            if sg > 0.0 {
                (x / sg as f64) as f32
            } else {
                1.0
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::model::AdaptedLinear;
    use crate::svf::forms::{ScaleWeight, SvfWeight};
    use crate::svf::svd::Svd;
    use candle_core::{DType, Device, Tensor};

    #[test]
    fn command_line_names_are_the_from_str_names() {
        use clap::ValueEnum;
        for p in Parameterization::ALL {
            assert_eq!(p.name().parse::<Parameterization>().unwrap(), p);
            assert_eq!(
                <Parameterization as ValueEnum>::from_str(p.name(), false),
                Ok(p)
            );
        }
        for t in Targets::ALL {
            assert_eq!(t.name().parse::<Targets>().unwrap(), t);
            assert_eq!(<Targets as ValueEnum>::from_str(t.name(), false), Ok(t));
            assert_eq!(serde_json::to_value(t).unwrap(), t.name());
        }
        let err = "mlps".parse::<Targets>().unwrap_err().to_string();
        assert_eq!(err, "targets `mlps`: expected mlp, attn or all");
    }

    #[test]
    fn official_scale_keeps_the_sum_of_singular_values() {
        let sigma = [3.0f32, 2.0, 0.5];
        let s = applied_scale(Parameterization::Official, &sigma, &[0.3, -1.0, 2.0]);
        assert!((s.iter().sum::<f64>() - 5.5).abs() < 1e-9);
        // Equal p everywhere: m constant, so s = σ exactly.
        let s = applied_scale(Parameterization::Official, &sigma, &[0.7; 3]);
        for (a, b) in s.iter().zip(sigma) {
            assert!((a - b as f64).abs() < 1e-6);
        }
    }

    #[test]
    fn one_hot_mixture_reproduces_the_expert() {
        let sigma = [3.0f32, 2.0, 0.0];
        for param in [Parameterization::Paper, Parameterization::Official] {
            let (a, b) = ([0.9f32, 1.2, 1.0], [1.5f32, 0.4, 1.0]);
            let z = mix(param, &sigma, &[&a, &b], &[0.0, 1.0]);
            let want = applied_scale(param, &sigma, &b);
            let got = applied_scale(Parameterization::Paper, &sigma, &z);
            for (x, y) in got.iter().zip(&want).take(2) {
                assert!((x - y).abs() < 1e-5, "{param:?}: {got:?} vs {want:?}");
            }
            // An even mixture is the mean of the applied scales.
            let z = mix(param, &sigma, &[&a, &b], &[0.5, 0.5]);
            let got = applied_scale(Parameterization::Paper, &sigma, &z);
            let (sa, sb) = (
                applied_scale(param, &sigma, &a),
                applied_scale(param, &sigma, &b),
            );
            assert!((got[0] - 0.5 * (sa[0] + sb[0])).abs() < 1e-5);
        }
    }

    #[test]
    fn factored_forward_equals_the_adapted_matrix() {
        // W' = U diag(σ⊙z) Vᵀ with hand-made orthonormal U (2×2 rotation) and V (identity).
        let dev = Device::Cpu;
        let (c, s) = (0.6f32, 0.8f32);
        let u = [c, -s, s, c];
        let v = [1.0f32, 0.0, 0.0, 1.0];
        let z = Tensor::new(&[2.0f32, 0.5], &dev).unwrap();
        let svd = Svd {
            rows: 2,
            cols: 2,
            u: u.to_vec(),
            sigma: vec![3.0, 1.0],
            v: v.to_vec(),
        };
        let w = SvfWeight::new(&svd, z, Parameterization::Paper, DType::F32, &dev).unwrap();
        // s = [6, 0.5]; W' = [[c·6, −s·0.5], [s·6, c·0.5]]
        let want = [c * 6.0, -s * 0.5, s * 6.0, c * 0.5];
        let got = w.adapted_weight().unwrap();
        for (a, b) in got.iter().zip(want) {
            assert!((a - b).abs() < 1e-6);
        }
        let x = Tensor::new(&[[1.0f32, 2.0]], &dev).unwrap();
        let y: Vec<Vec<f32>> = w.forward(&x).unwrap().to_vec2().unwrap();
        // y = W' x
        assert!((y[0][0] - (want[0] + 2.0 * want[1])).abs() < 1e-6);
        assert!((y[0][1] - (want[2] + 2.0 * want[3])).abs() < 1e-6);
    }

    #[test]
    fn init_matches_the_two_conventions() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(0);
        use rand::SeedableRng;
        assert_eq!(init_z(Parameterization::Paper, 3, &mut rng), vec![1.0; 3]);
        let p = init_z(Parameterization::Official, 1000, &mut rng);
        let mean = p.iter().sum::<f32>() / 1000.0;
        assert!((mean - 0.1).abs() < 0.002, "{mean}");
    }

    fn random_svd(rows: usize, cols: usize) -> (Vec<f32>, Svd) {
        let w: Vec<f32> = (0..rows * cols)
            .map(|i| ((i * 7919 % 23) as f32 / 11.0 - 1.0) * 0.3)
            .collect();
        let svd = crate::svf::svd::thin_svd(&w, rows, cols);
        (w, svd)
    }

    /// `w`'s output for `x`, flattened.
    fn output(w: &dyn AdaptedLinear, x: &Tensor) -> Vec<f32> {
        let y = w.forward(x).unwrap();
        y.flatten_all().unwrap().to_vec1().unwrap()
    }

    fn dense_t(w: &[f32], rows: usize, cols: usize) -> Tensor {
        Tensor::from_slice(w, (rows, cols), &Device::Cpu)
            .unwrap()
            .t()
            .unwrap()
            .contiguous()
            .unwrap()
    }

    #[test]
    fn low_rank_at_full_width_equals_the_paper_form_and_starts_at_the_base() {
        let (rows, cols) = (6, 5);
        let (w, svd) = random_svd(rows, cols);
        let dev = Device::Cpu;
        let z: Vec<f32> = (0..5).map(|i| 1.0 + 0.1 * i as f32 - 0.2).collect();
        let zt = Tensor::from_slice(&z, 5, &dev).unwrap();
        let paper = SvfWeight::new(&svd, zt.clone(), Parameterization::Paper, DType::F32, &dev)
            .unwrap()
            .adapted_weight()
            .unwrap();
        let full = SvfWeight::low_rank(&svd, zt, dense_t(&w, rows, cols), DType::F32, &dev)
            .unwrap()
            .adapted_weight()
            .unwrap();
        for (a, b) in paper.iter().zip(&full) {
            assert!((a - b).abs() < 1e-5, "{a} vs {b}");
        }
        // k = 2 with z = 1: exactly the base, and only the top-2 directions move otherwise.
        let ones = Tensor::ones(2, DType::F32, &dev).unwrap();
        let lr =
            SvfWeight::low_rank(&svd, ones, dense_t(&w, rows, cols), DType::F32, &dev).unwrap();
        assert_eq!(lr.adapted_weight().unwrap(), w);
        let x = Tensor::from_slice(&[0.5f32, -1.0, 2.0, 0.0, 1.5], (1, 5), &dev).unwrap();
        let y = output(&lr, &x);
        for (r, yr) in y.iter().enumerate() {
            let want: f32 = (0..5)
                .map(|c| w[r * 5 + c] * [0.5, -1.0, 2.0, 0.0, 1.5][c])
                .sum();
            assert!((yr - want).abs() < 1e-5);
        }
        // Too wide a k is an error, not a panic.
        let z6 = Tensor::ones(6, DType::F32, &dev).unwrap();
        assert!(SvfWeight::low_rank(&svd, z6, dense_t(&w, rows, cols), DType::F32, &dev).is_err());
    }

    #[test]
    fn alpha_scales_whole_matrices_or_output_channels() {
        let (rows, cols) = (3, 4);
        let w: Vec<f32> = (0..12).map(|i| [0.2, 0.0, -0.2][i % 3]).collect();
        let dev = Device::Cpu;
        let x = Tensor::from_slice(&[1.0f32, 2.0, -1.0, 0.5], (1, 4), &dev).unwrap();
        for z in [vec![1.5f32], vec![0.5, 2.0, -1.0]] {
            let s = ScaleWeight::new(
                dense_t(&w, rows, cols),
                Tensor::from_slice(&z, z.len(), &dev).unwrap(),
            )
            .unwrap();
            let wp = s.adapted_weight().unwrap();
            let y = output(&s, &x);
            for r in 0..rows {
                let zr = z[if z.len() == 1 { 0 } else { r }];
                for c in 0..cols {
                    assert!((wp[r * cols + c] - zr * w[r * cols + c]).abs() < 1e-7);
                }
                let want: f32 = (0..cols)
                    .map(|c| wp[r * cols + c] * [1.0, 2.0, -1.0, 0.5][c])
                    .sum();
                assert!((y[r] - want).abs() < 1e-6);
            }
        }
        let bad = Tensor::ones(2, DType::F32, &dev).unwrap();
        assert!(ScaleWeight::new(dense_t(&w, rows, cols), bad).is_err());
    }

    #[test]
    fn mixtures_of_scale_experts_are_linear_in_z() {
        let (a, b) = ([0.9f32, 1.2], [1.5f32, 0.4]);
        for param in [
            Parameterization::AlphaLayer,
            Parameterization::AlphaChannel,
            Parameterization::LowRank,
        ] {
            assert_eq!(mix(param, &[3.0, 2.0], &[&a, &b], &[0.0, 1.0]), b.to_vec());
            let m = mix(param, &[3.0, 2.0], &[&a, &b], &[0.25, 0.75]);
            assert!((m[0] - (0.25 * 0.9 + 0.75 * 1.5)).abs() < 1e-6);
        }
    }

    #[test]
    fn parameterization_names_round_trip() {
        for p in Parameterization::ALL {
            assert_eq!(p.name().parse::<Parameterization>().unwrap(), p);
        }
        assert!("alpha".parse::<Parameterization>().is_err());
    }
}
