#!/usr/bin/env python3
"""Fake SGLang 0.5.23 / vLLM 0.34.0 engine for kvgate's tests.

Serves token ids without a model, but speaks the engines' HTTP APIs and their
ZMQ KV-event wire (PUB + ROUTER replay, msgspec/msgpack payloads) as documented
in shared/ENGINES.md and as checked against the two released wheels.  See
README.md beside this file for the command lines and the /fake/ test controls.

Written for kvgate; no engine code is copied: only the wire shapes (field names,
order, defaults) are reproduced so that the bytes match.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import hashlib
import json
import os
import pickle
import queue
import socket
import struct
import sys
import threading
import time
import uuid
from typing import Any, Optional

import msgspec
import zmq
from aiohttp import ClientSession, ClientTimeout, web

SGLANG_VERSION = "0.5.23"
VLLM_VERSION = "0.34.0"

# ---------------------------------------------------------------------------
# Vocabulary: plain Qwen3 words with a leading space (ids from the Qwen3
# tokenizer.json in shared/models/qwen3-0.6b) and the special tokens.
# ---------------------------------------------------------------------------
WORDS = [
    (279, " the"), (8251, " cat"), (7578, " sat"), (389, " on"), (264, " a"),
    (5517, " mat"), (323, " and"), (5562, " dog"), (10613, " ran"), (311, " to"),
    (6118, " park"), (304, " in"), (7015, " sun"),
]
WORD_IDS = [w[0] for w in WORDS]
WORD_TEXT = dict(WORDS)
EOS_ID = 151645  # <|im_end|>: tokenizer eos and first generation_config eos
EOS_IDS = (151645, 151643)  # generation_config.json eos_token_id list
SPECIAL_TEXT = {151645: "<|im_end|>", 151643: "<|endoftext|>", 151644: "<|im_start|>"}


def token_text(tok: int, skip_special: bool = True) -> str:
    if tok in WORD_TEXT:
        return WORD_TEXT[tok]
    if tok in SPECIAL_TEXT:
        return "" if skip_special else SPECIAL_TEXT[tok]
    return f"<{tok}>"


def gen_token(prompt: list[int], i: int) -> int:
    """The i-th (0-based) generated word for a prompt: a fixed cycle of WORDS,
    started at an offset derived from the prompt."""
    off = (sum(prompt) + len(prompt)) % len(WORD_IDS)
    return WORD_IDS[(off + i) % len(WORD_IDS)]


# ---------------------------------------------------------------------------
# Event wire structs.  Field names/order/defaults mirror the engines' classes
# so msgspec produces byte-identical msgpack (checked by --self-test).
# ---------------------------------------------------------------------------
# SGLang 0.5.23
class SglEventBatch(msgspec.Struct, array_like=True, gc=False):
    ts: float
    events: list
    attn_dp_rank: Optional[int] = None


class SglEvent(msgspec.Struct, omit_defaults=True, gc=False, tag=True):
    pass


class SglBlockStored(SglEvent, tag="BlockStored"):
    block_hashes: list
    parent_block_hash: Optional[int]
    token_ids: list
    block_size: int
    lora_id: Optional[int]
    medium: Optional[str] = None
    cache_salt: Optional[str] = None
    session_id: Optional[str] = None
    lora_name: Optional[str] = None


class SglBlockRemoved(SglEvent, tag="BlockRemoved"):
    block_hashes: list
    medium: Optional[str] = None


class SglAllBlocksCleared(SglEvent, tag="AllBlocksCleared"):
    pass


# vLLM 0.34.0
class VllmEventBatch(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    ts: float
    events: list
    data_parallel_rank: Optional[int] = None


class VllmEvent(msgspec.Struct, omit_defaults=True, gc=False, tag=True):
    pass


class VllmBlockStored(VllmEvent, tag="BlockStored"):
    block_hashes: list
    parent_block_hash: Optional[int]
    token_ids: list
    block_size: int
    lora_id: Optional[int]
    medium: Optional[str]
    lora_name: Optional[str]
    extra_keys: Optional[list] = None
    group_idx: Optional[int] = None
    kv_cache_spec_kind: Optional[str] = None
    kv_cache_spec_sliding_window: Optional[int] = None
    locality: Optional[str] = None
    ownership: Optional[str] = None
    session_id: Optional[str] = None
    lookahead_token_ids: Optional[list] = None


class VllmBlockRemoved(VllmEvent, tag="BlockRemoved"):
    block_hashes: list
    medium: Optional[str]
    group_idx: Optional[int] = None
    locality: Optional[str] = None
    ownership: Optional[str] = None


class VllmAllBlocksCleared(VllmEvent, tag="AllBlocksCleared"):
    pass


# Legacy wire (both engines before the map form): tagged arrays, 2-element batch.
class LegacyEventBatch(msgspec.Struct, array_like=True, gc=False):
    ts: float
    events: list


class LegacyBlockStored(msgspec.Struct, array_like=True, omit_defaults=True, tag="BlockStored"):
    block_hashes: list
    parent_block_hash: Optional[int]
    token_ids: list
    block_size: int
    lora_id: Optional[int]
    medium: Optional[str] = None


class LegacyBlockRemoved(msgspec.Struct, array_like=True, omit_defaults=True, tag="BlockRemoved"):
    block_hashes: list
    medium: Optional[str] = None


class LegacyAllBlocksCleared(msgspec.Struct, array_like=True, tag="AllBlocksCleared"):
    pass


_ENCODER = msgspec.msgpack.Encoder()


def encode_batch(engine: str, legacy: bool, ts: float, events: list[dict], rank: int) -> bytes:
    """Encode internal event dicts the way the engine's publisher does."""
    out = []
    for e in events:
        t = e["t"]
        if legacy:
            if t == "stored":
                out.append(LegacyBlockStored(list(e["hashes"]), e["parent"], list(e["tokens"]),
                                             e["block_size"], None, e.get("medium")))
            elif t == "removed":
                out.append(LegacyBlockRemoved(list(e["hashes"]), e.get("medium")))
            else:
                out.append(LegacyAllBlocksCleared())
        elif engine == "sglang":
            if t == "stored":
                out.append(SglBlockStored(
                    block_hashes=list(e["hashes"]), parent_block_hash=e["parent"],
                    token_ids=list(e["tokens"]), block_size=e["block_size"], lora_id=None,
                    medium=e.get("medium"), cache_salt=e.get("cache_salt"),
                    session_id=e.get("session_id")))
            elif t == "removed":
                out.append(SglBlockRemoved(block_hashes=list(e["hashes"]), medium=e.get("medium")))
            else:
                out.append(SglAllBlocksCleared())
        else:
            if t == "stored":
                out.append(VllmBlockStored(
                    block_hashes=list(e["hashes"]), parent_block_hash=e["parent"],
                    token_ids=list(e["tokens"]), block_size=e["block_size"], lora_id=None,
                    medium=e.get("medium"), lora_name=None, extra_keys=e.get("extra_keys"),
                    group_idx=0, session_id=e.get("session_id")))
            elif t == "removed":
                out.append(VllmBlockRemoved(block_hashes=list(e["hashes"]),
                                            medium=e.get("medium"), group_idx=0))
            else:
                out.append(VllmAllBlocksCleared())
    if legacy:
        return _ENCODER.encode(LegacyEventBatch(ts=ts, events=out))
    if engine == "sglang":
        return _ENCODER.encode(SglEventBatch(ts=ts, events=out, attn_dp_rank=rank))
    return _ENCODER.encode(VllmEventBatch(ts=ts, events=out, data_parallel_rank=rank))


GOLDEN_VLLM = (
    "93cb3ff800000000000093de0009a474797065ab426c6f636b53746f726564ac626c6f636b5f68617368657391cf"
    "8000000000000005b1706172656e745f626c6f636b5f68617368c0a9746f6b656e5f696473dc00100001020304"
    "05060708090a0b0c0d0e0faa626c6f636b5f73697a6510a76c6f72615f6964c0a66d656469756da3475055a96c"
    "6f72615f6e616d65c0a967726f75705f6964780083a474797065ac426c6f636b52656d6f766564ac626c6f636b"
    "5f6861736865739107a66d656469756da347505581a474797065b0416c6c426c6f636b73436c656172656400"
)
GOLDEN_SGLANG = (
    "93cb3ff80000000000009387a474797065ab426c6f636b53746f726564ac626c6f636b5f68617368657391fbb170"
    "6172656e745f626c6f636b5f68617368c0a9746f6b656e5f696473dc0010000102030405060708090a0b0c0d0e"
    "0faa626c6f636b5f73697a6510a76c6f72615f6964c0a66d656469756da347505583a474797065ac426c6f636b"
    "52656d6f766564ac626c6f636b5f6861736865739107a66d656469756da347505581a474797065b0416c6c426c"
    "6f636b73436c656172656400"
)


def golden_bytes() -> tuple[bytes, bytes]:
    """Encode the §7 golden batches with this file's structs (as the engines'
    hand-built golden vectors: vLLM's BlockRemoved there carries no group_idx)."""
    v = _ENCODER.encode(VllmEventBatch(ts=1.5, events=[
        VllmBlockStored(block_hashes=[2**63 + 5], parent_block_hash=None, token_ids=list(range(16)),
                        block_size=16, lora_id=None, medium="GPU", lora_name=None, group_idx=0),
        VllmBlockRemoved(block_hashes=[7], medium="GPU"),
        VllmAllBlocksCleared()], data_parallel_rank=0))
    s = _ENCODER.encode(SglEventBatch(ts=1.5, events=[
        SglBlockStored(block_hashes=[-5], parent_block_hash=None, token_ids=list(range(16)),
                       block_size=16, lora_id=None, medium="GPU"),
        SglBlockRemoved(block_hashes=[7], medium="GPU"),
        SglAllBlocksCleared()], attn_dp_rank=0))
    return v, s


def self_test() -> int:
    ok = True
    v, s = golden_bytes()
    for name, got, want in (("vllm", v, GOLDEN_VLLM), ("sglang", s, GOLDEN_SGLANG)):
        if got.hex() != want:
            print(f"FAIL golden {name}: {len(got)} B\n got  {got.hex()}\n want {want}")
            ok = False
        else:
            print(f"ok   golden {name} ({len(got)} bytes)")
    h = sgl_page_hash(None, list(range(16)))[1]
    if h != 6738917275443968386:
        print(f"FAIL sglang hash of tokens 0..15: {h}")
        ok = False
    else:
        print("ok   sglang hash of tokens 0..15 = 6738917275443968386")
    hv = vllm_page_hash(None, list(range(16)))[1]
    if not (0 <= hv < 2**64):
        print("FAIL vllm hash range")
        ok = False
    else:
        print(f"ok   vllm hash of tokens 0..15 = {hv} (u64)")
    return 0 if ok else 1


# ---------------------------------------------------------------------------
# Block hashing
# ---------------------------------------------------------------------------
def sgl_page_hash(prior: Optional[bytes], tokens: list[int]) -> tuple[bytes, int]:
    """SGLang: SHA-256(prior digest || tokens as u32 LE); event value = first 8
    bytes big-endian as signed int64."""
    h = hashlib.sha256()
    if prior is not None:
        h.update(prior)
    h.update(struct.pack(f"<{len(tokens)}I", *tokens))
    d = h.digest()
    return d, int.from_bytes(d[:8], "big", signed=True)


def sgl_salt_seed(cache_salt: Optional[str]) -> Optional[bytes]:
    if cache_salt is None:
        return None
    return hashlib.sha256(b"sglang-cache-salt-v1\0" + cache_salt.encode("utf-8")).digest()


_VLLM_NONE_HASH = hashlib.sha256(pickle.dumps("vllm-none-hash", protocol=pickle.HIGHEST_PROTOCOL)).digest()


def vllm_page_hash(parent: Optional[bytes], tokens: list[int], extra: Any = None) -> tuple[bytes, int]:
    """vLLM (sha256, pickle): H((parent or NONE_HASH, tuple(tokens), extra_keys));
    event value = last 8 bytes big-endian, unsigned."""
    if parent is None:
        parent = _VLLM_NONE_HASH
    d = hashlib.sha256(pickle.dumps((parent, tuple(tokens), extra), protocol=pickle.HIGHEST_PROTOCOL)).digest()
    return d, int.from_bytes(d, "big") & ((1 << 64) - 1)


# ---------------------------------------------------------------------------
# ZMQ publisher (own thread, like the engines')
# ---------------------------------------------------------------------------
END_SEQ = (-1).to_bytes(8, "big", signed=True)


