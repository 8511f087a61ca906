//! Request tracing across processes (issue #18): a real etcd and nats-server, `kvgate frontend`
//! and `kvgate worker` processes, each exporting spans over OTLP/HTTP (protobuf) to a minimal
//! collector inside this test, which decodes what it receives with the OTLP protobuf types.
//!
//! What is checked: a request with a `traceparent` yields one trace with that id: the
//! frontend's root span is the caller's span's child, its phases (preprocess, admission, route,
//! dispatch, first_token, completion) the root's children, with the routing decision as
//! attributes; the worker's span is the dispatch span's child, its phases (queue, prefill,
//! decode) its own. A caller's unsampled trace is recorded by neither. A request without `traceparent`, or with an invalid one, still gets one
//! trace spanning both processes. A disaggregated request's prefill and decode legs are both
//! children of its dispatch span. A real engine's HTTP call (the fake SGLang server of
//! `tests/fake_engine`) carries a `traceparent` whose parent is the worker's span.

mod common;
#[path = "common/fake_engine.rs"]
mod fake_engine;
mod support;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use opentelemetry_proto::tonic::common::v1::KeyValue;
use prost::Message;
use serde_json::json;
use support::{kvgate_command, Etcd, FrontendProc, KvgateProc, Nats, WorkerProc};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// How long spans may take to arrive (the exporters flush every 100 ms here).
const SPANS_TIMEOUT: Duration = Duration::from_secs(15);
const READY_TIMEOUT: Duration = Duration::from_secs(10);
const MODEL: &str = "kvgate-mock";
/// The largest export this collector accepts (the SDK's batches are far smaller).
const MAX_BODY_BYTES: usize = 16 << 20;

/// One span as the collector received it.
#[derive(Debug, Clone)]
struct Got {
    service: String,
    name: String,
    trace_id: String,
    span_id: String,
    parent: String,
    attrs: HashMap<String, String>,
}

