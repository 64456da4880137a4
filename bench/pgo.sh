#!/usr/bin/env bash
# A profile-guided (PGO) release build of keyward, in three steps: a build instrumented to
# count which branches and calls run; a training load on it (bench/run.sh's proxy,
# forward-auth, Redis and PostgreSQL scenarios, one 6 s round each, so the counts are those
# of a gateway under load); the release build again, with LLVM laying out and inlining code
# by those counts. Needs llvm-profdata from rustup's llvm-tools component (added when
# missing) and what bench/run.sh installs. Prints the binary's path on stdout; bench/run.sh
# measures it beside the plain build with PGO_BIN=<path> (scenarios m and n).
# Usage: bench/pgo.sh   (PGO_DIR=target/pgo to change where the builds and profiles go).
# Takes ~11 minutes on 2 cores the first time (two builds from scratch and the training),
# ~5 when the instrumented build is still current (the final build always starts afresh).
# Nothing checks that the profile matched the code: a profile that matches nothing gives a
# binary like the plain one (`bench/callgrind.sh` with BENCH_BIN tells them apart).
set -euo pipefail
cd "$(dirname "$0")/.."
HOST=$(rustc -vV | awk '/^host:/ {print $2}')
DIR=$(realpath -m "${PGO_DIR:-target/pgo}")
PROFDATA="$(rustc --print sysroot)/lib/rustlib/$HOST/bin/llvm-profdata"
[ -x "$PROFDATA" ] || rustup component add llvm-tools >&2

# An explicit --target keeps the flags off build scripts and proc macros (their profiles
# would mix with keyward's), and gives both builds the same symbol names, by which the
# profile is matched.
build() { # rustflags target-dir (added to the caller's RUSTFLAGS, so both builds differ only in them)
  RUSTFLAGS="${RUSTFLAGS:-} $1" CARGO_TARGET_DIR="$2" cargo build --release -p keyward --target "$HOST" >&2
}
rm -rf "$DIR/profiles"
build "-Cprofile-generate=$DIR/profiles/raw" "$DIR/generate"
# The instrumented binary writes its counts when it exits, which bench/run.sh's SIGTERM allows.
# The load is pinned: a caller's RATE (open loop, one key) or NKEYS must not shape the profile.
env -u RATE -u PGO_BIN BENCH_BIN="$DIR/generate/$HOST/release/keyward" SCENARIOS="b j e f g" \
  ROUNDS=1 DURATION=6s NKEYS=10000 CONNECTIONS=64 THREADS=2 bench/run.sh > "$DIR/training.txt"
"$PROFDATA" merge -o "$DIR/profiles/merged.profdata" "$DIR/profiles/raw"
# A path of the content's own changes the flags with every new profile, and cargo always
# rebuilds every crate for new flags; whether it would notice a changed file behind the same
# flags in every crate was not checked, so nothing relies on it.
profile="$DIR/profiles/keyward-$(sha256sum "$DIR/profiles/merged.profdata" | cut -c1-16).profdata"
mv "$DIR/profiles/merged.profdata" "$profile"
build "-Cprofile-use=$profile" "$DIR/use"
echo "$DIR/use/$HOST/release/keyward"
