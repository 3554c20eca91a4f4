//! A lean Supabase Realtime client for load: a hand-rolled HTTP upgrade over
//! a raw `TcpStream` (bound to a chosen loopback source address), then
//! fastwebsockets frames on the split halves.

use std::net::{IpAddr, SocketAddr};

use anyhow::{Context, Result, bail};
use fastwebsockets::{Frame, OpCode, Payload, Role, WebSocketRead, WebSocketWrite};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpSocket;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};

pub type Reader = WebSocketRead<tokio::io::Chain<std::io::Cursor<Vec<u8>>, OwnedReadHalf>>;
pub type Writer = WebSocketWrite<OwnedWriteHalf>;

/// A target: `host:port` and the path prefix, from a `ws://host:port/realtime/v1` URL.
#[derive(Debug, Clone)]
pub struct Target {
    pub addr: SocketAddr,
    pub host: String,
    pub base_path: String,
}

impl Target {
    pub fn parse(url: &str) -> Result<Self> {
        let rest = url.strip_prefix("ws://").context("only ws:// URLs are supported")?;
        let (hostport, path) = rest.split_once('/').map_or((rest, ""), |(h, p)| (h, p));
        let addr: SocketAddr = hostport
            .parse()
            .or_else(|_| hostport.replace("localhost", "127.0.0.1").parse())
            .with_context(|| format!("{hostport} is not an ip:port"))?;
        Ok(Self {
            addr,
            host: hostport.to_owned(),
            base_path: format!("/{}", path.trim_end_matches('/')),
        })
    }
}

/// Opens a WebSocket to `target` with `vsn` and optional `apikey`, from
/// `source` (a loopback address) when given.
pub async fn connect(
    target: &Target,
    vsn: &str,
    apikey: Option<&str>,
    source: Option<IpAddr>,
) -> Result<(Reader, Writer)> {
    let mut path = format!("{}/websocket?vsn={vsn}", target.base_path);
    if let Some(k) = apikey {
        path.push_str("&apikey=");
        path.push_str(k);
    }
    connect_path(target, &path, source).await
}

