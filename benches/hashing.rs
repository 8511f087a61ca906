//! Hashing a prompt into sequence hashes: 4,096 tokens in 16-token blocks, reusing the output Vec
//! (as a shard does per request). Single-threaded; no shared state.

use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};
use kvgate::kv::hash::BlockHasher;

fn seq_hashes_4096_tokens(c: &mut Criterion) {
    let tokens: Vec<u32> = (0..4096u32)
        .map(|i| i.wrapping_mul(2_654_435_761) % 150_000)
        .collect();
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

criterion_group!(benches, seq_hashes_4096_tokens);
criterion_main!(benches);
