//! The adapter to a stock vLLM server (`../shared/ENGINES.md` §2): token ids in over the native
//! `POST /inference/v1/generate` (`--enable-scale-out` or `--tokens-only`; `max_tokens` always
//! set), token-id deltas out as SSE, usage (with cached tokens) in the last chunk, aborts over
//! `/inference/v1/abort_requests` (by vLLM's `generate-tokens-<id>`), KV events from the ZMQ
//! publisher `/kv_event_sources` lists, load from `/load`. Disaggregated pairs run one leg
//! after the other: the prefill leg (non-streaming, one token, `do_remote_decode`) returns
//! `kv_transfer_params`, which the frontend passes to the decode leg as a handoff; both legs
//! share one request id.
//!
//! Start-up ([`connect`]) waits for `/health`, checks the served model and that the token-id
//! route is enabled, and finds the event stream; a block size that differs from kvgate's shows
//! in the first stored event and is refused there with a counted error and a logged fix.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};
use tokio::sync::mpsc;

use crate::contract::{
    DisaggLeg, DisaggStyle, EngineKind, FinishReason, GenerateRequest, LoadReport, TokenId, WorkerError, WorkerOutput,
};
use crate::worker::engine::EngineCard;

use super::http::{
    client, get_json, openai_finish, openai_usage, reachable_endpoint, run_call, send_call, url_host, wait_ready,
    with_trace, AdapterOptions, Dialect, EngineStartError, EventSource, HttpAdapter, SseReader,
};

const ENGINE: &str = "vllm";

/// vLLM's API, as [`HttpAdapter`] runs it.
#[derive(Debug)]
pub struct Vllm {
    url: String,
    nonce: u32,
    next: AtomicU64,
    timeout: Duration,
}

/// Meets the engine at `opts.url`: waits for `/health`, checks it, finds its KV events.
pub async fn connect(opts: &AdapterOptions) -> Result<HttpAdapter<Vllm>, EngineStartError> {
    let url = opts.url.trim_end_matches('/').to_string();
    let client = client();
    wait_ready(&client, ENGINE, &url, "/health", opts.ready_timeout).await?;
    let protocol = |what, detail: String| EngineStartError::Protocol { engine: ENGINE, url: url.clone(), what, detail };
    let models = get_json(&client, &url, "/v1/models").await.map_err(|d| protocol("its model list", d))?;
    let served: Vec<&str> =
        models["data"].as_array().map_or_else(Vec::new, |a| a.iter().filter_map(|m| m["id"].as_str()).collect());
    if !served.is_empty() && !served.contains(&opts.served_model_name.as_str()) {
        return Err(EngineStartError::Mismatch {
            engine: ENGINE,
            url: url.clone(),
            what: "served model",
            engine_value: served.join(", "),
            ours: opts.served_model_name.clone(),
            fix: format!("give kvgate --served-model-name {} (and --model-path for its tokenizer)", served[0]),
        });
    }
    // The token-id route answers 403 unless the server runs with --enable-scale-out / --tokens-only.
    let probe = json!({"token_ids": [0], "sampling_params": {"max_tokens": 1}, "stream": false});
    let r = client
        .post(format!("{url}/inference/v1/generate"))
        .json(&probe)
        .timeout(Duration::from_secs(60))
        .send()
        .await
        .map_err(|source| EngineStartError::Unreachable { engine: ENGINE, url: url.clone(), source })?;
    if matches!(r.status().as_u16(), 403 | 404) {
        return Err(EngineStartError::Mismatch {
            engine: ENGINE,
            url: url.clone(),
            what: "token-id route /inference/v1/generate",
            engine_value: format!("off ({})", r.status()),
            ours: "needed".into(),
            fix: "start vLLM with --enable-scale-out (or --tokens-only)".into(),
        });
    }
    let sources = get_json(&client, &url, "/kv_event_sources").await.unwrap_or(Value::Null);
    let events = event_source(&sources, url_host(&url), opts);
    if events.is_none() {
        tracing::warn!(url = %url, "the vLLM engine publishes no KV events: start it with --kv-events-config '{{\"enable_kv_cache_events\":true,\"publisher\":\"zmq\",\"endpoint\":\"tcp://*:5557\",\"replay_endpoint\":\"tcp://*:5558\"}}' (and prefix caching on); until then kvgate routes it approximately");
    }
    let card = EngineCard {
        kind: EngineKind::Vllm,
        kv_capacity_blocks: 0,
        max_num_seqs: 0,
        max_num_batched_tokens: 0,
        disagg: DisaggStyle::Sequential,
        bootstrap: None,
        kv_events: events.is_some(),
    };
    tracing::info!(url = %url, role = ?opts.role, events = ?events.as_ref().map(|e| &e.endpoint), "vLLM engine ready");
    let dialect = Vllm { url, nonce: rand::random(), timeout: opts.timeout, next: AtomicU64::new(0) };
    Ok(HttpAdapter {
        dialect: Arc::new(dialect),
        client,
        card,
        events,
        block_size: opts.page_size,
        counters: Arc::default(),
    })
}

