#!/usr/bin/env bash
# The aggregation pattern, measured: the product page as one composite call through the
# shopmesh gateway against the same four calls made one after another by a client.
#
# Four stand-in backends (`shopmesh bench backend`: product, inventory, price, promotions)
# answer after an injected delay (20 ms by default); four more answer at once. The gateway
# (`shopmesh gateway`, standalone, 2 worker threads) serves:
#   /slow/page/{id}  composite over the delayed backends (four independent parts)
#   /slow/api/...    plain proxied routes to the same backends (what a client would call)
#   /fast/page/{id}  composite over the instant backends, no cache
#   /fast/cached/{id} the same with every part cached (1 s TTL)
#   /fast/api/products/{id} a plain proxied route to one instant backend
#
# 1. Latency (curl, one keep-alive connection, sequential): the composite page vs four
#    sequential calls per page.
# 2. Throughput (wrk -t1 -c64) of the composite page vs the plain proxied route with
#    instant backends, and the gateway's CPU time per request (utime + stime of the gateway
#    process in /proc/<pid>/stat, read before and after each run). The `pages:` line gives
#    composite pages/s over the pages/s a client making the four plain calls itself would
#    get (plain req/s / 4), and the gateway's CPU per composite page over its CPU per plain
#    proxied request.
#
# Needs: curl, wrk (Debian: apt-get install wrk curl). Uses ports 18280-18297.
# Usage: bench/aggregation.sh [pages (default 300)] [wrk seconds (default 10)] [delay ms (default 20)]
set -euo pipefail
cd "$(dirname "$0")/.."
PAGES=${1:-300}
DURATION=${2:-10}
DELAY=${3:-20}
for tool in wrk curl awk; do
  command -v $tool >/dev/null || { echo "missing: $tool (apt-get install wrk curl)"; exit 1; }
done

# SHOPMESH_BIN: a release binary already built (the script then builds nothing). The binary
# is copied first, so a rebuild during the run changes nothing.
[ -n "${SHOPMESH_BIN:-}" ] || { cargo build --release -q -p shopmesh; SHOPMESH_BIN=$PWD/target/release/shopmesh; }
WORK=$(mktemp -d)
cp "$SHOPMESH_BIN" "$WORK/shopmesh"
BIN=$WORK/shopmesh
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  rm -rf "$WORK"
}
trap cleanup EXIT

GW=127.0.0.1:18280
"$BIN" bench backend --delay-ms "$DELAY" \
  --listen 127.0.0.1:18290 --listen 127.0.0.1:18291 --listen 127.0.0.1:18292 --listen 127.0.0.1:18293 \
  >"$WORK/slow.log" 2>&1 &
PIDS+=($!)
"$BIN" bench backend \
  --listen 127.0.0.1:18294 --listen 127.0.0.1:18295 --listen 127.0.0.1:18296 --listen 127.0.0.1:18297 \
  >"$WORK/fast.log" 2>&1 &
FASTPID=$!
PIDS+=($FASTPID)

parts() { # $1: cluster prefix, $2: extra part settings
  cat <<EOF
        - { name: product, cluster: $1-catalog, path: "/api/products/{path.id}", timeout_ms: 1000 $2 }
        - { name: inventory, cluster: $1-inventory, path: "/api/inventory/{path.id}", required: false, timeout_ms: 1000 $2 }
        - { name: price, cluster: $1-pricing, path: "/api/prices/{path.id}", required: false, timeout_ms: 1000 $2 }
        - { name: promotions, cluster: $1-promotions, path: /api/promotions, query: { product_id: "{path.id}" }, extract: items, required: false, timeout_ms: 1000 $2 }
EOF
}
{
  cat <<EOF
listen: $GW
workers: 2
admin: { listen: null }
clusters:
  - { name: slow-catalog, endpoints: ["http://127.0.0.1:18290"] }
  - { name: slow-inventory, endpoints: ["http://127.0.0.1:18291"] }
  - { name: slow-pricing, endpoints: ["http://127.0.0.1:18292"] }
  - { name: slow-promotions, endpoints: ["http://127.0.0.1:18293"] }
  - { name: fast-catalog, endpoints: ["http://127.0.0.1:18294"] }
  - { name: fast-inventory, endpoints: ["http://127.0.0.1:18295"] }
  - { name: fast-pricing, endpoints: ["http://127.0.0.1:18296"] }
  - { name: fast-promotions, endpoints: ["http://127.0.0.1:18297"] }
routes:
  - name: slow-page
    match: { template: "/slow/page/{id}" }
    aggregate:
      parts:
$(parts slow "")
  - name: fast-page
    match: { template: "/fast/page/{id}" }
    aggregate:
      parts:
$(parts fast "")
  - name: fast-cached
    match: { template: "/fast/cached/{id}" }
    aggregate:
      parts:
$(parts fast ", cache: { ttl_ms: 1000 }")
  - { name: slow-products, match: { prefix: /slow/api/products }, cluster: slow-catalog, rewrite: { strip_prefix: /slow } }
  - { name: slow-inventory, match: { prefix: /slow/api/inventory }, cluster: slow-inventory, rewrite: { strip_prefix: /slow } }
  - { name: slow-prices, match: { prefix: /slow/api/prices }, cluster: slow-pricing, rewrite: { strip_prefix: /slow } }
  - { name: slow-promotions, match: { prefix: /slow/api/promotions }, cluster: slow-promotions, rewrite: { strip_prefix: /slow } }
  - { name: fast-products, match: { prefix: /fast/api/products }, cluster: fast-catalog, rewrite: { strip_prefix: /fast } }
EOF
} >"$WORK/gateway.yaml"
"$BIN" gateway --config "$WORK/gateway.yaml" >"$WORK/gateway.log" 2>&1 &
GWPID=$!
PIDS+=($GWPID)
for _ in $(seq 1 200); do
  curl -fs -o /dev/null "http://$GW/fast/page/p1" && curl -fs -o /dev/null "http://$GW/slow/page/p1" && break
  sleep 0.05
