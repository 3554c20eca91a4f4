// The server API (HTTP JSON under /api/v1/ on --api-listen) seen by the
// real realtime-js client: a backend's publish arrives exactly as a client
// broadcast does (`broadcast` event, payload, meta.id), an idempotent retry
// arrives once, history reads what was published, presence is what realtime-js tracked, and bad
// calls get clear errors with nothing published. Runs against standalone
// and, in the cluster pass of the suite, against a NATS edge.
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
} from './helpers.mjs';
import { freePort } from '../lib/server.mjs';

const KEY = 'test-api-key-all-0123456789';
const READ_KEY = 'test-api-key-read-0123456789';
const PUBLISH_KEY = 'test-api-key-publish-0123456789';

let server;
let api;
before(async () => {
  const apiPort = await freePort();
  server = await startServer({
    args: ['--api-listen', `127.0.0.1:${apiPort}`],
    env: { FANOUT_API_KEYS: `${KEY},read:${READ_KEY},publish:${PUBLISH_KEY}` },
  });
  api = `http://127.0.0.1:${apiPort}/api/v1`;
});
afterEach(async () => {
  await disconnectAll();
});
after(async () => {
  await server?.stop();
});

async function call(method, path, { body, key = KEY, raw } = {}) {
  const headers = { 'Content-Type': 'application/json' };
  if (key) headers.Authorization = `Bearer ${key}`;
  const res = await fetch(`${api}/${path}`, {
    method,
    headers,
    body: raw ?? (body === undefined ? undefined : JSON.stringify(body)),
  });
  const text = await res.text();
  let json;
  try {
    json = JSON.parse(text);
  } catch {
    json = undefined;
  }
  return { status: res.status, json, text };
}

const publish = (body, key) => call('POST', 'publish', { body, key });
const history = (query, key) => call('GET', `history?${new URLSearchParams(query)}`, { key });

async function subscriber(room, { vsn = '1.0.0', event = 'user_signed_up', config = {}, token } = {}) {
  const c = makeClient(server, { vsn, ...(token ? { apikey: token } : {}) });
  const ch = c.channel(room, { config });
  const got = collectBroadcasts(ch, event);
  await subscribe(ch);
  return { c, ch, got };
}

test('an API publish reaches vsn 1.0.0 and 2.0.0 subscribers as a broadcast with meta.id, in order', async () => {
  const room = uniqueRoom('api');
  const s1 = await subscriber(room, { vsn: '1.0.0' });
  const s2 = await subscriber(room, { vsn: '2.0.0' });
  const positions = [];
  for (let n = 1; n <= 5; n++) {
    const r = await publish({ channel: room, event: 'user_signed_up', payload: { user: `u${n}`, n } });
    assert.equal(r.status, 200, `publish answered ${r.status}: ${r.text}`);
    assert.match(r.json.position, /^[0-9]+$/, r.text);
    assert.equal(r.json.duplicate, false);
    positions.push(r.json.position);
  }
  for (const s of [s1, s2]) {
    await waitFor(() => s.got.length === 5, 5000, 'five API broadcasts').catch((e) =>
      assert.fail(`${e.message}: got ${safeJson(s.got)}; ${describeClient(s.c)}`),
    );
    assert.deepEqual(s.got.map((m) => m.payload.n), [1, 2, 3, 4, 5]);
    assert.deepEqual(s.got.map((m) => m.meta?.id), positions, 'meta.id is the position the API answered');
    assert.equal(s.got[0].event, 'user_signed_up');
    assert.equal(s.got[0].type, 'broadcast');
  }
});

test('a retried publish with the same idempotency key is delivered once and answers the first position', async () => {
  const room = uniqueRoom('api-idem');
  const s = await subscriber(room);
  const body = { channel: room, event: 'user_signed_up', payload: { user: 'once' }, idempotency_key: 'signup-7' };
  const first = await publish(body);
  const retry = await publish(body);
  assert.equal(first.status, 200, first.text);
  assert.equal(retry.status, 200, retry.text);
  assert.equal(retry.json.duplicate, true, retry.text);
  assert.equal(retry.json.position, first.json.position);
  // The same key on another channel is another message.
  const other = await publish({ ...body, channel: `${room}-other` });
  assert.equal(other.json.duplicate, false, other.text);
  await publish({ channel: room, event: 'user_signed_up', payload: { user: 'after' } });
  await waitFor(() => s.got.length >= 2, 5000, 'two broadcasts');
  await sleep(300);
  assert.deepEqual(s.got.map((m) => m.payload.user), ['once', 'after'], `the retry arrived again: ${safeJson(s.got)}`);
});

