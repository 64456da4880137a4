# Shared by the benchmark scripts: waiting for a port, and keyward's benchmark configuration
# (the /bench/ route to the nginx upstream on 19000, limits too high to trigger). Expects RUN.

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
