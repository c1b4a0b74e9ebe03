//! report.md, the run's summary for a reader: its tables, and the figures it shows (drawn with
//! [`crate::pipeline::plot`] into `plots/`), all from the typed manifest.

use crate::adapt::mixture_search::SearchReport;
use crate::error::Result;
use crate::pipeline::handoff::{short, Manifest, MixtureEntry, SearchSummary};
use crate::pipeline::plot::{self, Labels, Series};
use std::path::Path;

/// Draw the run's figures into `work/plots/`: every figure from the manifest, but the Pareto
/// plot, which shows every point the search evaluated (`searched`).
pub(crate) fn draw_plots(work: &Path, m: &Manifest, searched: Option<&SearchReport>) -> Result<()> {
    let (table, found, records) = (&m.metrics.test, &m.metrics.discovery, &m.metrics.stages);
    // Step 0 is the base model, measured on the same validation items.
    let curves: Vec<Series<(f64, f64)>> = (m.experts.iter().chain(&m.classifier))
        .map(|e| Series {
            name: e.name.clone(),
            values: [(0.0, e.base_val_accuracy)]
                .into_iter()
                .chain((e.training.val_curve.iter()).map(|&(step, a)| (step as f64, a)))
                .collect(),
        })
        .collect();
    let domains: Vec<String> = table.accuracy.keys().cloned().collect();
    let series: Vec<Series<f64>> = table
        .columns
        .iter()
        .map(|c| Series {
            name: c.clone(),
            values: domains
                .iter()
                .map(|d| 100.0 * table.accuracy[d].get(c).copied().unwrap_or(f64::NAN))
                .collect(),
        })
        .collect();
    plot::bars(
        &work.join("plots/capability.png"),
        Labels::new("Test accuracy per domain", "", "accuracy (%)"),
        &domains,
        &series,
    )?;
    plot::bars(
        &work.join("plots/discovery.png"),
        Labels::new("Base model capability (validation)", "", "accuracy (%)"),
        &found.names,
        &[Series {
            name: "base".into(),
            values: found.accuracy.iter().map(|a| 100.0 * a).collect(),
        }],
    )?;
    plot::lines(
        &work.join("plots/training.png"),
        Labels::new("Validation accuracy while training", "step", "accuracy"),
        &curves,
    )?;
    if let Some(s) = searched {
        let all: Vec<(f64, f64)> = s.evaluated.iter().map(|q| (q.kl, q.accuracy)).collect();
        let front: Vec<(f64, f64)> = s.front.iter().map(|q| (q.kl, q.accuracy)).collect();
        plot::scatter(
            &work.join("plots/pareto.png"),
            Labels::new(
                "Mixture search: accuracy vs KL drift",
                "KL(base ‖ deployed) per token",
                "validation accuracy",
            ),
            &[
                Series {
                    name: "evaluated".into(),
                    values: all,
                },
                Series {
                    name: "Pareto front".into(),
                    values: front,
                },
            ],
            (s.selection.as_ref().and_then(|x| x.chosen())).map(|c| (c.kl, c.accuracy)),
        )?;
        plot::lines(
            &work.join("plots/hypervolume.png"),
            Labels::new("Hypervolume per generation", "generation", "hypervolume"),
            &[Series {
                name: "first front".into(),
                values: s
                    .history
                    .iter()
                    .map(|g| (g.generation as f64, g.hypervolume))
                    .collect(),
            }],
        )?;
    }
    let stage_names: Vec<String> = records.iter().map(|r| r.name.clone()).collect();
    plot::bars(
        &work.join("plots/memory.png"),
        Labels::new("Peak resident memory per stage", "", "MB"),
        &stage_names,
        &[Series {
            name: "peak RSS".into(),
            values: records
                .iter()
                .map(|r| r.peak_rss_mb.unwrap_or(f64::NAN))
                .collect(),
        }],
    )?;

    Ok(())
}

