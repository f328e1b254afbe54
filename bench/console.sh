#!/usr/bin/env bash
# What the operations console costs the data plane: one gateway (one route to a stand-in
# backend, its admin port serving the console), driven by wrk, measured
#   1. before anybody ever opened the console (idle),
#   2. with one viewer (an open /console/events stream: the sampler reads the metrics and
#      the gateway's state once a second and sends a tick),
#   3. after the viewer left and the sampler stopped (LINGER, 60 s, plus a margin): idle again.
# Each phase runs twice; the best run of each is kept (the machine is shared). Besides
# requests/s, the gateway's own CPU time per request (utime+stime from /proc over the run,
# divided by the requests wrk completed) is printed: on 2 cores shared by wrk, the backend
# and the gateway it is steadier than requests/s.
#
# Needs: wrk, curl (Debian: apt-get install wrk curl). Uses ports 18480-18482.
# Usage: bench/console.sh [seconds-per-run (default 10)]
# Prints each run, then
#   console: viewer/idle rps=<x> cpu_per_req=<y>
#   console: after/before rps=<x> cpu_per_req=<y>
set -euo pipefail
cd "$(dirname "$0")/.."
DURATION=${1:-10}
CONNS=64
for tool in wrk curl; do
  command -v $tool >/dev/null || { echo "missing: $tool (apt-get install wrk curl)"; exit 1; }
done
# SHOPMESH_BIN: an already built binary (the default builds the release one).
if [ -n "${SHOPMESH_BIN:-}" ]; then BIN=$SHOPMESH_BIN; else
  cargo build --release -q -p shopmesh
  BIN=$PWD/target/release/shopmesh
fi
WORK=$(mktemp -d)
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  rm -rf "$WORK"
}
trap cleanup EXIT

UP=127.0.0.1:18480
GW=127.0.0.1:18481
ADMIN=127.0.0.1:18482
"$BIN" bench backend --listen "$UP" >"$WORK/backend.log" 2>&1 &
PIDS+=("$!")
cat >"$WORK/gateway.yaml" <<EOF
listen: $GW
admin: { listen: $ADMIN }
clusters: [{ name: up, endpoints: ["http://$UP"] }]
routes:
  - { name: products, match: { prefix: /api/products }, cluster: up }
EOF
"$BIN" gateway --config "$WORK/gateway.yaml" >"$WORK/gateway.log" 2>&1 &
GW_PID=$!
PIDS+=("$GW_PID")

wait_up() { for _ in $(seq 1 400); do curl -fs -o /dev/null "$1" && return 0; sleep 0.05; done; echo "not up: $1"; exit 1; }
wait_up "http://$UP/api/products/p1"
wait_up "http://$GW/api/products/p1"
wait_up "http://$ADMIN/healthz"

TICK=$(getconf CLK_TCK)
cpu_ticks() { awk '{ print $14 + $15 }' "/proc/$GW_PID/stat"; }
to_ms() { awk -v v="$1" 'BEGIN { n=v+0; if (v ~ /us$/) n/=1000; else if (v ~ /ms$/) n=n; else if (v ~ /s$/) n*=1000; printf "%.2f", n }'; }
# run LABEL → appends "rps p99_ms cpu_us_per_request" to $WORK/LABEL.txt
run() {
  local label=$1 out before after requests
  wrk -t1 -c"$CONNS" -d2s "http://$GW/api/products/p1" >/dev/null
  before=$(cpu_ticks)
  out=$(wrk -t1 -c"$CONNS" -d"${DURATION}s" --latency "http://$GW/api/products/p1")
  after=$(cpu_ticks)
  if grep -q 'Non-2xx' <<<"$out"; then echo "non-2xx answers" >&2; exit 1; fi
  requests=$(awk '/requests in/ { print $1 }' <<<"$out")
  local rps p99 cpu
  rps=$(awk '/Requests\/sec/ { printf "%d", $2 }' <<<"$out")
  p99=$(to_ms "$(awk '$1=="99%" { print $2 }' <<<"$out")")
  cpu=$(awk -v t=$((after - before)) -v hz="$TICK" -v n="$requests" 'BEGIN { printf "%.2f", t / hz * 1e6 / n }')
  echo "$rps $p99 $cpu" >>"$WORK/$label.txt"
  printf '%-7s %7d req/s  p99 %6.2f ms  gateway CPU %6.2f µs/request\n' "$label" "$rps" "$p99" "$cpu"
}
echo "wrk -t1 -c$CONNS -d${DURATION}s; 2 cores shared by wrk, the gateway and the backend"
run before
run before
# One viewer: the stream stays open for the whole phase.
curl -sN "http://$ADMIN/console/events" >"$WORK/events.txt" &
VIEWER=$!
PIDS+=("$VIEWER")
sleep 3
grep -q '^event: snapshot' "$WORK/events.txt" || { echo "the viewer got no snapshot"; exit 1; }
run viewer
run viewer
ticks=$(grep -c '^event: tick' "$WORK/events.txt")
kill "$VIEWER"
wait "$VIEWER" 2>/dev/null || true
echo "the viewer received $ticks ticks"
# The sampler goes on for a minute after the last viewer, then sleeps.
sleep 65
run after
run after

best() { awk '{ if ($1 > r) { r = $1; p = $2 } if (c == "" || $3 < c) c = $3 } END { print r, p, c }' "$WORK/$1.txt"; }
read -r B_RPS _ B_CPU < <(best before)
read -r V_RPS _ V_CPU < <(best viewer)
read -r A_RPS _ A_CPU < <(best after)
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.3f", a / b }'; }
echo "console: viewer/idle rps=$(ratio "$V_RPS" "$B_RPS") cpu_per_req=$(ratio "$V_CPU" "$B_CPU")"
echo "console: after/before rps=$(ratio "$A_RPS" "$B_RPS") cpu_per_req=$(ratio "$A_CPU" "$B_CPU")"
