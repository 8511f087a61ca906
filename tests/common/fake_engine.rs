//! Faithful fake SGLang and vLLM servers (`tests/fake_engine/fake_engine.py`) as test processes:
#![allow(dead_code)]
//! their HTTP APIs and ZMQ KV-event wire are the engines' own (checked against the released
//! wheels); only the model is missing. Killed (SIGKILL) and reaped on drop.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// One running fake engine.
pub struct FakeEngine {
    child: Child,
    /// `http://127.0.0.1:PORT`.
    pub url: String,
    /// What it printed when ready (ports).
    pub ready: Value,
}

impl FakeEngine {
    /// Starts `fake_engine.py` with `args` and waits for its `READY {...}` line.
    pub fn start(args: &[&str]) -> Self {
        let py = crate::common::openai_venv_python();
        let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fake_engine/fake_engine.py");
        let mut child = Command::new(py)
            .arg(script)
            .args(["--host", "127.0.0.1", "--port", "0", "--served-model-name", "Qwen/Qwen3-0.6B"])
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("python3 runs the fake engine");
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(json) = line.strip_prefix("READY ") {
                    let _ = tx.send(json.to_string());
                }
            }
        });
        let json = rx.recv_timeout(Duration::from_secs(60)).expect("the fake engine printed READY");
        let ready: Value = serde_json::from_str(&json).unwrap();
        let url = format!("http://127.0.0.1:{}", ready["port"]);
        Self { child, url, ready }
    }

    /// `--engine-url` as `kvgate serve` takes it, with a role prefix.
    pub fn arg(&self, role: &str) -> String {
        format!("{role}={}", self.url)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// GET a `/fake/...` or engine path as JSON.
    pub async fn get(&self, path: &str) -> Value {
        reqwest::get(format!("{}{path}", self.url)).await.unwrap().json().await.unwrap()
    }

    /// POST a `/fake/...` control.
    pub async fn post(&self, path: &str, body: Value) {
        let r = reqwest::Client::new().post(format!("{}{path}", self.url)).json(&body).send().await.unwrap();
        assert!(r.status().is_success(), "{path}: {}", r.status());
    }

    /// The blocks the engine caches (its truth), as the count of cached pages.
    pub async fn cached_blocks(&self) -> usize {
        self.get("/fake/cache").await["blocks"].as_array().map_or(0, Vec::len)
    }

    /// Kills it at once, as a crash would.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for FakeEngine {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Whether `check` came to hold within `limit` (polled every 50 ms).
pub async fn eventually<F, Fut>(limit: Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + limit;
    loop {
        if check().await {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
