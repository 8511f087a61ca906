//! Admission (issue #15) on a real `kvgate serve` over HTTP: with `--active-decode-blocks-threshold
//! 0` a worker is busy while it holds any request, so the fleet's capacity is its worker count and
//! everything past it queues (one shard, so one queue), or is refused 503 with Retry-After.
//! Timing bounds are generous: the box is a busy 2-core CI runner.

mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

/// Slow mocker workers (real-time steps), one at a time each, one shard.
fn admission_server(workers: &str, queued: &str, timeout_s: &str) -> kvgate::serve::Server {
    serve(&[
        "--workers",
        workers,
        "--shards",
        "1",
        "--speedup-ratio",
        "1",
        "--active-decode-blocks-threshold",
        "0",
        "--max-queued-requests",
        queued,
        "--queue-timeout-s",
        timeout_s,
    ])
}

fn completion(max_tokens: u32, stream: bool, priority: Option<i64>) -> Value {
    let mut b = json!({"model": "kvgate-mock", "prompt": "Admission control keeps the fleet busy but not drowning",
        "max_tokens": max_tokens, "ignore_eos": true, "stream": stream});
    if let Some(p) = priority {
        b["priority"] = json!(p);
    }
    b
}

/// The sum of every series of `name` (labelled or not).
async fn metric_sum(c: &reqwest::Client, base: &str, name: &str) -> f64 {
    let text = c.get(format!("{base}/metrics")).send().await.unwrap().text().await.unwrap();
    text.lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with([' ', '{']))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Waits until `name` sums to `want` (panics after 20 s).
