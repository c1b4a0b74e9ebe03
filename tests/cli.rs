//! The `bitsvf` binary end to end.

mod common;
use bitsvf::engine::checkpoint::st::TensorFiles;
use common::*;
use std::process::Command;

#[test]
fn logits_command_reproduces_transformers() {
    let reference = TensorFiles::open(&[fixture().join("reference_logits.safetensors")]).unwrap();
    let ids: Vec<i64> = reference
        .get("input_ids")
        .unwrap()
        .data
        .chunks_exact(8)
        .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
        .collect();
    let rows: Vec<String> = ids
        .chunks(16)
        .map(|r| {
            r.iter()
                .map(|x| x.to_string())
                .collect::<Vec<_>>()
                .join(",")
        })
        .collect();
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("logits.safetensors");
    let o = bitsvf(&[
        "logits",
        fixture().to_str().unwrap(),
        "--tokens",
        &rows.join(";"),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let ours = TensorFiles::open(&[out]).unwrap();
    let l = ours.get("logits").unwrap();
    assert_eq!(l.shape, &[2, 16, 96]);
    let (a, b) = (
        l.to_f32().unwrap(),
        reference.get("logits").unwrap().to_f32().unwrap(),
    );
    let mean = a.iter().zip(&b).map(|(x, y)| (x - y).abs()).sum::<f32>() / a.len() as f32;
    assert!(mean < 1e-3, "mean |Δ| {mean}");
    for (x, y) in a.chunks(96).zip(b.chunks(96)) {
        assert_eq!(
            bitsvf::engine::model::argmax(x),
            bitsvf::engine::model::argmax(y)
        );
    }
}

#[test]
fn inspect_json_reports_the_fixture() {
    let o = bitsvf(&["inspect", fixture().to_str().unwrap(), "--json"]);
    assert!(o.status.success());
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["format"], "hf-packed (autobitlinear)");
    // 2 layers × (64·64·2 + 32·64·2 + 128·64·3) ternary weights
    assert_eq!(
        v["ternary_parameters"],
        2 * (2 * 4096 + 2 * 2048 + 3 * 8192)
    );
    assert_eq!(v["matrices"].as_array().unwrap().len(), 14);
    assert_eq!(v["matrices"][4]["shape"], serde_json::json!([128, 64]));
    let zeros = v["ternary"]["zeros"].as_f64().unwrap();
    assert!(
        zeros > 0.3 && zeros < 0.37,
        "uniform random ternary: about a third zeros"
    );
}

/// The output head quantized to Q8_0: its change to the next-token distribution is measured
/// by `inspect --head`, and `generate --head q8_0` decodes with it.
#[test]
fn a_q8_0_head_is_measured_and_generates() {
    let o = bitsvf(&["inspect", "--head", "q8_0", "--json"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let head = &v["head"];
    // 128 × 256: one byte per value and an f16 scale per 32.
    assert_eq!(head["bytes"], 128 * 256 + 2 * 128 * 8);
    assert_eq!(head["stored"], "f32");
    assert_eq!(head["positions"], 8 * 64);
    let agreement = head["argmax_agreement"].as_f64().unwrap();
    let kl = head["mean_kl"].as_f64().unwrap();
    assert!(agreement > 0.98 && agreement < 1.0 + 1e-12, "{agreement}");
    assert!(kl > 0.0 && kl < 1e-3, "{kl}");
    // Greedy text through either head: the same on this prompt.
    let text = |head: &str| {
        let o = bitsvf(&["generate", "--prompt", "12+7=", "--head", head]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        assert!(String::from_utf8_lossy(&o.stderr).contains("tok/s"));
        o.stdout
    };
    assert_eq!(text("q8_0"), text("stored"));
}

/// `convert --type tq2_0` on the default model, whose FFN rows (640) are not whole 256-weight
/// blocks: a clear error naming the matrix, and no file.
#[test]
fn convert_to_gguf_refuses_rows_that_are_not_whole_blocks() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("m.gguf");
    let o = bitsvf(&["convert", "--out", out.to_str().unwrap(), "--type", "tq2_0"]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("640") && err.contains("TQ2_0"), "{err}");
    assert!(!out.exists());
}

#[test]
fn bench_measures_each_mode() {
    let o = bitsvf(&[
        "bench",
        "--mode",
        "ternary,dense",
        "--head",
        "q8_0",
        "--repeats",
        "2",
        "--prompt-tokens",
        "8",
        "--gen-tokens",
        "3",
        "--bandwidth-mb",
        "16",
        "--json",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&o.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2);
    for (v, mode) in lines.iter().zip(["ternary", "dense"]) {
        assert_eq!(v["mode"], mode);
        assert_eq!(v["head"], "q8_0");
        assert_eq!(
            (v["prompt_tokens"].as_u64(), v["gen_tokens"].as_u64()),
            (Some(8), Some(3))
        );
        assert!(v["decode"]["mean"].as_f64().unwrap() > 0.0);
        assert!(v["read_bandwidth_gb_s"].as_f64().unwrap() > 0.0);
    }
    // Dense linears read 4 bytes per weight, packed ones a quarter byte and their scales.
    let bytes = |v: &serde_json::Value| v["weight_bytes_per_token"].as_f64().unwrap();
    assert!(bytes(&lines[1]) > 10.0 * bytes(&lines[0]));
}

#[test]
fn dequantize_verify_writes_a_verified_float_model() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("f32");
    let o = bitsvf(&[
        "dequantize",
        fixture().to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--verify",
        "--json",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["all_exact"], true);
    assert_eq!(v["act_quant_kept"]["argmax_agreement"], 1.0);
    assert!(v["act_quant_kept"]["mean_kl"].as_f64().unwrap() < 1e-6);
    assert!(v["act_quant_dropped"]["mean_kl"].as_f64().unwrap() > 0.0);
    assert!(out.join("model.safetensors").is_file() && out.join("config.json").is_file());
    // A config transformers builds BitNetForCausalLM from: the head width spelled out.
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["model_type"], "bitnet");
    assert_eq!(cfg["head_dim"], 16);
    // Its float weights re-load, as the same model.
    let o = bitsvf(&["inspect", out.to_str().unwrap(), "--json"]);
    let w: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let h = bitsvf(&["inspect", fixture().to_str().unwrap(), "--json"]);
    let h: serde_json::Value = serde_json::from_slice(&h.stdout).unwrap();
    assert_eq!(w["content_hash"], h["content_hash"]);
}

#[test]
fn bad_tokens_are_a_clear_error() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("l.safetensors");
    for (tokens, want) in [
        ("1,2;3", "equal length"),
        ("1,x", "`x` is not a token id"),
        ("1,999", "out of range"),
    ] {
        let o = bitsvf(&[
            "logits",
            fixture().to_str().unwrap(),
            "--tokens",
            tokens,
            "--out",
            out.to_str().unwrap(),
        ]);
        assert!(!o.status.success());
        let e = String::from_utf8_lossy(&o.stderr);
        assert!(e.contains(want) && !e.contains("panicked"), "{e}");
        assert!(!out.exists());
    }
}

#[test]
fn default_model_is_embedded_and_eval_is_deterministic() {
    let o = bitsvf(&["inspect", "--json"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["format"], "bitsvf native");
    assert_eq!(v["config"]["vocab_size"], 128);
    assert!(v["bytes_on_disk"].as_u64().unwrap() <= 5_000_000);
    let run = || {
        let o = bitsvf(&[
            "eval",
            "--domains",
            "add,compare,copy",
            "--n",
            "10",
            "--seed",
            "3",
            "--json",
        ]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        serde_json::from_slice::<serde_json::Value>(&o.stdout).unwrap()
    };
    let (a, b) = (run(), run());
    assert_eq!(a, b);
    assert_eq!(a["model"], "<default model>");
    for d in ["add", "compare", "copy"] {
        assert_eq!(a["domains"][d]["n"], 10);
        let acc = a["domains"][d]["accuracy"].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&acc));
    }
    let o = bitsvf(&["eval", "--domains", "add,nope"]);
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && e.contains("nope") && e.contains("add"),
        "{e}"
    );
}

#[test]
fn eval_on_user_jsonl_and_its_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let f = tmp.path().join("sums.jsonl");
    let mut text = String::new();
    for i in 0..60 {
        text.push_str(&format!(
            "{{\"prompt\": \"{i}+1=\", \"answer\": \"{}\"}}\n",
            i + 1
        ));
    }
    std::fs::write(&f, &text).unwrap();
    let o = bitsvf(&[
        "eval",
        "--data",
        f.to_str().unwrap(),
        "--verifier",
        "numeric",
        "--json",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let n = v["domains"]["sums"]["n"].as_u64().unwrap();
    assert!(
        n > 0 && n < 20,
        "about a tenth of 60 items are in the test split: {n}"
    );
    text.push_str("{\"prompt\": \"1+1=\"}\n");
    std::fs::write(&f, &text).unwrap();
    let o = bitsvf(&["eval", "--data", f.to_str().unwrap()]);
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && e.contains("sums.jsonl:61") && e.contains("answer"),
        "{e}"
    );
}

#[test]
fn compare_options_measures_every_option_and_reuses_its_experts() {
    let tmp = tempfile::tempdir().unwrap();
    let experts = tmp.path().join("experts");
    let run = || {
        let o = Command::new(env!("CARGO_BIN_EXE_bitsvf"))
            .args([
                "compare-options",
                "--quick",
                "--steps",
                "3",
                "--n",
                "8",
                "--rank",
                "16",
                "--json",
                "--experts",
                experts.to_str().unwrap(),
            ])
            .env("BITSVF_CACHE", tmp.path().join("cache"))
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        serde_json::from_slice::<serde_json::Value>(&o.stdout).unwrap()
    };
    let v = run();
    let options = v["options"].as_array().unwrap();
    let names: Vec<&str> = options
        .iter()
        .map(|o| o["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        [
            "dequantize",
            "alpha-layer",
            "alpha-channel",
            "hybrid-lowrank",
            "requantize",
            "requantize-channel"
        ]
    );
    let f32_bytes = v["f32_bytes"].as_f64().unwrap();
    for o in options {
        let acc = o["accuracy"].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&acc), "{o}");
        assert!(o["bytes"].as_f64().unwrap() > 0.0 && o["tokens_per_s"].as_f64().unwrap() > 0.0);
    }
    // The ternary forms stay far below f32; the hybrid under a quarter of it.
    assert!(options[3]["bytes"].as_f64().unwrap() < f32_bytes / 4.0);
    assert!(options[1]["bytes"].as_f64().unwrap() < f32_bytes / 8.0);
    // One expert per parameterization (requantize reuses the paper expert), reused on rerun.
    let mut files: Vec<_> = std::fs::read_dir(&experts)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.ends_with("_count.safetensors"))
        .collect();
    files.sort();
    assert_eq!(
        files,
        [
            "alpha-channel_count.safetensors",
            "alpha-layer_count.safetensors",
            "low-rank_count.safetensors",
            "paper_count.safetensors"
        ]
    );
    let stamp = |n: &str| {
        std::fs::metadata(experts.join(n))
            .unwrap()
            .modified()
            .unwrap()
    };
    let before = stamp("paper_count.safetensors");
    let again = run();
    assert_eq!(stamp("paper_count.safetensors"), before);
    assert_eq!(again["options"][0]["accuracy"], v["options"][0]["accuracy"]);

    // `mix`: a one-hot mixture evaluates exactly like its expert; mixing across
    // parameterizations is refused with the experts named.
    let cache = tmp.path().join("cache");
    let cli = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_bitsvf"))
            .args(args)
            .env("BITSVF_CACHE", &cache)
            .output()
            .unwrap()
    };
    let (paper, alpha) = (
        experts.join("paper_count.safetensors"),
        experts.join("alpha-layer_count.safetensors"),
    );
    let mixed = tmp.path().join("mixed.safetensors");
    let o = cli(&[
        "mix",
        paper.to_str().unwrap(),
        paper.to_str().unwrap(),
        "--alpha",
        "0,1",
        "--out",
        mixed.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let eval = |e: &std::path::Path| {
        let o = cli(&[
            "eval",
            "--domains",
            "count",
            "--n",
            "12",
            "--json",
            "--expert",
            e.to_str().unwrap(),
        ]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        serde_json::from_slice::<serde_json::Value>(&o.stdout).unwrap()["domains"].clone()
    };
    assert_eq!(eval(&mixed), eval(&paper));
    let o = cli(&[
        "mix",
        paper.to_str().unwrap(),
        alpha.to_str().unwrap(),
        "--alpha",
        "0.5,0.5",
        "--out",
        tmp.path().join("bad.safetensors").to_str().unwrap(),
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("cannot be mixed"),
        "{err}"
    );
    assert!(!tmp.path().join("bad.safetensors").exists());
}

#[test]
fn discover_reports_capability_directions_and_a_grouping() {
    let tmp = tempfile::tempdir().unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_bitsvf"))
        .args(["discover", "--n", "5", "--grad-items", "4", "--json"])
        .env("BITSVF_CACHE", tmp.path())
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["accuracy"].as_object().unwrap().len(), 13);
    let cos = v["similarity"]["cosine"].as_array().unwrap();
    assert_eq!(cos.len(), 13);
    for (i, row) in cos.iter().enumerate() {
        assert!((row[i].as_f64().unwrap() - 1.0).abs() < 1e-6);
    }
    let n = v["experts"].as_array().unwrap().len();
    assert!((3..=10).contains(&n), "{n} experts");
    assert!(v["reason"].as_str().unwrap().contains(&format!("N = {n}")));
}

#[test]
fn export_adapter_writes_peft_and_gguf_loras_of_a_handoffs_experts() {
    let handoff = fixture().parent().unwrap().join("handoff-0.1");
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("cache");
    let export = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_bitsvf"))
            .args(["export-adapter", handoff.to_str().unwrap()])
            .args(args)
            .args(["--cache-dir", cache.to_str().unwrap()])
            .output()
            .unwrap()
    };
    let peft = tmp.path().join("compare-peft");
    let o = export(&[
        "--name",
        "compare",
        "--format",
        "peft",
        "--out",
        peft.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let said = String::from_utf8_lossy(&o.stdout);
    assert!(said.contains("keeps 100.00%"), "{said}");
    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(peft.join("adapter_config.json")).unwrap()).unwrap();
    assert_eq!(config["peft_type"], "LORA");
    assert_eq!(config["r"], config["lora_alpha"]);
    let tf = TensorFiles::open(&[peft.join("adapter_model.safetensors")]).unwrap();
    assert_eq!(tf.names().count(), 2 * 3 * 4);

    let gguf = tmp.path().join("mixture.gguf");
    let o = export(&[
        "--name",
        "mixture",
        "--format",
        "gguf-lora",
        "--rank",
        "8",
        "--out",
        gguf.to_str().unwrap(),
    ]);
    let said = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(
        said.contains("rank-8") && !said.contains("keeps 100.00%"),
        "{said}"
    );
    let g = bitsvf::engine::checkpoint::gguf::Gguf::open(&gguf).unwrap();
    assert_eq!(
        g.get("general.type").and_then(|v| v.as_str()),
        Some("adapter")
    );
    assert_eq!(g.tensor("blk.3.ffn_up.weight.lora_a").unwrap().dims[1], 8);

    // Errors: no name, an unknown one, an existing output (left as it was), rank 0.
    let err = |o: std::process::Output| {
        assert!(!o.status.success());
        String::from_utf8_lossy(&o.stderr).to_string()
    };
    let e = err(export(&[
        "--format",
        "peft",
        "--out",
        tmp.path().join("x").to_str().unwrap(),
    ]));
    assert!(e.contains("--name") && e.contains("count+sort"), "{e}");
    let e = err(export(&[
        "--name",
        "nope",
        "--format",
        "peft",
        "--out",
        tmp.path().join("y").to_str().unwrap(),
    ]));
    assert!(e.contains("no expert `nope`"), "{e}");
    let before = std::fs::read(&gguf).unwrap();
    let e = err(export(&[
        "--name",
        "compare",
        "--format",
        "gguf-lora",
        "--out",
        gguf.to_str().unwrap(),
    ]));
    assert!(e.contains("already exists"), "{e}");
    assert_eq!(std::fs::read(&gguf).unwrap(), before);
    let e = err(export(&[
        "--name",
        "compare",
        "--format",
        "peft",
        "--rank",
        "0",
        "--out",
        tmp.path().join("z").to_str().unwrap(),
    ]));
    assert!(e.contains("at least 1"), "{e}");
}

/// `convert --type i2_s` writes bitnet.cpp's I2_S GGUF of the default model (whose 640-wide
/// FFN rows TQ2_0 cannot hold) and of the transformers fixture, `--type f16` their ±1/0 codes
/// with γ in `.scale`, and `logits` of each file equal those of the source to the bit.
#[test]
fn convert_to_gguf_keeps_the_logits() {
    let dir = tempfile::tempdir().unwrap();
    let fx = fixture();
    let sources = [("default", None), ("fixture", Some(fx.to_str().unwrap()))];
    for ((name, model), ty) in sources.iter().flat_map(|s| [(s, "i2_s"), (s, "f16")]) {
        let name = format!("{name}-{ty}");
        let gguf = dir.path().join(format!("{name}.gguf"));
        let src: Vec<&str> = model.iter().copied().collect();
        let out = ["--type", ty, "--out", gguf.to_str().unwrap()];
        let o = bitsvf(&[&["convert"], &src[..], &out[..]].concat());
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let said = String::from_utf8_lossy(&o.stderr).to_string();
        assert!(said.contains(&ty.to_uppercase()), "{said}");
        let logits = |model: &[&str], out: &str| {
            let out = dir.path().join(out);
            let args = [
                &["logits"],
                model,
                &["--tokens", "1,5,9,33,17;4,8,15,16,23", "--out"],
                &[out.to_str().unwrap()],
            ]
            .concat();
            let o = bitsvf(&args);
            assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
            TensorFiles::open(&[out])
                .unwrap()
                .get("logits")
                .unwrap()
                .to_f32()
                .unwrap()
        };
        let want = logits(&src, &format!("{name}-src.safetensors"));
        let got = logits(
            &[gguf.to_str().unwrap()],
            &format!("{name}-gguf.safetensors"),
        );
        assert_eq!(got, want, "{name}");
    }
}

/// `generate --chat` renders the prompt with the chat template and encodes the text as it is
/// (the template places BOS); a model without a template, or a template that refuses the
/// conversation, is a clear error.
#[test]
fn generate_chat_renders_the_template() {
    let dir = tempfile::tempdir().unwrap();
    let template = dir.path().join("chat.jinja");
    std::fs::write(
        &template,
        "{% for m in messages %}{% if m['role'] == 'system' %}{{ m['content'] }} {% else %}Q: \
         {{ m['content'] | trim }}\n{% endif %}{% endfor %}{% if add_generation_prompt %}A:{% \
         endif %}",
    )
    .unwrap();
    let t = template.to_str().unwrap();
    let o = bitsvf(&[
        "generate",
        "--chat",
        "--chat-template",
        t,
        "--system",
        "Add.",
        "--prompt",
        " 12+7= ",
        "--max-tokens",
        "4",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    // "Add. Q: 12+7=\nA:" is 16 bytes, one token each, no BOS added.
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("prefill 16 tokens"), "{err}");
    let o = bitsvf(&["generate", "--chat", "--prompt", "hi"]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("no chat template"), "{err}");
    std::fs::write(&template, "{{ raise_exception('only users here') }}").unwrap();
    let o = bitsvf(&["generate", "--chat", "--chat-template", t, "--prompt", "hi"]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("only users here") && err.contains("chat.jinja"),
        "{err}"
    );
}

/// A float (Llama-style) base goes through the same commands as a ternary one, as
/// Transformer² runs SVF on Llama: `inspect` says its linears are float, an SVF expert trains
/// over them (dense, or over the stored matrices as `--base packed`) and evaluates, and
/// `--ternarize` makes it a BitNet model.
#[test]
fn a_float_base_trains_and_evaluates_an_svf_expert() {
    use bitsvf::engine::checkpoint::{self, Checkpoint};
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = checkpoint::load_default().unwrap().config;
    cfg.hidden_act = bitsvf::engine::config::Activation::Silu;
    cfg.sub_norms = None;
    let model = dir.path().join("float.safetensors");
    checkpoint::save_native(&Checkpoint::random_float(cfg, 3), &model).unwrap();
    let m = model.to_str().unwrap();
    let run = |args: &[&str]| {
        let o = bitsvf(args);
        assert!(
            o.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8_lossy(&o.stdout).to_string()
    };
    assert!(run(&["inspect", m]).contains("float (f32)"));
    assert!(run(&["inspect", m, "--ternarize"]).contains("ternary (BitNet"));
    let expert = dir.path().join("e.json");
    let e = expert.to_str().unwrap();
    let cache = dir.path().join("svd");
    let c = cache.to_str().unwrap();
    let train = [
        "train",
        m,
        "--domain",
        "count",
        "--steps",
        "2",
        "--batch-prompts",
        "2",
    ];
    let tail = [
        "--samples",
        "2",
        "--val-n",
        "4",
        "--cache-dir",
        c,
        "--out",
        e,
    ];
    run(&[&train[..], &tail[..]].concat());
    let out = run(&[
        "eval",
        m,
        "--domains",
        "count",
        "--n",
        "5",
        "--expert",
        e,
        "--cache-dir",
        c,
    ]);
    assert!(out.contains("count"), "{out}");
    let packed = [
        &train[..],
        &["--base", "packed", "--parameterization", "low-rank"],
        &tail[..],
    ];
    run(&packed.concat());
}
