//! The live routing page in a real browser (issue #18): a `kvgate serve` process (prefill and
//! decode mocker workers) under light load, and Debian's headless `chromium` driven over the
//! DevTools protocol on a pipe (`--remote-debugging-pipe`: the page's event stream never ends,
//! so `--dump-dom` would dump before any snapshot arrived, and `--virtual-time-budget` would
//! wait for the stream forever). The rendered DOM must list every worker with its index state
//! and show routing decisions and the disaggregated pairs; a screenshot is saved to
//! `target/dashboard.png` (and to `docs/dashboard.png` with `KVGATE_UPDATE_SCREENSHOT=1`).
//! Skipped, saying so, when `chromium` is not installed (CI installs it).
//!
//! Also, over plain HTTP: `/` sends browsers to the page and leaves API clients a 404; the page
//! and its stream follow `/health`'s API-key rule.

mod common;
mod support;

use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use support::{kvgate_command, KvgateProc, KVGATE_READY_TIMEOUT};

const READY: &str = "kvgate listening on http://";
/// How long the page may take to render workers and decisions (snapshots come every 0.75 s).
const RENDER_WITHIN: Duration = Duration::from_secs(60);

fn serve(extra: &[&str]) -> (KvgateProc, String) {
    let mut args = vec!["serve", "--http-host", "127.0.0.1", "--http-port", "0"];
    args.extend_from_slice(extra);
    let mut cmd = kvgate_command(&args);
    for var in ["KVGATE_API_KEY", "KVGATE_API_KEY_FILE"] {
        cmd.env_remove(var);
    }
    let p = KvgateProc::spawn("kvgate serve", cmd);
    let line = p.wait_line(READY, KVGATE_READY_TIMEOUT);
    let addr = line[READY.len()..].split_whitespace().next().unwrap().to_string();
    (p, format!("http://{addr}"))
}

fn chromium() -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).map(|d| d.join("chromium")).find(|p| p.is_file())
}

/// A headless chromium driven over the DevTools protocol on fds 3 (commands) and 4 (replies).
struct Browser {
    child: Child,
    commands: File,
    replies: BufReader<File>,
    next_id: u64,
    _profile: tempfile::TempDir,
}

fn pipe() -> (OwnedFd, OwnedFd) {
    let mut fds = [0; 2];
    // SAFETY: pipe2 fills two fds we then own.
    assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
    // SAFETY: both fds are fresh and owned by nobody else.
    unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) }
}

