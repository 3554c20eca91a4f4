//! Cluster presence: two edges sharing presence through a private Redis,
//! two `fanout presence` sweepers, and a private NATS.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::Result;
use fanout_proto::v1::presence_client::PresenceClient;
use fanout_proto::v1::{CountOnlineRequest, GetPresencesRequest, ListChannelsRequest};
use fanout_tests::{Fanout, Nats, Redis, WsClient, join_v1, v1};
use serde_json::{Value, json};

const T: Duration = Duration::from_secs(10);

/// A client's view of a channel's presence: key → number of metas.
#[derive(Default, Debug)]
struct View {
    keys: BTreeMap<String, usize>,
    leaves: usize,
}

impl View {
    fn apply(&mut self, v: &Value) {
        match v["event"].as_str() {
            Some("presence_state") => {
                self.keys.clear();
                for (k, p) in v["payload"].as_object().into_iter().flatten() {
                    self.keys.insert(k.clone(), p["metas"].as_array().map_or(0, Vec::len));
                }
            }
            Some("presence_diff") => {
                for (k, p) in v["payload"]["joins"].as_object().into_iter().flatten() {
                    *self.keys.entry(k.clone()).or_default() += p["metas"].as_array().map_or(0, Vec::len);
                }
                for (k, p) in v["payload"]["leaves"].as_object().into_iter().flatten() {
                    let n = p["metas"].as_array().map_or(0, Vec::len);
                    self.leaves += n;
                    if let Some(c) = self.keys.get_mut(k) {
                        *c = c.saturating_sub(n);
                        if *c == 0 {
                            self.keys.remove(k);
                        }
                    }
                }
            }
            _ => {}
        }
    }
}

/// Reads `c` until `done(view)` holds or `limit` passes; returns the time taken.
async fn watch(c: &mut WsClient, view: &mut View, limit: Duration, done: impl Fn(&View) -> bool) -> Result<Duration> {
    let start = Instant::now();
    while !done(view) {
        let left = limit
            .checked_sub(start.elapsed())
            .ok_or_else(|| anyhow::anyhow!("timed out; view {view:?}"))?;
        let v = c
            .recv_json(left)
            .await
            .map_err(|e| anyhow::anyhow!("{e}; view {view:?}"))?;
        view.apply(&v);
    }
    Ok(start.elapsed())
}

