//! The BitNet b1.58 decoder in candle: RMSNorm, rotate-half RoPE, GQA attention with BitNet's
//! `attn_sub_norm`, ReLU² (or SiLU-gated) FFN with `ffn_sub_norm`, BitLinear layers with
//! per-token int8 activation quantization, a KV cache and seeded sampling.
//!
//! Two weight modes share one interface ([`WeightMode`]): *ternary* runs the packed 2-bit
//! weights through the exact integer kernel of [`crate::engine::ternary`]; *dense* holds W = γ·W_t in
//! f32 and is differentiable. Norms, RoPE, attention and the FFN activation are the fused ops
//! of [`crate::engine::ops`], each with its own backward pass (candle's fused `rms_norm`,
//! `softmax_last_dim`, `rope*` and `sdpa` kernels silently drop gradients and are deliberately
//! not used here).

mod kv;
mod linear;
mod ragged;
mod rope;
mod sampling;
mod table;
mod unpadded;

use crate::engine::config::Activation;
use crate::engine::tokenizer::byte_ids;
use crate::engine::tokenizer::BYTE_VOCAB;
use kv::LayerKv;
pub use linear::{ternarize_ste, AdaptedLinear, BitLinear, LinearWeight};
pub use ragged::{RowDeltas, Segment};
use rope::Rope;
pub use sampling::{argmax, sample, GenerateOptions, GenerateStats};
pub use table::HeadFormat;
use table::Table;
pub use unpadded::Unpadded;

use crate::engine::checkpoint::{Checkpoint, FloatMatrix, LinearKind, LinearMatrix};
use crate::engine::config::ModelConfig;
use crate::engine::ops::{self, matmul_const, rms_norm};
use crate::engine::ternary::TernaryMatrix;
use crate::error::{Error, Result};
use candle_core::{DType, Device, Tensor};
use rand::{rngs::StdRng, Rng, SeedableRng};
use std::sync::Arc;

/// How the linear layers hold their weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightMode {
    /// Packed 2-bit weights, integer matmul (no gradients).
    Ternary,
    /// Dequantized f32 weights, differentiable.
    Dense,
}

crate::value_names!(
    WeightMode,
    "weight mode",
    [
        (Ternary, "ternary", "Packed 2-bit weights, integer kernel"),
        (Dense, "dense", "Dequantized f32 weights"),
    ]
);

/// Options for building a [`Model`].
#[derive(Debug, Clone, Copy)]
pub struct ModelOptions {
    /// Weight mode.
    pub mode: WeightMode,
    /// Per-token int8 activation quantization (BitNet's BitLinear); with it off the
    /// activations stay f32.
    pub act_quant: bool,
    /// Compute dtype of the dense path (F32, or F64 for gradient checks).
    pub dtype: DType,
    /// How the output head is held (an f32 model's; see [`Model::with_head`]).
    pub head: HeadFormat,
    /// Leave a memory-mapped bf16 / f16 head in the file's pages when the model is built,
    /// for [`Model::copy_head_in_background`] to copy into huge-page memory later (the first
    /// token comes sooner). Off: the copy is made while building.
    pub defer_head_copy: bool,
}

impl Default for ModelOptions {
    fn default() -> Self {
        ModelOptions {
            mode: WeightMode::Ternary,
            act_quant: true,
            dtype: DType::F32,
            head: HeadFormat::Stored,
            defer_head_copy: false,
        }
    }
}

/// Per-layer key/value cache for incremental decoding: k (before RoPE) and v, `[B, S, KV·hd]`.
#[derive(Debug, Clone, Default)]
pub struct Cache {
    kv: Vec<Option<LayerKv>>,
}

