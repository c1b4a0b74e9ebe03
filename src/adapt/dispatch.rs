//! Two-pass adaptive inference (DESIGN.md §3): pass 1 picks the expert mixture z' for a prompt,
//! pass 2 answers with it.
//!
//! Strategies:
//! - [`Strategy::Prompt`]: the base model classifies its own prompt. It is asked
//!   `"<prompt> skill?"` and every label (each expert's name, and `other`) is scored by its
//!   mean log-probability as the answer; `other`, or a best label whose probability is below
//!   a threshold calibrated on held-out prompts, keeps the base weights.
//! - [`Strategy::Classifier`]: an extra SVF expert, trained like the others (SFT) to answer
//!   `"<prompt> skill?"` with the label; its most probable label is taken when its
//!   probability reaches a threshold calibrated on held-out prompts, the base otherwise.
//! - [`Strategy::Cem`]: few-shot — the cross-entropy method searches α over the experts on a
//!   handful of labelled examples (accuracy, ties by mean log-likelihood of the correct
//!   answers; population 32, 6 elites, μ₀ = 1/K, σ₀ = 0.5, α ∈ [0, 1]), and every prompt of
//!   that task runs with the found mixture — unless it fails to beat the base on held-out
//!   shots ([`Mixer::check_cem`]), when the base is kept.
//! - [`Strategy::None`]: the base model, no adaptation.

use crate::adapt::selection::{beats_noise, paired_gain};
use crate::engine::checkpoint::Checkpoint;
use crate::engine::model::{Model, ModelOptions, WeightMode};
use crate::engine::tokenizer::Tokenizer;
use crate::error::{Error, Result};
use crate::eval::{exact_matches, share, teacher_forced};
use crate::search::{cem, CemConfig, CemResult, Score};
use crate::svf::attach::{adapted_model, set_z, svf_model, z_tensors};
use crate::svf::base::{Base, Factors};
use crate::svf::expert::{mixture, Expert};
use crate::svf::svd::SvdCache;
use crate::tasks::DataSource;
use crate::tasks::Item;
use rand::{rngs::StdRng, SeedableRng};
use serde::{Deserialize, Serialize};
use std::sync::Arc;

/// The label the base model may pick (prompt dispatch) for prompts no expert covers.
pub const OTHER: &str = "other";

/// The classifier expert's label for prompts no expert covers.
pub const OTHER_CLASS: &str = "-";

/// The classifier expert's label for expert `i`: one digit (at most 10 experts). A one-token
/// answer the model already emits is what SVF can teach it: on the default model, spelled-out
/// expert names and capital letters (never an answer in its training data) stayed at 0%
/// validation accuracy after 100 steps, digits reached 84% after 200 (README "The main job").
pub fn class_label(i: usize) -> String {
    i.to_string()
}

/// The question pass 1 asks about a prompt.
pub fn classify_prompt(prompt: &str) -> String {
    format!("{prompt} skill?")
}

/// How pass 1 chooses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Strategy {
    /// The base model labels its own prompt.
    Prompt,
    /// A classifier expert labels the prompt.
    Classifier,
    /// CEM over α on a few labelled examples.
    Cem,
    /// No adaptation.
    None,
}

crate::value_names!(
    Strategy,
    "dispatch strategy",
    [
        (Prompt, "prompt", ""),
        (Classifier, "classifier", ""),
        (Cem, "cem", ""),
        (None, "none", ""),
    ]
);

/// The classifier expert's training items: `n` prompts per label, drawn from the training
/// data of each expert (label [`class_label`]) and of `others` (label [`OTHER_CLASS`]).
pub fn classifier_items(
    experts: &[DataSource],
    others: &[DataSource],
    n: usize,
    seed: u64,
) -> Result<Vec<Item>> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut groups: Vec<(String, DataSource)> = (experts.iter().enumerate())
        .map(|(i, d)| (class_label(i), d.clone()))
        .collect();
    if !others.is_empty() {
        groups.push((OTHER_CLASS.to_string(), DataSource::Group(others.to_vec())));
    }
    let mut items = Vec::new();
    for (label, data) in &groups {
        for it in data.draw(&mut rng, n)? {
            items.push(Item {
                prompt: classify_prompt(&it.prompt),
                answer: label.clone(),
                domain: "dispatch".to_string(),
            });
        }
    }
    Ok(items)
}

