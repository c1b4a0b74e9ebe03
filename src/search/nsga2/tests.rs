//! Tests of NSGA-II: the ZDT and DTLZ2 benchmarks against their true fronts, determinism,
//! observers and early stopping, error reporting, and the variation operators.

use super::*;
use crate::search::test_support::{failing_on, scoring, ModelError};
use std::convert::Infallible;
use std::f64::consts::PI;

/// Default settings with this population and number of generations.
fn sized(population: usize, generations: usize) -> Nsga2Config {
    Nsga2Config {
        population,
        generations,
        ..Nsga2Config::default()
    }
}

/// ZDT problems (Zitzler, Deb & Thiele 2000) on 30 variables in [0, 1]; `shape` maps
/// (f1, g) to h so that f2 = g·h.
fn zdt(x: &[f64], shape: fn(f64, f64) -> f64) -> Vec<f64> {
    let f1 = x[0];
    let g = 1.0 + 9.0 * x[1..].iter().sum::<f64>() / (x.len() - 1) as f64;
    vec![f1, g * shape(f1, g)]
}
fn zdt1(f1: f64, g: f64) -> f64 {
    1.0 - (f1 / g).sqrt()
}
fn zdt2(f1: f64, g: f64) -> f64 {
    1.0 - (f1 / g).powi(2)
}
fn zdt3(f1: f64, g: f64) -> f64 {
    1.0 - (f1 / g).sqrt() - (f1 / g) * (10.0 * PI * f1).sin()
}

/// Hypervolume of the true front (g = 1), sampled at 100 001 points of f1 ∈ [0, 1]; the
/// dominated samples (ZDT3's gaps) add nothing to the hypervolume.
fn analytic_hypervolume(shape: fn(f64, f64) -> f64, reference: &[f64]) -> f64 {
    let n = 100_000;
    let front: Vec<Vec<f64>> = (0..=n)
        .map(|i| {
            let f1 = i as f64 / n as f64;
            vec![f1, shape(f1, 1.0)]
        })
        .collect();
    hypervolume(&front, reference)
}

fn run_zdt(shape: fn(f64, f64) -> f64, config: &Nsga2Config) -> Nsga2Result {
    let bounds = vec![(0.0, 1.0); 30];
    let evaluate = |batch: &[Vec<f64>]| -> Result<_, Infallible> {
        Ok(batch.iter().map(|x| zdt(x, shape)).collect())
    };
    nsga2(&bounds, config, evaluate, |_, _| {}).unwrap()
}

fn zdt_config(seed: u64) -> Nsga2Config {
    Nsga2Config {
        seed,
        hv_reference: Some(vec![1.1, 1.1]),
        ..sized(100, 250)
    }
}

/// Seeds every benchmark is run with.
const SEEDS: std::ops::Range<u64> = 0..5;

/// At pymoo's budget for ZDT (population 100, 250 generations), every seed reaches `bar` of
/// the true front's hypervolume. The bars sit just under what pymoo 0.6's NSGA-II reaches on
/// seeds 0–4 (scripts/reference/pymoo_zdt.py): ZDT1 0.9920–0.9923, ZDT2 0.9861–0.9876, ZDT3
/// 0.9967–0.9970. No 100-point set does much better on ZDT2: evenly spread points on its
/// concave front reach about 0.992.
fn assert_reaches(name: &str, shape: fn(f64, f64) -> f64, closed_form: Option<f64>, bar: f64) {
    let reference = [1.1, 1.1];
    let truth = analytic_hypervolume(shape, &reference);
    if let Some(exact) = closed_form {
        assert!(
            (truth - exact).abs() < 1e-4,
            "{name}: sampled {truth} vs {exact}"
        );
    }
    for seed in SEEDS {
        let result = run_zdt(shape, &zdt_config(seed));
        let found = hypervolume(&result.front_objectives(), &reference);
        let ratio = found / truth;
        eprintln!("{name} seed {seed}: HV {found:.6} / analytic {truth:.6} = {ratio:.4}");
        assert!(ratio >= bar, "{name} seed {seed}: HV ratio {ratio} < {bar}");
        assert_eq!(result.history.last().unwrap().hypervolume, found);
    }
}

#[test]
fn zdt1_reaches_pymoos_hypervolume_on_every_seed() {
    // ∫0^1 (1.1 - (1 - √f1)) df1 + 0.1·1.1 = 0.1 + 2/3 + 0.11.
    assert_reaches("ZDT1", zdt1, Some(0.11 + 0.1 + 2.0 / 3.0), 0.990);
}

