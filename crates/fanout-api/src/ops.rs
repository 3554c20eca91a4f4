//! The operations of the server API, free of any transport: gRPC
//! ([`crate::grpc`]) and HTTP JSON ([`crate::http`]) both parse their
//! requests into these calls and render what they answer.
//!
//! A publish here is a client broadcast without a client: the same
//! [`Event::broadcast`] (no origin, no sender) on the same [`Bus`], so it
//! gets a position, reaches every edge in channel order and is resumable.

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use fanout_bus::{Bus, BusError, Command, Control, History, HistoryQuery, NodeReport, PresenceStore, Published};
use fanout_core::{ApiKeys, ApiScope, ChannelName, Event, Position, subject_token};
use serde_json::Value;

/// Why a call failed. Each kind is one result code in the metrics, one gRPC
/// status and one HTTP status.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    Unauthenticated(&'static str),
    #[error("{0}")]
    PermissionDenied(String),
    #[error("{0}")]
    InvalidArgument(String),
    /// A history read after a position that is no longer retained.
    #[error("{0}")]
    OutOfRange(String),
    #[error("{0}")]
    Unavailable(String),
}

/// Every result code of a call, as labelled in `fanout_api_requests_total`.
pub const CODES: &[&str] = &[
    "ok",
    "unauthenticated",
    "permission_denied",
    "invalid_argument",
    "out_of_range",
    "unavailable",
];

impl ApiError {
    /// The result code (the metrics label).
    pub fn code(&self) -> &'static str {
        match self {
            Self::Unauthenticated(_) => "unauthenticated",
            Self::PermissionDenied(_) => "permission_denied",
            Self::InvalidArgument(_) => "invalid_argument",
            Self::OutOfRange(_) => "out_of_range",
            Self::Unavailable(_) => "unavailable",
        }
    }
}

impl From<BusError> for ApiError {
    fn from(e: BusError) -> Self {
        match e {
            BusError::Unavailable(m) => Self::Unavailable(format!("bus unavailable: {m}")),
            BusError::Rejected(m) => Self::InvalidArgument(format!("the bus refused the message: {m}")),
        }
    }
}

/// Every method of the API, as labelled in the metrics.
pub const METHODS: &[&str] = &[
    "publish",
    "broadcast",
    "publish_stream",
    "history",
    "presence",
    "presence_stats",
    "channels",
    "info",
    "disconnect",
    "unsubscribe",
];

/// A message's payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Payload {
    /// JSON text (checked to be one JSON value).
    Json(Bytes),
    /// Raw bytes (only vsn 2.0.0 clients receive them).
    Binary(Bytes),
}

/// A checked message, ready for the bus.
#[derive(Debug, Clone)]
pub struct Message {
    event: Event,
    dedupe_id: Option<String>,
}

/// The longest idempotency key.
pub const MAX_IDEMPOTENCY_KEY: usize = 128;
/// The longest event name (a vsn 2.0.0 frame carries it in one byte).
const MAX_EVENT_NAME: usize = 255;
/// History answers at most this many messages.
pub const MAX_HISTORY: usize = 1000;
/// History answers this many when no limit is given.
pub const DEFAULT_HISTORY: usize = 100;

/// A page of history, oldest first.
#[derive(Debug, Clone, PartialEq)]
pub struct HistoryPage {
    pub messages: Vec<Event>,
    /// The channel's newest position.
    pub position: Position,
}

/// Presence counts of a channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PresenceStats {
    /// Tracked presences, one per connection.
    pub clients: u32,
    /// Distinct presence keys.
    pub users: u32,
}

/// A channel with subscribers somewhere in the cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChannelCount {
    pub channel: ChannelName,
    /// Subscribed connections, summed over the edges that answered.
    pub subscribers: u64,
}

/// The answer to a command that reached every edge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cluster<T> {
    pub value: T,
    /// How many edges answered.
    pub edges: u32,
}

/// Channels answers at most this many.
pub const MAX_CHANNELS: usize = 10_000;
/// Channels answers this many when no limit is given.
pub const DEFAULT_CHANNELS: usize = 100;
/// The longest reason a disconnect or unsubscribe may give (a close
/// frame carries 123 bytes).
pub const MAX_REASON: usize = 123;

