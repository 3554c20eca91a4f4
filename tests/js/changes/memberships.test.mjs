// Policies that follow a membership table, as RLS policies do: tokens carry
// only `sub`, and who may see a workshop is a row of workshop_participants.
// realtime-js against standalone (in-process ingester on its own slot) and
// against a cluster edge fed by the suite's `fanout cdc` (configured with
// the same membership set by tests/tests/js_suites.rs).
import { test, before, after, afterEach } from 'node:test';
import assert from 'node:assert/strict';
import { randomUUID } from 'node:crypto';
import { io } from 'socket.io-client';
import {
  startServer,
  makeClient,
  subscribe,
  subscribeOutcome,
  disconnectAll,
  waitFor,
  sleep,
  safeJson,
  signJwt,
  SECRET,
  nowSec,
  WebSocket,
} from '../protocol/helpers.mjs';
import { DB, ROUTES, sql, sessions, changeStreamRunning } from './db.mjs';

export const MEMBERSHIPS =
  "{workshops = {table = 'public.workshop_participants', user = 'user_id', value = 'session_id'}}";
const TABLES =
  "{'public.workshop_sessions' = {read = 'public'}, 'public.workshop_activities' = {read = 'session_id in member.workshops'}}";
const CHANNELS = "[{pattern = 'workshop:{id}', read = '{id} in member.workshops', write = '{id} in member.workshops'}]";
const SLOT = 'fanout_members_test';
const cluster = Boolean(process.env.FANOUT_TEST_NATS_URL);

const newSession = sessions(900);

/** A token with only `sub` (and its expiry), as Supabase Auth issues. */
const subOnly = (sub) => signJwt({ sub, exp: nowSec() + 3600 }, SECRET);

let server;
before(async () => {
  assert.ok(DB, 'FANOUT_TEST_DATABASE_URL must be set (tests/js_suites.rs sets it)');
  server = await startServer({
    args: [
      '--database-url', DB,
      '--cdc-routes', ROUTES,
      '--cdc-slot', SLOT,
      '--auth-memberships', MEMBERSHIPS,
      '--auth-tables', TABLES,
      '--auth-channels', CHANNELS,
    ],
  });
  await changeStreamRunning(server);
});
afterEach(async () => {
  await disconnectAll();
});
after(async () => {
  await server?.stop();
  if (!cluster) sql(`SELECT pg_drop_replication_slot('${SLOT}') FROM pg_replication_slots WHERE slot_name = '${SLOT}' AND NOT active`);
});

const join = (w, u, name = 'P') =>
  sql(`INSERT INTO workshop_participants (session_id, user_id, display_name) VALUES (${w}, '${u}', '${name}')`);
const leave = (w, u) => sql(`DELETE FROM workshop_participants WHERE session_id = ${w} AND user_id = '${u}'`);
const activity = (w, seq) => sql(`INSERT INTO workshop_activities (session_id, kind, seq) VALUES (${w}, 'note', ${seq})`);

/** Subscribes `client` to workshop `w`'s activity inserts; pushes `{w, seq}` to `got`. */
async function watchWorkshop(client, w, got, { private: priv = false } = {}) {
  const ch = client
    .channel(`workshop:${w}`, { config: { private: priv } })
    .on('postgres_changes', { event: 'INSERT', schema: 'public', table: 'workshop_activities', filter: `session_id=eq.${w}` }, (p) =>
      got.push({ w, seq: p.new.seq }),
    );
  await subscribe(ch);
  return ch;
}

test('a token with only sub receives the rows of its workshops from the membership table, and none of the others', async () => {
  const [w7, w42] = [newSession(), newSession()];
  const u = randomUUID();
  join(w7, u);
  const client = makeClient(server, { apikey: subOnly(u) });
  const got = [];
  await watchWorkshop(client, w7, got);
  await watchWorkshop(client, w42, got);
  activity(w42, 1);
  activity(w7, 2);
  await waitFor(() => got.some((g) => g.seq === 2), 10000, "workshop 7's row");
  await sleep(500);
  assert.deepEqual(got, [{ w: w7, seq: 2 }], `only workshop 7's row: ${safeJson(got)}`);
});

