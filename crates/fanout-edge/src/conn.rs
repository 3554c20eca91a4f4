//! One client connection: reads frames, speaks the protocol, and cleans up.
//!
//! The read side runs in the connection's own task; writes go through the
//! shared [`ConnWriter`] (see `writer.rs`), whose drain task runs beside it.
//! Every client mistake gets an error reply or a close frame with a reason;
//! nothing a client sends can panic the server or stall a channel.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use fanout_core::changes::Binding;
use fanout_core::{ChannelName, Claims, Event, Origin, Position};
use fastwebsockets::{OpCode, WebSocketError};
use serde::Deserialize;
use serde_json::value::RawValue;
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tokio::time::Instant;

use crate::Edge;
use crate::frame::{self, Opcode, close_code};
use crate::framed::FrameReader;
use crate::hub::{JoinRequest, Member};
use crate::protocol::{self, Encoder, Inbound, Payload, Vsn};
use crate::ratelimit::TokenBucket;
use crate::writer::ConnWriter;

/// What a connection knows about one joined channel.
#[derive(Debug)]
struct Joined {
    channel: ChannelName,
    /// Change feeds joined for this topic's `postgres_changes` bindings:
    /// (source channel, membership id).
    feeds: Vec<(ChannelName, u64)>,
    join_ref: Option<String>,
    ack: bool,
    presence_key: String,
    tracked: bool,
}

struct Conn {
    edge: Arc<Edge>,
    id: u64,
    origin: Origin,
    vsn: Vsn,
    enc: Encoder,
    writer: Arc<ConnWriter>,
    /// Joined channels by topic.
    joined: HashMap<String, Joined>,
    /// Expiry (seconds since the epoch) of the newest valid token, if auth
    /// is on.
    token_exp: Option<u64>,
    /// The token expired and no fresh one arrived yet.
    expired: bool,
    messages: TokenBucket,
    joins: TokenBucket,
}

/// Serves an upgraded socket until it closes.
pub(crate) async fn serve(edge: Arc<Edge>, stream: TcpStream, leftover: Bytes, vsn: Vsn, claims: Option<Claims>) {
    let _ = stream.set_nodelay(true);
    let (read, write) = stream.into_split();
    let limits = edge.config.limits.clone();
    let writer = Arc::new(ConnWriter::new(write, limits.outbound_queue_frames));
    let drain = {
        let writer = writer.clone();
        edge.tasks.spawn(async move { writer.run().await })
    };
    // `leftover` may be a view into hyper's whole 8 KiB read buffer: copy
    // the few bytes (usually none) and drop it, so that buffer is freed now,
    // not when the connection ends. (Shadowing alone would keep the
    // original alive in this future until the end.)
    let leftover = own_small(leftover);
    let mut reader = FrameReader::new(read, leftover, limits.max_frame_bytes);
    let id = edge.next_conn_id();
    let mut conn = Conn {
        origin: Origin {
            node: edge.node,
            connection: id,
        },
        edge: edge.clone(),
        id,
        vsn,
        enc: Encoder(vsn),
        writer: writer.clone(),
        joined: HashMap::new(),
        token_exp: claims.and_then(|c| c.exp),
        expired: false,
        messages: TokenBucket::new(limits.messages_per_second),
        joins: TokenBucket::new(limits.joins_per_second),
    };
    metrics::gauge!("fanout_connections").increment(1.0);
    metrics::counter!("fanout_connections_opened_total").increment(1);

    let reason = conn.read_loop(&mut reader).await;
    conn.leave_all().await;
    writer.close(reason.code, reason.reason, false);
    let _ = drain.await;
    reader.linger(Duration::from_secs(2)).await;
    edge.connection_closed();
    metrics::gauge!("fanout_connections").decrement(1.0);
    metrics::counter!("fanout_connections_closed_total", "reason" => reason.label).increment(1);
}

/// A copy of `b` that does not keep `b`'s allocation alive; `b` is dropped.
fn own_small(b: Bytes) -> Bytes {
    if b.is_empty() {
        Bytes::new()
    } else {
        Bytes::copy_from_slice(&b)
    }
}

