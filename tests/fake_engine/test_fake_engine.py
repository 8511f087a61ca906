#!/usr/bin/env python3
"""Checks of the fake engine (plain script: `python3 test_fake_engine.py`,
exit status 0 when every check passes).  Needs the packages of requirements.txt."""

from __future__ import annotations

import http.client
import json
import os
import subprocess
import sys
import threading
import time
import traceback
import uuid

import msgspec
import zmq

HERE = os.path.dirname(os.path.abspath(__file__))
FAKE = os.path.join(HERE, "fake_engine.py")
PY = sys.executable

PASSED: list[str] = []
FAILED: list[str] = []


class Engine:
    def __init__(self, *args: str):
        self.proc = subprocess.Popen([PY, FAKE, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True)
        line = self.proc.stdout.readline()
        if not line.startswith("READY "):
            err = self.proc.stderr.read() if self.proc.poll() is not None else ""
            raise RuntimeError(f"no READY line: {line!r} {err}")
        self.ports = json.loads(line[len("READY "):])
        self.port = self.ports["port"]

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()

    # -- HTTP ------------------------------------------------------------
    def req(self, method: str, path: str, body=None, headers=None, timeout=30):
        c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        data = None if body is None else json.dumps(body)
        h = {"Content-Type": "application/json"}
        h.update(headers or {})
        c.request(method, path, body=data, headers=h)
        r = c.getresponse()
        raw = r.read()
        c.close()
        try:
            return r.status, json.loads(raw) if raw else None
        except ValueError:
            return r.status, raw.decode()

    def post(self, path, body=None, **kw):
        return self.req("POST", path, body, **kw)

    def get(self, path, **kw):
        return self.req("GET", path, **kw)

    def stream(self, path, body, on_chunk=None, headers=None):
        """POST and read SSE; returns the list of data payloads (parsed JSON or '[DONE]')."""
        c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        h = {"Content-Type": "application/json"}
        h.update(headers or {})
        c.request("POST", path, body=json.dumps(body), headers=h)
        r = c.getresponse()
        out = []
        while True:
            line = r.fp.readline()
            if not line:
                break
            line = line.decode().rstrip("\n")
            if not line.startswith("data: "):
                continue
            payload = line[len("data: "):]
            item = payload if payload == "[DONE]" else json.loads(payload)
            out.append(item)
            if on_chunk is not None and on_chunk(item, c) is False:
                break
            if item == "[DONE]":
                break
        c.close()
        return out

    # -- ZMQ -------------------------------------------------------------
    def sub(self, topic=b""):
        s = zmq.Context.instance().socket(zmq.SUB)
        s.setsockopt(zmq.SUBSCRIBE, topic)
        s.connect(f"tcp://127.0.0.1:{self.ports['kv_events_port']}")
        time.sleep(0.4)  # slow joiner
        return s

    def replay(self, start: int, timeout=5.0):
        d = zmq.Context.instance().socket(zmq.DEALER)
        d.connect(f"tcp://127.0.0.1:{self.ports['replay_port']}")
        d.send_multipart([b"", start.to_bytes(8, "big")])
        frames = []
        deadline = time.time() + timeout
        while time.time() < deadline:
            if d.poll(200):
                f = d.recv_multipart()
                frames.append(f)
                if f[-2] == b"\xff" * 8:
                    break
        d.close(0)
        return frames


def recv_all(sock, wait=0.5):
    msgs = []
    deadline = time.time() + wait
    while time.time() < deadline:
        if sock.poll(50):
            msgs.append(sock.recv_multipart())
            deadline = time.time() + wait
    return msgs


def decode(payload: bytes):
    return msgspec.msgpack.decode(payload)


def check(name: str, cond: bool, detail=""):
    if not cond:
        raise AssertionError(f"{name}: {detail}")


CASES = []


def case(fn):
    CASES.append(fn)
    return fn


def run_case(fn):
    name = fn.__name__
    t0 = time.time()
    try:
        fn()
        PASSED.append(name)
        print(f"ok   {name} ({time.time() - t0:.1f}s)", flush=True)
    except Exception:
        FAILED.append(name)
        print(f"FAIL {name}", flush=True)
        traceback.print_exc()


def prompt(n, start=1000):
    return list(range(start, start + n))


# ---------------------------------------------------------------------------
@case
def golden_self_test():
    r = subprocess.run([PY, FAKE, "--self-test"], capture_output=True, text=True)
    check("self-test", r.returncode == 0, r.stdout + r.stderr)


@case
def sglang_prefix_hit_and_events():
    e = Engine("--engine", "sglang", "--skip-tokenizer-init", "--eos-after", "0")
    try:
        sub = e.sub()
        p1 = prompt(40)
        st, r1 = e.post("/generate", {"input_ids": p1, "sampling_params": {"max_new_tokens": 4}})
        check("status", st == 200, r1)
        check("no text key", "text" not in r1, r1)
        m = r1["meta_info"]
        check("cached 0", m["cached_tokens"] == 0, m)
        check("finish length", m["finish_reason"] == {"type": "length", "length": 4}, m)
        check("prompt_tokens", m["prompt_tokens"] == 40 and m["completion_tokens"] == 4, m)
        # second turn: first turn + its output + more
        p2 = p1 + r1["output_ids"] + prompt(10, 5000)
        st, r2 = e.post("/generate", {"input_ids": p2, "sampling_params": {"max_new_tokens": 2}})
        check("cached > 0", r2["meta_info"]["cached_tokens"] == 32, r2["meta_info"])
        msgs = recv_all(sub)
        check("3 frames", all(len(f) == 3 for f in msgs), msgs)
        seqs = [int.from_bytes(f[1], "big") for f in msgs]
        check("seq from 0", seqs == list(range(len(seqs))) and seqs, seqs)
        stored = []
        for f in msgs:
            b = decode(f[2])
            check("batch is [ts, events, rank]", isinstance(b, list) and len(b) == 3 and b[2] == 0, b)
            for ev in b[1]:
                check("map event", isinstance(ev, dict) and "type" in ev, ev)
                if ev["type"] == "BlockStored":
                    check("keys", list(ev)[:6] == ["type", "block_hashes", "parent_block_hash", "token_ids",
                                                  "block_size", "lora_id"], list(ev))
                    check("medium", ev["medium"] == "GPU", ev)
                    check("no omitted-default keys", "cache_salt" not in ev and "session_id" not in ev, ev)
                    check("len", len(ev["token_ids"]) == 16 * len(ev["block_hashes"]), ev)
                    check("signed int64", all(-2**63 <= h < 2**63 for h in ev["block_hashes"]), ev)
                    stored.append(ev)
        # first batch: prompt pages 0,1 coalesced, parent null
        check("coalesced", stored[0]["parent_block_hash"] is None and len(stored[0]["block_hashes"]) == 2, stored[0])
        check("tokens", stored[0]["token_ids"] == p1[:32], stored[0])
        # cache truth agrees with the events
        st, cache = e.get("/fake/cache")
        hashes = {b["hash"] for b in cache["blocks"]}
        evh = {h for ev in stored for h in ev["block_hashes"]}
        check("cache == events", hashes == evh, (hashes, evh))
        st, info = e.get("/server_info")
        kv = info["kv_events"]
        check("kv_events block", kv["endpoint_host"] == "*" and kv["endpoint_port_base"] == e.ports["kv_events_port"]
              and kv["replay_endpoint_port_base"] == e.ports["replay_port"] and kv["block_size"] == 16
              and kv["dp_size"] == 1 and kv["publisher"] == "zmq" and kv["topic"] == "", kv)
        check("server_info", info["page_size"] == 16 and info["disaggregation_mode"] == "null", info)
        st, loads = e.get("/v1/loads")
        check("loads", st == 200 and loads["loads"][0]["num_running_reqs"] == 0, loads)
    finally:
        e.stop()


@case
def sglang_contract_and_errors():
    e = Engine("--engine", "sglang")
    try:
        st, r = e.post("/generate", {"input_ids": [1, 2, 3], "sampling_params": {"max_tokens": 3}})
        check("400", st == 400, (st, r))
        check("serde text", r["error"].startswith("unknown field `max_tokens`, expected one of `max_new_tokens`"), r)
        st, r = e.post("/generate", {"input_ids": [1, 2, 3], "sampling_params": {"max_new_tokens": "x"}})
        check("type error", st == 400 and r["error"] == 'invalid type: string "x", expected i64', r)
        st, r = e.post("/generate", {"input_ids": [1, 2, 3], "unknown_top_level": 1,
                                     "sampling_params": {"max_new_tokens": 2}})
        check("top-level unknown ignored", st == 200 and "text" in r, (st, r))
        st, r = e.post("/generate", {"sampling_params": {"max_new_tokens": 2}})
        check("no input", st == 400 and "should be provided" in r["error"]["message"], r)
        # default max_new_tokens = 128 (with eos disabled by ignore_eos)
        st, r = e.post("/generate", {"input_ids": [1, 2, 3], "sampling_params": {"ignore_eos": True}})
        check("default 128", len(r["output_ids"]) == 128, len(r["output_ids"]))
        # eos after 32 tokens by default
        st, r = e.post("/generate", {"input_ids": [1, 2, 3]})
        check("eos", r["meta_info"]["finish_reason"] == {"type": "stop", "matched": 151645}
              and len(r["output_ids"]) == 33, r["meta_info"])
        out = e.stream("/generate", {"input_ids": [1, 2, 3], "stream": True,
                                     "sampling_params": {"max_new_tokens": -1}})
        check("stream error chunk", out[0]["error"]["code"] == 400 and out[0]["error"]["type"] == "invalid_request_error"
              and out[-1] == "[DONE]", out)
        # stop_token_ids
        first = r["output_ids"][2]
        st, r2 = e.post("/generate", {"input_ids": [1, 2, 3], "sampling_params": {"stop_token_ids": [first]}})
        check("stop token", r2["meta_info"]["finish_reason"] == {"type": "stop", "matched": first}
              and len(r2["output_ids"]) == 3, r2)
    finally:
        e.stop()


def _sgl_stream_case(incremental: bool):
    args = ["--engine", "sglang", "--skip-tokenizer-init"] + (["--incremental-streaming-output"] if incremental else [])
    e = Engine(*args)
    try:
        out = e.stream("/generate", {"input_ids": prompt(20), "stream": True,
                                     "sampling_params": {"max_new_tokens": 6, "ignore_eos": True}})
        check("done", out[-1] == "[DONE]", out)
        chunks = out[:-1]
        st, full = e.post("/generate", {"input_ids": prompt(20), "sampling_params": {"max_new_tokens": 6, "ignore_eos": True}})
        if incremental:
            cat = [t for c in chunks for t in c["output_ids"]]
            check("deltas concatenate", cat == full["output_ids"], (cat, full))
        else:
            check("cumulative", chunks[-1]["output_ids"] == full["output_ids"], chunks)
            for a, b in zip(chunks, chunks[1:]):
                check("growing", b["output_ids"][:len(a["output_ids"])] == a["output_ids"], (a, b))
        check("meta every chunk", all("cached_tokens" in c["meta_info"] for c in chunks), chunks)
        check("last finish", chunks[-1]["meta_info"]["finish_reason"]["type"] == "length", chunks[-1])
    finally:
        e.stop()


@case
def sglang_streaming_cumulative():
    _sgl_stream_case(False)


@case
def sglang_streaming_incremental():
    _sgl_stream_case(True)


@case
def sglang_abort_and_disconnect():
    e = Engine("--engine", "sglang", "--itl-ms", "5")
    try:
        rid = "abort-me-" + uuid.uuid4().hex

        def on_chunk(item, conn):
            if item != "[DONE]" and len(item["output_ids"]) == 3:
                e.post("/abort_request", {"rid": rid})
        out = e.stream("/generate", {"rid": rid, "input_ids": prompt(20), "stream": True,
                                     "sampling_params": {"max_new_tokens": 10000, "ignore_eos": True}}, on_chunk)
        check("done", out[-1] == "[DONE]", out[-3:])
        fr = out[-2]["meta_info"]["finish_reason"]
        check("abort finish", fr == {"type": "abort", "message": "Aborted", "status_code": None, "err_type": None}, fr)
        # abort_all on a non-stream request
        res = {}
        t = threading.Thread(target=lambda: res.update(r=e.post("/generate", {
            "input_ids": prompt(20), "sampling_params": {"max_new_tokens": 10000, "ignore_eos": True}})))
        t.start()
        time.sleep(0.3)
        e.post("/abort_request", {"abort_all": True})
        t.join(10)
        st, r = res["r"]
        check("non-stream abort 200", st == 200 and r["meta_info"]["finish_reason"]["type"] == "abort", (st, r))
        # client disconnect aborts
        e.stream("/generate", {"input_ids": prompt(20), "stream": True,
                               "sampling_params": {"max_new_tokens": 10000, "ignore_eos": True}},
                 lambda item, conn: False if item != "[DONE]" and len(item["output_ids"]) >= 2 else None)
        deadline = time.time() + 5
        while time.time() < deadline:
            st, s = e.get("/fake/stats")
            if not s["active_requests"]:
                break
            time.sleep(0.1)
        check("disconnect aborted", not s["active_requests"] and s["counters"].get("client_disconnects", 0) >= 1, s["counters"])
    finally:
        e.stop()


@case
def sglang_disagg_pair():
    p = Engine("--engine", "sglang", "--disaggregation-mode", "prefill", "--disaggregation-bootstrap-port", "0",
               "--skip-tokenizer-init", "--bootstrap-timeout", "3")
    d = Engine("--engine", "sglang", "--disaggregation-mode", "decode", "--skip-tokenizer-init",
               "--bootstrap-timeout", "2", "--disaggregation-bootstrap-port", str(p.ports["bootstrap_port"]))
    try:
        check("bootstrap port", p.ports["bootstrap_port"], p.ports)
        st, info = p.get("/server_info")
        check("server_info bootstrap", info["disaggregation_mode"] == "prefill"
              and info["disaggregation_bootstrap_port"] == p.ports["bootstrap_port"], info)
        psub = p.sub()
        dsub = d.sub()
        room = int.from_bytes(os.urandom(8), "big") & (2**63 - 1)
        body = {"input_ids": prompt(40), "sampling_params": {"max_new_tokens": 5, "ignore_eos": True},
                "bootstrap_host": "127.0.0.1", "bootstrap_port": p.ports["bootstrap_port"], "bootstrap_room": room}
        res = {}
        tp = threading.Thread(target=lambda: res.update(p=p.post("/generate", body)))
        tp.start()
        time.sleep(0.2)  # the decode leg may also arrive first; both orders work
        out = d.stream("/generate", dict(body, stream=True))
        tp.join(10)
        pst, pr = res["p"]
        check("prefill 200", pst == 200, pr)
        check("prefill finish length 0", pr["meta_info"]["finish_reason"] == {"type": "length", "length": 0}
              and len(pr["output_ids"]) == 1, pr)
        chunks = out[:-1]
        check("decode tokens", chunks[-1]["output_ids"][0] == pr["output_ids"][0]
              and len(chunks[-1]["output_ids"]) == 5, chunks[-1])
        check("decode finish", chunks[-1]["meta_info"]["finish_reason"] == {"type": "length", "length": 5}, chunks[-1])
        pe = recv_all(psub)
        de = recv_all(dsub)
        check("prefill publishes", len(pe) >= 1, pe)
        check("decode publishes nothing", de == [], de)
        # second turn on the same prefill: prefix hit is reported by decode too
        room2 = room ^ 1
        body2 = dict(body, input_ids=prompt(40) + [7] * 20, bootstrap_room=room2)
        t2 = threading.Thread(target=lambda: res.update(p2=p.post("/generate", body2)))
        t2.start()
        st, dr = d.post("/generate", body2)
        t2.join(10)
        check("decode cached = prefill cached", dr["meta_info"]["cached_tokens"] == res["p2"][1]["meta_info"]["cached_tokens"] == 32,
              (dr["meta_info"], res["p2"][1]["meta_info"]))
        # decode leg first, prefill 0.5 s later
        room3 = room ^ 2
        body3 = dict(body, input_ids=prompt(24, 9000), bootstrap_room=room3)
        t3 = threading.Thread(target=lambda: res.update(d3=d.post("/generate", body3)))
        t3.start()
        time.sleep(0.5)
        st, pr3 = p.post("/generate", body3)
        t3.join(10)
        check("decode-first order", st == 200 and res["d3"][0] == 200
              and res["d3"][1]["output_ids"][0] == pr3["output_ids"][0], (pr3, res["d3"]))
        # a leg without bootstrap fields is refused
        st, r = p.post("/generate", {"input_ids": [1, 2, 3], "sampling_params": {"max_new_tokens": 2}})
        check("prefill refuses", st == 400 and "without bootstrap room id" in r["error"]["message"], (st, r))
        out = d.stream("/generate", {"input_ids": [1, 2, 3], "stream": True})
        check("decode refuses (stream)", out[0]["meta_info"]["finish_reason"]["status_code"] == 400, out)
        # a decode leg whose room never arrives
        st, r = d.post("/generate", dict(body, bootstrap_room=12345))
        check("orphan decode fails", st == 500 and r["code"] == 500 and "Decode handshake failed" in r["message"], (st, r))
        # a prefill leg whose decode never arrives
        st, r = p.post("/generate", dict(body, bootstrap_room=777))
        check("orphan prefill fails", st == 500 and "Prefill bootstrap failed" in r["message"], (st, r))
        st, s = d.get("/fake/stats")
        check("stats", s["counters"]["transfers_received"] == 3 and s["counters"]["decode_legs"] >= 3, s["counters"])
    finally:
        p.stop()
        d.stop()


@case
def vllm_two_phase():
    p = Engine("--engine", "vllm", "--kv-role", "kv_producer", "--enable-scale-out", "--kv-lease-duration", "5")
    d = Engine("--engine", "vllm", "--kv-role", "kv_consumer", "--enable-scale-out",
               "--enable-prompt-tokens-details")
    plain = Engine("--engine", "vllm")
    try:
        st, r = plain.post("/inference/v1/generate", {"token_ids": [1, 2], "sampling_params": {}})
        check("403 without --enable-scale-out", st == 403 and r["error"]["type"] == "PermissionDeniedError", (st, r))
        st, src = plain.get("/kv_event_sources")
        check("kv_event_sources", src["0"]["endpoint"] == f"tcp://*:{plain.ports['kv_events_port']}"
              and src["0"]["replay_endpoint"] == f"tcp://*:{plain.ports['replay_port']}"
              and src["0"]["enable_kv_cache_events"] is True, src)
        rid = uuid.uuid4().hex
        toks = prompt(40)
        pre = {"request_id": rid, "token_ids": toks, "stream": False,
               "sampling_params": {"max_tokens": 1},
               "kv_transfer_params": {"do_remote_decode": True, "do_remote_prefill": False, "remote_engine_id": None,
                                      "remote_block_ids": None, "remote_host": None, "remote_port": None}}
        st, pr = p.post("/inference/v1/generate", pre, headers={"X-Request-Id": rid})
        check("prefill 200", st == 200, pr)
        kvp = pr["kv_transfer_params"]
        check("kv params", kvp["do_remote_prefill"] is True and kvp["do_remote_decode"] is False
              and kvp["remote_port"] == p.ports["side_channel_port"] and len(kvp["remote_block_ids"][0]) == 3
              and kvp["remote_request_id"].startswith(f"generate-tokens-{rid}-"), kvp)
        check("prefill request_id", pr["request_id"] == f"generate-tokens-{rid}", pr["request_id"])
        check("prefill 1 token", len(pr["choices"][0]["token_ids"]) == 1, pr)
        dsub = d.sub()
        dec = {"request_id": rid, "token_ids": toks, "stream": True, "stream_options": {"include_usage": True},
               "sampling_params": {"max_tokens": 6, "ignore_eos": True}, "kv_transfer_params": kvp}
        out = d.stream("/inference/v1/generate", dec, headers={"X-Request-Id": rid})
        check("done", out[-1] == "[DONE]", out)
        usage = out[-2]
        check("usage chunk", usage["choices"] == [] and usage["usage"]["completion_tokens"] == 6
              and usage["usage"]["prompt_tokens_details"] == {"cached_tokens": 0}, usage)
        toks_out = [t for c in out[:-2] for t in c["choices"][0]["token_ids"]]
        check("6 tokens", len(toks_out) == 6 and toks_out[0] == pr["choices"][0]["token_ids"][0], toks_out)
        check("finish", out[-3]["choices"][0]["finish_reason"] == "length", out[-3])
        ev = recv_all(dsub)
        check("decode caches the transferred prompt", ev, ev)
        st, s = p.get("/fake/stats")
        check("transfer served", s["counters"].get("transfers_sent") == 1 and not s["leases"], s["counters"])
        # the same params again: the lease is gone -> error
        out = d.stream("/inference/v1/generate", dict(dec, request_id=rid + "x"))
        check("second read fails", out[0]["error"]["code"] == 500, out)
        # second turn: a prefix hit on P flows to D's cached_tokens via remote_prefill_cached_tokens
        st, pr2 = p.post("/inference/v1/generate", dict(pre, request_id=rid + "2", token_ids=toks + [9] * 8))
        check("P cached", pr2["kv_transfer_params"]["remote_prefill_cached_tokens"] == 32, pr2["kv_transfer_params"])
        st, dr2 = d.post("/inference/v1/generate", dict(dec, request_id=rid + "2", token_ids=toks + [9] * 8,
                                                        stream=False, kv_transfer_params=pr2["kv_transfer_params"]))
        check("D reports P's cached", dr2["usage"]["prompt_tokens_details"]["cached_tokens"] == 32, dr2["usage"])
        # without remote_prefill_cached_tokens, D counts the whole transferred prompt as cached
        st, pr3 = p.post("/inference/v1/generate", dict(pre, request_id=rid + "3", token_ids=toks + [8] * 8))
        kv3 = {k: v for k, v in pr3["kv_transfer_params"].items() if k != "remote_prefill_cached_tokens"}
        st, dr3 = d.post("/inference/v1/generate", dict(dec, request_id=rid + "3", token_ids=toks + [8] * 8,
                                                        stream=False, kv_transfer_params=kv3))
        check("D cached = prompt", dr3["usage"]["prompt_tokens_details"]["cached_tokens"] == 48, dr3["usage"])
        # completions with a token-id prompt
        st, c = plain.post("/v1/completions", {"prompt": toks, "max_tokens": 3, "return_token_ids": True})
        check("completions", st == 200 and len(c["choices"][0]["token_ids"]) == 3
              and c["choices"][0]["prompt_token_ids"] == toks and c["id"].startswith("cmpl-"), c)
    finally:
        p.stop()
        d.stop()
        plain.stop()


@case
def vllm_events_and_abort():
    e = Engine("--engine", "vllm", "--enable-scale-out", "--itl-ms", "5", "--enable-prompt-tokens-details")
    try:
        sub = e.sub()
        toks = prompt(20)
        st, r = e.post("/inference/v1/generate", {"token_ids": toks, "sampling_params": {"max_tokens": 20}})
        check("default finish", r["choices"][0]["finish_reason"] == "length", r)
        msgs = recv_all(sub)
        evs = [ev for f in msgs for ev in decode(f[2])[1]]
        check("vllm map events", all(ev["type"] == "BlockStored" for ev in evs) and len(evs) == 2, evs)
        ev0 = evs[0]
        check("vllm keys", list(ev0) == ["type", "block_hashes", "parent_block_hash", "token_ids", "block_size",
                                         "lora_id", "medium", "lora_name", "extra_keys", "group_idx"], list(ev0))
        check("group_idx 0 and extra_keys", ev0["group_idx"] == 0 and ev0["extra_keys"] == [None], ev0)
        check("u64", all(0 <= h < 2**64 for h in ev0["block_hashes"]), ev0)
        # second block (prompt 16..19 + 12 generated tokens) is stored during decode, parented on the first
        check("decode block", evs[1]["parent_block_hash"] == ev0["block_hashes"][0], evs)
        # abort via the external id
        rid = uuid.uuid4().hex

        def on_chunk(item, conn):
            if item != "[DONE]" and "choices" in item and item["choices"] and item["choices"][0]["token_ids"]:
                e.post("/inference/v1/abort_requests", {"request_ids": f"generate-tokens-{rid}"})
        out = e.stream("/inference/v1/generate", {"request_id": rid, "token_ids": toks, "stream": True,
                                                  "sampling_params": {"max_tokens": 5000, "ignore_eos": True}},
                       on_chunk)
        finals = [c for c in out if c != "[DONE]" and c["choices"] and c["choices"][0]["finish_reason"]]
        check("abort finish", finals and finals[-1]["choices"][0]["finish_reason"] == "abort", out[-3:])
        # default max_tokens on /inference/v1/generate is max_model_len - prompt (eos stops it here)
        st, r = e.post("/inference/v1/generate", {"token_ids": [1, 2, 3], "sampling_params": {}})
        check("eos stop", r["choices"][0]["finish_reason"] == "stop" and r["choices"][0]["stop_reason"] is None
              and len(r["choices"][0]["token_ids"]) == 33, r["choices"][0])
    finally:
        e.stop()


@case
def replay_after_dropped_batch_and_restart():
    e = Engine("--engine", "sglang", "--topic", "kv")
    try:
        sub = e.sub(b"kv")
        e.post("/generate", {"input_ids": prompt(20, 100), "sampling_params": {"max_new_tokens": 1}})
        e.post("/fake/drop_events", {"n": 1})
        e.post("/generate", {"input_ids": prompt(20, 200), "sampling_params": {"max_new_tokens": 1}})
        e.post("/generate", {"input_ids": prompt(20, 300), "sampling_params": {"max_new_tokens": 1}})
        msgs = recv_all(sub)
        seqs = [int.from_bytes(f[1], "big") for f in msgs]
        check("gap", seqs == [0, 2], seqs)
        check("topic", all(f[0] == b"kv" for f in msgs), msgs)
        frames = e.replay(1)
        check("replay shape", [len(f) for f in frames] == [4, 4, 4], frames)
        check("replay frames", frames[0][0] == b"" and frames[0][1] == b"kv"
              and int.from_bytes(frames[0][2], "big") == 1 and frames[-1] == [b"", b"", b"\xff" * 8, b""], frames)
        ev = decode(frames[0][3])[1][0]
        check("replayed content", ev["token_ids"] == prompt(16, 200), ev)
        e.post("/fake/restart_publisher")
        e.post("/generate", {"input_ids": prompt(20, 400), "sampling_params": {"max_new_tokens": 1}})
        frames = e.replay(0)
        check("buffer emptied, seq restarts", len(frames) == 2 and int.from_bytes(frames[0][2], "big") == 0
              and decode(frames[0][3])[1][0]["token_ids"] == prompt(16, 400), frames)
        # the SUB reconnects by itself (the first batches after a restart may be lost: slow joiner)
        got = []
        for i in range(20):
            e.post("/generate", {"input_ids": prompt(20, 1000 + 100 * i), "sampling_params": {"max_new_tokens": 1}})
            got += recv_all(sub, 0.2)
            if got:
                break
        check("SUB sees the new publisher", got and int.from_bytes(got[0][1], "big") < 20, got)
    finally:
        e.stop()


@case
def legacy_wire():
    e = Engine("--engine", "vllm", "--legacy-wire")
    try:
        sub = e.sub()
        e.post("/v1/completions", {"prompt": prompt(20), "max_tokens": 1})
        msgs = recv_all(sub)
        b = decode(msgs[0][2])
        check("2-element batch", len(b) == 2, b)
        ev = b[1][0]
        check("array event", isinstance(ev, list) and ev[0] == "BlockStored" and ev[4] == 16, ev)
        frames = e.replay(0)
        check("reply without topic", [len(f) for f in frames] == [3, 3]
              and frames[-1] == [b"", b"\xff" * 8, b""], frames)
    finally:
        e.stop()


@case
def eviction_and_dp_ranks():
    e = Engine("--engine", "sglang", "--capacity-blocks", "2", "--dp-size", "2")
    try:
        sub1 = zmq.Context.instance().socket(zmq.SUB)
        sub1.setsockopt(zmq.SUBSCRIBE, b"")
        sub1.connect(f"tcp://127.0.0.1:{e.ports['kv_events_port'] + 1}")
        time.sleep(0.4)
        a, b = prompt(32, 100), prompt(32, 500)
        for toks in (a, b):
            st, r = e.post("/generate", {"input_ids": toks, "routed_dp_rank": 1,
                                         "sampling_params": {"max_new_tokens": 1}})
            check("rank 1", r["meta_info"]["dp_rank"] == 1, r["meta_info"])
        evs = [(decode(f[2])[2], ev) for f in recv_all(sub1) for ev in decode(f[2])[1]]
        check("rank in batch", all(rk == 1 for rk, _ in evs), evs)
        kinds = [ev["type"] for _, ev in evs]
        check("stored, stored, removed", kinds == ["BlockStored", "BlockStored", "BlockRemoved"], kinds)
        a_hashes = evs[0][1]["block_hashes"]
        check("LRU leaf-first removal of A", sorted(evs[2][1]["block_hashes"]) == sorted(a_hashes)
              and evs[2][1]["block_hashes"][0] == a_hashes[1], evs[2][1])
        st, c = e.get("/fake/cache?rank=1")
        check("capacity", [bl["token_ids"] for bl in c["blocks"]] == [b[:16], b[16:]], c)
        st, c0 = e.get("/fake/cache?rank=0")
        check("rank 0 untouched", c0["blocks"] == [], c0)
    finally:
        e.stop()


@case
def many_concurrent_streams():
    e = Engine("--engine", "sglang", "--incremental-streaming-output", "--skip-tokenizer-init")
    try:
        results = []

        def one(i):
            out = e.stream("/generate", {"input_ids": prompt(30, i * 50), "stream": True,
                                         "sampling_params": {"max_new_tokens": 20, "ignore_eos": True}})
            results.append(sum(len(c["output_ids"]) for c in out[:-1]))
        ts = [threading.Thread(target=one, args=(i,)) for i in range(150)]
        for t in ts:
            t.start()
        for t in ts:
            t.join(60)
        check("all streams complete", len(results) == 150 and all(n == 20 for n in results),
              (len(results), set(results)))
    finally:
        e.stop()


if __name__ == "__main__":
    only = set(sys.argv[1:])
    for fn in CASES:
        if not only or fn.__name__ in only:
            run_case(fn)
    print(f"{len(PASSED)} passed, {len(FAILED)} failed")
    sys.exit(1 if FAILED else 0)
