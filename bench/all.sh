#!/usr/bin/env bash
# Every benchmark of issue #6 in one command, against release builds: the criterion
# benchmarks (key verification at 1k/100k/1M cached keys, one rate-limit decision, JWT
# verification, a whole request in process), memory per cached key at 1M keys, the time from
# start to ready with 1M keys in the store, a profile-guided build (bench/pgo.sh) and the
# side-by-side load run (bench/run.sh), the PGO build in it as scenarios m and n.
# Prints a summary at the end; every step's full output stays in the results directory.
# Usage: bench/all.sh   (bench/run.sh's variables apply to the load step, READY_KEYS (1,000,000)
#        to the start-up step, BENCH_BIN to both; SKIP="load" or any of
#        "criterion memory ready pgo load" leaves steps out; PGO_BIN=<path> measures a PGO
#        build made before). Takes ~20 minutes (19 min 47 s in one run), 5–11 of them the
#        PGO build (its compilations and training). The PGO build is made from the working
#        tree, also when BENCH_BIN names a saved plain build: m against b then compares two
#        sources.
set -euo pipefail
cd "$(dirname "$0")/.."
SKIP=${SKIP:-}
OUT=$(mktemp -d /tmp/keyward-bench-all.XXXXXX)
STARTED=$(date +%s)
wanted() { [[ " $SKIP " != *" $1 "* ]]; }
step() { echo "== $1 ($(date -u +%H:%M:%S))" >&2; }

if wanted criterion; then
  step "criterion: cargo bench -p keyward-server"
  cargo bench -p keyward-server > "$OUT/criterion.txt" 2> "$OUT/criterion.err"
fi
if wanted memory; then
  step "memory per cached key: cache_memory example, 1,000,000 keys"
  cargo run -q --release -p keyward-server --example cache_memory -- 1000000 > "$OUT/memory.txt"
  cargo run -q --release -p keyward-server --example cache_memory -- 1000000 distinct >> "$OUT/memory.txt"
fi
if wanted ready; then
  step "start to ready: bench/ready.sh"
  NKEYS=${READY_KEYS:-1000000} bash bench/ready.sh > "$OUT/ready.txt"
fi
# Only when the load step will measure it (scenarios m and n), and not over a build given.
if wanted pgo && wanted load && [ -z "${PGO_BIN:-}" ] && [[ -z "${SCENARIOS:-}" || " $SCENARIOS " == *" "[mn]" "* ]]; then
  step "profile-guided build: bench/pgo.sh"
  PGO_BIN=$(bash bench/pgo.sh 2> "$OUT/pgo.err")
  export PGO_BIN
fi
if wanted load; then
  step "side by side under load: bench/run.sh"
  bash bench/run.sh > "$OUT/load.txt"
fi

echo
echo "# keyward benchmarks, $(date -u +%Y-%m-%dT%H:%MZ), commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
echo "machine: $(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2 / 1048576}' /proc/meminfo), Linux $(uname -r)"
version() { "$@" 2>&1 | head -1 || true; }
echo "versions: $(version rustc --version); $(version nginx -v); $(version haproxy -v);" \
  "$(version redis-server --version); $(version psql --version); $(version wrk -v)"
if [ -f "$OUT/criterion.txt" ]; then
  echo
  echo "## In process (criterion; mean and median of its samples)"
  echo
  echo "| benchmark | mean | median |"
  echo "|---|---|---|"
  # criterion keeps its estimates per benchmark; names are directories (with '/' for inputs).
  python3 - "target/criterion" "$STARTED" <<'PY'
import json, pathlib, sys
def show(ns):
    return f"{ns / 1000:.2f} µs" if ns >= 1000 else f"{ns:.0f} ns"
root = pathlib.Path(sys.argv[1])
for est in sorted(root.glob("**/new/estimates.json")):
    if est.stat().st_mtime < float(sys.argv[2]):
        continue  # a benchmark of an earlier run, renamed or removed since
    name = str(est.parent.parent.relative_to(root))
    e = json.loads(est.read_text())
    print(f"| {name} | {show(e['mean']['point_estimate'])} | {show(e['median']['point_estimate'])} |")
PY
fi
if [ -f "$OUT/memory.txt" ]; then
  echo
  echo "## Memory per cached key (1,000,000 keys; shared profiles, then one profile per key)"
  echo
  sed 's/^/    /' "$OUT/memory.txt"
fi
if [ -f "$OUT/ready.txt" ]; then
  echo
  echo "## Start to ready with ${READY_KEYS:-1000000} keys in the store"
  echo
  sed 's/^/    /' "$OUT/ready.txt"
fi
if [ -f "$OUT/load.txt" ]; then
  echo
  echo "## Under load, side by side"
  echo
  cat "$OUT/load.txt"
fi
echo
echo "full output: $OUT"
