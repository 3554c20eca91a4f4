#!/usr/bin/env bash
# Workshop capacity, side by side: the largest number of workshop users one
# server process holds at p99 < 50 ms with nothing lost, for
#   fanout      fanout standalone, its Supabase endpoint (vsn 2.0.0, each
#               user joined to realtime:workshop:<n> with presence);
#   fanout-sio  the same fanout process, its /socket.io/ endpoint (each
#               workshop a namespace, no presence: what a Socket.IO app does);
#   socketio    the Socket.IO 4.8 server (loadtest/socketio/server.mjs: one
#               Node process, each workshop a namespace whose events reach
#               its other sockets).
# The same load client drives all three (fanout-loadtest --scenario
# workshop): rooms of 10 to 40 users, chat 2/min, typing 6/min and cursor
# moves at $CURSOR per user per second, each event sent to the user's whole
# room. Every trial gets a fresh server. Users step up from $START by
# doubling until a trial fails (or $CAP, under the 20,000 open files one
# process may hold here), then bisect to within $STEP users.
#
#   bash loadtest/workshop-capacity.sh [servers...]     (default: all three)
#   CURSOR=1 START=500 CAP=18000 STEP=250 DURATION=30 bash loadtest/workshop-capacity.sh
#
# Needs target/release/{fanout,fanout-loadtest} and Node.js 20. Prints one
# line per trial, then each server's capacity and the ratios to socketio.
set -euo pipefail
cd "$(dirname "$0")/.."
. loadtest/lib.sh
servers=${*:-fanout fanout-sio socketio}
cursor=${CURSOR:-1} start_users=${START:-500} cap=${CAP:-18000} step=${STEP:-250} duration=${DURATION:-30}
fanout=target/release/fanout lt=target/release/fanout-loadtest
out=$(mktemp -d /tmp/fanout-capacity.XXXXXX)
port=4710 admin=9810

[ -d loadtest/socketio/node_modules ] || (cd loadtest/socketio && npm ci --no-audit --no-fund --loglevel=error)

current=
trap '[ -z "$current" ] || stop "$current"' EXIT

start() { # server tag: starts it, prints its pid once it is ready
  case $1 in
    fanout | fanout-sio)
      "$fanout" standalone --listen 127.0.0.1:$port --admin-listen 127.0.0.1:$admin \
        --max-connections 200000 >"$out/$2.server.log" 2>&1 &
      echo $!
      wait_ready "$admin" ;;
    socketio)
      node loadtest/socketio/server.mjs $port >"$out/$2.server.log" 2>&1 &
      echo $!
      for _ in $(seq 100); do grep -q ready "$out/$2.server.log" 2>/dev/null && break; sleep 0.1; done ;;
  esac
}

client_args() { # server → the load client's target and URL
  case $1 in
    fanout) echo "--target fanout --vsn 2.0.0 --url ws://127.0.0.1:$port/realtime/v1" ;;
    fanout-sio | socketio) echo "--target socketio --url ws://127.0.0.1:$port" ;;
  esac
}

trial() { # server users → 0 if the server held them (p99 < 50 ms, nothing lost)
  local server=$1 users=$2 tag="$1-$2" pid workers
  workers=$(( (users + 8999) / 9000 )) # each load process well under 20,000 files
  pid=$(start "$server" "$tag")
  current=$pid
  # shellcheck disable=SC2046 # the client's arguments are words on purpose
  "$lt" $(client_args "$server") --scenario workshop --users "$users" --cursor-rate "$cursor" \
    --duration "$duration" --workers "$workers" --server-pid "$pid" --report "$out/$tag" >"$out/$tag.log" 2>&1 || true
  stop "$pid"
  current=
  sleep 2
  local fig
  fig=$(python3 loadtest/figure.py "$out/$tag/report.json" p99 lost connect_errors disconnected \
    deliveries_per_second server_cpu_us_per_delivery client_cpu_percent machine_cpu_percent 2>/dev/null || echo "p99=None")
  local verdict=FAIL
  if python3 - "$fig" <<'PY'
import sys
kv = dict(x.split("=", 1) for x in sys.argv[1].split(" "))
ok = kv.get("p99") not in (None, "None") and float(kv["p99"]) < 50 and all(
    kv.get(k) == "0" for k in ("lost", "connect_errors", "disconnected"))
sys.exit(0 if ok else 1)
PY
  then verdict=pass; fi
  echo "$tag $verdict $fig" | tee -a "$out/trials.txt" >&2
  [ $verdict = pass ]
}

capacity() { # server → prints the largest user count that passed (0 if none)
  local server=$1 lo=0 hi=0 u=$start_users
  while (( u <= cap )); do
    if trial "$server" "$u"; then lo=$u; u=$(( u * 2 )); else hi=$u; break; fi
  done
  if (( hi == 0 && lo < cap )); then # every doubling passed: try the cap itself
    if trial "$server" "$cap"; then lo=$cap; else hi=$cap; fi
  fi
  while (( hi > 0 && hi - lo > step )); do
    local mid=$(( (lo + hi) / 2 ))
    if trial "$server" "$mid"; then lo=$mid; else hi=$mid; fi
  done
  echo "$lo"
}

for s in $servers; do
  echo "$s $(capacity "$s")"
done | tee "$out/capacity.txt"

python3 - "$out/capacity.txt" "$cap" <<'PY'
import sys
cap = int(sys.argv[2])
got = {l.split()[0]: int(l.split()[1]) for l in open(sys.argv[1]) if l.strip()}
for s, n in got.items():
    note = " (the cap: the limit is above it)" if n >= cap else ""
    print(f"{s}: {n} users{note}")
if got.get("socketio"):
    for s, n in got.items():
        if s != "socketio":
            print(f"{s} / socketio = {n / got['socketio']:.2f}")
PY
echo "reports in $out"
