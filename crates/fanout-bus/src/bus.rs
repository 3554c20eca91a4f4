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
    /// Whether the bus can currently deliver (for `/readyz`).
    fn is_ready(&self) -> bool {
        true
    }
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
