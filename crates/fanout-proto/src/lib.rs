//! Protobuf types generated from `proto/` and their conversions to
//! `fanout-core` types.
//!
//! The generated types ([`v1::Envelope`] and friends) stop at this crate's
//! boundary: other crates call [`encode_event`] and [`decode_event`] and work
//! with [`fanout_core::Event`]. Code is generated at build time by
//! `prost-build` with the vendored `protoc` from `protoc-bin-vendored`, pinned
//! in `Cargo.lock`.
//!
//! This crate does no I/O.

use bytes::Bytes;
use fanout_core::{ChannelName, Event, EventKind, Origin, Position};
use prost::Message;
use std::sync::Arc;

/// Generated code for package `fanout.v1`.
#[allow(clippy::all, missing_docs)]
pub mod v1 {
    include!(concat!(env!("OUT_DIR"), "/fanout.v1.rs"));
}

/// Why bytes from the wire did not decode into an [`Event`].
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("invalid protobuf: {0}")]
    Protobuf(#[from] prost::DecodeError),
    #[error("invalid channel: {0}")]
    Channel(#[from] fanout_core::ChannelError),
    #[error("unknown event kind {0}")]
    UnknownKind(i32),
}

fn kind_to_proto(kind: EventKind) -> v1::EventKind {
    match kind {
        EventKind::Broadcast => v1::EventKind::Broadcast,
        EventKind::PresenceDiff => v1::EventKind::PresenceDiff,
        EventKind::PostgresChange => v1::EventKind::PostgresChange,
    }
}

/// Encodes an event for the wire. The position is not encoded: it is given
/// by the transport (the JetStream sequence).
pub fn encode_event(event: &Event) -> Bytes {
    let envelope = v1::Envelope {
        channel: event.channel.as_str().to_owned(),
        kind: kind_to_proto(event.kind) as i32,
        event: event.event.to_string(),
        payload: event.payload.clone(),
        binary: event.binary,
        origin: event.origin.map(|o| v1::Origin {
            node: o.node,
            connection: o.connection,
        }),
        published_at_ms: event.published_at_ms,
        sender: event.sender.as_deref().map(str::to_owned),
        memberships: event.memberships,
    };
    Bytes::from(envelope.encode_to_vec())
}

/// Decodes an event from the wire and gives it `position`.
pub fn decode_event(bytes: &[u8], position: Position) -> Result<Event, DecodeError> {
    let envelope = v1::Envelope::decode(bytes)?;
    let kind = match v1::EventKind::try_from(envelope.kind) {
        Ok(v1::EventKind::Broadcast) => EventKind::Broadcast,
        Ok(v1::EventKind::PresenceDiff) => EventKind::PresenceDiff,
        Ok(v1::EventKind::PostgresChange) => EventKind::PostgresChange,
        _ => return Err(DecodeError::UnknownKind(envelope.kind)),
    };
    Ok(Event {
        channel: ChannelName::from_internal(&envelope.channel)?,
        kind,
        event: Arc::from(envelope.event),
        payload: envelope.payload,
        binary: envelope.binary,
        origin: envelope.origin.map(|o| Origin {
            node: o.node,
            connection: o.connection,
        }),
        position,
        published_at_ms: envelope.published_at_ms,
        sender: envelope.sender.map(Arc::from),
        memberships: envelope.memberships,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let event = Event {
            channel: ChannelName::private("workshop:42").unwrap(),
            kind: EventKind::Broadcast,
            event: Arc::from("chat"),
            payload: Bytes::from_static(br#"{"text":"hi"}"#),
            binary: false,
            origin: Some(Origin { node: 7, connection: 9 }),
            position: 0,
            published_at_ms: 1_700_000_000_000,
            sender: Some(Arc::from("user-1")),
            memberships: 17,
        };
        let decoded = decode_event(&encode_event(&event), 42).unwrap();
        assert_eq!(decoded, Event { position: 42, ..event });
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        assert!(matches!(
            decode_event(b"\xff\xff\xff", 1),
            Err(DecodeError::Protobuf(_))
        ));
        let bad_kind = v1::Envelope {
            channel: "c".into(),
            kind: 99,
            ..Default::default()
        };
        assert!(matches!(
            decode_event(&bad_kind.encode_to_vec(), 1),
            Err(DecodeError::UnknownKind(99))
        ));
        let bad_channel = v1::Envelope {
            channel: String::new(),
            kind: 1,
            ..Default::default()
        };
        assert!(matches!(
            decode_event(&bad_channel.encode_to_vec(), 1),
            Err(DecodeError::Channel(_))
        ));
    }
}
