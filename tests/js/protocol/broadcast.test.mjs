// Broadcast between realtime-js clients on vsn 1.0.0, 2.0.0 and mixed, with
// ack, self on/off, channel isolation, and the wire encodings (JSON objects
// for 1.0.0, binary kind 3 / kind 4 frames for 2.0.0).
import { test, before, after, afterEach } from 'node:test';
import assert from 'node:assert/strict';
import {
  startServer,
  makeClient,
  subscribe,
  disconnectAll,
  describeClient,
  collectBroadcasts,
  openRaw,
  closeAllRaw,
  encodeBroadcastPush,
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

const isPosition = (id) => typeof id === 'string' && /^\d+$/.test(id);

async function pair(vsnA, vsnB, configA = { broadcast: { ack: true } }, configB = {}) {
  const room = uniqueRoom('bc');
  const a = makeClient(server, { vsn: vsnA });
  const b = makeClient(server, { vsn: vsnB });
  const chA = a.channel(room, { config: configA });
  const chB = b.channel(room, { config: configB });
  const gotA = collectBroadcasts(chA, 'e');
  const gotB = collectBroadcasts(chB, 'e');
  await subscribe(chA);
  await subscribe(chB);
  return { room, a, b, chA, chB, gotA, gotB };
}

async function expectDelivery(got, n, receiver, what) {
  await waitFor(() => got.length >= n, 4000, what).catch((e) => assert.fail(`${e.message}; got ${got.length}: ${safeJson(got)}; receiver ${describeClient(receiver)}`));
}

for (const [vsnA, vsnB] of [
  ['1.0.0', '1.0.0'],
  ['2.0.0', '2.0.0'],
  ['1.0.0', '2.0.0'],
  ['2.0.0', '1.0.0'],
]) {
  test(`ack broadcast vsn ${vsnA} -> vsn ${vsnB}: send resolves "ok", receiver gets {type, event, payload, meta.id}`, async () => {
    const { a, b, chA, chB, gotA, gotB } = await pair(vsnA, vsnB, { broadcast: { ack: true } }, { broadcast: { ack: true } });
    const payload = { text: 'héllo ✓ 🎉', n: 42, nested: { list: [1, 'two', null, true] } };
    const res = await chA.send({ type: 'broadcast', event: 'e', payload });
    assert.equal(res, 'ok', `send with ack resolved ${safeJson(res)} (realtime-js waits for phx_reply status ok to the broadcast push); sender ${describeClient(a)}`);
    await expectDelivery(gotB, 1, b, `broadcast at the vsn ${vsnB} receiver`);
    const msg = gotB[0];
    assert.equal(msg.type, 'broadcast', safeJson(msg));
    assert.equal(msg.event, 'e', safeJson(msg));
    assert.deepEqual(msg.payload, payload, `payload mangled: ${safeJson(msg)}`);
    assert.ok(isPosition(msg.meta?.id), `meta.id must be a decimal string, got ${safeJson(msg.meta)}`);

    // and the other way round
    const res2 = await chB.send({ type: 'broadcast', event: 'e', payload: { back: true } });
    assert.equal(res2, 'ok', `reverse send with ack resolved ${safeJson(res2)}; ${describeClient(b)}`);
    await expectDelivery(gotA, 1, a, `broadcast at the vsn ${vsnA} receiver`);
    assert.deepEqual(gotA[0].payload, { back: true }, safeJson(gotA));
    assert.ok(isPosition(gotA[0].meta?.id), `meta.id: ${safeJson(gotA[0].meta)}`);
    assert.ok(BigInt(gotA[0].meta.id) > BigInt(msg.meta.id), `meta.id must increase per channel: first ${msg.meta.id}, second ${gotA[0].meta.id}`);
    assert.equal(gotB.length, 1, `self is off, B must not see its own message: ${safeJson(gotB)}`);
  });
}

for (const vsn of ['1.0.0', '2.0.0']) {
  test(`self: true on vsn ${vsn} delivers the sender its own broadcast (and the other member too)`, async () => {
    const { a, b, chA, gotA, gotB } = await pair(vsn, vsn === '1.0.0' ? '2.0.0' : '1.0.0', { broadcast: { self: true, ack: true } });
    const res = await chA.send({ type: 'broadcast', event: 'e', payload: { mine: 1 } });
    assert.equal(res, 'ok');
    await expectDelivery(gotA, 1, a, 'own broadcast echoed to the sender (self: true)');
    await expectDelivery(gotB, 1, b, 'broadcast at the other member');
    assert.deepEqual(gotA[0].payload, { mine: 1 });
    assert.equal(gotA[0].meta?.id, gotB[0].meta?.id, `sender and receiver should see the same meta.id: ${safeJson([gotA[0].meta, gotB[0].meta])}`);
    await sleep(200);
    assert.equal(gotA.length, 1, `sender got its message more than once: ${safeJson(gotA)}`);
  });

  test(`self: false on vsn ${vsn} does not echo to the sender; the other member receives`, async () => {
    const { a, b, chA, gotA, gotB } = await pair(vsn, vsn, { broadcast: { self: false, ack: true } });
    const res = await chA.send({ type: 'broadcast', event: 'e', payload: { mine: 2 } });
    assert.equal(res, 'ok');
    await expectDelivery(gotB, 1, b, 'broadcast at the other member');
    await sleep(400);
    assert.equal(gotA.length, 0, `self is false but the sender received ${safeJson(gotA)}; ${describeClient(a)}`);
  });
}

test('broadcasts do not leak to other channels; event filter on the receiver works', async () => {
  const roomX = uniqueRoom('iso');
  const roomY = uniqueRoom('iso');
  const a = makeClient(server, { vsn: '2.0.0' });
  const b = makeClient(server, { vsn: '1.0.0' });
  const chAX = a.channel(roomX, { config: { broadcast: { ack: true } } });
  const chBX = b.channel(roomX);
  const chBY = b.channel(roomY);
  const gotX = collectBroadcasts(chBX, 'only-this');
  const gotY = collectBroadcasts(chBY, '*');
  for (const ch of [chAX, chBX, chBY]) await subscribe(ch);
  assert.equal(await chAX.send({ type: 'broadcast', event: 'other', payload: { n: 0 } }), 'ok');
  assert.equal(await chAX.send({ type: 'broadcast', event: 'only-this', payload: { n: 1 } }), 'ok');
  await expectDelivery(gotX, 1, b, 'broadcast on room X');
  await sleep(300);
  assert.deepEqual(gotX.map((m) => m.payload), [{ n: 1 }], `event filter: ${safeJson(gotX)}`);
  assert.deepEqual(gotY, [], `room Y received room X traffic: ${safeJson(gotY)}`);
  const leaked = b.__log.received.filter((m) => m.topic === `realtime:${roomY}` && m.event === 'broadcast');
  assert.deepEqual(leaked, [], 'server sent room X broadcasts on topic room Y');
});

test('vsn 2.0.0 raw: the server delivers broadcasts as binary kind-4 frames carrying meta.id', async () => {
  const room = uniqueRoom('bin');
  const topic = `realtime:${room}`;
  const raw = await openRaw(server, { vsn: '2.0.0' });
  await raw.join(topic);
  const sender = makeClient(server, { vsn: '1.0.0' });
  const ch = sender.channel(room, { config: { broadcast: { ack: true } } });
  await subscribe(ch);
  assert.equal(await ch.send({ type: 'broadcast', event: 'ev-ü', payload: { a: 'ü', b: [1, 2] } }), 'ok');
  const m = await raw.waitMessage((x) => x.event === 'broadcast', 3000, 'broadcast at a raw vsn 2.0.0 socket');
  assert.equal(m.binary, true, `vsn 2.0.0 broadcasts must be binary frames (kind 4, realtime-js serializer.ts _binaryDecode), got text ${safeJson(m)}`);
  assert.equal(m.kind, 4, safeJson(m));
  assert.equal(m.topic, topic);
  assert.equal(m.encoding, 1, 'JSON payload encoding byte must be 1');
  assert.equal(m.payload.event, 'ev-ü');
  assert.deepEqual(m.payload.payload, { a: 'ü', b: [1, 2] });
  assert.ok(m.payload.meta && isPosition(m.payload.meta.id), `kind-4 metadata must be JSON {"id":"<position>"}: ${safeJson(m.payload.meta)}`);
});

test('vsn 1.0.0 raw: the server delivers broadcasts as JSON objects {event:"broadcast", payload:{type, event, payload, meta:{id}}}', async () => {
  const room = uniqueRoom('json');
  const topic = `realtime:${room}`;
  const raw = await openRaw(server, { vsn: '1.0.0' });
  await raw.join(topic);
  const sender = makeClient(server, { vsn: '2.0.0' });
  const ch = sender.channel(room, { config: { broadcast: { ack: true } } });
  await subscribe(ch);
  assert.equal(await ch.send({ type: 'broadcast', event: 'e', payload: { z: 1 } }), 'ok');
  const m = await raw.waitMessage((x) => x.event === 'broadcast', 3000, 'broadcast at a raw vsn 1.0.0 socket');
  assert.equal(m.form, 'object', `vsn 1.0.0 frames must be JSON objects: ${safeJson(m)}`);
  assert.equal(m.topic, topic);
  assert.equal(m.payload?.type, 'broadcast', safeJson(m));
  assert.equal(m.payload?.event, 'e', safeJson(m));
  assert.deepEqual(m.payload?.payload, { z: 1 }, safeJson(m));
  assert.ok(isPosition(m.payload?.meta?.id), `meta.id: ${safeJson(m)}`);
});

test('vsn 2.0.0 raw: a binary kind-3 push with ack gets phx_reply ok for its ref and reaches a vsn 1.0.0 member', async () => {
  const room = uniqueRoom('k3');
  const topic = `realtime:${room}`;
  const raw = await openRaw(server, { vsn: '2.0.0' });
  const { joinRef } = await raw.join(topic, { broadcast: { ack: true, self: false } });
  const recv = makeClient(server, { vsn: '1.0.0' });
  const ch = recv.channel(room);
  const got = collectBroadcasts(ch, 'k3');
  await subscribe(ch);
  const ref = raw.makeRef();
  raw.sendRaw(encodeBroadcastPush({ joinRef, ref, topic, event: 'k3', payload: { hello: 'world' } }));
  const reply = await raw.waitMessage((m) => m.event === 'phx_reply' && m.ref === ref, 3000, 'phx_reply to a kind-3 push');
  assert.equal(reply.payload?.status, 'ok', safeJson(reply));
  await expectDelivery(got, 1, recv, 'kind-3 push delivered to the 1.0.0 member');
  assert.deepEqual(got[0].payload, { hello: 'world' });
  assert.ok(isPosition(got[0].meta?.id), safeJson(got[0]));
});

test('multi-byte topic and event names work between vsn 2.0.0 (binary, byte lengths) and vsn 1.0.0', async () => {
  const room = `café-☕-${uniqueRoom('utf8')}`;
  const a = makeClient(server, { vsn: '2.0.0' });
  const b = makeClient(server, { vsn: '1.0.0' });
  const chA = a.channel(room, { config: { broadcast: { ack: true } } });
  const chB = b.channel(room, { config: { broadcast: { ack: true } } });
  const gotA = collectBroadcasts(chA, 'évènement-🎉');
  const gotB = collectBroadcasts(chB, 'évènement-🎉');
  await subscribe(chA);
  await subscribe(chB);
  assert.equal(await chA.send({ type: 'broadcast', event: 'évènement-🎉', payload: { s: 'ü' } }), 'ok', describeClient(a));
  assert.equal(await chB.send({ type: 'broadcast', event: 'évènement-🎉', payload: { s: 'ß' } }), 'ok', describeClient(b));
  await expectDelivery(gotB, 1, b, 'multi-byte broadcast at vsn 1.0.0');
  await expectDelivery(gotA, 1, a, 'multi-byte broadcast at vsn 2.0.0');
  assert.deepEqual(gotB[0].payload, { s: 'ü' });
  assert.deepEqual(gotA[0].payload, { s: 'ß' });
});

test('vsn 2.0.0: an ArrayBuffer payload (binary encoding 0) round-trips byte-exact', async () => {
  // realtime-js serializer.ts: _encodeBinaryUserBroadcastPush sends kind 3 with encoding 0
  // (BINARY_ENCODING) when payload is an ArrayBuffer; _decodeUserBroadcast hands the
  // receiver an ArrayBuffer when the kind-4 encoding byte is not 1.
  const { a, b, chA, gotB } = await pair('2.0.0', '2.0.0');
  const bytes = new Uint8Array([0, 1, 2, 250, 255, 128, 7]);
  const res = await chA.send({ type: 'broadcast', event: 'e', payload: bytes.buffer.slice(0) });
  assert.equal(res, 'ok', `ack send of an ArrayBuffer payload resolved ${safeJson(res)}; sender saw ${describeClient(a)}`);
  await expectDelivery(gotB, 1, b, 'binary-payload broadcast');
  const p = gotB[0].payload;
  assert.ok(p instanceof ArrayBuffer, `binary payload should arrive as an ArrayBuffer, got ${safeJson(p)}`);
  assert.deepEqual([...new Uint8Array(p)], [...bytes]);
});

test('server still healthy after the broadcast tests', async () => {
  await assertHealthy(server, 'broadcast tests');
});
