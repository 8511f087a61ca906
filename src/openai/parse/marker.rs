//! Markers split across text deltas: what to hold back until the next delta decides.

/// The length of the longest suffix of `text` that is a proper prefix of `marker` (0 if none):
/// text that may still become the marker and must not be emitted yet.
pub(crate) fn partial_suffix(text: &str, marker: &str) -> usize {
    let max = (marker.len() - 1).min(text.len());
    (1..=max)
        .rev()
        .find(|&n| {
            let start = text.len() - n;
            text.is_char_boundary(start) && marker.as_bytes().starts_with(&text.as_bytes()[start..])
        })
        .unwrap_or(0)
}

/// Whether `text` is a proper prefix of `marker` (empty included): more text may complete it.
pub(crate) fn could_become(text: &str, marker: &str) -> bool {
    text.len() < marker.len() && marker.starts_with(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partial_suffixes() {
        assert_eq!(partial_suffix("abc</thi", "</think>"), 5);
        assert_eq!(partial_suffix("abc<", "</think>"), 1);
        assert_eq!(partial_suffix("abc", "</think>"), 0);
        assert_eq!(partial_suffix("</think>", "</think>"), 0, "a whole marker is found, not held");
        assert_eq!(partial_suffix("é<", "<x>"), 1);
        assert_eq!(partial_suffix("", "<x>"), 0);
        assert!(could_become("", "<x>") && could_become("<x", "<x>") && !could_become("<x>", "<x>"));
    }
}
