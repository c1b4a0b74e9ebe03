//! The task suite: procedural, seeded domains with exact verifiers, and user JSONL datasets.
//!
//! It feeds two stages of docs/DESIGN.md: pretraining the tiny char-level model on the canonical
//! text of many items, and Stage 1/2 of Transformer², where every domain is scored and SVF
//! experts are trained with the verifier's ±1 reward.
//!
//! # Text format
//!
//! Every prompt is short printable ASCII (at most [`MAX_PROMPT_CHARS`] characters) and ends
//! with `=` (compute something) or `?` (answer a question), so the model knows where its answer
//! starts. Answers are at most [`MAX_ANSWER_CHARS`] characters and never contain a newline.
//! The canonical training text of an item is `prompt + answer + "\n"` ([`Item::text`]): the
//! newline ([`TERMINATOR`]) ends the answer, and at evaluation the caller cuts the model's
//! completion at the first newline ([`answer_from_completion`]) before verifying it.
//!
//! | domain | prompt | answer |
//! |---|---|---|
//! | add | `12+345=` | `357` |
//! | sub | `12-345=` | `-333` |
//! | mul | `12*34=` | `408` |
//! | compare | `123 vs 45?` | `>` |
//! | successor | `next 199=` | `200` |
//! | convert | `3 km in m?` | `3000` |
//! | program | `a=3;b=a+2;b?` | `5` |
//! | reverse | `rev abc=` | `cba` |
//! | copy | `copy abc=` | `abc` |
//! | sort | `sort 3142=` | `1234` |
//! | count | `count a in banana?` | `3` |
//! | brackets | `bal ([)]?` | `no` |
//! | parity | `par 1011?` | `odd` |
//!
//! # Splits
//!
//! Train, validation and test are fixed per domain by a SHA-256 hash of (domain, prompt)
//! ([`Split::of`]), so they are disjoint by construction and identical on every platform and
//! Rust version; [`sample`] draws seeded items and keeps those of the requested split.

mod dataset;
mod domains;
pub mod remote;
mod source;
mod split;
mod verify;

use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use thiserror::Error;

pub use dataset::{Dataset, LineProblem};
pub use domains::{Difficulty, Domain};
pub use remote::{generate_items, GenerateReport, GeneratorConfig, RemoteError};
pub use source::{eval_items, DataSource};
pub use split::{sample, Split};
pub use verify::Verifier;

/// The character that ends every answer in training text and in the model's completions.
pub const TERMINATOR: char = '\n';

/// Longest prompt any built-in domain generates, in characters (the model's context is 128).
pub const MAX_PROMPT_CHARS: usize = 40;

/// Longest answer any built-in domain generates, in characters, terminator excluded.
pub const MAX_ANSWER_CHARS: usize = 12;

/// One problem: a prompt, its reference answer and the domain it belongs to.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Item {
    /// The text the model is conditioned on; ends with `=` or `?` for built-in domains.
    pub prompt: String,
    /// The reference answer, without the [`TERMINATOR`].
    pub answer: String,
    /// The domain name: a built-in [`Domain::name`] or a user dataset's domain.
    pub domain: String,
}

impl Item {
    /// The canonical training text: `prompt + answer + "\n"`.
    pub fn text(&self) -> String {
        let mut text = String::with_capacity(self.prompt.len() + self.answer.len() + 1);
        text.push_str(&self.prompt);
        text.push_str(&self.answer);
        text.push(TERMINATOR);
        text
    }
}

/// The answer part of a model completion (the text generated after the prompt): everything
/// before the first [`TERMINATOR`], or the whole completion when generation stopped without
/// one. Verifiers trim surrounding whitespace themselves.
pub fn answer_from_completion(completion: &str) -> &str {
    match completion.find(TERMINATOR) {
        Some(end) => &completion[..end],
        None => completion,
    }
}

