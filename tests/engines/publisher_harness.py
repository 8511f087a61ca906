#!/usr/bin/env python3
"""Drives a real engine KV-event publisher (SGLang 0.5.23 or vLLM 0.34.0, loaded from its wheel by
engine_wheels.py) through a scripted workload, for kvgate's conformance test.

    publisher_harness.py --engine sglang|vllm --workload W.json --wheel-dir DIR

The harness models the engine's GPU cache (which blocks exist, their parent and tokens), emits
the events an engine would for each scripted step, and publishes them with the engine's own
ZmqEventPublisher (PUB + ROUTER replay, its own framing, seq and msgpack encoding). Loss is
simulated under the publisher: `drop_live` keeps the next N batches off the PUB socket only, so
they stay in the replay buffer exactly as if the network had lost them.

Protocol with the test (one JSON object per stdout line; plain words on stdin):
    -> {"event": "ready", "endpoint": "tcp://127.0.0.1:P", "replay_endpoint": ..., "rank": R}
    <- go
    -> {"event": "sync", "label": ..., "blocks": [...]}    at each "sync" step
    <- ok                                                    once the subscriber matches
    -> {"event": "done", "blocks": [...], "published": N}
    <- exit
`blocks` is the expected GPU state: [{"hash": u64, "parent": u64|null, "tokens": [int]}], hashes
as unsigned 64-bit patterns, `tokens` the block's own token ids.

Workload: {"block_size": 16, "seed": 1, "rank": 0, "buffer_steps": 10000, "steps": [...]}, steps:
    {"op": "store", "chains": N, "blocks": K, "extend": true, "each": false,
     "medium": "gpu"|"cpu", "bigram": false, "group": 0}
        N new chains of K blocks (on a random existing leaf if extend, else at the root); one
        batch for all, or one batch per chain if each. A cpu medium or a nonzero group is not
        part of the expected state. bigram (SGLang only) publishes token pairs; group (vLLM only)
        sets group_idx.
    {"op": "remove", "count": N}         N leaf blocks in one BlockRemoved
    {"op": "clear"}                      AllBlocksCleared
    {"op": "drop_live", "count": N}      the next N batches skip the PUB socket
    {"op": "restart", "buffer_steps": B} a new publisher on the same ports (seq from 0, empty cache)
    {"op": "sleep", "ms": N}
    {"op": "sync", "label": "..."}
"""

import argparse
import hashlib
import json
import os
import random
import socket
import sys
import time

sys.dont_write_bytecode = True  # leave no __pycache__ in the source tree
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import engine_wheels  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port_free(port: int, timeout_s: float = 10.0) -> None:
    """ZMQ closes a socket's listener asynchronously (in its I/O thread): binding the same port
    again right after close() can fail with EADDRINUSE. Waits until the port can be bound."""
    deadline = time.monotonic() + timeout_s
    while True:
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind(("0.0.0.0", port))
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise
        time.sleep(0.02)


class LossyPub:
    """Wraps the publisher's PUB socket: drops the next `drop` sends, delegates the rest."""

    def __init__(self, sock):
        self._sock = sock
        self.drop = 0

    def send_multipart(self, frames, *args, **kwargs):
        if self.drop > 0:
            self.drop -= 1
            return None
        return self._sock.send_multipart(frames, *args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._sock, name)


