//! The sequencing state machine of one (engine, rank) stream, over a [`Wire`] (ENGINES.md §6
//! rule 8). The real wire is ZMQ ([`super::subscriber`]); tests drive it with a scripted one.
//!
//! Sequence rules (`last` = the last applied engine seq, with a fingerprint of its payload):
//! - A live batch with `seq == last + 1` is applied; `seq <= last` is a duplicate (the live
//!   copy of something a replay already applied) and skipped.
//! - A live `seq` at or below the previous *live* seq means the publisher restarted (its counter
//!   began again at 0): the state is cleared (`Cleared` is published) and rebuilt.
//! - A gap (`seq > last + 1`) asks the replay endpoint for everything from `last` (one batch
//!   before the wanted `last + 1`): the replayed copy of `last` must carry the same payload
//!   fingerprint, which proves the publisher is the one `last` came from. A different payload, or
//!   a replay with nothing at or after `last`, is a restart. A first replayed seq above `last + 1`
//!   is a window overrun: the state is cleared and rebuilt from what the replay and the live
//!   stream still have. Without a replay endpoint a gap clears the state the same way.
//! - On first connect the whole replay buffer is read (from 0), which also covers the
//!   slow-joiner loss of PUB/SUB.
//! - After the connection drops, the stream is *suspect*: the publisher may have restarted
//!   without its seq going backwards, so the next batch (or the reconnect) is verified by replay
//!   first; without a replay endpoint the state is cleared.
//! - Replays are retried at most [`MAX_RESYNC_ATTEMPTS`] times for one live batch; then history
//!   is declared lost (cleared, rebuilt from live).
//!
//! Every wait is bounded ([`Timeouts`]) and stop-aware, so a dead engine never hangs the task.
//! Lost history shows as later stores whose parent is unknown: they are dropped and counted
//! (`dropped_missing_parent`), never guessed.

use std::future::Future;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use bytes::Bytes;
use tokio::sync::{mpsc, watch};
use tokio::time::{timeout, timeout_at, Instant};

use crate::contract::events::KvEventKind;

use super::convert::{DropReason, Outcome, RankState, Skip};
use super::decode::{decode_payload, parse_replay_reply, parse_seq, ReplayReply};
use super::subscriber::{Counters, SourcedEvent, Timeouts};

/// Replays tried for one live batch before its history is declared lost: a replay fails only
/// when the engine is gone or its replay socket dropped replies, and neither heals in a loop.
pub const MAX_RESYNC_ATTEMPTS: u32 = 3;

/// One thing the wire delivered.
#[derive(Debug)]
pub enum WireEvent {
    /// A live message's frames.
    Message(Vec<Bytes>),
    /// The connection to the publisher dropped (the transport reconnects by itself).
    Disconnected,
    /// The transport (re)connected.
    Connected,
    /// Receiving failed; the driver pauses briefly and carries on.
    RecvError(String),
}

/// The transport seam: a live subscription plus a replay client.
pub trait Wire: Send {
    fn has_replay(&self) -> bool;
    /// The next live message or connection event (cancel-safe).
    fn next(&mut self) -> impl Future<Output = WireEvent> + Send;
    /// Sends a replay request for every buffered batch with seq ≥ `from`.
    fn replay_start(&mut self, from: u64) -> impl Future<Output = Result<(), String>> + Send;
    /// The next reply frames of the replay in progress.
    fn replay_next(&mut self) -> impl Future<Output = Result<Vec<Bytes>, String>> + Send;
    /// Ends the replay in progress (drops its socket).
    fn replay_end(&mut self);
}

/// The task was told to stop, or nobody reads its output any more.
#[derive(Debug)]
pub struct Stopped;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Applied {
    seq: u64,
    fingerprint: u64,
}

#[derive(Debug, PartialEq, Eq)]
enum Step {
    Apply,
    Duplicate,
    Resync { from: u64, gap: bool },
    LoseHistory,
}

#[derive(Debug)]
enum ReplayEnd {
    Complete,
    Restarted,
}

pub struct Driver<T, W> {
    pub(super) source: T,
    pub(super) rank: u32,
    pub(super) wire: W,
    pub(super) state: RankState,
    pub(super) out: mpsc::Sender<SourcedEvent<T>>,
    pub(super) counters: Arc<Counters>,
    pub(super) timeouts: Timeouts,
    pub(super) stop: watch::Receiver<bool>,
    last: Option<Applied>,
    live_high: Option<u64>,
    suspect: bool,
    /// Something other than `Cleared` was published since the last `Cleared`.
    dirty: bool,
}

