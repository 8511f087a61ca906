//! Router tests: selection per mode against a real index and load cells.

use rand::rngs::SmallRng;
use rand::SeedableRng;

use super::*;
use crate::contract::events::{EngineHash, KvEvent, KvEventKind, StoredBlock};
use crate::contract::LoadReport;
use crate::kv::index::KvIndexWriter;

const B: u32 = 16;

fn config(mode: RouterMode) -> RouterConfig {
    RouterConfig { mode, cost: RouterCost::default(), overlap_weight: 1.0, temperature: 0.0, block_size: B }
}

fn candidates(n: u64) -> Vec<Candidate> {
    (1..=n).map(|id| Candidate { id: WorkerId(id), load: WorkerLoad::new() }).collect()
}

fn seqs(n: u64) -> Vec<SeqHash> {
    (1..=n).map(SeqHash).collect()
}

fn store(writer: &mut KvIndexWriter, worker: u64, event_id: u64, seq: &[SeqHash]) {
    let blocks = seq.iter().map(|&s| StoredBlock { seq_hash: s, engine_hash: EngineHash(s.0) }).collect();
    let kind = KvEventKind::Stored { parent: None, blocks };
    writer.apply(&KvEvent { worker: WorkerId(worker), event_id, timestamp_us: 0, kind }).unwrap();
}

fn req<'a>(seq: &'a [SeqHash], cands: &'a [Candidate]) -> RouteRequest<'a> {
    RouteRequest { seq_hashes: seq, prompt_tokens: seq.len() as u32 * B, candidates: cands, shard: 0, overlaps: None }
}

#[test]
fn no_candidates_is_an_error() {
    let (index, _w) = KvIndex::new();
    let r = Router::new(config(RouterMode::Kv), index);
    let err = r.select(req(&seqs(2), &[]), &mut SmallRng::seed_from_u64(1)).unwrap_err();
    assert_eq!(err, RouteError::NoWorkers);
}

#[test]
fn kv_picks_longest_prefix_when_loads_are_equal() {
    let (index, mut writer) = KvIndex::new();
    let q = seqs(8);
    store(&mut writer, 1, 1, &q[..2]);
    store(&mut writer, 2, 1, &q[..6]);
    store(&mut writer, 3, 1, &q[..4]);
    let cands = candidates(4);
    let r = Router::new(config(RouterMode::Kv), index);
    let d = r.select(req(&q, &cands), &mut SmallRng::seed_from_u64(1)).unwrap();
    assert_eq!((d.worker, d.overlap_blocks), (WorkerId(2), 6));
    let overlaps: Vec<u32> = d.scores.iter().map(|s| s.overlap_blocks).collect();
    assert_eq!(overlaps, [2, 6, 4, 0]);
    // 128 prompt tokens, 96 cached: 32 to prefill; 8 blocks booked.
    let l = &cands[1].load;
    assert_eq!((l.active_prefill_tokens(), l.active_decode_blocks(), l.active_requests()), (32, 8, 1));
    drop(d);
    assert_eq!((l.active_prefill_tokens(), l.active_decode_blocks(), l.active_requests()), (0, 0, 0));
}

#[test]
fn load_pushes_away_from_a_busy_worker_with_equal_overlap() {
    let (index, mut writer) = KvIndex::new();
    let q = seqs(4);
    store(&mut writer, 1, 1, &q);
    store(&mut writer, 2, 1, &q);
    let cands = candidates(2);
    let _busy = LoadGuard::book(cands[0].load.clone(), WorkerId(1), 5, Booking { prefill_tokens: 0, decode_blocks: 3 });
    let r = Router::new(config(RouterMode::Kv), index);
    for seed in 0..20 {
        let d = r.select(req(&q, &cands), &mut SmallRng::seed_from_u64(seed)).unwrap();
        assert_eq!(d.worker, WorkerId(2));
    }
}

