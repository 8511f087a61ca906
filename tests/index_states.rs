//! Each worker's index state (issue #18), with real processes: etcd, nats-server, a `kvgate
//! worker` (mocker) and a `kvgate frontend`. A worker whose KV events stop while it serves
//! (nats-server killed; requests still go over TCP) is shown blind within a bound, keeps being
//! routed, and after nats-server is back it is resynced (recovering) and exact again, and stays
//! exact under load; a frontend with `--no-kv-events` shows its workers approximate, never blind.
//! And at the control plane, with recoveries answered by hand: `recovering` while a replay is
//! pending, `blind` when it fails, back to `exact` through a resync. Bounds are generous:
//! nothing here measures time.

mod common;
mod support;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use support::{kvgate_command, Etcd, FrontendProc, KvgateProc, Nats, WorkerProc};

use kvgate::contract::control::{Recovery, RecoveryError, RecoverySource};
use kvgate::contract::events::{EngineHash, KvEvent, KvEventKind, StoredBlock};
use kvgate::contract::{Target, WorkerId, WorkerRole};
use kvgate::frontend::index_state::SILENT_BOUND;
use kvgate::frontend::{control, Frontend, HttpLimits, IndexState, ModelState, Prediction};
use kvgate::kv::hash::SeqHash;
use kvgate::kv::index::KvIndex;
use kvgate::planes::discovery::{InProcessDiscovery, Registration, WorkerInfo};
use kvgate::planes::events::{self, EventPublisher};
use kvgate::planes::request::InProcessRequestPlane;
use kvgate::preprocess::{ModelSource, Preprocessor};
use kvgate::router::{Booking, LoadGuard, RouterConfig, RouterMode};

/// Blind must show within this of the events stopping: 5 s of silence plus a 1 s check, with a
/// large margin for a loaded machine.
const BLIND_WITHIN: Duration = Duration::from_secs(30);
/// Exact again within this of nats-server's restart (clients reconnect within 2 s).
const EXACT_WITHIN: Duration = Duration::from_secs(30);

fn worker(etcd: &str, nats: &str) -> WorkerProc {
    let mut args = vec!["worker", "--etcd-endpoints", etcd, "--nats-server", nats];
    args.extend(["--advertise-host", "127.0.0.1", "--lease-ttl", "3", "--speedup-ratio", "5"]);
    WorkerProc::ready(KvgateProc::spawn("worker", kvgate_command(&args)))
}

fn frontend(etcd: &str, nats: &str, extra: &[&str]) -> FrontendProc {
    let mut args = vec!["frontend", "--http-host", "127.0.0.1", "--http-port", "0"];
    args.extend(["--etcd-endpoints", etcd, "--nats-server", nats, "--router-min-initial-workers", "1"]);
    args.extend_from_slice(extra);
    let f = FrontendProc::ready(KvgateProc::spawn("frontend", kvgate_command(&args)));
    f.wait_workers(1, Duration::from_secs(30));
    f
}

async fn health_worker(c: &reqwest::Client, base: &str) -> Value {
    let v: Value = c.get(format!("{base}/health")).send().await.unwrap().json().await.unwrap();
    v["models"][0]["workers"][0].clone()
}

async fn metrics(c: &reqwest::Client, base: &str) -> String {
    c.get(format!("{base}/metrics")).send().await.unwrap().text().await.unwrap()
}

/// The value of the first sample of the labeled metric `name` (one worker here); -1 if absent.
fn labeled(text: &str, name: &str) -> f64 {
    let prefix = format!("{name}{{");
    let line = text.lines().find(|l| l.starts_with(&prefix));
    line.and_then(|l| l.rsplit(' ').next()).and_then(|v| v.parse().ok()).unwrap_or(-1.0)
}

fn state_gauge(text: &str, state: &str) -> f64 {
    let line =
        text.lines().find(|l| l.starts_with("kvgate_worker_index_state{") && l.contains(&format!("state=\"{state}\"")));
    line.and_then(|l| l.rsplit(' ').next()).and_then(|v| v.parse().ok()).unwrap_or(-1.0)
}

