//! Real etcd, nats-server and `kvgate` processes for the multi-process tests.
//!
//! Invariant: each server listens only on ports picked free at start (on loopback, or on the
//! address a test gives, such as a veth inside a network namespace), keeps its state in its own
//! temporary directory, and is killed (and reaped) in Drop, so no test leaks a process. A restart
//! reuses the same ports and data directory. The binaries come from the Debian packages
//! `etcd-server` and `nats-server`; `.ci/run` installs them when missing.
//!
//! [`KvgateProc`] runs the `kvgate` binary Cargo built for the tests; two reader threads per
//! process keep its output (bounded by [`MAX_CAPTURE_BYTES`]) so a test can wait for a line such
//! as the worker's `kvgate worker <id> serving ...`, and a failing test prints each process's
//! output tail when it unwinds (and its whole output into `$KVGATE_TEST_LOG_DIR`, if set).

#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How long a server may take to become ready after (re)start.
const READY_TIMEOUT: Duration = Duration::from_secs(20);

/// The path of `name`, or a panic that says how to install it.
pub fn require_binary(name: &str, package: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let dirs = std::env::split_paths(&path).chain(["/usr/sbin".into(), "/usr/bin".into()]);
    for dir in dirs {
        let p = dir.join(name);
        if p.is_file() {
            return p;
        }
    }
    panic!(
        "`{name}` not found: these tests start a real {name}. Run `bash .ci/run` (it installs what \
         is missing) or `sudo apt-get install etcd-server nats-server` (package `{package}`), \
         then rerun."
    );
}

/// A loopback port that was free a moment ago.
pub fn free_port() -> u16 {
    free_ports::<1>()[0]
}

/// `N` distinct loopback ports that were free a moment ago (held together while picked, so
/// they differ).
pub fn free_ports<const N: usize>() -> [u16; N] {
    free_ports_on("127.0.0.1")
}

/// `N` distinct ports free on `host` a moment ago.
pub fn free_ports_on<const N: usize>(host: &str) -> [u16; N] {
    let held: Vec<TcpListener> = (0..N).map(|_| TcpListener::bind((host, 0)).unwrap()).collect();
    std::array::from_fn(|i| held[i].local_addr().unwrap().port())
}

fn tail(log: &Path) -> String {
    let bytes = std::fs::read(log).unwrap_or_default();
    String::from_utf8_lossy(&bytes[bytes.len().saturating_sub(2000)..]).into_owned()
}

