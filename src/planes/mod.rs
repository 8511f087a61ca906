//! The seams between processes, each a small trait with an in-process implementation beside
//! the real one (what `kvgate serve` and the hermetic tests build their cluster from):
//!
//! - [`discovery`]: which workers exist (etcd leases; in-process snapshots).
//! - [`events`]: the KV event plane (NATS; in-process channel).
//! - [`load`]: workers' load reports (NATS; in-process channel), superseding each other.
//! - [`replica`]: frontends' routing decisions to each other (router replica sync; NATS;
//!   in-process channel).
//! - [`request`]: the request plane to workers (TCP frames; in-process channels).
//! - [`transfer`]: kvgate's own KV transfer plane for disaggregated mocker workers (TCP;
//!   in-process memory copy). Real engines move KV by their own backends.

pub mod discovery;
pub mod events;
pub mod load;
pub mod replica;
pub mod request;
pub mod transfer;
