//! The response body type every route returns.
//!
//! `!Send` is fine: a response lives on the shard that accepted its connection.

use std::convert::Infallible;

use bytes::Bytes;
use http_body_util::{combinators::UnsyncBoxBody, BodyExt, Full};

/// A response body: a whole buffer or an SSE stream, boxed once per response.
pub type Body = UnsyncBoxBody<Bytes, Infallible>;

/// A body of one buffer.
pub fn full(b: impl Into<Bytes>) -> Body {
    Full::new(b.into()).boxed_unsync()
}

/// A JSON response with status 200.
pub fn json_response(bytes: Vec<u8>) -> http::Response<Body> {
    let mut r = http::Response::new(full(bytes));
    r.headers_mut().insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static("application/json"));
    r
}
