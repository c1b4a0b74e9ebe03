//! Continuous batching: one thread owns the decode loop. Requests wait in a bounded queue;
//! between steps, new ones are admitted up to the batch limit; every step runs the prompts of
//! the newly admitted and the last token of the others as one ragged batch over the packed
//! base ([`Model::step_ragged`]), each row with its own adapter. Tokens go back to each request
//! as they are produced; a request whose client has gone is dropped at the next step.

use crate::engine::model::{sample, Cache, Model, Segment};
use crate::engine::tokenizer::Tokenizer;
use crate::serve::adapters::{Adapter, Factors, StepRows};
use crate::serve::metrics::Metrics;
use rand::{rngs::StdRng, SeedableRng};
use std::sync::mpsc::{Receiver, TryRecvError};
use std::sync::Arc;
use std::time::Instant;
use tokio::sync::mpsc::UnboundedSender;

/// Why a completion ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finish {
    /// A stop token or stop string.
    Stop,
    /// `max_tokens`, or the end of the model's context.
    Length,
}

impl Finish {
    /// The OpenAI `finish_reason`.
    pub fn reason(self) -> &'static str {
        match self {
            Finish::Stop => "stop",
            Finish::Length => "length",
        }
    }
}

/// What the batcher sends back to a request.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// New text (whole characters only; a stop string is never sent).
    Text(String),
    /// The completion ended.
    Done {
        /// Why.
        finish: Finish,
        /// Tokens of the prompt.
        prompt_tokens: usize,
        /// Tokens generated.
        completion_tokens: usize,
    },
    /// The request ran past its deadline; nothing more follows.
    TimedOut,
    /// The model failed; nothing more follows.
    Failed(String),
}

/// One request as the batcher runs it.
pub struct Job {
    /// Prompt ids (with the tokenizer's BOS).
    pub prompt: Vec<u32>,
    /// The adapter (`None`: the base).
    pub adapter: Option<Arc<Adapter>>,
    /// Most new tokens.
    pub max_tokens: usize,
    /// Sampling temperature (0: greedy).
    pub temperature: f64,
    /// Nucleus sampling mass.
    pub top_p: f64,
    /// Sampling seed.
    pub seed: u64,
    /// Stop strings.
    pub stop: Vec<String>,
    /// Keep going past the tokenizer's stop tokens (vLLM's `ignore_eos`: fixed-length
    /// completions for benchmarks).
    pub ignore_eos: bool,
    /// When it fails with a timeout (`None`: never).
    pub deadline: Option<Instant>,
    /// Where its events go; closed when the client has gone.
    pub events: UnboundedSender<Event>,
}

/// A job being decoded.
struct Active {
    job: Job,
    cache: Cache,
    rng: StdRng,
    /// Ids to run next: the prompt, then the last sampled token.
    next: Vec<u32>,
    generated: Vec<u32>,
    /// Tokens sampled (the generated ones and a final stop token).
    sampled: usize,
    /// Bytes of the decoded text already sent.
    sent: usize,
}

/// What the decode loop needs.
pub struct Batcher {
    /// The packed base.
    pub model: Arc<Model>,
    /// The shared factors the adapters run over (`None`: base only).
    pub factors: Option<Arc<Factors>>,
    /// The tokenizer.
    pub tok: Arc<dyn Tokenizer>,
    /// Most sequences decoded together.
    pub max_batch: usize,
    /// Most rows (prompt tokens of newly admitted requests plus one per running request) a
    /// step takes in, beyond its first request: long prompts wait for a later step rather
    /// than make one step long for everyone.
    pub max_step_tokens: usize,
    /// Counters.
    pub metrics: Arc<Metrics>,
}

impl Batcher {
    /// Run until `jobs` is closed and every admitted job has finished.
    pub fn run(self, jobs: Receiver<Job>) {
        let mut active: Vec<Active> = Vec::new();
        // A job taken from the queue that did not fit the step's token budget.
        let mut waiting: Option<Job> = None;
        // The end of sequence and the chat end-of-turn tokens (`<|eot_id|>`, `<|im_end|>`, …),
        // as llama.cpp's server and vLLM stop at.
        let mut stop_ids = self.tok.stop_ids();
        stop_ids.extend(self.tok.end_of_turn_ids());
        stop_ids.sort_unstable();
        stop_ids.dedup();
        loop {
            // Admit: wait for work when idle, else take what is queued without waiting, while
            // the step's rows stay within the budget (one job is always admitted).
            let mut rows: usize = active.iter().map(|a| a.next.len()).sum();
            while active.len() < self.max_batch.max(1) {
                let job = match waiting.take() {
                    Some(j) => j,
                    None if active.is_empty() => match jobs.recv() {
                        Ok(j) => j,
                        Err(_) => return,
                    },
                    None => match jobs.try_recv() {
                        Ok(j) => j,
                        Err(TryRecvError::Empty | TryRecvError::Disconnected) => break,
                    },
                };
                if job.events.is_closed() {
                    self.metrics.dequeued();
                    continue;
                }
                if !active.is_empty() && rows + job.prompt.len() > self.max_step_tokens {
                    waiting = Some(job);
                    break;
                }
                self.metrics.dequeued();
                rows += job.prompt.len();
                active.push(Active {
                    cache: self.model.new_cache(),
                    rng: StdRng::seed_from_u64(job.seed),
                    next: job.prompt.clone(),
                    generated: Vec::new(),
                    sampled: 0,
                    sent: 0,
                    job,
                });
            }
            let now = Instant::now();
            active.retain(|a| {
                if a.job.events.is_closed() {
                    self.metrics.cancelled();
                    return false;
                }
                if a.job.deadline.is_some_and(|d| now >= d) {
                    let _ = a.job.events.send(Event::TimedOut);
                    self.metrics.timed_out();
                    return false;
                }
                true
            });
            if active.is_empty() {
                continue;
            }
            self.metrics.set_batch(active.len());
            match self.step(&mut active) {
                Ok(logits) => {
                    let mut done = vec![false; active.len()];
                    for ((a, logits), done) in active.iter_mut().zip(logits).zip(&mut done) {
                        *done = self.advance(a, &logits, &stop_ids);
                    }
                    let mut i = 0;
                    active.retain(|_| {
                        i += 1;
                        !done[i - 1]
                    });
                }
                Err(msg) => {
                    for a in active.drain(..) {
                        let _ = a.job.events.send(Event::Failed(msg.clone()));
                    }
                }
            }
            self.metrics.set_batch(active.len());
        }
    }

