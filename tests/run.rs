//! `bitsvf run` end to end: the quick run's handoff, its reuse and resumption, the golden
//! manifest, a generator endpoint, and the base handed off when no mixture beats it.

mod common;
use common::*;
use std::process::Command;

/// When no mixture beats the base on the selection split by more than its noise, the base is
/// handed off: no mixture entry or file, a note saying why, no mixture columns; the handoff
/// still inspects, serves two-pass generation, and `eval --mixture` says there is none.
#[test]
fn run_hands_off_the_base_when_no_mixture_beats_it() {
    let tmp = tempfile::tempdir().unwrap();
    let (out, cache) = (tmp.path().join("out"), tmp.path().join("cache"));
    let config = tmp.path().join("strict.json");
    std::fs::write(&config, r#"{"search": {"hand_off_within_noise": false}}"#).unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_bitsvf"))
        .args(["run", "--quick", "--out", out.to_str().unwrap()])
        .args(["--config", config.to_str().unwrap()])
        .args(["--cache-dir", cache.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("manifest.json")).unwrap()).unwrap();
    let selection = &manifest["metrics"]["search"]["selection"];
    assert_eq!(selection["handed_off"], false, "{selection}");
    assert!(manifest["mixture"].is_null());
    assert!(!out.join("experts/mixture.safetensors").exists());
    let notes = manifest["notes"].to_string();
    assert!(notes.contains("No mixture is handed off"), "{notes}");
    let columns = manifest["metrics"]["test"]["columns"].to_string();
    assert!(!columns.contains("mixture"), "{columns}");
    let o = bitsvf(&["inspect", out.to_str().unwrap()]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stdout).contains("no mixture"));
    let o = bitsvf(&["eval", "--mixture", out.to_str().unwrap()]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("has no mixture") && err.contains("selection"),
        "{err}"
    );
    let o = Command::new(env!("CARGO_BIN_EXE_bitsvf"))
        .args(["generate", "--experts", out.to_str().unwrap()])
        .args(["--prompt", "count a in banana?", "--dispatch", "classifier"])
        .args(["--cache-dir", cache.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    // Six labelled examples or more: every third is held out to check CEM's mixture.
    let shots = tmp.path().join("shots.jsonl");
    let lines: Vec<String> = ["aab", "bab", "aaa", "abc", "cab", "bbb"]
        .iter()
        .map(|w| {
            let n = w.matches('a').count();
            format!("{{\"prompt\": \"count a in {w}?\", \"answer\": \"{n}\"}}")
        })
        .collect();
    std::fs::write(&shots, lines.join("\n")).unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_bitsvf"))
        .args(["generate", "--experts", out.to_str().unwrap()])
        .args(["--prompt", "count a in banana?", "--dispatch", "cem"])
        .args(["--shots", shots.to_str().unwrap()])
        .args(["--cache-dir", cache.to_str().unwrap()])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(err.contains("on 2 held-out examples"), "{err}");
}

/// `bitsvf run --quick` end to end: the handoff is complete, reloads, reproduces its mixture
/// figures, serves two-pass generation, refuses to be overwritten, and an interrupted run
/// resumes from its finished stages.
#[test]
fn run_quick_writes_a_handoff_that_reloads_and_resumes() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let cache = tmp.path().join("cache");
    // A user dataset beside the built-in domains.
    let data = tmp.path().join("double.jsonl");
    let lines: Vec<String> = (0..300)
        .map(|i| format!("{{\"prompt\": \"dbl {i}=\", \"answer\": \"{}\"}}", 2 * i))
        .collect();
    std::fs::write(&data, lines.join("\n")).unwrap();
    let run = |out: &std::path::Path| {
        Command::new(env!("CARGO_BIN_EXE_bitsvf"))
            .args(["run", "--quick", "--out", out.to_str().unwrap()])
            .args(["--cache-dir", cache.to_str().unwrap()])
            .args(["--data", data.to_str().unwrap(), "--verifier", "numeric"])
            .output()
            .unwrap()
    };
    let o = run(&out);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(!tmp.path().join("out.partial").exists());

    // The handoff of DESIGN.md §6.
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("manifest.json")).unwrap()).unwrap();
    let experts = manifest["experts"].as_array().unwrap();
    assert!((3..=10).contains(&experts.len()));
    for e in experts {
        for key in ["name", "file", "domains", "val_accuracy"] {
            assert!(!e[key].is_null(), "expert without {key}: {e}");
        }
        assert!(out.join(e["file"].as_str().unwrap()).is_file());
    }
    let alpha = manifest["mixture"]["alpha"].as_array().unwrap();
    assert_eq!(
        alpha.len(),
        manifest["mixture"]["experts"].as_array().unwrap().len()
    );
    assert!(out.join("experts/mixture.safetensors").is_file());
    assert!(out.join("model/base.safetensors").is_file());
    let test = &manifest["metrics"]["test"]["accuracy"];
    assert_eq!(test.as_object().unwrap().len(), 5);
    assert!(test["double"]["base"].is_number());
    assert!(out.join("data/double.json").is_file());
    for plot in [
        "capability",
        "discovery",
        "training",
        "pareto",
        "hypervolume",
        "memory",
    ] {
        let bytes = std::fs::read(out.join(format!("plots/{plot}.png"))).unwrap();
        assert_eq!(&bytes[..4], b"\x89PNG");
    }
    let report = std::fs::read_to_string(out.join("report.md")).unwrap();
    assert!(report.contains("plots/pareto.png") && report.contains("dispatch: classifier"));
    let metrics = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    let keys: Vec<String> = metrics
        .lines()
        .flat_map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            v.as_object().unwrap().keys().cloned().collect::<Vec<_>>()
        })
        .collect();
    assert!(keys
        .iter()
        .any(|k| k.starts_with("stage2/expert_") && k.ends_with("/loss")));
    assert!(keys.iter().any(|k| k == "stage3/search/hypervolume"));
    assert!(std::fs::read_dir(out.join("experts")).unwrap().all(|f| f
        .unwrap()
        .path()
        .extension()
        .unwrap()
        == "safetensors"));

    // Rerunning the finished command is a no-op; other settings never overwrite it.
    let before = std::fs::read(out.join("manifest.json")).unwrap();
    let again = run(&out);
    assert!(again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("finished before"));
    assert_eq!(std::fs::read(out.join("manifest.json")).unwrap(), before);
    let other = Command::new(env!("CARGO_BIN_EXE_bitsvf"))
        .args([
            "run",
            "--quick",
            "--seed",
            "1",
            "--out",
            out.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(!other.status.success());
    assert!(String::from_utf8_lossy(&other.stderr).contains("already exists"));

    // Reload: inspect checks every file; eval --mixture reproduces the manifest exactly.
    let o = bitsvf(&["inspect", out.to_str().unwrap()]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stdout).contains("mixture α*"));
    let o = Command::new(env!("CARGO_BIN_EXE_bitsvf"))
        .args(["eval", "--mixture", out.to_str().unwrap(), "--json"])
        .args(["--cache-dir", cache.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let rows: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(rows.as_array().unwrap().len(), 10);

    // Two-pass generation with every strategy.
    let shots = tmp.path().join("shots.jsonl");
    std::fs::write(
        &shots,
        "{\"prompt\": \"count a in aab?\", \"answer\": \"2\"}\n{\"prompt\": \"count b in bbb?\", \"answer\": \"3\"}\n",
    )
    .unwrap();
    for dispatch in ["prompt", "classifier", "cem", "none"] {
        let o = Command::new(env!("CARGO_BIN_EXE_bitsvf"))
            .args(["generate", "--experts", out.to_str().unwrap()])
            .args(["--prompt", "count a in banana?", "--dispatch", dispatch])
            .args(["--shots", shots.to_str().unwrap()])
            .args(["--cache-dir", cache.to_str().unwrap()])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(o.status.success(), "{dispatch}: {err}");
        assert!(err.contains(&format!("pass 1 ({dispatch})")), "{err}");
    }

    // Served: every expert and the mixture are models; auto dispatches by the classifier;
    // SIGTERM stops the server cleanly.
    serve_the_handoff(&out, &cache, &manifest);

    // Resume: a copy of the run, interrupted before its evaluation, finishes from there.
    let partial = tmp.path().join("resumed.partial");
    std::fs::create_dir_all(partial.join("stages")).unwrap();
    for entry in ["run-config.json", "base-hash.json"] {
        std::fs::copy(out.join(entry), partial.join(entry)).unwrap();
    }
    for dir in ["stages", "experts", "model", "data"] {
        std::fs::create_dir_all(partial.join(dir)).unwrap();
        for f in std::fs::read_dir(out.join(dir)).unwrap() {
            let f = f.unwrap().path();
            std::fs::copy(&f, partial.join(dir).join(f.file_name().unwrap())).unwrap();
        }
    }
    std::fs::remove_file(partial.join("stages/7-evaluate.json")).unwrap();
    // The finished run deleted its per-step logs; an interrupted one still has them.
    for e in experts
        .iter()
        .map(|e| e["name"].as_str().unwrap())
        .chain(["classifier"])
    {
        std::fs::write(partial.join(format!("experts/{e}.metrics.jsonl")), "").unwrap();
    }
    let o = run(&tmp.path().join("resumed"));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(
        err.contains("stage 5-search: finished before, skipped"),
        "{err}"
    );
    assert!(err.contains("stage 7-evaluate (at"), "{err}");
    let resumed: serde_json::Value =
        serde_json::from_slice(&std::fs::read(tmp.path().join("resumed/manifest.json")).unwrap())
            .unwrap();
    assert_eq!(resumed["mixture"], manifest["mixture"]);
    assert_eq!(resumed["metrics"]["test"], manifest["metrics"]["test"]);
}

/// A chat-completions endpoint on 127.0.0.1 that answers every request with the same lines:
/// `per_domain` problems of each quick-run domain as `PROMPT => ANSWER`, plus one wrong
/// answer. Returns its URL and the request counter.
fn mock_generator(per_domain: usize) -> (String, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    use bitsvf::tasks::{Difficulty, Domain};
    use rand::SeedableRng;
    use std::io::{BufRead, BufReader, Read, Write};
    let mut rng = rand::rngs::StdRng::seed_from_u64(9);
    let mut lines = vec!["count a in aaa? => 7".to_string()];
    for d in [Domain::Count, Domain::Sort, Domain::Compare, Domain::Parity] {
        for i in 0..per_domain {
            let it = d.generate(&mut rng, Difficulty::new(1 + (i % 5) as u32).unwrap());
            lines.push(format!("{} => {}", it.prompt, it.answer));
        }
    }
    let body = serde_json::json!({
        "choices": [{"message": {"role": "assistant", "content": lines.join("\n")}}],
        "usage": {"total_tokens": 1000},
    })
    .to_string();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/v1", listener.local_addr().unwrap());
    let count = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = count.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let mut stream = stream.unwrap();
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut length = 0;
            loop {
                let mut line = String::new();
                if reader.read_line(&mut line).unwrap_or(0) == 0 || line.trim().is_empty() {
                    break;
                }
                if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                    length = v.trim().parse().unwrap();
                }
            }
            let mut request = vec![0; length];
            reader.read_exact(&mut request).unwrap();
            counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let head = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            );
            stream.write_all(head.as_bytes()).unwrap();
            stream.write_all(body.as_bytes()).unwrap();
        }
    });
    (url, count)
}

