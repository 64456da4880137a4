#!/usr/bin/env bash
# Instructions per proxied request, counted by callgrind: the A/B signal that this machine's
# wall-clock noise (±15% between rounds) cannot give. Starts an nginx `return 200` upstream
# and the release keyward under `valgrind --tool=callgrind`, creates NKEYS keys, warms up
# (every key cached), zeroes the counters, drives WARM/MEASURE seconds of `wrk -t1 -c8`,
# dumps, and divides by the requests keyward counted in /metrics. Prints the total and the
# heaviest keyward functions (inclusive). Under valgrind SHA-256 runs its portable code and
# Ed25519 its serial backend, so both weigh more than on the CPU; compare builds, not
# absolute figures.
# Usage: bench/callgrind.sh   (NKEYS=500 WARM=20 MEASURE=20 URL_PATH=/bench/x to change;
#        URL_PATH=/v1/auth counts forward-auth; LIMITS=redis uses the Redis backend, on a
#        redis-server of its own; FLOOR=1 counts the proxy floor, examples/proxy_floor.rs,
#        instead: what keyward's proxy counts above it is its domain work; NGINX=keyauth or
#        NGINX=fulljob counts nginx doing scenario c's or k's job of bench/run.sh, one worker
#        under callgrind, with a keyward beside it, not under valgrind, for the keys and the
#        identity maps; CACHE_SIM=1 also simulates the caches and branch predictors and
#        prints instruction-cache misses and mispredicted branches per request: what a larger
#        code footprint costs, which instruction counts do not show). Installs valgrind, wrk,
#        nginx and redis-server when missing.
set -euo pipefail
cd "$(dirname "$0")/.."
NKEYS=${NKEYS:-500}
WARM=${WARM:-20}
MEASURE=${MEASURE:-20}
URL_PATH=${URL_PATH:-/bench/x}
LIMITS=${LIMITS:-memory}
FLOOR=${FLOOR:-}
NGINX=${NGINX:-}
CACHE_SIM=${CACHE_SIM:-}
[ -z "$CACHE_SIM" ] || export VALGRIND_OPTS="${VALGRIND_OPTS:-} --cache-sim=yes --branch-sim=yes"
case "$NGINX" in ""|keyauth|fulljob) ;; *) echo "NGINX is keyauth or fulljob, not '$NGINX'" >&2; exit 2;; esac

. bench/common.sh
install_missing valgrind:valgrind wrk:wrk nginx:nginx-light
[ "$LIMITS" = redis ] && install_missing redis-server:redis-server

if [ -n "$FLOOR" ]; then
  cargo build --release -p keyward-server --example proxy_floor >&2
else
  keyward_binary  # BENCH_BIN=<path> measures a saved build instead (an A/B)
fi
RUN=$(mktemp -d /tmp/keyward-callgrind.XXXXXX)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; }
trap cleanup EXIT
start_upstream
mkdir -p "$RUN/kw"
redis_url=""
if [ "$LIMITS" = redis ]; then
  redis-server --port 19015 --bind 127.0.0.1 --save "" --appendonly no > /dev/null & pids+=($!)
  wait_port 19015
  redis_url=redis://127.0.0.1:19015/
fi
if [ -n "$NGINX" ]; then
  # keyward (natively) makes the keys, and says what identity each has for k's maps.
  keyward_config 19021 19031 > "$RUN/kw/keyward.toml"
  (cd "$RUN/kw" && exec "$BIN" serve > out.log 2> err.log) & pids+=($!)
  wait_port 19021
  python3 bench/make_keys.py 127.0.0.1:19021 "$(grep -E '^kw_' "$RUN/kw/err.log")" "$NKEYS" "$RUN/keys.txt"
  gateway_maps 127.0.0.1:19021
  # One worker, no master: the process valgrind runs is the one that serves.
  sed -e "s#__RUN__#$RUN#g" -e 's#^worker_processes .*#worker_processes 1;\nmaster_process off;#' \
      -e 's#listen 127.0.0.1:[0-9]*#listen 127.0.0.1:19001#' "bench/nginx-$NGINX.conf" > "$RUN/nginx.conf"
  valgrind --tool=callgrind --callgrind-out-file="$RUN/callgrind.out" \
    nginx -c "$RUN/nginx.conf" -p "$RUN" > "$RUN/nginx.log" 2>&1 & pids+=($!)
  for _ in $(seq 1 600); do (echo >/dev/tcp/127.0.0.1/19001) 2>/dev/null && break; sleep 0.1; done
