//! The adapter to a stock SGLang server (`../shared/ENGINES.md` §1): token ids in over
//! `POST /generate` (SGLang's own sampling names; unknown ones are refused there), token ids out
//! as SSE chunks (cumulative by default, deltas with `--incremental-streaming-output`), aborts
//! over `/abort_request`, KV events from the ZMQ publisher that `/server_info` advertises, load
//! from `/v1/loads`. Disaggregated pairs pull: a prefill server advertises its bootstrap
//! `host:port`, both legs carry it with the frontend's room, and the decode server fetches the
//! KV from the prefill server itself.
//!
//! Start-up ([`connect`]) waits for `/health_generate`, then refuses, saying what to change, a
//! page size, role or model that differs from kvgate's; without KV events it warns and the
//! worker is registered as publishing none (routed approximately).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};
use tokio::sync::mpsc;

use crate::contract::{
    DisaggLeg, DisaggStyle, EngineKind, FinishReason, GenerateRequest, LoadReport, TokenId, WorkerError, WorkerOutput,
    WorkerRole,
};
use crate::worker::engine::EngineCard;

use super::http::{
    client, get_json, reachable_endpoint, run_call, send_call, url_host, wait_ready, with_trace, AdapterOptions,
    Dialect, EngineStartError, EventSource, HttpAdapter, SseReader,
};

const ENGINE: &str = "sglang";

/// SGLang's API, as [`HttpAdapter`] runs it.
#[derive(Debug)]
pub struct Sglang {
    url: String,
    /// Chunks hold only the new tokens (`--incremental-streaming-output`), else all so far.
    incremental: bool,
    page_size: u32,
    /// Makes engine request ids unique across adapters and re-sends.
    nonce: u32,
    next: AtomicU64,
    timeout: Duration,
}

/// Meets the engine at `opts.url`: waits until it generates, checks it against kvgate's
/// settings, and finds its KV-event stream and bootstrap server.
pub async fn connect(opts: &AdapterOptions) -> Result<HttpAdapter<Sglang>, EngineStartError> {
    let url = opts.url.trim_end_matches('/').to_string();
    let client = client();
    wait_ready(&client, ENGINE, &url, "/health_generate", opts.ready_timeout).await?;
    let info = server_info(&client, &url).await?;
    let host = url_host(&url);
    let mismatch = |what, engine_value: String, ours: String, fix: String| EngineStartError::Mismatch {
        engine: ENGINE,
        url: url.clone(),
        what,
        engine_value,
        ours,
        fix,
    };

    let page = info["page_size"].as_u64().unwrap_or(1) * info["dcp_size"].as_u64().unwrap_or(1).max(1);
    if page != u64::from(opts.page_size) {
        return Err(mismatch(
            "page size",
            page.to_string(),
            opts.page_size.to_string(),
            format!("start SGLang with --page-size {} or kvgate with --page-size {page}", opts.page_size),
        ));
    }
    let mode = info["disaggregation_mode"].as_str().unwrap_or("null").to_string();
    let role = match mode.as_str() {
        "prefill" => WorkerRole::Prefill,
        "decode" => WorkerRole::Decode,
        _ => WorkerRole::Aggregated,
    };
    if role != opts.role {
        let flag = match opts.role {
            WorkerRole::Aggregated => "no --disaggregation-mode".to_string(),
            r => format!("--disaggregation-mode {}", role_name(r)),
        };
        return Err(mismatch(
            "disaggregation mode",
            mode,
            role_name(opts.role).into(),
            format!("start SGLang with {flag}, or give kvgate the engine's role"),
        ));
    }
    let served = info["served_model_name"].as_str().unwrap_or_default().to_string();
    if !served.is_empty() && served != opts.served_model_name {
        return Err(mismatch(
            "served model",
            served.clone(),
            opts.served_model_name.clone(),
            format!("give kvgate --served-model-name {served} (and --model-path for its tokenizer), or point it at another engine"),
        ));
    }
    let dp = info["dp_size"].as_u64().unwrap_or(1);
    if dp > 1 {
        return Err(mismatch(
            "data-parallel size",
            dp.to_string(),
            "1".into(),
            "run one SGLang server per kvgate worker (--dp-size 1); each DP rank keeps its own cache".into(),
        ));
    }
    let events = event_source(&info, host, opts);
    if events.is_none() {
        tracing::warn!(url = %url, "the SGLang engine publishes no KV events: start it with --kv-events-config '{{\"publisher\":\"zmq\",\"endpoint\":\"tcp://*:5557\",\"replay_endpoint\":\"tcp://*:5558\"}}'; until then kvgate routes it approximately");
    }
    let bootstrap = (role == WorkerRole::Prefill).then(|| {
        let port = info["disaggregation_bootstrap_port"].as_u64().unwrap_or(8998);
        format!("{host}:{port}")
    });
    let capacity = info["max_total_num_tokens"].as_u64().unwrap_or(0) / u64::from(opts.page_size);
    let card = EngineCard {
        kind: EngineKind::Sglang,
        kv_capacity_blocks: capacity,
        max_num_seqs: info["max_running_requests"].as_u64().unwrap_or(0).min(u64::from(u32::MAX)) as u32,
        max_num_batched_tokens: info["chunked_prefill_size"].as_u64().unwrap_or(0).min(u64::from(u32::MAX)) as u32,
        disagg: DisaggStyle::Pull,
        bootstrap,
        kv_events: events.is_some(),
    };
    tracing::info!(url = %url, ?role, kv_blocks = capacity, events = ?events.as_ref().map(|e| &e.endpoint), "SGLang engine ready");
    let dialect = Sglang {
        url,
        incremental: info["incremental_streaming_output"].as_bool().unwrap_or(false),
        page_size: opts.page_size,
        nonce: rand::random(),
        timeout: opts.timeout,
        next: AtomicU64::new(0),
    };
    Ok(HttpAdapter {
        dialect: Arc::new(dialect),
        client,
        card,
        events,
        block_size: opts.page_size,
        counters: Arc::default(),
    })
}

