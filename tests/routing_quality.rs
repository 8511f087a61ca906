//! Routing decision quality (issue #16) end to end: `kvgate serve` over real HTTP, the overlap
//! regret in `/metrics` and the `--decision-log` lines after requests with a known shared
//! prefix; and `perf/oracle.py` on a hand-made workload with a known answer.

mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

/// `name`'s value in a Prometheus text page (exact series, labels included).
fn metric(page: &str, name: &str) -> Option<f64> {
    page.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

/// Sum of `kvgate_worker_cached_blocks` over workers.
fn cached_blocks(page: &str) -> Vec<u64> {
    page.lines()
        .filter(|l| l.starts_with("kvgate_worker_cached_blocks{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse().ok())
        .collect()
}

async fn metrics(c: &reqwest::Client, base: &str) -> String {
    c.get(format!("{base}/metrics")).send().await.unwrap().text().await.unwrap()
}

/// Waits until the KV index holds blocks matching `want` (sorted per-worker counts).
async fn wait_cached(c: &reqwest::Client, base: &str, want: &[u64]) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut got = cached_blocks(&metrics(c, base).await);
        got.sort_unstable();
        if got == want {
            return;
        }
        assert!(Instant::now() < deadline, "KV index never reached {want:?}: {got:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn complete(c: &reqwest::Client, base: &str, prompt: &[u32]) -> String {
    let body = json!({"model": "kvgate-mock", "prompt": prompt, "max_tokens": 1, "ignore_eos": true});
    let r = c.post(format!("{base}/v1/completions")).json(&body).send().await.unwrap();
    assert_eq!(r.status(), 200);
    r.headers()["x-kvgate-worker"].to_str().unwrap().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_robin_regret_in_metrics_and_decision_log() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("decisions.jsonl");
    let log_arg = log.to_str().unwrap();
    // Round-robin: the decisions are known whatever the caches hold.
    let s = serve(&[
        "--speedup-ratio",
        "1000",
        "--workers",
        "2",
        "--router-mode",
        "round-robin",
        "--decision-log",
        log_arg,
    ]);
    let base = base_url(&s);
    let c = reqwest::Client::new();
    let prefix: Vec<u32> = (1..=64).collect(); // 4 blocks of 16
    let mut longer = prefix.clone();
    longer.extend(100..116); // a 5th block

    // 1: nothing cached anywhere (regret 0); its worker then holds the 4 prefix blocks.
    let w1 = complete(&c, &base, &prefix).await;
    wait_cached(&c, &base, &[0, 4]).await;
    // 2: round-robin sends it to the other worker: best overlap 4, chosen 0, regret 4.
    let w2 = complete(&c, &base, &longer).await;
    assert_ne!(w1, w2);
    wait_cached(&c, &base, &[4, 5]).await;
    // 3: back to the first worker (overlap 4) while the second holds all 5 blocks: regret 1.
    let w3 = complete(&c, &base, &longer).await;
    assert_eq!(w3, w1);

    let page = metrics(&c, &base).await;
    let m = |name: &str| metric(&page, name).unwrap_or_else(|| panic!("{name} missing:\n{page}"));
    assert_eq!(m("kvgate_routing_overlap_regret_blocks_count"), 3.0);
    assert_eq!(m("kvgate_routing_overlap_regret_blocks_sum"), 5.0);
    assert_eq!(m("kvgate_routing_overlap_regret_blocks_bucket{le=\"0\"}"), 1.0);
    assert_eq!(m("kvgate_routing_overlap_regret_blocks_bucket{le=\"1\"}"), 2.0);
    assert_eq!(m("kvgate_routing_overlap_regret_blocks_bucket{le=\"2\"}"), 2.0);
    assert_eq!(m("kvgate_routing_overlap_regret_blocks_bucket{le=\"4\"}"), 3.0);
    assert_eq!(m("kvgate_routing_overlap_regret_blocks_bucket{le=\"+Inf\"}"), 3.0);
    assert_eq!(m("kvgate_routing_overlap_regret_blocks_total"), 5.0);
    assert_eq!(m("kvgate_routing_best_overlap_blocks_total"), 9.0);
    assert_eq!(m("kvgate_routing_chosen_overlap_blocks_total"), 4.0);
    assert_eq!(m("kvgate_routing_decision_log_dropped_total"), 0.0);

    // The decision log: one line per decision, flushed as the queue empties.
    let deadline = Instant::now() + Duration::from_secs(5);
    let lines: Vec<Value> = loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        let lines: Vec<Value> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        if lines.len() >= 3 || Instant::now() > deadline {
            break lines;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(lines.len(), 3, "{lines:?}");
    let summary: Vec<(u64, u64, u64)> = lines
        .iter()
        .map(|l| {
            let n = |k: &str| l[k].as_u64().unwrap();
            (n("best_overlap_blocks"), n("chosen_overlap_blocks"), n("regret_blocks"))
        })
        .collect();
    assert_eq!(summary, vec![(0, 0, 0), (4, 0, 4), (5, 4, 1)]);
    assert_eq!(lines[1]["chosen"], w2.as_str());
    assert_eq!(lines[1]["leg"], "whole");
    assert_eq!(lines[1]["prompt_tokens"], 80);
    let cands = lines[2]["candidates"].as_array().unwrap();
    assert_eq!(cands.len(), 2);
    let mut overlaps: Vec<u64> = cands.iter().map(|c| c["overlap_blocks"].as_u64().unwrap()).collect();
    overlaps.sort_unstable();
    assert_eq!(overlaps, vec![4, 5]);
    assert!(cands.iter().all(|c| c["active_requests"].as_u64() == Some(0) && c.get("cost").is_none()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kv_routing_follows_the_prefix_without_regret() {
    let s = serve(&["--speedup-ratio", "1000", "--workers", "2"]);
    let base = base_url(&s);
    let c = reqwest::Client::new();
    let prefix: Vec<u32> = (1..=64).collect();
    let w1 = complete(&c, &base, &prefix).await;
    wait_cached(&c, &base, &[0, 4]).await;
    let mut longer = prefix.clone();
    longer.extend(100..116);
    assert_eq!(complete(&c, &base, &longer).await, w1);
    let page = metrics(&c, &base).await;
    assert_eq!(metric(&page, "kvgate_routing_overlap_regret_blocks_count"), Some(2.0));
    assert_eq!(metric(&page, "kvgate_routing_overlap_regret_blocks_total"), Some(0.0));
    assert_eq!(metric(&page, "kvgate_routing_best_overlap_blocks_total"), Some(4.0));
    assert_eq!(metric(&page, "kvgate_routing_chosen_overlap_blocks_total"), Some(4.0));
}

#[test]
fn decision_log_in_a_missing_directory_is_a_start_up_error() {
    let args = serve_args(&["--decision-log", "/nonexistent-kvgate-dir/d.jsonl"]);
    let err = kvgate::serve::start(&args).err().expect("refused");
    assert!(err.to_string().contains("--decision-log /nonexistent-kvgate-dir/d.jsonl"), "{err}");
}

/// `perf/oracle.py` on `tests/fixtures/oracle_tiny.jsonl` (block size 4, 4 requests, 40 prompt
/// tokens): worked out by hand in the comments.
#[test]
fn oracle_tool_on_a_hand_made_workload() {
    let root = env!("CARGO_MANIFEST_DIR");
    let run = |extra: &[&str]| -> Value {
        let out = std::process::Command::new("python3")
            .arg(format!("{root}/perf/oracle.py"))
            .args(["--dump", &format!("{root}/tests/fixtures/oracle_tiny.jsonl"), "--block-size", "4"])
            .args(["--workers", "1,2", "--capacity-blocks", "3", "--json", "-"])
            .args(extra)
            .output()
            .expect("python3 runs");
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice(&out.stdout).unwrap()
    };
    // Requests (segment id × tokens): A = [1×8] (blocks A1 A2), B = [1×8, 2×4] (A1 A2 B1),
    // C = [3×8], then B again. A hit is at most (T − 1) / 4 blocks: 1 for 8 tokens, 2 for 12.
    // One infinite cache: B hits A1 A2 (8), the second B hits A1 A2 (8): 16 / 40.
    let v = run(&[]);
    assert_eq!(v["requests"], 4);
    assert_eq!(v["prompt_tokens"], 40);
    assert_eq!(v["infinite_cache"]["cached_tokens"], 16);
    // One worker of 3 blocks: C evicts B1 and A2 (A1, released last, is the newest), so the second B hits A1
    // only: 8 + 4 = 12. Pooled over 2 workers (6 blocks) nothing is evicted: 16.
    assert_eq!(v["greedy_lru"]["1"]["cached_tokens"], 12);
    assert_eq!(v["pooled_lru"]["1"]["cached_tokens"], 12);
    assert_eq!(v["pooled_lru"]["2"]["cached_tokens"], 16);
    // Greedy with balance 1.5 over 2 workers: A→w0, B must go to w1 (w0 would hold 2 > 1.5 × 1),
    // C→w0 (fewer prompt tokens), evicting A2 there; the second B finds 2 blocks on w1: 8.
    assert_eq!(v["greedy_lru"]["2"]["cached_tokens"], 8);
    assert_eq!(v["greedy_lru"]["2"]["requests_per_worker"], json!([2, 2]));
    // Without the cap greedy keeps A and both Bs on w0: 16, as the infinite cache.
    let v = run(&["--balance", "100"]);
    assert_eq!(v["greedy_lru"]["2"]["cached_tokens"], 16);
    assert_eq!(v["greedy_lru"]["2"]["requests_per_worker"], json!([3, 1]));
}
