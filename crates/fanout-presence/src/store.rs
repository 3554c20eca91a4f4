//! The edges' presence store: [`RedisPresence`] and its Redis key layout
//! (see the crate docs), the heartbeat that proves an edge alive, and
//! [`read_channel`], the liveness-filtered read that `presence_state` and
//! the gRPC API share.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use fanout_bus::{BoxFuture, LocalPresences, PresenceError, PresenceStore};
use fanout_core::{ChannelName, Origin, PresenceDiff, PresenceSet};
use redis::aio::ConnectionManager;
use serde_json::{Map, Value, json};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Heartbeat and expiry timing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timing {
    /// How often an edge refreshes its liveness key (H).
    pub heartbeat: Duration,
    /// How long a liveness key lives without refresh (T > H).
    pub ttl: Duration,
}

impl Default for Timing {
    fn default() -> Self {
        Self {
            heartbeat: Duration::from_secs(5),
            ttl: Duration::from_secs(15),
        }
    }
}

/// Connecting to Redis failed.
#[derive(Debug, thiserror::Error)]
#[error("redis: {0}")]
pub struct RedisError(#[from] redis::RedisError);

/// Opens a connection manager (it reconnects by itself) to `url`.
pub async fn connect(url: &str) -> Result<ConnectionManager, RedisError> {
    let client = redis::Client::open(url)?;
    let config = redis::aio::ConnectionManagerConfig::new()
        .set_response_timeout(Some(Duration::from_secs(2)))
        .set_connection_timeout(Some(Duration::from_secs(2)))
        .set_max_delay(Duration::from_secs(2));
    Ok(ConnectionManager::new_with_config(client, config).await?)
}

fn field(o: Origin) -> String {
    format!("{:016x}:{:016x}", o.node, o.connection)
}

fn node_hex(node: u64) -> String {
    format!("{node:016x}")
}

fn hash_key(channel: &str) -> String {
    format!("fanout:p:{channel}")
}

/// The stored value of one presence: `{"key", "ref", "meta"}` JSON. Other
/// edges and the sweepers of a running cluster read it, so its shape stays.
fn entry_json(key: &str, phx_ref: &str, meta: &Map<String, Value>) -> String {
    json!({"key": key, "ref": phx_ref, "meta": meta}).to_string()
}

/// One presence as read back from Redis.
#[derive(Debug)]
pub(crate) struct Entry {
    pub(crate) key: String,
    pub(crate) phx_ref: String,
    pub(crate) meta: Map<String, Value>,
}

impl Entry {
    pub(crate) fn from_json(s: &str) -> Option<Self> {
        let v: Value = serde_json::from_str(s).ok()?;
        Some(Self {
            key: v["key"].as_str()?.to_owned(),
            phx_ref: v["ref"].as_str()?.to_owned(),
            meta: v["meta"].as_object().cloned().unwrap_or_default(),
        })
    }

    /// The meta as clients see it: `{phx_ref, …meta}`.
    pub(crate) fn client_meta(&self) -> Value {
        fanout_core::presence::client_meta(&self.phx_ref, &self.meta)
    }
}

/// The edges' presence store in Redis. See the crate docs.
pub struct RedisPresence {
    conn: ConnectionManager,
    node: u64,
    timing: Timing,
    /// This edge's live presences, one set per channel. Its diffs are the
    /// ones announced (so the Phoenix rules exist once, in `PresenceSet`),
    /// and it is the source for re-writing Redis after an outage.
    local: LocalPresences,
    healthy: AtomicBool,
}

impl std::fmt::Debug for RedisPresence {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisPresence")
            .field("node", &self.node)
            .field("timing", &self.timing)
            .finish_non_exhaustive()
    }
}

impl RedisPresence {
    /// A store for edge `node` (the edge's own node id), with its heartbeat
    /// task running on `tasks` until `shutdown`. The task deletes this
    /// node's liveness key as it ends, so waiting for `tasks` on shutdown
    /// makes the node's presences disappear at once instead of after the TTL.
    pub fn start(
        conn: ConnectionManager,
        node: u64,
        timing: Timing,
        shutdown: CancellationToken,
        tasks: &TaskTracker,
    ) -> Arc<Self> {
        let me = Arc::new(Self {
            conn,
            node,
            timing,
            local: LocalPresences::new(node),
            healthy: AtomicBool::new(true),
        });
        let hb = me.clone();
        tasks.spawn(async move { hb.heartbeat_loop(shutdown).await });
        me
    }

    fn failed(&self, what: &str, e: &redis::RedisError) {
        metrics::counter!("fanout_presence_store_errors_total").increment(1);
        if self.healthy.swap(false, Ordering::AcqRel) {
            tracing::warn!(error = %e, "presence store unavailable ({what}); presence is degraded until Redis returns");
        }
    }