impl Browser {
    fn start(bin: &Path) -> Self {
        let profile = tempfile::tempdir().unwrap();
        let (cmd_read, cmd_write) = pipe();
        let (reply_read, reply_write) = pipe();
        let (r, w) = (cmd_read.as_raw_fd(), reply_write.as_raw_fd());
        let mut cmd = Command::new(bin);
        cmd.args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--hide-scrollbars",
            "--window-size=1400,900",
            "--remote-debugging-pipe",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .arg("about:blank")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
        // SAFETY: only async-signal-safe dup2 calls between fork and exec; dup2 leaves the new
        // fds without FD_CLOEXEC, so chromium inherits exactly fds 3 and 4.
        unsafe {
            cmd.pre_exec(move || {
                if libc::dup2(r, 3) < 0 || libc::dup2(w, 4) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd.spawn().expect("chromium starts");
        drop((cmd_read, reply_write));
        Self {
            child,
            commands: File::from(cmd_write),
            replies: BufReader::new(File::from(reply_read)),
            next_id: 1,
            _profile: profile,
        }
    }

    /// Sends one command (to the page's `session`, if given) and waits for its reply.
    fn call(&mut self, session: Option<&str>, method: &str, params: Value) -> Value {
        let id = self.next_id;
        self.next_id += 1;
        let mut msg = json!({"id": id, "method": method, "params": params});
        if let Some(s) = session {
            msg["sessionId"] = json!(s);
        }
        let mut bytes = serde_json::to_vec(&msg).unwrap();
        bytes.push(0);
        self.commands.write_all(&bytes).expect("chromium reads its pipe");
        loop {
            let mut buf = Vec::new();
            let n = self.replies.read_until(0, &mut buf).expect("chromium's reply pipe");
            assert!(n > 0, "chromium closed its pipe while {method} was pending");
            buf.pop();
            let v: Value = serde_json::from_slice(&buf).expect("a JSON message");
            if v["id"] == id {
                assert!(v.get("error").is_none(), "{method}: {v}");
                return v["result"].clone();
            }
        }
    }

    fn eval(&mut self, session: &str, expression: &str) -> Value {
        let r = self.call(Some(session), "Runtime.evaluate", json!({"expression": expression, "returnByValue": true}));
        r["result"]["value"].clone()
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Standard base64, as the DevTools protocol sends screenshots.
fn base64_decode(s: &str) -> Vec<u8> {
    let val = |c: u8| match c {
        b'A'..=b'Z' => c - b'A',
        b'a'..=b'z' => c - b'a' + 26,
        b'0'..=b'9' => c - b'0' + 52,
        b'+' => 62,
        b'/' => 63,
        _ => panic!("not base64: {c}"),
    };
    let bytes: Vec<u8> = s.bytes().filter(|c| *c != b'=' && !c.is_ascii_whitespace()).map(val).collect();
    let mut out = Vec::with_capacity(bytes.len() * 3 / 4);
    for chunk in bytes.chunks(4) {
        let mut acc = 0u32;
        for (i, b) in chunk.iter().enumerate() {
            acc |= u32::from(*b) << (18 - 6 * i);
        }
        let take = chunk.len() - 1;
        out.extend_from_slice(&acc.to_be_bytes()[1..1 + take]);
    }
    out
}

/// Chat requests from `n` tasks in a loop until `stop` (a few conversations sharing prefixes).
fn light_load(base: &str, n: usize, stop: Arc<AtomicBool>) -> Vec<tokio::task::JoinHandle<u64>> {
    let c = reqwest::Client::builder().timeout(Duration::from_secs(60)).build().unwrap();
    (0..n)
        .map(|i| {
            let (c, base, stop) = (c.clone(), base.to_string(), stop.clone());
            tokio::spawn(async move {
                let mut done = 0;
                while !stop.load(Ordering::Relaxed) {
                    let conv = (done + i as u64) % 4;
                    let body = json!({"model": "kvgate-mock", "max_tokens": 32, "ignore_eos": true,
                        "messages": [{"role": "system", "content": common::rail_system_prompt(&format!("conversation {conv}"))},
                                     {"role": "user", "content": format!("question {done}")}]});
                    let r = c.post(format!("{base}/v1/chat/completions")).json(&body).send().await.unwrap();
                    assert_eq!(r.status(), 200);
                    done += 1;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                done
            })
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_renders_workers_states_and_decisions_in_chromium() {
    let Some(bin) = chromium() else {
        eprintln!(
            "SKIPPED: chromium is not installed (apt-get install chromium); the page was not checked in a browser"
        );
        return;
    };
    let (server, base) = serve(&[
        "--prefill-workers",
        "2",
        "--decode-workers",
        "2",
        "--speedup-ratio",
        "20",
        "--num-gpu-blocks",
        "4096",
    ]);
    let health: Value = reqwest::get(format!("{base}/health")).await.unwrap().json().await.unwrap();
    let ids: Vec<String> =
        health["models"][0]["workers"].as_array().unwrap().iter().map(|w| w["id"].as_str().unwrap().into()).collect();
    assert_eq!(ids.len(), 4, "{health}");
    let stop = Arc::new(AtomicBool::new(false));
    let load = light_load(&base, 3, stop.clone());

    let mut browser = Browser::start(&bin);
    let target = browser.call(None, "Target.createTarget", json!({"url": format!("{base}/dashboard")}));
    let attached =
        browser.call(None, "Target.attachToTarget", json!({"targetId": target["targetId"], "flatten": true}));
    let session = attached["sessionId"].as_str().unwrap().to_string();
    browser.call(
        Some(&session),
        "Emulation.setDeviceMetricsOverride",
        json!({"width": 1400, "height": 900, "deviceScaleFactor": 1, "mobile": false}),
    );
    let probe = "JSON.stringify({s: +(document.body.dataset.snapshots || 0), w: document.querySelectorAll('tr.worker').length, \
                 d: document.querySelectorAll('tr.decision').length, p: document.querySelectorAll('.pairs b').length})";
    let t0 = Instant::now();
    let seen = loop {
        let v = browser.eval(&session, probe);
        let seen: Value = v.as_str().map(|s| serde_json::from_str(s).unwrap()).unwrap_or(Value::Null);
        if seen["s"].as_u64() >= Some(3)
            && seen["w"] == 4
            && seen["d"].as_u64() >= Some(10)
            && seen["p"].as_u64() >= Some(2)
        {
            break seen;
        }
        assert!(
            t0.elapsed() < RENDER_WITHIN,
            "the page did not render within {RENDER_WITHIN:?}: {seen}\n{}",
            server.tail()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    eprintln!("rendered after {:?}: {seen}", t0.elapsed());
    let dom = browser.eval(&session, "document.documentElement.outerHTML");
    let dom = dom.as_str().unwrap();
    for id in &ids {
        assert!(dom.contains(&format!("data-worker=\"{id}\"")), "worker {id} is not listed");
    }
    assert!(dom.contains("data-state=\"exact\""), "no index state shown");
    assert!(dom.contains("class=\"badge s-exact\""), "no state badge");
    assert!(dom.contains(">prefill<") && dom.contains(">decode<"), "roles and legs are shown");
    let chosen = dom.matches("class=\"decision\" data-chosen=\"").count();
    assert!(chosen >= 10, "{chosen} decisions");
    assert!(ids.iter().any(|id| dom.contains(&format!("data-chosen=\"{id}\""))), "decisions name the workers");
    assert!(dom.contains("Disaggregated pairs"), "no disaggregated pairs");
    assert!(dom.contains("class=\"on\">live<"), "the stream is not live");

    let shot = browser.call(Some(&session), "Page.captureScreenshot", json!({"format": "png"}));
    let png = base64_decode(shot["data"].as_str().unwrap());
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = root.join("target/dashboard.png");
    std::fs::write(&out, &png).unwrap();
    if std::env::var_os("KVGATE_UPDATE_SCREENSHOT").is_some() {
        std::fs::write(root.join("docs/dashboard.png"), &png).unwrap();
    }
    eprintln!("screenshot: {} ({} bytes)", out.display(), png.len());
    let _ = browser.call(None, "Browser.close", json!({}));
    drop(browser);

    stop.store(true, Ordering::Relaxed);
    let mut served = 0;
    for t in load {
        served += t.await.unwrap();
    }
    assert!(served > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn browsers_get_the_page_and_keys_guard_it_like_health() {
    let (_server, base) = serve(&["--workers", "1", "--speedup-ratio", "100"]);
    let c = reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).build().unwrap();
    let page = c.get(format!("{base}/dashboard")).send().await.unwrap();
    assert_eq!(page.status(), 200);
    assert!(page.headers()["content-type"].to_str().unwrap().starts_with("text/html"));
    let html = page.text().await.unwrap();
    assert!(!html.contains("http://") && !html.contains("https://"), "the page fetches nothing from elsewhere");
    let browser = c.get(format!("{base}/")).header("accept", "text/html,application/xhtml+xml").send().await.unwrap();
    assert_eq!(browser.status(), 302);
    assert_eq!(browser.headers()["location"], "/dashboard");
    let api = c.get(format!("{base}/")).send().await.unwrap();
    assert_eq!(api.status(), 404);
    common::assert_openai_error(&api.json().await.unwrap());
    // One snapshot from the stream.
    let mut events = c.get(format!("{base}/dashboard/events")).send().await.unwrap();
    assert_eq!(events.status(), 200);
    assert_eq!(events.headers()["content-type"], "text/event-stream");
    let mut text = String::new();
    while !text.contains("\n\ndata: ") || !text.ends_with("\n\n") {
        text.push_str(&String::from_utf8_lossy(&events.chunk().await.unwrap().unwrap()));
    }
    let data = text.lines().find_map(|l| l.strip_prefix("data: ")).unwrap();
    let snap: Value = serde_json::from_str(data).unwrap();
    assert_eq!(snap["models"][0]["name"], "kvgate-mock");
    // Exact once its join's sync has answered (at once, in process).
    let state = &snap["models"][0]["workers"][0]["state"];
    assert!(state == "exact" || state == "recovering", "{snap}");
    assert_eq!(snap["viewers"], 1);
    drop(events);

    // With a key: open like /health; with --api-key-protect-health, keyed like /health.
    let (_keyed, base) = serve(&["--workers", "1", "--api-key", "sk-test"]);
    assert_eq!(c.get(format!("{base}/dashboard")).send().await.unwrap().status(), 200);
    let (_guarded, base) = serve(&["--workers", "1", "--api-key", "sk-test", "--api-key-protect-health"]);
    for path in ["/dashboard", "/dashboard/events", "/health"] {
        assert_eq!(c.get(format!("{base}{path}")).send().await.unwrap().status(), 401, "{path}");
    }
    let keyed = c.get(format!("{base}/dashboard/events")).bearer_auth("sk-test").send().await.unwrap();
    assert_eq!(keyed.status(), 200);
}

/// The first snapshot of a new page stream.
async fn first_snapshot(c: &reqwest::Client, base: &str) -> (reqwest::Response, Value) {
    let r = c.get(format!("{base}/dashboard/events")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    read_snapshot(r).await
}

/// The first snapshot of a page stream that answered 200.
async fn read_snapshot(mut r: reqwest::Response) -> (reqwest::Response, Value) {
    let mut text = String::new();
    while !text.contains("\n\ndata: ") || !text.ends_with("\n\n") {
        text.push_str(&String::from_utf8_lossy(&r.chunk().await.unwrap().unwrap()));
    }
    let data = text.lines().find_map(|l| l.strip_prefix("data: ")).unwrap();
    (r, serde_json::from_str(data).unwrap())
}

/// At most 16 pages stream at once (the 17th is a 503 in OpenAI's shape); a closed page frees
/// its place.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn page_streams_are_bounded_and_a_closed_page_frees_its_place() {
    let (_server, base) = serve(&["--workers", "1", "--speedup-ratio", "100"]);
    let c = reqwest::Client::new();
    let mut open = Vec::new();
    for i in 1..=16 {
        let (r, snap) = first_snapshot(&c, &base).await;
        assert_eq!(snap["viewers"], i);
        open.push(r);
    }
    let refused = c.get(format!("{base}/dashboard/events")).send().await.unwrap();
    assert_eq!(refused.status(), 503);
    let body: Value = refused.json().await.unwrap();
    common::assert_openai_error(&body);
    assert!(body["error"]["message"].as_str().unwrap().contains("dashboard"), "{body}");
    // Closing pages frees their places once the frontend's next write to them fails.
    open.truncate(1);
    let t0 = Instant::now();
    loop {
        // Until the frontend's next write to the closed pages fails, they still hold their
        // places: a new page is refused (503) or sees more than 2 viewers.
        let r = c.get(format!("{base}/dashboard/events")).send().await.unwrap();
        let viewers = if r.status() == 200 { read_snapshot(r).await.1["viewers"].clone() } else { json!(null) };
        if viewers == 2 {
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(20), "closed pages still counted: {viewers}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
