//! Several `kvgate frontend`s on one fleet (issue #15), every part its own process: a real etcd
//! and nats-server, two mocker `kvgate worker`s, and frontends that share nothing but the fleet.
//!
//! What is checked: load booked through frontend A reaches frontend B through the workers' load
//! reports (`kvgate_worker_load_decode_blocks`, `kvgate_worker_reported_active_blocks` on B's
//! `/metrics`, while B has booked nothing); B's KV index equals A's (built from the same event
//! stream); a frontend started late becomes exact (same index, every worker's load reported)
//! within a few seconds, and how long it took is printed.

mod common;
mod support;

use std::time::{Duration, Instant};

use serde_json::{json, Value};
use support::{kvgate_command, Etcd, FrontendProc, KvgateProc, Nats, WorkerProc};

const WORKERS: usize = 2;
const READY_TIMEOUT: Duration = Duration::from_secs(10);
/// "Exact within seconds": the late frontend's index and load must agree within this.
const CATCH_UP_TIMEOUT: Duration = Duration::from_secs(5);

fn frontend(etcd: &str, nats: &str, what: &str) -> FrontendProc {
    let mut args = vec!["frontend", "--http-host", "127.0.0.1", "--http-port", "0"];
    args.extend(["--etcd-endpoints", etcd, "--nats-server", nats, "--router-min-initial-workers", "2"]);
    let f = FrontendProc::ready(KvgateProc::spawn(what, kvgate_command(&args)));
    f.wait_workers(WORKERS, READY_TIMEOUT);
    f
}

async fn metrics(c: &reqwest::Client, base: &str) -> String {
    c.get(format!("{base}/metrics")).send().await.unwrap().text().await.unwrap()
}

/// The labeled values of a per-worker gauge, by worker id, sorted.
fn per_worker(text: &str, name: &str) -> Vec<(String, i64)> {
    let prefix = format!("{name}{{");
    let mut v: Vec<(String, i64)> = text
        .lines()
        .filter_map(|l| l.strip_prefix(&prefix))
        .filter_map(|l| {
            let worker = l.split("worker=\"").nth(1)?.split('"').next()?.to_string();
            let value = l.rsplit(' ').next()?.parse::<f64>().ok()? as i64;
            Some((worker, value))
        })
        .collect();
    v.sort();
    v
}

fn total(text: &str, name: &str) -> i64 {
    per_worker(text, name).iter().map(|(_, v)| v).sum()
}

fn scalar(text: &str, name: &str) -> i64 {
    let prefix = format!("{name} ");
    text.lines().find_map(|l| l.strip_prefix(&prefix)).and_then(|v| v.trim().parse::<f64>().ok()).unwrap_or(0.0) as i64
}

