//! Typed configuration: every CLI flag and environment variable, and its validation.
//!
//! Invariant: everything here is checked once at start-up ([`ServeArgs::validate`]); code past
//! this module may rely on the ranges documented on each field. Flag names follow NVIDIA
//! Dynamo's where Dynamo has one (`--http-port`, `--router-mode`, `--kv-overlap-score-weight`,
//! `--router-temperature`, `--model-path`, `--served-model-name`, `--page-size`).

use clap::{Args, Parser, Subcommand};
use thiserror::Error;

use crate::contract::{EngineKind, WorkerRole};
use crate::kv::hash::MAX_BLOCK_SIZE;
use crate::openai::parse::{ParserFlags, ReasoningFlag, ToolCallFlag};
use crate::preprocess::token_cache::{TokenCache, DEFAULT_BUDGET_MB};
use crate::router::{RouterCost, RouterMode, MAX_SHARDS};
use crate::worker::engines::mocker::MockerArgs;

mod admission;
mod engine;
mod otlp;
pub use admission::AdmissionArgs;
pub use engine::{EngineArgs, EngineUrl};
pub use otlp::OtlpArgs;

/// Bodies above this are refused with 413 before they are read: a chat request of a
/// million-token context is ~10 MiB of JSON, so 32 MiB leaves room without inviting abuse.
pub const DEFAULT_MAX_BODY_BYTES: usize = 32 * 1024 * 1024;
/// Open client connections in total: each holds a task and its read and write buffers (tens of
/// KiB), so 10,000 bounds them to a few hundred MiB, far above what a frontend behind a load
/// balancer keeps open.
pub const DEFAULT_MAX_CONNECTIONS: usize = 10_000;
/// Ceiling of `--preprocess-threads`: more threads than this only contend with the shards.
pub const MAX_PREPROCESS_THREADS: usize = 256;
/// Ceiling of `--max-connections`: past a million, file descriptors and memory run out first.
pub const MAX_CONNECTIONS_CEILING: usize = 1 << 20;
/// Ceiling of `--token-cache-mb` (1 TiB): a larger figure is a typo, not a cache.
pub const TOKEN_CACHE_MB_CEILING: usize = 1 << 20;

/// The command line.
#[derive(Parser, Debug)]
#[command(name = "kvgate", version, about = "A KV-aware data plane for serving LLMs across many engine workers")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
#[allow(clippy::large_enum_variant)]
pub enum Command {
    /// Run the frontend and N simulated (mocker) workers in one process: no etcd, NATS or GPU.
    Serve(ServeArgs),
    /// Run the OpenAI frontend of a distributed deployment (workers found through etcd, KV
    /// events over NATS, requests over TCP).
    Frontend(FrontendArgs),
    /// Run one engine worker of a distributed deployment.
    Worker(WorkerArgs),
}

/// Where the cluster's etcd and NATS are, and the namespace that scopes every key and subject.
#[derive(Args, Debug, Clone)]
pub struct ClusterArgs {
    /// etcd endpoints, comma-separated.
    #[arg(long, env = "ETCD_ENDPOINTS", default_value = "http://127.0.0.1:2379", value_delimiter = ',')]
    pub etcd_endpoints: Vec<String>,
    /// NATS server URL.
    #[arg(long, env = "NATS_SERVER", default_value = "nats://127.0.0.1:4222")]
    pub nats_server: String,
    /// Scopes every etcd key and NATS subject (Dynamo's default is `dynamo`).
    #[arg(long, default_value = "dynamo", env = "DYN_NAMESPACE")]
    pub namespace: String,
}

/// `kvgate frontend`.
#[derive(Args, Debug, Clone)]
pub struct FrontendArgs {
    #[command(flatten)]
    pub http: HttpArgs,
    #[command(flatten)]
    pub router: RouterArgs,
    #[command(flatten)]
    pub cluster: ClusterArgs,
    /// KV block size in tokens; workers registering another page size are refused.
    #[arg(long, default_value_t = 16)]
    pub page_size: u32,
    /// Wait for this many workers before serving.
    #[arg(long, default_value_t = 0)]
    pub router_min_initial_workers: usize,
    #[command(flatten)]
    pub otlp: OtlpArgs,
    /// Router replica sync (Dynamo's flag): publish each routing decision to the other
    /// frontends of the namespace over NATS and count theirs until the workers' KV events
    /// arrive. Off by default (measured no better when events arrive in time; see README).
    #[arg(long, default_value_t = false, action = clap::ArgAction::Set, num_args = 0..=1, default_missing_value = "true")]
    pub router_replica_sync: bool,
}

