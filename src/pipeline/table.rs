//! The test table of `bitsvf run` (stage 7): every configuration — base, best single expert,
//! the mixture in both forms, every dispatch strategy — on every source's test split.

use crate::adapt::dispatch::{Library, Mixer, Strategy};
use crate::adapt::mixture_search::SearchReport;
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
    classifier: &Expert,
    searched: Option<&SearchReport>,
    cem_alpha: &BTreeMap<String, Vec<f64>>,
    ev: &mut dyn FnMut(Event),
) -> Result<TestTable> {
    use columns::*;
    let all: Vec<Expert> = experts.iter().map(|(_, e)| e.clone()).collect();
    // One mixer, over the experts that gained (the mixture and CEM columns): the library's.
    let mixes = !pool.is_empty();
    let mixer = Mixer::new(base, if mixes { pool.to_vec() } else { all.clone() })?;
    let mut lib = Library::with_mixer(base, all, Some(classifier), mixer)?;
    let mut deployer = match searched {
        Some(_) => Some(crate::adapt::mixture_search::Deployer::new(base, pool)?),
        None => None,
    };
    let mut columns = vec![BASE.to_string(), BEST_EXPERT.to_string()];
    if searched.is_some() {
        columns.push(MIXTURE.into());
        columns.push(MIXTURE_DEPLOYED.into());
    }
    for s in [Strategy::Prompt, Strategy::Classifier, Strategy::Cem] {
        columns.push(format!("dispatch: {}", s.name()));
    }
    let mut table = BTreeMap::new();
    let mut best_expert = BTreeMap::new();
    let mut routed: BTreeMap<String, (usize, usize)> = BTreeMap::new();
    let seed = cfg.seed + 4;
    for (di, d) in sources.iter().enumerate() {
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
        row.insert(BASE.to_string(), accuracy(&lib.base, tok, &items, d)?);
        let owner = experts.iter().position(|(e, _)| e.domains.contains(&name));
        // The best single expert is chosen on validation items (greedy exact match by a
        // teacher-forced pass), then tested: choosing it on the test items would flatter it.
        let val = d.validation(cfg.search_val_n.max(50), cfg.seed + 5)?;
        let mut best = (f64::NEG_INFINITY, 0);
        for i in 0..experts.len() {
            let s = crate::eval::teacher_forced(&lib.models[i], tok, &val)?;
            let a = s.iter().filter(|x| x.exact).count() as f64 / s.len().max(1) as f64;
            if a > best.0 {
                best = (a, i);
            }
        }
        if !experts.is_empty() {
            let a = accuracy(&lib.models[best.1], tok, &items, d)?;
            row.insert(BEST_EXPERT.to_string(), a);
            best_expert.insert(name.clone(), experts[best.1].0.name.clone());
        }
        if let Some(s) = searched {
            let m = lib.mixer.model(&s.chosen.alpha)?;
            row.insert(MIXTURE.to_string(), accuracy(m, tok, &items, d)?);
            let dep = deployer.as_mut().expect("a search implies a deployer");
            let (m, _) = dep.deploy(&s.chosen.alpha, s.chosen.rank)?;
            row.insert(MIXTURE_DEPLOYED.to_string(), accuracy(m, tok, &items, d)?);
        }
        for strategy in [Strategy::Prompt, Strategy::Classifier] {
            let mut correct = 0;
            for it in &items {
                let (m, pick) = lib.route(tok, strategy, &it.prompt, None)?;
                correct += usize::from(d.verify(&it.answer, &answer(m, tok, &it.prompt)?));
                let right = pick == owner;
                let r = routed.entry(strategy.name().to_string()).or_default();
                r.0 += usize::from(right);
                r.1 += 1;
            }
            row.insert(
                format!("dispatch: {}", strategy.name()),
                correct as f64 / items.len().max(1) as f64,
            );
        }
        if let (true, Some(alpha)) = (mixes, cem_alpha.get(&name)) {
            let m = lib.mixer.model(alpha)?;
            row.insert("dispatch: cem".to_string(), accuracy(m, tok, &items, d)?);
        }
        table.insert(name, row);
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