#[test]
fn ties_go_to_fewer_cached_blocks() {
    let (index, mut writer) = KvIndex::new();
    let q = seqs(4);
    store(&mut writer, 1, 1, &q[..2]);
    store(&mut writer, 2, 1, &q[..2]);
    store(&mut writer, 1, 2, &[SeqHash(100), SeqHash(101)]);
    let cands = candidates(2);
    let r = Router::new(config(RouterMode::Kv), index);
    for seed in 0..20 {
        let d = r.select(req(&q, &cands), &mut SmallRng::seed_from_u64(seed)).unwrap();
        assert_eq!(d.worker, WorkerId(2));
        assert_eq!(d.scores[0].cached_blocks, 4);
    }
}

#[test]
fn weight_zero_ignores_the_index() {
    let (index, mut writer) = KvIndex::new();
    let q = seqs(4);
    store(&mut writer, 1, 1, &q);
    let cands = candidates(2);
    let _busy = LoadGuard::book(cands[0].load.clone(), WorkerId(1), 0, Booking { prefill_tokens: 0, decode_blocks: 1 });
    let r = Router::new(RouterConfig { overlap_weight: 0.0, ..config(RouterMode::Kv) }, index);
    let d = r.select(req(&q, &cands), &mut SmallRng::seed_from_u64(1)).unwrap();
    assert_eq!((d.worker, d.overlap_blocks), (WorkerId(2), 0));
    assert!(d.scores.iter().all(|s| s.overlap_blocks == 0 && s.cached_blocks == 0));
}

#[test]
fn temperature_samples_mostly_the_cheap_worker() {
    let (index, mut writer) = KvIndex::new();
    let q = seqs(8);
    store(&mut writer, 1, 1, &q);
    let cands = candidates(2);
    let r = Router::new(RouterConfig { temperature: 0.1, cost: RouterCost::Overlap, ..config(RouterMode::Kv) }, index);
    let mut rng = SmallRng::seed_from_u64(3);
    let mut picks = [0u32; 2];
    for _ in 0..2000 {
        let d = r.select(req(&q, &cands), &mut rng).unwrap();
        picks[(d.worker.0 - 1) as usize] += 1;
    }
    // Costs 0 and 16 → normalized 0 and 1 → P(worker 1) = 1 / (1 + e^-10) ≈ 0.99995.
    assert!(picks[0] >= 1990, "{picks:?}");
    assert!(cands.iter().all(|c| c.load.active_requests() == 0));
}

#[test]
fn round_robin_cycles_and_books() {
    let (index, _w) = KvIndex::new();
    let cands = candidates(3);
    let r = Router::new(config(RouterMode::RoundRobin), index);
    let q = seqs(2);
    let mut rng = SmallRng::seed_from_u64(1);
    let picks: Vec<u64> = (0..6).map(|_| r.select(req(&q, &cands), &mut rng).unwrap().worker.0).collect();
    assert_eq!(picks, [1, 2, 3, 1, 2, 3]);
    let mut d = r.select(req(&q, &cands), &mut rng).unwrap();
    assert!(d.scores.is_empty() && d.overlap_blocks == 0);
    let l = &cands[0].load;
    assert_eq!((l.active_prefill_tokens(), l.active_decode_blocks()), (32, 2));
    d.guard.prefill_done();
    assert_eq!((l.active_prefill_tokens(), l.active_decode_blocks()), (0, 2));
    drop(d);
    assert_eq!(l.active_requests(), 0);
}

#[test]
fn random_covers_every_candidate() {
    let (index, _w) = KvIndex::new();
    let cands = candidates(4);
    let r = Router::new(config(RouterMode::Random), index);
    let mut rng = SmallRng::seed_from_u64(9);
    let mut seen = [0u32; 4];
    for _ in 0..400 {
        seen[(r.select(req(&seqs(1), &cands), &mut rng).unwrap().worker.0 - 1) as usize] += 1;
    }
    assert!(seen.iter().all(|&n| n > 60), "{seen:?}");
}

