// Bad input over raw WebSockets. For each case the server must answer with an
// error (phx_reply status "error" / phx_error) or close the socket with a
// deliberate close code, and must not crash: afterwards a brand-new
// realtime-js pair must still connect, join and exchange a broadcast.
import { test, before, after, afterEach } from 'node:test';
import assert from 'node:assert/strict';
import {
  startServer,
  makeClient,
  subscribe,
  subscribeOutcome,
  disconnectAll,
  describeClient,
  collectBroadcasts,
  openRaw,
  closeAllRaw,
  encodeBroadcastPush,
  isClearCloseCode,
  uniqueRoom,
  safeJson,
  waitFor,
  sleep,
  assertHealthy,
  assertServerAlive,
} from './helpers.mjs';

let server; // default limits
let smallFrames; // --max-frame-bytes 4096
let fewChannels; // --max-channels-per-connection 3

before(async () => {
  [server, smallFrames, fewChannels] = await Promise.all([
    startServer(),
    startServer({ args: ['--max-frame-bytes', '4096'] }),
    startServer({ args: ['--max-channels-per-connection', '3'] }),
  ]);
});
afterEach(async () => {
  closeAllRaw();
  await disconnectAll();
});
after(async () => {
  await Promise.all([server?.stop(), smallFrames?.stop(), fewChannels?.stop()]);
});

/**
 * Sends `frame` on a fresh raw connection (optionally after joining a
 * topic) and asserts an error answer or a clean close with a clear code.
 */
async function sendBad(srv, { vsn, frame, binary = false, label, joinFirst = false, topic = null, ms = 2000 }) {
  const conn = await openRaw(srv, { vsn });
  let joinRef = null;
  if (joinFirst) {
    topic = topic ?? `realtime:${uniqueRoom('bad')}`;
    const joined = await conn.join(topic);
    joinRef = joined.joinRef;
    assert.equal(joined.reply.payload?.status, 'ok', `${label}: setup join failed: ${safeJson(joined.reply)}`);
  }
  const from = conn.messages.length;
  conn.sendRaw(typeof frame === 'function' ? frame(topic, joinRef) : frame, { binary });
  const r = await conn.errorOrClose(from, ms);
  assert.ok(
    r,
    `${label} (vsn ${vsn}): within ${ms} ms the server neither sent an error (phx_reply status "error"/phx_error) nor closed the socket; ` +
      `frames received after the bad input: ${safeJson(conn.messages.slice(from))}`,
  );
  if (r.closed) {
    assert.ok(isClearCloseCode(r.closed.code), `${label} (vsn ${vsn}): socket dropped without a clear close code: ${safeJson(r.closed)}`);
  }
  conn.close();
  return r;
}

/**
 * Runs every case even if some fail, then fails once listing all failures
 * (so one report shows every bad-input case the server mishandles).
 */
async function allCases(cases, fn) {
  const failures = [];
  for (const c of cases) {
    try {
      await fn(c);
    } catch (e) {
      failures.push(e.message);
    }
  }
  return failures;
}

function reportFailures(failures) {
  assert.deepEqual(failures, [], `${failures.length} bad-input case(s) mishandled:\n- ${failures.join('\n- ')}`);
}

const NON_JSON = ['this is not json', '{"topic": "realtime:x", ', '\u0000\u0001binary-ish text', '{]'];
const WRONG_SHAPE_V1 = [
  '[1,2,3]',
  '"just a string"',
  'null',
  '42',
  '{"foo":"bar"}',
  '{"topic":5,"event":[],"payload":"x","ref":"1"}',
  '{"topic":"realtime:x","event":"phx_join","payload":"not-an-object","ref":"1","join_ref":"1"}',
];
const WRONG_SHAPE_V2 = [
  '{"topic":"realtime:x","event":"phx_join","payload":{},"ref":"1"}',
  '[null,"1"]',
  '[null,"1","realtime:x","phx_join"]',
  '[null,"1",7,"phx_join",{}]',
  '["1","1","realtime:x","phx_join","not-an-object"]',
  '[]',
];

test('non-JSON text frames (vsn 1.0.0 and 2.0.0) get an error or a clean close; server stays healthy', async () => {
  const cases = ['1.0.0', '2.0.0'].flatMap((vsn) => NON_JSON.map((frame) => ({ vsn, frame })));
  const failures = await allCases(cases, ({ vsn, frame }) => sendBad(server, { vsn, frame, label: `non-JSON ${safeJson(frame)}` }));
  await assertHealthy(server, 'non-JSON text frames');
  reportFailures(failures);
});

