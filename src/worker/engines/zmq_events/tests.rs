//! Decoder and converter tests: ENGINES.md §7 golden bytes, both event encodings and both hash
//! signs agreeing (property test), and malformed input never panicking.

use proptest::prelude::*;

use crate::contract::events::{EngineHash, KvEventKind};
use crate::kv::hash::{BlockHasher, SeqHash};

use super::convert::{DropReason, Outcome, RankState, Skip};
use super::decode::*;
use super::test_wire::{encode_batch, hex, Encoding, Msgpack};

/// vLLM 0.34.0, `[1.5, [BlockStored(hash 2^63+5, tokens 0..15, GPU, group 0), BlockRemoved([7],
/// GPU), AllBlocksCleared], 0]`, ENGINES.md §7.
const VLLM_GOLDEN: &str = "93cb3ff800000000000093de0009a474797065ab426c6f636b53746f726564ac626c6f636b5f68617368657391cf8000000000000005b1706172656e745f626c6f636b5f68617368c0a9746f6b656e5f696473dc0010000102030405060708090a0b0c0d0e0faa626c6f636b5f73697a6510a76c6f72615f6964c0a66d656469756da3475055a96c6f72615f6e616d65c0a967726f75705f6964780083a474797065ac426c6f636b52656d6f766564ac626c6f636b5f6861736865739107a66d656469756da347505581a474797065b0416c6c426c6f636b73436c656172656400";

/// SGLang 0.5.23, the same events with BlockStored hash −5, ENGINES.md §7.
const SGLANG_GOLDEN: &str = "93cb3ff80000000000009387a474797065ab426c6f636b53746f726564ac626c6f636b5f68617368657391fbb1706172656e745f626c6f636b5f68617368c0a9746f6b656e5f696473dc0010000102030405060708090a0b0c0d0e0faa626c6f636b5f73697a6510a76c6f72615f6964c0a66d656469756da347505583a474797065ac426c6f636b52656d6f766564ac626c6f636b5f6861736865739107a66d656469756da347505581a474797065b0416c6c426c6f636b73436c656172656400";

fn golden_events(hash: u64) -> Vec<EngineEvent> {
    vec![
        EngineEvent::Stored {
            block_hashes: vec![hash],
            parent: None,
            token_ids: (0..16).collect(),
            bigram: false,
            block_size: 16,
            lora_name: None,
            medium: Some(Medium::Gpu),
            group_idx: 0,
        },
        EngineEvent::Removed { block_hashes: vec![7], medium: Some(Medium::Gpu), group_idx: 0 },
        EngineEvent::Cleared,
    ]
}

#[test]
fn vllm_golden_bytes_decode() {
    let payload = hex(VLLM_GOLDEN);
    assert_eq!(payload.len(), 225);
    let batch = decode_message(&[&b"kv"[..], &3u64.to_be_bytes(), &payload]).unwrap();
    assert_eq!(batch, EngineBatch { seq: 3, rank: Some(0), events: golden_events((1 << 63) + 5), unknown_events: 0 });
}

#[test]
fn sglang_golden_bytes_decode() {
    let payload = hex(SGLANG_GOLDEN);
    assert_eq!(payload.len(), 193);
    let batch = decode_payload(0, &payload).unwrap();
    assert_eq!(batch, EngineBatch { seq: 0, rank: Some(0), events: golden_events(-5i64 as u64), unknown_events: 0 });
}

#[test]
fn golden_store_is_hashed_by_kvgate() {
    let mut state = RankState::new(16, 1000).unwrap();
    let events = decode_payload(0, &hex(SGLANG_GOLDEN)).unwrap().events;
    let want = BlockHasher::new(16).seq_hashes(&(0..16).collect::<Vec<_>>())[0];
    let got: Vec<Outcome> = events.into_iter().map(|e| state.convert(e)).collect();
    let KvEventKind::Stored { parent: None, blocks } = (match &got[0] {
        Outcome::Emit(k) => k.clone(),
        other => panic!("{other:?}"),
    }) else {
        panic!("not a root store")
    };
    assert_eq!((blocks[0].seq_hash, blocks[0].engine_hash), (want, EngineHash(-5i64 as u64)));
    assert_eq!(got[1], Outcome::Nothing, "hash 7 was never stored");
    assert_eq!(got[2], Outcome::Emit(KvEventKind::Cleared));
    assert_eq!(state.take_unknown_removals(), 1);
}

