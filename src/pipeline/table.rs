//! The test table of `bitsvf run` (stage 7): every configuration — base, best single expert,
//! the mixture in both forms, every dispatch strategy — on every source's test split.

use crate::adapt::dispatch::{CemFit, Library, Mixer, Strategy, Thresholds};
use crate::adapt::mixture_search::SearchReport;
use crate::dist::{map, Comm};
use crate::engine::model::Model;
use crate::engine::tokenizer::Tokenizer;
use crate::error::{Error, Result};
use crate::eval::answer;
use crate::pipeline::config::RunConfig;
use crate::pipeline::run::Trained;
use crate::pipeline::stages::Event;
use crate::svf::base::Base;
use crate::svf::expert::Expert;
use crate::tasks::{DataSource, Item};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Test accuracy per domain of every compared configuration.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TestTable {
    /// Items per domain, split and seed.
    pub n: usize,
    /// Seed of the item draw.
    pub seed: u64,
    /// Column names, in order.
    pub columns: Vec<String>,
    /// domain → column → accuracy.
    pub accuracy: BTreeMap<String, BTreeMap<String, f64>>,
    /// The single expert chosen per domain (best on validation items).
    pub best_expert: BTreeMap<String, String>,
    /// Share of test prompts routed to the right expert (or base for uncovered domains), per
    /// per-prompt strategy.
    pub routing: BTreeMap<String, f64>,
}

impl TestTable {
    /// Mean accuracy of `column` over the domains that have it.
    pub fn mean(&self, column: &str) -> Option<f64> {
        let v: Vec<f64> = (self.accuracy.values())
            .filter_map(|r| r.get(column))
            .copied()
            .collect();
        (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64)
    }
}

/// One column of the test table summed up against the base and the oracle.
#[derive(Debug, Clone, PartialEq)]
pub struct ColumnSummary {
    /// The column.
    pub column: String,
    /// Mean accuracy over the expert domains.
    pub expert_mean: f64,
    /// Mean accuracy over all domains.
    pub all_mean: f64,
    /// Share of the oracle's gain over the base on the expert domains that this column
    /// keeps (the oracle: the best single expert per domain); `None` when the oracle gains
    /// nothing.
    pub oracle_share: Option<f64>,
    /// The largest loss against the base on any domain (≥ 0), and that domain.
    pub worst_loss: (f64, String),
}

impl TestTable {
    /// Mean accuracy of `column` over `domains`.
    pub fn mean_over(&self, column: &str, domains: &[String]) -> f64 {
        let v: Vec<f64> = (self.accuracy.iter())
            .filter(|(d, _)| domains.contains(d))
            .filter_map(|(_, r)| r.get(column).copied())
            .collect();
        v.iter().sum::<f64>() / v.len().max(1) as f64
    }

    /// Every column but the base against the base and the oracle, the expert domains being
    /// `expert_domains`.
    pub fn summary(&self, expert_domains: &[String]) -> Vec<ColumnSummary> {
        let all: Vec<String> = self.accuracy.keys().cloned().collect();
        let mean_over = |c: &str, only_experts: bool| -> f64 {
            self.mean_over(c, if only_experts { expert_domains } else { &all })
        };
        let base = mean_over(columns::BASE, true);
        let oracle_gain = mean_over(columns::BEST_EXPERT, true) - base;
        (self.columns.iter().filter(|c| *c != columns::BASE))
            .map(|c| {
                let expert_mean = mean_over(c, true);
                let worst_loss = (self.accuracy.iter())
                    .filter_map(|(d, r)| Some((r.get(columns::BASE)? - r.get(c)?, d.clone())))
                    .fold((0.0, String::new()), |w, x| if x.0 > w.0 { x } else { w });
                ColumnSummary {
                    column: c.clone(),
                    expert_mean,
                    all_mean: mean_over(c, false),
                    oracle_share: (oracle_gain > 0.0).then(|| (expert_mean - base) / oracle_gain),
                    worst_loss,
                }
            })
            .collect()
    }
}

/// The column names of the test table.
pub mod columns {
    /// The packed base model.
    pub const BASE: &str = "base";
    /// The single expert that is best on the domain's validation items.
    pub const BEST_EXPERT: &str = "best single expert";
    /// The chosen mixture, full SVF.
    pub const MIXTURE: &str = "mixture α* (full SVF)";
    /// The chosen mixture as deployed (hybrid, k directions).
    pub const MIXTURE_DEPLOYED: &str = "mixture α* (deployed)";
}

/// Greedy accuracy of `model` on `items` of source `d`.
pub(crate) fn accuracy(
    model: &Model,
    tok: &dyn Tokenizer,
    items: &[Item],
    d: &DataSource,
) -> Result<f64> {
    let refs: Vec<&Item> = items.iter().collect();
    Ok(crate::eval::score_items(model, tok, &refs, |e, c| d.verify(e, c), |_| {})?.accuracy)
}

