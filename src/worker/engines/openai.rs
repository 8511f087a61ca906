//! The adapter to any server that takes token-id prompts on OpenAI's `POST /v1/completions`
//! (`prompt: [ids]`, `stream: true`, `stream_options.include_usage`, `max_tokens`,
//! `temperature`, `top_p`, `seed`): vLLM's and llama-server's OpenAI endpoints, and others.
//!
//! Output token ids come from the first of these the server gives, found once at start-up by
//! a one-token probe ([`IdSource`]):
//! 1. `choices[].token_ids` when asked with `return_token_ids: true` (vLLM);
//! 2. `choices[].logprobs.content[].id` when asked with `logprobs: 1` (llama-server);
//! 3. otherwise only `choices[].text`: the adapter re-encodes each text delta with the served
//!    model's tokenizer. The worker contract stays token ids (the frontend detokenizes, applies
//!    stop strings, counts usage, and migrates a broken stream with the tokens so far), and
//!    byte-level BPE decodes re-encoded text to the same text, so the client sees exactly the
//!    server's text; only the ids (and so `completion_tokens`) may differ from the server's
//!    own segmentation. A text-only server without `--model-path` is refused at start-up.
//!
//! llama-server's `/v1/completions` (source 2) sends no chunk for a token that ends inside a
//! UTF-8 character, so that token's id is missing there; `--engine llama-cpp` notices the gap
//! (`tokens_predicted`) and re-encodes the text, so prefer it for llama-server.
//!
//! Cached prompt tokens come from `usage.prompt_tokens_details.cached_tokens` (vLLM needs
//! `--enable-prompt-tokens-details`; llama-server always reports it), in the stream's usage
//! chunk, so `Started` is sent at the end as for vLLM. Such servers publish no KV events
//! (`kv_events: false`: the frontend predicts their caches) and report no load the adapter
//! can read (the frontend's own booking stands). No disaggregation. Cancellation is dropping
//! the HTTP stream (vLLM and llama-server abort a request whose client is gone).

use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};
use tokio::sync::mpsc;

use crate::contract::{
    DisaggStyle, EngineKind, FinishReason, GenerateRequest, LoadReport, TokenId, WorkerError, WorkerOutput,
};
use crate::preprocess::Preprocessor;
use crate::worker::engine::EngineCard;

use super::http::{
    client, error_message, get_json, openai_finish, openai_usage, run_call, send_call, wait_ready, with_trace,
    AdapterOptions, Dialect, EngineStartError, EosHold, HttpAdapter, SseReader,
};

const ENGINE: &str = "openai";

/// Where a server's answer carries the generated token ids.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdSource {
    /// `choices[].token_ids` (asked with `return_token_ids`).
    TokenIds,
    /// `choices[].logprobs.content[].id` (asked with `logprobs: 1`).
    LogprobIds,
    /// Only `choices[].text`: re-encoded with the model's tokenizer.
    Text,
}

/// An OpenAI-compatible completions API, as [`HttpAdapter`] runs it.
pub struct OpenAi {
    url: String,
    /// The name the server serves the model under (sent as `model`).
    model: String,
    ids: IdSource,
    timeout: Duration,
    tokenizer: Option<Arc<Preprocessor>>,
    /// Sends streams with `Connection: close` (llama-server, which closes them anyway).
    close_streams: bool,
}

impl std::fmt::Debug for OpenAi {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OpenAi").field("url", &self.url).field("model", &self.model).field("ids", &self.ids).finish()
    }
}