class Engine:
    """One engine's publisher plus a model of its GPU cache."""

    def __init__(self, kind, kv, workload, base_port, replay_base):
        self.kind = kind
        self.kv = kv
        self.bs = workload.get("block_size", 16)
        self.rank = workload.get("rank", 0)
        self.rng = random.Random(workload.get("seed", 1))
        self.base_port = base_port
        self.replay_base = replay_base
        self.blocks = {}  # hash -> (parent, tokens)
        self.published = 0
        self.pub = None
        self.start(workload.get("buffer_steps", 10000))

    def endpoints(self):
        return (f"tcp://127.0.0.1:{self.base_port + self.rank}",
                f"tcp://127.0.0.1:{self.replay_base + self.rank}")

    def start(self, buffer_steps):
        common = dict(replay_endpoint=f"tcp://127.0.0.1:{self.replay_base}", buffer_steps=buffer_steps,
                      hwm=100_000, max_queue_size=100_000, topic="kv")
        if self.kind == "sglang":
            self.pub = self.kv.ZmqEventPublisher(attn_dp_rank=self.rank, bind=True,
                                                 endpoint=f"tcp://127.0.0.1:{self.base_port}", **common)
        else:
            # vLLM binds only wildcard endpoints (else it connects).
            self.pub = self.kv.ZmqEventPublisher(data_parallel_rank=self.rank,
                                                 endpoint=f"tcp://*:{self.base_port}", **common)
        self.pub._pub = LossyPub(self.pub._pub)

    def restart(self, buffer_steps):
        self.idle()
        self.pub.shutdown()
        self.blocks.clear()
        wait_port_free(self.base_port + self.rank)
        wait_port_free(self.replay_base + self.rank)
        self.start(buffer_steps)

    def idle(self):
        """Waits until the publisher thread has sent everything queued."""
        self.pub._event_queue.join()

    def publish(self, events):
        batch = self.kv.KVEventBatch(ts=time.time(), events=events)
        self.pub.publish(batch)
        self.published += 1

    def engine_hash(self, parent, tokens):
        digest = hashlib.sha256(repr((parent, tokens)).encode()).digest()
        # SGLang publishes signed int64, vLLM unsigned 64-bit values.
        return int.from_bytes(digest[:8], "big", signed=self.kind == "sglang")

    def leaves(self):
        parents = {p for p, _ in self.blocks.values()}
        return [h for h in self.blocks if h not in parents]

    def stored(self, hashes, parent, tokens, medium, bigram, group):
        names = {"gpu": "GPU", "cpu": "CPU_PINNED" if self.kind == "sglang" else "CPU"}
        if bigram:
            tokens = [(a, b) for a, b in zip(tokens, tokens[1:] + [self.rng.randrange(50_000)])]
        fields = dict(block_hashes=hashes, parent_block_hash=parent, token_ids=tokens, block_size=self.bs,
                      lora_id=None, medium=names[medium])
        if self.kind == "vllm":
            fields.update(lora_name=None, group_idx=group)
        return self.kv.BlockStored(**fields)

    def store(self, step):
        medium = step.get("medium", "gpu")
        bigram = bool(step.get("bigram")) and self.kind == "sglang"
        group = step.get("group", 0) if self.kind == "vllm" else 0
        tracked = medium == "gpu" and group == 0
        events = []
        for _ in range(step.get("chains", 1)):
            leaves = self.leaves() if step.get("extend") and tracked else []
            parent = self.rng.choice(leaves) if leaves else None
            hashes, all_tokens, prev = [], [], parent
            for _ in range(step.get("blocks", 1)):
                tokens = [self.rng.randrange(150_000) for _ in range(self.bs)]
                h = self.engine_hash(prev, tokens)
                if tracked:
                    self.blocks[h] = (prev, tokens)
                hashes.append(h)
                all_tokens.extend(tokens)
                prev = h
            events.append(self.stored(hashes, parent, all_tokens, medium, bigram, group))
            if step.get("each"):
                self.publish(events)
                events = []
        if events:
            self.publish(events)

    def remove(self, count):
        leaves = self.leaves()
        self.rng.shuffle(leaves)
        gone = leaves[:count]
        for h in gone:
            del self.blocks[h]
        self.publish([self.kv.BlockRemoved(block_hashes=gone, medium="GPU")])

    def expected(self):
        mask = (1 << 64) - 1
        return [{"hash": h & mask, "parent": None if p is None else p & mask, "tokens": t}
                for h, (p, t) in self.blocks.items()]


def say(obj):
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def wait_for(word):
    line = sys.stdin.readline()
    if line.strip() != word:
        raise SystemExit(f"harness: expected {word!r} on stdin, got {line!r}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--engine", choices=["sglang", "vllm"], required=True)
    ap.add_argument("--workload", required=True)
    ap.add_argument("--wheel-dir", required=True)
    args = ap.parse_args()
    with open(args.workload) as f:
        workload = json.load(f)
    kv = engine_wheels.load_sglang(args.wheel_dir) if args.engine == "sglang" else engine_wheels.load_vllm(args.wheel_dir)
    rank = workload.get("rank", 0)
    base, replay_base = free_port() - rank, free_port() - rank
    engine = Engine(args.engine, kv, workload, base, replay_base)
    endpoint, replay = engine.endpoints()
    say({"event": "ready", "engine": args.engine, "endpoint": endpoint, "replay_endpoint": replay, "rank": rank})
    wait_for("go")
    for step in workload["steps"]:
        op = step["op"]
        if op == "store":
            engine.store(step)
        elif op == "remove":
            engine.remove(step.get("count", 1))
        elif op == "clear":
            engine.blocks.clear()
            engine.publish([kv.AllBlocksCleared()])
        elif op == "drop_live":
            engine.idle()
            engine.pub._pub.drop = step.get("count", 1)
        elif op == "restart":
            engine.restart(step.get("buffer_steps", workload.get("buffer_steps", 10000)))
        elif op == "sleep":
            time.sleep(step.get("ms", 100) / 1000)
        elif op == "sync":
            engine.idle()
            say({"event": "sync", "label": step.get("label", ""), "blocks": engine.expected()})
            wait_for("ok")
        else:
            raise SystemExit(f"harness: unknown op {op!r}")
    engine.idle()
    say({"event": "done", "blocks": engine.expected(), "published": engine.published})
    wait_for("exit")
    engine.pub.shutdown()


if __name__ == "__main__":
    main()
