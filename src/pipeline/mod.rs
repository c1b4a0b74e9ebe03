//! The main job, `bitsvf run` (DESIGN.md §1): load and verify → SVD → discover → train the
//! experts and the classifier → search the mixture → fit few-shot CEM → evaluate → hand off.
//!
//! Every stage writes its result to `<out>.partial/stages/<stage>.json` (atomically) when it
//! finishes, with its wall time and peak resident memory; a rerun of the same command skips
//! finished stages and resumes an interrupted expert from its last validation. The handoff
//! directory (DESIGN.md §6) is assembled inside `<out>.partial` and renamed to `<out>` as the
//! last step, so `<out>` is either absent or complete.

pub mod compare;
pub mod plot;

use crate::adapt::discover::{discover, Discovery, GroupRule};
use crate::adapt::dispatch::{classifier_items, Library, Mixer, Strategy};
use crate::adapt::mixture_search::{search, Problem, SearchConfig, SearchReport};
use crate::engine::checkpoint::{save_native, Checkpoint};
use crate::engine::model::Model;
use crate::engine::tokenizer::Tokenizer;
use crate::error::{Error, Result};
use crate::eval::answer;
use crate::eval::recovery;
use crate::io::{read_json, write_json};
use crate::pipeline::plot::Series;
use crate::search::CemConfig;
use crate::svf::deploy::{f32_bytes, packed_bytes};
use crate::svf::expert::{factors, Expert};
use crate::svf::svd::SvdCache;
use crate::tasks::remote::{generate_items, GeneratorConfig};
use crate::tasks::DataSource;
use crate::tasks::{Dataset, Domain, Item, Verifier};
use crate::train::{train_expert, TrainConfig, TrainSummary};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Format tag of the handoff manifest.
pub const MANIFEST_FORMAT: &str = "bitsvf-handoff";

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

/// What the caller sees as the run goes.
pub enum Event<'a> {
    /// A stage starts (name) or is skipped because it finished before (name, true).
    Stage(&'a str, bool),
    /// Progress within a stage: done of total, and a message.
    Progress(usize, usize, String),
}

/// Wall time and peak memory of one stage.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StageRecord {
    /// Stage name.
    pub name: String,
    /// Wall time, seconds (of the run that finished it).
    pub seconds: f64,
    /// Peak resident memory during the stage, MB (`None` where the OS does not say).
    pub peak_rss_mb: Option<f64>,
}

/// Peak RSS since the last reset, from /proc (Linux).
fn peak_rss_mb() -> Option<f64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

/// Reset the peak-RSS counter (Linux ≥ 4.0), so each stage reports its own peak.
fn reset_peak_rss() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

#[derive(Serialize, Deserialize)]
struct Saved<T> {
    record: StageRecord,
    result: T,
}

/// The run in progress: its directory and finished stages.
struct Run<'a> {
    work: PathBuf,
    records: Vec<StageRecord>,
    events: &'a mut dyn FnMut(Event),
}

impl Run<'_> {
    /// Run stage `name` unless it finished before; either way return its result.
    fn stage<T: Serialize + DeserializeOwned>(
        &mut self,
        name: &str,
        f: impl FnOnce(&mut dyn FnMut(Event)) -> Result<T>,
    ) -> Result<T> {
        let path = self.work.join("stages").join(format!("{name}.json"));
        if path.exists() {
            let saved: Saved<T> = read_json(&path)?;
            (self.events)(Event::Stage(name, true));
            self.records.push(saved.record);
            return Ok(saved.result);
        }
        (self.events)(Event::Stage(name, false));
        reset_peak_rss();
        let t0 = Instant::now();
        let result = f(self.events)?;
        let record = StageRecord {
            name: name.to_string(),
            seconds: t0.elapsed().as_secs_f64(),
            peak_rss_mb: peak_rss_mb(),
        };
        write_json(
            &path,
            &Saved {
                record: record.clone(),
                result: &result,
            },
        )?;
        self.records.push(record);
        Ok(result)
    }
}

/// One trained expert as the manifest lists it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ExpertEntry {
    /// Expert name (its label for dispatch).
    pub name: String,
    /// File, relative to the handoff directory.
    pub file: String,
    /// Domains it was trained on.
    pub domains: Vec<String>,
    /// Best validation accuracy (the saved checkpoint).
    pub val_accuracy: f64,
    /// The base model's validation accuracy on the same items.
    pub base_val_accuracy: f64,
    /// Whether it enters the mixture search (it gained on validation).
    pub in_mixture: bool,
    /// The training summary.
    pub training: TrainSummary,
}

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

/// The manifest of a handoff directory.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Manifest {
    /// [`MANIFEST_FORMAT`].
    pub format: String,
    /// bitsvf version that wrote it.
    pub bitsvf_version: String,
    /// The base model.
    pub base_model: serde_json::Value,
    /// The run settings.
    pub options: RunConfig,
    /// The experts.
    pub experts: Vec<ExpertEntry>,
    /// The classifier expert.
    pub classifier: Option<ExpertEntry>,
    /// The chosen mixture.
    pub mixture: Option<serde_json::Value>,
    /// Every metric: recovery, capability, search, CEM, test table, stages, bytes.
    pub metrics: serde_json::Value,
    /// Notes for the reader.
    pub notes: Vec<String>,
}

