#!/usr/bin/env python3
"""kvgate side by side with NVIDIA Dynamo's frontend and the SGLang router, on one machine.

For each system named in --systems it starts the same topology (a KV-aware router in front of
--workers simulated engines with 16-token KV blocks, the same speed-up and the same KV capacity
where the flags allow), waits until the router sees every worker, sends a small warm-up, runs
the same `kvgate-bench` workload with --server-pid set to the router (frontend) process, and
stops everything again. Each workload in --runs gets a freshly started system, so no run
inherits another's caches. It then prints one table and kvgate's ratio to each other system.

Systems (all serve the Qwen3 model directory, so every frontend tokenizes with the same
tokenizer and chat template):

  kvgate        `kvgate frontend` + WORKERS x `kvgate worker`, with etcd and NATS (KV events
                over NATS, requests over TCP): the frontend is a process of its own, as
                Dynamo's is, so its CPU compares directly.
  kvgate-serve  `kvgate serve --workers WORKERS` (frontend and engines in one process, no
                network hop); "frontend CPU" excludes its `kvgate-engine` threads.
  dynamo        `python -m dynamo.frontend --router-mode kv` + `python -m dynamo.mocker
                --num-workers WORKERS` (file discovery, ZMQ events, TCP request plane).
  sglang        `python -m sglang_router.launch_router --policy cache_aware` in front of
                WORKERS x `kvgate serve --workers 1` (each an OpenAI server answering
                GET /health; the router keeps its own approximate radix tree of request text
                and does not tokenize; the workers do).

Runs (each closed or open loop, text prompts, since the SGLang router accepts no token-id
prompts on /v1/completions):

  saturation    closed loop, --concurrency 64: shared-prefix --chat (16 groups sharing a
                1,024-word system prompt, 64 words of their own, 64 output tokens)
  rate          open loop, Poisson: multi-turn sessions (8 groups of 1,000-word system
                prompts, 4 turns of 50 words each resending the history, 64 output tokens)
  longctx       closed loop, 8 in flight: --longctx-sessions (32) multi-turn sessions of 8 turns, each turn adding
                4,700 one-token words and resending the history (prompts grow to ~38k tokens), 32
                output tokens (issue #13: long prompts)
  mooncake      open loop: the Mooncake conversation trace as token ids (not for sglang)

Besides the bench's figures, the script reads /proc for the CPU time of every process of the
system under test (frontend, workers, etcd/NATS) and of the whole machine over each run, so
"other CPU" shows how much the machine was used by anything else (e.g. builds).

Usage:

    perf/anchors/side_by_side.py                                  # kvgate, dynamo, sglang
    perf/anchors/side_by_side.py --systems kvgate,kvgate-serve,dynamo,sglang --nice -10
    perf/anchors/side_by_side.py --systems kvgate,dynamo --runs saturation,mooncake
    perf/anchors/side_by_side.py --report-from target/perf-anchors/side_by_side.json  # tables again

Results go to --out-dir (default target/perf-anchors): side_by_side.md (the report),
side_by_side.json (every bench summary plus the per-process CPU), and per system and run the
logs of every process, bench.json and requests.jsonl.

Dynamo and the SGLang router are Python packages installed in virtual environments (see
perf/anchors/README.md); --dynamo-python and --sglang-python name their interpreters. etcd
and nats-server come from Debian (`apt-get install etcd-server nats-server`).

Python 3 standard library only.
"""

import argparse
import datetime
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SYSTEMS = ["kvgate", "kvgate-serve", "dynamo", "sglang"]
READY_TIMEOUT_S = 120
CLK_TCK = os.sysconf("SC_CLK_TCK")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_get(url, timeout=2):
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read().decode("utf-8", "replace")
    except OSError:
        return None, ""


def proc_cpu_s(pid):
    """utime + stime of one process (all its threads), seconds; None once it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLK_TCK
    except (OSError, IndexError, ValueError):
        return None


def descendants(pids):
    """pids and every process below them (by PPid in /proc)."""
    children = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(d))
    out, todo = [], list(pids)
    while todo:
        p = todo.pop()
        if p not in out:
            out.append(p)
            todo.extend(children.get(p, []))
    return out


def machine_busy_s():
    """CPU seconds the whole machine spent busy (all cores), from /proc/stat."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    idle = v[3] + v[4]
    return (sum(v[:8]) - idle) / CLK_TCK


