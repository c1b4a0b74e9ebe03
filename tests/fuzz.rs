//! Fuzz harness: structure-aware mutations of every input bitsvf reads — model directories
//! (safetensors + config.json), expert files, JSONL datasets (with their verifiers) and run
//! settings files — fed to the loaders and what follows them (a forward pass, attaching an
//! expert, the context and split checks, the settings' validation). Every case must end in
//! `Ok` or a clear error: a panic, a case slower than the time limit or a peak resident set
//! over 2 GB fails the test and prints the case's seed.
//!
//! `cargo test` runs a few hundred cases; the long mode runs as many as asked, e.g.
//! `FUZZ_CASES=100000 cargo test --release --test fuzz -- --nocapture`. Inputs that once
//! crashed a loader are kept in `tests/fixtures/fuzz/` and replayed on every run.

mod common;
use bitsvf::engine::checkpoint::st::{write_safetensors, OwnedTensor};
use bitsvf::engine::checkpoint::{self, Checkpoint};
use bitsvf::engine::model::{Model, ModelOptions};
use bitsvf::pipeline::{RunConfig, RunOverrides};
use bitsvf::svf::attach::adapted_model;
use bitsvf::svf::base::Base;
use bitsvf::svf::expert::{Expert, ExpertMeta};
use bitsvf::svf::svd::SvdCache;
use bitsvf::svf::{Parameterization, Targets};
use bitsvf::tasks::{DataSource, Dataset, Verifier};
use common::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::Duration;

/// Longest a single case may take before it counts as a hang.
const CASE_LIMIT: Duration = Duration::from_secs(20);

/// Peak resident set allowed for the whole harness.
const MAX_PEAK_BYTES: u64 = 2 << 30;

