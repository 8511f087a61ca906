//! The replica-sync plane: frontends of one fleet tell each other where they routed
//! (router replica sync, [`crate::kv::replica`], [`crate::frontend::replica`]).
//!
//! A message is a [`DecisionBatch`]: the sending frontend's id (random per process, so a
//! frontend skips its own messages) and up to [`MAX_DECISIONS_PER_BATCH`] decisions, each a
//! worker, its model and the prompt's leading block hashes (at most [`MAX_DECISION_BLOCKS`]).
//! Encoding: [`REPLICA_MAGIC`], the format version, three zero bytes, then an rkyv archive of
//! the batch, bytecheck-validated on read, at most [`MAX_REPLICA_BYTES`]. Losing a message costs
//! a prediction, never correctness (the workers' KV events stay the truth), so nothing here
//! waits or retries: NATS is at-most-once and the in-process pair drops when full (counted).
//!
//! Subject over NATS: `{namespace}.router_sync` ([`replica_subject`]); every frontend of the
//! namespace publishes and subscribes there.
//!
//! Concurrency: publishers are shared (`Send + Sync`); a subscriber has one owner.

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;

use async_nats::{Client, Subscriber};
use futures::StreamExt;
use rkyv::util::AlignedVec;
use tokio::sync::mpsc;

use crate::contract::codec::{CodecError, FORMAT_VERSION};
use crate::contract::WorkerId;
use crate::kv::hash::SeqHash;
use crate::planes::events::nats::{sanitize_token, NatsError};

/// First four bytes of every replica-sync message.
pub const REPLICA_MAGIC: [u8; 4] = *b"KVRS";
/// Bytes before the archive: magic, version, three zero bytes.
const HEADER_LEN: usize = 8;
/// Blocks one decision carries at most (the prompt's prefix): 32 Ki tokens at 16 per block; a
/// longer prompt's prefix still predicts its overlap.
pub const MAX_DECISION_BLOCKS: usize = 2048;
/// Decisions one message carries at most: a burst is batched, not sent one message each.
pub const MAX_DECISIONS_PER_BATCH: usize = 32;
/// The largest message accepted or produced: a full batch of full decisions (16 KiB of hashes
/// each) plus names and framing, under NATS's default `max_payload` of 1 MiB.
pub const MAX_REPLICA_BYTES: usize = 640 * 1024;
/// Batches queued in process before new ones are dropped.
pub const REPLICA_QUEUE_DEPTH: usize = 64;

const _: () = assert!(MAX_DECISIONS_PER_BATCH * MAX_DECISION_BLOCKS * 8 + 64 * 1024 <= MAX_REPLICA_BYTES);

/// One routing decision: `worker` (of `model`) was sent a prompt whose leading blocks are `blocks`.
#[derive(Debug, Clone, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct Decision {
    pub worker: WorkerId,
    pub model: String,
    pub blocks: Vec<SeqHash>,
}

impl Decision {
    /// `worker` of `model` was sent a prompt of blocks `seq` (its first [`MAX_DECISION_BLOCKS`]).
    pub fn of(worker: WorkerId, model: &str, seq: &[SeqHash]) -> Self {
        Self { worker, model: model.to_string(), blocks: seq[..seq.len().min(MAX_DECISION_BLOCKS)].to_vec() }
    }
}

/// One message: decisions of frontend `frontend`.
#[derive(Debug, Clone, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct DecisionBatch {
    pub frontend: u64,
    pub decisions: Vec<Decision>,
}

/// Encodes a batch (the caller keeps it within the bounds above; a larger one is refused).
pub fn encode(batch: &DecisionBatch) -> Result<AlignedVec, CodecError> {
    let mut out = AlignedVec::<16>::new();
    out.extend_from_slice(&REPLICA_MAGIC);
    out.extend_from_slice(&[FORMAT_VERSION, 0, 0, 0]);
    let out = rkyv::api::high::to_bytes_in::<_, rkyv::rancor::Error>(batch, out).map_err(CodecError::Encode)?;
    if out.len() > MAX_REPLICA_BYTES {
        return Err(CodecError::TooManyToEncode { len: out.len(), max: MAX_REPLICA_BYTES });
    }
    Ok(out)
}

