//! Thin SVD of weight matrices and its on-disk cache (docs/DESIGN.md §3).
//!
//! SVF trains one vector `z ∈ ℝʳ` per target matrix `W = U diag(σ) Vᵀ`, `r = min(m, n)`; the
//! factors `u`, `sigma`, `v` are computed once per model and reused by every expert, so they
//! are cached on disk keyed by the model's content hash.
//!
//! Numerics: the decomposition runs in f64 with faer (one-sided Householder bidiagonalisation
//! then a divide-and-conquer bidiagonal SVD) and is stored as f32. Singular vectors of ternary
//! matrices feed the training signal `∂L/∂z_i = σ_i · u_iᵀ G v_i`. Measured on a random
//! ternary 1536×512 matrix: faer in f32 leaves `max |UᵀU − I|` ≈ 1e-5; in f64 then rounded to
//! f32 it is ≈ 1e-8 and `W` is reconstructed to ≈ 5e-8 relative, for ~1.5× the time.
//!
//! Reproducibility: singular vectors are defined up to sign, so [`thin_svd`] fixes one (the
//! entry of largest magnitude of each column of `U` is positive, the matching column of `V`
//! flipped with it). faer runs sequentially here (`Par::Seq`), so the same input gives
//! bit-identical output on the same machine whatever the thread count; across CPUs (different
//! SIMD paths) results agree to rounding, and the sign rule keeps them from flipping. Where
//! singular values are repeated (exactly degenerate), the vectors of that subspace are not
//! unique and no rule can make them so; `U diag(σ) Vᵀ` still is.

mod cache;
mod partial;
mod top;

pub use cache::{CacheStats, SvdCache, SvdError};
pub use partial::{partial_svd, PartialSvdOptions};

use faer::diag::Diag;
use faer::dyn_stack::{MemBuffer, MemStack};
use faer::linalg::svd::ComputeSvdVectors;
use faer::{Accum, Mat, Par};

/// Two entries of a column of `U` whose magnitudes agree to this relative tolerance count as
/// tied for the sign rule, and the first one wins. Exact ties are common in small ternary
/// matrices (e.g. `u = (0, 1, −1)/√2`); the tolerance keeps rounding noise (~1e-15) from
/// deciding them differently on different machines.
const SIGN_TIE_RELATIVE: f64 = 1e-6;

/// A thin singular value decomposition `W = U diag(σ) Vᵀ` of a row-major `rows × cols` matrix,
/// stored as f32. `r = sigma.len()` is `min(rows, cols)`, or `k` after [`Svd::truncate`].
#[derive(Debug, Clone, PartialEq)]
pub struct Svd {
    /// Rows of `W` (m, the output dimension of a linear layer).
    pub rows: usize,
    /// Columns of `W` (n, the input dimension).
    pub cols: usize,
    /// Left singular vectors, row-major `[rows, r]`; column `i` is `u_i`.
    pub u: Vec<f32>,
    /// Singular values `[r]`, non-negative, in non-increasing order.
    pub sigma: Vec<f32>,
    /// Right singular vectors, row-major `[cols, r]`; column `i` is `v_i`.
    pub v: Vec<f32>,
}

/// Why faer could not decompose a matrix; [`SvdCache`] turns it into an [`SvdError`] naming
/// the matrix.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Failure {
    NonFinite { row: usize, col: usize, value: f32 },
    NoConvergence,
}

/// The thin SVD of the row-major `rows × cols` matrix `w`, computed in f64, stored as f32,
/// with the sign convention of the module docs (largest-magnitude entry of each `u_i`
/// positive; first such entry on ties).
///
/// # Panics
/// If `w.len() != rows * cols`, if `w` holds a NaN or infinity, or if faer's iteration does
/// not converge (not expected for finite input). [`SvdCache::get_or_compute`] checks these and
/// returns an error instead.
pub fn thin_svd(w: &[f32], rows: usize, cols: usize) -> Svd {
    assert_eq!(
        w.len(),
        rows * cols,
        "thin_svd: {} values for a {rows} × {cols} matrix",
        w.len()
    );
    match try_thin_svd(w, rows, cols) {
        Ok(svd) => svd,
        Err(Failure::NonFinite { row, col, value }) => {
            panic!("thin_svd: non-finite value {value} at row {row}, column {col}")
        }
        Err(Failure::NoConvergence) => panic!("thin_svd: faer's SVD did not converge"),
    }
}

