//! Stop strings over a stream of decoded text.
//!
//! Invariant: no emitted text contains a stop string or anything after one; text that could still
//! become the start of a stop string is held back, so at most `longest stop − 1` bytes are ever
//! held. Once stopped, nothing more is emitted. One matcher per request, owned by the task driving
//! the stream (plain data, no sharing).

/// Holds back text that may begin a stop string; cuts the stream at the earliest match.
#[derive(Debug, Clone)]
pub struct StopMatcher {
    stops: Vec<String>,
    held: String,
    stopped: bool,
}

impl StopMatcher {
    /// Empty stop strings are ignored.
    pub fn new(stops: Vec<String>) -> Self {
        let stops = stops.into_iter().filter(|s| !s.is_empty()).collect();
        StopMatcher { stops, held: String::new(), stopped: false }
    }

    /// Pushes newly decoded text; returns (text safe to emit now, stopped?).
    pub fn push(&mut self, text: &str) -> (String, bool) {
        if self.stopped {
            return (String::new(), true);
        }
        if self.stops.is_empty() {
            return (text.to_string(), false);
        }
        self.held.push_str(text);
        // Earliest start wins; every possible start is inside `held` (see `partial_suffix`).
        let earliest = self.stops.iter().filter_map(|s| self.held.find(s.as_str())).min();
        if let Some(at) = earliest {
            self.held.truncate(at);
            self.stopped = true;
            return (std::mem::take(&mut self.held), true);
        }
        let keep = self.partial_suffix();
        let rest = self.held.split_off(self.held.len() - keep);
        (std::mem::replace(&mut self.held, rest), false)
    }

    /// At the end of the stream (no stop matched): releases the held-back text.
    pub fn flush(&mut self) -> String {
        std::mem::take(&mut self.held)
    }

    /// Length in bytes of the longest suffix of `held` that is a proper prefix of some stop.
    fn partial_suffix(&self) -> usize {
        let longest = self.stops.iter().map(String::len).max().unwrap_or(0);
        let held = self.held.as_str();
        let min_start = held.len().saturating_sub(longest.saturating_sub(1));
        held.char_indices()
            .map(|(i, _)| i)
            .filter(|&i| i >= min_start)
            .find(|&i| self.stops.iter().any(|s| s.starts_with(&held[i..])))
            .map_or(0, |i| held.len() - i)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(stops: &[&str], pushes: &[&str]) -> (String, bool) {
        let mut m = StopMatcher::new(stops.iter().map(|s| s.to_string()).collect());
        let mut out = String::new();
        for p in pushes {
            let (text, stopped) = m.push(p);
            out.push_str(&text);
            if stopped {
                return (out, true);
            }
        }
        out.push_str(&m.flush());
        (out, false)
    }

    #[test]
    fn stop_split_across_pushes() {
        let mut m = StopMatcher::new(vec!["STOP".into()]);
        assert_eq!(m.push("Hel"), ("Hel".to_string(), false));
        assert_eq!(m.push("lo ST"), ("lo ".to_string(), false));
        assert_eq!(m.push("OP here"), (String::new(), true));
        assert_eq!(m.push("more"), (String::new(), true));
        assert_eq!(run(&["STOP"], &["Hel", "lo STOP here"]), ("Hello ".to_string(), true));
        assert_eq!(run(&["STOP"], &["Hel", "lo S", "T", "OP"]), ("Hello ".to_string(), true));
    }

    #[test]
    fn false_prefix_is_released() {
        let mut m = StopMatcher::new(vec!["STOP".into()]);
        assert_eq!(m.push("a ST"), ("a ".to_string(), false));
        assert_eq!(m.push("AY"), ("STAY".to_string(), false));
        assert_eq!(m.push("x S"), ("x ".to_string(), false));
        assert_eq!(m.flush(), "S");
        assert_eq!(run(&["STOP"], &["ST", "ST", "OP"]), ("ST".to_string(), true));
    }

    #[test]
    fn earliest_of_many_wins() {
        assert_eq!(run(&["world", "lo w", ""], &["hello world"]), ("hel".to_string(), true));
        assert_eq!(run(&["</s>", "\n\n"], &["a\n", "\nb</s>"]), ("a".to_string(), true));
        assert_eq!(run(&[], &["no stops"]), ("no stops".to_string(), false));
        assert_eq!(run(&[""], &["empty ignored"]), ("empty ignored".to_string(), false));
    }

    #[test]
    fn multibyte_boundaries() {
        assert_eq!(run(&["世界"], &["你好世", "界!"]), ("你好".to_string(), true));
        assert_eq!(run(&["🎉x"], &["a🎉", "b"]), ("a🎉b".to_string(), false));
    }
}
