//! The transfer wire format (one transfer at a time per TCP connection; all integers
//! little-endian):
//!
//! ```text
//! header, 40 bytes
//!   0..4    magic b"KVTX"
//!   4..6    version u16 (= 1)
//!   6..8    flags u16: bit 0 = first_token present; other bits must be 0
//!   8..16   room u64
//!   16..24  request_id u64
//!   24..28  num_blocks u32
//!   28..32  first_token u32 (0 when absent)
//!   32..40  bytes_per_block u64
//! payload   num_blocks × bytes_per_block bytes
//! trailer   room u64 again (catches framing errors)
//! status    receiver → sender, once every byte has landed:
//!             0 = accepted (the connection stays open for the next transfer), or
//!             non-zero = refused, then reason length u16 and that many bytes of UTF-8; the
//!             receiver then closes. A refusal may come right after the header (a bad or
//!             unacceptable header), while the sender is still writing the payload.
//! ```
//!
//! Invariant: [`decode_header`] never panics and accepts exactly what [`encode_header`]
//! writes; a wrong trailer is not answered (the receiver closes and logs).

use super::TransferHeader;

pub const MAGIC: [u8; 4] = *b"KVTX";
pub const VERSION: u16 = 1;
pub const HEADER_LEN: usize = 40;
pub const TRAILER_LEN: usize = 8;
const FLAG_FIRST_TOKEN: u16 = 1;

/// Status byte of an accepted transfer.
pub const STATUS_OK: u8 = 0;
/// Status byte of a refused transfer (followed by the reason).
pub const STATUS_REFUSED: u8 = 1;
/// Longest refusal reason sent (longer ones are cut at a character boundary).
pub const MAX_REASON_LEN: usize = 1024;

pub fn encode_header(h: &TransferHeader) -> [u8; HEADER_LEN] {
    let mut b = [0u8; HEADER_LEN];
    b[0..4].copy_from_slice(&MAGIC);
    b[4..6].copy_from_slice(&VERSION.to_le_bytes());
    let flags = if h.first_token.is_some() { FLAG_FIRST_TOKEN } else { 0 };
    b[6..8].copy_from_slice(&flags.to_le_bytes());
    b[8..16].copy_from_slice(&h.room.to_le_bytes());
    b[16..24].copy_from_slice(&h.request_id.to_le_bytes());
    b[24..28].copy_from_slice(&h.num_blocks.to_le_bytes());
    b[28..32].copy_from_slice(&h.first_token.unwrap_or(0).to_le_bytes());
    b[32..40].copy_from_slice(&h.bytes_per_block.to_le_bytes());
    b
}

/// Why a header was rejected (sent back as the refusal reason).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HeaderError {
    BadMagic([u8; 4]),
    BadVersion(u16),
    BadFlags(u16),
}

impl std::fmt::Display for HeaderError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::BadMagic(m) => write!(f, "not a KV transfer (magic {m:02x?})"),
            Self::BadVersion(v) => write!(f, "unsupported transfer version {v} (this receiver speaks {VERSION})"),
            Self::BadFlags(x) => write!(f, "unknown header flags {x:#06x}"),
        }
    }
}

fn u16_at(b: &[u8; HEADER_LEN], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

fn u32_at(b: &[u8; HEADER_LEN], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn u64_at(b: &[u8; HEADER_LEN], at: usize) -> u64 {
    let mut w = [0u8; 8];
    w.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(w)
}

pub fn decode_header(b: &[u8; HEADER_LEN]) -> Result<TransferHeader, HeaderError> {
    let magic = [b[0], b[1], b[2], b[3]];
    if magic != MAGIC {
        return Err(HeaderError::BadMagic(magic));
    }
    let version = u16_at(b, 4);
    if version != VERSION {
        return Err(HeaderError::BadVersion(version));
    }
    let flags = u16_at(b, 6);
    if flags & !FLAG_FIRST_TOKEN != 0 {
        return Err(HeaderError::BadFlags(flags));
    }
    Ok(TransferHeader {
        room: u64_at(b, 8),
        request_id: u64_at(b, 16),
        num_blocks: u32_at(b, 24),
        first_token: (flags & FLAG_FIRST_TOKEN != 0).then(|| u32_at(b, 28)),
        bytes_per_block: u64_at(b, 32),
    })
}

/// A refusal: status byte, reason length, reason (cut to [`MAX_REASON_LEN`] bytes).
pub fn encode_refusal(reason: &str) -> Vec<u8> {
    let mut cut = reason.len().min(MAX_REASON_LEN);
    while !reason.is_char_boundary(cut) {
        cut -= 1;
    }
    let mut out = Vec::with_capacity(3 + cut);
    out.push(STATUS_REFUSED);
    out.extend_from_slice(&(cut as u16).to_le_bytes());
    out.extend_from_slice(&reason.as_bytes()[..cut]);
    out
}