/// The confidence thresholds of the per-prompt strategies: below them, "base".
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Thresholds {
    /// Of the classifier expert.
    pub classifier: f64,
    /// Of prompt dispatch (above 1: it never routes).
    pub prompt: f64,
}

/// The base model's guess for `prompt`: asked `"<prompt> skill?"`, every label (each expert's
/// name in `names`, and `other`) is scored by the mean log-probability of its tokens as the
/// answer; the guess is the best label (`None` for `other`) with its probability under a
/// softmax of those scores.
pub fn prompt_guess(
    base: &Model,
    names: &[String],
    tok: &dyn Tokenizer,
    prompt: &str,
) -> Result<(Option<usize>, f64)> {
    let q = classify_prompt(prompt);
    let candidates: Vec<Item> = (names.iter().map(String::as_str))
        .chain([OTHER])
        .map(|label| Item {
            prompt: q.clone(),
            answer: label.to_string(),
            domain: "dispatch".into(),
        })
        .collect();
    let scores: Vec<f64> = (teacher_forced(base, tok, &candidates)?.iter())
        .map(|s| s.log_prob)
        .collect();
    Ok(softmax_best(&scores, names.len()))
}

/// The best of `scores` (an index below `n`, or `None` for the last, "other") and its
/// softmax probability.
fn softmax_best(scores: &[f64], n: usize) -> (Option<usize>, f64) {
    let max = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let total: f64 = scores.iter().map(|s| (s - max).exp()).sum();
    let best = (0..scores.len())
        .max_by(|&a, &b| scores[a].total_cmp(&scores[b]))
        .unwrap_or(n);
    (
        (best < n).then_some(best),
        (scores[best] - max).exp() / total,
    )
}

/// The classifier's guess for `prompt` among `n` experts: the label with the highest
/// probability at the answer position, the softmax taken over the labels' first tokens only
/// (each expert's [`class_label`] and [`OTHER_CLASS`]), and that probability. `None` is
/// [`OTHER_CLASS`].
pub fn classifier_guess(
    model: &Model,
    tok: &dyn Tokenizer,
    n: usize,
    prompt: &str,
) -> Result<(Option<usize>, f64)> {
    let ids = crate::eval::prompt_ids(tok, &classify_prompt(prompt))?;
    let t = candle_core::Tensor::new(ids.as_slice(), model.device())?.unsqueeze(0)?;
    label_guess(&model.next_logits(&t, None)?, tok, n)
}

/// [`classifier_guess`] from the classifier's next-token `logits` after
/// `"<prompt> skill?"`.
pub fn label_guess(logits: &[f32], tok: &dyn Tokenizer, n: usize) -> Result<(Option<usize>, f64)> {
    let mut scores = Vec::with_capacity(n + 1);
    for label in (0..n).map(class_label).chain([OTHER_CLASS.to_string()]) {
        let first = *tok.encode(&label)?.first().ok_or_else(|| {
            Error::Input(format!(
                "the classifier label `{label}` encodes to no token"
            ))
        })?;
        let logit = logits.get(first as usize).copied().ok_or_else(|| {
            Error::Input(format!(
                "the classifier label `{label}` is outside the vocabulary"
            ))
        })?;
        scores.push(f64::from(logit));
    }
    Ok(softmax_best(&scores, n))
}

