//! Preprocessing: model loading, tokenizer, chat template, incremental detokenizer, stop strings.
//!
//! - [`source`]: where the model comes from ([`ModelSource`]: built in, a directory, the HF hub).
//! - [`tokenizer`]: the built-in byte-level tokenizer, special-token lookups, the sample text.
//! - [`bpe`]: [`bpe::FastBpe`], the fast encoder for byte-level BPE models (HF's exact ids);
//!   chosen once at load when the model's tokenizer is one it reproduces, HF `tokenizers`
//!   otherwise (one info line at load says which encodes, and why the fallback). Decoding is
//!   always HF's.
//! - [`token_cache`]: [`TokenCache`], the ids of long text segments already tokenized (shared
//!   by every shard and model, bounded in bytes), so a conversation's next turn pays only for
//!   its new text; the fast path uses it, HF's fallback does not.
//! - [`template`]: chat templates rendered like transformers' `apply_chat_template`.
//! - [`detok`]: [`IncrementalDecoder`], token ids → text, a small window per step.
//! - [`stop`]: [`StopMatcher`], cuts the text stream at the earliest stop string.
//! - [`budget`]: a lower bound on a text's tokens from its bytes (refuse before encoding).
//! - [`config`]: [`ModelConfig`], the `config.json` figures that size the KV cache.
//!
//! Invariant: a [`Preprocessor`] is loaded once at start-up and immutable afterwards; it is
//! `Send + Sync` and shared as `Arc<Preprocessor>` by every shard, which call it concurrently
//! without locks (the tokenizer and the compiled template are only read). Per-request state
//! ([`IncrementalDecoder`], [`StopMatcher`]) is owned by the request's task.

pub mod bpe;
pub mod budget;
pub mod config;
pub mod detok;
pub mod error;
pub mod source;
pub mod stop;
mod strftime;
pub mod template;
pub mod token_cache;
pub mod tokenizer;

use std::sync::Arc;

use serde_json::Value;
use tokenizers::Tokenizer;

pub use config::ModelConfig;
pub use detok::IncrementalDecoder;
pub use error::PreprocessError;
pub use source::ModelSource;
pub use stop::StopMatcher;
use template::ChatTemplate;
pub use token_cache::TokenCache;

/// A model's tokenizer, chat template and figures. Immutable after load.
pub struct Preprocessor {
    description: String,
    tokenizer: Tokenizer,
    /// Encodes instead of `tokenizer` when the model is one it reproduces exactly.
    fast: Option<bpe::FastBpe>,
    template: Option<ChatTemplate>,
    eos_token_ids: Vec<u32>,
    model_config: Option<ModelConfig>,
    vocab_size: usize,
    /// The longest token in bytes, when a lower bound on token counts exists ([`budget`]).
    token_bytes: Option<budget::TokenBytes>,
    sample_text_tokens: Arc<[u32]>,
}

// The HTTP layer shares one Preprocessor across shards.
const _: () = {
    const fn shared<T: Send + Sync>() {}
    shared::<Preprocessor>();
};

impl Preprocessor {
    /// Loads from `source`; reads files (and at most downloads them) once.
    pub fn load(source: &ModelSource) -> Result<Self, PreprocessError> {
        match source {
            ModelSource::Builtin => Ok(Self::builtin()),
            ModelSource::Dir(dir) => Self::from_files(source::read_dir(dir)?, format!("directory {}", dir.display())),
            ModelSource::Hub(repo) => {
                let dir = source::resolve_hub(repo, &source::HubSettings::from_env())?;
                let files = source::read_dir(&dir)?;
                Self::from_files(files, format!("Hugging Face hub {repo} (snapshot {})", dir.display()))
            }
        }
    }

