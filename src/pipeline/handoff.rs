//! The handoff directory (DESIGN.md §6): writing it at the end of a run (its typed manifest
//! is [`crate::pipeline::manifest`]), and reading it back ([`Handoff::open`], [`Handoff::summary`], [`reproduce`]).

use crate::adapt::discover::Discovery;
use crate::adapt::dispatch::Mixer;
use crate::adapt::dispatch::{CemFit, Thresholds};
use crate::adapt::mixture_search::{Deployer, SearchReport};
use crate::engine::checkpoint::Checkpoint;
use crate::engine::tokenizer::Tokenizer;
use crate::error::{Error, Result};
use crate::eval::recovery::RecoveryReport;
use crate::io::{from_json_value, read_json, write_json};
use crate::pipeline::config::{sources_of, RunConfig};
use crate::pipeline::report::{draw_plots, report_markdown};
use crate::pipeline::run::Trained;
use crate::pipeline::stages::StageRecord;
use crate::pipeline::table::{accuracy, columns, TestTable};
use crate::svf::base::Base;
use crate::svf::deploy::{f32_bytes, packed_bytes};
use crate::svf::expert::Expert;
use crate::svf::svd::SvdCache;
use crate::tasks::{DataSource, Dataset};
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::pipeline::manifest::check_format;
pub use crate::pipeline::manifest::{
    BaseModel, ByteCounts, ExpertEntry, Manifest, Metrics, MixtureEntry, SearchSummary, SvdStats,
    FIRST_FORMAT_VERSION, FORMAT_VERSION, MANIFEST_FORMAT,
};

/// What the stages of a run hand to [`handoff`].
pub(crate) struct HandoffParts<'a> {
    pub recovery: RecoveryReport,
    pub svd: SvdStats,
    pub found: &'a Discovery,
    pub experts: &'a [Trained],
    pub classifier: ExpertEntry,
    pub thresholds: Thresholds,
    pub searched: Option<&'a SearchReport>,
    pub cem: &'a BTreeMap<String, CemFit>,
    pub table: &'a TestTable,
}

/// The experts' own training logs and resumable states, moved into metrics.jsonl (logs) or
/// no longer needed (states) once the handoff is written.
fn training_leftovers(work: &Path, p: &HandoffParts) -> Vec<PathBuf> {
    let files = p
        .experts
        .iter()
        .map(|(e, _)| &e.file)
        .chain([&p.classifier.file]);
    files
        .flat_map(|f| {
            ["metrics.jsonl", "train-state.safetensors"].map(|x| work.join(f).with_extension(x))
        })
        .collect()
}

/// Delete [`training_leftovers`]; the last step of stage 8, so a rerun of an interrupted
/// stage 8 finds what it reads (or, once deletion began, the metrics.jsonl made from it).
fn remove_training_leftovers(work: &Path, leftovers: &[PathBuf]) -> Result<()> {
    for f in leftovers {
        match std::fs::remove_file(f) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(Error::io(f, e)),
            _ => {}
        }
    }
    crate::io::sync_dir(&work.join("experts"))
}

