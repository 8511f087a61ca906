//! The page's SSE stream: one `data:` event with a [`super::snapshot`] at once, then one every
//! [`SNAPSHOT_PERIOD`], until the client goes or the shard drains.
//!
//! Invariant: a stream holds a [`Viewer`] place for its whole life (released in `Drop`, so a
//! closed tab frees it), and builds a snapshot only when its timer fires, so an open page costs
//! one snapshot per period whatever the request rate.
//!
//! Concurrency: lives and is polled on the shard that accepted the connection (`!Send`, like
//! every body); the timer is the shard's monoio timer.

use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll};

use bytes::{BufMut, Bytes, BytesMut};
use hyper::body::Frame;

use super::snapshot::{build, Window};
use super::{Viewer, SNAPSHOT_PERIOD};
use crate::frontend::data::ShardCtx;
use crate::frontend::Frontend;

/// Builds the next event's bytes.
type Snapshot = Box<dyn FnMut() -> Bytes>;

/// See the module doc.
pub struct EventStream {
    snapshot: Snapshot,
    sleep: Option<Pin<Box<monoio::time::Sleep>>>,
    shard: Rc<ShardCtx>,
    _viewer: Viewer,
}

impl EventStream {
    pub fn new<P: 'static>(fe: std::sync::Arc<Frontend<P>>, shard: Rc<ShardCtx>, viewer: Viewer) -> Self {
        let mut window = Window::default();
        let snapshot = Box::new(move || {
            let json = serde_json::to_vec(&build(&fe, &mut window)).expect("json");
            let mut b = BytesMut::with_capacity(json.len() + 8);
            b.put_slice(b"data: ");
            b.put_slice(&json);
            b.put_slice(b"\n\n");
            b.freeze()
        });
        Self { snapshot, sleep: None, shard, _viewer: viewer }
    }

    pub fn poll_frame(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, std::convert::Infallible>>> {
        if self.shard.draining.get() {
            return Poll::Ready(None);
        }
        if let Some(sleep) = self.sleep.as_mut() {
            if sleep.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
        }
        let first = self.sleep.is_none();
        self.sleep = Some(Box::pin(monoio::time::sleep(SNAPSHOT_PERIOD)));
        let data = (self.snapshot)();
        let data = if first {
            // Tell EventSource clients to reconnect after 2 s if the stream ends.
            let mut b = BytesMut::from(&b"retry: 2000\n\n"[..]);
            b.put_slice(&data);
            b.freeze()
        } else {
            data
        };
        Poll::Ready(Some(Ok(Frame::data(data))))
    }
}