    /// The byte-level model built into kvgate: no files, no network, ChatML template. Its KV
    /// is sized like Qwen3-0.6B's (28 layers × 8 KV heads × 128 dims, bf16: 114,688 bytes per
    /// token), so simulated capacities and KV transfers have realistic bytes.
    pub fn builtin() -> Self {
        use tokenizer::{BUILTIN_ENDOFTEXT_ID, BUILTIN_IM_END_ID, BUILTIN_SPECIALS};
        let tokenizer = tokenizer::builtin_tokenizer();
        let eos = BUILTIN_SPECIALS[2].to_string();
        let template = ChatTemplate::new("builtin ChatML", tokenizer::CHATML_TEMPLATE.into(), None, None, Some(eos))
            .expect("the built-in ChatML template compiles");
        Self::assemble(
            "builtin byte-level tokenizer".into(),
            tokenizer,
            Some(template),
            vec![BUILTIN_IM_END_ID, BUILTIN_ENDOFTEXT_ID],
            Some(ModelConfig {
                num_hidden_layers: 28,
                num_key_value_heads: 8,
                head_dim: 128,
                dtype_bytes: 2,
                max_position_embeddings: None,
            }),
        )
    }

    fn from_files(files: source::ModelFiles, description: String) -> Result<Self, PreprocessError> {
        let path = &files.tokenizer_json;
        let mut tokenizer = Tokenizer::from_file(path)
            .map_err(|source| PreprocessError::BadTokenizer { path: path.clone(), source })?;
        // Some tokenizer.json files carry truncation/padding settings; prompts must not be cut.
        tokenizer
            .with_truncation(None)
            .map_err(|source| PreprocessError::BadTokenizer { path: path.clone(), source })?;
        tokenizer.with_padding(None);

        let tk_config = files.tokenizer_config.as_ref();
        let bos = tokenizer::special_token(tk_config, "bos_token");
        let eos = tokenizer::special_token(tk_config, "eos_token");
        let template = match (&files.chat_template_file, tk_config.and_then(|c| c.get("chat_template"))) {
            (Some(t), _) => {
                let origin = files.dir.join("chat_template.jinja").display().to_string();
                Some(ChatTemplate::new(&origin, t.clone(), None, bos.clone(), eos.clone())?)
            }
            (None, Some(t)) => config_template(t, &files, bos.clone(), eos.clone())?,
            (None, None) => None,
        };
        let eos_ids = tokenizer::eos_token_ids(
            &tokenizer,
            &[files.generation_config.as_ref(), files.config.as_ref()],
            eos.as_deref(),
        );
        if eos_ids.is_empty() {
            tracing::warn!(model = %description, "no eos token id found; generation stops only at max_tokens or stop strings");
        }
        let model_config = files.config.as_ref().and_then(ModelConfig::from_json);
        Ok(Self::assemble(description, tokenizer, template, eos_ids, model_config))
    }

    fn assemble(
        description: String,
        tokenizer: Tokenizer,
        template: Option<ChatTemplate>,
        eos_token_ids: Vec<u32>,
        model_config: Option<ModelConfig>,
    ) -> Self {
        let vocab_size = tokenizer.get_vocab_size(true);
        let fast = match bpe::FastBpe::from_hf(&tokenizer) {
            Ok(fast) => {
                tracing::info!(model = %description, encoder = %fast.describe(), "tokenizer: the fast path encodes (HF tokenizers decodes)");
                Some(fast)
            }
            Err(why) => {
                tracing::info!(model = %description, fallback = %why, "tokenizer: HF tokenizers encodes (the fast path does not support this model)");
                None
            }
        };
        let token_bytes = budget::TokenBytes::of(&tokenizer, fast.is_some());
        let mut p = Preprocessor {
            description,
            tokenizer,
            fast,
            token_bytes,
            template,
            eos_token_ids,
            model_config,
            vocab_size,
            sample_text_tokens: Arc::from([]),
        };
        match p.encode(tokenizer::SAMPLE_TEXT, false) {
            Ok(ids) => p.sample_text_tokens = ids.into(),
            Err(e) => tracing::warn!(error = %e, "could not tokenize the sample text"),
        }
        p
    }