/// `kvgate worker`.
#[derive(Args, Debug, Clone)]
pub struct WorkerArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub cluster: ClusterArgs,
    /// Role in disaggregated serving (default: aggregated, prefill and decode on this worker).
    #[arg(long, value_enum)]
    pub disaggregation_mode: Option<DisaggregationMode>,
    /// The engine this worker runs; each engine has its own flags (the mocker's below).
    #[arg(long, value_enum, default_value_t = EngineKind::Mocker)]
    pub engine: EngineKind,
    #[command(flatten)]
    pub real_engine: EngineArgs,
    #[command(flatten)]
    pub mocker: MockerArgs,
    /// The address other nodes reach this worker at (default: this host's primary address).
    #[arg(long)]
    pub advertise_host: Option<String>,
    /// Request-plane port (0: an ephemeral port, advertised through etcd).
    #[arg(long, default_value_t = 0)]
    pub port: u16,
    /// Port of a decode worker's KV transfer listener (0: any free port; advertised in etcd).
    #[arg(long, default_value_t = 0)]
    pub transfer_port: u16,
    #[command(flatten)]
    pub transfer: TransferArgs,
    /// Lease TTL in seconds: a worker that dies leaves discovery within this time.
    #[arg(long, default_value_t = 10)]
    pub lease_ttl: u64,
    /// The mocker publishes no KV events and registers so: frontends predict its cache
    /// (approximate mode), as they do for engines without events.
    #[arg(long)]
    pub no_kv_events: bool,
    #[command(flatten)]
    pub otlp: OtlpArgs,
}

/// `--disaggregation-mode`.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum DisaggregationMode {
    Prefill,
    Decode,
}

/// The OpenAI-compatible HTTP endpoint.
#[derive(Args, Debug, Clone)]
pub struct HttpArgs {
    /// Address to listen on.
    #[arg(long, default_value = "0.0.0.0", env = "KVGATE_HTTP_HOST")]
    pub http_host: String,
    /// Port to listen on (0 picks a free port and logs it).
    #[arg(long, default_value_t = 8000, env = "KVGATE_HTTP_PORT")]
    pub http_port: u16,
    /// Data-plane shards (threads, each with its own listener and io_uring). Default: one per core.
    #[arg(long)]
    pub shards: Option<usize>,
    /// Largest accepted request body in bytes (larger bodies get 413).
    #[arg(long, default_value_t = DEFAULT_MAX_BODY_BYTES)]
    pub max_body_bytes: usize,
    /// Open client connections in total, split evenly over the shards (each serves at most
    /// ceil(N / shards)); past its share a shard answers a new connection 503 and closes it.
    #[arg(long, default_value_t = DEFAULT_MAX_CONNECTIONS)]
    pub max_connections: usize,
    #[command(flatten)]
    pub parsers: ParserArgs,
    /// Threads that prepare long requests (bodies over 8 KiB: JSON parse, chat template,
    /// tokenization) off the shards, at a lower priority, so a long prompt never stalls the
    /// other streams of its shard; 0 prepares everything on the shards. Default: half the
    /// cores, at least one. Their queue holds 64 requests per thread; past that, 503.
    #[arg(long)]
    pub preprocess_threads: Option<usize>,
    /// Token cache budget in MiB (0 disables it): the token ids of long prompt segments (the
    /// text between two special tokens, 256 bytes or more), shared by every shard, so a
    /// conversation's next turn tokenizes only its new text. Fast-path models only.
    #[arg(long, default_value_t = DEFAULT_BUDGET_MB, env = "KVGATE_TOKEN_CACHE_MB")]
    pub token_cache_mb: usize,
    #[command(flatten)]
    pub auth: AuthArgs,
    /// Seconds in-flight requests may run after SIGTERM or SIGINT before their streams are cut;
    /// meanwhile no connection is accepted and `/health` answers 503 `draining`.
    #[arg(long, default_value_t = DEFAULT_DRAIN_TIMEOUT_S, env = "KVGATE_DRAIN_TIMEOUT_S")]
    pub drain_timeout_s: f64,
}

