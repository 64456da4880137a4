#!/usr/bin/env bash
# Memory latency by working-set size (bench/memlat.c): how much per-key data this machine keeps
# close to the core. Usage: bench/memlat.sh [MEGABYTES...]   (default 1 2 4 8 16 32 64 256)
set -euo pipefail
cd "$(dirname "$0")/.."
out=$(mktemp /tmp/keyward-memlat.XXXXXX)
trap 'rm -f "$out"' EXIT
gcc -O2 -o "$out" bench/memlat.c
if [ $# -eq 0 ]; then set -- 1 2 4 8 16 32 64 256; fi
"$out" "$@"
