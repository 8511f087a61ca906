//! The official OpenAI Python client, unchanged, against the `kvgate` binary with the Qwen3
//! tokenizer. Set-up: a virtual environment under the target directory with `openai` from PyPI
//! (created once, reused by later runs).

mod common;

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

struct KillOnDrop(Child);
impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn venv_python() -> PathBuf {
    let venv = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("openai-venv");
    let py = venv.join("bin/python");
    let ready = venv.join(".ready");
    if !ready.exists() {
        let ok = Command::new("python3").args(["-m", "venv"]).arg(&venv).status().map(|s| s.success()).unwrap_or(false);
        assert!(ok, "python3 -m venv failed (Debian: apt-get install python3-venv)");
        let ok = Command::new(&py)
            .args(["-m", "pip", "install", "-q", "openai>=1.40"])
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        assert!(ok, "pip install openai failed (PyPI must be reachable for this test)");
        std::fs::write(&ready, b"").unwrap();
    }
    py
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn wait_live(port: u16) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("kvgate did not start listening on {port}");
}

/// Runs the client script against `kvgate serve` started with `extra` arguments.
fn run_client(extra: &[&str], mode: &str) {
    let py = venv_python();
    let dir = common::qwen_dir();
    let port = free_port();
    let _server = KillOnDrop(
        Command::new(env!("CARGO_BIN_EXE_kvgate"))
            .args(["serve", "--http-host", "127.0.0.1", "--http-port", &port.to_string(), "--speedup-ratio", "100"])
            .args(["--model-path", dir.to_str().unwrap(), "--served-model-name", "Qwen/Qwen3-0.6B"])
            .args(extra)
            .stdout(Stdio::null())
            .spawn()
            .expect("kvgate binary starts"),
    );
    wait_live(port);
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/python/openai_client.py");
    let out = Command::new(py)
        .arg(script)
        .arg(format!("http://127.0.0.1:{port}/v1"))
        .arg("Qwen/Qwen3-0.6B")
        .arg(mode)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "python client failed\nstdout:\n{stdout}\nstderr:\n{stderr}");
    assert!(stdout.trim_end().ends_with("ok"), "{stdout}");
}

#[test]
fn official_openai_python_client_works_unchanged() {
    run_client(&[], "aggregated");
}

#[test]
fn official_openai_python_client_works_against_disaggregated_serving() {
    run_client(&["--prefill-workers", "2", "--decode-workers", "2"], "disagg");
}
