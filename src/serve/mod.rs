//! `bitsvf serve`: an OpenAI-compatible HTTP server that adapts every request.
//!
//! The packed ternary base is held once; every expert of a handoff is a vector of
//! singular-value changes over the base's shared SVD factors ([`adapters`]), so switching
//! expert costs nothing and one decode step serves requests for different experts together
//! ([`batcher`]: continuous batching, each row with its own adapter). Model ids are
//! `bitsvf/base`, `bitsvf/<expert>`, `bitsvf/mixture` (the handoff's mixture, when it has
//! one) and `bitsvf/auto`, which picks per request with the handoff's dispatch ([`Served::route`]).
//! The HTTP side ([`api`]) is axum on tokio.

pub mod adapters;
pub mod api;
pub mod batcher;
pub mod metrics;
mod reply;
#[cfg(test)]
mod tests;

use crate::adapt::dispatch::{label_guess, prompt_guess, Mixer, Strategy, Thresholds};
use crate::adapt::two_pass::checked_cem;
use crate::engine::checkpoint::Checkpoint;
use crate::engine::model::{Model, ModelOptions, Segment};
use crate::engine::tokenizer::Tokenizer;
use crate::error::{Error, Result};
use crate::eval::prompt_ids;
use crate::search::CemConfig;
use crate::svf::base::Base;
use crate::svf::expert::{mixture, Expert};
use crate::tasks::Item;
use adapters::{Adapter, Factors, StepRows};
use std::sync::{Arc, Mutex};

/// The model id of the base model.
pub const BASE_ID: &str = "bitsvf/base";
/// The model id that dispatches per request.
pub const AUTO_ID: &str = "bitsvf/auto";
/// The model id of the handoff's mixture.
pub const MIXTURE_ID: &str = "bitsvf/mixture";

/// What the server serves: the packed base, the tokenizer, and the adapters.
pub struct Served {
    /// The packed ternary base.
    pub model: Arc<Model>,
    /// The tokenizer.
    pub tok: Arc<dyn Tokenizer>,
    /// The shared factors (`None`: the base alone).
    pub factors: Option<Arc<Factors>>,
    /// The experts, in the handoff's order (the dispatch labels).
    pub experts: Vec<Arc<Adapter>>,
    /// The handoff's mixture.
    pub mixture: Option<Arc<Adapter>>,
    /// The classifier expert (for dispatch; not served as a model).
    pub classifier: Option<Arc<Adapter>>,
    /// The dispatch thresholds calibrated by the run.
    pub thresholds: Thresholds,
    /// How `bitsvf/auto` picks when a request does not say.
    pub dispatch: Strategy,
    cem: Option<Cem>,
}

/// Few-shot dispatch: CEM over the experts' mixtures on the request's examples. Its dense
/// mixture model is built by the first request that asks for CEM, not at start-up.
struct Cem {
    mixer: Mutex<Option<Mixer>>,
    config: CemConfig,
    ck: Checkpoint,
    experts: Vec<Expert>,
    svd: Arc<crate::svf::Factors>,
}

/// What a request runs on.
#[derive(Debug, Clone)]
pub enum Pick {
    /// The base model.
    Base,
    /// Per-request dispatch.
    Auto,
    /// An expert or the mixture.
    Adapter(Arc<Adapter>),
}

/// Where dispatch sent a request.
#[derive(Debug, Clone)]
pub struct Routed {
    /// The adapter (`None`: the base).
    pub adapter: Option<Arc<Adapter>>,
    /// The strategy that chose it (`None` when the request named its model).
    pub dispatch: Option<Strategy>,
    /// Why, in a line (CEM's held-out check).
    pub note: Option<String>,
}

impl Routed {
    /// The adapter's name, `base` for the base.
    pub fn name(&self) -> &str {
        self.adapter.as_ref().map_or("base", |a| a.name.as_str())
    }
}

/// The experts and dispatch to serve over a base.
pub struct ExpertSet {
    /// The experts (SVF on one target set), in dispatch-label order.
    pub experts: Vec<Expert>,
    /// A mixture to serve as `bitsvf/mixture`: its experts, α and rank.
    pub mixture: Option<(Vec<Expert>, Vec<f64>, usize)>,
    /// The classifier expert.
    pub classifier: Option<Expert>,
    /// Dispatch thresholds.
    pub thresholds: Thresholds,
    /// CEM's settings for few-shot requests.
    pub cem: CemConfig,
}

impl Served {
    /// The base model alone: `bitsvf/base` (and `bitsvf/auto`, which answers with the base).
    pub fn base(ck: &Checkpoint, tok: Arc<dyn Tokenizer>) -> Result<Self> {
        Ok(Served {
            model: Arc::new(Model::new(ck, ModelOptions::default())?),
            tok,
            factors: None,
            experts: Vec::new(),
            mixture: None,
            classifier: None,
            thresholds: Thresholds::default(),
            dispatch: Strategy::None,
            cem: None,
        })
    }

