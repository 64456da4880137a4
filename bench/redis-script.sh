#!/usr/bin/env bash
# Redis' own CPU per rate-limit decision: runs the `redis` backend's script (taken from
# crates/keyward-server/src/redis_limits.rs) with `redis-benchmark` against a redis-server of
# its own, as keyward calls it for a key quota plus two organisation windows, over NKEYS keys,
# and prints Redis' `usec_per_call` per round (INFO commandstats), with the slots in the
# organisation's minute window (full, 21, after a minute of load: the steady state, where an
# earlier script that read every slot cost the most).
# BATCH=n sends n decisions per run, as a busy node's batches do (per decision: the run's
# usec_per_call / n). COMPARE=file.lua alternates rounds with another script taking the same
# arguments, on keys of its own, for an A/B (paired rounds agree within ~10% on this
# machine; the level drifts between rounds).
# REFUSE=1 measures refusals instead (what a flood from keys over their quota costs Redis).
# Usage: bench/redis-script.sh   (ROUNDS=12 N=60000 NKEYS=10000 BATCH=1 REFUSE=0 COMPARE= to
#        change).
# Installs redis-server (with redis-benchmark) when missing.
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${ROUNDS:-12}
N=${N:-60000}
BATCH=${BATCH:-1}
KEY_LIMIT=1000000000
[ "${REFUSE:-0}" = 1 ] && KEY_LIMIT=1
NKEYS=${NKEYS:-10000}
COMPARE=${COMPARE:-}
PORT=19025  # apart from run.sh's ports (19016 is its PostgreSQL node's internal listener)

RUN=$(mktemp -d /tmp/keyward-redis-script.XXXXXX)
pids=()
. bench/common.sh
install_missing redis-server:redis-server redis-benchmark:redis-tools
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; }
trap cleanup EXIT

python3 - crates/keyward-server/src/redis_limits.rs "$RUN/keyward.lua" <<'PY'
import re, sys
source = open(sys.argv[1]).read()
script = re.search(r'const SCRIPT: &str = r#"(.*?)"#;', source, re.S)
if not script:
    sys.exit("no SCRIPT in " + sys.argv[1])
open(sys.argv[2], "w").write(script.group(1))
PY

redis-server --port $PORT --bind 127.0.0.1 --save "" --appendonly no > /dev/null & pids+=($!)
wait_port $PORT
cli() { redis-cli -p $PORT "$@"; }

scripts=("$RUN/keyward.lua")
[ -n "$COMPARE" ] && scripts+=("$COMPARE")
declare -A sha
for s in "${scripts[@]}"; do sha[$s]=$(cli script load "$(cat "$s")"); done

echo "usec of Redis CPU per decision (usec_per_call / BATCH), $N runs of $BATCH per round over $NKEYS keys"
for round in $(seq 1 "$ROUNDS"); do
  line="round $round:"
  for i in "${!scripts[@]}"; do
    org="org_$i"
    # What keyward sends for BATCH decisions, each of cost 1 for a random key: three limits
    # (key quota 60 s, organisation minute and hour), no credits. All too high to refuse, or
    # with REFUSE=1 a key quota of one request, so nearly every decision is a refusal.
    keys=() args=("$BATCH")
    for _ in $(seq 1 "$BATCH"); do
      keys+=("kw:{$org}:window:key:__rand_int__" "kw:{$org}:window:minute" "kw:{$org}:window:hour")
      args+=(1 3 "$KEY_LIMIT" 60000 1000000000 60000 1000000000 3600000 0)
    done
    cli config resetstat > /dev/null
    redis-benchmark -p $PORT -c 16 -n "$N" -r "$NKEYS" -q evalsha "${sha[${scripts[$i]}]}" \
      "${#keys[@]}" "${keys[@]}" "${args[@]}" > /dev/null
    usec=$(cli info commandstats | tr -d '\r' | sed -n 's/^cmdstat_evalsha:.*usec_per_call=\([0-9.]*\).*/\1/p')
    per_decision=$(python3 -c "print(round($usec / $BATCH, 2))")
    # Slots are the fields named by a number (a window also keeps its total and oldest slot).
    slots=$(cli hkeys "kw:{$org}:window:minute" | grep -c '^[0-9]' || true)
    line="$line $(basename "${scripts[$i]}")=$per_decision (minute window: $slots slots)"
  done
  echo "$line"
done
