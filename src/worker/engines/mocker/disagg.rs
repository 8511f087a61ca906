//! The mocker's side of disaggregated serving: prefill legs that push their KV to a decode
//! worker, and decode legs that wait for it.
//!
//! - A prefill leg runs as a normal request with `max_tokens = 1`: it computes the prompt and
//!   samples the first token. Instead of streaming that token, the engine hands the request to a
//!   transfer task ([`spawn_transfer`]) that pushes the prompt's KV blocks and the first token
//!   to the decode worker over the transfer plane, then reports `Started`, `Transferred` and
//!   `Finished` (or `Error`) on the leg's stream. The leg's blocks stay held (not evictable)
//!   until the transfer ends, as a real engine's KV must while it is read.
//! - A decode leg waits in [`Rooms`] until the transfer of its room lands (transfers may land
//!   before their decode leg: they wait too). Then the engine imports the prompt as computed
//!   and streams from the first token on. Either side that waits longer than the transfer
//!   timeout is dropped: a waiting decode leg gets an `Error`, an unclaimed transfer is
//!   discarded.
//!
//! Invariants: a room is claimed at most once; every waiting decode leg ends (imported, timed
//! out, or cancelled by its client). Concurrency: [`Rooms`] is owned by the engine task; transfer
//! tasks own only their leg's reply sender, live in the engine's `JoinSet` (a crashed worker's
//! transfers die with it; a stopping worker waits for them), and at most
//! [`MAX_CONCURRENT_TRANSFERS`] of them move bytes at once per worker.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, Semaphore};
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::contract::{FinishReason, GenerateRequest, TokenId, WorkerError, WorkerId, WorkerOutput};
use crate::planes::transfer::{Arrival, InProcessReceiverGuard, TransferHeader, TransferSender};

use super::kv_cache::SeqId;
use crate::worker::reply::Reply;

/// Transfers one prefill worker runs at once; the rest wait (their blocks stay cached).
pub const MAX_CONCURRENT_TRANSFERS: usize = 8;
/// Transfers landed at a decode worker and not yet claimed, at most (the oldest is dropped).
pub const MAX_UNCLAIMED_TRANSFERS: usize = 4096;

/// What a worker needs to take part in disaggregated serving. `Default` is an aggregated worker.
#[derive(Default)]
pub struct DisaggIo {
    /// Prefill role: pushes KV blocks.
    pub sender: Option<TransferSender>,
    /// Decode role: transfers that landed (from the transfer receiver).
    pub arrivals: Option<mpsc::Receiver<Arrival>>,
    /// Bytes of one KV block of the served model (0 when unknown).
    pub bytes_per_block: u64,
    /// How long either side of a room waits for the other.
    pub timeout: Duration,
    /// Decode role, in-process backend: keeps the receiver registered while the worker lives.
    pub in_process: Option<InProcessReceiverGuard>,
}

/// A prefill leg between its admission and its transfer.
#[derive(Debug, Clone)]
pub struct PrefillLeg {
    pub room: u64,
    /// Leading full blocks the decode worker holds already (not sent).
    pub skip_blocks: u32,
    pub request_id: u64,
    pub decode_worker: WorkerId,
    pub transfer_address: String,
    pub prompt_tokens: usize,
}

/// A decode leg matched with its transfer: import it.
pub struct Matched {
    pub skip_blocks: u32,
    pub request: GenerateRequest,
    pub reply: Reply,
    pub arrival: Arrival,
}

struct Waiting {
    skip_blocks: u32,
    request: GenerateRequest,
    reply: Reply,
    deadline: Instant,
}

/// Decode legs waiting for their KV, and KV waiting for its decode leg, by room.
pub struct Rooms {
    waiting: HashMap<u64, Waiting>,
    landed: HashMap<u64, (Arrival, Instant)>,
    timeout: Duration,
}

impl Rooms {
    pub fn new(timeout: Duration) -> Self {
        Self { waiting: HashMap::new(), landed: HashMap::new(), timeout }
    }

    /// No decode leg is waiting.
    pub fn no_waiting(&self) -> bool {
        self.waiting.is_empty()
    }