/// Meets the server at `opts.url`: waits for `/v1/models`, picks the model name, probes where
/// its answers carry token ids.
pub async fn connect(
    opts: &AdapterOptions,
    tokenizer: Option<Arc<Preprocessor>>,
) -> Result<HttpAdapter<OpenAi>, EngineStartError> {
    let url = opts.url.trim_end_matches('/').to_string();
    opts.aggregated_only(
        ENGINE,
        &url,
        "run OpenAI-API workers aggregated (no --disaggregation-mode, no prefill=/decode= prefix)",
    )?;
    let client = client();
    wait_ready(&client, ENGINE, &url, "/v1/models", opts.ready_timeout).await?;
    let models = get_json(&client, &url, "/v1/models").await.map_err(|detail| EngineStartError::Protocol {
        engine: ENGINE,
        url: url.clone(),
        what: "its model list (/v1/models)",
        detail,
    })?;
    let model = pick_model(&models, &opts.served_model_name);
    // llama-server closes the connection after a stream despite keep-alive (see llama_cpp).
    let close_streams = models["data"][0]["owned_by"].as_str() == Some("llamacpp");
    if model != opts.served_model_name {
        tracing::info!(url = %url, engine_model = %model, "the server names the model differently; kvgate sends its name");
    }
    let probe_prompt: Vec<TokenId> =
        tokenizer.as_ref().and_then(|t| t.encode("Hello", false).ok()).filter(|v| !v.is_empty()).unwrap_or(vec![1]);
    let ids = probe(&client, &url, &model, &probe_prompt).await?;
    if ids == IdSource::Text && tokenizer.is_none() {
        return Err(EngineStartError::Mismatch {
            engine: ENGINE,
            url,
            what: "output",
            engine_value: "text only".into(),
            ours: "token ids".into(),
            fix: "give kvgate the model's tokenizer (--model-path) so it can re-encode the server's text".into(),
        });
    }
    let card = EngineCard {
        kind: EngineKind::Openai,
        kv_capacity_blocks: 0,
        max_num_seqs: 0,
        max_num_batched_tokens: 0,
        disagg: DisaggStyle::default(),
        bootstrap: None,
        kv_events: false,
    };
    tracing::info!(url = %url, model = %model, ?ids, "OpenAI-API engine ready (no KV events: routing to it is approximate)");
    let dialect = OpenAi { url, model, ids, timeout: opts.timeout, tokenizer, close_streams };
    Ok(HttpAdapter {
        dialect: Arc::new(dialect),
        client,
        card,
        events: None,
        block_size: opts.page_size,
        counters: Arc::default(),
    })
}

/// kvgate's model name if the server lists it, else the first it lists.
fn pick_model(models: &Value, ours: &str) -> String {
    let served: Vec<&str> =
        models["data"].as_array().map_or_else(Vec::new, |a| a.iter().filter_map(|m| m["id"].as_str()).collect());
    if served.is_empty() || served.contains(&ours) {
        ours.to_string()
    } else {
        served[0].to_string()
    }
}

/// One short completion asking for ids both ways; a server that refuses the extra fields is
/// asked again without them.
async fn probe(
    client: &reqwest::Client,
    url: &str,
    model: &str,
    prompt: &[TokenId],
) -> Result<IdSource, EngineStartError> {
    let plain = json!({"model": model, "prompt": prompt, "max_tokens": 2, "temperature": 0.0, "stream": false});
    let mut asking = plain.clone();
    asking["return_token_ids"] = json!(true);
    asking["logprobs"] = json!(1);
    let protocol = |detail: String| EngineStartError::Protocol {
        engine: ENGINE,
        url: url.to_string(),
        what: "a token-id completion",
        detail,
    };
    for body in [asking, plain] {
        let r = client
            .post(format!("{url}/v1/completions"))
            .json(&body)
            .timeout(Duration::from_secs(120))
            .send()
            .await
            .map_err(|e| protocol(e.to_string()))?;
        let status = r.status();
        let text = r.text().await.unwrap_or_default();
        if status.is_client_error() && body.get("logprobs").is_some() {
            continue;
        }
        if !status.is_success() {
            return Err(protocol(format!("{status}: {}", error_message(&text))));
        }
        let v: Value = serde_json::from_str(&text).map_err(|e| protocol(format!("not JSON: {e}")))?;
        return Ok(id_source(&v["choices"][0]));
    }
    Err(protocol("the server refused a token-id prompt".into()))
}