class Proc:
    def __init__(self, name, cmd, log_dir, env=None, nice=0):
        self.name = name
        self.cmd = cmd
        self.log_path = os.path.join(log_dir, f"{name}.log")
        self.log = open(self.log_path, "w")
        full = (["nice", "-n", str(nice)] if nice else []) + cmd
        print(f"    $ {' '.join(cmd)}", flush=True)
        self.p = subprocess.Popen(full, stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                  env=env, start_new_session=True)

    @property
    def pid(self):
        return self.p.pid

    def check(self):
        if self.p.poll() is not None:
            self.log.flush()
            with open(self.log_path) as f:
                tail = f.read()[-3000:]
            raise RuntimeError(f"{self.name} exited with {self.p.returncode}; its log ends:\n{tail}")

    def stop(self):
        if self.p.poll() is None:
            self.p.send_signal(signal.SIGINT)
            try:
                self.p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait()
        self.log.close()


class System:
    """A started system: its processes, the one measured as the frontend, its URL and model."""

    def __init__(self, name, a, run_dir):
        self.name, self.a, self.dir = name, a, run_dir
        self.procs = []
        self.frontend = None
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.model = a.model_path
        self.notes = []

    def spawn(self, name, cmd, env=None):
        p = Proc(name, cmd, self.dir, env=env, nice=self.a.nice)
        self.procs.append(p)
        return p

    def wait(self, what, ready, timeout=READY_TIMEOUT_S):
        deadline = time.time() + timeout
        while time.time() < deadline:
            for p in self.procs:
                p.check()
            if ready():
                return
            time.sleep(0.25)
        raise RuntimeError(f"{self.name}: {what} not ready within {timeout} s (logs in {self.dir})")

    def stop(self):
        for p in reversed(self.procs):
            p.stop()

    # --- the systems -------------------------------------------------------------------------

    def start(self):
        getattr(self, "start_" + self.name.replace("-", "_"))()

    def health_workers(self):
        """kvgate's /health: number of workers serving our model."""
        status, body = http_get(self.url + "/health")
        if status != 200:
            return 0
        try:
            models = json.loads(body).get("models", [])
        except ValueError:
            return 0
        return sum(len(m.get("workers", [])) for m in models if m.get("model") == self.model)

    def kvgate_engine_args(self):
        a = self.a
        return ["--model-path", a.model_path, "--page-size", str(a.block_size), "--speedup-ratio", str(a.speedup_ratio),
                "--num-gpu-blocks", str(a.num_gpu_blocks), "--max-num-seqs", str(a.max_num_seqs),
                "--max-num-batched-tokens", str(a.max_num_batched_tokens)]

    def start_kvgate(self):
        a = self.a
        etcd_port, etcd_peer, nats_port = free_port(), free_port(), free_port()
        etcd_url, peer = f"http://127.0.0.1:{etcd_port}", f"http://127.0.0.1:{etcd_peer}"
        self.spawn("etcd", [a.etcd, "--name=sbs", f"--data-dir={os.path.join(self.dir, 'etcd-data')}",
                            f"--listen-client-urls={etcd_url}", f"--advertise-client-urls={etcd_url}",
                            f"--listen-peer-urls={peer}", f"--initial-advertise-peer-urls={peer}",
                            f"--initial-cluster=sbs={peer}"])
        self.spawn("nats", [a.nats_server, "-a", "127.0.0.1", "-p", str(nats_port)])
        self.wait("etcd", lambda: '"health":"true"' in http_get(etcd_url + "/health")[1])
        env = dict(os.environ, ETCD_ENDPOINTS=etcd_url, NATS_SERVER=f"nats://127.0.0.1:{nats_port}", DYN_LOG=a.log_level)
        for i in range(a.workers):
            self.spawn(f"worker{i}", [a.kvgate, "worker", "--advertise-host", "127.0.0.1"] + self.kvgate_engine_args(),
                       env=env)
        self.frontend = self.spawn("frontend", [a.kvgate, "frontend", "--http-host", "127.0.0.1", "--http-port",
                                                str(self.port), "--router-mode", "kv", "--page-size", str(a.block_size),
                                                "--router-min-initial-workers", str(a.workers)], env=env)
        self.wait("frontend with all workers", lambda: self.health_workers() >= a.workers)

    def start_kvgate_serve(self):
        a = self.a
        env = dict(os.environ, DYN_LOG=a.log_level)
        self.frontend = self.spawn("serve", [a.kvgate, "serve", "--http-host", "127.0.0.1", "--http-port", str(self.port),
                                             "--router-mode", "kv", "--workers", str(a.workers)]
                                   + self.kvgate_engine_args(), env=env)
        self.wait("kvgate serve", lambda: self.health_workers() >= a.workers)
        self.notes.append("frontend CPU excludes the process's kvgate-engine threads")

    def start_dynamo(self):
        a = self.a
        kv_dir = os.path.join(self.dir, "dynamo-discovery")
        # Everything on loopback: Dynamo otherwise advertises the host's primary address.
        env = dict(os.environ, DYN_FILE_KV=kv_dir, DYN_LOG=a.log_level, DYN_TCP_RPC_HOST="127.0.0.1",
                   DYN_EVENT_PLANE_HOST="127.0.0.1", DYN_TCP_RESPONSE_STREAM_HOST="127.0.0.1",
                   DYN_SYSTEM_HOST="127.0.0.1")
        self.spawn("mocker", [a.dynamo_python, "-m", "dynamo.mocker", "--model-path", a.model_path,
                              "--block-size", str(a.block_size), "--num-workers", str(a.workers),
                              "--speedup-ratio", str(a.speedup_ratio), "--num-gpu-blocks-override", str(a.num_gpu_blocks),
                              "--max-num-seqs", str(a.max_num_seqs),
                              "--max-num-batched-tokens", str(a.max_num_batched_tokens),
                              "--discovery-backend", "file"], env=env)
        self.frontend = self.spawn("frontend", [a.dynamo_python, "-m", "dynamo.frontend", "--router-mode", "kv",
                                                "--http-host", "127.0.0.1", "--http-port", str(self.port),
                                                "--kv-cache-block-size", str(a.block_size),
                                                "--discovery-backend", "file"], env=env)

        def ready():
            status, body = http_get(self.url + "/v1/models")
            if status != 200 or self.model not in body:
                return False
            status, body = http_get(self.url + "/health")
            try:
                inst = json.loads(body).get("instances", [])
            except ValueError:
                return False
            return sum(1 for i in inst if i.get("endpoint") == "generate") >= a.workers

        self.wait("dynamo frontend with all workers", ready)

    def start_sglang(self):
        a = self.a
        env = dict(os.environ, DYN_LOG=a.log_level)
        urls = []
        for i in range(a.workers):
            port = free_port()
            urls.append(f"http://127.0.0.1:{port}")
            self.spawn(f"worker{i}", [a.kvgate, "serve", "--http-host", "127.0.0.1", "--http-port", str(port),
                                      "--workers", "1", "--shards", "1"] + self.kvgate_engine_args(), env=env)
        for u in urls:
            self.wait(u, lambda u=u: http_get(u + "/health")[0] == 200)
        self.frontend = self.spawn("router", [a.sglang_python, "-m", "sglang_router.launch_router", "--host", "127.0.0.1",
                                              "--port", str(self.port), "--policy", "cache_aware",
                                              "--log-level", a.log_level, "--worker-urls"] + urls)

        def ready():
            if http_get(self.url + "/health")[0] != 200:
                return False
            status, body = http_get(self.url + "/workers")
            return status == 200 and sum(body.count(u) for u in urls) >= a.workers

        self.wait("sglang router with all workers", ready)
        self.notes.append("router does not tokenize (its kvgate-serve workers do)")


