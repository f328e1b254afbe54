#!/usr/bin/env bash
# The user center, measured: sign-ins per second at the argon2id cost, token verifications
# per second at the gateway's verifier, account lookups through the interface (cache hit and
# miss) against a read of the shared database's published view, and the consistency window
# of each way of sharing (a profile change until the orders service ships to the new address).
#
# Sign-ins: `shopmesh up` (SQLite) with throttling lifted, `hey` posting one account's
# credentials from 4 connections. The rest: `shopmesh bench identity` (in-process shops).
#
# Needs: hey, curl (Debian: apt-get install hey curl). Uses port 18380.
# Usage: bench/identity.sh [seconds of sign-ins (default 10)]
set -euo pipefail
cd "$(dirname "$0")/.."
DURATION=${1:-10}
for tool in hey curl; do
  command -v $tool >/dev/null || { echo "missing: $tool (apt-get install hey curl)"; exit 1; }
done

cargo build --release -q
BIN=$PWD/target/release/shopmesh
WORK=$(mktemp -d)
PID=
cleanup() {
  [ -n "$PID" ] && kill "$PID" 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT

GW=http://127.0.0.1:18380
"$BIN" up --port 18380 --admin-port 18381 --data-dir "$WORK" --seed-products 10 \
  --login-per-account 100000000 --login-per-ip 100000000 >"$WORK/up.log" 2>&1 &
PID=$!
for _ in $(seq 1 200); do curl -fs -o /dev/null "$GW/.well-known/jwks.json" && break; sleep 0.05; done
curl -fs -o /dev/null -XPOST "$GW/api/users" -H 'content-type: application/json' \
  -d '{"email":"bench@example.test","password":"correct horse battery","name":"Bench"}'
BODY='{"email":"bench@example.test","password":"correct horse battery"}'
hey -z "${DURATION}s" -c 4 -m POST -T application/json -d "$BODY" "$GW/api/auth/token" >"$WORK/hey.out"
RPS=$(awk '/Requests\/sec/ {printf "%.0f", $2}' "$WORK/hey.out")
P50=$(awk '/ 50% in/ {printf "%.0f", $3*1000}' "$WORK/hey.out")
P99=$(awk '/ 99% in/ {printf "%.0f", $3*1000}' "$WORK/hey.out")
OK=$(awk '/\[200\]/ {print $2}' "$WORK/hey.out")
echo "sign-ins (argon2id m=19 MiB t=2 p=1, 2 cores, hey -c 4 for ${DURATION}s):"
printf "  %s sign-ins/s   p50 %s ms   p99 %s ms   (%s answered 200)\n" "$RPS" "$P50" "$P99" "${OK:-0}"
kill "$PID"; wait "$PID" 2>/dev/null || true; PID=

RUST_LOG=error "$BIN" bench identity 2>/dev/null
