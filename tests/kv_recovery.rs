//! A router that misses KV events recovers them from the worker: replay for a short gap, a
//! cache dump for a long one. Real mocker workers, the real index and control plane; the event
//! plane between them drops batches on purpose.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use kvgate::contract::events::KvEvent;
use kvgate::contract::{GenerateRequest, SamplingParams, Target, WorkerId, WorkerOutput, WorkerRole};
use kvgate::frontend::control::recovery::InProcessRecovery;
use kvgate::frontend::{control, Frontend, HttpLimits};
use kvgate::kv::hash::BlockHasher;
use kvgate::kv::index::{KvIndex, KvIndexWriter};
use kvgate::planes::discovery::{InProcessDiscovery, WorkerInfo};
use kvgate::planes::events::{self, EventSubscriber, InProcessSubscriber};
use kvgate::planes::request::{InProcessRequestPlane, RequestPlane};
use kvgate::router::{RouterConfig, RouterCost, RouterMode};
use kvgate::worker::{spawn, Engine, EventRing, Mocker, MockerArgs, MockerConfig};

#[path = "common/echo_engine.rs"]
mod echo_engine;
use echo_engine::EchoEngine;

/// Forwards every batch to a reference index (the truth) and drops the batches `drop` selects.
struct Lossy {
    inner: InProcessSubscriber,
    truth: KvIndexWriter,
    seen: Arc<AtomicUsize>,
    dropped: Arc<AtomicUsize>,
    drop: Arc<dyn Fn(usize) -> bool + Send + Sync>,
}

impl EventSubscriber for Lossy {
    async fn next_batch(&mut self) -> Option<Vec<KvEvent>> {
        loop {
            let batch = self.inner.next_batch().await?;
            for e in &batch {
                let _ = self.truth.apply(e);
            }
            let n = self.seen.fetch_add(1, Ordering::SeqCst);
            if !(self.drop)(n) {
                return Some(batch);
            }
            self.dropped.fetch_add(1, Ordering::SeqCst);
        }
    }
}

/// A mocker worker with `num_blocks` blocks.
fn mocker(num_blocks: u64) -> (Mocker, u64) {
    let args = MockerArgs { num_gpu_blocks: num_blocks, speedup_ratio: 1000.0, ..MockerArgs::default() };
    let config = MockerConfig::from_args(&args, 16).unwrap();
    (Mocker::new(WorkerId(42), config, Arc::from(vec![1000u32; 64])), num_blocks)
}

