//! The envelope every message travels in between edges.

use bytes::Bytes;
use std::sync::Arc;

use crate::channel::ChannelName;
use crate::presence::PresenceDiff;
#[cfg(doc)]
use crate::record::ChangeRecord;
use crate::record::ChangeType;

/// A message's place in its channel's history: the JetStream stream sequence
/// in cluster mode, a per-channel counter in standalone. Positions are only
/// comparable within one channel. `0` means "no position" (presence diffs,
/// which are not part of the history).
pub type Position = u64;

/// What kind of event an envelope carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EventKind {
    /// A client broadcast: `event` is the user event name, `payload` the user
    /// payload as JSON.
    Broadcast,
    /// A presence diff: `payload` is `{"joins": …, "leaves": …}` JSON.
    PresenceDiff,
    /// A database change: `payload` is the change record as JSON.
    PostgresChange,
}

/// Who published an event, so `self: false` can skip the sender's socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Origin {
    /// The process (edge) that published it, random per process start.
    pub node: u64,
    /// The connection on that node.
    pub connection: u64,
}

/// An event on a channel. Cheap to clone: the payload is shared `Bytes`.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    pub channel: ChannelName,
    pub kind: EventKind,
    /// The user event name (`broadcast`), empty for presence diffs.
    pub event: Arc<str>,
    /// The payload: JSON text, or raw bytes when `binary` is set.
    pub payload: Bytes,
    /// The payload is raw bytes (a realtime-js `ArrayBuffer` broadcast), not
    /// JSON. Only vsn 2.0.0 clients can receive such events.
    pub binary: bool,
    pub origin: Option<Origin>,
    /// Set by the bus when the event is stored in history.
    pub position: Position,
    /// Milliseconds since the Unix epoch when the event entered the bus;
    /// used for publish-to-deliver latency metrics.
    pub published_at_ms: u64,
    /// The verified `sub` of the client that sent a broadcast, when the
    /// edge stamps senders; clients see it as `meta.sub`.
    pub sender: Option<Arc<str>>,
    /// For a database change: the revision of the membership mirror it
    /// must be decided against (the ingester's last membership write
    /// before it); an edge delivers it once its mirror reached it. 0: none.
    pub memberships: u64,
}

/// Milliseconds since the Unix epoch (0 if the clock is before it).
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl Event {
    /// A broadcast of user event `event` (a client's, or a server's when
    /// `origin` is `None`), stamped now and not yet positioned.
    pub fn broadcast(channel: ChannelName, event: &str, payload: Bytes, binary: bool, origin: Option<Origin>) -> Self {
        Self::new(channel, EventKind::Broadcast, Arc::from(event), payload, binary, origin)
    }

    /// A presence diff to announce on `channel`.
    pub fn presence_diff(channel: ChannelName, diff: &PresenceDiff, origin: Option<Origin>) -> Self {
        let payload = Bytes::from(diff.to_json().to_string());
        Self::new(channel, EventKind::PresenceDiff, Arc::from(""), payload, false, origin)
    }

    /// A database change: `record_json` is a [`ChangeRecord`]'s JSON (see
    /// [`ChangeRecord::to_json`]; the ingester encodes it once, to apply its
    /// size limit); the event name is the change's type.
    pub fn change(channel: ChannelName, change_type: ChangeType, record_json: Bytes) -> Self {
        Self::new(
            channel,
            EventKind::PostgresChange,
            Arc::from(change_type.as_str()),
            record_json,
            false,
            None,
        )
    }

    fn new(
        channel: ChannelName,
        kind: EventKind,
        event: Arc<str>,
        payload: Bytes,
        binary: bool,
        origin: Option<Origin>,
    ) -> Self {
        Self {
            channel,
            kind,
            event,
            payload,
            binary,
            origin,
            position: 0,
            published_at_ms: now_ms(),
            sender: None,
            memberships: 0,
        }
    }
}
