//! The room front: plain WebSocket clients of a Durable-Objects-style room
//! server (`/rooms/<room>?sessionId=…`, JSON text frames) on the same
//! channels, bus, presence and policies as every other client.
//!
//! - The token comes in the query (`token`, or `apikey` / `Authorization`
//!   as for Supabase clients) or, when the URL has none, in the first
//!   message, `{"type": "auth", "token": …}`; it is checked like any other.
//! - The room is the channel of that name (`?private=true` for the private
//!   one). On join the client gets `{"type": "welcome", "users": […]}`.
//! - Presence is the room's membership, kept in the same presence store as
//!   Supabase presence under the user's id (the token's `sub`) with the tab's
//!   `sessionId`: several tabs of one user are one user, joining with the
//!   first tab and leaving with the last. `{"type": "join" | "leave",
//!   "user": {"id"}}` is announced once per user; a crashed edge's users
//!   leave within the presence TTL, as Supabase presence does. The welcome
//!   lists every user there, the joiner's own included.
//! - Any other JSON object is relayed to the room (to every protocol: its
//!   `type` is the broadcast's event) with the sender's identity added as
//!   `from: {id, sessionId}`; the sender does not get it back.
//! - `ping` (the text, or `{"type": "ping"}`) is answered with `pong` by
//!   the edge itself and goes no further.
//!
//! The hub frames a room member with [`Wire::Room`]: a broadcast is
//! `{"type": event, …payload}` (or `{"type": event, "payload": …}` when the
//! payload is not an object free of `type`), and presence diffs become the
//! join and leave notices the channel task's [`Roster`] derives from them.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use bytes::Bytes;
use fanout_core::{ChannelName, Claims, Event, Origin};
use serde_json::{Map, Value};
use tokio::io::AsyncRead;

use crate::Edge;
use crate::conn::{self, Socket, SocketParts};
use crate::control::Kick;
use crate::frame::{self, CloseReason, Opcode, close_code};
use crate::hub::{JoinRequest, Member};
use crate::ratelimit::TokenBucket;
use crate::reader::{FrameReader, Incoming};
use crate::wire::Wire;
use crate::writer::ConnWriter;

fn text_frame(v: &Value) -> Bytes {
    frame::encode(Opcode::Text, v.to_string().as_bytes())
}

/// A broadcast as a room client receives it.
pub(crate) fn event_frame(ev: &Event) -> Option<Bytes> {
    if ev.kind != fanout_core::EventKind::Broadcast || ev.binary {
        return None;
    }
    let payload: Value = serde_json::from_slice(&ev.payload).ok()?;
    let mut out = Map::new();
    out.insert("type".into(), Value::String(ev.event.to_string()));
    match payload {
        Value::Object(fields) if !fields.contains_key("type") => out.extend(fields),
        other => {
            out.insert("payload".into(), other);
        }
    }
    Some(text_frame(&Value::Object(out)))
}

/// Who is in a room, per user: the `phx_ref`s of the user's tabs. The
/// channel task keeps one for channels with room members, built from the
/// presence state at the first room join and updated by every presence
/// diff it dispatches, in order; applying a diff twice changes nothing.
#[derive(Debug, Default)]
pub(crate) struct Roster {
    users: HashMap<String, HashSet<String>>,
}

fn refs(metas: &Value) -> impl Iterator<Item = String> + '_ {
    metas
        .get("metas")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|m| m.get("phx_ref").and_then(Value::as_str).map(str::to_owned))
}

impl Roster {
    /// From a `presence_state` (`{key: {"metas": [{phx_ref, …}]}}`).
    pub(crate) fn from_state(state: &Value) -> Self {
        let mut roster = Self::default();
        for (key, metas) in state.as_object().into_iter().flatten() {
            let set: HashSet<String> = refs(metas).collect();
            if !set.is_empty() {
                roster.users.insert(key.clone(), set);
            }
        }
        roster
    }

