#!/usr/bin/env bash
# Membership sets (issue 19) through the cluster: a private PostgreSQL,
# a private nats-server -js, `fanout cdc` mirroring workshop_participants
# into the NATS bucket and two `fanout edge`s deciding member.workshops
# rules from it, all on free loopback ports.
#
#   cargo build --release -p fanout && (cd tests/js && npm ci)
#   bash loadtest/cdc/members-bench.sh [rounds] [million_rows]
#
# 1. Latency (loadtest/cdc/members-latency.mjs): a membership change to its
#    effect on both edges, against commit to delivery of an ordinary change,
#    side by side, `rounds` times.
# 2. Scale: `million_rows` (default 1) million membership rows (100,000
#    users per million, 10 workshops each): the ingester's start-up (the
#    snapshot read and the bucket written) and its RSS, and an edge's time to
#    load the mirror and its RSS against an edge without membership sets.
set -euo pipefail
cd "$(dirname "$0")/../.."
ROUNDS=${1:-30}
MILLIONS=${2:-1}
BIN=${FANOUT_BIN:-target/release/fanout}
BENCH_NAME=fanout-members-bench
. loadtest/cdc/private-pg.sh
NPORT=$(free_port); CADMIN=$(free_port)
USER_ID=6f1c2a9e-0d4b-4b8e-9a51-7c3e2f1d0a42
psql -c "INSERT INTO workshop_sessions (id, title) SELECT g, 'w' || g FROM generate_series(1, 10) g" \
  -c "INSERT INTO workshop_participants (session_id, user_id, display_name) VALUES (1, '$USER_ID', 'bench')"

nats-server -a 127.0.0.1 -p "$NPORT" -js -sd "$WORK/nats" >/dev/null 2>&1 &
pids+=($!)
SECRET=members-bench-secret-at-least-32-bytes
ROUTES='public.workshop_participants=workshop:{session_id},public.workshop_activities=workshop:{session_id}'
SETS="{workshops = {table = 'public.workshop_participants', user = 'user_id', value = 'session_id'}}"
RULES=(--jwt-secret "$SECRET" --auth-memberships "$SETS"
  --auth-tables "{'public.workshop_activities' = {read = 'session_id in member.workshops'}}"
  --auth-channels "[{pattern = 'workshop:{id}', read = '{id} in member.workshops'}]")
metric() { curl -fs "http://127.0.0.1:$1/metrics" | awk -v m="$2" '$1==m {print $2}'; }
rss_kb() { awk '/VmRSS/ {print $2}' "/proc/$1/status"; }
start_cdc() {
  RUST_LOG=warn "$BIN" cdc --nats-url "nats://127.0.0.1:$NPORT" --database-url "$DB" --cdc-routes "$ROUTES" \
    --auth-memberships "$SETS" --admin-listen "127.0.0.1:$CADMIN" &
  CDC=$!
  pids+=($CDC)
  for _ in $(seq 1 6000); do [ "$(metric "$CADMIN" fanout_cdc_active 2>/dev/null)" = 1 ] && return; sleep 0.05; done
  echo "cdc did not become active" >&2; exit 1
}
start_edge() { # var-prefix, extra args...
  local port admin
  port=$(free_port); admin=$(free_port)
  RUST_LOG=warn "$BIN" edge --nats-url "nats://127.0.0.1:$NPORT" --postgres-changes true --cdc-routes "$ROUTES" \
    --listen "127.0.0.1:$port" --admin-listen "127.0.0.1:$admin" "${@:2}" &
  pids+=($!)
  eval "$1_PID=$! $1_PORT=$port $1_ADMIN=$admin"
  for _ in $(seq 1 100); do curl -fs "http://127.0.0.1:$admin/readyz" >/dev/null && break; sleep 0.1; done
}

echo "== machine: $(nproc) cores, $(free -g | awk '/Mem/ {print $2}') GiB; PostgreSQL $(psql -c 'show server_version'); nats-server $(nats-server --version)"
start_cdc
start_edge E1 "${RULES[@]}"
start_edge E2 "${RULES[@]}"
echo "== latency, $ROUNDS rounds (ms from the statement to its effect on both edges)"
node loadtest/cdc/members-latency.mjs "$DB" "ws://127.0.0.1:$E1_PORT/realtime/v1" "ws://127.0.0.1:$E2_PORT/realtime/v1" \
  "$SECRET" "$USER_ID" 1 "$ROUNDS"

echo "== scale: ${MILLIONS} million membership rows"
kill "$CDC" "$E1_PID" "$E2_PID"; wait "$CDC" "$E1_PID" "$E2_PID" 2>/dev/null || true
USERS=$((MILLIONS * 100000))
psql -c "INSERT INTO workshop_participants (session_id, user_id, display_name)
  SELECT s, md5('u' || u)::uuid, 'u' FROM generate_series(1, $USERS) u, generate_series(1, 10) s ON CONFLICT DO NOTHING"
ROWS=$(psql -c "SELECT count(*) FROM workshop_participants")
t0=$(date +%s.%N)
start_cdc
t1=$(date +%s.%N)
echo "ingester: $ROWS rows loaded (snapshot + bucket) and streaming in $(python3 -c "print(f'{$t1-$t0:.2f}')") s; RSS $(( $(rss_kb "$CDC") / 1024 )) MiB"
t0=$(date +%s.%N)
start_edge M "${RULES[@]}"
for _ in $(seq 1 6000); do
  [ "$(metric "$M_ADMIN" fanout_members_rows 2>/dev/null | cut -d. -f1)" = "$ROWS" ] && break; sleep 0.05
done
t1=$(date +%s.%N)
start_edge P --jwt-secret "$SECRET"
sleep 1
m_rss=$(rss_kb "$M_PID"); p_rss=$(rss_kb "$P_PID")
echo "edge: mirror of $(metric "$M_ADMIN" fanout_members_rows) rows loaded in $(python3 -c "print(f'{$t1-$t0:.2f}')") s; \
RSS $((m_rss / 1024)) MiB against $((p_rss / 1024)) MiB without membership sets = \
$(python3 -c "print(f'{($m_rss-$p_rss)*1024/$ROWS:.0f}')") bytes per row"
