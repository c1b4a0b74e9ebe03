//! The model shape the benchmarks share: d 512, 8 layers, SiLU-gated FFN 1536, 8 heads,
//! vocab 32000 — the reference shape of `scripts/reference/torch_svf_step.py`.

use bitsvf::engine::config::{Activation, ModelConfig};
use bitsvf::engine::model::default_arch;

/// The reference shape with `kv_heads` kv heads and `positions` positions.
pub fn reference_shape(kv_heads: Option<usize>, positions: usize) -> ModelConfig {
    ModelConfig {
        vocab_size: 32000,
        hidden_size: 512,
        intermediate_size: 1536,
        num_hidden_layers: 8,
        num_attention_heads: 8,
        num_key_value_heads: kv_heads,
        hidden_act: Activation::Silu,
        max_position_embeddings: positions,
        bos_token_id: None,
        eos_token_id: None,
        sub_norms: Some(false),
        ..default_arch()
    }
}
