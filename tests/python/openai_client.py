"""The official OpenAI Python client against a running kvgate, unchanged.

Usage: python openai_client.py BASE_URL MODEL [disagg]

With `disagg`, the deployment must be disaggregated: every response names its prefill and its
decode worker (different workers: the KV moved between them).
"""
import sys

from openai import OpenAI

base, model = sys.argv[1], sys.argv[2]
disagg = len(sys.argv) > 3 and sys.argv[3] == "disagg"
client = OpenAI(base_url=base, api_key="unused")
messages = [{"role": "user", "content": "What is the capital of France?"}]

r = client.chat.completions.create(model=model, messages=messages, max_tokens=16)
assert r.usage.prompt_tokens == 15, r.usage
assert r.choices[0].message.role == "assistant"
assert r.choices[0].message.content, r
assert r.choices[0].finish_reason in ("stop", "length"), r.choices[0].finish_reason
print("non-streaming:", repr(r.choices[0].message.content), r.usage)

stream = client.chat.completions.create(
    model=model, messages=messages, max_tokens=16, stream=True,
    stream_options={"include_usage": True},
)
parts, usage, finish = [], None, None
for chunk in stream:
    if chunk.usage is not None:
        usage = chunk.usage
    for c in chunk.choices:
        if c.delta.content:
            parts.append(c.delta.content)
        if c.finish_reason:
            finish = c.finish_reason
assert parts, "no content streamed"
assert finish in ("stop", "length"), finish
assert usage is not None and usage.prompt_tokens == 15, usage
print("streaming:", repr("".join(parts)), usage)

if disagg:
    raw = client.chat.completions.with_raw_response.create(model=model, messages=messages, max_tokens=8)
    prefill, decode = raw.headers.get("x-kvgate-prefill-worker"), raw.headers.get("x-kvgate-decode-worker")
    assert prefill and decode and prefill != decode, dict(raw.headers)
    assert raw.headers.get("x-kvgate-disagg") == "remote", dict(raw.headers)
    assert raw.parse().choices[0].message.content
    print("disaggregated: prefill", prefill, "decode", decode)

c = client.completions.create(model=model, prompt="The capital of France is", max_tokens=5, extra_body={"ignore_eos": True})
assert c.usage.completion_tokens == 5, c.usage
assert [m.id for m in client.models.list().data] == [model]

try:
    client.chat.completions.create(model="no-such-model", messages=messages)
    raise AssertionError("unknown model accepted")
except Exception as e:  # openai.NotFoundError
    assert getattr(e, "status_code", None) == 404, e
print("ok")