/// Validates a message at any alignment (the body is copied to align it) and returns it owned.
/// Untrusted bytes never panic; every refusal is a [`CodecError`], and a batch over the bounds
/// is refused as too large.
pub fn decode(bytes: &[u8]) -> Result<DecisionBatch, CodecError> {
    let len = bytes.len();
    if len > MAX_REPLICA_BYTES {
        return Err(CodecError::TooLarge { len, max: MAX_REPLICA_BYTES });
    }
    let Some((header, body)) = bytes.split_first_chunk::<HEADER_LEN>() else {
        return Err(CodecError::Truncated { len, expected: HEADER_LEN });
    };
    let magic = [header[0], header[1], header[2], header[3]];
    if magic != REPLICA_MAGIC {
        return Err(CodecError::BadMagic { found: magic });
    }
    if header[4] != FORMAT_VERSION {
        return Err(CodecError::UnsupportedVersion { found: header[4], supported: FORMAT_VERSION });
    }
    if header[5..8] != [0, 0, 0] {
        return Err(CodecError::Reserved { found: [header[5], header[6], header[7]] });
    }
    let mut aligned = AlignedVec::<16>::with_capacity(body.len());
    aligned.extend_from_slice(body);
    let archived = rkyv::access::<ArchivedDecisionBatch, rkyv::rancor::Error>(&aligned).map_err(CodecError::Invalid)?;
    if archived.decisions.len() > MAX_DECISIONS_PER_BATCH
        || archived.decisions.iter().any(|d| d.blocks.len() > MAX_DECISION_BLOCKS)
    {
        return Err(CodecError::TooLarge { len, max: MAX_REPLICA_BYTES });
    }
    rkyv::deserialize::<DecisionBatch, rkyv::rancor::Error>(archived).map_err(CodecError::Invalid)
}

/// Sending side. Never waits on a slow reader.
pub trait DecisionPublisher: Send + Sync + 'static {
    fn publish(&self, batch: &DecisionBatch) -> impl Future<Output = ()> + Send;
}

/// Receiving side: every frontend's batches, its own included (the caller skips those).
pub trait DecisionSubscriber: Send + 'static {
    /// The next batch; `None` once the plane is closed.
    fn next_batch(&mut self) -> impl Future<Output = Option<DecisionBatch>> + Send;
}

/// In-process publisher: one frontend's decisions to one other (hermetic tests).
#[derive(Clone)]
pub struct InProcessDecisionPublisher {
    tx: mpsc::Sender<DecisionBatch>,
    dropped: Arc<AtomicU64>,
}

impl InProcessDecisionPublisher {
    /// Batches dropped because the receiver was behind.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Relaxed)
    }
}

/// In-process subscriber.
pub struct InProcessDecisionSubscriber(mpsc::Receiver<DecisionBatch>);

/// A connected in-process pair.
pub fn in_process() -> (InProcessDecisionPublisher, InProcessDecisionSubscriber) {
    let (tx, rx) = mpsc::channel(REPLICA_QUEUE_DEPTH);
    (InProcessDecisionPublisher { tx, dropped: Arc::default() }, InProcessDecisionSubscriber(rx))
}

impl DecisionPublisher for InProcessDecisionPublisher {
    async fn publish(&self, batch: &DecisionBatch) {
        if let Err(mpsc::error::TrySendError::Full(_)) = self.tx.try_send(batch.clone()) {
            self.dropped.fetch_add(1, Relaxed);
        }
    }
}

impl DecisionSubscriber for InProcessDecisionSubscriber {
    async fn next_batch(&mut self) -> Option<DecisionBatch> {
        self.0.recv().await
    }
}

/// `{namespace}.router_sync` (sanitized).
pub fn replica_subject(namespace: &str) -> String {
    format!("{}.router_sync", sanitize_token(namespace))
}

/// Over NATS.
#[derive(Clone)]
pub struct NatsDecisionPublisher {
    client: Client,
    subject: String,
    errors: Arc<AtomicU64>,
}

impl NatsDecisionPublisher {
    pub fn new(client: Client, namespace: &str) -> Self {
        Self { client, subject: replica_subject(namespace), errors: Arc::default() }
    }
}

