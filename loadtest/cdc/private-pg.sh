# Sourced by the change-stream benches: a private PostgreSQL (initdb and
# pg_ctl in a temp dir, as the postgres user when root) with the workshop
# schema, on a free loopback port; stopped and removed on exit with every
# process listed in `pids`. Sets WORK, PGBIN, DB, pids, and defines
# free_port, as_pg and psql.
PGBIN=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)
WORK=$(mktemp -d "/tmp/${BENCH_NAME:-fanout-bench}.XXXXXX")
chmod 755 "$WORK"
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
as_pg() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }
[ "$(id -u)" = 0 ] && chown postgres "$WORK"
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  as_pg "$PGBIN/pg_ctl" -D "$WORK/pg" -m immediate stop >/dev/null 2>&1 || true
  rm -rf "$WORK"
}
trap cleanup EXIT
PGPORT=$(free_port)
as_pg "$PGBIN/initdb" -D "$WORK/pg" -U postgres --auth=trust -E UTF8 --no-sync --locale=C >/dev/null
as_pg "$PGBIN/pg_ctl" -D "$WORK/pg" -l "$WORK/pg.log" -w -o "-p $PGPORT -k $WORK -c listen_addresses=127.0.0.1 \
  -c wal_level=logical -c max_wal_senders=10 -c max_replication_slots=10 -c shared_buffers=256MB" start >/dev/null
DB="postgres://postgres@127.0.0.1:$PGPORT/postgres"
psql() { command psql -X -q -v ON_ERROR_STOP=1 -At -d "$DB" "$@"; }
psql -f deploy/sql/workshop.sql
