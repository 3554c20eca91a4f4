// postgres_changes with the real @supabase/realtime-js client against
// standalone fanout running its in-process ingester on a private PostgreSQL
// (started by tests/tests/js_suites.rs, which passes its URL in
// FANOUT_TEST_DATABASE_URL with deploy/sql/workshop.sql applied), and again
// against a cluster edge fed by a separate `fanout cdc` over NATS.
import { test, before, after, afterEach } from 'node:test';
import assert from 'node:assert/strict';
import {
  startServer,
  makeClient,
  subscribe,
  subscribeOutcome,
  disconnectAll,
  waitFor,
  sleep,
  safeJson,
  loadBalancer,
  supabaseClient,
  subscribed,
  makeToken,
} from '../protocol/helpers.mjs';
import { DB, ROUTES, OPEN_TABLES, sql, sessions, changeStreamRunning } from './db.mjs';

const STRICT_TABLES =
  "{'public.workshop_sessions' = {read = 'public'}, " +
  "'public.workshop_participants' = {read = 'session_id in claims.workshops', columns = ['id', 'session_id', 'display_name', 'role']}}";

const newSession = sessions(100);

let server;
before(async () => {
  assert.ok(DB, 'FANOUT_TEST_DATABASE_URL must point at a PostgreSQL with wal_level=logical (tests/js_suites.rs sets it)');
  server = await startServer({ args: ['--database-url', DB, '--cdc-routes', ROUTES, '--auth-tables', OPEN_TABLES] });
  await changeStreamRunning(server);
});
afterEach(async () => {
  await disconnectAll();
});
after(async () => {
  await server?.stop();
});

for (const vsn of ['1.0.0', '2.0.0']) {
  test(`vsn ${vsn}: INSERT, UPDATE and DELETE arrive typed, filtered, with old rows`, async () => {
    const s = newSession();
    const other = newSession();
    const client = makeClient(server, { vsn });
    const got = [];
    const sessions = [];
    const ch = client
      .channel(`workshop:${s}`)
      .on('postgres_changes', { event: '*', schema: 'public', table: 'workshop_activities', filter: `session_id=eq.${s}` }, (p) =>
        got.push(p),
      )
      .on('postgres_changes', { event: 'UPDATE', schema: 'public', table: 'workshop_sessions', filter: `id=eq.${s}` }, (p) =>
        sessions.push(p),
      );
    const systems = [];
    ch.on('system', {}, (m) => systems.push(m));
    await subscribe(ch);

    sql(`INSERT INTO workshop_activities (session_id, kind, seq) VALUES (${other}, 'elsewhere', 0)`);
    sql(`INSERT INTO workshop_activities (session_id, kind, seq, body) VALUES (${s}, 'chat', 1, '{"text":"hello","n":[1,2]}')`);
    sql(`UPDATE workshop_activities SET kind = 'edited' WHERE session_id = ${s} AND seq = 1`);
    sql(`DELETE FROM workshop_activities WHERE session_id = ${s} AND seq = 1`);
    sql(`UPDATE workshop_sessions SET stage = 'vote' WHERE id = ${other}`);
    sql(`UPDATE workshop_sessions SET stage = 'vote', settings = '{"timer":90}' WHERE id = ${s}`);

    await waitFor(() => got.length >= 3 && sessions.length >= 1, 10000, 'three activity changes and one session update');
    await sleep(300);
    assert.deepEqual(
      got.map((p) => p.eventType),
      ['INSERT', 'UPDATE', 'DELETE'],
    );
    assert.equal(sessions.length, 1, 'the other session\'s update is filtered out');
    const [ins, upd, del] = got;
    assert.equal(ins.schema, 'public');
    assert.equal(ins.table, 'workshop_activities');
    assert.match(ins.commit_timestamp, /^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$/);
    assert.equal(ins.errors, null);
    assert.equal(ins.new.session_id, s, 'bigint arrives as a number');
    assert.equal(ins.new.kind, 'chat');
    assert.deepEqual(ins.new.body, { text: 'hello', n: [1, 2] }, 'jsonb arrives as an object');
    assert.match(ins.new.created_at, /^\d{4}-\d\d-\d\dT/, 'timestamptz arrives as an ISO string');
    assert.deepEqual(ins.old, {});
    assert.equal(upd.new.kind, 'edited');
    assert.equal(upd.old.kind, 'chat', 'REPLICA IDENTITY FULL gives the old row');
    assert.deepEqual(del.new, {});
    assert.equal(del.old.id, ins.new.id);
    assert.equal(sessions[0].new.stage, 'vote');
    assert.deepEqual(sessions[0].new.settings, { timer: 90 });
    assert.equal(sessions[0].old.stage, 'lobby');
    assert.ok(
      systems.some((m) => m.extension === 'postgres_changes' && m.status === 'ok' && /Subscribed to PostgreSQL/.test(m.message)),
      `system message: ${JSON.stringify(systems)}`,
    );
  });
}