done
curl -fs -D - -o "$WORK/page.json" "http://$GW/slow/page/p1" | grep -i '^x-aggregate-complete: true' >/dev/null \
  || { echo "the composite page is not complete"; cat "$WORK/gateway.log"; exit 1; }

# --- 1. Latency -----------------------------------------------------------------------
pct() { # $1: percentile (0-100); numbers on stdin, in seconds → milliseconds
  sort -n | awk -v p="$1" '{a[NR]=$1} END {i=int((NR*p+99)/100); if (i<1) i=1; printf "%.2f", a[i]*1000}'
}
urls_page=()
urls_seq=()
for i in $(seq 1 "$PAGES"); do
  id="p$((i % 50))"
  urls_page+=("http://$GW/slow/page/$id")
  urls_seq+=("http://$GW/slow/api/products/$id" "http://$GW/slow/api/inventory/$id"
             "http://$GW/slow/api/prices/$id" "http://$GW/slow/api/promotions?product_id=$id")
done
# Warm the connection and the gateway's upstream pools.
# (Bodies go to stdout and are dropped; the timings go to stderr.)
curl -fs "${urls_page[@]:0:20}" "${urls_seq[@]:0:20}" >/dev/null
curl -fs -w '%{stderr}%{time_total}\n' "${urls_page[@]}" 2>"$WORK/page.times" >/dev/null
curl -fs -w '%{stderr}%{time_total}\n' "${urls_seq[@]}" 2>&1 >/dev/null \
  | awk '{s+=$1} NR%4==0 {print s; s=0}' >"$WORK/seq.times"
[ "$(wc -l <"$WORK/page.times")" -eq "$PAGES" ] && [ "$(wc -l <"$WORK/seq.times")" -eq "$PAGES" ] \
  || { echo "some requests failed"; exit 1; }
# The floor: one backend called directly.
for i in $(seq 1 "$PAGES"); do echo "http://127.0.0.1:18290/api/products/p$i"; done >"$WORK/direct.urls"
curl -fs -w '%{stderr}%{time_total}\n' $(cat "$WORK/direct.urls") 2>"$WORK/direct.times" >/dev/null
D50=$(pct 50 <"$WORK/direct.times"); D99=$(pct 99 <"$WORK/direct.times")
P50=$(pct 50 <"$WORK/page.times"); P99=$(pct 99 <"$WORK/page.times")
S50=$(pct 50 <"$WORK/seq.times"); S99=$(pct 99 <"$WORK/seq.times")
SPEEDUP=$(awk -v a="$S50" -v b="$P50" 'BEGIN {printf "%.2f", a/b}')
echo "product page, four backends each answering after ${DELAY} ms, ${PAGES} pages, one client:"
printf "  %-40s p50 %8s ms   p99 %8s ms\n" "one backend, called directly" "$D50" "$D99"
printf "  %-40s p50 %8s ms   p99 %8s ms   1 client round trip per page\n" "composite (GET /page/{id})" "$P50" "$P99"
printf "  %-40s p50 %8s ms   p99 %8s ms   4 client round trips per page\n" "four sequential calls by the client" "$S50" "$S99"
echo "  speedup ${SPEEDUP}x, 3 client round trips saved per page"

# --- 2. Throughput and CPU ------------------------------------------------------------
ticks_of() { awk '{print $14 + $15}' "/proc/$1/stat"; }
TIMEFORMAT='%U %S'   # bash's `time`: the load generator's own CPU
TICK=$(getconf CLK_TCK)
# Every request asks for a random product id (of 100,000), so that identical concurrent
# part calls (which the gateway coalesces into one) are rare: this measures aggregation,
# not coalescing. The last run asks for 1,000 popular products with caching on.
cat >"$WORK/ids.lua" <<'EOF'
local prefix = os.getenv("PREFIX")
local ids = tonumber(os.getenv("IDS"))
request = function()
  return wrk.format("GET", prefix .. math.random(1, ids))
