//! Long prompts do not stall a shard (issue #13, part 3): with one shard, a stream keeps its
//! pace while a 10 MB chat message and several ~60k-token prompts arrive on the same shard;
//! the 10 MB message gets its 400 (context exceeded) quickly, refused before tokenization.
//!
//! Timing bounds here are generous (a busy 2-core CI machine); the measured figures are in
//! perf/RESULTS.md ("Long prompts and the shard", perf/long_prompts.py).

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

/// The largest gap between two chunks of the steady stream the test accepts while the long
/// prompts are prepared. The target is 10 ms (perf/RESULTS.md); before the pool, the 10 MB
/// message alone held the shard for seconds.
const MAX_GAP: Duration = Duration::from_millis(250);
/// About 60k Qwen3 tokens of [`varied_text`].
const LONG_PROMPT_BYTES: usize = 123_000;
/// The 10 MB message's 400 must arrive within this (the target is ~100 ms).
const MAX_REFUSAL: Duration = Duration::from_secs(3);

/// `bytes` of varied text: made-up words of random letters and numbers, so that neither a
/// word cache nor a segment cache makes it cheap to tokenize (real text is kinder).
fn varied_text(bytes: usize, seed: u64) -> String {
    const LETTERS: &[u8] = b"etaoinshrdlucmfwypvbgkqjxz";
    let mut x = seed | 1;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let mut s = String::with_capacity(bytes + 64);
    while s.len() < bytes {
        let r = next();
        let len = 2 + (r % 8) as usize;
        for k in 0..len {
            // Skewed towards the common letters, as English is.
            let i = ((r >> (8 + 5 * k)) % 26) as usize * ((r >> (50 - k)) % 2 + 1) as usize / 2;
            s.push(LETTERS[i.min(25)] as char);
        }
        match r >> 60 {
            0 => s.push_str(&format!(" {} ", (r >> 20) % 10_000)),
            1 => s.push_str(".\n"),
            2 => s.push_str(", "),
            _ => s.push(' '),
        }
    }
    s.truncate(bytes);
    s
}

/// Reads a stream until `stop`, returning when each chunk arrived.
async fn chunk_times(mut r: reqwest::Response, stop: Arc<AtomicBool>) -> Vec<Instant> {
    let mut times = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        match r.chunk().await {
            Ok(Some(_)) => times.push(Instant::now()),
            _ => break,
        }
    }
    times
}

fn max_gap(times: &[Instant], from: Instant, to: Instant) -> Duration {
    times.windows(2).filter(|w| w[1] >= from && w[0] <= to).map(|w| w[1] - w[0]).max().unwrap_or_default()
}

/// What one run measured.
struct Stall {
    /// The 10 MB message's wait for its 400.
    refusal: Duration,
    /// The stream's largest gap while the long prompts were prepared, and before them.
    during: Duration,
    before: Duration,
    /// Chunks the stream delivered meanwhile.
    chunks: usize,
}

