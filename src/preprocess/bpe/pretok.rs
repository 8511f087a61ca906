//! The pre-tokenizer: a hand-written scanner equal to the GPT-4-style split regex of Qwen2/3
//! and Llama 3 (HF `Split`, behavior `Isolated`), which differ only in how many digits a number
//! piece takes (Qwen: 1, Llama 3: up to 3):
//!
//! ```text
//! (?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,D}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+
//! ```
//!
//! Invariant: [`split`] yields the same pieces as HF's `Split` with that regex: every char of the
//! input starts a match of one alternative (letters, numbers, white space, or anything else), so
//! the pieces are the leftmost-first matches end to end, with no gaps. [`piece_end`] tries the
//! alternatives in the regex's order and resolves each one's backtracking in closed form (noted
//! at each branch). Pure functions over the input; no state.

use super::classes::{classes, CharClasses, LETTER, NUMBER, SPACE};

/// The regexes this scanner replaces, as they appear in `tokenizer.json`, with their digit count.
pub(super) const PATTERNS: [(&str, usize); 2] = [
    (
        r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
        1,
    ),
    (
        r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
        3,
    ),
];

/// Class bits of the ASCII chars, without a table lookup through [`CharClasses`].
const ASCII: [u8; 128] = {
    let mut t = [0u8; 128];
    let mut b = 0;
    while b < 128 {
        let c = b as u8;
        t[b] = if c.is_ascii_alphabetic() {
            LETTER
        } else if c.is_ascii_digit() {
            NUMBER
        } else if matches!(c, b'\t' | b'\n' | 0x0B | 0x0C | b'\r' | b' ') {
            SPACE
        } else {
            0
        };
        b += 1;
    }
    t
};

/// One char at a byte offset: the char, its class bits, its UTF-8 length.
#[derive(Clone, Copy)]
struct At {
    c: char,
    class: u8,
    len: usize,
}

/// The scanner over one text.
struct Scanner<'a> {
    text: &'a str,
    bytes: &'a [u8],
    classes: &'static CharClasses,
}

