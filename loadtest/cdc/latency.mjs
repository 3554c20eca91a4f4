// Commit-to-client latency of postgres_changes: joins a workshop channel on
// a fanout edge with one binding, and for every change received records
// now - commit_timestamp (both clocks are this machine's). Prints a JSON
// summary when `seconds` have passed since the first change, or when
// `expect` changes arrived.
//
//   node loadtest/cdc/latency.mjs <ws-base-url> <session-id> <seconds> [expect]
//
// Uses the `ws` package installed for tests/js (npm ci in tests/js).
import { createRequire } from 'node:module';

const require = createRequire(new URL('../../tests/js/package.json', import.meta.url));
const WebSocket = require('ws');

const [base, session, seconds, expect] = process.argv.slice(2);
if (!base || !session || !seconds) {
  console.error('usage: latency.mjs <ws-base-url> <session-id> <seconds> [expect]');
  process.exit(64);
}
const topic = `realtime:workshop:${session}`;
const ws = new WebSocket(`${base}/websocket?vsn=1.0.0`);
const latencies = [];
const seqs = [];
let first = 0;
let joined = false;

function finish(code) {
  latencies.sort((a, b) => a - b);
  const q = (p) => latencies[Math.min(latencies.length - 1, Math.floor((p / 100) * latencies.length))] ?? null;
  const dup = seqs.length - new Set(seqs).size;
  const ordered = seqs.every((v, i) => i === 0 || seqs[i - 1] < v);
  const span = (Date.now() - first) / 1000;
  console.log(
    JSON.stringify({
      received: latencies.length,
      rate_per_s: Math.round(latencies.length / span),
      duplicated: dup,
      in_order: ordered,
      latency_ms: { p50: q(50), p90: q(90), p99: q(99), max: latencies.at(-1) ?? null },
    }),
  );
  ws.close();
  process.exit(code);
}

ws.on('open', () => {
  ws.send(
    JSON.stringify({
      topic,
      event: 'phx_join',
      ref: '1',
      join_ref: '1',
      payload: {
        config: {
          postgres_changes: [
            { event: 'INSERT', schema: 'public', table: 'workshop_activities', filter: `session_id=eq.${session}` },
          ],
        },
      },
    }),
  );
  setInterval(() => ws.send(JSON.stringify({ topic: 'phoenix', event: 'heartbeat', ref: 'hb', payload: {} })), 20000);
});

ws.on('message', (data) => {
  const now = Date.now();
  const m = JSON.parse(data.toString());
  if (m.event === 'phx_reply' && m.ref === '1') {
    if (m.payload.status !== 'ok') {
      console.error('join refused', JSON.stringify(m.payload));
      process.exit(1);
    }
    joined = true;
    console.error('joined; waiting for changes');
    return;
  }
  if (m.event !== 'postgres_changes') return;
  const data_ = m.payload.data;
  latencies.push(now - Date.parse(data_.commit_timestamp));
  seqs.push(data_.record.seq);
  if (!first) {
    first = now;
    setTimeout(() => finish(0), Number(seconds) * 1000);
  }
  if (expect && latencies.length >= Number(expect)) finish(0);
});
ws.on('close', () => {
  if (joined) console.error('socket closed');
});
ws.on('error', (e) => {
  console.error('socket error', e.message);
  process.exit(1);
});
