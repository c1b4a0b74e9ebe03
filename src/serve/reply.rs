//! The bodies of `bitsvf serve`'s answers: whole completions and chat completions, and their
//! server-sent event streams, in OpenAI's shapes.

use crate::serve::batcher::Event;
use crate::serve::metrics::Metrics;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use serde_json::{json, Value};
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Instant;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tokio_stream::StreamExt;

/// Which endpoint, for responses and metrics.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Endpoint {
    Completions,
    Chat,
}

impl Endpoint {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Endpoint::Completions => "completions",
            Endpoint::Chat => "chat_completions",
        }
    }
}

/// The fixed parts of one response.
pub(crate) struct Reply {
    pub(crate) id: String,
    pub(crate) endpoint: Endpoint,
    pub(crate) model: String,
    pub(crate) created: u64,
    pub(crate) info: Value,
}

impl Reply {
    pub(crate) fn usage(p: usize, c: usize) -> Value {
        json!({"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c})
    }

    pub(crate) fn whole(&self, text: &str, finish: &str, p: usize, c: usize) -> Value {
        let choice = match self.endpoint {
            Endpoint::Completions => {
                json!({"index": 0, "text": text, "finish_reason": finish, "logprobs": null})
            }
            Endpoint::Chat => json!({"index": 0, "finish_reason": finish, "logprobs": null,
                "message": {"role": "assistant", "content": text}}),
        };
        let object = match self.endpoint {
            Endpoint::Completions => "text_completion",
            Endpoint::Chat => "chat.completion",
        };
        json!({"id": self.id, "object": object, "created": self.created, "model": self.model,
            "choices": [choice], "usage": Self::usage(p, c), "bitsvf": self.info})
    }

    fn chunk(&self, text: Option<&str>, finish: Option<&str>, usage: Option<Value>) -> Value {
        let choice = match self.endpoint {
            Endpoint::Completions => {
                json!({"index": 0, "text": text.unwrap_or(""), "finish_reason": finish, "logprobs": null})
            }
            Endpoint::Chat => {
                let delta = match text {
                    Some(t) => json!({"content": t}),
                    None if finish.is_none() => json!({"role": "assistant", "content": ""}),
                    None => json!({}),
                };
                json!({"index": 0, "delta": delta, "finish_reason": finish, "logprobs": null})
            }
        };
        let object = match self.endpoint {
            Endpoint::Completions => "text_completion",
            Endpoint::Chat => "chat.completion.chunk",
        };
        let mut v = json!({"id": self.id, "object": object, "created": self.created,
            "model": self.model, "choices": [choice], "bitsvf": self.info});
        if let Some(u) = usage {
            v["usage"] = u;
        }
        v
    }
}

/// Server-sent events: a chunk per piece of text, a last chunk with the finish reason and
/// usage, then `[DONE]`.
pub(crate) fn stream(
    metrics: Arc<Metrics>,
    reply: Reply,
    rx: tokio::sync::mpsc::UnboundedReceiver<Event>,
    start: Instant,
) -> Response {
    let reply = Arc::new(reply);
    let head = (reply.endpoint == Endpoint::Chat).then(|| reply.chunk(None, None, None));
    let r = reply.clone();
    let mut first = true;
    let events = UnboundedReceiverStream::new(rx).map(move |ev| {
        let data = match ev {
            Event::Text(t) => {
                if std::mem::take(&mut first) {
                    metrics.first_token(start.elapsed());
                }
                r.chunk(Some(&t), None, None)
            }
            Event::Done { finish, prompt_tokens, completion_tokens } => r.chunk(
                None,
                Some(finish.reason()),
                Some(Reply::usage(prompt_tokens, completion_tokens)),
            ),
            Event::TimedOut => json!({"error": {"message": "the request timed out", "type": "server_error", "code": 504}}),
            Event::Failed(msg) => json!({"error": {"message": msg, "type": "server_error", "code": 500}}),
        };
        Ok::<_, Infallible>(SseEvent::default().data(data.to_string()))
    });
    let head = tokio_stream::iter(head.map(|h| Ok(SseEvent::default().data(h.to_string()))));
    let done = tokio_stream::once(Ok(SseEvent::default().data("[DONE]")));
    Sse::new(head.chain(events).chain(done))
        .keep_alive(KeepAlive::default())
        .into_response()
}
