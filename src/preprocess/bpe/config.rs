//! Reads a `tokenizer.json` (HF's serialization) into what the fast path needs, or says why the
//! fast path cannot serve it.
//!
//! Invariant: [`Spec::from_json`] accepts only configurations whose every step the fast path
//! reproduces exactly (see [`Unsupported`] for what it turns down); anything it does not
//! recognise is refused, never guessed. Runs once at load; pure.

use serde_json::Value;
use thiserror::Error;

use super::pretok::PATTERNS;
use crate::preprocess::tokenizer::byte_char;

/// Why a tokenizer is served by HF `tokenizers` instead of the fast path.
#[derive(Debug, Error)]
pub enum Unsupported {
    #[error("the model is {0}, not BPE")]
    NotBpe(String),
    #[error("the BPE model sets {0}")]
    ModelOption(String),
    #[error("the normalizer {0} is not NFC or none")]
    Normalizer(String),
    #[error(
        "the pre-tokenizer {0} is not the Qwen2/3 or Llama 3 split regex followed by ByteLevel, nor plain ByteLevel"
    )]
    PreTokenizer(String),
    #[error("the post-processor {0} is not ByteLevel, TemplateProcessing or none")]
    PostProcessor(String),
    #[error("added token {content:?} {why}")]
    AddedToken { content: String, why: &'static str },
    #[error("byte {0:#04x} has no token in the vocab")]
    MissingByte(u8),
    #[error("merge {0} names a token outside the vocab")]
    Merge(String),
    #[error("tokenizer.json is missing or has a malformed `{0}`")]
    Malformed(&'static str),
}

/// The normalizer steps the fast path reproduces.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Normalizer {
    None,
    Nfc,
}

/// The pre-tokenizers the fast path reproduces.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum PreTokenizer {
    /// The GPT-4-style split regex ([`PATTERNS`]), numbers of up to this many digits, then
    /// ByteLevel without a regex of its own.
    Split { max_digits: usize },
    /// ByteLevel alone, without its regex: the whole segment is one pre-token.
    Whole,
}

/// Everything the fast path needs from `tokenizer.json`.
pub(super) struct Spec {
    pub normalizer: Normalizer,
    pub pre_tokenizer: PreTokenizer,
    /// Content and id of every added token.
    pub added: Vec<(String, u32)>,
    /// Ids the post-processor puts before and after the sequence when special tokens are added.
    pub prefix: Vec<u32>,
    pub suffix: Vec<u32>,
    /// The id of each byte's symbol.
    pub byte_ids: [u32; 256],
    /// Every vocab entry made of byte symbols, as raw bytes.
    pub vocab: Vec<(Vec<u8>, u32)>,
    /// `(left, right, merged)` ids, in rank order.
    pub merges: Vec<(u32, u32, u32)>,
    pub ignore_merges: bool,
}

fn kind(v: &Value) -> &str {
    v.get("type").and_then(Value::as_str).unwrap_or("?")
}

fn flag(v: &Value, key: &str) -> bool {
    v.get(key).and_then(Value::as_bool).unwrap_or(false)
}

/// Null or the empty string.
fn unset(v: Option<&Value>) -> bool {
    match v {
        None | Some(Value::Null) => true,
        Some(Value::String(s)) => s.is_empty(),
        _ => false,
    }
}

impl Spec {
    pub(super) fn from_json(json: &Value) -> Result<Spec, Unsupported> {
        let model = json.get("model").ok_or(Unsupported::Malformed("model"))?;
        if kind(model) != "BPE" {
            return Err(Unsupported::NotBpe(kind(model).to_string()));
        }
        match model.get("dropout") {
            None | Some(Value::Null) => {}
            Some(d) if d.as_f64() == Some(0.0) => {}
            Some(d) => return Err(Unsupported::ModelOption(format!("dropout {d}"))),
        }
        for key in ["continuing_subword_prefix", "end_of_word_suffix"] {
            if !unset(model.get(key)) {
                return Err(Unsupported::ModelOption(key.to_string()));
            }
        }
        if flag(model, "byte_fallback") {
            return Err(Unsupported::ModelOption("byte_fallback".into()));
        }
        let normalizer = normalizer(json.get("normalizer"))?;
        let pre_tokenizer = pre_tokenizer(json.get("pre_tokenizer"))?;
        let (prefix, suffix) = post_processor(json.get("post_processor"))?;
        let added = added_tokens(json.get("added_tokens"))?;
        let (vocab, by_string, byte_ids) = vocab(model)?;
        let merges = merges(model, &by_string)?;
        Ok(Spec {
            normalizer,
            pre_tokenizer,
            added,
            prefix,
            suffix,
            byte_ids,
            vocab,
            merges,
            ignore_merges: flag(model, "ignore_merges"),
        })
    }
}

