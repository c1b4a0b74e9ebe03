//! The HTTP side of `bitsvf serve`: OpenAI's `/v1/models`, `/v1/completions` and
//! `/v1/chat/completions` (plain JSON or server-sent events), `/health` and `/metrics`, with
//! bearer-key auth, request limits and errors in OpenAI's shape (`{"error": {"message", "type",
//! "param", "code"}}`), on axum. Response bodies and streams are in `reply`.

use crate::adapt::dispatch::Strategy;
use crate::engine::chat::{ChatTemplate, Message};
use crate::eval::prompt_ids;
use crate::serve::batcher::{Batcher, Event, Job};
use crate::serve::metrics::Metrics;
use crate::serve::reply::{stream, Endpoint, Reply};
use crate::serve::{Pick, Routed, Served};
use crate::tasks::Item;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, SyncSender, TrySendError};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// How the server is run.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    /// Address to listen on (port 0: any free port).
    pub addr: SocketAddr,
    /// Bearer key required on `/v1/*` (`None`: open).
    pub api_key: Option<String>,
    /// Most sequences decoded together (1: one request at a time).
    pub max_batch: usize,
    /// Most requests waiting for a place in the batch; beyond it, 429.
    pub max_queue: usize,
    /// Most rows one step takes in (see [`Batcher::max_step_tokens`]).
    pub max_step_tokens: usize,
    /// Largest `max_tokens` a request may ask for.
    pub max_tokens: usize,
    /// Largest request body, bytes.
    pub max_body: usize,
    /// A request still running after this fails with 504 (or an error event).
    pub timeout: Duration,
    /// The chat template `/v1/chat/completions` renders the messages with (the model's own,
    /// as transformers' `apply_chat_template(add_generation_prompt=True)`); `None`: the
    /// messages' contents, one per line, as a plain prompt.
    pub chat_template: Option<ChatTemplate>,
}

impl Default for ServeConfig {
    fn default() -> Self {
        ServeConfig {
            addr: ([127, 0, 0, 1], 8080).into(),
            api_key: None,
            max_batch: 16,
            max_queue: 64,
            max_step_tokens: 2048,
            max_tokens: 512,
            max_body: 1 << 20,
            timeout: Duration::from_secs(300),
            chat_template: None,
        }
    }
}

/// Largest [`ServeConfig::max_queue`]: the queue's slots are allocated up front.
pub const MAX_QUEUE: usize = 1 << 16;

#[derive(Clone)]
struct App {
    served: Arc<Served>,
    jobs: SyncSender<Job>,
    metrics: Arc<Metrics>,
    config: Arc<ServeConfig>,
    created: u64,
    ids: Arc<AtomicU64>,
}

/// A running server.
pub struct Server {
    /// Where it listens.
    pub addr: SocketAddr,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<std::io::Result<()>>>,
}

impl Server {
    /// Stop accepting, finish the requests in flight, and wait.
    pub fn shutdown(mut self) -> std::io::Result<()> {
        self.stop()
    }

    /// Wait until the server stops by itself (SIGTERM or Ctrl-C).
    pub fn wait(mut self) -> std::io::Result<()> {
        // Held, not dropped: a dropped sender would stop the server.
        let _keep = self.shutdown.take();
        self.join()
    }

    fn stop(&mut self) -> std::io::Result<()> {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        self.join()
    }

