#!/usr/bin/env bash
# What the live routing page costs the frontend (issue #18): one `kvgate frontend` (its own
# process, so its CPU is its own) in front of WORKERS fast mocker workers over a real etcd + NATS,
# saturated by kvgate-bench (closed loop, CONCURRENCY in flight, shared-prefix workload). Runs
# alternate A (no page) / B (PAGES pages open: `curl -N /dashboard/events` in the background,
# each receiving a snapshot every 0.75 s and the frontend recording every routing decision)
# PAIRS times in one invocation; each run reports the frontend's CPU per request (utime + stime
# from /proc/<pid>/stat, through kvgate-bench --server-pid) and the request rate.
#   KVGATE=target/release/kvgate BENCH=target/release/kvgate-bench perf/dashboard_cost.sh
set -euo pipefail
KVGATE=${KVGATE:-target/release/kvgate}
BENCH=${BENCH:-target/release/kvgate-bench}
WORKERS=${WORKERS:-4}
PAIRS=${PAIRS:-3}
PAGES=${PAGES:-1}
REQUESTS=${REQUESTS:-6000}
CONCURRENCY=${CONCURRENCY:-32}
OUT=${OUT:-/tmp/kvgate_dashboard_cost}
mkdir -p "$OUT"
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
pids=()
down() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap down EXIT
rm -rf "$OUT/etcd"
EP=$(port); PP=$(port); NP=$(port); FP=$(port)
etcd --data-dir "$OUT/etcd" --listen-client-urls "http://127.0.0.1:$EP" --advertise-client-urls "http://127.0.0.1:$EP" \
  --listen-peer-urls "http://127.0.0.1:$PP" >"$OUT/etcd.log" 2>&1 & pids+=($!)
nats-server -a 127.0.0.1 -p "$NP" >"$OUT/nats.log" 2>&1 & pids+=($!)
sleep 1
export ETCD_ENDPOINTS=http://127.0.0.1:$EP NATS_SERVER=nats://127.0.0.1:$NP
for i in $(seq 1 "$WORKERS"); do
  "$KVGATE" worker --advertise-host 127.0.0.1 --speedup-ratio 50 --num-gpu-blocks 8192 >"$OUT/worker$i.log" 2>&1 & pids+=($!)
done
"$KVGATE" frontend --http-host 127.0.0.1 --http-port "$FP" --router-min-initial-workers "$WORKERS" \
  >"$OUT/frontend.log" 2>&1 & fe=$!; pids+=($fe)
until curl -sf "http://127.0.0.1:$FP/health" >/dev/null; do sleep 0.2; done
work=(shared-prefix --requests "$REQUESTS" --groups 16 --prefix-tokens 512 --suffix-tokens 64 --output-tokens 16)
bench() {  # $1: label
  "$BENCH" --url "http://127.0.0.1:$FP" --progress-s 0 --server-pid "$fe" --concurrency "$CONCURRENCY" \
    --label "$1" --output "$OUT/$1.json" "${work[@]}" >"$OUT/$1.txt" 2>&1
}
# Warm-up (index, token cache, connections), not counted.
"$BENCH" --url "http://127.0.0.1:$FP" --progress-s 0 --concurrency "$CONCURRENCY" \
  shared-prefix --requests 1000 --groups 16 --prefix-tokens 512 --suffix-tokens 64 --output-tokens 16 >/dev/null 2>&1
runs=()
for p in $(seq 1 "$PAIRS"); do
  bench "A$p"; runs+=("A$p")
  viewers=()
  for k in $(seq 1 "$PAGES"); do
    curl -sN "http://127.0.0.1:$FP/dashboard/events" >"$OUT/events_B${p}_$k.txt" & viewers+=($!)
  done
  sleep 1
  bench "B$p"; runs+=("B$p")
  for v in "${viewers[@]}"; do kill "$v" 2>/dev/null || true; done
  wait "${viewers[@]}" 2>/dev/null || true
  echo "B$p: $PAGES page(s) received $(cat "$OUT"/events_B"${p}"_*.txt | grep -c '^data: ') snapshots in all" >&2
done
python3 - "$OUT" "${runs[@]}" <<'PY'
import json, sys, statistics
out, runs = sys.argv[1], sys.argv[2:]
per = {"A": [], "B": []}
for r in runs:
    s = json.load(open(f"{out}/{r}.json"))
    us = s["cpu"]["server_cpu_us_per_request"]
    per[r[0]].append(us)
    print(f"{r}: {'page open ' if r[0] == 'B' else 'no page   '} {s['ok']} ok in {s['duration_s']:.1f} s = "
          f"{s['request_throughput_per_s']:.0f} req/s, frontend CPU {s['cpu']['server_cpu_s']:.2f} s = {us:.1f} us/request")
a, b = statistics.mean(per["A"]), statistics.mean(per["B"])
print(f"mean frontend CPU per request: no page {a:.1f} us, page open {b:.1f} us: {100 * (b - a) / a:+.1f} %")
PY
