//! Reasoning and tool-call parsers (`kvgate::openai::parse`) over scripted model outputs, cut
//! at every position: every split of each script into 2 and 3 deltas must give the same
//! message as the whole text, and (for well-formed scripts) no marker may reach reasoning or
//! content, and the streamed arguments of each call must be its final arguments. Then over
//! HTTP, with an engine whose output is scripted: raw SSE from the byte-level built-in model
//! (every marker split over several tokens), and the official OpenAI Python client against
//! Qwen3 (tests/python/tool_calls.py).

mod common;

use std::sync::Arc;

use kvgate::contract::{DisaggStyle, EngineKind, FinishReason, WorkerOutput};
use kvgate::openai::parse::{
    forced_prefill, Message, OutputParser, ParseEvent, ParserSpec, PromptEnd, ReasoningKind, ToolCallKind,
};
use kvgate::openai::ToolChoice;
use kvgate::preprocess::{ModelSource, Preprocessor};
use kvgate::worker::{Engine, EngineCard, EngineIo};
use serde_json::{json, Value};

const MARKERS: [&str; 4] = ["<think>", "</think>", "<tool_call>", "</tool_call>"];

fn spec(reasoning: Option<ReasoningKind>, tool_call: Option<ToolCallKind>) -> ParserSpec {
    ParserSpec { reasoning, tool_call, prompt_end: PromptEnd::Other, prefill: String::new(), id_seed: 7 }
}

/// Runs `pieces` through a parser: the events as streamed, and the whole message.
fn run(spec: &ParserSpec, pieces: &[&str]) -> (Vec<ParseEvent>, Message) {
    let mut p = OutputParser::new(spec.clone()).expect("a parser");
    let mut events = Vec::new();
    for piece in pieces {
        p.push(piece, 1, &mut events);
    }
    p.finish(&mut events);
    let mut m = Message::default();
    for e in events.iter().cloned() {
        m.apply(e);
    }
    (events, m)
}

/// Char boundaries of `s`, ends excluded.
fn cuts(s: &str) -> Vec<usize> {
    (1..s.len()).filter(|&i| s.is_char_boundary(i)).collect()
}

/// Checks the streamed events of one run of a well-formed script.
fn check_stream(events: &[ParseEvent], whole: &Message, text: &str) {
    for e in events {
        if let ParseEvent::Reasoning(t) | ParseEvent::Content(t) = e {
            for m in MARKERS {
                assert!(!t.contains(m), "{m} leaked into {e:?} (script {text:?})");
            }
            assert!(!t.is_empty(), "an empty piece: {e:?}");
        }
        assert!(!matches!(e, ParseEvent::ToolCallInvalid { .. }), "{e:?} in a well-formed script {text:?}");
    }
    for (i, call) in whole.tool_calls.iter().enumerate() {
        let streamed: String = events
            .iter()
            .filter_map(|e| match e {
                ParseEvent::ToolCallArgs { index, delta } if *index == i as u32 => Some(delta.as_str()),
                _ => None,
            })
            .collect();
        assert_eq!(streamed, call.arguments, "call {i} of {text:?}");
    }
}

/// The property: every 2- and 3-split gives the whole text's message.
fn every_split(spec: &ParserSpec, text: &str, well_formed: bool) -> Message {
    let (events, whole) = run(spec, &[text]);
    if well_formed {
        check_stream(&events, &whole, text);
    }
    let cuts = cuts(text);
    for (n, &a) in cuts.iter().enumerate() {
        let (events, m) = run(spec, &[&text[..a], &text[a..]]);
        assert_eq!(m, whole, "split at {a} of {text:?}");
        if well_formed {
            check_stream(&events, &whole, text);
        }
        for &b in &cuts[n + 1..] {
            let (events, m) = run(spec, &[&text[..a], &text[a..b], &text[b..]]);
            assert_eq!(m, whole, "split at {a}, {b} of {text:?}");
            if well_formed {
                check_stream(&events, &whole, text);
            }
        }
    }
    // One char at a time, as a byte-level tokenizer would stream it.
    let chars: Vec<String> = text.chars().map(String::from).collect();
    let pieces: Vec<&str> = chars.iter().map(String::as_str).collect();
    assert_eq!(run(spec, &pieces).1, whole, "char by char: {text:?}");
    whole
}

