//! Self-adaptation over a library of experts: discovering which experts to train (stage 1),
//! the mixture-search problem NSGA-II solves (stage 3), the choice of what is handed off on a
//! selection split, and two-pass dispatch per prompt.

pub mod discover;
pub mod dispatch;
pub mod mixture_search;
pub mod selection;
pub mod two_pass;

/// A search's error (its objective's error kept as the source), whole.
impl<E: std::error::Error + Send + Sync + 'static> From<crate::search::SearchError<E>>
    for crate::Error
{
    fn from(e: crate::search::SearchError<E>) -> Self {
        crate::Error::module(e)
    }
}
