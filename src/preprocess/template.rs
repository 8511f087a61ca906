//! Chat templates: compiled once at load, rendered per request like Hugging Face transformers'
//! `apply_chat_template`.
//!
//! Invariant: the environment mirrors HF's jinja2 sandbox (`trim_blocks`, `lstrip_blocks`, no
//! trailing newline, Python string/dict methods via pycompat, `raise_exception`, `strftime_now`,
//! and a `tojson` that is Python's `json.dumps`), so the same messages render to the same string.
//! Immutable after load; `minijinja::Environment` is `Send + Sync`, so renders on any thread run
//! concurrently without locks. A render's work is bounded by its input, which the HTTP body limit
//! bounds.

use std::borrow::Cow;

use minijinja::value::{merge_maps, Kwargs, ValueKind};
use minijinja::{context, Environment, Error, ErrorKind, Value};

use super::error::PreprocessError;
use super::Preprocessor;
use crate::openai::parse::TemplateConventions;

const DEFAULT: &str = "default";
const TOOL_USE: &str = "tool_use";

/// The model's chat template(s), compiled.
pub struct ChatTemplate {
    env: Environment<'static>,
    has_tool_use: bool,
    bos_token: Option<String>,
    eos_token: Option<String>,
    conventions: TemplateConventions,
}

/// One chat render's inputs beyond the messages.
#[derive(Debug, Clone, Copy, Default)]
pub struct ChatExtras<'a> {
    /// The request's `tools` (the OpenAI array), when the model is to see them.
    pub tools: Option<&'a serde_json::Value>,
    /// `chat_template_kwargs`: more template variables (an object); the standard ones win.
    pub kwargs: Option<&'a serde_json::Value>,
}

impl ChatTemplate {
    /// Compiles `default` (and an optional `tool_use` variant, HF's named-template convention).
    pub fn new(
        origin: &str,
        default: String,
        tool_use: Option<String>,
        bos_token: Option<String>,
        eos_token: Option<String>,
    ) -> Result<Self, PreprocessError> {
        let mut env = Environment::new();
        minijinja_contrib::add_to_environment(&mut env);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_keep_trailing_newline(false);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", super::strftime::strftime_now);
        env.add_filter("tojson", tojson);
        let bad = |source| PreprocessError::BadTemplate { origin: origin.to_string(), source };
        let has_tool_use = tool_use.is_some();
        let mentions =
            |marker: &str| default.contains(marker) || tool_use.as_deref().is_some_and(|t| t.contains(marker));
        let conventions = TemplateConventions { think: mentions("<think>"), tool_call: mentions("<tool_call>") };
        env.add_template_owned(DEFAULT, default).map_err(bad)?;
        if let Some(t) = tool_use {
            env.add_template_owned(TOOL_USE, t).map_err(bad)?;
        }
        Ok(ChatTemplate { env, has_tool_use, bos_token, eos_token, conventions })
    }

    /// What the template teaches the model to write (decides `--reasoning-parser auto` and
    /// `--tool-call-parser auto`).
    pub fn conventions(&self) -> TemplateConventions {
        self.conventions
    }

    /// Renders `messages` (the OpenAI array; array contents flattened to text) with `tools`.
    pub fn render(
        &self,
        messages: &serde_json::Value,
        tools: Option<&serde_json::Value>,
        add_generation_prompt: bool,
    ) -> Result<String, PreprocessError> {
        self.render_with(messages, ChatExtras { tools, kwargs: None }, add_generation_prompt)
    }

    /// [`Self::render`] with `chat_template_kwargs`.
    pub fn render_with(
        &self,
        messages: &serde_json::Value,
        extras: ChatExtras<'_>,
        add_generation_prompt: bool,
    ) -> Result<String, PreprocessError> {
        let messages = flatten_messages(messages)?;
        let tools = extras.tools;
        let name = if tools.is_some() && self.has_tool_use { TOOL_USE } else { DEFAULT };
        let template = self.env.get_template(name).map_err(PreprocessError::render)?;
        let ctx = context! {
            messages => Value::from_serialize(&*messages),
            tools => tools.map(Value::from_serialize),
            add_generation_prompt => add_generation_prompt,
            bos_token => self.bos_token.as_deref().unwrap_or(""),
            eos_token => self.eos_token.as_deref().unwrap_or(""),
        };
        // The last map wins: the standard variables over the kwargs.
        let ctx = match extras.kwargs {
            Some(kwargs @ serde_json::Value::Object(_)) => merge_maps([Value::from_serialize(kwargs), ctx]),
            _ => ctx,
        };
        template.render(ctx).map_err(PreprocessError::render)
    }
}