fn role_name(r: WorkerRole) -> &'static str {
    match r {
        WorkerRole::Aggregated => "aggregated",
        WorkerRole::Prefill => "prefill",
        WorkerRole::Decode => "decode",
    }
}

async fn server_info(client: &reqwest::Client, url: &str) -> Result<Value, EngineStartError> {
    get_json(client, url, "/server_info").await.map_err(|detail| EngineStartError::Protocol {
        engine: ENGINE,
        url: url.to_string(),
        what: "its server info",
        detail,
    })
}

/// The KV-event stream `/server_info` advertises (or the flags give).
fn event_source(info: &Value, host: &str, opts: &AdapterOptions) -> Option<EventSource> {
    let kv = &info["kv_events"];
    let topic = kv["topic"].as_str().unwrap_or_default().to_string();
    let advertised = kv["endpoint_port_base"].as_u64().map(|port| {
        let h = kv["endpoint_host"].as_str().unwrap_or("*");
        reachable_endpoint(&format!("tcp://{h}:{port}"), host)
    });
    let endpoint = opts.kv_events_endpoint.clone().or(advertised)?;
    let replay = opts.replay_endpoint.clone().or_else(|| {
        kv["replay_endpoint_port_base"].as_u64().map(|port| {
            let h = kv["endpoint_host"].as_str().unwrap_or("*");
            reachable_endpoint(&format!("tcp://{h}:{port}"), host)
        })
    });
    Some(EventSource { endpoint, replay_endpoint: replay, topic })
}

impl Sglang {
    fn rid(&self, request_id: u64) -> String {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        format!("kvgate-{:08x}-{request_id:x}-{n:x}", self.nonce)
    }

