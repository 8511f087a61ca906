//! Disaggregated serving in one process (`kvgate serve --prefill-workers 2 --decode-workers 2`):
//! both legs named in the headers, the KV moved over loopback TCP with the bytes the model's
//! size predicts, the decode worker computing no prompt, multi-turn prefix routing to the
//! prefill worker that holds the first turn, conditional and enforced disaggregation, and
//! workers dying under load without a hung request.

mod common;

use std::time::Duration;

use common::{base_url, serve, sse_events};
use serde_json::{json, Value};

/// The built-in model's KV bytes per token (sized like Qwen3-0.6B) and the page size.
const KV_BYTES_PER_TOKEN: u64 = 114_688;
const PAGE: u64 = 16;
const CLIENT_TIMEOUT: Duration = Duration::from_secs(30);

const DISAGG: &[&str] = &["--prefill-workers", "2", "--decode-workers", "2", "--speedup-ratio", "50"];
const DISAGG_SLOW: &[&str] = &["--prefill-workers", "2", "--decode-workers", "2", "--speedup-ratio", "10"];

fn client() -> reqwest::Client {
    reqwest::Client::builder().timeout(CLIENT_TIMEOUT).build().unwrap()
}

fn args(extra: &[&'static str]) -> Vec<&'static str> {
    let mut v = DISAGG.to_vec();
    v.extend_from_slice(extra);
    v
}

struct Reply {
    status: u16,
    headers: reqwest::header::HeaderMap,
    body: Value,
}

impl Reply {
    fn header(&self, name: &str) -> String {
        self.headers.get(name).and_then(|v| v.to_str().ok()).unwrap_or("").to_string()
    }
}

async fn chat(c: &reqwest::Client, base: &str, messages: &Value, max_tokens: u32) -> Reply {
    let body = json!({"model": "kvgate-mock", "messages": messages, "max_tokens": max_tokens, "ignore_eos": true});
    let r = c.post(format!("{base}/v1/chat/completions")).json(&body).send().await.unwrap();
    let status = r.status().as_u16();
    let headers = r.headers().clone();
    let body = r.json().await.unwrap();
    Reply { status, headers, body }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_legs_are_named_and_the_kv_bytes_match_the_model_size() {
    let s = serve(DISAGG);
    let base = base_url(&s);
    let c = client();
    let messages =
        json!([{"role": "system", "content": common::rail_system_prompt("bytes")}, {"role": "user", "content": "Hi"}]);
    let body = json!({"model": "kvgate-mock", "messages": messages, "max_tokens": 24, "ignore_eos": true,
        "stream": true, "stream_options": {"include_usage": true}});
    let r = c.post(format!("{base}/v1/chat/completions")).json(&body).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let h = |n: &str| r.headers().get(n).unwrap().to_str().unwrap().to_string();
    let (prefill, decode, disagg) = (h("x-kvgate-prefill-worker"), h("x-kvgate-decode-worker"), h("x-kvgate-disagg"));
    assert_eq!(disagg, "remote");
    assert_eq!(h("x-kvgate-worker"), decode);
    let role_of = |id: &str| {
        let i = s.worker_ids.iter().position(|w| w.to_string() == id).unwrap_or_else(|| panic!("unknown worker {id}"));
        s.worker_roles[i]
    };
    assert_eq!(role_of(&prefill), kvgate::contract::WorkerRole::Prefill);
    assert_eq!(role_of(&decode), kvgate::contract::WorkerRole::Decode);
    let text = r.text().await.unwrap();
    let events = sse_events(&text);
    assert_eq!(events.last().unwrap(), "[DONE]", "{text}");
    let usage: Value = serde_json::from_str(&events[events.len() - 2]).unwrap();
    assert_eq!(usage["usage"]["completion_tokens"], 24, "{text}");
    let prompt = usage["usage"]["prompt_tokens"].as_u64().unwrap();

    // One transfer of every prompt block, whole pages of the model's KV size.
    let blocks = prompt.div_ceil(PAGE);
    assert_eq!(common::metric(&c, &base, "kvgate_kv_transfers_total").await, 1.0);
    assert_eq!(common::metric(&c, &base, "kvgate_kv_transfer_blocks_total").await as u64, blocks);
    assert_eq!(
        common::metric(&c, &base, "kvgate_kv_transfer_bytes_total").await as u64,
        blocks * PAGE * KV_BYTES_PER_TOKEN
    );
    assert!(common::metric(&c, &base, "kvgate_kv_transfer_gbps").await > 0.0);
    // The prefill worker computed the prompt; the decode worker none of it.
    assert_eq!(common::metric(&c, &base, "kvgate_prefill_prompt_tokens_computed_total").await as u64, prompt);
    assert_eq!(common::metric(&c, &base, "kvgate_decode_prompt_tokens_computed_total").await, 0.0);
    assert_eq!(common::metric(&c, &base, "kvgate_disagg_remote_prefill_total").await, 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_second_turn_goes_to_the_prefill_worker_holding_the_first() {
    let s = serve(DISAGG);
    let base = base_url(&s);
    let c = client();
    for tag in ["north", "south", "east"] {
        let mut messages = json!([{"role": "system", "content": common::rail_system_prompt(tag)}, {"role": "user", "content": "When is the 8:15?"}]);
        let first = chat(&c, &base, &messages, 16).await;
        assert_eq!(first.status, 200, "{}", first.body);
        let p1 = first.header("x-kvgate-prefill-worker");
        // The prefill worker's KV events reach the index (the decode worker's too).
        tokio::time::sleep(Duration::from_millis(100)).await;
        let answer = first.body["choices"][0]["message"]["content"].as_str().unwrap().to_string();
        let turns = messages.as_array_mut().unwrap();
        turns.push(json!({"role": "assistant", "content": answer}));
        turns.push(json!({"role": "user", "content": "And is the connection to the airport guaranteed tonight?"}));
        let second = chat(&c, &base, &messages, 16).await;
        assert_eq!(second.status, 200, "{}", second.body);
        assert_eq!(second.header("x-kvgate-disagg"), "remote");
        assert_eq!(second.header("x-kvgate-prefill-worker"), p1, "turn 2 of {tag} left the prefill worker of turn 1");
        let cached = second.body["usage"]["prompt_tokens_details"]["cached_tokens"].as_u64().unwrap();
        let prompt1 = first.body["usage"]["prompt_tokens"].as_u64().unwrap();
        assert!(cached >= prompt1 / PAGE * PAGE - PAGE, "turn 2 found {cached} of turn 1's {prompt1} tokens cached");
    }
    assert_eq!(common::metric(&c, &base, "kvgate_decode_prompt_tokens_computed_total").await, 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conditional_disaggregation_prefills_short_uncached_prompts_on_the_decode_worker() {
    let s = serve(&args(&["--disagg-min-uncached-tokens", "100000"]));
    let base = base_url(&s);
    let c = client();
    let r = chat(&c, &base, &json!([{"role": "user", "content": "Short question?"}]), 8).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.header("x-kvgate-disagg"), "local");
    assert_eq!(r.header("x-kvgate-prefill-worker"), r.header("x-kvgate-decode-worker"));
    assert_eq!(common::metric(&c, &base, "kvgate_kv_transfers_total").await, 0.0);
    assert_eq!(common::metric(&c, &base, "kvgate_disagg_local_prefill_total").await, 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_prefill_workers_requests_fall_back_or_get_503_when_enforced() {
    for enforce in [false, true] {
        let mut s = serve(&if enforce { args(&["--enforce-disagg"]) } else { args(&[]) });
        let base = base_url(&s);
        let c = client();
        let msgs = json!([{"role": "user", "content": "Hello there"}]);
        assert_eq!(chat(&c, &base, &msgs, 4).await.header("x-kvgate-disagg"), "remote");
        let prefill: Vec<_> = s
            .worker_ids
            .iter()
            .zip(&s.worker_roles)
            .filter(|(_, r)| **r == kvgate::contract::WorkerRole::Prefill)
            .map(|(id, _)| *id)
            .collect();
        for id in prefill {
            s.kill_worker(id);
        }
        // Discovery publishes the change asynchronously.
        let mut last = None;
        for _ in 0..200 {
            let r = chat(&c, &base, &msgs, 4).await;
            if r.status != 200 || r.header("x-kvgate-disagg") == "local" {
                last = Some(r);
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let r = last.expect("routing never noticed the prefill workers were gone");
        if enforce {
            assert_eq!(r.status, 503, "{}", r.body);
            let msg = r.body["error"]["message"].as_str().unwrap();
            assert!(msg.contains("--enforce-disagg") && msg.contains("prefill"), "{msg}");
        } else {
            assert_eq!(r.status, 200, "{}", r.body);
            assert_eq!(r.header("x-kvgate-prefill-worker"), r.header("x-kvgate-decode-worker"));
        }
    }
}

/// Streams `n` requests, `concurrency` at a time, killing `victim` once `kill_after` have
/// started; every request must end (completed or a clear error) well within the timeout.
async fn load_with_a_kill(role: kvgate::contract::WorkerRole) {
    let mut s = serve(DISAGG_SLOW);
    let base = base_url(&s);
    let c = client();
    let victim =
        s.worker_ids.iter().zip(&s.worker_roles).find(|(_, r)| **r == role).map(|(id, _)| *id).expect("a victim");
    let mut tasks = Vec::new();
    for i in 0..24 {
        let (c, base) = (c.clone(), base.clone());
        tasks.push(tokio::spawn(async move {
            let prompt =
                format!("{} request {i}: tell me about the timetable.", common::rail_system_prompt(&i.to_string()));
            let body =
                json!({"model": "kvgate-mock", "prompt": prompt, "max_tokens": 64, "ignore_eos": true, "stream": true});
            let started = std::time::Instant::now();
            let r = c.post(format!("{base}/v1/completions")).json(&body).send().await.map_err(|e| e.to_string())?;
            let status = r.status().as_u16();
            let text = r.text().await.map_err(|e| format!("body cut: {e}"))?;
            Ok::<_, String>((status, text, started.elapsed()))
        }));
        if i == 8 {
            tokio::time::sleep(Duration::from_millis(50)).await;
            s.kill_worker(victim);
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let (mut ok, mut failed) = (0, 0);
    for t in tasks {
        let (status, text, took) = t.await.unwrap().expect("no request may hang or be cut");
        assert!(took < CLIENT_TIMEOUT, "a request took {took:?}");
        if status != 200 {
            failed += 1;
            continue;
        }
        let events = sse_events(&text);
        assert_eq!(events.last().map(String::as_str), Some("[DONE]"), "stream without [DONE]: {text}");
        if text.contains("\"error\"") {
            failed += 1;
        } else {
            ok += 1;
        }
    }
    // Migration re-sends the failed requests to the surviving workers.
    assert_eq!((ok, failed), (24, 0), "{ok} completed, {failed} failed after killing a {role:?} worker");
    let survivors = s.worker_ids.len();
    assert_eq!(survivors, 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_a_prefill_worker_under_load_loses_no_request() {
    load_with_a_kill(kvgate::contract::WorkerRole::Prefill).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_a_decode_worker_under_load_loses_no_request() {
    load_with_a_kill(kvgate::contract::WorkerRole::Decode).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_in_process_transfer_backend_moves_the_same_bytes() {
    let s = serve(&args(&["--disaggregation-transfer-backend", "in-process"]));
    let base = base_url(&s);
    let c = client();
    let messages =
        json!([{"role": "system", "content": common::rail_system_prompt("inproc")}, {"role": "user", "content": "Hi"}]);
    let r = chat(&c, &base, &messages, 8).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.header("x-kvgate-disagg"), "remote");
    let prompt = r.body["usage"]["prompt_tokens"].as_u64().unwrap();
    let bytes = common::metric(&c, &base, "kvgate_kv_transfer_bytes_total").await as u64;
    assert_eq!(bytes, prompt.div_ceil(PAGE) * PAGE * KV_BYTES_PER_TOKEN);
    assert_eq!(common::metric(&c, &base, "kvgate_decode_prompt_tokens_computed_total").await, 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blocks_the_decode_worker_holds_are_not_sent_again() {
    let s = serve(&["--prefill-workers", "1", "--decode-workers", "1", "--speedup-ratio", "50"]);
    let base = base_url(&s);
    let c = client();
    let ask = |q: &str| json!([{"role": "system", "content": common::rail_system_prompt("reuse")}, {"role": "user", "content": q}]);
    let first = chat(&c, &base, &ask("When is the 8:15?"), 8).await;
    let sent_first = common::metric(&c, &base, "kvgate_kv_transfer_blocks_total").await as u64;
    let prompt1 = first.body["usage"]["prompt_tokens"].as_u64().unwrap();
    assert_eq!(sent_first, prompt1.div_ceil(PAGE));
    // The decode worker's KV events (the imported blocks) reach the index.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let second = chat(&c, &base, &ask("And the 9:40?"), 8).await;
    assert_eq!(second.status, 200, "{}", second.body);
    assert_eq!(second.header("x-kvgate-disagg"), "remote");
    let prompt2 = second.body["usage"]["prompt_tokens"].as_u64().unwrap();
    let sent_second = common::metric(&c, &base, "kvgate_kv_transfer_blocks_total").await as u64 - sent_first;
    assert!(sent_second <= prompt2.div_ceil(PAGE) - 8, "sent {sent_second} blocks of a {prompt2}-token prompt");
    assert_eq!(common::metric(&c, &base, "kvgate_decode_prompt_tokens_computed_total").await, 0.0);
}
