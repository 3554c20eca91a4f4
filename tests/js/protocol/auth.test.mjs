// Authentication: the `apikey` on the WebSocket upgrade must be an HS256 JWT
// signed with FANOUT_JWT_SECRET carrying a future `exp`; otherwise the
// upgrade is refused with 401 + {"error": "..."}. A join's `access_token`
// is checked the same way and a bad one gets phx_reply status "error".
import { test, before, after, afterEach } from 'node:test';
import assert from 'node:assert/strict';
import {
  startServer,
  makeClient,
  makeToken,
  signJwt,
  subscribe,
  subscribeOutcome,
  disconnectAll,
  describeClient,
  openRaw,
  closeAllRaw,
  tryUpgrade,
  uniqueRoom,
  safeJson,
  assertHealthy,
  nowSec,
  SECRET,
  WRONG_SECRET,
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

const upgradeUrl = (apikey, vsn = '1.0.0') =>
  `${server.wsUrl}/websocket?${apikey === null ? '' : `apikey=${encodeURIComponent(apikey)}&`}vsn=${vsn}`;

function b64(obj) {
  return Buffer.from(JSON.stringify(obj)).toString('base64url');
}

/** Asserts the raw upgrade is refused with 401 and a JSON {error} body. */
async function assertUpgradeRefused(apikey, label) {
  const r = await tryUpgrade(upgradeUrl(apikey));
  assert.equal(r.opened, false, `${label}: WebSocket upgrade was accepted`);
  assert.equal(r.status, 401, `${label}: expected HTTP 401, got ${safeJson(r)}`);
  let body;
  try {
    body = JSON.parse(r.body);
  } catch {
    assert.fail(`${label}: 401 body is not JSON: ${safeJson(r.body)}`);
  }
  assert.equal(typeof body.error, 'string', `${label}: 401 body should be {"error": "..."}, got ${safeJson(body)}`);
  assert.ok(body.error.length > 0);
}

/** realtime-js with this apikey must never reach SUBSCRIBED and must report CHANNEL_ERROR. */
async function assertClientRefused(apikey, label) {
  const client = makeClient(server, { vsn: '2.0.0', apikey });
  const ch = client.channel(uniqueRoom('auth'));
  // realtime-js reconnects after 1 s (our reconnectAfterMs); watch long enough to see a retry fail too.
  const seen = await subscribeOutcome(ch, { watchMs: 4000, graceMs: 1800 });
  assert.ok(!seen.some((s) => s.status === 'SUBSCRIBED'), `${label}: channel reached SUBSCRIBED: ${safeJson(seen)}`);
  assert.ok(
    seen.some((s) => s.status === 'CHANNEL_ERROR'),
    `${label}: expected CHANNEL_ERROR (socket error/close triggers phx_error on joining channels), saw ${safeJson(seen)}; ${describeClient(client)}`,
  );
  assert.equal(client.isConnected(), false, `${label}: socket is open; ${describeClient(client)}`);
}

test('valid token: the upgrade is accepted and a realtime-js channel is SUBSCRIBED (control)', async () => {
  const r = await tryUpgrade(upgradeUrl(makeToken()));
  assert.equal(r.opened, true, `valid token refused: ${safeJson(r)}`);
  const client = makeClient(server, { vsn: '1.0.0' });
  await subscribe(client.channel(uniqueRoom('auth')));
});

test('forged token (signed with the wrong secret) is refused: HTTP 401 {error}, realtime-js never SUBSCRIBED', async () => {
  const forged = makeToken({}, WRONG_SECRET);
  await assertUpgradeRefused(forged, 'forged token');
  await assertClientRefused(forged, 'forged token');
});

test('expired token is refused: HTTP 401 {error}, realtime-js never SUBSCRIBED', async () => {
  const expired = makeToken({ exp: nowSec() - 120 });
  await assertUpgradeRefused(expired, 'expired token');
  await assertClientRefused(expired, 'expired token');
});

test('missing apikey is refused with HTTP 401 {error} when a secret is configured', async () => {
  await assertUpgradeRefused(null, 'no apikey parameter');
  await assertUpgradeRefused('', 'empty apikey');
});

test('other invalid tokens are refused with HTTP 401: garbage, no exp, alg "none", tampered claims', async () => {
  const now = nowSec();
  const good = makeToken();
  const [h, , s] = good.split('.');
  const tampered = `${h}.${b64({ sub: 'admin', role: 'service_role', exp: now + 3600 })}.${s}`;
  const algNone = `${b64({ alg: 'none', typ: 'JWT' })}.${b64({ sub: 'user-1', role: 'authenticated', exp: now + 3600 })}.`;
  const noExp = signJwt({ sub: 'user-1', role: 'authenticated' }, SECRET);
  await assertUpgradeRefused('not-a-jwt', 'garbage apikey');
  await assertUpgradeRefused(noExp, 'token without exp');
  await assertUpgradeRefused(algNone, 'alg none token');
  await assertUpgradeRefused(tampered, 'tampered payload with the original signature');
  await assertClientRefused('not-a-jwt', 'garbage apikey');
});

test('join with a forged access_token gets phx_reply error (realtime-js CHANNEL_ERROR)', async () => {
  const client = makeClient(server, { vsn: '2.0.0' });
  await client.setAuth(makeToken({ sub: 'mallory' }, WRONG_SECRET)); // sent as join payload access_token
  const ch = client.channel(uniqueRoom('auth'));
  const seen = await subscribeOutcome(ch, { watchMs: 3000, graceMs: 300 });
  assert.ok(!seen.some((s) => s.status === 'SUBSCRIBED'), `join with a forged access_token was accepted: ${safeJson(seen)}`);
  assert.equal(seen[0]?.status, 'CHANNEL_ERROR', `saw ${safeJson(seen)}; ${describeClient(client)}`);
  const reply = client.__log.received.find((m) => m.topic === ch.topic && m.event === 'phx_reply');
  assert.equal(reply?.payload?.status, 'error', `expected an error phx_reply to the join: ${describeClient(client)}`);
  assert.equal(client.isConnected(), true, 'a refused join should not close the (valid) socket');
});

test('raw: joins with expired / forged / garbage access_token get status error; a valid one gets ok', async () => {
  const conn = await openRaw(server, { vsn: '1.0.0' });
  const bad = {
    expired: makeToken({ exp: nowSec() - 60 }),
    forged: makeToken({}, WRONG_SECRET),
    garbage: 'garbage',
  };
  for (const [label, access_token] of Object.entries(bad)) {
    const { reply } = await conn.join(`realtime:${uniqueRoom('auth')}`, {}, { access_token });
    assert.equal(reply.payload?.status, 'error', `${label} access_token: ${safeJson(reply)}`);
  }
  const { reply } = await conn.join(`realtime:${uniqueRoom('auth')}`, {}, { access_token: makeToken({ sub: 'user-2' }) });
  assert.equal(reply.payload?.status, 'ok', `valid access_token: ${safeJson(reply)}`);
});

test('realtime-js setAuth(valid token) before subscribing joins fine', async () => {
  const client = makeClient(server, { vsn: '1.0.0' });
  await client.setAuth(makeToken({ sub: 'user-3' }));
  await subscribe(client.channel(uniqueRoom('auth')));
});

test('server still healthy after the auth tests', async () => {
  await assertHealthy(server, 'auth tests');
});