fn pct(a: Option<&f64>) -> String {
    a.map_or("—".into(), |a| format!("{:.1}", 100.0 * a))
}

/// report.md: the tables and the plots.
pub(crate) fn report_markdown(m: &Manifest) -> String {
    let (table, found, records) = (&m.metrics.test, &m.metrics.discovery, &m.metrics.stages);
    let mut s = format!(
        "# bitsvf run report\n\nBase model `{}` (content hash `{}…`).\n\n",
        m.base_model.name,
        short(&m.base_model.content_hash)
    );
    s += "## Stage 1: capability and discovery\n\n![capability](plots/discovery.png)\n\n";
    s += &format!("{}\n\n", found.grouping.reason);
    s += "## Stage 2: experts\n\n| expert | domains | base val | expert val | steps | in mixture |\n|---|---|---|---|---|---|\n";
    for e in m.experts.iter().chain(&m.classifier) {
        s += &format!(
            "| {} | {} | {:.1} | {:.1} | {} | {} |\n",
            e.name,
            e.domains.join(", "),
            100.0 * e.base_val_accuracy,
            100.0 * e.val_accuracy,
            e.training.steps,
            if e.in_mixture { "yes" } else { "no" }
        );
    }
    s += "\n![training](plots/training.png)\n\n## Stage 3: mixture search\n\n";
    match &m.metrics.search {
        Some(r) => s += &search_section(r, m.mixture.as_ref()),
        None => s += "No expert gained on validation, so there is no mixture.\n\n",
    }
    s += &format!(
        "## Test accuracy (%), {} items per domain\n\n| domain | {} |\n|---|{}\n",
        table.n,
        table.columns.join(" | "),
        "---|".repeat(table.columns.len())
    );
    for (d, row) in &table.accuracy {
        let cells: Vec<String> = table.columns.iter().map(|c| pct(row.get(c))).collect();
        s += &format!("| {d} | {} |\n", cells.join(" | "));
    }
    let cells: Vec<String> = (table.columns.iter())
        .map(|c| pct(table.mean(c).as_ref()))
        .collect();
    s += &format!("| **mean** | {} |\n\n", cells.join(" | "));
    s += &dispatch_section(m);
    s += "\n![test](plots/capability.png)\n\n## Time and memory per stage\n\n| stage | wall time (s) | peak RSS (MB) |\n|---|---|---|\n";
    for r in records {
        s += &format!(
            "| {} | {:.1} | {} |\n",
            r.name,
            r.seconds,
            r.peak_rss_mb.map_or("—".into(), |m| format!("{m:.0}"))
        );
    }
    s += "\n![memory](plots/memory.png)\n\n## Notes\n\n";
    for n in &m.notes {
        s += &format!("- {n}\n");
    }
    s
}

/// Stage 3 of report.md: the search, the candidates on the selection split and the choice.
fn search_section(r: &SearchSummary, mix: Option<&MixtureEntry>) -> String {
    let mut s = format!(
        "NSGA-II, {} evaluations in {:.0} s; final front of {} points. Base on the search's \
         validation items: {:.1}%, {:.2} ms/token modelled ({:.2} measured), {:.2} MB.\n\n",
        r.evaluations,
        r.seconds,
        r.front.len(),
        100.0 * r.base.accuracy,
        r.base.model_ms,
        r.base.ms_per_token,
        r.base.bytes as f64 / 1e6,
    );
    if let Some(sel) = &r.selection {
        s += &format!(
            "Front candidates re-scored on the selection split ({} items, disjoint from the \
             search's; base {:.1}%):\n\n| α | rank | search val | selection | gain ± se |\n|---|---|---|---|---|\n",
            sel.n,
            100.0 * sel.base_accuracy
        );
        for c in &sel.candidates {
            s += &format!(
                "| [{}] | {} | {:.1} | {:.1} | {:+.1} ± {:.1} |\n",
                (c.point.alpha.iter())
                    .map(|a| format!("{a:.2}"))
                    .collect::<Vec<_>>()
                    .join(", "),
                c.point.rank,
                100.0 * c.point.accuracy,
                100.0 * c.accuracy,
                100.0 * c.gain,
                100.0 * c.se
            );
        }
        s += &format!("\nRule: {}.\n\n", sel.rule);
    }
    if let Some(mix) = mix {
        s += &format!(
            "Handed off: α = [{}] over [{}], rank {}: validation accuracy {:.1}%, KL {:.4}, {:.2} \
             ms/token modelled, {:.2} MB.\n\n",
            (mix.alpha.iter())
                .map(|a| format!("{a:.2}"))
                .collect::<Vec<_>>()
                .join(", "),
            mix.experts.join(", "),
            mix.rank,
            100.0 * mix.validation.accuracy,
            mix.validation.kl,
            mix.validation.model_ms,
            mix.validation.bytes as f64 / 1e6,
        );
    } else {
        s += "No mixture is handed off: the adapted model is the base, with the experts and the \
              dispatch.\n\n";
    }
    s + "![pareto](plots/pareto.png)\n\n![hypervolume](plots/hypervolume.png)\n\n"
}

