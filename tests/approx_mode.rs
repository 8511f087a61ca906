//! Approximate mode: workers without KV events are routed on a prediction of their cache made
//! from what was sent to them. Over HTTP through `kvgate serve --no-kv-events` (mocker workers
//! that publish nothing), and at the control plane for the switch to exact when events begin.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use serde_json::{json, Value};

use kvgate::contract::events::{EngineHash, KvEvent, KvEventKind, StoredBlock};
use kvgate::contract::{WorkerId, WorkerRole};
use kvgate::frontend::control::recovery::InProcessRecovery;
use kvgate::frontend::{control, Frontend, HttpLimits, Prediction};
use kvgate::kv::approx::ApproxConfig;
use kvgate::kv::hash::SeqHash;
use kvgate::kv::index::KvIndex;
use kvgate::planes::discovery::{InProcessDiscovery, WorkerInfo};
use kvgate::planes::events::{self, EventPublisher};
use kvgate::planes::request::InProcessRequestPlane;
use kvgate::preprocess::{ModelSource, Preprocessor};
use kvgate::router::{RouterConfig, RouterCost, RouterMode};

async fn chat(c: &reqwest::Client, base: &str, messages: &Value) -> (String, Value) {
    let body = json!({"model": "kvgate-mock", "messages": messages, "max_tokens": 24, "ignore_eos": true});
    let r = c.post(format!("{base}/v1/chat/completions")).json(&body).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let worker = r.headers()["x-kvgate-worker"].to_str().unwrap().to_string();
    (worker, r.json().await.unwrap())
}

async fn health(c: &reqwest::Client, base: &str) -> Vec<Value> {
    let v: Value = c.get(format!("{base}/health")).send().await.unwrap().json().await.unwrap();
    v["models"][0]["workers"].as_array().unwrap().clone()
}

/// Every conversation's second turn goes to the worker of its first (predicted there: the
/// mockers publish nothing), finds its prefix really cached on that worker, and `/health` and
/// `/metrics` say every worker is approximate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn second_turn_follows_the_first_without_events() {
    let s = serve(&["--speedup-ratio", "1000", "--workers", "4", "--no-kv-events"]);
    let base = base_url(&s);
    let c = reqwest::Client::new();
    let workers = health(&c, &base).await;
    assert_eq!(workers.len(), 4);
    assert!(workers.iter().all(|w| w["kv_state"] == "approximate"), "{workers:?}");

    // First turns all at once, so that load spreads them over the workers (they share the chat
    // template's first block, which alone would draw them to one worker).
    let mut first = Vec::new();
    for conv in 0..8 {
        let (c, base) = (c.clone(), base.clone());
        first.push(tokio::spawn(async move {
            let system = rail_system_prompt(&format!("conversation {conv}"));
            let messages = json!([
                {"role": "system", "content": system},
                {"role": "user", "content": "Which platform does the 07:42 to Leeds leave from?"}
            ]);
            let (w1, v1) = chat(&c, &base, &messages).await;
            (messages, w1, v1)
        }));
    }
    let mut first_workers = std::collections::HashSet::new();
    let mut turns = Vec::new();
    for h in first {
        let t = h.await.unwrap();
        first_workers.insert(t.1.clone());
        turns.push(t);
    }
    assert!(first_workers.len() >= 2, "the first turns all went to one worker: {first_workers:?}");
    // Second turns one by one, on an idle fleet: only the predictions tell the workers apart.
    for (conv, (mut messages, w1, v1)) in turns.into_iter().enumerate() {
        let answer = v1["choices"][0]["message"]["content"].as_str().unwrap().to_string();
        let list = messages.as_array_mut().unwrap();
        list.push(json!({"role": "assistant", "content": answer}));
        list.push(json!({"role": "user", "content": "And is the connection at York guaranteed?"}));
        let (w2, v2) = chat(&c, &base, &messages).await;
        assert_eq!(w2, w1, "conversation {conv}: the second turn left the first turn's worker");
        let cached = v2["usage"]["prompt_tokens_details"]["cached_tokens"].as_u64().unwrap();
        let prompt = v2["usage"]["prompt_tokens"].as_u64().unwrap();
        assert!(cached >= 16 * 10 && cached < prompt, "conversation {conv}: {cached} of {prompt} cached");
    }

    let text = c.get(format!("{base}/metrics")).send().await.unwrap().text().await.unwrap();
    let gauges: Vec<&str> = text.lines().filter(|l| l.starts_with("kvgate_worker_kv_approximate{")).collect();
    assert_eq!(gauges.len(), 4, "{gauges:?}");
    assert!(gauges.iter().all(|l| l.ends_with(" 1")), "{gauges:?}");
    assert!(metric(&c, &base, "kvgate_kv_predicted_blocks_stored_total").await > 0.0);
    assert_eq!(metric(&c, &base, "kvgate_kv_events_applied_total").await, 0.0, "the mockers published events");
    assert!(metric(&c, &base, "kvgate_kv_index_entries").await > 0.0);
    assert_eq!(metric(&c, &base, "kvgate_kv_predictions_dropped_total").await, 0.0);
}

