//! API keys against a real `kvgate serve` process: `--api-key`, `KVGATE_API_KEY`,
//! `--api-key-file`; missing, wrong and right keys on every endpoint (streaming chat included),
//! the open probes, the refusal count in `/metrics`, and the official OpenAI Python client.

mod common;
mod support;

use std::process::Command;

use serde_json::{json, Value};
use support::{kvgate_command, KvgateProc, KVGATE_READY_TIMEOUT};

const READY: &str = "kvgate listening on http://";

/// `kvgate serve` on a free port with `extra` flags and `env`; returns it and its base URL.
fn serve(extra: &[&str], env: &[(&str, &str)]) -> (KvgateProc, String) {
    let mut args = vec!["serve", "--http-host", "127.0.0.1", "--http-port", "0", "--speedup-ratio", "100"];
    args.extend_from_slice(extra);
    let mut cmd = kvgate_command(&args);
    for var in ["KVGATE_API_KEY", "KVGATE_API_KEY_FILE", "KVGATE_DRAIN_TIMEOUT_S"] {
        cmd.env_remove(var);
    }
    cmd.envs(env.iter().copied());
    let p = KvgateProc::spawn("kvgate serve", cmd);
    let line = p.wait_line(READY, KVGATE_READY_TIMEOUT);
    let addr = line[READY.len()..].split_whitespace().next().unwrap().to_string();
    (p, format!("http://{addr}"))
}

/// Every endpoint that serves model work: method, path, body (`None`: GET).
fn model_endpoints() -> Vec<(&'static str, Option<Value>)> {
    let chat = json!({"model": "kvgate-mock", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 5});
    let mut stream = chat.clone();
    stream["stream"] = json!(true);
    let complete = json!({"model": "kvgate-mock", "prompt": "Once", "max_tokens": 5});
    let tokenize = json!({"model": "kvgate-mock", "prompt": "Hello"});
    let detokenize = json!({"model": "kvgate-mock", "tokens": [72, 105]});
    vec![
        ("/v1/chat/completions", Some(chat)),
        ("/v1/chat/completions", Some(stream)),
        ("/v1/completions", Some(complete)),
        ("/tokenize", Some(tokenize.clone())),
        ("/v1/tokenize", Some(tokenize)),
        ("/detokenize", Some(detokenize.clone())),
        ("/v1/detokenize", Some(detokenize)),
        ("/v1/models", None),
    ]
}

async fn call(
    c: &reqwest::Client,
    base: &str,
    path: &str,
    body: &Option<Value>,
    auth: Option<&str>,
) -> reqwest::Response {
    let mut r = match body {
        Some(b) => c.post(format!("{base}{path}")).json(b),
        None => c.get(format!("{base}{path}")),
    };
    if let Some(a) = auth {
        r = r.header("authorization", a);
    }
    r.send().await.unwrap()
}

/// A 401 in OpenAI's shape, with `WWW-Authenticate: Bearer`, not repeating what was sent.
async fn assert_refused(r: reqwest::Response, what: &str, sent: Option<&str>) {
    assert_eq!(r.status(), 401, "{what}");
    assert_eq!(r.headers()["www-authenticate"], "Bearer", "{what}");
    let text = r.text().await.unwrap();
    if let Some(key) = sent.map(|s| s.trim_start_matches("Bearer ")).filter(|k| k.len() > 4) {
        assert!(!text.contains(key), "{what}: the refusal echoes the key: {text}");
    }
    let v: Value = serde_json::from_str(&text).unwrap();
    common::assert_openai_error(&v);
    assert_eq!(v["error"]["type"], "invalid_request_error", "{what}");
    assert_eq!(v["error"]["code"], "invalid_api_key", "{what}");
}

