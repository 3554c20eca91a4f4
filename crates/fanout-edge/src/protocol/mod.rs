//! The Supabase Realtime wire protocol (Phoenix Channels serializers).
//!
//! Three inbound shapes are decoded into one [`Inbound`], whose
//! [`Request`] says what the client asks for (see [`request`]):
//! - vsn 1.0.0 text: `{"topic", "event", "payload", "ref", "join_ref"}`;
//! - vsn 2.0.0 text: `[join_ref, ref, topic, event, payload]`;
//! - vsn 2.0.0 binary "user broadcast push" (kind 3), which realtime-js uses
//!   for every `channel.send({type: "broadcast"})`.
//!
//! Outbound frames are encoded per [`Vsn`] by [`Encoder`] ([`encode`]):
//! replies and pushes as JSON (object or array), and broadcasts to vsn 2.0.0
//! clients as binary "user broadcast" frames (kind 4), as the realtime-js
//! serializer expects.

pub mod encode;
pub mod request;

use std::collections::HashMap;

use bytes::Bytes;
use serde::Deserialize;
use serde::de::{self, Deserializer};
use serde_json::value::RawValue;

pub use encode::Encoder;
pub use request::{BadPayload, BindingSpec, Broadcast, Join, JoinConfig, PresenceChange, Request};

/// Protocol version, from the `vsn` query parameter. No `vsn` means 1.0.0.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Vsn {
    V1 = 0,
    V2 = 1,
}

impl Vsn {
    pub fn parse(s: Option<&str>) -> Option<Self> {
        match s {
            None | Some("1.0.0") => Some(Self::V1),
            Some("2.0.0") => Some(Self::V2),
            _ => None,
        }
    }
}

/// Binary frame kinds of the vsn 2.0.0 serializer.
const KIND_USER_BROADCAST_PUSH: u8 = 3;
const KIND_USER_BROADCAST: u8 = 4;
const ENCODING_BINARY: u8 = 0;
const ENCODING_JSON: u8 = 1;

/// Why an inbound frame could not be decoded. The message goes to the client.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("invalid JSON: {0}")]
    Json(String),
    #[error("expected a JSON {0}")]
    Shape(&'static str),
    #[error("binary frame of unknown kind {0}")]
    UnknownKind(u8),
    #[error("binary frame is truncated")]
    Truncated,
    #[error("binary frame field is not UTF-8")]
    NotUtf8,
    #[error("JSON payload is not UTF-8")]
    PayloadNotUtf8,
    #[error("unknown payload encoding {0}")]
    UnknownEncoding(u8),
}

/// A decoded client message: its envelope and what it asks for.
#[derive(Debug, Clone, PartialEq)]
pub struct Inbound {
    pub join_ref: Option<String>,
    pub r#ref: Option<String>,
    pub topic: String,
    pub request: Request,
}

/// Accepts a ref as a string, a number or null (clients send strings; be
/// lenient with numbers, which some hand-written clients send).
fn de_ref<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Ref {
        S(String),
        N(serde_json::Number),
    }
    Ok(match Option::<Ref>::deserialize(d)? {
        None => None,
        Some(Ref::S(s)) => Some(s),
        Some(Ref::N(n)) => Some(n.to_string()),
    })
}

#[derive(Deserialize)]
struct V1Message {
    topic: String,
    event: String,
    payload: Box<RawValue>,
    #[serde(default, rename = "ref", deserialize_with = "de_ref")]
    r#ref: Option<String>,
    #[serde(default, deserialize_with = "de_ref")]
    join_ref: Option<String>,
}

/// A [`V1Message`] that must be a JSON object (a derived struct would also
/// take an array of its fields in order, a shape no client sends and that
/// [`peek_refs`] does not read).
struct V1Object(V1Message);

