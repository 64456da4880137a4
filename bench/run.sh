#!/usr/bin/env bash
# Side-by-side load test on loopback, one run, same wrk settings for every scenario:
#   a. the upstream alone (nginx `return 200`, 1 worker): the ceiling
#   b. keyward proxy mode, keys drawn from 10,000, limits too high to trigger
#   j. the same with `tokens.identity_token = false`: the upstream gets the plain identity
#      headers but no signed token, nearer to the job of c and d, o nearer still (c and d
#      pass the key id alone; j still adds the other ids, scopes, X-Request-Id and
#      X-Forwarded-*): b against j is what the token costs
#   o. keyward configured as near to c's job as it goes: j without the organisation's windows
#      (no tier is configured under the keys' organisation's tier name, so only the key's own
#      limit applies). What remains above c's work is what every keyward request does (usage
#      counts, the plain identity headers, X-Request-Id, X-Forwarded-*, rate-limit headers,
#      metrics): o against c is the issue's "the same job" seen from keyward's side, as k is
#      from nginx's
#   c. nginx doing the same job (map of keys, per-key limit_req, proxy_pass, JSON 401/429)
#   d. HAProxy doing the same (map, stick-table, http-request return)
#   k. nginx doing keyward's whole job as far as nginx can (bench/nginx-fulljob.conf: c plus
#      the organisation's two limits, every identity header keyward sends incl. the token from
#      a map, X-Forwarded-*, a request id both ways, X-RateLimit-* on the answer): b against k
#      compares like with like; c is the issue's setup and stays the ratios' base
#   l. HAProxy likewise (bench/haproxy-fulljob.cfg)
#   e. keyward forward-auth GET /v1/auth (compare with a: nginx's static return 200)
#   f. keyward proxy mode with the Redis rate-limit backend
#   g. keyward proxy mode on PostgreSQL storage (memory limits)
#   h. the HTTP floor: keyward's stack and runtime shape answering a fixed forward-auth 200
#      with no domain work (examples/http_floor.rs); e against h is what the domain work costs
#   i. the proxy floor: keyward's stack and runtime shape forwarding to the upstream over one
#      upstream connection per client connection, with no domain work (examples/proxy_floor.rs);
#      b against i is what the domain work costs, i against c what the stack costs
#   m, n. with PGO_BIN=<path> (a build of bench/pgo.sh): that build's proxy and forward-auth,
#      in a keyward of its own beside b's: m against b and n against e is what the
#      profile-guided build changes
# Besides req/s and latency it reports each gateway's CPU time per request (user + system, all
# its threads, from /proc), which varies less between runs than req/s on two shared cores, split
# into user and system time (the kernel's share, loopback TCP and wake-ups, is what every
# contender pays alike), and the upstream's CPU per request (what the headers a gateway adds
# cost the upstream to parse).
# Usage: bench/run.sh   (DURATION=10s ROUNDS=3 CONNECTIONS=64 THREADS=2 SCENARIOS="a b c" to change)
# RATE=<requests/s> measures latency open-loop instead: oha (from crates.io, installed when
# missing) offers that rate whatever the answers' pace, with one key (wrk's closed loop waits
# for each answer, so a stall lowers the rate instead of showing in the latencies), and the
# table gives p99.9 in place of the ratio.
# Installs wrk, nginx, haproxy and redis-server from Debian when missing, and starts PostgreSQL
# (scripts/pg-up). Loopback only;
# every process it starts is stopped at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
DURATION=${DURATION:-10s}
ROUNDS=${ROUNDS:-3}
CONNECTIONS=${CONNECTIONS:-64}
THREADS=${THREADS:-2}
NKEYS=${NKEYS:-10000}
PGO_BIN=${PGO_BIN:-}     # a profile-guided build (bench/pgo.sh) adds scenarios m and n
if [ -n "$PGO_BIN" ]; then
  [ -x "$PGO_BIN" ] || { echo "PGO_BIN: no executable at '$PGO_BIN'" >&2; exit 2; }
  PGO_BIN=$(realpath "$PGO_BIN")
  # m and n right after b and e, so that each pair runs seconds apart.
  SCENARIOS=${SCENARIOS:-a b m j o c d k l e n f g h i}
