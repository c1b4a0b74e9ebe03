//! `bitsvf serve`: the OpenAI-compatible server; `bitsvf load-test`: N clients × M requests
//! against a running server, with throughput and latency percentiles.

use crate::common::svd_cache;
use anyhow::{Context, Result};
use bitsvf::adapt::dispatch::Strategy;
use bitsvf::engine::chat::{self, TemplateChoice};
use bitsvf::engine::{checkpoint, tokenizer};
use bitsvf::pipeline::Handoff;
use bitsvf::serve::api::{spawn, ServeConfig, MAX_QUEUE};
use bitsvf::serve::{ExpertSet, Served};
use bitsvf::tasks::{eval_items, Domain, Split};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(clap::Args)]
pub struct Args {
    /// The model (default: the handoff's `model/` with --experts, else the embedded model).
    model: Option<PathBuf>,
    /// Handoff directory of `bitsvf run`: serve its experts, mixture and dispatch.
    #[arg(long)]
    experts: Option<PathBuf>,
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// Port (0: any free port, printed at start).
    #[arg(long, default_value_t = 8080)]
    port: u16,
    /// Environment variable holding the API key clients must send as `Authorization: Bearer`.
    #[arg(long)]
    api_key_env: Option<String>,
    /// Most requests decoded together in one batch (1: one at a time).
    #[arg(long, default_value_t = 16)]
    max_batch: usize,
    /// Most requests waiting for a place in the batch; more are refused with 429.
    #[arg(long, default_value_t = 64)]
    max_queue: usize,
    /// Most tokens one decode step takes in: the prompts of newly admitted requests plus one
    /// per running request (a long prompt waits for a later step instead of stalling the
    /// others' tokens).
    #[arg(long, default_value_t = 2048)]
    max_step_tokens: usize,
    /// Largest `max_tokens` a request may ask for.
    #[arg(long, default_value_t = 512)]
    max_tokens: usize,
    /// Seconds after which a request fails with 504.
    #[arg(long, default_value_t = 300)]
    timeout: u64,
    /// The chat template /v1/chat/completions renders the messages with: auto (the model's
    /// own — a GGUF file's tokenizer.chat_template, else chat_template.jinja or
    /// tokenizer_config.json's chat_template beside it — or, without one, the messages'
    /// contents one per line), none (always that), or a Jinja FILE.
    #[arg(long, default_value = "auto")]
    chat_template: TemplateChoice,
    /// Singular directions served per target matrix (default: all, every expert exactly as
    /// trained; fewer trade accuracy for speed, the energy kept is printed per expert).
    #[arg(long)]
    rank: Option<usize>,
    /// How `bitsvf/auto` picks when a request does not say: classifier (when the handoff has
    /// one), prompt, or none. CEM needs the request's examples.
    #[arg(long)]
    dispatch: Option<Strategy>,
    /// SVD cache directory (default: $BITSVF_CACHE or ~/.cache/bitsvf).
    #[arg(long)]
    cache_dir: Option<PathBuf>,
}

/// Largest --requests of a load test (each request's figures are kept).
const MAX_REQUESTS: usize = 1 << 20;