/// The server API over one process's seams.
pub struct Api {
    bus: Arc<dyn Bus>,
    presence: Arc<dyn PresenceStore>,
    control: Arc<dyn Control>,
    keys: ApiKeys,
    max_payload: usize,
}

impl std::fmt::Debug for Api {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Api")
            .field("keys", &self.keys)
            .field("max_payload", &self.max_payload)
            .finish_non_exhaustive()
    }
}

impl Api {
    /// An API publishing on `bus`, reading `presence` and commanding the
    /// edges through `control`, for callers with one of `keys`; payloads up
    /// to `max_payload` bytes.
    pub fn new(
        bus: Arc<dyn Bus>,
        presence: Arc<dyn PresenceStore>,
        control: Arc<dyn Control>,
        keys: ApiKeys,
        max_payload: usize,
    ) -> Self {
        Self {
            bus,
            presence,
            control,
            keys,
            max_payload,
        }
    }

    async fn ask(&self, command: Command) -> Result<Vec<NodeReport>, ApiError> {
        Ok(self.control.ask(command).await?)
    }

    /// Channels with subscribers on any edge, busiest first, those matching
    /// `pattern` (`*` for any run of characters) when it is not empty.
    pub async fn channels(&self, pattern: &str, limit: Option<usize>) -> Result<Cluster<Vec<ChannelCount>>, ApiError> {
        let limit = limit_within(limit, DEFAULT_CHANNELS, MAX_CHANNELS)?;
        let reports = self.ask(Command::Channels).await?;
        let mut totals: std::collections::HashMap<String, u64> = std::collections::HashMap::new();
        for r in &reports {
            for (channel, n) in &r.members {
                *totals.entry(channel.clone()).or_default() += n;
            }
        }
        let mut channels: Vec<ChannelCount> = totals
            .into_iter()
            .filter_map(|(c, subscribers)| {
                let channel = ChannelName::from_internal(&c).ok()?;
                (pattern.is_empty() || fanout_core::channel::glob(pattern, channel.name()))
                    .then_some(ChannelCount { channel, subscribers })
            })
            .collect();
        channels.sort_by(|a, b| {
            b.subscribers
                .cmp(&a.subscribers)
                .then_with(|| a.channel.as_str().cmp(b.channel.as_str()))
        });
        channels.truncate(limit);
        Ok(Cluster {
            value: channels,
            edges: reports.len() as u32,
        })
    }

    /// The edges that answered, sorted by node id.
    pub async fn info(&self) -> Result<Vec<NodeReport>, ApiError> {
        let mut reports = self.ask(Command::Info).await?;
        reports.sort_by(|a, b| a.node.cmp(&b.node));
        Ok(reports)
    }

    /// Closes every connection of `sub` on every edge; how many.
    pub async fn disconnect(&self, sub: &str, reason: &str, reconnect: bool) -> Result<Cluster<u64>, ApiError> {
        let (sub, reason) = (check_sub(sub)?, check_reason(reason)?);
        Ok(affected(
            &self.ask(Command::Disconnect { sub, reason, reconnect }).await?,
        ))
    }

    /// Ends `sub`'s membership of a channel on every edge; on how many
    /// connections.
    pub async fn unsubscribe(
        &self,
        sub: &str,
        channel: &str,
        private: bool,
        reason: &str,
    ) -> Result<Cluster<u64>, ApiError> {
        let (sub, reason) = (check_sub(sub)?, check_reason(reason)?);
        let channel = channel_name(channel, private)?.as_str().to_owned();
        Ok(affected(
            &self.ask(Command::Unsubscribe { sub, channel, reason }).await?,
        ))
    }

    /// The largest request body the HTTP routes read: room for a payload of
    /// the maximum size in base64 or escaped JSON, and the fields around it.
    pub fn max_body(&self) -> usize {
        self.max_payload * 2 + 64 * 1024
    }