fi
SCENARIOS=${SCENARIOS:-a b j o c d k l e f g h i}   # a subset measures faster; c is the ratios' base
for s in $SCENARIOS; do
  case "$s" in
    m|n) [ -n "$PGO_BIN" ] || { echo "scenarios m and n measure a PGO build: set PGO_BIN (bench/pgo.sh makes one)" >&2; exit 2; } ;;
  esac
done

. bench/common.sh
install_missing wrk:wrk nginx:nginx-light haproxy:haproxy redis-server:redis-server

if [ -n "${RATE:-}" ] && ! command -v oha >/dev/null; then cargo install oha --locked >&2; fi
keyward_binary  # BENCH_BIN=<path> measures a saved build instead (an A/B)
cargo build --release -p keyward-server --example http_floor --example proxy_floor >&2
FLOOR_BIN=$PWD/target/release/examples/http_floor
PROXY_FLOOR_BIN=$PWD/target/release/examples/proxy_floor
bench_workspace bench

start_upstream

start_keyward_with_keys "$NKEYS"
kw_pid=$kw
mkdir -p "$RUN/kw-redis"
gateway_maps 127.0.0.1:19001

sed "s#__RUN__#$RUN#g" bench/nginx-keyauth.conf > "$RUN/keyauth.conf"
nginx -c "$RUN/keyauth.conf" -p "$RUN" & pids+=($!); keyauth_master=$!
sed "s#__RUN__#$RUN#g" bench/haproxy.cfg > "$RUN/haproxy.cfg"
haproxy -f "$RUN/haproxy.cfg" -db > "$RUN/haproxy.log" 2>&1 & pids+=($!); haproxy_pid=$!
sed "s#__RUN__#$RUN#g" bench/nginx-fulljob.conf > "$RUN/fulljob.conf"
nginx -c "$RUN/fulljob.conf" -p "$RUN" & pids+=($!); fulljob_master=$!
sed "s#__RUN__#$RUN#g" bench/haproxy-fulljob.cfg > "$RUN/haproxy-fulljob.cfg"
haproxy -f "$RUN/haproxy-fulljob.cfg" -db > "$RUN/haproxy-fulljob.log" 2>&1 & pids+=($!); haproxy_fulljob_pid=$!
redis-server --port 19005 --bind 127.0.0.1 --save "" --appendonly no > /dev/null & pids+=($!); redis_pid=$!
keyward_config 19004 19014 redis://127.0.0.1:19005/ > "$RUN/kw-redis/keyward.toml"
(cd "$RUN/kw-redis" && exec "$BIN" serve > out.log 2> err.log) & pids+=($!); kw_redis_pid=$!
PG_URL=$(scripts/pg-up)
PG_DB=kw_bench_$$
psql "$PG_URL" -qAtX -c "CREATE DATABASE $PG_DB" > /dev/null
trap 'cleanup; psql "$PG_URL" -qAtX -c "DROP DATABASE IF EXISTS $PG_DB WITH (FORCE)" > /dev/null 2>&1 || true' EXIT
mkdir -p "$RUN/kw-pg"
keyward_config 19006 19016 "" "${PG_URL%/*}/$PG_DB" > "$RUN/kw-pg/keyward.toml"
(cd "$RUN/kw-pg" && exec "$BIN" serve > out.log 2> err.log) & pids+=($!); kw_pg_pid=$!
mkdir -p "$RUN/kw-plain"
{ keyward_config 19009 19019; printf '[tokens]\nidentity_token = false\n'; } > "$RUN/kw-plain/keyward.toml"
(cd "$RUN/kw-plain" && exec "$BIN" serve > out.log 2> err.log) & pids+=($!); kw_plain_pid=$!
mkdir -p "$RUN/kw-keyonly"
# The keys' organisations have the tier "free"; with no tier of that name no organisation has
# windows (the limiter falls back to "free" and finds none).
{ keyward_config 19018 19028 | sed 's/^\[ratelimit\.tiers\.free\]$/[ratelimit.tiers.unused]/'
  printf '[tokens]\nidentity_token = false\n'; } > "$RUN/kw-keyonly/keyward.toml"
grep -q '^\[ratelimit\.tiers\.unused\]$' "$RUN/kw-keyonly/keyward.toml" ||
  { echo "scenario o: its configuration still has the tier \"free\"" >&2; exit 1; }
