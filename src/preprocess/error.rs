//! The preprocess module's one error type.
//!
//! Invariant: every variant says who is at fault ([`PreprocessError::is_client_error`]) and keeps
//! its source; model-loading errors carry a message that says what to change. The HTTP layer maps
//! these to a status in exactly one place (`frontend::data::error`). Plain data: `Send + Sync`, no state.

use std::path::PathBuf;

use thiserror::Error;

#[derive(Debug, Error)]
pub enum PreprocessError {
    #[error("model directory {} does not exist or is not a directory; pass a directory holding tokenizer.json to --model-path", .0.display())]
    ModelDirNotFound(PathBuf),

    #[error("{} has no tokenizer.json (only Hugging Face fast tokenizers are supported; convert tokenizer.model with transformers' AutoTokenizer(...).save_pretrained)", .0.display())]
    MissingTokenizer(PathBuf),

    #[error(
        "model `{repo}` is not in the local Hugging Face cache (looked for {}/models--{}/snapshots/<rev>/tokenizer.json via refs/main) and downloading is disabled ({reason}); \
         pass a local model directory to --model-path, or pre-populate the cache (e.g. `hf download {repo}` on a machine with access, then copy {}), \
         or unset HF_HUB_OFFLINE to download",
        cache_dir.display(), repo.replace('/', "--"), cache_dir.display()
    )]
    ModelNotCached { repo: String, cache_dir: PathBuf, reason: String },

    #[error(
        "could not download `{file}` of `{repo}` from the Hugging Face hub into {}: {source}; \
         check the repo id and network (HF_ENDPOINT, HF_TOKEN for gated models), pass a local model directory to --model-path, \
         or set HF_HUB_OFFLINE=1 with a pre-populated cache",
        cache_dir.display()
    )]
    Download {
        repo: String,
        file: String,
        cache_dir: PathBuf,
        #[source]
        source: Box<hf_hub::api::sync::ApiError>,
    },

    #[error("could not read {}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("{} is not valid JSON: {source}", path.display())]
    BadJson {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },

    #[error("{} is not a valid tokenizer: {source}", path.display())]
    BadTokenizer {
        path: PathBuf,
        #[source]
        source: tokenizers::Error,
    },

    #[error("the chat template from {origin} does not compile: {source}")]
    BadTemplate {
        origin: String,
        #[source]
        source: minijinja::Error,
    },

    #[error("this model has no chat template (no chat_template.jinja and no chat_template in tokenizer_config.json); use /v1/completions with a raw prompt")]
    MissingChatTemplate,

    #[error("invalid messages: {0}")]
    InvalidMessages(String),

    #[error("chat template error: {message}")]
    TemplateRender {
        message: String,
        #[source]
        source: minijinja::Error,
    },

    #[error("tokenization failed: {source}")]
    Tokenize {
        #[source]
        source: tokenizers::Error,
    },

    #[error("detokenization failed: {source}")]
    Decode {
        #[source]
        source: tokenizers::Error,
    },
}

impl PreprocessError {
    /// True when the request's content caused the error (HTTP 400); false for model loading and
    /// internal failures (HTTP 500).
    pub fn is_client_error(&self) -> bool {
        use PreprocessError::*;
        match self {
            MissingChatTemplate | InvalidMessages(_) | TemplateRender { .. } | Tokenize { .. } => true,
            ModelDirNotFound(_)
            | MissingTokenizer(_)
            | ModelNotCached { .. }
            | Download { .. }
            | Io { .. }
            | BadJson { .. }
            | BadTokenizer { .. }
            | BadTemplate { .. }
            | Decode { .. } => false,
        }
    }

    /// A render failure: keeps the template's own message (e.g. from `raise_exception`) up front.
    pub(crate) fn render(source: minijinja::Error) -> Self {
        let message = match source.detail() {
            Some(d) => d.to_string(),
            None => source.to_string(),
        };
        PreprocessError::TemplateRender { message, source }
    }
}
