//! Request types and their validation.

use std::borrow::Cow;

use serde::Deserialize;
use serde_json::Value;

use crate::contract::SamplingParams;

/// `max_tokens` when a chat request gives none: the simulated engine ends with eos well before.
pub const DEFAULT_CHAT_MAX_TOKENS: u32 = 1024;
/// `max_tokens` when a completions request gives none (OpenAI's documented default).
pub const DEFAULT_COMPLETION_MAX_TOKENS: u32 = 16;
/// Stop strings per request (OpenAI allows 4; engines commonly accept more).
const MAX_STOP_STRINGS: usize = 16;
/// The message roles OpenAI's chat API accepts. The chat template sees the role as given:
/// templates render the ones they know (Qwen3's: system, user, assistant, tool).
const CHAT_ROLES: [&str; 6] = ["system", "developer", "user", "assistant", "tool", "function"];

/// `stop`: one string or a list.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum StopSpec {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
}

/// `POST /v1/chat/completions` as sent.
#[derive(Debug, Deserialize)]
pub struct ChatCompletionRequest {
    pub model: String,
    pub messages: Value,
    #[serde(default)]
    pub tools: Option<Value>,
    /// `none`, `auto`, `required`, or `{"type": "function", "function": {"name": …}}`.
    #[serde(default)]
    pub tool_choice: Option<Value>,
    /// Extra variables for the chat template (vLLM's; e.g. Qwen3's `enable_thinking`).
    #[serde(default)]
    pub chat_template_kwargs: Option<Value>,
    #[serde(default)]
    pub max_tokens: Option<i64>,
    #[serde(default)]
    pub max_completion_tokens: Option<i64>,
    #[serde(flatten)]
    pub common: CommonParams,
}

/// What a chat request lets the model do with its tools.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum ToolChoice {
    /// No tools offered, or `tool_choice: "none"`: the answer is text.
    #[default]
    None,
    /// The model decides (the default when tools are offered).
    Auto,
    /// The model must call one or more tools.
    Required,
    /// The model must call this function.
    Function(String),
}

/// `prompt` of `POST /v1/completions`: text, or token ids (one prompt per request).
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Prompt {
    Text(String),
    Tokens(Vec<u32>),
    TextBatch(Vec<String>),
    TokenBatch(Vec<Vec<u32>>),
}

/// `POST /v1/completions` as sent.
#[derive(Debug, Deserialize)]
pub struct CompletionRequest {
    pub model: String,
    pub prompt: Prompt,
    #[serde(default)]
    pub max_tokens: Option<i64>,
    #[serde(flatten)]
    pub common: CommonParams,
}

/// Fields shared by both endpoints.
#[derive(Debug, Default, Deserialize)]
pub struct CommonParams {
    #[serde(default)]
    pub stream: bool,
    #[serde(default)]
    pub stream_options: Option<StreamOptions>,
    #[serde(default)]
    pub stop: Option<StopSpec>,
    #[serde(default)]
    pub temperature: Option<f64>,
    #[serde(default)]
    pub top_p: Option<f64>,
    #[serde(default)]
    pub seed: Option<i64>,
    #[serde(default)]
    pub ignore_eos: bool,
    #[serde(default)]
    pub n: Option<i64>,
    /// Admission order when every worker is busy (vLLM's and SGLang's field): lower is served
    /// first, ties in arrival order; default 0.
    #[serde(default)]
    pub priority: Option<i64>,
}

/// A client error in a request's fields: which field (OpenAI's `param`, such as `max_tokens` or
/// `messages[2].role`) and why.
#[derive(Debug, Clone, PartialEq)]
pub struct ValidationError {
    pub param: Option<Cow<'static, str>>,
    pub message: String,
}

fn bad(param: impl Into<Cow<'static, str>>, message: impl Into<String>) -> ValidationError {
    ValidationError { param: Some(param.into()), message: message.into() }
}

/// OpenAI's wording: `Invalid value: 'x'. Supported values are: 'a', 'b', and 'c'.`
fn unknown_role(i: usize, role: &str) -> ValidationError {
    let (last, rest) = CHAT_ROLES.split_last().expect("roles");
    let supported: Vec<String> = rest.iter().map(|r| format!("'{r}'")).collect();
    let message = format!("Invalid value: '{role}'. Supported values are: {}, and '{last}'.", supported.join(", "));
    bad(format!("messages[{i}].role"), message)
}