/// `run --generator-url`: the experts train on verified items from the endpoint, and a rerun
/// takes them from the on-disk cache without a single request.
#[test]
fn run_quick_with_a_generator_endpoint_uses_and_caches_its_items() {
    let (url, requests) = mock_generator(80);
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("cache");
    let run = |out: &str| {
        Command::new(env!("CARGO_BIN_EXE_bitsvf"))
            .args([
                "run",
                "--quick",
                "--out",
                tmp.path().join(out).to_str().unwrap(),
            ])
            .args([
                "--cache-dir",
                cache.to_str().unwrap(),
                "--generator-url",
                &url,
            ])
            .env("BITSVF_GENERATOR_KEY", "sk-test")
            .output()
            .unwrap()
    };
    let o = run("a");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let first = requests.load(std::sync::atomic::Ordering::SeqCst);
    assert!((1..=8).contains(&first), "{first} requests");
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(tmp.path().join("a/manifest.json")).unwrap())
            .unwrap();
    let source = manifest["options"]["data_source"].as_str().unwrap();
    assert!(source.starts_with("generator http://127.0.0.1"), "{source}");
    assert!(!serde_json::to_string(&manifest)
        .unwrap()
        .contains("sk-test"));
    let stage: serde_json::Value = serde_json::from_slice(
        &std::fs::read(tmp.path().join("a/stages/4-data-compare.json")).unwrap(),
    )
    .unwrap();
    let items = stage["result"].as_array().unwrap();
    assert_eq!(items.len(), 40);
    assert!(items.iter().all(|it| it["domain"] == "compare"));
    let o = run("b");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(requests.load(std::sync::atomic::Ordering::SeqCst), first);
}

