//! Stage 1, expert discovery (docs/DESIGN.md §1): which skills deserve an expert, decided from
//! measurements of the base model.
//!
//! Two measurements per domain: the base model's held-out accuracy (the headroom an expert can
//! take) and the direction in z-space an expert would move first — the SFT gradient ∂L/∂z at
//! z = 1 (paper parameterization) on a batch of the domain's training items. Domains whose
//! directions point the same way can share an expert; opposed ones interfere.
//!
//! The rule ([`group`]): domains with headroom (accuracy in [`MIN_ACCURACY`, `MAX_ACCURACY`))
//! are candidates; average-linkage clustering on the cosine similarity of their directions
//! merges the most similar pair while its similarity is at least `threshold` or while there
//! are more than `max_experts` groups, never below `min_experts`. If fewer than `min_experts`
//! candidates exist, the domains closest to the headroom band are added.

use crate::engine::checkpoint::Checkpoint;
use crate::engine::model::{ModelOptions, WeightMode};
use crate::engine::tokenizer::Tokenizer;
use crate::error::{Checks, Result};
use crate::eval::batch::{batch_from_pairs, flat_log_probs, sft_pairs};
use crate::svf::attach::{init_vars, svf_model, var_tensors};
use crate::svf::svd::Svd;
use crate::svf::Parameterization;
use crate::tasks::DataSource;
use crate::train::loss::masked_nll;
use candle_core::DType;
use rand::{rngs::StdRng, SeedableRng};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Below this accuracy a skill is out of SVF's reach on the model (measured: add, sub, mul and
/// program sit at 2–3% and no expert moved them).
pub const MIN_ACCURACY: f64 = 0.05;
/// At or above this accuracy there is too little headroom for an expert.
pub const MAX_ACCURACY: f64 = 0.97;

/// The SFT gradient ∂L/∂z at z = 1 for `n` training items of `data`, concatenated over the
/// factored matrices in name order.
pub fn gradient_direction(
    ck: &Checkpoint,
    factors: &BTreeMap<String, Svd>,
    tok: &dyn Tokenizer,
    data: &DataSource,
    n: usize,
    seed: u64,
) -> Result<Vec<f32>> {
    let options = ModelOptions {
        mode: WeightMode::Dense,
        act_quant: true,
        dtype: DType::F32,
        head: crate::engine::model::HeadFormat::Stored,
        defer_head_copy: false,
    };
    let lengths = factors
        .iter()
        .map(|(name, f)| (name.clone(), f.sigma.len()))
        .collect();
    let vars = init_vars(&lengths, Parameterization::Paper, options, seed)?;
    let z = var_tensors(&vars);
    let model = svf_model(ck, options, factors, &z, Parameterization::Paper)?;
    let items = data.draw(&mut StdRng::seed_from_u64(seed), n)?;
    let batch = batch_from_pairs(&sft_pairs(tok, &items)?, model.device())?;
    let loss = masked_nll(&flat_log_probs(&model, &batch)?, &batch)?;
    let grads = loss.backward()?;
    let mut out = Vec::new();
    for (_, v) in &vars {
        match grads.get(v.as_tensor()) {
            Some(g) => out.extend(g.to_dtype(DType::F32)?.to_vec1::<f32>()?),
            None => out.extend(std::iter::repeat_n(0.0, v.as_tensor().elem_count())),
        }
    }
    Ok(out)
}

/// Cosine similarity of every pair of vectors (0 where a vector is zero).
pub fn cosine_matrix(vs: &[Vec<f32>]) -> Vec<Vec<f64>> {
    let norm = |v: &[f32]| v.iter().map(|&x| (x as f64).powi(2)).sum::<f64>().sqrt();
    let norms: Vec<f64> = vs.iter().map(|v| norm(v)).collect();
    vs.iter()
        .enumerate()
        .map(|(i, a)| {
            vs.iter()
                .enumerate()
                .map(|(j, b)| {
                    let d: f64 = a.iter().zip(b).map(|(&x, &y)| x as f64 * y as f64).sum();
                    let n = norms[i] * norms[j];
                    if n > 0.0 {
                        d / n
                    } else {
                        0.0
                    }
                })
                .collect()
        })
        .collect()
}

