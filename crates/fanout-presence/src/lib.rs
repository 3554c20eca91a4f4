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
//! # Layout
//! - `store`: [`RedisPresence`], its [`Timing`], [`connect`], the key layout
//!   below and the liveness-filtered read of a channel's entries.
//! - `sweeper`: [`Sweeper`] and its Lua script.
//! - `api`: [`PresenceApi`]. It is the only module that names the generated
//!   protobuf types; the others work with `fanout_core` types.
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
//! presence role, and registers [`STORE_METRICS`] and [`SWEEPER_METRICS`]
//! (the help text, and the series at zero, of the counters it emits).

use fanout_core::metric::Metric;

mod api;
mod store;
mod sweeper;

pub use api::PresenceApi;
pub use store::{RedisError, RedisPresence, Timing, connect};
pub use sweeper::Sweeper;

/// The metrics of [`RedisPresence`], emitted by edges with Redis presence,
/// for the binary to describe and register at zero when it installs the
/// recorder (see [`fanout_core::metric`]).
pub const STORE_METRICS: &[Metric] = &[
    Metric::counter(
        "fanout_presence_heartbeats_total",
        "Liveness heartbeats this edge wrote to Redis.",
    ),
    Metric::counter(
        "fanout_presence_store_errors_total",
        "Presence store operations on Redis that failed (presence is degraded until one succeeds).",
    ),
];

/// The metrics of [`Sweeper`], emitted by the presence role.
pub const SWEEPER_METRICS: &[Metric] = &[
    Metric::counter(
        "fanout_presence_expired_total",
        "Presences of crashed edges this sweeper removed and announced as leaves.",
    ),
    Metric::counter(
        "fanout_presence_sweep_errors_total",
        "Presence sweeps that failed on Redis.",
    ),
];
