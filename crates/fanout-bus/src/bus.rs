//! The bus: how events reach every edge that has subscribers for a channel.
//!
//! [`Bus`] is the seam between the edge and its transport. Standalone uses
//! [`MemoryBus`](crate::MemoryBus); cluster mode uses [`NatsBus`](crate::NatsBus) behind the same trait, and
//! both must pass the same behaviour tests. The contract:
//! - `publish` assigns history events (broadcasts, database changes) a
//!   position, increasing per channel; presence diffs get position 0 and are
//!   not kept in history.
//! - A [`Subscription`] yields every event of its channel published after it
//!   was taken, in publish order, and reports `head`, the position of the
//!   last history event before it started.
//! - `replay(after, upto)` returns the history events with positions in
//!   `(after, upto]`, in order, or [`Replay::Expired`] when some of them are
//!   no longer retained (the client must resync).
//! - `history` reads the same store for the server API: the last N events,
//!   or those after a position, with the channel's newest position.
//! - `publish_batch` stores events in order, each optionally under a
//!   deduplication id, and answers each with its position; an id seen again
//!   within the window publishes nothing and answers the first position.

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use fanout_core::{ChannelName, Event, Position};
use tokio::sync::mpsc;

/// A boxed, sendable future (the bus is used as a trait object).
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Bus failures. `Unavailable` is transient (retry, report not-ready);
/// `Rejected` is about the message itself.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BusError {
    #[error("bus unavailable: {0}")]
    Unavailable(String),
    #[error("message rejected by the bus: {0}")]
    Rejected(String),
}

/// A transport failure as a transient [`BusError::Unavailable`].
pub(crate) fn unavailable(e: impl std::fmt::Display) -> BusError {
    BusError::Unavailable(e.to_string())
}

/// A live subscription to one channel. Dropping it unsubscribes.
#[derive(Debug)]
pub struct Subscription {
    /// Position of the last history event published before the subscription
    /// started (0 if none).
    pub head: Position,
    pub events: mpsc::UnboundedReceiver<Event>,
}

/// The answer to a replay request.
#[derive(Debug, Clone, PartialEq)]
pub enum Replay {
    Events(Vec<Event>),
    /// Some requested events are past retention.
    Expired,
}

/// The transport between edges. See the module docs for the contract.
pub trait Bus: Send + Sync + 'static {
    fn publish(&self, event: Event) -> BoxFuture<'_, Result<Position, BusError>>;
    fn subscribe(&self, channel: ChannelName) -> BoxFuture<'_, Result<Subscription, BusError>>;
    fn replay(&self, channel: ChannelName, after: Position, upto: Position) -> BoxFuture<'_, Result<Replay, BusError>>;
    /// Publishes `events` in order, each with a deduplication id, and
    /// returns once every one is stored. An event whose id the bus already
    /// stored (within its deduplication window) is not stored or delivered
    /// again, so a publisher that restarts and re-sends is harmless. The
    /// change ingester publishes this way.
    fn publish_deduplicated(&self, events: Vec<(String, Event)>) -> BoxFuture<'_, Result<(), BusError>>;
    /// Publishes `batch` in order (pipelined: the next is sent before the
    /// previous one's ack), each under its deduplication id when it has one
    /// (see [`Bus::publish_deduplicated`]), and answers each in order. An
    /// id already stored within the window publishes nothing and answers
    /// the stored event's position. The server API publishes this way.
    fn publish_batch(&self, batch: Vec<(Option<String>, Event)>) -> BoxFuture<'_, Vec<Result<Published, BusError>>>;
    /// Reads a channel's stored events (the history resume replays from).
    fn history(&self, channel: ChannelName, query: HistoryQuery) -> BoxFuture<'_, Result<History, BusError>>;
    /// Whether the bus can currently deliver (for `/readyz`).
    fn is_ready(&self) -> bool {
        true
    }
}

/// One answer of [`Bus::publish_batch`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Published {
    pub position: Position,
    /// The id was stored before: nothing was published now, and `position`
    /// is the first event's.
    pub duplicate: bool,
}

/// Which stored events [`Bus::history`] reads, at most `limit` of them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HistoryQuery {
    /// The channel's newest `limit` events.
    Last { limit: usize },
    /// The first `limit` events after `after`.
    After { after: Position, limit: usize },
}

/// The answer to [`Bus::history`].
#[derive(Debug, Clone, PartialEq)]
pub enum History {
    /// The events, oldest first, and the channel's newest position (at
    /// least the last event's; 0 when nothing was ever stored).
    Events { events: Vec<Event>, head: Position },
    /// Events after `after` are no longer all retained.
    Expired { head: Position },
}

/// The deduplication window of [`Bus::publish_batch`] and
/// [`Bus::publish_deduplicated`]: two minutes (JetStream's default), or the
/// history's age limit when that is shorter.
pub fn dedupe_window(retention: Retention) -> Duration {
    Duration::from_secs(120).min(retention.max_age)
}

/// Retention of channel history.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retention {
    pub max_messages: usize,
    pub max_age: Duration,
}

impl Default for Retention {
    fn default() -> Self {
        Self {
            max_messages: 10_000,
            max_age: Duration::from_secs(300),
        }
    }
}
