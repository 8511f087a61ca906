//! Sends jobs (open loop at their arrival times, or closed loop at a fixed concurrency) and
//! measures each request: TTFT, the gaps between tokens, end-to-end latency, tokens, cached
//! tokens, the worker that served it, and errors.
//!
//! Invariant: every job sent produces one [`Record`] per request it sent (a failed session turn
//! ends its session). Concurrency: single-threaded; all tasks run on one `LocalSet` and share
//! [`Results`] through a `RefCell` (never held across an await).

use std::borrow::Cow;
use std::cell::RefCell;
use std::collections::VecDeque;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::sync::Semaphore;

use crate::http::Client;
use crate::workload::{render, Job, Prompt, RequestSpec, Scheduled, Session, TokenSpace, Turns};

/// Inter-token gaps kept for percentiles: 8 B per 2 tokens; 50 M is ~200 MB, beyond any run
/// this machine can drive (later gaps are dropped and counted).
const MAX_ITL_SAMPLES: usize = 50_000_000;
/// Error messages logged in full; later ones are only counted.
const MAX_LOGGED_ERRORS: usize = 10;

/// One request's measurements. Times in ms; `start_s` from the run's start.
#[derive(Debug, Clone, Serialize)]
pub struct Record {
    pub start_s: f64,
    /// How late the request was sent against its schedule (open loop only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub schedule_lag_ms: Option<f64>,
    pub ttft_ms: Option<f64>,
    pub e2e_ms: f64,
    /// Mean gap between tokens after the first.
    pub tpot_ms: Option<f64>,
    pub output_tokens: u32,
    pub prompt_tokens: u32,
    pub cached_tokens: u32,
    pub worker: Option<String>,
    pub error: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub session: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub turn: Option<u32>,
}

#[derive(Default)]
pub struct Results {
    pub records: Vec<Record>,
    pub itl_ms: Vec<f32>,
    pub itl_dropped: u64,
    errors_logged: usize,
}

/// Open loop (jobs start at their times, at most `max_inflight` at once) or closed loop.
#[derive(Debug, Clone, Copy)]
pub enum Loop {
    Open { max_inflight: usize },
    Closed { concurrency: usize },
}

pub struct Driver {
    /// One client per `--url`; requests take them in turn (several frontends behind a
    /// round-robin balancer).
    pub clients: Vec<Rc<Client>>,
    pub next_client: std::cell::Cell<usize>,
    pub model: String,
    pub space: TokenSpace,
    pub timeout: Duration,
    pub start: Instant,
    pub results: RefCell<Results>,
    /// `--dump-blocks`: each token prompt's segments, one JSON line per request as it is sent.
    pub dump: RefCell<Option<std::io::BufWriter<std::fs::File>>>,
}

// ---- the streamed chunk, as far as we read it ----

#[derive(Deserialize)]
struct Chunk<'a> {
    #[serde(default, borrow)]
    choices: Vec<Choice<'a>>,
    usage: Option<Usage>,
    error: Option<serde::de::IgnoredAny>,
}

#[derive(Deserialize)]
struct Choice<'a> {
    #[serde(borrow)]
    text: Option<Cow<'a, str>>,
    #[serde(borrow)]
    delta: Option<Delta<'a>>,
}

#[derive(Deserialize)]
struct Delta<'a> {
    #[serde(borrow)]
    content: Option<Cow<'a, str>>,
}

#[derive(Deserialize)]
struct Usage {
    prompt_tokens: u32,
    completion_tokens: u32,
    prompt_tokens_details: Option<Details>,
}

#[derive(Deserialize)]
struct Details {
    cached_tokens: Option<u32>,
}

/// What one exchange produced, before it becomes a [`Record`].
#[derive(Default)]
struct Outcome {
    ttft: Option<Duration>,
    last: Option<Duration>,
    content_chunks: u32,
    usage: Option<(u32, u32, u32)>,
    worker: Option<String>,
    text: String,
    gaps_ms: Vec<f32>,
}

impl Driver {
    pub async fn run(self: &Rc<Self>, jobs: Vec<Scheduled>, mode: Loop) {
        match mode {
            Loop::Open { max_inflight } => self.open(jobs, max_inflight).await,
            Loop::Closed { concurrency } => self.closed(jobs, concurrency).await,
        }
    }

    async fn open(self: &Rc<Self>, jobs: Vec<Scheduled>, max_inflight: usize) {
        let sem = Arc::new(Semaphore::new(max_inflight));
        for s in jobs {
            let due = self.start + s.at.unwrap_or_default();
            tokio::time::sleep_until(due.into()).await;
            let permit = sem.clone().acquire_owned().await.expect("never closed");
            let me = self.clone();
            tokio::task::spawn_local(async move {
                me.job(s.job, Some(due)).await;
                drop(permit);
            });
        }
        let _all = sem.acquire_many(max_inflight as u32).await.expect("never closed");
    }