impl Cache {
    /// Tokens already in the cache.
    pub fn len(&self) -> usize {
        self.kv
            .first()
            .and_then(|e| e.as_ref())
            .map_or(0, LayerKv::len)
    }
    /// Whether nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// One decoder block.
#[derive(Debug, Clone)]
pub struct Block {
    input_layernorm: Tensor,
    post_attention_layernorm: Tensor,
    attn_sub_norm: Option<Tensor>,
    ffn_sub_norm: Option<Tensor>,
    /// The seven linears in [`LinearKind::ALL`] order.
    pub linears: Vec<BitLinear>,
}

/// The decoder.
#[derive(Debug, Clone)]
pub struct Model {
    /// Architecture.
    pub config: ModelConfig,
    /// Options it was built with.
    pub options: ModelOptions,
    embed: Table,
    /// Decoder blocks.
    pub blocks: Vec<Block>,
    norm: Tensor,
    head: Table,
    rope: Rope,
    device: Device,
}

fn vec_tensor(v: &[f32], dtype: DType, dev: &Device) -> Result<Tensor> {
    Ok(Tensor::from_slice(v, v.len(), dev)?.to_dtype(dtype)?)
}

impl Model {
    /// Build the forward pass over a checkpoint's weights.
    pub fn new(ck: &Checkpoint, options: ModelOptions) -> Result<Self> {
        let dev = Device::Cpu;
        let cfg = ck.config.clone();
        let dt = options.dtype;
        // The head is read whole for every token: a memory-mapped one is copied into huge-page
        // memory (or quantized into it), which tied embeddings share unless quantized.
        let tied = std::ptr::eq(ck.lm_head(), &ck.embed_tokens);
        let head_matrix = match (dt, options.head) {
            (DType::F32, HeadFormat::Stored) => {
                let head = ck.lm_head().clone();
                if !options.defer_head_copy {
                    head.make_resident();
                }
                head
            }
            (DType::F32, HeadFormat::Q8_0) => ck.lm_head().to_q8_0()?,
            _ => ck.lm_head().clone(),
        };
        let shared = tied && options.head == HeadFormat::Stored;
        let embed_matrix = if shared {
            &head_matrix
        } else {
            &ck.embed_tokens
        };
        let embed = Table::new(embed_matrix, false, dt, &dev)?;
        let head = Table::new(&head_matrix, true, dt, &dev)?;
        let mut blocks = Vec::with_capacity(ck.layers.len());
        for layer in &ck.layers {
            let mut linears = Vec::with_capacity(7);
            for kind in LinearKind::ALL {
                let lin = layer.linear(kind);
                let m = &lin.matrix;
                let (rows, cols) = (m.rows(), m.cols());
                let weight = match (options.mode, m) {
                    (WeightMode::Ternary, LinearMatrix::Ternary(t)) => {
                        LinearWeight::Ternary(Arc::clone(t))
                    }
                    (WeightMode::Ternary, LinearMatrix::Float(f)) if dt == DType::F32 => {
                        LinearWeight::Float(f.clone())
                    }
                    _ => LinearWeight::Dense(
                        Tensor::from_vec(m.dequantize(), (rows, cols), &dev)?
                            .to_dtype(dt)?
                            .t()?
                            .contiguous()?,
                    ),
                };
                let float = !m.is_ternary();
                linears.push(BitLinear {
                    weight,
                    bias: lin
                        .bias
                        .as_ref()
                        .map(|b| vec_tensor(b, dt, &dev))
                        .transpose()?,
                    act_quant: options.act_quant && !float,
                    float,
                    out_features: rows,
                });
            }
            let opt =
                |w: &Option<Vec<f32>>| w.as_ref().map(|w| vec_tensor(w, dt, &dev)).transpose();
            blocks.push(Block {
                input_layernorm: vec_tensor(&layer.input_layernorm, dt, &dev)?,
                post_attention_layernorm: vec_tensor(&layer.post_attention_layernorm, dt, &dev)?,
                attn_sub_norm: opt(&layer.attn_sub_norm)?,
                ffn_sub_norm: opt(&layer.ffn_sub_norm)?,
                linears,
            });
        }
        Ok(Model {
            rope: Rope::new(&cfg, dt, &dev)?,
            norm: vec_tensor(&ck.norm, dt, &dev)?,
            config: cfg,
            options,
            embed,
            blocks,
            head,
            device: dev,
        })
    }

    /// The device tensors live on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// A fresh, empty KV cache.
    pub fn new_cache(&self) -> Cache {
        Cache {
            kv: vec![None; self.blocks.len()],
        }
    }

