//! The Dynamo shape over stock-engine APIs: etcd + NATS + a `kvgate frontend` + one
//! `kvgate worker --engine sglang` next to each engine (two replicas, each a prefill and a decode
//! SGLang-shaped server: the faithful fakes of `tests/fake_engine`). The official OpenAI client
//! runs Dynamo's two-replica checks. And the start-up refusals, each one line that says what to
//! change: a wrong page size, a wrong role, an engine without events, an unreachable engine.

mod common;
#[path = "common/fake_engine.rs"]
mod fake_engine;
mod support;

use std::time::{Duration, Instant};

use fake_engine::FakeEngine;
use support::{kvgate_command, Etcd, FrontendProc, KvgateProc, Nats, WorkerProc};

const MODEL: &str = "Qwen/Qwen3-0.6B";

#[test]
fn two_replicas_of_sglang_prefill_and_decode_behind_etcd_and_nats() {
    let etcd = Etcd::start();
    let nats = Nats::start();
    let (etcd_url, nats_url) = (etcd.endpoint(), nats.url());
    let dir = common::qwen_dir();
    let dir = dir.to_str().unwrap().to_string();
    let sglang = |mode: &str| {
        let mut a = vec!["--engine", "sglang", "--skip-tokenizer-init", "--disaggregation-mode", mode];
        if mode == "prefill" {
            a.extend(["--disaggregation-bootstrap-port", "0"]);
        }
        FakeEngine::start(&a)
    };
    let engines: Vec<(&str, FakeEngine)> =
        (0..2).flat_map(|_| [("prefill", sglang("prefill")), ("decode", sglang("decode"))]).collect();
    let workers: Vec<KvgateProc> = engines
        .iter()
        .enumerate()
        .map(|(i, (mode, e))| {
            let mut args = vec!["worker", "--etcd-endpoints", &etcd_url, "--nats-server", &nats_url];
            args.extend(["--advertise-host", "127.0.0.1", "--lease-ttl", "2", "--engine", "sglang"]);
            args.extend(["--engine-url", &e.url, "--disaggregation-mode", mode]);
            args.extend(["--model-path", &dir, "--served-model-name", MODEL]);
            KvgateProc::spawn(format!("{mode} worker {i}"), kvgate_command(&args))
        })
        .collect();
    let mut args = vec!["frontend", "--http-host", "127.0.0.1", "--http-port", "0"];
    args.extend(["--etcd-endpoints", &etcd_url, "--nats-server", &nats_url, "--router-min-initial-workers", "4"]);
    let frontend = KvgateProc::spawn("frontend", kvgate_command(&args));
    let _workers: Vec<WorkerProc> = workers.into_iter().map(WorkerProc::ready).collect();
    let frontend = FrontendProc::ready(frontend);
    frontend.wait_workers(4, Duration::from_secs(15));

    let py = common::openai_venv_python();
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/python/dynamo_checks.py");
    let out = std::process::Command::new(py)
        .arg(script)
        .arg(format!("{}/v1", frontend.base))
        .arg(MODEL)
        .arg("disagg")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}\n{}", String::from_utf8_lossy(&out.stderr), frontend.proc.tail());
    assert!(stdout.trim_end().ends_with("ok"), "{stdout}");
}

/// Runs `kvgate serve` in front of `url` with `extra` flags; returns its output once it exited
/// (or, when it serves, once `until` shows up).
fn serve_output(url: &str, extra: &[&str], until: &str) -> (Option<bool>, String) {
    let dir = common::qwen_dir();
    let mut args = vec!["serve", "--http-host", "127.0.0.1", "--http-port", "0", "--engine", "sglang"];
    args.extend(["--model-path", dir.to_str().unwrap(), "--served-model-name", MODEL, "--engine-url", url]);
    args.extend(["--engine-ready-timeout-s", "2"]);
    args.extend_from_slice(extra);
    let mut p = KvgateProc::spawn("serve", kvgate_command(&args));
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        let out = p.output();
        if out.contains(until) {
            p.kill();
            return (None, out);
        }
        if let Some(ok) = p.exited() {
            return (Some(ok), p.output());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("kvgate serve neither exited nor printed {until:?}:\n{}", p.output());
}

#[test]
fn start_up_refusals_say_what_to_change() {
    let e = FakeEngine::start(&["--engine", "sglang", "--skip-tokenizer-init", "--page-size", "32"]);
    let (exited, out) = serve_output(&e.url, &[], "kvgate serving");
    assert_eq!(exited, Some(false), "{out}");
    assert!(
        out.contains("page size is 32, kvgate's is 16: start SGLang with --page-size 16 or kvgate with --page-size 32"),
        "{out}"
    );

    let e = FakeEngine::start(&["--engine", "sglang", "--skip-tokenizer-init", "--disaggregation-mode", "decode"]);
    let (exited, out) = serve_output(&e.url, &[], "kvgate serving");
    assert_eq!(exited, Some(false), "{out}");
    assert!(out.contains("disaggregation mode is decode, kvgate's is aggregated"), "{out}");

    let e = FakeEngine::start(&["--engine", "sglang", "--skip-tokenizer-init", "--kv-events", "off"]);
    let (exited, out) = serve_output(&e.url, &[], "kvgate serving");
    assert_eq!(exited, None, "it serves, approximately: {out}");
    assert!(out.contains("publishes no KV events: start it with --kv-events-config"), "{out}");

    let port = support::free_port();
    let (exited, out) = serve_output(&format!("http://127.0.0.1:{port}"), &[], "kvgate serving");
    assert_eq!(exited, Some(false), "{out}");
    assert!(out.contains("is it running, and is --engine-url right?"), "{out}");
}
