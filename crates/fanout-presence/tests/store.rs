//! `RedisPresence` against a real `redis-server` started on a free port: the
//! diff bytes clients get (an event's payload is the diff's JSON text) and
//! the values other edges and the sweepers read, pinned byte for byte.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fanout_bus::PresenceStore;
use fanout_core::{ChannelName, Origin};
use fanout_presence::{RedisPresence, Timing};
use redis::aio::ConnectionManager;
use serde_json::{Map, Value, json};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// A private `redis-server`, killed on drop.
struct RedisServer {
    child: Child,
    port: u16,
}

impl RedisServer {
    async fn start() -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawning redis-server (tests/run.sh installs it)");
        let server = Self { child, port };
        let deadline = Instant::now() + Duration::from_secs(10);
        while tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_err() {
            assert!(Instant::now() < deadline, "redis-server did not listen on {port}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        server
    }

    async fn connect(&self) -> ConnectionManager {
        fanout_presence::connect(&format!("redis://127.0.0.1:{}", self.port))
            .await
            .unwrap()
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn meta(v: Value) -> Map<String, Value> {
    v.as_object().unwrap().clone()
}

/// The stored value of `conn`'s presence in `channel`, as another edge reads it.
async fn stored(redis: &mut ConnectionManager, channel: &str, conn: Origin) -> Option<String> {
    redis::cmd("HGET")
        .arg(format!("fanout:p:{channel}"))
        .arg(format!("{:016x}:{:016x}", conn.node, conn.connection))
        .query_async(redis)
        .await
        .unwrap()
}

/// Whether node `0xabc`'s liveness key exists.
async fn alive(redis: &mut ConnectionManager) -> bool {
    redis::cmd("EXISTS")
        .arg("fanout:alive:0000000000000abc")
        .query_async(redis)
        .await
        .unwrap()
}

#[tokio::test]
async fn diffs_and_stored_values_keep_their_bytes() {
    let server = RedisServer::start().await;
    let mut redis = server.connect().await;
    let (shutdown, tasks) = (CancellationToken::new(), TaskTracker::new());
    let store = RedisPresence::start(
        server.connect().await,
        0xabc,
        Timing::default(),
        shutdown.clone(),
        &tasks,
    );
    let room = ChannelName::new("room").unwrap();
    let alice = Origin {
        node: 0xabc,
        connection: 7,
    };

    let join = store
        .track(&room, alice, "alice", meta(json!({"name": "Alice"})))
        .await
        .unwrap();
    assert_eq!(
        join.to_json().to_string(),
        r#"{"joins":{"alice":{"metas":[{"name":"Alice","phx_ref":"Fabc-1"}]}},"leaves":{}}"#
    );
    assert_eq!(
        stored(&mut redis, "room", alice).await.as_deref(),
        Some(r#"{"key":"alice","meta":{"name":"Alice"},"ref":"Fabc-1"}"#)
    );

    // An update is a leave of the old ref plus a join that names it.
    let update = store
        .track(&room, alice, "alice", meta(json!({"name": "Alice", "typing": true})))
        .await
        .unwrap();
    assert_eq!(
        update.to_json().to_string(),
        concat!(
            r#"{"joins":{"alice":{"metas":[{"name":"Alice","phx_ref":"Fabc-2","phx_ref_prev":"Fabc-1","typing":true}]}},"#,
            r#""leaves":{"alice":{"metas":[{"name":"Alice","phx_ref":"Fabc-1"}]}}}"#
        )
    );
    assert_eq!(
        stored(&mut redis, "room", alice).await.as_deref(),
        Some(r#"{"key":"alice","meta":{"name":"Alice","typing":true},"ref":"Fabc-2"}"#)
    );

    let leave = store.untrack(&room, alice).await.unwrap();
    assert_eq!(
        leave.to_json().to_string(),
        r#"{"joins":{},"leaves":{"alice":{"metas":[{"name":"Alice","phx_ref":"Fabc-2","typing":true}]}}}"#
    );
    assert_eq!(stored(&mut redis, "room", alice).await, None);
    assert!(
        store.untrack(&room, alice).await.unwrap().is_empty(),
        "untrack twice is a no-op"
    );
    shutdown.cancel();
}

#[tokio::test]
async fn shutdown_deletes_the_liveness_key_before_the_tracker_finishes() {
    let server = RedisServer::start().await;
    let mut redis = server.connect().await;
    let (shutdown, tasks) = (CancellationToken::new(), TaskTracker::new());
    let timing = Timing {
        heartbeat: Duration::from_millis(50),
        ttl: Duration::from_secs(60),
    };
    let _store = RedisPresence::start(server.connect().await, 0xabc, timing, shutdown.clone(), &tasks);
    let deadline = Instant::now() + Duration::from_secs(5);
    while !alive(&mut redis).await {
        assert!(Instant::now() < deadline, "no heartbeat within 5 s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    shutdown.cancel();
    tasks.close();
    tokio::time::timeout(Duration::from_secs(5), tasks.wait())
        .await
        .expect("the heartbeat task ends on shutdown");
    // Long before the 60 s TTL: the task deleted the key on its way out.
    assert!(!alive(&mut redis).await, "liveness key left behind");
}
