//! Helpers shared by the integration tests: the HF fixture and writers of variants of it.
#![allow(dead_code)]

use bitsvf::engine::checkpoint::st::{write_safetensors, OwnedTensor, TensorFiles};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

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
