//! The settings of a run: [`RunConfig`], its presets ([`RunConfig::new`]: the default run and
//! the quick one) and the JSON overlay of `bitsvf run --config` ([`RunConfig::with_file`]).

use crate::adapt::discover::GroupRule;
use crate::adapt::mixture_search::SearchConfig;
use crate::adapt::mixture_search::{MAX_GENERATIONS, MAX_POPULATION};
use crate::error::{Checks, Error, Result};
use crate::search::{CemConfig, SearchError};
use crate::tasks::{DataSource, Dataset, Domain};
use crate::train::config::MAX_ITEMS;
use crate::train::TrainConfig;
use serde::{Deserialize, Serialize};
use std::convert::Infallible;
use std::path::{Path, PathBuf};

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
    /// Most training steps of the classifier expert (it stops earlier when its validation
    /// accuracy stops improving).
    #[serde(default = "default_classifier_steps")]
    pub classifier_steps: usize,
    /// The mixture search.
    pub search: SearchConfig,
    /// Validation items per expert domain scored by the search.
    pub search_val_n: usize,
    /// Validation items per expert domain, disjoint from the search's, on which the handed-off
    /// mixture is chosen (the selection split).
    #[serde(default = "default_select_n")]
    pub select_n: usize,
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

fn default_classifier_steps() -> usize {
    500
}

fn default_select_n() -> usize {
    100
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
            classifier_steps: default_classifier_steps(),
            search: SearchConfig::default(),
            search_val_n: 30,
            select_n: default_select_n(),
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
                classifier_steps: 6,
                search: SearchConfig {
                    population: 6,
                    generations: 2,
                    latency_tokens: 4,
                    latency_runs: 1,
                    hand_off_within_noise: true,
                    ..SearchConfig::default()
                },
                search_val_n: 8,
                select_n: 8,
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
        self.overlay(path, &read_settings(path)?)
    }

    /// `self` with `overrides` (read from `path`) laid over it.
    fn overlay(&self, path: &Path, overrides: &serde_json::Value) -> Result<RunConfig> {
        let mut v = serde_json::to_value(self)?;
        // Settings that files leave out at their default may still be set.
        if let Some(train) = v.get_mut("train").and_then(|t| t.as_object_mut()) {
            for (k, default) in TrainConfig::omitted_defaults() {
                train.entry(k).or_insert(default);
            }
        }
        merge(&mut v, overrides, "").map_err(|e| Error::config(path, "settings", e.to_string()))?;
        serde_path_to_error::deserialize(v)
            .map_err(|e| Error::config(path, e.path().to_string(), e.inner().to_string()))
    }
}

/// Most bytes of a settings file (a few hundred are typical).
const MAX_SETTINGS_BYTES: u64 = 1 << 20;

/// The JSON object of a settings file, size-checked before it is read.
fn read_settings(path: &Path) -> Result<serde_json::Value> {
    let meta = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
    if !meta.is_file() || meta.len() > MAX_SETTINGS_BYTES {
        return Err(Error::config(
            path,
            "",
            format!("expected a JSON file of at most {MAX_SETTINGS_BYTES} bytes"),
        ));
    }
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let v: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| Error::config(path, "json", e.to_string()))?;
    if !v.is_object() {
        return Err(Error::config(
            path,
            "",
            "expected a JSON object of settings",
        ));
    }
    Ok(v)
}