/// Default of `--drain-timeout-s`: Kubernetes' default grace period, so a pod is not killed
/// (SIGKILL) while it still drains.
pub const DEFAULT_DRAIN_TIMEOUT_S: f64 = 30.0;
/// Ceiling of `--drain-timeout-s` (an hour): a longer drain is a deployment that never stops.
pub const MAX_DRAIN_TIMEOUT_S: f64 = 3600.0;

/// API keys (vLLM's `--api-key`): when any is set, every endpoint serving model work requires
/// `Authorization: Bearer <key>`.
#[derive(Args, Debug, Clone, Default)]
pub struct AuthArgs {
    /// An API key clients must send as `Authorization: Bearer <key>` (repeatable; the env var
    /// takes several, comma-separated). Without any key the endpoint is open.
    #[arg(long = "api-key", env = "KVGATE_API_KEY", value_delimiter = ',', hide_env_values = true)]
    pub api_key: Vec<String>,
    /// A file of API keys, one a line; blank lines and lines starting with `#` are ignored.
    #[arg(long, env = "KVGATE_API_KEY_FILE")]
    pub api_key_file: Option<std::path::PathBuf>,
    /// Require a key on `/health`, `/live` and `/metrics` too (by default they stay open for
    /// load balancers and Prometheus).
    #[arg(long)]
    pub api_key_protect_health: bool,
}

impl AuthArgs {
    /// The configured keys (flags, env and file), read and checked once at start-up.
    pub fn load(&self) -> Result<crate::frontend::data::auth::ApiKeys, ConfigError> {
        let mut keys: Vec<String> = self.api_key.iter().map(|k| k.trim().to_string()).collect();
        if keys.iter().any(|k| k.is_empty()) {
            return Err(invalid("--api-key", "an API key must not be empty"));
        }
        if let Some(path) = &self.api_key_file {
            let text = std::fs::read_to_string(path)
                .map_err(|e| invalid("--api-key-file", format!("cannot read {}: {e}", path.display())))?;
            let from_file: Vec<String> = text
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty() && !l.starts_with('#'))
                .map(str::to_string)
                .collect();
            if from_file.is_empty() {
                return Err(invalid("--api-key-file", format!("{} holds no key", path.display())));
            }
            keys.extend(from_file);
        }
        if let Some(k) = keys.iter().find(|k| k.bytes().any(|b| !(0x21..=0x7e).contains(&b))) {
            let flag = if self.api_key.iter().any(|a| a.trim() == k) { "--api-key" } else { "--api-key-file" };
            return Err(invalid(flag, "an API key must be printable ASCII without spaces (it travels in a header)"));
        }
        if self.api_key_protect_health && keys.is_empty() {
            return Err(invalid("--api-key-protect-health", "needs --api-key or --api-key-file"));
        }
        Ok(crate::frontend::data::auth::ApiKeys::new(keys, self.api_key_protect_health))
    }
}

/// How a model's raw text becomes OpenAI's `reasoning_content` and `tool_calls` (vLLM's flags
/// and names).
#[derive(Args, Debug, Clone, Default)]
pub struct ParserArgs {
    /// Splits the model's think block into `reasoning_content`: `qwen3`, `deepseek_r1`, `none`,
    /// or `auto` (`qwen3` when the chat template mentions `<think>`).
    #[arg(long, value_enum, default_value_t = ReasoningFlag::Auto)]
    pub reasoning_parser: ReasoningFlag,
    /// Reads the model's tool calls into `tool_calls` (for requests with `tools`): `hermes`,
    /// `llama3_json`, `none`, or `auto` (`hermes` when the chat template mentions `<tool_call>`).
    #[arg(long, value_enum, default_value_t = ToolCallFlag::Auto)]
    pub tool_call_parser: ToolCallFlag,
}

impl ParserArgs {
    pub fn flags(&self) -> ParserFlags {
        ParserFlags { reasoning: self.reasoning_parser, tool_call: self.tool_call_parser }
    }
}

