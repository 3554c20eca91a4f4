//! The Socket.IO front: `socket.io-client` 4 apps on the same channels,
//! bus and policies as Supabase clients.
//!
//! One task per Engine.IO session (`/socket.io/`), over the same
//! [`Socket`] paths as a Supabase connection: a WebSocket, or HTTP
//! long-polling upgraded to WebSocket ([`polling`]). Channels are reached
//! two ways:
//! - on the main namespace, `socket.emit('join', channel, ack)` and
//!   `socket.emit('leave', channel, ack)` (event names configurable): a
//!   joined channel's broadcasts arrive as `socket.on(event, payload)`;
//! - a namespace per channel: `io(base + '/workshop:42', { auth })` is a
//!   socket in channel `workshop:42`; its `emit(event, payload, ack)`
//!   broadcasts (write policy; the ack says it was accepted) and its
//!   `on(event)` receives. With recovery on, each event carries its
//!   position as its last argument and the CONNECT answer a `pid`, so a
//!   reconnecting socket (`pid` and `offset` in its CONNECT) gets what it
//!   missed, in order, once, through the same replay as a Supabase resume,
//!   and `socket.recovered` is true.
//!
//! Database changes routed to a joined channel arrive as a
//! `postgres_changes` event with the change record, under the token's row
//! rules (`Routes::bindings_for_channel`; a private channel's through a feed
//! in the public channel the ingester routes them to).
//!
//! Every namespace's CONNECT carries the token (`auth: { token }`),
//! checked like a Supabase client's; a refusal is a CONNECT_ERROR whose
//! message says why. Errors of emits with an ack are the ack's
//! `{ok: false, error}`; without one they arrive as a `fanout:error`
//! event.

pub mod packet;
pub(crate) mod polling;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use fanout_core::changes::Binding;
use fanout_core::{ChannelName, Claims, Event, Origin, Position};
use serde::Deserialize;
use serde_json::value::RawValue;
use tokio::io::AsyncRead;
use tokio::time::Instant;

use crate::Edge;
use crate::conn::{self, Socket, SocketParts};
use crate::control::Kick;
use crate::frame::{CloseReason, close_code};
use crate::hub::{JoinRequest, Member};
use crate::ratelimit::TokenBucket;
use crate::reader::{FrameReader, Incoming};
use crate::wire::Wire;
use crate::writer::ConnWriter;
use packet::{EnginePacket, Packet, PacketType};

/// Socket.IO settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SocketIoConfig {
    /// The server pings this often (Engine.IO `pingInterval`).
    pub ping_interval: Duration,
    /// A pong must come within this (Engine.IO `pingTimeout`).
    pub ping_timeout: Duration,
    /// The main namespace's event that joins a channel.
    pub join_event: String,
    /// The main namespace's event that leaves one.
    pub leave_event: String,
    /// Connection-state recovery on channel namespaces: a `pid` in the
    /// CONNECT answer and each event's position as its last argument.
    pub recovery: bool,
}

impl Default for SocketIoConfig {
    fn default() -> Self {
        Self {
            ping_interval: Duration::from_secs(25),
            ping_timeout: Duration::from_secs(20),
            join_event: "join".into(),
            leave_event: "leave".into(),
            recovery: true,
        }
    }
}

/// Event names a Socket.IO client may not receive from a peer: the
/// client library reserves them.
const RESERVED_EVENTS: &[&str] = &[
    "connect",
    "connect_error",
    "disconnect",
    "disconnecting",
    "newListener",
    "removeListener",
];

/// The event that carries an error of an emit without an ack.
const ERROR_EVENT: &str = "fanout:error";
/// The event that tells a main-namespace socket that the server API ended
/// its membership of a channel.
const UNSUBSCRIBED_EVENT: &str = "fanout:unsubscribed";

/// A connected namespace.
#[derive(Debug)]
struct Namespace {
    claims: Option<Claims>,
    /// Expiry (seconds since the epoch) of its token, if auth is on.
    exp: Option<u64>,
    /// A channel's own namespace: its membership.
    channel: Option<Membership>,
    /// Channels joined on the main namespace.
    rooms: HashMap<ChannelName, Joined>,
}

impl Namespace {
    fn sub(&self) -> Option<&str> {
        self.claims.as_ref().and_then(|c| c.sub.as_deref())
    }
}

#[derive(Debug)]
struct Membership {
    channel: ChannelName,
    joined: Joined,
    write: bool,
}

