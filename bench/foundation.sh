#!/usr/bin/env bash
# Foundation figures: start-up time on a seeded data dir, idle RSS of the whole system, and
# latency of GET /api/products/{id} at a fixed 1,000 req/s through the shopmesh gateway, next
# to nginx proxying the same request to the same catalog service (and the service direct).
#
# Needs: hey, nginx (Debian: apt-get install hey nginx-light). Uses ports 18080/19901/18081.
# Usage: bench/foundation.sh [seconds-per-run (default 20)]
set -euo pipefail
cd "$(dirname "$0")/.."
DURATION=${1:-20}
RATE=1000          # total requests per second
WORKERS=10         # hey workers; each is limited to RATE/WORKERS req/s
for tool in hey nginx curl; do command -v $tool >/dev/null || { echo "missing: $tool"; exit 1; }; done

cargo build --release -q
BIN=target/release/shopmesh
WORK=$(mktemp -d)
trap 'kill $UP_PID 2>/dev/null || true; [ -f "$WORK/nginx.pid" ] && kill "$(cat "$WORK/nginx.pid")" 2>/dev/null; rm -rf "$WORK"' EXIT
GW=http://127.0.0.1:18080

wait_ready() { # prints ms until the gateway serves a product page
  local t0=$1
  until curl -fs -o /dev/null "$GW/api/products?limit=1"; do sleep 0.005; done
  echo $(( ($(date +%s%N) - t0) / 1000000 ))
}

# 1. First start seeds the data dir.
t0=$(date +%s%N)
$BIN up --data-dir "$WORK/data" --port 18080 --admin-port 19901 >"$WORK/up1.log" 2>&1 &
UP_PID=$!
first_ms=$(wait_ready "$t0")
kill -TERM $UP_PID; wait $UP_PID || true

# 2. Restart on the seeded data dir: time to ready, then idle RSS.
t0=$(date +%s%N)
$BIN up --data-dir "$WORK/data" --port 18080 --admin-port 19901 >"$WORK/up2.log" 2>&1 &
UP_PID=$!
ready_ms=$(wait_ready "$t0")
sleep 2
rss_kb=$(awk '/VmRSS/ {print $2}' /proc/$UP_PID/status)

CATALOG=$(grep -Eo 'catalog +http://[0-9.:]+' "$WORK/up2.log" | awk '{print $2}')
PRODUCT=$(curl -fs "$GW/api/products?limit=1&offset=4321" | grep -o '"id":"[0-9a-f-]*"' | head -1 | cut -d'"' -f4)
PATH_Q="/api/products/$PRODUCT"

# 3. nginx as the peer: same request, same catalog service, keep-alive upstream.
cat >"$WORK/nginx.conf" <<CONF
worker_processes 1;
pid $WORK/nginx.pid;
error_log $WORK/nginx-error.log warn;
events { worker_connections 1024; }
http {
  access_log off;
  upstream catalog { server ${CATALOG#http://}; keepalive 64; }
  server {
    listen 127.0.0.1:18081;
    location / {
      proxy_pass http://catalog;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
    }
  }
}
CONF
nginx -c "$WORK/nginx.conf"
sleep 0.5

run() { # name url → "p50_ms p99_ms rps errors"
  hey -z 3s -c $WORKERS -q $((RATE / WORKERS)) "$2" >/dev/null   # warm-up
  hey -z "${DURATION}s" -c $WORKERS -q $((RATE / WORKERS)) "$2" >"$WORK/$1.txt"
  awk '
    /Requests\/sec/ {rps=$2}
    / 50%? in/ || / 50% in/ {p50=$3*1000}
    / 99% in/ {p99=$3*1000}
    /\[200\]/ {ok=$2}
    END {printf "%.2f %.2f %.0f %s\n", p50, p99, rps, ok}' "$WORK/$1.txt"
}

read -r gw50 gw99 gwrps gwok < <(run gateway "$GW$PATH_Q")
read -r ng50 ng99 ngrps ngok < <(run nginx "http://127.0.0.1:18081$PATH_Q")
read -r dr50 dr99 drrps drok < <(run direct "$CATALOG$PATH_Q")

echo
echo "shopmesh foundation benchmark ($(nproc) cores, $(date -u +%F))"
echo
printf '%-44s %12s\n' "first start (migrate + seed 10,000 products)" "${first_ms} ms"
printf '%-44s %12s   target < 3000 ms\n' "start to ready on a seeded data dir" "${ready_ms} ms"
printf '%-44s %12s   target < 150 MB\n' "RSS of the whole system, idle" "$((rss_kb / 1024)) MB"
echo
echo "GET /api/products/{id} at a fixed ${RATE} req/s for ${DURATION}s (hey, ${WORKERS} connections)"
printf '%-28s %9s %9s %9s %9s\n' "" "p50 ms" "p99 ms" "req/s" "200s"
printf '%-28s %9s %9s %9s %9s\n' "shopmesh gateway" "$gw50" "$gw99" "$gwrps" "$gwok"
printf '%-28s %9s %9s %9s %9s\n' "nginx (same upstream)" "$ng50" "$ng99" "$ngrps" "$ngok"
printf '%-28s %9s %9s %9s %9s\n' "catalog service, direct" "$dr50" "$dr99" "$drrps" "$drok"
echo "target: gateway p99 < 5 ms"
