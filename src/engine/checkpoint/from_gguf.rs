//! Checkpoints from GGUF files: llama.cpp's `bitnet` architecture (SiLU-gated FFN, as
//! llama.cpp computes it), bitnet.cpp's `bitnet-b1.58` / `bitnet-25` (ReLU²) and `llama` (a
//! float model). Linears are ternary as TQ1_0, TQ2_0 or I2_S (one scale per row or tensor,
//! optionally times llama.cpp's per-tensor `.scale`), or float: F32, F16, BF16, Q8_0, or a
//! block type candle decodes (Q4_0, Q4_1, Q5_0, Q5_1, Q2_K … Q6_K, widened to f32). A float
//! linear of a BitNet architecture whose values are exactly ternary (±a per row, or 0) is read
//! back as ternary — that is how `bitsvf convert --type f16` writes one. The embeddings, head
//! and norms take the float types; F16 / BF16 stay in the mapped file, as with safetensors.
//! llama.cpp stores `llama` query and key rows permuted for its interleaved RoPE; they are put
//! back in the rotate-half order transformers (and bitsvf) use.

use super::gguf::{decode_quant, GgmlType, Gguf, TensorInfo};
use super::{
    Checkpoint, FloatMatrix, Layer, Linear, LinearKind, LinearMatrix, SourceFormat, StoredDtype,
};
use crate::engine::config::{Activation, ModelConfig};
use crate::engine::ternary::ggml::TernaryBlocks;
use crate::engine::ternary::{Quantization, TernaryMatrix};
use crate::error::{Error, Result};
use std::path::Path;

/// GGUF architectures bitsvf reads, with the FFN activation each implies and whether it is
/// BitNet (sub-norms before o_proj and down_proj) rather than llama.
const ARCHITECTURES: [(&str, Activation, bool); 4] = [
    ("bitnet", Activation::Silu, true),
    ("bitnet-b1.58", Activation::Relu2, true),
    ("bitnet-25", Activation::Relu2, true),
    ("llama", Activation::Silu, false),
];

/// ggml's names of the seven linears of block `l`, in [`LinearKind::ALL`] order.
fn linear_names(l: usize) -> [String; 7] {
    LinearKind::ALL.map(|k| format!("blk.{l}.{}", k.ggml_name()))
}

