//! `bitsvf convert`: any supported model to the native format, or to GGUF (ternary or F16
//! linears).

use anyhow::Result;
use bitsvf::engine::checkpoint;
use bitsvf::engine::checkpoint::GgmlType;
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
    /// GGUF with bitnet.cpp's I2_S ternary linears (2 bits per weight, one scale per tensor).
    #[value(name = "i2_s")]
    I2S,
    /// GGUF with F16 linears (ternary ones as ±1/0 codes and their scale; float ones rounded).
    #[value(name = "f16")]
    F16,
}

#[derive(clap::Args)]
pub struct Args {
    /// Model file or directory; default: the embedded model.
    model: Option<PathBuf>,
    /// Ternarize a float model's linears on load (BitNet b1.58's per-tensor absmean rule);
    /// without it a float model runs as float.
    #[arg(long)]
    ternarize: bool,
    /// Output file (.safetensors for native, .gguf for the GGUF types).
    #[arg(long)]
    out: PathBuf,
    /// Output format: native, or GGUF (architecture `bitnet` for SiLU models, `bitnet-b1.58`
    /// for ReLU² ones, `llama` for float models without sub-norms) with tq2_0 / tq1_0 linears
    /// (every linear's input width a multiple of 256), i2_s linears (one scale per tensor,
    /// sizes a multiple of 128) or f16 linears (any model); GGUF carries the tokenizer when the
    /// source has one llama.cpp reads (byte-level BPE).
    #[arg(long = "type", value_enum, default_value = "native")]
    out_type: OutType,
}

impl OutType {
    /// The ggml type of the linears, for the GGUF outputs.
    fn gguf(self) -> Option<GgmlType> {
        match self {
            OutType::Native => None,
            OutType::Tq2_0 => Some(GgmlType::Tq2_0),
            OutType::Tq1_0 => Some(GgmlType::Tq1_0),
            OutType::I2S => Some(GgmlType::I2S),
            OutType::F16 => Some(GgmlType::F16),
        }
    }
}

pub fn run(a: Args) -> Result<()> {
    let ck = crate::common::load_model(a.model.as_deref(), a.ternarize)?;
    let what = match a.out_type.gguf() {
        None => {
            checkpoint::save_native(&ck, &a.out)?;
            "native".to_string()
        }
        Some(ty) => {
            let tokenizer = checkpoint::save_gguf(&ck, &a.out, ty)?;
            format!("GGUF {}; {tokenizer}", ty.name())
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