class Publisher:
    def __init__(self, ctx: zmq.Context, host: str, port: int, replay_port: Optional[int],
                 topic: str, buffer_steps: int, hwm: int, legacy: bool):
        self.ctx = ctx
        self.host = host
        self.port = port
        self.replay_port = replay_port
        self.topic = topic.encode("utf-8")
        self.buffer_steps = buffer_steps
        self.hwm = hwm
        self.legacy = legacy
        self.q: queue.Queue = queue.Queue()
        self.pub = None
        self.replay = None
        self.published = 0
        self.dropped = 0
        self.replays_served = 0
        self._bind()
        self._thread = threading.Thread(target=self._run, daemon=True, name=f"zmq-pub-{port}")
        self._thread.start()

    def _bind(self) -> None:
        self.pub = self.ctx.socket(zmq.PUB)
        self.pub.set_hwm(self.hwm)
        self.pub.setsockopt(zmq.LINGER, 0)
        _zmq_bind(self.pub, self.host, self.port)
        if self.replay_port is not None:
            self.replay = self.ctx.socket(zmq.ROUTER)
            self.replay.setsockopt(zmq.SNDHWM, 2 * (self.buffer_steps + 1))
            self.replay.setsockopt(zmq.LINGER, 0)
            _zmq_bind(self.replay, self.host, self.replay_port)
        self.seq = 0
        self.buffer: collections.deque = collections.deque(maxlen=self.buffer_steps)
        self.drop_remaining = 0

    def publish(self, payload: bytes) -> None:
        self.q.put(("batch", payload))

    def restart(self, timeout: float = 10.0) -> None:
        done = threading.Event()
        self.q.put(("restart", done))
        done.wait(timeout)

    def drop(self, n: int) -> None:
        done = threading.Event()
        self.q.put(("drop", n, done))
        done.wait(5)

    def _service_replay(self) -> None:
        frames = self.replay.recv_multipart()
        if len(frames) != 3:
            return
        client, _, start = frames
        start_seq = int.from_bytes(start, "big")
        self.replays_served += 1
        for seq, buf in list(self.buffer):
            if seq >= start_seq:
                if self.legacy:
                    self.replay.send_multipart((client, b"", seq.to_bytes(8, "big"), buf))
                else:
                    self.replay.send_multipart((client, b"", self.topic, seq.to_bytes(8, "big"), buf))
        if self.legacy:
            self.replay.send_multipart((client, b"", END_SEQ, b""))
        else:
            self.replay.send_multipart((client, b"", b"", END_SEQ, b""))

    def _run(self) -> None:
        while True:
            try:
                if self.replay is not None and self.replay.poll(0):
                    self._service_replay()
            except zmq.ZMQError:
                pass
            try:
                item = self.q.get(timeout=0.005)
            except queue.Empty:
                continue
            kind = item[0]
            if kind == "batch":
                seq = self.seq
                self.seq += 1
                payload = item[1]
                if self.drop_remaining > 0:
                    self.drop_remaining -= 1
                    self.dropped += 1
                else:
                    self.pub.send_multipart((self.topic, seq.to_bytes(8, "big"), payload))
                    self.published += 1
                self.buffer.append((seq, payload))
            elif kind == "drop":
                self.drop_remaining += int(item[1])
                item[2].set()
            elif kind == "restart":
                try:
                    self.pub.close(linger=0)
                    if self.replay is not None:
                        self.replay.close(linger=0)
                    self._bind()
                finally:
                    item[1].set()


def _zmq_bind(sock: zmq.Socket, host: str, port: int) -> None:
    deadline = time.time() + 5
    while True:
        try:
            sock.bind(f"tcp://{host}:{port}")
            return
        except zmq.ZMQError:
            if time.time() > deadline:
                raise
            time.sleep(0.05)


def _port_free(host: str, port: int) -> bool:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        s.bind((host, port))
        return True
    except OSError:
        return False
    finally:
        s.close()


def pick_port_range(host: str, n: int, avoid: set[int]) -> int:
    """A base port such that base..base+n-1 are free (and not in avoid)."""
    for _ in range(200):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.bind((host, 0))
        base = s.getsockname()[1]
        s.close()
        rng = range(base, base + n)
        if base + n < 65535 and not (set(rng) & avoid) and all(_port_free(host, p) for p in rng):
            return base
    raise RuntimeError("no free port range")


# ---------------------------------------------------------------------------
# Prefix cache (page-level radix keyed by the chained page digest)
# ---------------------------------------------------------------------------
class Block:
    __slots__ = ("key", "digest", "ext", "parent_key", "parent_ext", "tokens", "children", "ref",
                 "block_id", "ns")

    def __init__(self, key, digest, ext, parent_key, parent_ext, tokens, block_id, ns):
        self.key = key
        self.digest = digest
        self.ext = ext
        self.parent_key = parent_key
        self.parent_ext = parent_ext
        self.tokens = tokens
        self.children = 0
        self.ref = 0
        self.block_id = block_id
        self.ns = ns


class PrefixCache:
    def __init__(self, engine: str, page_size: int, capacity: int, enabled: bool):
        self.engine = engine
        self.ps = page_size
        self.capacity = capacity
        self.enabled = enabled  # False: no radix cache (SGLang decode default)
        self.blocks: dict = {}
        self.lru: collections.OrderedDict = collections.OrderedDict()
        self.events: list[dict] = []
        self.next_block_id = 1
        self.evictions = 0

    # -- hashing ---------------------------------------------------------
    def chain(self, tokens: list[int], npages: int, salt: Optional[str]) -> list[tuple[bytes, int]]:
        out = []
        ps = self.ps
        if self.engine == "sglang":
            prior = sgl_salt_seed(salt)
            for i in range(npages):
                d, e = sgl_page_hash(prior, tokens[i * ps:(i + 1) * ps])
                out.append((d, e))
                prior = d
        else:
            parent = None
            for i in range(npages):
                extra = (("cache_salt", salt),) if (i == 0 and salt) else None
                d, e = vllm_page_hash(parent, tokens[i * ps:(i + 1) * ps], extra)
                out.append((d, e))
                parent = d
        return out

    # -- recorder --------------------------------------------------------
    def _enqueue(self, ev: dict) -> None:
        if self.engine == "sglang" and self.events:
            tail = self.events[-1]
            if tail["t"] == "removed" and ev["t"] == "removed" and tail.get("medium") == ev.get("medium"):
                tail["hashes"].extend(ev["hashes"])
                return
            if (tail["t"] == "stored" and ev["t"] == "stored"
                    and tail.get("medium") == ev.get("medium")
                    and tail["block_size"] == ev["block_size"]
                    and tail.get("cache_salt") == ev.get("cache_salt")
                    and tail.get("session_id") == ev.get("session_id")
                    and tail["hashes"] and ev["parent"] == tail["hashes"][-1]):
                tail["hashes"].extend(ev["hashes"])
                tail["tokens"].extend(ev["tokens"])
                return
        self.events.append(ev)

    def take_events(self) -> list[dict]:
        ev, self.events = self.events, []
        return ev

    # -- operations ------------------------------------------------------
    def match(self, tokens: list[int], limit: int, ns, salt) -> list[Block]:
        if not self.enabled:
            return []
        npages = max(limit, 0) // self.ps
        found = []
        for d, _e in self.chain(tokens, npages, salt):
            b = self.blocks.get((ns, d))
            if b is None:
                break
            found.append(b)
        return found

    def insert(self, tokens: list[int], upto: int, ns, salt, session_id=None) -> list[Block]:
        """Cache the full pages of tokens[:upto]; publish new ones; return all the
        blocks of that range (existing or new), in order."""
        if not self.enabled:
            return []
        npages = upto // self.ps
        if npages <= 0:
            return []
        chain = self.chain(tokens, npages, salt)
        result: list[Block] = []
        new_from = None
        for i, (d, e) in enumerate(chain):
            key = (ns, d)
            b = self.blocks.get(key)
            if b is None or new_from is not None:
                if new_from is None:
                    new_from = i
                if b is None:
                    parent_key = result[-1].key if result else None
                    parent_ext = chain[i - 1][1] if i > 0 else None
                    b = Block(key, d, e, parent_key, parent_ext, tokens[i * self.ps:(i + 1) * self.ps],
                              self.next_block_id, ns)
                    self.next_block_id += 1
                    self.blocks[key] = b
                    if parent_key is not None and parent_key in self.blocks:
                        self.blocks[parent_key].children += 1
                self.lru[key] = None
                self.lru.move_to_end(key)
            result.append(b)
        if new_from is not None:
            new = chain[new_from:]
            ev = {"t": "stored", "hashes": [e for _d, e in new],
                  "parent": chain[new_from - 1][1] if new_from > 0 else None,
                  "tokens": list(tokens[new_from * self.ps:npages * self.ps]),
                  "block_size": self.ps, "medium": "GPU", "session_id": session_id}
            if self.engine == "sglang":
                ev["cache_salt"] = salt
            else:
                ev["extra_keys"] = [((salt,) if (j == 0 and salt) else None)
                                    for j in range(new_from, npages)]
            if self.engine == "sglang":
                # one BlockStored per page, coalesced by the recorder
                for j in range(new_from, npages):
                    self._enqueue({"t": "stored", "hashes": [chain[j][1]],
                                   "parent": chain[j - 1][1] if j > 0 else None,
                                   "tokens": list(tokens[j * self.ps:(j + 1) * self.ps]),
                                   "block_size": self.ps, "medium": "GPU",
                                   "cache_salt": salt, "session_id": session_id})
            else:
                self._enqueue(ev)
        return result

    def touch(self, blocks: list[Block]) -> None:
        for b in blocks:
            if b.key in self.lru:
                self.lru.move_to_end(b.key)

    def lock(self, blocks: list[Block]) -> None:
        for b in blocks:
            b.ref += 1
        self.touch(blocks)

    def unlock(self, blocks: list[Block]) -> None:
        # tail blocks first, so that they are evicted first (both engines free
        # the tail of a sequence before its head)
        for b in reversed(blocks):
            if b.ref > 0:
                b.ref -= 1
            if b.key in self.lru:
                self.lru.move_to_end(b.key, last=False)
        for b in blocks:
            if b.key in self.lru:
                self.lru.move_to_end(b.key)

    def evict_if_needed(self) -> None:
        if not self.enabled or self.capacity <= 0:
            return
        while len(self.blocks) > self.capacity:
            victim = None
            for key in self.lru:
                b = self.blocks[key]
                if b.ref == 0 and (self.engine == "vllm" or b.children == 0):
                    victim = b
                    break
            if victim is None:
                return  # everything is in use: overcommit
            del self.blocks[victim.key]
            del self.lru[victim.key]
            if victim.parent_key is not None and victim.parent_key in self.blocks:
                self.blocks[victim.parent_key].children -= 1
            self.evictions += 1
            self._enqueue({"t": "removed", "hashes": [victim.ext], "medium": "GPU"})

    def clear(self) -> None:
        self.blocks.clear()
        self.lru.clear()
        self._enqueue({"t": "cleared"})

    def snapshot(self) -> list[dict]:
        return [{"hash": b.ext, "parent_hash": b.parent_ext, "token_ids": list(b.tokens),
                 "ref": b.ref, "block_id": b.block_id, "namespace": _ns_json(b.ns)}
                for b in (self.blocks[k] for k in self.lru)]


def _ns_json(ns):
    if isinstance(ns, tuple):  # SGLang (extra_key, cache_salt)
        return None if ns == (None, None) else {"extra_key": ns[0], "cache_salt": ns[1]}
    return None if ns is None else {"cache_salt": ns}


# ---------------------------------------------------------------------------
# Ranks, requests
# ---------------------------------------------------------------------------
class Rank:
    def __init__(self, eng: "Engine", idx: int, cache_enabled: bool):
        self.eng = eng
        self.idx = idx
        self.cache = PrefixCache(eng.kind, eng.page_size, eng.args.capacity_blocks, cache_enabled)
        self.publisher: Optional[Publisher] = None
        self.running = 0
        self.waiting = 0

    def flush(self) -> None:
        self.cache.evict_if_needed()
        events = self.cache.take_events()
        if not events or self.publisher is None:
            return
        payload = encode_batch(self.eng.kind, self.eng.args.legacy_wire, time.time(), events, self.idx)
        self.publisher.publish(payload)


class Req:
    def __init__(self, eng: "Engine", rank: Rank, rid: str, prompt: list[int], sp: dict, stream: bool):
        self.eng = eng
        self.rank = rank
        self.rid = rid
        self.prompt = prompt
        self.sp = sp
        self.stream = stream
        self.out: list[int] = []
        self.pending: list[list[int]] = []
        self.wake = asyncio.Event()
        self.done = False
        self.finish: Optional[tuple] = None
        self.cached_tokens = 0
        self.abort_evt = asyncio.Event()
        self.abort_msg: Optional[str] = None
        self.phase = "waiting"
        self.blocks: list[Block] = []
        self.created = time.time()
        self.ns = None
        self.salt = None
        self.session_id = None
        self.kv_transfer_params = None
        self.cached_upto = 0  # vLLM: tokens whose full pages are cached
        self.stop_str_hit = None
        self.task: Optional[asyncio.Task] = None
        self.finished_fut: asyncio.Future = asyncio.get_running_loop().create_future()

    def emit(self, delta: list[int]) -> None:
        self.pending.append(delta)
        self.wake.set()

    def end(self, finish: tuple) -> None:
        if self.done:
            return
        self.finish = finish
        self.done = True
        self.pending.append([])
        self.wake.set()
        if not self.finished_fut.done():
            self.finished_fut.set_result(True)

    def request_abort(self, msg: Optional[str] = None) -> None:
        if self.done:
            return
        self.abort_msg = msg
        self.abort_evt.set()


async def wait_or_abort(req: Req, seconds: float) -> bool:
    """Sleep; True if an abort arrived meanwhile."""
    if req.abort_evt.is_set():
        return True
    if seconds <= 0:
        await asyncio.sleep(0)
        return req.abort_evt.is_set()
    try:
        await asyncio.wait_for(req.abort_evt.wait(), seconds)
        return True
    except asyncio.TimeoutError:
        return False