/// How requests are spread over workers.
#[derive(Args, Debug, Clone)]
pub struct RouterArgs {
    /// Routing policy: `kv` (cache overlap weighed against load), `round-robin` or `random`.
    #[arg(long, value_enum, default_value_t = RouterMode::Kv)]
    pub router_mode: RouterMode,
    /// What `kv` mode minimizes: `ttft` (predicted time to first token from each worker's
    /// learned prefill speed and queue) or `overlap` (overlap weighed against decode blocks, the
    /// cost before issue #16).
    #[arg(long, value_enum, default_value_t = RouterCost::default())]
    pub router_cost: RouterCost,
    /// Weight of the prefill cost (queued plus uncached prompt tokens) against load; 0 ignores
    /// the KV index. With `--router-cost ttft`, 1 is the predicted time as learned.
    #[arg(long, default_value_t = 1.0, allow_negative_numbers = true)]
    pub kv_overlap_score_weight: f64,
    /// 0 picks the cheapest worker; above 0 samples softmax(-cost/temperature).
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    pub router_temperature: f64,
    /// How many times a request moves to another worker (with the tokens generated so far)
    /// when its worker fails; 0 gives the client an error instead.
    #[arg(long, default_value_t = 3)]
    pub migration_limit: u32,
    /// Refuse (503) requests for a model with no prefill workers instead of serving them
    /// aggregated on its decode (or aggregated) workers.
    #[arg(long)]
    pub enforce_disagg: bool,
    /// Conditional disaggregation: a request with fewer prompt tokens than this not yet cached
    /// on its decode worker is prefilled on that decode worker (no transfer). 0: never.
    #[arg(long, default_value_t = 0)]
    pub disagg_min_uncached_tokens: u32,
    /// Conditional disaggregation: a request whose decode worker already holds at least this
    /// share of its prompt (0..=1) is prefilled there. Default 1.0: only a fully cached prompt;
    /// above 1: never.
    #[arg(long, default_value_t = 1.0)]
    pub disagg_local_cached_ratio: f64,
    /// Approximate mode for every worker (Dynamo's flag): ignore KV events and predict each
    /// worker's cache from the prompts routed to it. `kvgate serve` also runs its mocker
    /// workers without events. Workers that register no events are approximate without it.
    #[arg(long)]
    pub no_kv_events: bool,
    /// Approximate mode: seconds a predicted block lives after the last request that sent it
    /// to its worker (Dynamo's default, 120).
    #[arg(long, default_value_t = 120.0)]
    pub approx_ttl_s: f64,
    #[command(flatten)]
    pub admission: AdmissionArgs,
    #[command(flatten)]
    pub decision_log: crate::router::quality::DecisionLogArgs,
}

/// The KV transfer plane of disaggregated serving (prefill and decode workers).
#[derive(Args, Debug, Clone)]
pub struct TransferArgs {
    /// How prefill workers push KV blocks to decode workers.
    #[arg(long, value_enum, default_value_t = TransferBackend::Tcp)]
    pub disaggregation_transfer_backend: TransferBackend,
    /// Seconds a decode worker waits for a prompt's KV (and a prefill worker for its transfer to
    /// be acknowledged) before failing the request.
    #[arg(long, default_value_t = 30.0)]
    pub disagg_transfer_timeout_s: f64,
}

pub use crate::planes::transfer::TransferBackend;

impl TransferArgs {
    pub fn validate(&self) -> Result<(), ConfigError> {
        let t = self.disagg_transfer_timeout_s;
        if !t.is_finite() || !(0.1..=3600.0).contains(&t) {
            return Err(invalid("--disagg-transfer-timeout-s", format!("{t} is not in 0.1..=3600")));
        }
        Ok(())
    }

    pub fn timeout(&self) -> std::time::Duration {
        std::time::Duration::from_secs_f64(self.disagg_transfer_timeout_s)
    }
}

/// The model being served.
#[derive(Args, Debug, Clone)]
pub struct ModelArgs {
    /// A local Hugging Face model directory or a hub id (looked up in the HF cache, downloaded
    /// when online). Without it, a built-in mock model with a byte-level tokenizer is served.
    #[arg(long)]
    pub model_path: Option<String>,
    /// The model name clients send (default: --model-path, or `kvgate-mock`).
    #[arg(long)]
    pub served_model_name: Option<String>,
    /// KV cache block size in tokens (Dynamo's default for this deployment is 16).
    #[arg(long, default_value_t = 16)]
    pub page_size: u32,
}

