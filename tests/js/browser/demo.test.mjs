// Browser test of the demo page served by `fanout standalone` (GET / and
// GET /fanout.js), in Debian's headless Chromium driven by playwright-core.
//
// Two people (Alice and Bob) open the workshop room, see each other online and
// chat. Then the server is SIGKILLed: both pages must show "Offline", and once
// a new server listens on the same port they must come back "Live" on their
// own (no click), rejoin, re-track their presence and chat again.
//
// Run: cd tests/js && node --test --test-concurrency=1 browser/
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { existsSync, mkdirSync } from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { chromium } from 'playwright-core';
import { startFanout } from '../lib/server.mjs';

const CHROMIUM = process.env.CHROMIUM_PATH || '/usr/bin/chromium';
const repoRoot = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..', '..', '..');
const SCREENSHOT = path.join(repoRoot, 'docs', 'demo.png');
const ROOM = 'workshop:demo';

const STEP_MS = 10_000; // ordinary UI waits
const RECONNECT_MS = 15_000; // Live again after the restart (backoff 1 s, 2 s, 4 s …)

let srv;
let browser;
const pages = {}; // name → {page, log: string[]}

before(async () => {
  if (!existsSync(CHROMIUM)) {
    throw new Error(
      `Chromium not found at ${CHROMIUM}. Install Debian's package (apt-get install chromium) ` +
        'or set CHROMIUM_PATH; `npx playwright install` does not work here.',
    );
  }
  srv = await startFanout();
  browser = await chromium.launch({
    executablePath: CHROMIUM,
    args: [
      '--headless',
      '--no-sandbox',
      '--disable-gpu',
      '--disable-quic',
      '--no-first-run',
      '--disable-background-networking',
      '--disable-component-update',
      '--disable-sync',
    ],
  });
});

after(async () => {
  await browser?.close().catch(() => {});
  await srv?.stop().catch(() => {});
});

/** Opens the room as `name` in a fresh browser context; records console output. */
async function openAs(name) {
  const context = await browser.newContext({ viewport: { width: 1280, height: 800 } });
  const page = await context.newPage();
  const log = [];
  page.on('console', (m) => log.push(`[console.${m.type()}] ${m.text()}`));
  page.on('pageerror', (e) => log.push(`[pageerror] ${e.stack || e}`));
  page.on('requestfailed', (r) => log.push(`[requestfailed] ${r.url()} ${r.failure()?.errorText}`));
  const resp = await page.goto(`${srv.url}/?name=${encodeURIComponent(name)}&room=${encodeURIComponent(ROOM)}`);
  assert.equal(resp.status(), 200, `GET / answered ${resp.status()}`);
  pages[name] = { page, log };
  return page;
}

/** What a page shows, for failure messages. */
async function snapshot(name) {
  const { page, log } = pages[name];
  const ui = await page
    .evaluate(() => {
      const t = (id) => document.querySelector(`[data-testid="${id}"]`)?.innerText ?? '(missing)';
      return { status: t('status'), online: t('online'), messages: t('messages'), activity: t('activity') };
    })
    .catch((e) => ({ error: String(e) }));
  return `--- ${name} ---\n${JSON.stringify(ui, null, 2)}\n${log.slice(-30).join('\n')}`;
}

/** Waits for `fn(arg)` to hold in the page; on timeout fails with what both pages show. */
async function waitInPage(name, what, fn, arg, timeout = STEP_MS) {
  try {
    await pages[name].page.waitForFunction(fn, arg, { timeout, polling: 50 });
  } catch (err) {
    const snaps = await Promise.all(Object.keys(pages).map(snapshot));
    throw new Error(`${name}: timed out after ${timeout} ms waiting for ${what}\n${snaps.join('\n')}\n(${err.message.split('\n')[0]})`);
  }
}

const statusIs = (name, text, timeout) =>
  waitInPage(
    name,
    `status "${text}"`,
    (t) => document.querySelector('[data-testid="status"]')?.textContent.trim() === t,
    text,
    timeout,
  );

