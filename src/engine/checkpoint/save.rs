//! Writers for the native and dequantized (Hugging Face) formats.

use super::formats::{NATIVE_FORMAT, NATIVE_VERSION};
use super::st::{
    write_atomic, write_safetensors, write_safetensors_streamed, OwnedTensor, Streamed,
};
use super::{linear_name, Checkpoint, LinearKind, LinearMatrix};
use crate::engine::ternary::native_row_bytes;
use crate::error::{Error, Result};
use safetensors::tensor::Dtype;
use serde_json::Value;
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

/// The float tensors every output format shares, under HF names: the norms, and with
/// `tables` the embeddings and an untied head (as f32).
fn float_tensors(ck: &Checkpoint, tables: bool) -> BTreeMap<String, OwnedTensor> {
    let (v, d) = (ck.config.vocab_size, ck.config.hidden_size);
    let mut t = BTreeMap::new();
    if tables {
        t.insert(
            "model.embed_tokens.weight".into(),
            OwnedTensor::raw(Dtype::F32, vec![v, d], ck.embed_tokens.to_f32_le_bytes()),
        );
    }
    t.insert(
        "model.norm.weight".into(),
        OwnedTensor::f32(vec![d], &ck.norm),
    );
    if let (Some(h), true) = (&ck.lm_head, tables) {
        t.insert(
            "lm_head.weight".into(),
            OwnedTensor::raw(Dtype::F32, vec![v, d], h.to_f32_le_bytes()),
        );
    }
    for (l, layer) in ck.layers.iter().enumerate() {
        let p = format!("model.layers.{l}");
        let mut put = |name: String, w: &[f32]| {
            t.insert(name, OwnedTensor::f32(vec![w.len()], w));
        };
        put(
            format!("{p}.input_layernorm.weight"),
            &layer.input_layernorm,
        );
        put(
            format!("{p}.post_attention_layernorm.weight"),
            &layer.post_attention_layernorm,
        );
        if let Some(w) = &layer.attn_sub_norm {
            put(format!("{p}.self_attn.attn_sub_norm.weight"), w);
        }
        if let Some(w) = &layer.ffn_sub_norm {
            put(format!("{p}.mlp.ffn_sub_norm.weight"), w);
        }
        for kind in LinearKind::ALL {
            if let Some(b) = &layer.linear(kind).bias {
                put(format!("{}.bias", linear_name(l, kind)), b);
            }
        }
    }
    t
}

/// Write the native format to `path` (one safetensors file), atomically.
pub fn save_native(ck: &Checkpoint, path: &Path) -> Result<()> {
    let mut t = float_tensors(ck, true);
    for (name, _, lin) in ck.linears() {
        let m = match &lin.matrix {
            LinearMatrix::Ternary(m) => m,
            LinearMatrix::Float(f) => {
                // A float linear as stored (Q8_0 widened to f32).
                let (dtype, bytes) = f.to_safetensors_bytes();
                let w = OwnedTensor::raw(dtype, vec![f.rows, f.cols], bytes);
                t.insert(format!("{name}.weight"), w);
                continue;
            }
        };
        t.insert(
            format!("{name}.weight"),
            OwnedTensor::u8(vec![m.rows, native_row_bytes(m.cols)], m.packed.to_vec()),
        );
        t.insert(
            format!("{name}.weight_scale"),
            OwnedTensor::f32(vec![m.scales.len()], &m.scales),
        );
    }
    let meta = HashMap::from([
        ("format".to_string(), NATIVE_FORMAT.to_string()),
        ("bitsvf_version".to_string(), NATIVE_VERSION.to_string()),
        (
            "config".to_string(),
            serde_json::to_string(&ck.config).expect("config serializes"),
        ),
        (
            "quantization".to_string(),
            serde_json::to_string(&ck.quantization).expect("quantization serializes"),
        ),
    ]);
    write_safetensors(path, &t, Some(meta))
}

