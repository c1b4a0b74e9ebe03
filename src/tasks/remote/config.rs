//! Where and how much to ask: [`GeneratorConfig`], its cache path and checks, and the API key
//! read from the environment.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use sha2::{Digest, Sha256};

use super::RemoteError;
use crate::tasks::Domain;

/// The environment variable the CLI reads the endpoint's API key from by default.
pub const DEFAULT_KEY_ENV: &str = "BITSVF_GENERATOR_KEY";

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
    pub(super) fn endpoint(&self) -> String {
        format!("{}/chat/completions", self.base_url())
    }

    /// Rejects settings that cannot work before any request is made.
    pub(super) fn validate(&self) -> Result<(), RemoteError> {
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