/// `kvgate serve`.
#[derive(Args, Debug, Clone)]
pub struct ServeArgs {
    #[command(flatten)]
    pub http: HttpArgs,
    #[command(flatten)]
    pub router: RouterArgs,
    #[command(flatten)]
    pub model: ModelArgs,
    /// Number of aggregated simulated engine workers started in this process (default 2, or 0
    /// when --prefill-workers / --decode-workers are given).
    #[arg(long)]
    pub workers: Option<usize>,
    /// Prefill workers (disaggregated serving; needs --decode-workers).
    #[arg(long, default_value_t = 0)]
    pub prefill_workers: usize,
    /// Decode workers (disaggregated serving).
    #[arg(long, default_value_t = 0)]
    pub decode_workers: usize,
    #[command(flatten)]
    pub transfer: TransferArgs,
    /// The engine the workers run; each engine has its own flags (the mocker's below).
    #[arg(long, value_enum, default_value_t = EngineKind::Mocker)]
    pub engine: EngineKind,
    #[command(flatten)]
    pub real_engine: EngineArgs,
    #[command(flatten)]
    pub mocker: MockerArgs,
    #[command(flatten)]
    pub otlp: OtlpArgs,
}

/// A configuration the user must change; the message says what to change.
#[derive(Debug, Error)]
#[error("invalid {flag}: {message}")]
pub struct ConfigError {
    pub flag: &'static str,
    pub message: String,
}

fn invalid(flag: &'static str, message: impl Into<String>) -> ConfigError {
    ConfigError { flag, message: message.into() }
}

impl HttpArgs {
    /// Shards to run: the flag, or one per available core, at most [`MAX_SHARDS`].
    pub fn shard_count(&self) -> usize {
        self.shards
            .unwrap_or_else(|| std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1))
            .min(MAX_SHARDS)
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        if let Some(n) = self.shards {
            if n == 0 || n > MAX_SHARDS {
                return Err(invalid("--shards", format!("{n} is not in 1..={MAX_SHARDS}")));
            }
        }
        if self.preprocess_threads.is_some_and(|n| n > MAX_PREPROCESS_THREADS) {
            return Err(invalid(
                "--preprocess-threads",
                format!("at most {MAX_PREPROCESS_THREADS} (0 prepares on the shards)"),
            ));
        }
        if self.max_body_bytes < 1024 {
            return Err(invalid("--max-body-bytes", "must be at least 1024"));
        }
        let (n, shards) = (self.max_connections, self.shard_count());
        if n < shards || n > MAX_CONNECTIONS_CEILING {
            return Err(invalid(
                "--max-connections",
                format!("{n} is not in {shards}..={MAX_CONNECTIONS_CEILING} (at least one per shard)"),
            ));
        }
        let d = self.drain_timeout_s;
        if !d.is_finite() || !(0.0..=MAX_DRAIN_TIMEOUT_S).contains(&d) {
            return Err(invalid("--drain-timeout-s", format!("{d} is not in 0..={MAX_DRAIN_TIMEOUT_S} (seconds)")));
        }
        self.auth.load()?;
        if self.token_cache_mb > TOKEN_CACHE_MB_CEILING {
            return Err(invalid(
                "--token-cache-mb",
                format!("{} is more than {TOKEN_CACHE_MB_CEILING} (MiB; 0 disables the cache)", self.token_cache_mb),
            ));
        }
        Ok(())
    }

    /// The token cache `--token-cache-mb` asks for (`None` for 0).
    pub fn token_cache(&self) -> Option<std::sync::Arc<TokenCache>> {
        TokenCache::from_mb(self.token_cache_mb)
    }

    /// Preprocessing threads to run: the flag, or half the cores (at least one).
    pub fn preprocess_thread_count(&self) -> usize {
        self.preprocess_threads
            .unwrap_or_else(|| std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1).div_ceil(2))
    }

    /// The preprocessing pool `--preprocess-threads` asks for.
    pub fn prep_pool(&self) -> std::io::Result<crate::frontend::pipeline::offload::PrepPool> {
        use crate::frontend::pipeline::offload::{PrepPool, QUEUE_PER_THREAD};
        let threads = self.preprocess_thread_count();
        PrepPool::new(threads, threads * QUEUE_PER_THREAD)
    }

    /// Where and how the data plane listens (reads `--api-key-file`).
    pub fn listen(&self) -> Result<crate::frontend::data::shards::Listen, ConfigError> {
        Ok(crate::frontend::data::shards::Listen {
            host: self.http_host.clone(),
            port: self.http_port,
            shards: self.shard_count(),
            max_connections: self.max_connections,
            drain_timeout: std::time::Duration::from_secs_f64(self.drain_timeout_s),
            auth: std::sync::Arc::new(self.auth.load()?),
        })
    }
}