async fn tracked_client(edge: &Fanout, topic: &str, key: &str) -> Result<WsClient> {
    let mut c = WsClient::connect(edge.port, &edge.ws_path("1.0.0", None)).await?;
    join_v1(&mut c, topic, json!({"presence": {"key": key}}), "1").await?;
    c.send_json(&v1(
        topic,
        "presence",
        json!({"type": "presence", "event": "track", "payload": {"name": key}}),
        "2",
    ))
    .await?;
    c.recv_until(T, |v| v["event"] == "phx_reply" && v["ref"] == "2")
        .await?;
    Ok(c)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_is_shared_and_crashed_edges_users_expire_once() -> Result<()> {
    let nats = Nats::start().await?;
    let redis = Redis::start().await?;
    let presence_args = [
        "--redis-url",
        &redis.url(),
        "--presence-heartbeat-secs",
        "1",
        "--presence-ttl-secs",
        "3",
    ];
    let mut edge_a = Fanout::start_edge(&nats, &[&presence_args[..], &["--joins-per-second", "0"]].concat()).await?;
    let edge_b = Fanout::start_edge(&nats, &presence_args).await?;
    // Two sweepers: each crashed user must still leave exactly once.
    let sweeper1 = Fanout::start_presence(&nats, &redis, &["--presence-sweep-secs", "1"]).await?;
    let _sweeper2 = Fanout::start_presence(&nats, &redis, &["--presence-sweep-secs", "1"]).await?;
    let topic = "realtime:workshop:presence";

    // An observer on edge B, tracked itself.
    let mut observer = WsClient::connect(edge_b.port, &edge_b.ws_path("1.0.0", None)).await?;
    join_v1(&mut observer, topic, json!({"presence": {"key": "observer"}}), "1").await?;
    observer
        .send_json(&v1(
            topic,
            "presence",
            json!({"type": "presence", "event": "track", "payload": {"name": "observer"}}),
            "2",
        ))
        .await?;
    let mut view = View::default();

    // Users on edge A appear on edge B, with their metas.
    let mut users = Vec::new();
    for i in 0..202 {
        users.push(tracked_client(&edge_a, topic, &format!("user-{i}")).await?);
    }
    watch(&mut observer, &mut view, T, |v| v.keys.len() == 203).await?;

    // The gRPC API answers what the clients see.
    let mut grpc = PresenceClient::connect(format!("http://127.0.0.1:{}", sweeper1.port)).await?;
    let got = grpc
        .get_presences(GetPresencesRequest {
            channel: "workshop:presence".into(),
        })
        .await?
        .into_inner();
    assert_eq!(got.presences.len(), 203);
    let u7 = got.presences.iter().find(|p| p.key == "user-7").expect("user-7 listed");
    assert_eq!(serde_json::from_str::<Value>(&u7.meta_json)?, json!({"name": "user-7"}));
    let counts = grpc
        .count_online(CountOnlineRequest {
            channels: vec!["workshop:presence".into(), "realtime:nobody-here".into()],
        })
        .await?
        .into_inner()
        .counts;
    assert_eq!(
        (counts[0].presences, counts[0].keys, counts[1].presences),
        (203, 203, 0)
    );
    let busiest = grpc
        .list_channels(ListChannelsRequest { limit: 5 })
        .await?
        .into_inner()
        .channels;
    assert_eq!(busiest[0].channel, "workshop:presence");
    assert_eq!(busiest[0].presences, 203);
    let bad = grpc.get_presences(GetPresencesRequest { channel: String::new() }).await;
    assert_eq!(bad.unwrap_err().code(), tonic::Code::InvalidArgument);

    // A late joiner on edge B gets the merged state from Redis.
    let mut late = WsClient::connect(edge_b.port, &edge_b.ws_path("1.0.0", None)).await?;
    join_v1(&mut late, topic, json!({"presence": {"key": "late"}}), "1").await?;
    let state = late.recv_until(T, |v| v["event"] == "presence_state").await?;
    assert_eq!(
        state["payload"].as_object().unwrap().len(),
        203,
        "state from Redis: {state}"
    );
    assert_eq!(state["payload"]["user-7"]["metas"][0]["name"], "user-7");
    drop(late);

    // Untrack and socket close propagate across edges within a second.
    let mut u0 = users.remove(0);
    u0.send_json(&v1(
        topic,
        "presence",
        json!({"type": "presence", "event": "untrack"}),
        "3",
    ))
    .await?;
    let took = watch(&mut observer, &mut view, T, |v| !v.keys.contains_key("user-0")).await?;
    assert!(took < Duration::from_secs(1), "untrack took {took:?}");
    drop(users.remove(0));
    let took = watch(&mut observer, &mut view, T, |v| !v.keys.contains_key("user-1")).await?;
    assert!(took < Duration::from_secs(1), "close took {took:?}");

    // Edge A dies with 200 tracked users: they all leave within TTL plus a
    // sweep (3 s + 1 s, with slack), each once, and nobody else does.
    let leaves_before = view.leaves;
    edge_a.kill9();
    let took = watch(&mut observer, &mut view, Duration::from_secs(15), |v| v.keys.len() == 1).await?;
    assert!(took < Duration::from_secs(6), "ghosts removed after {took:?}");
    assert_eq!(view.keys.keys().collect::<Vec<_>>(), vec!["observer"]);
    // Anything late (a second sweeper's duplicate) would show up here.
    let extra = observer
        .recv_until(Duration::from_secs(3), |v| v["event"] == "presence_diff")
        .await;
    if let Ok(v) = &extra {
        view.apply(v);
    }
    assert_eq!(view.leaves - leaves_before, 200, "each crashed user left exactly once");
    let after = grpc
        .count_online(CountOnlineRequest {
            channels: vec!["workshop:presence".into()],
        })
        .await?
        .into_inner();
    assert_eq!(after.counts[0].presences, 1, "gRPC agrees after the crash");
    drop(users);
    Ok(())
}

/// Redis goes away: broadcasts go on, a joiner is told presence is degraded,
/// errors are counted. Redis comes back empty: each edge re-writes its live
/// presences, so a new joiner sees them again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_outage_degrades_presence_only_and_recovers() -> Result<()> {
    let nats = Nats::start().await?;
    let mut redis = Redis::start().await?;
    let edge = Fanout::start_edge(
        &nats,
        &[
            "--redis-url",
            &redis.url(),
            "--presence-heartbeat-secs",
            "1",
            "--presence-ttl-secs",
            "3",
        ],
    )
    .await?;
    let topic = "realtime:workshop:redis-outage";
    let mut alice = tracked_client(&edge, topic, "alice").await?;

    redis.kill();
    // Broadcasts still flow.
    alice
        .send_json(&v1(
            topic,
            "broadcast",
            json!({"type": "broadcast", "event": "e", "payload": {"n": 1}}),
            "9",
        ))
        .await?;
    let mut bob = WsClient::connect(edge.port, &edge.ws_path("1.0.0", None)).await?;
    join_v1(&mut bob, topic, json!({"presence": {"key": "bob"}}), "1").await?;
    let system = bob.recv_until(T, |v| v["event"] == "system").await?;
    assert_eq!(system["payload"]["status"], "error", "{system}");
    assert!(
        system["payload"]["message"]
            .as_str()
            .unwrap()
            .contains("presence is degraded"),
        "{system}"
    );
    alice
        .send_json(&v1(
            topic,
            "broadcast",
            json!({"type": "broadcast", "event": "e", "payload": {"n": 2}}),
            "10",
        ))
        .await?;
    // (n = 1 may or may not reach bob: it was in flight when he joined.)
    let got = bob
        .recv_until(T, |v| v["event"] == "broadcast" && v["payload"]["payload"]["n"] == 2)
        .await;
    assert!(got.is_ok(), "broadcasts go on without Redis: {got:?}");
    let m = edge.metrics().await?;
    assert!(
        fanout_tests::metric_value(&m, "fanout_presence_store_errors_total") >= 1.0,
        "{m}"
    );

    // Redis returns empty; the next heartbeats re-write alice.
    redis.restart().await?;
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let mut carol = WsClient::connect(edge.port, &edge.ws_path("1.0.0", None)).await?;
        join_v1(&mut carol, topic, json!({"presence": {"key": "carol"}}), "1").await?;
        let first = carol
            .recv_until(T, |v| v["event"] == "presence_state" || v["event"] == "system")
            .await?;
        if first["event"] == "presence_state" && first["payload"]["alice"]["metas"][0]["name"] == "alice" {
            break;
        }
        assert!(Instant::now() < deadline, "alice never re-written: {first}");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    Ok(())
}
