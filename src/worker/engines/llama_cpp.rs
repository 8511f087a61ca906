//! The adapter to llama.cpp's `llama-server` (`../shared/ENGINES.md` §4, §4a): token ids in over
//! the native `POST /completion` (`prompt` as a token array, `cache_prompt`, `return_tokens`,
//! `timings_per_token`), token ids out as SSE (one token per chunk in `tokens`; the last chunk
//! has `stop: true` and `stop_type` `eos|limit|word`; no `[DONE]`), the prompt-cache hit from
//! `timings.cache_n`, readiness from `/health`, capacity from `/props` (`total_slots`,
//! `default_generation_settings.n_ctx`), load from `/slots` (busy slots) or, when the server
//! runs with `--no-slots`, from `/metrics` (`llamacpp:requests_processing`,
//! `llamacpp:requests_deferred`; needs `--metrics`).
//!
//! llama.cpp publishes no KV events: the worker registers `kv_events: false` and the frontend
//! predicts its cache from what it routes there. Its cache is per slot (`-np N`), reused for a
//! common prefix when `cache_prompt` is on (the default). No disaggregation: configuration
//! refuses `--disaggregation-mode` and role-prefixed `--engine-url`s for this engine.
//!
//! Two details of the wire, read from the server's source (`tools/server/server-context.cpp`):
//! - `tokens_cached` in the final answer counts the slot's whole cache after the request
//!   (prompt and output), not the prompt's hit; the hit is `timings.cache_n`
//!   (`n_prompt_tokens_cache`), which is what `Started.cached_tokens` reports.
//! - A token that leaves the text ending in an incomplete UTF-8 sequence gets no chunk of its
//!   own: its id never appears, and the next chunk carries its text with the next token's id
//!   (`tokens_predicted` jumps by two). With the model's tokenizer the adapter then re-encodes
//!   that chunk's `content`, so the client still gets the engine's text; without one it passes
//!   the ids it saw.
//!
//! Cancellation is dropping the HTTP stream: the server stops the slot when its client goes.
//! A streamed answer ends with the server closing the connection (despite its keep-alive
//! headers), so streams are sent with `Connection: close` and never reuse a pooled connection.

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::time::Duration;

use reqwest::header::CONNECTION;
use serde_json::{json, Value};
use tokio::sync::mpsc;

use crate::contract::{
    DisaggStyle, EngineKind, FinishReason, GenerateRequest, LoadReport, TokenId, WorkerError, WorkerOutput,
};
use crate::preprocess::Preprocessor;
use crate::worker::engine::EngineCard;

use super::http::{
    client, get_json, run_call, send_call, wait_ready, with_trace, AdapterOptions, Dialect, EngineStartError, EosHold,
    HttpAdapter, SseReader,
};

const ENGINE: &str = "llama.cpp";
/// A probe text for the vocabulary check (its Qwen3 ids are in `ENGINES.md` §4a).
const PROBE_TEXT: &str = "What is the capital of France?";

/// Where the engine's load is read from (the first that answers is kept).
const LOAD_SLOTS: u8 = 0;
const LOAD_METRICS: u8 = 1;
const LOAD_NONE: u8 = 2;

/// llama-server's API, as [`HttpAdapter`] runs it.
pub struct LlamaCpp {
    url: String,
    timeout: Duration,
    page_size: u32,
    total_slots: u32,
    /// `total_slots × n_ctx` in pages, reported as the load's total.
    capacity_blocks: u64,
    /// Re-encodes a chunk whose earlier token ids the server withheld (see the module doc).
    tokenizer: Option<Arc<Preprocessor>>,
    load_source: AtomicU8,
}

impl std::fmt::Debug for LlamaCpp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LlamaCpp").field("url", &self.url).field("total_slots", &self.total_slots).finish()
    }
}

