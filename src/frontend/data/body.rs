//! The response body type every route returns: one buffer, or an SSE stream.
//!
//! Static dispatch, and `!Send` on purpose: a response lives on the shard that accepted its
//! connection (hyper's HTTP/1 server never moves it), so the SSE body can hold shard-local
//! state without atomics.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::{Body as HttpBody, Frame, SizeHint};

use crate::frontend::pipeline::stream::SseBody;

/// A response body.
pub enum Body {
    Full(Full<Bytes>),
    Sse(Box<SseBody>),
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
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Body::Full(f) => f.is_end_stream(),
            Body::Sse(s) => s.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Body::Full(f) => f.size_hint(),
            Body::Sse(_) => SizeHint::default(),
        }
    }
}