    /// Applies a `presence_diff`'s JSON; the frames announcing the users
    /// it brought in and took out (one buffer, possibly empty).
    pub(crate) fn apply(&mut self, diff: &[u8]) -> Option<Bytes> {
        let diff: Value = serde_json::from_slice(diff).ok()?;
        let side = |name: &str| diff.get(name).and_then(Value::as_object).cloned().unwrap_or_default();
        let (joins, leaves) = (side("joins"), side("leaves"));
        let keys: Vec<String> = joins.keys().chain(leaves.keys()).cloned().collect();
        let before: HashSet<String> = keys.iter().filter(|k| self.users.contains_key(*k)).cloned().collect();
        // Joins first: an update is a leave and a join of the same key,
        // which must not look like the user leaving.
        for (key, metas) in &joins {
            self.users.entry(key.clone()).or_default().extend(refs(metas));
        }
        for (key, metas) in &leaves {
            if let Some(set) = self.users.get_mut(key) {
                for r in refs(metas) {
                    set.remove(&r);
                }
                if set.is_empty() {
                    self.users.remove(key);
                }
            }
        }
        let mut out = Vec::new();
        let mut seen = HashSet::new();
        for key in keys {
            if !seen.insert(key.clone()) {
                continue;
            }
            let kind = match (before.contains(&key), self.users.contains_key(&key)) {
                (false, true) => "join",
                (true, false) => "leave",
                _ => continue,
            };
            out.extend_from_slice(&text_frame(&serde_json::json!({ "type": kind, "user": { "id": key } })));
        }
        (!out.is_empty()).then(|| Bytes::from(out))
    }

    /// `{"type": "welcome", "users": [{"id"}]}`, sorted by id, with
    /// `own` (the joiner's user) whether or not its diff was seen yet.
    pub(crate) fn welcome(&self, own: Option<&str>) -> Bytes {
        let mut ids: Vec<&str> = self.users.keys().map(String::as_str).chain(own).collect();
        ids.sort_unstable();
        ids.dedup();
        let users: Vec<Value> = ids.iter().map(|id| serde_json::json!({ "id": id })).collect();
        text_frame(&serde_json::json!({ "type": "welcome", "users": users }))
    }
}

/// Who a room connection is.
pub(crate) struct RoomClient {
    pub(crate) channel: ChannelName,
    /// The token's claims, once known (`None` in insecure dev mode or
    /// until the first message brings the token).
    pub(crate) claims: Option<Claims>,
    /// The token's `sub`, for admission.
    pub(crate) sub: Option<String>,
    /// The tab's id (`sessionId`), or a fresh one.
    pub(crate) session: String,
    /// The user id without auth (insecure dev mode): `?user=`, else the
    /// session.
    pub(crate) dev_user: Option<String>,
    /// The URL had no token and auth is on: the first message must be
    /// `{"type": "auth"}`.
    pub(crate) await_auth: bool,
}

struct RoomConn {
    edge: Arc<Edge>,
    origin: Origin,
    writer: Arc<ConnWriter>,
    control: Arc<crate::control::ConnControl>,
    channel: ChannelName,
    session: String,
    user: String,
    write: bool,
    /// The token's claims, to re-decide the room when memberships change.
    claims: Option<Claims>,
    /// The member's id in the channel, once joined.
    member: Option<u64>,
    tracked: bool,
    token_exp: Option<u64>,
    messages: TokenBucket,
}

fn error_frame(message: &str) -> Bytes {
    text_frame(&serde_json::json!({ "type": "error", "error": message }))
}

/// Serves an upgraded room socket until it closes (see [`Socket::open`]).
/// The arguments travel boxed into the connection's future, as in
/// `conn::serve`: an async fn would keep them for the connection's life.
pub(crate) fn serve<R>(
    edge: Arc<Edge>,
    parts: SocketParts<R>,
    client: RoomClient,
) -> impl std::future::Future<Output = ()> + Send
where
    R: AsyncRead + Unpin + Send,
{
    serve_boxed(Box::new((edge, parts, client)))
}

