// Shared helpers for the protocol suite (not a test file itself: node --test
// only picks up *.test.mjs). Everything here talks to a real `fanout`
// process started through ../lib/server.mjs.
import assert from 'node:assert/strict';
import WebSocket from 'ws';
import net from 'node:net';
import { RealtimeClient } from '@supabase/realtime-js';
import { createClient } from '@supabase/supabase-js';
import { startFanout, signJwt, waitFor, sleep, freePort } from '../lib/server.mjs';

export { waitFor, sleep, signJwt, WebSocket };

export const SECRET = 'test-secret-at-least-32-bytes-long!!';
export const WRONG_SECRET = 'this-is-not-the-server-secret-0123456789';

export const nowSec = () => Math.floor(Date.now() / 1000);

/** A valid HS256 token for SECRET (override claims / secret as needed). */
export function makeToken(claims = {}, secret = SECRET) {
  return signJwt({ sub: 'user-1', role: 'authenticated', exp: nowSec() + 3600, ...claims }, secret);
}

/** Starts fanout with FANOUT_JWT_SECRET=SECRET unless `secret: null`. */
export async function startServer({ env = {}, args = [], secret = SECRET, port, adminPort } = {}) {
  const fullEnv = { ...env };
  if (secret) fullEnv.FANOUT_JWT_SECRET = secret;
  return startFanout({ env: fullEnv, args, port, adminPort });
}

/** The server API key startServerWithApi configures (scope all). */
export const API_KEY = 'test-api-key-all-0123456789';

/**
 * Starts fanout (as startServer) with the server API on a free port and
 * API_KEY; resolves {server, api}, `api` being the /api/v1 base URL.
 */
export async function startServerWithApi({ args = [], env = {}, ...rest } = {}) {
  const apiPort = await freePort();
  const server = await startServer({
    ...rest,
    args: ['--api-listen', `127.0.0.1:${apiPort}`, ...args],
    env: { ...env, FANOUT_API_KEYS: API_KEY },
  });
  return { server, api: `http://127.0.0.1:${apiPort}/api/v1` };
}

/** POSTs `body` to `api`/`path` with API_KEY; asserts 200 and resolves the JSON answer. */
export async function apiPost(api, path, body) {
  const r = await fetch(`${api}/${path}`, {
    method: 'POST',
    headers: { 'Content-Type': 'application/json', Authorization: `Bearer ${API_KEY}` },
    body: JSON.stringify(body),
  });
  const text = await r.text();
  assert.equal(r.status, 200, `POST ${path}: ${text}`);
  return JSON.parse(text);
}

let uniq = 0;
/** A channel name unique within this process. */
export const uniqueRoom = (prefix = 'room') => `${prefix}-${process.pid}-${Date.now().toString(36)}-${++uniq}`;

// ---------------------------------------------------------------------------
// realtime-js clients
// ---------------------------------------------------------------------------

const liveClients = new Set();

/**
 * A RealtimeClient pointed at `server`, with the `ws` transport (Node 20 has
 * no global WebSocket). Inbound messages, closes and errors are recorded on
 * `client.__log` so failures can show what the server actually sent.
 */
export function makeClient(server, { vsn = '2.0.0', apikey, timeout = 5000, ...opts } = {}) {
  const client = new RealtimeClient(server.wsUrl, {
    transport: WebSocket,
    params: { apikey: apikey ?? makeToken() },
    vsn,
    timeout,
    // Slower reconnects than the default so refused sockets do not spin.
    reconnectAfterMs: () => 1000,
    ...opts,
  });
  const log = { received: [], closes: [], errors: [] };
  client.__log = log;
  client.socketAdapter.onMessage((m) => {
    log.received.push(m);
    if (log.received.length > 200) log.received.shift();
  });
  client.socketAdapter.onClose((ev) => log.closes.push({ code: ev?.code, reason: ev?.reason }));
  client.socketAdapter.onError((ev) => log.errors.push(String(ev?.message ?? ev?.error ?? ev?.type ?? ev)));
  liveClients.add(client);
  return client;
}

