//! The run's work directory `<out>.partial`: where a run is assembled, locked against a second
//! run on the same `--out`, and resumed only by the same settings and model; and the check
//! that `<out>` is this very run's finished handoff (rerunning a finished command is a no-op).

use crate::error::{Error, Result};
use crate::io::{read_json, write_json};
use crate::pipeline::config::RunConfig;
use crate::pipeline::handoff::Manifest;
use std::path::{Path, PathBuf};

/// `<out>.partial`, where the run is assembled.
pub(super) fn work_dir(out: &Path) -> PathBuf {
    let mut name = out.file_name().unwrap_or_default().to_os_string();
    name.push(".partial");
    out.with_file_name(name)
}

/// The lock file of `<out>.partial`, holding the running process's pid.
pub(super) const LOCK_FILE: &str = "lock";

/// The manifest of `out` when it is the complete handoff of this very run (same settings,
/// same model): rerunning a finished command is a no-op, so "rerun to resume" always ends.
/// `out` holding anything else is an error: a run never overwrites what is there.
pub(super) fn completed(hash: &str, cfg: &RunConfig, out: &Path) -> Result<Option<Manifest>> {
    if std::fs::symlink_metadata(out).is_err() {
        return Ok(None);
    }
    let same = || -> Option<Manifest> {
        let before: serde_json::Value = read_json(&out.join("run-config.json")).ok()?;
        let now = serde_json::to_value(cfg).ok()?;
        let h: String = read_json(&out.join("base-hash.json")).ok()?;
        (before == now && h == hash).then_some(())?;
        read_json(&out.join("manifest.json")).ok()
    };
    match same() {
        Some(m) => Ok(Some(m)),
        None => Err(Error::Input(format!(
            "{} already exists (and is not the finished handoff of these settings and this \
             model); remove it or choose another --out (a run never overwrites a handoff)",
            out.display()
        ))),
    }
}

/// Create `<out>.partial` (or reopen it, if it holds an interrupted run of the same settings
/// and model), take its exclusive lock (a second run on the same `--out` is refused at once,
/// naming the owner's pid), and return its path and the locked file.
pub(super) fn open_work_dir(
    hash: &str,
    cfg: &RunConfig,
    out: &Path,
) -> Result<(PathBuf, std::fs::File)> {
    let work = work_dir(out);
    std::fs::create_dir_all(&work).map_err(|e| Error::io(&work, e))?;
    let lock = lock_work_dir(&work)?;
    for d in ["stages", "experts", "model", "plots", "data"] {
        std::fs::create_dir_all(work.join(d)).map_err(|e| Error::io(work.join(d), e))?;
    }
    // A resumed run must be the same run.
    let cfg_path = work.join("run-config.json");
    if cfg_path.exists() {
        let before: serde_json::Value = read_json(&cfg_path)?;
        let now = serde_json::to_value(cfg).map_err(|e| Error::Input(e.to_string()))?;
        if before != now || read_json::<String>(&work.join("base-hash.json"))? != hash {
            return Err(Error::Input(format!(
                "{} holds an interrupted run with other settings or another model; remove it \
                 or rerun with the same options",
                work.display()
            )));
        }
    } else {
        write_json(&work.join("base-hash.json"), &hash)?;
        write_json(&cfg_path, cfg)?;
    }
    Ok((work, lock))
}

/// The exclusive lock on `work`'s lock file, with this process's pid written in it.
fn lock_work_dir(work: &Path) -> Result<std::fs::File> {
    use std::io::{Read, Seek, Write};
    let path = work.join(LOCK_FILE);
    crate::io::check_writable(&path)?;
    let mut f = (std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true))
    .truncate(false)
    .open(&path)
    .map_err(|e| Error::io(&path, e))?;
    if let Err(e) = f.try_lock() {
        let mut owner = String::new();
        let _ = f.read_to_string(&mut owner);
        return Err(match e {
            std::fs::TryLockError::WouldBlock => Error::Input(format!(
                "{} is in use by another bitsvf run (pid {}); wait for it or choose another --out",
                work.display(),
                owner.trim()
            )),
            std::fs::TryLockError::Error(e) => Error::io(&path, e),
        });
    }
    let written = (f.set_len(0))
        .and_then(|()| f.rewind())
        .and_then(|()| write!(f, "{}", std::process::id()))
        .and_then(|()| f.sync_all());
    written.map_err(|e| Error::io(&path, e))?;
    Ok(f)
}
