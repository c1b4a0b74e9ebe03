//! [`run`], the main job, one function per stage. The handoff directory is assembled in
//! `<out>.partial` and renamed to `<out>` last, so `<out>` is either absent or complete.

use crate::adapt::discover::{discover, Discovery};
use crate::adapt::dispatch::{
    calibrate_threshold, classifier_guess, classifier_items, prompt_guess, CemFit, Mixer,
    Thresholds, DENSE,
};
use crate::adapt::mixture_search::{search, Problem, SearchConfig, SearchReport};
use crate::adapt::selection::select;
use crate::dist::{barrier, broadcast, groups, is_root, map, Comm, Solo};
use crate::engine::checkpoint::{save_native, Checkpoint};
use crate::engine::model::Model;
use crate::engine::tokenizer::Tokenizer;
use crate::error::{Error, Result};
use crate::eval::bench::{peak_rss_mb, reset_peak_rss};
use crate::eval::recovery;
use crate::eval::recovery::RecoveryReport;
use crate::io::write_json;
use crate::pipeline::config::{sources_of, RunConfig};
use crate::pipeline::deal::{deal, job_cost};
use crate::pipeline::handoff::{handoff, ExpertEntry, HandoffParts, Manifest, SvdStats};
use crate::pipeline::stages::StageRecord;
use crate::pipeline::stages::{Event, Run};
use crate::pipeline::table::{evaluate_all, TestTable};
use crate::pipeline::workdir::{completed, open_work_dir, work_dir, LOCK_FILE};
use crate::search::CemConfig;
use crate::svf::attach::adapted_model;
use crate::svf::base::Base;
use crate::svf::expert::Expert;
use crate::svf::svd::{Svd, SvdCache};
use crate::tasks::remote::{generate_items, GeneratorConfig};
use crate::tasks::{DataSource, Dataset, Domain, Item, Verifier};
use crate::train::expert::train_expert_on;
use crate::train::{TrainConfig, TrainSummary};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// What every stage reads: the base model, the settings, the data sources and the work
/// directory.
struct Job<'a> {
    base: &'a Base<'a>,
    tok: &'a dyn Tokenizer,
    cfg: &'a RunConfig,
    /// The built-in domains, then the user datasets.
    sources: Vec<DataSource>,
    /// `<out>.partial`.
    work: PathBuf,
    /// The ranks sharing the run.
    ranks: &'a Ranks<'a>,
}

/// A trained expert: its manifest entry and its z vectors.
pub(crate) type Trained = (ExpertEntry, Expert);

/// The ranks a run is shared over: one process ([`Ranks::alone`]) or the ranks of an MPI job.
/// Rank 0 owns the handoff directory, the stage files and the progress; experts are dealt to
/// groups of `per_expert` ranks (each expert's steps data-parallel within its group), and the
/// measurements of stages 3, 5, 6 and 7 are scattered over all ranks and gathered.
pub struct Ranks<'a> {
    /// The job's ranks.
    pub comm: &'a dyn Comm,
    /// Ranks training each expert together.
    pub per_expert: usize,
}

impl Ranks<'static> {
    /// One process.
    pub fn alone() -> Self {
        Ranks {
            comm: &Solo,
            per_expert: 1,
        }
    }
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
    let inputs = (ck, model_name, tok, cfg, out, cache);
    run_on(
        &Ranks::alone(),
        inputs,
        generator,
        datasets,
        model_files,
        events,
    )
}

/// What a run is made of: the base checkpoint, its name, the tokenizer, the settings, the
/// handoff directory and the SVD cache.
pub type RunInputs<'a> = (
    &'a Checkpoint,
    &'a str,
    &'a dyn Tokenizer,
    &'a RunConfig,
    &'a Path,
    &'a SvdCache,
);