// (Resuming from a history position is tested with a raw Phoenix join in
// tests/tests/api.rs: realtime-js's subscribe() rebuilds the join config and
// drops `resume`, so only its rejoins can carry one.)
test('history answers what was published, oldest first, or what came after a position', async () => {
  const room = uniqueRoom('api-history');
  for (let n = 1; n <= 6; n++) {
    const r = await publish({ channel: room, event: 'stage', payload: { n } });
    assert.equal(r.status, 200, r.text);
  }
  const h = await history({ channel: room, limit: '4' });
  assert.equal(h.status, 200, h.text);
  assert.deepEqual(h.json.messages.map((m) => m.payload.n), [3, 4, 5, 6], h.text);
  assert.deepEqual(h.json.messages.map((m) => m.event), ['stage', 'stage', 'stage', 'stage']);
  assert.equal(h.json.position, h.json.messages[3].position, 'position is the newest message');
  const after = await history({ channel: room, after: h.json.messages[0].position });
  assert.deepEqual(after.json.messages.map((m) => m.payload.n), [4, 5, 6], after.text);

  const gone = await history({ channel: room, after: '999999' });
  assert.equal(gone.status, 410, gone.text);
  assert.equal(gone.json.code, 'out_of_range');
});

test('a binary payload reaches a vsn 2.0.0 subscriber as an ArrayBuffer and history gives it back', async () => {
  const room = uniqueRoom('api-bin');
  const s = await subscriber(room, { vsn: '2.0.0', event: 'blob' });
  const r = await publish({ channel: room, event: 'blob', payload_base64: Buffer.from([0, 1, 2, 250]).toString('base64') });
  assert.equal(r.status, 200, r.text);
  await waitFor(() => s.got.length === 1, 5000, 'binary broadcast');
  assert.ok(s.got[0].payload instanceof ArrayBuffer, `payload: ${safeJson(s.got[0])}`);
  assert.deepEqual([...new Uint8Array(s.got[0].payload)], [0, 1, 2, 250]);
  const h = await history({ channel: room });
  assert.equal(h.json.messages[0].payload_base64, 'AAEC+g==', h.text);
});

test('presence and presence_stats show what realtime-js tracked', async () => {
  const room = uniqueRoom('api-presence');
  const tabs = [];
  for (const key of ['alice', 'alice', 'bob']) {
    const c = makeClient(server);
    const ch = c.channel(room, { config: { presence: { key } } });
    await subscribe(ch);
    assert.equal(await ch.track({ name: key }), 'ok');
    tabs.push(ch);
  }
  let stats;
  await waitFor(async () => {
    stats = await call('GET', `presence_stats?channel=${room}`, { key: READ_KEY });
    return stats.json?.clients === 3;
  }, 5000, 'three tracked presences').catch((e) => assert.fail(`${e.message}: ${stats?.text}`));
  assert.deepEqual(stats.json, { clients: 3, users: 2 });
  const p = await call('GET', `presence?channel=${room}`, { key: READ_KEY });
  assert.equal(p.status, 200, p.text);
  assert.deepEqual(Object.keys(p.json.presences).sort(), ['alice', 'bob']);
  assert.equal(p.json.presences.alice.metas.length, 2);
  assert.equal(p.json.presences.bob.metas[0].name, 'bob');
  assert.ok(p.json.presences.bob.metas[0].phx_ref, p.text);
});

test('a private channel is addressed with private: true', async () => {
  const room = uniqueRoom('api-private');
  const token = makeToken({ channels: [room] });
  const priv = await subscriber(room, { config: { private: true }, token });
  const pub = await subscriber(room);
  const r = await publish({ channel: room, private: true, event: 'user_signed_up', payload: { to: 'private' } });
  assert.equal(r.status, 200, r.text);
  await waitFor(() => priv.got.length === 1, 5000, 'private broadcast');
  await sleep(200);
  assert.equal(pub.got.length, 0, 'the public channel of that name is another channel');
});

test('bad keys and bad requests get clear errors and publish nothing', async () => {
  const room = uniqueRoom('api-bad');
  const s = await subscriber(room, { event: '*' });
  const ok = { channel: room, event: 'user_signed_up', payload: { n: 1 } };
  const cases = [
    [await publish(ok, null), 401, 'unauthenticated', /missing API key/],
    [await publish(ok, 'not-a-key-0123456789abcdef'), 401, 'unauthenticated', /unknown API key/],
    [await publish(ok, READ_KEY), 403, 'permission_denied', /may only read/],
    [await history({ channel: room }, PUBLISH_KEY), 403, 'permission_denied', /may only publish/],
    [await call('POST', 'publish', { raw: '{"channel": ' }), 400, 'invalid_argument', /request body/],
    [await publish({ ...ok, extra: 1 }), 400, 'invalid_argument', /unknown field/],
    [await publish({ ...ok, event: '' }), 400, 'invalid_argument', /event/],
    [await publish({ ...ok, channel: `realtime:${room}` }), 400, 'invalid_argument', /without the realtime: prefix/],
    [await publish({ ...ok, idempotency_key: 'has space' }), 400, 'invalid_argument', /idempotency_key/],
    [await publish({ ...ok, payload_base64: '!!' }), 400, 'invalid_argument', /payload_base64/],
    [await call('POST', 'broadcast', { body: { channels: [room, ''], event: 'e', payload: {} } }), 400, 'invalid_argument', /channel/],
    [await history({ channel: room, limit: 'many' }), 400, 'invalid_argument', /limit/],
    [await history({ channel: room, after: '-1' }), 400, 'invalid_argument', /decimal/],
  ];
  for (const [r, status, code, message] of cases) {
    assert.equal(r.status, status, r.text);
    assert.equal(r.json?.code, code, r.text);
    assert.match(r.json.error, message);
  }
  const wrongMethod = await call('GET', 'publish');
  assert.equal(wrongMethod.status, 405, wrongMethod.text);
  const unknown = await call('GET', 'nope');
  assert.equal(unknown.status, 404, unknown.text);
  await sleep(300);
  assert.equal(s.got.length, 0, `a refused call published: ${safeJson(s.got)}`);
  // The broadcast with a bad channel published to none of its channels.
  const h = await history({ channel: room });
  assert.deepEqual(h.json.messages, [], h.text);
});

