#!/usr/bin/env bash
# Profiles keyward's proxy path under load: nginx `return 200` upstream, keyward (memory
# limits) in front, wrk with keys drawn from 10,000, `perf record` on keyward meanwhile.
# Prints the hottest symbols (self time) and writes perf.data; with CALLGRAPH=1 also the folded
# stacks (folded.txt, one line per stack with its sample count: the input of flame-graph tools
# such as inferno-flamegraph or flamegraph.pl).
# Usage: bench/profile.sh [proxy|auth] (SECONDS_=15 NKEYS=10000; CALLGRAPH=1 for call graphs)
# Needs linux-perf (installed from Debian when missing).
set -euo pipefail
cd "$(dirname "$0")/.."
MODE=${1:-proxy}
SECS=${SECONDS_:-15}
NKEYS=${NKEYS:-10000}
. bench/common.sh
install_missing perf:linux-perf wrk:wrk nginx:nginx-light

keyward_binary  # BENCH_BIN=<path> measures a saved build instead (an A/B)
bench_workspace profile
start_upstream
start_keyward_with_keys "$NKEYS"

url=http://127.0.0.1:19001/bench/x
extra=""
if [ "$MODE" = auth ]; then url=http://127.0.0.1:19001/v1/auth; extra="X-Forwarded-Uri: /bench/x"; fi
KEYS_FILE="$RUN/keys.txt" EXTRA_HEADER="$extra" wrk -t2 -c64 -d2s -s bench/keys.lua "$url" > /dev/null
KEYS_FILE="$RUN/keys.txt" EXTRA_HEADER="$extra" wrk -t2 -c64 -d"$((SECS + 2))s" --latency -s bench/keys.lua "$url" > "$RUN/wrk.txt" &
wrk_pid=$!
pids+=("$wrk_pid")
sleep 1
graph=()
[ -n "${CALLGRAPH:-}" ] && graph=(--call-graph dwarf,16384)
perf record -F 499 "${graph[@]}" -o "$RUN/perf.data" -p "$kw" -- sleep "$SECS" 2> "$RUN/perf.log" ||
  { echo "perf record failed:" >&2; cat "$RUN/perf.log" >&2; exit 1; }
wait "$wrk_pid"
cat "$RUN/wrk.txt"
perf report -i "$RUN/perf.data" --no-children --sort dso,symbol --stdio 2> /dev/null |
  grep -E '^ +[0-9]' | sed 's/ \{2,\}/ /g' | cut -c1-160 | head -60 || true
echo "perf data: $RUN/perf.data"
if [ -n "${CALLGRAPH:-}" ]; then
  perf script report stackcollapse -i "$RUN/perf.data" > "$RUN/folded.txt" 2> "$RUN/perf.log" ||
    { echo "perf script failed:" >&2; cat "$RUN/perf.log" >&2; exit 1; }
  echo "folded stacks: $RUN/folded.txt"
fi