    /// Checks an `Authorization` header value (`Bearer <key>`) for an
    /// operation that needs `needed`.
    pub fn authorize(&self, authorization: Option<&str>, needed: ApiScope) -> Result<(), ApiError> {
        let Some(value) = authorization else {
            return Err(ApiError::Unauthenticated(
                "missing API key: send Authorization: Bearer <key>",
            ));
        };
        let Some(key) = value.strip_prefix("Bearer ").or_else(|| value.strip_prefix("bearer ")) else {
            return Err(ApiError::Unauthenticated(
                "the Authorization header must be Bearer <key>",
            ));
        };
        match self.keys.scope_of(key.trim()) {
            None => Err(ApiError::Unauthenticated("unknown API key")),
            Some(scope) if scope.allows(needed) => Ok(()),
            Some(scope) => Err(ApiError::PermissionDenied(format!(
                "this API key may only {}; the call needs a {} key",
                match scope {
                    ApiScope::Publish => "publish",
                    ApiScope::Read => "read",
                    ApiScope::All => "do everything",
                },
                needed.as_str()
            ))),
        }
    }

    /// Checks one message: the channel name, the event name, the payload
    /// (valid JSON, within the size limit) and the idempotency key.
    pub fn message(
        &self,
        channel: &str,
        private: bool,
        event: &str,
        payload: Payload,
        idempotency_key: &str,
    ) -> Result<Message, ApiError> {
        let channel = channel_name(channel, private)?;
        if event.is_empty() || event.len() > MAX_EVENT_NAME {
            return Err(ApiError::InvalidArgument(format!(
                "event must be 1 to {MAX_EVENT_NAME} bytes"
            )));
        }
        let (bytes, binary) = match payload {
            Payload::Json(text) => {
                if serde_json::from_slice::<&serde_json::value::RawValue>(&text).is_err() {
                    return Err(ApiError::InvalidArgument("payload is not valid JSON".into()));
                }
                (text, false)
            }
            Payload::Binary(b) => (b, true),
        };
        if bytes.len() > self.max_payload {
            return Err(ApiError::InvalidArgument(format!(
                "payload is {} bytes; at most {} are allowed",
                bytes.len(),
                self.max_payload
            )));
        }
        let dedupe_id = match idempotency_key {
            "" => None,
            key if key.len() > MAX_IDEMPOTENCY_KEY || !key.bytes().all(|b| b.is_ascii_graphic()) => {
                return Err(ApiError::InvalidArgument(format!(
                    "idempotency_key must be 1 to {MAX_IDEMPOTENCY_KEY} printable ASCII characters"
                )));
            }
            // Keys are per channel: the same key on two channels is two
            // messages (a stream holds many channels, and deduplicates by id
            // across all of them).
            key => Some(format!("api.{}.{key}", subject_token(channel.as_str()))),
        };
        Ok(Message {
            event: Event::broadcast(channel, event, bytes, binary, None),
            dedupe_id,
        })
    }

    /// Publishes one message.
    pub async fn publish_one(&self, message: Message) -> Result<Published, ApiError> {
        self.publish(vec![message])
            .await
            .pop()
            .unwrap_or_else(|| Err(ApiError::Unavailable("the bus gave no answer".into())))
    }

    /// Publishes one payload to each of `channels`: every channel is
    /// checked before any is published; then one answer per channel, in
    /// order.
    pub async fn broadcast(
        &self,
        channels: &[String],
        private: bool,
        event: &str,
        payload: Payload,
        idempotency_key: &str,
    ) -> Result<Vec<Result<Published, ApiError>>, ApiError> {
        if channels.is_empty() {
            return Err(ApiError::InvalidArgument("channels is empty".into()));
        }
        let messages = channels
            .iter()
            .map(|c| self.message(c, private, event, payload.clone(), idempotency_key))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(self.publish(messages).await)
    }

    /// Publishes `messages` in order; one answer each, in order.
    pub async fn publish(&self, messages: Vec<Message>) -> Vec<Result<Published, ApiError>> {
        let batch = messages.into_iter().map(|m| (m.dedupe_id, m.event)).collect();
        self.bus
            .publish_batch(batch)
            .await
            .into_iter()
            .map(|r| r.map_err(ApiError::from))
            .collect()
    }

