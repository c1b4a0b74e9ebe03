//! Verification of generated lines: `PROMPT => ANSWER` in printable ASCII, solvable, in the
//! train split and answered correctly; the item keeps the solver's answer.

use crate::tasks::{Domain, Item, Split, MAX_ANSWER_CHARS, MAX_PROMPT_CHARS};

/// Why a returned line was not kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Rejection {
    /// Not `PROMPT => ANSWER` with printable ASCII of the allowed lengths.
    Malformed,
    /// The solver cannot read the prompt, or its answer is longer than a model answer may be.
    Unsolvable,
    /// The prompt belongs to the validation or test split.
    HeldOut,
    /// The endpoint's answer disagrees with the solver's.
    WrongAnswer,
}

impl Rejection {
    /// A short explanation for error messages.
    pub(super) fn reason(self, domain: Domain) -> String {
        match self {
            Rejection::Malformed => format!(
                "not `PROMPT => ANSWER` with a prompt of at most {MAX_PROMPT_CHARS} printable \
                 ASCII characters"
            ),
            Rejection::Unsolvable => format!("not a well-formed `{domain}` prompt"),
            Rejection::HeldOut => "the prompt belongs to the validation or test split".into(),
            Rejection::WrongAnswer => "the answer is wrong".into(),
        }
    }
}

/// Verifies one `PROMPT => ANSWER` line; the item carries the solver's answer.
///
/// The first `=>` separates the two: no built-in prompt contains `=>` (prompts end in `=` or
/// `?`, and `=` inside a `program` prompt is followed by a name or a number).
pub(super) fn verify_line(domain: Domain, line: &str) -> Result<Item, Rejection> {
    let (prompt, answer) = line.split_once("=>").ok_or(Rejection::Malformed)?;
    verify_pair(domain, prompt.trim(), answer.trim())
}

/// Verifies a prompt and a claimed answer (see the module docs); used for endpoint lines and
/// again for cached items, in case the solver or the split changed since they were written.
pub(super) fn verify_pair(domain: Domain, prompt: &str, answer: &str) -> Result<Item, Rejection> {
    let printable = |text: &str| text.bytes().all(|b| (b' '..=b'~').contains(&b));
    if prompt.is_empty()
        || answer.is_empty()
        || prompt.len() > MAX_PROMPT_CHARS
        || !printable(prompt)
        || !printable(answer)
    {
        return Err(Rejection::Malformed);
    }
    let solution = domain.solve(prompt).ok_or(Rejection::Unsolvable)?;
    if solution.len() > MAX_ANSWER_CHARS {
        return Err(Rejection::Unsolvable);
    }
    if Split::of(domain.name(), prompt) != Split::Train {
        return Err(Rejection::HeldOut);
    }
    if !domain.verify(&solution, answer) {
        return Err(Rejection::WrongAnswer);
    }
    Ok(Item {
        prompt: prompt.to_string(),
        answer: solution,
        domain: domain.name().to_string(),
    })
}