impl<T: Clone + Send + Sync + 'static, W: Wire> Driver<T, W> {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        source: T,
        rank: u32,
        wire: W,
        state: RankState,
        out: mpsc::Sender<SourcedEvent<T>>,
        counters: Arc<Counters>,
        timeouts: Timeouts,
        stop: watch::Receiver<bool>,
    ) -> Self {
        Self {
            source,
            rank,
            wire,
            state,
            out,
            counters,
            timeouts,
            stop,
            last: None,
            live_high: None,
            suspect: false,
            dirty: true,
        }
    }

    /// Runs until stopped or until the output channel closes.
    pub async fn run(mut self) {
        let _ = self.run_inner().await;
    }

    async fn run_inner(&mut self) -> Result<(), Stopped> {
        // The consumer's view of this worker starts as empty as the state does.
        self.reset().await?;
        if self.wire.has_replay() {
            self.resync(0).await?;
        }
        loop {
            let event = tokio::select! {
                biased;
                _ = self.stop.changed() => return Err(Stopped),
                e = self.wire.next() => e,
            };
            match event {
                WireEvent::Message(frames) => self.on_message(frames).await?,
                WireEvent::Disconnected => {
                    self.counters.disconnects.fetch_add(1, Relaxed);
                    self.suspect = self.last.is_some();
                }
                WireEvent::Connected => {
                    self.counters.connects.fetch_add(1, Relaxed);
                    if self.suspect && self.wire.has_replay() {
                        let from = self.last.map_or(0, |a| a.seq);
                        self.resync(from).await?;
                    }
                }
                WireEvent::RecvError(e) => {
                    self.counters.recv_errors.fetch_add(1, Relaxed);
                    tracing::warn!(rank = self.rank, error = %e, "engine KV events: receive failed");
                    self.sleep(self.timeouts.recv_error_pause).await?;
                }
            }
        }
    }

    async fn on_message(&mut self, frames: Vec<Bytes>) -> Result<(), Stopped> {
        let parsed = match &frames[..] {
            [_topic, seq, payload] => parse_seq(seq).map(|s| (s, payload.clone())),
            _ => Err(super::decode::DecodeError::FrameCount { got: frames.len(), want: "3" }),
        };
        let (seq, payload) = match parsed {
            Ok(p) => p,
            Err(e) => {
                self.counters.malformed_messages.fetch_add(1, Relaxed);
                tracing::debug!(rank = self.rank, error = %e, "engine KV events: malformed message");
                return Ok(());
            }
        };
        if self.live_high.is_some_and(|h| seq <= h) {
            self.counters.restarts.fetch_add(1, Relaxed);
            tracing::warn!(rank = self.rank, seq, "engine KV events: publisher restarted (seq went back)");
            self.reset().await?;
        }
        self.live_high = Some(seq);
        let mut attempts = 0;
        loop {
            match self.classify(seq) {
                Step::Duplicate => {
                    self.counters.duplicates.fetch_add(1, Relaxed);
                    return Ok(());
                }
                Step::Apply => return self.apply(seq, &payload).await,
                Step::LoseHistory => {
                    self.lose_history("no replay endpoint").await?;
                    return self.apply(seq, &payload).await;
                }
                Step::Resync { from, gap } => {
                    if gap && attempts == 0 {
                        self.counters.gaps.fetch_add(1, Relaxed);
                    }
                    if attempts >= MAX_RESYNC_ATTEMPTS {
                        self.lose_history("replay kept failing").await?;
                        return self.apply(seq, &payload).await;
                    }
                    attempts += 1;
                    self.resync(from).await?;
                }
            }
        }
    }

    fn classify(&self, seq: u64) -> Step {
        let has_replay = self.wire.has_replay();
        match self.last {
            Some(a) if seq <= a.seq => Step::Duplicate,
            Some(a) if seq == a.seq + 1 && !self.suspect => Step::Apply,
            None if seq == 0 => Step::Apply,
            Some(a) if has_replay => Step::Resync { from: a.seq, gap: seq != a.seq + 1 },
            None if has_replay => Step::Resync { from: 0, gap: true },
            _ => Step::LoseHistory,
        }
    }

    /// Replays from `from` and applies what is missing; on a detected restart, clears and
    /// replays the new publisher's buffer from 0. Failures are counted, not fatal.
    async fn resync(&mut self, from: u64) -> Result<(), Stopped> {
        match self.replay(from).await? {
            Ok(ReplayEnd::Complete) => {}
            Ok(ReplayEnd::Restarted) => {
                self.counters.restarts.fetch_add(1, Relaxed);
                tracing::warn!(rank = self.rank, "engine KV events: publisher restarted (replay disagrees)");
                self.reset().await?;
                if let Err(e) = self.replay(0).await? {
                    self.replay_failed(e);
                }
            }
            Err(e) => self.replay_failed(e),
        }
        Ok(())
    }

    fn replay_failed(&self, e: String) {
        self.counters.replay_failures.fetch_add(1, Relaxed);
        tracing::warn!(rank = self.rank, error = %e, "engine KV events: replay failed");
    }

    async fn replay(&mut self, from: u64) -> Result<Result<ReplayEnd, String>, Stopped> {
        self.counters.replays.fetch_add(1, Relaxed);
        let verify = self.last.filter(|a| a.seq == from);
        let started = tokio::select! {
            biased;
            _ = self.stop.changed() => return Err(Stopped),
            r = timeout(self.timeouts.connect, self.wire.replay_start(from)) => r,
        };
        match started {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Ok(Err(format!("request from {from}: {e}"))),
            Err(_) => return Ok(Err(format!("request from {from}: timed out"))),
        }
        let result = self.read_replay(verify).await;
        self.wire.replay_end();
        result
    }

    async fn read_replay(&mut self, verify: Option<Applied>) -> Result<Result<ReplayEnd, String>, Stopped> {
        let deadline = Instant::now() + self.timeouts.replay_total;
        let mut first = true;
        loop {
            let wait_until = deadline.min(Instant::now() + self.timeouts.replay_reply);
            let frames = tokio::select! {
                biased;
                _ = self.stop.changed() => return Err(Stopped),
                r = timeout_at(wait_until, self.wire.replay_next()) => r,
            };
            let frames = match frames {
                Ok(Ok(f)) => f,
                Ok(Err(e)) => return Ok(Err(e)),
                Err(_) => return Ok(Err("no reply in time".into())),
            };
            let (seq, payload) = match parse_replay_reply(&frames) {
                Ok(ReplayReply::End) => break,
                Ok(ReplayReply::Batch { seq, payload }) => (seq, payload),
                Err(e) => {
                    self.counters.malformed_messages.fetch_add(1, Relaxed);
                    tracing::debug!(rank = self.rank, error = %e, "engine KV events: malformed replay reply");
                    continue;
                }
            };
            if std::mem::take(&mut first) {
                if let Some(v) = verify {
                    if seq < v.seq {
                        return Ok(Err(format!("replay from {} began at {seq}", v.seq)));
                    }
                    if seq == v.seq {
                        if xxhash_rust::xxh3::xxh3_64(payload) != v.fingerprint {
                            return Ok(Ok(ReplayEnd::Restarted));
                        }
                        self.suspect = false;
                        continue;
                    }
                    if seq > v.seq + 1 || self.suspect {
                        // What came before `seq` is gone (or unverifiable after a reconnect).
                        self.counters.overruns.fetch_add(1, Relaxed);
                        self.lose_history("replay window overrun").await?;
                    }
                } else if self.last.is_none() && seq > 0 {
                    self.counters.overruns.fetch_add(1, Relaxed);
                    self.lose_history("replay window overrun").await?;
                }
            }
            match self.last {
                Some(a) if seq <= a.seq => continue,
                Some(a) if seq != a.seq + 1 => return Ok(Err(format!("replay skipped from {} to {seq}", a.seq))),
                _ => self.apply(seq, payload).await?,
            }
        }
        Ok(Ok(if first && verify.is_some() { ReplayEnd::Restarted } else { ReplayEnd::Complete }))
    }

    /// Decodes and converts one batch, publishes its events, and records it as `last`.
    async fn apply(&mut self, seq: u64, payload: &[u8]) -> Result<(), Stopped> {
        let fingerprint = xxhash_rust::xxh3::xxh3_64(payload);
        match decode_payload(seq, payload) {
            Ok(batch) => {
                let c = &self.counters;
                c.batches_decoded.fetch_add(1, Relaxed);
                c.unknown_events.fetch_add(batch.unknown_events as u64, Relaxed);
                if batch.rank.is_some_and(|r| r != self.rank) {
                    c.rank_mismatches.fetch_add(1, Relaxed);
                }
                for event in batch.events {
                    let outcome = self.state.convert(event);
                    self.account(seq, outcome).await?;
                }
                let unknown = self.state.take_unknown_removals();
                self.counters.unknown_removals.fetch_add(unknown, Relaxed);
            }
            Err(e) => {
                // The same bytes would fail again: the batch is lost for good. Later stores that
                // needed it show up as missing parents.
                self.counters.malformed_payloads.fetch_add(1, Relaxed);
                tracing::warn!(rank = self.rank, seq, error = %e, "engine KV events: undecodable batch");
            }
        }
        self.last = Some(Applied { seq, fingerprint });
        Ok(())
    }

    async fn account(&mut self, seq: u64, outcome: Outcome) -> Result<(), Stopped> {
        let c = &self.counters;
        let counter = match outcome {
            Outcome::Emit(kind) => return self.emit(Some(seq), kind).await,
            Outcome::Nothing => return Ok(()),
            Outcome::Skipped(Skip::Medium) => &c.skipped_medium,
            Outcome::Skipped(Skip::Group) => &c.skipped_group,
            Outcome::Skipped(Skip::Lora) => &c.skipped_lora,
            Outcome::Dropped(DropReason::BlockSize { got, want }) => {
                // Loud once (a misconfiguration, not noise), then counted.
                if c.dropped_block_size.load(std::sync::atomic::Ordering::Relaxed) == 0 {
                    tracing::error!(rank = self.rank, got, want, "the engine publishes KV blocks of {got} tokens, kvgate's page size is {want}: start the engine with --page-size/--block-size {want} (or kvgate with --page-size {got}); its events are dropped, not mis-hashed");
                } else {
                    tracing::debug!(rank = self.rank, got, want, "engine KV events: block size mismatch");
                }
                &c.dropped_block_size
            }
            Outcome::Dropped(DropReason::TokenCount { got, want }) => {
                tracing::debug!(rank = self.rank, got, want, "engine KV events: token count mismatch");
                &c.dropped_token_count
            }
            Outcome::Dropped(DropReason::MissingParent { parent }) => {
                tracing::debug!(rank = self.rank, parent, "engine KV events: store with unknown parent");
                &c.dropped_missing_parent
            }
            Outcome::Overflow => {
                c.overflows.fetch_add(1, Relaxed);
                tracing::warn!(rank = self.rank, "engine KV events: tracked-block bound reached; state reset");
                return self.emit(Some(seq), KvEventKind::Cleared).await;
            }
        };
        counter.fetch_add(1, Relaxed);
        Ok(())
    }

    async fn emit(&mut self, engine_seq: Option<u64>, kind: KvEventKind) -> Result<(), Stopped> {
        self.dirty = !matches!(kind, KvEventKind::Cleared);
        self.counters.events_emitted.fetch_add(1, Relaxed);
        let event = SourcedEvent { source: self.source.clone(), engine_seq, kind };
        tokio::select! {
            biased;
            _ = self.stop.changed() => Err(Stopped),
            r = self.out.send(event) => r.map_err(|_| Stopped),
        }
    }

    /// Forgets everything and publishes `Cleared` (unless nothing was published since the
    /// last one). The live seq high-water mark is forgotten too.
    async fn reset(&mut self) -> Result<(), Stopped> {
        self.state.clear();
        self.last = None;
        self.live_high = None;
        self.suspect = false;
        if self.dirty {
            self.emit(None, KvEventKind::Cleared).await?;
        }
        Ok(())
    }

    /// History this stream can no longer get: start over from what comes next.
    async fn lose_history(&mut self, why: &'static str) -> Result<(), Stopped> {
        self.counters.history_lost.fetch_add(1, Relaxed);
        tracing::warn!(rank = self.rank, why, "engine KV events: history lost; rebuilding from live events");
        let live_high = self.live_high;
        self.reset().await?;
        self.live_high = live_high;
        Ok(())
    }

    async fn sleep(&mut self, d: std::time::Duration) -> Result<(), Stopped> {
        tokio::select! {
            biased;
            _ = self.stop.changed() => Err(Stopped),
            _ = tokio::time::sleep(d) => Ok(()),
        }
    }
}