pub fn run(a: Args) -> Result<()> {
    let api_key = match &a.api_key_env {
        Some(var) => Some(std::env::var(var).with_context(|| {
            format!("--api-key-env {var}: the environment variable {var} is not set")
        })?),
        None => None,
    };
    anyhow::ensure!(a.max_batch >= 1, "--max-batch must be at least 1");
    anyhow::ensure!(
        (1..=MAX_QUEUE).contains(&a.max_queue),
        "--max-queue must be between 1 and {MAX_QUEUE}"
    );
    anyhow::ensure!(
        a.max_step_tokens >= 1,
        "--max-step-tokens must be at least 1"
    );
    anyhow::ensure!(a.max_tokens >= 1, "--max-tokens must be at least 1");
    anyhow::ensure!(a.timeout >= 1, "--timeout must be at least 1 second");
    anyhow::ensure!(a.rank != Some(0), "--rank must be at least 1");
    let addr: std::net::SocketAddr = format!("{}:{}", a.host, a.port)
        .parse()
        .with_context(|| format!("--host {} --port {} is not an address", a.host, a.port))?;
    let start = Instant::now();
    let source = match &a.experts {
        None => a.model.clone(),
        Some(dir) => Some(a.model.clone().unwrap_or_else(|| dir.join("model"))),
    };
    let mut served = match &a.experts {
        None => {
            let ck = checkpoint::load_or_default(a.model.as_deref())?;
            let tok = tokenizer::for_model(a.model.as_deref(), &ck.config)?;
            Served::base(&ck, Arc::from(tok))?
        }
        Some(dir) => {
            let h = Handoff::open(dir)?;
            if let Some(m) = &a.model {
                checkpoint::load(m)?.check_is_base_of(m, &h.ck, dir)?;
            }
            let model_dir = a.model.clone().unwrap_or_else(|| dir.join("model"));
            let tok = tokenizer::for_model(Some(&model_dir), &h.ck.config)?;
            let cache = svd_cache(a.cache_dir.clone());
            let set = ExpertSet {
                experts: h.experts()?,
                mixture: h.mixture()?.map(|m| (m.experts, m.alpha, m.rank)),
                classifier: h.classifier()?,
                thresholds: h.manifest.metrics.thresholds,
                cem: h.manifest.options.cem.clone(),
            };
            let served = Served::with_experts(&h.base(&cache), Arc::from(tok), set, a.rank)?;
            for e in served.experts.iter().chain(&served.mixture) {
                if e.energy_kept < 1.0 {
                    eprintln!(
                        "expert `{}`: rank {} keeps {:.1}% of its delta's energy",
                        e.name,
                        a.rank.unwrap_or(0),
                        100.0 * e.energy_kept
                    );
                }
            }
            served
        }
    };
    if let Some(d) = a.dispatch {
        anyhow::ensure!(
            d != Strategy::Cem,
            "--dispatch cem needs each request's examples; send them in `bitsvf.shots`"
        );
        anyhow::ensure!(
            d != Strategy::Classifier || served.classifier.is_some(),
            "--dispatch classifier: the handoff has no classifier expert"
        );
        served.dispatch = d;
    }
    let ids = served.model_ids();
    let auto = served.dispatch;
    let chat_template = chat::choose(&a.chat_template, source.as_deref(), served.tok.as_ref())?;
    if let Some(t) = &chat_template {
        eprintln!("chat template: {}", t.origin);
    }
    let config = ServeConfig {
        chat_template,
        addr,
        api_key,
        max_batch: a.max_batch,
        max_queue: a.max_queue,
        max_step_tokens: a.max_step_tokens,
        max_tokens: a.max_tokens,
        timeout: Duration::from_secs(a.timeout),
        ..ServeConfig::default()
    };
    let server = spawn(served, config, true).with_context(|| format!("cannot listen on {addr}"))?;
    eprintln!(
        "bitsvf serve: http://{} (ready in {:.1} s); models {}; bitsvf/auto dispatches by {}; \
         batches of up to {}; SIGTERM or Ctrl-C finishes the requests in flight and stops",
        server.addr,
        start.elapsed().as_secs_f64(),
        ids.join(", "),
        auto.name(),
        a.max_batch
    );
    server.wait()?;
    eprintln!("bitsvf serve: stopped");
    Ok(())
}

#[derive(clap::Args)]
pub struct LoadArgs {
    /// Base URL of a running server, e.g. http://127.0.0.1:8080.
    url: String,
    /// Concurrent clients, one run per value.
    #[arg(long, value_delimiter = ',', default_value = "1,4,16")]
    clients: Vec<usize>,
    /// Requests per client.
    #[arg(long, default_value_t = 8)]
    requests: usize,
    /// Model ids the requests cycle through (default: every id the server lists but auto).
    #[arg(long, value_delimiter = ',')]
    models: Vec<String>,
    /// New tokens per request (greedy, past the stop tokens, so every request costs the
    /// same).
    #[arg(long, default_value_t = 32)]
    max_tokens: usize,
    /// API key to send.
    #[arg(long)]
    api_key_env: Option<String>,
}

/// One run's figures.
struct LoadRun {
    clients: usize,
    ok: usize,
    failed: usize,
    seconds: f64,
    tokens: usize,
    latencies: Vec<f64>,
}

