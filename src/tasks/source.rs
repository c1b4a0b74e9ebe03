//! Where items come from: a built-in domain, a user dataset, a discovered group of them, or a
//! pool of generated items — drawn for training and split for validation and test.

use super::{sample, Dataset, Difficulty, Domain, Item, Split, TaskError};
use crate::error::{Error, Result};
use rand::{rngs::StdRng, Rng};

/// Where training items come from.
#[derive(Debug, Clone)]
pub enum DataSource {
    /// A built-in domain (generated, levels 1–5 uniform).
    Domain(Domain),
    /// A user dataset (its train/validation splits).
    Dataset(Dataset),
    /// Several sources sharing one expert (a discovered group): items drawn from a uniformly
    /// chosen member, validation split evenly between members.
    Group(Vec<DataSource>),
    /// Training items from elsewhere (e.g. a generator endpoint) for `of`: drawn uniformly
    /// from `items`; name, verifier and validation items are `of`'s.
    Pool {
        /// The data the items stand for.
        of: Box<DataSource>,
        /// The training items.
        items: Vec<Item>,
    },
}

impl DataSource {
    /// Name used for the expert and its metrics.
    pub fn name(&self) -> String {
        match self {
            DataSource::Domain(d) => d.name().to_string(),
            DataSource::Dataset(d) => d.name.clone(),
            DataSource::Group(ds) => ds.iter().map(|d| d.name()).collect::<Vec<_>>().join("+"),
            DataSource::Pool { of, .. } => of.name(),
        }
    }

    /// Whether `candidate` answers a reference `expected` of this data.
    pub fn verify(&self, expected: &str, candidate: &str) -> bool {
        match self {
            DataSource::Domain(d) => d.verify(expected, candidate),
            DataSource::Dataset(d) => d.verifier.verify(expected, candidate),
            // Any member's verifier: the built-in ones differ only in leniency (exact vs
            // numeric), never in what a correct answer is.
            DataSource::Group(ds) => ds.iter().any(|d| d.verify(expected, candidate)),
            DataSource::Pool { of, .. } => of.verify(expected, candidate),
        }
    }

    /// `n` training items (levels 1–5 uniform for a domain; uniform over a dataset's train split).
    pub fn draw(&self, rng: &mut StdRng, n: usize) -> Result<Vec<Item>> {
        match self {
            DataSource::Domain(d) => {
                let mut out = Vec::with_capacity(n);
                while out.len() < n {
                    let level = Difficulty::new(rng.gen_range(1..=5))?;
                    let item = d.generate(rng, level);
                    if Split::of(d.name(), &item.prompt) == Split::Train {
                        out.push(item);
                    }
                }
                Ok(out)
            }
            DataSource::Dataset(d) => {
                let train = d.split(Split::Train);
                if train.is_empty() {
                    return Err(Error::Input(format!(
                        "dataset `{}` has no training items",
                        d.name
                    )));
                }
                Ok((0..n)
                    .map(|_| train[rng.gen_range(0..train.len())].clone())
                    .collect())
            }
            DataSource::Group(ds) => {
                let mut out = Vec::with_capacity(n);
                for _ in 0..n {
                    let d = &ds[rng.gen_range(0..ds.len())];
                    out.extend(d.draw(rng, 1)?);
                }
                Ok(out)
            }
            DataSource::Pool { of, items } => {
                if items.is_empty() {
                    return Err(Error::Input(format!(
                        "no training items for `{}`",
                        of.name()
                    )));
                }
                Ok((0..n)
                    .map(|_| items[rng.gen_range(0..items.len())].clone())
                    .collect())
            }
        }
    }

    /// `n` validation items (a domain's validation split, spread over levels; a dataset's
    /// validation split in file order).
    pub fn validation(&self, n: usize, seed: u64) -> Result<Vec<Item>> {
        match self {
            DataSource::Domain(d) => eval_items(*d, Split::Validation, n, seed),
            DataSource::Dataset(d) => {
                let items = d.split(Split::Validation);
                if items.is_empty() {
                    return Err(empty_split(d, Split::Validation));
                }
                Ok(items.into_iter().take(n).cloned().collect())
            }
            DataSource::Group(ds) => {
                let mut out = Vec::with_capacity(n);
                for (i, d) in ds.iter().enumerate() {
                    out.extend(d.validation(n / ds.len() + usize::from(i < n % ds.len()), seed)?);
                }
                Ok(out)
            }
            DataSource::Pool { of, .. } => of.validation(n, seed),
        }
    }

    /// Up to `n` validation items whose prompts are none of `exclude`'s, taken in order from
    /// [`DataSource::validation`]`(draw, seed)`: a split disjoint from items already used.
    pub fn validation_except(
        &self,
        draw: usize,
        n: usize,
        seed: u64,
        exclude: &[Item],
    ) -> Result<Vec<Item>> {
        let used: std::collections::HashSet<&str> =
            exclude.iter().map(|it| it.prompt.as_str()).collect();
        Ok((self.validation(draw, seed)?.into_iter())
            .filter(|it| !used.contains(it.prompt.as_str()))
            .take(n)
            .collect())
    }