# ---------------------------------------------------------------------------
# Engine
# ---------------------------------------------------------------------------
class Engine:
    def __init__(self, args):
        self.args = args
        # llama-cpp: llama-server's HTTP API over the vLLM-shaped core (eos/limit finishes, a
        # page-granular prompt cache standing in for the slot cache); it publishes no KV events.
        self.api = args.engine
        self.kind = "vllm" if args.engine == "llama-cpp" else args.engine
        self.page_size = args.page_size
        self.model = args.served_model_name or args.model_path
        self.ranks: list[Rank] = []
        self.reqs: dict[str, Req] = {}
        self.rr = 0
        self.hang_until = 0.0
        self.stats = collections.Counter()
        self.last_requests: collections.deque = collections.deque(maxlen=50)
        self.startup_time = time.time()
        self.engine_id = str(uuid.uuid4())
        # SGLang PD: rooms on the prefill side {room: RoomEntry}
        self.rooms: dict[int, dict] = {}
        # vLLM PD: leases on the prefill side {internal request id: lease}
        self.leases: dict[str, dict] = {}
        self.bootstrap_port: Optional[int] = None
        self.side_channel_port: Optional[int] = None
        self.kv_port: Optional[int] = None
        self.replay_port: Optional[int] = None
        self.port: Optional[int] = None
        self.server_load = 0
        self.http: Optional[ClientSession] = None
        self.total_prefill_uncached = 0
        self.cache_hits = 0
        self.cache_queries = 0

        if self.kind == "sglang":
            self.mode = args.disaggregation_mode
            cache_on = not (self.mode == "decode" and not args.disaggregation_decode_enable_radix_cache)
        else:
            self.mode = args.kv_role or "null"
            cache_on = True
        for i in range(args.dp_size):
            self.ranks.append(Rank(self, i, cache_on))

    # -- ranks -----------------------------------------------------------
    def pick_rank(self, explicit: Optional[int]) -> Rank:
        if explicit is not None and 0 <= explicit < len(self.ranks):
            return self.ranks[explicit]
        r = self.ranks[self.rr % len(self.ranks)]
        self.rr += 1
        return r

    def start_publishers(self, ctx: zmq.Context) -> None:
        a = self.args
        if not a.kv_events:
            return
        host = a.kv_events_bind_host or a.host
        n = len(self.ranks)
        avoid: set[int] = set()
        kv = a.kv_events_port if a.kv_events_port else pick_port_range(host, n, avoid)
        avoid |= set(range(kv, kv + n))
        replay: Optional[int]
        if a.replay_port is not None and a.replay_port < 0:
            replay = None
        elif a.replay_port:
            replay = a.replay_port
        else:
            replay = pick_port_range(host, n, avoid)
        self.kv_port, self.replay_port = kv, replay
        for r in self.ranks:
            r.publisher = Publisher(ctx, host, kv + r.idx, None if replay is None else replay + r.idx,
                                    a.topic, a.buffer_steps, 100_000, a.legacy_wire)

    # -- generation core -------------------------------------------------
    def next_token(self, req: Req, i: int) -> int:
        sp = req.sp
        eos_at = self.args.eos_after
        if not sp["ignore_eos"] and eos_at > 0 and i == max(eos_at, sp["min_tokens"]):
            return EOS_ID
        tok = gen_token(req.prompt, i)
        if i < sp["min_tokens"]:
            # stop tokens are masked before the minimum length
            k = 0
            while tok in sp["stop_ids"] and k < len(WORD_IDS):
                k += 1
                tok = gen_token(req.prompt, i + k)
        return tok

    def check_finish(self, req: Req) -> Optional[tuple]:
        sp = req.sp
        tok = req.out[-1]
        n = len(req.out)
        if self.kind == "sglang":
            if not sp["ignore_eos"] and (tok in sp["stop_ids"] or tok in EOS_IDS):
                return ("stop_token", tok)
            if sp["stop_strs"] and n >= sp["min_tokens"]:
                text = "".join(token_text(t) for t in req.out)
                for s in sp["stop_strs"]:
                    if s and s in text:
                        return ("stop_str", s)
            if n >= sp["max_tokens"]:
                return ("length", sp["max_tokens"])
            return None
        # vLLM
        if tok == EOS_ID and not sp["ignore_eos"]:
            return ("eos", tok)
        if tok in sp["stop_ids"]:
            return ("stop_token", tok)
        if sp["stop_strs"] and n >= sp["min_tokens"]:
            text = "".join(token_text(t) for t in req.out)
            for s in sp["stop_strs"]:
                if s and s in text:
                    return ("stop_str", s)
        if n >= sp["max_tokens"] or len(req.prompt) + n >= self.args.max_model_len:
            return ("length", sp["max_tokens"])
        return None

    def prefill(self, req: Req, publish: bool = True) -> None:
        """Match the prompt against the cache, then cache its full pages."""
        cache = req.rank.cache
        limit = len(req.prompt) - 1  # the last prompt token is always computed
        hit = cache.match(req.prompt, limit, req.ns, req.salt)
        req.cached_tokens = len(hit) * self.page_size
        self.cache_queries += len(req.prompt)
        self.cache_hits += req.cached_tokens
        self.total_prefill_uncached += len(req.prompt) - req.cached_tokens
        blocks = cache.insert(req.prompt, len(req.prompt), req.ns, req.salt, req.session_id)
        cache.lock(blocks)
        req.blocks = blocks
        req.cached_upto = (len(req.prompt) // self.page_size) * self.page_size
        if publish:
            req.rank.flush()

    def cache_progress(self, req: Req) -> None:
        """vLLM caches full blocks as soon as their tokens are computed."""
        if self.kind != "vllm":
            return
        computed = len(req.prompt) + len(req.out) - 1
        full = (computed // self.page_size) * self.page_size
        if full > req.cached_upto:
            seq = req.prompt + req.out
            blocks = req.rank.cache.insert(seq, full, req.ns, req.salt, req.session_id)
            new = blocks[len(req.blocks):]
            req.rank.cache.lock(new)
            req.blocks = req.blocks + new
            req.cached_upto = full
            req.rank.flush()

    def release(self, req: Req, checkpoint: bool = True) -> None:
        """Request end: SGLang inserts prompt+output (all but the last token)."""
        cache = req.rank.cache
        if self.kind == "sglang" and checkpoint and req.phase != "waiting":
            seq = req.prompt + req.out
            upto = len(req.prompt) + max(len(req.out) - 1, 0)
            blocks = cache.insert(seq, upto, req.ns, req.salt, req.session_id)
            cache.touch(blocks)
        cache.unlock(req.blocks)
        req.blocks = []
        req.rank.flush()

    async def decode_loop(self, req: Req) -> None:
        """Emit tokens until a finish; req.out may already hold tokens."""
        while True:
            if req.out:
                fin = self.check_finish(req)
                if fin is not None:
                    return self._finish(req, fin)
                if await wait_or_abort(req, self.args.itl_ms / 1000.0):
                    if self.kind == "sglang":
                        # a running request still runs one more decode step
                        tok = self.next_token(req, len(req.out))
                        req.out.append(tok)
                        req.emit([tok])
                        return self._finish(req, ("abort", "Aborted", None, None))
                    return self._finish(req, ("abort",))
            tok = self.next_token(req, len(req.out))
            req.out.append(tok)
            self.cache_progress(req)
            req.emit([tok])

    def _finish(self, req: Req, fin: tuple) -> None:
        req.phase = "done"
        self.after_finish(req, fin)
        req.end(fin)

    def after_finish(self, req: Req, fin: tuple) -> None:
        # vLLM P leg: hold the blocks for the decode side to read
        kvp = req.sp.get("kv_params")
        if (self.kind == "vllm" and self.args.kv_role and isinstance(kvp, dict)
                and kvp.get("do_remote_decode") and fin[0] in ("length", "eos", "stop_token", "stop_str")):
            tail_id = req.rank.cache.next_block_id
            req.rank.cache.next_block_id += 1
            block_ids = [b.block_id for b in req.blocks]
            total = len(req.prompt) + len(req.out)
            if total % self.page_size:
                block_ids.append(tail_id)
            internal = req.sp["internal_id"]
            params = {
                "do_remote_prefill": True, "do_remote_decode": False,
                "remote_block_ids": [block_ids], "remote_engine_id": self.engine_id,
                "remote_request_id": internal, "remote_host": self.args.side_channel_host or self.args.host,
                "remote_port": self.side_channel_port, "tp_size": 1, "dcp_size": 1, "pp_size": 1,
                "remote_num_tokens": len(req.prompt) + len(req.out) - 1,
                "remote_blocks_expiry_time": None, "remote_registration_generation": 0,
                "transfer_mode": "pull", "remote_prefill_cached_tokens": req.cached_tokens,
            }
            req.kv_transfer_params = params
            lease = {"req": req, "blocks": req.blocks, "tokens": list(req.prompt),
                     "expires": time.time() + self.args.kv_lease_duration, "block_ids": block_ids}
            self.leases[internal] = lease
            req.blocks = []  # now owned by the lease
            asyncio.get_running_loop().call_later(self.args.kv_lease_duration, self._expire_lease, internal)
            self.stats["prefill_leases"] += 1
            req.rank.flush()
            return
        self.release(req, checkpoint=not (fin[0] == "abort_waiting"))

    def _expire_lease(self, internal: str) -> None:
        lease = self.leases.pop(internal, None)
        if lease is not None:
            self.stats["prefill_leases_expired"] += 1
            lease["req"].rank.cache.unlock(lease["blocks"])
            lease["req"].rank.flush()

    def new_req(self, rank: Rank, rid: str, prompt: list[int], sp: dict, stream: bool) -> Req:
        req = Req(self, rank, rid, prompt, sp, stream)
        self.reqs[rid] = req
        self.stats["requests"] += 1
        return req

    def forget(self, req: Req) -> None:
        if self.reqs.get(req.rid) is req:
            del self.reqs[req.rid]

    async def run_guarded(self, req: Req, flow) -> None:
        req.rank.waiting += 1
        counted_running = False
        try:
            await flow(req)
        except asyncio.CancelledError:
            if not req.done:
                req.end(("abort", "Aborted", None, None))
            raise
        except Exception as e:  # pragma: no cover - defensive
            sys.stderr.write(f"fake_engine: request {req.rid} crashed: {e!r}\n")
            if not req.done:
                req.end(("abort", f"internal error: {e}", 500, None))
        finally:
            if req.phase == "waiting":
                req.rank.waiting -= 1
            else:
                req.rank.running -= 1
            if req.finish and req.finish[0] in ("abort", "abort_waiting"):
                self.stats["aborts"] += 1
            self.forget(req)

    def to_running(self, req: Req) -> None:
        if req.phase == "waiting":
            req.rank.waiting -= 1
            req.rank.running += 1
            req.phase = "running"

    async def flow_aggregated(self, req: Req) -> None:
        if await wait_or_abort(req, self.args.ttft_ms / 1000.0):
            return self._finish_waiting_abort(req)
        self.to_running(req)
        self.prefill(req)
        await self.decode_loop(req)

    def _finish_waiting_abort(self, req: Req, msg: Optional[str] = None) -> None:
        if self.kind == "vllm":
            fin: tuple = ("abort",)
        else:
            fin = ("abort_waiting", msg or req.abort_msg or "Abort in waiting queue")
        self.release(req, checkpoint=False)
        req.end(fin)

    # -- SGLang PD ---------------------------------------------------------
    def room_entry(self, room: int) -> dict:
        ent = self.rooms.get(room)
        if ent is None:
            loop = asyncio.get_running_loop()
            ent = {"ready": loop.create_future(), "fetched": loop.create_future(), "created": time.time()}
            self.rooms[room] = ent
        return ent

    async def flow_sgl_prefill(self, req: Req) -> None:
        room = req.sp["bootstrap_room"]
        fake = req.sp.get("bootstrap_host") == "2.2.2.2"
        if not req.rid.startswith("HEALTH_CHECK"):
            self.stats["prefill_legs"] += 1
        if await wait_or_abort(req, self.args.ttft_ms / 1000.0):
            return self._finish_waiting_abort(req)
        self.to_running(req)
        self.prefill(req)
        first = self.next_token(req, 0)
        req.out.append(first)
        if fake:
            return self._finish(req, ("length", 0))
        ent = self.room_entry(room)
        if not ent["ready"].done():
            ent["ready"].set_result({"prompt": list(req.prompt), "first_token": first,
                                     "cached_tokens": req.cached_tokens, "rid": req.rid})
        abort_wait = asyncio.ensure_future(req.abort_evt.wait())
        try:
            done, _ = await asyncio.wait({ent["fetched"], abort_wait}, timeout=self.args.bootstrap_timeout,
                                         return_when=asyncio.FIRST_COMPLETED)
        finally:
            abort_wait.cancel()
        self.rooms.pop(room, None)
        if ent["fetched"] in done and ent["fetched"].result() == "ok":
            self.stats["transfers_sent"] += 1
            return self._finish(req, ("length", 0))
        if abort_wait in done:
            return self._finish(req, ("abort", "Aborted", None, None))
        if ent["fetched"].done():
            why = f"KVTransferError(bootstrap_room={room}): decode side aborted the transfer"
            msg = f"Prefill transfer failed for request rank=0 req.rid={req.rid!r} req.bootstrap_room={room} with exception {why}"
        else:
            why = (f"KVTransferError(bootstrap_room={room}): Request {room} timed out after "
                   f"{float(self.args.bootstrap_timeout)}s in KVPoll.Bootstrapping")
            msg = f"Prefill bootstrap failed for request rank=0 req.rid={req.rid!r} req.bootstrap_room={room} with exception {why}"
        self.stats["transfers_failed"] += 1
        return self._finish(req, ("abort", msg, 500, None))

    async def flow_sgl_decode(self, req: Req) -> None:
        room = req.sp["bootstrap_room"]
        host = req.sp.get("bootstrap_host")
        port = req.sp.get("bootstrap_port") or self.args.disaggregation_bootstrap_port
        if not req.rid.startswith("HEALTH_CHECK"):
            self.stats["decode_legs"] += 1
        if host == "2.2.2.2":
            if await wait_or_abort(req, self.args.ttft_ms / 1000.0):
                return self._finish_waiting_abort(req)
            self.to_running(req)
            return await self.decode_loop(req)
        fetch = asyncio.ensure_future(self._fetch_room(host, port, room, req.rid))
        abort_wait = asyncio.ensure_future(req.abort_evt.wait())
        done, _ = await asyncio.wait({fetch, abort_wait}, return_when=asyncio.FIRST_COMPLETED)
        if abort_wait in done and fetch not in done:
            fetch.cancel()
            asyncio.ensure_future(self._abort_room(host, port, room))
            return self._finish_waiting_abort(req)
        abort_wait.cancel()
        try:
            data = fetch.result()
        except Exception as e:  # handshake failure
            self.stats["transfers_failed"] += 1
            msg = (f"Decode handshake failed for request rank=0 decode_req.req.rid={req.rid!r} "
                   f"decode_req.req.bootstrap_room={room} with exception "
                   f"KVTransferError(bootstrap_room={room}): {e}")
            req.phase = "done"
            return req.end(("abort", msg, 500, None))
        self.stats["transfers_received"] += 1
        if data["prompt"] != req.prompt:
            self.stats["transfer_prompt_mismatch"] += 1
        self.to_running(req)
        req.cached_tokens = data["cached_tokens"]
        cache = req.rank.cache
        if cache.enabled:
            blocks = cache.insert(req.prompt, len(req.prompt), req.ns, req.salt, req.session_id)
            cache.lock(blocks)
            req.blocks = blocks
            req.rank.flush()
        req.out.append(data["first_token"])
        req.emit([data["first_token"]])
        await self.decode_loop(req)

    async def _fetch_room(self, host, port, room, rid) -> dict:
        if not host:
            raise RuntimeError("no bootstrap_host")
        url = f"http://{host}:{port}/fake_kv/{room}"
        timeout = self.args.bootstrap_timeout
        try:
            async with self.http.get(url, params={"timeout": str(timeout), "rid": rid},
                                     timeout=ClientTimeout(total=timeout + 5)) as r:
                if r.status != 200:
                    raise RuntimeError(f"Request {room} timed out after {float(timeout)}s in KVPoll.WaitingForInput"
                                       if r.status == 408 else f"bootstrap server answered {r.status}")
                return await r.json()
        except (OSError, asyncio.TimeoutError) as e:
            raise RuntimeError(f"Failed to reach bootstrap server {host}:{port}: {e!r}")

    async def _abort_room(self, host, port, room) -> None:
        try:
            async with self.http.post(f"http://{host}:{port}/fake_kv/{room}/abort",
                                      timeout=ClientTimeout(total=5)) as r:
                await r.read()
        except Exception:
            pass

    # -- vLLM PD -----------------------------------------------------------
    async def flow_vllm(self, req: Req) -> None:
        kvp = req.sp.get("kv_params") if self.args.kv_role else None
        if not isinstance(kvp, dict):
            kvp = None
        if kvp and kvp.get("do_remote_prefill"):
            self.stats["decode_legs"] += 1
            read = asyncio.ensure_future(self._nixl_read(kvp, req.prompt))
            abort_wait = asyncio.ensure_future(req.abort_evt.wait())
            done, _ = await asyncio.wait({read, abort_wait}, return_when=asyncio.FIRST_COMPLETED)
            if abort_wait in done and read not in done:
                read.cancel()
                return self._finish_waiting_abort(req)
            abort_wait.cancel()
            try:
                data = read.result()
            except Exception as e:
                self.stats["transfers_failed"] += 1
                self.stats["last_transfer_error"] = 1
                sys.stderr.write(f"fake_engine: KV load failed for {req.rid}: {e}\n")
                req.phase = "done"
                return req.end(("error",))
            self.stats["transfers_received"] += 1
            if data["token_ids"] != req.prompt:
                self.stats["transfer_prompt_mismatch"] += 1
            self.to_running(req)
            cache = req.rank.cache
            blocks = cache.insert(req.prompt, len(req.prompt), req.ns, req.salt, req.session_id)
            cache.lock(blocks)
            req.blocks = blocks
            req.cached_upto = (len(req.prompt) // self.page_size) * self.page_size
            cached = kvp.get("remote_prefill_cached_tokens")
            req.cached_tokens = cached if isinstance(cached, int) and not isinstance(cached, bool) else len(req.prompt)
            req.rank.flush()
            return await self.decode_loop(req)
        if kvp and kvp.get("do_remote_decode"):
            self.stats["prefill_legs"] += 1
        else:
            self.stats["aggregated_legs"] += 1
        await self.flow_aggregated(req)

    async def _nixl_read(self, kvp: dict, prompt: list[int]) -> dict:
        for k in ("remote_engine_id", "remote_request_id", "remote_host", "remote_port"):
            if kvp.get(k) is None:
                raise RuntimeError(f"kv_transfer_params lacks {k}")
        url = f"http://{kvp['remote_host']}:{kvp['remote_port']}/fake_nixl/read"
        body = {"remote_engine_id": kvp["remote_engine_id"], "remote_request_id": kvp["remote_request_id"],
                "remote_block_ids": kvp.get("remote_block_ids")}
        async with self.http.post(url, json=body, timeout=ClientTimeout(total=30)) as r:
            data = await r.json()
            if r.status != 200:
                raise RuntimeError(data.get("error", f"side channel answered {r.status}"))
            return data


# ---------------------------------------------------------------------------
# HTTP helpers
# ---------------------------------------------------------------------------
def jdump(obj) -> str:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)


def jresp(obj, status=200) -> web.Response:
    return web.Response(text=jdump(obj), status=status, content_type="application/json")


async def read_json(request: web.Request):
    raw = await request.read()
    try:
        return json.loads(raw) if raw else None, raw
    except (ValueError, UnicodeDecodeError):
        return ValueError, raw


async def start_sse(request: web.Request) -> web.StreamResponse:
    resp = web.StreamResponse(status=200, headers={"Content-Type": "text/event-stream; charset=utf-8",
                                                   "Cache-Control": "no-cache"})
    await resp.prepare(request)
    return resp


class ClientGone(Exception):
    pass


async def sse_write(resp: web.StreamResponse, data: str) -> None:
    try:
        await resp.write(f"data: {data}\n\n".encode("utf-8"))
    except (ConnectionResetError, RuntimeError, OSError) as e:
        raise ClientGone() from e


async def drain(req: Req) -> tuple[list[list[int]], bool]:
    await req.wake.wait()
    req.wake.clear()
    deltas, req.pending = req.pending, []
    return deltas, req.done


# ---------------------------------------------------------------------------
# SGLang HTTP API
# ---------------------------------------------------------------------------
SGL_SP_FIELDS = (
    "max_new_tokens", "stop", "stop_token_ids", "stop_regex", "temperature", "top_p", "top_k", "min_p",
    "frequency_penalty", "presence_penalty", "repetition_penalty", "min_new_tokens", "n", "json_schema",
    "regex", "ebnf", "structural_tag", "ignore_eos", "skip_special_tokens", "spaces_between_special_tokens",
    "no_stop_trim", "stream_interval", "logit_bias", "sampling_seed", "custom_params", "beam_width",
    "watermark", "choice",
)
_SGL_INT = {"max_new_tokens", "top_k", "min_new_tokens", "n", "stream_interval", "sampling_seed", "beam_width"}
_SGL_FLOAT = {"temperature", "top_p", "min_p", "frequency_penalty", "presence_penalty", "repetition_penalty"}
_SGL_BOOL = {"ignore_eos", "skip_special_tokens", "spaces_between_special_tokens", "no_stop_trim"}
_SGL_STR = {"json_schema", "regex", "ebnf", "structural_tag"}


class ContractError(ValueError):
    pass


def _unexpected(v) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return f"boolean `{'true' if v else 'false'}`"
    if isinstance(v, int):
        return f"integer `{v}`"
    if isinstance(v, float):
        return f"floating point `{v}`"
    if isinstance(v, str):
        return f'string "{v}"'
    if isinstance(v, list):
        return "sequence"
    if isinstance(v, dict):
        return "map"
    return type(v).__name__


def _is_int(v):
    return isinstance(v, int) and not isinstance(v, bool)


def sgl_contract_check(body) -> None:
    """The JSON contract SGLang checks /generate bodies against (api_types.py):
    top-level unknown keys ignored, sampling_params unknown keys rejected."""
    if not isinstance(body, dict):
        raise ContractError(f"invalid type: {_unexpected(body)}, expected struct GenerateRequest")
    sp = body.get("sampling_params")
    sps = sp if isinstance(sp, list) else ([sp] if sp is not None else [])
    if sp is not None and not isinstance(sp, (list, dict)):
        raise ContractError(f"invalid type: {_unexpected(sp)}, expected a value or an array of values for SamplingParamsOrList")
    for one in sps:
        if not isinstance(one, dict):
            raise ContractError(f"invalid type: {_unexpected(one)}, expected struct SamplingParams")
        for k, x in one.items():
            if k not in SGL_SP_FIELDS:
                listed = ", ".join(f"`{f}`" for f in SGL_SP_FIELDS)
                raise ContractError(f"unknown field `{k}`, expected one of {listed}")
            if x is None:
                continue
            if k in _SGL_INT and not _is_int(x):
                raise ContractError(f"invalid type: {_unexpected(x)}, expected i64")
            if k in _SGL_FLOAT and not (isinstance(x, (int, float)) and not isinstance(x, bool)):
                raise ContractError(f"invalid type: {_unexpected(x)}, expected f64")
            if k in _SGL_BOOL and not isinstance(x, bool):
                raise ContractError(f"invalid type: {_unexpected(x)}, expected a boolean")
            if k in _SGL_STR and not isinstance(x, str):
                raise ContractError(f"invalid type: {_unexpected(x)}, expected a string")
            if k == "stop_token_ids":
                if not isinstance(x, list):
                    raise ContractError(f"invalid type: {_unexpected(x)}, expected a sequence")
                for e in x:
                    if not _is_int(e):
                        raise ContractError(f"invalid type: {_unexpected(e)}, expected i64")
            if k in ("stop", "stop_regex"):
                if isinstance(x, list):
                    for e in x:
                        if not isinstance(e, str):
                            raise ContractError(f"invalid type: {_unexpected(e)}, expected a string")
                elif not isinstance(x, str):
                    raise ContractError(f"invalid type: {_unexpected(x)}, expected a value or an array of values for StringOrList")
    for k in ("stream", "return_text_in_logprobs", "require_reasoning", "return_prompt_token_ids"):
        if k in body and body[k] is not None and not isinstance(body[k], bool):
            raise ContractError(f"invalid type: {_unexpected(body[k])}, expected a boolean")
    ids = body.get("input_ids")
    if ids is not None:
        if not isinstance(ids, list):
            raise ContractError(f"invalid type: {_unexpected(ids)}, expected a value or an array of values for TokenIdsOrList")
    for k in ("bootstrap_port", "bootstrap_room", "routed_dp_rank", "priority"):
        x = body.get(k)
        if x is not None and not _is_int(x) and not isinstance(x, list):
            raise ContractError(f"invalid type: {_unexpected(x)}, expected i64")


def sgl_error_response(message: str, status: int = 400) -> web.Response:
    # fastapi validation / HTTPException shape (ErrorResponse)
    phrase = "Bad Request" if status == 400 else str(status)
    return jresp({"object": "error", "message": message, "type": phrase, "param": None, "code": status}, status)


def sgl_finish_json(fin: Optional[tuple]):
    if fin is None:
        return None
    k = fin[0]
    if k == "length":
        return {"type": "length", "length": fin[1]}
    if k in ("stop_token", "stop_str"):
        return {"type": "stop", "matched": fin[1]}
    if k == "abort":
        return {"type": "abort", "message": fin[1], "status_code": fin[2], "err_type": fin[3]}
    if k == "abort_waiting":
        return {"type": "abort", "message": fin[1]}
    return None


class SGLangAPI:
    def __init__(self, eng: Engine):
        self.eng = eng
        self.a = eng.args

    def routes(self, app: web.Application) -> None:
        r = app.router
        r.add_route("POST", "/generate", self.generate)
        r.add_route("PUT", "/generate", self.generate)
        r.add_post("/abort_request", self.abort_request)
        r.add_get("/health", self.health)
        r.add_get("/health_generate", self.health_generate)
        r.add_get("/ready", self.health)
        r.add_get("/server_info", self.server_info)
        r.add_get("/get_server_info", self.server_info)
        r.add_get("/model_info", self.model_info)
        r.add_get("/get_model_info", self.model_info)
        r.add_get("/v1/loads", self.loads)
        r.add_get("/v1/models", self.models)
        r.add_route("*", "/flush_cache", self.flush_cache)

    def text_of(self, req: Req, toks: list[int], final: bool) -> str:
        fin = req.finish
        toks = list(toks)
        if final and fin and fin[0] == "stop_token" and toks and not req.sp["no_stop_trim"]:
            toks = toks[:-1]
        text = "".join(token_text(t, req.sp["skip_special"]) for t in toks)
        if final and fin and fin[0] == "stop_str":
            pos = text.find(fin[1])
            if pos >= 0:
                text = text[:pos + len(fin[1])] if req.sp["no_stop_trim"] else text[:pos]
        return text

    def meta(self, req: Req, finished: bool) -> dict:
        fin = req.finish if finished else None
        if finished and fin and fin[0] == "abort_waiting":
            return {"id": req.rid, "finish_reason": sgl_finish_json(fin), "weight_version": "default",
                    "e2e_latency": time.time() - req.created, "completion_tokens": len(req.out)}
        m = {"id": req.rid, "finish_reason": sgl_finish_json(fin), "prompt_tokens": len(req.prompt),
             "weight_version": "default", "num_retractions": 0, "reasoning_tokens": 0,
             "completion_tokens": len(req.out), "cached_tokens": req.cached_tokens, "dp_rank": req.rank.idx}
        if finished:
            m["e2e_latency"] = time.time() - req.created
        return m

    def out_obj(self, req: Req, ids: list[int], text: Optional[str], meta: dict) -> dict:
        o = {}
        if not self.a.skip_tokenizer_init:
            o["text"] = text if text is not None else ""
        o["output_ids"] = ids
        o["meta_info"] = meta
        if req.sp.get("return_prompt_token_ids"):
            o["prompt_token_ids"] = list(req.prompt)
        return o

    async def generate(self, request: web.Request):
        eng = self.eng
        body, raw = await read_json(request)
        eng.last_requests.append({"path": request.path, "ts": time.time(), "body": body if body is not ValueError else raw.decode("utf-8", "replace"),
                                  "headers": recorded_headers(request)})
        if body is ValueError:
            return sgl_error_response("1 validation error: JSON decode error")
        if not isinstance(body, dict):
            return sgl_error_response(f"Input should be a valid dictionary or object to extract fields from")
        try:
            sgl_contract_check(body)
        except ContractError as e:
            return jresp({"error": str(e)}, 400)
        stream = bool(body.get("stream") or False)
        rid = body.get("rid")
        if isinstance(rid, list) or isinstance(body.get("input_ids"), list) and body["input_ids"] and isinstance(body["input_ids"][0], list):
            return await self._value_error(stream, "fake engine: batch requests are not supported")
        rid = rid or uuid.uuid4().hex
        ids = body.get("input_ids")
        if ids is None:
            if body.get("text") is not None and self.a.skip_tokenizer_init:
                return await self._value_error(stream, "The engine initialized with skip_tokenizer_init=True cannot accept text prompts. Please provide input_ids or re-initialize the engine with skip_tokenizer_init=False.")
            if body.get("text") is not None:
                return await self._value_error(stream, "fake engine: text prompts are not supported; send input_ids")
            return await self._value_error(stream, "Either text, input_ids or input_embeds should be provided.")
        sp_in = body.get("sampling_params") or {}
        try:
            sp = self.normalize_sp(sp_in)
        except ValueError as e:
            return await self._value_error(stream, str(e))
        sp["return_prompt_token_ids"] = bool(body.get("return_prompt_token_ids"))
        if rid in eng.reqs:
            return await self._value_error(stream, f"Duplicate request ID detected: {rid}")
        rank = eng.pick_rank(body.get("routed_dp_rank", body.get("data_parallel_rank")))
        req = eng.new_req(rank, rid, list(ids), sp, stream)
        req.salt = body.get("cache_salt")
        req.ns = (body.get("extra_key"), req.salt)
        req.session_id = body.get("session_id")
        mode = eng.mode
        if mode != "null":
            sp["bootstrap_room"] = body.get("bootstrap_room")
            sp["bootstrap_host"] = body.get("bootstrap_host")
            sp["bootstrap_port"] = body.get("bootstrap_port")
            if sp["bootstrap_room"] is None and self.a.disaggregation_transfer_backend != "fake":
                msg = f"Invalid request: Disaggregated request received without bootstrap room id. req.rid={rid!r}"
                eng.stats["refused_legs"] += 1
                req.phase = "done"
                req.end(("abort", msg, 400, None))
                flow = None
            else:
                flow = eng.flow_sgl_prefill if mode == "prefill" else eng.flow_sgl_decode
        else:
            eng.stats["aggregated_legs"] += 1
            flow = eng.flow_aggregated
        if flow is not None:
            req.task = asyncio.ensure_future(eng.run_guarded(req, flow))
        try:
            if stream:
                return await self.stream_response(request, req)
            return await self.full_response(req)
        finally:
            if req.done:
                eng.forget(req)

    async def _value_error(self, stream: bool, msg: str, request=None):
        if stream:
            return _SSEPrepared([jdump({"error": {"message": msg, "type": "invalid_request_error", "code": 400, "retryable": False}}), "[DONE]"])
        return jresp({"error": {"message": msg}}, 400)

    def normalize_sp(self, sp: dict) -> dict:
        mx = sp.get("max_new_tokens")
        mx = 128 if mx is None else mx
        mn = sp.get("min_new_tokens") or 0
        if mx < 0:
            raise ValueError(f"max_new_tokens must be at least 0, got {mx}.")
        if mn < 0 or mn > mx:
            raise ValueError(f"min_new_tokens must be in [0, max_new_tokens({mx})], got {mn}.")
        t = sp.get("temperature")
        if t is not None and t < 0:
            raise ValueError(f"temperature must be a non-negative finite number, got {t}.")
        tp = sp.get("top_p")
        if tp is not None and not (0 < tp <= 1):
            raise ValueError(f"top_p must be in (0, 1], got {tp}.")
        stop = sp.get("stop")
        stop_strs = [stop] if isinstance(stop, str) else list(stop or [])
        if stop_strs and self.a.skip_tokenizer_init:
            stop_strs = []  # no tokenizer: stop strings are never matched
        return {"max_tokens": mx, "min_tokens": mn, "stop_ids": set(sp.get("stop_token_ids") or []),
                "ignore_eos": bool(sp.get("ignore_eos") or False), "stop_strs": stop_strs,
                "no_stop_trim": bool(sp.get("no_stop_trim") or False),
                "skip_special": sp.get("skip_special_tokens") is not False}

    async def full_response(self, req: Req):
        try:
            await asyncio.shield(req.finished_fut)
        except asyncio.CancelledError:
            req.request_abort()
            raise
        fin = req.finish
        if fin and fin[0] == "abort" and fin[2] is not None and 400 <= fin[2] < 600:
            if fin[2] == 400:
                return jresp({"error": {"message": fin[1]}}, 400)
            return sgl_error_response(fin[1], fin[2])
        meta = self.meta(req, True)
        meta["response_sent_to_client_ts"] = time.time()
        return jresp(self.out_obj(req, list(req.out), self.text_of(req, req.out, True), meta))

    async def stream_response(self, request: web.Request, req: Req):
        resp = await start_sse(request)
        incremental = self.a.incremental_streaming_output
        first = True
        sent_text = ""
        try:
            while True:
                deltas, finished = await drain(req)
                fin = req.finish if finished else None
                if finished and fin and fin[0] == "abort_waiting":
                    ids = ([req.out[-1]] if req.out else []) if incremental else list(req.out)
                    meta = self.meta(req, True)
                    text = ""
                elif incremental:
                    ids = [t for d in deltas for t in d]
                    meta = self.meta(req, finished)
                    full = self.text_of(req, req.out, finished)
                    text = full[len(sent_text):] if full.startswith(sent_text) else ""
                    sent_text = full
                    if not ids and not finished:
                        continue
                else:
                    if not any(deltas) and not finished:
                        continue
                    ids = list(req.out)
                    meta = self.meta(req, finished)
                    text = self.text_of(req, req.out, finished)
                if first:
                    meta["response_sent_to_client_ts"] = time.time()
                    first = False
                await sse_write(resp, jdump(self.out_obj(req, ids, text, meta)))
                if finished:
                    break
            await sse_write(resp, "[DONE]")
        except (ClientGone, asyncio.CancelledError):
            self.eng.stats["client_disconnects"] += 1
            self.abort_rid(req.rid)
            raise asyncio.CancelledError()
        return resp

    def abort_rid(self, rid: str, abort_all: bool = False) -> int:
        n = 0
        if abort_all:
            targets = list(self.eng.reqs.values())
        else:
            if not rid or rid not in self.eng.reqs:
                return 0
            # the scheduler matches by prefix
            targets = [r for k, r in self.eng.reqs.items() if k.startswith(rid)]
        for r in targets:
            if not r.done:
                r.request_abort()
                n += 1
        return n

    async def abort_request(self, request: web.Request):
        body, raw = await read_json(request)
        self.eng.last_requests.append({"path": request.path, "ts": time.time(), "body": body if body is not ValueError else None, "headers": {}})
        if not isinstance(body, dict):
            return sgl_error_response("Input should be a valid dictionary")
        self.eng.stats["abort_requests"] += 1
        self.abort_rid(body.get("rid") or "", bool(body.get("abort_all")))
        return web.Response(status=200)

    async def health(self, request):
        return web.Response(status=200)

    async def health_generate(self, request):
        # a one-token generation (input_ids=[0]); PD servers use the fake bootstrap host
        eng = self.eng
        rid = f"HEALTH_CHECK_{uuid.uuid4().hex}"
        sp = self.normalize_sp({"max_new_tokens": 1, "temperature": 0.0})
        req = Req(eng, eng.ranks[0], rid, [0], sp, False)
        if eng.mode != "null":
            sp.update(bootstrap_room=0, bootstrap_host="2.2.2.2", bootstrap_port=None)
            flow = eng.flow_sgl_prefill if eng.mode == "prefill" else eng.flow_sgl_decode
        else:
            flow = eng.flow_aggregated
        req.rank.waiting += 1
        try:
            await asyncio.wait_for(flow(req), 20)
        except asyncio.TimeoutError:
            return web.Response(status=503)
        finally:
            if req.phase == "waiting":
                req.rank.waiting -= 1
            else:
                req.rank.running -= 1
        return web.Response(status=200)

    def kv_events_block(self) -> Optional[dict]:
        eng = self.eng
        if not self.a.kv_events or self.a.page_size <= 0:
            return None
        d = {"publisher": "zmq", "endpoint_host": "*", "endpoint_port_base": eng.kv_port,
             "topic": self.a.topic, "block_size": self.a.page_size, "dp_size": self.a.dp_size}
        if eng.replay_port is not None:
            d["replay_endpoint_port_base"] = eng.replay_port
        return d

    def kv_events_config_str(self) -> Optional[str]:
        eng = self.eng
        if not self.a.kv_events:
            return None
        cfg = {"publisher": "zmq", "endpoint": f"tcp://*:{eng.kv_port}", "topic": self.a.topic,
               "buffer_steps": self.a.buffer_steps}
        if eng.replay_port is not None:
            cfg["replay_endpoint"] = f"tcp://*:{eng.replay_port}"
        return json.dumps(cfg)

    async def server_info(self, request):
        eng, a = self.eng, self.a
        info = {
            "model_path": a.model_path, "tokenizer_path": a.model_path,
            "served_model_name": eng.model, "host": a.host, "port": eng.port,
            "skip_tokenizer_init": a.skip_tokenizer_init, "page_size": a.page_size,
            "tp_size": 1, "pp_size": 1, "dp_size": a.dp_size, "dcp_size": 1,
            "context_length": a.max_model_len, "stream_interval": 1,
            "incremental_streaming_output": a.incremental_streaming_output,
            "disaggregation_mode": eng.mode,
            "disaggregation_transfer_backend": a.disaggregation_transfer_backend,
            "disaggregation_bootstrap_port": eng.bootstrap_port if eng.bootstrap_port else a.disaggregation_bootstrap_port,
            "disaggregation_decode_enable_radix_cache": a.disaggregation_decode_enable_radix_cache,
            "kv_events_config": self.kv_events_config_str(),
            "weight_version": "default",
            "launch_command": " ".join(sys.argv),
            "max_total_num_tokens": a.capacity_blocks * a.page_size,
            "max_req_input_len": a.max_model_len - 1,
            "kv_events": self.kv_events_block(),
            "startup_time": eng.startup_time,
            "internal_states": [{"dp_rank": r.idx, "last_gen_throughput": 0.0,
                                 "avg_spec_accept_length": None} for r in eng.ranks],
            "version": SGLANG_VERSION,
            "frontend": "python",
        }
        return jresp(info)

    async def model_info(self, request):
        a = self.a
        return jresp({
            "model_path": a.model_path, "served_model_name": self.eng.model, "tokenizer_path": a.model_path,
            "is_generation": True, "preferred_sampling_params": None, "weight_version": "default",
            "load_format": "auto", "reasoning_parser": None, "tool_call_parser": None,
            "disaggregation_mode": self.eng.mode, "has_image_understanding": False,
            "has_audio_understanding": False, "model_type": "qwen3", "architectures": ["Qwen3ForCausalLM"],
        })

    async def models(self, request):
        return jresp({"object": "list", "data": [{
            "id": self.eng.model, "object": "model", "created": int(time.time()), "owned_by": "sglang",
            "root": self.eng.model, "parent": None, "max_model_len": self.a.max_model_len}]})

    async def loads(self, request):
        eng, a = self.eng, self.a
        include = request.query.get("include")
        inc = set(s.strip() for s in include.split(",")) if include else None
        valid = {"core", "memory", "spec", "lora", "disagg", "queues", "all"}
        if inc is not None and not inc <= valid:
            return sgl_error_response(f"Invalid include sections: {inc - valid}. Valid options: {sorted(valid)}", 400)
        dp = request.query.get("dp_rank")
        loads = []
        for r in eng.ranks:
            if dp is not None and str(r.idx) != dp:
                continue
            cap = a.capacity_blocks * a.page_size
            running_tokens = sum(len(q.prompt) + len(q.out) for q in eng.reqs.values() if q.rank is r and q.phase == "running")
            used = len(r.cache.blocks) * a.page_size + running_tokens
            d = {"timestamp": time.time(), "dp_rank": r.idx, "num_running_reqs": r.running,
                 "num_waiting_reqs": r.waiting, "num_waiting_uncached_tokens": 0, "num_used_tokens": used,
                 "num_total_tokens": used, "num_active_tokens": used, "num_prealloc_ready_tokens": 0,
                 "max_total_num_tokens": cap, "max_running_requests": 4096,
                 "token_usage": round(used / cap, 4) if cap else 0.0, "gen_throughput": 0.0,
                 "cache_hit_rate": (eng.cache_hits / eng.cache_queries) if eng.cache_queries else 0.0,
                 "utilization": 0.0, "total_prefill_uncached_tokens": eng.total_prefill_uncached,
                 "total_prefill_busy_us": 0, "decode_moments": None}
            if inc is None or "all" in inc or inc != {"core"}:
                if inc is None or "all" in inc or "memory" in inc:
                    d["memory"] = {"weight_gb": 0.0, "kv_cache_gb": 0.0, "graph_gb": 0.0, "token_capacity": cap}
                if eng.mode != "null" and (inc is None or "all" in inc or "disagg" in inc):
                    d["disaggregation"] = {"mode": eng.mode, "prefill_bootstrap_queue_reqs": 0,
                                           "prefill_inflight_queue_reqs": 0, "decode_prealloc_queue_reqs": 0,
                                           "decode_transfer_queue_reqs": 0, "decode_retracted_queue_reqs": 0,
                                           "kv_transfer_speed_gb_s": 0.0, "kv_transfer_latency_ms": 0.0}
                if inc is None or "all" in inc or "queues" in inc:
                    d["queues"] = {"waiting": r.waiting, "grammar": 0, "paused": 0, "retracted": 0,
                                   "prealloc_ready": 0}
            loads.append(d)
        from datetime import datetime, timezone
        return jresp({"timestamp": datetime.now(timezone.utc).isoformat(), "version": SGLANG_VERSION,
                      "accelerator": None, "num_accelerators": 1, "loads": loads})

    async def flush_cache(self, request):
        if self.eng.reqs:
            return web.Response(text="Flush cache failed.\n", status=400)
        for r in self.eng.ranks:
            if r.cache.enabled:
                r.cache.clear()
                r.flush()
        return web.Response(text="Cache flushed.\nPlease check backend logs for more details. "
                                 "(When there are running or waiting requests, the operation will not be performed.)\n")


class _SSEPrepared(web.StreamResponse):
    """A stream response whose whole body is known up front (error chunks)."""

    def __init__(self, datas: list[str]):
        super().__init__(status=200, headers={"Content-Type": "text/event-stream; charset=utf-8"})
        self._datas = datas

    async def prepare(self, request):
        w = await super().prepare(request)
        for d in self._datas:
            await self.write(f"data: {d}\n\n".encode("utf-8"))
        await self.write_eof()
        return w


# ---------------------------------------------------------------------------
# vLLM HTTP API
# ---------------------------------------------------------------------------
def vllm_error(message: str, err_type: str = "BadRequestError", status: int = 400, param=None) -> web.Response:
    return jresp({"error": {"message": message, "type": err_type, "param": param, "code": status}}, status)


def vllm_finish(fin: Optional[tuple]) -> tuple[Optional[str], Any]:
    if fin is None:
        return None, None
    k = fin[0]
    if k == "length":
        return "length", None
    if k == "eos":
        return "stop", None
    if k in ("stop_token", "stop_str"):
        return "stop", fin[1]
    if k in ("abort", "abort_waiting"):
        return "abort", None
    if k == "error":
        return "error", None
    return None, None


class VLLMAPI:
    def __init__(self, eng: Engine):
        self.eng = eng
        self.a = eng.args
        self.scale_out = self.a.tokens_only or self.a.enable_scale_out

    def routes(self, app: web.Application) -> None:
        r = app.router
        if self.scale_out:
            r.add_post("/inference/v1/generate", self.generate)
            r.add_post("/inference/v1/abort_requests", self.abort_requests)
            if self.a.tokens_only:
                r.add_post("/abort_requests", self.abort_requests)
        else:
            r.add_post("/inference/v1/generate", self.disabled)
            r.add_post("/inference/v1/abort_requests", self.disabled)
        r.add_post("/v1/completions", self.completions)
        r.add_get("/health", self.health)
        r.add_get("/ping", self.health)
        r.add_get("/load", self.load)
        r.add_get("/version", self.version)
        r.add_get("/kv_event_sources", self.kv_event_sources)
        r.add_get("/v1/models", self.models)

    async def disabled(self, request):
        return vllm_error("Scale-out endpoints are disabled. Restart vllm serve with --enable-scale-out to enable them.",
                          "PermissionDeniedError", 403)

    async def health(self, request):
        return web.Response(status=200)

    async def version(self, request):
        return jresp({"version": VLLM_VERSION})

    async def load(self, request):
        return jresp({"server_load": self.eng.server_load})

    async def kv_event_sources(self, request):
        eng = self.eng
        if not self.a.kv_events:
            return jresp({})
        out = {}
        for r in eng.ranks:
            out[str(r.idx)] = {
                "enable_kv_cache_events": True, "publisher": "zmq",
                "endpoint": f"tcp://*:{eng.kv_port + r.idx}",
                "replay_endpoint": None if eng.replay_port is None else f"tcp://*:{eng.replay_port + r.idx}",
                "buffer_steps": self.a.buffer_steps, "hwm": 100000, "max_queue_size": 100000,
                "topic": self.a.topic,
            }
        return jresp(out)

    async def models(self, request):
        now = int(time.time())
        return jresp({"object": "list", "data": [{
            "id": self.eng.model, "object": "model", "created": now, "owned_by": "vllm",
            "root": self.a.model_path, "parent": None, "max_model_len": self.a.max_model_len,
            "permission": [{"id": f"modelperm-{uuid.uuid4().hex}", "object": "model_permission",
                            "created": now, "allow_create_engine": False, "allow_sampling": True,
                            "allow_logprobs": True, "allow_search_indices": False, "allow_view": True,
                            "allow_fine_tuning": False, "organization": "*", "group": None,
                            "is_blocking": False}]}]})

    def check_model(self, model) -> Optional[web.Response]:
        if model and model != self.eng.model:
            return vllm_error(f"The model `{model}` does not exist. Valid aliases: {self.eng.model}.",
                              "NotFoundError", 404, "model")
        return None

    def parse_sp(self, sp: dict, prompt_len: int, max_default: Optional[int]) -> dict:
        if not isinstance(sp, dict):
            raise ValueError("sampling_params: Input should be a valid dictionary")
        mx = sp.get("max_tokens", None)
        if mx is None:
            mx = max_default if max_default is not None else self.a.max_model_len - prompt_len
        mx = min(mx, self.a.max_model_len - prompt_len)
        if mx < 1:
            raise ValueError(f"max_tokens must be at least 1, got {mx}.")
        mn = sp.get("min_tokens") or 0
        stop = sp.get("stop")
        stop_strs = [stop] if isinstance(stop, str) else list(stop or [])
        stop_ids = sp.get("stop_token_ids") or []
        return {"max_tokens": mx, "min_tokens": mn, "stop_ids": set(stop_ids), "stop_strs": stop_strs,
                "ignore_eos": bool(sp.get("ignore_eos") or False), "no_stop_trim": False,
                "skip_special": sp.get("skip_special_tokens") is not False,
                "logprobs": sp.get("logprobs"),
                "include_stop_str_in_output": bool(sp.get("include_stop_str_in_output") or False)}

    def validate_ids(self, ids) -> Optional[str]:
        if not isinstance(ids, list) or not ids:
            return "1 validation error:\n  {'type': 'too_short', 'loc': ('body', 'token_ids'), 'msg': 'List should have at least 1 item after validation, not 0'}"
        for t in ids:
            if not _is_int(t):
                return "1 validation error:\n  {'type': 'int_type', 'loc': ('body', 'token_ids'), 'msg': 'Input should be a valid integer'}"
            if t < 0:
                return "1 validation error:\n  {'type': 'value_error', 'loc': ('body', 'token_ids'), 'msg': 'Value error, token_ids must not contain negative values'}"
        return None

    def record(self, request, body, raw):
        self.eng.last_requests.append({
            "path": request.path, "ts": time.time(),
            "body": body if body is not ValueError else raw.decode("utf-8", "replace"),
            "headers": recorded_headers(request)})

    def start_req(self, request, ext_id: str, ids, sp, stream, body) -> Req:
        eng = self.eng
        hdr = request.headers.get("X-data-parallel-rank")
        try:
            rk = int(hdr) if hdr is not None else None
        except ValueError:
            rk = None
        rank = eng.pick_rank(rk)
        internal = f"{ext_id}-{uuid.uuid4().hex[:8]}"
        sp["internal_id"] = internal
        sp["kv_params"] = body.get("kv_transfer_params")
        req = eng.new_req(rank, ext_id, list(ids), sp, stream)
        req.salt = body.get("cache_salt")
        req.ns = req.salt
        return req

    async def _run_tracked(self, req: Req):
        req.task = asyncio.ensure_future(self.eng.run_guarded(req, self.eng.flow_vllm))

    async def generate(self, request: web.Request):
        eng = self.eng
        body, raw = await read_json(request)
        self.record(request, body, raw)
        if body is ValueError or not isinstance(body, dict):
            return vllm_error("1 validation error:\n  {'type': 'json_invalid', 'loc': ('body', 0), 'msg': 'JSON decode error'}")
        err = self.validate_ids(body.get("token_ids"))
        if err:
            return vllm_error(err, param="token_ids")
        if "sampling_params" not in body or body["sampling_params"] is None:
            return vllm_error("1 validation error:\n  {'type': 'missing', 'loc': ('body', 'sampling_params'), 'msg': 'Field required'}", param="sampling_params")
        r = self.check_model(body.get("model"))
        if r is not None:
            return r
        ids = body["token_ids"]
        try:
            sp = self.parse_sp(body["sampling_params"], len(ids), None)
        except ValueError as e:
            return vllm_error(str(e))
        if self.a.tokens_only and sp["stop_strs"]:
            return vllm_error("stop strings are not supported on a --tokens-only server because detokenization "
                              "is disabled. Check stop strings on the coordinator, or use stop_token_ids.")
        output_mode = body.get("output_mode") or "tokens"
        if output_mode not in ("tokens", "text"):
            return vllm_error(f"fake engine: output_mode={output_mode!r} is not supported")
        if output_mode != "tokens" and self.a.tokens_only:
            return vllm_error(f"output_mode={output_mode!r} requires a tokenizer, but this server does not load one "
                              "(--tokens-only or --skip-tokenizer-init). Send the request to a server that loads a "
                              "tokenizer, or use output_mode='tokens'.")
        base = request.headers.get("X-Request-Id") or body.get("request_id") or uuid.uuid4().hex
        ext_id = f"generate-tokens-{base}"
        if ext_id in eng.reqs:
            return vllm_error(f"Request id {ext_id} already running.")
        req = self.start_req(request, ext_id, ids, sp, bool(body.get("stream")), body)
        req.sp["output_mode"] = output_mode
        req.sp["return_token_ids"] = bool(body.get("return_token_ids"))
        so = body.get("stream_options") or {}
        include_usage = bool(so.get("include_usage")) if isinstance(so, dict) else False
        cont_usage = include_usage and bool(so.get("continuous_usage_stats"))
        eng.server_load += 1 if self.a.enable_server_load_tracking else 0
        await self._run_tracked(req)
        try:
            if req.stream:
                return await self.gen_stream(request, req, include_usage, cont_usage)
            return await self.gen_full(req)
        finally:
            eng.server_load -= 1 if self.a.enable_server_load_tracking else 0
            if req.done:
                eng.forget(req)

    def usage(self, req: Req, exclude_none: bool) -> dict:
        p, c = len(req.prompt), len(req.out)
        u = {"prompt_tokens": p, "total_tokens": p + c, "completion_tokens": c}
        if self.a.enable_prompt_tokens_details:
            u["prompt_tokens_details"] = ({"cached_tokens": req.cached_tokens} if exclude_none else
                                          {"cached_tokens": req.cached_tokens, "created_cache_tokens": None,
                                           "multimodal_tokens": None})
        if not exclude_none:
            u["completion_tokens_details"] = None
        return u

    def text_of(self, req: Req, toks: list[int], final: bool) -> str:
        fin = req.finish
        toks = list(toks)
        if final and fin and fin[0] in ("eos", "stop_token") and toks and toks[-1] == fin[1]:
            toks = toks[:-1]
        text = "".join(token_text(t, req.sp["skip_special"]) for t in toks)
        if final and fin and fin[0] == "stop_str":
            pos = text.find(fin[1])
            if pos >= 0:
                text = text[:pos + len(fin[1])] if req.sp["include_stop_str_in_output"] else text[:pos]
        return text

    def logprobs_obj(self, req, toks):
        if req.sp.get("logprobs") is None:
            return None
        return {"content": [{"token_id": t, "logprob": 0.0, "rank": 1,
                             "top_logprobs": [{"token_id": t, "logprob": 0.0, "rank": 1}]} for t in toks]}

    def weight_versions(self, req: Req, finished: bool):
        if not finished:
            return None
        return [] if not req.out else None

    async def gen_full(self, req: Req):
        try:
            await asyncio.shield(req.finished_fut)
        except asyncio.CancelledError:
            req.request_abort()
            raise
        fr, sr = vllm_finish(req.finish)
        if fr == "error":
            return vllm_error("Internal server error", "InternalServerError", 500)
        choice = {"index": 0, "finish_reason": fr or "stop", "stop_reason": sr, "token_ids": list(req.out),
                  "routed_experts": None, "sampling_mask": None,
                  "weight_versions": self.weight_versions(req, True)}
        if req.sp["output_mode"] == "text":
            choice["text"] = self.text_of(req, req.out, True)
            choice["logprobs"] = None
        else:
            choice["logprobs"] = self.logprobs_obj(req, req.out)
        resp = {"request_id": req.rid, "model": self.eng.model, "created": int(req.created),
                "usage": self.usage(req, False), "prompt_logprobs": None, "prompt_token_id_logprobs": None,
                "prompt_token_ids": list(req.prompt) if req.sp["return_token_ids"] else None,
                "mm_placeholders": None, "metrics": None, "kv_transfer_params": req.kv_transfer_params,
                "ec_transfer_params": None, "output_mode": req.sp["output_mode"], "choices": [choice]}
        return jresp(resp)

    async def gen_stream(self, request, req: Req, include_usage: bool, cont_usage: bool):
        resp = await start_sse(request)
        first = True
        sent_text = ""
        try:
            while True:
                deltas, finished = await drain(req)
                toks = [t for d in deltas for t in d]
                fr, sr = vllm_finish(req.finish if finished else None)
                if fr == "error":
                    await sse_write(resp, json.dumps({"error": {"message": "Internal server error", "type": "InternalServerError", "param": None, "code": 500}}))
                    break
                if not toks and not finished:
                    continue
                chunk: dict = {"request_id": req.rid, "usage": None}
                if first and req.sp["return_token_ids"]:
                    chunk["prompt_token_ids"] = list(req.prompt)
                first = False
                chunk["output_mode"] = req.sp["output_mode"]
                choice = {"index": 0, "finish_reason": fr, "stop_reason": sr, "token_ids": toks,
                          "routed_experts": None, "sampling_mask": None,
                          "weight_versions": self.weight_versions(req, finished)}
                if req.sp["output_mode"] == "text":
                    full = self.text_of(req, req.out, finished)
                    choice["text"] = full[len(sent_text):] if full.startswith(sent_text) else ""
                    sent_text = full
                    choice["logprobs"] = None
                else:
                    choice["logprobs"] = self.logprobs_obj(req, toks)
                chunk["choices"] = [choice]
                if cont_usage:
                    chunk["usage"] = self.usage(req, False)
                await sse_write(resp, jdump(chunk))
                if finished:
                    if include_usage:
                        await sse_write(resp, jdump({"request_id": req.rid, "usage": self.usage(req, True),
                                                     "output_mode": req.sp["output_mode"], "choices": []}))
                    break
            await sse_write(resp, "[DONE]")
        except (ClientGone, asyncio.CancelledError):
            self.eng.stats["client_disconnects"] += 1
            req.request_abort()
            raise asyncio.CancelledError()
        return resp

    async def abort_requests(self, request):
        body, raw = await read_json(request)
        self.record(request, body, raw)
        if not isinstance(body, dict) or "request_ids" not in body:
            return vllm_error("1 validation error:\n  {'type': 'missing', 'loc': ('body', 'request_ids'), 'msg': 'Field required'}", param="request_ids")
        ids = body["request_ids"]
        ids = [ids] if isinstance(ids, str) else list(ids)
        self.eng.stats["abort_requests"] += 1
        for i in ids:
            r = self.eng.reqs.get(i)
            if r is not None:
                r.request_abort()
        return web.Response(status=200)

    async def completions(self, request: web.Request):
        eng = self.eng
        body, raw = await read_json(request)
        self.record(request, body, raw)
        if body is ValueError or not isinstance(body, dict):
            return vllm_error("1 validation error:\n  {'type': 'json_invalid', 'loc': ('body', 0), 'msg': 'JSON decode error'}")
        r = self.check_model(body.get("model"))
        if r is not None:
            return r
        prompt = body.get("prompt")
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], list):
            if len(prompt) != 1:
                return vllm_error("fake engine: only one token-id prompt per request is supported")
            prompt = prompt[0]
        if not (isinstance(prompt, list) and prompt and all(_is_int(t) and t >= 0 for t in prompt)):
            return vllm_error("fake engine: prompt must be a list of token ids")
        sp_in = {k: body.get(k) for k in ("max_tokens", "min_tokens", "stop", "stop_token_ids", "ignore_eos",
                                          "skip_special_tokens", "logprobs", "include_stop_str_in_output")}
        if sp_in["max_tokens"] is None:
            sp_in["max_tokens"] = 16
        try:
            sp = self.parse_sp(sp_in, len(prompt), 16)
        except ValueError as e:
            return vllm_error(str(e))
        base = request.headers.get("X-Request-Id") or body.get("request_id") or uuid.uuid4().hex
        cmpl_id = f"cmpl-{base}"
        ext_id = f"{cmpl_id}-0"
        if ext_id in eng.reqs:
            return vllm_error(f"Request id {ext_id} already running.")
        req = self.start_req(request, ext_id, prompt, sp, bool(body.get("stream")), body)
        req.sp["output_mode"] = "text"
        # --text-only: an OpenAI-compatible server that answers text alone (no vLLM extras).
        req.sp["return_token_ids"] = bool(body.get("return_token_ids")) and not self.a.text_only
        so = body.get("stream_options") or {}
        include_usage = bool(so.get("include_usage")) if isinstance(so, dict) else False
        cont_usage = include_usage and bool(so.get("continuous_usage_stats"))
        eng.server_load += 1 if self.a.enable_server_load_tracking else 0
        await self._run_tracked(req)
        created = int(time.time())
        try:
            if req.stream:
                return await self.cmpl_stream(request, req, cmpl_id, created, include_usage, cont_usage)
            try:
                await asyncio.shield(req.finished_fut)
            except asyncio.CancelledError:
                req.request_abort()
                raise
            fr, sr = vllm_finish(req.finish)
            if fr == "error":
                return vllm_error("Internal server error", "InternalServerError", 500)
            rt = req.sp["return_token_ids"]
            choice = {"index": 0, "text": self.text_of(req, req.out, True), "logprobs": None,
                      "finish_reason": fr, "stop_reason": sr,
                      "token_ids": list(req.out) if rt else None, "prompt_logprobs": None,
                      "prompt_token_ids": list(req.prompt) if rt else None, "routed_experts": None,
                      "weight_versions": None}
            return jresp({"id": cmpl_id, "object": "text_completion", "created": created, "model": eng.model,
                          "choices": [choice], "service_tier": None, "system_fingerprint": None,
                          "usage": self.usage(req, False), "kv_transfer_params": req.kv_transfer_params,
                          "ec_transfer_params": None, "metrics": None})
        finally:
            eng.server_load -= 1 if self.a.enable_server_load_tracking else 0
            if req.done:
                eng.forget(req)

    async def cmpl_stream(self, request, req: Req, cmpl_id, created, include_usage, cont_usage):
        resp = await start_sse(request)
        rt = req.sp["return_token_ids"]
        first = True
        sent_text = ""
        try:
            while True:
                deltas, finished = await drain(req)
                toks = [t for d in deltas for t in d]
                fr, sr = vllm_finish(req.finish if finished else None)
                if fr == "error":
                    await sse_write(resp, json.dumps({"error": {"message": "Internal server error", "type": "InternalServerError", "param": None, "code": 500}}))
                    break
                if not toks and not finished:
                    continue
                full = self.text_of(req, req.out, finished)
                text = full[len(sent_text):] if full.startswith(sent_text) else ""
                sent_text = full
                choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": fr, "stop_reason": sr,
                          "prompt_token_ids": list(req.prompt) if (rt and first) else None,
                          "token_ids": toks if rt else None, "weight_versions": None}
                first = False
                chunk = {"id": cmpl_id, "object": "text_completion", "created": created, "model": self.eng.model,
                         "choices": [choice]}
                if cont_usage:
                    chunk["usage"] = self.usage(req, False)
                chunk["kv_transfer_params"] = req.kv_transfer_params if finished else None
                await sse_write(resp, jdump(chunk))
                if finished:
                    if include_usage:
                        await sse_write(resp, jdump({"id": cmpl_id, "object": "text_completion", "created": created,
                                                     "model": self.eng.model, "choices": [],
                                                     "usage": self.usage(req, True)}))
                    break
            await sse_write(resp, "[DONE]")
        except (ClientGone, asyncio.CancelledError):
            self.eng.stats["client_disconnects"] += 1
            req.request_abort()
            raise asyncio.CancelledError()
        return resp


