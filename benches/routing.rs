//! Full `Router::select` in `kv` mode for a 4,096-token prompt (256 blocks) with 8 and 64
//! candidates: index lookup, per-candidate load sums, cost, pick and booking (guard dropped each
//! iteration). Worker `i` of `W` holds the first `(i + 1) × 256 / W` blocks plus 10k others.

use criterion::{black_box, criterion_group, criterion_main, BenchmarkId, Criterion};
use kvgate::contract::events::{EngineHash, KvEvent, KvEventKind, StoredBlock};
use kvgate::contract::WorkerId;
use kvgate::kv::hash::SeqHash;
use kvgate::kv::index::KvIndex;
use kvgate::router::{Candidate, RouteRequest, Router, RouterConfig, RouterCost, RouterMode, WorkerLoad};
use rand::rngs::SmallRng;
use rand::SeedableRng;

const BLOCK: u32 = 16;
const PROMPT_BLOCKS: u64 = 256;
const FILLER_BLOCKS: u64 = 10_000;

fn event(worker: u64, event_id: u64, seqs: impl Iterator<Item = u64>) -> KvEvent {
    let blocks = seqs.map(|s| StoredBlock { seq_hash: SeqHash(s), engine_hash: EngineHash(s) }).collect();
    KvEvent { worker: WorkerId(worker), event_id, timestamp_us: 0, kind: KvEventKind::Stored { parent: None, blocks } }
}

fn select(c: &mut Criterion) {
    let mut g = c.benchmark_group("routing/select_kv_4096_tokens");
    for workers in [8u64, 64] {
        let (index, mut writer) = KvIndex::new();
        for w in 0..workers {
            let held = (w + 1) * PROMPT_BLOCKS / workers;
            writer.apply(&event(w, 1, 0..held)).unwrap();
            let base = (w + 1) << 32;
            writer.apply(&event(w, 2, base..base + FILLER_BLOCKS)).unwrap();
        }
        let candidates: Vec<Candidate> =
            (0..workers).map(|w| Candidate { id: WorkerId(w), load: WorkerLoad::new() }).collect();
        let config = RouterConfig {
            mode: RouterMode::Kv,
            cost: RouterCost::default(),
            overlap_weight: 1.0,
            temperature: 0.0,
            block_size: BLOCK,
        };
        let router = Router::new(config, index);
        let seq: Vec<SeqHash> = (0..PROMPT_BLOCKS).map(SeqHash).collect();
        let mut rng = SmallRng::seed_from_u64(1);
        g.bench_with_input(BenchmarkId::new("workers", workers), &workers, |b, _| {
            b.iter(|| {
                let req = RouteRequest {
                    seq_hashes: &seq,
                    prompt_tokens: PROMPT_BLOCKS as u32 * BLOCK,
                    candidates: &candidates,
                    shard: 0,
                    overlaps: None,
                };
                black_box(router.select(req, &mut rng).unwrap().worker)
            })
        });
    }
    g.finish();
}

criterion_group!(benches, select);
criterion_main!(benches);