/// Settings of [`group`].
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct GroupRule {
    /// Fewest experts.
    pub min_experts: usize,
    /// Most experts.
    pub max_experts: usize,
    /// Merge groups whose average cosine similarity is at least this.
    pub threshold: f64,
}

impl Default for GroupRule {
    fn default() -> Self {
        GroupRule {
            min_experts: 3,
            max_experts: 10,
            threshold: 0.5,
        }
    }
}

impl GroupRule {
    /// 1 ≤ `min_experts` ≤ `max_experts` ≤ [`MAX_EXPERTS`], a threshold in [−1, 1].
    pub fn check(&self, c: &mut Checks) {
        c.count("max_experts", self.max_experts, MAX_EXPERTS);
        c.that(
            (1..=self.max_experts.max(1)).contains(&self.min_experts),
            "min_experts",
            || {
                format!(
                    "got {}; expected between 1 and max_experts = {}",
                    self.min_experts, self.max_experts
                )
            },
        );
        c.number("threshold", self.threshold, -1.0, 1.0);
    }
}

/// Most experts a run may train.
pub const MAX_EXPERTS: usize = 64;

/// The experts discovery settles on.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Grouping {
    /// One entry per expert: the domains it covers.
    pub groups: Vec<Vec<String>>,
    /// Why this many, in words.
    pub reason: String,
}

/// Group domains into experts by the rule of the module docs. `names`, `accuracy` and the
/// rows of `sim` share one order.
pub fn group(names: &[String], accuracy: &[f64], sim: &[Vec<f64>], rule: GroupRule) -> Grouping {
    let headroom = |a: f64| (MIN_ACCURACY..MAX_ACCURACY).contains(&a);
    let mut candidates: Vec<usize> = (0..names.len())
        .filter(|&i| headroom(accuracy[i]))
        .collect();
    let mut added = Vec::new();
    if candidates.len() < rule.min_experts {
        // Closest to the band first: distance outside [MIN, MAX).
        let mut rest: Vec<usize> = (0..names.len())
            .filter(|i| !candidates.contains(i))
            .collect();
        let dist = |a: f64| (MIN_ACCURACY - a).max(a - MAX_ACCURACY).max(0.0);
        rest.sort_by(|&a, &b| dist(accuracy[a]).total_cmp(&dist(accuracy[b])));
        for i in rest.into_iter().take(rule.min_experts - candidates.len()) {
            added.push(names[i].clone());
            candidates.push(i);
        }
    }
    let mut groups: Vec<Vec<usize>> = candidates.iter().map(|&i| vec![i]).collect();
    let linkage = |a: &[usize], b: &[usize]| {
        a.iter()
            .flat_map(|&i| b.iter().map(move |&j| sim[i][j]))
            .sum::<f64>()
            / (a.len() * b.len()) as f64
    };
    let mut merges = Vec::new();
    while groups.len() > rule.min_experts {
        let mut best = (f64::NEG_INFINITY, 0, 0);
        for i in 0..groups.len() {
            for j in i + 1..groups.len() {
                let l = linkage(&groups[i], &groups[j]);
                if l > best.0 {
                    best = (l, i, j);
                }
            }
        }
        if best.0 < rule.threshold && groups.len() <= rule.max_experts {
            break;
        }
        let g = groups.remove(best.2);
        groups[best.1].extend(g);
        merges.push(format!("{:.2}", best.0));
    }
    let named: Vec<Vec<String>> = groups
        .iter()
        .map(|g| g.iter().map(|&i| names[i].clone()).collect())
        .collect();
    let mut reason = format!(
        "{} of {} domains have headroom (base accuracy in [{:.0}%, {:.0}%))",
        candidates.len() - added.len(),
        names.len(),
        100.0 * MIN_ACCURACY,
        100.0 * MAX_ACCURACY
    );
    if !added.is_empty() {
        reason += &format!(
            "; added the closest to that band to reach {}: {}",
            rule.min_experts,
            added.join(", ")
        );
    }
    reason += &if merges.is_empty() {
        format!(
            "; no pair of gradient directions is similar enough to share an expert (cosine < {}), so N = {}",
            rule.threshold,
            named.len()
        )
    } else {
        format!(
            "; merged {} pair(s) by gradient-direction similarity (average cosine {}), so N = {}",
            merges.len(),
            merges.join(", "),
            named.len()
        )
    };
    Grouping {
        groups: named,
        reason,
    }
}

