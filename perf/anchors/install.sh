#!/usr/bin/env bash
# Installs the anchors of perf/anchors/side_by_side.py into two virtual environments:
#   $DYNAMO_VENV  NVIDIA Dynamo 1.6.1 (frontend + mocker), dependencies by hand
#   $SGLANG_VENV  the SGLang router (sglang-router 0.3.2)
# and etcd + nats-server from Debian (for kvgate's distributed mode).
#
# ai-dynamo 1.6.1 requires aisimulate==0.13.0, a "wheel stub" sdist whose build downloads the
# real wheel from NVIDIA's own index (not PyPI), so a plain `pip install ai-dynamo==1.6.1` fails
# where only the registries are reachable. aisimulate only serves the planner and the mocker's
# optional --ais-perf-model, so it is left out and the other requirements are installed by hand.
set -euo pipefail
DYNAMO_VENV=${DYNAMO_VENV:-/work/anchors-venv}
SGLANG_VENV=${SGLANG_VENV:-/work/anchors-venv-sglang}
PY=${PYTHON:-python3}

have() { command -v "$1" >/dev/null || [ -x "/usr/bin/$1" ] || [ -x "/usr/sbin/$1" ]; }
if ! have etcd || ! have nats-server; then
  apt-get update && apt-get install -y etcd-server nats-server
fi

"$PY" -m venv "$DYNAMO_VENV"
"$DYNAMO_VENV/bin/pip" install --upgrade pip
"$DYNAMO_VENV/bin/pip" install --no-deps ai-dynamo==1.6.1 ai-dynamo-runtime==1.6.1
# Requires-Dist of ai-dynamo 1.6.1 and ai-dynamo-runtime 1.6.1, less aisimulate:
"$DYNAMO_VENV/bin/pip" install "aiohttp>=3.14.3,<4.0" "certifi>=2026.10.19" "kubernetes>=32.0.1,<33.0.0" \
  "msgspec>=0.19.0" "prometheus-client>=0.23.1,<1.0" "pyzmq>=26.0.0" "redis>=6.2.0,<9.0.0" "tqdm>=4.0.0" \
  "transformers>=4.56.0" "typing-extensions>=4.10.0" "zstandard>=0.23.0,<1.0" \
  "pydantic>=2.10.6,<=2.13.5" "uvloop>=0.21.0"
"$DYNAMO_VENV/bin/python" -m dynamo.frontend --help >/dev/null
"$DYNAMO_VENV/bin/python" -m dynamo.mocker --help >/dev/null

"$PY" -m venv "$SGLANG_VENV"
"$SGLANG_VENV/bin/pip" install --upgrade pip
"$SGLANG_VENV/bin/pip" install sglang-router==0.3.2
"$SGLANG_VENV/bin/python" -m sglang_router.launch_router --help >/dev/null
echo "installed: $DYNAMO_VENV (Dynamo), $SGLANG_VENV (SGLang router)"
