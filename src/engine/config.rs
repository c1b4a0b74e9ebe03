//! The architecture of a BitNet decoder, read from (and written as) a Hugging Face-style
//! `config.json`, so our native files and dequantized outputs stay readable by other tools.

use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// The FFN's activation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Activation {
    /// BitNet b1.58 2B-4T: `down(relu(gate(x))² · up(x))`.
    #[serde(rename = "relu2")]
    Relu2,
    /// 1bitLLM / Llama: `down(silu(gate(x)) · up(x))`.
    #[serde(rename = "silu")]
    Silu,
}

/// Hyper-parameters of a Llama-family BitNet decoder (HF `config.json` field names).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelConfig {
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Model width d.
    pub hidden_size: usize,
    /// FFN width.
    pub intermediate_size: usize,
    /// Decoder layers.
    pub num_hidden_layers: usize,
    /// Query heads.
    pub num_attention_heads: usize,
    /// Key/value heads (GQA); defaults to the query heads.
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    /// Head dimension; defaults to hidden_size / heads.
    #[serde(default)]
    pub head_dim: Option<usize>,
    /// FFN activation.
    #[serde(default = "default_act")]
    pub hidden_act: Activation,
    /// Longest supported sequence.
    #[serde(default = "default_max_pos")]
    pub max_position_embeddings: usize,
    /// RMSNorm ε.
    #[serde(default = "default_eps")]
    pub rms_norm_eps: f64,
    /// RoPE base θ.
    #[serde(default = "default_theta")]
    pub rope_theta: f64,
    /// lm_head shares the embedding matrix.
    #[serde(default)]
    pub tie_word_embeddings: bool,
    /// Beginning-of-sequence token.
    #[serde(default)]
    pub bos_token_id: Option<u32>,
    /// End-of-sequence token.
    #[serde(default)]
    pub eos_token_id: Option<u32>,
    /// BitNet's `attn_sub_norm` / `ffn_sub_norm` are present. Detected from the weights when
    /// absent from the file.
    #[serde(default)]
    pub sub_norms: Option<bool>,
}

fn default_act() -> Activation {
    Activation::Relu2
}
fn default_max_pos() -> usize {
    2048
}
fn default_eps() -> f64 {
    1e-5
}
fn default_theta() -> f64 {
    10000.0
}

impl ModelConfig {
    /// Key/value heads.
    pub fn kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    /// Per-head width.
    pub fn head_dim(&self) -> usize {
        self.head_dim
            .unwrap_or(self.hidden_size / self.num_attention_heads.max(1))
    }

    /// Check the numbers are consistent; `path` names the file in errors.
    pub fn validate(&self, path: &Path) -> Result<()> {
        let pos = |field: &str, v: usize| {
            if v == 0 {
                Err(Error::config(path, field, "must be > 0"))
            } else {
                Ok(())
            }
        };
        pos("vocab_size", self.vocab_size)?;
        pos("hidden_size", self.hidden_size)?;
        pos("intermediate_size", self.intermediate_size)?;
        pos("num_hidden_layers", self.num_hidden_layers)?;
        pos("num_attention_heads", self.num_attention_heads)?;
        pos("num_key_value_heads", self.kv_heads())?;
        if !self.num_attention_heads.is_multiple_of(self.kv_heads()) {
            return Err(Error::config(
                path,
                "num_key_value_heads",
                format!(
                    "{} query heads are not a multiple of {} key/value heads",
                    self.num_attention_heads,
                    self.kv_heads()
                ),
            ));
        }
        if self.head_dim.is_none() && !self.hidden_size.is_multiple_of(self.num_attention_heads) {
            return Err(Error::config(
                path,
                "hidden_size",
                format!(
                    "{} is not divisible by {} heads",
                    self.hidden_size, self.num_attention_heads
                ),
            ));
        }
        if !self.head_dim().is_multiple_of(2) {
            return Err(Error::config(path, "head_dim", "must be even for RoPE"));
        }
        if !(self.rms_norm_eps.is_finite() && self.rms_norm_eps > 0.0) {
            return Err(Error::config(
                path,
                "rms_norm_eps",
                "must be a positive number",
            ));
        }
        if !(self.rope_theta.is_finite() && self.rope_theta > 0.0) {
            return Err(Error::config(
                path,
                "rope_theta",
                "must be a positive number",
            ));
        }
        Ok(())
    }