/// The chat side of a [`Preprocessor`] (here, beside the template it drives).
impl Preprocessor {
    /// Renders a chat request with its extras (tools, `chat_template_kwargs`) and the generation
    /// prompt, as text: the caller may extend the answer's start before encoding it.
    pub fn render_chat_request(
        &self,
        messages: &serde_json::Value,
        extras: ChatExtras<'_>,
    ) -> Result<String, PreprocessError> {
        let template = self.template.as_ref().ok_or(PreprocessError::MissingChatTemplate)?;
        template.render_with(messages, extras, true)
    }

    /// What the model's chat template teaches it to write (nothing without a template).
    pub fn chat_conventions(&self) -> TemplateConventions {
        self.template.as_ref().map(ChatTemplate::conventions).unwrap_or_default()
    }
}

/// Turns each message into what chat templates expect, as vLLM does: `content` becomes a
/// string (an array of `{type:"text", text}` parts joined with "\n", `null` or an assistant's
/// missing content ""), and an assistant's `tool_calls[].function.arguments`, a JSON string in
/// OpenAI's API, becomes the object it encodes (templates write it with `tojson`). Borrows
/// when nothing needs changing.
fn flatten_messages(messages: &serde_json::Value) -> Result<Cow<'_, serde_json::Value>, PreprocessError> {
    use serde_json::Value as J;
    let list =
        messages.as_array().ok_or_else(|| PreprocessError::InvalidMessages("`messages` must be an array".into()))?;
    let is_assistant = |m: &J| m.get("role").and_then(J::as_str) == Some("assistant");
    let needs_fix = |m: &J| match m.get("content") {
        Some(J::String(_)) => is_assistant(m) && m.get("tool_calls").is_some(),
        None => is_assistant(m),
        Some(_) => true,
    };
    if !list.iter().any(needs_fix) {
        return Ok(Cow::Borrowed(messages));
    }
    let mut owned = list.clone();
    for (i, m) in owned.iter_mut().enumerate() {
        if is_assistant(m) {
            decode_tool_call_arguments(m);
            if let Some(obj) = m.as_object_mut() {
                obj.entry("content").or_insert(J::Null);
            }
        }
        let Some(content) = m.get_mut("content") else {
            continue;
        };
        let text = match content {
            J::String(_) => continue,
            J::Null => String::new(),
            J::Array(parts) => join_text_parts(parts)
                .map_err(|e| PreprocessError::InvalidMessages(format!("messages[{i}].content: {e}")))?,
            _ => {
                return Err(PreprocessError::InvalidMessages(format!(
                    "messages[{i}].content must be a string or an array of parts"
                )))
            }
        };
        *content = J::String(text);
    }
    Ok(Cow::Owned(J::Array(owned)))
}

/// An assistant message's `tool_calls[].function.arguments`: a JSON string holding an object
/// becomes that object; anything else is left as it is.
fn decode_tool_call_arguments(message: &mut serde_json::Value) {
    let Some(calls) = message.get_mut("tool_calls").and_then(serde_json::Value::as_array_mut) else { return };
    for call in calls {
        let Some(args) = call.get_mut("function").and_then(|f| f.get_mut("arguments")) else { continue };
        if let Some(text) = args.as_str() {
            if let Ok(v @ serde_json::Value::Object(_)) = serde_json::from_str::<serde_json::Value>(text) {
                *args = v;
            }
        }
    }
}

fn join_text_parts(parts: &[serde_json::Value]) -> Result<String, String> {
    let mut texts = Vec::with_capacity(parts.len());
    for part in parts {
        match (part.get("type").and_then(|t| t.as_str()), part.get("text").and_then(|t| t.as_str())) {
            (Some("text"), Some(text)) => texts.push(text),
            (Some(other), _) if other != "text" => {
                return Err(format!("content parts of type `{other}` are not supported (text only)"))
            }
            _ => return Err("a text part needs a string `text`".into()),
        }
    }
    Ok(texts.join("\n"))
}

/// `raise_exception(msg)`: fails the render with the template's own message.
fn raise_exception(message: String) -> Result<Value, Error> {
    Err(Error::new(ErrorKind::InvalidOperation, message))
}