/// Below this share of the oracle's gain, prompt dispatch is reported as unsuitable.
const UNSUITABLE_SHARE: f64 = 0.5;

/// The configurations against the base and the oracle (the best single expert per domain),
/// with the routing accuracy of the per-prompt strategies.
fn dispatch_section(m: &Manifest) -> String {
    let table = &m.metrics.test;
    let expert_domains: Vec<String> = m.experts.iter().flat_map(|e| e.domains.clone()).collect();
    let mut s = format!(
        "Against the base on the {} expert domains (mean {:.1}%) and the oracle — the best \
         single expert per domain:\n\n| configuration | expert domains | all domains | share of \
         the oracle's gain | worst loss vs base | routing |\n|---|---|---|---|---|---|\n",
        expert_domains.len(),
        100.0 * table.mean_over(crate::pipeline::table::columns::BASE, &expert_domains)
    );
    let summary = table.summary(&expert_domains);
    for c in &summary {
        let strategy = c.column.strip_prefix("dispatch: ");
        let routing = strategy
            .and_then(|k| table.routing.get(k))
            .map_or("—".to_string(), |r| format!("{:.1}%", 100.0 * r));
        s += &format!(
            "| {} | {:.1} | {:.1} | {} | {} | {} |\n",
            c.column,
            100.0 * c.expert_mean,
            100.0 * c.all_mean,
            c.oracle_share
                .map_or("—".to_string(), |x| format!("{:.0}%", 100.0 * x)),
            if c.worst_loss.0 > 0.0 {
                format!("{:.1} ({})", 100.0 * c.worst_loss.0, c.worst_loss.1)
            } else {
                "none".to_string()
            },
            routing
        );
    }
    let kept: Vec<&str> = (m.metrics.cem.iter())
        .filter(|(_, f)| f.keeps_base)
        .map(|(d, _)| d.as_str())
        .collect();
    if !kept.is_empty() {
        s += &format!(
            "\nCEM keeps the base on {} of {} domains (its mixture did not beat the base on \
             held-out shots): {}.\n",
            kept.len(),
            m.metrics.cem.len(),
            kept.join(", ")
        );
    }
    let prompt = summary.iter().find(|c| c.column == "dispatch: prompt");
    let share = prompt.and_then(|c| c.oracle_share);
    if let (Some(share), Some(&r)) = (share, table.routing.get("prompt")) {
        if share < UNSUITABLE_SHARE {
            s += &format!(
                "\nPrompt dispatch is unsuitable for this model: asked to name the skill, the base \
                 keeps {:.0}% of the oracle's gain (routing {:.1}% of test prompts right, mostly \
                 by keeping the base below its calibrated confidence); a small task model does not \
                 know its own task. Use the classifier.\n",
                100.0 * share,
                100.0 * r,
            );
        }
    }
    s
}
