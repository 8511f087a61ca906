//! One tool call's JSON object, `{"name": …, "arguments": …}`, scanned as it streams.
//!
//! When the object opens with its name (as Hermes, Llama 3 and Mistral models write it), the
//! call starts as soon as the name is complete and its arguments stream byte for byte as the
//! model writes them; they are checked to be JSON once complete. An object in another shape
//! (arguments first, other keys) is held whole and parsed at its end. Text that is not such an
//! object is handed back as it was written ([`Step::Broken`]), never dropped.
//!
//! Bounds: the header is re-matched on each delta only while it is at most
//! [`MAX_HEADER_BYTES`] long; the raw text kept is the call's own.

use serde::de::IgnoredAny;
use serde_json::Value;

/// A header (`{"name": "…", "arguments": `) longer than this is not waited for: the object is
/// then held whole and parsed at its end.
pub(crate) const MAX_HEADER_BYTES: usize = 1024;

/// What one delta did to the call.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Step {
    /// The call needs more text.
    More,
    /// The object ended; `rest` is the text after it.
    Done { rest: String },
    /// Not a well-formed call: `text` is what the model wrote for it, `rest` the text from
    /// where it went wrong (to be read as plain text again).
    Broken { text: String, rest: String },
}

/// What the call tells its reader.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum CallEvent<'a> {
    Start { name: String },
    Args(&'a str),
}

#[derive(Debug)]
enum Phase {
    Header,
    /// The arguments, streamed from `emitted` on; they start at `from`.
    Args {
        from: usize,
        emitted: usize,
        value: ValueScan,
    },
    /// After the arguments, up to the object's closing brace.
    Tail(Structure),
    /// An object in another shape, parsed whole at its end; it starts at `from`.
    Whole {
        from: usize,
        scan: Structure,
    },
}

/// One call's scanner, created after the framing's opening marker.
#[derive(Debug)]
pub(crate) struct CallScanner {
    raw: String,
    /// `raw[..pos]` has been scanned.
    pos: usize,
    phase: Phase,
    started: bool,
}

impl CallScanner {
    pub(crate) fn new() -> Self {
        Self { raw: String::new(), pos: 0, phase: Phase::Header, started: false }
    }

    /// Whether the call was announced ([`CallEvent::Start`]).
    pub(crate) fn started(&self) -> bool {
        self.started
    }