/// Cases per loader: `FUZZ_CASES` split evenly over the four, or 250 each.
fn cases_per_loader() -> u64 {
    std::env::var("FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
        .map_or(250, |n| n.div_ceil(4))
}

// ---------------------------------------------------------------- mutation primitives

/// A number that breaks assumptions: 0, 1, −1, fractions, huge, NaN-like strings, types.
fn hostile_value(rng: &mut StdRng) -> Value {
    match rng.gen_range(0..16) {
        0 => json!(0),
        1 => json!(1),
        2 => json!(-1),
        3 => json!(2),
        4 => json!(1u64 << 31),
        5 => json!(1u64 << 40),
        6 => json!(1u64 << 62),
        7 => json!(u64::MAX),
        8 => json!(-1e300),
        9 => json!(1e300),
        10 => json!(0.5),
        11 => json!("NaN"),
        12 => Value::Null,
        13 => json!([1, 2]),
        14 => json!({"a": 1}),
        _ => json!(rng.gen_range(-1000i64..100_000)),
    }
}

/// Replace, remove or add a random field somewhere in `v` (objects and arrays alike).
fn mutate_json(v: &mut Value, rng: &mut StdRng, depth: usize) {
    match v {
        Value::Object(m) if !m.is_empty() => {
            let keys: Vec<String> = m.keys().cloned().collect();
            let k = &keys[rng.gen_range(0..keys.len())];
            match rng.gen_range(0..10) {
                0 => {
                    m.remove(k);
                }
                1 => {
                    m.insert(format!("unknown_{}", rng.gen::<u16>()), hostile_value(rng));
                }
                2..=4 => {
                    m.insert(k.clone(), hostile_value(rng));
                }
                _ if depth < 4 => mutate_json(m.get_mut(k).unwrap(), rng, depth + 1),
                _ => {
                    m.insert(k.clone(), hostile_value(rng));
                }
            }
        }
        Value::Array(a) if !a.is_empty() => {
            let i = rng.gen_range(0..a.len());
            match rng.gen_range(0..4) {
                0 => {
                    a.remove(i);
                }
                1 => a.push(hostile_value(rng)),
                _ => mutate_json(&mut a[i], rng, depth + 1),
            }
        }
        other => *other = hostile_value(rng),
    }
}

/// Byte-level damage to a serialized file: flips, truncation, a changed header length,
/// random bytes in the header or the data, or appended junk.
fn mutate_bytes(bytes: &mut Vec<u8>, rng: &mut StdRng) {
    if bytes.is_empty() {
        bytes.push(rng.gen());
        return;
    }
    match rng.gen_range(0..6) {
        0 => {
            let n = rng.gen_range(0..bytes.len());
            bytes.truncate(n);
        }
        1 if bytes.len() >= 8 => {
            let len = match rng.gen_range(0..4) {
                0 => 0u64,
                1 => u64::MAX,
                2 => (bytes.len() as u64).wrapping_mul(rng.gen_range(2..1000)),
                _ => rng.gen::<u64>() >> rng.gen_range(0..64),
            };
            bytes[..8].copy_from_slice(&len.to_le_bytes());
        }
        2 => {
            // Inside the JSON header, where the structure is.
            let header_end = (u64::from_le_bytes(
                bytes
                    .get(..8)
                    .and_then(|b| b.try_into().ok())
                    .unwrap_or([0; 8]),
            ) as usize)
                .saturating_add(8)
                .min(bytes.len());
            let start = 8.min(header_end);
            for _ in 0..rng.gen_range(1..4) {
                if header_end > start {
                    let i = rng.gen_range(start..header_end);
                    bytes[i] = b"0123456789{}[]\":,-.eE \\"[rng.gen_range(0..23)];
                }
            }
        }
        3 => {
            for _ in 0..rng.gen_range(1..16) {
                let i = rng.gen_range(0..bytes.len());
                bytes[i] ^= 1 << rng.gen_range(0..8);
            }
        }
        4 => {
            let i = rng.gen_range(0..bytes.len());
            let n = rng.gen_range(1..64).min(bytes.len() - i);
            rng.fill(&mut bytes[i..i + n]);
        }
        _ => bytes.extend((0..rng.gen_range(1..4096)).map(|_| rng.gen::<u8>())),
    }
}

/// Special float bit patterns for a tensor's data.
fn poison_f32(data: &mut [u8], rng: &mut StdRng, dtype_bytes: usize) {
    if data.len() < dtype_bytes {
        return;
    }
    let i = rng.gen_range(0..data.len() / dtype_bytes) * dtype_bytes;
    let value: f32 =
        [f32::NAN, f32::INFINITY, -f32::INFINITY, 0.0, 3e38, 1e-45][rng.gen_range(0..6)];
    match dtype_bytes {
        4 => data[i..i + 4].copy_from_slice(&value.to_le_bytes()),
        2 => data[i..i + 2].copy_from_slice(&half::bf16::from_f32(value).to_bits().to_le_bytes()),
        _ => data[i] = rng.gen(),
    }
}

// ---------------------------------------------------------------- the harness

/// Run every case of `loader` on a worker thread under [`CASE_LIMIT`], catching panics;
/// returns the seeds that failed and why.
fn fuzz(name: &str, cases: u64, case: impl Fn(u64) -> Result<(), String> + Send + Sync + 'static) {
    let case = std::sync::Arc::new(case);
    let mut failures = Vec::new();
    let (mut ok, mut refused) = (0u64, 0u64);
    let start = std::time::Instant::now();
    quiet_case_panics();
    for seed in 0..cases {
        let (tx, rx) = mpsc::channel();
        let c = case.clone();
        let spawned = std::thread::Builder::new()
            .name(CASE_THREAD.into())
            .spawn(move || {
                let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| c(seed)));
                let _ = tx.send(r);
            });
        spawned.unwrap();
        match rx.recv_timeout(CASE_LIMIT) {
            Ok(Ok(Ok(()))) => ok += 1,
            Ok(Ok(Err(_))) => refused += 1,
            Ok(Err(panic)) => {
                let msg = (panic.downcast_ref::<String>().cloned())
                    .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default();
                failures.push(format!("{name} seed {seed}: panic: {msg}"));
            }
            Err(_) => {
                failures.push(format!(
                    "{name} seed {seed}: no answer in {CASE_LIMIT:?} (hang)"
                ));
                break; // the stuck thread cannot be stopped; report what we have
            }
        }
    }
    let peak = peak_rss_bytes();
    eprintln!(
        "{name}: {cases} cases in {:.1} s: {ok} accepted, {refused} refused with an error, \
         {} crashes or hangs; peak RSS {:.0} MB",
        start.elapsed().as_secs_f64(),
        failures.len(),
        peak as f64 / 1e6
    );
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    assert!(peak <= MAX_PEAK_BYTES, "peak RSS {peak} bytes over 2 GB");
}

/// The name of the threads that run cases.
const CASE_THREAD: &str = "fuzz-case";

/// Panics on case threads are collected with their seed, not printed; others print as usual.
fn quiet_case_panics() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if std::thread::current().name() != Some(CASE_THREAD) {
                default(info);
            }
        }));
    });
}

/// The process's peak resident set (VmHWM), 0 where /proc is absent.
fn peak_rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    (status.lines())
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

fn scratch(name: &str, seed: u64) -> (tempfile::TempDir, PathBuf) {
    let t = tempfile::tempdir().unwrap();
    let p = t.path().join(format!("{name}-{seed}"));
    (t, p)
}

