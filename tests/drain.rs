//! Graceful drain of a real `kvgate serve` process: on SIGTERM it stops accepting connections,
//! lets in-flight streams finish within `--drain-timeout-s`, ends the streams left after it with
//! an error event and `[DONE]`, and exits 0.

mod common;
mod support;

use std::time::{Duration, Instant};

use serde_json::{json, Value};
use support::{kvgate_command, KvgateProc, KVGATE_READY_TIMEOUT};

const READY: &str = "kvgate listening on http://";

fn serve(extra: &[&str]) -> (KvgateProc, String) {
    let mut args = vec!["serve", "--http-host", "127.0.0.1", "--http-port", "0"];
    args.extend_from_slice(extra);
    let mut cmd = kvgate_command(&args);
    for var in ["KVGATE_API_KEY", "KVGATE_API_KEY_FILE", "KVGATE_DRAIN_TIMEOUT_S"] {
        cmd.env_remove(var);
    }
    let p = KvgateProc::spawn("kvgate serve", cmd);
    let line = p.wait_line(READY, KVGATE_READY_TIMEOUT);
    (p, line[READY.len()..].split_whitespace().next().unwrap().to_string())
}

fn sigterm(p: &KvgateProc) {
    // SAFETY: kill(2) on the pid of a child KvgateProc has not reaped.
    assert_eq!(unsafe { libc::kill(p.pid(), libc::SIGTERM) }, 0);
}