/// Checks missing, wrong and each right key on every model endpoint; returns the refusals.
async fn check_every_endpoint(base: &str, right: &[&str]) -> u64 {
    let c = reqwest::Client::new();
    let mut refused = 0;
    for (path, body) in model_endpoints() {
        let what = format!("{path} stream={}", body.as_ref().is_some_and(|b| b["stream"] == true));
        let wrong = format!("Bearer {}-not", right[0]);
        for bad in [None, Some(wrong.as_str()), Some("Bearer "), Some("Basic dXNlcjpwYXNz"), Some(right[0])] {
            assert_refused(call(&c, base, path, &body, bad).await, &format!("{what} with {bad:?}"), bad).await;
            refused += 1;
        }
        for key in right {
            let r = call(&c, base, path, &body, Some(&format!("Bearer {key}"))).await;
            assert_eq!(r.status(), 200, "{what} with a right key");
            let text = r.text().await.unwrap();
            if body.as_ref().is_some_and(|b| b["stream"] == true) {
                assert_eq!(common::sse_events(&text).last().unwrap(), "[DONE]", "{what}");
            }
        }
    }
    // An unknown path reveals nothing without a key.
    assert_refused(call(&c, base, "/v1/nope", &None, None).await, "/v1/nope", None).await;
    refused + 1
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flag_keys_guard_every_model_endpoint_and_leave_the_probes_open() {
    let (p, base) = serve(&["--api-key", "sk-first", "--api-key", "sk-second"], &[]);
    let refused = check_every_endpoint(&base, &["sk-first", "sk-second"]).await;
    let c = reqwest::Client::new();
    for probe in ["/health", "/live", "/metrics"] {
        assert_eq!(c.get(format!("{base}{probe}")).send().await.unwrap().status(), 200, "{probe}");
    }
    assert_eq!(common::metric(&c, &base, "kvgate_http_unauthorized_total").await, refused as f64);
    assert!(!p.output().contains("sk-first") && !p.output().contains("sk-second"), "a key was logged");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn env_and_file_keys_together_and_protected_probes() {
    let dir = std::env::temp_dir().join(format!("kvgate-api-keys-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("keys");
    std::fs::write(&file, "# team keys\n\n  sk-file-1  \n# sk-commented\nsk-file-2\n").unwrap();
    let (_p, base) = serve(
        &["--api-key-file", file.to_str().unwrap(), "--api-key-protect-health"],
        &[("KVGATE_API_KEY", "sk-env-1,sk-env-2")],
    );
    check_every_endpoint(&base, &["sk-env-1", "sk-env-2", "sk-file-1", "sk-file-2"]).await;
    let c = reqwest::Client::new();
    for probe in ["/health", "/live", "/metrics"] {
        assert_refused(c.get(format!("{base}{probe}")).send().await.unwrap(), probe, None).await;
        let r = c.get(format!("{base}{probe}")).bearer_auth("sk-file-2").send().await.unwrap();
        assert_eq!(r.status(), 200, "{probe}");
    }
    let r = call(&c, &base, "/v1/models", &None, Some("Bearer sk-commented")).await;
    assert_refused(r, "a commented-out key", None).await;
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn an_unreadable_or_empty_key_file_stops_start_up_with_a_clear_message() {
    let dir = std::env::temp_dir().join(format!("kvgate-api-key-files-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let empty = dir.join("empty");
    std::fs::write(&empty, "# nothing here\n\n").unwrap();
    let missing = dir.join("missing");
    for (file, says) in [(&missing, "cannot read"), (&empty, "holds no key")] {
        let out = kvgate_command(&["serve", "--http-port", "0", "--api-key-file", file.to_str().unwrap()])
            .env_remove("KVGATE_API_KEY")
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{err}");
        assert!(err.contains("--api-key-file") && err.contains(says), "{err}");
    }
    let out = kvgate_command(&["serve", "--http-port", "0", "--api-key", "has space"]).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("--api-key") && !err.contains("has space"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn official_openai_python_client_sends_its_key() {
    let py = common::openai_venv_python();
    let (_p, base) = serve(&["--api-key", "sk-python"], &[]);
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/python/api_keys.py");
    let out = Command::new(py)
        .arg(script)
        .arg(format!("{base}/v1"))
        .arg("kvgate-mock")
        .arg("sk-python")
        .env_remove("OPENAI_API_KEY")
        .output()
        .unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "python client failed\nstdout:\n{stdout}\nstderr:\n{stderr}");
    assert!(stdout.trim_end().ends_with("ok"), "{stdout}");
}
