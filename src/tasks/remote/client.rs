//! The HTTP side: chat-completion requests showing example problems, retries with backoff
//! within the request and token budget, and parsing of the replies.

use std::thread;
use std::time::Duration;

use serde_json::{json, Value};

use super::{GeneratorConfig, RemoteError};
use crate::tasks::{sample, Difficulty, Domain, Split};

/// Longest wait a `Retry-After` header can impose; a server asking for more is treated as if
/// it had asked for this, so a misconfigured proxy cannot hang the CLI for hours.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(600);

/// How much of an unexpected response body an error message quotes, in characters.
const QUOTE_CHARS: usize = 300;

/// Requests and tokens spent so far in one call.
#[derive(Debug, Default)]
pub(super) struct Spent {
    pub(super) requests: usize,
    pub(super) tokens: u64,
}

impl Spent {
    /// Whether no further request may be made.
    fn exhausted(&self, cfg: &GeneratorConfig) -> bool {
        self.requests >= cfg.max_requests || self.tokens >= cfg.max_tokens
    }
}

/// One chat-completion request body and the size of its messages.
pub(super) struct ChatRequest {
    /// The JSON body.
    body: String,
    /// Characters in the messages, for the token estimate.
    pub(super) chars: usize,
}

impl ChatRequest {
    /// The request of index `round` of a call: a system message with the output rules and a
    /// user message with one train-split example per difficulty level.
    pub(super) fn new(
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
pub(super) struct Completion {
    /// `choices[0].message.content`.
    pub(super) content: String,
    /// `usage.total_tokens`, when the server reports it.
    pub(super) total_tokens: Option<u64>,
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
pub(super) fn send_with_retries(
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