/// A request every field of which has been checked.
#[derive(Debug, Clone)]
pub struct Validated {
    pub model: String,
    pub stream: bool,
    pub include_usage: bool,
    pub stop: Vec<String>,
    pub sampling: SamplingParams,
    /// Chat requests: what the model may do with the request's tools.
    pub tool_choice: ToolChoice,
    /// Admission order while queued: lower first (vLLM's meaning), default 0.
    pub priority: i32,
}

fn validate_max_tokens(param: &'static str, v: Option<i64>, default: u32) -> Result<u32, ValidationError> {
    match v {
        None => Ok(default),
        Some(n) if n < 1 => Err(bad(param, format!("{param} must be at least 1, got {n}"))),
        Some(n) if n > u32::MAX as i64 => Err(bad(param, format!("{param} is too large: {n}"))),
        Some(n) => Ok(n as u32),
    }
}

impl CommonParams {
    fn validate(&self, model: &str, max_tokens: u32) -> Result<Validated, ValidationError> {
        if model.is_empty() {
            return Err(bad("model", "model must not be empty"));
        }
        if let Some(n) = self.n {
            if n != 1 {
                return Err(bad("n", format!("only n=1 is supported, got {n}")));
            }
        }
        let temperature = self.temperature.unwrap_or(1.0);
        if !(0.0..=2.0).contains(&temperature) {
            return Err(bad("temperature", format!("temperature must be in [0, 2], got {temperature}")));
        }
        let top_p = self.top_p.unwrap_or(1.0);
        if !(top_p > 0.0 && top_p <= 1.0) {
            return Err(bad("top_p", format!("top_p must be in (0, 1], got {top_p}")));
        }
        let stop = match &self.stop {
            None => Vec::new(),
            Some(StopSpec::One(s)) => vec![s.clone()],
            Some(StopSpec::Many(v)) => v.clone(),
        };
        let priority = match self.priority {
            None => 0,
            Some(p) => {
                i32::try_from(p).map_err(|_| bad("priority", format!("priority must fit in 32 bits, got {p}")))?
            }
        };
        if stop.len() > MAX_STOP_STRINGS {
            return Err(bad("stop", format!("at most {MAX_STOP_STRINGS} stop strings, got {}", stop.len())));
        }
        Ok(Validated {
            model: model.to_string(),
            stream: self.stream,
            include_usage: self.stream_options.as_ref().is_some_and(|o| o.include_usage),
            stop: stop.into_iter().filter(|s| !s.is_empty()).collect(),
            sampling: SamplingParams {
                max_tokens,
                temperature: temperature as f32,
                top_p: top_p as f32,
                seed: self.seed.map(|s| s as u64),
                ignore_eos: self.ignore_eos,
            },
            tool_choice: ToolChoice::None,
            priority,
        })
    }
}

impl ChatCompletionRequest {
    pub fn validate(&self) -> Result<Validated, ValidationError> {
        let Some(messages) = self.messages.as_array() else {
            return Err(bad("messages", "messages must be an array"));
        };
        if messages.is_empty() {
            return Err(bad("messages", "messages must not be empty"));
        }
        for (i, m) in messages.iter().enumerate() {
            match m.get("role").and_then(Value::as_str) {
                None => return Err(bad(format!("messages[{i}].role"), format!("messages[{i}] has no string `role`"))),
                Some(role) if !CHAT_ROLES.contains(&role) => return Err(unknown_role(i, role)),
                Some(_) => {}
            }
            match m.get("content") {
                None | Some(Value::Null) | Some(Value::String(_)) | Some(Value::Array(_)) => {}
                Some(_) => {
                    return Err(bad(
                        format!("messages[{i}].content"),
                        format!("messages[{i}].content must be a string or an array of parts"),
                    ))
                }
            }
        }
        let max = match self.max_completion_tokens {
            Some(_) => validate_max_tokens("max_completion_tokens", self.max_completion_tokens, 0)?,
            None => validate_max_tokens("max_tokens", self.max_tokens, DEFAULT_CHAT_MAX_TOKENS)?,
        };
        match &self.chat_template_kwargs {
            None | Some(Value::Null) | Some(Value::Object(_)) => {}
            Some(_) => return Err(bad("chat_template_kwargs", "chat_template_kwargs must be an object")),
        }
        let tool_choice = self.tool_choice()?;
        Ok(Validated { tool_choice, ..self.common.validate(&self.model, max)? })
    }

