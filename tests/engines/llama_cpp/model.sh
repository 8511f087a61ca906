#!/usr/bin/env bash
# Writes the tiny random-weight Qwen3 GGUF (make_gguf.py) once, into
# TARGET/llama-cpp/qwen3-tiny-random.gguf (TARGET: $2, else $CARGO_TARGET_DIR, else ./target),
# from the tokenizer directory $1 (default ../shared/models/qwen3-0.6b). The generator runs in a
# venv at TARGET/llama-cpp/venv with requirements.txt from PyPI. Idempotent (a stamp of the
# generator and its requirements), serialized with flock.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../../.." && pwd)
tokdir=${1:-$repo/../shared/models/qwen3-0.6b}
target=${2:-${CARGO_TARGET_DIR:-$repo/target}}
mkdir -p "$target/llama-cpp"
out=$(cd "$target/llama-cpp" && pwd)
model="$out/qwen3-tiny-random.gguf"

[ -f "$tokdir/tokenizer.json" ] || { echo "model.sh: no tokenizer.json in $tokdir" >&2; exit 2; }
stamp=$(cat "$here/make_gguf.py" "$here/requirements.txt" | sha256sum | cut -c1-16)

exec 9>"$out/.model.lock"
flock 9
if [ -f "$model" ] && [ "$(cat "$model.stamp" 2>/dev/null)" = "$stamp" ]; then
  exit 0
fi
venv="$out/venv"
if [ "$(cat "$venv/.ready" 2>/dev/null)" != "$stamp" ]; then
  rm -rf "$venv"
  python3 -m venv "$venv" || { echo "model.sh: python3 -m venv failed (Debian: apt-get install python3-venv)" >&2; exit 2; }
  "$venv/bin/python" -m pip install -q -r "$here/requirements.txt"
  echo "$stamp" >"$venv/.ready"
fi
"$venv/bin/python" "$here/make_gguf.py" "$tokdir" "$model" >&2
echo "$stamp" >"$model.stamp"
