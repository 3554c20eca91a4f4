// The Socket.IO endpoint (/socket.io/) with the real socket.io-client 4.8,
// written the way the event-signup app uses it: connect with a JWT in
// `auth`, join an event's channel on the main namespace, receive what the
// backend publishes through the server API and what realtime-js clients
// broadcast; and a namespace per channel (`io(base + '/<channel>')`) whose
// emits with acks reach Socket.IO and realtime-js members alike, binary
// payloads included. Connection-state recovery: a socket whose transport
// dropped gets what it missed, in order, once, with `socket.recovered`.
// Runs against standalone and, in the cluster pass, a NATS edge.
import { test, before, after, afterEach } from 'node:test';
import assert from 'node:assert/strict';
import { io } from 'socket.io-client';
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
  WebSocket,
  startServerWithApi,
  apiPost,
} from './helpers.mjs';

let server;
let api;
before(async () => {
  ({ server, api } = await startServerWithApi());
});

const sockets = new Set();
afterEach(async () => {
  for (const s of sockets) s.disconnect();
  sockets.clear();
  await disconnectAll();
});
after(async () => {
  await server?.stop();
});

/** A socket.io-client socket on `nsp` (the main namespace by default). */
function connect(nsp = '', { token = makeToken(), auth, ...opts } = {}) {
  const s = io(`${server.url}${nsp ? `/${nsp}` : ''}`, {
    transports: ['websocket'],
    auth: auth ?? (token === null ? {} : { token }),
    reconnectionDelay: 100,
    reconnectionDelayMax: 500,
    forceNew: true,
    ...opts,
  });
  sockets.add(s);
  return s;
}

/** Resolves once `s` is connected; rejects with its connect_error. */
function connected(s, ms = 5000) {
  return new Promise((resolve, reject) => {
    if (s.connected) return resolve(s);
    const timer = setTimeout(() => reject(new Error(`not connected within ${ms} ms`)), ms);
    s.once('connect', () => {
      clearTimeout(timer);
      resolve(s);
    });
    s.once('connect_error', (e) => {
      clearTimeout(timer);
      reject(e);
    });
  });
}

/** The connect_error a socket gets. */
function refusal(s, ms = 5000) {
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`no connect_error within ${ms} ms`)), ms);
    s.once('connect', () => {
      clearTimeout(timer);
      reject(new Error('connected, expected a refusal'));
    });
    s.once('connect_error', (e) => {
      clearTimeout(timer);
      resolve(e);
    });
  });
}

const ack = (s, ...args) => s.timeout(5000).emitWithAck(...args);

const callApi = (path, body) => apiPost(api, path, body);
const publish = (body) => callApi('publish', body);

test('a connect without a token or with a bad one is refused with a clear connect_error', async () => {
  const none = connect('', { token: null, reconnection: false });
  assert.match((await refusal(none)).message, /token is required/);
  const bad = connect(uniqueRoom('ns'), { token: 'not-a-jwt', reconnection: false });
  assert.match((await refusal(bad)).message, /^unauthorized/);
  const expired = connect('', { token: makeToken({ exp: Math.floor(Date.now() / 1000) - 60 }), reconnection: false });
  assert.match((await refusal(expired)).message, /^unauthorized/);
});

test('main namespace: join a channel with an ack, receive server-API publishes and realtime-js broadcasts, leave', async () => {
  const room = uniqueRoom('event');
  const s = await connected(connect());
  const got = [];
  for (const ev of ['user_signed_up', 'user_cancelled', 'chat']) s.on(ev, (p) => got.push([ev, p]));
  assert.deepEqual(await ack(s, 'join', room), { ok: true });
  assert.deepEqual(await ack(s, 'join', room), { ok: true }, 'joining twice is fine');

  await publish({ channel: room, event: 'user_signed_up', payload: { user: 'ann' } });
  await publish({ channel: room, event: 'user_cancelled', payload: { user: 'bob' } });
  const rt = makeClient(server, { vsn: '2.0.0' });
  const ch = rt.channel(room, { config: { broadcast: { ack: true } } });
  await subscribe(ch);
  assert.equal(await ch.send({ type: 'broadcast', event: 'chat', payload: { text: 'hi' } }), 'ok');
  await waitFor(() => got.length >= 3, 4000, 'three events').catch((e) => assert.fail(`${e.message}: ${safeJson(got)}`));
  assert.deepEqual(got, [
    ['user_signed_up', { user: 'ann' }],
    ['user_cancelled', { user: 'bob' }],
    ['chat', { text: 'hi' }],
  ]);

  assert.deepEqual(await ack(s, 'leave', room), { ok: true });
  await publish({ channel: room, event: 'user_signed_up', payload: { user: 'late' } });
  await sleep(300);
  assert.equal(got.length, 3, `nothing after leave: ${safeJson(got)}`);
});