impl Got {
    fn attr(&self, k: &str) -> &str {
        self.attrs.get(k).map_or("", String::as_str)
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn value(kv: &KeyValue) -> String {
    match kv.value.as_ref().and_then(|v| v.value.as_ref()) {
        Some(AnyValue::StringValue(s)) => s.clone(),
        Some(AnyValue::IntValue(i)) => i.to_string(),
        Some(AnyValue::DoubleValue(d)) => d.to_string(),
        Some(AnyValue::BoolValue(b)) => b.to_string(),
        other => format!("{other:?}"),
    }
}

/// A minimal OTLP/HTTP collector: `POST /v1/traces` with a protobuf body, answered 200.
struct Collector {
    url: String,
    spans: Arc<Mutex<Vec<Got>>>,
    posts: Arc<Mutex<Vec<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Collector {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Collector {
    async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let spans = Arc::new(Mutex::new(Vec::new()));
        let posts = Arc::new(Mutex::new(Vec::new()));
        let (s, p) = (spans.clone(), posts.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((conn, _)) = listener.accept().await else { return };
                tokio::spawn(serve(conn, s.clone(), p.clone()));
            }
        });
        Self { url, spans, posts, task }
    }

    fn spans(&self) -> Vec<Got> {
        self.spans.lock().unwrap().clone()
    }

    /// Waits until `done` holds of the spans received; panics with them after the timeout.
    async fn wait(&self, what: &str, done: impl Fn(&[Got]) -> bool) -> Vec<Got> {
        let deadline = Instant::now() + SPANS_TIMEOUT;
        loop {
            let spans = self.spans();
            if done(&spans) {
                return spans;
            }
            if Instant::now() > deadline {
                let names: Vec<String> =
                    spans.iter().map(|g| format!("{}:{} {}", g.service, g.name, g.trace_id)).collect();
                panic!(
                    "{what}: not within {SPANS_TIMEOUT:?}; posts {:?}; spans {names:#?}",
                    self.posts.lock().unwrap()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// One keep-alive connection: requests with a `Content-Length` body, one after the other.
async fn serve(mut conn: TcpStream, spans: Arc<Mutex<Vec<Got>>>, posts: Arc<Mutex<Vec<String>>>) {
    let mut buf = Vec::new();
    loop {
        let head_end = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            let mut chunk = [0u8; 8192];
            match conn.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
        let request_line = head.lines().next().unwrap_or("").to_string();
        let header = |name: &str| {
            head.lines()
                .find_map(|l| l.split_once(':').filter(|(k, _)| k.trim().eq_ignore_ascii_case(name)))
                .map(|(_, v)| v.trim().to_string())
        };
        let len: usize = header("content-length").and_then(|v| v.parse().ok()).unwrap_or(0);
        assert!(len <= MAX_BODY_BYTES, "an export of {len} bytes");
        let content_type = header("content-type").unwrap_or_default();
        while buf.len() < head_end + len {
            let mut chunk = [0u8; 65536];
            match conn.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
        let body: Vec<u8> = buf.drain(..head_end + len).skip(head_end).collect();
        posts.lock().unwrap().push(format!("{request_line} ({content_type}, {len} bytes)"));
        let ok = request_line.starts_with("POST /v1/traces ") && content_type == "application/x-protobuf";
        if ok {
            let req = ExportTraceServiceRequest::decode(&body[..]).expect("an OTLP protobuf export");
            let mut got = spans.lock().unwrap();
            for rs in req.resource_spans {
                let attrs = rs.resource.map(|r| r.attributes).unwrap_or_default();
                let service = attrs.iter().find(|kv| kv.key == "service.name").map(value).unwrap_or_default();
                for ss in rs.scope_spans {
                    for s in ss.spans {
                        got.push(Got {
                            service: service.clone(),
                            name: s.name,
                            trace_id: hex(&s.trace_id),
                            span_id: hex(&s.span_id),
                            parent: hex(&s.parent_span_id),
                            attrs: s.attributes.iter().map(|kv| (kv.key.clone(), value(kv))).collect(),
                        });
                    }
                }
            }
        }
        let status = if ok { "200 OK" } else { "404 Not Found" };
        let resp = format!("HTTP/1.1 {status}\r\ncontent-type: application/x-protobuf\r\ncontent-length: 0\r\n\r\n");
        if conn.write_all(resp.as_bytes()).await.is_err() {
            return;
        }
    }
}

/// etcd + NATS + a frontend + workers, every kvgate process exporting to `collector`.
struct Cluster {
    frontend: FrontendProc,
    workers: Vec<WorkerProc>,
    _nats: Nats,
    _etcd: Etcd,
}

impl Cluster {
    /// One mocker worker per entry of `modes` (`None`: aggregated; else its
    /// `--disaggregation-mode`).
    fn start(collector: &Collector, modes: &[Option<&str>]) -> Self {
        let workers = modes
            .iter()
            .map(|mode| {
                let mut args = vec!["--speedup-ratio", "100"];
                if let Some(m) = mode {
                    args.extend(["--disaggregation-mode", m, "--disaggregation-transfer-backend", "tcp"]);
                }
                args.into_iter().map(String::from).collect()
            })
            .collect();
        Self::start_with(collector, workers)
    }

    /// One worker per entry of `workers`, each with those arguments.
    fn start_with(collector: &Collector, workers: Vec<Vec<String>>) -> Self {
        let etcd = Etcd::start();
        let nats = Nats::start();
        let (etcd_url, nats_url) = (etcd.endpoint(), nats.url());
        let traced = |mut cmd: std::process::Command| {
            cmd.env("OTEL_BSP_SCHEDULE_DELAY", "100");
            cmd
        };
        let procs: Vec<KvgateProc> = workers
            .iter()
            .enumerate()
            .map(|(i, extra)| {
                let mut args = vec!["worker", "--etcd-endpoints", &etcd_url, "--nats-server", &nats_url];
                args.extend(["--advertise-host", "127.0.0.1", "--lease-ttl", "2"]);
                args.extend(["--otlp-endpoint", &collector.url]);
                args.extend(extra.iter().map(String::as_str));
                KvgateProc::spawn(format!("worker {i}"), traced(kvgate_command(&args)))
            })
            .collect();
        let n = workers.len().to_string();
        let mut args = vec!["frontend", "--http-host", "127.0.0.1", "--http-port", "0"];
        args.extend(["--etcd-endpoints", &etcd_url, "--nats-server", &nats_url]);
        args.extend(["--router-min-initial-workers", &n]);
        // The env var, as an operator's deployment would set it (the workers use the flag).
        let mut cmd = traced(kvgate_command(&args));
        cmd.env("OTEL_EXPORTER_OTLP_ENDPOINT", &collector.url);
        let frontend = KvgateProc::spawn("frontend", cmd);
        let workers: Vec<WorkerProc> = procs.into_iter().map(WorkerProc::ready).collect();
        let frontend = FrontendProc::ready(frontend);
        frontend.wait_workers(workers.len(), READY_TIMEOUT);
        Self { frontend, workers, _nats: nats, _etcd: etcd }
    }
}

/// A chat completion, with `headers`; returns the response headers and body.
async fn chat(base: &str, headers: &[(&str, &str)], stream: bool) -> (reqwest::header::HeaderMap, String) {
    let c = reqwest::Client::builder().timeout(Duration::from_secs(30)).build().unwrap();
    let body = json!({"model": MODEL, "messages": [{"role": "user", "content": "Which platform for the 7:42 to Basel?"}],
        "max_tokens": 6, "stream": stream});
    let mut req = c.post(format!("{base}/v1/chat/completions")).json(&body);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let r = req.send().await.unwrap();
    assert_eq!(r.status(), 200);
    let headers = r.headers().clone();
    (headers, r.text().await.unwrap())
}

fn one<'a>(spans: &'a [Got], service: &str, name: &str) -> &'a Got {
    let found: Vec<&Got> = spans.iter().filter(|s| s.service == service && s.name == name).collect();
    assert_eq!(found.len(), 1, "{service}:{name} in {spans:#?}");
    found[0]
}

const FRONTEND_PHASES: [&str; 6] = ["preprocess", "admission", "route", "dispatch", "first_token", "completion"];

/// Everything of one aggregated request's trace: returns the spans of trace `tid`.
fn check_aggregated_trace(spans: &[Got], tid: &str, worker: &str) {
    let spans: Vec<Got> = spans.iter().filter(|s| s.trace_id == tid).cloned().collect();
    let root = one(&spans, "kvgate-frontend", "POST /v1/chat/completions");
    assert_eq!(root.attr("gen_ai.request.model"), MODEL);
    let out = root.attr("gen_ai.usage.output_tokens");
    assert!(["length", "stop"].contains(&root.attr("gen_ai.response.finish_reasons")), "{root:?}");
    assert!(out.parse::<u32>().is_ok_and(|n| (1..=6).contains(&n)), "{root:?}");
    for phase in FRONTEND_PHASES {
        assert_eq!(one(&spans, "kvgate-frontend", phase).parent, root.span_id, "{phase}");
    }
    let route = one(&spans, "kvgate-frontend", "route");
    assert_eq!(route.attr("kvgate.route.worker"), worker);
    assert_eq!(route.attr("kvgate.route.mode"), "kv");
    assert_eq!(route.attr("kvgate.route.candidates"), "1");
    assert_eq!(route.attr("kvgate.leg"), "whole");
    assert!(route.attr("kvgate.route.overlap_blocks").parse::<u32>().is_ok(), "{route:?}");
    assert!(route.attr("kvgate.route.cost").parse::<f64>().is_ok(), "{route:?}");
    let dispatch = one(&spans, "kvgate-frontend", "dispatch");
    assert_eq!(dispatch.attr("kvgate.worker"), worker);
    let completion = one(&spans, "kvgate-frontend", "completion");
    assert_eq!(completion.attr("gen_ai.usage.output_tokens"), out);
    assert!(completion.attr("gen_ai.usage.input_tokens").parse::<u32>().unwrap() > 0);
    let w = one(&spans, "kvgate-worker", "worker.request");
    assert_eq!(w.parent, dispatch.span_id, "the worker's span is the dispatch span's child");
    assert_eq!(w.attr("kvgate.worker_id"), worker);
    assert_eq!(w.attr("kvgate.leg"), "aggregated");
    // The worker may count an eos token the frontend does not show.
    assert!(w.attr("gen_ai.usage.output_tokens").parse::<u32>().unwrap() >= out.parse::<u32>().unwrap(), "{w:?}");
    for phase in ["queue", "prefill", "decode"] {
        assert_eq!(one(&spans, "kvgate-worker", phase).parent, w.span_id, "worker {phase}");
    }
}

fn frontend_and_worker_spans_of(tid: &str) -> impl Fn(&[Got]) -> bool + '_ {
    move |s: &[Got]| {
        let of = |svc: &str| s.iter().filter(|g| g.trace_id == tid && g.service == svc).count();
        of("kvgate-frontend") > FRONTEND_PHASES.len() && of("kvgate-worker") >= 4
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_traceparent_is_continued_by_the_frontend_and_the_worker() {
    let collector = Collector::start().await;
    let cluster = Cluster::start(&collector, &[None]);
    let worker = cluster.workers[0].id.clone();
    let tid = "4bf92f3577b34da6a3ce929d0e0e4736";
    let caller = "00f067aa0ba902b7";
    // First an unsampled caller: served, and neither process records its trace.
    let unsampled = "5bf92f3577b34da6a3ce929d0e0e4737";
    let _ = chat(&cluster.frontend.base, &[("traceparent", &format!("00-{unsampled}-{caller}-00"))], false).await;
    let tp = format!("00-{tid}-{caller}-01");
    let (headers, _) = chat(&cluster.frontend.base, &[("traceparent", &tp), ("tracestate", "k=v")], true).await;
    assert_eq!(headers["x-kvgate-worker"], worker.as_str());
    let spans = collector.wait("the request's spans", frontend_and_worker_spans_of(tid)).await;
    let root = one(&spans, "kvgate-frontend", "POST /v1/chat/completions");
    assert_eq!(root.trace_id, tid);
    assert_eq!(root.parent, caller, "the root span is the caller's span's child");
    assert_eq!(root.attr("kvgate.traceparent_valid"), "true");
    check_aggregated_trace(&spans, tid, &worker);
    // Both exporters sent the later trace: the earlier one would have gone first.
    assert!(!spans.iter().any(|s| s.trace_id == unsampled), "an unsampled trace was recorded");
    drop(cluster);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_without_a_valid_traceparent_gets_one_trace_across_both_processes() {
    let collector = Collector::start().await;
    let cluster = Cluster::start(&collector, &[None]);
    let worker = cluster.workers[0].id.clone();
    let roots = |s: &[Got]| -> Vec<Got> {
        s.iter().filter(|g| g.name == "POST /v1/chat/completions").cloned().collect::<Vec<_>>()
    };
    // No header, then an invalid one: each its own new trace, never an error.
    for (i, headers) in [vec![], vec![("traceparent", "00-not-a-trace-context-01")]].into_iter().enumerate() {
        let _ = chat(&cluster.frontend.base, &headers, false).await;
        let spans = collector.wait("a root span", |s| roots(s).len() > i).await;
        let root = roots(&spans).pop().unwrap();
        assert_eq!(root.parent, "", "a new trace's root has no parent");
        assert_eq!(root.attr("kvgate.traceparent_valid"), "false");
        let tid = root.trace_id.clone();
        assert_ne!(tid, "0".repeat(32));
        let spans = collector.wait("the request's spans", frontend_and_worker_spans_of(&tid)).await;
        check_aggregated_trace(&spans, &tid, &worker);
    }
    let traces: std::collections::HashSet<String> = collector.spans().into_iter().map(|g| g.trace_id).collect();
    assert_eq!(traces.len(), 2, "two requests, two traces");
    drop(cluster);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disaggregated_requests_prefill_and_decode_legs_are_both_children_of_its_dispatch() {
    let collector = Collector::start().await;
    let cluster = Cluster::start(&collector, &[Some("prefill"), Some("decode")]);
    let tid = "0af7651916cd43dd8448eb211c80319c";
    let tp = format!("00-{tid}-b7ad6b7169203331-01");
    let (headers, body) = chat(&cluster.frontend.base, &[("traceparent", &tp)], false).await;
    assert_eq!(headers["x-kvgate-disagg"], "remote", "{body}");
    let (p, d) =
        (headers["x-kvgate-prefill-worker"].to_str().unwrap(), headers["x-kvgate-decode-worker"].to_str().unwrap());
    let spans = collector
        .wait("both legs' spans and the frontend's root (it ends last)", |s| {
            let of = |name: &str| s.iter().filter(|g| g.trace_id == tid && g.name == name).count();
            of("worker.request") == 2 && of("POST /v1/chat/completions") == 1
        })
        .await;
    let spans: Vec<Got> = spans.into_iter().filter(|s| s.trace_id == tid).collect();
    let dispatch = one(&spans, "kvgate-frontend", "dispatch");
    assert_eq!((dispatch.attr("kvgate.prefill_worker"), dispatch.attr("kvgate.decode_worker")), (p, d));
    let legs: Vec<&Got> = spans.iter().filter(|g| g.name == "worker.request").collect();
    let leg = |name: &str| *legs.iter().find(|g| g.attr("kvgate.leg") == name).unwrap_or_else(|| panic!("{legs:#?}"));
    for (name, worker) in [("prefill", p), ("decode", d)] {
        let l = leg(name);
        assert_eq!(l.parent, dispatch.span_id, "the {name} leg is the dispatch span's child");
        assert_eq!(l.attr("kvgate.worker_id"), worker);
    }
    assert!(leg("prefill").attr("kvgate.transfer.blocks").parse::<u32>().is_ok(), "{:?}", leg("prefill"));
    let routes: Vec<&str> =
        spans.iter().filter(|g| g.name == "route").map(|g| g.attr("kvgate.leg")).collect::<Vec<_>>();
    assert_eq!(routes.len(), 2, "{routes:?}");
    assert!(routes.contains(&"prefill") && routes.contains(&"decode"), "{routes:?}");
    drop(cluster);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_engines_http_call_carries_the_workers_span_as_its_parent() {
    let collector = Collector::start().await;
    let engine = fake_engine::FakeEngine::start(&["--engine", "sglang", "--skip-tokenizer-init"]);
    let dir = common::qwen_dir().to_str().unwrap().to_string();
    let model = "Qwen/Qwen3-0.6B";
    let args = ["--engine", "sglang", "--engine-url", &engine.url, "--model-path", &dir, "--served-model-name", model];
    let cluster = Cluster::start_with(&collector, vec![args.iter().map(|a| a.to_string()).collect()]);
    let tid = "1bf92f3577b34da6a3ce929d0e0e4731";
    let tp = format!("00-{tid}-00f067aa0ba902b7-01");
    let c = reqwest::Client::builder().timeout(Duration::from_secs(30)).build().unwrap();
    let body = json!({"model": model, "prompt": "Which platform for the 7:42?", "max_tokens": 4});
    let r = c
        .post(format!("{}/v1/completions", cluster.frontend.base))
        .header("traceparent", &tp)
        .header("tracestate", "rail=7")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    let spans = collector
        .wait("the worker's span", |s| s.iter().any(|g| g.trace_id == tid && g.name == "worker.request"))
        .await;
    let w = spans.iter().find(|g| g.trace_id == tid && g.name == "worker.request").unwrap();
    let stats = engine.get("/fake/stats").await;
    let calls: Vec<&serde_json::Value> =
        stats["last_requests"].as_array().unwrap().iter().filter(|r| r["path"] == "/generate").collect();
    assert_eq!(calls.len(), 1, "{stats}");
    let headers = &calls[0]["headers"];
    let sent = headers["traceparent"].as_str().or_else(|| headers["Traceparent"].as_str()).unwrap_or_default();
    assert_eq!(sent, format!("00-{tid}-{}-01", w.span_id), "the engine's parent is the worker's span: {headers}");
    let state = headers["tracestate"].as_str().or_else(|| headers["Tracestate"].as_str());
    assert_eq!(state, Some("rail=7"), "{headers}");
    drop(cluster);
}
