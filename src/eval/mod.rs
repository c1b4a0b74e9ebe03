//! Greedy accuracy per domain on held-out splits (`bitsvf eval`).

pub mod batch;
pub mod bench;
pub mod recovery;
pub mod speed;

use crate::engine::model::{GenerateOptions, Model};
use crate::engine::tokenizer::Tokenizer;
use crate::error::{Error, Result};
use crate::tasks::{answer_from_completion, Dataset, Domain, Item, Split, MAX_ANSWER_CHARS};
use crate::tasks::{eval_items, DataSource};
use serde::Serialize;
use std::collections::BTreeMap;

/// Accuracy on one domain.
#[derive(Debug, Clone, Serialize)]
pub struct DomainScore {
    /// Share of items whose greedy answer verifies.
    pub accuracy: f64,
    /// Items evaluated.
    pub n: usize,
}

/// The result of an evaluation.
#[derive(Debug, Clone, Serialize)]
pub struct EvalReport {
    /// Model identifier (path or "default").
    pub model: String,
    /// Split evaluated.
    pub split: Split,
    /// Seed of the item draw.
    pub seed: u64,
    /// Per-domain scores, by name.
    pub domains: BTreeMap<String, DomainScore>,
}

impl EvalReport {
    /// Unweighted mean accuracy over domains.
    pub fn mean_accuracy(&self) -> f64 {
        let n = self.domains.len().max(1) as f64;
        self.domains.values().map(|d| d.accuracy).sum::<f64>() / n
    }

    /// A text table.
    pub fn to_text(&self) -> String {
        let mut s = format!("{:<12} {:>9} {:>6}\n", "domain", "accuracy", "n");
        for (name, d) in &self.domains {
            s.push_str(&format!(
                "{name:<12} {:>8.1}% {:>6}\n",
                100.0 * d.accuracy,
                d.n
            ));
        }
        s.push_str(&format!(
            "{:<12} {:>8.1}%\n",
            "mean",
            100.0 * self.mean_accuracy()
        ));
        s
    }
}

/// Encode a prompt as the model sees it: BOS (if any) + prompt.
pub fn prompt_ids(tok: &dyn Tokenizer, prompt: &str) -> Result<Vec<u32>> {
    let mut ids: Vec<u32> = tok.bos().into_iter().collect();
    ids.extend(tok.encode(prompt)?);
    Ok(ids)
}

/// Error unless every item of every dataset in `source` fits the model's context: its prompt
/// plus an answer of [`MAX_ANSWER_CHARS`] + 2 tokens within `max_positions`. Checked before
/// any work, the same way by `train`, `eval` and `run`, so a long prompt is never scored as a
/// silent failure.
pub fn check_fits(max_positions: usize, tok: &dyn Tokenizer, source: &DataSource) -> Result<()> {
    match source {
        DataSource::Domain(_) => Ok(()),
        DataSource::Dataset(d) => check_items(max_positions, tok, &d.name, &d.items),
        DataSource::Group(ds) => (ds.iter()).try_for_each(|d| check_fits(max_positions, tok, d)),
        DataSource::Pool { of, items } => {
            check_fits(max_positions, tok, of)?;
            check_items(max_positions, tok, &of.name(), items)
        }
    }
}

/// [`check_fits`] of the items of the data named `name`.
fn check_items(
    max_positions: usize,
    tok: &dyn Tokenizer,
    name: &str,
    items: &[Item],
) -> Result<()> {
    for (i, item) in items.iter().enumerate() {
        let need = prompt_ids(tok, &item.prompt)?.len() + MAX_ANSWER_CHARS + 2;
        if need > max_positions {
            let start: String = item.prompt.chars().take(40).collect();
            return Err(Error::Input(format!(
                "dataset `{name}`, item {} (prompt \"{start}…\"): its prompt and an answer take \
                 {need} positions, more than the model's context of {max_positions}; shorten or \
                 remove it",
                i + 1
            )));
        }
    }
    Ok(())
}

/// The model's greedy answer to `prompt` (cut at the terminator).
pub fn answer(model: &Model, tok: &dyn Tokenizer, prompt: &str) -> Result<String> {
    let ids = prompt_ids(tok, prompt)?;
    let out = model.generate(
        &ids,
        &GenerateOptions {
            max_new_tokens: MAX_ANSWER_CHARS + 2,
            stop: tok.stop_ids(),
            ..Default::default()
        },
    )?;
    Ok(answer_from_completion(&tok.decode(&out)).to_string())
}