/// Whether `late` agrees with `reference`: the same index, and every worker's load reported.
fn exact(reference: &str, late: &str) -> bool {
    scalar(late, "kvgate_kv_index_entries") == scalar(reference, "kvgate_kv_index_entries")
        && per_worker(late, "kvgate_worker_cached_blocks") == per_worker(reference, "kvgate_worker_cached_blocks")
        && per_worker(late, "kvgate_worker_load_reported").iter().filter(|(_, v)| *v == 1).count() == WORKERS
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frontends_share_load_and_index_and_a_late_one_catches_up() {
    let etcd = Etcd::start();
    let nats = Nats::start();
    let (etcd_url, nats_url) = (etcd.endpoint(), nats.url());
    // Slow workers (real-time mocker), so requests hold load while it is observed.
    let _workers: Vec<WorkerProc> = (0..WORKERS)
        .map(|i| {
            let mut args = vec!["worker", "--etcd-endpoints", &etcd_url, "--nats-server", &nats_url];
            args.extend(["--advertise-host", "127.0.0.1", "--lease-ttl", "2", "--speedup-ratio", "1"]);
            KvgateProc::spawn(format!("worker {i}"), kvgate_command(&args))
        })
        .collect::<Vec<_>>()
        .into_iter()
        .map(WorkerProc::ready)
        .collect();
    let a = frontend(&etcd_url, &nats_url, "frontend A");
    let b = frontend(&etcd_url, &nats_url, "frontend B");
    let c = reqwest::Client::builder().timeout(Duration::from_secs(60)).build().unwrap();

    // Long requests through A only.
    let mut inflight = Vec::new();
    for i in 0..4 {
        let body = json!({"model": "kvgate-mock", "max_tokens": 400,
            "messages": [{"role": "system", "content": common::rail_system_prompt(&format!("load {i}"))},
                         {"role": "user", "content": "List every connection."}]});
        let (c, base) = (c.clone(), a.base.clone());
        inflight.push(tokio::spawn(async move {
            let r = c.post(format!("{base}/v1/chat/completions")).json(&body).send().await.unwrap();
            assert_eq!(r.status(), 200);
            r.json::<Value>().await.unwrap()
        }));
    }
    // B sees that load (reported by the workers) though it booked none of it.
    let deadline = Instant::now() + Duration::from_secs(10);
    let seen = loop {
        let (ta, tb) = (metrics(&c, &a.base).await, metrics(&c, &b.base).await);
        let booked_a = total(&ta, "kvgate_worker_active_decode_blocks");
        let booked_b = total(&tb, "kvgate_worker_active_decode_blocks");
        let load_b = total(&tb, "kvgate_worker_load_decode_blocks");
        let reported_b = total(&tb, "kvgate_worker_reported_active_blocks");
        assert_eq!(booked_b, 0, "B booked nothing");
        if booked_a > 0 && load_b > 0 && reported_b > 0 {
            break (booked_a, load_b, reported_b, per_worker(&tb, "kvgate_worker_load_drift_blocks"));
        }
        assert!(Instant::now() < deadline, "B never saw A's load: A booked {booked_a}, B counts {load_b}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    println!("A booked {} blocks; B counts {} from reports of {} (drift on B: {:?})", seen.0, seen.1, seen.2, seen.3);
    // B's /health shows each worker's last report (and its age) beside B's own bookings (none).
    let health: Value = c.get(format!("{}/health", b.base)).send().await.unwrap().json().await.unwrap();
    let workers = health["models"][0]["workers"].as_array().unwrap().clone();
    assert_eq!(workers.len(), WORKERS, "{health}");
    for w in &workers {
        let load = &w["load"];
        assert_eq!(load["booked"]["decode_blocks"], 0, "{health}");
        // A worker that has not reported since B started (its 1 s heartbeat) shows `null`.
        assert!(load["reported"].is_null() || load["reported"]["age_s"].as_f64().is_some_and(|a| a < 3.0), "{health}");
    }
    let reported: u64 = workers.iter().filter_map(|w| w["load"]["reported"]["decode_blocks"].as_u64()).sum();
    assert!(reported > 0, "A's load reported by the workers: {health}");
    for r in inflight {
        r.await.unwrap();
    }

    // Once quiet: B's index equals A's, and B counts the workers idle again.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (ta, tb) = (metrics(&c, &a.base).await, metrics(&c, &b.base).await);
        if exact(&ta, &tb)
            && total(&tb, "kvgate_worker_load_requests") == 0
            && scalar(&ta, "kvgate_kv_index_entries") > 0
        {
            break;
        }
        assert!(Instant::now() < deadline, "B's index or load never matched A's:\nA:\n{ta}\nB:\n{tb}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // A frontend started late: exact within seconds (its index from the first-sight dumps, its
    // load from the next heartbeat).
    let started = Instant::now();
    let late = frontend(&etcd_url, &nats_url, "frontend C");
    let listening = started.elapsed();
    let ta = metrics(&c, &a.base).await;
    loop {
        let tc = metrics(&c, &late.base).await;
        if exact(&ta, &tc) {
            break;
        }
        assert!(
            started.elapsed() < CATCH_UP_TIMEOUT + listening,
            "the late frontend is not exact:\nA:\n{ta}\nC:\n{tc}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    println!(
        "late frontend: listening after {listening:?}, exact (index of {} entries, every load reported) after {:?}",
        scalar(&ta, "kvgate_kv_index_entries"),
        started.elapsed()
    );
}
