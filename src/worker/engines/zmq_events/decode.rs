//! One engine KV-event message → an engine-neutral [`EngineBatch`] (ENGINES.md §6 rules 1–5).
//!
//! A live message is three ZMQ frames: topic (opaque), sequence number (8 bytes, big-endian),
//! msgpack payload. The payload is a batch `[ts, events]` or `[ts, events, rank]` (a map
//! `{ts, events, data_parallel_rank|attn_dp_rank|dp_rank}` is accepted too). Each event is a
//! tagged map (`{"type": "BlockStored", …}`, decoded by key name, unknown keys ignored; SGLang
//! 0.5.23 and vLLM 0.34.0) or a tagged array (`["BlockStored", …]`, positional, extra positions
//! ignored; older releases). Unknown event types are skipped and counted in
//! [`EngineBatch::unknown_events`].
//!
//! Hashes are msgpack integers of either sign (SGLang publishes signed int64, vLLM unsigned
//! uint64) or `bin` (vLLM with integer hashes off: the last 8 bytes, big-endian), kept as the
//! `u64` bit pattern. `token_ids` is `[int]`, or bigram pairs `[[a, b], …]` (SGLang EAGLE pages),
//! which become the pairs' first elements followed by the last pair's second element, as Dynamo
//! does: such an event carries one token more than its blocks (see [`EngineEvent::Stored`]).
//!
//! The reader is hand-rolled over the byte slice (`super::msgpack`): no serde, no recursion
//! (skipping an unknown value walks it with a counter, so nesting depth costs nothing), no
//! allocation larger than the remaining input can justify, and no panic on any input: every
//! failure is a [`DecodeError`]. Pure functions; no state. About 7 M blocks/s on one core
//! (`benches/engine_events.rs`).

use thiserror::Error;

use super::msgpack::{is_array, is_map, Reader};

/// The sequence number of the replay end marker (−1 as a signed big-endian integer).
pub const SEQ_END: u64 = u64::MAX;

/// Where a block lives. Only [`Medium::Gpu`] (or no medium) is indexed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Medium {
    Gpu,
    /// Any other tier as the engine names it (`CPU_PINNED`, `DISK`, `EXTERNAL`, `CPU`, `STORAGE`).
    Other(String),
}

/// One cache change as an engine published it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EngineEvent {
    /// Blocks filled, in prefix order. `token_ids` covers every block:
    /// `len == block_hashes.len() × block_size`, plus one when `bigram` (the pairs' firsts, then
    /// the last pair's second).
    Stored {
        block_hashes: Vec<u64>,
        parent: Option<u64>,
        token_ids: Vec<u32>,
        bigram: bool,
        block_size: u32,
        lora_name: Option<String>,
        medium: Option<Medium>,
        group_idx: u32,
    },
    /// Blocks evicted (engine hashes). `group_idx` is vLLM's KV cache group (0 when absent).
    Removed { block_hashes: Vec<u64>, medium: Option<Medium>, group_idx: u32 },
    /// The whole cache was reset.
    Cleared,
}

/// One decoded message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EngineBatch {
    pub seq: u64,
    /// The rank the batch names (element 3), if any.
    pub rank: Option<u32>,
    pub events: Vec<EngineEvent>,
    /// Events of a type this decoder does not know, skipped.
    pub unknown_events: u32,
}

/// What a replay reply frame set is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplayReply<'a> {
    Batch { seq: u64, payload: &'a [u8] },
    End,
}