impl DecisionPublisher for NatsDecisionPublisher {
    async fn publish(&self, batch: &DecisionBatch) {
        let payload = match encode(batch) {
            Ok(aligned) => bytes::Bytes::copy_from_slice(&aligned),
            Err(e) => {
                self.errors.fetch_add(1, Relaxed);
                tracing::warn!(error = %e, "routing decisions not encoded");
                return;
            }
        };
        if let Err(e) = self.client.publish(self.subject.clone(), payload).await {
            self.errors.fetch_add(1, Relaxed);
            tracing::debug!(error = %e, subject = %self.subject, "routing decisions not published");
        }
    }
}

/// Over NATS: every frontend's batches.
pub struct NatsDecisionSubscriber {
    sub: Subscriber,
    malformed: Arc<AtomicU64>,
}

impl NatsDecisionSubscriber {
    pub async fn subscribe(client: &Client, namespace: &str) -> Result<Self, NatsError> {
        let subject = replica_subject(namespace);
        let sub = client
            .subscribe(subject.clone())
            .await
            .map_err(|source| NatsError::Subscribe { subject: subject.clone(), source })?;
        Ok(Self { sub, malformed: Arc::default() })
    }

    /// Payloads that did not decode.
    pub fn malformed_counter(&self) -> Arc<AtomicU64> {
        self.malformed.clone()
    }
}

impl DecisionSubscriber for NatsDecisionSubscriber {
    async fn next_batch(&mut self) -> Option<DecisionBatch> {
        loop {
            let msg = self.sub.next().await?;
            match decode(&msg.payload) {
                Ok(b) => return Some(b),
                Err(e) => {
                    self.malformed.fetch_add(1, Relaxed);
                    tracing::warn!(subject = %msg.subject, reason = e.label(), error = %e, "skipping malformed routing decisions");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batch(decisions: usize, blocks: usize) -> DecisionBatch {
        let seq: Vec<SeqHash> = (0..blocks as u64).map(SeqHash).collect();
        DecisionBatch {
            frontend: 7,
            decisions: (0..decisions).map(|i| Decision::of(WorkerId(i as u64), "m", &seq)).collect(),
        }
    }

    #[test]
    fn batches_round_trip_at_any_alignment_and_garbage_is_refused() {
        let b = batch(3, 5);
        let bytes = encode(&b).unwrap();
        assert_eq!(decode(&bytes).unwrap(), b);
        let mut shifted = vec![0u8];
        shifted.extend_from_slice(&bytes);
        assert_eq!(decode(&shifted[1..]).unwrap(), b);
        assert!(matches!(decode(&bytes[..4]), Err(CodecError::Truncated { .. })));
        let mut bad = bytes.to_vec();
        bad[0] = b'X';
        assert!(matches!(decode(&bad), Err(CodecError::BadMagic { .. })));
        let mut bad = bytes.to_vec();
        bad[4] = FORMAT_VERSION + 1;
        assert!(matches!(decode(&bad), Err(CodecError::UnsupportedVersion { .. })));
        assert!(matches!(decode(&vec![0u8; MAX_REPLICA_BYTES + 1]), Err(CodecError::TooLarge { .. })));
    }

    #[test]
    fn the_largest_batch_fits_and_decisions_keep_a_prefix() {
        let full = batch(MAX_DECISIONS_PER_BATCH, MAX_DECISION_BLOCKS);
        assert!(encode(&full).unwrap().len() <= MAX_REPLICA_BYTES);
        let long: Vec<SeqHash> = (0..5000).map(SeqHash).collect();
        let d = Decision::of(WorkerId(1), "m", &long);
        assert_eq!(d.blocks.len(), MAX_DECISION_BLOCKS);
        assert_eq!(d.blocks[0], SeqHash(0));
        // A batch over the bound, made by hand, is refused on both sides.
        let over = batch(MAX_DECISIONS_PER_BATCH + 1, 1);
        let bytes = encode(&over).unwrap();
        assert!(matches!(decode(&bytes), Err(CodecError::TooLarge { .. })));
    }

    #[test]
    fn subject() {
        assert_eq!(replica_subject("my.ns"), "my_ns.router_sync");
    }

    #[tokio::test]
    async fn in_process_drops_when_full() {
        let (p, mut s) = in_process();
        for _ in 0..REPLICA_QUEUE_DEPTH + 2 {
            p.publish(&batch(1, 1)).await;
        }
        assert_eq!(p.dropped(), 2);
        assert_eq!(s.next_batch().await.unwrap(), batch(1, 1));
    }
}
