#!/usr/bin/env bash
# A flood of unknown keys that pass the format and checksum check (the checksum is public, so
# anyone can make them): what each costs keyward, and what it does to valid traffic.
# Starts the nginx upstream and keyward (memory limits, SQLite) with NKEYS valid keys, writes
# FLOOD_KEYS random well-formed keys (bench/random_keys.py), then per round, each for DURATION
# with `wrk -t1 -cCONNECTIONS`: valid keys alone, the flood alone (req/s, keyward's CPU per
# request, store queries from /metrics), and both at once on separate connections.
# SPREAD=1 sends the flood from a random client address per request (X-Forwarded-For from
# 10/8, keyward trusting 127.0.0.1 as its proxy): the per-client bound then never applies, the
# per-node one (`cache.unknown_keys_per_node`) does.
# FORGED=1 floods with access tokens instead: one exchanged (Ed25519) token's header and
# claims under FLOOD_KEYS (default then 20,000) forged signatures, each costing keyward a whole
# signature check.
# Usage: bench/flood.sh   (NKEYS=10000 FLOOD_KEYS=1000000 DURATION=8s CONNECTIONS=32 ROUNDS=2
#        SPREAD=1 FORGED=1; KEYWARD_CACHE__UNKNOWN_KEYS_PER_NODE=0 measures without the node's
#        bound, KEYWARD_CACHE__UNKNOWN_KEYS_PER_CLIENT=0 without the client's)
# Loopback only; every process it starts is stopped at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
NKEYS=${NKEYS:-10000}
FORGED=${FORGED:-}
FLOOD_KEYS=${FLOOD_KEYS:-$([ -n "$FORGED" ] && echo 20000 || echo 1000000)}
DURATION=${DURATION:-8s}
CONNECTIONS=${CONNECTIONS:-32}
ROUNDS=${ROUNDS:-2}
SPREAD=${SPREAD:-}
[ -n "$SPREAD" ] && export KW_SERVER_EXTRA='trusted_proxies = ["127.0.0.1/32"]'

. bench/common.sh
install_missing wrk:wrk nginx:nginx-light
keyward_binary
bench_workspace flood
start_upstream
start_keyward_with_keys "$NKEYS"
if [ -n "$FORGED" ]; then
  token=$(curl -sf -X POST http://127.0.0.1:19001/v1/tokens/exchange \
    -H "Authorization: Bearer $(head -1 "$RUN/keys.txt")" | python3 -c 'import json, sys; print(json.load(sys.stdin)["token"])')
  python3 - "$token" "$FLOOD_KEYS" > "$RUN/random-keys.txt" <<'PY'
import base64, os, sys
header, claims, signature = sys.argv[1].split(".")
real = base64.urlsafe_b64decode(signature + "==")
for _ in range(int(sys.argv[2])):
    # Ed25519: the real R and a random S below 2^252 (so below the group order), or the
    # verifier rejects most random signatures without the curve arithmetic.
    s = bytearray(os.urandom(32))
    s[31] &= 0x0F
    forged = base64.urlsafe_b64encode(real[:32] + bytes(s)).rstrip(b"=")
    print(f"{header}.{claims}.{forged.decode()}")
PY
else
  python3 bench/random_keys.py "$FLOOD_KEYS" "$RUN/random-keys.txt"
fi
url=http://127.0.0.1:19001/bench/x
ticks() { local f; f=$(sed 's/.*) //' /proc/"$1"/stat); set -- $f; echo $((${12} + ${13})); }
store_queries() { curl -s http://127.0.0.1:19011/metrics | awk '/^keyward_key_cache_misses_total/ {print $2}'; }
refused() { curl -s http://127.0.0.1:19011/metrics | awk '/^keyward_(unknown_keys|invalid_tokens)_refused_total/ {n += $2} END {print n + 0}'; }
load() { KEYS_FILE=$1 EXTRA_HEADER="" SPREAD_CLIENTS=${3:-} wrk -t1 -c"$CONNECTIONS" -d"$2" --latency -s bench/keys.lua "$url"; }
field() { awk -v f="$1" '$0 ~ f {print $NF; exit}'; }
rps() { awk '/Requests\/sec/ {print $2}'; }
p99() { awk '/ 99%/ {print $2}'; }
count() { awk '/ requests in / {print $1}'; }
TICK_US=$((1000000 / $(getconf CLK_TCK)))

load "$RUN/keys.txt" 3s > /dev/null
for round in $(seq 1 "$ROUNDS"); do
  t0=$(ticks "$kw"); out=$(load "$RUN/keys.txt" "$DURATION"); t1=$(ticks "$kw")
  echo "round $round, valid keys alone: $(echo "$out" | rps) req/s, p99 $(echo "$out" | p99)," \
    "keyward CPU $(( (t1 - t0) * TICK_US / $(echo "$out" | count) )) µs per request"
  q0=$(store_queries); r0=$(refused); t0=$(ticks "$kw")
  out=$(load "$RUN/random-keys.txt" "$DURATION" "$SPREAD")
  t1=$(ticks "$kw"); q1=$(store_queries); r1=$(refused)
  n=$(echo "$out" | count)
  echo "round $round, the flood alone: $(echo "$out" | rps) req/s (non-2xx: $(echo "$out" | field Non-2xx)," \
    "of $n; refused 429 unchecked: $((r1 - r0))), p99 $(echo "$out" | p99), $((q1 - q0)) store queries," \
    "keyward CPU $(( (t1 - t0) * TICK_US / n )) µs per request"
  load "$RUN/random-keys.txt" "$DURATION" "$SPREAD" > "$RUN/flood.txt" & flood=$!
  out=$(load "$RUN/keys.txt" "$DURATION"); wait "$flood"
  echo "round $round, both at once: valid $(echo "$out" | rps) req/s (p99 $(echo "$out" | p99))," \
    "flood $(rps < "$RUN/flood.txt") req/s"
done