/// KV-cache bytes that one batch of [`score_items`] may hold: the items are decoded together
/// as long as their caches fit (32 items of the default model; one at a time at 2B-4T).
const SCORE_BATCH_CACHE_BYTES: usize = 32 << 20;

/// Items [`score_items`] decodes together: as many as fit [`SCORE_BATCH_CACHE_BYTES`] with
/// caches of 128 positions, at most 32.
pub fn score_batch(model: &Model) -> usize {
    let c = &model.config;
    let per_token = 2 * c.num_hidden_layers * c.kv_heads() * c.head_dim() * 4;
    (SCORE_BATCH_CACHE_BYTES / (128 * per_token).max(1)).clamp(1, 32)
}

/// The model's greedy answers to `items`, decoded together ([`Model::generate_greedy_batch`]):
/// each is what [`answer`] gives the item alone. Callers keep batches to [`score_batch`].
pub fn answers(model: &Model, tok: &dyn Tokenizer, items: &[&Item]) -> Result<Vec<String>> {
    let prompts = (items.iter())
        .map(|it| prompt_ids(tok, &it.prompt))
        .collect::<Result<Vec<_>>>()?;
    let outs = model.generate_greedy_batch(&prompts, MAX_ANSWER_CHARS + 2, &tok.stop_ids())?;
    Ok((outs.iter())
        .map(|out| answer_from_completion(&tok.decode(out)).to_string())
        .collect())
}

/// Share of `items` the model answers correctly (greedy), by `verify(reference, answer)`.
/// The items are decoded in batches ([`Model::generate_greedy_batch`]); each answer is what
/// [`answer`] gives the item alone.
pub fn score_items(
    model: &Model,
    tok: &dyn Tokenizer,
    items: &[&Item],
    verify: impl Fn(&str, &str) -> bool,
    mut progress: impl FnMut(usize),
) -> Result<DomainScore> {
    let mut correct = 0;
    for chunk in items.chunks(score_batch(model)) {
        for (item, answer) in chunk.iter().zip(answers(model, tok, chunk)?) {
            correct += usize::from(verify(&item.answer, &answer));
        }
        progress(chunk.len());
    }
    Ok(DomainScore {
        accuracy: correct as f64 / items.len().max(1) as f64,
        n: items.len(),
    })
}

/// Greedy accuracy on a user dataset's held-out `split` (at most `n` items, in file order),
/// checked by the dataset's verifier.
pub fn evaluate_dataset(
    model: &Model,
    tok: &dyn Tokenizer,
    name: &str,
    data: &Dataset,
    n: usize,
    split: Split,
    progress: impl FnMut(usize),
) -> Result<EvalReport> {
    check_items(
        model.config.max_position_embeddings,
        tok,
        &data.name,
        &data.items,
    )?;
    let items: Vec<&Item> = data.split(split).into_iter().take(n).collect();
    if items.is_empty() {
        return Err(Error::Input(format!(
            "dataset `{}` has no items in the {split} split ({} items in all; splits are \
             80/10/10 by a hash of the prompt)",
            data.name,
            data.items.len()
        )));
    }
    let score = score_items(
        model,
        tok,
        &items,
        |e, c| data.verifier.verify(e, c),
        progress,
    )?;
    Ok(EvalReport {
        model: name.to_string(),
        split,
        seed: 0,
        domains: BTreeMap::from([(data.name.clone(), score)]),
    })
}

/// Which items an evaluation draws.
#[derive(Debug, Clone)]
pub struct EvalSpec {
    /// Domains to score.
    pub domains: Vec<Domain>,
    /// Items per domain.
    pub n: usize,
    /// Seed of the draw.
    pub seed: u64,
    /// Held-out split.
    pub split: Split,
}

/// Greedy accuracy of `model` on `spec.n` held-out items of each domain.
pub fn evaluate(
    model: &Model,
    tok: &dyn Tokenizer,
    name: &str,
    spec: &EvalSpec,
    mut progress: impl FnMut(usize),
) -> Result<EvalReport> {
    let EvalSpec {
        domains,
        n,
        seed,
        split,
    } = spec.clone();
    let mut out = BTreeMap::new();
    for d in domains {
        let items = eval_items(d, split, n, seed)?;
        let refs: Vec<&Item> = items.iter().collect();
        let score = score_items(model, tok, &refs, |e, c| d.verify(e, c), &mut progress)?;
        out.insert(d.name().to_string(), score);
    }
    Ok(EvalReport {
        model: name.to_string(),
        split,
        seed,
        domains: out,
    })
}

