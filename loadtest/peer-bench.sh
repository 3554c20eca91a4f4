#!/usr/bin/env bash
# Side by side: fanout (standalone) and a peer server, driven by the same
# load client in alternating runs, on this machine:
#   - fanout scenario: <subs> subscribers of one channel (or spread over
#     $CHANNELS channels), <rate> msg/s per channel, one HTTP publish per
#     message: server CPU per delivery and p99;
#   - idle scenario: <idle> subscribed connections held: RSS per connection.
#
#   bash loadtest/peer-bench.sh socketio [rounds] [subs] [rate] [idle]
#   bash loadtest/peer-bench.sh uws      [rounds] [subs] [rate] [idle]
#   bash loadtest/peer-bench.sh nchan    [rounds] [subs] [rate] [idle]
#   CHANNELS=50 bash loadtest/peer-bench.sh uws ...   (many channels)
#
# Peers (each installs its npm package on first use):
#   socketio  the Socket.IO 4.8 server (loadtest/socketio/server.mjs: npm
#             socket.io, ws engine, one Node process) against fanout's
#             /socket.io/ endpoint; both sides speak Socket.IO (--target
#             socketio: CONNECT, join with an ack) and are published to with
#             POST /api/v1/publish (fanout's server API; the peer's route of
#             the same shape);
#   uws       uWebSockets.js's own pub/sub (loadtest/uws/server.mjs, one Node
#             process, nchan's URL scheme: --target nchan) against fanout's
#             Supabase endpoint with vsn 1.0.0 JSON frames, published to with
#             POST /api/v1/publish.
#   nchan     nginx with nchan (Debian's nginx and libnginx-mod-nchan,
#             installed with apt-get if missing; loadtest/nchan/nginx.conf,
#             2 workers, both measured), the same client and fanout side as
#             uws.
#
# Needs target/release/{fanout,fanout-loadtest} and Node.js 20. Prints one
# line per run, then per figure the median of each server and the ratio
# fanout / peer.
set -euo pipefail
cd "$(dirname "$0")/.."
. loadtest/lib.sh
peer=${1:?usage: peer-bench.sh socketio|uws [rounds] [subs] [rate] [idle]}
rounds=${2:-3} subs=${3:-5000} rate=${4:-10} idle=${5:-10000} channels=${CHANNELS:-1}
fanout=target/release/fanout lt=target/release/fanout-loadtest
out=$(mktemp -d /tmp/fanout-peer.XXXXXX)
port=4710 admin=9810 api=9811
key=peer-bench-api-key-0123456789

case $peer in
  socketio | uws)
    [ -d "loadtest/$peer/node_modules" ] || (cd "loadtest/$peer" && npm ci --no-audit --no-fund --loglevel=error) ;;
  nchan)
    [ -f /usr/lib/nginx/modules/ngx_nchan_module.so ] ||
      DEBIAN_FRONTEND=noninteractive apt-get install -y -q nginx-light libnginx-mod-nchan >/dev/null ;;
  *) echo "unknown peer $peer (socketio, uws or nchan)" >&2; exit 64 ;;
esac

# A failed run must not leave its server holding the port.
current=
trap '[ -z "$current" ] || stop "$current"' EXIT

start() { # server tag → the pid to stop, then the pids to measure (comma-separated)
  case $1 in
    nchan)
      local dir="$out/$2.nginx"
      mkdir -p "$dir/logs" "$dir/body"
      sed -e "s|/tmp/fanout-nchan|$dir|g" -e "s|127.0.0.1:4680|127.0.0.1:$port|" loadtest/nchan/nginx.conf >"$dir/nginx.conf"
      nginx -c "$dir/nginx.conf" -p "$dir/" >"$out/$2.server.log" 2>&1
      for _ in $(seq 100); do [ -s "$dir/nginx.pid" ] && [ "$(pgrep -P "$(cat "$dir/nginx.pid")" | wc -l)" -ge 2 ] && break; sleep 0.1; done
      echo "$(cat "$dir/nginx.pid") $(pgrep -P "$(cat "$dir/nginx.pid")" | paste -sd,)" ;;
    fanout)
      FANOUT_API_KEYS=$key "$fanout" standalone --listen 127.0.0.1:$port --admin-listen 127.0.0.1:$admin \
        --api-listen 127.0.0.1:$api --max-connections 200000 >"$out/$2.server.log" 2>&1 &
      echo "$! $!"
      wait_ready "$admin" ;;
    *)
      node "loadtest/$1/server.mjs" $port >"$out/$2.server.log" 2>&1 &
      echo "$! $!"
      for _ in $(seq 100); do grep -q ready "$out/$2.server.log" 2>/dev/null && break; sleep 0.1; done ;;
  esac
}

client_args() { # server → the load client's target, URL and publisher
  case "$peer/$1" in
    socketio/fanout) echo "--target socketio --url ws://127.0.0.1:$port --api-url http://127.0.0.1:$api --api-key $key" ;;
    socketio/socketio) echo "--target socketio --url ws://127.0.0.1:$port --api-url http://127.0.0.1:$port --api-key $key" ;;
    uws/fanout | nchan/fanout) echo "--target fanout --vsn 1.0.0 --url ws://127.0.0.1:$port/realtime/v1 --api-url http://127.0.0.1:$api --api-key $key" ;;
    uws/uws | nchan/nchan) echo "--target nchan --url ws://127.0.0.1:$port" ;;
  esac
}

run() { # server scenario tag
  local server=$1 scenario=$2 tag=$3 dir="$out/$3" pids pid measured
  pids=$(start "$server" "$tag") # waits until the server is ready
  read -r pid measured <<<"$pids"
  current=$pid
  # shellcheck disable=SC2046 # the client's arguments are words on purpose
  case $scenario in
    fanout) "$lt" $(client_args "$server") --scenario fanout --users "$subs" --rate "$rate" --channels "$channels" \
              --duration 20 --server-pid "$measured" --report "$dir" >"$out/$tag.log" 2>&1 ;;
    idle)   "$lt" $(client_args "$server") --scenario idle --users "$idle" \
              --duration 10 --server-pid "$measured" --report "$dir" >"$out/$tag.log" 2>&1 ;;
  esac
  stop "$pid"
  current=
  sleep 2
  echo "$tag $(python3 loadtest/figure.py "$dir/report.json" server_cpu_us_per_delivery p99 server_rss_per_connection_bytes lost)"
}

for scenario in fanout idle; do
  for i in $(seq "$rounds"); do
    if (( i % 2 )); then order="fanout $peer"; else order="$peer fanout"; fi
    for who in $order; do run "$who" "$scenario" "$scenario-$who-$i"; done
  done
done | tee "$out/summary.txt"

python3 - "$out/summary.txt" "$peer" <<'PY'
import sys, statistics
rows, peer = [l.split() for l in open(sys.argv[1])], sys.argv[2]
def vals(prefix, key):
    out = []
    for r in rows:
        kv = dict(x.split("=", 1) for x in r[1:])
        if r[0].startswith(prefix) and kv.get(key) not in (None, "None"):
            out.append(float(kv[key]))
    return out
for scenario, key in (("fanout", "server_cpu_us_per_delivery"), ("fanout", "p99"), ("idle", "server_rss_per_connection_bytes")):
    f, s = vals(f"{scenario}-fanout-", key), vals(f"{scenario}-{peer}-", key)
    if f and s:
        mf, ms = statistics.median(f), statistics.median(s)
        print(f"{key}: fanout median {mf:.2f} {f}  {peer} median {ms:.2f} {s}  fanout/{peer} = {mf/ms:.3f}")
PY
echo "reports in $out"
