//! Readers for every supported layout (the writers are in `save.rs`).

use super::st::{RawTensor, TensorFiles};
use super::{
    linear_name, Checkpoint, FloatMatrix, Layer, Linear, LinearKind, LinearMatrix, SourceFormat,
};
use crate::engine::config::ModelConfig;
use crate::engine::ternary::{
    hf_to_native, native_row_bytes, unpack_native, Quantization, TernaryMatrix,
};
use crate::error::{Error, Result};
use serde_json::Value;
use std::path::{Path, PathBuf};

/// Header metadata key/value marking a bitsvf native file.
pub(super) const NATIVE_FORMAT: &str = "bitsvf";
/// Version of the native layout written by this build.
pub(super) const NATIVE_VERSION: &str = "1";

/// Find the weight files and config of `path` (a directory or a `.safetensors` file).
fn locate(path: &Path) -> Result<(Vec<PathBuf>, PathBuf)> {
    if path.is_file() {
        let dir = path.parent().unwrap_or(Path::new("."));
        return Ok((vec![path.to_path_buf()], dir.join("config.json")));
    }
    if !path.is_dir() {
        return Err(Error::io(
            path,
            std::io::Error::new(std::io::ErrorKind::NotFound, "no such file or directory"),
        ));
    }
    let config = path.join("config.json");
    let single = path.join("model.safetensors");
    if single.is_file() {
        return Ok((vec![single], config));
    }
    let index = path.join("model.safetensors.index.json");
    if index.is_file() {
        let text = std::fs::read_to_string(&index).map_err(|e| Error::io(&index, e))?;
        let v: Value = serde_json::from_str(&text)
            .map_err(|e| Error::config(&index, "(json)", e.to_string()))?;
        let map = v
            .get("weight_map")
            .and_then(Value::as_object)
            .ok_or_else(|| Error::config(&index, "weight_map", "missing or not an object"))?;
        let mut files: Vec<String> = map
            .values()
            .filter_map(|f| f.as_str().map(str::to_string))
            .collect();
        files.sort();
        files.dedup();
        return Ok((files.iter().map(|f| path.join(f)).collect(), config));
    }
    let found: Vec<PathBuf> = std::fs::read_dir(path)
        .map_err(|e| Error::io(path, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
        .collect();
    if found.len() == 1 {
        return Ok((found, config));
    }
    Err(Error::UnknownFormat {
        path: path.to_path_buf(),
        msg: format!(
            "expected model.safetensors, model.safetensors.index.json or a single .safetensors \
             file, found {} .safetensors files",
            found.len()
        ),
    })
}

/// The default model, compiled into the binary: a BitNet b1.58 model trained from scratch
/// by `bitsvf pretrain` (see docs/results.md, "The default model"), in the native format.
static DEFAULT_MODEL: &[u8] = include_bytes!("../../../models/default.safetensors");

/// The name the embedded default model goes by in reports and errors.
pub const DEFAULT_MODEL_NAME: &str = "<default model>";

/// How a model argument is named in reports: its path, or [`DEFAULT_MODEL_NAME`] for the
/// embedded model.
pub fn display_name(model: Option<&Path>) -> String {
    model.map_or_else(
        || DEFAULT_MODEL_NAME.to_string(),
        |p| p.display().to_string(),
    )
}

/// Load the embedded default model.
pub fn load_default() -> Result<Checkpoint> {
    let tf = TensorFiles::from_static(DEFAULT_MODEL_NAME, DEFAULT_MODEL)?;
    let mut ck = load_native(Path::new(DEFAULT_MODEL_NAME), &tf)?;
    ck.bytes_on_disk = DEFAULT_MODEL.len() as u64;
    Ok(ck)
}

/// Load `path`, or the embedded default model when `path` is None.
pub fn load_or_default(path: Option<&Path>) -> Result<Checkpoint> {
    match path {
        Some(p) => load(p),
        None => load_default(),
    }
}

/// Load a model from any supported format, detected from the files.
pub fn load(path: &Path) -> Result<Checkpoint> {
    if path.is_file() && super::gguf::Gguf::sniff(path) {
        return super::from_gguf::load_gguf(path);
    }
    let (files, config_path) = locate(path)?;
    let tf = TensorFiles::open(&files)?;
    if tf.metadata("format") == Some(NATIVE_FORMAT) {
        return load_native(path, &tf);
    }
    if !config_path.is_file() {
        return Err(Error::UnknownFormat {
            path: path.to_path_buf(),
            msg: format!(
                "{} is not a bitsvf native file and there is no {} beside it (HF and Phase 4 \
                 checkpoints need one)",
                tf.path().display(),
                config_path.display()
            ),
        });
    }
    let text = std::fs::read_to_string(&config_path).map_err(|e| Error::io(&config_path, e))?;
    let raw: Value = serde_json::from_str(&text)
        .map_err(|e| Error::config(&config_path, "(json)", e.to_string()))?;
    let config = ModelConfig::from_json(&text, &config_path)?;
    check_quantization_config(&raw, &config_path)?;

    let probe = linear_name(0, LinearKind::Q);
    let quantized = format!("{probe}.quantized_weight");
    let weight = format!("{probe}.weight");
    let mut ckpt = if tf.contains(&quantized) {
        let reader = |name: &str, rows: usize, cols: usize| read_phase4(&tf, name, rows, cols);
        assemble(
            path,
            &tf,
            config,
            SourceFormat::Phase4,
            Quantization::PerChannel { threshold: 0.5 },
            reader,
        )?
    } else if tf.contains(&weight) {
        let w = tf.get(&weight)?;
        let qc = raw.get("quantization_config");
        let mode = qc
            .and_then(|q| q.get("quantization_mode"))
            .and_then(Value::as_str)
            .unwrap_or("offline");
        if w.dtype == safetensors::Dtype::U8 {
            let Some(qc) = qc else {
                return Err(Error::config(
                    &config_path,
                    "quantization_config",
                    format!("missing, but `{weight}` is packed uint8 (HF BitNet layout)"),
                ));
            };
            let linear_class = qc
                .get("linear_class")
                .and_then(Value::as_str)
                .unwrap_or("autobitlinear")
                .to_string();
            let divide = match linear_class.as_str() {
                "autobitlinear" => false,
                "bitlinear" => true,
                other => {
                    return Err(Error::config(
                        &config_path,
                        "quantization_config.linear_class",
                        format!("unknown value `{other}`, expected autobitlinear or bitlinear"),
                    ))
                }
            };
            if mode == "online" {
                return Err(Error::config(
                    &config_path,
                    "quantization_config.quantization_mode",
                    "`online` means float master weights, but the weights are packed uint8",
                ));
            }
            let reader = |name: &str, rows: usize, cols: usize| {
                read_hf_packed(&tf, name, rows, cols, divide)
            };
            assemble(
                path,
                &tf,
                config,
                SourceFormat::HfPacked { linear_class },
                Quantization::PerTensor,
                reader,
            )?
        } else if w.is_float() {
            let bitsvf = raw.get("bitsvf");
            let dequantized = bitsvf
                .and_then(|b| b.get("quantization"))
                .map(|q| {
                    serde_json::from_value::<Quantization>(q.clone()).map_err(|e| {
                        Error::config(&config_path, "bitsvf.quantization", e.to_string())
                    })
                })
                .transpose()?;
            let float_linears = bitsvf
                .and_then(|b| b.get("float_linears"))
                .and_then(Value::as_bool)
                .unwrap_or(!is_bitnet(&raw));
            match dequantized {
                Some(q) => {
                    // `head_dim` is spelled out for transformers; the model's own (often
                    // absent) value is kept beside the quantization, so the model is the same.
                    let mut config = config;
                    if let Some(own) = bitsvf.and_then(|b| b.get("head_dim")) {
                        config.head_dim = own.as_u64().map(|h| h as usize);
                    }
                    let reader = |name: &str, rows: usize, cols: usize| {
                        read_dequantized(&tf, name, rows, cols, q)
                    };
                    assemble(path, &tf, config, SourceFormat::Dequantized, q, reader)?
                }
                None if float_linears => {
                    // A float model (Llama-style): the linears stay float, as stored.
                    let reader = |name: &str, rows: usize, cols: usize| {
                        let wname = format!("{name}.weight");
                        let t = tf.get(&wname)?;
                        Ok(LinearMatrix::Float(FloatMatrix::read(&t, rows, cols)?))
                    };
                    let q = Quantization::PerTensor;
                    assemble(path, &tf, config, SourceFormat::HfFloatModel, q, reader)?
                }
                None => {
                    // BitNet float master weights: ternarized as transformers' online mode does.
                    let reader = |name: &str, rows: usize, cols: usize| {
                        let wname = format!("{name}.weight");
                        let t = tf.get(&wname)?;
                        t.expect_shape(&[rows, cols])?;
                        let w = t.to_f32()?;
                        Ok(TernaryMatrix::quantize(
                            &w,
                            rows,
                            cols,
                            Quantization::PerTensor,
                        ))
                    };
                    let q = Quantization::PerTensor;
                    assemble(path, &tf, config, SourceFormat::HfFloat, q, reader)?
                }
            }
        } else {
            return Err(Error::Dtype {
                path: w.path.to_path_buf(),
                tensor: weight.clone(),
                expected: "U8 (HF packed) or a float type (HF master weights)".into(),
                got: format!("{:?}", w.dtype),
            });
        }
    } else {
        return Err(Error::UnknownFormat {
            path: path.to_path_buf(),
            msg: format!(
                "{} has neither `{weight}` (HF) nor `{quantized}` (Phase 4)",
                tf.path().display()
            ),
        });
    };
    ckpt.bytes_on_disk = tf.bytes()
        + std::fs::metadata(&config_path)
            .map(|m| m.len())
            .unwrap_or(0);
    Ok(ckpt)
}

/// Read the packed HF layout: uint8 `[out/4, in]` + 1-element `weight_scale`.
fn read_hf_packed(
    tf: &TensorFiles,
    name: &str,
    rows: usize,
    cols: usize,
    divide: bool,
) -> Result<TernaryMatrix> {
    let wname = format!("{name}.weight");
    let t = tf.get(&wname)?;
    t.expect_shape(&[rows / 4, cols])?;
    if !rows.is_multiple_of(4) {
        return Err(t.bad(format!("{rows} output rows cannot be packed 4 per byte")));
    }
    let packed = hf_to_native(t.as_u8()?, rows, cols).map_err(|m| t.bad(m))?;
    let sname = format!("{name}.weight_scale");
    let s = tf.get(&sname)?;
    if s.shape.iter().product::<usize>() != 1 {
        return Err(Error::Shape {
            path: s.path.to_path_buf(),
            tensor: sname.clone(),
            expected: vec![1],
            got: s.shape.to_vec(),
        });
    }
    let ws = s.to_f32()?[0];
    let gamma = if divide { 1.0 / ws } else { ws };
    check_scales(&s, &[gamma])?;
    Ok(TernaryMatrix {
        rows,
        cols,
        packed,
        scales: vec![gamma],
    })
}

/// Read Phase 4: int8 `quantized_weight [out, in]` + fp16 `scale_factor [out]`.
fn read_phase4(tf: &TensorFiles, name: &str, rows: usize, cols: usize) -> Result<TernaryMatrix> {
    let wname = format!("{name}.quantized_weight");
    let t = tf.get(&wname)?;
    t.expect_shape(&[rows, cols])?;
    let values = t.as_i8()?;
    if let Some(i) = values.iter().position(|v| !(-1..=1).contains(v)) {
        return Err(t.bad(format!(
            "value {} at row {}, column {} is not ternary (-1, 0 or 1)",
            values[i],
            i / cols,
            i % cols
        )));
    }
    let sname = format!("{name}.scale_factor");
    let s = tf.get(&sname)?;
    s.expect_shape(&[rows])?;
    let scales = s.to_f32()?;
    check_scales(&s, &scales)?;
    Ok(TernaryMatrix::from_values(&values, rows, cols, scales))
}

/// Recover W_t and γ exactly from W = γ·W_t written by `bitsvf dequantize`.
fn read_dequantized(
    tf: &TensorFiles,
    name: &str,
    rows: usize,
    cols: usize,
    q: Quantization,
) -> Result<TernaryMatrix> {
    let wname = format!("{name}.weight");
    let t = tf.get(&wname)?;
    t.expect_shape(&[rows, cols])?;
    let w = t.to_f32()?;
    let per_row = matches!(q, Quantization::PerChannel { .. });
    let groups: Vec<&[f32]> = if per_row {
        w.chunks(cols).collect()
    } else {
        vec![&w[..]]
    };
    let mut scales = Vec::with_capacity(groups.len());
    let mut values = Vec::with_capacity(w.len());
    for (g, chunk) in groups.iter().enumerate() {
        let gamma = chunk.iter().fold(0f32, |m, x| m.max(x.abs()));
        for (i, &x) in chunk.iter().enumerate() {
            let v = if gamma > 0.0 { x / gamma } else { 0.0 };
            let r = v.round();
            if (v - r).abs() > 1e-6 {
                let idx = g * chunk.len() + i;
                return Err(t.bad(format!(
                    "value {x} at row {}, column {} is not ±γ or 0 (γ = {gamma}); the config \
                     marks this model as dequantized by bitsvf, so its weights must be exactly \
                     γ·W_t — remove the `bitsvf` config entry to ternarize it afresh",
                    idx / cols,
                    idx % cols
                )));
            }
            values.push(r as i8);
        }
        scales.push(if gamma > 0.0 {
            gamma
        } else {
            crate::engine::ternary::MIN_SCALE
        });
    }
    Ok(TernaryMatrix::from_values(&values, rows, cols, scales))
}

/// Scales must be finite and positive.
fn check_scales(t: &RawTensor, scales: &[f32]) -> Result<()> {
    if let Some(i) = scales.iter().position(|s| !(s.is_finite() && *s > 0.0)) {
        return Err(t.bad(format!(
            "scale {} at index {i} must be finite and > 0",
            scales[i]
        )));
    }
    Ok(())
}

/// Read a float vector/matrix and check its shape.
fn read_float(tf: &TensorFiles, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
    let t = tf.get(name)?;
    t.expect_shape(shape)?;
    t.to_f32()
}

/// Read an optional tensor (None when absent).
fn read_optional(tf: &TensorFiles, name: &str, shape: &[usize]) -> Result<Option<Vec<f32>>> {
    if tf.contains(name) {
        read_float(tf, name, shape).map(Some)
    } else {
        Ok(None)
    }
}

/// Build a checkpoint from the float tensors every format shares and a per-format reader of the
/// ternary matrices.
fn assemble<M: Into<LinearMatrix>>(
    source: &Path,
    tf: &TensorFiles,
    mut config: ModelConfig,
    format: SourceFormat,
    quantization: Quantization,
    read_matrix: impl Fn(&str, usize, usize) -> Result<M>,
) -> Result<Checkpoint> {
    let (v, d) = (config.vocab_size, config.hidden_size);
    // Config/weights disagreement on depth: a tensor of a layer the config does not have.
    let n = config.num_hidden_layers;
    let layer_of = |t: &str| {
        t.strip_prefix("model.layers.")
            .and_then(|r| r.split('.').next())
            .and_then(|i| i.parse::<usize>().ok())
    };
    if let Some(extra) = tf.names().find(|t| layer_of(t).is_some_and(|i| i >= n)) {
        return Err(Error::config(
            tf.path().with_file_name("config.json"),
            "num_hidden_layers",
            format!("config says {n} layers but the weights have tensor `{extra}`"),
        ));
    }
    let embed_tokens = FloatMatrix::read(&tf.get("model.embed_tokens.weight")?, v, d)?;
    let norm = read_float(tf, "model.norm.weight", &[d])?;
    let lm_head = if config.tie_word_embeddings {
        None
    } else {
        Some(FloatMatrix::read(&tf.get("lm_head.weight")?, v, d)?)
    };
    let q_width = config.num_attention_heads * config.head_dim();
    // Not `with_capacity(n)`: n is the config's untrusted number; a layer the weights lack
    // fails below as a missing tensor before anything is sized by it.
    let mut layers = Vec::new();
    for l in 0..n {
        let p = format!("model.layers.{l}");
        let mut linears = Vec::with_capacity(7);
        for kind in LinearKind::ALL {
            let name = linear_name(l, kind);
            let (rows, cols) = kind.shape(&config);
            let matrix = read_matrix(&name, rows, cols)?.into();
            if let LinearMatrix::Ternary(_) = matrix {
                // A float matrix may still be reading the mapped pages.
                tf.release(&format!("{name}."));
            }
            let bias = read_optional(tf, &format!("{name}.bias"), &[rows])?;
            linears.push(Linear { matrix, bias });
        }
        layers.push(Layer {
            input_layernorm: read_float(tf, &format!("{p}.input_layernorm.weight"), &[d])?,
            post_attention_layernorm: read_float(
                tf,
                &format!("{p}.post_attention_layernorm.weight"),
                &[d],
            )?,
            attn_sub_norm: read_optional(
                tf,
                &format!("{p}.self_attn.attn_sub_norm.weight"),
                &[q_width],
            )?,
            ffn_sub_norm: read_optional(
                tf,
                &format!("{p}.mlp.ffn_sub_norm.weight"),
                &[config.intermediate_size],
            )?,
            linears,
        });
    }
    // Sub-norms are all present or all absent; a partial set is a broken checkpoint.
    let with_sub = layers
        .iter()
        .filter(|l| l.attn_sub_norm.is_some() && l.ffn_sub_norm.is_some())
        .count();
    let without = layers
        .iter()
        .filter(|l| l.attn_sub_norm.is_none() && l.ffn_sub_norm.is_none())
        .count();
    if with_sub != n && without != n {
        let l = layers
            .iter()
            .position(|l| l.attn_sub_norm.is_none() || l.ffn_sub_norm.is_none())
            .unwrap_or(0);
        let name = if layers[l].attn_sub_norm.is_none() {
            format!("model.layers.{l}.self_attn.attn_sub_norm.weight")
        } else {
            format!("model.layers.{l}.mlp.ffn_sub_norm.weight")
        };
        return Err(Error::MissingTensor {
            path: tf.path().to_path_buf(),
            tensor: name,
        });
    }
    let has_sub = with_sub == n;
    if config.sub_norms == Some(true) && !has_sub {
        return Err(Error::MissingTensor {
            path: tf.path().to_path_buf(),
            tensor: "model.layers.0.self_attn.attn_sub_norm.weight".into(),
        });
    }
    config.sub_norms = Some(has_sub);
    Ok(Checkpoint {
        config,
        quantization,
        format,
        source: source.to_path_buf(),
        bytes_on_disk: tf.bytes(),
        embed_tokens,
        norm,
        lm_head,
        layers,
    })
}

/// Native: `<linear>.weight` uint8 `[out, ceil(in/4)]`, `<linear>.weight_scale` f32 `[1]` or
/// `[out]`; config and quantization rule as JSON in the header metadata.
fn load_native(source: &Path, tf: &TensorFiles) -> Result<Checkpoint> {
    let path = tf.path().to_path_buf();
    if let Some(v) = tf.metadata("bitsvf_version") {
        if v != NATIVE_VERSION {
            return Err(Error::config(
                &path,
                "bitsvf_version",
                format!("file is version {v}, this build reads version {NATIVE_VERSION}"),
            ));
        }
    }
    let text = tf
        .metadata("config")
        .ok_or_else(|| Error::config(&path, "config", "missing from the header metadata"))?;
    let config = ModelConfig::from_json(text, &path)?;
    let quantization: Quantization = match tf.metadata("quantization") {
        Some(q) => serde_json::from_str(q)
            .map_err(|e| Error::config(&path, "quantization", e.to_string()))?,
        None => Quantization::PerTensor,
    };
    let reader = |name: &str, rows: usize, cols: usize| -> Result<LinearMatrix> {
        let wname = format!("{name}.weight");
        let t = tf.get(&wname)?;
        if t.is_float() {
            return Ok(LinearMatrix::Float(FloatMatrix::read(&t, rows, cols)?));
        }
        t.expect_shape(&[rows, native_row_bytes(cols)])?;
        let values = unpack_native(t.as_u8()?, rows, cols).map_err(|m| t.bad(m))?;
        let sname = format!("{name}.weight_scale");
        let s = tf.get(&sname)?;
        let scales = s.to_f32()?;
        if scales.len() != 1 && scales.len() != rows {
            return Err(Error::Shape {
                path: s.path.to_path_buf(),
                tensor: sname.clone(),
                expected: vec![rows],
                got: s.shape.to_vec(),
            });
        }
        check_scales(&s, &scales)?;
        Ok(TernaryMatrix::from_values(&values, rows, cols, scales).into())
    };
    assemble(
        source,
        tf,
        config,
        SourceFormat::Native,
        quantization,
        reader,
    )
}

/// Whether `config.json` describes a BitNet model (whose float weights are master weights,
/// ternarized as transformers does): a bitnet `quantization_config`, `model_type` bitnet or a
/// BitNet architecture. Anything else with float weights (Llama and its kin) is a float model.
fn is_bitnet(raw: &Value) -> bool {
    let method = raw
        .get("quantization_config")
        .and_then(|q| q.get("quant_method"))
        .and_then(Value::as_str);
    let model_type = raw.get("model_type").and_then(Value::as_str);
    let arch = raw
        .get("architectures")
        .and_then(Value::as_array)
        .is_some_and(|a| {
            a.iter()
                .filter_map(Value::as_str)
                .any(|n| n.to_ascii_lowercase().contains("bitnet"))
        });
    method == Some("bitnet") || model_type.is_some_and(|t| t.starts_with("bitnet")) || arch
}

/// A `quantization_config` must be an object and, when it names a `quant_method`, name
/// BitNet's: another method (gptq, awq, bitsandbytes…) packs its weights differently, and
/// reading them as BitNet would be silently wrong.
fn check_quantization_config(raw: &Value, config_path: &Path) -> Result<()> {
    let Some(qc) = raw.get("quantization_config") else {
        return Ok(());
    };
    let Some(obj) = qc.as_object() else {
        return Err(Error::config(
            config_path,
            "quantization_config",
            format!("expected an object, got `{qc}`"),
        ));
    };
    match obj.get("quant_method") {
        None => Ok(()),
        Some(Value::String(m)) if m == "bitnet" => Ok(()),
        Some(other) => Err(Error::config(
            config_path,
            "quantization_config.quant_method",
            format!("`{other}` is not BitNet b1.58 (expected \"bitnet\"); bitsvf reads ternary BitNet checkpoints"),
        )),
    }
}
