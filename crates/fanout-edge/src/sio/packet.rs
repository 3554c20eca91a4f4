//! Engine.IO v4 and Socket.IO v5 packets, as `socket.io-client` 4 sends
//! and expects them over WebSocket.
//!
//! An Engine.IO packet is one WebSocket frame: a text frame starts with
//! its type digit (`0` open, `1` close, `2` ping, `3` pong, `4` message,
//! `5` upgrade, `6` noop); a binary frame is a message of raw bytes (a
//! Socket.IO attachment). A Socket.IO packet rides in a message:
//! `<type>[<attachments>-][<nsp>,][<ack id>][<JSON>]`, with types `0`
//! CONNECT, `1` DISCONNECT, `2` EVENT, `3` ACK, `4` CONNECT_ERROR, `5`
//! BINARY_EVENT and `6` BINARY_ACK, and the namespace omitted when it is
//! the main one (`/`).

use bytes::Bytes;
use fanout_core::{Event, EventKind, Position};
use serde_json::value::RawValue;

use crate::frame::{self, Opcode};

/// Why a client's packet was refused. The message goes to the client.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PacketError {
    #[error("empty Engine.IO packet")]
    Empty,
    #[error("unknown Engine.IO packet type {0:?}")]
    EngineType(char),
    #[error("unknown Socket.IO packet type {0:?}")]
    SocketType(char),
    #[error("bad attachment count")]
    Attachments,
    #[error("bad ack id")]
    AckId,
    #[error("invalid JSON in packet: {0}")]
    Json(String),
    #[error("an event packet must carry a JSON array starting with the event name")]
    EventShape,
}

/// An Engine.IO packet from a client's text frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EnginePacket<'a> {
    Close,
    Ping(&'a str),
    Pong(&'a str),
    Message(&'a str),
    Upgrade,
    Noop,
}

/// Decodes one text frame's Engine.IO packet.
pub fn decode_engine(text: &str) -> Result<EnginePacket<'_>, PacketError> {
    let mut chars = text.chars();
    let kind = chars.next().ok_or(PacketError::Empty)?;
    let rest = chars.as_str();
    Ok(match kind {
        '1' => EnginePacket::Close,
        '2' => EnginePacket::Ping(rest),
        '3' => EnginePacket::Pong(rest),
        '4' => EnginePacket::Message(rest),
        '5' => EnginePacket::Upgrade,
        '6' => EnginePacket::Noop,
        other => return Err(PacketError::EngineType(other)),
    })
}

/// Socket.IO packet types.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PacketType {
    Connect,
    Disconnect,
    Event,
    Ack,
    ConnectError,
    BinaryEvent,
    BinaryAck,
}

/// A Socket.IO packet from a client.
#[derive(Debug, Clone)]
pub struct Packet<'a> {
    pub kind: PacketType,
    /// Binary attachments that follow (binary packets only).
    pub attachments: usize,
    pub nsp: &'a str,
    pub id: Option<u64>,
    pub data: Option<&'a RawValue>,
}

/// Most attachments one packet may announce.
const MAX_ATTACHMENTS: usize = 16;

/// Decodes a Socket.IO packet (the text of an Engine.IO message).
pub fn decode_packet(s: &str) -> Result<Packet<'_>, PacketError> {
    let kind = match s.as_bytes().first().ok_or(PacketError::Empty)? {
        b'0' => PacketType::Connect,
        b'1' => PacketType::Disconnect,
        b'2' => PacketType::Event,
        b'3' => PacketType::Ack,
        b'4' => PacketType::ConnectError,
        b'5' => PacketType::BinaryEvent,
        b'6' => PacketType::BinaryAck,
        _ => return Err(PacketError::SocketType(s.chars().next().unwrap_or('?'))),
    };
    let mut rest = &s[1..];
    let mut attachments = 0;
    if matches!(kind, PacketType::BinaryEvent | PacketType::BinaryAck) {
        let (count, after) = rest.split_once('-').ok_or(PacketError::Attachments)?;
        attachments = count.parse().map_err(|_| PacketError::Attachments)?;
        if attachments > MAX_ATTACHMENTS {
            return Err(PacketError::Attachments);
        }
        rest = after;
    }
    let mut nsp = "/";
    if rest.starts_with('/') {
        let end = rest.find(',').unwrap_or(rest.len());
        nsp = &rest[..end];
        rest = rest.get(end + 1..).unwrap_or("");
    }
    let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
    let id = if digits > 0 {
        Some(rest[..digits].parse().map_err(|_| PacketError::AckId)?)
    } else {
        None
    };
    rest = &rest[digits..];
    let data = if rest.is_empty() {
        None
    } else {
        Some(serde_json::from_str::<&RawValue>(rest).map_err(|e| PacketError::Json(e.to_string()))?)
    };
    Ok(Packet {
        kind,
        attachments,
        nsp,
        id,
        data,
    })
}