fn try_thin_svd(w: &[f32], rows: usize, cols: usize) -> Result<Svd, Failure> {
    debug_assert_eq!(w.len(), rows * cols);
    if let Some(k) = w.iter().position(|x| !x.is_finite()) {
        return Err(Failure::NonFinite {
            row: k / cols,
            col: k % cols,
            value: w[k],
        });
    }
    let r = rows.min(cols);
    if r == 0 {
        return Ok(Svd {
            rows,
            cols,
            u: Vec::new(),
            sigma: Vec::new(),
            v: Vec::new(),
        });
    }

    let a = Mat::<f64>::from_fn(rows, cols, |i, j| f64::from(w[i * cols + j])); // [m, n]
    let mut u = Mat::<f64>::zeros(rows, r); // [m, r]
    let mut v = Mat::<f64>::zeros(cols, r); // [n, r]
    let mut s = Diag::<f64>::zeros(r); // [r]

    // Sequential inside one matrix: the cache parallelises across matrices (better use of
    // cores for many mid-sized matrices) and a fixed schedule keeps results bit-reproducible.
    let par = Par::Seq;
    let mut scratch = MemBuffer::new(faer::linalg::svd::svd_scratch::<f64>(
        rows,
        cols,
        ComputeSvdVectors::Thin,
        ComputeSvdVectors::Thin,
        par,
        Default::default(),
    ));
    faer::linalg::svd::svd(
        a.as_ref(),
        s.as_mut(),
        Some(u.as_mut()),
        Some(v.as_mut()),
        par,
        MemStack::new(&mut scratch),
        Default::default(),
    )
    .map_err(|_| Failure::NoConvergence)?;

    let sigma: Vec<f64> = (0..r).map(|i| s[i]).collect();
    Ok(signed_svd(u, &sigma, v))
}

/// The stored f32 [`Svd`] of f64 factors `u` `[m, r]`, `sigma` `[r]`, `v` `[n, r]`, with the
/// sign convention of the module docs applied.
fn signed_svd(mut u: Mat<f64>, sigma: &[f64], mut v: Mat<f64>) -> Svd {
    let (rows, cols) = (u.nrows(), v.nrows());
    for i in 0..sigma.len() {
        let col = u.col(i);
        let max_abs = (0..rows).map(|k| col[k].abs()).fold(0.0f64, f64::max);
        let lead = (0..rows)
            .find(|&k| col[k].abs() >= max_abs * (1.0 - SIGN_TIE_RELATIVE))
            .expect("a column of U has an entry of maximal magnitude");
        if col[lead] < 0.0 {
            for k in 0..rows {
                u[(k, i)] = -u[(k, i)];
            }
            for k in 0..cols {
                v[(k, i)] = -v[(k, i)];
            }
        }
    }
    let sigma: Vec<f32> = sigma.iter().map(|&s| s.max(0.0) as f32).collect();
    debug_assert!(sigma.windows(2).all(|p| p[0] >= p[1]), "faer sorts σ");
    Svd {
        rows,
        cols,
        u: to_row_major_f32(&u),
        sigma,
        v: to_row_major_f32(&v),
    }
}

fn to_row_major_f32(m: &Mat<f64>) -> Vec<f32> {
    let mut out = Vec::with_capacity(m.nrows() * m.ncols());
    for i in 0..m.nrows() {
        for j in 0..m.ncols() {
            out.push(m[(i, j)] as f32);
        }
    }
    out
}