/// The hub memberships of one joined channel, to leave with it: the
/// channel's own, and for a private channel with database changes a feed
/// in the public channel of the same name, where changes are routed.
type Joined = Vec<(ChannelName, u64)>;

/// A BINARY_EVENT waiting for its attachments.
struct Pending {
    /// Attachments still to come.
    remaining: usize,
    /// The event they complete: (namespace, ack id, event name); `None`
    /// when the packet was refused and its attachments are skipped.
    event: Option<(String, Option<u64>, String)>,
}

/// The CONNECT payload: `auth` as the client sends it, plus the fields
/// socket.io-client adds when it recovers.
#[derive(Deserialize, Default)]
struct ConnectAuth {
    #[serde(default)]
    token: Option<String>,
    #[serde(default)]
    private: bool,
    #[serde(default)]
    pid: Option<String>,
    #[serde(default)]
    offset: Option<String>,
}

/// A channel to join on the main namespace: `"name"` or
/// `{"channel": "name", "private": true}`.
#[derive(Deserialize)]
#[serde(untagged)]
enum RoomSpec {
    Name(String),
    Object {
        channel: String,
        #[serde(default)]
        private: bool,
    },
}

struct Session {
    edge: Arc<Edge>,
    origin: Origin,
    writer: Arc<ConnWriter>,
    control: Arc<crate::control::ConnControl>,
    namespaces: HashMap<String, Namespace>,
    messages: TokenBucket,
    joins: TokenBucket,
    pending: Option<Pending>,
    next_ping: Instant,
    pong_due: Option<Instant>,
    /// A session must CONNECT a namespace by then (Socket.IO's
    /// `connectTimeout`); `None` once one did.
    connect_by: Option<Instant>,
}

/// Serves an upgraded Engine.IO WebSocket until it closes (see
/// [`Socket::open`] for the arguments).
pub(crate) fn serve<R>(edge: Arc<Edge>, parts: SocketParts<R>) -> impl std::future::Future<Output = ()> + Send
where
    R: AsyncRead + Unpin + Send,
{
    serve_session(edge, parts, random_id(), &[])
}

/// Serves one Engine.IO session, `sid`, over a socket (a WebSocket, or a
/// polling session's pipe and sink offering `upgrades`). The arguments
/// travel boxed into the session's future, as in `conn::serve`: an async
/// fn would keep them for the session's whole life.
pub(crate) fn serve_session<R>(
    edge: Arc<Edge>,
    parts: SocketParts<R>,
    sid: String,
    upgrades: &'static [&'static str],
) -> impl std::future::Future<Output = ()> + Send
where
    R: AsyncRead + Unpin + Send,
{
    serve_session_boxed(Box::new((edge, parts, sid, upgrades)))
}

/// [`serve_session`]'s arguments.
type SessionArgs<R> = (Arc<Edge>, SocketParts<R>, String, &'static [&'static str]);

async fn serve_session_boxed<R>(args: Box<SessionArgs<R>>)
where
    R: AsyncRead + Unpin + Send,
{
    let (edge, parts, sid, upgrades) = crate::conn::unbox(args);
    // A reference, not a copy: a future keeps its locals for its whole life.
    let limits = &edge.config.limits;
    let cfg = &edge.config.socketio;
    let mut socket = Socket::open(&edge, parts, None);
    let _ = socket.writer.send(packet::text(&packet::open(
        &sid,
        upgrades,
        cfg.ping_interval.as_millis() as u64,
        cfg.ping_timeout.as_millis() as u64,
        limits.max_frame_bytes,
    )));
    let mut session = Session {
        origin: Origin {
            node: edge.node,
            connection: socket.id,
        },
        writer: socket.writer.clone(),
        control: socket.control.clone(),
        namespaces: HashMap::new(),
        messages: TokenBucket::new(limits.messages_per_second),
        joins: TokenBucket::new(limits.joins_per_second),
        pending: None,
        next_ping: Instant::now() + cfg.ping_interval,
        pong_due: None,
        connect_by: Some(Instant::now() + limits.handshake_timeout),
        edge: edge.clone(),
    };
    metrics::counter!("fanout_socketio_connections_total").increment(1);
    let reason = session.read_loop(&mut socket.reader).await;
    session.leave_all();
    socket.close(&edge, reason).await;
}

/// A random id for an Engine.IO session, a namespace socket or a
/// recovery session.
fn random_id() -> String {
    uuid::Uuid::new_v4().simple().to_string()
}

