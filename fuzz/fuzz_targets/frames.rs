//! The bytes a client sends after the WebSocket upgrade, read by the
//! connection's `FrameReader` (one frame at a time, fragments reassembled,
//! the message size limit, UTF-8 for text, pings, close), as the connection
//! drives it: `readable()` then `next_message()` until a close or an error.
//!
//! Asserts, beyond not panicking or hanging: what the reader delivers (each
//! text, binary and ping message, the client's close, or the close code it
//! ends with) is what a reference reader written from RFC 6455 expects
//! (`model` below), and is the same however the bytes arrive: all already
//! buffered after the upgrade, in one read, one byte per read, or in reads
//! of 7 bytes after 3 buffered ones.
#![no_main]

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use fanout_edge::fuzzing::{FrameReader, Incoming};
use fanout_fuzz::block_on;
use libfuzzer_sys::fuzz_target;
use tokio::io::{AsyncRead, ReadBuf};

/// The message size limit; small, so that the fuzzer reaches it with the
/// 16-bit length form and with fragments.
const MAX: usize = 200;

/// Close codes the reader ends with.
const EOF: u16 = 1000;
const PROTOCOL: u16 = 1002;
const BAD_UTF8: u16 = 1007;
const TOO_BIG: u16 = 1009;

#[derive(Debug, PartialEq, Eq)]
enum Got {
    Text(Vec<u8>),
    Binary(Vec<u8>),
    Ping(Vec<u8>),
    Close,
    /// The reader gave up with this close code (1000: the stream ended).
    End(u16),
}

/// An in-memory socket that hands out at most `chunk` bytes per read and is
/// always ready.
struct Chunked<'a> {
    data: &'a [u8],
    chunk: usize,
}

impl AsyncRead for Chunked<'_> {
    fn poll_read(mut self: Pin<&mut Self>, _: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let n = self.chunk.min(self.data.len()).min(buf.remaining());
        let (now, rest) = self.data.split_at(n);
        buf.put_slice(now);
        self.data = rest;
        Poll::Ready(Ok(()))
    }
}

fn read_all(buffered: &[u8], socket: &[u8], chunk: usize) -> Vec<Got> {
    let mut reader = FrameReader::new(Chunked { data: socket, chunk }, Bytes::copy_from_slice(buffered), MAX);
    let mut out = Vec::new();
    block_on(async {
        loop {
            reader.readable().await.expect("in-memory reads do not fail");
            match reader.next_message().await {
                Ok(Incoming::Text(t)) => {
                    assert!(std::str::from_utf8(&t).is_ok(), "text message is not UTF-8");
                    out.push(Got::Text(t));
                }
                Ok(Incoming::Binary(b)) => out.push(Got::Binary(b)),
                Ok(Incoming::Ping(p)) => out.push(Got::Ping(p)),
                Ok(Incoming::Close) => {
                    out.push(Got::Close);
                    break;
                }
                Ok(Incoming::Nothing) => {}
                Err(close) => {
                    out.push(Got::End(close.code));
                    break;
                }
            }
        }
    });
    for g in &out {
        if let Got::Text(m) | Got::Binary(m) = g {
            assert!(m.len() <= MAX, "a {}-byte message passed the {MAX}-byte limit", m.len());
        }
    }
    out
}

/// A reference reader, from RFC 6455 section 5, with the leniencies the
/// server has on purpose: unmasked client frames are read (the RFC says a
/// server must close), and only a ping's body is checked (a close ends the
/// connection whatever its body says; a pong is ignored). When a frame
/// breaks several rules, a frame's own faults (bits, opcode, fragmented
/// control frame, ping size, size limit, truncation, UTF-8 of an
/// unfragmented text) come before those of its place in the stream.
fn model(bytes: &[u8]) -> Vec<Got> {
    let mut out = Vec::new();
    let mut at = 0;
    // A fragmented message being assembled: is it text, and its bytes.
    let mut partial: Option<(bool, Vec<u8>)> = None;
    loop {
        let rest = &bytes[at..];
        if rest.len() < 2 {
            out.push(Got::End(EOF));
            return out;
        }
        let fin = rest[0] & 0x80 != 0;
        let opcode = rest[0] & 0x0f;
        if rest[0] & 0x70 != 0 || !matches!(opcode, 0 | 1 | 2 | 8 | 9 | 10) {
            out.push(Got::End(PROTOCOL));
            return out;
        }
        let masked = rest[1] & 0x80 != 0;
        let ext = match rest[1] & 0x7f {
            126 => 2,
            127 => 8,
            _ => 0,
        };
        let header = 2 + ext + if masked { 4 } else { 0 };
        if rest.len() < header {
            out.push(Got::End(EOF));
            return out;
        }
        let len = match ext {
            2 => u64::from(u16::from_be_bytes([rest[2], rest[3]])),
            8 => u64::from_be_bytes(rest[2..10].try_into().unwrap()),
            _ => u64::from(rest[1] & 0x7f),
        };
        let control = opcode >= 8;
        let fault = if (control && !fin) || (opcode == 9 && len > 125) {
            Some(PROTOCOL)
        } else if len > MAX as u64 {
            Some(TOO_BIG)
        } else if ((rest.len() - header) as u64) < len {
            Some(EOF)
        } else {
            None
        };
        if let Some(code) = fault {
            out.push(Got::End(code));
            return out;
        }
        let len = len as usize;
        let mut payload = rest[header..header + len].to_vec();
        if masked {
            let key = &rest[header - 4..header];
            for (i, b) in payload.iter_mut().enumerate() {
                *b ^= key[i % 4];
            }
        }
        at += header + len;
        let utf8 = |b: &[u8]| std::str::from_utf8(b).is_ok();
        match opcode {
            1 if fin && !utf8(&payload) => {
                out.push(Got::End(BAD_UTF8));
                return out;
            }
            1 | 2 if partial.is_some() => {
                out.push(Got::End(PROTOCOL));
                return out;
            }
            1 | 2 if !fin => partial = Some((opcode == 1, payload)),
            1 => out.push(Got::Text(payload)),
            2 => out.push(Got::Binary(payload)),
            0 => {
                let Some((text, mut buf)) = partial.take() else {
                    out.push(Got::End(PROTOCOL));
                    return out;
                };
                if buf.len() + payload.len() > MAX {
                    out.push(Got::End(TOO_BIG));
                    return out;
                }
                buf.extend_from_slice(&payload);
                if !fin {
                    partial = Some((text, buf));
                } else if !text {
                    out.push(Got::Binary(buf));
                } else if utf8(&buf) {
                    out.push(Got::Text(buf));
                } else {
                    out.push(Got::End(BAD_UTF8));
                    return out;
                }
            }
            8 => {
                out.push(Got::Close);
                return out;
            }
            9 => out.push(Got::Ping(payload)),
            _ => {} // pong
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let expected = model(data);
    let split = data.len().min(3);
    for (how, got) in [
        ("all buffered", read_all(data, &[], 1)),
        ("one read", read_all(&[], data, usize::MAX)),
        ("byte by byte", read_all(&[], data, 1)),
        (
            "3 buffered, then 7 per read",
            read_all(&data[..split], &data[split..], 7),
        ),
    ] {
        assert_eq!(got, expected, "{how}: the reader disagrees with RFC 6455");
    }
});