test('a change committed right after SUBSCRIBED is delivered (20 fresh joins)', async () => {
  const client = makeClient(server);
  for (let i = 0; i < 20; i++) {
    const s = newSession();
    const got = [];
    const ch = client
      .channel(`workshop:${s}`)
      .on('postgres_changes', { event: 'INSERT', schema: 'public', table: 'workshop_activities', filter: `session_id=eq.${s}` }, (p) =>
        got.push(p),
      );
    await new Promise((resolve, reject) => {
      ch.subscribe((status, err) => {
        if (status !== 'SUBSCRIBED') return reject(new Error(`${status}: ${err?.message}`));
        // Committed synchronously, before anything else can run.
        sql(`INSERT INTO workshop_activities (session_id, kind, seq) VALUES (${s}, 'first', ${i})`);
        resolve();
      });
    });
    await waitFor(() => got.length === 1, 5000, `join ${i}: the change committed right after SUBSCRIBED`);
    await client.removeChannel(ch);
  }
});

test('a 10,000-row UPDATE in one statement arrives complete and in commit order', async () => {
  const s = newSession();
  sql(
    `INSERT INTO workshop_activities (session_id, kind, seq) SELECT ${s}, 'bulk', g FROM generate_series(0, 9999) g`,
  );
  const client = makeClient(server);
  const got = [];
  const ch = client
    .channel(`workshop:${s}`)
    .on('postgres_changes', { event: 'UPDATE', schema: 'public', table: 'workshop_activities', filter: `session_id=eq.${s}` }, (p) =>
      got.push(p.new.seq),
    );
  await subscribe(ch);
  sql(`UPDATE workshop_activities SET kind = 'bulk-updated' WHERE session_id = ${s}`);
  await waitFor(() => got.length >= 10000, 60000, '10,000 updates');
  await sleep(300);
  assert.equal(got.length, 10000, 'no duplicates');
  assert.equal(new Set(got).size, 10000, 'every row once');
  // The statement updated the rows in the order they were inserted, so
  // the WAL (commit) order is ascending seq.
  assert.ok(
    got.every((v, i) => i === 0 || got[i - 1] < v),
    'in commit order',
  );
});

test('a filter that fails on a row only silences its own binding', async () => {
  const s = newSession();
  const client = makeClient(server);
  const good = [];
  const bad = [];
  // `id=eq.abc` cannot be compared with a number: that binding gets nothing
  // (and `title=eq.abc` simply does not match), while the third binding, on
  // the same channel and table, still gets its row.
  const ch = client
    .channel('room-filters')
    .on('postgres_changes', { event: 'INSERT', schema: 'public', table: 'workshop_sessions', filter: 'title=eq.abc' }, (p) => bad.push(p))
    .on('postgres_changes', { event: 'INSERT', schema: 'public', table: 'workshop_sessions', filter: 'id=eq.abc' }, (p) => bad.push(p))
    .on('postgres_changes', { event: 'INSERT', schema: 'public', table: 'workshop_sessions', filter: `id=gt.${s}` }, (p) => good.push(p));
  await subscribe(ch);
  const next = newSession();
  await waitFor(() => good.length === 1, 5000, 'the working binding');
  assert.equal(good[0].new.id, next);
  await sleep(300);
  assert.equal(bad.length, 0);
});

