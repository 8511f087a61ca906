//! kvgate in front of engines that publish no KV events, frontend-direct (`kvgate serve
//! --engine llama-cpp|openai --engine-url ... --engine-url ...`): the frontend predicts their
//! caches from what it routes (approximate mode).
//!
//! - `--engine openai` against the fake engine's vLLM `/v1/completions` (token-id prompts):
//!   ids from `return_token_ids`, and a text-only server (`--text-only`) whose text the adapter
//!   re-encodes.
//! - `--engine llama-cpp` against the fake engine's llama-server API (`--engine llama-cpp`:
//!   `/completion`, `/props`, `/slots`, `/metrics`, `/tokenize`; its cache is page-granular):
//!   the client checks, withheld token ids (llama-server's incomplete-UTF-8 chunks), a killed
//!   server mid-stream, engine-reported cache hits higher under `kv` routing than round-robin.
//! - Both frontend-direct and worker-side (etcd + NATS + `kvgate worker --engine openai|llama-cpp`).
//! - Two real `llama-server`s (`common::llama_server`: llama.cpp built from PyPI's sdist, a tiny
//!   random-weight model with Qwen3's vocabulary, 4 slots each, no host-memory prompt cache):
//!   the client checks under `--engine llama-cpp` and `--engine openai` (its `/v1/completions`,
//!   ids from `logprobs`); a conversation's second turn on the same server, which reports its
//!   own cache hit; the servers' own cache hits higher under `kv` routing than round-robin on a
//!   shared-prefix workload; a server killed mid-stream migrates the stream; the adapter's
//!   registration (`kv_events: false`, slots and capacity from `/props`) and its load from
//!   `/slots`, or `/metrics` when the server runs `--no-slots`; `kvgate worker --engine
//!   llama-cpp` next to each behind etcd and NATS.
//! - Both engines refuse disaggregation with a configuration error.

mod common;
#[path = "common/fake_engine.rs"]
mod fake_engine;
mod support;

use common::llama_server::LlamaServer;
use common::*;
use fake_engine::FakeEngine;
use serde_json::{json, Value};

const MODEL: &str = "Qwen/Qwen3-0.6B";

