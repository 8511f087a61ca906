//! Real etcd and nats-server processes for the multi-process tests.
//!
//! Invariant: each server listens only on loopback ports picked free at start, keeps its state
//! in its own temporary directory, and is killed (and reaped) in Drop, so no test leaks a process.
//! A restart reuses the same ports and data directory. The binaries come from the Debian packages
//! `etcd-server` and `nats-server`; `.ci/run` installs them when missing.

#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
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
    let held: Vec<TcpListener> =
        (0..N).map(|_| TcpListener::bind("127.0.0.1:0").unwrap()).collect();
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
        assert!(
            Instant::now() < deadline,
            "{what} not ready after {READY_TIMEOUT:?}; its log:\n{}",
            tail(log)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// One HTTP/1.0 GET on loopback; the response text, or None.
fn http_get(port: u16, path: &str) -> Option<String> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(1))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").ok()?;
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

/// A single-member etcd cluster on loopback.
pub struct Etcd {
    bin: PathBuf,
    dir: tempfile::TempDir,
    pub client_port: u16,
    peer_port: u16,
    child: Option<Child>,
}

impl Etcd {
    pub fn start() -> Self {
        let bin = require_binary("etcd", "etcd-server");
        let dir = tempfile::tempdir().unwrap();
        let [client_port, peer_port] = free_ports();
        let mut etcd = Self { bin, dir, client_port, peer_port, child: None };
        etcd.launch();
        etcd
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.client_port)
    }

    fn launch(&mut self) {
        let (client, peer) = (self.endpoint(), format!("http://127.0.0.1:{}", self.peer_port));
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
        let port = self.client_port;
        wait_ready(&mut child, "etcd", &log, || {
            http_get(port, "/health").is_some_and(|r| r.contains("\"health\":\"true\""))
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

/// A nats-server on loopback.
pub struct Nats {
    bin: PathBuf,
    dir: tempfile::TempDir,
    pub port: u16,
    child: Option<Child>,
}

impl Nats {
    pub fn start() -> Self {
        let bin = require_binary("nats-server", "nats-server");
        let mut nats =
            Self { bin, dir: tempfile::tempdir().unwrap(), port: free_port(), child: None };
        nats.launch();
        nats
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    fn launch(&mut self) {
        let args = ["-a".to_string(), "127.0.0.1".into(), "-p".into(), self.port.to_string()];
        let log = self.dir.path().join("nats.log");
        let mut child = spawn(&self.bin, &args, &log);
        let port = self.port;
        wait_ready(&mut child, "nats-server", &log, || {
            let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else {
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
