//! The change stream: a private PostgreSQL (wal_level = logical), a private
//! `nats-server -js`, `fanout cdc` ingesters and `fanout edge` processes,
//! driven by raw WebSocket clients. The realtime-js view of the same
//! features is in `tests/js/changes/`.

use std::collections::BTreeMap;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use fanout_tests::{Fanout, Nats, Postgres, WORKSHOP_ROUTES, WsClient, metric_value, v1};
use serde_json::{Value, json};

const T: Duration = Duration::from_secs(20);

async fn edge(nats: &Nats) -> Result<Fanout> {
    Fanout::start_edge(nats, &["--postgres-changes", "true", "--cdc-routes", WORKSHOP_ROUTES]).await
}

/// Joins `topic` with `bindings`; returns the reply.
async fn join_changes(c: &mut WsClient, topic: &str, bindings: Value) -> Result<Value> {
    c.send_json(&v1(
        topic,
        "phx_join",
        json!({"config": {"postgres_changes": bindings}}),
        "1",
    ))
    .await?;
    c.recv_until(T, |v| v["event"] == "phx_reply" && v["ref"] == "1").await
}

/// Reads `postgres_changes` events until `n` arrived.
async fn collect(c: &mut WsClient, n: usize, timeout: Duration) -> Result<Vec<Value>> {
    let mut got = Vec::with_capacity(n);
    let deadline = Instant::now() + timeout;
    while got.len() < n {
        let left = deadline
            .checked_duration_since(Instant::now())
            .with_context(|| format!("only {} of {n} changes arrived", got.len()))?;
        match c.recv_until(left, |v| v["event"] == "postgres_changes").await {
            Ok(v) => got.push(v),
            Err(e) => return Err(e.context(format!("only {} of {n} changes arrived", got.len()))),
        }
    }
    Ok(got)
}

/// The `seq` column of each change's new record.
fn seqs(changes: &[Value]) -> Vec<i64> {
    changes
        .iter()
        .map(|v| v["payload"]["data"]["record"]["seq"].as_i64().unwrap_or(-1))
        .collect()
}

/// Inserts activities `from..to` (seq column) in transactions of `per_tx`.
fn insert_activities(pg: &Postgres, session: i64, from: i64, to: i64, per_tx: i64) -> Result<()> {
    let mut a = from;
    while a < to {
        let b = (a + per_tx).min(to);
        pg.psql(&format!(
            "INSERT INTO workshop_activities (session_id, kind, seq, body) \
             SELECT {session}, 'note', g, jsonb_build_object('n', g) FROM generate_series({a}, {b} - 1) g"
        ))?;
        a = b;
    }
    Ok(())
}

fn new_session(pg: &Postgres, id: i64) -> Result<()> {
    pg.psql(&format!(
        "INSERT INTO workshop_sessions (id, title) VALUES ({id}, 'Workshop {id}')"
    ))?;
    Ok(())
}

/// A private PostgreSQL with the workshop schema and workshop `session`,
/// NATS, one ingester, one edge, and a client joined to the workshop's new
/// activities.
struct Workshop {
    pg: Postgres,
    nats: Nats,
    cdc: Fanout,
    edge: Fanout,
    client: WsClient,
}

async fn workshop_streaming(session: i64) -> Result<Workshop> {
    let pg = Postgres::start().await?;
    pg.apply_workshop_schema()?;
    new_session(&pg, session)?;
    let nats = Nats::start().await?;
    let cdc = Fanout::start_cdc(&nats, &pg, &[]).await?;
    let edge = edge(&nats).await?;
    let mut client = WsClient::connect(edge.port, &edge.ws_path("1.0.0", None)).await?;
    let reply = join_changes(
        &mut client,
        &format!("realtime:workshop:{session}"),
        json!([{"event": "INSERT", "schema": "public", "table": "workshop_activities", "filter": format!("session_id=eq.{session}")}]),
    )
    .await?;
    ensure!(reply["payload"]["status"] == "ok", "{reply}");
    Ok(Workshop {
        pg,
        nats,
        cdc,
        edge,
        client,
    })
}

