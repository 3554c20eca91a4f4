#!/usr/bin/env bash
# Runs every fanout test on a fresh Debian/Ubuntu machine, installing what it
# needs first (idempotently): Node.js for the realtime-js protocol suite,
# Chromium for the browser test, nats-server and redis-server for cluster mode,
# the PostgreSQL server and client for the change stream (tests start private
# instances on free ports; Postgres clusters with initdb/pg_ctl in temp dirs),
# the npm packages the JS suites use, and the Helm chart's checkers (Go with
# Debian's sprig to render the chart without helm, kubernetes-validate in a
# venv, promtool and the prometheus server binary unpacked from Debian's
# prometheus package without installing it as a service; the chaos run
# starts a private Prometheus from it). Tests start
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
command -v go >/dev/null 2>&1 || need_apt+=(golang-go)
[ -d /usr/share/gocode/src/github.com/Masterminds/sprig ] || need_apt+=(golang-github-masterminds-sprig-dev)
[ -d /usr/share/gocode/src/sigs.k8s.io/yaml ] || need_apt+=(golang-k8s-sigs-yaml-dev)
[ -d /usr/share/gocode/src/github.com/xeipuuv/gojsonschema ] || need_apt+=(golang-github-xeipuuv-gojsonschema-dev)
python3 -c 'import venv, ensurepip' >/dev/null 2>&1 || need_apt+=(python3-venv)

helm_tools=target/helm

if [ "${FANOUT_SKIP_INSTALL:-0}" != 1 ]; then
  if [ ${#need_apt[@]} -gt 0 ]; then
    log "installing system packages: ${need_apt[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    apt-get install -y -q --no-install-recommends "${need_apt[@]}"
  fi
  log "installing npm packages for tests/js"
  (cd tests/js && npm ci --no-audit --no-fund --loglevel=error)
  mkdir -p "$helm_tools"
  if [ ! -x "$helm_tools/venv/bin/kubernetes-validate" ]; then
    log "installing kubernetes-validate (offline Kubernetes schemas) in $helm_tools/venv"
    python3 -m venv "$helm_tools/venv"
    "$helm_tools/venv/bin/pip" install -q kubernetes-validate==1.37.0
  fi
  if [ ! -x "$helm_tools/promtool" ] || [ ! -x "$helm_tools/prometheus" ]; then
    log "unpacking promtool and prometheus from Debian's prometheus package"
    rm -rf "$helm_tools/prometheus-deb" && mkdir -p "$helm_tools/prometheus-deb"
    # (a machine whose package lists were never fetched needs apt-get update first)
    (cd "$helm_tools/prometheus-deb" \
      && { apt-get download prometheus >/dev/null 2>&1 \
           || { apt-get update -q >/dev/null && apt-get download prometheus >/dev/null 2>&1; }; } \
      && dpkg-deb -x prometheus_*.deb root) \
      || { echo "could not unpack promtool from apt-get download prometheus" >&2; exit 1; }
    cp "$helm_tools/prometheus-deb/root/usr/bin/promtool" "$helm_tools/promtool"
    cp "$helm_tools/prometheus-deb/root/usr/bin/prometheus" "$helm_tools/prometheus"
  fi
fi

if ! cargo nextest --version >/dev/null 2>&1; then
  log "installing cargo-nextest"
  cargo install --locked cargo-nextest
fi

log "building the workspace (once; the tests reuse it)"
cargo build --workspace --all-targets --locked
log "building the Helm chart renderer (tests/helm/render.go, offline)"
GO111MODULE=off GOPATH=/usr/share/gocode GOPROXY=off GOCACHE="$PWD/$helm_tools/gocache" \
  go build -o "$helm_tools/render" tests/helm/render.go

log "running every test (unit, integration, realtime-js protocol suite, browser, Helm chart)"
cargo nextest run --workspace --locked --no-fail-fast
