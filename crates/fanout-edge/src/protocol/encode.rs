//! Outbound frames, per protocol version: replies, pushes, system
//! messages, broadcasts (binary kind 4 for vsn 2.0.0), presence diffs and
//! database changes. Every frame a client receives is built here.

use bytes::{BufMut, Bytes, BytesMut};
use fanout_core::{Event, EventKind};

use super::{ENCODING_BINARY, ENCODING_JSON, KIND_USER_BROADCAST, Vsn};
use crate::frame::{self, Opcode};

fn json_str(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_else(|_| "\"\"".to_owned())
}

fn json_opt(s: Option<&str>) -> String {
    s.map_or_else(|| "null".to_owned(), json_str)
}

/// Builds outbound frames for one protocol version.
#[derive(Debug, Clone, Copy)]
pub struct Encoder(pub Vsn);

impl Encoder {
    /// A message with JSON `payload` (already serialized) as a text frame.
    pub fn message(
        self,
        join_ref: Option<&str>,
        r#ref: Option<&str>,
        topic: &str,
        event: &str,
        payload: &str,
    ) -> Bytes {
        let text = match self.0 {
            Vsn::V1 => format!(
                r#"{{"topic":{},"event":{},"payload":{},"ref":{},"join_ref":{}}}"#,
                json_str(topic),
                json_str(event),
                payload,
                json_opt(r#ref),
                json_opt(join_ref)
            ),
            Vsn::V2 => format!(
                "[{},{},{},{},{}]",
                json_opt(join_ref),
                json_opt(r#ref),
                json_str(topic),
                json_str(event),
                payload
            ),
        };
        frame::encode(Opcode::Text, text.as_bytes())
    }

    /// A server push (no refs).
    pub fn push(self, topic: &str, event: &str, payload: &str) -> Bytes {
        self.message(None, None, topic, event, payload)
    }

    /// `phx_reply` with `{"status": …, "response": …}`.
    pub fn reply(self, join_ref: Option<&str>, r#ref: Option<&str>, topic: &str, ok: bool, response: &str) -> Bytes {
        let payload = format!(
            r#"{{"status":"{}","response":{}}}"#,
            if ok { "ok" } else { "error" },
            response
        );
        self.message(join_ref, r#ref, topic, "phx_reply", &payload)
    }

    /// An error reply with `{"reason": …}`.
    pub fn error_reply(self, join_ref: Option<&str>, r#ref: Option<&str>, topic: &str, reason: &str) -> Bytes {
        self.reply(
            join_ref,
            r#ref,
            topic,
            false,
            &format!(r#"{{"reason":{}}}"#, json_str(reason)),
        )
    }

    /// A `system` message `{extension, status, message, channel}`.
    pub fn system(self, topic: &str, extension: &str, ok: bool, message: &str, channel: &str) -> Bytes {
        let payload = format!(
            r#"{{"extension":{},"status":"{}","message":{},"channel":{}}}"#,
            json_str(extension),
            if ok { "ok" } else { "error" },
            json_str(message),
            json_str(channel)
        );
        self.push(topic, "system", &payload)
    }

    /// A broadcast to clients: a JSON push for vsn 1.0.0, a binary kind-4
    /// frame for vsn 2.0.0. `meta` is a JSON object such as `{"id":"7"}`;
    /// `user_event` and `meta` must be at most 255 bytes (checked at input).
    /// A `binary` payload (raw bytes) has no JSON form: `None` for vsn 1.0.0.
    pub fn broadcast(self, topic: &str, user_event: &str, payload: &[u8], meta: &str, binary: bool) -> Option<Bytes> {
        match self.0 {
            Vsn::V1 if binary => None,
            Vsn::V1 => {
                let mut text = String::with_capacity(payload.len() + user_event.len() + topic.len() + meta.len() + 96);
                text.push_str(r#"{"topic":"#);
                text.push_str(&json_str(topic));
                text.push_str(r#","event":"broadcast","payload":{"type":"broadcast","event":"#);
                text.push_str(&json_str(user_event));
                text.push_str(r#","payload":"#);
                // The payload was validated as JSON when it entered the bus.
                text.push_str(std::str::from_utf8(payload).unwrap_or("null"));
                text.push_str(r#","meta":"#);
                text.push_str(meta);
                text.push_str(r#"},"ref":null,"join_ref":null}"#);
                Some(frame::encode(Opcode::Text, text.as_bytes()))
            }
            Vsn::V2 => {
                let body_len = 5 + topic.len() + user_event.len() + meta.len() + payload.len();
                let mut buf = BytesMut::with_capacity(body_len + 10);
                frame::put_header(&mut buf, Opcode::Binary, body_len);
                buf.put_u8(KIND_USER_BROADCAST);
                buf.put_u8(topic.len().min(255) as u8);
                buf.put_u8(user_event.len().min(255) as u8);
                buf.put_u8(meta.len().min(255) as u8);
                buf.put_u8(if binary { ENCODING_BINARY } else { ENCODING_JSON });
                buf.put_slice(topic.as_bytes());
                buf.put_slice(user_event.as_bytes());
                buf.put_slice(meta.as_bytes());
                buf.put_slice(payload);
                Some(buf.freeze())
            }
        }
    }

    /// An event for this protocol version: a broadcast or a presence diff.
    /// `None` for what is not delivered this way: database changes (their
    /// frame depends on the member's bindings, see [`Self::change`]),
    /// presence diffs on replay, and binary broadcasts to vsn 1.0.0.
    pub fn event(self, topic: &str, ev: &Event, replayed: bool) -> Option<Bytes> {
        match ev.kind {
            EventKind::Broadcast => {
                // An ephemeral broadcast has no position to resume from.
                let mut meta = if ev.position == 0 {
                    r#"{"ephemeral":true"#.to_owned()
                } else {
                    format!(r#"{{"id":"{}""#, ev.position)
                };
                if replayed {
                    meta.push_str(r#","replayed":true"#);
                }
                if let Some(sub) = &ev.sender {
                    // The edge stamps only subs short enough for the
                    // 255-byte meta of a binary frame.
                    meta.push_str(r#","sub":"#);
                    meta.push_str(&json_str(sub));
                }
                meta.push('}');
                self.broadcast(topic, &ev.event, &ev.payload, &meta, ev.binary)
            }
            EventKind::PresenceDiff => {
                if replayed {
                    return None;
                }
                Some(self.push(topic, "presence_diff", std::str::from_utf8(&ev.payload).ok()?))
            }
            EventKind::PostgresChange => None,
        }
    }

    /// A database change for one topic and set of matching bindings:
    /// `postgres_changes` with `{ids, data, meta}`; `data` is the change
    /// record's JSON (the event's payload, or a copy with only the columns
    /// the table's allow-list keeps).
    pub fn change(self, topic: &str, ev: &Event, data: &[u8], ids: &[u32], replayed: bool) -> Bytes {
        let ids = ids.iter().map(u32::to_string).collect::<Vec<_>>().join(",");
        let data = std::str::from_utf8(data).unwrap_or("null");
        let replayed = if replayed { r#","replayed":true"# } else { "" };
        let payload = format!(
            r#"{{"ids":[{ids}],"data":{data},"meta":{{"id":"{}"{replayed}}}}}"#,
            ev.position
        );
        self.push(topic, "postgres_changes", &payload)
    }

    /// `phx_close`, which ends a channel on the client (after a leave, or
    /// when the server ends it).
    pub fn close_channel(self, join_ref: Option<&str>, topic: &str) -> Bytes {
        self.message(join_ref, join_ref, topic, "phx_close", "{}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text_of(frame: &Bytes) -> &str {
        let header = match frame[1] {
            126 => 4,
            127 => 10,
            _ => 2,
        };
        std::str::from_utf8(&frame[header..]).unwrap()
    }

    #[test]
    fn encodes_replies_per_vsn() {
        let f = Encoder(Vsn::V1).reply(Some("1"), Some("1"), "realtime:a", true, "{}");
        let v: serde_json::Value = serde_json::from_str(text_of(&f)).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"topic": "realtime:a", "event": "phx_reply", "payload": {"status": "ok", "response": {}}, "ref": "1", "join_ref": "1"})
        );
        let f = Encoder(Vsn::V2).error_reply(None, Some("3"), "realtime:a", "bad \"thing\"");
        let v: serde_json::Value = serde_json::from_str(text_of(&f)).unwrap();
        assert_eq!(
            v,
            serde_json::json!([null, "3", "realtime:a", "phx_reply", {"status": "error", "response": {"reason": "bad \"thing\""}}])
        );
    }

    #[test]
    fn encodes_broadcasts_per_vsn() {
        let f = Encoder(Vsn::V1)
            .broadcast("realtime:a", "chat", br#"{"t":1}"#, r#"{"id":"7"}"#, false)
            .unwrap();
        let v: serde_json::Value = serde_json::from_str(text_of(&f)).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"topic": "realtime:a", "event": "broadcast", "payload": {"type": "broadcast", "event": "chat", "payload": {"t": 1}, "meta": {"id": "7"}}, "ref": null, "join_ref": null})
        );
        let f = Encoder(Vsn::V2)
            .broadcast("realtime:a", "chat", br#"{"t":1}"#, r#"{"id":"7"}"#, false)
            .unwrap();
        assert_eq!(f[0], 0x82, "binary frame");
        let body = &f[2..];
        assert_eq!(&body[..5], &[4, 10, 4, 10, 1]);
        assert_eq!(&body[5..], br#"realtime:achat{"id":"7"}{"t":1}"#);
        let f = Encoder(Vsn::V2)
            .broadcast("realtime:a", "b", b"\x00", "", true)
            .unwrap();
        assert_eq!(&f[2..], b"\x04\x0a\x01\x00\x00realtime:ab\x00");
        assert_eq!(
            Encoder(Vsn::V1).broadcast("realtime:a", "b", b"\x00", "", true),
            None,
            "no JSON form"
        );
    }
}
