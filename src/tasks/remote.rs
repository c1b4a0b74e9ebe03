//! An OpenAI-compatible chat endpoint as a source of training items for a built-in domain.
//!
//! Stage 1 of DESIGN.md accepts problems from elsewhere as long as "generated problems are
//! checked by the verifier before use". [`generate_items`] asks a chat model
//! (`POST {url}/chat/completions`) for new problems written like a few examples, one per line
//! as `PROMPT => ANSWER`, and keeps a line only when
//!
//! - the domain's solver can read the prompt ([`Domain::solve`]),
//! - the prompt belongs to the train split ([`Split::of`]), so nothing the endpoint writes can
//!   leak into validation or test, and
//! - the endpoint's answer agrees with the solver's ([`Domain::verify`]).
//!
//! The stored answer is always the solver's: the endpoint only chooses prompts and can never
//! teach a wrong label.
//!
//! Verified items are appended to a JSONL cache (one file per domain, url and model, see
//! [`GeneratorConfig::cache_path`]) as they arrive, so a run that is interrupted or runs out
//! of budget loses nothing, and a rerun asks only for the shortfall.

use std::collections::HashSet;
use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::PathBuf;
use std::thread;
use std::time::Duration;

use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use thiserror::Error;

use super::{
    sample, Difficulty, Domain, Item, Split, TaskError, MAX_ANSWER_CHARS, MAX_PROMPT_CHARS,
};

/// The environment variable the CLI reads the endpoint's API key from by default.
pub const DEFAULT_KEY_ENV: &str = "BITSVF_GENERATOR_KEY";

/// Consecutive responses without a single new verified item after which the endpoint is taken
/// to be ignoring the format; more would only spend the budget on the same failure.
const MAX_BARREN_RESPONSES: usize = 3;

/// Longest wait a `Retry-After` header can impose; a server asking for more is treated as if
/// it had asked for this, so a misconfigured proxy cannot hang the CLI for hours.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(600);

/// How much of an unexpected response body an error message quotes, in characters.
const QUOTE_CHARS: usize = 300;

/// Characters per token when a response has no `usage.total_tokens`: the usual rule of thumb
/// for English-like text with BPE tokenizers, rounded so the estimate errs high.
const CHARS_PER_TOKEN: u64 = 4;

/// Where and how much to ask an OpenAI-compatible endpoint for problems.
///
/// Build it with [`GeneratorConfig::new`] and change the public fields as needed.
#[derive(Clone)]
pub struct GeneratorConfig {
    /// The API base, e.g. `http://127.0.0.1:8080/v1`; requests go to `{url}/chat/completions`.
    pub url: String,
    /// The `model` field of each request.
    pub model: String,
    /// Sent as `Authorization: Bearer {key}` when present (see [`api_key_from_env`]).
    pub api_key: Option<String>,
    /// Most HTTP requests one call may make, retries included.
    pub max_requests: usize,
    /// Most tokens one call may spend, counted from each response's `usage.total_tokens` or,
    /// when a server omits it, estimated as (request + reply characters) / 4.
    pub max_tokens: u64,
    /// Limit for one whole request, connecting and reading the reply included.
    pub timeout: Duration,
    /// Retries of one request after HTTP 429, 5xx, a timeout or a connection error.
    pub max_retries: usize,
    /// Wait before the first retry; doubled for each further retry of the same request. A
    /// `Retry-After: SECONDS` header replaces it.
    pub backoff: Duration,
    /// How many problems each request asks for.
    pub items_per_request: usize,
    /// Folder of the JSONL caches of verified items.
    pub cache_dir: PathBuf,
}

impl GeneratorConfig {
    /// A configuration for `url` and `model` with no API key and these defaults: 200 requests,
    /// 2 million tokens, a 120 s timeout (CPU-served local models are slow), 5 retries starting
    /// at 1 s, and 20 problems per request (about 1 000 tokens per reply).
    pub fn new(
        url: impl Into<String>,
        model: impl Into<String>,
        cache_dir: impl Into<PathBuf>,
    ) -> GeneratorConfig {
        GeneratorConfig {
            url: url.into(),
            model: model.into(),
            api_key: None,
            max_requests: 200,
            max_tokens: 2_000_000,
            timeout: Duration::from_secs(120),
            max_retries: 5,
            backoff: Duration::from_secs(1),
            items_per_request: 20,
            cache_dir: cache_dir.into(),
        }
    }

    /// The cache of verified items for `domain` from this url and model:
    /// `{cache_dir}/{domain}-{16 hex digits}.jsonl`, the digits from SHA-256 of the url
    /// (without a trailing `/`) and the model.
    pub fn cache_path(&self, domain: Domain) -> PathBuf {
        let mut hasher = Sha256::new();
        for part in [self.base_url(), self.model.as_str()] {
            hasher.update((part.len() as u64).to_le_bytes());
            hasher.update(part.as_bytes());
        }
        let digest = hasher.finalize();
        let hex: String = digest[..8].iter().map(|b| format!("{b:02x}")).collect();
        self.cache_dir
            .join(format!("{}-{hex}.jsonl", domain.name()))
    }

