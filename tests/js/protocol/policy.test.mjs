// Channel policies with the real realtime-js client: private channels
// joined through a claim or a rule, read-only tokens refused on write
// (broadcast and track) while they still receive, presence keys bound to
// `sub`, stamped senders, an opaque project key with setAuth, and the REST
// broadcast to a private channel.
import { test, before, after, afterEach } from 'node:test';
import assert from 'node:assert/strict';
import {
  startServer,
  makeClient,
  makeToken,
  subscribe,
  subscribeOutcome,
  disconnectAll,
  collectBroadcasts,
  waitFor,
  sleep,
  safeJson,
  describeClient,
  closeAllRaw,
} from './helpers.mjs';

const PROJECT_KEY = 'sb_publishable_fanout_policy_test_key';
const RULES =
  "[{pattern = 'workshop:{id}', read = '{id} in claims.workshops', " +
  "write = \"{id} in claims.workshops and claims.role == 'facilitator'\"}]";

let server;
before(async () => {
  server = await startServer({
    args: [
      '--auth-channels', RULES,
      '--auth-project-keys', PROJECT_KEY,
      '--auth-bind-presence-key', 'true',
      '--auth-stamp-sender', 'true',
    ],
  });
});
afterEach(async () => {
  closeAllRaw();
  await disconnectAll();
});
after(async () => {
  await server?.stop();
});

let uniq = 0;
const workshop = () => 1000 + process.pid % 1000 * 10 + ++uniq;
const token = (claims) => makeToken(claims);
const facilitatorOf = (id, sub = 'fac') => token({ sub, role: 'facilitator', workshops: [id] });
const participantOf = (id, sub = 'par') => token({ sub, role: 'authenticated', workshops: [String(id)] });
const privateChannel = (client, id, config = {}) =>
  client.channel(`workshop:${id}`, { config: { private: true, broadcast: { ack: true }, ...config } });

test('a private channel is refused without a matching claim and joined with one', async () => {
  const id = workshop();
  const outsider = makeClient(server, { apikey: token({ sub: 'out', workshops: [id + 1] }) });
  const seen = await subscribeOutcome(privateChannel(outsider, id), { watchMs: 3000, graceMs: 300 });
  assert.ok(!seen.some((s) => s.status === 'SUBSCRIBED'), `outsider joined: ${safeJson(seen)}`);
  const error = seen.find((s) => s.status === 'CHANNEL_ERROR');
  assert.ok(error, `expected CHANNEL_ERROR, saw ${safeJson(seen)}`);
  assert.match(safeJson(seen), /not allowed to join private channel/);

  // The `channels` claim grants a name no rule covers.
  const listed = makeClient(server, { apikey: token({ sub: 'l', channels: [`room:${id}`, `hall:${id}:*`] }) });
  await subscribe(listed.channel(`room:${id}`, { config: { private: true } }));
  await subscribe(listed.channel(`hall:${id}:a`, { config: { private: true } }));
  const member = makeClient(server, { apikey: participantOf(id) });
  await subscribe(privateChannel(member, id));
});

test('a read-only client is refused broadcast and track with an error while it still receives', async () => {
  const id = workshop();
  const fac = makeClient(server, { apikey: facilitatorOf(id) });
  const par = makeClient(server, { apikey: participantOf(id) });
  const facCh = privateChannel(fac, id);
  const parCh = privateChannel(par, id);
  const got = collectBroadcasts(parCh, 'stage');
  await subscribe(facCh);
  await subscribe(parCh);

  assert.equal(await parCh.send({ type: 'broadcast', event: 'stage', payload: { from: 'participant' } }), 'error');
  assert.equal(await parCh.track({ online: true }), 'error', 'track on a read-only channel');
  assert.equal(await facCh.send({ type: 'broadcast', event: 'stage', payload: { n: 1 } }), 'ok');
  await waitFor(() => got.length === 1, 5000, 'the facilitator broadcast');
  assert.deepEqual(got[0].payload, { n: 1 });
  // The server stamped the sender's verified sub.
  assert.equal(got[0].meta?.sub, 'fac', `meta: ${safeJson(got[0])}`);
  await sleep(200);
  assert.equal(got.length, 1, 'the refused broadcast was not delivered');

  // The public channel of the same name is another channel.
  const pub = makeClient(server, { apikey: token({ sub: 'x' }) });
  const pubCh = pub.channel(`workshop:${id}`);
  const pubGot = collectBroadcasts(pubCh, 'stage');
  await subscribe(pubCh);
  assert.equal(await facCh.send({ type: 'broadcast', event: 'stage', payload: { n: 2 } }), 'ok');
  await waitFor(() => got.length === 2, 5000, 'the second facilitator broadcast');
  await sleep(200);
  assert.equal(pubGot.length, 0, 'a public joiner of the same name saw a private broadcast');
});

