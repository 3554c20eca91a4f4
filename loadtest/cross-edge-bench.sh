#!/usr/bin/env bash
# Cross-edge delivery against local delivery, side by side: the same load
# (the fanout scenario: <subs> subscribers of one channel, one realtime-js
# style publisher at <rate> msg/s) against
#   standalone  one `fanout standalone` (memory bus),
#   one-edge    one `fanout edge` on a private nats-server -js,
#   two-edges   two `fanout edge`s on it, the subscribers split over both
#               and the publisher on the second,
# in alternating order. Measures the edges' CPU per delivery (summed over
# the edges, from /proc, over the publishing phase: the loadtest report),
# NATS's CPU per delivery, and p99.
#
#   bash loadtest/cross-edge-bench.sh [rounds] [subs] [rate]
#   PERF=1 bash loadtest/cross-edge-bench.sh 1 ...   (also perf record each
#                                                     server for 10 s mid-run)
#
# Needs target/release/{fanout,fanout-loadtest} and nats-server.
set -euo pipefail
cd "$(dirname "$0")/.."
. loadtest/lib.sh
rounds=${1:-3} subs=${2:-10000} rate=${3:-5}
fanout=target/release/fanout lt=target/release/fanout-loadtest
out=$(mktemp -d /tmp/fanout-cross-edge.XXXXXX)
nats_port=14323 ports=(4750 4751) admins=(9850 9851)
nats-server -js -a 127.0.0.1 -p $nats_port -sd "$out/js" >"$out/nats.log" 2>&1 &
nats=$!
pids=()
trap 'kill $nats "${pids[@]}" 2>/dev/null || true' EXIT
sleep 1

start() { # role index tag
  local bus=()
  [ "$1" = edge ] && bus=(--nats-url nats://127.0.0.1:$nats_port)
  "$fanout" "$1" "${bus[@]}" --listen "127.0.0.1:${ports[$2]}" \
    --admin-listen "127.0.0.1:${admins[$2]}" --max-connections 200000 >"$out/$3.server$2.log" 2>&1 &
  pids+=($!)
  wait_ready "${admins[$2]}"
}

run() { # kind tag
  local kind=$1 tag=$2 dir="$out/$2" urls n0 n1 profiler=
  pids=()
  case $kind in
    standalone) start standalone 0 "$tag" ;;
    one-edge) start edge 0 "$tag" ;;
    two-edges) start edge 0 "$tag"; start edge 1 "$tag" ;;
  esac
  urls=$(for i in "${!pids[@]}"; do echo "ws://127.0.0.1:${ports[$i]}/realtime/v1"; done | paste -sd,)
  n0=$(cpu $nats)
  if [ -n "${PERF:-}" ]; then
    (sleep 25; for p in "${pids[@]}"; do perf record -F 999 -g -p "$p" -o "$out/$tag.$p.perf" -- sleep 10 >/dev/null 2>&1 & done; wait) &
    profiler=$!
  fi
  "$lt" --scenario fanout --url "$urls" --users "$subs" --rate "$rate" --duration 30 \
    --server-pid "$(echo "${pids[@]}" | tr ' ' ,)" --report "$dir" >"$out/$tag.log" 2>&1
  n1=$(cpu $nats)
  [ -n "$profiler" ] && wait "$profiler"
  kill "${pids[@]}"; for p in "${pids[@]}"; do while kill -0 "$p" 2>/dev/null; do sleep 0.1; done; done
  sleep 1
  local delivered
  delivered=$(python3 loadtest/figure.py "$dir/report.json" messages_received | sed 's/.*=//')
  echo "$tag nats_us_per_delivery=$(python3 -c "print(round(($n1 - $n0) * 1e6 / max($delivered, 1), 4))") $(python3 loadtest/figure.py "$dir/report.json" messages_received server_cpu_us_per_delivery p99 lost)"
}

kinds=(standalone one-edge two-edges)
for i in $(seq "$rounds"); do
  # Rotate the order each round, so no kind always runs first.
  for k in 0 1 2; do
    kind=${kinds[$(( (k + i - 1) % 3 ))]}
    run "$kind" "$kind-$i"
  done
done | tee "$out/summary.txt"

python3 - "$out/summary.txt" <<'PY'
import sys, statistics
rows = [dict(x.split("=", 1) for x in l.split()[1:]) | {"tag": l.split()[0]} for l in open(sys.argv[1])]
for key in ("server_cpu_us_per_delivery", "nats_us_per_delivery", "p99"):
    med = {}
    for kind in ("standalone", "one-edge", "two-edges"):
        v = [float(r[key]) for r in rows if r["tag"].startswith(kind + "-") and r.get(key) not in (None, "None")]
        if v:
            med[kind] = statistics.median(v)
            print(f"{key} {kind}: median {med[kind]:.4f} {v}")
    if med.get("standalone"):
        for kind in ("one-edge", "two-edges"):
            if kind in med:
                print(f"{key} {kind}/standalone = {med[kind] / med['standalone']:.3f}")
PY
echo "reports in $out"
