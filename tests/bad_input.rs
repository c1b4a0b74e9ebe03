//! Bad input gets a clear error naming the file and tensor or field — never a panic.

mod common;
use bitsvf::engine::checkpoint::st::OwnedTensor;
use common::*;
use safetensors::Dtype;

fn variant(
    name: &str,
    edit: impl FnOnce(&mut std::collections::BTreeMap<String, OwnedTensor>, &mut serde_json::Value),
) -> (tempfile::TempDir, std::path::PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join(name);
    let mut t = fixture_tensors();
    let mut c = fixture_config();
    edit(&mut t, &mut c);
    write_model(&dir, &t, &c);
    (tmp, dir)
}

fn assert_names(msg: &str, parts: &[&str]) {
    for p in parts {
        assert!(msg.contains(p), "error `{msg}` should mention `{p}`");
    }
}

#[test]
fn truncated_safetensors() {
    let (_t, dir) = variant("trunc", |_, _| {});
    let f = dir.join("model.safetensors");
    let bytes = std::fs::read(&f).unwrap();
    std::fs::write(&f, &bytes[..bytes.len() / 2]).unwrap();
    let e = load_error(&dir);
    assert_names(&e, &["model.safetensors", "truncated or corrupt"]);
}

#[test]
fn corrupt_header() {
    let (_t, dir) = variant("corrupt", |_, _| {});
    let f = dir.join("model.safetensors");
    let mut bytes = std::fs::read(&f).unwrap();
    for b in &mut bytes[8..40] {
        *b = b'#';
    }
    std::fs::write(&f, &bytes).unwrap();
    assert_names(
        &load_error(&dir),
        &["model.safetensors", "not a valid safetensors"],
    );
    // A file too short to hold even the header length.
    std::fs::write(&f, b"abc").unwrap();
    assert_names(&load_error(&dir), &["model.safetensors"]);
}

#[test]
fn missing_tensor() {
    let (_t, dir) = variant("missing", |t, _| {
        t.remove("model.layers.1.mlp.up_proj.weight_scale");
    });
    assert_names(
        &load_error(&dir),
        &[
            "model.safetensors",
            "missing tensor",
            "model.layers.1.mlp.up_proj.weight_scale",
        ],
    );
    let (_t, dir) = variant("missing-norm", |t, _| {
        t.remove("model.layers.0.mlp.ffn_sub_norm.weight");
    });
    assert_names(
        &load_error(&dir),
        &["model.layers.0.mlp.ffn_sub_norm.weight"],
    );
}

#[test]
fn wrong_shape() {
    let (_t, dir) = variant("shape", |t, _| {
        let e = t.get_mut("model.layers.0.self_attn.k_proj.weight").unwrap();
        *e = OwnedTensor::raw(Dtype::U8, vec![4, 64], e.data_mut()[..256].to_vec());
    });
    assert_names(
        &load_error(&dir),
        &[
            "model.safetensors",
            "model.layers.0.self_attn.k_proj.weight",
            "[4, 64]",
            "[8, 64]",
        ],
    );
}

#[test]
fn wrong_dtype() {
    let (_t, dir) = variant("dtype", |t, _| {
        let e = t.get_mut("model.norm.weight").unwrap();
        *e = OwnedTensor::raw(Dtype::I16, vec![64], e.data_mut().clone());
    });
    assert_names(
        &load_error(&dir),
        &["model.safetensors", "model.norm.weight", "I16"],
    );
    let (_t, dir) = variant("dtype-packed", |t, _| {
        let e = t.get_mut("model.layers.0.self_attn.q_proj.weight").unwrap();
        *e = OwnedTensor::raw(Dtype::I32, vec![16, 16], e.data_mut()[..1024].to_vec());
    });
    assert_names(
        &load_error(&dir),
        &["model.layers.0.self_attn.q_proj.weight", "I32"],
    );
}

#[test]
fn packed_code_three() {
    let (_t, dir) = variant("code3", |t, _| {
        t.get_mut("model.layers.1.mlp.gate_proj.weight")
            .unwrap()
            .data_mut()[70] = 0xFF;
    });
    assert_names(
        &load_error(&dir),
        &[
            "model.safetensors",
            "model.layers.1.mlp.gate_proj.weight",
            "code 3",
            "packed row 1, column 6",
        ],
    );
}

#[test]
fn non_finite_scale() {
    for (bits, what) in [(0x7FC0u16, "NaN"), (0x7F80u16, "inf")] {
        let (_t, dir) = variant("nan", |t, _| {
            let e = t
                .get_mut("model.layers.0.self_attn.o_proj.weight_scale")
                .unwrap();
            *e.data_mut() = bits.to_le_bytes().to_vec();
        });
        assert_names(
            &load_error(&dir),
            &[
                "model.safetensors",
                "model.layers.0.self_attn.o_proj.weight_scale",
                "non-finite",
                what,
            ],
        );
    }
    let (_t, dir) = variant("zero-scale", |t, _| {
        let e = t
            .get_mut("model.layers.0.self_attn.o_proj.weight_scale")
            .unwrap();
        *e.data_mut() = 0u16.to_le_bytes().to_vec();
    });
    assert_names(
        &load_error(&dir),
        &["o_proj.weight_scale", "must be finite and > 0"],
    );
}