test('main namespace: bad joins and other events get an error ack, and the socket goes on', async () => {
  const s = await connected(connect());
  const bad = await ack(s, 'join', { nope: 1 });
  assert.equal(bad.ok, false);
  assert.match(bad.error, /channel name/);
  const other = await ack(s, 'chat', { text: 'where to?' });
  assert.equal(other.ok, false);
  assert.match(other.error, /unknown event "chat"/);
  const errors = [];
  s.on('fanout:error', (e) => errors.push(e));
  s.emit('chat', 'no ack');
  await waitFor(() => errors.length === 1, 3000, 'fanout:error event');
  assert.match(errors[0].error, /unknown event/);
  const room = uniqueRoom('ok');
  assert.deepEqual(await ack(s, 'join', room), { ok: true });
});

test('a namespace per channel: emits with acks reach Socket.IO and realtime-js members, and realtime-js reaches them', async () => {
  const room = uniqueRoom('ws');
  const a = await connected(connect(room));
  const b = await connected(connect(room));
  const gotB = [];
  b.on('chat', (...args) => gotB.push(args));
  const gotA = [];
  a.on('chat', (...args) => gotA.push(args));
  const rt = makeClient(server, { vsn: '1.0.0' });
  const ch = rt.channel(room, { config: { broadcast: { ack: true } } });
  const rtGot = collectBroadcasts(ch, 'chat');
  await subscribe(ch);

  const res = await ack(a, 'chat', { text: 'from socket.io' });
  assert.equal(res.ok, true);
  assert.match(res.offset, /^\d+$/);
  await waitFor(() => gotB.length === 1 && rtGot.length === 1, 4000, 'b and realtime-js get the emit').catch((e) =>
    assert.fail(`${e.message}: b=${safeJson(gotB)} rt=${safeJson(rtGot)} ${describeClient(rt)}`),
  );
  // The payload, then the position as the last argument (recovery's offset).
  assert.deepEqual(gotB[0], [{ text: 'from socket.io' }, res.offset]);
  assert.deepEqual(rtGot[0].payload, { text: 'from socket.io' });
  assert.equal(rtGot[0].meta.id, res.offset, 'one position for both protocols');

  assert.equal(await ch.send({ type: 'broadcast', event: 'chat', payload: { text: 'from realtime-js' } }), 'ok');
  await waitFor(() => gotA.length === 1 && gotB.length === 2, 4000, 'both sockets get the realtime-js broadcast');
  assert.deepEqual(gotA[0][0], { text: 'from realtime-js' });
  assert.equal(gotA.length, 1, 'the sender does not get its own emit back');
});

test('binary payloads: one Buffer argument travels as a binary broadcast to Socket.IO and realtime-js vsn 2.0.0', async () => {
  const room = uniqueRoom('bin');
  const a = await connected(connect(room));
  const b = await connected(connect(room));
  const got = [];
  b.on('blob', (data) => got.push(data));
  const rt = makeClient(server, { vsn: '2.0.0' });
  const ch = rt.channel(room);
  const rtGot = collectBroadcasts(ch, 'blob');
  await subscribe(ch);
  const res = await ack(a, 'blob', Buffer.from([0, 1, 2, 255]));
  assert.equal(res.ok, true, safeJson(res));
  await waitFor(() => got.length === 1 && rtGot.length === 1, 4000, 'binary deliveries');
  assert.ok(Buffer.isBuffer(got[0]), `a Buffer: ${safeJson(got[0])}`);
  assert.deepEqual([...got[0]], [0, 1, 2, 255]);
  assert.deepEqual([...new Uint8Array(rtGot[0].payload)], [0, 1, 2, 255]);
  const two = await ack(a, 'blob', Buffer.from([1]), Buffer.from([2]));
  assert.equal(two.ok, false);
  assert.match(two.error, /exactly one Buffer/);
});

