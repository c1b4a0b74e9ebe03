//! Stage 4's dealing of the expert jobs to the groups of ranks: by an estimate of each job's
//! work, longest first, each to the least-loaded group.

use crate::engine::tokenizer::Tokenizer;
use crate::error::Result;
use crate::eval::batch::sft_pairs;
use crate::tasks::DataSource;
use rand::rngs::StdRng;
use rand::SeedableRng;

/// Batches drawn to estimate the tokens of one of a job's steps.
const COST_BATCHES: usize = 4;

/// What [`deal`] weighs a job by: its step budget times the tokens of one of its steps
/// (`batch_prompts` prompts + answers; training computes no padding), averaged over a few
/// batches drawn with a fixed seed. Steps differ by the domain's lengths (on the default
/// model, 0.30 s for `compare` against 0.74 s for `program` and 0.70 s for the classifier,
/// whose batches mix every domain), so the step budget alone deals unevenly.
pub(super) fn job_cost(
    tok: &dyn Tokenizer,
    data: &DataSource,
    steps: usize,
    batch_prompts: usize,
) -> Result<u64> {
    let mut rng = StdRng::seed_from_u64(0x6465_616c);
    let mut tokens = 0u64;
    for _ in 0..COST_BATCHES {
        let pairs = sft_pairs(tok, &data.draw(&mut rng, batch_prompts)?)?;
        tokens += pairs
            .iter()
            .map(|(p, a)| (p.len() + a.len()) as u64)
            .sum::<u64>();
    }
    Ok(steps as u64 * tokens.div_ceil(COST_BATCHES as u64))
}

/// The group (of `groups`) each job goes to, by `cost` ([`job_cost`]): longest first (ties in
/// job order), each to the group with the least cost so far (ties: the lowest group), so the
/// longest job is not left for last.
pub(super) fn deal(cost: &[u64], groups: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..cost.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(cost[i]));
    let (mut load, mut to) = (vec![0u64; groups.max(1)], vec![0; cost.len()]);
    for i in order {
        let g = (0..load.len()).min_by_key(|&g| load[g]).unwrap_or(0);
        load[g] += cost[i];
        to[i] = g;
    }
    to
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::tokenizer::ByteTokenizer;
    use crate::tasks::Domain;

    #[test]
    fn the_longest_jobs_are_dealt_first_to_the_least_loaded_group() {
        // Seven experts of 150 and the classifier's 500, over two groups.
        let cost = [150, 150, 150, 150, 150, 150, 150, 500];
        let to = deal(&cost, 2);
        assert_eq!(to[7], 0, "the classifier goes first, to group 0");
        let load = |g: usize| (0..8).filter(|&i| to[i] == g).map(|i| cost[i]).sum::<u64>();
        assert_eq!((load(0), load(1)), (800, 750));
        assert_eq!(deal(&[3, 3, 3], 1), vec![0, 0, 0]);
        assert_eq!(deal(&[1, 1, 1, 1], 4), vec![0, 1, 2, 3]);
    }

    /// A domain of long items costs more per step than one of short items, in proportion to
    /// the steps, and the estimate does not change from call to call.
    #[test]
    fn a_jobs_cost_grows_with_its_items_length_and_its_steps() {
        let tok = ByteTokenizer;
        let cost = |d: Domain, steps| job_cost(&tok, &DataSource::Domain(d), steps, 16).unwrap();
        let (short, long) = (cost(Domain::Compare, 150), cost(Domain::Program, 150));
        assert!(long > short, "program {long} vs compare {short}");
        assert_eq!(cost(Domain::Program, 300), 2 * long);
        assert_eq!(cost(Domain::Program, 150), long);
    }
}
