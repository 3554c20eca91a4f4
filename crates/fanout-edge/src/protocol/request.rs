//! What a client asks for: the typed [`Request`] of each decoded message,
//! and the payload types of the Supabase Realtime events.
//!
//! The envelope (refs, topic, event) always decodes first, so an error can be
//! addressed to the push that caused it. A payload that does not fit its
//! event is kept as a [`BadPayload`] inside the request: the connection
//! decides when to report it (a broadcast to a channel the client never
//! joined is refused for that first, as before), and with which reason.

use bytes::Bytes;
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::{Map, Value};

/// A payload that does not fit its event: the reply's reason and the
/// `fanout_client_errors_total` label.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{reason}")]
pub struct BadPayload {
    pub label: &'static str,
    pub reason: String,
}

impl BadPayload {
    fn new(reason: impl Into<String>) -> Self {
        Self {
            label: "bad_payload",
            reason: reason.into(),
        }
    }
}

/// One client message, by event.
#[derive(Debug, Clone, PartialEq)]
pub enum Request {
    /// `heartbeat` on topic `phoenix`.
    Heartbeat,
    Join(Result<Join, BadPayload>),
    Leave,
    Broadcast(Result<Broadcast, BadPayload>),
    Presence(Result<PresenceChange, BadPayload>),
    /// A fresh token for the channel (`access_token` event).
    AccessToken(Result<String, BadPayload>),
    /// Any other event (or any event but `heartbeat` on topic `phoenix`).
    Unknown(String),
}

impl Request {
    /// Interprets a text message's event and JSON payload.
    pub fn parse(topic: &str, event: &str, payload: &RawValue) -> Self {
        if topic == "phoenix" {
            return if event == "heartbeat" {
                Self::Heartbeat
            } else {
                Self::Unknown(event.to_owned())
            };
        }
        match event {
            "phx_join" => Self::Join(
                serde_json::from_str(payload.get())
                    .map_err(|e| BadPayload::new(format!("invalid phx_join payload: {e}"))),
            ),
            "phx_leave" => Self::Leave,
            "broadcast" => Self::Broadcast(Broadcast::from_json(payload)),
            "presence" => Self::Presence(PresenceChange::from_json(payload)),
            "access_token" => Self::AccessToken(access_token(payload)),
            other => Self::Unknown(other.to_owned()),
        }
    }
}

/// A broadcast the client sends: user event, and payload as JSON text or
/// (from a binary frame) raw bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Broadcast {
    pub event: String,
    pub payload: Bytes,
    pub binary: bool,
}

impl Broadcast {
    /// Event names travel in one length byte of the binary frames.
    const MAX_EVENT_BYTES: usize = 255;

    /// A broadcast from a binary kind-3 frame (already validated).
    pub fn checked(event: String, payload: Bytes, binary: bool) -> Result<Self, BadPayload> {
        if event.len() > Self::MAX_EVENT_BYTES {
            return Err(BadPayload::new("broadcast event name is longer than 255 bytes"));
        }
        Ok(Self { event, payload, binary })
    }

    /// `{"type": "broadcast", "event", "payload"}`.
    fn from_json(raw: &RawValue) -> Result<Self, BadPayload> {
        #[derive(Deserialize)]
        struct Wire<'a> {
            r#type: String,
            event: String,
            #[serde(borrow, default)]
            payload: Option<&'a RawValue>,
        }
        let b: Wire<'_> =
            serde_json::from_str(raw.get()).map_err(|e| BadPayload::new(format!("invalid broadcast payload: {e}")))?;
        if b.r#type != "broadcast" {
            return Err(BadPayload::new("broadcast payload must have type \"broadcast\""));
        }
        let payload = b.payload.map_or_else(
            || Bytes::from_static(b"{}"),
            |p| Bytes::copy_from_slice(p.get().as_bytes()),
        );
        Self::checked(b.event, payload, false)
    }
}

/// `presence` with `{"type": "presence", "event": "track" | "untrack", "payload"}`.
#[derive(Debug, Clone, PartialEq)]
pub enum PresenceChange {
    Track(Map<String, Value>),
    Untrack,
}

