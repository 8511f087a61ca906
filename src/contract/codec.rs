//! The wire format of a batch of KV events: what a worker publishes on the event plane (NATS).
//!
//! A batch is one worker's events, in event-id order, as one message:
//!
//! ```text
//! offset  0..4   MAGIC "KVEB"
//!         4      FORMAT_VERSION
//!         5..8   reserved, zero
//!         8..12  body length in bytes, u32 little-endian
//!        12..16  number of events, u32 little-endian
//!        16..    body: an rkyv archive of `Vec<KvEvent>` (bytecheck-validated on read)
//! ```
//!
//! This is the ONE encoding of KV events: the event plane's batches, and the events of a
//! request-plane recovery chunk ([`crate::contract::frame`]), which uses the `_within`
//! variants with the frame's bound instead of [`MAX_BATCH_BYTES`].
//!
//! Invariants: [`encode_batch`] only produces what [`access_batch`] accepts (at most
//! [`MAX_BATCH_BYTES`], one worker); [`access_batch`] returns a view only of bytes that passed
//! every check: size bound, magic, version, exact length, rkyv's bytecheck validation of every
//! pointer, enum tag and length, the event count, and one worker per batch. The archive is never
//! read before bytecheck has validated it, and untrusted bytes never cause a panic; each
//! rejection is a [`CodecError`] whose [`CodecError::label`] the consumer counts. Validation
//! proves the bytes are a well-formed batch, not that they are the bytes that were sent: there is
//! no checksum (the transport is TCP; a lying publisher is caught by the index's own checks).
//!
//! Alignment: the archive is read in place, so the whole message must start at an address that
//! is a multiple of [`ARCHIVE_ALIGN`]. [`encode_batch`] returns an [`AlignedVec`] that is.
//! Bytes received from NATS sit at whatever offset the client's read buffer put them (in
//! general not aligned), so [`AlignedPayload::new`] borrows them when they are aligned and
//! copies them into an `AlignedVec` only when they are not: one allocation and `memcpy`, at most
//! [`MAX_BATCH_BYTES`] (measured by the `codec` bench: ~0.4 µs for a 20 KB batch of 1,024 blocks,
//! on top of ~0.15 µs of validation). [`decode_batch`] does this for you. Turning on rkyv's
//! `unaligned` feature makes [`ARCHIVE_ALIGN`] 1 and removes the copy (measured: validation from
//! any offset ~0.14 µs, 4% smaller batches); it changes the archived layout, as do `big_endian`
//! and `pointer_width_*`, so any such switch is a wire-format change (see `FORMAT_VERSION`).
//!
//! The index applies owned [`KvEvent`]s for now: convert an archived event with
//! `KvEvent::from(&archived)` (field reads and one `Vec` per event, no rkyv deserializer).
//!
//! Concurrency: pure functions; no shared state. The returned view borrows the input bytes.

use std::ops::Deref;

use rkyv::rancor::Fallible;
use rkyv::ser::{Allocator, Writer};
use rkyv::util::AlignedVec;
use rkyv::vec::{ArchivedVec, VecResolver};
use rkyv::{Archive, Place, Serialize};
use thiserror::Error;

use crate::contract::events::SeqHash;
use crate::contract::events::{
    ArchivedKvEvent, ArchivedKvEventKind, ArchivedStoredBlock, EngineHash, KvEvent, KvEventKind, StoredBlock,
};
use crate::contract::WorkerId;

/// First four bytes of every batch.
pub const MAGIC: [u8; 4] = *b"KVEB";

/// The format this build reads and writes; bumped on any change to the header or to the
/// archived layout of the event types.
pub const FORMAT_VERSION: u8 = 1;

/// Bytes before the archive; a multiple of [`ARCHIVE_ALIGN`] so an aligned message has an
/// aligned body.
pub const HEADER_LEN: usize = 16;

/// The alignment a message must start at to be read in place: the largest alignment of any
/// archived event type (8, for their `u64` fields; 1 if rkyv's `unaligned` feature is on).
pub const ARCHIVE_ALIGN: usize = std::mem::align_of::<ArchivedKvEvent>();

/// The largest batch accepted or produced, header included: NATS's default `max_payload`, so no
/// batch this build writes is refused by a default server, and a hostile message costs at most
/// this much validation (and copying, when misaligned).
pub const MAX_BATCH_BYTES: usize = 1024 * 1024;

