//! The server driven over HTTP on 127.0.0.1, and the ragged step against the models it
//! replaces.

use super::adapters::StepRows;
use super::api::{spawn, ServeConfig, Server};
use super::*;
use crate::engine::checkpoint::Checkpoint;
use crate::engine::model::Cache;
use crate::engine::tokenizer::ByteTokenizer;
use crate::svf::attach::adapted_model;
use crate::svf::expert::test_expert;
use crate::svf::factors::z_lengths;
use crate::svf::svd::SvdCache;
use crate::svf::{Parameterization, Targets};
use rand::{rngs::StdRng, Rng, SeedableRng};
use serde_json::{json, Value};
use std::io::{Read, Write};
use std::time::Duration;

/// Paper-SVF MLP experts of `ck` with z drawn from [0.3, 1.7], seeded by name.
fn random_expert(ck: &Checkpoint, cache: &SvdCache, name: &str, seed: u64) -> Expert {
    let f = Base::new(ck, cache).factors(Targets::Mlp).unwrap();
    let mut rng = StdRng::seed_from_u64(seed);
    let z = z_lengths(ck, Targets::Mlp, Parameterization::Paper, &f.svd, 0)
        .unwrap()
        .into_iter()
        .map(|(n, len)| (n, (0..len).map(|_| rng.gen_range(0.3..1.7)).collect()))
        .collect();
    test_expert(ck, name, Parameterization::Paper, z)
}

struct Fixture {
    ck: Checkpoint,
    _dir: tempfile::TempDir,
    cache: SvdCache,
    experts: Vec<Expert>,
}

fn fixture() -> Fixture {
    let ck = Checkpoint::tiny(32, 48, 4);
    let dir = tempfile::tempdir().unwrap();
    let cache = SvdCache::new(dir.path().to_path_buf());
    let experts = ["a", "b", "c"]
        .iter()
        .enumerate()
        .map(|(i, n)| random_expert(&ck, &cache, n, i as u64))
        .collect();
    Fixture {
        ck,
        _dir: dir,
        cache,
        experts,
    }
}