/// Stage 1's report: the capability of the base model per data source, the similarity of
/// their gradient directions and the experts the rule settles on.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Discovery {
    /// Source names (built-in domains, then user datasets).
    pub names: Vec<String>,
    /// Base accuracy per source on its validation split.
    pub accuracy: Vec<f64>,
    /// Validation items scored per source.
    pub n: usize,
    /// Cosine similarity of the sources' SFT gradient directions.
    pub cosine: Vec<Vec<f64>>,
    /// The grouping rule.
    pub rule: GroupRule,
    /// The experts and why.
    pub grouping: Grouping,
    /// Wall time, seconds.
    pub seconds: f64,
}

/// Measure every source (accuracy of `base` on `n` validation items, SFT gradient direction on
/// `grad_items` training items) and group them by `rule`. `progress(i, name)` before each.
#[allow(clippy::too_many_arguments)]
pub fn discover(
    ck: &Checkpoint,
    base: &crate::engine::model::Model,
    factors: &BTreeMap<String, Svd>,
    tok: &dyn Tokenizer,
    sources: &[DataSource],
    n: usize,
    grad_items: usize,
    rule: GroupRule,
    comm: &dyn crate::dist::Comm,
    mut progress: impl FnMut(usize, &str),
) -> Result<Discovery> {
    let t0 = std::time::Instant::now();
    let names: Vec<String> = sources.iter().map(DataSource::name).collect();
    // Each source measured on its own (by the rank it falls to, under MPI).
    let measured = crate::dist::map(comm, "discovery", sources.len(), |i| {
        let source = &sources[i];
        progress(i, &names[i]);
        let items = source.validation(n, 0)?;
        let refs: Vec<&crate::tasks::Item> = items.iter().collect();
        let score = crate::eval::score_items(base, tok, &refs, |e, c| source.verify(e, c), |_| {})?;
        let dir = gradient_direction(ck, factors, tok, source, grad_items, 0)?;
        Ok((score.accuracy, dir))
    })?;
    let (accuracy, dirs): (Vec<f64>, Vec<Vec<f32>>) = measured.into_iter().unzip();
    let cosine = cosine_matrix(&dirs);
    let grouping = group(&names, &accuracy, &cosine, rule);
    Ok(Discovery {
        names,
        accuracy,
        n,
        cosine,
        rule,
        grouping,
        seconds: t0.elapsed().as_secs_f64(),
    })
}

/// [`discover`] over every built-in domain: the MLP factors of `ck` from `cache` and its packed
/// ternary model as the base.
#[allow(clippy::too_many_arguments)]
pub fn discover_domains(
    ck: &Checkpoint,
    tok: &dyn Tokenizer,
    cache: &crate::svf::svd::SvdCache,
    n: usize,
    grad_items: usize,
    rule: GroupRule,
    progress: impl FnMut(usize, &str),
) -> Result<Discovery> {
    let (factors, _) = crate::svf::factors::factors(ck, crate::svf::Targets::Mlp, cache)?;
    let base = crate::engine::model::Model::new(ck, ModelOptions::default())?;
    let sources: Vec<DataSource> = (crate::tasks::Domain::ALL.iter())
        .map(|&d| DataSource::Domain(d))
        .collect();
    let solo = crate::dist::Solo;
    discover(
        ck, &base, &factors, tok, &sources, n, grad_items, rule, &solo, progress,
    )
}

impl Discovery {
    /// A table of accuracy and gradient cosines per source, then the experts and why.
    pub fn to_text(&self) -> String {
        let mut s = format!(
            "{:<12} {:>9}   gradient cosine with the other domains\n",
            "domain", "accuracy"
        );
        for (i, name) in self.names.iter().enumerate() {
            let row: Vec<String> = self.cosine[i].iter().map(|c| format!("{c:+.2}")).collect();
            s += &format!(
                "{name:<12} {:>8.1}%   {}\n",
                100.0 * self.accuracy[i],
                row.join(" ")
            );
        }
        s += &format!("\n{} experts:\n", self.grouping.groups.len());
        for group in &self.grouping.groups {
            s += &format!("  {}\n", group.join(" + "));
        }
        s += &format!("{}\n", self.grouping.reason);
        s
    }

