// What apps built on @supabase/supabase-js meet, written the way they use it
// (createClient with the ws transport on Node 20):
// - a channel subscribed without a presence listener gets presence from its
//   first track(), as on Supabase Realtime (realtime-js asks for none then);
//   the same payload tracked again changes nothing;
// - resume through a load balancer: the app keeps `config.resume.after`
//   current with channel.updateJoinPayload, the connection drops, the
//   rejoin (possibly on another edge) replays what was missed, then live.
// In the cluster run (FANOUT_TEST_NATS_URL) the second server is a second
// edge on the same NATS (and Redis, when FANOUT_TEST_REDIS_URL is set).
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { createClient } from '@supabase/supabase-js';
import { startServer, uniqueRoom, waitFor, sleep, safeJson, loadBalancer, supabaseClient, subscribed } from './helpers.mjs';

const cluster = Boolean(process.env.FANOUT_TEST_NATS_URL);
let servers = [];
const clients = [];

before(async () => {
  const first = await startServer();
  // Standalone has one process; a cluster run spreads the clients over two edges.
  servers = cluster ? [first, await startServer()] : [first, first];
});
after(async () => {
  for (const sb of clients) await Promise.race([sb.removeAllChannels(), sleep(2000)]).catch(() => {});
  for (const sb of clients) await Promise.race([sb.realtime.disconnect(), sleep(2000)]).catch(() => {});
  for (const s of new Set(servers)) await s.stop();
});

/** A supabase-js client (closed after the file's tests). */
function supabase(baseUrl) {
  const sb = supabaseClient(baseUrl);
  clients.push(sb);
  return sb;
}

const keys = (ch) => Object.values(ch.presenceState()).flatMap((metas) => metas.map((m) => m.name)).sort();

test('a channel subscribed without a presence listener gets presence from its first track', async () => {
  const room = uniqueRoom('track-enables');
  const [a, b] = [supabase(servers[0].url), supabase(servers[1].url)];
  // No .on('presence') before subscribe(): realtime-js sends presence.enabled = false.
  const [cha, chb] = [a.channel(room), b.channel(room)];
  await subscribed(cha);
  await subscribed(chb);
  assert.equal(cha.joinPush.payload().config.presence.enabled, false, 'the client asked for no presence');

  assert.equal(await cha.track({ name: 'ann' }), 'ok');
  await waitFor(() => keys(cha).join() === 'ann', 5000, 'ann sees herself').catch((e) =>
    assert.fail(`${e.message}: ${safeJson(cha.presenceState())}`),
  );
  assert.equal(await chb.track({ name: 'bob' }), 'ok');
  for (const [who, ch] of [['ann', cha], ['bob', chb]]) {
    await waitFor(() => keys(ch).join() === 'ann,bob', 5000, `${who} sees both`).catch((e) =>
      assert.fail(`${e.message}: ${who}'s presenceState()=${safeJson(ch.presenceState())}`),
    );
  }

  // The same payload again changes nothing: no diff about ann reaches bob.
  // (Presence callbacks cannot be added after subscribe(), so bob's socket
  // is watched instead.)
  const annDiffs = [];
  b.realtime.socketAdapter.onMessage((m) => {
    const joins = m.event === 'presence_diff' ? Object.values(m.payload.joins ?? {}).flatMap((p) => p.metas) : [];
    if (joins.some((meta) => meta.name === 'ann')) annDiffs.push(joins);
  });
  assert.equal(await cha.track({ name: 'ann' }), 'ok');
  // A changed payload is an update, which bob sees.
  assert.equal(await cha.track({ name: 'ann', status: 'away' }), 'ok');
  await waitFor(() => annDiffs.length > 0, 5000, 'bob sees the update');
  await sleep(300);
  assert.equal(annDiffs.length, 1, `one diff about ann, the update (none for the repeat): ${safeJson(annDiffs)}`);
  assert.equal(annDiffs[0][0].status, 'away');
  await waitFor(() => Object.values(chb.presenceState()).flat().some((m) => m.name === 'ann' && m.status === 'away'), 5000, "bob's state has the update");
  const ann = Object.values(chb.presenceState()).flat().filter((m) => m.name === 'ann');
  assert.equal(ann.length, 1, `one ann, updated: ${safeJson(chb.presenceState())}`);

  // untrack reaches the other side, and so does a disconnect.
  assert.equal(await cha.untrack(), 'ok');
  await waitFor(() => keys(chb).join() === 'bob', 5000, "bob sees ann's untrack").catch((e) =>
    assert.fail(`${e.message}: ${safeJson(chb.presenceState())}`),
  );
  assert.equal(await cha.track({ name: 'ann' }), 'ok');
  await waitFor(() => keys(chb).join() === 'ann,bob', 5000, 'bob sees ann again');
  await a.realtime.disconnect();
  await waitFor(() => keys(chb).join() === 'bob', 5000, "bob sees ann's disconnect").catch((e) =>
    assert.fail(`${e.message}: ${safeJson(chb.presenceState())}`),
  );
});

test('resume through a load balancer: updateJoinPayload keeps config.resume.after current, the rejoin replays what was missed, then live', async () => {
  const room = uniqueRoom('resume-lb');
  // The subscriber's first connection goes to servers[0], its reconnect to servers[1].
  const lb = await loadBalancer(servers);
  try {
    const sub = supabase(lb.url);
    const pub = supabase(servers[0].url);
    const got = [];
    const ch = sub.channel(room);
    ch.on('broadcast', { event: 'n' }, ({ payload, meta }) => {
      got.push({ n: payload.n, id: meta.id, replayed: Boolean(meta.replayed) });
      // The README's snippet: the next (re)join asks for what came after this.
      const { config } = ch.joinPush.payload();
      ch.updateJoinPayload({ config: { ...config, resume: { after: meta.id } } });
    });
    await subscribed(ch);
    const pch = pub.channel(room, { config: { broadcast: { ack: true } } });
    await subscribed(pch);
    const send = async (n) => assert.equal(await pch.send({ type: 'broadcast', event: 'n', payload: { n } }), 'ok');

    for (const n of [1, 2, 3]) await send(n);
    await waitFor(() => got.length === 3, 5000, 'the first three arrive live');
    lb.down();
    await waitFor(() => !sub.realtime.isConnected(), 5000, 'the subscriber noticed the drop');
    for (const n of [4, 5, 6]) await send(n);
    lb.up();
    await waitFor(() => got.length >= 6, 10000, 'the missed three are replayed after the rejoin').catch((e) =>
      assert.fail(`${e.message}: got ${safeJson(got)}`),
    );
    await send(7);
    await waitFor(() => got.length >= 7, 5000, 'then live again').catch((e) => assert.fail(`${e.message}: got ${safeJson(got)}`));
    await sleep(300);
    assert.deepEqual(got.map((g) => g.n), [1, 2, 3, 4, 5, 6, 7], `each once, in order: ${safeJson(got)}`);
    assert.deepEqual(got.map((g) => g.replayed), [false, false, false, true, true, true, false]);
    assert.deepEqual(
      got.map((g) => Number(g.id)),
      [...got.map((g) => Number(g.id))].sort((x, y) => x - y),
      'positions increase',
    );
  } finally {
    lb.down();
    await lb.close();
  }
});