    /// Token ids `[B, T]` (u32) from rows of equal length.
    pub fn ids_tensor(&self, rows: &[Vec<u32>]) -> Result<Tensor> {
        let t = rows.first().map_or(0, Vec::len);
        if rows.iter().any(|r| r.len() != t) || t == 0 {
            return Err(Error::Input(
                "token rows must be non-empty and of equal length".into(),
            ));
        }
        if let Some(bad) = rows
            .iter()
            .flatten()
            .find(|&&id| id as usize >= self.config.vocab_size)
        {
            return Err(Error::Input(format!(
                "token id {bad} is out of range for a vocabulary of {}",
                self.config.vocab_size
            )));
        }
        let flat: Vec<u32> = rows.iter().flatten().copied().collect();
        Ok(Tensor::from_vec(flat, (rows.len(), t), &self.device)?)
    }

    /// Logits `[B, T, vocab]` for ids `[B, T]`, continuing from `cache` when given.
    /// Non-finite logits are an error (a finite but huge scale can overflow f32), never a
    /// silent NaN answer.
    pub fn forward(&self, ids: &Tensor, cache: Option<&mut Cache>) -> Result<Tensor> {
        ops::on_pool(|| self.logits(&self.hidden_states(ids, cache)?))
    }

    /// The logits of the last position of the single row `ids` `[1, T]`, `[vocab]` — what
    /// generation needs, without the output head's product for the other T − 1 positions.
    pub fn next_logits(&self, ids: &Tensor, cache: Option<&mut Cache>) -> Result<Vec<f32>> {
        ops::on_pool(|| {
            let h = self.hidden_states(ids, cache)?;
            let last = h.narrow(1, h.dim(1)? - 1, 1)?;
            let logits = self.logits(&last)?;
            Ok(logits.flatten_all()?.to_dtype(DType::F32)?.to_vec1()?)
        })
    }

    /// The output head over final-normed hidden states `[.., d]`, checked finite.
    pub fn logits(&self, h: &Tensor) -> Result<Tensor> {
        let logits = match &self.head {
            Table::Stored(w) => ops::matmul_rows(h, w)?,
            Table::Tensor(wt) => matmul_const(h, wt)?,
        };
        // One pass over the logits: NaN and ±inf make the sum non-finite.
        let total = logits
            .detach()
            .sum_all()?
            .to_dtype(DType::F64)?
            .to_scalar::<f64>()?;
        if !total.is_finite() {
            return Err(Error::Check(
                "the model's logits are not finite (NaN or inf): a weight, scale or norm of the \
                 model overflows f32; check its scales"
                    .into(),
            ));
        }
        Ok(logits)
    }

    /// Final-normed hidden states `[B, T, d]`.
    pub fn hidden_states(&self, ids: &Tensor, cache: Option<&mut Cache>) -> Result<Tensor> {
        ops::on_pool(|| self.hidden_states_here(ids, cache))
    }

    /// [`Model::hidden_states`] on the calling thread.
    fn hidden_states_here(&self, ids: &Tensor, mut cache: Option<&mut Cache>) -> Result<Tensor> {
        let (b, t) = ids.dims2()?;
        let offset = cache.as_ref().map_or(0, |c| c.len());
        if offset + t > self.config.max_position_embeddings {
            return Err(Error::Input(format!(
                "sequence of {} tokens exceeds max_position_embeddings {}",
                offset + t,
                self.config.max_position_embeddings
            )));
        }
        let mut x = self.embed(ids)?.reshape((b, t, self.config.hidden_size))?;
        for (l, block) in self.blocks.iter().enumerate() {
            let mut slot = cache.as_mut().map(|c| &mut c.kv[l]);
            x = self.block_forward(l, block, &x, None, &mut |q, k, v| {
                self.attend(q, k, v, slot.as_deref_mut())
            })?;
        }
        rms_norm(&x, &self.norm, self.config.rms_norm_eps)
    }

    /// The embeddings of `ids` (any shape), `[n, d]` for n ids.
    fn embed(&self, ids: &Tensor) -> Result<Tensor> {
        let ids = ids.flatten_all()?;
        match &self.embed {
            Table::Tensor(e) => Ok(e.index_select(&ids, 0)?),
            Table::Stored(m) => {
                let ids: Vec<u32> = ids.to_dtype(DType::U32)?.to_vec1()?;
                let d = m.cols;
                let mut x = vec![0f32; ids.len() * d];
                for (row, &id) in x.chunks_mut(d.max(1)).zip(&ids) {
                    if id as usize >= m.rows {
                        return Err(Error::Input(format!(
                            "token id {id} is out of range for a vocabulary of {}",
                            m.rows
                        )));
                    }
                    m.row_into(id as usize, row);
                }
                Ok(Tensor::from_vec(x, (ids.len(), d), &self.device)?)
            }
        }
    }

