//! The KV index: lookup of a 4,096-token prompt (256 blocks) against an index pre-filled to ~1M
//! block-holder pairs with 8 / 64 / 256 workers, and event application throughput (blocks/s).
//! Worker `i` of `W` holds the first `(i + 1) × 256 / W` blocks of the prompt, so every worker
//! matches the first block and the walk narrows block by block. The same lookup against a
//! [`ShardedIndex`] of 2 partitions (fed the same events) prices walking partitions by hash.
//! Single-threaded.

use std::sync::Arc;

use criterion::{black_box, criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use kvgate::contract::events::{EngineHash, KvEvent, KvEventKind, StoredBlock};
use kvgate::contract::WorkerId;
use kvgate::kv::hash::SeqHash;
use kvgate::kv::index::{KvIndex, KvIndexWriter, ShardedIndex};

const PROMPT_BLOCKS: u64 = 256;
const TOTAL_PAIRS: u64 = 1 << 20;
/// Blocks per pre-fill event (a long prompt's worth).
const EVENT_BLOCKS: u64 = 64;

fn mix(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

fn prompt() -> Vec<SeqHash> {
    (0..PROMPT_BLOCKS).map(|i| SeqHash(mix(i))).collect()
}

struct Feeder {
    writer: KvIndexWriter,
    next_id: Vec<u64>,
    /// Every event sent while building (`logging`), to feed other index shapes the same.
    log: Vec<KvEvent>,
    logging: bool,
}

impl Feeder {
    fn send(&mut self, worker: u64, kind: KvEventKind) {
        let id = &mut self.next_id[worker as usize];
        *id += 1;
        let event = KvEvent { worker: WorkerId(worker), event_id: *id, timestamp_us: 0, kind };
        self.writer.apply(&event).expect("in-order events");
        if self.logging {
            self.log.push(event);
        }
    }
}

fn stored(seqs: impl Iterator<Item = SeqHash>) -> KvEventKind {
    let blocks = seqs.map(|s| StoredBlock { seq_hash: s, engine_hash: EngineHash(s.0) }).collect();
    KvEventKind::Stored { parent: None, blocks }
}

/// An index of `workers` workers and ~`TOTAL_PAIRS` pairs.
fn build(workers: u64) -> (Arc<KvIndex>, Feeder) {
    let (index, writer) = KvIndex::new();
    let mut f = Feeder { writer, next_id: vec![0; workers as usize + 1], log: Vec::new(), logging: true };
    let q = prompt();
    let per_worker = TOTAL_PAIRS / workers;
    let mut filler = 1u64 << 40;
    for w in 0..workers {
        let held = (w + 1) * PROMPT_BLOCKS / workers;
        f.send(w, stored(q[..held as usize].iter().copied()));
        let mut left = per_worker.saturating_sub(held);
        while left > 0 {
            let n = left.min(EVENT_BLOCKS);
            f.send(w, stored((filler..filler + n).map(|i| SeqHash(mix(i)))));
            filler += n;
            left -= n;
        }
    }
    f.logging = false;
    (index, f)
}

fn lookup(c: &mut Criterion) {
    let q = prompt();
    let mut g = c.benchmark_group("index/find_matches_256_blocks");
    g.throughput(Throughput::Elements(PROMPT_BLOCKS));
    for workers in [8u64, 64, 256] {
        let (index, feeder) = build(workers);
        assert!(index.num_entries() as u64 >= TOTAL_PAIRS - workers * PROMPT_BLOCKS);
        g.bench_with_input(BenchmarkId::new("workers", workers), &workers, |b, _| {
            b.iter(|| black_box(index.find_matches(black_box(&q))))
        });
        if workers == 64 {
            let (sharded, mut writers) = ShardedIndex::new(2);
            for e in &feeder.log {
                for (part, w) in sharded.split(e).iter().zip(&mut writers) {
                    w.apply(part).expect("in-order events");
                }
            }
            assert_eq!(sharded.find_matches(&q), index.find_matches(&q));
            g.bench_with_input(BenchmarkId::new("sharded_2/workers", workers), &workers, |b, _| {
                b.iter(|| black_box(sharded.find_matches(black_box(&q))))
            });
        }
        drop(feeder);
    }
    g.finish();
}

fn apply(c: &mut Criterion) {
    let (_index, mut f) = build(64);
    let extra = 64; // a worker id the pre-fill did not use
    let mut g = c.benchmark_group("index/apply");
    g.throughput(Throughput::Elements(2 * EVENT_BLOCKS));
    let mut next = 1u64 << 50;
    g.bench_function("store_then_remove_64_new_blocks", |b| {
        b.iter(|| {
            let seqs: Vec<SeqHash> = (next..next + EVENT_BLOCKS).map(|i| SeqHash(mix(i))).collect();
            next += EVENT_BLOCKS;
            f.send(extra, stored(seqs.iter().copied()));
            f.send(extra, KvEventKind::Removed { engine_hashes: seqs.iter().map(|s| EngineHash(s.0)).collect() });
        })
    });
    // The prompt's first blocks are held by all 64 workers: every update copies a 64-id set.
    let shared: Vec<SeqHash> = prompt()[..EVENT_BLOCKS as usize].to_vec();
    g.bench_function("store_then_remove_64_blocks_held_by_64_workers", |b| {
        b.iter(|| {
            f.send(extra, stored(shared.iter().copied()));
            f.send(extra, KvEventKind::Removed { engine_hashes: shared.iter().map(|s| EngineHash(s.0)).collect() });
        })
    });
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(30);
    targets = lookup, apply
}
criterion_main!(benches);