/// An EVENT's name and arguments.
pub fn event_args(data: Option<&RawValue>) -> Result<(String, Vec<&RawValue>), PacketError> {
    let data = data.ok_or(PacketError::EventShape)?;
    let mut args: Vec<&RawValue> = serde_json::from_str(data.get()).map_err(|_| PacketError::EventShape)?;
    if args.is_empty() {
        return Err(PacketError::EventShape);
    }
    let name: String = serde_json::from_str(args[0].get()).map_err(|_| PacketError::EventShape)?;
    args.remove(0);
    Ok((name, args))
}

/// Whether `arg` is the placeholder of attachment 0 (`{"_placeholder":
/// true, "num": 0}`), the shape a single `Buffer` argument takes.
pub fn is_first_placeholder(arg: &RawValue) -> bool {
    #[derive(serde::Deserialize)]
    struct Placeholder {
        #[serde(rename = "_placeholder")]
        placeholder: bool,
        num: u64,
    }
    serde_json::from_str::<Placeholder>(arg.get()).is_ok_and(|p| p.placeholder && p.num == 0)
}

fn json_str(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_else(|_| "\"\"".to_owned())
}

/// `<nsp>,` for a namespace other than the main one, which is omitted.
fn nsp_prefix(out: &mut String, nsp: Option<&str>) {
    if let Some(name) = nsp {
        out.push('/');
        out.push_str(name);
        out.push(',');
    }
}

/// A text frame carrying Engine.IO `text`.
pub fn text(text: &str) -> Bytes {
    frame::encode(Opcode::Text, text.as_bytes())
}

/// The Engine.IO open packet.
pub fn open(sid: &str, upgrades: &[&str], ping_interval_ms: u64, ping_timeout_ms: u64, max_payload: usize) -> String {
    format!(
        r#"0{{"sid":{},"upgrades":{},"pingInterval":{ping_interval_ms},"pingTimeout":{ping_timeout_ms},"maxPayload":{max_payload}}}"#,
        json_str(sid),
        serde_json::to_string(upgrades).unwrap_or_else(|_| "[]".into()),
    )
}

/// Engine.IO ping, as the server sends it.
pub const PING: &str = "2";

/// A Socket.IO message for namespace `nsp` (`None`: the main one):
/// `4` + type + `nsp,` + `rest`.
fn message(kind: u8, nsp: Option<&str>, rest: &str) -> String {
    let mut s = String::with_capacity(rest.len() + nsp.map_or(0, str::len) + 4);
    s.push('4');
    s.push(char::from(kind));
    nsp_prefix(&mut s, nsp);
    s.push_str(rest);
    s
}

