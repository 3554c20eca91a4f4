//! Room clients (`/rooms/<room>`) across two cluster edges sharing presence
//! through a private Redis, with a `fanout presence` sweeper: a user on one
//! edge is in the other edge's welcome, two tabs of one user leave once,
//! and the users of an edge killed with SIGKILL leave within the presence
//! bound (TTL plus a sweep), as Supabase presence users do. (The protocol
//! itself is `tests/js/protocol/rooms.test.mjs`.)

use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use fanout_tests::{Fanout, Nats, Redis, WsClient};
use serde_json::{Value, json};

const T: Duration = Duration::from_secs(10);

async fn tab(edge: &Fanout, room: &str, user: &str, session: &str) -> Result<WsClient> {
    WsClient::connect(edge.port, &format!("/rooms/{room}?user={user}&sessionId={session}")).await
}

fn ids(welcome: &Value) -> Vec<String> {
    welcome["users"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|u| u["id"].as_str().map(str::to_owned))
        .collect()
}

async fn welcome(c: &mut WsClient) -> Result<Vec<String>> {
    let w = c.recv_until(T, |v| v["type"] == "welcome").await?;
    Ok(ids(&w))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crashed_edges_room_users_leave_once_within_the_presence_bound() -> Result<()> {
    let nats = Nats::start().await?;
    let redis = Redis::start().await?;
    let (heartbeat, ttl, sweep) = (1, 3, 1);
    let presence_args = [
        "--redis-url",
        &redis.url(),
        "--presence-heartbeat-secs",
        &heartbeat.to_string(),
        "--presence-ttl-secs",
        &ttl.to_string(),
    ];
    let mut doomed = Fanout::start_edge(&nats, &presence_args).await?;
    let survivor = Fanout::start_edge(&nats, &presence_args).await?;
    let _sweeper = Fanout::start_presence(&nats, &redis, &["--presence-sweep-secs", &sweep.to_string()]).await?;
    let room = "review:crash";

    // Ann with two tabs on the doomed edge, Bob on the other.
    let mut ann1 = tab(&doomed, room, "ann", "ann-1").await?;
    assert_eq!(welcome(&mut ann1).await?, ["ann"]);
    let mut ann2 = tab(&doomed, room, "ann", "ann-2").await?;
    assert_eq!(welcome(&mut ann2).await?, ["ann"]);
    let mut bob = tab(&survivor, room, "bob", "bob-1").await?;
    assert_eq!(
        welcome(&mut bob).await?,
        ["ann", "bob"],
        "ann, from the other edge's presence"
    );
    ann1.recv_until(T, |v| v["type"] == "join" && v["user"]["id"] == "bob")
        .await?;

    // The doomed edge dies without untracking anyone.
    doomed.kill9();
    let killed = Instant::now();
    let leave = bob
        .recv_until(Duration::from_secs(ttl + sweep + 6), |v| v["type"] == "leave")
        .await?;
    let took = killed.elapsed();
    assert_eq!(leave, json!({"type": "leave", "user": {"id": "ann"}}));
    assert!(
        took <= Duration::from_secs(ttl + sweep + 2),
        "ann left {took:?} after the crash; the bound is ttl {ttl} s + sweep {sweep} s"
    );
    // Her two tabs were one user: no second leave.
    match bob.recv_json(Duration::from_millis(1500)).await {
        Err(_) => {}
        Ok(v) if v["type"] == "leave" => bail!("a second leave for one user: {v}"),
        Ok(_) => {}
    }
    // A new tab on the survivor sees only bob.
    let mut bob2 = tab(&survivor, room, "bob", "bob-2").await?;
    assert_eq!(welcome(&mut bob2).await?, ["bob"]);
    Ok(())
}