/// Changes flow from Postgres through `fanout cdc` and NATS to an edge, in
/// the Supabase shape, with the binding's id; filters on other columns are
/// applied at the edge; a row of another workshop never reaches the client.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_reach_clients_through_the_cluster() -> Result<()> {
    let pg = Postgres::start().await?;
    pg.apply_workshop_schema()?;
    new_session(&pg, 1)?;
    new_session(&pg, 2)?;
    let nats = Nats::start().await?;
    let _cdc = Fanout::start_cdc(&nats, &pg, &[]).await?;
    let e = edge(&nats).await?;
    let mut c = WsClient::connect(e.port, &e.ws_path("1.0.0", None)).await?;
    let bindings = json!([
        {"event": "*", "schema": "public", "table": "workshop_activities", "filter": "session_id=eq.1"},
        {"event": "UPDATE", "schema": "public", "table": "workshop_sessions", "filter": "id=eq.1"},
    ]);
    let reply = join_changes(&mut c, "realtime:workshop:1", bindings.clone()).await?;
    ensure!(reply["payload"]["status"] == "ok", "join refused: {reply}");
    let answered = &reply["payload"]["response"]["postgres_changes"];
    for i in 0..2 {
        for k in ["event", "schema", "table", "filter"] {
            ensure!(answered[i][k] == bindings[i][k], "binding {i} echoed: {answered}");
        }
    }
    let (activity_id, session_id) = (answered[0]["id"].clone(), answered[1]["id"].clone());
    let system = c.recv_until(T, |v| v["event"] == "system").await?;
    ensure!(system["payload"]["message"] == "Subscribed to PostgreSQL", "{system}");

    pg.psql("INSERT INTO workshop_activities (session_id, kind, seq) VALUES (2, 'other workshop', 0)")?;
    pg.psql(
        "INSERT INTO workshop_activities (session_id, kind, seq, body) VALUES (1, 'chat', 1, '{\"text\":\"hi\"}')",
    )?;
    pg.psql("UPDATE workshop_sessions SET stage = 'ideate' WHERE id = 2")?;
    pg.psql("UPDATE workshop_sessions SET stage = 'ideate' WHERE id = 1")?;
    pg.psql("DELETE FROM workshop_activities WHERE seq = 1")?;
    let got = collect(&mut c, 3, T).await?;
    // Commit order holds per channel; the session row travels on another
    // channel (db:public.workshop_sessions) than the activities
    // (workshop:1), so look the events up by type.
    let of_type = |t: &str| {
        got.iter()
            .map(|v| &v["payload"])
            .find(|p| p["data"]["type"] == t)
            .with_context(|| format!("no {t} among {got:?}"))
    };
    let insert = of_type("INSERT")?;
    ensure!(insert["ids"] == json!([activity_id]), "{insert}");
    let data = &insert["data"];
    ensure!(
        data["type"] == "INSERT" && data["table"] == "workshop_activities",
        "{data}"
    );
    ensure!(
        data["record"]["session_id"] == 1 && data["record"]["seq"] == 1,
        "ints are numbers: {data}"
    );
    ensure!(
        data["record"]["body"] == json!({"text": "hi"}),
        "jsonb is an object: {data}"
    );
    ensure!(
        data["record"]["created_at"].as_str().is_some_and(|s| s.contains('T')),
        "timestamps are ISO strings: {data}"
    );
    ensure!(
        data["commit_timestamp"].as_str().is_some_and(|s| s.ends_with('Z')),
        "{data}"
    );
    ensure!(
        data["columns"]
            .as_array()
            .is_some_and(|c| c.iter().any(|c| c["name"] == "body" && c["type"] == "jsonb")),
        "{data}"
    );
    ensure!(insert["meta"]["id"].as_str().is_some(), "position in meta.id: {insert}");
    let update = of_type("UPDATE")?;
    ensure!(update["ids"] == json!([session_id]), "{update}");
    ensure!(update["data"]["record"]["stage"] == "ideate", "{update}");
    ensure!(
        update["data"]["old_record"]["stage"] == "lobby",
        "replica identity full: {update}"
    );
    let delete = of_type("DELETE")?;
    ensure!(delete["data"]["type"] == "DELETE", "{delete}");
    ensure!(delete["data"]["old_record"]["kind"] == "chat", "{delete}");
    // Nothing else: the other workshop's row and session never came.
    ensure!(
        c.nothing_within(Duration::from_millis(500), |v| v["event"] == "postgres_changes")
            .await,
        "an unmatched change was delivered"
    );
    Ok(())
}