    fn join(&mut self) -> std::io::Result<()> {
        match self.thread.take().map(|t| t.join()) {
            Some(Ok(r)) => r,
            Some(Err(_)) => Err(std::io::Error::other("the server thread panicked")),
            None => Ok(()),
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.stop();
    }
}

/// Start serving `served` in the background; it stops on [`Server::shutdown`], or with
/// `signals` on SIGTERM / Ctrl-C, after finishing the requests in flight.
pub fn spawn(served: Served, config: ServeConfig, signals: bool) -> std::io::Result<Server> {
    if !(1..=MAX_QUEUE).contains(&config.max_queue) {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("max_queue must be between 1 and {MAX_QUEUE}"),
        ));
    }
    let listener = std::net::TcpListener::bind(config.addr)?;
    listener.set_nonblocking(true)?;
    let addr = listener.local_addr()?;
    let metrics = Arc::new(Metrics::default());
    let (jobs, queue) = sync_channel(config.max_queue);
    let served = Arc::new(served);
    let batcher = Batcher {
        model: served.model.clone(),
        factors: served.factors.clone(),
        tok: served.tok.clone(),
        max_batch: config.max_batch,
        max_step_tokens: config.max_step_tokens,
        metrics: metrics.clone(),
    };
    std::thread::Builder::new()
        .name("bitsvf-batcher".into())
        .spawn(move || batcher.run(queue))?;
    let app = App {
        served,
        jobs,
        metrics,
        created: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
        ids: Arc::new(AtomicU64::new(0)),
        config: Arc::new(config),
    };
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let thread = std::thread::Builder::new()
        .name("bitsvf-http".into())
        .spawn(move || -> std::io::Result<()> {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()?;
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener)?;
                let stop = async move {
                    if signals {
                        tokio::select! {
                            Ok(()) = rx => {}
                            _ = terminated() => {}
                        }
                    } else {
                        let _ = rx.await;
                    }
                };
                axum::serve(listener, router(app))
                    .with_graceful_shutdown(stop)
                    .await
            })
        })?;
    Ok(Server {
        addr,
        shutdown: Some(tx),
        thread: Some(thread),
    })
}

/// SIGTERM or Ctrl-C.
async fn terminated() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        if let Ok(mut term) = signal(SignalKind::terminate()) {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
            return;
        }
    }
    let _ = tokio::signal::ctrl_c().await;
}

fn router(app: App) -> Router {
    let limit = app.config.max_body;
    Router::new()
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .route("/v1/models", get(models))
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat))
        .fallback(|| async { ApiError::new(StatusCode::NOT_FOUND, "no such route", None) })
        .layer(DefaultBodyLimit::max(limit))
        .with_state(app)
}

/// An error in OpenAI's shape.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    message: String,
    param: Option<String>,
    retry_after: Option<u64>,
}

impl ApiError {
    fn new(status: StatusCode, message: impl Into<String>, param: Option<&str>) -> Self {
        ApiError {
            status,
            message: message.into(),
            param: param.map(str::to_string),
            retry_after: None,
        }
    }
    fn bad(message: impl Into<String>, param: &str) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message, Some(param))
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let kind = match self.status.as_u16() {
            401 => "authentication_error",
            404 => "not_found_error",
            429 => "rate_limit_error",
            400..=499 => "invalid_request_error",
            _ => "server_error",
        };
        let body = json!({"error": {
            "message": self.message, "type": kind, "param": self.param,
            "code": self.status.as_u16(),
        }});
        let mut r = (self.status, Json(body)).into_response();
        if let Some(s) = self.retry_after {
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(s));
        }
        if self.status == StatusCode::UNAUTHORIZED {
            r.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        r
    }
}

async fn health(State(app): State<App>) -> Json<Value> {
    Json(json!({"status": "ok", "queue_depth": app.metrics.queue_depth()}))
}

async fn metrics(State(app): State<App>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        app.metrics.render(),
    )
}

/// Equal without an early exit on the first differing byte (the key's length may leak).
fn same_key(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn authorize(app: &App, headers: &HeaderMap) -> Result<(), ApiError> {
    let Some(key) = &app.config.api_key else {
        return Ok(());
    };
    let given = (headers.get(header::AUTHORIZATION))
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    match given {
        Some(g) if same_key(g.trim().as_bytes(), key.as_bytes()) => Ok(()),
        Some(_) => Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "invalid API key",
            None,
        )),
        None => Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "missing API key: send `Authorization: Bearer KEY`",
            None,
        )),
    }
}