/// Golden test: the quick run with seed 0 reproduces every figure of the manifest that
/// bitsvf wrote for it (times and machine-dependent fields aside): the same seed gives the same
/// search, the same selection and the same handoff on any machine, because the search's latency
/// objective is modelled from the work per token, not timed.
#[test]
fn run_quick_seed_0_reproduces_the_golden_manifest() {
    assert_golden_with_workers(1);
}

/// The same run as two ranks on threads of one process (`--workers 2`, the default on a
/// machine with two cores or more): the same manifest, and progress shown once.
#[test]
fn two_workers_reproduce_the_golden_manifest() {
    let err = assert_golden_with_workers(2);
    assert_eq!(err.matches("stage 1-load-verify").count(), 1, "{err}");
}

/// Runs the golden quick run with `--workers n` and compares its manifest with the golden
/// one; returns its stderr.
fn assert_golden_with_workers(n: usize) -> String {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let o = golden_quick_run(&out, &tmp.path().join("cache"))
        .args(["--workers", &n.to_string()])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let read = |p: &std::path::Path| -> serde_json::Value {
        serde_json::from_slice(&std::fs::read(p).unwrap()).unwrap()
    };
    let golden = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/quick-run-seed0.manifest.json");
    let mut differences = Vec::new();
    manifest_differences(
        &read(&golden),
        &read(&out.join("manifest.json")),
        "",
        &mut differences,
    );
    assert!(
        differences.is_empty(),
        "{} differences from the golden manifest with {n} workers:\n{}",
        differences.len(),
        differences.join("\n")
    );
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let path = entry.unwrap().path();
        let target = to.join(path.file_name().unwrap());
        if path.is_dir() {
            copy_dir(&path, &target);
        } else {
            std::fs::copy(&path, &target).unwrap();
        }
    }
}

