// Database changes and channel policies for socket.io-client 4.8 sockets:
// the rows routed to a channel arrive as `socket.on('postgres_changes')`
// with the change record, on the main namespace and on a channel's own
// namespace, public or private (a private channel's changes come through a
// feed in the public channel the ingester routes them to); private
// channels follow the same [[auth.channels]] rules as realtime-js (a
// non-member is refused at CONNECT, a read-only member may not emit).
// Runs against standalone with its in-process ingester and, in the
// cluster pass, an edge fed by `fanout cdc` (tests/tests/js_suites.rs).
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { io } from 'socket.io-client';
import { startServer, makeToken, waitFor, sleep, safeJson } from '../protocol/helpers.mjs';
import { DB, ROUTES, OPEN_TABLES, sql, sessions, changeStreamRunning } from './db.mjs';

const RULES =
  "[{pattern = 'workshop:{id}', read = '{id} in claims.workshops', " +
  "write = \"{id} in claims.workshops and claims.role == 'facilitator'\"}]";

const newSession = sessions(5000);

let server;
const sockets = [];
before(async () => {
  assert.ok(DB, 'FANOUT_TEST_DATABASE_URL must point at a PostgreSQL with wal_level=logical (tests/js_suites.rs sets it)');
  server = await startServer({
    args: ['--database-url', DB, '--cdc-routes', ROUTES, '--auth-tables', OPEN_TABLES, '--auth-channels', RULES],
  });
  await changeStreamRunning(server);
});
after(async () => {
  for (const s of sockets) s.disconnect();
  await server?.stop();
});

function connect(nsp, auth) {
  const s = io(`${server.url}${nsp ? `/${nsp}` : ''}`, { transports: ['websocket'], auth, forceNew: true, reconnection: false });
  sockets.push(s);
  return s;
}

const outcome = (s) =>
  new Promise((resolve) => {
    s.once('connect', () => resolve({ ok: true }));
    s.once('connect_error', (e) => resolve({ ok: false, message: e.message }));
  });

test('rows routed to a channel arrive as postgres_changes on the main namespace and on its namespace, only its own', async () => {
  const s = newSession();
  const other = newSession();
  const main = connect('', { token: makeToken() });
  assert.deepEqual(await outcome(main), { ok: true });
  const mainGot = [];
  main.on('postgres_changes', (c) => mainGot.push(c));
  assert.deepEqual(await main.timeout(5000).emitWithAck('join', `workshop:${s}`), { ok: true });
  const nsp = connect(`workshop:${s}`, { token: makeToken() });
  assert.deepEqual(await outcome(nsp), { ok: true });
  const nspGot = [];
  nsp.on('postgres_changes', (c, offset) => nspGot.push([c, offset]));

  sql(`INSERT INTO workshop_activities (session_id, kind, seq) VALUES (${other}, 'elsewhere', 0)`);
  sql(`INSERT INTO workshop_activities (session_id, kind, seq, body) VALUES (${s}, 'chat', 1, '{"text":"hello"}')`);
  sql(`UPDATE workshop_activities SET seq = 2 WHERE session_id = ${s}`);
  await waitFor(() => mainGot.length >= 2 && nspGot.length >= 2, 8000, 'two changes each').catch((e) =>
    assert.fail(`${e.message}: main=${safeJson(mainGot)} nsp=${safeJson(nspGot)}`),
  );
  await sleep(300);
  assert.equal(mainGot.length, 2, `only workshop ${s}'s rows: ${safeJson(mainGot)}`);
  const [ins, upd] = mainGot;
  assert.equal(ins.table, 'workshop_activities');
  assert.equal(ins.type, 'INSERT');
  assert.equal(ins.record.session_id, s);
  assert.deepEqual(ins.record.body, { text: 'hello' });
  assert.equal(upd.type, 'UPDATE');
  assert.equal(upd.record.seq, 2);
  assert.deepEqual(nspGot.map(([c]) => c.type), ['INSERT', 'UPDATE']);
  assert.match(nspGot[0][1], /^\d+$/, 'the namespace socket gets the position last');
});

test('private channels: members receive their changes through a feed, non-members are refused, read-only members may not emit', async () => {
  const s = newSession();
  const member = connect(`workshop:${s}`, { token: makeToken({ workshops: [s] }), private: true });
  assert.deepEqual(await outcome(member), { ok: true });
  const got = [];
  member.on('postgres_changes', (c) => got.push(c));
  member.on('chat', (p) => got.push(p));

  const outsider = connect(`workshop:${s}`, { token: makeToken({ workshops: [s + 1] }), private: true });
  const refused = await outcome(outsider);
  assert.equal(refused.ok, false);
  assert.match(refused.message, /not allowed to join private channel/);

  const ro = await member.timeout(5000).emitWithAck('chat', { text: 'may I?' });
  assert.equal(ro.ok, false);
  assert.match(ro.error, /may only read it/);
  const facilitator = connect(`workshop:${s}`, {
    token: makeToken({ sub: 'fac', workshops: [s], role: 'facilitator' }),
    private: true,
  });
  assert.deepEqual(await outcome(facilitator), { ok: true });
  assert.equal((await facilitator.timeout(5000).emitWithAck('chat', { text: 'welcome' })).ok, true);

  sql(`INSERT INTO workshop_activities (session_id, kind, seq) VALUES (${s}, 'poll', 1)`);
  await waitFor(() => got.length >= 2, 8000, 'the broadcast and the change').catch((e) => assert.fail(`${e.message}: ${safeJson(got)}`));
  assert.deepEqual(got[0], { text: 'welcome' });
  assert.equal(got[1].record.kind, 'poll');
});
