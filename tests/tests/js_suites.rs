//! Runs the JavaScript suites in `tests/js` against the freshly built binary:
//! the protocol suite with the real `@supabase/realtime-js` client, and the
//! demo page in headless Chromium. `tests/run.sh` installs Node.js,
//! Chromium and the npm packages first.

use std::process::Command;

fn run_node_suite(dir: &str) {
    run_node_suite_with(dir, &[]);
}

fn run_node_suite_with(dir: &str, env: &[(&str, String)]) {
    let js = fanout_tests::repo_root().join("tests/js");
    assert!(
        js.join("node_modules/@supabase/realtime-js").exists(),
        "npm packages missing: run `bash tests/run.sh` (or `npm ci` in tests/js)"
    );
    let out = Command::new("node")
        .args(["--test", "--test-concurrency=1", "--test-reporter=spec", dir])
        .current_dir(&js)
        .env("FANOUT_BIN", fanout_tests::fanout_bin())
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .output()
        .expect("node is installed (tests/run.sh installs it)");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("{stdout}");
    eprintln!("{stderr}");
    assert!(out.status.success(), "node --test {dir} failed");
    assert!(
        stdout.contains("ℹ pass") && !stdout.contains("ℹ pass 0"),
        "no test ran in {dir}"
    );
}

#[test]
fn realtime_js_protocol_suite() {
    run_node_suite("protocol/");
}

/// The same realtime-js suite against cluster-mode edges (`fanout edge`) on
/// a private `nats-server -js`, sharing presence through a private Redis.
#[tokio::test]
async fn realtime_js_protocol_suite_against_a_cluster_edge() {
    let nats = fanout_tests::Nats::start().await.expect("nats-server starts");
    let redis = fanout_tests::Redis::start().await.expect("redis-server starts");
    let env = [
        ("FANOUT_TEST_NATS_URL", nats.url()),
        ("FANOUT_TEST_REDIS_URL", redis.url()),
    ];
    tokio::task::spawn_blocking(move || run_node_suite_with("protocol/", &env))
        .await
        .expect("suite ran");
    drop((nats, redis));
}

/// supabase-js behind a TCP load balancer in front of two cluster edges,
/// the subscriber's edge killed with SIGKILL mid-stream (`tests/js/cluster`).
#[tokio::test]
async fn supabase_js_resumes_across_a_killed_edge() {
    let nats = fanout_tests::Nats::start().await.expect("nats-server starts");
    let env = [("FANOUT_TEST_NATS_URL", nats.url())];
    tokio::task::spawn_blocking(move || run_node_suite_with("cluster/", &env))
        .await
        .expect("suite ran");
    drop(nats);
}

#[test]
fn demo_page_in_headless_chromium() {
    run_node_suite("browser/");
}

/// realtime-js `postgres_changes` against standalone with its in-process
/// ingester on a private PostgreSQL (wal_level = logical).
#[tokio::test]
async fn realtime_js_postgres_changes_suite() {
    let pg = fanout_tests::Postgres::start().await.expect("PostgreSQL starts");
    pg.apply_workshop_schema().expect("workshop schema");
    let url = pg.url();
    tokio::task::spawn_blocking(move || run_node_suite_with("changes/", &[("FANOUT_TEST_DATABASE_URL", url)]))
        .await
        .expect("suite ran");
    drop(pg);
}

/// The same `postgres_changes` suite against a cluster: a `fanout edge` per
/// test file on a private NATS, fed by one `fanout cdc` process.
#[tokio::test]
async fn realtime_js_postgres_changes_suite_against_a_cluster() {
    let pg = fanout_tests::Postgres::start().await.expect("PostgreSQL starts");
    pg.apply_workshop_schema().expect("workshop schema");
    let nats = fanout_tests::Nats::start().await.expect("nats-server starts");
    // The membership set of changes/memberships.test.mjs: the ingester
    // mirrors it for the edges that use it (the others ignore it).
    let cdc = fanout_tests::Fanout::start_cdc(&nats, &pg, &["--auth-memberships", fanout_tests::WORKSHOP_MEMBERSHIPS])
        .await
        .expect("fanout cdc starts");
    let env = [
        ("FANOUT_TEST_DATABASE_URL", pg.url()),
        ("FANOUT_TEST_NATS_URL", nats.url()),
        ("FANOUT_TEST_CDC_ADMIN_PORT", cdc.admin_port.to_string()),
    ];
    tokio::task::spawn_blocking(move || run_node_suite_with("changes/", &env))
        .await
        .expect("suite ran");
    drop((cdc, nats, pg));
}