    /// True when [`bpe::FastBpe`] encodes for this model (HF `tokenizers` otherwise).
    pub fn uses_fast_tokenizer(&self) -> bool {
        self.fast.is_some()
    }

    /// HF's tokenizer, as loaded (it decodes; it encodes when the fast path does not).
    pub fn hf_tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// Where this model came from, for logs.
    pub fn source_description(&self) -> String {
        self.description.clone()
    }

    /// Renders the chat template over the OpenAI `messages` array (and `tools`).
    pub fn render_chat(
        &self,
        messages: &Value,
        tools: Option<&Value>,
        add_generation_prompt: bool,
    ) -> Result<String, PreprocessError> {
        let template = self.template.as_ref().ok_or(PreprocessError::MissingChatTemplate)?;
        template.render(messages, tools, add_generation_prompt)
    }

    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>, PreprocessError> {
        self.encode_with(text, add_special_tokens, None)
    }

    /// [`Self::encode`] with the ids of long segments taken from (and added to) `cache`, when the
    /// fast path encodes; HF's fallback does not use it (see [`token_cache`]).
    pub fn encode_with(
        &self,
        text: &str,
        add_special_tokens: bool,
        cache: Option<&TokenCache>,
    ) -> Result<Vec<u32>, PreprocessError> {
        if let Some(fast) = &self.fast {
            return Ok(fast.encode_with(text, add_special_tokens, cache));
        }
        let encoding = self
            .tokenizer
            .encode_fast(text, add_special_tokens)
            .map_err(|source| PreprocessError::Tokenize { source })?;
        Ok(encoding.get_ids().to_vec())
    }

    /// Renders (with the generation prompt) and encodes without adding special tokens again: the
    /// template already has them.
    pub fn encode_chat(&self, messages: &Value, tools: Option<&Value>) -> Result<Vec<u32>, PreprocessError> {
        let text = self.render_chat(messages, tools, true)?;
        self.encode(&text, false)
    }

    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String, PreprocessError> {
        self.tokenizer.decode(ids, skip_special_tokens).map_err(|source| PreprocessError::Decode { source })
    }

    /// Union of `generation_config.json`'s and `config.json`'s `eos_token_id` (int or list) and
    /// `tokenizer_config.json`'s `eos_token`.
    pub fn eos_token_ids(&self) -> &[u32] {
        &self.eos_token_ids
    }

    /// A fresh incremental decoder for one request's output.
    pub fn decoder(self: &Arc<Self>) -> IncrementalDecoder {
        IncrementalDecoder::new(Arc::clone(self))
    }

    /// Number of ids the tokenizer knows, added tokens included.
    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    /// The parsed `config.json`, if it had the KV figures.
    pub fn model_config(&self) -> Option<&ModelConfig> {
        self.model_config.as_ref()
    }

    /// Token ids of a few paragraphs of English, tokenized once at load.
    pub fn sample_text_tokens(&self) -> Arc<[u32]> {
        Arc::clone(&self.sample_text_tokens)
    }
}

