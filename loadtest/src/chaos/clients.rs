//! The chaos run's load: workshop users (vsn 1.0.0 sockets that broadcast
//! with acks, track presence, receive the workshop's rows, and resume on
//! any edge after every disconnect), a server-API publisher, a row writer
//! and a presence probe. Each records what it sent in the [`Ledger`] and
//! what it received in its [`UserLog`].

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::account::{Got, Key, Ledger, Ms, Outcome, UserLog};
use crate::client::{self, Incoming, Target};
use crate::session::Rng;

/// What every load task shares.
pub struct World {
    pub t0: Instant,
    /// The edges' client URLs.
    pub edges: Vec<Target>,
    /// The edges' server-API ports.
    pub api_ports: Vec<u16>,
    pub api_key: String,
    pub ledger: Ledger,
    /// Publishers stop sending.
    pub stop_sending: CancellationToken,
    /// Clients stop (after the last deliveries arrived).
    pub stop: CancellationToken,
}

impl World {
    pub fn now(&self) -> Ms {
        self.t0.elapsed().as_millis() as u64
    }
}

/// How one user behaves.
#[derive(Debug, Clone, Copy)]
pub struct UserPlan {
    pub user: u32,
    pub workshop: u32,
    /// Mean time between two broadcasts.
    pub chat_every: Duration,
    pub seed: u64,
}