end
EOF
run_wrk() { # $1: label, $2: path prefix, $3: how many ids (one is appended at random) → prints a line, sets RPS, GW_US, GW_CPU_S, REQS, BE_US, WRK_US
  local before after reqs be_before be_after wrk_cpu
  before=$(ticks_of "$GWPID")
  be_before=$(ticks_of "$FASTPID")
  { time PREFIX=$2 IDS=$3 wrk -t1 -c64 -d"${DURATION}s" --latency -s "$WORK/ids.lua" "http://$GW" >"$WORK/wrk.out"; } 2>"$WORK/wrk.time"
  after=$(ticks_of "$GWPID")
  be_after=$(ticks_of "$FASTPID")
  wrk_cpu=$(awk '{print $1 + $2}' "$WORK/wrk.time")
  RPS=$(awk '/Requests\/sec/ {printf "%.0f", $2}' "$WORK/wrk.out")
  reqs=$(awk '/requests in/ {print $1}' "$WORK/wrk.out")
  local p50 p99 cpu non2xx
  p50=$(awk '$1=="50%" {print $2}' "$WORK/wrk.out")
  p99=$(awk '$1=="99%" {print $2}' "$WORK/wrk.out")
  non2xx=$(awk '/Non-2xx/ {print $4}' "$WORK/wrk.out")
  cpu=$(awk -v t=$((after - before)) -v hz="$TICK" -v n="$reqs" 'BEGIN {printf "%.0f", t / hz / n * 1e6}')
  GW_US=$cpu
  GW_CPU_S=$(awk -v t=$((after - before)) -v hz="$TICK" 'BEGIN {printf "%.2f", t / hz}')
  REQS=$reqs
  BE_US=$(awk -v t=$((be_after - be_before)) -v hz="$TICK" -v n="$reqs" 'BEGIN {printf "%.0f", t / hz / n * 1e6}')
  WRK_US=$(awk -v t="$wrk_cpu" -v n="$reqs" 'BEGIN {printf "%.0f", t / n * 1e6}')
  printf "  %-40s %8s req/s   p50 %8s   p99 %8s   CPU µs/request: gateway %4s, backends %4s, wrk %3s%s\n" \
    "$1" "$RPS" "$p50" "$p99" "$cpu" "$BE_US" "$WRK_US" "${non2xx:+   non-2xx: $non2xx}"
}
echo "throughput, instant backends, wrk -t1 -c64 for ${DURATION}s each, a random product id (of 100,000 unless said) per request (same run):"
run_wrk "plain proxied route (1 backend call)" /fast/api/products/p 100000
PLAIN=$RPS; P_GW=$GW_US; P_BE=$BE_US; P_WRK=$WRK_US; P_CPU=$GW_CPU_S; P_REQS=$REQS
run_wrk "composite page (4 backend calls)" /fast/page/p 100000
AGG=$RPS; A_BE=$BE_US; A_WRK=$WRK_US; A_CPU=$GW_CPU_S; A_REQS=$REQS
run_wrk "composite, cached parts (1 s), 100k ids" /fast/cached/p 100000
run_wrk "composite, cached parts (1 s), 1k hot ids" /fast/cached/p 1000
RATIO=$(awk -v a="$AGG" -v b="$PLAIN" 'BEGIN {printf "%.2f", a/b}')
echo "  composite/plain throughput ratio ${RATIO}"
# The ceiling on that ratio when everything shares the machine: even if the composite cost
# the gateway no more than one proxied request does, each page still costs its four backend
# calls and the load generator's share. Machine CPU per request decides the rate.
CEIL=$(awk -v g="$P_GW" -v pb="$P_BE" -v pw="$P_WRK" -v ab="$A_BE" -v aw="$A_WRK" \
  'BEGIN {printf "%.2f", (g + pb + pw) / (g + ab + aw)}')
echo "  ceiling with a free composite (gateway cost of one proxied request, the backends' and wrk's measured cost per page): ratio ${CEIL}"
PAGES_RATIO=$(awk -v a="$AGG" -v b="$PLAIN" 'BEGIN {printf "%.2f", a / (b / 4)}')
CPU_RATIO=$(awk -v ac="$A_CPU" -v an="$A_REQS" -v pc="$P_CPU" -v pn="$P_REQS" 'BEGIN {printf "%.2f", (ac / an) / (pc / pn)}')
echo "  composite: ${AGG} pages/s; four plain calls per page: $((PLAIN / 4)) pages/s; gateway CPU ${A_CPU} s over ${A_REQS} pages, ${P_CPU} s over ${P_REQS} plain requests"
echo "pages: composite/plain-calls=${PAGES_RATIO} cpu-per-page/plain=${CPU_RATIO}"
echo "aggregation: p50=${P50}ms sequential_p50=${S50}ms speedup=${SPEEDUP} throughput_ratio=${RATIO}"