fn normalizer(v: Option<&Value>) -> Result<Normalizer, Unsupported> {
    let Some(v) = v.filter(|v| !v.is_null()) else { return Ok(Normalizer::None) };
    match kind(v) {
        "NFC" => Ok(Normalizer::Nfc),
        "Sequence" => {
            let steps = v.get("normalizers").and_then(Value::as_array).ok_or(Unsupported::Malformed("normalizers"))?;
            match steps.as_slice() {
                [] => Ok(Normalizer::None),
                [one] if kind(one) == "NFC" => Ok(Normalizer::Nfc),
                _ => Err(Unsupported::Normalizer(v.to_string())),
            }
        }
        _ => Err(Unsupported::Normalizer(v.to_string())),
    }
}

/// ByteLevel that maps bytes only: no regex of its own, no prefix space.
fn plain_byte_level(v: &Value) -> bool {
    kind(v) == "ByteLevel" && !flag(v, "add_prefix_space") && v.get("use_regex").and_then(Value::as_bool) == Some(false)
}

fn pre_tokenizer(v: Option<&Value>) -> Result<PreTokenizer, Unsupported> {
    let refuse = || Unsupported::PreTokenizer(v.map_or("none".into(), |v| v.to_string()));
    let v = v.filter(|v| !v.is_null()).ok_or_else(refuse)?;
    if plain_byte_level(v) {
        return Ok(PreTokenizer::Whole);
    }
    let steps = match kind(v) {
        "Sequence" => v.get("pretokenizers").and_then(Value::as_array).ok_or_else(refuse)?,
        _ => return Err(refuse()),
    };
    let [split, byte_level] = steps.as_slice() else { return Err(refuse()) };
    if kind(split) != "Split"
        || split.get("behavior").and_then(Value::as_str) != Some("Isolated")
        || flag(split, "invert")
        || !plain_byte_level(byte_level)
    {
        return Err(refuse());
    }
    let pattern = split.get("pattern").and_then(|p| p.get("Regex")).and_then(Value::as_str).ok_or_else(refuse)?;
    match PATTERNS.iter().find(|(p, _)| *p == pattern) {
        Some(&(_, max_digits)) => Ok(PreTokenizer::Split { max_digits }),
        None => Err(refuse()),
    }
}

/// The ids a post-processor adds around a single sequence.
fn post_processor(v: Option<&Value>) -> Result<(Vec<u32>, Vec<u32>), Unsupported> {
    let Some(v) = v.filter(|v| !v.is_null()) else { return Ok((Vec::new(), Vec::new())) };
    let refuse = || Unsupported::PostProcessor(v.to_string());
    match kind(v) {
        "ByteLevel" => Ok((Vec::new(), Vec::new())),
        "TemplateProcessing" => template(v).ok_or_else(refuse),
        "Sequence" => {
            let steps = v.get("processors").and_then(Value::as_array).ok_or_else(refuse)?;
            let mut templates = steps.iter().filter(|s| kind(s) != "ByteLevel");
            match (templates.next(), templates.next()) {
                (None, _) => Ok((Vec::new(), Vec::new())),
                (Some(t), None) if kind(t) == "TemplateProcessing" => template(t).ok_or_else(refuse),
                _ => Err(refuse()),
            }
        }
        _ => Err(refuse()),
    }
}

/// TemplateProcessing's `single`: special tokens around one `Sequence` A.
fn template(v: &Value) -> Option<(Vec<u32>, Vec<u32>)> {
    let specials = v.get("special_tokens")?;
    let (mut prefix, mut suffix) = (Vec::new(), Vec::new());
    let mut seen_sequence = false;
    for piece in v.get("single")?.as_array()? {
        if let Some(seq) = piece.get("Sequence") {
            if seen_sequence || seq.get("id").and_then(Value::as_str) != Some("A") {
                return None;
            }
            seen_sequence = true;
        } else {
            let name = piece.get("SpecialToken")?.get("id")?.as_str()?;
            let ids = specials.get(name)?.get("ids")?.as_array()?;
            let ids: Option<Vec<u32>> = ids.iter().map(|i| u32::try_from(i.as_u64()?).ok()).collect();
            if seen_sequence { &mut suffix } else { &mut prefix }.extend(ids?);
        }
    }
    seen_sequence.then_some((prefix, suffix))
}

