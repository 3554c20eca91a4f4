// Ephemeral events (`--ephemeral-events`, `--ephemeral-channels`): cursor
// moves and typing notices reach the members connected now, in order per
// sender, marked `meta.ephemeral` and without a position; they are never
// stored, so a resume replays only the stored events and the server API's
// history lists none of them. Runs against standalone and, in the cluster
// pass, a NATS edge (where they travel on core NATS only).
import { test, before, after, afterEach } from 'node:test';
import assert from 'node:assert/strict';
import { io } from 'socket.io-client';
import {
  makeClient,
  makeToken,
  subscribe,
  disconnectAll,
  collectBroadcasts,
  openRaw,
  closeAllRaw,
  uniqueRoom,
  safeJson,
  sleep,
  waitFor,
  startServerWithApi,
  apiPost,
  API_KEY,
} from './helpers.mjs';

let server;
let api;
before(async () => {
  ({ server, api } = await startServerWithApi({
    args: ['--ephemeral-events', 'cursor,typing', '--ephemeral-channels', 'cursors:*'],
  }));
});
const sockets = [];
afterEach(async () => {
  for (const s of sockets) s.disconnect();
  closeAllRaw();
  await disconnectAll();
});
after(async () => {
  await server?.stop();
});

test('ephemeral broadcasts arrive live and in order with meta.ephemeral; stored ones keep their positions', async () => {
  const room = uniqueRoom('live');
  const a = makeClient(server, { vsn: '2.0.0' });
  const b = makeClient(server, { vsn: '1.0.0' });
  const chA = a.channel(room, { config: { broadcast: { ack: true } } });
  const chB = b.channel(room);
  const got = collectBroadcasts(chB);
  await subscribe(chA);
  await subscribe(chB);
  const sio = io(`${server.url}/${room}`, { transports: ['websocket'], auth: { token: makeToken() }, forceNew: true });
  sockets.push(sio);
  const sioGot = [];
  sio.on('cursor', (...args) => sioGot.push(args));
  await waitFor(() => sio.connected, 4000, 'socket.io connected');

  for (let n = 1; n <= 30; n++) {
    assert.equal(await chA.send({ type: 'broadcast', event: 'cursor', payload: { n } }), 'ok');
    if (n % 10 === 0) assert.equal(await chA.send({ type: 'broadcast', event: 'chat', payload: { n } }), 'ok');
  }
  await waitFor(() => got.length === 33, 5000, '33 broadcasts').catch((e) => assert.fail(`${e.message}: ${got.length} ${safeJson(got.slice(-3))}`));
  const cursors = got.filter((m) => m.event === 'cursor');
  assert.deepEqual(cursors.map((m) => m.payload.n), Array.from({ length: 30 }, (_, i) => i + 1), 'in order per sender');
  for (const m of cursors) assert.deepEqual(m.meta, { ephemeral: true }, 'no position');
  const chats = got.filter((m) => m.event === 'chat');
  assert.equal(chats.length, 3);
  for (const m of chats) assert.match(m.meta.id, /^\d+$/);
  await waitFor(() => sioGot.length === 30, 4000, 'socket.io gets the cursors');
  assert.deepEqual(sioGot[0], [{ n: 1 }], 'no offset argument for an ephemeral event');
});

test('nothing ephemeral is stored: a resume replays the stored events only, and history lists none', async () => {
  const room = uniqueRoom('cursors:doc');
  const ch = uniqueRoom('typing-room');
  const publish = (channel, event, payload) => apiPost(api, 'publish', { channel, event, payload });
  // A channel pattern makes every broadcast of the channel ephemeral.
  const eph = await publish(room, 'chat', { n: 1 });
  assert.equal(eph.position, '0', `an ephemeral publish has no position: ${safeJson(eph)}`);
  const first = await publish(ch, 'chat', { n: 1 });
  await publish(ch, 'typing', { n: 2 });
  await publish(ch, 'chat', { n: 3 });
  await sleep(200);

  const history = await (await fetch(`${api}/history?${new URLSearchParams({ channel: ch })}`, {
    headers: { Authorization: `Bearer ${API_KEY}` },
  })).json();
  assert.deepEqual(history.messages.map((e) => [e.event, e.payload.n]), [['chat', 1], ['chat', 3]], safeJson(history));
  const none = await (await fetch(`${api}/history?${new URLSearchParams({ channel: room })}`, {
    headers: { Authorization: `Bearer ${API_KEY}` },
  })).json();
  assert.deepEqual(none.messages, [], 'the pattern channel stored nothing');

  const raw = await openRaw(server);
  const from = raw.messages.length;
  const after = first.position;
  await raw.join(`realtime:${ch}`, { resume: { after: String(after) } });
  await sleep(400);
  const replayed = raw.messages.slice(from).filter((m) => m.event === 'broadcast').map((m) => [m.payload.event, m.payload.payload.n]);
  assert.deepEqual(replayed, [['chat', 3]], 'only the stored event after the position');
});