/// Why a message could not be decoded. Every variant is the publisher's fault (or corruption on
/// the way); decoding the same bytes again gives the same error, so a retry never helps.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum DecodeError {
    #[error("message has {got} frames, expected {want}")]
    FrameCount { got: usize, want: &'static str },
    #[error("replay reply does not start with an empty delimiter frame")]
    NoDelimiter,
    #[error("sequence frame has {got} bytes, expected 8")]
    SeqFrame { got: usize },
    #[error("payload truncated at byte {at}")]
    Truncated { at: usize },
    #[error("{what}: unexpected msgpack marker 0x{marker:02x} at byte {at}")]
    Type { what: &'static str, marker: u8, at: usize },
    #[error("{what}: integer out of range at byte {at}")]
    Range { what: &'static str, at: usize },
    #[error("{what}: invalid UTF-8 at byte {at}")]
    Utf8 {
        what: &'static str,
        at: usize,
        #[source]
        source: std::str::Utf8Error,
    },
    #[error("batch is an array of {len} elements, expected 2 or 3")]
    BatchLen { len: u32 },
    #[error("{event} without `{field}`")]
    Missing { event: &'static str, field: &'static str },
    #[error("{extra} bytes after the batch")]
    Trailing { extra: usize },
}

type Result<T> = std::result::Result<T, DecodeError>;

/// The sequence number frame: exactly 8 bytes, big-endian.
pub fn parse_seq(frame: &[u8]) -> Result<u64> {
    let bytes: [u8; 8] = frame.try_into().map_err(|_| DecodeError::SeqFrame { got: frame.len() })?;
    Ok(u64::from_be_bytes(bytes))
}

/// A live message: exactly `[topic, seq, payload]`.
pub fn decode_message<F: AsRef<[u8]>>(frames: &[F]) -> Result<EngineBatch> {
    let [_topic, seq, payload] = frames else {
        return Err(DecodeError::FrameCount { got: frames.len(), want: "3 (topic, seq, payload)" });
    };
    decode_payload(parse_seq(seq.as_ref())?, payload.as_ref())
}

/// A reply on the replay (DEALER) socket: `["", topic, seq, payload]` (current releases) or
/// `["", seq, payload]` (older ones); `seq == SEQ_END` is the end marker in either shape.
pub fn parse_replay_reply<F: AsRef<[u8]>>(frames: &[F]) -> Result<ReplayReply<'_>> {
    let (seq, payload) = match frames {
        [delim, _, seq, payload] | [delim, seq, payload] => {
            if !delim.as_ref().is_empty() {
                return Err(DecodeError::NoDelimiter);
            }
            (parse_seq(seq.as_ref())?, payload.as_ref())
        }
        _ => return Err(DecodeError::FrameCount { got: frames.len(), want: "3 or 4 (replay reply)" }),
    };
    Ok(if seq == SEQ_END { ReplayReply::End } else { ReplayReply::Batch { seq, payload } })
}

/// A batch payload (msgpack) published with sequence number `seq`.
pub fn decode_payload(seq: u64, payload: &[u8]) -> Result<EngineBatch> {
    let mut r = Reader::new(payload);
    let mut batch = EngineBatch { seq, rank: None, events: Vec::new(), unknown_events: 0 };
    match r.peek()? {
        m if is_array(m) => {
            let len = r.array_len("batch")?;
            if len != 2 && len != 3 {
                return Err(DecodeError::BatchLen { len });
            }
            r.skip()?; // ts
            r.events(&mut batch)?;
            if len == 3 {
                batch.rank = r.rank()?;
            }
        }
        m if is_map(m) => {
            let mut have_events = false;
            for _ in 0..r.map_len("batch")? {
                match r.str("batch key")? {
                    b"events" => {
                        r.events(&mut batch)?;
                        have_events = true;
                    }
                    b"data_parallel_rank" | b"attn_dp_rank" | b"dp_rank" => batch.rank = r.rank()?,
                    _ => r.skip()?,
                }
            }
            if !have_events {
                return Err(DecodeError::Missing { event: "batch", field: "events" });
            }
        }
        marker => return Err(DecodeError::Type { what: "batch", marker, at: 0 }),
    }
    if r.pos != payload.len() {
        return Err(DecodeError::Trailing { extra: payload.len() - r.pos });
    }
    Ok(batch)
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Stored,
    Removed,
    Cleared,
}

fn kind_of(tag: &[u8]) -> Option<Kind> {
    match tag {
        b"BlockStored" => Some(Kind::Stored),
        b"BlockRemoved" => Some(Kind::Removed),
        b"AllBlocksCleared" => Some(Kind::Cleared),
        _ => None,
    }
}

/// Fields of one event, collected in any order, then checked against its kind.
#[derive(Default)]
struct Fields {
    block_hashes: Option<Vec<u64>>,
    parent: Option<u64>,
    tokens: Option<(Vec<u32>, bool)>,
    block_size: Option<u32>,
    lora_name: Option<String>,
    medium: Option<Medium>,
    group_idx: u32,
}

impl Fields {
    fn build(self, kind: Kind) -> Result<EngineEvent> {
        let missing = |event, field| DecodeError::Missing { event, field };
        Ok(match kind {
            Kind::Stored => {
                let (token_ids, bigram) = self.tokens.ok_or(missing("BlockStored", "token_ids"))?;
                EngineEvent::Stored {
                    block_hashes: self.block_hashes.ok_or(missing("BlockStored", "block_hashes"))?,
                    parent: self.parent,
                    token_ids,
                    bigram,
                    block_size: self.block_size.ok_or(missing("BlockStored", "block_size"))?,
                    lora_name: self.lora_name,
                    medium: self.medium,
                    group_idx: self.group_idx,
                }
            }
            Kind::Removed => EngineEvent::Removed {
                block_hashes: self.block_hashes.ok_or(missing("BlockRemoved", "block_hashes"))?,
                medium: self.medium,
                group_idx: self.group_idx,
            },
            Kind::Cleared => EngineEvent::Cleared,
        })
    }
}

impl Reader<'_> {
    fn opt_medium(&mut self) -> Result<Option<Medium>> {
        Ok(self.opt_string("medium")?.map(|m| if m == "GPU" { Medium::Gpu } else { Medium::Other(m) }))
    }

    fn rank(&mut self) -> Result<Option<u32>> {
        self.opt_u32("rank")
    }

    /// A block hash: an integer of either sign, or `bin` (its last 8 bytes, big-endian).
    #[inline]
    fn hash(&mut self) -> Result<u64> {
        let at = self.pos;
        let len = match self.peek()? {
            0xc4 => {
                self.pos += 1;
                self.u8_len()?
            }
            0xc5 => {
                self.pos += 1;
                self.u16_len()?
            }
            0xc6 => {
                self.pos += 1;
                self.u32_len()?
            }
            _ => return self.int("block hash").map(|(_, bits)| bits),
        };
        let bytes = self.take(len)?;
        if bytes.is_empty() {
            return Err(DecodeError::Range { what: "block hash", at });
        }
        let tail = &bytes[bytes.len().saturating_sub(8)..];
        Ok(tail.iter().fold(0u64, |acc, &b| (acc << 8) | b as u64))
    }

    fn opt_hash(&mut self) -> Result<Option<u64>> {
        if self.nil()? {
            return Ok(None);
        }
        self.hash().map(Some)
    }

    fn hashes(&mut self) -> Result<Vec<u64>> {
        let n = self.array_len("block_hashes")?;
        let mut out = Vec::with_capacity(self.capacity(n, 1));
        for _ in 0..n {
            out.push(self.hash()?);
        }
        Ok(out)
    }

    /// `[int]`, or bigram pairs `[[a, b], …]` → (firsts + last second, true).
    fn tokens(&mut self) -> Result<(Vec<u32>, bool)> {
        let n = self.array_len("token_ids")?;
        if n == 0 || !is_array(self.peek()?) {
            let mut out = Vec::with_capacity(self.capacity(n, 1));
            for _ in 0..n {
                out.push(self.u32("token id")?);
            }
            return Ok((out, false));
        }
        let mut out = Vec::with_capacity(self.capacity(n, 3) + 1);
        let mut last_second = 0;
        for _ in 0..n {
            let at = self.pos;
            if self.array_len("token pair")? != 2 {
                return Err(DecodeError::Range { what: "token pair length", at });
            }
            out.push(self.u32("token id")?);
            last_second = self.u32("token id")?;
        }
        out.push(last_second);
        Ok((out, true))
    }

    fn events(&mut self, batch: &mut EngineBatch) -> Result<()> {
        let n = self.array_len("events")?;
        batch.events.reserve(self.capacity(n, 1));
        for _ in 0..n {
            let at = self.pos;
            let event = match self.peek()? {
                m if is_map(m) => self.event_map()?,
                m if is_array(m) => self.event_array()?,
                marker => return Err(DecodeError::Type { what: "event", marker, at }),
            };
            match event {
                Some(e) => batch.events.push(e),
                None => batch.unknown_events += 1,
            }
        }
        Ok(())
    }

    /// One known field of a map-encoded event; `false` for a key this decoder ignores.
    fn field(&mut self, key: &[u8], f: &mut Fields) -> Result<bool> {
        match key {
            b"block_hashes" => f.block_hashes = Some(self.hashes()?),
            b"parent_block_hash" => f.parent = self.opt_hash()?,
            b"token_ids" => f.tokens = Some(self.tokens()?),
            b"block_size" => f.block_size = Some(self.u32("block_size")?),
            b"lora_name" => f.lora_name = self.opt_string("lora_name")?,
            b"medium" => f.medium = self.opt_medium()?,
            b"group_idx" => f.group_idx = self.opt_u32("group_idx")?.unwrap_or(0),
            _ => return Ok(false),
        }
        Ok(true)
    }

    /// `{"type": tag, key: value, …}`; `None` for an unknown tag (the rest is skipped).
    fn event_map(&mut self) -> Result<Option<EngineEvent>> {
        let n = self.map_len("event")?;
        let mut f = Fields::default();
        let mut kind = None;
        for i in 0..n {
            let key = self.str("event key")?;
            if key == b"type" {
                match kind_of(self.str("event type")?) {
                    Some(k) => kind = Some(k),
                    None => {
                        self.skip_n(2 * (n - i - 1) as u64)?;
                        return Ok(None);
                    }
                }
            } else if !self.field(key, &mut f)? {
                self.skip()?;
            }
        }
        let kind = kind.ok_or(DecodeError::Missing { event: "event", field: "type" })?;
        f.build(kind).map(Some)
    }

    /// `[tag, positional…]`. BlockStored: block_hashes, parent_block_hash, token_ids,
    /// block_size, lora_id, medium, lora_name, extra_keys, group_idx. BlockRemoved:
    /// block_hashes, medium, group_idx. Later positions are ignored.
    fn event_array(&mut self) -> Result<Option<EngineEvent>> {
        let n = self.array_len("event")?;
        if n == 0 {
            return Err(DecodeError::Missing { event: "event", field: "type" });
        }
        let Some(kind) = kind_of(self.str("event type")?) else {
            self.skip_n(n as u64 - 1)?;
            return Ok(None);
        };
        const STORED: &[&[u8]] = &[
            b"block_hashes",
            b"parent_block_hash",
            b"token_ids",
            b"block_size",
            b"lora_id",
            b"medium",
            b"lora_name",
            b"extra_keys",
            b"group_idx",
        ];
        const REMOVED: &[&[u8]] = &[b"block_hashes", b"medium", b"group_idx"];
        let names = match kind {
            Kind::Stored => STORED,
            Kind::Removed => REMOVED,
            Kind::Cleared => &[],
        };
        let mut f = Fields::default();
        for i in 1..n as usize {
            match names.get(i - 1) {
                Some(name) if self.field(name, &mut f)? => {}
                _ => self.skip()?,
            }
        }
        f.build(kind).map(Some)
    }
}
