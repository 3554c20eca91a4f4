// Browser test of the operator's page (GET /admin on the admin listener),
// in Debian's headless Chromium driven by playwright-core. The page talks
// only to the server API (another port, with CORS), behind an API key.
//
// Three realtime-js users sit in two workshops, two of them tracked. The
// operator opens the page: a wrong key is refused with the API's reason;
// the right one shows the edge with its connections and the busiest
// channel with its subscribers and presence; the publish form's message
// reaches the realtime-js users. The page is saved as docs/admin.png.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { chromium } from 'playwright-core';
import WebSocket from 'ws';
import { RealtimeClient } from '@supabase/realtime-js';
import { startFanout, freePort, waitFor } from '../lib/server.mjs';

const CHROMIUM = process.env.CHROMIUM_PATH || '/usr/bin/chromium';
const repoRoot = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..', '..', '..');
const SCREENSHOT = path.join(repoRoot, 'docs', 'admin.png');
const KEY = 'operator-page-test-key-0123456789';

let srv;
let browser;
const clients = [];

before(async () => {
  const apiPort = await freePort();
  srv = await startFanout({
    args: ['--api-listen', `127.0.0.1:${apiPort}`],
    env: { FANOUT_API_KEYS: KEY },
  });
  browser = await chromium.launch({
    executablePath: CHROMIUM,
    args: ['--headless', '--no-sandbox', '--disable-gpu', '--no-first-run', '--disable-background-networking'],
  });
});

after(async () => {
  for (const c of clients) await c.disconnect().catch(() => {});
  await browser?.close().catch(() => {});
  await srv?.stop().catch(() => {});
});

/** A realtime-js user in `room`, tracked under `key`; its broadcasts. */
async function user(room, key) {
  const client = new RealtimeClient(srv.wsUrl, { transport: WebSocket, params: { apikey: 'dev' } });
  clients.push(client);
  const ch = client.channel(room, { config: { presence: { key } } });
  const got = [];
  ch.on('broadcast', { event: 'announce' }, (m) => got.push(m.payload));
  await new Promise((resolve, reject) => {
    ch.subscribe((status, err) => {
      if (status === 'SUBSCRIBED') resolve();
      else reject(new Error(`${room}: ${status} ${err?.message ?? ''}`));
    });
  });
  assert.equal(await ch.track({ name: key }), 'ok');
  return got;
}

test('the operator page shows edges and channels through the API and publishes a test message', async () => {
  const alice = await user('workshop:42', 'alice');
  const bob = await user('workshop:42', 'bob');
  await user('workshop:7', 'carol');

  const page = await (await browser.newContext({ viewport: { width: 1200, height: 640 } })).newPage();
  const consoleLog = [];
  page.on('console', (m) => consoleLog.push(m.text()));
  await page.goto(`${srv.adminUrl}/admin`);
  const text = (sel) => page.locator(sel).innerText();

  // A wrong key: the API's reason, nothing shown.
  await page.fill('#key', 'not-the-key-0123456789abcdef');
  await page.click('#key-form button');
  await page.waitForFunction(() => document.querySelector('#status').textContent.includes('unknown API key'), null, { timeout: 10_000 });
  assert.match(await text('#edges'), /connect with an API key/);

  await page.fill('#key', KEY);
  await page.click('#key-form button');
  await page
    .waitForFunction(
      () => {
        const rows = [...document.querySelectorAll('#channels tr')].map((r) => r.innerText);
        return rows.length === 2 && rows[0].startsWith('workshop:42');
      },
      null,
      { timeout: 10_000 },
    )
    .catch((e) => assert.fail(`${e.message}; console: ${consoleLog.join(' | ')}`));
  const edges = await page.locator('#edges tr').allInnerTexts();
  assert.equal(edges.length, 1, edges.join('\n'));
  const [, connections, channels] = edges[0].split('\t');
  assert.equal(Number(connections), 3, edges[0]);
  assert.equal(Number(channels), 2, edges[0]);
  const rows = await page.locator('#channels tr').allInnerTexts();
  assert.deepEqual(rows[0].split('\t'), ['workshop:42', '2', '2', '2']);
  assert.deepEqual(rows[1].split('\t'), ['workshop:7', '1', '1', '1']);

  // The publish form reaches the realtime-js users.
  await page.fill('#pub-channel', 'workshop:42');
  await page.fill('#pub-event', 'announce');
  await page.fill('#pub-payload', '{"text": "Break in 5 minutes"}');
  await page.click('#publish-form button');
  await page.waitForFunction(() => document.querySelector('#publish-result').textContent.startsWith('published at position'), null, {
    timeout: 10_000,
  });
  await waitFor(() => alice.length === 1 && bob.length === 1, 5000, 'the operator message');
  assert.deepEqual(alice[0], { text: 'Break in 5 minutes' });

  // A payload that is not JSON is refused on the page, before any call.
  await page.fill('#pub-payload', '{oops');
  await page.click('#publish-form button');
  await page.waitForFunction(() => document.querySelector('#publish-result').textContent.includes('not JSON'), null, { timeout: 5000 });
  await page.fill('#pub-payload', '{"text": "Break in 5 minutes"}');
  await page.click('#publish-form button');
  await page.waitForFunction(() => document.querySelector('#publish-result').textContent.startsWith('published at position'), null, {
    timeout: 5000,
  });
  await page.screenshot({ path: SCREENSHOT });
});

test('without API keys the page says what it needs', async () => {
  const plain = await startFanout();
  try {
    const res = await fetch(`${plain.adminUrl}/admin`);
    assert.equal(res.status, 404);
    assert.match((await res.json()).error, /needs the server API/);
  } finally {
    await plain.stop();
  }
});