impl RunConfig {
    /// Every field checked before any work starts (ranges, counts bounded so no setting can
    /// ask for an unbounded allocation, cross-field rules); every problem is reported at once,
    /// each with its JSON path, naming `source` (the settings file, or a word).
    pub fn validate(&self, source: impl Into<PathBuf>) -> Result<()> {
        let mut c = Checks::new();
        c.count("probe", self.probe.0, 1024);
        c.count("probe", self.probe.1, 1 << 16);
        c.that(
            !self.domains.is_empty() || !self.datasets.is_empty(),
            "domains",
            || "no domain and no dataset; a run needs at least one source".into(),
        );
        let mut names: Vec<&str> = (self.domains.iter().map(|d| d.name()))
            .chain(self.datasets.iter().map(String::as_str))
            .collect();
        names.sort_unstable();
        if let Some(w) = names.windows(2).find(|w| w[0] == w[1]) {
            c.that(false, "datasets", || {
                format!(
                    "`{}` is named twice (domains and datasets share one namespace)",
                    w[0]
                )
            });
        }
        for (field, v) in [
            ("discover_n", self.discover_n),
            ("grad_items", self.grad_items),
            ("classifier_items", self.classifier_items),
            ("classifier_steps", self.classifier_steps),
            ("search_val_n", self.search_val_n),
            ("select_n", self.select_n),
            ("preserve_n", self.preserve_n),
            ("shots", self.shots),
            ("test_n", self.test_n),
            ("generated_items", self.generated_items),
        ] {
            c.count(field, v, MAX_ITEMS);
        }
        c.nested("rule", |c| self.rule.check(c));
        c.nested("train", |c| self.train.check(c));
        c.nested("search", |c| {
            self.search.check(c);
            // α bounds name a source (or a group `a+b`); discovery decides which are searched.
            for key in self.search.alpha_bounds.keys() {
                let known = key.split('+').all(|n| names.binary_search(&n).is_ok());
                c.that(known, &format!("alpha_bounds.{key}"), || {
                    format!(
                        "names no domain or dataset of this run ({})",
                        names.join(", ")
                    )
                });
            }
        });
        c.nested("cem", |c| {
            if let Err(SearchError::InvalidConfig { field, reason }) =
                self.cem.validate::<Infallible>()
            {
                c.that(false, &field, || reason);
            }
            c.count("population", self.cem.population, MAX_POPULATION);
            c.count("iterations", self.cem.iterations, MAX_GENERATIONS);
        });
        c.number("min_gain", self.min_gain, -1.0, 1.0);
        c.that(self.generator_endpoint().is_ok(), "data_source", || {
            format!(
                "got `{}`; expected `procedural` or `generator <url> <model>`",
                self.data_source
            )
        });
        c.into_result(source)
    }

    /// The generator endpoint `data_source` names (`generator <url> <model>`), or `None` for
    /// `procedural`; anything else is an error.
    pub fn generator_endpoint(&self) -> Result<Option<(String, String)>> {
        let words: Vec<&str> = self.data_source.split_whitespace().collect();
        match words.as_slice() {
            ["procedural"] => Ok(None),
            ["generator", url, model] => Ok(Some((url.to_string(), model.to_string()))),
            _ => Err(Error::Input(format!(
                "data_source `{}`: expected `procedural` or `generator <url> <model>`",
                self.data_source
            ))),
        }
    }

    /// The settings of `bitsvf run`: the preset (`quick`, from the flag or the file's
    /// `quick`), the settings file laid over it, then the command line's values, validated
    /// as a whole; errors name the file (or `command line`).
    pub fn resolve(o: &RunOverrides) -> Result<RunConfig> {
        let mut cfg = RunConfig::new(o.quick);
        if let Some(path) = &o.config {
            let file = read_settings(path)?;
            match file.get("quick") {
                Some(serde_json::Value::Bool(false)) if o.quick => {
                    return Err(Error::config(path, "quick", "false contradicts --quick"));
                }
                Some(serde_json::Value::Bool(true)) if !o.quick => cfg = RunConfig::new(true),
                _ => {}
            }
            cfg = cfg.overlay(path, &file)?;
            if file.get("datasets").is_some() && cfg.datasets != o.datasets {
                return Err(Error::config(
                    path,
                    "datasets",
                    format!(
                        "names {:?}, but the datasets given with --data are {:?}; datasets \
                         come from --data files",
                        cfg.datasets, o.datasets
                    ),
                ));
            }
        }
        if let Some(s) = o.seed {
            cfg.seed = s;
        }
        if let Some(s) = o.steps {
            cfg.train.steps = s;
        }
        if let Some(n) = o.test_n {
            cfg.test_n = n;
        }
        if let Some((url, model)) = &o.generator {
            cfg.data_source = format!("generator {url} {model}");
        }
        if let Some(n) = o.generated_items {
            cfg.generated_items = n;
        }
        cfg.datasets = o.datasets.clone();
        let source = (o.config.clone()).unwrap_or_else(|| PathBuf::from("command line"));
        cfg.validate(source)?;
        Ok(cfg)
    }
}

