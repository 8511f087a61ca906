//! Hashing a prompt into sequence hashes, and the KV event wire format. Single-threaded; no
//! shared state.
//!
//! - `hashing/…`: 4,096 tokens in 16-token blocks, reusing the output Vec (as a shard does per
//!   request).
//! - `codec/…`: one batch of 64 `Stored` events × 16 blocks (a worker's busy step): encode;
//!   validate and view in place (aligned, and misaligned, which copies once); validate and
//!   convert to owned events. Prints the batch's size on the wire and its bytes per block.

use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};
use kvgate::contract::codec::{access_batch, decode_batch, encode_batch, AlignedPayload};
use kvgate::contract::events::{EngineHash, KvEvent, KvEventKind, StoredBlock};
use kvgate::contract::WorkerId;
use kvgate::kv::hash::{BlockHasher, SeqHash};

const EVENTS: usize = 64;
const BLOCKS_PER_EVENT: usize = 16;

fn seq_hashes_4096_tokens(c: &mut Criterion) {
    let tokens: Vec<u32> = (0..4096u32).map(|i| i.wrapping_mul(2_654_435_761) % 150_000).collect();
    let hasher = BlockHasher::new(16);
    let mut out = Vec::new();
    let mut g = c.benchmark_group("hashing");
    g.throughput(Throughput::Elements(tokens.len() as u64));
    g.bench_function("seq_hashes_into/4096_tokens/block_16", |b| {
        b.iter(|| {
            hasher.seq_hashes_into(black_box(&tokens), &mut out);
            black_box(out.len())
        })
    });
    g.finish();
}

/// 64 `Stored` events of 16 blocks each, one worker, contiguous ids, chained parents.
fn stored_batch() -> Vec<KvEvent> {
    let mut next = 0x9e37_79b9_7f4a_7c15u64;
    let mut rand = move || {
        next = next.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
        next
    };
    (0..EVENTS as u64)
        .map(|i| KvEvent {
            worker: WorkerId(0x5eed),
            event_id: i + 1,
            timestamp_us: 1_700_000_000_000_000 + i,
            kind: KvEventKind::Stored {
                parent: (i > 0).then(|| SeqHash(rand())),
                blocks: (0..BLOCKS_PER_EVENT)
                    .map(|_| StoredBlock { seq_hash: SeqHash(rand()), engine_hash: EngineHash(rand()) })
                    .collect(),
            },
        })
        .collect()
}

fn codec_64_stored_x_16_blocks(c: &mut Criterion) {
    let events = stored_batch();
    let wire = encode_batch(&events).expect("batch fits");
    let blocks = EVENTS * BLOCKS_PER_EVENT;
    eprintln!(
        "codec: {EVENTS} Stored events x {BLOCKS_PER_EVENT} blocks = {} bytes on the wire, {:.1} bytes/block",
        wire.len(),
        wire.len() as f64 / blocks as f64
    );
    // The same bytes one byte off alignment, as a NATS payload may arrive.
    let mut shifted = vec![0u8; wire.len() + 1];
    shifted[1..].copy_from_slice(&wire);
    let misaligned = &shifted[1..];
    assert!(AlignedPayload::new(misaligned).is_copied());

    let mut g = c.benchmark_group("codec");
    g.throughput(Throughput::Elements(blocks as u64));
    g.bench_function("encode/64x16", |b| b.iter(|| black_box(encode_batch(black_box(&events)).unwrap().len())));
    g.bench_function("access/64x16/aligned", |b| b.iter(|| black_box(access_batch(black_box(&wire)).unwrap().len())));
    g.bench_function("access/64x16/misaligned_copy", |b| {
        b.iter(|| {
            let payload = AlignedPayload::new(black_box(misaligned));
            black_box(payload.access().unwrap().len())
        })
    });
    g.bench_function("decode/64x16", |b| b.iter(|| black_box(decode_batch(black_box(&wire)).unwrap().len())));
    g.finish();
}

criterion_group!(benches, seq_hashes_4096_tokens, codec_64_stored_x_16_blocks);
criterion_main!(benches);
