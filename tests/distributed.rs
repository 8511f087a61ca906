//! The distributed deployment end to end, every part its own process: a real etcd and
//! nats-server (tests/support), `kvgate frontend` and several `kvgate worker`s, all on free
//! loopback ports, driven over HTTP like a client would.
//!
//! What is checked: requests through the frontend (both response kinds, real tokenizer); etcd's
//! worker listing; KV-aware routing fed by NATS events; a worker killed mid-stream (the stream
//! migrates and completes, its key leaves with its lease, later requests go elsewhere); NATS and
//! etcd restarted under load (no request fails, routing recovers); approximate mode (workers
//! without events, or a frontend ignoring them).
//!
//! Each test runs its own cluster. Workers run the mocker fast (`--speedup-ratio 100`) except
//! where a test needs a stream that lasts, and use `--lease-ttl 2`; tests other than the first
//! serve the built-in mock model, whose tokenizer loads instantly.

mod common;
mod support;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use etcd_client::{Client as EtcdClient, GetOptions};
use serde_json::{json, Value};
use support::{kvgate_command, Etcd, FrontendProc, KvgateProc, Nats, WorkerProc};

/// Lease TTL of every test worker: a killed worker leaves discovery within this.
const LEASE_TTL: Duration = Duration::from_secs(2);
/// Slack on top of the TTL: etcd checks for expired leases every 500 ms.
const LEASE_SLACK: Duration = Duration::from_millis(1000);
/// Longest any one request may take; nothing here should come near it.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a started frontend may take to list its workers in `/health`.
const READY_TIMEOUT: Duration = Duration::from_secs(10);
/// How long routing may take to recover after a restart ("within seconds").
const RECOVERY_TIMEOUT: Duration = Duration::from_secs(10);
/// A system prompt of ~19 blocks (byte-level mock tokenizer), so a shared prefix is long.
const LONG_PREFIX: &str = "You are the operations assistant of a regional rail company. Answer \
    briefly, quote the timetable section you rely on, never guess platform numbers, and say so \
    plainly when a connection is not guaranteed. Delays over ten minutes must be reported.";

/// etcd + NATS + frontend + workers; dropped frontend first, etcd last.
struct Cluster {
    frontend: FrontendProc,
    workers: Vec<WorkerProc>,
    nats: Nats,
    etcd: Etcd,
}

impl Cluster {
    /// Starts `n` workers with `worker_args` and a frontend that waits for all of them.
    fn start(n: usize, worker_args: &[&str], frontend_args: &[&str]) -> Self {
        let etcd = Etcd::start();
        let nats = Nats::start();
        let (etcd_url, nats_url) = (etcd.endpoint(), nats.url());
        let ttl = LEASE_TTL.as_secs().to_string();
        let procs: Vec<KvgateProc> = (0..n)
            .map(|i| {
                let mut args = vec!["worker", "--etcd-endpoints", &etcd_url, "--nats-server", &nats_url];
                args.extend(["--advertise-host", "127.0.0.1", "--lease-ttl", &ttl]);
                args.extend_from_slice(worker_args);
                KvgateProc::spawn(format!("worker {i}"), kvgate_command(&args))
            })
            .collect();
        let min = n.to_string();
        let mut args = vec!["frontend", "--http-host", "127.0.0.1", "--http-port", "0"];
        args.extend(["--etcd-endpoints", &etcd_url, "--nats-server", &nats_url]);
        args.extend(["--router-min-initial-workers", &min]);
        args.extend_from_slice(frontend_args);
        let mut cmd = kvgate_command(&args);
        cmd.env("DYN_LOG", "debug");
        let frontend = KvgateProc::spawn("frontend", cmd);
        let workers = procs.into_iter().map(WorkerProc::ready).collect();
        let frontend = FrontendProc::ready(frontend);
        // Ready means routable: `/health` lists every worker.
        frontend.wait_workers(n, READY_TIMEOUT);
        Self { frontend, workers, nats, etcd }
    }