/// Load the GGUF file at `path`.
pub fn load_gguf(path: &Path) -> Result<Checkpoint> {
    let g = Gguf::open(path)?;
    let arch = g
        .get("general.architecture")
        .and_then(|v| v.as_str())
        .ok_or_else(|| Error::config(path, "general.architecture", "missing or not a string"))?
        .to_string();
    let Some(&(_, act, bitnet)) = ARCHITECTURES.iter().find(|(a, _, _)| *a == arch) else {
        return Err(Error::UnknownFormat {
            path: path.to_path_buf(),
            msg: format!(
                "GGUF architecture `{arch}`; bitsvf reads {}",
                ARCHITECTURES.map(|(a, _, _)| a).join(", ")
            ),
        });
    };
    let key = |k: &str| format!("{arch}.{k}");
    let int = |k: &str, default: Option<usize>| -> Result<usize> {
        match g.get(&key(k)) {
            None => default.ok_or_else(|| Error::config(path, key(k), "missing")),
            Some(v) => v
                .as_u64()
                .and_then(|v| usize::try_from(v).ok())
                .filter(|&v| v > 0)
                .ok_or_else(|| {
                    Error::config(path, key(k), format!("{v:?} is not a positive integer"))
                }),
        }
    };
    let float = |k: &str, default: f64| -> Result<f64> {
        match g.get(&key(k)) {
            None => Ok(default),
            Some(v) => v
                .as_f64()
                .filter(|x| x.is_finite() && *x > 0.0)
                .ok_or_else(|| {
                    Error::config(path, key(k), format!("{v:?} is not a positive number"))
                }),
        }
    };
    let embed = g.tensor("token_embd.weight")?;
    let (vocab, d) = embed.matrix_shape().ok_or_else(|| {
        g.tensor_error(
            &embed.name,
            format!("dims {:?} are not a matrix", embed.dims),
        )
    })?;
    let heads = int("attention.head_count", None)?;
    let token = |k: &str| {
        g.get(&format!("tokenizer.ggml.{k}"))
            .and_then(|v| v.as_u64())
            .and_then(|v| u32::try_from(v).ok())
    };
    let config = ModelConfig {
        vocab_size: vocab,
        hidden_size: int("embedding_length", None)?,
        intermediate_size: int("feed_forward_length", None)?,
        num_hidden_layers: int("block_count", None)?,
        num_attention_heads: heads,
        num_key_value_heads: Some(int("attention.head_count_kv", Some(heads))?),
        head_dim: g
            .get(&key("attention.key_length"))
            .map(|_| int("attention.key_length", None))
            .transpose()?,
        hidden_act: act,
        max_position_embeddings: int("context_length", Some(2048))?,
        rms_norm_eps: float("attention.layer_norm_rms_epsilon", 1e-5)?,
        rope_theta: float("rope.freq_base", 10000.0)?,
        tie_word_embeddings: !g.tensors.iter().any(|t| t.name == "output.weight"),
        bos_token_id: token("bos_token_id"),
        eos_token_id: token("eos_token_id"),
        sub_norms: Some(bitnet),
    };
    config.validate(path)?;
    if config.hidden_size != d {
        return Err(Error::config(
            path,
            key("embedding_length"),
            format!(
                "{} but token_embd.weight has rows of {d}",
                config.hidden_size
            ),
        ));
    }
    check_rope(&g, &arch, &config)?;
    let embed_tokens = read_table(&g, embed, vocab, d)?;
    let lm_head = match config.tie_word_embeddings {
        true => None,
        false => Some(read_table(&g, g.tensor("output.weight")?, vocab, d)?),
    };
    let norm = read_vector(&g, "output_norm.weight", d)?;
    let (n, q_width) = (
        config.num_hidden_layers,
        config.num_attention_heads * config.head_dim(),
    );
    let kv_width = config.kv_heads() * config.head_dim();
    let ff = config.intermediate_size;
    // The layers the file declares must be those the metadata says.
    if let Some(t) = g.tensors.iter().find(|t| {
        t.name
            .strip_prefix("blk.")
            .and_then(|r| r.split('.').next())
            .and_then(|i| i.parse::<usize>().ok())
            .is_some_and(|i| i >= n)
    }) {
        return Err(Error::config(
            path,
            key("block_count"),
            format!("{n} blocks but the file has tensor `{}`", t.name),
        ));
    }
    let mut layers = Vec::new();
    for l in 0..n {
        let shapes = [
            (q_width, d),
            (kv_width, d),
            (kv_width, d),
            (d, q_width),
            (ff, d),
            (ff, d),
            (d, ff),
        ];
        let mut linears = Vec::with_capacity(7);
        for ((name, kind), (rows, cols)) in
            linear_names(l).into_iter().zip(LinearKind::ALL).zip(shapes)
        {
            // llama.cpp's converter permutes a llama model's query and key rows.
            let heads = match kind {
                LinearKind::Q if !bitnet => Some(config.num_attention_heads),
                LinearKind::K if !bitnet => Some(config.kv_heads()),
                _ => None,
            };
            linears.push(Linear {
                matrix: read_linear(&g, &name, rows, cols, bitnet, heads)?,
                bias: None,
            });
        }
        let sub_norm = |n: &str, len: usize| {
            bitnet
                .then(|| read_vector(&g, &format!("blk.{l}.{n}.weight"), len))
                .transpose()
        };
        layers.push(Layer {
            input_layernorm: read_vector(&g, &format!("blk.{l}.attn_norm.weight"), d)?,
            post_attention_layernorm: read_vector(&g, &format!("blk.{l}.ffn_norm.weight"), d)?,
            attn_sub_norm: sub_norm("attn_sub_norm", q_width)?,
            ffn_sub_norm: sub_norm("ffn_sub_norm", ff)?,
            linears,
        });
    }
    let per_row = layers
        .iter()
        .flat_map(|l| &l.linears)
        .any(|l| l.matrix.ternary().is_some_and(|m| m.scales.len() > 1));
    Ok(Checkpoint {
        config,
        quantization: if per_row {
            Quantization::PerChannel { threshold: 0.5 }
        } else {
            Quantization::PerTensor
        },
        format: SourceFormat::Gguf { architecture: arch },
        source: path.to_path_buf(),
        bytes_on_disk: std::fs::metadata(path)
            .map_err(|e| Error::io(path, e))?
            .len(),
        embed_tokens,
        norm,
        lm_head,
        layers,
    })
}

/// Check a tensor's ggml dims against `[cols, rows]`.
fn expect_matrix(g: &Gguf, t: &TensorInfo, rows: usize, cols: usize) -> Result<()> {
    if t.matrix_shape() != Some((rows, cols)) || t.dims.len() != 2 {
        return Err(Error::Shape {
            path: g.path.clone(),
            tensor: t.name.clone(),
            expected: vec![rows, cols],
            got: t.dims.iter().rev().map(|&d| d as usize).collect(),
        });
    }
    Ok(())
}

