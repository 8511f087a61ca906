//! The token cache over real HTTP: `kvgate serve` with Qwen3, a conversation re-sent with one
//! more turn each time. Prompt token counts stay HF's, and `/metrics` shows the hits, misses,
//! bytes held and budget; `--token-cache-mb 0` turns it off.

mod common;

use common::*;
use kvgate::preprocess::{ModelSource, Preprocessor};
use serde_json::{json, Value};

/// A paragraph of a few hundred bytes, different for each `i`.
fn paragraph(i: usize) -> String {
    let words = ["cache", "token", "segment", "turn", "agent", "prompt", "shard", "budget", "clock", "history"];
    let mut s = format!("Paragraph {i}:");
    for k in 0..80 {
        s.push(' ');
        s.push_str(words[(i * 7 + k * k) % words.len()]);
    }
    s + "."
}

async fn chat(c: &reqwest::Client, base: &str, messages: &[Value]) -> Value {
    let body = json!({"model": "qwen", "messages": messages, "max_tokens": 16});
    let r = c.post(format!("{base}/v1/chat/completions")).json(&body).send().await.unwrap();
    assert_eq!(r.status(), 200);
    r.json().await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conversation_turns_hit_the_token_cache() {
    let dir = qwen_dir();
    let path = dir.to_str().unwrap();
    let s = serve(&[
        "--speedup-ratio",
        "1000",
        "--model-path",
        path,
        "--served-model-name",
        "qwen",
        "--token-cache-mb",
        "8",
    ]);
    let base = base_url(&s);
    let c = reqwest::Client::new();
    let reference = Preprocessor::load(&ModelSource::Dir(dir.clone())).unwrap();
    let mut messages = vec![json!({"role": "system", "content": paragraph(0)})];
    for turn in 1..=4 {
        messages.push(json!({"role": "user", "content": paragraph(turn)}));
        let v = chat(&c, &base, &messages).await;
        let text = reference.render_chat(&Value::Array(messages.clone()), None, true).unwrap();
        let hf = reference.hf_tokenizer().encode_fast(text.as_str(), false).unwrap().len();
        assert_eq!(v["usage"]["prompt_tokens"].as_u64().unwrap() as usize, hf, "turn {turn}");
        let answer = v["choices"][0]["message"]["content"].as_str().unwrap().to_string();
        messages.push(json!({"role": "assistant", "content": answer}));
    }
    let hits = metric(&c, &base, "kvgate_token_cache_hits_total").await;
    let misses = metric(&c, &base, "kvgate_token_cache_misses_total").await;
    let hit_tokens = metric(&c, &base, "kvgate_token_cache_hit_tokens_total").await;
    let bytes = metric(&c, &base, "kvgate_token_cache_bytes").await;
    // Turn n re-sends the system prompt and n - 1 earlier questions: 0 + 1 + 2 + 3 hits.
    assert!(hits >= 6.0, "hits {hits}");
    assert!(misses >= 5.0, "misses {misses}");
    assert!(hit_tokens > 6.0 * 80.0, "hit tokens {hit_tokens}");
    assert!(bytes > 0.0 && bytes <= 8.0 * 1024.0 * 1024.0, "bytes {bytes}");
    assert_eq!(metric(&c, &base, "kvgate_token_cache_capacity_bytes").await, 8.0 * 1024.0 * 1024.0);
    assert_eq!(metric(&c, &base, "kvgate_token_cache_evictions_total").await, 0.0);
    let text = c.get(format!("{base}/metrics")).send().await.unwrap().text().await.unwrap();
    assert!(text.contains("# TYPE kvgate_token_cache_hits_total counter"), "{text}");
    assert!(text.contains("# TYPE kvgate_token_cache_bytes gauge"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zero_turns_the_token_cache_off() {
    let dir = qwen_dir();
    let path = dir.to_str().unwrap();
    let s = serve(&[
        "--speedup-ratio",
        "1000",
        "--model-path",
        path,
        "--served-model-name",
        "qwen",
        "--token-cache-mb",
        "0",
    ]);
    let base = base_url(&s);
    let c = reqwest::Client::new();
    let messages =
        vec![json!({"role": "system", "content": paragraph(0)}), json!({"role": "user", "content": paragraph(1)})];
    let first = chat(&c, &base, &messages).await;
    let again = chat(&c, &base, &messages).await;
    assert_eq!(first["usage"]["prompt_tokens"], again["usage"]["prompt_tokens"]);
    for name in [
        "kvgate_token_cache_hits_total",
        "kvgate_token_cache_misses_total",
        "kvgate_token_cache_bytes",
        "kvgate_token_cache_capacity_bytes",
    ] {
        assert_eq!(metric(&c, &base, name).await, 0.0, "{name}");
    }
}
