//! Untrusted engine KV events (SGLang / vLLM ZMQ messages, `ENGINES.md` §6): decoding a
//! message's frames and a replay reply never panics, and whatever decodes converts to kvgate
//! events without panicking, with the tracked-block bound holding.
#![no_main]

use kvgate::worker::engines::zmq_events::{decode_message, decode_payload, parse_replay_reply, RankState};
use libfuzzer_sys::fuzz_target;

/// Blocks tracked at most here: small, so the bound is exercised.
const MAX_BLOCKS: usize = 64;

fuzz_target!(|data: &[u8]| {
    let mut state = RankState::new(16, MAX_BLOCKS).expect("16 is a valid block size");
    if let Ok(batch) = decode_payload(1, data) {
        for event in batch.events {
            let _ = state.convert(event);
            assert!(state.len() <= MAX_BLOCKS);
        }
    }
    // The same bytes cut into frames, as a live message and as a replay reply.
    let cut = data.first().map_or(0, |&b| usize::from(b)).min(data.len());
    let (a, b) = data.split_at(cut);
    let mid = b.len() / 2;
    let frames: [&[u8]; 3] = [a, &b[..mid], &b[mid..]];
    let _ = decode_message(&frames);
    let reply: [&[u8]; 4] = [b"", a, &b[..mid], &b[mid..]];
    let _ = parse_replay_reply(&reply);
    let _ = parse_replay_reply(&frames);
});