/// `None` for the main namespace, else the namespace's name without `/`.
fn nsp_name(nsp: &str) -> Option<&str> {
    (nsp != "/").then(|| nsp.strip_prefix('/').unwrap_or(nsp))
}

impl Session {
    fn send(&self, text: &str) {
        // A failed send means the connection is closing.
        let _ = self.writer.send(packet::text(text));
    }

    async fn read_loop<R: AsyncRead + Unpin>(&mut self, reader: &mut FrameReader<R>) -> CloseReason {
        let shutdown = self.edge.shutdown.clone();
        let writer = self.writer.clone();
        loop {
            let expiry = self
                .namespaces
                .values()
                .filter_map(|n| n.exp)
                .min()
                .map(conn::deadline_of);
            let ping = self.pong_due.unwrap_or(self.next_ping);
            tokio::select! {
                biased;
                () = writer.done() => return conn::closed_by_server(&self.writer),
                () = shutdown.cancelled() => return conn::shutting_down(&self.edge).await,
                () = conn::sleep_until_opt(expiry) => {
                    self.expire_tokens();
                    continue;
                }
                () = conn::sleep_until_opt(self.connect_by) => {
                    metrics::counter!("fanout_client_errors_total", "reason" => "unauthorized").increment(1);
                    return CloseReason::new(
                        close_code::POLICY,
                        format!(
                            "no namespace connected within {} s: send a CONNECT with auth",
                            self.edge.config.limits.handshake_timeout.as_secs()
                        ),
                        "idle",
                    );
                }
                () = self.control.notify.notified() => {
                    match self.apply_kicks() {
                        Some(close) => return close,
                        None => continue,
                    }
                }
                () = tokio::time::sleep_until(ping) => {
                    if self.pong_due.is_some() {
                        let timeout = self.edge.config.socketio.ping_timeout;
                        return CloseReason::new(
                            close_code::POLICY,
                            format!("ping timeout: no pong within {} ms", timeout.as_millis()),
                            "idle",
                        );
                    }
                    self.send(packet::PING);
                    self.pong_due = Some(Instant::now() + self.edge.config.socketio.ping_timeout);
                    continue;
                }
                r = reader.readable() => if r.is_err() {
                    return CloseReason::quiet("eof");
                },
            }
            let incoming = match conn::read_message(reader, &self.writer, &self.edge).await {
                Ok(incoming) => incoming,
                Err(close) => return close,
            };
            match incoming {
                Incoming::Text(bytes) => {
                    let Ok(text) = std::str::from_utf8(&bytes) else {
                        return CloseReason::bad_utf8("text frame is not UTF-8");
                    };
                    if let Some(close) = Box::pin(self.engine(text)).await {
                        return close;
                    }
                }
                Incoming::Binary(bytes) => Box::pin(self.attachment(Bytes::from(bytes))).await,
                Incoming::Ping(payload) => {
                    let _ = self
                        .writer
                        .send(crate::frame::encode(crate::frame::Opcode::Pong, &payload));
                }
                Incoming::Close => return CloseReason::quiet("client"),
                Incoming::Nothing => {}
            }
        }
    }

    /// One Engine.IO packet; `Some` ends the connection.
    async fn engine(&mut self, text: &str) -> Option<CloseReason> {
        match packet::decode_engine(text) {
            Ok(EnginePacket::Close) => return Some(CloseReason::quiet("client")),
            Ok(EnginePacket::Ping(data)) => self.send(&format!("3{data}")),
            Ok(EnginePacket::Pong(_)) => {
                self.pong_due = None;
                self.next_ping = Instant::now() + self.edge.config.socketio.ping_interval;
            }
            Ok(EnginePacket::Message(m)) => self.message(m).await,
            Ok(EnginePacket::Upgrade | EnginePacket::Noop) => {}
            Err(e) => {
                metrics::counter!("fanout_client_errors_total", "reason" => "malformed").increment(1);
                return Some(CloseReason::protocol(format!("invalid Engine.IO packet: {e}")));
            }
        }
        None
    }