#[test]
fn config_weights_disagreement() {
    let (_t, dir) = variant("hidden", |_, c| c["hidden_size"] = 32.into());
    assert_names(
        &load_error(&dir),
        &["model.embed_tokens.weight", "[96, 32]", "[96, 64]"],
    );
    let (_t, dir) = variant("layers", |_, c| c["num_hidden_layers"] = 1.into());
    assert_names(
        &load_error(&dir),
        &["config.json", "num_hidden_layers", "model.layers.1."],
    );
    let (_t, dir) = variant("more-layers", |_, c| c["num_hidden_layers"] = 3.into());
    assert_names(&load_error(&dir), &["missing tensor", "model.layers.2."]);
    let (_t, dir) = variant("class", |_, c| {
        c["quantization_config"]["linear_class"] = "fancylinear".into()
    });
    assert_names(
        &load_error(&dir),
        &["config.json", "linear_class", "fancylinear"],
    );
    let (_t, dir) = variant("noquant", |_, c| {
        c.as_object_mut().unwrap().remove("quantization_config");
    });
    assert_names(
        &load_error(&dir),
        &["config.json", "quantization_config", "uint8"],
    );
    let (_t, dir) = variant("badjson", |_, c| c["vocab_size"] = "many".into());
    assert_names(&load_error(&dir), &["config.json", "vocab_size"]);
}

#[test]
fn unknown_format() {
    let (_t, dir) = variant("unknown", |t, _| {
        let q: Vec<String> = t.keys().filter(|k| k.contains("q_proj")).cloned().collect();
        for k in q {
            let v = t.remove(&k).unwrap();
            t.insert(k.replace("q_proj", "query"), v);
        }
    });
    assert_names(&load_error(&dir), &["unknown model format", "q_proj"]);
    let tmp = tempfile::tempdir().unwrap();
    assert_names(
        &load_error(tmp.path()),
        &["unknown model format", "found 0"],
    );
    // A safetensors file with no config beside it and no bitsvf metadata.
    let f = tmp.path().join("x.safetensors");
    std::fs::copy(fixture().join("model.safetensors"), &f).unwrap();
    assert_names(&load_error(&f), &["unknown model format", "config.json"]);
    assert_names(
        &load_error(&tmp.path().join("nope")),
        &["nope", "no such file"],
    );
}

#[test]
fn phase4_non_ternary_value() {
    use bitsvf::engine::checkpoint::linear_name;
    let (_t, dir) = variant("phase4", |t, _| {
        let ck = bitsvf::engine::checkpoint::load(&fixture()).unwrap();
        for (name, _, lin) in ck.linears() {
            t.remove(&format!("{name}.weight"));
            t.remove(&format!("{name}.weight_scale"));
            let m = lin.matrix.ternary().unwrap();
            let mut v = m.values();
            if name == linear_name(1, bitsvf::engine::checkpoint::LinearKind::V) {
                v[5] = 2;
            }
            t.insert(
                format!("{name}.quantized_weight"),
                OwnedTensor::i8(vec![m.rows, m.cols], &v),
            );
            t.insert(
                format!("{name}.scale_factor"),
                OwnedTensor::f16(vec![m.rows], &vec![m.scales[0]; m.rows]),
            );
        }
    });
    assert_names(
        &load_error(&dir),
        &[
            "model.layers.1.self_attn.v_proj.quantized_weight",
            "value 2 at row 0, column 5",
            "not ternary",
        ],
    );
}

/// Numbers in a config that would size an allocation are checked against the weights (or
/// sized by use) first: no abort, no hang.
#[test]
fn huge_config_numbers_are_refused_or_harmless() {
    let (_t, dir) = variant("deep", |_, c| c["num_hidden_layers"] = (1u64 << 40).into());
    assert_names(&load_error(&dir), &["missing tensor", "model.layers.2."]);
    for positions in [1u64 << 40, 1u64 << 62] {
        let (_t, dir) = variant("long", |_, c| {
            c["max_position_embeddings"] = positions.into()
        });
        let ck = bitsvf::engine::checkpoint::load(&dir).unwrap();
        let m = bitsvf::engine::model::Model::new(&ck, Default::default()).unwrap();
        let ids = m.ids_tensor(&[vec![1, 2, 3]]).unwrap();
        let logits = flat(m.forward(&ids, None).unwrap());
        assert!(logits.iter().all(|v| v.is_finite()));
    }
}

