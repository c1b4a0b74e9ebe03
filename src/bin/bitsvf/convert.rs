//! `bitsvf convert`: any supported model to the native format, or to GGUF.

use anyhow::Result;
use bitsvf::engine::checkpoint;
use bitsvf::engine::ternary::ggml::TernaryBlocks;
use std::path::PathBuf;

/// The output format.
#[derive(Clone, Copy, clap::ValueEnum)]
enum OutType {
    /// bitsvf's native safetensors (2-bit packed).
    Native,
    /// GGUF with TQ2_0 ternary linears (2.06 bits per weight).
    #[value(name = "tq2_0")]
    Tq2_0,
    /// GGUF with TQ1_0 ternary linears (1.69 bits per weight).
    #[value(name = "tq1_0")]
    Tq1_0,
}

#[derive(clap::Args)]
pub struct Args {
    /// Model file or directory; default: the embedded model.
    model: Option<PathBuf>,
    /// Output file (.safetensors for native, .gguf for the GGUF types).
    #[arg(long)]
    out: PathBuf,
    /// Output format: native, or GGUF (architecture `bitnet` for SiLU models and
    /// `bitnet-b1.58` for ReLU² ones) with tq2_0 / tq1_0 linears; GGUF needs every linear's
    /// input width to be a multiple of 256 and writes no tokenizer.
    #[arg(long = "type", value_enum, default_value = "native")]
    out_type: OutType,
}

pub fn run(a: Args) -> Result<()> {
    let ck = checkpoint::load_or_default(a.model.as_deref())?;
    let what = match a.out_type {
        OutType::Native => {
            checkpoint::save_native(&ck, &a.out)?;
            "native"
        }
        OutType::Tq2_0 => {
            checkpoint::save_gguf(&ck, &a.out, TernaryBlocks::Tq2_0)?;
            "GGUF TQ2_0"
        }
        OutType::Tq1_0 => {
            checkpoint::save_gguf(&ck, &a.out, TernaryBlocks::Tq1_0)?;
            "GGUF TQ1_0"
        }
    };
    eprintln!(
        "wrote {} ({} → {what}, {} bytes)",
        a.out.display(),
        ck.format.name(),
        std::fs::metadata(&a.out).map(|m| m.len()).unwrap_or(0)
    );
    Ok(())
}
