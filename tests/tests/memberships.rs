//! Policies that follow a membership table, through the cluster: a private
//! PostgreSQL, a private `nats-server -js`, `fanout cdc` ingesters that
//! mirror `workshop_participants` into the NATS bucket, and two edges that
//! decide `member.workshops` rules from it. The ingester is killed with
//! SIGKILL between a membership change and the data change after it, and
//! a standby takes over between a revocation and the change after it: the
//! ordering contract (a change committed after the grant is delivered, one
//! committed after the revocation is not) holds across both.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use fanout_tests::{
    Fanout, Nats, Postgres, WORKSHOP_MEMBERSHIPS, WORKSHOP_ROUTES, WsClient, hs256_token, metric_value, v1,
};
use serde_json::{Value, json};

const T: Duration = Duration::from_secs(20);
const SECRET: &str = "memberships-test-secret-at-least-32-bytes";
const TABLES: &str = "{'public.workshop_activities' = {read = 'session_id in member.workshops'}}";
const CHANNELS: &str = "[{pattern = 'workshop:{id}', read = '{id} in member.workshops'}]";
const USER: &str = "0b9c7e0e-4f5a-4c9e-9d7e-1a2b3c4d5e6f";

async fn edge(nats: &Nats) -> Result<Fanout> {
    Fanout::start_edge(
        nats,
        &[
            "--postgres-changes",
            "true",
            "--cdc-routes",
            WORKSHOP_ROUTES,
            "--jwt-secret",
            SECRET,
            "--auth-memberships",
            WORKSHOP_MEMBERSHIPS,
            "--auth-tables",
            TABLES,
            "--auth-channels",
            CHANNELS,
        ],
    )
    .await
}

async fn cdc(nats: &Nats, pg: &Postgres) -> Result<Fanout> {
    Fanout::start_cdc(nats, pg, &["--auth-memberships", WORKSHOP_MEMBERSHIPS]).await
}

/// A client of `e` with a token holding only `sub`, joined to the public
/// channels of workshops 7 and 42 with their activity inserts.
async fn subscriber(e: &Fanout) -> Result<WsClient> {
    let token = hs256_token(SECRET, USER);
    let mut c = WsClient::connect(e.port, &e.ws_path("1.0.0", Some(&token))).await?;
    for (i, w) in [7, 42].into_iter().enumerate() {
        let r = i.to_string();
        let bindings = json!([{"event": "INSERT", "schema": "public", "table": "workshop_activities", "filter": format!("session_id=eq.{w}")}]);
        c.send_json(&v1(
            &format!("realtime:workshop:{w}"),
            "phx_join",
            json!({"config": {"postgres_changes": bindings}}),
            &r,
        ))
        .await?;
        let reply = c
            .recv_until(T, |v| v["event"] == "phx_reply" && v["ref"] == r.as_str())
            .await?;
        ensure!(reply["payload"]["status"] == "ok", "join of workshop {w}: {reply}");
    }
    Ok(c)
}

/// The `seq` of every activity insert that arrives until one with `last`
/// did (which must, within `T`).
async fn seqs_through(c: &mut WsClient, last: i64) -> Result<Vec<i64>> {
    let mut got = Vec::new();
    let deadline = Instant::now() + T;
    loop {
        let left = deadline
            .checked_duration_since(Instant::now())
            .with_context(|| format!("seq {last} did not arrive; got {got:?}"))?;
        let v = c
            .recv_until(left, |v| v["event"] == "postgres_changes")
            .await
            .with_context(|| format!("seq {last} did not arrive; got {got:?}"))?;
        let seq = v["payload"]["data"]["record"]["seq"].as_i64().unwrap_or(-1);
        got.push(seq);
        if seq == last {
            return Ok(got);
        }
    }
}

fn activity(pg: &Postgres, w: i64, seq: i64) -> Result<()> {
    pg.psql(&format!(
        "INSERT INTO workshop_activities (session_id, kind, seq) VALUES ({w}, 'note', {seq})"
    ))?;
    Ok(())
}