/// A finite but huge scale overflows the logits: a clear error, not NaN with exit 0.
#[test]
fn huge_scale_is_an_error_not_nan_logits() {
    let (_t, dir) = variant("huge-scale", |t, _| {
        for name in [
            "model.layers.0.mlp.down_proj.weight_scale",
            "model.norm.weight",
        ] {
            let e = t.get_mut(name).unwrap();
            let huge = half::bf16::from_f32(3e38).to_bits().to_le_bytes();
            let n = e.data_mut().len() / 2;
            *e.data_mut() = huge.repeat(n);
        }
    });
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_bitsvf"))
        .args(["logits", dir.to_str().unwrap(), "--tokens", "1,2,3"])
        .args(["--out", dir.join("l.safetensors").to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert_names(&String::from_utf8_lossy(&out.stderr), &["not finite"]);
    assert!(!dir.join("l.safetensors").exists());
}

/// Run settings that cannot work are refused before any work: no `DIR.partial`, and the
/// message names the settings file and the field.
#[test]
fn a_bad_run_config_fails_before_any_work() {
    let tmp = tempfile::tempdir().unwrap();
    for (i, (text, field)) in [
        (r#"{"search": {"population": 1}}"#, "search.population"),
        (r#"{"cem": {"elites": 0}}"#, "cem.elites"),
        (r#"{"shots": 0}"#, "shots"),
        (r#"{"test_n": 0}"#, "test_n"),
        (r#"{"train": {"eval_every": 0}}"#, "train.eval_every"),
        (r#"{"data_source": "openai"}"#, "data_source"),
    ]
    .into_iter()
    .enumerate()
    {
        let cfg = tmp.path().join(format!("bad-{i}.json"));
        std::fs::write(&cfg, text).unwrap();
        let out = tmp.path().join(format!("out-{i}"));
        let run = std::process::Command::new(env!("CARGO_BIN_EXE_bitsvf"))
            .args(["run", "--quick", "--config", cfg.to_str().unwrap()])
            .args(["--out", out.to_str().unwrap()])
            .output()
            .unwrap();
        assert!(!run.status.success());
        let err = String::from_utf8_lossy(&run.stderr);
        assert_names(&err, &[&format!("bad-{i}.json"), field]);
        assert!(!tmp.path().join(format!("out-{i}.partial")).exists());
    }
}

/// A quantization_config of another method (or not an object) is not read as BitNet.
#[test]
fn another_quantization_method_is_refused() {
    let (_t, dir) = variant("gptq", |_, c| {
        c["quantization_config"]["quant_method"] = "gptq".into()
    });
    assert_names(&load_error(&dir), &["config.json", "quant_method", "gptq"]);
    let (_t, dir) = variant("not-object", |_, c| {
        c["quantization_config"] = "bitnet".into()
    });
    assert_names(
        &load_error(&dir),
        &["config.json", "quantization_config", "object"],
    );
}

/// A dataset that cannot work is refused before any work, the same way by every command: a
/// prompt longer than the context (eval used to score it as a silent 0%), and a file too
/// small to have a validation split (train used to "train" on an empty one).
#[test]
fn datasets_that_cannot_work_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let bitsvf = |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_bitsvf"))
            .args(args)
            .output()
            .unwrap()
    };
    let long = tmp.path().join("long.jsonl");
    let mut lines: Vec<String> = (0..40)
        .map(|i| format!(r#"{{"prompt": "add {i} 1", "answer": "{}"}}"#, i + 1))
        .collect();
    lines.push(format!(
        r#"{{"prompt": "{}", "answer": "1"}}"#,
        "a ".repeat(400)
    ));
    std::fs::write(&long, lines.join("\n")).unwrap();
    for cmd in [
        vec!["eval", "--data", long.to_str().unwrap()],
        vec!["train", "--data", long.to_str().unwrap(), "--steps", "1"],
    ] {
        let mut args = cmd.clone();
        let out = tmp.path().join("e.safetensors");
        if cmd[0] == "train" {
            args.extend(["--out", out.to_str().unwrap()]);
        }
        let r = bitsvf(&args);
        assert!(!r.status.success(), "{cmd:?}");
        assert_names(
            &String::from_utf8_lossy(&r.stderr),
            &["dataset `long`", "item 41", "context"],
        );
        assert!(!out.exists());
    }
    let tiny = tmp.path().join("tiny.jsonl");
    std::fs::write(&tiny, "{\"prompt\": \"add 1 1\", \"answer\": \"2\"}\n").unwrap();
    let out = tmp.path().join("tiny.safetensors");
    let r = bitsvf(&[
        "train",
        "--data",
        tiny.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(!r.status.success());
    assert_names(
        &String::from_utf8_lossy(&r.stderr),
        &["dataset `tiny`", "split"],
    );
    assert!(!out.exists());
}

/// A second run on the same --out is refused at once, naming the pid of the one running.
#[test]
fn a_second_run_on_the_same_out_is_refused() {
    use std::io::Write;
    let tmp = tempfile::tempdir().unwrap();
    let partial = tmp.path().join("out.partial");
    std::fs::create_dir_all(&partial).unwrap();
    let mut lock = std::fs::File::create(partial.join("lock")).unwrap();
    lock.try_lock().unwrap();
    write!(lock, "4242").unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_bitsvf"))
        .args([
            "run",
            "--quick",
            "--out",
            tmp.path().join("out").to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert_names(
        &String::from_utf8_lossy(&out.stderr),
        &["out.partial", "in use by another bitsvf run", "pid 4242"],
    );
    assert_eq!(
        std::fs::read_dir(&partial).unwrap().count(),
        1,
        "nothing else created"
    );
}