    async fn closed(self: &Rc<Self>, jobs: Vec<Scheduled>, concurrency: usize) {
        let queue = Rc::new(RefCell::new(jobs.into_iter().map(|s| s.job).collect::<VecDeque<_>>()));
        let tasks: Vec<_> = (0..concurrency)
            .map(|_| {
                let (me, queue) = (self.clone(), queue.clone());
                tokio::task::spawn_local(async move {
                    loop {
                        let next = queue.borrow_mut().pop_front();
                        let Some(job) = next else { break };
                        me.job(job, None).await;
                    }
                })
            })
            .collect();
        for t in tasks {
            t.await.expect("a request task panicked");
        }
    }

    async fn job(&self, job: Job, due: Option<Instant>) {
        match job {
            Job::Single(spec) => {
                self.request(&spec, due, None, false).await;
            }
            Job::Session(s) => self.session(&s, due).await,
            Job::Turns(t) => self.turns(&t, due).await,
        }
    }

    /// A trace conversation: each turn when the previous one finished; a failed turn ends it.
    async fn turns(&self, t: &Turns, due: Option<Instant>) {
        for (turn, spec) in t.requests.iter().enumerate() {
            let due = if turn == 0 { due } else { None };
            if self.request(spec, due, Some((t.id, turn as u32)), false).await.is_none() {
                return;
            }
        }
    }

    /// Writes `spec`'s prompt to the `--dump-blocks` file (token prompts only; the CLI refuses
    /// other workloads with the flag).
    fn dump(&self, spec: &RequestSpec, session: Option<(u64, u32)>) {
        use std::io::Write;
        let mut dump = self.dump.borrow_mut();
        let (Some(w), Prompt::Tokens(segments)) = (dump.as_mut(), &spec.prompt) else { return };
        let line = serde_json::json!({
            "t_s": self.start.elapsed().as_secs_f64(),
            "session": session.map(|s| s.0),
            "turn": session.map(|s| s.1),
            "max_tokens": spec.max_tokens,
            "segments": segments.iter().map(|s| [s.id, u64::from(s.len)]).collect::<Vec<_>>(),
        });
        if serde_json::to_writer(&mut *w, &line).is_err() || w.write_all(b"\n").is_err() {
            tracing::warn!("--dump-blocks: write failed; no more prompts are dumped");
            *dump = None;
        }
    }

