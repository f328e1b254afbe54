#!/usr/bin/env bash
# End-to-end order saga throughput and latency on `shopmesh up`: embedded broker with the
# services on SQLite and on PostgreSQL, then PostgreSQL with RabbitMQ, with NATS JetStream and
# with Kafka (Tansu: .ci/kafka.sh);
# pgbench -N on the same machine as the database's ceiling, and each broker adapter's raw
# publish→consume rate (`shopmesh bench broker`) so the bottleneck is visible. Orders are driven through the gateway with hey; saga latency is measured per
# order from its own timestamps (placed → CONFIRMED/CANCELLED).
#
# Needs: hey, sqlite3, psql, pgbench (Debian: hey sqlite3 postgresql-client postgresql-contrib).
# Usage: bench/orders.sh [seconds-of-load (default 10)]
#   SQLITE_ONLY=1 runs SQLite only; PG_ONLY=1 skips SQLite; NO_BROKERS=1 skips RabbitMQ, NATS
#   and Kafka; BROKERS_ONLY=1 runs only the PostgreSQL + RabbitMQ/NATS/Kafka configurations;
#   NO_RABBITMQ=1, NO_NATS=1, NO_KAFKA=1 skip one of them.
#   MESH=1 also runs SQLite with every call between services through the mesh's sidecars
#   (`shopmesh up --mesh`: mutual TLS, policy) and prints orders/s with the mesh over without;
#   MESH_ONLY=1 runs just those two (bench/mesh.sh uses it).
#   AMQP_URL / NATS_URL / KAFKA_URL (default amqp://guest:guest@127.0.0.1:5672,
#   nats://127.0.0.1:4222, kafka://127.0.0.1:9092).
set -euo pipefail
cd "$(dirname "$0")/.."
SECS=${1:-10}
CONC=32
PG_ADMIN="postgres://postgres@127.0.0.1:5432/test"
PG_DB=shopmesh_bench
AMQP_URL=${AMQP_URL:-amqp://guest:guest@127.0.0.1:5672}
NATS_URL=${NATS_URL:-nats://127.0.0.1:4222}
KAFKA_URL=${KAFKA_URL:-kafka://127.0.0.1:9092}
ADMIN=http://127.0.0.1:19901
for tool in hey sqlite3 psql pgbench curl; do command -v $tool >/dev/null || { echo "missing: $tool"; exit 1; }; done

# SHOPMESH_BIN: a binary already built (default: build the release one).
BIN=${SHOPMESH_BIN:-}
if [ -z "$BIN" ]; then
  cargo build --release -q
  BIN=$PWD/target/release/shopmesh
fi
WORK=$(mktemp -d)
UP_PID=
trap '[ -n "$UP_PID" ] && kill $UP_PID 2>/dev/null; rm -rf "$WORK"' EXIT
GW=http://127.0.0.1:18080

start() { # args: extra flags
  "$BIN" up --data-dir "$WORK/data" --port 18080 --admin-port 19901 "$@" >>"$WORK/up.log" 2>&1 &
  UP_PID=$!
  until curl -fs -o /dev/null "$GW/api/products?limit=1"; do sleep 0.05; done
}
stop() { kill -TERM $UP_PID; wait $UP_PID 2>/dev/null || true; UP_PID=; }

sql() { # config, query → rows (| separated)
  if [ "${1%%+*}" = sqlite ]; then sqlite3 "$WORK/data/orders.db" "$2"
  else psql -qtA -F'|' "postgres://postgres@127.0.0.1:5432/$PG_DB" -c "SET search_path TO orders" -c "$2"; fi
}
stock_sql() {
  if [ "${1%%+*}" = sqlite ]; then sqlite3 "$WORK/data/inventory.db" "$2"
  else psql -qtA "postgres://postgres@127.0.0.1:5432/$PG_DB" -c "SET search_path TO inventory" -c "$2"; fi
}

# Messages waiting in the consumers' queues: the embedded broker's table, or (real brokers)
# the consumers' backlog gauges, which they refresh every second.
backlog() {
  if [ -f "$WORK/data/broker.db" ] && [ "$BROKER_KIND" = embedded ]; then
    sqlite3 "$WORK/data/broker.db" "SELECT COUNT(*) FROM queue"
  else
    curl -fs "$ADMIN/metrics" | awk '/^messaging_backlog\{/ {s += $2} END {printf "%d", s}'
  fi
}

# Drives load for $SECS seconds (optionally rate-limited), waits for every order to finish,
# prints "<orders/s> <p50 ms> <p99 ms> <orders> <rejected> <drain ms after the load>".
drive() { # config, [per-worker rate]
  local cfg=$1 rate=${2:-0}
  sql "$cfg" "DELETE FROM order_items; DELETE FROM orders" >/dev/null
  local email="bench$(date +%s%N)@example.test"
  curl -fs -XPOST "$GW/api/users" -H 'content-type: application/json' \
    -d "{\"email\":\"$email\",\"password\":\"benchmark-pw\",\"name\":\"Bench\"}" >/dev/null
  local token
  token=$(curl -fs -XPOST "$GW/api/auth/token" -H 'content-type: application/json' \
    -d "{\"email\":\"$email\",\"password\":\"benchmark-pw\"}" | sed -E 's/.*"access_token":"([^"]+)".*/\1/')
  local product
  # The first product id of the (enriched) listing's page.
  product=$(curl -fs "$GW/api/products?limit=1&offset=77" | grep -o '"id":"[0-9a-f-]*"' | head -1 | cut -d'"' -f4)
  local body="{\"items\":[{\"product_id\":\"$product\",\"quantity\":1}],\"card\":\"4242424242424242\"}"
  local q=()
  [ "$rate" != 0 ] && q=(-q "$rate")
  hey -z "${SECS}s" -c $CONC "${q[@]}" -m POST -T application/json \
    -H "authorization: Bearer $token" -d "$body" "$GW/api/orders" >"$WORK/hey-$cfg.txt"
  # Wait for the backlog to drain: every order terminal and every queue empty (captures and
  # stock commits included), so that the next run starts from rest.
  for _ in $(seq 1 1200); do
    if [ "$(sql "$cfg" "SELECT COUNT(*) FROM orders WHERE status = 'PENDING'")" = 0 ] &&
       [ "$(backlog)" = 0 ] && sleep 1.2 && [ "$(backlog)" = 0 ]; then
      break
    fi
    sleep 0.5
  done
  local n first last
  n=$(sql "$cfg" "SELECT COUNT(*) FROM orders")
  first=$(sql "$cfg" "SELECT MIN(created_at) FROM orders")
  last=$(sql "$cfg" "SELECT MAX(updated_at) FROM orders")
  sql "$cfg" "SELECT updated_at - created_at FROM orders WHERE status <> 'PENDING' ORDER BY 1" >"$WORK/lat.txt"
  local rejected accepted pending
  # Non-202 statuses ("[503] 3 responses") and transport errors ("[3] Post …: reset").
  rejected=$(awk '/^ *\[[0-9]+\]/ {
      if ($3 == "responses") { if ($1 != "[202]") s += $2 }
      else { gsub(/[][]/, "", $1); s += $1 } }
    END {print s+0}' "$WORK/hey-$cfg.txt")
  accepted=$(awk '/\[202\]/ {print $2}' "$WORK/hey-$cfg.txt")
  pending=$(sql "$cfg" "SELECT COUNT(*) FROM orders WHERE status = 'PENDING'")
  local outcomes
  outcomes=$(sql "$cfg" "SELECT status || COALESCE(':' || status_reason, '') || '=' || COUNT(*) FROM orders GROUP BY status, status_reason ORDER BY 1" | tr '\n' ' ')
  echo "  $cfg run: $outcomes" >&2
  [ "$pending" = 0 ] || echo "WARNING: $pending orders still pending" >&2
  [ "$n" -ge "${accepted:-0}" ] || echo "WARNING: $(( accepted - n )) accepted orders missing" >&2
  awk -v n="$n" -v span="$((last - first))" -v rej="$rejected" -v loadms="$((SECS * 1000))" '
    {v[NR]=$1} END {
      p50=v[int(NR*0.50)>0?int(NR*0.50):1]; p99=v[int(NR*0.99)>0?int(NR*0.99):1];
      drain=span-loadms; if (drain<0) drain=0;
      printf "%.0f %d %d %d %d %d\n", n*1000/(span>0?span:1), p50, p99, n, rej, drain }' "$WORK/lat.txt"
}

bench_config() { # config, extra flags...
  local cfg=$1; shift
  BROKER_KIND=embedded
  case "$*" in
    *amqp://*) BROKER_KIND=rabbitmq ;; *nats://*) BROKER_KIND=nats ;; *kafka://*) BROKER_KIND=kafka ;;
  esac
  rm -rf "$WORK/data"
  start --seed-products 1000 "$@"; stop
  # Plenty of stock so every order can be confirmed.
  stock_sql "$cfg" "UPDATE stock SET on_hand = 100000000" >/dev/null
  start --seed-products 1000 "$@"
  read -r max_rate max50 max99 max_n max_rej _ < <(drive "$cfg")
  local half=$(( max_rate / 2 / CONC )); [ $half -lt 1 ] && half=1
  read -r half_rate half50 half99 half_n half_rej _ < <(drive "$cfg" $half)
  # A 10x burst: ten times a steady tenth of the maximum, for $SECS seconds.
  local burst=$(( max_rate / CONC )); [ $burst -lt 1 ] && burst=1
  read -r _ b50 b99 b_n b_rej b_drain < <(drive "$cfg" $burst)
  stop
  echo "$cfg max: ${max_rate} orders/s end-to-end over ${max_n} orders (p50=${max50}ms p99=${max99}ms, ${max_rej} rejected)" >&2
  echo "$cfg at half rate ($((half * CONC)) req/s offered): p50=${half50}ms p99=${half99}ms over ${half_n} orders, ${half_rej} rejected" >&2
  echo "$cfg burst 10x ($((burst * CONC)) req/s offered for ${SECS}s, 10x a steady $((burst * CONC / 10))/s): ${b_n} orders, ${b_rej} rejected, every one terminal, backlog drained ${b_drain}ms after the burst (p99=${b99}ms)" >&2
  echo "orders: $cfg $max_rate orders/s p50=${half50}ms p99=${half99}ms"
}

mesh_ratio() { # with, without → the ratio line
  awk -v a="$(echo "$1" | awk '{print $3}')" -v b="$(echo "$2" | awk '{print $3}')" \
    'BEGIN {if (b > 0) printf "orders: mesh/direct=%.2f (orders/s through the sidecars over direct calls, SQLite + embedded broker)\n", a / b}'
}
if [ -n "${MESH_ONLY:-}" ]; then
  echo "shopmesh orders with and without the mesh ($(nproc) cores, $(date -u +%F)); ${SECS}s of load per run, $CONC connections"
  direct=$(bench_config sqlite)
  meshed=$(bench_config sqlite+mesh --mesh)
  echo "$direct"
  echo "$meshed"
  mesh_ratio "$meshed" "$direct"
  exit 0
fi

psql -q "$PG_ADMIN" -c "DROP DATABASE IF EXISTS $PG_DB WITH (FORCE)" -c "CREATE DATABASE $PG_DB"
pgbench -q -i -s 10 "postgres://postgres@127.0.0.1:5432/$PG_DB" >/dev/null 2>&1
PGB=$(pgbench -N -c 8 -j 2 -T "$SECS" "postgres://postgres@127.0.0.1:5432/$PG_DB" 2>/dev/null | awk '/^tps/ {printf "%.0f", $3}')

echo "shopmesh order saga benchmark ($(nproc) cores, $(date -u +%F)); ${SECS}s of load per run, $CONC connections"
L1="orders: sqlite skipped (PG_ONLY set)"
[ -n "${PG_ONLY:-}${BROKERS_ONLY:-}" ] || L1=$(bench_config sqlite)
L2="orders: postgres skipped (SQLITE_ONLY or BROKERS_ONLY set)"
[ -n "${SQLITE_ONLY:-}${BROKERS_ONLY:-}" ] || L2=$(bench_config postgres --database "postgres://postgres@127.0.0.1:5432/$PG_DB")
L3="orders: pg+rabbitmq skipped"; L4="orders: pg+nats skipped"; L5="orders: pg+kafka skipped"
R1=; R2=; R3=
if [ -z "${SQLITE_ONLY:-}${NO_BROKERS:-}" ]; then
  L3="orders: pg+rabbitmq skipped (NO_RABBITMQ set)"
  L4="orders: pg+nats skipped (NO_NATS set)"
  L5="orders: pg+kafka skipped (NO_KAFKA set)"
  # A fresh namespace per run; its queues and consumers expire an hour after the run.
  NS="bench$(date +%s)"
  q() { case "$1" in *\?*) echo '&' ;; *) echo '?' ;; esac; }
  reset_pg() {
    psql -q "$PG_ADMIN" -c "DROP DATABASE IF EXISTS $PG_DB WITH (FORCE)" -c "CREATE DATABASE $PG_DB"
  }
  [ -n "${NO_RABBITMQ:-}" ] || reset_pg
  [ -n "${NO_RABBITMQ:-}" ] || L3=$(bench_config pg+rabbitmq --database "postgres://postgres@127.0.0.1:5432/$PG_DB" \
    --broker "$AMQP_URL$(q "$AMQP_URL")namespace=${NS}r&expires=3600")
  [ -n "${NO_NATS:-}" ] || reset_pg
  [ -n "${NO_NATS:-}" ] || L4=$(bench_config pg+nats --database "postgres://postgres@127.0.0.1:5432/$PG_DB" \
    --broker "$NATS_URL$(q "$NATS_URL")namespace=${NS}n&expires=3600")
  [ -n "${NO_KAFKA:-}" ] || reset_pg
  [ -n "${NO_KAFKA:-}" ] || L5=$(bench_config pg+kafka --database "postgres://postgres@127.0.0.1:5432/$PG_DB" \
    --broker "$KAFKA_URL$(q "$KAFKA_URL")namespace=${NS}k")
  [ -n "${NO_RABBITMQ:-}" ] || R1=$("$BIN" bench broker --broker "$AMQP_URL" --messages 20000)
  [ -n "${NO_NATS:-}" ] || R2=$("$BIN" bench broker --broker "$NATS_URL" --messages 20000)
  [ -n "${NO_KAFKA:-}" ] || R3=$("$BIN" bench broker --broker "$KAFKA_URL" --messages 20000)
  # Leave a local RabbitMQ as found: the queues of these runs (the saga's, `bench broker`'s)
  # go now rather than when they expire, since many idle quorum queues slow RabbitMQ down.
  if command -v rabbitmqctl >/dev/null; then
    rabbitmqctl list_queues -q name </dev/null 2>/dev/null | grep -E "^bench[0-9]+r?\." | while read -r qn; do
      rabbitmqctl delete_queue "$qn" </dev/null >/dev/null 2>&1 || true
    done
  fi
fi
echo "pgbench -N on the same PostgreSQL: ${PGB} TPS (the database's ceiling here)"
echo "$L1"
echo "$L2"
echo "$L3"
echo "$L4"
echo "$L5"
if [ -n "${MESH:-}" ]; then
  L6=$(bench_config sqlite+mesh --mesh)
  echo "$L6"
  mesh_ratio "$L6" "$L1"
fi
[ -z "$R1" ] || echo "$R1"
[ -z "$R2" ] || echo "$R2"
[ -z "$R3" ] || echo "$R3"
