#!/usr/bin/env python3
"""Adapter overhead (issue #12): kvgate + its SGLang adapter in front of the fake SGLang engine,
against the fake engine alone, closed loop at saturation, both measured in one run.

It starts ONE fake SGLang engine (tests/fake_engine/fake_engine.py, zero TTFT/ITL) and ONE
`kvgate serve --engine sglang --engine-url <it>` in front of it (plus, optionally, more kvgate
builds in front of the same engine, --also-kvgate, and a `kvgate serve` with its built-in
mocker engine, --mocker), then, for every concurrency level, runs the paths in mirrored order
(engine, kvgate, ..., ..., kvgate, engine) --rounds times:

  engine   POST {engine}/generate  {"input_ids": P, "sampling_params": {"max_new_tokens": N,
           "ignore_eos": true, "temperature": 1.0, "top_p": 1.0}, "stream": true}
  kvgate   POST {kvgate}/v1/completions  {"model": M, "prompt": P, "max_tokens": N,
           "ignore_eos": true, "stream": true, "stream_options": {"include_usage": true}}

with the same token-id prompt P (no chat template) and N output tokens. Each run is a closed
loop of C concurrent streams until --requests have completed. Per run it reports req/s, TTFT
(request sent -> first SSE `data:` event, which carries the first token on both paths)
p50/p99, E2E p50, and the CPU time per request of each kvgate process (whole process and per
thread name: kvgate-shard-N = OpenAI side, kvgate-engine = the SGLang adapter, or the mocker's
simulation), of the fake engine and of this driver, from /proc/<pid>/stat and
/proc/<pid>/task/*/stat (utime + stime) and getrusage deltas; "other" = the machine's busy time
not accounted for by those processes (other users' work, kernel networking time charged to no
process); and connects/req = the machine's TCP ActiveOpens during the run, less the driver's
own C connections, per request (whether the adapter reuses its connections to the engine).

Every response is checked: SGLang's last chunk must report meta_info.completion_tokens == N,
kvgate's usage.completion_tokens == N; anything else counts as an error.

The fake engine is Python (one asyncio thread) and, with this Python driver, the bottleneck on
both paths: the two cost ~3.5 ms of CPU per 64-token request against kvgate's ~1 ms, and on a
2-core box all of them share the cores. So the req/s ratio measures "engine + kvgate on this
box" rather than kvgate's own limit; kvgate's CPU per request (and its kvgate-engine thread's)
is the adapter's own cost.

The driver reads each stream in blocks (it does not split every SSE line) so that its own CPU
stays small; it only parses the first and last event of each response.

Needs the venv of tests/fake_engine/requirements.txt (aiohttp, msgspec, pyzmq); run it with
that venv's python:

  python3 -m venv /work/scratch/perf-venv
  /work/scratch/perf-venv/bin/pip install -r tests/fake_engine/requirements.txt
  cargo build --release --bin kvgate
  /work/scratch/perf-venv/bin/python perf/adapter_overhead.py --concurrency 8,32,64 --requests 2000 --rounds 2 \
      --shards 1 --mocker --nice -10
  /work/scratch/perf-venv/bin/python perf/adapter_overhead.py --report-from target/perf-adapter/adapter_overhead.json
"""

import argparse
import asyncio
import json
import os
import random
import resource
import signal
import statistics
import subprocess
import sys
import threading
import time

import aiohttp

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLK_TCK = os.sysconf("SC_CLK_TCK")


