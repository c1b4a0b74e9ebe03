//! Thin SVD of weight matrices and its on-disk cache (DESIGN.md §3).
//!
//! SVF trains one vector `z ∈ ℝʳ` per target matrix `W = U diag(σ) Vᵀ`, `r = min(m, n)`; the
//! factors `u`, `sigma`, `v` are computed once per model and reused by every expert, so they
//! are cached on disk keyed by the model's content hash.
//!
//! Numerics: the decomposition runs in f64 with faer (one-sided Householder bidiagonalisation
//! then a divide-and-conquer bidiagonal SVD) and is stored as f32. Singular vectors of ternary
//! matrices feed the training signal `∂L/∂z_i = σ_i · u_iᵀ G v_i`. Measured on a random
//! ternary 1536×512 matrix: faer in f32 leaves `max |UᵀU − I|` ≈ 1e-5; in f64 then rounded to
//! f32 it is ≈ 1e-8 and `W` is reconstructed to ≈ 5e-8 relative, for ~1.5× the time.
//!
//! Reproducibility: singular vectors are defined up to sign, so [`thin_svd`] fixes one (the
//! entry of largest magnitude of each column of `U` is positive, the matching column of `V`
//! flipped with it). faer runs sequentially here (`Par::Seq`), so the same input gives
//! bit-identical output on the same machine whatever the thread count; across CPUs (different
//! SIMD paths) results agree to rounding, and the sign rule keeps them from flipping. Where
//! singular values are repeated (exactly degenerate), the vectors of that subspace are not
//! unique and no rule can make them so; `U diag(σ) Vᵀ` still is.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::ffi::OsString;

use std::path::{Path, PathBuf};

use std::sync::mpsc;
use std::time::Instant;

use crate::engine::checkpoint::st::OwnedTensor;
use faer::diag::Diag;
use faer::dyn_stack::{MemBuffer, MemStack};
use faer::linalg::svd::ComputeSvdVectors;
use faer::{Accum, Mat, Par};
use rayon::prelude::*;
use safetensors::{Dtype, SafeTensors};

/// Two entries of a column of `U` whose magnitudes agree to this relative tolerance count as
/// tied for the sign rule, and the first one wins. Exact ties are common in small ternary
/// matrices (e.g. `u = (0, 1, −1)/√2`); the tolerance keeps rounding noise (~1e-15) from
/// deciding them differently on different machines.
const SIGN_TIE_RELATIVE: f64 = 1e-6;

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

/// A thin singular value decomposition `W = U diag(σ) Vᵀ` of a row-major `rows × cols` matrix,
/// stored as f32. `r = sigma.len()` is `min(rows, cols)`, or `k` after [`Svd::truncate`].
#[derive(Debug, Clone, PartialEq)]
pub struct Svd {
    /// Rows of `W` (m, the output dimension of a linear layer).
    pub rows: usize,
    /// Columns of `W` (n, the input dimension).
    pub cols: usize,
    /// Left singular vectors, row-major `[rows, r]`; column `i` is `u_i`.
    pub u: Vec<f32>,
    /// Singular values `[r]`, non-negative, in non-increasing order.
    pub sigma: Vec<f32>,
    /// Right singular vectors, row-major `[cols, r]`; column `i` is `v_i`.
    pub v: Vec<f32>,
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

/// Why faer could not decompose a matrix; [`SvdCache`] turns it into an [`SvdError`] naming
/// the matrix.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Failure {
    NonFinite { row: usize, col: usize, value: f32 },
    NoConvergence,
}

/// The thin SVD of the row-major `rows × cols` matrix `w`, computed in f64, stored as f32,
/// with the sign convention of the module docs (largest-magnitude entry of each `u_i`
/// positive; first such entry on ties).
///
/// # Panics
/// If `w.len() != rows * cols`, if `w` holds a NaN or infinity, or if faer's iteration does
/// not converge (not expected for finite input). [`SvdCache::get_or_compute`] checks these and
/// returns an error instead.
pub fn thin_svd(w: &[f32], rows: usize, cols: usize) -> Svd {
    assert_eq!(
        w.len(),
        rows * cols,
        "thin_svd: {} values for a {rows} × {cols} matrix",
        w.len()
    );
    match try_thin_svd(w, rows, cols) {
        Ok(svd) => svd,
        Err(Failure::NonFinite { row, col, value }) => {
            panic!("thin_svd: non-finite value {value} at row {row}, column {col}")
        }
        Err(Failure::NoConvergence) => panic!("thin_svd: faer's SVD did not converge"),
    }
}