fn added_tokens(v: Option<&Value>) -> Result<Vec<(String, u32)>, Unsupported> {
    let Some(list) = v.filter(|v| !v.is_null()) else { return Ok(Vec::new()) };
    let list = list.as_array().ok_or(Unsupported::Malformed("added_tokens"))?;
    let mut out: Vec<(String, u32)> = Vec::with_capacity(list.len());
    for t in list {
        let content = t.get("content").and_then(Value::as_str).ok_or(Unsupported::Malformed("added_tokens"))?;
        let id = t.get("id").and_then(Value::as_u64).and_then(|i| u32::try_from(i).ok());
        let id = id.ok_or(Unsupported::Malformed("added_tokens"))?;
        let why = if flag(t, "lstrip") || flag(t, "rstrip") || flag(t, "single_word") {
            Some("sets lstrip, rstrip or single_word")
        } else if flag(t, "normalized") {
            Some("is matched after normalization")
        } else if content.is_empty() {
            Some("is empty")
        } else if out.iter().any(|(c, _)| c == content) {
            Some("appears twice")
        } else {
            None
        };
        if let Some(why) = why {
            return Err(Unsupported::AddedToken { content: content.to_string(), why });
        }
        out.push((content.to_string(), id));
    }
    Ok(out)
}

type ByString = std::collections::HashMap<String, u32>;
/// Vocab entries as raw bytes with their ids.
type ByBytes = Vec<(Vec<u8>, u32)>;

/// The vocab as raw bytes (entries with chars outside the byte alphabet cannot come out of
/// merging bytes and are left out), by string, and each byte's id.
fn vocab(model: &Value) -> Result<(ByBytes, ByString, [u32; 256]), Unsupported> {
    let map = model.get("vocab").and_then(Value::as_object).ok_or(Unsupported::Malformed("model.vocab"))?;
    let mut unbyte = std::collections::HashMap::with_capacity(256);
    for b in 0..=255u8 {
        unbyte.insert(byte_char(b), b);
    }
    let mut by_string = ByString::with_capacity(map.len());
    let mut vocab = Vec::with_capacity(map.len());
    for (token, id) in map {
        let id = id.as_u64().and_then(|i| u32::try_from(i).ok()).ok_or(Unsupported::Malformed("model.vocab"))?;
        by_string.insert(token.clone(), id);
        let bytes: Option<Vec<u8>> = token.chars().map(|c| unbyte.get(&c).copied()).collect();
        if let Some(bytes) = bytes.filter(|b| !b.is_empty()) {
            vocab.push((bytes, id));
        }
    }
    let mut byte_ids = [0u32; 256];
    for b in 0..=255u8 {
        byte_ids[usize::from(b)] = *by_string.get(&byte_char(b).to_string()).ok_or(Unsupported::MissingByte(b))?;
    }
    Ok((vocab, by_string, byte_ids))
}

/// Merges as `"a b"` strings or `["a", "b"]` pairs.
fn merges(model: &Value, by_string: &ByString) -> Result<Vec<(u32, u32, u32)>, Unsupported> {
    let list = model.get("merges").and_then(Value::as_array).ok_or(Unsupported::Malformed("model.merges"))?;
    let mut out = Vec::with_capacity(list.len());
    for m in list {
        let (a, b) = match m {
            Value::String(s) => s.split_once(' ').ok_or(Unsupported::Malformed("model.merges"))?,
            Value::Array(pair) => match pair.as_slice() {
                [Value::String(a), Value::String(b)] => (a.as_str(), b.as_str()),
                _ => return Err(Unsupported::Malformed("model.merges")),
            },
            _ => return Err(Unsupported::Malformed("model.merges")),
        };
        let id = |s: &str| by_string.get(s).copied();
        match (id(a), id(b), id(&format!("{a}{b}"))) {
            (Some(l), Some(r), Some(m)) => out.push((l, r, m)),
            _ => return Err(Unsupported::Merge(format!("{a:?} + {b:?}"))),
        }
    }
    Ok(out)
}