/// [`run`] shared over `ranks`: every rank calls it with the same arguments (the same
/// settings, the same files on a filesystem they share); each returns the manifest. `events`
/// matter on rank 0 only.
pub fn run_on(
    ranks: &Ranks,
    (ck, model_name, tok, cfg, out, cache): RunInputs,
    generator: Option<&GeneratorConfig>,
    datasets: &[Dataset],
    model_files: &[PathBuf],
    events: &mut dyn FnMut(Event),
) -> Result<Manifest> {
    let comm = ranks.comm;
    cfg.validate("settings")?;
    check_datasets(cfg, datasets)?;
    let sources = sources_of(&cfg.domains, datasets);
    for source in &sources {
        crate::eval::check_fits(ck.config.max_position_embeddings, tok, source)?;
        source.check_splits()?;
    }
    // One base for every stage: hashed once, SVD factors and the packed model built once.
    let base = Base::new(ck, cache);
    let root = is_root(comm);
    let here = root.then(|| completed(base.hash(), cfg, out)).transpose()?;
    if let Some(done) = broadcast(comm, "the finished handoff", here)? {
        events(Event::Stage("8-handoff", true));
        return Ok(done);
    }
    let (work, lock) = match root {
        true => {
            let (work, lock) = open_work_dir(base.hash(), cfg, out)?;
            (work, Some(lock))
        }
        false => (work_dir(out), None),
    };
    barrier(comm, "opening the work directory")?;
    let job = Job {
        base: &base,
        tok,
        cfg,
        sources,
        work: work.clone(),
        ranks,
    };
    let mut run = Run {
        work: work.clone(),
        records: Vec::new(),
        events,
        comm,
    };
    let recovery = load_verify(&job, &mut run, datasets, model_files)?;
    let svd = svd_stats(&job, &mut run)?;
    let f = base.factors(cfg.train.targets)?;
    let found = discover_experts(&job, &mut run, base.packed()?, &f.svd)?;
    let (experts, (classifier, classifier_expert)) =
        train_experts(&job, &mut run, &found, generator)?;
    let thresholds = calibrate_dispatch(&job, &mut run, &found, &experts, &classifier_expert)?;
    let pool: Vec<Expert> = (experts.iter())
        .filter(|(e, _)| e.in_mixture)
        .map(|(_, x)| x.clone())
        .collect();
    let searched = search_mixture(&job, &mut run, &f.svd, &experts, &pool)?;
    let cem = fit_cem(&job, &mut run, &pool)?;
    let table: TestTable = run.stage("7-evaluate", |ev| {
        evaluate_all(
            &base,
            tok,
            cfg,
            &job.sources,
            &experts,
            &pool,
            (&classifier_expert, thresholds),
            searched.as_ref(),
            &cem,
            comm,
            ev,
        )
    })?;

    // 8. Hand off.
    (run.events)(Event::Stage("8-handoff", false));
    let Some(lock) = lock else {
        let manifest = broadcast(comm, "the manifest", None)?;
        barrier(comm, "the handoff's rename")?;
        return Ok(manifest);
    };
    let manifest = handoff(
        &base,
        model_name,
        cfg,
        &work,
        &run.records,
        HandoffParts {
            recovery,
            svd,
            found: &found,
            experts: &experts,
            classifier,
            thresholds,
            searched: searched.as_ref(),
            cem: &cem,
            table: &table,
        },
    )?;
    let manifest = broadcast(comm, "the manifest", Some(manifest))?;
    // The lock file goes before the rename (a second run that opened it finds it locked, or
    // finds `out` complete); the lock itself is held until `lock` drops.
    let lock_path = work.join(LOCK_FILE);
    std::fs::remove_file(&lock_path).map_err(|e| Error::io(&lock_path, e))?;
    std::fs::rename(&work, out).map_err(|e| Error::io(out, e))?;
    drop(lock);
    crate::io::sync_dir(
        out.parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new(".")),
    )?;
    // The other ranks return once `out` is complete.
    barrier(comm, "the handoff's rename")?;
    Ok(manifest)
}

/// The datasets passed to [`run`] must be the ones `cfg` names, and none may shadow a
/// built-in domain.
fn check_datasets(cfg: &RunConfig, datasets: &[Dataset]) -> Result<()> {
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
    Ok(())
}