fn args(m: &Message, i: usize) -> Value {
    serde_json::from_str(&m.tool_calls[i].arguments).expect("arguments are JSON")
}

const QWEN: (Option<ReasoningKind>, Option<ToolCallKind>) = (Some(ReasoningKind::Qwen3), Some(ToolCallKind::Hermes));

#[test]
fn qwen3_reasoning_then_answer() {
    let s = spec(QWEN.0, QWEN.1);
    let m = every_split(&s, "<think>\nThe user asks for a prime.\n\n7 is one.\n</think>\n\nSeven is prime.", true);
    assert_eq!(m.reasoning, "The user asks for a prime.\n\n7 is one.");
    assert_eq!(m.content, "Seven is prime.");
    assert!(m.tool_calls.is_empty());
    assert_eq!(m.finish_reason("stop"), "stop");
}

#[test]
fn qwen3_reasoning_then_a_tool_call() {
    let s = spec(QWEN.0, QWEN.1);
    let text = "<think>\nI need the weather.\n</think>\n\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\", \"unit\": \"celsius\"}}\n</tool_call>";
    let m = every_split(&s, text, true);
    assert_eq!(m.reasoning, "I need the weather.");
    assert_eq!(m.content, "");
    assert_eq!(m.tool_calls.len(), 1);
    assert_eq!(m.tool_calls[0].name, "get_weather");
    assert_eq!(args(&m, 0), json!({"city": "Paris", "unit": "celsius"}));
    assert!(m.tool_calls[0].id.starts_with("call_") && m.tool_calls[0].id.len() == 29, "{}", m.tool_calls[0].id);
    assert_eq!(m.finish_reason("stop"), "tool_calls");
    assert_eq!(m.finish_reason("length"), "length");
}

#[test]
fn several_calls_with_nested_json_and_unicode() {
    let s = spec(QWEN.0, QWEN.1);
    let text = "Checking both.\n\n<tool_call>\n{\"name\": \"search\", \"arguments\": {\"q\": \"東京 🌧 \\\"rain\\\" </tool_call>\", \"filters\": [{\"k\": [1, 2.5e3, -4]}, {\"ok\": true, \"none\": null}]}}\n</tool_call>\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Zürich\"}}\n</tool_call>";
    let m = every_split(&s, text, true);
    assert_eq!(m.content, "Checking both.");
    assert_eq!(m.tool_calls.iter().map(|c| c.name.as_str()).collect::<Vec<_>>(), ["search", "get_weather"]);
    assert_eq!(
        args(&m, 0),
        json!({"q": "東京 🌧 \"rain\" </tool_call>", "filters": [{"k": [1, 2.5e3, -4]}, {"ok": true, "none": null}]})
    );
    assert_eq!(args(&m, 1), json!({"city": "Zürich"}));
    assert_ne!(m.tool_calls[0].id, m.tool_calls[1].id);
}

#[test]
fn unterminated_think_block_is_all_reasoning() {
    let s = spec(QWEN.0, QWEN.1);
    let m = every_split(&s, "<think>\nStill weighing the options\n", true);
    assert_eq!((m.reasoning.as_str(), m.content.as_str()), ("Still weighing the options", ""));
    // Tool calls are only read in the answer; a cut-off closing marker is reasoning.
    let m = every_split(&s, "<think>\nStill weighing <tool_call> options and </thi", false);
    assert_eq!(m.reasoning, "Still weighing <tool_call> options and </thi");
    assert_eq!((m.content.as_str(), m.tool_calls.len()), ("", 0));
}

#[test]
fn answers_without_markers_pass_through() {
    let s = spec(QWEN.0, QWEN.1);
    for text in ["Use a < b, <toolbox> and <thinking> here.\n", "  leading spaces kept", "ends with a partial <tool_"] {
        let m = every_split(&s, text, true);
        assert_eq!((m.content.as_str(), m.reasoning.as_str()), (text, ""));
    }
}

