#!/usr/bin/env bash
# Make sure a Redis answers at the bus URL; start a local one if we can, else say how.
set -euo pipefail
URL="${1:-redis://127.0.0.1:6379/0}"
# The host part ends at the first /, ? or # (redis://h:6379?password=... has no /db).
HOSTPORT="${URL#*://}"; HOSTPORT="${HOSTPORT#*@}"; HOSTPORT="${HOSTPORT%%[/?#]*}"
HOST="${HOSTPORT%%:*}"; PORT="${HOSTPORT##*:}"; [ "$PORT" = "$HOST" ] && PORT=6379
if command -v redis-cli >/dev/null && redis-cli -h "$HOST" -p "$PORT" ping 2>/dev/null | grep -q PONG; then
  echo "redis answers at $HOST:$PORT"; exit 0
fi
if (exec 3<>"/dev/tcp/$HOST/$PORT") 2>/dev/null; then echo "redis port $HOST:$PORT is open"; exit 0; fi
case "$HOST" in
  127.0.0.1|localhost|::1) ;;
  *) echo "no Redis answers at $HOST:$PORT (ORION_BUS_URL); start it or fix the URL" >&2; exit 1 ;;
esac
if command -v redis-server >/dev/null; then
  echo "starting a local redis-server on $HOST:$PORT (no persistence)"
  redis-server --daemonize yes --bind "$HOST" --port "$PORT" --save "" --appendonly no \
    --dir "${TMPDIR:-/tmp}" --logfile "${TMPDIR:-/tmp}/orion-llamaccp-redis.log"
  for _ in $(seq 50); do
    if (exec 3<>"/dev/tcp/$HOST/$PORT") 2>/dev/null; then
      echo "it runs on after make; stop it with: redis-cli -h $HOST -p $PORT shutdown nosave"
      exit 0
    fi
    sleep 0.1
  done
  echo "redis-server did not come up; see ${TMPDIR:-/tmp}/orion-llamaccp-redis.log" >&2; exit 1
fi
cat >&2 <<MSG
No Redis answers at $HOST:$PORT and no redis-server is installed.
Get one with:   sudo apt-get install -y redis-server     (Debian/Ubuntu)
           or:  docker run -d -p 6379:6379 redis:7
or point ORION_BUS_URL at an existing Redis.
MSG
exit 1
