//! The target deployment across processes: etcd + NATS + a frontend + two replicas, each a
//! prefill and a decode `kvgate worker`, the KV moving between them over TCP. The official
//! OpenAI client works; every response names both legs; the second turn of a conversation goes
//! to the prefill worker that holds the first; `kill -9` of a prefill worker, and of a decode
//! worker, under load leaves no request hung.

mod common;
mod support;

use std::time::{Duration, Instant};

use serde_json::{json, Value};
use support::{kvgate_command, Etcd, FrontendProc, KvgateProc, Nats, WorkerProc};

const LEASE_TTL: &str = "2";
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
const READY_TIMEOUT: Duration = Duration::from_secs(15);
const MODEL: &str = "Qwen/Qwen3-0.6B";

struct Cluster {
    frontend: FrontendProc,
    prefill: Vec<WorkerProc>,
    decode: Vec<WorkerProc>,
    _nats: Nats,
    _etcd: Etcd,
}

impl Cluster {
    /// Two prefill and two decode workers serving the Qwen3 tokenizer's model.
    fn start() -> Self {
        let etcd = Etcd::start();
        let nats = Nats::start();
        let (etcd_url, nats_url) = (etcd.endpoint(), nats.url());
        let dir = common::qwen_dir();
        let dir = dir.to_str().unwrap().to_string();
        let spawn = |mode: &str, i: usize| {
            let mut args = vec!["worker", "--etcd-endpoints", &etcd_url, "--nats-server", &nats_url];
            args.extend(["--advertise-host", "127.0.0.1", "--lease-ttl", LEASE_TTL, "--speedup-ratio", "20"]);
            args.extend(["--model-path", &dir, "--served-model-name", MODEL, "--disaggregation-mode", mode]);
            args.extend(["--disaggregation-transfer-backend", "tcp"]);
            KvgateProc::spawn(format!("{mode} worker {i}"), kvgate_command(&args))
        };
        let procs: Vec<(bool, KvgateProc)> =
            (0..2).flat_map(|i| [(true, spawn("prefill", i)), (false, spawn("decode", i))]).collect();
        let mut args = vec!["frontend", "--http-host", "127.0.0.1", "--http-port", "0"];
        args.extend(["--etcd-endpoints", &etcd_url, "--nats-server", &nats_url, "--router-min-initial-workers", "4"]);
        let mut cmd = kvgate_command(&args);
        cmd.env("DYN_LOG", "debug");
        let frontend = KvgateProc::spawn("frontend", cmd);
        let (mut prefill, mut decode) = (Vec::new(), Vec::new());
        for (is_prefill, p) in procs {
            let w = WorkerProc::ready(p);
            if is_prefill {
                prefill.push(w);
            } else {
                assert!(w.proc.output().contains("KV transfers for worker "), "{}", w.proc.output());
                decode.push(w);
            }
        }
        let frontend = FrontendProc::ready(frontend);
        frontend.wait_workers(4, READY_TIMEOUT);
        Self { frontend, prefill, decode, _nats: nats, _etcd: etcd }
    }

    fn base(&self) -> &str {
        &self.frontend.base
    }
}

fn http() -> reqwest::Client {
    reqwest::Client::builder().timeout(REQUEST_TIMEOUT).build().unwrap()
}

struct Reply {
    status: u16,
    prefill: String,
    decode: String,
    body: Value,
}

