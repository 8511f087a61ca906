//! Where a long request's preparation spends its time (issue #13 part 3), stage by stage, with
//! the Qwen3 tokenizer and chat template on one core: the JSON parse of the body, the chat
//! template render, the token lower bound ([`Preprocessor::min_tokens`]) and the encode, for
//! a 10 MB chat message and a ~60k-token prompt. Each figure is the median of a few runs; the
//! encode warm (the thread's word cache kept from the previous run, the best case) and cold
//! (the cache cleared first, as new text meets it).
//!
//! `cargo bench --bench prepare` (figures in perf/RESULTS.md, "Long prompts and the shard").

use std::path::PathBuf;
use std::time::{Duration, Instant};

use kvgate::preprocess::bpe::FastBpe;
use kvgate::preprocess::template::ChatExtras;
use kvgate::preprocess::{ModelSource, Preprocessor};
use serde_json::{json, Value};

const RUNS: usize = 5;

fn qwen() -> Preprocessor {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/models/qwen3-0.6b");
    Preprocessor::load(&ModelSource::Dir(dir)).expect("Qwen3's tokenizer in ../shared/models/qwen3-0.6b")
}

/// `bytes` of made-up words and numbers (tests/long_prompts.rs's text).
fn varied_text(bytes: usize, seed: u64) -> String {
    const LETTERS: &[u8] = b"etaoinshrdlucmfwypvbgkqjxz";
    let mut x = seed | 1;
    let mut s = String::with_capacity(bytes + 64);
    while s.len() < bytes {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let r = x;
        for k in 0..2 + (r % 8) as usize {
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

fn median<T>(mut f: impl FnMut() -> T) -> (Duration, T) {
    let mut times = Vec::with_capacity(RUNS);
    let mut out = None;
    for _ in 0..RUNS {
        let t = Instant::now();
        out = Some(f());
        times.push(t.elapsed());
    }
    times.sort();
    (times[RUNS / 2], out.expect("RUNS > 0"))
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1e3)
}

fn main() {
    let p = qwen();
    let fast = FastBpe::from_hf(p.hf_tokenizer()).expect("Qwen3 is on the fast path");
    for (name, bytes) in [("10 MB chat message", 10 << 20), ("60k-token prompt (123 KB)", 123_000)] {
        let text = varied_text(bytes, 1);
        let body =
            serde_json::to_vec(&json!({"model": "qwen", "messages": [{"role": "user", "content": text}]})).unwrap();
        let (parse, v) = median(|| serde_json::from_slice::<Value>(&body).unwrap());
        let (render, rendered) = median(|| p.render_chat_with(&v["messages"], ChatExtras::default(), true).unwrap());
        let (bound, at_least) = median(|| p.min_tokens(&rendered));
        let (encode, ids) = median(|| p.encode(&rendered, false).unwrap());
        let (cold, _) = median(|| {
            fast.clear_thread_cache();
            fast.encode(&rendered, false)
        });
        println!(
            "{name}: body {} bytes; parse {}, render {}, lower bound {} ({} tokens at least), encode {} warm, {} cold ({} tokens)",
            body.len(),
            ms(parse),
            ms(render),
            ms(bound),
            at_least,
            ms(encode),
            ms(cold),
            ids.len()
        );
    }
}
