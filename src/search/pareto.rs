//! Pareto dominance, non-dominated sorting, crowding distance, and picking one point of a front.
//!
//! All objectives are minimised throughout (accuracy enters as `1 − accuracy`).

/// `true` when `a` Pareto-dominates `b`: no worse in every objective, better in at least one.
///
/// Equal vectors do not dominate each other. Both slices must have the same length.
pub fn dominates(a: &[f64], b: &[f64]) -> bool {
    debug_assert_eq!(a.len(), b.len());
    let mut strictly_better = false;
    for (x, y) in a.iter().zip(b) {
        if x > y {
            return false;
        }
        if x < y {
            strictly_better = true;
        }
    }
    strictly_better
}

/// Fast non-dominated sort (Deb et al. 2002, O(M·N²)): partitions point indices into fronts.
///
/// Front 0 holds the points no other point dominates, front 1 those dominated only by front 0,
/// and so on. Indices within a front are ascending; identical points share a front.
pub fn fast_non_dominated_sort(points: &[Vec<f64>]) -> Vec<Vec<usize>> {
    let n = points.len();
    // dominated_by_me[p]: the points p dominates; domination_count[p]: how many dominate p.
    let mut dominated_by_me: Vec<Vec<usize>> = vec![Vec::new(); n];
    let mut domination_count = vec![0usize; n];
    for p in 0..n {
        for q in (p + 1)..n {
            if dominates(&points[p], &points[q]) {
                dominated_by_me[p].push(q);
                domination_count[q] += 1;
            } else if dominates(&points[q], &points[p]) {
                dominated_by_me[q].push(p);
                domination_count[p] += 1;
            }
        }
    }
    let mut fronts = Vec::new();
    let mut current: Vec<usize> = (0..n).filter(|&p| domination_count[p] == 0).collect();
    while !current.is_empty() {
        let mut next = Vec::new();
        for &p in &current {
            for &q in &dominated_by_me[p] {
                domination_count[q] -= 1;
                if domination_count[q] == 0 {
                    next.push(q);
                }
            }
        }
        next.sort_unstable();
        fronts.push(current);
        current = next;
    }
    fronts
}

/// Crowding distance of each point of one front (Deb et al. 2002), in the order given.
///
/// For each objective the points are sorted; the two extremes get `+inf` and every other point
/// adds the gap between its two neighbours divided by the objective's range on the front.
/// Objectives with zero or infinite range add nothing to interior points. Fronts of one or two
/// points are all `+inf`. Ties in an objective keep the given order, so the result is
/// deterministic.
pub fn crowding_distance(front: &[Vec<f64>]) -> Vec<f64> {
    let all: Vec<usize> = (0..front.len()).collect();
    crowding_of(front, &all)
}

/// Crowding distance of the points `points[i]` for `i` in `front`, in the order of `front`.
pub(crate) fn crowding_of(points: &[Vec<f64>], front: &[usize]) -> Vec<f64> {
    let n = front.len();
    let mut distance = vec![0.0; n];
    if n <= 2 {
        return vec![f64::INFINITY; n];
    }
    let objectives = points[front[0]].len();
    let mut order: Vec<usize> = (0..n).collect();
    // One column of objective values per objective, indexed like `front`.
    let columns: Vec<Vec<f64>> = (0..objectives)
        .map(|m| front.iter().map(|&i| points[i][m]).collect())
        .collect();
    for value in &columns {
        order.sort_by(|&a, &b| value[a].total_cmp(&value[b]));
        let (first, last) = (order[0], order[n - 1]);
        distance[first] = f64::INFINITY;
        distance[last] = f64::INFINITY;
        let range = value[last] - value[first];
        if !(range > 0.0 && range.is_finite()) {
            continue;
        }
        for w in order.windows(3) {
            distance[w[1]] += (value[w[2]] - value[w[0]]) / range;
        }
    }
    distance
}