    /// Error unless every dataset in this source has items in each of its three splits (a
    /// tiny file can leave one empty); built-in domains always do.
    pub fn check_splits(&self) -> Result<()> {
        match self {
            DataSource::Domain(_) => Ok(()),
            DataSource::Dataset(d) => {
                for split in [Split::Train, Split::Validation, Split::Test] {
                    if d.split(split).is_empty() {
                        return Err(empty_split(d, split));
                    }
                }
                Ok(())
            }
            DataSource::Group(ds) => ds.iter().try_for_each(DataSource::check_splits),
            DataSource::Pool { of, .. } => of.check_splits(),
        }
    }

    /// `n` held-out test items (a domain's test split spread over levels; a dataset's test
    /// split in file order; a group's split evenly).
    pub fn test(&self, n: usize, seed: u64) -> Result<Vec<Item>> {
        match self {
            DataSource::Domain(d) => eval_items(*d, Split::Test, n, seed),
            DataSource::Dataset(d) => {
                let items = d.split(Split::Test);
                if items.is_empty() {
                    return Err(empty_split(d, Split::Test));
                }
                Ok(items.into_iter().take(n).cloned().collect())
            }
            DataSource::Group(ds) => {
                let mut out = Vec::with_capacity(n);
                for (i, d) in ds.iter().enumerate() {
                    out.extend(d.test(n / ds.len() + usize::from(i < n % ds.len()), seed)?);
                }
                Ok(out)
            }
            DataSource::Pool { of, .. } => of.test(n, seed),
        }
    }
}

/// The evaluation items of `domain`: `n` items of `split`, spread evenly over difficulty levels
/// 1..=5 and interleaved, seeded. An easy level whose split holds fewer distinct prompts than
/// The error of a dataset with no items in `split`.
fn empty_split(d: &Dataset, split: Split) -> Error {
    Error::Input(format!(
        "dataset `{}` has no items in its {split} split ({} items in all; splits are 80/10/10 by \
         a hash of the prompt): add lines to the file",
        d.name,
        d.items.len()
    ))
}

/// its share gives all it has, and the shortfall moves to the harder levels (larger spaces).
pub fn eval_items(domain: Domain, split: Split, n: usize, seed: u64) -> Result<Vec<Item>> {
    let levels: Vec<Difficulty> = Difficulty::all().collect();
    let mut per_level: Vec<std::vec::IntoIter<Item>> = Vec::new();
    let mut carry = 0;
    for (i, &d) in levels.iter().enumerate() {
        let count = n / levels.len() + usize::from(i < n % levels.len()) + carry;
        // The same seeded stream, cut at what exists (the draw budget shrinks with the
        // request, so a second cut can find a few fewer).
        let mut want = count;
        let items = loop {
            match sample(domain, split, want, seed, d) {
                Ok(items) => break items,
                Err(TaskError::Exhausted { found, .. }) if i + 1 < levels.len() => {
                    want = found;
                }
                Err(e) => return Err(e.into()),
            }
        };
        carry = count - items.len();
        per_level.push(items.into_iter());
    }
    let mut out = Vec::with_capacity(n);
    'outer: loop {
        for it in per_level.iter_mut() {
            if out.len() == n {
                break 'outer;
            }
            if let Some(x) = it.next() {
                out.push(x);
            }
        }
        if per_level.iter().all(|it| it.len() == 0) {
            break;
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    /// A group draws from its members, splits validation and test items evenly between them,
    /// and accepts an answer any member's verifier accepts.
    #[test]
    fn group_data_draws_and_splits_over_its_members() {
        let g = DataSource::Group(vec![
            DataSource::Domain(Domain::Count),
            DataSource::Domain(Domain::Sort),
        ]);
        assert_eq!(g.name(), "count+sort");
        let drawn = g.draw(&mut StdRng::seed_from_u64(1), 200).unwrap();
        let counts = drawn.iter().filter(|it| it.domain == "count").count();
        assert!((60..140).contains(&counts), "{counts} of 200 from count");
        assert!(drawn
            .iter()
            .all(|it| it.domain == "count" || it.domain == "sort"));
        for items in [g.validation(11, 0).unwrap(), g.test(11, 0).unwrap()] {
            assert_eq!(items.len(), 11);
            assert_eq!(items.iter().filter(|it| it.domain == "count").count(), 6);
        }
        let val = g.validation(10, 0).unwrap();
        let test = g.test(10, 0).unwrap();
        assert!(val.iter().all(|v| !test.contains(v)));
        assert!(g.verify("123", "123") && !g.verify("123", "124"));
    }
}
