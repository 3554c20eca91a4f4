// Two cluster edges behind a TCP load balancer; the edge holding a
// supabase-js subscriber is killed with SIGKILL while messages flow. The
// client reconnects through the balancer by itself, lands on the other edge
// and, with `config.resume.after` kept current by updateJoinPayload (the
// README's snippet), receives every message exactly once and in order.
// tests/tests/js_suites.rs runs this on a private NATS (FANOUT_TEST_NATS_URL).
import { test, after } from 'node:test';
import assert from 'node:assert/strict';
import { startServer, uniqueRoom, waitFor, sleep, safeJson, loadBalancer, supabaseClient, subscribed } from '../protocol/helpers.mjs';

const clients = [];
const servers = [];
after(async () => {
  for (const c of clients) await Promise.race([c.removeAllChannels(), sleep(2000)]).catch(() => {});
  for (const s of servers) await s.stop().catch(() => {});
});

test('SIGKILL of the subscriber\'s edge while messages flow: it resumes on the other edge, every message once, in order', async () => {
  assert.ok(process.env.FANOUT_TEST_NATS_URL, 'needs FANOUT_TEST_NATS_URL (tests/tests/js_suites.rs sets it)');
  const [doomed, survivor] = [await startServer(), await startServer()];
  servers.push(doomed, survivor);
  // The balancer sends the subscriber's first connection to `doomed`.
  const lb = await loadBalancer([doomed, survivor]);
  try {
    const room = uniqueRoom('killed-edge');
    const sub = supabaseClient(lb.url);
    const pub = supabaseClient(survivor.url);
    clients.push(sub, pub);
    const got = [];
    const ch = sub.channel(room).on('broadcast', { event: 'n' }, ({ payload, meta }) => {
      got.push(payload.n);
      const { config } = ch.joinPush.payload();
      ch.updateJoinPayload({ config: { ...config, resume: { after: meta.id } } });
    });
    await subscribed(ch);
    const pch = pub.channel(room, { config: { broadcast: { ack: true } } });
    await subscribed(pch);

    const total = 150;
    let killed = false;
    for (let n = 1; n <= total; n++) {
      assert.equal(await pch.send({ type: 'broadcast', event: 'n', payload: { n } }), 'ok', `publish ${n}`);
      if (!killed && got.length >= 30) {
        doomed.kill();
        killed = true;
      }
      await sleep(10);
    }
    assert.ok(killed, `the subscriber's edge was killed mid-stream (got ${got.length} before the end)`);
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