#[test]
fn replay_reply_shapes() {
    let seq = 9u64.to_be_bytes();
    let end = SEQ_END.to_be_bytes();
    let new: [&[u8]; 4] = [b"", b"kv", &seq, b"P"];
    let old: [&[u8]; 3] = [b"", &seq, b"P"];
    assert_eq!(parse_replay_reply(&new).unwrap(), ReplayReply::Batch { seq: 9, payload: b"P" });
    assert_eq!(parse_replay_reply(&old).unwrap(), ReplayReply::Batch { seq: 9, payload: b"P" });
    assert_eq!(parse_replay_reply(&[&b""[..], b"", &end, b""]).unwrap(), ReplayReply::End);
    assert_eq!(parse_replay_reply(&[&b""[..], &end, b""]).unwrap(), ReplayReply::End);
    assert_eq!(parse_replay_reply(&[&b"x"[..], &seq, b"P"]), Err(DecodeError::NoDelimiter));
    assert!(matches!(parse_replay_reply(&[&b""[..], b"1234", b"P"]), Err(DecodeError::SeqFrame { got: 4 })));
    assert!(matches!(parse_replay_reply(&[&b""[..]]), Err(DecodeError::FrameCount { got: 1, .. })));
    assert!(matches!(decode_message(&[&b""[..], &seq]), Err(DecodeError::FrameCount { got: 2, .. })));
}

#[test]
fn batch_forms_and_hash_forms() {
    // [ts, events] with no rank; a bin hash (vLLM with integer hashes off): its last 8 bytes.
    let mut w = Msgpack::default();
    w.arr(2).f64(2.0).arr(1).map(2).str("type").str("BlockRemoved").str("block_hashes").arr(2);
    w.bin(&[0xaa; 24]).bin(&[1, 2, 3, 4, 5, 6, 7, 8]);
    let batch = decode_payload(1, &w.0).unwrap();
    assert_eq!(batch.rank, None);
    let EngineEvent::Removed { block_hashes, medium: None, group_idx: 0 } = &batch.events[0] else { panic!() };
    assert_eq!(block_hashes, &[0xaaaa_aaaa_aaaa_aaaa, 0x0102_0304_0506_0708]);

    // A map batch, keys in any order, unknown keys ignored.
    let mut w = Msgpack::default();
    w.map(4).str("attn_dp_rank").uint(2).str("x").arr(1).nil().str("events").arr(1);
    w.map(1).str("type").str("AllBlocksCleared").str("ts").uint(7);
    let batch = decode_payload(5, &w.0).unwrap();
    assert_eq!((batch.rank, batch.events), (Some(2), vec![EngineEvent::Cleared]));
}

#[test]
fn bigram_tokens_take_firsts_and_last_second() {
    let mut w = Msgpack::default();
    w.arr(2).f64(0.0).arr(1).arr(5).str("BlockStored").arr(1).int(-1).nil().arr(2);
    w.arr(2).uint(10).uint(11).arr(2).uint(11).uint(12).uint(2);
    let events = decode_payload(0, &w.0).unwrap().events;
    let EngineEvent::Stored { token_ids, bigram: true, block_size: 2, .. } = &events[0] else { panic!("{events:?}") };
    assert_eq!(token_ids, &[10, 11, 12]);
    // kvgate hashes the page's own tokens (the firsts).
    let mut state = RankState::new(2, 10).unwrap();
    let Outcome::Emit(KvEventKind::Stored { blocks, .. }) = state.convert(events[0].clone()) else { panic!() };
    assert_eq!(blocks[0].seq_hash, BlockHasher::new(2).seq_hashes(&[10, 11])[0]);
}

#[test]
fn unknown_event_types_are_skipped_and_counted() {
    let mut w = Msgpack::default();
    w.arr(3).f64(0.0).arr(3);
    w.map(2).str("type").str("BlockMoved").str("block_hashes").arr(1).uint(1);
    w.arr(3).str("Mystery").map(1).str("k").arr(0).uint(3);
    w.arr(1).str("AllBlocksCleared");
    w.nil();
    let batch = decode_payload(0, &w.0).unwrap();
    assert_eq!((batch.unknown_events, batch.events), (2, vec![EngineEvent::Cleared]));
}

