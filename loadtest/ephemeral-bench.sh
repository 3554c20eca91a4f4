#!/usr/bin/env bash
# Ephemeral against stored events in cluster mode, side by side: one `fanout
# edge` on a private nats-server -js, the same load (the fanout scenario:
# <subs> subscribers of one channel, a publisher at <rate> msg/s sending the
# event "bench"), the edge started with --ephemeral-events bench or without,
# in alternating runs. Measures NATS's CPU (from /proc, over the whole run,
# less its idle rate measured for 10 s before) per delivered event, and the
# edge's CPU per delivery (the loadtest report).
#
#   bash loadtest/ephemeral-bench.sh [rounds] [subs] [rate]
#
# Needs target/release/{fanout,fanout-loadtest} and nats-server.
set -euo pipefail
cd "$(dirname "$0")/.."
. loadtest/lib.sh
rounds=${1:-3} subs=${2:-100} rate=${3:-1000}
fanout=target/release/fanout lt=target/release/fanout-loadtest
out=$(mktemp -d /tmp/fanout-ephemeral.XXXXXX)
nats_port=14322 port=4740 admin=9840
nats-server -js -a 127.0.0.1 -p $nats_port -sd "$out/js" >"$out/nats.log" 2>&1 &
nats=$!
trap 'kill $nats 2>/dev/null || true' EXIT
sleep 1

run() { # kind tag
  local kind=$1 tag=$2 dir="$out/$2" extra=() pid n0 n1
  [ "$kind" = ephemeral ] && extra=(--ephemeral-events bench)
  "$fanout" edge --nats-url nats://127.0.0.1:$nats_port --nats-shards 8 --nats-streams 2 \
    --listen 127.0.0.1:$port --admin-listen 127.0.0.1:$admin "${extra[@]}" >"$out/$tag.server.log" 2>&1 &
  pid=$!
  wait_ready "$admin"
  # NATS's own idle work (JetStream timers, the edge's heartbeats), to
  # subtract: 10 s with the edge connected and no load.
  local i0 i1 t0 t1
  i0=$(cpu $nats); sleep 10; i1=$(cpu $nats)
  n0=$(cpu $nats); t0=$(date +%s.%N)
  "$lt" --scenario fanout --url ws://127.0.0.1:$port/realtime/v1 --users "$subs" --rate "$rate" \
    --duration 20 --server-pid "$pid" --report "$dir" >"$out/$tag.log" 2>&1
  n1=$(cpu $nats); t1=$(date +%s.%N)
  kill "$pid"; wait "$pid" 2>/dev/null || true
  sleep 1
  local delivered
  delivered=$(python3 loadtest/figure.py "$dir/report.json" messages_received | sed 's/.*=//')
  local busy
  busy=$(python3 -c "print(max(0.0, ($n1 - $n0) - ($i1 - $i0) / 10 * ($t1 - $t0)))")
  echo "$tag nats_cpu_s=$(python3 -c "print(round($n1 - $n0, 3))") nats_idle_cpu_per_s=$(python3 -c "print(round(($i1 - $i0) / 10, 4))") nats_us_per_delivery=$(python3 -c "print(round($busy * 1e6 / max($delivered, 1), 4))") $(python3 loadtest/figure.py "$dir/report.json" messages_received server_cpu_us_per_delivery p99 lost)"
}

for i in $(seq "$rounds"); do
  if (( i % 2 )); then order="stored ephemeral"; else order="ephemeral stored"; fi
  for kind in $order; do run "$kind" "$kind-$i"; done
done | tee "$out/summary.txt"

python3 - "$out/summary.txt" <<'PY'
import sys, statistics
rows = [dict(x.split("=", 1) for x in l.split()[1:]) | {"tag": l.split()[0]} for l in open(sys.argv[1])]
for key in ("nats_us_per_delivery", "server_cpu_us_per_delivery", "p99"):
    e = [float(r[key]) for r in rows if r["tag"].startswith("ephemeral")]
    s = [float(r[key]) for r in rows if r["tag"].startswith("stored")]
    print(f"{key}: ephemeral median {statistics.median(e):.4f} {e}  stored median {statistics.median(s):.4f} {s}  ephemeral/stored = {statistics.median(e)/statistics.median(s):.3f}")
PY
echo "reports in $out"
