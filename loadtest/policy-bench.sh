#!/usr/bin/env bash
# The cost of authorization, side by side in one run, same binary, same
# load client:
#
# 1. Row policies. Database changes delivered to 1,000 subscribers of one
#    workshop (workshop scenario, one facilitator writing activity rows, no
#    chat or typing), on a standalone fanout with its in-process ingester and
#    a private PostgreSQL. Once with the table's rule `public`, once with
#    `session_id in claims.workshops` (every subscriber's token lists the
#    workshop). Figure: server CPU per delivered change, rules / open.
#    A third run reads the workshop from a membership table instead:
#    `session_id in member.workshops`, the token carrying only its `sub`
#    and one workshop_participants row naming it (issue 19). Figure:
#    members / open.
# 2. Token verification. A connect storm (5,000 connections), once with an
#    HS256 apikey and once with an ES256 one, against a server that has both
#    keys. Figure: connects per second, ES256 / HS256.
#
#   bash loadtest/policy-bench.sh [rounds] [fanout-binary] [loadtest-binary]
#
# PARTS=rows runs only the row-policy part (PARTS=connects only the other).
#
# Rounds alternate the order (A B, then B A) so warm-up and drift fall on both.
set -euo pipefail
cd "$(dirname "$0")/.."
. loadtest/lib.sh
rounds=${1:-3}
fanout=${2:-target/release/fanout}
lt=${3:-target/release/fanout-loadtest}
out=$(mktemp -d /tmp/fanout-policy-bench.XXXXXX)
port=4691 admin=9791 pgport=54391
secret=policy-bench-secret-at-least-32-bytes
keys=crates/fanout-core/testdata/keys

pgbin=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)
pgdata=$out/pg
# PostgreSQL refuses to run as root: run it as the postgres user then.
as_pg=()
if [ "$(id -u)" = 0 ]; then as_pg=(runuser -u postgres --); chown postgres "$out"; fi
"${as_pg[@]}" "$pgbin/initdb" -D "$pgdata" -U postgres -A trust >/dev/null
"${as_pg[@]}" "$pgbin/pg_ctl" -D "$pgdata" -l "$pgdata.log" -w \
  -o "-p $pgport -k $out -c listen_addresses=127.0.0.1 -c wal_level=logical -c max_wal_senders=10 -c max_replication_slots=10" start >/dev/null
trap '"${as_pg[@]}" "$pgbin/pg_ctl" -D "$pgdata" -m fast stop >/dev/null 2>&1 || true' EXIT
db="postgres://postgres@127.0.0.1:$pgport/postgres"
psql -X -q -d "$db" -v ON_ERROR_STOP=1 -f deploy/sql/workshop.sql >/dev/null

open_tables="{'public.workshop_activities' = {read = 'public'}}"
rule_tables="{'public.workshop_activities' = {read = 'session_id in claims.workshops'}}"
member_tables="{'public.workshop_activities' = {read = 'session_id in member.workshops'}}"
memberships="{workshops = {table = 'public.workshop_participants', user = 'user_id', value = 'session_id'}}"
member=6f1c2a9e-0d4b-4b8e-9a51-7c3e2f1d0a42
parts=${PARTS:-all}
# The load tester's workshop is session 0; the member's row names it.
psql -X -q -d "$db" -v ON_ERROR_STOP=1 -c "INSERT INTO workshop_sessions (id, title) VALUES (0, 'bench') ON CONFLICT DO NOTHING" \
  -c "INSERT INTO workshop_participants (session_id, user_id, display_name) VALUES (0, '$member', 'bench') ON CONFLICT DO NOTHING" >/dev/null


start_server() { # log, extra args...
  local log=$1; shift
  FANOUT_JWT_SECRET=$secret "$fanout" --listen 127.0.0.1:$port --admin-listen 127.0.0.1:$admin "$@" >"$log" 2>&1 &
  pid=$!
  wait_ready "$admin"
}