    /// The report as `bitsvf discover --json` prints it: accuracy by name, the similarity
    /// matrix, the rule, the experts and the reason.
    pub fn to_json(&self) -> serde_json::Value {
        let accuracy: BTreeMap<&String, f64> = self
            .names
            .iter()
            .zip(self.accuracy.iter().copied())
            .collect();
        serde_json::json!({
            "accuracy": accuracy,
            "similarity": {"domains": self.names, "cosine": self.cosine},
            "rule": self.rule,
            "experts": self.grouping.groups,
            "reason": self.grouping.reason,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("d{i}")).collect()
    }

    #[test]
    fn similar_directions_share_an_expert() {
        // d0/d1 and d2/d3 point the same way; d4 is alone; d5 has no headroom.
        let dirs = vec![
            vec![1.0f32, 0.1, 0.0],
            vec![0.9, 0.2, 0.0],
            vec![0.0, 1.0, 0.1],
            vec![0.1, 0.9, 0.0],
            vec![0.0, 0.0, 1.0],
            vec![1.0, 0.0, 0.0],
        ];
        let sim = cosine_matrix(&dirs);
        assert!((sim[0][0] - 1.0).abs() < 1e-9 && (sim[0][1] - sim[1][0]).abs() < 1e-12);
        let acc = [0.5, 0.6, 0.7, 0.8, 0.9, 0.99];
        let g = group(&names(6), &acc, &sim, GroupRule::default());
        let mut groups = g.groups.clone();
        groups.iter_mut().for_each(|g| g.sort());
        groups.sort();
        assert_eq!(groups, [vec!["d0", "d1"], vec!["d2", "d3"], vec!["d4"]]);
        assert!(
            g.reason.contains("5 of 6") && g.reason.contains("N = 3"),
            "{}",
            g.reason
        );
    }

    #[test]
    fn never_fewer_than_the_minimum_and_never_more_than_the_maximum() {
        // All alike: merging stops at 3. All orthogonal, 12 candidates: merged down to 10.
        let alike: Vec<Vec<f32>> = (0..5).map(|i| vec![1.0, 0.01 * i as f32]).collect();
        let g = group(
            &names(5),
            &[0.5; 5],
            &cosine_matrix(&alike),
            GroupRule::default(),
        );
        assert_eq!(g.groups.len(), 3);
        let orth: Vec<Vec<f32>> = (0..12)
            .map(|i| (0..12).map(|j| if i == j { 1.0 } else { 0.0 }).collect())
            .collect();
        let g = group(
            &names(12),
            &[0.5; 12],
            &cosine_matrix(&orth),
            GroupRule::default(),
        );
        assert_eq!(g.groups.len(), 10);
        // Too few candidates: the nearest outside the band are added.
        let g = group(
            &names(4),
            &[0.5, 0.99, 0.01, 1.0],
            &cosine_matrix(
                &orth[..4]
                    .iter()
                    .map(|v| v[..4].to_vec())
                    .collect::<Vec<_>>(),
            ),
            GroupRule::default(),
        );
        let mut all: Vec<String> = g.groups.concat();
        all.sort();
        assert_eq!(all, ["d0", "d1", "d3"]);
        assert!(g.reason.contains("added"), "{}", g.reason);
    }

    #[test]
    fn gradient_directions_are_seeded_and_cover_every_z() {
        let ck = Checkpoint::tiny(16, 24, 5);
        let tok = crate::engine::tokenizer::for_model(None, &ck.config).unwrap();
        let f: BTreeMap<String, Svd> =
            crate::svf::factors::decompose(&ck, crate::svf::Targets::Mlp);
        let data = DataSource::Domain(crate::tasks::Domain::by_name("count").unwrap());
        let a = gradient_direction(&ck, &f, tok.as_ref(), &data, 8, 3).unwrap();
        let b = gradient_direction(&ck, &f, tok.as_ref(), &data, 8, 3).unwrap();
        assert_eq!(a, b);
        assert_eq!(a.len(), f.values().map(|s| s.sigma.len()).sum::<usize>());
        assert!(a.iter().any(|&x| x != 0.0));
    }
}
