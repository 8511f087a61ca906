#!/usr/bin/env bash
# Two `kvgate frontend`s behind round robin against one (issue #15): one fleet of mocker workers
# over a real etcd + NATS; kvgate-bench sends each workload once through frontend A alone, then
# alternating requests between A and B (`--url A,B`). Prints hit rate and TTFT of each run.
#   KVGATE=target/debug/kvgate BENCH=target/release/kvgate-bench perf/several_frontends.sh
# TAGS chooses the runs: `one` (A alone), `two` (A and B), `two-sync` (A and B with
# `--router-replica-sync`). WORKLOADS: `sessions bursty`. Each run prints every frontend's
# routing regret counters (chosen vs best prefix overlap, issue #16).
# FRONTEND_ARGS: more flags for every frontend (e.g. `--router-cost overlap`).
set -euo pipefail
KVGATE=${KVGATE:-target/release/kvgate}
BENCH=${BENCH:-target/release/kvgate-bench}
WORKERS=${WORKERS:-4}
SPEEDUP=${SPEEDUP:-10}
OUT=${OUT:-/tmp/kvgate_several_frontends}
mkdir -p "$OUT"
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
pids=()
down() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; pids=(); }
trap down EXIT
# A fresh fleet per run: every run starts from cold caches.
up() { # frontend flags...
  rm -rf "$OUT"/etcd
  local EP PP NP FA FB i p
  EP=$(port); PP=$(port); NP=$(port)
  etcd --data-dir "$OUT/etcd" --listen-client-urls "http://127.0.0.1:$EP" --advertise-client-urls "http://127.0.0.1:$EP" \
    --listen-peer-urls "http://127.0.0.1:$PP" >"$OUT/etcd.log" 2>&1 & pids+=($!)
  nats-server -a 127.0.0.1 -p "$NP" >"$OUT/nats.log" 2>&1 & pids+=($!)
  sleep 1
  export ETCD_ENDPOINTS=http://127.0.0.1:$EP NATS_SERVER=nats://127.0.0.1:$NP
  for i in $(seq 1 "$WORKERS"); do
    "$KVGATE" worker --advertise-host 127.0.0.1 --speedup-ratio "$SPEEDUP" >"$OUT/worker$i.log" 2>&1 & pids+=($!)
  done
  FA=$(port); FB=$(port)
  "$KVGATE" frontend --http-host 127.0.0.1 --http-port "$FA" --router-min-initial-workers "$WORKERS" "$@" >"$OUT/fa.log" 2>&1 & pids+=($!)
  "$KVGATE" frontend --http-host 127.0.0.1 --http-port "$FB" --router-min-initial-workers "$WORKERS" "$@" >"$OUT/fb.log" 2>&1 & pids+=($!)
  for p in "$FA" "$FB"; do
    until curl -sf "http://127.0.0.1:$p/health" >/dev/null; do sleep 0.2; done
  done
  A=http://127.0.0.1:$FA; B=http://127.0.0.1:$FB
}
run() { # name urls workload...
  local name=$1 urls=$2; shift 2
  "$BENCH" --url "$urls" --progress-s 0 --output "$OUT/$name.json" "$@" >"$OUT/$name.txt" 2>&1
  python3 - "$OUT/$name.json" "$name" <<'PY'
import json, sys
s = json.load(open(sys.argv[1]))
t = s["ttft_ms"]
print(f"{sys.argv[2]:14} hit {s['kv_hit_rate']:.4f}  TTFT p50 {t['p50']:.1f} p90 {t['p90']:.1f} ms  "
      f"errors {sum(s.get('errors', {}).values())}  per worker {list(s['requests_per_worker'].values())}")
PY
}
SEED=${SEED:-42}
TAGS=${TAGS:-one two two-sync}
WORKLOADS=${WORKLOADS:-sessions bursty}
for tag in $TAGS; do
  read -r -a flags <<<"${FRONTEND_ARGS:-}"; [ "$tag" = two-sync ] && flags+=(--router-replica-sync)
  for w in $WORKLOADS; do
    up "${flags[@]}"; urls=$A; [ "$tag" != one ] && urls="$A,$B"
    case $w in
      sessions) run "sessions-$tag" "$urls" --seed "$SEED" --request-rate 4 sessions --sessions 60 --turns 5 --system-words 300 --user-words 50 --completions ;;
      bursty) run "bursty-$tag" "$urls" --seed "$SEED" --request-rate 40 shared-prefix --requests 600 --groups 16 --prefix-tokens 1024 --suffix-tokens 128 --output-tokens 32 ;;
    esac
    for u in $urls; do # routing regret: decisions that chose less overlap than the best candidate had
      u=${u//,/ }; for x in $u; do curl -sf "$x/metrics" | grep -E '^kvgate_routing_(overlap_regret|best_overlap|chosen_overlap)_blocks_(count|total)' |
        tr '\n' ' ' | sed "s|^|  regret $x: |; s/\$/\\n/"; done
    done
    if [ "$tag" = two-sync ]; then # what replica sync did on B
      curl -sf "$B/metrics" | grep -E '^kvgate_router_sync_(decisions_(published|applied|dropped)|blocks_(confirmed|expired))_total' |
        sed 's/^kvgate_router_sync_//; s/_total / /' | tr '\n' ' ' | sed 's/^/  B: /; s/$/\n/'
    fi
    down
  done
done
