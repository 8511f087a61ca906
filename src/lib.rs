//! # kvgate: a KV-aware data plane for serving LLMs across many engine workers
//!
//! ## Module map
//!
//! | module | what it owns |
//! | --- | --- |
//! | [`config`] | typed configuration: CLI flags, env vars, validation |
//! | [`runtime`] | data-plane shards (thread-per-core monoio on io_uring), shutdown |
//! | [`http`] | HTTP server per shard, routes, SSE writer, the one error → status mapping |
//! | [`openai`] | OpenAI request/response/chunk types and their validation |
//! | [`preprocess`] | model loading, tokenizer, chat template, incremental detokenizer, stop strings |
//! | [`kv`] | block hashing, KV events, the index of which worker caches which block |
//! | [`router`] | routing policies, the KV cost function, load booking guards |
//! | [`discovery`] | which workers exist (trait seam; in-process implementation) |
//! | [`events`] | the KV event plane (trait seam; in-process implementation) |
//! | [`transport`] | the request plane to workers (trait seam; in-process implementation) |
//! | [`transfer`] | the KV transfer plane of disaggregated serving (TCP; in-process backend) |
//! | [`worker`] | the worker runtime and its engines (the `mocker`) |
//! | [`frontend`] | the frontend's shared state: models, workers, index, and the control plane |
//! | [`metrics`] | per-shard counters merged on scrape; every metric name in one file |
//! | [`protocol`] | the frontend ↔ worker contract (token ids in, token ids out) |
//! | [`serve`] | `kvgate serve`: frontend and workers in one process |
//!
//! ## One request, end to end
//!
//! 1. A shard's listener (SO_REUSEPORT, one per core) accepts the connection; hyper parses
//!    HTTP/1.1 ([`http::server`]).
//! 2. The body is parsed into an OpenAI request and validated ([`openai`]); bad input becomes an
//!    [`http::error::ApiError`], the one place errors map to HTTP status.
//! 3. The model's [`preprocess::Preprocessor`] applies the chat template and tokenizes.
//! 4. The prompt is hashed into blocks ([`kv::hash`]); the [`kv::index`] reports how many
//!    leading blocks each worker holds; the [`router`] picks the worker of least cost and books
//!    its load with a guard that releases on every exit path.
//! 5. The request plane ([`transport`]) sends token ids to the worker; the worker streams token
//!    ids back; the shard detokenizes incrementally, applies stop strings, and writes SSE chunks
//!    (or one JSON body).
//!    With prefill and decode workers ([`http::dispatch`]), the decode worker is picked by
//!    load, the prefill worker by KV cost, and both legs go out with one bootstrap room: the
//!    prefill worker pushes the prompt's KV over the [`transfer`] plane and the decode worker
//!    streams from the first token.
//! 6. Meanwhile workers publish KV events ([`events`]); the control plane applies them to the
//!    index, which every shard reads without locks.

pub mod config;
pub mod discovery;
pub mod events;
pub mod frontend;
pub mod http;
pub mod kv;
pub mod metrics;
pub mod openai;
pub mod preprocess;
pub mod protocol;
pub mod router;
pub mod runtime;
pub mod serve;
pub mod transfer;
pub mod transport;
pub mod worker;
