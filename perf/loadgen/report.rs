//! Aggregates per-request records into the run's summary: percentiles, throughput, KV hit
//! rate, errors, CPU per request; renders it as a table and as JSON.
//!
//! Concurrency: none (runs once, after the load).

use std::collections::BTreeMap;

use serde::Serialize;

use crate::cpu::ServerCpu;
use crate::driver::{Record, Results};

/// A distribution's summary (nearest-rank percentiles).
#[derive(Debug, Clone, Default, Serialize)]
pub struct Dist {
    pub count: usize,
    pub mean: f64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub max: f64,
}

impl Dist {
    pub fn of(mut v: Vec<f64>) -> Self {
        v.retain(|x| x.is_finite());
        if v.is_empty() {
            return Self::default();
        }
        v.sort_by(f64::total_cmp);
        let pct = |p: f64| v[((p / 100.0 * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1];
        Self {
            count: v.len(),
            mean: v.iter().sum::<f64>() / v.len() as f64,
            p50: pct(50.0),
            p90: pct(90.0),
            p99: pct(99.0),
            max: v[v.len() - 1],
        }
    }
}

/// CPU seconds over the run, and per request sent. "Frontend" is the server process minus its
/// simulated engines (threads named `*engine*`), when it runs them in-process.
#[derive(Debug, Clone, Serialize)]
pub struct Cpu {
    pub loadgen_cpu_s: f64,
    pub loadgen_cpu_us_per_request: f64,
    pub server_pid: Option<u32>,
    pub server_cpu_s: Option<f64>,
    pub server_cpu_us_per_request: Option<f64>,
    pub server_cpu_by_thread_s: BTreeMap<String, f64>,
    pub frontend_cpu_s: Option<f64>,
    pub frontend_cpu_us_per_request: Option<f64>,
    /// loadgen CPU / server CPU.
    pub loadgen_to_server_cpu_ratio: Option<f64>,
    /// loadgen CPU / frontend CPU.
    pub loadgen_to_frontend_cpu_ratio: Option<f64>,
}

impl Cpu {
    pub fn new(loadgen_cpu_s: f64, server_pid: Option<u32>, server: Option<ServerCpu>, requests: usize) -> Self {
        let per_req = |s: f64| s * 1e6 / requests.max(1) as f64;
        let ratio = |s: f64| (s > 0.0).then(|| loadgen_cpu_s / s);
        let by_thread: BTreeMap<String, f64> = server
            .as_ref()
            .map(|s| s.by_thread.iter().map(|(k, v)| (k.clone(), v.as_secs_f64())).collect())
            .unwrap_or_default();
        let server_cpu_s = server.map(|s| s.total.as_secs_f64());
        let engine_s: f64 = by_thread.iter().filter(|(k, _)| k.contains("engine")).map(|(_, v)| v).sum();
        let frontend_cpu_s = server_cpu_s.map(|s| (s - engine_s).max(0.0));
        Self {
            loadgen_cpu_s,
            loadgen_cpu_us_per_request: per_req(loadgen_cpu_s),
            server_pid,
            server_cpu_s,
            server_cpu_us_per_request: server_cpu_s.map(per_req),
            server_cpu_by_thread_s: by_thread,
            frontend_cpu_s,
            frontend_cpu_us_per_request: frontend_cpu_s.map(per_req),
            loadgen_to_server_cpu_ratio: server_cpu_s.and_then(ratio),
            loadgen_to_frontend_cpu_ratio: frontend_cpu_s.and_then(ratio),
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub label: Option<String>,
    pub command: String,
    pub requests: usize,
    pub ok: usize,
    pub errors: BTreeMap<String, usize>,
    pub duration_s: f64,
    pub request_throughput_per_s: f64,
    pub output_token_throughput_per_s: f64,
    pub prompt_token_throughput_per_s: f64,
    pub prompt_tokens: u64,
    pub cached_tokens: u64,
    pub output_tokens: u64,
    /// cached_tokens / prompt_tokens over successful requests.
    pub kv_hit_rate: f64,
    pub ttft_ms: Dist,
    /// Every gap between two streamed tokens.
    pub itl_ms: Dist,
    /// Per request: (last token − first token) / (output tokens − 1).
    pub tpot_ms: Dist,
    pub e2e_ms: Dist,
    pub output_tokens_per_request: Dist,
    /// Open loop: how late requests were sent against their schedule (the generator keeping up).
    pub schedule_lag_ms: Dist,
    pub itl_samples_dropped: u64,
    pub requests_per_worker: BTreeMap<String, usize>,
    pub cpu: Cpu,
}

pub fn summarize(label: Option<String>, res: &Results, duration_s: f64, cpu: Cpu) -> Summary {
    let ok: Vec<&Record> = res.records.iter().filter(|r| r.error.is_none()).collect();
    let mut errors = BTreeMap::new();
    for e in res.records.iter().filter_map(|r| r.error.as_ref()) {
        *errors.entry(e.clone()).or_insert(0) += 1;
    }
    let mut per_worker = BTreeMap::new();
    for w in ok.iter().filter_map(|r| r.worker.as_ref()) {
        *per_worker.entry(w.clone()).or_insert(0) += 1;
    }
    let sum = |f: fn(&Record) -> u32| ok.iter().map(|r| u64::from(f(r))).sum::<u64>();
    let (prompt, cached, output) = (sum(|r| r.prompt_tokens), sum(|r| r.cached_tokens), sum(|r| r.output_tokens));
    let per_s = |x: f64| {
        if duration_s > 0.0 {
            x / duration_s
        } else {
            0.0
        }
    };
    Summary {
        label,
        command: std::env::args().collect::<Vec<_>>().join(" "),
        requests: res.records.len(),
        ok: ok.len(),
        errors,
        duration_s,
        request_throughput_per_s: per_s(ok.len() as f64),
        output_token_throughput_per_s: per_s(output as f64),
        prompt_token_throughput_per_s: per_s(prompt as f64),
        prompt_tokens: prompt,
        cached_tokens: cached,
        output_tokens: output,
        kv_hit_rate: if prompt > 0 { cached as f64 / prompt as f64 } else { 0.0 },
        ttft_ms: Dist::of(ok.iter().filter_map(|r| r.ttft_ms).collect()),
        itl_ms: Dist::of(res.itl_ms.iter().map(|&x| f64::from(x)).collect()),
        tpot_ms: Dist::of(ok.iter().filter_map(|r| r.tpot_ms).collect()),
        e2e_ms: Dist::of(ok.iter().map(|r| r.e2e_ms).collect()),
        output_tokens_per_request: Dist::of(ok.iter().map(|r| f64::from(r.output_tokens)).collect()),
        schedule_lag_ms: Dist::of(res.records.iter().filter_map(|r| r.schedule_lag_ms).collect()),
        itl_samples_dropped: res.itl_dropped,
        requests_per_worker: per_worker,
        cpu,
    }
}

/// The human-readable table.
pub fn table(s: &Summary) -> String {
    let mut t = String::new();
    let mut line = |k: &str, v: String| t.push_str(&format!("{k:<30} {v}\n"));
    if let Some(l) = &s.label {
        line("label", l.clone());
    }
    line("requests (ok / sent)", format!("{} / {}", s.ok, s.requests));
    if !s.errors.is_empty() {
        line("errors", format!("{:?}", s.errors));
    }
    line("duration", format!("{:.1} s", s.duration_s));
    line("request throughput", format!("{:.2} req/s", s.request_throughput_per_s));
    line("output token throughput", format!("{:.0} tok/s", s.output_token_throughput_per_s));
    line("prompt token throughput", format!("{:.0} tok/s", s.prompt_token_throughput_per_s));
    line(
        "KV hit rate (cached/prompt)",
        format!("{:.1} %  ({} / {})", s.kv_hit_rate * 100.0, s.cached_tokens, s.prompt_tokens),
    );
    t.push_str(&format!("{:<30} {:>9} {:>9} {:>9} {:>9} {:>9}\n", "", "mean", "p50", "p90", "p99", "max"));
    let mut dist = |k: &str, d: &Dist| {
        t.push_str(&format!("{k:<30} {:>9.2} {:>9.2} {:>9.2} {:>9.2} {:>9.2}\n", d.mean, d.p50, d.p90, d.p99, d.max))
    };
    dist("TTFT (ms)", &s.ttft_ms);
    dist("inter-token latency (ms)", &s.itl_ms);
    dist("time per output token (ms)", &s.tpot_ms);
    dist("end-to-end latency (ms)", &s.e2e_ms);
    dist("output tokens", &s.output_tokens_per_request);
    if s.schedule_lag_ms.count > 0 {
        dist("schedule lag (ms)", &s.schedule_lag_ms);
    }
    let c = &s.cpu;
    let cpu = |secs: f64, per_req: f64| format!("{secs:.2} s ({per_req:.0} us/req)");
    t.push_str(&format!("{:<30} {}\n", "CPU loadgen", cpu(c.loadgen_cpu_s, c.loadgen_cpu_us_per_request)));
    if let (Some(sv), Some(per)) = (c.server_cpu_s, c.server_cpu_us_per_request) {
        let ratio = c.loadgen_to_server_cpu_ratio.unwrap_or(0.0) * 100.0;
        t.push_str(&format!("{:<30} {}, loadgen/server {ratio:.1} %\n", "CPU server", cpu(sv, per)));
        let threads: Vec<String> = c.server_cpu_by_thread_s.iter().map(|(k, v)| format!("{k} {v:.2}")).collect();
        t.push_str(&format!("{:<30} {}\n", "CPU server by thread (s)", threads.join(", ")));
    }
    if let (Some(fe), Some(per)) = (c.frontend_cpu_s, c.frontend_cpu_us_per_request) {
        let ratio = c.loadgen_to_frontend_cpu_ratio.unwrap_or(0.0) * 100.0;
        t.push_str(&format!("{:<30} {}, loadgen/frontend {ratio:.1} %\n", "CPU frontend (w/o engines)", cpu(fe, per)));
    }
    if !s.requests_per_worker.is_empty() {
        let counts: Vec<String> = s.requests_per_worker.values().map(|n| n.to_string()).collect();
        t.push_str(&format!("{:<30} {}\n", "requests per worker", counts.join(" ")));
    }
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let d = Dist::of((1..=100).map(f64::from).collect());
        assert_eq!((d.p50, d.p90, d.p99, d.max), (50.0, 90.0, 99.0, 100.0));
        assert_eq!(Dist::of(vec![7.0]).p99, 7.0);
        assert_eq!(Dist::of(vec![]).count, 0);
    }
}