/// kill -9 the ingester while 10,000 rows are being written, start it
/// again: every row reaches the client exactly once, in commit order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_ingester_resumes_without_loss_or_duplicates() -> Result<()> {
    let Workshop {
        pg,
        nats,
        mut cdc,
        edge: _edge,
        client: mut c,
    } = workshop_streaming(7).await?;

    let n = 10_000;
    let reader = tokio::spawn(async move { collect(&mut c, n, Duration::from_secs(90)).await.map(|v| (v, c)) });
    // The writer commits 200 transactions of 50 rows in the background;
    // the ingester is killed while it streams them and restarted a moment
    // later, with the writer still going.
    let writer = {
        let url = pg.url();
        std::thread::spawn(move || {
            let out = Command::new("psql")
                .args(["-X", "-q", "-v", "ON_ERROR_STOP=1", "-d", &url, "-c"])
                .arg(format!(
                    "DO $$ BEGIN FOR t IN 0..{} LOOP \
                       INSERT INTO workshop_activities (session_id, kind, seq) \
                       SELECT 7, 'note', g FROM generate_series(t * 50, t * 50 + 49) g; \
                       COMMIT; PERFORM pg_sleep(0.01); END LOOP; END $$",
                    n / 50 - 1
                ))
                .output();
            out.map(|o| o.status.success())
        })
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while metric_value(&cdc.metrics().await?, "fanout_cdc_changes_published_total") < 2_000.0 {
        ensure!(Instant::now() < deadline, "the ingester published nothing");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    cdc.kill9();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let _cdc2 = Fanout::start_cdc(&nats, &pg, &[]).await?;
    ensure!(writer.join().expect("writer thread")?, "the writer's inserts failed");
    let (got, mut c) = reader.await??;
    ensure!(
        seqs(&got) == (0..n as i64).collect::<Vec<_>>(),
        "all rows once, in commit order"
    );
    ensure!(
        c.nothing_within(Duration::from_secs(2), |v| v["event"] == "postgres_changes")
            .await,
        "a duplicate arrived after the 10,000 rows"
    );
    Ok(())
}

/// PostgreSQL restarted with `pg_ctl restart -m fast` while the ingester
/// streams, after the WAL moved past the last published commit (writes to a
/// table outside the publication, which send the ingester nothing): the
/// shutdown does not wait for the ingester, and the ingester reconnects and
/// goes on with no change lost or repeated. A fast shutdown waits until every
/// walsender's client confirms the WAL it was sent; an ingester that confirmed
/// only its commits held it until `wal_sender_timeout` (60 s). It now
/// confirms the position of the server's heartbeats when it is idle.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_fast_restart_does_not_wait_for_the_ingester() -> Result<()> {
    let Workshop {
        pg,
        nats: _nats,
        cdc: _cdc,
        edge: _edge,
        client: mut c,
    } = workshop_streaming(5).await?;
    insert_activities(&pg, 5, 0, 10, 5)?;
    ensure!(seqs(&collect(&mut c, 10, T).await?) == (0..10).collect::<Vec<_>>());
    pg.psql("CREATE TABLE not_published (n int); INSERT INTO not_published SELECT generate_series(1, 1000)")?;
    // The walsender sends its idle heartbeat once it has decoded those
    // writes; give the ingester's confirmation (sent within its 500 ms
    // status interval) time to arrive.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let started = Instant::now();
    pg.restart_within(20)
        .context("the fast shutdown waited for the ingester")?;
    println!("fast restart took {:?}", started.elapsed());
    insert_activities(&pg, 5, 10, 20, 5)?;
    ensure!(
        seqs(&collect(&mut c, 10, Duration::from_secs(30)).await?) == (10..20).collect::<Vec<_>>(),
        "the changes after the restart arrive once, in order"
    );
    ensure!(
        c.nothing_within(Duration::from_secs(2), |v| v["event"] == "postgres_changes")
            .await,
        "a change arrived twice after the restart"
    );
    Ok(())
}

/// Two ingesters on one slot: one streams, the other stands by and takes
/// over when the first is killed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn standby_ingester_takes_over() -> Result<()> {
    let pg = Postgres::start().await?;
    pg.apply_workshop_schema()?;
    new_session(&pg, 3)?;
    let nats = Nats::start().await?;
    let first = Fanout::start_cdc(&nats, &pg, &[]).await?;
    // Let the first take the slot before the second starts.
    wait_active(&[&first], Duration::from_secs(15)).await?;
    let second = Fanout::start_cdc(&nats, &pg, &[]).await?;
    let mut ingesters = [first, second];
    let e = edge(&nats).await?;
    let mut c = WsClient::connect(e.port, &e.ws_path("1.0.0", None)).await?;
    join_changes(
        &mut c,
        "realtime:workshop:3",
        json!([{"event": "INSERT", "schema": "public", "table": "workshop_activities", "filter": "session_id=eq.3"}]),
    )
    .await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let active = active_flags(&ingesters).await?;
    ensure!(active == [true, false], "exactly the first streams: {active:?}");
    insert_activities(&pg, 3, 0, 10, 10)?;
    ensure!(seqs(&collect(&mut c, 10, T).await?) == (0..10).collect::<Vec<_>>());

    ingesters[0].kill9();
    let started = Instant::now();
    wait_active(&[&ingesters[1]], Duration::from_secs(30)).await?;
    let took = started.elapsed();
    insert_activities(&pg, 3, 10, 20, 10)?;
    ensure!(seqs(&collect(&mut c, 10, T).await?) == (10..20).collect::<Vec<_>>());
    println!("standby took over {took:?} after kill -9");
    Ok(())
}

