//! Workloads: what to send and when. Each yields [`Scheduled`] jobs in arrival order.
//!
//! - Mooncake trace replay: each hash id is a block of `--block-size` deterministic token ids
//!   (the same id gives the same tokens in every request and every run), cut to `input_length`.
//! - Synthetic shared prefix: groups of requests whose prompts start with the group's system
//!   prompt, followed by a part unique to the request.
//! - Multi-turn sessions: each turn resends the whole history (system prompt, earlier turns and
//!   the model's earlier answers) plus a new user message.
//! - Mooncake conversations (`mooncake --sessions N`): the trace's requests grouped into
//!   conversations ([`conversations`]) and the N with the most turns replayed turn by turn.
//!
//! Invariant: prompts are rendered only when sent (a 2,000-request Mooncake replay is ~27 M
//! prompt tokens; holding them all would cost hundreds of MB). Concurrency: none; the driver
//! pulls jobs one at a time.

use std::io::BufRead;
use std::time::Duration;

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

/// Most requests a trace replay reads: far above the 12,031 lines of the Mooncake trace.
pub const MAX_TRACE_REQUESTS: usize = 10_000_000;
/// Largest prompt rendered, in tokens: kvgate's 32 MiB body limit holds about 4 M token ids.
pub const MAX_PROMPT_TOKENS: u64 = 4_000_000;

/// The token ids prompts are drawn from, `lo..=hi` (the built-in mock model's byte vocabulary
/// is 0..=255 plus specials).
#[derive(Debug, Clone, Copy)]
pub struct TokenSpace {
    pub lo: u32,
    pub hi: u32,
}

/// One segment of a token prompt: `len` tokens of the deterministic block `id`.
#[derive(Debug, Clone, Copy)]
pub struct Segment {
    pub id: u64,
    pub len: u32,
}

