#!/usr/bin/env python3
"""Routing quality (issue #16): judge router configurations on four workloads, side by side.

For each workload, then for each configuration (so configurations of one workload run back to
back on the same machine state), this starts `kvgate serve` (mocker workers) with the
configuration's router flags on a free port, runs `kvgate-bench` with `--dump-blocks`, scrapes
`/metrics` for the routing regret, stops the server, and runs `perf/oracle.py` on the prompts
the bench actually sent. It prints one table per workload:

  hit rate | oracle (one infinite cache) | hit / oracle | greedy-LRU estimate with the
  workers' real capacity | TTFT p50 / p90 | requests per worker max / mean | regret (blocks,
  total, and per decision)

Workloads (all token-id prompts, so the oracle sees exactly what was sent):
  sessions  the Mooncake conversation trace's 20 busiest conversations (`mooncake --sessions 20`,
            ~357 requests), each replayed turn by turn, 8 conversations at once
  shared    single-turn requests sharing one of 64 system prompts of 2,048 tokens (+256 own),
            16 in flight
  unique    no sharing at all: 2,048-token prompts of their own, 16 in flight (round-robin is
            the reference)
  bursty    the trace's first 400 requests at 10x its timestamps (its arrivals come in bursts
            of requests stamped the same second), open loop

Configurations: `--configs` or the CONFIGS environment variable, `|`-separated `label:flags`
(a bare `default` means no flags); without either, one configuration `ROUTER_ARGS` (the
environment variable's flags, default none). Examples:

  perf/routing_quality.py                                     # today's default, once
  ROUTER_ARGS="--kv-overlap-score-weight 4" perf/routing_quality.py --workloads sessions
  CONFIGS="default|rr:--router-mode round-robin|w4:--kv-overlap-score-weight 4" perf/routing_quality.py

Outputs (per workload and configuration) go to --out-dir: the bench summary, per-request lines,
the prompt dump, the oracle's JSON, the server log and a results.json of every row. Standard
library only; needs release binaries (`cargo build --release --bin kvgate --bin kvgate-bench`).
"""

import argparse
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRACE = os.path.join(ROOT, "..", "shared", "data", "mooncake", "conversation_trace.jsonl")
READY_TIMEOUT_S = 60

WORKLOADS = {
    "sessions": ["--concurrency", "8", "mooncake", "--trace", TRACE, "--sessions", "20"],
    "shared": ["--concurrency", "16", "shared-prefix", "--requests", "800", "--groups", "64",
               "--prefix-tokens", "2048", "--suffix-tokens", "256", "--output-tokens", "64"],
    "unique": ["--concurrency", "16", "shared-prefix", "--requests", "800", "--groups", "1",
               "--prefix-tokens", "0", "--suffix-tokens", "2048", "--output-tokens", "64"],
    "bursty": ["mooncake", "--trace", TRACE, "--max-requests", "400", "--time-scale", "0.1"],
}


def parse_configs(text):
    out = []
    for part in text.split("|"):
        part = part.strip()
        if not part:
            continue
        label, _, flags = part.partition(":")
        out.append((label.strip(), shlex.split(flags)))
    labels = [l for l, _ in out]
    if not out or len(set(labels)) != len(labels):
        sys.exit(f"configurations {text!r}: need at least one, with distinct labels")
    return out


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(port, path):
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
        return r.status, r.read().decode()


def wait_ready(port, proc):
    deadline = time.time() + READY_TIMEOUT_S
    while time.time() < deadline:
        if proc.poll() is not None:
            sys.exit(f"kvgate exited with {proc.returncode} before serving (see its log)")
        try:
            if get(port, "/health")[0] == 200:
                return
        except OSError:
            pass
        time.sleep(0.2)
    sys.exit(f"kvgate did not become healthy within {READY_TIMEOUT_S} s")


def metric(page, name):
    for line in page.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    return None


