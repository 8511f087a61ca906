//! Two hosts on one machine: network namespaces joined by a veth pair, 10.77.0.1/24 and
//! 10.77.0.2/24. Host A runs etcd, NATS and `kvgate frontend`; host B runs a `kvgate worker`
//! with `--advertise-host 10.77.0.2`. A request through the frontend must reach the worker over
//! the veth, through the address the worker advertised in etcd.
//!
//! Both namespaces are created (and deleted in Drop) by the test; no address or route is added
//! outside them, so no traffic leaves them. The test body runs on a thread that has entered
//! namespace A (`setns`), so etcd, NATS, the frontend and the HTTP client it starts live there;
//! the worker is started with `ip netns exec B`.
//!
//! Needs root and iproute2 (`ip`). Where namespaces cannot be created (no privilege, no `ip`)
//! the test logs why and passes without running.

mod support;

use std::os::fd::AsRawFd;
use std::process::{Command, Stdio};

use serde_json::{json, Value};
use support::{kvgate_command, Etcd, FrontendProc, KvgateProc, Nats, WorkerProc, KVGATE_BIN};

const HOST_A: &str = "10.77.0.1";
const HOST_B: &str = "10.77.0.2";

/// Runs `ip args`; its stderr on failure.
fn ip(args: &[&str]) -> Result<(), String> {
    let out =
        Command::new("ip").args(args).stdin(Stdio::null()).output().map_err(|e| format!("cannot run `ip`: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!("`ip {}` failed: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim()))
    }
}

/// Two namespaces joined by a veth pair, deleted (with the pair) in Drop.
struct NetnsPair {
    a: String,
    b: String,
    /// The namespaces this created so far: what Drop deletes.
    created: Vec<String>,
}

impl NetnsPair {
    /// Creates them, or says why it cannot.
    fn create() -> Result<Self, String> {
        let pid = std::process::id();
        let mut pair = Self { a: format!("kvgate-{pid}-a"), b: format!("kvgate-{pid}-b"), created: Vec::new() };
        // Names are per process, so only a crashed earlier run with the same pid left these.
        let _ = ip(&["netns", "del", &pair.a]);
        let _ = ip(&["netns", "del", &pair.b]);
        for ns in [pair.a.clone(), pair.b.clone()] {
            ip(&["netns", "add", &ns])?;
            pair.created.push(ns);
        }
        let (va, vb) = (format!("kvg{pid}a"), format!("kvg{pid}b"));
        ip(&["link", "add", &va, "netns", &pair.a, "type", "veth", "peer", "name", &vb, "netns", &pair.b])?;
        for (ns, dev, addr) in [(&pair.a, &va, HOST_A), (&pair.b, &vb, HOST_B)] {
            ip(&["-n", ns, "addr", "add", &format!("{addr}/24"), "dev", dev])?;
            ip(&["-n", ns, "link", "set", dev, "up"])?;
            ip(&["-n", ns, "link", "set", "lo", "up"])?;
        }
        Ok(pair)
    }

    /// Moves the calling thread (and whatever it starts later) into namespace A.
    fn enter_a(&self) {
        let f = std::fs::File::open(format!("/var/run/netns/{}", self.a)).unwrap();
        // SAFETY: setns on an open namespace file; it affects only the calling thread.
        let rc = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns into {}: {}", self.a, std::io::Error::last_os_error());
    }
}

impl Drop for NetnsPair {
    fn drop(&mut self) {
        for ns in &self.created {
            if let Err(e) = ip(&["netns", "del", ns]) {
                eprintln!("cleanup: {e}");
            }
        }
    }
}

#[test]
fn worker_on_another_host_serves_through_the_frontend() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!(
            "SKIPPED worker_on_another_host_serves_through_the_frontend: needs root to create network namespaces"
        );
        return;
    }
    let pair = match NetnsPair::create() {
        Ok(p) => p,
        Err(e) => {
            eprintln!(
                "SKIPPED worker_on_another_host_serves_through_the_frontend: network namespaces unavailable: {e}"
            );
            return;
        }
    };
    // A fresh thread: setns changes only it, and everything it spawns inherits namespace A.
    let result = std::thread::scope(|s| s.spawn(|| two_hosts(&pair)).join());
    drop(pair);
    if let Err(panic) = result {
        std::panic::resume_unwind(panic);
    }
}

fn two_hosts(pair: &NetnsPair) {
    pair.enter_a();
    let etcd = Etcd::start_on(HOST_A);
    let nats = Nats::start_on(HOST_A);
    let (etcd_url, nats_url) = (etcd.endpoint(), nats.url());

    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", &pair.b, KVGATE_BIN, "worker", "--advertise-host", HOST_B, "--lease-ttl", "2"]);
    cmd.args(["--etcd-endpoints", &etcd_url, "--nats-server", &nats_url, "--speedup-ratio", "100"]);
    support::hermetic_env(&mut cmd);
    let worker = WorkerProc::ready(KvgateProc::spawn("worker (host B)", cmd));
    assert!(worker.address.starts_with(&format!("{HOST_B}:")), "advertised {}", worker.address);
    // The worker really is on the other host: its port is not open on host A's loopback.
    let port: u16 = worker.address.rsplit(':').next().unwrap().parse().unwrap();
    assert!(std::net::TcpStream::connect(("127.0.0.1", port)).is_err(), "the worker listens in namespace A");

    let args = ["frontend", "--http-host", HOST_A, "--http-port", "0", "--router-min-initial-workers", "1"];
    let mut cmd = kvgate_command(&args);
    cmd.args(["--etcd-endpoints", &etcd_url, "--nats-server", &nats_url]);
    let frontend = FrontendProc::ready(KvgateProc::spawn("frontend (host A)", cmd));
    frontend.wait_workers(1, std::time::Duration::from_secs(10));

    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let c = reqwest::Client::new();
        let body = json!({"model": "kvgate-mock", "messages": [{"role": "user", "content": "Hello from host A"}],
            "max_tokens": 8, "ignore_eos": true});
        let r = c.post(format!("{}/v1/chat/completions", frontend.base)).json(&body).send().await.unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()["x-kvgate-worker"].to_str().unwrap(), worker.id);
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["usage"]["completion_tokens"], 8, "{v}");

        let mut etcd_client = etcd_client::Client::connect([etcd_url.as_str()], None).await.unwrap();
        let opts = etcd_client::GetOptions::new().with_prefix();
        let resp = etcd_client.get("/dynamo/workers/", Some(opts)).await.unwrap();
        let [kv] = resp.kvs() else { panic!("one worker key expected, got {}", resp.kvs().len()) };
        let info: Value = serde_json::from_slice(kv.value()).unwrap();
        assert_eq!(info["address"], worker.address.as_str());
    });
    drop(frontend);
    drop(worker);
}