    /// `set`'s experts over `base`, each served on at most `rank` singular directions per
    /// target (`None`: all, exactly as trained).
    pub fn with_experts(
        base: &Base,
        tok: Arc<dyn Tokenizer>,
        set: ExpertSet,
        rank: Option<usize>,
    ) -> Result<Self> {
        let first = set
            .experts
            .first()
            .ok_or_else(|| Error::Input("serving experts needs at least one".into()))?;
        let svd = base.factors(first.meta.targets)?;
        let layers = base.ck().layers.len();
        let factors = Factors::new(&svd.svd, first.meta.targets, layers, rank)?;
        let adapter = |e: &Expert, r| factors.adapter(e, &svd.svd, r).map(Arc::new);
        let experts = (set.experts.iter())
            .map(|e| adapter(e, None))
            .collect::<Result<Vec<_>>>()?;
        let mixture = match &set.mixture {
            Some((es, alpha, r)) => {
                let refs: Vec<&Expert> = es.iter().collect();
                let mut m = mixture(&refs, alpha, &svd.svd)?;
                m.meta.name = "mixture".into();
                Some(adapter(&m, Some(*r))?)
            }
            None => None,
        };
        let classifier = set
            .classifier
            .as_ref()
            .map(|e| adapter(e, None))
            .transpose()?;
        let dispatch = if classifier.is_some() {
            Strategy::Classifier
        } else {
            Strategy::Prompt
        };
        let cem = Cem {
            mixer: Mutex::new(None),
            config: set.cem,
            ck: base.ck().clone(),
            experts: set.experts,
            svd,
        };
        Ok(Served {
            model: Arc::new(base.packed()?.clone()),
            tok,
            factors: Some(Arc::new(factors)),
            experts,
            mixture,
            classifier,
            thresholds: set.thresholds,
            dispatch,
            cem: Some(cem),
        })
    }

    /// Every model id served, base first.
    pub fn model_ids(&self) -> Vec<String> {
        let mut ids = vec![BASE_ID.to_string(), AUTO_ID.to_string()];
        ids.extend(self.experts.iter().map(|a| format!("bitsvf/{}", a.name)));
        if self.mixture.is_some() {
            ids.push(MIXTURE_ID.to_string());
        }
        ids
    }

    /// The model a request names; `None` for an unknown id.
    pub fn pick(&self, id: &str) -> Option<Pick> {
        match id {
            BASE_ID => Some(Pick::Base),
            AUTO_ID => Some(Pick::Auto),
            MIXTURE_ID => self.mixture.clone().map(Pick::Adapter),
            _ => {
                let name = id.strip_prefix("bitsvf/")?;
                (self.experts.iter())
                    .find(|a| a.name == name)
                    .map(|a| Pick::Adapter(a.clone()))
            }
        }
    }

    /// Pass 1 for `prompt` under `strategy` (`shots`: CEM's labelled examples). Blocking: it
    /// runs the model.
    pub fn route(&self, strategy: Strategy, prompt: &str, shots: Vec<Item>) -> Result<Routed> {
        let routed = |adapter: Option<Arc<Adapter>>, note| Routed {
            adapter,
            dispatch: Some(strategy),
            note,
        };
        if self.experts.is_empty() {
            return Ok(routed(None, Some("no experts are served".into())));
        }
        let expert = |i: Option<usize>| i.map(|i| self.experts[i].clone());
        match strategy {
            Strategy::None => Ok(routed(None, None)),
            Strategy::Prompt => {
                let names: Vec<String> = self.experts.iter().map(|a| a.name.clone()).collect();
                let (label, p) = prompt_guess(&self.model, &names, self.tok.as_ref(), prompt)?;
                let pick = label.filter(|_| p >= self.thresholds.prompt);
                Ok(routed(expert(pick), None))
            }
            Strategy::Classifier => {
                let classifier = self.classifier.as_deref().ok_or_else(|| {
                    Error::Input("the served handoff has no classifier expert".into())
                })?;
                let ids = prompt_ids(
                    self.tok.as_ref(),
                    &crate::adapt::dispatch::classify_prompt(prompt),
                )?;
                let mut cache = self.model.new_cache();
                let rows = StepRows::new(
                    self.factors.as_deref().expect("experts come with factors"),
                    vec![Some(classifier); ids.len()],
                );
                let logits = self.model.step_ragged(
                    &mut [Segment {
                        ids: &ids,
                        cache: &mut cache,
                    }],
                    Some(&rows),
                )?;
                let (label, p) = label_guess(&logits[0], self.tok.as_ref(), self.experts.len())?;
                let pick = label.filter(|_| p >= self.thresholds.classifier);
                Ok(routed(expert(pick), None))
            }
            Strategy::Cem => {
                let cem = self.cem.as_ref().expect("experts come with CEM");
                if shots.is_empty() {
                    return Err(Error::Input(
                        "dispatch `cem` needs labelled examples in `bitsvf.shots`".into(),
                    ));
                }
                let mut built = cem.mixer.lock().unwrap_or_else(|e| e.into_inner());
                let mixer = match &mut *built {
                    Some(m) => m,
                    slot @ None => slot.insert(Mixer::with_factors(
                        &cem.ck,
                        cem.svd.clone(),
                        cem.experts.clone(),
                    )?),
                };
                let (alpha, why) =
                    checked_cem(mixer, &self.model, self.tok.as_ref(), shots, &cem.config)?;
                let Some(alpha) = alpha else {
                    return Ok(routed(None, Some(why)));
                };
                let mixed = mixer.mix(&alpha)?;
                let factors = self.factors.as_deref().expect("experts come with factors");
                let adapter = factors.adapter(&mixed, &cem.svd.svd, None)?;
                Ok(routed(Some(Arc::new(adapter)), Some(why)))
            }
        }
    }
}