test('a client cannot take another user\'s presence key when keys are bound to sub', async () => {
  const id = workshop();
  const ann = makeClient(server, { apikey: facilitatorOf(id, 'ann') });
  const bob = makeClient(server, { apikey: facilitatorOf(id, 'bob') });
  const stolen = privateChannel(bob, id, { presence: { key: 'ann' } });
  const seen = await subscribeOutcome(stolen, { watchMs: 3000, graceMs: 300 });
  assert.ok(!seen.some((s) => s.status === 'SUBSCRIBED'), `bob joined as ann: ${safeJson(seen)}`);
  assert.match(safeJson(seen), /bound to the token's sub claim/);

  const annCh = privateChannel(ann, id, { presence: { key: '' } });
  annCh.on('presence', { event: 'sync' }, () => {});
  await subscribe(annCh);
  assert.equal(await annCh.track({ name: 'Ann' }), 'ok');
  await waitFor(() => Object.keys(annCh.presenceState()).length === 1, 5000, 'ann in presence');
  assert.deepEqual(Object.keys(annCh.presenceState()), ['ann'], 'the presence key is the sub');
});

test('an opaque project key runs as anon until setAuth names the user', async () => {
  const id = workshop();
  const client = makeClient(server, { apikey: PROJECT_KEY });
  const anonCh = privateChannel(client, id);
  const seen = await subscribeOutcome(anonCh, { watchMs: 3000, graceMs: 300 });
  assert.ok(!seen.some((s) => s.status === 'SUBSCRIBED'), `anon joined a private channel: ${safeJson(seen)}`);
  await client.removeChannel(anonCh);
  // A public channel is fine as anon.
  await subscribe(client.channel(`lobby:${id}`));
  // After setAuth, joins carry the user's access_token.
  await client.setAuth(participantOf(id, 'carol'));
  await subscribe(privateChannel(client, id), 5000).catch((e) => {
    throw new Error(`${e.message}; ${describeClient(client)}`);
  });
  // A wrong project key is refused at the upgrade.
  const wrong = makeClient(server, { apikey: `${PROJECT_KEY}x` });
  const refused = await subscribeOutcome(wrong.channel(`lobby:${id}`), { watchMs: 2500, graceMs: 300 });
  assert.ok(!refused.some((s) => s.status === 'SUBSCRIBED'), `a wrong project key connected: ${safeJson(refused)}`);
});

test('REST broadcast to a private channel needs write access (403 otherwise)', async () => {
  const id = workshop();
  const reader = makeClient(server, { apikey: participantOf(id) });
  const ch = privateChannel(reader, id);
  const got = collectBroadcasts(ch, 'rest');
  await subscribe(ch);
  const post = (tok) =>
    fetch(`${server.url}/realtime/v1/api/broadcast`, {
      method: 'POST',
      headers: { 'content-type': 'application/json', apikey: PROJECT_KEY, authorization: `Bearer ${tok}` },
      body: JSON.stringify({ messages: [{ topic: `workshop:${id}`, event: 'rest', payload: { via: 'rest' }, private: true }] }),
    });
  const refused = await post(participantOf(id));
  assert.equal(refused.status, 403, await refused.text());
  const ok = await post(token({ role: 'service_role', sub: 'backend' }));
  assert.equal(ok.status, 202, await ok.text());
  await waitFor(() => got.length === 1, 5000, 'the REST broadcast');
  assert.deepEqual(got[0].payload, { via: 'rest' });
  assert.equal(got[0].meta?.sub, 'backend');
});
