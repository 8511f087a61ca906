//! Reasoning and tool-call parsers (`kvgate::openai::parse`) over scripted model outputs, cut
//! at every position: every split of each script into 2 and 3 deltas must give the same
//! message as the whole text, and (for well-formed scripts) no marker may reach reasoning or
//! content, and the streamed arguments of each call must be its final arguments.

use kvgate::openai::parse::{
    forced_prefill, Message, OutputParser, ParseEvent, ParserSpec, PromptEnd, ReasoningKind, ToolCallKind,
};
use kvgate::openai::ToolChoice;
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
