//! Re-quantization of adapted weights back to ternary (docs/DESIGN.md §5, the Phase 8 handoff).
//!
//! BitNet's absmean rule is the *training* rule: it maps latent float weights to γ·W_t. Applied
//! to weights that are already ternary (W = γ·W_t) it would keep W_t but shrink the scale to
//! γ·(share of non-zeros). An adapted W' = W + small delta is nearly ternary, so it is
//! re-quantized with the optimal symmetric three-level quantizer instead (Lloyd's iteration):
//! codes T = sign(W)·[|W| > γ/2] and γ = mean |W| over the non-zero codes, alternated to a
//! fixed point, starting from the absmean. An exactly ternary W comes back unchanged.

use crate::engine::ternary::{TernaryMatrix, MIN_SCALE};

/// Iterations of the alternating quantizer; it converges in a handful on real weights.
const LLOYD_ITERS: usize = 20;

/// The symmetric 3-level quantizer of `w`: codes and γ minimising ‖w − γ·T‖² locally.
pub fn ternary_lloyd(w: &[f32]) -> (Vec<i8>, f32) {
    let n = w.len().max(1) as f64;
    let mut gamma = (w.iter().map(|x| x.abs() as f64).sum::<f64>() / n).max(MIN_SCALE as f64);
    for _ in 0..LLOYD_ITERS {
        let (sum, count) = w
            .iter()
            .filter(|x| x.abs() as f64 > gamma / 2.0)
            .fold((0f64, 0usize), |(s, c), x| (s + x.abs() as f64, c + 1));
        if count == 0 {
            break;
        }
        let next = (sum / count as f64).max(MIN_SCALE as f64);
        if next == gamma {
            break;
        }
        gamma = next;
    }
    let codes = w
        .iter()
        .map(|&x| {
            if (x.abs() as f64) > gamma / 2.0 {
                x.signum() as i8
            } else {
                0
            }
        })
        .collect();
    (codes, gamma as f32)
}

/// Ternarize a row-major `rows × cols` float matrix with [`ternary_lloyd`], one scale per
/// matrix or (`per_channel`) one per output row.
pub fn requantize(w: &[f32], rows: usize, cols: usize, per_channel: bool) -> TernaryMatrix {
    assert_eq!(
        w.len(),
        rows * cols,
        "matrix buffer does not match its shape"
    );
    if per_channel {
        let mut codes = Vec::with_capacity(w.len());
        let mut scales = Vec::with_capacity(rows);
        for row in w.chunks(cols.max(1)) {
            let (c, g) = ternary_lloyd(row);
            codes.extend(c);
            scales.push(g);
        }
        TernaryMatrix::from_values(&codes, rows, cols, scales)
    } else {
        let (codes, g) = ternary_lloyd(w);
        TernaryMatrix::from_values(&codes, rows, cols, vec![g])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exactly_ternary_weights_come_back_unchanged() {
        // Absmean would give γ·(share of non-zeros) = 0.3·0.6 here.
        let t: Vec<i8> = (0..50).map(|i| [1, 0, -1, 1, 0][i % 5]).collect();
        let w: Vec<f32> = t.iter().map(|&v| 0.3 * v as f32).collect();
        let (codes, g) = ternary_lloyd(&w);
        assert_eq!(codes, t);
        assert!((g - 0.3).abs() < 1e-7, "{g}");
    }

    #[test]
    fn per_channel_recovers_row_scales() {
        let t: Vec<i8> = (0..24).map(|i| [1, -1, 0][i % 3]).collect();
        let scales = [0.5f32, 2.0, 0.1, 1.0];
        let w: Vec<f32> = t
            .iter()
            .enumerate()
            .map(|(i, &v)| scales[i / 6] * v as f32)
            .collect();
        let m = requantize(&w, 4, 6, true);
        assert_eq!(m.values(), t);
        for (a, b) in m.scales.iter().zip(scales) {
            assert!((a - b).abs() < 1e-6);
        }
    }

    #[test]
    fn a_small_perturbation_keeps_the_codes_and_fits_the_scale() {
        // W' = 0.2·T + δ with |δ| ≤ 0.02: codes unchanged, γ = mean |W'| over the non-zeros,
        // which is the least-squares scale for those codes.
        let t: Vec<i8> = (0..300).map(|i| [1, 0, -1, -1, 1, 0, 1][i % 7]).collect();
        let w: Vec<f32> = t
            .iter()
            .enumerate()
            .map(|(i, &v)| 0.2 * v as f32 + 0.02 * (((i * 37) % 17) as f32 / 8.0 - 1.0))
            .collect();
        let (codes, g) = ternary_lloyd(&w);
        assert_eq!(codes, t);
        let ls: f64 = w
            .iter()
            .zip(&t)
            .filter(|(_, &c)| c != 0)
            .map(|(&x, &c)| x as f64 * c as f64)
            .sum::<f64>()
            / t.iter().filter(|&&c| c != 0).count() as f64;
        assert!((g as f64 - ls).abs() < 1e-6, "{g} vs {ls}");
    }
}