/// The embeddings or the head `[rows, cols]`: F16 / BF16 mapped, F32 in memory, Q8_0 blocks.
fn read_table(g: &Gguf, t: &TensorInfo, rows: usize, cols: usize) -> Result<FloatMatrix> {
    expect_matrix(g, t, rows, cols)?;
    let data = g.data(t)?;
    let bad = |m: String| g.tensor_error(&t.name, m);
    match t.ty {
        GgmlType::F16 => FloatMatrix::mapped(StoredDtype::F16, data, rows, cols).map_err(bad),
        GgmlType::Bf16 => FloatMatrix::mapped(StoredDtype::Bf16, data, rows, cols).map_err(bad),
        GgmlType::F32 => Ok(FloatMatrix::from_f32(floats(g, t)?, rows, cols)),
        GgmlType::Q8_0 => {
            FloatMatrix::from_q8_0_blocks(&data, rows, cols).map_err(|e| bad(e.to_string()))
        }
        GgmlType::Quant(q) => Ok(FloatMatrix::from_f32(
            decode_quant(q, &data, rows, cols).map_err(bad)?,
            rows,
            cols,
        )),
        other => Err(bad(format!(
            "type {} for a float matrix; bitsvf reads F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, \
             Q5_1 and Q2_K to Q6_K",
            other.name()
        ))),
    }
}

/// RoPE as bitsvf computes it (rotate-half over the whole head, no frequency scaling);
/// anything else the file asks for is an error naming the key or tensor.
fn check_rope(g: &Gguf, arch: &str, config: &ModelConfig) -> Result<()> {
    let key = |k: &str| format!("{arch}.{k}");
    if let Some(v) = g.get(&key("rope.dimension_count")) {
        if v.as_u64() != Some(config.head_dim() as u64) {
            return Err(Error::config(
                &g.path,
                key("rope.dimension_count"),
                format!(
                    "{v:?}, but the head dimension is {}; bitsvf rotates whole heads",
                    config.head_dim()
                ),
            ));
        }
    }
    if let Some(v) = g.get(&key("rope.scaling.type")) {
        if v.as_str() != Some("none") {
            return Err(Error::config(
                &g.path,
                key("rope.scaling.type"),
                format!("{v:?}; bitsvf has no RoPE scaling"),
            ));
        }
    }
    if g.tensors.iter().any(|t| t.name == "rope_freqs.weight") {
        return Err(g.tensor_error(
            "rope_freqs.weight",
            "scaled RoPE frequencies (Llama 3.1 style) are not supported",
        ));
    }
    Ok(())
}

/// Linear `prefix` `[rows, cols]`: ternary types as [`read_ternary`]; float types as a
/// [`FloatMatrix`], times a `.scale` if the file has one, and — in a BitNet architecture — back
/// to ternary when every row is ±a or 0. `heads`: undo llama.cpp's query/key row permutation
/// for that many heads.
fn read_linear(
    g: &Gguf,
    prefix: &str,
    rows: usize,
    cols: usize,
    bitnet: bool,
    heads: Option<usize>,
) -> Result<LinearMatrix> {
    let name = format!("{prefix}.weight");
    let t = g.tensor(&name)?;
    let perm = heads.map(|h| unpermute_rows(rows, h));
    if t.ty.is_ternary() {
        let m = read_ternary(g, prefix, rows, cols)?;
        return Ok(match perm {
            None => m.into(),
            Some(p) => {
                let (values, cols) = (m.values(), m.cols);
                let rows_of = |r: usize| &values[r * cols..(r + 1) * cols];
                let v: Vec<i8> = p.iter().flat_map(|&r| rows_of(r).to_vec()).collect();
                let scales = match m.scales.len() {
                    1 => m.scales.clone(),
                    _ => p.iter().map(|&r| m.scales[r]).collect(),
                };
                TernaryMatrix::from_values(&v, rows, cols, scales).into()
            }
        });
    }
    let mut m = read_table(g, t, rows, cols)?;
    if let Some(p) = perm {
        m = m.permute_rows(&p);
    }
    let scale = read_scale(g, prefix)?;
    if bitnet {
        if let Some(mut tm) = TernaryMatrix::from_exact(&m.to_f32(), rows, cols) {
            tm.scales
                .iter_mut()
                .for_each(|x| *x *= scale.unwrap_or(1.0));
            return Ok(tm.into());
        }
    }
    Ok(LinearMatrix::Float(match scale {
        None => m,
        Some(s) => FloatMatrix::from_f32(m.to_f32().iter().map(|x| x * s).collect(), rows, cols),
    }))
}

