//! `kvgate serve` end to end over real HTTP: the built-in model, the Qwen3 tokenizer, routing,
//! streaming and bad input.

mod common;
#[path = "common/echo_engine.rs"]
mod echo_engine;

use std::collections::HashSet;

use common::*;
use serde_json::{json, Value};

const FAST: &[&str] = &["--speedup-ratio", "1000"];

fn args(extra: &[&str]) -> Vec<&'static str> {
    let mut v: Vec<&'static str> = FAST.to_vec();
    v.extend(extra.iter().map(|s| &*Box::leak(s.to_string().into_boxed_str())));
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn builtin_model_chat_plain_and_streaming() {
    let s = serve(&args(&[]));
    let base = base_url(&s);
    let c = reqwest::Client::new();
    let body =
        json!({"model": "kvgate-mock", "messages": [{"role": "user", "content": "Hello there"}], "max_tokens": 20});
    let r = c.post(format!("{base}/v1/chat/completions")).json(&body).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.headers().contains_key("x-kvgate-worker"));
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["choices"][0]["message"]["role"], "assistant");
    assert!(!v["choices"][0]["message"]["content"].as_str().unwrap().is_empty());
    let reason = v["choices"][0]["finish_reason"].as_str().unwrap();
    assert!(reason == "stop" || reason == "length");
    assert!(v["usage"]["prompt_tokens"].as_u64().unwrap() > 0);
    assert!(v["usage"]["completion_tokens"].as_u64().unwrap() <= 20);

    let mut sb = body.clone();
    sb["stream"] = json!(true);
    sb["stream_options"] = json!({"include_usage": true});
    let r = c.post(format!("{base}/v1/chat/completions")).json(&sb).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "text/event-stream");
    let text = r.text().await.unwrap();
    let events = sse_events(&text);
    assert_eq!(events.last().unwrap(), "[DONE]");
    let chunks: Vec<Value> = events[..events.len() - 1].iter().map(|e| serde_json::from_str(e).unwrap()).collect();
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let content: String = chunks.iter().filter_map(|c| c["choices"][0]["delta"]["content"].as_str()).collect();
    assert!(!content.is_empty());
    let usage = &chunks.last().unwrap()["usage"];
    assert!(usage["completion_tokens"].as_u64().unwrap() > 0);
    assert!(chunks.iter().any(|c| c["choices"][0]["finish_reason"].is_string()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn completions_with_text_and_token_prompts() {
    let s = serve(&args(&[]));
    let base = base_url(&s);
    let c = reqwest::Client::new();
    for prompt in [json!("Once upon a time"), json!([72, 105, 32, 116, 104, 101, 114, 101])] {
        let r = c
            .post(format!("{base}/v1/completions"))
            .json(&json!({"model": "kvgate-mock", "prompt": prompt, "max_tokens": 7, "ignore_eos": true}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["object"], "text_completion");
        assert_eq!(v["usage"]["completion_tokens"], 7);
        assert_eq!(v["choices"][0]["finish_reason"], "length");
    }
    let r = c
        .post(format!("{base}/v1/completions"))
        .json(&json!({"model": "kvgate-mock", "prompt": [1, 2, 99999999]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qwen_prompt_tokens_match_hugging_face() {
    let dir = qwen_dir();
    let s = serve(&args(&["--model-path", dir.to_str().unwrap(), "--served-model-name", "Qwen/Qwen3-0.6B"]));
    let base = base_url(&s);
    let c = reqwest::Client::new();
    let r = c
        .post(format!("{base}/v1/chat/completions"))
        .json(&json!({"model": "Qwen/Qwen3-0.6B", "messages": [{"role": "user", "content": "What is the capital of France?"}], "max_tokens": 8}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["usage"]["prompt_tokens"], 15);
    assert_eq!(v["model"], "Qwen/Qwen3-0.6B");
    let models: Value = c.get(format!("{base}/v1/models")).send().await.unwrap().json().await.unwrap();
    assert_eq!(models["data"][0]["id"], "Qwen/Qwen3-0.6B");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn second_turn_goes_to_the_worker_that_cached_the_first() {
    let dir = qwen_dir();
    let s = serve(&args(&["--model-path", dir.to_str().unwrap(), "--served-model-name", "qwen", "--workers", "2"]));
    let base = base_url(&s);
    let c = reqwest::Client::new();
    let system = "You are a meticulous assistant for a shipping company. Answer in two short sentences, cite the policy section, and never invent tracking numbers.";
    let turn1 = json!([{"role": "system", "content": system}, {"role": "user", "content": "Where is my parcel?"}]);
    let r = c
        .post(format!("{base}/v1/chat/completions"))
        .json(&json!({"model": "qwen", "messages": turn1, "max_tokens": 12}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let first = r.headers()["x-kvgate-worker"].to_str().unwrap().to_string();
    let v: Value = r.json().await.unwrap();
    let answer = v["choices"][0]["message"]["content"].as_str().unwrap().to_string();
    let prompt1 = v["usage"]["prompt_tokens"].as_u64().unwrap();
    wait_for_index(&c, &base, prompt1 / 16).await;
    let mut turn2 = turn1.as_array().unwrap().clone();
    turn2.push(json!({"role": "assistant", "content": answer}));
    turn2.push(json!({"role": "user", "content": "And when will it arrive?"}));
    let r = c
        .post(format!("{base}/v1/chat/completions"))
        .json(&json!({"model": "qwen", "messages": turn2, "max_tokens": 12}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let second = r.headers()["x-kvgate-worker"].to_str().unwrap().to_string();
    let v: Value = r.json().await.unwrap();
    assert_eq!(first, second, "the second turn should follow its cached prefix");
    let cached = v["usage"]["prompt_tokens_details"]["cached_tokens"].as_u64().unwrap();
    assert!(cached > 0 && cached % 16 == 0, "cached_tokens = {cached}");
    assert!(cached >= (prompt1 / 16) * 16, "the whole first-turn prompt should be cached");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parallel_requests_use_both_workers() {
    let s = serve(&["--speedup-ratio", "20"]);
    let base = base_url(&s);
    let c = reqwest::Client::new();
    let mut tasks = Vec::new();
    for i in 0..10 {
        let c = c.clone();
        let url = format!("{base}/v1/chat/completions");
        tasks.push(tokio::spawn(async move {
            let body = json!({"model": "kvgate-mock", "messages": [{"role": "user", "content": format!("{i} distinct question number {i}: tell me about the number {}", i * 7919)}], "max_tokens": 32, "ignore_eos": true});
            let r = c.post(url).json(&body).send().await.unwrap();
            assert_eq!(r.status(), 200);
            r.headers()["x-kvgate-worker"].to_str().unwrap().to_string()
        }));
    }
    let mut seen = HashSet::new();
    for t in tasks {
        seen.insert(t.await.unwrap());
    }
    assert_eq!(seen.len(), 2, "ten parallel requests should use both workers");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_openai_errors_and_the_server_keeps_serving() {
    let s = serve(&args(&[]));
    let base = base_url(&s);
    let c = reqwest::Client::new();
    let url = format!("{base}/v1/chat/completions");
    let cases: Vec<(reqwest::RequestBuilder, u16)> = vec![
        (c.post(&url).header("content-type", "application/json").body("{not json"), 400),
        (c.post(&url).json(&json!({"model": "kvgate-mock"})), 400),
        (
            c.post(&url).json(
                &json!({"model": "kvgate-mock", "messages": [{"role": "user", "content": "hi"}], "max_tokens": -1}),
            ),
            400,
        ),
        (c.post(&url).json(&json!({"model": "nope", "messages": [{"role": "user", "content": "hi"}]})), 404),
        (
            c.post(&url).json(
                &json!({"model": "kvgate-mock", "messages": [{"role": "user", "content": "hi"}], "temperature": 9}),
            ),
            400,
        ),
        (c.get(format!("{base}/v1/nothing")), 404),
        (c.get(&url), 405),
    ];
    for (req, status) in cases {
        let r = req.send().await.unwrap();
        assert_eq!(r.status().as_u16(), status);
        let v: Value = r.json().await.unwrap();
        assert_openai_error(&v);
    }
    // An unknown role names the message it is in.
    let wizard = json!({"model": "kvgate-mock", "messages": [{"role": "user", "content": "hi"}, {"role": "wizard", "content": "x"}]});
    let r = c.post(&url).json(&wizard).send().await.unwrap();
    assert_eq!(r.status(), 400);
    let v: Value = r.json().await.unwrap();
    assert_openai_error(&v);
    assert_eq!(v["error"]["param"], "messages[1].role", "{v}");
    assert_eq!(v["error"]["type"], "invalid_request_error", "{v}");
    // A 100 MB body: refused with 413, and the connection is not left hanging.
    let big = vec![b'x'; 100 * 1024 * 1024];
    let r = c.post(&url).header("content-type", "application/json").body(big).send().await.unwrap();
    assert_eq!(r.status(), 413);
    assert_openai_error(&r.json().await.unwrap());
    // Still serving.
    let r = c
        .post(&url)
        .json(&json!({"model": "kvgate-mock", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let h = c.get(format!("{base}/health")).send().await.unwrap();
    assert_eq!(h.status(), 200);
    let v: Value = h.json().await.unwrap();
    assert_eq!(v["models"][0]["workers"].as_array().unwrap().len(), 2);
    assert_eq!(c.get(format!("{base}/live")).send().await.unwrap().status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_strings_never_leak_and_metrics_count() {
    let s = serve(&args(&[]));
    let base = base_url(&s);
    let c = reqwest::Client::new();
    // Find what the model says, then stop on a piece of it.
    let body =
        json!({"model": "kvgate-mock", "prompt": "The weather today", "max_tokens": 40, "ignore_eos": true, "seed": 7});
    let v: Value = c.post(format!("{base}/v1/completions")).json(&body).send().await.unwrap().json().await.unwrap();
    let full = v["choices"][0]["text"].as_str().unwrap().to_string();
    assert!(full.len() > 20, "{full:?}");
    let stop: String = full.chars().skip(10).take(4).collect();
    let mut b2 = body.clone();
    b2["stop"] = json!([stop]);
    b2["stream"] = json!(true);
    let text = c.post(format!("{base}/v1/completions")).json(&b2).send().await.unwrap().text().await.unwrap();
    let events = sse_events(&text);
    assert_eq!(events.last().unwrap(), "[DONE]");
    let out: String = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str::<Value>(e).unwrap())
        .filter_map(|c| c["choices"][0]["text"].as_str().map(str::to_string))
        .collect();
    let want = &full[..full.find(&stop).unwrap()];
    assert_eq!(out, want);
    let metrics = c.get(format!("{base}/metrics")).send().await.unwrap().text().await.unwrap();
    assert!(metrics.contains("kvgate_requests_total 2"), "{metrics}");
    assert!(metrics.contains("kvgate_time_to_first_token_seconds_count 2"));
    assert!(metrics.contains("kvgate_worker_active_requests{"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_survives_its_worker_dying() {
    let mut s = serve(&["--speedup-ratio", "20"]);
    let base = base_url(&s);
    let c = reqwest::Client::new();
    let body = json!({"model": "kvgate-mock", "prompt": "A long story, please.", "max_tokens": 300, "ignore_eos": true, "stream": true, "stream_options": {"include_usage": true}});
    let mut r = c.post(format!("{base}/v1/completions")).json(&body).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let first: kvgate::contract::WorkerId = {
        let h = r.headers()["x-kvgate-worker"].to_str().unwrap();
        kvgate::contract::WorkerId(u64::from_str_radix(h, 16).unwrap())
    };
    let mut text = String::new();
    // Read some of the stream, then kill the worker serving it.
    while text.matches("data: ").count() < 20 {
        text.push_str(std::str::from_utf8(&r.chunk().await.unwrap().unwrap()).unwrap());
    }
    s.kill_worker(first);
    while let Some(chunk) = r.chunk().await.unwrap() {
        text.push_str(std::str::from_utf8(&chunk).unwrap());
    }
    let events = sse_events(&text);
    assert_eq!(events.last().unwrap(), "[DONE]");
    let chunks: Vec<Value> = events[..events.len() - 1].iter().map(|e| serde_json::from_str(e).unwrap()).collect();
    assert!(chunks.iter().all(|c| c.get("error").is_none()), "the client saw an error: {text}");
    assert_eq!(chunks.last().unwrap()["usage"]["completion_tokens"], 300);
    assert!(chunks.iter().any(|c| c["choices"][0]["finish_reason"] == "length"));
    let metrics = c.get(format!("{base}/metrics")).send().await.unwrap().text().await.unwrap();
    assert!(metrics.contains("kvgate_migrations_total 1"), "{metrics}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_migration_a_dying_worker_gives_a_clear_error() {
    let mut s = serve(&["--speedup-ratio", "20", "--migration-limit", "0", "--workers", "1"]);
    let base = base_url(&s);
    let c = reqwest::Client::new();
    let body = json!({"model": "kvgate-mock", "prompt": "A long story, please.", "max_tokens": 300, "ignore_eos": true, "stream": true});
    let mut r = c.post(format!("{base}/v1/completions")).json(&body).send().await.unwrap();
    let _ = r.chunk().await.unwrap();
    let id = s.worker_ids[0];
    s.kill_worker(id);
    let mut text = String::new();
    while let Some(chunk) = r.chunk().await.unwrap() {
        text.push_str(std::str::from_utf8(&chunk).unwrap());
    }
    let events = sse_events(&text);
    assert_eq!(events.last().unwrap(), "[DONE]");
    assert!(events.iter().any(|e| e.contains("\"error\"")), "{text}");
    // No worker left: 503.
    let r = c
        .post(format!("{base}/v1/completions"))
        .json(&json!({"model": "kvgate-mock", "prompt": "x"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
}

/// A load balancer must not send traffic to a frontend that knows no worker: `/health` is 503
/// until some model has one (a `kvgate frontend` starts with no model at all).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_is_503_until_a_model_has_a_worker() {
    use kvgate::frontend::{Frontend, HttpLimits};
    use kvgate::preprocess::{ModelSource, Preprocessor};
    use kvgate::router::{RouterConfig, RouterCost, RouterMode};

    let (index, _writer) = kvgate::kv::index::KvIndex::new();
    let cfg = RouterConfig {
        mode: RouterMode::Kv,
        cost: RouterCost::default(),
        overlap_weight: 1.0,
        temperature: 0.0,
        block_size: 16,
    };
    let limits = HttpLimits { max_body_bytes: 1 << 20, migration_limit: 0, disagg: Default::default() };
    let plane = kvgate::planes::request::InProcessRequestPlane::new();
    let fe = std::sync::Arc::new(Frontend::new(plane, index, cfg, limits, 1));
    let dp = kvgate::frontend::data::shards::DataPlane::start(
        fe.clone(),
        &kvgate::frontend::data::shards::Listen { max_connections: 16, ..Default::default() },
    )
    .unwrap();
    let url = format!("http://{}/health", dp.addr);
    let c = reqwest::Client::new();
    let health = |c: reqwest::Client, url: String| async move {
        let r = c.get(url).send().await.unwrap();
        (r.status().as_u16(), r.json::<Value>().await.unwrap())
    };

    let (status, v) = health(c.clone(), url.clone()).await;
    assert_eq!(status, 503, "no model, no worker: {v}");
    assert_eq!(v["status"], "unhealthy");

    let preprocessor = std::sync::Arc::new(Preprocessor::load(&ModelSource::parse(None)).unwrap());
    fe.add_model("m", preprocessor, 16);
    let (status, v) = health(c.clone(), url.clone()).await;
    assert_eq!(status, 503, "a model without a worker: {v}");

    let worker: kvgate::planes::discovery::WorkerInfo = serde_json::from_value(json!({
        "id": 7, "model": "m", "model_path": null, "role": "aggregated", "page_size": 16,
        "kv_capacity_blocks": 64, "max_num_seqs": 4, "max_num_batched_tokens": 256, "address": null
    }))
    .unwrap();
    fe.set_workers(&[worker]);
    let (status, v) = health(c, url).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["models"][0]["workers"].as_array().unwrap().len(), 1, "{v}");
}

/// Logs go to stderr, and carry no ANSI colour codes when stderr is not a terminal (a file, a
/// pipe, journald): `kvgate serve` run with its output piped, as a service manager runs it.
#[test]
fn logs_piped_to_a_file_have_no_colour_codes() {
    use std::io::{BufRead, Read};
    use std::process::{Command, Stdio};

    let mut child = Command::new(env!("CARGO_BIN_EXE_kvgate"))
        .args(["serve", "--http-host", "127.0.0.1", "--http-port", "0", "--speedup-ratio", "1000"])
        .env_remove("NO_COLOR")
        .env_remove("KVGATE_LOG")
        .env_remove("RUST_LOG")
        .env("DYN_LOG", "info")
        .env("HF_HUB_OFFLINE", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // The listening line comes after the start-up logs; then stop it and read what it wrote.
    let mut stdout = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut out = String::new();
    while !out.contains("kvgate listening on") {
        assert!(stdout.read_line(&mut out).unwrap() > 0, "kvgate serve exited before listening:\n{out}");
    }
    child.kill().unwrap();
    child.wait().unwrap();
    stdout.read_to_string(&mut out).unwrap();
    let mut err = String::new();
    child.stderr.take().unwrap().read_to_string(&mut err).unwrap();
    assert!(err.contains("kvgate serving"), "the start-up log is not on stderr:\n{err}\nstdout:\n{out}");
    assert!(!err.contains("\x1b["), "colour codes in piped logs:\n{err:?}");
    assert!(!out.contains("\x1b["), "colour codes on stdout:\n{out:?}");
}

/// An engine written outside the crate, only against the `Engine` trait, serves through
/// `kvgate serve`: requests reach it as token ids, its KV events route the repeat to it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_engine_from_outside_the_crate_serves_through_kvgate_serve() {
    let engine = |_: &kvgate::serve::WorkerSlot<'_>| Ok(echo_engine::EchoEngine { page_size: 16, capacity_blocks: 64 });
    let s = kvgate::serve::start_with(&serve_args(&["--workers", "2"]), engine).unwrap();
    let base = base_url(&s);
    let c = reqwest::Client::new();
    let prompt = "The quick brown fox jumps over the lazy dog, and back again.";
    let body = json!({"model": "kvgate-mock", "prompt": prompt, "max_tokens": 500});
    let mut workers = Vec::new();
    for turn in 0..2 {
        let r = c.post(format!("{base}/v1/completions")).json(&body).send().await.unwrap();
        assert_eq!(r.status(), 200);
        workers.push(r.headers()["x-kvgate-worker"].to_str().unwrap().to_string());
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["choices"][0]["text"], prompt, "the echo engine echoes the prompt");
        let cached = v["usage"]["prompt_tokens_details"]["cached_tokens"].as_u64().unwrap();
        let full = (v["usage"]["prompt_tokens"].as_u64().unwrap() / 16) * 16;
        assert_eq!(cached, if turn == 0 { 0 } else { full }, "turn {turn}");
        wait_for_index(&c, &base, full / 16).await;
    }
    assert_eq!(workers[0], workers[1], "the repeat goes where its blocks are");
}

/// A prompt no worker can hold is the client's fault: 400 at once, streaming or not, and no
/// other worker is tried.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prompt_longer_than_the_kv_cache_is_400_without_migration() {
    let s = serve(&args(&["--num-gpu-blocks", "4", "--migration-limit", "3"]));
    let base = base_url(&s);
    let c = reqwest::Client::new();
    let prompt = "word ".repeat(40);
    for stream in [false, true] {
        let body = json!({"model": "kvgate-mock", "prompt": prompt, "max_tokens": 4, "stream": stream});
        let r = c.post(format!("{base}/v1/completions")).json(&body).send().await.unwrap();
        assert_eq!(r.status(), 400, "stream={stream}");
        let v: Value = r.json().await.unwrap();
        assert_openai_error(&v);
        assert!(v["error"]["message"].as_str().unwrap().contains("KV cache"), "{v}");
    }
    assert_eq!(metric(&c, &base, "kvgate_migrations_total").await, 0.0);
}

/// When the only worker dies under a request, migration finds no worker left: 503, not 502.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_worker_left_after_a_failed_migration_is_503() {
    let mut s = serve(&["--speedup-ratio", "1", "--migration-limit", "2", "--workers", "1"]);
    let base = base_url(&s);
    let c = reqwest::Client::new();
    let body =
        json!({"model": "kvgate-mock", "prompt": "A long story, please.", "max_tokens": 300, "ignore_eos": true});
    let pending = tokio::spawn({
        let url = format!("{base}/v1/completions");
        let c = c.clone();
        async move { c.post(url).json(&body).send().await.unwrap() }
    });
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let id = s.worker_ids[0];
    s.kill_worker(id);
    let r = pending.await.unwrap();
    let status = r.status();
    let v: Value = r.json().await.unwrap();
    assert_eq!(status, 503, "{v}");
    assert_openai_error(&v);
    assert_eq!(v["error"]["type"], "service_unavailable", "{v}");
}

/// One request on an open connection: the status, the head, the body.
fn get_on(conn: &mut std::net::TcpStream, path: &str) -> (u16, String, String) {
    use std::io::{BufRead, Read, Write};
    write!(conn, "GET {path} HTTP/1.1\r\nHost: kvgate\r\n\r\n").unwrap();
    let mut r = std::io::BufReader::new(conn);
    let mut head = String::new();
    while !head.ends_with("\r\n\r\n") {
        assert!(r.read_line(&mut head).unwrap() > 0, "connection closed in the head: {head:?}");
    }
    let status = head[9..12].parse().unwrap();
    let len: usize = head
        .lines()
        .find_map(|l| l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().parse().unwrap()))
        .expect("content-length");
    let mut body = vec![0; len];
    r.read_exact(&mut body).unwrap();
    (status, head.to_ascii_lowercase(), String::from_utf8(body).unwrap())
}

/// `--max-connections`: past the bound a new connection is answered 503 (OpenAI's error shape,
/// `connection: close`) and closed; the connections already open keep working, and closing one
/// makes room for a new one.
#[test]
fn connections_past_the_bound_are_refused_without_harming_open_ones() {
    use std::io::Read;
    use std::net::TcpStream;
    use std::time::{Duration, Instant};

    let s = serve(&args(&["--shards", "1", "--max-connections", "3"]));
    let connect = || {
        let c = TcpStream::connect(s.addr).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        c
    };
    let mut open: Vec<TcpStream> = (0..3).map(|_| connect()).collect();
    for c in &mut open {
        assert_eq!(get_on(c, "/live").0, 200);
    }

    let mut extra = connect();
    let (status, head, body) = get_on(&mut extra, "/live");
    assert_eq!(status, 503, "{head}{body}");
    assert!(head.contains("connection: close"), "{head}");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_openai_error(&v);
    assert!(v["error"]["message"].as_str().unwrap().contains("--max-connections"), "{v}");
    let mut rest = Vec::new();
    assert_eq!(extra.read_to_end(&mut rest).unwrap(), 0, "the refused connection is closed");

    for c in &mut open {
        assert_eq!(get_on(c, "/live").0, 200, "an open connection was harmed");
    }
    // Closing one frees its slot (once the server has seen the close).
    drop(open.pop());
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (status, ..) = get_on(&mut connect(), "/live");
        if status == 200 {
            break;
        }
        assert!(Instant::now() < deadline, "a closed connection's slot was never freed");
        std::thread::sleep(Duration::from_millis(20));
    }
    for c in &mut open {
        assert_eq!(get_on(c, "/live").0, 200);
    }
}
