//! kvgate in front of stock-engine APIs, frontend-direct (`kvgate serve --engine sglang|vllm
//! --engine-url ...`: no etcd, no NATS): faithful fake SGLang and vLLM servers that speak the
//! engines' HTTP APIs and publish their real ZMQ/msgpack KV events. Checks the Dynamo
//! two-replica client checks, exact KV routing (the index equals each engine's cache), both
//! disaggregation styles, a killed engine, a restarted event publisher and a stuck engine.

mod common;
#[path = "common/fake_engine.rs"]
mod fake_engine;

use std::time::Duration;

use common::*;
use fake_engine::{eventually, FakeEngine};
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
        "30",
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

/// Blocks kvgate's index holds for `worker` (from `/metrics`).
async fn index_blocks(c: &reqwest::Client, base: &str, worker: kvgate::contract::WorkerId) -> usize {
    let text = c.get(format!("{base}/metrics")).send().await.unwrap().text().await.unwrap();
    let label = format!("worker=\"{worker}\"");
    text.lines()
        .filter(|l| l.starts_with("kvgate_worker_cached_blocks{") && l.contains(&label))
        .find_map(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or(0)
}

/// kvgate's index agrees with every engine's own cache.
async fn index_is_exact(s: &kvgate::serve::Server, engines: &[&FakeEngine]) {
    let (c, base) = (reqwest::Client::new(), base_url(s));
    for (e, &id) in engines.iter().zip(&s.worker_ids) {
        let last = std::sync::Mutex::new((0, 0));
        let agree = eventually(Duration::from_secs(10), || async {
            let now = (index_blocks(&c, &base, id).await, e.cached_blocks().await);
            *last.lock().unwrap() = now;
            now.0 == now.1 && now.1 > 0
        })
        .await;
        let (ours, theirs) = *last.lock().unwrap();
        assert!(agree, "the index never matched the engine's cache: {ours} blocks indexed, {theirs} cached");
    }
}

async fn checks(base: &str, mode: &'static str) {
    let py = openai_venv_python();
    let base = format!("{base}/v1");
    tokio::task::spawn_blocking(move || {
        let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/python/dynamo_checks.py");
        let out = std::process::Command::new(py).arg(script).arg(&base).arg(MODEL).arg(mode).output().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "dynamo checks failed\n{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
        assert!(stdout.trim_end().ends_with("ok"), "{stdout}");
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sglang_aggregated_routes_exactly_from_the_engines_events() {
    let a = FakeEngine::start(&["--engine", "sglang", "--skip-tokenizer-init"]);
    let b = FakeEngine::start(&["--engine", "sglang", "--skip-tokenizer-init", "--incremental-streaming-output"]);
    let s = serve_engines("sglang", &[a.url.clone(), b.url.clone()], &[]);
    checks(&base_url(&s), "aggregated").await;
    index_is_exact(&s, &[&a, &b]).await;
    // SGLang's own names went to the engine, never OpenAI's.
    let stats = a.get("/fake/stats").await;
    let body =
        &stats["last_requests"].as_array().unwrap().iter().rev().find(|r| r["path"] == "/generate").unwrap()["body"];
    assert!(
        body["sampling_params"].get("max_new_tokens").is_some() && body["sampling_params"].get("max_tokens").is_none(),
        "{body}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sglang_disaggregated_pairs_share_a_bootstrap_room() {
    let p: Vec<FakeEngine> = (0..2)
        .map(|_| {
            FakeEngine::start(&[
                "--engine",
                "sglang",
                "--skip-tokenizer-init",
                "--disaggregation-mode",
                "prefill",
                "--disaggregation-bootstrap-port",
                "0",
            ])
        })
        .collect();
    let d: Vec<FakeEngine> = (0..2)
        .map(|_| FakeEngine::start(&["--engine", "sglang", "--skip-tokenizer-init", "--disaggregation-mode", "decode"]))
        .collect();
    let urls = vec![p[0].arg("prefill"), p[1].arg("prefill"), d[0].arg("decode"), d[1].arg("decode")];
    let s = serve_engines("sglang", &urls, &[]);
    checks(&base_url(&s), "disagg").await;
    index_is_exact(&s, &[&p[0], &p[1]]).await;
    let legs = |st: &Value, k: &str| st["counters"][k].as_u64().or_else(|| st[k].as_u64()).unwrap_or(0);
    let (pst, dst) = (p[0].get("/fake/stats").await, d[0].get("/fake/stats").await);
    assert!(legs(&pst, "prefill_legs") > 0 && legs(&dst, "decode_legs") > 0, "{pst}\n{dst}");
    assert_eq!(legs(&dst, "refused_legs"), 0, "{dst}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vllm_disaggregated_legs_run_in_sequence_with_the_handoff() {
    let p = FakeEngine::start(&[
        "--engine",
        "vllm",
        "--kv-role",
        "kv_producer",
        "--enable-scale-out",
        "--enable-prompt-tokens-details",
    ]);
    let d = FakeEngine::start(&[
        "--engine",
        "vllm",
        "--kv-role",
        "kv_consumer",
        "--enable-scale-out",
        "--enable-prompt-tokens-details",
    ]);
    let s = serve_engines("vllm", &[p.arg("prefill"), d.arg("decode")], &[]);
    let (c, base) = (reqwest::Client::new(), base_url(&s));
    for stream in [false, true] {
        let messages = json!([{"role": "system", "content": rail_system_prompt("vllm")}, {"role": "user", "content": "Tell me about Lyon."}]);
        let body = json!({"model": MODEL, "messages": messages, "max_tokens": 8, "stream": stream});
        let r = c.post(format!("{base}/v1/chat/completions")).json(&body).send().await.unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()["x-kvgate-disagg"], "remote");
        let text = r.text().await.unwrap();
        assert!(!text.contains("\"error\""), "{text}");
    }
    let dst = d.get("/fake/stats").await;
    let reqs = dst["last_requests"].as_array().unwrap();
    let decode = reqs.iter().rev().find(|r| r["path"] == "/inference/v1/generate").unwrap();
    assert_eq!(decode["body"]["kv_transfer_params"]["do_remote_prefill"], true, "{decode}");
    index_is_exact(&s, &[&p]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_engine_mid_stream_migrates_the_stream() {
    let mut a = FakeEngine::start(&["--engine", "sglang", "--skip-tokenizer-init", "--itl-ms", "20"]);
    let b = FakeEngine::start(&["--engine", "sglang", "--skip-tokenizer-init", "--itl-ms", "20"]);
    let s = serve_engines("sglang", &[a.url.clone(), b.url.clone()], &[]);
    let (c, base) = (reqwest::Client::new(), base_url(&s));
    let body = json!({"model": MODEL, "prompt": "A long story, please.", "max_tokens": 60, "ignore_eos": true, "stream": true});
    let mut r = c.post(format!("{base}/v1/completions")).json(&body).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let first = r.headers()["x-kvgate-worker"].to_str().unwrap().to_string();
    let victim_is_a = first == s.worker_ids[0].to_string();
    let mut text = String::new();
    while text.matches("data: ").count() < 5 {
        text.push_str(std::str::from_utf8(&r.chunk().await.unwrap().unwrap()).unwrap());
    }
    if victim_is_a {
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_or_lossy_publisher_is_recovered() {
    let e = FakeEngine::start(&["--engine", "sglang", "--skip-tokenizer-init"]);
    let s = serve_engines("sglang", std::slice::from_ref(&e.url), &[]);
    let (c, base) = (reqwest::Client::new(), base_url(&s));
    let ask = |i: usize| {
        let c = c.clone();
        let base = base.clone();
        async move {
            let prompt = format!("{} request {i}", rail_system_prompt(&format!("lane {}", i % 3)));
            let body = json!({"model": MODEL, "prompt": prompt, "max_tokens": 4});
            assert_eq!(c.post(format!("{base}/v1/completions")).json(&body).send().await.unwrap().status(), 200);
        }
    };
    for i in 0..3 {
        ask(i).await;
    }
    index_is_exact(&s, &[&e]).await;
    // Lost batches: a gap, repaired by replay.
    e.post("/fake/drop_events", json!({"n": 2})).await;
    for i in 3..7 {
        ask(i).await;
    }
    index_is_exact(&s, &[&e]).await;
    // A publisher restart (its sequence back to 0) with the cache cleared meanwhile.
    e.post("/fake/clear", json!({})).await;
    e.post("/fake/restart_publisher", json!({})).await;
    for i in 7..10 {
        ask(i).await;
    }
    index_is_exact(&s, &[&e]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_engine_that_stops_answering_fails_over_within_the_timeout() {
    let a = FakeEngine::start(&["--engine", "sglang", "--skip-tokenizer-init"]);
    let b = FakeEngine::start(&["--engine", "sglang", "--skip-tokenizer-init"]);
    let s = serve_engines("sglang", &[a.url.clone(), b.url.clone()], &["--engine-timeout-s", "2"]);
    let (c, base) = (reqwest::Client::new(), base_url(&s));
    a.post("/fake/hang", json!({"seconds": 30})).await;
    b.post("/fake/hang", json!({"seconds": 30})).await;
    // Both stuck: a clear answer within the bound (two attempts of 2 s), not a hang; with both
    // workers failed, none is left (503), and the message says why.
    let t = std::time::Instant::now();
    let body = json!({"model": MODEL, "prompt": "Hello there", "max_tokens": 4});
    let r = c.post(format!("{base}/v1/completions")).json(&body).send().await.unwrap();
    let status = r.status();
    let v: Value = r.json().await.unwrap();
    assert_eq!(status, 503, "{v}");
    assert!(v["error"]["message"].as_str().unwrap().contains("did not answer within"), "{v}");
    assert!(t.elapsed() < Duration::from_secs(15), "{:?}", t.elapsed());
}
