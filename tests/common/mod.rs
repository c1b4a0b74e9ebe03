//! Helpers shared by the integration tests: the HF fixture and writers of variants of it.
#![allow(dead_code)]

use bitsvf::engine::checkpoint::st::{write_safetensors, OwnedTensor, TensorFiles};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Run the `bitsvf` binary with `args`.
pub fn bitsvf(args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_bitsvf"))
        .args(args)
        .output()
        .unwrap()
}

/// The transformers-made fixture directory.
pub fn fixture() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/hf-bitnet-tiny")
}

/// All tensors of the fixture.
pub fn fixture_tensors() -> BTreeMap<String, OwnedTensor> {
    let tf = TensorFiles::open(&[fixture().join("model.safetensors")]).unwrap();
    let names: Vec<String> = tf.names().map(str::to_string).collect();
    names
        .iter()
        .map(|n| (n.clone(), tf.get(n).unwrap().to_owned()))
        .collect()
}

/// The fixture's config as JSON.
pub fn fixture_config() -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(fixture().join("config.json")).unwrap()).unwrap()
}

/// Write a model directory with these tensors and config.
pub fn write_model(
    dir: &Path,
    tensors: &BTreeMap<String, OwnedTensor>,
    config: &serde_json::Value,
) {
    std::fs::create_dir_all(dir).unwrap();
    write_safetensors(&dir.join("model.safetensors"), tensors, None).unwrap();
    std::fs::write(
        dir.join("config.json"),
        serde_json::to_string_pretty(config).unwrap(),
    )
    .unwrap();
}

/// The error message of loading `dir` (panics if it loads).
pub fn load_error(dir: &Path) -> String {
    match bitsvf::engine::checkpoint::load(dir) {
        Ok(_) => panic!("{} loaded but should not have", dir.display()),
        Err(e) => e.to_string(),
    }
}

/// A tensor's values, flattened to f32.
pub fn flat(t: candle_core::Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1().unwrap()
}

/// Keys of the manifest whose values depend on the clock or the machine.
pub const VOLATILE_KEYS: [&str; 6] = [
    "seconds",
    "ms_per_token",
    "peak_rss_mb",
    "cache_hits",
    "computed",
    "bitsvf_version",
];

/// Fields the manifest gained after bitsvf 0.1.0 (absent from the fixtures).
pub const ADDED_KEYS: [&str; 2] = ["format_version", "val_curve"];

/// Relative tolerance of the manifest's numbers. The same seed gives the same choices on any
/// machine, but the figures behind them are sums whose rounding depends on the CPU's SIMD
/// width: the quick run's golden manifest, made on an AVX-512 machine, differs from the same
/// commit's run on an AVX2-only one by up to 1.2e-5 relative (the packed-vs-dense logit
/// difference, the discovery cosines at 1e-8), never in an accuracy or a selection.
const MANIFEST_RELATIVE_TOLERANCE: f64 = 1e-4;

/// Every difference between two manifests outside [`VOLATILE_KEYS`] and [`ADDED_KEYS`]: the
/// same keys and array lengths, strings and flags equal, numbers equal to
/// [`MANIFEST_RELATIVE_TOLERANCE`].
pub fn manifest_differences(
    want: &serde_json::Value,
    got: &serde_json::Value,
    path: &str,
    out: &mut Vec<String>,
) {
    use serde_json::Value;
    match (want, got) {
        (Value::Object(w), Value::Object(g)) => {
            for (k, wv) in w
                .iter()
                .filter(|(k, _)| !VOLATILE_KEYS.contains(&k.as_str()))
            {
                match g.get(k) {
                    Some(gv) => manifest_differences(wv, gv, &format!("{path}.{k}"), out),
                    None => out.push(format!("{path}.{k}: missing")),
                }
            }
            for k in g.keys() {
                let known = w.contains_key(k)
                    || VOLATILE_KEYS.contains(&k.as_str())
                    || ADDED_KEYS.contains(&k.as_str());
                if !known {
                    out.push(format!("{path}.{k}: not in the fixture"));
                }
            }
        }
        (Value::Array(w), Value::Array(g)) if w.len() == g.len() => {
            for (i, (wv, gv)) in w.iter().zip(g).enumerate() {
                manifest_differences(wv, gv, &format!("{path}[{i}]"), out);
            }
        }
        (Value::Number(w), Value::Number(g)) => {
            let (a, b) = (w.as_f64().unwrap(), g.as_f64().unwrap());
            if a != b && (a - b).abs() > MANIFEST_RELATIVE_TOLERANCE * a.abs().max(b.abs()) {
                out.push(format!("{path}: {a} in the fixture, {b} now"));
            }
        }
        (w, g) if w == g => {}
        (w, g) => out.push(format!("{path}: {w} in the fixture, {g} now")),
    }
}

/// `bitsvf run --quick --seed 0` into `out` (its mixture search models latency, so it does
/// not depend on a busy machine's clock).
pub fn golden_quick_run(out: &Path, cache: &Path) -> std::process::Command {
    let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_bitsvf"));
    c.args([
        "run",
        "--quick",
        "--seed",
        "0",
        "--out",
        out.to_str().unwrap(),
    ])
    .args(["--cache-dir", cache.to_str().unwrap()]);
    c
}
