//! Model checkpoints: the weights of a BitNet decoder as loaded from any supported format
//! (docs/DESIGN.md §2), independent of how the forward pass runs them.
//!
//! Formats are detected from the files, never from a flag:
//! - **bitsvf native**: a safetensors file whose header metadata has `format = "bitsvf"`.
//! - **agent-forge Phase 4**: `<linear>.quantized_weight` int8 tensors.
//! - **HF packed**: `<linear>.weight` uint8 `[out/4, in]` + `weight_scale`, with a
//!   `config.json` carrying a bitnet `quantization_config`.
//! - **HF float master**: float `<linear>.weight`, ternarized on load (per-tensor absmean), or
//!   recovered exactly when `config.json` marks it as dequantized by bitsvf.

mod float_matrix;
mod formats;
mod from_gguf;
pub mod gguf;
mod huge;
mod resident;
mod save;
pub mod st;
mod to_gguf;

pub use float_matrix::{quantize_q8_0_row, FloatMatrix, StoredDtype, Q8_0_BLOCK};
pub use from_gguf::llama_file_row_order;
pub use gguf::GgmlType;
pub use to_gguf::{gguf_architecture, save_gguf, GGUF_LINEAR_TYPES, TERNARY_GGUF_TYPES};

pub use formats::{display_name, load, load_default, load_or_default, DEFAULT_MODEL_NAME};
pub use save::{save_dequantized, save_native};

use crate::engine::config::ModelConfig;
use crate::engine::ternary::{Quantization, TernaryMatrix};
use serde::Serialize;
use sha2::{Digest, Sha256};
use std::path::PathBuf;
use std::sync::Arc;

/// The seven linear layers of a decoder block.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub enum LinearKind {
    /// Query projection.
    Q,
    /// Key projection.
    K,
    /// Value projection.
    V,
    /// Attention output projection.
    O,
    /// FFN gate projection.
    Gate,
    /// FFN up projection.
    Up,
    /// FFN down projection.
    Down,
}

impl LinearKind {
    /// All kinds in block order.
    pub const ALL: [LinearKind; 7] = [
        LinearKind::Q,
        LinearKind::K,
        LinearKind::V,
        LinearKind::O,
        LinearKind::Gate,
        LinearKind::Up,
        LinearKind::Down,
    ];

    /// The HF module path inside a layer.
    pub fn hf_name(self) -> &'static str {
        match self {
            LinearKind::Q => "self_attn.q_proj",
            LinearKind::K => "self_attn.k_proj",
            LinearKind::V => "self_attn.v_proj",
            LinearKind::O => "self_attn.o_proj",
            LinearKind::Gate => "mlp.gate_proj",
            LinearKind::Up => "mlp.up_proj",
            LinearKind::Down => "mlp.down_proj",
        }
    }

    /// ggml's name inside block `blk.L.` (llama.cpp, bitnet.cpp).
    pub fn ggml_name(self) -> &'static str {
        match self {
            LinearKind::Q => "attn_q",
            LinearKind::K => "attn_k",
            LinearKind::V => "attn_v",
            LinearKind::O => "attn_output",
            LinearKind::Gate => "ffn_gate",
            LinearKind::Up => "ffn_up",
            LinearKind::Down => "ffn_down",
        }
    }

    /// Whether this is an FFN matrix (SVF's default targets).
    pub fn is_mlp(self) -> bool {
        matches!(self, LinearKind::Gate | LinearKind::Up | LinearKind::Down)
    }

    /// (out, in) of this matrix under `cfg`.
    pub fn shape(self, cfg: &ModelConfig) -> (usize, usize) {
        let d = cfg.hidden_size;
        let q = cfg.num_attention_heads * cfg.head_dim();
        let kv = cfg.kv_heads() * cfg.head_dim();
        match self {
            LinearKind::Q => (q, d),
            LinearKind::K | LinearKind::V => (kv, d),
            LinearKind::O => (d, q),
            LinearKind::Gate | LinearKind::Up => (cfg.intermediate_size, d),
            LinearKind::Down => (d, cfg.intermediate_size),
        }
    }
}

/// The HF tensor prefix of linear `kind` in layer `layer` (without `.weight`).
pub fn linear_name(layer: usize, kind: LinearKind) -> String {
    format!("model.layers.{layer}.{}", kind.hf_name())
}

/// Where a checkpoint came from.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SourceFormat {
    /// Hugging Face packed BitNet (microsoft/bitnet-b1.58-2B-4T layout).
    HfPacked {
        /// `autobitlinear` (multiply by weight_scale) or `bitlinear` (divide).
        linear_class: String,
    },
    /// Hugging Face BitNet float master weights, ternarized on load.
    HfFloat,
    /// A Hugging Face float model (Llama-style, no BitNet quantization): float linears.
    HfFloatModel,
    /// A float model written by `bitsvf dequantize`, recovered exactly.
    Dequantized,
    /// Agent-forge Phase 4 layout (int8 weights, fp16 per-channel scales).
    Phase4,
    /// bitsvf's native packed format.
    Native,
    /// A GGUF file (llama.cpp, bitnet.cpp) of this architecture.
    Gguf {
        /// `general.architecture`.
        architecture: String,
    },
}

