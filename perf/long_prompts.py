#!/usr/bin/env python3
"""Long prompts and the shard (issue #13 part 3): how long one steady stream stalls while long
prompts arrive on the same shard, with the preprocessing pool and without it.

For each --preprocess-threads value it starts `kvgate serve` (Qwen3's tokenizer and template,
--shards 1 so every request shares the one shard, one mocker worker at --speedup-ratio 2: a
token every ~3 ms), opens one streaming completion (max_tokens 30000, ignore_eos), and, once it
runs, for --rounds rounds:

  quiet   1 s with nothing else: the stream's own largest gap (the mocker's and the machine's
          jitter, the baseline)
  burst   a 10 MB chat message (one user message of made-up words; 400 context_length_exceeded)
          and --long new prompts of ~60k tokens at once (/v1/completions; 400 too: Qwen3's
          context is 40,960), each on its own connection

and reports the stream's largest gap between two received chunks in each window, the 10 MB
message's time to its 400, and the time until the last long prompt was answered. The stream is
read by a process of its own on a blocking socket (times from time.perf_counter at each recv).

  python3 perf/long_prompts.py --kvgate target/release/kvgate --threads 0 1 --rounds 5
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
QWEN = os.path.join(HERE, "..", "..", "shared", "models", "qwen3-0.6b")


def varied_text(nbytes, seed):
    """tests/long_prompts.rs's made-up words and numbers (the same generator)."""
    letters = b"etaoinshrdlucmfwypvbgkqjxz"
    mask = (1 << 64) - 1
    x = seed | 1
    out = bytearray()
    while len(out) < nbytes:
        x ^= (x << 13) & mask
        x ^= x >> 7
        x ^= (x << 17) & mask
        r = x
        for k in range(2 + r % 8):
            i = ((r >> (8 + 5 * k)) % 26) * ((r >> (50 - k)) % 2 + 1) // 2
            out.append(letters[min(i, 25)])
        tail = r >> 60
        if tail == 0:
            out += f" {(r >> 20) % 10000} ".encode()
        elif tail == 1:
            out += b".\n"
        elif tail == 2:
            out += b", "
        else:
            out += b" "
    return out[:nbytes].decode()


def post(port, path, body, timeout=120):
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=body, headers={"content-type": "application/json"})
    t = time.perf_counter()
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            status, data = r.status, r.read()
    except urllib.error.HTTPError as e:
        status, data = e.code, e.read()
    return status, json.loads(data), time.perf_counter() - t


READER = r"""
import json, os, socket, sys, threading, time
port = int(sys.argv[1])
body = json.dumps({"model": "qwen", "prompt": "Tell me a long story.", "max_tokens": 30000,
                   "ignore_eos": True, "stream": True}).encode()
sock = socket.create_connection(("127.0.0.1", port))
sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
             + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
times = []
def report():
    sys.stdin.read()
    sys.stdout.write(json.dumps(times))
    sys.stdout.flush()
    os._exit(0)
threading.Thread(target=report, daemon=True).start()
while True:
    b = sock.recv(65536)
    if not b:
        break
    times.append(time.perf_counter())
report()
"""


class Stream:
    """One SSE stream, read by a process of its own (no GIL shared with the senders), which
    records when each chunk arrived (perf_counter is CLOCK_MONOTONIC: comparable across
    processes)."""

    def __init__(self, port):
        self.proc = subprocess.Popen([sys.executable, "-c", READER, str(port)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE)
        self.times = []

    def finish(self):
        out, _ = self.proc.communicate(timeout=30)
        self.times = json.loads(out)

    def max_gap(self, t0, t1):
        ts = [t for t in self.times if t0 <= t <= t1]
        prev = [t for t in self.times if t < t0][-1:]
        ts = prev + ts
        return max((b - a for a, b in zip(ts, ts[1:])), default=float("nan"))


def run(kvgate, threads, rounds, n_long, port):
    args = [kvgate, "serve", "--model-path", QWEN, "--served-model-name", "qwen", "--shards", "1",
            "--workers", "1", "--speedup-ratio", "2", "--http-host", "127.0.0.1", "--http-port", str(port),
            "--preprocess-threads", str(threads)]
    server = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(300):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1)
                break
            except Exception:
                time.sleep(0.1)
        huge = json.dumps({"model": "qwen", "messages": [{"role": "user", "content": varied_text(10 << 20, 1)}],
                           "max_tokens": 8}).encode()
        # New prompts every round: a re-sent prompt would come from the token cache.
        longs = [[json.dumps({"model": "qwen", "prompt": varied_text(123_000, 7 + 100 * r + i), "max_tokens": 8}).encode()
                  for i in range(n_long)] for r in range(rounds)]
        _, v, _ = post(port, "/tokenize", json.dumps({"model": "qwen", "prompt": varied_text(123_000, 3)}).encode())
        long_tokens = v["count"]
        stream = Stream(port)
        time.sleep(1.0)
        windows = []
        for r in range(rounds):
            q0 = time.perf_counter()
            time.sleep(1.0)
            q1 = time.perf_counter()
            b0 = time.perf_counter()
            status, v, refusal = post(port, "/v1/chat/completions", huge)
            assert status == 400 and v["error"]["code"] == "context_length_exceeded", v
            answers = [None] * n_long

            def send(i):
                answers[i] = post(port, "/v1/completions", longs[r][i])

            ts = [threading.Thread(target=send, args=(i,)) for i in range(n_long)]
            for t in ts:
                t.start()
            for t in ts:
                t.join()
            for status, v, _ in answers:
                assert status == 400 and v["error"]["code"] == "context_length_exceeded", v
            b1 = time.perf_counter()
            time.sleep(0.05)
            windows.append((q0, q1, b0, b1, refusal, max(a[2] for a in answers)))
            time.sleep(0.3)
        stream.finish()
        rows = [{"quiet_gap_ms": stream.max_gap(q0, q1) * 1e3, "burst_gap_ms": stream.max_gap(b0, b1) * 1e3,
                 "refusal_10mb_ms": refusal * 1e3, "long_done_ms": done * 1e3}
                for q0, q1, b0, b1, refusal, done in windows]
        return long_tokens, rows
    finally:
        server.terminate()
        server.wait()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kvgate", default=os.path.join(HERE, "..", "target", "release", "kvgate"))
    ap.add_argument("--threads", nargs="+", type=int, default=[0, 1])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--long", type=int, default=3, help="~60k-token prompts per burst")
    ap.add_argument("--port", type=int, default=18431)
    a = ap.parse_args()
    for threads in a.threads:
        long_tokens, rows = run(a.kvgate, threads, a.rounds, a.long, a.port)
        print(f"--preprocess-threads {threads}: long prompts of {long_tokens} tokens, {a.rounds} rounds")
        for k in ["quiet_gap_ms", "burst_gap_ms", "refusal_10mb_ms", "long_done_ms"]:
            xs = [r[k] for r in rows]
            print(f"  {k:16} median {statistics.median(xs):8.1f}   max {max(xs):8.1f}   all {[round(x, 1) for x in xs]}")


if __name__ == "__main__":
    main()