/// Where `choice` (of a probe's answer) carries token ids.
pub fn id_source(choice: &Value) -> IdSource {
    if choice["token_ids"].is_array() {
        IdSource::TokenIds
    } else if choice["logprobs"]["content"].as_array().is_some_and(|c| c.iter().all(|t| t["id"].is_u64())) {
        IdSource::LogprobIds
    } else {
        IdSource::Text
    }
}

/// The `/v1/completions` body of `r` (standard names; the id request as `ids` needs).
pub fn completion_body(r: &GenerateRequest, model: &str, ids: IdSource) -> Value {
    let s = &r.sampling;
    let mut body = json!({
        "model": model,
        "prompt": r.token_ids,
        "max_tokens": s.max_tokens,
        "temperature": s.temperature,
        "top_p": s.top_p,
        "stream": true,
        "stream_options": {"include_usage": true},
    });
    if let Some(seed) = s.seed {
        // Fits every server's seed type (llama.cpp's is 32 bits).
        body["seed"] = json!(seed & 0x7fff_ffff);
    }
    if s.ignore_eos {
        body["ignore_eos"] = json!(true);
    }
    match ids {
        IdSource::TokenIds => body["return_token_ids"] = json!(true),
        IdSource::LogprobIds => body["logprobs"] = json!(1),
        IdSource::Text => {}
    }
    body
}

/// One streamed chunk.
#[derive(Debug, PartialEq, Default)]
pub struct Chunk {
    /// The ids the chunk carries (empty for [`IdSource::Text`]).
    pub token_ids: Vec<TokenId>,
    pub text: String,
    pub finish: Option<Result<FinishReason, WorkerError>>,
    /// `(prompt_tokens, cached_tokens)` when the chunk carries usage.
    pub usage: Option<(u32, u32)>,
}

/// Parses one chunk of a `/v1/completions` stream, or its `{"error"}`.
pub fn parse_chunk(data: &str, ids: IdSource) -> Result<Chunk, WorkerError> {
    let v: Value = serde_json::from_str(data)
        .map_err(|e| WorkerError::worker(format!("the server sent a chunk that is not JSON: {e}")))?;
    if let Some(err) = v.get("error") {
        return Err(error_of(err));
    }
    let mut c = Chunk::default();
    if let Some(choice) = v["choices"].as_array().and_then(|a| a.first()) {
        let as_ids = |a: Option<&Vec<Value>>, f: fn(&Value) -> Option<u64>| {
            a.map_or_else(Vec::new, |a| a.iter().filter_map(|t| f(t).map(|t| t as u32)).collect())
        };
        c.token_ids = match ids {
            IdSource::TokenIds => as_ids(choice["token_ids"].as_array(), Value::as_u64),
            IdSource::LogprobIds => as_ids(choice["logprobs"]["content"].as_array(), |t| t["id"].as_u64()),
            IdSource::Text => Vec::new(),
        };
        c.text = choice["text"].as_str().unwrap_or_default().to_string();
        c.finish = openai_finish(choice, "the server");
    }
    c.usage = openai_usage(&v);
    Ok(c)
}

/// An in-stream `{"error": {"message", "code"|"type"}}` as a failure.
fn error_of(err: &Value) -> WorkerError {
    let message = err["message"].as_str().map_or_else(|| err.to_string(), str::to_string);
    let code = err["code"].as_u64().unwrap_or(0);
    let invalid = err["type"].as_str().is_some_and(|t| t.contains("invalid_request") || t == "BadRequestError");
    if ((400..500).contains(&code) && code != 429) || (code == 0 && invalid) {
        WorkerError::client(format!("the server refused the request: {message}"))
    } else {
        WorkerError::worker(format!("the server failed the request: {message}"))
    }
}

