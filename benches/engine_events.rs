//! Engine KV events (SGLang / vLLM msgpack over ZMQ): decoding and converting one batch on one
//! core. Single-threaded; no sockets.
//!
//! The batch is a busy engine step: 64 `BlockStored` events × 16 blocks × 16 tokens (token ids
//! up to 150 000, hashes spread over all 64 bits), as the engines publish it today (tagged maps,
//! as msgspec writes them), plus the same events as tagged arrays (older releases).
//!
//! - `decode/…`: payload bytes → `EngineBatch` (throughput in blocks).
//! - `decode_and_convert/…`: plus kvgate's own hashing of every block and the engine-hash map
//!   (a fresh `RankState` per iteration, so every store's parent is the previous event's block).
//!
//! Goal: ≥ 1 M blocks/s decoded on one core.

use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};
use kvgate::worker::engines::zmq_events::{decode_payload, Outcome, RankState};

const EVENTS: usize = 64;
const BLOCKS_PER_EVENT: usize = 16;
const BLOCK_SIZE: usize = 16;

struct W(Vec<u8>);

impl W {
    fn marker_len(&mut self, n: usize, fix: u8, m16: u8) -> &mut Self {
        if n < 16 {
            self.0.push(fix | n as u8);
        } else {
            self.0.push(m16);
            self.0.extend((n as u16).to_be_bytes());
        }
        self
    }
    fn arr(&mut self, n: usize) -> &mut Self {
        self.marker_len(n, 0x90, 0xdc)
    }
    fn map(&mut self, n: usize) -> &mut Self {
        self.marker_len(n, 0x80, 0xde)
    }
    fn str(&mut self, s: &str) -> &mut Self {
        self.0.push(0xa0 | s.len() as u8);
        self.0.extend(s.as_bytes());
        self
    }
    fn nil(&mut self) -> &mut Self {
        self.0.push(0xc0);
        self
    }
    fn uint(&mut self, v: u64) -> &mut Self {
        match v {
            0..=0x7f => self.0.push(v as u8),
            0x80..=0xff => self.0.extend([0xcc, v as u8]),
            0x100..=0xffff => {
                self.0.push(0xcd);
                self.0.extend((v as u16).to_be_bytes());
            }
            0x1_0000..=0xffff_ffff => {
                self.0.push(0xce);
                self.0.extend((v as u32).to_be_bytes());
            }
            _ => {
                self.0.push(0xcf);
                self.0.extend(v.to_be_bytes());
            }
        }
        self
    }
}

/// `[ts, [64 × BlockStored], 0]`, each event chained onto the previous one's last block.
fn busy_step(arrays: bool) -> Vec<u8> {
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let mut rand = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let mut w = W(Vec::new());
    w.arr(3);
    w.0.push(0xcb);
    w.0.extend(1_700_000_000.5f64.to_be_bytes());
    w.arr(EVENTS);
    let mut parent: Option<u64> = None;
    for _ in 0..EVENTS {
        let hashes: Vec<u64> = (0..BLOCKS_PER_EVENT).map(|_| rand()).collect();
        if arrays {
            w.arr(7).str("BlockStored");
        } else {
            w.map(7).str("type").str("BlockStored").str("block_hashes");
        }
        w.arr(BLOCKS_PER_EVENT);
        hashes.iter().for_each(|&h| {
            w.uint(h);
        });
        if !arrays {
            w.str("parent_block_hash");
        }
        match parent {
            Some(p) => w.uint(p),
            None => w.nil(),
        };
        if !arrays {
            w.str("token_ids");
        }
        w.arr(BLOCKS_PER_EVENT * BLOCK_SIZE);
        for _ in 0..BLOCKS_PER_EVENT * BLOCK_SIZE {
            w.uint(rand() % 150_000);
        }
        if !arrays {
            w.str("block_size");
        }
        w.uint(BLOCK_SIZE as u64);
        if !arrays {
            w.str("lora_id");
        }
        w.nil();
        if !arrays {
            w.str("medium");
        }
        w.str("GPU");
        parent = hashes.last().copied();
    }
    w.uint(0);
    w.0
}

fn decode(c: &mut Criterion) {
    let blocks = (EVENTS * BLOCKS_PER_EVENT) as u64;
    let mut g = c.benchmark_group("engine_events");
    g.throughput(Throughput::Elements(blocks));
    for (name, arrays) in [("maps", false), ("arrays", true)] {
        let payload = busy_step(arrays);
        assert_eq!(decode_payload(0, &payload).expect("valid").events.len(), EVENTS);
        eprintln!(
            "{name}: {} bytes per batch, {:.1} bytes per block",
            payload.len(),
            payload.len() as f64 / blocks as f64
        );
        g.bench_function(format!("decode/{name}/64_stored_x_16_blocks"), |b| {
            b.iter(|| black_box(decode_payload(0, black_box(&payload)).expect("valid")))
        });
        g.bench_function(format!("decode_and_convert/{name}/64_stored_x_16_blocks"), |b| {
            b.iter(|| {
                let mut state = RankState::new(BLOCK_SIZE as u32, 1 << 20).expect("valid block size");
                let batch = decode_payload(0, black_box(&payload)).expect("valid");
                for e in batch.events {
                    assert!(matches!(state.convert(e), Outcome::Emit(_)));
                }
                black_box(state.len())
            })
        });
    }
    g.finish();
}

criterion_group!(benches, decode);
criterion_main!(benches);