fn join_message(topic: &str, workshop: u32, user: u32, resume: Option<u64>, r#ref: &str) -> String {
    let mut config = json!({
        "broadcast": {"self": true, "ack": true},
        "presence": {"key": format!("user-{user}")},
        "postgres_changes": [{
            "event": "INSERT", "schema": "public", "table": "workshop_activities",
            "filter": format!("session_id=eq.{workshop}"),
        }],
    });
    if let Some(after) = resume {
        config["resume"] = json!({"after": after.to_string()});
    }
    json!({"topic": topic, "event": "phx_join", "payload": {"config": config}, "ref": r#ref, "join_ref": r#ref})
        .to_string()
}

/// One user for the whole run: connects (edge `user mod n` first, the next
/// one after each failure), joins, tracks, broadcasts, and after any
/// disconnect joins again with `resume.after` its last position.
pub async fn user(world: Arc<World>, plan: UserPlan) -> UserLog {
    let UserPlan { user, workshop, .. } = plan;
    let topic = format!("realtime:workshop:{workshop}");
    let mut log = UserLog {
        user,
        workshop,
        ..UserLog::default()
    };
    let mut rng = Rng::new(plan.seed);
    let mut seq = 0u32;
    let mut last_pos: Option<u64> = None;
    let mut attempt = user as usize;
    let mut failures = 0u32;
    let mut next_chat = tokio::time::Instant::now() + plan.chat_every.mul_f64(rng.unit());
    'connection: while !world.stop.is_cancelled() {
        let target = world.edges[attempt % world.edges.len()].clone();
        attempt += 1;
        let (mut r, mut w) =
            match tokio::time::timeout(Duration::from_secs(5), client::connect(&target, "1.0.0", None, None)).await {
                Ok(Ok(c)) => c,
                _ => {
                    failures += 1;
                    let backoff = Duration::from_millis((50u64 << failures.min(5)).min(1000));
                    tokio::select! {
                        () = tokio::time::sleep(backoff) => continue,
                        () = world.stop.cancelled() => break,
                    }
                }
            };
        let (tx, mut rx) = mpsc::unbounded_channel();
        let reader = tokio::spawn(async move {
            loop {
                let m = client::recv(&mut r).await;
                let closed = matches!(m, Incoming::Closed(_));
                if tx.send(m).is_err() || closed {
                    return;
                }
            }
        });
        // A rejoin resumes after the last position seen ("0": from the
        // oldest one retained, when nothing arrived yet).
        let resume = (!log.joins.is_empty()).then(|| last_pos.unwrap_or(0));
        let sent_join = client::send_text(&mut w, &join_message(&topic, workshop, user, resume, "j")).await;
        let mut joined = false;
        let mut pending: HashMap<String, Key> = HashMap::new();
        let mut heartbeat = tokio::time::interval(Duration::from_secs(20));
        let mut n_ref = 0u64;
        if sent_join.is_ok() {
            loop {
                tokio::select! {
                    m = rx.recv() => {
                        let text = match m {
                            None | Some(Incoming::Closed(_)) => break,
                            Some(Incoming::Text(t)) => t,
                            Some(Incoming::Binary(_)) => continue,
                        };
                        let Ok(v) = serde_json::from_slice::<Value>(&text) else { continue };
                        let now = world.now();
                        match v["event"].as_str().unwrap_or("") {
                            "phx_reply" => {
                                let ok = v["payload"]["status"] == "ok";
                                let r = v["ref"].as_str().unwrap_or("");
                                if r == "j" {
                                    if !ok {
                                        log.problems.push(format!("join refused: {}", v["payload"]));
                                        break;
                                    }
                                    joined = true;
                                    failures = 0;
                                    log.joins.push(now);
                                    let track = json!({"topic": topic, "event": "presence", "ref": "t", "join_ref": "j",
                                        "payload": {"type": "presence", "event": "track", "payload": {"user": user}}});
                                    if client::send_text(&mut w, &track.to_string()).await.is_err() {
                                        break;
                                    }
                                } else if let Some(key) = pending.remove(r) {
                                    world.ledger.answered(key, if ok { Outcome::Acked(now) } else { Outcome::Refused(now) });
                                }
                            }
                            "broadcast" => {
                                let p = &v["payload"];
                                let key = if let Some(n) = p["payload"]["api"].as_u64() {
                                    Key::Api(n as u32)
                                } else {
                                    match (p["payload"]["u"].as_u64(), p["payload"]["s"].as_u64()) {
                                        (Some(u), Some(s)) => Key::Chat { user: u as u32, seq: s as u32 },
                                        _ => continue,
                                    }
                                };
                                record(&mut log, &mut last_pos, key, &p["meta"], now);
                            }
                            "postgres_changes" => {
                                let p = &v["payload"];
                                if let Some(seq) = p["data"]["record"]["seq"].as_u64() {
                                    record(&mut log, &mut last_pos, Key::Row(seq as u32), &p["meta"], now);
                                }
                            }
                            "system" if v["payload"]["status"] == "error" => {
                                let message = v["payload"]["message"].as_str().unwrap_or("");
                                if message.starts_with("resync required") {
                                    log.problems.push(format!("resync required at {now} ms: {message}"));
                                }
                            }
                            // The channel ended under the client: join again.
                            "phx_error" | "phx_close" if v["topic"] == topic.as_str() => break,
                            _ => {}
                        }
                    }
                    () = tokio::time::sleep_until(next_chat), if joined && !world.stop_sending.is_cancelled() => {
                        seq += 1;
                        n_ref += 1;
                        let r = format!("c{n_ref}");
                        let key = Key::Chat { user, seq };
                        let push = json!({"topic": topic, "event": "broadcast", "ref": r, "join_ref": "j",
                            "payload": {"type": "broadcast", "event": "chat", "payload": {"u": user, "s": seq}}});
                        world.ledger.sent(key, workshop, world.now());
                        pending.insert(r, key);
                        next_chat += plan.chat_every.mul_f64(0.5 + rng.unit());
                        if client::send_text(&mut w, &push.to_string()).await.is_err() {
                            break;
                        }
                    }
                    _ = heartbeat.tick() => {
                        let hb = r#"{"topic":"phoenix","event":"heartbeat","payload":{},"ref":"h"}"#;
                        if client::send_text(&mut w, hb).await.is_err() {
                            break;
                        }
                    }
                    () = world.stop.cancelled() => {
                        log.live_at_end = joined;
                        reader.abort();
                        break 'connection;
                    }
                }
            }
        }
        reader.abort();
        let now = world.now();
        for key in pending.into_values() {
            world.ledger.answered(key, Outcome::Unknown(now));
        }
        log.drops.push(now);
        // The next edge at once; a short pause if joins keep failing.
        if !joined {
            failures += 1;
            tokio::time::sleep(Duration::from_millis((50u64 << failures.min(5)).min(1000))).await;
        }
    }
    log
}

fn record(log: &mut UserLog, last_pos: &mut Option<u64>, key: Key, meta: &Value, at: Ms) {
    let Some(pos) = meta["id"].as_str().and_then(|s| s.parse::<u64>().ok()) else {
        log.problems.push(format!("{key:?} arrived without a position"));
        return;
    };
    *last_pos = Some(last_pos.map_or(pos, |p| p.max(pos)));
    log.received.push(Got { key, pos, at });
}

/// `POST /api/v1/publish` on the edges in turn, `every` apart, to the
/// workshops in turn, until publishing stops.
pub async fn api_publisher(world: Arc<World>, every: Duration, workshops: u32) {
    let mut tick = tokio::time::interval(every);
    for n in 0u32.. {
        tokio::select! {
            _ = tick.tick() => {}
            () = world.stop_sending.cancelled() => return,
        }
        let workshop = 1 + n % workshops;
        let port = world.api_ports[n as usize % world.api_ports.len()];
        let body = json!({"channel": format!("workshop:{workshop}"), "event": "api", "payload": {"api": n}});
        let key = Key::Api(n);
        world.ledger.sent(key, workshop, world.now());
        let auth = format!("Bearer {}", world.api_key);
        let answer = tokio::time::timeout(
            Duration::from_secs(10),
            fanout_tests::http_request(
                port,
                "POST",
                "/api/v1/publish",
                &[("authorization", &auth), ("content-type", "application/json")],
                Bytes::from(body.to_string()),
            ),
        )
        .await;
        let now = world.now();
        let outcome = match answer {
            Ok(Ok((200, _))) => Outcome::Acked(now),
            // A 4xx or 503 answer: the edge says it did not publish.
            Ok(Ok((s, _))) if s < 500 || s == 503 => Outcome::Refused(now),
            // No TCP connection: nothing was sent.
            Ok(Err(e)) if is_refused(&e) => Outcome::Refused(now),
            _ => Outcome::Unknown(now),
        };
        world.ledger.answered(key, outcome);
    }
}

fn is_refused(e: &anyhow::Error) -> bool {
    e.downcast_ref::<std::io::Error>()
        .is_some_and(|e| e.kind() == std::io::ErrorKind::ConnectionRefused)
}

/// Inserts a `workshop_activities` row every `every`, to the workshops in
/// turn, reconnecting after PostgreSQL restarts. A row is acknowledged when
/// its INSERT (an implicit transaction) returned.
pub async fn row_writer(world: Arc<World>, database_url: String, every: Duration, workshops: u32) {
    let mut tick = tokio::time::interval(every);
    let mut db: Option<tokio_postgres::Client> = None;
    let mut n = 0u32;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = world.stop_sending.cancelled() => return,
        }
        if db.as_ref().is_none_or(tokio_postgres::Client::is_closed) {
            db = match tokio_postgres::connect(&database_url, tokio_postgres::NoTls).await {
                Ok((c, conn)) => {
                    tokio::spawn(conn);
                    Some(c)
                }
                Err(_) => None,
            };
        }
        let Some(c) = &db else { continue };
        let workshop = 1 + n % workshops;
        let key = Key::Row(n);
        world.ledger.sent(key, workshop, world.now());
        let done = c
            .execute(
                "INSERT INTO workshop_activities (session_id, kind, seq) VALUES ($1, 'chaos', $2)",
                &[&i64::from(workshop), &i64::from(n)],
            )
            .await;
        let now = world.now();
        world.ledger.answered(
            key,
            match done {
                Ok(_) => Outcome::Acked(now),
                // The server may have committed before the session ended.
                Err(_) => {
                    db = None;
                    Outcome::Unknown(now)
                }
            },
        );
        n += 1;
    }
}

