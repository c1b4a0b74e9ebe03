//! The SVD factors an expert needs: the target matrices of a checkpoint, their thin SVDs
//! (through the disk cache, or computed directly for tests and benchmarks), what loading them
//! took, and the length of z each target gets under a parameterization.

use crate::engine::checkpoint::Checkpoint;
use crate::error::{Error, Result};
use crate::svf::svd::{thin_svd, PartialSvdOptions, Svd, SvdCache};
use crate::svf::{Parameterization, Targets};
use serde::Serialize;
use std::collections::BTreeMap;

/// The target matrices of `ck` as (name, W, rows, cols), W = γ·W_t in f32.
pub fn target_matrices(ck: &Checkpoint, targets: Targets) -> Vec<(String, Vec<f32>, usize, usize)> {
    ck.linears()
        .filter(|(_, k, _)| targets.includes(*k))
        .map(|(n, _, l)| (n, l.matrix.dequantize(), l.matrix.rows(), l.matrix.cols()))
        .collect()
}

/// Thin SVDs of the target matrices, from the disk cache keyed by the model's content hash.
/// (A command that needs them more than once holds a [`Base`], which loads them once.)
pub fn factors(
    ck: &Checkpoint,
    targets: Targets,
    cache: &SvdCache,
) -> Result<(BTreeMap<String, Svd>, crate::svf::svd::CacheStats)> {
    factors_hashed(ck, &ck.content_hash(), targets, cache)
}

/// [`factors`] of `ck` whose content hash is `hash`.
pub(crate) fn factors_hashed(
    ck: &Checkpoint,
    hash: &str,
    targets: Targets,
    cache: &SvdCache,
) -> Result<(BTreeMap<String, Svd>, crate::svf::svd::CacheStats)> {
    let mats = target_matrices(ck, targets);
    let (out, stats) = cache
        .get_or_compute(hash, &mats, |_, _| {})
        .map_err(|e| Error::Input(format!("SVD cache: {e}")))?;
    // Factors are stored in f32: a faithful decomposition reconstructs W to ~1e-7.
    if stats.max_relative_error > MAX_SVD_ERROR {
        return Err(Error::Check(format!(
            "SVD reconstruction error {:.2e} exceeds {MAX_SVD_ERROR:.0e} (‖W − UΣVᵀ‖/‖W‖)",
            stats.max_relative_error
        )));
    }
    Ok((out.into_iter().collect(), stats))
}

/// The top-`k` singular triplets of the target matrices, from the disk cache keyed by the
/// model's content hash and `k` ([`SvdCache::get_or_compute_top`] with
/// [`PartialSvdOptions::for_rank`]): one dequantized matrix in memory per thread, never the
/// dense model, so a 2B-4T-sized model's factors take what the factors themselves take.
/// `progress(done, total)` is called as each matrix is ready.
pub(crate) fn top_factors_hashed(
    ck: &Checkpoint,
    hash: &str,
    targets: Targets,
    k: usize,
    cache: &SvdCache,
    mut progress: impl FnMut(usize, usize),
) -> Result<(BTreeMap<String, Svd>, crate::svf::svd::CacheStats)> {
    let linears: Vec<_> = ck
        .linears()
        .filter(|(_, kind, _)| targets.includes(*kind))
        .collect();
    let shapes: Vec<(String, usize, usize)> = (linears.iter())
        .map(|(n, _, l)| (n.clone(), l.matrix.rows(), l.matrix.cols()))
        .collect();
    let total = shapes.len();
    let options = PartialSvdOptions::for_rank(k);
    let load = |i: usize| linears[i].2.matrix.dequantize();
    let (out, stats) = cache
        .get_or_compute_top(hash, k, &options, &shapes, load, |done, _| {
            progress(done, total)
        })
        .map_err(|e| Error::Input(format!("SVD cache: {e}")))?;
    Ok((out.into_iter().collect(), stats))
}

/// What getting the factors of a model's targets took: how many matrices, how many came from
/// the cache, and the worst reconstruction error.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct FactorsReport {
    /// Target matrices decomposed (0 when the parameterization needs no SVD).
    pub matrices: usize,
    /// Matrices read from the cache.
    pub cache_hits: usize,
    /// Matrices decomposed in this call.
    pub computed: usize,
    /// Wall time, seconds.
    pub seconds: f64,
    /// Largest `‖W − UΣVᵀ‖_F / ‖W‖_F` (for top-k factors: the rank-k truncation's).
    pub max_relative_error: f64,
    /// `Some(k)`: only the top k triplets were computed (a partial SVD).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub top_k: Option<usize>,
}

impl std::fmt::Display for FactorsReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let what = match self.top_k {
            Some(k) => format!("top-{k} SVD"),
            None => "SVD".into(),
        };
        write!(
            f,
            "{what} of {} matrices: {} from the cache, {} computed in {:.1} s; largest ‖W − UΣVᵀ‖/‖W‖ = {:.1e}",
            self.matrices, self.cache_hits, self.computed, self.seconds, self.max_relative_error
        )?;
        if self.top_k.is_some() {
            write!(f, " (what the rank-k truncation leaves out)")?;
        }
        Ok(())
    }
}

impl From<&crate::svf::Factors> for FactorsReport {
    fn from(f: &crate::svf::Factors) -> Self {
        FactorsReport {
            matrices: f.svd.len(),
            cache_hits: f.stats.hits,
            computed: f.stats.computed,
            seconds: f.stats.seconds,
            max_relative_error: f.stats.max_relative_error,
            top_k: f.top_k,
        }
    }
}

/// Largest accepted `‖W − UΣVᵀ‖_F / ‖W‖_F` of a target matrix.
pub const MAX_SVD_ERROR: f64 = 1e-4;

/// The length of z for every target matrix of `ck` under `param` (`rank`: the low-rank width
/// k). Parameterizations on singular directions need the target's factors in `factors`.
pub fn z_lengths(
    ck: &Checkpoint,
    targets: Targets,
    param: Parameterization,
    factors: &BTreeMap<String, Svd>,
    rank: usize,
) -> Result<BTreeMap<String, usize>> {
    ck.linears()
        .filter(|(_, k, _)| targets.includes(*k))
        .map(|(name, _, l)| {
            let (rows, cols) = (l.matrix.rows(), l.matrix.cols());
            let r = if param.uses_svd() {
                factors
                    .get(&name)
                    .ok_or_else(|| Error::Input(format!("no SVD factors for `{name}`")))?
                    .sigma
                    .len()
            } else {
                rows.min(cols)
            };
            Ok((name, param.z_len(rows, r, rank)))
        })
        .collect()
}

/// Thin SVDs of the target matrices computed here and now, without the cache (tests and
/// benchmarks; a command reads them through a [`crate::svf::Base`]).
pub fn decompose(ck: &Checkpoint, targets: Targets) -> BTreeMap<String, Svd> {
    target_matrices(ck, targets)
        .into_iter()
        .map(|(name, w, rows, cols)| (name, thin_svd(&w, rows, cols)))
        .collect()
}
