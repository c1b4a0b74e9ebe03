//! The top-k singular triplets of many matrices through the cache: [`partial_svd`] on each,
//! one matrix in memory per thread (the caller loads each `W` when its turn comes), saved as
//! it goes so that a killed run resumes where it stopped.

use super::cache::{
    cached_svd, check_finite, fingerprint, read_cache_file, validate_hash, write_cache_files,
    CacheFile,
};
use super::{partial_svd, CacheStats, PartialSvdOptions, Svd, SvdCache, SvdError};
use crate::engine::checkpoint::st::OwnedTensor;
use rayon::prelude::*;
use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// How often finished matrices are written out while the rest are computed.
const SAVE_EVERY: Duration = Duration::from_secs(30);

/// The parts of a decomposition as cache entries, with its fingerprint and error.
fn entries(name: &str, svd: &Svd, w: &[f32], relative_error: f64) -> CacheFile {
    let r = svd.rank();
    let mut f = CacheFile::default();
    let t = &mut f.tensors;
    t.insert(
        format!("{name}.u"),
        OwnedTensor::f32(vec![svd.rows, r], &svd.u),
    );
    t.insert(
        format!("{name}.sigma"),
        OwnedTensor::f32(vec![r], &svd.sigma),
    );
    t.insert(
        format!("{name}.v"),
        OwnedTensor::f32(vec![svd.cols, r], &svd.v),
    );
    let m = &mut f.metadata;
    m.insert(format!("{name}.w_fnv1a64"), fingerprint(w));
    m.insert(format!("{name}.relative_error"), relative_error.to_string());
    f
}

impl SvdCache {
    /// The cache file of the top-`k` factors of `model_hash` computed with `o`:
    /// `<dir>/<model_hash>/svd-top<k>-q<power iterations>-p<oversample>-s<seed>.safetensors`.
    pub fn top_file_path(&self, model_hash: &str, k: usize, o: &PartialSvdOptions) -> PathBuf {
        let file = format!(
            "svd-top{k}-q{}-p{}-s{}.safetensors",
            o.power_iters, o.oversample, o.seed
        );
        self.dir.join(model_hash).join(file)
    }