    /// One Socket.IO packet.
    async fn message(&mut self, text: &str) {
        if self.pending.take().is_some_and(|p| p.event.is_some()) {
            metrics::counter!("fanout_client_errors_total", "reason" => "malformed").increment(1);
        }
        metrics::counter!("fanout_client_messages_total").increment(1);
        let p = match packet::decode_packet(text) {
            Ok(p) => p,
            Err(e) => {
                metrics::counter!("fanout_client_errors_total", "reason" => "malformed").increment(1);
                return self.error_event("/", None, &format!("invalid Socket.IO packet: {e}"));
            }
        };
        if !matches!(p.kind, PacketType::Connect | PacketType::Disconnect | PacketType::Ack)
            && !self.messages.try_take()
        {
            let reason = format!(
                "rate limit exceeded: {} messages per second",
                self.edge.config.limits.messages_per_second
            );
            return self.refuse(p.nsp, p.id, "rate_limited", &reason);
        }
        match p.kind {
            PacketType::Connect => self.connect(p.nsp, p.data).await,
            PacketType::Disconnect => self.disconnect(p.nsp),
            PacketType::Event => match packet::event_args(p.data) {
                Ok((name, args)) => self.event(p.nsp, p.id, name, &args).await,
                Err(e) => self.refuse(p.nsp, p.id, "bad_payload", &e.to_string()),
            },
            PacketType::BinaryEvent => self.binary_event(&p),
            // The server asks for no acks; a client's are ignored.
            PacketType::Ack | PacketType::BinaryAck => {}
            PacketType::ConnectError => {
                self.refuse(p.nsp, None, "unknown_event", "CONNECT_ERROR is sent by servers only");
            }
        }
    }

    /// A BINARY_EVENT: one `Buffer` argument is a binary broadcast; its
    /// attachment is the next binary frame.
    fn binary_event(&mut self, p: &Packet<'_>) {
        let refused = match packet::event_args(p.data) {
            Ok((name, args)) if p.attachments == 1 && args.len() == 1 && packet::is_first_placeholder(args[0]) => {
                self.pending = Some(Pending {
                    remaining: 1,
                    event: Some((p.nsp.to_owned(), p.id, name)),
                });
                return;
            }
            Ok(_) => "a binary event must carry exactly one Buffer argument (its payload)".to_owned(),
            Err(e) => e.to_string(),
        };
        self.pending = (p.attachments > 0).then_some(Pending {
            remaining: p.attachments,
            event: None,
        });
        self.refuse(p.nsp, p.id, "bad_payload", &refused);
    }

    /// A binary frame: the attachment of the pending BINARY_EVENT.
    async fn attachment(&mut self, bytes: Bytes) {
        let Some(mut pending) = self.pending.take() else {
            metrics::counter!("fanout_client_errors_total", "reason" => "malformed").increment(1);
            return self.error_event("/", None, "a binary frame arrived without a binary event announcing it");
        };
        pending.remaining -= 1;
        if pending.remaining > 0 {
            self.pending = Some(pending);
            return;
        }
        if let Some((nsp, id, name)) = pending.event {
            self.publish(&nsp, id, &name, bytes, true).await;
        }
    }

    /// Refuses a client packet: the ack's `{ok: false, error}` when it
    /// asked for one, else a `fanout:error` event.
    fn refuse(&self, nsp: &str, id: Option<u64>, label: &'static str, reason: &str) {
        metrics::counter!("fanout_client_errors_total", "reason" => label).increment(1);
        self.error_event(nsp, id, reason);
    }

    fn error_event(&self, nsp: &str, id: Option<u64>, reason: &str) {
        let body = serde_json::json!({ "ok": false, "error": reason }).to_string();
        match id {
            Some(id) => self.send(&packet::ack(nsp_name(nsp), id, &body)),
            None => self.send(&packet::emit(nsp_name(nsp), ERROR_EVENT, &body)),
        }
    }

    /// Checks a CONNECT's token, if auth is on.
    fn verify(&self, token: Option<&str>) -> Result<Option<Claims>, String> {
        let Some(verifier) = &self.edge.config.auth else {
            return Ok(None);
        };
        let token = token.ok_or("unauthorized: a token is required: connect with auth: { token }")?;
        let claims = verifier.verify_apikey(token);
        claims.map(Some).map_err(|e| format!("unauthorized: {e}"))
    }

    /// Memberships held, for the channel limit.
    fn memberships(&self) -> usize {
        self.namespaces
            .values()
            .map(|n| n.rooms.len() + usize::from(n.channel.is_some()))
            .sum()
    }

    fn too_many_channels(&self) -> Option<String> {
        let max = self.edge.config.limits.max_channels_per_connection;
        (self.memberships() >= max).then(|| format!("too many channels: a connection may join at most {max}"))
    }