/// How and why the read loop ended.
struct End {
    code: u16,
    reason: String,
    /// A metric label from a small fixed set.
    label: &'static str,
}

impl End {
    fn new(code: u16, reason: impl Into<String>, label: &'static str) -> Self {
        Self {
            code,
            reason: reason.into(),
            label,
        }
    }
}

impl Conn {
    fn closed_by_server(&self) -> End {
        let r = self.writer.close_reason();
        End::new(
            r.as_ref().map_or(close_code::NORMAL, |r| r.code),
            r.map(|r| r.reason).unwrap_or_default(),
            "server",
        )
    }

    async fn shutting_down(&self) -> End {
        self.edge.drain_delay().await;
        End::new(close_code::GOING_AWAY, "server shutting down", "shutdown")
    }

    async fn read_loop(&mut self, reader: &mut FrameReader) -> End {
        let limits = self.edge.config.limits.clone();
        let shutdown = self.edge.shutdown.clone();
        let done = self.writer.done().clone();
        // A fragmented message being assembled: its opcode and bytes so far.
        let mut partial: Option<(OpCode, Vec<u8>)> = None;
        loop {
            let expiry = self.token_exp.map(deadline_of);
            // Wait for bytes (cancel-safe, holds no buffer), or for the end,
            // or for the token to expire.
            tokio::select! {
                biased;
                () = done.cancelled() => return self.closed_by_server(),
                () = shutdown.cancelled() => return self.shutting_down().await,
                () = sleep_until_opt(expiry) => {
                    self.expire_token().await;
                    continue;
                }
                r = tokio::time::timeout(limits.idle_timeout, reader.readable()) => match r {
                    Err(_) => return End::new(close_code::POLICY, format!("idle for {} s without a heartbeat", limits.idle_timeout.as_secs()), "idle"),
                    Ok(Err(_)) => return End::new(close_code::NORMAL, "", "eof"),
                    Ok(Ok(())) => {}
                },
            }
            // Read one whole frame; only the end of the connection may
            // interrupt it (a half-read frame cannot be resumed).
            let frame = tokio::select! {
                biased;
                () = done.cancelled() => return self.closed_by_server(),
                () = shutdown.cancelled() => return self.shutting_down().await,
                r = tokio::time::timeout(limits.idle_timeout, reader.read_frame()) => match r {
                    Err(_) => return End::new(close_code::POLICY, "frame not completed in time", "idle"),
                    Ok(Err(e)) => return read_error(e, limits.max_frame_bytes),
                    Ok(Ok((frame, _))) => frame,
                },
            };
            match frame.opcode {
                OpCode::Text | OpCode::Binary if frame.fin => {
                    if partial.is_some() {
                        return End::new(
                            close_code::PROTOCOL_ERROR,
                            "new message inside a fragmented one",
                            "protocol",
                        );
                    }
                    Box::pin(self.data(frame.opcode, &frame.payload)).await;
                }
                OpCode::Text | OpCode::Binary => {
                    if partial.is_some() {
                        return End::new(
                            close_code::PROTOCOL_ERROR,
                            "new message inside a fragmented one",
                            "protocol",
                        );
                    }
                    partial = Some((frame.opcode, frame.payload.to_vec()));
                }
                OpCode::Continuation => {
                    let Some((_, buf)) = partial.as_mut() else {
                        return End::new(
                            close_code::PROTOCOL_ERROR,
                            "continuation frame without a message",
                            "protocol",
                        );
                    };
                    // The limit is on the whole message, not on each fragment.
                    if buf.len() + frame.payload.len() > limits.max_frame_bytes {
                        return End::new(
                            close_code::TOO_BIG,
                            format!("message larger than {} bytes", limits.max_frame_bytes),
                            "too_big",
                        );
                    }
                    buf.extend_from_slice(&frame.payload);
                    if frame.fin
                        && let Some((opcode, buf)) = partial.take()
                    {
                        if opcode == OpCode::Text && std::str::from_utf8(&buf).is_err() {
                            return End::new(1007, "text message is not valid UTF-8", "protocol");
                        }
                        Box::pin(self.data(opcode, &buf)).await;
                    }
                }
                OpCode::Close => return End::new(close_code::NORMAL, "", "client"),
                OpCode::Ping => {
                    let _ = self.writer.send(frame::encode(Opcode::Pong, &frame.payload));
                }
                OpCode::Pong => {}
            }
        }
    }

