//! Presence for a fanout cluster, kept in Redis.
//!
//! Three pieces:
//! - [`RedisPresence`], the edges' implementation of
//!   [`fanout_bus::PresenceStore`]. Each edge writes its own
//!   presences to Redis, keeps a copy in memory (to re-write them all when
//!   Redis comes back), and proves it is alive with **one** pipelined round
//!   trip per heartbeat interval, whatever the number of users: a liveness key
//!   with a TTL. Presences of a node whose liveness key expired are hidden
//!   from `presence_state` at once, before any sweep.
//! - [`Sweeper`], run by `fanout presence`: it finds nodes whose liveness key
//!   expired (a crashed edge), removes their presences with one atomic Lua
//!   script per node (so with several sweepers each entry is removed, and
//!   announced, exactly once), and publishes the leave diffs on the bus.
//! - [`PresenceApi`], the gRPC service `fanout.v1.Presence` (get a channel's
//!   presences, count online, list the busiest channels), answered from
//!   Redis with the same liveness filter.
//!
//! # Keys
//! - `fanout:p:<channel>`: hash, field `<node>:<conn>` (hex), value
//!   `{"key", "ref", "meta"}` JSON.
//! - `fanout:node:<node>:ch`: set of the channels where `node` has entries.
//! - `fanout:nodes`: set of the nodes that have written presences.
//! - `fanout:alive:<node>`: liveness, expires after the TTL.
//!
//! The script touches keys it computes itself, so it needs a single Redis
//! (or Sentinel) deployment, not Redis Cluster.
//!
//! This crate binds no sockets; the binary wires it to the edge and to the
//! presence role.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use fanout_bus::{BoxFuture, Bus, PresenceError, PresenceStore};
use fanout_core::{ChannelName, Event, Origin, PresenceDiff, PresenceSet};
use redis::aio::ConnectionManager;
use serde_json::{Map, Value, json};
use tokio_util::sync::CancellationToken;

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

#[derive(Debug, Clone)]
struct Entry {
    key: String,
    phx_ref: String,
    meta: Map<String, Value>,
}

impl Entry {
    fn to_json(&self) -> String {
        json!({"key": self.key, "ref": self.phx_ref, "meta": self.meta}).to_string()
    }

    fn from_json(s: &str) -> Option<Self> {
        let v: Value = serde_json::from_str(s).ok()?;
        Some(Self {
            key: v["key"].as_str()?.to_owned(),
            phx_ref: v["ref"].as_str()?.to_owned(),
            meta: v["meta"].as_object().cloned().unwrap_or_default(),
        })
    }

    /// The meta as clients see it: `{phx_ref, …meta}`.
    fn client_meta(&self) -> Value {
        fanout_core::presence::client_meta(&self.phx_ref, &self.meta)
    }
}

