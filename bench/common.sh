# Shared by the benchmark scripts: installing what is missing, the nginx upstream, waiting for
# a port, and keyward's benchmark configuration (the /bench/ route to the nginx upstream on
# 19000, limits too high to trigger). The functions expect RUN and a `pids` array.

install_missing() { # command:debian-package ... — installs the packages whose command is missing
  local missing=() pair
  for pair in "$@"; do command -v "${pair%%:*}" >/dev/null || missing+=("${pair#*:}"); done
  if [ ${#missing[@]} -gt 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  fi
}

start_upstream() { # the nginx `return 200` upstream on 19000; its master's pid in upstream_pid
  sed "s#__RUN__#$RUN#g" bench/nginx-upstream.conf > "$RUN/upstream.conf"
  nginx -c "$RUN/upstream.conf" -p "$RUN" & pids+=($!); upstream_pid=$!
  wait_port 19000
}

wait_port() { for _ in $(seq 1 200); do (echo >/dev/tcp/127.0.0.1/$1) 2>/dev/null && return 0; sleep 0.05; done; echo "port $1 did not open" >&2; exit 1; }

keyward_config() { # listen internal [redis-url] [store-url]; KW_SERVER_EXTRA: more [server] lines
  local backend=memory
  [ -n "${3:-}" ] && backend=redis
  cat <<CFG
[server]
listen = "127.0.0.1:$1"
internal_listen = "127.0.0.1:$2"
data_dir = "$RUN/kw-data"
${KW_SERVER_EXTRA:-}
[store]
url = "${4:-sqlite://$RUN/kw/keyward.db}"
[ratelimit]
backend = "$backend"
${3:+url = \"$3\"}
[ratelimit.tiers.free]
per_minute = 1000000000
per_hour = 1000000000
[log]
level = "warn"
[[routes]]
name = "bench"
path = "/bench/"
upstream = "http://127.0.0.1:19000"
scopes = ["inference"]
strip_prefix = true
CFG
}

bench_workspace() { # NAME → RUN, a fresh directory, and pids, every process in it stopped on exit
  RUN=$(mktemp -d "/tmp/keyward-$1.XXXXXX")
  pids=()
  trap cleanup EXIT
}

cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }

keyward_binary() { # BIN: the saved build BENCH_BIN names (an A/B), or a fresh release build
  if [ -n "${BENCH_BIN:-}" ]; then BIN=$(realpath "$BENCH_BIN"); else
    cargo build --release -p keyward >&2
    BIN=$PWD/target/release/keyward
  fi
}

gateway_maps() { # keyward's HOST:PORT → the maps the nginx and HAProxy setups read, in $RUN
  # Key → key id: the upstream learns who called, as keyward's X-Keyward-Key-Id tells it.
  paste -d' ' "$RUN/keys.txt" "$RUN/keys.txt.ids" | awk '{print "\"Bearer " $1 "\" " $2 ";"}' > "$RUN/nginx-keys.map"
  paste -d' ' "$RUN/keys.txt" "$RUN/keys.txt.ids" > "$RUN/haproxy-keys.map"
  # Each key's identity as keyward sends it, for the whole-job setups (k, l).
  python3 bench/identity_maps.py "$1" "$RUN/keys.txt" "$RUN"
}

start_keyward_with_keys() { # N → keyward (memory limits) on 19001 with N keys in $RUN/keys.txt; its pid in kw
  mkdir -p "$RUN/kw"
  keyward_config 19001 19011 > "$RUN/kw/keyward.toml"
  (cd "$RUN/kw" && exec "$BIN" serve > out.log 2> err.log) & pids+=($!)
  kw=$!
  wait_port 19001
  python3 bench/make_keys.py 127.0.0.1:19001 "$(grep -E '^kw_' "$RUN/kw/err.log")" "$1" "$RUN/keys.txt"
}
