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
//! 3. latency: modelled milliseconds per decoded token of the deployed form, a roofline over
//!    its bytes read and multiply-adds per token ([`TokenWork`]) at a nominal bandwidth and
//!    rate — deterministic, so the same seed and model choose the same α* on any machine. α
//!    changes the values of the delta, never the work; one timed decode of the base calibrates
//!    the model to this machine's milliseconds for reporting (`ms_per_token`), never for the
//!    search;
//! 4. bytes resident (MB): more directions cost factor bytes.
//!
//! The search's own pick is the most accurate point of the final front within the budgets —
//! resident bytes ≤ `max_bytes_ratio` × the f32 model and modelled latency ≤
//! `max_latency_ratio` × the base's — with ties broken by KL, latency and bytes in that order;
//! when no front point meets the budgets, the front's knee ([`crate::search::knee_point`]).
//! What is handed off is decided afterwards on a separate selection split
//! ([`crate::adapt::selection`]).

use crate::adapt::selection::{candidates, Selection};
use crate::dist::{broadcast, is_root, map, Comm, Solo};
use crate::engine::model::Model;
use crate::engine::tokenizer::Tokenizer;
use crate::error::{Checks, Error, Result};
use crate::eval::batch::{batch_from_pairs, flat_log_probs, Batch};
use crate::eval::speed::decode_speed;
use crate::eval::{exact_matches, share};
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

/// Nominal read bandwidth of the latency model: bytes per millisecond (20 GB/s).
pub const NOMINAL_BYTES_PER_MS: f64 = 20e6;

/// Nominal multiply-add rate of the latency model: per millisecond (4 G/s).
pub const NOMINAL_MACS_PER_MS: f64 = 4e6;

/// The work of decoding one token with a deployed form: weight bytes read and multiply-adds
/// (ternary, integer and float alike; attention over the context aside, which no rank
/// changes).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenWork {
    /// Weight bytes read per token.
    pub bytes_read: usize,
    /// Multiply-adds per token.
    pub macs: usize,
}

impl TokenWork {
    /// Modelled milliseconds per token: the larger of the bytes over
    /// [`NOMINAL_BYTES_PER_MS`] and the multiply-adds over [`NOMINAL_MACS_PER_MS`] (a
    /// roofline: a small model decodes from cache and is bound by arithmetic, a large one
    /// streams its weights and is bound by bandwidth).
    pub fn model_ms(&self) -> f64 {
        (self.bytes_read as f64 / NOMINAL_BYTES_PER_MS).max(self.macs as f64 / NOMINAL_MACS_PER_MS)
    }
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
    /// Greedy decode tokens of the timed decode that calibrates the latency model.
    pub latency_tokens: usize,
    /// Timed decodes of the base (the median is kept).
    pub latency_runs: usize,
    /// Budget on resident bytes, as a share of the f32 model, for the choice of α*.
    pub max_bytes_ratio: f64,
    /// Budget on modelled latency, as a multiple of the bare base's, for the choice of α*.
    pub max_latency_ratio: f64,
    /// Front points (within the budgets, most accurate first) re-scored on the selection
    /// split.
    #[serde(default = "default_candidates")]
    pub select_candidates: usize,
    /// A mixture is handed off only if its selection gain over the base exceeds this many
    /// standard errors.
    #[serde(default = "default_select_z")]
    pub select_z: f64,
    /// Hand off the best candidate on the selection split even when its gain is within noise
    /// (the quick run, whose experts train too briefly to gain, sets it to exercise the
    /// mixture's path; never for a model meant for use).
    #[serde(default)]
    pub hand_off_within_noise: bool,
}

fn default_candidates() -> usize {
    6
}

fn default_select_z() -> f64 {
    2.0
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
            select_candidates: default_candidates(),
            select_z: default_select_z(),
            hand_off_within_noise: false,
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
        c.count("select_candidates", self.select_candidates, MAX_POPULATION);
        c.that(
            self.select_z.is_finite() && self.select_z >= 0.0,
            "select_z",
            || format!("got {}; expected a finite value >= 0", self.select_z),
        );
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
    /// Modelled milliseconds per decoded token ([`TokenWork::model_ms`]): the latency
    /// objective (absent from manifests before 1.2: 0).
    #[serde(default)]
    pub model_ms: f64,
    /// The work per decoded token the latency model reads.
    #[serde(default)]
    pub work: TokenWork,
    /// `model_ms` calibrated to this machine by one timed decode of the base: reported, never
    /// optimised on.
    pub ms_per_token: f64,
    /// Resident bytes of the deployed form.
    pub bytes: usize,
}