    /// A decode leg arrived: matched at once if its KV already landed, else it waits. A second
    /// leg for a room already waiting is refused (returned with an error queued).
    pub fn wait(
        &mut self,
        room: u64,
        skip_blocks: u32,
        request: GenerateRequest,
        mut reply: Reply,
    ) -> Result<Option<Matched>, Reply> {
        if let Some((arrival, _)) = self.landed.remove(&room) {
            return Ok(Some(Matched { skip_blocks, request, reply, arrival }));
        }
        if self.waiting.contains_key(&room) {
            reply
                .finish(WorkerOutput::Error(WorkerError::worker(format!("bootstrap room {room:x} is already in use"))));
            return Err(reply);
        }
        self.waiting.insert(room, Waiting { skip_blocks, request, reply, deadline: Instant::now() + self.timeout });
        Ok(None)
    }

    /// A transfer landed: matched if its decode leg waits, else kept until it comes.
    pub fn land(&mut self, arrival: Arrival) -> Option<Matched> {
        let room = arrival.header.room;
        if let Some(w) = self.waiting.remove(&room) {
            return Some(Matched { skip_blocks: w.skip_blocks, request: w.request, reply: w.reply, arrival });
        }
        if self.landed.len() >= MAX_UNCLAIMED_TRANSFERS {
            if let Some(oldest) = self.landed.iter().min_by_key(|(_, (_, t))| *t).map(|(r, _)| *r) {
                self.landed.remove(&oldest);
            }
        }
        self.landed.insert(room, (arrival, Instant::now()));
        None
    }

    /// The next instant something expires.
    pub fn next_deadline(&self) -> Option<Instant> {
        let w = self.waiting.values().map(|w| w.deadline).min();
        let l = self.landed.values().map(|(_, t)| *t + self.timeout).min();
        w.into_iter().chain(l).min()
    }

    /// Ends decode legs waiting past their deadline (with an error queued) and drops unclaimed
    /// transfers as old; returns the replies to drain.
    pub fn expire(&mut self, now: Instant) -> Vec<Reply> {
        let timeout = self.timeout;
        self.landed.retain(|room, (_, t)| {
            let keep = *t + timeout > now;
            if !keep {
                tracing::debug!(room = format_args!("{room:x}"), "dropping a KV transfer no decode request claimed");
            }
            keep
        });
        let expired: Vec<u64> = self.waiting.iter().filter(|(_, w)| w.deadline <= now).map(|(r, _)| *r).collect();
        expired
            .into_iter()
            .filter_map(|room| self.waiting.remove(&room).map(|w| (room, w)))
            .map(|(room, mut w)| {
                tracing::warn!(
                    request = format_args!("{:x}", w.request.request_id),
                    room = format_args!("{room:x}"),
                    "KV transfer did not arrive in time"
                );
                w.reply.finish(WorkerOutput::Error(WorkerError::worker(format!(
                    "the prompt's KV cache did not arrive from the prefill worker within {:.0} s",
                    timeout.as_secs_f64()
                ))));
                w.reply
            })
            .collect()
    }

    /// Forgets decode legs whose client is gone.
    pub fn drop_cancelled(&mut self) {
        self.waiting.retain(|_, w| !w.reply.is_closed());
    }
}

/// Hands a prefill leg's blocks back to the engine when its transfer ends, however it ends.
pub struct Release {
    pub tx: mpsc::Sender<SeqId>,
    pub seq: SeqId,
}

impl Drop for Release {
    fn drop(&mut self) {
        if self.tx.try_send(self.seq).is_err() && !self.tx.is_closed() {
            tracing::error!(seq = self.seq.0, "release queue full: a transferred prefill keeps its blocks");
        }
    }
}

/// Pushes a finished prefill leg's KV to its decode worker and reports on the leg's stream.
/// The task lives in the engine's `tasks`: it ends with the worker. Its blocks stay held until
/// the transfer ends (`release`).
#[allow(clippy::too_many_arguments)]
pub fn spawn_transfer(
    tasks: &mut JoinSet<()>,
    release: Release,
    sender: TransferSender,
    permits: Arc<Semaphore>,
    leg: PrefillLeg,
    header: TransferHeader,
    tx: mpsc::Sender<WorkerOutput>,
    started: WorkerOutput,
) {
    tasks.spawn(async move {
        let _release = release;
        let Ok(_permit) = permits.acquire_owned().await else { return };
        // The frontend cancelled the request (its decode leg failed): nothing to move.
        if tx.is_closed() || tx.send(started).await.is_err() {
            return;
        }
        let last = match sender.send(&leg.transfer_address, header).await {
            Ok(stats) => {
                // The transfer plane logs each transfer (room, request, bytes, seconds, GB/s).
                let micros = stats.elapsed.as_micros().min(u128::from(u64::MAX)) as u64;
                if tx
                    .send(WorkerOutput::Transferred { blocks: stats.blocks, bytes: stats.bytes, micros })
                    .await
                    .is_err()
                {
                    return;
                }
                WorkerOutput::Finished { reason: FinishReason::Length }
            }
            Err(e) => {
                tracing::warn!(request = format_args!("{:x}", leg.request_id), error = %e, "kv transfer failed");
                WorkerOutput::Error(WorkerError::worker(e.to_string()))
            }
        };
        let _ = tx.send(last).await;
    });
}

