//! `bitsvf inspect`: a model's report, or a handoff directory's summary.

use anyhow::Result;
use bitsvf::engine::inspect;
use bitsvf::engine::model::HeadFormat;
use bitsvf::eval::recovery;
use bitsvf::pipeline::Handoff;
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct Args {
    /// Model file or directory (any supported format), or a handoff directory; default: the
    /// embedded model.
    model: Option<PathBuf>,
    /// Ternarize a float model's linears on load (BitNet b1.58's per-tensor absmean rule);
    /// without it a float model runs as float.
    #[arg(long)]
    ternarize: bool,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
    /// Also measure the output head held in this format against the stored one (argmax
    /// agreement and KL over a random probe set), as `generate --head` would use it.
    #[arg(long, value_enum)]
    head: Option<HeadFormat>,
    #[command(flatten)]
    probe: crate::common::ProbeArgs,
}

pub fn run(a: Args) -> Result<()> {
    if let Some(dir) = a
        .model
        .as_deref()
        .filter(|m| m.join("manifest.json").is_file())
    {
        let h = Handoff::open(dir)?;
        if a.json {
            println!("{}", serde_json::to_string_pretty(&h.manifest)?);
        } else {
            print!("{}", h.summary()?);
        }
        return Ok(());
    }
    let ck = crate::common::load_model(a.model.as_deref(), a.ternarize)?;
    let report = inspect::inspect(&ck);
    let head = a
        .head
        .map(|f| {
            recovery::head_recovery(
                &ck,
                f,
                a.probe.probe_rows as usize,
                a.probe.probe_len,
                a.probe.seed,
            )
        })
        .transpose()?;
    if a.json {
        let mut v = serde_json::to_value(&report)?;
        if let Some(h) = &head {
            v["head"] = serde_json::to_value(h)?;
        }
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        print!("{}", report.to_text());
        if let Some(h) = &head {
            print!("{}", h.to_text());
        }
    }
    Ok(())
}
