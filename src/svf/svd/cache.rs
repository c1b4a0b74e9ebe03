//! The on-disk cache of thin SVDs (one safetensors file per model): its file format, the
//! validation of input and of cached entries, and atomic writes.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::Instant;

use super::{try_thin_svd, Failure, Svd};
use crate::engine::checkpoint::st::OwnedTensor;
use rayon::prelude::*;
use safetensors::{Dtype, SafeTensors};

/// `__metadata__["format"]`, naming the cache layout and sign convention; a file with another
/// value is ignored and rewritten. The other metadata keys are per matrix:
/// `<name>.w_fnv1a64` (fingerprint of the `W` it was computed from, see [`fingerprint`]) and
/// `<name>.relative_error` (its `‖W − UΣVᵀ‖_F / ‖W‖_F`, so hits report it without a matmul).
const CACHE_FORMAT: &str = "bitsvf-svd/1";

/// The cache file inside `<dir>/<model_hash>/`.
const CACHE_FILE_NAME: &str = "svd.safetensors";

/// Errors of the SVD cache. Every variant names the file or matrix at fault.
#[derive(Debug, thiserror::Error)]
pub enum SvdError {
    /// The cache file or its directory could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The underlying I/O error.
        source: std::io::Error,
    },
    /// The factors could not be serialized to safetensors (should not happen for valid input).
    #[error("{path}: cannot serialize the SVD cache: {msg}")]
    Serialize {
        /// The cache file being written.
        path: PathBuf,
        /// What the safetensors writer said.
        msg: String,
    },
    /// The model hash cannot be used as a directory name.
    #[error(
        "model hash `{hash}` is not a valid cache key: expected a non-empty string of \
         ASCII letters, digits, `-`, `_` or `.` not starting with `.` (e.g. a SHA-256 hex digest)"
    )]
    BadModelHash {
        /// The hash given.
        hash: String,
    },
    /// A matrix's data does not have `rows × cols` elements.
    #[error("matrix `{name}`: {len} values given, expected rows × cols = {rows} × {cols}")]
    Shape {
        /// The matrix's name.
        name: String,
        /// The declared number of rows.
        rows: usize,
        /// The declared number of columns.
        cols: usize,
        /// The number of values given.
        len: usize,
    },
    /// The same matrix name was given twice; names key the cache, so they must be unique.
    #[error("matrix `{name}` is listed twice; matrix names must be unique")]
    DuplicateName {
        /// The repeated name.
        name: String,
    },
    /// A matrix holds a NaN or an infinity, which has no SVD.
    #[error("matrix `{name}`: non-finite value {value} at row {row}, column {col}")]
    NonFinite {
        /// The matrix's name.
        name: String,
        /// Row of the first bad value.
        row: usize,
        /// Column of the first bad value.
        col: usize,
        /// The value.
        value: f32,
    },
    /// faer's SVD iteration did not converge (not expected for finite input).
    #[error("matrix `{name}` ({rows} × {cols}): the SVD did not converge")]
    NoConvergence {
        /// The matrix's name.
        name: String,
        /// Rows.
        rows: usize,
        /// Columns.
        cols: usize,
    },
}

/// What a call to [`SvdCache::get_or_compute`] did.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct CacheStats {
    /// Matrices read from the cache file.
    pub hits: usize,
    /// Matrices decomposed in this call (missing, corrupt or stale in the cache).
    pub computed: usize,
    /// Wall-clock seconds of the whole call (reading, verifying, computing, writing).
    pub seconds: f64,
    /// Largest `‖W − UΣVᵀ‖_F / ‖W‖_F` over all returned matrices, hits included.
    pub max_relative_error: f64,
}

/// An on-disk cache of thin SVDs: one safetensors file per model,
/// `<dir>/<model_hash>/svd.safetensors`, holding tensors `<name>.u` `[rows, r]`,
/// `<name>.sigma` `[r]` and `<name>.v` `[cols, r]` (F32) for every matrix computed so far.
#[derive(Debug, Clone)]
pub struct SvdCache {
    pub(super) dir: PathBuf,
}

