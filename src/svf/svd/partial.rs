//! The top-k singular triplets of a matrix without its full SVD: the randomized range finder
//! with power iterations (Halko, Martinsson & Tropp 2011, algorithms 4.4 and 5.1).
//!
//! For `W` `[m, n]` and `l = k + oversample` columns: `Q` spans `W Ω` for a seeded random
//! `Ω` `[n, l]`, refined by `power_iters` rounds of `Q ← orth(W orth(Wᵀ Q))` (re-orthonormalized
//! each half-step, so the small singular values are not lost to rounding); then the SVD of
//! the small `B = Qᵀ W` `[l, n]` gives `W ≈ (Q U_B) Σ V_Bᵀ`, of which the top `k` triplets
//! are kept. The work is a handful of products with `W` (`O(m n l)`) instead of the full
//! decomposition's `O(m n min(m, n))`. Everything runs in f64 and sequentially (a matrix per
//! core, as the cache schedules them), stored as f32 with [`thin_svd`]'s sign convention, so
//! the same input and seed give the same bits.

use super::{signed_svd, thin_svd, Svd};
use faer::{Mat, MatRef};
use rand::{rngs::StdRng, Rng, SeedableRng};

/// Settings of [`partial_svd`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PartialSvdOptions {
    /// Extra random directions beyond `k` (Halko et al. suggest 5–10; more for flat spectra).
    pub oversample: usize,
    /// Power iterations; each sharpens the decay of the spectrum the range finder sees.
    pub power_iters: usize,
    /// Seed of the random test matrix.
    pub seed: u64,
}

impl PartialSvdOptions {
    /// The settings training uses for width `k`: `k` extra directions (at least 32) and 4
    /// power iterations. On the default model's MLP targets they find the top 16 and 64
    /// singular values within 1e-3 relative (a test checks it; the defaults' 2 iterations and
    /// 16 extra directions leave 3–6%), for 1.5–2× the defaults' time.
    pub fn for_rank(k: usize) -> Self {
        PartialSvdOptions {
            oversample: k.max(32),
            power_iters: 4,
            seed: 0,
        }
    }
}

impl Default for PartialSvdOptions {
    fn default() -> Self {
        PartialSvdOptions {
            oversample: 16,
            power_iters: 2,
            seed: 0,
        }
    }
}

/// The top `k` singular triplets of the row-major `rows × cols` matrix `w` (all of them when
/// `k ≥ min(rows, cols)`). When `k + oversample` is more than half of `min(rows, cols)` the
/// full [`thin_svd`] is as cheap and exact, and is used instead.
///
/// # Panics
/// As [`thin_svd`]: on a length mismatch or a non-finite value.
pub fn partial_svd(w: &[f32], rows: usize, cols: usize, k: usize, o: &PartialSvdOptions) -> Svd {
    let r = rows.min(cols);
    let l = (k + o.oversample).min(r);
    if 2 * l > r || k == 0 {
        return thin_svd(w, rows, cols).truncate(k);
    }
    assert!(
        w.iter().all(|x| x.is_finite()),
        "partial_svd: non-finite value in the matrix"
    );
    let a = Mat::<f64>::from_fn(rows, cols, |i, j| f64::from(w[i * cols + j])); // [m, n]
    let mut rng = StdRng::seed_from_u64(o.seed);
    let omega = Mat::<f64>::from_fn(cols, l, |_, _| rng.gen_range(-1.0..1.0)); // [n, l]
    let mut q = orth((&a * &omega).as_ref()); // [m, l]
    for _ in 0..o.power_iters {
        let z = orth((a.transpose() * &q).as_ref()); // [n, l]
        q = orth((&a * &z).as_ref());
    }
    let b = q.transpose() * &a; // [l, n]
    let svd = b
        .thin_svd()
        .expect("the SVD of a finite l × n matrix converges");
    let u = &q * svd.U(); // [m, l]
    let s = svd.S();
    let sigma: Vec<f64> = (0..k).map(|i| s[i]).collect();
    let first_k = |m: MatRef<'_, f64>| Mat::<f64>::from_fn(m.nrows(), k, |i, j| m[(i, j)]);
    signed_svd(first_k(u.as_ref()), &sigma, first_k(svd.V()))
}

