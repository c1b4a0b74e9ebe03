//! The append-only JSONL cache of verified items, one file per domain, url and model, written
//! one whole line at a time so that an interrupted run loses nothing.

use std::collections::HashSet;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::PathBuf;

use super::verify::verify_pair;
use super::RemoteError;
use crate::tasks::{Domain, Item};

/// The append-only JSONL file of verified items for one (domain, url, model).
pub(super) struct Cache {
    path: PathBuf,
    /// Opened on the first append, so a call served wholly from the cache writes nothing.
    file: Option<File>,
    /// Whether the file ends inside a line (a write cut short), which the next append must
    /// close first so that it does not glue its item onto the fragment.
    ends_mid_line: bool,
}

impl Cache {
    /// Reads the cache at `path` (none yet is an empty cache) and returns its distinct,
    /// still-verified items in file order. Lines that do not parse or verify, such as a line
    /// cut short by a crash, are skipped with a warning: the cache only saves requests.
    pub(super) fn load(path: PathBuf, domain: Domain) -> Result<(Cache, Vec<Item>), RemoteError> {
        let text = match fs::read_to_string(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == io::ErrorKind::NotFound => String::new(),
            Err(source) => return Err(RemoteError::Cache { path, source }),
        };
        let mut seen = HashSet::new();
        let mut items = Vec::new();
        let mut skipped = 0;
        for line in text.lines().filter(|line| !line.trim().is_empty()) {
            let item = serde_json::from_str::<Item>(line)
                .ok()
                .filter(|item| item.domain == domain.name())
                .and_then(|item| verify_pair(domain, &item.prompt, &item.answer).ok());
            match item {
                Some(item) if seen.insert(item.prompt.clone()) => items.push(item),
                Some(_) => {}
                None => skipped += 1,
            }
        }
        if skipped > 0 {
            tracing::warn!(
                "{}: skipped {skipped} lines that are not verified `{domain}` items",
                path.display()
            );
        }
        let ends_mid_line = !text.is_empty() && !text.ends_with('\n');
        let cache = Cache {
            path,
            file: None,
            ends_mid_line,
        };
        Ok((cache, items))
    }

    /// Appends `item` as one whole line with a single write, so a crash leaves at most one
    /// partial line, which [`Cache::load`] skips.
    pub(super) fn append(&mut self, item: &Item) -> Result<(), RemoteError> {
        let mut line = String::new();
        if self.ends_mid_line {
            line.push('\n');
            self.ends_mid_line = false;
        }
        // An `Item` is strings only, so serializing it cannot fail.
        line.push_str(&serde_json::to_string(item).expect("an Item serializes to JSON"));
        line.push('\n');
        let path = &self.path;
        let io_error = |source| RemoteError::Cache {
            path: path.clone(),
            source,
        };
        if self.file.is_none() {
            if let Some(dir) = path.parent().filter(|dir| !dir.as_os_str().is_empty()) {
                fs::create_dir_all(dir).map_err(io_error)?;
            }
            let file = OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map_err(io_error)?;
            self.file = Some(file);
        }
        let file = self.file.as_mut().expect("the cache file was opened above");
        file.write_all(line.as_bytes()).map_err(io_error)?;
        file.flush().map_err(io_error)
    }
}