#[test]
fn malformed_calls_come_back_as_content() {
    let s = spec(QWEN.0, QWEN.1);
    for text in [
        "<tool_call>\nnot json at all\n</tool_call>",
        "Hm. <tool_call>\n{\"name\": \"f\", \"arguments\": {'city': 'Paris'}}\n</tool_call>",
        "<tool_call>\n{\"name\": \"f\", \"arguments\": {\"x\": 1,}}\n</tool_call> after",
        "<tool_call>\n{\"name\": \"f\", \"arguments\": {\"x\": \"cut off",
        "<tool_call>\n{\"name\": \"f\", \"argu",
        "<tool_call>\n[1, 2]\n</tool_call>",
    ] {
        let m = every_split(&s, text, false);
        assert!(m.tool_calls.is_empty(), "{text:?}: {m:?}");
        assert_eq!(m.content, text, "{text:?}");
    }
    // A broken call does not take its well-formed neighbours with it.
    let text = "<tool_call>\n{\"name\": \"a\", \"arguments\": {oops}}\n</tool_call>\n<tool_call>\n{\"name\": \"b\", \"arguments\": {}}\n</tool_call>";
    let m = every_split(&s, text, false);
    assert_eq!(m.tool_calls.len(), 1);
    assert_eq!((m.tool_calls[0].name.as_str(), m.tool_calls[0].arguments.as_str()), ("b", "{}"));
    assert_eq!(m.content, "<tool_call>\n{\"name\": \"a\", \"arguments\": {oops}}\n</tool_call>");
}

#[test]
fn other_key_orders_and_tolerated_slips() {
    let s = spec(None, Some(ToolCallKind::Hermes));
    let m = every_split(&s, "<tool_call>\n{\"arguments\": {\"q\": 1}, \"name\": \"search\"}\n</tool_call>", true);
    assert_eq!((m.tool_calls[0].name.as_str(), args(&m, 0)), ("search", json!({"q": 1})));
    // The closing brace or the closing marker missing: the call stands.
    let m = every_split(&s, "<tool_call>\n{\"name\": \"f\", \"arguments\": {\"q\": 1}\n</tool_call>", true);
    assert_eq!(args(&m, 0), json!({"q": 1}));
    let m = every_split(&s, "<tool_call>\n{\"name\": \"f\", \"arguments\": {\"q\": 1}}", true);
    assert_eq!((args(&m, 0), m.content.as_str()), (json!({"q": 1}), ""));
}

#[test]
fn no_reasoning_parser_means_think_is_content_and_vice_versa() {
    let text = "<think>\nx\n</think>\n\nHi <tool_call>";
    let m = every_split(&spec(None, Some(ToolCallKind::Hermes)), "<think>\nx\n</think>\n\nHi", false);
    assert_eq!(m.content, "<think>\nx\n</think>\n\nHi");
    let m = every_split(&spec(Some(ReasoningKind::Qwen3), None), text, false);
    assert_eq!((m.reasoning.as_str(), m.content.as_str()), ("x", "Hi <tool_call>"));
}

#[test]
fn deepseek_r1_reasons_from_the_first_token() {
    let s = spec(Some(ReasoningKind::DeepseekR1), None);
    let m = every_split(&s, "Let me see.\n</think>\n\nAnswer.", true);
    assert_eq!((m.reasoning.as_str(), m.content.as_str()), ("Let me see.", "Answer."));
    let m = every_split(&s, "<think>\nLet me see.\n</think>\n\nAnswer.", true);
    assert_eq!((m.reasoning.as_str(), m.content.as_str()), ("Let me see.", "Answer."));
}

#[test]
fn prompts_that_open_or_close_the_think_block() {
    // A template that opens the block in the prompt: Qwen3 reasons from the first token.
    let s = ParserSpec { prompt_end: PromptEnd::InThink, ..spec(QWEN.0, QWEN.1) };
    let m = every_split(&s, "plan\n</think>\n\nDone.", true);
    assert_eq!((m.reasoning.as_str(), m.content.as_str()), ("plan", "Done."));
    // `enable_thinking: false`: the prompt closed an empty block; the answer is content.
    let s = ParserSpec { prompt_end: PromptEnd::AfterThink, ..spec(QWEN.0, QWEN.1) };
    let m = every_split(&s, "Done.", true);
    assert_eq!((m.reasoning.as_str(), m.content.as_str()), ("", "Done."));
}