/// The cache file's contents: tensors and per-matrix metadata (without `format`).
#[derive(Debug, Default, PartialEq)]
pub(super) struct CacheFile {
    pub(super) tensors: BTreeMap<String, OwnedTensor>,
    pub(super) metadata: BTreeMap<String, String>,
}

/// One matrix's result.
struct Outcome {
    svd: Svd,
    relative_error: f64,
    /// `Some(fingerprint of W)` if computed in this call, `None` if read from the file.
    computed: Option<String>,
}

impl SvdCache {
    /// A cache rooted at `dir` (created on first write).
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        SvdCache { dir: dir.into() }
    }

    /// The cache root: `$BITSVF_CACHE` if set, else `$XDG_CACHE_HOME/bitsvf`, else
    /// `$HOME/.cache/bitsvf`, else `./.bitsvf-cache`. Empty variables count as unset, and a
    /// relative `XDG_CACHE_HOME` is ignored, as the XDG spec asks.
    pub fn default_dir() -> PathBuf {
        default_dir_from(|key| std::env::var_os(key))
    }

    /// The root directory of this cache.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The cache file for `model_hash`: `<dir>/<model_hash>/svd.safetensors`.
    pub fn file_path(&self, model_hash: &str) -> PathBuf {
        self.dir.join(model_hash).join(CACHE_FILE_NAME)
    }

    /// The thin SVD of every `(name, W, rows, cols)` in `matrices`, in input order, reading
    /// what the cache file of `model_hash` already holds and computing the rest (in parallel
    /// across matrices with rayon), then rewriting the file atomically if anything was
    /// computed. Entries of the file not asked for are kept.
    ///
    /// Each cached entry is checked before use: dtype, shapes against `rows`/`cols`, finite
    /// values, and the fingerprint of the `W` it came from against the caller's `W` (a guard
    /// against a hash that did not cover `W`; checking the reconstruction instead would cost a
    /// third of an SVD). Measured on six random ternary 1536×512 / 512×1536 matrices: 1.2 s
    /// cold, 0.04 s warm. A corrupt or truncated file, or a bad or stale entry, is logged with
    /// `tracing::warn!` and recomputed, never an error.
    ///
    /// `progress(done, name)` is called once per matrix as it becomes ready (hits included,
    /// in completion order), with `done` counting from 1 to `matrices.len()`.
    ///
    /// Concurrent writers to the same hash do not corrupt the file (each write is a rename of
    /// a complete temporary sibling), but the last one wins and may drop entries that only the
    /// other computed; they are recomputed on the next call.
    pub fn get_or_compute(
        &self,
        model_hash: &str,
        matrices: &[(String, Vec<f32>, usize, usize)],
        mut progress: impl FnMut(usize, &str),
    ) -> Result<(Vec<(String, Svd)>, CacheStats), SvdError> {
        let start = Instant::now();
        validate_hash(model_hash)?;
        validate_matrices(matrices)?;
        let path = self.file_path(model_hash);
        let mut file = read_cache_file(&path)?;

        let mut outcomes: Vec<Option<Result<Outcome, Failure>>> =
            (0..matrices.len()).map(|_| None).collect();
        let mut done = 0;
        let (file_ref, path_ref) = (&file, path.as_path());
        std::thread::scope(|scope| {
            let (tx, rx) = mpsc::channel();
            // The workers run on rayon's pool; this thread only forwards progress, so that
            // `progress` needs to be neither `Send` nor `Sync`.
            scope.spawn(move || {
                matrices.par_iter().enumerate().for_each_with(
                    tx,
                    |tx, (i, (name, w, rows, cols))| {
                        let outcome = lookup_or_compute(path_ref, file_ref, name, w, *rows, *cols);
                        // The receiver outlives every sender: it drains until all are dropped.
                        let _ = tx.send((i, outcome));
                    },
                );
            });
            for (i, outcome) in rx {
                done += 1;
                progress(done, &matrices[i].0);
                outcomes[i] = Some(outcome);
            }
        });

        let mut results = Vec::with_capacity(matrices.len());
        let mut stats = CacheStats {
            hits: 0,
            computed: 0,
            seconds: 0.0,
            max_relative_error: 0.0,
        };
        for ((name, _, rows, cols), outcome) in matrices.iter().zip(outcomes) {
            let outcome = match outcome.expect("every matrix reports an outcome") {
                Ok(o) => o,
                Err(Failure::NonFinite { row, col, value }) => {
                    // validate_matrices rejects these before any work starts.
                    unreachable!("matrix `{name}`: non-finite {value} at ({row}, {col})")
                }
                Err(Failure::NoConvergence) => {
                    return Err(SvdError::NoConvergence {
                        name: name.clone(),
                        rows: *rows,
                        cols: *cols,
                    })
                }
            };
            let Outcome {
                svd,
                relative_error,
                computed,
            } = outcome;
            match computed {
                None => stats.hits += 1,
                Some(fingerprint) => {
                    stats.computed += 1;
                    let r = svd.rank();
                    let tensors = &mut file.tensors;
                    tensors.insert(
                        format!("{name}.u"),
                        OwnedTensor::f32(vec![*rows, r], &svd.u),
                    );
                    tensors.insert(
                        format!("{name}.sigma"),
                        OwnedTensor::f32(vec![r], &svd.sigma),
                    );
                    tensors.insert(
                        format!("{name}.v"),
                        OwnedTensor::f32(vec![*cols, r], &svd.v),
                    );
                    let metadata = &mut file.metadata;
                    metadata.insert(format!("{name}.w_fnv1a64"), fingerprint);
                    // `{}` prints the shortest string that parses back to the same f64.
                    metadata.insert(format!("{name}.relative_error"), relative_error.to_string());
                }
            }
            stats.max_relative_error = stats.max_relative_error.max(relative_error);
            results.push((name.clone(), svd));
        }

        if stats.computed > 0 {
            write_cache_file(&path, &file)?;
        }
        stats.seconds = start.elapsed().as_secs_f64();
        Ok((results, stats))
    }
}

