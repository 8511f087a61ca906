//! The response body type every route returns: one buffer, or an SSE stream.
//!
//! Static dispatch, and `!Send` on purpose: a response lives on the shard that accepted its
//! connection (hyper's HTTP/1 server never moves it), so the SSE body can hold shard-local
//! state without atomics.
//!
//! Every SSE body leaves the routes as a [`DrainableSse`]: when the shard's drain runs out of
//! time ([`ShardCtx::cut`]), its next poll ends it with an error event and `[DONE]` (a client
//! reads a finished stream, not a reset), and drops the stream so its worker stops.

use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::{Body as HttpBody, Frame, SizeHint};

use super::error::ApiError;
use super::ShardCtx;
use crate::frontend::pipeline::stream::SseBody;
use crate::openai::ChunkWriter;

/// A response body.
pub enum Body {
    Full(Full<Bytes>),
    Sse(Box<SseBody>),
    /// An SSE body the shard's drain may end early (what the routes return).
    Drainable(Box<DrainableSse>),
    /// The dashboard's snapshots ([`crate::frontend::dashboard::stream`]; ends on drain).
    Events(Box<crate::frontend::dashboard::stream::EventStream>),
}

/// An SSE stream that ends with an error event and `[DONE]` once its shard's drain timed out.
pub struct DrainableSse {
    /// `None` once cut: the stream (its worker request, bookings, in-flight count) is dropped.
    inner: Option<Box<SseBody>>,
    shard: Rc<ShardCtx>,
}

impl DrainableSse {
    pub fn new(inner: Box<SseBody>, shard: Rc<ShardCtx>) -> Self {
        Self { inner: Some(inner), shard }
    }

    fn poll_frame(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, std::convert::Infallible>>> {
        let Some(inner) = self.inner.as_mut() else {
            return Poll::Ready(None);
        };
        if self.shard.cut.get() && !inner.is_end_stream() {
            self.inner = None;
            let e = ApiError::ShuttingDown;
            let mut last = bytes::BytesMut::from(&ChunkWriter::error_event(&e.to_string(), e.kind())[..]);
            last.extend_from_slice(crate::openai::DONE);
            return Poll::Ready(Some(Ok(Frame::data(last.freeze()))));
        }
        Pin::new(inner.as_mut()).poll_frame(cx)
    }
}

/// A body of one buffer.
pub fn full(b: impl Into<Bytes>) -> Body {
    Body::Full(Full::new(b.into()))
}

/// A JSON response with status 200.
pub fn json_response(bytes: Vec<u8>) -> http::Response<Body> {
    let mut r = http::Response::new(full(bytes));
    r.headers_mut().insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static("application/json"));
    r
}

impl HttpBody for Body {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        match self.get_mut() {
            Body::Full(f) => Pin::new(f).poll_frame(cx),
            Body::Sse(s) => Pin::new(s.as_mut()).poll_frame(cx),
            Body::Drainable(d) => d.poll_frame(cx),
            Body::Events(e) => e.poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Body::Full(f) => f.is_end_stream(),
            Body::Sse(s) => s.is_end_stream(),
            Body::Drainable(d) => d.inner.as_ref().is_none_or(|s| s.is_end_stream()),
            Body::Events(_) => false,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Body::Full(f) => f.size_hint(),
            Body::Sse(_) | Body::Drainable(_) | Body::Events(_) => SizeHint::default(),
        }
    }
}