/// Stage 1: load, dequantize and verify; keep the untouched ternary base, the user datasets
/// and the model's extra files.
fn load_verify(
    job: &Job,
    run: &mut Run,
    datasets: &[Dataset],
    model_files: &[PathBuf],
) -> Result<RecoveryReport> {
    let (ck, cfg, work) = (job.base.ck(), job.cfg, &job.work);
    run.stage_on_root("1-load-verify", |_| {
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
        Ok(report)
    })
}

/// Stage 2: the SVD of the targets (cached across runs by content hash), loaded into the base.
/// Under MPI rank 0 computes (and caches) them; the others then load them from the cache.
fn svd_stats(job: &Job, run: &mut Run) -> Result<SvdStats> {
    run.stage_on_root("2-svd", |_| {
        Ok(SvdStats::from(
            &job.base.factors(job.cfg.train.targets)?.stats,
        ))
    })
}

/// Stage 3: measure every source and group them into experts.
fn discover_experts(
    job: &Job,
    run: &mut Run,
    base: &Model,
    f: &BTreeMap<String, Svd>,
) -> Result<Discovery> {
    let cfg = job.cfg;
    run.stage("3-discover", |ev| {
        let total = job.sources.len();
        discover(
            job.base.ck(),
            base,
            f,
            job.tok,
            &job.sources,
            cfg.discover_n,
            cfg.grad_items,
            cfg.rule,
            job.ranks.comm,
            |i, name| ev(Event::Progress(i, total, format!("measuring {name}"))),
        )
    })
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

/// One expert to train in stage 4: its name, data, file (under the work directory) and steps.
struct ExpertJob {
    name: String,
    data: DataSource,
    domains: Vec<String>,
    file: String,
    steps: usize,
}

/// Stage 4: one expert per group of the discovery (each its own stage `4-train-<name>`,
/// resumable within the stage), on generated items when a generator is given (stage
/// `4-data-<name>`) and the group is made of built-in domains; then the classifier expert,
/// which labels a prompt with its expert (or none). Under MPI the experts still to train are
/// dealt round the groups of ranks, trained data-parallel within each group, and gathered.
fn train_experts(
    job: &Job,
    run: &mut Run,
    found: &Discovery,
    generator: Option<&GeneratorConfig>,
) -> Result<(Vec<Trained>, Trained)> {
    let cfg = job.cfg;
    let mut jobs = Vec::new();
    for group in &found.grouping.groups {
        let mut data = group_data(group, &job.sources)?;
        let name = data.name();
        let builtin = group.iter().all(|n| Domain::by_name(n).is_ok());
        if let (Some(g), true) = (generator, builtin) {
            let items = generated_items(run, cfg, g, group, &name)?;
            data = DataSource::Pool {
                of: Box::new(data),
                items,
            };
        }
        jobs.push(ExpertJob {
            file: format!("experts/{name}.safetensors"),
            name,
            data,
            domains: group.clone(),
            steps: cfg.train.steps,
        });
    }
    let (labels, others) = label_sources(job, found)?;
    let items = classifier_items(&labels, &others, cfg.classifier_items, cfg.seed)?;
    jobs.push(ExpertJob {
        name: "classifier".into(),
        data: DataSource::Dataset(Dataset {
            name: "classifier".into(),
            verifier: Verifier::Exact,
            items,
        }),
        domains: vec!["dispatch".into()],
        file: "experts/classifier.safetensors".into(),
        steps: cfg.classifier_steps,
    });
    let summaries = train_jobs(job, run, &jobs)?;
    let mut experts = Vec::new();
    for (j, summary) in jobs.into_iter().zip(summaries) {
        let expert = Expert::load(&job.work.join(&j.file))?;
        let gain = summary.best_val_accuracy - summary.base_val_accuracy;
        let entry = ExpertEntry {
            in_mixture: j.name != "classifier" && gain > cfg.min_gain,
            name: j.name,
            file: j.file,
            domains: j.domains,
            val_accuracy: summary.best_val_accuracy,
            base_val_accuracy: summary.base_val_accuracy,
            training: summary,
        };
        experts.push((entry, expert));
    }
    let classifier = experts.pop().expect("the classifier is the last job");
    Ok((experts, classifier))
}

/// Stage `4-data-<name>`: `cfg.generated_items` verified items per domain of `group` from the
/// generator (rank 0 calls it; every rank gets the items).
fn generated_items(
    run: &mut Run,
    cfg: &RunConfig,
    g: &GeneratorConfig,
    group: &[String],
    name: &str,
) -> Result<Vec<Item>> {
    run.stage_on_root(&format!("4-data-{name}"), |ev| {
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
    })
}

/// The stages `4-train-<name>` of `jobs`, in order: those that finished before are read back;
/// the others are dealt to the groups of ranks ([`deal`]), trained (the group's rank 0 saves
/// each stage as soon as it is done), and their summaries gathered on every rank.
fn train_jobs(job: &Job, run: &mut Run, jobs: &[ExpertJob]) -> Result<Vec<TrainSummary>> {
    let (comm, cfg) = (job.ranks.comm, job.cfg);
    let stage = |j: &ExpertJob| format!("4-train-{}", j.name);
    let mut done = Vec::with_capacity(jobs.len());
    for j in jobs {
        done.push(run.finished(&stage(j))?);
    }
    let (group_no, groups, group) = groups(comm, job.ranks.per_expert)?;
    let mut mine: Vec<(usize, StageRecord, TrainSummary)> = Vec::new();
    let left: Vec<usize> = (0..jobs.len()).filter(|&i| !done[i]).collect();
    let cost = (left.iter())
        .map(|&i| {
            job_cost(
                job.tok,
                &jobs[i].data,
                jobs[i].steps,
                cfg.train.batch_prompts,
            )
        })
        .collect::<Result<Vec<_>>>()?;
    let dealt = deal(&cost, groups);
    let ours = (left.iter().zip(&dealt)).filter_map(|(&i, &g)| (g == group_no).then_some(i));
    for i in ours {
        let (j, name) = (&jobs[i], stage(&jobs[i]));
        (run.events)(Event::Stage(&name, false));
        reset_peak_rss();
        let t0 = std::time::Instant::now();
        let train = TrainConfig {
            seed: cfg.seed,
            steps: j.steps,
            ..cfg.train.clone()
        };
        let events = &mut *run.events;
        let path = job.work.join(&j.file);
        let summary = train_expert_on(
            group.as_ref(),
            job.base,
            job.tok,
            &j.data,
            &train,
            &path,
            true,
            |step, s| {
                events(Event::Progress(
                    step,
                    train.steps,
                    format!("training {}: loss {:.3} kl {:.4}", j.name, s.loss, s.kl),
                ));
                true
            },
        )?;
        let record = StageRecord {
            name,
            seconds: t0.elapsed().as_secs_f64(),
            peak_rss_mb: peak_rss_mb(),
        };
        if is_root(group.as_ref()) {
            run.save(&record, &summary)?;
            mine.push((i, record, summary));
        }
    }
    let mut trained: BTreeMap<usize, (StageRecord, TrainSummary)> = BTreeMap::new();
    for part in map(comm, "the trained experts", comm.size(), |_| {
        Ok(std::mem::take(&mut mine))
    })? {
        trained.extend(part.into_iter().map(|(i, r, s)| (i, (r, s))));
    }
    let mut out = Vec::with_capacity(jobs.len());
    for (i, j) in jobs.iter().enumerate() {
        out.push(match trained.remove(&i) {
            Some((record, summary)) => {
                run.records.push(record);
                summary
            }
            None => run.stage(&stage(j), |_| {
                Err(Error::Input(format!(
                    "stage {} was neither finished nor trained",
                    stage(j)
                )))
            })?,
        });
    }
    Ok(out)
}

/// The search settings with the α bounds that name no expert of `pool` (by name or domain)
/// left out: the settings may name any source, and discovery decides which are searched.
fn bounds_for(search: &SearchConfig, pool: &[Expert]) -> SearchConfig {
    let mut s = search.clone();
    s.alpha_bounds.retain(|key, _| {
        let used = pool.iter().any(|e| e.meta.answers_to(key));
        if !used {
            tracing::warn!("search.alpha_bounds.{key}: no searched expert covers it; unused");
        }
        used
    });
    s
}

/// Stage 4, calibration: when are the classifier and prompt dispatch unsure? Their guesses on
/// held-out prompts of every label set the confidence below which they answer "base".
fn calibrate_dispatch(
    job: &Job,
    run: &mut Run,
    found: &Discovery,
    experts: &[Trained],
    classifier: &Expert,
) -> Result<Thresholds> {
    let (labels, others) = label_sources(job, found)?;
    let names: Vec<String> = experts.iter().map(|(e, _)| e.name.clone()).collect();
    run.stage("4-calibrate-dispatch", |_| {
        let (model, base) = (
            adapted_model(job.base, classifier, DENSE)?,
            job.base.packed()?,
        );
        let truth = (labels.iter().enumerate().map(|(i, d)| (Some(i), d.clone())))
            .chain((!others.is_empty()).then(|| (None, DataSource::Group(others.clone()))));
        let mut prompts = Vec::new();
        for (label, d) in truth {
            for it in d.validation(CALIBRATION_ITEMS, job.cfg.seed + 8)? {
                prompts.push((label, it.prompt));
            }
        }
        // Each prompt's two guesses (by the rank it falls to, under MPI).
        let comm = job.ranks.comm;
        let guesses = map(comm, "the dispatch calibration", prompts.len(), |i| {
            let (label, prompt) = &prompts[i];
            let (c, pc) = classifier_guess(&model, job.tok, labels.len(), prompt)?;
            let (g, pg) = prompt_guess(base, &names, job.tok, prompt)?;
            Ok(((c, pc, *label), (g, pg, *label)))
        })?;
        let (by_classifier, by_prompt): (Vec<_>, Vec<_>) = guesses.into_iter().unzip();
        Ok(Thresholds {
            classifier: calibrate_threshold(&by_classifier).0,
            prompt: calibrate_threshold(&by_prompt).0,
        })
    })
}

/// The classifier's labels: each expert's data (by the discovery's groups), and the sources
/// no expert covers.
fn label_sources(job: &Job, found: &Discovery) -> Result<(Vec<DataSource>, Vec<DataSource>)> {
    let covered: Vec<String> = found.grouping.groups.iter().flatten().cloned().collect();
    let others: Vec<DataSource> = (job.sources.iter())
        .filter(|s| !covered.contains(&s.name()))
        .cloned()
        .collect();
    let labels: Vec<DataSource> = (found.grouping.groups.iter())
        .map(|g| group_data(g, &job.sources))
        .collect::<Result<_>>()?;
    Ok((labels, others))
}

/// Held-out prompts per label on which the dispatch thresholds are calibrated.
const CALIBRATION_ITEMS: usize = 40;

/// Stage 5: NSGA-II over mixtures of the experts that gained (`pool`), then the chosen
/// mixture saved as `experts/mixture.safetensors`. `None` when no expert gained.
fn search_mixture(
    job: &Job,
    run: &mut Run,
    f: &BTreeMap<String, Svd>,
    experts: &[Trained],
    pool: &[Expert],
) -> Result<Option<SearchReport>> {
    let (cfg, sources) = (job.cfg, &job.sources);
    let searched: Option<SearchReport> = run.stage("5-search", |ev| {
        if pool.is_empty() {
            return Ok(None);
        }
        let mut val = Vec::new();
        for (e, _) in experts.iter().filter(|(e, _)| e.in_mixture) {
            val.extend(
                group_data(&e.domains, sources)?.validation(cfg.search_val_n, cfg.seed + 1)?,
            );
        }
        let mut preserve = Vec::new();
        for d in sources {
            preserve.extend(d.validation(cfg.preserve_n, cfg.seed + 2)?);
        }
        let problem = Problem::new(job.base, job.tok, pool, &val, &preserve, &cfg.search)?;
        let mut problem = problem.spread_over(job.ranks.comm);
        let total = cfg.search.generations;
        let mut report = search(
            &mut problem,
            &bounds_for(&cfg.search, pool),
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
        ev(Event::Progress(
            total,
            total,
            format!(
                "selection: {} candidates on the selection split",
                report.offered.len()
            ),
        ));
        let sel = selection_items(job, experts, &val)?;
        let offered = report.offered.clone();
        let (z, anyway) = (cfg.search.select_z, cfg.search.hand_off_within_noise);
        report.selection = Some(select(&mut problem, offered, &sel, z, anyway)?);
        Ok(Some(report))
    })?;
    let chosen = searched
        .as_ref()
        .and_then(|s| s.selection.as_ref()?.chosen());
    if let Some(chosen) = chosen {
        let refs: Vec<&Expert> = pool.iter().collect();
        let mut mixed = crate::svf::expert::mixture(&refs, &chosen.alpha, f)?;
        mixed.meta.name = "mixture".into();
        if is_root(job.ranks.comm) {
            mixed.save(&job.work.join("experts/mixture.safetensors"))?;
        }
    }
    Ok(searched)
}

/// The selection split: `select_n` validation items per searched expert's data, none of them
/// among the search's `val` items.
fn selection_items(job: &Job, experts: &[Trained], val: &[Item]) -> Result<Vec<Item>> {
    let cfg = job.cfg;
    let mut out = Vec::new();
    for (e, _) in experts.iter().filter(|(e, _)| e.in_mixture) {
        let data = group_data(&e.domains, &job.sources)?;
        let draw = cfg.search_val_n + cfg.select_n;
        out.extend(data.validation_except(draw, cfg.select_n, cfg.seed + 6, val)?);
    }
    Ok(out)
}

/// Stage 6: few-shot CEM per source, on labelled validation examples: α over `pool` by
/// source, checked against the base on as many held-out shots again.
fn fit_cem(job: &Job, run: &mut Run, pool: &[Expert]) -> Result<BTreeMap<String, CemFit>> {
    let (cfg, sources) = (job.cfg, &job.sources);
    run.stage("6-cem", |ev| {
        let mut out = BTreeMap::new();
        if pool.is_empty() {
            return Ok(out);
        }
        let mut mixer = Mixer::new(job.base, pool.to_vec())?;
        let fits = map(job.ranks.comm, "CEM", sources.len(), |i| {
            let d = &sources[i];
            ev(Event::Progress(
                i,
                sources.len(),
                format!("CEM on {} shots of {}", cfg.shots, d.name()),
            ));
            let shots = d.validation(cfg.shots, cfg.seed + 3)?;
            let r = mixer.fit_cem(
                job.tok,
                &shots,
                &CemConfig {
                    seed: cfg.seed,
                    ..cfg.cem.clone()
                },
            )?;
            let held_out =
                d.validation_except(3 * cfg.shots, 2 * cfg.shots, cfg.seed + 7, &shots)?;
            mixer.check_cem(job.base.packed()?, job.tok, r.best, &held_out)
        })?;
        for (d, fit) in sources.iter().zip(fits) {
            out.insert(d.name(), fit);
        }
        Ok(out)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::svf::expert::test_expert;
    use crate::svf::Parameterization;

    fn expert(name: &str, domains: &[&str]) -> Expert {
        let ck = Checkpoint::tiny(16, 24, 1);
        let mut e = test_expert(&ck, name, Parameterization::Paper, BTreeMap::new());
        e.meta.domains = domains.iter().map(|d| d.to_string()).collect();
        e
    }

    /// The documented `alpha_bounds {"count": …}` works whatever discovery settles on: a
    /// bound by domain applies to the expert covering it, and one no searched expert covers
    /// is left out (it failed the quick run's search before).
    #[test]
    fn alpha_bounds_name_experts_or_their_domains_and_unused_ones_are_left_out() {
        let mut search = SearchConfig::default();
        search.alpha_bounds.insert("count".into(), (0.0, 1.0));
        search.alpha_bounds.insert("sort".into(), (0.5, 1.5));
        search.alpha_bounds.insert("parity".into(), (0.0, 0.5));
        let pool = [
            expert("count+sort", &["count", "sort"]),
            expert("parity", &["parity"]),
        ];
        assert_eq!(bounds_for(&search, &pool).alpha_bounds, search.alpha_bounds);
        let pool = [expert("parity", &["parity"])];
        let kept = bounds_for(&search, &pool).alpha_bounds;
        assert_eq!(kept.keys().collect::<Vec<_>>(), vec!["parity"]);
    }
}
