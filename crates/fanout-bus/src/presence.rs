//! The presence seam: where a channel's presences live.
//!
//! [`PresenceStore`] holds the truth; the edge publishes the diffs it returns
//! on the bus, so every edge's subscribers see `presence_diff`s in the same
//! order as other channel events. Standalone uses [`MemoryPresence`]; cluster
//! mode keeps the same trait over Redis.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use fanout_core::{ChannelName, Origin, PresenceDiff, PresenceSet};
use serde_json::{Map, Value};

use crate::bus::BoxFuture;

/// Presence store failures (transient: presence degrades, broadcasts go on).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PresenceError {
    #[error("presence store unavailable: {0}")]
    Unavailable(String),
}

/// Where presences are kept. Every call returns the diff to announce.
pub trait PresenceStore: Send + Sync + 'static {
    fn track(
        &self,
        channel: &ChannelName,
        conn: Origin,
        key: &str,
        meta: Map<String, Value>,
    ) -> BoxFuture<'_, Result<PresenceDiff, PresenceError>>;
    fn untrack(&self, channel: &ChannelName, conn: Origin) -> BoxFuture<'_, Result<PresenceDiff, PresenceError>>;
    /// The channel's presences in `presence_state` shape.
    fn state(&self, channel: &ChannelName) -> BoxFuture<'_, Result<Value, PresenceError>>;
}

/// One process's own presences, per channel: [`PresenceSet`]'s Phoenix
/// rules, with `phx_ref`s unique to this node. [`MemoryPresence`] is this
/// and nothing more; the Redis store keeps one as its local copy (the diffs
/// it announces, and what it writes again after an outage).
#[derive(Debug)]
pub struct LocalPresences {
    channels: Mutex<HashMap<ChannelName, PresenceSet>>,
    node: u64,
    next_ref: AtomicU64,
}

impl LocalPresences {
    pub fn new(node: u64) -> Self {
        Self {
            channels: Mutex::new(HashMap::new()),
            node,
            next_ref: AtomicU64::new(1),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<ChannelName, PresenceSet>> {
        self.channels.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A fresh `phx_ref`: this node's id and a counter.
    pub fn make_ref(&self) -> String {
        fanout_core::presence::phx_ref(self.node, self.next_ref.fetch_add(1, Ordering::Relaxed))
    }

    /// Tracks (or updates) `conn`'s presence under `key`; the diff to announce.
    pub fn track(
        &self,
        channel: &ChannelName,
        conn: Origin,
        key: &str,
        meta: Map<String, Value>,
        phx_ref: String,
    ) -> PresenceDiff {
        self.lock()
            .entry(channel.clone())
            .or_default()
            .track(conn, key, meta, phx_ref)
    }

    /// Removes `conn`'s presence; the diff to announce (empty if it had none).
    /// A channel's set goes once it is empty, so the map holds only channels
    /// with presences, however many this process has served.
    pub fn untrack(&self, channel: &ChannelName, conn: Origin) -> PresenceDiff {
        let mut channels = self.lock();
        let Some(set) = channels.get_mut(channel) else {
            return PresenceDiff::default();
        };
        let diff = set.untrack(conn);
        if set.is_empty() {
            channels.remove(channel);
        }
        diff
    }

    /// The channel's presences in `presence_state` shape.
    pub fn state(&self, channel: &ChannelName) -> Value {
        self.lock()
            .get(channel)
            .map_or_else(|| Value::Object(Map::new()), PresenceSet::state_json)
    }

    /// Calls `f` with every channel's set (under the lock: keep it short).
    pub fn for_each(&self, mut f: impl FnMut(&ChannelName, &PresenceSet)) {
        for (channel, set) in self.lock().iter() {
            f(channel, set);
        }
    }
}

/// In-process presence for standalone mode.
#[derive(Debug)]
pub struct MemoryPresence(LocalPresences);

impl MemoryPresence {
    pub fn new(node: u64) -> Self {
        Self(LocalPresences::new(node))
    }
}

impl PresenceStore for MemoryPresence {
    fn track(
        &self,
        channel: &ChannelName,
        conn: Origin,
        key: &str,
        meta: Map<String, Value>,
    ) -> BoxFuture<'_, Result<PresenceDiff, PresenceError>> {
        let diff = self.0.track(channel, conn, key, meta, self.0.make_ref());
        Box::pin(async move { Ok(diff) })
    }

    fn untrack(&self, channel: &ChannelName, conn: Origin) -> BoxFuture<'_, Result<PresenceDiff, PresenceError>> {
        let diff = self.0.untrack(channel, conn);
        Box::pin(async move { Ok(diff) })
    }

    fn state(&self, channel: &ChannelName) -> BoxFuture<'_, Result<Value, PresenceError>> {
        let state = self.0.state(channel);
        Box::pin(async move { Ok(state) })
    }
}
