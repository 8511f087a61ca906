//! One request's way through its shard, after HTTP and before the response body:
//!
//! - [`generate`]: `/v1/chat/completions` and `/v1/completions`: parse, validate, preprocess,
//!   dispatch, and answer as JSON or SSE (the status waits for the worker's first answer).
//! - [`dispatch`]: routing and the disaggregation plan (legs together or in sequence), sending,
//!   retries on unreachable workers, migration.
//! - [`stream`]: a worker's outputs → text deltas (detokenization, stop strings, accounting,
//!   migration on a worker's failure) and the SSE body.
//!
//! Concurrency: runs on the shard that accepted the connection; nothing here is shared.

pub mod dispatch;
pub mod generate;
pub mod stream;
