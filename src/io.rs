//! Files that survive a crash (layer 0, below the engine): atomic writes — a synced temporary
//! sibling persisted over the target, then the directory synced — and one JSON reader/writer.

use crate::error::{Error, Result};
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::io::Write;
use std::path::Path;

/// The directory `path` lives in (`.` for a bare file name).
pub fn parent_of(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// Flush a directory's entries (a rename into it) to disk. A no-op where directories cannot
/// be opened as files (Windows).
pub fn sync_dir(dir: &Path) -> Result<()> {
    #[cfg(unix)]
    {
        let d = std::fs::File::open(dir).map_err(|e| Error::io(dir, e))?;
        d.sync_all().map_err(|e| Error::io(dir, e))?;
    }
    #[cfg(not(unix))]
    let _ = dir;
    Ok(())
}

/// Error if `path` exists and is not a regular file: a rename would replace a device, a fifo,
/// a link or a directory that is not ours (run as root, `--out /dev/full` used to replace the
/// device node).
pub fn check_writable(path: &Path) -> Result<()> {
    match std::fs::symlink_metadata(path) {
        Ok(m) if !m.file_type().is_file() => Err(Error::io(
            path,
            std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                "exists and is not a regular file (a device, fifo, link or directory); bitsvf \
                 writes only regular files, choose another path",
            ),
        )),
        _ => Ok(()),
    }
}

/// Write `bytes` to `path` atomically: readers (and a crash) see the old file or the new one,
/// never a prefix. The bytes go to a temporary file in the same directory, which is synced,
/// persisted (renamed) over `path`, and then the directory is synced so the rename lasts.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    write_atomic_with(path, |w| w.write_all(bytes))
}

/// [`write_atomic`] of what `write` writes, streamed (through a buffer) into the temporary
/// sibling: for outputs too large to hold in memory at once.
pub fn write_atomic_with(
    path: &Path,
    write: impl FnOnce(&mut dyn Write) -> std::io::Result<()>,
) -> Result<()> {
    check_writable(path)?;
    let dir = parent_of(path);
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "out".into());
    let prefix = format!(".{name}.");
    let mut builder = tempfile::Builder::new();
    builder.prefix(&prefix).suffix(".tmp");
    // The mode `File::create` would give (the umask applies), not tempfile's private 0600.
    #[cfg(unix)]
    let mode = std::os::unix::fs::PermissionsExt::from_mode(0o666);
    #[cfg(unix)]
    builder.permissions(mode);
    let tmp = builder.tempfile_in(dir).map_err(|e| Error::io(path, e))?;
    let mut buffered = std::io::BufWriter::with_capacity(1 << 20, tmp);
    let written = write(&mut buffered).and_then(|()| buffered.flush());
    let tmp = match buffered.into_inner() {
        Ok(tmp) => tmp,
        Err(e) => return Err(Error::io(path, e.into_error())),
    };
    if let Err(e) = written.and_then(|()| tmp.as_file().sync_all()) {
        return Err(Error::io(tmp.path(), e)); // dropping `tmp` deletes it
    }
    tmp.persist(path).map_err(|e| Error::io(path, e.error))?;
    sync_dir(dir)
}

/// `value` as pretty JSON, written atomically. The bytes depend only on the value: struct
/// fields in declaration order, maps in key order (use `BTreeMap`, never `HashMap`).
pub fn write_json(path: &Path, value: &impl Serialize) -> Result<()> {
    let bytes = serde_json::to_vec_pretty(value).map_err(|e| Error::Input(e.to_string()))?;
    write_atomic(path, &bytes)
}

/// Read a JSON file as `T`; an error names the file and the field at fault.
pub fn read_json<T: DeserializeOwned>(path: &Path) -> Result<T> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    from_json_slice(path, &bytes)
}

/// Parse JSON `bytes` read from `path` as `T`; an error names `path` and the field at fault.
pub fn from_json_slice<T: DeserializeOwned>(path: &Path, bytes: &[u8]) -> Result<T> {
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let value = serde_path_to_error::deserialize(&mut de).map_err(|e| json_error(path, e))?;
    // Trailing characters after the value are an error too.
    de.end()
        .map_err(|e| Error::config(path, "json", e.to_string()))?;
    Ok(value)
}

/// A JSON value already read from `path` as `T`; an error names `path` and the field at fault.
pub fn from_json_value<T: DeserializeOwned>(path: &Path, value: serde_json::Value) -> Result<T> {
    serde_path_to_error::deserialize(value).map_err(|e| json_error(path, e))
}

fn json_error(path: &Path, e: serde_path_to_error::Error<serde_json::Error>) -> Error {
    let field = e.path().to_string();
    let field = if field == "." {
        "json".to_string()
    } else {
        field
    };
    Error::config(path, field, e.into_inner().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    #[test]
    fn atomic_writes_replace_the_file_and_leave_no_temporaries() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.json");
        write_atomic(&p, b"one").unwrap();
        write_atomic(&p, b"two").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"two");
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("a.json")]);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&p).unwrap().permissions().mode();
            let plain = std::fs::File::create(dir.path().join("plain")).unwrap();
            let want = plain.metadata().unwrap().permissions().mode();
            assert_eq!(mode & 0o777, want & 0o777, "same mode as File::create");
        }
    }

    #[test]
    fn a_write_into_a_missing_directory_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("missing/a.json");
        let err = write_atomic(&p, b"x").unwrap_err().to_string();
        assert!(err.contains("missing/a.json"), "{err}");
    }

    #[test]
    fn json_round_trips_deterministically_and_errors_name_the_field() {
        #[derive(Serialize, serde::Deserialize, PartialEq, Debug)]
        struct S {
            b: u32,
            a: BTreeMap<String, f64>,
        }
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("s.json");
        let s = S {
            b: 1,
            a: BTreeMap::from([("y".into(), 0.5), ("x".into(), 1.0)]),
        };
        write_json(&p, &s).unwrap();
        let text = std::fs::read_to_string(&p).unwrap();
        assert_eq!(
            text,
            "{\n  \"b\": 1,\n  \"a\": {\n    \"x\": 1.0,\n    \"y\": 0.5\n  }\n}"
        );
        assert_eq!(read_json::<S>(&p).unwrap(), s);
        std::fs::write(&p, r#"{"b": 1, "a": {"x": "one"}}"#).unwrap();
        let err = read_json::<S>(&p).unwrap_err().to_string();
        assert!(err.contains("s.json") && err.contains("a.x"), "{err}");
        std::fs::write(&p, "{not json").unwrap();
        let err = read_json::<S>(&p).unwrap_err().to_string();
        assert!(err.contains("s.json"), "{err}");
    }

    /// A directory, a link and a fifo in the way are refused, and left as they were.
    #[cfg(unix)]
    #[test]
    fn what_is_not_a_regular_file_is_never_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let sub = dir.path().join("sub");
        std::fs::create_dir(&sub).unwrap();
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(dir.path().join("target"), &link).unwrap();
        let fifo = dir.path().join("fifo");
        let made = std::process::Command::new("mkfifo").arg(&fifo).status();
        let mut paths = vec![sub, link];
        if made.is_ok_and(|s| s.success()) {
            paths.push(fifo);
        }
        for p in paths {
            let before = std::fs::symlink_metadata(&p).unwrap().file_type();
            let err = write_atomic(&p, b"x").unwrap_err().to_string();
            assert!(err.contains("not a regular file"), "{err}");
            assert_eq!(std::fs::symlink_metadata(&p).unwrap().file_type(), before);
        }
        assert!(!dir.path().join("target").exists());
    }
}
