//! etcd discovery against a real etcd (Debian `etcd-server`), started per test on free ports.

mod support;

use std::time::{Duration, Instant};

use etcd_client::GetOptions;
use kvgate::contract::{WorkerId, WorkerRole};
use kvgate::planes::discovery::etcd::{worker_key, EtcdDiscovery};
use kvgate::planes::discovery::{WorkerInfo, WorkerSnapshot};
use support::{wait_for, Etcd};

const NS: &str = "dynamo";
/// Long enough never to expire during a test unless the test means it to.
const TTL: Duration = Duration::from_secs(10);
/// Waits on the watch: a change normally shows in milliseconds; recovery after a restart takes
/// a backoff or two.
const WAIT: Duration = Duration::from_secs(15);

fn worker(id: u64, model: &str, role: WorkerRole) -> WorkerInfo {
    WorkerInfo {
        id: WorkerId(id),
        model: model.into(),
        model_path: None,
        role,
        page_size: 16,
        kv_capacity_blocks: 16384,
        max_num_seqs: 256,
        max_num_batched_tokens: 8192,
        address: Some(format!("127.0.0.1:{}", 9000 + id)),
        engine: Default::default(),
        disagg: Default::default(),
        bootstrap: None,
        kv_events: true,
    }
}

fn ids(s: &WorkerSnapshot) -> Vec<u64> {
    let mut v: Vec<u64> = s.iter().map(|w| w.id.0).collect();
    v.sort();
    v
}

/// What `etcdctl get --prefix /dynamo/workers/` would print: (key, decoded value).
async fn etcd_get_prefix(d: &EtcdDiscovery) -> Vec<(String, WorkerInfo)> {
    let resp = d.client().get("/dynamo/workers/", Some(GetOptions::new().with_prefix())).await.unwrap();
    resp.kvs()
        .iter()
        .map(|kv| (kv.key_str().unwrap().to_string(), serde_json::from_slice(kv.value()).unwrap()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registered_workers_are_listed_watched_and_revoked() {
    support::init_logs();
    let etcd = Etcd::start();
    let d = EtcdDiscovery::connect(&[etcd.endpoint()], NS).await.unwrap();
    let mut all = d.watch(None).await.unwrap();
    let mut only_m = d.watch(Some("m")).await.unwrap();
    assert!(all.borrow().is_empty());

    let (w1, w2, w3) = (
        worker(1, "m", WorkerRole::Prefill),
        worker(2, "m", WorkerRole::Decode),
        worker(3, "m/x", WorkerRole::Aggregated),
    );
    let r1 = d.register(w1.clone(), TTL).await.unwrap();
    let r2 = d.register(w2.clone(), TTL).await.unwrap();
    let r3 = d.register(w3.clone(), TTL).await.unwrap();
    assert_eq!(r1.key(), "/dynamo/workers/m/prefill/1");

    wait_for(&mut all, WAIT, "all three in the snapshot", |s| ids(s) == [1, 2, 3]).await;
    let m = wait_for(&mut only_m, WAIT, "model m's two", |s| ids(s) == [1, 2]).await;
    assert!(m.contains(&w1) && m.contains(&w2), "the snapshot carries the registered values");
    let listed = etcd_get_prefix(&d).await;
    let keys: Vec<&str> = listed.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(keys, ["/dynamo/workers/m/decode/2", "/dynamo/workers/m/prefill/1", "/dynamo/workers/m/x/aggregated/3"]);
    assert!(listed.contains(&(worker_key(NS, &w2), w2.clone())), "value is the WorkerInfo JSON");

    r1.revoke().await.unwrap();
    assert_eq!(etcd_get_prefix(&d).await.len(), 2, "revoke returns once the key is gone");
    wait_for(&mut only_m, WAIT, "revoked worker gone", |s| ids(s) == [2]).await;

    drop(r2); // Drop revokes in the background.
    drop(r3);
    wait_for(&mut all, WAIT, "dropped registrations gone", |s| s.is_empty()).await;
    assert!(etcd_get_prefix(&d).await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_worker_disappears_when_its_lease_expires() {
    support::init_logs();
    let etcd = Etcd::start();
    let d = EtcdDiscovery::connect(&[etcd.endpoint()], NS).await.unwrap();
    let mut rx = d.watch(None).await.unwrap();
    // 4 s, refreshed every 1.3 s: when abandoned the lease has >= 2.6 s left, far more than the
    // 0.5 s check below even when a busy machine delays a refresh.
    let ttl = Duration::from_secs(4);
    let reg = d.register(worker(7, "m", WorkerRole::Aggregated), ttl).await.unwrap();
    wait_for(&mut rx, WAIT, "registered", |s| ids(s) == [7]).await;

    // Kept alive past its TTL while the worker lives.
    tokio::time::sleep(ttl + Duration::from_secs(1)).await;
    assert_eq!(ids(&rx.borrow()), [7], "keep-alive holds the lease");

    let killed = Instant::now();
    reg.abandon(); // no revoke: as if the process were killed
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(ids(&rx.borrow()), [7], "not revoked: the key stays until the lease expires");
    wait_for(&mut rx, ttl + Duration::from_secs(4), "expired", |s| s.is_empty()).await;
    let gone_after = killed.elapsed();
    assert!(gone_after >= Duration::from_millis(500), "{gone_after:?}");
    assert!(etcd_get_prefix(&d).await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_watch_and_the_lease_survive_an_etcd_restart() {
    support::init_logs();
    let mut etcd = Etcd::start();
    let d = EtcdDiscovery::connect(&[etcd.endpoint()], NS).await.unwrap();
    let mut rx = d.watch(None).await.unwrap();
    let _r1 = d.register(worker(1, "m", WorkerRole::Aggregated), TTL).await.unwrap();
    wait_for(&mut rx, WAIT, "first worker", |s| ids(s) == [1]).await;

    etcd.kill();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(ids(&rx.borrow()), [1], "the last snapshot is kept while etcd is down");
    etcd.restart();

    // The same discovery handle works again once its channel reconnects.
    let deadline = Instant::now() + WAIT;
    let r2 = loop {
        match d.register(worker(2, "m", WorkerRole::Decode), TTL).await {
            Ok(r) => break r,
            Err(e) if e.retryable() && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(200)).await
            }
            Err(e) => panic!("register after restart: {e}"),
        }
    };
    wait_for(&mut rx, WAIT, "the watcher sees a worker registered after the restart", |s| ids(s) == [1, 2]).await;
    r2.revoke().await.unwrap();
    wait_for(&mut rx, WAIT, "and a revoke after it", |s| ids(s) == [1]).await;

    // Worker 1's keep-alive recovered: it outlives a whole TTL after the restart.
    tokio::time::sleep(TTL + Duration::from_secs(1)).await;
    assert_eq!(ids(&rx.borrow()), [1]);
    assert_eq!(etcd_get_prefix(&d).await.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_endpoints_and_names_fail_clearly() {
    let port = support::free_port();
    let err = EtcdDiscovery::connect(&[format!("http://127.0.0.1:{port}")], NS).await.err().unwrap();
    assert!(err.to_string().contains("ETCD_ENDPOINTS"), "{err}");
    assert!(err.retryable());
    let err = EtcdDiscovery::connect(&["http://127.0.0.1:1".into()], "a/b").await.err().unwrap();
    assert!(!err.retryable(), "{err}");
}