def run_one(a, workload, label, flags):
    tag = f"{workload}.{label}"
    path = lambda ext: os.path.join(a.out_dir, f"{tag}.{ext}")  # noqa: E731
    port = free_port()
    serve = [a.kvgate, "serve", "--http-host", "127.0.0.1", "--http-port", str(port), "--workers", str(a.workers),
             "--num-gpu-blocks", str(a.num_gpu_blocks), "--speedup-ratio", str(a.speedup_ratio)] + flags
    nice = ["nice", "-n", str(a.nice)] if a.nice else []
    print(f"\n=== {tag}: {shlex.join(serve)}", flush=True)
    log = open(path("server.log"), "w")
    srv = subprocess.Popen(nice + serve, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_ready(port, srv)
        bench = [a.bench, "--url", f"http://127.0.0.1:{port}", "--label", tag, "--progress-s", "0",
                 "--output", path("json"), "--requests-out", path("requests.jsonl"),
                 "--dump-blocks", path("blocks.jsonl")] + WORKLOADS[workload]
        print(f"=== {shlex.join(bench)}", flush=True)
        subprocess.run(nice + bench, check=True, stdout=subprocess.DEVNULL)
        page = get(port, "/metrics")[1]
    finally:
        srv.send_signal(signal.SIGINT)
        try:
            srv.wait(timeout=30)
        except subprocess.TimeoutExpired:
            srv.kill()
            srv.wait()
        log.close()
    oracle = [sys.executable, os.path.join(ROOT, "perf", "oracle.py"), "--dump", path("blocks.jsonl"),
              "--block-size", str(a.page_size), "--workers", str(a.workers),
              "--capacity-blocks", str(a.num_gpu_blocks), "--json", path("oracle.json")]
    subprocess.run(oracle, check=True, stdout=subprocess.DEVNULL)
    with open(path("json")) as f:
        s = json.load(f)
    with open(path("oracle.json")) as f:
        o = json.load(f)
    per_worker = list(s["requests_per_worker"].values())
    decisions = metric(page, "kvgate_routing_overlap_regret_blocks_count") or 0.0
    regret = metric(page, "kvgate_routing_overlap_regret_blocks_total") or 0.0
    best = metric(page, "kvgate_routing_best_overlap_blocks_total") or 0.0
    if o["prompt_tokens"] != s["prompt_tokens"]:
        print(f"warning: oracle saw {o['prompt_tokens']} prompt tokens, the server counted {s['prompt_tokens']}")
    inf = o["infinite_cache"]["hit_rate"]
    greedy = o["greedy_lru"][str(a.workers)]["hit_rate"]
    return {
        "workload": workload, "config": label, "flags": flags, "requests": s["requests"], "ok": s["ok"],
        "hit_rate": s["kv_hit_rate"], "oracle_hit_rate": inf,
        "hit_over_oracle": s["kv_hit_rate"] / inf if inf else None,
        "greedy_lru_hit_rate": greedy,
        "ttft_p50_ms": s["ttft_ms"]["p50"], "ttft_p90_ms": s["ttft_ms"]["p90"],
        "requests_per_worker": per_worker,
        "max_over_mean": max(per_worker) / (sum(per_worker) / a.workers) if per_worker else None,
        "regret_blocks": regret, "decisions": decisions, "best_overlap_blocks": best,
        "loadavg_1m_end": os.getloadavg()[0],
    }


def fmt(x, spec):
    return "-" if x is None else format(x, spec)


def table(rows, workers):
    head = ("| config | hit rate | oracle | hit / oracle | greedy LRU | TTFT p50 | TTFT p90 | req/worker max / mean "
            "| regret blocks | regret / decision | load |")
    lines = [head, "| --- " + "| ---: " * 10 + "|"]
    for r in rows:
        per = r["requests_per_worker"]
        mean = sum(per) / workers if per else 0
        per_dec = r["regret_blocks"] / r["decisions"] if r["decisions"] else None
        lines.append(
            f"| {r['config']} | {r['hit_rate']:.3f} | {r['oracle_hit_rate']:.3f} | {fmt(r['hit_over_oracle'], '.3f')} "
            f"| {r['greedy_lru_hit_rate']:.3f} | {r['ttft_p50_ms']:.1f} | {r['ttft_p90_ms']:.1f} "
            f"| {max(per) if per else 0} / {mean:.0f} ({fmt(r['max_over_mean'], '.2f')}x) "
            f"| {r['regret_blocks']:.0f} | {fmt(per_dec, '.1f')} | {r['loadavg_1m_end']:.1f} |"
        )
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", default=os.environ.get("CONFIGS"),
                   help="'label:flags|label:flags' (default: $CONFIGS, else one config of $ROUTER_ARGS)")
    p.add_argument("--workloads", default="sessions,shared,unique,bursty", help=f"any of {','.join(WORKLOADS)}")
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--num-gpu-blocks", type=int, default=32768, help="KV blocks per mocker worker (32768)")
    p.add_argument("--page-size", type=int, default=16, help="the server's KV block size (kvgate's default 16)")
    p.add_argument("--speedup-ratio", type=float, default=10.0, help="mocker speed-up (10: ten times the fit's timing)")
    p.add_argument("--nice", type=int, default=0, help="run server and bench at this niceness")
    p.add_argument("--kvgate", default=os.path.join(ROOT, "target", "release", "kvgate"))
    p.add_argument("--bench", default=os.path.join(ROOT, "target", "release", "kvgate-bench"))
    p.add_argument("--out-dir", default=os.path.join(ROOT, "target", "routing-quality"))
    a = p.parse_args()
    configs = parse_configs(a.configs) if a.configs else [("config", shlex.split(os.environ.get("ROUTER_ARGS", "")))]
    configs = [(l, [] if f == [] and l == "default" else f) for l, f in configs]
    workloads = [w.strip() for w in a.workloads.split(",") if w.strip()]
    for w in workloads:
        if w not in WORKLOADS:
            sys.exit(f"unknown workload {w!r}: choose among {', '.join(WORKLOADS)}")
    for b in (a.kvgate, a.bench):
        if not os.access(b, os.X_OK):
            sys.exit(f"{b} not found: cargo build --release --bin kvgate --bin kvgate-bench")
    os.makedirs(a.out_dir, exist_ok=True)
    rows = []
    for w in workloads:
        for label, flags in configs:
            rows.append(run_one(a, w, label, flags))
            with open(os.path.join(a.out_dir, "results.json"), "w") as f:
                json.dump(rows, f, indent=1)
    print(f"\n{a.workers} mocker workers x {a.num_gpu_blocks} blocks, speed-up {a.speedup_ratio}; "
          f"configs: " + "; ".join(f"{l} = {shlex.join(f) or '(defaults)'}" for l, f in configs))
    for w in workloads:
        print(f"\n{w}: {shlex.join(WORKLOADS[w])}\n")
        print(table([r for r in rows if r["workload"] == w], a.workers))
    return 0


if __name__ == "__main__":
    sys.exit(main())
