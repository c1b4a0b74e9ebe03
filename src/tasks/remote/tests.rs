//! Tests of `generate_items` against a scripted mock HTTP server on 127.0.0.1: verification,
//! retries and timeouts, the item cache, the budgets and the error messages.

use super::*;
use crate::tasks::Split;

use serde_json::{json, Value};
use std::fs::{self, OpenOptions};
use std::io::Write;
use std::thread;
use std::time::Duration;

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
        body["usage"] = json!({"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": total});
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

fn serve(listener: TcpListener, script: Vec<Reply>, seen: &Mutex<Vec<Seen>>, stop: &AtomicBool) {
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
    let report = generate_items(&config(&mock, dir.path()), Domain::Count, 2, 0, |_| {}).unwrap();
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

/// Two one-item replies of `tokens` tokens each against a request or a token budget: the run
/// stops with a budget error after both, keeps both items cached, and reports (items got,
/// items wanted, requests, tokens) and its message.
fn run_out_of_budget(
    tokens: u64,
    limit: impl Fn(&mut GeneratorConfig),
) -> ((usize, usize, usize, u64), String) {
    let mock = Mock::start(vec![
        completion(&good_lines(0, 1), Some(tokens)),
        completion(&good_lines(1, 1), Some(tokens)),
    ]);
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(&mock, dir.path());
    limit(&mut cfg);
    let error = generate_items(&cfg, Domain::Count, 5, 0, |_| {}).unwrap_err();
    assert_eq!(cache_lines(&cfg, Domain::Count), 2);
    assert_eq!(mock.requests(), 2);
    match &error {
        RemoteError::Budget {
            got,
            wanted,
            requests,
            tokens,
            ..
        } => ((*got, *wanted, *requests, *tokens), error.to_string()),
        other => panic!("expected a budget error, got {other}"),
    }
}

#[test]
fn running_out_of_requests_or_tokens_reports_what_was_obtained() {
    let (counts, message) = run_out_of_budget(10, |cfg| cfg.max_requests = 2);
    assert_eq!(counts, (2, 5, 2, 20));
    for part in ["raise the request or token budget", "`count`"] {
        assert!(message.contains(part), "`{part}` missing from: {message}");
    }
    // 60 tokens spent after two requests of a 50-token budget: no third request.
    let (counts, _) = run_out_of_budget(30, |cfg| cfg.max_tokens = 50);
    assert_eq!(counts, (2, 5, 2, 60));
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
    let error = generate_items(&config(&mock, dir.path()), Domain::Sort, 1, 0, |_| {}).unwrap_err();
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
    let error = generate_items(&config(&mock, dir.path()), Domain::Sort, 2, 0, |_| {}).unwrap_err();
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