# ---------------------------------------------------------------------------
# llama.cpp llama-server HTTP API (tools/server: server-context.cpp, server-task.cpp)
# ---------------------------------------------------------------------------
LLAMA_PROBE = {"What is the capital of France?": [3838, 374, 279, 6722, 315, 9625, 30]}


def llama_error(message: str, code: int = 400, err_type: str = "invalid_request_error") -> web.Response:
    return jresp({"error": {"code": code, "message": message, "type": err_type}}, code)


class LlamaAPI:
    """`/completion` (token-id prompt, SSE chunks with `tokens`, a final `stop: true` chunk with
    `stop_type`, no `[DONE]`), `/health`, `/props`, `/slots`, `/metrics` (--metrics), `/tokenize`
    (the probe text only: no tokenizer here), `/v1/models`. `--withhold-every K`: every K-th
    generated token gets no chunk of its own (as llama-server does for a token that ends inside a
    UTF-8 character): its id never appears and its text goes out with the next token's chunk."""

    def __init__(self, eng: Engine):
        self.eng = eng
        self.a = eng.args
        self.n_ctx = self.a.max_model_len // max(self.a.parallel, 1)
        self.deferred = 0

    def routes(self, app: web.Application) -> None:
        r = app.router
        r.add_post("/completion", self.completion)
        r.add_post("/completions", self.completion)
        r.add_get("/health", self.health)
        r.add_get("/props", self.props)
        r.add_get("/slots", self.slots)
        r.add_get("/metrics", self.metrics)
        r.add_post("/tokenize", self.tokenize)
        r.add_get("/v1/models", self.models)

    async def health(self, request):
        return jresp({"status": "ok"})

    async def models(self, request):
        return jresp({"object": "list", "data": [{"id": self.eng.model, "object": "model", "owned_by": "llamacpp",
                                                  "meta": {"n_ctx": self.n_ctx, "n_vocab": 151936}}]})

    async def props(self, request):
        return jresp({"default_generation_settings": {"params": {}, "n_ctx": self.n_ctx},
                      "total_slots": self.a.parallel, "model_alias": self.eng.model,
                      "model_path": self.eng.model + ".gguf", "endpoint_slots": not self.a.no_slots,
                      "endpoint_props": False, "endpoint_metrics": self.a.metrics, "is_sleeping": False})

    def busy(self) -> int:
        return sum(r.running for r in self.eng.ranks)

    async def slots(self, request):
        if self.a.no_slots:
            return llama_error("This server does not support slots endpoint. Start it with `--slots`", 501,
                               "not_supported_error")
        busy = self.busy()
        running = [q for q in self.eng.reqs.values() if q.phase == "running"]
        out = []
        for i in range(self.a.parallel):
            slot = {"id": i, "n_ctx": self.n_ctx, "speculative": False, "is_processing": i < busy}
            if i < len(running):
                q = running[i]
                slot.update({"id_task": i, "n_prompt_tokens": len(q.prompt), "n_prompt_tokens_cache": q.cached_tokens,
                             "next_token": [{"has_next_token": True, "has_new_line": False,
                                             "n_remain": q.sp["max_tokens"] - len(q.out), "n_decoded": len(q.out)}]})
            out.append(slot)
        return jresp(out)

    async def metrics(self, request):
        if not self.a.metrics:
            return llama_error("This server does not support metrics endpoint. Start it with `--metrics`", 501,
                               "not_supported_error")
        e = self.eng
        lines = [("prompt_tokens_total", "counter", e.total_prefill_uncached),
                 ("prompt_tokens_cached_total", "counter", e.cache_hits),
                 ("requests_processing", "gauge", self.busy()),
                 ("requests_deferred", "gauge", sum(r.waiting for r in e.ranks))]
        text = "".join(f"# HELP llamacpp:{n} {n}\n# TYPE llamacpp:{n} {t}\nllamacpp:{n} {v}\n" for n, t, v in lines)
        return web.Response(text=text, content_type="text/plain")

    async def tokenize(self, request):
        body, _ = await read_json(request)
        content = body.get("content") if isinstance(body, dict) else None
        if content not in LLAMA_PROBE:
            return llama_error("fake engine: no tokenizer (only the probe text is known)", 501, "not_supported_error")
        return jresp({"tokens": LLAMA_PROBE[content]})

    def timings(self, req: Req) -> dict:
        return {"cache_n": req.cached_tokens, "prompt_n": len(req.prompt) - req.cached_tokens, "prompt_ms": 1.0,
                "prompt_per_token_ms": 0.1, "prompt_per_second": 1000.0, "predicted_n": len(req.out),
                "predicted_ms": 1.0, "predicted_per_token_ms": 1.0, "predicted_per_second": 1000.0}

    def final(self, req: Req, stream: bool) -> dict:
        fin = req.finish or ("length",)
        stop_type = "eos" if fin[0] == "eos" else "limit"
        out = [t for t in req.out]
        return {"index": 0, "content": "" if stream else "".join(token_text(t) for t in out),
                "tokens": [] if stream else (out if req.sp["return_tokens"] else []),
                "id_slot": 0, "stop": True, "model": self.eng.model, "tokens_predicted": len(out),
                "tokens_evaluated": len(req.prompt), "generation_settings": {}, "prompt": "",
                "has_new_line": False, "truncated": False, "stop_type": stop_type, "stopping_word": "",
                "tokens_cached": len(req.prompt) + len(out) - 1, "timings": self.timings(req)}

    async def completion(self, request: web.Request):
        eng = self.eng
        body, raw = await read_json(request)
        eng.last_requests.append({"path": request.path, "ts": time.time(),
                                  "body": body if body is not ValueError else raw.decode("utf-8", "replace"),
                                  "headers": recorded_headers(request)})
        if body is ValueError or not isinstance(body, dict):
            return llama_error("Invalid JSON")
        prompt = body.get("prompt")
        if not (isinstance(prompt, list) and prompt and all(_is_int(t) and t >= 0 for t in prompt)):
            return llama_error("fake engine: prompt must be a list of token ids")
        if len(prompt) >= self.n_ctx:
            return llama_error(f"the request exceeds the available context size, try increasing it", 400,
                               "exceed_context_size_error")
        n_predict = body.get("n_predict", body.get("max_tokens", -1))
        if n_predict is None or n_predict < 0:
            n_predict = self.n_ctx - len(prompt)
        sp = {"max_tokens": max(n_predict, 1), "min_tokens": 0, "stop_ids": set(), "stop_strs": [],
              "ignore_eos": bool(body.get("ignore_eos")), "skip_special": True, "logprobs": None,
              "include_stop_str_in_output": False, "return_tokens": bool(body.get("return_tokens")),
              "timings_per_token": bool(body.get("timings_per_token"))}
        stream = bool(body.get("stream"))
        req = eng.new_req(eng.pick_rank(None), f"llama-{uuid.uuid4().hex[:12]}", list(prompt), sp, stream)
        req.task = asyncio.ensure_future(eng.run_guarded(req, eng.flow_aggregated))
        try:
            if not stream:
                try:
                    await asyncio.shield(req.finished_fut)
                except asyncio.CancelledError:
                    req.request_abort()
                    raise
                return jresp(self.final(req, False))
            return await self.stream(request, req)
        finally:
            if req.done:
                eng.forget(req)

    async def stream(self, request, req: Req):
        resp = await start_sse(request)
        k = self.a.withhold_every
        held_text = ""
        n = 0
        try:
            while True:
                deltas, finished = await drain(req)
                for t in (t for d in deltas for t in d):
                    n += 1
                    text = token_text(t)
                    if k > 0 and n % k == 0 and n < req.sp["max_tokens"]:
                        held_text += text
                        self.eng.stats["withheld_tokens"] += 1
                        continue
                    chunk = {"index": 0, "content": held_text + text, "tokens": [t], "stop": False, "id_slot": 0,
                             "tokens_predicted": n, "tokens_evaluated": len(req.prompt)}
                    held_text = ""
                    if req.sp["timings_per_token"]:
                        chunk["timings"] = self.timings(req)
                    await sse_write(resp, jdump(chunk))
                if finished:
                    if req.finish and req.finish[0] == "abort":
                        break
                    await sse_write(resp, jdump(self.final(req, True)))
                    break
        except (ClientGone, asyncio.CancelledError):
            self.eng.stats["client_disconnects"] += 1
            req.request_abort()
            raise asyncio.CancelledError()
        return resp


