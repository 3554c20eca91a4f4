//! The read side of a connection: whole client messages, read one frame at a
//! time with no buffer between frames.
//!
//! [`FrameReader::next_message`] reads one frame and returns what the
//! connection must act on: a complete text or binary message (fragments
//! reassembled, the size limit applied to the whole message, text checked
//! for UTF-8), a ping to answer, or the client's close. Every way a client
//! can break the WebSocket protocol becomes a [`CloseReason`].
//!
//! fastwebsockets' `WebSocketRead` owns a read buffer for its whole life and
//! may read past the end of the current frame into it. That makes it unsafe
//! to wait on the socket directly (bytes may already sit in the buffer) and
//! unsafe to cancel a read (a half-parsed header is lost). [`FrameReader`]
//! keeps only the socket's read half and builds a `WebSocketRead` to read
//! one frame, over a [`OneFrame`] adapter that never hands it a byte past
//! the end of that frame. So:
//! - waiting for the next message is [`FrameReader::readable`], which is
//!   cancel-safe and can sit in a `select!` with shutdown and token expiry;
//! - an idle connection holds no read buffer at all.
//!
//! The adapter parses only what it must to find the frame's end (the 2 to 14
//! header bytes, passed on as they arrive); fastwebsockets still does the
//! real parsing, validation and unmasking.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use fastwebsockets::{Frame, OpCode, Role, WebSocketError};
use tokio::io::{AsyncRead, ReadBuf};

use crate::frame::CloseReason;

/// What one frame read gives the connection.
#[derive(Debug, PartialEq, Eq)]
pub enum Incoming {
    /// A complete text message (valid UTF-8).
    Text(Vec<u8>),
    /// A complete binary message.
    Binary(Vec<u8>),
    /// A ping, to answer with a pong carrying this payload.
    Ping(Vec<u8>),
    /// The client closed the connection.
    Close,
    /// Nothing to act on yet: a pong, or a fragment of a longer message.
    Nothing,
}

/// Passes through the bytes of exactly one frame, then reports EOF.
struct OneFrame<'a, R> {
    src: &'a mut Source<R>,
    header: [u8; 14],
    /// Header bytes read so far / header length once known.
    filled: usize,
    header_len: Option<usize>,
    /// Header bytes already passed on.
    passed: usize,
    /// Payload bytes still to pass on (known once the header is complete).
    payload_left: u64,
}

/// The socket's read half and any bytes read past the HTTP upgrade.
struct Source<R> {
    pending: Bytes,
    read: R,
}

impl<R: AsyncRead + Unpin> Source<R> {
    fn poll_fill(&mut self, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        if !self.pending.is_empty() {
            let n = self.pending.len().min(buf.remaining());
            buf.put_slice(&self.pending.split_to(n));
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.read).poll_read(cx, buf)
    }
}

impl<R> OneFrame<'_, R> {
    /// Header length implied by the first two bytes.
    fn needed(&self) -> usize {
        let b1 = self.header[1];
        let ext = match b1 & 0x7f {
            126 => 2,
            127 => 8,
            _ => 0,
        };
        2 + ext + if b1 & 0x80 != 0 { 4 } else { 0 }
    }
}

impl<R: AsyncRead + Unpin> AsyncRead for OneFrame<'_, R> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        // The header: read into our own 14 bytes, never past its end, and
        // pass each byte on as soon as it is read, so fastwebsockets judges
        // the first two bytes (reserved bits, opcode) without waiting for
        // the rest of the header.
        loop {
            if this.passed < this.filled {
                let n = (this.filled - this.passed).min(buf.remaining());
                buf.put_slice(&this.header[this.passed..this.passed + n]);
                this.passed += n;
                return Poll::Ready(Ok(()));
            }
            if this.header_len.is_some() {
                break;
            }
            let want = if this.filled < 2 { 2 } else { this.needed() };
            if this.filled == want {
                let len = match this.header[1] & 0x7f {
                    126 => u64::from(u16::from_be_bytes([this.header[2], this.header[3]])),
                    127 => u64::from_be_bytes(this.header[2..10].try_into().unwrap_or([0; 8])),
                    n => u64::from(n),
                };
                this.header_len = Some(want);
                this.payload_left = len;
                break;
            }
            let mut hb = ReadBuf::new(&mut this.header[this.filled..want]);
            ready!(this.src.poll_fill(cx, &mut hb))?;
            let n = hb.filled().len();
            if n == 0 {
                return Poll::Ready(Ok(())); // EOF
            }
            this.filled += n;
        }
        if this.payload_left == 0 {
            return Poll::Ready(Ok(())); // end of this frame
        }
        let limit = usize::try_from(this.payload_left)
            .unwrap_or(usize::MAX)
            .min(buf.remaining());
        // Initialize just the part this frame may fill, then read into it.
        let mut limited = ReadBuf::new(buf.initialize_unfilled_to(limit));
        ready!(this.src.poll_fill(cx, &mut limited))?;
        let n = limited.filled().len();
        buf.advance(n);
        this.payload_left -= n as u64;
        Poll::Ready(Ok(()))
    }
}