/// The confidence below which the classifier should answer "base", from its guesses on
/// labelled held-out prompts (`(guess, probability, truth)`, `None` = no expert): the
/// threshold in 0, 0.05, …, 1, 1.05 (1.05: never routes) with the highest utility — +1 for the right expert (or the
/// base for a prompt no expert covers), 0 for the base on a prompt an expert covers, −1 for a
/// wrong expert (a wrong expert costs about what the right one gains) — the lowest on ties.
/// Returns the threshold and its mean utility.
pub fn calibrate_threshold(guesses: &[(Option<usize>, f64, Option<usize>)]) -> (f64, f64) {
    let utility = |tau: f64| -> f64 {
        let total: i64 = (guesses.iter())
            .map(|&(g, p, truth)| {
                let routed = g.filter(|_| p >= tau);
                match (routed, truth) {
                    (r, t) if r == t => 1,
                    (None, Some(_)) => 0,
                    _ => -1,
                }
            })
            .sum();
        total as f64 / guesses.len().max(1) as f64
    };
    (0..=21)
        .map(|i| f64::from(i) / 20.0)
        .map(|tau| (tau, utility(tau)))
        .fold((0.0, f64::NEG_INFINITY), |best, (tau, u)| {
            if u > best.1 {
                (tau, u)
            } else {
                best
            }
        })
}

/// Mixtures of a set of experts as one reusable dense SVF model: what CEM and the mixture
/// columns need, without a model per expert.
pub struct Mixer {
    experts: Vec<Expert>,
    factors: Arc<Factors>,
    model: Model,
}

/// Dense f32 weights with BitNet's int8 activations: the form experts are trained in.
pub const DENSE: ModelOptions = ModelOptions {
    mode: WeightMode::Dense,
    act_quant: true,
    dtype: candle_core::DType::F32,
    head: crate::engine::model::HeadFormat::Stored,
    defer_head_copy: false,
};

impl Mixer {
    /// Mix `experts` (paper SVF, one target set) on `base`.
    pub fn new(base: &Base, experts: Vec<Expert>) -> Result<Self> {
        let first = experts
            .first()
            .ok_or_else(|| Error::Input("a mixture needs at least one expert".into()))?;
        let factors = base.factors(first.meta.targets)?;
        Self::with_factors(base.ck(), factors, experts)
    }

    /// Mix `experts` on `ck`, whose SVD factors of the experts' targets are `factors`.
    pub fn with_factors(
        ck: &Checkpoint,
        factors: Arc<Factors>,
        experts: Vec<Expert>,
    ) -> Result<Self> {
        let first = experts
            .first()
            .ok_or_else(|| Error::Input("a mixture needs at least one expert".into()))?;
        let model = svf_model(
            ck,
            DENSE,
            &factors.svd,
            &z_tensors(&first.z, DENSE)?,
            first.meta.parameterization,
        )?;
        Ok(Mixer {
            experts,
            factors,
            model,
        })
    }

    /// The expert that is the mixture `alpha` of these experts (paper form).
    pub fn mix(&self, alpha: &[f64]) -> Result<Expert> {
        let refs: Vec<&Expert> = self.experts.iter().collect();
        mixture(&refs, alpha, &self.factors.svd)
    }

    /// The model of the mixture `alpha` (full SVF).
    pub fn model(&mut self, alpha: &[f64]) -> Result<&Model> {
        let mixed = self.mix(alpha)?;
        set_z(&mut self.model, &z_tensors(&mixed.z, DENSE)?);
        Ok(&self.model)
    }

    /// Few-shot pass 1: CEM over α ∈ [0, 1]^K on `shots`, maximising exact-match accuracy,
    /// ties by mean log-likelihood of the correct answers.
    pub fn fit_cem(
        &mut self,
        tok: &dyn Tokenizer,
        shots: &[Item],
        config: &CemConfig,
    ) -> Result<CemResult> {
        if shots.is_empty() {
            return Err(Error::Input("CEM dispatch needs labelled examples".into()));
        }
        let k = self.experts.len();
        let bounds = vec![(0.0, 1.0); k];
        let mu0 = vec![1.0 / k as f64; k];
        cem(
            &mu0,
            &bounds,
            config,
            |batch| -> Result<Vec<Score>> {
                batch
                    .iter()
                    .map(|alpha| {
                        let s = teacher_forced(self.model(alpha)?, tok, shots)?;
                        let acc = s.iter().filter(|x| x.exact).count() as f64 / s.len() as f64;
                        let ll = s.iter().map(|x| x.log_prob).sum::<f64>() / s.len() as f64;
                        Ok(Score::new(acc, ll))
                    })
                    .collect()
            },
            |_| {},
        )
        .map_err(|e| Error::Input(format!("CEM: {e}")))
    }
}