const _: () = assert!(HEADER_LEN % ARCHIVE_ALIGN == 0);
const _: () = assert!(std::mem::align_of::<ArchivedEventBatch>() <= ARCHIVE_ALIGN);
const _: () = assert!(std::mem::align_of::<ArchivedStoredBlock>() <= ARCHIVE_ALIGN);
const _: () = assert!(ARCHIVE_ALIGN <= AlignedVec::<16>::ALIGNMENT);
const _: () = assert!(MAX_BATCH_BYTES <= u32::MAX as usize);

/// A validated batch, read in place: index it, iterate it, or convert events with
/// `KvEvent::from(&event)`.
pub type ArchivedEventBatch = ArchivedVec<ArchivedKvEvent>;

/// Why a batch was refused. On decoding, every variant is a fault of the publisher (or of whatever corrupted the
/// message); retrying the same bytes never helps: count it, drop the batch, and let the event-id
/// gap trigger a replay or dump.
#[derive(Debug, Error)]
pub enum CodecError {
    /// Larger than [`MAX_BATCH_BYTES`]; refused before any other check.
    #[error("batch of {len} bytes exceeds the limit of {max} bytes")]
    TooLarge { len: usize, max: usize },
    /// Shorter than the header, or not the length the header announces.
    #[error("truncated batch: {len} bytes, expected {expected}")]
    Truncated { len: usize, expected: usize },
    /// Not a kvgate event batch.
    #[error("bad magic {found:?}: not a kvgate KV event batch")]
    BadMagic { found: [u8; 4] },
    /// A batch of another format version: publisher and router builds disagree; upgrade one.
    #[error(
        "batch format version {found}, this build reads version {supported}: upgrade the older of worker and router"
    )]
    UnsupportedVersion { found: u8, supported: u8 },
    /// The reserved header bytes are not zero.
    #[error("reserved header bytes {found:?} are not zero")]
    Reserved { found: [u8; 3] },
    /// The message does not start at a multiple of [`ARCHIVE_ALIGN`]: use [`AlignedPayload`].
    #[error("batch at address {addr:#x} is not aligned to {align} bytes")]
    Misaligned { addr: usize, align: usize },
    /// The body failed bytecheck validation (a bad pointer, length, enum tag or bound).
    #[error("malformed batch body")]
    Invalid(#[source] rkyv::rancor::Error),
    /// The body holds a different number of events than the header says.
    #[error("batch holds {found} events, header says {expected}")]
    CountMismatch { found: usize, expected: usize },
    /// A batch is one worker's events; this one names two (on encoding: the caller's bug).
    #[error("batch mixes workers {first} and {other}")]
    MixedWorkers { first: WorkerId, other: WorkerId },
    /// Encoding only: the encoder's own limit; split the events into smaller batches.
    #[error("{len} bytes of events exceed the batch limit of {max} bytes: split them")]
    TooManyToEncode { len: usize, max: usize },
    /// Encoding only: rkyv could not serialize (not expected with an in-memory writer).
    #[error("serializing a batch")]
    Encode(#[source] rkyv::rancor::Error),
}

impl CodecError {
    /// A short, fixed name for the error counter's label.
    pub fn label(&self) -> &'static str {
        match self {
            Self::TooLarge { .. } => "too_large",
            Self::Truncated { .. } => "truncated",
            Self::BadMagic { .. } => "bad_magic",
            Self::UnsupportedVersion { .. } => "version",
            Self::Reserved { .. } => "reserved",
            Self::Misaligned { .. } => "misaligned",
            Self::Invalid(_) => "invalid",
            Self::CountMismatch { .. } => "count",
            Self::MixedWorkers { .. } => "mixed_workers",
            Self::TooManyToEncode { .. } => "encode_too_large",
            Self::Encode(_) => "encode",
        }
    }
}

/// Encodes one worker's events as a batch, in an aligned buffer (readable in place as is).
///
/// Fails when the events name more than one worker, when the batch would exceed
/// [`MAX_BATCH_BYTES`] (split the events), or if rkyv fails.
pub fn encode_batch(events: &[KvEvent]) -> Result<AlignedVec, CodecError> {
    encode_batch_within(events, MAX_BATCH_BYTES)
}

