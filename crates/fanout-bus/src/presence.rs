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

/// In-process presence for standalone mode.
#[derive(Debug)]
pub struct MemoryPresence {
    channels: Mutex<HashMap<ChannelName, PresenceSet>>,
    node: u64,
    next_ref: AtomicU64,
}

impl MemoryPresence {
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

    /// A unique `phx_ref`: this node's id and a counter.
    fn make_ref(&self) -> String {
        fanout_core::presence::phx_ref(self.node, self.next_ref.fetch_add(1, Ordering::Relaxed))
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
        let phx_ref = self.make_ref();
        let diff = self
            .lock()
            .entry(channel.clone())
            .or_default()
            .track(conn, key, meta, phx_ref);
        Box::pin(async move { Ok(diff) })
    }

    fn untrack(&self, channel: &ChannelName, conn: Origin) -> BoxFuture<'_, Result<PresenceDiff, PresenceError>> {
        let mut channels = self.lock();
        let diff = match channels.get_mut(channel) {
            Some(set) => {
                let diff = set.untrack(conn);
                if set.is_empty() {
                    channels.remove(channel);
                }
                diff
            }
            None => PresenceDiff::default(),
        };
        Box::pin(async move { Ok(diff) })
    }

    fn state(&self, channel: &ChannelName) -> BoxFuture<'_, Result<Value, PresenceError>> {
        let state = self
            .lock()
            .get(channel)
            .map_or_else(|| Value::Object(Map::new()), PresenceSet::state_json);
        Box::pin(async move { Ok(state) })
    }
}
