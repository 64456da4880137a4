#!/usr/bin/env bash
# A/B of two builds of one criterion benchmark, alternating runs: this machine's speed drifts
# by ±15% within an hour, so two builds measured one after the other can differ by more than
# any change between them. Prints each run's estimate per benchmark, then the median of the
# runs per build.
# Usage: bench/criterion-ab.sh BIN_A BIN_B 'filter regex' [RUNS (4)] [SECONDS (5)]
# A benchmark binary is what `cargo bench -p keyward-server --bench NAME --no-run` builds (it
# prints the path, target/release/deps/NAME-<hash>); copy it away before building the other
# revision, which overwrites it. Example:
#   bench/criterion-ab.sh /tmp/request-before /tmp/request-after 'forward-auth' 4
set -euo pipefail
A=$(realpath "$1"); B=$(realpath "$2"); FILTER=$3; RUNS=${4:-4}; SECONDS_EACH=${5:-5}
OUT=$(mktemp -d /tmp/keyward-criterion-ab.XXXXXX)

run() { # BIN LABEL ROUND → "label<TAB>benchmark<TAB>estimate in ns" lines
  "$1" --bench --noplot --warm-up-time 2 --measurement-time "$SECONDS_EACH" "$FILTER" 2>&1 |
    awk -v label="$2" '
      /^Benchmarking .*: Analyzing$/ { name = $0; sub(/^Benchmarking /, "", name); sub(/: Analyzing$/, "", name) }
      /time:/ {
        line = $0; sub(/.*time: *\[/, "", line); split(line, f, " ")
        v = f[3]; unit = f[4]; m = (unit == "ps") ? 0.001 : (unit == "ns") ? 1 : (unit == "µs" || unit == "us") ? 1000 : (unit == "ms") ? 1e6 : 1e9
        printf "%s\t%s\t%.1f\n", label, name, v * m
      }'
}

for round in $(seq "$RUNS"); do
  for label in A B; do
    bin=$A; [ "$label" = B ] && bin=$B
    run "$bin" "$label" | tee -a "$OUT/runs.tsv" | awk -F'\t' -v r="$round" '{printf "run %s %s  %-50s %10.1f ns\n", r, $1, $2, $3}'
  done
done

echo
echo "median of $RUNS runs (criterion's estimate per run), A = $A, B = $B:"
sort -t$'\t' -k2,2 -k1,1 -k3,3n "$OUT/runs.tsv" | awk -F'\t' '
  function flush() { if (n) { m = (n % 2) ? v[(n + 1) / 2] : (v[n / 2] + v[n / 2 + 1]) / 2; printf "  %s  %-50s %10.1f ns  (%d runs)\n", key_label, key_name, m, n } }
  { if ($1 != key_label || $2 != key_name) { flush(); key_label = $1; key_name = $2; n = 0 } v[++n] = $3 }
  END { flush() }'
