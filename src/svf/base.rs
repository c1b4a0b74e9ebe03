//! The base model as one command holds it, built once and borrowed by every stage: the
//! checkpoint, its content hash (computed once), the packed ternary model and the SVD factors
//! of each target set (computed, or read from the cache, once).

use crate::engine::checkpoint::Checkpoint;
use crate::engine::model::{Model, ModelOptions};
use crate::error::Result;
use crate::svf::expert::Expert;
use crate::svf::factors::{factors_hashed, top_factors_hashed};
use crate::svf::svd::{CacheStats, Svd, SvdCache};
use crate::svf::Targets;
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex, OnceLock};

/// The SVD factors of one target set.
#[derive(Debug)]
pub struct Factors {
    /// The target set.
    pub targets: Targets,
    /// `Some(k)`: only the top k singular triplets of each target (a partial SVD);
    /// `None`: the full thin SVD.
    pub top_k: Option<usize>,
    /// U, σ, V by linear name.
    pub svd: BTreeMap<String, Svd>,
    /// What loading them did (cache hits, matrices computed, time, worst reconstruction).
    pub stats: CacheStats,
}

/// A checkpoint with what every stage derives from it, each derived once.
pub struct Base<'a> {
    ck: &'a Checkpoint,
    hash: String,
    cache: &'a SvdCache,
    packed: OnceLock<Model>,
    factors: Mutex<Vec<Arc<Factors>>>,
}

impl<'a> Base<'a> {
    /// `ck`, hashed; its SVD factors come from (and go to) `cache`.
    pub fn new(ck: &'a Checkpoint, cache: &'a SvdCache) -> Self {
        let hash = ck.content_hash();
        Self::with_hash(ck, hash, cache)
    }

    /// `ck` whose content hash the caller has just computed (`hash` must be
    /// `ck.content_hash()`): a handoff verifies it when it opens.
    pub(crate) fn with_hash(ck: &'a Checkpoint, hash: String, cache: &'a SvdCache) -> Self {
        Base {
            ck,
            hash,
            cache,
            packed: OnceLock::new(),
            factors: Mutex::new(Vec::new()),
        }
    }

    /// The checkpoint.
    pub fn ck(&self) -> &'a Checkpoint {
        self.ck
    }

    /// Its content hash ([`Checkpoint::content_hash`]).
    pub fn hash(&self) -> &str {
        &self.hash
    }

    /// The SVD cache.
    pub fn cache(&self) -> &'a SvdCache {
        self.cache
    }

    /// The packed ternary model with BitNet's int8 activations (`ModelOptions::default()`),
    /// built on first use.
    pub fn packed(&self) -> Result<&Model> {
        if let Some(m) = self.packed.get() {
            return Ok(m);
        }
        let m = Model::new(self.ck, ModelOptions::default())?;
        Ok(self.packed.get_or_init(|| m))
    }

    /// The SVD factors of the `targets` matrices, loaded on first use.
    pub fn factors(&self, targets: Targets) -> Result<Arc<Factors>> {
        self.held(targets, None, || {
            factors_hashed(self.ck, &self.hash, targets, self.cache)
        })
    }

    /// The top-`k` singular triplets of the `targets` matrices (a partial SVD, cached per
    /// k), loaded on first use; `progress(done, total)` as each matrix is ready.
    pub fn top_factors(
        &self,
        targets: Targets,
        k: usize,
        progress: impl FnMut(usize, usize),
    ) -> Result<Arc<Factors>> {
        self.held(targets, Some(k), || {
            top_factors_hashed(self.ck, &self.hash, targets, k, self.cache, progress)
        })
    }

    /// The factors of `targets` (`top_k`: only that many triplets) held by this base, or
    /// those `load` gives, then held.
    fn held(
        &self,
        targets: Targets,
        top_k: Option<usize>,
        load: impl FnOnce() -> Result<(BTreeMap<String, Svd>, CacheStats)>,
    ) -> Result<Arc<Factors>> {
        let mut all = self.factors.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(f) = (all.iter()).find(|f| f.targets == targets && f.top_k == top_k) {
            return Ok(f.clone());
        }
        let (svd, stats) = load()?;
        let f = Arc::new(Factors {
            targets,
            top_k,
            svd,
            stats,
        });
        all.push(f.clone());
        Ok(f)
    }

    /// Error unless `expert` (read from `path`) was trained on this model and fits it.
    pub fn check(&self, expert: &Expert, path: &Path) -> Result<()> {
        expert.check_base_hashed(self.ck, &self.hash, path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn factors_and_the_packed_model_are_built_once() {
        let ck = Checkpoint::tiny(16, 24, 3);
        let dir = tempfile::tempdir().unwrap();
        let cache = SvdCache::new(dir.path().to_path_buf());
        let base = Base::new(&ck, &cache);
        assert_eq!(base.hash(), ck.content_hash());
        let a = base.factors(Targets::Mlp).unwrap();
        let b = base.factors(Targets::Mlp).unwrap();
        assert!(Arc::ptr_eq(&a, &b));
        assert_eq!(a.stats.computed, a.svd.len());
        assert!(std::ptr::eq(base.packed().unwrap(), base.packed().unwrap()));
    }
}
