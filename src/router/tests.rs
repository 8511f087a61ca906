//! Router tests: selection per mode against a real index and load cells.

use rand::rngs::SmallRng;
use rand::SeedableRng;

use super::*;
use crate::contract::events::{EngineHash, KvEvent, KvEventKind, StoredBlock};
use crate::kv::index::KvIndexWriter;

const B: u32 = 16;

fn config(mode: RouterMode) -> RouterConfig {
    RouterConfig { mode, overlap_weight: 1.0, temperature: 0.0, block_size: B }
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
    let r = Router::new(RouterConfig { temperature: 0.1, ..config(RouterMode::Kv) }, index);
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