/// Polls `ready` until it holds, failing with the server's log if it exits or times out.
fn wait_ready(child: &mut Child, what: &str, log: &Path, mut ready: impl FnMut() -> bool) {
    let deadline = Instant::now() + READY_TIMEOUT;
    while !ready() {
        if let Ok(Some(status)) = child.try_wait() {
            panic!("{what} exited ({status}) while starting; its log:\n{}", tail(log));
        }
        assert!(Instant::now() < deadline, "{what} not ready after {READY_TIMEOUT:?}; its log:\n{}", tail(log));
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// One HTTP/1.0 GET; the response text (status line, headers, body), or None.
pub fn http_get(host: &str, port: u16, path: &str) -> Option<String> {
    let mut s = TcpStream::connect((host, port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(1))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {host}\r\n\r\n").ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    Some(out)
}

fn spawn(bin: &Path, args: &[String], log: &Path) -> Child {
    let out = std::fs::OpenOptions::new().create(true).append(true).open(log).unwrap();
    Command::new(bin)
        .args(args)
        .stdin(Stdio::null())
        .stdout(out.try_clone().unwrap())
        .stderr(out)
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {}: {e}", bin.display()))
}

fn kill(child: &mut Option<Child>) {
    if let Some(mut c) = child.take() {
        let _ = c.kill();
        let _ = c.wait();
    }
}

/// A single-member etcd cluster on loopback (or on the address given to [`Etcd::start_on`]).
pub struct Etcd {
    bin: PathBuf,
    dir: tempfile::TempDir,
    host: String,
    pub client_port: u16,
    peer_port: u16,
    child: Option<Child>,
}

impl Etcd {
    pub fn start() -> Self {
        Self::start_on("127.0.0.1")
    }

    /// Listens on `host` (an address of this host, in the calling thread's network namespace).
    pub fn start_on(host: &str) -> Self {
        let bin = require_binary("etcd", "etcd-server");
        let dir = tempfile::tempdir().unwrap();
        let [client_port, peer_port] = free_ports_on(host);
        let host = host.to_string();
        let mut etcd = Self { bin, dir, host, client_port, peer_port, child: None };
        etcd.launch();
        etcd
    }

    pub fn endpoint(&self) -> String {
        format!("http://{}:{}", self.host, self.client_port)
    }

    fn launch(&mut self) {
        let (client, peer) = (self.endpoint(), format!("http://{}:{}", self.host, self.peer_port));
        let args = [
            "--name=kvgate-test".to_string(),
            format!("--data-dir={}", self.dir.path().join("data").display()),
            format!("--listen-client-urls={client}"),
            format!("--advertise-client-urls={client}"),
            format!("--listen-peer-urls={peer}"),
            format!("--initial-advertise-peer-urls={peer}"),
            format!("--initial-cluster=kvgate-test={peer}"),
        ];
        let log = self.dir.path().join("etcd.log");
        let mut child = spawn(&self.bin, &args, &log);
        let (host, port) = (self.host.clone(), self.client_port);
        wait_ready(&mut child, "etcd", &log, || {
            http_get(&host, port, "/health").is_some_and(|r| r.contains("\"health\":\"true\""))
        });
        self.child = Some(child);
    }

    /// SIGKILL: no graceful shutdown, as a crash.
    pub fn kill(&mut self) {
        kill(&mut self.child);
    }

    /// Starts again on the same ports and data directory.
    pub fn restart(&mut self) {
        self.kill();
        self.launch();
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A nats-server on loopback (or on the address given to [`Nats::start_on`]).
pub struct Nats {
    bin: PathBuf,
    dir: tempfile::TempDir,
    host: String,
    pub port: u16,
    /// A configuration file (`-c`), e.g. users and their permissions.
    config: Option<PathBuf>,
    child: Option<Child>,
}

impl Nats {
    pub fn start() -> Self {
        Self::start_on("127.0.0.1")
    }

    /// Listens on `host` (an address of this host, in the calling thread's network namespace).
    pub fn start_on(host: &str) -> Self {
        let bin = require_binary("nats-server", "nats-server");
        let [port] = free_ports_on(host);
        let dir = tempfile::tempdir().unwrap();
        let mut nats = Self { bin, dir, host: host.to_string(), port, config: None, child: None };
        nats.launch();
        nats
    }

    /// Listens on 127.0.0.1 with `config` (nats-server's configuration syntax) as its file.
    pub fn start_with_config(config: &str) -> Self {
        let bin = require_binary("nats-server", "nats-server");
        let [port] = free_ports_on("127.0.0.1");
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nats.conf");
        std::fs::write(&path, config).unwrap();
        let mut nats = Self { bin, dir, host: "127.0.0.1".into(), port, config: Some(path), child: None };
        nats.launch();
        nats
    }

    pub fn url(&self) -> String {
        format!("nats://{}:{}", self.host, self.port)
    }

    fn launch(&mut self) {
        let mut args = vec!["-a".to_string(), self.host.clone(), "-p".into(), self.port.to_string()];
        if let Some(c) = &self.config {
            args.extend(["-c".to_string(), c.display().to_string()]);
        }
        let log = self.dir.path().join("nats.log");
        let mut child = spawn(&self.bin, &args, &log);
        let (host, port) = (self.host.clone(), self.port);
        wait_ready(&mut child, "nats-server", &log, || {
            let Ok(mut s) = TcpStream::connect((host.as_str(), port)) else {
                return false;
            };
            let _ = s.set_read_timeout(Some(Duration::from_secs(1)));
            let mut buf = [0u8; 4];
            s.read_exact(&mut buf).is_ok() && &buf == b"INFO"
        });
        self.child = Some(child);
    }

    pub fn kill(&mut self) {
        kill(&mut self.child);
    }

    pub fn restart(&mut self) {
        self.kill();
        self.launch();
    }
}

impl Drop for Nats {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Waits (up to `timeout`) until the watch channel's value satisfies `pred`; returns it.
pub async fn wait_for<T: Clone>(
    rx: &mut tokio::sync::watch::Receiver<T>,
    timeout: Duration,
    what: &str,
    pred: impl Fn(&T) -> bool,
) -> T {
    match tokio::time::timeout(timeout, rx.wait_for(|v| pred(v))).await {
        Ok(Ok(v)) => v.clone(),
        Ok(Err(_)) => panic!("{what}: watch channel closed"),
        Err(_) => panic!("{what}: not within {timeout:?}"),
    }
}

/// kvgate's logs in the test output (shown for failing tests): `RUST_LOG` or `kvgate=info`.
pub fn init_logs() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("kvgate=info"));
    let _ = tracing_subscriber::fmt().with_env_filter(filter).with_test_writer().try_init();
}

/// The `kvgate` binary Cargo built for these tests.
pub const KVGATE_BIN: &str = env!("CARGO_BIN_EXE_kvgate");
/// Output kept per `kvgate` process: a test's processes log a few lines per request, far below
/// this; past it, later output is dropped (the lines tests wait for come at start-up).
pub const MAX_CAPTURE_BYTES: usize = 4 << 20;
/// How long a `kvgate` process may take to print its ready line: loading the Qwen3 tokenizer
/// in a debug build takes seconds, and several processes load it at once on a small machine.
pub const KVGATE_READY_TIMEOUT: Duration = Duration::from_secs(90);
/// Time a SIGTERM'd process gets to drain before it is killed.
const TERM_GRACE: Duration = Duration::from_secs(10);

/// A `kvgate <subcommand>` command: the test binary, hermetic environment (no inherited
/// etcd/NATS/namespace/port settings, no Hugging Face downloads), `DYN_LOG=info`.
pub fn kvgate_command(args: &[&str]) -> Command {
    let mut cmd = Command::new(KVGATE_BIN);
    cmd.args(args);
    hermetic_env(&mut cmd);
    cmd
}

/// Clears the variables `kvgate` reads, so only the test's flags configure it.
pub fn hermetic_env(cmd: &mut Command) {
    for var in [
        "ETCD_ENDPOINTS",
        "NATS_SERVER",
        "DYN_NAMESPACE",
        "KVGATE_HTTP_HOST",
        "KVGATE_HTTP_PORT",
        "KVGATE_LOG",
        "RUST_LOG",
        "OTEL_EXPORTER_OTLP_ENDPOINT",
        "OTEL_SERVICE_NAME",
    ] {
        cmd.env_remove(var);
    }
    cmd.env("DYN_LOG", "info").env("HF_HUB_OFFLINE", "1").env("NO_COLOR", "1");
}

/// Captured output of one process: text, and whether both streams reached EOF.
#[derive(Default)]
struct Capture {
    text: String,
    open_streams: u8,
}

/// A running `kvgate` process (or any process, such as `ip netns exec ... kvgate`), its output
/// captured; SIGKILL'd and reaped in Drop.
pub struct KvgateProc {
    what: String,
    child: Option<Child>,
    out: Arc<(Mutex<Capture>, Condvar)>,
    readers: Vec<JoinHandle<()>>,
}

impl KvgateProc {
    /// Starts `cmd` with stdout and stderr captured; `what` names it in messages.
    pub fn spawn(what: impl Into<String>, mut cmd: Command) -> Self {
        let what = what.into();
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {what}: {e}"));
        let out = Arc::new((Mutex::new(Capture { text: String::new(), open_streams: 2 }), Condvar::new()));
        let stdout: Box<dyn Read + Send> = Box::new(child.stdout.take().unwrap());
        let stderr: Box<dyn Read + Send> = Box::new(child.stderr.take().unwrap());
        let readers = [stdout, stderr]
            .into_iter()
            .map(|stream| {
                let out = out.clone();
                std::thread::spawn(move || {
                    for line in BufReader::new(stream).lines() {
                        let Ok(line) = line else { break };
                        let mut cap = out.0.lock().unwrap();
                        if cap.text.len() + line.len() < MAX_CAPTURE_BYTES {
                            cap.text.push_str(&line);
                            cap.text.push('\n');
                        }
                        out.1.notify_all();
                    }
                    out.0.lock().unwrap().open_streams -= 1;
                    out.1.notify_all();
                })
            })
            .collect();
        Self { what, child: Some(child), out, readers }
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().expect("process running").id() as i32
    }

    /// Everything it printed so far.
    pub fn output(&self) -> String {
        self.out.0.lock().unwrap().text.clone()
    }

    /// What to show when a test fails: its last lines above DEBUG (start-up, warnings,
    /// reconnections), then its last lines of any level.
    pub fn tail(&self) -> String {
        let text = self.output();
        let last = |lines: Vec<&str>, n: usize| lines[lines.len().saturating_sub(n)..].join("\n");
        let important = text.lines().filter(|l| !l.contains(" DEBUG ") && !l.contains(" TRACE ")).collect();
        format!("{}\n[...] last lines:\n{}", last(important, 60), last(text.lines().collect(), 8))
    }

    /// Waits for a line that starts with `prefix` and returns it; panics with the output if the
    /// process exits first or `timeout` passes.
    pub fn wait_line(&self, prefix: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        let (lock, cv) = &*self.out;
        let mut cap = lock.lock().unwrap();
        loop {
            if let Some(line) = cap.text.lines().find(|l| l.starts_with(prefix)) {
                return line.to_string();
            }
            let now = Instant::now();
            assert!(
                cap.open_streams > 0 && now < deadline,
                "{}: no line starting with {prefix:?} ({}); its output:\n{}",
                self.what,
                if cap.open_streams == 0 { "it exited" } else { "timed out" },
                cap.text
            );
            cap = cv.wait_timeout(cap, deadline - now).unwrap().0;
        }
    }

    /// `Some(success)` once the process has exited by itself (its output fully read).
    pub fn exited(&mut self) -> Option<bool> {
        let status = self.child.as_mut()?.try_wait().ok()??;
        let (lock, cv) = &*self.out;
        let mut cap = lock.lock().unwrap();
        while cap.open_streams > 0 {
            cap = cv.wait(cap).unwrap();
        }
        Some(status.success())
    }

    /// `kill -9`: no shutdown, as a crash. Reaps it.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM, then waits for the process to exit (killing it after [`TERM_GRACE`]).
    /// Returns whether it exited by itself.
    pub fn terminate(&mut self) -> bool {
        let Some(mut c) = self.child.take() else {
            return true;
        };
        // SAFETY: kill(2) on the pid of a child this struct has not reaped yet.
        unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + TERM_GRACE;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = c.try_wait() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = c.kill();
        let _ = c.wait();
        false
    }
}

impl Drop for KvgateProc {
    fn drop(&mut self) {
        self.kill();
        for r in self.readers.drain(..) {
            let _ = r.join();
        }
        if std::thread::panicking() {
            // The whole output, when the tail is not enough: KVGATE_TEST_LOG_DIR=/tmp/x.
            if let Some(dir) = std::env::var_os("KVGATE_TEST_LOG_DIR") {
                let name: String = self.what.chars().map(|c| if c.is_alphanumeric() { c } else { '_' }).collect();
                let path = Path::new(&dir).join(format!("{name}-{}.log", std::process::id()));
                let _ = std::fs::write(&path, self.output());
                eprintln!("{}: whole output in {}", self.what, path.display());
            }
            eprintln!("----- {} output (tail) -----\n{}", self.what, self.tail());
        }
    }
}

/// A `kvgate worker` that has registered: the id and address from its start-up line.
pub struct WorkerProc {
    pub proc: KvgateProc,
    /// The worker id in hex, as in its etcd key and the `x-kvgate-worker` header.
    pub id: String,
    /// `host:port` of its request plane, as advertised in etcd.
    pub address: String,
}

impl WorkerProc {
    /// Waits for `kvgate worker <id> serving <model> (<role>) at <address>`.
    pub fn ready(proc: KvgateProc) -> Self {
        let line = proc.wait_line("kvgate worker ", KVGATE_READY_TIMEOUT);
        let words: Vec<&str> = line.split_whitespace().collect();
        assert!(words.len() >= 4 && words[3] == "serving", "unexpected worker line {line:?}");
        let address = words.last().unwrap().to_string();
        Self { id: words[2].to_string(), address, proc }
    }
}

/// A `kvgate frontend` that is serving: its base URL from its start-up line.
pub struct FrontendProc {
    pub proc: KvgateProc,
    /// `http://host:port`.
    pub base: String,
}

impl FrontendProc {
    /// Waits for `kvgate frontend listening on http://host:port` (printed once
    /// `--router-min-initial-workers` workers are admitted).
    pub fn ready(proc: KvgateProc) -> Self {
        let line = proc.wait_line("kvgate frontend listening on ", KVGATE_READY_TIMEOUT);
        let base = line.trim_start_matches("kvgate frontend listening on ").trim().to_string();
        Self { base, proc }
    }

    /// Waits until `/health` lists `n` workers for its (one) model: the frontend is listening
    /// and its router has them.
    pub fn wait_workers(&self, n: usize, timeout: Duration) {
        let authority = self.base.trim_start_matches("http://");
        let (host, port) = authority.rsplit_once(':').expect("host:port");
        let port: u16 = port.parse().unwrap();
        let deadline = Instant::now() + timeout;
        let mut last = String::new();
        while Instant::now() < deadline {
            if let Some(resp) = http_get(host, port, "/health") {
                let body = resp.split_once("\r\n\r\n").map_or("", |(_, b)| b);
                let v: serde_json::Value = serde_json::from_str(body).unwrap_or_default();
                if v["models"][0]["workers"].as_array().is_some_and(|w| w.len() == n) {
                    return;
                }
                last = resp;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("{}: /health never listed {n} workers in {timeout:?}; last:\n{last}", self.proc.what);
    }
}