async fn await_metric(c: &reqwest::Client, base: &str, name: &str, want: f64) {
    let until = Instant::now() + Duration::from_secs(20);
    loop {
        let v = metric_sum(c, base, name).await;
        if v == want {
            return;
        }
        assert!(Instant::now() < until, "{name} stayed {v}, expected {want}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// This process's resident memory (server and clients), KiB.
fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap_or("VmRSS: 0 kB");
    line.split_whitespace().nth(1).and_then(|v| v.parse().ok()).unwrap_or(0)
}

/// A streaming request's status, Retry-After, and time to its first body chunk.
async fn one_stream(c: &reqwest::Client, base: &str) -> (u16, Option<String>, Duration) {
    let start = Instant::now();
    let mut r = c.post(format!("{base}/v1/completions")).json(&completion(8, true, None)).send().await.unwrap();
    let status = r.status().as_u16();
    let retry = r.headers().get("retry-after").map(|v| v.to_str().unwrap().to_string());
    if status != 200 {
        let v: Value = r.json().await.unwrap();
        assert_openai_error(&v);
        return (status, retry, start.elapsed());
    }
    let first = r.chunk().await.unwrap();
    let ttft = start.elapsed();
    assert!(first.is_some());
    while r.chunk().await.unwrap().is_some() {}
    (status, retry, ttft)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overload_is_served_or_refused_with_retry_after() {
    let s = admission_server("2", "6", "2");
    let base = base_url(&s);
    let c = reqwest::Client::new();
    // 10× the fleet's capacity (2 requests at a time), offered for 3 s, each client back to back.
    let offered_for = Duration::from_secs(3);
    let started = Instant::now();
    let rss_before = rss_kib();
    let mut clients = Vec::new();
    for _ in 0..20 {
        let (c, base) = (c.clone(), base.clone());
        clients.push(tokio::spawn(async move {
            let mut seen = Vec::new();
            while started.elapsed() < offered_for {
                seen.push(one_stream(&c, &base).await);
            }
            seen
        }));
    }
    let mut results = Vec::new();
    for h in clients {
        let r = tokio::time::timeout(Duration::from_secs(60), h).await.expect("no request hangs").unwrap();
        results.extend(r);
    }
    let served: Vec<_> = results.iter().filter(|r| r.0 == 200).collect();
    let refused: Vec<_> = results.iter().filter(|r| r.0 != 200).collect();
    for (status, retry, _) in &refused {
        assert!(*status == 503 || *status == 429, "status {status}");
        assert!(retry.is_some(), "a refusal says when to retry");
    }
    assert!(!served.is_empty() && !refused.is_empty(), "{} served, {} refused", served.len(), refused.len());
    // Served requests waited at most the queue timeout, plus their own prefill.
    let worst = served.iter().map(|r| r.2).max().unwrap();
    assert!(worst < Duration::from_secs(8), "TTFT of a served request {worst:?}");
    await_metric(&c, &base, "kvgate_queue_depth", 0.0).await;
    await_metric(&c, &base, "kvgate_worker_active_requests", 0.0).await;
    let rejected = metric_sum(&c, &base, "kvgate_queue_rejected_total").await;
    assert_eq!(rejected as usize, refused.len(), "every refusal is counted");
    assert!(metric_sum(&c, &base, "kvgate_queue_wait_seconds_count").await > 0.0);
    let rss_after = rss_kib();
    eprintln!(
        "overload: {} served, {} refused, worst TTFT {worst:?}, RSS {rss_before} -> {rss_after} KiB",
        served.len(),
        refused.len()
    );
    assert!(rss_after < rss_before + 256 * 1024, "memory stays bounded: {rss_before} -> {rss_after} KiB");
    // Still serving after the burst.
    assert_eq!(one_stream(&c, &base).await.0, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disconnects_while_queued_and_streaming_leave_nothing_booked() {
    let s = admission_server("1", "16", "30");
    let base = base_url(&s);
    let c = reqwest::Client::new();
    // A long stream holds the only worker.
    let mut long = c.post(format!("{base}/v1/completions")).json(&completion(2000, true, None)).send().await.unwrap();
    assert_eq!(long.status(), 200);
    long.chunk().await.unwrap();
    // Four clients queue behind it, then go away.
    let mut queued = Vec::new();
    for stream in [false, true, false, true] {
        let (c, base) = (c.clone(), base.clone());
        queued.push(tokio::spawn(async move {
            c.post(format!("{base}/v1/completions")).json(&completion(4, stream, None)).send().await
        }));
    }
    await_metric(&c, &base, "kvgate_queue_depth", 4.0).await;
    queued.iter().for_each(|h| h.abort());
    await_metric(&c, &base, "kvgate_queue_depth", 0.0).await;
    assert_eq!(metric_sum(&c, &base, "kvgate_worker_active_requests").await, 1.0, "the long stream still runs");
    // The streaming client goes away too: its booking is released.
    drop(long);
    await_metric(&c, &base, "kvgate_worker_active_requests", 0.0).await;
    await_metric(&c, &base, "kvgate_worker_active_decode_blocks", 0.0).await;
    assert_eq!(one_stream(&c, &base).await.0, 200, "the worker is free again");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lower_priority_value_is_admitted_first() {
    let s = admission_server("1", "16", "60");
    let base = base_url(&s);
    let c = reqwest::Client::new();
    let mut long = c.post(format!("{base}/v1/completions")).json(&completion(2000, true, None)).send().await.unwrap();
    assert_eq!(long.status(), 200);
    long.chunk().await.unwrap();
    // Arrival order: late (10), default (0), urgent (-5); admission order must be urgent, default, late.
    let mut handles = Vec::new();
    for (i, p) in [Some(10), None, Some(-5)].into_iter().enumerate() {
        let (c2, base2) = (c.clone(), base.clone());
        handles.push(tokio::spawn(async move {
            let r = c2.post(format!("{base2}/v1/completions")).json(&completion(3, false, p)).send().await.unwrap();
            assert_eq!(r.status(), 200);
            r.bytes().await.unwrap();
            Instant::now()
        }));
        await_metric(&c, &base, "kvgate_queue_depth", (i + 1) as f64).await;
    }
    drop(long);
    let mut done = Vec::new();
    for h in handles {
        done.push(tokio::time::timeout(Duration::from_secs(60), h).await.expect("served").unwrap());
    }
    let (late, default, urgent) = (done[0], done[1], done[2]);
    assert!(urgent < default && default < late, "admitted by priority, then arrival");
    await_metric(&c, &base, "kvgate_queue_depth", 0.0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_refuses_at_once_in_openai_shape() {
    let s = admission_server("1", "1", "30");
    let base = base_url(&s);
    let c = reqwest::Client::new();
    let mut long = c.post(format!("{base}/v1/completions")).json(&completion(2000, true, None)).send().await.unwrap();
    long.chunk().await.unwrap();
    let (c2, base2) = (c.clone(), base.clone());
    let waiting = tokio::spawn(async move {
        c2.post(format!("{base2}/v1/chat/completions"))
            .json(&json!({"model": "kvgate-mock", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "priority": 1}))
            .send()
            .await
            .unwrap()
            .status()
    });
    await_metric(&c, &base, "kvgate_queue_depth", 1.0).await;
    let r = c.post(format!("{base}/v1/completions")).json(&completion(2, false, None)).send().await.unwrap();
    assert_eq!(r.status(), 503);
    assert_eq!(r.headers()["retry-after"], "1");
    let v: Value = r.json().await.unwrap();
    assert_openai_error(&v);
    assert!(v["error"]["message"].as_str().unwrap().contains("queue is full"), "{v}");
    let text = c.get(format!("{base}/metrics")).send().await.unwrap().text().await.unwrap();
    assert!(text.contains("kvgate_queue_rejected_total{reason=\"full\"} 1"), "{text}");
    drop(long);
    assert_eq!(tokio::time::timeout(Duration::from_secs(30), waiting).await.unwrap().unwrap(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_wait_is_refused_with_retry_after() {
    let s = admission_server("1", "4", "0.5");
    let base = base_url(&s);
    let c = reqwest::Client::new();
    let mut long = c.post(format!("{base}/v1/completions")).json(&completion(2000, true, None)).send().await.unwrap();
    long.chunk().await.unwrap();
    let start = Instant::now();
    let r = c.post(format!("{base}/v1/completions")).json(&completion(2, true, None)).send().await.unwrap();
    let waited = start.elapsed();
    assert_eq!(r.status(), 503);
    assert_eq!(r.headers()["retry-after"], "1");
    assert!(waited >= Duration::from_millis(450) && waited < Duration::from_secs(10), "{waited:?}");
    let v: Value = r.json().await.unwrap();
    assert!(v["error"]["message"].as_str().unwrap().contains("--queue-timeout-s"), "{v}");
    let text = c.get(format!("{base}/metrics")).send().await.unwrap().text().await.unwrap();
    assert!(text.contains("kvgate_queue_rejected_total{reason=\"timeout\"} 1"), "{text}");
    assert_eq!(metric_sum(&c, &base, "kvgate_queue_depth").await, 0.0);
    drop(long);
}