fn serve_engines(engine: &str, urls: &[String], extra: &[&str]) -> kvgate::serve::Server {
    let qwen = qwen_dir();
    let mut argv: Vec<String> = [
        "--engine",
        engine,
        "--model-path",
        qwen.to_str().unwrap(),
        "--served-model-name",
        MODEL,
        "--engine-ready-timeout-s",
        "60",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    for u in urls {
        argv.push("--engine-url".into());
        argv.push(u.clone());
    }
    argv.extend(extra.iter().map(|s| s.to_string()));
    let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
    let _ = tracing_subscriber::fmt()
        .with_env_filter(std::env::var("KVGATE_LOG").unwrap_or_else(|_| "warn".into()))
        .with_test_writer()
        .try_init();
    kvgate::serve::start(&serve_args(&argv)).expect("kvgate serve starts in front of the engines")
}

/// The three client checks of the Dynamo setup, with the official OpenAI client.
async fn checks(base: &str) {
    let py = openai_venv_python();
    let base = format!("{base}/v1");
    tokio::task::spawn_blocking(move || {
        let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/python/dynamo_checks.py");
        let out = std::process::Command::new(py).arg(script).arg(&base).arg(MODEL).arg("aggregated").output().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "dynamo checks failed\n{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
        assert!(stdout.trim_end().ends_with("ok"), "{stdout}");
    })
    .await
    .unwrap();
}

/// The fake's words (`fake_engine.py` `WORDS`, `gen_token`) for a prompt: what it generates.
fn fake_words(prompt: &[u64], n: usize) -> String {
    const WORDS: [&str; 13] =
        [" the", " cat", " sat", " on", " a", " mat", " and", " dog", " ran", " to", " park", " in", " sun"];
    let off = (prompt.iter().sum::<u64>() as usize + prompt.len()) % WORDS.len();
    (0..n).map(|i| WORDS[(off + i) % WORDS.len()]).collect()
}

/// The last `/v1/completions` body the fake received.
async fn last_completion(e: &FakeEngine) -> Value {
    let stats = e.get("/fake/stats").await;
    stats["last_requests"].as_array().unwrap().iter().rev().find(|r| r["path"] == "/v1/completions").unwrap()["body"]
        .clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openai_engine_takes_token_ids_from_return_token_ids() {
    let a = FakeEngine::start(&["--engine", "vllm", "--enable-prompt-tokens-details"]);
    let b = FakeEngine::start(&["--engine", "vllm", "--enable-prompt-tokens-details"]);
    let s = serve_engines("openai", &[a.url.clone(), b.url.clone()], &[]);
    checks(&base_url(&s)).await;
    let (c, base) = (reqwest::Client::new(), base_url(&s));
    for stream in [false, true] {
        let body = json!({"model": MODEL, "prompt": "Tell me about Lyon.", "max_tokens": 6, "ignore_eos": true, "stream": stream});
        let r = c.post(format!("{base}/v1/completions")).json(&body).send().await.unwrap();
        assert_eq!(r.status(), 200);
        let worker = r.headers()["x-kvgate-worker"].to_str().unwrap().to_string();
        let text = r.text().await.unwrap();
        assert!(!text.contains("\"error\""), "{text}");
        let e = if worker == s.worker_ids[0].to_string() { &a } else { &b };
        let sent = last_completion(e).await;
        assert!(sent["prompt"].is_array() && sent["return_token_ids"] == true, "{sent}");
        assert_eq!((sent["stream"].as_bool(), sent["max_tokens"].as_u64()), (Some(true), Some(6)), "{sent}");
        assert_eq!(sent["stream_options"]["include_usage"], true, "{sent}");
        let prompt: Vec<u64> = sent["prompt"].as_array().unwrap().iter().map(|t| t.as_u64().unwrap()).collect();
        let words = fake_words(&prompt, 6);
        if stream {
            let joined: String = text
                .lines()
                .filter_map(|l| l.strip_prefix("data: "))
                .filter_map(|d| serde_json::from_str::<Value>(d).ok())
                .filter_map(|v| v["choices"][0]["text"].as_str().map(str::to_string))
                .collect();
            assert_eq!(joined, words, "{text}");
        } else {
            let v: Value = serde_json::from_str(&text).unwrap();
            assert_eq!(v["choices"][0]["text"], words.as_str(), "{v}");
            assert_eq!(v["usage"]["completion_tokens"], 6, "{v}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openai_engine_re_encodes_a_text_only_server() {
    let a = FakeEngine::start(&["--engine", "vllm", "--enable-prompt-tokens-details", "--text-only"]);
    let b = FakeEngine::start(&["--engine", "vllm", "--enable-prompt-tokens-details", "--text-only"]);
    let s = serve_engines("openai", &[a.url.clone(), b.url.clone()], &[]);
    checks(&base_url(&s)).await;
    let (c, base) = (reqwest::Client::new(), base_url(&s));
    let body = json!({"model": MODEL, "prompt": "Tell me about Lyon.", "max_tokens": 7, "ignore_eos": true});
    let r = c.post(format!("{base}/v1/completions")).json(&body).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let worker = r.headers()["x-kvgate-worker"].to_str().unwrap().to_string();
    let v: Value = r.json().await.unwrap();
    let e = if worker == s.worker_ids[0].to_string() { &a } else { &b };
    let sent = last_completion(e).await;
    assert!(sent.get("logprobs").is_none() && sent.get("return_token_ids").is_none(), "{sent}");
    let prompt: Vec<u64> = sent["prompt"].as_array().unwrap().iter().map(|t| t.as_u64().unwrap()).collect();
    // The server's text, exactly; its words are single Qwen3 tokens, so the count is exact too.
    assert_eq!(v["choices"][0]["text"], fake_words(&prompt, 7).as_str(), "{v}");
    assert_eq!(v["usage"]["completion_tokens"], 7, "{v}");
    // A text-only server without the model's tokenizer is refused at start-up.
    let url = a.url.clone();
    let err = tokio::task::spawn_blocking(move || {
        let argv = ["--engine", "openai", "--engine-url", url.as_str(), "--engine-ready-timeout-s", "30"];
        kvgate::serve::start(&serve_args(&argv)).err().expect("refused without --model-path").to_string()
    })
    .await
    .unwrap();
    assert!(err.contains("--model-path"), "{err}");
}

/// A `kvgate worker --engine ENGINE` next to each engine of `urls`, behind etcd, NATS and a
/// `kvgate frontend`: the client checks.
fn workers_behind_etcd_and_nats(engine: &str, urls: &[String]) {
    use support::{kvgate_command, Etcd, FrontendProc, KvgateProc, Nats, WorkerProc};
    let (etcd, nats) = (Etcd::start(), Nats::start());
    let (etcd_url, nats_url) = (etcd.endpoint(), nats.url());
    let dir = qwen_dir();
    let dir = dir.to_str().unwrap().to_string();
    let workers: Vec<KvgateProc> = urls
        .iter()
        .enumerate()
        .map(|(i, url)| {
            let mut args = vec!["worker", "--etcd-endpoints", &etcd_url, "--nats-server", &nats_url];
            args.extend(["--advertise-host", "127.0.0.1", "--lease-ttl", "2", "--engine", engine]);
            args.extend(["--engine-url", url, "--model-path", &dir, "--served-model-name", MODEL]);
            KvgateProc::spawn(format!("{engine} worker {i}"), kvgate_command(&args))
        })
        .collect();
    let mut args = vec!["frontend", "--http-host", "127.0.0.1", "--http-port", "0"];
    args.extend(["--etcd-endpoints", &etcd_url, "--nats-server", &nats_url, "--router-min-initial-workers", "2"]);
    let frontend = KvgateProc::spawn("frontend", kvgate_command(&args));
    let _workers: Vec<WorkerProc> = workers.into_iter().map(WorkerProc::ready).collect();
    let frontend = FrontendProc::ready(frontend);
    frontend.wait_workers(urls.len(), std::time::Duration::from_secs(15));
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    rt.block_on(checks(&frontend.base));
}

fn urls_of(engines: &[FakeEngine]) -> Vec<String> {
    engines.iter().map(|e| e.url.clone()).collect()
}

#[test]
fn openai_workers_behind_etcd_and_nats() {
    let engines: Vec<FakeEngine> =
        (0..2).map(|_| FakeEngine::start(&["--engine", "vllm", "--enable-prompt-tokens-details"])).collect();
    workers_behind_etcd_and_nats("openai", &urls_of(&engines));
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    for e in &engines {
        let body = rt.block_on(last_completion(e));
        assert!(body["prompt"].is_array() && body["return_token_ids"] == true, "{body}");
    }
}

#[test]
fn llama_cpp_workers_behind_etcd_and_nats() {
    let engines: Vec<FakeEngine> = (0..2).map(|_| FakeEngine::start(&["--engine", "llama-cpp", "--metrics"])).collect();
    workers_behind_etcd_and_nats("llama-cpp", &urls_of(&engines));
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    for e in &engines {
        let body = rt.block_on(last_llama_completion(e));
        assert!(body["prompt"].is_array() && body["cache_prompt"] == true, "{body}");
    }
}

#[test]
fn engines_without_kv_events_refuse_disaggregation() {
    use support::{kvgate_command, KvgateProc};
    for engine in ["llama-cpp", "openai"] {
        let args =
            ["worker", "--engine", engine, "--engine-url", "http://127.0.0.1:9", "--disaggregation-mode", "prefill"];
        let mut p = KvgateProc::spawn(format!("{engine} worker"), kvgate_command(&args));
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        let ok = loop {
            if let Some(ok) = p.exited() {
                break ok;
            }
            assert!(std::time::Instant::now() < deadline, "{}", p.output());
            std::thread::sleep(std::time::Duration::from_millis(50));
        };
        let out = p.output();
        assert!(!ok, "{out}");
        assert!(
            out.contains("--disaggregation-mode") && out.contains("does not support disaggregated serving"),
            "{out}"
        );
    }
}

/// The last `/completion` body the fake llama-server received.
async fn last_llama_completion(e: &FakeEngine) -> Value {
    let stats = e.get("/fake/stats").await;
    stats["last_requests"].as_array().unwrap().iter().rev().find(|r| r["path"] == "/completion").unwrap()["body"]
        .clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn llama_cpp_fake_passes_the_client_checks() {
    let a = FakeEngine::start(&["--engine", "llama-cpp", "--metrics"]);
    let b = FakeEngine::start(&["--engine", "llama-cpp", "--no-slots", "--metrics"]);
    let s = serve_engines("llama-cpp", &[a.url.clone(), b.url.clone()], &[]);
    checks(&base_url(&s)).await;
    let body = last_llama_completion(&a).await;
    assert!(body["prompt"].is_array(), "{body}");
    for key in ["cache_prompt", "return_tokens", "stream", "timings_per_token"] {
        assert_eq!(body[key], true, "{key}: {body}");
    }
    assert!(body["n_predict"].as_u64().is_some() && body.get("max_tokens").is_none(), "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn llama_cpp_withheld_token_ids_are_re_encoded_from_the_text() {
    let e = FakeEngine::start(&["--engine", "llama-cpp", "--withhold-every", "3"]);
    let s = serve_engines("llama-cpp", std::slice::from_ref(&e.url), &[]);
    let (c, base) = (reqwest::Client::new(), base_url(&s));
    for stream in [false, true] {
        let body = json!({"model": MODEL, "prompt": "Tell me about Lyon.", "max_tokens": 10, "ignore_eos": true, "stream": stream, "stream_options": {"include_usage": true}});
        let r = c.post(format!("{base}/v1/completions")).json(&body).send().await.unwrap();
        assert_eq!(r.status(), 200);
        let text = r.text().await.unwrap();
        let sent = last_llama_completion(&e).await;
        let prompt: Vec<u64> = sent["prompt"].as_array().unwrap().iter().map(|t| t.as_u64().unwrap()).collect();
        let (out, usage) = if stream {
            let chunks: Vec<Value> = text
                .lines()
                .filter_map(|l| l.strip_prefix("data: "))
                .filter_map(|d| serde_json::from_str(d).ok())
                .collect();
            let out: String = chunks.iter().filter_map(|v| v["choices"][0]["text"].as_str()).collect();
            (out, chunks.iter().rev().find(|v| v["usage"].is_object()).unwrap()["usage"].clone())
        } else {
            let v: Value = serde_json::from_str(&text).unwrap();
            (v["choices"][0]["text"].as_str().unwrap().to_string(), v["usage"].clone())
        };
        assert_eq!(out, fake_words(&prompt, 10), "{text}");
        assert_eq!(usage["completion_tokens"], 10, "{text}");
    }
    assert!(e.get("/fake/stats").await["counters"]["withheld_tokens"].as_u64().unwrap() >= 6);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn llama_cpp_fake_killed_mid_stream_migrates() {
    let mut a = FakeEngine::start(&["--engine", "llama-cpp", "--itl-ms", "20"]);
    let b = FakeEngine::start(&["--engine", "llama-cpp", "--itl-ms", "20"]);
    let s = serve_engines("llama-cpp", &[a.url.clone(), b.url.clone()], &[]);
    let (c, base) = (reqwest::Client::new(), base_url(&s));
    let body = json!({"model": MODEL, "prompt": "A long story, please.", "max_tokens": 60, "ignore_eos": true, "stream": true});
    let mut r = c.post(format!("{base}/v1/completions")).json(&body).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let first = r.headers()["x-kvgate-worker"].to_str().unwrap().to_string();
    let mut text = String::new();
    while text.matches("data: ").count() < 5 {
        text.push_str(std::str::from_utf8(&r.chunk().await.unwrap().unwrap()).unwrap());
    }
    if first == s.worker_ids[0].to_string() {
        a.kill();
    } else {
        drop(b);
    }
    while let Some(chunk) = r.chunk().await.unwrap() {
        text.push_str(std::str::from_utf8(&chunk).unwrap());
    }
    assert!(!text.contains("\"error\""), "{text}");
    assert!(text.contains("\"finish_reason\":\"length\""), "{text}");
    assert_eq!(metric(&c, &base, "kvgate_migrations_total").await, 1.0);
}

/// `llamacpp:prompt_tokens_cached_total` of a server's `/metrics` (`--metrics`).
async fn engine_cached_tokens(url: &str) -> f64 {
    let text = reqwest::get(format!("{url}/metrics")).await.unwrap().text().await.unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix("llamacpp:prompt_tokens_cached_total ")?.trim().parse().ok())
        .unwrap_or(0.0)
}

/// A shared-prefix workload through kvgate: `groups` system prompts, `rounds` questions each,
/// interleaved (group 0, 1, ..., then the next round), one at a time. Returns the prompt tokens
/// the engines themselves report as cached (their `/metrics`), summed.
async fn shared_prefix_hits(base: &str, engines: &[String], groups: usize, rounds: usize) -> f64 {
    let c = reqwest::Client::new();
    let before: f64 = futures::future::join_all(engines.iter().map(|u| engine_cached_tokens(u))).await.iter().sum();
    for round in 0..rounds {
        for g in 0..groups {
            let messages = json!([
                {"role": "system", "content": rail_system_prompt(&format!("group {g}"))},
                {"role": "user", "content": format!("Question {round} of group {g}: which platform for Lyon?")},
            ]);
            let body = json!({"model": MODEL, "messages": messages, "max_tokens": 2});
            let r = c.post(format!("{base}/v1/chat/completions")).json(&body).send().await.unwrap();
            assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
        }
    }
    let after: f64 = futures::future::join_all(engines.iter().map(|u| engine_cached_tokens(u))).await.iter().sum();
    after - before
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn llama_cpp_fake_cache_hits_are_higher_under_kv_routing_than_round_robin() {
    let mut hits = Vec::new();
    for mode in ["kv", "round-robin"] {
        let engines: Vec<FakeEngine> =
            (0..2).map(|_| FakeEngine::start(&["--engine", "llama-cpp", "--metrics"])).collect();
        let urls: Vec<String> = engines.iter().map(|e| e.url.clone()).collect();
        let s = serve_engines("llama-cpp", &urls, &["--router-mode", mode]);
        hits.push(shared_prefix_hits(&base_url(&s), &urls, 5, 4).await);
    }
    assert!(hits[0] > hits[1], "engine-reported cached prompt tokens: kv {} vs round-robin {}", hits[0], hits[1]);
}

/// Two real llama-servers of 4 slots each (started off the async runtime: they block).
async fn real_servers() -> Vec<LlamaServer> {
    tokio::task::spawn_blocking(|| (0..2).map(|_| LlamaServer::start(4, &[])).collect()).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_llama_servers_pass_the_client_checks_and_keep_a_conversation_on_its_cache() {
    let servers = real_servers().await;
    let urls: Vec<String> = servers.iter().map(|l| l.url.clone()).collect();
    let s = serve_engines("llama-cpp", &urls, &[]);
    checks(&base_url(&s)).await;

    // A conversation: the second turn goes to the server of the first, which reports its own hit.
    let (c, base) = (reqwest::Client::new(), base_url(&s));
    let mut messages = vec![
        json!({"role": "system", "content": rail_system_prompt("conversation")}),
        json!({"role": "user", "content": "When is the first train to Geneva?"}),
    ];
    let ask = |messages: Vec<Value>| {
        let (c, base) = (c.clone(), base.clone());
        async move {
            let body = json!({"model": MODEL, "messages": messages, "max_tokens": 8});
            let r = c.post(format!("{base}/v1/chat/completions")).json(&body).send().await.unwrap();
            assert_eq!(r.status(), 200);
            let worker = r.headers()["x-kvgate-worker"].to_str().unwrap().to_string();
            (worker, r.json::<Value>().await.unwrap())
        }
    };
    let (w1, first) = ask(messages.clone()).await;
    let engine = &urls[s.worker_ids.iter().position(|w| w.to_string() == w1).unwrap()];
    let before = engine_cached_tokens(engine).await;
    messages.push(json!({"role": "assistant", "content": first["choices"][0]["message"]["content"]}));
    messages.push(json!({"role": "user", "content": "And the last one back?"}));
    let (w2, second) = ask(messages).await;
    assert_eq!(w1, w2, "the second turn moved to another server");
    let cached = second["usage"]["prompt_tokens_details"]["cached_tokens"].as_u64().unwrap();
    assert!(cached > 0, "{second}");
    // The server's own counter moved by what kvgate reported (its timings.cache_n).
    assert_eq!(engine_cached_tokens(engine).await - before, cached as f64, "{second}");
    // No request failed over: streams never reuse a connection the server closed.
    assert_eq!(metric(&c, &base, "kvgate_migrations_total").await, 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_llama_servers_behind_the_openai_engine() {
    let servers = real_servers().await;
    let urls: Vec<String> = servers.iter().map(|l| l.url.clone()).collect();
    let s = serve_engines("openai", &urls, &[]);
    checks(&base_url(&s)).await;
    assert_eq!(metric(&reqwest::Client::new(), &base_url(&s), "kvgate_migrations_total").await, 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_llama_servers_hit_their_caches_more_under_kv_routing_than_round_robin() {
    let mut hits = Vec::new();
    for mode in ["kv", "round-robin"] {
        let servers = real_servers().await;
        let urls: Vec<String> = servers.iter().map(|l| l.url.clone()).collect();
        let s = serve_engines("llama-cpp", &urls, &["--router-mode", mode]);
        hits.push(shared_prefix_hits(&base_url(&s), &urls, 5, 4).await);
    }
    eprintln!("engine-reported cached prompt tokens: kv {}, round-robin {}", hits[0], hits[1]);
    assert!(hits[0] > hits[1], "engine-reported cached prompt tokens: kv {} vs round-robin {}", hits[0], hits[1]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_llama_server_killed_mid_stream_migrates_the_stream() {
    let mut servers = real_servers().await;
    let urls: Vec<String> = servers.iter().map(|l| l.url.clone()).collect();
    let s = serve_engines("llama-cpp", &urls, &[]);
    let (c, base) = (reqwest::Client::new(), base_url(&s));
    let body = json!({"model": MODEL, "prompt": "A long story, please.", "max_tokens": 1500, "ignore_eos": true, "stream": true});
    let mut r = c.post(format!("{base}/v1/completions")).json(&body).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let first = r.headers()["x-kvgate-worker"].to_str().unwrap().to_string();
    let mut text = String::new();
    while text.matches("data: ").count() < 5 {
        text.push_str(std::str::from_utf8(&r.chunk().await.unwrap().unwrap()).unwrap());
    }
    let victim = s.worker_ids.iter().position(|w| w.to_string() == first).unwrap();
    servers[victim].kill();
    while let Some(chunk) = r.chunk().await.unwrap() {
        text.push_str(&String::from_utf8_lossy(&chunk));
    }
    assert!(!text.contains("\"error\""), "{}", &text[text.len().saturating_sub(2000)..]);
    assert!(text.contains("\"finish_reason\":\"length\""), "{}", &text[text.len().saturating_sub(2000)..]);
    assert_eq!(metric(&c, &base, "kvgate_migrations_total").await, 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_llama_server_registers_without_events_and_reports_its_load() {
    use kvgate::worker::engines::{http::AdapterOptions, http::Dialect, llama_cpp};
    let servers = tokio::task::spawn_blocking(|| [LlamaServer::start(2, &[]), LlamaServer::start(2, &["--no-slots"])])
        .await
        .unwrap();
    for server in &servers {
        let opts = AdapterOptions {
            url: server.url.clone(),
            role: kvgate::contract::WorkerRole::Aggregated,
            page_size: 16,
            served_model_name: MODEL.into(),
            ready_timeout: std::time::Duration::from_secs(30),
            timeout: std::time::Duration::from_secs(30),
            kv_events_endpoint: None,
            replay_endpoint: None,
        };
        let adapter = llama_cpp::connect(&opts, None).await.unwrap();
        assert!(!adapter.card.kv_events && adapter.events.is_none());
        assert_eq!(adapter.card.max_num_seqs, 2);
        assert_eq!(adapter.card.kv_capacity_blocks, 2 * common::llama_server::CTX_PER_SLOT as u64 / 16);
        let idle = adapter.dialect.load(&adapter.client).await.expect("a load from /slots or /metrics");
        assert_eq!(idle.running_requests, 0, "{idle:?}");
        // A long stream keeps one slot busy.
        let body = json!({"prompt": [3838, 374, 279, 6722], "n_predict": 1900, "ignore_eos": true, "stream": true});
        let mut r = adapter.client.post(format!("{}/completion", server.url)).json(&body).send().await.unwrap();
        r.chunk().await.unwrap().unwrap();
        let busy = adapter.dialect.load(&adapter.client).await.unwrap();
        assert_eq!(busy.running_requests, 1, "{busy:?}");
        drop(r);
    }
}

#[test]
fn real_llama_servers_behind_etcd_and_nats() {
    let servers: Vec<LlamaServer> = (0..2).map(|_| LlamaServer::start(4, &[])).collect();
    workers_behind_etcd_and_nats("llama-cpp", &servers.iter().map(|l| l.url.clone()).collect::<Vec<_>>());
}