/// Waits for the process to exit by itself; its success, and how long it took.
fn wait_exit(p: &mut KvgateProc, limit: Duration) -> (bool, Duration) {
    let t0 = Instant::now();
    while t0.elapsed() < limit {
        if let Some(ok) = p.exited() {
            return (ok, t0.elapsed());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("kvgate did not exit within {limit:?}; its output:\n{}", p.tail());
}

/// Starts a streaming chat of `max_tokens` and waits for its first chunk.
async fn start_stream(addr: &str, max_tokens: u32) -> (reqwest::Response, String) {
    let body = json!({"model": "kvgate-mock", "messages": [{"role": "user", "content": "Tell a story"}],
        "max_tokens": max_tokens, "ignore_eos": true, "stream": true});
    let mut r =
        reqwest::Client::new().post(format!("http://{addr}/v1/chat/completions")).json(&body).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let first = r.chunk().await.unwrap().expect("a first chunk");
    (r, String::from_utf8_lossy(&first).into_owned())
}

async fn rest_of(mut r: reqwest::Response, mut text: String) -> String {
    while let Some(c) = r.chunk().await.expect("the stream ends cleanly, not by a reset") {
        text.push_str(&String::from_utf8_lossy(&c));
    }
    text
}

/// Whether a new connection to `addr` is refused within `limit`.
fn connections_refused_within(addr: &str, limit: Duration) -> bool {
    let t0 = Instant::now();
    while t0.elapsed() < limit {
        if std::net::TcpStream::connect(addr).is_err() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    false
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_the_stream_finish_refuses_new_connections_and_exits_0() {
    // ~6 ms a token at speedup 1: 300 tokens at 0.5 take about 3.5 s.
    let (mut p, addr) = serve(&["--speedup-ratio", "0.5", "--drain-timeout-s", "30"]);
    let (stream, first) = start_stream(&addr, 300).await;
    let t0 = Instant::now();
    sigterm(&p);
    assert!(connections_refused_within(&addr, Duration::from_secs(2)), "still accepting after SIGTERM");
    let text = rest_of(stream, first).await;
    let events = common::sse_events(&text);
    assert_eq!(events.last().unwrap(), "[DONE]");
    let chunks: Vec<Value> = events[..events.len() - 1].iter().map(|e| serde_json::from_str(e).unwrap()).collect();
    assert!(chunks.iter().all(|c| c.get("error").is_none()), "the stream was cut: {text}");
    assert_eq!(chunks.last().unwrap()["choices"][0]["finish_reason"], "length");
    let content: usize =
        chunks.iter().filter_map(|c| c["choices"][0]["delta"]["content"].as_str()).map(|s| s.len()).sum();
    assert!(content > 100, "only {content} bytes streamed");
    let (ok, _) = wait_exit(&mut p, Duration::from_secs(10));
    assert!(ok, "exit status not 0:\n{}", p.tail());
    assert!(t0.elapsed() < Duration::from_secs(15));
    assert!(p.output().contains("draining in-flight requests"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_past_the_drain_timeout_ends_with_an_error_event_and_done() {
    // 2,000 tokens at speedup 0.2: about a minute, far past the one-second drain.
    let (mut p, addr) = serve(&["--speedup-ratio", "0.2", "--drain-timeout-s", "1"]);
    let (stream, first) = start_stream(&addr, 2000).await;
    let t0 = Instant::now();
    sigterm(&p);
    let text = tokio::time::timeout(Duration::from_secs(8), rest_of(stream, first)).await.expect("the stream ended");
    let cut_after = t0.elapsed();
    assert!(cut_after >= Duration::from_millis(900) && cut_after < Duration::from_secs(5), "cut after {cut_after:?}");
    let events = common::sse_events(&text);
    assert_eq!(events.last().unwrap(), "[DONE]");
    let last: Value = serde_json::from_str(&events[events.len() - 2]).unwrap();
    assert_eq!(last["error"]["type"], "service_unavailable", "{last}");
    assert!(last["error"]["message"].as_str().unwrap().contains("shutting down"));
    let (ok, _) = wait_exit(&mut p, Duration::from_secs(6));
    assert!(ok, "exit status not 0:\n{}", p.tail());
    assert!(t0.elapsed() < Duration::from_secs(8), "exited after {:?}", t0.elapsed());
}

#[test]
fn an_overlong_drain_timeout_is_refused() {
    let out = kvgate_command(&["serve", "--http-port", "0", "--drain-timeout-s", "1e9"]).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("--drain-timeout-s"), "{err}");
}

/// A `kvgate worker` of a real etcd + NATS cluster stopped with SIGTERM revokes its lease: the
/// frontend stops routing to it at once (not after `--lease-ttl`), and both exit 0. The frontend
/// also guards its endpoints with `--api-key`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_stopped_with_sigterm_leaves_routing_at_once_and_exits_0() {
    let etcd = support::Etcd::start();
    let nats = support::Nats::start();
    let (etcd_url, nats_url) = (etcd.endpoint(), nats.url());
    let cluster = ["--etcd-endpoints", &etcd_url, "--nats-server", &nats_url];
    let worker = |n: usize| {
        let mut args = vec!["worker", "--lease-ttl", "60", "--speedup-ratio", "100"];
        args.extend_from_slice(&cluster);
        support::WorkerProc::ready(KvgateProc::spawn(format!("worker {n}"), kvgate_command(&args)))
    };
    let (mut w1, _w2) = (worker(1), worker(2));
    let mut args =
        vec!["frontend", "--http-host", "127.0.0.1", "--http-port", "0", "--router-min-initial-workers", "2"];
    args.extend_from_slice(&cluster);
    args.extend_from_slice(&["--api-key", "sk-fleet"]);
    let mut fe = support::FrontendProc::ready(KvgateProc::spawn("frontend", kvgate_command(&args)));
    fe.wait_workers(2, Duration::from_secs(20));

    let c = reqwest::Client::new();
    let models = format!("{}/v1/models", fe.base);
    assert_eq!(c.get(&models).send().await.unwrap().status(), 401);
    assert_eq!(c.get(&models).bearer_auth("sk-fleet").send().await.unwrap().status(), 200);

    let t0 = Instant::now();
    sigterm(&w1.proc);
    fe.wait_workers(1, Duration::from_secs(5));
    assert!(t0.elapsed() < Duration::from_secs(5), "left routing after {:?} (lease TTL 60 s)", t0.elapsed());
    let (ok, _) = wait_exit(&mut w1.proc, Duration::from_secs(10));
    assert!(ok, "worker exit status not 0:\n{}", w1.proc.tail());
    let body = json!({"model": "kvgate-mock", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4});
    let r =
        c.post(format!("{}/v1/chat/completions", fe.base)).bearer_auth("sk-fleet").json(&body).send().await.unwrap();
    assert_eq!(r.status(), 200, "the worker left serves");

    sigterm(&fe.proc);
    let (ok, _) = wait_exit(&mut fe.proc, Duration::from_secs(10));
    assert!(ok, "frontend exit status not 0:\n{}", fe.proc.tail());
}