fn default_dir_from(get: impl Fn(&str) -> Option<OsString>) -> PathBuf {
    let non_empty = |key: &str| get(key).filter(|v| !v.is_empty()).map(PathBuf::from);
    if let Some(dir) = non_empty("BITSVF_CACHE") {
        return dir;
    }
    if let Some(xdg) = non_empty("XDG_CACHE_HOME").filter(|p| p.is_absolute()) {
        return xdg.join("bitsvf");
    }
    if let Some(home) = non_empty("HOME") {
        return home.join(".cache").join("bitsvf");
    }
    PathBuf::from(".bitsvf-cache")
}

/// The hash becomes a directory name: no separators, no `..`, nothing hidden.
pub(super) fn validate_hash(hash: &str) -> Result<(), SvdError> {
    let ok = !hash.is_empty()
        && !hash.starts_with('.')
        && hash
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if ok {
        Ok(())
    } else {
        Err(SvdError::BadModelHash {
            hash: hash.to_string(),
        })
    }
}

/// Checks the caller's input up front, so that no work is spent before an error that input
/// was always going to raise.
fn validate_matrices(matrices: &[(String, Vec<f32>, usize, usize)]) -> Result<(), SvdError> {
    let mut seen = HashSet::new();
    for (name, w, rows, cols) in matrices {
        if !seen.insert(name.as_str()) {
            return Err(SvdError::DuplicateName { name: name.clone() });
        }
        if rows.checked_mul(*cols) != Some(w.len()) {
            return Err(SvdError::Shape {
                name: name.clone(),
                rows: *rows,
                cols: *cols,
                len: w.len(),
            });
        }
        check_finite(name, w, *cols)?;
    }
    Ok(())
}

