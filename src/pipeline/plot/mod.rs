//! The report's plots: grouped bars (accuracy per domain, memory per stage), lines (training
//! curves, hypervolume per generation) and scatters (evaluated genomes against the Pareto
//! front), written as PNG files for `report.md`.
//!
//! Text is drawn with DejaVu Sans, embedded in the binary from `assets/fonts/DejaVuSans.ttf`
//! (Bitstream Vera licence, `assets/fonts/LICENSE-DejaVu.txt`) and registered with plotters'
//! `ab_glyph` backend, because CI machines have no system fonts for `font-kit` to find.
//!
//! Every function tolerates the data a real run produces: empty series, a single point, all
//! values equal (the axis is widened to a non-zero span) and NaN or infinite values (skipped).
//! Files are written to a temporary sibling and renamed, so a failed render leaves no
//! half-written PNG behind.

use crate::error::{Error, Result};
use plotters::coord::types::RangedCoordf64;
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// One named series of a plot: a bar group's member, a line, or a point cloud.
#[derive(Debug, Clone, PartialEq)]
pub struct Series<T> {
    /// The name shown in the legend.
    pub name: String,
    /// The values: one per category for [`bars`], `(x, y)` points for [`lines`] and
    /// [`scatter`]. Non-finite values are skipped.
    pub values: Vec<T>,
}

/// Image size in pixels: wide enough for six domain groups of four bars with readable labels.
const SIZE_PX: (u32, u32) = (900, 500);

/// The family name the bundled font is registered under. Plotters' own defaults (tick labels,
/// legend) ask for "sans-serif", so registering it there covers every piece of text.
const FONT: &str = "sans-serif";
/// Text heights in pixels.
const TITLE_PX: u32 = 24;
const AXIS_DESC_PX: u32 = 18;
const LABEL_PX: u32 = 15;

/// DejaVu Sans 2.x as shipped in matplotlib's `mpl-data/fonts/ttf`.
static DEJAVU_SANS: &[u8] = include_bytes!("../../../assets/fonts/DejaVuSans.ttf");

/// Tableau 10: distinct under the common colour-vision deficiencies and on white paper.
const PALETTE: [RGBColor; 10] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
    RGBColor(188, 189, 34),
    RGBColor(23, 190, 207),
];

/// Lines with at most this many points also get a marker per point, so a one-point series
/// (a single evaluation, one generation) is visible and sparse curves show where data lies.
const MARKER_MAX_POINTS: usize = 40;

/// A plot's title and axis descriptions (a bar chart has no x description).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Labels<'a> {
    /// The caption above the plot.
    pub title: &'a str,
    /// The x axis description.
    pub x: &'a str,
    /// The y axis description.
    pub y: &'a str,
}

impl<'a> Labels<'a> {
    /// The labels `title`, `x`, `y`.
    pub fn new(title: &'a str, x: &'a str, y: &'a str) -> Self {
        Labels { title, x, y }
    }
}

/// A grouped bar chart: one group per category, one bar per series, y from 0 to the largest
/// value × (1.1 + 0.09 per series beyond the first, room for the legend).
/// `series[s].values[i]` is series `s`'s value in `categories[i]`; missing,
/// non-finite and negative values draw no bar.
///
/// Errors name `path`: its directory is missing or unwritable, or drawing failed.
pub fn bars(
    path: &Path,
    labels: Labels,
    categories: &[String],
    series: &[Series<f64>],
) -> Result<()> {
    write_png(path, |root| draw_bars(root, labels, categories, series))
}

/// A line chart with one line per series and a legend, e.g. validation accuracy against step
/// per expert. Points are joined in the order given.
///
/// Errors name `path`: its directory is missing or unwritable, or drawing failed.
pub fn lines(path: &Path, labels: Labels, series: &[Series<(f64, f64)>]) -> Result<()> {
    write_png(path, |root| draw_lines(root, labels, series))
}

/// A scatter plot with one point cloud per series and a legend, e.g. every evaluated genome
/// against the Pareto front. `highlight`, when given, is drawn as a large ringed cross
/// labelled "chosen" on top of the clouds.
///
/// Errors name `path`: its directory is missing or unwritable, or drawing failed.
pub fn scatter(
    path: &Path,
    labels: Labels,
    series: &[Series<(f64, f64)>],
    highlight: Option<(f64, f64)>,
) -> Result<()> {
    write_png(path, |root| draw_scatter(root, labels, series, highlight))
}