/// [`encode_batch`] with another size bound (`max <= u32::MAX`): a request-plane recovery
/// chunk carries its events in this same encoding, bounded by the frame size instead.
pub fn encode_batch_within(events: &[KvEvent], max: usize) -> Result<AlignedVec, CodecError> {
    debug_assert!(max <= u32::MAX as usize);
    if let Some(first) = events.first() {
        if let Some(other) = events.iter().find(|e| e.worker != first.worker) {
            return Err(CodecError::MixedWorkers { first: first.worker, other: other.worker });
        }
    }
    let mut out = AlignedVec::<16>::new();
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&[FORMAT_VERSION, 0, 0, 0]);
    out.extend_from_slice(&[0; 8]); // body length and event count, filled in below
    let mut out =
        rkyv::api::high::to_bytes_in::<_, rkyv::rancor::Error>(&EventSlice(events), out).map_err(CodecError::Encode)?;
    let len = out.len();
    if len > max {
        return Err(CodecError::TooManyToEncode { len, max });
    }
    // Both fit in u32: `len <= max <= u32::MAX`.
    let body_len = (len - HEADER_LEN) as u32;
    out[8..12].copy_from_slice(&body_len.to_le_bytes());
    out[12..16].copy_from_slice(&(events.len() as u32).to_le_bytes());
    Ok(out)
}

/// Validates a batch and returns a view of it in place (no copy, no allocation).
///
/// `bytes` must start at a multiple of [`ARCHIVE_ALIGN`] or this fails with
/// [`CodecError::Misaligned`]; wrap received bytes in [`AlignedPayload`] to guarantee it.
pub fn access_batch(bytes: &[u8]) -> Result<&ArchivedEventBatch, CodecError> {
    access_batch_within(bytes, MAX_BATCH_BYTES)
}

/// [`access_batch`] with another size bound (see [`encode_batch_within`]).
pub fn access_batch_within(bytes: &[u8], max: usize) -> Result<&ArchivedEventBatch, CodecError> {
    let (body, count) = check_header(bytes, max)?;
    let addr = bytes.as_ptr() as usize;
    if addr % ARCHIVE_ALIGN != 0 {
        return Err(CodecError::Misaligned { addr, align: ARCHIVE_ALIGN });
    }
    let batch = rkyv::access::<ArchivedEventBatch, rkyv::rancor::Error>(body).map_err(CodecError::Invalid)?;
    if batch.len() != count {
        return Err(CodecError::CountMismatch { found: batch.len(), expected: count });
    }
    if let Some(first) = batch.first() {
        if let Some(other) = batch.iter().find(|e| e.worker != first.worker) {
            return Err(CodecError::MixedWorkers {
                first: WorkerId(first.worker.0.to_native()),
                other: WorkerId(other.worker.0.to_native()),
            });
        }
    }
    Ok(batch)
}

/// Validates a batch at any alignment and converts it to owned events.
pub fn decode_batch(bytes: &[u8]) -> Result<Vec<KvEvent>, CodecError> {
    decode_batch_within(bytes, MAX_BATCH_BYTES)
}

/// [`decode_batch`] with another size bound (see [`encode_batch_within`]).
pub fn decode_batch_within(bytes: &[u8], max: usize) -> Result<Vec<KvEvent>, CodecError> {
    if bytes.len() > max {
        return Err(CodecError::TooLarge { len: bytes.len(), max });
    }
    let payload = AlignedPayload::copy_if_misaligned(bytes);
    let batch = access_batch_within(&payload, max)?;
    Ok(batch.iter().map(KvEvent::from).collect())
}

/// Checks the header; returns the body and the announced event count.
fn check_header(bytes: &[u8], max: usize) -> Result<(&[u8], usize), CodecError> {
    let len = bytes.len();
    if len > max {
        return Err(CodecError::TooLarge { len, max });
    }
    let Some((header, body)) = bytes.split_first_chunk::<HEADER_LEN>() else {
        return Err(CodecError::Truncated { len, expected: HEADER_LEN });
    };
    let field = |at: usize| u32::from_le_bytes([header[at], header[at + 1], header[at + 2], header[at + 3]]);
    let magic = [header[0], header[1], header[2], header[3]];
    if magic != MAGIC {
        return Err(CodecError::BadMagic { found: magic });
    }
    if header[4] != FORMAT_VERSION {
        return Err(CodecError::UnsupportedVersion { found: header[4], supported: FORMAT_VERSION });
    }
    let reserved = [header[5], header[6], header[7]];
    if reserved != [0; 3] {
        return Err(CodecError::Reserved { found: reserved });
    }
    let expected = HEADER_LEN + field(8) as usize;
    if len != expected {
        return Err(CodecError::Truncated { len, expected });
    }
    Ok((body, field(12) as usize))
}

