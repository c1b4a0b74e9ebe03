//! The `bitsvf` command line: argument parsing only; the library does the work.

use anyhow::{Context, Result};
use bitsvf::engine::checkpoint::{self, st};
use bitsvf::engine::model::{parse_token_rows, Model, ModelOptions, WeightMode};
use bitsvf::tasks::{Dataset, Domain, Split};
use bitsvf::{
    adapt::discover,
    engine::{inspect, tokenizer},
    eval::recovery,
    pipeline::compare,
    svf::{expert, svd},
    train::pretrain,
};
use bitsvf::{eval, pipeline, svf, train};
use candle_core::DType;
use clap::{Parser, Subcommand, ValueEnum};
use std::collections::BTreeMap;
use std::path::PathBuf;

#[derive(Parser)]
#[command(
    name = "bitsvf",
    version,
    about = "Self-adaptive 1.58-bit language models: SVF experts for BitNet b1.58"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum Mode {
    /// Packed 2-bit weights, integer kernel.
    Ternary,
    /// Dequantized f32 weights.
    Dense,
}

#[derive(Clone, Copy, ValueEnum)]
enum SplitArg {
    Test,
    Validation,
}

#[derive(Clone, Copy, ValueEnum)]
enum ObjectiveArg {
    Reinforce,
    Sft,
}

#[derive(Clone, Copy, ValueEnum)]
enum ParamArg {
    /// W' = U diag(σ⊙z) Vᵀ, z₀ = 1 (the paper).
    Paper,
    /// Sigmoid scales with the Σσ-preserving rescale (the official code).
    Official,
    /// W' = z·W, one z per matrix (BitNet-aware, Option 2).
    AlphaLayer,
    /// W' = diag(z)·W, one z per output channel (BitNet-aware, Option 2).
    AlphaChannel,
    /// W + SVF delta on the top-k singular directions (hybrid, Option 3; k = --rank).
    LowRank,
}

