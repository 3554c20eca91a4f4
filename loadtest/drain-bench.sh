#!/usr/bin/env bash
# Drain against kill, side by side: two `fanout edge`s on a private
# nats-server -js, <users> subscribers split over both, one publisher at 10
# msg/s (the reconnect-storm scenario); after 10 s edge A is taken away:
# SIGTERM with drain_secs = 0 and = <drain>, and SIGKILL. Its clients resume
# on edge B. Prints, per run, the peak rejoins per second, the seconds over
# which they spread, the time to live again, and loss.
#
#   bash loadtest/drain-bench.sh [users] [drain]
#
# Needs target/release/{fanout,fanout-loadtest} and nats-server.
set -euo pipefail
cd "$(dirname "$0")/.."
. loadtest/lib.sh
users=${1:-4000} drain=${2:-10}
fanout=target/release/fanout lt=target/release/fanout-loadtest
out=$(mktemp -d /tmp/fanout-drain.XXXXXX)
nats_port=14522
nats-server -js -a 127.0.0.1 -p $nats_port -sd "$out/js" >"$out/nats.log" 2>&1 &
nats=$!
trap 'kill $nats 2>/dev/null || true' EXIT
sleep 1

edge() { # port admin drain-secs log → pid
  "$fanout" edge --nats-url nats://127.0.0.1:$nats_port --nats-shards 8 --nats-streams 2 --listen 127.0.0.1:$1 \
    --admin-listen 127.0.0.1:$2 --drain-secs "$3" >"$4" 2>&1 &
  echo $!
  wait_ready "$2"
}

run() { # how drain-secs tag
  local how=$1 secs=$2 tag=$3 a b failure
  a=$(edge 4791 9891 "$secs" "$out/$tag.a.log")
  b=$(edge 4792 9892 0 "$out/$tag.b.log")
  failure=(--drain-pid "$a"); [ "$how" = kill ] && failure=(--kill-pid "$a")
  "$lt" --scenario reconnect-storm --url ws://127.0.0.1:4791/realtime/v1,ws://127.0.0.1:4792/realtime/v1 \
    --users "$users" --rate 10 --duration 30 --kill-after 10 "${failure[@]}" --report "$out/$tag" >"$out/$tag.log" 2>&1 || true
  kill "$a" "$b" 2>/dev/null || true; wait "$a" "$b" 2>/dev/null || true
  sleep 1
  echo "$tag $(python3 loadtest/figure.py "$out/$tag/report.json" affected live_again peak_reconnects_per_second reconnect_span_seconds p99 lost duplicated)"
}

{
  run kill 0 kill
  run drain 0 drain-0s
  run drain "$drain" "drain-${drain}s"
} | tee "$out/summary.txt"
echo "reports in $out"