/// Received bytes at an address fit for [`access_batch`]: borrowed when already aligned,
/// otherwise copied once into an aligned buffer.
pub enum AlignedPayload<'a> {
    Borrowed(&'a [u8]),
    Copied(AlignedVec),
}

impl<'a> AlignedPayload<'a> {
    /// Borrows `bytes` if they start at a multiple of [`ARCHIVE_ALIGN`] (or exceed
    /// [`MAX_BATCH_BYTES`], which access refuses anyway); copies them otherwise.
    pub fn new(bytes: &'a [u8]) -> Self {
        if bytes.len() > MAX_BATCH_BYTES {
            return Self::Borrowed(bytes);
        }
        Self::copy_if_misaligned(bytes)
    }

    /// Borrows `bytes` if aligned, else copies them whatever their size (the caller bounds it).
    pub fn copy_if_misaligned(bytes: &'a [u8]) -> Self {
        if (bytes.as_ptr() as usize) % ARCHIVE_ALIGN == 0 {
            return Self::Borrowed(bytes);
        }
        let mut copy = AlignedVec::with_capacity(bytes.len());
        copy.extend_from_slice(bytes);
        Self::Copied(copy)
    }

    /// Whether [`AlignedPayload::new`] had to copy.
    pub fn is_copied(&self) -> bool {
        matches!(self, Self::Copied(_))
    }

    /// [`access_batch`] on these bytes.
    pub fn access(&self) -> Result<&ArchivedEventBatch, CodecError> {
        access_batch(self)
    }
}

impl Deref for AlignedPayload<'_> {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        match self {
            Self::Borrowed(b) => b,
            Self::Copied(v) => v,
        }
    }
}

impl From<&ArchivedKvEvent> for KvEvent {
    fn from(a: &ArchivedKvEvent) -> Self {
        KvEvent {
            worker: WorkerId(a.worker.0.to_native()),
            event_id: a.event_id.to_native(),
            timestamp_us: a.timestamp_us.to_native(),
            kind: KvEventKind::from(&a.kind),
        }
    }
}

impl From<&ArchivedKvEventKind> for KvEventKind {
    fn from(a: &ArchivedKvEventKind) -> Self {
        match a {
            ArchivedKvEventKind::Stored { parent, blocks } => KvEventKind::Stored {
                parent: parent.as_ref().map(|p| SeqHash(p.0.to_native())),
                blocks: blocks
                    .iter()
                    .map(|b| StoredBlock {
                        seq_hash: SeqHash(b.seq_hash.0.to_native()),
                        engine_hash: EngineHash(b.engine_hash.0.to_native()),
                    })
                    .collect(),
            },
            ArchivedKvEventKind::Removed { engine_hashes } => KvEventKind::Removed {
                engine_hashes: engine_hashes.iter().map(|h| EngineHash(h.0.to_native())).collect(),
            },
            ArchivedKvEventKind::Cleared => KvEventKind::Cleared,
        }
    }
}

/// Serializes a borrowed slice of events exactly as rkyv serializes a `Vec<KvEvent>`, without
/// cloning it into one.
struct EventSlice<'a>(&'a [KvEvent]);

impl Archive for EventSlice<'_> {
    type Archived = ArchivedEventBatch;
    type Resolver = VecResolver;

    fn resolve(&self, resolver: VecResolver, out: Place<ArchivedEventBatch>) {
        ArchivedVec::resolve_from_slice(self.0, resolver, out);
    }
}

impl<S: Fallible + Allocator + Writer + ?Sized> Serialize<S> for EventSlice<'_>
where
    KvEvent: Serialize<S>,
{
    fn serialize(&self, serializer: &mut S) -> Result<VecResolver, S::Error> {
        ArchivedVec::serialize_from_slice(self.0, serializer)
    }
}

/// First four bytes of every load message ([`encode_load`]).
pub const LOAD_MAGIC: [u8; 4] = *b"KVLR";
/// Bytes before a load message's archive: magic, [`FORMAT_VERSION`], three zero bytes.
const LOAD_HEADER_LEN: usize = 8;
/// The largest load message accepted: a few dozen bytes are sent; anything larger is not one.
pub const MAX_LOAD_BYTES: usize = 512;

