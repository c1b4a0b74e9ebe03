//! Stage 3: the search over mixtures of experts (DESIGN.md §4), every candidate measured in the
//! form it would be deployed in.
//!
//! A genome is `(α_1 … α_K, g)`: the mixture weights of the K paper-SVF experts, z' = Σ α_k z_k
//! ([`crate::svf::expert::mixture`]), and a gene `g` that picks how many singular directions the
//! deployed delta keeps, k = [`RANKS`]`[⌊g⌋]`. The deployed form is the seed's hybrid
//! (Option 3): the packed ternary base plus U_k diag(σ_k ⊙ (z'_k − 1)) V_kᵀ with f16 factors,
//! on BitNet's int8 activations ([`crate::svf::deploy`]); k = 0 is the bare base. So the four
//! objectives, all minimised and all measured on the deployed model, really trade off:
//!
//! 1. `1 − accuracy`: greedy exact-match accuracy on the validation items of every expert's
//!    domains, by one teacher-forced pass ([`crate::eval::teacher_forced`]);
//! 2. KL drift: mean KL(base ‖ deployed) per token over every position of a preservation set
//!    (validation items of all built-in domains);
//! 3. latency: milliseconds per decoded token (median of several greedy decodes), measured
//!    once per rank — α changes the values of the delta, never the work done, and timing every
//!    genome anew would let timer noise decide which genomes are non-dominated;
//! 4. bytes resident (MB): more directions cost factor bytes.
//!
//! The chosen α* is the most accurate point of the final front within the budgets — resident
//! bytes ≤ `max_bytes_ratio` × the f32 model and latency ≤ `max_latency_ratio` × the base's —
//! with ties broken by KL, latency and bytes in that order; when no front point meets the
//! budgets, the front's knee ([`crate::search::knee_point`]).

use crate::engine::model::Model;
use crate::engine::tokenizer::Tokenizer;
use crate::error::{Checks, Error, Result};
use crate::eval::batch::{batch_from_pairs, flat_log_probs, Batch};
use crate::eval::speed::decode_speed;
use crate::eval::teacher_forced;
use crate::search::{knee_point, nsga2, Budget, GenerationRecord, Nsga2Config};
use crate::svf::base::{Base, Factors};
use crate::svf::deploy::{f32_bytes, packed_bytes, DeployOption, Deployment};
use crate::svf::expert::{mixture, Expert};
use crate::svf::Parameterization;
use crate::tasks::Item;
use crate::train::loss::masked_kl;
use candle_core::{DType, Tensor};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

/// Environment variable that fixes the latency of deployed ranks instead of timing their
/// decodes, as `RANK:MS,RANK:MS` (milliseconds per token; ranks not listed are timed).
/// Latency is an objective and a budget of the search, so a run reproduces another run's
/// choices on a busy machine only with the latencies that run measured (the golden test).
pub const LATENCY_ENV: &str = "BITSVF_LATENCY_MS";

/// The latencies fixed by [`LATENCY_ENV`], by rank (none when it is unset).
fn fixed_latencies() -> Result<BTreeMap<usize, f64>> {
    let Ok(spec) = std::env::var(LATENCY_ENV) else {
        return Ok(BTreeMap::new());
    };
    (spec.split(',').filter(|s| !s.trim().is_empty()))
        .map(|pair| {
            let parsed = pair.split_once(':').and_then(|(rank, ms)| {
                Some((rank.trim().parse().ok()?, ms.trim().parse::<f64>().ok()?))
            });
            parsed.filter(|(_, ms)| *ms > 0.0).ok_or_else(|| {
                Error::Input(format!(
                    "{LATENCY_ENV}: `{pair}` is not RANK:MS (e.g. 64:6.1) with MS > 0"
                ))
            })
        })
        .collect()
}

/// Singular directions the deployed delta may keep (0 = the bare ternary base).
pub const RANKS: [usize; 6] = [0, 16, 32, 64, 128, 256];

