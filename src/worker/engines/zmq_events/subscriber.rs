//! One tokio task per (engine, rank): a ZMQ SUB on the engine's event endpoint plus a DEALER
//! replay client, driving [`Driver`] and publishing converted events to a bounded channel.
//!
//! Transport: the pure-Rust `zeromq` crate (ZMTP 3 over tokio TCP), which interoperates with
//! libzmq/pyzmq PUB and ROUTER sockets. The SUB socket reconnects by itself after the
//! publisher restarts and re-sends its subscription; its connection events reach the driver,
//! which verifies the publisher by replay before trusting the sequence again. Each replay
//! opens a fresh DEALER (`["", start_seq_be8]`), reads until the end marker, and drops it.
//!
//! Bounds: the output channel ([`EVENT_CHANNEL_CAPACITY`]) is the only queue this module owns;
//! when it is full the task waits, stops reading the SUB socket, and TCP flow control leaves the
//! backlog to the engine's PUB high-water mark (100 000 batches by default), past which the
//! engine drops batches: the next one received is a gap, repaired by replay. A replay is
//! processed batch by batch, never buffered whole.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use zeromq::{DealerSocket, Socket, SocketEvent, SocketOptions, SocketRecv, SocketSend, SubSocket, ZmqMessage};

use crate::contract::events::KvEventKind;

use super::convert::{BlockSizeError, RankState, DEFAULT_MAX_TRACKED_BLOCKS};
use super::driver::{Driver, Wire, WireEvent};

/// Converted events buffered between a subscriber and its consumer: a few busy engine steps.
/// Past it the subscriber waits and the engine's PUB high-water mark takes the backlog.
pub const EVENT_CHANNEL_CAPACITY: usize = 4096;

/// A converted event and where it came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourcedEvent<T> {
    /// The caller's id for this (engine, rank) stream.
    pub source: T,
    /// The engine batch it came from; `None` for a `Cleared` the subscriber made itself
    /// (start, restart, lost history).
    pub engine_seq: Option<u64>,
    pub kind: KvEventKind,
}

/// A bounded channel for [`spawn`]'s output (several subscribers may share one).
pub fn event_channel<T>() -> (mpsc::Sender<SourcedEvent<T>>, mpsc::Receiver<SourcedEvent<T>>) {
    mpsc::channel(EVENT_CHANNEL_CAPACITY)
}

/// Every wait the task makes, bounded.
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    /// One connect attempt (SUB or replay DEALER) and one replay request.
    pub connect: Duration,
    /// Silence between two replay replies: the engine serves a replay between its 100 ms queue
    /// polls, so seconds of silence mean it is gone.
    pub replay_reply: Duration,
    /// A whole replay (the default engine buffer is 10 000 batches).
    pub replay_total: Duration,
    /// Longest wait between SUB connect attempts (the wait doubles from 100 ms up to this).
    pub reconnect_max: Duration,
    /// Pause after a receive error, so a broken socket cannot spin the task.
    pub recv_error_pause: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            connect: Duration::from_secs(5),
            replay_reply: Duration::from_secs(3),
            replay_total: Duration::from_secs(60),
            reconnect_max: Duration::from_secs(5),
            recv_error_pause: Duration::from_millis(100),
        }
    }
}

/// One (engine, rank) event stream.
#[derive(Debug, Clone)]
pub struct SubscriberConfig<T> {
    /// Tagged onto every output event (the integrator's worker id for this stream).
    pub source: T,
    /// The PUB endpoint, already offset by the rank (`tcp://127.0.0.1:5557`).
    pub endpoint: String,
    /// The ROUTER replay endpoint, already offset by the rank, if the engine has one.
    pub replay_endpoint: Option<String>,
    /// Topic prefix to subscribe to (`""` = all).
    pub topic: String,
    /// The rank this endpoint belongs to (batches naming another rank are counted).
    pub rank: u32,
    /// kvgate's block size; the engine's must equal it.
    pub block_size: u32,
    /// Bound on tracked blocks ([`DEFAULT_MAX_TRACKED_BLOCKS`]).
    pub max_tracked_blocks: usize,
    pub timeouts: Timeouts,
}

