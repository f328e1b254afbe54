#!/usr/bin/env bash
# The cost of a large route table: the gateway (chain off: routing and metrics only) with
# 10 routes and with 10,000 routes (a mix of prefixes, exact paths and templates), the
# request matching the last route declared in both, so that a table scanned route by route
# would pay for every route before it. Routes are found through the compiled index
# (crates/gateway/src/router.rs `RouteIndex`), so the ratio should stay near 1.
#
# Needs: wrk, curl (Debian: apt-get install wrk curl). Uses ports 18580-18584.
# Usage: bench/routes.sh [seconds-per-run (default 10)]
# Prints: `routes: 10000/10 rps=<x> p99=<y>` and each run's figures.
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

UP=127.0.0.1:18580
SMALL=127.0.0.1:18581
LARGE=127.0.0.1:18582

"$BIN" bench backend --listen "$UP" >"$WORK/backend.log" 2>&1 &
PIDS+=("$!")

# routes N → a route table of N routes; the last is `target`, a template matching
# /api/products/{id} (the backend's product answer).
routes() {
  local n=$1 i
  echo "routes:"
  for ((i = 0; i < n - 1; i++)); do
    case $((i % 3)) in
      0) echo "  - { name: p$i, match: { prefix: /svc$i/items }, cluster: up }" ;;
      1) echo "  - { name: e$i, match: { exact: /svc$i/status }, cluster: up }" ;;
      2) echo "  - { name: t$i, match: { template: \"/svc$i/items/{id}/parts/{part}\" }, cluster: up }" ;;
    esac
  done
  echo "  - { name: target, match: { template: \"/api/products/{id}\" }, cluster: up }"
}
config() { # listen admin n
  {
    echo "listen: $1"
    echo "admin: { listen: $2 }"
    echo "clusters: [{ name: up, endpoints: [\"http://$UP\"] }]"
    routes "$3"
  } >"$WORK/gateway-$3.yaml"
}
config "$SMALL" 127.0.0.1:18583 10
config "$LARGE" 127.0.0.1:18584 10000
"$BIN" gateway --check --config "$WORK/gateway-10000.yaml" >/dev/null
"$BIN" gateway --config "$WORK/gateway-10.yaml" >"$WORK/small.log" 2>&1 &
PIDS+=("$!")
"$BIN" gateway --config "$WORK/gateway-10000.yaml" >"$WORK/large.log" 2>&1 &
PIDS+=("$!")

wait_up() { for _ in $(seq 1 400); do curl -fs -o /dev/null "$1" && return 0; sleep 0.05; done; echo "not up: $1"; exit 1; }
wait_up "http://$UP/api/products/p1"
wait_up "http://$SMALL/api/products/p1"
wait_up "http://$LARGE/api/products/p1"

to_ms() { awk -v v="$1" 'BEGIN { n=v+0; if (v ~ /us$/) n/=1000; else if (v ~ /ms$/) n=n; else if (v ~ /s$/) n*=1000; printf "%.2f", n }'; }
run_wrk() { # url → "rps p99"
  wrk -t1 -c"$CONNS" -d2s "$1" >/dev/null
  local out
  out=$(wrk -t1 -c"$CONNS" -d"${DURATION}s" --latency "$1")
  if grep -q 'Non-2xx' <<<"$out"; then echo "$1: non-2xx answers" >&2; exit 1; fi
  echo "$(awk '/Requests\/sec/ {printf "%d", $2}' <<<"$out") $(to_ms "$(awk '$1=="99%" {print $2}' <<<"$out")")"
}
echo "wrk -t1 -c$CONNS -d${DURATION}s; 2 cores shared by wrk, the gateways and the backend"
# Alternate the two, twice, and keep each one's best run (the machine is shared).
best() { awk '{ if ($1 > r) { r = $1; p = $2 } } END { print r, p }'; }
for _ in 1 2; do
  run_wrk "http://$SMALL/api/products/p1" >>"$WORK/small.txt"
  run_wrk "http://$LARGE/api/products/p1" >>"$WORK/large.txt"
done
read -r S_RPS S_P99 < <(best <"$WORK/small.txt")
read -r L_RPS L_P99 < <(best <"$WORK/large.txt")
echo "10 routes:     $S_RPS req/s p99=${S_P99}ms"
echo "10,000 routes: $L_RPS req/s p99=${L_P99}ms"
printf 'routes: 10000/10 rps=%.2f p99=%.2f\n' "$(echo "$L_RPS/$S_RPS" | bc -l)" "$(echo "$L_P99/$S_P99" | bc -l)"
