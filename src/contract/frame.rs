//! Request-plane frames: the bytes a frontend and a worker exchange on one TCP connection.
//!
//! ```text
//! offset 0..4   L, u32 little-endian: the bytes after this field (kind + stream + payload)
//!        4      kind (FrameKind)
//!        5..13  stream id, u64 little-endian (0 = the connection itself)
//!        13..   payload, L - 9 bytes
//! ```
//!
//! Payloads (integers little-endian; `flag` is a byte 0 or 1; `n×T` is a u32 count then items):
//! - `Request`: request_id u64, max_tokens u32, temperature f32, top_p f32, seed flag (+ u64),
//!   ignore_eos flag, n×u32 prompt ids, n×u32 eos ids, disagg u8 (0 none | 1 prefill: room u64,
//!   peer u64, skip_blocks u32, optional string bootstrap | 2 decode: room u64, peer u64,
//!   skip_blocks u32, optional string bootstrap, optional string handoff); an optional string is
//!   a flag, then (when set) a u32 length and UTF-8. Then, only when the request carries a trace
//!   context: trace id 16 bytes, span id 8 bytes, flags u8, optional string tracestate. A frame
//!   that ends before it has none, so an untraced request is the same bytes as before tracing
//!   existed, and a traced one reaches a worker built before it only if the frontend traces.
//! - `Output`: tag u8, then 0 `Started` cached_tokens u32, computed_tokens u32 | 1 `Tokens`
//!   n×u32 | 2 `Finished` reason u8 (0 eos, 1 length, 2 cancelled) | 3 `Error` fault u8 (low 7
//!   bits: 0 client, 1 worker, 2 transport; top bit: retry), UTF-8 message to the end | 4
//!   `Transferred` blocks u32, bytes u64, micros u64 | 5 `Handoff` UTF-8 to the end.
//! - `Cancel`: empty. `Credit`: outputs u32 (> 0). `RecoverRequest`: since_event_id u64.
//! - `RecoverChunk`: kind u8 (0 replay, 1 dump), last_event_id u64, more flag, then a u32
//!   length and the events as one batch in the event plane's own encoding
//!   ([`crate::contract::codec`]: the ONE encoding of KV events), at most [`MAX_EVENTS_BYTES`].
//! - `Error`: UTF-8 message to the end.
//!
//! Encoding choice: hand-rolled little-endian, because `Output(Tokens)` is the per-token path.
//! Measured on a one-token output (release build, encode + decode): 30 ns and 22 bytes here
//! (the `Vec` allocation is most of it) against 118 ns and 32 bytes with serde_json. rkyv
//! would need 8-aligned input (frames sit at any offset of a read buffer, so each would be
//! copied) and a bytecheck pass per frame. KV events are the exception: they keep their one
//! encoding (rkyv, see `codec`), copied into alignment once per recovery chunk (a cold path). Encoders destructure the protocol types
//! exhaustively, so a new field in [`crate::contract`] fails to compile here instead of
//! vanishing on the wire.
//!
//! Invariants: [`Frame::encode`] only writes what [`decode`] reads back equal, and refuses a
//! frame over [`MAX_FRAME_BYTES`]. [`decode`] never panics, and allocates in proportion to the
//! bytes it was given: every count is checked against the bytes left before a `Vec` is made; a
//! frame must be consumed exactly (no trailing bytes, flags 0 or 1, valid UTF-8), else a
//! [`FrameError`]. Concurrency: pure functions, no shared state.

use bytes::{Buf, BufMut, BytesMut};
use thiserror::Error;

use crate::contract::codec;
use crate::contract::events::{KvEvent, KvEventKind};
use crate::contract::{
    DisaggLeg, Fault, FinishReason, GenerateRequest, SamplingParams, TraceContext, WorkerError, WorkerId, WorkerOutput,
};