/// Rank 0's stream from `/kv_event_sources` (`{"0": {"endpoint", "replay_endpoint", "topic"}}`).
fn event_source(sources: &Value, host: &str, opts: &AdapterOptions) -> Option<EventSource> {
    let rank = &sources["0"];
    let on = rank["enable_kv_cache_events"].as_bool().unwrap_or(false) && rank["publisher"].as_str() == Some("zmq");
    let advertised = on.then(|| rank["endpoint"].as_str()).flatten().map(|e| reachable_endpoint(e, host));
    let endpoint = opts.kv_events_endpoint.clone().or(advertised)?;
    let replay =
        opts.replay_endpoint.clone().or_else(|| rank["replay_endpoint"].as_str().map(|e| reachable_endpoint(e, host)));
    Some(EventSource {
        endpoint,
        replay_endpoint: replay,
        topic: rank["topic"].as_str().unwrap_or_default().to_string(),
    })
}

/// The `/inference/v1/generate` body of `r` under request id `rid`.
pub fn generate_body(r: &GenerateRequest, rid: &str) -> Result<Value, WorkerError> {
    let s = &r.sampling;
    let prefill_leg = matches!(r.disagg, Some(DisaggLeg::Prefill { .. }));
    let mut sampling = json!({
        "max_tokens": if prefill_leg { 1 } else { s.max_tokens },
        "temperature": s.temperature,
        "top_p": s.top_p,
        "ignore_eos": s.ignore_eos,
        "detokenize": false,
        "skip_special_tokens": false,
    });
    if !s.ignore_eos && !r.eos_token_ids.is_empty() {
        sampling["stop_token_ids"] = json!(r.eos_token_ids);
    }
    if let Some(seed) = s.seed {
        sampling["seed"] = json!(seed);
    }
    let mut body = json!({ "request_id": rid, "token_ids": r.token_ids, "sampling_params": sampling });
    match &r.disagg {
        None => {
            body["stream"] = json!(true);
            body["stream_options"] = json!({"include_usage": true});
        }
        Some(DisaggLeg::Prefill { .. }) => {
            body["stream"] = json!(false);
            body["kv_transfer_params"] = json!({
                "do_remote_decode": true, "do_remote_prefill": false, "remote_engine_id": null,
                "remote_block_ids": null, "remote_host": null, "remote_port": null,
            });
        }
        Some(DisaggLeg::Decode { handoff, .. }) => {
            body["stream"] = json!(true);
            body["stream_options"] = json!({"include_usage": true});
            let params: Value = match handoff {
                Some(h) => serde_json::from_str(h).map_err(|e| {
                    WorkerError::worker(format!("the prefill leg's kv_transfer_params are not JSON: {e}"))
                })?,
                None => {
                    return Err(WorkerError::worker("a vLLM decode leg needs the prefill leg's kv_transfer_params"))
                }
            };
            body["kv_transfer_params"] = params;
        }
    }
    Ok(body)
}

/// One streamed chunk's tokens, finish and usage.
#[derive(Debug, PartialEq, Default)]
pub struct Chunk {
    pub token_ids: Vec<TokenId>,
    pub finish: Option<Result<FinishReason, WorkerError>>,
    /// `(prompt_tokens, cached_tokens)` when the chunk carries usage.
    pub usage: Option<(u32, u32)>,
}