/// Write the dequantized f32 model (W = γ·W_t) as `dir/model.safetensors` + `dir/config.json`.
/// The directory is assembled under a temporary name and renamed into place; an existing
/// non-empty `dir` is an error unless `overwrite`.
pub fn save_dequantized(ck: &Checkpoint, dir: &Path, overwrite: bool) -> Result<()> {
    if let Ok(m) = std::fs::symlink_metadata(dir) {
        if !m.is_dir() {
            return Err(Error::Input(format!(
                "{} exists and is not a directory; choose a new directory",
                dir.display()
            )));
        }
    }
    let exists_nonempty = dir.is_dir()
        && std::fs::read_dir(dir)
            .map_err(|e| Error::io(dir, e))?
            .next()
            .is_some();
    if exists_nonempty && !overwrite {
        return Err(Error::Input(format!(
            "{} already exists and is not empty; choose a new directory or pass --force",
            dir.display()
        )));
    }
    // --force replaces only a directory this command wrote: never a user's other files.
    let ours = || -> Option<()> {
        let text = std::fs::read_to_string(dir.join("config.json")).ok()?;
        let v: Value = serde_json::from_str(&text).ok()?;
        v.get("bitsvf")?.get("dequantized_from")?;
        let names = std::fs::read_dir(dir).ok()?;
        for e in names {
            let name = e.ok()?.file_name();
            (name == "config.json" || name == "model.safetensors").then_some(())?;
        }
        Some(())
    };
    if exists_nonempty && ours().is_none() {
        return Err(Error::Input(format!(
            "{} holds files bitsvf did not write (only model.safetensors and a config.json \
             with bitsvf.dequantized_from are replaced by --force); choose a new directory",
            dir.display()
        )));
    }
    let tmp = super::st::temp_sibling(dir);
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
    }
    std::fs::create_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
    // Streamed a matrix at a time: the f32 form of a 2B model (9.6 GB) need not fit in memory.
    let f32_bytes = |v: &[f32]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
    let (v, d) = (ck.config.vocab_size, ck.config.hidden_size);
    let mut tensors = vec![Streamed {
        name: "model.embed_tokens.weight".into(),
        dtype: Dtype::F32,
        shape: vec![v, d],
        bytes: Box::new(|| ck.embed_tokens.to_f32_le_bytes()),
    }];
    if let Some(h) = &ck.lm_head {
        tensors.push(Streamed {
            name: "lm_head.weight".into(),
            dtype: Dtype::F32,
            shape: vec![v, d],
            bytes: Box::new(move || h.to_f32_le_bytes()),
        });
    }
    for (name, t) in float_tensors(ck, false) {
        let shape = t.shape().to_vec();
        tensors.push(Streamed {
            name,
            dtype: Dtype::F32,
            shape,
            bytes: Box::new(move || t.bytes().to_vec()),
        });
    }
    for (name, _, lin) in ck.linears() {
        let m = &lin.matrix;
        tensors.push(Streamed {
            name: format!("{name}.weight"),
            dtype: Dtype::F32,
            shape: vec![m.rows(), m.cols()],
            bytes: Box::new(move || f32_bytes(&m.dequantize())),
        });
    }
    let meta = BTreeMap::from([("format".to_string(), "pt".to_string())]);
    write_safetensors_streamed(&tmp.join("model.safetensors"), tensors, Some(meta))?;
    let mut cfg = serde_json::to_value(&ck.config).expect("config serializes");
    // transformers reads `head_dim` as given (a null breaks its attention): always a number.
    cfg["head_dim"] = serde_json::json!(ck.config.head_dim());
    cfg["torch_dtype"] = serde_json::json!("float32");
    if ck.is_ternary() {
        cfg["architectures"] = serde_json::json!(["BitNetForCausalLM"]);
        cfg["model_type"] = serde_json::json!("bitnet");
        cfg["bitsvf"] = serde_json::json!({
            "dequantized_from": ck.format.name(),
            "base_content_hash": ck.content_hash(),
            "quantization": ck.quantization,
            "head_dim": ck.config.head_dim,
        });
    } else {
        // A float model is written as transformers' Llama where it is one (no sub-norms,
        // SiLU); the linears stay float when read back either way.
        let llama = ck.config.sub_norms != Some(true)
            && ck.config.hidden_act == crate::engine::config::Activation::Silu;
        let (arch, ty) = match llama {
            true => ("LlamaForCausalLM", "llama"),
            false => ("BitNetForCausalLM", "bitnet"),
        };
        cfg["architectures"] = serde_json::json!([arch]);
        cfg["model_type"] = serde_json::json!(ty);
        cfg["bitsvf"] = serde_json::json!({
            "dequantized_from": ck.format.name(),
            "base_content_hash": ck.content_hash(),
            "float_linears": true,
            "head_dim": ck.config.head_dim,
        });
    }
    let text = serde_json::to_string_pretty(&cfg).expect("json");
    write_atomic(&tmp.join("config.json"), text.as_bytes())?;
    if dir.exists() {
        std::fs::remove_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    }
    std::fs::rename(&tmp, dir).map_err(|e| Error::io(dir, e))?;
    crate::io::sync_dir(crate::io::parent_of(dir))
}
