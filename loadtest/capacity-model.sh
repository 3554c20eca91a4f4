#!/usr/bin/env bash
# The capacity model's coefficients, measured, and the model checked
# against workshop runs on 1, 2 and 4 edges (docs/BENCHMARKS.md, "A capacity
# model"). Everything runs on a private nats-server -js and `fanout edge`s
# (stored events, the default), driven by fanout-loadtest.
#
# The model, in CPU seconds per second (cores), for a steady load of
#   D deliveries/s, P published messages/s, N open connections, each message
#   reaching S edges:
#     edges = a·D + b·P + e·P·(S − 1) + c·N
#     NATS  = n·P + m·P·S
# Calibration: the workshop scenario itself (every user a publisher and a
# receiver), $CAL_USERS users, cursor moves at $CAL_CURSOR/s, with the rooms
# made small or large (--workshops) so deliveries per message differ:
#   small  1 edge, rooms of about 10:                       a·D + b·P
#   large  1 edge, rooms of about 40: with small, a and b (edge); n + m (NATS)
#   large2 2 edges, rooms of about 40 (each room on both, S = 2): e, and m
#   idle   1 edge, $IDLE joined connections, no traffic:     c
# (The fanout scenario's single publisher is no use here: one connection
# carrying every message costs the edge more per message than many do.)
# Check: the workshop scenario (rooms of 9 to 42 users, chat 2/min, typing
# 6/min, cursor moves at $CURSOR/s per user), $USERS users over 1, 2 and 4
# edges (users round-robin over the edges, so every room spans every edge:
# S = edges): measured edges + NATS CPU against the model's.
#
#   bash loadtest/capacity-model.sh
#   USERS=3000 CURSOR=0.5 DURATION=30 bash loadtest/capacity-model.sh
#
# Needs target/release/{fanout,fanout-loadtest} and nats-server. Prints one
# line per run, the coefficients, then model against measurement.
set -euo pipefail
cd "$(dirname "$0")/.."
. loadtest/lib.sh
users=${USERS:-3000} cursor=${CURSOR:-0.5} duration=${DURATION:-30} idle=${IDLE:-8000}
cal_users=${CAL_USERS:-1500} cal_cursor=${CAL_CURSOR:-1}
fanout=target/release/fanout lt=target/release/fanout-loadtest
out=$(mktemp -d /tmp/fanout-model.XXXXXX)
nats_port=14333 nats_mon=14334 ports=(4760 4761 4762 4763) admins=(9860 9861 9862 9863)
pids=() nats=
trap 'kill $nats "${pids[@]}" 2>/dev/null || true' EXIT

up() { # edges tag: a fresh NATS (its own store) and that many edges
  rm -rf "$out/js"
  nats-server -js -a 127.0.0.1 -p $nats_port -m $nats_mon -sd "$out/js" >"$out/$2.nats.log" 2>&1 &
  nats=$!
  for _ in $(seq 50); do grep -q 'Server is ready' "$out/$2.nats.log" && break; sleep 0.1; done
  kill -0 $nats 2>/dev/null || { echo "nats-server did not start (see $out/$2.nats.log)" >&2; exit 1; }
  pids=()
  for ((i = 0; i < $1; i++)); do
    "$fanout" edge --nats-url nats://127.0.0.1:$nats_port --listen "127.0.0.1:${ports[$i]}" \
      --admin-listen "127.0.0.1:${admins[$i]}" --max-connections 200000 --joins-per-second 100000 --messages-per-second 100000 >"$out/$2.edge$i.log" 2>&1 &
    pids+=($!)
    wait_ready "${admins[$i]}"
  done
}

down() { # prints what JetStream holds: messages= bytes=
  curl -sf "http://127.0.0.1:$nats_mon/jsz" | python3 -c 'import json, sys; j = json.load(sys.stdin); print("js_messages=%d js_bytes=%d" % (j["messages"], j["bytes"]))'
  kill "${pids[@]}" $nats
  for p in "${pids[@]}" $nats; do while kill -0 "$p" 2>/dev/null; do sleep 0.1; done; done
  pids=() nats=
  sleep 2
}