#[test]
fn zdt2_reaches_pymoos_hypervolume_on_every_seed() {
    // ∫0^1 (1.1 - (1 - f1²)) df1 + 0.1·1.1 = 0.1 + 1/3 + 0.11.
    assert_reaches("ZDT2", zdt2, Some(0.11 + 0.1 + 1.0 / 3.0), 0.985);
}

#[test]
fn zdt3_reaches_pymoos_hypervolume_on_every_seed() {
    assert_reaches("ZDT3", zdt3, None, 0.995);
}

/// Children are new genomes: with duplicates dropped, no generation re-evaluates a genome of
/// the population or evaluates one twice.
#[test]
fn offspring_are_never_copies_of_the_population_or_each_other() {
    let bounds = vec![(0.0, 1.0); 3];
    let mut seen = std::collections::HashSet::new();
    let evaluate = |batch: &[Vec<f64>]| -> Result<_, Infallible> {
        for g in batch {
            let key: Vec<u64> = g.iter().map(|x| x.to_bits()).collect();
            assert!(seen.insert(key), "genome {g:?} evaluated twice");
        }
        Ok(batch
            .iter()
            .map(|x| vec![x[0], 1.0 - x[0] + x[1] + x[2]])
            .collect())
    };
    let config = Nsga2Config {
        // Few variables and a low crossover rate: copies of parents are common.
        crossover_prob: 0.2,
        ..sized(20, 30)
    };
    nsga2(&bounds, &config, evaluate, |_, _| {}).unwrap();
}

#[test]
fn dtlz2_three_objectives_reaches_the_sphere() {
    // DTLZ2 (Deb et al. 2002), 3 objectives, 12 variables: the true front is the unit
    // sphere's positive octant, whose hypervolume to (1.1, 1.1, 1.1) is 1.1³ − π/6.
    fn dtlz2(x: &[f64]) -> Vec<f64> {
        let g: f64 = x[2..].iter().map(|v| (v - 0.5).powi(2)).sum();
        let (a, b) = (x[0] * PI / 2.0, x[1] * PI / 2.0);
        vec![
            (1.0 + g) * a.cos() * b.cos(),
            (1.0 + g) * a.cos() * b.sin(),
            (1.0 + g) * a.sin(),
        ]
    }
    let config = Nsga2Config {
        seed: 3,
        hv_reference: Some(vec![1.1; 3]),
        ..sized(100, 150)
    };
    let result = nsga2(
        &[(0.0, 1.0); 12],
        &config,
        scoring(|batch| batch.iter().map(|x| dtlz2(x)).collect()),
        |_, _| {},
    )
    .unwrap();
    let radii: Vec<f64> = result
        .front_objectives()
        .iter()
        .map(|p| p.iter().map(|v| v * v).sum::<f64>().sqrt())
        .collect();
    let mean_radius = radii.iter().sum::<f64>() / radii.len() as f64;
    let max_radius = radii.iter().copied().fold(0.0, f64::max);
    let ratio = result.history.last().unwrap().hypervolume / (1.331 - PI / 6.0);
    eprintln!(
        "DTLZ2: HV ratio {ratio:.4}, {} front points, mean radius {mean_radius:.4}, max {max_radius:.4}",
        radii.len()
    );
    // Converged: the front points lie on the sphere (g ≈ 0).
    assert!(mean_radius < 1.02 && max_radius < 1.1);
    // 100 points cannot fill the continuous front's volume, and crowding distance spreads
    // them unevenly in 3-D: seeds 0–5 measure 0.85–0.87 of the analytic value.
    assert!(ratio >= 0.83, "DTLZ2 HV ratio {ratio}");
}

#[test]
fn same_seed_same_result_bit_for_bit() {
    let config = Nsga2Config {
        seed: 42,
        ..sized(20, 15)
    };
    let a = run_zdt(zdt1, &config);
    let b = run_zdt(zdt1, &config);
    let bits = |r: &Nsga2Result| {
        r.population
            .iter()
            .flat_map(|i| i.genome.iter().chain(&i.objectives).map(|v| v.to_bits()))
            .collect::<Vec<u64>>()
    };
    assert_eq!(bits(&a), bits(&b));
    assert_eq!(a, b);
    let c = run_zdt(zdt1, &Nsga2Config { seed: 43, ..config });
    assert_ne!(bits(&a), bits(&c));
}

