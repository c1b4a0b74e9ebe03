//! Every supported layout loads to the same model: round trips and hand-made variants of the
//! transformers fixture, compared by content hash and by logits.

mod common;
use bitsvf::engine::checkpoint::st::{OwnedTensor, TensorFiles};
use bitsvf::engine::checkpoint::{self, Checkpoint, SourceFormat};
use bitsvf::engine::model::{Model, ModelOptions};
use common::*;

fn logits(ck: &Checkpoint) -> Vec<f32> {
    let m = Model::new(ck, ModelOptions::default()).unwrap();
    let ids = m
        .ids_tensor(&[vec![3, 1, 4, 1, 5, 9, 2, 6], vec![5, 3, 5, 8, 9, 7, 9, 3]])
        .unwrap();
    flat(m.forward(&ids, None).unwrap())
}

#[test]
fn native_roundtrip_is_exact() {
    let ck = checkpoint::load(&fixture()).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let f = tmp.path().join("m.safetensors");
    checkpoint::save_native(&ck, &f).unwrap();
    let back = checkpoint::load(&f).unwrap();
    assert_eq!(back.format, SourceFormat::Native);
    assert_eq!(back.content_hash(), ck.content_hash());
    assert_eq!(logits(&back), logits(&ck));
    // A directory holding the file loads too.
    assert_eq!(
        checkpoint::load(tmp.path()).unwrap().content_hash(),
        ck.content_hash()
    );
    // 2 bits per ternary weight: the native file is far smaller than f32.
    let bytes = std::fs::metadata(&f).unwrap().len() as usize;
    assert!(bytes < ck.parameter_count() * 4 / 4, "{bytes} bytes");
}

#[test]
fn dequantized_roundtrip_recovers_ternary_exactly() {
    let ck = checkpoint::load(&fixture()).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("dq");
    checkpoint::save_dequantized(&ck, &dir, false).unwrap();
    let back = checkpoint::load(&dir).unwrap();
    assert_eq!(back.format, SourceFormat::Dequantized);
    assert_eq!(back.content_hash(), ck.content_hash());
    // The f32 weights on disk are exactly γ·W_t.
    let tf = TensorFiles::open(&[dir.join("model.safetensors")]).unwrap();
    let w = tf
        .get("model.layers.1.mlp.down_proj.weight")
        .unwrap()
        .to_f32()
        .unwrap();
    assert_eq!(w, ck.layers[1].linears[6].matrix.dequantize());
    // Writing again into a non-empty directory needs --force; nothing is left half-written.
    let e = checkpoint::save_dequantized(&ck, &dir, false)
        .unwrap_err()
        .to_string();
    assert!(e.contains("--force"), "{e}");
    checkpoint::save_dequantized(&ck, &dir, true).unwrap();
    let names: Vec<_> = std::fs::read_dir(tmp.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names.len(), 1, "stray files: {names:?}");
}

#[test]
fn phase4_layout_matches_hf() {
    // Phase 4: int8 weights + fp16 per-channel scales. The fixture's bf16 scales are exactly
    // representable in fp16, so the model must give transformers' logits bit for bit of ours.
    let ck = checkpoint::load(&fixture()).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("p4");
    let mut t = fixture_tensors();
    for (name, _, lin) in ck.linears() {
        t.remove(&format!("{name}.weight"));
        t.remove(&format!("{name}.weight_scale"));
        let m = &lin.matrix;
        t.insert(
            format!("{name}.quantized_weight"),
            OwnedTensor::i8(vec![m.rows, m.cols], &m.values()),
        );
        t.insert(
            format!("{name}.scale_factor"),
            OwnedTensor::f16(vec![m.rows], &vec![m.scales[0]; m.rows]),
        );
    }
    let mut c = fixture_config();
    c.as_object_mut().unwrap().remove("quantization_config");
    write_model(&dir, &t, &c);
    let p4 = checkpoint::load(&dir).unwrap();
    assert_eq!(p4.format, SourceFormat::Phase4);
    assert_eq!(p4.layers[0].linears[0].matrix.scales.len(), 64);
    assert_eq!(logits(&p4), logits(&ck));
}

