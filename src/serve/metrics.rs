//! The server's counters, rendered as Prometheus text at `GET /metrics`.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::Mutex;
use std::time::Duration;

/// Upper bounds (seconds) of the latency histograms' buckets.
const BUCKETS: [f64; 12] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// A Prometheus histogram.
#[derive(Debug, Default, Clone)]
struct Histogram {
    counts: [u64; BUCKETS.len()],
    count: u64,
    sum: f64,
}

impl Histogram {
    fn observe(&mut self, seconds: f64) {
        for (c, &b) in self.counts.iter_mut().zip(&BUCKETS) {
            if seconds <= b {
                *c += 1;
            }
        }
        self.count += 1;
        self.sum += seconds;
    }

    fn render(&self, out: &mut String, name: &str, labels: &str) {
        let sep = if labels.is_empty() { "" } else { "," };
        for (c, b) in self.counts.iter().zip(BUCKETS) {
            let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"{b}\"}} {c}");
        }
        let _ = writeln!(
            out,
            "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {}",
            self.count
        );
        let braces = if labels.is_empty() {
            String::new()
        } else {
            format!("{{{labels}}}")
        };
        let _ = writeln!(out, "{name}_sum{braces} {}", self.sum);
        let _ = writeln!(out, "{name}_count{braces} {}", self.count);
    }
}

/// Everything `/metrics` reports.
#[derive(Debug, Default)]
pub struct Metrics {
    queued: AtomicUsize,
    batch: AtomicUsize,
    peak: AtomicUsize,
    tokens: AtomicU64,
    step_tokens: AtomicU64,
    cancelled: AtomicU64,
    timed_out: AtomicU64,
    /// (endpoint, status) → count.
    requests: Mutex<BTreeMap<(String, u16), u64>>,
    /// adapter → requests.
    adapters: Mutex<BTreeMap<String, u64>>,
    prompt_tokens: AtomicU64,
    latency: Mutex<BTreeMap<String, Histogram>>,
    first_token: Mutex<Histogram>,
    steps: Mutex<Histogram>,
}

impl Metrics {
    /// A request entered the queue.
    pub fn enqueued(&self) {
        self.queued.fetch_add(1, Relaxed);
    }
    /// A request left the queue (admitted, or found abandoned).
    pub fn dequeued(&self) {
        let _ = self
            .queued
            .fetch_update(Relaxed, Relaxed, |q| Some(q.saturating_sub(1)));
    }
    /// Requests waiting.
    pub fn queue_depth(&self) -> usize {
        self.queued.load(Relaxed)
    }
    /// Sequences in the current batch.
    pub fn set_batch(&self, n: usize) {
        self.batch.store(n, Relaxed);
        self.peak.fetch_max(n, Relaxed);
    }
    /// A token was generated.
    pub fn token(&self) {
        self.tokens.fetch_add(1, Relaxed);
    }
    /// A request was dropped because its client went away.
    pub fn cancelled(&self) {
        self.cancelled.fetch_add(1, Relaxed);
    }
    /// A request ran past its deadline.
    pub fn timed_out(&self) {
        self.timed_out.fetch_add(1, Relaxed);
    }
    /// A step ran `tokens` rows in `took`.
    pub fn step(&self, tokens: usize, took: Duration) {
        self.step_tokens.fetch_add(tokens as u64, Relaxed);
        lock(&self.steps).observe(took.as_secs_f64());
    }
    /// A request to `endpoint` ended with `status` after `took`.
    pub fn request(&self, endpoint: &str, status: u16, took: Duration) {
        *lock(&self.requests)
            .entry((endpoint.to_string(), status))
            .or_default() += 1;
        (lock(&self.latency).entry(endpoint.to_string()).or_default()).observe(took.as_secs_f64());
    }
    /// A request was admitted with `prompt_tokens` tokens to run on `adapter`.
    pub fn admitted(&self, adapter: &str, prompt_tokens: usize) {
        *lock(&self.adapters).entry(adapter.to_string()).or_default() += 1;
        self.prompt_tokens.fetch_add(prompt_tokens as u64, Relaxed);
    }
    /// Time to a request's first token.
    pub fn first_token(&self, took: Duration) {
        lock(&self.first_token).observe(took.as_secs_f64());
    }