fn try_thin_svd(w: &[f32], rows: usize, cols: usize) -> Result<Svd, Failure> {
    debug_assert_eq!(w.len(), rows * cols);
    if let Some(k) = w.iter().position(|x| !x.is_finite()) {
        return Err(Failure::NonFinite {
            row: k / cols,
            col: k % cols,
            value: w[k],
        });
    }
    let r = rows.min(cols);
    if r == 0 {
        return Ok(Svd {
            rows,
            cols,
            u: Vec::new(),
            sigma: Vec::new(),
            v: Vec::new(),
        });
    }

    let a = Mat::<f64>::from_fn(rows, cols, |i, j| f64::from(w[i * cols + j])); // [m, n]
    let mut u = Mat::<f64>::zeros(rows, r); // [m, r]
    let mut v = Mat::<f64>::zeros(cols, r); // [n, r]
    let mut s = Diag::<f64>::zeros(r); // [r]

    // Sequential inside one matrix: the cache parallelises across matrices (better use of
    // cores for many mid-sized matrices) and a fixed schedule keeps results bit-reproducible.
    let par = Par::Seq;
    let mut scratch = MemBuffer::new(faer::linalg::svd::svd_scratch::<f64>(
        rows,
        cols,
        ComputeSvdVectors::Thin,
        ComputeSvdVectors::Thin,
        par,
        Default::default(),
    ));
    faer::linalg::svd::svd(
        a.as_ref(),
        s.as_mut(),
        Some(u.as_mut()),
        Some(v.as_mut()),
        par,
        MemStack::new(&mut scratch),
        Default::default(),
    )
    .map_err(|_| Failure::NoConvergence)?;

    for i in 0..r {
        let col = u.col(i);
        let max_abs = (0..rows).map(|k| col[k].abs()).fold(0.0f64, f64::max);
        let lead = (0..rows)
            .find(|&k| col[k].abs() >= max_abs * (1.0 - SIGN_TIE_RELATIVE))
            .expect("a column of U has an entry of maximal magnitude");
        if col[lead] < 0.0 {
            for k in 0..rows {
                u[(k, i)] = -u[(k, i)];
            }
            for k in 0..cols {
                v[(k, i)] = -v[(k, i)];
            }
        }
    }

    let sigma: Vec<f32> = (0..r).map(|i| s[i].max(0.0) as f32).collect();
    debug_assert!(sigma.windows(2).all(|p| p[0] >= p[1]), "faer sorts σ");
    Ok(Svd {
        rows,
        cols,
        u: to_row_major_f32(&u),
        sigma,
        v: to_row_major_f32(&v),
    })
}

fn to_row_major_f32(m: &Mat<f64>) -> Vec<f32> {
    let mut out = Vec::with_capacity(m.nrows() * m.ncols());
    for i in 0..m.nrows() {
        for j in 0..m.ncols() {
            out.push(m[(i, j)] as f32);
        }
    }
    out
}

impl Svd {
    /// Number of singular triplets held: `r = min(rows, cols)`, or `k` after
    /// [`Svd::truncate`] — the length of an SVF `z` vector for this matrix.
    pub fn rank(&self) -> usize {
        self.sigma.len()
    }

    /// Number of singular values above `max(rows, cols) · σ_max · f64::EPSILON`, the threshold
    /// of `numpy.linalg.matrix_rank`. Ternary matrices can be rank-deficient; SVF scales on
    /// directions with `σ_i = 0` change nothing.
    pub fn numerical_rank(&self) -> usize {
        let max = self.sigma.first().copied().unwrap_or(0.0) as f64;
        let tol = self.rows.max(self.cols) as f64 * max * f64::EPSILON;
        self.sigma.iter().filter(|&&s| s as f64 > tol).count()
    }