/// Meets the server at `opts.url`: waits for `/health`, reads `/props`, checks the vocabulary
/// against `tokenizer` (the served model's) when given.
pub async fn connect(
    opts: &AdapterOptions,
    tokenizer: Option<Arc<Preprocessor>>,
) -> Result<HttpAdapter<LlamaCpp>, EngineStartError> {
    let url = opts.url.trim_end_matches('/').to_string();
    opts.aggregated_only(
        ENGINE,
        &url,
        "run llama.cpp workers aggregated (no --disaggregation-mode, no prefill=/decode= prefix)",
    )?;
    let client = client();
    wait_ready(&client, ENGINE, &url, "/health", opts.ready_timeout).await?;
    let props = get_json(&client, &url, "/props").await.map_err(|detail| EngineStartError::Protocol {
        engine: ENGINE,
        url: url.clone(),
        what: "its properties (/props)",
        detail,
    })?;
    let total_slots = props["total_slots"].as_u64().unwrap_or(1).clamp(1, u64::from(u32::MAX)) as u32;
    let n_ctx = props["default_generation_settings"]["n_ctx"].as_u64().unwrap_or(0);
    if let Some(pre) = &tokenizer {
        check_vocabulary(&client, &url, pre).await?;
    }
    let page = u64::from(opts.page_size.max(1));
    let card = EngineCard {
        kind: EngineKind::LlamaCpp,
        kv_capacity_blocks: u64::from(total_slots) * n_ctx / page,
        max_num_seqs: total_slots,
        max_num_batched_tokens: 0,
        disagg: DisaggStyle::default(),
        bootstrap: None,
        kv_events: false,
    };
    tracing::info!(url = %url, slots = total_slots, n_ctx, "llama.cpp engine ready (no KV events: routing to it is approximate)");
    let dialect = LlamaCpp {
        url,
        timeout: opts.timeout,
        page_size: opts.page_size,
        total_slots,
        capacity_blocks: card.kv_capacity_blocks,
        tokenizer,
        load_source: AtomicU8::new(LOAD_SLOTS),
    };
    Ok(HttpAdapter {
        dialect: Arc::new(dialect),
        client,
        card,
        events: None,
        block_size: opts.page_size,
        counters: Arc::default(),
    })
}

/// The server's `/tokenize` of a probe text must equal kvgate's: token ids mean the same on
/// both sides only with one vocabulary. A server without `/tokenize` is let through.
async fn check_vocabulary(client: &reqwest::Client, url: &str, pre: &Preprocessor) -> Result<(), EngineStartError> {
    let ours = pre.encode(PROBE_TEXT, false).unwrap_or_default();
    let r =
        client.post(format!("{url}/tokenize")).json(&json!({"content": PROBE_TEXT})).timeout(Duration::from_secs(30));
    let theirs: Option<Vec<u64>> = match r.send().await {
        Ok(r) if r.status().is_success() => r.json::<Value>().await.ok().and_then(|v| {
            v["tokens"].as_array().map(|a| a.iter().filter_map(|t| t.as_u64().or_else(|| t["id"].as_u64())).collect())
        }),
        _ => None,
    };
    let Some(theirs) = theirs else {
        tracing::warn!(url, "llama.cpp's /tokenize did not answer; the vocabulary is not checked");
        return Ok(());
    };
    let ours: Vec<u64> = ours.into_iter().map(u64::from).collect();
    if theirs != ours {
        return Err(EngineStartError::Mismatch {
            engine: ENGINE,
            url: url.to_string(),
            what: "tokenization of a probe text",
            engine_value: format!("{theirs:?}"),
            ours: format!("{ours:?}"),
            fix: "serve a GGUF of the same model as --model-path (token ids must mean the same on both sides)".into(),
        });
    }
    Ok(())
}

/// The `/completion` body of `r`.
pub fn completion_body(r: &GenerateRequest) -> Value {
    let s = &r.sampling;
    let mut body = json!({
        "prompt": r.token_ids,
        "n_predict": s.max_tokens,
        "temperature": s.temperature,
        "top_p": s.top_p,
        // OpenAI's sampling: no top-k or min-p cut unless asked (llama.cpp's defaults are 40, 0.05).
        "top_k": 0,
        "min_p": 0.0,
        "ignore_eos": s.ignore_eos,
        "stream": true,
        "cache_prompt": true,
        "return_tokens": true,
        // Every chunk carries `timings`, so the prompt's cache hit is known at the first one.
        "timings_per_token": true,
    });
    if let Some(seed) = s.seed {
        // llama.cpp's seed is a u32 where u32::MAX means "random".
        body["seed"] = json!(seed % u64::from(u32::MAX));
    }
    body
}