/// What the command line sets over a run's settings (see [`RunConfig::resolve`]).
#[derive(Debug, Clone, Default)]
pub struct RunOverrides {
    /// `--quick`: the quick preset.
    pub quick: bool,
    /// `--config`: a JSON settings file laid over the preset.
    pub config: Option<PathBuf>,
    /// `--seed`.
    pub seed: Option<u64>,
    /// `--steps`: training steps per expert.
    pub steps: Option<usize>,
    /// `--test-n`: held-out test items per domain.
    pub test_n: Option<usize>,
    /// The names of the `--data` datasets, in order.
    pub datasets: Vec<String>,
    /// `--generator-url` and `--generator-model`.
    pub generator: Option<(String, String)>,
    /// `--generator-items`.
    pub generated_items: Option<usize>,
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
        // The trainer's settings that files leave out at their defaults can be set too.
        let (_d, p) = settings(
            r#"{"train": {"micro_batch": 4, "checkpoint_activations": true, "base": "dense",
                "max_seq": 96}}"#,
        );
        let cfg = base.with_file(&p).unwrap();
        assert_eq!(cfg.train.micro_batch, Some(4));
        assert!(cfg.train.checkpoint_activations);
        assert_eq!(cfg.train.base, crate::train::TrainBase::Dense);
        assert_eq!(cfg.train.max_seq, Some(96));
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

    /// Every bad value the hostile-input report found, refused by `resolve` before any work,
    /// naming the file and the JSON path.
    #[test]
    fn bad_values_are_refused_with_the_file_and_the_path() {
        for (text, field) in [
            (
                r#"{"search": {"alpha_bounds": {"count": [1.5, 0.5]}}}"#,
                "search.alpha_bounds.count",
            ),
            (
                r#"{"search": {"alpha_bounds": {"count": [-1, 0.5]}}}"#,
                "search.alpha_bounds.count",
            ),
            (
                r#"{"search": {"alpha_bounds": {"poetry": [0, 1]}}}"#,
                "search.alpha_bounds.poetry",
            ),
            (r#"{"train": {"eval_every": 0}}"#, "train.eval_every"),
            (
                r#"{"rule": {"min_experts": 0, "max_experts": 0}}"#,
                "rule.max_experts",
            ),
            (
                r#"{"rule": {"min_experts": 4, "max_experts": 3}}"#,
                "rule.min_experts",
            ),
            (r#"{"train": {"batch_prompts": 0}}"#, "train.batch_prompts"),
            (r#"{"train": {"val_n": 0}}"#, "train.val_n"),
            (r#"{"train": {"lr": -0.01}}"#, "train.lr"),
            (r#"{"train": {"max_grad_norm": -1}}"#, "train.max_grad_norm"),
            (
                r#"{"search": {"max_bytes_ratio": -0.5}}"#,
                "search.max_bytes_ratio",
            ),
            (r#"{"search": {"population": 1}}"#, "search.population"),
            (
                r#"{"search": {"population": 1099511627776}}"#,
                "search.population",
            ),
            (r#"{"cem": {"elites": 0}}"#, "cem.elites"),
            (r#"{"cem": {"population": 0}}"#, "cem.population"),
            (r#"{"shots": 0}"#, "shots"),
            (r#"{"test_n": 0}"#, "test_n"),
            (r#"{"data_source": "openai"}"#, "data_source"),
            (r#"{"datasets": ["missing.jsonl"]}"#, "datasets"),
            (r#"{"quick": false}"#, "quick"),
            ("[1, 2]", "run.json"),
        ] {
            let (_d, p) = settings(text);
            let err = RunConfig::resolve(&RunOverrides {
                quick: true,
                config: Some(p),
                ..RunOverrides::default()
            })
            .unwrap_err()
            .to_string();
            assert!(
                err.contains("run.json") && err.contains(field),
                "{text}: `{err}`"
            );
        }
    }

    #[test]
    fn the_documented_example_and_every_preset_validate() {
        for quick in [false, true] {
            RunConfig::new(quick).validate("preset").unwrap();
            let (_d, p) = settings(
                r#"{"search": {"population": 32, "alpha_bounds": {"count": [0, 1]}},
                    "train": {"steps": 300}}"#,
            );
            let o = RunOverrides {
                quick,
                config: Some(p),
                ..RunOverrides::default()
            };
            let cfg = RunConfig::resolve(&o).unwrap();
            assert_eq!((cfg.quick, cfg.train.steps), (quick, 300));
        }
    }

    #[test]
    fn the_quick_preset_is_recorded_as_chosen() {
        let (_d, p) = settings(r#"{"quick": true, "seed": 3}"#);
        let o = RunOverrides {
            config: Some(p),
            seed: Some(5),
            ..RunOverrides::default()
        };
        let cfg = RunConfig::resolve(&o).unwrap();
        assert!(cfg.quick);
        assert_eq!(cfg.test_n, RunConfig::new(true).test_n);
        assert_eq!(cfg.seed, 5, "a flag wins over the file");
        let (_d, p) = settings(r#"{"data_source": "generator http://127.0.0.1:9/v1 m"}"#);
        let cfg = RunConfig::resolve(&RunOverrides {
            config: Some(p),
            ..RunOverrides::default()
        })
        .unwrap();
        let endpoint = cfg.generator_endpoint().unwrap();
        assert_eq!(endpoint, Some(("http://127.0.0.1:9/v1".into(), "m".into())));
    }
}
