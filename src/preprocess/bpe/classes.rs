//! Character classes of the pre-tokenizer regexes: `\p{L}`, `\p{N}`, `\s`, and the case folds of
//! `(?i:...)` contractions.
//!
//! Invariant: every class is read out of `regex-syntax` (the parser behind the `regex` crate that
//! `fancy-regex`, and so HF `tokenizers`, matches with), so a char is a letter here exactly when
//! HF's regex calls it one, for the same Unicode version. Built once per process ([`classes`]),
//! immutable afterwards, read by every thread without locks; 64 KiB for the BMP plus a few
//! hundred astral ranges.

use std::sync::OnceLock;

use regex_syntax::hir::{Class, HirKind};

/// `\p{L}`
pub(super) const LETTER: u8 = 1;
/// `\p{N}`
pub(super) const NUMBER: u8 = 2;
/// `\s` (Unicode White_Space)
pub(super) const SPACE: u8 = 4;

/// Class bits of every char; general categories are disjoint, so at most one bit is set.
pub(super) struct CharClasses {
    /// Chars below U+10000, indexed by code point.
    bmp: Box<[u8]>,
    /// Astral ranges `(first, last, bits)`, sorted and disjoint.
    astral: Box<[(u32, u32, u8)]>,
    /// Chars other than ASCII that `(?i:x)` matches, with the ASCII letter x they fold to.
    folds: Box<[(char, u8)]>,
}

const BMP_LEN: usize = 0x1_0000;

/// The process-wide tables, built on first use.
pub(super) fn classes() -> &'static CharClasses {
    static CLASSES: OnceLock<CharClasses> = OnceLock::new();
    CLASSES.get_or_init(CharClasses::build)
}

/// The ranges of a one-class pattern, as `regex-syntax` parses it.
fn ranges(pattern: &str) -> Vec<(char, char)> {
    let hir = regex_syntax::Parser::new().parse(pattern).expect("a valid class pattern");
    match hir.kind() {
        HirKind::Class(Class::Unicode(c)) => c.ranges().iter().map(|r| (r.start(), r.end())).collect(),
        HirKind::Literal(_) => {
            let c = pattern.chars().last().expect("non-empty");
            vec![(c, c)]
        }
        other => unreachable!("{pattern} parsed to {other:?}, not a class"),
    }
}

impl CharClasses {
    fn build() -> Self {
        let mut bmp = vec![0u8; BMP_LEN].into_boxed_slice();
        let mut astral = Vec::new();
        for (pattern, bit) in [(r"\p{L}", LETTER), (r"\p{N}", NUMBER), (r"\s", SPACE)] {
            for (lo, hi) in ranges(pattern) {
                let (lo, hi) = (lo as u32, hi as u32);
                for cp in lo..=hi.min(BMP_LEN as u32 - 1) {
                    debug_assert_eq!(bmp[cp as usize], 0, "classes are disjoint");
                    bmp[cp as usize] |= bit;
                }
                if hi >= BMP_LEN as u32 {
                    astral.push((lo.max(BMP_LEN as u32), hi, bit));
                }
            }
        }
        astral.sort_unstable();
        let mut folds = Vec::new();
        for letter in b"stremvld" {
            for (lo, hi) in ranges(&format!("(?i:{})", char::from(*letter))) {
                for c in lo..=hi {
                    if !c.is_ascii() {
                        folds.push((c, *letter));
                    }
                }
            }
        }
        CharClasses { bmp, astral: astral.into(), folds: folds.into() }
    }

    /// Class bits of `c`.
    #[inline]
    pub(super) fn of(&self, c: char) -> u8 {
        let cp = c as u32;
        if let Some(&bits) = self.bmp.get(cp as usize) {
            return bits;
        }
        match self.astral.binary_search_by(|&(lo, hi, _)| {
            if hi < cp {
                std::cmp::Ordering::Less
            } else if lo > cp {
                std::cmp::Ordering::Greater
            } else {
                std::cmp::Ordering::Equal
            }
        }) {
            Ok(i) => self.astral[i].2,
            Err(_) => 0,
        }
    }

    /// The lowercase ASCII letter `c` matches under `(?i:...)`, for the letters of the
    /// contractions (`s t r e v m l d`); `None` for any other char.
    #[inline]
    pub(super) fn fold(&self, c: char) -> Option<u8> {
        if c.is_ascii() {
            let l = (c as u8).to_ascii_lowercase();
            return b"stremvld".contains(&l).then_some(l);
        }
        self.folds.iter().find(|&&(f, _)| f == c).map(|&(_, l)| l)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classes_match_known_chars() {
        let c = classes();
        for (ch, bits) in [
            ('a', LETTER),
            ('Z', LETTER),
            ('é', LETTER),
            ('漢', LETTER),
            ('か', LETTER),
            ('𝒜', LETTER),
            ('7', NUMBER),
            ('٣', NUMBER),
            ('Ⅻ', NUMBER),
            ('½', NUMBER),
            ('𝟙', NUMBER),
            (' ', SPACE),
            ('\n', SPACE),
            ('\u{3000}', SPACE),
            ('\u{85}', SPACE),
            ('\u{a0}', SPACE),
            ('!', 0),
            ('\u{200b}', 0),
            ('🎉', 0),
            ('\u{301}', 0),
        ] {
            assert_eq!(c.of(ch), bits, "{ch:?}");
        }
        assert_eq!(c.fold('ſ'), Some(b's'));
        assert_eq!(c.fold('S'), Some(b's'));
        assert_eq!(c.fold('K'), None);
        assert_eq!(c.fold('\u{212a}'), None, "the Kelvin sign folds to k, not a contraction letter");
    }
}
