//! Engine.IO over HTTP long-polling, and its upgrade to WebSocket.
//!
//! socket.io-client's default transports start with polling: a GET opens
//! the session (its answer is the open packet), further GETs wait for
//! packets, POSTs carry the client's, each body a run of packets separated
//! by `\x1e` (binary ones as `b<base64>`). The client then probes a
//! WebSocket with the same `sid` (`2probe` / `3probe`), the server ends the
//! pending GET with a noop, and after the client's upgrade packet (`5`)
//! everything goes over the WebSocket.
//!
//! The session task is the WebSocket one ([`super::serve_session`]); only
//! its socket differs. The client side is a pipe into which POSTs write
//! frames (and, after the upgrade, the WebSocket's bytes are copied); the
//! server side is [`PollSink`], which turns the frames the session writes
//! into polling packets for the next GET until the upgrade hands it the
//! WebSocket's write half. The sink's packet queue is bounded: when a
//! client stops polling, the session's writer queues and then closes it as
//! a slow consumer, as it does a WebSocket.
//!
//! A polling session lives on the edge that opened it: across edges,
//! polling clients need session affinity (the Helm chart documents it);
//! WebSocket-only clients need none.

use std::collections::{HashMap, VecDeque};
use std::io::{self, IoSlice};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use base64::Engine as _;
use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncWriteExt, DuplexStream};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};

use crate::Edge;
use crate::frame::{self, Opcode};
use crate::reader::{FrameReader, Incoming};
use crate::writer::SocketWrite;

/// Packet bytes a session may hold for its next GET before its writer has
/// to queue (and, past its own limit, close the session).
const MAX_QUEUED_BYTES: usize = 1 << 20;

/// How long a GET waits for packets (the server's pings come sooner).
const MAX_POLL_WAIT: Duration = Duration::from_secs(60);

/// The separator of packets in a polling body.
const SEPARATOR: char = '\x1e';

/// This edge's polling sessions, by `sid`.
#[derive(Default)]
pub(crate) struct Registry {
    sessions: Mutex<HashMap<String, Arc<PollSession>>>,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry")
            .field("sessions", &self.lock().len())
            .finish()
    }
}

impl Registry {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<PollSession>>> {
        self.sessions.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn get(&self, sid: &str) -> Option<Arc<PollSession>> {
        self.lock().get(sid).cloned()
    }

    fn insert(&self, session: Arc<PollSession>) {
        self.lock().insert(session.sid.clone(), session);
    }

    fn remove(&self, sid: &str) {
        self.lock().remove(sid);
    }
}

/// One polling session's two directions.
pub(crate) struct PollSession {
    sid: String,
    /// Where POSTs write the client's frames; taken by the upgrade.
    inbound: tokio::sync::Mutex<Option<DuplexStream>>,
    out: Mutex<Out>,
    /// Woken when packets are queued or the session ends.
    ready: tokio::sync::Notify,
    /// A GET is waiting (one at a time).
    polling: AtomicBool,
}

#[derive(Default)]
struct Out {
    /// Frame bytes the session wrote that do not make a whole frame yet.
    raw: BytesMut,
    packets: VecDeque<String>,
    bytes: usize,
    closed: bool,
    /// After the upgrade: the WebSocket's write half (installed once
    /// every packet queued for polling has been written to it).
    ws: Option<OwnedWriteHalf>,
    /// The session's writer, waiting for room.
    waker: Option<Waker>,
}

impl Out {
    /// Moves every whole frame of `raw` into `packets`.
    fn parse(&mut self) {
        loop {
            let Some((opcode, header, len)) = frame_header(&self.raw) else {
                return;
            };
            if self.raw.len() < header + len {
                return;
            }
            let mut whole = self.raw.split_to(header + len);
            whole.advance(header);
            let packet = match opcode {
                0x1 => String::from_utf8_lossy(&whole).into_owned(),
                0x2 => format!("b{}", base64::engine::general_purpose::STANDARD.encode(&whole)),
                // The session's close frame: the Engine.IO close packet.
                0x8 => {
                    self.closed = true;
                    "1".to_owned()
                }
                _ => continue,
            };
            self.bytes += packet.len();
            self.packets.push_back(packet);
        }
    }
}

/// A server frame's opcode, header length and payload length (server
/// frames are unmasked and final).
fn frame_header(b: &[u8]) -> Option<(u8, usize, usize)> {
    let (b0, b1) = (*b.first()?, *b.get(1)?);
    let (header, len) = match b1 & 0x7f {
        126 => (4, usize::from(u16::from_be_bytes([*b.get(2)?, *b.get(3)?]))),
        127 => (
            10,
            usize::try_from(u64::from_be_bytes(b.get(2..10)?.try_into().ok()?)).ok()?,
        ),
        n => (2, usize::from(n)),
    };
    Some((b0 & 0x0f, header, len))
}

/// A client frame (masked, with a zero key: masking is then the identity)
/// for the session's reader.
fn client_frame(opcode: Opcode, payload: &[u8]) -> Vec<u8> {
    let server = frame::encode(opcode, payload);
    let header = frame_header(&server).map_or(2, |(_, h, _)| h);
    let mut out = Vec::with_capacity(server.len() + 4);
    out.extend_from_slice(&server[..header]);
    out[1] |= 0x80;
    out.extend_from_slice(&[0; 4]);
    out.extend_from_slice(&server[header..]);
    out
}

impl PollSession {
    fn lock(&self) -> std::sync::MutexGuard<'_, Out> {
        self.out.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn push(&self, packet: &str) {
        let mut out = self.lock();
        out.bytes += packet.len();
        out.packets.push_back(packet.to_owned());
        drop(out);
        self.ready.notify_one();
    }

