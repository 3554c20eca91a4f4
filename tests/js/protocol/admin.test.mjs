// The admin listener: /healthz, /readyz and Prometheus /metrics.
import { test, before, after, afterEach } from 'node:test';
import assert from 'node:assert/strict';
import { startServer, makeClient, subscribe, disconnectAll, uniqueRoom, safeJson } from './helpers.mjs';

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

test('admin /healthz and /readyz answer 200', async () => {
  for (const path of ['/healthz', '/readyz']) {
    const res = await fetch(`${server.adminUrl}${path}`);
    const body = await res.text();
    assert.equal(res.status, 200, `${path} answered ${res.status}: ${body}`);
  }
});

test('admin /metrics serves Prometheus text exposition with samples', async () => {
  // Generate a little traffic first so counters exist.
  const a = makeClient(server, { vsn: '2.0.0' });
  const ch = a.channel(uniqueRoom('metrics'), { config: { broadcast: { ack: true } } });
  await subscribe(ch);
  assert.equal(await ch.send({ type: 'broadcast', event: 'm', payload: {} }), 'ok');

  const res = await fetch(`${server.adminUrl}/metrics`);
  const body = await res.text();
  assert.equal(res.status, 200, `/metrics answered ${res.status}: ${body.slice(0, 300)}`);
  const ctype = res.headers.get('content-type') ?? '';
  assert.match(ctype, /^(text\/plain|application\/openmetrics-text)/, `content-type: ${ctype}`);
  const lines = body.split('\n').filter((l) => l.trim());
  const samples = lines.filter((l) => !l.startsWith('#'));
  const bad = samples.filter((l) => !/^[a-zA-Z_:][a-zA-Z0-9_:]*(\{[^}]*\})?\s+(-?[0-9.eE+-]+|NaN|[+-]Inf)(\s+-?\d+)?$/.test(l));
  assert.ok(samples.length > 0, `no samples in /metrics: ${safeJson(body.slice(0, 500))}`);
  assert.deepEqual(bad.slice(0, 5), [], 'lines that are not valid Prometheus samples');
  assert.ok(lines.some((l) => l.startsWith('# TYPE ')), 'no # TYPE lines in /metrics');
});