def workloads(a):
    tok = ["--token-id-min", "100", "--token-id-max", "150000"]
    return {
        "saturation": ["--concurrency", str(a.concurrency), "shared-prefix", "--chat", "--requests", str(a.sat_requests),
                       "--groups", "16", "--prefix-tokens", "1024", "--suffix-tokens", "64", "--output-tokens", "64"],
        "rate": ["--request-rate", str(a.session_rate), "sessions", "--sessions", str(a.sessions), "--turns", "4",
                 "--groups", "8", "--system-words", "1000", "--user-words", "50", "--output-tokens", "64"],
        # Issue #13: agentic long-context traffic. 8 sessions in parallel, 8 turns each, every turn
        # adds ~4,700 one-token words and resends the whole history (prompts grow to ~38k Qwen3 tokens).
        "longctx": ["--concurrency", "8", "sessions", "--sessions", str(a.longctx_sessions), "--turns", "8", "--groups", "8",
                    "--system-words", "200", "--user-words", "4700", "--output-tokens", "32"],
        "mooncake": tok + ["--request-rate", str(a.mooncake_rate), "mooncake", "--trace", a.trace,
                           "--max-requests", str(a.mooncake_requests), "--max-input-tokens", "8192",
                           "--max-output-tokens", "64"],
        # Issue #16: the conversation trace's 20 busiest conversations replayed turn by turn, 8 at once
        # (perf/routing_quality.py's `sessions`): hit rate and TTFT of each system's KV router.
        "msessions": tok + ["--concurrency", "8", "mooncake", "--trace", a.trace, "--sessions", "20"],
    }


