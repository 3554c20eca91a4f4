//! Entry points for the fuzz targets in `fuzz/` (cargo feature `fuzzing`,
//! off by default): the pure parts of the connection and the REST API that
//! are otherwise private. Not part of the crate's API; the decoders the
//! targets also use ([`crate::protocol`]) are public already.

use fanout_core::changes::{Binding, Routes};
use fanout_core::{ChannelName, Event};

pub use crate::reader::{FrameReader, Incoming};

/// The body of `POST /realtime/v1/api/broadcast` as the handler parses it:
/// the events it would publish, or the 400 response's reason.
pub fn rest_broadcast_body(body: &[u8]) -> Result<Vec<Event>, String> {
    crate::http::parse_rest_broadcast(body).map_err(|e| e.to_string())
}

/// A join's `postgres_changes` bindings as the connection validates them.
#[derive(Debug)]
pub struct JoinBindings {
    /// The join reply's `postgres_changes` list.
    pub reply: Vec<serde_json::Value>,
    /// Bindings served by the joined channel itself.
    pub own: Vec<Binding>,
    /// Bindings served by other channels' change feeds.
    pub feeds: Vec<(ChannelName, Vec<Binding>)>,
}

/// Validates `config.postgres_changes` of a join to `channel`, as the
/// connection does (`routes` is `None` when no change stream runs).
pub fn join_bindings(
    routes: Option<&Routes>,
    channel: &ChannelName,
    raw: &[serde_json::Value],
) -> Result<JoinBindings, String> {
    crate::conn::parse_bindings(routes, channel, raw).map(|b| JoinBindings {
        reply: b.reply,
        own: b.own,
        feeds: b.feeds,
    })
}
