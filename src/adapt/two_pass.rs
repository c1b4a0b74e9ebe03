//! Two-pass inference on an expert [`Library`] (`bitsvf generate`): pass 1 chooses the expert
//! or mixture for a prompt ([`pass1`]), pass 2 answers with it ([`pass2`]).

use crate::adapt::dispatch::{Library, Mixer, Strategy};
use crate::engine::model::{GenerateOptions, Model};
use crate::engine::tokenizer::Tokenizer;
use crate::error::Result;
use crate::eval::prompt_ids;
use crate::search::CemConfig;
use crate::tasks::answer_from_completion;
use crate::tasks::Item;
use std::fmt;

/// What pass 1 chose.
#[derive(Debug, Clone, PartialEq)]
pub enum Choice {
    /// A mixture of the experts: (α, expert name) per expert.
    Mixture(Vec<(f64, String)>),
    /// One expert, by name.
    Expert(String),
    /// The base model.
    Base,
}

/// Pass 1's decision and the strategy that made it.
#[derive(Debug, Clone, PartialEq)]
pub struct Pass1 {
    /// The strategy.
    pub strategy: Strategy,
    /// What it chose.
    pub choice: Choice,
}

impl fmt::Display for Pass1 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "pass 1 ({}): ", self.strategy.name())?;
        match &self.choice {
            Choice::Mixture(parts) => {
                let parts: Vec<String> =
                    (parts.iter()).map(|(a, n)| format!("{a:.3}·{n}")).collect();
                write!(f, "mixture {}", parts.join(" + "))
            }
            Choice::Expert(name) => write!(f, "expert `{name}`"),
            Choice::Base => f.write_str("base model"),
        }
    }
}

/// Pass 1: the model pass 2 runs for `prompt` under `strategy`, and what was chosen.
/// `cem_alpha` is the mixture fitted on labelled examples ([`crate::adapt::dispatch::Mixer::fit_cem`]),
/// required by [`Strategy::Cem`].
pub fn pass1<'a>(
    lib: &'a mut Library,
    tok: &dyn Tokenizer,
    strategy: Strategy,
    prompt: &str,
    cem_alpha: Option<&[f64]>,
) -> Result<(&'a Model, Pass1)> {
    let names = lib.names.clone();
    let (model, pick) = lib.route(tok, strategy, prompt, cem_alpha)?;
    let choice = match (cem_alpha, pick) {
        (Some(alpha), _) if strategy == Strategy::Cem => {
            Choice::Mixture(alpha.iter().copied().zip(names).collect())
        }
        (_, Some(i)) => Choice::Expert(names[i].clone()),
        (_, None) => Choice::Base,
    };
    Ok((model, Pass1 { strategy, choice }))
}

/// Pass 2: `model`'s answer to `prompt`, at most `max_new_tokens` tokens sampled at
/// `temperature` (0 = greedy) with `seed`, cut at the answer terminator.
pub fn pass2(
    model: &Model,
    tok: &dyn Tokenizer,
    prompt: &str,
    max_new_tokens: usize,
    temperature: f64,
    seed: u64,
) -> Result<String> {
    let ids = prompt_ids(tok, prompt)?;
    let out = model.generate(
        &ids,
        &GenerateOptions {
            max_new_tokens,
            temperature,
            seed,
            stop: tok.stop_ids(),
            ..Default::default()
        },
    )?;
    Ok(answer_from_completion(&tok.decode(&out)).to_string())
}

/// Labelled examples from which [`checked_cem`] holds every third out.
pub const MIN_SHOTS_TO_CHECK: usize = 6;

/// CEM's α on `shots` (`None` when it keeps the base) and a line saying why: with
/// [`MIN_SHOTS_TO_CHECK`] examples or more, every third is held out and the mixture is used
/// only if it beats `base` there.
pub fn checked_cem(
    mixer: &mut Mixer,
    base: &Model,
    tok: &dyn Tokenizer,
    shots: Vec<Item>,
    cem: &CemConfig,
) -> Result<(Option<Vec<f64>>, String)> {
    let check = shots.len() >= MIN_SHOTS_TO_CHECK;
    let (mut fit_on, mut held) = (Vec::new(), Vec::new());
    for (i, it) in shots.into_iter().enumerate() {
        if check && i % 3 == 2 {
            held.push(it);
        } else {
            fit_on.push(it);
        }
    }
    let best = mixer.fit_cem(tok, &fit_on, cem)?.best;
    if held.is_empty() {
        let why = format!(
            "CEM: fewer than {MIN_SHOTS_TO_CHECK} examples, so none is held out to check the \
             mixture against the base"
        );
        return Ok((Some(best), why));
    }
    let fit = mixer.check_cem(base, tok, best, &held)?;
    let verdict = if fit.keeps_base {
        "the base is kept"
    } else {
        "the mixture is used"
    };
    let why = format!(
        "CEM: on {} held-out examples the mixture scores {:.0}% against the base's {:.0}%: \
         {verdict}",
        fit.held_out,
        100.0 * fit.accuracy,
        100.0 * fit.base_accuracy,
    );
    Ok(((!fit.keeps_base).then_some(fit.alpha), why))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pass_one_reads_as_before() {
        let line = |strategy, choice| Pass1 { strategy, choice }.to_string();
        assert_eq!(
            line(
                Strategy::Cem,
                Choice::Mixture(vec![(0.5, "count".into()), (0.25, "sort".into())])
            ),
            "pass 1 (cem): mixture 0.500·count + 0.250·sort"
        );
        assert_eq!(
            line(Strategy::Classifier, Choice::Expert("count".into())),
            "pass 1 (classifier): expert `count`"
        );
        assert_eq!(
            line(Strategy::None, Choice::Base),
            "pass 1 (none): base model"
        );
    }
}