impl<'de> Deserialize<'de> for V1Object {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> de::Visitor<'de> for Visitor {
            type Value = V1Object;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("an object {topic, event, payload, ref, join_ref}")
            }
            fn visit_map<A: de::MapAccess<'de>>(self, map: A) -> Result<V1Object, A::Error> {
                V1Message::deserialize(de::value::MapAccessDeserializer::new(map)).map(V1Object)
            }
        }
        d.deserialize_map(Visitor)
    }
}

struct V2Message(Inbound);

impl<'de> Deserialize<'de> for V2Message {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> de::Visitor<'de> for Visitor {
            type Value = V2Message;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("[join_ref, ref, topic, event, payload]")
            }
            fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<V2Message, A::Error> {
                #[derive(Deserialize)]
                struct R(#[serde(deserialize_with = "de_ref")] Option<String>);
                let missing = || de::Error::custom("expected [join_ref, ref, topic, event, payload]");
                let join_ref = seq.next_element::<R>()?.ok_or_else(missing)?.0;
                let r#ref = seq.next_element::<R>()?.ok_or_else(missing)?.0;
                let topic: String = seq.next_element()?.ok_or_else(missing)?;
                let event: String = seq.next_element()?.ok_or_else(missing)?;
                let payload: Box<RawValue> = seq.next_element()?.ok_or_else(missing)?;
                if seq.next_element::<de::IgnoredAny>()?.is_some() {
                    return Err(missing());
                }
                let request = Request::parse(&topic, &event, &payload);
                Ok(V2Message(Inbound {
                    join_ref,
                    r#ref,
                    topic,
                    request,
                }))
            }
        }
        d.deserialize_seq(Visitor)
    }
}

/// Decodes a text frame.
pub fn decode_text(vsn: Vsn, text: &[u8]) -> Result<Inbound, DecodeError> {
    match vsn {
        Vsn::V1 => {
            let V1Object(m) =
                serde_json::from_slice(text).map_err(|e| shape_or_json(e, "object {topic, event, payload, ref}"))?;
            let request = Request::parse(&m.topic, &m.event, &m.payload);
            Ok(Inbound {
                join_ref: m.join_ref,
                r#ref: m.r#ref,
                topic: m.topic,
                request,
            })
        }
        Vsn::V2 => serde_json::from_slice::<V2Message>(text)
            .map(|m| m.0)
            .map_err(|e| shape_or_json(e, "array [join_ref, ref, topic, event, payload]")),
    }
}

fn shape_or_json(e: serde_json::Error, shape: &'static str) -> DecodeError {
    match e.classify() {
        serde_json::error::Category::Data => DecodeError::Shape(shape),
        _ => DecodeError::Json(e.to_string()),
    }
}

/// Decodes a binary frame (vsn 2.0.0 kind 3, "user broadcast push"):
/// `kind, join_ref_len, ref_len, topic_len, event_len, meta_len, encoding`,
/// then the strings, the metadata and the payload.
pub fn decode_binary(buf: &[u8]) -> Result<Inbound, DecodeError> {
    let (&kind, _) = buf.split_first().ok_or(DecodeError::Truncated)?;
    if kind != KIND_USER_BROADCAST_PUSH {
        return Err(DecodeError::UnknownKind(kind));
    }
    if buf.len() < 7 {
        return Err(DecodeError::Truncated);
    }
    let lens = [buf[1], buf[2], buf[3], buf[4], buf[5]].map(usize::from);
    let encoding = buf[6];
    let mut at = 7;
    let mut field = |len: usize| -> Result<&[u8], DecodeError> {
        let s = buf.get(at..at + len).ok_or(DecodeError::Truncated)?;
        at += len;
        Ok(s)
    };
    let text = |b: &[u8]| {
        std::str::from_utf8(b)
            .map(str::to_owned)
            .map_err(|_| DecodeError::NotUtf8)
    };
    let join_ref = text(field(lens[0])?)?;
    let r#ref = text(field(lens[1])?)?;
    let topic = text(field(lens[2])?)?;
    let event = text(field(lens[3])?)?;
    // Client metadata (allowed keys only) is not used by fanout.
    let _meta = field(lens[4])?;
    let payload = &buf[at..];
    let binary = match encoding {
        ENCODING_JSON => {
            json_text(payload)?;
            false
        }
        ENCODING_BINARY => true,
        other => return Err(DecodeError::UnknownEncoding(other)),
    };
    let opt = |s: String| if s.is_empty() { None } else { Some(s) };
    Ok(Inbound {
        join_ref: opt(join_ref),
        r#ref: opt(r#ref),
        topic,
        request: Request::Broadcast(Broadcast::checked(event, Bytes::copy_from_slice(payload), binary)),
    })
}

