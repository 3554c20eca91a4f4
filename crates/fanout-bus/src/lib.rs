//! The seams between fanout's processes: how events travel between roles
//! ([`Bus`]) and where presences are kept ([`PresenceStore`]).
//!
//! Every role talks to the others through these two traits only. The edge
//! publishes client broadcasts and presence diffs and subscribes to the
//! channels its clients joined; the change ingester (`fanout-cdc`) publishes
//! row changes; the presence role (`fanout-presence`) publishes the leaves of
//! crashed edges. None of them knows which implementation is behind the trait:
//! - standalone mode plugs in [`MemoryBus`] and [`MemoryPresence`] (one
//!   process, everything in memory);
//! - cluster mode plugs in [`NatsBus`] (NATS subjects sharded by channel,
//!   JetStream for history and positions) and `fanout_presence::RedisPresence`.
//!
//! # Layout
//! - [`bus`]: the [`Bus`] contract (publish → position, subscribe → ordered
//!   events and head, replay) and its error and retention types.
//! - [`memory`]: [`MemoryBus`], bounded per-channel history in memory.
//! - [`nats`]: [`NatsBus`], subjects, streams, live republish and catch-ups.
//! - [`presence`]: the [`PresenceStore`] contract and [`MemoryPresence`].
//!
//! # What it does not do
//! It holds no client sockets and serves no HTTP (that is `fanout-edge`), and
//! it never talks to PostgreSQL (that is `fanout-cdc`). Redis lives in
//! `fanout-presence`, behind [`PresenceStore`], so a role that needs no
//! presence links no Redis client.

pub mod bus;
pub mod memory;
pub mod nats;
pub mod presence;

pub use bus::{BoxFuture, Bus, BusError, Replay, Retention, Subscription};
pub use memory::MemoryBus;
pub use nats::{NatsBus, NatsConfig};
pub use presence::{LocalPresences, MemoryPresence, PresenceError, PresenceStore};