#[derive(Subcommand)]
enum Command {
    /// Show a model's format, architecture, sizes and ternary statistics — or, for a handoff
    /// directory of `bitsvf run`, its experts, mixture and figures (every file checked).
    Inspect {
        /// Model file or directory (any supported format), or a handoff directory; default: the
        /// embedded model.
        model: Option<PathBuf>,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Run a forward pass on token ids and write the logits (f32 [rows, T, vocab]).
    Logits {
        /// Model file or directory; default: the embedded model.
        model: Option<PathBuf>,
        /// Token id rows, e.g. "1,2,3;4,5,6".
        #[arg(long)]
        tokens: String,
        /// Output safetensors file (tensors `logits` and `input_ids`).
        #[arg(long)]
        out: PathBuf,
        /// Weight mode.
        #[arg(long, value_enum, default_value = "ternary")]
        mode: Mode,
        /// Keep activations in f32 (no int8 activation quantization).
        #[arg(long)]
        no_act_quant: bool,
    },
    /// Write the dequantized f32 model (W = γ·W_t) and optionally verify the recovery.
    Dequantize {
        /// Model file or directory; default: the embedded model.
        model: Option<PathBuf>,
        /// Output directory (model.safetensors + config.json).
        #[arg(long)]
        out: PathBuf,
        /// Check exactness per matrix and argmax agreement ternary-vs-float (fails below 99%).
        #[arg(long)]
        verify: bool,
        /// Probe rows for --verify.
        #[arg(long, default_value_t = 8)]
        probe_rows: usize,
        /// Probe tokens per row for --verify (capped by the model's context).
        #[arg(long, default_value_t = 64)]
        probe_len: usize,
        /// Seed of the probe set.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Replace a non-empty output directory.
        #[arg(long)]
        force: bool,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Train the default model from scratch (quantization-aware, on the task suite).
    Pretrain {
        /// Output native model file.
        #[arg(long, default_value = "models/default.safetensors")]
        out: PathBuf,
        /// Optimizer steps.
        #[arg(long)]
        steps: Option<usize>,
        /// Sequences per step.
        #[arg(long)]
        batch_size: Option<usize>,
        /// Peak learning rate.
        #[arg(long)]
        lr: Option<f64>,
        /// Seed of init and data.
        #[arg(long)]
        seed: Option<u64>,
        /// Model width (d); FFN is 2.5·d.
        #[arg(long)]
        hidden: Option<usize>,
        /// Decoder layers.
        #[arg(long)]
        layers: Option<usize>,
        /// Continue an interrupted run from its saved state.
        #[arg(long)]
        resume: bool,
        /// Print the summary as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Greedy accuracy per domain on a held-out split.
    Eval {
        /// Model file or directory; default: the embedded model.
        model: Option<PathBuf>,
        /// Comma-separated domains (default: all).
        #[arg(long, value_delimiter = ',')]
        domains: Option<Vec<String>>,
        /// Items per domain (spread over difficulty levels 1–5).
        #[arg(long, default_value_t = 100)]
        n: usize,
        /// Seed of the item draw.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Held-out split.
        #[arg(long, value_enum, default_value = "test")]
        split: SplitArg,
        /// Apply this SVF expert before evaluating.
        #[arg(long)]
        expert: Option<PathBuf>,
        /// SVD cache directory for --expert.
        #[arg(long)]
        cache_dir: Option<PathBuf>,
        /// Evaluate a user JSONL dataset ({"prompt", "answer", "domain"} per line) instead.
        #[arg(long, conflicts_with = "domains")]
        data: Option<PathBuf>,
        /// Re-measure the mixture α* of a `bitsvf run` handoff directory on its test items,
        /// full SVF and as deployed, beside the manifest's figures (fails if they differ).
        #[arg(long, conflicts_with_all = ["data", "expert", "model"])]
        mixture: Option<PathBuf>,
        /// Verifier of --data: exact, numeric[:TOL], choice:A,B or regex:PATTERN.
        #[arg(long, default_value = "exact", requires = "data")]
        verifier: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Train one SVF expert (REINFORCE with verifier rewards + KL, or SFT) on a domain or a
    /// JSONL dataset.
    Train {
        /// Base model; default: the embedded model.
        model: Option<PathBuf>,
        /// Built-in domain to specialise on.
        #[arg(long, required_unless_present = "data", conflicts_with = "data")]
        domain: Option<String>,
        /// User JSONL dataset instead of a domain.
        #[arg(long)]
        data: Option<PathBuf>,
        /// Verifier of --data.
        #[arg(long, default_value = "exact")]
        verifier: String,
        /// Output expert file.
        #[arg(long)]
        out: PathBuf,
        /// Objective.
        #[arg(long, value_enum, default_value = "sft")]
        objective: ObjectiveArg,
        /// z parameterization.
        #[arg(long, value_enum, default_value = "paper")]
        parameterization: ParamArg,
        /// Width k of the low-rank parameterization (top-k singular directions).
        #[arg(long, default_value_t = train::DEFAULT_RANK)]
        rank: usize,
        /// Target matrices: mlp, attn or all.
        #[arg(long, default_value = "mlp")]
        targets: String,
        /// Most optimizer steps.
        #[arg(long)]
        steps: Option<usize>,
        /// KL coefficient λ.
        #[arg(long)]
        kl_coeff: Option<f64>,
        /// Learning rate.
        #[arg(long)]
        lr: Option<f64>,
        /// Keep the learning rate constant (default: cosine decay to 10%).
        #[arg(long)]
        constant_lr: bool,
        /// REINFORCE without the per-prompt mean-reward baseline.
        #[arg(long)]
        no_baseline: bool,
        /// Prompts per optimizer step.
        #[arg(long)]
        batch_prompts: Option<usize>,
        /// Sampled completions per prompt (REINFORCE).
        #[arg(long)]
        samples: Option<usize>,
        /// Validate every this many steps.
        #[arg(long)]
        eval_every: Option<usize>,
        /// Validation items.
        #[arg(long)]
        val_n: Option<usize>,
        /// Stop after this many validations without improvement.
        #[arg(long)]
        patience: Option<usize>,
        /// Seed.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// SVD cache directory (default: $BITSVF_CACHE or ~/.cache/bitsvf).
        #[arg(long)]
        cache_dir: Option<PathBuf>,
        /// Continue an interrupted run.
        #[arg(long)]
        resume: bool,
        /// Print the summary as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Measure the seed's integration options side by side: dequantize, alpha-layer,
    /// alpha-channel, hybrid-lowrank and requantize — accuracy of one expert per domain on its
    /// own held-out domain, resident bytes, decode tokens/s and the cost to switch experts.
    CompareOptions {
        /// Base model; default: the embedded model.
        model: Option<PathBuf>,
        /// Comma-separated domains, one expert each.
        #[arg(long, default_value = "count,sort,compare")]
        domains: String,
        /// Held-out test items per domain.
        #[arg(long)]
        n: Option<usize>,
        /// Directory of experts `<parameterization>_<domain>.safetensors`; missing ones are
        /// trained there with the default settings (default: compare-options/experts, or
        /// compare-options/experts-quick with --quick).
        #[arg(long)]
        experts: Option<PathBuf>,
        /// Small and fast: the first domain only, 40 items, 20 training steps.
        #[arg(long)]
        quick: bool,
        /// Training steps per expert (default: the trainer's default, 20 with --quick).
        #[arg(long)]
        steps: Option<usize>,
        /// Width k of the hybrid low-rank experts.
        #[arg(long, default_value_t = train::DEFAULT_RANK)]
        rank: usize,
        /// SVD cache directory (default: $BITSVF_CACHE or ~/.cache/bitsvf).
        #[arg(long)]
        cache_dir: Option<PathBuf>,
        /// Print `{"options": [{"name", "accuracy", "bytes", "tokens_per_s", …}]}`.
        #[arg(long)]
        json: bool,
    },
    /// Stage 1: measure the base model on every domain (validation split) and the direction of
    /// each domain's SVF gradient, and decide how many experts to train and on what.
    Discover {
        /// Base model; default: the embedded model.
        model: Option<PathBuf>,
        /// Validation items per domain for the capability report.
        #[arg(long, default_value_t = 200)]
        n: usize,
        /// Training items per domain for the gradient direction.
        #[arg(long, default_value_t = 64)]
        grad_items: usize,
        /// Merge domains whose gradient directions have at least this average cosine.
        #[arg(long, default_value_t = 0.5)]
        threshold: f64,
        /// SVD cache directory (default: $BITSVF_CACHE or ~/.cache/bitsvf).
        #[arg(long)]
        cache_dir: Option<PathBuf>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Mix experts of one parameterization into one expert file: z' = Σ α_k z_k on the applied
    /// singular-value scales (a one-hot α reproduces that expert exactly).
    Mix {
        /// Expert files.
        #[arg(required = true)]
        experts: Vec<PathBuf>,
        /// Comma-separated mixture weights, one per expert.
        #[arg(long, value_delimiter = ',', required = true)]
        alpha: Vec<f64>,
        /// Base model the experts were trained on; default: the embedded model.
        #[arg(long)]
        model: Option<PathBuf>,
        /// Output expert file.
        #[arg(long)]
        out: PathBuf,
        /// SVD cache directory (default: $BITSVF_CACHE or ~/.cache/bitsvf).
        #[arg(long)]
        cache_dir: Option<PathBuf>,
    },
    /// The main job: verify the model, discover the experts, train them and a classifier,
    /// search their mixture with NSGA-II, fit few-shot CEM, evaluate everything on held-out
    /// test sets and write the handoff directory. Rerun the same command to resume.
    Run {
        /// Base model; default: the embedded model.
        #[arg(long)]
        model: Option<PathBuf>,
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
        /// Take the experts' training items from this OpenAI-compatible endpoint
        /// (e.g. http://127.0.0.1:8080/v1); every item is verified and cached on disk.
        #[arg(long)]
        generator_url: Option<String>,
        /// Model name sent to the endpoint.
        #[arg(long, default_value = "default", requires = "generator_url")]
        generator_model: String,
        /// Environment variable holding the endpoint's API key.
        #[arg(long, default_value = bitsvf::tasks::remote::DEFAULT_KEY_ENV, requires = "generator_url")]
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
    },
    /// Two-pass inference: pass 1 picks the expert (or mixture) for the prompt, pass 2
    /// generates with it.
    Generate {
        /// The base model (default: the handoff's `model/`); it must be the model the experts
        /// were trained on.
        model: Option<PathBuf>,
        /// Handoff directory of `bitsvf run` (its experts, classifier and base model).
        #[arg(long)]
        experts: PathBuf,
        /// The prompt.
        #[arg(long)]
        prompt: String,
        /// How pass 1 chooses: prompt (the model labels its own prompt), classifier (the
        /// classifier expert labels it), cem (α fitted on --shots), none (base model).
        #[arg(long, default_value = "classifier")]
        dispatch: String,
        /// Labelled examples for --dispatch cem: JSONL lines {"prompt", "answer"}.
        #[arg(long)]
        shots: Option<PathBuf>,
        /// Most new tokens.
        #[arg(long, default_value_t = 32)]
        max_tokens: usize,
        /// Sampling temperature (0 = greedy).
        #[arg(long, default_value_t = 0.0)]
        temperature: f64,
        /// Sampling seed.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// SVD cache directory (default: $BITSVF_CACHE or ~/.cache/bitsvf).
        #[arg(long)]
        cache_dir: Option<PathBuf>,
    },
    /// Convert any supported model to the bitsvf native format (one safetensors file).
    Convert {
        /// Model file or directory; default: the embedded model.
        model: Option<PathBuf>,
        /// Output .safetensors file.
        #[arg(long)]
        out: PathBuf,
    },
}

/// The progress bar of a training loop of `steps` optimizer steps.
fn step_bar(steps: usize) -> Result<indicatif::ProgressBar> {
    Ok(indicatif::ProgressBar::new(steps as u64).with_style(
        indicatif::ProgressStyle::with_template(
            "{elapsed_precise} [{bar:30}] {pos}/{len} steps, eta {eta} {msg}",
        )?,
    ))
}

/// On Linux/glibc, back large allocations with transparent huge pages: training allocates
/// and frees tens of MB per step (logits and their gradients), and page faults on fresh
/// buffers cost ~10% of an SVF step (README, "SVF training step vs PyTorch"). glibc reads its
/// tunables only at start-up, so the process re-executes itself once with the setting;
/// `BITSVF_NO_HUGEPAGES=1` or an explicit `GLIBC_TUNABLES` opts out.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn use_huge_pages() {
    use std::os::unix::process::CommandExt;
    if std::env::var_os("GLIBC_TUNABLES").is_some()
        || std::env::var_os("BITSVF_NO_HUGEPAGES").is_some()
    {
        return;
    }
    if let Ok(exe) = std::env::current_exe() {
        let err = std::process::Command::new(exe)
            .args(std::env::args_os().skip(1))
            .env("GLIBC_TUNABLES", "glibc.malloc.hugetlb=1")
            .exec();
        // exec returns only on failure: carry on without huge pages.
        tracing::debug!("re-exec with huge pages failed: {err}");
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn use_huge_pages() {}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    // Only the training commands allocate enough per step to gain from huge pages.
    if matches!(
        cli.command,
        Command::Train { .. }
            | Command::Pretrain { .. }
            | Command::CompareOptions { .. }
            | Command::Run { .. }
    ) {
        use_huge_pages();
    }
    match run(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    match cli.command {
        Command::Inspect { model, json }
            if model
                .as_deref()
                .is_some_and(|m| m.join("manifest.json").is_file()) =>
        {
            let h = pipeline::Handoff::open(model.as_deref().expect("checked"))?;
            if json {
                println!("{}", serde_json::to_string_pretty(&h.manifest)?);
            } else {
                let summary = h.summary()?;
                print!("{summary}");
            }
        }
        Command::Inspect { model, json } => {
            let ck = checkpoint::load_or_default(model.as_deref())?;
            let report = inspect::inspect(&ck);
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{}", report.to_text());
            }
        }
        Command::Logits {
            model,
            tokens,
            out,
            mode,
            no_act_quant,
        } => {
            let rows = parse_token_rows(&tokens)?;
            let ck = checkpoint::load_or_default(model.as_deref())?;
            let options = ModelOptions {
                mode: match mode {
                    Mode::Ternary => WeightMode::Ternary,
                    Mode::Dense => WeightMode::Dense,
                },
                act_quant: !no_act_quant,
                dtype: DType::F32,
            };
            let net = Model::new(&ck, options)?;
            let logits = net.forward(&net.ids_tensor(&rows)?, None)?;
            let shape = logits.dims().to_vec();
            let values: Vec<f32> = logits.flatten_all()?.to_vec1()?;
            let ids: Vec<i64> = rows.iter().flatten().map(|&t| t as i64).collect();
            let tensors = BTreeMap::from([
                (
                    "logits".to_string(),
                    st::OwnedTensor::f32(shape.clone(), &values),
                ),
                (
                    "input_ids".to_string(),
                    st::OwnedTensor::i64(vec![rows.len(), rows[0].len()], &ids),
                ),
            ]);
            st::write_safetensors(&out, &tensors, None)?;
            eprintln!("wrote logits {:?} to {}", shape, out.display());
        }
        Command::Dequantize {
            model,
            out,
            verify,
            probe_rows,
            probe_len,
            seed,
            force,
            json,
        } => {
            let ck = checkpoint::load_or_default(model.as_deref())?;
            let report = if verify {
                let len = probe_len.min(ck.config.max_position_embeddings);
                let probe = recovery::random_probe(ck.config.vocab_size, probe_rows, len, seed);
                Some(recovery::verify(&ck, &probe)?)
            } else {
                None
            };
            if let Some(r) = &report {
                if json {
                    println!("{}", serde_json::to_string_pretty(r)?);
                } else {
                    print!("{}", r.to_text());
                }
                // Fail loudly and write nothing when the recovery is not faithful.
                r.check()?;
            }
            checkpoint::save_dequantized(&ck, &out, force)
                .with_context(|| format!("writing the dequantized model to {}", out.display()))?;
            eprintln!("wrote dequantized f32 model to {}", out.display());
        }
        Command::Pretrain {
            out,
            steps,
            batch_size,
            lr,
            seed,
            hidden,
            layers,
            resume,
            json,
        } => {
            let mut cfg = pretrain::PretrainConfig::default();
            if let Some(v) = steps {
                cfg.steps = v;
            }
            if let Some(v) = batch_size {
                cfg.batch_size = v;
            }
            if let Some(v) = lr {
                cfg.lr = v;
            }
            if let Some(v) = seed {
                cfg.seed = v;
            }
            if let Some(d) = hidden {
                cfg.arch.hidden_size = d;
                cfg.arch.intermediate_size = (d * 5 / 2).div_ceil(4) * 4;
            }
            if let Some(l) = layers {
                cfg.arch.num_hidden_layers = l;
            }
            if let Some(dir) = out.parent().filter(|p| !p.as_os_str().is_empty()) {
                std::fs::create_dir_all(dir)
                    .with_context(|| format!("creating {}", dir.display()))?;
            }
            let bar = step_bar(cfg.steps)?;
            let summary = pretrain::pretrain(&cfg, &out, resume, |step, loss, lr| {
                bar.set_position(step as u64);
                bar.set_message(format!("loss {loss:.3} lr {lr:.2e}"));
                true
            })?;
            bar.finish();
            if json {
                println!("{}", serde_json::to_string_pretty(&summary)?);
            } else {
                println!(
                    "trained {} steps in {:.0} s: final loss {:.3}, validation accuracy {:.1}%; wrote {}",
                    summary.steps,
                    summary.seconds,
                    summary.final_loss,
                    100.0 * summary.val_accuracy,
                    out.display()
                );
            }
        }
        Command::Eval {
            mixture: Some(dir),
            cache_dir,
            json,
            ..
        } => {
            let h = pipeline::Handoff::open(&dir)?;
            let tok = tokenizer::for_model(Some(&dir.join("model")), &h.ck.config)?;
            let cache = svd::SvdCache::new(cache_dir.unwrap_or_else(svd::SvdCache::default_dir));
            let bar = indicatif::ProgressBar::new(0);
            let rows = pipeline::reproduce(&h, tok.as_ref(), &cache, |i, n| {
                bar.set_length(n as u64);
                bar.set_position(i as u64);
            })?;
            bar.finish_and_clear();
            if json {
                println!("{}", serde_json::to_string_pretty(&rows)?);
            } else {
                println!(
                    "{:<12} {:<26} {:>9} {:>9}",
                    "domain", "form", "manifest", "measured"
                );
                for r in &rows {
                    println!(
                        "{:<12} {:<26} {:>8.1}% {:>8.1}%{}",
                        r.domain,
                        r.column,
                        100.0 * r.manifest,
                        100.0 * r.measured,
                        if r.manifest == r.measured {
                            ""
                        } else {
                            "  ← differs"
                        }
                    );
                }
            }
            let differ = rows.iter().filter(|r| r.manifest != r.measured).count();
            anyhow::ensure!(
                differ == 0,
                "{differ} of {} figures differ from the manifest",
                rows.len()
            );
            eprintln!(
                "all {} mixture figures of the manifest reproduced",
                rows.len()
            );
        }
        Command::Eval {
            model,
            domains,
            n,
            seed,
            split,
            data,
            verifier,
            expert: expert_path,
            cache_dir,
            json,
            mixture: None,
        } => {
            let ck = checkpoint::load_or_default(model.as_deref())?;
            let domains: Vec<Domain> = match domains {
                Some(names) => names
                    .iter()
                    .map(|n| Domain::by_name(n.trim()))
                    .collect::<std::result::Result<_, _>>()?,
                None => Domain::ALL.to_vec(),
            };
            let tok = tokenizer::for_model(model.as_deref(), &ck.config)?;
            let net = match &expert_path {
                Some(p) => {
                    let e = expert::Expert::load(p)?;
                    e.check_base(&ck, p)?;
                    let cache =
                        svd::SvdCache::new(cache_dir.unwrap_or_else(svd::SvdCache::default_dir));
                    let options = ModelOptions {
                        mode: WeightMode::Dense,
                        ..Default::default()
                    };
                    expert::expert_model(&ck, &e, &cache, options)?
                }
                None => Model::new(&ck, ModelOptions::default())?,
            };
            let split = match split {
                SplitArg::Test => Split::Test,
                SplitArg::Validation => Split::Validation,
            };
            let bar = indicatif::ProgressBar::new((n * domains.len()) as u64);
            let report = if let Some(path) = data {
                let dataset = Dataset::load_jsonl(&path, verifier.parse()?)?;
                eval::evaluate_dataset(
                    &net,
                    tok.as_ref(),
                    &model_name(model.as_deref()),
                    &dataset,
                    n,
                    split,
                    |k| bar.inc(k as u64),
                )?
            } else {
                eval::evaluate(
                    &net,
                    tok.as_ref(),
                    &model_name(model.as_deref()),
                    &eval::EvalSpec {
                        domains,
                        n,
                        seed,
                        split,
                    },
                    |k| bar.inc(k as u64),
                )?
            };
            bar.finish_and_clear();
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{}", report.to_text());
            }
        }
        Command::Discover {
            model,
            n,
            grad_items,
            threshold,
            cache_dir,
            json,
        } => {
            anyhow::ensure!(
                n > 0 && grad_items > 0,
                "--n and --grad-items must be positive"
            );
            let ck = checkpoint::load_or_default(model.as_deref())?;
            let tok = tokenizer::for_model(model.as_deref(), &ck.config)?;
            let cache = svd::SvdCache::new(cache_dir.unwrap_or_else(svd::SvdCache::default_dir));
            let (factors, _) = expert::factors(&ck, svf::Targets::Mlp, &cache)?;
            let base = Model::new(&ck, ModelOptions::default())?;
            let sources: Vec<bitsvf::tasks::DataSource> = Domain::ALL
                .iter()
                .map(|&d| bitsvf::tasks::DataSource::Domain(d))
                .collect();
            let bar = step_bar(sources.len())?;
            let rule = discover::GroupRule {
                threshold,
                ..Default::default()
            };
            let found = discover::discover(
                &ck,
                &base,
                &factors,
                tok.as_ref(),
                &sources,
                n,
                grad_items,
                rule,
                |i, name| {
                    bar.set_position(i as u64);
                    bar.set_message(format!("measuring {name}"));
                },
            )?;
            bar.finish_and_clear();
            let (names, acc, sim, g) = (
                &found.names,
                &found.accuracy,
                &found.cosine,
                &found.grouping,
            );
            if json {
                let v = serde_json::json!({
                    "accuracy": names.iter().zip(acc).map(|(n, a)| (n.clone(), *a)).collect::<BTreeMap<_, _>>(),
                    "similarity": {"domains": names, "cosine": sim},
                    "rule": rule,
                    "experts": g.groups,
                    "reason": g.reason,
                });
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                println!(
                    "{:<12} {:>9}   gradient cosine with the other domains",
                    "domain", "accuracy"
                );
                for (i, name) in names.iter().enumerate() {
                    let row: Vec<String> = sim[i].iter().map(|c| format!("{c:+.2}")).collect();
                    println!("{name:<12} {:>8.1}%   {}", 100.0 * acc[i], row.join(" "));
                }
                println!("\n{} experts:", g.groups.len());
                for group in &g.groups {
                    println!("  {}", group.join(" + "));
                }
                println!("{}", g.reason);
            }
        }
        Command::Mix {
            experts,
            alpha,
            model,
            out,
            cache_dir,
        } => {
            anyhow::ensure!(
                alpha.iter().all(|a| a.is_finite()),
                "--alpha: weights must be finite numbers"
            );
            let ck = checkpoint::load_or_default(model.as_deref())?;
            let loaded = experts
                .iter()
                .map(|p| {
                    let e = expert::Expert::load(p)?;
                    e.check_base(&ck, p)?;
                    Ok(e)
                })
                .collect::<Result<Vec<_>>>()?;
            let first = &loaded[0].meta;
            let cache = svd::SvdCache::new(cache_dir.unwrap_or_else(svd::SvdCache::default_dir));
            let factors = if first.parameterization.uses_svd() {
                expert::factors(&ck, first.targets, &cache)?.0
            } else {
                Default::default()
            };
            let refs: Vec<&expert::Expert> = loaded.iter().collect();
            let mixed = expert::mixture(&refs, &alpha, &factors)?;
            mixed.save(&out)?;
            println!("wrote {} ({})", out.display(), mixed.meta.name);
        }
        Command::CompareOptions {
            model,
            domains,
            n,
            experts,
            quick,
            steps,
            rank,
            cache_dir,
            json,
        } => {
            anyhow::ensure!(rank > 0, "--rank must be positive");
            let ck = checkpoint::load_or_default(model.as_deref())?;
            let tok = tokenizer::for_model(model.as_deref(), &ck.config)?;
            let mut domains = domains
                .split(',')
                .map(|d| Domain::by_name(d.trim()))
                .collect::<std::result::Result<Vec<_>, _>>()?;
            anyhow::ensure!(!domains.is_empty(), "--domains is empty");
            let mut train = train::TrainConfig {
                rank,
                ..train::TrainConfig::default()
            };
            if quick {
                domains.truncate(1);
                train.steps = 20;
                train.batch_prompts = 16;
                train.eval_every = 10;
                train.val_n = 20;
            }
            if let Some(s) = steps {
                anyhow::ensure!(s > 0, "--steps must be positive");
                train.steps = s;
            }
            let cfg = compare::CompareConfig {
                domains,
                n: n.unwrap_or(if quick { 40 } else { 500 }),
                train,
                experts_dir: experts.unwrap_or_else(|| {
                    PathBuf::from(if quick {
                        "compare-options/experts-quick"
                    } else {
                        "compare-options/experts"
                    })
                }),
                decode_tokens: if quick { 32 } else { 96 },
                decode_runs: if quick { 3 } else { 7 },
                seed: 0,
            };
            let cache = svd::SvdCache::new(cache_dir.unwrap_or_else(svd::SvdCache::default_dir));
            let bar = step_bar(cfg.train.steps)?;
            let report = compare::compare_options(&ck, tok.as_ref(), &cfg, &cache, |e| match e {
                compare::Event::Training(param, domain, step, steps) => {
                    bar.set_length(steps as u64);
                    bar.set_position(step as u64);
                    bar.set_message(format!("training {param} expert for {domain}"));
                }
                compare::Event::Evaluating(what) => {
                    bar.set_message(format!("evaluating {what}"));
                }
            })?;
            bar.finish_and_clear();
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{}", report.markdown());
                println!(
                    "f32 model: {:.2} MB; experts in {}",
                    report.f32_bytes as f64 / 1e6,
                    cfg.experts_dir.display()
                );
            }
        }
        Command::Train {
            model,
            domain,
            data,
            verifier,
            out,
            objective,
            parameterization,
            rank,
            targets,
            steps,
            kl_coeff,
            lr,
            constant_lr,
            no_baseline,
            batch_prompts,
            samples,
            eval_every,
            val_n,
            patience,
            seed,
            cache_dir,
            resume,
            json,
        } => {
            let ck = checkpoint::load_or_default(model.as_deref())?;
            let tok = tokenizer::for_model(model.as_deref(), &ck.config)?;
            let train_data = match (domain, data) {
                (Some(d), _) => bitsvf::tasks::DataSource::Domain(Domain::by_name(&d)?),
                (None, Some(p)) => {
                    bitsvf::tasks::DataSource::Dataset(Dataset::load_jsonl(&p, verifier.parse()?)?)
                }
                (None, None) => anyhow::bail!("give --domain or --data"),
            };
            let objective = match objective {
                ObjectiveArg::Reinforce => train::Objective::Reinforce,
                ObjectiveArg::Sft => train::Objective::Sft,
            };
            let mut cfg = train::TrainConfig {
                parameterization: match parameterization {
                    ParamArg::Paper => svf::Parameterization::Paper,
                    ParamArg::Official => svf::Parameterization::Official,
                    ParamArg::AlphaLayer => svf::Parameterization::AlphaLayer,
                    ParamArg::AlphaChannel => svf::Parameterization::AlphaChannel,
                    ParamArg::LowRank => svf::Parameterization::LowRank,
                },
                rank,
                targets: targets.parse()?,
                cosine: !constant_lr,
                baseline: !no_baseline,
                seed,
                ..train::TrainConfig::for_objective(objective)
            };
            if let Some(v) = steps {
                cfg.steps = v;
            }
            if let Some(v) = kl_coeff {
                cfg.kl_coeff = v;
            }
            for (slot, v) in [
                (&mut cfg.batch_prompts, batch_prompts),
                (&mut cfg.samples, samples),
                (&mut cfg.eval_every, eval_every),
                (&mut cfg.val_n, val_n),
                (&mut cfg.patience, patience),
            ] {
                if let Some(v) = v {
                    anyhow::ensure!(v > 0, "train options must be positive");
                    *slot = v;
                }
            }
            if let Some(v) = lr {
                cfg.lr = v;
            }
            let cache = svd::SvdCache::new(cache_dir.unwrap_or_else(svd::SvdCache::default_dir));
            anyhow::ensure!(rank > 0, "--rank must be positive");
            let (factors, svd_stats) = if cfg.parameterization.uses_svd() {
                expert::factors(&ck, cfg.targets, &cache)?
            } else {
                Default::default()
            };
            if !json && cfg.parameterization.uses_svd() {
                println!(
                    "SVD of {} matrices: {} from the cache, {} computed in {:.1} s; largest ‖W − UΣVᵀ‖/‖W‖ = {:.1e}",
                    factors.len(),
                    svd_stats.hits,
                    svd_stats.computed,
                    svd_stats.seconds,
                    svd_stats.max_relative_error
                );
            }
            let bar = step_bar(cfg.steps)?;
            let summary = train::train_expert(
                &ck,
                &factors,
                tok.as_ref(),
                &train_data,
                &cfg,
                &out,
                resume,
                |step, s| {
                    bar.set_position(step as u64);
                    bar.set_message(format!("reward {:+.2} kl {:.3}", s.reward, s.kl));
                    true
                },
            )?;
            bar.finish_and_clear();
            if json {
                let mut v = serde_json::to_value(&summary)?;
                v["svd"] = serde_json::json!({
                    "matrices": factors.len(),
                    "cache_hits": svd_stats.hits,
                    "computed": svd_stats.computed,
                    "seconds": svd_stats.seconds,
                    "max_relative_error": svd_stats.max_relative_error,
                });
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                println!(
                    "expert `{}`: validation accuracy {:.1}% → {:.1}% (best at step {} of {}{}) in {:.0} s; wrote {}",
                    summary.expert,
                    100.0 * summary.base_val_accuracy,
                    100.0 * summary.best_val_accuracy,
                    summary.best_step,
                    summary.steps,
                    if summary.early_stopped { ", early stop" } else { "" },
                    summary.seconds,
                    out.display()
                );
            }
        }
        Command::Run {
            model,
            out,
            quick,
            seed,
            steps,
            test_n,
            config,
            cache_dir,
            generator_url,
            generator_model,
            generator_key_env,
            generator_max_requests,
            generator_max_tokens,
            generator_items,
            data,
            verifier,
        } => {
            let ck = checkpoint::load_or_default(model.as_deref())?;
            let datasets = data
                .iter()
                .map(|p| Dataset::load_jsonl(p, verifier.parse()?).map_err(anyhow::Error::from))
                .collect::<Result<Vec<_>>>()?;
            let tok = tokenizer::for_model(model.as_deref(), &ck.config)?;
            let mut cfg = pipeline::RunConfig::new(quick);
            if let Some(path) = &config {
                cfg = cfg.with_file(path)?;
            }
            if let Some(s) = seed {
                cfg.seed = s;
            }
            cfg.datasets = datasets.iter().map(|d| d.name.clone()).collect();
            if let Some(s) = steps {
                anyhow::ensure!(s > 0, "--steps must be positive");
                cfg.train.steps = s;
            }
            if let Some(n) = test_n {
                anyhow::ensure!(n > 0, "--test-n must be positive");
                cfg.test_n = n;
            }
            let cache_root = cache_dir.unwrap_or_else(svd::SvdCache::default_dir);
            let generator = generator_url.map(|url| {
                use bitsvf::tasks::remote::{api_key_from_env, GeneratorConfig};
                cfg.data_source = format!("generator {url} {generator_model}");
                let mut g =
                    GeneratorConfig::new(url, generator_model, cache_root.join("generated"));
                g.api_key = api_key_from_env(&generator_key_env);
                if let Some(v) = generator_max_requests {
                    g.max_requests = v;
                }
                if let Some(v) = generator_max_tokens {
                    g.max_tokens = v;
                }
                g
            });
            if let Some(n) = generator_items {
                anyhow::ensure!(n > 0, "--generator-items must be positive");
                cfg.generated_items = n;
            }
            let cache = svd::SvdCache::new(cache_root);
            let model_files: Vec<PathBuf> = model
                .as_deref()
                .map(|m| {
                    if m.is_dir() {
                        m.to_path_buf()
                    } else {
                        m.parent().map(PathBuf::from).unwrap_or_default()
                    }
                })
                .map(|d| d.join("tokenizer.json"))
                .filter(|t| t.is_file())
                .into_iter()
                .collect();
            let t0 = std::time::Instant::now();
            let bar = step_bar(1)?;
            let manifest = pipeline::run(
                &ck,
                &model_name(model.as_deref()),
                tok.as_ref(),
                &cfg,
                &out,
                &cache,
                generator.as_ref(),
                &datasets,
                &model_files,
                &mut |e| match e {
                    pipeline::Event::Stage(name, done) => {
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
                    pipeline::Event::Progress(done, total, msg) => {
                        bar.set_length(total as u64);
                        bar.set_position(done as u64);
                        bar.set_message(msg);
                    }
                },
            )?;
            bar.finish_and_clear();
            let report = std::fs::read_to_string(out.join("report.md"))?;
            println!("{report}");
            println!(
                "wrote {} ({} experts{}) in {:.0} s",
                out.display(),
                manifest.experts.len(),
                if manifest.mixture.is_some() {
                    ", mixture"
                } else {
                    ""
                },
                t0.elapsed().as_secs_f64()
            );
        }
        Command::Generate {
            model,
            experts,
            prompt,
            dispatch: strategy,
            shots,
            max_tokens,
            temperature,
            seed,
            cache_dir,
        } => {
            let strategy: bitsvf::adapt::dispatch::Strategy = strategy.parse()?;
            let h = pipeline::Handoff::open(&experts)?;
            if let Some(m) = &model {
                let ck = checkpoint::load(m)?;
                anyhow::ensure!(
                    ck.content_hash() == h.ck.content_hash(),
                    "{} is not the base model of {} (content hash {}… vs {}…)",
                    m.display(),
                    experts.display(),
                    &ck.content_hash()[..12],
                    &h.ck.content_hash()[..12]
                );
            }
            let model_dir = model.unwrap_or_else(|| experts.join("model"));
            let tok = tokenizer::for_model(Some(&model_dir), &h.ck.config)?;
            let cache = svd::SvdCache::new(cache_dir.unwrap_or_else(svd::SvdCache::default_dir));
            let classifier = h.classifier()?;
            let mut lib = bitsvf::adapt::dispatch::Library::new(
                &h.ck,
                h.experts()?,
                classifier.as_ref(),
                &cache,
            )?;
            let alpha = match (strategy, shots) {
                (bitsvf::adapt::dispatch::Strategy::Cem, Some(path)) => {
                    let data = Dataset::load_jsonl(&path, "exact".parse()?)?;
                    let r =
                        lib.mixer
                            .fit_cem(tok.as_ref(), &data.items, &h.manifest.options.cem)?;
                    Some(r.best)
                }
                (bitsvf::adapt::dispatch::Strategy::Cem, None) => {
                    anyhow::bail!("--dispatch cem needs --shots FILE.jsonl (labelled examples)")
                }
                _ => None,
            };
            let names = lib.names.clone();
            let (model, pick) = lib.route(tok.as_ref(), strategy, &prompt, alpha.as_deref())?;
            match (&alpha, pick) {
                (Some(a), _) => {
                    let parts: Vec<String> = a
                        .iter()
                        .zip(&names)
                        .map(|(a, n)| format!("{a:.3}·{n}"))
                        .collect();
                    eprintln!("pass 1 (cem): mixture {}", parts.join(" + "));
                }
                (None, Some(i)) => eprintln!("pass 1 ({}): expert `{}`", strategy.name(), names[i]),
                (None, None) => eprintln!("pass 1 ({}): base model", strategy.name()),
            }
            let ids = eval::prompt_ids(tok.as_ref(), &prompt)?;
            let out = model.generate(
                &ids,
                &bitsvf::engine::model::GenerateOptions {
                    max_new_tokens: max_tokens,
                    temperature,
                    seed,
                    stop: tok.stop_ids(),
                    ..Default::default()
                },
            )?;
            println!(
                "{}",
                bitsvf::tasks::answer_from_completion(&tok.decode(&out))
            );
        }
        Command::Convert { model, out } => {
            let ck = checkpoint::load_or_default(model.as_deref())?;
            checkpoint::save_native(&ck, &out)?;
            eprintln!(
                "wrote {} ({} → native, {} bytes)",
                out.display(),
                ck.format.name(),
                std::fs::metadata(&out).map(|m| m.len()).unwrap_or(0)
            );
        }
    }
    Ok(())
}

/// How a model argument is named in reports.
fn model_name(model: Option<&std::path::Path>) -> String {
    model.map_or_else(
        || checkpoint::DEFAULT_MODEL_NAME.to_string(),
        |p| p.display().to_string(),
    )
}