/** Both names listed online, from a presence sync over the live socket. */
const onlineAre = (name, names, timeout) =>
  waitInPage(
    name,
    `online list to contain ${names.join(', ')}`,
    (want) => {
      const list = document.querySelector('[data-testid="online"]');
      if (!list || list.dataset.stale === 'true') return false;
      const items = [...list.querySelectorAll('li')].map((li) => li.textContent);
      return want.every((n) => items.some((t) => t.includes(n))) && items.length === want.length;
    },
    names,
    timeout,
  );

const messageShown = (name, from, text, timeout) =>
  waitInPage(
    name,
    `message "${text}" from ${from}`,
    ([f, t]) =>
      [...document.querySelectorAll('[data-testid="messages"] li')].some(
        (li) => li.textContent.includes(f) && li.textContent.includes(t),
      ),
    [from, text],
    timeout,
  );

async function sendChat(page, text) {
  await page.locator('[data-testid="chat-input"]').fill(text);
  await page.locator('[data-testid="chat-input"]').press('Enter');
}

test('demo page: presence, chat, and recovery after a server crash', { timeout: 120_000 }, async () => {
  const alice = await openAs('Alice');
  const bob = await openAs('Bob');

  // Both connect, join and see each other.
  await statusIs('Alice', 'Live');
  await statusIs('Bob', 'Live');
  await onlineAre('Alice', ['Alice', 'Bob']);
  await onlineAre('Bob', ['Alice', 'Bob']);
  assert.equal(await alice.locator('[data-testid="reconnect"]').isVisible(), false, 'Reconnect button hidden while live');

  // Typing indicator, then a chat message (Alice → Bob, and back to Alice via self: true).
  await alice.locator('[data-testid="chat-input"]').pressSequentially('Hel');
  await waitInPage('Bob', '"Alice is typing…"', () =>
    document.querySelector('[data-testid="typing"]')?.textContent.includes('Alice is typing…'),
  );
  await alice.locator('[data-testid="chat-input"]').fill('Hello from Alice');
  await alice.locator('[data-testid="chat-send"]').click();
  await messageShown('Bob', 'Alice', 'Hello from Alice');
  await messageShown('Alice', 'Alice', 'Hello from Alice');
  await sendChat(bob, 'Hi Alice, Bob here');
  await messageShown('Alice', 'Bob', 'Hi Alice, Bob here');

  // Crash the server: both pages notice and show Offline with a Reconnect button.
  await srv.kill();
  await statusIs('Alice', 'Offline');
  await statusIs('Bob', 'Offline');
  await waitInPage('Alice', 'Reconnect button visible', () => {
    const b = document.querySelector('[data-testid="reconnect"]');
    return b && !b.hidden;
  });

  // Restart on the same port: the pages reconnect by themselves (no click).
  srv = await startFanout({ port: srv.port, adminPort: srv.adminPort });
  await statusIs('Alice', 'Live', RECONNECT_MS);
  await statusIs('Bob', 'Live', RECONNECT_MS);
  await onlineAre('Alice', ['Alice', 'Bob']);
  await onlineAre('Bob', ['Alice', 'Bob']);

  // Chat works again.
  await sendChat(alice, 'Back online after the restart');
  await messageShown('Bob', 'Alice', 'Back online after the restart');
  await messageShown('Alice', 'Alice', 'Back online after the restart');
  await sendChat(bob, 'Welcome back');
  await messageShown('Alice', 'Bob', 'Welcome back');

  // The activity feed recorded the outage and the recovery.
  const feed = await alice.locator('[data-testid="activity"]').innerText();
  assert.match(feed, /Connection lost/, 'activity shows the connection loss');
  assert.match(feed, /Reconnected/, 'activity shows the reconnection');

  mkdirSync(path.dirname(SCREENSHOT), { recursive: true });
  await bob.locator('[data-testid="chat-input"]').fill('');
  await alice.screenshot({ path: SCREENSHOT });

  const errors = Object.values(pages).flatMap(({ log }) => log.filter((l) => l.startsWith('[pageerror]')));
  assert.deepEqual(errors, [], 'no uncaught errors in the pages');
});