async fn chat(c: &reqwest::Client, base: &str, messages: &Value) -> Reply {
    let body = json!({"model": MODEL, "messages": messages, "max_tokens": 16, "ignore_eos": true});
    let r = c.post(format!("{base}/v1/chat/completions")).json(&body).send().await.unwrap();
    let h = |n: &str| r.headers().get(n).and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
    let (status, prefill, decode) = (r.status().as_u16(), h("x-kvgate-prefill-worker"), h("x-kvgate-decode-worker"));
    let body = r.json().await.unwrap();
    Reply { status, prefill, decode, body }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_disaggregated_across_processes() {
    let cluster = Cluster::start();
    let base = cluster.base().to_string();
    let c = http();
    let prefill_ids: Vec<&str> = cluster.prefill.iter().map(|w| w.id.as_str()).collect();
    let decode_ids: Vec<&str> = cluster.decode.iter().map(|w| w.id.as_str()).collect();

    // The official client, unchanged, with both legs named in its raw response headers.
    let py = common::openai_venv_python();
    let b = base.clone();
    tokio::task::spawn_blocking(move || common::run_openai_client(&py, &format!("{b}/v1"), MODEL, "disagg"))
        .await
        .unwrap();

    // Multi-turn: turn 2 goes to the prefill worker that computed (and holds) turn 1.
    for tag in ["north", "south", "east"] {
        let mut messages = json!([{"role": "system", "content": common::rail_system_prompt(tag)}, {"role": "user", "content": "When is the 8:15?"}]);
        let first = chat(&c, &base, &messages).await;
        assert_eq!(first.status, 200, "{}", first.body);
        assert!(prefill_ids.contains(&first.prefill.as_str()), "{} is not a prefill worker", first.prefill);
        assert!(decode_ids.contains(&first.decode.as_str()), "{} is not a decode worker", first.decode);
        // Let the prefill worker's KV events reach the frontend over NATS.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let answer = first.body["choices"][0]["message"]["content"].as_str().unwrap().to_string();
        let turns = messages.as_array_mut().unwrap();
        turns.push(json!({"role": "assistant", "content": answer}));
        turns.push(json!({"role": "user", "content": "And is the connection to the airport guaranteed tonight?"}));
        let second = chat(&c, &base, &messages).await;
        assert_eq!(second.status, 200, "{}", second.body);
        assert_eq!(second.prefill, first.prefill, "turn 2 of {tag} left the prefill worker of turn 1");
        let cached = second.body["usage"]["prompt_tokens_details"]["cached_tokens"].as_u64().unwrap();
        assert!(cached >= 48, "turn 2 found only {cached} tokens cached");
    }
    // Qwen3-0.6B: 114,688 bytes per token, whole 16-token pages.
    let blocks = common::metric(&c, &base, "kvgate_kv_transfer_blocks_total").await as u64;
    assert!(blocks > 0);
    assert_eq!(common::metric(&c, &base, "kvgate_kv_transfer_bytes_total").await as u64, blocks * 16 * 114_688);
    assert_eq!(common::metric(&c, &base, "kvgate_decode_prompt_tokens_computed_total").await, 0.0);
    assert!(cluster.frontend.proc.output().contains("leg=\"prefill\""), "no prefill routing line in the debug log");
}

/// Runs 24 streaming requests while `kill -9` hits one worker; all must end in time, each
/// completed or with a clear error.
async fn kill_under_load(victim_is_prefill: bool) {
    let mut cluster = Cluster::start();
    let base = cluster.base().to_string();
    let c = http();
    let mut tasks = Vec::new();
    for i in 0..24 {
        let (client, url) = (c.clone(), base.clone());
        tasks.push(tokio::spawn(async move {
            let prompt =
                format!("{} Request {i}: summarise the timetable rules.", common::rail_system_prompt(&i.to_string()));
            let body = json!({"model": MODEL, "prompt": prompt, "max_tokens": 48, "ignore_eos": true, "stream": true});
            let started = Instant::now();
            let r = client.post(format!("{url}/v1/completions")).json(&body).send().await.map_err(|e| e.to_string())?;
            let status = r.status().as_u16();
            let text = r.text().await.map_err(|e| format!("body cut: {e}"))?;
            Ok::<_, String>((status, text, started.elapsed()))
        }));
        if i == 8 {
            // The worker of the role with requests in flight now (the frontend's bookings in
            // /health), so that the kill lands on work, not between two short prefill legs.
            let role = if victim_is_prefill { "prefill" } else { "decode" };
            let id = busy_worker(&c, &base, role).await;
            let workers = if victim_is_prefill { &mut cluster.prefill } else { &mut cluster.decode };
            let victim = workers.iter_mut().find(|w| w.id == id).unwrap_or_else(|| panic!("no {role} worker {id}"));
            victim.proc.kill();
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let (mut ok, mut errors) = (0, Vec::new());
    for t in tasks {
        let (status, text, took) = t.await.unwrap().expect("no request may hang or be cut");
        assert!(took < REQUEST_TIMEOUT, "a request took {took:?}");
        if status != 200 {
            errors.push(format!("HTTP {status}: {text}"));
        } else if !text.trim_end().ends_with("data: [DONE]") {
            panic!("a stream ended without [DONE]: {text}");
        } else if text.contains("\"error\"") {
            errors.push(text);
        } else {
            ok += 1;
        }
    }
    // Every failure must be a clear, OpenAI-shaped error; with migration there should be none.
    for e in &errors {
        assert!(e.contains("\"message\""), "unclear error: {e}");
    }
    assert!(ok >= 22, "only {ok} of 24 completed: {errors:?}");
    // The kill was felt: streams moved, or dispatches found the worker unreachable.
    let migrations = common::metric(&c, &base, "kvgate_migrations_total").await;
    let log = cluster.frontend.proc.output();
    assert!(migrations > 0.0 || log.contains("unreachable"), "the killed worker never mattered:\n{log}");
}

/// The id of the `role` worker with the most requests booked by the frontend, once one has any
/// (the first of the role if none has within 5 s).
async fn busy_worker(c: &reqwest::Client, base: &str, role: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let health: Value = c.get(format!("{base}/health")).send().await.unwrap().json().await.unwrap();
        let workers: Vec<(String, u64)> = health["models"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|m| m["workers"].as_array().cloned().unwrap_or_default())
            .filter(|w| w["role"] == role)
            .map(|w| (w["id"].as_str().unwrap().to_string(), w["load"]["booked"]["requests"].as_u64().unwrap_or(0)))
            .collect();
        let busiest = workers.iter().max_by_key(|(_, n)| *n).cloned();
        match busiest {
            Some((id, n)) if n > 0 || Instant::now() > deadline => return id,
            _ => tokio::time::sleep(Duration::from_millis(1)).await,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_a_prefill_worker_under_load_hangs_nothing() {
    kill_under_load(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_a_decode_worker_under_load_hangs_nothing() {
    kill_under_load(false).await;
}