    async fn session(&self, s: &Session, due: Option<Instant>) {
        let mut history: Vec<(&'static str, String)> = vec![("system", s.system.clone())];
        for (turn, user) in s.users.iter().enumerate() {
            history.push(("user", user.clone()));
            let prompt = if s.chat {
                Prompt::Messages(history.clone())
            } else {
                let mut text = String::new();
                for (role, content) in &history {
                    text.push_str(&format!("{role}: {content}\n"));
                }
                text.push_str("assistant:");
                Prompt::Text(text)
            };
            let spec = RequestSpec { prompt, max_tokens: s.max_tokens };
            let due = if turn == 0 { due } else { None };
            match self.request(&spec, due, Some((s.id, turn as u32)), true).await {
                Some(answer) => history.push(("assistant", answer)),
                None => return,
            }
        }
    }

    /// Sends one request and records it; the answer's text when `collect` and it succeeded.
    async fn request(
        &self,
        spec: &RequestSpec,
        due: Option<Instant>,
        session: Option<(u64, u32)>,
        collect: bool,
    ) -> Option<String> {
        self.dump(spec, session);
        let (path, body) = render(&self.model, &spec.prompt, spec.max_tokens, self.space);
        let t0 = Instant::now();
        let mut out = Outcome::default();
        let result = tokio::time::timeout(self.timeout, self.exchange(path, &body, t0, collect, &mut out)).await;
        let e2e = t0.elapsed();
        let error = match result {
            Ok(Ok(())) => None,
            Ok(Err(e)) => Some(e),
            Err(_) => Some(("timeout", format!("no end of stream after {:?}", self.timeout))),
        };
        let (prompt_tokens, output_tokens, cached_tokens) = out.usage.unwrap_or((0, out.content_chunks, 0));
        let tpot_ms = match (out.ttft, out.last) {
            (Some(f), Some(l)) if output_tokens > 1 => Some((l - f).as_secs_f64() * 1e3 / f64::from(output_tokens - 1)),
            _ => None,
        };
        let rec = Record {
            start_s: (t0 - self.start).as_secs_f64(),
            schedule_lag_ms: due.map(|d| t0.saturating_duration_since(d).as_secs_f64() * 1e3),
            ttft_ms: out.ttft.map(|d| d.as_secs_f64() * 1e3),
            e2e_ms: e2e.as_secs_f64() * 1e3,
            tpot_ms,
            output_tokens,
            prompt_tokens,
            cached_tokens,
            worker: out.worker.take(),
            error: error.as_ref().map(|(kind, _)| kind.to_string()),
            session: session.map(|s| s.0),
            turn: session.map(|s| s.1),
        };
        let mut r = self.results.borrow_mut();
        if let Some((kind, msg)) = &error {
            if r.errors_logged < MAX_LOGGED_ERRORS {
                r.errors_logged += 1;
                tracing::warn!("request failed ({kind}): {msg}");
            }
        }
        let room = MAX_ITL_SAMPLES.saturating_sub(r.itl_ms.len());
        r.itl_dropped += out.gaps_ms.len().saturating_sub(room) as u64;
        r.itl_ms.extend(out.gaps_ms.iter().take(room));
        r.records.push(rec);
        error.is_none().then_some(out.text)
    }

    async fn exchange(
        &self,
        path: &str,
        body: &[u8],
        t0: Instant,
        collect: bool,
        out: &mut Outcome,
    ) -> Result<(), (&'static str, String)> {
        let i = self.next_client.get();
        self.next_client.set(i.wrapping_add(1));
        let client = &self.clients[i % self.clients.len()];
        let resp = client.post(path, body).await.map_err(|e| ("connect", e.to_string()))?;
        out.worker = resp.worker.clone();
        if resp.status != 200 {
            let status = resp.status;
            let text = resp.text().await.unwrap_or_default();
            return Err((http_kind(status), format!("HTTP {status}: {}", text.trim())));
        }
        let mut sse = resp.sse();
        loop {
            let data = sse.next_data().await.map_err(|e| ("stream", e.to_string()))?;
            let Some(data) = data else {
                return Err(("stream", "the stream ended without [DONE]".into()));
            };
            if data == b"[DONE]" {
                break;
            }
            if !collect {
                if let Some(has_text) = plain_content(data) {
                    if has_text {
                        out.token(t0.elapsed());
                    }
                    continue;
                }
            }
            let chunk: Chunk<'_> = serde_json::from_slice(data)
                .map_err(|e| ("stream", format!("{e}: {}", String::from_utf8_lossy(data))))?;
            if chunk.error.is_some() {
                return Err(("stream_error", String::from_utf8_lossy(data).into_owned()));
            }
            if let Some(u) = chunk.usage {
                let cached = u.prompt_tokens_details.and_then(|d| d.cached_tokens).unwrap_or(0);
                out.usage = Some((u.prompt_tokens, u.completion_tokens, cached));
            }
            for c in chunk.choices {
                let text = c.text.or_else(|| c.delta.and_then(|d| d.content));
                let Some(text) = text.filter(|t| !t.is_empty()) else {
                    continue;
                };
                out.token(t0.elapsed());
                if collect {
                    out.text.push_str(&text);
                }
            }
        }
        sse.drain().await.map_err(|e| ("stream", e.to_string()))
    }
}

impl Outcome {
    /// A chunk with text arrived `now` after the request was sent.
    fn token(&mut self, now: Duration) {
        match self.last {
            None => self.ttft = Some(now),
            Some(last) => self.gaps_ms.push(((now - last).as_secs_f64() * 1e3) as f32),
        }
        self.last = Some(now);
        self.content_chunks += 1;
    }
}

/// The fast path for the common chunk (choices last, no usage, no error): whether its first
/// choice's text is non-empty, without a JSON parse. `None` for anything else, which then takes
/// the full parse. The first `"text":"` / `"content":"` is the key, never escaped text, since
/// text comes after its key.
fn plain_content(data: &[u8]) -> Option<bool> {
    if !data.ends_with(b"]}") {
        return None; // usage or another field after the choices
    }
    let mut i = 0;
    while let Some(q) = data[i..].iter().position(|&b| b == b'"') {
        let rest = &data[i + q..];
        for key in [&b"\"text\":\""[..], b"\"content\":\""] {
            if rest.starts_with(key) {
                return Some(rest.get(key.len()) != Some(&b'"'));
            }
        }
        i += q + 1;
    }
    None
}

fn http_kind(status: u16) -> &'static str {
    match status {
        400 => "http_400",
        404 => "http_404",
        413 => "http_413",
        429 => "http_429",
        500 => "http_500",
        503 => "http_503",
        s if s >= 500 => "http_5xx",
        _ => "http_4xx",
    }
}

#[cfg(test)]
mod tests {
    use super::plain_content;

    #[test]
    fn fast_path_agrees_with_the_chunk_shapes() {
        let c = br#"{"id":"x","choices":[{"index":0,"text":"r","logprobs":null,"finish_reason":null}]}"#;
        assert_eq!(plain_content(c), Some(true));
        let e = br#"{"id":"x","choices":[{"index":0,"text":"","finish_reason":"length"}]}"#;
        assert_eq!(plain_content(e), Some(false));
        let d = br#"{"choices":[{"index":0,"delta":{"content":"\"q"}}]}"#;
        assert_eq!(plain_content(d), Some(true));
        let u = br#"{"choices":[],"usage":{"prompt_tokens":1}}"#;
        assert_eq!(plain_content(u), None);
        let u = br#"{"choices":[{"index":0,"text":"a"}],"usage":{"prompt_tokens":1}}"#;
        assert_eq!(plain_content(u), None);
        assert_eq!(plain_content(br#"{"error":{"message":"x"}}"#), None);
    }
}