#[test]
fn llama3_json_calls() {
    let s = spec(None, Some(ToolCallKind::Llama3Json));
    let text =
        "{\"name\": \"get_weather\", \"parameters\": {\"city\": \"Oslo\"}}; {\"name\": \"now\", \"parameters\": {}}";
    let m = every_split(&s, text, true);
    assert_eq!(m.tool_calls.iter().map(|c| c.name.as_str()).collect::<Vec<_>>(), ["get_weather", "now"]);
    assert_eq!((args(&m, 0), args(&m, 1)), (json!({"city": "Oslo"}), json!({})));
    let m = every_split(&s, "The weather is {unknown}.", true);
    assert_eq!((m.content.as_str(), m.tool_calls.len()), ("The weather is {unknown}.", 0));
}

#[test]
fn forced_calls_continue_the_prefill() {
    let named = ToolChoice::Function("get_weather".into());
    let prefill = forced_prefill(ToolCallKind::Hermes, &named, true, PromptEnd::Other);
    let s = ParserSpec { prefill, ..spec(QWEN.0, QWEN.1) };
    let m = every_split(&s, "{\"city\": \"Paris\"}}\n</tool_call>", true);
    assert_eq!((m.tool_calls[0].name.as_str(), args(&m, 0)), ("get_weather", json!({"city": "Paris"})));
    assert_eq!((m.reasoning.as_str(), m.content.as_str()), ("", ""));

    let prefill = forced_prefill(ToolCallKind::Hermes, &ToolChoice::Required, true, PromptEnd::Other);
    let s = ParserSpec { prefill, ..spec(QWEN.0, QWEN.1) };
    let m = every_split(&s, "{\"name\": \"now\", \"arguments\": {}}\n</tool_call>", true);
    assert_eq!((m.tool_calls[0].name.as_str(), m.tool_calls[0].arguments.as_str()), ("now", "{}"));
}

/// Tokens inside the think block, markers included, are the reasoning tokens, however the
/// text is cut.
#[test]
fn reasoning_tokens_are_counted_per_token() {
    let s = spec(QWEN.0, QWEN.1);
    let tokens = ["<think>", "\n", "Two", " steps", ".\n", "</think>", "\n\n", "Hi", "."];
    let mut p = OutputParser::new(s.clone()).unwrap();
    let mut out = Vec::new();
    for t in tokens {
        p.push(t, 1, &mut out);
    }
    p.finish(&mut out);
    assert_eq!(p.reasoning_tokens(), 6);
    let mut p = OutputParser::new(s).unwrap();
    p.push("<think>\nTwo", 3, &mut out);
    p.push(" steps.\n</think>\n\nHi", 4, &mut out);
    p.push(".", 1, &mut out);
    p.finish(&mut out);
    assert_eq!(p.reasoning_tokens(), 7, "a step that closes the block counts whole");
}

// ---------------------------------------------------------------------------------------------
// Over HTTP: `kvgate serve` with an engine whose output is scripted.

/// An engine that answers with the text between the last `[[reply]]` and `[[/reply]]` of its
/// prompt (or "ok"), one token per message, as far as `max_tokens` allows.
struct ScriptedEngine {
    preprocessor: Arc<Preprocessor>,
}

/// The scripted reply in a prompt.
fn script(prompt: &str) -> &str {
    const OPEN: &str = "[[reply]]";
    match prompt.rfind(OPEN) {
        Some(i) => {
            let rest = &prompt[i + OPEN.len()..];
            &rest[..rest.find("[[/reply]]").unwrap_or(rest.len())]
        }
        None => "ok",
    }
}

impl Engine for ScriptedEngine {
    fn card(&self) -> EngineCard {
        EngineCard {
            kind: EngineKind::Mocker,
            kv_capacity_blocks: 1 << 16,
            max_num_seqs: 64,
            max_num_batched_tokens: 1 << 16,
            disagg: DisaggStyle::Push,
            bootstrap: None,
            kv_events: true,
        }
    }

