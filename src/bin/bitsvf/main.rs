//! The `bitsvf` command line. Each command lives in its own module, which parses its
//! arguments, calls the library and prints the result; this file holds the command list,
//! logging, and the huge-page re-exec of the training commands.

mod bench;
mod common;
mod compare;
mod convert;
mod dequantize;
mod discover;
mod eval;
mod export_adapter;
mod generate;
mod inspect;
mod logits;
mod mix;
mod pretrain;
mod run;
mod serve;
mod train;

use clap::{Parser, Subcommand};

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

#[derive(Subcommand)]
enum Command {
    /// Show a model's format, architecture, sizes and ternary statistics — or, for a handoff
    /// directory of `bitsvf run`, its experts, mixture and figures (every file checked).
    Inspect(inspect::Args),
    /// Run a forward pass on token ids and write the logits (f32 [rows, T, vocab]).
    Logits(logits::Args),
    /// Write the dequantized f32 model (W = γ·W_t) and optionally verify the recovery.
    Dequantize(dequantize::Args),
    /// Train the default model from scratch (quantization-aware, on the task suite).
    Pretrain(pretrain::Args),
    /// Greedy accuracy per domain on a held-out split.
    Eval(eval::Args),
    /// Train one SVF expert (REINFORCE with verifier rewards + KL, or SFT) on a domain or a
    /// JSONL dataset.
    Train(train::Args),
    /// Measure the seed's integration options side by side: dequantize, alpha-layer,
    /// alpha-channel, hybrid-lowrank and requantize — accuracy of one expert per domain on its
    /// own held-out domain, resident bytes, decode tokens/s and the cost to switch experts.
    CompareOptions(compare::Args),
    /// Stage 1: measure the base model on every domain (validation split) and the direction of
    /// each domain's SVF gradient, and decide how many experts to train and on what.
    Discover(discover::Args),
    /// Mix experts of one parameterization into one expert file: z' = Σ α_k z_k on the applied
    /// singular-value scales (a one-hot α reproduces that expert exactly).
    Mix(mix::Args),
    /// The main job: verify the model, discover the experts, train them and a classifier,
    /// search their mixture with NSGA-II, fit few-shot CEM, evaluate everything on held-out
    /// test sets and write the handoff directory. Rerun the same command to resume.
    Run(run::Args),
    /// Two-pass inference: pass 1 picks the expert (or mixture) for the prompt, pass 2
    /// generates with it.
    Generate(generate::Args),
    /// Convert any supported model to the bitsvf native format (one safetensors file).
    Convert(convert::Args),
    /// Prefill and decode speed, resident memory and bandwidth use of a model (ternary and
    /// dense), in the figures llama.cpp's llama-bench reports.
    Bench(bench::Args),
    /// Write an SVF expert (or a handoff's mixture) as a LoRA adapter: PEFT or llama.cpp GGUF.
    ExportAdapter(export_adapter::Args),
    /// An OpenAI-compatible HTTP server over the base and a handoff's experts: every expert
    /// is a model id, `bitsvf/auto` dispatches per request, and concurrent requests for
    /// different experts are decoded in one batch over the packed base.
    Serve(serve::Args),
    /// Drive a running server with N concurrent clients × M requests and report throughput
    /// and latency percentiles (stops by itself).
    LoadTest(serve::LoadArgs),
}

/// On Linux/glibc, back large allocations with transparent huge pages: training allocates
/// and frees tens of MB per step (logits and their gradients), and page faults on fresh
/// buffers cost ~10% of an SVF step (docs/results.md, "SVF training step vs PyTorch"). glibc reads its
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
        Command::Train(_) | Command::Pretrain(_) | Command::CompareOptions(_) | Command::Run(_)
    ) {
        use_huge_pages();
    }
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let result = match cli.command {
        Command::Inspect(a) => inspect::run(a),
        Command::Logits(a) => logits::run(a),
        Command::Dequantize(a) => dequantize::run(a),
        Command::Pretrain(a) => pretrain::run(a),
        Command::Eval(a) => eval::run(a),
        Command::Train(a) => train::run(a),
        Command::CompareOptions(a) => compare::run(a),
        Command::Discover(a) => discover::run(a),
        Command::Mix(a) => mix::run(a),
        Command::Run(a) => run::run(a),
        Command::Generate(a) => generate::run(a),
        Command::Convert(a) => convert::run(a),
        Command::Bench(a) => bench::run(a),
        Command::ExportAdapter(a) => export_adapter::run(a),
        Command::Serve(a) => serve::run(a),
        Command::LoadTest(a) => serve::load_test(a),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