    /// A GET: waits for packets and answers them joined, or `None` when
    /// another GET is already waiting.
    pub(crate) async fn poll(&self) -> Option<String> {
        if self.polling.swap(true, Ordering::AcqRel) {
            return None;
        }
        // Cleared however the GET ends (hyper drops it when the client
        // goes away mid-poll).
        struct Polling<'a>(&'a AtomicBool);
        impl Drop for Polling<'_> {
            fn drop(&mut self) {
                self.0.store(false, Ordering::Release);
            }
        }
        let _polling = Polling(&self.polling);
        let deadline = tokio::time::Instant::now() + MAX_POLL_WAIT;
        let body = loop {
            {
                let mut out = self.lock();
                if !out.packets.is_empty() || out.closed {
                    let packets: Vec<String> = out.packets.drain(..).collect();
                    out.bytes = 0;
                    if let Some(w) = out.waker.take() {
                        w.wake();
                    }
                    let sep = SEPARATOR.to_string();
                    break if packets.is_empty() {
                        "1".to_owned()
                    } else {
                        packets.join(&sep)
                    };
                }
            }
            tokio::select! {
                () = self.ready.notified() => {}
                () = tokio::time::sleep_until(deadline) => break "6".to_owned(),
            }
        };
        Some(body)
    }

    /// A POST: the client's packets, as frames for the session's reader.
    /// `Err` with the reason when they cannot be taken.
    pub(crate) async fn post(&self, body: &[u8]) -> Result<(), &'static str> {
        let text = std::str::from_utf8(body).map_err(|_| "the body is not UTF-8")?;
        let mut frames = Vec::with_capacity(body.len() + 16);
        for packet in text.split(SEPARATOR) {
            match packet.strip_prefix('b') {
                Some(b64) => {
                    let bytes = base64::engine::general_purpose::STANDARD
                        .decode(b64)
                        .map_err(|_| "a binary packet is not base64")?;
                    frames.extend(client_frame(Opcode::Binary, &bytes));
                }
                None => frames.extend(client_frame(Opcode::Text, packet.as_bytes())),
            }
        }
        let mut inbound = self.inbound.lock().await;
        let pipe = inbound.as_mut().ok_or("the session moved to WebSocket")?;
        pipe.write_all(&frames).await.map_err(|_| "the session is closed")
    }
}

/// The session's socket on the server side: polling packets, then the
/// upgraded WebSocket.
pub(crate) struct PollSink(Arc<PollSession>);