/// Standard errors by which CEM's mixture must beat the base on held-out shots to be used.
pub const CEM_KEEP_Z: f64 = 1.0;

/// A CEM fit checked on held-out shots: the mixture is used only if it beats the base there.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CemFit {
    /// α fitted on the shots.
    pub alpha: Vec<f64>,
    /// Held-out shots it was checked on.
    pub held_out: usize,
    /// The mixture's exact-match accuracy on them.
    pub accuracy: f64,
    /// The base's.
    pub base_accuracy: f64,
    /// `accuracy − base_accuracy` and its standard error (paired).
    pub gain: f64,
    /// Standard error of `gain`.
    pub se: f64,
    /// Whether the base is kept (the mixture did not beat it by more than [`CEM_KEEP_Z`]
    /// standard errors).
    pub keeps_base: bool,
}

impl Mixer {
    /// Check CEM's `alpha` against `base` on `held_out` shots (none of the fitted ones).
    pub fn check_cem(
        &mut self,
        base: &Model,
        tok: &dyn Tokenizer,
        alpha: Vec<f64>,
        held_out: &[Item],
    ) -> Result<CemFit> {
        let b = exact_matches(base, tok, held_out)?;
        let c = exact_matches(self.model(&alpha)?, tok, held_out)?;
        let (gain, se) = paired_gain(&c, &b);
        Ok(CemFit {
            alpha,
            held_out: held_out.len(),
            accuracy: share(&c),
            base_accuracy: share(&b),
            gain,
            se,
            keeps_base: !beats_noise(gain, se, CEM_KEEP_Z),
        })
    }
}

/// The expert library as pass 2 runs it: the base model, one dense model per expert (as
/// trained, full SVF), the classifier, and a [`Mixer`] over the experts.
pub struct Library {
    /// Expert names, the labels of pass 1.
    pub names: Vec<String>,
    /// The base model (packed ternary).
    pub base: Model,
    /// One model per expert.
    pub models: Vec<Model>,
    /// The classifier expert's model, if trained.
    pub classifier: Option<Model>,
    /// Below these probabilities of their best label the classifier and prompt dispatch
    /// answer "base" ([`calibrate_threshold`]).
    pub thresholds: Thresholds,
    /// Mixtures of the experts (of those given to [`Library::with_mixer`]).
    pub mixer: Mixer,
}

impl Library {
    /// Load the experts (paper SVF, one target set) onto `ck` (a one-off [`Base`]).
    pub fn new(
        ck: &Checkpoint,
        experts: Vec<Expert>,
        classifier: Option<&Expert>,
        cache: &SvdCache,
    ) -> Result<Self> {
        Self::on(&Base::new(ck, cache), experts, classifier)
    }

    /// Load the experts (paper SVF, one target set) onto `base`, with a mixer over them all.
    pub fn on(base: &Base, experts: Vec<Expert>, classifier: Option<&Expert>) -> Result<Self> {
        if experts.is_empty() {
            return Err(Error::Input(
                "two-pass inference needs at least one expert".into(),
            ));
        }
        let mixer = Mixer::new(base, experts.clone())?;
        Self::with_mixer(base, experts, classifier, mixer)
    }

    /// Load the experts onto `base`, with `mixer` (over these experts or some of them) for
    /// CEM dispatch.
    pub fn with_mixer(
        base: &Base,
        experts: Vec<Expert>,
        classifier: Option<&Expert>,
        mixer: Mixer,
    ) -> Result<Self> {
        if experts.is_empty() {
            return Err(Error::Input(
                "two-pass inference needs at least one expert".into(),
            ));
        }
        let models = experts
            .iter()
            .map(|e| adapted_model(base, e, DENSE))
            .collect::<Result<Vec<_>>>()?;
        let classifier = classifier
            .map(|e| adapted_model(base, e, DENSE))
            .transpose()?;
        Ok(Library {
            names: experts.iter().map(|e| e.meta.name.clone()).collect(),
            base: base.packed()?.clone(),
            models,
            classifier,
            thresholds: Thresholds::default(),
            mixer,
        })
    }