/// One streamed chunk of `/completion`.
#[derive(Debug, PartialEq, Default)]
pub struct Chunk {
    pub tokens: Vec<TokenId>,
    /// The text of this chunk (used when token ids were withheld).
    pub content: String,
    /// `Some` on the last chunk (`stop: true`).
    pub finish: Option<Result<FinishReason, WorkerError>>,
    /// Tokens generated so far (`tokens_predicted`).
    pub predicted: Option<u32>,
    /// `timings.cache_n`: prompt tokens reused from the slot's cache.
    pub cached: Option<u32>,
}

/// Parses one `/completion` stream chunk (or a whole answer), or its `{"error"}`.
pub fn parse_chunk(data: &str) -> Result<Chunk, WorkerError> {
    let v: Value = serde_json::from_str(data)
        .map_err(|e| WorkerError::worker(format!("llama.cpp sent a chunk that is not JSON: {e}")))?;
    if let Some(err) = v.get("error") {
        return Err(error_of(err));
    }
    let tokens = v["tokens"]
        .as_array()
        .map_or_else(Vec::new, |a| a.iter().filter_map(|t| t.as_u64().map(|t| t as u32)).collect());
    let finish = v["stop"].as_bool().unwrap_or(false).then(|| stop_reason(v["stop_type"].as_str()));
    Ok(Chunk {
        tokens,
        content: v["content"].as_str().unwrap_or_default().to_string(),
        finish,
        predicted: v["tokens_predicted"].as_u64().map(|n| n as u32),
        cached: v["timings"]["cache_n"].as_u64().map(|n| n as u32),
    })
}

/// llama.cpp's `{"code", "message", "type"}` as a failure: 4xx is the request's fault.
pub fn error_of(err: &Value) -> WorkerError {
    let message = err["message"].as_str().map_or_else(|| err.to_string(), str::to_string);
    let code = err["code"].as_u64().unwrap_or(500);
    if (400..500).contains(&code) && code != 429 {
        WorkerError::client(format!("llama.cpp refused the request: {message}"))
    } else {
        WorkerError::worker(format!("llama.cpp failed the request: {message}"))
    }
}

/// `stop_type` of the last chunk: `eos` (an end-of-generation token) and `word` (a stop
/// string) are a stop, `limit` is `n_predict` or the context's end.
fn stop_reason(stop_type: Option<&str>) -> Result<FinishReason, WorkerError> {
    match stop_type {
        Some("eos" | "word") => Ok(FinishReason::Eos),
        Some("limit") => Ok(FinishReason::Length),
        other => Err(WorkerError::worker(format!("llama.cpp ended the request without a reason ({other:?})"))),
    }
}

/// `/slots` as a load: busy slots, and the tokens they hold.
pub fn load_from_slots(slots: &Value, page_size: u32, total_blocks: u64) -> Option<LoadReport> {
    let page = u64::from(page_size.max(1));
    let mut l = LoadReport { total_blocks, blocks_known: true, ..LoadReport::default() };
    for s in slots.as_array()? {
        if s["is_processing"].as_bool().unwrap_or(false) {
            l.running_requests += 1;
            let decoded = s["next_token"][0]["n_decoded"].as_u64().unwrap_or(0);
            l.active_blocks += (s["n_prompt_tokens"].as_u64().unwrap_or(0) + decoded).div_ceil(page);
        }
    }
    Some(l)
}

/// `/metrics` (Prometheus text) as a load.
pub fn load_from_metrics(text: &str, total_blocks: u64) -> Option<LoadReport> {
    let read = |name: &str| {
        text.lines()
            .filter(|l| !l.starts_with('#'))
            .find_map(|l| l.strip_prefix(name)?.trim().parse::<f64>().ok())
            .map(|v| v.max(0.0) as u64)
    };
    Some(LoadReport {
        running_requests: read("llamacpp:requests_processing")?,
        waiting_requests: read("llamacpp:requests_deferred").unwrap_or(0),
        total_blocks,
        ..LoadReport::default()
    })
}