/// Asks an edge for a workshop's presence every `every` until publishing
/// stops: (time, answered 200) per attempt, for the recovery of presence.
pub async fn presence_probe(world: Arc<World>, every: Duration) -> Vec<(Ms, bool)> {
    let mut tick = tokio::time::interval(every);
    let mut out = Vec::new();
    for n in 0usize.. {
        tokio::select! {
            _ = tick.tick() => {}
            () = world.stop_sending.cancelled() => break,
        }
        let port = world.api_ports[n % world.api_ports.len()];
        let ok = presence_of(&world, port, 1).await.is_ok();
        out.push((world.now(), ok));
    }
    out
}

/// A workshop's presence on one edge: each key with its number of metas.
pub async fn presence_of(world: &World, port: u16, workshop: u32) -> anyhow::Result<HashMap<String, usize>> {
    let auth = format!("Bearer {}", world.api_key);
    let (status, body) = tokio::time::timeout(
        Duration::from_secs(5),
        fanout_tests::http_request(
            port,
            "GET",
            &format!("/api/v1/presence?channel=workshop:{workshop}"),
            &[("authorization", &auth)],
            Bytes::new(),
        ),
    )
    .await??;
    anyhow::ensure!(status == 200, "presence answered {status}: {body}");
    let v: Value = serde_json::from_str(&body)?;
    Ok(v["presences"]
        .as_object()
        .map(|m| {
            m.iter()
                .map(|(k, p)| (k.clone(), p["metas"].as_array().map_or(0, Vec::len)))
                .collect()
        })
        .unwrap_or_default())
}