    /// One complete client message. Callers box this future: handling
    /// needs far more state than waiting does, and an idle connection
    /// should only pay for waiting.
    async fn data(&mut self, opcode: OpCode, bytes: &[u8]) {
        if !self.messages.try_take() {
            metrics::counter!("fanout_client_errors_total", "reason" => "rate_limited").increment(1);
            let reason = format!(
                "rate limit exceeded: {} messages per second",
                self.edge.config.limits.messages_per_second
            );
            let (join_ref, r#ref, topic) = protocol::peek_refs(self.vsn, opcode == OpCode::Binary, bytes);
            self.send(self.enc.error_reply(
                join_ref.as_deref(),
                r#ref.as_deref(),
                topic.as_deref().unwrap_or("phoenix"),
                &reason,
            ));
            return;
        }
        let decoded = if opcode == OpCode::Text {
            protocol::decode_text(self.vsn, bytes)
        } else {
            protocol::decode_binary(bytes)
        };
        match decoded {
            Ok(msg) => self.handle(msg).await,
            Err(e) => {
                metrics::counter!("fanout_client_errors_total", "reason" => "malformed").increment(1);
                // Address the error to the message's own topic and ref when
                // they can be read, so the client's pending push sees it.
                let (join_ref, r#ref, topic) = protocol::peek_refs(self.vsn, opcode == OpCode::Binary, bytes);
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

    async fn handle(&mut self, m: Inbound) {
        metrics::counter!("fanout_client_messages_total").increment(1);
        if m.topic == "phoenix" {
            return if m.event == "heartbeat" {
                self.reply_ok(&m, "{}")
            } else {
                self.reply_err(
                    &m,
                    "unknown_event",
                    &format!("unknown event {:?} on topic phoenix", m.event),
                )
            };
        }
        match m.event.as_str() {
            "phx_join" => self.join(&m).await,
            _ if !self.joined.contains_key(&m.topic) => self.reply_err(
                &m,
                "unmatched_topic",
                &format!("unmatched topic: join {:?} first", m.topic),
            ),
            "phx_leave" => {
                self.leave(&m.topic).await;
                self.reply_ok(&m, "{}");
                self.send(self.enc.message(
                    m.join_ref.as_deref(),
                    m.join_ref.as_deref(),
                    &m.topic,
                    "phx_close",
                    "{}",
                ));
            }
            "broadcast" => self.broadcast(&m).await,
            "presence" => self.presence(&m).await,
            "access_token" => self.access_token(&m).await,
            other => {
                let reason = format!("unknown event {other:?}");
                self.reply_err(&m, "unknown_event", &reason)
            }
        }
    }

    async fn join(&mut self, m: &Inbound) {
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
        let Payload::Json(raw) = &m.payload else {
            return self.reply_err(m, "bad_payload", "phx_join payload must be a JSON object");
        };
        let payload: JoinPayload = match serde_json::from_str(raw.get()) {
            Ok(p) => p,
            Err(e) => return self.reply_err(m, "bad_payload", &format!("invalid phx_join payload: {e}")),
        };
        let config = payload.config;
        let bindings = match self.parse_bindings(&channel, &config.postgres_changes) {
            Ok(b) => b,
            Err(reason) => return self.reply_err(m, "bad_binding", &reason),
        };
        if config.private {
            return self.reply_err(
                m,
                "unsupported",
                "private channels are not supported by this server; join with private: false",
            );
        }
        match payload.access_token.as_deref() {
            Some(token) => {
                if let Err(e) = self.check_token(token) {
                    return self.reply_err(m, "unauthorized", &format!("invalid access_token: {e}"));
                }
            }
            None if self.expired => {
                return self.reply_err(
                    m,
                    "unauthorized",
                    "access token has expired: join with a fresh access_token",
                );
            }
            None => {}
        }
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
        let resume_after = match config.resume.map(|r| r.after.parse::<Position>()) {
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
        let presence_key = match config.presence.key {
            Some(k) if !k.is_empty() => k,
            _ => uuid::Uuid::new_v4().to_string(),
        };
        let topic: Arc<str> = Arc::from(m.topic.as_str());
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
                feeds,
                join_ref: m.join_ref.clone(),
                ack: config.broadcast.ack,
                presence_key,
                tracked: false,
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
                channel.as_str(),
            ));
        }
        self.edge.hub.join(
            &channel,
            JoinRequest {
                member: Member {
                    conn: self.id,
                    origin: self.origin,
                    vsn: self.vsn,
                    receive_own: config.broadcast.self_,
                    presence: config.presence.enabled.unwrap_or(true),
                    skip_through: 0,
                    feed_topic: None,
                    changes: (!bindings.own.is_empty()).then(|| bindings.own.into()),
                    writer: self.writer.clone(),
                },
                reply,
                resume_after,
                ready: None,
            },
        );
        metrics::counter!("fanout_joins_total").increment(1);
    }

    /// Validates a join's `postgres_changes` bindings and sorts them by the
    /// channel their changes are routed to. Errors are the reply's reason.
    fn parse_bindings(&self, channel: &ChannelName, raw: &[serde_json::Value]) -> Result<JoinBindings, String> {
        let mut out = JoinBindings::default();
        if raw.is_empty() {
            return Ok(out);
        }
        let Some(routes) = self.edge.config.changes.clone() else {
            return Err(
                "postgres_changes is not available: this server has no database change stream configured".into(),
            );
        };
        let mut feeds: HashMap<ChannelName, Vec<Binding>> = HashMap::new();
        for (i, value) in raw.iter().enumerate() {
            let spec: BindingSpec = serde_json::from_value(value.clone())
                .map_err(|e| format!("postgres_changes[{i}] is not a binding: {e}"))?;
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

    /// Joins the change feeds of a topic's bindings and waits until each is
    /// live, so every change committed after the join reply is delivered.
    /// `None` if they did not go live within the feed timeout.
    async fn join_feeds(
        &mut self,
        topic: &Arc<str>,
        feeds: Vec<(ChannelName, Vec<Binding>)>,
    ) -> Option<Vec<(ChannelName, u64)>> {
        let mut joined = Vec::with_capacity(feeds.len());
        let mut waits = Vec::with_capacity(feeds.len());
        for (source, bindings) in feeds {
            let id = self.edge.next_conn_id();
            let (ready, wait) = oneshot::channel();
            self.edge.hub.join(
                &source,
                JoinRequest {
                    member: Member {
                        conn: id,
                        origin: self.origin,
                        vsn: self.vsn,
                        receive_own: false,
                        presence: false,
                        skip_through: 0,
                        feed_topic: Some(topic.clone()),
                        changes: Some(bindings.into()),
                        writer: self.writer.clone(),
                    },
                    reply: Vec::new(),
                    resume_after: None,
                    ready: Some(ready),
                },
            );
            joined.push((source, id));
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
                for (source, id) in &joined {
                    self.edge.hub.leave(source, *id);
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
        for (source, id) in &joined.feeds {
            self.edge.hub.leave(source, *id);
        }
        if joined.tracked {
            self.untrack(&joined.channel).await;
        }
    }

    async fn leave_all(&mut self) {
        let topics: Vec<String> = self.joined.keys().cloned().collect();
        for t in topics {
            self.leave(&t).await;
        }
    }

    async fn broadcast(&mut self, m: &Inbound) {
        let (event, payload, binary) = match &m.payload {
            Payload::Broadcast { event, payload, binary } => (event.clone(), payload.clone(), *binary),
            Payload::Json(raw) => match serde_json::from_str::<BroadcastPayload<'_>>(raw.get()) {
                Ok(b) if b.r#type == "broadcast" => (
                    b.event,
                    b.payload.map_or_else(
                        || Bytes::from_static(b"{}"),
                        |p| Bytes::copy_from_slice(p.get().as_bytes()),
                    ),
                    false,
                ),
                Ok(_) => return self.reply_err(m, "bad_payload", "broadcast payload must have type \"broadcast\""),
                Err(e) => return self.reply_err(m, "bad_payload", &format!("invalid broadcast payload: {e}")),
            },
        };
        if event.len() > 255 {
            return self.reply_err(m, "bad_payload", "broadcast event name is longer than 255 bytes");
        }
        let Some(joined) = self.joined.get(&m.topic) else {
            return;
        };
        let ack = joined.ack;
        let ev = Event::broadcast(joined.channel.clone(), &event, payload, binary, Some(self.origin));
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

    async fn presence(&mut self, m: &Inbound) {
        let Payload::Json(raw) = &m.payload else {
            return self.reply_err(m, "bad_payload", "presence payload must be JSON");
        };
        let p: PresencePayload = match serde_json::from_str(raw.get()) {
            Ok(p) => p,
            Err(e) => return self.reply_err(m, "bad_payload", &format!("invalid presence payload: {e}")),
        };
        let Some(joined) = self.joined.get_mut(&m.topic) else {
            return;
        };
        let channel = joined.channel.clone();
        match p.event.as_str() {
            "track" => {
                let meta = match p.payload {
                    None => serde_json::Map::new(),
                    Some(serde_json::Value::Object(o)) => o,
                    Some(_) => return self.reply_err(m, "bad_payload", "presence track payload must be a JSON object"),
                };
                let key = joined.presence_key.clone();
                joined.tracked = true;
                match self.edge.presence.track(&channel, self.origin, &key, meta).await {
                    Ok(diff) => {
                        self.publish_diff(&channel, diff).await;
                        self.reply_ok(m, "{}");
                    }
                    Err(e) => self.reply_err(m, "presence_error", &e.to_string()),
                }
            }
            "untrack" => {
                joined.tracked = false;
                self.untrack(&channel).await;
                self.reply_ok(m, "{}");
            }
            other => self.reply_err(
                m,
                "unknown_event",
                &format!("unknown presence event {other:?}; expected track or untrack"),
            ),
        }
    }

    async fn untrack(&self, channel: &ChannelName) {
        match self.edge.presence.untrack(channel, self.origin).await {
            Ok(diff) => self.publish_diff(channel, diff).await,
            Err(e) => tracing::warn!(error = %e, "presence untrack failed"),
        }
    }

    async fn publish_diff(&self, channel: &ChannelName, diff: fanout_core::PresenceDiff) {
        if diff.is_empty() {
            return;
        }
        let ev = Event::presence_diff(channel.clone(), &diff, Some(self.origin));
        if let Err(e) = self.edge.bus.publish(ev).await {
            metrics::counter!("fanout_bus_publish_errors_total").increment(1);
            tracing::warn!(error = %e, "presence diff not published");
        }
    }

    async fn access_token(&mut self, m: &Inbound) {
        let Payload::Json(raw) = &m.payload else { return };
        #[derive(Deserialize)]
        struct P {
            access_token: Option<String>,
        }
        let token = serde_json::from_str::<P>(raw.get()).ok().and_then(|p| p.access_token);
        let Some(token) = token else {
            return self.reply_err(
                m,
                "bad_payload",
                "access_token payload must be {\"access_token\": \"<jwt>\"}",
            );
        };
        if let Err(e) = self.check_token(&token) {
            metrics::counter!("fanout_client_errors_total", "reason" => "unauthorized").increment(1);
            self.end_channel(&m.topic.clone(), &format!("invalid access_token: {e}"))
                .await;
        }
    }

    /// Verifies a token (if auth is on) and, if valid, adopts its expiry.
    fn check_token(&mut self, token: &str) -> Result<(), fanout_core::AuthError> {
        let Some(verifier) = &self.edge.config.auth else {
            return Ok(());
        };
        let claims = verifier.verify(token)?;
        self.token_exp = claims.exp;
        self.expired = false;
        Ok(())
    }

    /// The token expired: every joined channel ends with a system message
    /// and `phx_close`, and new joins need a fresh `access_token`.
    async fn expire_token(&mut self) {
        self.token_exp = None;
        self.expired = true;
        metrics::counter!("fanout_token_expirations_total").increment(1);
        let topics: Vec<String> = self.joined.keys().cloned().collect();
        for t in topics {
            self.end_channel(
                &t,
                "access token has expired: send a fresh one with access_token and rejoin",
            )
            .await;
        }
    }

    /// Ends one channel with a system error message and `phx_close`.
    async fn end_channel(&mut self, topic: &str, message: &str) {
        let Some(joined) = self.joined.get(topic) else { return };
        let (channel, join_ref) = (joined.channel.clone(), joined.join_ref.clone());
        self.send(self.enc.system(topic, "system", false, message, channel.as_str()));
        self.send(
            self.enc
                .message(join_ref.as_deref(), join_ref.as_deref(), topic, "phx_close", "{}"),
        );
        self.leave(topic).await;
    }
}

fn read_error(e: WebSocketError, max: usize) -> End {
    match e {
        WebSocketError::FrameTooLarge => {
            End::new(close_code::TOO_BIG, format!("frame larger than {max} bytes"), "too_big")
        }
        WebSocketError::InvalidUTF8 => End::new(1007, "text frame is not valid UTF-8", "protocol"),
        WebSocketError::UnexpectedEOF | WebSocketError::IoError(_) | WebSocketError::ConnectionClosed => {
            End::new(close_code::NORMAL, "", "eof")
        }
        other => End::new(
            close_code::PROTOCOL_ERROR,
            format!("protocol error: {other}"),
            "protocol",
        ),
    }
}

fn deadline_of(exp_secs: u64) -> Instant {
    let now = fanout_core::now_ms() / 1000;
    Instant::now() + Duration::from_secs(exp_secs.saturating_sub(now))
}

async fn sleep_until_opt(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

/// A join's bindings, sorted by where their changes come from.
#[derive(Default)]
struct JoinBindings {
    /// The `postgres_changes` list of the join reply.
    reply: Vec<serde_json::Value>,
    /// Bindings whose changes are routed to the joined channel itself.
    own: Vec<Binding>,
    /// Bindings served by other channels' change feeds.
    feeds: Vec<(ChannelName, Vec<Binding>)>,
}

/// One `postgres_changes` binding as realtime-js sends it.
#[derive(Deserialize)]
struct BindingSpec {
    event: String,
    schema: String,
    #[serde(default)]
    table: Option<String>,
    #[serde(default)]
    filter: Option<String>,
}

#[derive(Deserialize)]
struct JoinPayload {
    #[serde(default)]
    config: JoinConfig,
    #[serde(default)]
    access_token: Option<String>,
}

#[derive(Deserialize, Default)]
struct JoinConfig {
    #[serde(default)]
    broadcast: BroadcastConfig,
    #[serde(default)]
    presence: PresenceConfig,
    #[serde(default)]
    postgres_changes: Vec<serde_json::Value>,
    #[serde(default)]
    private: bool,
    #[serde(default)]
    resume: Option<ResumeConfig>,
}

#[derive(Deserialize, Default)]
struct BroadcastConfig {
    #[serde(default)]
    ack: bool,
    #[serde(default, rename = "self")]
    self_: bool,
}

#[derive(Deserialize, Default)]
struct PresenceConfig {
    #[serde(default)]
    key: Option<String>,
    #[serde(default)]
    enabled: Option<bool>,
}

#[derive(Deserialize)]
struct ResumeConfig {
    #[serde(deserialize_with = "de_position")]
    after: String,
}

fn de_position<'de, D: serde::Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum P {
        S(String),
        N(u64),
    }
    Ok(match P::deserialize(d)? {
        P::S(s) => s,
        P::N(n) => n.to_string(),
    })
}

#[derive(Deserialize)]
struct BroadcastPayload<'a> {
    r#type: String,
    event: String,
    #[serde(borrow, default)]
    payload: Option<&'a RawValue>,
}

#[derive(Deserialize)]
struct PresencePayload {
    event: String,
    #[serde(default)]
    payload: Option<serde_json::Value>,
}