impl LlamaCpp {
    async fn run(
        &self,
        client: &reqwest::Client,
        r: &GenerateRequest,
        reply: &mpsc::Sender<WorkerOutput>,
    ) -> Result<(), Option<WorkerError>> {
        // llama-server closes the connection after a stream although its headers say keep-alive:
        // a pooled connection would be reused dead, so the stream asks for the close itself.
        let call =
            client.post(format!("{}/completion", self.url)).header(CONNECTION, "close").json(&completion_body(r));
        let call = with_trace(call, r);
        let resp = send_call(call, false, self.timeout, ENGINE, &self.url).await.map_err(Some)?;
        let send = |o| async { reply.send(o).await.map_err(|_| None) };
        let prompt_len = r.token_ids.len() as u32;
        let mut sse = SseReader::new(resp, self.timeout);
        let mut eos = EosHold::new(&r.eos_token_ids, !r.sampling.ignore_eos);
        let mut started = false;
        let mut seen: u32 = 0;
        while let Some(data) = sse.next().await.map_err(Some)? {
            if data == "[DONE]" {
                break;
            }
            let mut c = parse_chunk(&data).map_err(Some)?;
            if !started && (c.cached.is_some() || c.finish.is_some()) {
                started = true;
                let cached = c.cached.unwrap_or(0).min(prompt_len);
                send(WorkerOutput::Started { cached_tokens: cached, computed_tokens: prompt_len - cached }).await?;
            }
            let withheld = c.predicted.is_some_and(|p| p > seen + c.tokens.len() as u32);
            seen = c.predicted.unwrap_or(seen + c.tokens.len() as u32);
            if withheld && !c.content.is_empty() {
                if let Some(ids) = self.tokenizer.as_ref().and_then(|t| t.encode(&c.content, false).ok()) {
                    c.tokens = ids;
                }
            }
            let mut out = eos.push(c.tokens);
            if let Some(finish) = c.finish {
                let reason = finish.map_err(Some)?;
                out.extend(eos.finish(reason));
                if !out.is_empty() {
                    send(WorkerOutput::Tokens(out)).await?;
                }
                send(WorkerOutput::Finished { reason }).await?;
                sse.drain().await;
                return Ok(());
            }
            if !out.is_empty() {
                send(WorkerOutput::Tokens(out)).await?;
            }
        }
        Err(Some(WorkerError::worker("llama.cpp's stream ended without a stop")))
    }

    async fn load_slots(&self, client: &reqwest::Client) -> Option<LoadReport> {
        let r = client.get(format!("{}/slots", self.url)).timeout(Duration::from_secs(2)).send().await.ok()?;
        if !r.status().is_success() {
            return None;
        }
        load_from_slots(&r.json().await.ok()?, self.page_size, self.capacity_blocks)
    }

    async fn load_metrics(&self, client: &reqwest::Client) -> Option<LoadReport> {
        let r = client.get(format!("{}/metrics", self.url)).timeout(Duration::from_secs(2)).send().await.ok()?;
        if !r.status().is_success() {
            return None;
        }
        load_from_metrics(&r.text().await.ok()?, self.capacity_blocks)
    }
}

impl Dialect for LlamaCpp {
    async fn serve(
        self: Arc<Self>,
        client: reqwest::Client,
        request: GenerateRequest,
        reply: mpsc::Sender<WorkerOutput>,
    ) {
        let rid = format!("{:x}", request.request_id);
        let call = self.run(&client, &request, &reply);
        // Dropping the stream is the abort: llama-server stops a slot whose client is gone.
        run_call(ENGINE, &rid, call, &reply, async {}).await;
    }

    async fn load(&self, client: &reqwest::Client) -> Option<LoadReport> {
        match self.load_source.load(Ordering::Relaxed) {
            LOAD_SLOTS => {
                if let Some(l) = self.load_slots(client).await {
                    return Some(l);
                }
                if let Some(l) = self.load_metrics(client).await {
                    tracing::info!(url = %self.url, "llama.cpp's /slots is off; its load comes from /metrics");
                    self.load_source.store(LOAD_METRICS, Ordering::Relaxed);
                    return Some(l);
                }
                tracing::info!(url = %self.url, "llama.cpp reports no load (/slots off, no --metrics); kvgate uses its own booking");
                self.load_source.store(LOAD_NONE, Ordering::Relaxed);
                None
            }
            LOAD_METRICS => self.load_metrics(client).await,
            _ => None,
        }
    }