/// Reads frames one at a time, holding no buffer between them (except a
/// fragmented message being assembled).
pub struct FrameReader<R> {
    src: Source<R>,
    max_message_size: usize,
    /// A fragmented message being assembled: its opcode and bytes so far.
    partial: Option<(OpCode, Vec<u8>)>,
}

impl<R: AsyncRead + Unpin> FrameReader<R> {
    pub fn new(read: R, leftover: Bytes, max_message_size: usize) -> Self {
        Self {
            src: Source {
                pending: leftover,
                read,
            },
            max_message_size,
            partial: None,
        }
    }

    /// Waits until bytes have arrived (or the peer closed). Cancel-safe:
    /// bytes are taken from the socket only in a poll that also keeps them
    /// in `pending`.
    ///
    /// Waiting here rather than inside [`Self::next_message`] matters for
    /// memory: a frame read holds fastwebsockets' 8 KiB read buffer for as
    /// long as it waits, and a frame read ends exactly at the frame's last
    /// byte, so an idle connection would otherwise sit in one holding that
    /// buffer. The few bytes read here live in a stack array only for the
    /// poll that reads them.
    pub async fn readable(&mut self) -> io::Result<()> {
        if !self.src.pending.is_empty() {
            return Ok(());
        }
        std::future::poll_fn(|cx| {
            let mut first = [0u8; 64];
            let mut buf = ReadBuf::new(&mut first);
            ready!(Pin::new(&mut self.src.read).poll_read(cx, &mut buf))?;
            // Nothing read is end of stream: let the frame read report it.
            self.src.pending = Bytes::copy_from_slice(buf.filled());
            Poll::Ready(Ok(()))
        })
        .await
    }

    /// The read half and the bytes read from it but not yet used, for a
    /// caller that takes the stream over between two frames.
    pub fn into_parts(self) -> (R, Bytes) {
        (self.src.read, self.src.pending)
    }

    /// After our close frame: reads and discards until the client closes
    /// too (EOF), for at most `limit`. Closing the socket while the client
    /// is still sending would make the kernel answer with a reset, which can
    /// destroy our close frame, and its reason, before the client reads it.
    pub async fn linger(&mut self, limit: std::time::Duration) {
        use tokio::io::AsyncReadExt;
        let mut sink = [0u8; 1024];
        let drain = async {
            let mut total = 0usize;
            while let Ok(n) = self.src.read.read(&mut sink).await {
                total += n;
                if n == 0 || total > 1 << 20 {
                    break;
                }
            }
        };
        let _ = tokio::time::timeout(limit, drain).await;
    }

    /// Reads one frame and says what it means for the connection. Not
    /// cancel-safe: call it once [`Self::readable`] said bytes are there,
    /// and let only the end of the connection interrupt it.
    pub async fn next_message(&mut self) -> Result<Incoming, CloseReason> {
        let (fin, opcode, payload) = self.read_frame().await.map_err(|e| self.read_error(e))?;
        let max = self.max_message_size;
        match opcode {
            OpCode::Text | OpCode::Binary if self.partial.is_some() => {
                Err(CloseReason::protocol("new message inside a fragmented one"))
            }
            OpCode::Text | OpCode::Binary if !fin => {
                self.partial = Some((opcode, payload));
                Ok(Incoming::Nothing)
            }
            OpCode::Text => Ok(Incoming::Text(payload)),
            OpCode::Binary => Ok(Incoming::Binary(payload)),
            OpCode::Continuation => {
                let Some((_, buf)) = self.partial.as_mut() else {
                    return Err(CloseReason::protocol("continuation frame without a message"));
                };
                // The limit is on the whole message, not on each fragment.
                if buf.len() + payload.len() > max {
                    return Err(CloseReason::too_big(format!("message larger than {max} bytes")));
                }
                buf.extend_from_slice(&payload);
                if !fin {
                    return Ok(Incoming::Nothing);
                }
                match self.partial.take() {
                    Some((OpCode::Text, buf)) if std::str::from_utf8(&buf).is_err() => {
                        Err(CloseReason::bad_utf8("text message is not valid UTF-8"))
                    }
                    Some((OpCode::Text, buf)) => Ok(Incoming::Text(buf)),
                    Some((_, buf)) => Ok(Incoming::Binary(buf)),
                    None => Ok(Incoming::Nothing),
                }
            }
            OpCode::Close => Ok(Incoming::Close),
            OpCode::Ping => Ok(Incoming::Ping(payload)),
            OpCode::Pong => Ok(Incoming::Nothing),
        }
    }

