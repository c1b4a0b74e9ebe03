//! NSGA-II (Deb, Pratap, Agarwal & Meyarivan 2002) for real-valued genomes in a box.
//!
//! The operators follow Deb's reference C implementation (nsga2-v1.1): SBX crossover with the
//! bounded spread factor and a 0.5 chance per variable, bounded polynomial mutation, binary
//! tournament on (rank, crowding distance), elitist (μ+λ) survival by fronts with crowding
//! truncation of the last front.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use super::hypervolume::hypervolume;
use super::pareto::{best_within, crowding_of, fast_non_dominated_sort, knee_point, Budget};
use super::{validate_bounds, SearchError};

/// Settings of one NSGA-II run. Defaults are docs/DESIGN.md §4's (population 50, 100 generations,
/// SBX η = 15 with probability 0.9, polynomial mutation η = 20 with probability 1/n).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Nsga2Config {
    /// Individuals per generation (μ = λ); at least 2. Odd sizes are allowed.
    pub population: usize,
    /// Generations after the initial population; the run evaluates at most
    /// `population × (generations + 1)` genomes.
    pub generations: usize,
    /// Seed of the `StdRng` driving every random choice.
    pub seed: u64,
    /// Distribution index η of SBX crossover; larger keeps children closer to their parents.
    pub crossover_eta: f64,
    /// Distribution index η of polynomial mutation.
    pub mutation_eta: f64,
    /// Probability that a pair of parents is crossed over (else the children are copies).
    pub crossover_prob: f64,
    /// Per-variable mutation probability; `None` means `1 / number of variables`.
    pub mutation_prob: Option<f64>,
    /// Stop early when the hypervolume has not grown by more than `stall_tolerance` (relative)
    /// over this many generations; `None` always runs all generations. A hypervolume of 0 (no
    /// front point inside the reference box yet) never counts as a stall.
    pub stall_generations: Option<usize>,
    /// Relative hypervolume growth below which generations count as stalled.
    pub stall_tolerance: f64,
    /// Reference point for the hypervolume (one value per objective, all finite). `None`
    /// derives it from the initial population: per objective, its maximum plus 10% of its
    /// range (or plus `max(|maximum|, 1) / 10` when the range is 0), ignoring infinite values.
    pub hv_reference: Option<Vec<f64>>,
    /// Genomes placed first in the initial population (e.g. each expert alone, α = one-hot),
    /// within the bounds and at most `population` of them; the rest is sampled uniformly.
    pub initial_genomes: Vec<Vec<f64>>,
}

impl Default for Nsga2Config {
    fn default() -> Self {
        Self {
            population: 50,
            generations: 100,
            seed: 0,
            crossover_eta: 15.0,
            mutation_eta: 20.0,
            crossover_prob: 0.9,
            mutation_prob: None,
            stall_generations: None,
            stall_tolerance: 1e-4,
            hv_reference: None,
            initial_genomes: Vec::new(),
        }
    }
}

/// One evaluated genome of a population.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Individual {
    /// The decision variables (in bitsvf: the mixture coefficients α).
    pub genome: Vec<f64>,
    /// The objective values, all minimised.
    pub objectives: Vec<f64>,
    /// Non-domination rank within the population (0 = first Pareto front).
    pub rank: usize,
    /// Crowding distance within its front (`+inf` at the front's extremes, serialised as
    /// `null` by serde_json).
    pub crowding_distance: f64,
}

/// Progress after one generation (generation 0 is the initial population).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GenerationRecord {
    /// Generation index: 0 for the initial population, then 1, 2, ...
    pub generation: usize,
    /// Hypervolume of the population's first front with respect to the run's reference point.
    pub hypervolume: f64,
    /// Number of individuals in the first front.
    pub front_size: usize,
    /// Genomes evaluated so far, this generation included.
    pub evaluations: usize,
}

/// What an NSGA-II run found.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Nsga2Result {
    /// The final population, ordered by front and, within the last admitted front, by
    /// decreasing crowding distance.
    pub population: Vec<Individual>,
    /// The final population's first Pareto front (rank 0), in population order. Distinct
    /// genomes may share objective values.
    pub front: Vec<Individual>,
    /// One record per generation, starting with generation 0.
    pub history: Vec<GenerationRecord>,
    /// The hypervolume reference point used throughout the run.
    pub hv_reference: Vec<f64>,
    /// Genomes evaluated in total.
    pub evaluations: usize,
    /// `true` when the run stopped on a hypervolume stall before `generations`.
    pub stopped_early: bool,
}

