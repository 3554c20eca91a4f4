// Joining channels (vsn 1.0.0 and 2.0.0), the join reply shape, refusal of a
// bare `realtime:` topic, leaving, and heartbeats on topic `phoenix`.
import { test, before, after, afterEach } from 'node:test';
import assert from 'node:assert/strict';
import {
  startServer,
  makeClient,
  subscribe,
  subscribeOutcome,
  disconnectAll,
  describeClient,
  openRaw,
  closeAllRaw,
  uniqueRoom,
  safeJson,
  sleep,
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

for (const vsn of ['1.0.0', '2.0.0']) {
  test(`vsn ${vsn}: realtime-js channel reaches SUBSCRIBED`, async () => {
    const client = makeClient(server, { vsn });
    assert.match(client.endpointURL(), new RegExp(`/realtime/v1/websocket\\?apikey=.+&vsn=${vsn.replace(/\./g, '\\.')}$`));
    const ch = client.channel(uniqueRoom());
    const statuses = await subscribe(ch);
    assert.deepEqual(statuses, ['SUBSCRIBED']);
    assert.equal(ch.state, 'joined');
    assert.equal(client.isConnected(), true, describeClient(client));
  });
}

test('vsn 1.0.0 raw: phx_join is answered by a JSON-object phx_reply {status:"ok", response:{postgres_changes:[]}}', async () => {
  const conn = await openRaw(server, { vsn: '1.0.0' });
  const topic = `realtime:${uniqueRoom()}`;
  const { joinRef, reply } = await conn.join(topic);
  assert.equal(reply.form, 'object', `vsn 1.0.0 frames must be JSON objects, got ${safeJson(reply)}`);
  assert.equal(reply.topic, topic);
  assert.equal(reply.ref, joinRef);
  assert.deepEqual(reply.payload, { status: 'ok', response: { postgres_changes: [] } }, `join reply: ${safeJson(reply)}`);
});

test('vsn 2.0.0 raw: phx_join is answered by a JSON-array phx_reply [join_ref, ref, topic, "phx_reply", {...}]', async () => {
  const conn = await openRaw(server, { vsn: '2.0.0' });
  const topic = `realtime:${uniqueRoom()}`;
  const { joinRef, reply } = await conn.join(topic);
  assert.equal(reply.form, 'array', `vsn 2.0.0 text frames must be JSON arrays, got ${safeJson(reply)}`);
  assert.equal(reply.topic, topic);
  assert.equal(reply.ref, joinRef);
  assert.equal(reply.join_ref, joinRef, `join_ref of the reply: ${safeJson(reply)}`);
  assert.deepEqual(reply.payload, { status: 'ok', response: { postgres_changes: [] } }, `join reply: ${safeJson(reply)}`);
});

for (const vsn of ['1.0.0', '2.0.0']) {
  test(`vsn ${vsn}: bare "realtime:" topic is refused (realtime-js CHANNEL_ERROR)`, async () => {
    const client = makeClient(server, { vsn });
    const ch = client.channel(''); // realtime-js turns this into topic "realtime:"
    assert.equal(ch.topic, 'realtime:');
    const seen = await subscribeOutcome(ch, { watchMs: 3000, graceMs: 300 });
    assert.ok(!seen.some((s) => s.status === 'SUBSCRIBED'), `bare topic was accepted: ${safeJson(seen)}`);
    assert.equal(seen[0]?.status, 'CHANNEL_ERROR', `expected CHANNEL_ERROR from an error phx_reply, saw ${safeJson(seen)}; ${describeClient(client)}`);
    // The error must come from a phx_reply with status "error", not from a dropped socket.
    const reply = client.__log.received.find((m) => m.topic === 'realtime:' && m.event === 'phx_reply');
    assert.ok(reply, `no phx_reply for topic "realtime:"; ${describeClient(client)}`);
    assert.equal(reply.payload.status, 'error', `reply: ${safeJson(reply)}`);
    assert.equal(client.isConnected(), true, `socket should stay open after a refused join; ${describeClient(client)}`);
  });
}

test('raw: bare "realtime:" join gets phx_reply status error with a reason, socket stays usable', async () => {
  const conn = await openRaw(server, { vsn: '1.0.0' });
  const { reply } = await conn.join('realtime:');
  assert.equal(reply.payload?.status, 'error', `reply: ${safeJson(reply)}`);
  assert.ok(reply.payload?.response && Object.keys(reply.payload.response).length > 0, `error reply should carry a reason: ${safeJson(reply)}`);
  const { reply: ok } = await conn.join(`realtime:${uniqueRoom()}`);
  assert.equal(ok.payload?.status, 'ok', `a valid join on the same socket afterwards: ${safeJson(ok)}`);
});

test('several channels on one connection; removeChannel answers ok and the server stops delivering that topic', async () => {
  const client = makeClient(server, { vsn: '1.0.0' });
  const rooms = [uniqueRoom('multi'), uniqueRoom('multi'), uniqueRoom('multi')];
  const channels = rooms.map((r) => client.channel(r));
  for (const ch of channels) await subscribe(ch);
  assert.ok(channels.every((c) => c.state === 'joined'));
  const left = await client.removeChannel(channels[0]);
  assert.equal(left, 'ok', `phx_leave should be answered with phx_reply ok; ${describeClient(client)}`);

  // Wire-level: a raw socket that left a topic must receive nothing more on it.
  const raw = await openRaw(server, { vsn: '1.0.0' });
  const topic = `realtime:${rooms[1]}`;
  const { joinRef } = await raw.join(topic);
  const { reply } = await raw.push(topic, 'phx_leave', {}, { joinRef });
  assert.equal(reply.payload?.status, 'ok', `leave reply: ${safeJson(reply)}`);
  const mark = raw.messages.length;
  const res = await channels[1].send({ type: 'broadcast', event: 'after-leave', payload: { x: 1 } });
  assert.equal(res, 'ok');
  await sleep(500);
  const leaked = raw.messages.slice(mark).filter((m) => m.event === 'broadcast');
  assert.deepEqual(leaked, [], 'broadcast delivered to a socket that had left the topic');
});

test('heartbeat on topic "phoenix" is answered (raw vsn 1.0.0 and 2.0.0)', async () => {
  for (const vsn of ['1.0.0', '2.0.0']) {
    const conn = await openRaw(server, { vsn });
    const { ref, reply } = await conn.push('phoenix', 'heartbeat', {});
    assert.equal(reply.topic, 'phoenix', `vsn ${vsn}: ${safeJson(reply)}`);
    assert.equal(reply.ref, ref);
    assert.equal(reply.payload?.status, 'ok', `vsn ${vsn} heartbeat reply: ${safeJson(reply)}`);
    assert.equal(reply.form, vsn === '1.0.0' ? 'object' : 'array', `vsn ${vsn} reply form: ${safeJson(reply)}`);
  }
});

test('realtime-js heartbeats get status "ok" (heartbeatCallback)', async () => {
  const statuses = [];
  const client = makeClient(server, {
    vsn: '2.0.0',
    heartbeatIntervalMs: 200,
    heartbeatCallback: (status) => statuses.push(status),
  });
  await subscribe(client.channel(uniqueRoom()));
  await waitFor(() => statuses.filter((s) => s === 'ok').length >= 2, 4000, 'two heartbeat "ok" callbacks').catch((e) =>
    assert.fail(`${e.message}; heartbeat statuses=${safeJson(statuses)}; ${describeClient(client)}`),
  );
  assert.ok(!statuses.includes('timeout') && !statuses.includes('error'), `heartbeat statuses: ${safeJson(statuses)}`);
});

test('server still healthy after the join tests', async () => {
  await assertHealthy(server, 'join tests');
});