test('broadcast publishes one payload to many channels with a result each', async () => {
  const rooms = [uniqueRoom('api-many'), uniqueRoom('api-many'), uniqueRoom('api-many')];
  const subs = await Promise.all(rooms.map((r) => subscriber(r, { event: 'stage' })));
  const r = await call('POST', 'broadcast', { body: { channels: rooms, event: 'stage', payload: { stage: 2 } } });
  assert.equal(r.status, 200, r.text);
  assert.deepEqual(r.json.results.map((x) => x.channel), rooms);
  assert.ok(r.json.results.every((x) => /^[0-9]+$/.test(x.position)), r.text);
  for (const s of subs) {
    await waitFor(() => s.got.length === 1, 5000, 'broadcast to each channel');
    assert.equal(s.got[0].payload.stage, 2);
  }
});

test('disconnect: with reconnect allowed realtime-js comes back and rejoins; without, its channel stays closed', async () => {
  const room = uniqueRoom('api-kick');
  const kicked = await subscriber(room, { event: 'stage', token: makeToken({ sub: 'kick-me' }) });
  const other = await subscriber(room, { event: 'stage' });
  const disconnect = (body) => call('POST', 'disconnect', { body: { sub: 'kick-me', ...body } });

  const r = await disconnect({ reason: 'token rotated', reconnect: true });
  assert.equal(r.status, 200, r.text);
  assert.deepEqual(r.json, { connections: 1, edges: 1 });
  await waitFor(() => kicked.c.__log.closes.length === 1, 5000, 'the socket closed');
  assert.deepEqual(kicked.c.__log.closes[0], { code: 1012, reason: 'token rotated' });
  await waitFor(() => kicked.c.isConnected() && kicked.ch.state === 'joined', 10000, 'reconnected and rejoined').catch((e) =>
    assert.fail(`${e.message}: ${describeClient(kicked.c)}`),
  );
  await publish({ channel: room, event: 'stage', payload: { n: 1 } });
  await waitFor(() => kicked.got.length === 1, 5000, 'a broadcast after the rejoin');

  const gone = await disconnect({ reason: 'removed by a moderator', reconnect: false });
  assert.deepEqual(gone.json, { connections: 1, edges: 1 }, gone.text);
  await waitFor(() => kicked.c.__log.closes.length === 2, 5000, 'the socket closed again');
  assert.deepEqual(kicked.c.__log.closes[1], { code: 1008, reason: 'removed by a moderator' });
  assert.equal(kicked.ch.state, 'closed', `the channel was closed before the socket: ${describeClient(kicked.c)}`);
  // realtime-js reopens the socket by itself, but not the closed channel.
  await waitFor(() => kicked.c.isConnected(), 10000, 'the socket reopened');
  await publish({ channel: room, event: 'stage', payload: { n: 2 } });
  await waitFor(() => other.got.length === 2, 5000, 'the other subscriber still receives');
  await sleep(500);
  assert.equal(kicked.got.length, 1, `the disconnected user received: ${safeJson(kicked.got)}`);
  assert.equal(kicked.ch.state, 'closed');

  // The reopened socket joined nothing, but it is the user's connection.
  const idle = await disconnect({ reason: 'again' });
  assert.deepEqual(idle.json, { connections: 1, edges: 1 }, idle.text);
  // Let realtime-js finish reconnecting before the test ends: a client
  // disconnected while its reconnect timer is pending keeps retrying (and
  // keeps this test process alive) after the server is gone.
  await waitFor(() => kicked.c.__log.closes.length === 3 && kicked.c.isConnected(), 10000, 'the socket reopened once more');
  const unknown = await call('POST', 'disconnect', { body: { sub: 'nobody-here' } });
  assert.deepEqual(unknown.json, { connections: 0, edges: 1 }, unknown.text);
});