/// One shard, one steady stream; then the 10 MB message and three ~60k-token prompts, with
/// `--preprocess-threads threads`.
async fn long_prompts_beside_a_stream(threads: &str) -> Stall {
    let dir = qwen_dir();
    let s = serve(&[
        "--preprocess-threads",
        threads,
        "--model-path",
        dir.to_str().unwrap(),
        "--served-model-name",
        "qwen",
        "--shards",
        "1",
        "--speedup-ratio",
        "2",
        "--workers",
        "1",
    ]);
    let base = base_url(&s);
    let c = reqwest::Client::new();

    // The steady stream: a token every ~3 ms.
    let body = json!({"model": "qwen", "prompt": "Tell me a long story.", "max_tokens": 30000, "ignore_eos": true, "stream": true});
    let r = c.post(format!("{base}/v1/completions")).json(&body).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let stop = Arc::new(AtomicBool::new(false));
    let reader = tokio::spawn(chunk_times(r, stop.clone()));
    tokio::time::sleep(Duration::from_millis(300)).await;

    // Built before the clock starts: 10 MB of text in one message, and ~60k-token prompts.
    let ten_mb = varied_text(10 << 20, 1);
    let huge = serde_json::to_vec(
        &json!({"model": "qwen", "messages": [{"role": "user", "content": ten_mb}], "max_tokens": 8}),
    )
    .unwrap();
    let long: Vec<String> = (0..3).map(|i| varied_text(LONG_PROMPT_BYTES, 7 + i)).collect();
    // ~60k tokens each, as /tokenize counts them (a body past 8 KiB: the pool tokenizes it).
    let r = c.post(format!("{base}/tokenize")).json(&json!({"model": "qwen", "prompt": long[0]})).send().await.unwrap();
    let v: Value = r.json().await.unwrap();
    let count = v["count"].as_u64().unwrap();
    assert!((50_000..70_000).contains(&count), "{count} tokens");
    let long: Vec<Vec<u8>> = long
        .into_iter()
        .map(|p| serde_json::to_vec(&json!({"model": "qwen", "prompt": p, "max_tokens": 8})).unwrap())
        .collect();

    let started = Instant::now();
    let sent = Instant::now();
    let r = c
        .post(format!("{base}/v1/chat/completions"))
        .header("content-type", "application/json")
        .body(huge)
        .send()
        .await
        .unwrap();
    let refusal = sent.elapsed();
    assert_eq!(r.status(), 400);
    let v: Value = r.json().await.unwrap();
    assert_openai_error(&v);
    assert_eq!(v["error"]["code"], "context_length_exceeded", "{v}");
    assert_eq!(v["error"]["type"], "invalid_request_error");
    assert!(v["error"]["message"].as_str().unwrap().contains("at least"), "refused before tokenizing: {v}");

    let answers =
        futures::future::join_all(long.into_iter().map(|b| {
            c.post(format!("{base}/v1/completions")).header("content-type", "application/json").body(b).send()
        }))
        .await;
    for r in answers {
        let r = r.unwrap();
        assert_eq!(r.status(), 400);
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["error"]["code"], "context_length_exceeded", "{v}");
    }
    let ended = Instant::now();
    tokio::time::sleep(Duration::from_millis(100)).await;
    stop.store(true, Ordering::Relaxed);
    let times = reader.await.unwrap();
    let before = max_gap(&times, times[0], started);
    let during = max_gap(&times, started, ended);
    let chunks = times.iter().filter(|&&t| t >= started && t <= ended).count();
    eprintln!(
        "--preprocess-threads {threads}: 10 MB refused in {refusal:?}; 60k-token prompts ({count} tokens) done {:?} after; stream: {chunks} chunks meanwhile, largest gap {during:?} (before: {before:?})",
        ended - started - refusal
    );
    Stall { refusal, during, before, chunks }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_long_prompt_does_not_stall_other_streams_on_its_shard() {
    let m = long_prompts_beside_a_stream("1").await;
    assert!(m.refusal < MAX_REFUSAL, "the 10 MB message waited {:?} for its 400", m.refusal);
    assert!(m.chunks > 10, "the stream stopped while the long prompts were prepared");
    assert!(
        m.during < MAX_GAP,
        "the stream stalled {:?} while the long prompts were prepared (before: {:?})",
        m.during,
        m.before
    );
}

/// The same on the shard itself (`--preprocess-threads 0`, as before the pool): the stream
/// stalls while the long prompts are parsed and tokenized. Not run by default (it only shows
/// the difference): `cargo test --test long_prompts -- --ignored --nocapture`.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore]
async fn on_the_shard_the_same_prompts_stall_the_stream() {
    let m = long_prompts_beside_a_stream("0").await;
    assert!(m.during > m.before, "largest gap {:?}, before {:?}", m.during, m.before);
}
