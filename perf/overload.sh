#!/usr/bin/env bash
# Overload with admission on (issue #15): one `kvgate frontend` (its own process, so its CPU and
# memory are its own) in front of WORKERS real-time mocker workers over a real etcd + NATS.
# Run 1 measures the fleet's capacity (closed loop); run 2 offers FACTOR x that rate (open loop,
# Poisson) for REQUESTS requests. Prints, per run: served, refused (by kind), TTFT of the served,
# the frontend's CPU per offered request, and its peak RSS (VmHWM) before and after.
#   KVGATE=target/release/kvgate BENCH=target/release/kvgate-bench perf/overload.sh
set -euo pipefail
KVGATE=${KVGATE:-target/release/kvgate}
BENCH=${BENCH:-target/release/kvgate-bench}
WORKERS=${WORKERS:-2}
FACTOR=${FACTOR:-10}
REQUESTS=${REQUESTS:-4000}
OUT=${OUT:-/tmp/kvgate_overload}
# Admission: a worker is busy beyond 2 % of its KV blocks in decode; the queue holds 256.
ADMISSION=${ADMISSION:---active-decode-blocks-threshold 0.02 --max-queued-requests 256 --queue-timeout-s 2}
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
  "$KVGATE" worker --advertise-host 127.0.0.1 --speedup-ratio 1 --num-gpu-blocks 4096 >"$OUT/worker$i.log" 2>&1 & pids+=($!)
done
# shellcheck disable=SC2086
"$KVGATE" frontend --http-host 127.0.0.1 --http-port "$FP" --router-min-initial-workers "$WORKERS" $ADMISSION \
  >"$OUT/frontend.log" 2>&1 & fe=$!; pids+=($fe)
until curl -sf "http://127.0.0.1:$FP/health" >/dev/null; do sleep 0.2; done
hwm() { awk '/VmHWM/ {print $2 / 1024 " MiB"}' "/proc/$fe/status"; }
work=(shared-prefix --requests "$REQUESTS" --groups 8 --prefix-tokens 512 --suffix-tokens 64 --output-tokens 32)
echo "frontend peak RSS at start: $(hwm)"
"$BENCH" --url "http://127.0.0.1:$FP" --progress-s 0 --server-pid "$fe" --concurrency 16 --output "$OUT/capacity.json" \
  shared-prefix --requests 400 --groups 8 --prefix-tokens 512 --suffix-tokens 64 --output-tokens 32 >"$OUT/capacity.txt" 2>&1
cap=$(python3 -c "import json; print(json.load(open('$OUT/capacity.json'))['request_throughput_per_s'])")
rate=$(python3 -c "print(round($cap * $FACTOR, 1))")
echo "capacity: $cap req/s; offering $rate req/s ($FACTOR x) for $REQUESTS requests; peak RSS now $(hwm)"
"$BENCH" --url "http://127.0.0.1:$FP" --progress-s 0 --server-pid "$fe" --request-rate "$rate" --max-inflight 1024 \
  --request-timeout-s 30 --output "$OUT/overload.json" "${work[@]}" >"$OUT/overload.txt" 2>&1 || true
echo "after the overload: peak RSS $(hwm); queue and bookings:"
curl -s "http://127.0.0.1:$FP/metrics" | grep -E '^kvgate_queue_(depth|rejected_total)|^kvgate_worker_load_requests' || true
python3 - "$OUT" <<'PY'
import json, sys
for run in ("capacity", "overload"):
    s = json.load(open(f"{sys.argv[1]}/{run}.json"))
    cpu = s["cpu"]
    print(f"{run}: {s['requests']} offered, {s['ok']} served, refused/errors {dict(s['errors'])}, "
          f"TTFT of served p50 {s['ttft_ms']['p50']:.1f} p99 {s['ttft_ms']['p99']:.1f} max {s['ttft_ms']['max']:.1f} ms, "
          f"{s['duration_s']:.1f} s, frontend CPU {cpu['server_cpu_s']:.2f} s = {cpu['server_cpu_us_per_request'] / 1000:.3f} ms per offered request")
PY