    /// The tools offered (`None` when absent, null or empty).
    pub fn offered_tools(&self) -> Option<&Value> {
        self.tools.as_ref().filter(|t| t.as_array().is_some_and(|a| !a.is_empty()))
    }

    /// Checks `tools` and `tool_choice` against each other, as OpenAI does.
    fn tool_choice(&self) -> Result<ToolChoice, ValidationError> {
        let names = match &self.tools {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::Array(tools)) => {
                let mut names = Vec::with_capacity(tools.len());
                for (i, t) in tools.iter().enumerate() {
                    let name = t.get("function").and_then(|f| f.get("name")).and_then(Value::as_str);
                    match (t.get("type").and_then(Value::as_str), name) {
                        (Some("function"), Some(n)) if !n.is_empty() => names.push(n),
                        _ => {
                            return Err(bad(
                                format!("tools[{i}]"),
                                format!("tools[{i}] must be {{\"type\": \"function\", \"function\": {{\"name\": …}}}}"),
                            ))
                        }
                    }
                }
                names
            }
            Some(_) => return Err(bad("tools", "tools must be an array")),
        };
        let choice = match &self.tool_choice {
            None | Some(Value::Null) => return Ok(if names.is_empty() { ToolChoice::None } else { ToolChoice::Auto }),
            Some(Value::String(s)) => match s.as_str() {
                "none" => ToolChoice::None,
                "auto" => ToolChoice::Auto,
                "required" => ToolChoice::Required,
                other => {
                    return Err(bad(
                        "tool_choice",
                        format!("Invalid value: '{other}'. Supported values are: 'none', 'auto', and 'required'."),
                    ))
                }
            },
            Some(v) => match v.get("function").and_then(|f| f.get("name")).and_then(Value::as_str) {
                Some(name) if v.get("type").and_then(Value::as_str) == Some("function") => {
                    if !names.contains(&name) {
                        return Err(bad("tool_choice", format!("tool_choice names '{name}', which is not among tools")));
                    }
                    ToolChoice::Function(name.to_string())
                }
                _ => {
                    return Err(bad(
                        "tool_choice",
                        "tool_choice must be 'none', 'auto', 'required' or {\"type\": \"function\", \"function\": {\"name\": …}}",
                    ))
                }
            },
        };
        match choice {
            ToolChoice::Required if names.is_empty() => {
                Err(bad("tool_choice", "'tool_choice' is only allowed when 'tools' are specified"))
            }
            ToolChoice::Auto if names.is_empty() => Ok(ToolChoice::None),
            c => Ok(c),
        }
    }
}

impl CompletionRequest {
    pub fn validate(&self) -> Result<Validated, ValidationError> {
        match &self.prompt {
            Prompt::TextBatch(v) if v.len() != 1 => {
                return Err(bad("prompt", "only one prompt per request is supported"));
            }
            Prompt::TokenBatch(v) if v.len() != 1 => {
                return Err(bad("prompt", "only one prompt per request is supported"));
            }
            _ => {}
        }
        if self.prompt_is_empty() {
            return Err(bad("prompt", "prompt must not be empty"));
        }
        let max = validate_max_tokens("max_tokens", self.max_tokens, DEFAULT_COMPLETION_MAX_TOKENS)?;
        self.common.validate(&self.model, max)
    }