/// What one teacher-forced pass says about an item.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ForcedScore {
    /// Greedy decoding reproduces the reference answer exactly: at every answer position the
    /// argmax is the reference token, and at the terminator position it is a stop token.
    pub exact: bool,
    /// Mean log-probability of the reference answer tokens (terminator included).
    pub log_prob: f64,
}

/// Rows per forward pass of [`teacher_forced`].
const FORCED_CHUNK: usize = 64;

/// Score `items` by one batched forward pass per [`FORCED_CHUNK`] items instead of a decode
/// loop per item. Greedy decoding emits the reference answer exactly when every forced
/// argmax matches it, so `exact` is the greedy accuracy for exact-match verifiers (and a lower
/// bound for lenient ones, which accept other spellings too); searches use it because it is
/// an order of magnitude cheaper than [`score_items`].
pub fn teacher_forced(
    model: &Model,
    tok: &dyn Tokenizer,
    items: &[Item],
) -> Result<Vec<ForcedScore>> {
    let stops = tok.stop_ids();
    let mut out = Vec::with_capacity(items.len());
    for chunk in items.chunks(FORCED_CHUNK) {
        let pairs = crate::eval::batch::sft_pairs(tok, chunk)?;
        let batch = crate::eval::batch::batch_from_pairs(&pairs, model.device())?;
        let lp =
            crate::eval::batch::flat_log_probs(model, &batch)?.to_dtype(candle_core::DType::F32)?;
        let v = lp.dim(1)?;
        let lp: Vec<f32> = lp.flatten_all()?.to_vec1()?;
        let t = lp.len() / v / pairs.len();
        for (r, (p, a)) in pairs.iter().enumerate() {
            let (mut exact, mut sum) = (true, 0.0f64);
            for (j, &target) in a.iter().enumerate() {
                let row = &lp[(r * t + p.len() - 1 + j) * v..][..v];
                let best = crate::engine::model::argmax(row) as u32;
                let last = j + 1 == a.len();
                exact &= best == target || (last && stops.contains(&best));
                sum += f64::from(row[target as usize]);
            }
            out.push(ForcedScore {
                exact,
                log_prob: sum / a.len().max(1) as f64,
            });
        }
    }
    Ok(out)
}

/// Item by item, whether greedy decoding answers exactly ([`teacher_forced`]'s `exact`).
pub fn exact_matches(model: &Model, tok: &dyn Tokenizer, items: &[Item]) -> Result<Vec<bool>> {
    Ok(teacher_forced(model, tok, items)?
        .iter()
        .map(|s| s.exact)
        .collect())
}

/// The share of `true` in `hits` (0 when empty): the accuracy of [`exact_matches`].
pub fn share(hits: &[bool]) -> f64 {
    hits.iter().filter(|&&h| h).count() as f64 / hits.len().max(1) as f64
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::model::ModelOptions;
    use crate::engine::tokenizer::ByteTokenizer;

    /// The forced pass agrees with real greedy decoding, item by item, on the default model,
    /// both on true references and on the model's own greedy answers (which must be exact).
    #[test]
    fn teacher_forced_matches_greedy_decoding() {
        let ck = crate::engine::checkpoint::load_or_default(None).unwrap();
        let model = Model::new(&ck, ModelOptions::default()).unwrap();
        let tok = ByteTokenizer;
        let mut items = eval_items(Domain::Count, Split::Validation, 12, 0).unwrap();
        // Items whose reference is the model's own greedy answer must score exact.
        let opts = GenerateOptions {
            max_new_tokens: MAX_ANSWER_CHARS + 2,
            stop: tok.stop_ids(),
            ..Default::default()
        };
        let mut own = 0;
        for it in items.iter_mut().step_by(2) {
            let out = model
                .generate(&prompt_ids(&tok, &it.prompt).unwrap(), &opts)
                .unwrap();
            let (last, body) = out.split_last().unwrap();
            if tok.stop_ids().contains(last) && body.iter().all(|&t| (32..127).contains(&t)) {
                it.answer = tok.decode(body);
                own += 1;
            }
        }
        assert!(own > 0, "the random model never stopped; pick another seed");
        let forced = teacher_forced(&model, &tok, &items).unwrap();
        for (it, f) in items.iter().zip(&forced) {
            let greedy = answer(&model, &tok, &it.prompt).unwrap();
            assert_eq!(f.exact, greedy == it.answer, "{it:?} greedy {greedy:?}");
            assert!(f.log_prob.is_finite() && f.log_prob <= 0.0);
        }
        assert!(forced.iter().any(|f| f.exact));
    }
}