impl PresenceChange {
    fn from_json(raw: &RawValue) -> Result<Self, BadPayload> {
        #[derive(Deserialize)]
        struct Wire {
            event: String,
            #[serde(default)]
            payload: Option<Value>,
        }
        let p: Wire =
            serde_json::from_str(raw.get()).map_err(|e| BadPayload::new(format!("invalid presence payload: {e}")))?;
        match p.event.as_str() {
            "track" => match p.payload {
                None => Ok(Self::Track(Map::new())),
                Some(Value::Object(o)) => Ok(Self::Track(o)),
                Some(_) => Err(BadPayload::new("presence track payload must be a JSON object")),
            },
            "untrack" => Ok(Self::Untrack),
            other => Err(BadPayload {
                label: "unknown_event",
                reason: format!("unknown presence event {other:?}; expected track or untrack"),
            }),
        }
    }
}

fn access_token(raw: &RawValue) -> Result<String, BadPayload> {
    #[derive(Deserialize)]
    struct Wire {
        access_token: Option<String>,
    }
    serde_json::from_str::<Wire>(raw.get())
        .ok()
        .and_then(|p| p.access_token)
        .ok_or_else(|| BadPayload::new("access_token payload must be {\"access_token\": \"<jwt>\"}"))
}

/// The `phx_join` payload.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Join {
    #[serde(default)]
    pub config: JoinConfig,
    #[serde(default)]
    pub access_token: Option<String>,
}

/// `config` of a join.
#[derive(Debug, Clone, PartialEq, Deserialize, Default)]
pub struct JoinConfig {
    #[serde(default)]
    pub broadcast: BroadcastConfig,
    #[serde(default)]
    pub presence: PresenceConfig,
    /// The bindings as sent: the reply echoes each one (realtime-js compares
    /// them field by field), so they are kept as JSON; see [`BindingSpec`].
    #[serde(default)]
    pub postgres_changes: Vec<Value>,
    #[serde(default)]
    pub private: bool,
    /// fanout's extension: replay what came after a position.
    #[serde(default)]
    pub resume: Option<ResumeConfig>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Default)]
pub struct BroadcastConfig {
    #[serde(default)]
    pub ack: bool,
    /// Receive one's own broadcasts.
    #[serde(default, rename = "self")]
    pub self_: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Default)]
pub struct PresenceConfig {
    #[serde(default)]
    pub key: Option<String>,
    #[serde(default)]
    pub enabled: Option<bool>,
}

/// `config.resume`: `{"after": "<position>"}` (a string, or a number).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct ResumeConfig {
    #[serde(deserialize_with = "de_position")]
    pub after: String,
}

fn de_position<'de, D: serde::Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum P {
        S(String),
        N(u64),
    }
    Ok(match P::deserialize(d)? {
        P::S(s) => s,
        P::N(n) => n.to_string(),
    })
}

/// One `postgres_changes` binding as realtime-js sends it.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct BindingSpec {
    pub event: String,
    pub schema: String,
    #[serde(default)]
    pub table: Option<String>,
    #[serde(default)]
    pub filter: Option<String>,
}

