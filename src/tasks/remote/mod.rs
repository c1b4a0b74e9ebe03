//! An OpenAI-compatible chat endpoint as a source of training items for a built-in domain.
//!
//! Stage 1 of docs/DESIGN.md §1 accepts problems from elsewhere as long as "generated problems are
//! checked by the verifier before use". [`generate_items`] asks a chat model
//! (`POST {url}/chat/completions`) for new problems written like a few examples, one per line
//! as `PROMPT => ANSWER`, and keeps a line only when
//!
//! - the domain's solver can read the prompt ([`Domain::solve`]),
//! - the prompt belongs to the train split ([`Split::of`](crate::tasks::Split::of)), so
//!   nothing the endpoint writes can leak into validation or test, and
//! - the endpoint's answer agrees with the solver's ([`Domain::verify`]).
//!
//! The stored answer is always the solver's: the endpoint only chooses prompts and can never
//! teach a wrong label.
//!
//! Verified items are appended to a JSONL cache (one file per domain, url and model, see
//! [`GeneratorConfig::cache_path`]) as they arrive, so a run that is interrupted or runs out
//! of budget loses nothing, and a rerun asks only for the shortfall.

mod cache;
mod client;
mod config;
mod verify;

pub use config::{api_key_from_env, GeneratorConfig, DEFAULT_KEY_ENV};

use std::collections::HashSet;
use std::io;
use std::path::PathBuf;

use thiserror::Error;

use super::{Domain, Item, TaskError};
use cache::Cache;
use client::{send_with_retries, ChatRequest, Spent};
use verify::verify_line;

/// Consecutive responses without a single new verified item after which the endpoint is taken
/// to be ignoring the format; more would only spend the budget on the same failure.
const MAX_BARREN_RESPONSES: usize = 3;

/// Characters per token when a response has no `usage.total_tokens`: the usual rule of thumb
/// for English-like text with BPE tokenizers, rounded so the estimate errs high.
const CHARS_PER_TOKEN: u64 = 4;

/// What [`generate_items`] obtained and what it cost.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GenerateReport {
    /// Exactly the `n` items asked for, cached ones first, each answer the solver's.
    pub items: Vec<Item>,
    /// HTTP requests made, retries included.
    pub requests: usize,
    /// Tokens spent (reported by the server, or estimated).
    pub tokens: u64,
    /// How many of `items` came from the cache.
    pub from_cache: usize,
    /// Returned lines that failed verification (malformed, unsolvable, outside the train
    /// split or with a wrong answer); blank lines and repeats of known prompts are not counted.
    pub rejected: usize,
}

/// Everything that can go wrong when generating items through an endpoint.
#[derive(Debug, Error)]
pub enum RemoteError {
    /// The url cannot be requested.
    #[error("bad generator url `{url}`: {problem}")]
    BadUrl {
        /// The url as given.
        url: String,
        /// What is wrong with it.
        problem: String,
    },
    /// A setting that cannot work.
    #[error("bad generator setting `{field}`: {problem}")]
    BadConfig {
        /// The [`GeneratorConfig`] field at fault.
        field: &'static str,
        /// What is wrong and what is expected.
        problem: String,
    },
    /// The endpoint refused the request with a status that retrying cannot fix (4xx but 429).
    #[error(
        "{url} answered HTTP {status}: {body}; check the url, the model name and the API key \
         (read from {DEFAULT_KEY_ENV} by default)"
    )]
    Http {
        /// The address requested.
        url: String,
        /// The HTTP status.
        status: u16,
        /// The start of the response body.
        body: String,
    },
    /// Every attempt of one request failed with a retryable error (429, 5xx, timeout,
    /// connection error).
    #[error(
        "{url} failed {attempts} attempts in a row, the last with: {last}; check that the \
         server is up, or raise the timeout, the retry count or the request budget"
    )]
    Unavailable {
        /// The address requested.
        url: String,
        /// Attempts made for the request.
        attempts: usize,
        /// The last failure.
        last: String,
    },
    /// A successful response that is not a chat completion.
    #[error("{url} returned a response that is not a chat completion: `{field}` {problem}")]
    BadResponse {
        /// The address requested.
        url: String,
        /// The JSON field at fault, e.g. `choices[0].message.content`, or `body`.
        field: String,
        /// What is wrong with it.
        problem: String,
    },
    /// Several responses in a row held no new verified item.
    #[error(
        "{url} (model `{model}`) returned no new verified `{domain}` problems in {responses} \
         responses in a row ({rejected} lines rejected so far, the last: {example}); the model \
         does not follow the `PROMPT => ANSWER` format or repeats itself; try a stronger model"
    )]
    NoProgress {
        /// The api base.
        url: String,
        /// The model asked.
        model: String,
        /// The domain asked for.
        domain: Domain,
        /// Consecutive responses without a new item.
        responses: usize,
        /// Lines rejected during the whole call.
        rejected: usize,
        /// The last rejected line and why, or a note that the responses were empty or
        /// repeated known prompts.
        example: String,
    },
    /// The request or token budget ran out before `wanted` items were verified.
    #[error(
        "got {got} of {wanted} verified `{domain}` items from {url} before the budget ran out \
         ({requests} requests, {tokens} tokens); raise the request or token budget and run \
         again: the {got} items are cached and only the rest will be requested"
    )]
    Budget {
        /// The api base.
        url: String,
        /// The domain asked for.
        domain: Domain,
        /// Items obtained, cached ones included.
        got: usize,
        /// Items asked for.
        wanted: usize,
        /// Requests made.
        requests: usize,
        /// Tokens spent.
        tokens: u64,
    },
    /// The cache file could not be read or written.
    #[error("generator cache {}: {source}", path.display())]
    Cache {
        /// The cache file.
        path: PathBuf,
        /// The underlying I/O error.
        source: io::Error,
    },
    /// Example problems for the request could not be drawn.
    #[error("cannot draw example `{domain}` problems for the generator: {source}")]
    Examples {
        /// The domain asked for.
        domain: Domain,
        /// Why sampling failed.
        source: TaskError,
    },
}