impl SourceFormat {
    /// Short human-readable name.
    pub fn name(&self) -> String {
        match self {
            SourceFormat::HfPacked { linear_class } => format!("hf-packed ({linear_class})"),
            SourceFormat::HfFloat => "hf-float (ternarized on load)".into(),
            SourceFormat::HfFloatModel => "hf-float (float linears)".into(),
            SourceFormat::Dequantized => "bitsvf-dequantized f32".into(),
            SourceFormat::Phase4 => "agent-forge phase4".into(),
            SourceFormat::Native => "bitsvf native".into(),
            SourceFormat::Gguf { architecture } => format!("gguf ({architecture})"),
        }
    }
}

/// The weight of one linear: ternary (BitNet) or float (a Llama-style model, or a BitNet
/// model dequantized by someone else).
#[derive(Debug, Clone)]
pub enum LinearMatrix {
    /// W_t and γ, shared with the models built over this checkpoint.
    Ternary(Arc<TernaryMatrix>),
    /// Float W `[out, in]` in its stored dtype (f32, bf16, f16 or Q8_0); the forward pass
    /// takes its activations unquantized.
    Float(FloatMatrix),
}

impl From<TernaryMatrix> for LinearMatrix {
    fn from(m: TernaryMatrix) -> Self {
        LinearMatrix::Ternary(Arc::new(m))
    }
}

impl LinearMatrix {
    /// Output features.
    pub fn rows(&self) -> usize {
        match self {
            LinearMatrix::Ternary(m) => m.rows,
            LinearMatrix::Float(m) => m.rows,
        }
    }

    /// Input features.
    pub fn cols(&self) -> usize {
        match self {
            LinearMatrix::Ternary(m) => m.cols,
            LinearMatrix::Float(m) => m.cols,
        }
    }

    /// The ternary matrix, if this is one.
    pub fn ternary(&self) -> Option<&Arc<TernaryMatrix>> {
        match self {
            LinearMatrix::Ternary(m) => Some(m),
            LinearMatrix::Float(_) => None,
        }
    }

    /// Whether the weight is ternary.
    pub fn is_ternary(&self) -> bool {
        self.ternary().is_some()
    }

    /// W row-major `[out, in]` in f32 (γ·W_t for a ternary matrix).
    pub fn dequantize(&self) -> Vec<f32> {
        match self {
            LinearMatrix::Ternary(m) => m.dequantize(),
            LinearMatrix::Float(m) => m.to_f32(),
        }
    }

    /// Bytes the weight takes in memory (packed codes and scales, or the stored floats).
    pub fn stored_bytes(&self) -> usize {
        match self {
            LinearMatrix::Ternary(m) => m.packed_bytes(),
            LinearMatrix::Float(m) => m.stored_bytes(),
        }
    }

    /// How the weight is held: `ternary`, or the float dtype's name.
    pub fn dtype_name(&self) -> &'static str {
        match self {
            LinearMatrix::Ternary(_) => "ternary",
            LinearMatrix::Float(m) => m.dtype().name(),
        }
    }
}

/// One linear layer with its optional bias.
#[derive(Debug, Clone)]
pub struct Linear {
    /// The weight, shared with the models built over this checkpoint.
    pub matrix: LinearMatrix,
    /// Bias of length `out` (Phase 4 checkpoints may have one).
    pub bias: Option<Vec<f32>>,
}

/// One decoder block's weights.
#[derive(Debug, Clone)]
pub struct Layer {
    /// RMSNorm before attention, `[d]`.
    pub input_layernorm: Vec<f32>,
    /// RMSNorm before the FFN, `[d]`.
    pub post_attention_layernorm: Vec<f32>,
    /// BitNet's RMSNorm before o_proj, `[heads·head_dim]`.
    pub attn_sub_norm: Option<Vec<f32>>,
    /// BitNet's RMSNorm before down_proj, `[ffn]`.
    pub ffn_sub_norm: Option<Vec<f32>>,
    /// The seven linears in [`LinearKind::ALL`] order.
    pub linears: Vec<Linear>,
}

impl Layer {
    /// The linear of `kind`.
    pub fn linear(&self, kind: LinearKind) -> &Linear {
        &self.linears[kind as usize]
    }
}

