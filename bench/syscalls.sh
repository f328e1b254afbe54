#!/usr/bin/env bash
# System calls per proxied request: the gateway (chain off, and full chain: JWT, rate limit,
# JSON access log) against nginx proxying the same upstream, counted with `strace -c -f`
# attached to the proxy's processes while a fixed number of keep-alive requests go through.
#
# strace slows every call down, so the throughput under it means nothing; the counts per
# request do not depend on it (they depend on how the proxy batches reads, writes and
# wake-ups, which a slower run can only make larger for both by the same mechanism). Run
# with the same load (hey -n $REQUESTS -c $CONNS) against each.
#
# Needs: strace, hey, nginx, openssl, curl (Debian: apt-get install strace hey nginx-light
# openssl curl). Uses ports 18680-18685.
# Usage: [SHOPMESH_BIN=path] bench/syscalls.sh [requests (default 20000)] [connections (default 8)]
set -euo pipefail
cd "$(dirname "$0")/.."
REQUESTS=${1:-20000}
CONNS=${2:-8}
for tool in strace hey nginx openssl curl basenc; do
  command -v $tool >/dev/null || { echo "missing: $tool (apt-get install strace hey nginx-light openssl curl)"; exit 1; }
done

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

# count NAME URL AUTH(yes|no) PID... → "calls-per-request top-5"
count() {
  local name=$1 url=$2 auth=$3; shift 3
  local args=() hdr=()
  [ "$auth" = yes ] && hdr=(-H "Authorization: Bearer $TOKEN")
  # Every thread of every process (strace -p attaches to one thread).
  for p in "$@"; do for t in /proc/"$p"/task/*; do args+=(-p "${t##*/}"); done; done
  hey -n 2000 -c "$CONNS" "${hdr[@]}" "$url" >/dev/null # warm-up
  strace -f -c -o "$WORK/$name.strace" "${args[@]}" 2>/dev/null &
  local st=$!
  sleep 1
  local out
  out=$(hey -n "$REQUESTS" -c "$CONNS" "${hdr[@]}" "$url")
  kill -INT "$st"; wait "$st" 2>/dev/null || true
  local bad
  bad=$(awk '/^ *\[[0-9]+\]/ && $1 != "[200]" {s += $2} END {print s+0}' <<<"$out")
  [ "$bad" = 0 ] || { echo "$name: $bad requests did not answer 200"; exit 1; }
  # strace -c's table: "% time, seconds, usecs/call, calls, [errors], syscall" per row.
  awk '$1 ~ /^[0-9.]+$/ && $NF != "total" && NF >= 5 {print $4, $NF}' "$WORK/$name.strace" \
    | sort -rn >"$WORK/$name.rows"
  awk -v n="$REQUESTS" '{t += $1; if (NR <= 5) top = top sprintf(" %s=%.2f", $2, $1 / n)}
    END {printf "%.2f%s\n", t / n, top}' "$WORK/$name.rows"
}

nginx_workers=$(pgrep -P "$(cat "$WORK/nginx.pid")" | tr '\n' ' ')
echo "system calls per request: hey -n $REQUESTS -c $CONNS keep-alive, strace -c -f on the proxy's processes"
N=$(count nginx "http://$NGX/" no $nginx_workers)
M=$(count gateway-min "http://$GW_MIN/" no "$GW_MIN_PID")
G=$(count gateway "http://$GW/" yes "$GW_PID")
for v in "$N" "$M" "$G"; do case "$v" in *requests*) echo "$v"; exit 1 ;; esac; done
echo "syscalls: nginx (JSON access log)      ${N}"
echo "syscalls: gateway, chain off           ${M}"
echo "syscalls: gateway, full chain (JWT, limit, JSON access log) ${G}"
awk -v g="${G%% *}" -v m="${M%% *}" -v n="${N%% *}" \
  'BEGIN {printf "syscalls: per request gateway/nginx=%.2f (chain off) %.2f (full chain)\n", m / n, g / n}'