    async fn run(self, mut io: EngineIo) {
        {
            loop {
                let item = tokio::select! {
                    item = io.intake.recv() => match item { Some(item) => item, None => break },
                    Some(reply) = io.resets.recv() => {
                        io.events.ack(reply).await;
                        continue;
                    }
                };
                let pre = self.preprocessor.clone();
                tokio::spawn(async move {
                    let prompt = pre.decode(&item.request.token_ids, false).expect("the prompt decodes");
                    let ids = pre.encode(script(&prompt), false).expect("the reply encodes");
                    let n = ids.len().min(item.request.sampling.max_tokens as usize);
                    let reason = if n == ids.len() { FinishReason::Eos } else { FinishReason::Length };
                    let started = WorkerOutput::Started { cached_tokens: 0, computed_tokens: 0 };
                    let outputs = std::iter::once(started)
                        .chain(ids[..n].iter().map(|&id| WorkerOutput::Tokens(vec![id])))
                        .chain(std::iter::once(WorkerOutput::Finished { reason }));
                    for o in outputs {
                        if item.reply.send(o).await.is_err() {
                            break;
                        }
                    }
                });
            }
        }
    }
}

/// `kvgate serve` (one scripted worker) with `args`.
fn scripted_server(args: &[&str], preprocessor: Arc<Preprocessor>) -> kvgate::serve::Server {
    let mut all = vec!["--workers", "1"];
    all.extend_from_slice(args);
    kvgate::serve::start_with(&common::serve_args(&all), move |_: &kvgate::serve::WorkerSlot<'_>| {
        Ok(ScriptedEngine { preprocessor: preprocessor.clone() })
    })
    .expect("server starts")
}

const BYTE_SCRIPT: &str = "<think>\nIt asks for Paris.\n</think>\n\nChecking.\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\", \"days\": [1, 2]}}\n</tool_call>";

fn weather_request(reply: &str, extra: Value) -> Value {
    let mut body = json!({
        "model": "kvgate-mock",
        "messages": [{"role": "user", "content": format!("Weather? [[reply]]{reply}[[/reply]]")}],
        "tools": [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}],
    });
    for (k, v) in extra.as_object().unwrap() {
        body[k] = v.clone();
    }
    body
}

/// The built-in byte-level model streams one byte per token: every marker is split over many
/// tokens, and none reaches the client's content or reasoning.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn markers_split_over_byte_tokens_never_reach_the_client() {
    let s = scripted_server(
        &["--reasoning-parser", "qwen3", "--tool-call-parser", "hermes"],
        Arc::new(Preprocessor::builtin()),
    );
    let url = format!("{}/v1/chat/completions", common::base_url(&s));
    let c = reqwest::Client::new();
    let body = weather_request(BYTE_SCRIPT, json!({"stream": true, "stream_options": {"include_usage": true}}));
    let r = c.post(&url).json(&body).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let text = r.text().await.unwrap();
    let (mut reasoning, mut content, mut args, mut finish, mut usage) =
        (String::new(), String::new(), String::new(), None, None);
    let mut starts = Vec::new();
    for e in common::sse_events(&text) {
        if e == "[DONE]" {
            continue;
        }
        let v: Value = serde_json::from_str(&e).unwrap();
        if !v["usage"].is_null() {
            usage = Some(v["usage"].clone());
        }
        let Some(choice) = v["choices"].get(0) else { continue };
        let d = &choice["delta"];
        for (field, acc) in [("reasoning_content", &mut reasoning), ("content", &mut content)] {
            if let Some(t) = d[field].as_str() {
                assert!(!MARKERS.iter().any(|m| t.contains(m)), "a marker in {field}: {t:?}");
                acc.push_str(t);
            }
        }
        for tc in d["tool_calls"].as_array().into_iter().flatten() {
            assert_eq!(tc["index"], 0);
            if tc.get("id").is_some() {
                assert_eq!(
                    (tc["type"].as_str(), tc["function"]["name"].as_str()),
                    (Some("function"), Some("get_weather"))
                );
                assert!(tc["id"].as_str().unwrap().starts_with("call_"));
                starts.push(tc["id"].clone());
            }
            args.push_str(tc["function"]["arguments"].as_str().unwrap());
        }
        if let Some(f) = choice["finish_reason"].as_str() {
            finish = Some(f.to_string());
        }
    }
    assert_eq!((reasoning.as_str(), content.as_str()), ("It asks for Paris.", "Checking."));
    assert_eq!(starts.len(), 1, "one start per call");
    assert_eq!(serde_json::from_str::<Value>(&args).unwrap(), json!({"city": "Paris", "days": [1, 2]}));
    assert_eq!(finish.as_deref(), Some("tool_calls"));
    let usage = usage.expect("usage chunk");
    assert_eq!(usage["completion_tokens"], BYTE_SCRIPT.len());
    let think_tokens = BYTE_SCRIPT.find("</think>").unwrap() + "</think>".len();
    assert_eq!(usage["completion_tokens_details"]["reasoning_tokens"], think_tokens);

    // The same, not streamed.
    let r = c.post(&url).json(&weather_request(BYTE_SCRIPT, json!({}))).send().await.unwrap();
    let v: Value = r.json().await.unwrap();
    let m = &v["choices"][0]["message"];
    assert_eq!(
        (m["reasoning_content"].as_str(), m["content"].as_str()),
        (Some("It asks for Paris."), Some("Checking."))
    );
    assert_eq!(m["tool_calls"][0]["function"]["name"], "get_weather");
    let args: Value = serde_json::from_str(m["tool_calls"][0]["function"]["arguments"].as_str().unwrap()).unwrap();
    assert_eq!(args, json!({"city": "Paris", "days": [1, 2]}));
    assert_eq!(v["choices"][0]["finish_reason"], "tool_calls");
    assert_eq!(v["usage"]["completion_tokens_details"]["reasoning_tokens"], think_tokens);
}

