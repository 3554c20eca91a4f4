#!/usr/bin/env bash
# CDC benchmark: a private PostgreSQL (initdb/pg_ctl in a temp dir, run as
# the postgres user when root), a private nats-server -js, `fanout cdc` and a
# `fanout edge`, all on free loopback ports; nothing touches system services.
#
#   cargo build --release -p fanout && (cd tests/js && npm ci)
#   bash loadtest/cdc/bench.sh [backlog_rows] [rate_per_s] [seconds]
#
# 1. Ingest rate, WAL -> JetStream ack: with the ingester stopped, write
#    `backlog_rows` rows (500 per transaction, and again one row per
#    transaction), start it, and time until every change is acknowledged
#    (fanout_cdc_changes_published_total). This measures the ingester, not
#    how fast Postgres accepts writes.
# 2. Commit-to-client latency at `rate_per_s` changes/s for `seconds`: a
#    writer commits 10-row transactions every 10 ms; a client on the edge
#    (loadtest/cdc/latency.mjs) records receive time - commit_timestamp.
set -euo pipefail
cd "$(dirname "$0")/../.."
ROWS=${1:-200000}
RATE=${2:-1000}
SECS=${3:-30}
BIN=${FANOUT_BIN:-target/release/fanout}
BENCH_NAME=fanout-cdc-bench
. loadtest/cdc/private-pg.sh
NPORT=$(free_port); CADMIN=$(free_port); EPORT=$(free_port); EADMIN=$(free_port)
psql -c "INSERT INTO workshop_sessions (id, title) VALUES (1, 'bench'), (2, 'latency')"

nats-server -a 127.0.0.1 -p "$NPORT" -js -sd "$WORK/nats" >/dev/null 2>&1 &
pids+=($!)
ROUTES='public.workshop_participants=workshop:{session_id},public.workshop_activities=workshop:{session_id},public.workshop_stage_submissions=workshop:{session_id}'
COMMON=(--nats-url "nats://127.0.0.1:$NPORT" --database-url "$DB" --cdc-routes "$ROUTES")
metric() { curl -fs "http://127.0.0.1:$1/metrics" | awk -v m="$2" '$1==m {print $2}'; }
start_cdc() {
  RUST_LOG=warn "$BIN" cdc "${COMMON[@]}" --admin-listen "127.0.0.1:$CADMIN" &
  CDC=$!
  pids+=($CDC)
  for _ in $(seq 1 300); do [ "$(metric "$CADMIN" fanout_cdc_active 2>/dev/null)" = 1 ] && return; sleep 0.05; done
  echo "cdc did not become active" >&2; exit 1
}
published() { metric "$CADMIN" fanout_cdc_changes_published_total 2>/dev/null || echo 0; }

backlog_run() { # $1 rows per transaction
  local per=$1
  start_cdc; kill "$CDC"; wait "$CDC" 2>/dev/null || true
  if [ "$per" -gt 1 ]; then
    psql -c "DO \$\$ BEGIN FOR t IN 0..$((ROWS / per - 1)) LOOP
      INSERT INTO workshop_activities (session_id, kind, seq) SELECT 1, 'bench', g FROM generate_series(t*$per, t*$per+$per-1) g;
      COMMIT; END LOOP; END \$\$"
  else
    psql -c "DO \$\$ BEGIN FOR g IN 0..$((ROWS - 1)) LOOP
      INSERT INTO workshop_activities (session_id, kind, seq) VALUES (1, 'bench', g); COMMIT; END LOOP; END \$\$"
  fi
  local t0 t1 n
  t0=$(date +%s.%N)
  start_cdc
  while :; do
    n=$(published); n=${n%.*}
    [ "${n:-0}" -ge "$ROWS" ] && break
    sleep 0.02
  done
  t1=$(date +%s.%N)
  python3 -c "print(f'ingest, $per row(s)/transaction: $ROWS changes in {($t1-$t0):.2f} s (incl. connect) = {$ROWS/($t1-$t0):,.0f} changes/s')"
  kill "$CDC"; wait "$CDC" 2>/dev/null || true
}

echo "== machine: $(nproc) cores, $(free -g | awk '/Mem/ {print $2}') GiB; PostgreSQL $(psql -c 'show server_version'); nats-server $(nats-server --version)"
backlog_run 500
backlog_run 1

start_cdc
RUST_LOG=warn "$BIN" edge --nats-url "nats://127.0.0.1:$NPORT" --postgres-changes true --cdc-routes "$ROUTES" \
  --listen "127.0.0.1:$EPORT" --admin-listen "127.0.0.1:$EADMIN" &
pids+=($!)
for _ in $(seq 1 100); do curl -fs "http://127.0.0.1:$EADMIN/readyz" >/dev/null && break; sleep 0.1; done
TOTAL=$((RATE * SECS))
node loadtest/cdc/latency.mjs "ws://127.0.0.1:$EPORT/realtime/v1" 2 "$((SECS + 5))" "$TOTAL" > "$WORK/latency.json" &
LAT=$!
sleep 1
ITER=$((TOTAL / 10))
SLEEP=$(python3 -c "print(10 / $RATE)")
start=$(date +%s.%N)
psql -c "DO \$\$ DECLARE t0 timestamptz := clock_timestamp(); BEGIN FOR t IN 0..$((ITER - 1)) LOOP
  INSERT INTO workshop_activities (session_id, kind, seq) SELECT 2, 'live', g FROM generate_series(t*10, t*10+9) g;
  COMMIT;
  PERFORM pg_sleep(greatest(0, extract(epoch FROM (t0 + (t + 1) * interval '$SLEEP seconds' - clock_timestamp()))));
  END LOOP; END \$\$"
end=$(date +%s.%N)
wait "$LAT"
python3 -c "print(f'writer: $TOTAL changes in {($end-$start):.1f} s = {$TOTAL/($end-$start):,.0f} changes/s')"
echo "latency (commit -> client, ms; commit_timestamp has ms precision): $(cat "$WORK/latency.json")"
