// REST broadcast: POST /realtime/v1/api/broadcast (the batch endpoint that
// realtime-js send() falls back to before subscribing) and the per-topic
// endpoint that realtime-js httpSend() uses.
import { test, before, after, afterEach } from 'node:test';
import assert from 'node:assert/strict';
import {
  startServer,
  makeClient,
  makeToken,
  subscribe,
  disconnectAll,
  describeClient,
  collectBroadcasts,
  uniqueRoom,
  safeJson,
  sleep,
  waitFor,
  assertHealthy,
  WRONG_SECRET,
  nowSec,
} from './helpers.mjs';

let server;
before(async () => {
  server = await startServer();
});
afterEach(async () => {
  await disconnectAll();
});
after(async () => {
  await server?.stop();
});

async function subscriber(room, vsn = '1.0.0', event = 'rest') {
  const c = makeClient(server, { vsn });
  const ch = c.channel(room);
  const got = collectBroadcasts(ch, event);
  await subscribe(ch);
  return { c, ch, got };
}

async function post(body, headers) {
  const res = await fetch(`${server.url}/realtime/v1/api/broadcast`, {
    method: 'POST',
    headers: { 'Content-Type': 'application/json', ...headers },
    body: typeof body === 'string' ? body : JSON.stringify(body),
  });
  const text = await res.text();
  return { status: res.status, text };
}

test('REST POST /realtime/v1/api/broadcast with apikey header answers 202 and reaches vsn 1.0.0 and 2.0.0 subscribers', async () => {
  const room = uniqueRoom('rest');
  const s1 = await subscriber(room, '1.0.0');
  const s2 = await subscriber(room, '2.0.0');
  const { status, text } = await post(
    { messages: [{ topic: room, event: 'rest', payload: { via: 'rest', n: 1 }, private: false }] },
    { apikey: makeToken() },
  );
  assert.equal(status, 202, `REST broadcast answered ${status}: ${text}`);
  for (const [s, label] of [
    [s1, '1.0.0'],
    [s2, '2.0.0'],
  ]) {
    await waitFor(() => s.got.length >= 1, 3000, `REST broadcast at the vsn ${label} subscriber`).catch((e) => assert.fail(`${e.message}; ${describeClient(s.c)}`));
    assert.equal(s.got[0].event, 'rest');
    assert.deepEqual(s.got[0].payload, { via: 'rest', n: 1 }, safeJson(s.got[0]));
    assert.ok(/^\d+$/.test(s.got[0].meta?.id ?? ''), `meta.id on a REST-originated broadcast: ${safeJson(s.got[0])}`);
  }
});

test('REST with Authorization: Bearer, a "realtime:"-prefixed topic and several messages delivers all of them in order', async () => {
  const room = uniqueRoom('rest');
  const s = await subscriber(room, '2.0.0');
  const { status, text } = await post(
    {
      messages: [
        { topic: `realtime:${room}`, event: 'rest', payload: { i: 0 }, private: false },
        { topic: room, event: 'rest', payload: { i: 1 }, private: false },
        { topic: `realtime:${room}`, event: 'rest', payload: { i: 2 }, private: false },
      ],
    },
    { Authorization: `Bearer ${makeToken()}` },
  );
  assert.equal(status, 202, `REST broadcast with Bearer answered ${status}: ${text}`);
  await waitFor(() => s.got.length >= 3, 3000, 'three REST broadcasts').catch((e) => assert.fail(`${e.message}; got ${safeJson(s.got)}; ${describeClient(s.c)}`));
  assert.deepEqual(s.got.map((m) => m.payload.i), [0, 1, 2]);
  const ids = s.got.map((m) => BigInt(m.meta.id));
  assert.ok(ids[0] < ids[1] && ids[1] < ids[2], `meta.id must increase: ${ids}`);
});

test('realtime-js send() before subscribing falls back to the REST batch endpoint and resolves "ok"', async () => {
  const room = uniqueRoom('rest');
  const s = await subscriber(room, '1.0.0');
  const sender = makeClient(server, { vsn: '2.0.0', logger: () => {} }); // logger silences the fallback warning
  const ch = sender.channel(room);
  const res = await ch.send({ type: 'broadcast', event: 'rest', payload: { fallback: true } });
  assert.equal(res, 'ok', `send() via REST fallback resolved ${safeJson(res)} (realtime-js returns response.ok ? "ok" : "error", RealtimeChannel.ts send())`);
  await waitFor(() => s.got.length >= 1, 3000, 'REST-fallback broadcast').catch((e) => assert.fail(`${e.message}; ${describeClient(s.c)}`));
  assert.deepEqual(s.got[0].payload, { fallback: true });
});

test('realtime-js httpSend() (POST /realtime/v1/api/broadcast/<topic>/events/<event>) answers 202 and delivers', async () => {
  const room = uniqueRoom('rest');
  const s = await subscriber(room, '2.0.0', 'http-send');
  const sender = makeClient(server, { vsn: '2.0.0' });
  const ch = sender.channel(room);
  let result;
  try {
    result = await ch.httpSend('http-send', { via: 'httpSend' });
  } catch (e) {
    assert.fail(`httpSend() rejected: ${e.message} (realtime-js 2.119.1 httpSend posts the raw payload to ${ch.broadcastEndpointURL.split('?')[0]}/${room}/events/http-send and expects 202)`);
  }
  assert.deepEqual(result, { success: true });
  await waitFor(() => s.got.length >= 1, 3000, 'httpSend broadcast').catch((e) => assert.fail(`${e.message}; ${describeClient(s.c)}`));
  assert.deepEqual(s.got[0].payload, { via: 'httpSend' });
});

test('REST broadcast without a valid token is refused (401/403) and not delivered', async () => {
  const room = uniqueRoom('rest');
  const s = await subscriber(room, '1.0.0');
  const body = { messages: [{ topic: room, event: 'rest', payload: { evil: true }, private: false }] };
  const cases = [
    ['no token', {}],
    ['forged apikey', { apikey: makeToken({}, WRONG_SECRET) }],
    ['expired Bearer', { Authorization: `Bearer ${makeToken({ exp: nowSec() - 60 })}` }],
  ];
  for (const [label, headers] of cases) {
    const { status, text } = await post(body, headers);
    assert.ok(status === 401 || status === 403, `${label}: REST broadcast answered ${status} ${text}`);
  }
  await sleep(300);
  assert.deepEqual(s.got, [], 'unauthenticated REST broadcast was delivered');
});

test('REST broadcast with a malformed body is refused with 4xx and the server stays healthy', async () => {
  const headers = { apikey: makeToken() };
  for (const body of ['not json', '{"messages": "nope"}', '{}', '[]']) {
    const { status, text } = await post(body, headers);
    assert.ok(status >= 400 && status < 500, `body ${body}: answered ${status} ${text}`);
  }
  await assertHealthy(server, 'malformed REST bodies');
});