test('an invalid binding fails the join with the reason', async () => {
  const client = makeClient(server);
  const ch = client
    .channel('room-bad-binding')
    .on('postgres_changes', { event: '*', schema: 'public', table: 'workshop_sessions', filter: 'id=like.1%' }, () => {});
  const outcome = await subscribeOutcome(ch);
  const err = outcome.find((o) => o.status === 'CHANNEL_ERROR');
  assert.ok(err, `statuses: ${JSON.stringify(outcome)}`);
  assert.match(JSON.stringify(outcome), /filter/);
});

test('supabase-js resume through a load balancer replays the database changes routed to the joined channel', async () => {
  const s = newSession();
  const lb = await loadBalancer([server]);
  const [sub, pub] = [supabaseClient(lb.url), supabaseClient(server.url)];
  const activities = { event: 'INSERT', schema: 'public', table: 'workshop_activities', filter: `session_id=eq.${s}` };
  try {
    const seen = [];
    const ch = sub
      .channel(`workshop:${s}`)
      .on('broadcast', { event: 'mark' }, ({ payload, meta }) => {
        seen.push(`mark ${payload.n}${meta.replayed ? ' (replayed)' : ''}`);
        // The README's snippet: the next (re)join resumes after this position.
        const { config } = ch.joinPush.payload();
        ch.updateJoinPayload({ config: { ...config, resume: { after: meta.id } } });
      })
      .on('postgres_changes', activities, (p) => seen.push(`row ${p.new.seq}`));
    await subscribed(ch);
    // The publisher also watches the rows, to know when they are on the channel.
    const stored = [];
    const pch = pub
      .channel(`workshop:${s}`, { config: { broadcast: { ack: true } } })
      .on('postgres_changes', activities, (p) => stored.push(p.new.seq));
    await subscribed(pch);
    assert.equal(await pch.send({ type: 'broadcast', event: 'mark', payload: { n: 1 } }), 'ok');
    await waitFor(() => seen.length === 1, 5000, 'the first mark arrives live');

    lb.down();
    await waitFor(() => !sub.realtime.isConnected(), 5000, 'the subscriber noticed the drop');
    sql(`INSERT INTO workshop_activities (session_id, kind, seq) VALUES (${s}, 'chat', 1), (${s}, 'chat', 2)`);
    await waitFor(() => stored.length === 2, 10000, 'the rows reached the channel');
    assert.equal(await pch.send({ type: 'broadcast', event: 'mark', payload: { n: 2 } }), 'ok');
    lb.up();
    await waitFor(() => seen.length >= 4, 10000, 'the missed rows and mark arrive after the rejoin').catch((e) =>
      assert.fail(`${e.message}: saw ${safeJson(seen)}`),
    );
    await sleep(300);
    assert.deepEqual(
      seen,
      ['mark 1', 'row 1', 'row 2', 'mark 2 (replayed)'],
      `the missed rows and mark once each, in channel order: ${safeJson(seen)}`,
    );
  } finally {
    lb.down();
    await lb.close();
    for (const c of [sub, pub]) await Promise.race([c.removeAllChannels(), sleep(2000)]).catch(() => {});
  }
});