    /// The top-`k` singular triplets ([`partial_svd`] with `o`) of every `(name, rows, cols)`
    /// in `shapes`, in input order: what the cache file already holds, the rest computed in
    /// parallel, each `W` made by `load(i)` only while its matrix is worked on. Finished
    /// matrices are written out every 30 s and at the end (atomically), so an interrupted
    /// call loses at most the last half minute. A cached entry is used only if it was made
    /// from the same `W` (its fingerprint). The relative error recorded and reported is the
    /// rank-k truncation's `‖W − U_kΣ_kV_kᵀ‖_F / ‖W‖_F`.
    pub fn get_or_compute_top(
        &self,
        model_hash: &str,
        k: usize,
        o: &PartialSvdOptions,
        shapes: &[(String, usize, usize)],
        load: impl Fn(usize) -> Vec<f32> + Sync,
        mut progress: impl FnMut(usize, &str),
    ) -> Result<(Vec<(String, Svd)>, CacheStats), SvdError> {
        let start = Instant::now();
        validate_hash(model_hash)?;
        let mut seen = HashSet::new();
        if let Some((name, _, _)) = shapes.iter().find(|(n, _, _)| !seen.insert(n)) {
            return Err(SvdError::DuplicateName { name: name.clone() });
        }
        let path = self.top_file_path(model_hash, k, o);
        let file = read_cache_file(&path)?;
        let mut fresh = CacheFile::default();
        let mut results: Vec<Option<Svd>> = vec![None; shapes.len()];
        let mut stats = CacheStats::default();
        let mut failure = None;
        let mut last_save = Instant::now();
        let (file_ref, path_ref) = (&file, path.as_path());
        std::thread::scope(|scope| -> Result<(), SvdError> {
            let (tx, rx) = mpsc::channel();
            let load = &load;
            scope.spawn(move || {
                shapes
                    .par_iter()
                    .enumerate()
                    .for_each_with(tx, |tx, (i, (name, rows, cols))| {
                        let w = load(i);
                        let outcome = (|| {
                            check_finite(name, &w, *cols)?;
                            let r = k.min(*rows).min(*cols);
                            match cached_svd(file_ref, name, &w, (*rows, *cols), r) {
                                Ok(Some((svd, err))) => return Ok((svd, err, None)),
                                Ok(None) => {}
                                Err(why) => tracing::warn!(
                                "{}: cached factors of `{name}` are unusable ({why}); recomputing",
                                path_ref.display()
                            ),
                            }
                            let svd = partial_svd(&w, *rows, *cols, k, o);
                            let err = svd.relative_error(&w);
                            let new = entries(name, &svd, &w, err);
                            Ok((svd, err, Some(new)))
                        })();
                        // The receiver drains until every sender is dropped.
                        let _ = tx.send((i, outcome));
                    });
            });
            for (done, (i, outcome)) in rx.into_iter().enumerate() {
                progress(done + 1, &shapes[i].0);
                match outcome {
                    Ok((svd, err, new)) => {
                        stats.max_relative_error = stats.max_relative_error.max(err);
                        match new {
                            None => stats.hits += 1,
                            Some(new) => {
                                stats.computed += 1;
                                fresh.tensors.extend(new.tensors);
                                fresh.metadata.extend(new.metadata);
                            }
                        }
                        results[i] = Some(svd);
                    }
                    Err(e) => {
                        failure.get_or_insert(e);
                    }
                }
                if stats.computed > 0 && last_save.elapsed() >= SAVE_EVERY {
                    write_cache_files(path_ref, &[file_ref, &fresh])?;
                    last_save = Instant::now();
                }
            }
            Ok(())
        })?;
        if stats.computed > 0 {
            write_cache_files(&path, &[&file, &fresh])?;
        }
        if let Some(e) = failure {
            return Err(e);
        }
        stats.seconds = start.elapsed().as_secs_f64();
        let names = shapes.iter().map(|(n, _, _)| n.clone());
        let svds = results
            .into_iter()
            .map(|s| s.expect("every matrix reports"));
        Ok((names.zip(svds).collect(), stats))
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::ternary;
    use super::super::thin_svd;
    use super::*;

    #[test]
    fn top_factors_are_cached_per_k_and_match_the_partial_svd() {
        let dir = tempfile::tempdir().unwrap();
        let cache = SvdCache::new(dir.path());
        let shapes = vec![
            ("a".to_string(), 64, 48),
            ("b".to_string(), 40, 96),
            ("c".to_string(), 8, 8),
        ];
        let w: Vec<Vec<f32>> = (shapes.iter().enumerate())
            .map(|(i, (_, r, c))| ternary(*r, *c, 50 + i as u64))
            .collect();
        let o = PartialSvdOptions::default();
        let loads = std::sync::atomic::AtomicUsize::new(0);
        let load = |i: usize| {
            loads.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            w[i].clone()
        };
        let (got, stats) = cache
            .get_or_compute_top("h", 4, &o, &shapes, load, |_, _| {})
            .unwrap();
        assert_eq!((stats.computed, stats.hits), (3, 0));
        for ((name, svd), ((_, r, c), w)) in got.iter().zip(shapes.iter().zip(&w)) {
            assert_eq!(svd, &partial_svd(w, *r, *c, 4, &o), "{name}");
            assert_eq!(svd.rank(), 4);
            let full = thin_svd(w, *r, *c);
            let err = svd.relative_error(w);
            assert!(
                (err - full.truncate(4).relative_error(w)).abs() < 0.05,
                "{name}: {err}"
            );
        }
        // Again: every matrix from the file; another k is another file.
        let (again, stats) = cache
            .get_or_compute_top("h", 4, &o, &shapes, |i| w[i].clone(), |_, _| {})
            .unwrap();
        assert_eq!((stats.computed, stats.hits), (0, 3));
        assert_eq!(again, got);
        let (other, stats) = cache
            .get_or_compute_top("h", 2, &o, &shapes, |i| w[i].clone(), |_, _| {})
            .unwrap();
        assert_eq!(stats.computed, 3);
        assert!(other.iter().all(|(_, s)| s.rank() == 2));
        // A changed W is recomputed, not served stale.
        let mut w2 = w.clone();
        w2[1][0] = -w2[1][0] + 0.5;
        let (_, stats) = cache
            .get_or_compute_top("h", 4, &o, &shapes, |i| w2[i].clone(), |_, _| {})
            .unwrap();
        assert_eq!((stats.computed, stats.hits), (1, 2));
    }

    #[test]
    fn bad_input_names_the_matrix() {
        let dir = tempfile::tempdir().unwrap();
        let cache = SvdCache::new(dir.path());
        let o = PartialSvdOptions::default();
        let shapes = vec![("a".to_string(), 4, 4), ("a".to_string(), 4, 4)];
        let err = cache
            .get_or_compute_top("h", 2, &o, &shapes, |_| vec![0.0; 16], |_, _| {})
            .unwrap_err();
        assert!(err.to_string().contains("`a`"), "{err}");
        let shapes = vec![("nan".to_string(), 2, 2)];
        let err = cache
            .get_or_compute_top(
                "h",
                1,
                &o,
                &shapes,
                |_| vec![0.0, f32::NAN, 0.0, 1.0],
                |_, _| {},
            )
            .unwrap_err();
        assert!(
            err.to_string().contains("`nan`") && err.to_string().contains("column 1"),
            "{err}"
        );
    }
}
