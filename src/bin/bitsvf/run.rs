//! `bitsvf run`: the main job, end to end, into a handoff directory.

use crate::common::step_bar;
use anyhow::Result;
use bitsvf::dist::{is_root, Comm, Solo};
use bitsvf::engine::chat::TemplateChoice;
use bitsvf::engine::checkpoint::Checkpoint;
use bitsvf::engine::{checkpoint, tokenizer};
use bitsvf::pipeline::Ranks;
use bitsvf::pipeline::{self, Event, RunConfig, RunOverrides};
use bitsvf::svf::svd::SvdCache;
use bitsvf::tasks::remote::{api_key_from_env, GeneratorConfig, DEFAULT_KEY_ENV};
use bitsvf::tasks::Dataset;
use std::path::{Path, PathBuf};

#[derive(clap::Args)]
pub struct Args {
    /// Base model; default: the embedded model.
    #[arg(long)]
    model: Option<PathBuf>,
    /// Ternarize a float model's linears on load (BitNet b1.58's per-tensor absmean rule);
    /// without it a float model runs as float.
    #[arg(long)]
    ternarize: bool,
    /// Handoff directory to create (built in OUT.partial, renamed when complete).
    #[arg(long, default_value = "bitsvf-out")]
    out: PathBuf,
    /// A few minutes or less: 4 domains, 3 experts, a handful of steps (for tests).
    #[arg(long)]
    quick: bool,
    /// Seed (default 0).
    #[arg(long)]
    seed: Option<u64>,
    /// Training steps per expert (default 150; 6 with --quick).
    #[arg(long)]
    steps: Option<usize>,
    /// Held-out test items per domain (default 200; 12 with --quick).
    #[arg(long)]
    test_n: Option<usize>,
    /// JSON file of settings laid over the defaults (any fields of the run configuration
    /// in manifest.json's `options`, e.g. {"search": {"population": 32}, "train":
    /// {"steps": 300}}); flags given on the command line win.
    #[arg(long)]
    config: Option<PathBuf>,
    /// SVD cache directory (default: $BITSVF_CACHE or ~/.cache/bitsvf).
    #[arg(long)]
    cache_dir: Option<PathBuf>,
    /// A user JSONL dataset ({"prompt", "answer"} per line; splits 80/10/10 by a hash of
    /// the prompt) measured beside the built-in domains; repeat for several.
    #[arg(long)]
    data: Vec<PathBuf>,
    /// Verifier of the --data sets: exact, numeric[:TOL], choice:A,B or regex:PATTERN.
    #[arg(long, default_value = "exact")]
    verifier: String,
    /// Wrap the prompts of --data in a chat template as one user turn each: none, auto (the
    /// model's own, if it has one) or a Jinja FILE.
    #[arg(long, default_value = "none")]
    chat_template: TemplateChoice,
    /// Take the experts' training items from this OpenAI-compatible endpoint
    /// (e.g. http://127.0.0.1:8080/v1); every item is verified and cached on disk.
    #[arg(long)]
    generator_url: Option<String>,
    /// Model name sent to the endpoint.
    #[arg(long, default_value = "default", requires = "generator_url")]
    generator_model: String,
    /// Environment variable holding the endpoint's API key.
    #[arg(long, default_value = DEFAULT_KEY_ENV, requires = "generator_url")]
    generator_key_env: String,
    /// Most requests to the endpoint (retries included).
    #[arg(long, requires = "generator_url")]
    generator_max_requests: Option<usize>,
    /// Most tokens to spend at the endpoint.
    #[arg(long, requires = "generator_url")]
    generator_max_tokens: Option<u64>,
    /// Verified items per domain to obtain from the endpoint (default 2000; 40 with --quick).
    #[arg(long, requires = "generator_url")]
    generator_items: Option<usize>,
    /// Under MPI (`mpirun`, `srun`) or with --workers: ranks that train each expert
    /// together, data-parallel (1: every rank trains experts of its own).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=4096))]
    ranks_per_expert: u64,
    /// Without MPI: run the job as this many ranks on threads of this process, the cores
    /// shared out among them; the result is the one-rank result. Default: one per core (at
    /// most 8) for a model of at most 100 M parameters, whose small matrices gain little
    /// from several threads per rank; 1 for larger models (each rank holds its own copy of
    /// the model being trained).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=256))]
    workers: Option<u64>,
}

