#!/usr/bin/env python3
"""Runs one workload against `kvgate serve` in each router mode and compares them.

For each mode it starts `kvgate serve --router-mode MODE` on a free loopback port, waits for
/health, runs `kvgate-bench` against it (with --server-pid, so the server's CPU is measured),
and stops the server. Then it prints one table with every mode, the ratios of each mode to
`kv`, and writes a TTFT distribution plot (SVG, written directly: no matplotlib needed).

Default workload: the first 2,000 requests of the Mooncake conversation trace. Anything after
`--` replaces the workload part of the kvgate-bench command line, e.g.

    perf/compare_modes.py -- --concurrency 16 shared-prefix --requests 2000

Python 3 standard library only.
"""

import argparse
import datetime
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODES = ["kv", "round-robin", "random"]
# Pseudo-modes: a router mode plus `kvgate serve` flags. `kv-approx` is approximate mode (the
# workers publish no KV events; the frontend predicts their caches), against `kv`'s exact index.
VARIANTS = {"kv-approx": ("kv", ["--no-kv-events"])}
COLORS = {"kv": "#1f77b4", "round-robin": "#d62728", "random": "#2ca02c", "kv-approx": "#ff7f0e"}
# Seconds to wait for a server to answer /health before giving up.
READY_TIMEOUT_S = 60


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(port, proc):
    deadline = time.time() + READY_TIMEOUT_S
    while time.time() < deadline:
        if proc.poll() is not None:
            sys.exit(f"kvgate exited with {proc.returncode} before serving")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    sys.exit(f"kvgate did not become healthy within {READY_TIMEOUT_S} s")


