#!/usr/bin/env bash
# keyward's RSS while keys are in use: starts the release keyward (memory limits) and an nginx
# upstream, creates NKEYS keys (quota 10^9 per minute, so every key keeps a limiter log),
# drives ROUNDS bursts of SECS seconds of `wrk -t2 -c64` with keys drawn at random, and
# prints req/s and VmRSS after each burst. Windows fill over the first minute.
# Usage: bench/rss-under-load.sh [auth|proxy]   (NKEYS=10000 ROUNDS=5 SECS=15; BENCH_BIN=<path>
#        measures a saved build). Installs wrk and nginx when missing.
set -euo pipefail
cd "$(dirname "$0")/.."
MODE=${1:-auth}
NKEYS=${NKEYS:-10000}
ROUNDS=${ROUNDS:-5}
SECS=${SECS:-15}
. bench/common.sh
install_missing wrk:wrk nginx:nginx-light
keyward_binary  # BENCH_BIN=<path> measures a saved build instead (an A/B)
bench_workspace rss
start_upstream
start_keyward_with_keys "$NKEYS"
url=http://127.0.0.1:19001/bench/x
[ "$MODE" = auth ] && url=http://127.0.0.1:19001/v1/auth
rss() { awk '/^VmRSS/ {printf "%.1f MB", $2 / 1024}' /proc/"$kw"/status; }
echo "$NKEYS keys created, before load: $(rss)"
for round in $(seq 1 "$ROUNDS"); do
  rps=$(KEYS_FILE="$RUN/keys.txt" EXTRA_HEADER="X-Forwarded-Uri: /bench/x" \
    wrk -t2 -c64 -d"${SECS}s" -s bench/keys.lua "$url" | awk '/^Requests\/sec/ {print $2}')
  echo "after $((round * SECS)) s of $MODE load ($rps req/s): $(rss)"
done