async fn models(State(app): State<App>, headers: HeaderMap) -> Result<Json<Value>, ApiError> {
    authorize(&app, &headers)?;
    let data: Vec<Value> = (app.served.model_ids().into_iter())
        .map(
            |id| json!({"id": id, "object": "model", "created": app.created, "owned_by": "bitsvf"}),
        )
        .collect();
    Ok(Json(json!({"object": "list", "data": data})))
}

/// A string or a list of strings.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

impl OneOrMany {
    fn into_vec(self) -> Vec<String> {
        match self {
            OneOrMany::One(s) => vec![s],
            OneOrMany::Many(v) => v,
        }
    }
}

/// bitsvf's extension field.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Extension {
    /// Dispatch strategy for `bitsvf/auto`: prompt, classifier, cem or none.
    dispatch: Option<String>,
    /// Labelled examples for `cem`.
    #[serde(default)]
    shots: Vec<Shot>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Shot {
    prompt: String,
    answer: String,
}

/// The sampling fields both endpoints share.
#[derive(Debug, Deserialize)]
struct Sampling {
    model: String,
    max_tokens: Option<usize>,
    max_completion_tokens: Option<usize>,
    temperature: Option<f64>,
    top_p: Option<f64>,
    seed: Option<u64>,
    stop: Option<OneOrMany>,
    #[serde(default)]
    stream: bool,
    /// vLLM's extension: generate past the stop tokens.
    #[serde(default)]
    ignore_eos: bool,
    n: Option<usize>,
    bitsvf: Option<Extension>,
}

/// Parse `body` as a JSON object: `key` (the prompt or the messages) as `T`, the rest as the
/// sampling fields, naming the field that is wrong.
fn parse<T: serde::de::DeserializeOwned>(
    body: &[u8],
    key: &str,
) -> Result<(T, Sampling), ApiError> {
    let mut value: Value = serde_json::from_slice(body).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("the body is not JSON: {e}"),
            None,
        )
    })?;
    let Some(object) = value.as_object_mut() else {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "the body must be a JSON object",
            None,
        ));
    };
    let field = object
        .remove(key)
        .ok_or_else(|| ApiError::bad(format!("missing field `{key}`"), key))?;
    let named =
        |path: String, e: serde_json::Error| ApiError::bad(format!("field `{path}`: {e}"), &path);
    let first: T = serde_path_to_error::deserialize(field).map_err(|e| {
        let path = match e.path().to_string().as_str() {
            "." => key.to_string(),
            p => format!("{key}{}{p}", if p.starts_with('[') { "" } else { "." }),
        };
        named(path, e.into_inner())
    })?;
    let rest: Sampling = serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        match path.as_str() {
            "." => ApiError::bad(format!("{inner}"), "."),
            _ => named(path, inner),
        }
    })?;
    Ok((first, rest))
}

async fn completions(State(app): State<App>, headers: HeaderMap, body: Bytes) -> Response {
    let start = Instant::now();
    let r = async {
        authorize(&app, &headers)?;
        let (prompt, sampling): (OneOrMany, Sampling) = parse(&body, "prompt")?;
        let prompts = prompt.into_vec();
        let [prompt] = prompts.as_slice() else {
            return Err(ApiError::bad(
                format!(
                    "{} prompts given; this server completes one prompt per request",
                    prompts.len()
                ),
                "prompt",
            ));
        };
        let prompt = Prompt {
            task: prompt.clone(),
            text: None,
        };
        run(&app, Endpoint::Completions, prompt, sampling, start).await
    }
    .await;
    finish(&app, Endpoint::Completions, start, r)
}

