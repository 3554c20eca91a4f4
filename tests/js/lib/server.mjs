// Test harness: starts the real `fanout` binary on free loopback ports and
// stops it again. Shared by the protocol suite and the browser tests.
import { spawn } from 'node:child_process';
import { createServer } from 'node:net';
import { existsSync, readFileSync } from 'node:fs';
import { fileURLToPath } from 'node:url';
import path from 'node:path';
import crypto from 'node:crypto';

const repoRoot = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..', '..', '..');

/** Path of the fanout binary: $FANOUT_BIN, else target/debug, else target/release. */
export function fanoutBin() {
  if (process.env.FANOUT_BIN) return process.env.FANOUT_BIN;
  for (const profile of ['debug', 'release']) {
    const p = path.join(repoRoot, 'target', profile, 'fanout');
    if (existsSync(p)) return p;
  }
  throw new Error('fanout binary not found: run `cargo build` or set FANOUT_BIN');
}

/** Whether `port` can be listened on at 127.0.0.1 right now. */
function canListen(port) {
  return new Promise((resolve) => {
    const srv = createServer();
    srv.unref();
    srv.once('error', () => resolve(false));
    srv.listen(port, '127.0.0.1', () => srv.close(() => resolve(true)));
  });
}

/**
 * A free TCP port on 127.0.0.1 for a server a test starts, chosen below the
 * kernel's ephemeral range (as the Rust harness does): a port from
 * `listen(0)` can be taken by another process's outgoing connection before
 * the server binds it.
 */
export async function freePort() {
  let low = 32768;
  try {
    low = Number(readFileSync('/proc/sys/net/ipv4/ip_local_port_range', 'utf8').trim().split(/\s+/)[0]) || low;
  } catch {}
  const first = 10000;
  for (let i = 0; i < 200 && low - 1 > first; i++) {
    const port = first + crypto.randomInt(low - first);
    if (await canListen(port)) return port;
  }
  return new Promise((resolve, reject) => {
    const srv = createServer();
    srv.unref();
    srv.on('error', reject);
    srv.listen(0, '127.0.0.1', () => {
      const { port } = srv.address();
      srv.close(() => resolve(port));
    });
  });
}

export const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

/** Polls `fn` every 25 ms until it returns truthy or `timeoutMs` passes. */
export async function waitFor(fn, timeoutMs = 5000, what = 'condition') {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const v = await fn();
    if (v) return v;
    if (Date.now() > deadline) throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}`);
    await sleep(25);
  }
}

/** Signs an HS256 JWT with node's crypto (no extra dependency). */
export function signJwt(claims, secret) {
  const b64 = (obj) => Buffer.from(JSON.stringify(obj)).toString('base64url');
  const head = b64({ alg: 'HS256', typ: 'JWT' });
  const body = b64(claims);
  const sig = crypto.createHmac('sha256', secret).update(`${head}.${body}`).digest('base64url');
  return `${head}.${body}.${sig}`;
}

/**
 * Starts `fanout standalone` on free ports. Options:
 * - `port`: public port to reuse (for restart tests); default a free one.
 * - `env`: extra environment (e.g. FANOUT_JWT_SECRET).
 * - `args`: extra CLI arguments.
 * Resolves once /healthz answers. The returned object has `url` (http base),
 * `wsUrl` (the realtime-js endpoint base, `ws://…/realtime/v1`), `port`,
 * `adminPort`, `stop()` (SIGTERM, waits for exit) and `kill()` (SIGKILL).
 */
export async function startFanout({ port, adminPort, env = {}, args = [] } = {}) {
  port = port ?? (await freePort());
  adminPort = adminPort ?? (await freePort());
  // With FANOUT_TEST_NATS_URL set, the same tests run against a cluster-mode
  // edge on that (private) NATS server instead of standalone.
  // With FANOUT_TEST_REDIS_URL too, edges share presence through Redis.
  const nats = process.env.FANOUT_TEST_NATS_URL;
  const redis = process.env.FANOUT_TEST_REDIS_URL;
  const role = nats
    ? ['edge', '--nats-url', nats, '--nats-shards', '8', '--nats-streams', '2', ...(redis ? ['--redis-url', redis] : [])]
    : ['standalone'];
  const child = spawn(
    fanoutBin(),
    [...role, '--listen', `127.0.0.1:${port}`, '--admin-listen', `127.0.0.1:${adminPort}`, ...args],
    { env: { ...process.env, RUST_LOG: process.env.RUST_LOG ?? 'warn', ...env }, stdio: ['ignore', 'inherit', 'pipe'] },
  );
  let stderr = '';
  child.stderr.on('data', (d) => {
    stderr += d;
    if (process.env.FANOUT_TEST_VERBOSE) process.stderr.write(d);
  });
  const exited = new Promise((resolve) => child.on('exit', (code, signal) => resolve({ code, signal })));
  let dead = false;
  exited.then(() => { dead = true; });
  const url = `http://127.0.0.1:${port}`;
  await waitFor(async () => {
    if (dead) throw new Error(`fanout exited during start-up:\n${stderr}`);
    try {
      // Ready, not just alive: an edge is ready once its bus is.
      const r = await fetch(`http://127.0.0.1:${adminPort}/readyz`);
      return r.ok;
    } catch {
      return false;
    }
  }, 15000, 'fanout /healthz');
  return {
    url,
    wsUrl: `ws://127.0.0.1:${port}/realtime/v1`,
    adminUrl: `http://127.0.0.1:${adminPort}`,
    port,
    adminPort,
    child,
    exited,
    stderr: () => stderr,
    async stop() {
      if (!dead) child.kill('SIGTERM');
      return exited;
    },
    async kill() {
      if (!dead) child.kill('SIGKILL');
      return exited;
    },
  };
}