    /// Pass 1 by the base model ([`prompt_guess`]): `None` for `other`, or when the label's
    /// probability is below the prompt threshold.
    pub fn pick_by_prompt(&self, tok: &dyn Tokenizer, prompt: &str) -> Result<Option<usize>> {
        let (label, p) = prompt_guess(&self.base, &self.names, tok, prompt)?;
        Ok(label.filter(|_| p >= self.thresholds.prompt))
    }

    /// Pass 1 by the classifier expert: its most probable label ([`classifier_guess`]), `None`
    /// for [`OTHER_CLASS`] or when its probability is below `classifier_threshold`.
    pub fn pick_by_classifier(&self, tok: &dyn Tokenizer, prompt: &str) -> Result<Option<usize>> {
        let model = self.classifier.as_ref().ok_or_else(|| {
            Error::Input(
                "no classifier expert in this library (train one with `bitsvf run`)".into(),
            )
        })?;
        let (label, p) = classifier_guess(model, tok, self.names.len(), prompt)?;
        Ok(label.filter(|_| p >= self.thresholds.classifier))
    }

    /// The model pass 2 runs for a prompt under `strategy` (`cem_alpha` for CEM), and the
    /// expert picked (`None` = base or mixture).
    pub fn route(
        &mut self,
        tok: &dyn Tokenizer,
        strategy: Strategy,
        prompt: &str,
        cem_alpha: Option<&[f64]>,
    ) -> Result<(&Model, Option<usize>)> {
        let pick = match strategy {
            Strategy::None => None,
            Strategy::Prompt => self.pick_by_prompt(tok, prompt)?,
            Strategy::Classifier => self.pick_by_classifier(tok, prompt)?,
            Strategy::Cem => {
                let alpha = cem_alpha.ok_or_else(|| {
                    Error::Input("CEM dispatch needs α from labelled examples".into())
                })?;
                return Ok((self.mixer.model(alpha)?, None));
            }
        };
        Ok((pick.map_or(&self.base, |i| &self.models[i]), pick))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::tokenizer::ByteTokenizer;
    use crate::svf::expert::flat_fixture;
    use crate::tasks::Domain;

    #[test]
    fn strategies_parse_by_name() {
        for s in Strategy::ALL {
            assert_eq!(s.name().parse::<Strategy>().unwrap(), s);
            assert_eq!(
                <Strategy as clap::ValueEnum>::from_str(s.name(), false),
                Ok(s)
            );
            assert_eq!(serde_json::to_value(s).unwrap(), s.name());
        }
        let err = "router".parse::<Strategy>().unwrap_err().to_string();
        assert!(
            err.contains("router") && err.contains("classifier"),
            "{err}"
        );
    }

    #[test]
    fn classifier_items_label_every_group_and_the_rest() {
        let d = DataSource::Domain;
        let labels = vec![
            d(Domain::Count),
            DataSource::Group(vec![d(Domain::Sort), d(Domain::Parity)]),
        ];
        let copy = [d(Domain::Copy)];
        let items = classifier_items(&labels, &copy, 30, 0).unwrap();
        assert_eq!(items.len(), 90);
        for it in &items {
            assert!(it.prompt.ends_with(" skill?"));
            let task = it.prompt.trim_end_matches(" skill?");
            let expected = match task.split_whitespace().next().unwrap() {
                "count" => "0",
                "sort" | "par" => "1",
                "copy" => OTHER_CLASS,
                other => panic!("unexpected prompt {other}"),
            };
            assert_eq!(it.answer, expected, "{}", it.prompt);
        }
        assert_eq!(items, classifier_items(&labels, &copy, 30, 0).unwrap());
    }

    /// The threshold trades right routes against wrong ones: confident right guesses are
    /// kept, unsure wrong ones sent to the base; a router that is never right never routes.
    #[test]
    fn thresholds_are_calibrated_on_labelled_guesses() {
        let mut guesses = vec![(Some(0), 0.9, Some(0)); 6];
        guesses.extend([(Some(1), 0.4, Some(0)); 4]);
        guesses.extend([(Some(1), 0.8, Some(1)); 3]);
        guesses.extend([(Some(2), 0.3, None); 2]);
        let (tau, u) = calibrate_threshold(&guesses);
        // Any τ in (0.4, 0.8] keeps the 9 right routes and drops 4 + 2 wrong ones: 6 of the
        // dropped are worth 0 (4) or +1 (2, no expert covers them); the lowest such τ is 0.45.
        assert_eq!(tau, 0.45);
        assert!((u - (9.0 + 2.0) / 15.0).abs() < 1e-12, "{u}");
        let never = vec![(Some(1), 0.99, Some(0)); 5];
        assert_eq!(calibrate_threshold(&never), (1.0, 0.0));
        assert_eq!(calibrate_threshold(&[(Some(0), 0.1, Some(0))]).0, 0.0);
        // The softmax guess: the best label and its probability; the last label is "other".
        let (g, p) = softmax_best(&[0.0, (2f64).ln(), 0.0], 2);
        assert_eq!(g, Some(1));
        assert!((p - 0.5).abs() < 1e-12);
        assert_eq!(softmax_best(&[0.0, 0.0, 5.0], 2).0, None);
    }

    /// Routing returns the model it says it picked; CEM stays in its box and is reproducible.
    #[test]
    fn routes_and_cem_on_a_tiny_model() {
        let fx = flat_fixture((32, 48, 4), &[("a", 1.0), ("b", 0.5), ("c", 1.0)]);
        let (ck, cache) = (&fx.ck, &fx.cache);
        let (experts, classifier) = (fx.experts[..2].to_vec(), &fx.experts[2]);
        let mut lib = Library::new(ck, experts, Some(classifier), cache).unwrap();
        let tok = ByteTokenizer;
        let prompt = "count a in aab?";
        let pick = lib.pick_by_prompt(&tok, prompt).unwrap();
        assert!(pick.is_none_or(|i| i < 2));
        let (_, routed) = lib.route(&tok, Strategy::Prompt, prompt, None).unwrap();
        assert_eq!(routed, pick);
        let (_, none) = lib.route(&tok, Strategy::None, prompt, None).unwrap();
        assert_eq!(none, None);
        // A random classifier answers garbage, which is no label: the base model.
        let (_, c) = lib.route(&tok, Strategy::Classifier, prompt, None).unwrap();
        assert!(c.is_none_or(|i| i < 2));
        let shots =
            crate::tasks::eval_items(Domain::Count, crate::tasks::Split::Validation, 4, 0).unwrap();
        let cfg = CemConfig {
            population: 6,
            elites: 2,
            iterations: 3,
            ..CemConfig::default()
        };
        let a = lib.mixer.fit_cem(&tok, &shots, &cfg).unwrap();
        let b = lib.mixer.fit_cem(&tok, &shots, &cfg).unwrap();
        assert_eq!(a.best, b.best);
        assert!(a.best.iter().all(|x| (0.0..=1.0).contains(x)));
        assert!(lib.route(&tok, Strategy::Cem, prompt, None).is_err());
        // A mixture that is the base (expert a alone: z' = 1) never beats it on held-out
        // shots, so CEM keeps the base.
        let held =
            crate::tasks::eval_items(Domain::Count, crate::tasks::Split::Validation, 6, 9).unwrap();
        let fit = (lib.mixer)
            .check_cem(&lib.base, &tok, vec![1.0, 0.0], &held)
            .unwrap();
        assert_eq!((fit.held_out, fit.gain), (6, 0.0));
        assert!(fit.keeps_base);
        // The mixture model of α = (1, 0) is expert a: z' = 1, the dense base.
        let mixed = lib.mixer.model(&[1.0, 0.0]).unwrap().probe_logits();
        let alone = lib.models[0].probe_logits();
        let diff = mixed
            .iter()
            .zip(&alone)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f32::max);
        assert!(diff < 1e-4, "{diff}");
    }
}