async fn chat(State(app): State<App>, headers: HeaderMap, body: Bytes) -> Response {
    let start = Instant::now();
    let r = async {
        authorize(&app, &headers)?;
        let (messages, sampling): (Vec<Message>, Sampling) = parse(&body, "messages")?;
        if messages.is_empty() {
            return Err(ApiError::bad("`messages` is empty", "messages"));
        }
        if let Some((i, m)) = (messages.iter().enumerate())
            .find(|(_, m)| !["system", "user", "assistant", "developer"].contains(&m.role.as_str()))
        {
            return Err(ApiError::bad(
                format!(
                    "messages[{i}].role `{}` is not system, developer, user or assistant",
                    m.role
                ),
                &format!("messages[{i}].role"),
            ));
        }
        let text = match &app.config.chat_template {
            Some(t) => Some(
                t.render(&messages, true)
                    .map_err(|e| ApiError::bad(e.to_string(), "messages"))?,
            ),
            None => None,
        };
        let prompt = Prompt {
            task: chat_prompt(&messages),
            text,
        };
        run(&app, Endpoint::Chat, prompt, sampling, start).await
    }
    .await;
    finish(&app, Endpoint::Chat, start, r)
}

/// What a request asks the model: the task prompt (what dispatch routes on), and for a chat
/// with a template the rendered conversation, encoded as it is (the template places BOS).
struct Prompt {
    task: String,
    text: Option<String>,
}

/// The task prompt of a chat: the messages' contents, one per line (without a template, the
/// prompt itself).
fn chat_prompt(messages: &[Message]) -> String {
    let parts: Vec<&str> = messages.iter().map(|m| m.content.as_str()).collect();
    parts.join("\n")
}

/// Record the request's outcome (streams are recorded when they start).
fn finish(
    app: &App,
    endpoint: Endpoint,
    start: Instant,
    r: Result<Response, ApiError>,
) -> Response {
    let response = r.unwrap_or_else(IntoResponse::into_response);
    app.metrics
        .request(endpoint.name(), response.status().as_u16(), start.elapsed());
    response
}