/// Settings of the mixture search.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SearchConfig {
    /// NSGA-II population.
    pub population: usize,
    /// Most generations after the initial population.
    pub generations: usize,
    /// Stop when the hypervolume has not grown for this many generations.
    pub stall_generations: usize,
    /// Upper bound of every α (the lower bound is 0) unless `alpha_bounds` names the expert
    /// or one of its domains.
    pub alpha_max: f64,
    /// (lo, hi) bounds of α by expert name or by a domain the expert covers, overriding
    /// [0, `alpha_max`].
    #[serde(default)]
    pub alpha_bounds: BTreeMap<String, (f64, f64)>,
    /// Seed of the search.
    pub seed: u64,
    /// Greedy decode tokens per latency measurement.
    pub latency_tokens: usize,
    /// Latency measurements per deployed rank (the median is kept).
    pub latency_runs: usize,
    /// Budget on resident bytes, as a share of the f32 model, for the choice of α*.
    pub max_bytes_ratio: f64,
    /// Budget on latency, as a multiple of the bare base's, for the choice of α*.
    pub max_latency_ratio: f64,
}

impl Default for SearchConfig {
    fn default() -> Self {
        SearchConfig {
            population: 16,
            generations: 10,
            stall_generations: 3,
            alpha_max: 2.0,
            alpha_bounds: BTreeMap::new(),
            seed: 0,
            latency_tokens: 32,
            latency_runs: 9,
            max_bytes_ratio: 0.25,
            max_latency_ratio: 1.5,
        }
    }
}

impl SearchConfig {
    /// Every field's range, and every α bound a finite pair 0 ≤ lo ≤ hi, recorded in `c`.
    pub fn check(&self, c: &mut Checks) {
        c.count("population", self.population, MAX_POPULATION);
        c.that(self.population >= 2, "population", || {
            format!("got {}; NSGA-II needs at least 2", self.population)
        });
        c.that(self.generations <= MAX_GENERATIONS, "generations", || {
            format!(
                "got {}; expected at most {MAX_GENERATIONS}",
                self.generations
            )
        });
        c.count("stall_generations", self.stall_generations, MAX_GENERATIONS);
        c.that(
            self.alpha_max.is_finite() && self.alpha_max > 0.0 && self.alpha_max <= MAX_ALPHA,
            "alpha_max",
            || {
                format!(
                    "got {}; expected a finite value in (0, {MAX_ALPHA}]",
                    self.alpha_max
                )
            },
        );
        c.nested("alpha_bounds", |c| {
            for (name, &(lo, hi)) in &self.alpha_bounds {
                c.that(
                    lo.is_finite() && hi.is_finite() && 0.0 <= lo && lo <= hi && hi <= MAX_ALPHA,
                    name,
                    || {
                        format!(
                            "got [{lo}, {hi}]; expected [lo, hi] with 0 <= lo <= hi <= {MAX_ALPHA}"
                        )
                    },
                );
            }
        });
        c.count("latency_tokens", self.latency_tokens, 4096);
        c.count("latency_runs", self.latency_runs, 1000);
        for (field, v) in [
            ("max_bytes_ratio", self.max_bytes_ratio),
            ("max_latency_ratio", self.max_latency_ratio),
        ] {
            c.that(v.is_finite() && v > 0.0, field, || {
                format!("got {v}; expected a finite ratio > 0")
            });
        }
    }
}

/// Largest NSGA-II population a setting may ask for.
pub const MAX_POPULATION: usize = 10_000;

/// Most generations a setting may ask for.
pub const MAX_GENERATIONS: usize = 100_000;

/// Largest mixture weight α a setting may allow.
pub const MAX_ALPHA: f64 = 100.0;

/// One measured candidate.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Point {
    /// Mixture weights, one per expert.
    pub alpha: Vec<f64>,
    /// Singular directions kept by the deployed delta (0 = base).
    pub rank: usize,
    /// Greedy exact-match accuracy on the validation items.
    pub accuracy: f64,
    /// Mean KL(base ‖ deployed) per token on the preservation set.
    pub kl: f64,
    /// Milliseconds per decoded token.
    pub ms_per_token: f64,
    /// Resident bytes of the deployed form.
    pub bytes: usize,
}