elif [ -n "$FLOOR" ]; then
  # The floor forwards anything that carries a credential: random ones of keyward's length.
  python3 -c 'import secrets, sys
for _ in range(int(sys.argv[1])): print("kw_live_" + secrets.token_urlsafe(30))' "$NKEYS" > "$RUN/keys.txt"
  FLOOR_BIN=$PWD/target/release/examples/proxy_floor
  (cd "$RUN/kw" && exec valgrind --tool=callgrind --callgrind-out-file="$RUN/callgrind.out" \
    "$FLOOR_BIN" 19001 127.0.0.1:19000 > out.log 2> err.log) & pids+=($!)
  for _ in $(seq 1 600); do (echo >/dev/tcp/127.0.0.1/19001) 2>/dev/null && break; sleep 0.1; done
else
  keyward_config 19001 19011 "$redis_url" > "$RUN/kw/keyward.toml"
  (cd "$RUN/kw" && exec valgrind --tool=callgrind --callgrind-out-file="$RUN/callgrind.out" \
    "$BIN" serve > out.log 2> err.log) & pids+=($!)
  for _ in $(seq 1 600); do (echo >/dev/tcp/127.0.0.1/19001) 2>/dev/null && break; sleep 0.1; done
  ADMIN=$(grep -E '^kw_' "$RUN/kw/err.log")
  python3 bench/make_keys.py 127.0.0.1:19001 "$ADMIN" "$NKEYS" "$RUN/keys.txt"
fi

extra=""
[ "$URL_PATH" = /v1/auth ] && extra="X-Forwarded-Uri: /bench/x"
load() { KEYS_FILE="$RUN/keys.txt" EXTRA_HEADER="$extra" wrk -t1 -c8 -d"$1"s -s bench/keys.lua "http://127.0.0.1:19001$URL_PATH" > "$RUN/wrk.txt"; }
served() { curl -s 127.0.0.1:19011/metrics | awk '/^keyward_requests_total\{/ && /status="200"/ {s += $2} END {print s + 0}'; }
load "$WARM"
callgrind_control -z > /dev/null
[ -n "$FLOOR$NGINX" ] || before=$(served)
load "$MEASURE"
if [ -n "$FLOOR$NGINX" ]; then
  # The floor and nginx have no metrics: wrk's count of the window, all of them 200s.
  ! grep -q Non-2xx "$RUN/wrk.txt" || { echo "non-2xx answers in the window" >&2; exit 1; }
  requests=$(awk '/ requests in / {print $1}' "$RUN/wrk.txt")
else
  requests=$(($(served) - before))
fi
callgrind_control -d > /dev/null
sleep 1
dump=$(ls -t "$RUN"/callgrind.out.* | head -1)
what="$LIMITS limits"; [ -n "$FLOOR" ] && what="the proxy floor"; [ -n "$NGINX" ] && what="nginx-$NGINX"
echo "$requests requests with status 200 in ${MEASURE}s ($URL_PATH, $NKEYS keys, $what)"
callgrind_annotate --show=Ir --inclusive=yes --threshold=100 "$dump" 2>/dev/null |
  grep -v '=>' | grep -E '^ *[0-9,]+ ' | grep -E 'PROGRAM TOTALS|keyward_(server|core)::|proxy_floor::|ngx_' |
  awk -v n="$requests" '{c = $1; gsub(",", "", c); $1 = ""; $2 = ""; sub(/^ +/, ""); sub(/ \[.*$/, ""); sub(/^[^:]*:/, ""); if (!seen[$0]++) printf "%8.0f  %s\n", c / n, $0}' |
  sed -n "1,${TOP:-25}p"  # reads it all: head would break the pipe
echo "instructions per request, inclusive; callgrind data: $dump"
if [ -n "$CACHE_SIM" ]; then
  callgrind_annotate --show=I1mr,Bcm,Bim "$dump" 2>/dev/null | grep 'PROGRAM TOTALS' | tr -d , |
    awk -v n="$requests" '{printf "per request: %.0f instruction-cache (I1) misses, %.0f mispredicted conditional and %.0f indirect branches\n", $1 / n, $3 / n, $5 / n}'
fi
