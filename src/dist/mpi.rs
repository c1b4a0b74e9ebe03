//! [`Comm`] over MPI (the `mpi` cargo feature; the system's OpenMPI or another MPI with
//! `mpicc`). [`init`] joins the job when the process was started by `mpirun`/`mpiexec` or
//! Slurm's `srun`; MPI is only ever called from the thread that called it.
//!
//! A watchdog thread ends the process (exit status 3, naming the collective) when a collective
//! has waited longer than `BITSVF_MPI_TIMEOUT` seconds (default [`DEFAULT_TIMEOUT_S`]), so a
//! rank that stops answering ends the job — `mpirun` and `srun` stop the other ranks when one
//! exits non-zero — instead of hanging it. The wait includes the other ranks' work before the
//! collective (the longest expert of a stage, say): set the timeout above it.

use super::Comm;
use crate::error::{Error, Result};
use mpi::collective::CommunicatorCollectives;
use mpi::datatype::PartitionMut;
use mpi::topology::{Color, Communicator, SimpleCommunicator};
use mpi::Count;
use std::rc::Rc;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Seconds a collective may wait before the watchdog ends the process.
pub const DEFAULT_TIMEOUT_S: u64 = 3600;

/// The collective in progress and when it began, for the watchdog.
static WAITING: Mutex<Option<(Instant, String)>> = Mutex::new(None);

/// One rank of an MPI job.
pub struct MpiComm {
    comm: SimpleCommunicator,
    /// MPI is finalized when the last communicator goes.
    _universe: Rc<mpi::environment::Universe>,
}

/// Join the MPI job this process was launched in (`None` when no launcher started it: then
/// the process runs alone, without touching MPI).
pub fn init() -> Result<Option<MpiComm>> {
    if !super::launched_by_mpi() {
        return Ok(None);
    }
    let (universe, _) = mpi::initialize_with_threading(mpi::Threading::Funneled)
        .ok_or_else(|| Error::Input("MPI was initialized twice".into()))?;
    let timeout = match std::env::var("BITSVF_MPI_TIMEOUT") {
        Ok(s) => s
            .trim()
            .parse::<u64>()
            .ok()
            .filter(|&t| t > 0)
            .ok_or_else(|| {
                Error::Input(format!(
                    "BITSVF_MPI_TIMEOUT: `{s}` is not a positive number of seconds"
                ))
            })?,
        Err(_) => DEFAULT_TIMEOUT_S,
    };
    let comm = universe.world();
    let rank = comm.rank();
    std::thread::spawn(move || watchdog(rank, Duration::from_secs(timeout)));
    Ok(Some(MpiComm {
        comm,
        _universe: Rc::new(universe),
    }))
}

fn watchdog(rank: i32, timeout: Duration) {
    loop {
        std::thread::sleep(Duration::from_millis(500).min(timeout));
        let late = match WAITING.lock() {
            Ok(w) => w
                .as_ref()
                .filter(|(t0, _)| t0.elapsed() > timeout)
                .map(|(_, what)| what.clone()),
            Err(_) => None,
        };
        if let Some(what) = late {
            eprintln!(
                "error: rank {rank}: {what}: no answer from the other ranks in {} s \
                 (BITSVF_MPI_TIMEOUT); a rank died or hangs — ending this one",
                timeout.as_secs()
            );
            std::process::exit(3);
        }
    }
}

/// Marks a collective as waiting for the watchdog, until dropped.
struct Waiting;

impl Waiting {
    fn start(what: &str) -> Self {
        if let Ok(mut w) = WAITING.lock() {
            *w = Some((Instant::now(), what.to_string()));
        }
        Waiting
    }
}

impl Drop for Waiting {
    fn drop(&mut self) {
        if let Ok(mut w) = WAITING.lock() {
            *w = None;
        }
    }
}

impl MpiComm {
    /// End every rank of the job (`MPI_Abort`), after saying why on stderr: what a rank that
    /// failed does, since the others may be waiting for it in a collective.
    pub fn abort(&self, why: &str) -> ! {
        eprintln!("error: rank {}: {why}", self.comm.rank());
        self.comm.abort(1)
    }
}

impl Comm for MpiComm {
    fn rank(&self) -> usize {
        self.comm.rank() as usize
    }

    fn size(&self) -> usize {
        self.comm.size() as usize
    }

    fn all_gather(&self, what: &str, mine: &[u8]) -> Result<Vec<Vec<u8>>> {
        let size = self.size();
        // Every part carries one leading byte: the buffer of an empty Rust slice sits at
        // address 1, which OpenMPI reads as MPI_IN_PLACE.
        let mut sent = Vec::with_capacity(mine.len() + 1);
        sent.push(0u8);
        sent.extend_from_slice(mine);
        let len = Count::try_from(sent.len()).map_err(|_| {
            Error::Input(format!("{what}: {} bytes is too many for MPI", mine.len()))
        })?;
        let _w = Waiting::start(what);
        let mut counts: Vec<Count> = vec![0; size];
        self.comm.all_gather_into(&len, &mut counts[..]);
        let mut displs: Vec<Count> = Vec::with_capacity(size);
        let mut total: usize = 0;
        for &c in &counts {
            displs.push(Count::try_from(total).map_err(|_| {
                Error::Input(format!(
                    "{what}: the ranks' parts exceed MPI's 2 GiB per call"
                ))
            })?);
            total += c as usize;
        }
        let mut buf = vec![0u8; total];
        {
            let mut part = PartitionMut::new(&mut buf[..], &counts[..], &displs[..]);
            self.comm.all_gather_varcount_into(&sent[..], &mut part);
        }
        Ok((counts.iter().zip(&displs))
            .map(|(&c, &d)| buf[d as usize + 1..(d + c) as usize].to_vec())
            .collect())
    }

    fn split(&self, color: usize) -> Result<Box<dyn Comm>> {
        let c = i32::try_from(color)
            .map_err(|_| Error::Input(format!("split: color {color} is too large")))?;
        let _w = Waiting::start("split");
        let comm = self
            .comm
            .split_by_color(Color::with_value(c))
            .ok_or_else(|| Error::Input("split: MPI gave this rank no group".into()))?;
        Ok(Box::new(MpiComm {
            comm,
            _universe: self._universe.clone(),
        }))
    }
}