    /// The last `limit` messages of a channel, or the first `limit` after
    /// `after`, from the history resume replays.
    pub async fn history(
        &self,
        channel: &str,
        private: bool,
        limit: Option<usize>,
        after: Option<&str>,
    ) -> Result<HistoryPage, ApiError> {
        let channel = channel_name(channel, private)?;
        let limit = limit_within(limit, DEFAULT_HISTORY, MAX_HISTORY)?;
        let query = match after.filter(|a| !a.is_empty()) {
            None => HistoryQuery::Last { limit },
            Some(a) => HistoryQuery::After {
                after: parse_position(a)?,
                limit,
            },
        };
        match self.bus.history(channel, query).await? {
            History::Events { events, head } => Ok(HistoryPage {
                messages: events,
                position: head,
            }),
            History::Expired { head } => Err(ApiError::OutOfRange(format!(
                "position {} is not in the channel's history: older than what it retains, or newer than its newest ({head}); read the last messages instead",
                after.unwrap_or_default()
            ))),
        }
    }

    /// A channel's presences in `presence_state` shape:
    /// `{key: {metas: [{phx_ref, ...meta}]}}`.
    pub async fn presence(&self, channel: &str, private: bool) -> Result<Value, ApiError> {
        let channel = channel_name(channel, private)?;
        self.presence
            .state(&channel)
            .await
            .map_err(|e| ApiError::Unavailable(e.to_string()))
    }

    /// How many connections and distinct keys are present in a channel.
    pub async fn presence_stats(&self, channel: &str, private: bool) -> Result<PresenceStats, ApiError> {
        let state = self.presence(channel, private).await?;
        let keys = state.as_object().map_or(0, |o| o.len());
        let clients: usize = state.as_object().map_or(0, |o| {
            o.values().map(|v| v["metas"].as_array().map_or(0, Vec::len)).sum()
        });
        Ok(PresenceStats {
            clients: clients as u32,
            users: keys as u32,
        })
    }
}

/// A request's `limit`: `default` when none (or 0) is given, refused above
/// `max`.
fn limit_within(limit: Option<usize>, default: usize, max: usize) -> Result<usize, ApiError> {
    match limit {
        None | Some(0) => Ok(default),
        Some(n) if n > max => Err(ApiError::InvalidArgument(format!("limit is at most {max}"))),
        Some(n) => Ok(n),
    }
}

/// How many connections a disconnect or unsubscribe applied to, over the
/// edges that answered.
fn affected(reports: &[NodeReport]) -> Cluster<u64> {
    Cluster {
        value: reports.iter().map(|r| r.affected).sum(),
        edges: reports.len() as u32,
    }
}

fn check_sub(sub: &str) -> Result<String, ApiError> {
    if sub.is_empty() || sub.len() > 256 {
        return Err(ApiError::InvalidArgument("sub must be 1 to 256 bytes".into()));
    }
    Ok(sub.to_owned())
}

fn check_reason(reason: &str) -> Result<String, ApiError> {
    if reason.len() > MAX_REASON {
        return Err(ApiError::InvalidArgument(format!(
            "reason is at most {MAX_REASON} bytes (a WebSocket close frame carries no more)"
        )));
    }
    Ok(reason.to_owned())
}

/// A channel as clients name it (without `realtime:`).
fn channel_name(name: &str, private: bool) -> Result<ChannelName, ApiError> {
    if name.starts_with("realtime:") {
        return Err(ApiError::InvalidArgument(format!(
            "channel {name:?}: give the name without the realtime: prefix"
        )));
    }
    ChannelName::new(name)
        .map(|c| c.with_privacy(private))
        .map_err(|e| ApiError::InvalidArgument(format!("channel {name:?}: {e}")))
}

/// A position as the API writes it: a decimal number.
pub fn parse_position(s: &str) -> Result<Position, ApiError> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return Err(ApiError::InvalidArgument(format!(
            "position {s:?} is not a decimal number"
        )));
    }
    s.parse()
        .map_err(|_| ApiError::InvalidArgument(format!("position {s:?} is out of range")))
}

/// Counts one call of `method` with its result in the metrics.
pub fn count(method: &'static str, started: Instant, result: Result<(), &ApiError>) {
    let code = result.map_or_else(ApiError::code, |()| "ok");
    metrics::counter!("fanout_api_requests_total", "method" => method, "code" => code).increment(1);
    metrics::histogram!("fanout_api_request_seconds", "method" => method).record(started.elapsed().as_secs_f64());
}

#[cfg(test)]
mod tests {
    use super::*;
    use fanout_bus::{MemoryBus, MemoryPresence, Retention};

