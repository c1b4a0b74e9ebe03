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
        let m = lin.matrix.ternary().unwrap();
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
    assert_eq!(
        p4.layers[0].linears[0]
            .matrix
            .ternary()
            .unwrap()
            .scales
            .len(),
        64
    );
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
    assert_eq!(
        auto.layers[0].linears[0].matrix.ternary().unwrap().scales,
        vec![0.5]
    );
    assert_eq!(
        div.layers[0].linears[0].matrix.ternary().unwrap().scales,
        vec![0.5]
    );
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
        let m = lin.matrix.ternary().unwrap();
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
        assert_eq!(&lin.matrix.ternary().unwrap().values(), values, "{name}");
        assert_eq!(lin.matrix.ternary().unwrap().scales, vec![*gamma], "{name}");
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

/// The float Llama fixture: transformers' LlamaForCausalLM, and llama.cpp-style GGUF files of
/// it (F32, F16, Q8_0 linears) made with the `gguf` package
/// (scripts/reference/make_float_llama_fixture.py).
fn float_llama() -> std::path::PathBuf {
    std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/float-llama")
}

/// Largest |a − b| between the model's logits and transformers' for each fixture sequence.
fn worst_vs_transformers(ck: &Checkpoint, options: ModelOptions, key: &str) -> f32 {
    let expected: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(float_llama().join("expected.json")).unwrap(),
    )
    .unwrap();
    let ids: Vec<Vec<u32>> = serde_json::from_value(expected["ids"].clone()).unwrap();
    let want: Vec<Vec<Vec<f32>>> = serde_json::from_value(expected["logits"][key].clone()).unwrap();
    let m = Model::new(ck, options).unwrap();
    let mut worst = 0f32;
    for (row, want) in ids.iter().zip(&want) {
        let got = flat(
            m.forward(&m.ids_tensor(std::slice::from_ref(row)).unwrap(), None)
                .unwrap(),
        );
        for (g, w) in got.iter().zip(want.iter().flatten()) {
            worst = worst.max((g - w).abs());
        }
        assert_eq!(got.len(), want.iter().flatten().count());
    }
    worst
}

/// A float Llama — transformers' own checkpoint and llama.cpp's GGUF files of it — loads with
/// float linears and gives transformers' logits, in both weight modes; `--ternarize` makes it
/// ternary; a float model round-trips through the native and dequantized formats.
#[test]
fn float_llama_matches_transformers() {
    use bitsvf::engine::model::WeightMode;
    let cases = [
        ("hf", "hf", "f32", "hf-float (float linears)"),
        ("llama-f32.gguf", "f32", "f32", "gguf (llama)"),
        ("llama-f16.gguf", "f16", "f16", "gguf (llama)"),
        ("llama-q8_0.gguf", "q8_0", "q8_0", "gguf (llama)"),
    ];
    for (file, key, dtype, format) in cases {
        let ck = checkpoint::load(&float_llama().join(file)).unwrap();
        assert!(!ck.is_ternary(), "{file}");
        assert_eq!(ck.linear_dtypes(), dtype, "{file}");
        assert_eq!(ck.format.name(), format);
        assert_eq!(ck.config.sub_norms, Some(false));
        for mode in [WeightMode::Ternary, WeightMode::Dense] {
            let options = ModelOptions {
                mode,
                ..Default::default()
            };
            let worst = worst_vs_transformers(&ck, options, key);
            assert!(worst < 1e-4, "{file} {mode:?}: max |Δ logit| {worst}");
        }
    }
    let ck = checkpoint::load(&float_llama().join("hf")).unwrap();
    // Ternarized on request: BitNet's rule, and no longer transformers' float model.
    let t = ck.clone().ternarized();
    assert!(t.is_ternary() && t.linear_dtypes() == "ternary");
    assert!(worst_vs_transformers(&t, ModelOptions::default(), "hf") > 1e-2);
    // Native and dequantized round trips keep the float linears.
    let tmp = tempfile::tempdir().unwrap();
    let f = tmp.path().join("m.safetensors");
    checkpoint::save_native(&ck, &f).unwrap();
    let native = checkpoint::load(&f).unwrap();
    assert_eq!(native.content_hash(), ck.content_hash());
    assert_eq!(logits(&native), logits(&ck));
    let dir = tmp.path().join("dq");
    checkpoint::save_dequantized(&ck, &dir, false).unwrap();
    let dq = checkpoint::load(&dir).unwrap();
    assert_eq!(dq.format, SourceFormat::HfFloatModel);
    assert_eq!(dq.content_hash(), ck.content_hash());
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["model_type"], "llama");
}

/// ggml's block types decode to the values the `gguf` package computes
/// (scripts/reference/make_float_llama_fixture.py; `gguf.quants.dequantize`).
#[test]
fn ggml_block_types_decode_as_the_gguf_package_does() {
    use bitsvf::engine::checkpoint::gguf::{decode_quant, GgmlType};
    use bitsvf::engine::checkpoint::FloatMatrix;
    let dir =
        std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/ggml-float");
    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("manifest.json")).unwrap()).unwrap();
    let (rows, cols) = (3, 512);
    let types = manifest["types"].as_object().unwrap();
    assert_eq!(types.len(), 10);
    for (name, info) in types {
        let bytes = std::fs::read(dir.join(format!("{name}.bin"))).unwrap();
        let want: Vec<f32> = std::fs::read(dir.join(format!("{name}.values.f32")))
            .unwrap()
            .chunks(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        let ty = GgmlType::from_id(info["ggml_id"].as_u64().unwrap() as u32);
        assert_eq!(ty.name().to_lowercase(), *name);
        let got = match ty {
            GgmlType::Q8_0 => FloatMatrix::from_q8_0_blocks(&bytes, rows, cols)
                .unwrap()
                .to_f32(),
            GgmlType::Quant(q) => decode_quant(q, &bytes, rows, cols).unwrap(),
            other => panic!("{other:?}"),
        };
        let scale = want.iter().fold(0f32, |m, x| m.max(x.abs()));
        let worst = (got.iter().zip(&want)).fold(0f32, |m, (g, w)| m.max((g - w).abs()));
        assert!(worst <= 1e-6 * scale, "{name}: max |Δ| {worst} of {scale}");
        // A truncated tensor is an error, not a read past the end.
        let err = match ty {
            GgmlType::Quant(q) => decode_quant(q, &bytes[..bytes.len() - 1], rows, cols),
            _ => continue,
        };
        assert!(err.unwrap_err().contains("bytes"), "{name}");
    }
}