// ---------------------------------------------------------------- models

/// A mutated copy of the transformers-made fixture in `dir`.
fn mutated_model(dir: &Path, rng: &mut StdRng) -> Result<(), String> {
    let mut t = fixture_tensors();
    let mut c = fixture_config();
    let names: Vec<String> = t.keys().cloned().collect();
    for _ in 0..rng.gen_range(1..3) {
        let name = &names[rng.gen_range(0..names.len())];
        match rng.gen_range(0..8) {
            0 => {
                t.remove(name);
            }
            1 => mutate_json(&mut c, rng, 0),
            2 => {
                // Another shape with data to match.
                if let Some(x) = t.get(name) {
                    let mut shape = x.shape().to_vec();
                    let i = rng.gen_range(0..shape.len().max(1));
                    if let Some(d) = shape.get_mut(i) {
                        *d = [0, 1, *d + 1, d.saturating_sub(1), *d * 2][rng.gen_range(0..5)];
                    }
                    let width = x.bytes().len() / x.shape().iter().product::<usize>().max(1);
                    let n = shape.iter().product::<usize>() * width.max(1);
                    let dtype = x.dtype();
                    t.insert(name.clone(), OwnedTensor::raw(dtype, shape, vec![0x55; n]));
                }
            }
            3 => {
                if let Some(x) = t.get_mut(name) {
                    let w = match x.dtype() {
                        safetensors::Dtype::F32 => 4,
                        safetensors::Dtype::BF16 | safetensors::Dtype::F16 => 2,
                        _ => 1,
                    };
                    poison_f32(x.data_mut(), rng, w);
                }
            }
            4 => {
                if let Some(x) = t.get_mut(name) {
                    let d = x.data_mut();
                    if !d.is_empty() {
                        let i = rng.gen_range(0..d.len());
                        d[i] = 0xFF; // packed code 3 in a uint8 weight, junk elsewhere
                    }
                }
            }
            5 => {
                for key in [
                    "num_hidden_layers",
                    "max_position_embeddings",
                    "vocab_size",
                    "hidden_size",
                    "num_attention_heads",
                    "num_key_value_heads",
                    "intermediate_size",
                ] {
                    if rng.gen_bool(0.3) {
                        c[key] = hostile_value(rng);
                    }
                }
            }
            6 => {
                c["quantization_config"] = match rng.gen_range(0..4) {
                    0 => json!({"quant_method": "gptq"}),
                    1 => json!("bitnet"),
                    2 => json!({"quant_method": "bitnet", "linear_class": "x"}),
                    _ => json!({"quant_method": "bitnet", "quantization_mode": "online"}),
                }
            }
            _ => {
                if let Some(x) = t.remove(name) {
                    t.insert(format!("{name}.renamed"), x);
                }
            }
        }
    }
    // A mutation safetensors itself cannot serialize is no input; skip it.
    std::fs::create_dir_all(dir).unwrap();
    write_safetensors(&dir.join("model.safetensors"), &t, None).map_err(|e| e.to_string())?;
    std::fs::write(dir.join("config.json"), c.to_string()).unwrap();
    if rng.gen_bool(0.3) {
        let f = dir.join("model.safetensors");
        let mut bytes = std::fs::read(&f).unwrap();
        mutate_bytes(&mut bytes, rng);
        std::fs::write(&f, bytes).unwrap();
    }
    if rng.gen_bool(0.1) {
        let f = dir.join("config.json");
        let mut bytes = std::fs::read(&f).unwrap();
        let i = rng.gen_range(0..bytes.len());
        bytes.truncate(i);
        std::fs::write(&f, bytes).unwrap();
    }
    Ok(())
}

fn model_case(seed: u64) -> Result<(), String> {
    let mut rng = StdRng::seed_from_u64(seed);
    let (_t, dir) = scratch("model", seed);
    mutated_model(&dir, &mut rng)?;
    let ck = checkpoint::load(&dir).map_err(|e| e.to_string())?;
    let m = Model::new(&ck, ModelOptions::default()).map_err(|e| e.to_string())?;
    let ids = m.ids_tensor(&[vec![1, 2, 3]]).map_err(|e| e.to_string())?;
    m.forward(&ids, None).map_err(|e| e.to_string())?;
    Ok(())
}

#[test]
fn fuzz_model_files() {
    fuzz("model files", cases_per_loader(), model_case);
}

// ---------------------------------------------------------------- experts