    /// The top-`k` triplets (`min(k, r)` if `k` exceeds the rank held).
    pub fn truncate(&self, k: usize) -> Svd {
        let r = self.rank();
        let k = k.min(r);
        let take = |m: &[f32], rows: usize| -> Vec<f32> {
            (0..rows)
                .flat_map(|i| &m[i * r..i * r + k])
                .copied()
                .collect()
        };
        Svd {
            rows: self.rows,
            cols: self.cols,
            u: take(&self.u, self.rows),
            sigma: self.sigma[..k].to_vec(),
            v: take(&self.v, self.cols),
        }
    }

    /// `U diag(σ) Vᵀ` as a row-major `rows × cols` matrix (accumulated in f64).
    pub fn reconstruct(&self) -> Vec<f32> {
        let mut w = Mat::<f64>::zeros(self.rows, self.cols); // [m, n]
        self.accumulate(&mut w, Accum::Replace, 1.0);
        to_row_major_f32(&w)
    }

    /// `‖W − UΣVᵀ‖_F / ‖W‖_F`, computed in f64 from the stored f32 factors; the absolute
    /// `‖UΣVᵀ‖_F` if `W` is zero.
    ///
    /// # Panics
    /// If `w.len() != rows * cols`.
    pub fn relative_error(&self, w: &[f32]) -> f64 {
        assert_eq!(
            w.len(),
            self.rows * self.cols,
            "relative_error: {} values for a {} × {} matrix",
            w.len(),
            self.rows,
            self.cols
        );
        let mut residual =
            Mat::<f64>::from_fn(self.rows, self.cols, |i, j| f64::from(w[i * self.cols + j]));
        let norm_w = residual.norm_l2();
        self.accumulate(&mut residual, Accum::Add, -1.0);
        let norm_residual = residual.norm_l2();
        if norm_w > 0.0 {
            norm_residual / norm_w
        } else {
            norm_residual
        }
    }

    /// `dst ← (dst if Add) + alpha · U diag(σ) Vᵀ`, in f64.
    fn accumulate(&self, dst: &mut Mat<f64>, accum: Accum, alpha: f64) {
        let r = self.rank();
        let us = Mat::<f64>::from_fn(self.rows, r, |i, k| {
            f64::from(self.u[i * r + k]) * f64::from(self.sigma[k])
        }); // [m, r]
        let v = Mat::<f64>::from_fn(self.cols, r, |j, k| f64::from(self.v[j * r + k])); // [n, r]
        if r == 0 {
            if accum == Accum::Replace {
                dst.fill(0.0);
            }
            return;
        }
        faer::linalg::matmul::matmul(
            dst.as_mut(),
            accum,
            us.as_ref(),
            v.as_ref().transpose(),
            alpha,
            Par::Seq,
        );
    }
}

/// An on-disk cache of thin SVDs: one safetensors file per model,
/// `<dir>/<model_hash>/svd.safetensors`, holding tensors `<name>.u` `[rows, r]`,
/// `<name>.sigma` `[r]` and `<name>.v` `[cols, r]` (F32) for every matrix computed so far.
#[derive(Debug, Clone)]
pub struct SvdCache {
    dir: PathBuf,
}

/// The cache file's contents: tensors and per-matrix metadata (without `format`).
#[derive(Debug, Default, PartialEq)]
struct CacheFile {
    tensors: BTreeMap<String, OwnedTensor>,
    metadata: BTreeMap<String, String>,
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
fn validate_hash(hash: &str) -> Result<(), SvdError> {
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
        if let Some(k) = w.iter().position(|x| !x.is_finite()) {
            return Err(SvdError::NonFinite {
                name: name.clone(),
                row: k / cols,
                col: k % cols,
                value: w[k],
            });
        }
    }
    Ok(())
}