    async fn abort(&self, client: &reqwest::Client, rid: &str) {
        let r = client
            .post(format!("{}/abort_request", self.url))
            .json(&json!({ "rid": rid }))
            .timeout(Duration::from_secs(5))
            .send()
            .await;
        if let Err(e) = r {
            tracing::debug!(rid, error = %e, "abort_request failed");
        }
    }
}

/// The `/generate` body of `r` (SGLang's sampling names only).
pub fn generate_body(r: &GenerateRequest, rid: &str, stream: bool) -> Value {
    let s = &r.sampling;
    let prefill_leg = matches!(r.disagg, Some(DisaggLeg::Prefill { .. }));
    let mut sampling = json!({
        // A prefill leg computes the prompt and samples the first token only.
        "max_new_tokens": if prefill_leg { 1 } else { s.max_tokens },
        "temperature": s.temperature,
        "top_p": s.top_p,
        "ignore_eos": s.ignore_eos,
    });
    if !s.ignore_eos && !r.eos_token_ids.is_empty() {
        sampling["stop_token_ids"] = json!(r.eos_token_ids);
    }
    if let Some(seed) = s.seed {
        sampling["sampling_seed"] = json!(seed);
    }
    let mut body = json!({ "rid": rid, "input_ids": r.token_ids, "sampling_params": sampling, "stream": stream });
    let (room, bootstrap) = match &r.disagg {
        Some(DisaggLeg::Prefill { room, bootstrap, .. } | DisaggLeg::Decode { room, bootstrap, .. }) => {
            (Some(*room), bootstrap.as_deref())
        }
        None => (None, None),
    };
    if let (Some(room), Some(b)) = (room, bootstrap) {
        let (host, port) = b.rsplit_once(':').unwrap_or((b, "8998"));
        body["bootstrap_host"] = json!(host);
        body["bootstrap_port"] = json!(port.parse::<u16>().unwrap_or(8998));
        // SGLang draws rooms in 0..2^63; the frontend's fit.
        body["bootstrap_room"] = json!(room & (u64::MAX >> 1));
    }
    body
}

/// One chunk of SGLang's output, parsed.
#[derive(Debug, PartialEq)]
pub struct Chunk {
    pub output_ids: Vec<TokenId>,
    pub cached_tokens: u32,
    pub prompt_tokens: u32,
    /// `Some` on the last chunk.
    pub finish: Option<Result<FinishReason, WorkerError>>,
}

/// Parses one chunk (`{"output_ids", "meta_info"}` or `{"error"}`).
pub fn parse_chunk(data: &str) -> Result<Chunk, WorkerError> {
    let v: Value = serde_json::from_str(data)
        .map_err(|e| WorkerError::worker(format!("SGLang sent a chunk that is not JSON: {e}")))?;
    if let Some(err) = v.get("error") {
        let message = err.get("message").and_then(Value::as_str).map_or_else(|| err.to_string(), str::to_string);
        let code = err.get("code").and_then(Value::as_u64).unwrap_or(500);
        return Err(if (400..500).contains(&code) {
            WorkerError::client(message)
        } else {
            WorkerError::worker(message)
        });
    }
    let ids = v["output_ids"]
        .as_array()
        .map_or_else(Vec::new, |a| a.iter().filter_map(|t| t.as_u64().map(|t| t as u32)).collect());
    let meta = &v["meta_info"];
    let finish = match &meta["finish_reason"] {
        Value::Null => None,
        f => Some(finish_reason(f)),
    };
    Ok(Chunk {
        output_ids: ids,
        cached_tokens: meta["cached_tokens"].as_u64().unwrap_or(0) as u32,
        prompt_tokens: meta["prompt_tokens"].as_u64().unwrap_or(0) as u32,
        finish,
    })
}

