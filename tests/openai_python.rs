//! The official OpenAI Python client, unchanged, against the `kvgate` binary with the Qwen3
//! tokenizer. Set-up: a virtual environment under the target directory with `openai` from PyPI
//! (created once, reused by later runs).

mod common;

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

struct KillOnDrop(Child);
impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
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
    let py = common::openai_venv_python();
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
    common::run_openai_client(&py, &format!("http://127.0.0.1:{port}/v1"), "Qwen/Qwen3-0.6B", mode);
}

#[test]
fn official_openai_python_client_works_unchanged() {
    run_client(&[], "aggregated");
}

#[test]
fn official_openai_python_client_works_against_disaggregated_serving() {
    run_client(&["--prefill-workers", "2", "--decode-workers", "2"], "disagg");
}
