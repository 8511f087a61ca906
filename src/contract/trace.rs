//! W3C Trace Context (<https://www.w3.org/TR/trace-context/>): the `traceparent` and
//! `tracestate` headers, and the [`TraceContext`] a request carries from the frontend to its
//! workers and on to their engines.
//!
//! Invariant: [`TraceContext::parse`] accepts exactly the version-00 form (and, as the spec
//! asks, a higher version's first 55 characters followed by `-` or nothing), with a trace id and
//! a parent id that are not all zeros; anything else is `None`, so a bad header starts a new
//! trace and is never an error. [`TraceContext::traceparent`] writes what `parse` reads back
//! equal. Concurrency: plain values.

use serde::{Deserialize, Serialize};

/// The longest `tracestate` kept: the spec's 32 members of at most 256 bytes each, with commas.
pub const MAX_TRACESTATE_BYTES: usize = 32 * 257;

/// One position in a distributed trace: the trace, the span that is the parent of what comes
/// next, the trace flags (bit 0: sampled), and the vendors' `tracestate`, passed on unchanged.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TraceContext {
    pub trace_id: [u8; 16],
    pub span_id: [u8; 8],
    pub flags: u8,
    pub state: Option<String>,
}

impl TraceContext {
    /// Parses a `traceparent` header value, and keeps `tracestate` with it when it is of a sane
    /// size and plain visible ASCII. `None` for anything invalid (see the module doc).
    pub fn parse(traceparent: &str, tracestate: Option<&str>) -> Option<Self> {
        let s = traceparent.trim_matches([' ', '\t']);
        let b = s.as_bytes();
        if b.len() < 55 {
            return None;
        }
        let version = hex_byte(&b[0..2])?;
        if version == 0xff || b[2] != b'-' || b[35] != b'-' || b[52] != b'-' {
            return None;
        }
        // Version 00 is exactly 55 characters; a later version may append `-...`.
        if (version == 0 && b.len() != 55) || (version > 0 && b.len() > 55 && b[55] != b'-') {
            return None;
        }
        let mut trace_id = [0u8; 16];
        for (i, out) in trace_id.iter_mut().enumerate() {
            *out = hex_byte(&b[3 + 2 * i..5 + 2 * i])?;
        }
        let mut span_id = [0u8; 8];
        for (i, out) in span_id.iter_mut().enumerate() {
            *out = hex_byte(&b[36 + 2 * i..38 + 2 * i])?;
        }
        let flags = hex_byte(&b[53..55])?;
        if trace_id == [0; 16] || span_id == [0; 8] {
            return None;
        }
        let state = tracestate
            .map(|t| t.trim_matches([' ', '\t']))
            .filter(|t| {
                !t.is_empty() && t.len() <= MAX_TRACESTATE_BYTES && t.bytes().all(|c| (0x20..0x7f).contains(&c))
            })
            .map(str::to_owned);
        Some(Self { trace_id, span_id, flags, state })
    }

    /// The `traceparent` header value (version 00).
    pub fn traceparent(&self) -> String {
        let mut s = String::with_capacity(55);
        s.push_str("00-");
        push_hex(&mut s, &self.trace_id);
        s.push('-');
        push_hex(&mut s, &self.span_id);
        s.push('-');
        push_hex(&mut s, &[self.flags]);
        s
    }

    /// The trace id as 32 lowercase hex digits (as trace viewers show it).
    pub fn trace_id_hex(&self) -> String {
        let mut s = String::with_capacity(32);
        push_hex(&mut s, &self.trace_id);
        s
    }

    /// Bit 0 of the flags: the caller records this trace.
    pub fn sampled(&self) -> bool {
        self.flags & 1 == 1
    }
}

/// Two lowercase hex digits (the spec allows no uppercase).
fn hex_byte(two: &[u8]) -> Option<u8> {
    let digit = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    };
    Some(digit(two[0])? << 4 | digit(two[1])?)
}

fn push_hex(s: &mut String, bytes: &[u8]) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    for b in bytes {
        s.push(HEX[(b >> 4) as usize] as char);
        s.push(HEX[(b & 15) as usize] as char);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn the_specs_example_parses_and_formats_back() {
        let t = TraceContext::parse(GOOD, Some("congo=t61rcWkgMzE")).unwrap();
        assert_eq!(t.trace_id_hex(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(t.span_id, [0x00, 0xf0, 0x67, 0xaa, 0x0b, 0xa9, 0x02, 0xb7]);
        assert!(t.sampled());
        assert_eq!(t.state.as_deref(), Some("congo=t61rcWkgMzE"));
        assert_eq!(t.traceparent(), GOOD);
        let unsampled = TraceContext::parse(&GOOD.replace("-01", "-00"), None).unwrap();
        assert!(!unsampled.sampled());
        assert_eq!(unsampled.state, None);
    }

    #[test]
    fn invalid_headers_are_none() {
        let bad = [
            "",
            "00",
            "garbage",
            // uppercase hex
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            // all-zero trace id, all-zero parent id
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            // version ff is forbidden
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            // version 00 with trailing data
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            // wrong separators, short fields, non-hex
            "00_4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473-600f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0g",
            "zz-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        ];
        for b in bad {
            assert_eq!(TraceContext::parse(b, None), None, "{b:?}");
        }
    }

    #[test]
    fn a_later_version_is_read_as_version_00() {
        let v = "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-whatever";
        let t = TraceContext::parse(v, None).unwrap();
        assert_eq!(t.traceparent(), GOOD);
        assert!(TraceContext::parse("01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01x", None).is_none());
    }

    #[test]
    fn a_tracestate_out_of_bounds_is_dropped_not_the_trace() {
        let huge = "a=".to_string() + &"b".repeat(MAX_TRACESTATE_BYTES);
        assert_eq!(TraceContext::parse(GOOD, Some(&huge)).unwrap().state, None);
        assert_eq!(TraceContext::parse(GOOD, Some("a=\u{7f}")).unwrap().state, None);
        assert_eq!(TraceContext::parse(GOOD, Some("  ")).unwrap().state, None);
    }
}