/// The largest frame, length field included: an 8M-token prompt or a 1M-block replay event fits
/// (a step stores at most `MAX_BATCHED_TOKENS` blocks); a peer that claims more is cut off, and
/// one that claims this much costs only what it has actually sent (the reader grows as data
/// arrives).
pub const MAX_FRAME_BYTES: usize = 32 * 1024 * 1024;
/// Bytes before the payload: length, kind, stream id.
pub const HEADER_LEN: usize = 13;
/// Encoded bytes of one event at most, besides its blocks or hashes (an upper bound of its
/// archived size inside a batch: worker, id, timestamp, kind, parent, vector header, padding).
pub const EVENT_FIXED_BYTES: usize = 64;
/// Encoded bytes of a batch besides its events at most (the codec's header and root).
pub const BATCH_OVERHEAD_BYTES: usize = 64;
/// Wire bytes of a `RecoverChunk` payload before its events (kind, last id, more, length).
pub const CHUNK_FIXED_BYTES: usize = 14;
/// The largest encoded batch a `RecoverChunk` carries.
pub const MAX_EVENTS_BYTES: usize = MAX_FRAME_BYTES - HEADER_LEN - CHUNK_FIXED_BYTES;

const _: () = assert!(MAX_FRAME_BYTES <= u32::MAX as usize);
// The largest event fits one chunk.
const _: () = assert!(
    crate::contract::events::MAX_EVENT_BLOCKS * 16 + EVENT_FIXED_BYTES + BATCH_OVERHEAD_BYTES <= MAX_EVENTS_BYTES
);

/// One multiplexed stream of a connection; allocated by the frontend, never reused on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct StreamId(pub u64);

impl StreamId {
    /// The connection itself (connection-level `Error` frames).
    pub const CONNECTION: StreamId = StreamId(0);
}

/// The frame kinds, as their wire byte.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum FrameKind {
    Request = 1,
    Output = 2,
    Cancel = 3,
    Credit = 4,
    RecoverRequest = 5,
    RecoverChunk = 6,
    Error = 7,
}

impl FrameKind {
    fn from_byte(b: u8) -> Option<Self> {
        use FrameKind::*;
        [Request, Output, Cancel, Credit, RecoverRequest, RecoverChunk, Error].into_iter().find(|k| *k as u8 == b)
    }
}

/// Which [`crate::contract::control::Recovery`] a run of chunks rebuilds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecoveryKind {
    Replay,
    Dump,
}

/// One piece of a recovery reply; the last has `more == false`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecoveryChunk {
    pub kind: RecoveryKind,
    /// The dump's `last_event_id`; 0 for a replay.
    pub last_event_id: u64,
    pub more: bool,
    pub events: Vec<KvEvent>,
}

/// One frame, decoded. (Not `PartialEq`: `GenerateRequest` is not; tests compare `Debug`.)
#[derive(Debug, Clone)]
pub enum Frame {
    /// Frontend → worker: start a stream.
    Request { stream: StreamId, request: GenerateRequest },
    /// Worker → frontend: the next output of a stream (`Finished`/`Error` end it).
    Output { stream: StreamId, output: WorkerOutput },
    /// Frontend → worker: the client is gone; the worker answers `Finished { Cancelled }`.
    Cancel { stream: StreamId },
    /// Frontend → worker: the stream may send `outputs` more outputs (flow control).
    Credit { stream: StreamId, outputs: u32 },
    /// Frontend → worker: replay the KV events after `since_event_id`, or dump.
    RecoverRequest { stream: StreamId, since_event_id: u64 },
    /// Worker → frontend: part of the answer to a `RecoverRequest`.
    RecoverChunk { stream: StreamId, chunk: RecoveryChunk },
    /// Either way: the stream (or, on stream 0, the connection) failed; it ends here.
    Error { stream: StreamId, message: String },
}

