//! bitsvf: self-adaptive 1.58-bit (BitNet b1.58) language models with Transformer²'s Singular
//! Value Fine-tuning. See README.md and DESIGN.md for the pipeline.

pub mod checkpoint;
pub mod compare;
pub mod config;
pub mod deploy;
pub mod discover;
pub mod dispatch;
pub mod error;
pub mod eval;
pub mod expert;
pub mod inspect;
pub mod mixture;
pub mod model;
pub mod ops;
pub mod optim;
pub mod pipeline;
pub mod plot;
pub mod pretrain;
pub mod recovery;
pub mod requant;
pub mod search;
pub mod svd;
pub mod svf;
pub mod tasks;
pub mod ternary;
pub mod tokenizer;
pub mod train;

pub use error::{Error, Result};
