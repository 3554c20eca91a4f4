//! The read side of a connection: one frame at a time, no buffer between.
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
//! header bytes); fastwebsockets still does the real parsing, validation and
//! unmasking.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use fastwebsockets::{Frame, Role, WebSocketError};
use tokio::io::{AsyncRead, ReadBuf};
use tokio::net::tcp::OwnedReadHalf;

/// Passes through the bytes of exactly one frame, then reports EOF.
struct OneFrame<'a> {
    src: &'a mut Source,
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
pub struct Source {
    pending: Bytes,
    read: OwnedReadHalf,
}

impl Source {
    fn poll_fill(&mut self, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        if !self.pending.is_empty() {
            let n = self.pending.len().min(buf.remaining());
            buf.put_slice(&self.pending.split_to(n));
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.read).poll_read(cx, buf)
    }
}

impl OneFrame<'_> {
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

impl AsyncRead for OneFrame<'_> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        // Complete the header first, in our own 14 bytes.
        while this.header_len.is_none() {
            let want = if this.filled < 2 { 2 } else { this.needed() };
            if this.filled == want && this.filled >= 2 {
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
        let header_len = this.header_len.unwrap_or(0);
        if this.passed < header_len {
            let n = (header_len - this.passed).min(buf.remaining());
            buf.put_slice(&this.header[this.passed..this.passed + n]);
            this.passed += n;
            return Poll::Ready(Ok(()));
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

/// Reads frames one at a time, holding no buffer between them.
pub struct FrameReader {
    src: Source,
    max_message_size: usize,
}

impl FrameReader {
    pub fn new(read: OwnedReadHalf, leftover: Bytes, max_message_size: usize) -> Self {
        Self {
            src: Source {
                pending: leftover,
                read,
            },
            max_message_size,
        }
    }

    /// Waits until bytes have arrived (or the peer closed). Cancel-safe: a
    /// byte taken from the socket is kept in `pending` within the same poll.
    ///
    /// tokio's readiness flag stays set until a read sees `WouldBlock`, and
    /// a frame read ends exactly at the frame's last byte, so `readable()`
    /// alone would report a drained socket as readable and the caller would
    /// then wait *inside* `read_frame`, holding fastwebsockets' 8 KiB read
    /// buffer for as long as the connection stays idle. Reading a few bytes
    /// here clears a stale flag instead.
    pub async fn readable(&mut self) -> io::Result<()> {
        while self.src.pending.is_empty() {
            self.src.read.readable().await?;
            let mut first = [0u8; 64];
            match self.src.read.try_read(&mut first) {
                Ok(n) => {
                    // n == 0 is end of stream: let read_frame report it.
                    self.src.pending = Bytes::copy_from_slice(&first[..n]);
                    return Ok(());
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
            }
        }
        Ok(())
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

    /// Reads one frame (masking removed, payload owned).
    pub async fn read_frame(&mut self) -> Result<(Frame<'static>, bool), WebSocketError> {
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
        ws.set_max_message_size(self.max_message_size);
        let mut send = |_: Frame<'_>| std::future::ready(Ok::<(), std::convert::Infallible>(()));
        let frame = ws.read_frame(&mut send).await?;
        let fin = frame.fin;
        let owned = Frame::new(
            fin,
            frame.opcode,
            None,
            fastwebsockets::Payload::Owned(frame.payload.to_vec()),
        );
        Ok((owned, fin))
    }
}