async fn run_case(
    (engine, num_blocks): (impl Engine, u64),
    ring: EventRing,
    drop: Arc<dyn Fn(usize) -> bool + Send + Sync>,
    rounds: usize,
    min_dropped: usize,
    losing: Arc<AtomicBool>,
) -> (u64, u64) {
    let page = 16u32;
    let (index, writer) = KvIndex::new();
    let (truth, truth_writer) = KvIndex::new();
    let plane = InProcessRequestPlane::new();
    let discovery = InProcessDiscovery::new();
    let (publisher, subscriber) = events::in_process();
    let cfg = RouterConfig {
        mode: RouterMode::Kv,
        cost: RouterCost::default(),
        overlap_weight: 1.0,
        temperature: 0.0,
        block_size: page,
    };
    let fe = Arc::new(Frontend::new(
        plane.clone(),
        index.clone(),
        cfg,
        HttpLimits { max_body_bytes: 1 << 20, migration_limit: 0, disagg: Default::default() },
        1,
    ));
    let recovery = Arc::new(InProcessRecovery::new());
    let seen = Arc::new(AtomicUsize::new(0));
    let dropped = Arc::new(AtomicUsize::new(0));
    let lossy = Lossy { inner: subscriber, truth: truth_writer, seen: seen.clone(), dropped: dropped.clone(), drop };
    tokio::spawn(control::run(fe.clone(), writer, discovery.subscribe(), lossy, recovery.clone()));

    let id = WorkerId(42);
    let handle = spawn(id, engine, plane.attach(id), publisher, ring);
    recovery.insert(handle.control());
    let _reg = discovery.register(WorkerInfo {
        id,
        model: "m".into(),
        model_path: None,
        role: WorkerRole::Aggregated,
        page_size: page,
        kv_capacity_blocks: num_blocks,
        max_num_seqs: 256,
        max_num_batched_tokens: 8192,
        address: None,
        engine: Default::default(),
        disagg: Default::default(),
        bootstrap: None,
        kv_events: true,
    });

    // Prompts sharing prefixes, enough of them to evict when the cache is small. The runtime
    // coalesces events into fewer batches when the machine is busy, so keep sending new prompts
    // until the event plane has really lost `min_dropped` batches: a case that lost nothing
    // would prove nothing.
    let prompt = |r: usize| -> Vec<u32> {
        let mut p: Vec<u32> = (0..64).collect();
        p.extend((0..(48 + (r % 5) * 16) as u32).map(|t| t * 31 + r as u32));
        p
    };
    let mut prompts = Vec::new();
    let losses_deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let mut r = 0;
    while r < rounds || dropped.load(Ordering::SeqCst) < min_dropped {
        assert!(
            tokio::time::Instant::now() < losses_deadline,
            "the event plane lost only {} batches of {} seen",
            dropped.load(Ordering::SeqCst),
            seen.load(Ordering::SeqCst)
        );
        let p = prompt(r);
        let req = GenerateRequest {
            request_id: r as u64,
            token_ids: p.clone(),
            sampling: SamplingParams { max_tokens: 20, ignore_eos: true, ..SamplingParams::default() },
            eos_token_ids: vec![],
            disagg: None,
            trace: None,
        };
        prompts.push(p);
        r += 1;
        let mut rx = plane.generate(Target::in_process(id), req).await.unwrap();
        while let Some(out) = rx.recv().await {
            if matches!(out, WorkerOutput::Finished { .. } | WorkerOutput::Error(_)) {
                break;
            }
        }
        if r >= rounds {
            // Let the publisher catch up before deciding more prompts are needed.
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    losing.store(false, Ordering::SeqCst);
    // More requests after the losses so the index sees a gap and recovers.
    let hasher = BlockHasher::new(page as usize);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let agree = prompts.iter().all(|p| {
            let seq = hasher.seq_hashes(p);
            index.find_matches(&seq).overlap(id) == truth.find_matches(&seq).overlap(id)
        }) && index.cached_blocks(id) == truth.cached_blocks(id);
        if agree && index.cached_blocks(id) > 0 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the index never converged: {} vs {} blocks",
            index.cached_blocks(id),
            truth.cached_blocks(id)
        );
        let req = GenerateRequest {
            request_id: 9999,
            token_ids: prompts[0].clone(),
            sampling: SamplingParams { max_tokens: 2, ignore_eos: true, ..SamplingParams::default() },
            eos_token_ids: vec![],
            disagg: None,
            trace: None,
        };
        let mut rx = plane.generate(Target::in_process(id), req).await.unwrap();
        while rx.recv().await.is_some() {}
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(seen.load(Ordering::SeqCst) > 0);
    let c = &fe.metrics.control;
    (c.kv_recoveries_replay.load(Ordering::SeqCst), c.kv_recoveries_dump.load(Ordering::SeqCst))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn short_gap_recovers_by_replay() {
    // Drop a few batches early on: well inside the worker's replay ring.
    let losing = Arc::new(AtomicBool::new(true));
    let (replays, dumps) =
        run_case(mocker(4096), EventRing::default(), Arc::new(|n| (3..6).contains(&n)), 12, 3, losing).await;
    assert!(replays >= 1 && dumps == 0, "replays {replays}, dumps {dumps}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_gap_recovers_from_a_dump() {
    // Drop everything for a long stretch (more events than the worker's replay ring keeps),
    // under eviction pressure.
    let losing = Arc::new(AtomicBool::new(true));
    let l = losing.clone();
    let drop = Arc::new(move |n| n >= 1 && l.load(Ordering::SeqCst));
    let (_, dumps) = run_case(mocker(64), EventRing::default(), drop, 1500, 1, losing).await;
    assert!(dumps >= 1, "expected a dump recovery");
}

/// An engine written only against the `Engine` trait (it cannot list its cache) is recovered by
/// the runtime: replay from its ring for a short gap, a dump of the published mirror beyond it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_engine_that_cannot_dump_is_recovered_by_the_runtime() {
    let echo = || (EchoEngine { page_size: 16, capacity_blocks: 24 }, 24);
    let losing = Arc::new(AtomicBool::new(true));
    let (replays, dumps) =
        run_case(echo(), EventRing::default(), Arc::new(|n| (3..6).contains(&n)), 12, 3, losing).await;
    assert!(replays >= 1 && dumps == 0, "replays {replays}, dumps {dumps}");

    let losing = Arc::new(AtomicBool::new(true));
    let l = losing.clone();
    let drop = Arc::new(move |n| n >= 1 && l.load(Ordering::SeqCst));
    let (_, dumps) = run_case(echo(), EventRing::new(4, 1 << 10), drop, 60, 1, losing).await;
    assert!(dumps >= 1, "expected a dump recovery");
}