/// HF's `tojson`: Python's `json.dumps(x, ensure_ascii=False, indent=None, separators=None,
/// sort_keys=False)`, keyword arguments honoured. No HTML escaping.
fn tojson(value: Value, kwargs: Kwargs) -> Result<Value, Error> {
    let indent: Option<Value> = kwargs.get("indent")?;
    let indent = match indent {
        None => None,
        Some(v) if v.is_none() => None,
        Some(v) => match v.as_str() {
            Some(s) => Some(s.to_string()),
            None => Some(" ".repeat(i64::try_from(v)?.max(0) as usize)),
        },
    };
    let ensure_ascii = kwargs.get::<Option<bool>>("ensure_ascii")?.unwrap_or(false);
    let sort_keys = kwargs.get::<Option<bool>>("sort_keys")?.unwrap_or(false);
    let separators: Option<Vec<String>> = kwargs.get("separators")?;
    kwargs.assert_all_used()?;
    let (item_sep, key_sep) = match separators.as_deref() {
        Some([item, key]) => (item.clone(), key.clone()),
        Some(_) => return Err(Error::new(ErrorKind::InvalidOperation, "tojson: separators must be a pair")),
        None if indent.is_some() => (",".to_string(), ": ".to_string()),
        None => (", ".to_string(), ": ".to_string()),
    };
    let mut w = JsonWriter { out: String::new(), indent, item_sep, key_sep, ensure_ascii, sort_keys };
    w.value(&value, 0)?;
    Ok(Value::from(w.out))
}

struct JsonWriter {
    out: String,
    indent: Option<String>,
    item_sep: String,
    key_sep: String,
    ensure_ascii: bool,
    sort_keys: bool,
}

impl JsonWriter {
    fn value(&mut self, v: &Value, depth: usize) -> Result<(), Error> {
        match v.kind() {
            ValueKind::Undefined | ValueKind::None => self.out.push_str("null"),
            ValueKind::Bool => self.out.push_str(if v.is_true() { "true" } else { "false" }),
            ValueKind::Number if v.is_integer() => self.out.push_str(&v.to_string()),
            ValueKind::Number => self.out.push_str(&py_float(f64::try_from(v.clone())?)),
            ValueKind::String => self.string(v.as_str().unwrap_or_default()),
            ValueKind::Map => {
                let mut keys: Vec<Value> = v.try_iter()?.collect();
                if self.sort_keys {
                    keys.sort();
                }
                let items: Result<Vec<_>, Error> = keys.into_iter().map(|k| Ok((v.get_item(&k)?, k))).collect();
                self.container(items?, depth, '{', '}')?;
            }
            ValueKind::Seq | ValueKind::Iterable => {
                let items: Vec<(Value, Value)> = v.try_iter()?.map(|x| (x, Value::UNDEFINED)).collect();
                self.container(items, depth, '[', ']')?;
            }
            _ => {
                return Err(Error::new(
                    ErrorKind::InvalidOperation,
                    format!("tojson: cannot serialize a value of kind {}", v.kind()),
                ))
            }
        }
        Ok(())
    }

    /// Writes a list (keys undefined) or an object's (value, key) pairs.
    fn container(&mut self, items: Vec<(Value, Value)>, depth: usize, open: char, close: char) -> Result<(), Error> {
        self.out.push(open);
        if items.is_empty() {
            self.out.push(close);
            return Ok(());
        }
        for (i, (item, key)) in items.iter().enumerate() {
            if i > 0 {
                let sep = std::mem::take(&mut self.item_sep);
                self.out.push_str(&sep);
                self.item_sep = sep;
            }
            self.newline(depth + 1);
            if !key.is_undefined() {
                match key.as_str() {
                    Some(s) => self.string(s),
                    None => self.string(&key.to_string()),
                }
                let sep = std::mem::take(&mut self.key_sep);
                self.out.push_str(&sep);
                self.key_sep = sep;
            }
            self.value(item, depth + 1)?;
        }
        self.newline(depth);
        self.out.push(close);
        Ok(())
    }

    fn newline(&mut self, depth: usize) {
        if let Some(indent) = &self.indent {
            self.out.push('\n');
            for _ in 0..depth {
                self.out.push_str(indent);
            }
        }
    }

    fn string(&mut self, s: &str) {
        self.out.push('"');
        for c in s.chars() {
            match c {
                '"' => self.out.push_str("\\\""),
                '\\' => self.out.push_str("\\\\"),
                '\n' => self.out.push_str("\\n"),
                '\r' => self.out.push_str("\\r"),
                '\t' => self.out.push_str("\\t"),
                '\u{8}' => self.out.push_str("\\b"),
                '\u{c}' => self.out.push_str("\\f"),
                c if (c as u32) < 0x20 || (self.ensure_ascii && !c.is_ascii()) => {
                    let mut buf = [0u16; 2];
                    for unit in c.encode_utf16(&mut buf) {
                        self.out.push_str(&format!("\\u{unit:04x}"));
                    }
                }
                c => self.out.push(c),
            }
        }
        self.out.push('"');
    }
}