    /// The url without trailing slashes, so `…/v1` and `…/v1/` are the same endpoint.
    fn base_url(&self) -> &str {
        self.url.trim_end_matches('/')
    }

    /// The full address requests are posted to.
    fn endpoint(&self) -> String {
        format!("{}/chat/completions", self.base_url())
    }

    /// Rejects settings that cannot work before any request is made.
    fn validate(&self) -> Result<(), RemoteError> {
        if !(self.url.starts_with("http://") || self.url.starts_with("https://")) {
            return Err(RemoteError::BadUrl {
                url: self.url.clone(),
                problem: "it must start with http:// or https://, e.g. http://127.0.0.1:8080/v1"
                    .to_string(),
            });
        }
        if self.model.trim().is_empty() {
            return Err(RemoteError::BadConfig {
                field: "model",
                problem: "is empty; name the model the endpoint serves".to_string(),
            });
        }
        if self.items_per_request == 0 {
            return Err(RemoteError::BadConfig {
                field: "items_per_request",
                problem: "is 0; ask for at least 1 problem per request".to_string(),
            });
        }
        Ok(())
    }
}

/// Shows every field but the API key, which must not reach logs.
impl fmt::Debug for GeneratorConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GeneratorConfig")
            .field("url", &self.url)
            .field("model", &self.model)
            .field("api_key", &self.api_key.as_ref().map(|_| "<redacted>"))
            .field("max_requests", &self.max_requests)
            .field("max_tokens", &self.max_tokens)
            .field("timeout", &self.timeout)
            .field("max_retries", &self.max_retries)
            .field("backoff", &self.backoff)
            .field("items_per_request", &self.items_per_request)
            .field("cache_dir", &self.cache_dir)
            .finish()
    }
}

/// The API key in environment variable `var` (usually [`DEFAULT_KEY_ENV`]), trimmed; `None`
/// when the variable is unset, empty or not valid Unicode.
pub fn api_key_from_env(var: &str) -> Option<String> {
    std::env::var(var)
        .ok()
        .map(|key| key.trim().to_string())
        .filter(|key| !key.is_empty())
}

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
/// Each request shows one train-split example per difficulty level (drawn with [`sample`]
/// from `seed` and the request's index, so requests see different examples) and asks for
/// `cfg.items_per_request` new problems at temperature 1. Every verified new item is cached,
/// also those beyond `n`, so a later call for more items needs fewer requests. Cached items
/// are reused whatever the seed; `seed` only varies the examples shown.
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

