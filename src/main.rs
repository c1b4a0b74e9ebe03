//! The `bitsvf` command line: argument parsing only; the library does the work.

use anyhow::{Context, Result};
use bitsvf::checkpoint::{self, st};
use bitsvf::model::{parse_token_rows, Model, ModelOptions, WeightMode};
use bitsvf::{inspect, recovery};
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

#[derive(Subcommand)]
enum Command {
    /// Show a model's format, architecture, sizes and ternary statistics.
    Inspect {
        /// Model file or directory (any supported format).
        model: PathBuf,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Run a forward pass on token ids and write the logits (f32 [rows, T, vocab]).
    Logits {
        /// Model file or directory.
        model: PathBuf,
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
        /// Model file or directory.
        model: PathBuf,
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
    /// Convert any supported model to the bitsvf native format (one safetensors file).
    Convert {
        /// Model file or directory.
        model: PathBuf,
        /// Output .safetensors file.
        #[arg(long)]
        out: PathBuf,
    },
}

fn main() -> std::process::ExitCode {
    match run() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().command {
        Command::Inspect { model, json } => {
            let ck = checkpoint::load(&model)?;
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
            let ck = checkpoint::load(&model)?;
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
            let ck = checkpoint::load(&model)?;
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
        Command::Convert { model, out } => {
            let ck = checkpoint::load(&model)?;
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