    /// A cluster serving the built-in mock model with fast workers.
    fn mock(n: usize) -> Self {
        Self::start(n, &["--speedup-ratio", "100"], &[])
    }

    fn base(&self) -> &str {
        &self.frontend.base
    }

    fn worker_ids(&self) -> Vec<String> {
        self.workers.iter().map(|w| w.id.clone()).collect()
    }
}

fn http() -> reqwest::Client {
    reqwest::Client::builder().timeout(REQUEST_TIMEOUT).build().unwrap()
}

/// A response: status, the `x-kvgate-worker` header, the JSON body.
struct Reply {
    status: u16,
    worker: String,
    body: Value,
}

impl Reply {
    fn cached_tokens(&self) -> u64 {
        self.body["usage"]["prompt_tokens_details"]["cached_tokens"].as_u64().unwrap_or(0)
    }

    fn prompt_tokens(&self) -> u64 {
        self.body["usage"]["prompt_tokens"].as_u64().unwrap()
    }
}

async fn post(c: &reqwest::Client, base: &str, path: &str, body: &Value) -> Result<Reply, String> {
    let r = c.post(format!("{base}{path}")).json(body).send().await.map_err(|e| format!("{e:?}"))?;
    let status = r.status().as_u16();
    let worker = r.headers().get("x-kvgate-worker").and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
    let text = r.text().await.map_err(|e| format!("{e:?}"))?;
    let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
    Ok(Reply { status, worker, body })
}

/// A non-streaming chat completion that must succeed.
async fn chat(c: &reqwest::Client, base: &str, model: &str, messages: Value, max_tokens: u32) -> Reply {
    let body = json!({"model": model, "messages": messages, "max_tokens": max_tokens});
    let r = post(c, base, "/v1/chat/completions", &body).await.unwrap();
    assert_eq!(r.status, 200, "chat completion failed: {}", r.body);
    r
}

