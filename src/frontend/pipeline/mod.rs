//! One request's way through its shard, after HTTP and before the response body:
//!
//! - [`generate`]: `/v1/chat/completions` and `/v1/completions`: parse, validate, preprocess,
//!   dispatch, and answer as JSON or SSE (the status waits for the worker's first answer).
//! - [`admission`]: while every worker of the model is busy, the request waits in its shard's
//!   bounded queue (priority, then arrival) up to a timeout; 503 with `Retry-After` otherwise.
//! - [`dispatch`]: routing and the disaggregation plan (legs together or in sequence), sending,
//!   retries on unreachable workers, migration.
//! - [`offload`]: the preprocessing pool: long requests are parsed, rendered and tokenized on
//!   its threads (bounded queue, 503 when full), so they never stall a shard.
//! - [`tokenize`]: `/tokenize` and `/detokenize` (vLLM's shape).
//! - [`stream`]: a worker's outputs → text deltas (detokenization, stop strings, accounting,
//!   migration on a worker's failure) and the SSE body.
//!
//! Concurrency: runs on the shard that accepted the connection; nothing here is shared, but for
//! the preparation of a long request, which a pool thread does while its shard awaits the answer.

pub mod admission;
pub mod dispatch;
pub mod generate;
pub mod offload;
pub mod stream;
pub mod tokenize;
