//! API keys (`--api-key`, `KVGATE_API_KEY`, `--api-key-file`): which requests need one, and
//! the check of `Authorization: Bearer <key>`.
//!
//! Invariant: with no key configured every request passes; with one, every route except the
//! open probes ([`ApiKeys::needs_key`]) needs a configured key, compared in time independent of
//! where the keys differ. Keys are never logged or echoed in an error.
//!
//! Concurrency: built once at start-up, read-only afterwards, shared by every shard (`Arc`).

use http::HeaderMap;

/// Routes a load balancer or Prometheus probes, and the dashboard (which shows what `/health`
/// and `/metrics` do): open unless `--api-key-protect-health`.
const PROBES: &[&str] = &["/health", "/live", "/metrics", "/dashboard", "/dashboard/events"];

/// Why a request was refused (the message the client reads).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthFailure {
    /// No `Authorization: Bearer` header.
    Missing,
    /// A key that is not configured.
    Wrong,
}

/// The configured keys.
#[derive(Debug, Clone, Default)]
pub struct ApiKeys {
    keys: Vec<Box<[u8]>>,
    protect_probes: bool,
}

impl ApiKeys {
    pub fn new(keys: Vec<String>, protect_probes: bool) -> Self {
        Self { keys: keys.into_iter().map(|k| k.into_bytes().into_boxed_slice()).collect(), protect_probes }
    }

    /// Whether any key is configured.
    pub fn enabled(&self) -> bool {
        !self.keys.is_empty()
    }

    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// Whether a request for `path` must carry a key.
    pub fn needs_key(&self, path: &str) -> bool {
        self.enabled() && (self.protect_probes || !PROBES.contains(&path))
    }

    /// Checks the request's `Authorization` header against every configured key.
    pub fn check(&self, headers: &HeaderMap) -> Result<(), AuthFailure> {
        let Some(given) = bearer(headers) else {
            return Err(AuthFailure::Missing);
        };
        // Compare against every key, without stopping at a match, so the time taken says
        // nothing about which key (or which byte) matched.
        let mut ok = 0u8;
        for k in &self.keys {
            ok |= ct_eq(k, given) as u8;
        }
        if ok == 1 {
            Ok(())
        } else {
            Err(AuthFailure::Wrong)
        }
    }
}

/// The token of `Authorization: Bearer <token>` (scheme case-insensitive, RFC 7235).
fn bearer(headers: &HeaderMap) -> Option<&[u8]> {
    let v = headers.get(http::header::AUTHORIZATION)?.as_bytes();
    let (scheme, rest) = v.split_at(v.iter().position(|b| *b == b' ')?);
    if !scheme.eq_ignore_ascii_case(b"bearer") {
        return None;
    }
    let token = rest.trim_ascii();
    (!token.is_empty()).then_some(token)
}

/// Equality in time that depends only on the lengths, not on where the bytes differ (every
/// byte is visited; `black_box` keeps the optimizer from adding an early exit).
fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let mut diff = 0u8;
    for (x, y) in a.iter().zip(b) {
        diff |= std::hint::black_box(x ^ y);
    }
    std::hint::black_box(diff) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(auth: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(http::header::AUTHORIZATION, auth.parse().unwrap());
        h
    }

    #[test]
    fn bearer_keys_are_checked_and_probes_stay_open() {
        let keys = ApiKeys::new(vec!["sk-one".into(), "sk-two".into()], false);
        assert_eq!(keys.check(&headers("Bearer sk-one")), Ok(()));
        assert_eq!(keys.check(&headers("bearer  sk-two ")), Ok(()));
        assert_eq!(keys.check(&headers("Bearer sk-on")), Err(AuthFailure::Wrong));
        assert_eq!(keys.check(&headers("Bearer sk-one2")), Err(AuthFailure::Wrong));
        assert_eq!(keys.check(&headers("Basic sk-one")), Err(AuthFailure::Missing));
        assert_eq!(keys.check(&headers("Bearer ")), Err(AuthFailure::Missing));
        assert_eq!(keys.check(&HeaderMap::new()), Err(AuthFailure::Missing));
        assert!(keys.needs_key("/v1/chat/completions") && keys.needs_key("/tokenize") && keys.needs_key("/nope"));
        assert!(!keys.needs_key("/health") && !keys.needs_key("/metrics") && !keys.needs_key("/live"));
        assert!(ApiKeys::new(vec!["k".into()], true).needs_key("/health"));
        assert!(!ApiKeys::default().needs_key("/v1/models"));
    }
}
