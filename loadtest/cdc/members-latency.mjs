// Membership change to its effect on every edge, against commit to
// delivery of an ordinary change, side by side with the same clients, the
// same SQL path and the same two edges (loadtest/cdc/members-bench.sh
// starts them).
//
// One user (a token with only `sub`) has, on each of two edges, a socket
// joined to workshop W's public channel with an INSERT binding on
// workshop_activities (rule `session_id in member.workshops`) and a socket
// joined to W's private channel (rule `{id} in member.workshops`). Each
// round:
//   1. change:  INSERT an activity row of W; time until both edges
//               delivered it.
//   2. revoke:  DELETE the user's workshop_participants row; time until
//               both edges ended the private channel (system message).
//   3. grant:   INSERT the row again; time until a private join succeeds on
//               both edges (retried every 1 ms: an upper bound).
// Every time runs from just before the statement is written to a
// long-lived psql (autocommit) to the effect, so the SQL path is the same
// for all three. Prints a JSON summary.
//
//   node loadtest/cdc/members-latency.mjs <db-url> <edge1-ws> <edge2-ws> <secret> <user> <session> <rounds>
import { createRequire } from 'node:module';
import { spawn } from 'node:child_process';
import { createHmac } from 'node:crypto';

const require = createRequire(new URL('../../tests/js/package.json', import.meta.url));
const WebSocket = require('ws');

const [db, e1, e2, secret, user, session, roundsArg] = process.argv.slice(2);
if (!roundsArg) {
  console.error('usage: members-latency.mjs <db-url> <edge1-ws> <edge2-ws> <secret> <user> <session> <rounds>');
  process.exit(64);
}
const rounds = Number(roundsArg);
const b64 = (o) => Buffer.from(JSON.stringify(o)).toString('base64url');
const head = `${b64({ alg: 'HS256', typ: 'JWT' })}.${b64({ sub: user, exp: Math.floor(Date.now() / 1000) + 3600 })}`;
const token = `${head}.${createHmac('sha256', secret).update(head).digest('base64url')}`;
const topic = `realtime:workshop:${session}`;

// A long-lived psql: each statement is followed by an \echo marker, so
// its completion (the commit) is seen without starting a process.
const psql = spawn('psql', ['-X', '-q', '-At', '-v', 'ON_ERROR_STOP=1', '-d', db], { stdio: ['pipe', 'pipe', 'inherit'] });
let out = '';
const waiters = new Map();
let marker = 0;
psql.stdout.on('data', (d) => {
  out += d;
  let nl;
  while ((nl = out.indexOf('\n')) >= 0) {
    const line = out.slice(0, nl);
    out = out.slice(nl + 1);
    waiters.get(line)?.();
  }
});
function sql(text) {
  const m = `__done_${++marker}`;
  return new Promise((resolve) => {
    waiters.set(m, resolve);
    psql.stdin.write(`${text};\n\\echo ${m}\n`);
  });
}

class Sock {
  constructor(url) {
    this.ws = new WebSocket(`${url}/websocket?vsn=1.0.0&apikey=${token}`);
    this.handlers = new Set();
    this.ref = 0;
    this.ws.on('message', (raw) => {
      const m = JSON.parse(raw);
      for (const h of this.handlers) h(m);
    });
    this.open = new Promise((r) => this.ws.on('open', r));
  }
  /** Resolves with the first message `pred` accepts. */
  next(pred, ms = 15000) {
    return new Promise((resolve, reject) => {
      const t = setTimeout(() => {
        this.handlers.delete(h);
        reject(new Error('timed out'));
      }, ms);
      const h = (m) => {
        if (pred(m)) {
          clearTimeout(t);
          this.handlers.delete(h);
          resolve(m);
        }
      };
      this.handlers.add(h);
    });
  }
  async join(config) {
    const ref = String(++this.ref);
    const reply = this.next((m) => m.event === 'phx_reply' && m.ref === ref);
    this.ws.send(JSON.stringify({ topic, event: 'phx_join', payload: { config }, ref, join_ref: ref }));
    return (await reply).payload.status;
  }
}

const bindings = [{ event: 'INSERT', schema: 'public', table: 'workshop_activities', filter: `session_id=eq.${session}` }];
const pub = [new Sock(e1), new Sock(e2)];
const priv = [new Sock(e1), new Sock(e2)];
for (const s of [...pub, ...priv]) await s.open;
for (const s of pub) if ((await s.join({ postgres_changes: bindings })) !== 'ok') throw new Error('public join refused');
for (const s of priv) if ((await s.join({ private: true })) !== 'ok') throw new Error('private join refused');

const times = { change: [], revoke: [], grant: [] };
for (let i = 0; i < rounds; i++) {
  // 1. An ordinary change.
  let got = pub.map((s) => s.next((m) => m.event === 'postgres_changes' && m.payload.data.record.seq === i));
  let t0 = performance.now();
  await sql(`INSERT INTO workshop_activities (session_id, kind, seq) VALUES (${session}, 'latency', ${i})`);
  await Promise.all(got);
  times.change.push(performance.now() - t0);

  // 2. Revoke: both private channels end.
  got = priv.map((s) => s.next((m) => m.event === 'system' && /access revoked/.test(m.payload.message ?? '')));
  t0 = performance.now();
  await sql(`DELETE FROM workshop_participants WHERE session_id = ${session} AND user_id = '${user}'`);
  await Promise.all(got);
  times.revoke.push(performance.now() - t0);
  await new Promise((r) => setTimeout(r, 50));

  // 3. Grant: a private join succeeds again on both edges.
  t0 = performance.now();
  await sql(`INSERT INTO workshop_participants (session_id, user_id, display_name) VALUES (${session}, '${user}', 'lat')`);
  await Promise.all(
    priv.map(async (s) => {
      for (let k = 0; k < 1000; k++) {
        if ((await s.join({ private: true })) === 'ok') return;
        await new Promise((r) => setTimeout(r, 1));
      }
      throw new Error('the grant never took effect');
    }),
  );
  times.grant.push(performance.now() - t0);
  await new Promise((r) => setTimeout(r, 50));
}

const q = (v, p) => {
  const s = [...v].sort((a, b) => a - b);
  return Number(s[Math.min(s.length - 1, Math.floor((p / 100) * s.length))].toFixed(2));
};
const summary = Object.fromEntries(
  Object.entries(times).map(([k, v]) => [k, { n: v.length, p50_ms: q(v, 50), p90_ms: q(v, 90), max_ms: q(v, 100) }]),
);
summary.ratio_revoke_to_change_p50 = Number((summary.revoke.p50_ms / summary.change.p50_ms).toFixed(3));
summary.ratio_grant_to_change_p50 = Number((summary.grant.p50_ms / summary.change.p50_ms).toFixed(3));
console.log(JSON.stringify(summary));
psql.stdin.end();
for (const s of [...pub, ...priv]) s.ws.close();
process.exit(0);