/// `tokenizer_config.json`'s `chat_template`: a string, or HF's list of `{name, template}`
/// (`default`, plus `tool_use` when tools are given).
fn config_template(
    value: &Value,
    files: &source::ModelFiles,
    bos: Option<String>,
    eos: Option<String>,
) -> Result<Option<ChatTemplate>, PreprocessError> {
    let origin = files.dir.join("tokenizer_config.json").display().to_string();
    let (default, tool_use) = match value {
        Value::String(s) => (Some(s.clone()), None),
        Value::Array(list) => {
            let named = |name: &str| {
                list.iter()
                    .find(|t| t.get("name").and_then(Value::as_str) == Some(name))
                    .and_then(|t| t.get("template")?.as_str().map(str::to_string))
            };
            (named("default"), named("tool_use"))
        }
        _ => (None, None),
    };
    match (default, tool_use) {
        (Some(d), t) => Ok(Some(ChatTemplate::new(&origin, d, t, bos, eos)?)),
        // Only a tool-use template: use it for every request.
        (None, Some(t)) => Ok(Some(ChatTemplate::new(&origin, t, None, bos, eos)?)),
        (None, None) => Ok(None),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::path::PathBuf;
    use std::sync::OnceLock;

    use serde_json::json;

    use super::*;

    /// The shared Qwen3-0.6B files, or `None` (with a note) when the shared dir is absent.
    pub(crate) fn qwen_dir() -> Option<PathBuf> {
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/models/qwen3-0.6b");
        if dir.join(source::TOKENIZER_FILE).is_file() {
            Some(dir)
        } else {
            eprintln!("skipping: {} not found", dir.display());
            None
        }
    }

    /// Qwen3's preprocessor, loaded once per test binary (the tokenizer is 11 MB).
    pub(crate) fn qwen() -> Option<Arc<Preprocessor>> {
        static QWEN: OnceLock<Option<Arc<Preprocessor>>> = OnceLock::new();
        QWEN.get_or_init(|| {
            qwen_dir().map(|d| Arc::new(Preprocessor::load(&ModelSource::Dir(d)).expect("qwen3 loads")))
        })
        .clone()
    }

    #[test]
    fn qwen_single_user_message() {
        let Some(p) = qwen() else { return };
        let msgs = json!([{"role": "user", "content": "What is the capital of France?"}]);
        let ids = p.encode_chat(&msgs, None).unwrap();
        assert_eq!(ids, [151644, 872, 198, 3838, 374, 279, 6722, 315, 9625, 30, 151645, 198, 151644, 77091, 198]);
        let parts = json!([{"role": "user", "content": [{"type": "text", "text": "What is the capital of France?"}]}]);
        assert_eq!(p.encode_chat(&parts, None).unwrap(), ids);
    }

    #[test]
    fn qwen_multi_turn_strips_earlier_thinking() {
        let Some(p) = qwen() else { return };
        let msgs = json!([
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "Hi!"},
            {"role": "assistant", "content": "<think>\nThe user greets me.\n</think>\n\nHello! How can I help?"},
            {"role": "user", "content": "Name a prime."}
        ]);
        let expected = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n\
                        <|im_start|>user\nHi!<|im_end|>\n\
                        <|im_start|>assistant\nHello! How can I help?<|im_end|>\n\
                        <|im_start|>user\nName a prime.<|im_end|>\n\
                        <|im_start|>assistant\n";
        assert_eq!(p.render_chat(&msgs, None, true).unwrap(), expected);
        assert_eq!(
            p.render_chat(&msgs, None, false).unwrap(),
            expected.strip_suffix("<|im_start|>assistant\n").unwrap()
        );
    }

    #[test]
    fn qwen_tools_render_like_transformers() {
        let Some(p) = qwen() else { return };
        let msgs = json!([{"role": "user", "content": "Weather in Paris?"}]);
        let tools =
            json!([{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]);
        let out = p.render_chat(&msgs, Some(&tools), true).unwrap();
        let tool_line =
            r#"{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}"#;
        assert!(out.starts_with("<|im_start|>system\n# Tools\n\nYou may call one or more functions"), "{out}");
        assert!(out.contains(&format!("<tools>\n{tool_line}\n</tools>")), "{out}");
        assert!(out.ends_with("<|im_start|>user\nWeather in Paris?<|im_end|>\n<|im_start|>assistant\n"), "{out}");
    }

    /// Renders recorded from jinja2 set up as transformers does (tests/fixtures/preprocess/hf_render.py).
    #[test]
    fn qwen_matches_recorded_hf_renders() {
        let Some(p) = qwen() else { return };
        let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/preprocess/qwen3_hf_renders.json");
        let fixture: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        for (name, case) in fixture["cases"].as_object().unwrap() {
            let tools = Some(&case["tools"]).filter(|t| !t.is_null());
            let out = p.render_chat(&case["messages"], tools, true).unwrap();
            assert_eq!(out, fixture["out"][name].as_str().unwrap(), "case {name}");
        }
    }

    #[test]
    fn qwen_eos_vocab_config_sample() {
        let Some(p) = qwen() else { return };
        assert!(p.eos_token_ids().contains(&151645) && p.eos_token_ids().contains(&151643), "{:?}", p.eos_token_ids());
        assert_eq!(p.vocab_size(), 151_669);
        assert_eq!(p.model_config().unwrap().kv_bytes_per_token(), 114_688);
        assert_eq!(p.model_config().unwrap().max_position_embeddings, Some(40960));
        assert_eq!(p.encode("What is the capital of France?", true).unwrap(), [3838, 374, 279, 6722, 315, 9625, 30]);
        let sample = p.sample_text_tokens();
        assert!(sample.len() > 200);
        assert_eq!(p.decode(&sample, true).unwrap(), tokenizer::SAMPLE_TEXT);
        assert!(p.source_description().contains("qwen3-0.6b"));
    }

    #[test]
    fn builtin_model() {
        let p = Preprocessor::load(&ModelSource::Builtin).unwrap();
        assert_eq!(p.eos_token_ids(), [258, 256]);
        assert_eq!(p.vocab_size(), 259);
        assert_eq!(p.model_config().unwrap().kv_bytes_per_token(), 114_688);
        for s in ["", "plain ascii", "héllo 世界 🎉", "emoji 👩‍👩‍👧 and CJK 漢字かなカナ한국어", "<|im_end|> as text"]
        {
            let ids = p.encode(s, false).unwrap();
            assert_eq!(p.decode(&ids, false).unwrap(), s);
        }
        let msgs = json!([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi 👋"}]);
        let text = p.render_chat(&msgs, None, true).unwrap();
        assert_eq!(
            text,
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi 👋<|im_end|>\n<|im_start|>assistant\n"
        );
        let ids = p.encode_chat(&msgs, None).unwrap();
        assert_eq!((ids[0], ids[ids.len() - 11]), (257, 257));
        assert_eq!(p.decode(&ids, false).unwrap(), text);
        assert_eq!(p.decode(&p.sample_text_tokens(), false).unwrap(), tokenizer::SAMPLE_TEXT);
    }

    #[test]
    fn load_errors_are_server_errors_and_template_is_optional() {
        let tmp = tempfile::tempdir().unwrap();
        let err = Preprocessor::load(&ModelSource::Dir(tmp.path().into())).err().unwrap();
        assert!(!err.is_client_error());
        std::fs::write(tmp.path().join("tokenizer.json"), "{not json").unwrap();
        let err = Preprocessor::load(&ModelSource::Dir(tmp.path().into())).err().unwrap();
        assert!(matches!(err, PreprocessError::BadTokenizer { .. }), "{err}");

        let Some(dir) = qwen_dir() else { return };
        std::fs::copy(dir.join("tokenizer.json"), tmp.path().join("tokenizer.json")).unwrap();
        let named = json!({"chat_template": [{"name": "default", "template": "D{{ messages|length }}"}, {"name": "tool_use", "template": "T"}]});
        std::fs::write(tmp.path().join("tokenizer_config.json"), named.to_string()).unwrap();
        let p = Preprocessor::load(&ModelSource::Dir(tmp.path().into())).unwrap();
        assert_eq!(p.render_chat(&json!([]), None, true).unwrap(), "D0");
        assert_eq!(p.render_chat(&json!([]), Some(&json!([])), true).unwrap(), "T");
        std::fs::remove_file(tmp.path().join("tokenizer_config.json")).unwrap();
        let p = Preprocessor::load(&ModelSource::Dir(tmp.path().into())).unwrap();
        let err = p.encode_chat(&json!([{"role": "user", "content": "x"}]), None).unwrap_err();
        assert!(matches!(err, PreprocessError::MissingChatTemplate) && err.is_client_error());
        assert!(p.eos_token_ids().is_empty());
    }
}