#[test]
fn decode_errors_name_the_fault() {
    let bad = |bytes: &[u8]| decode_payload(0, bytes).unwrap_err();
    assert!(matches!(bad(&[]), DecodeError::Truncated { at: 0 }));
    assert!(matches!(bad(&[0x94, 0, 0x90, 0xc0, 0xc0]), DecodeError::BatchLen { len: 4 }));
    assert!(matches!(bad(&[0x92, 0, 0x90, 0xc0]), DecodeError::Trailing { extra: 1 }));
    assert!(matches!(bad(&[0x92, 0, 0x91, 0x81, 0xa4, b't', b'y', b'p', b'e', 0x01]), DecodeError::Type { .. }));
    assert!(matches!(bad(&[0x92, 0, 0x91, 0x80]), DecodeError::Missing { field: "type", .. }));
    assert!(matches!(
        bad(&[0x92, 0, 0x91, 0x91, 0xab, b'B', b'l', b'o', b'c', b'k', b'S', b't', b'o', b'r', b'e', b'd']),
        DecodeError::Missing { event: "BlockStored", .. }
    ));
    // A negative token id, and a rank that is not an unsigned 32-bit integer.
    let mut w = Msgpack::default();
    w.arr(2).f64(0.0).arr(1).arr(5).str("BlockStored").arr(0).nil().arr(1).int(-3).uint(1);
    assert!(matches!(bad(&w.0), DecodeError::Range { what: "token id", .. }));
    assert!(matches!(bad(&[0x93, 0, 0x90, 0xff]), DecodeError::Range { what: "rank", .. }));
    // A length prefix far beyond the input fails without allocating for it.
    assert!(matches!(bad(&[0x92, 0, 0xdd, 0xff, 0xff, 0xff, 0xff]), DecodeError::Truncated { .. }));
}

#[test]
fn converter_rules() {
    let bs = 4;
    let store = |hashes: Vec<u64>, parent, tokens: Vec<u32>| EngineEvent::Stored {
        block_hashes: hashes,
        parent,
        token_ids: tokens,
        bigram: false,
        block_size: bs,
        lora_name: None,
        medium: None,
        group_idx: 0,
    };
    let mut s = RankState::new(bs, 3).unwrap();
    assert!(RankState::new(0, 3).is_err() && RankState::new(4096, 3).is_err());
    let with = |e: EngineEvent, f: &dyn Fn(&mut EngineEvent)| {
        let mut e = e;
        f(&mut e);
        e
    };
    let ok = store(vec![1, 2], None, (0..8).collect());
    let Outcome::Emit(KvEventKind::Stored { parent: None, blocks }) = s.convert(ok.clone()) else { panic!() };
    assert_eq!(
        blocks.iter().map(|b| b.seq_hash).collect::<Vec<_>>(),
        BlockHasher::new(4).seq_hashes(&(0..8).collect::<Vec<_>>())
    );
    // The child of block 2 chains from block 2's sequence hash.
    let Outcome::Emit(KvEventKind::Stored { parent, blocks }) = s.convert(store(vec![3], Some(2), vec![9; 4])) else {
        panic!()
    };
    assert_eq!(parent, s.seq_hash(2));
    assert_eq!(Some(blocks[0].seq_hash), s.seq_hash(3));
    assert_eq!(blocks[0].seq_hash, BlockHasher::chain(parent, BlockHasher::new(4).local_hash(&[9; 4])));
    assert_eq!(
        s.convert(store(vec![4], Some(99), vec![0; 4])),
        Outcome::Dropped(DropReason::MissingParent { parent: 99 })
    );
    assert_eq!(
        s.convert(store(vec![4], None, vec![0; 5])),
        Outcome::Dropped(DropReason::TokenCount { got: 5, want: 4 })
    );
    let wrong_size = with(store(vec![4], None, vec![0; 8]), &|e| {
        if let EngineEvent::Stored { block_size, .. } = e {
            *block_size = 8
        }
    });
    assert_eq!(s.convert(wrong_size), Outcome::Dropped(DropReason::BlockSize { got: 8, want: 4 }));
    let cpu = with(ok.clone(), &|e| {
        if let EngineEvent::Stored { medium, .. } = e {
            *medium = Some(Medium::Other("CPU_PINNED".into()))
        }
    });
    assert_eq!(s.convert(cpu), Outcome::Skipped(Skip::Medium));
    let group = with(ok.clone(), &|e| {
        if let EngineEvent::Stored { group_idx, .. } = e {
            *group_idx = 1
        }
    });
    assert_eq!(s.convert(group), Outcome::Skipped(Skip::Group));
    let lora = with(ok.clone(), &|e| {
        if let EngineEvent::Stored { lora_name, .. } = e {
            *lora_name = Some("a".into())
        }
    });
    assert_eq!(s.convert(lora), Outcome::Skipped(Skip::Lora));
    let removed = EngineEvent::Removed { block_hashes: vec![3, 77], medium: Some(Medium::Gpu), group_idx: 0 };
    assert_eq!(s.convert(removed), Outcome::Emit(KvEventKind::Removed { engine_hashes: vec![EngineHash(3)] }));
    assert_eq!((s.len(), s.take_unknown_removals()), (2, 1));
    // Two more blocks would pass the bound of 3: the state resets.
    assert_eq!(s.convert(store(vec![5, 6], None, vec![1; 8])), Outcome::Overflow);
    assert!(s.is_empty());
}

