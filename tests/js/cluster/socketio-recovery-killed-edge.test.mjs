// Two cluster edges behind a TCP load balancer; the edge holding a
// socket.io-client socket (a channel's namespace, connection-state recovery
// on) is killed with SIGKILL while a realtime-js client on the other edge
// broadcasts. The socket reconnects through the balancer by itself, lands
// on the other edge with its pid and offset, and gets every message exactly
// once and in order, with `socket.recovered === true`.
// tests/tests/js_suites.rs runs this on a private NATS (FANOUT_TEST_NATS_URL).
import { test, after } from 'node:test';
import assert from 'node:assert/strict';
import { io } from 'socket.io-client';
import {
  startServer,
  makeToken,
  uniqueRoom,
  waitFor,
  sleep,
  safeJson,
  loadBalancer,
  supabaseClient,
  subscribed,
} from '../protocol/helpers.mjs';

const clients = [];
const sockets = [];
const servers = [];
after(async () => {
  for (const s of sockets) s.disconnect();
  for (const c of clients) await Promise.race([c.removeAllChannels(), sleep(2000)]).catch(() => {});
  for (const s of servers) await s.stop().catch(() => {});
});

test('SIGKILL of a Socket.IO socket\'s edge: it recovers on the other edge, socket.recovered, every message once, in order', async () => {
  assert.ok(process.env.FANOUT_TEST_NATS_URL, 'needs FANOUT_TEST_NATS_URL (tests/tests/js_suites.rs sets it)');
  const [doomed, survivor] = [await startServer(), await startServer()];
  servers.push(doomed, survivor);
  const lb = await loadBalancer([doomed, survivor]);
  try {
    const room = uniqueRoom('sio-killed-edge');
    const s = io(`${lb.url}/${room}`, {
      transports: ['websocket'],
      auth: { token: makeToken() },
      reconnectionDelay: 100,
      reconnectionDelayMax: 500,
    });
    sockets.push(s);
    const got = [];
    s.on('n', (payload) => got.push(payload.n));
    await waitFor(() => s.connected, 5000, 'socket connected');
    const recovered = new Promise((resolve) => s.on('connect', () => s.recovered && resolve()));

    const pub = supabaseClient(survivor.url);
    clients.push(pub);
    const pch = pub.channel(room, { config: { broadcast: { ack: true } } });
    await subscribed(pch);

    const total = 150;
    let killed = false;
    for (let n = 1; n <= total; n++) {
      assert.equal(await pch.send({ type: 'broadcast', event: 'n', payload: { n } }), 'ok', `publish ${n}`);
      if (!killed && got.length >= 30) {
        await doomed.kill();
        killed = true;
      }
      await sleep(10);
    }
    assert.ok(killed, `the socket's edge was killed mid-stream (got ${got.length} before the end)`);
    await Promise.race([recovered, sleep(15000)]);
    assert.equal(s.recovered, true, 'socket.recovered after the reconnect');
    await waitFor(() => got.length >= total, 15000, 'every message after the reconnect').catch((e) =>
      assert.fail(`${e.message}: got ${got.length}: ${safeJson(got.slice(-20))}`),
    );
    await sleep(300);
    const expected = Array.from({ length: total }, (_, i) => i + 1);
    assert.deepEqual(got, expected, 'every message exactly once, in order');
  } finally {
    lb.down();
    await lb.close();
  }
});
