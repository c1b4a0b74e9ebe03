//! Work across processes: the ranks of an MPI job (`mpirun`, Slurm's `srun`) or one process
//! alone. A [`Comm`] is a group of ranks that can gather bytes from all of them; everything
//! else here is built on that one collective, so the single-process build and the MPI build
//! run the same code:
//!
//! - [`map`] scatters the items of a loop over the ranks (rank r takes items r, r + n, …) and
//!   gives every rank every result, in item order — the same values a single process would
//!   compute, because each item is computed the same way wherever it runs;
//! - [`all_sum`] adds a vector over the ranks in rank order on every rank, so every rank holds
//!   the bitwise same sum (what keeps data-parallel z identical across a group);
//! - [`broadcast`] hands rank 0's value to all.
//!
//! A rank's error inside [`map`] reaches every rank as the same error. Collectives of the MPI
//! build give up after a timeout (see [`mpi`]), so a rank that stops answering ends the job
//! instead of hanging it.

pub mod local;
#[cfg(feature = "mpi")]
pub mod mpi;

use crate::error::{Error, Result};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// A group of ranks (processes) working on one job.
pub trait Comm {
    /// This process's rank in the group, `0..size()`.
    fn rank(&self) -> usize;
    /// How many ranks the group has.
    fn size(&self) -> usize;
    /// Every rank's `mine`, in rank order, on every rank. `what` names the collective in
    /// errors and timeouts.
    fn all_gather(&self, what: &str, mine: &[u8]) -> Result<Vec<Vec<u8>>>;
    /// The ranks that passed the same `color` as this one, as a group of their own (ranked
    /// in the order of their ranks here). Every rank must call it.
    fn split(&self, color: usize) -> Result<Box<dyn Comm>>;
}

/// One process on its own: every collective is the identity.
pub struct Solo;

impl Comm for Solo {
    fn rank(&self) -> usize {
        0
    }
    fn size(&self) -> usize {
        1
    }
    fn all_gather(&self, _: &str, mine: &[u8]) -> Result<Vec<Vec<u8>>> {
        Ok(vec![mine.to_vec()])
    }
    fn split(&self, _: usize) -> Result<Box<dyn Comm>> {
        Ok(Box::new(Solo))
    }
}

/// The environment variables by which `mpirun`/`mpiexec` (OpenMPI, MPICH) and `srun` tell a
/// process it is one rank of a job.
pub const LAUNCHER_VARS: [&str; 5] = [
    "OMPI_COMM_WORLD_SIZE",
    "PMI_SIZE",
    "PMIX_RANK",
    "PMI_RANK",
    "SLURM_STEP_NUM_TASKS",
];

/// Was this process started as a rank of an MPI job?
pub fn launched_by_mpi() -> bool {
    LAUNCHER_VARS.iter().any(|v| std::env::var_os(v).is_some())
}

/// How many ranks the launcher started, where it says (`mpirun`'s and `srun`'s variables).
pub fn launched_ranks() -> Option<usize> {
    ["OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "SLURM_STEP_NUM_TASKS"]
        .iter()
        .find_map(|v| std::env::var(v).ok()?.trim().parse().ok())
}

/// Is this rank 0 of `comm` (the one that writes files and shows progress)?
pub fn is_root(comm: &dyn Comm) -> bool {
    comm.rank() == 0
}

/// Wait until every rank of `comm` gets here.
pub fn barrier(comm: &dyn Comm, what: &str) -> Result<()> {
    comm.all_gather(what, &[]).map(|_| ())
}

fn encode<T: Serialize>(what: &str, value: &T) -> Result<Vec<u8>> {
    serde_json::to_vec(value).map_err(|e| Error::Input(format!("{what}: cannot encode: {e}")))
}

fn decode<T: DeserializeOwned>(what: &str, rank: usize, bytes: &[u8]) -> Result<T> {
    serde_json::from_slice(bytes).map_err(|e| {
        Error::Input(format!(
            "{what}: rank {rank} sent what this rank cannot read: {e}"
        ))
    })
}

/// A rank's part of a [`map`]: its results, or the error that stopped it.
#[derive(Serialize, Deserialize)]
enum Part<T> {
    Done(Vec<T>),
    Failed(String),
}

/// `f(0..n)` with the items scattered over the ranks of `comm` (rank r computes items
/// r, r + size, …) and every result, in item order, on every rank. On one rank this is a plain
/// loop. The first error of any rank (by item order of the ranks) is every rank's error.
pub fn map<T: Serialize + DeserializeOwned>(
    comm: &dyn Comm,
    what: &str,
    n: usize,
    mut f: impl FnMut(usize) -> Result<T>,
) -> Result<Vec<T>> {
    let (rank, size) = (comm.rank(), comm.size());
    if size == 1 {
        return (0..n).map(f).collect();
    }
    let mine: Part<T> = match (rank..n).step_by(size).map(&mut f).collect() {
        Ok(v) => Part::Done(v),
        Err(e) => Part::Failed(e.to_string()),
    };
    let parts = comm.all_gather(what, &encode(what, &mine)?)?;
    drop(mine);
    let mut by_rank = Vec::with_capacity(size);
    for (r, bytes) in parts.iter().enumerate() {
        match decode::<Part<T>>(what, r, bytes)? {
            Part::Done(v) => by_rank.push(v.into_iter()),
            Part::Failed(e) => return Err(Error::Input(format!("{what}, on rank {r}: {e}"))),
        }
    }
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let r = i % size;
        let next = by_rank[r].next().ok_or_else(|| {
            Error::Input(format!(
                "{what}: rank {r} returned fewer results than items"
            ))
        })?;
        out.push(next);
    }
    Ok(out)
}