test('JSON of the wrong shape (vsn 1.0.0 objects, vsn 2.0.0 arrays) gets an error or a clean close; server stays healthy', async () => {
  const cases = [...WRONG_SHAPE_V1.map((frame) => ({ vsn: '1.0.0', frame })), ...WRONG_SHAPE_V2.map((frame) => ({ vsn: '2.0.0', frame }))];
  const failures = await allCases(cases, ({ vsn, frame }) => sendBad(server, { vsn, frame, label: `wrong shape ${frame}` }));
  await assertHealthy(server, 'wrong-shape JSON');
  reportFailures(failures);
});

test('unknown event on a joined channel gets phx_reply error for its ref (or a clean close); server stays healthy', async () => {
  const failures = await allCases(['1.0.0', '2.0.0'], async (vsn) => {
    const conn = await openRaw(server, { vsn });
    const topic = `realtime:${uniqueRoom('bad')}`;
    const { joinRef } = await conn.join(topic);
    const ref = conn.makeRef();
    const from = conn.messages.length;
    conn.send({ topic, event: 'no_such_event', payload: { x: 1 }, ref, join_ref: joinRef });
    const r = await conn.errorOrClose(from, 2000, (m) => m.event === 'phx_error' || (m.event === 'phx_reply' && m.ref === ref));
    assert.ok(r, `vsn ${vsn}: no reply/close within 2 s for unknown event "no_such_event" on a joined topic; after it: ${safeJson(conn.messages.slice(from))}`);
    if (r.error) {
      if (r.error.event === 'phx_reply') assert.equal(r.error.payload?.status, 'error', `vsn ${vsn}: unknown event answered ${safeJson(r.error)}`);
    } else {
      assert.ok(isClearCloseCode(r.closed.code), `vsn ${vsn}: unknown event: ${safeJson(r.closed)}`);
    }
  });
  failures.push(
    ...(await allCases([1], () =>
      sendBad(server, { vsn: '1.0.0', frame: JSON.stringify({ topic: 'phoenix', event: 'bogus', payload: {}, ref: '9' }), label: 'unknown event "bogus" on topic phoenix' }),
    )),
  );
  await assertHealthy(server, 'unknown events');
  reportFailures(failures);
});

test('a push to a topic that was never joined gets an error (or a clean close); server stays healthy', async () => {
  const cases = [
    {
      vsn: '1.0.0',
      frame: JSON.stringify({ topic: 'realtime:never-joined', event: 'broadcast', payload: { type: 'broadcast', event: 'e', payload: {} }, ref: '5', join_ref: '4' }),
      label: 'JSON broadcast to an unjoined topic',
    },
    {
      vsn: '2.0.0',
      frame: encodeBroadcastPush({ joinRef: '4', ref: '5', topic: 'realtime:never-joined', event: 'e', payload: { a: 1 } }),
      binary: true,
      label: 'binary kind-3 broadcast to an unjoined topic',
    },
    {
      vsn: '1.0.0',
      frame: JSON.stringify({ topic: 'realtime:never-joined', event: 'presence', payload: { type: 'presence', event: 'track', payload: { a: 1 } }, ref: '5', join_ref: '4' }),
      label: 'presence track on an unjoined topic',
    },
  ];
  const failures = await allCases(cases, (c) => sendBad(server, c));
  // phx_leave of a topic that was never joined: any phx_reply (ok or error) or a clean close is fine.
  failures.push(
    ...(await allCases([1], async () => {
      const conn = await openRaw(server, { vsn: '1.0.0' });
      conn.send({ topic: 'realtime:never-joined', event: 'phx_leave', payload: {}, ref: '6' });
      const r = await conn.errorOrClose(0, 2000, (m) => m.event === 'phx_reply' && m.ref === '6');
      assert.ok(r && (r.error || isClearCloseCode(r.closed.code)), `phx_leave of an unjoined topic: ${safeJson(r)}; received ${safeJson(conn.messages)}`);
    })),
  );
  await assertHealthy(server, 'pushes to unjoined topics');
  reportFailures(failures);
});