/// A random engine history: chains stored on random parents, removals, clears, noise.
fn history(ops: &[(u8, u64)], bs: u32) -> Vec<Vec<EngineEvent>> {
    let mut rng = ops.first().map_or(1, |o| o.1) | 1;
    let mut next = move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    let mut live: Vec<u64> = Vec::new();
    let mut batches = vec![Vec::new()];
    for &(op, seed) in ops {
        let event = match op % 8 {
            0..=3 => {
                let parent = (!live.is_empty() && seed % 3 != 0).then(|| live[(seed as usize / 3) % live.len()]);
                let n = 1 + (seed % 3) as usize;
                let hashes: Vec<u64> = (0..n).map(|_| next()).collect();
                live.extend(&hashes);
                let tokens = (0..n * bs as usize).map(|_| (next() % 200_000) as u32).collect();
                let medium = (seed % 5 == 0).then_some(Medium::Gpu);
                EngineEvent::Stored {
                    block_hashes: hashes,
                    parent,
                    token_ids: tokens,
                    bigram: false,
                    block_size: bs,
                    lora_name: None,
                    medium,
                    group_idx: 0,
                }
            }
            4 | 5 if !live.is_empty() => {
                let h = live.swap_remove((seed as usize) % live.len());
                EngineEvent::Removed { block_hashes: vec![h, next()], medium: None, group_idx: 0 }
            }
            6 => {
                let tokens = vec![1; bs as usize];
                let medium = Some(Medium::Other("CPU_PINNED".into()));
                EngineEvent::Stored {
                    block_hashes: vec![next()],
                    parent: None,
                    token_ids: tokens,
                    bigram: false,
                    block_size: bs,
                    lora_name: None,
                    medium,
                    group_idx: 0,
                }
            }
            7 if seed % 4 == 0 => {
                live.clear();
                EngineEvent::Cleared
            }
            _ => {
                batches.push(Vec::new());
                continue;
            }
        };
        batches.last_mut().expect("one batch at least").push(event);
    }
    batches
}

fn convert_all(batches: &[Vec<EngineEvent>], bs: u32) -> (Vec<Outcome>, Vec<(EngineHash, SeqHash)>) {
    let mut state = RankState::new(bs, 1 << 20).unwrap();
    let outcomes = batches.iter().flatten().map(|e| state.convert(e.clone())).collect();
    let mut blocks: Vec<_> = state.blocks().collect();
    blocks.sort();
    (outcomes, blocks)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, .. ProptestConfig::default() })]

    /// Maps or arrays, i64 or u64 hashes, 2- or 3-element batches: same batches, same result.
    #[test]
    fn every_encoding_converts_the_same(ops in prop::collection::vec((any::<u8>(), any::<u64>()), 1..60)) {
        let bs = 4;
        let batches = history(&ops, bs);
        let want = convert_all(&batches, bs);
        for enc in Encoding::ALL {
            let decoded: Vec<Vec<EngineEvent>> = batches
                .iter()
                .enumerate()
                .map(|(i, b)| {
                    let batch = decode_payload(i as u64, &encode_batch(b, enc)).expect("decodes");
                    prop_assert_eq!(batch.unknown_events, enc.noise as u32);
                    prop_assert_eq!(batch.rank, enc.rank.then_some(3));
                    Ok(batch.events)
                })
                .collect::<Result<_, TestCaseError>>()?;
            prop_assert_eq!(&decoded, &batches, "{:?}", enc);
            prop_assert_eq!(&convert_all(&decoded, bs), &want, "{:?}", enc);
        }
    }

    /// Arbitrary bytes, and valid payloads cut short or with a byte changed, never panic.
    #[test]
    fn malformed_input_never_panics(
        junk in prop::collection::vec(any::<u8>(), 0..300),
        ops in prop::collection::vec((any::<u8>(), any::<u64>()), 1..12),
        cut in any::<prop::sample::Index>(),
        flip in any::<(prop::sample::Index, u8)>(),
    ) {
        let _ = decode_payload(0, &junk);
        let _ = decode_message(&[&junk[..], &junk[..junk.len().min(8)], &junk[..]]);
        let _ = parse_replay_reply(&[&b""[..], &junk[..junk.len().min(8)], &junk[..]]);
        let valid = encode_batch(&history(&ops, 2).concat(), Encoding::ALL[3]);
        let _ = decode_payload(0, &valid[..cut.index(valid.len() + 1)]);
        let mut changed = valid.clone();
        let i = flip.0.index(changed.len());
        changed[i] ^= flip.1 | 1;
        if let Ok(batch) = decode_payload(0, &changed) {
            let mut state = RankState::new(2, 64).unwrap();
            for e in batch.events {
                let _ = state.convert(e);
            }
        }
    }
}
