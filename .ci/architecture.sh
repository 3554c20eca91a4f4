#!/usr/bin/env bash
# The architecture invariants of ARCHITECTURE.md, checked on the dependency
# graph and the sources. Each rule fails loudly, and so does a rule whose own
# command fails (an empty or failed `cargo tree` is an error, not a pass).
set -euo pipefail
cd "$(dirname "$0")/.."

failed=0
fail() { echo "architecture rule broken: $*" >&2; failed=1; }

# The crates a package links (normal dependencies, features resolved for that
# package alone, as `cargo build -p` does), one name per line. $2 = --depth 1
# for direct dependencies only.
linked() {
  local out
  if ! out=$(cargo tree -p "$1" -e normal --locked --prefix none --format '{p}' ${2:+--depth "$2"} 2>&1); then
    echo "cargo tree -p $1 failed:" >&2
    echo "$out" >&2
    exit 2
  fi
  out=$(printf '%s\n' "$out" | awk 'NF {print $1}' | sort -u)
  if ! printf '%s\n' "$out" | grep -qx "$1"; then
    echo "cargo tree -p $1 did not list the package itself; cannot check its rules" >&2
    exit 2
  fi
  printf '%s\n' "$out"
}

# forbid <package> <why> <crate>...: none of the crates may be linked.
forbid() {
  local pkg=$1 why=$2
  shift 2
  local deps
  deps=$(linked "$pkg")
  for c in "$@"; do
    if printf '%s\n' "$deps" | grep -qx "$c"; then
      fail "$pkg links $c ($why); see: cargo tree -p $pkg -e normal -i $c"
    fi
  done
}

postgres=(tokio-postgres postgres pgwire-replication sqlx)
runtimes=(tokio async-std smol)
servers=(fanout-edge fastwebsockets)

forbid fanout-core "fanout-core does no I/O and starts no tasks" "${runtimes[@]}" hyper async-nats redis "${postgres[@]}"
forbid fanout-proto "generated types and their conversions do no I/O" "${runtimes[@]}" async-nats redis "${postgres[@]}" tonic
forbid fanout-bus "the seams hold no client sockets and never talk to PostgreSQL" "${servers[@]}" hyper tonic redis "${postgres[@]}"
forbid fanout-edge "the edge never talks to PostgreSQL" "${postgres[@]}" redis tonic
forbid fanout-cdc "the ingester serves no clients" "${servers[@]}" hyper tonic redis
forbid fanout-presence "presence serves gRPC only and never talks to PostgreSQL" "${servers[@]}" "${postgres[@]}"
forbid fanout-api "the server API goes through the seams: no client sockets, no PostgreSQL, no Redis of its own" "${servers[@]}" "${postgres[@]}" redis
# Presence's gRPC server brings hyper through tonic; it must not use hyper itself.
if linked fanout-presence 1 | grep -qx hyper; then
  fail "fanout-presence depends on hyper directly (its only server is tonic's gRPC)"
fi

# Generated protobuf types stop at fanout-proto, except where a gRPC service
# is served (fanout-presence's api module, fanout-api's grpc module) and in
# the tests and load tester that call them.
allowed='^(crates/fanout-proto/|crates/fanout-presence/src/api\.rs:|crates/fanout-api/src/grpc\.rs:|crates/fanout-api/examples/|tests/|loadtest/)'
if ! users=$(grep -rn --include='*.rs' 'fanout_proto::v1' crates loadtest tests); then
  users=""
fi
stray=$(printf '%s\n' "$users" | grep -v '^$' | grep -Ev "$allowed" || true)
if [ -n "$stray" ]; then
  fail "generated protobuf types used outside fanout-proto and the gRPC api module:"$'\n'"$stray"
fi

if [ "$failed" != 0 ]; then
  exit 1
fi
echo "architecture rules hold"