fn transitions(text: &str, state: &str) -> f64 {
    let line = text
        .lines()
        .find(|l| l.starts_with("kvgate_worker_index_transitions_total{") && l.contains(&format!("state=\"{state}\"")));
    line.and_then(|l| l.rsplit(' ').next()).and_then(|v| v.parse().ok()).unwrap_or(-1.0)
}

/// Chat requests in a loop from `n` tasks until `stop`; counts the successes, panics on a failure.
fn load(
    c: &reqwest::Client,
    base: &str,
    n: usize,
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicU64>,
) -> Vec<tokio::task::JoinHandle<()>> {
    (0..n)
        .map(|i| {
            let (c, base, stop, ok) = (c.clone(), base.to_string(), stop.clone(), ok.clone());
            tokio::spawn(async move {
                let mut turn = 0;
                while !stop.load(Ordering::Relaxed) {
                    turn += 1;
                    let body = json!({"model": "kvgate-mock", "max_tokens": 64, "ignore_eos": true,
                        "messages": [{"role": "system", "content": common::rail_system_prompt(&format!("task {i}"))},
                                     {"role": "user", "content": format!("turn {turn}")}]});
                    let r = c.post(format!("{base}/v1/chat/completions")).json(&body).send().await.unwrap();
                    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
                    ok.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect()
}

/// Polls `/health` until the worker's `kv_state` is `want`; returns the worker's entry.
async fn wait_state(c: &reqwest::Client, base: &str, want: &str, within: Duration, f: &FrontendProc) -> Value {
    let t0 = Instant::now();
    loop {
        let w = health_worker(c, base).await;
        if w["kv_state"] == want {
            return w;
        }
        assert!(t0.elapsed() < within, "not {want} within {within:?}: {w}\n{}", f.proc.tail());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_whose_events_stop_is_blind_then_recovering_then_exact() {
    support::init_logs();
    let etcd = Etcd::start();
    let mut nats = Nats::start();
    let (etcd_url, nats_url) = (etcd.endpoint(), nats.url());
    let _w = worker(&etcd_url, &nats_url);
    let f = frontend(&etcd_url, &nats_url, &[]);
    let c = reqwest::Client::builder().timeout(Duration::from_secs(60)).build().unwrap();
    let (stop, ok) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicU64::new(0)));
    let tasks = load(&c, &f.base, 2, stop.clone(), ok.clone());

    // Events flow: exact, with a recent event.
    let w = wait_state(&c, &f.base, "exact", Duration::from_secs(30), &f).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let w2 = health_worker(&c, &f.base).await;
    assert!(w2["kv_event_age_s"].as_f64().is_some(), "no event seen: {w} {w2}");
    let m = metrics(&c, &f.base).await;
    assert_eq!(state_gauge(&m, "exact"), 1.0, "{m}");
    assert_eq!(state_gauge(&m, "blind"), 0.0);

    // The event plane dies; requests keep going to the worker over TCP.
    nats.kill();
    let killed = Instant::now();
    let blind = wait_state(&c, &f.base, "blind", BLIND_WITHIN, &f).await;
    eprintln!("blind {:?} after nats-server was killed: {blind}", killed.elapsed());
    assert!(blind["kv_event_age_s"].as_f64().unwrap() >= 4.0, "blind before the silence bound: {blind}");
    let m = metrics(&c, &f.base).await;
    assert_eq!(state_gauge(&m, "blind"), 1.0, "{m}");
    assert_eq!(labeled(&m, "kvgate_worker_kv_approximate"), 1.0, "a blind worker is routed approximately: {m}");
    let served_blind = ok.load(Ordering::Relaxed);
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(ok.load(Ordering::Relaxed) > served_blind, "a blind worker is still routed");
    let recovering_before = transitions(&m, "recovering");

    // The event plane is back: the worker's next event resyncs it (recovering), then exact.
    nats.restart();
    let restarted = Instant::now();
    wait_state(&c, &f.base, "exact", EXACT_WITHIN, &f).await;
    eprintln!("exact {:?} after nats-server restarted", restarted.elapsed());
    let m = metrics(&c, &f.base).await;
    assert!(transitions(&m, "recovering") > recovering_before, "no resync seen: {m}");
    let out = f.proc.output();
    assert!(out.contains("index blind"), "the blind transition is logged");
    assert!(out.contains("resyncing a blind worker"), "the resync is logged");

    // Events flow again: it stays exact under load for longer than the silence bound.
    let blind_count = transitions(&m, "blind");
    tokio::time::sleep(Duration::from_secs(8)).await;
    let m = metrics(&c, &f.base).await;
    let now = health_worker(&c, &f.base).await;
    assert_eq!(transitions(&m, "blind"), blind_count, "blind again while events flow: {now}");
    assert!(now["kv_event_age_s"].as_f64().unwrap() < 5.0, "{now}");
    assert!(labeled(&m, "kvgate_worker_cached_blocks") > 0.0, "the resynced index holds its blocks: {m}");
    assert_eq!(labeled(&m, "kvgate_worker_kv_approximate"), 0.0);

    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_without_events_are_approximate_and_never_blind() {
    support::init_logs();
    let etcd = Etcd::start();
    let nats = Nats::start();
    let (etcd_url, nats_url) = (etcd.endpoint(), nats.url());
    let _w = worker(&etcd_url, &nats_url);
    let f = frontend(&etcd_url, &nats_url, &["--no-kv-events"]);
    let c = reqwest::Client::builder().timeout(Duration::from_secs(60)).build().unwrap();
    assert_eq!(health_worker(&c, &f.base).await["kv_state"], "approximate");
    let (stop, ok) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicU64::new(0)));
    let tasks = load(&c, &f.base, 2, stop.clone(), ok.clone());
    // Busy for longer than the silence bound, with no event ever applied: still approximate.
    tokio::time::sleep(Duration::from_secs(8)).await;
    let w = health_worker(&c, &f.base).await;
    assert_eq!(w["kv_state"], "approximate", "{w}");
    assert!(w["kv_event_age_s"].is_null(), "events are ignored: {w}");
    let m = metrics(&c, &f.base).await;
    assert_eq!(state_gauge(&m, "approximate"), 1.0, "{m}");
    assert_eq!(transitions(&m, "blind"), 0.0);
    assert!(ok.load(Ordering::Relaxed) > 0);
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.unwrap();
    }
}

/// A recovery source the test answers by hand: each call sends its `since` and waits for the
/// answer the test gives.
struct Scripted {
    calls: tokio::sync::mpsc::Sender<Asked>,
}

impl RecoverySource for Scripted {
    async fn recover(&self, to: Target, since: u64) -> Result<Recovery, RecoveryError> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.calls.send((since, tx)).await.map_err(|_| RecoveryError::Unknown(to.worker))?;
        rx.await.map_err(|_| RecoveryError::Unknown(to.worker))?
    }
}

fn stored(worker: WorkerId, event_id: u64, seq: u64) -> KvEvent {
    let blocks = vec![StoredBlock { seq_hash: SeqHash(seq), engine_hash: EngineHash(seq) }];
    KvEvent { worker, event_id, timestamp_us: 0, kind: KvEventKind::Stored { parent: None, blocks } }
}

/// The control plane's transitions, one by one: recovering while a join's sync and a gap's
/// replay are pending (the test holds the answer), exact after; blind when a recovery fails;
/// back through a resync from event 0 (here a dump) when its next event arrives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recovering_while_the_replay_is_pending_blind_when_it_fails() {
    let (index, writer) = KvIndex::new();
    let discovery = InProcessDiscovery::new();
    let (publisher, subscriber) = events::in_process();
    let cfg = RouterConfig {
        mode: RouterMode::Kv,
        cost: kvgate::router::RouterCost::default(),
        overlap_weight: 1.0,
        temperature: 0.0,
        block_size: 16,
    };
    let limits = HttpLimits { max_body_bytes: 1 << 20, migration_limit: 0, disagg: Default::default() };
    let fe = Arc::new(Frontend::new(InProcessRequestPlane::new(), index.clone(), cfg, limits, 1));
    let model = fe.add_model("m", Arc::new(Preprocessor::load(&ModelSource::parse(None)).unwrap()), 16);
    let (calls, mut asked) = tokio::sync::mpsc::channel(4);
    tokio::spawn(control::run(fe.clone(), writer, discovery.subscribe(), subscriber, Arc::new(Scripted { calls })));
    let id = WorkerId(7);
    let _reg = discovery.register(WorkerInfo {
        id,
        model: "m".into(),
        model_path: None,
        role: WorkerRole::Aggregated,
        page_size: 16,
        kv_capacity_blocks: 1000,
        max_num_seqs: 256,
        max_num_batched_tokens: 8192,
        address: None,
        engine: Default::default(),
        disagg: Default::default(),
        bootstrap: None,
        kv_events: true,
    });
    let state = || model.workers.load().kv_state(id);

    // Joined: recovering until its sync answers.
    let (since, answer) = next(&mut asked).await;
    assert_eq!((since, state()), (0, "recovering"));
    answer.send(Ok(Recovery::Replay(vec![]))).unwrap();
    eventually("exact after the join's sync", || state() == "exact").await;

    // Event 1 applies; event 4 shows a gap: recovering for as long as the replay is pending.
    publisher.publish(vec![stored(id, 1, 1)]).await;
    publisher.publish(vec![stored(id, 4, 4)]).await;
    let (since, answer) = next(&mut asked).await;
    assert_eq!(since, 1);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(state(), "recovering");
    answer.send(Ok(Recovery::Replay(vec![stored(id, 2, 2), stored(id, 3, 3)]))).unwrap();
    eventually("exact after the replay", || state() == "exact").await;
    eventually("every block applied", || index.cached_blocks(id) == 4).await;

    // The next gap's recovery fails: blind, routed approximately, blocks kept.
    publisher.publish(vec![stored(id, 9, 9)]).await;
    let (_, answer) = next(&mut asked).await;
    answer.send(Err(RecoveryError::Unknown(id))).unwrap();
    eventually("blind after a failed recovery", || state() == "blind").await;
    assert!(model.workers.load().is_approximate(id));
    assert_eq!(index.cached_blocks(id), 4, "what was known stays");
    fe.predict(0, Prediction::of(id, &[SeqHash(100), SeqHash(101)]));
    eventually("a blind worker's prediction is recorded", || index.cached_blocks(id) == 6).await;

    // Its next event (after the back-off) resyncs it from event 0: a dump replaces everything.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    publisher.publish(vec![stored(id, 10, 10)]).await;
    let (since, answer) = next(&mut asked).await;
    assert_eq!((since, state()), (0, "recovering"));
    let dump = vec![stored(id, 10, 1), stored(id, 10, 10)];
    answer.send(Ok(Recovery::Dump { events: dump, last_event_id: 10 })).unwrap();
    eventually("exact after the resync", || state() == "exact").await;
    assert_eq!(index.cached_blocks(id), 2, "predictions and stale blocks dropped, the dump applied");
    let e = model.workers.load().entries[&id].kv.clone();
    assert_eq!(e.transitions(IndexState::Blind), 1);
    // The join, the two gaps, the resync.
    assert_eq!(e.transitions(IndexState::Recovering), 4);
    assert!(fe
        .render_metrics()
        .contains(&format!("kvgate_worker_index_state{{model=\"m\",worker=\"{id}\",state=\"exact\"}} 1")));
}

/// The silence rule at the control plane: a worker with a request in flight and no event for
/// 5 s is asked for what it published since; nothing means it was only quiet (still exact, asked
/// again after another 5 s of silence); events it published that never arrived make it blind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_silent_worker_is_probed_and_blind_only_if_events_were_lost() {
    let (fe, model, publisher, mut asked, id, _reg) = control_plane(WorkerId(8)).await;
    let state = || model.workers.load().kv_state(id);
    publisher.publish(vec![stored(id, 1, 1)]).await;
    eventually("the event applies", || fe.index.cached_blocks(id) == 1).await;
    let load = model.workers.load().entries[&id].load.clone();
    let _busy = LoadGuard::book(load, id, 0, Booking { prefill_tokens: 16, decode_blocks: 1 });

    let t0 = Instant::now();
    let (since, answer) = next_within(&mut asked, Duration::from_secs(30)).await;
    let first = t0.elapsed();
    assert!(first >= SILENT_BOUND - Duration::from_millis(1100), "probed after {first:?}");
    assert_eq!((since, state()), (1, "exact"));
    answer.send(Ok(Recovery::Replay(vec![]))).unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(state(), "exact", "quiet, nothing lost");

    // Asked again once silent for another 5 s, it names an event that never arrived: blind.
    // (The periodic sync may ask in between and gets the same kind of answer, which it applies
    // without judging the stream.)
    let deadline = Instant::now() + Duration::from_secs(40);
    while state() != "blind" {
        let (since, answer) = next_within(&mut asked, deadline.saturating_duration_since(Instant::now())).await;
        answer.send(Ok(Recovery::Replay(vec![stored(id, since + 1, since + 1)]))).unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(t0.elapsed() >= first + SILENT_BOUND - Duration::from_millis(1100), "the silence was not timed anew");
    assert!(fe.index.cached_blocks(id) >= 2, "the probe's replay applied");
}

/// A frontend serving model `m` with its control plane, and worker `id` (with KV events)
/// registered and past its join's sync: the frontend, the model, the event publisher, the
/// recoveries asked for, `id`, and its registration (it leaves when that drops).
async fn control_plane(
    id: WorkerId,
) -> (
    Arc<Frontend<InProcessRequestPlane>>,
    Arc<ModelState>,
    events::InProcessPublisher,
    tokio::sync::mpsc::Receiver<Asked>,
    WorkerId,
    Registration,
) {
    let (index, writer) = KvIndex::new();
    let discovery = InProcessDiscovery::new();
    let (publisher, subscriber) = events::in_process();
    let cfg = RouterConfig {
        mode: RouterMode::Kv,
        cost: kvgate::router::RouterCost::default(),
        overlap_weight: 1.0,
        temperature: 0.0,
        block_size: 16,
    };
    let limits = HttpLimits { max_body_bytes: 1 << 20, migration_limit: 0, disagg: Default::default() };
    let fe = Arc::new(Frontend::new(InProcessRequestPlane::new(), index, cfg, limits, 1));
    let model = fe.add_model("m", Arc::new(Preprocessor::load(&ModelSource::parse(None)).unwrap()), 16);
    let (calls, mut asked) = tokio::sync::mpsc::channel(4);
    tokio::spawn(control::run(fe.clone(), writer, discovery.subscribe(), subscriber, Arc::new(Scripted { calls })));
    let reg = discovery.register(WorkerInfo {
        id,
        model: "m".into(),
        model_path: None,
        role: WorkerRole::Aggregated,
        page_size: 16,
        kv_capacity_blocks: 1000,
        max_num_seqs: 256,
        max_num_batched_tokens: 8192,
        address: None,
        engine: Default::default(),
        disagg: Default::default(),
        bootstrap: None,
        kv_events: true,
    });
    let (_, answer) = next(&mut asked).await;
    answer.send(Ok(Recovery::Replay(vec![]))).unwrap();
    eventually("exact after the join's sync", || model.workers.load().kv_state(id) == "exact").await;
    (fe, model, publisher, asked, id, reg)
}

async fn next_within(asked: &mut tokio::sync::mpsc::Receiver<Asked>, within: Duration) -> Asked {
    let r = tokio::time::timeout(within, asked.recv()).await;
    r.expect("a recovery is asked for").expect("open")
}

/// One recovery the control plane asked for: its `since`, and where to answer.
type Asked = (u64, tokio::sync::oneshot::Sender<Result<Recovery, RecoveryError>>);

async fn next(asked: &mut tokio::sync::mpsc::Receiver<Asked>) -> Asked {
    let r = tokio::time::timeout(Duration::from_secs(10), asked.recv()).await;
    r.expect("a recovery is asked for").expect("open")
}

async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    for _ in 0..500 {
        if cond() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("never: {what}");
}