/// Models up to this many parameters run on one rank per core by default (`--workers`).
const SMALL_MODEL_PARAMETERS: usize = 100_000_000;

pub fn run(a: Args) -> Result<()> {
    let ck = crate::common::load_model(a.model.as_deref(), a.ternarize)?;
    #[cfg(feature = "mpi")]
    {
        if let Some(mpi) = bitsvf::dist::mpi::init()? {
            if a.workers.is_some_and(|n| n > 1) {
                mpi.abort("--workers is for runs without MPI; under mpirun/srun ask for ranks");
            }
            let result = run_on(&a, &ck, &mpi);
            if let Err(e) = &result {
                // The other ranks may be waiting for this one: end them all.
                mpi.abort(&format!("{e:#}"));
            }
            return result;
        }
    }
    let launched = bitsvf::dist::launched_ranks();
    if let Some(n) = launched.filter(|&n| n > 1 && !cfg!(feature = "mpi")) {
        anyhow::bail!(
            "started as one of {n} MPI ranks, but this bitsvf was built without MPI; build it \
             with `cargo build --release --features mpi` (or run it without mpirun/srun)"
        );
    }
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let workers = match a.workers {
        Some(n) => n as usize,
        None if ck.parameter_count() <= SMALL_MODEL_PARAMETERS => cores.min(8),
        None => 1,
    };
    if workers == 1 {
        return run_on(&a, &ck, &Solo);
    }
    let threads = (cores / workers).max(1);
    // candle sizes its own parallel work from the environment, not from the rank's rayon
    // pool: its matrix products split into RAYON_NUM_THREADS parts (the rank's threads, as
    // under `mpirun -x RAYON_NUM_THREADS`), and its large element-wise ops run on one
    // process-wide pool of spinning threads behind one lock, which ranks on threads would
    // queue for; with CANDLE_NUM_THREADS=1 they run inline on the rank's thread. Both are
    // read when first used, after loading the model.
    std::env::set_var("RAYON_NUM_THREADS", threads.to_string());
    std::env::set_var("CANDLE_NUM_THREADS", "1");
    run_on_threads(&a, &ck, workers, threads)
}

/// [`run_on`] by `workers` ranks on threads of this process, `threads` rayon threads each. A
/// rank that fails stops the others; the error reported is the one that stopped them.
fn run_on_threads(a: &Args, ck: &Checkpoint, workers: usize, threads: usize) -> Result<()> {
    let comms = bitsvf::dist::local::ranks(workers);
    let results: Vec<(Result<()>, bool)> = std::thread::scope(|s| {
        let handles: Vec<_> = (comms.into_iter())
            .map(|comm| {
                s.spawn(move || {
                    // A panic stops the other ranks too.
                    let guard = comm.abort_on_drop();
                    let rank = comm.rank();
                    let pool = rayon::ThreadPoolBuilder::new()
                        .num_threads(threads)
                        .thread_name(move |i| format!("rank{rank}-{i}"))
                        .build();
                    let result = match pool {
                        Ok(pool) => pool.install(|| run_on(a, ck, &comm)),
                        Err(e) => Err(e.into()),
                    };
                    guard.disarm();
                    match &result {
                        Ok(()) => (result, false),
                        Err(e) => {
                            let first = comm.abort(&format!("{e:#}"));
                            (result, first)
                        }
                    }
                })
            })
            .collect();
        (handles.into_iter())
            .map(|h| match h.join() {
                Ok(r) => r,
                Err(_) => (Err(anyhow::anyhow!("a worker thread panicked")), true),
            })
            .collect()
    });
    let mut errors: Vec<_> = (results.into_iter())
        .filter_map(|(r, first)| r.err().map(|e| (!first, e)))
        .collect();
    errors.sort_by_key(|(later, _)| *later);
    match errors.into_iter().next() {
        Some((_, e)) => Err(e),
        None => Ok(()),
    }
}