/// A frame that cannot be read or written.
#[derive(Debug, Error)]
pub enum FrameError {
    #[error("frame of {len} bytes exceeds MAX_FRAME_BYTES ({MAX_FRAME_BYTES})")]
    TooLarge { len: usize },
    #[error("frame length {len} is shorter than a frame header")]
    TooShort { len: usize },
    #[error("unknown frame kind {0}")]
    UnknownKind(u8),
    #[error("malformed {kind:?} frame: {what}")]
    Malformed { kind: FrameKind, what: &'static str },
    #[error("recovery chunk events: {0}")]
    Events(#[source] codec::CodecError),
    #[error("malformed {kind:?} frame: message is not UTF-8")]
    Utf8 {
        kind: FrameKind,
        #[source]
        source: std::str::Utf8Error,
    },
}

impl Frame {
    pub fn stream(&self) -> StreamId {
        match self {
            Frame::Request { stream, .. }
            | Frame::Output { stream, .. }
            | Frame::Cancel { stream }
            | Frame::Credit { stream, .. }
            | Frame::RecoverRequest { stream, .. }
            | Frame::RecoverChunk { stream, .. }
            | Frame::Error { stream, .. } => *stream,
        }
    }

    pub fn kind(&self) -> FrameKind {
        match self {
            Frame::Request { .. } => FrameKind::Request,
            Frame::Output { .. } => FrameKind::Output,
            Frame::Cancel { .. } => FrameKind::Cancel,
            Frame::Credit { .. } => FrameKind::Credit,
            Frame::RecoverRequest { .. } => FrameKind::RecoverRequest,
            Frame::RecoverChunk { .. } => FrameKind::RecoverChunk,
            Frame::Error { .. } => FrameKind::Error,
        }
    }

    /// Appends the frame to `out`; over [`MAX_FRAME_BYTES`] nothing is appended.
    pub fn encode(&self, out: &mut BytesMut) -> Result<(), FrameError> {
        let start = out.len();
        out.put_u32_le(0);
        out.put_u8(self.kind() as u8);
        out.put_u64_le(self.stream().0);
        match self {
            Frame::Request { request, .. } => put_request(out, request),
            Frame::Output { output, .. } => put_output(out, output),
            Frame::Cancel { .. } => {}
            Frame::Credit { outputs, .. } => out.put_u32_le(*outputs),
            Frame::RecoverRequest { since_event_id, .. } => out.put_u64_le(*since_event_id),
            Frame::RecoverChunk { chunk, .. } => {
                if let Err(e) = put_chunk(out, chunk) {
                    out.truncate(start);
                    return Err(e);
                }
            }
            Frame::Error { message, .. } => out.put_slice(message.as_bytes()),
        }
        let len = out.len() - start;
        if len > MAX_FRAME_BYTES {
            out.truncate(start);
            return Err(FrameError::TooLarge { len });
        }
        out[start..start + 4].copy_from_slice(&((len - 4) as u32).to_le_bytes());
        Ok(())
    }
}

/// Encoded bytes of one event inside a `RecoverChunk` at most (to size chunks before encoding
/// them; a chunk's batch takes at most [`BATCH_OVERHEAD_BYTES`] plus the sum of these).
pub fn event_wire_len(e: &KvEvent) -> usize {
    EVENT_FIXED_BYTES
        + match &e.kind {
            KvEventKind::Stored { blocks, .. } => 16 * blocks.len(),
            KvEventKind::Removed { engine_hashes } => 8 * engine_hashes.len(),
            KvEventKind::Cleared => 0,
        }
}

/// The total length of the frame `buf` starts with, once its length field has arrived.
pub fn frame_len(buf: &[u8]) -> Result<Option<usize>, FrameError> {
    let Some(head) = buf.get(..4) else {
        return Ok(None);
    };
    let body = u32::from_le_bytes([head[0], head[1], head[2], head[3]]) as usize;
    let len = body + 4;
    if len > MAX_FRAME_BYTES {
        return Err(FrameError::TooLarge { len });
    }
    if len < HEADER_LEN {
        return Err(FrameError::TooShort { len });
    }
    Ok(Some(len))
}

/// The first frame of `buf` and the bytes it took, or `None` while it is incomplete.
pub fn decode(buf: &[u8]) -> Result<Option<(Frame, usize)>, FrameError> {
    let Some(len) = frame_len(buf)? else {
        return Ok(None);
    };
    let Some(frame) = buf.get(..len) else {
        return Ok(None);
    };
    let kind = FrameKind::from_byte(frame[4]).ok_or(FrameError::UnknownKind(frame[4]))?;
    let mut c = Cursor { b: &frame[5..], kind };
    let stream = StreamId(c.u64()?);
    let decoded = match kind {
        FrameKind::Request => Frame::Request { stream, request: c.request()? },
        FrameKind::Output => Frame::Output { stream, output: c.output()? },
        FrameKind::Cancel => Frame::Cancel { stream },
        FrameKind::Credit => match c.u32()? {
            0 => return Err(c.bad("zero credit")),
            outputs => Frame::Credit { stream, outputs },
        },
        FrameKind::RecoverRequest => Frame::RecoverRequest { stream, since_event_id: c.u64()? },
        FrameKind::RecoverChunk => Frame::RecoverChunk { stream, chunk: c.chunk()? },
        FrameKind::Error => Frame::Error { stream, message: c.rest_utf8()? },
    };
    if !c.b.is_empty() {
        return Err(c.bad("trailing bytes"));
    }
    Ok(Some((decoded, len)))
}

/// [`decode`] from a read buffer, consuming the frame's bytes.
pub fn decode_from(buf: &mut BytesMut) -> Result<Option<Frame>, FrameError> {
    let Some((frame, used)) = decode(buf)? else {
        return Ok(None);
    };
    buf.advance(used);
    Ok(Some(frame))
}

fn put_u32s(out: &mut BytesMut, ids: &[u32]) {
    out.put_u32_le(ids.len() as u32);
    out.reserve(ids.len() * 4);
    ids.iter().for_each(|t| out.put_u32_le(*t));
}

/// A flag, then (when set) a u32 length and the UTF-8 bytes.
fn put_opt_str(out: &mut BytesMut, v: Option<&str>) {
    out.put_u8(u8::from(v.is_some()));
    if let Some(s) = v {
        out.put_u32_le(s.len() as u32);
        out.put_slice(s.as_bytes());
    }
}

fn put_flag_u64(out: &mut BytesMut, v: Option<u64>) {
    out.put_u8(u8::from(v.is_some()));
    if let Some(v) = v {
        out.put_u64_le(v);
    }
}

fn put_request(out: &mut BytesMut, r: &GenerateRequest) {
    let GenerateRequest { request_id, token_ids, sampling, eos_token_ids, disagg, trace } = r;
    let SamplingParams { max_tokens, temperature, top_p, seed, ignore_eos } = sampling;
    out.put_u64_le(*request_id);
    out.put_u32_le(*max_tokens);
    out.put_f32_le(*temperature);
    out.put_f32_le(*top_p);
    put_flag_u64(out, *seed);
    out.put_u8(u8::from(*ignore_eos));
    put_u32s(out, token_ids);
    put_u32s(out, eos_token_ids);
    match disagg {
        None => out.put_u8(0),
        Some(DisaggLeg::Prefill { room, peer, skip_blocks, bootstrap }) => {
            out.put_u8(1);
            out.put_u64_le(*room);
            out.put_u64_le(peer.0);
            out.put_u32_le(*skip_blocks);
            put_opt_str(out, bootstrap.as_deref());
        }
        Some(DisaggLeg::Decode { room, peer, skip_blocks, bootstrap, handoff }) => {
            out.put_u8(2);
            out.put_u64_le(*room);
            out.put_u64_le(peer.0);
            out.put_u32_le(*skip_blocks);
            put_opt_str(out, bootstrap.as_deref());
            put_opt_str(out, handoff.as_deref());
        }
    }
    if let Some(TraceContext { trace_id, span_id, flags, state }) = trace.as_deref() {
        out.put_slice(trace_id);
        out.put_slice(span_id);
        out.put_u8(*flags);
        put_opt_str(out, state.as_deref());
    }
}

fn put_output(out: &mut BytesMut, o: &WorkerOutput) {
    match o {
        WorkerOutput::Started { cached_tokens, computed_tokens } => {
            out.put_u8(0);
            out.put_u32_le(*cached_tokens);
            out.put_u32_le(*computed_tokens);
        }
        WorkerOutput::Transferred { blocks, bytes, micros } => {
            out.put_u8(4);
            out.put_u32_le(*blocks);
            out.put_u64_le(*bytes);
            out.put_u64_le(*micros);
        }
        WorkerOutput::Handoff(params) => {
            out.put_u8(5);
            out.put_slice(params.as_bytes());
        }
        WorkerOutput::Tokens(ids) => {
            out.put_u8(1);
            put_u32s(out, ids);
        }
        WorkerOutput::Finished { reason } => {
            out.put_u8(2);
            out.put_u8(match reason {
                FinishReason::Eos => 0,
                FinishReason::Length => 1,
                FinishReason::Cancelled => 2,
            });
        }
        WorkerOutput::Error(e) => {
            out.put_u8(3);
            out.put_u8(e.fault.code() | (u8::from(e.retry) << 7));
            out.put_slice(e.message.as_bytes());
        }
    }
}

fn put_chunk(out: &mut BytesMut, c: &RecoveryChunk) -> Result<(), FrameError> {
    let RecoveryChunk { kind, last_event_id, more, events } = c;
    out.put_u8(match kind {
        RecoveryKind::Replay => 0,
        RecoveryKind::Dump => 1,
    });
    out.put_u64_le(*last_event_id);
    out.put_u8(u8::from(*more));
    // The events in the event plane's own encoding (one encoding of KV events).
    let batch = codec::encode_batch_within(events, MAX_EVENTS_BYTES).map_err(FrameError::Events)?;
    out.put_u32_le(batch.len() as u32);
    out.put_slice(&batch);
    Ok(())
}

/// A bounds-checked reader over one frame's bytes.
struct Cursor<'a> {
    b: &'a [u8],
    kind: FrameKind,
}

impl<'a> Cursor<'a> {
    fn bad(&self, what: &'static str) -> FrameError {
        FrameError::Malformed { kind: self.kind, what }
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], FrameError> {
        if n > self.b.len() {
            return Err(self.bad("truncated"));
        }
        let (head, tail) = self.b.split_at(n);
        self.b = tail;
        Ok(head)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], FrameError> {
        let mut a = [0; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }

    fn u8(&mut self) -> Result<u8, FrameError> {
        Ok(self.array::<1>()?[0])
    }

    fn u32(&mut self) -> Result<u32, FrameError> {
        Ok(u32::from_le_bytes(self.array()?))
    }

    fn u64(&mut self) -> Result<u64, FrameError> {
        Ok(u64::from_le_bytes(self.array()?))
    }

    fn flag(&mut self) -> Result<bool, FrameError> {
        match self.u8()? {
            0 => Ok(false),
            1 => Ok(true),
            _ => Err(self.bad("flag is neither 0 nor 1")),
        }
    }

    fn opt_u64(&mut self) -> Result<Option<u64>, FrameError> {
        if self.flag()? {
            Ok(Some(self.u64()?))
        } else {
            Ok(None)
        }
    }

    /// A count of items of at least `min_item_bytes` each, checked against the bytes left.
    fn count(&mut self, min_item_bytes: usize) -> Result<usize, FrameError> {
        let n = self.u32()? as usize;
        if n.saturating_mul(min_item_bytes) > self.b.len() {
            return Err(self.bad("count exceeds the frame"));
        }
        Ok(n)
    }

    fn u32s(&mut self) -> Result<Vec<u32>, FrameError> {
        let n = self.count(4)?;
        let bytes = self.take(n * 4)?;
        Ok(bytes.chunks_exact(4).map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect())
    }

    fn opt_str(&mut self) -> Result<Option<String>, FrameError> {
        if !self.flag()? {
            return Ok(None);
        }
        let n = self.count(1)?;
        let bytes = self.take(n)?;
        let s = std::str::from_utf8(bytes).map_err(|source| FrameError::Utf8 { kind: self.kind, source })?;
        Ok(Some(s.to_owned()))
    }

    fn rest_utf8(&mut self) -> Result<String, FrameError> {
        let rest = self.take(self.b.len())?;
        let s = std::str::from_utf8(rest).map_err(|source| FrameError::Utf8 { kind: self.kind, source })?;
        Ok(s.to_owned())
    }

    fn request(&mut self) -> Result<GenerateRequest, FrameError> {
        let request_id = self.u64()?;
        let max_tokens = self.u32()?;
        let temperature = f32::from_bits(self.u32()?);
        let top_p = f32::from_bits(self.u32()?);
        let seed = self.opt_u64()?;
        let ignore_eos = self.flag()?;
        let token_ids = self.u32s()?;
        let eos_token_ids = self.u32s()?;
        let disagg = match self.u8()? {
            0 => None,
            1 => Some(DisaggLeg::Prefill {
                room: self.u64()?,
                peer: WorkerId(self.u64()?),
                skip_blocks: self.u32()?,
                bootstrap: self.opt_str()?,
            }),
            2 => Some(DisaggLeg::Decode {
                room: self.u64()?,
                peer: WorkerId(self.u64()?),
                skip_blocks: self.u32()?,
                bootstrap: self.opt_str()?,
                handoff: self.opt_str()?,
            }),
            _ => return Err(self.bad("unknown disaggregation leg")),
        };
        let trace = if self.b.is_empty() {
            None
        } else {
            Some(Box::new(TraceContext {
                trace_id: self.array()?,
                span_id: self.array()?,
                flags: self.u8()?,
                state: self.opt_str()?,
            }))
        };
        let sampling = SamplingParams { max_tokens, temperature, top_p, seed, ignore_eos };
        Ok(GenerateRequest { request_id, token_ids, sampling, eos_token_ids, disagg, trace })
    }

    fn output(&mut self) -> Result<WorkerOutput, FrameError> {
        Ok(match self.u8()? {
            0 => WorkerOutput::Started { cached_tokens: self.u32()?, computed_tokens: self.u32()? },
            1 => WorkerOutput::Tokens(self.u32s()?),
            2 => WorkerOutput::Finished {
                reason: match self.u8()? {
                    0 => FinishReason::Eos,
                    1 => FinishReason::Length,
                    2 => FinishReason::Cancelled,
                    _ => return Err(self.bad("unknown finish reason")),
                },
            },
            3 => {
                let b = self.u8()?;
                let fault = Fault::from_code(b & 0x7f).ok_or_else(|| self.bad("unknown fault"))?;
                WorkerOutput::Error(WorkerError { fault, retry: b & 0x80 != 0, message: self.rest_utf8()? })
            }
            4 => WorkerOutput::Transferred { blocks: self.u32()?, bytes: self.u64()?, micros: self.u64()? },
            5 => WorkerOutput::Handoff(self.rest_utf8()?),
            _ => return Err(self.bad("unknown output tag")),
        })
    }

    fn chunk(&mut self) -> Result<RecoveryChunk, FrameError> {
        let kind = match self.u8()? {
            0 => RecoveryKind::Replay,
            1 => RecoveryKind::Dump,
            _ => return Err(self.bad("unknown recovery kind")),
        };
        let last_event_id = self.u64()?;
        let more = self.flag()?;
        let n = self.count(1)?;
        let bytes = self.take(n)?;
        let events = codec::decode_batch_within(bytes, MAX_EVENTS_BYTES).map_err(FrameError::Events)?;
        Ok(RecoveryChunk { kind, last_event_id, more, events })
    }
}

#[cfg(test)]
#[path = "frame_tests.rs"]
mod tests;
