//! The inference engine: model configs and checkpoint formats, packed ternary weights and their
//! kernels, the fused differentiable CPU ops, the decoder itself and tokenizers. Nothing here
//! knows about SVF, training or the pipeline.

pub mod chat;
pub mod checkpoint;
pub mod config;
pub mod inspect;
pub mod logits;
pub mod model;
pub mod ops;
pub mod ternary;
pub mod tokenizer;