    fn read_error(&self, e: WebSocketError) -> CloseReason {
        match e {
            WebSocketError::FrameTooLarge => {
                CloseReason::too_big(format!("frame larger than {} bytes", self.max_message_size))
            }
            WebSocketError::InvalidUTF8 => CloseReason::bad_utf8("text frame is not valid UTF-8"),
            WebSocketError::UnexpectedEOF | WebSocketError::IoError(_) | WebSocketError::ConnectionClosed => {
                CloseReason::quiet("eof")
            }
            other => CloseReason::protocol(format!("protocol error: {other}")),
        }
    }

    /// Reads one frame: its FIN bit, opcode and payload (masking removed).
    async fn read_frame(&mut self) -> Result<(bool, OpCode, Vec<u8>), WebSocketError> {
        let adapter = OneFrame {
            src: &mut self.src,
            header: [0; 14],
            filled: 0,
            header_len: None,
            passed: 0,
            payload_left: 0,
        };
        let (mut ws, _) = fastwebsockets::after_handshake_split(adapter, tokio::io::sink(), Role::Server);
        ws.set_auto_close(false);
        ws.set_auto_pong(false);
        // fastwebsockets refuses a frame of `max` bytes or more; the limit
        // is on messages larger than `max` (as for fragmented ones).
        ws.set_max_message_size(self.max_message_size.saturating_add(1));
        let mut send = |_: Frame<'_>| std::future::ready(Ok::<(), std::convert::Infallible>(()));
        let frame = ws.read_frame(&mut send).await?;
        Ok((frame.fin, frame.opcode, frame.payload.to_vec()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::close_code;
    use std::time::Duration;
    use tokio::io::AsyncWriteExt;

    /// A masked frame as a browser sends it.
    fn masked(first: u8, payload: &[u8]) -> Vec<u8> {
        let key = [0x37, 0xfa, 0x21, 0x3d];
        let mut f = vec![first, 0x80 | payload.len() as u8];
        f.extend_from_slice(&key);
        f.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
        f
    }

    /// Found by the `frames` fuzz target: the adapter held back the first two
    /// bytes until the whole header had arrived, so a frame with reserved
    /// bits set was only refused once 4 more bytes came (and ended as a
    /// quiet EOF when they never did).
    #[tokio::test(start_paused = true)]
    async fn the_first_two_bytes_are_judged_without_the_rest_of_the_header() {
        let (mut client, server) = tokio::io::duplex(64);
        // RSV1 on a masked text frame of 5 bytes; the mask never comes.
        client.write_all(&[0xc1, 0x85]).await.unwrap();
        let mut reader = FrameReader::new(server, Bytes::new(), 1024);
        let r = tokio::time::timeout(Duration::from_secs(5), reader.next_message())
            .await
            .expect("refused without waiting for the rest of the header");
        assert_eq!(r.map_err(|c| c.code), Err(close_code::PROTOCOL_ERROR));
        // The same with the stream ending there.
        let mut reader = FrameReader::new(&[0xc1u8, 0x85][..], Bytes::new(), 1024);
        assert_eq!(
            reader.next_message().await.map_err(|c| c.code),
            Err(close_code::PROTOCOL_ERROR)
        );
        // A whole frame, split between the bytes read with the upgrade and
        // the socket, still reads as one message.
        let frame = masked(0x81, b"hi");
        let mut reader = FrameReader::new(&frame[1..], Bytes::copy_from_slice(&frame[..1]), 1024);
        assert_eq!(reader.next_message().await, Ok(Incoming::Text(b"hi".to_vec())));
        drop(client);
    }

    /// Found by the `frames` fuzz target: an unfragmented message of
    /// exactly the limit was refused as "larger than" it, while the same
    /// message in fragments was accepted.
    #[tokio::test]
    async fn the_size_limit_is_on_messages_larger_than_it() {
        let read = |bytes: Vec<u8>| async move {
            let mut reader = FrameReader::new(&bytes[..], Bytes::new(), 16);
            let mut got = Vec::new();
            loop {
                match reader.next_message().await {
                    Ok(Incoming::Nothing) => {}
                    Ok(m) => got.push(Ok(m)),
                    Err(close) => {
                        got.push(Err(close.code));
                        return got;
                    }
                }
            }
        };
        let at_limit = vec![7u8; 16];
        assert_eq!(
            read(masked(0x82, &at_limit)).await,
            [Ok(Incoming::Binary(at_limit.clone())), Err(close_code::NORMAL)]
        );
        let mut fragments = masked(0x02, &at_limit[..8]);
        fragments.extend(masked(0x80, &at_limit[8..]));
        assert_eq!(
            read(fragments).await,
            [Ok(Incoming::Binary(at_limit.clone())), Err(close_code::NORMAL)]
        );
        assert_eq!(read(masked(0x82, &[7; 17])).await, [Err(close_code::TOO_BIG)]);
        let mut fragments = masked(0x02, &at_limit);
        fragments.extend(masked(0x80, b"x"));
        assert_eq!(read(fragments).await, [Err(close_code::TOO_BIG)]);
    }
}