async fn active_flags(ingesters: &[Fanout]) -> Result<Vec<bool>> {
    let mut out = Vec::new();
    for i in ingesters {
        out.push(metric_value(&i.metrics().await?, "fanout_cdc_active") == 1.0);
    }
    Ok(out)
}

async fn wait_active(ingesters: &[&Fanout], timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        for i in ingesters {
            if metric_value(&i.metrics().await?, "fanout_cdc_active") == 1.0 {
                return Ok(());
            }
        }
        ensure!(
            Instant::now() < deadline,
            "no ingester became active within {timeout:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A server not set up for logical replication, or a missing publication,
/// stops `fanout cdc` with the problem and the SQL that fixes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn setup_problems_are_explained() -> Result<()> {
    let nats = Nats::start().await?;
    let nats_url = nats.url();
    let run = |db: String| {
        let nats_url = nats_url.clone();
        async move { fanout_tests::run_cdc_to_exit(&nats_url, &db, &[]).await }
    };
    let replica = Postgres::start_with("replica").await?;
    let (code, err) = run(replica.url()).await?;
    ensure!(code == Some(1), "exit {code:?}: {err}");
    ensure!(
        err.contains("wal_level") && err.contains("ALTER SYSTEM SET wal_level = logical"),
        "{err}"
    );
    drop(replica);

    let logical = Postgres::start().await?;
    let (code, err) = run(logical.url()).await?;
    ensure!(code == Some(1), "exit {code:?}: {err}");
    ensure!(
        err.contains("publication \"fanout\" does not exist") && err.contains("CREATE PUBLICATION"),
        "{err}"
    );

    // A role without the REPLICATION attribute.
    logical.apply_workshop_schema()?;
    logical.psql("CREATE ROLE reader LOGIN")?;
    let (code, err) = run(format!("postgres://reader@127.0.0.1:{}/postgres", logical.port)).await?;
    ensure!(code == Some(1), "exit {code:?}: {err}");
    ensure!(err.contains("ALTER ROLE <user> WITH REPLICATION"), "{err}");
    Ok(())
}

/// Bad bindings get a join error that says what is wrong; an edge without
/// a change stream says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_bindings_are_refused_with_reasons() -> Result<()> {
    let with = Fanout::start(&["--postgres-changes", "true", "--cdc-routes", WORKSHOP_ROUTES], &[]).await?;
    let without = Fanout::start(&[], &[]).await?;
    let cases = BTreeMap::from([
        (
            "bad filter",
            (
                json!([{"event": "*", "schema": "public", "table": "t", "filter": "id=like.1"}]),
                "filter",
            ),
        ),
        (
            "no table",
            (json!([{"event": "*", "schema": "public"}]), "table is required"),
        ),
        (
            "bad event",
            (
                json!([{"event": "TRUNCATE", "schema": "public", "table": "t"}]),
                "event must be",
            ),
        ),
        (
            "routed table without its column",
            (
                json!([{"event": "*", "schema": "public", "table": "workshop_activities", "filter": "kind=eq.chat"}]),
                "session_id=eq.",
            ),
        ),
        ("not a binding", (json!(["nope"]), "postgres_changes[0]")),
    ]);
    for (name, (bindings, needle)) in cases {
        let mut c = WsClient::connect(with.port, &with.ws_path("1.0.0", None)).await?;
        let reply = join_changes(&mut c, "realtime:room", bindings).await?;
        ensure!(reply["payload"]["status"] == "error", "{name}: {reply}");
        let reason = reply["payload"]["response"]["reason"].as_str().unwrap_or_default();
        ensure!(reason.contains(needle), "{name}: reason {reason:?} lacks {needle:?}");
    }
    let mut c = WsClient::connect(without.port, &without.ws_path("1.0.0", None)).await?;
    let reply = join_changes(
        &mut c,
        "realtime:room",
        json!([{"event": "*", "schema": "public", "table": "t"}]),
    )
    .await?;
    ensure!(reply["payload"]["status"] == "error", "{reply}");
    ensure!(
        reply["payload"]["response"]["reason"]
            .as_str()
            .is_some_and(|r| r.contains("no database change stream")),
        "{reply}"
    );
    Ok(())
}