/// The test table: base, every expert on its covered domains, the mixture in both forms and
/// every dispatch strategy, on every domain.
#[allow(clippy::too_many_arguments)]
pub(crate) fn evaluate_all(
    base: &Base,
    tok: &dyn Tokenizer,
    cfg: &RunConfig,
    sources: &[DataSource],
    experts: &[Trained],
    pool: &[Expert],
    (classifier, thresholds): (&Expert, Thresholds),
    searched: Option<&SearchReport>,
    cem: &BTreeMap<String, CemFit>,
    comm: &dyn Comm,
    ev: &mut dyn FnMut(Event),
) -> Result<TestTable> {
    use columns::*;
    let all: Vec<Expert> = experts.iter().map(|(_, e)| e.clone()).collect();
    // One mixer, over the experts that gained (the mixture and CEM columns): the library's.
    let mixes = !pool.is_empty();
    let mixer = Mixer::new(base, if mixes { pool.to_vec() } else { all.clone() })?;
    let mut lib = Library::with_mixer(base, all, Some(classifier), mixer)?;
    lib.thresholds = thresholds;
    // The handed-off mixture, if the selection split kept one.
    let chosen = searched.and_then(|s| s.selection.as_ref()?.chosen());
    let mut deployer = match chosen {
        Some(_) => Some(crate::adapt::mixture_search::Deployer::new(base, pool)?),
        None => None,
    };
    let mut columns = vec![BASE.to_string(), BEST_EXPERT.to_string()];
    if chosen.is_some() {
        columns.push(MIXTURE.into());
        columns.push(MIXTURE_DEPLOYED.into());
    }
    for s in [Strategy::Prompt, Strategy::Classifier, Strategy::Cem] {
        columns.push(format!("dispatch: {}", s.name()));
    }
    let seed = cfg.seed + 4;
    // One row per source (each by the rank it falls to, under MPI): its accuracies, its best
    // expert, and per routing strategy (right picks, prompts).
    type Row = (
        BTreeMap<String, f64>,
        Option<String>,
        Vec<(String, usize, usize)>,
    );
    let rows = map(comm, "the test table", sources.len(), |di| -> Result<Row> {
        let d = &sources[di];
        ev(Event::Progress(
            di,
            sources.len(),
            format!("testing on {}", d.name()),
        ));
        let name = d.name();
        let items = d.test(cfg.test_n, seed)?;
        if items.is_empty() {
            return Err(Error::Input(format!("`{name}` has no test items")));
        }
        let mut row = BTreeMap::new();
        let mut best_expert = None;
        let mut routed = Vec::new();
        row.insert(BASE.to_string(), accuracy(&lib.base, tok, &items, d)?);
        let owner = experts.iter().position(|(e, _)| e.domains.contains(&name));
        // The best single expert is chosen on validation items (greedy exact match by a
        // teacher-forced pass), then tested: choosing it on the test items would flatter it.
        let val = d.validation(cfg.search_val_n.max(50), cfg.seed + 5)?;
        let mut best = (f64::NEG_INFINITY, 0);
        for i in 0..experts.len() {
            let a = crate::eval::share(&crate::eval::exact_matches(&lib.models[i], tok, &val)?);
            if a > best.0 {
                best = (a, i);
            }
        }
        if !experts.is_empty() {
            let a = accuracy(&lib.models[best.1], tok, &items, d)?;
            row.insert(BEST_EXPERT.to_string(), a);
            best_expert = Some(experts[best.1].0.name.clone());
        }
        if let Some(s) = chosen {
            let m = lib.mixer.model(&s.alpha)?;
            row.insert(MIXTURE.to_string(), accuracy(m, tok, &items, d)?);
            let dep = deployer.as_mut().expect("a mixture implies a deployer");
            let (m, _) = dep.deploy(&s.alpha, s.rank)?;
            row.insert(MIXTURE_DEPLOYED.to_string(), accuracy(m, tok, &items, d)?);
        }
        for strategy in [Strategy::Prompt, Strategy::Classifier] {
            let (mut correct, mut right) = (0, 0);
            for it in &items {
                let (m, pick) = lib.route(tok, strategy, &it.prompt, None)?;
                correct += usize::from(d.verify(&it.answer, &answer(m, tok, &it.prompt)?));
                right += usize::from(pick == owner);
            }
            routed.push((strategy.name().to_string(), right, items.len()));
            row.insert(
                format!("dispatch: {}", strategy.name()),
                correct as f64 / items.len().max(1) as f64,
            );
        }
        if let (true, Some(fit)) = (mixes, cem.get(&name)) {
            // CEM's mixture where it beat the base on held-out shots, the base elsewhere.
            let a = if fit.keeps_base {
                row[BASE]
            } else {
                accuracy(lib.mixer.model(&fit.alpha)?, tok, &items, d)?
            };
            row.insert("dispatch: cem".to_string(), a);
        }
        Ok((row, best_expert, routed))
    })?;
    let mut table = BTreeMap::new();
    let mut best_expert = BTreeMap::new();
    let mut routed: BTreeMap<String, (usize, usize)> = BTreeMap::new();
    for (d, (row, best, picks)) in sources.iter().zip(rows) {
        if let Some(b) = best {
            best_expert.insert(d.name(), b);
        }
        for (strategy, right, n) in picks {
            let r = routed.entry(strategy).or_default();
            r.0 += right;
            r.1 += n;
        }
        table.insert(d.name(), row);
    }
    Ok(TestTable {
        n: cfg.test_n,
        seed,
        columns,
        accuracy: table,
        best_expert,
        routing: routed
            .into_iter()
            .map(|(k, (a, b))| (k, a as f64 / b.max(1) as f64))
            .collect(),
    })
}