fn run_on(a: &Args, ck: &Checkpoint, comm: &dyn Comm) -> Result<()> {
    let root = is_root(comm);
    let mut datasets = (a.data.iter())
        .map(|p| Ok(Dataset::load_jsonl(p, a.verifier.parse()?)?))
        .collect::<Result<Vec<_>>>()?;
    let tok = tokenizer::for_model(a.model.as_deref(), &ck.config)?;
    crate::common::wrap_in_chat_template(
        &a.chat_template,
        a.model.as_deref(),
        tok.as_ref(),
        &mut datasets,
    )?;
    let cache_root = a.cache_dir.clone().unwrap_or_else(SvdCache::default_dir);
    let (cfg, generator) = config(a, &datasets, &cache_root)?;
    let cache = SvdCache::new(cache_root);
    let model_files: Vec<PathBuf> = (a.model.as_deref())
        .and_then(tokenizer::file_for_model)
        .into_iter()
        .collect();
    let t0 = std::time::Instant::now();
    let bar = match root {
        true => step_bar(1)?,
        false => indicatif::ProgressBar::hidden(),
    };
    let ranks = Ranks {
        comm,
        per_expert: a.ranks_per_expert as usize,
    };
    let name = checkpoint::display_name(a.model.as_deref());
    let manifest = pipeline::run_on(
        &ranks,
        (ck, &name, tok.as_ref(), &cfg, &a.out, &cache),
        generator.as_ref(),
        &datasets,
        &model_files,
        &mut |e| match e {
            _ if !root => {}
            Event::Stage(name, done) => {
                let t = t0.elapsed().as_secs_f64();
                bar.suspend(|| {
                    if done {
                        eprintln!("stage {name}: finished before, skipped");
                    } else {
                        eprintln!("stage {name} (at {t:.0} s)");
                    }
                });
                bar.set_position(0);
                bar.set_message(name.to_string());
            }
            Event::Progress(done, total, msg) => {
                bar.set_length(total as u64);
                bar.set_position(done as u64);
                bar.set_message(msg);
            }
        },
    )?;
    bar.finish_and_clear();
    if !root {
        return Ok(());
    }
    let report = std::fs::read_to_string(a.out.join("report.md"))?;
    println!("{report}");
    println!(
        "wrote {} ({} experts{}) in {:.0} s",
        a.out.display(),
        manifest.experts.len(),
        if manifest.mixture.is_some() {
            ", mixture"
        } else {
            ""
        },
        t0.elapsed().as_secs_f64()
    );
    Ok(())
}

/// The run's settings ([`RunConfig::resolve`]) and the generator endpoint, if any (from the
/// flags, or from the settings file's `data_source`).
fn config(
    a: &Args,
    datasets: &[Dataset],
    cache_root: &Path,
) -> Result<(RunConfig, Option<GeneratorConfig>)> {
    let cfg = RunConfig::resolve(&RunOverrides {
        quick: a.quick,
        config: a.config.clone(),
        seed: a.seed,
        steps: a.steps,
        test_n: a.test_n,
        datasets: datasets.iter().map(|d| d.name.clone()).collect(),
        generator: (a.generator_url.clone()).map(|url| (url, a.generator_model.clone())),
        generated_items: a.generator_items,
    })?;
    let generator = cfg.generator_endpoint()?.map(|(url, model)| {
        let mut g = GeneratorConfig::new(url, model, cache_root.join("generated"));
        g.api_key = api_key_from_env(&a.generator_key_env);
        if let Some(v) = a.generator_max_requests {
            g.max_requests = v;
        }
        if let Some(v) = a.generator_max_tokens {
            g.max_tokens = v;
        }
        g
    });
    Ok((cfg, generator))
}