/// SGLang's `finish_reason` dict as kvgate's.
fn finish_reason(f: &Value) -> Result<FinishReason, WorkerError> {
    match f["type"].as_str().or_else(|| f.as_str()) {
        Some("length") => Ok(FinishReason::Length),
        Some("stop") => Ok(FinishReason::Eos),
        _ => {
            let message = f["message"].as_str().unwrap_or("aborted").to_string();
            let status = f["status_code"].as_u64().unwrap_or(500);
            Err(if (400..500).contains(&status) {
                WorkerError::client(format!("SGLang refused the request: {message}"))
            } else {
                WorkerError::worker(format!("SGLang aborted the request: {message}"))
            })
        }
    }
}

impl Dialect for Sglang {
    async fn serve(
        self: Arc<Self>,
        client: reqwest::Client,
        request: GenerateRequest,
        reply: mpsc::Sender<WorkerOutput>,
    ) {
        let rid = self.rid(request.request_id);
        let prefill_leg = matches!(request.disagg, Some(DisaggLeg::Prefill { .. }));
        let body = generate_body(&request, &rid, !prefill_leg);
        let call = self.run(&client, &request, body, prefill_leg, &reply);
        run_call(ENGINE, &rid, call, &reply, self.abort(&client, &rid)).await;
    }

    async fn load(&self, client: &reqwest::Client) -> Option<LoadReport> {
        let r = client
            .get(format!("{}/v1/loads?include=core", self.url))
            .timeout(Duration::from_secs(2))
            .send()
            .await
            .ok()?;
        let v: Value = r.json().await.ok()?;
        let page = u64::from(self.page_size.max(1));
        let mut l = LoadReport { blocks_known: true, prefill_known: true, ..LoadReport::default() };
        for d in v["loads"].as_array()? {
            l.running_requests += d["num_running_reqs"].as_u64().unwrap_or(0);
            l.waiting_requests += d["num_waiting_reqs"].as_u64().unwrap_or(0);
            l.active_blocks += d["num_used_tokens"].as_u64().unwrap_or(0).div_ceil(page);
            l.total_blocks += d["max_total_num_tokens"].as_u64().unwrap_or(0) / page;
            l.prefill_tokens += d["num_waiting_uncached_tokens"].as_u64().unwrap_or(0);
        }
        Some(l)
    }

    async fn reset(&self, client: &reqwest::Client) {
        if let Err(e) = client.post(format!("{}/flush_cache", self.url)).timeout(Duration::from_secs(30)).send().await {
            tracing::warn!(error = %e, "SGLang flush_cache failed");
        }
    }
}