/// What one request carries.
#[derive(Debug, Clone)]
pub enum Prompt {
    /// Token ids (sent to `/v1/completions` as `"prompt": [ids]`).
    Tokens(Vec<Segment>),
    /// Text (sent to `/v1/completions` as `"prompt": "text"`).
    Text(String),
    /// Chat messages `(role, content)` (sent to `/v1/chat/completions`).
    Messages(Vec<(&'static str, String)>),
}

/// One request of a job.
#[derive(Debug, Clone)]
pub struct RequestSpec {
    pub prompt: Prompt,
    pub max_tokens: u32,
}

/// A multi-turn session: each turn's prompt is the whole history plus the new user message.
#[derive(Debug, Clone)]
pub struct Session {
    pub id: u64,
    pub chat: bool,
    pub system: String,
    pub users: Vec<String>,
    pub max_tokens: u32,
}

/// Requests sent one after the other, each when the previous one finished (a conversation of a
/// trace, whose prompts are fixed by the trace).
#[derive(Debug, Clone)]
pub struct Turns {
    pub id: u64,
    pub requests: Vec<RequestSpec>,
}

#[derive(Debug, Clone)]
pub enum Job {
    Single(RequestSpec),
    Session(Session),
    Turns(Turns),
}

/// A job and, for an open loop, when it should start (from the run's start).
pub struct Scheduled {
    pub at: Option<Duration>,
    pub job: Job,
}

/// SplitMix64: a fixed, dependency-free generator, so a block's tokens never change with a
/// `rand` upgrade.
fn splitmix(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Calls `f` with the first `len` token ids of block `id`.
pub fn block_tokens(id: u64, len: u32, space: TokenSpace, mut f: impl FnMut(u32)) {
    debug_assert!(space.lo <= space.hi);
    let span = u64::from(space.hi - space.lo) + 1;
    let mut state = id ^ 0x6B76_6761_7465_0000; // "kvgate"
    for _ in 0..len {
        let x = splitmix(&mut state) >> 32;
        f(space.lo + ((x * span) >> 32) as u32);
    }
}

// ---- Mooncake ----

#[derive(serde::Deserialize)]
struct TraceLine {
    timestamp: f64,
    input_length: u64,
    output_length: u64,
    hash_ids: Vec<u64>,
}

/// Options of a Mooncake-format replay.
pub struct TraceOptions {
    pub block_size: u32,
    pub max_requests: usize,
    pub time_scale: f64,
    pub max_output_tokens: Option<u32>,
    pub max_input_tokens: Option<u32>,
    /// Ignore timestamps (closed loop or a fixed rate).
    pub timestamps: bool,
}

/// One trace request, ready to send, with what grouping it into conversations needs.
struct TraceRequest {
    timestamp_ms: f64,
    hash_ids: Vec<u64>,
    spec: RequestSpec,
}

/// Reads a Mooncake-format JSONL trace into jobs (timestamps in ms, relative to the first).
pub fn mooncake(path: &std::path::Path, o: &TraceOptions) -> anyhow::Result<Vec<Scheduled>> {
    let reqs = read_trace(path, o, o.max_requests)?;
    let t0 = reqs[0].timestamp_ms;
    Ok(reqs.into_iter().map(|r| Scheduled { at: o.at(r.timestamp_ms - t0), job: Job::Single(r.spec) }).collect())
}

impl TraceOptions {
    fn at(&self, since_first_ms: f64) -> Option<Duration> {
        self.timestamps.then(|| Duration::from_secs_f64((since_first_ms.max(0.0) * self.time_scale / 1000.0).max(0.0)))
    }
}

/// Shortest common prefix, in hash ids, that links a request to an earlier one of its
/// conversation: the Mooncake conversation trace starts every prompt with the same block (a
/// shared system prompt), which alone says nothing about the conversation.
pub const MIN_CONVERSATION_PREFIX_IDS: usize = 2;

/// Groups requests (hash ids, in arrival order) into conversations: a request continues the
/// latest earlier request whose hash ids, but perhaps its last (a partial block the next turn
/// completes), begin its own, with at least [`MIN_CONVERSATION_PREFIX_IDS`] ids in common.
/// Returns each conversation's request indices, in order, conversations by first request.
pub fn conversations(hash_ids: &[&[u64]]) -> Vec<Vec<usize>> {
    let mut by_prefix: std::collections::HashMap<&[u64], usize> = std::collections::HashMap::new();
    let mut conv_of = Vec::with_capacity(hash_ids.len());
    let mut convs: Vec<Vec<usize>> = Vec::new();
    for (i, h) in hash_ids.iter().enumerate() {
        let parent = (MIN_CONVERSATION_PREFIX_IDS..=h.len()).rev().find_map(|k| by_prefix.get(&h[..k]).copied());
        let c = match parent {
            Some(p) => conv_of[p],
            None => {
                convs.push(Vec::new());
                convs.len() - 1
            }
        };
        conv_of.push(c);
        convs[c].push(i);
        for k in [h.len().saturating_sub(1), h.len()] {
            if k >= MIN_CONVERSATION_PREFIX_IDS {
                by_prefix.insert(&h[..k], i);
            }
        }
    }
    convs
}

/// The `sessions` conversations of the trace with the most turns (ties: the earlier first),
/// each a job of its turns sent one after the other, starting at its first turn's time.
pub fn mooncake_sessions(path: &std::path::Path, o: &TraceOptions, sessions: usize) -> anyhow::Result<Vec<Scheduled>> {
    let reqs = read_trace(path, o, usize::MAX)?;
    let ids: Vec<&[u64]> = reqs.iter().map(|r| r.hash_ids.as_slice()).collect();
    let mut convs = conversations(&ids);
    convs.sort_by_key(|c| (std::cmp::Reverse(c.len()), c[0]));
    convs.truncate(sessions);
    convs.sort_by_key(|c| c[0]);
    // Cap the total at --max-requests, cutting the last conversations short.
    let mut left = o.max_requests;
    let t0 = reqs[0].timestamp_ms;
    let mut out = Vec::with_capacity(convs.len());
    for c in convs {
        let take = c.len().min(left);
        if take == 0 {
            break;
        }
        left -= take;
        let at = o.at(reqs[c[0]].timestamp_ms - t0);
        let requests = c[..take].iter().map(|&i| reqs[i].spec.clone()).collect();
        out.push(Scheduled { at, job: Job::Turns(Turns { id: c[0] as u64, requests }) });
    }
    Ok(out)
}

/// The trace's first `max_requests` requests.
fn read_trace(path: &std::path::Path, o: &TraceOptions, max_requests: usize) -> anyhow::Result<Vec<TraceRequest>> {
    let f = std::fs::File::open(path).map_err(|e| anyhow::anyhow!("--trace {}: {e}", path.display()))?;
    let mut out = Vec::new();
    for (i, line) in std::io::BufReader::new(f).lines().enumerate() {
        if out.len() >= max_requests.min(MAX_TRACE_REQUESTS) {
            break;
        }
        let line = line?;
        if line.trim().is_empty() {
            continue;
        }
        let r: TraceLine =
            serde_json::from_str(&line).map_err(|e| anyhow::anyhow!("{}:{}: {e}", path.display(), i + 1))?;
        let mut input = r.input_length.min(MAX_PROMPT_TOKENS);
        if let Some(m) = o.max_input_tokens {
            input = input.min(u64::from(m));
        }
        let block = u64::from(o.block_size);
        anyhow::ensure!(
            r.hash_ids.len() as u64 >= input.div_ceil(block),
            "{}:{}: {} hash ids cannot cover {} tokens in blocks of {block} (wrong --block-size?)",
            path.display(),
            i + 1,
            r.hash_ids.len(),
            r.input_length
        );
        let mut segments = Vec::with_capacity(input.div_ceil(block) as usize);
        let mut left = input;
        for &id in &r.hash_ids {
            if left == 0 {
                break;
            }
            let len = left.min(block);
            segments.push(Segment { id, len: len as u32 });
            left -= len;
        }
        let mut max_tokens = r.output_length.clamp(1, u64::from(u32::MAX)) as u32;
        if let Some(m) = o.max_output_tokens {
            max_tokens = max_tokens.min(m);
        }
        let spec = RequestSpec { prompt: Prompt::Tokens(segments), max_tokens };
        out.push(TraceRequest { timestamp_ms: r.timestamp, hash_ids: r.hash_ids, spec });
    }
    anyhow::ensure!(!out.is_empty(), "--trace {}: no requests", path.display());
    Ok(out)
}

// ---- synthetic ----

/// Block ids of synthetic workloads live above this, away from any trace's ids.
const SYNTHETIC_ID_BASE: u64 = 1 << 62;

/// Options of the shared-prefix workload.
pub struct SharedPrefixOptions {
    pub requests: usize,
    pub groups: u32,
    pub prefix_tokens: u32,
    pub suffix_tokens: u32,
    pub output_tokens: u32,
    pub chat: bool,
    pub seed: u64,
}

/// Requests in random groups; a group's requests share a `prefix_tokens` system prompt.
pub fn shared_prefix(o: &SharedPrefixOptions, arrivals: &mut Arrivals) -> Vec<Scheduled> {
    let mut rng = SmallRng::seed_from_u64(o.seed);
    (0..o.requests as u64)
        .map(|i| {
            let g = u64::from(rng.random_range(0..o.groups.max(1)));
            let prompt = if o.chat {
                Prompt::Messages(vec![
                    ("system", words(SYNTHETIC_ID_BASE + g, o.prefix_tokens)),
                    ("user", words(SYNTHETIC_ID_BASE + (1 << 40) + i, o.suffix_tokens)),
                ])
            } else {
                Prompt::Tokens(vec![
                    Segment { id: SYNTHETIC_ID_BASE + g, len: o.prefix_tokens },
                    Segment { id: SYNTHETIC_ID_BASE + (1 << 40) + i, len: o.suffix_tokens },
                ])
            };
            let job = Job::Single(RequestSpec { prompt, max_tokens: o.output_tokens });
            Scheduled { at: arrivals.next_at(), job }
        })
        .collect()
}

/// Options of the multi-turn workload.
pub struct SessionOptions {
    pub sessions: usize,
    pub turns: u32,
    pub groups: u32,
    pub system_words: u32,
    pub user_words: u32,
    pub output_tokens: u32,
    pub chat: bool,
    pub seed: u64,
}

/// Sessions (arrivals are session starts); sessions of one group share their system prompt.
pub fn sessions(o: &SessionOptions, arrivals: &mut Arrivals) -> Vec<Scheduled> {
    let mut rng = SmallRng::seed_from_u64(o.seed);
    (0..o.sessions as u64)
        .map(|s| {
            let g = u64::from(rng.random_range(0..o.groups.max(1)));
            let users = (0..u64::from(o.turns))
                .map(|t| words(SYNTHETIC_ID_BASE + (2 << 40) + (s << 16) + t, o.user_words))
                .collect();
            let session = Session {
                id: s,
                chat: o.chat,
                system: words(SYNTHETIC_ID_BASE + g, o.system_words),
                users,
                max_tokens: o.output_tokens,
            };
            Scheduled { at: arrivals.next_at(), job: Job::Session(session) }
        })
        .collect()
}

/// Deterministic text of `n` common English words (one token each for BPE tokenizers; about
/// 4 tokens each for the built-in byte-level mock model).
pub fn words(id: u64, n: u32) -> String {
    const WORDS: [&str; 32] = [
        "the", "of", "and", "to", "in", "is", "that", "for", "it", "as", "was", "with", "be", "by", "on", "not", "he",
        "this", "are", "or", "his", "from", "at", "which", "but", "have", "an", "had", "they", "you", "were", "their",
    ];
    let mut s = String::with_capacity(n as usize * 4);
    block_tokens(id, n, TokenSpace { lo: 0, hi: WORDS.len() as u32 - 1 }, |w| {
        if !s.is_empty() {
            s.push(' ');
        }
        s.push_str(WORDS[w as usize]);
    });
    s
}

/// Arrival times of an open loop (Poisson at a rate), or none (closed loop).
pub struct Arrivals {
    rate_per_s: Option<f64>,
    rng: SmallRng,
    t_s: f64,
}

impl Arrivals {
    pub fn new(rate_per_s: Option<f64>, seed: u64) -> Self {
        Self { rate_per_s, rng: SmallRng::seed_from_u64(seed ^ 0xA11), t_s: 0.0 }
    }

    pub fn next_at(&mut self) -> Option<Duration> {
        let rate = self.rate_per_s?;
        let at = Duration::from_secs_f64(self.t_s);
        let u: f64 = self.rng.random();
        self.t_s += -(1.0 - u).ln() / rate;
        Some(at)
    }
}

// ---- request bodies ----

fn push_u32(out: &mut Vec<u8>, mut v: u32) {
    let mut digits = [0u8; 10];
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (v % 10) as u8;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[i..]);
}

/// The JSON body of a streaming request, and the path it goes to.
pub fn render(model: &str, prompt: &Prompt, max_tokens: u32, space: TokenSpace) -> (&'static str, Vec<u8>) {
    let mut b = Vec::with_capacity(256);
    b.extend_from_slice(b"{\"model\":");
    serde_json::to_writer(&mut b, model).expect("writing to a Vec");
    let path = match prompt {
        Prompt::Tokens(segments) => {
            let n: u64 = segments.iter().map(|s| u64::from(s.len)).sum();
            b.reserve(n as usize * 4);
            b.extend_from_slice(b",\"prompt\":[");
            let mut first = true;
            for s in segments {
                block_tokens(s.id, s.len, space, |t| {
                    if !first {
                        b.push(b',');
                    }
                    first = false;
                    push_u32(&mut b, t);
                });
            }
            b.push(b']');
            "/v1/completions"
        }
        Prompt::Text(t) => {
            b.extend_from_slice(b",\"prompt\":");
            serde_json::to_writer(&mut b, t).expect("writing to a Vec");
            "/v1/completions"
        }
        Prompt::Messages(m) => {
            b.extend_from_slice(b",\"messages\":[");
            for (i, (role, content)) in m.iter().enumerate() {
                if i > 0 {
                    b.push(b',');
                }
                serde_json::to_writer(&mut b, &serde_json::json!({"role": role, "content": content}))
                    .expect("writing to a Vec");
            }
            b.push(b']');
            "/v1/chat/completions"
        }
    };
    b.extend_from_slice(b",\"max_tokens\":");
    push_u32(&mut b, max_tokens);
    b.extend_from_slice(b",\"ignore_eos\":true,\"stream\":true,\"stream_options\":{\"include_usage\":true}}");
    (path, b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_are_deterministic_and_in_range() {
        let space = TokenSpace { lo: 3, hi: 255 };
        let mut a = Vec::new();
        let mut b = Vec::new();
        block_tokens(7, 512, space, |t| a.push(t));
        block_tokens(7, 100, space, |t| b.push(t));
        assert_eq!(&a[..100], &b[..]);
        assert!(a.iter().all(|&t| (3..=255).contains(&t)));
        let mut c = Vec::new();
        block_tokens(8, 512, space, |t| c.push(t));
        assert_ne!(a, c);
    }

    #[test]
    fn conversations_follow_extended_prefixes() {
        // 0: [0,1,2]; 1 extends 0 (its partial last block 2 became 5); 2 shares only the common
        // first id (a new conversation); 3 extends 1 whole; 4 extends 2.
        let reqs: [&[u64]; 5] = [&[0, 1, 2], &[0, 1, 5, 6], &[0, 7], &[0, 1, 5, 6, 8], &[0, 7, 9]];
        assert_eq!(conversations(&reqs), vec![vec![0, 1, 3], vec![2, 4]]);
    }

    #[test]
    fn token_body_is_valid_json() {
        let p = Prompt::Tokens(vec![Segment { id: 1, len: 3 }, Segment { id: 2, len: 2 }]);
        let (path, body) = render("m", &p, 9, TokenSpace { lo: 0, hi: 255 });
        assert_eq!(path, "/v1/completions");
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["prompt"].as_array().unwrap().len(), 5);
        assert_eq!(v["max_tokens"], 9);
        assert_eq!(v["stream_options"]["include_usage"], true);
    }
}