/// Returns `n` verified train-split items of `domain`: first from the cache, then from
/// `cfg.url` for the shortfall.
///
/// Each request shows one train-split example per difficulty level (drawn with
/// [`sample`](crate::tasks::sample) from `seed` and the request's index, so requests see
/// different examples) and asks for `cfg.items_per_request` new problems at temperature 1.
/// Every verified new item is cached, also those beyond `n`, so a later call for more items
/// needs fewer requests. Cached items are reused whatever the seed; `seed` only varies the
/// examples shown.
///
/// `progress` is called with the number of items held so far: once after reading the cache
/// and after each response.
///
/// Errors: [`RemoteError::Budget`] when `cfg.max_requests` or `cfg.max_tokens` is spent first
/// (the items obtained stay cached); [`RemoteError::NoProgress`] after
/// 3 consecutive responses without a new item; [`RemoteError::Http`] at once on a 4xx other
/// than 429; [`RemoteError::Unavailable`] when a request still fails after `cfg.max_retries`
/// retries; [`RemoteError::BadResponse`] for a reply that is not a chat completion.
pub fn generate_items(
    cfg: &GeneratorConfig,
    domain: Domain,
    n: usize,
    seed: u64,
    mut progress: impl FnMut(usize),
) -> Result<GenerateReport, RemoteError> {
    cfg.validate()?;
    let (mut cache, cached) = Cache::load(cfg.cache_path(domain), domain)?;
    let mut items: Vec<Item> = cached.into_iter().take(n).collect();
    let from_cache = items.len();
    let mut seen: HashSet<String> = items.iter().map(|item| item.prompt.clone()).collect();
    progress(items.len());

    let agent = ureq::AgentBuilder::new().timeout(cfg.timeout).build();
    let mut budget = Spent::default();
    let mut rejected = 0;
    let mut barren = 0;
    let mut last_rejected: Option<String> = None;
    let mut round = 0u64;
    while items.len() < n {
        let request = ChatRequest::new(cfg, domain, seed, round)?;
        round += 1;
        let Some(reply) = send_with_retries(&agent, cfg, &request, &mut budget)? else {
            return Err(RemoteError::Budget {
                url: cfg.url.clone(),
                domain,
                got: items.len(),
                wanted: n,
                requests: budget.requests,
                tokens: budget.tokens,
            });
        };
        budget.tokens += reply.total_tokens.unwrap_or_else(|| {
            let chars = (request.chars + reply.content.len()) as u64;
            chars.div_ceil(CHARS_PER_TOKEN)
        });

        let mut fresh = 0;
        for line in reply
            .content
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
        {
            match verify_line(domain, line) {
                Ok(item) => {
                    if seen.insert(item.prompt.clone()) {
                        cache.append(&item)?;
                        fresh += 1;
                        if items.len() < n {
                            items.push(item);
                        }
                    }
                }
                Err(rejection) => {
                    rejected += 1;
                    last_rejected = Some(format!("`{line}` ({})", rejection.reason(domain)));
                }
            }
        }
        progress(items.len());

        barren = if fresh == 0 { barren + 1 } else { 0 };
        if barren == MAX_BARREN_RESPONSES && items.len() < n {
            return Err(RemoteError::NoProgress {
                url: cfg.url.clone(),
                model: cfg.model.clone(),
                domain,
                responses: barren,
                rejected,
                example: last_rejected.unwrap_or_else(|| {
                    "none: the replies were empty or repeated known prompts".to_string()
                }),
            });
        }
    }
    Ok(GenerateReport {
        items,
        requests: budget.requests,
        tokens: budget.tokens,
        from_cache,
        rejected,
    })
}

crate::module_error!(RemoteError);

#[cfg(test)]
mod tests;