/// Without the flag, mocker workers publish events and are exact everywhere a user looks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_with_events_are_exact() {
    let s = serve(&["--speedup-ratio", "1000", "--workers", "2"]);
    let base = base_url(&s);
    let c = reqwest::Client::new();
    let messages =
        json!([{"role": "system", "content": rail_system_prompt("exact")}, {"role": "user", "content": "hi"}]);
    chat(&c, &base, &messages).await;
    assert!(health(&c, &base).await.iter().all(|w| w["kv_state"] == "exact"));
    let text = c.get(format!("{base}/metrics")).send().await.unwrap().text().await.unwrap();
    let gauges: Vec<&str> = text.lines().filter(|l| l.starts_with("kvgate_worker_kv_approximate{")).collect();
    assert_eq!(gauges.len(), 2);
    assert!(gauges.iter().all(|l| l.ends_with(" 0")), "{gauges:?}");
    wait_for_index(&c, &base, 1).await;
    assert_eq!(metric(&c, &base, "kvgate_kv_predicted_blocks_stored_total").await, 0.0);
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

/// A worker registered without events is predicted; its first real event drops the predictions,
/// applies, and turns it exact; later predictions for it are ignored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_switch_an_approximate_worker_to_exact() {
    let (index, writer) = KvIndex::new();
    let plane = InProcessRequestPlane::new();
    let discovery = InProcessDiscovery::new();
    let (publisher, subscriber) = events::in_process();
    let cfg = RouterConfig {
        mode: RouterMode::Kv,
        cost: RouterCost::default(),
        overlap_weight: 1.0,
        temperature: 0.0,
        block_size: 16,
    };
    let limits = HttpLimits { max_body_bytes: 1 << 20, migration_limit: 0, disagg: Default::default() };
    let fe = Arc::new(Frontend::new(plane, index.clone(), cfg, limits, 1).with_approx(ApproxConfig::default()));
    let model = fe.add_model("m", Arc::new(Preprocessor::load(&ModelSource::parse(None)).unwrap()), 16);
    tokio::spawn(control::run(
        fe.clone(),
        writer,
        discovery.subscribe(),
        subscriber,
        Arc::new(InProcessRecovery::new()),
    ));

    let id = WorkerId(9);
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
        kv_events: false,
    });
    eventually("the worker is published", || model.workers.load().len() == 1).await;
    assert_eq!(model.workers.load().kv_state(id), "approximate");

    let seq: Vec<SeqHash> = (1..=5).map(SeqHash).collect();
    fe.predict(0, Prediction::of(id, &seq));
    eventually("the prediction is in the index", || index.cached_blocks(id) == 5).await;
    assert_eq!(index.find_matches(&seq).overlap(id), 5);

    let blocks = vec![StoredBlock { seq_hash: SeqHash(1), engine_hash: EngineHash(77) }];
    let kind = KvEventKind::Stored { parent: None, blocks };
    publisher.publish(vec![KvEvent { worker: id, event_id: 1, timestamp_us: 0, kind }]).await;
    eventually("the worker turns exact", || model.workers.load().kv_state(id) == "exact").await;
    eventually("its predictions are gone", || index.cached_blocks(id) == 1).await;
    assert_eq!(index.find_matches(&seq).overlap(id), 1);
    assert_eq!(fe.metrics.control.kv_events_applied.load(std::sync::atomic::Ordering::Relaxed), 1);

    fe.predict(0, Prediction::of(id, &seq));
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(index.cached_blocks(id), 1, "a prediction for an exact worker was applied");
}
