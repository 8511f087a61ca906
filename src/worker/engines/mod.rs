//! Engines a worker can run. Only the [`mocker`] (a simulated engine, no GPU) for now; adapters
//! for real engines (SGLang / vLLM over HTTP plus their KV-event streams) will sit beside it.

pub mod mocker;
