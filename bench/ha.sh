#!/usr/bin/env bash
# The gateway's high availability, measured: failed/total requests through each scenario of
# crates/shopmesh/tests/ha.rs (real `shopmesh gateway` processes before a `shopmesh bench
# backend` upstream answering after 2 ms, 20 ms for kill -9; steady load from keep-alive
# HTTP/1.1, new-connection-per-request HTTP/1.1 and h2c clients), and the time from SIGTERM
# to not-ready (`/readyz` no longer 200) and to exit:
#   - two instances on one address (SO_REUSEPORT): requests each served, of 200 new
#     connections;
#   - a rolling restart of both, twice over (SIGTERM with a 300 ms pre-stop delay, the
#     replacement started beside it), with net.ipv4.tcp_migrate_req=1, then with 0 (to show
#     what it is for: connections queued on a closing listener are reset);
#   - three upgrades to a new binary in a row (SIGUSR2: listener handover), with
#     tcp_migrate_req=0: the time until the new process serves and until the old one exits;
#   - kill -9 of one of two instances: requests failed (in flight on it) and new connections
#     afterwards;
#   - each of the seven services restarted in turn beside itself (separate processes on
#     PostgreSQL and RabbitMQ) under order load: orders failed (the client sends an order
#     again only when its connection was refused, once, counted as `resent`), the time until
#     the replacement is ready and until the old process exits (pre-stop 200 ms).
# A failure is any request not answered 200 in full; hyper's client resends only a request
# not written before its pooled connection closed, the test only one HTTP/2 refused
# unprocessed (GOAWAY, REFUSED_STREAM), counted as `resent`.
#
# Needs: root, unshare and ip (each gateway restart scenario runs in its own network
# namespace, with its own loopback and tcp_migrate_req; Linux 5.14 or later); PostgreSQL and
# RabbitMQ for the services' one (DATABASE_URL, default
# postgres://postgres@127.0.0.1:5432/shopmesh_test; BROKER_URL, default
# amqp://guest:guest@127.0.0.1:5672; NO_SERVICES=1 skips it).
# Usage: bench/ha.sh [runs of each scenario (default 1)]
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${1:-1}
DATABASE_URL=${DATABASE_URL:-postgres://postgres@127.0.0.1:5432/shopmesh_test}
BROKER_URL=${BROKER_URL:-amqp://guest:guest@127.0.0.1:5672}
for tool in unshare ip; do
  command -v $tool >/dev/null || { echo "missing: $tool (apt-get install util-linux iproute2)"; exit 1; }
done
[ "$(id -u)" = 0 ] || { echo "needs root (a network namespace per scenario)"; exit 1; }
[ -e /proc/sys/net/ipv4/tcp_migrate_req ] || { echo "needs Linux 5.14 or later (net.ipv4.tcp_migrate_req)"; exit 1; }

# Built once, then run directly (one scenario per run).
TESTS=$(cargo test --release -q -p shopmesh --test ha --no-run --message-format=json \
  | grep '"kind":\["test"\]' | grep '"name":"ha"' | grep -o '"executable":"[^"]*"' | cut -d'"' -f4 | tail -n1)
[ -x "$TESTS" ] || { echo "the test binary was not built"; exit 1; }
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

# run NAME TEST [VAR=VALUE...]: RUNS runs of one test, its `ha:` lines kept in $WORK/NAME.
run() {
  local name=$1 test=$2
  shift 2
  : >"$WORK/$name"
  for _ in $(seq 1 "$RUNS"); do
    if ! env "$@" "$TESTS" --include-ignored --exact "$test" --nocapture --test-threads=1 \
      >"$WORK/out" 2>&1; then
      echo "ha: failed-run" >>"$WORK/$name"
      # Expected of the run without tcp_migrate_req; shown for any other.
      [ "$name" = rolling-nomigrate ] ||
        { echo "--- $name: $test failed"; grep -v 'ha: ' "$WORK/out" | tail -n 15; } >>"$WORK/failures.txt"
    fi
    grep -o 'ha: .*' "$WORK/out" >>"$WORK/$name" || true
  done
}

# field FILE KEY [FILTER]: the values of KEY= on the lines of FILE that match FILTER.
field() { grep -- "${3:-}" "$1" | grep -o "$2=[0-9]*" | cut -d= -f2; }
sum() { awk '{s+=$1} END {print s+0}'; }
avg() { awk '{s+=$1; n++} END {if (n) printf "%.0f", s/n; else print "-"}'; }

# requests FILE [CLIENT]: "failed/total" over every run, and what was resent.
requests() {
  printf '%s/%s' "$(field "$1" failed "client=${2:-all} " | sum)" "$(field "$1" total "client=${2:-all} " | sum)"
}
resent() { field "$1" resent "client=${2:-all} " | sum; }
by_client() {
  local out=""
  for c in h1 h1-new h2; do
    out+="$c $(field "$1" failed "client=$c " | sum)/$(field "$1" total "client=$c " | sum)  "
  done
  echo "$out"
}

run share two_instances_share_one_address_and_both_serve
run rolling a_rolling_restart_of_two_instances_under_load_fails_no_request
run rolling-nomigrate a_rolling_restart_of_two_instances_under_load_fails_no_request \
  SHOPMESH_HA_TCP_MIGRATE_REQ=0
run upgrade an_upgrade_to_a_new_binary_under_load_fails_no_request
run kill kill_9_of_one_of_two_instances_fails_only_requests_in_flight_on_it
if [ -z "${NO_SERVICES:-}" ]; then
  run services a_restart_of_each_service_under_order_load_fails_no_order \
    SHOPMESH_TEST_DATABASE="$DATABASE_URL" SHOPMESH_TEST_BROKER="$BROKER_URL"
fi

echo "gateway high availability (release build, 2 cores, $RUNS run(s) of each scenario)"
echo
printf "two instances on one address: of %s new connections, instance a served %s, b %s\n" \
  "$((200 * RUNS))" "$(grep 'instance=a ' "$WORK/share" | grep -o 'served=[0-9]*' | cut -d= -f2 | sum)" \
  "$(grep 'instance=b ' "$WORK/share" | grep -o 'served=[0-9]*' | cut -d= -f2 | sum)"
echo
printf "%-44s %14s %7s %10s %8s\n" scenario failed/total resent not-ready exit
for s in rolling rolling-nomigrate; do
  label="rolling restart, tcp_migrate_req=1"
  [ "$s" = rolling-nomigrate ] && label="rolling restart, tcp_migrate_req=0"
  printf "%-44s %14s %7s %7s ms %5s ms\n" "$label" "$(requests "$WORK/$s")" "$(resent "$WORK/$s")" \
    "$(field "$WORK/$s" not_ready_ms instance= | avg)" "$(field "$WORK/$s" exit_ms instance= | avg)"
  printf "    %s\n" "$(by_client "$WORK/$s")"
done
printf "%-44s %14s %7s %7s ms %5s ms\n" "upgrade (SIGUSR2, handover), tcp_migrate_req=0" \
  "$(requests "$WORK/upgrade")" "$(resent "$WORK/upgrade")" \
  "$(field "$WORK/upgrade" not_ready_ms instance=last | avg)" "$(field "$WORK/upgrade" exit_ms instance=last | avg)"
printf "    %s\n" "$(by_client "$WORK/upgrade")"
printf "    SIGUSR2 until the new process serves %s ms, until the old one has drained and exited %s ms (not-ready/exit: SIGTERM of the last)\n" \
  "$(field "$WORK/upgrade" new_serving_ms round= | avg)" "$(field "$WORK/upgrade" old_exit_ms round= | avg)"
printf "%-44s %14s %7s\n" "kill -9 of one of two" "$(requests "$WORK/kill")" "$(resent "$WORK/kill")"
printf "    %s\n" "$(by_client "$WORK/kill")"
printf "    failed: %s in flight at the kill, %s sent within 100 ms after it on the dead one's connections; new connections after it: %s of %s answered\n" \
  "$(field "$WORK/kill" failed_in_flight | sum)" "$(field "$WORK/kill" failed_just_after | sum)" \
  "$(field "$WORK/kill" fresh_connections_ok | sum)" "$((100 * RUNS))"
if [ -z "${NO_SERVICES:-}" ]; then
  printf "%-44s %14s %7s %7s ms %5s ms\n" "each service restarted beside itself (orders)" \
    "$(requests "$WORK/services" orders)" "$(resent "$WORK/services" orders)" \
    "$(field "$WORK/services" replacement_ready_ms service= | avg)" "$(field "$WORK/services" exit_ms service= | avg)"
  printf "    (not-ready column: until the replacement is ready; exit: SIGTERM to exit of the old, pre-stop 200 ms; PostgreSQL + %s)\n" "${BROKER_URL%%://*}"
  grep -h 'orders=' "$WORK/services" | sed 's/^ha: scenario=service-restart /    /' || true
fi
echo
echo "pre-stop delay 300 ms in the rolling restart (exit = pre-stop + drain); runs whose test failed: $(cat "$WORK"/* | grep -c 'failed-run' || true) (the tcp_migrate_req=0 one may, by design)"
[ -f "$WORK/failures.txt" ] && { echo; cat "$WORK/failures.txt"; }
true