#[test]
fn history_observer_and_counts_agree() {
    let config = sized(11, 6); // odd population: the last SBX pair loses a child
    let mut batches = Vec::new();
    let mut observed = Vec::new();
    let result = nsga2(
        &[(0.0, 1.0); 4],
        &config,
        |batch: &[Vec<f64>]| -> Result<_, Infallible> {
            batches.push(batch.len());
            Ok(batch.iter().map(|x| zdt(x, zdt1)).collect())
        },
        |record, front| observed.push((record.clone(), front.len())),
    )
    .unwrap();
    assert_eq!(batches, vec![11; 7]);
    assert_eq!(result.evaluations, 77);
    assert_eq!(result.population.len(), 11);
    assert!(!result.stopped_early);
    let generations: Vec<usize> = result.history.iter().map(|r| r.generation).collect();
    assert_eq!(generations, (0..=6).collect::<Vec<_>>());
    for (k, (record, front_len)) in observed.iter().enumerate() {
        assert_eq!(record, &result.history[k]);
        assert_eq!(record.front_size, *front_len);
        assert_eq!(record.evaluations, 11 * (k + 1));
    }
    assert_eq!(result.front.len(), result.history[6].front_size);
    assert!(result.front.iter().all(|i| i.rank == 0));
    // Derived reference: max + 10% of the range over the initial population.
    assert_eq!(result.hv_reference.len(), 2);
    assert!(result.history.iter().all(|r| r.hypervolume > 0.0));
    // Genomes stay inside the bounds.
    assert!(result
        .population
        .iter()
        .all(|i| i.genome.iter().all(|&x| (0.0..=1.0).contains(&x))));
}

#[test]
fn stall_stops_after_the_window() {
    // Constant objectives: the hypervolume never moves, so the run stops at generation 5.
    let config = Nsga2Config {
        stall_generations: Some(5),
        ..sized(8, 100)
    };
    let result = nsga2(
        &[(0.0, 1.0); 2],
        &config,
        scoring(|batch| vec![vec![0.0, 0.0]; batch.len()]),
        |_, _| {},
    )
    .unwrap();
    assert!(result.stopped_early);
    assert_eq!(result.history.len(), 6);
    assert_eq!(result.evaluations, 48);
    // Range 0 → reference = max + max(|max|, 1)/10 = (0.1, 0.1): HV = 0.01.
    assert_eq!(result.hv_reference, vec![0.1, 0.1]);
    assert!((result.history[5].hypervolume - 0.01).abs() < 1e-15);
}

#[test]
fn initial_genomes_come_first() {
    let seeds = vec![vec![1.0, 0.0, 0.0], vec![0.0, 1.0, 0.0]];
    let config = Nsga2Config {
        initial_genomes: seeds.clone(),
        ..sized(6, 1)
    };
    let mut first = None;
    nsga2(
        &[(0.0, 2.0); 3],
        &config,
        |batch: &[Vec<f64>]| -> Result<_, Infallible> {
            first.get_or_insert_with(|| batch.to_vec());
            Ok(batch.iter().map(|x| vec![x[0], x[1] + x[2]]).collect())
        },
        |_, _| {},
    )
    .unwrap();
    let first = first.unwrap();
    assert_eq!(&first[..2], &seeds[..]);
    assert!(first[2..]
        .iter()
        .all(|g| g.iter().all(|&x| (0.0..=2.0).contains(&x))));
}

#[test]
fn objective_errors_propagate_with_their_round() {
    let config = sized(4, 10);
    let fails = failing_on(3, |batch| batch.to_vec());
    let err = nsga2(&[(0.0, 1.0); 2], &config, fails, |_, _| {}).unwrap_err();
    let source = ModelError(3);
    assert_eq!(err, SearchError::Objective { round: 2, source });
    assert!(std::error::Error::source(&err).is_some());
    assert!(err.to_string().contains("round 2"));
}