impl<T> SubscriberConfig<T> {
    pub fn new(source: T, endpoint: impl Into<String>, block_size: u32) -> Self {
        Self {
            source,
            endpoint: endpoint.into(),
            replay_endpoint: None,
            topic: String::new(),
            rank: 0,
            block_size,
            max_tracked_blocks: DEFAULT_MAX_TRACKED_BLOCKS,
            timeouts: Timeouts::default(),
        }
    }
}

macro_rules! counters {
    ($($(#[doc = $doc:literal])+ $name:ident,)+) => {
        /// What the subscribers did, as plain monotonic counters (`Relaxed`); one instance may
        /// be shared by many subscribers. [`Counters::snapshot`] lists them by name for export.
        #[derive(Debug, Default)]
        pub struct Counters {
            $($(#[doc = $doc])+ pub $name: AtomicU64,)+
        }

        impl Counters {
            /// Every counter as (name, value).
            pub fn snapshot(&self) -> Vec<(&'static str, u64)> {
                vec![$((stringify!($name), self.$name.load(Relaxed)),)+]
            }
        }
    };
}

counters! {
    /// Batches decoded and applied.
    batches_decoded,
    /// Events published to the output channel (including `Cleared` the subscriber made).
    events_emitted,
    /// Events of a type the decoder does not know.
    unknown_events,
    /// Events skipped: medium other than GPU.
    skipped_medium,
    /// Events skipped: KV cache group other than 0.
    skipped_group,
    /// Stores skipped: LoRA adapter blocks.
    skipped_lora,
    /// Stores dropped: block size differs from kvgate's.
    dropped_block_size,
    /// Stores dropped: token ids do not cover the blocks.
    dropped_token_count,
    /// Stores dropped: parent not tracked (history gap).
    dropped_missing_parent,
    /// Removed engine hashes that were not tracked.
    unknown_removals,
    /// Messages or replay replies with the wrong frames.
    malformed_messages,
    /// Batches whose payload did not decode (lost).
    malformed_payloads,
    /// Live batches already applied from a replay.
    duplicates,
    /// Sequence gaps seen on the live stream.
    gaps,
    /// Replay requests sent.
    replays,
    /// Replays that failed (timeout, connect error, dropped replies).
    replay_failures,
    /// Replays whose window no longer reached back to the wanted batch.
    overruns,
    /// Publisher restarts detected.
    restarts,
    /// Times the state was cleared and rebuilt from what came next.
    history_lost,
    /// Resets because the tracked-block bound was reached.
    overflows,
    /// Batches naming a rank other than the subscribed one.
    rank_mismatches,
    /// SUB (re)connections.
    connects,
    /// SUB disconnections.
    disconnects,
    /// Failed SUB connect attempts.
    connect_failures,
    /// Receive errors on the SUB socket.
    recv_errors,
}

/// A running subscriber. Dropping it aborts the task; [`stop`](Self::stop) ends it cleanly.
#[must_use = "dropping a SubscriberHandle aborts the subscriber"]
pub struct SubscriberHandle {
    stop: watch::Sender<bool>,
    task: Option<JoinHandle<()>>,
}

impl SubscriberHandle {
    /// Signals the task and waits for it to end (it checks at every wait).
    pub async fn stop(mut self) {
        let _ = self.stop.send(true);
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }

    /// Whether the task has ended (its output channel closed, or it was stopped).
    pub fn is_finished(&self) -> bool {
        self.task.as_ref().is_none_or(|t| t.is_finished())
    }
}

impl Drop for SubscriberHandle {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// Starts the task for one (engine, rank) stream on the current tokio runtime. It connects
/// (retrying with backoff until stopped), replays the engine's buffer when it has a replay
/// endpoint, then follows the live stream. Fails only on an unusable block size.
pub fn spawn<T: Clone + Send + Sync + 'static>(
    config: SubscriberConfig<T>,
    out: mpsc::Sender<SourcedEvent<T>>,
    counters: Arc<Counters>,
) -> Result<SubscriberHandle, BlockSizeError> {
    let state = RankState::new(config.block_size, config.max_tracked_blocks)?;
    let (stop_tx, mut stop) = watch::channel(false);
    let task = tokio::spawn(async move {
        let Some(wire) = ZmqWire::connect(&config, &counters, &mut stop).await else {
            return;
        };
        let SubscriberConfig { source, rank, timeouts, .. } = config;
        Driver::new(source, rank, wire, state, out, counters, timeouts, stop).run().await;
    });
    Ok(SubscriberHandle { stop: stop_tx, task: Some(task) })
}

/// The real [`Wire`]: SUB + monitor, and a DEALER per replay.
struct ZmqWire {
    sub: SubSocket,
    monitor: futures::channel::mpsc::Receiver<SocketEvent>,
    replay_endpoint: Option<String>,
    dealer: Option<DealerSocket>,
    connect_timeout: Duration,
}

impl ZmqWire {
    /// Connects the SUB socket, retrying with doubling waits; `None` once stopped.
    async fn connect<T>(
        cfg: &SubscriberConfig<T>,
        counters: &Counters,
        stop: &mut watch::Receiver<bool>,
    ) -> Option<Self> {
        let mut wait = Duration::from_millis(100);
        loop {
            match Self::try_connect(cfg).await {
                Ok(wire) => return Some(wire),
                Err(e) => {
                    counters.connect_failures.fetch_add(1, Relaxed);
                    tracing::warn!(endpoint = %cfg.endpoint, error = %e, "engine KV events: connect failed; retrying");
                }
            }
            tokio::select! {
                biased;
                _ = stop.changed() => return None,
                _ = tokio::time::sleep(wait) => {}
            }
            wait = (wait * 2).min(cfg.timeouts.reconnect_max);
        }
    }

    async fn try_connect<T>(cfg: &SubscriberConfig<T>) -> Result<Self, zeromq::ZmqError> {
        let mut options = SocketOptions::default();
        options.connect_timeout(cfg.timeouts.connect);
        let mut sub = SubSocket::with_options(options);
        let monitor = sub.monitor();
        sub.connect(&cfg.endpoint).await?;
        sub.subscribe(&cfg.topic).await?;
        Ok(Self {
            sub,
            monitor,
            replay_endpoint: cfg.replay_endpoint.clone(),
            dealer: None,
            connect_timeout: cfg.timeouts.connect,
        })
    }
}

impl Wire for ZmqWire {
    fn has_replay(&self) -> bool {
        self.replay_endpoint.is_some()
    }

    async fn next(&mut self) -> WireEvent {
        loop {
            tokio::select! {
                biased;
                Some(event) = self.monitor.next() => match event {
                    SocketEvent::Disconnected(_) => return WireEvent::Disconnected,
                    SocketEvent::Connected(..) => return WireEvent::Connected,
                    _ => continue,
                },
                r = self.sub.recv() => return match r {
                    Ok(message) => WireEvent::Message(message.into_vec()),
                    Err(e) => WireEvent::RecvError(e.to_string()),
                },
            }
        }
    }

    async fn replay_start(&mut self, from: u64) -> Result<(), String> {
        let endpoint = self.replay_endpoint.as_deref().ok_or("no replay endpoint")?;
        let mut options = SocketOptions::default();
        options.connect_timeout(self.connect_timeout);
        let mut dealer = DealerSocket::with_options(options);
        dealer.connect(endpoint).await.map_err(|e| e.to_string())?;
        let request = vec![Bytes::new(), Bytes::copy_from_slice(&from.to_be_bytes())];
        let request = ZmqMessage::try_from(request).map_err(|e| e.to_string())?;
        dealer.send(request).await.map_err(|e| e.to_string())?;
        self.dealer = Some(dealer);
        Ok(())
    }

    async fn replay_next(&mut self) -> Result<Vec<Bytes>, String> {
        let dealer = self.dealer.as_mut().ok_or("no replay in progress")?;
        dealer.recv().await.map(ZmqMessage::into_vec).map_err(|e| e.to_string())
    }

    fn replay_end(&mut self) {
        self.dealer = None;
    }
}