/** Short description of what a client saw, for assertion messages. */
export function describeClient(client, last = 8) {
  if (!client?.__log) return '(no client log)';
  const { received, closes, errors } = client.__log;
  const msgs = received.slice(-last).map((m) => {
    const p = m.payload instanceof ArrayBuffer ? `<ArrayBuffer ${m.payload.byteLength}>` : m.payload;
    return { topic: m.topic, event: m.event, ref: m.ref, join_ref: m.join_ref, payload: p };
  });
  return `vsn=${client.vsn} state=${client.connectionState()} last received=${safeJson(msgs)} closes=${safeJson(closes)} errors=${safeJson(errors)}`;
}

export function safeJson(v, max = 1500) {
  let s;
  try {
    s = JSON.stringify(v, (_k, x) => (x instanceof ArrayBuffer ? `<ArrayBuffer ${x.byteLength}>` : typeof x === 'bigint' ? String(x) : x));
  } catch {
    s = String(v);
  }
  if (s === undefined) s = String(v);
  return s.length > max ? `${s.slice(0, max)}…(${s.length} chars)` : s;
}

/** Tears down every channel and disconnects every client made by makeClient. */
export async function disconnectAll() {
  const clients = [...liveClients];
  liveClients.clear();
  await Promise.all(clients.map(closeClient));
}

export async function closeClient(client) {
  liveClients.delete(client);
  for (const ch of [...client.getChannels()]) {
    try {
      ch.teardown();
    } catch {}
  }
  try {
    await Promise.race([client.disconnect(), sleep(3000)]);
  } catch {}
}

/**
 * Subscribes and resolves once SUBSCRIBED; rejects on CHANNEL_ERROR,
 * TIMED_OUT, CLOSED or after `ms`, with every status seen.
 */
export function subscribe(channel, ms = 5000) {
  const client = channel.socket;
  return new Promise((resolve, reject) => {
    const statuses = [];
    let done = false;
    const finish = (ok, why) => {
      if (done) return;
      done = true;
      clearTimeout(timer);
      if (ok) resolve(statuses);
      else reject(new Error(`${channel.topic}: ${why}; statuses=${safeJson(statuses)}; ${describeClient(client)}`));
    };
    const timer = setTimeout(() => finish(false, `not SUBSCRIBED within ${ms} ms`), ms);
    channel.subscribe((status, err) => {
      statuses.push(err ? `${status}: ${err.message}` : status);
      if (status === 'SUBSCRIBED') finish(true);
      else finish(false, `got ${status}${err ? ` (${err.message})` : ''}`);
    });
  });
}

/**
 * Subscribes and watches the statuses for `watchMs`, resolving early
 * (after `graceMs` more) on the first non-SUBSCRIBED terminal status.
 * Resolves with [{status, message}] in order.
 */
export function subscribeOutcome(channel, { watchMs = 4000, graceMs = 1500 } = {}) {
  return new Promise((resolve) => {
    const seen = [];
    let early = null;
    const end = setTimeout(() => {
      clearTimeout(early);
      resolve(seen);
    }, watchMs);
    channel.subscribe((status, err) => {
      seen.push({ status, message: err?.message ?? null, cause: err?.cause ?? null });
      if (status !== 'SUBSCRIBED' && !early) {
        early = setTimeout(() => {
          clearTimeout(end);
          resolve(seen);
        }, graceMs);
      }
    });
  });
}

/** Collects `.on('broadcast', {event}, …)` deliveries into an array. */
export function collectBroadcasts(channel, event = '*') {
  const got = [];
  channel.on('broadcast', { event }, (msg) => got.push(msg));
  return got;
}

// ---------------------------------------------------------------------------
// Health check: after any abuse, a brand-new realtime-js pair must work.
// ---------------------------------------------------------------------------

export async function assertServerAlive(server, context = '') {
  const { code, signal } = { code: server.child.exitCode, signal: server.child.signalCode };
  assert.ok(code === null && signal === null, `fanout process died ${context}: exit=${code} signal=${signal}\nstderr:\n${server.stderr().slice(-4000)}`);
  let status;
  try {
    status = (await fetch(`${server.url}/healthz`)).status;
  } catch (e) {
    status = `fetch failed: ${e.message}`;
  }
  assert.equal(status, 200, `/healthz after ${context} answered ${status}`);
}

/**
 * Asserts the server is alive and that two brand-new realtime-js clients
 * (vsn 2.0.0 sender, vsn 1.0.0 receiver) can connect, join and exchange an
 * acknowledged broadcast.
 */
