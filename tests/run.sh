#!/usr/bin/env bash
# Runs every fanout test on a fresh Debian/Ubuntu machine, installing what it
# needs first (idempotently): Node.js for the realtime-js protocol suite,
# Chromium for the browser test, nats-server and redis-server for cluster mode,
# the PostgreSQL server and client for the change stream (tests start private
# instances on free ports; Postgres clusters with initdb/pg_ctl in temp dirs),
# and the npm packages the JS suites use. Tests start
# their own private servers on free loopback ports, so they never collide with
# system services.
#
#   bash tests/run.sh            # everything: build, unit, integration, protocol, browser
#
# Environment: FANOUT_SKIP_INSTALL=1 skips the apt/npm step (for quick local reruns).
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '\n==> %s\n' "$*"; }

need_apt=()
command -v node >/dev/null 2>&1 || need_apt+=(nodejs npm)
[ -x /usr/bin/chromium ] || need_apt+=(chromium)
command -v nats-server >/dev/null 2>&1 || [ -x /usr/sbin/nats-server ] || need_apt+=(nats-server)
command -v redis-server >/dev/null 2>&1 || need_apt+=(redis-server)
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || need_apt+=(postgresql)
command -v psql >/dev/null 2>&1 || need_apt+=(postgresql-client)

if [ "${FANOUT_SKIP_INSTALL:-0}" != 1 ]; then
  if [ ${#need_apt[@]} -gt 0 ]; then
    log "installing system packages: ${need_apt[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    apt-get install -y -q --no-install-recommends "${need_apt[@]}"
  fi
  log "installing npm packages for tests/js"
  (cd tests/js && npm ci --no-audit --no-fund --loglevel=error)
fi

if ! cargo nextest --version >/dev/null 2>&1; then
  log "installing cargo-nextest"
  cargo install --locked cargo-nextest
fi

log "building the workspace (once; the tests reuse it)"
cargo build --workspace --all-targets --locked

log "running every test (unit, integration, realtime-js protocol suite, browser)"
cargo nextest run --workspace --locked --no-fail-fast