    /// Parse a config from JSON text; errors name `path` and serde's field/line.
    pub fn from_json(text: &str, path: &Path) -> Result<Self> {
        let de = &mut serde_json::Deserializer::from_str(text);
        let cfg: ModelConfig = serde_path_to_error::deserialize(de).map_err(|e| {
            let field = e.path().to_string();
            let field = if field == "." {
                // A missing field is reported at the root; serde names it in the message.
                let msg = e.inner().to_string();
                msg.split('`').nth(1).unwrap_or("(json)").to_string()
            } else {
                field
            };
            Error::config(path, field, e.inner().to_string())
        })?;
        let mut cfg = cfg;
        cfg.read_rope_parameters(text, path)?;
        cfg.validate(path)?;
        Ok(cfg)
    }

    /// RoPE as transformers spells it: `rope_parameters` (transformers 5) or `rope_scaling`
    /// (4.x). bitsvf computes plain RoPE, so any other `rope_type` is an error naming the field.
    fn read_rope_parameters(&mut self, text: &str, path: &Path) -> Result<()> {
        let raw: serde_json::Value =
            serde_json::from_str(text).map_err(|e| Error::config(path, "(json)", e.to_string()))?;
        for key in ["rope_parameters", "rope_scaling"] {
            let Some(p) = raw.get(key).filter(|p| !p.is_null()) else {
                continue;
            };
            let ty = p
                .get("rope_type")
                .or_else(|| p.get("type"))
                .and_then(|t| t.as_str())
                .unwrap_or("default");
            if ty != "default" {
                return Err(Error::config(
                    path,
                    format!("{key}.rope_type"),
                    format!("`{ty}`; bitsvf computes plain (default) RoPE only"),
                ));
            }
            if let (Some(theta), None) = (p.get("rope_theta"), raw.get("rope_theta")) {
                self.rope_theta = theta
                    .as_f64()
                    .filter(|t| t.is_finite() && *t > 0.0)
                    .ok_or_else(|| {
                        Error::config(path, format!("{key}.rope_theta"), "not a positive number")
                    })?;
            }
        }
        Ok(())
    }

    /// Parameter count: embeddings, linears, norms and (untied) lm_head.
    pub fn parameter_count(&self) -> usize {
        let (d, f, v) = (self.hidden_size, self.intermediate_size, self.vocab_size);
        let hd = self.head_dim();
        let q = self.num_attention_heads * hd;
        let kv = self.kv_heads() * hd;
        let attn = d * q + 2 * d * kv + q * d;
        let mlp = 3 * d * f;
        let sub = if self.sub_norms.unwrap_or(true) {
            q + f
        } else {
            0
        };
        let norms = 2 * d + sub;
        let head = if self.tie_word_embeddings { 0 } else { v * d };
        v * d + self.num_hidden_layers * (attn + mlp + norms) + d + head
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fixture_config_parses() {
        let p = Path::new(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/hf-bitnet-tiny/config.json"
        ));
        let cfg = ModelConfig::from_json(&std::fs::read_to_string(p).unwrap(), p).unwrap();
        assert_eq!(cfg.hidden_act, Activation::Relu2);
        assert_eq!((cfg.kv_heads(), cfg.head_dim()), (2, 16));
        assert_eq!(cfg.rope_theta, 500000.0);
    }

    #[test]
    fn missing_field_is_named() {
        let e = ModelConfig::from_json(r#"{"vocab_size": 4}"#, Path::new("c.json")).unwrap_err();
        let s = e.to_string();
        assert!(s.contains("c.json") && s.contains("hidden_size"), "{s}");
    }

    #[test]
    fn inconsistent_heads_rejected() {
        let text = r#"{"vocab_size":8,"hidden_size":64,"intermediate_size":8,
            "num_hidden_layers":1,"num_attention_heads":4,"num_key_value_heads":3}"#;
        let s = ModelConfig::from_json(text, Path::new("c.json"))
            .unwrap_err()
            .to_string();
        assert!(s.contains("num_key_value_heads"), "{s}");
    }
}