export async function assertHealthy(server, context = '') {
  await assertServerAlive(server, context);
  const room = uniqueRoom('health');
  const a = makeClient(server, { vsn: '2.0.0' });
  const b = makeClient(server, { vsn: '1.0.0' });
  try {
    const chA = a.channel(room, { config: { broadcast: { ack: true } } });
    const chB = b.channel(room);
    const got = collectBroadcasts(chB, 'ping');
    await subscribe(chA).catch((e) => assert.fail(`health check after ${context}: new client could not join: ${e.message}`));
    await subscribe(chB).catch((e) => assert.fail(`health check after ${context}: new client could not join: ${e.message}`));
    const res = await chA.send({ type: 'broadcast', event: 'ping', payload: { context } });
    assert.equal(res, 'ok', `health check after ${context}: ack send resolved ${safeJson(res)}; ${describeClient(a)}`);
    await waitFor(() => got.length > 0, 3000, `health-check broadcast after ${context}`).catch((e) =>
      assert.fail(`${e.message}; receiver: ${describeClient(b)}`),
    );
    assert.deepEqual(got[0].payload, { context });
  } finally {
    await closeClient(a);
    await closeClient(b);
  }
}

// ---------------------------------------------------------------------------
// Raw WebSocket connections (for wire-level checks and bad input)
// ---------------------------------------------------------------------------

const enc = new TextEncoder();
const dec = new TextDecoder();

/** Encodes a vsn 2.0.0 user-broadcast push (kind 3) like realtime-js does. */
export function encodeBroadcastPush({ joinRef = '', ref = '', topic, event, payload, encoding = 1, meta = '' }) {
  const j = enc.encode(joinRef);
  const r = enc.encode(ref);
  const t = enc.encode(topic);
  const e = enc.encode(event);
  const m = enc.encode(meta);
  const body = encoding === 1 ? enc.encode(JSON.stringify(payload)) : new Uint8Array(payload);
  const head = new Uint8Array([3, j.length, r.length, t.length, e.length, m.length, encoding]);
  return Buffer.concat([head, j, r, t, e, m, body]);
}

/** Decodes a server->client binary frame; kind 4 is a user broadcast. */
export function decodeBinary(buf) {
  const b = new Uint8Array(buf);
  const kind = b[0];
  if (kind !== 4) return { kind, length: b.length };
  const topicSize = b[1];
  const eventSize = b[2];
  const metaSize = b[3];
  const encoding = b[4];
  let o = 5;
  const topic = dec.decode(b.slice(o, o + topicSize));
  o += topicSize;
  const event = dec.decode(b.slice(o, o + eventSize));
  o += eventSize;
  const metaText = dec.decode(b.slice(o, o + metaSize));
  o += metaSize;
  const rest = b.slice(o);
  let meta = null;
  if (metaSize > 0) {
    try {
      meta = JSON.parse(metaText);
    } catch {
      meta = { unparsable: metaText };
    }
  }
  let payload;
  if (encoding === 1) {
    try {
      payload = JSON.parse(dec.decode(rest));
    } catch {
      payload = { unparsable: dec.decode(rest) };
    }
  } else {
    payload = rest;
  }
  return { kind, topic, event, meta, encoding, payload };
}

/**
 * A raw `ws` connection speaking vsn 1.0.0 (JSON objects) or 2.0.0 (JSON
 * arrays + binary broadcasts). Every inbound frame is decoded into
 * {topic, event, payload, ref, join_ref, binary?} and kept in `messages`.
 */
export class RawConn {
  static open(server, { vsn = '1.0.0', apikey, extraQuery = '', wsOptions = {} } = {}) {
    const key = apikey === undefined ? makeToken() : apikey;
    const qs = [key === null ? null : `apikey=${encodeURIComponent(key)}`, `vsn=${vsn}`, extraQuery || null].filter(Boolean).join('&');
    const url = `${server.wsUrl}/websocket?${qs}`;
    return new Promise((resolve, reject) => {
      const ws = new WebSocket(url, wsOptions);
      const conn = new RawConn(ws, vsn);
      const t = setTimeout(() => {
        ws.terminate();
        reject(new Error(`raw ws to ${url} did not open within 5 s`));
      }, 5000);
      ws.once('open', () => {
        clearTimeout(t);
        resolve(conn);
      });
      ws.once('unexpected-response', (_req, res) => {
        clearTimeout(t);
        let body = '';
        res.on('data', (d) => (body += d));
        res.on('end', () => reject(Object.assign(new Error(`upgrade refused: HTTP ${res.statusCode} ${body}`), { status: res.statusCode, body })));
        _req.destroy?.();
      });
      ws.once('error', (e) => {
        clearTimeout(t);
        reject(e);
      });
    });
  }