pub fn load_test(a: LoadArgs) -> Result<()> {
    anyhow::ensure!(
        (1..=MAX_REQUESTS).contains(&a.requests),
        "--requests must be between 1 and {MAX_REQUESTS}"
    );
    anyhow::ensure!(
        a.clients.iter().all(|&c| (1..=256).contains(&c)),
        "--clients must be between 1 and 256"
    );
    let key = match &a.api_key_env {
        Some(v) => Some(std::env::var(v).with_context(|| format!("{v} is not set"))?),
        None => None,
    };
    let url = a.url.trim_end_matches('/').to_string();
    let agent = ureq::AgentBuilder::new()
        .timeout(Duration::from_secs(600))
        .build();
    let models = if a.models.is_empty() {
        let mut req = agent.get(&format!("{url}/v1/models"));
        if let Some(k) = &key {
            req = req.set("Authorization", &format!("Bearer {k}"));
        }
        let list: serde_json::Value = serde_json::from_reader(req.call()?.into_reader())?;
        (list["data"].as_array().into_iter().flatten())
            .filter_map(|m| m["id"].as_str().map(str::to_string))
            .filter(|id| id != "bitsvf/auto")
            .collect()
    } else {
        a.models.clone()
    };
    anyhow::ensure!(!models.is_empty(), "no models to request");
    // Task prompts from every domain, so each expert sees work of its kind.
    let mut prompts = Vec::new();
    for d in Domain::ALL {
        prompts.extend(
            eval_items(d, Split::Test, 4, 7)?
                .into_iter()
                .map(|i| i.prompt),
        );
    }
    println!(
        "| clients | requests | failed | wall s | req/s | tok/s | p50 s | p99 s |\n|---|---|---|---|---|---|---|---|"
    );
    for &clients in &a.clients {
        let r = load_run(&agent, &url, key.as_deref(), &models, &prompts, clients, &a)?;
        let pct = |p: f64| {
            let i = ((r.latencies.len() as f64 - 1.0) * p).round() as usize;
            r.latencies.get(i).copied().unwrap_or(f64::NAN)
        };
        println!(
            "| {} | {} | {} | {:.2} | {:.2} | {:.1} | {:.3} | {:.3} |",
            r.clients,
            r.ok + r.failed,
            r.failed,
            r.seconds,
            r.ok as f64 / r.seconds,
            r.tokens as f64 / r.seconds,
            pct(0.5),
            pct(0.99)
        );
    }
    Ok(())
}

fn load_run(
    agent: &ureq::Agent,
    url: &str,
    key: Option<&str>,
    models: &[String],
    prompts: &[String],
    clients: usize,
    a: &LoadArgs,
) -> Result<LoadRun> {
    let start = Instant::now();
    let results: Vec<Vec<(bool, f64, usize)>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..clients)
            .map(|c| {
                s.spawn(move || {
                    (0..a.requests)
                        .map(|r| {
                            let n = c * a.requests + r;
                            let body = serde_json::json!({
                                "model": models[n % models.len()],
                                "prompt": prompts[n % prompts.len()],
                                "max_tokens": a.max_tokens, "temperature": 0,
                                "ignore_eos": true,
                            });
                            let t = Instant::now();
                            let mut req = agent.post(&format!("{url}/v1/completions"));
                            if let Some(k) = key {
                                req = req.set("Authorization", &format!("Bearer {k}"));
                            }
                            let reply = req
                                .set("Content-Type", "application/json")
                                .send_string(&body.to_string())
                                .ok()
                                .and_then(|r| {
                                    serde_json::from_reader::<_, serde_json::Value>(r.into_reader())
                                        .ok()
                                });
                            let tokens = reply
                                .as_ref()
                                .and_then(|v| v["usage"]["completion_tokens"].as_u64());
                            (
                                tokens.is_some(),
                                t.elapsed().as_secs_f64(),
                                tokens.unwrap_or(0) as usize,
                            )
                        })
                        .collect()
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_default())
            .collect()
    });
    let seconds = start.elapsed().as_secs_f64();
    let all: Vec<(bool, f64, usize)> = results.into_iter().flatten().collect();
    let mut latencies: Vec<f64> = all.iter().filter(|r| r.0).map(|r| r.1).collect();
    latencies.sort_by(f64::total_cmp);
    Ok(LoadRun {
        clients,
        ok: latencies.len(),
        failed: all.iter().filter(|r| !r.0).count(),
        seconds,
        tokens: all.iter().map(|r| r.2).sum(),
        latencies,
    })
}