/// Error naming `name` and the place of the first NaN or infinity in the row-major `w`.
pub(super) fn check_finite(name: &str, w: &[f32], cols: usize) -> Result<(), SvdError> {
    match w.iter().position(|x| !x.is_finite()) {
        Some(k) => Err(SvdError::NonFinite {
            name: name.to_string(),
            row: k / cols.max(1),
            col: k % cols.max(1),
            value: w[k],
        }),
        None => Ok(()),
    }
}

/// The cache file's contents; empty if there is none, or if it is unreadable as a cache
/// (warned: the entries are recomputed and the file rewritten).
pub(super) fn read_cache_file(path: &Path) -> Result<CacheFile, SvdError> {
    let bytes = match std::fs::read(path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(CacheFile::default()),
        Err(source) => {
            return Err(SvdError::Io {
                path: path.to_path_buf(),
                source,
            })
        }
    };
    match parse_cache_file(&bytes) {
        Ok(tensors) => Ok(tensors),
        Err(why) => {
            tracing::warn!(
                "{}: ignoring the SVD cache ({why}); its matrices will be recomputed",
                path.display()
            );
            Ok(CacheFile::default())
        }
    }
}

fn parse_cache_file(bytes: &[u8]) -> Result<CacheFile, String> {
    let invalid = |e: safetensors::SafeTensorError| {
        format!("not a valid safetensors file, is it truncated? ({e})")
    };
    let (_, metadata) = SafeTensors::read_metadata(bytes).map_err(invalid)?;
    let mut metadata: BTreeMap<String, String> = metadata
        .metadata()
        .clone()
        .unwrap_or_default()
        .into_iter()
        .collect();
    let format = metadata.remove("format");
    if format.as_deref() != Some(CACHE_FORMAT) {
        return Err(format!("format {format:?}, expected {CACHE_FORMAT:?}"));
    }
    let tensors = SafeTensors::deserialize(bytes).map_err(invalid)?;
    let tensors = tensors
        .iter()
        .map(|(name, view)| {
            let tensor =
                OwnedTensor::raw(view.dtype(), view.shape().to_vec(), view.data().to_vec());
            (name.to_string(), tensor)
        })
        .collect();
    Ok(CacheFile { tensors, metadata })
}

/// FNV-1a (64-bit) over the little-endian bytes of `w`, as 16 hex digits: identifies the `W`
/// a cache entry was computed from. Not cryptographic — it guards against a caller's mistake
/// (a hash that does not cover `W`), not an adversary — but stable across Rust versions and
/// platforms, unlike `std`'s `DefaultHasher`, and a few ms for a 1536×512 matrix.
pub(super) fn fingerprint(w: &[f32]) -> String {
    const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    let hash = w
        .iter()
        .flat_map(|x| x.to_le_bytes())
        .fold(OFFSET, |h, byte| (h ^ u64::from(byte)).wrapping_mul(PRIME));
    format!("{hash:016x}")
}