/// Experts a and b, their mixture (½, ½) at rank 8, classifier c.
fn served(fx: &Fixture, rank: Option<usize>) -> Served {
    let set = ExpertSet {
        experts: fx.experts[..2].to_vec(),
        mixture: Some((fx.experts[..2].to_vec(), vec![0.5, 0.5], 8)),
        classifier: Some(fx.experts[2].clone()),
        thresholds: Thresholds::default(),
        cem: CemConfig {
            population: 6,
            elites: 2,
            iterations: 2,
            ..CemConfig::default()
        },
    };
    let base = Base::new(&fx.ck, &fx.cache);
    Served::with_experts(&base, Arc::new(ByteTokenizer), set, rank).unwrap()
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// A ragged step of three sequences of different lengths (base, expert a, expert b), then a
/// decode step each, gives the logits of each expert's own model — the base through the
/// packed kernel, the experts as the dense SVF model they were trained as.
#[test]
fn a_mixed_expert_ragged_step_matches_each_experts_own_model() {
    let fx = fixture();
    let s = served(&fx, None);
    let base = Base::new(&fx.ck, &fx.cache);
    let dense = |e: &Expert| adapted_model(&base, e, crate::adapt::dispatch::DENSE).unwrap();
    let own = [
        base.packed().unwrap().clone(),
        dense(&fx.experts[0]),
        dense(&fx.experts[1]),
    ];
    let prompts: [Vec<u32>; 3] = [vec![1, 5, 9], vec![2, 7, 11, 3, 8], vec![4]];
    let adapters = [None, Some(&*s.experts[0]), Some(&*s.experts[1])];
    let mut caches: Vec<Cache> = (0..3).map(|_| s.model.new_cache()).collect();
    let mut seqs = prompts.to_vec();
    for step in 0..2 {
        let inputs: Vec<Vec<u32>> = if step == 0 {
            prompts.to_vec()
        } else {
            seqs.iter().map(|q| vec![*q.last().unwrap()]).collect()
        };
        let rows: Vec<Option<&Adapter>> = (inputs.iter().zip(adapters))
            .flat_map(|(i, a)| std::iter::repeat_n(a, i.len()))
            .collect();
        let deltas = StepRows::new(s.factors.as_deref().unwrap(), rows);
        let mut segments: Vec<Segment> = (inputs.iter().zip(&mut caches))
            .map(|(ids, cache)| Segment { ids, cache })
            .collect();
        let logits = s.model.step_ragged(&mut segments, Some(&deltas)).unwrap();
        for (i, l) in logits.iter().enumerate() {
            let ids = own[i].ids_tensor(&[seqs[i].clone()]).unwrap();
            let want = own[i].next_logits(&ids, None).unwrap();
            let scale = want.iter().fold(0f32, |m, x| m.max(x.abs()));
            let d = max_diff(l, &want);
            assert!(
                d <= 2e-3 * scale.max(1.0),
                "step {step} sequence {i}: {d} (scale {scale})"
            );
        }
        for (q, l) in seqs.iter_mut().zip(&logits) {
            q.push(crate::engine::model::argmax(l) as u32);
        }
    }
}

/// At full rank every expert is served exactly; a lower rank keeps less of the delta.
#[test]
fn adapters_keep_all_their_energy_at_full_rank_only() {
    let fx = fixture();
    let full = served(&fx, None);
    assert!(full
        .experts
        .iter()
        .all(|a| (a.energy_kept - 1.0).abs() < 1e-9));
    let low = served(&fx, Some(4));
    assert!(low
        .experts
        .iter()
        .all(|a| a.energy_kept < 0.999 && a.energy_kept > 0.0));
    assert_eq!(low.factors.as_ref().unwrap().rank, 4);
    // The mixture is served at its handoff rank (8 of 32).
    assert!(full.mixture.as_ref().unwrap().energy_kept < 1.0);
}

// ---- over HTTP ----

fn start(served: Served, config: ServeConfig) -> Server {
    let config = ServeConfig {
        addr: ([127, 0, 0, 1], 0).into(),
        ..config
    };
    spawn(served, config, false).unwrap()
}

/// (status, Retry-After, body) of a request.
fn call(
    server: &Server,
    method: &str,
    path: &str,
    body: Option<&str>,
    key: Option<&str>,
) -> (u16, Option<String>, String) {
    let mut req = ureq::request(method, &format!("http://{}{path}", server.addr))
        .timeout(Duration::from_secs(120));
    if let Some(k) = key {
        req = req.set("Authorization", &format!("Bearer {k}"));
    }
    let r = match body {
        Some(b) => req.set("Content-Type", "application/json").send_string(b),
        None => req.call(),
    };
    match r {
        Ok(resp) | Err(ureq::Error::Status(_, resp)) => (
            resp.status(),
            resp.header("Retry-After").map(str::to_string),
            resp.into_string().unwrap(),
        ),
        Err(e) => panic!("{method} {path}: {e}"),
    }
}

fn post(server: &Server, path: &str, body: Value) -> (u16, Value) {
    let (status, _, text) = call(server, "POST", path, Some(&body.to_string()), None);
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

/// The data lines of a server-sent event stream.
fn sse_data(text: &str) -> Vec<String> {
    text.split("\n\n")
        .filter_map(|e| e.lines().find_map(|l| l.strip_prefix("data: ")))
        .map(str::to_string)
        .collect()
}

/// The first choice of each greedy completion `(model, prompt)`, all sent at once.
fn concurrently(server: &Server, jobs: &[(String, String)]) -> Vec<Value> {
    std::thread::scope(|s| {
        let handles: Vec<_> = (jobs.iter())
            .map(|(m, p)| {
                s.spawn(|| {
                    post(server, "/v1/completions", completion(m, p, 16)).1["choices"][0].clone()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

/// The status and the event data lines of `body` sent to `path` with `"stream": true`.
fn streamed(server: &Server, path: &str, body: &Value) -> (u16, Vec<String>) {
    let mut body = body.clone();
    body["stream"] = json!(true);
    let (status, _, raw) = call(server, "POST", path, Some(&body.to_string()), None);
    (status, sse_data(&raw))
}

/// The JSON chunks of a stream that ended with `[DONE]`.
fn chunks(data: &[String]) -> Vec<Value> {
    assert_eq!(data.last().map(String::as_str), Some("[DONE]"), "{data:?}");
    (data[..data.len() - 1].iter())
        .map(|d| serde_json::from_str(d).unwrap())
        .collect()
}

fn completion(model: &str, prompt: &str, max_tokens: usize) -> Value {
    json!({"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0})
}

#[test]
fn completions_and_chat_by_expert_id_streamed_or_not() {
    let fx = fixture();
    let server = start(served(&fx, None), ServeConfig::default());
    let (status, _, text) = call(&server, "GET", "/v1/models", None, None);
    assert_eq!(status, 200);
    let ids: Vec<String> = serde_json::from_str::<Value>(&text).unwrap()["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        ids,
        [
            "bitsvf/base",
            "bitsvf/auto",
            "bitsvf/a",
            "bitsvf/b",
            "bitsvf/mixture"
        ]
    );
    assert_eq!(call(&server, "GET", "/health", None, None).0, 200);

    let mut texts = Vec::new();
    for (model, adapter) in [
        ("bitsvf/base", "base"),
        ("bitsvf/a", "a"),
        ("bitsvf/b", "b"),
        ("bitsvf/mixture", "mixture"),
    ] {
        let (status, v) = post(
            &server,
            "/v1/completions",
            completion(model, "count a in aab?", 12),
        );
        assert_eq!(status, 200, "{v}");
        assert_eq!(v["object"], "text_completion");
        assert_eq!(v["model"], model);
        assert_eq!(v["bitsvf"]["adapter"], adapter);
        let usage = &v["usage"];
        assert_eq!(usage["prompt_tokens"], "count a in aab?".len() + 1);
        let c = usage["completion_tokens"].as_u64().unwrap();
        assert!((1..=12).contains(&c));
        assert_eq!(usage["total_tokens"].as_u64().unwrap(), c + 16);
        let text = v["choices"][0]["text"].as_str().unwrap().to_string();
        // Streamed, the same text arrives in pieces, then the finish reason and usage.
        let body = completion(model, "count a in aab?", 12);
        let (status, data) = streamed(&server, "/v1/completions", &body);
        assert_eq!(status, 200);
        let chunks = chunks(&data);
        let joined: String = chunks
            .iter()
            .map(|c| c["choices"][0]["text"].as_str().unwrap())
            .collect();
        assert_eq!(joined, text, "{model}");
        let last = chunks.last().unwrap();
        assert_eq!(
            last["choices"][0]["finish_reason"],
            v["choices"][0]["finish_reason"]
        );
        assert_eq!(last["usage"], v["usage"]);
        texts.push(text);
    }
    // The experts change what the model says (random z on every MLP matrix).
    assert!(texts[1] != texts[0] || texts[2] != texts[0], "{texts:?}");

    // Chat: the same answer as a completion of the message, as a message or as deltas.
    let chat = json!({"model": "bitsvf/a", "messages": [{"role": "user", "content": "count a in aab?"}],
        "max_tokens": 12, "temperature": 0});
    let (status, v) = post(&server, "/v1/chat/completions", chat.clone());
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["choices"][0]["message"]["role"], "assistant");
    assert_eq!(v["choices"][0]["message"]["content"], texts[1].as_str());
    let (_, data) = streamed(&server, "/v1/chat/completions", &chat);
    let chunks = chunks(&data);
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    assert!(chunks
        .iter()
        .all(|c| c["object"] == "chat.completion.chunk"));
    let joined: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(joined, texts[1]);

    // A stop string ends the text before it; the reason is "stop".
    if let Some(cut) = texts[1].get(1..3).filter(|s| !s.trim().is_empty()) {
        let mut body = completion("bitsvf/a", "count a in aab?", 12);
        body["stop"] = json!([cut]);
        let (_, v) = post(&server, "/v1/completions", body);
        let t = v["choices"][0]["text"].as_str().unwrap();
        assert_eq!(t, &texts[1][..texts[1].find(cut).unwrap()]);
        assert_eq!(v["choices"][0]["finish_reason"], "stop");
    }
    // Sampling with a seed is reproducible.
    let sampled = json!({"model": "bitsvf/b", "prompt": "sort cab?", "max_tokens": 10,
        "temperature": 1.0, "top_p": 0.9, "seed": 42});
    assert_eq!(
        post(&server, "/v1/completions", sampled.clone()).1["choices"],
        post(&server, "/v1/completions", sampled).1["choices"]
    );
    server.shutdown().unwrap();
}

/// Concurrent requests for different experts, decoded in shared batches, answer what each
/// answers alone.
#[test]
fn concurrent_mixed_expert_requests_answer_as_they_do_alone() {
    let fx = fixture();
    let server = start(served(&fx, None), ServeConfig::default());
    let models = ["bitsvf/base", "bitsvf/a", "bitsvf/b", "bitsvf/mixture"];
    let prompts = [
        "count a in aab?",
        "sort dcba?",
        "12+34=",
        "copy xyz?",
        "rev abc?",
        "par 0110?",
    ];
    let jobs: Vec<(String, String)> = (0..12)
        .map(|i| (models[i % 4].to_string(), prompts[i % 6].to_string()))
        .collect();
    let alone: Vec<Value> = jobs
        .iter()
        .map(|(m, p)| {
            post(&server, "/v1/completions", completion(m, p, 16)).1["choices"][0].clone()
        })
        .collect();
    let together = concurrently(&server, &jobs);
    assert_eq!(together, alone);
    // They did share steps.
    assert!(server_peak(&server) >= 2);
    let (_, _, metrics) = call(&server, "GET", "/metrics", None, None);
    assert!(
        metrics.contains("bitsvf_adapter_requests_total{adapter=\"a\"} 6"),
        "{metrics}"
    );
    assert!(metrics.contains("bitsvf_requests_total{endpoint=\"completions\",status=\"200\"} 24"));
    server.shutdown().unwrap();

    // A step budget of 8 rows admits long prompts one step at a time: same answers.
    let config = ServeConfig {
        max_step_tokens: 8,
        ..ServeConfig::default()
    };
    let server = start(served(&fx, None), config);
    let budgeted = concurrently(&server, &jobs);
    assert_eq!(budgeted, alone);
    server.shutdown().unwrap();
}

fn server_peak(server: &Server) -> u64 {
    let (_, _, m) = call(server, "GET", "/metrics", None, None);
    let line = m
        .lines()
        .find(|l| l.starts_with("bitsvf_batch_size_peak "))
        .unwrap();
    line.split(' ').nth(1).unwrap().parse().unwrap()
}

#[test]
fn auto_dispatches_per_request_and_says_what_it_chose() {
    let fx = fixture();
    let server = start(served(&fx, None), ServeConfig::default());
    for dispatch in ["classifier", "prompt", "none"] {
        let mut body = completion("bitsvf/auto", "count a in aab?", 4);
        body["bitsvf"] = json!({"dispatch": dispatch});
        let (status, v) = post(&server, "/v1/completions", body);
        assert_eq!(status, 200, "{v}");
        assert_eq!(v["bitsvf"]["dispatch"], dispatch);
        let adapter = v["bitsvf"]["adapter"].as_str().unwrap();
        assert!(["a", "b", "base"].contains(&adapter), "{adapter}");
        if dispatch == "none" {
            assert_eq!(adapter, "base");
        }
    }
    // The default strategy is the classifier's.
    let (_, v) = post(
        &server,
        "/v1/completions",
        completion("bitsvf/auto", "sort cba?", 4),
    );
    assert_eq!(v["bitsvf"]["dispatch"], "classifier");
    // CEM fits a mixture on the request's examples (and says whether it kept the base).
    let shots: Vec<Value> = (0..6).map(|i| json!({"prompt": format!("count a in {}?", "ab".repeat(i + 1)), "answer": (i + 1).to_string()})).collect();
    let mut body = completion("bitsvf/auto", "count a in aab?", 4);
    body["bitsvf"] = json!({"dispatch": "cem", "shots": shots});
    let (status, v) = post(&server, "/v1/completions", body);
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["bitsvf"]["dispatch"], "cem");
    assert!(
        v["bitsvf"]["note"].as_str().unwrap().contains("held-out"),
        "{v}"
    );
    let mut body = completion("bitsvf/auto", "count a in aab?", 4);
    body["bitsvf"] = json!({"dispatch": "cem"});
    let (status, v) = post(&server, "/v1/completions", body);
    assert_eq!(status, 400);
    assert!(
        v["error"]["message"].as_str().unwrap().contains("shots"),
        "{v}"
    );
    server.shutdown().unwrap();
}

#[test]
fn bad_requests_get_clear_errors_and_the_server_keeps_serving() {
    let fx = fixture();
    let config = ServeConfig {
        max_tokens: 32,
        max_body: 4096,
        ..ServeConfig::default()
    };
    let server = start(served(&fx, None), config);
    let raw = |body: &str| {
        let (status, _, text) = call(&server, "POST", "/v1/completions", Some(body), None);
        (
            status,
            serde_json::from_str::<Value>(&text).unwrap_or(Value::String(text)),
        )
    };
    let check = |(status, v): (u16, Value), want: u16, param: Option<&str>, words: &str| {
        assert_eq!(status, want, "{v}");
        let msg = v["error"]["message"]
            .as_str()
            .unwrap_or_else(|| panic!("{v}"));
        assert!(msg.contains(words), "{msg}");
        if let Some(p) = param {
            assert_eq!(v["error"]["param"], p, "{v}");
        }
    };
    check(raw("{not json"), 400, None, "not JSON");
    check(raw("[1, 2]"), 400, None, "object");
    check(
        raw(r#"{"model": "bitsvf/a"}"#),
        400,
        Some("prompt"),
        "missing field `prompt`",
    );
    check(raw(r#"{"prompt": "x"}"#), 400, None, "model");
    check(
        raw(r#"{"model": "bitsvf/a", "prompt": "x", "max_tokens": "many"}"#),
        400,
        Some("max_tokens"),
        "max_tokens",
    );
    check(
        raw(r#"{"model": "bitsvf/a", "prompt": 7}"#),
        400,
        Some("prompt"),
        "prompt",
    );
    check(
        raw(r#"{"model": "bitsvf/a", "prompt": "x", "bitsvf": {"shots": [{"prompt": "x"}]}}"#),
        400,
        Some("bitsvf.shots[0]"),
        "answer",
    );
    check(
        raw(r#"{"model": "bitsvf/zzz", "prompt": "x"}"#),
        404,
        Some("model"),
        "bitsvf/zzz",
    );
    check(
        raw(r#"{"model": "bitsvf/a", "prompt": "x", "max_tokens": 33}"#),
        400,
        Some("max_tokens"),
        "1 to 32",
    );
    check(
        raw(r#"{"model": "bitsvf/a", "prompt": "x", "temperature": 3}"#),
        400,
        Some("temperature"),
        "between 0 and 2",
    );
    check(
        raw(r#"{"model": "bitsvf/a", "prompt": "x", "n": 2}"#),
        400,
        Some("n"),
        "`n`",
    );
    check(
        raw(r#"{"model": "bitsvf/a", "prompt": ["x", "y"]}"#),
        400,
        Some("prompt"),
        "2 prompts",
    );
    check(
        raw(r#"{"model": "bitsvf/auto", "prompt": "x", "bitsvf": {"dispatch": "router"}}"#),
        400,
        Some("bitsvf.dispatch"),
        "router",
    );
    // The tiny model's context is 64 positions.
    let long = json!({"model": "bitsvf/a", "prompt": "a".repeat(70)}).to_string();
    check(raw(&long), 400, Some("prompt"), "context holds 64");
    let (status, _, _) = call(
        &server,
        "POST",
        "/v1/completions",
        Some(&format!("{{\"pad\": \"{}\"}}", "x".repeat(5000))),
        None,
    );
    assert_eq!(status, 413);
    let chat = |b: Value| post(&server, "/v1/chat/completions", b);
    check(
        chat(json!({"model": "bitsvf/a", "messages": []})),
        400,
        Some("messages"),
        "empty",
    );
    check(
        chat(json!({"model": "bitsvf/a", "messages": [{"role": "robot", "content": "x"}]})),
        400,
        Some("messages[0].role"),
        "robot",
    );
    check(
        chat(json!({"model": "bitsvf/a", "messages": [{"role": "user"}]})),
        400,
        Some("messages[0]"),
        "content",
    );
    let (status, _, _) = call(&server, "GET", "/v1/nothing", None, None);
    assert_eq!(status, 404);
    // Still serving.
    assert_eq!(
        post(&server, "/v1/completions", completion("bitsvf/a", "x", 2)).0,
        200
    );
    server.shutdown().unwrap();
}

#[test]
fn an_api_key_is_required_when_configured() {
    let fx = fixture();
    let config = ServeConfig {
        api_key: Some("s3cret".into()),
        ..ServeConfig::default()
    };
    let server = start(served(&fx, None), config);
    let body = completion("bitsvf/a", "x", 2).to_string();
    let (status, _, text) = call(&server, "POST", "/v1/completions", Some(&body), None);
    assert_eq!(status, 401, "{text}");
    assert!(text.contains("missing API key"));
    assert_eq!(
        call(
            &server,
            "POST",
            "/v1/completions",
            Some(&body),
            Some("s3creT")
        )
        .0,
        401
    );
    assert_eq!(
        call(&server, "GET", "/v1/models", None, Some("wrong")).0,
        401
    );
    assert_eq!(
        call(
            &server,
            "POST",
            "/v1/completions",
            Some(&body),
            Some("s3cret")
        )
        .0,
        200
    );
    assert_eq!(
        call(&server, "GET", "/v1/models", None, Some("s3cret")).0,
        200
    );
    assert_eq!(call(&server, "GET", "/health", None, None).0, 200);
    server.shutdown().unwrap();
}

/// With a chat template, `/v1/chat/completions` renders the conversation and encodes the text
/// as it is (the template places any BOS); a template that refuses the conversation is a 400
/// naming `messages`.
#[test]
fn chat_requests_are_rendered_with_the_chat_template() {
    use crate::engine::chat::ChatTemplate;
    let source = "{% for m in messages %}{% if m['role'] == 'system' %}\
        {{ raise_exception('no system turns') }}{% endif %}Q: {{ m['content'] }}\n{% endfor %}\
        {% if add_generation_prompt %}A:{% endif %}";
    let template = ChatTemplate::new(source.into(), "test", String::new(), String::new()).unwrap();
    let config = ServeConfig {
        chat_template: Some(template),
        ..ServeConfig::default()
    };
    let server = start(default_served(), config);
    let ask = |messages: Value| {
        let body = json!({"model": "bitsvf/base", "messages": messages, "max_tokens": 4,
            "temperature": 0});
        post(&server, "/v1/chat/completions", body)
    };
    let (status, v) = ask(json!([{"role": "user", "content": "count a in aab?"}]));
    assert_eq!(status, 200, "{v}");
    let rendered = "Q: count a in aab?\nA:";
    assert_eq!(v["usage"]["prompt_tokens"], rendered.len(), "{v}");
    let (status, v) = ask(json!([{"role": "system", "content": "be brief"}]));
    assert_eq!(status, 400, "{v}");
    let msg = v["error"]["message"].as_str().unwrap();
    assert!(msg.contains("no system turns"), "{msg}");
    assert_eq!(v["error"]["param"], "messages");
    server.shutdown().unwrap();
}

/// The embedded default model, base only: long enough decodes to fill a queue.
fn default_served() -> Served {
    let ck = crate::engine::checkpoint::load_default().unwrap();
    Served::base(&ck, Arc::new(ByteTokenizer)).unwrap()
}

#[test]
fn a_full_queue_is_refused_with_429_and_a_late_request_with_504() {
    let config = ServeConfig {
        max_batch: 1,
        max_queue: 1,
        ..ServeConfig::default()
    };
    let server = start(default_served(), config);
    let body = json!({"model": "bitsvf/base", "prompt": "count a in aab?", "max_tokens": 100,
        "temperature": 1.0, "seed": 1, "ignore_eos": true});
    let answers: Vec<(u16, Option<String>, String)> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..16)
            .map(|_| {
                s.spawn(|| {
                    call(
                        &server,
                        "POST",
                        "/v1/completions",
                        Some(&body.to_string()),
                        None,
                    )
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let refused: Vec<_> = answers.iter().filter(|a| a.0 == 429).collect();
    assert!(!refused.is_empty(), "{answers:?}");
    assert!(refused
        .iter()
        .all(|a| a.1.as_deref() == Some("1") && a.2.contains("queue is full")));
    assert!(
        answers.iter().all(|a| a.0 == 200 || a.0 == 429),
        "{answers:?}"
    );
    assert!(answers.iter().any(|a| a.0 == 200));
    server.shutdown().unwrap();

    let config = ServeConfig {
        timeout: Duration::ZERO,
        ..ServeConfig::default()
    };
    let server = start(default_served(), config);
    let (status, _, text) = call(
        &server,
        "POST",
        "/v1/completions",
        Some(&body.to_string()),
        None,
    );
    assert_eq!(status, 504, "{text}");
    let (status, data) = streamed(&server, "/v1/completions", &body);
    assert_eq!(status, 200);
    assert!(data.iter().any(|d| d.contains("timed out")), "{data:?}");
    server.shutdown().unwrap();
}

/// A client that goes away mid-stream is dropped; the server stays healthy. A shutdown
/// finishes the request in flight.
#[test]
fn a_client_killed_mid_stream_leaves_the_server_healthy_and_shutdown_is_graceful() {
    let server = start(default_served(), ServeConfig::default());
    let body = json!({"model": "bitsvf/base", "prompt": "count a in aab?", "max_tokens": 400,
        "temperature": 1.0, "seed": 3, "stream": true, "ignore_eos": true})
    .to_string();
    let mut conn = std::net::TcpStream::connect(server.addr).unwrap();
    write!(
        conn,
        "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut seen = Vec::new();
    let mut buf = [0u8; 1024];
    while !String::from_utf8_lossy(&seen).contains("data: {") {
        let n = conn.read(&mut buf).unwrap();
        assert!(n > 0, "the stream ended early");
        seen.extend_from_slice(&buf[..n]);
    }
    drop(conn);
    let mut cancelled = false;
    for _ in 0..100 {
        let (_, _, m) = call(&server, "GET", "/metrics", None, None);
        if m.contains("bitsvf_cancelled_total 1\n") {
            cancelled = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(cancelled, "the abandoned request was not dropped");
    assert_eq!(call(&server, "GET", "/health", None, None).0, 200);
    assert_eq!(
        post(
            &server,
            "/v1/completions",
            completion("bitsvf/base", "x", 3)
        )
        .0,
        200
    );

    // Shut down while a request runs: it still completes.
    let long = json!({"model": "bitsvf/base", "prompt": "x", "max_tokens": 300, "temperature": 1.0,
        "seed": 5, "ignore_eos": true})
    .to_string();
    let addr = server.addr;
    let client = std::thread::spawn(move || {
        ureq::post(&format!("http://{addr}/v1/completions"))
            .set("Content-Type", "application/json")
            .send_string(&long)
            .map(|r| r.into_string().unwrap())
            .map_err(|e| e.to_string())
    });
    std::thread::sleep(Duration::from_millis(200));
    server.shutdown().unwrap();
    let reply: Value = serde_json::from_str(&client.join().unwrap().unwrap()).unwrap();
    assert!(
        reply["usage"]["completion_tokens"].as_u64().unwrap() > 0,
        "{reply}"
    );
}