stop_server() {
  kill "$pid"; wait "$pid" 2>/dev/null || true
  sleep 1
}

rows() { # tag tables [memberships]
  local tag=$1 tables=$2 sets=${3:-}
  local extra=() claims='{"workshops": [0]}'
  if [ -n "$sets" ]; then extra=(--auth-memberships "$sets"); claims="{\"sub\": \"$member\"}"; fi
  start_server "$out/$tag.server.log" --database-url "$db" --cdc-slot "bench_$RANDOM" --auth-tables "$tables" "${extra[@]}"
  for _ in $(seq 100); do curl -sf "http://127.0.0.1:$admin/metrics" | grep -q '^fanout_cdc_active 1$' && break; sleep 0.1; done
  FANOUT_JWT_SECRET=$secret "$lt" --scenario workshop --url ws://127.0.0.1:$port/realtime/v1 \
    --users 1000 --workshops 1 --chat-rate 0 --typing-rate 0 --database-url "$db" --activity-rate 600 \
    --jwt-claims "$claims" --duration 20 --server-pid "$pid" --report "$out/$tag" --quiet >"$out/$tag.log" 2>&1
  stop_server
  psql -X -q -d "$db" -c "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE NOT active" >/dev/null
  echo "$tag $(python3 loadtest/figure.py "$out/$tag/report.json" server_cpu_us_per_delivery messages_received lost)"
}

connects() { # tag key-flag...
  local tag=$1; shift
  start_server "$out/$tag.server.log" --auth-public-keys "ES256:$keys/ec.pub"
  FANOUT_JWT_SECRET=$secret "$lt" --scenario connect-storm --url ws://127.0.0.1:$port/realtime/v1 \
    --users 5000 --duration 5 --server-pid "$pid" --report "$out/$tag" --quiet "$@" >"$out/$tag.log" 2>&1
  stop_server
  echo "$tag $(python3 loadtest/figure.py "$out/$tag/report.json" connections_per_second)"
}

{
  for i in $(seq "$rounds"); do
    [ "$parts" = connects ] && break
    if (( i % 2 )); then order="open rule member"; else order="member rule open"; fi
    for who in $order; do
      case $who in
        open) rows "rows-open-$i" "$open_tables" ;;
        rule) rows "rows-rule-$i" "$rule_tables" ;;
        member) rows "rows-member-$i" "$member_tables" "$memberships" ;;
      esac
    done
  done
  for i in $(seq "$rounds"); do
    [ "$parts" = rows ] && break
    if (( i % 2 )); then order="hs es"; else order="es hs"; fi
    for who in $order; do
      if [ "$who" = hs ]; then connects "connect-hs256-$i"; else connects "connect-es256-$i" --jwt-es256-key "$keys/ec.key"; fi
    done
  done
} | tee "$out/summary.txt"

python3 - "$out/summary.txt" <<'PY'
import re, sys, statistics as st
vals = {}
for line in open(sys.argv[1]):
    tag, *kv = line.split()
    group = tag.rsplit('-', 1)[0]
    for x in kv:
        k, v = x.split('=')
        if k in ('server_cpu_us_per_delivery', 'connections_per_second') and v != 'None':
            vals.setdefault(group, []).append(float(v))
m = {g: st.mean(v) for g, v in vals.items()}
for g, v in sorted(m.items()):
    print(f"{g:<16} mean={v:.3f} runs={vals[g]}")
if 'rows-open' in m and 'rows-rule' in m:
    print(f"row rules: CPU per delivery rule/open = {m['rows-rule'] / m['rows-open']:.3f}")
if 'rows-open' in m and 'rows-member' in m:
    print(f"membership rules: CPU per delivery member/open = {m['rows-member'] / m['rows-open']:.3f}")
if 'connect-hs256' in m and 'connect-es256' in m:
    print(f"tokens: connects/s ES256/HS256 = {m['connect-es256'] / m['connect-hs256']:.3f}")
PY
echo "runs and logs in $out"