/// Everything that can go wrong when choosing domains, sampling items or loading datasets.
#[derive(Debug, Error)]
pub enum TaskError {
    /// A domain name that is not built in.
    #[error("unknown task domain `{name}`; valid domains are: {valid}")]
    UnknownDomain {
        /// The name that was asked for.
        name: String,
        /// The built-in names, comma-separated.
        valid: String,
    },
    /// A difficulty level outside [`Difficulty::MIN`]..=[`Difficulty::MAX`].
    #[error("difficulty {level} is out of range; use a level from {min} to {max}")]
    BadDifficulty {
        /// The level that was asked for.
        level: u32,
        /// The easiest level.
        min: u32,
        /// The hardest level.
        max: u32,
    },
    /// [`sample`] could not find enough distinct prompts of one split within its draw budget.
    #[error(
        "found only {found} distinct {split} prompts of domain `{domain}` at difficulty \
         {difficulty} after {attempts} draws, but {wanted} were asked for; ask for at most \
         {found} or raise the difficulty (easy levels have few distinct prompts)"
    )]
    Exhausted {
        /// The domain sampled.
        domain: String,
        /// The split requested.
        split: Split,
        /// The difficulty level sampled.
        difficulty: u32,
        /// How many items were asked for.
        wanted: usize,
        /// How many distinct items were found.
        found: usize,
        /// How many items were drawn before giving up.
        attempts: usize,
    },
    /// A dataset file could not be read.
    #[error("cannot read dataset {}: {source}", path.display())]
    Io {
        /// The file at fault.
        path: PathBuf,
        /// The underlying I/O error.
        source: std::io::Error,
    },
    /// A line of a JSONL dataset is malformed.
    #[error("{}:{line}: {problem}", path.display())]
    BadLine {
        /// The file at fault.
        path: PathBuf,
        /// The 1-based line number.
        line: usize,
        /// What is wrong with the line.
        problem: LineProblem,
    },
    /// A dataset file or one of its lines is larger than bitsvf reads.
    #[error(
        "{}{}: larger than {limit} bytes{}; split the dataset or shorten its items",
        path.display(),
        line.map(|l| format!(":{l}")).unwrap_or_default(),
        if line.is_some() { " (one line)" } else { "" }
    )]
    TooLarge {
        /// The file at fault.
        path: PathBuf,
        /// The 1-based line, when one line is too long.
        line: Option<usize>,
        /// The limit in bytes.
        limit: u64,
    },
    /// A line of a JSONL dataset is not UTF-8.
    #[error("{}:{line}: not UTF-8 text", path.display())]
    NotUtf8 {
        /// The file at fault.
        path: PathBuf,
        /// The 1-based line number.
        line: usize,
    },
    /// A dataset file holds no items (only blank lines, or nothing).
    #[error("dataset {} holds no items; expected one JSON object per line", path.display())]
    EmptyDataset {
        /// The file at fault.
        path: PathBuf,
    },
    /// A verifier specification or value that cannot work.
    #[error("bad verifier `{spec}`: {reason}")]
    BadVerifier {
        /// The specification as written (or the verifier's debug form).
        spec: String,
        /// What is wrong and what is expected instead.
        reason: String,
    },
}

crate::module_error!(TaskError);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn training_text_is_prompt_answer_newline() {
        let item = Item {
            prompt: "12+34=".into(),
            answer: "46".into(),
            domain: "add".into(),
        };
        assert_eq!(item.text(), "12+34=46\n");
    }

    #[test]
    fn completion_is_cut_at_the_first_terminator() {
        assert_eq!(answer_from_completion("46\n12+3"), "46");
        assert_eq!(answer_from_completion("46"), "46");
        assert_eq!(answer_from_completion("\n46"), "");
    }

    #[test]
    fn items_round_trip_through_json() {
        let item = Item {
            prompt: "rev abc=".into(),
            answer: "cba".into(),
            domain: "reverse".into(),
        };
        let json = serde_json::to_string(&item).unwrap();
        assert_eq!(
            json,
            r#"{"prompt":"rev abc=","answer":"cba","domain":"reverse"}"#
        );
        assert_eq!(serde_json::from_str::<Item>(&json).unwrap(), item);
    }
}