/// For each row of llama.cpp's permuted query/key matrix, the row of the transformers layout
/// it holds (the inverse of [`unpermute_rows`]): the order to write a `llama` model's rows in.
pub fn llama_file_row_order(rows: usize, heads: usize) -> Vec<usize> {
    let to_model = unpermute_rows(rows, heads);
    let mut order = vec![0; to_model.len()];
    for (model_row, &file_row) in to_model.iter().enumerate() {
        order[file_row] = model_row;
    }
    order
}

/// For each row of the transformers layout, the row of llama.cpp's permuted query/key matrix
/// that holds it: llama.cpp interleaves each head's two rotate-half halves
/// (`convert_hf_to_gguf.py`'s `permute`), so row `h·hd + 2i + j` of the file is row
/// `h·hd + j·hd/2 + i` of the model.
pub(super) fn unpermute_rows(rows: usize, heads: usize) -> Vec<usize> {
    let hd = rows / heads.max(1);
    let half = hd / 2;
    let mut perm = vec![0; rows];
    for h in 0..heads {
        for i in 0..half {
            for j in 0..2 {
                perm[h * hd + j * half + i] = h * hd + 2 * i + j;
            }
        }
    }
    perm
}

/// llama.cpp's optional per-tensor `.scale` of linear `prefix` (one positive value).
fn read_scale(g: &Gguf, prefix: &str) -> Result<Option<f32>> {
    let scale_name = format!("{prefix}.scale");
    let Some(t) = g.tensors.iter().find(|t| t.name == scale_name) else {
        return Ok(None);
    };
    let s = floats(g, t)?;
    if s.len() != 1 || !(s[0].is_finite() && s[0] > 0.0) {
        return Err(g.tensor_error(&scale_name, format!("{s:?}; expected one finite value > 0")));
    }
    Ok(Some(s[0]))
}

/// The values of an F32 / F16 / BF16 tensor, checked finite; halves are widened by
/// [`FloatMatrix`], as the embeddings are.
fn floats(g: &Gguf, t: &TensorInfo) -> Result<Vec<f32>> {
    let data = g.data(t)?;
    let bad = |m: String| g.tensor_error(&t.name, m);
    let half = match t.ty {
        GgmlType::F16 => StoredDtype::F16,
        GgmlType::Bf16 => StoredDtype::Bf16,
        GgmlType::F32 => {
            let v: Vec<f32> = data
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect();
            if let Some(i) = v.iter().position(|x| !x.is_finite()) {
                return Err(bad(format!("non-finite value {} at index {i}", v[i])));
            }
            return Ok(v);
        }
        other => {
            return Err(bad(format!(
                "type {}; expected F32, F16 or BF16",
                other.name()
            )))
        }
    };
    let n = data.len() / 2;
    Ok(FloatMatrix::mapped(half, data, 1, n).map_err(bad)?.to_f32())
}

/// A norm's weights `[len]`.
fn read_vector(g: &Gguf, name: &str, len: usize) -> Result<Vec<f32>> {
    let t = g.tensor(name)?;
    if t.dims != [len as u64] {
        return Err(Error::Shape {
            path: g.path.clone(),
            tensor: name.to_string(),
            expected: vec![len],
            got: t.dims.iter().map(|&d| d as usize).collect(),
        });
    }
    floats(g, t)
}

/// A ternary linear `[rows, cols]` from TQ1_0 / TQ2_0 blocks or I2_S, times its optional per-tensor
/// `.scale` (llama.cpp multiplies the product by it).
fn read_ternary(g: &Gguf, prefix: &str, rows: usize, cols: usize) -> Result<TernaryMatrix> {
    let name = format!("{prefix}.weight");
    let t = g.tensor(&name)?;
    expect_matrix(g, t, rows, cols)?;
    let bad = |e: String| g.tensor_error(&name, e);
    let data = g.data(t)?;
    let mut m = match t.ty {
        GgmlType::Tq1_0 => TernaryMatrix::from_ggml(TernaryBlocks::Tq1_0, &data, rows, cols),
        GgmlType::Tq2_0 => TernaryMatrix::from_ggml(TernaryBlocks::Tq2_0, &data, rows, cols),
        GgmlType::I2S => TernaryMatrix::from_i2_s(&data, rows, cols),
        other => return Err(bad(format!("type {} is not ternary", other.name()))),
    }
    .map_err(bad)?;
    if let Some(s) = read_scale(g, prefix)? {
        m.scales.iter_mut().for_each(|x| *x *= s);
    }
    if let Some(i) = m.scales.iter().position(|s| !(s.is_finite() && *s > 0.0)) {
        return Err(g.tensor_error(
            &name,
            format!(
                "row scale {} at row {i} must be finite and > 0",
                m.scales[i]
            ),
        ));
    }
    Ok(m)
}

