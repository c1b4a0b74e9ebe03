//! The settings of a run: [`RunConfig`], its presets ([`RunConfig::new`]: the default run and
//! the quick one) and the JSON overlay of `bitsvf run --config` ([`RunConfig::with_file`]).

use crate::adapt::discover::GroupRule;
use crate::adapt::mixture_search::SearchConfig;
use crate::error::{Error, Result};
use crate::search::CemConfig;
use crate::tasks::{DataSource, Dataset, Domain};
use crate::train::TrainConfig;
use serde::{Deserialize, Serialize};
use std::path::Path;

/// Settings of a run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunConfig {
    /// Small and fast (for tests): 4 domains, 3 experts, a few steps.
    pub quick: bool,
    /// Seed of every random choice.
    pub seed: u64,
    /// Recovery probe: rows × tokens.
    pub probe: (usize, usize),
    /// Built-in domains measured by discovery.
    pub domains: Vec<Domain>,
    /// Validation items per domain for the capability report.
    pub discover_n: usize,
    /// Training items per domain for the gradient directions.
    pub grad_items: usize,
    /// The grouping rule.
    pub rule: GroupRule,
    /// Training of every expert.
    pub train: TrainConfig,
    /// Training items per label for the classifier expert.
    pub classifier_items: usize,
    /// The mixture search.
    pub search: SearchConfig,
    /// Validation items per expert domain scored by the search.
    pub search_val_n: usize,
    /// Validation items per built-in domain in the preservation set.
    pub preserve_n: usize,
    /// Labelled examples per domain for few-shot CEM.
    pub shots: usize,
    /// The CEM settings.
    pub cem: CemConfig,
    /// Held-out test items per domain for the final table.
    pub test_n: usize,
    /// An expert enters the mixture search when its validation accuracy beats the base's by
    /// more than this (−1 admits every expert: quick runs are too short to gain).
    pub min_gain: f64,
    /// Where training items come from: `procedural`, or `generator <url> <model>` (the
    /// endpoint's key never enters the configuration).
    pub data_source: String,
    /// Training items per domain requested from a generator endpoint.
    pub generated_items: usize,
    /// Names of the user datasets measured beside the built-in domains (their items are
    /// copied into the handoff's `data/`).
    #[serde(default)]
    pub datasets: Vec<String>,
}

impl RunConfig {
    /// The default run (about 25 minutes on 2 cores) or the quick one (about a minute).
    pub fn new(quick: bool) -> Self {
        let mut train = TrainConfig {
            steps: 150,
            val_n: 200,
            patience: 4,
            ..TrainConfig::default()
        };
        let mut cfg = RunConfig {
            quick,
            seed: 0,
            probe: (8, 32),
            domains: Domain::ALL.to_vec(),
            discover_n: 200,
            grad_items: 64,
            rule: GroupRule::default(),
            train: train.clone(),
            classifier_items: 400,
            search: SearchConfig::default(),
            search_val_n: 20,
            preserve_n: 4,
            shots: 10,
            cem: CemConfig {
                iterations: 12,
                ..CemConfig::default()
            },
            test_n: 200,
            min_gain: 0.0,
            data_source: "procedural".into(),
            generated_items: 2000,
            datasets: Vec::new(),
        };
        if quick {
            train.steps = 6;
            train.batch_prompts = 8;
            train.eval_every = 3;
            train.val_n = 16;
            cfg = RunConfig {
                probe: (2, 16),
                domains: vec![Domain::Count, Domain::Sort, Domain::Compare, Domain::Parity],
                discover_n: 20,
                grad_items: 8,
                rule: GroupRule {
                    max_experts: 3,
                    ..GroupRule::default()
                },
                train,
                classifier_items: 16,
                search: SearchConfig {
                    population: 6,
                    generations: 2,
                    latency_tokens: 4,
                    latency_runs: 1,
                    ..SearchConfig::default()
                },
                search_val_n: 8,
                preserve_n: 2,
                shots: 4,
                cem: CemConfig {
                    population: 6,
                    elites: 2,
                    iterations: 2,
                    ..CemConfig::default()
                },
                test_n: 12,
                min_gain: -1.0,
                generated_items: 40,
                ..cfg
            };
        }
        cfg
    }
}

