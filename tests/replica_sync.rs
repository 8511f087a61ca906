//! Router replica sync (`--router-replica-sync`, issue #15), every part its own process: a real
//! etcd, a real nats-server, two mocker `kvgate worker`s and two `kvgate frontend`s.
//!
//! Frontend B connects to NATS as a user that may not subscribe to the KV events
//! (`dynamo.kv_events.>`): whatever the workers cache, B never hears of it from their events
//! (its one other source, the periodic replay every 10 s, has not run yet when B routes: B is
//! checked to have applied no event, live or replayed). That is deterministically the situation of a session's
//! next turn arriving at B before the worker's events of the previous turn did. Each prompt is
//! sent through A first; once B has applied A's decision (B's counter says so), the same
//! prompt sent through B must go to the worker A chose, on the strength of A's decision alone.

mod common;
mod support;

use std::time::{Duration, Instant};

use serde_json::json;
use support::{kvgate_command, Etcd, FrontendProc, KvgateProc, Nats, WorkerProc};

const WORKERS: usize = 2;
const PROMPTS: usize = 4;
const READY_TIMEOUT: Duration = Duration::from_secs(10);
const APPLIED_TIMEOUT: Duration = Duration::from_secs(10);

/// Two users: `full` may do anything; `deaf` may not subscribe to the KV events.
const NATS_CONFIG: &str = r#"
authorization {
  users = [
    { user: full, password: full }
    { user: deaf, password: deaf, permissions: { subscribe: { deny: ["dynamo.kv_events.>"] } } }
  ]
}
"#;

fn frontend(etcd: &str, nats: &str, what: &str, extra: &[&str]) -> FrontendProc {
    let mut args = vec!["frontend", "--http-host", "127.0.0.1", "--http-port", "0"];
    args.extend(["--etcd-endpoints", etcd, "--nats-server", nats, "--router-min-initial-workers", "2"]);
    args.extend(extra);
    let f = FrontendProc::ready(KvgateProc::spawn(what, kvgate_command(&args)));
    f.wait_workers(WORKERS, READY_TIMEOUT);
    f
}

async fn metrics(c: &reqwest::Client, base: &str) -> String {
    c.get(format!("{base}/metrics")).send().await.unwrap().text().await.unwrap()
}

fn scalar(text: &str, name: &str) -> i64 {
    let prefix = format!("{name} ");
    text.lines().find_map(|l| l.strip_prefix(&prefix)).and_then(|v| v.trim().parse::<f64>().ok()).unwrap_or(0.0) as i64
}

/// Sends `prompt` through `base`; returns the worker that served it.
async fn route(c: &reqwest::Client, base: &str, prompt: &str) -> String {
    let body = json!({"model": "kvgate-mock", "max_tokens": 4,
        "messages": [{"role": "system", "content": prompt}, {"role": "user", "content": "Which trains stop at Arden?"}]});
    let r = c.post(format!("{base}/v1/chat/completions")).json(&body).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let worker = r.headers().get("x-kvgate-worker").expect("the worker header").to_str().unwrap().to_string();
    r.bytes().await.unwrap();
    worker
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_decision_through_a_routes_the_same_prefix_on_b_before_b_sees_the_events() {
    let etcd = Etcd::start();
    let nats = Nats::start_with_config(NATS_CONFIG);
    let etcd_url = etcd.endpoint();
    let full = format!("nats://full:full@127.0.0.1:{}", nats.port);
    let deaf = format!("nats://deaf:deaf@127.0.0.1:{}", nats.port);
    let _workers: Vec<WorkerProc> = (0..WORKERS)
        .map(|i| {
            let mut args = vec!["worker", "--etcd-endpoints", &etcd_url, "--nats-server", &full];
            args.extend(["--advertise-host", "127.0.0.1", "--lease-ttl", "2", "--speedup-ratio", "10"]);
            KvgateProc::spawn(format!("worker {i}"), kvgate_command(&args))
        })
        .collect::<Vec<_>>()
        .into_iter()
        .map(WorkerProc::ready)
        .collect();
    let a = frontend(&etcd_url, &full, "frontend A", &["--router-replica-sync"]);
    let b = frontend(&etcd_url, &deaf, "frontend B (no KV events)", &["--router-replica-sync", "true"]);
    let c = reqwest::Client::builder().timeout(Duration::from_secs(60)).build().unwrap();

    let mut chosen = Vec::new();
    for i in 0..PROMPTS {
        // A long, distinct prefix (several blocks that only this prompt has).
        let prompt =
            format!("{} {}", common::rail_system_prompt(&format!("sync {i}")), "Timetable section 4.".repeat(20));
        let by_a = route(&c, &a.base, &prompt).await;
        // B has applied A's decision (a condition, not a delay).
        let deadline = Instant::now() + APPLIED_TIMEOUT;
        while scalar(&metrics(&c, &b.base).await, "kvgate_router_sync_decisions_applied_total") < (i + 1) as i64 {
            assert!(
                Instant::now() < deadline,
                "B never applied A's decision {i}:\nA:\n{}\nB:\n{}",
                metrics(&c, &a.base).await,
                metrics(&c, &b.base).await
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let by_b = route(&c, &b.base, &prompt).await;
        assert_eq!(by_b, by_a, "prompt {i}: B did not follow A's decision");
        chosen.push(by_a);
    }
    let (ma, mb) = (metrics(&c, &a.base).await, metrics(&c, &b.base).await);
    // B knew nothing from events: it applied none, live or replayed, so its choices came from
    // A's decisions.
    for name in
        ["kvgate_kv_events_applied_total", "kvgate_kv_recoveries_replay_total", "kvgate_kv_recoveries_dump_total"]
    {
        assert_eq!(scalar(&mb, name), 0, "B applied KV events after all ({name}):\n{mb}");
    }
    assert!(scalar(&ma, "kvgate_kv_events_applied_total") > 0, "A's index is built from the events");
    assert_eq!(scalar(&ma, "kvgate_router_sync_decisions_published_total"), PROMPTS as i64);
    assert_eq!(scalar(&mb, "kvgate_router_sync_decisions_published_total"), PROMPTS as i64);
    assert!(scalar(&ma, "kvgate_router_sync_decisions_applied_total") >= PROMPTS as i64, "A applies B's decisions");
    println!("workers chosen through A and followed by B: {chosen:?}");
}
