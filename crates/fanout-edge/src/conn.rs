//! One client connection's behaviour: joins and leaves, broadcasts,
//! presence, change feeds, limits and the token's lifetime.
//!
//! The connection's task reads whole messages from the [`FrameReader`]
//! (`reader.rs`: frames, fragments, size limit), decodes them into typed
//! requests (`protocol`), and acts on them; writes go through the shared
//! [`ConnWriter`] (`writer.rs`), whose drain task runs beside it while
//! frames wait for room in the socket. Every
//! client mistake gets an error reply or a close frame with a reason;
//! nothing a client sends can panic the server or stall a channel.
//!
//! The task is generic over the socket (any `AsyncRead` and a
//! [`SocketWrite`]), so the unit tests below drive it in memory.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use fanout_core::changes::{Binding, Routes};
use fanout_core::policy::{Access, Policy};
use fanout_core::{ChannelName, Claims, Event, Origin, Position};
use tokio::io::AsyncRead;
use tokio::sync::oneshot;
use tokio::time::Instant;

use crate::Edge;
use crate::control::{ConnControl, Kick};
use crate::frame::{self, CloseReason, Opcode, close_code};
use crate::hub::{JoinRequest, Member};
use crate::protocol::{self, BadPayload, BindingSpec, Broadcast, Encoder, Inbound, Join, PresenceChange, Request, Vsn};
use crate::ratelimit::TokenBucket;
use crate::reader::{FrameReader, Incoming};
use crate::wire::Wire;
use crate::writer::{ConnWriter, SocketWrite};

/// Every `reason` of `fanout_client_errors_total`: why a client message was
/// refused.
pub(crate) const CLIENT_ERROR_LABELS: &[&str] = &[
    "malformed",
    "rate_limited",
    "bad_topic",
    "bad_payload",
    "bad_binding",
    "unsupported",
    "unauthorized",
    "forbidden",
    "too_many_channels",
    "unavailable",
    "unmatched_topic",
    "unknown_event",
    "bus_error",
    "presence_error",
];

/// A change feed joined for a topic's `postgres_changes` bindings.
#[derive(Debug)]
struct Feed {
    /// The channel whose changes it reads.
    source: ChannelName,
    /// Its membership id in that channel.
    id: u64,
    bindings: Arc<[Binding]>,
}

/// What a connection knows about one joined channel.
#[derive(Debug)]
struct Joined {
    channel: ChannelName,
    /// Bindings served by the channel itself.
    own: Arc<[Binding]>,
    feeds: Vec<Feed>,
    join_ref: Option<String>,
    ack: bool,
    /// The key this socket tracks under; `None` when presence keys are
    /// bound to a claim the token lacks (tracking is then refused).
    presence_key: Option<String>,
    /// The user (`sub`) the channel was joined as: the join's
    /// `access_token`, or the connection's token. A refresh must keep it.
    sub: Option<String>,
    /// The claims the channel was joined (or last refreshed) with, to
    /// re-decide it when memberships change.
    claims: Option<Arc<Claims>>,
    /// May broadcast and track (the channel policy's `write`).
    write: bool,
    /// This socket gets `presence_state` and diffs: asked for at join, or
    /// turned on by its first `track`.
    presence: bool,
    /// The payload of this socket's current `track`, if any: tracking the
    /// same payload again changes nothing.
    tracked: Option<serde_json::Map<String, serde_json::Value>>,
}

/// A connection's joined channels by topic: a vector searched in order,
/// grown one entry at a time. Most connections join one to a few channels
/// (at most `max_channels_per_connection`), and a hash map's smallest table
/// holds four entries: an idle connection on one channel would pay for
/// three empty ones.
#[derive(Debug, Default)]
struct Topics(Vec<(String, Joined)>);

impl Topics {
    fn position(&self, topic: &str) -> Option<usize> {
        self.0.iter().position(|(t, _)| t == topic)
    }

    fn contains_key(&self, topic: &str) -> bool {
        self.position(topic).is_some()
    }

    fn len(&self) -> usize {
        self.0.len()
    }

    fn get(&self, topic: &str) -> Option<&Joined> {
        self.0.iter().find(|(t, _)| t == topic).map(|(_, j)| j)
    }

    fn get_mut(&mut self, topic: &str) -> Option<&mut Joined> {
        self.0.iter_mut().find(|(t, _)| t == topic).map(|(_, j)| j)
    }

    /// Adds `topic`, or replaces what it had (a rejoin).
    fn insert(&mut self, topic: String, joined: Joined) {
        match self.get_mut(&topic) {
            Some(j) => *j = joined,
            None => {
                self.0.reserve_exact(1);
                self.0.push((topic, joined));
            }
        }
    }

    fn remove(&mut self, topic: &str) -> Option<Joined> {
        let i = self.position(topic)?;
        let (_, joined) = self.0.swap_remove(i);
        if self.0.capacity() > 2 * self.0.len() {
            self.0.shrink_to_fit();
        }
        Some(joined)
    }

    fn keys(&self) -> impl Iterator<Item = &String> {
        self.0.iter().map(|(t, _)| t)
    }

    fn iter(&self) -> impl Iterator<Item = (&String, &Joined)> {
        self.0.iter().map(|(t, j)| (t, j))
    }
}

struct Conn {
    edge: Arc<Edge>,
    id: u64,
    origin: Origin,
    vsn: Vsn,
    enc: Encoder,
    writer: Arc<ConnWriter>,
    /// Joined channels by topic.
    joined: Topics,
    /// Expiry (seconds since the epoch) of the newest valid token, if auth
    /// is on.
    token_exp: Option<u64>,
    /// The claims of the token the connection was opened with (role `anon`
    /// for an opaque project key); `None` in insecure dev mode.
    claims: Option<Arc<Claims>>,
    /// The token expired and no fresh one arrived yet.
    expired: bool,
    messages: TokenBucket,
    joins: TokenBucket,
    /// Where the server API's disconnects and unsubscribes arrive.
    control: Arc<ConnControl>,
}

/// A client socket's two paths, opened for a connection task of any
/// protocol front: the reader, the writer, the connection's id and its
/// control mailbox, and its admission slot.
pub(crate) struct Socket<R> {
    pub(crate) reader: FrameReader<R>,
    pub(crate) writer: Arc<ConnWriter>,
    pub(crate) id: u64,
    pub(crate) control: Arc<ConnControl>,
    slot: crate::admission::Slot,
}

/// An upgraded socket as a protocol front receives it, before
/// [`Socket::open`]: `read` and `write` are its halves, `leftover` the
/// bytes read past the HTTP upgrade, `slot` the reservation from
/// [`Edge::admit`], released by [`Socket::close`].
pub(crate) struct SocketParts<R> {
    pub(crate) read: R,
    pub(crate) write: Box<dyn SocketWrite>,
    pub(crate) leftover: Bytes,
    pub(crate) slot: crate::admission::Slot,
}

impl<R: AsyncRead + Unpin + Send> Socket<R> {
    /// Opens an upgraded socket; `sub` is the user it acts for (if known
    /// yet).
    pub(crate) fn open(edge: &Arc<Edge>, parts: SocketParts<R>, sub: Option<&str>) -> Self {
        let SocketParts {
            read,
            write,
            leftover,
            slot,
        } = parts;
        let limits = &edge.config.limits;
        let writer = Arc::new(
            ConnWriter::new(write, limits.outbound_queue_frames, edge.tasks.clone()).with_delay(limits.write_delay),
        );
        // `leftover` may be a view into hyper's whole 8 KiB read buffer: copy
        // the few bytes (usually none) and drop it, so that buffer is freed now,
        // not when the connection ends. (Shadowing alone would keep the
        // original alive in this future until the end.)
        let leftover = own_small(leftover);
        let reader = FrameReader::new(read, leftover, limits.max_frame_bytes);
        let id = edge.next_conn_id();
        let control = edge.sessions.register(id, sub);
        metrics::gauge!("fanout_connections").increment(1.0);
        metrics::counter!("fanout_connections_opened_total").increment(1);
        Self {
            reader,
            writer,
            id,
            control,
            slot,
        }
    }

    /// Closes the socket with `reason` once the connection task has left
    /// its channels: the close frame after every queued frame, then a
    /// short wait for the client's close.
    pub(crate) async fn close(self, edge: &Edge, reason: CloseReason) {
        let Self {
            mut reader,
            writer,
            id,
            slot,
            ..
        } = self;
        edge.sessions.unregister(id);
        let label = reason.label;
        writer.close(reason, false);
        writer.finished().await;
        reader.linger(Duration::from_secs(2)).await;
        drop(slot);
        metrics::gauge!("fanout_connections").decrement(1.0);
        metrics::counter!("fanout_connections_closed_total", "reason" => label).increment(1);
    }
}