def run_mode(mode, a, workload):
    port = free_port()
    router_mode, variant_args = VARIANTS.get(mode, (mode, []))
    serve = [a.kvgate, "serve", "--http-host", "127.0.0.1", "--http-port", str(port),
             "--workers", str(a.workers), "--router-mode", router_mode,
             "--speedup-ratio", str(a.speedup_ratio), "--num-gpu-blocks", str(a.num_gpu_blocks)]
    serve += variant_args + a.serve_arg
    nice = ["nice", "-n", str(a.nice)] if a.nice else []
    summary = os.path.join(a.out_dir, f"{mode}.json")
    per_request = os.path.join(a.out_dir, f"{mode}.requests.jsonl")
    log = open(os.path.join(a.out_dir, f"{mode}.server.log"), "w")
    print(f"\n=== {mode}: {' '.join(serve)}", flush=True)
    srv = subprocess.Popen(nice + serve, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_ready(port, srv)
        bench = [a.bench, "--url", f"http://127.0.0.1:{port}", "--server-pid", str(srv.pid),
                 "--label", mode, "--output", summary, "--requests-out", per_request] + workload
        print(f"=== {' '.join(bench)}", flush=True)
        subprocess.run(nice + bench, check=True)
    finally:
        srv.send_signal(signal.SIGINT)
        try:
            srv.wait(timeout=30)
        except subprocess.TimeoutExpired:
            srv.kill()
            srv.wait()
        log.close()
    with open(summary) as f:
        s = json.load(f)
    # other processes on the machine skew latencies: keep the 1-minute load average beside them
    s["loadavg_1m_end"] = os.getloadavg()[0]
    with open(per_request) as f:
        ttft = [r["ttft_ms"] for r in map(json.loads, f) if r.get("ttft_ms") is not None and not r.get("error")]
    return s, ttft


def machine():
    cpu = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")), cpu)
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, {platform.system()} {platform.release()}"


def table(results):
    cols = [("hit rate %", lambda s: 100 * s["kv_hit_rate"]),
            ("TTFT p50", lambda s: s["ttft_ms"]["p50"]),
            ("TTFT p90", lambda s: s["ttft_ms"]["p90"]),
            ("TTFT p99", lambda s: s["ttft_ms"]["p99"]),
            ("ITL p50", lambda s: s["itl_ms"]["p50"]),
            ("TPOT p50", lambda s: s["tpot_ms"]["p50"]),
            ("E2E p50", lambda s: s["e2e_ms"]["p50"]),
            ("req/s", lambda s: s["request_throughput_per_s"]),
            ("out tok/s", lambda s: s["output_token_throughput_per_s"]),
            ("errors", lambda s: sum(s["errors"].values())),
            ("load avg 1m", lambda s: s.get("loadavg_1m_end", 0)),
            ("loadgen CPU us/req", lambda s: s["cpu"]["loadgen_cpu_us_per_request"]),
            ("frontend CPU us/req", lambda s: s["cpu"]["frontend_cpu_us_per_request"] or 0),
            ("server CPU us/req", lambda s: s["cpu"]["server_cpu_us_per_request"] or 0)]
    lines = ["| mode | " + " | ".join(c for c, _ in cols) + " |",
             "| --- |" + " ---: |" * len(cols)]
    for mode, (s, _) in results.items():
        lines.append(f"| {mode} | " + " | ".join(fmt(f(s)) for _, f in cols) + " |")
    return "\n".join(lines)


def fmt(x):
    return f"{x:.0f}" if abs(x) >= 100 else f"{x:.2f}" if abs(x) < 10 else f"{x:.1f}"


def ratios(results):
    if "kv" not in results:
        return ""
    kv = results["kv"][0]
    lines = ["| mode / kv | hit rate | TTFT p50 | TTFT p90 | TTFT p99 | E2E p50 |", "| --- |" + " ---: |" * 5]
    for mode, (s, _) in results.items():
        if mode == "kv":
            continue
        r = [s["kv_hit_rate"] / kv["kv_hit_rate"] if kv["kv_hit_rate"] else float("nan")]
        r += [s["ttft_ms"][p] / kv["ttft_ms"][p] for p in ("p50", "p90", "p99")]
        r += [s["e2e_ms"]["p50"] / kv["e2e_ms"]["p50"]]
        lines.append(f"| {mode} | " + " | ".join(f"{x:.2f}×" for x in r) + " |")
    return "\n".join(lines)


def svg_cdf(results, title, path):
    """TTFT CDF per mode, log-scale x axis."""
    import math
    w, h, ml, mr, mt, mb = 720, 420, 70, 150, 40, 50
    pw, ph = w - ml - mr, h - mt - mb
    vals = [v for _, t in results.values() for v in t if v > 0]
    lo = 10 ** math.floor(math.log10(min(vals)))
    hi = 10 ** math.ceil(math.log10(max(vals)))
    x = lambda v: ml + pw * (math.log10(max(v, lo)) - math.log10(lo)) / (math.log10(hi) - math.log10(lo))
    y = lambda q: mt + ph * (1 - q)
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">',
           f'<rect width="{w}" height="{h}" fill="white"/>',
           f'<text x="{ml + pw / 2}" y="22" text-anchor="middle" font-size="14">{title}</text>']
    d = lo
    while d <= hi * 1.0001:
        for m in range(1, 10):
            v = d * m
            if v > hi * 1.0001:
                break
            out.append(f'<line x1="{x(v):.1f}" y1="{mt}" x2="{x(v):.1f}" y2="{mt + ph}" stroke="#eee"/>')
        out.append(f'<line x1="{x(d):.1f}" y1="{mt}" x2="{x(d):.1f}" y2="{mt + ph}" stroke="#ccc"/>')
        out.append(f'<text x="{x(d):.1f}" y="{mt + ph + 16}" text-anchor="middle">{d:g}</text>')
        d *= 10
    for q in (0, 0.25, 0.5, 0.75, 0.9, 1):
        out.append(f'<line x1="{ml}" y1="{y(q):.1f}" x2="{ml + pw}" y2="{y(q):.1f}" stroke="#ddd"/>')
        out.append(f'<text x="{ml - 6}" y="{y(q) + 4:.1f}" text-anchor="end">{q:g}</text>')
    out.append(f'<rect x="{ml}" y="{mt}" width="{pw}" height="{ph}" fill="none" stroke="black"/>')
    out.append(f'<text x="{ml + pw / 2}" y="{h - 12}" text-anchor="middle">TTFT (ms, log scale)</text>')
    out.append(f'<text x="18" y="{mt + ph / 2}" text-anchor="middle" transform="rotate(-90 18 {mt + ph / 2})">'
               'fraction of requests ≤ x</text>')
    for i, (mode, (s, t)) in enumerate(results.items()):
        t = sorted(v for v in t if v > 0)
        n = len(t)
        step = max(1, n // 800)  # at most ~800 points per curve
        pts = [(x(t[k]), y((k + 1) / n)) for k in range(0, n, step)] + [(x(t[-1]), y(1))]
        path_d = " ".join(f"{px:.1f},{py:.1f}" for px, py in pts)
        c = COLORS.get(mode, "#555")
        out.append(f'<polyline points="{path_d}" fill="none" stroke="{c}" stroke-width="2"/>')
        ly = mt + 20 + i * 36
        out.append(f'<line x1="{ml + pw + 12}" y1="{ly}" x2="{ml + pw + 36}" y2="{ly}" stroke="{c}" stroke-width="3"/>')
        out.append(f'<text x="{ml + pw + 42}" y="{ly + 4}">{mode}</text>')
        out.append(f'<text x="{ml + pw + 42}" y="{ly + 18}" font-size="10">p50 {s["ttft_ms"]["p50"]:.0f} ms, '
                   f'hit {100 * s["kv_hit_rate"]:.0f}%</text>')
    out.append("</svg>")
    with open(path, "w") as f:
        f.write("\n".join(out) + "\n")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kvgate", default=os.path.join(ROOT, "target/release/kvgate"))
    p.add_argument("--bench", default=os.path.join(ROOT, "target/release/kvgate-bench"))
    p.add_argument("--modes", default=",".join(MODES), help=f"router modes, or {', '.join(VARIANTS)}")
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--speedup-ratio", type=float, default=10)
    p.add_argument("--num-gpu-blocks", type=int, default=131072)
    p.add_argument("--nice", type=int, default=0,
                   help="run server and generator at this niceness (negative, as root, shields them from builds)")
    p.add_argument("--serve-arg", action="append", default=[], help="extra `kvgate serve` argument (repeatable)")
    p.add_argument("--trace", default=os.path.join(ROOT, "../shared/data/mooncake/conversation_trace.jsonl"))
    p.add_argument("--max-requests", type=int, default=2000)
    p.add_argument("--time-scale", type=float, default=0.25)
    p.add_argument("--max-output-tokens", type=int, default=None)
    p.add_argument("--out-dir", default=os.path.join(ROOT, "target/perf-compare"))
    p.add_argument("--svg", default=None, help="plot path (default OUT_DIR/ttft_by_mode.svg)")
    p.add_argument("bench_args", nargs="*", help="after --: the workload part of the kvgate-bench command")
    a = p.parse_args()
    os.makedirs(a.out_dir, exist_ok=True)
    if a.bench_args:
        workload = a.bench_args
        title = "TTFT by router mode: " + " ".join(a.bench_args)
    else:
        workload = ["mooncake", "--trace", a.trace, "--max-requests", str(a.max_requests),
                    "--time-scale", str(a.time_scale)]
        if a.max_output_tokens:
            workload += ["--max-output-tokens", str(a.max_output_tokens)]
        title = (f"TTFT by router mode: Mooncake, first {a.max_requests} requests, "
                 f"time x{a.time_scale}, {a.workers} workers")
    started = datetime.datetime.now(datetime.timezone.utc)
    results = {m: run_mode(m, a, workload) for m in a.modes.split(",")}
    svg = a.svg or os.path.join(a.out_dir, "ttft_by_mode.svg")
    svg_cdf(results, title, svg)
    report = [f"date: {started:%Y-%m-%d %H:%M} UTC", f"machine: {machine()}",
              f"command: {' '.join(sys.argv)}", "", table(results), "", ratios(results), "", f"plot: {svg}"]
    if "kv" in results and "round-robin" in results:
        kv, rr = results["kv"][0], results["round-robin"][0]
        ok = kv["kv_hit_rate"] > rr["kv_hit_rate"] and kv["ttft_ms"]["p50"] < rr["ttft_ms"]["p50"]
        report.append(f"kv vs round-robin: higher hit rate and lower TTFT p50: {'yes' if ok else 'NO'}")
    text = "\n".join(report)
    print("\n" + text)
    with open(os.path.join(a.out_dir, "compare.md"), "w") as f:
        f.write(text + "\n")


if __name__ == "__main__":
    main()