    fn join_rate_limited(&mut self) -> Option<String> {
        (!self.joins.try_take()).then(|| {
            format!(
                "join rate limit exceeded: {} joins per second",
                self.edge.config.limits.joins_per_second
            )
        })
    }

    /// The channel policy's answer for `claims`, when policies are
    /// enforced.
    fn access(&self, channel: &ChannelName, claims: Option<&Claims>) -> Result<bool, String> {
        if self.edge.config.auth.is_none() {
            return Ok(true);
        }
        let value = claims.map_or(serde_json::Value::Null, Claims::to_value);
        conn::read_access(&self.edge, channel, &value, "join with the channel marked private").map(|a| a.write)
    }

    async fn connect(&mut self, nsp: &str, data: Option<&RawValue>) {
        let auth: ConnectAuth = match data.map(|d| serde_json::from_str(d.get())).transpose() {
            Ok(a) => a.unwrap_or_default(),
            Err(e) => return self.connect_refused(nsp, "bad_payload", &format!("invalid CONNECT auth: {e}")),
        };
        let claims = match self.verify(auth.token.as_deref()) {
            Ok(c) => c,
            Err(reason) => return self.connect_refused(nsp, "unauthorized", &reason),
        };
        // A second CONNECT to a connected namespace starts it over.
        self.disconnect(nsp);
        let sid = random_id();
        let Some(name) = nsp_name(nsp) else {
            self.add_namespace(nsp, claims, None);
            return self.send(&packet::connect_ok(None, &sid, None));
        };
        let channel = match ChannelName::new(name) {
            Ok(c) => c.with_privacy(auth.private),
            Err(e) => {
                return self.connect_refused(nsp, "bad_topic", &format!("invalid channel {name:?}: {e}"));
            }
        };
        if let Some(reason) = self.join_rate_limited() {
            return self.connect_refused(nsp, "rate_limited", &reason);
        }
        if let Some(reason) = self.too_many_channels() {
            return self.connect_refused(nsp, "too_many_channels", &reason);
        }
        let write = match self.access(&channel, claims.as_ref()) {
            Ok(w) => w,
            Err(reason) => return self.connect_refused(nsp, "forbidden", &reason),
        };
        let recovery = self.edge.config.socketio.recovery;
        // A recovering socket keeps its pid when what it missed can be
        // replayed; otherwise it gets a fresh one (`recovered` false).
        let resume = match (&auth.pid, auth.offset.as_deref().and_then(packet::parse_offset)) {
            (Some(pid), Some(after)) if recovery => Some((pid.clone(), after)),
            _ => None,
        };
        let fresh = recovery.then(random_id);
        let (pid, resume_after, reply_if_lost) = match resume {
            Some((pid, after)) => (
                Some(pid),
                Some(after),
                Some(vec![packet::text(&packet::connect_ok(
                    Some(name),
                    &sid,
                    fresh.as_deref(),
                ))]),
            ),
            None => (fresh, None, None),
        };
        let joined = self
            .join_channel(
                &channel,
                Wire::SocketIoNamespace { offsets: recovery },
                claims.as_ref(),
                vec![packet::text(&packet::connect_ok(Some(name), &sid, pid.as_deref()))],
                resume_after,
                reply_if_lost,
            )
            .await;
        self.add_namespace(nsp, claims, Some(Membership { channel, joined, write }));
    }

    fn connect_refused(&self, nsp: &str, label: &'static str, reason: &str) {
        metrics::counter!("fanout_client_errors_total", "reason" => label).increment(1);
        self.send(&packet::connect_error(nsp_name(nsp), reason));
    }

    fn add_namespace(&mut self, nsp: &str, claims: Option<Claims>, channel: Option<Membership>) {
        self.connect_by = None;
        if let Some(sub) = claims.as_ref().and_then(|c| c.sub.as_deref()) {
            self.control.add_sub(sub);
        }
        let ns = Namespace {
            exp: claims.as_ref().and_then(|c| c.exp),
            claims,
            channel,
            rooms: HashMap::new(),
        };
        self.namespaces.insert(nsp.to_owned(), ns);
    }

    /// The database changes routed to `channel`'s name, as bindings with
    /// the token's row rules and column lists; a table without a read rule
    /// is left out (when policies are enforced).
    fn change_bindings(&self, channel: &ChannelName, claims: Option<&Claims>) -> Vec<Binding> {
        let Some(routes) = self.edge.config.changes.as_deref() else {
            return Vec::new();
        };
        let mut bindings = routes.bindings_for_channel(channel);
        if self.edge.config.auth.is_some() {
            let value = claims.map_or(serde_json::Value::Null, Claims::to_value);
            bindings.retain_mut(|b| conn::bind_row_rule(&self.edge.config.policy, &value, b).is_ok());
        }
        bindings
    }

