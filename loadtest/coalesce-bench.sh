#!/usr/bin/env bash
# The write window (limits.write_delay_ms) off against on, side by side: a
# cursor-like load (the workshop scenario with one room of <users> members,
# each sending <rate> typing broadcasts per second, no chat) on a fresh
# standalone server per run, alternating. Prints the server's CPU per
# delivery and the p99 of each run, then the medians and on / off.
#
#   bash loadtest/coalesce-bench.sh [rounds] [window-ms] [users] [rate]
#
# Needs target/release/{fanout,fanout-loadtest}.
set -euo pipefail
cd "$(dirname "$0")/.."
. loadtest/lib.sh
rounds=${1:-3} window=${2:-10} users=${3:-40} rate=${4:-20}
fanout=target/release/fanout lt=target/release/fanout-loadtest
out=$(mktemp -d /tmp/fanout-coalesce.XXXXXX)
port=4760 admin=9860

run() { # delay-ms tag
  local delay=$1 tag=$2 dir="$out/$2" pid
  "$fanout" standalone --listen 127.0.0.1:$port --admin-listen 127.0.0.1:$admin --write-delay-ms "$delay" \
    --messages-per-second 1000 >"$out/$tag.server.log" 2>&1 &
  pid=$!
  wait_ready "$admin"
  "$lt" --scenario workshop --url ws://127.0.0.1:$port/realtime/v1 --users "$users" --workshops 1 \
    --chat-rate 0 --typing-rate $((rate * 60)) --duration 20 --server-pid "$pid" --report "$dir" >"$out/$tag.log" 2>&1
  kill "$pid"; wait "$pid" 2>/dev/null || true
  sleep 1
  echo "$tag $(python3 loadtest/figure.py "$dir/report.json" messages_received server_cpu_us_per_delivery p50 p99 lost)"
}

for i in $(seq "$rounds"); do
  if (( i % 2 )); then order="off on"; else order="on off"; fi
  for w in $order; do
    d=0; [ "$w" = on ] && d=$window
    run "$d" "$w-$i"
  done
done | tee "$out/summary.txt"

python3 - "$out/summary.txt" <<'PY'
import sys, statistics
rows = [dict(x.split("=", 1) for x in l.split()[1:]) | {"tag": l.split()[0]} for l in open(sys.argv[1])]
for key in ("server_cpu_us_per_delivery", "p50", "p99"):
    on = [float(r[key]) for r in rows if r["tag"].startswith("on")]
    off = [float(r[key]) for r in rows if r["tag"].startswith("off")]
    print(f"{key}: on median {statistics.median(on):.3f} {on}  off median {statistics.median(off):.3f} {off}  on/off = {statistics.median(on)/statistics.median(off):.3f}")
PY
echo "reports in $out"
