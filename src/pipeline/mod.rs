//! The main job, `bitsvf run` (DESIGN.md §1): load and verify → SVD → discover → train the
//! experts and the classifier → search the mixture → fit few-shot CEM → evaluate → hand off
//! (§6). [`config`] settings, [`stages`] runner, `run` stages, [`table`], [`handoff`] and its
//! [`manifest`], `report`.

pub mod compare;
pub mod config;
mod deal;
pub mod handoff;
pub mod manifest;
pub mod plot;
mod report;
mod run;
pub mod stages;
pub mod table;
mod workdir;

pub use config::{RunConfig, RunOverrides};
pub use handoff::{
    reproduce, reproduced_table, BaseModel, ByteCounts, ExpertEntry, Handoff, HandoffMixture,
    Manifest, Metrics, MixtureEntry, Reproduced, SearchSummary, SvdStats, FORMAT_VERSION,
    MANIFEST_FORMAT,
};
pub use run::{run, run_on, Ranks, RunInputs};
pub use stages::{Event, StageRecord};
pub use table::{columns, TestTable};
