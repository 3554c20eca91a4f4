//! The shared vocabulary of fanout: channel names and their shards, the event
//! envelope that travels between edges, JWT claims, client-controlled limits
//! and the Phoenix Presence rules.
//!
//! Every role (`edge`, `cdc`, `presence`, `standalone`) speaks in these types,
//! so a message means the same thing wherever it is.
//!
//! # Layout
//! - [`channel`]: `realtime:<name>` topics, [`ChannelName`], the stable
//!   [`shard_of`] mapping and NATS subject tokens.
//! - [`event`]: [`Event`], the envelope of a broadcast, a presence diff or a
//!   database change, with a constructor for each, [`Position`], its place
//!   in a channel's history, and [`now_ms`], the clock events are stamped by.
//! - [`record`]: [`ChangeRecord`], a row change as the ingester publishes it
//!   and the edge reads it.
//! - [`changes`]: `postgres_changes` bindings, row [`changes::Filter`]s and
//!   the [`changes::Routes`] from a table's rows to channels.
//! - [`auth`]: JWT verification against a key set, and [`Claims`]; the
//!   server API's keys ([`ApiKeys`]).
//! - [`policy`]: channel and row policies decided from claims, and their
//!   rule language ([`policy::expr`]).
//! - [`membership`]: membership sets (`member.<name>` in rules), the
//!   [`membership::Members`] an edge reads them through and the mirror's
//!   key layout.
//! - [`presence`]: [`PresenceSet`], one channel's presences with Phoenix
//!   `presence_state` / `presence_diff` semantics.
//! - [`limits`]: the [`Limits`] on everything a client controls.
//! - [`metric`]: [`metric::Metric`], how a crate declares the metrics it emits.
//!
//! # What it does not do
//! `fanout-core` does no I/O: it knows nothing about sockets, NATS, Redis or
//! Postgres, and it starts no tasks (reading the wall clock is the one thing
//! it asks of the system). That keeps it fast to test and lets every
//! transport share one definition of the rules.

pub mod auth;
pub mod changes;
pub mod channel;
pub mod ephemeral;
pub mod event;
pub mod limits;
pub mod membership;
pub mod metric;
pub mod policy;
pub mod presence;
pub mod record;

pub use auth::{ApiKeys, ApiScope, AuthError, Claims, JwtVerifier};
pub use channel::{ChannelError, ChannelName, shard_of, subject_token};
pub use ephemeral::Ephemeral;
pub use event::{Event, EventKind, Origin, Position, now_ms};
pub use limits::Limits;
pub use presence::{PresenceDiff, PresenceSet};
pub use record::{ChangeRecord, ChangeType};
