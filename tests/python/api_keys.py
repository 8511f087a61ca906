"""The official OpenAI Python client against a kvgate started with --api-key.

Usage: python api_keys.py BASE_URL MODEL GOOD_KEY

The right key serves a chat completion, a stream and the model list; a wrong key raises the
client's AuthenticationError (401, code invalid_api_key), and the client does not retry it.
"""
import sys

import openai
from openai import OpenAI

base, model, key = sys.argv[1], sys.argv[2], sys.argv[3]
messages = [{"role": "user", "content": "Hello"}]

client = OpenAI(base_url=base, api_key=key, max_retries=0)
assert [m.id for m in client.models.list().data] == [model]
r = client.chat.completions.create(model=model, messages=messages, max_tokens=8)
assert r.choices[0].message.content, r
parts = [
    c.choices[0].delta.content or ""
    for c in client.chat.completions.create(model=model, messages=messages, max_tokens=8, stream=True)
    if c.choices
]
assert "".join(parts), parts

for bad in [key + "x", "sk-wrong"]:
    try:
        OpenAI(base_url=base, api_key=bad, max_retries=2).chat.completions.create(
            model=model, messages=messages, max_tokens=8, stream=True
        )
    except openai.AuthenticationError as e:
        assert e.status_code == 401, e
        assert e.code == "invalid_api_key", e.body
        assert bad not in str(e), "the refusal echoes the key"
    else:
        raise AssertionError("a wrong key was accepted")
print("ok")
