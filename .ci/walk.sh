#!/usr/bin/env bash
# The README's walk through the shop, run as a newcomer would run it: the sh block(s) of
# README.md between `<!-- walk` and `<!-- /walk -->` are run as they are written (bash -euo
# pipefail: any failing command fails the run) against `shopmesh up` on a fresh data dir and
# the README's ports (8080 and 9901, which must be free), then the outcomes the walk promises
# are checked. The shop is stopped and its data dir removed on every exit path.
#
#   .ci/walk.sh [path/to/shopmesh]        (default: target/debug/shopmesh)
set -euo pipefail
BIN=${1:-target/debug/shopmesh}
case "$BIN" in /*) ;; *) [ -n "${1:-}" ] && BIN="$PWD/$BIN" ;; esac
cd "$(dirname "$0")/.."

GATEWAY=127.0.0.1:8080
ADMIN=127.0.0.1:9901
START_TIMEOUT=60        # seconds for the shop to answer through the gateway
WALK_TIMEOUT=120        # seconds for the whole walk

fail() { printf 'walk: FAILED: %s\n' "$*" >&2; exit 1; }
[ -x "$BIN" ] || fail "no shopmesh binary at $BIN (build it, or pass its path)"

WORK=$(mktemp -d "${TMPDIR:-/tmp}/shopmesh-walk.XXXXXX")
SHOP_PID=
cleanup() {
  local rc=$?
  if [ -n "$SHOP_PID" ] && kill -0 "$SHOP_PID" 2>/dev/null; then
    kill -TERM "$SHOP_PID" 2>/dev/null || true
    for _ in $(seq 100); do kill -0 "$SHOP_PID" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$SHOP_PID" 2>/dev/null || true
    wait "$SHOP_PID" 2>/dev/null || true
  fi
  if [ "$rc" -ne 0 ] && [ -s "$WORK/shop.log" ]; then
    echo "--- the shop's log (last 40 lines) ---" >&2
    tail -n 40 "$WORK/shop.log" >&2
  fi
  rm -rf "$WORK"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# The walk's own text, from the README (every fenced block between the markers).
awk '/^<!-- walk/ { inside = 1; next }
     /^<!-- \/walk -->/ { inside = 0; next }
     inside && /^```/ { fenced = !fenced; next }
     inside && fenced' README.md > "$WORK/walk.sh"
[ -s "$WORK/walk.sh" ] || fail "README.md has no <!-- walk --> … <!-- /walk --> block"

# The README's ports must be free: a shop already there would answer in our place.
for addr in "$GATEWAY" "$ADMIN"; do
  if (exec 3<>"/dev/tcp/${addr%:*}/${addr#*:}") 2>/dev/null; then
    fail "$addr is already taken (stop whatever listens there: ss -ltnp)"
  fi
done

# A fresh shop with a small catalog, whatever SHOPMESH_* the environment holds.
while read -r var; do unset "$var"; done < <(compgen -e | grep '^SHOPMESH_' || true)
export NO_PROXY=127.0.0.1,localhost no_proxy=127.0.0.1,localhost
started=$(date +%s%N)
NO_COLOR=1 "$BIN" up --data-dir "$WORK/data" --seed-products 100 --port "${GATEWAY#*:}" \
  --admin-port "${ADMIN#*:}" > "$WORK/shop.log" 2>&1 &
SHOP_PID=$!
ready= deadline=$((SECONDS + START_TIMEOUT))
while [ "$SECONDS" -lt "$deadline" ]; do
  kill -0 "$SHOP_PID" 2>/dev/null || fail "shopmesh up exited at start-up"
  code=$(curl -s -o /dev/null -w '%{http_code}' "http://$GATEWAY/api/products?limit=1" || true)
  [ "$code" = 200 ] && { ready=1; break; }
  sleep 0.1
done
[ -n "$ready" ] || fail "the gateway did not answer 200 within ${START_TIMEOUT}s"
up_ms=$(( ($(date +%s%N) - started) / 1000000 ))

# The walk, as written; its variables are handed back on fd 3 for the checks below. For a
# readable log, each command is traced before its output, and curl ends what it prints with
# a newline (a .curlrc of the walk's own, which also keeps the CI user's out).
mkdir "$WORK/curl"
echo 'write-out = "\n"' > "$WORK/curl/.curlrc"
{
  printf '%s\n' "NL=\$'\\n'; PS4='\${NL:0:\$((BASH_SUBSHELL == 0))}+ '; set -x"
  cat "$WORK/walk.sh"
  printf '%s\n' 'set +x' 'printf "P=%s\nT=%s\nO=%s\n" "$P" "$T" "$O" >&3'
} > "$WORK/run.sh"
echo "==> the README's walk (shop up in ${up_ms} ms)"
walk_started=$(date +%s%N)
rc=0
CURL_HOME="$WORK/curl" timeout "$WALK_TIMEOUT" bash -euo pipefail "$WORK/run.sh" 3> "$WORK/vars" 2>&1 \
  | tee "$WORK/out" || rc=$?
echo
[ "$rc" -ne 124 ] || fail "the walk did not finish within ${WALK_TIMEOUT}s"
[ "$rc" -eq 0 ] || fail "the walk stopped with status $rc (its last command is above)"
walk_ms=$(( ($(date +%s%N) - walk_started) / 1000000 ))
kill -0 "$SHOP_PID" 2>/dev/null || fail "the shop died during the walk"

# What the walk promises.
var() { sed -n "s/^$1=//p" "$WORK/vars"; }
P=$(var P) T=$(var T) O=$(var O)
G="http://$GATEWAY"
uuid='^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$'
check() { printf 'walk: ok: %s\n' "$1"; }

grep -Eq "$uuid" <<<"$P" || fail "P is not a product id: '$P'"
check "P is a product id ($P)"

page=$(curl -sS -i "$G/api/products/$P")
grep -q '^HTTP/[0-9.]* 200' <<<"$page" || fail "the product page did not answer 200"
grep -qi '^x-aggregate-complete: true' <<<"$page" || fail "the product page is not complete"
for part in '"product":{' '"inventory":{' '"price":{' '"promotions":\['; do
  grep -q "$part" <<<"$page" || fail "the product page lacks ${part%%:*}"
done
grep -q "\"id\":\"$P\"" <<<"$page" || fail "the product page is not product $P's"
check "the product page answers 200 with product, inventory, price and promotions"

grep -Eq '^eyJ[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+$' <<<"$T" \
  || fail "T is not a JWT: '${T:0:80}'"
check "T is a JWT"

grep -Eq "$uuid" <<<"$O" || fail "O is not an order id: '$O'"
order=$(curl -fsS "$G/api/orders/$O" -H "authorization: Bearer $T")
grep -q '"status":"CONFIRMED"' <<<"$order" || fail "order $O is not CONFIRMED: $order"
grep -q "\"product_id\":\"$P\"" <<<"$order" || fail "order $O is not for product $P"
check "order $O is CONFIRMED"

# The error examples' answers, as the walk printed them: a status line, then problem+json.
for status in 401 404; do
  head=$(sed -n "/^HTTP\/[0-9.]* $status /,/^\r\?$/p" "$WORK/out")
  grep -qi '^content-type: application/problem+json' <<<"$head" \
    || fail "the walk printed no $status answer as problem+json"
done
check "the error examples answer 401 and 404 as problem+json"

grep -q '^gateway_requests_total{' "$WORK/out" || fail "the walk printed no gateway metrics"
check "the metrics count the walk's requests"

echo "walk: passed (shop up in ${up_ms} ms, walk ${walk_ms} ms)"