#[test]
fn config_validation_names_the_problem() {
    assert!(config(RouterMode::Kv).validate().is_ok());
    let bad = RouterConfig { temperature: f64::NAN, ..config(RouterMode::Kv) };
    assert!(bad.validate().unwrap_err().contains("temperature"));
    let bad = RouterConfig { block_size: 0, ..config(RouterMode::Kv) };
    assert!(bad.validate().unwrap_err().contains("block size"));
}

// The `ttft` cost (issue #16), as properties over many cases rather than hand-picked numbers.

/// A `ttft` router over `n` fresh workers, each reporting `total_blocks` of KV capacity.
fn ttft_setup(n: u64, total_blocks: u64) -> (Arc<KvIndex>, KvIndexWriter, Vec<Candidate>) {
    let (index, writer) = KvIndex::new();
    let cands = candidates(n);
    for c in &cands {
        let report = LoadReport { total_blocks, blocks_known: true, ..LoadReport::default() };
        assert!(c.load.apply_report(1, &report));
    }
    (index, writer, cands)
}

fn ttft_router(index: Arc<KvIndex>) -> Router {
    Router::new(RouterConfig { cost: RouterCost::Ttft, ..config(RouterMode::Kv) }, index)
}

#[test]
fn ttft_more_of_the_prefix_wins_at_equal_load() {
    let mut rng = SmallRng::seed_from_u64(5);
    for case in 0..200u64 {
        let (index, mut writer, cands) = ttft_setup(3, 1 << 15);
        let len = rng.random_range(2..64u64);
        let q: Vec<SeqHash> = (0..len).map(|i| SeqHash(case * 1000 + i + 1)).collect();
        let (a, b) = (rng.random_range(0..len), rng.random_range(0..len));
        let (short, long) = (a.min(b), a.max(b) + 1);
        store(&mut writer, 1, 1, &q[..short as usize]);
        store(&mut writer, 2, 1, &q[..long as usize]);
        // Equal load on every worker: the same booking each.
        let load = Booking { prefill_tokens: rng.random_range(0..5000), decode_blocks: rng.random_range(0..500) };
        let _held: Vec<LoadGuard> = cands.iter().map(|c| LoadGuard::book(c.load.clone(), c.id, 1, load)).collect();
        let d = ttft_router(index).select(req(&q, &cands), &mut rng).unwrap();
        assert_eq!((d.worker, d.overlap_blocks as u64), (WorkerId(2), long), "case {case}");
    }
}

#[test]
fn ttft_hot_worker_loses_once_its_queue_exceeds_the_saved_prefill() {
    // Worker 1 holds the whole 64-block prompt (1,024 tokens); worker 2 nothing. Queued prefill
    // on worker 1 below the 1,024 tokens it saves keeps the request there; above, it moves.
    let q = seqs(64);
    let saved = 64 * B as u64;
    for queued in [0, 100, 500, 900, 1100, 1500, 3000, 10_000] {
        let (index, mut writer, cands) = ttft_setup(2, 1 << 15);
        store(&mut writer, 1, 1, &q);
        let _queue = LoadGuard::book(
            cands[0].load.clone(),
            WorkerId(1),
            2,
            Booking { prefill_tokens: queued, decode_blocks: 0 },
        );
        // The same number of requests on both, so only the queued tokens differ.
        let _other =
            LoadGuard::book(cands[1].load.clone(), WorkerId(2), 2, Booking { prefill_tokens: 0, decode_blocks: 0 });
        let d = ttft_router(index).select(req(&q, &cands), &mut SmallRng::seed_from_u64(queued)).unwrap();
        let want = if queued < saved { WorkerId(1) } else { WorkerId(2) };
        assert_eq!(d.worker, want, "queued {queued}");
    }
}

