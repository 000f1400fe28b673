#!/usr/bin/env bash
# Runs before the real llama-server to imitate a slow start (test-only switches):
#   PRELUDE_LINES=N PRELUDE_DELAY=S  print N progress lines, S seconds apart, then start
#   PRELUDE_SILENT=S                 sleep S seconds without a word first (a hung loader)
#   PRELUDE_BUSY=S                   work on the CPU S seconds without a word first (a
#                                    silent warm-up)
#   PRELUDE_EXIT=CODE                print a line and exit with CODE instead of starting
#   PRELUDE_OUTLIVE=S                run it as a child and exit S seconds after it does: a
#                                    death that whoever watches this process sees late
#   PRELUDE_LAST_WORDS=LINE          run it as a child and, when it ends, print LINE and
#                                    exit with its code (a death that says why, after ready)
#   PRELUDE_HELP_AT_ONCE=1           --help and --version (what the wrapper reads of a
#                                    binary before it starts one) skip all of the above
#   PRELUDE_LATE_OUTPUT=S            its output reaches the reader S seconds late (a busy
#                                    machine, where /health can answer before the lines
#                                    llama-server printed while loading are read)
#   PRELUDE_SIGNAL=NAME              die of signal NAME (ILL: a build for another CPU)
#   PRELUDE_SLOW_VERSION=S           --version answers S seconds late (CUDA initialised on
#                                    a host with many GPUs)
#   PRELUDE_IGNORE_TERM=1            run it as a child and stay, ignoring SIGTERM (a
#                                    shutdown that deadlocks): only SIGKILL ends it
# The real binary comes from REAL_LLAMA_SERVER; all arguments pass through unchanged.
set -u
if [ -n "${PRELUDE_SLOW_VERSION:-}" ]; then
  case " $* " in *" --version "*) sleep "${PRELUDE_SLOW_VERSION}" ;; esac
fi
if [ -n "${PRELUDE_HELP_AT_ONCE:-}" ]; then
  case " $* " in *" --help "* | *" --version "*) exec "${REAL_LLAMA_SERVER}" "$@" ;; esac
fi
if [ -n "${PRELUDE_SIGNAL:-}" ]; then trap - "${PRELUDE_SIGNAL}"; kill -s "${PRELUDE_SIGNAL}" $$; fi
if [ -n "${PRELUDE_EXIT:-}" ]; then echo "prelude: exiting with ${PRELUDE_EXIT}"; exit "${PRELUDE_EXIT}"; fi
if [ -n "${PRELUDE_SILENT:-}" ]; then sleep "${PRELUDE_SILENT}"; fi
if [ -n "${PRELUDE_BUSY:-}" ]; then
  busy_until=$((SECONDS + PRELUDE_BUSY))
  while [ "${SECONDS}" -lt "${busy_until}" ]; do :; done
fi
for i in $(seq 1 "${PRELUDE_LINES:-0}"); do
  echo "llama_model_load: loading tensors ... ${i}/${PRELUDE_LINES}"
  sleep "${PRELUDE_DELAY:-0.1}"
done
if [ -n "${PRELUDE_IGNORE_TERM:-}" ]; then
  trap '' TERM
  "${REAL_LLAMA_SERVER}" "$@" &
  sleep 1000
  exit 0
fi
if [ -n "${PRELUDE_OUTLIVE:-}${PRELUDE_LAST_WORDS:-}" ]; then
  "${REAL_LLAMA_SERVER}" "$@" &
  child=$!
  trap 'kill -TERM "${child}" 2>/dev/null; wait "${child}"; exit 143' TERM INT
  wait "${child}"
  code=$?
  if [ -n "${PRELUDE_LAST_WORDS:-}" ]; then echo "${PRELUDE_LAST_WORDS}"; fi
  if [ -n "${PRELUDE_OUTLIVE:-}" ]; then
    sleep "${PRELUDE_OUTLIVE}" &
    wait $!
  fi
  exit "${code}"
fi
if [ -n "${PRELUDE_LATE_OUTPUT:-}" ]; then
  exec > >(sleep "${PRELUDE_LATE_OUTPUT}"; exec cat) 2>&1
fi
exec "${REAL_LLAMA_SERVER}" "$@"