const _: () = assert!(LOAD_HEADER_LEN % ARCHIVE_ALIGN == 0);

/// One worker's load as it goes on the load plane ([`crate::planes::load`]): the engine's
/// report, the worker's sequence number (from 1, one per message, so a frontend can drop a
/// reordered older one) and the worker's wall clock when it was sampled (for logs only: clocks
/// of different machines are not compared).
#[derive(Debug, Clone, Copy, PartialEq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct LoadMessage {
    pub worker: WorkerId,
    pub seq: u64,
    pub issued_at_us: u64,
    pub report: crate::contract::LoadReport,
}

/// Encodes one load message: [`LOAD_MAGIC`], the format version, three zero bytes, then an rkyv
/// archive of [`LoadMessage`] (bytecheck-validated on read).
pub fn encode_load(msg: &LoadMessage) -> Result<AlignedVec, CodecError> {
    let mut out = AlignedVec::<16>::new();
    out.extend_from_slice(&LOAD_MAGIC);
    out.extend_from_slice(&[FORMAT_VERSION, 0, 0, 0]);
    rkyv::api::high::to_bytes_in::<_, rkyv::rancor::Error>(msg, out).map_err(CodecError::Encode)
}

/// Validates a load message at any alignment (it is copied: it is tiny) and returns it owned.
/// Untrusted bytes never panic; every refusal is a [`CodecError`].
pub fn decode_load(bytes: &[u8]) -> Result<LoadMessage, CodecError> {
    let len = bytes.len();
    if len > MAX_LOAD_BYTES {
        return Err(CodecError::TooLarge { len, max: MAX_LOAD_BYTES });
    }
    let Some((header, body)) = bytes.split_first_chunk::<LOAD_HEADER_LEN>() else {
        return Err(CodecError::Truncated { len, expected: LOAD_HEADER_LEN });
    };
    let magic = [header[0], header[1], header[2], header[3]];
    if magic != LOAD_MAGIC {
        return Err(CodecError::BadMagic { found: magic });
    }
    if header[4] != FORMAT_VERSION {
        return Err(CodecError::UnsupportedVersion { found: header[4], supported: FORMAT_VERSION });
    }
    if header[5..8] != [0, 0, 0] {
        return Err(CodecError::Reserved { found: [header[5], header[6], header[7]] });
    }
    let mut aligned = AlignedVec::<16>::with_capacity(body.len());
    aligned.extend_from_slice(body);
    let archived = rkyv::access::<ArchivedLoadMessage, rkyv::rancor::Error>(&aligned).map_err(CodecError::Invalid)?;
    rkyv::deserialize::<LoadMessage, rkyv::rancor::Error>(archived).map_err(CodecError::Invalid)
}

#[cfg(test)]
mod load_tests {
    use super::*;
    use crate::contract::LoadReport;

    #[test]
    fn load_messages_round_trip_and_garbage_is_refused() {
        let report = LoadReport {
            active_blocks: 7,
            total_blocks: 100,
            running_requests: 2,
            blocks_known: true,
            ..LoadReport::default()
        };
        let msg = LoadMessage { worker: WorkerId(9), seq: 3, issued_at_us: 12, report };
        let bytes = encode_load(&msg).unwrap();
        assert!(bytes.len() <= MAX_LOAD_BYTES);
        assert_eq!(decode_load(&bytes).unwrap(), msg);
        // At an odd offset too.
        let mut shifted = vec![0u8];
        shifted.extend_from_slice(&bytes);
        assert_eq!(decode_load(&shifted[1..]).unwrap(), msg);
        assert!(matches!(decode_load(b"KVLR"), Err(CodecError::Truncated { .. })));
        assert!(matches!(decode_load(&encode_batch(&[]).unwrap()), Err(CodecError::BadMagic { .. })));
        let mut bad = bytes.to_vec();
        bad.truncate(bad.len() - 3);
        assert!(decode_load(&bad).is_err());
        assert!(decode_load(&vec![0u8; MAX_LOAD_BYTES + 1]).is_err());
    }
}

#[cfg(test)]
mod tests {
    use rand::rngs::SmallRng;
    use rand::{Rng, SeedableRng};

