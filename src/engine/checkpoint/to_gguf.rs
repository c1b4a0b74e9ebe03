//! Checkpoints written as GGUF files that llama.cpp and bitnet.cpp read: ternary linears as
//! TQ1_0, TQ2_0 or I2_S, or every linear as F16; the tokenizer and chat template where the
//! source has them.

use super::gguf::{GgmlType, Gguf, MetaValue};
use super::{Checkpoint, FloatMatrix, LinearKind, LinearMatrix, StoredDtype};
use crate::engine::config::Activation;
use crate::engine::ternary::ggml::TernaryBlocks;
use crate::engine::ternary::TernaryMatrix;
use crate::error::{Error, Result};
use std::path::Path;
use std::sync::Arc;

/// ggml's names of the seven linears of block `l`, in [`LinearKind::ALL`] order.
fn linear_names(l: usize) -> [String; 7] {
    LinearKind::ALL.map(|k| format!("blk.{l}.{}", k.ggml_name()))
}

/// The `general.architecture` bitsvf writes for a model: `llama` for a float model without
/// sub-norms (SiLU), else `bitnet` for SiLU and `bitnet-b1.58` for ReLU² (the names llama.cpp
/// and bitnet.cpp give them).
pub fn gguf_architecture(ck: &Checkpoint) -> &'static str {
    let cfg = &ck.config;
    match cfg.hidden_act {
        Activation::Silu if cfg.sub_norms != Some(true) && !ck.is_ternary() => "llama",
        Activation::Silu => "bitnet",
        Activation::Relu2 => "bitnet-b1.58",
    }
}

/// The ggml types [`save_gguf`] writes ternary linears as.
pub const TERNARY_GGUF_TYPES: [GgmlType; 3] = [GgmlType::Tq2_0, GgmlType::Tq1_0, GgmlType::I2S];

/// Every type [`save_gguf`] writes the linears as: the ternary ones and F16.
pub const GGUF_LINEAR_TYPES: [GgmlType; 4] = [
    GgmlType::Tq2_0,
    GgmlType::Tq1_0,
    GgmlType::I2S,
    GgmlType::F16,
];

/// Write `ck` as a GGUF file with the linears as `ty` (TQ1_0, TQ2_0, I2_S or F16), architecture
/// as [`gguf_architecture`], the embeddings and head in their stored dtype (Q8_0 as Q8_0),
/// norms as F32. A per-tensor γ is carried exactly: in TQ1_0 / TQ2_0 and F16 the codes are
/// ±1/0 and γ goes into llama.cpp's optional `.scale` tensor, in I2_S it is the tensor's own
/// f32 scale; per-row scales become the blocks' f16 scales (F16: the values γ_r·W_t rounded to
/// f16), and I2_S refuses them. Float linears are written only as F16 (rounded); a `llama`
/// model's query and key rows are permuted as llama.cpp's converter does. TQ1_0 / TQ2_0 need
/// every linear's input width to be a multiple of 256, I2_S every matrix's size a multiple of
/// 128. The tokenizer goes in too where the source has one llama.cpp can read (a
/// GGUF file's own, or a byte-level BPE tokenizer.json beside the model, with its chat
/// template); the returned line says what was written.
pub fn save_gguf(ck: &Checkpoint, path: &Path, ty: GgmlType) -> Result<String> {
    if !GGUF_LINEAR_TYPES.contains(&ty) {
        return Err(Error::Input(format!(
            "bitsvf writes linears as TQ2_0, TQ1_0, I2_S or F16, not {}",
            ty.name()
        )));
    }
    use super::gguf::GgufWriter;
    let cfg = &ck.config;
    let arch = gguf_architecture(ck);
    let llama = arch == "llama";
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
        for (n, v) in subs.into_iter().filter(|_| !llama) {
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
            if lin.bias.is_some() {
                return Err(Error::Input(format!(
                    "{prefix} ({kind:?}) has a bias, which bitsvf's GGUF architectures lack"
                )));
            }
            let heads = match kind {
                LinearKind::Q if llama => Some(cfg.num_attention_heads),
                LinearKind::K if llama => Some(cfg.kv_heads()),
                _ => None,
            };
            let scale = linear(&mut w, prefix, &lin.matrix, ty, heads)?;
            if let Some(g) = scale {
                vector(&mut w, &format!("{prefix}.scale"), &[g])?;
            }
        }
    }
    w.write(path)?;
    Ok(tokenizer.1)
}

