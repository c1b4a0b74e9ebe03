//! Checkpoints from GGUF files: llama.cpp's `bitnet` architecture (SiLU-gated FFN, as
//! llama.cpp computes it) and bitnet.cpp's `bitnet-b1.58` / `bitnet-25` (ReLU²), with the
//! ternary linears as TQ1_0 or TQ2_0 (one scale per row, optionally times llama.cpp's
//! per-tensor `.scale`) and the embeddings, head and norms as F32, F16, BF16 or (embeddings and
//! head) Q8_0. Embeddings in F16 / BF16 stay in the mapped file, as with safetensors.

use super::gguf::{GgmlType, Gguf, MetaValue, TensorInfo};
use super::{Checkpoint, FloatMatrix, Layer, Linear, LinearKind, SourceFormat, StoredDtype};
use crate::engine::config::{Activation, ModelConfig};
use crate::engine::ternary::ggml::TernaryBlocks;
use crate::engine::ternary::{Quantization, TernaryMatrix};
use crate::error::{Error, Result};
use std::path::Path;
use std::sync::Arc;

/// GGUF architectures bitsvf reads, with the FFN activation each implies.
const ARCHITECTURES: [(&str, Activation); 3] = [
    ("bitnet", Activation::Silu),
    ("bitnet-b1.58", Activation::Relu2),
    ("bitnet-25", Activation::Relu2),
];

/// ggml's names of the seven linears of block `l`, in [`LinearKind::ALL`] order.
fn linear_names(l: usize) -> [String; 7] {
    LinearKind::ALL.map(|k| format!("blk.{l}.{}", k.ggml_name()))
}

/// The `general.architecture` bitsvf writes for a model: `bitnet` for SiLU, `bitnet-b1.58`
/// for ReLU² (the names llama.cpp and bitnet.cpp give them).
pub fn gguf_architecture(cfg: &crate::engine::config::ModelConfig) -> &'static str {
    match cfg.hidden_act {
        Activation::Silu => "bitnet",
        Activation::Relu2 => "bitnet-b1.58",
    }
}