    /// Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let name = "bitsvf_requests_total";
        let _ = writeln!(
            out,
            "# HELP {name} HTTP requests by endpoint and status.\n# TYPE {name} counter"
        );
        for ((e, s), n) in lock(&self.requests).iter() {
            let _ = writeln!(
                out,
                "bitsvf_requests_total{{endpoint=\"{e}\",status=\"{s}\"}} {n}"
            );
        }
        let simple = [
            (
                "bitsvf_prompt_tokens_total",
                "counter",
                "Prompt tokens admitted.",
                self.prompt_tokens.load(Relaxed),
            ),
            (
                "bitsvf_completion_tokens_total",
                "counter",
                "Tokens generated.",
                self.tokens.load(Relaxed),
            ),
            (
                "bitsvf_step_rows_total",
                "counter",
                "Rows run through the model by decode steps.",
                self.step_tokens.load(Relaxed),
            ),
            (
                "bitsvf_cancelled_total",
                "counter",
                "Requests dropped because the client went away.",
                self.cancelled.load(Relaxed),
            ),
            (
                "bitsvf_timeouts_total",
                "counter",
                "Requests that ran past their deadline.",
                self.timed_out.load(Relaxed),
            ),
            (
                "bitsvf_queue_depth",
                "gauge",
                "Requests waiting for a place in the batch.",
                self.queued.load(Relaxed) as u64,
            ),
            (
                "bitsvf_batch_size",
                "gauge",
                "Sequences in the current decode batch.",
                self.batch.load(Relaxed) as u64,
            ),
            (
                "bitsvf_batch_size_peak",
                "gauge",
                "Most sequences decoded together since the start.",
                self.peak.load(Relaxed) as u64,
            ),
        ];
        for (name, kind, help, v) in simple {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}"
            );
        }
        let name = "bitsvf_adapter_requests_total";
        let _ = writeln!(
            out,
            "# HELP {name} Requests by the adapter that served them.\n# TYPE {name} counter"
        );
        for (a, n) in lock(&self.adapters).iter() {
            let _ = writeln!(
                out,
                "{name}{{adapter=\"{}\"}} {n}",
                a.replace(['"', '\\', '\n'], "_")
            );
        }
        let name = "bitsvf_request_seconds";
        let _ = writeln!(
            out,
            "# HELP {name} Request latency by endpoint.\n# TYPE {name} histogram"
        );
        for (e, h) in lock(&self.latency).iter() {
            h.render(&mut out, name, &format!("endpoint=\"{e}\""));
        }
        let name = "bitsvf_first_token_seconds";
        let _ = writeln!(
            out,
            "# HELP {name} Time from admission to the first token.\n# TYPE {name} histogram"
        );
        lock(&self.first_token).render(&mut out, name, "");
        let name = "bitsvf_step_seconds";
        let _ = writeln!(
            out,
            "# HELP {name} Duration of one batched decode step.\n# TYPE {name} histogram"
        );
        lock(&self.steps).render(&mut out, name, "");
        out
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_prometheus_text() {
        let m = Metrics::default();
        m.request("completions", 200, Duration::from_millis(30));
        m.request("completions", 429, Duration::from_millis(1));
        m.admitted("count", 7);
        m.token();
        let text = m.render();
        assert!(
            text.contains("bitsvf_requests_total{endpoint=\"completions\",status=\"200\"} 1"),
            "{text}"
        );
        assert!(text.contains("bitsvf_adapter_requests_total{adapter=\"count\"} 1"));
        assert!(
            text.contains("bitsvf_request_seconds_bucket{endpoint=\"completions\",le=\"0.05\"} 2")
        );
        assert!(
            text.contains("bitsvf_request_seconds_bucket{endpoint=\"completions\",le=\"0.025\"} 1")
        );
        assert!(text.contains("bitsvf_prompt_tokens_total 7"));
        assert!(text.contains("bitsvf_completion_tokens_total 1"));
        // Every sample line belongs to a declared family.
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let name = line.split(['{', ' ']).next().unwrap();
            let family = name
                .trim_end_matches("_bucket")
                .trim_end_matches("_sum")
                .trim_end_matches("_count");
            assert!(text.contains(&format!("# TYPE {family} ")), "{line}");
        }
    }
}