/// The cache file's contents; empty if there is none, or if it is unreadable as a cache
/// (warned: the entries are recomputed and the file rewritten).
fn read_cache_file(path: &Path) -> Result<CacheFile, SvdError> {
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
fn fingerprint(w: &[f32]) -> String {
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
fn cached_svd(
    file: &CacheFile,
    name: &str,
    w: &[f32],
    rows: usize,
    cols: usize,
) -> Result<Option<(Svd, f64)>, String> {
    let r = rows.min(cols);
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
    match cached_svd(file, name, w, rows, cols) {
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

fn write_cache_file(path: &Path, file: &CacheFile) -> Result<(), SvdError> {
    let dir = path
        .parent()
        .expect("cache file paths are <dir>/<hash>/<file>");
    std::fs::create_dir_all(dir).map_err(|source| SvdError::Io {
        path: dir.to_path_buf(),
        source,
    })?;
    let mut metadata: HashMap<String, String> = file.metadata.clone().into_iter().collect();
    metadata.insert("format".to_string(), CACHE_FORMAT.to_string());
    let tensors = file.tensors.iter().map(|(k, t)| (k.as_str(), t));
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

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    /// A random ternary `rows × cols` matrix, row-major.
    fn ternary(rows: usize, cols: usize, seed: u64) -> Vec<f32> {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        (0..rows * cols)
            .map(|_| rng.gen_range(-1i32..=1) as f32)
            .collect()
    }

    /// `max |MᵀM − I|` for a row-major `[rows, r]` matrix `m`.
    fn gram_error(m: &[f32], rows: usize, r: usize) -> f64 {
        let mut worst = 0.0f64;
        for a in 0..r {
            for b in 0..r {
                let dot: f64 = (0..rows)
                    .map(|i| f64::from(m[i * r + a]) * f64::from(m[i * r + b]))
                    .sum();
                let target = if a == b { 1.0 } else { 0.0 };
                worst = worst.max((dot - target).abs());
            }
        }
        worst
    }

    /// Row-major `n × n` Householder reflection `I − 2 a aᵀ / aᵀa`.
    fn householder(a: &[f64]) -> Vec<f64> {
        let n = a.len();
        let norm2: f64 = a.iter().map(|x| x * x).sum();
        let mut h = vec![0.0; n * n];
        for i in 0..n {
            for j in 0..n {
                let delta = if i == j { 1.0 } else { 0.0 };
                h[i * n + j] = delta - 2.0 * a[i] * a[j] / norm2;
            }
        }
        h
    }

    /// Row-major `n × n` Givens rotation by `theta` in the plane of axes `p`, `q`.
    fn givens(n: usize, p: usize, q: usize, theta: f64) -> Vec<f64> {
        let mut g = vec![0.0; n * n];
        for i in 0..n {
            g[i * n + i] = 1.0;
        }
        let (s, c) = theta.sin_cos();
        g[p * n + p] = c;
        g[q * n + q] = c;
        g[p * n + q] = -s;
        g[q * n + p] = s;
        g
    }

    /// Row-major `(a: [m, k]) · (b: [k, n])`.
    fn matmul(a: &[f64], b: &[f64], m: usize, k: usize, n: usize) -> Vec<f64> {
        let mut c = vec![0.0; m * n];
        for i in 0..m {
            for l in 0..k {
                for j in 0..n {
                    c[i * n + j] += a[i * k + l] * b[l * n + j];
                }
            }
        }
        c
    }

    fn column(m: &[f32], r: usize, j: usize) -> Vec<f64> {
        m.chunks_exact(r).map(|row| f64::from(row[j])).collect()
    }

    fn assert_close(got: &[f64], want: &[f64], tol: f64, what: &str) {
        assert_eq!(got.len(), want.len(), "{what}: length");
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            assert!(
                (g - w).abs() <= tol,
                "{what}[{i}]: got {g}, want {w} (tol {tol})"
            );
        }
    }

    fn assert_bit_identical(a: &Svd, b: &Svd) {
        let bits = |x: &[f32]| x.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
        assert_eq!((a.rows, a.cols), (b.rows, b.cols));
        assert_eq!(bits(&a.u), bits(&b.u), "u differs");
        assert_eq!(bits(&a.sigma), bits(&b.sigma), "sigma differs");
        assert_eq!(bits(&a.v), bits(&b.v), "v differs");
    }

    fn sigma_f64(svd: &Svd) -> Vec<f64> {
        svd.sigma.iter().map(|&s| f64::from(s)).collect()
    }

    /// The checks every decomposition must pass: shapes, orthonormal factors, σ sorted and
    /// non-negative, W reconstructed, and the sign convention.
    fn assert_valid(svd: &Svd, w: &[f32], rows: usize, cols: usize) {
        let r = rows.min(cols);
        assert_eq!((svd.rows, svd.cols, svd.rank()), (rows, cols, r));
        assert_eq!((svd.u.len(), svd.v.len()), (rows * r, cols * r));
        assert!(svd.sigma.windows(2).all(|p| p[0] >= p[1]), "σ not sorted");
        assert!(svd.sigma.iter().all(|&s| s >= 0.0), "negative σ");
        let (eu, ev) = (gram_error(&svd.u, rows, r), gram_error(&svd.v, cols, r));
        assert!(eu < 1e-5, "{rows}×{cols}: |UᵀU − I| = {eu:e}");
        assert!(ev < 1e-5, "{rows}×{cols}: |VᵀV − I| = {ev:e}");
        let err = svd.relative_error(w);
        assert!(err < 1e-5, "{rows}×{cols}: relative error {err:e}");
        for j in 0..r {
            let u = column(&svd.u, r, j);
            let max = u.iter().fold(0.0f64, |m, x| m.max(x.abs()));
            let lead = u.iter().find(|x| x.abs() >= max * (1.0 - 1e-5)).unwrap();
            assert!(*lead > 0.0, "column {j} of U leads with {lead}");
        }
    }

    #[test]
    fn known_singular_values_from_orthogonal_factors() {
        // W = Q1[:, :5] diag(s) Q2ᵀ with Q1 = H(a)·H(b) (7×7) and Q2 = H(c)·G (5×5): its
        // singular values are s and its singular vectors the columns of Q1, Q2 up to sign.
        let s = [9.0, 4.0, 2.5, 1.0, 0.25];
        let (m, n) = (7, 5);
        let q1 = matmul(
            &householder(&[1.0, -2.0, 0.5, 3.0, 0.0, 1.0, -1.0]),
            &householder(&[0.0, 1.0, 1.0, -0.5, 2.0, 0.0, 1.5]),
            m,
            m,
            m,
        );
        let q2 = matmul(
            &householder(&[2.0, 1.0, -1.0, 0.5, 1.0]),
            &givens(n, 1, 3, 0.7),
            n,
            n,
            n,
        );
        let mut q1s = vec![0.0; m * n]; // [m, n] = Q1[:, :n] diag(s)
        for i in 0..m {
            for j in 0..n {
                q1s[i * n + j] = q1[i * m + j] * s[j];
            }
        }
        let q2t: Vec<f64> = (0..n * n).map(|k| q2[(k % n) * n + k / n]).collect();
        let w64 = matmul(&q1s, &q2t, m, n, n);
        let w: Vec<f32> = w64.iter().map(|&x| x as f32).collect();

        for (w, rows, cols, left, right) in [
            (w.clone(), m, n, (&q1, m), (&q2, n)),
            // The transpose exercises the wide path (cols > rows) with U and V swapped.
            (
                (0..m * n).map(|k| w[(k % m) * n + k / m]).collect(),
                n,
                m,
                (&q2, n),
                (&q1, m),
            ),
        ] {
            let svd = thin_svd(&w, rows, cols);
            assert_valid(&svd, &w, rows, cols);
            assert_close(&sigma_f64(&svd), &s, 1e-5, "σ");
            for j in 0..n {
                let (q, dim) = left;
                let dot: f64 = (0..rows)
                    .map(|i| column(&svd.u, n, j)[i] * q[i * dim + j])
                    .sum();
                assert!((dot.abs() - 1.0).abs() < 1e-5, "u_{j}·q_{j} = {dot}");
                let (q, dim) = right;
                let dot: f64 = (0..cols)
                    .map(|i| column(&svd.v, n, j)[i] * q[i * dim + j])
                    .sum();
                assert!((dot.abs() - 1.0).abs() < 1e-5, "v_{j}·q_{j} = {dot}");
            }
            // Eckart–Young: the best rank-2 approximation leaves exactly s₃..s₅.
            let tail: f64 = s[2..].iter().map(|x| x * x).sum::<f64>().sqrt();
            let all: f64 = s.iter().map(|x| x * x).sum::<f64>().sqrt();
            let err = svd.truncate(2).relative_error(&w);
            assert!((err - tail / all).abs() < 1e-6, "rank-2 error {err}");
        }
    }

    #[test]
    fn hand_computed_2x2() {
        // WᵀW = [[25, 20], [20, 25]]: eigenvalues 45 and 5, eigenvectors (1, ±1)/√2;
        // u_i = W v_i / σ_i = (1, 3)/√10 and (3, −1)/√10.
        let w = [3.0, 0.0, 4.0, 5.0];
        let svd = thin_svd(&w, 2, 2);
        assert_valid(&svd, &w, 2, 2);
        assert_close(&sigma_f64(&svd), &[45f64.sqrt(), 5f64.sqrt()], 1e-6, "σ");
        let (a, b) = (1.0 / 10f64.sqrt(), 3.0 / 10f64.sqrt());
        let h = std::f64::consts::FRAC_1_SQRT_2;
        assert_close(&column(&svd.u, 2, 0), &[a, b], 1e-6, "u₀");
        assert_close(&column(&svd.u, 2, 1), &[b, -a], 1e-6, "u₁");
        assert_close(&column(&svd.v, 2, 0), &[h, h], 1e-6, "v₀");
        assert_close(&column(&svd.v, 2, 1), &[h, -h], 1e-6, "v₁");
    }

    #[test]
    fn hand_computed_3x2_and_its_transpose() {
        // WᵀW = [[2, 1], [1, 2]]: σ = √3, 1; v = (1, ±1)/√2; u₀ = (2, 1, 1)/√6 and
        // u₁ = (0, 1, −1)/√2, whose two entries of equal magnitude test the tie rule
        // (the first wins, so u₁ starts positive).
        let w = [1.0, 1.0, 1.0, 0.0, 0.0, 1.0];
        let h = std::f64::consts::FRAC_1_SQRT_2;
        let r6 = 6f64.sqrt();
        let svd = thin_svd(&w, 3, 2);
        assert_valid(&svd, &w, 3, 2);
        assert_close(&sigma_f64(&svd), &[3f64.sqrt(), 1.0], 1e-6, "σ");
        assert_close(
            &column(&svd.u, 2, 0),
            &[2.0 / r6, 1.0 / r6, 1.0 / r6],
            1e-6,
            "u₀",
        );
        assert_close(&column(&svd.u, 2, 1), &[0.0, h, -h], 1e-6, "u₁");
        assert_close(&column(&svd.v, 2, 0), &[h, h], 1e-6, "v₀");
        assert_close(&column(&svd.v, 2, 1), &[h, -h], 1e-6, "v₁");

        // Wᵀ = V Σ Uᵀ: same σ, roles swapped; the sign rule now applies to (1, ±1)/√2,
        // another exact tie, so both columns of U lead positive.
        let wt = [1.0, 1.0, 0.0, 1.0, 0.0, 1.0];
        let svd = thin_svd(&wt, 2, 3);
        assert_valid(&svd, &wt, 2, 3);
        assert_close(&sigma_f64(&svd), &[3f64.sqrt(), 1.0], 1e-6, "σ");
        assert_close(&column(&svd.u, 2, 1), &[h, -h], 1e-6, "u₁ of Wᵀ");
        assert_close(&column(&svd.v, 2, 1), &[0.0, h, -h], 1e-6, "v₁ of Wᵀ");
    }

    #[test]
    // numpy's printed values are kept verbatim, √2 included.
    #[allow(clippy::approx_constant)]
    fn ternary_6x4_matches_numpy() {
        // Reference from numpy 2.4.6, `numpy.linalg.svd(W, full_matrices=False)` in f64, with
        // the same sign rule applied to its output. (σ² = 5 + √3, 4, 5 − √3, 2 analytically.)
        #[rustfmt::skip]
        let w = [
             1.0,  0.0, -1.0,  1.0,
             0.0,  1.0,  1.0, -1.0,
            -1.0,  1.0,  0.0,  0.0,
             1.0,  1.0,  1.0,  0.0,
             0.0, -1.0,  1.0,  1.0,
             1.0,  0.0,  0.0, -1.0,
        ];
        let numpy_sigma = [
            2.5946195882188348,
            2.0,
            1.8077469934786565,
            1.414213562373095,
        ];
        let numpy_u0 = [
            -0.41919974647505087,
            0.6612248329466446,
            0.24202508647159376,
            0.41919974647505104,
            -0.30687551293973,
            0.24202508647159357,
        ];
        let numpy_v0 = [
            0.0,
            0.6279630301995545,
            0.4597008433809827,
            -0.6279630301995542,
        ];
        let svd = thin_svd(&w, 6, 4);
        assert_valid(&svd, &w, 6, 4);
        assert_close(&sigma_f64(&svd), &numpy_sigma, 1e-5, "σ vs numpy");
        assert_close(&column(&svd.u, 4, 0), &numpy_u0, 1e-5, "u₀ vs numpy");
        assert_close(&column(&svd.v, 4, 0), &numpy_v0, 1e-5, "v₀ vs numpy");
        assert_eq!(svd.numerical_rank(), 4);
    }

    #[test]
    fn random_ternary_factors_are_orthonormal() {
        for (rows, cols, seed) in [(64, 32, 1), (32, 64, 2), (48, 48, 3), (1, 9, 4), (9, 1, 5)] {
            let w = ternary(rows, cols, seed);
            let svd = thin_svd(&w, rows, cols);
            assert_valid(&svd, &w, rows, cols);
            let back = svd.reconstruct();
            let worst = w
                .iter()
                .zip(&back)
                .fold(0.0f32, |m, (a, b)| m.max((a - b).abs()));
            assert!(worst < 1e-5, "{rows}×{cols}: max |W − UΣVᵀ| = {worst:e}");
        }
    }

    #[test]
    fn rank_deficient_and_degenerate_inputs() {
        // Row 2 = row 0 + row 1 and row 3 = row 0: rank 2.
        #[rustfmt::skip]
        let w = [
            1.0, 0.0, -1.0,  0.0,
            0.0, 1.0,  0.0, -1.0,
            1.0, 1.0, -1.0, -1.0,
            1.0, 0.0, -1.0,  0.0,
            0.0, 0.0,  0.0,  0.0,
        ];
        let svd = thin_svd(&w, 5, 4);
        assert_valid(&svd, &w, 5, 4);
        assert_eq!((svd.rank(), svd.numerical_rank()), (4, 2));
        assert!(
            svd.sigma[2] < 1e-6 && svd.sigma[3] < 1e-6,
            "{:?}",
            svd.sigma
        );

        let zero = [0.0f32; 6];
        let svd = thin_svd(&zero, 3, 2);
        assert_eq!(svd.sigma, vec![0.0, 0.0]);
        assert_eq!(svd.numerical_rank(), 0);
        assert_eq!(svd.relative_error(&zero), 0.0);
        assert_eq!(svd.reconstruct(), zero.to_vec());

        let empty = thin_svd(&[], 0, 5);
        assert_eq!((empty.rank(), empty.u.len(), empty.v.len()), (0, 0, 0));
        assert_eq!(empty.reconstruct(), Vec::<f32>::new());
    }

    #[test]
    fn truncate_keeps_the_leading_columns() {
        let w = ternary(10, 6, 7);
        let svd = thin_svd(&w, 10, 6);
        let top = svd.truncate(3);
        assert_eq!((top.rank(), top.u.len(), top.v.len()), (3, 30, 18));
        assert_eq!(&top.sigma[..], &svd.sigma[..3]);
        for i in 0..10 {
            assert_eq!(&top.u[i * 3..i * 3 + 3], &svd.u[i * 6..i * 6 + 3]);
        }
        for j in 0..6 {
            assert_eq!(&top.v[j * 3..j * 3 + 3], &svd.v[j * 6..j * 6 + 3]);
        }
        assert_bit_identical(&svd.truncate(99), &svd);
        assert_eq!(svd.truncate(0).reconstruct(), vec![0.0; 60]);
    }

    #[test]
    fn results_are_bit_identical_across_calls_and_threads() {
        let w = ternary(40, 24, 11);
        let a = thin_svd(&w, 40, 24);
        let b = thin_svd(&w, 40, 24);
        let c = std::thread::spawn(move || thin_svd(&w, 40, 24))
            .join()
            .unwrap();
        assert_bit_identical(&a, &b);
        assert_bit_identical(&a, &c);
    }

    #[test]
    #[should_panic(expected = "non-finite value NaN at row 1, column 0")]
    fn thin_svd_rejects_nan() {
        thin_svd(&[1.0, 0.0, f32::NAN, 1.0], 2, 2);
    }

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
