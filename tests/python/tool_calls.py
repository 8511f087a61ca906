"""Reasoning and tool calls through the official OpenAI Python client, unchanged.

Usage: python tool_calls.py BASE_URL MODEL

The server's engine is scripted (tests/parsers.rs): it answers with the text between the last
[[reply]] and [[/reply]] of its prompt, token by token, so each case below says what the model
"writes" and checks what the client gets. The model is Qwen3 (its chat template renders tools,
tool calls, tool results and enable_thinking); the parsers are the ones kvgate picks for it.
"""
import json
import sys

from openai import OpenAI

base, model = sys.argv[1], sys.argv[2]
client = OpenAI(base_url=base, api_key="unused")

TOOLS = [{
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The current weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
            "required": ["city"],
        },
    },
}]
THINK = "<think>\nThe user wants the weather in Paris; I should call get_weather.\n</think>\n\n"
CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}\n</tool_call>'
MARKERS = ("<think>", "</think>", "<tool_call>", "</tool_call>")


def ask(reply, text="What is the weather in Paris?"):
    return [{"role": "user", "content": f"{text} [[reply]]{reply}[[/reply]]"}]


def reasoning_of(message):
    return (message.model_extra or {}).get("reasoning_content")


# Non-streaming: reasoning apart, the call as tool_calls with JSON arguments.
r = client.chat.completions.create(model=model, messages=ask(THINK + CALL), tools=TOOLS)
choice = r.choices[0]
assert choice.finish_reason == "tool_calls", choice
msg = choice.message
assert msg.content is None, msg
assert reasoning_of(msg) == "The user wants the weather in Paris; I should call get_weather.", msg
assert len(msg.tool_calls) == 1, msg
call = msg.tool_calls[0]
assert call.type == "function" and call.id.startswith("call_"), call
assert call.function.name == "get_weather", call
assert json.loads(call.function.arguments) == {"city": "Paris", "unit": "celsius"}, call
assert r.usage.completion_tokens_details.reasoning_tokens > 0, r.usage
assert r.usage.completion_tokens_details.reasoning_tokens < r.usage.completion_tokens, r.usage
print("non-streaming tool call:", call.id, call.function.arguments, r.usage)

# Streaming: reasoning deltas, then tool-call deltas with index (id, type, name first).
stream = client.chat.completions.create(
    model=model, messages=ask(THINK + CALL), tools=TOOLS, stream=True, stream_options={"include_usage": True}
)
reasoning, content, calls, finish, usage = [], [], {}, None, None
for chunk in stream:
    if chunk.usage is not None:
        usage = chunk.usage
    for c in chunk.choices:
        d = c.delta
        if (d.model_extra or {}).get("reasoning_content"):
            assert not calls, "reasoning after a tool call"
            reasoning.append(d.model_extra["reasoning_content"])
        if d.content:
            content.append(d.content)
        for tc in d.tool_calls or []:
            entry = calls.setdefault(tc.index, {"id": None, "name": None, "args": ""})
            if tc.id:
                assert entry["id"] is None, "a call's id comes once"
                entry["id"], entry["name"] = tc.id, tc.function.name
                assert tc.type == "function", tc
            else:
                assert entry["id"] is not None, "arguments before the call's first delta"
            entry["args"] += tc.function.arguments or ""
        if c.finish_reason:
            finish = c.finish_reason
for piece in reasoning + content:
    assert not any(m in piece for m in MARKERS), piece
assert "".join(reasoning) == "The user wants the weather in Paris; I should call get_weather.", reasoning
assert "".join(content).strip() == "", content
assert list(calls) == [0] and calls[0]["name"] == "get_weather", calls
assert json.loads(calls[0]["args"]) == {"city": "Paris", "unit": "celsius"}, calls
assert finish == "tool_calls", finish
assert usage.completion_tokens_details.reasoning_tokens == r.usage.completion_tokens_details.reasoning_tokens, usage
print("streaming tool call:", calls)

# The follow-up turn: the assistant's tool call and the tool's result render through the
# template (arguments as the JSON string OpenAI sends), and the answer is content.
history = ask(THINK + CALL) + [
    {"role": "assistant", "content": None, "tool_calls": [call.model_dump(exclude_none=True)]},
    {"role": "tool", "tool_call_id": call.id, "content": "[[reply]]<think>\nSunny, 24 degrees.\n</think>\n\nIt is sunny and 24 °C in Paris.[[/reply]]"},
]
r2 = client.chat.completions.create(model=model, messages=history, tools=TOOLS)
m2 = r2.choices[0].message
assert m2.content == "It is sunny and 24 °C in Paris.", m2
assert reasoning_of(m2) == "Sunny, 24 degrees.", m2
assert not m2.tool_calls and r2.choices[0].finish_reason == "stop", r2
assert r2.usage.prompt_tokens > r.usage.prompt_tokens, (r2.usage, r.usage)
print("follow-up:", m2.content)

