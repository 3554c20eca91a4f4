#!/usr/bin/env bash
# Side by side: fanout's Socket.IO endpoint (standalone, /socket.io/) and the
# real Socket.IO 4.8 server (loadtest/socketio/server.mjs: npm socket.io, its
# default ws engine, one Node process), driven by the same load client in
# alternating runs, on this machine:
#   - fanout scenario: <subs> subscribers of one room, <rate> msg/s published
#     through POST /api/v1/publish (fanout's server API; the peer serves the
#     same route and emits to the room): server CPU per delivery and p99;
#   - idle scenario: <idle> joined connections held: RSS per idle connection.
#
#   bash loadtest/socketio-bench.sh [rounds] [subs] [rate] [idle]
#
# Needs target/release/{fanout,fanout-loadtest} (cargo build --release -p
# fanout -p fanout-loadtest) and Node.js; installs the peer's npm package.
# Prints one line per run, then per figure the median of each server and
# the ratio fanout / socket.io.
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-3} subs=${2:-5000} rate=${3:-10} idle=${4:-10000}
fanout=target/release/fanout lt=target/release/fanout-loadtest
out=$(mktemp -d /tmp/fanout-sio.XXXXXX)
port=4710 admin=9810 api=9811
key=socketio-bench-api-key-0123456789

[ -d loadtest/socketio/node_modules/socket.io ] \
  || (cd loadtest/socketio && npm ci --no-audit --no-fund --loglevel=error)

start() { # server → pid on stdout
  case $1 in
    fanout)
      FANOUT_API_KEYS=$key "$fanout" standalone --listen 127.0.0.1:$port --admin-listen 127.0.0.1:$admin \
        --api-listen 127.0.0.1:$api --max-connections 200000 >"$out/$2.server.log" 2>&1 &
      echo $!
      for _ in $(seq 100); do curl -sf "http://127.0.0.1:$admin/readyz" >/dev/null && break; sleep 0.1; done ;;
    socketio)
      node loadtest/socketio/server.mjs $port >"$out/$2.server.log" 2>&1 &
      echo $!
      for _ in $(seq 100); do grep -q ready "$out/$2.server.log" 2>/dev/null && break; sleep 0.1; done ;;
  esac
}

run() { # server scenario tag
  local server=$1 scenario=$2 tag=$3 dir="$out/$3" pid api_url
  pid=$(start "$server" "$tag")
  api_url=http://127.0.0.1:$api
  [ "$server" = socketio ] && api_url=http://127.0.0.1:$port
  case $scenario in
    fanout) "$lt" --target socketio --scenario fanout --url ws://127.0.0.1:$port --users "$subs" --rate "$rate" \
              --duration 20 --api-url "$api_url" --api-key $key --server-pid "$pid" --report "$dir" >"$out/$tag.log" 2>&1 ;;
    idle)   "$lt" --target socketio --scenario idle --url ws://127.0.0.1:$port --users "$idle" \
              --duration 10 --server-pid "$pid" --report "$dir" >"$out/$tag.log" 2>&1 ;;
  esac
  kill "$pid"; wait "$pid" 2>/dev/null || true
  sleep 2
  echo "$tag $(python3 loadtest/figure.py "$dir/report.json" server_cpu_us_per_delivery p99 server_rss_per_connection_bytes lost)"
}

for scenario in fanout idle; do
  for i in $(seq "$rounds"); do
    if (( i % 2 )); then order="fanout socketio"; else order="socketio fanout"; fi
    for who in $order; do run "$who" "$scenario" "$scenario-$who-$i"; done
  done
done | tee "$out/summary.txt"

python3 - "$out/summary.txt" <<'PY'
import sys, statistics
rows = [l.split() for l in open(sys.argv[1])]
def vals(prefix, key):
    out = []
    for r in rows:
        kv = dict(x.split("=", 1) for x in r[1:])
        if r[0].startswith(prefix) and kv.get(key) not in (None, "None"):
            out.append(float(kv[key]))
    return out
for scenario, key in (("fanout", "server_cpu_us_per_delivery"), ("fanout", "p99"), ("idle", "server_rss_per_connection_bytes")):
    f, s = vals(f"{scenario}-fanout-", key), vals(f"{scenario}-socketio-", key)
    if f and s:
        mf, ms = statistics.median(f), statistics.median(s)
        print(f"{key}: fanout median {mf:.2f} {f}  socket.io median {ms:.2f} {s}  fanout/socket.io = {mf/ms:.3f}")
PY
echo "reports in $out"