/// Knee of a front: the point farthest on the ideal side of the hyperplane through the
/// normalised extreme points. Returns its index, `None` for an empty front.
///
/// Each objective is first normalised to `[0, 1]` by its minimum and maximum over the front
/// (objectives with zero range become 0). The extreme point of objective `j` is the one
/// minimising the achievement scalarising function `max_k f_k / w_k` with `w = e_j` (other
/// weights 1e-6), as in NSGA-III's normalisation; on a two-objective front these are exactly
/// `(1, 0)` and `(0, 1)`. The knee maximises the signed distance to the hyperplane through those
/// extremes, positive towards the ideal point (Das 1999; Zhang, Tian & Jin 2015) — the point
/// where improving one objective starts to cost most in the others. When the extremes do not
/// span a hyperplane with positive intercepts (degenerate fronts) the hyperplane `Σ f_j = 1`
/// through the unit points is used instead. Ties go to the lowest index.
pub fn knee_point(front: &[Vec<f64>]) -> Option<usize> {
    let first = front.first()?;
    let m = first.len();
    let mut lo = vec![f64::INFINITY; m];
    let mut hi = vec![f64::NEG_INFINITY; m];
    for p in front {
        for j in 0..m {
            lo[j] = lo[j].min(p[j]);
            hi[j] = hi[j].max(p[j]);
        }
    }
    let normalised: Vec<Vec<f64>> = front
        .iter()
        .map(|p| {
            (0..m)
                .map(|j| {
                    let range = hi[j] - lo[j];
                    if range > 0.0 && range.is_finite() {
                        (p[j] - lo[j]) / range
                    } else {
                        0.0
                    }
                })
                .collect()
        })
        .collect();

    let extremes: Vec<&Vec<f64>> = (0..m)
        .map(|j| {
            let asf = |p: &Vec<f64>| {
                (0..m)
                    .map(|k| p[k] / if k == j { 1.0 } else { 1e-6 })
                    .fold(f64::NEG_INFINITY, f64::max)
            };
            let mut best = &normalised[0];
            for p in &normalised[1..] {
                if asf(p) < asf(best) {
                    best = p;
                }
            }
            best
        })
        .collect();
    // Hyperplane w·f = 1 through the extremes; w_j = 1/intercept_j must be positive.
    let normal = solve(extremes.iter().map(|e| e.to_vec()).collect(), vec![1.0; m])
        .filter(|w| w.iter().all(|&x| x > 0.0 && x.is_finite()))
        .unwrap_or_else(|| vec![1.0; m]);
    let norm = normal.iter().map(|w| w * w).sum::<f64>().sqrt();

    let mut best = 0;
    let mut best_distance = f64::NEG_INFINITY;
    for (i, p) in normalised.iter().enumerate() {
        let dot: f64 = normal.iter().zip(p).map(|(w, x)| w * x).sum();
        let distance = (1.0 - dot) / norm;
        if distance > best_distance {
            best = i;
            best_distance = distance;
        }
    }
    Some(best)
}

/// Solves `a x = b` by Gaussian elimination with partial pivoting; `None` when singular.
fn solve(mut a: Vec<Vec<f64>>, mut b: Vec<f64>) -> Option<Vec<f64>> {
    let n = b.len();
    for col in 0..n {
        let pivot = (col..n).max_by(|&r, &s| a[r][col].abs().total_cmp(&a[s][col].abs()))?;
        if a[pivot][col].abs() < 1e-12 {
            return None;
        }
        a.swap(col, pivot);
        b.swap(col, pivot);
        let (pivot_row, pivot_b) = (a[col].clone(), b[col]);
        for (row, rhs) in a[col + 1..].iter_mut().zip(&mut b[col + 1..]) {
            let factor = row[col] / pivot_row[col];
            for (x, p) in row[col..].iter_mut().zip(&pivot_row[col..]) {
                *x -= factor * p;
            }
            *rhs -= factor * pivot_b;
        }
    }
    let mut x = vec![0.0; n];
    for row in (0..n).rev() {
        let tail: f64 = ((row + 1)..n).map(|k| a[row][k] * x[k]).sum();
        x[row] = (b[row] - tail) / a[row][row];
    }
    Some(x)
}

/// A budget on one objective for [`best_within`]: keep points with `objectives[objective] <= max`.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Budget {
    /// Index of the budgeted objective (e.g. latency per token or memory).
    pub objective: usize,
    /// Largest allowed value of that objective, inclusive.
    pub max: f64,
}

