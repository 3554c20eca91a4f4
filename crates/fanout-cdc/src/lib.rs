//! The change-data-capture ingester behind `fanout cdc`: PostgreSQL row
//! changes, streamed by logical replication (pgoutput), published to the
//! channels they belong to, exactly once.
//!
//! # Layout
//! - [`pgoutput`]: a decoder for pgoutput protocol version 1 messages.
//! - [`value`]: text-format column values typed as JSON, the way Supabase
//!   Realtime types them (numbers, booleans, objects, ISO timestamps).
//! - [`record`]: row messages to change records (`record`, `old_record`,
//!   `columns`, `errors`), per the table's REPLICA IDENTITY.
//! - [`members`]: the membership sets' mirror: a snapshot consistent with
//!   a temporary slot's position, then the tables' changes from the stream.
//! - [`ingest`]: the replication session: setup checks, slot creation,
//!   standby while another instance holds the slot, group-committed
//!   publishing with deduplication ids, and slot acknowledgement only after
//!   the bus stored every change.
//!
//! Routing of a table's rows to channels is [`fanout_core::changes::Routes`],
//! shared with the edges that subscribe to them. The ingester publishes
//! through the same [`fanout_bus::Bus`] trait as the edges, so
//! standalone runs it in-process over the memory bus and cluster mode over
//! JetStream.

use fanout_core::metric::Metric;

pub mod ingest;
pub mod members;
pub mod pgoutput;
pub mod record;
pub mod value;

pub use ingest::{CdcConfig, CdcError, run};

/// Every metric the ingester emits, for the binary to describe and register
/// at zero when it installs the recorder (see [`fanout_core::metric`]).
pub const METRICS: &[Metric] = &[
    Metric::gauge(
        "fanout_cdc_active",
        "1 while this process streams the replication slot, 0 on standby.",
    ),
    Metric::counter(
        "fanout_cdc_changes_published_total",
        "Row changes published to the bus and acknowledged.",
    ),
    Metric::counter("fanout_cdc_transactions_total", "Transactions published."),
    Metric::histogram(
        "fanout_cdc_commit_to_ack_seconds",
        "From a transaction's commit in PostgreSQL to the bus acknowledging its changes.",
    ),
    Metric::histogram("fanout_cdc_publish_seconds", "Time to publish one group of changes."),
    Metric::gauge(
        "fanout_cdc_confirmed_lsn",
        "The WAL position confirmed to the replication slot.",
    ),
    Metric::counter(
        "fanout_cdc_unroutable_changes_total",
        "Changes of a routed table without the routing column (e.g. deletes without REPLICA IDENTITY FULL).",
    ),
    Metric::counter(
        "fanout_cdc_truncates_skipped_total",
        "Truncate messages skipped (Supabase Realtime does not deliver truncates either).",
    ),
    Metric::gauge(
        "fanout_cdc_membership_rows",
        "Membership rows (user, value) the ingester holds for the mirror.",
    ),
    Metric::histogram(
        "fanout_cdc_membership_load_seconds",
        "Time to read the membership tables' snapshot and write the mirror, per session start.",
    ),
    Metric::counter(
        "fanout_cdc_membership_updates_total",
        "Users whose memberships the ingester rewrote in the mirror.",
    ),
    Metric::counter(
        "fanout_cdc_reconnects_total",
        "Replication sessions that failed with a transient error and were started again.",
    ),
];
