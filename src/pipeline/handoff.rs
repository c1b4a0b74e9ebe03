//! The handoff directory (DESIGN.md §6): its manifest, writing it at the end of a run, and
//! reading it back ([`Handoff::open`], [`Handoff::summary`], [`reproduce`]).

use crate::adapt::discover::Discovery;
use crate::adapt::dispatch::Mixer;
use crate::adapt::mixture_search::SearchReport;
use crate::engine::checkpoint::Checkpoint;
use crate::engine::tokenizer::Tokenizer;
use crate::error::{Error, Result};
use crate::io::{read_json, write_json};
use crate::pipeline::config::{sources_of, RunConfig};
use crate::pipeline::plot::Series;
use crate::pipeline::report::{draw_plots, report_markdown};
use crate::pipeline::run::Trained;
use crate::pipeline::stages::StageRecord;
use crate::pipeline::table::{accuracy, columns, TestTable};
use crate::svf::base::Base;
use crate::svf::deploy::{f32_bytes, packed_bytes};
use crate::svf::expert::Expert;
use crate::svf::svd::SvdCache;
use crate::tasks::{DataSource, Dataset};
use crate::train::TrainSummary;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Format tag of the handoff manifest.
pub const MANIFEST_FORMAT: &str = "bitsvf-handoff";

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

/// The manifest of a handoff directory.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Manifest {
    /// [`MANIFEST_FORMAT`].
    pub format: String,
    /// bitsvf version that wrote it.
    pub bitsvf_version: String,
    /// The base model.
    pub base_model: serde_json::Value,
    /// The run settings.
    pub options: RunConfig,
    /// The experts.
    pub experts: Vec<ExpertEntry>,
    /// The classifier expert.
    pub classifier: Option<ExpertEntry>,
    /// The chosen mixture.
    pub mixture: Option<serde_json::Value>,
    /// Every metric: recovery, capability, search, CEM, test table, stages, bytes.
    pub metrics: serde_json::Value,
    /// Notes for the reader.
    pub notes: Vec<String>,
}

pub(crate) struct HandoffParts<'a> {
    pub recovery: serde_json::Value,
    pub svd: serde_json::Value,
    pub found: &'a Discovery,
    pub experts: &'a [Trained],
    pub classifier: ExpertEntry,
    pub searched: Option<&'a SearchReport>,
    pub cem_alpha: &'a BTreeMap<String, Vec<f64>>,
    pub table: &'a TestTable,
}