/// What drawing on backend `DB` returns.
type Drawn<T, DB> = std::result::Result<T, DrawingAreaErrorKind<<DB as DrawingBackend>::ErrorType>>;
type DrawResult<DB> = Drawn<(), DB>;

/// A whole PNG image being drawn, and what drawing on it returns.
type Bitmap<'a> = DrawingArea<BitMapBackend<'a>, Shift>;
type BitmapResult = DrawResult<BitMapBackend<'static>>;

/// A chart with two linear `f64` axes, as [`lines`] and [`scatter`] draw.
type XyChart<'a, DB> = ChartContext<'a, DB, Cartesian2d<RangedCoordf64, RangedCoordf64>>;

fn draw_bars<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    labels: Labels,
    categories: &[String],
    series: &[Series<f64>],
) -> DrawResult<DB> {
    root.fill(&WHITE)?;
    let n_categories = categories.len().max(1);
    let y_max = series
        .iter()
        .flat_map(|s| s.values.iter().take(categories.len()))
        .copied()
        .filter(|v| v.is_finite())
        .fold(0.0_f64, f64::max);
    // Headroom for the legend above the bars: one line per series beyond the first.
    let headroom = 1.1 + 0.09 * series.len().saturating_sub(1) as f64;
    let y_top = if y_max > 0.0 { y_max * headroom } else { 1.0 };
    let mut chart = ChartBuilder::on(root)
        .caption(labels.title, (FONT, TITLE_PX))
        .margin(15)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(0.0..n_categories as f64, 0.0..y_top)?;
    // Plotters picks x ticks by value, not at group centres, so the category names are drawn
    // by hand below the axis instead.
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(0)
        .y_label_formatter(&tick_label)
        .y_desc(labels.y)
        .label_style((FONT, LABEL_PX))
        .axis_desc_style((FONT, AXIS_DESC_PX))
        .draw()?;
    let name_style =
        TextStyle::from((FONT, LABEL_PX).into_font()).pos(Pos::new(HPos::Center, VPos::Top));
    for (i, name) in categories.iter().enumerate() {
        let (x_px, y_px) = chart.backend_coord(&(i as f64 + 0.5, 0.0));
        root.draw(&Text::new(name.as_str(), (x_px, y_px + 8), &name_style))?;
    }

    // Each group fills 80% of its unit slot, split evenly between the series.
    let bar_width = 0.8 / series.len().max(1) as f64;
    let mut tops = Vec::new();
    for (s, one) in series.iter().enumerate() {
        let color = PALETTE[s % PALETTE.len()];
        let rects: Vec<_> = one
            .values
            .iter()
            .take(categories.len())
            .enumerate()
            .filter(|(_, v)| v.is_finite() && **v > 0.0)
            .map(|(i, &v)| {
                let x0 = i as f64 + 0.1 + s as f64 * bar_width;
                tops.push((x0 + bar_width / 2.0, v));
                Rectangle::new([(x0, 0.0), (x0 + bar_width, v)], color.filled())
            })
            .collect();
        chart
            .draw_series(rects)?
            .label(one.name.as_str())
            .legend(move |(x, y)| Rectangle::new([(x, y - 6), (x + 14, y + 6)], color.filled()));
    }
    // A bar fills its column down to 0, so only the top corners can be free: take the one
    // with fewer bars reaching into the upper half.
    let x_mid = n_categories as f64 / 2.0;
    let tall = |left: bool| {
        tops.iter()
            .filter(|&&(x, v)| (x < x_mid) == left && v >= y_top / 2.0)
            .count()
    };
    let corner = if tall(true) < tall(false) {
        SeriesLabelPosition::UpperLeft
    } else {
        SeriesLabelPosition::UpperRight
    };
    draw_legend(&mut chart, corner, !series.is_empty())?;
    root.present()
}

fn draw_lines<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    labels: Labels,
    series: &[Series<(f64, f64)>],
) -> DrawResult<DB> {
    let points: Vec<Vec<(f64, f64)>> = series.iter().map(|s| finite(&s.values)).collect();
    let all: Vec<(f64, f64)> = points.iter().flatten().copied().collect();
    let (mut chart, corner) = cartesian(root, labels, &all)?;
    for (s, (one, points)) in series.iter().zip(&points).enumerate() {
        let color = PALETTE[s % PALETTE.len()];
        let marker_px = if points.len() <= MARKER_MAX_POINTS {
            3
        } else {
            0
        };
        chart
            .draw_series(
                LineSeries::new(points.iter().copied(), color.stroke_width(2))
                    .point_size(marker_px),
            )?
            .label(one.name.as_str())
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 18, y)], color.stroke_width(2)));
    }
    draw_legend(&mut chart, corner, !series.is_empty())?;
    root.present()
}

