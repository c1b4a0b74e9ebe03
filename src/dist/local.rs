//! Ranks as threads of one process: `bitsvf run --workers N` runs the ranks of the MPI design
//! on N threads of one process (no MPI needed), and the tests run data-parallel and scattered
//! code on several ranks the same way. [`ranks`] makes the group; run each rank's code on its
//! own thread (`std::thread::scope`) and, when a rank's work ends in an error or a panic, call
//! [`LocalComm::abort`] (or hold an [`AbortOnDrop`]) so the others stop instead of waiting for
//! it at their next collective.

use super::Comm;
use crate::error::{Error, Result};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

/// What the ranks of one group share.
struct Shared {
    size: usize,
    round: Mutex<Round>,
    turned: Condvar,
    /// Groups made by [`Comm::split`]: by (split number, color).
    children: Mutex<HashMap<(u64, usize), Arc<Shared>>>,
}

/// The state of the group's current collective.
#[derive(Default)]
struct Round {
    /// What each rank has put in so far.
    slots: Vec<Vec<u8>>,
    /// Ranks that have put theirs in.
    arrived: usize,
    /// Rounds completed.
    generation: u64,
    /// Every rank's bytes of the last completed round.
    published: Arc<Vec<Vec<u8>>>,
    /// Why the group stopped, once a rank has aborted it.
    failed: Option<String>,
}

impl Shared {
    fn new(size: usize) -> Arc<Self> {
        Arc::new(Shared {
            size,
            round: Mutex::new(Round {
                slots: vec![Vec::new(); size],
                ..Round::default()
            }),
            turned: Condvar::new(),
            children: Mutex::new(HashMap::new()),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Round> {
        // A rank that panicked while holding the lock left nothing half-written that matters:
        // the group is being aborted anyway.
        self.round.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Stop this group and every group split from it: collectives waiting or to come fail
    /// with `why`, or with the first reason when the group was already stopped. The groups
    /// split from it get that first reason too, so a rank that stopped only because another
    /// did never shows as the cause.
    fn abort(&self, why: &str) -> bool {
        let (first, why) = {
            let mut round = self.lock();
            let first = round.failed.is_none();
            (
                first,
                round.failed.get_or_insert_with(|| why.to_string()).clone(),
            )
        };
        self.turned.notify_all();
        let children = self.children.lock().unwrap_or_else(|p| p.into_inner());
        for child in children.values() {
            child.abort(&why);
        }
        first
    }
}

/// One rank of a group of threads.
pub struct LocalComm {
    rank: usize,
    shared: Arc<Shared>,
    splits: AtomicU64,
}

/// `size` ranks sharing one group; hand each to its own thread.
pub fn ranks(size: usize) -> Vec<LocalComm> {
    let shared = Shared::new(size.max(1));
    (0..size.max(1))
        .map(|rank| LocalComm {
            rank,
            shared: shared.clone(),
            splits: AtomicU64::new(0),
        })
        .collect()
}

impl LocalComm {
    /// Stop the group: every rank waiting in a collective, or reaching one later, gets an
    /// error that names this rank and `why`. True if this call stopped it (no rank had
    /// before).
    pub fn abort(&self, why: &str) -> bool {
        self.shared
            .abort(&format!("rank {} stopped: {why}", self.rank))
    }

    /// A guard that aborts the group when it is dropped while armed: hold it over a rank's
    /// work, and disarm it when the work succeeds, so an error or a panic stops the others.
    pub fn abort_on_drop(&self) -> AbortOnDrop<'_> {
        AbortOnDrop {
            comm: self,
            armed: true,
        }
    }
}

/// See [`LocalComm::abort_on_drop`].
pub struct AbortOnDrop<'a> {
    comm: &'a LocalComm,
    armed: bool,
}

impl AbortOnDrop<'_> {
    /// The work succeeded: dropping the guard no longer aborts.
    pub fn disarm(mut self) {
        self.armed = false;
    }
}

impl Drop for AbortOnDrop<'_> {
    fn drop(&mut self) {
        if self.armed {
            let why = match std::thread::panicking() {
                true => "it panicked",
                false => "it failed",
            };
            self.comm.abort(why);
        }
    }
}

impl Comm for LocalComm {
    fn rank(&self) -> usize {
        self.rank
    }

    fn size(&self) -> usize {
        self.shared.size
    }

    fn all_gather(&self, what: &str, mine: &[u8]) -> Result<Vec<Vec<u8>>> {
        let stopped = |why: &str| Error::Input(format!("{what}: {why}"));
        let mut round = self.shared.lock();
        if let Some(why) = &round.failed {
            return Err(stopped(why));
        }
        round.slots[self.rank] = mine.to_vec();
        round.arrived += 1;
        if round.arrived == self.shared.size {
            // The last to arrive publishes the round; the slots are free for the next one
            // (no rank can finish the next round before every rank has read this one).
            round.published = Arc::new(std::mem::take(&mut round.slots));
            round.slots = vec![Vec::new(); self.shared.size];
            round.arrived = 0;
            round.generation += 1;
            self.shared.turned.notify_all();
            return Ok(round.published.to_vec());
        }
        let generation = round.generation;
        while round.generation == generation {
            if let Some(why) = &round.failed {
                return Err(stopped(why));
            }
            round = (self.shared.turned.wait(round)).unwrap_or_else(|p| p.into_inner());
        }
        Ok(round.published.to_vec())
    }

    fn split(&self, color: usize) -> Result<Box<dyn Comm>> {
        let n = self.splits.fetch_add(1, Ordering::Relaxed);
        let colors = self.all_gather("split", &color.to_le_bytes())?;
        let same: Vec<usize> = (0..colors.len())
            .filter(|&r| colors[r] == color.to_le_bytes())
            .collect();
        let rank = same.iter().position(|&r| r == self.rank).unwrap_or(0);
        let shared = {
            let mut children = (self.shared.children.lock()).unwrap_or_else(|p| p.into_inner());
            (children.entry((n, color)))
                .or_insert_with(|| Shared::new(same.len()))
                .clone()
        };
        let failed = self.shared.lock().failed.clone();
        if let Some(why) = failed {
            shared.abort(&why);
        }
        Ok(Box::new(LocalComm {
            rank,
            shared,
            splits: AtomicU64::new(0),
        }))
    }
}
