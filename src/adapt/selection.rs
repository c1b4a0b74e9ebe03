//! What is handed off: the search optimises on its validation items, so its most accurate
//! point is flattered by them (the winner's curse). The final choice is made on a separate
//! selection split: the best front candidates and the bare base are re-scored there, item by
//! item, and a mixture is handed off only if its gain over the base exceeds `z` standard errors
//! of the paired difference — otherwise the handoff keeps the base (with the experts and the
//! dispatch), never a worse model.

use crate::adapt::mixture_search::{Point, Problem};
use crate::error::Result;
use crate::eval::{exact_matches, share};
use crate::tasks::Item;
use serde::{Deserialize, Serialize};

/// One candidate re-scored on the selection split.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Candidate {
    /// The front point, as the search measured it (on its validation items).
    pub point: Point,
    /// Greedy exact-match accuracy on the selection split.
    pub accuracy: f64,
    /// `accuracy` − the base's, on the same items.
    pub gain: f64,
    /// Standard error of `gain`: of the mean of the paired per-item differences.
    pub se: f64,
}

/// The choice made on the selection split.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Selection {
    /// Selection items (disjoint from the search's validation items).
    pub n: usize,
    /// The base's accuracy on them.
    pub base_accuracy: f64,
    /// The candidates, in the order they were offered (most accurate on validation first).
    pub candidates: Vec<Candidate>,
    /// The index of the most accurate candidate on the selection split.
    pub best: Option<usize>,
    /// Standard errors the gain must exceed.
    pub z: f64,
    /// Whether `best` is handed off as the adapted model.
    pub handed_off: bool,
    /// Why, in words.
    pub rule: String,
}

impl Selection {
    /// The handed-off mixture, if any.
    pub fn chosen(&self) -> Option<&Point> {
        let i = self.best.filter(|_| self.handed_off)?;
        Some(&self.candidates[i].point)
    }
}

/// The mean of the paired differences `cand_i − base_i` (each 0 or 1) and its standard error
/// (sample standard deviation over √n; 0 for fewer than two items).
pub fn paired_gain(cand: &[bool], base: &[bool]) -> (f64, f64) {
    let n = cand.len().min(base.len());
    if n == 0 {
        return (0.0, 0.0);
    }
    let d: Vec<f64> = (cand.iter().zip(base))
        .map(|(&c, &b)| f64::from(u8::from(c)) - f64::from(u8::from(b)))
        .collect();
    let mean = d.iter().sum::<f64>() / n as f64;
    if n < 2 {
        return (mean, 0.0);
    }
    let var = d.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1) as f64;
    (mean, (var / n as f64).sqrt())
}

/// Whether a gain stands out of its noise: positive and more than `z` standard errors.
pub fn beats_noise(gain: f64, se: f64, z: f64) -> bool {
    gain > 0.0 && gain > z * se
}

/// The front points offered to the selection: those within the budgets (or, when none is,
/// the search's own pick), rank > 0, most accurate on validation first (ties: lower KL),
/// distinct, at most `max`.
pub fn candidates(front_within: &[Point], fallback: &Point, max: usize) -> Vec<Point> {
    let mut pts: Vec<Point> = front_within
        .iter()
        .filter(|p| p.rank > 0)
        .cloned()
        .collect();
    if pts.is_empty() && fallback.rank > 0 {
        pts.push(fallback.clone());
    }
    pts.sort_by(|a, b| {
        b.accuracy
            .total_cmp(&a.accuracy)
            .then(a.kl.total_cmp(&b.kl))
    });
    pts.dedup_by(|a, b| a.alpha == b.alpha && a.rank == b.rank);
    pts.truncate(max);
    pts
}

/// Per-item exact matches of each offered point and of the base on `items`, and the choice:
/// the most accurate candidate (ties: the earlier, i.e. better on validation), handed off
/// only if it [`beats_noise`] against the base.
pub fn select(
    problem: &mut Problem,
    offered: Vec<Point>,
    items: &[Item],
    z: f64,
    within_noise: bool,
) -> Result<Selection> {
    let tok = problem.tok();
    let k = offered.first().map_or(0, |p| p.alpha.len());
    // The base, then every candidate, each scored by the rank it falls to (under MPI).
    let forms: Vec<(Vec<f64>, usize)> = std::iter::once((vec![0.0; k], 0))
        .chain(offered.iter().map(|p| (p.alpha.clone(), p.rank)))
        .collect();
    let comm = problem.comm();
    let mut matches = crate::dist::map(comm, "the selection", forms.len(), |i| {
        let (alpha, rank) = &forms[i];
        exact_matches(problem.deployer.deploy(alpha, *rank)?.0, tok, items)
    })?
    .into_iter();
    let base = matches.next().expect("the base is scored first");
    let mut scored = Vec::with_capacity(offered.len());
    for (point, c) in offered.into_iter().zip(matches) {
        let (gain, se) = paired_gain(&c, &base);
        scored.push(Candidate {
            accuracy: share(&c),
            point,
            gain,
            se,
        });
    }
    Ok(decide(base.len(), share(&base), scored, z, within_noise))
}

