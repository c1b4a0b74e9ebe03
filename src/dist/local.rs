//! Ranks as threads of one process: the [`Comm`] the tests use to run data-parallel and
//! scattered code on several ranks without MPI. [`ranks`] makes the group; run each rank's
//! code on its own thread (`std::thread::scope`).

use super::Comm;
use crate::error::{Error, Result};
use std::collections::HashMap;
use std::sync::{Arc, Barrier, Mutex};

/// What the ranks of one group share.
struct Shared {
    size: usize,
    barrier: Barrier,
    slots: Mutex<Vec<Vec<u8>>>,
    /// Groups made by [`Comm::split`]: by (split number, color).
    children: Mutex<HashMap<(u64, usize), Arc<Shared>>>,
}

impl Shared {
    fn new(size: usize) -> Arc<Self> {
        Arc::new(Shared {
            size,
            barrier: Barrier::new(size),
            slots: Mutex::new(vec![Vec::new(); size]),
            children: Mutex::new(HashMap::new()),
        })
    }
}

/// One rank of a group of threads.
pub struct LocalComm {
    rank: usize,
    shared: Arc<Shared>,
    splits: std::cell::Cell<u64>,
}

/// `size` ranks sharing one group; hand each to its own thread.
pub fn ranks(size: usize) -> Vec<LocalComm> {
    let shared = Shared::new(size.max(1));
    (0..size.max(1))
        .map(|rank| LocalComm {
            rank,
            shared: shared.clone(),
            splits: std::cell::Cell::new(0),
        })
        .collect()
}

impl Comm for LocalComm {
    fn rank(&self) -> usize {
        self.rank
    }

    fn size(&self) -> usize {
        self.shared.size
    }

    fn all_gather(&self, _: &str, mine: &[u8]) -> Result<Vec<Vec<u8>>> {
        let lock = || {
            (self.shared.slots.lock()).map_err(|_| Error::Input("a rank thread panicked".into()))
        };
        lock()?[self.rank] = mine.to_vec();
        self.shared.barrier.wait();
        let all = lock()?.clone();
        // Nobody writes the next round's slot before everyone has read this one.
        self.shared.barrier.wait();
        Ok(all)
    }

    fn split(&self, color: usize) -> Result<Box<dyn Comm>> {
        let n = self.splits.get();
        self.splits.set(n + 1);
        let colors = self.all_gather("split", &color.to_le_bytes())?;
        let same: Vec<usize> = (0..colors.len())
            .filter(|&r| colors[r] == color.to_le_bytes())
            .collect();
        let rank = same.iter().position(|&r| r == self.rank).unwrap_or(0);
        let shared = {
            let mut children = (self.shared.children.lock())
                .map_err(|_| Error::Input("a rank thread panicked".into()))?;
            (children.entry((n, color)))
                .or_insert_with(|| Shared::new(same.len()))
                .clone()
        };
        Ok(Box::new(LocalComm {
            rank,
            shared,
            splits: std::cell::Cell::new(0),
        }))
    }
}
