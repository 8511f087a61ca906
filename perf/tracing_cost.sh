#!/usr/bin/env bash
# What tracing costs the frontend (issue #18): two `kvgate frontend`s (their own processes, so
# their CPU is their own) in front of the same WORKERS fast mocker workers over a real etcd +
# NATS: A without --otlp-endpoint (tracing off: one branch per request), B with it, exporting
# every request's spans (its own 7, the workers' 4) to a sink that answers OTLP/HTTP posts 200.
# C as B, sampling 1 % of the traces (OTEL_TRACES_SAMPLER=parentbased_traceidratio, ARG 0.01).
# Each is saturated in turn by kvgate-bench (closed loop, CONCURRENCY in flight, shared-prefix
# workload), alternating A / B / C PAIRS times in one invocation; each run reports the frontend's CPU
# per request (utime + stime from /proc/<pid>/stat, through kvgate-bench --server-pid).
#   KVGATE=target/release/kvgate BENCH=target/release/kvgate-bench perf/tracing_cost.sh
set -euo pipefail
KVGATE=${KVGATE:-target/release/kvgate}
BENCH=${BENCH:-target/release/kvgate-bench}
WORKERS=${WORKERS:-4}
PAIRS=${PAIRS:-3}
REQUESTS=${REQUESTS:-6000}
CONCURRENCY=${CONCURRENCY:-32}
OUT=${OUT:-/tmp/kvgate_tracing_cost}
mkdir -p "$OUT"
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
pids=()
down() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap down EXIT
rm -rf "$OUT/etcd"
EP=$(port); PP=$(port); NP=$(port); FA=$(port); FB=$(port); FC=$(port); SP=$(port)
etcd --data-dir "$OUT/etcd" --listen-client-urls "http://127.0.0.1:$EP" --advertise-client-urls "http://127.0.0.1:$EP" \
  --listen-peer-urls "http://127.0.0.1:$PP" >"$OUT/etcd.log" 2>&1 & pids+=($!)
nats-server -a 127.0.0.1 -p "$NP" >"$OUT/nats.log" 2>&1 & pids+=($!)
# The OTLP sink: accepts POST /v1/traces, counts posts and bytes (written to sink.txt on exit).
python3 - "$SP" "$OUT/sink.txt" >"$OUT/sink.log" 2>&1 <<'PY' & pids+=($!)
import http.server, signal, sys
port, out = int(sys.argv[1]), sys.argv[2]
seen = {"posts": 0, "bytes": 0}
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_POST(self):
        n = int(self.headers.get("content-length", 0)); self.rfile.read(n)
        seen["posts"] += 1; seen["bytes"] += n
        self.send_response(200); self.send_header("content-length", "0"); self.end_headers()
    def log_message(self, *a): pass
def bye(*_):
    open(out, "w").write(f"{seen['posts']} posts, {seen['bytes']} bytes\n"); sys.exit(0)
signal.signal(signal.SIGTERM, bye)
http.server.ThreadingHTTPServer(("127.0.0.1", port), H).serve_forever()
PY
sink=$!
sleep 1
export ETCD_ENDPOINTS=http://127.0.0.1:$EP NATS_SERVER=nats://127.0.0.1:$NP
for i in $(seq 1 "$WORKERS"); do
  "$KVGATE" worker --advertise-host 127.0.0.1 --speedup-ratio 50 --num-gpu-blocks 8192 \
    --otlp-endpoint "http://127.0.0.1:$SP" >"$OUT/worker$i.log" 2>&1 & pids+=($!)
done
"$KVGATE" frontend --http-host 127.0.0.1 --http-port "$FA" --router-min-initial-workers "$WORKERS" \
  >"$OUT/frontend_a.log" 2>&1 & fa=$!; pids+=($fa)
"$KVGATE" frontend --http-host 127.0.0.1 --http-port "$FB" --router-min-initial-workers "$WORKERS" \
  --otlp-endpoint "http://127.0.0.1:$SP" >"$OUT/frontend_b.log" 2>&1 & fb=$!; pids+=($fb)
OTEL_TRACES_SAMPLER=parentbased_traceidratio OTEL_TRACES_SAMPLER_ARG=0.01 \
  "$KVGATE" frontend --http-host 127.0.0.1 --http-port "$FC" --router-min-initial-workers "$WORKERS" \
  --otlp-endpoint "http://127.0.0.1:$SP" >"$OUT/frontend_c.log" 2>&1 & fc=$!; pids+=($fc)
for p in "$FA" "$FB" "$FC"; do
  until curl -sf "http://127.0.0.1:$p/health" >/dev/null; do sleep 0.2; done
done
work=(shared-prefix --requests "$REQUESTS" --groups 16 --prefix-tokens 512 --suffix-tokens 64 --output-tokens 16)
bench() {  # $1: label, $2: port, $3: pid
  "$BENCH" --url "http://127.0.0.1:$2" --progress-s 0 --server-pid "$3" --concurrency "$CONCURRENCY" \
    --label "$1" --output "$OUT/$1.json" "${work[@]}" >"$OUT/$1.txt" 2>&1
}
# Warm-up of both (index, token cache, connections), not counted.
for p in "$FA" "$FB" "$FC"; do
  "$BENCH" --url "http://127.0.0.1:$p" --progress-s 0 --concurrency "$CONCURRENCY" \
    shared-prefix --requests 1000 --groups 16 --prefix-tokens 512 --suffix-tokens 64 --output-tokens 16 >/dev/null 2>&1
done
runs=()
for p in $(seq 1 "$PAIRS"); do
  bench "A$p" "$FA" "$fa"; runs+=("A$p")
  bench "B$p" "$FB" "$fb"; runs+=("B$p")
  bench "C$p" "$FC" "$fc"; runs+=("C$p")
done
grep -i "dropped" "$OUT/frontend_b.log" "$OUT/frontend_c.log" >&2 || echo "frontends B and C: no span dropped" >&2
kill "$sink"; wait "$sink" 2>/dev/null || true
echo "sink: $(cat "$OUT/sink.txt")" >&2
python3 - "$OUT" "${runs[@]}" <<'PY'
import json, sys, statistics
out, runs = sys.argv[1], sys.argv[2:]
per = {"A": [], "B": [], "C": []}
label = {"A": "tracing off   ", "B": "tracing on    ", "C": "on, 1 % sampled"}
for r in runs:
    s = json.load(open(f"{out}/{r}.json"))
    us = s["cpu"]["server_cpu_us_per_request"]
    per[r[0]].append(us)
    print(f"{r}: {label[r[0]]} {s['ok']} ok in {s['duration_s']:.1f} s = "
          f"{s['request_throughput_per_s']:.0f} req/s, frontend CPU {s['cpu']['server_cpu_s']:.2f} s = {us:.1f} us/request")
a, b, c = (statistics.mean(per[k]) for k in "ABC")
print(f"mean frontend CPU per request: tracing off {a:.1f} us, on {b:.1f} us ({100 * (b - a) / a:+.1f} %), "
      f"1 % sampled {c:.1f} us ({100 * (c - a) / a:+.1f} %)")
PY
