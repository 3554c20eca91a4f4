//! The envelope every message travels in between edges.

use bytes::Bytes;
use std::sync::Arc;

use crate::channel::ChannelName;

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
}