(cd "$RUN/kw-keyonly" && exec "$BIN" serve > out.log 2> err.log) & pids+=($!); kw_keyonly_pid=$!
kw_pgo_pid=""
if [ -n "$PGO_BIN" ]; then
  mkdir -p "$RUN/kw-pgo"
  keyward_config 19012 19017 > "$RUN/kw-pgo/keyward.toml"
  (cd "$RUN/kw-pgo" && exec "$PGO_BIN" serve > out.log 2> err.log) & pids+=($!); kw_pgo_pid=$!
  wait_port 19012
fi
"$FLOOR_BIN" 19007 & pids+=($!); floor_pid=$!
"$PROXY_FLOOR_BIN" 19008 127.0.0.1:19000 & pids+=($!); proxy_floor_pid=$!
wait_port 19002; wait_port 19003; wait_port 19010; wait_port 19013; wait_port 19004; wait_port 19006; wait_port 19007; wait_port 19008; wait_port 19009; wait_port 19018
PG_ADMIN=$(grep -E '^kw_' "$RUN/kw-pg/err.log")
python3 bench/make_keys.py 127.0.0.1:19006 "$PG_ADMIN" "$NKEYS" "$RUN/keys-pg.txt"

declare -A URL=(
  [a]="http://127.0.0.1:19000/"
  [b]="http://127.0.0.1:19001/bench/x"
  [c]="http://127.0.0.1:19002/x"
  [d]="http://127.0.0.1:19003/x"
  [e]="http://127.0.0.1:19001/v1/auth"
  [f]="http://127.0.0.1:19004/bench/x"
  [g]="http://127.0.0.1:19006/bench/x"
  [h]="http://127.0.0.1:19007/v1/auth"
  [i]="http://127.0.0.1:19008/x"
  [j]="http://127.0.0.1:19009/bench/x"
  [o]="http://127.0.0.1:19018/bench/x"
  [m]="http://127.0.0.1:19012/bench/x"
  [n]="http://127.0.0.1:19012/v1/auth"
  [k]="http://127.0.0.1:19010/x"
  [l]="http://127.0.0.1:19013/x"
)
declare -A NAME=(
  [a]="upstream alone (nginx return 200, 1 worker)"
  [b]="keyward proxy, memory limits"
  [c]="nginx key-auth (map, limit_req, proxy_pass)"
  [d]="HAProxy key-auth (map, stick-table)"
  [e]="keyward forward-auth GET /v1/auth"
  [f]="keyward proxy, redis limits"
  [g]="keyward proxy, PostgreSQL store"
  [h]="HTTP floor (keyward's stack, fixed forward-auth answer)"
  [i]="proxy floor (keyward's stack forwarding, no domain work)"
  [j]="keyward proxy, memory limits, no identity token"
  [o]="keyward proxy, key limit only, no identity token (c's job)"
  [m]="keyward proxy, memory limits, PGO build"
  [n]="keyward forward-auth GET /v1/auth, PGO build"
  [k]="nginx doing keyward's whole job (+ org limits, identity headers, request id, X-RateLimit-*)"
  [l]="HAProxy doing keyward's whole job (likewise)"
)

# Every scenario must authenticate for real before it is measured.
# (h answers 200 to anything and i forwards anything with a credential: they are floors, not
# gateways.)
key=$(head -1 "$RUN/keys.txt")
for s in b c d e f g j o k l ${PGO_BIN:+m n}; do
  k=$key
  [ "$s" = g ] && k=$(head -1 "$RUN/keys-pg.txt")
  ok=$(curl -s -o /dev/null -w '%{http_code}' -H "X-Forwarded-Uri: /bench/x" -H "Authorization: Bearer $k" "${URL[$s]}")
  bad=$(curl -s -o /dev/null -w '%{http_code}' -H "X-Forwarded-Uri: /bench/x" -H "Authorization: Bearer kw_live_nope" "${URL[$s]}")
  [ "$ok" = 200 ] && [ "$bad" = 401 ] || { echo "scenario $s: valid key → $ok, bad key → $bad" >&2; exit 1; }
