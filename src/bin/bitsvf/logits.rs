//! `bitsvf logits`: one forward pass on token ids, written to safetensors.

use crate::common::svd_cache;
use anyhow::Result;
use bitsvf::engine::logits::{write_logits, write_model_logits};
use bitsvf::engine::model::{parse_token_rows, ModelOptions, WeightMode};
use bitsvf::svf::attach::expert_model;
use bitsvf::svf::expert::Expert;
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct Args {
    /// Model file or directory; default: the embedded model.
    model: Option<PathBuf>,
    /// Ternarize a float model's linears on load (BitNet b1.58's per-tensor absmean rule);
    /// without it a float model runs as float.
    #[arg(long)]
    ternarize: bool,
    /// Token id rows, e.g. "1,2,3;4,5,6".
    #[arg(long)]
    tokens: String,
    /// Output safetensors file (tensors `logits` and `input_ids`).
    #[arg(long)]
    out: PathBuf,
    /// Weight mode.
    #[arg(long, value_enum, default_value = "ternary")]
    mode: WeightMode,
    /// Keep activations in f32 (no int8 activation quantization).
    #[arg(long)]
    no_act_quant: bool,
    /// An expert file to apply first (trained on MODEL); paper and official SVF need
    /// `--mode dense`, a low-rank expert over `--mode ternary` is the hybrid deployment.
    #[arg(long)]
    expert: Option<PathBuf>,
    /// SVD cache directory (default: $BITSVF_CACHE or ~/.cache/bitsvf).
    #[arg(long)]
    cache_dir: Option<PathBuf>,
}

pub fn run(a: Args) -> Result<()> {
    let rows = parse_token_rows(&a.tokens)?;
    let ck = crate::common::load_model(a.model.as_deref(), a.ternarize)?;
    let options = ModelOptions {
        mode: a.mode,
        act_quant: !a.no_act_quant,
        ..Default::default()
    };
    let shape = match &a.expert {
        None => write_logits(&ck, &rows, options, &a.out)?,
        Some(path) => {
            let expert = Expert::load_for(path, &ck)?;
            let net = expert_model(&ck, &expert, &svd_cache(a.cache_dir.clone()), options)?;
            write_model_logits(&net, &rows, &a.out)?
        }
    };
    eprintln!("wrote logits {:?} to {}", shape, a.out.display());
    Ok(())
}
