// The room endpoint (/rooms/<room>) with a plain `ws` client, the way a
// review-room app built on a Durable-Objects room server talks to it: a
// welcome with who is there (oneself included), one join per user however many tabs, a leave
// after the last tab, JSON relayed with the sender's identity, ping/pong
// answered by the edge without reaching the room; and the same channel seen
// by realtime-js (broadcasts both ways, presence). Crash expiry across edges
// is tests/tests/rooms.rs. Runs against standalone and, in the cluster
// pass, a NATS edge.
import { test, before, after, afterEach } from 'node:test';
import assert from 'node:assert/strict';
import {
  WebSocket,
  makeClient,
  makeToken,
  subscribe,
  disconnectAll,
  collectBroadcasts,
  uniqueRoom,
  safeJson,
  sleep,
  waitFor,
  startServerWithApi,
  apiPost,
} from './helpers.mjs';

let server;
let api;
before(async () => {
  ({ server, api } = await startServerWithApi());
});
const open = new Set();
afterEach(async () => {
  for (const ws of open) ws.terminate();
  open.clear();
  await disconnectAll();
});
after(async () => {
  await server?.stop();
});

/** A room tab: its socket and every message it got (pongs as text). */
function tab(room, { user = 'ann', session, token = makeToken({ sub: user }), query = '' } = {}) {
  const params = new URLSearchParams();
  if (token) params.set('token', token);
  if (session) params.set('sessionId', session);
  const ws = new WebSocket(`ws://127.0.0.1:${server.port}/rooms/${encodeURIComponent(room)}?${params}${query}`);
  open.add(ws);
  const got = [];
  const closed = new Promise((resolve) => ws.on('close', (code, reason) => resolve({ code, reason: String(reason) })));
  ws.on('message', (data, binary) => {
    const text = String(data);
    try {
      got.push(binary ? { binary: true } : JSON.parse(text));
    } catch {
      got.push(text);
    }
  });
  const opened = new Promise((resolve, reject) => {
    ws.once('open', resolve);
    ws.once('error', reject);
    ws.once('unexpected-response', (_req, res) => reject(new Error(`HTTP ${res.statusCode}`)));
  });
  return { ws, got, closed, opened, send: (m) => ws.send(typeof m === 'string' ? m : JSON.stringify(m)) };
}

const ofType = (t, type) => t.got.filter((m) => m?.type === type);
const welcomeOf = async (t) => {
  await waitFor(() => ofType(t, 'welcome').length === 1, 4000, 'welcome');
  return ofType(t, 'welcome')[0].users.map((u) => u.id);
};

test('welcome lists who is there; one join per user across tabs; the leave comes with the last tab', async () => {
  const room = uniqueRoom('review');
  const ann = tab(room, { user: 'ann', session: 'ann-1' });
  await ann.opened;
  assert.deepEqual(await welcomeOf(ann), ['ann'], 'the room was empty: only ann herself');

  const bob1 = tab(room, { user: 'bob', session: 'bob-1' });
  assert.deepEqual(await welcomeOf(bob1), ['ann', 'bob']);
  await waitFor(() => ofType(ann, 'join').length === 1, 4000, 'ann sees bob join');
  assert.deepEqual(ofType(ann, 'join')[0], { type: 'join', user: { id: 'bob' } });

  const bob2 = tab(room, { user: 'bob', session: 'bob-2' });
  assert.deepEqual(await welcomeOf(bob2), ['ann', 'bob'], "bob's second tab sees bob already there");
  await sleep(300);
  assert.equal(ofType(ann, 'join').length, 1, `no second join for bob's second tab: ${safeJson(ann.got)}`);
  assert.equal(ofType(bob1, 'join').length, 0, "bob's first tab is not told about bob");

  bob1.ws.close();
  await bob1.closed;
  await sleep(300);
  assert.equal(ofType(ann, 'leave').length, 0, 'one tab of two left: bob is still there');
  bob2.ws.close();
  await waitFor(() => ofType(ann, 'leave').length === 1, 4000, 'bob leaves with the last tab');
  assert.deepEqual(ofType(ann, 'leave')[0], { type: 'leave', user: { id: 'bob' } });
});

test('messages are relayed with the sender identity (not forgeable); ping is answered by the edge alone', async () => {
  const room = uniqueRoom('relay');
  const ann = tab(room, { user: 'ann', session: 'ann-tab' });
  const bob = tab(room, { user: 'bob', session: 'bob-tab' });
  await welcomeOf(ann);
  await welcomeOf(bob);
  ann.send({ type: 'editing', field: 'title', from: { id: 'mallory' } });
  await waitFor(() => ofType(bob, 'editing').length === 1, 4000, 'bob gets the relay');
  assert.deepEqual(ofType(bob, 'editing')[0], { type: 'editing', field: 'title', from: { id: 'ann', sessionId: 'ann-tab' } });

  ann.send('ping');
  ann.send({ type: 'ping' });
  await waitFor(() => ann.got.includes('pong') && ofType(ann, 'pong').length === 1, 3000, 'both pongs');
  await sleep(300);
  assert.equal(ofType(ann, 'editing').length, 0, 'the sender does not get its own message');
  assert.ok(!bob.got.includes('pong') && ofType(bob, 'ping').length === 0, `pings never reach the room: ${safeJson(bob.got)}`);
});