/// The writer ended the connection (slow consumer, write error).
pub(crate) fn closed_by_server(writer: &ConnWriter) -> CloseReason {
    let r = writer.close_reason();
    CloseReason::new(
        r.as_ref().map_or(close_code::NORMAL, |r| r.code),
        r.map(|r| r.reason).unwrap_or_default(),
        "server",
    )
}

/// The edge is shutting down: waits for this connection's moment in the
/// drain window, then says so.
pub(crate) async fn shutting_down(edge: &Edge) -> CloseReason {
    edge.drain_delay().await;
    CloseReason::new(close_code::GOING_AWAY, "server shutting down", "shutdown")
}

/// Reads one whole message once bytes have arrived. Only the end of the
/// connection may interrupt it: a half-read frame cannot be resumed.
pub(crate) async fn read_message<R: AsyncRead + Unpin>(
    reader: &mut FrameReader<R>,
    writer: &ConnWriter,
    edge: &Edge,
) -> Result<Incoming, CloseReason> {
    tokio::select! {
        biased;
        () = writer.done() => Err(closed_by_server(writer)),
        () = edge.shutdown.cancelled() => Err(shutting_down(edge).await),
        r = tokio::time::timeout(edge.config.limits.idle_timeout, reader.next_message()) => match r {
            Err(_) => Err(CloseReason::new(close_code::POLICY, "frame not completed in time", "idle")),
            Ok(Err(close)) => Err(close),
            Ok(Ok(incoming)) => Ok(incoming),
        },
    }
}

/// Serves an upgraded Supabase Realtime socket until it closes.
///
/// The arguments travel boxed into the future (so do the other fronts'):
/// an async fn keeps its arguments in its future for its whole life,
/// beside the locals they were moved into (rust-lang/rust#62958), and this
/// future lives as long as the connection. Boxed, they cost 8 bytes there
/// instead of about 210.
pub(crate) fn serve<R>(
    edge: Arc<Edge>,
    parts: SocketParts<R>,
    vsn: Vsn,
    claims: Option<Claims>,
) -> impl std::future::Future<Output = ()> + Send
where
    R: AsyncRead + Unpin + Send,
{
    serve_boxed(Box::new((edge, parts, vsn, claims)))
}

/// The value out of a box, and the box freed now (moving out of `*b` in
/// place would keep the allocation until `b`'s scope ends: here, the
/// connection's life).
#[allow(clippy::boxed_local, reason = "taking the box is the point: it is freed on return")]
pub(crate) fn unbox<T>(b: Box<T>) -> T {
    *b
}

/// [`serve`]'s arguments.
type ServeArgs<R> = (Arc<Edge>, SocketParts<R>, Vsn, Option<Claims>);

async fn serve_boxed<R>(args: Box<ServeArgs<R>>)
where
    R: AsyncRead + Unpin + Send,
{
    let (edge, parts, vsn, claims) = unbox(args);
    // No local copy of the limits: a future keeps its locals for its whole
    // life.
    let limits = &edge.config.limits;
    let (messages_per_second, joins_per_second) = (limits.messages_per_second, limits.joins_per_second);
    let mut socket = Socket::open(&edge, parts, claims.as_ref().and_then(|c| c.sub.as_deref()));
    let mut conn = Conn {
        origin: Origin {
            node: edge.node,
            connection: socket.id,
        },
        edge: edge.clone(),
        id: socket.id,
        vsn,
        enc: Encoder(vsn),
        writer: socket.writer.clone(),
        joined: Topics::default(),
        token_exp: claims.as_ref().and_then(|c| c.exp),
        claims: claims.map(Arc::new),
        expired: false,
        messages: TokenBucket::new(messages_per_second),
        joins: TokenBucket::new(joins_per_second),
        control: socket.control.clone(),
    };
    // The read loop is what an idle connection waits in; the rest is boxed
    // (a future is as large as its largest state, for the connection's
    // whole life).
    let reason = conn.read_loop(&mut socket.reader).await;
    Box::pin(conn.leave_all()).await;
    Box::pin(socket.close(&edge, reason)).await;
}

/// A copy of `b` that does not keep `b`'s allocation alive; `b` is dropped.
fn own_small(b: Bytes) -> Bytes {
    if b.is_empty() {
        Bytes::new()
    } else {
        Bytes::copy_from_slice(&b)
    }
}

impl Conn {
    fn closed_by_server(&self) -> CloseReason {
        closed_by_server(&self.writer)
    }

    async fn shutting_down(&self) -> CloseReason {
        shutting_down(&self.edge).await
    }

    async fn read_loop<R: AsyncRead + Unpin>(&mut self, reader: &mut FrameReader<R>) -> CloseReason {
        let idle_timeout = self.edge.config.limits.idle_timeout;
        let shutdown = self.edge.shutdown.clone();
        let writer = self.writer.clone();
        loop {
            // One timer for both deadlines: the idle timeout, renewed by
            // every message, and the token's expiry.
            let idle_at = Instant::now() + idle_timeout;
            let expiry = self.token_exp.map(deadline_of);
            let wake_at = expiry.map_or(idle_at, |e| e.min(idle_at));
            // Wait for bytes (cancel-safe, holds no buffer), or for the end,
            // or for a deadline.
            tokio::select! {
                biased;
                () = writer.done() => return self.closed_by_server(),
                () = shutdown.cancelled() => return Box::pin(self.shutting_down()).await,
                () = tokio::time::sleep_until(wake_at) => {
                    if Instant::now() >= idle_at {
                        return CloseReason::new(
                            close_code::POLICY,
                            format!("idle for {} s without a heartbeat", idle_timeout.as_secs()),
                            "idle",
                        );
                    }
                    Box::pin(self.expire_token()).await;
                    continue;
                }
                () = self.control.notify.notified() => {
                    match Box::pin(self.apply_kicks()).await {
                        Some(close) => return close,
                        None => continue,
                    }
                }
                r = reader.readable() => {
                    if r.is_err() {
                        return CloseReason::quiet("eof");
                    }
                }
            }
            // Reading a frame and acting on it need far more state than
            // waiting does, so they run boxed: an idle connection pays only
            // for waiting (one allocation per message).
            if let Some(close) = Box::pin(self.next_message(reader)).await {
                return close;
            }
        }
    }

    /// Reads one whole frame (only the end of the connection may interrupt
    /// it: a half-read frame cannot be resumed) and acts on it; `Some` when
    /// the connection must close.
    async fn next_message<R: AsyncRead + Unpin>(&mut self, reader: &mut FrameReader<R>) -> Option<CloseReason> {
        let incoming = match read_message(reader, &self.writer, &self.edge).await {
            Ok(incoming) => incoming,
            Err(close) => return Some(close),
        };
        match incoming {
            Incoming::Text(bytes) => self.data(false, &bytes).await,
            Incoming::Binary(bytes) => self.data(true, &bytes).await,
            Incoming::Ping(payload) => self.send(frame::encode(Opcode::Pong, &payload)),
            Incoming::Close => return Some(CloseReason::quiet("client")),
            Incoming::Nothing => {}
        }
        None
    }