    use super::*;

    fn event(id: u64, kind: KvEventKind) -> KvEvent {
        KvEvent { worker: WorkerId(0xabc), event_id: id, timestamp_us: 1_700_000_000_000_000u64.wrapping_add(id), kind }
    }

    fn stored(parent: Option<u64>, n: u64) -> KvEventKind {
        KvEventKind::Stored {
            parent: parent.map(SeqHash),
            blocks: (0..n)
                .map(|i| StoredBlock { seq_hash: SeqHash(i * 31 + 7), engine_hash: EngineHash(!i) })
                .collect(),
        }
    }

    /// Every variant, with empty and non-empty vectors, both `parent` cases, extreme values.
    fn all_variants() -> Vec<KvEvent> {
        vec![
            event(1, stored(None, 3)),
            event(2, stored(Some(u64::MAX), 1)),
            event(3, stored(Some(0), 0)),
            event(4, KvEventKind::Removed { engine_hashes: vec![EngineHash(0), EngineHash(u64::MAX)] }),
            event(5, KvEventKind::Removed { engine_hashes: vec![] }),
            event(6, KvEventKind::Cleared),
            event(u64::MAX, stored(None, 16)),
        ]
    }

    /// Seed inputs for the `kv_event_decode` fuzz target.
    fn seed_batches() -> Vec<Vec<KvEvent>> {
        vec![
            vec![],
            all_variants(),
            vec![event(1, KvEventKind::Cleared)],
            vec![event(1, stored(None, 1))],
            vec![event(9, KvEventKind::Removed { engine_hashes: vec![EngineHash(5)] })],
        ]
    }

    #[test]
    fn round_trips_every_variant() {
        for batch in seed_batches() {
            let bytes = encode_batch(&batch).unwrap();
            assert_eq!(bytes.as_ptr() as usize % ARCHIVE_ALIGN, 0);
            assert_eq!(decode_batch(&bytes).unwrap(), batch);
            // The hand-written conversion agrees with rkyv's own deserializer.
            let archived = access_batch(&bytes).unwrap();
            let by_rkyv: Vec<KvEvent> = rkyv::deserialize::<_, rkyv::rancor::Error>(archived).unwrap();
            assert_eq!(by_rkyv, batch);
        }
    }

    #[test]
    fn misaligned_bytes_decode_copied_only_if_needed() {
        let bytes = encode_batch(&all_variants()).unwrap();
        let mut shifted = AlignedVec::<16>::new();
        shifted.extend_from_slice(&[0]);
        shifted.extend_from_slice(&bytes);
        let at_odd = &shifted[1..];
        let payload = AlignedPayload::new(at_odd);
        if ARCHIVE_ALIGN > 1 {
            assert!(matches!(access_batch(at_odd), Err(CodecError::Misaligned { align: ARCHIVE_ALIGN, .. })));
            assert!(payload.is_copied());
        } else {
            assert!(!payload.is_copied());
        }
        assert_eq!(payload.access().unwrap().len(), all_variants().len());
        assert!(!AlignedPayload::new(&bytes).is_copied());
        assert_eq!(decode_batch(at_odd).unwrap(), all_variants());
    }

    /// Pins the bytes of one batch: rkyv's layout depends on its format features (`unaligned`,
    /// `big_endian`, `pointer_width_*`) and on the event types. If this fails, the wire format
    /// changed: bump `FORMAT_VERSION` (once anything is deployed) and update the constants.
    #[test]
    fn wire_format_is_pinned() {
        let bytes = encode_batch(&all_variants()).unwrap();
        let digest = xxhash_rust::xxh3::xxh3_64(&bytes);
        assert_eq!((bytes.len(), digest), (GOLDEN_LEN, GOLDEN_XXH3), "wire format changed: {:#x}", digest);
    }
    const GOLDEN_LEN: usize = 752;
    const GOLDEN_XXH3: u64 = 0x8adf_f84a_b622_f062;

    #[test]
    fn every_truncation_is_refused() {
        let bytes = encode_batch(&all_variants()).unwrap();
        for len in 0..bytes.len() {
            let err = access_batch(&bytes[..len]).unwrap_err();
            assert!(matches!(err, CodecError::Truncated { .. }), "length {len}: {err}");
            assert!(decode_batch(&bytes[..len]).is_err());
        }
    }

