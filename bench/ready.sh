#!/usr/bin/env bash
# Time from `keyward serve` to a 200 from /readyz with N keys in the SQLite store (default
# 1,000,000), and the first authenticated request after that. Keys are written straight into
# the store by bench/seed_store.py (copies of the bootstrap key with fresh ids and hashes).
# Usage: bench/ready.sh   (NKEYS=1000000 RUNS=3; BENCH_BIN=<path> measures a saved build)
set -euo pipefail
cd "$(dirname "$0")/.."
NKEYS=${NKEYS:-1000000}
RUNS=${RUNS:-3}
. bench/common.sh
keyward_binary
RUN=$(mktemp -d /tmp/keyward-ready.XXXXXX)
pid=""
cleanup() { [ -n "$pid" ] && kill "$pid" 2>/dev/null; wait 2>/dev/null || true; }
trap cleanup EXIT
cat > "$RUN/keyward.toml" <<CFG
[server]
listen = "127.0.0.1:19021"
internal_listen = "127.0.0.1:19022"
data_dir = "$RUN/data"
[store]
url = "sqlite://$RUN/keyward.db"
[log]
level = "warn"
CFG
now_ms() { date +%s%3N; }
wait_ready() { # at most 60 s: a node that does not start must not hang the benchmark
  local deadline=$(($(now_ms) + 60000))
  while [ "$(curl -s -o /dev/null -w '%{http_code}' http://127.0.0.1:19022/readyz)" != 200 ]; do
    [ "$(now_ms)" -lt "$deadline" ] || { echo "keyward was not ready after 60 s:" >&2; cat "$RUN/err.log" >&2; exit 1; }
    sleep 0.002
  done
}

(cd "$RUN" && exec "$BIN" serve > out.log 2> err.log) & pid=$!
wait_ready
ADMIN=$(grep -E '^kw_' "$RUN/err.log")
kill "$pid"; wait "$pid" 2>/dev/null || true; pid=""
python3 bench/seed_store.py "$RUN/keyward.db" "$NKEYS"

for i in $(seq 1 "$RUNS"); do
  t0=$(now_ms)
  (cd "$RUN" && exec "$BIN" serve > out.log 2> err.log) & pid=$!
  wait_ready
  t1=$(now_ms)
  code=$(curl -s -o /dev/null -w '%{http_code}' -H "Authorization: Bearer $ADMIN" http://127.0.0.1:19021/v1/org)
  t2=$(now_ms)
  rss=$(ps -o rss= -p "$pid")
  echo "run $i: ready after $((t1 - t0)) ms; first authenticated request $code after $((t2 - t1)) ms more; RSS ${rss} KiB"
  kill "$pid"; wait "$pid" 2>/dev/null || true; pid=""
done