/// Python's `repr(float)`: shortest round-trip digits, exponent form outside [1e-4, 1e16).
fn py_float(f: f64) -> String {
    if f.is_nan() {
        return "NaN".into();
    }
    if f.is_infinite() {
        return if f > 0.0 { "Infinity".into() } else { "-Infinity".into() };
    }
    let sci = format!("{f:e}");
    let (mantissa, exp) = sci.split_once('e').expect("{:e} always has an exponent");
    let exp: i32 = exp.parse().expect("{:e} exponent is an integer");
    if f != 0.0 && !(-4..16).contains(&exp) {
        return format!("{mantissa}e{}{:02}", if exp < 0 { '-' } else { '+' }, exp.abs());
    }
    let plain = f.to_string();
    if plain.contains('.') {
        plain
    } else {
        plain + ".0"
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn env_render(src: &str, ctx: Value) -> Result<String, Error> {
        let t = ChatTemplate::new("test", src.to_string(), None, None, None).unwrap();
        t.env.get_template(DEFAULT)?.render(ctx)
    }

    #[test]
    fn tojson_is_python_json_dumps() {
        let tool =
            json!({"type": "function", "function": {"name": "f", "x": [1, 2.5, 1e20, true, null], "s": "é\"<>\n"}});
        let out = env_render("{{ t | tojson }}", context! { t => Value::from_serialize(&tool) }).unwrap();
        // Keys keep the request's order (serde_json's preserve_order), as Python dicts do.
        assert_eq!(
            out,
            r#"{"type": "function", "function": {"name": "f", "x": [1, 2.5, 1e+20, true, null], "s": "é\"<>\n"}}"#
        );
        let out = env_render(
            "{{ t | tojson(indent=2) }}",
            context! { t => Value::from_serialize(json!({"a": [1, {}], "b": []})) },
        )
        .unwrap();
        assert_eq!(out, "{\n  \"a\": [\n    1,\n    {}\n  ],\n  \"b\": []\n}");
        let out = env_render("{{ 'é' | tojson(ensure_ascii=true) }}", context! {}).unwrap();
        assert_eq!(out, r#""\u00e9""#);
        assert_eq!(py_float(1.0), "1.0");
        assert_eq!(py_float(0.0001), "0.0001");
        assert_eq!(py_float(0.00001), "1e-05");
    }

    #[test]
    fn raise_exception_surfaces_message() {
        let t = ChatTemplate::new("test", "{{ raise_exception('roles must alternate') }}".into(), None, None, None)
            .unwrap();
        let err = t.render(&json!([]), None, true).unwrap_err();
        assert!(err.is_client_error());
        assert_eq!(err.to_string(), "chat template error: roles must alternate");
    }

    #[test]
    fn content_parts_are_flattened() {
        let t =
            ChatTemplate::new("test", "{% for m in messages %}[{{ m.content }}]{% endfor %}".into(), None, None, None)
                .unwrap();
        let msgs = json!([{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}, {"role": "assistant", "content": null}]);
        assert_eq!(t.render(&msgs, None, false).unwrap(), "[a\nb][]");
        let bad = json!([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]);
        assert!(matches!(t.render(&bad, None, false), Err(PreprocessError::InvalidMessages(_))));
    }

    /// What vLLM does with an OpenAI chat request: `chat_template_kwargs` reach the template
    /// (the standard variables win), an assistant's tool calls with their arguments as a JSON
    /// string and no content render as HF renders the same calls with argument objects.
    #[test]
    fn qwen_chat_requests_render_as_vllm_renders_them() {
        let Some(p) = crate::preprocess::tests::qwen() else { return };
        assert_eq!(p.chat_conventions(), TemplateConventions { think: true, tool_call: true });
        let user = json!([{"role": "user", "content": "Hi"}]);
        let render = |kwargs: serde_json::Value| {
            p.render_chat_request(&user, ChatExtras { tools: None, kwargs: Some(&kwargs) }).unwrap()
        };
        assert!(render(json!({"enable_thinking": false})).ends_with("<|im_start|>assistant\n<think>\n\n</think>\n\n"));
        assert!(render(json!({"enable_thinking": true})).ends_with("<|im_start|>assistant\n"));
        assert!(render(json!({"add_generation_prompt": false})).ends_with("<|im_start|>assistant\n"));

        let path =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/preprocess/qwen3_hf_renders.json");
        let fixture: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        let case = &fixture["cases"]["toolcall"];
        let mut messages = case["messages"].clone();
        for m in messages.as_array_mut().unwrap() {
            if let Some(calls) = m.get_mut("tool_calls") {
                let args = &mut calls[0]["function"]["arguments"];
                *args = serde_json::Value::String(args.to_string());
                m.as_object_mut().unwrap().remove("content");
            }
        }
        let out = p.render_chat_request(&messages, ChatExtras { tools: Some(&case["tools"]), kwargs: None }).unwrap();
        assert_eq!(out, fixture["out"]["toolcall"].as_str().unwrap());
    }
}
