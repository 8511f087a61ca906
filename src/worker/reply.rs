//! One request's reply stream as the engine writes it: never blocking, never losing order.
//!
//! Invariant: outputs are sent in order with `try_send`; what a full channel refuses waits in
//! `pending`, where consecutive tokens coalesce into one `Tokens` message, so `pending` holds at
//! most [`MAX_PENDING_OUTPUTS`] messages (`Started`, `Tokens`, one final message) whatever the
//! client's speed. Concurrency: owned by the worker task; the frontend holds the receiver, and
//! closes it to cancel.

use std::collections::VecDeque;

use tokio::sync::mpsc::{self, error::TrySendError};

use crate::contract::{TokenId, WorkerOutput};

/// `Started`, one coalesced `Tokens`, and the final `Finished`/`Error`.
pub const MAX_PENDING_OUTPUTS: usize = 3;

/// Result of trying to send what is pending.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flush {
    /// Everything was sent.
    Done,
    /// The channel is full; the rest waits for the next try.
    Blocked,
    /// The client is gone: the request must be cancelled.
    Closed,
}

#[derive(Debug)]
pub struct Reply {
    tx: mpsc::Sender<WorkerOutput>,
    pending: VecDeque<WorkerOutput>,
    started: bool,
}

impl Reply {
    pub fn new(tx: mpsc::Sender<WorkerOutput>) -> Self {
        Self { tx, pending: VecDeque::new(), started: false }
    }

    pub fn is_closed(&self) -> bool {
        self.tx.is_closed()
    }

    pub fn has_pending(&self) -> bool {
        !self.pending.is_empty()
    }

    /// A sender for awaiting free capacity (used only when the engine is otherwise idle).
    pub fn sender(&self) -> mpsc::Sender<WorkerOutput> {
        self.tx.clone()
    }

    /// Queues `Started` unless it was already queued.
    pub fn start(&mut self, cached_tokens: u32, computed_tokens: u32) {
        if !self.started {
            self.started = true;
            self.pending.push_back(WorkerOutput::Started { cached_tokens, computed_tokens });
        }
    }

    pub fn token(&mut self, t: TokenId) {
        debug_assert!(self.started, "Started precedes tokens");
        match self.pending.back_mut() {
            Some(WorkerOutput::Tokens(ts)) => ts.push(t),
            _ => self.pending.push_back(WorkerOutput::Tokens(vec![t])),
        }
    }

    /// Queues the stream's last message.
    pub fn finish(&mut self, last: WorkerOutput) {
        self.pending.push_back(last);
        debug_assert!(self.pending.len() <= MAX_PENDING_OUTPUTS);
    }

    /// Sends what is pending, in order, without waiting.
    pub fn flush(&mut self) -> Flush {
        while let Some(msg) = self.pending.pop_front() {
            match self.tx.try_send(msg) {
                Ok(()) => {}
                Err(TrySendError::Full(msg)) => {
                    self.pending.push_front(msg);
                    return Flush::Blocked;
                }
                Err(TrySendError::Closed(_)) => return Flush::Closed,
            }
        }
        Flush::Done
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::contract::FinishReason;

    #[test]
    fn a_full_channel_coalesces_tokens_and_keeps_order() {
        let (tx, mut rx) = mpsc::channel(1);
        let mut r = Reply::new(tx);
        r.start(16, 4);
        r.token(1);
        assert_eq!(r.flush(), Flush::Blocked);
        r.token(2);
        r.token(3);
        r.finish(WorkerOutput::Finished { reason: FinishReason::Eos });
        let mut got = Vec::new();
        while r.flush() == Flush::Blocked {
            got.push(rx.try_recv().unwrap());
        }
        got.push(rx.try_recv().unwrap());
        assert_eq!(
            got,
            vec![
                WorkerOutput::Started { cached_tokens: 16, computed_tokens: 4 },
                WorkerOutput::Tokens(vec![1, 2, 3]),
                WorkerOutput::Finished { reason: FinishReason::Eos },
            ]
        );
        drop(rx);
        r.token(4);
        assert_eq!(r.flush(), Flush::Closed);
    }
}