/// Validate, route, queue and answer one request.
async fn run(
    app: &App,
    endpoint: Endpoint,
    prompt: Prompt,
    s: Sampling,
    start: Instant,
) -> Result<Response, ApiError> {
    let Prompt { task: prompt, text } = prompt;
    let cfg = &app.config;
    if s.n.is_some_and(|n| n != 1) {
        return Err(ApiError::bad("only `n` = 1 is supported", "n"));
    }
    let default_tokens = match endpoint {
        Endpoint::Completions => 16,
        Endpoint::Chat => cfg.max_tokens.min(256),
    };
    let max_tokens = s
        .max_completion_tokens
        .or(s.max_tokens)
        .unwrap_or(default_tokens);
    if max_tokens == 0 || max_tokens > cfg.max_tokens {
        return Err(ApiError::bad(
            format!(
                "`max_tokens` is {max_tokens}; this server allows 1 to {}",
                cfg.max_tokens
            ),
            "max_tokens",
        ));
    }
    let temperature = s.temperature.unwrap_or(1.0);
    if !(0.0..=2.0).contains(&temperature) {
        return Err(ApiError::bad(
            "`temperature` must be between 0 and 2",
            "temperature",
        ));
    }
    let top_p = s.top_p.unwrap_or(1.0);
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(ApiError::bad("`top_p` must be in (0, 1]", "top_p"));
    }
    let stop = s.stop.map(OneOrMany::into_vec).unwrap_or_default();
    if stop.len() > 4 {
        return Err(ApiError::bad("at most 4 `stop` sequences", "stop"));
    }
    let pick = app.served.pick(&s.model).ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            format!(
                "model `{}` does not exist; this server has {}",
                s.model,
                app.served.model_ids().join(", ")
            ),
            Some("model"),
        )
    })?;
    let ext = s.bitsvf.unwrap_or_default();
    let tok = app.served.tok.as_ref();
    let ids = match &text {
        Some(t) => tok.encode(t),
        None => prompt_ids(tok, &prompt),
    }
    .map_err(|e| ApiError::bad(format!("the prompt cannot be tokenized: {e}"), "prompt"))?;
    let room = app.served.model.config.max_position_embeddings;
    if ids.len() >= room {
        return Err(ApiError::bad(
            format!(
                "the prompt is {} tokens; the model's context holds {room}",
                ids.len()
            ),
            "prompt",
        ));
    }
    let routed = match pick {
        Pick::Base => Routed {
            adapter: None,
            dispatch: None,
            note: None,
        },
        Pick::Adapter(a) => Routed {
            adapter: Some(a),
            dispatch: None,
            note: None,
        },
        Pick::Auto => {
            let strategy: Strategy = match &ext.dispatch {
                Some(d) => d
                    .parse()
                    .map_err(|e| ApiError::bad(format!("{e}"), "bitsvf.dispatch"))?,
                None => app.served.dispatch,
            };
            let shots: Vec<Item> = (ext.shots.into_iter())
                .map(|s| Item {
                    prompt: s.prompt,
                    answer: s.answer,
                    domain: "request".into(),
                })
                .collect();
            let served = app.served.clone();
            let p = prompt.clone();
            tokio::task::spawn_blocking(move || served.route(strategy, &p, shots))
                .await
                .map_err(|_| {
                    ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "dispatch failed", None)
                })?
                .map_err(|e| ApiError::bad(format!("dispatch failed: {e}"), "bitsvf"))?
        }
    };
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let seed = s.seed.unwrap_or_else(|| {
        app.created
            ^ app
                .ids
                .load(Ordering::Relaxed)
                .wrapping_mul(0x9E37_79B9_7F4A_7C15)
    });
    let job = Job {
        prompt: ids,
        adapter: routed.adapter.clone(),
        max_tokens,
        temperature,
        top_p,
        seed,
        stop,
        ignore_eos: s.ignore_eos,
        deadline: start.checked_add(cfg.timeout),
        events: tx,
    };
    let prompt_tokens = job.prompt.len();
    app.metrics.enqueued();
    match app.jobs.try_send(job) {
        Ok(()) => {}
        Err(TrySendError::Full(_)) => {
            app.metrics.dequeued();
            let mut e = ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                format!(
                    "the queue is full ({} waiting); retry shortly",
                    cfg.max_queue
                ),
                None,
            );
            e.retry_after = Some(1);
            return Err(e);
        }
        Err(TrySendError::Disconnected(_)) => {
            app.metrics.dequeued();
            return Err(ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "the server is stopping",
                None,
            ));
        }
    }
    app.metrics.admitted(routed.name(), prompt_tokens);
    let n = app.ids.fetch_add(1, Ordering::Relaxed);
    let reply = Reply {
        id: format!(
            "{}-{n}",
            if endpoint == Endpoint::Chat {
                "chatcmpl"
            } else {
                "cmpl"
            }
        ),
        endpoint,
        model: s.model,
        created: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
        info: json!({"adapter": routed.name(), "dispatch": routed.dispatch.map(|d| d.name()), "note": routed.note}),
    };
    if s.stream {
        return Ok(stream(app.metrics.clone(), reply, rx, start));
    }
    let mut rx = rx;
    let mut text = String::new();
    let mut first = true;
    while let Some(ev) = rx.recv().await {
        match ev {
            Event::Text(t) => {
                if std::mem::take(&mut first) {
                    app.metrics.first_token(start.elapsed());
                }
                text.push_str(&t);
            }
            Event::Done {
                finish,
                prompt_tokens,
                completion_tokens,
            } => {
                return Ok(Json(reply.whole(
                    &text,
                    finish.reason(),
                    prompt_tokens,
                    completion_tokens,
                ))
                .into_response());
            }
            Event::TimedOut => {
                return Err(ApiError::new(
                    StatusCode::GATEWAY_TIMEOUT,
                    format!("the request took longer than {} s", cfg.timeout.as_secs()),
                    None,
                ));
            }
            Event::Failed(msg) => {
                return Err(ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, msg, None));
            }
        }
    }
    Err(ApiError::new(
        StatusCode::INTERNAL_SERVER_ERROR,
        "the request was dropped",
        None,
    ))
}
