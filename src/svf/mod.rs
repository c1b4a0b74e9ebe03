//! Singular Value Fine-tuning (Transformer², DESIGN.md §3): the SVD of every target matrix and
//! its cache, how z maps to the applied singular-value scale, the adapted linear forms, expert
//! files and their mixtures, and the deployed forms of the seed's three integration options.

pub mod attach;
pub mod base;
pub mod deploy;
pub mod expert;
pub mod factors;
pub mod forms;
pub mod lora;
pub mod param;
pub mod svd;

pub use base::{Base, Factors};
pub use forms::{ScaleWeight, SvfWeight};
pub use param::{applied_scale, init_z, mix, Parameterization, Targets, OFFICIAL_MAX_MULT};