fn draw_scatter<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    labels: Labels,
    series: &[Series<(f64, f64)>],
    highlight: Option<(f64, f64)>,
) -> DrawResult<DB> {
    let points: Vec<Vec<(f64, f64)>> = series.iter().map(|s| finite(&s.values)).collect();
    let highlight = highlight.filter(|(x, y)| x.is_finite() && y.is_finite());
    let all: Vec<(f64, f64)> = points.iter().flatten().chain(&highlight).copied().collect();
    let (mut chart, corner) = cartesian(root, labels, &all)?;
    for (s, (one, points)) in series.iter().zip(&points).enumerate() {
        let color = PALETTE[s % PALETTE.len()];
        chart
            .draw_series(
                points
                    .iter()
                    .map(|&p| Circle::new(p, 4, color.mix(0.75).filled())),
            )?
            .label(one.name.as_str())
            .legend(move |(x, y)| Circle::new((x + 7, y), 4, color.filled()));
    }
    if let Some(p) = highlight {
        chart
            .draw_series([
                Circle::new(p, 11, BLACK.stroke_width(3)).into_dyn(),
                Cross::new(p, 6, BLACK.stroke_width(2)).into_dyn(),
            ])?
            .label("chosen")
            .legend(|(x, y)| Circle::new((x + 7, y), 6, BLACK.stroke_width(2)));
    }
    draw_legend(
        &mut chart,
        corner,
        !series.is_empty() || highlight.is_some(),
    )?;
    root.present()
}

/// The shared frame of [`lines`] and [`scatter`] on a white page: title, labelled axes
/// spanning `all` points, light grid; and the corner where the legend hides the fewest points.
fn cartesian<'a, DB: DrawingBackend>(
    root: &'a DrawingArea<DB, Shift>,
    labels: Labels,
    all: &[(f64, f64)],
) -> Drawn<(XyChart<'a, DB>, SeriesLabelPosition), DB> {
    root.fill(&WHITE)?;
    let (x_range, y_range) = (
        axis_range(all.iter().map(|p| p.0)),
        axis_range(all.iter().map(|p| p.1)),
    );
    let corner = emptiest_corner(all, &x_range, &y_range);
    let mut chart = ChartBuilder::on(root)
        .caption(labels.title, (FONT, TITLE_PX))
        .margin(15)
        .x_label_area_size(50)
        .y_label_area_size(70)
        .build_cartesian_2d(x_range.clone(), y_range.clone())?;
    chart
        .configure_mesh()
        .x_label_formatter(&tick_label)
        .y_label_formatter(&tick_label)
        .x_desc(labels.x)
        .y_desc(labels.y)
        .label_style((FONT, LABEL_PX))
        .axis_desc_style((FONT, AXIS_DESC_PX))
        .draw()?;
    Ok((chart, corner))
}

fn draw_legend<'a, DB: DrawingBackend + 'a, CT: CoordTranslate>(
    chart: &mut ChartContext<'a, DB, CT>,
    corner: SeriesLabelPosition,
    any_labels: bool,
) -> DrawResult<DB> {
    if !any_labels {
        return Ok(());
    }
    chart
        .configure_series_labels()
        .position(corner)
        .label_font((FONT, LABEL_PX))
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()
}

/// A short tick label: plotters' default prints every digit of the tick value, which turns
/// byte counts into overlapping "10000000.0" and float noise into "0.30000000000000004".
fn tick_label(v: &f64) -> String {
    let v = *v;
    let magnitude = v.abs();
    if magnitude >= 1e4 {
        let (scaled, suffix) = if magnitude >= 1e9 {
            (v / 1e9, "G")
        } else if magnitude >= 1e6 {
            (v / 1e6, "M")
        } else {
            (v / 1e3, "k")
        };
        format!("{}{suffix}", trim_decimals(scaled, 2))
    } else if magnitude != 0.0 && magnitude < 1e-3 {
        format!("{v:.1e}")
    } else {
        trim_decimals(v, 4)
    }
}

/// `v` with at most `decimals` decimals and no trailing zeros ("0.5", "100", "-0" → "0").
fn trim_decimals(v: f64, decimals: usize) -> String {
    let fixed = format!("{v:.decimals$}");
    let trimmed = if fixed.contains('.') {
        fixed.trim_end_matches('0').trim_end_matches('.')
    } else {
        &fixed
    };
    if trimmed == "-0" {
        "0".into()
    } else {
        trimmed.into()
    }
}

