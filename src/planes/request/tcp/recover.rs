//! Recovery over the request plane: a worker's [`Recovery`] (replay or dump) sent as a run of
//! bounded `RecoverChunk` frames, and the frontend's [`RecoverySource`] that asks for one.
//!
//! Invariants: [`recovery_chunks`] splits only between events, in order, each chunk at most
//! [`RECOVERY_CHUNK_BYTES`] of events unless one event alone is larger (it then travels alone,
//! and an event too large for any frame is refused); [`RecoveryAssembler`] rebuilds exactly the
//! [`Recovery`] that was split, holding at most [`MAX_RECOVERY_BYTES`].
//!
//! Concurrency: a recovery is a cold-path call from a tokio task, so each one dials its own
//! short-lived tokio connection (the future is `Send`; the data plane's per-shard connections
//! are untouched), bounded by [`RECOVER_TIMEOUT`].

use std::net::SocketAddr;
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use super::io::FrameReader;
use super::{ConnError, TcpRequestPlane, CONNECT_TIMEOUT};
use crate::contract::control::{Recovery, WorkerGoneError};
use crate::contract::control::{RecoveryError, RecoverySource};
use crate::contract::events::KvEvent;
use crate::contract::events::MAX_WORKER_BLOCKS;
use crate::contract::frame::{
    event_wire_len, Frame, FrameError, RecoveryChunk, RecoveryKind, StreamId, BATCH_OVERHEAD_BYTES, CHUNK_FIXED_BYTES,
    EVENT_FIXED_BYTES, HEADER_LEN, MAX_FRAME_BYTES,
};
use crate::contract::Target;

/// Event bytes per chunk: small enough that a recovery never holds up a connection's writer
/// for long, large enough that a dump of a big cache is a few hundred frames.
pub const RECOVERY_CHUNK_BYTES: usize = 1024 * 1024;
/// The largest recovery a frontend accepts: a dump of the largest mocker cache, every block
/// its own `Stored` event (at most 80 encoded bytes), fits.
pub const MAX_RECOVERY_BYTES: usize = 512 * 1024 * 1024;
/// A whole recovery call, connect to last chunk (a big dump is hundreds of MiB on a LAN).
pub const RECOVER_TIMEOUT: Duration = Duration::from_secs(30);

const _: () = assert!(RECOVERY_CHUNK_BYTES + BATCH_OVERHEAD_BYTES + CHUNK_FIXED_BYTES + HEADER_LEN <= MAX_FRAME_BYTES);
const _: () = assert!(MAX_WORKER_BLOCKS as usize * (EVENT_FIXED_BYTES + 16) <= MAX_RECOVERY_BYTES);

/// Splits a recovery into chunk payloads, in order; the last has `more == false`.
pub fn recovery_chunks(recovery: Recovery) -> Result<Vec<RecoveryChunk>, FrameError> {
    let (kind, last_event_id, events) = match recovery {
        Recovery::Replay(events) => (RecoveryKind::Replay, 0, events),
        Recovery::Dump { events, last_event_id } => (RecoveryKind::Dump, last_event_id, events),
    };
    let chunk = |events, more| RecoveryChunk { kind, last_event_id, more, events };
    let mut chunks = Vec::new();
    let (mut current, mut bytes) = (Vec::new(), 0);
    for event in events {
        let n = event_wire_len(&event);
        let len = HEADER_LEN + CHUNK_FIXED_BYTES + BATCH_OVERHEAD_BYTES + n;
        if len > MAX_FRAME_BYTES {
            return Err(FrameError::TooLarge { len });
        }
        if !current.is_empty() && bytes + n > RECOVERY_CHUNK_BYTES {
            chunks.push(chunk(std::mem::take(&mut current), true));
            bytes = 0;
        }
        bytes += n;
        current.push(event);
    }
    chunks.push(chunk(current, false));
    Ok(chunks)
}

/// Puts chunks back together (frontend side).
#[derive(Debug, Default)]
pub struct RecoveryAssembler {
    head: Option<(RecoveryKind, u64)>,
    events: Vec<KvEvent>,
    bytes: usize,
}

impl RecoveryAssembler {
    /// Adds the next chunk; the whole recovery once the last one is in.
    pub fn push(&mut self, chunk: RecoveryChunk) -> Result<Option<Recovery>, ConnError> {
        let RecoveryChunk { kind, last_event_id, more, events } = chunk;
        if *self.head.get_or_insert((kind, last_event_id)) != (kind, last_event_id) {
            return Err(ConnError::Protocol("recovery chunks disagree on their kind or last event"));
        }
        self.bytes += events.iter().map(event_wire_len).sum::<usize>();
        if self.bytes > MAX_RECOVERY_BYTES {
            return Err(ConnError::Protocol("recovery larger than MAX_RECOVERY_BYTES"));
        }
        self.events.extend(events);
        if more {
            return Ok(None);
        }
        let events = std::mem::take(&mut self.events);
        Ok(Some(match kind {
            RecoveryKind::Replay => Recovery::Replay(events),
            RecoveryKind::Dump => Recovery::Dump { events, last_event_id },
        }))
    }
}