/// The fixture model and a valid paper expert on it, built once.
fn expert_fixture() -> &'static (Checkpoint, tempfile::TempDir, Expert) {
    static FIXTURE: std::sync::OnceLock<(Checkpoint, tempfile::TempDir, Expert)> =
        std::sync::OnceLock::new();
    FIXTURE.get_or_init(|| {
        let ck = checkpoint::load(&fixture()).unwrap();
        let cache = tempfile::tempdir().unwrap();
        let z = (ck.linears())
            .filter(|(_, k, _)| Targets::Mlp.includes(*k))
            .map(|(n, _, l)| (n, vec![1.0f32; l.matrix.rows().min(l.matrix.cols())]))
            .collect();
        let e = Expert {
            meta: ExpertMeta {
                name: "fuzz".into(),
                base_hash: ck.content_hash(),
                parameterization: Parameterization::Paper,
                targets: Targets::Mlp,
                domains: vec!["count".into()],
                val_accuracy: 0.5,
                training: Value::Null,
            },
            z,
        };
        (ck, cache, e)
    })
}

fn expert_case(seed: u64) -> Result<(), String> {
    let mut rng = StdRng::seed_from_u64(seed);
    let (ck, cache_dir, good) = expert_fixture();
    let (_t, path) = scratch("expert", seed);
    let mut e = good.clone();
    let mut meta = serde_json::to_value(&e.meta).unwrap();
    match rng.gen_range(0..6) {
        0 => {
            let k = e.z.keys().nth(rng.gen_range(0..e.z.len())).unwrap().clone();
            let z = e.z.get_mut(&k).unwrap();
            match rng.gen_range(0..4) {
                0 => z.truncate(rng.gen_range(0..z.len())),
                1 => z.extend(std::iter::repeat_n(1.0, rng.gen_range(1..40))),
                2 => z[0] = [f32::NAN, f32::INFINITY, 1e38][rng.gen_range(0..3)],
                _ => {
                    e.z.remove(&k);
                }
            }
        }
        1 => {
            e.z.insert(
                format!("model.layers.{}.mlp.up_proj", rng.gen_range(0..9)),
                vec![1.0; rng.gen_range(0..200)],
            );
        }
        2 => e.z.clear(),
        3 => mutate_json(&mut meta, &mut rng, 0),
        4 => {
            meta["parameterization"] = json!(
                [
                    "paper",
                    "official",
                    "alpha-layer",
                    "alpha-channel",
                    "low-rank",
                    "x"
                ][rng.gen_range(0..6)]
            );
            meta["targets"] = json!(["mlp", "attn", "all", "none"][rng.gen_range(0..4)]);
        }
        _ => {}
    }
    let t: BTreeMap<String, OwnedTensor> = (e.z.iter())
        .map(|(n, z)| (format!("{n}.z"), OwnedTensor::f32(vec![z.len()], z)))
        .collect();
    let header = HashMap::from([
        (
            "format".to_string(),
            if rng.gen_bool(0.05) {
                "pt".into()
            } else {
                "bitsvf-expert".to_string()
            },
        ),
        ("expert".to_string(), meta.to_string()),
    ]);
    write_safetensors(&path, &t, Some(header)).map_err(|e| e.to_string())?;
    if rng.gen_bool(0.3) {
        let mut bytes = std::fs::read(&path).unwrap();
        mutate_bytes(&mut bytes, &mut rng);
        std::fs::write(&path, bytes).unwrap();
    }
    let loaded = Expert::load_for(&path, ck).map_err(|e| e.to_string())?;
    let cache = SvdCache::new(cache_dir.path().to_path_buf());
    let base = Base::new(ck, &cache);
    adapted_model(&base, &loaded, ModelOptions::default()).map_err(|e| e.to_string())?;
    Ok(())
}

#[test]
fn fuzz_expert_files() {
    fuzz("expert files", cases_per_loader(), expert_case);
}

// ---------------------------------------------------------------- datasets

