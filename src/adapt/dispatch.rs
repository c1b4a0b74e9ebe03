//! Two-pass adaptive inference (DESIGN.md §3): pass 1 picks the expert mixture z' for a prompt,
//! pass 2 answers with it.
//!
//! Strategies:
//! - [`Strategy::Prompt`]: the base model classifies its own prompt. It is asked
//!   `"<prompt> skill?"` and every label (each expert's name, and `other`) is scored by its
//!   mean log-probability as the answer; `other` (or a tie) keeps the base weights.
//! - [`Strategy::Classifier`]: an extra SVF expert, trained like the others (SFT) to answer
//!   `"<prompt> skill?"` with the label, generates the label greedily.
//! - [`Strategy::Cem`]: few-shot — the cross-entropy method searches α over the experts on a
//!   handful of labelled examples (accuracy, ties by mean log-likelihood of the correct
//!   answers; population 32, 6 elites, μ₀ = 1/K, σ₀ = 0.5, α ∈ [0, 1]), and every prompt of
//!   that task runs with the found mixture.
//! - [`Strategy::None`]: the base model, no adaptation.

use crate::engine::checkpoint::Checkpoint;
use crate::engine::model::{Model, ModelOptions, WeightMode};
use crate::engine::tokenizer::Tokenizer;
use crate::error::{Error, Result};
use crate::eval::{answer, teacher_forced};
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

/// Mixtures of a set of experts as one reusable dense SVF model: what CEM and the mixture
/// columns need, without a model per expert.
pub struct Mixer {
    experts: Vec<Expert>,
    factors: Arc<Factors>,
    model: Model,
}

/// Dense f32 weights with BitNet's int8 activations: the form experts are trained in.
const DENSE: ModelOptions = ModelOptions {
    mode: WeightMode::Dense,
    act_quant: true,
    dtype: candle_core::DType::F32,
};

impl Mixer {
    /// Mix `experts` (paper SVF, one target set) on `base`.
    pub fn new(base: &Base, experts: Vec<Expert>) -> Result<Self> {
        let first = experts
            .first()
            .ok_or_else(|| Error::Input("a mixture needs at least one expert".into()))?;
        let factors = base.factors(first.meta.targets)?;
        let model = svf_model(
            base.ck(),
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

    /// The model of the mixture `alpha` (full SVF).
    pub fn model(&mut self, alpha: &[f64]) -> Result<&Model> {
        let refs: Vec<&Expert> = self.experts.iter().collect();
        let mixed = mixture(&refs, alpha, &self.factors.svd)?;
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
            mixer,
        })
    }

    /// Pass 1 by the base model: the label with the highest mean log-probability, `None` for
    /// `other`.
    pub fn pick_by_prompt(&self, tok: &dyn Tokenizer, prompt: &str) -> Result<Option<usize>> {
        let q = classify_prompt(prompt);
        let candidates: Vec<Item> = (self.names.iter().map(String::as_str))
            .chain([OTHER])
            .map(|label| Item {
                prompt: q.clone(),
                answer: label.to_string(),
                domain: "dispatch".into(),
            })
            .collect();
        let scores = teacher_forced(&self.base, tok, &candidates)?;
        let best = (0..scores.len())
            .max_by(|&a, &b| scores[a].log_prob.total_cmp(&scores[b].log_prob))
            .unwrap_or(self.names.len());
        Ok((best < self.names.len()).then_some(best))
    }

    /// Pass 1 by the classifier expert: its greedy label, `None` for [`OTHER_CLASS`] or an
    /// unknown label.
    pub fn pick_by_classifier(&self, tok: &dyn Tokenizer, prompt: &str) -> Result<Option<usize>> {
        let model = self.classifier.as_ref().ok_or_else(|| {
            Error::Input(
                "no classifier expert in this library (train one with `bitsvf run`)".into(),
            )
        })?;
        let label = answer(model, tok, &classify_prompt(prompt))?;
        Ok((0..self.names.len()).position(|i| class_label(i) == label.trim()))
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