done
# A refused key gets the JSON error envelope from every gateway (the issue's "JSON 401"), not
# a server's HTML page: the same answer, or the comparison is not of one job.
json_error() { # headers-file body → true when the answer is application/json with error.code
  grep -qi '^content-type: application/json' "$1" &&
    python3 -c 'import json, sys; assert json.loads(sys.argv[1])["error"]["code"]' "$2" 2>/dev/null
}
for s in b c d e o k l; do
  body=$(curl -s -D "$RUN/401.head" -H "X-Forwarded-Uri: /bench/x" -H "Authorization: Bearer kw_live_nope" "${URL[$s]}")
  json_error "$RUN/401.head" "$body" || { echo "scenario $s: a refused key got no JSON error envelope: $body" >&2; exit 1; }
done
# And a key over its limit gets a JSON 429 from c's and d's setups ("JSON 401/429"), which
# their benchmark limits never reach: copies of their configurations with the limit cut to
# one request a minute, on ports of their own, stopped once they have answered.
sed -e "s#__RUN__#$RUN#g" -e 's/keyauth\.pid/keyauth-429.pid/' -e 's/listen 127\.0\.0\.1:19002 /listen 127.0.0.1:19032 /' \
    -e 's#rate=100000r/s#rate=1r/m#' -e 's/burst=100000 nodelay/nodelay/' bench/nginx-keyauth.conf > "$RUN/keyauth-429.conf"
sed -e "s#__RUN__#$RUN#g" -e 's/bind 127\.0\.0\.1:19003$/bind 127.0.0.1:19033/' -e 's/gt 100000000 }/gt 1 }/' \
    bench/haproxy.cfg > "$RUN/haproxy-429.cfg"
for want in 'listen 127.0.0.1:19032 ' 'rate=1r/m;' 'zone=per_key nodelay;'; do
  grep -qF "$want" "$RUN/keyauth-429.conf" || { echo "the 429 copy of nginx-keyauth.conf lacks '$want'" >&2; exit 1; }
done
for want in 'bind 127.0.0.1:19033' 'gt 1 }'; do
  grep -qF "$want" "$RUN/haproxy-429.cfg" || { echo "the 429 copy of haproxy.cfg lacks '$want'" >&2; exit 1; }
done
nginx -c "$RUN/keyauth-429.conf" -p "$RUN" & pids+=($!); limited=($!)
haproxy -f "$RUN/haproxy-429.cfg" -db > "$RUN/haproxy-429.log" 2>&1 & pids+=($!); limited+=($!)
wait_port 19032; wait_port 19033
for target in c:19032 d:19033; do
  codes=""
  for _ in 1 2 3; do
    codes+="$(curl -s -D "$RUN/429.head" -o "$RUN/429.body" -w '%{http_code}' -H "Authorization: Bearer $key" "http://127.0.0.1:${target#*:}/x") "
  done
  [ "$codes" = "200 429 429 " ] && json_error "$RUN/429.head" "$(cat "$RUN/429.body")" ||
    { echo "scenario ${target%:*} with a limit of 1: answers $codes, last body $(cat "$RUN/429.body")" >&2; exit 1; }
done
kill "${limited[@]}"; wait "${limited[@]}" 2>/dev/null || true
# Every proxy tells the upstream which key called (keyward's X-Keyward-Key-Id; nginx's and
# HAProxy's setups set the same header from their maps), or the comparison is not of one job.
key_id=$(head -1 "$RUN/keys.txt.ids")
for s in b c d f j o k l ${PGO_BIN:+m}; do
  caller=$(curl -s -H "Authorization: Bearer $key" "${URL[$s]%/x}/caller")
  [ "$caller" = "$key_id" ] || { echo "scenario $s: the upstream saw key id '$caller', not $key_id" >&2; exit 1; }
done
# b sends the signed identity token upstream and j does not (or b against j measures nothing).
token=$(curl -s -H "Authorization: Bearer $key" "${URL[b]%/x}/identity")
[ "$(tr -cd . <<< "$token")" = .. ] || { echo "scenario b: the upstream got no identity token" >&2; exit 1; }
for s in j o; do
  token=$(curl -s -H "Authorization: Bearer $key" "${URL[$s]%/x}/identity")
  [ -z "$token" ] || { echo "scenario $s: the upstream got an identity token" >&2; exit 1; }