impl RecoverySource for TcpRequestPlane {
    /// A connection failure maps to [`RecoveryError::Gone`]: the worker is unreachable now;
    /// discovery decides whether it is gone for good.
    async fn recover(&self, to: Target, since: u64) -> Result<Recovery, RecoveryError> {
        let worker = to.worker;
        let addr = to.endpoint.ok_or(RecoveryError::Unknown(worker))?;
        let failure = match tokio::time::timeout(RECOVER_TIMEOUT, recover_from(addr, since)).await {
            Ok(Ok(recovery)) => return Ok(recovery),
            Ok(Err(e)) => super::error_chain(&e),
            Err(_) => format!("no answer within {RECOVER_TIMEOUT:?}"),
        };
        tracing::warn!(%worker, %addr, error = failure, "recovery over the request plane failed");
        Err(WorkerGoneError(worker).into())
    }
}

/// One recovery call on its own connection.
async fn recover_from(addr: SocketAddr, since_event_id: u64) -> Result<Recovery, ConnError> {
    let stream = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr))
        .await
        .map_err(|_| ConnError::ConnectTimeout(addr))??;
    stream.set_nodelay(true)?;
    let (r, mut w) = stream.into_split();
    let id = StreamId(1);
    let mut buf = BytesMut::new();
    Frame::RecoverRequest { stream: id, since_event_id }.encode(&mut buf)?;
    w.write_all(&buf).await?;
    let mut reader = FrameReader::new(r);
    let mut assembler = RecoveryAssembler::default();
    loop {
        match reader.next().await? {
            Some(Frame::RecoverChunk { stream, chunk }) if stream == id => {
                if let Some(recovery) = assembler.push(chunk)? {
                    return Ok(recovery);
                }
            }
            Some(Frame::Error { message, .. }) => return Err(ConnError::Remote(message)),
            Some(_) => return Err(ConnError::Protocol("unexpected frame in a recovery reply")),
            None => return Err(ConnError::Closed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::contract::events::{EngineHash, KvEventKind, StoredBlock};
    use crate::contract::WorkerId;
    use crate::kv::hash::SeqHash;

    fn stored(id: u64, blocks: usize) -> KvEvent {
        let blocks =
            (0..blocks as u64).map(|i| StoredBlock { seq_hash: SeqHash(i), engine_hash: EngineHash(i) }).collect();
        KvEvent {
            worker: WorkerId(1),
            event_id: id,
            timestamp_us: 0,
            kind: KvEventKind::Stored { parent: None, blocks },
        }
    }

    fn round_trip(r: Recovery) -> (usize, Recovery) {
        let chunks = recovery_chunks(r).unwrap();
        let n = chunks.len();
        let mut a = RecoveryAssembler::default();
        let mut out = None;
        for (i, c) in chunks.into_iter().enumerate() {
            assert_eq!(c.more, i + 1 < n);
            out = a.push(c).unwrap();
        }
        (n, out.expect("the last chunk completes it"))
    }

    #[test]
    fn small_and_empty_recoveries_are_one_chunk() {
        for r in [Recovery::Replay(vec![]), Recovery::Dump { events: vec![stored(5, 3)], last_event_id: 5 }] {
            assert_eq!(round_trip(r.clone()), (1, r));
        }
    }

    #[test]
    fn a_large_dump_splits_between_events_and_reassembles() {
        // 40 events of ~64 KiB: several chunks, none over the bound.
        let events: Vec<_> = (0..40).map(|_| stored(9, 4096)).collect();
        let r = Recovery::Dump { events, last_event_id: 9 };
        for c in recovery_chunks(r.clone()).unwrap() {
            assert!(c.events.iter().map(event_wire_len).sum::<usize>() <= RECOVERY_CHUNK_BYTES);
        }
        let (n, back) = round_trip(r.clone());
        assert!(n > 1);
        assert_eq!(back, r);
    }

    #[test]
    fn an_event_larger_than_a_chunk_travels_alone() {
        let big = stored(1, RECOVERY_CHUNK_BYTES / 16 + 1);
        let r = Recovery::Replay(vec![stored(1, 1), big, stored(2, 1)]);
        let (n, back) = round_trip(r.clone());
        assert_eq!((n, back), (3, r));
    }

    #[test]
    fn disagreeing_chunks_are_refused() {
        let mut a = RecoveryAssembler::default();
        let c = |kind, more| RecoveryChunk { kind, last_event_id: 3, more, events: vec![] };
        assert!(a.push(c(RecoveryKind::Dump, true)).unwrap().is_none());
        assert!(matches!(a.push(c(RecoveryKind::Replay, false)), Err(ConnError::Protocol(_))));
    }
}
