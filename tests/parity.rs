//! The Hugging Face fixture: our loader and forward pass reproduce transformers' logits.

mod common;
use bitsvf::engine::checkpoint;
use bitsvf::engine::model::{Model, ModelOptions, WeightMode};
use common::flat;
use std::path::PathBuf;

fn fixture() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/hf-bitnet-tiny")
}

struct Reference {
    ids: Vec<Vec<u32>>,
    logits: Vec<f32>,
}

fn reference() -> Reference {
    let path = fixture().join("reference_logits.safetensors");
    let tf = checkpoint::st::TensorFiles::open(&[path]).unwrap();
    let ids = tf.get("input_ids").unwrap();
    assert_eq!(ids.shape, &[2, 16]);
    let flat: Vec<u32> = ids
        .data
        .chunks_exact(8)
        .map(|c| i64::from_le_bytes(c.try_into().unwrap()) as u32)
        .collect();
    let logits = tf.get("logits").unwrap().to_f32().unwrap();
    Reference {
        ids: flat.chunks(16).map(|c| c.to_vec()).collect(),
        logits,
    }
}

/// (max |Δ|, mean |Δ|, argmax agreement) of our logits vs the reference.
fn compare(mode: WeightMode) -> (f32, f32, f64) {
    let ck = checkpoint::load(&fixture()).unwrap();
    let model = Model::new(
        &ck,
        ModelOptions {
            mode,
            act_quant: true,
            ..Default::default()
        },
    )
    .unwrap();
    let r = reference();
    let ids = model.ids_tensor(&r.ids).unwrap();
    let ours: Vec<f32> = flat(model.forward(&ids, None).unwrap());
    assert_eq!(ours.len(), r.logits.len());
    let diffs: Vec<f32> = ours
        .iter()
        .zip(&r.logits)
        .map(|(a, b)| (a - b).abs())
        .collect();
    let max = diffs.iter().cloned().fold(0f32, f32::max);
    let mean = diffs.iter().sum::<f32>() / diffs.len() as f32;
    let v = 96;
    let agree = ours
        .chunks(v)
        .zip(r.logits.chunks(v))
        .filter(|(a, b)| bitsvf::engine::model::argmax(a) == bitsvf::engine::model::argmax(b))
        .count() as f64
        / (ours.len() / v) as f64;
    (max, mean, agree)
}

#[test]
fn ternary_mode_matches_transformers() {
    let (max, mean, agree) = compare(WeightMode::Ternary);
    eprintln!("ternary: max |Δ| {max:e}, mean |Δ| {mean:e}, argmax agreement {agree}");
    assert_eq!(agree, 1.0);
    assert!(mean < 1e-3, "mean |Δ| {mean}");
    assert!(max < 1e-4, "max |Δ| {max}");
}

#[test]
fn dense_mode_matches_transformers() {
    let (max, mean, agree) = compare(WeightMode::Dense);
    eprintln!("dense: max |Δ| {max:e}, mean |Δ| {mean:e}, argmax agreement {agree}");
    assert_eq!(agree, 1.0);
    assert!(mean < 1e-3, "mean |Δ| {mean}");
    assert!(max < 1e-4, "max |Δ| {max}");
}