impl OpenAi {
    async fn run(
        &self,
        client: &reqwest::Client,
        r: &GenerateRequest,
        reply: &mpsc::Sender<WorkerOutput>,
    ) -> Result<(), Option<WorkerError>> {
        let mut call = client.post(format!("{}/v1/completions", self.url));
        if self.close_streams {
            call = call.header(reqwest::header::CONNECTION, "close");
        }
        let call = with_trace(call.json(&completion_body(r, &self.model, self.ids)), r);
        let resp = send_call(call, false, self.timeout, ENGINE, &self.url).await.map_err(Some)?;
        let send = |o| async { reply.send(o).await.map_err(|_| None) };
        let mut sse = SseReader::new(resp, self.timeout);
        let mut eos = EosHold::new(&r.eos_token_ids, !r.sampling.ignore_eos);
        let (mut finish, mut usage) = (None, None);
        while let Some(data) = sse.next().await.map_err(Some)? {
            if data == "[DONE]" {
                sse.drain().await;
                break;
            }
            let c = parse_chunk(&data, self.ids).map_err(Some)?;
            usage = c.usage.or(usage);
            let tokens = match (self.ids, &self.tokenizer) {
                (IdSource::Text, Some(t)) if !c.text.is_empty() => t
                    .encode(&c.text, false)
                    .map_err(|e| Some(WorkerError::worker(format!("could not re-encode the server's text: {e}"))))?,
                (IdSource::Text, _) => Vec::new(),
                _ => c.token_ids,
            };
            let mut out = eos.push(tokens);
            if let Some(f) = c.finish {
                let reason = f.map_err(Some)?;
                out.extend(eos.finish(reason));
                finish = Some(reason);
            }
            if !out.is_empty() {
                send(WorkerOutput::Tokens(out)).await?;
            }
        }
        let Some(reason) = finish else {
            return Err(Some(WorkerError::worker("the server's stream ended without a finish reason")));
        };
        let prompt_len = r.token_ids.len() as u32;
        let cached = usage.map_or(0, |u| u.1).min(prompt_len);
        send(WorkerOutput::Started { cached_tokens: cached, computed_tokens: prompt_len - cached }).await?;
        send(WorkerOutput::Finished { reason }).await
    }
}

impl Dialect for OpenAi {
    async fn serve(
        self: Arc<Self>,
        client: reqwest::Client,
        request: GenerateRequest,
        reply: mpsc::Sender<WorkerOutput>,
    ) {
        let rid = format!("{:x}", request.request_id);
        let call = self.run(&client, &request, &reply);
        // Dropping the stream is the abort (the OpenAI API has no other).
        run_call(ENGINE, &rid, call, &reply, async {}).await;
    }

    async fn load(&self, _client: &reqwest::Client) -> Option<LoadReport> {
        None
    }