impl RouterArgs {
    /// The disaggregation settings the frontend applies.
    pub fn disagg_policy(&self) -> crate::frontend::DisaggPolicy {
        crate::frontend::DisaggPolicy {
            enforce: self.enforce_disagg,
            min_uncached_tokens: self.disagg_min_uncached_tokens,
            local_cached_ratio: self.disagg_local_cached_ratio,
        }
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        let w = self.kv_overlap_score_weight;
        if !w.is_finite() || w < 0.0 {
            return Err(invalid("--kv-overlap-score-weight", format!("{w} must be a finite number >= 0")));
        }
        let t = self.router_temperature;
        if !t.is_finite() || t < 0.0 {
            return Err(invalid("--router-temperature", format!("{t} must be a finite number >= 0")));
        }
        if self.migration_limit > 16 {
            return Err(invalid("--migration-limit", format!("{} is more than 16", self.migration_limit)));
        }
        let r = self.disagg_local_cached_ratio;
        if !r.is_finite() || r < 0.0 {
            return Err(invalid("--disagg-local-cached-ratio", format!("{r} must be a finite number >= 0")));
        }
        let ttl = self.approx_ttl_s;
        if !ttl.is_finite() || !(1.0..=MAX_APPROX_TTL_S).contains(&ttl) {
            return Err(invalid("--approx-ttl-s", format!("{ttl} is not in 1..={MAX_APPROX_TTL_S} (seconds)")));
        }
        self.admission.validate()
    }

    /// Approximate mode's settings.
    pub fn approx(&self) -> crate::kv::approx::ApproxConfig {
        crate::kv::approx::ApproxConfig {
            all: self.no_kv_events,
            ttl: std::time::Duration::from_secs_f64(self.approx_ttl_s),
        }
    }
}

/// Ceiling of `--approx-ttl-s` (a day): a prediction older than that says nothing about a cache.
pub const MAX_APPROX_TTL_S: f64 = 86_400.0;

impl ModelArgs {
    pub fn validate(&self) -> Result<(), ConfigError> {
        let p = self.page_size as usize;
        if p == 0 || p > MAX_BLOCK_SIZE {
            return Err(invalid("--page-size", format!("{p} is not in 1..={MAX_BLOCK_SIZE}")));
        }
        if let Some(name) = &self.served_model_name {
            if name.trim().is_empty() {
                return Err(invalid("--served-model-name", "must not be empty"));
            }
        }
        Ok(())
    }

    /// The name clients use for this model.
    pub fn served_name(&self) -> String {
        self.served_model_name.clone().or_else(|| self.model_path.clone()).unwrap_or_else(|| "kvgate-mock".to_string())
    }
}

