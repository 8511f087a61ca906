"""The three client checks of the Dynamo two-replica setup, with the official OpenAI client.

Usage: python dynamo_checks.py BASE_URL MODEL aggregated|disagg

1. One question gets an answer.
2. A two-turn conversation: the second turn goes to the worker holding the first turn's prefix
   (the prefill worker when disaggregated) and reports cached prompt tokens.
3. Ten parallel requests are spread over both replicas.
"""
import sys
from concurrent.futures import ThreadPoolExecutor

from openai import OpenAI

base, model, mode = sys.argv[1], sys.argv[2], sys.argv[3]
client = OpenAI(base_url=base, api_key="unused")
# The worker that holds a request's prompt: the prefill worker when disaggregated.
holder = "x-kvgate-prefill-worker" if mode == "disagg" else "x-kvgate-worker"

r = client.chat.completions.create(
    model=model, messages=[{"role": "user", "content": "What is the capital of France?"}], max_tokens=16)
assert r.choices[0].message.content, r
print("1. one question:", repr(r.choices[0].message.content), r.usage)

system = ("You are the operations assistant of a regional rail company. Answer briefly, quote the timetable "
          "section you rely on, never guess platform numbers, and say so plainly when a connection is not "
          "guaranteed. Delays over ten minutes must be reported to the control room at once.")
messages = [{"role": "system", "content": system}, {"role": "user", "content": "When is the first train to Lyon?"}]
raw = client.chat.completions.with_raw_response.create(model=model, messages=messages, max_tokens=12)
first = raw.parse()
w1 = raw.headers.get(holder)
messages += [{"role": "assistant", "content": first.choices[0].message.content},
             {"role": "user", "content": "And the last one back?"}]
raw = client.chat.completions.with_raw_response.create(model=model, messages=messages, max_tokens=12)
second = raw.parse()
w2 = raw.headers.get(holder)
cached = second.usage.prompt_tokens_details.cached_tokens
assert w1 and w1 == w2, (w1, w2)
assert cached and cached > 0, second.usage
if mode == "disagg":
    assert raw.headers.get("x-kvgate-disagg") == "remote", dict(raw.headers)
print("2. two turns on worker", w2, "cached_tokens", cached, "of", second.usage.prompt_tokens)


def ask(i):
    raw = client.chat.completions.with_raw_response.create(
        model=model, messages=[{"role": "user", "content": f"Question {i}: name a river in country number {i * 7}."}],
        max_tokens=8)
    assert raw.parse().choices[0].message.content
    return raw.headers.get(holder), raw.headers.get("x-kvgate-decode-worker")


with ThreadPoolExecutor(10) as pool:
    answers = list(pool.map(ask, range(10)))
holders = {a[0] for a in answers}
assert len(holders) >= 2, answers
if mode == "disagg":
    decoders = {a[1] for a in answers}
    assert len(decoders) >= 2, answers
print("3. ten parallel requests over", sorted(holders))
print("ok")