#[test]
fn bitlinear_divides_autobitlinear_multiplies() {
    // Scales that are exact in bf16 both ways: γ = 0.5 ⇔ weight_scale 0.5 (multiply) or 2 (divide).
    let make = |class: &str, ws: f32| {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join(class);
        let mut t = fixture_tensors();
        for (k, v) in t.iter_mut() {
            if k.ends_with("weight_scale") {
                *v = OwnedTensor::bf16(vec![1], &[ws]);
            }
        }
        let mut c = fixture_config();
        c["quantization_config"]["linear_class"] = class.into();
        write_model(&dir, &t, &c);
        let ck = checkpoint::load(&dir).unwrap();
        (tmp, ck)
    };
    let (_a, auto) = make("autobitlinear", 0.5);
    let (_b, div) = make("bitlinear", 2.0);
    assert_eq!(auto.layers[0].linears[0].matrix.scales, vec![0.5]);
    assert_eq!(div.layers[0].linears[0].matrix.scales, vec![0.5]);
    assert_eq!(logits(&auto), logits(&div));
}

#[test]
fn float_master_is_ternarized_on_load() {
    // Float master weights W: ternarized per tensor with γ = mean|W|.
    let ck = checkpoint::load(&fixture()).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("master");
    let mut t = fixture_tensors();
    let mut expected = Vec::new();
    for (i, (name, _, lin)) in ck.linears().enumerate() {
        let m = &lin.matrix;
        // Perturb γ·W_t by a deterministic ±0.3γ jitter that keeps every value's rounding.
        let w: Vec<f32> = m
            .values()
            .iter()
            .enumerate()
            .map(|(j, &v)| m.scales[0] * (v as f32 + 0.3 * (((i + j) % 7) as f32 / 3.0 - 1.0)))
            .collect();
        expected.push((
            name.clone(),
            bitsvf::engine::ternary::ternarize_per_tensor(&w),
        ));
        t.insert(
            format!("{name}.weight"),
            OwnedTensor::f32(vec![m.rows, m.cols], &w),
        );
        t.remove(&format!("{name}.weight_scale"));
    }
    let mut c = fixture_config();
    c["quantization_config"]["quantization_mode"] = "online".into();
    write_model(&dir, &t, &c);
    let master = checkpoint::load(&dir).unwrap();
    assert_eq!(master.format, SourceFormat::HfFloat);
    for ((name, _, lin), (ename, (values, gamma))) in master.linears().zip(&expected) {
        assert_eq!(&name, ename);
        assert_eq!(&lin.matrix.values(), values, "{name}");
        assert_eq!(lin.matrix.scales, vec![*gamma], "{name}");
    }
}

#[test]
fn tied_embeddings_use_the_embedding_matrix() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("tied");
    let mut t = fixture_tensors();
    t.remove("lm_head.weight");
    let mut c = fixture_config();
    c["tie_word_embeddings"] = true.into();
    write_model(&dir, &t, &c);
    let ck = checkpoint::load(&dir).unwrap();
    assert!(ck.lm_head.is_none());
    // Logits at the last layer are h · Eᵀ: compare one position by hand.
    let m = Model::new(&ck, ModelOptions::default()).unwrap();
    let ids = m.ids_tensor(&[vec![7, 8, 9]]).unwrap();
    let h: Vec<f32> = flat(m.hidden_states(&ids, None).unwrap());
    let l: Vec<f32> = flat(m.forward(&ids, None).unwrap());
    let d = 64;
    let last = &h[2 * d..3 * d];
    let embed = ck.embed_tokens.to_f32();
    for tok in [0usize, 17, 95] {
        let e = &embed[tok * d..(tok + 1) * d];
        let dot: f32 = last.iter().zip(e).map(|(a, b)| a * b).sum();
        assert!((dot - l[2 * 96 + tok]).abs() < 1e-4);
    }
}