/// The edges' presence store in Redis. See the crate docs.
pub struct RedisPresence {
    conn: ConnectionManager,
    node: u64,
    timing: Timing,
    /// This edge's live presences: the source for re-writing after an outage.
    local: Mutex<HashMap<(ChannelName, Origin), Entry>>,
    next_ref: AtomicU64,
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
    /// task running until `shutdown`.
    pub fn start(conn: ConnectionManager, node: u64, timing: Timing, shutdown: CancellationToken) -> Arc<Self> {
        let me = Arc::new(Self {
            conn,
            node,
            timing,
            local: Mutex::new(HashMap::new()),
            next_ref: AtomicU64::new(1),
            healthy: AtomicBool::new(true),
        });
        let hb = me.clone();
        tokio::spawn(async move { hb.heartbeat_loop(shutdown).await });
        me
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<(ChannelName, Origin), Entry>> {
        self.local.lock().unwrap_or_else(|e| e.into_inner())
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
                for ((channel, origin), entry) in self.lock().iter() {
                    self.write_entry(&mut pipe, channel, *origin, entry);
                }
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

    /// Adds the commands that store `entry` (and index its channel under this
    /// node) to `pipe`.
    fn write_entry(&self, pipe: &mut redis::Pipeline, channel: &ChannelName, origin: Origin, entry: &Entry) {
        pipe.cmd("HSET")
            .arg(hash_key(channel.as_str()))
            .arg(field(origin))
            .arg(entry.to_json())
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
        let n = self.next_ref.fetch_add(1, Ordering::Relaxed);
        let entry = Entry {
            key: key.to_owned(),
            phx_ref: fanout_core::presence::phx_ref(self.node, n),
            meta,
        };
        let old = self.lock().insert((channel.clone(), conn), entry.clone());
        let mut diff = PresenceDiff::default();
        let mut join = entry.client_meta();
        if let Some(old) = &old {
            if let Value::Object(m) = &mut join {
                m.insert("phx_ref_prev".into(), Value::String(old.phx_ref.clone()));
            }
            diff.leaves.entry(old.key.clone()).or_default().push(old.client_meta());
        }
        diff.joins.entry(entry.key.clone()).or_default().push(join);
        let channel = channel.clone();
        Box::pin(async move {
            let mut pipe = redis::pipe();
            self.write_entry(&mut pipe, &channel, conn, &entry);
            if let Err(e) = pipe.query_async::<()>(&mut self.conn.clone()).await {
                // The diff still reaches every edge over the bus; the entry is
                // written again when Redis returns.
                self.failed("track", &e);
            }
            Ok(diff)
        })
    }

    fn untrack(&self, channel: &ChannelName, conn: Origin) -> BoxFuture<'_, Result<PresenceDiff, PresenceError>> {
        let old = self.lock().remove(&(channel.clone(), conn));
        let channel = channel.clone();
        Box::pin(async move {
            let mut diff = PresenceDiff::default();
            let Some(old) = old else { return Ok(diff) };
            diff.leaves.entry(old.key.clone()).or_default().push(old.client_meta());
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
async fn read_channel(
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

/// Removes every presence of `ARGV[1]` (a node) if its liveness key is gone,
/// atomically, and returns `[channel, [entry json, …], …]`.
const SWEEP_SCRIPT: &str = r"
local node = ARGV[1]
if redis.call('EXISTS', 'fanout:alive:' .. node) == 1 then return {} end
local chs = redis.call('SMEMBERS', 'fanout:node:' .. node .. ':ch')
local prefix = node .. ':'
local out = {}
for _, ch in ipairs(chs) do
  local h = 'fanout:p:' .. ch
  local all = redis.call('HGETALL', h)
  local removed = {}
  for i = 1, #all, 2 do
    if string.sub(all[i], 1, #prefix) == prefix then
      redis.call('HDEL', h, all[i])
      table.insert(removed, all[i + 1])
    end
  end
  if #removed > 0 then
    table.insert(out, ch)
    table.insert(out, removed)
  end
end
redis.call('DEL', 'fanout:node:' .. node .. ':ch')
redis.call('SREM', 'fanout:nodes', node)
return out
";

/// The presence role's sweeper: expires crashed edges' presences and
/// announces the leaves.
pub struct Sweeper {
    conn: ConnectionManager,
    bus: Arc<dyn Bus>,
    interval: Duration,
    script: redis::Script,
}

impl std::fmt::Debug for Sweeper {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sweeper")
            .field("interval", &self.interval)
            .finish_non_exhaustive()
    }
}

impl Sweeper {
    pub fn new(conn: ConnectionManager, bus: Arc<dyn Bus>, interval: Duration) -> Self {
        Self {
            conn,
            bus,
            interval,
            script: redis::Script::new(SWEEP_SCRIPT),
        }
    }

    /// Sweeps every `interval` until `shutdown`.
    pub async fn run(&self, shutdown: CancellationToken) {
        let mut tick = tokio::time::interval(self.interval);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                () = shutdown.cancelled() => break,
            }
            match self.sweep_once().await {
                Ok(0) => {}
                Ok(n) => tracing::info!(removed = n, "expired presences of crashed edges"),
                Err(e) => {
                    metrics::counter!("fanout_presence_sweep_errors_total").increment(1);
                    tracing::warn!(error = %e, "presence sweep failed");
                }
            }
        }
    }

    /// One sweep; returns how many presences were removed (by this sweeper).
    pub async fn sweep_once(&self) -> Result<usize, RedisError> {
        let mut conn = self.conn.clone();
        let nodes: Vec<String> = redis::cmd("SMEMBERS")
            .arg("fanout:nodes")
            .query_async(&mut conn)
            .await?;
        let mut removed = 0;
        for node in nodes {
            let out: Vec<redis::Value> = self.script.arg(&node).invoke_async(&mut conn).await?;
            for pair in out.chunks(2) {
                let [channel, entries] = pair else { continue };
                let Ok(channel) = redis::from_redis_value::<String>(channel.clone()) else {
                    continue;
                };
                let Ok(entries) = redis::from_redis_value::<Vec<String>>(entries.clone()) else {
                    continue;
                };
                let Ok(channel) = ChannelName::new(&channel) else {
                    continue;
                };
                let mut diff = PresenceDiff::default();
                for e in entries.iter().filter_map(|s| Entry::from_json(s)) {
                    diff.leaves.entry(e.key.clone()).or_default().push(e.client_meta());
                    removed += 1;
                }
                let event = Event::presence_diff(channel, &diff, None);
                if let Err(e) = self.bus.publish(event).await {
                    tracing::warn!(error = %e, "leave diff of a crashed edge not published");
                }
            }
        }
        metrics::counter!("fanout_presence_expired_total").increment(removed as u64);
        Ok(removed)
    }
}

/// The gRPC presence API (`fanout.v1.Presence`), answered from Redis with
/// the same liveness filter as `presence_state`.
#[derive(Clone)]
pub struct PresenceApi {
    conn: ConnectionManager,
}

impl std::fmt::Debug for PresenceApi {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PresenceApi").finish_non_exhaustive()
    }
}

impl PresenceApi {
    pub fn new(conn: ConnectionManager) -> Self {
        Self { conn }
    }

    /// The tonic service, ready for `Server::add_service`.
    pub fn into_service(self) -> fanout_proto::v1::presence_server::PresenceServer<Self> {
        fanout_proto::v1::presence_server::PresenceServer::new(self)
    }

    async fn count(&self, channel: &str) -> Result<fanout_proto::v1::ChannelCount, tonic::Status> {
        let entries = read_channel(&mut self.conn.clone(), channel, None)
            .await
            .map_err(unavailable)?;
        let keys: BTreeSet<&str> = entries.iter().map(|(_, e)| e.key.as_str()).collect();
        Ok(fanout_proto::v1::ChannelCount {
            channel: channel.to_owned(),
            presences: entries.len() as u32,
            keys: keys.len() as u32,
        })
    }
}

fn unavailable(e: redis::RedisError) -> tonic::Status {
    tonic::Status::unavailable(format!("presence store unavailable: {e}"))
}

fn channel_arg(name: &str) -> Result<ChannelName, tonic::Status> {
    ChannelName::from_name_or_topic(name).map_err(|e| tonic::Status::invalid_argument(format!("channel: {e}")))
}

#[tonic::async_trait]
impl fanout_proto::v1::presence_server::Presence for PresenceApi {
    async fn get_presences(
        &self,
        request: tonic::Request<fanout_proto::v1::GetPresencesRequest>,
    ) -> Result<tonic::Response<fanout_proto::v1::GetPresencesResponse>, tonic::Status> {
        let channel = channel_arg(&request.into_inner().channel)?;
        let entries = read_channel(&mut self.conn.clone(), channel.as_str(), None)
            .await
            .map_err(unavailable)?;
        let presences = entries
            .into_iter()
            .map(|(_, e)| fanout_proto::v1::PresenceEntry {
                key: e.key,
                phx_ref: e.phx_ref,
                meta_json: Value::Object(e.meta).to_string(),
            })
            .collect();
        Ok(tonic::Response::new(fanout_proto::v1::GetPresencesResponse {
            presences,
        }))
    }

    async fn count_online(
        &self,
        request: tonic::Request<fanout_proto::v1::CountOnlineRequest>,
    ) -> Result<tonic::Response<fanout_proto::v1::CountOnlineResponse>, tonic::Status> {
        let mut counts = Vec::new();
        for name in request.into_inner().channels {
            let channel = channel_arg(&name)?;
            counts.push(self.count(channel.as_str()).await?);
        }
        Ok(tonic::Response::new(fanout_proto::v1::CountOnlineResponse { counts }))
    }

    async fn list_channels(
        &self,
        request: tonic::Request<fanout_proto::v1::ListChannelsRequest>,
    ) -> Result<tonic::Response<fanout_proto::v1::ListChannelsResponse>, tonic::Status> {
        let limit = match request.into_inner().limit {
            0 => 100,
            n => n as usize,
        };
        let mut conn = self.conn.clone();
        let mut cursor: u64 = 0;
        let mut names = BTreeSet::new();
        // Bounded: at most 100 SCAN pages of 1,000 keys.
        for _ in 0..100 {
            let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg("fanout:p:*")
                .arg("COUNT")
                .arg(1000)
                .query_async(&mut conn)
                .await
                .map_err(unavailable)?;
            names.extend(
                keys.into_iter()
                    .filter_map(|k| k.strip_prefix("fanout:p:").map(str::to_owned)),
            );
            cursor = next;
            if cursor == 0 {
                break;
            }
        }
        let mut channels = Vec::with_capacity(names.len());
        for name in names {
            let c = self.count(&name).await?;
            if c.presences > 0 {
                channels.push(c);
            }
        }
        channels.sort_by(|a, b| b.presences.cmp(&a.presences).then_with(|| a.channel.cmp(&b.channel)));
        channels.truncate(limit);
        Ok(tonic::Response::new(fanout_proto::v1::ListChannelsResponse {
            channels,
        }))
    }
}