/// The cached decomposition of `name` and its recorded relative error, if the file holds a
/// valid entry for this `W`; `Ok(None)` if the file has no entry for `name`; `Err(why)` if the
/// entry is unusable or stale.
pub(super) fn cached_svd(
    file: &CacheFile,
    name: &str,
    w: &[f32],
    (rows, cols): (usize, usize),
    r: usize,
) -> Result<Option<(Svd, f64)>, String> {
    let parts = [
        (format!("{name}.u"), vec![rows, r]),
        (format!("{name}.sigma"), vec![r]),
        (format!("{name}.v"), vec![cols, r]),
    ];
    let found: Vec<Option<&OwnedTensor>> =
        parts.iter().map(|(key, _)| file.tensors.get(key)).collect();
    if found.iter().all(Option::is_none) {
        return Ok(None);
    }
    let recorded = |suffix: &str| {
        let key = format!("{name}.{suffix}");
        file.metadata
            .get(&key)
            .ok_or_else(|| format!("metadata `{key}` is missing"))
    };
    let cached_fingerprint = recorded("w_fnv1a64")?;
    let relative_error: f64 = recorded("relative_error")?
        .parse()
        .map_err(|e| format!("metadata `{name}.relative_error` is not a number ({e})"))?;
    let mut values = Vec::with_capacity(3);
    for ((key, shape), tensor) in parts.iter().zip(found) {
        let tensor = tensor.ok_or_else(|| format!("tensor `{key}` is missing"))?;
        if tensor.dtype() != Dtype::F32 {
            return Err(format!(
                "tensor `{key}` is {:?}, expected F32",
                tensor.dtype()
            ));
        }
        if tensor.shape() != &shape[..] {
            return Err(format!(
                "tensor `{key}` has shape {:?}, expected {shape:?}",
                tensor.shape()
            ));
        }
        if tensor.bytes().len() != shape.iter().product::<usize>() * 4 {
            return Err(format!("tensor `{key}` has {} bytes", tensor.bytes().len()));
        }
        let decoded: Vec<f32> = tensor
            .bytes()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        if decoded.iter().any(|x| !x.is_finite()) {
            return Err(format!("tensor `{key}` holds a NaN or infinity"));
        }
        values.push(decoded);
    }
    // Last: shapes first, so that a reshaped matrix is reported as such.
    let fingerprint = fingerprint(w);
    if *cached_fingerprint != fingerprint {
        return Err(format!(
            "it was computed from another W (fingerprint {cached_fingerprint}, this W has \
             {fingerprint}); the model hash does not cover this matrix"
        ));
    }
    let v = values.pop().expect("three parts");
    let sigma = values.pop().expect("three parts");
    let u = values.pop().expect("three parts");
    let svd = Svd {
        rows,
        cols,
        u,
        sigma,
        v,
    };
    Ok(Some((svd, relative_error)))
}

/// One matrix's job: the valid cache entry if there is one, else a fresh decomposition.
fn lookup_or_compute(
    path: &Path,
    file: &CacheFile,
    name: &str,
    w: &[f32],
    rows: usize,
    cols: usize,
) -> Result<Outcome, Failure> {
    match cached_svd(file, name, w, (rows, cols), rows.min(cols)) {
        Ok(Some((svd, relative_error))) => {
            return Ok(Outcome {
                svd,
                relative_error,
                computed: None,
            })
        }
        Ok(None) => {}
        Err(why) => tracing::warn!(
            "{}: cached SVD of `{name}` is unusable ({why}); recomputing",
            path.display()
        ),
    }
    let svd = try_thin_svd(w, rows, cols)?;
    Ok(Outcome {
        relative_error: svd.relative_error(w),
        svd,
        computed: Some(fingerprint(w)),
    })
}

pub(super) fn write_cache_file(path: &Path, file: &CacheFile) -> Result<(), SvdError> {
    write_cache_files(path, &[file])
}

/// Writes the union of `files` (a later one's entries replacing an earlier one's) as one
/// cache file, atomically.
pub(super) fn write_cache_files(path: &Path, files: &[&CacheFile]) -> Result<(), SvdError> {
    let dir = path
        .parent()
        .expect("cache file paths are <dir>/<hash>/<file>");
    std::fs::create_dir_all(dir).map_err(|source| SvdError::Io {
        path: dir.to_path_buf(),
        source,
    })?;
    let mut metadata: HashMap<String, String> = HashMap::new();
    let mut tensors: BTreeMap<&str, &OwnedTensor> = BTreeMap::new();
    for f in files {
        metadata.extend(f.metadata.iter().map(|(k, v)| (k.clone(), v.clone())));
        tensors.extend(f.tensors.iter().map(|(k, t)| (k.as_str(), t)));
    }
    metadata.insert("format".to_string(), CACHE_FORMAT.to_string());
    let bytes =
        safetensors::serialize(tensors, Some(metadata)).map_err(|e| SvdError::Serialize {
            path: path.to_path_buf(),
            msg: e.to_string(),
        })?;
    write_atomic(path, &bytes)
}

