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

use minijinja::value::{Kwargs, ValueKind};
use minijinja::{context, Environment, Error, ErrorKind, Value};

use super::error::PreprocessError;

const DEFAULT: &str = "default";
const TOOL_USE: &str = "tool_use";

/// The model's chat template(s), compiled.
pub struct ChatTemplate {
    env: Environment<'static>,
    has_tool_use: bool,
    bos_token: Option<String>,
    eos_token: Option<String>,
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
        env.add_template_owned(DEFAULT, default).map_err(bad)?;
        let has_tool_use = tool_use.is_some();
        if let Some(t) = tool_use {
            env.add_template_owned(TOOL_USE, t).map_err(bad)?;
        }
        Ok(ChatTemplate { env, has_tool_use, bos_token, eos_token })
    }

    /// Renders `messages` (the OpenAI array; array contents flattened to text) with `tools`.
    pub fn render(
        &self,
        messages: &serde_json::Value,
        tools: Option<&serde_json::Value>,
        add_generation_prompt: bool,
    ) -> Result<String, PreprocessError> {
        let messages = flatten_messages(messages)?;
        let name = if tools.is_some() && self.has_tool_use { TOOL_USE } else { DEFAULT };
        let template = self.env.get_template(name).map_err(PreprocessError::render)?;
        let ctx = context! {
            messages => Value::from_serialize(&*messages),
            tools => tools.map(Value::from_serialize),
            add_generation_prompt => add_generation_prompt,
            bos_token => self.bos_token.as_deref().unwrap_or(""),
            eos_token => self.eos_token.as_deref().unwrap_or(""),
        };
        template.render(ctx).map_err(PreprocessError::render)
    }
}

/// Turns each message's `content` into a string: an array of `{type:"text", text}` parts is
/// joined with "\n" (as vLLM does), `null` becomes "". Borrows when nothing needs changing.
fn flatten_messages(messages: &serde_json::Value) -> Result<Cow<'_, serde_json::Value>, PreprocessError> {
    use serde_json::Value as J;
    let list =
        messages.as_array().ok_or_else(|| PreprocessError::InvalidMessages("`messages` must be an array".into()))?;
    let needs_fix = |m: &J| !matches!(m.get("content"), None | Some(J::String(_)));
    if !list.iter().any(needs_fix) {
        return Ok(Cow::Borrowed(messages));
    }
    let mut owned = list.clone();
    for (i, m) in owned.iter_mut().enumerate() {
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
}