test('realtime-js in the same channel: broadcasts both ways and presence keyed by user', async () => {
  const room = uniqueRoom('mixed');
  const rt = makeClient(server, { vsn: '2.0.0' });
  const ch = rt.channel(room, { config: { broadcast: { ack: true } } });
  const rtGot = collectBroadcasts(ch, 'editing');
  ch.on('presence', { event: 'sync' }, () => {});
  await subscribe(ch);
  const ann = tab(room, { user: 'ann', session: 'a' });
  await welcomeOf(ann);
  await waitFor(() => Object.keys(ch.presenceState()).includes('ann'), 4000, 'realtime-js sees ann in presence').catch((e) =>
    assert.fail(`${e.message}: ${safeJson(ch.presenceState())}`),
  );
  assert.equal(ch.presenceState().ann[0].sessionId, 'a');

  ann.send({ type: 'editing', field: 'body' });
  await waitFor(() => rtGot.length === 1, 4000, 'realtime-js gets the room message');
  assert.deepEqual(rtGot[0].payload, { field: 'body', from: { id: 'ann', sessionId: 'a' } });

  assert.equal(await ch.send({ type: 'broadcast', event: 'chat', payload: { text: 'hi' } }), 'ok');
  await waitFor(() => ofType(ann, 'chat').length === 1, 4000, 'the room gets the realtime-js broadcast');
  assert.deepEqual(ofType(ann, 'chat')[0], { type: 'chat', text: 'hi' });
});

test('bad input gets an error message and the room goes on; a bad token is refused at the handshake', async () => {
  const room = uniqueRoom('bad');
  const ann = tab(room, { user: 'ann' });
  const bob = tab(room, { user: 'bob' });
  await welcomeOf(ann);
  await welcomeOf(bob);
  ann.send('not json');
  ann.send('[1,2]');
  ann.send({ no: 'type' });
  ann.ws.send(Buffer.from([1, 2, 3]), { binary: true });
  await waitFor(() => ofType(ann, 'error').length === 4, 3000, 'four errors').catch((e) => assert.fail(`${e.message}: ${safeJson(ann.got)}`));
  const errors = ofType(ann, 'error').map((e) => e.error);
  assert.match(errors[0], /invalid JSON/);
  assert.match(errors[1], /JSON object with a type/);
  assert.match(errors[2], /needs a "type"/);
  assert.match(errors[3], /binary messages are not relayed/);
  ann.send({ type: 'still-here' });
  await waitFor(() => ofType(bob, 'still-here').length === 1, 3000, 'the room goes on');

  const forged = tab(room, { token: 'not-a-jwt' });
  await assert.rejects(forged.opened, /HTTP 401/);
});

test('a token can come as the first message; without one the socket is closed with the reason', async () => {
  const room = uniqueRoom('first-msg');
  const ann = tab(room, { token: null, session: 's' });
  await ann.opened;
  ann.send({ type: 'auth', token: makeToken({ sub: 'ann' }) });
  assert.deepEqual(await welcomeOf(ann), ['ann']);

  const nobody = tab(room, { token: null });
  await nobody.opened;
  nobody.send({ type: 'editing' });
  const { code, reason } = await nobody.closed;
  assert.equal(code, 1008);
  assert.match(reason, /first message must be/);
});

test('the server API: an unsubscribe from the room or a disconnect closes the tab with the reason, and the user leaves', async () => {
  const room = uniqueRoom('kicked');
  const call = (path, body) => apiPost(api, path, body);
  const ann = tab(room, { user: 'ann' });
  const bob = tab(room, { user: 'bob' });
  await welcomeOf(ann);
  await welcomeOf(bob);
  await call('unsubscribe', { sub: 'bob', channel: room, reason: 'removed from the review' });
  const closed = await bob.closed;
  assert.equal(closed.code, 1008);
  assert.equal(closed.reason, 'removed from the review');
  await waitFor(() => ofType(ann, 'leave').length === 1, 4000, 'bob leaves');

  await call('disconnect', { sub: 'ann', reason: 'token rotated', reconnect: true });
  const again = await ann.closed;
  assert.equal(again.code, 1012, 'reconnect allowed: service restart');
});