impl Point {
    /// The objective vector NSGA-II minimises: 1 − accuracy, KL, ms/token, MB.
    pub fn objectives(&self) -> Vec<f64> {
        vec![
            1.0 - self.accuracy,
            self.kl,
            self.ms_per_token,
            self.bytes as f64 / 1e6,
        ]
    }
}

/// What the search found.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SearchReport {
    /// Expert names, in α order.
    pub experts: Vec<String>,
    /// The bare base, measured the same way.
    pub base: Point,
    /// Every genome evaluated, in order.
    pub evaluated: Vec<Point>,
    /// The final Pareto front.
    pub front: Vec<Point>,
    /// Hypervolume and front size per generation.
    pub history: Vec<GenerationRecord>,
    /// Hypervolume reference point (objectives as in [`Point::objectives`]).
    pub hv_reference: Vec<f64>,
    /// The chosen point.
    pub chosen: Point,
    /// Why it was chosen.
    pub rule: String,
    /// Whether the hypervolume stalled before the last generation.
    pub stopped_early: bool,
    /// Wall time of the search, seconds.
    pub seconds: f64,
}

/// A paper-SVF expert cut to its top-`k` directions, as a low-rank expert.
pub fn truncated(expert: &Expert, k: usize) -> Expert {
    let mut e = expert.clone();
    e.meta.parameterization = Parameterization::LowRank;
    for z in e.z.values_mut() {
        z.truncate(k);
    }
    e
}

/// The deployed forms of mixtures, one resident deployment per rank.
pub struct Deployer<'a> {
    base: &'a Base<'a>,
    experts: &'a [Expert],
    factors: Arc<Factors>,
    base_bytes: usize,
    deployed: BTreeMap<usize, Deployment>,
}

impl<'a> Deployer<'a> {
    /// Deploy mixtures of `experts` (paper SVF, one target set) on `base`.
    pub fn new(base: &'a Base<'a>, experts: &'a [Expert]) -> Result<Self> {
        let first = experts
            .first()
            .ok_or_else(|| Error::Input("a mixture needs at least one expert".into()))?;
        if let Some(e) = experts
            .iter()
            .find(|e| e.meta.parameterization != Parameterization::Paper)
        {
            return Err(Error::Input(format!(
                "mixtures deploy paper-SVF experts; `{}` is {}",
                e.meta.name,
                e.meta.parameterization.name()
            )));
        }
        Ok(Deployer {
            base,
            experts,
            factors: base.factors(first.meta.targets)?,
            base_bytes: packed_bytes(base.ck()),
            deployed: BTreeMap::new(),
        })
    }

    /// The deployed model of mixture `alpha` with `rank` directions (the base for rank 0),
    /// and its resident bytes.
    pub fn deploy(&mut self, alpha: &[f64], rank: usize) -> Result<(&Model, usize)> {
        if rank == 0 {
            return Ok((self.base.packed()?, self.base_bytes));
        }
        let refs: Vec<&Expert> = self.experts.iter().collect();
        let mixed = truncated(&mixture(&refs, alpha, &self.factors.svd)?, rank);
        let dep = match self.deployed.entry(rank) {
            std::collections::btree_map::Entry::Occupied(o) => {
                let d = o.into_mut();
                d.set_expert(0, mixed)?;
                d
            }
            std::collections::btree_map::Entry::Vacant(v) => v.insert(Deployment::new(
                self.base,
                DeployOption::HybridLowRank,
                vec![mixed],
            )?),
        };
        let bytes = dep.bytes();
        Ok((&dep.model, bytes))
    }
}

/// Everything needed to measure a genome.
pub struct Problem<'a> {
    /// The deployed forms.
    pub deployer: Deployer<'a>,
    tok: &'a dyn Tokenizer,
    val: &'a [Item],
    preserve: Batch,
    base_lp: Tensor,
    latency: (usize, usize),
    /// Milliseconds per token by rank, measured once (or fixed by [`LATENCY_ENV`]): α changes
    /// the values of the delta, never the work, and re-timing every genome would let timer
    /// noise pick the front.
    ms_per_token: BTreeMap<usize, f64>,
}