impl ServeArgs {
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.http.validate()?;
        self.router.validate()?;
        self.model.validate()?;
        self.transfer.validate()?;
        self.real_engine.validate(self.engine, true)?;
        if self.prefill_workers > 0 && self.decode_workers == 0 {
            return Err(invalid("--prefill-workers", "prefill workers need decode workers: add --decode-workers N"));
        }
        let total = self.aggregated_workers() + self.prefill_workers + self.decode_workers;
        if total == 0 || total > 1024 {
            return Err(invalid("--workers", format!("{total} workers in all is not in 1..=1024")));
        }
        Ok(())
    }

    /// The role of each worker to start, in start order: aggregated, prefill, decode mocker
    /// workers, or one per `--engine-url` for a real engine.
    pub fn roles(&self) -> Vec<WorkerRole> {
        if self.engine != EngineKind::Mocker {
            return self.real_engine.urls().unwrap_or_default().into_iter().map(|u| u.role).collect();
        }
        std::iter::repeat_n(WorkerRole::Aggregated, self.aggregated_workers())
            .chain(std::iter::repeat_n(WorkerRole::Prefill, self.prefill_workers))
            .chain(std::iter::repeat_n(WorkerRole::Decode, self.decode_workers))
            .collect()
    }

    /// Aggregated workers to start.
    pub fn aggregated_workers(&self) -> usize {
        let disagg = self.prefill_workers + self.decode_workers > 0;
        self.workers.unwrap_or(if disagg { 0 } else { 2 })
    }
}

impl ClusterArgs {
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.etcd_endpoints.iter().all(|e| e.trim().is_empty()) {
            return Err(invalid("--etcd-endpoints (ETCD_ENDPOINTS)", "no endpoint given"));
        }
        if self.namespace.is_empty() || self.namespace.contains(['/', '.', '*', '>', ' ']) {
            return Err(invalid(
                "--namespace",
                format!("{:?} must be non-empty without / . * > or spaces", self.namespace),
            ));
        }
        Ok(())
    }
}

impl FrontendArgs {
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.http.validate()?;
        self.router.validate()?;
        self.cluster.validate()?;
        let p = self.page_size as usize;
        if p == 0 || p > MAX_BLOCK_SIZE {
            return Err(invalid("--page-size", format!("{p} is not in 1..={MAX_BLOCK_SIZE}")));
        }
        Ok(())
    }
}