/// Load the GGUF file at `path`.
pub fn load_gguf(path: &Path) -> Result<Checkpoint> {
    let g = Gguf::open(path)?;
    let arch = g
        .get("general.architecture")
        .and_then(|v| v.as_str())
        .ok_or_else(|| Error::config(path, "general.architecture", "missing or not a string"))?
        .to_string();
    let Some(&(_, act)) = ARCHITECTURES.iter().find(|(a, _)| *a == arch) else {
        return Err(Error::UnknownFormat {
            path: path.to_path_buf(),
            msg: format!(
                "GGUF architecture `{arch}`; bitsvf reads {}",
                ARCHITECTURES.map(|(a, _)| a).join(", ")
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
        head_dim: None,
        hidden_act: act,
        max_position_embeddings: int("context_length", Some(2048))?,
        rms_norm_eps: float("attention.layer_norm_rms_epsilon", 1e-5)?,
        rope_theta: float("rope.freq_base", 10000.0)?,
        tie_word_embeddings: !g.tensors.iter().any(|t| t.name == "output.weight"),
        bos_token_id: token("bos_token_id"),
        eos_token_id: token("eos_token_id"),
        sub_norms: Some(true),
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
        for (name, (rows, cols)) in linear_names(l).into_iter().zip(shapes) {
            linears.push(Linear {
                matrix: Arc::new(read_ternary(&g, &name, rows, cols)?),
                bias: None,
            });
        }
        layers.push(Layer {
            input_layernorm: read_vector(&g, &format!("blk.{l}.attn_norm.weight"), d)?,
            post_attention_layernorm: read_vector(&g, &format!("blk.{l}.ffn_norm.weight"), d)?,
            attn_sub_norm: Some(read_vector(
                &g,
                &format!("blk.{l}.attn_sub_norm.weight"),
                q_width,
            )?),
            ffn_sub_norm: Some(read_vector(
                &g,
                &format!("blk.{l}.ffn_sub_norm.weight"),
                ff,
            )?),
            linears,
        });
    }
    let per_row = layers
        .iter()
        .flat_map(|l| &l.linears)
        .any(|l| l.matrix.scales.len() > 1);
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
        other => Err(bad(format!(
            "type {} for embeddings or the head; bitsvf reads F32, F16, BF16 and Q8_0",
            other.name()
        ))),
    }
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
        other => {
            return Err(bad(format!(
                "type {}; bitsvf reads ternary linears as TQ1_0, TQ2_0 or I2_S (float linears \
                 are not supported yet)",
                other.name()
            )))
        }
    }
    .map_err(bad)?;
    let scale_name = format!("{prefix}.scale");
    if let Some(s) = g.tensors.iter().find(|t| t.name == scale_name) {
        let s = floats(g, s)?;
        if s.len() != 1 {
            return Err(g.tensor_error(&scale_name, format!("{} values; expected 1", s.len())));
        }
        m.scales.iter_mut().for_each(|x| *x *= s[0]);
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

/// The ggml types [`save_gguf`] writes ternary linears as.
pub const TERNARY_GGUF_TYPES: [GgmlType; 3] = [GgmlType::Tq2_0, GgmlType::Tq1_0, GgmlType::I2S];

/// Write `ck` as a GGUF file with ternary linears as `ty` (TQ1_0, TQ2_0 or I2_S): architecture `bitnet` for a
/// SiLU model and `bitnet-b1.58` for a ReLU² one (the names llama.cpp and bitnet.cpp give
/// them), the embeddings and head in their stored dtype (Q8_0 as Q8_0), norms as F32. A
/// per-tensor γ is carried exactly: in TQ1_0 / TQ2_0 every block's scale is 1 and γ goes into
/// llama.cpp's optional `.scale` tensor, in I2_S it is the tensor's own f32 scale; per-row
/// scales become the blocks' f16 scales (rounded to f16), and I2_S refuses them. TQ1_0 / TQ2_0
/// need every linear's input width to be a multiple of 256, I2_S every matrix's size a
/// multiple of 128. The tokenizer goes in too where the source has one llama.cpp can read (a
/// GGUF file's own, or a byte-level BPE tokenizer.json beside the model, with its chat
/// template); the returned line says what was written.
pub fn save_gguf(ck: &Checkpoint, path: &Path, ty: GgmlType) -> Result<String> {
    let blocks = match ty {
        GgmlType::Tq1_0 => Some(TernaryBlocks::Tq1_0),
        GgmlType::Tq2_0 => Some(TernaryBlocks::Tq2_0),
        GgmlType::I2S => None,
        other => {
            return Err(Error::Input(format!(
                "{} is not a ternary GGUF type; bitsvf writes TQ1_0, TQ2_0 and I2_S",
                other.name()
            )))
        }
    };
    use super::gguf::GgufWriter;
    let cfg = &ck.config;
    let arch = gguf_architecture(cfg);
    let mut w = GgufWriter::new(arch);
    let key = |k: &str| format!("{arch}.{k}");
    let u32_of = |v: usize| MetaValue::U32(v as u32);
    w.meta(
        "general.name",
        MetaValue::Str(format!("bitsvf {}", ck.source.display())),
    );
    w.meta(&key("block_count"), u32_of(cfg.num_hidden_layers));
    w.meta(&key("context_length"), u32_of(cfg.max_position_embeddings));
    w.meta(&key("embedding_length"), u32_of(cfg.hidden_size));
    w.meta(&key("feed_forward_length"), u32_of(cfg.intermediate_size));
    w.meta(
        &key("attention.head_count"),
        u32_of(cfg.num_attention_heads),
    );
    w.meta(&key("attention.head_count_kv"), u32_of(cfg.kv_heads()));
    w.meta(&key("rope.dimension_count"), u32_of(cfg.head_dim()));
    w.meta(
        &key("rope.freq_base"),
        MetaValue::F32(cfg.rope_theta as f32),
    );
    let eps = MetaValue::F32(cfg.rms_norm_eps as f32);
    w.meta(&key("attention.layer_norm_rms_epsilon"), eps);
    for (k, id) in [
        ("bos_token_id", cfg.bos_token_id),
        ("eos_token_id", cfg.eos_token_id),
    ] {
        if let Some(id) = id {
            w.meta(&format!("tokenizer.ggml.{k}"), MetaValue::U32(id));
        }
    }
    let tokenizer = tokenizer_metadata(ck)?;
    for (k, v) in &tokenizer.0 {
        w.meta(k, v.clone());
    }
    // Tables and linears are encoded one at a time as the file is written.
    fn table<'a>(w: &mut GgufWriter<'a>, name: &str, m: &'a FloatMatrix) -> Result<()> {
        let dims = vec![m.cols as u64, m.rows as u64];
        let gt = match (m.dtype(), m.half_bits()) {
            (StoredDtype::Q8_0, _) => GgmlType::Q8_0,
            (StoredDtype::F16, Some(_)) => GgmlType::F16,
            (StoredDtype::Bf16, Some(_)) => GgmlType::Bf16,
            _ => GgmlType::F32,
        };
        w.tensor_with(name, gt, dims, move || match (gt, m.half_bits()) {
            (GgmlType::Q8_0, _) => m.to_q8_0_blocks(),
            (GgmlType::F16 | GgmlType::Bf16, Some((_, bits))) => {
                Ok(bits.iter().flat_map(|b| b.to_le_bytes()).collect())
            }
            _ => Ok(m.to_f32_le_bytes()),
        })
    }
    let vector = |w: &mut GgufWriter<'_>, name: &str, v: &[f32]| {
        let bytes = v.iter().flat_map(|x| x.to_le_bytes()).collect();
        w.tensor(name, GgmlType::F32, vec![v.len() as u64], bytes)
    };
    table(&mut w, "token_embd.weight", &ck.embed_tokens)?;
    vector(&mut w, "output_norm.weight", &ck.norm)?;
    if let Some(h) = &ck.lm_head {
        table(&mut w, "output.weight", h)?;
    }
    for (l, layer) in ck.layers.iter().enumerate() {
        vector(
            &mut w,
            &format!("blk.{l}.attn_norm.weight"),
            &layer.input_layernorm,
        )?;
        vector(
            &mut w,
            &format!("blk.{l}.ffn_norm.weight"),
            &layer.post_attention_layernorm,
        )?;
        let subs = [
            ("attn_sub_norm", &layer.attn_sub_norm),
            ("ffn_sub_norm", &layer.ffn_sub_norm),
        ];
        for (n, v) in subs {
            let v = v.as_ref().ok_or_else(|| {
                Error::Input(format!(
                    "layer {l} has no {n}; GGUF BitNet architectures need the sub-norms"
                ))
            })?;
            vector(&mut w, &format!("blk.{l}.{n}.weight"), v)?;
        }
        for (prefix, (kind, lin)) in linear_names(l)
            .iter()
            .zip(LinearKind::ALL.iter().zip(&layer.linears))
        {
            let m = &lin.matrix;
            if lin.bias.is_some() {
                return Err(Error::Input(format!(
                    "{prefix} ({kind:?}) has a bias, which GGUF BitNet architectures lack"
                )));
            }
            let per_tensor = m.scales.len() == 1;
            // Checked now, encoded when written.
            match blocks {
                Some(b) => m.check_ggml(b),
                None => m.check_i2_s(),
            }
            .map_err(|e| Error::Input(format!("{prefix}: {e}")))?;
            let (mat, name) = (Arc::clone(m), prefix.clone());
            let dims = vec![m.cols as u64, m.rows as u64];
            w.tensor_with(&format!("{prefix}.weight"), ty, dims, move || {
                match blocks {
                    // Unit block scales and γ in `.scale`: exact.
                    Some(b) if per_tensor => TernaryMatrix {
                        scales: vec![1.0],
                        ..(*mat).clone()
                    }
                    .to_ggml(b),
                    Some(b) => mat.to_ggml(b),
                    None => mat.to_i2_s(),
                }
                .map_err(|e| Error::Input(format!("{name}: {e}")))
            })?;
            if per_tensor && blocks.is_some() {
                vector(&mut w, &format!("{prefix}.scale"), &m.scales)?;
            }
        }
    }
    w.write(path)?;
    Ok(tokenizer.1)
}

/// The `tokenizer.*` metadata of `ck`'s source for a GGUF file, and a line saying what it is.
fn tokenizer_metadata(ck: &Checkpoint) -> Result<(Vec<(String, MetaValue)>, String)> {
    use crate::engine::tokenizer::{file_for_model, gguf::metadata_for};
    if Gguf::sniff(&ck.source) {
        let g = Gguf::open(&ck.source)?;
        let keys: Vec<_> = (g.metadata.iter())
            .filter(|(k, _)| k.starts_with("tokenizer."))
            .cloned()
            .collect();
        let note = match keys.iter().any(|(k, _)| k == "tokenizer.ggml.model") {
            true => "tokenizer: the source GGUF's".to_string(),
            false => "no tokenizer written: the source GGUF has none".to_string(),
        };
        return Ok((keys, note));
    }
    let Some(tj) = file_for_model(&ck.source) else {
        return Ok((
            vec![],
            "no tokenizer written: the model has no tokenizer.json".into(),
        ));
    };
    let mut meta = match metadata_for(&tj, ck.config.vocab_size) {
        Ok(m) => m,
        Err(e) => return Ok((vec![], format!("no tokenizer written: {e}"))),
    };
    let mut note = format!("tokenizer: {}", tj.display());
    if let Some((text, origin)) = crate::engine::chat::model_template(&ck.source)? {
        meta.push(("tokenizer.chat_template".into(), MetaValue::Str(text)));
        note += &format!(", chat template: {origin}");
    }
    Ok((meta, note))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::model::{test_arch, Model, ModelOptions};

    /// A model written as GGUF (TQ1_0, TQ2_0 and I2_S) reads back with the same weights and the
    /// same logits, to the bit; per-row scales round to f16.
    #[test]
    fn gguf_round_trips_a_checkpoint() {
        let mut cfg = test_arch(256, 512, 2, (4, 2), 64);
        cfg.vocab_size = 300;
        let ck = Checkpoint::random(cfg, 9);
        let dir = tempfile::tempdir().unwrap();
        let ids = vec![vec![1u32, 7, 299, 42, 5]];
        let logits = |ck: &Checkpoint| {
            let m = Model::new(ck, ModelOptions::default()).unwrap();
            let l = m.forward(&m.ids_tensor(&ids).unwrap(), None).unwrap();
            l.flatten_all().unwrap().to_vec1::<f32>().unwrap()
        };
        let want = logits(&ck);
        for ty in TERNARY_GGUF_TYPES {
            let path = dir.path().join(format!("m-{}.gguf", ty.name()));
            save_gguf(&ck, &path, ty).unwrap();
            let back = super::super::load(&path).unwrap();
            assert_eq!(back.format.name(), "gguf (bitnet-b1.58)");
            assert_eq!(back.config.num_hidden_layers, 2);
            assert_eq!(back.content_hash(), ck.content_hash(), "{}", ty.name());
            assert_eq!(logits(&back), want, "{}", ty.name());
        }
        // Per-row scales: each block carries its row's scale as f16.
        let mut per_row = ck.clone();
        let lin = &mut per_row.layers[0].linears[0];
        let rows = lin.matrix.rows;
        let mut m = (*lin.matrix).clone();
        m.scales = (0..rows).map(|r| 0.5 + r as f32 / 64.0).collect();
        lin.matrix = Arc::new(m);
        let path = dir.path().join("per-row.gguf");
        save_gguf(&per_row, &path, GgmlType::Tq2_0).unwrap();
        let back = super::super::load(&path).unwrap();
        assert_eq!(
            back.layers[0].linears[0].matrix.scales,
            per_row.layers[0].linears[0].matrix.scales
        );
        // I2_S has one scale per tensor.
        let path = dir.path().join("per-row-i2s.gguf");
        let err = save_gguf(&per_row, &path, GgmlType::I2S)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("blk.0.attn_q") && err.contains("per row"),
            "{err}"
        );
        assert!(!path.exists());
        let err = save_gguf(&ck, &path, GgmlType::Q8_0)
            .unwrap_err()
            .to_string();
        assert!(err.contains("Q8_0"), "{err}");
    }

    /// A model with a byte-level BPE tokenizer.json beside it is written with its tokenizer and
    /// chat template, which read back to the same ids.
    #[test]
    fn gguf_carries_the_tokenizer_beside_the_model() {
        let fx = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/gguf-tokenizer");
        let dir = tempfile::tempdir().unwrap();
        std::fs::copy(
            fx.join("gpt2.tokenizer.json"),
            dir.path().join("tokenizer.json"),
        )
        .unwrap();
        let template = "{{ bos_token }}{{ messages[0]['content'] }}";
        let config = serde_json::json!({ "chat_template": template });
        std::fs::write(dir.path().join("tokenizer_config.json"), config.to_string()).unwrap();
        let mut cfg = test_arch(256, 512, 1, (4, 2), 64);
        cfg.vocab_size = 430;
        let mut ck = Checkpoint::random(cfg, 3);
        ck.source = dir.path().join("model.safetensors");
        let path = dir.path().join("m.gguf");
        let note = save_gguf(&ck, &path, GgmlType::I2S).unwrap();
        assert!(
            note.contains("tokenizer.json") && note.contains("chat template"),
            "{note}"
        );
        let g = Gguf::open(&path).unwrap();
        assert_eq!(
            g.get("tokenizer.chat_template").and_then(MetaValue::as_str),
            Some(template)
        );
        let t = crate::engine::tokenizer::gguf::tokenizer(&g)
            .unwrap()
            .unwrap();
        let expected: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(fx.join("expected.json")).unwrap())
                .unwrap();
        for case in expected["gpt2"].as_array().unwrap() {
            let want: Vec<u32> = serde_json::from_value(case["ids"].clone()).unwrap();
            let text = case["text"].as_str().unwrap();
            assert_eq!(t.encode(text, false).unwrap().get_ids(), want, "{text:?}");
        }
        // Converted again from the GGUF: the same tokenizer keys.
        let back = super::super::load(&path).unwrap();
        let again = dir.path().join("again.gguf");
        let note = save_gguf(&back, &again, GgmlType::Tq2_0).unwrap();
        assert!(note.contains("source GGUF"), "{note}");
        let h = Gguf::open(&again).unwrap();
        for (k, v) in g
            .metadata
            .iter()
            .filter(|(k, _)| k.starts_with("tokenizer."))
        {
            assert_eq!(h.get(k), Some(v), "{k}");
        }
        // No tokenizer: said so.
        ck.source = dir.path().join("elsewhere/model.safetensors");
        let note = save_gguf(&ck, &dir.path().join("bare.gguf"), GgmlType::I2S).unwrap();
        assert!(note.contains("no tokenizer"), "{note}");
    }

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
}