    /// Attention of queries `q` over `k`, `v` appended to `cache` (the sequence's KV cache of
    /// this layer, when decoding incrementally).
    fn attend(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        cache: Option<&mut Option<LayerKv>>,
    ) -> Result<Tensor> {
        let cfg = &self.config;
        let heads = (cfg.num_attention_heads, cfg.kv_heads());
        let Some(slot) = cache else {
            let (cos, sin) = self.rope.tables(k.dim(1)?)?;
            return ops::causal_attention(q, k, v, heads.0, heads.1, &cos, &sin);
        };
        // The cache keeps keys rotated to their positions: each is rotated once, when added.
        let first = slot.as_ref().map_or(0, |kv| kv.len());
        let (cos, sin) = self.rope.tables(first + k.dim(1)?)?;
        let k = ops::rotate_keys(k, heads.1, (&cos, &sin), first)?;
        let kv = match slot {
            Some(kv) => {
                kv.append(&k, v)?;
                kv
            }
            None => slot.insert(LayerKv::new(&k, v)?),
        };
        let (k, v) = kv.view()?;
        ops::causal_attention_keys((q, &k, &v), heads, (&cos, &sin), true)
    }

    /// Block `l` over `x` `[B, T, d]`: `attend` turns q, k, v into the attention output, and
    /// `deltas` (per-row adapters, see [`RowDeltas`]) add to the linears' outputs.
    fn block_forward(
        &self,
        l: usize,
        block: &Block,
        x: &Tensor,
        deltas: Option<&dyn RowDeltas>,
        attend: &mut dyn FnMut(&Tensor, &Tensor, &Tensor) -> Result<Tensor>,
    ) -> Result<Tensor> {
        let cfg = &self.config;
        let eps = cfg.rms_norm_eps;
        let lin = |k: LinearKind, x: &Tensor| -> Result<Tensor> {
            let linear = &block.linears[k as usize];
            let y = linear.forward(x)?;
            match deltas
                .map(|d| d.delta(l, k, x, linear.act_quant))
                .transpose()?
            {
                Some(Some(delta)) => Ok((&y + delta.reshape(y.shape())?)?),
                _ => Ok(y),
            }
        };

        // Attention: o_proj(attn_sub_norm(softmax(rope(q) rope(k)ᵀ/√hd + mask) v)), one fused op
        // in the token-major layout of the projections (no head transposes).
        let xn = rms_norm(x, &block.input_layernorm, eps)?;
        let q = lin(LinearKind::Q, &xn)?; // [B,T,H·hd]
        let k = lin(LinearKind::K, &xn)?; // [B,T,KV·hd]
        let v = lin(LinearKind::V, &xn)?; // [B,T,KV·hd]
        let mut att = attend(&q, &k, &v)?;
        if let Some(w) = &block.attn_sub_norm {
            att = rms_norm(&att, w, eps)?;
        }
        let x = (x + lin(LinearKind::O, &att)?)?;

        // FFN: down(ffn_sub_norm(act(gate(x)) · up(x))).
        let xn = rms_norm(&x, &block.post_attention_layernorm, eps)?;
        let mut f = ops::gated_activation(
            &lin(LinearKind::Gate, &xn)?,
            &lin(LinearKind::Up, &xn)?,
            cfg.hidden_act,
        )?;
        if let Some(w) = &block.ffn_sub_norm {
            f = rms_norm(&f, w, eps)?;
        }
        Ok((x + lin(LinearKind::Down, &f)?)?)
    }
}

/// Parse token id rows written as `"1,2,3;4,5,6"` (`;` separates rows, rows of equal length).
pub fn parse_token_rows(text: &str) -> Result<Vec<Vec<u32>>> {
    let rows: Vec<Vec<u32>> = text
        .split(';')
        .enumerate()
        .map(|(r, row)| {
            row.split(',')
                .enumerate()
                .map(|(c, tok)| {
                    tok.trim().parse::<u32>().map_err(|_| {
                        Error::Input(format!(
                            "--tokens: row {}, item {}: `{}` is not a token id",
                            r + 1,
                            c + 1,
                            tok.trim()
                        ))
                    })
                })
                .collect()
        })
        .collect::<Result<_>>()?;
    if let Some((r, row)) = rows
        .iter()
        .enumerate()
        .find(|(_, row)| row.len() != rows[0].len())
    {
        return Err(Error::Input(format!(
            "--tokens: row {} has {} ids but row 1 has {}; rows must have equal length",
            r + 1,
            row.len(),
            rows[0].len()
        )));
    }
    Ok(rows)
}

/// A named trainable parameter (HF tensor name).
pub type NamedVar = (String, candle_core::Var);

impl Model {
    /// A freshly initialised model for quantization-aware training: every tensor is a
    /// variable; linears hold float master weights ternarized in the forward pass
    /// ([`LinearWeight::Qat`]). Init: N(0, 0.02²)-like linears scaled by 1/√(2·layers) on the
    /// residual outputs (GPT-2), unit-variance embeddings, unit norms.
    pub fn trainable(
        config: ModelConfig,
        act_quant: bool,
        seed: u64,
    ) -> Result<(Model, Vec<NamedVar>)> {
        use candle_core::Var;
        let dev = Device::Cpu;
        let mut rng = StdRng::seed_from_u64(seed);
        let mut vars: Vec<NamedVar> = Vec::new();
        let mut randn = |shape: (usize, usize),
                         std: f32,
                         name: String,
                         vars: &mut Vec<NamedVar>|
         -> Result<Tensor> {
            let n = shape.0 * shape.1;
            let v: Vec<f32> = (0..n)
                .map(|_| {
                    // Box–Muller: a proper Gaussian init.
                    let (u1, u2): (f32, f32) = (rng.gen::<f32>().max(1e-7), rng.gen());
                    std * (-2.0 * u1.ln()).sqrt() * (std::f32::consts::TAU * u2).cos()
                })
                .collect();
            let var = Var::from_vec(v, shape, &dev)?;
            let t = var.as_tensor().clone();
            vars.push((name, var));
            Ok(t)
        };
        let ones = |n: usize, name: String, vars: &mut Vec<NamedVar>| -> Result<Tensor> {
            let var = Var::from_vec(vec![1f32; n], n, &dev)?;
            let t = var.as_tensor().clone();
            vars.push((name, var));
            Ok(t)
        };
        let (v, d) = (config.vocab_size, config.hidden_size);
        let embed = randn((v, d), 1.0, "model.embed_tokens.weight".into(), &mut vars)?;
        let resid_std = 0.02 / (2.0 * config.num_hidden_layers as f32).sqrt();
        let q_width = config.num_attention_heads * config.head_dim();
        let mut blocks = Vec::new();
        for l in 0..config.num_hidden_layers {
            let p = format!("model.layers.{l}");
            let mut linears = Vec::new();
            for kind in LinearKind::ALL {
                let (rows, cols) = kind.shape(&config);
                let std = if matches!(kind, LinearKind::O | LinearKind::Down) {
                    resid_std
                } else {
                    0.02
                };
                let w = randn(
                    (rows, cols),
                    std,
                    format!("{}.weight", crate::engine::checkpoint::linear_name(l, kind)),
                    &mut vars,
                )?;
                linears.push(BitLinear {
                    weight: LinearWeight::Qat(w),
                    bias: None,
                    act_quant,
                    float: false,
                    out_features: rows,
                });
            }
            let sub = config.sub_norms.unwrap_or(true);
            blocks.push(Block {
                input_layernorm: ones(d, format!("{p}.input_layernorm.weight"), &mut vars)?,
                post_attention_layernorm: ones(
                    d,
                    format!("{p}.post_attention_layernorm.weight"),
                    &mut vars,
                )?,
                attn_sub_norm: if sub {
                    Some(ones(
                        q_width,
                        format!("{p}.self_attn.attn_sub_norm.weight"),
                        &mut vars,
                    )?)
                } else {
                    None
                },
                ffn_sub_norm: if sub {
                    Some(ones(
                        config.intermediate_size,
                        format!("{p}.mlp.ffn_sub_norm.weight"),
                        &mut vars,
                    )?)
                } else {
                    None
                },
                linears,
            });
        }
        let norm = ones(d, "model.norm.weight".into(), &mut vars)?;
        let lm_head = randn((v, d), 0.02, "lm_head.weight".into(), &mut vars)?;
        let mut config = config;
        config.sub_norms = Some(config.sub_norms.unwrap_or(true));
        let options = ModelOptions {
            mode: WeightMode::Dense,
            act_quant,
            dtype: DType::F32,
            head: HeadFormat::Stored,
            defer_head_copy: false,
        };
        Ok((
            Model {
                rope: Rope::new(&config, DType::F32, &dev)?,
                head: Table::Tensor(lm_head.t()?),
                config,
                options,
                embed: Table::Tensor(embed),
                blocks,
                norm,
                device: dev,
            },
            vars,
        ))
    }