/// Checks that `bytes` is one JSON value in UTF-8, as a JSON payload must
/// be: it is spliced verbatim into the frames other clients receive. (Only
/// checking it with `serde_json::from_slice::<IgnoredAny>` is not enough:
/// serde_json skips over a string it is not asked to keep without checking
/// its UTF-8.)
pub(crate) fn json_text(bytes: &[u8]) -> Result<&str, DecodeError> {
    let text = std::str::from_utf8(bytes).map_err(|_| DecodeError::PayloadNotUtf8)?;
    serde_json::from_str::<de::IgnoredAny>(text).map_err(|e| DecodeError::Json(e.to_string()))?;
    Ok(text)
}

/// Best-effort `(join_ref, ref, topic)` of a message that failed to decode,
/// so the error reply reaches the push that caused it.
pub fn peek_refs(vsn: Vsn, binary: bool, buf: &[u8]) -> (Option<String>, Option<String>, Option<String>) {
    if binary {
        if buf.len() < 7 || buf[0] != KIND_USER_BROADCAST_PUSH {
            return (None, None, None);
        }
        let (jl, rl, tl) = (usize::from(buf[1]), usize::from(buf[2]), usize::from(buf[3]));
        let get = |from: usize, len: usize| {
            buf.get(from..from + len)
                .and_then(|b| std::str::from_utf8(b).ok())
                .filter(|s| !s.is_empty())
                .map(str::to_owned)
        };
        return (get(7, jl), get(7 + jl, rl), get(7 + jl + rl, tl));
    }
    // Only the envelope is parsed: the payload is skipped as raw JSON, so
    // it may be as deep as the decoder allows (a `Value` stops at 128 levels).
    let (join_ref, r#ref, topic) = match vsn {
        Vsn::V1 => {
            let Ok(m) = serde_json::from_slice::<HashMap<String, &RawValue>>(buf) else {
                return (None, None, None);
            };
            (
                m.get("join_ref").copied(),
                m.get("ref").copied(),
                m.get("topic").copied(),
            )
        }
        Vsn::V2 => {
            let Ok(a) = serde_json::from_slice::<Vec<&RawValue>>(buf) else {
                return (None, None, None);
            };
            (a.first().copied(), a.get(1).copied(), a.get(2).copied())
        }
    };
    let value = |raw: Option<&RawValue>| raw.and_then(|r| serde_json::from_str::<serde_json::Value>(r.get()).ok());
    let s = |raw: Option<&RawValue>| match value(raw)? {
        serde_json::Value::String(s) => Some(s),
        serde_json::Value::Number(n) => Some(n.to_string()),
        _ => None,
    };
    let topic = match value(topic) {
        Some(serde_json::Value::String(t)) => Some(t),
        _ => None,
    };
    (s(join_ref), s(r#ref), topic)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_v1_and_v2_text() {
        let m = decode_text(
            Vsn::V1,
            br#"{"topic":"realtime:a","event":"phx_join","payload":{"x":1},"ref":"1","join_ref":"1"}"#,
        )
        .unwrap();
        assert_eq!((m.topic.as_str(), m.r#ref.as_deref()), ("realtime:a", Some("1")));
        assert!(matches!(m.request, Request::Join(Ok(_))));
        let m = decode_text(Vsn::V2, br#"[null,"5","phoenix","heartbeat",{}]"#).unwrap();
        assert_eq!(
            (m.join_ref, m.r#ref.as_deref(), m.request),
            (None, Some("5"), Request::Heartbeat)
        );
        let m = decode_text(Vsn::V2, br#"[1,2,"t","e",null]"#).unwrap();
        assert_eq!((m.join_ref.as_deref(), m.r#ref.as_deref()), (Some("1"), Some("2")));
    }

    #[test]
    fn refuses_bad_text() {
        assert!(matches!(decode_text(Vsn::V1, b"not json"), Err(DecodeError::Json(_))));
        assert!(matches!(decode_text(Vsn::V1, b"[1,2]"), Err(DecodeError::Shape(_))));
        assert!(matches!(
            decode_text(Vsn::V1, br#"{"topic":"t"}"#),
            Err(DecodeError::Shape(_))
        ));
        assert!(matches!(
            decode_text(Vsn::V2, br#"{"topic":"t"}"#),
            Err(DecodeError::Shape(_))
        ));
        assert!(matches!(
            decode_text(Vsn::V2, br#"[null,null,"t","e"]"#),
            Err(DecodeError::Shape(_))
        ));
        assert!(matches!(
            decode_text(Vsn::V2, br#"[null,null,"t","e",{},6]"#),
            Err(DecodeError::Shape(_))
        ));
        assert!(matches!(
            decode_text(Vsn::V2, br#"[null,null,5,"e",{}]"#),
            Err(DecodeError::Shape(_))
        ));
        assert!(decode_text(Vsn::V2, b"[").is_err());
    }

    fn kind3(join_ref: &str, r: &str, topic: &str, event: &str, meta: &str, enc: u8, payload: &[u8]) -> Vec<u8> {
        let mut v = vec![
            3,
            join_ref.len() as u8,
            r.len() as u8,
            topic.len() as u8,
            event.len() as u8,
            meta.len() as u8,
            enc,
        ];
        for s in [join_ref, r, topic, event, meta] {
            v.extend_from_slice(s.as_bytes());
        }
        v.extend_from_slice(payload);
        v
    }

    #[test]
    fn decodes_binary_broadcast_push() {
        let buf = kind3("1", "2", "realtime:room", "chat", "", 1, br#"{"text":"hi"}"#);
        let m = decode_binary(&buf).unwrap();
        assert_eq!(m.topic, "realtime:room");
        assert_eq!((m.join_ref.as_deref(), m.r#ref.as_deref()), (Some("1"), Some("2")));
        assert_eq!(
            m.request,
            Request::Broadcast(Ok(Broadcast {
                event: "chat".into(),
                payload: Bytes::from_static(br#"{"text":"hi"}"#),
                binary: false
            }))
        );
        let m = decode_binary(&kind3("", "", "realtime:room", "blob", "", 0, b"\x00\xff")).unwrap();
        assert_eq!(
            m.request,
            Request::Broadcast(Ok(Broadcast {
                event: "blob".into(),
                payload: Bytes::from_static(b"\x00\xff"),
                binary: true
            }))
        );
        // Empty refs mean "no ref" (the client sends '' for a missing ref).
        let m = decode_binary(&kind3("", "", "realtime:room", "e", "", 1, b"{}")).unwrap();
        assert_eq!((m.join_ref, m.r#ref), (None, None));
    }

    #[test]
    fn refuses_bad_binary() {
        assert_eq!(decode_binary(&[]), Err(DecodeError::Truncated));
        assert_eq!(decode_binary(&[9, 0, 0]), Err(DecodeError::UnknownKind(9)));
        assert_eq!(
            decode_binary(&[3, 0, 0, 200, 0, 0, 1, b'a']),
            Err(DecodeError::Truncated)
        );
        assert_eq!(
            decode_binary(&kind3("", "", "t", "e", "", 7, b"{}")),
            Err(DecodeError::UnknownEncoding(7))
        );
        assert!(matches!(
            decode_binary(&kind3("", "", "t", "e", "", 1, b"{oops")),
            Err(DecodeError::Json(_))
        ));
        assert_eq!(decode_binary(&[3, 0, 0, 1, 0, 0, 1, 0xff]), Err(DecodeError::NotUtf8));
    }

    /// Found by the `decode_v1` fuzz target: `[topic, event, payload]` was
    /// taken as a vsn 1.0.0 message (serde lets an array stand for a
    /// struct), whose error replies `peek_refs` could not address.
    #[test]
    fn v1_messages_are_objects() {
        for text in [&br#"["realtime:a","phx_leave",{},"1","1"]"#[..], br#"[",",",",0	]"#] {
            assert_eq!(
                decode_text(Vsn::V1, text),
                Err(DecodeError::Shape("object {topic, event, payload, ref}"))
            );
        }
        assert!(decode_text(Vsn::V1, br#" {"topic":"realtime:a","event":"phx_leave","payload":{}} "#).is_ok());
    }

    /// Found by reading while writing the `decode_v1` fuzz target, whose
    /// property (the refs the error path reads are the decoder's) fails on
    /// it: a payload nested deeper than 128 levels decodes (it is kept as
    /// raw JSON), but `peek_refs` parsed the whole message as a `Value` and
    /// lost the refs, so a rate-limited push got its error on topic phoenix.
    #[test]
    fn peek_refs_reads_past_a_deep_payload() {
        let deep = format!("{}{}", "[".repeat(200), "]".repeat(200));
        let v1 = format!(r#"{{"topic":"realtime:a","event":"e","payload":{deep},"ref":"2","join_ref":1}}"#);
        let v2 = format!(r#"["1","2","realtime:a","e",{deep}]"#);
        for (vsn, text) in [(Vsn::V1, v1), (Vsn::V2, v2)] {
            let m = decode_text(vsn, text.as_bytes()).unwrap();
            let peeked = peek_refs(vsn, false, text.as_bytes());
            assert_eq!(peeked, (m.join_ref, m.r#ref, Some(m.topic)), "{vsn:?}");
            assert_eq!(peeked.0.as_deref(), Some("1"));
        }
        // Still best effort on what does not decode.
        assert_eq!(
            peek_refs(Vsn::V1, false, br#"{"topic":5,"ref":"3","ref":"4"}"#),
            (None, Some("4".into()), None)
        );
        assert_eq!(peek_refs(Vsn::V2, false, b"[null,7]"), (None, Some("7".into()), None));
        assert_eq!(peek_refs(Vsn::V1, false, b"[1,2,3]"), (None, None, None));
    }

    /// Found by the `decode_binary` fuzz target: a JSON payload with
    /// invalid UTF-8 inside a string was accepted (serde_json does not check
    /// the strings it skips), and vsn 1.0.0 members then got `"payload":null`.
    #[test]
    fn binary_json_payload_must_be_utf8() {
        assert_eq!(
            decode_binary(&kind3("", "", "realtime:room", "e", "", 1, b"{\"text\":\"h\xa4\"}")),
            Err(DecodeError::PayloadNotUtf8)
        );
        assert_eq!(json_text(b"[\"\xff\"]"), Err(DecodeError::PayloadNotUtf8));
        assert_eq!(json_text(b" {\"a\":\"\xc3\xa9\"} "), Ok(" {\"a\":\"\u{e9}\"} "));
        assert!(matches!(json_text(b"{} {}"), Err(DecodeError::Json(_))));
        // Binary payloads are bytes: anything goes.
        assert!(decode_binary(&kind3("", "", "realtime:room", "e", "", 0, b"\xa4")).is_ok());
    }
}
