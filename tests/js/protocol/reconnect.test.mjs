// realtime-js resilience: after the server restarts on the same port, the
// client reconnects by itself, rejoins its channels (SUBSCRIBED again) and
// broadcasts flow again.
import { test, after, afterEach } from 'node:test';
import assert from 'node:assert/strict';
import { startServer, makeClient, subscribe, disconnectAll, describeClient, collectBroadcasts, uniqueRoom, safeJson, waitFor } from './helpers.mjs';

let server;
afterEach(async () => {
  await disconnectAll();
});
after(async () => {
  await server?.stop();
});

test('after a server restart on the same port, realtime-js (vsn 1.0.0 and 2.0.0) reconnects, rejoins and exchanges broadcasts again', async () => {
  server = await startServer();
  const room = uniqueRoom('restart');
  const a = makeClient(server, { vsn: '2.0.0' });
  const b = makeClient(server, { vsn: '1.0.0' });
  const chA = a.channel(room, { config: { broadcast: { ack: true } } });
  const chB = b.channel(room);
  const got = collectBroadcasts(chB, 'r');
  const statusesA = [];
  const statusesB = [];
  chA.subscribe((s) => statusesA.push(s));
  chB.subscribe((s) => statusesB.push(s));
  await waitFor(() => statusesA.includes('SUBSCRIBED') && statusesB.includes('SUBSCRIBED'), 5000, 'initial SUBSCRIBED').catch((e) =>
    assert.fail(`${e.message}: A=${safeJson(statusesA)} B=${safeJson(statusesB)}`),
  );
  assert.equal(await chA.send({ type: 'broadcast', event: 'r', payload: { phase: 'before' } }), 'ok');
  await waitFor(() => got.length === 1, 3000, 'broadcast before restart');

  const { port, adminPort } = server;
  await server.stop();
  await waitFor(() => !a.isConnected() && !b.isConnected(), 5000, 'clients notice the server went away');
  server = await startServer({ port, adminPort });

  const countSubscribed = (l) => l.filter((s) => s === 'SUBSCRIBED').length;
  await waitFor(() => countSubscribed(statusesA) >= 2 && countSubscribed(statusesB) >= 2, 10000, 'SUBSCRIBED again after the restart').catch((e) =>
    assert.fail(`${e.message}: A=${safeJson(statusesA)} B=${safeJson(statusesB)}; ${describeClient(a)}; ${describeClient(b)}`),
  );
  const res = await chA.send({ type: 'broadcast', event: 'r', payload: { phase: 'after' } });
  assert.equal(res, 'ok', `ack send after rejoin resolved ${safeJson(res)}; ${describeClient(a)}`);
  await waitFor(() => got.length === 2, 3000, 'broadcast after restart').catch((e) => assert.fail(`${e.message}; ${describeClient(b)}`));
  assert.deepEqual(got[1].payload, { phase: 'after' });
});
