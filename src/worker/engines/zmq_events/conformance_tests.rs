//! Conformance against the engines' real publishers: `tests/engines/publisher_harness.py` runs
//! SGLang 0.5.23's and vLLM 0.34.0's own `ZmqEventPublisher` (loaded from their PyPI wheels)
//! through `tests/engines/workload.json`: stores (also off-GPU, bigram, other KV groups),
//! removals, clears, batches lost on the live stream (repaired by replay), a replay-window
//! overrun, and a publisher restart. At every checkpoint the block set the subscriber published
//! must equal the engine's, hashed by kvgate.
//!
//! Needs python3 (the test is skipped, saying so, without it) and PyPI: a venv is made under
//! `target/engine-venv` with msgspec, pyzmq, pydantic and psutil, and the two wheels are
//! downloaded (not installed) into `target/engine-wheels`.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;
use tokio::sync::mpsc;

use crate::contract::events::{EngineHash, KvEventKind};
use crate::kv::hash::{BlockHasher, SeqHash};

use super::subscriber::{event_channel, spawn, Counters, SubscriberConfig, Timeouts};

const PYTHON_PACKAGES: &[&str] = &["msgspec==0.23.0", "pyzmq==27.3.0", "pydantic>=2", "psutil"];
/// How long the subscriber may take to reach a checkpoint's state.
const CONVERGE: Duration = Duration::from_secs(30);

fn manifest_dir() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// The venv's python, made on first use; `None` (skip) when python3 is missing.
fn engine_python() -> Option<PathBuf> {
    static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());
    let _guard = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    if Command::new("python3").arg("--version").output().is_err() {
        eprintln!("skipping engine conformance: python3 not found (install python3 and python3-venv)");
        return None;
    }
    let venv = manifest_dir().join("target/engine-venv");
    let python = venv.join("bin/python");
    let ready = venv.join(".ready-1");
    if !ready.exists() {
        let ok = Command::new("python3").args(["-m", "venv"]).arg(&venv).status().is_ok_and(|s| s.success());
        assert!(ok, "python3 -m venv failed (Debian: apt-get install python3-venv)");
        let ok = Command::new(&python)
            .args(["-m", "pip", "install", "-q"])
            .args(PYTHON_PACKAGES)
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "pip install {PYTHON_PACKAGES:?} failed (PyPI must be reachable for this test)");
        std::fs::write(&ready, b"").unwrap();
    }
    Some(python)
}

/// The harness process; killed on drop.
struct Harness {
    child: Child,
    stdin: ChildStdin,
    lines: mpsc::Receiver<Value>,
}