/// The point with the lowest `front[i][objective]` among those meeting every budget.
///
/// Typical use: `objective` is `1 − accuracy` and the budgets bound latency and memory
/// (docs/DESIGN.md §4). Ties on `objective` go to the point that is lexicographically smaller on the
/// remaining objectives, then to the lowest index. Returns `None` when no point meets the budgets.
///
/// # Panics
/// If `objective` or a budget's objective index is not below the points' objective count
/// (check user-named objectives before calling).
pub fn best_within(front: &[Vec<f64>], objective: usize, budgets: &[Budget]) -> Option<usize> {
    for p in front {
        assert!(
            objective < p.len() && budgets.iter().all(|b| b.objective < p.len()),
            "best_within: objective index out of range for a point with {} objectives",
            p.len()
        );
    }
    let others = |p: &[f64]| -> Vec<f64> {
        p.iter()
            .enumerate()
            .filter(|&(k, _)| k != objective)
            .map(|(_, &x)| x)
            .collect()
    };
    front
        .iter()
        .enumerate()
        .filter(|(_, p)| budgets.iter().all(|b| p[b.objective] <= b.max))
        // `min_by` keeps the first of equal minima: the lowest index.
        .min_by(|(_, p), (_, q)| {
            p[objective].total_cmp(&q[objective]).then_with(|| {
                others(p)
                    .iter()
                    .zip(&others(q))
                    .map(|(a, b)| a.total_cmp(b))
                    .find(|o| o.is_ne())
                    .unwrap_or(std::cmp::Ordering::Equal)
            })
        })
        .map(|(i, _)| i)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pts(v: &[&[f64]]) -> Vec<Vec<f64>> {
        v.iter().map(|p| p.to_vec()).collect()
    }

    #[test]
    fn dominance_by_hand() {
        assert!(dominates(&[1.0, 2.0], &[1.0, 3.0]));
        assert!(dominates(&[0.0, 0.0], &[1.0, 1.0]));
        assert!(!dominates(&[1.0, 2.0], &[1.0, 2.0]));
        assert!(!dominates(&[1.0, 3.0], &[2.0, 1.0]));
        assert!(!dominates(&[2.0, 1.0], &[1.0, 3.0]));
    }

    #[test]
    fn non_dominated_sort_by_hand() {
        // Staircases: (1,4),(2,2),(4,1) non-dominated; (2,4),(3,3),(5,2) behind them;
        // (4,4) behind (3,3); (2,2) duplicated shares front 0.
        let points = pts(&[
            &[4.0, 4.0], // 0: dominated by 5 (3,3) → front 2
            &[1.0, 4.0], // 1: front 0
            &[2.0, 4.0], // 2: dominated by 1 and 3 → front 1
            &[2.0, 2.0], // 3: front 0
            &[5.0, 2.0], // 4: dominated by 3 and 6 → front 1
            &[3.0, 3.0], // 5: dominated by 3 → front 1
            &[4.0, 1.0], // 6: front 0
            &[2.0, 2.0], // 7: duplicate of 3 → front 0
        ]);
        let fronts = fast_non_dominated_sort(&points);
        assert_eq!(fronts, vec![vec![1, 3, 6, 7], vec![2, 4, 5], vec![0]]);
        assert!(fast_non_dominated_sort(&[]).is_empty());
    }

    #[test]
    fn non_dominated_sort_three_objectives() {
        let points = pts(&[
            &[1.0, 1.0, 1.0], // 0: dominates 1 and 2, not 3
            &[2.0, 2.0, 2.0], // 1: dominated by 0 and 2 → front 2
            &[1.0, 2.0, 2.0], // 2: dominated by 0 only → front 1
            &[0.0, 5.0, 5.0], // 3: best f0 → front 0
        ]);
        assert_eq!(
            fast_non_dominated_sort(&points),
            vec![vec![0, 3], vec![2], vec![1]]
        );
    }

    #[test]
    fn crowding_distance_by_hand() {
        // Front (0,4),(1,2),(2,1),(4,0): ranges 4 and 4.
        // Point (1,2): f0 neighbours 0 and 2 → 2/4; f1 neighbours 4 and 1 → 3/4; total 1.25.
        // Point (2,1): f0 neighbours 1 and 4 → 3/4; f1 neighbours 2 and 0 → 2/4; total 1.25.
        let front = pts(&[&[1.0, 2.0], &[0.0, 4.0], &[4.0, 0.0], &[2.0, 1.0]]);
        let d = crowding_distance(&front);
        assert_eq!(d[1], f64::INFINITY);
        assert_eq!(d[2], f64::INFINITY);
        assert!((d[0] - 1.25).abs() < 1e-12);
        assert!((d[3] - 1.25).abs() < 1e-12);
        // Unequal spacing: (0,3),(1,2),(3,1),(4,0) — inner points get (3-0)/4 + (3-1)/3 for
        // (1,2) and (4-1)/4 + (2-0)/3 for (3,1).
        let front = pts(&[&[0.0, 3.0], &[1.0, 2.0], &[3.0, 1.0], &[4.0, 0.0]]);
        let d = crowding_distance(&front);
        assert!((d[1] - (0.75 + 2.0 / 3.0)).abs() < 1e-12);
        assert!((d[2] - (0.75 + 2.0 / 3.0)).abs() < 1e-12);
        // Tiny fronts are all boundary; constant objectives add nothing to interior points.
        assert_eq!(crowding_distance(&pts(&[&[1.0, 1.0]])), vec![f64::INFINITY]);
        let flat = pts(&[&[0.0, 5.0], &[1.0, 5.0], &[3.0, 5.0]]);
        let d = crowding_distance(&flat);
        assert!((d[1] - 1.0).abs() < 1e-12);
    }

    #[test]
    fn knee_of_two_objective_fronts() {
        // Normalised already: signed distance ∝ 1 - f0 - f1 → 0, .5, .3, 0.
        let front = pts(&[&[0.0, 1.0], &[0.2, 0.3], &[0.5, 0.2], &[1.0, 0.0]]);
        assert_eq!(knee_point(&front), Some(1));
        // Same shape with objectives on different scales (f0 ×4, f1 ×10): normalised to
        // (0,1),(.25,.2),(.5,.1),(1,0) → 1 - sum = 0, .55, .4, 0.
        let front = pts(&[&[0.0, 10.0], &[1.0, 2.0], &[2.0, 1.0], &[4.0, 0.0]]);
        assert_eq!(knee_point(&front), Some(1));
        assert_eq!(knee_point(&[]), None);
        assert_eq!(knee_point(&pts(&[&[3.0, 3.0]])), Some(0));
    }

    #[test]
    fn knee_of_three_objective_front() {
        // Extremes at the unit points → hyperplane Σf = 1; (0.2,0.2,0.2) bulges farthest.
        let front = pts(&[
            &[1.0, 0.0, 0.0],
            &[0.0, 1.0, 0.0],
            &[0.0, 0.0, 1.0],
            &[0.5, 0.5, 0.0],
            &[0.1, 0.3, 0.3],
            &[0.2, 0.2, 0.2],
        ]);
        assert_eq!(knee_point(&front), Some(5));
    }

    #[test]
    fn knee_uses_hyperplane_through_extremes() {
        // Extremes (by ASF) are (1,0,.5), (0,1,0), (0,0,1): the plane through them is
        // 0.5 f0 + f1 + f2 = 1, not Σf = 1. Signed distances ∝ 1 - w·f:
        // P = (0.9, 0.52, 0):  1 - (0.45 + 0.52) = 0.03  (under Σf = 1: -0.42)
        // Q = (0, 0.55, 0.5):  1 - 1.05 = -0.05         (under Σf = 1: -0.05)
        // extremes: 0 (under Σf = 1 the extreme (0,1,0) would win with 0).
        let front = pts(&[
            &[1.0, 0.0, 0.5],
            &[0.0, 1.0, 0.0],
            &[0.0, 0.0, 1.0],
            &[0.9, 0.52, 0.0],
            &[0.0, 0.55, 0.5],
        ]);
        assert_eq!(knee_point(&front), Some(3));
    }

    #[test]
    fn best_within_budgets() {
        // Objectives: (1 - accuracy, latency ms, memory MiB).
        let front = pts(&[
            &[0.10, 30.0, 900.0],
            &[0.20, 10.0, 500.0],
            &[0.15, 20.0, 700.0],
            &[0.15, 20.0, 600.0],
            &[0.40, 5.0, 300.0],
        ]);
        assert_eq!(best_within(&front, 0, &[]), Some(0));
        let latency = Budget {
            objective: 1,
            max: 20.0,
        };
        // Points 2 and 3 tie on accuracy; 3 is lower on memory.
        assert_eq!(best_within(&front, 0, &[latency]), Some(3));
        let memory = Budget {
            objective: 2,
            max: 550.0,
        };
        assert_eq!(best_within(&front, 0, &[latency, memory]), Some(1));
        let impossible = Budget {
            objective: 1,
            max: 1.0,
        };
        assert_eq!(best_within(&front, 0, &[impossible]), None);
    }
}