    /// Feeds one delta.
    pub(crate) fn feed(&mut self, text: &str, ev: &mut impl FnMut(CallEvent<'_>)) -> Step {
        self.raw.push_str(text);
        loop {
            let bytes = self.raw.as_bytes();
            match &mut self.phase {
                Phase::Header => match match_header(&self.raw) {
                    Header::Incomplete if self.raw.len() <= MAX_HEADER_BYTES => return Step::More,
                    Header::Match { name, end } => {
                        ev(CallEvent::Start { name });
                        self.started = true;
                        self.pos = end;
                        self.phase = Phase::Args { from: end, emitted: end, value: ValueScan::default() };
                    }
                    Header::Incomplete | Header::NoMatch => {
                        let lead = self.raw.len() - self.raw.trim_start().len();
                        if !self.raw[lead..].starts_with('{') {
                            return self.broken(lead);
                        }
                        self.pos = lead;
                        self.phase = Phase::Whole { from: lead, scan: Structure::new(0) };
                    }
                },
                Phase::Args { from, emitted, value } => {
                    let (from, mut done) = (*from, false);
                    while self.pos < bytes.len() && !done {
                        match value.step(bytes[self.pos]) {
                            Scan::Continue => self.pos += 1,
                            Scan::DoneWith => {
                                self.pos += 1;
                                done = true;
                            }
                            Scan::DoneBefore => done = true,
                            Scan::Invalid => {
                                emit_args(&self.raw, emitted, self.pos, ev);
                                return self.broken(self.pos);
                            }
                        }
                    }
                    emit_args(&self.raw, emitted, self.pos, ev);
                    if !done {
                        return Step::More;
                    }
                    if serde_json::from_str::<IgnoredAny>(&self.raw[from..self.pos]).is_err() {
                        return self.broken(self.pos);
                    }
                    self.phase = Phase::Tail(Structure::new(1));
                }
                Phase::Tail(scan) => {
                    while self.pos < bytes.len() {
                        match scan.step(bytes[self.pos]) {
                            Scan::Continue => self.pos += 1,
                            Scan::DoneWith => return Step::Done { rest: self.raw[self.pos + 1..].to_string() },
                            // The object's closing brace is missing: the arguments stand.
                            Scan::DoneBefore | Scan::Invalid => {
                                return Step::Done { rest: self.raw[self.pos..].to_string() }
                            }
                        }
                    }
                    return Step::More;
                }
                Phase::Whole { from, scan } => {
                    while self.pos < bytes.len() {
                        match scan.step(bytes[self.pos]) {
                            Scan::Continue => self.pos += 1,
                            Scan::DoneWith => {
                                let end = self.pos + 1;
                                let Some((name, args)) = whole_call(&self.raw[*from..end]) else {
                                    return self.broken(end);
                                };
                                ev(CallEvent::Start { name });
                                ev(CallEvent::Args(&args));
                                self.started = true;
                                return Step::Done { rest: self.raw[end..].to_string() };
                            }
                            Scan::DoneBefore | Scan::Invalid => return self.broken(self.pos),
                        }
                    }
                    return Step::More;
                }
            }
        }
    }

    /// The output ended inside the call: complete if only a closing brace (or the end of a
    /// bare scalar argument) was missing, else broken.
    pub(crate) fn finish(&mut self, ev: &mut impl FnMut(CallEvent<'_>)) -> Step {
        match &mut self.phase {
            Phase::Args { from, emitted, value } if value.is_scalar() => {
                let from = *from;
                emit_args(&self.raw, emitted, self.raw.len(), ev);
                if serde_json::from_str::<IgnoredAny>(&self.raw[from..]).is_ok() {
                    return Step::Done { rest: String::new() };
                }
                self.broken(self.raw.len())
            }
            Phase::Tail(_) => Step::Done { rest: String::new() },
            _ => self.broken(self.raw.len()),
        }
    }

    fn broken(&mut self, at: usize) -> Step {
        let rest = self.raw.split_off(at);
        Step::Broken { text: std::mem::take(&mut self.raw), rest }
    }
}

fn emit_args(raw: &str, emitted: &mut usize, to: usize, ev: &mut impl FnMut(CallEvent<'_>)) {
    if to > *emitted {
        ev(CallEvent::Args(&raw[*emitted..to]));
        *emitted = to;
    }
}

/// A whole object in any key order: its name and its arguments as a JSON string.
fn whole_call(object: &str) -> Option<(String, String)> {
    let Value::Object(mut map) = serde_json::from_str::<Value>(object).ok()? else { return None };
    let Value::String(name) = map.remove("name")? else { return None };
    let args = match map.remove("arguments").or_else(|| map.remove("parameters")) {
        None => "{}".to_string(),
        // Some models write the arguments as a JSON string already.
        Some(Value::String(s)) if serde_json::from_str::<IgnoredAny>(&s).is_ok() => s,
        Some(v) => v.to_string(),
    };
    Some((name, args))
}

/// The header of a call as models write it: `{"name": "<name>", "arguments": ` (or
/// `"parameters"`), complete once the first byte of the arguments is there.
#[derive(Debug, PartialEq, Eq)]
enum Header {
    Incomplete,
    NoMatch,
    Match { name: String, end: usize },
}

fn match_header(s: &str) -> Header {
    let b = s.as_bytes();
    let mut i = 0;
    let ws = |i: &mut usize| {
        while *i < b.len() && is_ws(b[*i]) {
            *i += 1;
        }
    };
    // Ok(true): matched; Ok(false): ran out of text while matching; Err: no match.
    let lit = |i: &mut usize, expect: &[&[u8]]| -> Result<bool, ()> {
        let rest = &b[*i..];
        for e in expect {
            if rest.starts_with(e) {
                *i += e.len();
                return Ok(true);
            }
        }
        if expect.iter().any(|e| e.starts_with(rest)) {
            Ok(false)
        } else {
            Err(())
        }
    };
    macro_rules! expect {
        ($($lit:expr),+) => {
            match lit(&mut i, &[$($lit),+]) {
                Ok(true) => {}
                Ok(false) => return Header::Incomplete,
                Err(()) => return Header::NoMatch,
            }
        };
    }
    ws(&mut i);
    expect!(b"{");
    ws(&mut i);
    expect!(b"\"name\"");
    ws(&mut i);
    expect!(b":");
    ws(&mut i);
    let name_start = i;
    expect!(b"\"");
    let mut esc = false;
    loop {
        let Some(&c) = b.get(i) else { return Header::Incomplete };
        i += 1;
        match c {
            _ if esc => esc = false,
            b'\\' => esc = true,
            b'"' => break,
            _ => {}
        }
    }
    let Ok(name) = serde_json::from_str::<String>(&s[name_start..i]) else { return Header::NoMatch };
    ws(&mut i);
    expect!(b",");
    ws(&mut i);
    expect!(b"\"arguments\"", b"\"parameters\"");
    ws(&mut i);
    expect!(b":");
    ws(&mut i);
    if i == b.len() {
        return Header::Incomplete;
    }
    Header::Match { name, end: i }
}

fn is_ws(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | b'\r')
}

/// Bytes JSON allows outside strings (structure, numbers, `true`/`false`/`null`).
fn is_json_outside_string(b: u8) -> bool {
    is_ws(b)
        || matches!(b, b'{' | b'}' | b'[' | b']' | b',' | b':' | b'0'..=b'9' | b'-' | b'+' | b'.' | b'e' | b'E')
        || matches!(b, b't' | b'r' | b'u' | b'f' | b'a' | b'l' | b's' | b'n')
}

/// One byte's effect on a scan.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scan {
    Continue,
    /// The value ends with this byte.
    DoneWith,
    /// The value ended before this byte.
    DoneBefore,
    /// Not JSON.
    Invalid,
}

/// Strings of a JSON text: whether a byte is inside one.
#[derive(Debug, Default, Clone, Copy)]
struct Strings {
    inside: bool,
    escaped: bool,
}

impl Strings {
    /// Consumes `b` if it is inside a string or closes one; true then.
    fn eat(&mut self, b: u8) -> bool {
        if !self.inside {
            return false;
        }
        match b {
            _ if self.escaped => self.escaped = false,
            b'\\' => self.escaped = true,
            b'"' => self.inside = false,
            _ => {}
        }
        true
    }
}

/// Nesting of a JSON text, up to the close of the container it starts in.
#[derive(Debug)]
struct Structure {
    depth: u32,
    strings: Strings,
}

impl Structure {
    fn new(depth: u32) -> Self {
        Self { depth, strings: Strings::default() }
    }