pub fn parse_chunk(data: &str) -> Result<Chunk, WorkerError> {
    let v: Value = serde_json::from_str(data)
        .map_err(|e| WorkerError::worker(format!("vLLM sent a chunk that is not JSON: {e}")))?;
    if let Some(err) = v.get("error") {
        let message = err["message"].as_str().map_or_else(|| err.to_string(), str::to_string);
        let code = err["code"].as_u64().unwrap_or(500);
        return Err(if (400..500).contains(&code) {
            WorkerError::client(message)
        } else {
            WorkerError::worker(message)
        });
    }
    let mut c = Chunk::default();
    if let Some(choice) = v["choices"].as_array().and_then(|a| a.first()) {
        c.token_ids = choice["token_ids"]
            .as_array()
            .map_or_else(Vec::new, |a| a.iter().filter_map(|t| t.as_u64().map(|t| t as u32)).collect());
        c.finish = openai_finish(choice, "vLLM");
    }
    c.usage = openai_usage(&v);
    Ok(c)
}

impl Vllm {
    /// One id for both legs of a disaggregated request (from its room), else a fresh one.
    fn rid(&self, r: &GenerateRequest) -> String {
        match &r.disagg {
            Some(DisaggLeg::Prefill { room, .. } | DisaggLeg::Decode { room, .. }) => format!("kvgate-{room:x}"),
            None => {
                let n = self.next.fetch_add(1, Ordering::Relaxed);
                format!("kvgate-{:08x}-{:x}-{n:x}", self.nonce, r.request_id)
            }
        }
    }

    async fn abort(&self, client: &reqwest::Client, rid: &str) {
        let body = json!({ "request_ids": [format!("generate-tokens-{rid}")] });
        let r = client
            .post(format!("{}/inference/v1/abort_requests", self.url))
            .json(&body)
            .timeout(Duration::from_secs(5))
            .send()
            .await;
        if let Err(e) = r {
            tracing::debug!(rid, error = %e, "abort_requests failed");
        }
    }

    async fn run(
        &self,
        client: &reqwest::Client,
        r: &GenerateRequest,
        rid: &str,
        reply: &mpsc::Sender<WorkerOutput>,
    ) -> Result<(), Option<WorkerError>> {
        let body = generate_body(r, rid).map_err(Some)?;
        let prefill_leg = matches!(r.disagg, Some(DisaggLeg::Prefill { .. }));
        let call = client.post(format!("{}/inference/v1/generate", self.url)).header("X-Request-Id", rid).json(&body);
        let call = with_trace(call, r);
        let resp = send_call(call, prefill_leg, self.timeout, ENGINE, &self.url).await.map_err(Some)?;
        let send = |o| async { reply.send(o).await.map_err(|_| None) };
        let prompt_len = r.token_ids.len() as u32;
        if prefill_leg {
            let v: Value =
                resp.json().await.map_err(|e| Some(WorkerError::worker(format!("vLLM's answer broke: {e}"))))?;
            let c = parse_chunk(&v.to_string()).map_err(Some)?;
            if let Some(Err(e)) = c.finish {
                return Err(Some(e));
            }
            let params = v.get("kv_transfer_params").filter(|p| !p.is_null()).ok_or_else(|| {
                Some(WorkerError::worker("vLLM's prefill answer carries no kv_transfer_params: is it started with a KV connector (--kv-transfer-config)?"))
            })?;
            let cached = c.usage.map_or(0, |u| u.1);
            send(WorkerOutput::Started { cached_tokens: cached, computed_tokens: prompt_len.saturating_sub(cached) })
                .await?;
            send(WorkerOutput::Handoff(params.to_string())).await?;
            return send(WorkerOutput::Finished { reason: FinishReason::Length }).await;
        }
        let decode_leg = matches!(r.disagg, Some(DisaggLeg::Decode { .. }));
        let mut sse = SseReader::new(resp, self.timeout);
        let mut finish = None;
        let mut usage = None;
        while let Some(data) = sse.next().await.map_err(Some)? {
            if data == "[DONE]" {
                sse.drain().await;
                break;
            }
            let mut c = parse_chunk(&data).map_err(Some)?;
            usage = c.usage.or(usage);
            match c.finish.take() {
                Some(Err(e)) => return Err(Some(e)),
                Some(Ok(reason)) => {
                    if reason == FinishReason::Eos && c.token_ids.last().is_some_and(|t| r.eos_token_ids.contains(t)) {
                        c.token_ids.pop();
                    }
                    finish = Some(reason);
                }
                None => {}
            }
            if !c.token_ids.is_empty() {
                send(WorkerOutput::Tokens(c.token_ids)).await?;
            }
        }
        let Some(reason) = finish else {
            return Err(Some(WorkerError::worker("vLLM's stream ended without a finish reason")));
        };
        // vLLM reports cached tokens only in its last (usage) chunk.
        let cached = usage.map_or(0, |u| u.1);
        let computed = if decode_leg { 0 } else { prompt_len.saturating_sub(cached) };
        send(WorkerOutput::Started { cached_tokens: cached, computed_tokens: computed }).await?;
        send(WorkerOutput::Finished { reason }).await
    }
}