/// Queue linear `prefix` as `ty` (checked now, encoded when written); the per-tensor scale to
/// write beside it as `.scale`, if any. `heads`: permute the rows as llama.cpp stores a llama
/// model's query and key.
fn linear<'a>(
    w: &mut super::gguf::GgufWriter<'a>,
    prefix: &str,
    m: &'a LinearMatrix,
    ty: GgmlType,
    heads: Option<usize>,
) -> Result<Option<f32>> {
    let dims = vec![m.cols() as u64, m.rows() as u64];
    let name = format!("{prefix}.weight");
    // File row i holds model row `order[i]`.
    let order = heads.map(|h| super::from_gguf::llama_file_row_order(m.rows(), h));
    let t = match (m, ty) {
        (LinearMatrix::Ternary(t), _) => Arc::clone(t),
        (LinearMatrix::Float(f), GgmlType::F16) => {
            let f = match &order {
                Some(o) => f.permute_rows(o),
                None => f.clone(),
            };
            w.tensor_with(&name, ty, dims, move || Ok(f16_bytes(&f.to_f32())))?;
            return Ok(None);
        }
        (LinearMatrix::Float(f), _) => {
            return Err(Error::Input(format!(
                "{prefix} is a float ({}) linear; {} holds ternary ones — write --type f16, or \
                 ternarize the model first (--ternarize)",
                f.dtype().name(),
                ty.name()
            )))
        }
    };
    let t = match &order {
        Some(o) => {
            let (values, c) = (t.values(), t.cols);
            let v: Vec<i8> = (o.iter())
                .flat_map(|&r| values[r * c..(r + 1) * c].to_vec())
                .collect();
            let scales = match t.scales.len() {
                1 => t.scales.clone(),
                _ => o.iter().map(|&r| t.scales[r]).collect(),
            };
            Arc::new(TernaryMatrix::from_values(&v, t.rows, c, scales))
        }
        None => t,
    };
    let per_tensor = t.scales.len() == 1;
    let gamma = t.scales[0];
    let unit = move |t: &TernaryMatrix| TernaryMatrix {
        scales: vec![1.0],
        ..t.clone()
    };
    match ty {
        GgmlType::F16 => {
            // ±1/0 and γ beside it (exact), or γ_r·W_t rounded to f16.
            w.tensor_with(&name, ty, dims, move || {
                let values = match per_tensor {
                    true => unit(&t).dequantize(),
                    false => t.dequantize(),
                };
                Ok(f16_bytes(&values))
            })?;
        }
        GgmlType::I2S => {
            t.check_i2_s()
                .map_err(|e| Error::Input(format!("{prefix}: {e}")))?;
            w.tensor_with(&name.clone(), ty, dims, move || {
                t.to_i2_s()
                    .map_err(|e| Error::Input(format!("{name}: {e}")))
            })?;
            return Ok(None);
        }
        _ => {
            let b = match ty {
                GgmlType::Tq1_0 => TernaryBlocks::Tq1_0,
                _ => TernaryBlocks::Tq2_0,
            };
            t.check_ggml(b)
                .map_err(|e| Error::Input(format!("{prefix}: {e}")))?;
            w.tensor_with(&name.clone(), ty, dims, move || {
                // Unit block scales and γ in `.scale`: exact.
                match per_tensor {
                    true => unit(&t).to_ggml(b),
                    false => t.to_ggml(b),
                }
                .map_err(|e| Error::Input(format!("{name}: {e}")))
            })?;
        }
    }
    Ok(per_tensor.then_some(gamma))
}