    /// Adds a membership of `channel` framed as `wire`, with the database
    /// changes routed to it; the channel task sends `reply` first.
    async fn join_channel(
        &self,
        channel: &ChannelName,
        wire: Wire,
        claims: Option<&Claims>,
        reply: Vec<Bytes>,
        resume_after: Option<Position>,
        reply_if_lost: Option<Vec<Bytes>>,
    ) -> Joined {
        let member = |id: u64, feed: bool, changes: Option<Arc<[Binding]>>| Member {
            conn: id,
            origin: self.origin,
            wire,
            // A Socket.IO emit reaches the others, as a server's
            // `socket.broadcast` does.
            receive_own: false,
            presence: false,
            skip_through: 0,
            feed_topic: feed.then(|| Arc::from("")),
            changes,
            writer: self.writer.clone(),
        };
        let bindings = self.change_bindings(channel, claims);
        let mut joined = Vec::with_capacity(2);
        let mut own = None;
        if !bindings.is_empty() {
            let bindings: Arc<[Binding]> = bindings.into();
            match ChannelName::new(channel.name()) {
                // A private channel's changes come from the public channel
                // of its name: a feed there, live before the reply.
                Ok(source) if channel.is_private() => {
                    let id = self.edge.next_conn_id();
                    let (ready, live) = tokio::sync::oneshot::channel();
                    self.edge.hub.join(
                        &source,
                        JoinRequest {
                            member: member(id, true, Some(bindings)),
                            reply: Vec::new(),
                            resume_after: None,
                            reply_if_lost: None,
                            room_user: None,
                            ready: Some(ready),
                        },
                    );
                    let _ = tokio::time::timeout(self.edge.config.feed_timeout, live).await;
                    joined.push((source, id));
                }
                _ => own = Some(bindings),
            }
        }
        let id = self.edge.next_conn_id();
        self.edge.hub.join(
            channel,
            JoinRequest {
                member: member(id, false, own),
                reply,
                resume_after,
                reply_if_lost,
                room_user: None,
                ready: None,
            },
        );
        joined.push((channel.clone(), id));
        metrics::counter!("fanout_joins_total").increment(1);
        joined
    }

    fn leave(&self, joined: &[(ChannelName, u64)]) {
        for (channel, id) in joined {
            self.edge.hub.leave(channel, *id);
        }
    }

    /// Leaves a namespace's channels (a client's DISCONNECT, or the
    /// server ending it).
    fn disconnect(&mut self, nsp: &str) {
        if let Some(ns) = self.namespaces.remove(nsp) {
            self.leave_namespace(&ns);
        }
    }

    fn leave_namespace(&self, ns: &Namespace) {
        if let Some(m) = &ns.channel {
            self.leave(&m.joined);
        }
        for joined in ns.rooms.values() {
            self.leave(joined);
        }
    }

    fn leave_all(&mut self) {
        for (_, ns) in std::mem::take(&mut self.namespaces) {
            self.leave_namespace(&ns);
        }
    }

    async fn event(&mut self, nsp: &str, id: Option<u64>, name: String, args: &[&RawValue]) {
        let Some(ns) = self.namespaces.get(nsp) else {
            return self.refuse(
                nsp,
                id,
                "unmatched_topic",
                &format!("namespace {nsp:?} is not connected: connect to it first"),
            );
        };
        if ns.channel.is_none() {
            let cfg = &self.edge.config.socketio;
            if name == cfg.join_event {
                return self.join_room(id, args).await;
            }
            if name == cfg.leave_event {
                return self.leave_room(id, args);
            }
            let reason = format!(
                "unknown event {name:?}: the main namespace takes {:?} and {:?}; emit to a channel on its namespace, io('/<channel>')",
                cfg.join_event, cfg.leave_event
            );
            return self.refuse(nsp, id, "unknown_event", &reason);
        }
        let payload = match args {
            [] => Bytes::from_static(b"null"),
            [one] => Bytes::copy_from_slice(one.get().as_bytes()),
            _ => {
                return self.refuse(
                    nsp,
                    id,
                    "bad_payload",
                    "an event carries one payload argument (send an object or an array)",
                );
            }
        };
        self.publish(nsp, id, &name, payload, false).await;
    }