test('binary frames on vsn 1.0.0 and malformed binary frames on vsn 2.0.0 get an error or a clean close; server stays healthy', async () => {
  const topic = 'realtime:whatever';
  const good = encodeBroadcastPush({ joinRef: '1', ref: '2', topic, event: 'e', payload: { a: 1 } });
  const truncated = good.subarray(0, 10); // header promises more bytes than present
  const lying = Buffer.from(good);
  lying[3] = 250; // topic length beyond the frame
  const unknownKind = Buffer.from(good);
  unknownKind[0] = 9;
  // These two target the topic the connection has joined, so only the payload is wrong.
  const badJson = (t, joinRef) => {
    const f = encodeBroadcastPush({ joinRef, ref: '2', topic: t, event: 'e', payload: { a: 1 } });
    return Buffer.concat([f.subarray(0, f.length - JSON.stringify({ a: 1 }).length), Buffer.from('{not json')]);
  };
  const badEncoding = (t, joinRef) => {
    const f = encodeBroadcastPush({ joinRef, ref: '2', topic: t, event: 'e', payload: { a: 1 } });
    f[6] = 7;
    return f;
  };
  const cases = [
    ['binary frame on vsn 1.0.0', Buffer.from([1, 2, 3, 4]), '1.0.0'],
    ['empty binary frame', Buffer.alloc(0)],
    ['truncated kind-3 frame', truncated],
    ['kind-3 frame with a topic length past the end', lying],
    ['unknown binary kind 9', unknownKind],
    ['kind-3 frame with invalid JSON payload (joined topic)', badJson],
    ['kind-3 frame with unknown payload encoding 7 (joined topic)', badEncoding],
  ];
  const failures = await allCases(cases, ([label, frame, vsn = '2.0.0']) =>
    sendBad(server, { vsn, frame, binary: true, label, joinFirst: typeof frame === 'function' }),
  );
  await assertHealthy(server, 'malformed binary frames');
  reportFailures(failures);
});

test('bare "realtime:" topic join is refused with status error; server stays healthy', async () => {
  for (const vsn of ['1.0.0', '2.0.0']) {
    const conn = await openRaw(server, { vsn });
    const { reply } = await conn.join('realtime:');
    assert.equal(reply.payload?.status, 'error', `vsn ${vsn}: ${safeJson(reply)}`);
    const { reply: r2 } = await conn.join('realtime');
    assert.notEqual(r2.payload?.status, undefined, `a topic without the realtime: prefix must be answered: ${safeJson(r2)}`);
  }
  await assertHealthy(server, 'bare realtime: topic');
});

test('--max-frame-bytes 4096: a frame under the limit works, a bigger one (text or binary) gets an error or a clean close', async () => {
  // Under the limit: a ~3 KB broadcast is delivered.
  const room = uniqueRoom('frames');
  const a = makeClient(smallFrames, { vsn: '1.0.0' });
  const b = makeClient(smallFrames, { vsn: '2.0.0' });
  const chA = a.channel(room, { config: { broadcast: { ack: true } } });
  const chB = b.channel(room);
  const got = collectBroadcasts(chB, 'big');
  await subscribe(chA);
  await subscribe(chB);
  const small = 'x'.repeat(3000);
  assert.equal(await chA.send({ type: 'broadcast', event: 'big', payload: { small } }), 'ok', describeClient(a));
  await waitFor(() => got.length === 1, 3000, '3 KB broadcast under a 4 KiB frame limit').catch((e) => assert.fail(`${e.message}; ${describeClient(b)}`));

  // Over the limit, aimed at the very topic the receiver listens on.
  const big = 'y'.repeat(10 * 1024);
  const r1 = await sendBad(smallFrames, {
    vsn: '1.0.0',
    topic: `realtime:${room}`,
    joinFirst: true,
    frame: (topic, joinRef) => JSON.stringify({ topic, event: 'broadcast', payload: { type: 'broadcast', event: 'big', payload: { big } }, ref: '99', join_ref: joinRef }),
    label: '10 KiB text frame over --max-frame-bytes 4096',
  });
  const r2 = await sendBad(smallFrames, {
    vsn: '2.0.0',
    topic: `realtime:${room}`,
    joinFirst: true,
    frame: (topic, joinRef) => encodeBroadcastPush({ joinRef, ref: '99', topic, event: 'big', payload: { big } }),
    binary: true,
    label: '10 KiB binary frame over --max-frame-bytes 4096',
  });
  await sleep(300);
  for (const r of [r1, r2]) if (r.closed) assert.ok([1009, 1008, 1003, 1002].includes(r.closed.code) || r.closed.code >= 4000, `oversized frame close code should say why (1009 message too big expected): ${safeJson(r.closed)}`);
  assert.equal(got.length, 1, `an oversized message was delivered: ${got.length} messages`);
  await assertHealthy(smallFrames, 'oversized frames (4 KiB limit)');
});