#[cfg(test)]
mod tests {
    use super::super::save_gguf;
    use super::*;
    use crate::engine::model::test_arch;

    /// Files that are not what they claim are errors naming the tensor or field.
    #[test]
    fn bad_gguf_models_are_named_errors() {
        let mut cfg = test_arch(256, 512, 1, (4, 2), 64);
        cfg.vocab_size = 40;
        let ck = Checkpoint::random(cfg, 2);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.gguf");
        save_gguf(&ck, &path, GgmlType::Tq2_0).unwrap();
        let g = Gguf::open(&path).unwrap();
        // Rewrite the file with one change.
        let rewrite = |edit: &dyn Fn(&mut super::super::gguf::GgufWriter)| {
            let mut w = super::super::gguf::GgufWriter::default();
            for (k, v) in &g.metadata {
                w.meta(k, v.clone());
            }
            for t in &g.tensors {
                w.tensor(&t.name, t.ty, t.dims.clone(), g.data(t).unwrap().to_vec())
                    .unwrap();
            }
            edit(&mut w);
            w.write(&path).unwrap();
            super::super::load(&path).unwrap_err().to_string()
        };
        use super::super::gguf::MetaValue;
        let err = rewrite(&|w| w.meta("general.architecture", MetaValue::Str("gpt2".into())));
        assert!(err.contains("gpt2"), "{err}");
        let err = rewrite(&|w| w.meta("bitnet-b1.58.block_count", MetaValue::U32(0)));
        assert!(err.contains("block_count"), "{err}");
        let err = rewrite(&|w| w.meta("bitnet-b1.58.embedding_length", MetaValue::U32(128)));
        assert!(err.contains("embedding_length"), "{err}");
        let err = rewrite(&|w| {
            let bad = vec![0u8; 4 * 256];
            w.meta("x", MetaValue::Bool(true));
            let _ = w.tensor(
                "blk.0.attn_norm.weight",
                GgmlType::F32,
                vec![256],
                bad.clone(),
            );
        });
        assert!(err.contains("twice"), "{err}");
    }

    /// RoPE a float llama file asks for that bitsvf does not compute is an error naming the
    /// key or tensor, as is a block type where a norm must be a float vector.
    #[test]
    fn unsupported_llama_files_are_named_errors() {
        use super::super::gguf::{GgufWriter, MetaValue};
        let src = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/float-llama/llama-q8_0.gguf");
        let g = Gguf::open(&src).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.gguf");
        let rewrite = |edit: &dyn Fn(&mut GgufWriter, &str, &TensorInfo) -> bool| {
            let mut w = GgufWriter::default();
            for (k, v) in &g.metadata {
                w.meta(k, v.clone());
            }
            for t in &g.tensors {
                if !edit(&mut w, &t.name, t) {
                    w.tensor(&t.name, t.ty, t.dims.clone(), g.data(t).unwrap().to_vec())
                        .unwrap();
                }
            }
            w.write(&path).unwrap();
            super::super::load(&path).unwrap_err().to_string()
        };
        let err = rewrite(&|w, name, _| {
            if name == "token_embd.weight" {
                w.meta("llama.rope.scaling.type", MetaValue::Str("yarn".into()));
            }
            false
        });
        assert!(
            err.contains("llama.rope.scaling.type") && err.contains("yarn"),
            "{err}"
        );
        let err = rewrite(&|w, name, _| {
            if name == "token_embd.weight" {
                w.tensor("rope_freqs.weight", GgmlType::F32, vec![8], vec![0; 32])
                    .unwrap();
            }
            false
        });
        assert!(err.contains("rope_freqs.weight"), "{err}");
        let err = rewrite(&|w, name, t| {
            if name != "blk.1.attn_norm.weight" {
                return false;
            }
            // The 64 norm weights as two Q8_0 blocks.
            let q = FloatMatrix::from_f32(vec![1.0; 64], 1, 64)
                .to_q8_0_blocks()
                .unwrap();
            w.tensor(name, GgmlType::Q8_0, t.dims.clone(), q).unwrap();
            true
        });
        assert!(
            err.contains("blk.1.attn_norm.weight") && err.contains("Q8_0"),
            "{err}"
        );
    }
}