/// Write manifest.json, metrics.jsonl, the plots and report.md into `work`.
pub(crate) fn handoff(
    base: &Base,
    model_name: &str,
    cfg: &RunConfig,
    work: &Path,
    records: &[StageRecord],
    p: HandoffParts,
) -> Result<Manifest> {
    // metrics.jsonl: capability, every training step, every search point and generation.
    let mut lines: Vec<serde_json::Value> = Vec::new();
    for (n, a) in p.found.names.iter().zip(&p.found.accuracy) {
        lines.push(serde_json::json!({ format!("stage1/capability/{n}/accuracy"): a }));
    }
    let mut curves: Vec<Series<(f64, f64)>> = Vec::new();
    let entries = p.experts.iter().map(|(e, _)| e).chain([&p.classifier]);
    for e in entries {
        let mp = work.join(&e.file).with_extension("metrics.jsonl");
        let text = std::fs::read_to_string(&mp).map_err(|err| Error::io(&mp, err))?;
        // Step 0 is the base model, measured on the same validation items.
        let mut curve = vec![(0.0, e.base_val_accuracy)];
        for line in text.lines().filter(|l| !l.trim().is_empty()) {
            let v: serde_json::Value = serde_json::from_str(line)
                .map_err(|err| Error::config(&mp, "line", err.to_string()))?;
            let key = format!("stage2/expert_{}/val_accuracy", e.name);
            if let (Some(step), Some(acc)) = (v["step"].as_f64(), v[&key].as_f64()) {
                curve.push((step, acc));
            }
            lines.push(v);
        }
        curves.push(Series {
            name: e.name.clone(),
            values: curve,
        });
        std::fs::remove_file(&mp).map_err(|err| Error::io(&mp, err))?;
        let state = work.join(&e.file).with_extension("train-state.safetensors");
        if state.exists() {
            std::fs::remove_file(&state).map_err(|err| Error::io(&state, err))?;
        }
    }
    if let Some(s) = p.searched {
        for (i, pt) in s.evaluated.iter().enumerate() {
            lines.push(serde_json::json!({
                "stage3/search/evaluation": i, "stage3/search/accuracy": pt.accuracy,
                "stage3/search/kl": pt.kl, "stage3/search/ms_per_token": pt.ms_per_token,
                "stage3/search/bytes": pt.bytes, "stage3/search/rank": pt.rank,
                "stage3/search/alpha": pt.alpha,
            }));
        }
        for g in &s.history {
            lines.push(serde_json::json!({
                "stage3/search/generation": g.generation,
                "stage3/search/hypervolume": g.hypervolume,
                "stage3/search/front_size": g.front_size,
            }));
        }
    }
    for (d, row) in &p.table.accuracy {
        for (c, a) in row {
            lines.push(serde_json::json!({ format!("eval/{d}/{c}"): a }));
        }
    }
    let mut text = String::new();
    for l in &lines {
        text.push_str(&l.to_string());
        text.push('\n');
    }
    crate::io::write_atomic(&work.join("metrics.jsonl"), text.as_bytes())?;

    draw_plots(work, p.table, p.found, &curves, p.searched, records)?;

    // Manifest.
    let ck = base.ck();
    let file_bytes = |rel: &str| std::fs::metadata(work.join(rel)).map_or(0, |m| m.len());
    let expert_bytes: u64 = p.experts.iter().map(|(e, _)| file_bytes(&e.file)).sum();
    let mixture = p.searched.map(|s| {
        serde_json::json!({
            "file": "experts/mixture.safetensors",
            "experts": s.experts,
            "alpha": s.chosen.alpha,
            "rank": s.chosen.rank,
            "deployed_form": "hybrid: packed ternary base + rank-k SVF delta (f16 factors)",
            "rule": s.rule,
            "validation": s.chosen,
        })
    });
    let mut notes = vec![
        "Test accuracies are greedy decoding on the held-out test split; the search's \
         validation accuracy is greedy exact match by a teacher-forced pass."
            .to_string(),
    ];
    let dropped: Vec<&str> = p
        .experts
        .iter()
        .filter(|(e, _)| !e.in_mixture)
        .map(|(e, _)| e.name.as_str())
        .collect();
    if !dropped.is_empty() {
        notes.push(format!(
            "Experts that did not gain more than {:.1} points on validation stay in the library but not in the mixture: {}",
            100.0 * cfg.min_gain,
            dropped.join(", ")
        ));
    }
    let manifest = Manifest {
        format: MANIFEST_FORMAT.into(),
        bitsvf_version: env!("CARGO_PKG_VERSION").into(),
        base_model: serde_json::json!({
            "name": model_name, "content_hash": base.hash(), "format": ck.format.name(),
            "file": "model/base.safetensors",
        }),
        options: cfg.clone(),
        experts: p.experts.iter().map(|(e, _)| e.clone()).collect(),
        classifier: Some(p.classifier.clone()),
        mixture,
        metrics: serde_json::json!({
            "recovery": p.recovery,
            "svd": p.svd,
            "discovery": p.found,
            "search": p.searched.map(|s| serde_json::json!({
                "history": s.history, "front": s.front, "base": s.base,
                "evaluations": s.evaluated.len(), "seconds": s.seconds,
                "stopped_early": s.stopped_early, "hv_reference": s.hv_reference,
            })),
            "cem_alpha": p.cem_alpha,
            "test": p.table,
            "stages": records,
            "bytes": {
                "ternary_base_packed": packed_bytes(ck),
                "f32_model": f32_bytes(ck),
                "experts_files": expert_bytes,
                "base_file": file_bytes("model/base.safetensors"),
            },
        }),
        notes,
    };
    write_json(&work.join("manifest.json"), &manifest)?;
    let report = report_markdown(&manifest, p.found, p.table, records, p.searched);
    crate::io::write_atomic(&work.join("report.md"), report.as_bytes())?;
    Ok(manifest)
}

/// The mixture of a handoff.
pub struct HandoffMixture {
    /// Its experts, in α order.
    pub experts: Vec<Expert>,
    /// α*.
    pub alpha: Vec<f64>,
    /// Singular directions of the deployed delta.
    pub rank: usize,
}

/// A handoff directory, opened for reuse (`bitsvf inspect`, `eval --mixture`, `generate`).
pub struct Handoff {
    /// The directory.
    pub dir: PathBuf,
    /// Its manifest.
    pub manifest: Manifest,
    /// The base model in `model/`.
    pub ck: Checkpoint,
    /// Its content hash, checked against the manifest's.
    hash: String,
}