# ---------------------------------------------------------------------------
# Disaggregation side servers
# ---------------------------------------------------------------------------
def bootstrap_app(eng: Engine) -> web.Application:
    """SGLang prefill bootstrap server.  /health and /route as the real one;
    /fake_kv/{room} stands in for the KV transfer itself (decode <-> prefill)."""
    app = web.Application()

    async def health(request):
        return web.Response(text="OK")

    async def route(request):
        if request.method == "PUT":
            return web.Response(text="OK")
        if request.method == "GET":
            return jresp({"engine_rank": 0, "prefill_dp_size": eng.args.dp_size})
        return web.Response(text="Method not allowed", status=405, content_type="application/json")

    async def fetch(request):
        room = int(request.match_info["room"])
        timeout = float(request.query.get("timeout", eng.args.bootstrap_timeout))
        ent = eng.room_entry(room)
        try:
            data = await asyncio.wait_for(asyncio.shield(ent["ready"]), timeout)
        except asyncio.TimeoutError:
            if not ent["ready"].done():
                eng.rooms.pop(room, None)
            return jresp({"error": "timeout"}, 408)
        if not ent["fetched"].done():
            ent["fetched"].set_result("ok")
        return jresp(data)

    async def abort(request):
        room = int(request.match_info["room"])
        ent = eng.rooms.get(room)
        if ent is not None and not ent["fetched"].done():
            ent["fetched"].set_result("aborted")
        return jresp({"ok": True})

    app.router.add_get("/health", health)
    app.router.add_route("*", "/route", route)
    app.router.add_post("/register_dp_rank", health)
    app.router.add_post("/query_dp_ranks", lambda r: jresp({"dp_ranks": list(range(eng.args.dp_size))}))
    app.router.add_get("/fake_kv/{room}", fetch)
    app.router.add_post("/fake_kv/{room}/abort", abort)
    return app