    fn api() -> Api {
        let keys = ApiKeys::parse(["all:0123456789abcdef-all", "read:0123456789abcdef-read"]).unwrap();
        Api::new(
            Arc::new(MemoryBus::new(Retention::default())),
            Arc::new(MemoryPresence::new(1)),
            Arc::new(fanout_bus::MemoryControl::default()),
            keys,
            64,
        )
    }

    #[test]
    fn keys_and_scopes() {
        let api = api();
        assert!(
            api.authorize(Some("Bearer 0123456789abcdef-all"), ApiScope::All)
                .is_ok()
        );
        assert!(
            api.authorize(Some("Bearer 0123456789abcdef-read"), ApiScope::Read)
                .is_ok()
        );
        assert_eq!(
            api.authorize(Some("Bearer 0123456789abcdef-read"), ApiScope::Publish)
                .unwrap_err()
                .code(),
            "permission_denied"
        );
        for bad in [None, Some("0123456789abcdef-all"), Some("Bearer nope"), Some("Basic x")] {
            assert_eq!(
                api.authorize(bad, ApiScope::Read).unwrap_err().code(),
                "unauthenticated",
                "{bad:?}"
            );
        }
    }

    #[test]
    fn messages_are_checked() {
        let api = api();
        let json = |s: &'static str| Payload::Json(Bytes::from_static(s.as_bytes()));
        assert!(api.message("workshop:42", false, "e", json("{\"a\":1}"), "").is_ok());
        let bad = |r: Result<Message, ApiError>| r.unwrap_err().to_string();
        assert!(bad(api.message("", false, "e", json("{}"), "")).contains("channel"));
        assert!(bad(api.message("realtime:x", false, "e", json("{}"), "")).contains("without the realtime: prefix"));
        assert!(bad(api.message("x", false, "", json("{}"), "")).contains("event"));
        assert!(bad(api.message("x", false, "e", json("{nope"), "")).contains("not valid JSON"));
        let big = Payload::Binary(Bytes::from(vec![0u8; 65]));
        assert!(bad(api.message("x", false, "e", big, "")).contains("at most 64"));
        assert!(bad(api.message("x", false, "e", json("1"), "has space")).contains("idempotency_key"));
        let long = "k".repeat(MAX_IDEMPOTENCY_KEY + 1);
        assert!(bad(api.message("x", false, "e", json("1"), &long)).contains("idempotency_key"));
        assert_eq!(parse_position("12").unwrap(), 12);
        for p in ["", "+5", "-1", "1.0", "99999999999999999999999"] {
            assert!(parse_position(p).is_err(), "{p}");
        }
    }

    #[tokio::test]
    async fn publish_deduplicates_per_channel_and_history_reads_it() {
        let api = api();
        let msg = |ch: &str, n: u32, key: &str| {
            api.message(ch, false, "e", Payload::Json(Bytes::from(n.to_string())), key)
                .unwrap()
        };
        let answers = api
            .publish(vec![
                msg("a", 1, "k"),
                msg("a", 2, ""),
                msg("a", 1, "k"),
                msg("b", 1, "k"),
            ])
            .await;
        let got: Vec<(u64, bool)> = answers
            .into_iter()
            .map(|r| r.map(|p| (p.position, p.duplicate)).unwrap())
            .collect();
        assert_eq!(got, vec![(1, false), (2, false), (1, true), (1, false)]);
        let page = api.history("a", false, None, None).await.unwrap();
        assert_eq!(page.position, 2);
        let payloads: Vec<_> = page.messages.iter().map(|e| e.payload.clone()).collect();
        assert_eq!(payloads, vec![Bytes::from("1"), Bytes::from("2")]);
        let after = api.history("a", false, Some(10), Some("1")).await.unwrap();
        assert_eq!(after.messages.len(), 1);
        assert_eq!(
            api.history("a", false, Some(5000), None).await.unwrap_err().code(),
            "invalid_argument"
        );
        assert_eq!(
            api.history("a", false, None, Some("7")).await.unwrap_err().code(),
            "out_of_range"
        );
        assert!(
            api.history("a", true, None, None).await.unwrap().messages.is_empty(),
            "the private channel of that name is another channel"
        );
    }
}
