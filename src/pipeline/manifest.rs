//! The manifest of a handoff directory, `manifest.json` (DESIGN.md §6): its types, their
//! serialized layout and the check of its format version.

use crate::adapt::discover::Discovery;
use crate::adapt::dispatch::{CemFit, Thresholds};
use crate::adapt::mixture_search::{Point, SearchReport};
use crate::adapt::selection::Selection;
use crate::error::{Error, Result};
use crate::eval::recovery::RecoveryReport;
use crate::pipeline::config::RunConfig;
use crate::pipeline::stages::StageRecord;
use crate::pipeline::table::TestTable;
use crate::search::GenerationRecord;
use crate::svf::svd::CacheStats;
use crate::train::TrainSummary;
use serde::{Deserialize, Serialize, Serializer};
use std::collections::BTreeMap;
use std::path::Path;

/// Format tag of the handoff manifest.
pub const MANIFEST_FORMAT: &str = "bitsvf-handoff";

/// Layout version of the manifests this bitsvf writes, `major.minor`. Readers accept every
/// minor version of their major (a minor version only adds fields) and refuse other majors.
/// 1.1 added `format_version` and the experts' `training.val_curve`; 1.2 the search's
/// `selection` and `search_pick`, the points' modelled latency (`model_ms`, `work`), CEM's
/// held-out check (`cem`) and the dispatch `thresholds`.
pub const FORMAT_VERSION: &str = "1.2";

/// The version of a manifest without `format_version`: as bitsvf 0.1.0 wrote it.
pub const FIRST_FORMAT_VERSION: &str = "1.0";

fn first_format_version() -> String {
    FIRST_FORMAT_VERSION.into()
}

/// The manifest of a handoff directory, `manifest.json`. Written and read by these types;
/// `base_model`, `mixture` and `metrics` list their keys in sorted order, as 1.0 did.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Manifest {
    /// [`MANIFEST_FORMAT`].
    pub format: String,
    /// Layout version ([`FORMAT_VERSION`]; [`FIRST_FORMAT_VERSION`] when absent).
    #[serde(default = "first_format_version")]
    pub format_version: String,
    /// bitsvf version that wrote it.
    pub bitsvf_version: String,
    /// The base model.
    #[serde(serialize_with = "sorted")]
    pub base_model: BaseModel,
    /// The run settings.
    pub options: RunConfig,
    /// The experts.
    pub experts: Vec<ExpertEntry>,
    /// The classifier expert.
    pub classifier: Option<ExpertEntry>,
    /// The handed-off mixture (`None`: no expert gained, or no mixture beat the base on the
    /// selection split by more than its noise).
    #[serde(serialize_with = "sorted")]
    pub mixture: Option<MixtureEntry>,
    /// Every metric of the run.
    #[serde(serialize_with = "sorted")]
    pub metrics: Metrics,
    /// Notes for the reader.
    pub notes: Vec<String>,
}

/// The base model of a handoff.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BaseModel {
    /// Its content hash ([`Checkpoint::content_hash`]).
    pub content_hash: String,
    /// Its file, relative to the handoff directory.
    pub file: String,
    /// The format it was read from.
    pub format: String,
    /// Its name (the path given, or the embedded model's).
    pub name: String,
}

/// One trained expert as the manifest lists it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ExpertEntry {
    /// Expert name (its label for dispatch).
    pub name: String,
    /// File, relative to the handoff directory.
    pub file: String,
    /// Domains it was trained on.
    pub domains: Vec<String>,
    /// Best validation accuracy (the saved checkpoint).
    pub val_accuracy: f64,
    /// The base model's validation accuracy on the same items.
    pub base_val_accuracy: f64,
    /// Whether it enters the mixture search (it gained on validation).
    pub in_mixture: bool,
    /// The training summary.
    pub training: TrainSummary,
}

/// The mixture α* the search chose.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MixtureEntry {
    /// α*, one weight per expert of `experts`.
    pub alpha: Vec<f64>,
    /// How it is deployed.
    pub deployed_form: String,
    /// Its experts' names, in α order.
    pub experts: Vec<String>,
    /// The mixed expert (full SVF), relative to the handoff directory.
    pub file: String,
    /// Singular directions of the deployed delta.
    pub rank: usize,
    /// Why this point of the front.
    pub rule: String,
    /// Its measurements on the validation items.
    pub validation: Point,
}

/// Every metric of a run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Metrics {
    /// Sizes of the forms of the model and of the files.
    pub bytes: ByteCounts,
    /// α fitted by few-shot CEM per source.
    pub cem_alpha: BTreeMap<String, Vec<f64>>,
    /// CEM's fit per source checked on held-out shots (where `keeps_base`, dispatch uses the
    /// base).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub cem: BTreeMap<String, CemFit>,
    /// The confidences below which the classifier and prompt dispatch answer "base"
    /// (calibrated on held-out prompts; 0 before 1.2).
    #[serde(default)]
    pub thresholds: Thresholds,
    /// Stage 1's capability report and grouping.
    pub discovery: Discovery,
    /// The dequantization check of stage 1.
    pub recovery: RecoveryReport,
    /// The mixture search (`None`: no expert gained).
    pub search: Option<SearchSummary>,
    /// Wall time and peak memory per stage.
    pub stages: Vec<StageRecord>,
    /// The SVD of the targets.
    pub svd: SvdStats,
    /// The test table.
    pub test: TestTable,
}

