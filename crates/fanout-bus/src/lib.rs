//! The seams between fanout's processes: how events travel between roles
//! ([`Bus`]), where presences are kept ([`PresenceStore`]), and how commands
//! reach every edge ([`Control`]).
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
//! - [`control`]: the [`Control`] contract (commands to every edge, one
//!   report back from each), [`MemoryControl`] and [`NatsControl`].
//! - [`members`]: the membership mirror ([`MemberMirror`]) edges decide
//!   `member.<set>` rules from, and the [`MemberStore`] the ingester writes
//!   it through: [`MemoryMembers`], or [`NatsMembers`] over a JetStream
//!   key-value bucket.
//!
//! # What it does not do
//! It holds no client sockets and serves no HTTP (that is `fanout-edge`), and
//! it never talks to PostgreSQL (that is `fanout-cdc`). Redis lives in
//! `fanout-presence`, behind [`PresenceStore`], so a role that needs no
//! presence links no Redis client.

use fanout_core::metric::Metric;

pub mod bus;
pub mod control;
pub mod members;
pub mod memory;
pub mod nats;
pub mod presence;

pub use bus::{BoxFuture, Bus, BusError, History, HistoryQuery, Published, Replay, Retention, Subscription};
pub use control::{Command, CommandHandler, Control, MemoryControl, NatsControl, NodeReport};
pub use members::{MemberChange, MemberMirror, MemberStore, MemberUpdate, MemoryMembers, NatsMembers};
pub use memory::MemoryBus;
pub use nats::{NatsBus, NatsConfig};
pub use presence::{LocalPresences, MemoryPresence, PresenceError, PresenceStore};

/// Every metric the bus (the NATS bus; the memory bus emits none) emits, for the binary to describe and register
/// at zero when it installs the recorder (see [`fanout_core::metric`]).
pub const METRICS: &[Metric] = &[
    Metric::gauge(
        "fanout_members_rows",
        "Membership rows (user, value) in this process's mirror of the membership sets.",
    ),
    Metric::gauge(
        "fanout_members_revision",
        "The membership mirror's revision (the bucket's sequence) this process has reached.",
    ),
    Metric::counter(
        "fanout_members_updates_total",
        "Users whose memberships changed in this process's mirror.",
    ),
    Metric::counter(
        "fanout_bus_ephemeral_published_total",
        "Ephemeral broadcasts published on core NATS only (never stored).",
    ),
    Metric::gauge(
        "fanout_bus_subscriptions",
        "Live NATS subscriptions, one per channel with local members.",
    ),
    Metric::counter(
        "fanout_bus_disconnects_total",
        "Disconnections from NATS (the client reconnects by itself).",
    ),
    Metric::gauge(
        "fanout_bus_stream_replicas_unavailable",
        "The most replicas any of fanout's JetStream streams is missing (offline, behind, or all while it has no leader or its info goes unanswered); edges only.",
    ),
    Metric::counter(
        "fanout_bus_replica_divergence_total",
        "Stream reads whose replica numbered events unlike the stream leader (a nats-server bug); each was read again through the leader.",
    ),
    Metric::counter(
        "fanout_bus_stream_reads_total",
        "Stream reads (replays, catch-ups, history) by how: the leader's message API, or a consumer for the part of a long range past the first 32 events.",
    )
    .labelled("via", &["leader", "consumer"]),
    Metric::counter(
        "fanout_bus_replay_retries_total",
        "Replays retried after a failed stream read (within 3 s, before the client is told to resync).",
    ),
    Metric::counter(
        "fanout_bus_slow_consumer_events_total",
        "Reports that the NATS client dropped live events of a subscription that fell behind.",
    ),
    Metric::counter(
        "fanout_bus_catch_ups_total",
        "Catch-ups that refilled a subscription from JetStream, by reason (gap, resync).",
    )
    .labelled("reason", &["gap", "resync"]),
    Metric::counter(
        "fanout_bus_caught_up_events_total",
        "Events refilled from JetStream by catch-ups (dropped or late on the live path).",
    ),
    Metric::counter(
        "fanout_bus_resyncs_without_catch_up_total",
        "Subscriptions a reconnect or slow-consumer report made check, and that had missed nothing.",
    ),
    Metric::counter(
        "fanout_bus_live_events_skipped_total",
        "Live events skipped, by why: at or before the subscription's start, or already refilled by a catch-up.",
    )
    .labelled("why", &["before_start", "refilled"]),
    Metric::counter(
        "fanout_bus_decode_errors_total",
        "Live or stored events that could not be read (skipped).",
    ),
];