impl Svd {
    /// Number of singular triplets held: `r = min(rows, cols)`, or `k` after
    /// [`Svd::truncate`] — the length of an SVF `z` vector for this matrix.
    pub fn rank(&self) -> usize {
        self.sigma.len()
    }

    /// Number of singular values above `max(rows, cols) · σ_max · f64::EPSILON`, the threshold
    /// of `numpy.linalg.matrix_rank`. Ternary matrices can be rank-deficient; SVF scales on
    /// directions with `σ_i = 0` change nothing.
    pub fn numerical_rank(&self) -> usize {
        let max = self.sigma.first().copied().unwrap_or(0.0) as f64;
        let tol = self.rows.max(self.cols) as f64 * max * f64::EPSILON;
        self.sigma.iter().filter(|&&s| s as f64 > tol).count()
    }

    /// The top-`k` triplets (`min(k, r)` if `k` exceeds the rank held).
    pub fn truncate(&self, k: usize) -> Svd {
        let r = self.rank();
        let k = k.min(r);
        let take = |m: &[f32], rows: usize| -> Vec<f32> {
            (0..rows)
                .flat_map(|i| &m[i * r..i * r + k])
                .copied()
                .collect()
        };
        Svd {
            rows: self.rows,
            cols: self.cols,
            u: take(&self.u, self.rows),
            sigma: self.sigma[..k].to_vec(),
            v: take(&self.v, self.cols),
        }
    }

    /// `U diag(σ) Vᵀ` as a row-major `rows × cols` matrix (accumulated in f64).
    pub fn reconstruct(&self) -> Vec<f32> {
        let mut w = Mat::<f64>::zeros(self.rows, self.cols); // [m, n]
        self.accumulate(&mut w, Accum::Replace, 1.0);
        to_row_major_f32(&w)
    }

    /// `‖W − UΣVᵀ‖_F / ‖W‖_F`, computed in f64 from the stored f32 factors; the absolute
    /// `‖UΣVᵀ‖_F` if `W` is zero.
    ///
    /// # Panics
    /// If `w.len() != rows * cols`.
    pub fn relative_error(&self, w: &[f32]) -> f64 {
        assert_eq!(
            w.len(),
            self.rows * self.cols,
            "relative_error: {} values for a {} × {} matrix",
            w.len(),
            self.rows,
            self.cols
        );
        let mut residual =
            Mat::<f64>::from_fn(self.rows, self.cols, |i, j| f64::from(w[i * self.cols + j]));
        let norm_w = residual.norm_l2();
        self.accumulate(&mut residual, Accum::Add, -1.0);
        let norm_residual = residual.norm_l2();
        if norm_w > 0.0 {
            norm_residual / norm_w
        } else {
            norm_residual
        }
    }

