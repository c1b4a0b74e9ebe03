//! Kill-anywhere: `bitsvf run --quick` killed with SIGKILL at many moments — the start of
//! every stage, and evenly spread times across an uninterrupted run — and rerun each time
//! always completes with the manifest figures of the uninterrupted run.
//!
//! Long (about 50 quick runs), so ignored by `cargo test`; run it with
//! `cargo test --release --test kill_anywhere -- --ignored --nocapture`
//! (`KILL_POINTS=N` sets the number of evenly spread moments, default 40; the stage starts
//! come on top).

mod common;
use common::*;
use std::io::BufRead;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

fn command(out: &Path, cache: &Path) -> Command {
    let mut c = golden_quick_run(out, cache);
    c.stdout(Stdio::null()).stderr(Stdio::piped());
    c
}

/// When to kill: at the start of the `k`-th stage (0-based, as printed), or after a time.
#[derive(Debug, Clone, Copy)]
enum Moment {
    StageStart(usize),
    After(Duration),
}

/// Run until `moment`, then SIGKILL; returns whether the kill came before the run ended, and
/// the stage-start times (seconds) seen.
fn run_until(out: &Path, cache: &Path, moment: Option<Moment>) -> (bool, Vec<f64>) {
    let mut child = command(out, cache).spawn().unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = mpsc::channel();
    let t0 = Instant::now();
    let reader = std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            if line.starts_with("stage ") {
                let _ = tx.send(t0.elapsed().as_secs_f64());
            }
        }
    });
    let mut starts = Vec::new();
    let mut killed = false;
    loop {
        while let Ok(t) = rx.try_recv() {
            starts.push(t);
        }
        if let Some(status) = child.try_wait().unwrap() {
            assert!(status.success() || killed, "run failed: {status}");
            break;
        }
        let due = match moment {
            Some(Moment::StageStart(k)) => starts.len() > k,
            Some(Moment::After(d)) => t0.elapsed() >= d,
            None => false,
        };
        if due && !killed {
            child.kill().unwrap(); // SIGKILL
            killed = true;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    reader.join().unwrap();
    while let Ok(t) = rx.try_recv() {
        starts.push(t);
    }
    (killed, starts)
}

fn manifest(out: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(out.join("manifest.json")).unwrap()).unwrap()
}

#[test]
#[ignore = "long: about 50 quick runs; see the module docs"]
fn killed_anywhere_and_rerun_it_completes_with_the_same_figures() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("cache");
    let reference = tmp.path().join("reference");
    let t0 = Instant::now();
    let (_, starts) = run_until(&reference, &cache, None);
    let total = t0.elapsed();
    let want = manifest(&reference);
    let spread: usize = std::env::var("KILL_POINTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(40);
    let mut moments: Vec<Moment> = (0..starts.len()).map(Moment::StageStart).collect();
    moments
        .extend((1..=spread).map(|i| Moment::After(total.mul_f64(i as f64 / (spread + 1) as f64))));
    eprintln!(
        "uninterrupted run: {:.1} s, {} stage starts; {} kill moments",
        total.as_secs_f64(),
        starts.len(),
        moments.len()
    );
    let mut failures = Vec::new();
    for (i, &moment) in moments.iter().enumerate() {
        let out = tmp.path().join(format!("run-{i}"));
        let (killed, _) = run_until(&out, &cache, Some(moment));
        let (_, _) = run_until(&out, &cache, None);
        let mut differences = Vec::new();
        manifest_differences(&want, &manifest(&out), "", &mut differences);
        eprintln!(
            "{i:>2}: {moment:?}: {} ({} differences)",
            if killed { "killed" } else { "finished first" },
            differences.len()
        );
        if !differences.is_empty() {
            failures.push(format!("{moment:?}: {}", differences.join("; ")));
        }
        let partial = tmp.path().join(format!("run-{i}.partial"));
        assert!(
            !partial.exists(),
            "{moment:?}: {} left behind",
            partial.display()
        );
        std::fs::remove_dir_all(&out).unwrap();
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
