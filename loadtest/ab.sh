#!/usr/bin/env bash
# Side by side: two fanout binaries (say, before and after a change) driven by
# the same load client on this machine, in alternating runs, for the two
# figures a refactor must not move: server CPU per delivery (fanout scenario,
# 5,000 subscribers x 10 msg/s) and server RSS per idle connection (idle
# scenario, 15,000 connections).
#
#   bash loadtest/ab.sh <fanout-A> <fanout-B> [rounds] [loadtest-binary]
#
# Each round runs A then B (then B then A in the next round, so drift and
# warm-up fall on both), each on a fresh standalone server. Prints one line
# per run and the mean of each figure per binary, with B/A.
set -euo pipefail
a=$1 b=$2 rounds=${3:-3}
lt=${4:-target/release/fanout-loadtest}
out=$(mktemp -d /tmp/fanout-ab.XXXXXX)
port=4690 admin=9790

run() { # binary scenario tag
  local bin=$1 scenario=$2 tag=$3
  local dir="$out/$tag"
  "$bin" --listen 127.0.0.1:$port --admin-listen 127.0.0.1:$admin >"$out/$tag.server.log" 2>&1 &
  local pid=$!
  for _ in $(seq 50); do curl -sf "http://127.0.0.1:$admin/readyz" >/dev/null && break; sleep 0.1; done
  case $scenario in
    fanout) "$lt" --scenario fanout --url ws://127.0.0.1:$port/realtime/v1 --users 5000 --rate 10 \
              --duration 20 --server-pid "$pid" --report "$dir" >"$out/$tag.log" 2>&1 ;;
    idle)   "$lt" --scenario idle --url ws://127.0.0.1:$port/realtime/v1 --users 15000 \
              --duration 10 --server-pid "$pid" --report "$dir" >"$out/$tag.log" 2>&1 ;;
  esac
  kill "$pid"; wait "$pid" 2>/dev/null || true
  sleep 2
  echo "$tag $(python3 loadtest/figure.py "$dir/report.json" server_cpu_us_per_delivery server_rss_per_connection_bytes lost)"
}

for scenario in fanout idle; do
  for i in $(seq "$rounds"); do
    if (( i % 2 )); then order="A B"; else order="B A"; fi
    for who in $order; do
      bin=$a; [ "$who" = B ] && bin=$b
      run "$bin" "$scenario" "$scenario-$who-$i"
    done
  done
done | tee "$out/summary.txt"

python3 - "$out/summary.txt" <<'PY'
import re, sys, statistics
rows = [l.split() for l in open(sys.argv[1])]
for scenario, key in (("fanout", "server_cpu_us_per_delivery"), ("idle", "server_rss_per_connection_bytes")):
    means = {}
    for who in "AB":
        vals = [float(dict(kv.split("=") for kv in r[1:])[key]) for r in rows
                if r[0].startswith(f"{scenario}-{who}-") and dict(kv.split("=") for kv in r[1:])[key] != "None"]
        means[who] = (statistics.mean(vals), vals)
    (ma, va), (mb, vb) = means["A"], means["B"]
    print(f"{scenario}: {key} A mean {ma:.2f} {va}  B mean {mb:.2f} {vb}  B/A = {mb/ma:.3f}")
PY
echo "reports in $out"