# Several calls, nested JSON and Unicode arguments.
two = CALL + '\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "東京", "extra": {"days": [1, 2], "note": "\\"quoted\\""}}}\n</tool_call>'
r3 = client.chat.completions.create(model=model, messages=ask(two), tools=TOOLS)
names = [c.function.name for c in r3.choices[0].message.tool_calls]
assert names == ["get_weather", "get_weather"], r3
assert json.loads(r3.choices[0].message.tool_calls[1].function.arguments) == {
    "city": "東京", "extra": {"days": [1, 2], "note": '"quoted"'}}, r3
assert len({c.id for c in r3.choices[0].message.tool_calls}) == 2, r3
print("two calls:", [c.function.arguments for c in r3.choices[0].message.tool_calls])

# tool_choice "none": the model is not shown the tools; whatever it writes is content.
rn = client.chat.completions.create(model=model, messages=ask(CALL), tools=TOOLS, tool_choice="none")
assert rn.choices[0].message.tool_calls is None and rn.choices[0].message.content == CALL, rn
assert rn.choices[0].finish_reason == "stop", rn
assert rn.usage.prompt_tokens < r.usage.prompt_tokens, "the tools were rendered"
print("tool_choice none: content", repr(rn.choices[0].message.content[:30]))

# tool_choice "required" and a named function: the answer starts inside a call, the model
# continues it (the scripted model writes only the continuation).
rq = client.chat.completions.create(
    model=model, messages=ask('{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>'),
    tools=TOOLS, tool_choice="required")
assert rq.choices[0].finish_reason == "tool_calls", rq
assert json.loads(rq.choices[0].message.tool_calls[0].function.arguments) == {"city": "Oslo"}, rq
named = {"type": "function", "function": {"name": "get_weather"}}
rf = client.chat.completions.create(
    model=model, messages=ask('{"city": "Lima"}}\n</tool_call>'), tools=TOOLS, tool_choice=named, stream=True)
fcalls = {}
for chunk in rf:
    for c in chunk.choices:
        for tc in c.delta.tool_calls or []:
            e = fcalls.setdefault(tc.index, {"name": None, "args": ""})
            e["name"] = e["name"] or tc.function.name
            e["args"] += tc.function.arguments or ""
assert fcalls[0]["name"] == "get_weather" and json.loads(fcalls[0]["args"]) == {"city": "Lima"}, fcalls
print("tool_choice required / named:", rq.choices[0].message.tool_calls[0].function.arguments, fcalls)

# chat_template_kwargs: enable_thinking false closes an empty think block in the prompt (four
# more prompt tokens) and the answer is all content.
rt = client.chat.completions.create(model=model, messages=ask("Plain answer."))
ro = client.chat.completions.create(
    model=model, messages=ask("Plain answer."), extra_body={"chat_template_kwargs": {"enable_thinking": False}})
assert ro.choices[0].message.content == "Plain answer." and reasoning_of(ro.choices[0].message) is None, ro
assert ro.usage.prompt_tokens == rt.usage.prompt_tokens + 4, (ro.usage, rt.usage)
assert ro.usage.completion_tokens_details.reasoning_tokens == 0, ro.usage
print("enable_thinking false:", ro.usage.prompt_tokens, "vs", rt.usage.prompt_tokens)

# Malformed tool-call text comes back as content, never a 500.
bad = "<tool_call>\n{'name': 'get_weather', 'arguments': {'city': 'Paris'}}\n</tool_call>"
rb = client.chat.completions.create(model=model, messages=ask(bad), tools=TOOLS)
assert rb.choices[0].message.content == bad and rb.choices[0].message.tool_calls is None, rb
assert rb.choices[0].finish_reason == "stop", rb

# Bad tool_choice is the client's fault.
try:
    client.chat.completions.create(model=model, messages=ask("x"), tool_choice="required")
    raise AssertionError("tool_choice without tools accepted")
except Exception as e:  # openai.BadRequestError
    assert getattr(e, "status_code", None) == 400, e
print("ok")