impl Nsga2Result {
    /// Objective vectors of [`Nsga2Result::front`], in the same order.
    pub fn front_objectives(&self) -> Vec<Vec<f64>> {
        self.front.iter().map(|i| i.objectives.clone()).collect()
    }

    /// The front's knee point (see [`knee_point`]).
    pub fn knee(&self) -> Option<&Individual> {
        knee_point(&self.front_objectives()).map(|i| &self.front[i])
    }

    /// The front's point with the lowest `objective` within `budgets` (see [`best_within`]).
    ///
    /// # Panics
    /// If an objective index is out of range.
    pub fn best_within(&self, objective: usize, budgets: &[Budget]) -> Option<&Individual> {
        best_within(&self.front_objectives(), objective, budgets).map(|i| &self.front[i])
    }
}

/// Minimises a vector of objectives over the box `bounds` (one `(lo, hi)` per variable) with
/// NSGA-II.
///
/// `evaluate` receives a batch of genomes (the whole initial population, then each
/// generation's offspring) and must return one objective vector per genome, in order, all of
/// the same length; `+inf` marks an infeasible genome, NaN is an error. Its first error stops
/// the run and is returned inside [`SearchError::Objective`]. `observer` is called after every
/// generation (0 included) with that generation's record and the current first front — for
/// progress bars and metrics logs.
///
/// The same `bounds`, `config` and objective values give a bit-identical result.
///
/// # Errors
/// [`SearchError::InvalidConfig`] for bad bounds or settings, and the evaluation errors of
/// [`SearchError`].
pub fn nsga2<E, F, O>(
    bounds: &[(f64, f64)],
    config: &Nsga2Config,
    mut evaluate: F,
    mut observer: O,
) -> Result<Nsga2Result, SearchError<E>>
where
    F: FnMut(&[Vec<f64>]) -> Result<Vec<Vec<f64>>, E>,
    O: FnMut(&GenerationRecord, &[Individual]),
{
    validate_bounds(bounds)?;
    validate_config(bounds, config)?;
    let size = config.population;
    let mut rng = StdRng::seed_from_u64(config.seed);
    let mutation_prob = config.mutation_prob.unwrap_or(1.0 / bounds.len() as f64);
    let mut objective_count = config.hv_reference.as_ref().map(Vec::len);

    let mut genomes = config.initial_genomes.clone();
    while genomes.len() < size {
        genomes.push(
            bounds
                .iter()
                .map(|&(lo, hi)| lo + (hi - lo) * rng.gen::<f64>())
                .collect(),
        );
    }
    let objectives = evaluate_batch(&mut evaluate, &genomes, 0, &mut objective_count)?;
    let hv_reference = match &config.hv_reference {
        Some(r) => r.clone(),
        None => derive_reference(&objectives)?,
    };
    let mut population = survivors(individuals(genomes, objectives), size);
    let mut evaluations = size;
    let mut history = vec![record(0, &population, evaluations, &hv_reference)];
    observe(&mut observer, &history[0], &population);
    let mut stopped_early = false;

    for generation in 1..=config.generations {
        let children = offspring(&population, bounds, config, mutation_prob, &mut rng);
        let objectives =
            evaluate_batch(&mut evaluate, &children, generation, &mut objective_count)?;
        evaluations += children.len();
        population.extend(individuals(children, objectives));
        population = survivors(population, size);
        let entry = record(generation, &population, evaluations, &hv_reference);
        observe(&mut observer, &entry, &population);
        history.push(entry);

        if let Some(window) = config.stall_generations {
            if history.len() > window {
                let earlier = history[history.len() - 1 - window].hypervolume;
                let now = history[history.len() - 1].hypervolume;
                if earlier > 0.0 && now - earlier <= config.stall_tolerance * earlier {
                    stopped_early = true;
                    break;
                }
            }
        }
    }

    let front = population.iter().filter(|i| i.rank == 0).cloned().collect();
    Ok(Nsga2Result {
        population,
        front,
        history,
        hv_reference,
        evaluations,
        stopped_early,
    })
}