impl SocketWrite for PollSink {
    fn try_write_vectored(&self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        let mut out = self.0.lock();
        if let Some(ws) = &out.ws {
            return ws.as_ref().try_write_vectored(bufs);
        }
        if out.closed {
            return Err(io::ErrorKind::BrokenPipe.into());
        }
        if out.bytes >= MAX_QUEUED_BYTES {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        let mut total = 0;
        for b in bufs {
            out.raw.extend_from_slice(b);
            total += b.len();
        }
        out.parse();
        drop(out);
        self.0.ready.notify_one();
        Ok(total)
    }

    fn poll_writable(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let mut out = self.0.lock();
        if let Some(ws) = &out.ws {
            return ws.as_ref().poll_write_ready(cx);
        }
        if out.bytes < MAX_QUEUED_BYTES || out.closed {
            return Poll::Ready(Ok(()));
        }
        out.waker = Some(cx.waker().clone());
        Poll::Pending
    }

    fn shutdown_write(&self) {
        let mut out = self.0.lock();
        match &out.ws {
            Some(ws) => {
                let _ = socket2::SockRef::from(ws.as_ref()).shutdown(std::net::Shutdown::Write);
            }
            None => out.closed = true,
        }
        drop(out);
        self.0.ready.notify_one();
    }
}

/// Opens a polling session: starts its task and answers the first GET
/// (the open packet). `slot` is the connection's admission.
pub(crate) async fn open(edge: Arc<Edge>, slot: crate::admission::Slot) -> String {
    let sid = super::random_id();
    let (read, write) = tokio::io::duplex(64 * 1024);
    let session = Arc::new(PollSession {
        sid: sid.clone(),
        inbound: tokio::sync::Mutex::new(Some(write)),
        out: Mutex::default(),
        ready: tokio::sync::Notify::new(),
        polling: AtomicBool::new(false),
    });
    edge.polling.insert(session.clone());
    metrics::counter!("fanout_socketio_polling_sessions_total").increment(1);
    let sink = Box::new(PollSink(session.clone()));
    let task_edge = edge.clone();
    edge.tasks.spawn(async move {
        let edge = task_edge;
        let parts = crate::conn::SocketParts {
            read,
            write: sink,
            leftover: Bytes::new(),
            slot,
        };
        super::serve_session(edge.clone(), parts, sid.clone(), &["websocket"]).await;
        // Keep the ended session a moment, so a GET already on its way gets
        // the close packet rather than "unknown session".
        tokio::select! {
            () = tokio::time::sleep(Duration::from_secs(5)) => {}
            () = edge.shutdown.cancelled() => {}
        }
        edge.polling.remove(&sid);
    });
    session.poll().await.unwrap_or_default()
}

/// Takes a polling session over to an upgraded WebSocket: answers the
/// probe, ends the pending GET, waits for the upgrade packet, then moves
/// both directions to the socket.
pub(crate) async fn upgrade(
    edge: Arc<Edge>,
    session: Arc<PollSession>,
    read: OwnedReadHalf,
    mut write: OwnedWriteHalf,
    leftover: Bytes,
) {
    let limit = edge.config.limits.max_frame_bytes;
    let wait = edge.config.limits.handshake_timeout;
    let mut reader = FrameReader::new(read, leftover, limit);
    let next_text =
        async |reader: &mut FrameReader<OwnedReadHalf>| match tokio::time::timeout(wait, reader.next_message()).await {
            Ok(Ok(Incoming::Text(t))) => Some(t),
            _ => None,
        };
    if next_text(&mut reader).await.as_deref() != Some(b"2probe".as_slice()) {
        return;
    }
    if write.write_all(&frame::encode(Opcode::Text, b"3probe")).await.is_err() {
        return;
    }
    // The pending GET ends with a noop, and the client stops polling.
    session.push("6");
    if next_text(&mut reader).await.as_deref() != Some(b"5".as_slice()) {
        return;
    }
    let Some(mut pipe) = session.inbound.lock().await.take() else {
        return;
    };
    // What no GET took goes first, as frames written here; the socket is
    // handed to the sink only once nothing is left queued, under the lock,
    // so no frame can slip in between (and none waits for a later write to
    // flush it).
    loop {
        let queued: (Vec<String>, Bytes) = {
            let mut out = session.lock();
            let queued: Vec<String> = out.packets.drain(..).collect();
            out.bytes = 0;
            if let Some(w) = out.waker.take() {
                w.wake();
            }
            if queued.is_empty() && out.raw.is_empty() {
                out.ws = Some(write);
                break;
            }
            // Bytes not parsed into a packet yet (an incomplete frame)
            // follow the packets, as they were written.
            (queued, out.raw.split().freeze())
        };
        let (queued, raw) = queued;
        let mut frames = Vec::new();
        for p in queued {
            let f = match p
                .strip_prefix('b')
                .map(|b| base64::engine::general_purpose::STANDARD.decode(b))
            {
                Some(Ok(bytes)) => frame::encode(Opcode::Binary, &bytes),
                _ => frame::encode(Opcode::Text, p.as_bytes()),
            };
            frames.extend_from_slice(&f);
        }
        frames.extend_from_slice(&raw);
        if write.write_all(&frames).await.is_err() {
            return;
        }
    }
    metrics::counter!("fanout_socketio_upgrades_total").increment(1);
    session.ready.notify_one();
    let (mut read, pending) = reader.into_parts();
    if pipe.write_all(&pending).await.is_ok() {
        let _ = tokio::io::copy(&mut read, &mut pipe).await;
    }
    // The client is gone: the session's reader sees the end of its pipe.
    drop(pipe);
}

#[cfg(test)]
mod tests {
    use super::*;
    use fanout_bus::{MemoryBus, MemoryPresence, Retention};
    use tokio::io::AsyncReadExt;