def side_channel_app(eng: Engine) -> web.Application:
    """vLLM NIXL side channel stand-in: the decode side reads leased blocks."""
    app = web.Application()

    async def read(request):
        body = await request.json()
        if body.get("remote_engine_id") != eng.engine_id:
            return jresp({"error": f"unknown remote_engine_id {body.get('remote_engine_id')}"}, 404)
        lease = eng.leases.pop(body.get("remote_request_id"), None)
        if lease is None:
            eng.stats["transfers_refused"] += 1
            return jresp({"error": f"no blocks held for request {body.get('remote_request_id')} (expired or unknown)"}, 404)
        want = body.get("remote_block_ids")
        if want is not None and want != [lease["block_ids"]]:
            eng.leases[body.get("remote_request_id")] = lease
            eng.stats["transfers_refused"] += 1
            return jresp({"error": "remote_block_ids do not match the blocks held"}, 409)
        eng.stats["transfers_sent"] += 1
        lease["req"].rank.cache.unlock(lease["blocks"])
        lease["req"].rank.flush()
        return jresp({"token_ids": lease["tokens"], "num_blocks": len(lease["block_ids"])})

    async def health(request):
        return web.Response(text="OK")

    app.router.add_post("/fake_nixl/read", read)
    app.router.add_get("/health", health)
    return app