    async fn reset(&self, client: &reqwest::Client) {
        // Erasing a slot needs the server's --slot-save-path; without it the caches stay.
        for id in 0..self.total_slots {
            let r = client
                .post(format!("{}/slots/{id}?action=erase", self.url))
                .timeout(Duration::from_secs(10))
                .send()
                .await;
            match r {
                Ok(r) if r.status().is_success() => {}
                Ok(r) => {
                    tracing::warn!(status = %r.status(), "llama.cpp refused to erase its slots (it needs --slot-save-path)");
                    return;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "llama.cpp slot erase failed");
                    return;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::contract::SamplingParams;

    fn req() -> GenerateRequest {
        GenerateRequest {
            request_id: 7,
            token_ids: vec![3838, 374, 279],
            sampling: SamplingParams {
                max_tokens: 9,
                temperature: 0.5,
                top_p: 0.9,
                seed: Some(u64::MAX),
                ignore_eos: false,
            },
            eos_token_ids: vec![151645],
            disagg: None,
            trace: None,
        }
    }

    #[test]
    fn the_body_uses_llama_cpp_names() {
        let b = completion_body(&req());
        assert_eq!(b["prompt"], json!([3838, 374, 279]));
        assert_eq!(b["n_predict"], 9);
        assert_eq!((b["cache_prompt"].as_bool(), b["return_tokens"].as_bool()), (Some(true), Some(true)));
        assert_eq!(b["stream"], true);
        assert!(b["seed"].as_u64().unwrap() < u64::from(u32::MAX));
        assert!(b.get("max_tokens").is_none());
    }

    #[test]
    fn stream_chunks_as_the_server_sends_them() {
        // A partial chunk (server-task.cpp `to_json_non_oaicompat`) with timings_per_token.
        let c = parse_chunk(
            r#"{"index":0,"content":" the","tokens":[279],"stop":false,"id_slot":1,"tokens_predicted":1,"tokens_evaluated":21,"timings":{"cache_n":18,"prompt_n":3,"prompt_ms":1.5,"predicted_n":1}}"#,
        )
        .unwrap();
        assert_eq!((c.tokens, c.finish, c.predicted, c.cached), (vec![279], None, Some(1), Some(18)));
        // The final chunk of a stream: no content, no tokens.
        let last = r#"{"index":0,"content":"","tokens":[],"id_slot":1,"stop":true,"model":"m","tokens_predicted":4,"tokens_evaluated":21,"generation_settings":{},"prompt":"","has_new_line":false,"truncated":false,"stop_type":"limit","stopping_word":"","tokens_cached":24,"timings":{"cache_n":18,"prompt_n":3}}"#;
        assert_eq!(parse_chunk(last).unwrap().finish, Some(Ok(FinishReason::Length)));
        let eos = last.replace("\"limit\"", "\"eos\"");
        assert_eq!(parse_chunk(&eos).unwrap().finish, Some(Ok(FinishReason::Eos)));
        let word = last.replace("\"limit\"", "\"word\"");
        assert_eq!(parse_chunk(&word).unwrap().finish, Some(Ok(FinishReason::Eos)));
        let none = last.replace("\"limit\"", "\"none\"");
        assert!(matches!(parse_chunk(&none).unwrap().finish, Some(Err(e)) if e.retry));
    }

    #[test]
    fn errors_keep_the_fault() {
        let e = parse_chunk(r#"{"error":{"code":400,"message":"the request exceeds the available context size","type":"exceed_context_size_error"}}"#).unwrap_err();
        assert!(!e.retry && e.message.contains("context size"));
        let e =
            parse_chunk(r#"{"error":{"code":503,"message":"Loading model","type":"unavailable_error"}}"#).unwrap_err();
        assert!(e.retry);
        assert!(parse_chunk("not json").unwrap_err().retry);
    }

    #[test]
    fn load_from_slots_and_metrics() {
        let slots = json!([
            {"id":0,"n_ctx":4096,"is_processing":true,"n_prompt_tokens":20,"next_token":[{"has_next_token":true,"n_decoded":4}]},
            {"id":1,"n_ctx":4096,"is_processing":false,"n_prompt_tokens":33},
        ]);
        let l = load_from_slots(&slots, 16, 512).unwrap();
        assert_eq!((l.running_requests, l.active_blocks, l.total_blocks), (1, 2, 512));
        let text = "# HELP llamacpp:requests_processing Number of requests processing\n# TYPE llamacpp:requests_processing gauge\nllamacpp:requests_processing 3\nllamacpp:requests_deferred 2\n";
        let l = load_from_metrics(text, 0).unwrap();
        assert_eq!((l.running_requests, l.waiting_requests), (3, 2));
        assert!(load_from_metrics("other 1\n", 0).is_none());
    }
}