#[test]
fn ttft_idle_cluster_without_sharing_spreads_evenly() {
    let (index, _writer, cands) = ttft_setup(4, 1 << 15);
    let r = ttft_router(index);
    let mut rng = SmallRng::seed_from_u64(17);
    let mut held = Vec::new();
    // Distinct prompts of one size, all still in flight: each worker ends with a quarter.
    for i in 0..40u64 {
        let q: Vec<SeqHash> = (0..8).map(|j| SeqHash(10_000 + i * 100 + j)).collect();
        held.push(r.select(req(&q, &cands), &mut rng).unwrap());
    }
    let counts: Vec<u64> = cands.iter().map(|c| c.load.active_requests()).collect();
    assert_eq!(counts, [10, 10, 10, 10]);
}

#[test]
fn ttft_duplicating_into_a_full_cache_costs_more_than_into_an_empty_one() {
    // Worker 1 holds the prompt but is busy; workers 2 and 3 hold nothing and carry the same
    // load, but 2's cache is full of other blocks: the copy goes to 3.
    let (index, mut writer, cands) = ttft_setup(3, 1000);
    let q = seqs(32);
    store(&mut writer, 1, 1, &q);
    let other: Vec<SeqHash> = (5000..5900).map(SeqHash).collect();
    store(&mut writer, 2, 1, &other);
    let _busy =
        LoadGuard::book(cands[0].load.clone(), WorkerId(1), 3, Booking { prefill_tokens: 50_000, decode_blocks: 0 });
    let d = ttft_router(index).select(req(&q, &cands), &mut SmallRng::seed_from_u64(1)).unwrap();
    assert_eq!(d.worker, WorkerId(3));
    assert!(d.scores[1].cost > d.scores[2].cost, "{:?}", d.scores);
}

#[test]
fn ttft_learns_from_first_tokens_only() {
    let (index, _writer, cands) = ttft_setup(1, 1 << 15);
    let r = ttft_router(index);
    let q = seqs(4);
    let ttft = |c: &Candidate| c.load.ttft().samples();
    // A first token teaches the worker's model once.
    let mut d = r.select(req(&q, &cands), &mut SmallRng::seed_from_u64(1)).unwrap();
    d.guard.prefill_done();
    d.guard.prefill_done();
    assert_eq!(ttft(&cands[0]), 1);
    drop(d);
    // A request dropped before its first token (error, disconnect) teaches nothing.
    drop(r.select(req(&q, &cands), &mut SmallRng::seed_from_u64(1)).unwrap());
    assert_eq!(ttft(&cands[0]), 1);
    // Nor do the old cost and a weight of 0 (a disaggregated decode leg predicts no prefill).
    for cfg in [
        RouterConfig { cost: RouterCost::Overlap, ..config(RouterMode::Kv) },
        RouterConfig { overlap_weight: 0.0, ..config(RouterMode::Kv) },
    ] {
        let (index, _w) = KvIndex::new();
        let mut d = Router::new(cfg, index).select(req(&q, &cands), &mut SmallRng::seed_from_u64(1)).unwrap();
        d.guard.prefill_done();
    }
    assert_eq!(ttft(&cands[0]), 1);
}

#[test]
fn ttft_is_the_default_and_overlap_keeps_the_old_cost() {
    assert_eq!(RouterCost::default(), RouterCost::Ttft);
    let (index, mut writer) = KvIndex::new();
    let q = seqs(7);
    store(&mut writer, 1, 1, &q[..4]);
    let cands = candidates(1);
    let _l = LoadGuard::book(cands[0].load.clone(), WorkerId(1), 1, Booking { prefill_tokens: 32, decode_blocks: 10 });
    let r = Router::new(RouterConfig { cost: RouterCost::Overlap, ..config(RouterMode::Kv) }, index);
    let d = r.select(req(&q, &cands), &mut SmallRng::seed_from_u64(1)).unwrap();
    // cost.rs's hand example: (32 + 112 − 64) / 16 + 10 + 3.
    assert_eq!(d.scores[0].cost, 18.0);
}