# ---------------------------------------------------------------------------
# /fake test controls
# ---------------------------------------------------------------------------
def fake_routes(app: web.Application, eng: Engine) -> None:
    def ranks_of(body) -> list[Rank]:
        if isinstance(body, dict) and body.get("rank") is not None:
            return [eng.ranks[int(body["rank"])]]
        return eng.ranks

    async def body_of(request):
        raw = await request.read()
        try:
            return json.loads(raw) if raw else {}
        except ValueError:
            return {}

    async def restart(request):
        body = await body_of(request)
        loop = asyncio.get_running_loop()
        for r in ranks_of(body):
            if r.publisher is not None:
                await loop.run_in_executor(None, r.publisher.restart)
        eng.stats["publisher_restarts"] += 1
        return jresp({"ok": True})

    async def drop(request):
        body = await body_of(request)
        n = int(body.get("n", 1))
        loop = asyncio.get_running_loop()
        for r in ranks_of(body):
            if r.publisher is not None:
                await loop.run_in_executor(None, r.publisher.drop, n)
        return jresp({"ok": True, "n": n})

    async def hang(request):
        body = await body_of(request)
        eng.hang_until = time.time() + float(body.get("seconds", 5))
        return jresp({"ok": True, "until": eng.hang_until})

    async def clear(request):
        body = await body_of(request)
        for r in ranks_of(body):
            r.cache.clear()
            r.flush()
        return jresp({"ok": True})

    async def cache(request):
        rank = int(request.query.get("rank", 0))
        r = eng.ranks[rank]
        return jresp({"engine": eng.kind, "rank": rank, "block_size": eng.page_size,
                      "enabled": r.cache.enabled, "blocks": r.cache.snapshot()})

    async def stats(request):
        pubs = []
        for r in eng.ranks:
            p = r.publisher
            pubs.append(None if p is None else {"rank": r.idx, "next_seq": p.seq, "published": p.published,
                                                "dropped": p.dropped, "buffered": len(p.buffer),
                                                "replays_served": p.replays_served})
        return jresp({"engine": eng.kind, "mode": eng.mode, "counters": dict(eng.stats),
                      "active_requests": sorted(eng.reqs), "rooms": sorted(eng.rooms),
                      "leases": sorted(eng.leases), "publishers": pubs,
                      "cache_blocks": [len(r.cache.blocks) for r in eng.ranks],
                      "evictions": [r.cache.evictions for r in eng.ranks],
                      "last_requests": list(eng.last_requests)})

    async def reset_stats(request):
        eng.stats.clear()
        eng.last_requests.clear()
        return jresp({"ok": True})

    app.router.add_post("/fake/restart_publisher", restart)
    app.router.add_post("/fake/drop_events", drop)
    app.router.add_post("/fake/hang", hang)
    app.router.add_post("/fake/clear", clear)
    app.router.add_get("/fake/cache", cache)
    app.router.add_get("/fake/stats", stats)
    app.router.add_post("/fake/reset_stats", reset_stats)