/// A loaded ternary model: config, float tensors and packed ternary linears.
#[derive(Debug, Clone)]
pub struct Checkpoint {
    /// Architecture.
    pub config: ModelConfig,
    /// How γ was computed.
    pub quantization: Quantization,
    /// The format it was read from.
    pub format: SourceFormat,
    /// The file or directory given.
    pub source: PathBuf,
    /// Bytes of the weight files.
    pub bytes_on_disk: u64,
    /// Token embeddings `[vocab, d]`, in their stored dtype.
    pub embed_tokens: FloatMatrix,
    /// Final RMSNorm `[d]`.
    pub norm: Vec<f32>,
    /// Untied output head `[vocab, d]` in its stored dtype (None when tied to the embeddings).
    pub lm_head: Option<FloatMatrix>,
    /// Decoder blocks.
    pub layers: Vec<Layer>,
}

impl Checkpoint {
    /// The output head `[vocab, d]` (the embeddings when tied).
    pub fn lm_head(&self) -> &FloatMatrix {
        self.lm_head.as_ref().unwrap_or(&self.embed_tokens)
    }

    /// All linears with their HF names, in layer order.
    pub fn linears(&self) -> impl Iterator<Item = (String, LinearKind, &Linear)> {
        self.layers.iter().enumerate().flat_map(|(l, layer)| {
            LinearKind::ALL
                .iter()
                .map(move |&k| (linear_name(l, k), k, layer.linear(k)))
        })
    }

    /// SHA-256 over the model's content (config, quantization rule, float tensors, packed
    /// codes and scales) — the same model gives the same hash whatever format it came in.
    pub fn content_hash(&self) -> String {
        let mut h = Sha256::new();
        let cfg = serde_json::to_string(&self.config).expect("config serializes");
        h.update(cfg.as_bytes());
        h.update(self.quantization.name().as_bytes());
        let floats = |h: &mut Sha256, v: &[f32]| {
            for x in v {
                h.update(x.to_le_bytes());
            }
        };
        self.embed_tokens.for_each_row(|row| floats(&mut h, row));
        floats(&mut h, &self.norm);
        if let Some(w) = &self.lm_head {
            w.for_each_row(|row| floats(&mut h, row));
        }
        for layer in &self.layers {
            floats(&mut h, &layer.input_layernorm);
            floats(&mut h, &layer.post_attention_layernorm);
            for n in [&layer.attn_sub_norm, &layer.ffn_sub_norm]
                .into_iter()
                .flatten()
            {
                floats(&mut h, n);
            }
            for lin in &layer.linears {
                match &lin.matrix {
                    LinearMatrix::Ternary(m) => {
                        h.update(&m.packed[..]);
                        floats(&mut h, &m.scales);
                    }
                    LinearMatrix::Float(m) => {
                        h.update(b"float");
                        m.for_each_row(|row| floats(&mut h, row));
                    }
                }
                if let Some(b) = &lin.bias {
                    floats(&mut h, b);
                }
            }
        }
        h.finalize()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>()
    }

    /// Error unless this model (loaded from `path`) is `base`, the base model of `owner` (a
    /// handoff directory of `bitsvf run`, an expert library), by [`Self::content_hash`].
    pub fn check_is_base_of(
        &self,
        path: &std::path::Path,
        base: &Checkpoint,
        owner: &std::path::Path,
    ) -> crate::error::Result<()> {
        let (ours, theirs) = (self.content_hash(), base.content_hash());
        if ours != theirs {
            return Err(crate::error::Error::Input(format!(
                "{} is not the base model of {} (content hash {}… vs {}…)",
                path.display(),
                owner.display(),
                &ours[..12],
                &theirs[..12]
            )));
        }
        Ok(())
    }

    /// Parameters actually stored (embeddings, linears, norms, head, biases).
    pub fn parameter_count(&self) -> usize {
        let mut n = self.embed_tokens.len() + self.norm.len();
        n += self.lm_head.as_ref().map_or(0, FloatMatrix::len);
        for layer in &self.layers {
            n += layer.input_layernorm.len() + layer.post_attention_layernorm.len();
            n += layer.attn_sub_norm.as_ref().map_or(0, Vec::len);
            n += layer.ffn_sub_norm.as_ref().map_or(0, Vec::len);
            for lin in &layer.linears {
                n += lin.matrix.rows() * lin.matrix.cols() + lin.bias.as_ref().map_or(0, Vec::len);
            }
        }
        n
    }

    /// Ternary parameters (the ternary linears' weights).
    pub fn ternary_parameter_count(&self) -> usize {
        self.linears()
            .filter(|(_, _, l)| l.matrix.is_ternary())
            .map(|(_, _, l)| l.matrix.rows() * l.matrix.cols())
            .sum()
    }

    /// Whether every linear is ternary (a BitNet model); a float model (Llama-style, or one
    /// with some float linears) runs those linears in float without activation quantization.
    pub fn is_ternary(&self) -> bool {
        self.linears().all(|(_, _, l)| l.matrix.is_ternary())
    }

