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

keyward_config() { # listen internal [redis-url] [store-url]
  local backend=memory
  [ -n "${3:-}" ] && backend=redis
  cat <<CFG
[server]
listen = "127.0.0.1:$1"
internal_listen = "127.0.0.1:$2"
data_dir = "$RUN/kw-data"
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
