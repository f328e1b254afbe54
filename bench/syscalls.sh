#!/usr/bin/env bash
# System calls per proxied request: the gateway (chain off, and full chain: JWT, rate limit,
# JSON access log) against nginx proxying the same upstream, counted with `perf stat` on the
# kernel's system-call tracepoints (`syscalls:sys_enter_*`) of the proxy's processes while a
# fixed number of keep-alive requests go through.
#
# The tracepoints count in the kernel without stopping the process, so the proxy runs at its
# own speed and batches reads, writes and wake-ups as it does in production. (`strace -c`,
# which this script used before, stops the process at every call: a slower proxy parks more
# often, and a runtime's wake-ups through its eventfd tripled under it.) Run with the same
# load (hey -n $REQUESTS -c $CONNS) against each.
#
# Needs: perf (Debian: linux-perf), hey, nginx, openssl, curl, and root (perf reads the
# tracepoints through tracefs). Uses ports 18680-18685.
# Install: apt-get install linux-perf hey nginx-light openssl curl
# Usage: [SHOPMESH_BIN=path] bench/syscalls.sh [requests (default 20000)] [connections (default 8)]
set -euo pipefail
cd "$(dirname "$0")/.."
REQUESTS=${1:-20000}
CONNS=${2:-8}
for tool in perf hey nginx openssl curl basenc; do
  command -v $tool >/dev/null || { echo "missing: $tool (apt-get install linux-perf hey nginx-light openssl curl)"; exit 1; }
done
perf stat -e 'syscalls:sys_enter_getpid' -o /dev/null -- true 2>/dev/null \
  || { echo "perf cannot read the system-call tracepoints (run as root)" >&2; exit 1; }

# SHOPMESH_BIN: a binary already built (default: build the release one).
BIN=${SHOPMESH_BIN:-}
if [ -z "$BIN" ]; then
  cargo build --release -q -p shopmesh
  BIN=$PWD/target/release/shopmesh