impl Sglang {
    /// The call and its stream; `Err(Some)` is a failure to report, `Err(None)` a closed reply.
    async fn run(
        &self,
        client: &reqwest::Client,
        request: &GenerateRequest,
        body: Value,
        prefill_leg: bool,
        reply: &mpsc::Sender<WorkerOutput>,
    ) -> Result<(), Option<WorkerError>> {
        let call = with_trace(client.post(format!("{}/generate", self.url)).json(&body), request);
        let resp = send_call(call, prefill_leg, self.timeout, ENGINE, &self.url).await.map_err(Some)?;
        let send = |o| async { reply.send(o).await.map_err(|_| None) };
        let prompt_len = request.token_ids.len() as u32;
        if prefill_leg {
            let text =
                resp.text().await.map_err(|e| Some(WorkerError::worker(format!("SGLang's answer broke: {e}"))))?;
            let c = parse_chunk(&text).map_err(Some)?;
            let computed = prompt_len.saturating_sub(c.cached_tokens);
            send(WorkerOutput::Started { cached_tokens: c.cached_tokens, computed_tokens: computed }).await?;
            return match c.finish {
                Some(Err(e)) => Err(Some(e)),
                _ => send(WorkerOutput::Finished { reason: FinishReason::Length }).await,
            };
        }
        let decode_leg = matches!(request.disagg, Some(DisaggLeg::Decode { .. }));
        let mut sse = SseReader::new(resp, self.timeout);
        let mut seen = 0usize;
        let mut started = false;
        while let Some(data) = sse.next().await.map_err(Some)? {
            if data == "[DONE]" {
                break;
            }
            let c = parse_chunk(&data).map_err(Some)?;
            if !started {
                started = true;
                let computed = if decode_leg { 0 } else { prompt_len.saturating_sub(c.cached_tokens) };
                send(WorkerOutput::Started { cached_tokens: c.cached_tokens, computed_tokens: computed }).await?;
            }
            let mut new: Vec<TokenId> = if self.incremental {
                c.output_ids
            } else {
                c.output_ids.get(seen..).map(<[_]>::to_vec).unwrap_or_default()
            };
            seen += new.len();
            match c.finish {
                None => {}
                Some(Ok(reason)) => {
                    // The eos token that stopped generation is not output (kvgate's contract).
                    if reason == FinishReason::Eos && new.last().is_some_and(|t| request.eos_token_ids.contains(t)) {
                        new.pop();
                    }
                    if !new.is_empty() {
                        send(WorkerOutput::Tokens(new)).await?;
                    }
                    send(WorkerOutput::Finished { reason }).await?;
                    sse.drain().await;
                    return Ok(());
                }
                Some(Err(e)) => return Err(Some(e)),
            }
            if !new.is_empty() {
                send(WorkerOutput::Tokens(new)).await?;
            }
        }
        Err(Some(WorkerError::worker("SGLang's stream ended without a finish reason")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::contract::{SamplingParams, WorkerId};

    fn req(disagg: Option<DisaggLeg>) -> GenerateRequest {
        GenerateRequest {
            request_id: 7,
            token_ids: vec![1, 2, 3],
            sampling: SamplingParams { max_tokens: 9, temperature: 0.5, top_p: 0.9, seed: Some(4), ignore_eos: false },
            eos_token_ids: vec![151645],
            disagg,
            trace: None,
        }
    }

    #[test]
    fn bodies_use_sglang_names_and_carry_the_bootstrap() {
        let b = generate_body(&req(None), "r", true);
        assert_eq!(b["sampling_params"]["max_new_tokens"], 9);
        assert_eq!(b["sampling_params"]["stop_token_ids"], json!([151645]));
        assert_eq!(b["sampling_params"]["sampling_seed"], 4);
        assert!(b["sampling_params"].get("max_tokens").is_none());
        assert!(b.get("bootstrap_room").is_none());
        let leg = DisaggLeg::Prefill {
            room: u64::MAX,
            peer: WorkerId(1),
            skip_blocks: 0,
            bootstrap: Some("10.0.0.1:8998".into()),
        };
        let b = generate_body(&req(Some(leg)), "r", false);
        assert_eq!(b["sampling_params"]["max_new_tokens"], 1);
        assert_eq!((b["bootstrap_host"].as_str(), b["bootstrap_port"].as_u64()), (Some("10.0.0.1"), Some(8998)));
        assert_eq!(b["bootstrap_room"], json!(u64::MAX >> 1));
    }

    #[test]
    fn chunks_and_finish_reasons() {
        let c = parse_chunk(
            r#"{"output_ids":[5,6],"meta_info":{"id":"r","finish_reason":null,"prompt_tokens":3,"cached_tokens":2}}"#,
        )
        .unwrap();
        assert_eq!((c.output_ids, c.cached_tokens, c.finish), (vec![5, 6], 2, None));
        let c =
            parse_chunk(r#"{"output_ids":[5],"meta_info":{"finish_reason":{"type":"length","length":1}}}"#).unwrap();
        assert_eq!(c.finish, Some(Ok(FinishReason::Length)));
        let c = parse_chunk(r#"{"output_ids":[],"meta_info":{"finish_reason":{"type":"abort","message":"too long","status_code":400}}}"#).unwrap();
        assert!(matches!(c.finish, Some(Err(e)) if !e.retry));
        let e = parse_chunk(r#"{"error":{"message":"boom","code":500}}"#).unwrap_err();
        assert!(e.retry && e.message == "boom");
        assert_eq!(url_host("http://10.1.2.3:30000/"), "10.1.2.3");
    }
}