/// Lay `overrides` over `base`: objects merge key by key, anything else replaces. A key the
/// base does not have is an error naming its path, so a typo never passes silently.
fn merge(base: &mut serde_json::Value, overrides: &serde_json::Value, path: &str) -> Result<()> {
    match (base, overrides) {
        (serde_json::Value::Object(b), serde_json::Value::Object(o)) => {
            for (k, v) in o {
                let p = if path.is_empty() {
                    k.clone()
                } else {
                    format!("{path}.{k}")
                };
                match b.get_mut(k) {
                    // Maps keyed by the user (e.g. search.alpha_bounds) start empty.
                    Some(slot) if slot.as_object().is_some_and(|m| m.is_empty()) => {
                        *slot = v.clone()
                    }
                    Some(slot) => merge(slot, v, &p)?,
                    None => {
                        let known: Vec<&String> = b.keys().collect();
                        return Err(Error::Input(format!(
                            "unknown setting `{p}`; known here: {}",
                            known
                                .iter()
                                .map(|s| s.as_str())
                                .collect::<Vec<_>>()
                                .join(", ")
                        )));
                    }
                }
            }
            Ok(())
        }
        (b, o) => {
            *b = o.clone();
            Ok(())
        }
    }
}

impl RunConfig {
    /// `self` with the settings of a JSON file laid over it (any subset of the fields of
    /// [`RunConfig`], nested objects included, e.g. `{"search": {"population": 32}}`).
    pub fn with_file(&self, path: &Path) -> Result<RunConfig> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let overrides: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| Error::config(path, "json", e.to_string()))?;
        let mut v = serde_json::to_value(self).map_err(|e| Error::Input(e.to_string()))?;
        merge(&mut v, &overrides, "")
            .map_err(|e| Error::config(path, "settings", e.to_string()))?;
        serde_path_to_error::deserialize(v)
            .map_err(|e| Error::config(path, e.path().to_string(), e.inner().to_string()))
    }
}

/// The data sources of a run: the built-in domains, then the user datasets.
pub(crate) fn sources_of(domains: &[Domain], datasets: &[Dataset]) -> Vec<DataSource> {
    (domains.iter().map(|&d| DataSource::Domain(d)))
        .chain(datasets.iter().map(|d| DataSource::Dataset(d.clone())))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn settings(text: &str) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("run.json");
        std::fs::write(&path, text).unwrap();
        (dir, path)
    }

    #[test]
    fn a_settings_file_overrides_nested_fields_and_keeps_the_rest() {
        let base = RunConfig::new(false);
        let (_d, p) = settings(
            r#"{"search": {"population": 32, "alpha_bounds": {"count": [0.5, 1.5]}},
                "train": {"steps": 300}, "domains": ["count", "sort"]}"#,
        );
        let cfg = base.with_file(&p).unwrap();
        assert_eq!(cfg.search.population, 32);
        assert_eq!(cfg.search.alpha_bounds["count"], (0.5, 1.5));
        assert_eq!(cfg.search.generations, base.search.generations);
        assert_eq!(cfg.train.steps, 300);
        assert_eq!(cfg.train.lr, base.train.lr);
        assert_eq!(cfg.domains, vec![Domain::Count, Domain::Sort]);
    }

    #[test]
    fn a_bad_settings_file_names_the_file_and_the_field() {
        let base = RunConfig::new(true);
        for (text, parts) in [
            (
                r#"{"search": {"populaton": 3}}"#,
                vec!["run.json", "search.populaton"],
            ),
            (r#"{"test_n": "many"}"#, vec!["run.json", "test_n"]),
            (
                r#"{"domains": ["count", "poetry"]}"#,
                vec!["run.json", "domains", "poetry"],
            ),
            ("{not json", vec!["run.json"]),
        ] {
            let (_d, p) = settings(text);
            let err = base.with_file(&p).unwrap_err().to_string();
            for part in parts {
                assert!(err.contains(part), "`{err}` should mention `{part}`");
            }
        }
    }
}
