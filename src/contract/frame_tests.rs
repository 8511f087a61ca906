//! Unit tests of [`crate::contract::frame`] (kept here to keep `frame.rs` short): every kind
//! round-trips, every truncation is incomplete or a typed error, malformed payloads are refused.

use super::*;
use crate::contract::events::{EngineHash, SeqHash, StoredBlock};
use crate::contract::WorkerId;

fn event(kind: KvEventKind) -> KvEvent {
    KvEvent { worker: WorkerId(7), event_id: 9, timestamp_us: 11, kind }
}

fn samples() -> Vec<Frame> {
    let s = StreamId(0x0102_0304_0506_0708);
    let sampling = SamplingParams { max_tokens: 5, temperature: 0.5, top_p: 0.9, seed: Some(3), ignore_eos: true };
    let request = GenerateRequest {
        request_id: 42,
        token_ids: vec![1, 2, 3],
        sampling,
        eos_token_ids: vec![0],
        disagg: None,
        trace: None,
    };
    let stored = KvEventKind::Stored {
        parent: Some(SeqHash(5)),
        blocks: vec![StoredBlock { seq_hash: SeqHash(6), engine_hash: EngineHash(7) }],
    };
    let events = vec![
        event(KvEventKind::Cleared),
        event(stored),
        event(KvEventKind::Stored { parent: None, blocks: vec![] }),
        event(KvEventKind::Removed { engine_hashes: vec![EngineHash(1), EngineHash(2)] }),
    ];
    let chunk = RecoveryChunk { kind: RecoveryKind::Dump, last_event_id: 9, more: true, events };
    vec![
        Frame::Request { stream: s, request: request.clone() },
        Frame::Request {
            stream: s,
            request: GenerateRequest { sampling: SamplingParams::default(), ..request.clone() },
        },
        Frame::Output { stream: s, output: WorkerOutput::Started { cached_tokens: 16, computed_tokens: 4 } },
        Frame::Output { stream: s, output: WorkerOutput::Tokens(vec![9, 8, 7]) },
        Frame::Output { stream: s, output: WorkerOutput::Tokens(vec![]) },
        Frame::Output { stream: s, output: WorkerOutput::Finished { reason: FinishReason::Cancelled } },
        Frame::Output { stream: s, output: WorkerOutput::Error(crate::contract::WorkerError::client("boom ✗")) },
        Frame::Cancel { stream: s },
        Frame::Credit { stream: s, outputs: 16 },
        Frame::RecoverRequest { stream: s, since_event_id: 77 },
        Frame::RecoverChunk { stream: s, chunk },
        Frame::RecoverChunk {
            stream: s,
            chunk: RecoveryChunk { kind: RecoveryKind::Replay, last_event_id: 0, more: false, events: vec![] },
        },
        Frame::Error { stream: StreamId::CONNECTION, message: "bad".into() },
        Frame::Request {
            stream: s,
            request: GenerateRequest {
                disagg: Some(DisaggLeg::Prefill {
                    room: u64::MAX - 1,
                    peer: WorkerId(5),
                    skip_blocks: 3,
                    bootstrap: Some("10.0.0.2:4500".into()),
                }),
                ..request.clone()
            },
        },
        Frame::Request {
            stream: s,
            request: GenerateRequest {
                disagg: Some(DisaggLeg::Decode {
                    room: 7,
                    peer: WorkerId(u64::MAX),
                    skip_blocks: 0,
                    bootstrap: Some("10.0.0.9:8998".into()),
                    handoff: Some(r#"{"do_remote_prefill":true}"#.into()),
                }),
                ..request.clone()
            },
        },
        Frame::Request {
            stream: s,
            request: GenerateRequest {
                disagg: Some(DisaggLeg::Decode {
                    room: 7,
                    peer: WorkerId(1),
                    skip_blocks: 0,
                    bootstrap: None,
                    handoff: None,
                }),
                ..request.clone()
            },
        },
        Frame::Output { stream: s, output: WorkerOutput::Transferred { blocks: 3, bytes: 5_505_024, micros: 917 } },
        Frame::Output { stream: s, output: WorkerOutput::Handoff(r#"{"remote_host":"10.0.0.3"}"#.into()) },
        Frame::Request {
            stream: s,
            request: GenerateRequest { trace: Some(Box::new(trace(Some("k=v,x=y")))), ..request.clone() },
        },
        Frame::Request { stream: s, request: GenerateRequest { trace: Some(Box::new(trace(None))), ..request } },
    ]
}

fn trace(state: Option<&str>) -> TraceContext {
    TraceContext { trace_id: [0xab; 16], span_id: [7; 8], flags: 1, state: state.map(str::to_owned) }
}

/// A traced request's frame cut exactly where its trace context begins is a valid untraced
/// request (the section is optional); its length, for frames that have one.
fn untraced_len(f: &Frame) -> Option<usize> {
    match f {
        Frame::Request { stream, request } if request.trace.is_some() => {
            let request = GenerateRequest { trace: None, ..request.clone() };
            Some(bytes_of(&Frame::Request { stream: *stream, request }).len())
        }
        _ => None,
    }
}

fn dbg(f: &Frame) -> String {
    format!("{f:?}")
}

fn bytes_of(f: &Frame) -> Vec<u8> {
    let mut b = BytesMut::new();
    f.encode(&mut b).unwrap();
    b.to_vec()
}

/// Frames whose payload runs "to the end" (a message): a shorter payload is still valid.
fn ends_with_message(f: &Frame) -> bool {
    matches!(f, Frame::Error { .. } | Frame::Output { output: WorkerOutput::Error(_) | WorkerOutput::Handoff(_), .. })
}

#[test]
fn every_kind_round_trips() {
    for f in samples() {
        let b = bytes_of(&f);
        let (back, used) = decode(&b).unwrap().expect("complete");
        assert_eq!((dbg(&back), used), (dbg(&f), b.len()));
    }
}

#[test]
fn every_prefix_of_a_frame_is_incomplete() {
    for f in samples() {
        let b = bytes_of(&f);
        for k in 0..b.len() {
            assert!(decode(&b[..k]).unwrap().is_none(), "{f:?} cut at {k}");
        }
    }
}

#[test]
fn every_truncated_payload_is_an_error_not_a_panic() {
    for f in samples() {
        let b = bytes_of(&f);
        for k in HEADER_LEN..b.len() {
            let mut cut = b[..k].to_vec();
            cut[..4].copy_from_slice(&((k - 4) as u32).to_le_bytes());
            let got = decode(&cut);
            if !ends_with_message(&f) && untraced_len(&f) != Some(k) {
                assert!(got.is_err(), "{f:?} cut at {k} decoded as {got:?}");
            }
        }
    }
}

#[test]
fn event_wire_len_bounds_what_encode_writes() {
    let Frame::RecoverChunk { chunk, .. } = &samples()[10] else { unreachable!() };
    let bound: usize = BATCH_OVERHEAD_BYTES + chunk.events.iter().map(event_wire_len).sum::<usize>();
    assert!(bytes_of(&samples()[10]).len() <= HEADER_LEN + CHUNK_FIXED_BYTES + bound);
    // Large events too: the bound holds per block and per hash.
    for n in [0usize, 1, 7, 1000] {
        let blocks = (0..n as u64).map(|i| StoredBlock { seq_hash: SeqHash(i), engine_hash: EngineHash(i) }).collect();
        let hashes = (0..n as u64).map(EngineHash).collect();
        let events = vec![
            event(KvEventKind::Stored { parent: Some(SeqHash(1)), blocks }),
            event(KvEventKind::Removed { engine_hashes: hashes }),
            event(KvEventKind::Cleared),
        ];
        let bound = BATCH_OVERHEAD_BYTES + events.iter().map(event_wire_len).sum::<usize>();
        assert!(codec::encode_batch_within(&events, MAX_EVENTS_BYTES).unwrap().len() <= bound, "{n} blocks");
    }
}

#[test]
fn decode_from_consumes_one_frame_at_a_time() {
    let mut buf = BytesMut::new();
    let (a, b) = (Frame::Cancel { stream: StreamId(1) }, Frame::Credit { stream: StreamId(2), outputs: 3 });
    a.encode(&mut buf).unwrap();
    b.encode(&mut buf).unwrap();
    buf.put_u8(0);
    assert_eq!(dbg(&decode_from(&mut buf).unwrap().unwrap()), dbg(&a));
    assert_eq!(dbg(&decode_from(&mut buf).unwrap().unwrap()), dbg(&b));
    assert!(decode_from(&mut buf).unwrap().is_none());
    assert_eq!(buf.len(), 1);
}

#[test]
fn oversized_and_undersized_lengths_are_refused_from_the_header() {
    let huge = (MAX_FRAME_BYTES as u32).to_le_bytes();
    assert!(matches!(decode(&huge), Err(FrameError::TooLarge { .. })));
    assert!(matches!(decode(&u32::MAX.to_le_bytes()), Err(FrameError::TooLarge { .. })));
    assert!(matches!(decode(&8u32.to_le_bytes()), Err(FrameError::TooShort { len: 12 })));
}

#[test]
fn encode_refuses_an_oversized_frame_and_writes_nothing() {
    let ids = vec![0; MAX_FRAME_BYTES / 4];
    let mut out = BytesMut::from(&b"x"[..]);
    let f = Frame::Output { stream: StreamId(1), output: WorkerOutput::Tokens(ids) };
    assert!(matches!(f.encode(&mut out), Err(FrameError::TooLarge { .. })));
    assert_eq!(&out[..], b"x");
}

#[test]
fn malformed_payloads_are_typed_errors() {
    let mut b = bytes_of(&Frame::Cancel { stream: StreamId(1) });
    b[4] = 99;
    assert!(matches!(decode(&b), Err(FrameError::UnknownKind(99))));
    let patch = |f: &Frame, at: usize, v: &[u8]| {
        let mut b = bytes_of(f);
        b[at..at + v.len()].copy_from_slice(v);
        decode(&b)
    };
    let bad = |r: Result<Option<(Frame, usize)>, FrameError>, what: &str| match r {
        Err(FrameError::Malformed { what: w, .. }) => assert_eq!(w, what),
        other => panic!("expected {what}, got {other:?}"),
    };
    let s = samples();
    bad(patch(&s[0], HEADER_LEN + 20, &[2]), "flag is neither 0 nor 1");
    bad(patch(&s[0], HEADER_LEN + 30, &u32::MAX.to_le_bytes()), "count exceeds the frame");
    bad(patch(&s[8], HEADER_LEN, &[0; 4]), "zero credit");
    bad(patch(&s[5], HEADER_LEN + 1, &[3]), "unknown finish reason");
    bad(patch(&s[2], HEADER_LEN, &[9]), "unknown output tag");
    // The disaggregation leg tag is the request's last field before the leg's payload.
    let plain = bytes_of(&s[0]);
    bad(patch(&s[0], plain.len() - 1, &[3]), "unknown disaggregation leg");
    let mut long = bytes_of(&s[7]);
    long.push(0);
    long[..4].copy_from_slice(&10u32.to_le_bytes());
    bad(decode(&long), "trailing bytes");
    let mut e = bytes_of(&Frame::Error { stream: StreamId(1), message: "ab".into() });
    e[HEADER_LEN] = 0xff;
    assert!(matches!(decode(&e), Err(FrameError::Utf8 { .. })));
}

#[test]
fn an_untraced_request_has_no_trace_bytes_and_a_traced_one_decodes_its_context() {
    let s = samples();
    let (plain, traced) = (&s[0], &s[s.len() - 2]);
    // 16 + 8 + 1 bytes, then the optional tracestate: flag, u32 length, "k=v,x=y".
    assert_eq!(bytes_of(traced).len(), bytes_of(plain).len() + 25 + 1 + 4 + 7);
    let (back, _) = decode(&bytes_of(traced)).unwrap().unwrap();
    let Frame::Request { request, .. } = back else { panic!("{back:?}") };
    assert_eq!(request.trace.as_deref(), Some(&trace(Some("k=v,x=y"))));
    let (back, _) = decode(&bytes_of(plain)).unwrap().unwrap();
    let Frame::Request { request, .. } = back else { panic!("{back:?}") };
    assert_eq!(request.trace, None);
}