    /// One complete client message (run boxed, inside
    /// [`Self::next_message`]).
    async fn data(&mut self, binary: bool, bytes: &[u8]) {
        if !self.messages.try_take() {
            metrics::counter!("fanout_client_errors_total", "reason" => "rate_limited").increment(1);
            let reason = format!(
                "rate limit exceeded: {} messages per second",
                self.edge.config.limits.messages_per_second
            );
            let (join_ref, r#ref, topic) = protocol::peek_refs(self.vsn, binary, bytes);
            self.send(self.enc.error_reply(
                join_ref.as_deref(),
                r#ref.as_deref(),
                topic.as_deref().unwrap_or("phoenix"),
                &reason,
            ));
            return;
        }
        let decoded = if binary {
            protocol::decode_binary(bytes)
        } else {
            protocol::decode_text(self.vsn, bytes)
        };
        match decoded {
            Ok(msg) => self.handle(msg).await,
            Err(e) => {
                metrics::counter!("fanout_client_errors_total", "reason" => "malformed").increment(1);
                // Address the error to the message's own topic and ref when
                // they can be read, so the client's pending push sees it.
                let (join_ref, r#ref, topic) = protocol::peek_refs(self.vsn, binary, bytes);
                self.send(self.enc.error_reply(
                    join_ref.as_deref(),
                    r#ref.as_deref(),
                    topic.as_deref().unwrap_or("phoenix"),
                    &format!("invalid message: {e}"),
                ));
            }
        }
    }

    fn send(&self, frame: Bytes) {
        // A failed send means the connection is closing; the read loop sees
        // `done` next.
        let _ = self.writer.send(frame);
    }

    fn reply_ok(&self, m: &Inbound, response: &str) {
        self.send(
            self.enc
                .reply(m.join_ref.as_deref(), m.r#ref.as_deref(), &m.topic, true, response),
        );
    }

    fn reply_err(&self, m: &Inbound, label: &'static str, reason: &str) {
        metrics::counter!("fanout_client_errors_total", "reason" => label).increment(1);
        self.send(
            self.enc
                .error_reply(m.join_ref.as_deref(), m.r#ref.as_deref(), &m.topic, reason),
        );
    }

    fn reply_bad(&self, m: &Inbound, e: &BadPayload) {
        self.reply_err(m, e.label, &e.reason);
    }

    async fn handle(&mut self, m: Inbound) {
        metrics::counter!("fanout_client_messages_total").increment(1);
        match &m.request {
            Request::Heartbeat => return self.reply_ok(&m, "{}"),
            Request::Unknown(event) if m.topic == "phoenix" => {
                return self.reply_err(
                    &m,
                    "unknown_event",
                    &format!("unknown event {event:?} on topic phoenix"),
                );
            }
            Request::Join(join) => return self.join(&m, join).await,
            _ if !self.joined.contains_key(&m.topic) => {
                return self.reply_err(
                    &m,
                    "unmatched_topic",
                    &format!("unmatched topic: join {:?} first", m.topic),
                );
            }
            _ => {}
        }
        match &m.request {
            Request::Leave => {
                self.leave(&m.topic).await;
                self.reply_ok(&m, "{}");
                self.send(self.enc.close_channel(m.join_ref.as_deref(), &m.topic));
            }
            Request::Broadcast(b) => self.broadcast(&m, b).await,
            Request::Presence(p) => self.presence(&m, p).await,
            Request::AccessToken(t) => self.access_token(&m, t).await,
            Request::Unknown(other) => {
                let reason = format!("unknown event {other:?}");
                self.reply_err(&m, "unknown_event", &reason)
            }
            // Answered above.
            Request::Heartbeat | Request::Join(_) => {}
        }
    }

    async fn join(&mut self, m: &Inbound, join: &Result<Join, BadPayload>) {
        if !self.joins.try_take() {
            return self.reply_err(
                m,
                "rate_limited",
                &format!(
                    "join rate limit exceeded: {} joins per second",
                    self.edge.config.limits.joins_per_second
                ),
            );
        }
        let channel = match ChannelName::from_topic(&m.topic) {
            Ok(c) => c,
            Err(e) => return self.reply_err(m, "bad_topic", &format!("invalid topic {:?}: {e}", m.topic)),
        };
        let payload = match join {
            Ok(p) => p,
            Err(e) => return self.reply_bad(m, e),
        };
        let config = &payload.config;
        // A private channel is a namespace apart from the public one.
        let channel = channel.with_privacy(config.private);
        let mut bindings = match parse_bindings(self.edge.config.changes.as_deref(), &channel, &config.postgres_changes)
        {
            Ok(b) => b,
            Err(reason) => return self.reply_err(m, "bad_binding", &reason),
        };
        let claims = match payload.access_token.as_deref() {
            Some(token) => match self.check_token(token, None) {
                Ok(claims) => claims,
                Err(e) => return self.reply_err(m, "unauthorized", &format!("invalid access_token: {e}")),
            },
            None if self.expired => {
                return self.reply_err(
                    m,
                    "unauthorized",
                    "access token has expired: join with a fresh access_token",
                );
            }
            None => self.claims.as_deref().cloned(),
        };
        let sub = claims.as_ref().and_then(|c| c.sub.clone());
        let grant = match self.authorize(&channel, claims.as_ref(), &mut bindings) {
            Ok(grant) => grant,
            Err(reason) => return self.reply_err(m, "forbidden", &reason),
        };
        let rejoin = self.joined.contains_key(&m.topic);
        if !rejoin && self.joined.len() >= self.edge.config.limits.max_channels_per_connection {
            return self.reply_err(
                m,
                "too_many_channels",
                &format!(
                    "too many channels: a connection may join at most {}",
                    self.edge.config.limits.max_channels_per_connection
                ),
            );
        }
        let resume_after = match config.resume.as_ref().map(|r| r.after.parse::<Position>()) {
            None => None,
            Some(Ok(p)) => Some(p),
            Some(Err(_)) => {
                return self.reply_err(
                    m,
                    "bad_payload",
                    "config.resume.after must be a position (a decimal string)",
                );
            }
        };
        if rejoin {
            self.leave(&m.topic).await;
        }
        let asked = config.presence.key.as_deref().filter(|k| !k.is_empty());
        let presence_key = match (&grant.presence_key, asked) {
            (Some(Some(bound)), Some(asked)) if asked != bound => {
                let claim = self.presence_key_claim();
                return self.reply_err(
                    m,
                    "forbidden",
                    &format!(
                        "presence key {asked:?} refused: keys are bound to the token's {claim} claim ({bound:?}); leave config.presence.key empty"
                    ),
                );
            }
            (Some(bound), _) => bound.clone(),
            (None, Some(asked)) => Some(asked.to_owned()),
            (None, None) => Some(uuid::Uuid::new_v4().to_string()),
        };
        let presence = config.presence.enabled.unwrap_or(true);
        let topic: Arc<str> = Arc::from(m.topic.as_str());
        let own: Arc<[Binding]> = bindings.own.into();
        let Some(feeds) = self.join_feeds(&topic, bindings.feeds).await else {
            return self.reply_err(
                m,
                "unavailable",
                "the database change stream is not available right now; retry the join",
            );
        };
        self.joined.insert(
            m.topic.clone(),
            Joined {
                channel: channel.clone(),
                own: own.clone(),
                feeds,
                join_ref: m.join_ref.clone(),
                ack: config.broadcast.ack,
                presence_key,
                sub: sub.inspect(|s| self.control.add_sub(s)),
                claims: claims.map(Arc::new),
                write: grant.access.write,
                presence,
                tracked: None,
            },
        );
        let response = serde_json::json!({ "postgres_changes": bindings.reply }).to_string();
        let mut reply = vec![
            self.enc
                .reply(m.join_ref.as_deref(), m.r#ref.as_deref(), &m.topic, true, &response),
        ];
        if !bindings.reply.is_empty() {
            reply.push(self.enc.system(
                &m.topic,
                "postgres_changes",
                true,
                "Subscribed to PostgreSQL",
                channel.name(),
            ));
        }
        self.edge.hub.join(
            &channel,
            JoinRequest {
                member: Member {
                    conn: self.id,
                    origin: self.origin,
                    wire: Wire::Phoenix(self.vsn),
                    receive_own: config.broadcast.self_,
                    presence,
                    skip_through: 0,
                    feed_topic: None,
                    changes: (!own.is_empty()).then_some(own),
                    writer: self.writer.clone(),
                },
                reply,
                resume_after,
                reply_if_lost: None,
                room_user: None,
                ready: None,
            },
        );
        metrics::counter!("fanout_joins_total").increment(1);
    }

    /// Joins the change feeds of a topic's bindings and waits until each is
    /// live, so every change committed after the join reply is delivered.
    /// `None` if they did not go live within the feed timeout.
    async fn join_feeds(&mut self, topic: &Arc<str>, feeds: Vec<(ChannelName, Vec<Binding>)>) -> Option<Vec<Feed>> {
        let mut joined = Vec::with_capacity(feeds.len());
        let mut waits = Vec::with_capacity(feeds.len());
        for (source, bindings) in feeds {
            let id = self.edge.next_conn_id();
            let bindings: Arc<[Binding]> = bindings.into();
            let (ready, wait) = oneshot::channel();
            self.edge.hub.join(
                &source,
                JoinRequest {
                    member: Member {
                        conn: id,
                        origin: self.origin,
                        wire: Wire::Phoenix(self.vsn),
                        receive_own: false,
                        presence: false,
                        skip_through: 0,
                        feed_topic: Some(topic.clone()),
                        changes: Some(bindings.clone()),
                        writer: self.writer.clone(),
                    },
                    reply: Vec::new(),
                    resume_after: None,
                    reply_if_lost: None,
                    room_user: None,
                    ready: Some(ready),
                },
            );
            joined.push(Feed { source, id, bindings });
            waits.push(wait);
        }
        let all_live = async {
            for wait in waits {
                wait.await.ok()?;
            }
            Some(())
        };
        match tokio::time::timeout(self.edge.config.feed_timeout, all_live).await {
            Ok(Some(())) => Some(joined),
            _ => {
                for feed in &joined {
                    self.edge.hub.leave(&feed.source, feed.id);
                }
                None
            }
        }
    }

    /// Leaves a channel: hub membership and presence.
    async fn leave(&mut self, topic: &str) {
        let Some(joined) = self.joined.remove(topic) else {
            return;
        };
        self.edge.hub.leave(&joined.channel, self.id);
        for feed in &joined.feeds {
            self.edge.hub.leave(&feed.source, feed.id);
        }
        if joined.tracked.is_some() {
            self.untrack(&joined.channel).await;
        }
    }

    async fn leave_all(&mut self) {
        let topics: Vec<String> = self.joined.keys().cloned().collect();
        for t in topics {
            self.leave(&t).await;
        }
    }

    async fn broadcast(&mut self, m: &Inbound, b: &Result<Broadcast, BadPayload>) {
        let b = match b {
            Ok(b) => b,
            Err(e) => return self.reply_bad(m, e),
        };
        let Some(joined) = self.joined.get(&m.topic) else {
            return;
        };
        if !joined.write {
            let reason = format!(
                "not allowed to broadcast on {}: this token may only read it",
                joined.channel
            );
            return self.reply_err(m, "forbidden", &reason);
        }
        let ack = joined.ack;
        let mut ev = Event::broadcast(
            joined.channel.clone(),
            &b.event,
            b.payload.clone(),
            b.binary,
            Some(self.origin),
        );
        if let Err(reason) = self.edge.stamp_sender(&mut ev, joined.sub.as_deref()) {
            return self.reply_err(m, "forbidden", &reason);
        }
        metrics::counter!("fanout_broadcasts_published_total").increment(1);
        match self.edge.bus.publish(ev).await {
            Ok(_) if ack => self.reply_ok(m, "{}"),
            Ok(_) => {}
            Err(e) => {
                metrics::counter!("fanout_bus_publish_errors_total").increment(1);
                self.reply_err(m, "bus_error", &format!("broadcast not delivered: {e}"));
            }
        }
    }

    async fn presence(&mut self, m: &Inbound, change: &Result<PresenceChange, BadPayload>) {
        let change = match change {
            Ok(c) => c,
            Err(e) => return self.reply_bad(m, e),
        };
        let Some(joined) = self.joined.get_mut(&m.topic) else {
            return;
        };
        let channel = joined.channel.clone();
        match change {
            PresenceChange::Track(_) if !joined.write => {
                let reason = format!("not allowed to track presence on {channel}: this token may only read it");
                self.reply_err(m, "forbidden", &reason)
            }
            PresenceChange::Track(_) if joined.presence_key.is_none() => {
                let claim = self.presence_key_claim();
                let reason = format!("presence keys are bound to the token's {claim} claim, which this token lacks");
                self.reply_err(m, "forbidden", &reason)
            }
            PresenceChange::Track(meta) => {
                if joined.tracked.as_ref() == Some(meta) {
                    // The same payload again: no update and no diff, as in
                    // Supabase Realtime.
                    return self.reply_ok(m, "{}");
                }
                let key = joined.presence_key.clone().unwrap_or_default();
                joined.tracked = Some(meta.clone());
                // A channel joined without presence gets it from its first
                // track (realtime-js asks for none when the channel has no
                // presence listener yet, and apps track such channels).
                let enable = !joined.presence;
                match self
                    .edge
                    .presence
                    .track(&channel, self.origin, &key, meta.clone())
                    .await
                {
                    Ok(diff) => {
                        self.publish_diff(&channel, diff).await;
                        if enable && let Some(joined) = self.joined.get_mut(&m.topic) {
                            joined.presence = true;
                            self.edge.hub.enable_presence(&channel, self.id, self.vsn);
                        }
                        self.reply_ok(m, "{}");
                    }
                    Err(e) => self.reply_err(m, "presence_error", &e.to_string()),
                }
            }
            PresenceChange::Untrack => {
                joined.tracked = None;
                self.untrack(&channel).await;
                self.reply_ok(m, "{}");
            }
        }
    }

    async fn untrack(&self, channel: &ChannelName) {
        untrack(&self.edge, channel, self.origin).await;
    }

    async fn publish_diff(&self, channel: &ChannelName, diff: fanout_core::PresenceDiff) {
        publish_diff(&self.edge, channel, diff, self.origin).await;
    }

    async fn access_token(&mut self, m: &Inbound, token: &Result<String, BadPayload>) {
        let token = match token {
            Ok(t) => t,
            Err(e) => return self.reply_bad(m, e),
        };
        let expected = self.joined.get(&m.topic).and_then(|j| j.sub.clone());
        match self.check_token(token, expected.as_deref()) {
            Err(e) => {
                metrics::counter!("fanout_client_errors_total", "reason" => "unauthorized").increment(1);
                self.end_channel(&m.topic.clone(), &format!("invalid access_token: {e}"))
                    .await;
            }
            Ok(claims) => self.reauthorize(&m.topic, claims.as_ref()).await,
        }
    }

    /// The claim presence keys are bound to, for refusal messages.
    fn presence_key_claim(&self) -> &str {
        self.edge.config.policy.presence_key_claim.as_deref().unwrap_or("sub")
    }

    /// Policies are enforced: a key is configured (not insecure dev mode).
    fn enforcing(&self) -> bool {
        self.edge.config.auth.is_some()
    }

    /// Decides a join under the policies: the channel's access, each
    /// binding's row rule and columns (set on `bindings`), and the presence
    /// key. Errors are the refusal's reason.
    fn authorize(
        &self,
        channel: &ChannelName,
        claims: Option<&Claims>,
        bindings: &mut JoinBindings,
    ) -> Result<Grant, String> {
        if !self.enforcing() {
            return Ok(Grant {
                access: Access::ALL,
                presence_key: None,
            });
        }
        let policy = &self.edge.config.policy;
        let claims = claims.map_or(serde_json::Value::Null, Claims::to_value);
        let access = read_access(&self.edge, channel, &claims, "join with config.private: true")?;
        for b in bindings
            .own
            .iter_mut()
            .chain(bindings.feeds.iter_mut().flat_map(|(_, b)| b.iter_mut()))
        {
            bind_row_rule(policy, &claims, b)?;
        }
        let presence_key = policy
            .presence_key_claim
            .as_deref()
            .map(|claim| claim_text(&claims, claim));
        Ok(Grant { access, presence_key })
    }

    /// A refreshed token for a joined channel: its claims now decide the
    /// channel's access and the row rules of its bindings. A channel the
    /// new token may no longer read ends.
    async fn reauthorize(&mut self, topic: &str, claims: Option<&Claims>) {
        if !self.enforcing() {
            return;
        }
        let Some(joined) = self.joined.get_mut(topic) else {
            return;
        };
        let policy = self.edge.config.policy.clone();
        let value = claims.map_or(serde_json::Value::Null, Claims::to_value);
        let access = policy.channel_access(
            joined.channel.name(),
            joined.channel.is_private(),
            &value,
            &*self.edge.config.members,
        );
        let rebind = |bindings: &Arc<[Binding]>| -> Result<Arc<[Binding]>, String> {
            let mut out = bindings.to_vec();
            for b in &mut out {
                bind_row_rule(&policy, &value, b)?;
            }
            Ok(out.into())
        };
        let own = rebind(&joined.own);
        let feeds: Result<Vec<_>, String> = joined.feeds.iter().map(|f| rebind(&f.bindings)).collect();
        let (own, feeds) = match (access.read, own, feeds) {
            (true, Ok(own), Ok(feeds)) => (own, feeds),
            (false, ..) => {
                let message = format!(
                    "access revoked: the refreshed token may no longer read {}",
                    joined.channel
                );
                metrics::counter!("fanout_client_errors_total", "reason" => "forbidden").increment(1);
                return self.end_channel(topic, &message).await;
            }
            (_, Err(e), _) | (_, _, Err(e)) => {
                metrics::counter!("fanout_client_errors_total", "reason" => "forbidden").increment(1);
                return self.end_channel(topic, &format!("access revoked: {e}")).await;
            }
        };
        joined.write = access.write;
        joined.claims = claims.cloned().map(Arc::new);
        if !own.is_empty() {
            self.edge.hub.set_changes(&joined.channel, self.id, own.clone());
        }
        joined.own = own;
        for (feed, bindings) in joined.feeds.iter_mut().zip(feeds) {
            self.edge.hub.set_changes(&feed.source, feed.id, bindings.clone());
            feed.bindings = bindings;
        }
    }

    /// Verifies a token (if auth is on) and, if valid, adopts its expiry;
    /// returns its claims (`None` in insecure dev mode). With `expected`,
    /// a token for another user is refused: a refresh may extend a
    /// channel's session, never change whose it is.
    fn check_token(&mut self, token: &str, expected: Option<&str>) -> Result<Option<Claims>, fanout_core::AuthError> {
        let Some(verifier) = &self.edge.config.auth else {
            return Ok(None);
        };
        let claims = verifier.verify(token)?;
        if let Some(expected) = expected
            && claims.sub.as_deref() != Some(expected)
        {
            return Err(fanout_core::AuthError::OtherSubject {
                got: claims.sub,
                expected: expected.to_owned(),
            });
        }
        self.token_exp = claims.exp;
        self.expired = false;
        Ok(Some(claims))
    }

    /// The token expired: every joined channel ends with a system message
    /// and `phx_close`, and new joins need a fresh `access_token`.
    async fn expire_token(&mut self) {
        self.token_exp = None;
        self.expired = true;
        metrics::counter!("fanout_token_expirations_total").increment(1);
        self.end_all_channels("access token has expired: send a fresh one with access_token and rejoin")
            .await;
    }

    /// Ends every joined channel with a system error message and
    /// `phx_close`.
    async fn end_all_channels(&mut self, message: &str) {
        let topics: Vec<String> = self.joined.keys().cloned().collect();
        for t in topics {
            self.end_channel(&t, message).await;
        }
    }

    /// Applies the server API's kicks: an unsubscribe ends the user's
    /// channel; a disconnect ends the connection (and, when the client may
    /// not come back, its channels first, so realtime-js does not rejoin
    /// them when it reconnects by itself).
    async fn apply_kicks(&mut self) -> Option<CloseReason> {
        for kick in self.control.take() {
            match kick {
                Kick::Unsubscribe { sub, channel, reason } => {
                    let topics: Vec<String> = self
                        .joined
                        .iter()
                        .filter(|(_, j)| j.channel == channel && j.sub.as_deref() == Some(sub.as_str()))
                        .map(|(t, _)| t.clone())
                        .collect();
                    for t in topics {
                        self.end_channel(&t, &reason).await;
                    }
                }
                Kick::Disconnect { reason, reconnect } => {
                    if !reconnect {
                        self.end_all_channels(&reason).await;
                    }
                    return Some(Kick::disconnect_close(reason, reconnect));
                }
                Kick::Recheck { sub } => {
                    let decided: Vec<(String, Access)> = self
                        .joined
                        .iter()
                        .filter(|(_, j)| sub.is_none() || j.sub == sub)
                        .filter_map(|(t, j)| Some((t.clone(), recheck(&self.edge, &j.channel, j.claims.as_deref())?)))
                        .collect();
                    for (topic, access) in decided {
                        if access.read {
                            if let Some(j) = self.joined.get_mut(&topic) {
                                j.write = access.write;
                            }
                        } else if let Some(j) = self.joined.get(&topic) {
                            let reason = revoked(&j.channel);
                            self.end_channel(&topic, &reason).await;
                        }
                    }
                }
            }
        }
        None
    }

    /// Ends one channel with a system error message and `phx_close`.
    async fn end_channel(&mut self, topic: &str, message: &str) {
        let Some(joined) = self.joined.get(topic) else { return };
        let (channel, join_ref) = (joined.channel.clone(), joined.join_ref.clone());
        self.send(self.enc.system(topic, "system", false, message, channel.name()));
        self.send(self.enc.close_channel(join_ref.as_deref(), topic));
        self.leave(topic).await;
    }
}

pub(crate) fn deadline_of(exp_secs: u64) -> Instant {
    let now = fanout_core::now_ms() / 1000;
    Instant::now() + Duration::from_secs(exp_secs.saturating_sub(now))
}

pub(crate) async fn sleep_until_opt(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

/// The channel policy's answer for a join of `channel` by a token with
/// `claims`: its access, or why it may not read the channel.
/// `private_hint` says how this protocol asks for the private channel.
pub(crate) fn read_access(
    edge: &Edge,
    channel: &ChannelName,
    claims: &serde_json::Value,
    private_hint: &str,
) -> Result<Access, String> {
    let policy = &edge.config.policy;
    let members = &edge.config.members;
    let access = policy.channel_access(channel.name(), channel.is_private(), claims, &**members);
    if access.read {
        return Ok(access);
    }
    if policy.channel_reads_members(channel.name()) && !members.is_ready() {
        return Err(format!(
            "cannot decide {:?} yet: this edge is still loading the membership sets; retry shortly",
            channel.name()
        ));
    }
    Err(if channel.is_private() {
        format!(
            "not allowed to join private channel {:?}: no policy grants it to this token (claim {:?} or an [[auth.channels]] rule)",
            channel.name(),
            policy.channels_claim
        )
    } else {
        format!("public channels are closed on this server: {private_hint}")
    })
}

/// After a membership change: what `claims` may now do on the joined
/// `channel`, or `None` when its access does not follow memberships (a
/// public channel, a rule without `member.…`, or policies not enforced).
pub(crate) fn recheck(edge: &Edge, channel: &ChannelName, claims: Option<&Claims>) -> Option<Access> {
    let policy = &edge.config.policy;
    if edge.config.auth.is_none() || !channel.is_private() || !policy.channel_reads_members(channel.name()) {
        return None;
    }
    let value = claims.map_or(serde_json::Value::Null, Claims::to_value);
    Some(policy.channel_access(channel.name(), true, &value, &*edge.config.members))
}

/// Why a channel [`recheck`] refused ends.
pub(crate) fn revoked(channel: &ChannelName) -> String {
    format!(
        "access revoked: no membership grants private channel {:?} any longer",
        channel.name()
    )
}

/// Removes `origin`'s presence in `channel` and announces the diff.
pub(crate) async fn untrack(edge: &Edge, channel: &ChannelName, origin: Origin) {
    match edge.presence.untrack(channel, origin).await {
        Ok(diff) => publish_diff(edge, channel, diff, origin).await,
        Err(e) => tracing::warn!(error = %e, "presence untrack failed"),
    }
}

/// Announces a presence diff on the bus (nothing when it is empty).
pub(crate) async fn publish_diff(edge: &Edge, channel: &ChannelName, diff: fanout_core::PresenceDiff, origin: Origin) {
    if diff.is_empty() {
        return;
    }
    let ev = Event::presence_diff(channel.clone(), &diff, Some(origin));
    if let Err(e) = edge.bus.publish(ev).await {
        metrics::counter!("fanout_bus_publish_errors_total").increment(1);
        tracing::warn!(error = %e, "presence diff not published");
    }
}

/// What the policies granted a join.
struct Grant {
    access: Access,
    /// `Some` when presence keys are bound to a claim: its value, if the
    /// token has it.
    presence_key: Option<Option<String>>,
}

/// Sets a binding's row rule and columns from its table's policy; a table
/// without one is refused (the bypass role sees every table whole).
pub(crate) fn bind_row_rule(policy: &Policy, claims: &serde_json::Value, b: &mut Binding) -> Result<(), String> {
    if policy.bypasses(claims) {
        b.access = None;
        b.columns = None;
        return Ok(());
    }
    let Some(rule) = policy.table(&b.schema, &b.table) else {
        return Err(format!(
            "changes of table {schema}.{table} are not allowed: it has no read rule (configure [auth.tables.\"{schema}.{table}\"]; read = \"public\" opens it)",
            schema = b.schema,
            table = b.table
        ));
    };
    b.access = rule.read.bind(claims).map(Arc::new);
    b.columns = rule.columns.clone();
    Ok(())
}

/// A claim as presence-key text: strings as they are, numbers in decimal.
fn claim_text(claims: &serde_json::Value, claim: &str) -> Option<String> {
    match claims.get(claim)? {
        serde_json::Value::String(s) if !s.is_empty() => Some(s.clone()),
        serde_json::Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

/// A join's bindings, sorted by where their changes come from.
#[derive(Default)]
pub(crate) struct JoinBindings {
    /// The `postgres_changes` list of the join reply.
    pub(crate) reply: Vec<serde_json::Value>,
    /// Bindings whose changes are routed to the joined channel itself.
    pub(crate) own: Vec<Binding>,
    /// Bindings served by other channels' change feeds.
    pub(crate) feeds: Vec<(ChannelName, Vec<Binding>)>,
}

/// Validates a join's `postgres_changes` bindings and sorts them by the
/// channel their changes are routed to; `routes` is `None` when no change
/// stream runs. Errors are the reply's reason. No I/O, so the fuzz targets
/// call it directly.
pub(crate) fn parse_bindings(
    routes: Option<&Routes>,
    channel: &ChannelName,
    raw: &[serde_json::Value],
) -> Result<JoinBindings, String> {
    let mut out = JoinBindings::default();
    if raw.is_empty() {
        return Ok(out);
    }
    let Some(routes) = routes else {
        return Err("postgres_changes is not available: this server has no database change stream configured".into());
    };
    let mut feeds: HashMap<ChannelName, Vec<Binding>> = HashMap::new();
    for (i, value) in raw.iter().enumerate() {
        let spec =
            BindingSpec::from_value(value).map_err(|e| format!("postgres_changes[{i}] is not a binding: {e}"))?;
        let binding = Binding::new(&spec.event, &spec.schema, spec.table.as_deref(), spec.filter.as_deref())
            .map_err(|e| format!("postgres_changes[{i}]: {e}"))?;
        let source = routes
            .channel_for_binding(&binding)
            .map_err(|e| format!("postgres_changes[{i}]: {e}"))?;
        // The reply echoes each binding as sent, plus its id: realtime-js
        // compares them field by field.
        let mut echo = value.clone();
        if let Some(obj) = echo.as_object_mut() {
            obj.insert("id".into(), binding.id.into());
        }
        out.reply.push(echo);
        if &source == channel {
            out.own.push(binding);
        } else {
            feeds.entry(source).or_default().push(binding);
        }
    }
    out.feeds = feeds.into_iter().collect();
    Ok(out)
}

/// The connection task driven in memory: a `tokio::io::duplex` pipe is the
/// socket, the edge runs over the in-memory bus and presence, and the test
/// speaks WebSocket frames (masked, as a browser's) on the other end.
#[cfg(test)]
mod tests {
    use super::*;
    use crate::EdgeConfig;
    use crate::writer::MemorySocket;
    use fanout_bus::{MemoryBus, MemoryPresence, Retention};
    use fanout_core::Limits;
    use serde_json::{Value, json};
    use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream, ReadHalf, WriteHalf};
    use tokio_util::sync::CancellationToken;

    mod policy;

    const WAIT: Duration = Duration::from_secs(5);

    fn edge(limits: Limits) -> Arc<Edge> {
        let node = 7;
        Edge::new(
            EdgeConfig {
                limits,
                ..EdgeConfig::default()
            },
            node,
            Arc::new(MemoryBus::new(Retention::default())),
            Arc::new(MemoryPresence::new(node)),
            None,
            CancellationToken::new(),
        )
    }

    /// The client's end of one in-memory connection.
    struct Client {
        rx: ReadHalf<DuplexStream>,
        tx: WriteHalf<DuplexStream>,
        next_ref: u32,
    }

    /// A server frame as the client reads it.
    #[derive(Debug)]
    enum Got {
        Json(Value),
        Binary(Vec<u8>),
        Pong(Vec<u8>),
        Close(u16, String),
    }

    impl Got {
        fn json(self) -> Value {
            match self {
                Got::Json(v) => v,
                other => panic!("expected a JSON frame, got {other:?}"),
            }
        }
    }

    /// Opens a vsn 1.0.0 connection whose pipe holds `capacity` bytes each way.
    fn connect(edge: &Arc<Edge>, capacity: usize) -> Client {
        connect_vsn(edge, capacity, Vsn::V1)
    }

    fn connect_vsn(edge: &Arc<Edge>, capacity: usize, vsn: Vsn) -> Client {
        connect_as(edge, capacity, vsn, None)
    }

    /// A connection authenticated on connect with `claims`.
    fn connect_as(edge: &Arc<Edge>, capacity: usize, vsn: Vsn, claims: Option<Claims>) -> Client {
        let slot = edge.admit(None, None).expect("a connection slot");
        let (client, server) = tokio::io::duplex(capacity);
        let (read, write) = tokio::io::split(server);
        let parts = SocketParts {
            read,
            write: Box::new(MemorySocket::new(write)),
            leftover: Bytes::new(),
            slot,
        };
        tokio::spawn(serve(edge.clone(), parts, vsn, claims));
        let (rx, tx) = tokio::io::split(client);
        Client { rx, tx, next_ref: 1 }
    }

    /// A masked client frame.
    fn client_frame(opcode: u8, fin: bool, payload: &[u8]) -> Vec<u8> {
        let mask = [0x11, 0x22, 0x33, 0x44];
        let mut f = vec![if fin { 0x80 } else { 0 } | opcode];
        match payload.len() {
            n if n < 126 => f.push(0x80 | n as u8),
            n if n <= 0xffff => {
                f.push(0x80 | 126);
                f.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                f.push(0x80 | 127);
                f.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        f.extend_from_slice(&mask);
        f.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        f
    }

    impl Client {
        async fn raw(&mut self, bytes: &[u8]) {
            self.tx.write_all(bytes).await.unwrap();
        }

        async fn text(&mut self, text: &str) {
            self.raw(&client_frame(0x1, true, text.as_bytes())).await;
        }

        /// Sends a vsn 1.0.0 message; returns its ref.
        async fn push(&mut self, topic: &str, event: &str, payload: Value) -> String {
            let r = self.next_ref.to_string();
            self.next_ref += 1;
            let m = json!({"topic": topic, "event": event, "payload": payload, "ref": r, "join_ref": r});
            self.text(&m.to_string()).await;
            r
        }

        async fn recv(&mut self) -> Got {
            tokio::time::timeout(WAIT, self.read_frame())
                .await
                .expect("a frame in time")
        }

        async fn read_frame(&mut self) -> Got {
            let mut h = [0u8; 2];
            self.rx.read_exact(&mut h).await.unwrap();
            let len = match h[1] & 0x7f {
                126 => u64::from(self.rx.read_u16().await.unwrap()),
                127 => self.rx.read_u64().await.unwrap(),
                n => u64::from(n),
            };
            let mut payload = vec![0; len as usize];
            self.rx.read_exact(&mut payload).await.unwrap();
            match h[0] & 0x0f {
                0x1 => Got::Json(serde_json::from_slice(&payload).unwrap()),
                0x2 => Got::Binary(payload),
                0xA => Got::Pong(payload),
                0x8 => Got::Close(
                    u16::from_be_bytes([payload[0], payload[1]]),
                    String::from_utf8(payload[2..].to_vec()).unwrap(),
                ),
                other => panic!("unexpected opcode {other}"),
            }
        }

        /// The next JSON frame with `event`, skipping others (presence, system).
        async fn recv_event(&mut self, event: &str) -> Value {
            for _ in 0..100 {
                let v = self.recv().await.json();
                if v["event"] == event {
                    return v;
                }
            }
            panic!("no {event} frame")
        }

        /// Joins; returns the reply, after the `presence_state` that
        /// follows a successful join with presence on (the default).
        async fn join(&mut self, topic: &str, config: Value) -> Value {
            let presence = config["presence"]["enabled"].as_bool().unwrap_or(true);
            let r = self.push(topic, "phx_join", json!({ "config": config })).await;
            let reply = self.recv().await.json();
            assert_eq!(
                (reply["event"].as_str(), reply["ref"].as_str()),
                (Some("phx_reply"), Some(r.as_str()))
            );
            let ok = reply["payload"]["status"] == "ok";
            if ok && config["postgres_changes"].as_array().is_some_and(|b| !b.is_empty()) {
                // "Subscribed to PostgreSQL" comes right after the reply.
                assert_eq!(self.recv().await.json()["event"], "system");
            }
            if presence && ok {
                assert_eq!(self.recv().await.json()["event"], "presence_state");
            }
            reply
        }
    }

    #[tokio::test]
    async fn join_broadcast_ack_and_heartbeat() {
        let edge = edge(Limits::default());
        let mut a = connect(&edge, 1 << 16);
        let reply = a
            .join("realtime:room", json!({"broadcast": {"self": true, "ack": true}}))
            .await;
        assert_eq!(
            reply["payload"],
            json!({"status": "ok", "response": {"postgres_changes": []}})
        );

        let r = a
            .push(
                "realtime:room",
                "broadcast",
                json!({"type": "broadcast", "event": "chat", "payload": {"t": 1}}),
            )
            .await;
        // The ack and the own broadcast (self: true) may come in either order.
        let (mut ack, mut own) = (None, None);
        for _ in 0..2 {
            let v = a.recv().await.json();
            match v["event"].as_str() {
                Some("phx_reply") => ack = Some(v),
                Some("broadcast") => own = Some(v),
                _ => panic!("unexpected {v}"),
            }
        }
        assert_eq!(ack.unwrap()["ref"], r.as_str());
        assert_eq!(
            own.unwrap()["payload"],
            json!({"type": "broadcast", "event": "chat", "payload": {"t": 1}, "meta": {"id": "1"}})
        );

        let r = a.push("phoenix", "heartbeat", json!({})).await;
        let hb = a.recv().await.json();
        assert_eq!(
            (hb["ref"].as_str(), hb["payload"]["status"].as_str()),
            (Some(r.as_str()), Some("ok"))
        );
    }

    #[tokio::test]
    async fn vsn2_binary_broadcasts_go_out_as_binary_frames() {
        let edge = edge(Limits::default());
        let mut c = connect_vsn(&edge, 1 << 16, Vsn::V2);
        c.text(r#"["1","1","realtime:room","phx_join",{"config":{"broadcast":{"self":true}}}]"#)
            .await;
        let reply = c.recv().await.json();
        assert_eq!(reply[3], "phx_reply");
        assert_eq!(reply[4]["status"], "ok");
        assert_eq!(c.recv().await.json()[3], "presence_state");
        // Kind 3 "user broadcast push" as realtime-js sends it: no refs,
        // topic, event "chat", no metadata, JSON encoding.
        let mut push = vec![3, 0, 0, 13, 4, 0, 1];
        push.extend_from_slice(b"realtime:roomchat{\"t\":1}");
        c.raw(&client_frame(0x2, true, &push)).await;
        let Got::Binary(out) = c.recv().await else {
            panic!("a binary frame")
        };
        let meta = br#"{"id":"1"}"#;
        let mut want = vec![4, 13, 4, meta.len() as u8, 1];
        want.extend_from_slice(b"realtime:roomchat");
        want.extend_from_slice(meta);
        want.extend_from_slice(br#"{"t":1}"#);
        assert_eq!(out, want, "kind 4: topic, event, meta, payload");
    }

    #[tokio::test]
    async fn others_receive_and_self_false_skips_the_sender() {
        let edge = edge(Limits::default());
        let (mut a, mut b) = (connect(&edge, 1 << 16), connect(&edge, 1 << 16));
        a.join("realtime:room", json!({})).await;
        b.join("realtime:room", json!({})).await;
        for n in 0..3 {
            a.push(
                "realtime:room",
                "broadcast",
                json!({"type": "broadcast", "event": "n", "payload": {"n": n}}),
            )
            .await;
        }
        for n in 0..3 {
            let v = b.recv_event("broadcast").await;
            assert_eq!(v["payload"]["payload"]["n"], n, "in publish order");
        }
        // A sent without self: the next thing it sees is its heartbeat reply.
        let r = a.push("phoenix", "heartbeat", json!({})).await;
        assert_eq!(a.recv().await.json()["ref"], r.as_str());
    }

    #[tokio::test]
    async fn bad_input_gets_a_reason_and_the_connection_goes_on() {
        let edge = edge(Limits::default());
        let mut c = connect(&edge, 1 << 16);
        c.text("not json").await;
        let v = c.recv().await.json();
        assert_eq!(v["topic"], "phoenix");
        assert!(
            v["payload"]["response"]["reason"]
                .as_str()
                .unwrap()
                .starts_with("invalid message: invalid JSON"),
            "{v}"
        );

        let r = c
            .push(
                "realtime:never",
                "broadcast",
                json!({"type": "broadcast", "event": "e"}),
            )
            .await;
        let v = c.recv().await.json();
        assert_eq!(v["ref"], r.as_str());
        assert_eq!(
            v["payload"]["response"]["reason"],
            "unmatched topic: join \"realtime:never\" first"
        );

        let v = c.join("realtime:", json!({})).await;
        assert_eq!(v["payload"]["status"], "error", "a bare realtime: is refused");

        c.join("realtime:room", json!({})).await;
        c.push(
            "realtime:room",
            "presence",
            json!({"type": "presence", "event": "wave"}),
        )
        .await;
        let v = c.recv().await.json();
        assert_eq!(
            v["payload"]["response"]["reason"],
            "unknown presence event \"wave\"; expected track or untrack"
        );
        c.push("realtime:room", "broadcast", json!({"type": "nope", "event": "e"}))
            .await;
        let v = c.recv().await.json();
        assert_eq!(
            v["payload"]["response"]["reason"],
            "broadcast payload must have type \"broadcast\""
        );

        // Still open: pings are answered and heartbeats replied to.
        c.raw(&client_frame(0x9, true, b"hi")).await;
        assert!(matches!(c.recv().await, Got::Pong(p) if p == b"hi"));
        let r = c.push("phoenix", "heartbeat", json!({})).await;
        assert_eq!(c.recv().await.json()["ref"], r.as_str());
    }

    #[tokio::test]
    async fn fragments_are_reassembled_and_protocol_errors_close_with_a_reason() {
        let limits = Limits {
            max_frame_bytes: 2048,
            ..Limits::default()
        };
        let edge = edge(limits);
        let mut c = connect(&edge, 1 << 16);
        let msg = json!({"topic": "phoenix", "event": "heartbeat", "payload": {}, "ref": "9"}).to_string();
        let (head, tail) = msg.as_bytes().split_at(10);
        c.raw(&client_frame(0x1, false, head)).await;
        c.raw(&client_frame(0x0, true, tail)).await;
        assert_eq!(c.recv().await.json()["ref"], "9", "fragments make one message");

        // Fragments past the limit in total end the connection with 1009.
        c.raw(&client_frame(0x1, false, &[b' '; 1500])).await;
        c.raw(&client_frame(0x0, true, &[b' '; 1500])).await;
        assert!(
            matches!(c.recv().await, Got::Close(1009, r) if r == "message larger than 2048 bytes"),
            "too big"
        );

        let mut c = connect(&edge, 1 << 16);
        c.raw(&client_frame(0x0, true, b"x")).await;
        assert!(
            matches!(c.recv().await, Got::Close(1002, r) if r == "continuation frame without a message"),
            "protocol error"
        );
    }

    #[tokio::test]
    async fn a_slow_consumer_is_closed_and_the_channel_goes_on() {
        let limits = Limits {
            outbound_queue_frames: 8,
            ..Limits::default()
        };
        let edge = edge(limits);
        // The slow client's pipe holds 512 bytes and it reads nothing.
        let mut slow = connect(&edge, 512);
        let mut fast = connect(&edge, 1 << 20);
        let mut sender = connect(&edge, 1 << 16);
        slow.join("realtime:room", json!({})).await;
        fast.join("realtime:room", json!({})).await;
        sender.join("realtime:room", json!({})).await;
        let n = 200;
        for i in 0..n {
            sender
                .push(
                    "realtime:room",
                    "broadcast",
                    json!({"type": "broadcast", "event": "e", "payload": {"i": i, "pad": "x".repeat(64)}}),
                )
                .await;
        }
        for i in 0..n {
            let v = fast.recv_event("broadcast").await;
            assert_eq!(
                v["payload"]["payload"]["i"], i,
                "the fast member gets everything, in order"
            );
        }
        // The slow one finds, after what fitted in its pipe, a 1008 close.
        let mut got = 0;
        loop {
            match slow.recv().await {
                Got::Json(_) => got += 1,
                Got::Close(code, reason) => {
                    assert_eq!(code, 1008);
                    assert!(reason.starts_with("slow consumer"), "{reason}");
                    break;
                }
                other => panic!("unexpected {other:?}"),
            }
        }
        assert!(got < n, "closed before it got everything ({got})");
    }

    /// A refreshed token may extend the session, not change whose it is.
    #[tokio::test]
    async fn a_token_for_another_user_is_refused() {
        use jsonwebtoken::{EncodingKey, Header, encode};
        let secret = b"test-secret";
        let token = |sub: &str| {
            let claims = json!({"sub": sub, "exp": fanout_core::now_ms() / 1000 + 600});
            encode(&Header::default(), &claims, &EncodingKey::from_secret(secret)).unwrap()
        };
        let edge = Edge::new(
            EdgeConfig {
                auth: Some(fanout_core::JwtVerifier::hs256(secret)),
                ..EdgeConfig::default()
            },
            7,
            Arc::new(MemoryBus::new(Retention::default())),
            Arc::new(MemoryPresence::new(7)),
            None,
            CancellationToken::new(),
        );
        let ann = edge.config.auth.as_ref().unwrap().verify(&token("ann")).unwrap();
        let mut c = connect_as(&edge, 1 << 16, Vsn::V1, Some(ann));
        // A channel joined without an access_token is the connection's user's.
        c.join("realtime:ann-room", json!({})).await;
        // A join may carry another user's token (realtime-js after setAuth),
        // and that channel is then that user's.
        let r = c
            .push(
                "realtime:bob-room",
                "phx_join",
                json!({"config": {}, "access_token": token("bob")}),
            )
            .await;
        let reply = c.recv().await.json();
        assert_eq!(
            (reply["ref"].as_str(), reply["payload"]["status"].as_str()),
            (Some(r.as_str()), Some("ok"))
        );
        assert_eq!(c.recv().await.json()["event"], "presence_state");

        // Refreshing with the channel's own user's token is silent; with
        // another user's it ends that channel with the reason.
        c.push(
            "realtime:ann-room",
            "access_token",
            json!({"access_token": token("ann")}),
        )
        .await;
        c.push(
            "realtime:bob-room",
            "access_token",
            json!({"access_token": token("bob")}),
        )
        .await;
        c.push(
            "realtime:ann-room",
            "access_token",
            json!({"access_token": token("bob")}),
        )
        .await;
        let system = c.recv().await.json();
        assert_eq!(
            (system["event"].as_str(), system["topic"].as_str()),
            (Some("system"), Some("realtime:ann-room")),
            "the matching refreshes said nothing: {system}"
        );
        let message = system["payload"]["message"].as_str().unwrap_or_default();
        assert!(
            message.contains("another user (bob)") && message.contains("(ann)"),
            "{message}"
        );
        assert_eq!(c.recv().await.json()["event"], "phx_close");
        // bob's channel goes on.
        let r = c
            .push(
                "realtime:bob-room",
                "broadcast",
                json!({"type": "broadcast", "event": "e"}),
            )
            .await;
        let r2 = c.push("phoenix", "heartbeat", json!({})).await;
        let v = c.recv().await.json();
        assert_eq!(v["ref"], r2.as_str(), "bob-room still joined (no error for {r}): {v}");
    }

    /// realtime-js asks for no presence when a channel has no presence
    /// listener at subscribe; its first track turns presence on for that
    /// socket (state first, then diffs), as Supabase Realtime does.
    #[tokio::test]
    async fn the_first_track_turns_presence_on_and_the_same_payload_again_is_a_no_op() {
        let edge = edge(Limits::default());
        let (mut a, mut b) = (connect(&edge, 1 << 16), connect(&edge, 1 << 16));
        a.join("realtime:room", json!({"presence": {"enabled": false, "key": "ann"}}))
            .await;
        b.join("realtime:room", json!({"presence": {"enabled": false, "key": "bob"}}))
            .await;
        let track = |name: &str| json!({"type": "presence", "event": "track", "payload": {"name": name}});

        a.push("realtime:room", "presence", track("Ann")).await;
        // Ann's socket now gets the state (with Ann), then diffs.
        let mut state = None;
        while state.is_none() {
            let v = a.recv().await.json();
            if v["event"] == "presence_state" {
                state = Some(v);
            }
        }
        assert_eq!(state.unwrap()["payload"]["ann"]["metas"][0]["name"], "Ann");

        b.push("realtime:room", "presence", track("Bob")).await;
        let diff = a.recv_event("presence_diff").await;
        let diff = if diff["payload"]["joins"]["bob"].is_null() {
            a.recv_event("presence_diff").await
        } else {
            diff
        };
        assert_eq!(
            diff["payload"]["joins"]["bob"]["metas"][0]["name"], "Bob",
            "Ann sees Bob join"
        );
        let state = b.recv_event("presence_state").await;
        assert_eq!(
            state["payload"]["ann"]["metas"][0]["name"], "Ann",
            "Bob sees Ann already there"
        );

        // The same payload again: ok, and no diff reaches anyone.
        let r = a.push("realtime:room", "presence", track("Ann")).await;
        let reply = a.recv_event("phx_reply").await;
        assert_eq!(
            (reply["ref"].as_str(), reply["payload"]["status"].as_str()),
            (Some(r.as_str()), Some("ok"))
        );
        // A changed payload is an update: a leave of the old meta and a join of the new.
        a.push("realtime:room", "presence", track("Ann B.")).await;
        // (Bob may still see the diff of his own track first.)
        let mut update = b.recv().await.json();
        while update["event"] != "presence_diff" || update["payload"]["joins"]["ann"].is_null() {
            update = b.recv().await.json();
        }
        assert_eq!(
            update["payload"]["joins"]["ann"]["metas"][0]["name"], "Ann B.",
            "the first diff Bob sees after the repeat is the update"
        );
        assert_eq!(update["payload"]["leaves"]["ann"]["metas"][0]["name"], "Ann");
    }

    #[tokio::test]
    async fn a_join_sees_reply_then_presence_state_then_replay_then_live() {
        let edge = edge(Limits::default());
        let mut present = connect(&edge, 1 << 16);
        present.join("realtime:room", json!({"presence": {"key": "ann"}})).await;
        present
            .push(
                "realtime:room",
                "presence",
                json!({"type": "presence", "event": "track", "payload": {"name": "Ann"}}),
            )
            .await;
        present.recv_event("phx_reply").await;
        for i in 1..=3 {
            present
                .push(
                    "realtime:room",
                    "broadcast",
                    json!({"type": "broadcast", "event": "e", "payload": {"i": i}}),
                )
                .await;
        }
        // Wait until the channel has dispatched all three.
        let mut late = connect(&edge, 1 << 16);
        late.join("realtime:room", json!({})).await;
        for _ in 0..3 {
            late.recv_event("broadcast").await;
        }
        let r = late.push("phoenix", "heartbeat", json!({})).await;
        assert_eq!(late.recv().await.json()["ref"], r.as_str());

        let mut resumed = connect(&edge, 1 << 16);
        let join_ref = resumed
            .push(
                "realtime:room",
                "phx_join",
                json!({"config": {"resume": {"after": "1"}}}),
            )
            .await;
        present
            .push(
                "realtime:room",
                "broadcast",
                json!({"type": "broadcast", "event": "e", "payload": {"i": 4}}),
            )
            .await;
        let reply = resumed.recv().await.json();
        assert_eq!(
            (reply["event"].as_str(), reply["ref"].as_str()),
            (Some("phx_reply"), Some(join_ref.as_str()))
        );
        let state = resumed.recv().await.json();
        assert_eq!(state["event"], "presence_state");
        assert_eq!(state["payload"]["ann"]["metas"][0]["name"], "Ann");
        for (i, replayed) in [(2, true), (3, true), (4, false)] {
            let v = resumed.recv().await.json();
            assert_eq!(v["event"], "broadcast");
            assert_eq!(v["payload"]["payload"]["i"], i);
            assert_eq!(v["payload"]["meta"]["id"], i.to_string());
            assert_eq!(v["payload"]["meta"]["replayed"].as_bool().unwrap_or(false), replayed);
        }
    }

    /// What an idle connection's task holds in its future (tokio allocates
    /// a task's future whole, for the task's life): the read loop waiting
    /// for bytes. The drain task runs only while frames queue, so its size
    /// is printed but is not an idle connection's.
    /// Printed for docs/BENCHMARKS.md's breakdown of the bytes per idle
    /// connection; the bounds keep them from growing unnoticed.
    #[test]
    fn an_idle_connections_tasks_stay_small() {
        fn output_size<A, B, C, D, Fut>(_: fn(A, B, C, D) -> Fut) -> usize {
            std::mem::size_of::<Fut>()
        }
        fn output_size1<A, Fut>(_: fn(A) -> Fut) -> usize {
            std::mem::size_of::<Fut>()
        }
        let serve = output_size(serve::<tokio::net::tcp::OwnedReadHalf> as fn(_, _, _, _) -> _);
        let writer = output_size1(crate::writer::drain_task as fn(_) -> _);
        let conn = std::mem::size_of::<Conn>();
        let socket = std::mem::size_of::<Socket<tokio::net::tcp::OwnedReadHalf>>();
        let conn_writer = std::mem::size_of::<ConnWriter>();
        eprintln!(
            "read loop future {serve} B (Conn {conn} B, Socket {socket} B), drain task future {writer} B, ConnWriter {conn_writer} B"
        );
        // What the read loop's select! holds while it waits, beside Conn and
        // Socket: each branch's future lives for the whole wait.
        let token = CancellationToken::new();
        let notify = tokio::sync::Notify::new();
        let cancelled = std::mem::size_of_val(&token.cancelled());
        let (io, _) = tokio::io::duplex(64);
        let tasks = tokio_util::task::TaskTracker::new();
        let done = std::mem::size_of_val(&ConnWriter::new(Box::new(MemorySocket::new(io)), 1, tasks).done());
        let sleep = std::mem::size_of::<tokio::time::Sleep>();
        let notified = std::mem::size_of_val(&notify.notified());
        let (io, _) = tokio::io::duplex(64);
        let mut reader = FrameReader::new(io, Bytes::new(), 1 << 16);
        let readable = std::mem::size_of_val(&reader.readable());
        eprintln!(
            "Claims {} B, Slot {} B, Option<Claims> {} B",
            std::mem::size_of::<Claims>(),
            std::mem::size_of::<crate::admission::Slot>(),
            std::mem::size_of::<Option<Claims>>()
        );
        eprintln!(
            "select! branches: writer done {done} B, shutdown cancelled {cancelled} B, sleep {sleep} B, control notified {notified} B, readable {readable} B"
        );
        assert!(serve <= 1024, "read loop future {serve} B");
        assert!(writer <= 512, "drain task future {writer} B");
    }
}