/// A handoff written by bitsvf 0.1.0 (no `format_version`, no plots/ or stages/) still opens,
/// summarizes and reproduces its mixture figures.
#[test]
fn a_handoff_of_bitsvf_0_1_still_opens_and_reproduces_its_mixture() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("handoff");
    copy_dir(
        &std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/handoff-0.1"),
        &dir,
    );
    let o = bitsvf(&["inspect", dir.to_str().unwrap()]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let summary = String::from_utf8_lossy(&o.stdout);
    assert!(
        summary.contains("bitsvf 0.1.0") && summary.contains("mixture α*"),
        "{summary}"
    );
    let o = bitsvf(&[
        "eval",
        "--mixture",
        dir.to_str().unwrap(),
        "--json",
        "--cache-dir",
        tmp.path().join("cache").to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let rows: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let rows = rows.as_array().unwrap();
    assert_eq!(rows.len(), 8, "4 domains × 2 mixture forms");
    assert!(rows.iter().all(|r| r["manifest"] == r["measured"]));
}

/// `bitsvf serve --experts OUT` on a free port, driven over HTTP, then stopped by SIGTERM.
fn serve_the_handoff(out: &std::path::Path, cache: &std::path::Path, manifest: &serde_json::Value) {
    use std::io::BufRead;
    let mut child = Command::new(env!("CARGO_BIN_EXE_bitsvf"))
        .args(["serve", "--experts", out.to_str().unwrap(), "--port", "0"])
        .args(["--cache-dir", cache.to_str().unwrap()])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufReader::new(child.stderr.take().unwrap()).lines();
    let ready = lines
        .by_ref()
        .map(|l| l.unwrap())
        .find(|l| l.starts_with("bitsvf serve: http://"))
        .expect("the server says where it listens");
    let url = ready["bitsvf serve: ".len()..]
        .split(' ')
        .next()
        .unwrap()
        .to_string();
    let drain = std::thread::spawn(move || lines.map(|l| l.unwrap()).collect::<Vec<_>>());
    let get = |path: &str| -> serde_json::Value {
        serde_json::from_reader(
            ureq::get(&format!("{url}{path}"))
                .call()
                .unwrap()
                .into_reader(),
        )
        .unwrap()
    };
    let post = |body: serde_json::Value| -> serde_json::Value {
        let r = ureq::post(&format!("{url}/v1/completions"))
            .set("Content-Type", "application/json")
            .send_string(&body.to_string())
            .unwrap();
        serde_json::from_reader(r.into_reader()).unwrap()
    };
    let ids: Vec<String> = (get("/v1/models")["data"].as_array().unwrap().iter())
        .map(|m| m["id"].as_str().unwrap().to_string())
        .collect();
    for e in manifest["experts"].as_array().unwrap() {
        assert!(
            ids.contains(&format!("bitsvf/{}", e["name"].as_str().unwrap())),
            "{ids:?}"
        );
    }
    assert!(ids.contains(&"bitsvf/mixture".to_string()), "{ids:?}");
    let first = manifest["experts"][0]["name"].as_str().unwrap();
    let v = post(serde_json::json!({"model": format!("bitsvf/{first}"),
        "prompt": "count a in banana?", "max_tokens": 6, "temperature": 0}));
    assert_eq!(v["bitsvf"]["adapter"], first, "{v}");
    let v = post(
        serde_json::json!({"model": "bitsvf/auto", "prompt": "count a in banana?",
        "max_tokens": 6, "temperature": 0}),
    );
    assert_eq!(v["bitsvf"]["dispatch"], "classifier", "{v}");
    assert!(
        v["usage"]["completion_tokens"].as_u64().unwrap() >= 1,
        "{v}"
    );
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let exit = child.wait().unwrap();
    let rest = drain.join().unwrap();
    assert!(exit.success(), "{exit}: {rest:?}");
    assert!(rest.iter().any(|l| l.contains("stopped")), "{rest:?}");
}