def proc_cpu_s(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def threads_cpu_s(pid):
    """CPU seconds per thread name of one process (threads of one name summed)."""
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                st = f.read()
        except OSError:
            continue
        name = st[st.index("(") + 1:st.rindex(")")]
        fields = st.rsplit(")", 1)[1].split()
        out[name] = out.get(name, 0.0) + (int(fields[11]) + int(fields[12])) / CLK_TCK
    return out


def tcp_active_opens():
    """Tcp ActiveOpens of this network namespace (every connect() on the machine)."""
    with open("/proc/net/snmp") as f:
        rows = [l.split() for l in f if l.startswith("Tcp:")]
    return int(rows[1][rows[0].index("ActiveOpens")])


def self_cpu_s():
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def machine_busy_s():
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    return (sum(v[:8]) - v[3] - v[4]) / CLK_TCK


def pct(xs, p):
    """Nearest-rank percentile (as kvgate-bench)."""
    if not xs:
        return float("nan")
    s = sorted(xs)
    k = max(0, min(len(s) - 1, int(-(-p * len(s) // 100)) - 1))
    return s[k]


def start(cmd, ready_prefix, log_path, nice):
    """Start cmd; return (Popen, the first stdout line starting with ready_prefix)."""
    full = (["nice", "-n", str(nice)] if nice else []) + cmd
    print("  $ " + " ".join(cmd), flush=True)
    log = open(log_path, "w")
    p = subprocess.Popen(full, stdout=subprocess.PIPE, stderr=log, stdin=subprocess.DEVNULL, text=True,
                         start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline:
        line = p.stdout.readline()
        if not line:
            raise RuntimeError(f"{cmd[0]} exited ({p.poll()}); see {log_path}")
        log.write(line)
        log.flush()
        if line.startswith(ready_prefix):
            # keep draining stdout into the log so that the child never blocks on a full pipe
            threading.Thread(target=lambda: [log.write(l) for l in p.stdout], daemon=True).start()
            return p, line.strip()
    raise RuntimeError(f"{cmd[0]} not ready in 120 s")


def stop(p):
    if p.poll() is None:
        p.send_signal(signal.SIGINT)
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


class Target:
    def __init__(self, name, url, body, count_tokens):
        self.name, self.url, self.body, self.count_tokens = name, url, json.dumps(body).encode(), count_tokens


def sglang_tokens(ev):
    return ev.get("meta_info", {}).get("completion_tokens")


def openai_tokens(ev):
    return (ev.get("usage") or {}).get("completion_tokens")


async def one(session, t, n_out):
    """One streamed request: (ttft_s, e2e_s) or an error string."""
    t0 = time.perf_counter()
    ttft = None
    tail = b""
    async with session.post(t.url, data=t.body, headers={"content-type": "application/json"}) as r:
        if r.status != 200:
            return f"http_{r.status}"
        async for block in r.content.iter_any():
            if ttft is None and b"data:" in block:
                ttft = time.perf_counter() - t0
            tail = (tail + block)[-65536:]
    e2e = time.perf_counter() - t0
    events = [e.strip() for e in tail.split(b"\n\n") if e.strip().startswith(b"data:")]
    events = [e[5:].strip() for e in events]
    events = [e for e in events if e != b"[DONE]"]
    if not events or ttft is None:
        return "empty"
    try:
        last = json.loads(events[-1])
    except ValueError:
        return "bad_json"
    if "error" in last:
        return "stream_error"
    got = t.count_tokens(last)
    if got != n_out:
        return f"tokens_{got}"
    return ttft, e2e


async def closed_loop(t, concurrency, requests, n_out):
    conn = aiohttp.TCPConnector(limit=0, force_close=False)
    timeout = aiohttp.ClientTimeout(total=120)
    ttfts, e2es, errors = [], [], {}
    left = requests
    async with aiohttp.ClientSession(connector=conn, timeout=timeout) as session:
        async def worker():
            nonlocal left
            while left > 0:
                left -= 1
                try:
                    res = await one(session, t, n_out)
                except (aiohttp.ClientError, asyncio.TimeoutError) as e:
                    res = type(e).__name__
                if isinstance(res, str):
                    errors[res] = errors.get(res, 0) + 1
                else:
                    ttfts.append(res[0])
                    e2es.append(res[1])
        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    return wall, ttfts, e2es, errors


def measure(t, concurrency, requests, n_out, pids):
    cpu0 = {k: proc_cpu_s(p) for k, p in pids.items()}
    th0 = {k: threads_cpu_s(p) for k, p in pids.items() if k != "engine"}
    me0, busy0, opens0 = self_cpu_s(), machine_busy_s(), tcp_active_opens()
    wall, ttfts, e2es, errors = asyncio.run(closed_loop(t, concurrency, requests, n_out))
    cpu = {k: proc_cpu_s(p) - cpu0[k] for k, p in pids.items()}
    th1 = {k: threads_cpu_s(p) for k, p in pids.items() if k != "engine"}
    cpu["driver"] = self_cpu_s() - me0
    busy = machine_busy_s() - busy0
    opens = tcp_active_opens() - opens0
    ok = max(len(ttfts), 1)
    threads = {k: {n: v - th0[k].get(n, 0.0) for n, v in th1[k].items()} for k in th1}
    return {
        # connect()s on the whole machine during the run, less the driver's own `concurrency` connections
        "tcp_connects_per_req": max(0, opens - concurrency) / ok,
        "threads_cpu_ms_per_req": {k: {n: 1000 * v / ok for n, v in d.items()} for k, d in threads.items()},
        "target": t.name, "concurrency": concurrency, "ok": len(ttfts), "errors": errors, "wall_s": wall,
        "req_per_s": len(ttfts) / wall,
        "ttft_ms": {"p50": 1000 * pct(ttfts, 50), "p99": 1000 * pct(ttfts, 99), "mean": 1000 * statistics.fmean(ttfts) if ttfts else None},
        "e2e_ms": {"p50": 1000 * pct(e2es, 50), "p99": 1000 * pct(e2es, 99)},
        "cpu_s": cpu,
        "cpu_ms_per_req": {k: 1000 * v / ok for k, v in cpu.items()},
        "other_cpu_cores": max(0.0, busy - sum(cpu.values())) / wall,
        "loadavg_1m": os.getloadavg()[0],
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kvgate", default=os.path.join(ROOT, "target/release/kvgate"))
    ap.add_argument("--fake-engine", default=os.path.join(ROOT, "tests/fake_engine/fake_engine.py"))
    ap.add_argument("--engine-python", default=sys.executable, help="python with the fake engine's requirements")
    ap.add_argument("--model-path", default=os.path.normpath(os.path.join(ROOT, "../shared/models/qwen3-0.6b")))
    ap.add_argument("--served-model-name", default="Qwen/Qwen3-0.6B")
    ap.add_argument("--shards", type=int, default=1, help="kvgate --shards (0 = kvgate's default, one per core)")
    ap.add_argument("--concurrency", default="8,32,64")
    ap.add_argument("--requests", type=int, default=2000, help="per run")
    ap.add_argument("--rounds", type=int, default=2, help="ABBA blocks per level (engine, kvgate, kvgate, engine)")
    ap.add_argument("--warmup", type=int, default=200, help="requests per target before the first level")
    ap.add_argument("--prompt-tokens", type=int, default=256)
    ap.add_argument("--output-tokens", type=int, default=64)
    ap.add_argument("--mocker", action="store_true",
                    help="also measure a `kvgate serve --workers 1 --speedup-ratio R` (built-in mocker engine, "
                         "same shards) with the same /v1/completions requests: kvgate's own work without the adapter")
    ap.add_argument("--mocker-speedup", type=float, default=10,
                    help="R: the mocker's speed-up; at 10 a decode step is ~0.7 ms, so tokens reach the frontend one "
                         "by one as they do from the fake engine (at 1000 whole answers arrive at once)")
    ap.add_argument("--also-kvgate", action="append", default=[], metavar="LABEL=PATH",
                    help="another kvgate build in front of the same engine (repeat), measured as path LABEL")
    ap.add_argument("--engine-arg", action="append", default=[], help="extra fake engine flag (repeat), "
                    "e.g. --engine-arg=--incremental-streaming-output")
    ap.add_argument("--nice", type=int, default=0, help="niceness of engine, kvgate and driver (negative needs root)")
    ap.add_argument("--out", default=os.path.join(ROOT, "target/perf-adapter/adapter_overhead.json"))
    a = ap.parse_args()
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    logs = os.path.dirname(os.path.abspath(a.out))
    if a.nice:
        os.nice(a.nice)  # the engine and kvgate inherit it
    nice = 0

    rnd = random.Random(42)
    prompt = [rnd.randrange(100, 150000) for _ in range(a.prompt_tokens)]
    eng_p, line = start([a.engine_python, a.fake_engine, "--engine", "sglang", "--port", "0", "--skip-tokenizer-init",
                         "--served-model-name", a.served_model_name, "--ttft-ms", "0", "--itl-ms", "0"] + a.engine_arg,
                        "READY ", os.path.join(logs, "fake_engine.log"), nice)
    kv_p = mk_p = None
    extra = {}  # label -> (Popen, url)
    try:
        eng_port = json.loads(line.split(" ", 1)[1])["port"]
        eng_url = f"http://127.0.0.1:{eng_port}"
        cmd = [a.kvgate, "serve", "--engine", "sglang", "--engine-url", eng_url, "--model-path", a.model_path,
               "--served-model-name", a.served_model_name, "--http-host", "127.0.0.1", "--http-port", "0"]
        if a.shards:
            cmd += ["--shards", str(a.shards)]
        env_log = os.environ.get("DYN_LOG")
        os.environ["DYN_LOG"] = env_log or "warn"
        kv_p, line = start(cmd, "kvgate listening on ", os.path.join(logs, "kvgate.log"), nice)
        kv_url = line.split()[3]
        for spec in a.also_kvgate:
            label, path = spec.split("=", 1)
            q, l2 = start([path] + cmd[1:], "kvgate listening on ", os.path.join(logs, f"kvgate-{label}.log"), nice)
            extra[label] = (q, l2.split()[3])
        if a.mocker:
            mcmd = [a.kvgate, "serve", "--workers", "1", "--speedup-ratio", str(a.mocker_speedup), "--model-path", a.model_path,
                    "--served-model-name", a.served_model_name, "--http-host", "127.0.0.1", "--http-port", "0"]
            if a.shards:
                mcmd += ["--shards", str(a.shards)]
            mk_p, line = start(mcmd, "kvgate listening on ", os.path.join(logs, "kvgate-mocker.log"), nice)
            mk_url = line.split()[3]
        targets = {
            "engine": Target("engine", eng_url + "/generate",
                             {"input_ids": prompt, "sampling_params": {"max_new_tokens": a.output_tokens, "ignore_eos": True,
                                                                       "temperature": 1.0, "top_p": 1.0}, "stream": True},
                             sglang_tokens),
            "kvgate": Target("kvgate", kv_url + "/v1/completions",
                             {"model": a.served_model_name, "prompt": prompt, "max_tokens": a.output_tokens,
                              "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}},
                             openai_tokens),
        }
        body = json.loads(targets["kvgate"].body)
        for label, (q, url) in extra.items():
            targets[label] = Target(label, url + "/v1/completions", body, openai_tokens)
        if a.mocker:
            targets["mocker"] = Target("mocker", mk_url + "/v1/completions", body, openai_tokens)
        pids = {"kvgate": kv_p.pid, "engine": eng_p.pid}
        pids.update({label: q.pid for label, (q, _) in extra.items()})
        if a.mocker:
            pids["mocker"] = mk_p.pid
        print(f"engine {eng_url} (pid {eng_p.pid}), kvgate {kv_url} (pid {kv_p.pid}, shards {a.shards or 'default'}); "
              f"prompt {a.prompt_tokens} tokens, output {a.output_tokens}", flush=True)
        names = ["engine", "kvgate"] + list(extra) + (["mocker"] if a.mocker else [])
        for name in names:
            w = measure(targets[name], 8, a.warmup, a.output_tokens, pids)
            print(f"  warm-up {name}: {w['ok']} ok, errors {w['errors']}", flush=True)
        runs = []
        for c in [int(x) for x in a.concurrency.split(",")]:
            for _ in range(a.rounds):
                for name in names + names[::-1]:
                    r = measure(targets[name], c, a.requests, a.output_tokens, pids)
                    runs.append(r)
                    cm = r["cpu_ms_per_req"]
                    proc = "kvgate" if name == "engine" else name
                    th = r["threads_cpu_ms_per_req"].get(proc, {})
                    print(f"  c={c:<3} {name:6} {r['req_per_s']:7.1f} req/s  TTFT p50 {r['ttft_ms']['p50']:6.2f} "
                          f"p99 {r['ttft_ms']['p99']:6.2f} ms  E2E p50 {r['e2e_ms']['p50']:6.1f}  CPU ms/req {proc} "
                          f"{cm[proc]:.3f} engine {cm['engine']:.3f} driver {cm['driver']:.3f}  threads "
                          + " ".join(f"{n}={v:.3f}" for n, v in sorted(th.items()) if v > 0)
                          + f"  connects/req {r['tcp_connects_per_req']:.2f}  other {r['other_cpu_cores']:.2f} cores  errors {r['errors'] or 0}", flush=True)
    finally:
        for q in [mk_p, kv_p] + [q for q, _ in extra.values()]:
            if q:
                stop(q)
        stop(eng_p)
    with open(a.out, "w") as f:
        json.dump({"args": vars(a), "argv": sys.argv, "prompt_tokens": a.prompt_tokens, "runs": runs}, f, indent=1)
    print()
    print(report(runs))


def report(runs):
    """Medians over the runs of each (level, path), then the kvgate / engine comparison."""
    med = statistics.median
    paths = list(dict.fromkeys(r["target"] for r in runs))
    paths = ["engine"] + [p for p in paths if p not in ("engine", "mocker")] + (["mocker"] if "mocker" in paths else [])
    out = ["Per path (medians over the runs; CPU in ms per request; `kvgate proc` is the kvgate process serving that "
           "path: `kvgate serve --engine sglang` for engine-less rows too (idle), the mocker serve for `mocker`):", "",
           "| c | path | runs | req/s | TTFT p50 | TTFT p99 | E2E p50 | kvgate proc CPU | shard thread | control thread "
           "| kvgate-engine thread | fake engine CPU | driver CPU | connects/req | other cores | errors |",
           "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    summary = []
    for c in sorted({r["concurrency"] for r in runs}):
        agg = {}
        for name in paths:
            rs = [r for r in runs if r["concurrency"] == c and r["target"] == name]
            proc = "kvgate" if name == "engine" else name

            def th(prefix):
                return med([sum(v for n, v in r["threads_cpu_ms_per_req"][proc].items() if n.startswith(prefix))
                            for r in rs])
            g = {
                "n": len(rs), "rps": med([r["req_per_s"] for r in rs]),
                "t50": med([r["ttft_ms"]["p50"] for r in rs]), "t99": med([r["ttft_ms"]["p99"] for r in rs]),
                "e50": med([r["e2e_ms"]["p50"] for r in rs]),
                "kv": med([r["cpu_ms_per_req"][proc] for r in rs]),
                "shard": th("kvgate-shard"), "control": th("kvgate-control"), "eng_th": th("kvgate-engine"),
                "en": med([r["cpu_ms_per_req"]["engine"] for r in rs]),
                "dr": med([r["cpu_ms_per_req"]["driver"] for r in rs]),
                "oth": med([r["other_cpu_cores"] for r in rs]),
                "conn": med([r.get("tcp_connects_per_req", float("nan")) for r in rs]),
                "err": sum(sum(r["errors"].values()) for r in rs),
                "rps_all": [round(r["req_per_s"], 1) for r in rs],
                "kv_all": [round(r["cpu_ms_per_req"][proc], 3) for r in rs],
            }
            agg[name] = g
            out.append(f"| {c} | {name} | {g['n']} | {g['rps']:.1f} | {g['t50']:.2f} | {g['t99']:.2f} | {g['e50']:.1f} | "
                       f"{g['kv']:.3f} | {g['shard']:.3f} | {g['control']:.3f} | {g['eng_th']:.3f} | {g['en']:.3f} | "
                       f"{g['dr']:.3f} | {g['conn']:.2f} | {g['oth']:.2f} | {g['err']} |")
        e = agg["engine"]
        for kname in [p for p in paths if p not in ("engine", "mocker")]:
            k = agg[kname]
            row = (f"| {c} | {kname} | {k['rps'] / e['rps']:.3f}× | {k['t50'] - e['t50']:+.2f} | {k['t99'] - e['t99']:+.2f} | "
                   f"{k['e50'] - e['e50']:+.1f} | {k['kv']:.3f} | {k['en'] / e['en']:.3f}× |")
            if "mocker" in agg:
                m = agg["mocker"]
                fe = m["kv"] - m["eng_th"]
                row += f" {fe:.3f} | {k['kv'] - fe:.3f} |"
            row += f" {e['rps_all']} | {k['rps_all']} |"
            summary.append(row)
    head = ("| c | path | req/s path / engine | TTFT p50 added ms | TTFT p99 added ms | E2E p50 added ms | kvgate CPU ms/req "
            "| fake engine CPU/req, behind kvgate / alone |")
    rule = "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |"
    if "mocker" in paths:
        head += " kvgate with mocker, less its engine thread | kvgate (SGLang) minus that |"
        rule += " ---: | ---: |"
    head += " engine req/s per run | path req/s per run |"
    rule += " --- | --- |"
    return "\n".join(out + ["", head, rule] + summary)


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--report-from":
        with open(sys.argv[2]) as f:
            print(report(json.load(f)["runs"]))
    else:
        main()