    /// A packet queued for polling when the client upgrades (say, the
    /// CONNECT answer, which a NATS subscription delays) must reach it over
    /// the WebSocket at once, not wait for a later frame to flush it.
    #[tokio::test]
    async fn packets_no_get_took_are_written_to_the_websocket_at_the_upgrade() {
        let edge = Edge::new(
            crate::EdgeConfig::default(),
            1,
            Arc::new(MemoryBus::new(Retention::default())),
            Arc::new(MemoryPresence::new(1)),
            None,
            tokio_util::sync::CancellationToken::new(),
        );
        let (_read, write) = tokio::io::duplex(1024);
        let session = Arc::new(PollSession {
            sid: "s".into(),
            inbound: tokio::sync::Mutex::new(Some(write)),
            out: Mutex::default(),
            ready: tokio::sync::Notify::new(),
            polling: AtomicBool::new(false),
        });
        let sink = PollSink(session.clone());
        let connect_ok = frame::encode(Opcode::Text, br#"40/room,{"sid":"x"}"#);
        // Queued while no GET waits.
        sink.try_write_vectored(&[IoSlice::new(&connect_ok)]).unwrap();

        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut client = tokio::net::TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (server, _) = listener.accept().await.unwrap();
        let (read, write) = server.into_split();
        let task = tokio::spawn(upgrade(edge, session.clone(), read, write, Bytes::new()));
        client.write_all(&client_frame(Opcode::Text, b"2probe")).await.unwrap();
        let mut buf = vec![0u8; 256];
        let n = client.read(&mut buf).await.unwrap();
        assert_eq!(&buf[..n], &frame::encode(Opcode::Text, b"3probe")[..]);
        client.write_all(&client_frame(Opcode::Text, b"5")).await.unwrap();
        // The CONNECT answer, then the noop meant for the GET, in the order
        // they were queued, over the socket.
        let mut want = connect_ok.to_vec();
        want.extend_from_slice(&frame::encode(Opcode::Text, b"6"));
        let mut got = Vec::new();
        while got.len() < want.len() {
            let n = tokio::time::timeout(std::time::Duration::from_secs(2), client.read(&mut buf))
                .await
                .expect("the queued packets arrive without a later write")
                .unwrap();
            assert!(n > 0, "socket closed");
            got.extend_from_slice(&buf[..n]);
        }
        assert_eq!(got, want);
        // From now on the sink writes to the socket.
        let next = frame::encode(Opcode::Text, b"42[\"e\",1]");
        sink.try_write_vectored(&[IoSlice::new(&next)]).unwrap();
        let n = client.read(&mut buf).await.unwrap();
        assert_eq!(&buf[..n], &next[..]);
        drop(client);
        let _ = tokio::time::timeout(std::time::Duration::from_secs(2), task).await;
    }

    #[test]
    fn server_frames_become_polling_packets() {
        let mut out = Out::default();
        let text = frame::encode(Opcode::Text, b"42[\"a\",1]");
        let bin = frame::encode(Opcode::Binary, &[0, 1, 2]);
        let big = frame::encode(Opcode::Text, "x".repeat(300).as_bytes());
        let mut all = Vec::new();
        all.extend_from_slice(&text);
        all.extend_from_slice(&bin);
        all.extend_from_slice(&big);
        // Handed over in two pieces, split inside a frame.
        out.raw.extend_from_slice(&all[..5]);
        out.parse();
        assert!(out.packets.is_empty(), "half a frame is not a packet");
        out.raw.extend_from_slice(&all[5..]);
        out.parse();
        assert_eq!(out.packets[0], "42[\"a\",1]");
        assert_eq!(out.packets[1], "bAAEC");
        assert_eq!(out.packets[2].len(), 300);
        out.raw.extend_from_slice(&frame::close(1000, ""));
        out.parse();
        assert_eq!(out.packets.back().map(String::as_str), Some("1"));
        assert!(out.closed);
    }

    #[test]
    fn client_frames_are_masked_with_a_zero_key() {
        let f = client_frame(Opcode::Text, b"40");
        assert_eq!(f, [0x81, 0x82, 0, 0, 0, 0, b'4', b'0']);
        let long = client_frame(Opcode::Binary, &[7; 200]);
        assert_eq!(&long[..8], &[0x82, 0xfe, 0, 200, 0, 0, 0, 0]);
        assert_eq!(long.len(), 8 + 200);
    }
}