/// The data sources of a run: the built-in domains, then the user datasets.
fn sources_of(domains: &[Domain], datasets: &[Dataset]) -> Vec<DataSource> {
    (domains.iter().map(|&d| DataSource::Domain(d)))
        .chain(datasets.iter().map(|d| DataSource::Dataset(d.clone())))
        .collect()
}

/// The training data of a group of source names.
fn group_data(group: &[String], sources: &[DataSource]) -> Result<DataSource> {
    let mut members = group
        .iter()
        .map(|n| {
            (sources.iter().find(|s| s.name() == *n).cloned())
                .ok_or_else(|| Error::Input(format!("no data source named `{n}`")))
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(if members.len() == 1 {
        members.remove(0)
    } else {
        DataSource::Group(members)
    })
}

/// Run the whole job on `ck`; returns the handoff directory's manifest. `generator`, when
/// given, supplies the experts' training items (verified, cached on disk); `model_files` are
/// copied into `model/` beside the base (e.g. the tokenizer.json of a user model).
#[allow(clippy::too_many_arguments)]
pub fn run(
    ck: &Checkpoint,
    model_name: &str,
    tok: &dyn Tokenizer,
    cfg: &RunConfig,
    out: &Path,
    cache: &SvdCache,
    generator: Option<&GeneratorConfig>,
    datasets: &[Dataset],
    model_files: &[PathBuf],
    events: &mut dyn FnMut(Event),
) -> Result<Manifest> {
    let names: Vec<&str> = datasets.iter().map(|d| d.name.as_str()).collect();
    if names != cfg.datasets.iter().map(String::as_str).collect::<Vec<_>>() {
        return Err(Error::Input(
            "RunConfig::datasets must name the datasets passed to run, in order".into(),
        ));
    }
    if let Some(d) = datasets
        .iter()
        .find(|d| cfg.domains.iter().any(|x| x.name() == d.name))
    {
        return Err(Error::Input(format!(
            "dataset `{}` has the name of a built-in domain; rename its file",
            d.name
        )));
    }
    let sources = sources_of(&cfg.domains, datasets);
    if out.exists() {
        return Err(Error::Input(format!(
            "{} already exists; remove it or choose another --out (a run never overwrites a handoff)",
            out.display()
        )));
    }
    let mut name = out.file_name().unwrap_or_default().to_os_string();
    name.push(".partial");
    let work = out.with_file_name(name);
    for d in ["stages", "experts", "model", "plots", "data"] {
        std::fs::create_dir_all(work.join(d)).map_err(|e| Error::io(work.join(d), e))?;
    }
    // A resumed run must be the same run.
    let cfg_path = work.join("run-config.json");
    if cfg_path.exists() {
        let before: serde_json::Value = read_json(&cfg_path)?;
        let now = serde_json::to_value(cfg).map_err(|e| Error::Input(e.to_string()))?;
        if before != now || read_json::<String>(&work.join("base-hash.json"))? != ck.content_hash()
        {
            return Err(Error::Input(format!(
                "{} holds an interrupted run with other settings or another model; remove it \
                 or rerun with the same options",
                work.display()
            )));
        }
    } else {
        write_json(&cfg_path, cfg)?;
        write_json(&work.join("base-hash.json"), &ck.content_hash())?;
    }
    let mut run = Run {
        work: work.clone(),
        records: Vec::new(),
        events,
    };

    // 1. Load, dequantize and verify; keep the untouched ternary base.
    let recovery: serde_json::Value = run.stage("1-load-verify", |_| {
        let len = cfg.probe.1.min(ck.config.max_position_embeddings);
        let probe = recovery::random_probe(ck.config.vocab_size, cfg.probe.0, len, cfg.seed);
        let report = recovery::verify(ck, &probe)?;
        report.check()?;
        save_native(ck, &work.join("model/base.safetensors"))?;
        for d in datasets {
            write_json(&work.join("data").join(format!("{}.json", d.name)), d)?;
        }
        for f in model_files {
            let to = work.join("model").join(f.file_name().unwrap_or_default());
            std::fs::copy(f, &to).map_err(|e| Error::io(f, e))?;
        }
        serde_json::to_value(&report).map_err(|e| Error::Input(e.to_string()))
    })?;

    // 2. SVD of the targets (cached across runs by content hash).
    let svd_stats: serde_json::Value = run.stage("2-svd", |_| {
        let (_, s) = factors(ck, cfg.train.targets, cache)?;
        Ok(serde_json::json!({
            "matrices": s.hits + s.computed, "cache_hits": s.hits, "computed": s.computed,
            "seconds": s.seconds, "max_relative_error": s.max_relative_error,
        }))
    })?;
    let (f, _) = factors(ck, cfg.train.targets, cache)?;
    let base = Model::new(ck, crate::engine::model::ModelOptions::default())?;

    // 3. Discover the experts.
    let found: Discovery = run.stage("3-discover", |ev| {
        let total = sources.len();
        discover(
            ck,
            &base,
            &f,
            tok,
            &sources,
            cfg.discover_n,
            cfg.grad_items,
            cfg.rule,
            |i, name| ev(Event::Progress(i, total, format!("measuring {name}"))),
        )
    })?;

    // 4. Train one expert per group, then the classifier.
    // Each expert in its own stage `4-train-<name>`, resumable within the stage.
    let train_stage = |run: &mut Run, data: &DataSource, path: &Path| -> Result<TrainSummary> {
        let name = data.name();
        run.stage(&format!("4-train-{name}"), |ev| {
            let train = TrainConfig {
                seed: cfg.seed,
                ..cfg.train.clone()
            };
            train_expert(ck, &f, tok, data, &train, path, true, |step, s| {
                ev(Event::Progress(
                    step,
                    train.steps,
                    format!("training {name}: loss {:.3} kl {:.4}", s.loss, s.kl),
                ));
                true
            })
        })
    };
    let mut experts: Vec<(ExpertEntry, Expert)> = Vec::new();
    for group in &found.grouping.groups {
        let mut data = group_data(group, &sources)?;
        let name = data.name();
        let builtin = group.iter().all(|n| Domain::by_name(n).is_ok());
        if let (Some(g), true) = (generator, builtin) {
            let items: Vec<Item> = run.stage(&format!("4-data-{name}"), |ev| {
                let mut items = Vec::new();
                for d in group {
                    let d = Domain::by_name(d).map_err(|e| Error::Input(e.to_string()))?;
                    let n = cfg.generated_items;
                    let r = generate_items(g, d, n, cfg.seed, |k| {
                        ev(Event::Progress(
                            k,
                            n,
                            format!("generating {} items", d.name()),
                        ))
                    })
                    .map_err(|e| Error::Input(e.to_string()))?;
                    items.extend(r.items);
                }
                Ok(items)
            })?;
            data = DataSource::Pool {
                of: Box::new(data),
                items,
            };
        }
        let file = format!("experts/{name}.safetensors");
        let path = work.join(&file);
        let summary = train_stage(&mut run, &data, &path)?;
        let expert = Expert::load(&path)?;
        experts.push((
            ExpertEntry {
                name: name.clone(),
                file,
                domains: group.clone(),
                val_accuracy: summary.best_val_accuracy,
                base_val_accuracy: summary.base_val_accuracy,
                in_mixture: summary.best_val_accuracy - summary.base_val_accuracy > cfg.min_gain,
                training: summary,
            },
            expert,
        ));
    }
    let covered: Vec<String> = found.grouping.groups.iter().flatten().cloned().collect();
    let others: Vec<DataSource> = (sources.iter())
        .filter(|s| !covered.contains(&s.name()))
        .cloned()
        .collect();
    let labels: Vec<DataSource> = experts
        .iter()
        .map(|(e, _)| group_data(&e.domains, &sources))
        .collect::<Result<_>>()?;
    let cls_file = "experts/classifier.safetensors".to_string();
    let cls_path = work.join(&cls_file);
    let items = classifier_items(&labels, &others, cfg.classifier_items, cfg.seed)?;
    let data = DataSource::Dataset(Dataset {
        name: "classifier".into(),
        verifier: Verifier::Exact,
        items,
    });
    let cls_summary = train_stage(&mut run, &data, &cls_path)?;
    let classifier = Expert::load(&cls_path)?;

    // 5. Search the mixture over the experts that gained.
    let pool: Vec<Expert> = experts
        .iter()
        .filter(|(e, _)| e.in_mixture)
        .map(|(_, x)| x.clone())
        .collect();
    let searched: Option<SearchReport> = run.stage("5-search", |ev| {
        if pool.is_empty() {
            return Ok(None);
        }
        let mut val = Vec::new();
        for (e, _) in experts.iter().filter(|(e, _)| e.in_mixture) {
            val.extend(
                group_data(&e.domains, &sources)?.validation(cfg.search_val_n, cfg.seed + 1)?,
            );
        }
        let mut preserve = Vec::new();
        for d in &sources {
            preserve.extend(d.validation(cfg.preserve_n, cfg.seed + 2)?);
        }
        let mut problem = Problem::new(ck, tok, cache, &pool, &f, &val, &preserve, &cfg.search)?;
        let total = cfg.search.generations;
        let report = search(
            &mut problem,
            &cfg.search,
            |r| {
                ev(Event::Progress(
                    r.generation,
                    total,
                    format!(
                        "search: hypervolume {:.4}, front {}",
                        r.hypervolume, r.front_size
                    ),
                ))
            },
            |_| {},
        )?;
        Ok(Some(report))
    })?;
    if let Some(s) = &searched {
        let refs: Vec<&Expert> = pool.iter().collect();
        let mut mixed = crate::svf::expert::mixture(&refs, &s.chosen.alpha, &f)?;
        mixed.meta.name = "mixture".into();
        mixed.save(&work.join("experts/mixture.safetensors"))?;
    }

    // 6. Few-shot CEM per domain, on labelled validation examples.
    let cem_alpha: BTreeMap<String, Vec<f64>> = run.stage("6-cem", |ev| {
        let mut out = BTreeMap::new();
        if pool.is_empty() {
            return Ok(out);
        }
        let mut mixer = Mixer::new(ck, pool.clone(), cache)?;
        for (i, d) in sources.iter().enumerate() {
            ev(Event::Progress(
                i,
                sources.len(),
                format!("CEM on {} shots of {}", cfg.shots, d.name()),
            ));
            let shots = d.validation(cfg.shots, cfg.seed + 3)?;
            let r = mixer.fit_cem(
                tok,
                &shots,
                &CemConfig {
                    seed: cfg.seed,
                    ..cfg.cem.clone()
                },
            )?;
            out.insert(d.name(), r.best);
        }
        Ok(out)
    })?;

    // 7. Evaluate everything on the test split.
    let table: TestTable = run.stage("7-evaluate", |ev| {
        evaluate_all(
            ck,
            tok,
            cache,
            cfg,
            &sources,
            &experts,
            &pool,
            &classifier,
            searched.as_ref(),
            &cem_alpha,
            &f,
            ev,
        )
    })?;

    // 8. Hand off.
    (run.events)(Event::Stage("8-handoff", false));
    let manifest = handoff(
        ck,
        model_name,
        cfg,
        &work,
        &run.records,
        HandoffParts {
            recovery,
            svd: svd_stats,
            found: &found,
            experts: &experts,
            classifier: ExpertEntry {
                name: "classifier".into(),
                file: cls_file,
                domains: vec!["dispatch".into()],
                val_accuracy: cls_summary.best_val_accuracy,
                base_val_accuracy: cls_summary.base_val_accuracy,
                in_mixture: false,
                training: cls_summary,
            },
            searched: searched.as_ref(),
            cem_alpha: &cem_alpha,
            table: &table,
        },
    )?;
    std::fs::rename(&work, out).map_err(|e| Error::io(out, e))?;
    crate::io::sync_dir(
        out.parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new(".")),
    )?;
    Ok(manifest)
}

/// Greedy accuracy of `model` on `items` of source `d`.
fn accuracy(model: &Model, tok: &dyn Tokenizer, items: &[Item], d: &DataSource) -> Result<f64> {
    let refs: Vec<&Item> = items.iter().collect();
    Ok(crate::eval::score_items(model, tok, &refs, |e, c| d.verify(e, c), |_| {})?.accuracy)
}

/// The test table: base, every expert on its covered domains, the mixture in both forms and
/// every dispatch strategy, on every domain.
#[allow(clippy::too_many_arguments)]
fn evaluate_all(
    ck: &Checkpoint,
    tok: &dyn Tokenizer,
    cache: &SvdCache,
    cfg: &RunConfig,
    sources: &[DataSource],
    experts: &[(ExpertEntry, Expert)],
    pool: &[Expert],
    classifier: &Expert,
    searched: Option<&SearchReport>,
    cem_alpha: &BTreeMap<String, Vec<f64>>,
    f: &BTreeMap<String, crate::svf::svd::Svd>,
    ev: &mut dyn FnMut(Event),
) -> Result<TestTable> {
    use columns::*;
    let all: Vec<Expert> = experts.iter().map(|(_, e)| e.clone()).collect();
    let mut lib = Library::new(ck, all, Some(classifier), cache)?;
    let mut pool_mixer = if pool.is_empty() {
        None
    } else {
        Some(Mixer::new(ck, pool.to_vec(), cache)?)
    };
    let mut deployer = match searched {
        Some(_) => Some(crate::adapt::mixture_search::Deployer::new(
            ck, cache, pool, f,
        )?),
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
            let mixer = pool_mixer.as_mut().expect("a search implies a pool");
            let m = mixer.model(&s.chosen.alpha)?;
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
        if let (Some(mixer), Some(alpha)) = (pool_mixer.as_mut(), cem_alpha.get(&name)) {
            let m = mixer.model(alpha)?;
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

struct HandoffParts<'a> {
    recovery: serde_json::Value,
    svd: serde_json::Value,
    found: &'a Discovery,
    experts: &'a [(ExpertEntry, Expert)],
    classifier: ExpertEntry,
    searched: Option<&'a SearchReport>,
    cem_alpha: &'a BTreeMap<String, Vec<f64>>,
    table: &'a TestTable,
}

/// Write manifest.json, metrics.jsonl, the plots and report.md into `work`.
fn handoff(
    ck: &Checkpoint,
    model_name: &str,
    cfg: &RunConfig,
    work: &Path,
    records: &[StageRecord],
    p: HandoffParts,
) -> Result<Manifest> {
    // metrics.jsonl: capability, every training step, every search point and generation.
    let mut lines: Vec<serde_json::Value> = Vec::new();
    for (n, a) in p.found.names.iter().zip(&p.found.accuracy) {
        lines.push(serde_json::json!({ format!("stage1/capability/{n}/accuracy"): a }));
    }
    let mut curves: Vec<Series<(f64, f64)>> = Vec::new();
    let entries = p.experts.iter().map(|(e, _)| e).chain([&p.classifier]);
    for e in entries {
        let mp = work.join(&e.file).with_extension("metrics.jsonl");
        let text = std::fs::read_to_string(&mp).map_err(|err| Error::io(&mp, err))?;
        // Step 0 is the base model, measured on the same validation items.
        let mut curve = vec![(0.0, e.base_val_accuracy)];
        for line in text.lines().filter(|l| !l.trim().is_empty()) {
            let v: serde_json::Value = serde_json::from_str(line)
                .map_err(|err| Error::config(&mp, "line", err.to_string()))?;
            let key = format!("stage2/expert_{}/val_accuracy", e.name);
            if let (Some(step), Some(acc)) = (v["step"].as_f64(), v[&key].as_f64()) {
                curve.push((step, acc));
            }
            lines.push(v);
        }
        curves.push(Series {
            name: e.name.clone(),
            values: curve,
        });
        std::fs::remove_file(&mp).map_err(|err| Error::io(&mp, err))?;
        let state = work.join(&e.file).with_extension("train-state.safetensors");
        if state.exists() {
            std::fs::remove_file(&state).map_err(|err| Error::io(&state, err))?;
        }
    }
    if let Some(s) = p.searched {
        for (i, pt) in s.evaluated.iter().enumerate() {
            lines.push(serde_json::json!({
                "stage3/search/evaluation": i, "stage3/search/accuracy": pt.accuracy,
                "stage3/search/kl": pt.kl, "stage3/search/ms_per_token": pt.ms_per_token,
                "stage3/search/bytes": pt.bytes, "stage3/search/rank": pt.rank,
                "stage3/search/alpha": pt.alpha,
            }));
        }
        for g in &s.history {
            lines.push(serde_json::json!({
                "stage3/search/generation": g.generation,
                "stage3/search/hypervolume": g.hypervolume,
                "stage3/search/front_size": g.front_size,
            }));
        }
    }
    for (d, row) in &p.table.accuracy {
        for (c, a) in row {
            lines.push(serde_json::json!({ format!("eval/{d}/{c}"): a }));
        }
    }
    let mut text = String::new();
    for l in &lines {
        text.push_str(&l.to_string());
        text.push('\n');
    }
    crate::io::write_atomic(&work.join("metrics.jsonl"), text.as_bytes())?;

    // Plots.
    let domains: Vec<String> = p.table.accuracy.keys().cloned().collect();
    let series: Vec<Series<f64>> = p
        .table
        .columns
        .iter()
        .map(|c| Series {
            name: c.clone(),
            values: domains
                .iter()
                .map(|d| 100.0 * p.table.accuracy[d].get(c).copied().unwrap_or(f64::NAN))
                .collect(),
        })
        .collect();
    plot::bars(
        &work.join("plots/capability.png"),
        "Test accuracy per domain",
        "accuracy (%)",
        &domains,
        &series,
    )?;
    plot::bars(
        &work.join("plots/discovery.png"),
        "Base model capability (validation)",
        "accuracy (%)",
        &p.found.names,
        &[Series {
            name: "base".into(),
            values: p.found.accuracy.iter().map(|a| 100.0 * a).collect(),
        }],
    )?;
    plot::lines(
        &work.join("plots/training.png"),
        "Validation accuracy while training",
        "step",
        "accuracy",
        &curves,
    )?;
    if let Some(s) = p.searched {
        let all: Vec<(f64, f64)> = s.evaluated.iter().map(|q| (q.kl, q.accuracy)).collect();
        let front: Vec<(f64, f64)> = s.front.iter().map(|q| (q.kl, q.accuracy)).collect();
        plot::scatter(
            &work.join("plots/pareto.png"),
            "Mixture search: accuracy vs KL drift",
            "KL(base ‖ deployed) per token",
            "validation accuracy",
            &[
                Series {
                    name: "evaluated".into(),
                    values: all,
                },
                Series {
                    name: "Pareto front".into(),
                    values: front,
                },
            ],
            Some((s.chosen.kl, s.chosen.accuracy)),
        )?;
        plot::lines(
            &work.join("plots/hypervolume.png"),
            "Hypervolume per generation",
            "generation",
            "hypervolume",
            &[Series {
                name: "first front".into(),
                values: s
                    .history
                    .iter()
                    .map(|g| (g.generation as f64, g.hypervolume))
                    .collect(),
            }],
        )?;
    }
    let stage_names: Vec<String> = records.iter().map(|r| r.name.clone()).collect();
    plot::bars(
        &work.join("plots/memory.png"),
        "Peak resident memory per stage",
        "MB",
        &stage_names,
        &[Series {
            name: "peak RSS".into(),
            values: records
                .iter()
                .map(|r| r.peak_rss_mb.unwrap_or(f64::NAN))
                .collect(),
        }],
    )?;

    // Manifest.
    let file_bytes = |rel: &str| std::fs::metadata(work.join(rel)).map_or(0, |m| m.len());
    let expert_bytes: u64 = p.experts.iter().map(|(e, _)| file_bytes(&e.file)).sum();
    let mixture = p.searched.map(|s| {
        serde_json::json!({
            "file": "experts/mixture.safetensors",
            "experts": s.experts,
            "alpha": s.chosen.alpha,
            "rank": s.chosen.rank,
            "deployed_form": "hybrid: packed ternary base + rank-k SVF delta (f16 factors)",
            "rule": s.rule,
            "validation": s.chosen,
        })
    });
    let mut notes = vec![
        "Test accuracies are greedy decoding on the held-out test split; the search's \
         validation accuracy is greedy exact match by a teacher-forced pass."
            .to_string(),
    ];
    let dropped: Vec<&str> = p
        .experts
        .iter()
        .filter(|(e, _)| !e.in_mixture)
        .map(|(e, _)| e.name.as_str())
        .collect();
    if !dropped.is_empty() {
        notes.push(format!(
            "Experts that did not gain more than {:.1} points on validation stay in the library but not in the mixture: {}",
            100.0 * cfg.min_gain,
            dropped.join(", ")
        ));
    }
    let manifest = Manifest {
        format: MANIFEST_FORMAT.into(),
        bitsvf_version: env!("CARGO_PKG_VERSION").into(),
        base_model: serde_json::json!({
            "name": model_name, "content_hash": ck.content_hash(), "format": ck.format.name(),
            "file": "model/base.safetensors",
        }),
        options: cfg.clone(),
        experts: p.experts.iter().map(|(e, _)| e.clone()).collect(),
        classifier: Some(p.classifier.clone()),
        mixture,
        metrics: serde_json::json!({
            "recovery": p.recovery,
            "svd": p.svd,
            "discovery": p.found,
            "search": p.searched.map(|s| serde_json::json!({
                "history": s.history, "front": s.front, "base": s.base,
                "evaluations": s.evaluated.len(), "seconds": s.seconds,
                "stopped_early": s.stopped_early, "hv_reference": s.hv_reference,
            })),
            "cem_alpha": p.cem_alpha,
            "test": p.table,
            "stages": records,
            "bytes": {
                "ternary_base_packed": packed_bytes(ck),
                "f32_model": f32_bytes(ck),
                "experts_files": expert_bytes,
                "base_file": file_bytes("model/base.safetensors"),
            },
        }),
        notes,
    };
    write_json(&work.join("manifest.json"), &manifest)?;
    let report = report_markdown(&manifest, p.found, p.table, records, p.searched);
    crate::io::write_atomic(&work.join("report.md"), report.as_bytes())?;
    Ok(manifest)
}

fn pct(a: Option<&f64>) -> String {
    a.map_or("—".into(), |a| format!("{:.1}", 100.0 * a))
}

/// report.md: the tables and the plots.
fn report_markdown(
    m: &Manifest,
    found: &Discovery,
    table: &TestTable,
    records: &[StageRecord],
    searched: Option<&SearchReport>,
) -> String {
    let mut s = format!(
        "# bitsvf run report\n\nBase model `{}` (content hash `{}…`).\n\n",
        m.base_model["name"].as_str().unwrap_or(""),
        &m.base_model["content_hash"].as_str().unwrap_or("")[..12]
    );
    s += "## Stage 1: capability and discovery\n\n![capability](plots/discovery.png)\n\n";
    s += &format!("{}\n\n", found.grouping.reason);
    s += "## Stage 2: experts\n\n| expert | domains | base val | expert val | steps | in mixture |\n|---|---|---|---|---|---|\n";
    for e in m.experts.iter().chain(&m.classifier) {
        s += &format!(
            "| {} | {} | {:.1} | {:.1} | {} | {} |\n",
            e.name,
            e.domains.join(", "),
            100.0 * e.base_val_accuracy,
            100.0 * e.val_accuracy,
            e.training.steps,
            if e.in_mixture { "yes" } else { "no" }
        );
    }
    s += "\n![training](plots/training.png)\n\n## Stage 3: mixture search\n\n";
    if let Some(r) = searched {
        s += &format!(
            "NSGA-II, {} evaluations in {:.0} s; final front of {} points. Chosen: α = [{}] over [{}], rank {}: validation accuracy {:.1}%, KL {:.4}, {:.2} ms/token, {:.2} MB (base: {:.1}%, {:.2} ms/token, {:.2} MB). Rule: {}.\n\n![pareto](plots/pareto.png)\n\n![hypervolume](plots/hypervolume.png)\n\n",
            r.evaluated.len(),
            r.seconds,
            r.front.len(),
            r.chosen.alpha.iter().map(|a| format!("{a:.2}")).collect::<Vec<_>>().join(", "),
            r.experts.join(", "),
            r.chosen.rank,
            100.0 * r.chosen.accuracy,
            r.chosen.kl,
            r.chosen.ms_per_token,
            r.chosen.bytes as f64 / 1e6,
            100.0 * r.base.accuracy,
            r.base.ms_per_token,
            r.base.bytes as f64 / 1e6,
            r.rule
        );
    } else {
        s += "No expert gained on validation, so there is no mixture.\n\n";
    }
    s += &format!(
        "## Test accuracy (%), {} items per domain\n\n| domain | {} |\n|---|{}\n",
        table.n,
        table.columns.join(" | "),
        "---|".repeat(table.columns.len())
    );
    for (d, row) in &table.accuracy {
        let cells: Vec<String> = table.columns.iter().map(|c| pct(row.get(c))).collect();
        s += &format!("| {d} | {} |\n", cells.join(" | "));
    }
    let mean = |c: &str| {
        let v: Vec<f64> = table
            .accuracy
            .values()
            .filter_map(|r| r.get(c))
            .copied()
            .collect();
        (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64)
    };
    let cells: Vec<String> = table
        .columns
        .iter()
        .map(|c| pct(mean(c).as_ref()))
        .collect();
    s += &format!("| **mean** | {} |\n\n", cells.join(" | "));
    for (k, v) in &table.routing {
        s += &format!("Routing accuracy of `{k}` dispatch: {:.1}%.\n", 100.0 * v);
    }
    s += "\n![test](plots/capability.png)\n\n## Time and memory per stage\n\n| stage | wall time (s) | peak RSS (MB) |\n|---|---|---|\n";
    for r in records {
        s += &format!(
            "| {} | {:.1} | {} |\n",
            r.name,
            r.seconds,
            r.peak_rss_mb.map_or("—".into(), |m| format!("{m:.0}"))
        );
    }
    s += "\n![memory](plots/memory.png)\n\n## Notes\n\n";
    for n in &m.notes {
        s += &format!("- {n}\n");
    }
    s
}

/// The mixture of a handoff.
pub struct HandoffMixture {
    /// Its experts, in α order.
    pub experts: Vec<Expert>,
    /// α*.
    pub alpha: Vec<f64>,
    /// Singular directions of the deployed delta.
    pub rank: usize,
}

/// A handoff directory, opened for reuse (`bitsvf inspect`, `eval --mixture`, `generate`).
pub struct Handoff {
    /// The directory.
    pub dir: PathBuf,
    /// Its manifest.
    pub manifest: Manifest,
    /// The base model in `model/`.
    pub ck: Checkpoint,
}

impl Handoff {
    /// Read `dir/manifest.json` and the base model, and check that they belong together.
    pub fn open(dir: &Path) -> Result<Handoff> {
        let mp = dir.join("manifest.json");
        if !mp.is_file() {
            return Err(Error::Input(format!(
                "{} is not a bitsvf handoff directory (no manifest.json)",
                dir.display()
            )));
        }
        let manifest: Manifest = read_json(&mp)?;
        if manifest.format != MANIFEST_FORMAT {
            return Err(Error::config(
                &mp,
                "format",
                format!("expected `{MANIFEST_FORMAT}`, found `{}`", manifest.format),
            ));
        }
        let file = manifest.base_model["file"]
            .as_str()
            .ok_or_else(|| Error::config(&mp, "base_model.file", "missing"))?;
        let ck = crate::engine::checkpoint::load(&dir.join(file))?;
        let want = manifest.base_model["content_hash"].as_str().unwrap_or("");
        if ck.content_hash() != want {
            return Err(Error::config(
                &mp,
                "base_model.content_hash",
                format!(
                    "{} has content hash {}…, the manifest says {}…",
                    dir.join(file).display(),
                    &ck.content_hash()[..12],
                    &want[..12.min(want.len())]
                ),
            ));
        }
        Ok(Handoff {
            dir: dir.to_path_buf(),
            manifest,
            ck,
        })
    }

    fn load_expert(&self, file: &str) -> Result<Expert> {
        let path = self.dir.join(file);
        let e = Expert::load(&path)?;
        e.check_base(&self.ck, &path)?;
        Ok(e)
    }

    /// Every expert of the library, in manifest order.
    pub fn experts(&self) -> Result<Vec<Expert>> {
        (self.manifest.experts.iter())
            .map(|e| self.load_expert(&e.file))
            .collect()
    }

    /// The classifier expert, if the run trained one.
    pub fn classifier(&self) -> Result<Option<Expert>> {
        self.manifest
            .classifier
            .as_ref()
            .map(|c| self.load_expert(&c.file))
            .transpose()
    }

    /// The mixture's experts (in α order), α* and the deployed rank; `None` without a mixture.
    pub fn mixture(&self) -> Result<Option<HandoffMixture>> {
        let Some(m) = &self.manifest.mixture else {
            return Ok(None);
        };
        let mp = self.dir.join("manifest.json");
        let names: Vec<String> = serde_json::from_value(m["experts"].clone())
            .map_err(|e| Error::config(&mp, "mixture.experts", e.to_string()))?;
        let alpha: Vec<f64> = serde_json::from_value(m["alpha"].clone())
            .map_err(|e| Error::config(&mp, "mixture.alpha", e.to_string()))?;
        let rank = m["rank"]
            .as_u64()
            .ok_or_else(|| Error::config(&mp, "mixture.rank", "missing"))?
            as usize;
        let experts = names
            .iter()
            .map(|n| {
                let entry = (self.manifest.experts.iter())
                    .find(|e| &e.name == n)
                    .ok_or_else(|| {
                        Error::config(&mp, "mixture.experts", format!("no expert named `{n}`"))
                    })?;
                self.load_expert(&entry.file)
            })
            .collect::<Result<Vec<_>>>()?;
        if alpha.len() != experts.len() {
            return Err(Error::config(
                &mp,
                "mixture.alpha",
                format!("{} weights for {} experts", alpha.len(), experts.len()),
            ));
        }
        Ok(Some(HandoffMixture {
            experts,
            alpha,
            rank,
        }))
    }

    /// The run's data sources: its built-in domains and the user datasets copied into `data/`.
    pub fn sources(&self) -> Result<Vec<DataSource>> {
        let datasets = (self.manifest.options.datasets.iter())
            .map(|n| read_json::<Dataset>(&self.dir.join("data").join(format!("{n}.json"))))
            .collect::<Result<Vec<_>>>()?;
        Ok(sources_of(&self.manifest.options.domains, &datasets))
    }

    /// A text summary; every file it names is loaded and checked.
    pub fn summary(&self) -> Result<String> {
        let m = &self.manifest;
        let mut s = format!(
            "bitsvf handoff {} (bitsvf {})\nbase model: {} ({}), content hash {}… — verified\n\nexperts:\n",
            self.dir.display(),
            m.bitsvf_version,
            m.base_model["name"].as_str().unwrap_or("?"),
            m.base_model["format"].as_str().unwrap_or("?"),
            &self.ck.content_hash()[..12],
        );
        let experts = self.experts()?;
        for (e, x) in m.experts.iter().zip(&experts) {
            s += &format!(
                "  {:<14} {:<24} val {:>5.1}% (base {:>5.1}%)  {} z-vectors, {}{}\n",
                e.name,
                e.domains.join(","),
                100.0 * e.val_accuracy,
                100.0 * e.base_val_accuracy,
                x.z.len(),
                e.file,
                if e.in_mixture {
                    ""
                } else {
                    "  (not in the mixture)"
                }
            );
        }
        if let Some(c) = &m.classifier {
            self.classifier()?;
            s += &format!(
                "  {:<14} {:<24} val {:>5.1}%  {}\n",
                c.name,
                "(dispatch labels)",
                100.0 * c.val_accuracy,
                c.file
            );
        }
        match self.mixture()? {
            Some(HandoffMixture {
                experts,
                alpha,
                rank,
            }) => {
                let parts: Vec<String> = (experts.iter().zip(&alpha))
                    .map(|(e, a)| format!("{a:.3}·{}", e.meta.name))
                    .collect();
                s += &format!(
                    "\nmixture α*: {}, deployed with {rank} singular directions\n",
                    parts.join(" + ")
                );
            }
            None => s += "\nno mixture\n",
        }
        if let Ok(table) = serde_json::from_value::<TestTable>(m.metrics["test"].clone()) {
            s += &format!(
                "\ntest accuracy (%), mean over {} domains:\n",
                table.accuracy.len()
            );
            for c in &table.columns {
                let v: Vec<f64> = table
                    .accuracy
                    .values()
                    .filter_map(|r| r.get(c))
                    .copied()
                    .collect();
                if !v.is_empty() {
                    s += &format!(
                        "  {c:<28} {:>5.1}\n",
                        100.0 * v.iter().sum::<f64>() / v.len() as f64
                    );
                }
            }
        }
        Ok(s)
    }
}

/// One figure of the manifest, measured again.
#[derive(Debug, Clone, Serialize)]
pub struct Reproduced {
    /// Test domain.
    pub domain: String,
    /// Test-table column.
    pub column: String,
    /// The manifest's value.
    pub manifest: f64,
    /// Measured now.
    pub measured: f64,
}

/// Re-measure the mixture columns of the handoff's test table (same items, same forms).
pub fn reproduce(
    h: &Handoff,
    tok: &dyn Tokenizer,
    cache: &SvdCache,
    mut progress: impl FnMut(usize, usize),
) -> Result<Vec<Reproduced>> {
    let mp = h.dir.join("manifest.json");
    let table: TestTable = serde_json::from_value(h.manifest.metrics["test"].clone())
        .map_err(|e| Error::config(&mp, "metrics.test", e.to_string()))?;
    let HandoffMixture {
        experts,
        alpha,
        rank,
    } = h.mixture()?.ok_or_else(|| {
        Error::Input(format!(
            "{} has no mixture (no expert gained)",
            h.dir.display()
        ))
    })?;
    let sources = h.sources()?;
    let (f, _) = factors(&h.ck, experts[0].meta.targets, cache)?;
    let mut mixer = Mixer::new(&h.ck, experts.clone(), cache)?;
    let mut deployer = crate::adapt::mixture_search::Deployer::new(&h.ck, cache, &experts, &f)?;
    let mut out = Vec::new();
    for (i, (d, row)) in table.accuracy.iter().enumerate() {
        progress(i, table.accuracy.len());
        let source = (sources.iter().find(|s| s.name() == *d))
            .ok_or_else(|| Error::config(&mp, "metrics.test", format!("unknown source `{d}`")))?;
        let items = source.test(table.n, table.seed)?;
        for column in [columns::MIXTURE, columns::MIXTURE_DEPLOYED] {
            let Some(&want) = row.get(column) else {
                continue;
            };
            let measured = if column == columns::MIXTURE {
                accuracy(mixer.model(&alpha)?, tok, &items, source)?
            } else {
                accuracy(deployer.deploy(&alpha, rank)?.0, tok, &items, source)?
            };
            out.push(Reproduced {
                domain: d.clone(),
                column: column.to_string(),
                manifest: want,
                measured,
            });
        }
    }
    Ok(out)
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
