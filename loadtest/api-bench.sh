#!/usr/bin/env bash
# The server API's two figures (issue 15), side by side in one run on this
# machine, against one cluster edge on a private nats-server -js:
#
# 1. Publish throughput: PublishStream, unary Publish and HTTP publish
#    against publishing the same envelopes straight to JetStream from the
#    same client (fanout-api-throughput; target PublishStream >= 0.7x).
# 2. Publish-to-receive latency of API-published messages against
#    client-published ones, same rate and fan-out (the fanout scenario with
#    and without --api-url, alternating; target p99 ratio <= 1.1).
#
#   bash loadtest/api-bench.sh [rounds] [subscribers] [rate]
#
# Needs release builds: cargo build --release -p fanout -p fanout-loadtest
set -euo pipefail
cd "$(dirname "$0")/.."
. loadtest/lib.sh
rounds=${1:-3} users=${2:-2000} rate=${3:-100}
bin=target/release/fanout lt=target/release/fanout-loadtest tp=target/release/fanout-api-throughput
out=$(mktemp -d /tmp/fanout-api-bench.XXXXXX)
key=api-bench-key-0123456789abcdef
nats_port=14322 port=4692 admin=9792 api=9793

nats-server -js -a 127.0.0.1 -p $nats_port -sd "$out/js" >"$out/nats.log" 2>&1 &
nats=$!
trap 'kill $nats $edge 2>/dev/null || true' EXIT
sleep 1
"$bin" edge --nats-url nats://127.0.0.1:$nats_port --nats-shards 8 --nats-streams 2 \
  --listen 127.0.0.1:$port --admin-listen 127.0.0.1:$admin --api-listen 127.0.0.1:$api \
  --api-keys "$key" --messages-per-second 0 >"$out/edge.log" 2>&1 &
edge=$!
wait_ready "$admin"

echo "== throughput (messages per second, one client process)"
"$tp" --nats-url nats://127.0.0.1:$nats_port --api 127.0.0.1:$api --api-key "$key" \
  --shards 8 --streams 2 --rounds "$rounds" | tee "$out/throughput.txt"

echo "== latency: $users subscribers, $rate msg/s, client publisher vs API publisher"
run() { # tag, extra args
  local tag=$1; shift
  "$lt" --scenario fanout --url ws://127.0.0.1:$port/realtime/v1 --users "$users" --rate "$rate" \
    --duration 20 --server-pid "$edge" --report "$out/$tag" --quiet "$@" >"$out/$tag.log" 2>&1
  echo "$tag $(python3 loadtest/figure.py "$out/$tag/report.json" p50 p99 server_cpu_us_per_delivery lost)"
}
for i in $(seq "$rounds"); do
  if (( i % 2 )); then order="client api"; else order="api client"; fi
  for who in $order; do
    if [ "$who" = api ]; then
      run "api-$i" --api-url http://127.0.0.1:$api --api-key "$key"
    else
      run "client-$i"
    fi
  done
done | tee "$out/latency.txt"

python3 - "$out/latency.txt" <<'PY'
import statistics, sys
rows = [l.split() for l in open(sys.argv[1])]
def figures(who):
    runs = [dict(kv.split("=") for kv in r[1:]) for r in rows if r[0].startswith(who + "-")]
    return {k: statistics.mean(float(x[k]) for x in runs) for k in ("p50", "p99", "server_cpu_us_per_delivery")}
c, a = figures("client"), figures("api")
for k in c:
    print(f"mean {k}: client {c[k]:.3f}  api {a[k]:.3f}  api/client = {a[k] / c[k]:.3f}")
PY
echo "reports in $out"