/// [`crate::engine::checkpoint::st::write_atomic`] with this module's error type.
fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), SvdError> {
    crate::engine::checkpoint::st::write_atomic(path, bytes).map_err(|e| SvdError::Serialize {
        path: path.to_path_buf(),
        msg: e.to_string(),
    })
}

crate::module_error!(SvdError);

#[cfg(test)]
mod tests {
    use super::super::tests::{assert_bit_identical, ternary};
    use super::super::thin_svd;
    use super::*;

    fn model(seed: u64) -> Vec<(String, Vec<f32>, usize, usize)> {
        [("mlp.gate", 16, 8), ("mlp.up", 8, 16), ("attn.q", 12, 12)]
            .iter()
            .enumerate()
            .map(|(i, &(name, rows, cols))| {
                (
                    name.to_string(),
                    ternary(rows, cols, seed + i as u64),
                    rows,
                    cols,
                )
            })
            .collect()
    }

    #[test]
    fn cache_computes_once_then_hits() {
        let dir = tempfile::tempdir().unwrap();
        let cache = SvdCache::new(dir.path());
        let matrices = model(100);
        let mut seen = Vec::new();
        let (first, stats) = cache
            .get_or_compute("abc123", &matrices, |done, name| {
                seen.push((done, name.to_string()))
            })
            .unwrap();
        assert_eq!((stats.hits, stats.computed), (0, 3));
        assert!(stats.max_relative_error < 1e-6, "{stats:?}");
        assert_eq!(seen.iter().map(|s| s.0).collect::<Vec<_>>(), vec![1, 2, 3]);
        let mut names: Vec<_> = seen.into_iter().map(|s| s.1).collect();
        names.sort();
        assert_eq!(names, ["attn.q", "mlp.gate", "mlp.up"]);
        for ((name, svd), (want, w, rows, cols)) in first.iter().zip(&matrices) {
            assert_eq!(name, want);
            assert_bit_identical(svd, &thin_svd(w, *rows, *cols));
        }
        let path = dir.path().join("abc123").join("svd.safetensors");
        let bytes = std::fs::read(&path).unwrap();
        let st = SafeTensors::deserialize(&bytes).unwrap();
        assert_eq!(st.tensor("mlp.up.u").unwrap().shape(), &[8, 8]);
        assert_eq!(st.tensor("mlp.up.sigma").unwrap().shape(), &[8]);
        assert_eq!(st.tensor("mlp.up.v").unwrap().shape(), &[16, 8]);
        assert_eq!(st.tensor("mlp.up.v").unwrap().dtype(), Dtype::F32);

        let recorded = parse_cache_file(&bytes).unwrap().metadata;
        assert_eq!(recorded["mlp.up.w_fnv1a64"], fingerprint(&matrices[1].1));
        let error: f64 = recorded["mlp.up.relative_error"].parse().unwrap();
        assert_eq!(error, first[1].1.relative_error(&matrices[1].1));

        let cold = stats;
        let (second, stats) = cache
            .get_or_compute("abc123", &matrices, |_, _| {})
            .unwrap();
        assert_eq!((stats.hits, stats.computed), (3, 0));
        assert_eq!(stats.max_relative_error, cold.max_relative_error);
        for ((_, a), (_, b)) in first.iter().zip(&second) {
            assert_bit_identical(a, b);
        }
        // Bytes, not contents: the header's metadata order is a HashMap's, so a rewrite of
        // the same contents would almost surely differ.
        assert!(
            std::fs::read(&path).unwrap() == bytes,
            "a pure hit rewrote the file"
        );
        let leftovers: Vec<_> = std::fs::read_dir(path.parent().unwrap()).unwrap().collect();
        assert_eq!(leftovers.len(), 1, "temporary files left behind");
    }

