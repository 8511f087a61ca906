//! `POST /tokenize` and `POST /detokenize` (also under `/v1/`), in the shape vLLM serves them
//! (SGLang's is the same but for detokenize's `text`):
//!
//! - tokenize: `model` with `prompt` (a string; `add_special_tokens` defaults to true) or
//!   `messages` (rendered by the chat template with `add_generation_prompt`, default true,
//!   `tools` and `chat_template_kwargs`; `add_special_tokens` defaults to false, the template
//!   has them) → `{"tokens", "count", "max_model_len"}`, plus `token_strs` when
//!   `return_token_strs` is true. `max_model_len` is the model's context (`null` if unknown);
//!   a prompt longer than it is still counted, not refused (the point is to measure it).
//! - detokenize: `model` with `tokens` (and `skip_special_tokens`, default false) →
//!   `{"prompt"}`; an id outside the vocabulary is a 400 naming `tokens`.
//!
//! `model` may be left out when one model is served (vLLM's default). Errors are the other
//! endpoints': bad JSON 400, unknown model 404, in OpenAI's shape. Bodies past
//! [`super::offload::INLINE_MAX_BODY_BYTES`] are handled on the preprocessing pool.
//!
//! Concurrency: runs on the shard that accepted the request, or on the pool; nothing shared is
//! written.

use std::sync::Arc;

use http::{Request, Response};
use hyper::body::Incoming;
use serde::Deserialize;
use serde_json::{json, Value};

use super::generate::{check_ids, context_limit, read_body};
use super::offload::INLINE_MAX_BODY_BYTES;
use crate::frontend::data::body::{json_response, Body};
use crate::frontend::data::error::ApiError;
use crate::frontend::{Frontend, ModelState};
use crate::openai::ValidationError;
use crate::preprocess::template::ChatExtras;

/// `/tokenize`'s body: vLLM's `TokenizeCompletionRequest` or `TokenizeChatRequest`.
#[derive(Debug, Deserialize)]
struct TokenizeRequest {
    #[serde(default)]
    model: Option<String>,
    #[serde(default)]
    prompt: Option<String>,
    #[serde(default)]
    messages: Option<Value>,
    #[serde(default)]
    add_special_tokens: Option<bool>,
    #[serde(default = "yes")]
    add_generation_prompt: bool,
    #[serde(default)]
    continue_final_message: bool,
    #[serde(default)]
    tools: Option<Value>,
    #[serde(default)]
    chat_template_kwargs: Option<Value>,
    #[serde(default)]
    return_token_strs: bool,
}

fn yes() -> bool {
    true
}

/// `/detokenize`'s body.
#[derive(Debug, Deserialize)]
struct DetokenizeRequest {
    #[serde(default)]
    model: Option<String>,
    tokens: Vec<u32>,
    #[serde(default)]
    skip_special_tokens: bool,
}

fn bad(param: &'static str, message: &'static str) -> ApiError {
    ApiError::Invalid(ValidationError { param: Some(param.into()), message: message.into() })
}

/// The named model, or the only one served when none is named.
fn resolve_model<P>(fe: &Frontend<P>, name: Option<&str>) -> Result<Arc<ModelState>, ApiError> {
    match name {
        Some(n) => fe.model(n).ok_or_else(|| ApiError::ModelNotFound(n.to_string())),
        None => match fe.models().as_slice() {
            [only] => Ok(only.clone()),
            _ => Err(bad("model", "model is required when more than one model is served")),
        },
    }
}

fn tokenize<P>(fe: &Frontend<P>, body: &[u8]) -> Result<Vec<u8>, ApiError> {
    let r: TokenizeRequest = serde_json::from_slice(body).map_err(ApiError::InvalidJson)?;
    let model = resolve_model(fe, r.model.as_deref())?;
    let pre = &model.preprocessor;
    let tokens = match (&r.prompt, &r.messages) {
        (Some(prompt), None) => pre.encode(prompt, r.add_special_tokens.unwrap_or(true))?,
        (None, Some(messages)) => {
            if r.continue_final_message {
                return Err(bad("continue_final_message", "continue_final_message is not supported"));
            }
            let extras = ChatExtras { tools: r.tools.as_ref(), kwargs: r.chat_template_kwargs.as_ref() };
            let text = pre.render_chat_with(messages, extras, r.add_generation_prompt)?;
            pre.encode(&text, r.add_special_tokens.unwrap_or(false))?
        }
        (Some(_), Some(_)) => return Err(bad("prompt", "give either prompt or messages, not both")),
        (None, None) => return Err(bad("prompt", "prompt or messages is required")),
    };
    let mut out = json!({"tokens": tokens, "count": tokens.len(), "max_model_len": context_limit(&model)});
    if r.return_token_strs {
        let hf = pre.hf_tokenizer();
        let strs: Vec<String> = tokens.iter().map(|&t| hf.id_to_token(t).unwrap_or_default()).collect();
        out["token_strs"] = json!(strs);
    }
    Ok(serde_json::to_vec(&out).expect("json"))
}

fn detokenize<P>(fe: &Frontend<P>, body: &[u8]) -> Result<Vec<u8>, ApiError> {
    let r: DetokenizeRequest = serde_json::from_slice(body).map_err(ApiError::InvalidJson)?;
    let model = resolve_model(fe, r.model.as_deref())?;
    let pre = &model.preprocessor;
    let ids = check_ids(r.tokens, pre.vocab_size(), "tokens")?;
    let prompt = pre.decode(&ids, r.skip_special_tokens)?;
    Ok(serde_json::to_vec(&json!({"prompt": prompt})).expect("json"))
}

/// Which of the two routes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    Tokenize,
    Detokenize,
}

/// Serves `/tokenize` or `/detokenize`.
pub async fn handle<P: crate::planes::request::RequestPlane>(
    fe: &Arc<Frontend<P>>,
    direction: Direction,
    req: Request<Incoming>,
) -> Result<Response<Body>, ApiError> {
    let body = read_body(req, fe.limits.max_body_bytes).await?;
    let small = body.len() <= INLINE_MAX_BODY_BYTES;
    let shared = fe.clone();
    let json = fe
        .prep_pool
        .run(small, move || match direction {
            Direction::Tokenize => tokenize(&shared, &body.into_bytes()),
            Direction::Detokenize => detokenize(&shared, &body.into_bytes()),
        })
        .await
        .map_err(ApiError::Offload)??;
    Ok(json_response(json))
}