  constructor(ws, vsn) {
    this.ws = ws;
    this.vsn = vsn;
    this.messages = [];
    this.refCounter = 0;
    this.closeInfo = null;
    this.closed = new Promise((resolve) => {
      ws.on('close', (code, reason) => {
        this.closeInfo = { code, reason: reason.toString() };
        resolve(this.closeInfo);
      });
    });
    ws.on('error', (e) => {
      this.lastError = e;
    });
    ws.on('message', (data, isBinary) => {
      if (isBinary) {
        const d = decodeBinary(data);
        this.messages.push({ binary: true, kind: d.kind, topic: d.topic, event: 'broadcast', payload: d.kind === 4 ? { type: 'broadcast', event: d.event, payload: d.payload, ...(d.meta ? { meta: d.meta } : {}) } : d, encoding: d.encoding, ref: null, join_ref: null });
        return;
      }
      const text = data.toString();
      let v;
      try {
        v = JSON.parse(text);
      } catch {
        this.messages.push({ unparsable: text });
        return;
      }
      if (Array.isArray(v)) {
        const [join_ref, ref, topic, event, payload] = v;
        this.messages.push({ form: 'array', join_ref, ref, topic, event, payload });
      } else {
        this.messages.push({ form: 'object', ...v });
      }
    });
  }

  makeRef() {
    return String(++this.refCounter);
  }

  /** Encodes {topic, event, payload, ref, join_ref} per vsn and sends it. */
  send({ topic, event, payload = {}, ref = null, join_ref = null }) {
    if (this.vsn === '2.0.0') this.ws.send(JSON.stringify([join_ref, ref, topic, event, payload]));
    else this.ws.send(JSON.stringify({ topic, event, payload, ref, join_ref }));
  }

  sendRaw(data, opts) {
    this.ws.send(data, opts);
  }

  /** Waits for a message matching `pred` (searching from index `from`). */
  async waitMessage(pred, ms = 3000, what = 'message', from = 0) {
    try {
      return await waitFor(() => this.messages.slice(from).find(pred), ms, what);
    } catch (e) {
      throw new Error(`${e.message}; close=${safeJson(this.closeInfo)}; received=${safeJson(this.messages.slice(-10))}`);
    }
  }

  /** Sends a push and waits for its phx_reply (matched by ref). */
  async push(topic, event, payload = {}, { joinRef = null, ms = 3000 } = {}) {
    const ref = this.makeRef();
    this.send({ topic, event, payload, ref, join_ref: joinRef });
    const reply = await this.waitMessage((m) => m.event === 'phx_reply' && m.ref === ref, ms, `phx_reply to ${event} ${topic} ref=${ref}`);
    return { ref, reply };
  }

  /** Joins `topic`; resolves {joinRef, reply}. */
  async join(topic, config = {}, extra = {}, ms = 3000) {
    const joinRef = this.makeRef();
    const payload = {
      config: { broadcast: { ack: false, self: false }, presence: { key: '', enabled: false }, postgres_changes: [], private: false, ...config },
      ...extra,
    };
    this.send({ topic, event: 'phx_join', payload, ref: joinRef, join_ref: joinRef });
    const reply = await this.waitMessage((m) => m.event === 'phx_reply' && m.ref === joinRef, ms, `phx_reply to phx_join ${topic}`);
    return { joinRef, reply };
  }

  /** Resolves {closed:{code,reason}} or {error: message} or null if nothing within ms. */
  async errorOrClose(from, ms = 2000, pred = isErrorish) {
    const deadline = Date.now() + ms;
    for (;;) {
      const m = this.messages.slice(from).find(pred);
      if (m) return { error: m };
      if (this.closeInfo) return { closed: this.closeInfo };
      if (Date.now() > deadline) return null;
      await sleep(20);
    }
  }

  close() {
    try {
      this.ws.terminate();
    } catch {}
  }
}

/** Does this decoded message look like an error answer from the server? */
export function isErrorish(m) {
  if (!m || m.unparsable) return false;
  if (m.event === 'phx_reply' && m.payload && m.payload.status === 'error') return true;
  if (m.event === 'phx_error' || m.event === 'error') return true;
  if (m.event === 'system' && m.payload && m.payload.status === 'error') return true;
  if (m.form === 'object' && typeof m.error !== 'undefined') return true; // bare {"error": ...}
  return false;
}