    /// `dst ← (dst if Add) + alpha · U diag(σ) Vᵀ`, in f64.
    fn accumulate(&self, dst: &mut Mat<f64>, accum: Accum, alpha: f64) {
        let r = self.rank();
        let us = Mat::<f64>::from_fn(self.rows, r, |i, k| {
            f64::from(self.u[i * r + k]) * f64::from(self.sigma[k])
        }); // [m, r]
        let v = Mat::<f64>::from_fn(self.cols, r, |j, k| f64::from(self.v[j * r + k])); // [n, r]
        if r == 0 {
            if accum == Accum::Replace {
                dst.fill(0.0);
            }
            return;
        }
        faer::linalg::matmul::matmul(
            dst.as_mut(),
            accum,
            us.as_ref(),
            v.as_ref().transpose(),
            alpha,
            Par::Seq,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    /// A random ternary `rows × cols` matrix, row-major.
    pub(super) fn ternary(rows: usize, cols: usize, seed: u64) -> Vec<f32> {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        (0..rows * cols)
            .map(|_| rng.gen_range(-1i32..=1) as f32)
            .collect()
    }

    /// `max |MᵀM − I|` for a row-major `[rows, r]` matrix `m`.
    fn gram_error(m: &[f32], rows: usize, r: usize) -> f64 {
        let mut worst = 0.0f64;
        for a in 0..r {
            for b in 0..r {
                let dot: f64 = (0..rows)
                    .map(|i| f64::from(m[i * r + a]) * f64::from(m[i * r + b]))
                    .sum();
                let target = if a == b { 1.0 } else { 0.0 };
                worst = worst.max((dot - target).abs());
            }
        }
        worst
    }

    /// Row-major `n × n` Householder reflection `I − 2 a aᵀ / aᵀa`.
    fn householder(a: &[f64]) -> Vec<f64> {
        let n = a.len();
        let norm2: f64 = a.iter().map(|x| x * x).sum();
        let mut h = vec![0.0; n * n];
        for i in 0..n {
            for j in 0..n {
                let delta = if i == j { 1.0 } else { 0.0 };
                h[i * n + j] = delta - 2.0 * a[i] * a[j] / norm2;
            }
        }
        h
    }

    /// Row-major `n × n` Givens rotation by `theta` in the plane of axes `p`, `q`.
    fn givens(n: usize, p: usize, q: usize, theta: f64) -> Vec<f64> {
        let mut g = vec![0.0; n * n];
        for i in 0..n {
            g[i * n + i] = 1.0;
        }
        let (s, c) = theta.sin_cos();
        g[p * n + p] = c;
        g[q * n + q] = c;
        g[p * n + q] = -s;
        g[q * n + p] = s;
        g
    }

    /// Row-major `(a: [m, k]) · (b: [k, n])`.
    fn matmul(a: &[f64], b: &[f64], m: usize, k: usize, n: usize) -> Vec<f64> {
        let mut c = vec![0.0; m * n];
        for i in 0..m {
            for l in 0..k {
                for j in 0..n {
                    c[i * n + j] += a[i * k + l] * b[l * n + j];
                }
            }
        }
        c
    }

    fn column(m: &[f32], r: usize, j: usize) -> Vec<f64> {
        m.chunks_exact(r).map(|row| f64::from(row[j])).collect()
    }

    fn assert_close(got: &[f64], want: &[f64], tol: f64, what: &str) {
        assert_eq!(got.len(), want.len(), "{what}: length");
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            assert!(
                (g - w).abs() <= tol,
                "{what}[{i}]: got {g}, want {w} (tol {tol})"
            );
        }
    }

    pub(super) fn assert_bit_identical(a: &Svd, b: &Svd) {
        let bits = |x: &[f32]| x.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
        assert_eq!((a.rows, a.cols), (b.rows, b.cols));
        assert_eq!(bits(&a.u), bits(&b.u), "u differs");
        assert_eq!(bits(&a.sigma), bits(&b.sigma), "sigma differs");
        assert_eq!(bits(&a.v), bits(&b.v), "v differs");
    }

    fn sigma_f64(svd: &Svd) -> Vec<f64> {
        svd.sigma.iter().map(|&s| f64::from(s)).collect()
    }

    /// The checks every decomposition must pass: shapes, orthonormal factors, σ sorted and
    /// non-negative, W reconstructed, and the sign convention.
    fn assert_valid(svd: &Svd, w: &[f32], rows: usize, cols: usize) {
        let r = rows.min(cols);
        assert_eq!((svd.rows, svd.cols, svd.rank()), (rows, cols, r));
        assert_eq!((svd.u.len(), svd.v.len()), (rows * r, cols * r));
        assert!(svd.sigma.windows(2).all(|p| p[0] >= p[1]), "σ not sorted");
        assert!(svd.sigma.iter().all(|&s| s >= 0.0), "negative σ");
        let (eu, ev) = (gram_error(&svd.u, rows, r), gram_error(&svd.v, cols, r));
        assert!(eu < 1e-5, "{rows}×{cols}: |UᵀU − I| = {eu:e}");
        assert!(ev < 1e-5, "{rows}×{cols}: |VᵀV − I| = {ev:e}");
        let err = svd.relative_error(w);
        assert!(err < 1e-5, "{rows}×{cols}: relative error {err:e}");
        for j in 0..r {
            let u = column(&svd.u, r, j);
            let max = u.iter().fold(0.0f64, |m, x| m.max(x.abs()));
            let lead = u.iter().find(|x| x.abs() >= max * (1.0 - 1e-5)).unwrap();
            assert!(*lead > 0.0, "column {j} of U leads with {lead}");
        }
    }

    #[test]
    fn known_singular_values_from_orthogonal_factors() {
        // W = Q1[:, :5] diag(s) Q2ᵀ with Q1 = H(a)·H(b) (7×7) and Q2 = H(c)·G (5×5): its
        // singular values are s and its singular vectors the columns of Q1, Q2 up to sign.
        let s = [9.0, 4.0, 2.5, 1.0, 0.25];
        let (m, n) = (7, 5);
        let q1 = matmul(
            &householder(&[1.0, -2.0, 0.5, 3.0, 0.0, 1.0, -1.0]),
            &householder(&[0.0, 1.0, 1.0, -0.5, 2.0, 0.0, 1.5]),
            m,
            m,
            m,
        );
        let q2 = matmul(
            &householder(&[2.0, 1.0, -1.0, 0.5, 1.0]),
            &givens(n, 1, 3, 0.7),
            n,
            n,
            n,
        );
        let mut q1s = vec![0.0; m * n]; // [m, n] = Q1[:, :n] diag(s)
        for i in 0..m {
            for j in 0..n {
                q1s[i * n + j] = q1[i * m + j] * s[j];
            }
        }
        let q2t: Vec<f64> = (0..n * n).map(|k| q2[(k % n) * n + k / n]).collect();
        let w64 = matmul(&q1s, &q2t, m, n, n);
        let w: Vec<f32> = w64.iter().map(|&x| x as f32).collect();

        for (w, rows, cols, left, right) in [
            (w.clone(), m, n, (&q1, m), (&q2, n)),
            // The transpose exercises the wide path (cols > rows) with U and V swapped.
            (
                (0..m * n).map(|k| w[(k % m) * n + k / m]).collect(),
                n,
                m,
                (&q2, n),
                (&q1, m),
            ),
        ] {
            let svd = thin_svd(&w, rows, cols);
            assert_valid(&svd, &w, rows, cols);
            assert_close(&sigma_f64(&svd), &s, 1e-5, "σ");
            for j in 0..n {
                let (q, dim) = left;
                let dot: f64 = (0..rows)
                    .map(|i| column(&svd.u, n, j)[i] * q[i * dim + j])
                    .sum();
                assert!((dot.abs() - 1.0).abs() < 1e-5, "u_{j}·q_{j} = {dot}");
                let (q, dim) = right;
                let dot: f64 = (0..cols)
                    .map(|i| column(&svd.v, n, j)[i] * q[i * dim + j])
                    .sum();
                assert!((dot.abs() - 1.0).abs() < 1e-5, "v_{j}·q_{j} = {dot}");
            }
            // Eckart–Young: the best rank-2 approximation leaves exactly s₃..s₅.
            let tail: f64 = s[2..].iter().map(|x| x * x).sum::<f64>().sqrt();
            let all: f64 = s.iter().map(|x| x * x).sum::<f64>().sqrt();
            let err = svd.truncate(2).relative_error(&w);
            assert!((err - tail / all).abs() < 1e-6, "rank-2 error {err}");
        }
    }

    #[test]
    fn hand_computed_2x2() {
        // WᵀW = [[25, 20], [20, 25]]: eigenvalues 45 and 5, eigenvectors (1, ±1)/√2;
        // u_i = W v_i / σ_i = (1, 3)/√10 and (3, −1)/√10.
        let w = [3.0, 0.0, 4.0, 5.0];
        let svd = thin_svd(&w, 2, 2);
        assert_valid(&svd, &w, 2, 2);
        assert_close(&sigma_f64(&svd), &[45f64.sqrt(), 5f64.sqrt()], 1e-6, "σ");
        let (a, b) = (1.0 / 10f64.sqrt(), 3.0 / 10f64.sqrt());
        let h = std::f64::consts::FRAC_1_SQRT_2;
        assert_close(&column(&svd.u, 2, 0), &[a, b], 1e-6, "u₀");
        assert_close(&column(&svd.u, 2, 1), &[b, -a], 1e-6, "u₁");
        assert_close(&column(&svd.v, 2, 0), &[h, h], 1e-6, "v₀");
        assert_close(&column(&svd.v, 2, 1), &[h, -h], 1e-6, "v₁");
    }

    #[test]
    fn hand_computed_3x2_and_its_transpose() {
        // WᵀW = [[2, 1], [1, 2]]: σ = √3, 1; v = (1, ±1)/√2; u₀ = (2, 1, 1)/√6 and
        // u₁ = (0, 1, −1)/√2, whose two entries of equal magnitude test the tie rule
        // (the first wins, so u₁ starts positive).
        let w = [1.0, 1.0, 1.0, 0.0, 0.0, 1.0];
        let h = std::f64::consts::FRAC_1_SQRT_2;
        let r6 = 6f64.sqrt();
        let svd = thin_svd(&w, 3, 2);
        assert_valid(&svd, &w, 3, 2);
        assert_close(&sigma_f64(&svd), &[3f64.sqrt(), 1.0], 1e-6, "σ");
        assert_close(
            &column(&svd.u, 2, 0),
            &[2.0 / r6, 1.0 / r6, 1.0 / r6],
            1e-6,
            "u₀",
        );
        assert_close(&column(&svd.u, 2, 1), &[0.0, h, -h], 1e-6, "u₁");
        assert_close(&column(&svd.v, 2, 0), &[h, h], 1e-6, "v₀");
        assert_close(&column(&svd.v, 2, 1), &[h, -h], 1e-6, "v₁");

        // Wᵀ = V Σ Uᵀ: same σ, roles swapped; the sign rule now applies to (1, ±1)/√2,
        // another exact tie, so both columns of U lead positive.
        let wt = [1.0, 1.0, 0.0, 1.0, 0.0, 1.0];
        let svd = thin_svd(&wt, 2, 3);
        assert_valid(&svd, &wt, 2, 3);
        assert_close(&sigma_f64(&svd), &[3f64.sqrt(), 1.0], 1e-6, "σ");
        assert_close(&column(&svd.u, 2, 1), &[h, -h], 1e-6, "u₁ of Wᵀ");
        assert_close(&column(&svd.v, 2, 1), &[0.0, h, -h], 1e-6, "v₁ of Wᵀ");
    }

    #[test]
    // numpy's printed values are kept verbatim, √2 included.
    #[allow(clippy::approx_constant)]
    fn ternary_6x4_matches_numpy() {
        // Reference from numpy 2.4.6, `numpy.linalg.svd(W, full_matrices=False)` in f64, with
        // the same sign rule applied to its output. (σ² = 5 + √3, 4, 5 − √3, 2 analytically.)
        #[rustfmt::skip]
        let w = [
             1.0,  0.0, -1.0,  1.0,
             0.0,  1.0,  1.0, -1.0,
            -1.0,  1.0,  0.0,  0.0,
             1.0,  1.0,  1.0,  0.0,
             0.0, -1.0,  1.0,  1.0,
             1.0,  0.0,  0.0, -1.0,
        ];
        let numpy_sigma = [
            2.5946195882188348,
            2.0,
            1.8077469934786565,
            1.414213562373095,
        ];
        let numpy_u0 = [
            -0.41919974647505087,
            0.6612248329466446,
            0.24202508647159376,
            0.41919974647505104,
            -0.30687551293973,
            0.24202508647159357,
        ];
        let numpy_v0 = [
            0.0,
            0.6279630301995545,
            0.4597008433809827,
            -0.6279630301995542,
        ];
        let svd = thin_svd(&w, 6, 4);
        assert_valid(&svd, &w, 6, 4);
        assert_close(&sigma_f64(&svd), &numpy_sigma, 1e-5, "σ vs numpy");
        assert_close(&column(&svd.u, 4, 0), &numpy_u0, 1e-5, "u₀ vs numpy");
        assert_close(&column(&svd.v, 4, 0), &numpy_v0, 1e-5, "v₀ vs numpy");
        assert_eq!(svd.numerical_rank(), 4);
    }

    #[test]
    fn random_ternary_factors_are_orthonormal() {
        for (rows, cols, seed) in [(64, 32, 1), (32, 64, 2), (48, 48, 3), (1, 9, 4), (9, 1, 5)] {
            let w = ternary(rows, cols, seed);
            let svd = thin_svd(&w, rows, cols);
            assert_valid(&svd, &w, rows, cols);
            let back = svd.reconstruct();
            let worst = w
                .iter()
                .zip(&back)
                .fold(0.0f32, |m, (a, b)| m.max((a - b).abs()));
            assert!(worst < 1e-5, "{rows}×{cols}: max |W − UΣVᵀ| = {worst:e}");
        }
    }

    #[test]
    fn rank_deficient_and_degenerate_inputs() {
        // Row 2 = row 0 + row 1 and row 3 = row 0: rank 2.
        #[rustfmt::skip]
        let w = [
            1.0, 0.0, -1.0,  0.0,
            0.0, 1.0,  0.0, -1.0,
            1.0, 1.0, -1.0, -1.0,
            1.0, 0.0, -1.0,  0.0,
            0.0, 0.0,  0.0,  0.0,
        ];
        let svd = thin_svd(&w, 5, 4);
        assert_valid(&svd, &w, 5, 4);
        assert_eq!((svd.rank(), svd.numerical_rank()), (4, 2));
        assert!(
            svd.sigma[2] < 1e-6 && svd.sigma[3] < 1e-6,
            "{:?}",
            svd.sigma
        );

        let zero = [0.0f32; 6];
        let svd = thin_svd(&zero, 3, 2);
        assert_eq!(svd.sigma, vec![0.0, 0.0]);
        assert_eq!(svd.numerical_rank(), 0);
        assert_eq!(svd.relative_error(&zero), 0.0);
        assert_eq!(svd.reconstruct(), zero.to_vec());

        let empty = thin_svd(&[], 0, 5);
        assert_eq!((empty.rank(), empty.u.len(), empty.v.len()), (0, 0, 0));
        assert_eq!(empty.reconstruct(), Vec::<f32>::new());
    }

    #[test]
    fn truncate_keeps_the_leading_columns() {
        let w = ternary(10, 6, 7);
        let svd = thin_svd(&w, 10, 6);
        let top = svd.truncate(3);
        assert_eq!((top.rank(), top.u.len(), top.v.len()), (3, 30, 18));
        assert_eq!(&top.sigma[..], &svd.sigma[..3]);
        for i in 0..10 {
            assert_eq!(&top.u[i * 3..i * 3 + 3], &svd.u[i * 6..i * 6 + 3]);
        }
        for j in 0..6 {
            assert_eq!(&top.v[j * 3..j * 3 + 3], &svd.v[j * 6..j * 6 + 3]);
        }
        assert_bit_identical(&svd.truncate(99), &svd);
        assert_eq!(svd.truncate(0).reconstruct(), vec![0.0; 60]);
    }

    #[test]
    fn results_are_bit_identical_across_calls_and_threads() {
        let w = ternary(40, 24, 11);
        let a = thin_svd(&w, 40, 24);
        let b = thin_svd(&w, 40, 24);
        let c = std::thread::spawn(move || thin_svd(&w, 40, 24))
            .join()
            .unwrap();
        assert_bit_identical(&a, &b);
        assert_bit_identical(&a, &c);
    }

    #[test]
    #[should_panic(expected = "non-finite value NaN at row 1, column 0")]
    fn thin_svd_rejects_nan() {
        thin_svd(&[1.0, 0.0, f32::NAN, 1.0], 2, 2);
    }
}
