// Per-channel ordering: 1,000 broadcasts from one client arrive complete, in
// publish order, with strictly increasing meta.id.
import { test, before, after, afterEach } from 'node:test';
import assert from 'node:assert/strict';
import {
  startServer,
  makeClient,
  subscribe,
  disconnectAll,
  describeClient,
  collectBroadcasts,
  uniqueRoom,
  safeJson,
  waitFor,
  assertHealthy,
} from './helpers.mjs';

const N = 1000;

let server;
before(async () => {
  server = await startServer();
});
afterEach(async () => {
  await disconnectAll();
});
after(async () => {
  await server?.stop();
});

/** Checks seq 0..N-1 in order and meta.id strictly increasing; returns the ids. */
function checkOrdered(got, label) {
  assert.equal(got.length, N, `${label}: expected ${N} messages, got ${got.length}; duplicates or losses`);
  const outOfOrder = [];
  let prev = -1n;
  const ids = [];
  for (let i = 0; i < got.length; i++) {
    const m = got[i];
    if (m.payload?.seq !== i && outOfOrder.length < 5) outOfOrder.push({ index: i, seq: m.payload?.seq });
    const id = m.meta?.id;
    assert.ok(typeof id === 'string' && /^\d+$/.test(id), `${label}: message #${i} meta.id is ${safeJson(m.meta)}`);
    const big = BigInt(id);
    assert.ok(big > prev, `${label}: meta.id not strictly increasing at #${i}: ${prev} then ${big}`);
    prev = big;
    ids.push(id);
  }
  assert.deepEqual(outOfOrder, [], `${label}: messages out of publish order (first offenders)`);
  return ids;
}

test(`ordering: ${N} broadcasts without ack (vsn 2.0.0 -> 2.0.0) arrive complete, in order, meta.id strictly increasing`, async () => {
  const room = uniqueRoom('order');
  const a = makeClient(server, { vsn: '2.0.0' });
  const b = makeClient(server, { vsn: '2.0.0' });
  const chA = a.channel(room);
  const chB = b.channel(room);
  const got = collectBroadcasts(chB, 'seq');
  await subscribe(chA);
  await subscribe(chB);
  for (let i = 0; i < N; i++) {
    const r = await chA.send({ type: 'broadcast', event: 'seq', payload: { seq: i } });
    assert.equal(r, 'ok');
  }
  await waitFor(() => got.length >= N, 20000, `${N} broadcasts`).catch((e) =>
    assert.fail(`${e.message}: got ${got.length}, last seq ${got.at(-1)?.payload?.seq}; ${describeClient(b, 3)}`),
  );
  checkOrdered(got, 'no-ack 2.0.0');
});

test(`ordering: ${N} broadcasts with ack (vsn 1.0.0 sender) all ack "ok"; vsn 1.0.0 and 2.0.0 receivers get them in order with identical meta.ids`, async () => {
  const room = uniqueRoom('order-ack');
  const a = makeClient(server, { vsn: '1.0.0', timeout: 15000 });
  const b1 = makeClient(server, { vsn: '1.0.0' });
  const b2 = makeClient(server, { vsn: '2.0.0' });
  const chA = a.channel(room, { config: { broadcast: { ack: true } } });
  const chB1 = b1.channel(room);
  const chB2 = b2.channel(room);
  const got1 = collectBroadcasts(chB1, 'seq');
  const got2 = collectBroadcasts(chB2, 'seq');
  for (const ch of [chA, chB1, chB2]) await subscribe(ch);
  // Fire all sends without waiting for each ack, then collect the acks.
  const acks = [];
  for (let i = 0; i < N; i++) acks.push(chA.send({ type: 'broadcast', event: 'seq', payload: { seq: i } }));
  const results = await Promise.all(acks);
  const notOk = results.map((r, i) => [i, r]).filter(([, r]) => r !== 'ok');
  assert.deepEqual(notOk.slice(0, 5), [], `${notOk.length} of ${N} ack sends did not resolve "ok" (first ones shown)`);
  await waitFor(() => got1.length >= N && got2.length >= N, 20000, `${N} broadcasts at both receivers`).catch((e) =>
    assert.fail(`${e.message}: 1.0.0 receiver got ${got1.length}, 2.0.0 receiver got ${got2.length}`),
  );
  const ids1 = checkOrdered(got1, 'ack 1.0.0 -> 1.0.0');
  const ids2 = checkOrdered(got2, 'ack 1.0.0 -> 2.0.0');
  assert.deepEqual(ids1, ids2, 'both receivers must see the same meta.id for the same message');
});

test('server still healthy after the ordering tests', async () => {
  await assertHealthy(server, 'ordering tests');
});