/// f32 values as little-endian IEEE halves.
fn f16_bytes(values: &[f32]) -> Vec<u8> {
    (values.iter())
        .flat_map(|&x| half::f16::from_f32(x).to_le_bytes())
        .collect()
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
    // bitsvf starts every prompt with BOS when the model has one; llama.cpp's front ends do
    // when the file says so.
    let bos = ck.config.bos_token_id.is_some();
    meta.push(("tokenizer.ggml.add_bos_token".into(), MetaValue::Bool(bos)));
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
        let rows = lin.matrix.rows();
        let mut m = (**lin.matrix.ternary().unwrap()).clone();
        m.scales = (0..rows).map(|r| 0.5 + r as f32 / 64.0).collect();
        lin.matrix = m.into();
        let path = dir.path().join("per-row.gguf");
        save_gguf(&per_row, &path, GgmlType::Tq2_0).unwrap();
        let back = super::super::load(&path).unwrap();
        assert_eq!(
            back.layers[0].linears[0].matrix.ternary().unwrap().scales,
            per_row.layers[0].linears[0]
                .matrix
                .ternary()
                .unwrap()
                .scales
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

    /// F16: a ternary model's codes and `.scale` read back as the same ternary model; a float
    /// Llama-style model is written as `llama` (query and key rows permuted as llama.cpp's
    /// converter does) and reads back as its f16-rounded self; a float linear refuses the
    /// ternary types, naming the tensor.
    #[test]
    fn f16_gguf_round_trips_ternary_and_float_models() {
        let mut cfg = test_arch(64, 128, 2, (4, 2), 48);
        cfg.vocab_size = 50;
        cfg.hidden_act = Activation::Silu;
        cfg.sub_norms = None;
        let ids = vec![vec![1u32, 7, 49, 42, 5]];
        let logits = |ck: &Checkpoint| {
            let m = Model::new(ck, ModelOptions::default()).unwrap();
            let l = m.forward(&m.ids_tensor(&ids).unwrap(), None).unwrap();
            l.flatten_all().unwrap().to_vec1::<f32>().unwrap()
        };
        let dir = tempfile::tempdir().unwrap();
        let ternary = Checkpoint::random(cfg.clone(), 4);
        let path = dir.path().join("t.gguf");
        save_gguf(&ternary, &path, GgmlType::F16).unwrap();
        let back = super::super::load(&path).unwrap();
        assert_eq!(back.format.name(), "gguf (bitnet)");
        assert!(back.is_ternary());
        assert_eq!(back.content_hash(), ternary.content_hash());
        assert_eq!(logits(&back), logits(&ternary));

        let float = Checkpoint::random_float(cfg, 5);
        assert!(!float.is_ternary());
        let path = dir.path().join("f.gguf");
        save_gguf(&float, &path, GgmlType::F16).unwrap();
        let g = Gguf::open(&path).unwrap();
        assert_eq!(
            g.get("general.architecture").and_then(MetaValue::as_str),
            Some("llama")
        );
        let back = super::super::load(&path).unwrap();
        assert_eq!(back.linear_dtypes(), "f16");
        let mut rounded = float.clone();
        for (layer, theirs) in rounded.layers.iter_mut().zip(&back.layers) {
            for (lin, t) in layer.linears.iter_mut().zip(&theirs.linears) {
                let w: Vec<f32> = (lin.matrix.dequantize().iter())
                    .map(|&x| half::f16::from_f32(x).to_f32())
                    .collect();
                assert_eq!(w, t.matrix.dequantize());
                let (rows, cols) = (lin.matrix.rows(), lin.matrix.cols());
                lin.matrix = LinearMatrix::Float(FloatMatrix::from_f32(w, rows, cols));
            }
        }
        assert_eq!(logits(&back), logits(&rounded));
        // In the file, the query rows are llama.cpp's interleaved order.
        let q = g.tensor("blk.0.attn_q.weight").unwrap();
        let file: Vec<f32> = (g.data(q).unwrap().chunks(2))
            .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect();
        let model = rounded.layers[0].linears[0].matrix.dequantize();
        let (hd, cols) = (16, 64);
        // File row 1 (head 0, pair 0, second of the pair) is model row hd/2.
        assert_eq!(
            file[cols..2 * cols],
            model[hd / 2 * cols..(hd / 2 + 1) * cols]
        );
        let err = save_gguf(&float, &dir.path().join("x.gguf"), GgmlType::Tq2_0)
            .unwrap_err()
            .to_string();
        assert!(err.contains("blk.0.attn_q") && err.contains("f16"), "{err}");
        assert!(!dir.path().join("x.gguf").exists());
    }
}