impl Dialect for Vllm {
    async fn serve(
        self: Arc<Self>,
        client: reqwest::Client,
        request: GenerateRequest,
        reply: mpsc::Sender<WorkerOutput>,
    ) {
        let rid = self.rid(&request);
        let call = self.run(&client, &request, &rid, &reply);
        run_call(ENGINE, &rid, call, &reply, self.abort(&client, &rid)).await;
    }

    async fn load(&self, client: &reqwest::Client) -> Option<LoadReport> {
        let r = client.get(format!("{}/load", self.url)).timeout(Duration::from_secs(2)).send().await.ok()?;
        let v: Value = r.json().await.ok()?;
        Some(LoadReport { running_requests: v["server_load"].as_u64()?, ..LoadReport::default() })
    }

    async fn reset(&self, client: &reqwest::Client) {
        if let Err(e) =
            client.post(format!("{}/reset_prefix_cache", self.url)).timeout(Duration::from_secs(30)).send().await
        {
            tracing::warn!(error = %e, "vLLM reset_prefix_cache failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::contract::{SamplingParams, WorkerId};

    fn req(disagg: Option<DisaggLeg>) -> GenerateRequest {
        GenerateRequest {
            request_id: 1,
            token_ids: vec![1, 2],
            sampling: SamplingParams { max_tokens: 5, ..SamplingParams::default() },
            eos_token_ids: vec![151645],
            disagg,
            trace: None,
        }
    }

    #[test]
    fn legs_carry_kv_transfer_params_and_max_tokens_is_always_set() {
        let b = generate_body(&req(None), "r").unwrap();
        assert_eq!((b["sampling_params"]["max_tokens"].as_u64(), b["stream"].as_bool()), (Some(5), Some(true)));
        let p = DisaggLeg::Prefill { room: 9, peer: WorkerId(1), skip_blocks: 0, bootstrap: None };
        let b = generate_body(&req(Some(p)), "r").unwrap();
        assert_eq!((b["sampling_params"]["max_tokens"].as_u64(), b["stream"].as_bool()), (Some(1), Some(false)));
        assert_eq!(b["kv_transfer_params"]["do_remote_decode"], true);
        let d = DisaggLeg::Decode {
            room: 9,
            peer: WorkerId(2),
            skip_blocks: 0,
            bootstrap: None,
            handoff: Some(r#"{"remote_host":"h"}"#.into()),
        };
        let b = generate_body(&req(Some(d)), "r").unwrap();
        assert_eq!(b["kv_transfer_params"]["remote_host"], "h");
        let d = DisaggLeg::Decode { room: 9, peer: WorkerId(2), skip_blocks: 0, bootstrap: None, handoff: None };
        assert!(generate_body(&req(Some(d)), "r").is_err());
    }

    #[test]
    fn chunks_tokens_finish_and_usage() {
        let c = parse_chunk(r#"{"request_id":"x","choices":[{"index":0,"token_ids":[4,5],"finish_reason":null}]}"#)
            .unwrap();
        assert_eq!((c.token_ids, c.finish, c.usage), (vec![4, 5], None, None));
        let c = parse_chunk(r#"{"choices":[],"usage":{"prompt_tokens":32,"completion_tokens":2,"prompt_tokens_details":{"cached_tokens":16}}}"#).unwrap();
        assert_eq!(c.usage, Some((32, 16)));
        let c = parse_chunk(r#"{"choices":[{"token_ids":[],"finish_reason":"abort"}]}"#).unwrap();
        assert!(matches!(c.finish, Some(Err(_))));
    }
}