    async fn reset(&self, _client: &reqwest::Client) {
        tracing::warn!(url = %self.url, "an OpenAI-API server has no cache reset; its cache stays");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::contract::SamplingParams;

    fn req() -> GenerateRequest {
        GenerateRequest {
            request_id: 1,
            token_ids: vec![1, 2, 3],
            sampling: SamplingParams { max_tokens: 5, seed: Some(u64::MAX), ..SamplingParams::default() },
            eos_token_ids: vec![151645],
            disagg: None,
            trace: None,
        }
    }

    #[test]
    fn bodies_ask_for_ids_as_the_server_gives_them() {
        let b = completion_body(&req(), "m", IdSource::TokenIds);
        assert_eq!((b["model"].as_str(), b["max_tokens"].as_u64()), (Some("m"), Some(5)));
        assert_eq!(b["prompt"], json!([1, 2, 3]));
        assert_eq!(b["stream_options"]["include_usage"], true);
        assert_eq!(b["return_token_ids"], true);
        assert!(b.get("logprobs").is_none() && b.get("ignore_eos").is_none());
        assert!(b["seed"].as_u64().unwrap() <= 0x7fff_ffff);
        let b = completion_body(&req(), "m", IdSource::LogprobIds);
        assert_eq!(b["logprobs"], 1);
        let b = completion_body(&req(), "m", IdSource::Text);
        assert!(b.get("logprobs").is_none() && b.get("return_token_ids").is_none());
    }

    #[test]
    fn probes_find_where_ids_are() {
        assert_eq!(id_source(&json!({"text": "x", "token_ids": [5]})), IdSource::TokenIds);
        let llama = json!({"text": "x", "logprobs": {"content": [{"id": 5, "token": "x", "bytes": [120], "logprob": -0.1, "top_logprobs": []}]}});
        assert_eq!(id_source(&llama), IdSource::LogprobIds);
        let legacy = json!({"text": "x", "logprobs": {"tokens": ["x"], "token_logprobs": [-0.1]}});
        assert_eq!(id_source(&legacy), IdSource::Text);
        assert_eq!(id_source(&json!({"text": "x"})), IdSource::Text);
        assert_eq!(pick_model(&json!({"data": [{"id": "a"}, {"id": "b"}]}), "b"), "b");
        assert_eq!(pick_model(&json!({"data": [{"id": "a.gguf"}]}), "b"), "a.gguf");
    }

    #[test]
    fn chunks_of_vllm_and_llama_server() {
        // vLLM with return_token_ids: a delta, then the finish with the eos, then usage.
        let c = parse_chunk(r#"{"id":"c","object":"text_completion","choices":[{"index":0,"text":" the","token_ids":[279],"finish_reason":null}]}"#, IdSource::TokenIds).unwrap();
        assert_eq!((c.token_ids, c.finish), (vec![279], None));
        let c = parse_chunk(
            r#"{"choices":[{"index":0,"text":"","token_ids":[151645],"finish_reason":"stop","stop_reason":null}]}"#,
            IdSource::TokenIds,
        )
        .unwrap();
        assert_eq!(c.finish, Some(Ok(FinishReason::Eos)));
        let c = parse_chunk(r#"{"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":2,"total_tokens":5,"prompt_tokens_details":{"cached_tokens":2}}}"#, IdSource::TokenIds).unwrap();
        assert_eq!(c.usage, Some((3, 2)));
        // llama-server with logprobs (server-task.cpp `to_json_oaicompat`), then its final chunk.
        let c = parse_chunk(r#"{"choices":[{"text":" cat","index":0,"logprobs":{"content":[{"id":8251,"token":" cat","bytes":[32,99,97,116],"logprob":-1.2,"top_logprobs":[]}]},"finish_reason":null}],"created":1,"model":"m","object":"text_completion","id":"cmpl-1"}"#, IdSource::LogprobIds).unwrap();
        assert_eq!(c.token_ids, vec![8251]);
        let c = parse_chunk(r#"{"choices":[{"text":"","index":0,"logprobs":null,"finish_reason":"length"}],"usage":{"completion_tokens":4,"prompt_tokens":21,"total_tokens":25,"prompt_tokens_details":{"cached_tokens":18}},"object":"text_completion"}"#, IdSource::LogprobIds).unwrap();
        assert_eq!((c.finish, c.usage), (Some(Ok(FinishReason::Length)), Some((21, 18))));
        // Text only.
        let c = parse_chunk(r#"{"choices":[{"text":"Paris","finish_reason":null}]}"#, IdSource::Text).unwrap();
        assert_eq!((c.token_ids.len(), c.text.as_str()), (0, "Paris"));
        let c = parse_chunk(r#"{"choices":[{"text":"","finish_reason":"abort"}]}"#, IdSource::Text).unwrap();
        assert!(matches!(c.finish, Some(Err(e)) if e.retry));
    }

    #[test]
    fn errors_keep_the_fault() {
        let e = parse_chunk(
            r#"{"error":{"code":400,"message":"too long","type":"invalid_request_error"}}"#,
            IdSource::Text,
        )
        .unwrap_err();
        assert!(!e.retry);
        let e = parse_chunk(
            r#"{"error":{"message":"bad","type":"BadRequestError","param":null,"code":null}}"#,
            IdSource::Text,
        )
        .unwrap_err();
        assert!(!e.retry);
        let e = parse_chunk(r#"{"error":{"code":500,"message":"boom","type":"server_error"}}"#, IdSource::Text)
            .unwrap_err();
        assert!(e.retry);
    }
}