impl Point {
    /// The objective vector NSGA-II minimises: 1 − accuracy, KL, modelled ms/token, MB.
    pub fn objectives(&self) -> Vec<f64> {
        vec![
            1.0 - self.accuracy,
            self.kl,
            self.model_ms,
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
    /// The front points offered to the selection split ([`crate::adapt::selection`]).
    #[serde(default)]
    pub offered: Vec<Point>,
    /// The choice on the selection split: what is handed off.
    #[serde(default)]
    pub selection: Option<Selection>,
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

    /// The work per decoded token of the deployed form with `rank` directions: the packed
    /// base's weights and head, plus the f16 factors U_k, V_k and the k scales of every
    /// target.
    pub fn work(&self, rank: usize) -> Result<TokenWork> {
        let ck = self.base.ck();
        let mut macs: usize = ck
            .linears()
            .map(|(_, _, l)| l.matrix.rows() * l.matrix.cols())
            .sum();
        macs += ck.lm_head().len();
        let mut bytes_read = self.base.packed()?.weight_bytes_per_token();
        if rank > 0 {
            for svd in self.factors.svd.values() {
                let k = rank.min(svd.sigma.len());
                macs += k * (svd.rows + svd.cols);
                bytes_read += HALF * k * (svd.rows + svd.cols) + 4 * k;
            }
        }
        Ok(TokenWork { bytes_read, macs })
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

/// Bytes per element of the deployed factors (f16).
const HALF: usize = 2;

/// Everything needed to measure a genome.
pub struct Problem<'a> {
    /// The deployed forms.
    pub deployer: Deployer<'a>,
    tok: &'a dyn Tokenizer,
    val: &'a [Item],
    preserve: Batch,
    base_lp: Tensor,
    latency: (usize, usize),
    /// Measured milliseconds per modelled millisecond: one timed decode of the base, for
    /// reporting.
    calibration: Option<f64>,
    /// The ranks a generation's genomes are measured on.
    comm: &'a dyn Comm,
}

impl<'a> Problem<'a> {
    /// The tokenizer the items are scored with.
    pub fn tok(&self) -> &'a dyn Tokenizer {
        self.tok
    }

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
            calibration: None,
            comm: &Solo,
        })
    }

    /// The ranks the problem's measurements are shared out over.
    pub fn comm(&self) -> &'a dyn Comm {
        self.comm
    }

    /// The problem with each generation's genomes measured on the ranks of `comm`, shared out
    /// (every rank must run the same search); the base's timed decode is rank 0's.
    pub fn spread_over(self, comm: &'a dyn Comm) -> Self {
        Problem { comm, ..self }
    }

    /// Measured milliseconds per modelled millisecond on this machine (the base decoded once,
    /// timed; the median of the configured runs).
    pub fn calibration(&mut self) -> Result<f64> {
        if let Some(c) = self.calibration {
            return Ok(c);
        }
        let base = self.deployer.base.packed()?;
        let timed = 1e3 / decode_speed(base, self.tok, self.latency.0, self.latency.1)?;
        let c = timed / self.deployer.work(0)?.model_ms();
        self.calibration = Some(c);
        Ok(c)
    }

    /// Measure one mixture.
    pub fn measure(&mut self, alpha: &[f64], rank: usize) -> Result<Point> {
        let calibration = self.calibration()?;
        let work = self.deployer.work(rank)?;
        let tok = self.tok;
        let (model, bytes) = self.deployer.deploy(alpha, rank)?;
        let accuracy = share(&exact_matches(model, tok, self.val)?);
        let (preserve, base_lp) = (&self.preserve, &self.base_lp);
        let kl = if rank == 0 {
            0.0
        } else {
            let lp = flat_log_probs(model, preserve)?;
            masked_kl(base_lp, &lp, preserve)?
                .to_dtype(DType::F64)?
                .to_scalar::<f64>()?
        };
        Ok(Point {
            alpha: alpha.to_vec(),
            rank,
            accuracy,
            kl,
            model_ms: work.model_ms(),
            work,
            ms_per_token: work.model_ms() * calibration,
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
    // One latency calibration for every rank: rank 0's timing.
    let comm = problem.comm;
    let timed = is_root(comm).then(|| problem.calibration()).transpose()?;
    problem.calibration = Some(broadcast(comm, "the latency calibration", timed)?);
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
            let points = map(comm, "the search's genomes", genomes.len(), |i| {
                let g = &genomes[i];
                problem.measure(&g[..k], rank_of(g[k]))
            })?;
            Ok((points.into_iter())
                .map(|p| {
                    on_point(&p);
                    let o = p.objectives();
                    evaluated.push(p);
                    o
                })
                .collect())
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
            max: cfg.max_latency_ratio * base.model_ms,
        },
    ];
    let within: Vec<Point> = (result.front.iter())
        .filter(|i| budgets.iter().all(|b| i.objectives[b.objective] <= b.max))
        .map(|i| point_of(&i.genome))
        .collect();
    let (chosen, rule) = match result.best_within(0, &budgets) {
        Some(i) => (
            point_of(&i.genome),
            format!(
                "the most accurate front point within {:.0}% of the f32 model's bytes and {:.1}× the \
                 base's modelled latency per token (ties: lower KL, latency, bytes)",
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
    let offered = candidates(&within, &chosen, cfg.select_candidates);
    Ok(SearchReport {
        experts: names,
        base,
        evaluated,
        front,
        history: result.history,
        hv_reference: result.hv_reference,
        chosen,
        rule,
        offered,
        selection: None,
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