/// `value` of rank 0 on every rank (the other ranks pass `None`).
pub fn broadcast<T: Serialize + DeserializeOwned>(
    comm: &dyn Comm,
    what: &str,
    value: Option<T>,
) -> Result<T> {
    if comm.size() == 1 {
        return value.ok_or_else(|| Error::Input(format!("{what}: rank 0 has no value")));
    }
    let mine = match (is_root(comm), &value) {
        (true, Some(v)) => encode(what, v)?,
        (true, None) => return Err(Error::Input(format!("{what}: rank 0 has no value"))),
        (false, _) => Vec::new(),
    };
    let all = comm.all_gather(what, &mine)?;
    match value {
        Some(v) if is_root(comm) => Ok(v),
        _ => decode(what, 0, &all[0]),
    }
}

/// A number [`all_sum`] adds: f32 (gradients) or f64 (statistics).
pub trait Summable: Copy + Default + std::ops::Add<Output = Self> {
    /// Bytes per value.
    const BYTES: usize;
    /// Little-endian bytes.
    fn put(self, out: &mut Vec<u8>);
    /// From `BYTES` little-endian bytes.
    fn get(b: &[u8]) -> Self;
}

impl Summable for f32 {
    const BYTES: usize = 4;
    fn put(self, out: &mut Vec<u8>) {
        out.extend(self.to_le_bytes());
    }
    fn get(b: &[u8]) -> Self {
        f32::from_le_bytes([b[0], b[1], b[2], b[3]])
    }
}

impl Summable for f64 {
    const BYTES: usize = 8;
    fn put(self, out: &mut Vec<u8>) {
        out.extend(self.to_le_bytes());
    }
    fn get(b: &[u8]) -> Self {
        let mut a = [0u8; 8];
        a.copy_from_slice(&b[..8]);
        f64::from_le_bytes(a)
    }
}

/// `xs` summed over the ranks of `comm`, on every rank: each rank adds the same vectors in
/// rank order, so the sums agree bit for bit. Every rank's `xs` must have the same length.
pub fn all_sum<T: Summable>(comm: &dyn Comm, what: &str, xs: &mut [T]) -> Result<()> {
    if comm.size() == 1 {
        return Ok(());
    }
    let mut mine = Vec::with_capacity(xs.len() * T::BYTES);
    for &x in xs.iter() {
        x.put(&mut mine);
    }
    let all = comm.all_gather(what, &mine)?;
    for (r, bytes) in all.iter().enumerate() {
        if bytes.len() != mine.len() {
            return Err(Error::Input(format!(
                "{what}: rank {r} sent {} values, this rank has {}",
                bytes.len() / T::BYTES,
                xs.len()
            )));
        }
    }
    for (i, x) in xs.iter_mut().enumerate() {
        let at = i * T::BYTES;
        *x = (all.iter()).fold(T::default(), |s, b| s + T::get(&b[at..at + T::BYTES]));
    }
    Ok(())
}

/// Groups of `per_group` consecutive ranks (the last takes the remainder): the group this
/// rank belongs to, and how many groups there are.
pub fn groups(comm: &dyn Comm, per_group: usize) -> Result<(usize, usize, Box<dyn Comm>)> {
    let per = per_group.clamp(1, comm.size());
    let count = (comm.size() / per).max(1);
    let group = (comm.rank() / per).min(count - 1);
    Ok((group, count, comm.split(group)?))
}

#[cfg(test)]
mod tests;