/// Opens a TCP connection to `target` from `source` (when given).
async fn tcp(target: &Target, source: Option<IpAddr>) -> Result<tokio::net::TcpStream> {
    let sock = TcpSocket::new_v4()?;
    if let Some(ip) = source {
        sock.bind(SocketAddr::new(ip, 0))?;
    }
    let stream = sock.connect(target.addr).await?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// Opens a WebSocket to `path` (with query) on `target`'s host.
pub async fn connect_path(target: &Target, path: &str, source: Option<IpAddr>) -> Result<(Reader, Writer)> {
    let mut stream = tcp(target, source).await?;
    let key = fastwebsockets::handshake::generate_key();
    let req = format!(
        "GET {path} HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n",
        target.host
    );
    stream.write_all(req.as_bytes()).await?;
    let mut buf = Vec::with_capacity(512);
    let header_end = loop {
        let mut chunk = [0u8; 512];
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            bail!("connection closed during the handshake");
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        if buf.len() > 16 * 1024 {
            bail!("handshake response too large");
        }
    };
    let head = String::from_utf8_lossy(&buf[..header_end]);
    if !head.starts_with("HTTP/1.1 101") {
        let status = head.lines().next().unwrap_or("").to_owned();
        let body = String::from_utf8_lossy(&buf[header_end..]).into_owned();
        bail!("handshake refused: {status} {body}");
    }
    let leftover = buf[header_end..].to_vec();
    let (r, w) = stream.into_split();
    let r = std::io::Cursor::new(leftover).chain(r);
    Ok(fastwebsockets::after_handshake_split(r, w, Role::Client))
}

/// Sends a text frame.
pub async fn send_text(w: &mut Writer, text: &str) -> Result<()> {
    w.write_frame(Frame::text(Payload::Borrowed(text.as_bytes()))).await?;
    Ok(())
}

/// Sends a binary frame.
pub async fn send_binary(w: &mut Writer, bytes: &[u8]) -> Result<()> {
    w.write_frame(Frame::binary(Payload::Borrowed(bytes))).await?;
    Ok(())
}

/// What arrived.
pub enum Incoming {
    Text(Vec<u8>),
    Binary(Vec<u8>),
    Closed(String),
}

fn no_send(_: Frame<'_>) -> std::future::Ready<Result<(), std::convert::Infallible>> {
    std::future::ready(Ok(()))
}

/// Reads the next data frame (control frames are skipped; pongs are not
/// needed because the server never pings).
pub async fn recv(r: &mut Reader) -> Incoming {
    let mut send = no_send;
    loop {
        match r.read_frame(&mut send).await {
            Ok(f) => match f.opcode {
                OpCode::Text => return Incoming::Text(f.payload.to_vec()),
                OpCode::Binary => return Incoming::Binary(f.payload.to_vec()),
                OpCode::Close => {
                    let p = f.payload.to_vec();
                    let code = if p.len() >= 2 {
                        u16::from_be_bytes([p[0], p[1]])
                    } else {
                        1005
                    };
                    return Incoming::Closed(format!(
                        "close {code} {}",
                        String::from_utf8_lossy(p.get(2..).unwrap_or(&[]))
                    ));
                }
                _ => continue,
            },
            Err(e) => return Incoming::Closed(e.to_string()),
        }
    }
}

/// A binary kind-3 "user broadcast push" (what realtime-js sends for
/// `channel.send({type: "broadcast"})`).
pub fn broadcast_push(join_ref: &str, r#ref: &str, topic: &str, event: &str, json: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(7 + join_ref.len() + r#ref.len() + topic.len() + event.len() + json.len());
    v.extend_from_slice(&[
        3,
        join_ref.len() as u8,
        r#ref.len() as u8,
        topic.len() as u8,
        event.len() as u8,
        0,
        1,
    ]);
    for s in [join_ref, r#ref, topic, event] {
        v.extend_from_slice(s.as_bytes());
    }
    v.extend_from_slice(json);
    v
}

/// Parses a binary kind-4 broadcast: returns (user event, meta JSON, payload JSON).
pub fn parse_broadcast(b: &[u8]) -> Option<(&[u8], &[u8], &[u8])> {
    if b.len() < 5 || b[0] != 4 {
        return None;
    }
    let (tl, el, ml) = (usize::from(b[1]), usize::from(b[2]), usize::from(b[3]));
    let ev = b.get(5 + tl..5 + tl + el)?;
    let meta = b.get(5 + tl + el..5 + tl + el + ml)?;
    let payload = b.get(5 + tl + el + ml..)?;
    Some((ev, meta, payload))
}

/// An HTTP/1.1 keep-alive connection that POSTs messages (the nchan
/// publisher endpoint, or fanout's server API). Requests are pipelined; a
/// task reads and discards the responses, counting them.
pub struct HttpPublisher {
    stream: OwnedWriteHalf,
    host: String,
    path: String,
    /// Extra header lines, each ending in CRLF.
    headers: String,
    /// Responses that were not 2xx.
    pub refused: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl HttpPublisher {
    pub async fn connect(target: &Target, path: &str, headers: &[(&str, &str)]) -> Result<Self> {
        let (mut r, w) = tcp(target, None).await?.into_split();
        let refused = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let counter = refused.clone();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 64 * 1024];
            let mut carry = Vec::new();
            loop {
                let n = match r.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => n,
                };
                carry.extend_from_slice(&buf[..n]);
                // Count status lines that are not 2xx; keep a tail for split lines.
                let text = String::from_utf8_lossy(&carry).into_owned();
                for line in text.split("\r\n").filter(|l| l.starts_with("HTTP/1.1 ")) {
                    if !line[9..].starts_with('2') {
                        counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                }
                let keep = carry.len().saturating_sub(16);
                carry.drain(..keep);
            }
        });
        Ok(Self {
            stream: w,
            host: target.host.clone(),
            path: path.to_owned(),
            headers: headers.iter().map(|(k, v)| format!("{k}: {v}\r\n")).collect(),
            refused,
        })
    }

    /// Sends one POST with `body` to the path it was opened with.
    pub async fn post(&mut self, body: &[u8]) -> Result<()> {
        let path = std::mem::take(&mut self.path);
        let r = self.post_to(&path, body).await;
        self.path = path;
        r
    }

    /// Sends one POST with `body` to `path` on the same connection.
    pub async fn post_to(&mut self, path: &str, body: &[u8]) -> Result<()> {
        let head = format!(
            "POST {} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n{}\r\n",
            path,
            self.host,
            body.len(),
            self.headers
        );
        self.stream.write_all(head.as_bytes()).await?;
        self.stream.write_all(body).await?;
        Ok(())
    }
}