/// Rejects settings the algorithm cannot run with, naming the field at fault.
fn validate_config<E>(bounds: &[(f64, f64)], config: &Nsga2Config) -> Result<(), SearchError<E>> {
    let invalid = |field: &str, reason: String| {
        Err(SearchError::InvalidConfig {
            field: field.to_string(),
            reason,
        })
    };
    if config.population < 2 {
        return invalid(
            "population",
            format!("got {}; expected at least 2", config.population),
        );
    }
    for (field, eta) in [
        ("crossover_eta", config.crossover_eta),
        ("mutation_eta", config.mutation_eta),
    ] {
        if !(eta.is_finite() && eta >= 0.0) {
            return invalid(field, format!("got {eta}; expected a finite value >= 0"));
        }
    }
    for (field, prob) in [
        ("crossover_prob", Some(config.crossover_prob)),
        ("mutation_prob", config.mutation_prob),
    ] {
        if let Some(p) = prob {
            if !(0.0..=1.0).contains(&p) {
                return invalid(field, format!("got {p}; expected a probability in [0, 1]"));
            }
        }
    }
    if config.stall_generations == Some(0) {
        return invalid(
            "stall_generations",
            "got 0; expected at least 1 generation, or none to disable early stopping".into(),
        );
    }
    if !(config.stall_tolerance.is_finite() && config.stall_tolerance >= 0.0) {
        return invalid(
            "stall_tolerance",
            format!(
                "got {}; expected a finite value >= 0",
                config.stall_tolerance
            ),
        );
    }
    if let Some(reference) = &config.hv_reference {
        if reference.is_empty() || reference.iter().any(|r| !r.is_finite()) {
            return invalid(
                "hv_reference",
                format!("got {reference:?}; expected one finite value per objective"),
            );
        }
    }
    if config.initial_genomes.len() > config.population {
        return invalid(
            "initial_genomes",
            format!(
                "got {} genomes; expected at most `population` = {}",
                config.initial_genomes.len(),
                config.population
            ),
        );
    }
    for (i, genome) in config.initial_genomes.iter().enumerate() {
        let inside = genome.len() == bounds.len()
            && genome
                .iter()
                .zip(bounds)
                .all(|(&x, &(lo, hi))| lo <= x && x <= hi);
        if !inside {
            return invalid(
                &format!("initial_genomes[{i}]"),
                format!(
                    "got {genome:?}; expected {} values within the bounds {bounds:?}",
                    bounds.len()
                ),
            );
        }
    }
    Ok(())
}

/// Calls the objective function on one batch and checks what it returned.
///
/// `objective_count` fixes the expected vector length: from `hv_reference` when set, else from
/// the first vector ever returned.
fn evaluate_batch<E, F>(
    evaluate: &mut F,
    genomes: &[Vec<f64>],
    round: usize,
    objective_count: &mut Option<usize>,
) -> Result<Vec<Vec<f64>>, SearchError<E>>
where
    F: FnMut(&[Vec<f64>]) -> Result<Vec<Vec<f64>>, E>,
{
    let objectives =
        evaluate(genomes).map_err(|source| SearchError::Objective { round, source })?;
    if objectives.len() != genomes.len() {
        return Err(SearchError::BatchSize {
            round,
            expected: genomes.len(),
            got: objectives.len(),
        });
    }
    for (genome, values) in objectives.iter().enumerate() {
        let expected = *objective_count.get_or_insert(values.len().max(1));
        if values.len() != expected {
            return Err(SearchError::ObjectiveCount {
                round,
                genome,
                expected,
                got: values.len(),
            });
        }
        if let Some(objective) = values.iter().position(|v| v.is_nan()) {
            return Err(SearchError::NotANumber {
                round,
                genome,
                objective,
            });
        }
    }
    Ok(objectives)
}

/// Reference point from the initial population (see [`Nsga2Config::hv_reference`]).
fn derive_reference<E>(objectives: &[Vec<f64>]) -> Result<Vec<f64>, SearchError<E>> {
    (0..objectives[0].len())
        .map(|j| {
            let finite = objectives.iter().map(|o| o[j]).filter(|v| v.is_finite());
            let (lo, hi) = finite.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
                (lo.min(v), hi.max(v))
            });
            if hi < lo {
                return Err(SearchError::InvalidConfig {
                    field: "hv_reference".into(),
                    reason: format!(
                        "objective {j} is infinite for the whole initial population, so no \
                         reference point can be derived; set `hv_reference` explicitly"
                    ),
                });
            }
            let range = if hi > lo { hi - lo } else { hi.abs().max(1.0) };
            Ok(hi + 0.1 * range)
        })
        .collect()
}