async fn serve_boxed<R>(args: Box<(Arc<Edge>, SocketParts<R>, RoomClient)>)
where
    R: AsyncRead + Unpin + Send,
{
    let (edge, parts, client) = crate::conn::unbox(args);
    let mut socket = Socket::open(&edge, parts, client.sub.as_deref());
    let mut conn = RoomConn {
        origin: Origin {
            node: edge.node,
            connection: socket.id,
        },
        writer: socket.writer.clone(),
        control: socket.control.clone(),
        channel: client.channel.clone(),
        session: client.session.clone(),
        user: String::new(),
        write: false,
        claims: None,
        member: None,
        tracked: false,
        token_exp: None,
        messages: TokenBucket::new(edge.config.limits.messages_per_second),
        edge: edge.clone(),
    };
    metrics::counter!("fanout_room_connections_total").increment(1);
    let reason = match conn.start(&mut socket.reader, client).await {
        Ok(()) => conn.read_loop(&mut socket.reader).await,
        Err(close) => close,
    };
    conn.leave().await;
    socket.close(&edge, reason).await;
}

impl RoomConn {
    fn send(&self, frame: Bytes) {
        let _ = self.writer.send(frame);
    }

    /// Authenticates (from the first message if the URL had no token),
    /// authorizes, joins and tracks.
    async fn start<R: AsyncRead + Unpin>(
        &mut self,
        reader: &mut FrameReader<R>,
        client: RoomClient,
    ) -> Result<(), CloseReason> {
        let claims = if client.await_auth {
            Some(self.first_message_auth(reader).await?)
        } else {
            client.claims
        };
        if let Some(sub) = claims.as_ref().and_then(|c| c.sub.as_deref()) {
            self.control.add_sub(sub);
        }
        self.user = match (&claims, client.dev_user) {
            (Some(c), _) => c.sub.clone().ok_or_else(|| {
                CloseReason::new(
                    close_code::POLICY,
                    "the token has no sub: rooms need a user id",
                    "protocol",
                )
            })?,
            (None, Some(u)) => u,
            (None, None) => client.session.clone(),
        };
        self.token_exp = claims.as_ref().and_then(|c| c.exp);
        self.write = if self.edge.config.auth.is_some() {
            let value = claims.as_ref().map_or(Value::Null, Claims::to_value);
            let access = conn::read_access(&self.edge, &self.channel, &value, "join with ?private=true")
                .map_err(|e| CloseReason::new(close_code::POLICY, e, "protocol"))?;
            access.write
        } else {
            true
        };
        self.claims = claims;
        // Tracked before the join, so the welcome (read from the presence
        // state when the channel task takes the join) always lists the
        // joiner's own user, and its own join notice is not sent to it.
        if self.write {
            let mut meta = Map::new();
            meta.insert("sessionId".into(), Value::String(self.session.clone()));
            match self
                .edge
                .presence
                .track(&self.channel, self.origin, &self.user, meta)
                .await
            {
                Ok(diff) => {
                    self.tracked = true;
                    conn::publish_diff(&self.edge, &self.channel, diff, self.origin).await;
                }
                Err(e) => self.send(error_frame(&format!("presence unavailable: {e}"))),
            }
        }
        let id = self.edge.next_conn_id();
        self.edge.hub.join(
            &self.channel,
            JoinRequest {
                member: Member {
                    conn: id,
                    origin: self.origin,
                    wire: Wire::Room,
                    receive_own: false,
                    presence: true,
                    skip_through: 0,
                    feed_topic: None,
                    changes: None,
                    writer: self.writer.clone(),
                },
                // The channel task adds the welcome from its roster.
                reply: Vec::new(),
                resume_after: None,
                reply_if_lost: None,
                room_user: self.tracked.then(|| self.user.clone()),
                ready: None,
            },
        );
        self.member = Some(id);
        metrics::counter!("fanout_joins_total").increment(1);
        Ok(())
    }

