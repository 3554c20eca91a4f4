// Presence: presence_state then presence_diff, realtime-js sync/join/leave,
// untrack, and removal on disconnect / removeChannel.
import { test, before, after, afterEach } from 'node:test';
import assert from 'node:assert/strict';
import {
  startServer,
  makeClient,
  subscribe,
  disconnectAll,
  closeClient,
  describeClient,
  openRaw,
  closeAllRaw,
  uniqueRoom,
  safeJson,
  waitFor,
  assertHealthy,
} from './helpers.mjs';

let server;
before(async () => {
  server = await startServer();
});
afterEach(async () => {
  closeAllRaw();
  await disconnectAll();
});
after(async () => {
  await server?.stop();
});

function presenceMember(vsn, room, key) {
  const client = makeClient(server, { vsn });
  const ch = client.channel(room, { config: { presence: { key } } });
  const events = [];
  ch.on('presence', { event: 'sync' }, () => events.push({ event: 'sync', state: ch.presenceState() }));
  ch.on('presence', { event: 'join' }, (p) => events.push({ event: 'join', key: p.key, newPresences: p.newPresences }));
  ch.on('presence', { event: 'leave' }, (p) => events.push({ event: 'leave', key: p.key, leftPresences: p.leftPresences }));
  return { client, ch, events, key };
}

const keysOf = (ch) => Object.keys(ch.presenceState()).sort();

async function waitKeys(m, expected, ms, what) {
  await waitFor(() => JSON.stringify(keysOf(m.ch)) === JSON.stringify(expected), ms, what).catch((e) =>
    assert.fail(`${e.message}: ${m.key}'s presenceState()=${safeJson(m.ch.presenceState())}; presence events=${safeJson(m.events.slice(-6))}; ${describeClient(m.client)}`),
  );
}

function assertMeta(state, key, name) {
  const metas = state[key];
  assert.ok(Array.isArray(metas) && metas.length === 1, `presenceState()[${key}] should hold exactly one presence: ${safeJson(state)}`);
  assert.equal(metas[0].name, name, safeJson(metas));
  assert.ok(typeof metas[0].presence_ref === 'string' && metas[0].presence_ref.length > 0, `presence_ref (phx_ref on the wire) missing: ${safeJson(metas)}`);
}

test('presence (vsn 2.0.0 alice, vsn 1.0.0 bob): both see each other; untrack removes alice; disconnect removes bob', async () => {
  const room = uniqueRoom('presence');
  const alice = presenceMember('2.0.0', room, 'alice');
  const bob = presenceMember('1.0.0', room, 'bob');
  await subscribe(alice.ch);
  await subscribe(bob.ch);

  const ta = await alice.ch.track({ name: 'Alice' });
  assert.equal(ta, 'ok', `track() resolved ${safeJson(ta)}: realtime-js waits for a phx_reply ok to the "presence" push; ${describeClient(alice.client)}`);
  const tb = await bob.ch.track({ name: 'Bob' });
  assert.equal(tb, 'ok', `track() resolved ${safeJson(tb)}; ${describeClient(bob.client)}`);

  await waitKeys(alice, ['alice', 'bob'], 3000, 'alice sees alice and bob');
  await waitKeys(bob, ['alice', 'bob'], 3000, 'bob sees alice and bob');
  for (const m of [alice, bob]) {
    const st = m.ch.presenceState();
    assertMeta(st, 'alice', 'Alice');
    assertMeta(st, 'bob', 'Bob');
    assert.ok(m.events.some((e) => e.event === 'sync'), `${m.key} got no presence sync event`);
    const joinKeys = m.events.filter((e) => e.event === 'join').map((e) => e.key);
    assert.ok(joinKeys.includes('alice') && joinKeys.includes('bob'), `${m.key} join events: ${safeJson(joinKeys)}`);
  }
  // Both sides agree on the presence refs.
  assert.equal(alice.ch.presenceState().bob[0].presence_ref, bob.ch.presenceState().bob[0].presence_ref);

  // untrack: alice disappears for both.
  const ut = await alice.ch.untrack();
  assert.equal(ut, 'ok', `untrack() resolved ${safeJson(ut)}`);
  await waitKeys(bob, ['bob'], 3000, 'bob sees alice leave after untrack');
  await waitKeys(alice, ['bob'], 3000, 'alice sees herself gone after untrack');
  assert.ok(bob.events.some((e) => e.event === 'leave' && e.key === 'alice'), `bob got no leave event for alice: ${safeJson(bob.events.slice(-5))}`);

  // disconnect: bob disappears for alice within ~1 s.
  const t0 = Date.now();
  await closeClient(bob.client);
  await waitKeys(alice, [], 2000, 'alice sees bob removed after bob disconnected');
  const elapsed = Date.now() - t0;
  assert.ok(alice.events.some((e) => e.event === 'leave' && e.key === 'bob'), `alice got no leave event for bob: ${safeJson(alice.events.slice(-5))}`);
  assert.ok(elapsed < 2000, `presence removal after disconnect took ${elapsed} ms`);
});