fn individuals(genomes: Vec<Vec<f64>>, objectives: Vec<Vec<f64>>) -> Vec<Individual> {
    genomes
        .into_iter()
        .zip(objectives)
        .map(|(genome, objectives)| Individual {
            genome,
            objectives,
            rank: 0,
            crowding_distance: 0.0,
        })
        .collect()
}

/// Elitist survival: whole fronts while they fit, then the last front's most isolated points
/// by crowding distance. Sets `rank` and `crowding_distance` of the survivors.
fn survivors(mut pool: Vec<Individual>, size: usize) -> Vec<Individual> {
    let points: Vec<Vec<f64>> = pool.iter().map(|i| i.objectives.clone()).collect();
    let mut chosen: Vec<(usize, usize, f64)> = Vec::with_capacity(size);
    for (rank, front) in fast_non_dominated_sort(&points).into_iter().enumerate() {
        let crowding = crowding_of(&points, &front);
        let mut members: Vec<(usize, usize, f64)> = front
            .iter()
            .zip(crowding)
            .map(|(&i, d)| (i, rank, d))
            .collect();
        let room = size - chosen.len();
        if members.len() > room {
            // Stable sort: equal distances keep index order, so the choice is deterministic.
            members.sort_by(|a, b| b.2.total_cmp(&a.2));
            members.truncate(room);
        }
        chosen.extend(members);
        if chosen.len() == size {
            break;
        }
    }
    chosen
        .into_iter()
        .map(|(i, rank, crowding_distance)| {
            let mut individual = std::mem::replace(
                &mut pool[i],
                Individual {
                    genome: Vec::new(),
                    objectives: Vec::new(),
                    rank: 0,
                    crowding_distance: 0.0,
                },
            );
            individual.rank = rank;
            individual.crowding_distance = crowding_distance;
            individual
        })
        .collect()
}

fn record(
    generation: usize,
    population: &[Individual],
    evaluations: usize,
    reference: &[f64],
) -> GenerationRecord {
    let front: Vec<Vec<f64>> = population
        .iter()
        .filter(|i| i.rank == 0)
        .map(|i| i.objectives.clone())
        .collect();
    GenerationRecord {
        generation,
        hypervolume: hypervolume(&front, reference),
        front_size: front.len(),
        evaluations,
    }
}

fn observe<O>(observer: &mut O, entry: &GenerationRecord, population: &[Individual])
where
    O: FnMut(&GenerationRecord, &[Individual]),
{
    let front: Vec<Individual> = population.iter().filter(|i| i.rank == 0).cloned().collect();
    observer(entry, &front);
}

/// Binary tournament on the crowded-comparison order: lower rank, then larger crowding
/// distance, then a coin flip.
fn tournament(population: &[Individual], rng: &mut StdRng) -> usize {
    let a = rng.gen_range(0..population.len());
    let mut b = rng.gen_range(0..population.len() - 1);
    if b >= a {
        b += 1;
    }
    let (x, y) = (&population[a], &population[b]);
    match x
        .rank
        .cmp(&y.rank)
        .then(y.crowding_distance.total_cmp(&x.crowding_distance))
    {
        std::cmp::Ordering::Less => a,
        std::cmp::Ordering::Greater => b,
        std::cmp::Ordering::Equal => {
            if rng.gen_bool(0.5) {
                a
            } else {
                b
            }
        }
    }
}

/// Rounds of mating tried for children that are new genomes before duplicates are let in
/// (pymoo's `n_max_iterations` for the same purpose).
const MATING_ROUNDS: usize = 100;

