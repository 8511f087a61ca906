//! A bounds-checked msgpack cursor: the primitives [`super::decode`] reads engine batches with.
//!
//! Every read checks bounds and returns `Err` past the end; lengths taken from the input never
//! size an allocation beyond what the remaining input can back ([`Reader::capacity`]); skipping
//! a value walks it with a counter instead of recursion, so nesting depth costs nothing.
//! Integers are read in any msgpack width. Pure; no state beyond the position.

use super::decode::DecodeError;

type Result<T> = std::result::Result<T, DecodeError>;

pub(super) fn is_array(m: u8) -> bool {
    matches!(m, 0x90..=0x9f | 0xdc | 0xdd)
}

pub(super) fn is_map(m: u8) -> bool {
    matches!(m, 0x80..=0x8f | 0xde | 0xdf)
}

/// A cursor over one payload.
pub(super) struct Reader<'a> {
    buf: &'a [u8],
    pub(super) pos: usize,
}

impl<'a> Reader<'a> {
    pub(super) fn new(buf: &'a [u8]) -> Self {
        Self { buf, pos: 0 }
    }

    pub(super) fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    pub(super) fn peek(&self) -> Result<u8> {
        self.buf.get(self.pos).copied().ok_or(DecodeError::Truncated { at: self.pos })
    }

    #[inline]
    pub(super) fn byte(&mut self) -> Result<u8> {
        let b = self.peek()?;
        self.pos += 1;
        Ok(b)
    }