/// The selection rule on scored candidates; `within_noise` hands the best off even when its
/// gain is within noise.
pub fn decide(
    n: usize,
    base_accuracy: f64,
    candidates: Vec<Candidate>,
    z: f64,
    within_noise: bool,
) -> Selection {
    let best = (0..candidates.len()).fold(None, |best: Option<usize>, i| match best {
        Some(b) if candidates[b].accuracy >= candidates[i].accuracy => Some(b),
        _ => Some(i),
    });
    let (handed_off, rule) = match best.map(|i| &candidates[i]) {
        None => (
            false,
            "no front point with singular directions to offer: the base is handed off".to_string(),
        ),
        Some(c) if beats_noise(c.gain, c.se, z) => (
            true,
            format!(
                "the most accurate of {} front candidates on {n} selection items gains {:+.1} ± \
                 {:.1} points over the base (> {z} standard errors): handed off",
                candidates.len(),
                100.0 * c.gain,
                100.0 * c.se
            ),
        ),
        Some(c) => (
            within_noise,
            format!(
                "the most accurate of {} front candidates on {n} selection items gains {:+.1} ± \
                 {:.1} points over the base, within {z} standard errors of no gain{}",
                candidates.len(),
                100.0 * c.gain,
                100.0 * c.se,
                if within_noise {
                    "; handed off all the same, as the settings ask (search.hand_off_within_noise)"
                } else {
                    ", so the base is handed off (with the experts and the dispatch)"
                }
            ),
        ),
    };
    Selection {
        n,
        base_accuracy,
        candidates,
        best,
        z,
        handed_off,
        rule,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::adapt::mixture_search::TokenWork;

    fn point(acc: f64, kl: f64, rank: usize, a: f64) -> Point {
        Point {
            alpha: vec![a],
            rank,
            accuracy: acc,
            kl,
            model_ms: 1.0,
            work: TokenWork::default(),
            ms_per_token: 1.0,
            bytes: 1,
        }
    }

    fn scored(acc: f64, cand: &[bool], base: &[bool]) -> Candidate {
        let (gain, se) = paired_gain(cand, base);
        Candidate {
            point: point(acc, 0.0, 16, acc),
            accuracy: cand.iter().filter(|&&x| x).count() as f64 / cand.len() as f64,
            gain,
            se,
        }
    }

    #[test]
    fn paired_gain_is_the_mean_difference_and_its_standard_error() {
        // d = (1, 0, 0, -1, 1): mean 0.2, sample variance 0.7, se √(0.7/5).
        let c = [true, true, false, false, true];
        let b = [false, true, false, true, false];
        let (g, se) = paired_gain(&c, &b);
        assert!((g - 0.2).abs() < 1e-12);
        assert!((se - (0.7f64 / 5.0).sqrt()).abs() < 1e-12);
        assert_eq!(paired_gain(&[], &[]), (0.0, 0.0));
        assert_eq!(paired_gain(&[true; 4], &[true; 4]), (0.0, 0.0));
    }

    /// A mixture that beats the base only within noise is refused; one that clearly beats it
    /// is handed off; the most accurate candidate on the selection split is the one judged.
    #[test]
    fn the_rule_refuses_a_gain_within_noise() {
        // 200 items; the candidate fixes 12 and breaks 8: +2 points, se ≈ 1.4 points.
        let base: Vec<bool> = (0..200).map(|i| i % 2 == 0).collect();
        let mut noisy = base.clone();
        for i in 0..12 {
            noisy[2 * i + 1] = true;
        }
        for i in 0..8 {
            noisy[2 * (50 + i)] = false;
        }
        let noisy = scored(0.9, &noisy, &base);
        assert!((noisy.gain - 0.02).abs() < 1e-12, "{noisy:?}");
        let s = decide(200, 0.5, vec![noisy.clone()], 2.0, false);
        assert!(!s.handed_off && s.chosen().is_none(), "{}", s.rule);
        assert!(s.rule.contains("the base is handed off"), "{}", s.rule);
        // The same +2 points from 4 items fixed and none broken is out of the noise.
        let mut clean = base.clone();
        for i in 0..4 {
            clean[2 * i + 1] = true;
        }
        let clean = scored(0.8, &clean, &base);
        assert!(
            (clean.gain - 0.02).abs() < 1e-12 && clean.se < 0.01,
            "{clean:?}"
        );
        let s = decide(200, 0.5, vec![clean.clone()], 2.0, false);
        assert!(s.handed_off, "{}", s.rule);
        assert_eq!(s.chosen(), Some(&clean.point));
        // Unless the settings hand it off all the same (the quick run).
        let s = decide(200, 0.5, vec![noisy.clone()], 2.0, true);
        assert!(
            s.handed_off && s.rule.contains("hand_off_within_noise"),
            "{}",
            s.rule
        );
        // The most accurate candidate on the selection split is the one judged.
        let mut better = base.clone();
        for i in 0..30 {
            better[2 * i + 1] = true;
        }
        let better = scored(0.7, &better, &base);
        let s = decide(200, 0.5, vec![noisy, clean, better.clone()], 2.0, false);
        assert_eq!((s.best, s.chosen()), (Some(2), Some(&better.point)));
        // A candidate below the base is never handed off, whatever z.
        let worse = scored(0.9, &base.iter().map(|_| false).collect::<Vec<_>>(), &base);
        assert!(!decide(200, 0.5, vec![worse], 0.0, false).handed_off);
        // Nothing to offer: the base.
        assert!(!decide(200, 0.5, vec![], 2.0, false).handed_off);
    }

    #[test]
    fn candidates_are_within_budget_ranked_distinct_and_capped() {
        let front = vec![
            point(0.6, 0.1, 16, 1.0),
            point(0.7, 0.3, 32, 2.0),
            point(0.7, 0.2, 64, 3.0),
            point(0.7, 0.2, 64, 3.0),
            point(0.9, 0.0, 0, 0.0),
        ];
        let c = candidates(&front, &front[0], 2);
        assert_eq!(c.iter().map(|p| p.rank).collect::<Vec<_>>(), vec![64, 32]);
        let c = candidates(&front, &front[0], 10);
        assert_eq!(c.len(), 3);
        // No point within the budgets: the search's pick, unless it is the base.
        assert_eq!(candidates(&[], &front[1], 4), vec![front[1].clone()]);
        assert!(candidates(&[], &front[4], 4).is_empty());
    }
}