test('a membership row committed before a change grants it; one deleted before a change revokes it and ends the private channel', async () => {
  const [w7, w42] = [newSession(), newSession()];
  const u = randomUUID();
  join(w7, u);
  const client = makeClient(server, { apikey: subOnly(u) });
  const got = [];
  await watchWorkshop(client, w7, got);
  await watchWorkshop(client, w42, got);
  // Not a member of 42 yet: its private channel is refused.
  const early = makeClient(server, { apikey: subOnly(u) });
  const refused = await subscribeOutcome(early.channel(`workshop:${w42}`, { config: { private: true } }), {
    watchMs: 3000,
    graceMs: 300,
  });
  assert.ok(!refused.some((s) => s.status === 'SUBSCRIBED'), safeJson(refused));
  assert.match(safeJson(refused), /not allowed to join private channel/);

  // Granted: the membership row, then at once a row of 42 (two commits).
  join(w42, u);
  activity(w42, 10);
  await waitFor(() => got.some((g) => g.seq === 10), 10000, 'the row committed right after the membership');
  // The private channel of 42 now joins through the membership.
  // (On a client of its own: realtime-js keeps one channel per topic, and
  // the private channel's topic is the public one's.)
  const systems = [];
  const privateClient = makeClient(server, { apikey: subOnly(u) });
  const priv = privateClient.channel(`workshop:${w42}`, { config: { private: true } });
  priv.on('system', {}, (m) => systems.push(m));
  await subscribe(priv);

  // Revoked: the delete, then at once a row of 42, then one of 7.
  leave(w42, u);
  activity(w42, 11);
  activity(w7, 12);
  await waitFor(() => got.some((g) => g.seq === 12), 10000, "workshop 7's later row");
  await waitFor(
    () => systems.some((m) => m.status === 'error' && /access revoked/.test(m.message)),
    10000,
    'the private channel to end with a system message',
  ).catch((e) => assert.fail(`${e.message}: ${safeJson(systems)} ${safeJson(privateClient.__log.received.slice(-6))}`));
  await sleep(500);
  assert.ok(!got.some((g) => g.seq === 11), `the row committed after the revocation arrived: ${safeJson(got)}`);
  assert.deepEqual(
    got.map((g) => g.seq),
    [10, 12],
  );
  assert.equal(priv.state, 'closed', 'the private channel is closed by the server');
});

test('two users, one table: each sees only its own workshops', async () => {
  const [wa, wb] = [newSession(), newSession()];
  const [ua, ub] = [randomUUID(), randomUUID()];
  join(wa, ua);
  join(wb, ub);
  const a = makeClient(server, { apikey: subOnly(ua) });
  const b = makeClient(server, { apikey: subOnly(ub) });
  const [gotA, gotB] = [[], []];
  for (const [c, g] of [
    [a, gotA],
    [b, gotB],
  ]) {
    await watchWorkshop(c, wa, g);
    await watchWorkshop(c, wb, g);
  }
  activity(wa, 1);
  activity(wb, 2);
  await waitFor(() => gotA.length >= 1 && gotB.length >= 1, 10000, 'each user one row');
  await sleep(300);
  assert.deepEqual(gotA, [{ w: wa, seq: 1 }]);
  assert.deepEqual(gotB, [{ w: wb, seq: 2 }]);
});

test('Socket.IO and room clients: a revoked membership ends their private channel too', async () => {
  const w = newSession();
  const u = randomUUID();
  join(w, u);
  // A join is decided by the edge's mirror as it stands: wait until it
  // has the membership (a row committed after it arrives).
  const got = [];
  await watchWorkshop(makeClient(server, { apikey: subOnly(u) }), w, got);
  activity(w, 1);
  await waitFor(() => got.length === 1, 10000, 'the row committed after the membership');
  const opts = (auth) => ({ transports: ['websocket'], auth, forceNew: true, reconnection: false });
  // A private channel namespace, and a private channel joined on the main namespace.
  const nsp = io(`${server.url}/workshop:${w}`, opts({ token: subOnly(u), private: true }));
  const main = io(server.url, opts({ token: subOnly(u) }));
  const room = new WebSocket(`ws://127.0.0.1:${server.port}/rooms/${encodeURIComponent(`workshop:${w}`)}?token=${subOnly(u)}&private=true`);
  const roomGot = [];
  room.on('message', (d) => roomGot.push(JSON.parse(String(d))));
  const roomClosed = new Promise((resolve) => room.on('close', (code, reason) => resolve({ code, reason: String(reason) })));
  try {
    await Promise.all(
      [nsp, main].map(
        (s) =>
          new Promise((resolve, reject) => {
            s.once('connect', resolve);
            s.once('connect_error', reject);
          }),
      ),
    );
    assert.deepEqual(await main.timeout(5000).emitWithAck('join', { channel: `workshop:${w}`, private: true }), { ok: true });
    await waitFor(() => roomGot.some((m) => m.type === 'welcome'), 5000, 'the room welcome');
    const nspErrors = [];
    nsp.on('fanout:error', (e) => nspErrors.push(e));
    const nspGone = new Promise((resolve) => nsp.once('disconnect', resolve));
    const unsubscribed = new Promise((resolve) => main.once('fanout:unsubscribed', resolve));

    leave(w, u);
    assert.equal(await nspGone, 'io server disconnect', 'the namespace is disconnected by the server');
    assert.match(safeJson(nspErrors), /access revoked/);
    const u2 = await unsubscribed;
    assert.equal(u2.channel, `workshop:${w}`);
    assert.match(u2.reason, /access revoked/);
    const closed = await roomClosed;
    assert.equal(closed.code, 1008, safeJson(closed));
    assert.match(closed.reason, /access revoked/);
    assert.ok(main.connected, 'the main namespace stays connected');
  } finally {
    nsp.disconnect();
    main.disconnect();
    room.terminate();
  }
});
