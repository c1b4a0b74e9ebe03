//! Exact hypervolume indicator of a set of objective vectors (all objectives minimised).

/// Volume of the region dominated by `front` and bounded above by `reference`.
///
/// All objectives are minimised. Only points that strictly dominate the reference (every
/// coordinate `< reference`) contribute; others — including NaN coordinates — add nothing.
/// Dominated or duplicate points may be passed: the volume of a set equals the volume of its
/// non-dominated subset.
///
/// Exact for any number of objectives: two objectives are a sort and a sweep (O(n log n));
/// more objectives slice along the last objective and recurse (HSO, O(n^(d-1) log n)), which is
/// instant for the fronts of this project (≤ 100 points, ≤ 4 objectives) but grows fast beyond.
///
/// # Panics
/// If `reference` is empty or a point's length differs from `reference.len()` (a caller bug:
/// [`crate::search::nsga2`] validates objective counts before calling this).
pub fn hypervolume(front: &[Vec<f64>], reference: &[f64]) -> f64 {
    let d = reference.len();
    assert!(d > 0, "hypervolume: reference point has no objectives");
    for (i, p) in front.iter().enumerate() {
        assert_eq!(
            p.len(),
            d,
            "hypervolume: point {i} has {} objectives, reference has {d}",
            p.len()
        );
    }
    let points: Vec<&[f64]> = front
        .iter()
        .map(Vec::as_slice)
        .filter(|p| p.iter().zip(reference).all(|(x, r)| x < r))
        .collect();
    volume(points, reference, d)
}