test('emits that break the rules are refused in the ack and nothing is published', async () => {
  const room = uniqueRoom('rules');
  const a = await connected(connect(room));
  const b = await connected(connect(room));
  const got = [];
  b.onAny((ev, ...args) => got.push([ev, args]));
  const two = await ack(a, 'chat', 1, 2);
  assert.equal(two.ok, false);
  assert.match(two.error, /one payload argument/);
  const long = await ack(a, 'x'.repeat(300), {});
  assert.match(long.error, /longer than 255 bytes/);
  const priv = connect(uniqueRoom('secret'), { auth: { token: makeToken(), private: true }, reconnection: false });
  assert.match((await refusal(priv)).message, /not allowed to join private channel/);
  await sleep(300);
  assert.deepEqual(got, [], 'nothing reached the other member');
});

test('connection-state recovery: a socket whose transport dropped gets what it missed, in order, once', async () => {
  const room = uniqueRoom('recover');
  const s = await connected(connect(room));
  const got = [];
  s.on('n', (payload) => got.push(payload.n));
  const sender = await connected(connect(room));
  for (let n = 1; n <= 3; n++) assert.equal((await ack(sender, 'n', { n })).ok, true);
  await waitFor(() => got.length === 3, 4000, 'first three');
  assert.equal(s.recovered, false, 'a first connect is not a recovery');

  // Drop the transport without telling the server, then publish while the
  // socket is away.
  const reconnected = new Promise((resolve) => s.io.once('reconnect', resolve));
  s.io.engine.close();
  for (let n = 4; n <= 8; n++) await publish({ channel: room, event: 'n', payload: { n } });
  await reconnected;
  await waitFor(() => s.connected, 4000, 'reconnected');
  for (let n = 9; n <= 10; n++) assert.equal((await ack(sender, 'n', { n })).ok, true);
  await waitFor(() => got.length >= 10, 4000, 'all ten').catch((e) => assert.fail(`${e.message}: ${safeJson(got)}`));
  await sleep(200);
  assert.equal(s.recovered, true, 'socket.recovered');
  assert.deepEqual(got, [1, 2, 3, 4, 5, 6, 7, 8, 9, 10], 'every event once, in order');
});

test('the server API reaches Socket.IO sockets: unsubscribe ends a membership, disconnect ends the user\'s sockets', async () => {
  const room = uniqueRoom('kick');
  const token = makeToken({ sub: 'kick-me' });
  const main = await connected(connect('', { token }));
  const unsubscribed = [];
  main.on('fanout:unsubscribed', (m) => unsubscribed.push(m));
  assert.deepEqual(await ack(main, 'join', room), { ok: true });
  const nsp = await connected(connect(room, { token }));
  const nspGone = new Promise((resolve) => nsp.on('disconnect', resolve));
  const other = await connected(connect(room, { token: makeToken({ sub: 'stays' }) }));

  const r = await callApi('unsubscribe', { sub: 'kick-me', channel: room, reason: 'left the event' });
  assert.equal(r.connections, 2, safeJson(r));
  assert.equal(await nspGone, 'io server disconnect');
  await waitFor(() => unsubscribed.length === 1, 3000, 'fanout:unsubscribed');
  assert.deepEqual(unsubscribed[0], { channel: room, reason: 'left the event' });
  // The membership is gone: a publish no longer reaches the main socket.
  const got = [];
  main.on('after', (p) => got.push(p));
  await publish({ channel: room, event: 'after', payload: {} });
  await sleep(300);
  assert.deepEqual(got, []);
  assert.ok(other.connected, "another user's socket stays");

  const mainGone = new Promise((resolve) => main.on('disconnect', resolve));
  const d = await callApi('disconnect', { sub: 'kick-me', reason: 'removed', reconnect: false });
  assert.ok(d.connections >= 1, safeJson(d));
  assert.equal(await mainGone, 'io server disconnect', 'not retried by the client');
});

