//! `bitsvf run` across MPI ranks: `mpirun -np 2` reproduces the golden manifest of the
//! single-process quick run; a rank killed mid-run ends the job promptly, after which a rerun
//! (with another number of ranks) completes with the same figures; a rank that stops answering
//! ends the job after the collectives' timeout.
//!
//! These need a bitsvf built with the `mpi` feature and `mpirun` on the PATH: `.ci/run`
//! installs OpenMPI, builds `cargo build --features mpi`, copies the binary to
//! `target/mpi/bitsvf` and sets `BITSVF_REQUIRE_MPI=1`, so that a missing binary fails the
//! tests there. Elsewhere they say why they did nothing and pass. `BITSVF_MPI_BIN` points
//! them at another binary.

mod common;
use common::*;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The MPI-enabled bitsvf, when it and `mpirun` are here.
fn mpi_binary() -> Option<PathBuf> {
    let bin = std::env::var_os("BITSVF_MPI_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target/mpi/bitsvf"));
    let mpirun = Command::new("mpirun").arg("--version").output();
    let have_mpirun = mpirun.is_ok_and(|o| o.status.success());
    if bin.exists() && have_mpirun {
        return Some(bin);
    }
    let why = format!(
        "no MPI-enabled bitsvf at {} or no mpirun on the PATH",
        bin.display()
    );
    assert!(std::env::var_os("BITSVF_REQUIRE_MPI").is_none(), "{why}");
    eprintln!("skipped: {why}");
    None
}

/// `bin run --quick --seed 0` (the golden run) into `out`, under `mpirun -np ranks` (each rank
/// one thread), or alone for `ranks == 0`.
fn quick_run(bin: &Path, ranks: usize, out: &Path, cache: &Path) -> Command {
    quick_run_with(bin, ranks, out, cache, &[])
}

/// [`quick_run`] with `env` (NAME=value) passed to every rank.
fn quick_run_with(bin: &Path, ranks: usize, out: &Path, cache: &Path, env: &[&str]) -> Command {
    let args = [
        "run",
        "--quick",
        "--seed",
        "0",
        "--out",
        out.to_str().unwrap(),
        "--cache-dir",
        cache.to_str().unwrap(),
    ];
    let mut c = match ranks {
        0 => Command::new(bin),
        n => {
            let mut c = Command::new("mpirun");
            c.args(["-np", &n.to_string(), "--oversubscribe"])
                .args(["-x", "RAYON_NUM_THREADS=1"]);
            for e in env {
                c.args(["-x", e]);
            }
            c.arg(bin);
            c
        }
    };
    c.args(args)
        .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        .stdout(Stdio::null());
    c
}

fn assert_golden(out: &Path) {
    let read = |p: &Path| -> serde_json::Value {
        serde_json::from_slice(&std::fs::read(p).unwrap()).unwrap()
    };
    let golden =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/quick-run-seed0.manifest.json");
    let mut differences = Vec::new();
    manifest_differences(
        &read(&golden),
        &read(&out.join("manifest.json")),
        "",
        &mut differences,
    );
    assert!(
        differences.is_empty(),
        "{} differences from the golden manifest:\n{}",
        differences.len(),
        differences.join("\n")
    );
}

/// Same experts, same mixture, same figures as the single-process run: the golden manifest.
#[test]
fn two_ranks_reproduce_the_single_process_manifest() {
    let Some(bin) = mpi_binary() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let o = quick_run(&bin, 2, &out, &tmp.path().join("cache"))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_golden(&out);
    // Rank 0 alone showed progress.
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(err.matches("stage 1-load-verify").count(), 1, "{err}");
}

/// The pid of rank `rank` among the processes `mpirun` (pid `parent`) started.
fn rank_pid(parent: u32, rank: usize) -> Option<u32> {
    for entry in std::fs::read_dir("/proc").ok()? {
        let Ok(pid) = entry.ok()?.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // pid (comm) state ppid …
        let after = &stat[stat.rfind(')').map_or(0, |i| i + 2)..];
        let ppid: Option<u32> = after.split(' ').nth(1).and_then(|p| p.parse().ok());
        if ppid != Some(parent) {
            continue;
        }
        let env = std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
        let want = format!("OMPI_COMM_WORLD_RANK={rank}");
        if env.split(|&b| b == 0).any(|v| v == want.as_bytes()) {
            return Some(pid);
        }
    }
    None
}

/// Wait for stage 3's file of the run in `tmp`/out.partial: the experts are training.
fn wait_for_discovery(tmp: &Path, job: &mut std::process::Child) {
    let discovered = tmp.join("out.partial/stages/3-discover.json");
    let t0 = Instant::now();
    while !discovered.exists() {
        assert!(job.try_wait().unwrap().is_none(), "the run ended early");
        assert!(t0.elapsed() < Duration::from_secs(600), "no discovery");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The job's exit status, which must come within `limit` of now.
fn ends_within(
    job: &mut std::process::Child,
    limit: Duration,
    what: &str,
) -> std::process::ExitStatus {
    let t0 = Instant::now();
    loop {
        if let Some(s) = job.try_wait().unwrap() {
            return s;
        }
        assert!(
            t0.elapsed() < limit,
            "the job still runs {limit:?} after {what}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// SIGSTOP to rank 1 while the experts train: rank 0 gives up waiting for it after
/// BITSVF_MPI_TIMEOUT (5 s here) and the job ends non-zero, saying why.
#[test]
fn a_rank_that_stops_answering_ends_the_job_after_the_timeout() {
    let Some(bin) = mpi_binary() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let (out, cache) = (tmp.path().join("out"), tmp.path().join("cache"));
    let mut job = quick_run_with(&bin, 2, &out, &cache, &["BITSVF_MPI_TIMEOUT=5"])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = job.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        std::io::Read::read_to_string(&mut stderr, &mut s).unwrap();
        s
    });
    wait_for_discovery(tmp.path(), &mut job);
    let stopped = rank_pid(job.id(), 1).expect("rank 1's process");
    let signal = |sig: &str| {
        Command::new("kill")
            .args([sig, &stopped.to_string()])
            .status()
    };
    signal("-STOP").unwrap();
    let status = ends_within(&mut job, Duration::from_secs(120), "rank 1 stopped");
    let _ = signal("-KILL");
    let err = reader.join().unwrap();
    assert!(!status.success(), "the job succeeded with rank 1 stopped");
    assert!(err.contains("no answer from the other ranks"), "{err}");
}

/// SIGKILL to rank 1 while the experts train: `mpirun` exits non-zero within seconds (no
/// hang), and the same command rerun by one process resumes and completes with the golden
/// figures.
#[test]
fn a_killed_rank_ends_the_job_and_a_rerun_with_other_ranks_completes() {
    let Some(bin) = mpi_binary() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let (out, cache) = (tmp.path().join("out"), tmp.path().join("cache"));
    let mut job = quick_run(&bin, 2, &out, &cache)
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_for_discovery(tmp.path(), &mut job);
    let victim = rank_pid(job.id(), 1).expect("rank 1's process");
    Command::new("kill")
        .args(["-9", &victim.to_string()])
        .status()
        .unwrap();
    let status = ends_within(&mut job, Duration::from_secs(60), "rank 1 died");
    assert!(!status.success(), "the job succeeded without rank 1");
    assert!(!out.exists(), "a handoff appeared from a failed job");
    // The same command with one process (the MPI build, not launched by mpirun).
    let o = quick_run(&bin, 0, &out, &cache)
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(err.contains("finished before, skipped"), "{err}");
    assert_golden(&out);
}