/// Sizes, bytes.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ByteCounts {
    /// `model/base.safetensors`.
    pub base_file: u64,
    /// The experts' files (classifier and mixture aside).
    pub experts_files: u64,
    /// The model with f32 linears.
    pub f32_model: usize,
    /// The model with packed ternary linears.
    pub ternary_base_packed: usize,
}

/// What loading the SVD of the targets did.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SvdStats {
    /// Matrices read from the cache.
    pub cache_hits: usize,
    /// Matrices decomposed.
    pub computed: usize,
    /// Target matrices.
    pub matrices: usize,
    /// Largest `‖W − UΣVᵀ‖_F / ‖W‖_F`.
    pub max_relative_error: f64,
    /// Wall time, seconds.
    pub seconds: f64,
}

impl From<&CacheStats> for SvdStats {
    fn from(s: &CacheStats) -> Self {
        SvdStats {
            cache_hits: s.hits,
            computed: s.computed,
            matrices: s.hits + s.computed,
            max_relative_error: s.max_relative_error,
            seconds: s.seconds,
        }
    }
}

/// The mixture search, as the manifest keeps it (every evaluated point is in metrics.jsonl).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SearchSummary {
    /// The bare base, measured the same way.
    pub base: Point,
    /// Genomes evaluated.
    pub evaluations: usize,
    /// The final Pareto front.
    pub front: Vec<Point>,
    /// Hypervolume and front size per generation.
    pub history: Vec<GenerationRecord>,
    /// Hypervolume reference point.
    pub hv_reference: Vec<f64>,
    /// Wall time, seconds.
    pub seconds: f64,
    /// Whether the hypervolume stalled before the last generation.
    pub stopped_early: bool,
    /// The search's own pick (the most accurate front point within the budgets, on its
    /// validation items).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub search_pick: Option<Point>,
    /// The choice of what is handed off, on the selection split.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selection: Option<Selection>,
}

impl From<&SearchReport> for SearchSummary {
    fn from(s: &SearchReport) -> Self {
        SearchSummary {
            base: s.base.clone(),
            evaluations: s.evaluated.len(),
            front: s.front.clone(),
            history: s.history.clone(),
            hv_reference: s.hv_reference.clone(),
            seconds: s.seconds,
            stopped_early: s.stopped_early,
            search_pick: Some(s.chosen.clone()),
            selection: s.selection.clone(),
        }
    }
}

/// Serialize `value` with the keys of every object in sorted order, whatever the field order
/// of its types: the layout of the parts of the manifest that 1.0 wrote as untyped JSON.
fn sorted<T: Serialize, S: Serializer>(value: &T, s: S) -> std::result::Result<S::Ok, S::Error> {
    let v = serde_json::to_value(value).map_err(serde::ser::Error::custom)?;
    SortedKeys(&v).serialize(s)
}

struct SortedKeys<'a>(&'a serde_json::Value);

impl Serialize for SortedKeys<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        match self.0 {
            serde_json::Value::Object(m) => {
                let mut entries: Vec<_> = m.iter().collect();
                entries.sort_by(|a, b| a.0.cmp(b.0));
                let mut map = s.serialize_map(Some(entries.len()))?;
                for (k, v) in entries {
                    map.serialize_entry(k, &SortedKeys(v))?;
                }
                map.end()
            }
            serde_json::Value::Array(a) => s.collect_seq(a.iter().map(SortedKeys)),
            v => v.serialize(s),
        }
    }
}

/// Error unless `value`, read from `path`, is a manifest of a layout this bitsvf reads.
pub(crate) fn check_format(path: &Path, value: &serde_json::Value) -> Result<()> {
    let format = value.get("format").and_then(|f| f.as_str()).unwrap_or("");
    if format != MANIFEST_FORMAT {
        return Err(Error::config(
            path,
            "format",
            format!("expected `{MANIFEST_FORMAT}`, found `{format}`"),
        ));
    }
    let Some(v) = value.get("format_version") else {
        return Ok(()); // 1.0
    };
    let ours = FORMAT_VERSION.split('.').next().unwrap_or_default();
    let major = v.as_str().and_then(|s| {
        let (major, minor) = s.split_once('.')?;
        minor.parse::<u32>().ok()?;
        major.parse::<u32>().ok().map(|_| major)
    });
    match major {
        Some(m) if m == ours => Ok(()),
        Some(_) => Err(Error::config(
            path,
            "format_version",
            format!(
                "version {v} is not supported: this bitsvf ({}) reads {ours}.x manifests; \
                 use the bitsvf that wrote it",
                env!("CARGO_PKG_VERSION")
            ),
        )),
        None => Err(Error::config(
            path,
            "format_version",
            format!("expected \"major.minor\", found {v}"),
        )),
    }
}