/// The points of `values` with both coordinates finite.
fn finite(values: &[(f64, f64)]) -> Vec<(f64, f64)> {
    values
        .iter()
        .copied()
        .filter(|(x, y)| x.is_finite() && y.is_finite())
        .collect()
}

/// An axis range covering the finite `values` with a 5% margin each side. Plotters needs a
/// non-empty range, so no values give 0..1 and equal values get ±10% of their size (±1 at 0).
fn axis_range(values: impl Iterator<Item = f64>) -> Range<f64> {
    let (lo, hi) = values
        .filter(|v| v.is_finite())
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
            (lo.min(v), hi.max(v))
        });
    if lo > hi {
        return 0.0..1.0;
    }
    if lo == hi {
        let pad = if lo == 0.0 { 1.0 } else { lo.abs() * 0.1 };
        return (lo - pad)..(hi + pad);
    }
    let margin = (hi - lo) * 0.05;
    if margin.is_finite() {
        (lo - margin)..(hi + margin)
    } else {
        lo..hi
    }
}

/// The plot corner holding the fewest of `points`, where the legend hides the least data.
fn emptiest_corner(
    points: &[(f64, f64)],
    x_range: &Range<f64>,
    y_range: &Range<f64>,
) -> SeriesLabelPosition {
    // Counts per corner, in order of preference on a tie: upper right (where readers look
    // first, and where an empty plot puts it), then lower right (free under rising curves).
    let x_mid = x_range.start / 2.0 + x_range.end / 2.0;
    let y_mid = y_range.start / 2.0 + y_range.end / 2.0;
    let corners = [
        SeriesLabelPosition::UpperRight,
        SeriesLabelPosition::LowerRight,
        SeriesLabelPosition::UpperLeft,
        SeriesLabelPosition::LowerLeft,
    ];
    let mut counts = [0_usize; 4];
    for &(x, y) in points {
        counts[match (y >= y_mid, x >= x_mid) {
            (true, true) => 0,
            (false, true) => 1,
            (true, false) => 2,
            (false, false) => 3,
        }] += 1;
    }
    let best = (0..4).min_by_key(|&i| counts[i]).unwrap_or(0);
    corners[best].clone()
}

/// Register the bundled font with plotters, once per process; `false` if it failed to parse.
fn font_registered() -> bool {
    static REGISTERED: OnceLock<bool> = OnceLock::new();
    *REGISTERED.get_or_init(|| {
        plotters::style::register_font(FONT, FontStyle::Normal, DEJAVU_SANS).is_ok()
    })
}

/// A sibling of `path` to render into before the rename: the atomic writers' temporary name
/// with `.png` kept at the end, because plotters' encoder picks the format from the name.
fn temp_sibling(path: &Path) -> PathBuf {
    let mut name = crate::engine::checkpoint::st::temp_sibling(path).into_os_string();
    name.push(".png");
    PathBuf::from(name)
}

/// Render with `draw` into a temporary sibling of `path`, then rename it over `path`.
fn write_png<F>(path: &Path, draw: F) -> Result<()>
where
    F: FnOnce(&Bitmap<'_>) -> BitmapResult,
{
    let failed = |msg: String| Error::io(path, std::io::Error::other(msg));
    if !font_registered() {
        return Err(failed(
            "cannot draw the plot: the bundled font assets/fonts/DejaVuSans.ttf is not a valid \
             TrueType font; rebuild from an intact checkout"
                .into(),
        ));
    }
    crate::io::check_writable(path)?;
    let tmp = temp_sibling(path);
    // Creating the file first turns an unwritable directory into a plain I/O error naming
    // `path`, rather than an image-encoder error after the whole render.
    std::fs::File::create(&tmp).map_err(|e| Error::io(path, e))?;
    let drawn = {
        let root = BitMapBackend::new(&tmp, SIZE_PX).into_drawing_area();
        draw(&root).map_err(|e| e.to_string())
        // The backend is dropped here; after a failed draw its `Drop` may still write `tmp`.
    };
    if let Err(e) = drawn {
        let _ = std::fs::remove_file(&tmp);
        return Err(failed(format!("cannot draw the plot: {e}")));
    }
    let synced = std::fs::File::open(&tmp).and_then(|f| f.sync_all());
    synced
        .and_then(|()| std::fs::rename(&tmp, path))
        .map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            Error::io(path, e)
        })?;
    crate::io::sync_dir(crate::io::parent_of(path))
}

#[cfg(test)]
mod tests;