/// Hypervolume of `points` in their first `d` coordinates; every point is `< reference`.
fn volume(mut points: Vec<&[f64]>, reference: &[f64], d: usize) -> f64 {
    if points.is_empty() {
        return 0.0;
    }
    match d {
        1 => {
            let best = points.iter().map(|p| p[0]).fold(f64::INFINITY, f64::min);
            reference[0] - best
        }
        2 => {
            // Ascending f0 (then f1): each point that lowers the running f1 minimum adds the
            // strip between its f1 and the previous minimum, reaching from its f0 to the
            // reference.
            points.sort_by(|a, b| a[0].total_cmp(&b[0]).then(a[1].total_cmp(&b[1])));
            let mut area = 0.0;
            let mut lowest_f1 = reference[1];
            for p in points {
                if p[1] < lowest_f1 {
                    area += (reference[0] - p[0]) * (lowest_f1 - p[1]);
                    lowest_f1 = p[1];
                }
            }
            area
        }
        _ => {
            // Slice along the last objective: between consecutive values z_i < z_{i+1} the
            // cross-section is the (d-1)-volume of the points with last objective <= z_i.
            let last = d - 1;
            points.sort_by(|a, b| a[last].total_cmp(&b[last]));
            let mut total = 0.0;
            for i in 0..points.len() {
                let upper = points.get(i + 1).map_or(reference[last], |p| p[last]);
                let thickness = upper - points[i][last];
                if thickness > 0.0 {
                    total += thickness * volume(points[..=i].to_vec(), reference, last);
                }
            }
            total
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TOL: f64 = 1e-12;

    #[test]
    fn one_point_is_a_box() {
        assert!((hypervolume(&[vec![1.0, 2.0]], &[3.0, 5.0]) - 6.0).abs() < TOL);
        assert!((hypervolume(&[vec![1.0, 2.0, 3.0]], &[2.0, 4.0, 6.0]) - 6.0).abs() < TOL);
        assert!((hypervolume(&[vec![0.25]], &[1.0]) - 0.75).abs() < TOL);
    }

    #[test]
    fn two_d_union_by_hand() {
        // Boxes [1,4]x[3,4] (area 3) and [2,4]x[1,4] (area 6) overlap in [2,4]x[3,4] (area 2).
        let front = vec![vec![1.0, 3.0], vec![2.0, 1.0]];
        assert!((hypervolume(&front, &[4.0, 4.0]) - 7.0).abs() < TOL);
        // A staircase against (4, 4), by columns: x in [1,2) has height 4-3 = 1, [2,3) has
        // 4-2 = 2, [3,4) has 4-1 = 3 → 6.
        let stairs = vec![vec![1.0, 3.0], vec![2.0, 2.0], vec![3.0, 1.0]];
        assert!((hypervolume(&stairs, &[4.0, 4.0]) - 6.0).abs() < TOL);
    }

    #[test]
    fn dominated_duplicate_and_outside_points_add_nothing() {
        let base = vec![vec![1.0, 3.0], vec![2.0, 1.0]];
        let mut noisy = base.clone();
        noisy.push(vec![3.0, 3.5]); // dominated by (2, 1)
        noisy.push(vec![1.0, 3.0]); // duplicate
        noisy.push(vec![0.0, 4.0]); // on the reference boundary: contributes 0
        noisy.push(vec![5.0, 0.0]); // beyond the reference in f0
        noisy.push(vec![f64::NAN, 0.0]);
        assert!((hypervolume(&noisy, &[4.0, 4.0]) - 7.0).abs() < TOL);
        assert_eq!(hypervolume(&[], &[1.0, 1.0]), 0.0);
        assert_eq!(hypervolume(&[vec![2.0, 0.0]], &[1.0, 1.0]), 0.0);
    }

    #[test]
    fn three_d_by_inclusion_exclusion() {
        // Boxes up to (1,1,1), by inclusion–exclusion:
        // A = (0, .5, .5): 1 * .5 * .5 = .25
        // B = (.5, 0, .5): .5 * 1 * .5 = .25
        // C = (.5, .5, 0): .5 * .5 * 1 = .25
        // Pairwise intersections are boxes from the coordinate-wise max:
        // A∩B = (.5,.5,.5): .125, A∩C = .125, B∩C = .125; A∩B∩C = (.5,.5,.5): .125.
        // Union = .75 - .375 + .125 = .5
        let front = vec![
            vec![0.0, 0.5, 0.5],
            vec![0.5, 0.0, 0.5],
            vec![0.5, 0.5, 0.0],
        ];
        assert!((hypervolume(&front, &[1.0, 1.0, 1.0]) - 0.5).abs() < TOL);
        // Two nested-in-one-axis boxes: (1,1,2) and (2,2,1) to (3,3,3):
        // 2*2*1 + 1*1*2 - overlap (2,2,2)→1*1*1 = 4 + 2 - 1 = 5.
        let front = vec![vec![1.0, 1.0, 2.0], vec![2.0, 2.0, 1.0]];
        assert!((hypervolume(&front, &[3.0, 3.0, 3.0]) - 5.0).abs() < TOL);
    }

    #[test]
    fn four_d_matches_lattice_cell_count() {
        // Exact check on a lattice: with integer points and reference, the hypervolume equals
        // the number of unit cells [c, c+1)^4 whose lower corner is dominated by some point.
        let front = vec![
            vec![0.0, 2.0, 1.0, 3.0],
            vec![1.0, 0.0, 3.0, 2.0],
            vec![2.0, 1.0, 0.0, 1.0],
            vec![3.0, 3.0, 2.0, 0.0],
            vec![1.0, 1.0, 1.0, 1.0],
        ];
        let reference = [4.0; 4];
        let mut cells = 0usize;
        for a in 0..4 {
            for b in 0..4 {
                for c in 0..4 {
                    for e in 0..4 {
                        let cell = [a as f64, b as f64, c as f64, e as f64];
                        if front
                            .iter()
                            .any(|p| p.iter().zip(&cell).all(|(x, y)| x <= y))
                        {
                            cells += 1;
                        }
                    }
                }
            }
        }
        assert!((hypervolume(&front, &reference) - cells as f64).abs() < TOL);
        // The same count in 3-D (drop the last objective) cross-checks the recursion base.
        let front3: Vec<Vec<f64>> = front.iter().map(|p| p[..3].to_vec()).collect();
        let mut cells3 = 0usize;
        for a in 0..4 {
            for b in 0..4 {
                for c in 0..4 {
                    let cell = [a as f64, b as f64, c as f64];
                    if front3
                        .iter()
                        .any(|p| p.iter().zip(&cell).all(|(x, y)| x <= y))
                    {
                        cells3 += 1;
                    }
                }
            }
        }
        assert!((hypervolume(&front3, &reference[..3]) - cells3 as f64).abs() < TOL);
    }

    #[test]
    #[should_panic(expected = "point 0 has 3 objectives")]
    fn mismatched_dimensions_panic() {
        hypervolume(&[vec![0.0, 0.0, 0.0]], &[1.0, 1.0]);
    }
}