    async fn first_message_auth<R: AsyncRead + Unpin>(
        &mut self,
        reader: &mut FrameReader<R>,
    ) -> Result<Claims, CloseReason> {
        let wait = self.edge.config.limits.handshake_timeout;
        let unauthorized = |why: String| CloseReason::new(close_code::POLICY, why, "protocol");
        let msg = match tokio::time::timeout(wait, reader.next_message()).await {
            Err(_) => {
                return Err(unauthorized(
                    "no token: send {\"type\":\"auth\",\"token\":…} first, or ?token= in the URL".into(),
                ));
            }
            Ok(Err(close)) => return Err(close),
            Ok(Ok(Incoming::Text(bytes))) => bytes,
            Ok(Ok(_)) => {
                return Err(unauthorized(
                    "the first message must be {\"type\":\"auth\",\"token\":…}".into(),
                ));
            }
        };
        #[derive(serde::Deserialize)]
        struct Auth {
            r#type: String,
            token: String,
        }
        let auth: Auth = serde_json::from_slice(&msg)
            .ok()
            .filter(|a: &Auth| a.r#type == "auth")
            .ok_or_else(|| unauthorized("the first message must be {\"type\":\"auth\",\"token\":…}".into()))?;
        let verifier = self
            .edge
            .config
            .auth
            .as_ref()
            .ok_or_else(|| unauthorized("no auth configured".into()))?;
        let claims = verifier.verify_apikey(&auth.token);
        claims.map_err(|e| {
            metrics::counter!("fanout_client_errors_total", "reason" => "unauthorized").increment(1);
            unauthorized(format!("unauthorized: {e}"))
        })
    }

    async fn leave(&mut self) {
        if let Some(id) = self.member.take() {
            self.edge.hub.leave(&self.channel, id);
        }
        if std::mem::take(&mut self.tracked) {
            conn::untrack(&self.edge, &self.channel, self.origin).await;
        }
    }

    async fn read_loop<R: AsyncRead + Unpin>(&mut self, reader: &mut FrameReader<R>) -> CloseReason {
        let idle_timeout = self.edge.config.limits.idle_timeout;
        let shutdown = self.edge.shutdown.clone();
        let writer = self.writer.clone();
        loop {
            let expiry = self.token_exp.map(conn::deadline_of);
            tokio::select! {
                biased;
                () = writer.done() => return conn::closed_by_server(&self.writer),
                () = shutdown.cancelled() => return conn::shutting_down(&self.edge).await,
                () = conn::sleep_until_opt(expiry) => {
                    metrics::counter!("fanout_token_expirations_total").increment(1);
                    return CloseReason::new(close_code::POLICY, "access token has expired: reconnect with a fresh one", "disconnected");
                }
                () = self.control.notify.notified() => {
                    if let Some(close) = self.apply_kicks() {
                        return close;
                    }
                    continue;
                }
                r = tokio::time::timeout(idle_timeout, reader.readable()) => match r {
                    Err(_) => return CloseReason::new(
                        close_code::POLICY,
                        format!("idle for {} s without a ping", idle_timeout.as_secs()),
                        "idle",
                    ),
                    Ok(Err(_)) => return CloseReason::quiet("eof"),
                    Ok(Ok(())) => {}
                },
            }
            let incoming = match conn::read_message(reader, &self.writer, &self.edge).await {
                Ok(incoming) => incoming,
                Err(close) => return close,
            };
            match incoming {
                Incoming::Text(bytes) => Box::pin(self.message(&bytes)).await,
                Incoming::Binary(_) => {
                    metrics::counter!("fanout_client_errors_total", "reason" => "unsupported").increment(1);
                    self.send(error_frame("binary messages are not relayed in rooms: send JSON text"));
                }
                Incoming::Ping(payload) => self.send(frame::encode(Opcode::Pong, &payload)),
                Incoming::Close => return CloseReason::quiet("client"),
                Incoming::Nothing => {}
            }
        }
    }

    /// One client message: a ping, or a JSON object to relay.
    async fn message(&mut self, bytes: &[u8]) {
        if bytes == b"ping" {
            return self.send(frame::encode(Opcode::Text, b"pong"));
        }
        let mut obj = match serde_json::from_slice::<Value>(bytes) {
            Ok(Value::Object(obj)) => obj,
            Ok(_) => {
                metrics::counter!("fanout_client_errors_total", "reason" => "bad_payload").increment(1);
                return self.send(error_frame("a room message is a JSON object with a type"));
            }
            Err(e) => {
                metrics::counter!("fanout_client_errors_total", "reason" => "malformed").increment(1);
                return self.send(error_frame(&format!("invalid JSON: {e}")));
            }
        };
        let kind = match obj.remove("type") {
            Some(Value::String(t)) if !t.is_empty() && t.len() <= 255 => t,
            _ => {
                metrics::counter!("fanout_client_errors_total", "reason" => "bad_payload").increment(1);
                return self.send(error_frame(
                    "a room message needs a \"type\": a string of 1 to 255 bytes",
                ));
            }
        };
        if kind == "ping" {
            return self.send(text_frame(&serde_json::json!({ "type": "pong" })));
        }
        metrics::counter!("fanout_client_messages_total").increment(1);
        if !self.messages.try_take() {
            metrics::counter!("fanout_client_errors_total", "reason" => "rate_limited").increment(1);
            let limit = self.edge.config.limits.messages_per_second;
            return self.send(error_frame(&format!(
                "rate limit exceeded: {limit} messages per second"
            )));
        }
        if !self.write {
            metrics::counter!("fanout_client_errors_total", "reason" => "forbidden").increment(1);
            return self.send(error_frame(&format!(
                "not allowed to send to {}: this token may only read it",
                self.channel
            )));
        }
        // The sender's identity, which a client cannot forge.
        obj.insert(
            "from".into(),
            serde_json::json!({ "id": self.user, "sessionId": self.session }),
        );
        let payload = Bytes::from(Value::Object(obj).to_string());
        let ev = Event::broadcast(self.channel.clone(), &kind, payload, false, Some(self.origin));
        metrics::counter!("fanout_broadcasts_published_total").increment(1);
        if let Err(e) = self.edge.bus.publish(ev).await {
            metrics::counter!("fanout_bus_publish_errors_total").increment(1);
            self.send(error_frame(&format!("message not delivered: {e}")));
        }
    }

    /// The server API's kicks: a room's connection is its one channel, so
    /// an unsubscribe from it closes the connection, as a disconnect does.
    fn apply_kicks(&mut self) -> Option<CloseReason> {
        for kick in self.control.take() {
            match kick {
                Kick::Unsubscribe { channel, reason, .. } if channel == self.channel => {
                    self.send(error_frame(&reason));
                    return Some(CloseReason::new(close_code::POLICY, reason, "disconnected"));
                }
                Kick::Unsubscribe { .. } => {}
                Kick::Recheck { sub } if sub.is_none() || sub.as_deref() == Some(self.user.as_str()) => {
                    match conn::recheck(&self.edge, &self.channel, self.claims.as_ref()) {
                        Some(access) if !access.read => {
                            let reason = conn::revoked(&self.channel);
                            self.send(error_frame(&reason));
                            return Some(CloseReason::new(close_code::POLICY, reason, "disconnected"));
                        }
                        Some(access) => self.write = access.write,
                        None => {}
                    }
                }
                Kick::Recheck { .. } => {}
                Kick::Disconnect { reason, reconnect } => return Some(Kick::disconnect_close(reason, reconnect)),
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frames(b: &Bytes) -> Vec<Value> {
        let mut out = Vec::new();
        let mut rest = &b[..];
        while !rest.is_empty() {
            let len = rest[1] as usize;
            out.push(serde_json::from_slice(&rest[2..2 + len]).unwrap());
            rest = &rest[2 + len..];
        }
        out
    }

    fn diff(joins: Value, leaves: Value) -> Vec<u8> {
        serde_json::json!({ "joins": joins, "leaves": leaves })
            .to_string()
            .into_bytes()
    }

    #[test]
    fn a_user_joins_with_the_first_tab_and_leaves_with_the_last() {
        let mut r = Roster::from_state(&serde_json::json!({ "ann": { "metas": [{ "phx_ref": "a1" }] } }));
        let f = frames(&r.welcome(None));
        assert_eq!(
            f,
            vec![serde_json::json!({ "type": "welcome", "users": [{ "id": "ann" }] })]
        );
        let f = frames(&r.welcome(Some("ann")));
        assert_eq!(
            f,
            vec![serde_json::json!({ "type": "welcome", "users": [{ "id": "ann" }] })],
            "once"
        );
        let f = frames(&r.welcome(Some("bob")));
        assert_eq!(f[0]["users"], serde_json::json!([{ "id": "ann" }, { "id": "bob" }]));
        let bob1 = diff(
            serde_json::json!({ "bob": { "metas": [{ "phx_ref": "b1" }] } }),
            serde_json::json!({}),
        );
        assert_eq!(
            frames(&r.apply(&bob1).unwrap()),
            vec![serde_json::json!({ "type": "join", "user": { "id": "bob" } })]
        );
        assert!(r.apply(&bob1).is_none(), "the same diff twice announces nothing");
        let bob2 = diff(
            serde_json::json!({ "bob": { "metas": [{ "phx_ref": "b2" }] } }),
            serde_json::json!({}),
        );
        assert!(r.apply(&bob2).is_none(), "a second tab is the same user");
        let bob1_gone = diff(
            serde_json::json!({}),
            serde_json::json!({ "bob": { "metas": [{ "phx_ref": "b1" }] } }),
        );
        assert!(r.apply(&bob1_gone).is_none(), "one tab of two left");
        // An update (leave + join of the same key) is not a leave.
        let update = diff(
            serde_json::json!({ "bob": { "metas": [{ "phx_ref": "b3" }] } }),
            serde_json::json!({ "bob": { "metas": [{ "phx_ref": "b2" }] } }),
        );
        assert!(r.apply(&update).is_none());
        let last = diff(
            serde_json::json!({}),
            serde_json::json!({ "bob": { "metas": [{ "phx_ref": "b3" }] }, "ann": { "metas": [{ "phx_ref": "a1" }] } }),
        );
        let f = frames(&r.apply(&last).unwrap());
        assert_eq!(f.len(), 2);
        assert!(f.contains(&serde_json::json!({ "type": "leave", "user": { "id": "bob" } })));
        assert!(f.contains(&serde_json::json!({ "type": "leave", "user": { "id": "ann" } })));
        assert_eq!(
            frames(&r.welcome(None)),
            vec![serde_json::json!({ "type": "welcome", "users": [] })]
        );
    }

    #[test]
    fn broadcasts_are_framed_for_room_clients() {
        let ch = ChannelName::new("r").unwrap();
        let ev = Event::broadcast(
            ch.clone(),
            "editing",
            Bytes::from_static(br#"{"field":"t"}"#),
            false,
            None,
        );
        assert_eq!(
            frames(&event_frame(&ev).unwrap()),
            vec![serde_json::json!({ "type": "editing", "field": "t" })]
        );
        let ev = Event::broadcast(ch.clone(), "chat", Bytes::from_static(br#"[1,2]"#), false, None);
        assert_eq!(
            frames(&event_frame(&ev).unwrap()),
            vec![serde_json::json!({ "type": "chat", "payload": [1, 2] })]
        );
        let ev = Event::broadcast(ch.clone(), "x", Bytes::from_static(br#"{"type":"y"}"#), false, None);
        assert_eq!(
            frames(&event_frame(&ev).unwrap()),
            vec![serde_json::json!({ "type": "x", "payload": { "type": "y" } })]
        );
        let ev = Event::broadcast(ch, "bin", Bytes::from_static(b"\x00"), true, None);
        assert!(event_frame(&ev).is_none(), "binary payloads are not relayed to rooms");
    }
}