impl Scanner<'_> {
    #[inline]
    fn at(&self, i: usize) -> Option<At> {
        let b = *self.bytes.get(i)?;
        if b < 0x80 {
            return Some(At { c: char::from(b), class: ASCII[usize::from(b)], len: 1 });
        }
        let c = self.text[i..].chars().next()?;
        Some(At { c, class: self.classes.of(c), len: c.len_utf8() })
    }

    /// The end of the run of chars whose class is in `mask`, from `i`.
    #[inline]
    fn run(&self, mut i: usize, mask: u8) -> usize {
        while let Some(a) = self.at(i) {
            if a.class & mask == 0 {
                break;
            }
            i += a.len;
        }
        i
    }

    /// The end of the run of "other" chars (`[^\s\p{L}\p{N}]`) from `i`.
    #[inline]
    fn other_run(&self, mut i: usize) -> usize {
        while let Some(a) = self.at(i) {
            if a.class != 0 {
                break;
            }
            i += a.len;
        }
        i
    }

    /// The end of `[\r\n]*` from `i`.
    #[inline]
    fn crlf_run(&self, mut i: usize) -> usize {
        while matches!(self.bytes.get(i), Some(b'\r' | b'\n')) {
            i += 1;
        }
        i
    }

    /// The end of a contraction after the apostrophe at `i - 1`, if one starts at `i`.
    fn contraction(&self, i: usize) -> Option<usize> {
        let first = self.at(i)?;
        let next = |j: usize| self.at(j).and_then(|a| Some((self.classes.fold(a.c)?, a.len)));
        match self.classes.fold(first.c)? {
            b's' | b't' | b'm' | b'd' => Some(i + first.len),
            b'r' | b'v' => next(i + first.len).filter(|&(f, _)| f == b'e').map(|(_, n)| i + first.len + n),
            b'l' => next(i + first.len).filter(|&(f, _)| f == b'l').map(|(_, n)| i + first.len + n),
            _ => None,
        }
    }

    /// The end of the piece that starts at `i` (`i` < text length).
    fn piece_end(&self, i: usize, max_digits: usize) -> usize {
        let a = self.at(i).expect("piece_end inside the text");
        let after = i + a.len;
        // (?i:'s|'t|'re|'ve|'m|'ll|'d)
        if a.c == '\'' {
            if let Some(end) = self.contraction(after) {
                return end;
            }
        }
        // [^\r\n\p{L}\p{N}]?\p{L}+: a letter run, or one prefix char and a letter run (without
        // the prefix, \p{L}+ cannot start on a char that is not a letter).
        if a.class == LETTER {
            return self.run(after, LETTER);
        }
        let prefix_ok = a.class & (LETTER | NUMBER) == 0 && a.c != '\r' && a.c != '\n';
        let next = self.at(after);
        if prefix_ok && next.is_some_and(|n| n.class == LETTER) {
            return self.run(after, LETTER);
        }
        // \p{N}{1,D}
        if a.class == NUMBER {
            let mut end = after;
            for _ in 1..max_digits {
                match self.at(end) {
                    Some(n) if n.class == NUMBER => end += n.len,
                    _ => break,
                }
            }
            return end;
        }
        // ` ?[^\s\p{L}\p{N}]+[\r\n]*`: with the space, an "other" char must follow it; without,
        // the space itself is not "other".
        if a.c == ' ' && next.is_some_and(|n| n.class == 0) {
            return self.crlf_run(self.other_run(after));
        }
        if a.class == 0 {
            return self.crlf_run(self.other_run(after));
        }
        // White space from here on: W = the maximal run [i, end).
        debug_assert_eq!(a.class, SPACE);
        let mut end = i;
        let mut last_crlf = None;
        let mut last_start = i;
        while let Some(s) = self.at(end) {
            if s.class != SPACE {
                break;
            }
            if s.c == '\r' || s.c == '\n' {
                last_crlf = Some(end);
            }
            last_start = end;
            end += s.len;
        }
        // \s*[\r\n]+: \s* backs off from the end of W to the last CR/LF in it, where [\r\n]+
        // takes that one char (the next is not CR/LF, being after the last).
        if let Some(p) = last_crlf {
            return p + 1;
        }
        // \s+(?!\S): all of W at the end of the text; otherwise \s+ backs off one char (the
        // lookahead then sees white space), which needs W to have two chars or more.
        if end == self.bytes.len() || last_start > i {
            return if end == self.bytes.len() { end } else { last_start };
        }
        // \s+
        end
    }
}

/// Calls `piece` with each pre-token of `text`, in order; their concatenation is `text`.
pub(super) fn split<'t>(text: &'t str, max_digits: usize, mut piece: impl FnMut(&'t str)) {
    debug_assert!(max_digits >= 1);
    let scanner = Scanner { text, bytes: text.as_bytes(), classes: classes() };
    let mut i = 0;
    while i < text.len() {
        let end = scanner.piece_end(i, max_digits);
        debug_assert!(end > i && text.is_char_boundary(end));
        piece(&text[i..end]);
        i = end;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pieces(text: &str, digits: usize) -> Vec<&str> {
        let mut v = Vec::new();
        split(text, digits, |p| v.push(p));
        v
    }

    #[test]
    fn known_splits() {
        assert_eq!(
            pieces("Hello world's 123 foo!!\n\n  bar  ", 1),
            ["Hello", " world", "'s", " ", "1", "2", "3", " foo", "!!\n\n", " ", " bar", "  "]
        );
        assert_eq!(pieces("12345", 3), ["123", "45"]);
        assert_eq!(pieces("x \n \n y", 1), ["x", " \n \n", " y"]);
        assert_eq!(pieces("a   b", 1), ["a", "  ", " b"]);
        assert_eq!(pieces("I'LL x'ſ Re're 'x", 1), ["I", "'LL", " x", "'ſ", " Re", "'re", " '", "x"]);
        assert_eq!(pieces("漢字かな。カナ。\n", 1), ["漢字かな", "。カナ", "。\n"]);
        assert_eq!(pieces(" (x) \t\r\n", 1), [" (", "x", ")", " \t\r\n"]);
    }
}
