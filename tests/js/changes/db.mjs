// Shared by the change-stream suites (not a test file itself): the private
// PostgreSQL tests/tests/js_suites.rs starts, the routes and open table
// rules the suites' servers use, and SQL through psql.
import { execFileSync } from 'node:child_process';
import { waitFor } from '../protocol/helpers.mjs';

export const DB = process.env.FANOUT_TEST_DATABASE_URL;
export const ROUTES =
  'public.workshop_participants=workshop:{session_id},public.workshop_activities=workshop:{session_id},' +
  'public.workshop_stage_submissions=workshop:{session_id}';

// With a key configured, every table needs a row rule: these open the
// workshop schema's four tables.
export const OPEN_TABLES =
  "{'public.workshop_sessions' = {read = 'public'}, 'public.workshop_participants' = {read = 'public'}, " +
  "'public.workshop_activities' = {read = 'public'}, 'public.workshop_stage_submissions' = {read = 'public'}}";

/** Runs SQL with psql; returns its unaligned output. */
export function sql(text) {
  return execFileSync('psql', ['-X', '-q', '-v', 'ON_ERROR_STOP=1', '-At', '-d', DB, '-c', text], {
    encoding: 'utf8',
  }).trim();
}

/** A maker of fresh workshop session rows with ids from `first` (one range per suite file). */
export function sessions(first) {
  let next = first;
  return () => {
    const id = next++;
    sql(`INSERT INTO workshop_sessions (id, title) VALUES (${id}, 'Workshop ${id}')`);
    return id;
  };
}

/**
 * Waits until the change stream feeding `server` runs: the in-process
 * ingester (standalone), or the `fanout cdc` whose admin port the cluster
 * harness passes in FANOUT_TEST_CDC_ADMIN_PORT.
 */
export async function changeStreamRunning(server) {
  const ingesterAdmin = process.env.FANOUT_TEST_CDC_ADMIN_PORT ?? server.adminPort;
  await waitFor(
    async () => /^fanout_cdc_active 1$/m.test(await (await fetch(`http://127.0.0.1:${ingesterAdmin}/metrics`)).text()),
    15000,
    'the change stream to start',
  );
}