/// Why a returned line was not kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Rejection {
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
    fn reason(self, domain: Domain) -> String {
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
fn verify_line(domain: Domain, line: &str) -> Result<Item, Rejection> {
    let (prompt, answer) = line.split_once("=>").ok_or(Rejection::Malformed)?;
    verify_pair(domain, prompt.trim(), answer.trim())
}

/// Verifies a prompt and a claimed answer (see the module docs); used for endpoint lines and
/// again for cached items, in case the solver or the split changed since they were written.
fn verify_pair(domain: Domain, prompt: &str, answer: &str) -> Result<Item, Rejection> {
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

/// The append-only JSONL file of verified items for one (domain, url, model).
struct Cache {
    path: PathBuf,
    /// Opened on the first append, so a call served wholly from the cache writes nothing.
    file: Option<File>,
    /// Whether the file ends inside a line (a write cut short), which the next append must
    /// close first so that it does not glue its item onto the fragment.
    ends_mid_line: bool,
}

impl Cache {
    /// Reads the cache at `path` (none yet is an empty cache) and returns its distinct,
    /// still-verified items in file order. Lines that do not parse or verify, such as a line
    /// cut short by a crash, are skipped with a warning: the cache only saves requests.
    fn load(path: PathBuf, domain: Domain) -> Result<(Cache, Vec<Item>), RemoteError> {
        let text = match fs::read_to_string(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == io::ErrorKind::NotFound => String::new(),
            Err(source) => return Err(RemoteError::Cache { path, source }),
        };
        let mut seen = HashSet::new();
        let mut items = Vec::new();
        let mut skipped = 0;
        for line in text.lines().filter(|line| !line.trim().is_empty()) {
            let item = serde_json::from_str::<Item>(line)
                .ok()
                .filter(|item| item.domain == domain.name())
                .and_then(|item| verify_pair(domain, &item.prompt, &item.answer).ok());
            match item {
                Some(item) if seen.insert(item.prompt.clone()) => items.push(item),
                Some(_) => {}
                None => skipped += 1,
            }
        }
        if skipped > 0 {
            tracing::warn!(
                "{}: skipped {skipped} lines that are not verified `{domain}` items",
                path.display()
            );
        }
        let ends_mid_line = !text.is_empty() && !text.ends_with('\n');
        let cache = Cache {
            path,
            file: None,
            ends_mid_line,
        };
        Ok((cache, items))
    }

    /// Appends `item` as one whole line with a single write, so a crash leaves at most one
    /// partial line, which [`Cache::load`] skips.
    fn append(&mut self, item: &Item) -> Result<(), RemoteError> {
        let mut line = String::new();
        if self.ends_mid_line {
            line.push('\n');
            self.ends_mid_line = false;
        }
        // An `Item` is strings only, so serializing it cannot fail.
        line.push_str(&serde_json::to_string(item).expect("an Item serializes to JSON"));
        line.push('\n');
        let path = &self.path;
        let io_error = |source| RemoteError::Cache {
            path: path.clone(),
            source,
        };
        if self.file.is_none() {
            if let Some(dir) = path.parent().filter(|dir| !dir.as_os_str().is_empty()) {
                fs::create_dir_all(dir).map_err(io_error)?;
            }
            let file = OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map_err(io_error)?;
            self.file = Some(file);
        }
        let file = self.file.as_mut().expect("the cache file was opened above");
        file.write_all(line.as_bytes()).map_err(io_error)?;
        file.flush().map_err(io_error)
    }
}

/// Requests and tokens spent so far in one call.
#[derive(Debug, Default)]
struct Spent {
    requests: usize,
    tokens: u64,
}

impl Spent {
    /// Whether no further request may be made.
    fn exhausted(&self, cfg: &GeneratorConfig) -> bool {
        self.requests >= cfg.max_requests || self.tokens >= cfg.max_tokens
    }
}

/// One chat-completion request body and the size of its messages.
struct ChatRequest {
    /// The JSON body.
    body: String,
    /// Characters in the messages, for the token estimate.
    chars: usize,
}

impl ChatRequest {
    /// The request of index `round` of a call: a system message with the output rules and a
    /// user message with one train-split example per difficulty level.
    fn new(
        cfg: &GeneratorConfig,
        domain: Domain,
        seed: u64,
        round: u64,
    ) -> Result<ChatRequest, RemoteError> {
        // The golden-ratio multiplier spreads rounds apart; `sample` hashes the result again.
        let examples_seed = seed ^ round.wrapping_mul(0x9E37_79B9_7F4A_7C15);
        let mut examples = String::new();
        for difficulty in Difficulty::all() {
            let drawn = sample(domain, Split::Train, 1, examples_seed, difficulty)
                .map_err(|source| RemoteError::Examples { domain, source })?;
            for item in drawn {
                examples.push_str(&format!("{} => {}\n", item.prompt, item.answer));
            }
        }
        let system = "You write practice problems for a small language model. Reply with \
                      problems only: one per line, each exactly `PROMPT => ANSWER`, with no \
                      numbering, no explanations and no other text.";
        let user = format!(
            "Examples of the task `{domain}`:\n{examples}\nWrite {k} new problems of this task, \
             different from the examples and from each other, in exactly the same format as \
             the examples (same words, spacing and punctuation, similar sizes), each with its \
             correct answer, one per line as `PROMPT => ANSWER`.",
            k = cfg.items_per_request,
        );
        let body = json!({
            "model": cfg.model,
            "messages": [
                {"role": "system", "content": system},
                {"role": "user", "content": user},
            ],
            "temperature": 1.0,
        });
        Ok(ChatRequest {
            body: body.to_string(),
            chars: system.len() + user.len(),
        })
    }
}

/// The parts of a chat completion that matter here.
#[derive(Debug)]
struct Completion {
    /// `choices[0].message.content`.
    content: String,
    /// `usage.total_tokens`, when the server reports it.
    total_tokens: Option<u64>,
}

/// How one attempt failed.
enum AttemptError {
    /// Worth retrying: 429, 5xx, a timeout or a connection error.
    Transient {
        problem: String,
        retry_after: Option<Duration>,
    },
    /// Retrying cannot help.
    Fatal(RemoteError),
}

/// Sends `request`, retrying transient failures with exponential backoff. `Ok(None)` means
/// the budget ran out before a request could be made; running out while retrying reports the
/// failure instead, since that, not the budget, is what the user must fix.
fn send_with_retries(
    agent: &ureq::Agent,
    cfg: &GeneratorConfig,
    request: &ChatRequest,
    spent: &mut Spent,
) -> Result<Option<Completion>, RemoteError> {
    let endpoint = cfg.endpoint();
    let mut last_failure: Option<String> = None;
    for attempt in 0..=cfg.max_retries {
        if spent.exhausted(cfg) {
            return match last_failure {
                None => Ok(None),
                Some(last) => Err(RemoteError::Unavailable {
                    url: endpoint,
                    attempts: attempt,
                    last,
                }),
            };
        }
        spent.requests += 1;
        match send_once(agent, cfg, &endpoint, &request.body) {
            Ok(completion) => return Ok(Some(completion)),
            Err(AttemptError::Fatal(error)) => return Err(error),
            Err(AttemptError::Transient {
                problem,
                retry_after,
            }) => {
                if attempt < cfg.max_retries {
                    let doubling = 1u32 << attempt.min(16);
                    let delay = retry_after
                        .unwrap_or_else(|| cfg.backoff.saturating_mul(doubling))
                        .min(MAX_RETRY_AFTER);
                    tracing::warn!("{endpoint}: {problem}; retrying in {delay:?}");
                    thread::sleep(delay);
                }
                last_failure = Some(problem);
            }
        }
    }
    Err(RemoteError::Unavailable {
        url: endpoint,
        attempts: cfg.max_retries + 1,
        last: last_failure.unwrap_or_default(),
    })
}

/// One POST of `body` to `endpoint`.
fn send_once(
    agent: &ureq::Agent,
    cfg: &GeneratorConfig,
    endpoint: &str,
    body: &str,
) -> Result<Completion, AttemptError> {
    let mut request = agent.post(endpoint).set("Content-Type", "application/json");
    if let Some(key) = &cfg.api_key {
        request = request.set("Authorization", &format!("Bearer {key}"));
    }
    match request.send_string(body) {
        Ok(response) => {
            let text = response
                .into_string()
                .map_err(|e| AttemptError::Transient {
                    problem: format!("reading the response failed: {e}"),
                    retry_after: None,
                })?;
            parse_completion(endpoint, &text).map_err(AttemptError::Fatal)
        }
        Err(ureq::Error::Status(status, response)) => {
            let retry_after = response
                .header("Retry-After")
                .and_then(|seconds| seconds.trim().parse::<u64>().ok())
                .map(Duration::from_secs);
            let body = quote(&response.into_string().unwrap_or_default());
            if status == 429 || status >= 500 {
                Err(AttemptError::Transient {
                    problem: format!("HTTP {status}: {body}"),
                    retry_after,
                })
            } else {
                Err(AttemptError::Fatal(RemoteError::Http {
                    url: endpoint.to_string(),
                    status,
                    body,
                }))
            }
        }
        Err(ureq::Error::Transport(transport)) => match transport.kind() {
            ureq::ErrorKind::InvalidUrl
            | ureq::ErrorKind::UnknownScheme
            | ureq::ErrorKind::InvalidProxyUrl
            | ureq::ErrorKind::InsecureRequestHttpsOnly => {
                Err(AttemptError::Fatal(RemoteError::BadUrl {
                    url: endpoint.to_string(),
                    problem: transport.to_string(),
                }))
            }
            _ => Err(AttemptError::Transient {
                problem: transport.to_string(),
                retry_after: None,
            }),
        },
    }
}

/// Reads `choices[0].message.content` and `usage.total_tokens` from a response body.
fn parse_completion(endpoint: &str, text: &str) -> Result<Completion, RemoteError> {
    let bad = |field: &str, problem: String| RemoteError::BadResponse {
        url: endpoint.to_string(),
        field: field.to_string(),
        problem,
    };
    let value: Value = serde_json::from_str(text).map_err(|e| {
        bad(
            "body",
            format!("is not JSON ({e}); it starts with {}", quote(text)),
        )
    })?;
    let choices = match value.get("choices") {
        Some(choices) => choices,
        None => {
            let said = value
                .get("error")
                .map_or_else(|| quote(text), |error| quote(&error.to_string()));
            return Err(bad("choices", format!("is missing; the body is {said}")));
        }
    };
    let first = choices
        .as_array()
        .ok_or_else(|| bad("choices", "is not an array".to_string()))?
        .first()
        .ok_or_else(|| bad("choices", "is empty".to_string()))?;
    let content = first
        .get("message")
        .ok_or_else(|| bad("choices[0].message", "is missing".to_string()))?
        .get("content")
        .ok_or_else(|| bad("choices[0].message.content", "is missing".to_string()))?
        .as_str()
        .ok_or_else(|| {
            bad(
                "choices[0].message.content",
                "is not a string (a refusal or a tool call?)".to_string(),
            )
        })?;
    Ok(Completion {
        content: content.to_string(),
        total_tokens: value.pointer("/usage/total_tokens").and_then(Value::as_u64),
    })
}

/// The first [`QUOTE_CHARS`] characters of `text`, in backticks, for error messages.
fn quote(text: &str) -> String {
    let text = text.trim();
    match text.char_indices().nth(QUOTE_CHARS) {
        Some((end, _)) => format!("`{}…`", &text[..end]),
        None => format!("`{text}`"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::io::{BufRead, BufReader, Read};
    use std::net::{TcpListener, TcpStream};
    use std::path::Path;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Mutex};
    use std::thread::JoinHandle;

    /// What the mock server does with one request.
    enum Reply {
        /// Answer with this status, extra headers and body.
        Http {
            status: u16,
            headers: Vec<(&'static str, &'static str)>,
            body: String,
        },
        /// Read the request and never answer (the connection stays open until the mock stops).
        Hang,
    }

    fn reply(status: u16, body: impl Into<String>) -> Reply {
        Reply::Http {
            status,
            headers: Vec::new(),
            body: body.into(),
        }
    }

    /// A chat completion whose content is `lines`, reporting `total_tokens` when given.
    fn completion(lines: &[String], total_tokens: Option<u64>) -> Reply {
        let mut body = json!({
            "id": "chatcmpl-mock",
            "object": "chat.completion",
            "choices": [{
                "index": 0,
                "message": {"role": "assistant", "content": lines.join("\n")},
                "finish_reason": "stop",
            }],
        });
        if let Some(total) = total_tokens {
            body["usage"] =
                json!({"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": total});
        }
        reply(200, body.to_string())
    }

    /// One request as the mock saw it.
    #[derive(Debug, Clone)]
    struct Seen {
        authorization: Option<String>,
        body: String,
    }

    /// An HTTP/1.1 server on 127.0.0.1 that answers requests from a script, in order; requests
    /// beyond the script get a 400 (which the client does not retry), so they show up as
    /// errors as well as in the request count.
    struct Mock {
        url: String,
        seen: Arc<Mutex<Vec<Seen>>>,
        stop: Arc<AtomicBool>,
        thread: Option<JoinHandle<()>>,
    }

    impl Mock {
        fn start(script: Vec<Reply>) -> Mock {
            let listener = TcpListener::bind("127.0.0.1:0").unwrap();
            let url = format!("http://{}/v1", listener.local_addr().unwrap());
            // Non-blocking accept so that the thread can notice `stop` and be joined.
            listener.set_nonblocking(true).unwrap();
            let seen = Arc::new(Mutex::new(Vec::new()));
            let stop = Arc::new(AtomicBool::new(false));
            let thread = {
                let (seen, stop) = (Arc::clone(&seen), Arc::clone(&stop));
                thread::spawn(move || serve(listener, script, &seen, &stop))
            };
            Mock {
                url,
                seen,
                stop,
                thread: Some(thread),
            }
        }

        fn requests(&self) -> usize {
            self.seen.lock().unwrap().len()
        }

        fn seen(&self) -> Vec<Seen> {
            self.seen.lock().unwrap().clone()
        }
    }

    impl Drop for Mock {
        fn drop(&mut self) {
            self.stop.store(true, Ordering::SeqCst);
            if let Some(thread) = self.thread.take() {
                // A panic in the server thread already failed the test through its effects.
                let _ = thread.join();
            }
        }
    }

    fn serve(
        listener: TcpListener,
        script: Vec<Reply>,
        seen: &Mutex<Vec<Seen>>,
        stop: &AtomicBool,
    ) {
        let mut script = script.into_iter();
        let mut hung = Vec::new();
        while !stop.load(Ordering::SeqCst) {
            let mut stream = match listener.accept() {
                Ok((stream, _)) => stream,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    thread::sleep(Duration::from_millis(1));
                    continue;
                }
                Err(e) => panic!("mock server: accept failed: {e}"),
            };
            stream.set_nonblocking(false).unwrap();
            stream
                .set_read_timeout(Some(Duration::from_secs(5)))
                .unwrap();
            seen.lock().unwrap().push(read_request(&mut stream));
            match script.next() {
                Some(Reply::Hang) => hung.push(stream),
                Some(Reply::Http {
                    status,
                    headers,
                    body,
                }) => respond(&mut stream, status, &headers, &body),
                None => respond(&mut stream, 400, &[], "unscripted request"),
            }
        }
    }

    fn read_request(stream: &mut TcpStream) -> Seen {
        let mut reader = BufReader::new(stream);
        let mut authorization = None;
        let mut length = 0;
        let mut line = String::new();
        loop {
            line.clear();
            if reader.read_line(&mut line).unwrap_or(0) == 0 || line.trim().is_empty() {
                break;
            }
            if let Some((name, value)) = line.split_once(':') {
                match name.trim().to_ascii_lowercase().as_str() {
                    "authorization" => authorization = Some(value.trim().to_string()),
                    "content-length" => length = value.trim().parse().unwrap_or(0),
                    _ => {}
                }
            }
        }
        let mut body = vec![0; length];
        reader.read_exact(&mut body).unwrap();
        Seen {
            authorization,
            body: String::from_utf8(body).unwrap(),
        }
    }

    fn respond(stream: &mut TcpStream, status: u16, headers: &[(&str, &str)], body: &str) {
        let mut head = format!(
            "HTTP/1.1 {status} Mock\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\
             Connection: close\r\n",
            body.len()
        );
        for (name, value) in headers {
            head.push_str(&format!("{name}: {value}\r\n"));
        }
        head.push_str("\r\n");
        stream.write_all(head.as_bytes()).unwrap();
        stream.write_all(body.as_bytes()).unwrap();
        stream.flush().unwrap();
    }

    /// A fast configuration for `mock` with its cache in `dir`.
    fn config(mock: &Mock, dir: &Path) -> GeneratorConfig {
        let mut cfg = GeneratorConfig::new(&mock.url, "mock-model", dir);
        cfg.api_key = Some("sk-test".to_string());
        cfg.timeout = Duration::from_secs(5);
        cfg.max_retries = 3;
        cfg.backoff = Duration::from_millis(1);
        cfg.items_per_request = 5;
        cfg
    }

    /// The first `k` `count` prompts of `split` in a fixed enumeration, with their answers.
    fn count_problems(split: Split, k: usize) -> Vec<(String, String)> {
        (8u32..)
            .map(|i| {
                let letters: String = format!("{i:b}")
                    .chars()
                    .map(|bit| if bit == '0' { 'a' } else { 'b' })
                    .collect();
                format!("count a in {letters}?")
            })
            .filter(|prompt| Split::of("count", prompt) == split)
            .take(k)
            .map(|prompt| {
                let answer = Domain::Count.solve(&prompt).unwrap();
                (prompt, answer)
            })
            .collect()
    }

    /// `PROMPT => ANSWER` lines for the train problems from index `from`, `k` of them.
    fn good_lines(from: usize, k: usize) -> Vec<String> {
        count_problems(Split::Train, from + k)[from..]
            .iter()
            .map(|(prompt, answer)| format!("{prompt} => {answer}"))
            .collect()
    }

    fn cache_lines(cfg: &GeneratorConfig, domain: Domain) -> usize {
        fs::read_to_string(cfg.cache_path(domain))
            .unwrap()
            .lines()
            .count()
    }

    #[test]
    fn keeps_only_verified_train_items_with_the_solvers_answers() {
        let train = count_problems(Split::Train, 4);
        let test = count_problems(Split::Test, 1);
        let wrong = (train[2].1.parse::<u32>().unwrap() + 1).to_string();
        let lines = vec![
            // Numerically equal but written differently: kept, stored as the solver writes it.
            format!("{} => 0{}", train[0].0, train[0].1),
            format!("  {} =>{}  ", train[1].0, train[1].1),
            format!("{} => {wrong}", train[2].0),
            "Sure! Here are your problems:".to_string(),
            format!("{} => {}", test[0].0, test[0].1),
            format!("{} => {}", train[0].0, train[0].1),
            "count ab in aab? => 2".to_string(),
            String::new(),
            format!("{} => {}", train[3].0, train[3].1),
        ];
        let mock = Mock::start(vec![completion(&lines, Some(30))]);
        let dir = tempfile::tempdir().unwrap();
        let cfg = config(&mock, dir.path());
        let mut progress = Vec::new();
        let report = generate_items(&cfg, Domain::Count, 3, 7, |held| progress.push(held)).unwrap();

        let expected: Vec<Item> = [&train[0], &train[1], &train[3]]
            .into_iter()
            .map(|(prompt, answer)| Item {
                prompt: prompt.clone(),
                answer: answer.clone(),
                domain: "count".into(),
            })
            .collect();
        assert_eq!(report.items, expected);
        // Wrong answer, chatter, test split, unsolvable; the repeat and the blank line are not
        // rejections.
        assert_eq!(report.rejected, 4);
        assert_eq!(
            (report.requests, report.tokens, report.from_cache),
            (1, 30, 0)
        );
        assert_eq!(progress, [0, 3]);
        assert_eq!(cache_lines(&cfg, Domain::Count), 3);

        let seen = mock.seen();
        assert_eq!(seen.len(), 1);
        assert_eq!(seen[0].authorization.as_deref(), Some("Bearer sk-test"));
        let body: Value = serde_json::from_str(&seen[0].body).unwrap();
        assert_eq!(body["model"], "mock-model");
        assert_eq!(body["temperature"], 1.0);
        let user = body["messages"][1]["content"].as_str().unwrap();
        let examples: Vec<&str> = user.lines().filter(|l| l.starts_with("count ")).collect();
        assert_eq!(examples.len(), 5, "{user}");
        for example in examples {
            let item = verify_line(Domain::Count, example);
            assert!(
                item.is_ok(),
                "example `{example}` is not a verified train item"
            );
        }
    }

    #[test]
    fn retries_429_and_500_then_succeeds() {
        let mock = Mock::start(vec![
            Reply::Http {
                status: 429,
                headers: vec![("Retry-After", "0")],
                body: "slow down".into(),
            },
            reply(500, "overloaded"),
            completion(&good_lines(0, 2), None),
        ]);
        let dir = tempfile::tempdir().unwrap();
        let report =
            generate_items(&config(&mock, dir.path()), Domain::Count, 2, 0, |_| {}).unwrap();
        assert_eq!(report.items.len(), 2);
        assert_eq!(report.requests, 3);
        assert_eq!(mock.requests(), 3);
        // No usage in the reply: the tokens are estimated from the text, so never zero.
        assert!(report.tokens > 0);
    }

    #[test]
    fn a_request_that_is_never_answered_times_out_and_is_retried() {
        let mock = Mock::start(vec![Reply::Hang, completion(&good_lines(0, 2), Some(9))]);
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = config(&mock, dir.path());
        cfg.timeout = Duration::from_millis(200);
        let report = generate_items(&cfg, Domain::Count, 2, 0, |_| {}).unwrap();
        assert_eq!(report.items.len(), 2);
        assert_eq!(report.requests, 2);
        assert_eq!(mock.requests(), 2);
    }

    #[test]
    fn a_rerun_is_served_from_the_cache_and_requests_only_the_shortfall() {
        let mock = Mock::start(vec![
            completion(&good_lines(0, 3), Some(10)),
            completion(&good_lines(3, 2), Some(10)),
        ]);
        let dir = tempfile::tempdir().unwrap();
        let cfg = config(&mock, dir.path());
        let first = generate_items(&cfg, Domain::Count, 2, 0, |_| {}).unwrap();
        assert_eq!((first.requests, first.from_cache), (1, 0));
        // The third verified item is cached too.
        assert_eq!(cache_lines(&cfg, Domain::Count), 3);

        let rerun = generate_items(&cfg, Domain::Count, 2, 0, |_| {}).unwrap();
        assert_eq!(rerun.items, first.items);
        assert_eq!((rerun.requests, rerun.tokens, rerun.from_cache), (0, 0, 2));
        assert_eq!(mock.requests(), 1);

        let more = generate_items(&cfg, Domain::Count, 5, 0, |_| {}).unwrap();
        assert_eq!((more.requests, more.from_cache), (1, 3));
        assert_eq!(more.items[..2], first.items[..]);
        assert_eq!(more.items.len(), 5);
        assert_eq!(mock.requests(), 2);
    }

    #[test]
    fn running_out_of_requests_reports_what_was_obtained() {
        let mock = Mock::start(vec![
            completion(&good_lines(0, 1), Some(10)),
            completion(&good_lines(1, 1), Some(10)),
        ]);
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = config(&mock, dir.path());
        cfg.max_requests = 2;
        let error = generate_items(&cfg, Domain::Count, 5, 0, |_| {}).unwrap_err();
        match &error {
            RemoteError::Budget {
                got,
                wanted,
                requests,
                tokens,
                ..
            } => assert_eq!((*got, *wanted, *requests, *tokens), (2, 5, 2, 20)),
            other => panic!("expected a budget error, got {other}"),
        }
        let message = error.to_string();
        assert!(
            message.contains("raise the request or token budget"),
            "{message}"
        );
        assert!(message.contains("`count`"), "{message}");
        // The two items stay cached for the next run.
        assert_eq!(cache_lines(&cfg, Domain::Count), 2);
        assert_eq!(mock.requests(), 2);
    }

    #[test]
    fn running_out_of_tokens_stops_before_the_next_request() {
        let mock = Mock::start(vec![
            completion(&good_lines(0, 1), Some(30)),
            completion(&good_lines(1, 1), Some(30)),
        ]);
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = config(&mock, dir.path());
        cfg.max_tokens = 50;
        let error = generate_items(&cfg, Domain::Count, 5, 0, |_| {}).unwrap_err();
        assert!(
            matches!(
                error,
                RemoteError::Budget {
                    got: 2,
                    requests: 2,
                    tokens: 60,
                    ..
                }
            ),
            "{error}"
        );
    }

    #[test]
    fn unauthorized_fails_at_once_quoting_the_status_and_body() {
        let mock = Mock::start(vec![reply(401, r#"{"error":"invalid api key"}"#)]);
        let dir = tempfile::tempdir().unwrap();
        let error =
            generate_items(&config(&mock, dir.path()), Domain::Compare, 3, 0, |_| {}).unwrap_err();
        assert!(
            matches!(error, RemoteError::Http { status: 401, .. }),
            "{error}"
        );
        let message = error.to_string();
        for part in ["HTTP 401", "invalid api key", mock.url.as_str()] {
            assert!(message.contains(part), "`{part}` missing from: {message}");
        }
        assert_eq!(mock.requests(), 1);
    }

    #[test]
    fn a_server_that_keeps_failing_is_reported_after_the_retries() {
        let mock = Mock::start((0..4).map(|_| reply(503, "down")).collect());
        let dir = tempfile::tempdir().unwrap();
        let error =
            generate_items(&config(&mock, dir.path()), Domain::Sort, 1, 0, |_| {}).unwrap_err();
        assert!(
            matches!(error, RemoteError::Unavailable { attempts: 4, .. }),
            "{error}"
        );
        assert!(error.to_string().contains("HTTP 503"), "{error}");
        assert_eq!(mock.requests(), 4);
    }

    #[test]
    fn a_reply_that_is_not_a_chat_completion_names_the_field() {
        let mock = Mock::start(vec![
            reply(200, r#"{"object":"list","data":[]}"#),
            reply(200, r#"{"choices":[{"message":{"role":"assistant"}}]}"#),
        ]);
        let dir = tempfile::tempdir().unwrap();
        let cfg = config(&mock, dir.path());
        let missing_choices = generate_items(&cfg, Domain::Sort, 1, 0, |_| {}).unwrap_err();
        assert!(
            matches!(&missing_choices, RemoteError::BadResponse { field, .. } if field == "choices"),
            "{missing_choices}"
        );
        let missing_content = generate_items(&cfg, Domain::Sort, 1, 0, |_| {}).unwrap_err();
        assert!(
            missing_content
                .to_string()
                .contains("`choices[0].message.content` is missing"),
            "{missing_content}"
        );
        assert_eq!(mock.requests(), 2);
    }

    #[test]
    fn an_endpoint_that_ignores_the_format_is_stopped() {
        let chatter = || completion(&["1. sort 3142 -> 1234".to_string()], Some(5));
        let mock = Mock::start(vec![chatter(), chatter(), chatter(), chatter()]);
        let dir = tempfile::tempdir().unwrap();
        let error =
            generate_items(&config(&mock, dir.path()), Domain::Sort, 2, 0, |_| {}).unwrap_err();
        match &error {
            RemoteError::NoProgress {
                responses,
                rejected,
                ..
            } => assert_eq!((*responses, *rejected), (3, 3)),
            other => panic!("expected NoProgress, got {other}"),
        }
        assert!(
            error.to_string().contains("1. sort 3142 -> 1234"),
            "{error}"
        );
        assert_eq!(mock.requests(), 3);
    }

    #[test]
    fn a_cut_short_cache_line_is_skipped_and_not_glued_to() {
        let mock = Mock::start(vec![completion(&good_lines(1, 1), Some(5))]);
        let dir = tempfile::tempdir().unwrap();
        let cfg = config(&mock, dir.path());
        let (mut cache, _) = Cache::load(cfg.cache_path(Domain::Count), Domain::Count).unwrap();
        let (prompt, answer) = count_problems(Split::Train, 1).remove(0);
        let item = Item {
            prompt,
            answer,
            domain: "count".into(),
        };
        cache.append(&item).unwrap();
        let mut file = OpenOptions::new()
            .append(true)
            .open(cfg.cache_path(Domain::Count))
            .unwrap();
        file.write_all(br#"{"prompt":"count a in"#).unwrap();

        let report = generate_items(&cfg, Domain::Count, 2, 0, |_| {}).unwrap();
        assert_eq!(report.from_cache, 1);
        assert_eq!(report.items[0], item);
        let (_, reloaded) = Cache::load(cfg.cache_path(Domain::Count), Domain::Count).unwrap();
        assert_eq!(reloaded, report.items);
    }

    #[test]
    fn bad_settings_fail_before_any_request() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = GeneratorConfig::new("127.0.0.1:8080/v1", "m", dir.path());
        let error = generate_items(&cfg, Domain::Sort, 1, 0, |_| {}).unwrap_err();
        assert!(error.to_string().contains("http://"), "{error}");
        let mut cfg = GeneratorConfig::new("http://127.0.0.1:9/v1", "m", dir.path());
        cfg.items_per_request = 0;
        let error = generate_items(&cfg, Domain::Sort, 1, 0, |_| {}).unwrap_err();
        assert!(error.to_string().contains("items_per_request"), "{error}");
    }

    #[test]
    fn the_cache_is_per_url_and_model_and_ignores_a_trailing_slash() {
        let cfg = GeneratorConfig::new("http://h:1/v1", "a", "/c");
        let slash = GeneratorConfig::new("http://h:1/v1/", "a", "/c");
        let other_model = GeneratorConfig::new("http://h:1/v1", "b", "/c");
        let path = cfg.cache_path(Domain::Sort);
        assert_eq!(path, slash.cache_path(Domain::Sort));
        assert_ne!(path, other_model.cache_path(Domain::Sort));
        assert_ne!(path, cfg.cache_path(Domain::Count));
        assert!(path.starts_with("/c"));
        let name = path.file_name().unwrap().to_str().unwrap();
        assert!(
            name.starts_with("sort-") && name.ends_with(".jsonl"),
            "{name}"
        );
    }

    #[test]
    fn the_api_key_comes_from_the_environment_and_stays_out_of_debug_output() {
        // Setting variables would race with other tests reading the environment, so this
        // reads one that is always set and one that never is.
        let path = std::env::var("PATH").unwrap();
        assert_eq!(api_key_from_env("PATH"), Some(path.trim().to_string()));
        assert_eq!(api_key_from_env("BITSVF_REMOTE_TEST_UNSET_7F3A"), None);

        let mut cfg = GeneratorConfig::new("http://h/v1", "m", "/c");
        cfg.api_key = Some("sk-secret".into());
        assert!(!format!("{cfg:?}").contains("sk-secret"));
    }
}
