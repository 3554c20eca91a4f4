// The server API on two cluster edges with realtime-js subscribers on
// each: HTTP publishes through either edge's API reach both in one order
// with the same meta.id, a retry with the same idempotency key through the
// other edge arrives once, and a disconnect that allows reconnecting
// closes the user's sockets on both edges with the reason, after which
// realtime-js comes back by itself. (gRPC on two edges: tests/tests/api.rs.)
// tests/tests/js_suites.rs runs this on a private NATS (FANOUT_TEST_NATS_URL).
import { test, after } from 'node:test';
import assert from 'node:assert/strict';
import { startServer, makeClient, makeToken, subscribe, collectBroadcasts, disconnectAll, describeClient, uniqueRoom, waitFor, sleep, safeJson } from '../protocol/helpers.mjs';
import { freePort } from '../lib/server.mjs';

const KEY = 'two-edges-api-key-0123456789';
const servers = [];
after(async () => {
  await disconnectAll();
  for (const s of servers) await s.stop().catch(() => {});
});

async function edgeWithApi() {
  const apiPort = await freePort();
  const server = await startServer({ args: ['--api-listen', `127.0.0.1:${apiPort}`], env: { FANOUT_API_KEYS: KEY } });
  servers.push(server);
  return { server, api: `http://127.0.0.1:${apiPort}/api/v1` };
}

async function post(api, path, body) {
  const res = await fetch(`${api}/${path}`, {
    method: 'POST',
    headers: { Authorization: `Bearer ${KEY}`, 'Content-Type': 'application/json' },
    body: JSON.stringify(body),
  });
  const text = await res.text();
  assert.equal(res.status, 200, `${path}: ${text}`);
  return JSON.parse(text);
}

test('API publishes through either edge reach realtime-js on both, in one order; disconnect reaches both edges', async () => {
  assert.ok(process.env.FANOUT_TEST_NATS_URL, 'needs FANOUT_TEST_NATS_URL (tests/tests/js_suites.rs sets it)');
  const [a, b] = [await edgeWithApi(), await edgeWithApi()];
  const room = uniqueRoom('api-edges');
  const subs = [];
  for (const { server } of [a, b]) {
    const c = makeClient(server, { apikey: makeToken({ sub: 'member-1' }) });
    const ch = c.channel(room);
    const got = collectBroadcasts(ch, 'user_signed_up');
    await subscribe(ch);
    subs.push({ c, ch, got });
  }

  const positions = [];
  for (let n = 1; n <= 10; n++) {
    const via = n % 2 ? a : b;
    const r = await post(via.api, 'publish', { channel: room, event: 'user_signed_up', payload: { n } });
    positions.push(r.position);
  }
  const retry = await post(b.api, 'publish', { channel: room, event: 'user_signed_up', payload: { n: 11 }, idempotency_key: 'k-11' });
  const again = await post(a.api, 'publish', { channel: room, event: 'user_signed_up', payload: { n: 11 }, idempotency_key: 'k-11' });
  assert.equal(again.duplicate, true, safeJson(again));
  assert.equal(again.position, retry.position);
  positions.push(retry.position);

  for (const s of subs) {
    await waitFor(() => s.got.length >= 11, 10000, 'eleven broadcasts').catch((e) =>
      assert.fail(`${e.message}: ${safeJson(s.got.map((m) => m.payload.n))}; ${describeClient(s.c)}`),
    );
    await sleep(300);
    assert.deepEqual(s.got.map((m) => m.payload.n), [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11], 'in publish order, the retry once');
    assert.deepEqual(s.got.map((m) => m.meta.id), positions, 'the positions the API answered, the same on both edges');
  }

  const d = await post(b.api, 'disconnect', { sub: 'member-1', reason: 'session moved', reconnect: true });
  assert.deepEqual(d, { connections: 2, edges: 2 });
  for (const s of subs) {
    await waitFor(() => s.c.__log.closes.length === 1, 5000, 'the socket closed');
    assert.deepEqual(s.c.__log.closes[0], { code: 1012, reason: 'session moved' });
    await waitFor(() => s.c.isConnected() && s.ch.state === 'joined', 10000, 'back and rejoined').catch((e) =>
      assert.fail(`${e.message}: ${describeClient(s.c)}`),
    );
  }
  await post(a.api, 'publish', { channel: room, event: 'user_signed_up', payload: { n: 12 } });
  for (const s of subs) {
    await waitFor(() => s.got.length === 12, 5000, 'a broadcast after coming back');
  }
  const channels = await (await fetch(`${a.api}/channels?pattern=${room}`, { headers: { Authorization: `Bearer ${KEY}` } })).json();
  assert.deepEqual(channels, { channels: [{ channel: room, private: false, subscribers: 2 }], edges: 2 });
});
