//! The stage runner of `bitsvf run`: each stage's result saved atomically to
//! `<out>.partial/stages/<name>.json` with its wall time and peak memory when it finishes; a
//! rerun of the same command skips finished stages (an interrupted expert resumes in its own).

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

/// The run in progress: its directory and finished stages.
pub(crate) struct Run<'a> {
    /// `<out>.partial`.
    pub work: PathBuf,
    /// The stages finished so far, in order (this run's or a previous one's).
    pub records: Vec<StageRecord>,
    /// Where the caller hears about the run.
    pub events: &'a mut dyn FnMut(Event),
}

impl Run<'_> {
    /// Run stage `name` unless it finished before; either way return its result.
    pub fn stage<T: Serialize + DeserializeOwned>(
        &mut self,
        name: &str,
        f: impl FnOnce(&mut dyn FnMut(Event)) -> Result<T>,
    ) -> Result<T> {
        let path = self.work.join("stages").join(format!("{name}.json"));
        if path.exists() {
            let saved: Saved<T> = read_json(&path)?;
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
        write_json(
            &path,
            &Saved {
                record: record.clone(),
                result: &result,
            },
        )?;
        self.records.push(record);
        Ok(result)
    }
}