    /// One ragged step over every active job; a model error (or a panic) fails the step.
    fn step(&self, active: &mut [Active]) -> std::result::Result<Vec<Vec<f32>>, String> {
        let start = Instant::now();
        let adapters: Vec<(Option<Arc<Adapter>>, usize)> = (active.iter())
            .map(|a| (a.job.adapter.clone(), a.next.len()))
            .collect();
        let rows: Vec<Option<&Adapter>> = (adapters.iter())
            .flat_map(|(a, n)| std::iter::repeat_n(a.as_deref(), *n))
            .collect();
        let tokens = rows.len();
        let deltas = self.factors.as_deref().map(|f| StepRows::new(f, rows));
        let mut segments: Vec<Segment> = (active.iter_mut())
            .map(|a| Segment {
                ids: &a.next,
                cache: &mut a.cache,
            })
            .collect();
        let run = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let deltas = deltas
                .as_ref()
                .map(|d| d as &dyn crate::engine::model::RowDeltas);
            self.model.step_ragged(&mut segments, deltas)
        }));
        self.metrics.step(tokens, start.elapsed());
        match run {
            Ok(Ok(logits)) => Ok(logits),
            Ok(Err(e)) => Err(format!("the model failed: {e}")),
            Err(_) => Err("the model failed (internal error); the server keeps serving".into()),
        }
    }

    /// Sample `a`'s next token from `logits` and send what it completes; true when `a` is done.
    fn advance(&self, a: &mut Active, logits: &[f32], stop_ids: &[u32]) -> bool {
        let job = &a.job;
        let id = sample(logits, job.temperature, job.top_p, &mut a.rng);
        a.sampled += 1;
        self.metrics.token();
        let room = self.model.config.max_position_embeddings;
        let finish = if !job.ignore_eos && stop_ids.contains(&id) {
            Some(Finish::Stop)
        } else {
            a.generated.push(id);
            let full =
                a.generated.len() >= job.max_tokens || job.prompt.len() + a.generated.len() >= room;
            full.then_some(Finish::Length)
        };
        let text = self.tok.decode(&a.generated);
        // A stop string ends the text where it starts; until the end, hold back what could be
        // the start of one, and a character still incomplete.
        let (end, finish) = match stop_at(&text, &job.stop) {
            Some(at) => (at, Some(Finish::Stop)),
            None if finish.is_some() => (text.len(), finish),
            None => (safe_end(&text, &job.stop), None),
        };
        if end > a.sent {
            if let Some(new) = text.get(a.sent..end) {
                if job.events.send(Event::Text(new.to_string())).is_err() {
                    self.metrics.cancelled();
                    return true;
                }
                a.sent = end;
            }
        }
        a.next = vec![id];
        match finish {
            Some(finish) => {
                let _ = job.events.send(Event::Done {
                    finish,
                    prompt_tokens: job.prompt.len(),
                    completion_tokens: a.sampled,
                });
                true
            }
            None => false,
        }
    }
}

/// Where the first stop string starts in `text`.
fn stop_at(text: &str, stop: &[String]) -> Option<usize> {
    (stop.iter())
        .filter(|s| !s.is_empty())
        .filter_map(|s| text.find(s.as_str()))
        .min()
}

/// How much of `text` can be sent before the completion ends: not a trailing incomplete
/// character (U+FFFD from a split multi-byte token), nor a suffix that may begin a stop string.
fn safe_end(text: &str, stop: &[String]) -> usize {
    let mut end = text.len();
    if text.ends_with('\u{FFFD}') {
        end -= '\u{FFFD}'.len_utf8();
    }
    for s in stop {
        for (i, _) in text[..end].char_indices() {
            if s.starts_with(&text[i..end]) {
                end = i;
                break;
            }
        }
    }
    end
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stop_strings_end_the_text_and_are_held_back_until_sure() {
        let stop = vec!["END".to_string(), "\n\n".to_string()];
        assert_eq!(stop_at("abc END x", &stop), Some(4));
        assert_eq!(stop_at("a\n\nb END", &stop), Some(1));
        assert_eq!(stop_at("abc", &stop), None);
        assert_eq!(safe_end("abc EN", &stop), 4);
        assert_eq!(safe_end("abc\n", &stop), 3);
        assert_eq!(safe_end("abc", &stop), 3);
        assert_eq!(safe_end("ab\u{FFFD}", &[]), 2);
    }
}