test('raw vsn 1.0.0: presence_state arrives first (after the join reply), then presence_diff with phx_ref metas', async () => {
  const room = uniqueRoom('presence-raw');
  const topic = `realtime:${room}`;
  const raw = await openRaw(server, { vsn: '1.0.0' });
  const { reply } = await raw.join(topic, { presence: { key: 'watcher', enabled: true } });
  assert.equal(reply.payload?.status, 'ok', safeJson(reply));
  const state = await raw.waitMessage((m) => m.event === 'presence_state', 2000, 'presence_state after joining with presence enabled');
  assert.equal(state.topic, topic);
  assert.deepEqual(state.payload, {}, `empty room: presence_state should be {} but was ${safeJson(state.payload)}`);
  const iState = raw.messages.indexOf(state);
  const iReply = raw.messages.indexOf(reply);
  assert.ok(iReply < iState, 'presence_state must come after the join reply (realtime-js ignores diffs until a state arrives)');

  const carol = presenceMember('2.0.0', room, 'carol');
  await subscribe(carol.ch);
  assert.equal(await carol.ch.track({ name: 'Carol', mood: 'ok' }), 'ok');
  const diff = await raw.waitMessage((m) => m.event === 'presence_diff', 2000, 'presence_diff after carol tracks');
  assert.ok(raw.messages.indexOf(diff) > iState, 'presence_diff must come after presence_state');
  const metas = diff.payload?.joins?.carol?.metas;
  assert.ok(Array.isArray(metas) && metas.length === 1, `presence_diff.joins.carol.metas: ${safeJson(diff.payload)}`);
  assert.equal(metas[0].name, 'Carol');
  assert.equal(metas[0].mood, 'ok');
  assert.ok(typeof metas[0].phx_ref === 'string' && metas[0].phx_ref, `meta needs a phx_ref: ${safeJson(metas[0])}`);
  assert.deepEqual(diff.payload.leaves ?? null, {}, `leaves should be {} in a join-only diff: ${safeJson(diff.payload)}`);

  // A late joiner gets the current state in presence_state.
  const raw2 = await openRaw(server, { vsn: '2.0.0' });
  await raw2.join(topic, { presence: { key: 'late', enabled: true } });
  const st2 = await raw2.waitMessage((m) => m.event === 'presence_state', 2000, 'presence_state for a late joiner');
  assert.equal(st2.form, 'array', 'vsn 2.0.0 presence_state must be a JSON array frame');
  assert.equal(st2.payload?.carol?.metas?.[0]?.name, 'Carol', `late joiner state: ${safeJson(st2.payload)}`);
  assert.equal(st2.payload.carol.metas[0].phx_ref, metas[0].phx_ref, 'phx_ref should be stable between diff and state');
});

test('removeChannel removes the presence from the others', async () => {
  const room = uniqueRoom('presence-leave');
  const dave = presenceMember('1.0.0', room, 'dave');
  const erin = presenceMember('2.0.0', room, 'erin');
  await subscribe(dave.ch);
  await subscribe(erin.ch);
  assert.equal(await dave.ch.track({ name: 'Dave' }), 'ok');
  assert.equal(await erin.ch.track({ name: 'Erin' }), 'ok');
  await waitKeys(dave, ['dave', 'erin'], 3000, 'dave sees both');
  const r = await erin.client.removeChannel(erin.ch);
  assert.equal(r, 'ok', `removeChannel resolved ${safeJson(r)}`);
  await waitKeys(dave, ['dave'], 2000, 'dave sees erin leave after removeChannel');
});

test('tracking again replaces the meta instead of adding a second presence', async () => {
  const room = uniqueRoom('presence-update');
  const frank = presenceMember('2.0.0', room, 'frank');
  const gina = presenceMember('1.0.0', room, 'gina');
  await subscribe(frank.ch);
  await subscribe(gina.ch);
  assert.equal(await frank.ch.track({ name: 'Frank', status: 'online' }), 'ok');
  await waitKeys(gina, ['frank'], 3000, 'gina sees frank');
  assert.equal(await frank.ch.track({ name: 'Frank', status: 'away' }), 'ok');
  await waitFor(() => gina.ch.presenceState().frank?.[0]?.status === 'away', 3000, 'updated meta at gina').catch((e) =>
    assert.fail(`${e.message}: ${safeJson(gina.ch.presenceState())}`),
  );
  await waitFor(() => gina.ch.presenceState().frank?.length === 1, 1000, 'a single meta for frank').catch((e) =>
    assert.fail(`${e.message}: re-track should update, not add: ${safeJson(gina.ch.presenceState())}`),
  );
});

test('server still healthy after the presence tests', async () => {
  await assertHealthy(server, 'presence tests');
});