/// The first 12 characters of a hash, for messages.
pub(crate) fn short(hash: &str) -> &str {
    hash.get(..12).unwrap_or(hash)
}

impl Handoff {
    /// Read `dir/manifest.json` and the base model, and check that they belong together.
    pub fn open(dir: &Path) -> Result<Handoff> {
        let mp = dir.join("manifest.json");
        if !mp.is_file() {
            return Err(Error::Input(format!(
                "{} is not a bitsvf handoff directory (no manifest.json)",
                dir.display()
            )));
        }
        let manifest: Manifest = read_json(&mp)?;
        if manifest.format != MANIFEST_FORMAT {
            return Err(Error::config(
                &mp,
                "format",
                format!("expected `{MANIFEST_FORMAT}`, found `{}`", manifest.format),
            ));
        }
        let file = manifest.base_model["file"]
            .as_str()
            .ok_or_else(|| Error::config(&mp, "base_model.file", "missing"))?;
        let ck = crate::engine::checkpoint::load(&dir.join(file))?;
        let hash = ck.content_hash();
        let want = manifest.base_model["content_hash"].as_str().unwrap_or("");
        if hash != want {
            return Err(Error::config(
                &mp,
                "base_model.content_hash",
                format!(
                    "{} has content hash {}…, the manifest says {}…",
                    dir.join(file).display(),
                    short(&hash),
                    short(want)
                ),
            ));
        }
        Ok(Handoff {
            dir: dir.to_path_buf(),
            manifest,
            ck,
            hash,
        })
    }

    /// The base model, hashed already, with its SVD factors from `cache`.
    pub fn base<'a>(&'a self, cache: &'a SvdCache) -> Base<'a> {
        Base::with_hash(&self.ck, self.hash.clone(), cache)
    }

    fn load_expert(&self, file: &str) -> Result<Expert> {
        let path = self.dir.join(file);
        let e = Expert::load(&path)?;
        e.check_hash(&self.hash, &path)?;
        Ok(e)
    }

    /// Every expert of the library, in manifest order.
    pub fn experts(&self) -> Result<Vec<Expert>> {
        (self.manifest.experts.iter())
            .map(|e| self.load_expert(&e.file))
            .collect()
    }

    /// The classifier expert, if the run trained one.
    pub fn classifier(&self) -> Result<Option<Expert>> {
        self.manifest
            .classifier
            .as_ref()
            .map(|c| self.load_expert(&c.file))
            .transpose()
    }

    /// The mixture's experts (in α order), α* and the deployed rank; `None` without a mixture.
    pub fn mixture(&self) -> Result<Option<HandoffMixture>> {
        let Some(m) = &self.manifest.mixture else {
            return Ok(None);
        };
        let mp = self.dir.join("manifest.json");
        let names: Vec<String> = serde_json::from_value(m["experts"].clone())
            .map_err(|e| Error::config(&mp, "mixture.experts", e.to_string()))?;
        let alpha: Vec<f64> = serde_json::from_value(m["alpha"].clone())
            .map_err(|e| Error::config(&mp, "mixture.alpha", e.to_string()))?;
        let rank = m["rank"]
            .as_u64()
            .ok_or_else(|| Error::config(&mp, "mixture.rank", "missing"))?
            as usize;
        let experts = names
            .iter()
            .map(|n| {
                let entry = (self.manifest.experts.iter())
                    .find(|e| &e.name == n)
                    .ok_or_else(|| {
                        Error::config(&mp, "mixture.experts", format!("no expert named `{n}`"))
                    })?;
                self.load_expert(&entry.file)
            })
            .collect::<Result<Vec<_>>>()?;
        if alpha.len() != experts.len() {
            return Err(Error::config(
                &mp,
                "mixture.alpha",
                format!("{} weights for {} experts", alpha.len(), experts.len()),
            ));
        }
        Ok(Some(HandoffMixture {
            experts,
            alpha,
            rank,
        }))
    }

    /// The run's data sources: its built-in domains and the user datasets copied into `data/`.
    pub fn sources(&self) -> Result<Vec<DataSource>> {
        let datasets = (self.manifest.options.datasets.iter())
            .map(|n| read_json::<Dataset>(&self.dir.join("data").join(format!("{n}.json"))))
            .collect::<Result<Vec<_>>>()?;
        Ok(sources_of(&self.manifest.options.domains, &datasets))
    }