/// An orthonormal basis of the columns of `y` (thin Q of its QR).
fn orth(y: MatRef<'_, f64>) -> Mat<f64> {
    y.qr().compute_thin_Q()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Largest principal angle (radians) between the column spans of two `[n, k]` row-major
    /// orthonormal bases: acos of the smallest singular value of `AᵀB`.
    fn max_angle(a: &[f32], b: &[f32], n: usize, k: usize) -> f64 {
        let ma = Mat::<f64>::from_fn(n, k, |i, j| f64::from(a[i * k + j]));
        let mb = Mat::<f64>::from_fn(n, k, |i, j| f64::from(b[i * k + j]));
        let c = ma.transpose() * &mb;
        let s = c.thin_svd().unwrap();
        let min = (0..k).map(|i| s.S()[i]).fold(f64::INFINITY, f64::min);
        min.clamp(-1.0, 1.0).acos()
    }

    /// A `rows × cols` matrix with singular values decaying like a trained weight's: a
    /// low-rank part of decreasing strength plus ternary noise.
    fn decaying(rows: usize, cols: usize, seed: u64) -> Vec<f32> {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut w: Vec<f32> = (0..rows * cols)
            .map(|_| rng.gen_range(-1i32..=1) as f32)
            .collect();
        for t in 0..40 {
            let strength = 40.0 / (1.0 + t as f32);
            let u: Vec<f32> = (0..rows).map(|_| rng.gen_range(-1.0..1.0)).collect();
            let v: Vec<f32> = (0..cols).map(|_| rng.gen_range(-1.0..1.0)).collect();
            for i in 0..rows {
                for j in 0..cols {
                    w[i * cols + j] += strength * u[i] * v[j];
                }
            }
        }
        w
    }

    #[test]
    fn top_k_matches_the_full_svd() {
        let (rows, cols, k) = (300, 200, 16);
        let w = decaying(rows, cols, 5);
        let full = thin_svd(&w, rows, cols).truncate(k);
        let part = partial_svd(&w, rows, cols, k, &PartialSvdOptions::default());
        assert_eq!((part.rank(), part.rows, part.cols), (k, rows, cols));
        let worst = (part.sigma.iter().zip(&full.sigma))
            .map(|(a, b)| ((a - b) / b).abs())
            .fold(0f32, f32::max);
        let angles = (
            max_angle(&part.u, &full.u, rows, k),
            max_angle(&part.v, &full.v, cols, k),
        );
        eprintln!("worst relative σ error {worst:e}, largest angles {angles:?}");
        assert!(worst < 1e-3, "σ relative error {worst}");
        assert!(angles.0 < 0.05 && angles.1 < 0.05, "{angles:?}");
        // The same seed gives the same bits; signs follow thin_svd's rule.
        let again = partial_svd(&w, rows, cols, k, &PartialSvdOptions::default());
        assert_eq!(part, again);
        for i in 0..k {
            let dot: f32 = (0..rows)
                .map(|r| part.u[r * k + i] * full.u[r * k + i])
                .sum();
            assert!(dot > 0.99, "direction {i}: {dot}");
        }
    }

    #[test]
    fn large_k_falls_back_to_the_full_svd() {
        let w = decaying(40, 30, 1);
        let o = PartialSvdOptions::default();
        assert_eq!(
            partial_svd(&w, 40, 30, 8, &o),
            thin_svd(&w, 40, 30).truncate(8)
        );
        assert_eq!(partial_svd(&w, 40, 30, 99, &o).rank(), 30);
    }

    /// The measurement of docs/results.md ("Partial SVD"): time, σ error and subspace angles
    /// against the full SVD, on the default model's MLP matrices and on a 2B-4T-shaped random
    /// ternary matrix (6912 × 2560, a flat spectrum: the hard case). Run with
    /// `cargo test --release --lib -- --ignored partial_svd_measure --nocapture`.
    #[test]
    #[ignore]
    fn partial_svd_measure() {
        use std::time::Instant;
        let ck = crate::engine::checkpoint::load_or_default(None).unwrap();
        let lin = &ck.layers[0].linears[4];
        let m = lin.matrix.ternary().unwrap();
        let mut cases = vec![("default model layer 0 gate", m.dequantize(), m.rows, m.cols)];
        let mut rng = StdRng::seed_from_u64(0);
        let big: Vec<f32> = (0..6912 * 2560)
            .map(|_| rng.gen_range(-1i32..=1) as f32)
            .collect();
        cases.push(("2B-4T shape, random ternary", big, 6912, 2560));
        for (name, w, rows, cols) in cases {
            let t = Instant::now();
            let full = thin_svd(&w, rows, cols);
            let full_s = t.elapsed().as_secs_f64();
            for k in [16, 64, 128] {
                for power_iters in [2, 4] {
                    let o = PartialSvdOptions {
                        power_iters,
                        ..Default::default()
                    };
                    let t = Instant::now();
                    let part = partial_svd(&w, rows, cols, k, &o);
                    let part_s = t.elapsed().as_secs_f64();
                    let f = full.truncate(k);
                    let worst = (part.sigma.iter().zip(&f.sigma))
                        .map(|(a, b)| ((a - b) / b).abs())
                        .fold(0f32, f32::max);
                    let angle = max_angle(&part.u, &f.u, rows, k);
                    eprintln!(
                        "{name} {rows}×{cols} k {k} q {power_iters}: full {full_s:.2} s, \
                         partial {part_s:.3} s ({:.1}× faster); worst σ error {worst:.1e}, \
                         largest U angle {angle:.3} rad",
                        full_s / part_s
                    );
                }
            }
        }
    }
    #[test]
    fn training_options_find_the_default_models_top_singular_values_to_1e_3() {
        // Every MLP target of the default model, at the widths training uses.
        let ck = crate::engine::checkpoint::load_or_default(None).unwrap();
        for k in [16, 64] {
            let o = PartialSvdOptions::for_rank(k);
            let mut worst = 0f32;
            for lin in ck.layers.iter().flat_map(|l| &l.linears[4..7]) {
                let m = lin.matrix.ternary().unwrap();
                let w = m.dequantize();
                let full = thin_svd(&w, m.rows, m.cols).truncate(k);
                let part = partial_svd(&w, m.rows, m.cols, k, &o);
                let err = (part.sigma.iter().zip(&full.sigma))
                    .map(|(a, b)| ((a - b) / b).abs())
                    .fold(0f32, f32::max);
                worst = worst.max(err);
            }
            assert!(worst < 1e-3, "k {k}: worst relative σ error {worst:e}");
        }
    }
}