/// λ = μ children: tournament-selected parent pairs, SBX, then polynomial mutation. As in
/// pymoo's default, a child equal to a member of the population or to an earlier child is
/// dropped and mating repeats (up to [`MATING_ROUNDS`] times the population's worth), so no
/// evaluation is spent on a genome already present and copies do not crowd out the front.
fn offspring(
    population: &[Individual],
    bounds: &[(f64, f64)],
    config: &Nsga2Config,
    mutation_prob: f64,
    rng: &mut StdRng,
) -> Vec<Vec<f64>> {
    let n = population.len();
    let key = |g: &[f64]| g.iter().map(|x| x.to_bits()).collect::<Vec<u64>>();
    let mut seen: std::collections::HashSet<Vec<u64>> =
        population.iter().map(|i| key(&i.genome)).collect();
    let mut children = Vec::with_capacity(n + 1);
    let mut copies = Vec::new();
    for _ in 0..MATING_ROUNDS * n.div_ceil(2) {
        if children.len() >= n {
            break;
        }
        let first = &population[tournament(population, rng)].genome;
        let second = &population[tournament(population, rng)].genome;
        let (mut c1, mut c2) = (first.clone(), second.clone());
        if rng.gen::<f64>() < config.crossover_prob {
            sbx(&mut c1, &mut c2, bounds, config.crossover_eta, rng);
        }
        polynomial_mutation(&mut c1, bounds, config.mutation_eta, mutation_prob, rng);
        polynomial_mutation(&mut c2, bounds, config.mutation_eta, mutation_prob, rng);
        for c in [c1, c2] {
            match seen.insert(key(&c)) {
                true => children.push(c),
                false => copies.push(c),
            }
        }
    }
    // A search space too small for n new genomes: fill up with copies.
    let short = n.saturating_sub(children.len());
    children.extend(copies.into_iter().take(short));
    children.truncate(n);
    children
}

/// Simulated binary crossover with bounds (Deb & Agrawal 1995, as in nsga2-v1.1): each variable
/// is crossed with probability 0.5; the spread factor's distribution is cut at the bounds.
fn sbx(c1: &mut [f64], c2: &mut [f64], bounds: &[(f64, f64)], eta: f64, rng: &mut StdRng) {
    let exponent = 1.0 / (eta + 1.0);
    for i in 0..c1.len() {
        if rng.gen::<f64>() > 0.5 || (c1[i] - c2[i]).abs() <= 1e-14 {
            continue;
        }
        let (lo, hi) = bounds[i];
        let (y1, y2) = (c1[i].min(c2[i]), c1[i].max(c2[i]));
        let u: f64 = rng.gen();
        let spread = |beta: f64| {
            let alpha = 2.0 - beta.powf(-(eta + 1.0));
            if u <= 1.0 / alpha {
                (u * alpha).powf(exponent)
            } else {
                (1.0 / (2.0 - u * alpha)).powf(exponent)
            }
        };
        let beta_low = spread(1.0 + 2.0 * (y1 - lo) / (y2 - y1));
        let beta_high = spread(1.0 + 2.0 * (hi - y2) / (y2 - y1));
        let low = (0.5 * ((y1 + y2) - beta_low * (y2 - y1))).clamp(lo, hi);
        let high = (0.5 * ((y1 + y2) + beta_high * (y2 - y1))).clamp(lo, hi);
        if rng.gen::<f64>() <= 0.5 {
            c1[i] = high;
            c2[i] = low;
        } else {
            c1[i] = low;
            c2[i] = high;
        }
    }
}

/// Bounded polynomial mutation (Deb & Goyal 1996, as in nsga2-v1.1): the perturbation's
/// distribution is scaled so a child never leaves `[lo, hi]`.
fn polynomial_mutation(
    genome: &mut [f64],
    bounds: &[(f64, f64)],
    eta: f64,
    prob: f64,
    rng: &mut StdRng,
) {
    let exponent = 1.0 / (eta + 1.0);
    for (x, &(lo, hi)) in genome.iter_mut().zip(bounds) {
        if rng.gen::<f64>() >= prob || hi <= lo {
            continue;
        }
        let range = hi - lo;
        let (delta_low, delta_high) = ((*x - lo) / range, (hi - *x) / range);
        let u: f64 = rng.gen();
        let delta = if u <= 0.5 {
            let v = 2.0 * u + (1.0 - 2.0 * u) * (1.0 - delta_low).powf(eta + 1.0);
            v.powf(exponent) - 1.0
        } else {
            let v = 2.0 * (1.0 - u) + 2.0 * (u - 0.5) * (1.0 - delta_high).powf(eta + 1.0);
            1.0 - v.powf(exponent)
        };
        *x = (*x + delta * range).clamp(lo, hi);
    }
}

#[cfg(test)]
mod tests;