test('supabase-js as the workshop apps use it: one channel per workshop with four bindings, shared-key presence, self broadcasts, setAuth and removeChannel', async () => {
  const s = newSession();
  const users = [0, 1, 2].map(() => supabaseClient(server.url));
  const changes = { workshop_sessions: [], workshop_participants: [], workshop_activities: [], workshop_stage_submissions: [] };
  const chats = [];
  const channels = users.map((sb, i) => {
    const ch = sb.channel(`workshop-session:${s}`, { config: { presence: { key: 'team-blue' }, broadcast: { self: true } } });
    if (i === 0) {
      ch.on('postgres_changes', { event: '*', schema: 'public', table: 'workshop_sessions', filter: `id=eq.${s}` }, (p) =>
        changes.workshop_sessions.push(p),
      );
      for (const table of ['workshop_participants', 'workshop_activities', 'workshop_stage_submissions']) {
        ch.on('postgres_changes', { event: '*', schema: 'public', table, filter: `session_id=eq.${s}` }, (p) => changes[table].push(p));
      }
      ch.on('broadcast', { event: 'chat' }, ({ payload }) => chats.push(payload.text));
    }
    ch.on('presence', { event: 'sync' }, () => {});
    return ch;
  });
  try {
    for (const ch of channels) await subscribed(ch);
    for (const [i, ch] of channels.entries()) assert.equal(await ch.track({ user: i }), 'ok');
    const teamMetas = () => (channels[0].presenceState()['team-blue'] ?? []).map((m) => m.user).sort();
    await waitFor(() => teamMetas().join() === '0,1,2', 5000, 'three users under one key').catch((e) =>
      assert.fail(`${e.message}: ${safeJson(channels[0].presenceState())}`),
    );

    const user = '7b2e4f9a-1c3d-4e5f-8a9b-0c1d2e3f4a5b';
    const pid = sql(`INSERT INTO workshop_participants (session_id, user_id, display_name) VALUES (${s}, '${user}', 'Ann') RETURNING id`);
    sql(`INSERT INTO workshop_activities (session_id, participant_id, kind, body, seq) VALUES (${s}, ${pid}, 'chat', '{"text":"hi","n":[1,2]}', 1)`);
    sql(`INSERT INTO workshop_stage_submissions (session_id, participant_id, stage, content, score, tags) VALUES (${s}, ${pid}, 'ideas', 'idea', 4.5, '{a,b}')`);
    sql(`UPDATE workshop_sessions SET stage = 'vote' WHERE id = ${s}`);
    await waitFor(() => Object.values(changes).every((c) => c.length >= 1), 10000, 'a change of each table').catch((e) =>
      assert.fail(`${e.message}: ${safeJson(Object.fromEntries(Object.entries(changes).map(([k, v]) => [k, v.length])))}`),
    );
    const [participant] = changes.workshop_participants;
    assert.equal(participant.eventType, 'INSERT');
    assert.equal(participant.new.user_id, user);
    assert.equal(participant.new.session_id, s, 'bigint as a number');
    const [activity] = changes.workshop_activities;
    assert.deepEqual(activity.new.body, { text: 'hi', n: [1, 2] }, 'jsonb as an object');
    const [submission] = changes.workshop_stage_submissions;
    assert.equal(submission.new.score, 4.5, 'numeric as a number');
    assert.deepEqual(submission.new.tags, ['a', 'b'], 'text[] as an array');
    // (The session's own INSERT, committed just before the join, may come too.)
    await waitFor(() => changes.workshop_sessions.some((c) => c.eventType === 'UPDATE'), 10000, 'the session update');
    const session = changes.workshop_sessions.find((c) => c.eventType === 'UPDATE');
    assert.equal(session.new.stage, 'vote');

    assert.equal(await channels[0].send({ type: 'broadcast', event: 'chat', payload: { text: 'mine' } }), 'ok');
    await waitFor(() => chats.includes('mine'), 5000, 'self: true delivers my own broadcast');

    // A fresh token keeps every channel alive (realtime-js sends it to each).
    await users[0].realtime.setAuth(makeToken({ sub: 'user-1' }));
    sql(`INSERT INTO workshop_activities (session_id, kind, seq) VALUES (${s}, 'chat', 2)`);
    await waitFor(() => changes.workshop_activities.length >= 2, 10000, 'changes after setAuth');
    assert.equal(channels[0].state, 'joined', 'still joined after setAuth');
    assert.equal(await channels[0].send({ type: 'broadcast', event: 'chat', payload: { text: 'after' } }), 'ok');
    await waitFor(() => chats.includes('after'), 5000, 'broadcasts after setAuth');

    // removeChannel leaves cleanly, and the others see one meta fewer.
    assert.equal(await users[2].removeChannel(channels[2]), 'ok');
    await waitFor(() => teamMetas().join() === '0,1', 5000, 'the removed channel left presence').catch((e) =>
      assert.fail(`${e.message}: ${safeJson(channels[0].presenceState())}`),
    );
  } finally {
    for (const sb of users) await Promise.race([sb.removeAllChannels(), sleep(2000)]).catch(() => {});
  }
});