#[test]
fn malformed_objective_results_are_errors() {
    type Objectives = fn(&[Vec<f64>]) -> Vec<Vec<f64>>;
    let error_of = |config: &Nsga2Config, objectives: Objectives| {
        let run = nsga2(&[(0.0, 1.0); 2], config, scoring(objectives), |_, _| {});
        format!("{:?}", run.unwrap_err())
    };
    let config = sized(4, 2);
    let cases: [(Objectives, &str); 3] = [
        (
            |batch| vec![vec![0.0]; batch.len() - 1],
            "BatchSize { round: 0, expected: 4, got: 3 }",
        ),
        (
            |batch| (0..batch.len()).map(|i| vec![0.0; 1 + i % 2]).collect(),
            "ObjectiveCount { round: 0, genome: 1, expected: 1, got: 2 }",
        ),
        (
            |batch| vec![vec![0.0, f64::NAN]; batch.len()],
            "NotANumber { round: 0, genome: 0, objective: 1 }",
        ),
    ];
    for (objectives, want) in cases {
        assert_eq!(error_of(&config, objectives), want);
    }
    // Two objectives against a three-point hypervolume reference.
    let wrong_reference = Nsga2Config {
        hv_reference: Some(vec![1.0; 3]),
        ..config.clone()
    };
    let mismatch = error_of(&wrong_reference, |batch| vec![vec![0.0, 0.0]; batch.len()]);
    assert!(
        mismatch.starts_with("ObjectiveCount {") && mismatch.ends_with("expected: 3, got: 2 }"),
        "{mismatch}"
    );
}

#[test]
fn invalid_settings_name_their_field() {
    let ok = |batch: &[Vec<f64>]| -> Result<_, Infallible> { Ok(vec![vec![0.0]; batch.len()]) };
    let field =
        |bounds: &[(f64, f64)], config: &Nsga2Config| match nsga2(bounds, config, ok, |_, _| {}) {
            Err(SearchError::InvalidConfig { field, .. }) => field,
            other => panic!("expected InvalidConfig, got {other:?}"),
        };
    let base = Nsga2Config::default();
    assert_eq!(field(&[], &base), "bounds");
    assert_eq!(field(&[(0.0, 1.0), (2.0, 1.0)], &base), "bounds[1]");
    let bounds = [(0.0, 1.0)];
    let cases = [
        (
            Nsga2Config {
                population: 1,
                ..base.clone()
            },
            "population",
        ),
        (
            Nsga2Config {
                crossover_prob: 1.5,
                ..base.clone()
            },
            "crossover_prob",
        ),
        (
            Nsga2Config {
                mutation_eta: -1.0,
                ..base.clone()
            },
            "mutation_eta",
        ),
        (
            Nsga2Config {
                stall_generations: Some(0),
                ..base.clone()
            },
            "stall_generations",
        ),
        (
            Nsga2Config {
                hv_reference: Some(vec![f64::INFINITY]),
                ..base.clone()
            },
            "hv_reference",
        ),
        (
            Nsga2Config {
                initial_genomes: vec![vec![0.5], vec![1.5]],
                ..base.clone()
            },
            "initial_genomes[1]",
        ),
    ];
    for (config, expected) in cases {
        assert_eq!(field(&bounds, &config), expected);
    }
}

#[test]
fn operators_respect_bounds_and_fixed_variables() {
    let bounds = [(0.0, 1.0), (-2.0, -1.0), (3.0, 3.0)];
    let mut rng = StdRng::seed_from_u64(1);
    for _ in 0..2000 {
        let mut a = vec![rng.gen::<f64>(), -1.0 - rng.gen::<f64>(), 3.0];
        let mut b = vec![rng.gen::<f64>(), -1.0 - rng.gen::<f64>(), 3.0];
        sbx(&mut a, &mut b, &bounds, 15.0, &mut rng);
        polynomial_mutation(&mut a, &bounds, 20.0, 1.0, &mut rng);
        for (x, &(lo, hi)) in a.iter().chain(&b).zip(bounds.iter().cycle()) {
            assert!(lo <= *x && *x <= hi, "{x} outside [{lo}, {hi}]");
        }
    }
}

#[test]
fn sbx_children_are_symmetric_about_the_parents_mean() {
    // Away from the bounds, SBX keeps the parents' mean: c1 + c2 = p1 + p2.
    let bounds = [(-100.0, 100.0); 5];
    let mut rng = StdRng::seed_from_u64(9);
    let p1 = vec![0.1, 0.2, 0.3, 0.4, 0.5];
    let p2 = vec![0.5, -0.1, 0.9, 0.0, 0.3];
    for _ in 0..100 {
        let (mut c1, mut c2) = (p1.clone(), p2.clone());
        sbx(&mut c1, &mut c2, &bounds, 15.0, &mut rng);
        for i in 0..5 {
            assert!((c1[i] + c2[i] - p1[i] - p2[i]).abs() < 1e-9);
        }
    }
}