def recorded_headers(request) -> dict:
    """The headers /fake/stats shows with a request: x-* and W3C trace context."""
    return {k: v for k, v in request.headers.items()
            if k.lower().startswith("x-") or k.lower() in ("traceparent", "tracestate")}


def hang_middleware(eng: Engine):
    @web.middleware
    async def mw(request, handler):
        if not request.path.startswith("/fake/"):
            while time.time() < eng.hang_until:
                await asyncio.sleep(min(0.05, max(eng.hang_until - time.time(), 0.001)))
        return await handler(request)
    return mw


# ---------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------
def bound_socket(host: str, port: int) -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((host, port))
    s.listen(1024)
    s.setblocking(False)
    return s


async def serve(args) -> None:
    eng = Engine(args)
    ctx = zmq.Context.instance()
    eng.start_publishers(ctx)
    eng.http = ClientSession()
    runners = []

    app = web.Application(middlewares=[hang_middleware(eng)], client_max_size=64 * 1024 * 1024)
    api = LlamaAPI(eng) if eng.api == "llama-cpp" else SGLangAPI(eng) if eng.kind == "sglang" else VLLMAPI(eng)
    api.routes(app)
    fake_routes(app, eng)
    sock = bound_socket(args.host, args.port)
    eng.port = sock.getsockname()[1]
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
    await runner.setup()
    await web.SockSite(runner, sock).start()
    runners.append(runner)

    if eng.kind == "sglang" and eng.mode == "prefill":
        bsock = bound_socket(args.host, args.disaggregation_bootstrap_port)
        eng.bootstrap_port = bsock.getsockname()[1]
        br = web.AppRunner(bootstrap_app(eng), access_log=None)
        await br.setup()
        await web.SockSite(br, bsock).start()
        runners.append(br)
    if eng.kind == "vllm" and args.kv_role:
        ssock = bound_socket(args.host, args.side_channel_port)
        eng.side_channel_port = ssock.getsockname()[1]
        sr = web.AppRunner(side_channel_app(eng), access_log=None)
        await sr.setup()
        await web.SockSite(sr, ssock).start()
        runners.append(sr)

    ready = {"port": eng.port, "kv_events_port": eng.kv_port, "replay_port": eng.replay_port,
             "bootstrap_port": eng.bootstrap_port, "side_channel_port": eng.side_channel_port,
             "dp_size": args.dp_size, "engine": eng.api}
    sys.stdout.write("READY " + json.dumps(ready) + "\n")
    sys.stdout.flush()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    import signal
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, stop.set)
        except NotImplementedError:  # pragma: no cover
            pass
    await stop.wait()
    for r in runners:
        await r.cleanup()
    await eng.http.close()


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Fake SGLang 0.5.23 / vLLM 0.34.0 engine (token ids, no model)")
    p.add_argument("--self-test", action="store_true", help="check the golden wire bytes and exit")
    p.add_argument("--engine", choices=["sglang", "vllm", "llama-cpp"], default="sglang")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0, help="0 = pick a free port")
    p.add_argument("--page-size", "--block-size", dest="page_size", type=int, default=16)
    p.add_argument("--model-path", "--model", dest="model_path", default="Qwen/Qwen3-0.6B")
    p.add_argument("--served-model-name", default=None)
    p.add_argument("--max-model-len", "--context-length", dest="max_model_len", type=int, default=40960)
    p.add_argument("--kv-events", choices=["on", "off"], default="on")
    p.add_argument("--kv-events-port", type=int, default=0, help="PUB base port (rank r: base+r); 0 = pick")
    p.add_argument("--replay-port", type=int, default=0, help="ROUTER base port; 0 = pick, -1 = no replay endpoint")
    p.add_argument("--kv-events-bind-host", default=None, help="host the ZMQ sockets bind (default --host); "
                   "discovery always reports the wildcard '*' as the engines do")
    p.add_argument("--topic", default="")
    p.add_argument("--buffer-steps", type=int, default=10000)
    p.add_argument("--legacy-wire", action="store_true", help="old shapes: array events, 2-element batch, replies without topic")
    p.add_argument("--capacity-blocks", type=int, default=4096, help="simulated KV capacity in cached blocks (0 = unlimited)")
    p.add_argument("--dp-size", type=int, default=1)
    p.add_argument("--ttft-ms", type=float, default=2.0)
    p.add_argument("--itl-ms", type=float, default=1.0)
    p.add_argument("--eos-after", type=int, default=32,
                   help="emit eos (151645) as the N-th+1 generated token unless ignore_eos; 0 = never")
    # SGLang
    p.add_argument("--disaggregation-mode", choices=["null", "prefill", "decode"], default="null")
    p.add_argument("--disaggregation-bootstrap-port", type=int, default=8998)
    p.add_argument("--disaggregation-transfer-backend", default="mooncake")
    p.add_argument("--disaggregation-decode-enable-radix-cache", action="store_true")
    p.add_argument("--bootstrap-timeout", type=float, default=30.0,
                   help="seconds a PD leg waits for its peer (real: 300)")
    p.add_argument("--incremental-streaming-output", action="store_true")
    p.add_argument("--skip-tokenizer-init", action="store_true")
    # vLLM
    p.add_argument("--kv-role", choices=["kv_producer", "kv_consumer", "kv_both"], default=None)
    p.add_argument("--side-channel-host", default=None, help="remote_host advertised in kv_transfer_params (default --host)")
    p.add_argument("--side-channel-port", type=int, default=0)
    p.add_argument("--kv-lease-duration", type=float, default=30.0)
    p.add_argument("--enable-prompt-tokens-details", action="store_true")
    p.add_argument("--tokens-only", action="store_true")
    p.add_argument("--enable-scale-out", action="store_true")
    p.add_argument("--enable-server-load-tracking", action="store_true")
    p.add_argument("--text-only", action="store_true",
                   help="vLLM /v1/completions answers text only (ignores return_token_ids), as a plain OpenAI-API server")
    # llama.cpp
    p.add_argument("--parallel", "-np", dest="parallel", type=int, default=4, help="llama-cpp: slots")
    p.add_argument("--metrics", action="store_true", help="llama-cpp: serve /metrics")
    p.add_argument("--no-slots", action="store_true", help="llama-cpp: /slots answers 501")
    p.add_argument("--withhold-every", type=int, default=0,
                   help="llama-cpp: every K-th token gets no chunk (an incomplete UTF-8 character in the real server)")
    a = p.parse_args(argv)
    a.kv_events = a.kv_events == "on" and a.engine != "llama-cpp"
    return a


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.self_test:
        return self_test()
    try:
        asyncio.run(serve(args))
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