test('row policies: a workshop-7 subscriber receives none of workshop 42\'s rows, and the column allow-list strips the rest', async () => {
  // An edge of its own with strict rules (standalone: its own ingester on
  // its own slot; cluster: fed by the same `fanout cdc` over NATS).
  const strict = await startServer({
    args: ['--database-url', DB, '--cdc-routes', ROUTES, '--cdc-slot', 'fanout_policy_test', '--auth-tables', STRICT_TABLES],
  });
  try {
    if (!process.env.FANOUT_TEST_NATS_URL) {
      await waitFor(
        async () => /^fanout_cdc_active 1$/m.test(await (await fetch(`${strict.adminUrl}/metrics`)).text()),
        15000,
        'the strict server\'s change stream',
      );
    }
    const [w7, w42] = [newSession(), newSession()];
    const rows = { a7: [], a42: [], b42: [] };
    const on = (ch, key, session) =>
      ch.on('postgres_changes', { event: 'INSERT', schema: 'public', table: 'workshop_participants', filter: `session_id=eq.${session}` }, (p) =>
        rows[key].push(p.new),
      );
    // A is in workshop 7 and asks for 42's rows too; B is in 42.
    const a = makeClient(strict, { apikey: makeToken({ sub: 'a', workshops: [w7] }) });
    const b = makeClient(strict, { apikey: makeToken({ sub: 'b', workshops: [w42] }) });
    await subscribe(on(a.channel(`workshop:${w7}`), 'a7', w7));
    await subscribe(on(a.channel(`workshop:${w42}`), 'a42', w42));
    await subscribe(on(b.channel(`workshop:${w42}`), 'b42', w42));
    // A table without a rule is refused, by name.
    const noRule = a
      .channel(`workshop:${w7}:acts`)
      .on('postgres_changes', { event: '*', schema: 'public', table: 'workshop_activities', filter: `session_id=eq.${w7}` }, () => {});
    const seen = await subscribeOutcome(noRule, { watchMs: 3000, graceMs: 300 });
    assert.ok(!seen.some((s) => s.status === 'SUBSCRIBED'), `joined a table without a rule: ${safeJson(seen)}`);
    assert.match(safeJson(seen), /public\.workshop_activities/);

    sql(`INSERT INTO workshop_participants (session_id, user_id, display_name) VALUES (${w42}, gen_random_uuid(), 'Bo')`);
    sql(`INSERT INTO workshop_participants (session_id, user_id, display_name) VALUES (${w7}, gen_random_uuid(), 'Al')`);
    await waitFor(() => rows.b42.length === 1 && rows.a7.length === 1, 10000, 'each workshop\'s row to its member');
    await sleep(500);
    assert.equal(rows.a42.length, 0, `workshop 7's member received workshop 42's row: ${safeJson(rows.a42)}`);
    assert.deepEqual(Object.keys(rows.b42[0]).sort(), ['display_name', 'id', 'role', 'session_id'], 'user_id and joined_at are stripped');
    assert.equal(rows.b42[0].display_name, 'Bo');
    assert.equal(rows.a7[0].display_name, 'Al');
  } finally {
    await disconnectAll();
    await strict.stop();
    if (!process.env.FANOUT_TEST_NATS_URL) sql("SELECT pg_drop_replication_slot('fanout_policy_test') FROM pg_replication_slots WHERE slot_name = 'fanout_policy_test' AND NOT active");
  }
});