/// Stop strings apply to the model's text as written, `max_tokens` cuts it where it is (in
/// the think block, or in a call, which then comes back as content): no error either way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_strings_and_max_tokens_keep_their_meaning() {
    let s = scripted_server(
        &["--reasoning-parser", "qwen3", "--tool-call-parser", "hermes"],
        Arc::new(Preprocessor::builtin()),
    );
    let url = format!("{}/v1/chat/completions", common::base_url(&s));
    let c = reqwest::Client::new();
    let post = |body: Value| {
        let c = c.clone();
        let url = url.clone();
        async move {
            let r = c.post(&url).json(&body).send().await.unwrap();
            assert_eq!(r.status(), 200);
            r.json::<Value>().await.unwrap()
        }
    };
    let script = "<think>\nplan\n</think>\n\nIt is sunny in Paris today.";
    let v = post(weather_request(script, json!({"stop": ["Paris"]}))).await;
    let m = &v["choices"][0]["message"];
    assert_eq!((m["reasoning_content"].as_str(), m["content"].as_str()), (Some("plan"), Some("It is sunny in ")));
    assert_eq!(v["choices"][0]["finish_reason"], "stop");

    let v = post(weather_request(script, json!({"max_tokens": 10}))).await;
    let m = &v["choices"][0]["message"];
    assert_eq!((m["reasoning_content"].as_str(), m["content"].as_str()), (Some("pl"), Some("")));
    assert_eq!(v["choices"][0]["finish_reason"], "length");
    assert_eq!(v["usage"]["completion_tokens"], 10);
    assert_eq!(v["usage"]["completion_tokens_details"]["reasoning_tokens"], 10);

    let cut = BYTE_SCRIPT.find("\"days\"").unwrap();
    let v = post(weather_request(BYTE_SCRIPT, json!({"max_tokens": cut}))).await;
    let m = &v["choices"][0]["message"];
    assert!(m.get("tool_calls").is_none(), "{v}");
    assert_eq!(m["content"].as_str().unwrap(), &BYTE_SCRIPT[BYTE_SCRIPT.find("Checking").unwrap()..cut]);
    assert_eq!(v["choices"][0]["finish_reason"], "length");
}

/// The official OpenAI client against Qwen3 (parsers chosen from its chat template), with the
/// scripted engine: tool calls streamed and not, the follow-up turn, tool_choice, kwargs.
#[test]
fn official_openai_client_gets_reasoning_and_tool_calls() {
    let py = common::openai_venv_python();
    let dir = common::qwen_dir();
    let pre = Arc::new(Preprocessor::load(&ModelSource::Dir(dir.clone())).expect("qwen3 loads"));
    let s = scripted_server(&["--model-path", dir.to_str().unwrap(), "--served-model-name", "Qwen/Qwen3-0.6B"], pre);
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/python/tool_calls.py");
    let out = std::process::Command::new(py)
        .arg(script)
        .arg(format!("{}/v1", common::base_url(&s)))
        .arg("Qwen/Qwen3-0.6B")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "python client failed\nstdout:\n{stdout}\nstderr:\n{stderr}");
    assert!(stdout.trim_end().ends_with("ok"), "{stdout}");
}