async fn wait_active(ingesters: &[&Fanout]) -> Result<usize> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        for (i, f) in ingesters.iter().enumerate() {
            if metric_value(&f.metrics().await?, "fanout_cdc_active") == 1.0 {
                return Ok(i);
            }
        }
        ensure!(Instant::now() < deadline, "no ingester became active");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grants_and_revocations_hold_across_a_killed_ingester_and_a_standby_takeover() -> Result<()> {
    let pg = Postgres::start().await?;
    pg.apply_workshop_schema()?;
    pg.psql("INSERT INTO workshop_sessions (id, title) VALUES (7, 'Seven'), (42, 'Forty-two')")?;
    pg.psql(&format!(
        "INSERT INTO workshop_participants (session_id, user_id, display_name) VALUES (7, '{USER}', 'Ada')"
    ))?;
    let nats = Nats::start().await?;
    let mut first = cdc(&nats, &pg).await?;
    wait_active(&[&first]).await?;
    let (e1, e2) = (edge(&nats).await?, edge(&nats).await?);
    let mut a = subscriber(&e1).await?;
    let mut b = subscriber(&e2).await?;

    // A member of 7 only: 42's row is withheld, 7's arrives.
    activity(&pg, 42, 1)?;
    activity(&pg, 7, 2)?;
    for c in [&mut a, &mut b] {
        ensure!(seqs_through(c, 2).await? == [2], "only workshop 7's row");
    }

    // The grant commits, the ingester dies, a row of 42 commits; the next
    // ingester loads the grant from its snapshot before streaming the row.
    pg.psql(&format!(
        "INSERT INTO workshop_participants (session_id, user_id, display_name) VALUES (42, '{USER}', 'Ada')"
    ))?;
    first.kill9();
    activity(&pg, 42, 3)?;
    let second = cdc(&nats, &pg).await?;
    for c in [&mut a, &mut b] {
        ensure!(seqs_through(c, 3).await? == [3], "the row committed after the grant");
    }
    // Now a member of 42: its private channel joins through the membership.
    let token = hs256_token(SECRET, USER);
    let mut p = WsClient::connect(e1.port, &e1.ws_path("1.0.0", Some(&token))).await?;
    p.send_json(&v1(
        "realtime:workshop:42",
        "phx_join",
        json!({"config": {"private": true}}),
        "p",
    ))
    .await?;
    let reply = p
        .recv_until(T, |v| v["event"] == "phx_reply" && v["ref"] == "p")
        .await?;
    ensure!(reply["payload"]["status"] == "ok", "private join: {reply}");

    // A standby waits beside the second ingester; the revocation commits,
    // the active ingester dies, a row of 42 and then one of 7 commit, and
    // the standby takes over.
    let standby = cdc(&nats, &pg).await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut ingesters = [second, standby];
    ensure!(
        wait_active(&[&ingesters[0], &ingesters[1]]).await? == 0,
        "the second streams"
    );
    pg.psql(&format!(
        "DELETE FROM workshop_participants WHERE session_id = 42 AND user_id = '{USER}'"
    ))?;
    ingesters[0].kill9();
    activity(&pg, 42, 4)?;
    activity(&pg, 7, 5)?;
    ensure!(wait_active(&[&ingesters[1]]).await? == 0, "the standby took over");
    for c in [&mut a, &mut b] {
        let got = seqs_through(c, 5).await?;
        ensure!(
            got == [5],
            "the row committed after the revocation was delivered: {got:?}"
        );
        ensure!(
            c.nothing_within(Duration::from_millis(500), |v| v["event"] == "postgres_changes")
                .await,
            "nothing after workshop 7's row"
        );
    }
    // The private channel the membership granted ends with a system error.
    let system: Value = p.recv_until(T, |v| v["event"] == "system").await?;
    ensure!(
        system["payload"]["status"] == "error"
            && system["payload"]["message"]
                .as_str()
                .is_some_and(|m| m.contains("access revoked")),
        "{system}"
    );
    let close = p.recv_until(T, |v| v["event"] == "phx_close").await?;
    ensure!(close["topic"] == "realtime:workshop:42", "{close}");

    // The mirror's size and revision are metrics on every edge.
    for e in [&e1, &e2] {
        let m = e.metrics().await?;
        ensure!(metric_value(&m, "fanout_members_rows") == 1.0, "one row left (7)");
        ensure!(metric_value(&m, "fanout_members_revision") > 0.0);
    }
    Ok(())
}

/// A membership table the ingester cannot follow stops `fanout cdc` with
/// the problem and the SQL that fixes it: not in the publication, or a
/// REPLICA IDENTITY that leaves the user and value out of a deleted row.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn membership_tables_the_ingester_cannot_follow_are_explained() -> Result<()> {
    let nats = Nats::start().await?;
    let pg = Postgres::start().await?;
    pg.apply_workshop_schema()?;
    let (nats_url, db) = (nats.url(), pg.url());
    let run = |memberships: &'static str| {
        let (nats_url, db) = (nats_url.clone(), db.clone());
        async move { fanout_tests::run_cdc_to_exit(&nats_url, &db, &["--auth-memberships", memberships]).await }
    };
    // The primary key (id) does not cover user_id and session_id.
    pg.psql("ALTER TABLE workshop_participants REPLICA IDENTITY DEFAULT")?;
    let (code, err) = run(WORKSHOP_MEMBERSHIPS).await?;
    ensure!(code == Some(1), "exit {code:?}: {err}");
    ensure!(
        err.contains("REPLICA IDENTITY does not include user_id and session_id")
            && err.contains("ALTER TABLE \"public\".\"workshop_participants\" REPLICA IDENTITY FULL"),
        "{err}"
    );
    // A table outside the publication.
    pg.psql("CREATE TABLE team_members (team_id bigint, user_id uuid, PRIMARY KEY (team_id, user_id))")?;
    let (code, err) = run("{teams = {table = 'public.team_members', user = 'user_id', value = 'team_id'}}").await?;
    ensure!(code == Some(1), "exit {code:?}: {err}");
    ensure!(
        err.contains("is not in publication") && err.contains("ALTER PUBLICATION \"fanout\" ADD TABLE"),
        "{err}"
    );
    // Once published, its primary key (team_id, user_id) covers both
    // columns: no REPLICA IDENTITY FULL needed, and the ingester streams.
    pg.psql("ALTER PUBLICATION fanout ADD TABLE team_members")?;
    let cdc = Fanout::start_cdc(
        &nats,
        &pg,
        &[
            "--auth-memberships",
            "{teams = {table = 'public.team_members', user = 'user_id', value = 'team_id'}}",
        ],
    )
    .await?;
    wait_active(&[&cdc]).await?;
    Ok(())
}