    async fn heartbeat_loop(self: Arc<Self>, shutdown: CancellationToken) {
        let mut tick = tokio::time::interval(self.timing.heartbeat);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                () = shutdown.cancelled() => break,
            }
            let was_healthy = self.healthy.load(Ordering::Acquire);
            let mut pipe = redis::pipe();
            pipe.cmd("SET")
                .arg(format!("fanout:alive:{}", node_hex(self.node)))
                .arg(1)
                .arg("PX")
                .arg(self.timing.ttl.as_millis() as u64)
                .ignore()
                .cmd("SADD")
                .arg("fanout:nodes")
                .arg(node_hex(self.node))
                .ignore();
            if !was_healthy {
                // Redis came back (or lost our data): write every live
                // presence again, in the same round trip.
                self.local.for_each(|channel, set| {
                    for (origin, key, phx_ref, meta) in set.entries() {
                        self.write_entry(&mut pipe, channel, origin, &entry_json(key, phx_ref, meta));
                    }
                });
            }
            let mut conn = self.conn.clone();
            match pipe.query_async::<()>(&mut conn).await {
                Ok(()) => {
                    metrics::counter!("fanout_presence_heartbeats_total").increment(1);
                    if !was_healthy {
                        self.healthy.store(true, Ordering::Release);
                        tracing::info!("presence store recovered; live presences re-written");
                    }
                }
                Err(e) => self.failed("heartbeat", &e),
            }
        }
        // Leaving cleanly: our presences go now, not after the TTL.
        let _ = redis::cmd("DEL")
            .arg(format!("fanout:alive:{}", node_hex(self.node)))
            .query_async::<()>(&mut self.conn.clone())
            .await;
    }

    /// Adds the commands that store `value` (an [`entry_json`]) as the
    /// presence of `origin`, and index its channel under this node, to `pipe`.
    fn write_entry(&self, pipe: &mut redis::Pipeline, channel: &ChannelName, origin: Origin, value: &str) {
        pipe.cmd("HSET")
            .arg(hash_key(channel.as_str()))
            .arg(field(origin))
            .arg(value)
            .ignore();
        pipe.cmd("SADD")
            .arg(format!("fanout:node:{}:ch", node_hex(self.node)))
            .arg(channel.as_str())
            .ignore();
    }

    /// Whether the last Redis operation worked.
    pub fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Acquire)
    }
}

impl PresenceStore for RedisPresence {
    fn track(
        &self,
        channel: &ChannelName,
        conn: Origin,
        key: &str,
        meta: Map<String, Value>,
    ) -> BoxFuture<'_, Result<PresenceDiff, PresenceError>> {
        let phx_ref = self.local.make_ref();
        // Serialized before the meta moves into the set, which saves a copy.
        let value = entry_json(key, &phx_ref, &meta);
        let diff = self.local.track(channel, conn, key, meta, phx_ref);
        let channel = channel.clone();
        Box::pin(async move {
            let mut pipe = redis::pipe();
            self.write_entry(&mut pipe, &channel, conn, &value);
            if let Err(e) = pipe.query_async::<()>(&mut self.conn.clone()).await {
                // The diff still reaches every edge over the bus; the entry is
                // written again when Redis returns.
                self.failed("track", &e);
            }
            Ok(diff)
        })
    }

    fn untrack(&self, channel: &ChannelName, conn: Origin) -> BoxFuture<'_, Result<PresenceDiff, PresenceError>> {
        let diff = self.local.untrack(channel, conn);
        let channel = channel.clone();
        Box::pin(async move {
            // Nothing was tracked, so there is nothing to delete either.
            if diff.is_empty() {
                return Ok(diff);
            }
            if let Err(e) = redis::cmd("HDEL")
                .arg(hash_key(channel.as_str()))
                .arg(field(conn))
                .query_async::<()>(&mut self.conn.clone())
                .await
            {
                self.failed("untrack", &e);
            }
            Ok(diff)
        })
    }

    fn state(&self, channel: &ChannelName) -> BoxFuture<'_, Result<Value, PresenceError>> {
        let channel = channel.clone();
        Box::pin(async move {
            let entries = read_channel(&mut self.conn.clone(), channel.as_str(), Some(self.node))
                .await
                .map_err(|e| {
                    self.failed("state", &e);
                    PresenceError::Unavailable(format!("presence is degraded: {e}"))
                })?;
            let mut set = PresenceSet::default();
            for (origin, e) in entries {
                set.track(origin, &e.key, e.meta, e.phx_ref);
            }
            Ok(set.state_json())
        })
    }
}

/// The live presences of `channel`: entries of nodes whose liveness key
/// expired are left out (no ghosts before a sweep); `own` is always live.
pub(crate) async fn read_channel(
    conn: &mut ConnectionManager,
    channel: &str,
    own: Option<u64>,
) -> Result<Vec<(Origin, Entry)>, redis::RedisError> {
    let all: Vec<(String, String)> = redis::cmd("HGETALL").arg(hash_key(channel)).query_async(conn).await?;
    let nodes: BTreeSet<&str> = all
        .iter()
        .filter_map(|(f, _)| f.split_once(':').map(|(n, _)| n))
        .collect();
    let mut alive: HashMap<&str, bool> = HashMap::new();
    if !nodes.is_empty() {
        let mut pipe = redis::pipe();
        for n in &nodes {
            pipe.cmd("EXISTS").arg(format!("fanout:alive:{n}"));
        }
        let flags: Vec<bool> = pipe.query_async(conn).await?;
        alive = nodes.iter().copied().zip(flags).collect();
    }
    let own = own.map(node_hex);
    let mut out = Vec::with_capacity(all.len());
    for (f, v) in &all {
        let Some((n, c)) = f.split_once(':') else { continue };
        if own.as_deref() != Some(n) && !alive.get(n).copied().unwrap_or(false) {
            continue;
        }
        let (Ok(node), Ok(connection)) = (u64::from_str_radix(n, 16), u64::from_str_radix(c, 16)) else {
            continue;
        };
        if let Some(e) = Entry::from_json(v) {
            out.push((Origin { node, connection }, e));
        }
    }
    Ok(out)
}
