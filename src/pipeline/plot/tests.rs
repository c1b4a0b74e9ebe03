//! Tests of the plots: every chart kind renders a PNG, and failures leave no file behind.

use super::*;

const PNG_SIGNATURE: [u8; 8] = [0x89, b'P', b'N', b'G', b'\r', b'\n', 0x1a, b'\n'];

fn named<T: Clone>(name: &str, values: &[T]) -> Series<T> {
    Series {
        name: name.into(),
        values: values.to_vec(),
    }
}

fn domains() -> Vec<String> {
    ["math", "code", "reasoning"].map(String::from).to_vec()
}

fn accuracy() -> Vec<Series<f64>> {
    vec![
        named("base", &[0.30, 0.20, 0.40]),
        named("mixture", &[0.45, 0.35, 0.50]),
    ]
}

fn curves() -> Vec<Series<(f64, f64)>> {
    vec![
        named("math", &[(0.0, 0.1), (100.0, 0.3), (200.0, 0.45)]),
        named("code", &[(0.0, 0.2), (100.0, 0.25), (200.0, 0.3)]),
    ]
}

/// Draw into an in-memory RGB buffer, the same code path the files take.
fn render(draw: impl FnOnce(&Bitmap<'_>) -> BitmapResult) -> Vec<u8> {
    assert!(font_registered());
    let mut rgb = vec![0_u8; (SIZE_PX.0 * SIZE_PX.1 * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut rgb, SIZE_PX).into_drawing_area();
        draw(&root).unwrap();
    }
    rgb
}

fn pixel(rgb: &[u8], x: u32, y: u32) -> [u8; 3] {
    let i = ((y * SIZE_PX.0 + x) * 3) as usize;
    [rgb[i], rgb[i + 1], rgb[i + 2]]
}

/// Non-white pixels in rows `rows` of the image.
fn ink(rgb: &[u8], rows: Range<u32>) -> usize {
    rows.flat_map(|y| (0..SIZE_PX.0).map(move |x| (x, y)))
        .filter(|&(x, y)| pixel(rgb, x, y) != [255, 255, 255])
        .count()
}

/// Pixels of exactly `color`.
fn count_color(rgb: &[u8], color: RGBColor) -> usize {
    rgb.chunks_exact(3)
        .filter(|p| *p == [color.0, color.1, color.2])
        .count()
}

/// The longest vertical run of `color` in columns `xs`.
fn tallest_run(rgb: &[u8], color: RGBColor, xs: Range<u32>) -> u32 {
    let mut best = 0;
    for x in xs {
        let mut run = 0;
        for y in 0..SIZE_PX.1 {
            run = if pixel(rgb, x, y) == [color.0, color.1, color.2] {
                run + 1
            } else {
                0
            };
            best = best.max(run);
        }
    }
    best
}

/// Check the PNG signature and read width and height from the IHDR chunk.
fn png_dimensions(path: &Path) -> (u32, u32) {
    let bytes = std::fs::read(path).unwrap();
    assert_eq!(bytes[..8], PNG_SIGNATURE, "{} is not a PNG", path.display());
    assert_eq!(&bytes[12..16], b"IHDR");
    let be = |i: usize| u32::from_be_bytes(bytes[i..i + 4].try_into().unwrap());
    (be(16), be(20))
}

fn assert_only(dir: &Path, names: &[&str]) {
    let mut found: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    found.sort();
    assert_eq!(
        found,
        names,
        "leftover temporary files in {}",
        dir.display()
    );
}

#[test]
fn each_plot_writes_a_png_of_the_set_size_and_no_temp_file() {
    let dir = tempfile::tempdir().unwrap();
    let (b, l, s) = (
        dir.path().join("bars.png"),
        dir.path().join("lines.png"),
        dir.path().join("scatter.png"),
    );
    bars(
        &b,
        Labels::new("Accuracy per domain", "", "accuracy"),
        &domains(),
        &accuracy(),
    )
    .unwrap();
    lines(
        &l,
        Labels::new("Validation accuracy", "step", "accuracy"),
        &curves(),
    )
    .unwrap();
    scatter(
        &s,
        Labels::new("Genomes", "bytes", "accuracy"),
        &curves(),
        Some((100.0, 0.3)),
    )
    .unwrap();
    for path in [&b, &l, &s] {
        assert_eq!(png_dimensions(path), SIZE_PX);
        let bytes = std::fs::metadata(path).unwrap().len();
        assert!(bytes > 5_000, "{}: only {bytes} bytes", path.display());
    }
    assert_only(dir.path(), &["bars.png", "lines.png", "scatter.png"]);
}

#[test]
fn different_data_and_titles_give_different_files() {
    let dir = tempfile::tempdir().unwrap();
    let path = |name: &str| dir.path().join(name);
    let read = |name: &str| std::fs::read(path(name)).unwrap();
    let (t, u, xy) = (
        Labels::new("T", "", "acc"),
        Labels::new("U", "", "acc"),
        Labels::new("T", "x", "y"),
    );
    let mut other = accuracy();
    other[1].values[0] = 0.9;
    bars(&path("a.png"), t, &domains(), &accuracy()).unwrap();
    bars(&path("b.png"), t, &domains(), &other).unwrap();
    bars(&path("c.png"), u, &domains(), &accuracy()).unwrap();
    bars(&path("d.png"), t, &domains(), &accuracy()).unwrap();
    assert_ne!(read("a.png"), read("b.png"), "data did not change the bars");
    assert_ne!(
        read("a.png"),
        read("c.png"),
        "title did not change the bars"
    );
    assert_eq!(
        read("a.png"),
        read("d.png"),
        "rendering is not deterministic"
    );

    let mut moved = curves();
    moved[0].values[2].1 = 0.9;
    lines(&path("e.png"), xy, &curves()).unwrap();
    lines(&path("f.png"), xy, &moved).unwrap();
    assert_ne!(
        read("e.png"),
        read("f.png"),
        "data did not change the lines"
    );

    scatter(&path("g.png"), xy, &curves(), None).unwrap();
    scatter(&path("h.png"), xy, &moved, None).unwrap();
    assert_ne!(
        read("g.png"),
        read("h.png"),
        "data did not change the scatter"
    );
}

#[test]
fn title_is_drawn_with_the_bundled_font() {
    // The caption's band is sized by the font, not the text, so two titles must give
    // identical images below it and more glyphs must give more ink in it.
    const CAPTION_ROWS: u32 = 45;
    let with_title = |title: &str| {
        render(|root| draw_lines(root, Labels::new(title, "step", "accuracy"), &curves()))
    };
    let (short, long) = (with_title("A"), with_title("Validation accuracy"));
    let below = (CAPTION_ROWS * SIZE_PX.0 * 3) as usize;
    assert_eq!(short[below..], long[below..], "the title moved the plot");
    let (short_ink, long_ink) = (ink(&short, 0..CAPTION_ROWS), ink(&long, 0..CAPTION_ROWS));
    assert!(short_ink > 20, "one glyph drew {short_ink} pixels");
    assert!(
        long_ink > 8 * short_ink,
        "a 19-glyph title drew {long_ink} pixels, one glyph {short_ink}"
    );
    // No title at all is allowed too (`render` fails the test on a drawing error).
    with_title("");
}

#[test]
fn tick_labels_are_short() {
    let cases = [
        (0.0, "0"),
        (-0.0, "0"),
        (0.5, "0.5"),
        (0.30000000000000004, "0.3"),
        (100.0, "100"),
        (2500.0, "2500"),
        (12_000_000.0, "12M"),
        (1_250_000_000.0, "1.25G"),
        (-45_000.0, "-45k"),
        (0.00012, "1.2e-4"),
    ];
    for (v, want) in cases {
        assert_eq!(tick_label(&v), want, "tick {v}");
    }
}

#[test]
fn bar_heights_are_proportional_to_values() {
    // One series, so each half of the image holds one bar in PALETTE[0].
    let categories = ["left", "right"].map(String::from);
    let series = [named("only", &[1.0, 0.5])];
    let rgb = render(|root| draw_bars(root, Labels::new("T", "", "acc"), &categories, &series));
    let (w, _) = SIZE_PX;
    let left = tallest_run(&rgb, PALETTE[0], 0..w / 2);
    let right = tallest_run(&rgb, PALETTE[0], w / 2..w);
    // The axis tops out at 1.1 × the largest value, ~400 px of plot: the tall bar is
    // ~360 px and the short one half of it, to within a pixel of rounding.
    assert!(left > 300, "tallest bar is {left} px");
    let ratio = right as f64 / left as f64;
    assert!(
        (ratio - 0.5).abs() < 0.01,
        "bar heights {left} and {right} px"
    );
}

#[test]
fn each_series_gets_its_own_colour() {
    let rgb = render(|root| draw_bars(root, Labels::new("T", "", "acc"), &domains(), &accuracy()));
    for (s, color) in PALETTE.iter().take(2).enumerate() {
        assert!(
            count_color(&rgb, *color) > 1_000,
            "bar series {s} not drawn"
        );
    }
    let rgb = render(|root| draw_lines(root, Labels::new("T", "x", "y"), &curves()));
    for (s, color) in PALETTE.iter().take(2).enumerate() {
        assert!(count_color(&rgb, *color) > 200, "line series {s} not drawn");
    }
    assert_eq!(
        count_color(&rgb, PALETTE[2]),
        0,
        "a third colour with two series"
    );
}

#[test]
fn scatter_marks_the_chosen_point() {
    let black = |highlight| {
        let rgb =
            render(|root| draw_scatter(root, Labels::new("T", "x", "y"), &curves(), highlight));
        count_color(&rgb, BLACK)
    };
    let (without, with) = (black(None), black(Some((100.0, 0.3))));
    // A 11 px ring of width 3 and a cross, plus the legend entry: well over 150 pixels.
    assert!(
        with > without + 150,
        "{without} black pixels, {with} with the highlight"
    );
    assert_eq!(
        black(Some((f64::NAN, 0.3))),
        without,
        "a NaN highlight was drawn"
    );
}

/// A named edge case for [`lines`] and [`scatter`].
type PointCase = (&'static str, Vec<Series<(f64, f64)>>);
/// A named edge case for [`bars`]: categories and series.
type BarCase = (&'static str, Vec<String>, Vec<Series<f64>>);

#[test]
fn degenerate_data_still_writes_a_plot() {
    let dir = tempfile::tempdir().unwrap();
    let nan = f64::NAN;
    let point_cases: Vec<PointCase> = vec![
        ("no_series", vec![]),
        ("empty_series", vec![named("a", &[])]),
        ("single_point", vec![named("a", &[(3.0, 0.5)])]),
        (
            "constant",
            vec![named("a", &[(1.0, 2.0), (2.0, 2.0), (3.0, 2.0)])],
        ),
        ("all_zero", vec![named("a", &[(0.0, 0.0), (0.0, 0.0)])]),
        (
            "nan",
            vec![named("a", &[(nan, 1.0), (1.0, nan), (2.0, 3.0)])],
        ),
        ("only_nan", vec![named("a", &[(nan, nan)])]),
        (
            "infinite",
            vec![named(
                "a",
                &[(f64::INFINITY, 1.0), (1.0, f64::NEG_INFINITY)],
            )],
        ),
    ];
    for (case, series) in &point_cases {
        let line = dir.path().join(format!("lines_{case}.png"));
        lines(&line, Labels::new(case, "x", "y"), series).unwrap();
        assert_eq!(png_dimensions(&line), SIZE_PX, "{case}");
        let cloud = dir.path().join(format!("scatter_{case}.png"));
        scatter(
            &cloud,
            Labels::new(case, "x", "y"),
            series,
            Some((3.0, 0.5)),
        )
        .unwrap();
        assert_eq!(png_dimensions(&cloud), SIZE_PX, "{case}");
    }
    let bar_cases: Vec<BarCase> = vec![
        ("no_categories", vec![], accuracy()),
        ("no_series", domains(), vec![]),
        ("empty_series", domains(), vec![named("a", &[])]),
        ("short_series", domains(), vec![named("a", &[0.5])]),
        (
            "long_series",
            domains(),
            vec![named("a", &[0.1, 0.2, 0.3, 0.4, 0.5])],
        ),
        ("all_zero", domains(), vec![named("a", &[0.0, 0.0, 0.0])]),
        ("constant", domains(), vec![named("a", &[0.5, 0.5, 0.5])]),
        (
            "nan",
            domains(),
            vec![named("a", &[nan, 0.5, f64::INFINITY])],
        ),
        ("negative", domains(), vec![named("a", &[-1.0, 0.5, 0.2])]),
    ];
    for (case, categories, series) in &bar_cases {
        let path = dir.path().join(format!("bars_{case}.png"));
        bars(&path, Labels::new(case, "", "y"), categories, series).unwrap();
        assert_eq!(png_dimensions(&path), SIZE_PX, "{case}");
    }
}

#[test]
fn axis_ranges_have_known_spans() {
    assert_eq!(axis_range([].into_iter()), 0.0..1.0);
    assert_eq!(axis_range([f64::NAN, f64::INFINITY].into_iter()), 0.0..1.0);
    assert_eq!(axis_range([0.0, 0.0].into_iter()), -1.0..1.0);
    assert_eq!(axis_range([-5.0].into_iter()), -5.5..-4.5);
    assert_eq!(axis_range([0.0, f64::NAN, 10.0].into_iter()), -0.5..10.5);
}

#[test]
fn legend_goes_to_the_emptiest_corner() {
    let unit = 0.0..1.0;
    // A rising curve leaves the lower right free.
    let rising = [(0.0, 0.0), (0.5, 0.5), (0.6, 0.7), (1.0, 1.0)];
    assert_eq!(
        emptiest_corner(&rising, &unit, &unit),
        SeriesLabelPosition::LowerRight
    );
    // A falling curve leaves the upper right free.
    let falling = [(0.0, 1.0), (0.4, 0.6), (1.0, 0.0)];
    assert_eq!(
        emptiest_corner(&falling, &unit, &unit),
        SeriesLabelPosition::UpperRight
    );
    // Nothing to avoid: the conventional upper right.
    assert_eq!(
        emptiest_corner(&[], &unit, &unit),
        SeriesLabelPosition::UpperRight
    );
}

#[test]
fn unwritable_path_is_an_error_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("no_such_dir").join("plot.png");
    let shown = path.display().to_string();
    let errors = [
        bars(&path, Labels::new("T", "", "y"), &domains(), &accuracy()).unwrap_err(),
        lines(&path, Labels::new("T", "x", "y"), &curves()).unwrap_err(),
        scatter(&path, Labels::new("T", "x", "y"), &curves(), None).unwrap_err(),
    ];
    for e in errors {
        assert!(
            e.to_string().contains(&shown),
            "error `{e}` does not name {shown}"
        );
    }
    assert_only(dir.path(), &[]);
}

#[test]
fn rewriting_replaces_the_old_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("plot.png");
    std::fs::write(&path, b"stale").unwrap();
    lines(&path, Labels::new("T", "x", "y"), &curves()).unwrap();
    assert_eq!(png_dimensions(&path), SIZE_PX);
    assert_only(dir.path(), &["plot.png"]);
}