    #[test]
    fn cache_computes_only_new_matrices_and_keeps_old_ones() {
        let dir = tempfile::tempdir().unwrap();
        let cache = SvdCache::new(dir.path());
        let matrices = model(200);
        cache
            .get_or_compute("h", &matrices[..2], |_, _| {})
            .unwrap();
        let (out, stats) = cache.get_or_compute("h", &matrices, |_, _| {}).unwrap();
        assert_eq!((stats.hits, stats.computed), (2, 1));
        assert_eq!(out[2].0, "attn.q");
        // A subset is served from the file, which still holds all three.
        let (out, stats) = cache
            .get_or_compute("h", &matrices[1..2], |_, _| {})
            .unwrap();
        assert_eq!((stats.hits, stats.computed, out.len()), (1, 0, 1));
        let (_, stats) = cache.get_or_compute("h", &matrices, |_, _| {}).unwrap();
        assert_eq!((stats.hits, stats.computed), (3, 0));
    }

    #[test]
    fn corrupt_or_foreign_cache_files_are_recomputed() {
        let dir = tempfile::tempdir().unwrap();
        let cache = SvdCache::new(dir.path());
        let matrices = model(300);
        let (good, _) = cache.get_or_compute("h", &matrices, |_, _| {}).unwrap();
        let path = cache.file_path("h");
        let bytes = std::fs::read(&path).unwrap();

        let foreign =
            safetensors::serialize([("x", &OwnedTensor::f32(vec![1], &[1.0]))], None).unwrap();
        for bad in [
            bytes[..bytes.len() / 2].to_vec(),
            b"definitely not safetensors".to_vec(),
            Vec::new(),
            foreign,
        ] {
            std::fs::write(&path, &bad).unwrap();
            let (out, stats) = cache.get_or_compute("h", &matrices, |_, _| {}).unwrap();
            assert_eq!((stats.hits, stats.computed), (0, 3));
            for ((_, a), (_, b)) in good.iter().zip(&out) {
                assert_bit_identical(a, b);
            }
            let repaired = parse_cache_file(&std::fs::read(&path).unwrap()).unwrap();
            assert!(
                repaired == parse_cache_file(&bytes).unwrap(),
                "not repaired"
            );
        }
    }

    #[test]
    fn mismatched_or_stale_entries_are_recomputed() {
        let dir = tempfile::tempdir().unwrap();
        let cache = SvdCache::new(dir.path());
        let mut matrices = model(400);
        cache.get_or_compute("h", &matrices, |_, _| {}).unwrap();

        // Same name, new shape (16×8 → 8×16).
        matrices[0] = ("mlp.gate".into(), ternary(8, 16, 9), 8, 16);
        let (out, stats) = cache.get_or_compute("h", &matrices, |_, _| {}).unwrap();
        assert_eq!((stats.hits, stats.computed), (2, 1));
        assert_eq!((out[0].1.rows, out[0].1.cols), (8, 16));
        assert!(stats.max_relative_error < 1e-6);

        // Same name and shape, different W: the hash did not cover it.
        matrices[1].1 = ternary(8, 16, 10);
        let (out, stats) = cache.get_or_compute("h", &matrices, |_, _| {}).unwrap();
        assert_eq!((stats.hits, stats.computed), (2, 1));
        assert!(out[1].1.relative_error(&matrices[1].1) < 1e-6);
        let (_, stats) = cache.get_or_compute("h", &matrices, |_, _| {}).unwrap();
        assert_eq!((stats.hits, stats.computed), (3, 0));

        // An entry without its recorded fingerprint cannot be trusted.
        let path = cache.file_path("h");
        let mut file = parse_cache_file(&std::fs::read(&path).unwrap()).unwrap();
        file.metadata.remove("attn.q.w_fnv1a64");
        write_cache_file(&path, &file).unwrap();
        let (_, stats) = cache.get_or_compute("h", &matrices, |_, _| {}).unwrap();
        assert_eq!((stats.hits, stats.computed), (2, 1));
    }

