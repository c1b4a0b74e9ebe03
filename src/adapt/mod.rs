//! Self-adaptation over a library of experts: discovering which experts to train (stage 1),
//! the mixture-search problem NSGA-II solves (stage 3), and two-pass dispatch per prompt.

pub mod discover;
pub mod dispatch;
pub mod mixture_search;
pub mod two_pass;