    /// What the linears are: `ternary`, or the float dtypes found (`f16`, `f32 + q8_0`, …).
    pub fn linear_dtypes(&self) -> String {
        let mut names: Vec<&str> = self
            .linears()
            .map(|(_, _, l)| l.matrix.dtype_name())
            .collect();
        names.sort_unstable();
        names.dedup();
        names.join(" + ")
    }

    /// This model with every float linear ternarized by BitNet b1.58's per-tensor absmean
    /// rule (`--ternarize`); ternary linears are kept as they are.
    pub fn ternarized(mut self) -> Checkpoint {
        for layer in &mut self.layers {
            for lin in &mut layer.linears {
                if let LinearMatrix::Float(m) = &lin.matrix {
                    let w = m.to_f32();
                    let t = TernaryMatrix::quantize(&w, m.rows, m.cols, Quantization::PerTensor);
                    lin.matrix = t.into();
                }
            }
        }
        self
    }
}

impl Checkpoint {
    /// A random float model (Llama-style: float linears with N(0, 0.05²)-ish weights, no
    /// sub-norms unless the config asks for them) — for tests of float bases.
    pub fn random_float(mut config: ModelConfig, seed: u64) -> Checkpoint {
        use rand::{rngs::StdRng, Rng, SeedableRng};
        config.sub_norms.get_or_insert(false);
        let mut ck = Checkpoint::random(config, seed);
        let mut rng = StdRng::seed_from_u64(seed ^ 0x5eed);
        for layer in &mut ck.layers {
            for lin in &mut layer.linears {
                let (rows, cols) = (lin.matrix.rows(), lin.matrix.cols());
                let w = (0..rows * cols)
                    .map(|_| (0..4).map(|_| rng.gen::<f32>() - 0.5).sum::<f32>() * 0.087)
                    .collect();
                lin.matrix = LinearMatrix::Float(FloatMatrix::from_f32(w, rows, cols));
            }
        }
        ck
    }

    /// A random model of the given architecture (uniform ternary weights, per-tensor scales in
    /// [0.5, 1.5], N(0, 0.5²)-ish embeddings, norms near 1) — for benchmarks and tests.
    pub fn random(config: ModelConfig, seed: u64) -> Checkpoint {
        use rand::{rngs::StdRng, Rng, SeedableRng};
        let mut rng = StdRng::seed_from_u64(seed);
        let (v, d) = (config.vocab_size, config.hidden_size);
        let normal = |n: usize, std: f32, rng: &mut StdRng| -> Vec<f32> {
            // Sum of 4 uniforms: cheap, bell-shaped, variance 1/3 per unit.
            (0..n)
                .map(|_| {
                    let s: f32 = (0..4).map(|_| rng.gen::<f32>() - 0.5).sum();
                    s * std * (3.0f32).sqrt()
                })
                .collect()
        };
        let embed_tokens = FloatMatrix::from_f32(normal(v * d, 0.5, &mut rng), v, d);
        let lm_head = (!config.tie_word_embeddings)
            .then(|| FloatMatrix::from_f32(normal(v * d, 0.05, &mut rng), v, d));
        let norm_vec = |n: usize, rng: &mut StdRng| -> Vec<f32> {
            (0..n)
                .map(|_| 1.0 + 0.1 * (rng.gen::<f32>() - 0.5))
                .collect()
        };
        let norm = norm_vec(d, &mut rng);
        let q_width = config.num_attention_heads * config.head_dim();
        let sub = config.sub_norms.unwrap_or(true);
        let layers = (0..config.num_hidden_layers)
            .map(|_| {
                let linears = LinearKind::ALL
                    .iter()
                    .map(|&k| {
                        let (rows, cols) = k.shape(&config);
                        let values: Vec<i8> =
                            (0..rows * cols).map(|_| rng.gen_range(-1i8..=1)).collect();
                        let scale = 0.5 + rng.gen::<f32>();
                        Linear {
                            matrix: TernaryMatrix::from_values(&values, rows, cols, vec![scale])
                                .into(),
                            bias: None,
                        }
                    })
                    .collect();
                Layer {
                    input_layernorm: norm_vec(d, &mut rng),
                    post_attention_layernorm: norm_vec(d, &mut rng),
                    attn_sub_norm: sub.then(|| norm_vec(q_width, &mut rng)),
                    ffn_sub_norm: sub.then(|| norm_vec(config.intermediate_size, &mut rng)),
                    linears,
                }
            })
            .collect();
        let mut config = config;
        config.sub_norms = Some(sub);
        Checkpoint {
            config,
            quantization: Quantization::PerTensor,
            format: SourceFormat::Native,
            source: PathBuf::from("<random>"),
            bytes_on_disk: 0,
            embed_tokens,
            norm,
            lm_head,
            layers,
        }
    }
}
