//! The stage runner of `bitsvf run`: each stage's result saved atomically to
//! `<out>.partial/stages/<name>.json` with its wall time and peak memory when it finishes; a
//! rerun of the same command skips finished stages (an interrupted expert resumes in its own).

use crate::dist::{broadcast, is_root, Comm};
use crate::error::Result;
use crate::eval::bench::{peak_rss_mb, reset_peak_rss};
use crate::io::{read_json, write_json};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use std::path::PathBuf;
use std::time::Instant;

/// What the caller sees as the run goes.
pub enum Event<'a> {
    /// A stage starts (name) or is skipped because it finished before (name, true).
    Stage(&'a str, bool),
    /// Progress within a stage: done of total, and a message.
    Progress(usize, usize, String),
}

/// Wall time and peak memory of one stage.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StageRecord {
    /// Stage name.
    pub name: String,
    /// Wall time, seconds (of the run that finished it).
    pub seconds: f64,
    /// Peak resident memory during the stage, MB (`None` where the OS does not say).
    pub peak_rss_mb: Option<f64>,
}

#[derive(Serialize, Deserialize)]
struct Saved<T> {
    record: StageRecord,
    result: T,
}

/// The run in progress: its directory and finished stages. Under MPI every rank holds one;
/// rank 0 reads and writes the stage files and the others hear from it.
pub(crate) struct Run<'a> {
    /// `<out>.partial`.
    pub work: PathBuf,
    /// The stages finished so far, in order (this run's or a previous one's).
    pub records: Vec<StageRecord>,
    /// Where the caller hears about the run.
    pub events: &'a mut dyn FnMut(Event),
    /// The ranks running the job.
    pub comm: &'a dyn Comm,
}

impl Run<'_> {
    fn path(&self, name: &str) -> PathBuf {
        self.work.join("stages").join(format!("{name}.json"))
    }

    /// Did stage `name` finish before? Rank 0 looks; every rank gets its answer.
    pub fn finished(&self, name: &str) -> Result<bool> {
        let here = is_root(self.comm).then(|| self.path(name).exists());
        broadcast(self.comm, &format!("stage {name}"), here)
    }

    /// The saved result of stage `name`, if it finished before: read by rank 0, sent to all.
    fn saved<T: Serialize + DeserializeOwned>(&self, name: &str) -> Result<Option<Saved<T>>> {
        let here = match is_root(self.comm) {
            true => {
                let path = self.path(name);
                Some(match path.exists() {
                    true => Some(read_json::<Saved<T>>(&path)?),
                    false => None,
                })
            }
            false => None,
        };
        broadcast(self.comm, &format!("stage {name}"), here)
    }

    /// Run stage `name` on every rank unless it finished before; either way return its result.
    /// `f` runs on every rank (and may share its work out over them); rank 0's result is saved.
    pub fn stage<T: Serialize + DeserializeOwned>(
        &mut self,
        name: &str,
        f: impl FnOnce(&mut dyn FnMut(Event)) -> Result<T>,
    ) -> Result<T> {
        if let Some(saved) = self.saved::<T>(name)? {
            (self.events)(Event::Stage(name, true));
            self.records.push(saved.record);
            return Ok(saved.result);
        }
        (self.events)(Event::Stage(name, false));
        reset_peak_rss();
        let t0 = Instant::now();
        let result = f(self.events)?;
        let record = StageRecord {
            name: name.to_string(),
            seconds: t0.elapsed().as_secs_f64(),
            peak_rss_mb: peak_rss_mb(),
        };
        self.finish(record, &result)?;
        Ok(result)
    }

    /// Stage `name` run by rank 0 alone (what writes files or calls out) unless it finished
    /// before; its result is sent to every rank.
    pub fn stage_on_root<T: Serialize + DeserializeOwned>(
        &mut self,
        name: &str,
        f: impl FnOnce(&mut dyn FnMut(Event)) -> Result<T>,
    ) -> Result<T> {
        let comm = self.comm;
        if comm.size() == 1 {
            return self.stage(name, f);
        }
        if let Some(saved) = self.saved::<T>(name)? {
            (self.events)(Event::Stage(name, true));
            self.records.push(saved.record);
            return Ok(saved.result);
        }
        (self.events)(Event::Stage(name, false));
        let mine = match is_root(comm) {
            true => {
                reset_peak_rss();
                let t0 = Instant::now();
                let result = f(self.events)?;
                let record = StageRecord {
                    name: name.to_string(),
                    seconds: t0.elapsed().as_secs_f64(),
                    peak_rss_mb: peak_rss_mb(),
                };
                Some((record, result))
            }
            false => None,
        };
        let (record, result) = broadcast(comm, &format!("stage {name}"), mine)?;
        self.finish(record, &result)?;
        Ok(result)
    }

    /// Save stage `record.name`'s result from the rank that ran it (an expert's stage, written
    /// by the rank that trained it as soon as it is done, so that a rerun skips it).
    pub fn save<T: Serialize>(&self, record: &StageRecord, result: &T) -> Result<()> {
        let saved = Saved {
            record: record.clone(),
            result,
        };
        write_json(&self.path(&record.name), &saved)
    }

    /// Record a finished stage: rank 0 saves `result` with its `record`.
    fn finish<T: Serialize>(&mut self, record: StageRecord, result: &T) -> Result<()> {
        if is_root(self.comm) {
            let saved = Saved {
                record: record.clone(),
                result,
            };
            write_json(&self.path(&record.name), &saved)?;
        }
        self.records.push(record);
        Ok(())
    }
}