/// metrics.jsonl: capability, every training step (moved here from the experts' own logs),
/// every search point and generation, and the test table. Rerun after its leftovers began to
/// be deleted, it keeps the metrics.jsonl already written.
fn write_metrics_log(work: &Path, p: &HandoffParts) -> Result<()> {
    let out = work.join("metrics.jsonl");
    let logs: Vec<PathBuf> = (training_leftovers(work, p).into_iter())
        .filter(|f| f.extension().is_some_and(|x| x == "jsonl"))
        .collect();
    if out.is_file() && logs.iter().any(|l| !l.exists()) {
        return Ok(());
    }
    let mut lines: Vec<serde_json::Value> = Vec::new();
    for (n, a) in p.found.names.iter().zip(&p.found.accuracy) {
        lines.push(serde_json::json!({ format!("stage1/capability/{n}/accuracy"): a }));
    }
    for mp in &logs {
        let text = std::fs::read_to_string(mp).map_err(|err| Error::io(mp, err))?;
        for line in text.lines().filter(|l| !l.trim().is_empty()) {
            let v: serde_json::Value = serde_json::from_str(line)
                .map_err(|err| Error::config(mp, "line", err.to_string()))?;
            lines.push(v);
        }
    }
    if let Some(s) = p.searched {
        for (i, pt) in s.evaluated.iter().enumerate() {
            lines.push(serde_json::json!({
                "stage3/search/evaluation": i, "stage3/search/accuracy": pt.accuracy,
                "stage3/search/kl": pt.kl, "stage3/search/model_ms": pt.model_ms,
                "stage3/search/ms_per_token": pt.ms_per_token,
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
    crate::io::write_atomic(&out, text.as_bytes())
}

/// Write metrics.jsonl, manifest.json, the plots and report.md into `work`.
pub(crate) fn handoff(
    base: &Base,
    model_name: &str,
    cfg: &RunConfig,
    work: &Path,
    records: &[StageRecord],
    p: HandoffParts,
) -> Result<Manifest> {
    write_metrics_log(work, &p)?;
    let leftovers = training_leftovers(work, &p);
    let ck = base.ck();
    let file_bytes = |rel: &str| std::fs::metadata(work.join(rel)).map_or(0, |m| m.len());
    let selection = p.searched.and_then(|s| s.selection.as_ref());
    let mixture = p.searched.zip(selection).and_then(|(s, sel)| {
        let chosen = sel.chosen()?;
        Some(MixtureEntry {
            alpha: chosen.alpha.clone(),
            deployed_form: "hybrid: packed ternary base + rank-k SVF delta (f16 factors)".into(),
            experts: s.experts.clone(),
            file: "experts/mixture.safetensors".into(),
            rank: chosen.rank,
            rule: sel.rule.clone(),
            validation: chosen.clone(),
        })
    });
    let mut notes = vec![
        "Test accuracies are greedy decoding on the held-out test split; the search's \
         validation accuracy is greedy exact match by a teacher-forced pass."
            .to_string(),
    ];
    let dropped: Vec<&str> = (p.experts.iter())
        .filter(|(e, _)| !e.in_mixture)
        .map(|(e, _)| e.name.as_str())
        .collect();
    if let Some(sel) = selection.filter(|s| !s.handed_off) {
        notes.push(format!("No mixture is handed off: {}.", sel.rule));
    }
    if !dropped.is_empty() {
        notes.push(format!(
            "Experts that did not gain more than {:.1} points on validation stay in the library but not in the mixture: {}",
            100.0 * cfg.min_gain,
            dropped.join(", ")
        ));
    }
    let manifest = Manifest {
        format: MANIFEST_FORMAT.into(),
        format_version: FORMAT_VERSION.into(),
        bitsvf_version: env!("CARGO_PKG_VERSION").into(),
        base_model: BaseModel {
            content_hash: base.hash().to_string(),
            file: "model/base.safetensors".into(),
            format: ck.format.name().to_string(),
            name: model_name.to_string(),
        },
        options: cfg.clone(),
        experts: p.experts.iter().map(|(e, _)| e.clone()).collect(),
        classifier: Some(p.classifier),
        mixture,
        metrics: Metrics {
            bytes: ByteCounts {
                base_file: file_bytes("model/base.safetensors"),
                experts_files: p.experts.iter().map(|(e, _)| file_bytes(&e.file)).sum(),
                f32_model: f32_bytes(ck),
                ternary_base_packed: packed_bytes(ck),
            },
            cem_alpha: (p.cem.iter())
                .map(|(k, f)| (k.clone(), f.alpha.clone()))
                .collect(),
            cem: p.cem.clone(),
            thresholds: p.thresholds,
            discovery: p.found.clone(),
            recovery: p.recovery,
            search: p.searched.map(SearchSummary::from),
            stages: records.to_vec(),
            svd: p.svd,
            test: p.table.clone(),
        },
        notes,
    };
    draw_plots(work, &manifest, p.searched)?;
    write_json(&work.join("manifest.json"), &manifest)?;
    let report = report_markdown(&manifest);
    crate::io::write_atomic(&work.join("report.md"), report.as_bytes())?;
    remove_training_leftovers(work, &leftovers)?;
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
        let value: serde_json::Value = read_json(&mp)?;
        check_format(&mp, &value)?;
        let manifest: Manifest = from_json_value(&mp, value)?;
        let file = dir.join(&manifest.base_model.file);
        let ck = crate::engine::checkpoint::load(&file)?;
        let hash = ck.content_hash();
        let want = &manifest.base_model.content_hash;
        if &hash != want {
            return Err(Error::config(
                &mp,
                "base_model.content_hash",
                format!(
                    "{} has content hash {}…, the manifest says {}…",
                    file.display(),
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
        e.check_base_hashed(&self.ck, &self.hash, &path)?;
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
        (self.manifest.classifier.as_ref())
            .map(|c| self.load_expert(&c.file))
            .transpose()
    }

    /// The mixture's experts (in α order), α* and the deployed rank; `None` without a mixture.
    pub fn mixture(&self) -> Result<Option<HandoffMixture>> {
        let Some(m) = &self.manifest.mixture else {
            return Ok(None);
        };
        let mp = self.dir.join("manifest.json");
        let experts = (m.experts.iter())
            .map(|n| {
                let entry = (self.manifest.experts.iter())
                    .find(|e| &e.name == n)
                    .ok_or_else(|| {
                        Error::config(&mp, "mixture.experts", format!("no expert named `{n}`"))
                    })?;
                self.load_expert(&entry.file)
            })
            .collect::<Result<Vec<_>>>()?;
        if m.alpha.len() != experts.len() {
            return Err(Error::config(
                &mp,
                "mixture.alpha",
                format!("{} weights for {} experts", m.alpha.len(), experts.len()),
            ));
        }
        Ok(Some(HandoffMixture {
            experts,
            alpha: m.alpha.clone(),
            rank: m.rank,
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
            m.base_model.name,
            m.base_model.format,
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
        let table = &m.metrics.test;
        s += &format!(
            "\ntest accuracy (%), mean over {} domains:\n",
            table.accuracy.len()
        );
        for c in &table.columns {
            if let Some(mean) = table.mean(c) {
                s += &format!("  {c:<28} {:>5.1}\n", 100.0 * mean);
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

/// The figures side by side as a text table, those that differ marked.
pub fn reproduced_table(rows: &[Reproduced]) -> String {
    let mut s = format!(
        "{:<12} {:<26} {:>9} {:>9}\n",
        "domain", "form", "manifest", "measured"
    );
    for r in rows {
        s += &format!(
            "{:<12} {:<26} {:>8.1}% {:>8.1}%{}\n",
            r.domain,
            r.column,
            100.0 * r.manifest,
            100.0 * r.measured,
            if r.manifest == r.measured {
                ""
            } else {
                "  ← differs"
            }
        );
    }
    s
}

/// Re-measure the mixture columns of the handoff's test table (same items, same forms).
pub fn reproduce(
    h: &Handoff,
    tok: &dyn Tokenizer,
    cache: &SvdCache,
    mut progress: impl FnMut(usize, usize),
) -> Result<Vec<Reproduced>> {
    let mp = h.dir.join("manifest.json");
    let table = &h.manifest.metrics.test;
    let HandoffMixture {
        experts,
        alpha,
        rank,
    } = h.mixture()?.ok_or_else(|| {
        Error::Input(format!(
            "{} has no mixture: no expert gained, or none beat the base on the selection \
             split by more than its noise (see its notes)",
            h.dir.display()
        ))
    })?;
    let sources = h.sources()?;
    let base = h.base(cache);
    let mut mixer = Mixer::new(&base, experts.clone())?;
    let mut deployer = Deployer::new(&base, &experts)?;
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

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest_dir(version: Option<&str>) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let fixture =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/handoff-0.1/manifest.json");
        let mut v: serde_json::Value = read_json(&fixture).unwrap();
        if let Some(version) = version {
            v["format_version"] = version.into();
        }
        let path = dir.path().join("manifest.json");
        write_json(&path, &v).unwrap();
        (dir, path)
    }

    #[test]
    fn a_manifest_without_a_version_is_1_0_and_reads_back_as_written() {
        let (_d, path) = manifest_dir(None);
        let value: serde_json::Value = read_json(&path).unwrap();
        check_format(&path, &value).unwrap();
        let m: Manifest = from_json_value(&path, value.clone()).unwrap();
        assert_eq!(m.format_version, FIRST_FORMAT_VERSION);
        // Written again by the same types: the same JSON, plus the version.
        let mut again = serde_json::to_value(&m).unwrap();
        again.as_object_mut().unwrap().remove("format_version");
        for e in again["experts"].as_array_mut().unwrap() {
            e["training"].as_object_mut().unwrap().remove("val_curve");
        }
        (again["classifier"]["training"].as_object_mut().unwrap()).remove("val_curve");
        // Points gained their modelled latency in 1.2.
        let strip = |p: &mut serde_json::Value| {
            let p = p.as_object_mut().unwrap();
            p.remove("model_ms");
            p.remove("work");
        };
        (again["metrics"]["search"]["front"].as_array_mut().unwrap())
            .iter_mut()
            .for_each(strip);
        strip(&mut again["metrics"]["search"]["base"]);
        strip(&mut again["mixture"]["validation"]);
        again["metrics"]
            .as_object_mut()
            .unwrap()
            .remove("thresholds");
        // And settings with defaults.
        let options = again["options"].as_object_mut().unwrap();
        options.remove("classifier_steps");
        options.remove("select_n");
        let search = options["search"].as_object_mut().unwrap();
        search.remove("select_candidates");
        search.remove("select_z");
        search.remove("hand_off_within_noise");
        assert_eq!(again, value);
    }

    #[test]
    fn manifests_serialize_deterministically_with_sorted_metrics() {
        let (_d, path) = manifest_dir(None);
        let m: Manifest = read_json(&path).unwrap();
        let a = serde_json::to_string_pretty(&m).unwrap();
        assert_eq!(a, serde_json::to_string_pretty(&m).unwrap());
        let metrics = a.find("\"metrics\"").unwrap();
        let keys = [
            "\"bytes\"",
            "\"cem_alpha\"",
            "\"discovery\"",
            "\"recovery\"",
        ];
        let at: Vec<usize> = keys.iter().map(|k| a[metrics..].find(k).unwrap()).collect();
        assert!(at.windows(2).all(|w| w[0] < w[1]), "{at:?}");
    }

    #[test]
    fn a_newer_minor_version_reads_and_another_major_is_a_clear_error() {
        let (_d, path) = manifest_dir(Some("1.7"));
        check_format(&path, &read_json(&path).unwrap()).unwrap();
        for bad in ["2.0", "one", "1"] {
            let (d, _) = manifest_dir(Some(bad));
            let err = Handoff::open(d.path()).err().unwrap().to_string();
            assert!(
                err.contains("manifest.json") && err.contains("format_version"),
                "{bad}: {err}"
            );
        }
    }
}