impl Harness {
    fn start(python: &Path, engine: &str) -> Self {
        let dir = manifest_dir().join("tests/engines");
        let mut child = Command::new(python)
            .arg(dir.join("publisher_harness.py"))
            .args(["--engine", engine, "--workload"])
            .arg(dir.join("workload.json"))
            .arg("--wheel-dir")
            .arg(manifest_dir().join("target/engine-wheels"))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .env("PYTHONDONTWRITEBYTECODE", "1")
            .spawn()
            .expect("start the publisher harness");
        let stdin = child.stdin.take().expect("piped stdin");
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, lines) = mpsc::channel(16);
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("harness said {line:?}: {e}"));
                if tx.blocking_send(value).is_err() {
                    break;
                }
            }
        });
        Self { child, stdin, lines }
    }

    async fn next(&mut self) -> Value {
        // The first line waits for the wheel download.
        let line = tokio::time::timeout(Duration::from_secs(300), self.lines.recv()).await;
        line.expect("harness timed out").expect("harness exited (see its stderr above)")
    }

    fn say(&mut self, word: &str) {
        writeln!(self.stdin, "{word}").and_then(|_| self.stdin.flush()).expect("write to harness");
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The engine's blocks (`[{hash, parent, tokens}]`) as engine hash → kvgate sequence hash.
fn expected_state(blocks: &Value) -> HashMap<EngineHash, SeqHash> {
    let hasher = BlockHasher::new(16);
    let mut by_hash = HashMap::new();
    for b in blocks.as_array().expect("blocks") {
        let tokens: Vec<u32> = b["tokens"].as_array().unwrap().iter().map(|t| t.as_u64().unwrap() as u32).collect();
        by_hash.insert(b["hash"].as_u64().unwrap(), (b["parent"].as_u64(), tokens));
    }
    fn seq(h: u64, by_hash: &HashMap<u64, (Option<u64>, Vec<u32>)>, hasher: &BlockHasher) -> SeqHash {
        let (parent, tokens) = &by_hash[&h];
        let parent = parent.map(|p| seq(p, by_hash, hasher));
        BlockHasher::chain(parent, hasher.local_hash(tokens))
    }
    by_hash.keys().map(|&h| (EngineHash(h), seq(h, &by_hash, &hasher))).collect()
}

async fn converge(
    model: &Mutex<HashMap<EngineHash, SeqHash>>,
    want: &HashMap<EngineHash, SeqHash>,
    label: &str,
    counters: &Counters,
) {
    let deadline = tokio::time::Instant::now() + CONVERGE;
    loop {
        let got = model.lock().unwrap().clone();
        if &got == want {
            return;
        }
        if tokio::time::Instant::now() > deadline {
            let missing = want.keys().filter(|k| !got.contains_key(k)).count();
            let extra = got.keys().filter(|k| !want.contains_key(k)).count();
            panic!(
                "{label}: subscriber holds {} blocks, engine {} ({missing} missing, {extra} extra, {} differ)\ncounters: {:?}",
                got.len(),
                want.len(),
                want.iter().filter(|(k, v)| got.get(k).is_some_and(|g| g != *v)).count(),
                counters.snapshot()
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn conformance(engine: &str) {
    let Some(python) = engine_python() else { return };
    let mut harness = Harness::start(&python, engine);
    let ready = harness.next().await;
    assert_eq!(ready["event"], "ready", "{ready}");
    let mut config = SubscriberConfig::new(engine.to_owned(), ready["endpoint"].as_str().unwrap(), 16);
    config.replay_endpoint = ready["replay_endpoint"].as_str().map(str::to_owned);
    config.topic = "kv".into();
    config.rank = ready["rank"].as_u64().unwrap() as u32;
    config.timeouts =
        Timeouts { connect: Duration::from_secs(2), replay_reply: Duration::from_secs(2), ..Timeouts::default() };
    let counters = Arc::new(Counters::default());
    let (tx, mut rx) = event_channel();
    let subscriber = spawn(config, tx, counters.clone()).expect("block size 16 is valid");

    let model: Arc<Mutex<HashMap<EngineHash, SeqHash>>> = Arc::default();
    let applied = model.clone();
    let consumer = tokio::spawn(async move {
        while let Some(e) = rx.recv().await {
            let mut m = applied.lock().unwrap();
            match e.kind {
                KvEventKind::Stored { blocks, .. } => m.extend(blocks.iter().map(|b| (b.engine_hash, b.seq_hash))),
                KvEventKind::Removed { engine_hashes } => engine_hashes.iter().for_each(|h| {
                    m.remove(h);
                }),
                KvEventKind::Cleared => m.clear(),
            }
        }
    });

    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while counters.connects.load(Relaxed) == 0 {
        assert!(tokio::time::Instant::now() < deadline, "subscriber never connected: {:?}", counters.snapshot());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    harness.say("go");
    loop {
        let line = harness.next().await;
        match line["event"].as_str() {
            Some("sync") => {
                let label = format!("{engine} at {}", line["label"]);
                converge(&model, &expected_state(&line["blocks"]), &label, &counters).await;
                harness.say("ok");
            }
            Some("done") => {
                converge(&model, &expected_state(&line["blocks"]), &format!("{engine} at the end"), &counters).await;
                harness.say("exit");
                break;
            }
            _ => panic!("unexpected harness line {line}"),
        }
    }
    let c = |n: &str| counters.snapshot().into_iter().find(|(name, _)| *name == n).unwrap().1;
    eprintln!("{engine} conformance counters: {:?}", counters.snapshot());
    assert!(c("gaps") >= 2 && c("replays") >= 3, "the dropped batches were noticed and replayed");
    assert!(c("overruns") >= 1, "the replay window was overrun");
    assert!(c("restarts") >= 1, "the publisher restart was noticed");
    assert!(c("skipped_medium") >= 1, "the host-memory stores were skipped");
    if engine == "vllm" {
        assert!(c("skipped_group") >= 1, "the KV group 1 stores were skipped");
    }
    for n in
        ["malformed_messages", "malformed_payloads", "rank_mismatches", "dropped_block_size", "dropped_token_count"]
    {
        assert_eq!(c(n), 0, "{n}");
    }
    subscriber.stop().await;
    consumer.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sglang_0_5_23_publisher() {
    conformance("sglang").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vllm_0_34_0_publisher() {
    conformance("vllm").await;
}
