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

pub mod ingest;
pub mod pgoutput;
pub mod record;
pub mod value;

pub use ingest::{CdcConfig, CdcError, run};