impl BindingSpec {
    /// A binding from one element of `config.postgres_changes`, which must
    /// be an object (serde would also take an array of the fields in order,
    /// and the join reply could not echo it with its id).
    pub fn from_value(value: &Value) -> Result<Self, serde_json::Error> {
        if !value.is_object() {
            return Err(serde::de::Error::custom(
                "expected an object {event, schema, table, filter}",
            ));
        }
        Self::deserialize(value)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(topic: &str, event: &str, payload: &str) -> Request {
        let raw: Box<RawValue> = serde_json::from_str(payload).unwrap();
        Request::parse(topic, event, &raw)
    }

    fn bad(r: Request) -> BadPayload {
        match r {
            Request::Join(Err(e))
            | Request::Broadcast(Err(e))
            | Request::Presence(Err(e))
            | Request::AccessToken(Err(e)) => e,
            other => panic!("not a bad payload: {other:?}"),
        }
    }

    #[test]
    fn events_by_topic() {
        assert_eq!(parse("phoenix", "heartbeat", "{}"), Request::Heartbeat);
        assert_eq!(parse("phoenix", "phx_join", "{}"), Request::Unknown("phx_join".into()));
        assert_eq!(
            parse("realtime:a", "heartbeat", "{}"),
            Request::Unknown("heartbeat".into())
        );
        assert_eq!(parse("realtime:a", "phx_leave", "{}"), Request::Leave);
        assert_eq!(parse("realtime:a", "nope", "{}"), Request::Unknown("nope".into()));
    }

    #[test]
    fn join_config_with_defaults_and_resume() {
        let Request::Join(Ok(j)) = parse(
            "realtime:a",
            "phx_join",
            r#"{"config":{"broadcast":{"self":true},"presence":{"key":"k"},"resume":{"after":7}},"access_token":"t"}"#,
        ) else {
            panic!("join")
        };
        assert!(j.config.broadcast.self_ && !j.config.broadcast.ack);
        assert_eq!(j.config.presence.key.as_deref(), Some("k"));
        assert_eq!(j.config.resume.unwrap().after, "7");
        assert_eq!(j.access_token.as_deref(), Some("t"));
        let Request::Join(Ok(empty)) = parse("realtime:a", "phx_join", "{}") else {
            panic!("join")
        };
        assert_eq!(empty.config, JoinConfig::default());
        assert!(
            bad(parse("realtime:a", "phx_join", "3"))
                .reason
                .starts_with("invalid phx_join payload")
        );
    }

    #[test]
    fn broadcasts() {
        let Request::Broadcast(Ok(b)) = parse(
            "realtime:a",
            "broadcast",
            r#"{"type":"broadcast","event":"chat","payload":{"t":1}}"#,
        ) else {
            panic!("broadcast")
        };
        assert_eq!(
            (b.event.as_str(), &b.payload[..], b.binary),
            ("chat", &br#"{"t":1}"#[..], false)
        );
        let Request::Broadcast(Ok(b)) = parse("realtime:a", "broadcast", r#"{"type":"broadcast","event":"e"}"#) else {
            panic!("broadcast")
        };
        assert_eq!(&b.payload[..], b"{}", "a missing payload is an empty object");
        let e = bad(parse("realtime:a", "broadcast", r#"{"type":"presence","event":"e"}"#));
        assert_eq!(e.reason, "broadcast payload must have type \"broadcast\"");
        let long = format!(r#"{{"type":"broadcast","event":"{}"}}"#, "x".repeat(256));
        assert_eq!(
            bad(parse("realtime:a", "broadcast", &long)).reason,
            "broadcast event name is longer than 255 bytes"
        );
        assert_eq!(bad(parse("realtime:a", "broadcast", "3")).label, "bad_payload");
    }

    #[test]
    fn presence_and_tokens() {
        assert_eq!(
            parse(
                "realtime:a",
                "presence",
                r#"{"type":"presence","event":"track","payload":{"n":1}}"#
            ),
            Request::Presence(Ok(PresenceChange::Track(
                serde_json::json!({"n": 1}).as_object().cloned().unwrap()
            )))
        );
        assert_eq!(
            parse("realtime:a", "presence", r#"{"type":"presence","event":"untrack"}"#),
            Request::Presence(Ok(PresenceChange::Untrack))
        );
        let e = bad(parse("realtime:a", "presence", r#"{"event":"wave"}"#));
        assert_eq!(e.label, "unknown_event");
        let e = bad(parse("realtime:a", "presence", r#"{"event":"track","payload":[1]}"#));
        assert_eq!(e.reason, "presence track payload must be a JSON object");
        assert_eq!(
            parse("realtime:a", "access_token", r#"{"access_token":"jwt"}"#),
            Request::AccessToken(Ok("jwt".into()))
        );
        assert!(
            bad(parse("realtime:a", "access_token", "{}"))
                .reason
                .contains("access_token payload must be")
        );
    }

    #[test]
    fn binding_specs() {
        let v = serde_json::json!({"event": "*", "schema": "public", "table": "t", "filter": "id=eq.1"});
        let b = BindingSpec::from_value(&v).unwrap();
        assert_eq!((b.table.as_deref(), b.filter.as_deref()), (Some("t"), Some("id=eq.1")));
        assert!(BindingSpec::from_value(&serde_json::json!({"event": "*"})).is_err());
    }

    /// Found by reading while writing the `join_config` fuzz target, whose
    /// property (the reply echoes each binding with its id) fails on it: an
    /// array of the fields in order was taken as a binding, and its echo in
    /// the join reply had no id.
    #[test]
    fn a_binding_is_an_object() {
        let e = BindingSpec::from_value(&serde_json::json!(["*", "public", "t", "id=eq.1"])).unwrap_err();
        assert_eq!(e.to_string(), "expected an object {event, schema, table, filter}");
        assert!(BindingSpec::from_value(&serde_json::json!("*")).is_err());
    }
}