    #[inline]
    pub(super) fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.buf.len());
        let end = end.ok_or(DecodeError::Truncated { at: self.pos })?;
        let s = &self.buf[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    #[inline]
    pub(super) fn be<const N: usize>(&mut self) -> Result<[u8; N]> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N)?);
        Ok(out)
    }

    pub(super) fn u8_len(&mut self) -> Result<usize> {
        Ok(self.byte()? as usize)
    }

    pub(super) fn u16_len(&mut self) -> Result<usize> {
        Ok(u16::from_be_bytes(self.be()?) as usize)
    }

    pub(super) fn u32_len(&mut self) -> Result<usize> {
        Ok(u32::from_be_bytes(self.be()?) as usize)
    }

    /// Consumes `nil` if it is next.
    pub(super) fn nil(&mut self) -> Result<bool> {
        let is_nil = self.peek()? == 0xc0;
        self.pos += is_nil as usize;
        Ok(is_nil)
    }

    pub(super) fn array_len(&mut self, what: &'static str) -> Result<u32> {
        let at = self.pos;
        match self.byte()? {
            m @ 0x90..=0x9f => Ok((m & 0x0f) as u32),
            0xdc => Ok(self.u16_len()? as u32),
            0xdd => Ok(u32::from_be_bytes(self.be()?)),
            marker => Err(DecodeError::Type { what, marker, at }),
        }
    }

    pub(super) fn map_len(&mut self, what: &'static str) -> Result<u32> {
        let at = self.pos;
        match self.byte()? {
            m @ 0x80..=0x8f => Ok((m & 0x0f) as u32),
            0xde => Ok(self.u16_len()? as u32),
            0xdf => Ok(u32::from_be_bytes(self.be()?)),
            marker => Err(DecodeError::Type { what, marker, at }),
        }
    }

    /// A capacity for `n` elements of at least `min_bytes` each that the input can back.
    pub(super) fn capacity(&self, n: u32, min_bytes: usize) -> usize {
        (n as usize).min(self.remaining() / min_bytes)
    }

    /// A msgpack str's bytes (not checked for UTF-8: tags and keys are compared as bytes).
    pub(super) fn str(&mut self, what: &'static str) -> Result<&'a [u8]> {
        let at = self.pos;
        let len = match self.byte()? {
            m @ 0xa0..=0xbf => (m & 0x1f) as usize,
            0xd9 => self.u8_len()?,
            0xda => self.u16_len()?,
            0xdb => self.u32_len()?,
            marker => return Err(DecodeError::Type { what, marker, at }),
        };
        self.take(len)
    }

    pub(super) fn opt_string(&mut self, what: &'static str) -> Result<Option<String>> {
        if self.nil()? {
            return Ok(None);
        }
        let at = self.pos;
        let bytes = self.str(what)?;
        let s = std::str::from_utf8(bytes).map_err(|source| DecodeError::Utf8 { what, at, source })?;
        Ok(Some(s.to_owned()))
    }

    /// Any msgpack integer as (negative?, two's-complement bits).
    #[inline]
    pub(super) fn int(&mut self, what: &'static str) -> Result<(bool, u64)> {
        let at = self.pos;
        let m = self.byte()?;
        let signed = |v: i64| (v < 0, v as u64);
        Ok(match m {
            0x00..=0x7f => (false, m as u64),
            0xe0..=0xff => (true, m as i8 as i64 as u64),
            0xcc => (false, self.byte()? as u64),
            0xcd => (false, u16::from_be_bytes(self.be()?) as u64),
            0xce => (false, u32::from_be_bytes(self.be()?) as u64),
            0xcf => (false, u64::from_be_bytes(self.be()?)),
            0xd0 => signed(self.byte()? as i8 as i64),
            0xd1 => signed(i16::from_be_bytes(self.be()?) as i64),
            0xd2 => signed(i32::from_be_bytes(self.be()?) as i64),
            0xd3 => signed(i64::from_be_bytes(self.be()?)),
            marker => return Err(DecodeError::Type { what, marker, at }),
        })
    }

    #[inline]
    pub(super) fn u32(&mut self, what: &'static str) -> Result<u32> {
        let at = self.pos;
        match self.int(what)? {
            (false, v) if v <= u32::MAX as u64 => Ok(v as u32),
            _ => Err(DecodeError::Range { what, at }),
        }
    }

    pub(super) fn opt_u32(&mut self, what: &'static str) -> Result<Option<u32>> {
        if self.nil()? {
            return Ok(None);
        }
        self.u32(what).map(Some)
    }

    pub(super) fn skip(&mut self) -> Result<()> {
        self.skip_n(1)
    }

    /// Skips `count` whole values without recursion: nested containers add their element count
    /// to the work left. Every value takes at least one byte, so more work than bytes left is
    /// truncation, found before looping.
    pub(super) fn skip_n(&mut self, count: u64) -> Result<()> {
        let mut left = count;
        while left > 0 {
            if left > self.remaining() as u64 {
                return Err(DecodeError::Truncated { at: self.buf.len() });
            }
            left -= 1;
            let at = self.pos;
            let m = self.byte()?;
            let (skip_bytes, nested) = match m {
                0x00..=0x7f | 0xe0..=0xff | 0xc0 | 0xc2 | 0xc3 => (0, 0),
                0x80..=0x8f => (0, 2 * (m & 0x0f) as u64),
                0x90..=0x9f => (0, (m & 0x0f) as u64),
                0xa0..=0xbf => ((m & 0x1f) as usize, 0),
                0xc4 | 0xd9 => (self.u8_len()?, 0),
                0xc5 | 0xda => (self.u16_len()?, 0),
                0xc6 | 0xdb => (self.u32_len()?, 0),
                0xc7 => (self.u8_len()? + 1, 0),
                0xc8 => (self.u16_len()? + 1, 0),
                0xc9 => (self.u32_len()?.saturating_add(1), 0),
                0xcc | 0xd0 => (1, 0),
                0xcd | 0xd1 => (2, 0),
                0xca | 0xce | 0xd2 => (4, 0),
                0xcb | 0xcf | 0xd3 => (8, 0),
                0xd4 => (2, 0),
                0xd5 => (3, 0),
                0xd6 => (5, 0),
                0xd7 => (9, 0),
                0xd8 => (17, 0),
                0xdc => (0, self.u16_len()? as u64),
                0xdd => (0, self.u32_len()? as u64),
                0xde => (0, 2 * self.u16_len()? as u64),
                0xdf => (0, 2 * self.u32_len()? as u64),
                marker => return Err(DecodeError::Type { what: "value", marker, at }),
            };
            self.take(skip_bytes)?;
            left += nested;
        }
        Ok(())
    }
}