WARMUP = ["--concurrency", "4", "shared-prefix", "--chat", "--requests", "16", "--groups", "1", "--prefix-tokens", "8",
          "--suffix-tokens", "8", "--output-tokens", "4", "--seed", "7"]


def run_one(system_name, run, workload, a):
    run_dir = os.path.join(a.out_dir, f"{system_name}.{run}")
    shutil.rmtree(run_dir, ignore_errors=True)
    os.makedirs(run_dir)
    print(f"\n=== {system_name} / {run}", flush=True)
    s = System(system_name, a, run_dir)
    try:
        s.start()
        bench = [a.bench, "--url", s.url, "--model", s.model, "--progress-s", "0"]
        subprocess.run(bench + WARMUP, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(1)
        summary = os.path.join(run_dir, "bench.json")
        cmd = bench + ["--server-pid", str(s.frontend.pid), "--label", f"{system_name}/{run}", "--output", summary,
                       "--requests-out", os.path.join(run_dir, "requests.jsonl")] + workload
        print(f"    $ {' '.join(cmd)}", flush=True)
        tree = {p.name: descendants([p.pid]) for p in s.procs}
        pids = [q for qs in tree.values() for q in qs]
        cpu0 = {p: proc_cpu_s(p) for p in pids}
        busy0, load0, t0 = machine_busy_s(), os.getloadavg()[0], time.time()
        nice = ["nice", "-n", str(a.nice)] if a.nice else []
        with open(os.path.join(run_dir, "bench.log"), "w") as log:
            subprocess.run(nice + cmd, check=True, stdout=log, stderr=subprocess.STDOUT)
        wall, busy = time.time() - t0, machine_busy_s() - busy0
        cpu1 = {p: proc_cpu_s(p) for p in pids}
        with open(summary) as f:
            r = json.load(f)
    finally:
        s.stop()
    sys_cpu = sum(cpu1[p] - cpu0[p] for p in pids if cpu0[p] is not None and cpu1[p] is not None)
    by_proc = {name: sum(cpu1[q] - cpu0[q] for q in qs if cpu0[q] is not None and cpu1[q] is not None)
               for name, qs in tree.items()}
    ok = max(r["ok"], 1)
    r["side_by_side"] = {
        "system": system_name, "run": run, "url": s.url, "model": s.model, "notes": s.notes,
        "commands": [" ".join(p.cmd) for p in s.procs], "bench_command": " ".join(cmd),
        "system_cpu_s": sys_cpu, "system_cpu_ms_per_request": 1000 * sys_cpu / ok,
        "cpu_s_by_process": by_proc,
        "other_cpu_cores": max(0.0, (busy - sys_cpu - r["cpu"]["loadgen_cpu_s"]) / wall),
        "loadavg_1m_start": load0, "loadavg_1m_end": os.getloadavg()[0], "wall_s": wall,
    }
    with open(summary, "w") as f:
        json.dump(r, f, indent=1)
    x = r["side_by_side"]
    print(f"    ok {r['ok']}/{r['requests']}, {r['request_throughput_per_s']:.1f} req/s, "
          f"TTFT p50 {r['ttft_ms']['p50']:.1f} ms, hit {100 * r['kv_hit_rate']:.1f} %, "
          f"frontend {fe_ms(r):.2f} ms/req, system {x['system_cpu_ms_per_request']:.2f} ms/req, "
          f"other CPU {x['other_cpu_cores']:.2f} cores", flush=True)
    return r


def fe_ms(r):
    v = r["cpu"].get("frontend_cpu_us_per_request")
    return (v or 0) / 1000


COLS = [
    ("req/s", lambda r: r["request_throughput_per_s"]),
    ("out tok/s", lambda r: r["output_token_throughput_per_s"]),
    ("frontend CPU ms/req", fe_ms),
    ("system CPU ms/req", lambda r: r["side_by_side"]["system_cpu_ms_per_request"]),
    ("TTFT p50 ms", lambda r: r["ttft_ms"]["p50"]),
    ("TTFT p99 ms", lambda r: r["ttft_ms"]["p99"]),
    ("E2E p50 ms", lambda r: r["e2e_ms"]["p50"]),
    ("TPOT p50 ms", lambda r: r["tpot_ms"]["p50"]),
    ("hit rate %", lambda r: 100 * r["kv_hit_rate"]),
    ("errors", lambda r: sum(r["errors"].values())),
    ("other CPU cores", lambda r: r["side_by_side"]["other_cpu_cores"]),
    ("load 1m", lambda r: r["side_by_side"]["loadavg_1m_end"]),
]
# kvgate / other: for throughput and hit rate above 1 is better for kvgate, for CPU and TTFT below 1.
RATIO_COLS = ["req/s", "out tok/s", "frontend CPU ms/req", "system CPU ms/req", "TTFT p50 ms", "TTFT p99 ms", "E2E p50 ms",
              "hit rate %"]


def fmt(x):
    if isinstance(x, int):
        return str(x)
    return f"{x:.0f}" if abs(x) >= 100 else f"{x:.2f}" if abs(x) < 10 else f"{x:.1f}"


def tables(results, base="kvgate"):
    out = []
    for run, by_sys in results.items():
        out.append(f"**{run}**\n")
        out.append("| system | " + " | ".join(c for c, _ in COLS) + " |")
        out.append("| --- |" + " ---: |" * len(COLS))
        for name, r in by_sys.items():
            out.append(f"| {name} | " + " | ".join(fmt(f(r)) for _, f in COLS) + " |")
        if base in by_sys:
            b = by_sys[base]
            out.append("")
            out.append(f"| {base} / system | " + " | ".join(RATIO_COLS) + " |")
            out.append("| --- |" + " ---: |" * len(RATIO_COLS))
            get = dict(COLS)
            for name, r in by_sys.items():
                if name == base:
                    continue
                cells = []
                for c in RATIO_COLS:
                    o = get[c](r)
                    cells.append(f"{get[c](b) / o:.2f}×" if o else "n/a")
                out.append(f"| {name} | " + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out)


def machine():
    cpu = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")), cpu)
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, {platform.system()} {platform.release()}"


def version(python, module):
    try:
        return subprocess.run([python, "-c", f"import importlib.metadata as m; print(m.version('{module}'))"],
                              capture_output=True, text=True, timeout=60).stdout.strip() or "?"
    except OSError:
        return "?"


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--systems", default="kvgate,dynamo,sglang", help=f"comma-separated, of {','.join(SYSTEMS)}")
    p.add_argument("--runs", default="saturation,rate", help="comma-separated, of saturation,rate,longctx,mooncake,msessions")
    p.add_argument("--kvgate", default=os.path.join(ROOT, "target/release/kvgate"))
    p.add_argument("--bench", default=os.path.join(ROOT, "target/release/kvgate-bench"))
    p.add_argument("--dynamo-python", default="/work/anchors-venv/bin/python")
    p.add_argument("--sglang-python", default="/work/anchors-venv-sglang/bin/python")
    p.add_argument("--etcd", default=shutil.which("etcd") or "/usr/bin/etcd")
    p.add_argument("--nats-server", default=shutil.which("nats-server") or "/usr/sbin/nats-server")
    p.add_argument("--model-path", default=os.path.normpath(os.path.join(ROOT, "../shared/models/qwen3-0.6b")))
    p.add_argument("--trace", default=os.path.normpath(os.path.join(ROOT, "../shared/data/mooncake/conversation_trace.jsonl")))
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--speedup-ratio", type=float, default=10)
    p.add_argument("--num-gpu-blocks", type=int, default=16384, help="KV capacity per worker, in blocks")
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-num-batched-tokens", type=int, default=8192)
    p.add_argument("--concurrency", type=int, default=64, help="saturation run: requests in flight")
    p.add_argument("--sat-requests", type=int, default=4000)
    p.add_argument("--session-rate", type=float, default=4, help="rate run: new sessions per second")
    p.add_argument("--sessions", type=int, default=120)
    p.add_argument("--longctx-sessions", type=int, default=32,
                   help="longctx run: sessions in all (8 in flight); more than 8 so the CPU figures rise above /proc's 10 ms tick")
    p.add_argument("--mooncake-rate", type=float, default=20)
    p.add_argument("--mooncake-requests", type=int, default=1000)
    p.add_argument("--log-level", default="warn", help="log level of every system (per-request INFO lines cost CPU)")
    p.add_argument("--nice", type=int, default=0, help="niceness of every process (negative, as root, shields from builds)")
    p.add_argument("--out-dir", default=os.path.join(ROOT, "target/perf-anchors"))
    p.add_argument("--report-from", metavar="JSON", help="only print the tables of an earlier run's side_by_side.json")
    a = p.parse_args()
    if a.report_from:
        with open(a.report_from) as f:
            print(tables(json.load(f)))
        return
    a.out_dir = os.path.abspath(a.out_dir)
    os.makedirs(a.out_dir, exist_ok=True)
    systems = a.systems.split(",")
    for s in systems:
        if s not in SYSTEMS:
            sys.exit(f"unknown system {s}; known: {', '.join(SYSTEMS)}")
    wl = workloads(a)
    started = datetime.datetime.now(datetime.timezone.utc)
    results, skipped = {}, []
    for run in a.runs.split(","):
        results[run] = {}
        for s in systems:
            if run == "mooncake" and s == "sglang":
                skipped.append("sglang/mooncake: the SGLang router rejects token-id prompts on /v1/completions")
                continue
            try:
                results[run][s] = run_one(s, run, wl[run], a)
            except (RuntimeError, subprocess.CalledProcessError) as e:
                print(f"    FAILED: {e}", flush=True)
                skipped.append(f"{s}/{run}: failed: {str(e).splitlines()[0]}")
    versions = [f"kvgate: {a.kvgate}"]
    if "dynamo" in systems:
        versions.append(f"ai-dynamo {version(a.dynamo_python, 'ai-dynamo')}, "
                        f"ai-dynamo-runtime {version(a.dynamo_python, 'ai-dynamo-runtime')}")
    if "sglang" in systems:
        versions.append(f"sglang-router {version(a.sglang_python, 'sglang-router')}")
    report = [f"date: {started:%Y-%m-%d %H:%M} UTC, {(datetime.datetime.now(datetime.timezone.utc) - started).seconds} s",
              f"machine: {machine()}", f"command: {' '.join(sys.argv)}", "versions: " + "; ".join(versions),
              f"topology: {a.workers} workers, block {a.block_size}, speedup {a.speedup_ratio}, "
              f"{a.num_gpu_blocks} KV blocks/worker, max-num-seqs {a.max_num_seqs}, "
              f"max-num-batched-tokens {a.max_num_batched_tokens}, log level {a.log_level}, nice {a.nice}", ""]
    for run, by_sys in results.items():
        report.append(f"{run}: kvgate-bench " + " ".join(wl[run]))
    report += ["", tables(results)]
    report += [f"skipped: {x}" for x in skipped]
    for run, by_sys in results.items():
        for name, r in by_sys.items():
            x = r["side_by_side"]
            report.append(f"{name}/{run}: " + "; ".join(x["commands"]) +
                          (f" ({'; '.join(x['notes'])})" if x["notes"] else ""))
            report.append("    CPU s by process: " + ", ".join(f"{k} {v:.1f}" for k, v in x["cpu_s_by_process"].items()))
    text = "\n".join(report)
    print("\n" + text)
    with open(os.path.join(a.out_dir, "side_by_side.md"), "w") as f:
        f.write(text + "\n")
    with open(os.path.join(a.out_dir, "side_by_side.json"), "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