done
# k and l send the whole identity keyward sends (org, project, scopes and a token), replace
# what a client sent under those names, and answer with the rate-limit headers and a request
# id as keyward does, or they would not be doing its whole job.
identity=$(curl -s -H "Authorization: Bearer $key" "${URL[b]%/x}/whoami")
for s in k l; do
  seen=$(curl -s -H "Authorization: Bearer $key" "${URL[$s]%/x}/whoami")
  [ "${seen%|*}" = "${identity%|*}" ] || { echo "scenario $s: the upstream saw '${seen%|*}', keyward sends '${identity%|*}'" >&2; exit 1; }
  [ "$(tr -cd . <<< "${seen##*|}")" = .. ] || { echo "scenario $s: the upstream got no identity token" >&2; exit 1; }
done
for s in b k l; do
  seen=$(curl -s -H "Authorization: Bearer $key" -H "X-Keyward-Org-Id: evil" -H "X-Keyward-User-Id: evil" \
    -H "X-Keyward-Proxy-Auth: evil" "${URL[$s]%/x}/spoof")
  [ "$seen" = "${identity%%|*}||" ] || { echo "scenario $s: a client-sent identity reached the upstream ('$seen')" >&2; exit 1; }
done
for s in b k l; do
  answer=$(curl -s -D - -o /dev/null -H "Authorization: Bearer $key" "${URL[$s]}" | tr -d '\r' | tr 'A-Z' 'a-z')
  for h in x-ratelimit-limit x-ratelimit-remaining x-ratelimit-reset x-request-id; do
    grep -q "^$h: ." <<< "$answer" || { echo "scenario $s: the answer has no $h header" >&2; exit 1; }
  done
done
# The proxy floor must reach the upstream (a 502 floor would measure nothing): 200 with a
# credential, 401 without.
ok=$(curl -s -o /dev/null -w '%{http_code}' -H "Authorization: Bearer $key" "${URL[i]}")
bad=$(curl -s -o /dev/null -w '%{http_code}' "${URL[i]}")
[ "$ok" = 200 ] && [ "$bad" = 401 ] || { echo "scenario i: with a credential → $ok, without → $bad" >&2; exit 1; }

# The processes doing each scenario's gateway work (nginx: its workers), for CPU per request:
# a steadier figure than req/s on two shared cores, and one that shows where time goes.
UPSTREAM_WORKERS="$(pgrep -P "$upstream_pid" | xargs)"
declare -A GATEWAY=(
  [a]="$UPSTREAM_WORKERS"
  [b]="$kw_pid" [e]="$kw_pid"
  [j]="$kw_plain_pid"
  [o]="$kw_keyonly_pid"
  [m]="$kw_pgo_pid" [n]="$kw_pgo_pid"
  [c]="$(pgrep -P "$keyauth_master" | xargs)"
  [d]="$haproxy_pid"
  [k]="$(pgrep -P "$fulljob_master" | xargs)"
  [l]="$haproxy_fulljob_pid"
  [f]="$kw_redis_pid"
  [g]="$kw_pg_pid"
  [h]="$floor_pid"
  [i]="$proxy_floor_pid"
)
cpu_ticks() { # pids → "user system" clock ticks of each whole process (threads that ended included)
  local user=0 system=0 p fields
  for p in "$@"; do
    fields=$(sed 's/.*) //' /proc/"$p"/stat 2>/dev/null) || continue
    set -- $fields
    user=$((user + ${12})); system=$((system + ${13}))
  done
  echo "$user $system"
}
ticks_sum() { echo $(($1 + $2)); }
TICK_US=$((1000000 / $(getconf CLK_TCK)))

open_loop() { # keys-file extra-header url → oha's figures, as the lines of wrk's the parser reads
  local -a headers=(-H "Authorization: Bearer $(head -1 "$1")")
  [ -n "$2" ] && headers+=(-H "$2")
  oha -z "$DURATION" -q "$RATE" -c "$CONNECTIONS" --latency-correction --no-tui --output-format json \
      "${headers[@]}" "$3" | python3 -c '
import json, sys
d = json.load(sys.stdin)
p = d["latencyPercentiles"]
codes = {int(k): v for k, v in d["statusCodeDistribution"].items()}
# Requests still in flight when the time is up are not errors of the gateway.
errors = sum(v for k, v in d["errorDistribution"].items() if "deadline" not in k)
for name, key in (("50%", "p50"), ("99%", "p99"), ("99.9%", "p99.9")):
    print(f"    {name} {p[key] * 1000:.3f}ms")
summary = d["summary"]
print("  %d requests in %.2fs" % (sum(codes.values()), summary["total"]))
print("Requests/sec: %.2f" % summary["requestsPerSec"])
print(f"Non-2xx or 3xx responses: {sum(v for k, v in codes.items() if not 200 <= k < 400)}")
print(f"Socket errors: connect 0, read 0, write 0, timeout {errors}")
'
}

measure() { # scenario → "rps p50_ms p99_ms non2xx cpu_us redis_cpu_us socket_errors user_us system_us upstream_cpu_us p999_ms" (CPU per request; p99.9 with RATE only)
  local extra="" keys="$RUN/keys.txt"
  case "$1" in e|h|n) extra="X-Forwarded-Uri: /bench/x";; esac
  [ "$1" = g ] && keys="$RUN/keys-pg.txt"
  KEYS_FILE="$keys" EXTRA_HEADER="$extra" wrk -t"$THREADS" -c"$CONNECTIONS" -d2s -s bench/keys.lua "${URL[$1]}" > /dev/null
  local before after redis_before redis_after up_before up_after
  before=$(cpu_ticks ${GATEWAY[$1]})
  redis_before=$(ticks_sum $(cpu_ticks $redis_pid))
  up_before=$(ticks_sum $(cpu_ticks $UPSTREAM_WORKERS))
  local out
  if [ -n "${RATE:-}" ]; then
    out=$(open_loop "$keys" "$extra" "${URL[$1]}")
  else
    out=$(KEYS_FILE="$keys" EXTRA_HEADER="$extra" wrk -t"$THREADS" -c"$CONNECTIONS" -d"$DURATION" --latency -s bench/keys.lua "${URL[$1]}")
  fi
  after=$(cpu_ticks ${GATEWAY[$1]})
  redis_after=$(ticks_sum $(cpu_ticks $redis_pid))
  up_after=$(ticks_sum $(cpu_ticks $UPSTREAM_WORKERS))
  set -- $before $after
  echo "$out" | awk -v user_ticks=$(($3 - $1)) -v sys_ticks=$(($4 - $2)) -v redis_ticks=$((redis_after - redis_before)) \
      -v up_ticks=$((up_after - up_before)) -v tick_us="$TICK_US" '
      function ms(v) { if (v ~ /us$/) return v / 1000; if (v ~ /ms$/) return v + 0; if (v ~ /s$/) return v * 1000; return v }
      function per(t) { return n ? t * tick_us / n : 0 }
      /^ +50%/ { p50 = ms($2) } /^ +99%/ { p99 = ms($2) } /^ +99\.9%/ { p999 = ms($2) } /^Requests\/sec/ { rps = $2 }
      / requests in / { n = $1 }
      /Non-2xx/ { bad = $NF }
      /Socket errors/ { errors = $4 + $6 + $8 + $10 }
      END { printf "%s %s %s %s %.1f %.1f %d %.1f %.1f %.1f %s\n", rps, p50, p99, (bad ? bad : 0), per(user_ticks + sys_ticks), per(redis_ticks), errors, per(user_ticks), per(sys_ticks), per(up_ticks), (p999 ? p999 : 0) }'
}

declare -A RESULTS
for round in $(seq 1 "$ROUNDS"); do
  for s in $SCENARIOS; do
    r=$(measure $s)
    RESULTS[$s]+="$r;"
    echo "round $round $s: $r" >&2
  done
done

median() { tr ';' '\n' | grep -v '^$' | awk -v c="$1" '{print $c}' | sort -g | awk '{v[NR]=$1} END {print v[int((NR+1)/2)]}'; }
total() { tr ';' '\n' | grep -v '^$' | awk -v c="$1" '{s += $c} END {print s + 0}'; }
# The ratio to nginx is taken per round (c runs within seconds of each scenario), and the
# median of those is shown with each round's: the machine drifts within a run, so a ratio of
# the medians can pair a fast round of one with a slow round of the other. Without c in the
# run there is no base for the ratio column.
round_ratios() { # results-of-scenario results-of-c → "median (r1 / r2 / …)" or "-"
  [ -n "$2" ] || { echo "-"; return; }
  local ratios
  ratios=$(paste -d' ' <(echo "$1" | tr ';' '\n' | grep -v '^$' | awk '{print $1}') \
                       <(echo "$2" | tr ';' '\n' | grep -v '^$' | awk '{print $1}') |
           awk '{ printf "%.2f\n", $1 / $2 }')
  printf "%s (%s)" "$(echo "$ratios" | sort -g | awk '{v[NR] = $1} END {print v[int((NR + 1) / 2)]}')" \
    "$(echo "$ratios" | paste -sd/ | sed 's#/# / #g')"
}
echo
fifth="× nginx key-auth: median (per round)"
if [ -n "${RATE:-}" ]; then
  fifth="p99.9 ms"
  echo "oha -z $DURATION -q $RATE -c $CONNECTIONS --latency-correction (open loop), one key of $NKEYS, 2 s wrk warm-up, $ROUNDS interleaved rounds, medians"
else
  echo "wrk -t$THREADS -c$CONNECTIONS -d$DURATION --latency, 2 s warm-up, $ROUNDS interleaved rounds, medians; keys drawn from $NKEYS"
fi
echo
echo "| scenario | req/s | p50 ms | p99 ms | $fifth | non-2xx / socket errors (all rounds) | gateway CPU µs/req (user + system) | upstream CPU µs/req |"
echo "|---|---|---|---|---|---|---|---|"
for s in $SCENARIOS; do
  rps=$(echo "${RESULTS[$s]}" | median 1)
  p50=$(echo "${RESULTS[$s]}" | median 2)
  p99=$(echo "${RESULTS[$s]}" | median 3)
  bad="$(echo "${RESULTS[$s]}" | total 4) / $(echo "${RESULTS[$s]}" | total 7)"
  cpu="$(echo "${RESULTS[$s]}" | median 5) ($(echo "${RESULTS[$s]}" | median 8) + $(echo "${RESULTS[$s]}" | median 9))"
  upstream_cpu=$(echo "${RESULTS[$s]}" | median 10)
  ratio=$(round_ratios "${RESULTS[$s]}" "${RESULTS[c]:-}")
  [ -n "${RATE:-}" ] && ratio=$(echo "${RESULTS[$s]}" | median 11)
  printf "| %s. %s | %.0f | %.2f | %.2f | %s | %s | %s | %s |\n" "$s" "${NAME[$s]}" "$rps" "$p50" "$p99" "$ratio" "$bad" "$cpu" "$upstream_cpu"
done
# Like with like: keyward's proxy against nginx and HAProxy doing its whole job, per round
# (and j × k: keyward without the token against nginx sending one); the PGO build against
# the plain one and against k and l.
gap=echo
for pair in "b k" "b l" "j k" "m b" "n e" "m k" "m l"; do
  set -- $pair
  if [ -n "${RESULTS[$1]:-}" ] && [ -n "${RESULTS[$2]:-}" ] && [ -z "${RATE:-}" ]; then
    $gap; gap=:
    echo "$1 × $2 (median, per round): $(round_ratios "${RESULTS[$1]}" "${RESULTS[$2]}")"
  fi
done
if [[ " $SCENARIOS " == *" f "* ]]; then
  # What the limit windows of every f round hold in Redis (the hour window keeps them all).
  mem=$(redis-cli -p 19005 info memory | tr -d '\r' | awk -F: '/^used_memory_human:/ {u=$2} /^used_memory_peak_human:/ {p=$2} END {print u " (peak " p ")"}')
  echo
  echo "Redis after the f rounds: used_memory $mem, $(redis-cli -p 19005 dbsize | tr -d '\r') keys"
  # Redis' own CPU, and how many decisions keyward sent per script run (its batches).
  batch=$(curl -s http://127.0.0.1:19014/metrics | awk '/^keyward_ratelimit_redis_runs_total/ {r=$2} /^keyward_ratelimit_redis_decisions_total/ {d=$2} END {if (r) printf "%.1f", d / r}')
  echo "Redis CPU per f request (median of rounds): $(echo "${RESULTS[f]}" | median 6) µs; decisions per script run: $batch"
fi