    /// Broadcasts an emit on a channel's namespace.
    async fn publish(&mut self, nsp: &str, id: Option<u64>, name: &str, payload: Bytes, binary: bool) {
        let Some(ns) = self.namespaces.get(nsp) else {
            return;
        };
        let Some(m) = &ns.channel else {
            return self.refuse(
                nsp,
                id,
                "unknown_event",
                "binary events are broadcasts on a channel's namespace",
            );
        };
        if RESERVED_EVENTS.contains(&name) {
            return self.refuse(
                nsp,
                id,
                "bad_payload",
                &format!("event name {name:?} is reserved by Socket.IO"),
            );
        }
        // The Supabase front's rule (event names travel in one length byte).
        let b = match crate::protocol::Broadcast::checked(name.to_owned(), payload, binary) {
            Ok(b) => b,
            Err(e) => return self.refuse(nsp, id, e.label, &e.reason),
        };
        if !m.write {
            let reason = format!("not allowed to broadcast on {}: this token may only read it", m.channel);
            return self.refuse(nsp, id, "forbidden", &reason);
        }
        let mut ev = Event::broadcast(m.channel.clone(), &b.event, b.payload, b.binary, Some(self.origin));
        if let Err(reason) = self.edge.stamp_sender(&mut ev, ns.sub()) {
            return self.refuse(nsp, id, "forbidden", &reason);
        }
        metrics::counter!("fanout_broadcasts_published_total").increment(1);
        match self.edge.bus.publish(ev).await {
            Ok(position) => {
                if let Some(id) = id {
                    let body = format!(r#"{{"ok":true,"offset":"{position}"}}"#);
                    self.send(&packet::ack(nsp_name(nsp), id, &body));
                }
            }
            Err(e) => {
                metrics::counter!("fanout_bus_publish_errors_total").increment(1);
                self.refuse(nsp, id, "bus_error", &format!("broadcast not delivered: {e}"));
            }
        }
    }

    fn room_arg(args: &[&RawValue]) -> Result<ChannelName, String> {
        let spec: RoomSpec = match args.first() {
            Some(a) => serde_json::from_str(a.get())
                .map_err(|_| "expected a channel name, or {channel, private}".to_owned())?,
            None => return Err("expected a channel name, or {channel, private}".into()),
        };
        let (name, private) = match spec {
            RoomSpec::Name(n) => (n, false),
            RoomSpec::Object { channel, private } => (channel, private),
        };
        ChannelName::new(&name)
            .map(|c| c.with_privacy(private))
            .map_err(|e| format!("invalid channel {name:?}: {e}"))
    }

    async fn join_room(&mut self, id: Option<u64>, args: &[&RawValue]) {
        let channel = match Self::room_arg(args) {
            Ok(c) => c,
            Err(reason) => return self.refuse("/", id, "bad_topic", &reason),
        };
        let ok = |id: Option<u64>| id.map(|id| packet::text(&packet::ack(None, id, r#"{"ok":true}"#)));
        if self
            .namespaces
            .get("/")
            .is_some_and(|ns| ns.rooms.contains_key(&channel))
        {
            if let Some(f) = ok(id) {
                let _ = self.writer.send(f);
            }
            return;
        }
        if let Some(reason) = self.join_rate_limited() {
            return self.refuse("/", id, "rate_limited", &reason);
        }
        if let Some(reason) = self.too_many_channels() {
            return self.refuse("/", id, "too_many_channels", &reason);
        }
        let claims = self.namespaces.get("/").and_then(|ns| ns.claims.as_ref());
        if let Err(reason) = self.access(&channel, claims) {
            return self.refuse("/", id, "forbidden", &reason);
        }
        // The ack goes out through the channel task, before any event.
        let reply = ok(id).into_iter().collect();
        let joined = self
            .join_channel(&channel, Wire::SocketIoRoom, claims, reply, None, None)
            .await;
        if let Some(ns) = self.namespaces.get_mut("/") {
            ns.rooms.insert(channel, joined);
        }
    }

    fn leave_room(&mut self, id: Option<u64>, args: &[&RawValue]) {
        let channel = match Self::room_arg(args) {
            Ok(c) => c,
            Err(reason) => return self.refuse("/", id, "bad_topic", &reason),
        };
        if let Some(joined) = self.namespaces.get_mut("/").and_then(|ns| ns.rooms.remove(&channel)) {
            self.leave(&joined);
        }
        if let Some(id) = id {
            self.send(&packet::ack(None, id, r#"{"ok":true}"#));
        }
    }

    /// Namespaces whose token expired are disconnected by the server (the
    /// client reconnects them with a fresh token).
    fn expire_tokens(&mut self) {
        let now = fanout_core::now_ms() / 1000;
        let expired: Vec<String> = self
            .namespaces
            .iter()
            .filter(|(_, ns)| ns.exp.is_some_and(|e| e <= now))
            .map(|(n, _)| n.clone())
            .collect();
        for nsp in expired {
            metrics::counter!("fanout_token_expirations_total").increment(1);
            self.error_event(&nsp, None, "access token has expired: connect again with a fresh token");
            self.end_namespace(&nsp);
        }
    }

    /// The server ends a namespace: DISCONNECT, which the client does not
    /// retry by itself.
    fn end_namespace(&mut self, nsp: &str) {
        self.disconnect(nsp);
        self.send(&packet::disconnect(nsp_name(nsp)));
    }

    /// Memberships of `sub` (everyone's: `None`) changed: channel
    /// namespaces and main-namespace channels the user may no longer read
    /// end, as an unsubscribe from the server API ends them.
    fn recheck(&mut self, sub: Option<&str>) {
        let edge = self.edge.clone();
        let mut ended = Vec::new();
        let mut left = Vec::new();
        for (nsp, ns) in &mut self.namespaces {
            if sub.is_some() && ns.sub() != sub {
                continue;
            }
            if let Some(m) = ns.channel.as_mut()
                && let Some(access) = conn::recheck(&edge, &m.channel, ns.claims.as_ref())
            {
                m.write = access.write;
                if !access.read {
                    ended.push((nsp.clone(), conn::revoked(&m.channel)));
                }
            }
            let lost: Vec<ChannelName> = ns
                .rooms
                .keys()
                .filter(|c| conn::recheck(&edge, c, ns.claims.as_ref()).is_some_and(|a| !a.read))
                .cloned()
                .collect();
            for channel in lost {
                if let Some(joined) = ns.rooms.remove(&channel) {
                    left.push((channel, joined));
                }
            }
        }
        for (nsp, reason) in ended {
            self.end_namespace_for(&nsp, &reason);
        }
        for (channel, joined) in left {
            self.unsubscribed(&channel, &joined, &conn::revoked(&channel));
        }
    }

    /// The server ends a channel's namespace for `reason`: the reason as a
    /// `fanout:error` event, then DISCONNECT.
    fn end_namespace_for(&mut self, nsp: &str, reason: &str) {
        self.error_event(nsp, None, reason);
        self.end_namespace(nsp);
    }

    /// A main-namespace channel the server took away (already removed from
    /// its rooms): leave it and tell the client with `fanout:unsubscribed`.
    fn unsubscribed(&mut self, channel: &ChannelName, joined: &Joined, reason: &str) {
        self.leave(joined);
        let body = serde_json::json!({ "channel": channel.name(), "reason": reason }).to_string();
        self.send(&packet::emit(None, UNSUBSCRIBED_EVENT, &body));
    }

    /// The server API's kicks (see `conn.rs`).
    fn apply_kicks(&mut self) -> Option<CloseReason> {
        for kick in self.control.take() {
            match kick {
                Kick::Unsubscribe { sub, channel, reason } => {
                    let ended: Vec<String> = self
                        .namespaces
                        .iter()
                        .filter(|(_, ns)| ns.sub() == Some(sub.as_str()))
                        .filter(|(_, ns)| ns.channel.as_ref().is_some_and(|m| m.channel == channel))
                        .map(|(n, _)| n.clone())
                        .collect();
                    for nsp in ended {
                        self.end_namespace_for(&nsp, &reason);
                    }
                    let left = self
                        .namespaces
                        .get_mut("/")
                        .filter(|ns| ns.sub() == Some(sub.as_str()))
                        .and_then(|ns| ns.rooms.remove(&channel));
                    if let Some(joined) = left {
                        self.unsubscribed(&channel, &joined, &reason);
                    }
                }
                Kick::Recheck { sub } => self.recheck(sub.as_deref()),
                Kick::Disconnect { reason, reconnect } => {
                    if !reconnect {
                        let all: Vec<String> = self.namespaces.keys().cloned().collect();
                        for nsp in all {
                            self.end_namespace(&nsp);
                        }
                    }
                    return Some(Kick::disconnect_close(reason, reconnect));
                }
            }
        }
        None
    }
}