test('HTTP long-polling only: join, receive, emit with acks and binary, as over WebSocket', async () => {
  const room = uniqueRoom('poll');
  const s = await connected(connect('', { transports: ['polling'] }));
  assert.equal(s.io.engine.transport.name, 'polling');
  const got = [];
  s.on('user_signed_up', (p) => got.push(p));
  assert.deepEqual(await ack(s, 'join', room), { ok: true });
  for (let n = 1; n <= 5; n++) await publish({ channel: room, event: 'user_signed_up', payload: { n } });
  await waitFor(() => got.length === 5, 5000, 'five events over polling').catch((e) => assert.fail(`${e.message}: ${safeJson(got)}`));
  assert.deepEqual(got.map((p) => p.n), [1, 2, 3, 4, 5]);

  const a = await connected(connect(room, { transports: ['polling'] }));
  const b = await connected(connect(room));
  const bGot = [];
  b.on('blob', (d) => bGot.push(d));
  b.on('chat', (p) => bGot.push(p));
  assert.equal((await ack(a, 'chat', { text: 'polled' })).ok, true);
  assert.equal((await ack(a, 'blob', Buffer.from([9, 8, 7]))).ok, true);
  await waitFor(() => bGot.length === 2, 4000, 'a polling emit and a binary one reach a WebSocket socket');
  assert.deepEqual(bGot[0], { text: 'polled' });
  assert.deepEqual([...bGot[1]], [9, 8, 7]);
});

test('default transports: polling first, upgraded to WebSocket, nothing lost across the upgrade', async () => {
  const room = uniqueRoom('upgrade');
  const s = connect(room, { transports: undefined });
  // The manager's engine exists from io() on: listen before the upgrade
  // can happen.
  const upgraded = new Promise((resolve) => s.io.engine.once('upgrade', resolve));
  const got = [];
  s.on('n', (p) => got.push(p.n));
  await connected(s);
  const sender = await connected(connect(room));
  let n = 0;
  // Publish while the upgrade happens.
  while (s.io.engine.transport.name !== 'websocket' && n < 200) {
    n += 1;
    assert.equal((await ack(sender, 'n', { n })).ok, true);
  }
  await Promise.race([upgraded, sleep(5000)]);
  assert.equal(s.io.engine.transport.name, 'websocket', 'upgraded');
  for (let i = 0; i < 5; i++) {
    n += 1;
    assert.equal((await ack(sender, 'n', { n })).ok, true);
  }
  await waitFor(() => got.length >= n, 5000, `all ${n}`).catch((e) => assert.fail(`${e.message}: ${safeJson(got)}`));
  assert.deepEqual(got, Array.from({ length: n }, (_, i) => i + 1), 'every event once, in order, across the upgrade');
  const r = await ack(s, 'n', { n: 'from the upgraded socket' });
  assert.equal(r.ok, true);
});

test('polling requests for unknown sessions and transports get Socket.IO errors', async () => {
  const unknown = await fetch(`${server.url}/socket.io/?EIO=4&transport=polling&sid=nope`);
  assert.equal(unknown.status, 400);
  assert.equal((await unknown.json()).code, 1);
  const eio3 = await fetch(`${server.url}/socket.io/?EIO=3&transport=polling`);
  assert.equal((await eio3.json()).code, 5);
  const other = await fetch(`${server.url}/socket.io/?EIO=4&transport=carrier-pigeon`);
  assert.equal((await other.json()).code, 0);
});

test('an Engine.IO session that never CONNECTs a namespace is closed after the handshake timeout', async () => {
  const quick = await startServer({ args: ['--handshake-timeout-secs', '1'] });
  try {
    const ws = new WebSocket(`ws://127.0.0.1:${quick.port}/socket.io/?EIO=4&transport=websocket`);
    const first = new Promise((resolve) => ws.once('message', (d) => resolve(String(d))));
    const closed = new Promise((resolve) => ws.on('close', (code, reason) => resolve({ code, reason: String(reason) })));
    const open = await first;
    assert.match(open, /^0\{"sid":/, 'the open packet first');
    assert.equal(JSON.parse(open.slice(1)).maxPayload > 0, true);
    const { code, reason } = await closed;
    assert.equal(code, 1008);
    assert.match(reason, /no namespace connected within 1 s/);
  } finally {
    await quick.stop();
  }
});

test('recovery from an offset no longer retained starts fresh: recovered is false', async () => {
  const room = uniqueRoom('lost');
  // A made-up pid and an offset far in the past of a channel with no history.
  const s = connect(room, { auth: { token: makeToken(), pid: 'made-up', offset: '1' } });
  await connected(s);
  // The client sets `recovered` from the pid it sent (none on a first
  // connect), so read what the server answered from the socket's pid.
  assert.notEqual(s._pid, 'made-up', 'a fresh pid');
});
