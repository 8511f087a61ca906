//! `POST /tokenize` and `POST /detokenize` over real HTTP, in vLLM's shape, with the Qwen3
//! tokenizer (ids checked against Hugging Face's) and the other endpoints' errors.

mod common;

use common::*;
use serde_json::{json, Value};

const QUESTION: &str = "What is the capital of France?";
const QUESTION_IDS: [u64; 7] = [3838, 374, 279, 6722, 315, 9625, 30];

async fn post(c: &reqwest::Client, url: String, body: Value) -> (u16, Value) {
    let r = c.post(url).json(&body).send().await.unwrap();
    (r.status().as_u16(), r.json().await.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokenize_and_detokenize_like_vllm() {
    let dir = qwen_dir();
    let s = serve(&["--model-path", dir.to_str().unwrap(), "--served-model-name", "qwen"]);
    let base = base_url(&s);
    let c = reqwest::Client::new();

    // A prompt: special tokens by default (Qwen3 adds none), HF's ids.
    let (status, v) = post(&c, format!("{base}/tokenize"), json!({"model": "qwen", "prompt": QUESTION})).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["tokens"], json!(QUESTION_IDS));
    assert_eq!(v["count"], 7);
    assert_eq!(v["max_model_len"], 40960);
    assert!(v.get("token_strs").is_none());

    // Messages: the chat template with the generation prompt (the chat endpoint's 15 tokens),
    // or without it; the /v1/ alias and an omitted model (one model is served).
    let msgs = json!([{"role": "user", "content": QUESTION}]);
    let (status, v) = post(&c, format!("{base}/v1/tokenize"), json!({"messages": msgs})).await;
    assert_eq!(status, 200, "{v}");
    let chat: Vec<u64> =
        [151644, 872, 198].into_iter().chain(QUESTION_IDS).chain([151645, 198, 151644, 77091, 198]).collect();
    assert_eq!(v["tokens"], json!(chat));
    assert_eq!(v["count"], 15);
    let (_, v) = post(
        &c,
        format!("{base}/tokenize"),
        json!({"model": "qwen", "messages": msgs, "add_generation_prompt": false, "return_token_strs": true}),
    )
    .await;
    assert_eq!(v["count"], 12);
    assert_eq!(v["token_strs"][0], "<|im_start|>");
    assert_eq!(v["token_strs"][4], "Ġis");

    // Detokenize: special tokens kept unless asked.
    let (status, v) = post(&c, format!("{base}/detokenize"), json!({"model": "qwen", "tokens": chat})).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["prompt"], format!("<|im_start|>user\n{QUESTION}<|im_end|>\n<|im_start|>assistant\n"));
    let (_, v) = post(
        &c,
        format!("{base}/v1/detokenize"),
        json!({"model": "qwen", "tokens": chat, "skip_special_tokens": true}),
    )
    .await;
    assert_eq!(v["prompt"], format!("user\n{QUESTION}\nassistant\n"));

    // A body past 8 KiB is tokenized on the preprocessing pool: the same ids.
    let long = QUESTION.repeat(2000);
    let (status, v) = post(&c, format!("{base}/tokenize"), json!({"model": "qwen", "prompt": long})).await;
    assert_eq!(status, 200);
    let (_, v2) = post(&c, format!("{base}/detokenize"), json!({"model": "qwen", "tokens": v["tokens"]})).await;
    assert_eq!(v2["prompt"], long);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokenize_errors_are_the_other_endpoints() {
    let s = serve(&[]);
    let base = base_url(&s);
    let c = reqwest::Client::new();
    let check = |status: u16, v: &Value, want: u16, kind: &str| {
        assert_eq!(status, want, "{v}");
        assert_openai_error(v);
        assert_eq!(v["error"]["type"], kind, "{v}");
    };

    let (st, v) = post(&c, format!("{base}/tokenize"), json!({"model": "nope", "prompt": "hi"})).await;
    check(st, &v, 404, "not_found_error");
    assert_eq!(v["error"]["code"], "model_not_found");
    let (st, v) = post(&c, format!("{base}/detokenize"), json!({"model": "nope", "tokens": [1]})).await;
    check(st, &v, 404, "not_found_error");

    let r = c.post(format!("{base}/tokenize")).body("{not json").send().await.unwrap();
    let st = r.status().as_u16();
    check(st, &r.json().await.unwrap(), 400, "invalid_request_error");
    let (st, v) = post(&c, format!("{base}/detokenize"), json!({"model": "kvgate-mock", "tokens": [1, -2]})).await;
    check(st, &v, 400, "invalid_request_error");

    // The built-in model has 259 tokens.
    let (st, v) = post(&c, format!("{base}/detokenize"), json!({"model": "kvgate-mock", "tokens": [104, 259]})).await;
    check(st, &v, 400, "invalid_request_error");
    assert_eq!(v["error"]["param"], "tokens");
    assert!(v["error"]["message"].as_str().unwrap().contains("259"), "{v}");

    let (st, v) = post(&c, format!("{base}/tokenize"), json!({"model": "kvgate-mock"})).await;
    check(st, &v, 400, "invalid_request_error");
    let both = json!({"model": "kvgate-mock", "prompt": "a", "messages": [{"role": "user", "content": "b"}]});
    let (st, v) = post(&c, format!("{base}/tokenize"), both).await;
    check(st, &v, 400, "invalid_request_error");

    let r = c.get(format!("{base}/tokenize")).send().await.unwrap();
    assert_eq!(r.status(), 405);

    // The built-in model: one token per byte, no context figure.
    let (st, v) = post(&c, format!("{base}/tokenize"), json!({"model": "kvgate-mock", "prompt": "hi"})).await;
    assert_eq!(st, 200);
    assert_eq!(v, json!({"tokens": [104, 105], "count": 2, "max_model_len": null}));
}
