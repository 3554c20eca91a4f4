//! Server-to-client WebSocket frames, encoded once and shared.
//!
//! Frames from a server are never masked, so a frame's bytes (header and
//! payload) are the same for every socket that receives it. The hub encodes
//! each message into one [`Bytes`] per protocol version and hands clones of
//! it to every subscriber; writing it is a plain `write` of those bytes.

use bytes::{BufMut, Bytes, BytesMut};

/// WebSocket opcodes the server sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Opcode {
    Text = 0x1,
    Binary = 0x2,
    Close = 0x8,
    Pong = 0xA,
}

/// Encodes one unfragmented, unmasked frame.
pub fn encode(opcode: Opcode, payload: &[u8]) -> Bytes {
    let mut buf = BytesMut::with_capacity(payload.len() + 10);
    put_header(&mut buf, opcode, payload.len());
    buf.put_slice(payload);
    buf.freeze()
}

/// Writes the header of an unfragmented, unmasked frame of `len` bytes.
pub fn put_header(buf: &mut BytesMut, opcode: Opcode, len: usize) {
    buf.put_u8(0x80 | opcode as u8);
    if len < 126 {
        buf.put_u8(len as u8);
    } else if len <= usize::from(u16::MAX) {
        buf.put_u8(126);
        buf.put_u16(len as u16);
    } else {
        buf.put_u8(127);
        buf.put_u64(len as u64);
    }
}

/// A close frame with `code` and a UTF-8 `reason`, cut to the 123 bytes a
/// control frame allows (on a character boundary).
pub fn close(code: u16, reason: &str) -> Bytes {
    let mut end = reason.len().min(123);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    let mut payload = Vec::with_capacity(2 + end);
    payload.extend_from_slice(&code.to_be_bytes());
    payload.extend_from_slice(&reason.as_bytes()[..end]);
    encode(Opcode::Close, &payload)
}

/// Why and how a connection ends: the close frame's code and reason, and
/// the `reason` label of `fanout_connections_closed_total` (a small fixed
/// set). Decided once per connection, by whichever side ends it first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CloseReason {
    pub code: u16,
    pub reason: String,
    pub label: &'static str,
}

impl CloseReason {
    pub fn new(code: u16, reason: impl Into<String>, label: &'static str) -> Self {
        Self {
            code,
            reason: reason.into(),
            label,
        }
    }

    /// The connection ended from the client's side (close frame or EOF):
    /// nothing to tell it.
    pub fn quiet(label: &'static str) -> Self {
        Self::new(close_code::NORMAL, "", label)
    }

    /// The client broke the WebSocket protocol.
    pub fn protocol(reason: impl Into<String>) -> Self {
        Self::new(close_code::PROTOCOL_ERROR, reason, "protocol")
    }

    /// The client sent a message larger than the limit.
    pub fn too_big(reason: impl Into<String>) -> Self {
        Self::new(close_code::TOO_BIG, reason, "too_big")
    }

    /// The client sent text that is not UTF-8.
    pub fn bad_utf8(reason: impl Into<String>) -> Self {
        Self::new(close_code::INVALID_DATA, reason, "protocol")
    }

    /// The close frame's bytes.
    pub fn frame(&self) -> Bytes {
        close(self.code, &self.reason)
    }
}

/// Every `label` a [`CloseReason`] takes (the `reason` values of
/// `fanout_connections_closed_total`).
pub const CLOSE_LABELS: &[&str] = &[
    "eof",
    "client",
    "server",
    "shutdown",
    "idle",
    "protocol",
    "too_big",
    "disconnected",
];

/// WebSocket close codes fanout uses.
pub mod close_code {
    /// Normal closure (after the client's own close).
    pub const NORMAL: u16 = 1000;
    /// The server is shutting down or draining.
    pub const GOING_AWAY: u16 = 1001;
    /// The client broke the protocol (bad frame, a message inside another).
    pub const PROTOCOL_ERROR: u16 = 1002;
    /// A text message that is not UTF-8.
    pub const INVALID_DATA: u16 = 1007;
    /// A policy was violated: slow consumer, rate limit, idle timeout.
    pub const POLICY: u16 = 1008;
    /// A frame or message was larger than the configured limit.
    pub const TOO_BIG: u16 = 1009;
    /// An internal error.
    pub const INTERNAL: u16 = 1011;
    /// Disconnected through the server API, and welcome to reconnect.
    pub const SERVICE_RESTART: u16 = 1012;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_lengths() {
        assert_eq!(&encode(Opcode::Text, b"hi")[..], b"\x81\x02hi");
        let f = encode(Opcode::Binary, &[0u8; 200]);
        assert_eq!(&f[..4], &[0x82, 126, 0, 200]);
        assert_eq!(f.len(), 204);
        let f = encode(Opcode::Text, &vec![b'a'; 70_000]);
        assert_eq!(&f[..2], &[0x81, 127]);
        assert_eq!(u64::from_be_bytes(f[2..10].try_into().unwrap()), 70_000);
    }

    #[test]
    fn close_reason_is_cut_on_char_boundary() {
        let f = close(1008, &"é".repeat(100));
        // 2 header bytes, 2 code bytes, at most 123 reason bytes.
        assert!(f.len() <= 2 + 125);
        assert_eq!(f[0], 0x88);
        assert!(std::str::from_utf8(&f[4..]).is_ok());
        assert_eq!(u16::from_be_bytes([f[2], f[3]]), 1008);
    }
}