/// Waits until the frontend's KV index holds at least `n` block-holder pairs.
async fn wait_index(c: &reqwest::Client, base: &str, n: u64, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        let have = common::metric(c, base, "kvgate_kv_index_entries").await as u64;
        if have >= n {
            return;
        }
        assert!(Instant::now() < deadline, "the KV index has {have} entries, not {n}, after {timeout:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The worker ids under `/dynamo/workers/`, as `etcdctl get --prefix /dynamo/workers/` lists them.
async fn etcd_worker_ids(endpoint: &str) -> Vec<String> {
    let mut client = EtcdClient::connect([endpoint], None).await.unwrap();
    let resp = client.get("/dynamo/workers/", Some(GetOptions::new().with_prefix())).await.unwrap();
    let mut ids: Vec<String> = resp
        .kvs()
        .iter()
        .map(|kv| {
            let key = kv.key_str().unwrap();
            let value: Value = serde_json::from_slice(kv.value()).unwrap();
            assert!(value["address"].is_string(), "{key} has no address: {value}");
            key.rsplit('/').next().unwrap().to_string()
        })
        .collect();
    ids.sort();
    ids
}

fn sorted(mut v: Vec<String>) -> Vec<String> {
    v.sort();
    v
}

/// `data:` payloads of an SSE body.
fn sse_payloads(body: &str) -> Vec<&str> {
    body.split("\n\n").filter_map(|e| e.trim_start().strip_prefix("data: ")).collect()
}

/// What a complete stream must show: content, one finish_reason, usage, then `[DONE]`.
struct StreamSummary {
    text: String,
    finish_reasons: Vec<String>,
    usage: Option<Value>,
    done: bool,
}

fn summarize(body: &str, content_of: fn(&Value) -> Option<&str>) -> StreamSummary {
    let mut s = StreamSummary { text: String::new(), finish_reasons: Vec::new(), usage: None, done: false };
    for p in sse_payloads(body) {
        assert!(!s.done, "data after [DONE]: {p}");
        if p == "[DONE]" {
            s.done = true;
            continue;
        }
        let v: Value = serde_json::from_str(p).unwrap_or_else(|e| panic!("bad chunk {p:?}: {e}"));
        assert!(v.get("error").is_none(), "error in stream: {v}");
        if let Some(choice) = v["choices"].get(0) {
            s.text.push_str(content_of(choice).unwrap_or(""));
            if let Some(f) = choice["finish_reason"].as_str() {
                s.finish_reasons.push(f.to_string());
            }
        }
        if !v["usage"].is_null() {
            s.usage = Some(v["usage"].clone());
        }
    }
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_workers_serve_through_the_frontend_and_are_listed_in_etcd() {
    let dir = common::qwen_dir();
    let model_path = dir.to_str().unwrap();
    let model = "Qwen/Qwen3-0.6B";
    let worker_args = ["--model-path", model_path, "--served-model-name", model, "--speedup-ratio", "100"];
    let cluster = Cluster::start(4, &worker_args, &[]);
    let c = http();
    let ids = cluster.worker_ids();

    let etcd_ids = etcd_worker_ids(&cluster.etcd.endpoint()).await;
    assert_eq!(etcd_ids, sorted(ids.clone()), "etcd should list exactly the four workers");

    let messages = json!([{"role": "user", "content": "What is the capital of France?"}]);
    let r = chat(&c, cluster.base(), model, messages.clone(), 16).await;
    assert_eq!(r.prompt_tokens(), 15, "{}", r.body);
    assert!(ids.contains(&r.worker), "served by {:?}, not one of {ids:?}", r.worker);
    assert_eq!(r.body["model"], model);
    assert_eq!(r.body["choices"][0]["message"]["role"], "assistant");
    assert!(!r.body["choices"][0]["message"]["content"].as_str().unwrap().is_empty());
    assert!(matches!(r.body["choices"][0]["finish_reason"].as_str(), Some("stop" | "length")));

    let body = json!({"model": model, "messages": messages, "max_tokens": 16, "stream": true,
        "stream_options": {"include_usage": true}});
    let resp = c.post(format!("{}/v1/chat/completions", cluster.base())).json(&body).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    let worker = resp.headers()["x-kvgate-worker"].to_str().unwrap().to_string();
    assert!(ids.contains(&worker));
    let s = summarize(&resp.text().await.unwrap(), |c| c["delta"]["content"].as_str());
    assert!(s.done, "the stream must end with [DONE]");
    assert!(!s.text.is_empty(), "no content streamed");
    assert_eq!(s.finish_reasons.len(), 1, "{:?}", s.finish_reasons);
    assert_eq!(s.usage.expect("usage chunk")["prompt_tokens"], 15);

    let models: Value = c.get(format!("{}/v1/models", cluster.base())).send().await.unwrap().json().await.unwrap();
    assert_eq!(models["data"][0]["id"], model);
    let health: Value = c.get(format!("{}/health", cluster.base())).send().await.unwrap().json().await.unwrap();
    assert_eq!(health["models"][0]["workers"].as_array().unwrap().len(), 4, "{health}");
}

/// Sends requests sharing [`LONG_PREFIX`] (tagged with `tag`, so the prefix is new) and checks
/// they follow the cache: the first's blocks reach the index through NATS, then the rest go to
/// the same worker and find their prefix cached. Returns the worker.
async fn check_prefix_routing(c: &reqwest::Client, base: &str, tag: &str, followers: usize) -> String {
    let system = format!("[{tag}] {LONG_PREFIX}");
    let msgs = |q: &str| json!([{"role": "system", "content": system}, {"role": "user", "content": q}]);
    let before = common::metric(c, base, "kvgate_kv_index_entries").await as u64;
    let first = chat(c, base, "kvgate-mock", msgs("Is the 7:42 on time?"), 4).await;
    let blocks = first.prompt_tokens() / 16;
    assert!(blocks >= 10, "the shared prefix should span many blocks, not {blocks}");
    wait_index(c, base, before + blocks, RECOVERY_TIMEOUT).await;
    for i in 0..followers {
        let r = chat(c, base, "kvgate-mock", msgs(&format!("Question {i}: which platform?")), 4).await;
        assert_eq!(r.worker, first.worker, "[{tag}] request {i} left the worker that cached its prefix");
        assert!(r.cached_tokens() > 0, "[{tag}] request {i} found nothing cached: {}", r.body);
    }
    first.worker
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_prefix_requests_go_to_the_worker_that_cached_it() {
    let cluster = Cluster::mock(3);
    let c = http();
    let w = check_prefix_routing(&c, cluster.base(), "prefix", 4).await;
    assert!(cluster.worker_ids().contains(&w));
    let hit = common::metric(&c, cluster.base(), "kvgate_cached_prompt_tokens_total").await;
    assert!(hit > 0.0, "the frontend's metrics should count the cached prompt tokens");
}

/// Approximate mode across processes: workers that register `kv_events: false` (`kvgate worker
/// --no-kv-events`), then a frontend that ignores the events of workers that publish them
/// (`kvgate frontend --no-kv-events`). Either way prefixes follow their worker on predictions
/// alone, and `/health` and `/metrics` say every worker is approximate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_without_events_are_routed_approximately() {
    let c = http();
    for (worker_args, frontend_args, tag) in [
        (&["--speedup-ratio", "100", "--no-kv-events"][..], &[][..], "worker-side"),
        (&["--speedup-ratio", "100"][..], &["--no-kv-events"][..], "frontend-side"),
    ] {
        let cluster = Cluster::start(3, worker_args, frontend_args);
        let base = cluster.base();
        let health: Value = c.get(format!("{base}/health")).send().await.unwrap().json().await.unwrap();
        let workers = health["models"][0]["workers"].as_array().unwrap();
        assert!(workers.iter().all(|w| w["kv_state"] == "approximate"), "[{tag}] {health}");
        check_prefix_routing(&c, base, tag, 4).await;
        assert_eq!(common::metric(&c, base, "kvgate_kv_events_applied_total").await, 0.0, "[{tag}]");
        assert!(common::metric(&c, base, "kvgate_kv_predicted_blocks_stored_total").await > 0.0, "[{tag}]");
        let text = c.get(format!("{base}/metrics")).send().await.unwrap().text().await.unwrap();
        let flags: Vec<&str> = text.lines().filter(|l| l.starts_with("kvgate_worker_kv_approximate{")).collect();
        assert_eq!(flags.len(), 3, "[{tag}] {flags:?}");
        assert!(flags.iter().all(|l| l.ends_with(" 1")), "[{tag}] {flags:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_worker_stream_migrates_and_the_worker_leaves_discovery() {
    // Speed-up 1: ~6 ms a token, so 300 tokens last ~2 s and the kill lands mid-stream.
    let mut cluster = Cluster::start(3, &["--speedup-ratio", "1"], &[]);
    let c = http();
    let base = cluster.base().to_string();
    let max_tokens = 300u64;
    let body = json!({"model": "kvgate-mock", "prompt": LONG_PREFIX, "max_tokens": max_tokens,
        "ignore_eos": true, "stream": true, "stream_options": {"include_usage": true}});
    let mut resp = c.post(format!("{base}/v1/completions")).json(&body).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let victim = resp.headers()["x-kvgate-worker"].to_str().unwrap().to_string();

    let mut text = String::new();
    while sse_payloads(&text).len() < 20 {
        let chunk = resp.chunk().await.unwrap().expect("the stream ended before the kill");
        text.push_str(std::str::from_utf8(&chunk).unwrap());
    }
    // The index knows the victim holds the prompt, so requests sharing it are routed there.
    wait_index(&c, &base, 10, READY_TIMEOUT).await;
    let i = cluster.workers.iter().position(|w| w.id == victim).expect("the header names a worker");
    let mut dead = cluster.workers.remove(i);
    dead.proc.kill();
    let killed_at = Instant::now();

    // Requests sent right after the kill, while the dead worker is still listed and the index
    // says it holds their prefix: the router picks it, and none is lost.
    let after: Vec<_> = (0..6)
        .map(|k| {
            let (c, base) = (c.clone(), base.clone());
            let body = json!({"model": "kvgate-mock", "prompt": format!("{LONG_PREFIX} Part {k}."), "max_tokens": 4});
            tokio::spawn(async move { post(&c, &base, "/v1/completions", &body).await })
        })
        .collect();

    while let Some(chunk) = resp.chunk().await.unwrap() {
        text.push_str(std::str::from_utf8(&chunk).unwrap());
    }
    let s = summarize(&text, |c| c["text"].as_str());
    assert!(s.done, "the stream must end with [DONE]; it ended:\n{}", &text[text.len().saturating_sub(500)..]);
    assert_eq!(s.finish_reasons, ["length"], "exactly one finish_reason");
    let usage = s.usage.expect("a usage chunk");
    assert_eq!(usage["completion_tokens"].as_u64(), Some(max_tokens), "{usage}");
    assert!(common::metric(&c, &base, "kvgate_migrations_total").await >= 1.0, "the stream should have migrated");

    for h in after {
        let r = h.await.unwrap().expect("request after the kill got no response");
        assert_eq!(r.status, 200, "request after the kill failed: {}", r.body);
        assert_ne!(r.worker, victim, "served by the dead worker");
    }
    let r = chat(&c, &base, "kvgate-mock", json!([{"role": "user", "content": "later"}]), 4).await;
    assert_ne!(r.worker, victim);

    let etcd = cluster.etcd.endpoint();
    loop {
        let ids = etcd_worker_ids(&etcd).await;
        if !ids.contains(&victim) {
            assert_eq!(ids, sorted(cluster.worker_ids()));
            break;
        }
        let waited = killed_at.elapsed();
        assert!(waited < LEASE_TTL + LEASE_SLACK, "the killed worker's key is still in etcd after {waited:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let retried = cluster.frontend.proc.output().matches("trying another").count();
    eprintln!(
        "killed worker's key left etcd {:?} after the kill (lease TTL {LEASE_TTL:?}); {retried} requests retried on another worker",
        killed_at.elapsed()
    );
}

/// Blocks in [`routing_recovers`]'s shared prefix.
const PREFIX_BLOCKS: u32 = 20;

/// After a restart: sends completions whose prompts share a new prefix of exactly
/// [`PREFIX_BLOCKS`] blocks of token ids (plus 3 tokens and 4 generated, so no other block
/// fills) until a worker's events for that prefix reach the index through NATS, then checks the
/// next requests are routed to a worker holding it. Returns how long that took.
///
/// It sends more than one request because an event published in the moment both sides
/// reconnect can be lost, and a gap is only seen at a worker's next event; a request landing on
/// another worker publishes fresh events.
async fn routing_recovers(c: &reqwest::Client, base: &str, tag: u32) -> Duration {
    let start = Instant::now();
    let prefix: Vec<u32> = (0..PREFIX_BLOCKS * 16).map(|i| 32 + (i * 7 + tag * 13) % 90).collect();
    let request = |k: u32| {
        let mut prompt = prefix.clone();
        prompt.extend([32 + k % 90, 33 + k / 90 % 90, 10]);
        json!({"model": "kvgate-mock", "prompt": prompt, "max_tokens": 4, "ignore_eos": true})
    };
    let before = common::metric(c, base, "kvgate_kv_index_entries").await as u64;
    let mut k = 0;
    loop {
        let r = post(c, base, "/v1/completions", &request(k)).await.unwrap();
        assert_eq!(r.status, 200, "{}", r.body);
        k += 1;
        tokio::time::sleep(Duration::from_millis(50)).await;
        if common::metric(c, base, "kvgate_kv_index_entries").await as u64 >= before + PREFIX_BLOCKS as u64 {
            break;
        }
        assert!(
            start.elapsed() < RECOVERY_TIMEOUT,
            "[{tag}] no worker's events for the prefix reached the index within {RECOVERY_TIMEOUT:?} ({k} requests)"
        );
    }
    for i in 0..3 {
        let r = post(c, base, "/v1/completions", &request(k + i)).await.unwrap();
        assert_eq!(r.status, 200, "{}", r.body);
        let want = (PREFIX_BLOCKS * 16) as u64;
        assert!(r.cached_tokens() >= want, "[{tag}] routed to a worker without the prefix: {}", r.body);
    }
    start.elapsed()
}

/// Requests sent in a loop by `CLIENTS` tasks until stopped; every failure is kept.
struct LoadLoop {
    stop: Arc<AtomicBool>,
    sent: Arc<AtomicU64>,
    failures: Arc<Mutex<Vec<String>>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl LoadLoop {
    /// Clients running at once: enough to always have a request in flight during a restart.
    const CLIENTS: usize = 2;

    /// Short completions of token ids (8 tokens in all, under one 16-token block), so the load
    /// adds nothing to the KV index and leaves [`routing_recovers`]'s count exact.
    fn start(c: &reqwest::Client, base: &str) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let sent = Arc::new(AtomicU64::new(0));
        let failures = Arc::new(Mutex::new(Vec::new()));
        let tasks = (0..Self::CLIENTS)
            .map(|i| {
                let (c, base) = (c.clone(), base.to_string());
                let (stop, sent, failures) = (stop.clone(), sent.clone(), failures.clone());
                tokio::spawn(async move {
                    let body = json!({"model": "kvgate-mock", "prompt": [72, 105, 48 + i as u32, 10],
                        "max_tokens": 4, "ignore_eos": true});
                    while !stop.load(Relaxed) {
                        let n = sent.fetch_add(1, Relaxed);
                        match post(&c, &base, "/v1/completions", &body).await {
                            Ok(r) if r.status == 200 && r.body["usage"]["completion_tokens"] == 4 => {}
                            Ok(r) => failures.lock().unwrap().push(format!("request {n}: {} {}", r.status, r.body)),
                            Err(e) => failures.lock().unwrap().push(format!("request {n}: {e}")),
                        }
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                })
            })
            .collect();
        Self { stop, sent, failures, tasks }
    }

    /// Stops, and asserts that every request succeeded.
    async fn finish(self, what: &str) {
        self.stop.store(true, Relaxed);
        for t in self.tasks {
            t.await.unwrap();
        }
        let failures = self.failures.lock().unwrap();
        let sent = self.sent.load(Relaxed);
        assert!(failures.is_empty(), "{what}: {} of {sent} requests failed: {:#?}", failures.len(), &failures[..]);
        assert!(sent >= 20, "{what}: only {sent} requests sent; the load loop did not run");
        eprintln!("{what}: {sent} requests, none failed");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_and_etcd_restarts_lose_no_request_and_routing_recovers() {
    let mut cluster = Cluster::mock(3);
    let c = http();
    let base = cluster.base().to_string();
    routing_recovers(&c, &base, 1).await;

    let load = LoadLoop::start(&c, &base);
    tokio::time::sleep(Duration::from_millis(300)).await;
    tokio::task::block_in_place(|| cluster.nats.restart());
    let took = routing_recovers(&c, &base, 2).await;
    eprintln!("routing recovered {took:?} after NATS came back");
    tokio::time::sleep(Duration::from_millis(300)).await;
    load.finish("NATS restart").await;

    let load = LoadLoop::start(&c, &base);
    tokio::time::sleep(Duration::from_millis(300)).await;
    tokio::task::block_in_place(|| cluster.etcd.restart());
    let took = routing_recovers(&c, &base, 3).await;
    eprintln!("routing checked {took:?} after etcd came back");
    // Past a lease TTL: the workers kept (or renewed) their leases through the restart.
    tokio::time::sleep(LEASE_TTL + LEASE_SLACK).await;
    assert_eq!(etcd_worker_ids(&cluster.etcd.endpoint()).await, sorted(cluster.worker_ids()));
    load.finish("etcd restart").await;
    let health: Value = c.get(format!("{base}/health")).send().await.unwrap().json().await.unwrap();
    assert_eq!(health["models"][0]["workers"].as_array().unwrap().len(), 3, "{health}");
}