/// CONNECT accepted: `{"sid"[, "pid"]}`.
pub fn connect_ok(nsp: Option<&str>, sid: &str, pid: Option<&str>) -> String {
    let body = match pid {
        Some(pid) => format!(r#"{{"sid":{},"pid":{}}}"#, json_str(sid), json_str(pid)),
        None => format!(r#"{{"sid":{}}}"#, json_str(sid)),
    };
    message(b'0', nsp, &body)
}

/// CONNECT refused: `{"message"}`, which the client raises as
/// `connect_error`.
pub fn connect_error(nsp: Option<&str>, reason: &str) -> String {
    message(b'4', nsp, &format!(r#"{{"message":{}}}"#, json_str(reason)))
}

/// DISCONNECT from the server (`io server disconnect` on the client).
pub fn disconnect(nsp: Option<&str>) -> String {
    message(b'1', nsp, "")
}

/// An ACK with one argument (JSON).
pub fn ack(nsp: Option<&str>, id: u64, arg: &str) -> String {
    message(b'3', nsp, &format!("{id}[{arg}]"))
}

/// An EVENT with one argument (JSON), from the server.
pub fn emit(nsp: Option<&str>, event: &str, arg: &str) -> String {
    message(b'2', nsp, &format!("[{},{arg}]", json_str(event)))
}

/// The frames of a broadcast to a Socket.IO socket on namespace `nsp`
/// (`None`: the main one): `42["event",payload]`, or for a binary
/// payload a BINARY_EVENT with one placeholder followed by the bytes as a
/// binary frame (both frames in one buffer). With `offsets`, the
/// position is the last argument, as Socket.IO's connection-state
/// recovery sends it. Only broadcasts are delivered; `None` otherwise.
pub fn event_frames(nsp: Option<&str>, ev: &Event, offsets: bool) -> Option<Bytes> {
    if ev.kind != EventKind::Broadcast {
        return None;
    }
    let offset = |s: &mut String| {
        // An ephemeral event (position 0) is no offset to recover from.
        if offsets && ev.position != 0 {
            s.push_str(",\"");
            s.push_str(&ev.position.to_string());
            s.push('"');
        }
    };
    let mut s = String::with_capacity(ev.payload.len() + ev.event.len() + 32);
    s.push('4');
    if ev.binary {
        s.push_str("51-");
    } else {
        s.push('2');
    }
    nsp_prefix(&mut s, nsp);
    s.push('[');
    s.push_str(&json_str(&ev.event));
    s.push(',');
    if ev.binary {
        s.push_str(r#"{"_placeholder":true,"num":0}"#);
    } else {
        // Validated as JSON when it entered the bus.
        s.push_str(std::str::from_utf8(&ev.payload).unwrap_or("null"));
    }
    offset(&mut s);
    s.push(']');
    if !ev.binary {
        return Some(text(&s));
    }
    let head = text(&s);
    let body = frame::encode(Opcode::Binary, &ev.payload);
    let mut both = Vec::with_capacity(head.len() + body.len());
    both.extend_from_slice(&head);
    both.extend_from_slice(&body);
    Some(Bytes::from(both))
}

/// A database change as a Socket.IO event: `postgres_changes` with the
/// change record (`{schema, table, type, record, old_record, …}`), and
/// the position last with `offsets`.
pub fn change_frame(nsp: Option<&str>, ev: &Event, data: &[u8], offsets: bool) -> Bytes {
    let record = std::str::from_utf8(data).unwrap_or("null");
    let mut s = String::with_capacity(record.len() + 40);
    s.push_str("42");
    nsp_prefix(&mut s, nsp);
    s.push_str(r#"["postgres_changes","#);
    s.push_str(record);
    if offsets {
        s.push_str(&format!(r#","{}""#, ev.position));
    }
    s.push(']');
    text(&s)
}

/// The offset a recovering client sends: a position.
pub fn parse_offset(offset: &str) -> Option<Position> {
    if offset.is_empty() || !offset.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    offset.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use fanout_core::ChannelName;

    fn text_of(frame: &[u8]) -> &str {
        assert_eq!(frame[0], 0x81, "a final text frame");
        std::str::from_utf8(&frame[2..]).unwrap()
    }

    #[test]
    fn decodes_engine_packets() {
        assert_eq!(decode_engine("3"), Ok(EnginePacket::Pong("")));
        assert_eq!(decode_engine("2probe"), Ok(EnginePacket::Ping("probe")));
        assert_eq!(decode_engine("40"), Ok(EnginePacket::Message("0")));
        assert_eq!(decode_engine("5"), Ok(EnginePacket::Upgrade));
        assert_eq!(decode_engine(""), Err(PacketError::Empty));
        assert_eq!(decode_engine("9"), Err(PacketError::EngineType('9')));
    }

    #[test]
    fn decodes_socket_packets_as_the_client_sends_them() {
        let p = decode_packet(r#"0{"token":"t"}"#).unwrap();
        assert_eq!((p.kind, p.nsp, p.id), (PacketType::Connect, "/", None));
        assert_eq!(p.data.unwrap().get(), r#"{"token":"t"}"#);

        let p = decode_packet(r#"0/workshop:42,{"token":"t","pid":"p","offset":"7"}"#).unwrap();
        assert_eq!((p.kind, p.nsp), (PacketType::Connect, "/workshop:42"));

        let p = decode_packet(r#"2/room:1,12["chat",{"t":1}]"#).unwrap();
        assert_eq!((p.kind, p.nsp, p.id), (PacketType::Event, "/room:1", Some(12)));
        let (name, args) = event_args(p.data).unwrap();
        assert_eq!(name, "chat");
        assert_eq!(args.len(), 1);
        assert_eq!(args[0].get(), r#"{"t":1}"#);

        let p = decode_packet(r#"21["join","workshop:42"]"#).unwrap();
        assert_eq!((p.nsp, p.id), ("/", Some(1)));

        let p = decode_packet("1/room:1,").unwrap();
        assert_eq!((p.kind, p.nsp), (PacketType::Disconnect, "/room:1"));
        assert!(p.data.is_none());

        let p = decode_packet(r#"51-/a,3["up",{"_placeholder":true,"num":0}]"#).unwrap();
        assert_eq!(
            (p.kind, p.attachments, p.nsp, p.id),
            (PacketType::BinaryEvent, 1, "/a", Some(3))
        );
        let (_, args) = event_args(p.data).unwrap();
        assert!(is_first_placeholder(args[0]));
        assert!(!is_first_placeholder(
            RawValue::from_string("{}".into()).unwrap().as_ref()
        ));
    }

    #[test]
    fn refuses_broken_packets_with_a_reason() {
        let err = |s: &str| decode_packet(s).err();
        assert_eq!(err(""), Some(PacketError::Empty));
        assert_eq!(err("9"), Some(PacketError::SocketType('9')));
        assert_eq!(err("5x-[]"), Some(PacketError::Attachments));
        assert_eq!(err("5999-[]"), Some(PacketError::Attachments));
        assert_eq!(err("599999999999999999999999"), Some(PacketError::Attachments));
        assert!(matches!(err("2[\"a\""), Some(PacketError::Json(_))));
        assert_eq!(err("299999999999999999999999[]"), Some(PacketError::AckId));
        let p = decode_packet("2{}").unwrap();
        assert_eq!(event_args(p.data).err(), Some(PacketError::EventShape));
        let p = decode_packet("2[]").unwrap();
        assert_eq!(event_args(p.data).err(), Some(PacketError::EventShape));
        let p = decode_packet("2[1]").unwrap();
        assert_eq!(event_args(p.data).err(), Some(PacketError::EventShape));
    }

    #[test]
    fn encodes_server_packets() {
        assert_eq!(connect_ok(None, "s1", None), r#"40{"sid":"s1"}"#);
        assert_eq!(
            connect_ok(Some("room:1"), "s1", Some("p")),
            r#"40/room:1,{"sid":"s1","pid":"p"}"#
        );
        assert_eq!(connect_error(None, "no \"token\""), r#"44{"message":"no \"token\""}"#);
        assert_eq!(disconnect(Some("a")), "41/a,");
        assert_eq!(ack(Some("a"), 4, r#"{"ok":true}"#), r#"43/a,4[{"ok":true}]"#);
        assert_eq!(emit(None, "x", "null"), r#"42["x",null]"#);
        let open = open("abc", &["websocket"], 25000, 20000, 65536);
        let v: serde_json::Value = serde_json::from_str(&open[1..]).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"sid": "abc", "upgrades": ["websocket"], "pingInterval": 25000, "pingTimeout": 20000, "maxPayload": 65536})
        );
    }

    #[test]
    fn encodes_broadcasts_per_namespace_with_and_without_offsets() {
        let channel = ChannelName::new("room:1").unwrap();
        let mut ev = Event::broadcast(channel.clone(), "chat", Bytes::from_static(br#"{"t":1}"#), false, None);
        ev.position = 9;
        assert_eq!(
            text_of(&event_frames(None, &ev, false).unwrap()),
            r#"42["chat",{"t":1}]"#
        );
        assert_eq!(
            text_of(&event_frames(Some("room:1"), &ev, true).unwrap()),
            r#"42/room:1,["chat",{"t":1},"9"]"#
        );
        let bin = Event::broadcast(channel, "up", Bytes::from_static(b"\x00\x01"), true, None);
        let f = event_frames(None, &bin, false).unwrap();
        let head = r#"451-["up",{"_placeholder":true,"num":0}]"#;
        assert_eq!(&f[2..2 + head.len()], head.as_bytes());
        assert_eq!(
            &f[2 + head.len()..],
            b"\x82\x02\x00\x01",
            "then a binary frame of the bytes"
        );
        assert_eq!(parse_offset("12"), Some(12));
        assert_eq!(parse_offset("+1"), None);
        assert_eq!(parse_offset(""), None);
    }
}