/// The header of a prefill leg's transfer.
pub fn header(
    leg: &PrefillLeg,
    page_size: usize,
    bytes_per_block: u64,
    first_token: Option<TokenId>,
) -> TransferHeader {
    TransferHeader {
        room: leg.room,
        request_id: leg.request_id,
        num_blocks: (leg.prompt_tokens.div_ceil(page_size) as u32).saturating_sub(leg.skip_blocks),
        bytes_per_block,
        first_token,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::planes::transfer::TransferStats;
    use crate::worker::engines::mocker::test_util::request;

    fn arrival(room: u64) -> Arrival {
        let header = TransferHeader { room, request_id: 1, num_blocks: 2, bytes_per_block: 8, first_token: Some(5) };
        Arrival { header, stats: TransferStats { blocks: 2, bytes: 16, elapsed: Duration::from_micros(3) } }
    }

    fn reply() -> (Reply, mpsc::Receiver<WorkerOutput>) {
        let (tx, rx) = mpsc::channel(4);
        (Reply::new(tx), rx)
    }

    #[tokio::test(start_paused = true)]
    async fn legs_and_transfers_meet_in_either_order_once() {
        let mut rooms = Rooms::new(Duration::from_secs(5));
        let (r, _rx) = reply();
        assert!(rooms.wait(1, 0, request(1, vec![1, 2, 3], 4), r).unwrap().is_none());
        let m = rooms.land(arrival(1)).expect("the waiting leg claims its transfer");
        assert_eq!(m.arrival.header.room, 1);
        assert!(rooms.no_waiting());

        assert!(rooms.land(arrival(2)).is_none());
        let (r, _rx2) = reply();
        let m = rooms.wait(2, 0, request(2, vec![1], 4), r).unwrap().expect("the landed transfer is claimed");
        assert_eq!(m.request.request_id, 2);
        // Claimed once: a second leg for room 2 now waits for a new transfer.
        let (r, _rx3) = reply();
        assert!(rooms.wait(2, 0, request(3, vec![1], 4), r).unwrap().is_none());
        let (r, mut rx4) = reply();
        let mut refused = rooms.wait(2, 0, request(4, vec![1], 4), r).err().expect("a room in use is refused");
        refused.flush();
        assert!(matches!(rx4.try_recv(), Ok(WorkerOutput::Error(e)) if e.message.contains("in use")));
    }

    #[tokio::test(start_paused = true)]
    async fn waiting_legs_time_out_with_an_error_and_stale_transfers_are_dropped() {
        let mut rooms = Rooms::new(Duration::from_secs(5));
        let (r, mut rx) = reply();
        assert!(rooms.wait(7, 0, request(1, vec![1], 4), r).unwrap().is_none());
        assert!(rooms.land(arrival(8)).is_none());
        assert!(rooms.expire(Instant::now()).is_empty());
        tokio::time::advance(Duration::from_secs(6)).await;
        assert_eq!(rooms.next_deadline().map(|d| d <= Instant::now()), Some(true));
        let mut expired = rooms.expire(Instant::now());
        assert_eq!(expired.len(), 1);
        expired[0].flush();
        assert!(matches!(rx.try_recv(), Ok(WorkerOutput::Error(e)) if e.message.contains("did not arrive")));
        assert!(rooms.no_waiting() && rooms.next_deadline().is_none(), "the unclaimed transfer was dropped too");
    }

    #[tokio::test]
    async fn a_cancelled_leg_stops_waiting() {
        let mut rooms = Rooms::new(Duration::from_secs(5));
        let (r, rx) = reply();
        assert!(rooms.wait(3, 0, request(1, vec![1], 4), r).unwrap().is_none());
        drop(rx);
        rooms.drop_cancelled();
        assert!(rooms.no_waiting());
    }
}
