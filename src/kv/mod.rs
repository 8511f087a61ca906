//! KV-cache identity: block hashing, KV events, and the index of which worker caches what.
//!
//! - [`hash`]: Dynamo-compatible block and sequence hashes (pure functions).
//! - [`events`]: the events workers publish when they store, evict or clear blocks.
//! - [`codec`]: their wire format: rkyv archives validated (bytecheck) and read in place.
//! - [`index`]: sequence hash → workers holding it; one writer, lock-free readers.
//! - [`approx`]: approximate mode: the predicted caches of workers without KV events, kept in the
//!   index by its writer.
//! - [`replica`]: router replica sync: other frontends' routing decisions, held beside the
//!   index until the workers' events confirm them.

pub mod approx;
pub mod hash;
pub mod index;
pub mod replica;

pub use hash::{BlockHasher, LocalHash, SeqHash};