    #[test]
    fn fingerprint_is_fnv1a_64() {
        // Reference values from a direct Python implementation of FNV-1a 64, which gives the
        // published af63dc4c8601ec8c for b"a".
        assert_eq!(fingerprint(&[]), "cbf29ce484222325");
        assert_eq!(fingerprint(&[1.0, -0.0]), "0979a9ee2da1bb98");
        assert_ne!(fingerprint(&[0.0]), fingerprint(&[-0.0]));
    }

    #[test]
    fn different_hashes_use_different_directories() {
        let dir = tempfile::tempdir().unwrap();
        let cache = SvdCache::new(dir.path());
        let matrices = model(500);
        cache
            .get_or_compute("model-a", &matrices, |_, _| {})
            .unwrap();
        let (_, stats) = cache
            .get_or_compute("model-b", &matrices, |_, _| {})
            .unwrap();
        assert_eq!((stats.hits, stats.computed), (0, 3));
        assert!(dir.path().join("model-a/svd.safetensors").is_file());
        assert!(dir.path().join("model-b/svd.safetensors").is_file());
        assert_ne!(cache.file_path("model-a"), cache.file_path("model-b"));
    }

    #[test]
    fn bad_input_is_an_error_naming_the_matrix() {
        let dir = tempfile::tempdir().unwrap();
        let cache = SvdCache::new(dir.path());
        let ok = model(600);
        for hash in ["", "../up", "a/b", ".hidden"] {
            let err = cache.get_or_compute(hash, &ok, |_, _| {}).unwrap_err();
            assert!(
                matches!(err, SvdError::BadModelHash { .. }),
                "{hash}: {err}"
            );
        }
        let mut dup = ok.clone();
        dup.push(ok[0].clone());
        let err = cache.get_or_compute("h", &dup, |_, _| {}).unwrap_err();
        assert_eq!(
            err.to_string(),
            "matrix `mlp.gate` is listed twice; matrix names must be unique"
        );
        let short = vec![("w".to_string(), vec![0.0; 5], 2, 3)];
        let err = cache.get_or_compute("h", &short, |_, _| {}).unwrap_err();
        assert_eq!(
            err.to_string(),
            "matrix `w`: 5 values given, expected rows × cols = 2 × 3"
        );
        let inf = vec![("w".to_string(), vec![0.0, 1.0, 0.0, f32::INFINITY], 2, 2)];
        let err = cache.get_or_compute("h", &inf, |_, _| {}).unwrap_err();
        assert_eq!(
            err.to_string(),
            "matrix `w`: non-finite value inf at row 1, column 1"
        );
        assert!(
            !dir.path().join("h").exists(),
            "an input error wrote to the cache"
        );
    }

    #[test]
    fn default_dir_precedence() {
        let env = |vars: &'static [(&'static str, &'static str)]| {
            move |key: &str| {
                vars.iter()
                    .find(|(k, _)| *k == key)
                    .map(|(_, v)| OsString::from(v))
            }
        };
        let all: &'static [(&str, &str)] = &[
            ("BITSVF_CACHE", "/c"),
            ("XDG_CACHE_HOME", "/x"),
            ("HOME", "/h"),
        ];
        assert_eq!(default_dir_from(env(all)), PathBuf::from("/c"));
        assert_eq!(default_dir_from(env(&all[1..])), PathBuf::from("/x/bitsvf"));
        assert_eq!(
            default_dir_from(env(&all[2..])),
            PathBuf::from("/h/.cache/bitsvf")
        );
        assert_eq!(default_dir_from(env(&[])), PathBuf::from(".bitsvf-cache"));
        let odd: &'static [(&str, &str)] = &[
            ("BITSVF_CACHE", ""),
            ("XDG_CACHE_HOME", "rel"),
            ("HOME", "/h"),
        ];
        assert_eq!(
            default_dir_from(env(odd)),
            PathBuf::from("/h/.cache/bitsvf")
        );
    }
}