    /// A text summary; every file it names is loaded and checked.
    pub fn summary(&self) -> Result<String> {
        let m = &self.manifest;
        let mut s = format!(
            "bitsvf handoff {} (bitsvf {})\nbase model: {} ({}), content hash {}… — verified\n\nexperts:\n",
            self.dir.display(),
            m.bitsvf_version,
            m.base_model["name"].as_str().unwrap_or("?"),
            m.base_model["format"].as_str().unwrap_or("?"),
            short(&self.hash),
        );
        let experts = self.experts()?;
        for (e, x) in m.experts.iter().zip(&experts) {
            s += &format!(
                "  {:<14} {:<24} val {:>5.1}% (base {:>5.1}%)  {} z-vectors, {}{}\n",
                e.name,
                e.domains.join(","),
                100.0 * e.val_accuracy,
                100.0 * e.base_val_accuracy,
                x.z.len(),
                e.file,
                if e.in_mixture {
                    ""
                } else {
                    "  (not in the mixture)"
                }
            );
        }
        if let Some(c) = &m.classifier {
            self.classifier()?;
            s += &format!(
                "  {:<14} {:<24} val {:>5.1}%  {}\n",
                c.name,
                "(dispatch labels)",
                100.0 * c.val_accuracy,
                c.file
            );
        }
        match self.mixture()? {
            Some(HandoffMixture {
                experts,
                alpha,
                rank,
            }) => {
                let parts: Vec<String> = (experts.iter().zip(&alpha))
                    .map(|(e, a)| format!("{a:.3}·{}", e.meta.name))
                    .collect();
                s += &format!(
                    "\nmixture α*: {}, deployed with {rank} singular directions\n",
                    parts.join(" + ")
                );
            }
            None => s += "\nno mixture\n",
        }
        if let Ok(table) = serde_json::from_value::<TestTable>(m.metrics["test"].clone()) {
            s += &format!(
                "\ntest accuracy (%), mean over {} domains:\n",
                table.accuracy.len()
            );
            for c in &table.columns {
                let v: Vec<f64> = table
                    .accuracy
                    .values()
                    .filter_map(|r| r.get(c))
                    .copied()
                    .collect();
                if !v.is_empty() {
                    s += &format!(
                        "  {c:<28} {:>5.1}\n",
                        100.0 * v.iter().sum::<f64>() / v.len() as f64
                    );
                }
            }
        }
        Ok(s)
    }
}

/// One figure of the manifest, measured again.
#[derive(Debug, Clone, Serialize)]
pub struct Reproduced {
    /// Test domain.
    pub domain: String,
    /// Test-table column.
    pub column: String,
    /// The manifest's value.
    pub manifest: f64,
    /// Measured now.
    pub measured: f64,
}

/// Re-measure the mixture columns of the handoff's test table (same items, same forms).
pub fn reproduce(
    h: &Handoff,
    tok: &dyn Tokenizer,
    cache: &SvdCache,
    mut progress: impl FnMut(usize, usize),
) -> Result<Vec<Reproduced>> {
    let mp = h.dir.join("manifest.json");
    let table: TestTable = serde_json::from_value(h.manifest.metrics["test"].clone())
        .map_err(|e| Error::config(&mp, "metrics.test", e.to_string()))?;
    let HandoffMixture {
        experts,
        alpha,
        rank,
    } = h.mixture()?.ok_or_else(|| {
        Error::Input(format!(
            "{} has no mixture (no expert gained)",
            h.dir.display()
        ))
    })?;
    let sources = h.sources()?;
    let base = h.base(cache);
    let mut mixer = Mixer::new(&base, experts.clone())?;
    let mut deployer = crate::adapt::mixture_search::Deployer::new(&base, &experts)?;
    let mut out = Vec::new();
    for (i, (d, row)) in table.accuracy.iter().enumerate() {
        progress(i, table.accuracy.len());
        let source = (sources.iter().find(|s| s.name() == *d))
            .ok_or_else(|| Error::config(&mp, "metrics.test", format!("unknown source `{d}`")))?;
        let items = source.test(table.n, table.seed)?;
        for column in [columns::MIXTURE, columns::MIXTURE_DEPLOYED] {
            let Some(&want) = row.get(column) else {
                continue;
            };
            let measured = if column == columns::MIXTURE {
                accuracy(mixer.model(&alpha)?, tok, &items, source)?
            } else {
                accuracy(deployer.deploy(&alpha, rank)?.0, tok, &items, source)?
            };
            out.push(Reproduced {
                domain: d.clone(),
                column: column.to_string(),
                manifest: want,
                measured,
            });
        }
    }
    Ok(out)
}
