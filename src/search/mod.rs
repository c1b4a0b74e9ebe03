//! Generic black-box optimisers over real-valued boxes: NSGA-II, the cross-entropy method,
//! Pareto utilities and the hypervolume indicator. Nothing here knows bitsvf's types: genomes are
//! `Vec<f64>` and objectives plain numbers; `adapt` uses them to search over expert mixtures α
//! (docs/DESIGN.md §3 few-shot CEM, §4 NSGA-II).
//!
//! Both optimisers are ours, small, seeded with `StdRng::seed_from_u64` (same seed and same
//! objective values → bit-identical results) and evaluate whole *batches* of genomes, because in
//! bitsvf one evaluation runs a language model over a validation set:
//!
//! - [`nsga2`]: multi-objective minimisation (in bitsvf: accuracy error, KL drift, latency,
//!   memory) with the standard NSGA-II of Deb et al. (2002); reports the Pareto front and its
//!   [`hypervolume`] per generation. Pick a deployed point with [`knee_point`] or
//!   [`best_within`].
//! - [`cem`]: single-objective maximisation with the cross-entropy method, lexicographic
//!   [`Score`] (primary, then a tie-breaker), as in Transformer²'s few-shot adaptation.
//!
//! Both report failures of the objective function and malformed results through
//! [`SearchError`], generic over the objective function's own error type.

mod cem;
mod hypervolume;
mod nsga2;
mod pareto;

pub use self::cem::{cem, CemConfig, CemRecord, CemResult, Score};
pub use self::hypervolume::hypervolume;
pub use self::nsga2::{nsga2, GenerationRecord, Individual, Nsga2Config, Nsga2Result};
pub use self::pareto::{
    best_within, crowding_distance, dominates, fast_non_dominated_sort, knee_point, Budget,
};

/// Why a search stopped with an error.
///
/// `E` is the error type of the caller's objective function; it is kept whole as the
/// [`std::error::Error::source`] of [`SearchError::Objective`].
#[derive(Debug, PartialEq, thiserror::Error)]
pub enum SearchError<E> {
    /// The objective function returned an error; the search stops at once.
    #[error("objective evaluation failed in round {round} of the search (round 0 evaluates the initial population)")]
    Objective {
        /// Generation (NSGA-II) or iteration (CEM) whose batch failed.
        round: usize,
        /// The objective function's error.
        #[source]
        source: E,
    },
    /// The objective function returned a different number of results than genomes it was given.
    #[error(
        "objective function returned {got} results for a batch of {expected} genomes in round \
         {round}; it must return exactly one result per genome, in order"
    )]
    BatchSize {
        /// Generation (NSGA-II) or iteration (CEM) of the batch.
        round: usize,
        /// Number of genomes in the batch.
        expected: usize,
        /// Number of results returned.
        got: usize,
    },
    /// An objective vector has a different length than the first one evaluated (or than
    /// `hv_reference`).
    #[error(
        "objective vector of genome {genome} in round {round} has {got} values, expected \
         {expected} (every genome must be scored on the same objectives, matching \
         `hv_reference` when it is set)"
    )]
    ObjectiveCount {
        /// Generation (NSGA-II) of the batch.
        round: usize,
        /// Index of the genome within its batch.
        genome: usize,
        /// Number of objectives expected.
        expected: usize,
        /// Number of objectives returned.
        got: usize,
    },
    /// An objective value is NaN, which has no place in a dominance or score order.
    #[error(
        "objective {objective} of genome {genome} in round {round} is NaN; return a finite \
         value (or +inf for NSGA-II / -inf for CEM to mark an infeasible genome)"
    )]
    NotANumber {
        /// Generation (NSGA-II) or iteration (CEM) of the batch.
        round: usize,
        /// Index of the genome within its batch.
        genome: usize,
        /// Index of the objective (for CEM: 0 = primary, 1 = secondary).
        objective: usize,
    },
    /// A configuration field, bound or starting point is out of range.
    #[error("invalid search configuration `{field}`: {reason}")]
    InvalidConfig {
        /// The field at fault (`population`, `bounds[3]`, `mu0[1]`, ...).
        field: String,
        /// What was found and what is expected.
        reason: String,
    },
}

/// Checks per-variable `(lo, hi)` bounds: at least one variable, finite, `lo <= hi`.
fn validate_bounds<E>(bounds: &[(f64, f64)]) -> Result<(), SearchError<E>> {
    if bounds.is_empty() {
        return Err(SearchError::InvalidConfig {
            field: "bounds".into(),
            reason: "no variables; give one (lo, hi) pair per variable".into(),
        });
    }
    for (i, &(lo, hi)) in bounds.iter().enumerate() {
        if !(lo.is_finite() && hi.is_finite() && lo <= hi) {
            return Err(SearchError::InvalidConfig {
                field: format!("bounds[{i}]"),
                reason: format!("got ({lo}, {hi}); expected finite lo <= hi"),
            });
        }
    }
    Ok(())
}

/// What the optimisers' tests share: an objective function that fails on a given call.
#[cfg(test)]
mod test_support {
    /// The error of a failing objective: the call (1-based) that failed.
    #[derive(Debug, PartialEq, thiserror::Error)]
    #[error("model evaluation failed on call {0}")]
    pub(crate) struct ModelError(pub usize);

    /// An objective function that returns `score(batch)` and never fails.
    pub(crate) fn scoring<T>(
        score: impl Fn(&[Vec<f64>]) -> T,
    ) -> impl FnMut(&[Vec<f64>]) -> Result<T, std::convert::Infallible> {
        move |batch| Ok(score(batch))
    }

    /// An objective function that returns `score(batch)` except on call `fail_on`.
    pub(crate) fn failing_on<T>(
        fail_on: usize,
        score: impl Fn(&[Vec<f64>]) -> T,
    ) -> impl FnMut(&[Vec<f64>]) -> Result<T, ModelError> {
        let mut calls = 0;
        move |batch| {
            calls += 1;
            match calls == fail_on {
                true => Err(ModelError(calls)),
                false => Ok(score(batch)),
            }
        }
    }
}