    fn step(&mut self, b: u8) -> Scan {
        if self.strings.eat(b) {
            return Scan::Continue;
        }
        match b {
            b'"' => self.strings.inside = true,
            b'{' | b'[' => self.depth += 1,
            b'}' | b']' if self.depth <= 1 => return Scan::DoneWith,
            b'}' | b']' => self.depth -= 1,
            _ if is_json_outside_string(b) => {}
            _ => return Scan::Invalid,
        }
        Scan::Continue
    }
}

/// One JSON value (the arguments): where it ends.
#[derive(Debug, Default)]
struct ValueScan {
    kind: ValueKind,
    depth: u32,
    strings: Strings,
}

#[derive(Debug, Default, PartialEq, Eq)]
enum ValueKind {
    #[default]
    Unstarted,
    Container,
    Str,
    Scalar,
}

impl ValueScan {
    fn is_scalar(&self) -> bool {
        self.kind == ValueKind::Scalar
    }

    fn step(&mut self, b: u8) -> Scan {
        match self.kind {
            ValueKind::Unstarted => {
                self.kind = match b {
                    b'{' | b'[' => {
                        self.depth = 1;
                        ValueKind::Container
                    }
                    b'"' => {
                        self.strings.inside = true;
                        ValueKind::Str
                    }
                    b'-' | b'0'..=b'9' | b't' | b'f' | b'n' => ValueKind::Scalar,
                    _ => return Scan::Invalid,
                };
                Scan::Continue
            }
            ValueKind::Str => {
                self.strings.eat(b);
                if self.strings.inside {
                    Scan::Continue
                } else {
                    Scan::DoneWith
                }
            }
            ValueKind::Scalar if is_ws(b) || matches!(b, b',' | b'}' | b']') => Scan::DoneBefore,
            ValueKind::Scalar if is_json_outside_string(b) => Scan::Continue,
            ValueKind::Scalar => Scan::Invalid,
            ValueKind::Container => {
                if self.strings.eat(b) {
                    return Scan::Continue;
                }
                match b {
                    b'"' => self.strings.inside = true,
                    b'{' | b'[' => self.depth += 1,
                    b'}' | b']' if self.depth == 1 => return Scan::DoneWith,
                    b'}' | b']' => self.depth -= 1,
                    _ if is_json_outside_string(b) => {}
                    _ => return Scan::Invalid,
                }
                Scan::Continue
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Default, PartialEq)]
    struct Seen {
        name: Option<String>,
        args: String,
        step: Option<String>,
    }

    fn run(pieces: &[&str], finish: bool) -> Seen {
        let mut c = CallScanner::new();
        let mut seen = Seen::default();
        let mut last = Step::More;
        for p in pieces {
            last = c.feed(p, &mut |e| match e {
                CallEvent::Start { name } => seen.name = Some(name),
                CallEvent::Args(a) => seen.args.push_str(a),
            });
            if last != Step::More {
                break;
            }
        }
        if finish && last == Step::More {
            last = c.finish(&mut |e| match e {
                CallEvent::Start { name } => seen.name = Some(name),
                CallEvent::Args(a) => seen.args.push_str(a),
            });
        }
        seen.step = Some(format!("{last:?}"));
        seen
    }

    #[test]
    fn headers() {
        assert_eq!(match_header("{\"name\": \"f\", \"arguments\": {"), Header::Match { name: "f".into(), end: 27 });
        assert_eq!(
            match_header(" {\"name\":\"a\\\"b\",\"parameters\":1"),
            Header::Match { name: "a\"b".into(), end: 29 }
        );
        assert_eq!(match_header("{\"name\": \"f\", \"arguments\": "), Header::Incomplete);
        assert_eq!(match_header("{\"na"), Header::Incomplete);
        assert_eq!(match_header("{\"arguments\": {}"), Header::NoMatch);
        assert_eq!(match_header("x"), Header::NoMatch);
    }

    #[test]
    fn streams_arguments() {
        let s = run(&["{\"name\": \"get\", \"argu", "ments\": {\"a\": [1, {\"b\": \"}\"}]", "}}\n</tool_call>"], false);
        assert_eq!(s.name.as_deref(), Some("get"));
        assert_eq!(s.args, "{\"a\": [1, {\"b\": \"}\"}]}");
        assert_eq!(s.step.unwrap(), "Done { rest: \"\\n</tool_call>\" }");
    }

    #[test]
    fn other_shapes_and_breakage() {
        let s = run(&["{\"arguments\": {\"x\": 1}, \"name\": \"f\"}</tool_call>"], false);
        assert_eq!((s.name.as_deref(), s.args.as_str()), (Some("f"), "{\"x\":1}"));
        let s = run(&["not json</tool_call>"], false);
        assert_eq!(s.step.unwrap(), "Broken { text: \"\", rest: \"not json</tool_call>\" }");
        let s = run(&["{\"name\": \"f\", \"arguments\": {'x': 1}}"], false);
        assert_eq!(s.name.as_deref(), Some("f"));
        assert!(s.step.unwrap().starts_with("Broken { text: \"{\\\"name\\\": \\\"f\\\", \\\"arguments\\\": {\""));
        let s = run(&["{\"name\": \"f\", \"arguments\": {\"x\": 1,}}"], false);
        assert!(s.step.unwrap().starts_with("Broken"), "trailing comma is not JSON");
        let s = run(&["{\"name\": \"f\", \"arguments\": {\"x\": 1}</tool_call>"], false);
        assert_eq!(s.step.unwrap(), "Done { rest: \"</tool_call>\" }", "a missing closing brace is tolerated");
        let s = run(&["{\"name\": \"f\", \"arguments\": 42"], true);
        assert_eq!((s.args.as_str(), s.step.unwrap().as_str()), ("42", "Done { rest: \"\" }"));
        let s = run(&["{\"name\": \"f\", \"arguments\": {\"x\": "], true);
        assert!(s.step.unwrap().starts_with("Broken"), "cut off");
    }
}