/** A close code that a peer chose on purpose (not 1005 no-status / 1006 abnormal). */
export function isClearCloseCode(code) {
  return Number.isInteger(code) && code >= 1000 && code <= 4999 && code !== 1005 && code !== 1006;
}

/**
 * Tries a raw WebSocket upgrade and resolves {status, body, opened}. If the
 * upgrade succeeds the socket is closed again immediately.
 */
export function tryUpgrade(url, ms = 5000) {
  return new Promise((resolve) => {
    const ws = new WebSocket(url);
    const t = setTimeout(() => {
      ws.terminate();
      resolve({ status: null, body: null, opened: false, timeout: true });
    }, ms);
    ws.once('open', () => {
      clearTimeout(t);
      ws.terminate();
      resolve({ status: 101, body: null, opened: true });
    });
    ws.once('unexpected-response', (req, res) => {
      clearTimeout(t);
      let body = '';
      res.on('data', (d) => (body += d));
      res.on('end', () => {
        req.destroy?.();
        resolve({ status: res.statusCode, body, headers: res.headers, opened: false });
      });
    });
    ws.once('error', (e) => {
      clearTimeout(t);
      resolve({ status: null, body: null, opened: false, error: e.message });
    });
  });
}

const rawConns = new Set();
/** RawConn.open that also registers the connection for closeAllRaw(). */
export async function openRaw(server, opts) {
  const c = await RawConn.open(server, opts);
  rawConns.add(c);
  return c;
}
export function closeAllRaw() {
  for (const c of rawConns) c.close();
  rawConns.clear();
}

// ---------------------------------------------------------------------------
// supabase-js clients and a load balancer
// ---------------------------------------------------------------------------

/**
 * A @supabase/supabase-js client as an app makes one, against `baseUrl`
 * (http://host:port; it connects to <baseUrl>/realtime/v1/websocket), with
 * the ws transport Node 20 needs. The caller closes it.
 */
export function supabaseClient(baseUrl, realtime = {}) {
  return createClient(baseUrl, makeToken(), {
    realtime: { transport: WebSocket, reconnectAfterMs: () => 200, ...realtime },
    auth: { persistSession: false, autoRefreshToken: false },
  });
}

/** Subscribes a supabase-js channel; resolves on SUBSCRIBED, rejects otherwise or after 5 s. */
export function subscribed(channel) {
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`${channel.topic} not SUBSCRIBED in 5 s`)), 5000);
    channel.subscribe((status, err) => {
      if (status === 'SUBSCRIBED') {
        clearTimeout(timer);
        resolve();
      } else if (status !== 'CLOSED') {
        clearTimeout(timer);
        reject(new Error(`${channel.topic}: ${status} ${err?.message ?? ''}`));
      }
    });
  });
}

/**
 * A TCP load balancer in front of `targets`: each new connection goes to the
 * next target in turn, skipping one that refuses (a killed edge); `down()`
 * cuts every connection and refuses new ones until `up()`.
 */
export async function loadBalancer(targets) {
  let next = 0;
  let accepting = true;
  const open = new Set();
  const track = (s) => {
    open.add(s);
    s.on('close', () => open.delete(s));
    s.on('error', () => {});
  };
  const forward = (client, tries) => {
    const target = targets[next++ % targets.length];
    const upstream = net.connect(target.port, '127.0.0.1');
    upstream.once('error', () => (tries > 1 && !client.destroyed ? forward(client, tries - 1) : client.destroy()));
    upstream.once('connect', () => {
      track(upstream);
      client.pipe(upstream).pipe(client);
      client.on('close', () => upstream.destroy());
      upstream.on('close', () => client.destroy());
    });
  };
  const server = net.createServer((client) => {
    if (!accepting) return client.destroy();
    track(client);
    client.pause();
    forward(client, targets.length);
  });
  await new Promise((r) => server.listen(0, '127.0.0.1', r));
  return {
    url: `http://127.0.0.1:${server.address().port}`,
    down() {
      accepting = false;
      for (const s of open) s.destroy();
    },
    up() {
      accepting = true;
    },
    close: () => new Promise((r) => server.close(r)),
  };
}
