//! API errors and the one place they become HTTP statuses.
//!
//! Invariant: every failure a client can see goes through [`ApiError::status`] and
//! [`ApiError::into_response`], in OpenAI's shape
//! `{"error":{"message","type","param","code"}}`. Each variant keeps its source.

use bytes::Bytes;
use http::StatusCode;
use thiserror::Error;

use super::auth::AuthFailure;
use super::body::{full, Body};
use crate::contract::{Fault, WorkerError};
use crate::frontend::pipeline::offload::PoolError;
use crate::openai::ValidationError;
use crate::planes::request::TransportError;
use crate::preprocess::PreprocessError;

/// A worker error as the client reads it: its own words when the request was at fault.
fn worker_failure(e: &WorkerError) -> String {
    match e.fault {
        Fault::Client => e.message.clone(),
        Fault::Worker | Fault::Transport => format!("the worker failed: {}", e.message),
    }
}

#[derive(Debug, Error)]
pub enum ApiError {
    #[error("invalid JSON body: {0}")]
    InvalidJson(#[source] serde_json::Error),
    #[error("{}", .0.message)]
    Invalid(ValidationError),
    #[error("the model `{0}` does not exist")]
    ModelNotFound(String),
    #[error("no route for {method} {path}")]
    NotFound { method: String, path: String },
    #[error("method {method} is not allowed on {path}")]
    MethodNotAllowed { method: String, path: String },
    #[error("request body is larger than the limit of {limit} bytes")]
    BodyTooLarge { limit: usize },
    #[error("could not read the request body: {0}")]
    BodyRead(#[source] hyper::Error),
    #[error("{0}")]
    Preprocess(#[source] PreprocessError),
    #[error("token id {id} is outside the vocabulary of {vocab} tokens")]
    TokenOutOfRange { id: u32, vocab: usize, param: &'static str },
    #[error("the prompt has {prompt} tokens; this model's context is {limit}")]
    PromptTooLong { prompt: usize, limit: usize },
    /// Refused before tokenizing: a lower bound on the count already exceeds the context.
    #[error("the prompt has at least {at_least} tokens ({bytes} bytes); this model's context is {limit}")]
    PromptCannotFit { bytes: usize, at_least: usize, limit: usize },
    #[error("{0}")]
    Offload(#[source] PoolError),
    #[error("no worker is serving model `{0}`")]
    NoWorkers(String),
    #[error("model `{0}` has no {1} worker available and the frontend runs with --enforce-disagg")]
    DisaggUnavailable(String, &'static str),
    #[error("worker unavailable: {0}")]
    Transport(#[source] TransportError),
    #[error("{}", worker_failure(.0))]
    Worker(WorkerError),
    #[error("the worker failed ({cause}) and no other could take over: {then}")]
    MigrationFailed { cause: WorkerError, then: Box<ApiError> },
    #[error("detokenization failed: {0}")]
    Detokenize(String),
    #[error("the server is shutting down; retry on another replica")]
    ShuttingDown,
    /// No or a wrong API key (`--api-key`); the message never repeats the key sent.
    #[error("{}", unauthorized_message(*.0))]
    Unauthorized(AuthFailure),
    /// Every worker was busy and this shard's admission queue was full.
    #[error("every worker is busy and the queue is full ({limit} requests wait on this shard; --max-queued-requests); retry later")]
    QueueFull { limit: usize },
    /// Every worker stayed busy for the whole queue timeout.
    #[error("every worker stayed busy for {}s (--queue-timeout-s); retry later", .waited.as_secs_f64())]
    QueueTimeout { waited: std::time::Duration },
    #[error("too many open connections: this shard serves at most {limit} (--max-connections); retry later")]
    TooManyConnections { limit: usize },
    /// Too many dashboard pages open at once on this frontend.
    #[error("too many open dashboard pages: this frontend streams to at most {limit}; close one and retry")]
    TooManyViewers { limit: usize },
}

impl ApiError {
    /// The single mapping from error to HTTP status.
    pub fn status(&self) -> StatusCode {
        use ApiError::*;
        match self {
            InvalidJson(_)
            | Invalid(_)
            | TokenOutOfRange { .. }
            | PromptTooLong { .. }
            | PromptCannotFit { .. }
            | BodyRead(_) => StatusCode::BAD_REQUEST,
            Offload(PoolError::Full { .. }) => StatusCode::SERVICE_UNAVAILABLE,
            Offload(PoolError::Lost) => StatusCode::INTERNAL_SERVER_ERROR,
            Preprocess(e) if e.is_client_error() => StatusCode::BAD_REQUEST,
            Preprocess(_) => StatusCode::INTERNAL_SERVER_ERROR,
            ModelNotFound(_) | NotFound { .. } => StatusCode::NOT_FOUND,
            MethodNotAllowed { .. } => StatusCode::METHOD_NOT_ALLOWED,
            BodyTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            Unauthorized(_) => StatusCode::UNAUTHORIZED,
            NoWorkers(_) | DisaggUnavailable(..) | Transport(_) | ShuttingDown | TooManyConnections { .. } => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            QueueFull { .. } | QueueTimeout { .. } | TooManyViewers { .. } => StatusCode::SERVICE_UNAVAILABLE,
            Worker(e) => match e.fault {
                Fault::Client => StatusCode::BAD_REQUEST,
                Fault::Worker | Fault::Transport => StatusCode::BAD_GATEWAY,
            },
            MigrationFailed { then, .. } => then.status(),
            Detokenize(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// OpenAI's `type` for this error.
    pub fn kind(&self) -> &'static str {
        match self.status() {
            StatusCode::NOT_FOUND => "not_found_error",
            s if s.is_client_error() => "invalid_request_error",
            StatusCode::SERVICE_UNAVAILABLE => "service_unavailable",
            _ => "internal_server_error",
        }
    }

    fn param(&self) -> Option<&str> {
        match self {
            ApiError::Invalid(v) => v.param.as_deref(),
            ApiError::ModelNotFound(_) => Some("model"),
            ApiError::TokenOutOfRange { param, .. } => Some(param),
            ApiError::PromptTooLong { .. } | ApiError::PromptCannotFit { .. } => Some("prompt"),
            _ => None,
        }
    }

    fn code(&self) -> Option<&'static str> {
        match self {
            ApiError::ModelNotFound(_) => Some("model_not_found"),
            ApiError::BodyTooLarge { .. } => Some("request_too_large"),
            ApiError::Unauthorized(_) => Some("invalid_api_key"),
            ApiError::PromptTooLong { .. } | ApiError::PromptCannotFit { .. } => Some("context_length_exceeded"),
            _ => None,
        }
    }

    /// The JSON body of this error.
    pub fn body_json(&self) -> Vec<u8> {
        let mut message = self.to_string();
        // Keep the chain: "x: y: z" tells an operator where a server error came from.
        let mut src = std::error::Error::source(self);
        while let Some(s) = src {
            let s_text = s.to_string();
            if !message.contains(&s_text) {
                message.push_str(": ");
                message.push_str(&s_text);
            }
            src = s.source();
        }
        let v = serde_json::json!({"error": {"message": message, "type": self.kind(), "param": self.param(), "code": self.code()}});
        serde_json::to_vec(&v).expect("json")
    }

    /// Seconds a client should wait before retrying (`Retry-After`), for refusals under load.
    pub fn retry_after_s(&self) -> Option<u32> {
        match self {
            ApiError::Offload(PoolError::Full { .. })
            | ApiError::TooManyConnections { .. }
            | ApiError::ShuttingDown => Some(1),
            ApiError::QueueFull { .. } | ApiError::QueueTimeout { .. } => Some(1),
            _ => None,
        }
    }

    pub fn into_response(self) -> http::Response<Body> {
        let status = self.status();
        if status.is_server_error() {
            tracing::warn!(status = status.as_u16(), error = %self, "request failed");
        } else {
            tracing::debug!(status = status.as_u16(), error = %self, "request rejected");
        }
        let mut resp = http::Response::new(full(Bytes::from(self.body_json())));
        *resp.status_mut() = status;
        resp.headers_mut().insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static("application/json"));
        if let Some(s) = self.retry_after_s() {
            resp.headers_mut().insert(http::header::RETRY_AFTER, http::HeaderValue::from(s));
        }
        match self {
            // RFC 6750: a 401 names the scheme the client must use.
            ApiError::Unauthorized(_) => {
                resp.headers_mut().insert(http::header::WWW_AUTHENTICATE, http::HeaderValue::from_static("Bearer"));
            }
            // A draining server lets go of the connection so the client reconnects elsewhere.
            ApiError::ShuttingDown => {
                resp.headers_mut().insert(http::header::CONNECTION, http::HeaderValue::from_static("close"));
            }
            _ => {}
        }
        resp
    }
}

impl From<ValidationError> for ApiError {
    fn from(v: ValidationError) -> Self {
        ApiError::Invalid(v)
    }
}

impl From<PreprocessError> for ApiError {
    fn from(e: PreprocessError) -> Self {
        ApiError::Preprocess(e)
    }
}

/// OpenAI's wording, without the key that was sent.
fn unauthorized_message(f: AuthFailure) -> &'static str {
    match f {
        AuthFailure::Missing => {
            "You didn't provide an API key. You need to provide your API key in an Authorization header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY)."
        }
        AuthFailure::Wrong => "Incorrect API key provided.",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn openai_shape_and_statuses() {
        let e = ApiError::ModelNotFound("x".into());
        assert_eq!(e.status(), StatusCode::NOT_FOUND);
        let v: serde_json::Value = serde_json::from_slice(&e.body_json()).unwrap();
        assert_eq!(v["error"]["code"], "model_not_found");
        assert_eq!(v["error"]["param"], "model");
        assert!(v["error"]["message"].as_str().unwrap().contains('x'));
        assert_eq!(ApiError::BodyTooLarge { limit: 1 }.status(), StatusCode::PAYLOAD_TOO_LARGE);
        assert_eq!(ApiError::NoWorkers("m".into()).status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(ApiError::DisaggUnavailable("m".into(), "prefill").status(), StatusCode::SERVICE_UNAVAILABLE);
    }

    #[test]
    fn context_refusals_agree_and_a_full_pool_says_when_to_retry() {
        let counted = ApiError::PromptTooLong { prompt: 50_000, limit: 40_960 };
        let bounded = ApiError::PromptCannotFit { bytes: 10 << 20, at_least: 81_920, limit: 40_960 };
        for e in [&counted, &bounded] {
            let v: serde_json::Value = serde_json::from_slice(&e.body_json()).unwrap();
            assert_eq!(e.status(), StatusCode::BAD_REQUEST);
            assert_eq!(
                (v["error"]["code"].as_str(), v["error"]["param"].as_str()),
                (Some("context_length_exceeded"), Some("prompt"))
            );
        }
        let full = ApiError::Offload(PoolError::Full { queue: 64 });
        assert_eq!(full.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(full.into_response().headers()[http::header::RETRY_AFTER], "1");
        assert_eq!(ApiError::Offload(PoolError::Lost).status(), StatusCode::INTERNAL_SERVER_ERROR);
        for e in
            [ApiError::QueueFull { limit: 4 }, ApiError::QueueTimeout { waited: std::time::Duration::from_secs(2) }]
        {
            assert_eq!(e.status(), StatusCode::SERVICE_UNAVAILABLE);
            assert_eq!(e.kind(), "service_unavailable");
            assert_eq!(e.into_response().headers()[http::header::RETRY_AFTER], "1");
        }
        let tok = ApiError::TokenOutOfRange { id: 9, vocab: 3, param: "tokens" };
        let v: serde_json::Value = serde_json::from_slice(&tok.body_json()).unwrap();
        assert_eq!(v["error"]["param"], "tokens");
    }

    #[test]
    fn auth_and_drain_refusals_say_what_to_do() {
        let e = ApiError::Unauthorized(AuthFailure::Wrong);
        assert_eq!(e.status(), StatusCode::UNAUTHORIZED);
        let v: serde_json::Value = serde_json::from_slice(&e.body_json()).unwrap();
        assert_eq!(
            (v["error"]["type"].as_str(), v["error"]["code"].as_str()),
            (Some("invalid_request_error"), Some("invalid_api_key"))
        );
        assert_eq!(e.into_response().headers()[http::header::WWW_AUTHENTICATE], "Bearer");
        let r = ApiError::ShuttingDown.into_response();
        assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(
            (&r.headers()[http::header::RETRY_AFTER], &r.headers()[http::header::CONNECTION]),
            (&"1".parse::<http::HeaderValue>().unwrap(), &"close".parse::<http::HeaderValue>().unwrap())
        );
    }
}
