//! bitsvf: self-adaptive 1.58-bit (BitNet b1.58) language models with Transformer²'s Singular
//! Value Fine-tuning. See README.md and DESIGN.md for the pipeline.

pub mod adapt;
pub mod dist;
pub mod engine;
pub mod error;
pub mod eval;
pub mod io;
pub mod names;
pub mod pipeline;
pub mod search;
pub mod serve;
pub mod svf;
pub mod tasks;
pub mod train;

pub use error::{Error, Result};