    #[test]
    fn bad_header_is_refused_with_a_clear_error() {
        let good = encode_batch(&all_variants()).unwrap();
        let with = |at: usize, byte: u8| {
            let mut b = good.clone();
            b[at] = byte;
            b
        };
        let err = access_batch(&with(0, b'X')).unwrap_err();
        assert!(matches!(err, CodecError::BadMagic { .. }), "{err}");
        let err = access_batch(&with(4, FORMAT_VERSION + 1)).unwrap_err();
        assert!(matches!(err, CodecError::UnsupportedVersion { found, .. } if found == FORMAT_VERSION + 1));
        assert!(err.to_string().contains("upgrade"), "{err}");
        assert!(matches!(access_batch(&with(6, 1)), Err(CodecError::Reserved { .. })));
        assert!(matches!(access_batch(&with(12, 0)), Err(CodecError::CountMismatch { .. })));
        assert!(matches!(access_batch(b"not an event batch at all"), Err(CodecError::BadMagic { .. })));
    }

    #[test]
    fn oversized_input_is_refused_before_reading() {
        let mut big = AlignedVec::<16>::new();
        big.resize(MAX_BATCH_BYTES + 2, 0);
        assert!(matches!(access_batch(&big), Err(CodecError::TooLarge { .. })));
        // Misaligned but oversized: refused without being copied first.
        let payload = AlignedPayload::new(&big[1..]);
        assert!(!payload.is_copied());
        assert!(matches!(payload.access(), Err(CodecError::TooLarge { .. })));
        let many = vec![event(1, stored(None, (MAX_BATCH_BYTES / 16) as u64))];
        assert!(matches!(encode_batch(&many), Err(CodecError::TooManyToEncode { .. })));
    }

    #[test]
    fn mixed_workers_are_refused_both_ways() {
        let mut batch = all_variants();
        batch[3].worker = WorkerId(7);
        assert!(matches!(encode_batch(&batch), Err(CodecError::MixedWorkers { .. })));
        // A forged batch: encode two one-worker batches' worth by patching the archived worker.
        let mut bytes = encode_batch(&all_variants()).unwrap();
        let id = 0xabcu64.to_le_bytes();
        let at = (HEADER_LEN..bytes.len() - 8).rev().find(|&i| bytes[i..i + 8] == id).unwrap();
        bytes[at] = 0xcd;
        assert!(matches!(access_batch(&bytes), Err(CodecError::MixedWorkers { .. })));
    }

    /// Random single and multiple byte flips: never a panic; whatever is accepted is a
    /// well-formed batch that re-encodes to itself.
    #[test]
    fn random_flips_never_panic() {
        let good = encode_batch(&all_variants()).unwrap();
        let mut rng = SmallRng::seed_from_u64(0x6b76_6761_7465);
        let (mut refused, mut accepted) = (0, 0);
        for round in 0..20_000 {
            let mut b = good.clone();
            for _ in 0..1 + round % 4 {
                let at = rng.random_range(0..b.len());
                b[at] ^= 1 << rng.random_range(0..8);
            }
            match decode_batch(&b) {
                Err(_) => refused += 1,
                Ok(events) => {
                    accepted += 1;
                    assert_eq!(decode_batch(&encode_batch(&events).unwrap()).unwrap(), events);
                }
            }
        }
        assert!(refused > 0 && accepted > 0, "refused {refused}, accepted {accepted}");
    }

    #[test]
    fn header_flips_are_always_refused() {
        let good = encode_batch(&all_variants()).unwrap();
        for at in 0..HEADER_LEN {
            for bit in 0..8 {
                let mut b = good.clone();
                b[at] ^= 1 << bit;
                assert!(access_batch(&b).is_err(), "flip of bit {bit} of byte {at} accepted");
            }
        }
    }

    /// Writes the fuzz seed corpus: `cargo test --lib contract::codec -- --ignored write_fuzz_seeds`.
    #[test]
    #[ignore = "writes fuzz/corpus/kv_event_decode/"]
    fn write_fuzz_seeds() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/fuzz/corpus/kv_event_decode");
        std::fs::create_dir_all(dir).unwrap();
        for (i, batch) in seed_batches().iter().enumerate() {
            let bytes = encode_batch(batch).unwrap();
            std::fs::write(format!("{dir}/seed-{i}"), &bytes[..]).unwrap();
        }
    }
}