test('default frame limit is 1 MiB: a ~900 KiB broadcast is delivered, a 1.5 MiB frame gets an error or a clean close', async () => {
  // Under the default limit: delivered.
  const room = uniqueRoom('mib');
  const a = makeClient(server, { vsn: '1.0.0' });
  const b = makeClient(server, { vsn: '2.0.0' });
  const chA = a.channel(room, { config: { broadcast: { ack: true } } });
  const chB = b.channel(room);
  const got = collectBroadcasts(chB, 'large');
  await subscribe(chA);
  await subscribe(chB);
  const large = 'l'.repeat(900 * 1024);
  assert.equal(await chA.send({ type: 'broadcast', event: 'large', payload: { large } }), 'ok', describeClient(a));
  await waitFor(() => got.length === 1, 5000, '~900 KiB broadcast under the 1 MiB default').catch((e) => assert.fail(`${e.message}; ${describeClient(b)}`));
  assert.equal(got[0].payload.large.length, large.length);

  const huge = 'z'.repeat(1536 * 1024);
  await sendBad(server, {
    vsn: '1.0.0',
    joinFirst: true,
    frame: (topic, joinRef) => JSON.stringify({ topic, event: 'broadcast', payload: { type: 'broadcast', event: 'e', payload: { huge } }, ref: '99', join_ref: joinRef }),
    label: '1.5 MiB text frame over the default limit',
    ms: 4000,
  });
  await assertHealthy(server, '1.5 MiB frame');
});

test('--max-channels-per-connection 3: the 4th join gets CHANNEL_ERROR with a reason naming the limit; leaving frees a slot', async () => {
  const client = makeClient(fewChannels, { vsn: '2.0.0' });
  const chans = [0, 1, 2].map(() => client.channel(uniqueRoom('limit')));
  for (const ch of chans) await subscribe(ch);
  const fourth = client.channel(uniqueRoom('limit'));
  const seen = await subscribeOutcome(fourth, { watchMs: 3000, graceMs: 200 });
  fourth.teardown(); // stop realtime-js from rejoining it every second
  assert.equal(seen[0]?.status, 'CHANNEL_ERROR', `4th join: ${safeJson(seen)}; ${describeClient(client)}`);
  assert.ok(!seen.some((s) => s.status === 'SUBSCRIBED'), safeJson(seen));
  const reply = client.__log.received.find((m) => m.topic === fourth.topic && m.event === 'phx_reply');
  assert.equal(reply?.payload?.status, 'error', `4th join reply: ${safeJson(reply)}`);
  const reason = safeJson(reply.payload.response);
  assert.doesNotMatch(reason, /rate/i, `refused by a rate limit, not the channel limit: ${reason}`);
  assert.match(reason, /limit|max|too many|\b3\b/i, `the error reason should mention the channel limit: ${reason}`);
  assert.ok(client.isConnected(), 'the socket should stay open after a refused join');
  assert.ok(chans.every((c) => c.state === 'joined'), 'the first three channels must stay joined');

  // Leaving one frees a slot.
  assert.equal(await client.removeChannel(chans[0]), 'ok');
  await subscribe(client.channel(uniqueRoom('limit'))).catch((e) => assert.fail(`join after leaving one of 3 channels: ${e.message}`));
  await assertHealthy(fewChannels, 'channel limit');
});

test('default per-connection channel limit is 100: joins 1..100 ok, the 101st gets status error mentioning the limit', async () => {
  const conn = await openRaw(server, { vsn: '1.0.0' });
  // Paced at ~33 joins/s so a per-connection join *rate* limit cannot be
  // mistaken for the channel-count limit under test.
  for (let i = 1; i <= 100; i++) {
    const { reply } = await conn.join(`realtime:${uniqueRoom('hundred')}`);
    assert.equal(reply.payload?.status, 'ok', `join #${i}: ${safeJson(reply)}`);
    await sleep(30);
  }
  const { reply } = await conn.join(`realtime:${uniqueRoom('hundred')}`);
  assert.equal(reply.payload?.status, 'error', `join #101: ${safeJson(reply)}`);
  const reason = safeJson(reply.payload.response);
  assert.doesNotMatch(reason, /rate/i, `join #101 was refused by a rate limit, not the channel limit: ${reason}`);
  assert.match(reason, /limit|max|too many|100/i, `reason should mention the channel limit: ${reason}`);
  await assertServerAlive(server, '101 joins');
  await assertHealthy(server, '101 joins');
});