run() { # tag edges loadtest-args...: one run, one result line
  local tag=$1 edges=$2 urls n0 n1 log="$out/$1.log"
  shift 2
  up "$edges" "$tag"
  urls=$(for ((i = 0; i < edges; i++)); do echo "ws://127.0.0.1:${ports[$i]}/realtime/v1"; done | paste -sd,)
  "$lt" --url "$urls" "$@" --server-pid "$(echo "${pids[@]}" | tr ' ' ,)" --report "$out/$tag" >"$log" 2>&1 &
  local client=$!
  # NATS's CPU over the same phase as the edges' (from "go" to the end).
  for _ in $(seq 1200); do grep -q 'connected: go' "$log" 2>/dev/null && break; sleep 0.1; done
  n0=$(cpu $nats)
  wait $client || echo "$tag: the load client failed (see $log)" >&2
  n1=$(cpu $nats)
  local js
  js=$(down)
  echo "$tag edges=$edges nats_cpu_seconds=$(python3 -c "print(round($n1 - $n0, 3))") $js $(python3 loadtest/figure.py "$out/$tag/report.json" \
    run_seconds server_cpu_seconds messages_sent messages_received connected lost p99)" | tee -a "$out/runs.txt"
}

# Not in a pipeline: the EXIT trap must see the servers this shell started.
cal=(--scenario workshop --users "$cal_users" --cursor-rate "$cal_cursor" --duration "$duration")
run small 1 "${cal[@]}" --workshops $((cal_users / 10))
run large 1 "${cal[@]}" --workshops $((cal_users / 40))
run large2 2 "${cal[@]}" --workshops $((cal_users / 40))
run idle 1 --scenario idle --users "$idle" --channels 100 --duration "$duration"
for e in 1 2 4; do
  run "workshop-$e" "$e" --scenario workshop --users "$users" --cursor-rate "$cursor" --duration "$duration"
done

python3 - "$out/runs.txt" <<'PY'
import sys
runs = {}
for line in open(sys.argv[1]):
    tag, *kv = line.split()
    runs[tag] = {k: float(v) for k, v in (x.split("=", 1) for x in kv) if v not in ("None",)}
def rates(r):  # per second over the measured phase
    t = r["run_seconds"]
    return r["messages_received"] / t, r["messages_sent"] / t, r["server_cpu_seconds"] / t - c * r["connected"], r["nats_cpu_seconds"] / t
# c: an idle joined connection's CPU (heartbeats only), per connection.
i = runs["idle"]
c = i["server_cpu_seconds"] / i["run_seconds"] / i["connected"]
(d1, p1, e1, q1), (d2, p2, e2, q2), (d3, p3, e3, q3) = (rates(runs[k]) for k in ("small", "large", "large2"))
# a·d + b·p = e for k10 and k40.
det = d1 * p2 - d2 * p1
a = (e1 * p2 - e2 * p1) / det
b = (d1 * e2 - d2 * e1) / det
e = (e3 - a * d3 - b * p3) / p3  # the second edge's cost per message it receives
# NATS: n·P + m·P·S, S = 1 (large) and 2 (large2).
m = q3 / p3 - q2 / p2
n = q2 / p2 - m
js = [r for r in runs.values() if r.get("js_messages")]
stored = sum(r["js_bytes"] for r in js) / sum(r["js_messages"] for r in js)
print(f"a  edge CPU per delivery           {a * 1e6:8.2f} µs")
print(f"b  edge CPU per published message  {b * 1e6:8.2f} µs (ingest, store ack, republish)")
print(f"e  edge CPU per message from NATS  {e * 1e6:8.2f} µs (per further subscribed edge)")
print(f"c  edge CPU per idle connection    {c * 1e6:8.3f} µs/s")
print(f"n  NATS CPU per published message  {n * 1e6:8.2f} µs (JetStream store)")
print(f"m  NATS CPU per message per edge   {m * 1e6:8.2f} µs")
print(f"   JetStream bytes per stored message {stored:6.0f} (what /jsz reports after each run)")
print("run          edges  D/s      P/s     measured cores  model cores  model/measured")
for tag in sorted(t for t in runs if t.startswith("workshop-")):
    r = runs[tag]
    s = r["edges"]
    d, p, ec, qc = rates(r)
    ec += c * r["connected"]  # rates() took the idle share out; the measurement holds it
    model = a * d + b * p + e * p * (s - 1) + c * r["connected"] + n * p + m * p * s
    meas = ec + qc
    print(f"{tag:12} {s:5.0f} {d:8.0f} {p:7.0f}   {meas:6.3f} ({ec:.3f} + NATS {qc:.3f})   {model:6.3f}      {model / meas:.3f}"
          f"   lost={r.get('lost', 0):.0f} p99={r.get('p99', float('nan'))}")
PY
echo "reports in $out"