impl WorkerArgs {
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.model.validate()?;
        self.cluster.validate()?;
        if self.lease_ttl < 1 {
            return Err(invalid("--lease-ttl", "must be at least 1 second"));
        }
        self.transfer.validate()?;
        self.real_engine.validate(self.engine, false)?;
        if matches!(self.engine, EngineKind::LlamaCpp | EngineKind::Openai) && self.disaggregation_mode.is_some() {
            return Err(invalid(
                "--disaggregation-mode",
                format!(
                    "--engine {} does not support disaggregated serving; drop the flag (the worker serves aggregated)",
                    self.engine.as_str()
                ),
            ));
        }
        if self.transfer.disaggregation_transfer_backend == TransferBackend::InProcess {
            return Err(invalid(
                "--disaggregation-transfer-backend",
                "in-process only works inside `kvgate serve`; workers on their own use tcp",
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> ServeArgs {
        let mut v = vec!["kvgate", "serve"];
        v.extend_from_slice(args);
        match Cli::try_parse_from(v).unwrap().command {
            Command::Serve(s) => s,
            _ => unreachable!(),
        }
    }

    #[test]
    fn defaults_match_dynamo() {
        let s = parse(&[]);
        assert_eq!(s.http.http_port, 8000);
        assert_eq!(s.model.page_size, 16);
        assert_eq!(s.router.router_mode, RouterMode::Kv);
        assert_eq!(s.aggregated_workers(), 2);
        assert_eq!(s.model.served_name(), "kvgate-mock");
        assert_eq!(s.http.parsers.flags(), ParserFlags::default());
        s.validate().unwrap();
    }

    #[test]
    fn parser_flags_take_vllm_names() {
        let s = parse(&["--reasoning-parser", "deepseek_r1", "--tool-call-parser", "llama3_json"]);
        assert_eq!(s.http.parsers.flags().reasoning, ReasoningFlag::DeepseekR1);
        assert_eq!(s.http.parsers.flags().tool_call, ToolCallFlag::Llama3Json);
        let s = parse(&["--reasoning-parser", "qwen3", "--tool-call-parser", "hermes"]);
        assert_eq!(
            (s.http.parsers.reasoning_parser, s.http.parsers.tool_call_parser),
            (ReasoningFlag::Qwen3, ToolCallFlag::Hermes)
        );
        assert!(Cli::try_parse_from(["kvgate", "serve", "--tool-call-parser", "nope"]).is_err());
        assert!(Cli::try_parse_from(["kvgate", "frontend", "--reasoning-parser", "none"]).is_ok());
    }

    #[test]
    fn rejects_bad_values_with_the_flag_named() {
        let e = parse(&["--page-size", "0"]).validate().unwrap_err();
        assert_eq!(e.flag, "--page-size");
        let e = parse(&["--kv-overlap-score-weight", "-1"]).validate().unwrap_err();
        assert_eq!(e.flag, "--kv-overlap-score-weight");
        assert!(Cli::try_parse_from(["kvgate", "serve", "--router-mode", "nope"]).is_err());
        let s = parse(&["--router-mode", "round-robin", "--shards", "3"]);
        assert_eq!(s.router.router_mode, RouterMode::RoundRobin);
        assert_eq!(s.http.shard_count(), 3);
        let e = parse(&["--shards", "3", "--max-connections", "2"]).validate().unwrap_err();
        assert_eq!(e.flag, "--max-connections");
    }

    #[test]
    fn engines_without_kv_events_refuse_disaggregation_and_event_flags() {
        let s = parse(&[
            "--engine",
            "llama-cpp",
            "--engine-url",
            "http://127.0.0.1:8080",
            "--engine-url",
            "http://127.0.0.1:8081",
        ]);
        s.validate().unwrap();
        assert_eq!(s.engine, EngineKind::LlamaCpp);
        assert_eq!(s.roles(), vec![WorkerRole::Aggregated; 2]);
        let s = parse(&["--engine", "openai", "--engine-url", "http://127.0.0.1:8000"]);
        s.validate().unwrap();
        let e =
            parse(&["--engine", "llama-cpp", "--engine-url", "prefill=http://127.0.0.1:8080"]).validate().unwrap_err();
        assert_eq!(e.flag, "--engine-url");
        assert!(e.message.contains("disaggregation"), "{e}");
        let e =
            parse(&["--engine", "openai", "--engine-url", "http://127.0.0.1:8000", "--engine-kv-events", "tcp://x:1"])
                .validate()
                .unwrap_err();
        assert_eq!(e.flag, "--engine-kv-events");
        let w = |extra: &[&str]| {
            let mut v = vec!["kvgate", "worker", "--engine", "llama-cpp", "--engine-url", "http://127.0.0.1:8080"];
            v.extend_from_slice(extra);
            match Cli::try_parse_from(v).unwrap().command {
                Command::Worker(w) => w,
                _ => unreachable!(),
            }
        };
        w(&[]).validate().unwrap();
        let e = w(&["--disaggregation-mode", "prefill"]).validate().unwrap_err();
        assert_eq!(e.flag, "--disaggregation-mode");
        assert!(e.message.contains("llama-cpp"), "{e}");
    }

    #[test]
    fn disaggregated_topology_flags() {
        let s = parse(&["--prefill-workers", "2", "--decode-workers", "2"]);
        s.validate().unwrap();
        assert_eq!((s.aggregated_workers(), s.prefill_workers, s.decode_workers), (0, 2, 2));
        assert_eq!(s.transfer.disaggregation_transfer_backend, TransferBackend::Tcp);
        let e = parse(&["--prefill-workers", "2"]).validate().unwrap_err();
        assert_eq!(e.flag, "--prefill-workers");
        let e = parse(&["--workers", "0"]).validate().unwrap_err();
        assert_eq!(e.flag, "--workers");
        let e = parse(&["--disagg-transfer-timeout-s", "0"]).validate().unwrap_err();
        assert_eq!(e.flag, "--disagg-transfer-timeout-s");
    }

    #[test]
    fn approximate_mode_flags() {
        let s = parse(&[]);
        assert_eq!(s.router.approx(), crate::kv::approx::ApproxConfig::default());
        let s = parse(&["--no-kv-events", "--approx-ttl-s", "30"]);
        s.validate().unwrap();
        assert!(s.router.approx().all);
        assert_eq!(s.router.approx().ttl, std::time::Duration::from_secs(30));
        let e = parse(&["--approx-ttl-s", "0"]).validate().unwrap_err();
        assert_eq!(e.flag, "--approx-ttl-s");
        assert!(Cli::try_parse_from(["kvgate", "frontend", "--no-kv-events"]).is_ok());
        assert!(Cli::try_parse_from(["kvgate", "worker", "--no-kv-events"]).is_ok());
    }
}