fi
WORK=$(mktemp -d)
chmod 755 "$WORK"
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  for f in "$WORK"/*.pid; do [ -f "$f" ] && { kill "$(cat "$f")" 2>/dev/null || true; }; done
  rm -rf "$WORK"
}
trap cleanup EXIT

UP=127.0.0.1:18680
NGX=127.0.0.1:18681
GW_MIN=127.0.0.1:18682
GW=127.0.0.1:18683

# A token the full chain verifies (EdDSA, made with openssl).
b64url() { basenc --base64url -w0 | tr -d '='; }
openssl genpkey -algorithm ed25519 -out "$WORK/key.pem" 2>/dev/null
X=$(openssl pkey -in "$WORK/key.pem" -pubout -outform DER | tail -c 32 | b64url)
printf '{"keys":[{"kty":"OKP","crv":"Ed25519","kid":"k1","x":"%s"}]}' "$X" >"$WORK/jwks.json"
NOW=$(date +%s)
HEADER=$(printf '{"alg":"EdDSA","typ":"JWT","kid":"k1"}' | b64url)
PAYLOAD=$(printf '{"sub":"u1","iss":"bench","aud":"bench","iat":%d,"exp":%d}' "$NOW" $((NOW + 3600)) | b64url)
printf '%s.%s' "$HEADER" "$PAYLOAD" >"$WORK/in"
TOKEN="$HEADER.$PAYLOAD.$(openssl pkeyutl -sign -inkey "$WORK/key.pem" -rawin -in "$WORK/in" | b64url)"

cat >"$WORK/upstream.conf" <<CONF
worker_processes 1;
pid $WORK/upstream.pid;
error_log $WORK/upstream-error.log warn;
events { worker_connections 1024; }
http {
  access_log off;
  keepalive_requests 10000000;
  server {
    listen $UP;
    location = /jwks.json { default_type application/json; alias $WORK/jwks.json; }
    location / { default_type text/plain; return 200 "hello from upstream\n"; }
  }
}
CONF
nginx -c "$WORK/upstream.conf" -e "$WORK/upstream-error.log" 2>/dev/null

# nginx as the proxy, with the JSON access log the gateway's full chain writes.
cat >"$WORK/nginx.conf" <<CONF
worker_processes 2;
pid $WORK/nginx.pid;
error_log $WORK/nginx-error.log warn;
events { worker_connections 1024; }
http {
  keepalive_requests 10000000;
  log_format json escape=json '{"time":"\$time_iso8601","client":"\$remote_addr","method":"\$request_method","path":"\$uri","status":\$status,"duration_ms":\$request_time}';
  access_log $WORK/nginx-access.log json;
  upstream up { server $UP; keepalive 64; keepalive_requests 10000000; }
  server {
    listen $NGX;
    location / {
      proxy_pass http://up;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
    }
  }
}
CONF
nginx -c "$WORK/nginx.conf" -e "$WORK/nginx-error.log"

cat >"$WORK/gateway-min.yaml" <<CONF
listen: $GW_MIN
admin: { listen: 127.0.0.1:18684 }
workers: 2
clusters: [{ name: up, endpoints: ["http://$UP"] }]
routes: [{ name: r, match: { prefix: / }, cluster: up }]
CONF
cat >"$WORK/gateway.yaml" <<CONF
listen: $GW
admin: { listen: 127.0.0.1:18685 }
workers: 2
access_log: true
jwt: { jwks_url: "http://$UP/jwks.json", issuer: bench, audience: bench }
clusters: [{ name: up, endpoints: ["http://$UP"] }]
routes:
  - name: r
    match: { prefix: / }
    cluster: up
    auth: { required: true }
    rate_limit: { per_second: 100000000, burst: 100000000, key: user }
CONF
"$BIN" gateway --config "$WORK/gateway-min.yaml" >"$WORK/gw-min.log" 2>&1 &
GW_MIN_PID=$!
PIDS+=("$GW_MIN_PID")
SHOPMESH_LOG_FORMAT=json "$BIN" gateway --config "$WORK/gateway.yaml" >"$WORK/gw.log" 2>&1 &
GW_PID=$!
PIDS+=("$GW_PID")

wait_up() { for _ in $(seq 1 200); do curl -fs -o /dev/null "$@" && return 0; sleep 0.05; done; echo "not up: $*"; exit 1; }
wait_up "http://$UP/"
wait_up "http://$NGX/"
wait_up "http://$GW_MIN/"
wait_up -H "Authorization: Bearer $TOKEN" "http://$GW/"

# count NAME URL AUTH(yes|no) PID... → "calls-per-request top-5" on stdout; a failure is
# told on stderr (stdout is the caller's variable) and ends the script.
count() {
  local name=$1 url=$2 auth=$3; shift 3
  local hdr=()
  [ "$auth" = yes ] && hdr=(-H "Authorization: Bearer $TOKEN")
  local pids
  pids=$(tr ' ' ',' <<<"$*")
  hey -n 2000 -c "$CONNS" "${hdr[@]}" "$url" >/dev/null # warm-up
  # Every thread of every process: perf stat -p follows all of a process's threads.
  perf stat -e 'syscalls:sys_enter_*' -x, -o "$WORK/$name.perf" -p "$pids" &
  local st=$!
  sleep 2 # perf opens a few hundred counters per thread before it counts
  local out
  out=$(hey -n "$REQUESTS" -c "$CONNS" "${hdr[@]}" "$url")
  kill -INT "$st"; wait "$st" 2>/dev/null || true
  local bad
  bad=$(awk '/^ *\[[0-9]+\]/ && $1 != "[200]" {s += $2} END {print s+0}' <<<"$out")
  [ "$bad" = 0 ] || { echo "$name: $bad requests did not answer 200" >&2; exit 1; }
  # perf stat -x, rows: "count,unit,event,…"; the calls made while idle (a timer per
  # 50 ms, epoll's wait) are counted too, as they are part of what the proxy costs.
  awk -F, '$3 ~ /^syscalls:sys_enter_/ && $1 ~ /^[0-9]+$/ && $1 > 0 {sub("syscalls:sys_enter_", "", $3); print $1, $3}' \
    "$WORK/$name.perf" | sort -rn >"$WORK/$name.rows"
  [ -s "$WORK/$name.rows" ] || { echo "$name: perf counted nothing" >&2; cat "$WORK/$name.perf" >&2; exit 1; }
  awk -v n="$REQUESTS" '{t += $1; if (NR <= 5) top = top sprintf(" %s=%.2f", $2, $1 / n)}
    END {printf "%.2f%s\n", t / n, top}' "$WORK/$name.rows"
}

nginx_workers=$(pgrep -P "$(cat "$WORK/nginx.pid")" | tr '\n' ' ')
echo "system calls per request: hey -n $REQUESTS -c $CONNS keep-alive, perf stat on the system-call tracepoints of the proxy's processes"
N=$(count nginx "http://$NGX/" no $nginx_workers)
M=$(count gateway-min "http://$GW_MIN/" no "$GW_MIN_PID")
G=$(count gateway "http://$GW/" yes "$GW_PID")
echo "syscalls: nginx (JSON access log)      ${N}"
echo "syscalls: gateway, chain off           ${M}"
echo "syscalls: gateway, full chain (JWT, limit, JSON access log) ${G}"
awk -v g="${G%% *}" -v m="${M%% *}" -v n="${N%% *}" \
  'BEGIN {printf "syscalls: per request gateway/nginx=%.2f (chain off) %.2f (full chain)\n", m / n, g / n}'
