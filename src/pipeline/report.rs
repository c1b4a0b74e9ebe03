//! report.md, the run's summary for a reader: its tables, and the figures it shows (drawn with
//! [`crate::pipeline::plot`] into `plots/`), all from the typed manifest.

use crate::adapt::mixture_search::SearchReport;
use crate::error::Result;
use crate::pipeline::handoff::{short, Manifest};
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
            Some((s.chosen.kl, s.chosen.accuracy)),
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
    if let (Some(mix), Some(r)) = (&m.mixture, &m.metrics.search) {
        s += &format!(
            "NSGA-II, {} evaluations in {:.0} s; final front of {} points. Chosen: α = [{}] over [{}], rank {}: validation accuracy {:.1}%, KL {:.4}, {:.2} ms/token, {:.2} MB (base: {:.1}%, {:.2} ms/token, {:.2} MB). Rule: {}.\n\n![pareto](plots/pareto.png)\n\n![hypervolume](plots/hypervolume.png)\n\n",
            r.evaluations,
            r.seconds,
            r.front.len(),
            mix.alpha.iter().map(|a| format!("{a:.2}")).collect::<Vec<_>>().join(", "),
            mix.experts.join(", "),
            mix.rank,
            100.0 * mix.validation.accuracy,
            mix.validation.kl,
            mix.validation.ms_per_token,
            mix.validation.bytes as f64 / 1e6,
            100.0 * r.base.accuracy,
            r.base.ms_per_token,
            r.base.bytes as f64 / 1e6,
            mix.rule
        );
    } else {
        s += "No expert gained on validation, so there is no mixture.\n\n";
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
    for (k, v) in &table.routing {
        s += &format!("Routing accuracy of `{k}` dispatch: {:.1}%.\n", 100.0 * v);
    }
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
