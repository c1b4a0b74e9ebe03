//! The main job, `bitsvf run` (DESIGN.md §1): load and verify → SVD → discover → train the
//! experts and the classifier → search the mixture → fit few-shot CEM → evaluate → hand off.
//!
//! Every stage writes its result to `<out>.partial/stages/<stage>.json` (atomically) when it
//! finishes, with its wall time and peak resident memory; a rerun of the same command skips
//! finished stages and resumes an interrupted expert from its last validation. The handoff
//! directory (DESIGN.md §6) is assembled inside `<out>.partial` and renamed to `<out>` as the
//! last step, so `<out>` is either absent or complete.
//!
//! [`config`] holds the settings, [`stages`] the stage runner, `run` one function per stage,
//! [`table`] the test table, [`handoff`] the manifest and its reader, `report` report.md.

pub mod compare;
pub mod config;
pub mod handoff;
pub mod plot;
mod report;
mod run;
pub mod stages;
pub mod table;

pub use config::RunConfig;
pub use handoff::{
    reproduce, BaseModel, ByteCounts, ExpertEntry, Handoff, HandoffMixture, Manifest, Metrics,
    MixtureEntry, Reproduced, SearchSummary, SvdStats, FORMAT_VERSION, MANIFEST_FORMAT,
};
pub use run::run;
pub use stages::{Event, StageRecord};
pub use table::{columns, TestTable};
