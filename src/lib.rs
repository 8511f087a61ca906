//! # kvgate: a KV-aware data plane for serving LLMs across many engine workers
//!
//! ## Module map, by layer (each depends only on those above it)
//!
//! | module | what it owns |
//! | --- | --- |
//! | [`contract`] | the frontend ↔ worker contract: requests, outputs, errors as data, legs, load reports, KV events and their one encoding, recovery, request-plane frames, worker registration |
//! | [`kv`] | block hashing, the index of which worker caches which block, and the predicted caches of workers without KV events ([`kv::approx`]) |
//! | [`planes`] | the seams between processes: [`planes::discovery`] (etcd), [`planes::events`] (NATS), [`planes::load`] (workers' load reports, NATS), [`planes::request`] (TCP), [`planes::transfer`] (KV bytes); each with an in-process implementation |
//! | [`router`] | routing policies, the KV cost function, load booking guards |
//! | [`preprocess`], [`openai`], [`metrics`] | model loading, tokenizer and the token cache of prompt segments already tokenized, chat template, detokenizer, stop strings; OpenAI types and the reasoning / tool-call output parsers ([`openai::parse`]); per-shard counters merged on scrape |
//! | [`frontend`] | shared state ([`frontend::state`]), the control plane ([`frontend::control`]), the data plane ([`frontend::data`]: shards, HTTP, error → status), the request pipeline ([`frontend::pipeline`]), each worker's index state ([`frontend::index_state`]: exact, recovering, approximate, blind) and the live routing page ([`frontend::dashboard`]) |
//! | [`worker`] | the engine-neutral worker runtime, the [`worker::Engine`] trait, and the engines (mocker, SGLang, vLLM, llama.cpp, any OpenAI-API server taking token ids) |
//! | [`config`] | typed configuration: CLI flags, env vars, validation |
//! | [`telemetry`] | request tracing: W3C `traceparent` in, the frontend's and workers' spans out over OTLP/HTTP (only with `--otlp-endpoint`) |
//! | [`serve`], [`launch`] | the commands: `kvgate serve` (everything in one process), `kvgate frontend`, `kvgate worker` |
//!
//! ## One request, end to end
//!
//! 1. A shard's listener (SO_REUSEPORT, one per core) accepts the connection; hyper parses
//!    HTTP/1.1 ([`frontend::data::server`]).
//! 2. The body is parsed into an OpenAI request and validated ([`openai`]); bad input becomes an
//!    [`frontend::data::error::ApiError`], the one place errors map to HTTP status.
//! 3. The model's [`preprocess::Preprocessor`] applies the chat template and tokenizes; a prompt
//!    that cannot fit the context by its bytes alone is refused first ([`preprocess::budget`]).
//!    Bodies over 8 KiB go through steps 2 and 3 on the preprocessing pool
//!    ([`frontend::pipeline::offload`]) while the shard serves its other streams.
//!    When every worker of the model is over the busy thresholds, the request first waits in its
//!    shard's bounded queue, by priority then arrival, or is refused 503
//!    ([`frontend::pipeline::admission`]).
//! 4. The prompt is hashed into blocks ([`kv::hash`]); the [`kv::index`] reports how many
//!    leading blocks each worker holds; the [`router`] picks the worker of least cost and books
//!    its load with a guard that releases on every exit path.
//! 5. The request plane ([`planes::request`]) sends token ids to the worker; the worker streams token
//!    ids back; the shard detokenizes incrementally, applies stop strings, and writes SSE chunks
//!    (or one JSON body).
//!    With prefill and decode workers ([`frontend::pipeline::dispatch`]), the decode worker is picked by
//!    load, the prefill worker by KV cost, and both legs go out with one bootstrap room: the
//!    prefill worker pushes the prompt's KV over the [`planes::transfer`] plane and the decode worker
//!    streams from the first token.
//! 6. Meanwhile workers publish KV events ([`planes::events`]); the control plane applies them to the
//!    index, which every shard reads without locks. A worker without events is routed
//!    approximately: the shard queues the prompt's blocks to the control plane, which records them
//!    in the index as that worker's predicted cache ([`kv::approx`]).
//!    Workers also publish their load ([`planes::load`], at most every 50 ms); the router counts
//!    a worker's last report plus this frontend's bookings it does not cover yet
//!    ([`router::load`]), so several frontends on one fleet see each other's load.
//!    With `--router-replica-sync`, frontends also tell each other where they routed
//!    ([`frontend::replica`]); each holds the others' decisions beside its index until the
//!    workers' events confirm them ([`kv::replica`]).

pub mod config;
pub mod contract;
pub mod frontend;
pub mod kv;
pub mod launch;
pub mod metrics;
pub mod openai;
pub mod planes;
pub mod preprocess;
pub mod router;
pub mod serve;
pub mod telemetry;
pub mod worker;