fn dataset_case(seed: u64) -> Result<(), String> {
    let mut rng = StdRng::seed_from_u64(seed);
    let (_t, path) = scratch("data", seed);
    let path = path.with_extension("jsonl");
    let mut lines: Vec<Vec<u8>> = (0..rng.gen_range(0..60))
        .map(|i| format!(r#"{{"prompt": "add {i} 1=", "answer": "{}"}}"#, i + 1).into_bytes())
        .collect();
    for _ in 0..rng.gen_range(0..4) {
        let line: Vec<u8> = match rng.gen_range(0..9) {
            0 => b"{not json".to_vec(),
            1 => b"[1, 2, 3]".to_vec(),
            2 => br#"{"prompt": 5, "answer": "x"}"#.to_vec(),
            3 => br#"{"prompt": "", "answer": "x"}"#.to_vec(),
            4 => format!(
                r#"{{"prompt": "{}", "answer": "1"}}"#,
                "ab ".repeat(rng.gen_range(1..2000))
            )
            .into_bytes(),
            5 => vec![b'x'; rng.gen_range(1..(3 << 20))],
            6 => vec![0xff, 0xfe, b'{', 0x80],
            7 => format!(
                r#"{{"prompt": "q", "answer": "{}"}}"#,
                "9".repeat(rng.gen_range(1..40))
            )
            .into_bytes(),
            _ => b"\xef\xbb\xbf{\"prompt\": \"bom\", \"answer\": \"1\"}".to_vec(),
        };
        let at = rng.gen_range(0..=lines.len());
        lines.insert(at, line);
    }
    std::fs::write(&path, lines.join(&b'\n')).unwrap();
    let verifier: Verifier = [
        "exact",
        "numeric",
        "numeric:0.5",
        "numeric:-1",
        "numeric:x",
        "choice:A,B",
        "choice:",
        "regex:^[0-9]+$",
        "regex:(",
        "regex:(a*)*b",
        "nope",
    ][rng.gen_range(0..11)]
    .parse()
    .map_err(|e: bitsvf::tasks::TaskError| e.to_string())?;
    let d = Dataset::load_jsonl(&path, verifier).map_err(|e| e.to_string())?;
    let source = DataSource::Dataset(d.clone());
    source.check_splits().map_err(|e| e.to_string())?;
    bitsvf::eval::check_fits(128, &bitsvf::engine::tokenizer::ByteTokenizer, &source)
        .map_err(|e| e.to_string())?;
    for it in d.items.iter().take(20) {
        d.verify(it, &it.answer);
        d.verify(
            it,
            "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaac",
        );
    }
    Ok(())
}

#[test]
fn fuzz_datasets() {
    fuzz("datasets", cases_per_loader(), dataset_case);
}

// ---------------------------------------------------------------- run settings

fn settings_case(seed: u64) -> Result<(), String> {
    let mut rng = StdRng::seed_from_u64(seed);
    let (_t, path) = scratch("settings", seed);
    let quick = rng.gen_bool(0.5);
    let mut v = serde_json::to_value(RunConfig::new(quick)).unwrap();
    for _ in 0..rng.gen_range(1..4) {
        mutate_json(&mut v, &mut rng, 0);
    }
    // A subset of the fields, as a user writes them.
    if let Value::Object(m) = &mut v {
        m.retain(|_, _| rng.gen_bool(0.4));
    }
    let mut text = v.to_string().into_bytes();
    if rng.gen_bool(0.1) {
        mutate_bytes(&mut text, &mut rng);
    }
    if rng.gen_bool(0.02) {
        text = format!("{}1{}", "[".repeat(100_000), "]".repeat(100_000)).into_bytes();
    }
    std::fs::write(&path, text).unwrap();
    let cfg = RunConfig::resolve(&RunOverrides {
        quick,
        config: Some(path),
        ..RunOverrides::default()
    })
    .map_err(|e| e.to_string())?;
    cfg.validate("again").map_err(|e| e.to_string())?;
    Ok(())
}

#[test]
fn fuzz_run_settings() {
    fuzz("run settings", cases_per_loader(), settings_case);
}

// ---------------------------------------------------------------- kept regressions

/// Every input in tests/fixtures/fuzz/ that once crashed a loader: `model-*/` directories,
/// `*.expert.safetensors`, `*.jsonl` and `*.settings.json`, each refused cleanly or loaded.
#[test]
fn kept_crash_cases_are_refused_cleanly() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/fuzz");
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return;
    };
    let (ck, _, _) = expert_fixture();
    for e in entries {
        let p = e.unwrap().path();
        let name = p.file_name().unwrap().to_string_lossy().into_owned();
        let r = std::panic::catch_unwind(|| {
            if name.starts_with("model-") {
                let _ =
                    checkpoint::load(&p).and_then(|ck| Model::new(&ck, ModelOptions::default()));
            } else if name.ends_with(".expert.safetensors") {
                let _ = Expert::load_for(&p, ck);
            } else if name.ends_with(".jsonl") {
                let _ = Dataset::load_jsonl(&p, Verifier::Exact);
            } else if name.ends_with(".settings.json") {
                let o = RunOverrides {
                    config: Some(p.clone()),
                    ..RunOverrides::default()
                };
                let _ = RunConfig::resolve(&o);
            }
        });
        assert!(r.is_ok(), "{name} panics");
    }
}