impl<'a> Problem<'a> {
    /// Set up the measurements: `val` scores accuracy, `preserve` measures drift.
    pub fn new(
        base: &'a Base<'a>,
        tok: &'a dyn Tokenizer,
        experts: &'a [Expert],
        val: &'a [Item],
        preserve: &[Item],
        cfg: &SearchConfig,
    ) -> Result<Self> {
        if experts.is_empty() || val.is_empty() || preserve.is_empty() {
            return Err(Error::Input(
                "the mixture search needs experts, validation items and preservation items".into(),
            ));
        }
        let deployer = Deployer::new(base, experts)?;
        let base = base.packed()?;
        // Drift over every predicted position: the first token is the "prompt".
        let pairs = preserve
            .iter()
            .map(|it| {
                let mut ids = crate::eval::prompt_ids(tok, &it.prompt)?;
                ids.extend(tok.encode(&it.answer)?);
                ids.push(tok.eos());
                let rest = ids.split_off(1);
                Ok((ids, rest))
            })
            .collect::<Result<Vec<_>>>()?;
        let preserve = batch_from_pairs(&pairs, base.device())?;
        let base_lp = flat_log_probs(base, &preserve)?;
        Ok(Problem {
            deployer,
            tok,
            val,
            preserve,
            base_lp,
            latency: (cfg.latency_tokens, cfg.latency_runs),
            ms_per_token: fixed_latencies()?,
        })
    }

    /// Measure one mixture.
    pub fn measure(&mut self, alpha: &[f64], rank: usize) -> Result<Point> {
        let (tok, latency) = (self.tok, self.latency);
        let (model, bytes) = self.deployer.deploy(alpha, rank)?;
        let scores = teacher_forced(model, tok, self.val)?;
        let accuracy = scores.iter().filter(|s| s.exact).count() as f64 / scores.len() as f64;
        let (preserve, base_lp) = (&self.preserve, &self.base_lp);
        let kl = if rank == 0 {
            0.0
        } else {
            let lp = flat_log_probs(model, preserve)?;
            masked_kl(base_lp, &lp, preserve)?
                .to_dtype(DType::F64)?
                .to_scalar::<f64>()?
        };
        let ms_per_token = match self.ms_per_token.get(&rank) {
            Some(&ms) => ms,
            None => {
                let ms = 1e3 / decode_speed(model, tok, latency.0, latency.1)?;
                self.ms_per_token.insert(rank, ms);
                ms
            }
        };
        Ok(Point {
            alpha: alpha.to_vec(),
            rank,
            accuracy,
            kl,
            ms_per_token,
            bytes,
        })
    }
}

/// The rank a genome's last gene selects.
pub fn rank_of(gene: f64) -> usize {
    RANKS[(gene.max(0.0) as usize).min(RANKS.len() - 1)]
}