    /// Freeze the current weights into a ternary checkpoint: QAT master weights by the
    /// per-tensor absmean rule their forward pass uses; dense, SVF and hybrid weights
    /// re-quantized ([`crate::engine::ternary::requant`]) with one scale per matrix. Float base
    /// linears stay float: W, or the adapted W', in f32.
    pub fn to_checkpoint(&self) -> Result<Checkpoint> {
        self.requantized_checkpoint(false)
    }

    /// [`Model::to_checkpoint`], with one scale per output channel for the re-quantized SVF
    /// and hybrid weights when `per_channel`.
    pub fn requantized_checkpoint(&self, per_channel: bool) -> Result<Checkpoint> {
        use crate::engine::checkpoint::{Layer, Linear, SourceFormat};
        use crate::engine::ternary::requant::requantize;
        use crate::engine::ternary::Quantization;
        let flat = |t: &Tensor| -> Result<Vec<f32>> {
            Ok(t.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?)
        };
        let mut layers = Vec::new();
        for b in &self.blocks {
            let mut linears = Vec::new();
            for lin in &b.linears {
                let float = |w: Vec<f32>, (rows, cols): (usize, usize)| {
                    LinearMatrix::Float(FloatMatrix::from_f32(w, rows, cols))
                };
                let matrix: LinearMatrix = match &lin.weight {
                    LinearWeight::Float(m) => LinearMatrix::Float(m.clone()),
                    LinearWeight::Dense(wt) if lin.float => {
                        let (cols, rows) = wt.dims2()?;
                        float(flat(&wt.t()?)?, (rows, cols))
                    }
                    LinearWeight::Adapted(w) if lin.float => float(w.adapted_weight()?, w.shape()?),
                    LinearWeight::Ternary(m) => LinearMatrix::Ternary(Arc::clone(m)),
                    LinearWeight::Dense(wt) => {
                        let (cols, rows) = wt.dims2()?;
                        requantize(&flat(&wt.t()?)?, rows, cols, false).into()
                    }
                    LinearWeight::Qat(w) => {
                        let (rows, cols) = w.dims2()?;
                        let q = Quantization::PerTensor;
                        TernaryMatrix::quantize(&flat(w)?, rows, cols, q).into()
                    }
                    LinearWeight::Adapted(w) => {
                        // Re-quantization of the adapted W' (docs/DESIGN.md §5).
                        let (rows, cols) = w.shape()?;
                        let per_channel = w.requant_per_channel(per_channel);
                        requantize(&w.adapted_weight()?, rows, cols, per_channel).into()
                    }
                    LinearWeight::Hybrid(m, delta) => {
                        // W + the low-rank delta, re-quantized (a float base: kept float).
                        let w: Vec<f32> = (delta.adapted_weight()?.iter())
                            .zip(m.dequantize())
                            .map(|(d, b)| d + b)
                            .collect();
                        let (rows, cols) = (m.rows(), m.cols());
                        match m {
                            LinearMatrix::Float(_) => float(w, (rows, cols)),
                            LinearMatrix::Ternary(_) => {
                                requantize(&w, rows, cols, per_channel).into()
                            }
                        }
                    }
                };
                let bias = lin.bias.as_ref().map(flat).transpose()?;
                linears.push(Linear { matrix, bias });
            }
            layers.push(Layer {
                input_layernorm: flat(&b.input_layernorm)?,
                post_attention_layernorm: flat(&b.post_attention_layernorm)?,
                attn_sub_norm: b.attn_sub_norm.as_ref().map(flat).transpose()?,
                ffn_sub_norm: b.ffn_sub_norm.as_ref().map(flat).transpose()?,
                linears,
            });
        }
        let embed_tokens = self.embed.to_matrix(false)?;
        let lm_head = self.head.to_matrix(true)?;
        let tied = self.config.tie_word_embeddings;
        // Per-row scales (alpha-channel experts folded in) are recorded as per-channel.
        let per_row = layers
            .iter()
            .flat_map(|l| &l.linears)
            .any(|l| l.matrix.ternary().is_some_and(|m| m.scales.len() > 1));
        Ok(Checkpoint {
            config: self.config.clone(),
            quantization: if per_row {
                Quantization::PerChannel { threshold: 0.5 }
            } else {
                Quantization::PerTensor
            },
            format: SourceFormat::Native,
            source: std::path::PathBuf::from("<trained>"),
            bytes_on_disk: 0,
            embed_tokens,
            norm: flat(&self.norm)?,
            lm_head: (!tied).then_some(lm_head),
            layers,
        })
    }
}

#[cfg(test)]
impl Model {
    /// Logits of a fixed 6-token probe row, flattened, for tests comparing two models.
    pub(crate) fn probe_logits(&self) -> Vec<f32> {
        let ids = self.ids_tensor(&[vec![1, 5, 9, 3, 7, 2]]).unwrap();
        let logits = self.forward(&ids, None).unwrap();
        logits.flatten_all().unwrap().to_vec1().unwrap()
    }
}

/// The default model's architecture: 4 layers, d 256, FFN 640, 4 heads (2 kv), byte vocab.
pub fn default_arch() -> ModelConfig {
    ModelConfig {
        vocab_size: BYTE_VOCAB,
        hidden_size: 256,
        intermediate_size: 640,
        num_hidden_layers: 4,
        num_attention_heads: 4,
        num_key_value_heads: Some(2),
        head_dim: None,
        hidden_act: Activation::Relu2,
        max_position_embeddings: 128,
        rms_norm_eps: 1e-5,
        rope_theta: 10000.0,
        tie_word_embeddings: false,
        bos_token_id: Some(byte_ids::BOS),
        eos_token_id: Some(byte_ids::EOS),
        sub_norms: Some(true),
    }
}

/// The default architecture shrunk for unit tests: `layers` layers of width `hidden`, FFN
/// `ffn`, `heads` heads over `kv_heads` kv heads, `positions` positions.
#[cfg(test)]
pub(crate) fn test_arch(
    hidden: usize,
    ffn: usize,
    layers: usize,
    (heads, kv_heads): (usize, usize),
    positions: usize,
) -> ModelConfig {
    let mut cfg = default_arch();
    cfg.hidden_size = hidden;
    cfg.intermediate_size = ffn;
    cfg.num_hidden_layers = layers;
    cfg.num_attention_heads = heads;
    cfg.num_key_value_heads = Some(kv_heads);
    cfg.max_position_embeddings = positions;
    cfg
}

/// Assert that every variable of `vars` received a non-zero gradient in `grads`.
#[cfg(test)]
pub(crate) fn assert_every_var_has_a_gradient(
    grads: &candle_core::backprop::GradStore,
    vars: &[NamedVar],
    what: &str,
) {
    for (name, var) in vars {
        let g = grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("{what} {name}: no gradient"));
        let n = g
            .abs()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(n > 0.0, "{what} {name}: zero gradient");
    }
}

#[cfg(test)]
impl Checkpoint {
    /// A random 2-layer model (2 heads / 1 kv head, 64 positions) of width `hidden` and FFN
    /// `ffn`, for unit tests.
    pub(crate) fn tiny(hidden: usize, ffn: usize, seed: u64) -> Checkpoint {
        Checkpoint::random(test_arch(hidden, ffn, 2, (2, 1), 64), seed)
    }
}

#[cfg(test)]
mod tests;