    fn prompt_is_empty(&self) -> bool {
        match &self.prompt {
            Prompt::Text(s) => s.is_empty(),
            Prompt::Tokens(t) => t.is_empty(),
            Prompt::TextBatch(v) => v.iter().all(|s| s.is_empty()),
            Prompt::TokenBatch(v) => v.iter().all(|t| t.is_empty()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chat(json: &str) -> Result<Validated, ValidationError> {
        serde_json::from_str::<ChatCompletionRequest>(json).unwrap().validate()
    }

    #[test]
    fn chat_defaults_and_ranges() {
        let v = chat(r#"{"model":"m","messages":[{"role":"user","content":"hi"}]}"#).unwrap();
        assert_eq!(v.sampling.max_tokens, DEFAULT_CHAT_MAX_TOKENS);
        assert!(!v.stream);
        let e = chat(r#"{"model":"m","messages":[{"role":"user","content":"hi"}],"max_tokens":-1}"#).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("max_tokens"));
        let e = chat(r#"{"model":"m","messages":[]}"#).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("messages"));
        let e = chat(r#"{"model":"m","messages":[{"content":"x"}]}"#).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("messages[0].role"));
        let v = chat(r#"{"model":"m","messages":[{"role":"user","content":"hi"}],"max_completion_tokens":5,"stop":"x","stream":true,"stream_options":{"include_usage":true}}"#).unwrap();
        assert_eq!(v.sampling.max_tokens, 5);
        assert_eq!(v.stop, vec!["x"]);
        assert!(v.include_usage);
    }

    #[test]
    fn chat_roles_are_openai_s() {
        let with_role = |role: &str| {
            chat(&format!(
                r#"{{"model":"m","messages":[{{"role":"user","content":"hi"}},{{"role":"{role}","content":"x"}}]}}"#
            ))
        };
        for role in ["system", "developer", "user", "assistant", "tool", "function"] {
            assert!(with_role(role).is_ok(), "{role}");
        }
        for role in ["wizard", "User", ""] {
            let e = with_role(role).unwrap_err();
            assert_eq!(e.param.as_deref(), Some("messages[1].role"), "{role}");
            assert!(e.message.contains(&format!("'{role}'")) && e.message.contains("'developer'"), "{}", e.message);
        }
    }

    #[test]
    fn tools_and_tool_choice() {
        let base = r#""model":"m","messages":[{"role":"user","content":"hi"}]"#;
        let tools = r#""tools":[{"type":"function","function":{"name":"get_weather","parameters":{}}}]"#;
        let choice = |extra: &str| chat(&format!("{{{base},{extra}}}")).map(|v| v.tool_choice);
        assert_eq!(choice(r#""n":1"#), Ok(ToolChoice::None));
        assert_eq!(choice(tools), Ok(ToolChoice::Auto));
        assert_eq!(choice(&format!(r#"{tools},"tool_choice":"none""#)), Ok(ToolChoice::None));
        assert_eq!(choice(&format!(r#"{tools},"tool_choice":"required""#)), Ok(ToolChoice::Required));
        let named = r#""tool_choice":{"type":"function","function":{"name":"get_weather"}}"#;
        assert_eq!(choice(&format!("{tools},{named}")), Ok(ToolChoice::Function("get_weather".into())));
        assert_eq!(choice(r#""tools":[],"tool_choice":"auto""#), Ok(ToolChoice::None));
        for bad in [
            r#""tool_choice":"required""#.to_string(),
            named.to_string(),
            format!(r#"{tools},"tool_choice":"always""#),
            format!(r#"{tools},"tool_choice":{{"type":"function","function":{{"name":"other"}}}}"#),
            r#""tools":[{"type":"function"}]"#.to_string(),
            r#""tools":{}"#.to_string(),
        ] {
            let e = choice(&bad).unwrap_err();
            assert!(e.param.as_deref().unwrap().starts_with("tool"), "{bad}: {e:?}");
        }
        let e = chat(&format!(r#"{{{base},"chat_template_kwargs":[1]}}"#)).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("chat_template_kwargs"));
        assert!(chat(&format!(r#"{{{base},"chat_template_kwargs":{{"enable_thinking":false}}}}"#)).is_ok());
    }

    #[test]
    fn completion_prompts() {
        let ok = |j: &str| serde_json::from_str::<CompletionRequest>(j).unwrap().validate();
        assert!(ok(r#"{"model":"m","prompt":"hi"}"#).is_ok());
        assert!(ok(r#"{"model":"m","prompt":[1,2,3]}"#).is_ok());
        assert!(ok(r#"{"model":"m","prompt":[[1,2,3]]}"#).is_ok());
        assert!(ok(r#"{"model":"m","prompt":["a","b"]}"#).is_err());
        assert!(ok(r#"{"model":"m","prompt":""}"#).is_err());
    }
}