/// Run the NSGA-II search; `progress(generation, hypervolume, front size)` after each
/// generation, and `on_point` for every measured genome (for metrics logs).
pub fn search(
    problem: &mut Problem,
    cfg: &SearchConfig,
    mut progress: impl FnMut(&GenerationRecord),
    mut on_point: impl FnMut(&Point),
) -> Result<SearchReport> {
    let t0 = Instant::now();
    let k = problem.deployer.experts.len();
    let experts = &problem.deployer.experts;
    let names: Vec<String> = experts.iter().map(|e| e.meta.name.clone()).collect();
    if let Some(n) =
        (cfg.alpha_bounds.keys()).find(|n| !experts.iter().any(|e| e.meta.answers_to(n)))
    {
        return Err(Error::Input(format!(
            "search.alpha_bounds names `{n}`, which is neither one of the searched experts ({}) \
             nor a domain one of them covers",
            names.join(", ")
        )));
    }
    // A bound by expert name wins over one by a domain the expert covers.
    let mut bounds: Vec<(f64, f64)> = (experts.iter())
        .map(|e| {
            (cfg.alpha_bounds.get(&e.meta.name))
                .or_else(|| (e.meta.domains.iter()).find_map(|d| cfg.alpha_bounds.get(d)))
                .copied()
                .unwrap_or((0.0, cfg.alpha_max))
        })
        .collect();
    let base = problem.measure(&vec![0.0; k], 0)?;
    on_point(&base);
    bounds.push((0.0, RANKS.len() as f64 - 1e-9));
    // Start from every expert alone and the uniform mixture, at 64 directions.
    let gene64 = RANKS.iter().position(|&r| r == 64).unwrap_or(1) as f64 + 0.5;
    let mut initial: Vec<Vec<f64>> = (0..k)
        .map(|i| {
            let mut g: Vec<f64> = (0..k).map(|j| f64::from(u8::from(i == j))).collect();
            g.push(gene64);
            g
        })
        .collect();
    initial.push(
        vec![1.0 / k as f64; k]
            .into_iter()
            .chain([gene64])
            .collect(),
    );
    initial.truncate(cfg.population);
    for g in &mut initial {
        for (x, &(lo, hi)) in g.iter_mut().zip(&bounds) {
            *x = x.clamp(lo, hi);
        }
    }
    let config = Nsga2Config {
        population: cfg.population,
        generations: cfg.generations,
        seed: cfg.seed,
        stall_generations: Some(cfg.stall_generations),
        initial_genomes: initial,
        ..Default::default()
    };
    let mut evaluated: Vec<Point> = Vec::new();
    let result = nsga2(
        &bounds,
        &config,
        |genomes| -> Result<Vec<Vec<f64>>> {
            genomes
                .iter()
                .map(|g| {
                    let p = problem.measure(&g[..k], rank_of(g[k]))?;
                    on_point(&p);
                    let o = p.objectives();
                    evaluated.push(p);
                    Ok(o)
                })
                .collect()
        },
        |record, _| progress(record),
    )
    .map_err(|e| Error::Input(format!("mixture search: {e}")))?;
    let point_of = |genome: &[f64]| -> Point {
        let rank = rank_of(genome[k]);
        evaluated
            .iter()
            .rev()
            .find(|p| p.alpha == genome[..k] && p.rank == rank)
            .cloned()
            .expect("every front genome was evaluated")
    };
    let front: Vec<Point> = result.front.iter().map(|i| point_of(&i.genome)).collect();
    let budgets = [
        Budget {
            objective: 3,
            max: cfg.max_bytes_ratio * f32_bytes(problem.deployer.base.ck()) as f64 / 1e6,
        },
        Budget {
            objective: 2,
            max: cfg.max_latency_ratio * base.ms_per_token,
        },
    ];
    let (chosen, rule) = match result.best_within(0, &budgets) {
        Some(i) => (
            point_of(&i.genome),
            format!(
                "the most accurate front point within {:.0}% of the f32 model's bytes and {:.1}× the \
                 base's latency per token (ties: lower KL, latency, bytes)",
                100.0 * cfg.max_bytes_ratio,
                cfg.max_latency_ratio
            ),
        ),
        None => {
            let objs: Vec<Vec<f64>> = front.iter().map(Point::objectives).collect();
            let i = knee_point(&objs).unwrap_or(0);
            (
                front[i].clone(),
                "no front point met the byte and latency budgets: the front's knee".to_string(),
            )
        }
    };
    Ok(SearchReport {
        experts: names,
        base,
        evaluated,
        front,
        history: result.history,
        hv_reference: result.hv_reference,
        chosen,
        rule,
        stopped_early: result.stopped_early,
        seconds: t0.elapsed().as_secs_f64(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::checkpoint::Checkpoint;
    use crate::engine::tokenizer::ByteTokenizer;
    use crate::svf::expert::{flat_fixture, flat_paper_expert};
    use crate::svf::svd::SvdCache;
    use crate::svf::Targets;
    use crate::tasks::Domain;

    fn items(d: Domain, n: usize) -> Vec<Item> {
        crate::tasks::eval_items(d, crate::tasks::Split::Validation, n, 0).unwrap()
    }

    fn quick() -> SearchConfig {
        SearchConfig {
            population: 4,
            generations: 1,
            latency_tokens: 2,
            latency_runs: 1,
            ..SearchConfig::default()
        }
    }

    #[test]
    fn ranks_and_truncation() {
        assert_eq!(rank_of(-3.0), 0);
        assert_eq!(rank_of(0.99), 0);
        assert_eq!(rank_of(3.5), 64);
        assert_eq!(rank_of(1e9), *RANKS.last().unwrap());
        let ck = Checkpoint::tiny(32, 48, 1);
        let dir = tempfile::tempdir().unwrap();
        let cache = SvdCache::new(dir.path().to_path_buf());
        let f = crate::svf::factors::factors(&ck, Targets::Mlp, &cache)
            .unwrap()
            .0;
        let t = truncated(&flat_paper_expert(&ck, &f, "a", 1.5), 16);
        assert_eq!(t.meta.parameterization, Parameterization::LowRank);
        assert!(t
            .z
            .values()
            .all(|z| z.len() == 16 && z.iter().all(|&v| v == 1.5)));
    }

    /// Mixtures are measured on the deployed model: z' = 1 deploys exactly as the base (same
    /// accuracy, zero drift, more bytes for the resident factors); z' = 0 removes the top
    /// directions and drifts.
    #[test]
    fn measurements_follow_the_deployed_mixture() {
        let fx = flat_fixture((32, 48, 2), &[("a", 1.0), ("b", 1.0)]);
        let (ck, experts) = (&fx.ck, &fx.experts);
        let (val, preserve) = (items(Domain::Count, 6), items(Domain::Sort, 4));
        let tok = ByteTokenizer;
        let cfg = quick();
        let base = Base::new(ck, &fx.cache);
        let mut p = Problem::new(&base, &tok, experts, &val, &preserve, &cfg).unwrap();
        let base = p.measure(&[0.0, 0.0], 0).unwrap();
        assert_eq!((base.kl, base.bytes), (0.0, packed_bytes(ck)));
        let same = p.measure(&[0.5, 0.5], 16).unwrap();
        assert_eq!(same.accuracy, base.accuracy);
        assert!(same.kl.abs() < 1e-6, "kl {}", same.kl);
        assert!(same.bytes > base.bytes);
        let wider = p.measure(&[0.5, 0.5], 32).unwrap();
        assert!(wider.bytes > same.bytes);
        let zeroed = p.measure(&[0.0, 0.0], 16).unwrap();
        assert!(zeroed.kl > 1e-3, "kl {}", zeroed.kl);
        assert!(zeroed.ms_per_token > 0.0);
    }

    #[test]
    fn search_reports_a_front_a_history_and_a_measured_choice() {
        let fx = flat_fixture((32, 48, 3), &[("a", 1.2), ("b", 0.8)]);
        let (ck, experts) = (&fx.ck, &fx.experts);
        let (val, preserve) = (items(Domain::Count, 4), items(Domain::Sort, 2));
        let tok = ByteTokenizer;
        let cfg = quick();
        let base = Base::new(ck, &fx.cache);
        let mut p = Problem::new(&base, &tok, experts, &val, &preserve, &cfg).unwrap();
        let mut seen = 0;
        let r = search(&mut p, &cfg, |_| {}, |_| seen += 1).unwrap();
        assert_eq!(r.evaluated.len(), 8);
        assert_eq!(seen, 9, "the base and every genome");
        assert_eq!(r.history.len(), 2);
        assert!(!r.front.is_empty());
        assert!(r.front.iter().all(|q| r.evaluated.contains(q)));
        assert!(r.evaluated.contains(&r.chosen));
        // The initial population holds each expert alone at 64 directions (32 on this model).
        assert_eq!(r.evaluated[0].alpha, vec![1.0, 0.0]);
        assert_eq!(r.evaluated[0].rank, 64);

        // Bounds per expert hold for every genome; a bound for an unknown expert is refused.
        let pinned = SearchConfig {
            alpha_bounds: BTreeMap::from([("b".to_string(), (0.25, 0.25))]),
            ..cfg.clone()
        };
        let r = search(&mut p, &pinned, |_| {}, |_| {}).unwrap();
        assert!(r.evaluated.iter().all(|q| q.alpha[1] == 0.25));
        let unknown = SearchConfig {
            alpha_bounds: BTreeMap::from([("zz".to_string(), (0.0, 1.0))]),
            ..cfg
        };
        let err = search(&mut p, &unknown, |_| {}, |_| {})
            .unwrap_err()
            .to_string();
        assert!(err.contains("zz"), "{err}");
    }
}
