//! The `workshop` scenario (and `soak`, which is the same load held longer):
//! users spread over workshops of realistic, varied sizes; each user joins
//! `workshop:<n>` with presence (`{user, name, role}`), then sends chat,
//! typing and (with `--cursor-rate`) cursor broadcasts at set rates.
//! Against Socket.IO (`--target socketio`) each workshop is a namespace,
//! `/workshop:<n>`, whose emits reach its other sockets (the room idiom of
//! a Socket.IO app); Socket.IO has no presence, so nothing is tracked.
//! Every message carries its publisher, a per-publisher sequence and its
//! origin time; every receiver checks each publisher's sequence for gaps,
//! repeats and reordering and records publish-to-receive latency.
//! Broadcasts are joined with `self: false`, so a message is owed to the
//! other members joined when it was sent.
//!
//! Workshops are whole within one load process (`--workers` splits by
//! workshop), so every count is exact locally.

use std::ops::Range;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Result;

use crate::Args;
use crate::client::{self, Incoming};
use crate::database::{NoDatabase, Postgres, WorkshopDatabase};
use crate::run::Ctx;
use crate::session::{self, ConnectOpts, JoinOpts, Plan, Rng, now_micros};
use crate::stamp::Stamp;
use crate::stats::{Partial, SeqCheck, Stats};

/// Splits `users` over `workshops` rooms of varied size: each room gets a
/// weight between 15 and 60 (deterministic), and the users are shared in
/// proportion, so with the default of users/25 rooms sizes range about
/// 10 to 40. Every room has at least 2 users.
pub fn layout(users: usize, workshops: usize) -> Vec<Range<usize>> {
    let rooms = workshops.clamp(1, (users / 2).max(1));
    let mut rng = Rng::new(0x5EED);
    let weights: Vec<u64> = (0..rooms).map(|_| 15 + rng.next_u64() % 46).collect();
    let total: u64 = weights.iter().sum();
    let mut sizes: Vec<usize> = weights
        .iter()
        .map(|w| ((users as u64 * w / total) as usize).max(2.min(users)))
        .collect();
    // Hand out (or take back) what rounding left over, one per room.
    let mut sum: usize = sizes.iter().sum();
    let mut i = 0;
    while sum != users {
        let r = i % rooms;
        if sum < users {
            sizes[r] += 1;
            sum += 1;
        } else if sizes[r] > 2 {
            sizes[r] -= 1;
            sum -= 1;
        }
        i += 1;
    }
    let mut start = 0;
    sizes
        .into_iter()
        .map(|n| {
            let r = start..start + n;
            start += n;
            r
        })
        .collect()
}

/// One workshop as this process sees it.
struct Room {
    number: usize,
    users: Range<usize>,
    /// Members joined right now.
    joined: Arc<AtomicU64>,
}

pub async fn run(args: &Args, conn: &ConnectOpts, ctx: &Ctx) -> Result<Partial> {
    let Some(url) = &args.database_url else {
        return run_with(args, conn, ctx, Arc::new(NoDatabase)).await;
    };
    let workshops = args.workshops.unwrap_or((args.users / 25).max(1));
    let db = Postgres::connect(url, (0..workshops).filter(|n| ctx.owns(*n)), args.activity_rate).await?;
    run_with(args, conn, ctx, Arc::new(db)).await
}

pub async fn run_with(args: &Args, conn: &ConnectOpts, ctx: &Ctx, db: Arc<dyn WorkshopDatabase>) -> Result<Partial> {
    let workshops = args.workshops.unwrap_or((args.users / 25).max(1));
    let all = layout(args.users, workshops);
    let rooms: Vec<Arc<Room>> = all
        .iter()
        .enumerate()
        .filter(|(n, _)| ctx.owns(*n))
        .map(|(n, r)| {
            Arc::new(Room {
                number: n,
                users: r.clone(),
                joined: Arc::new(AtomicU64::new(0)),
            })
        })
        .collect();
    let mut room_of = std::collections::HashMap::new();
    let mut plans = Vec::new();
    for room in &rooms {
        for u in room.users.clone() {
            room_of.insert(u, room.clone());
            if conn.socketio {
                plans.push(Plan {
                    user: u,
                    topic: format!("/workshop:{}", room.number),
                    join: JoinOpts {
                        socketio_namespace: true,
                        ..JoinOpts::default()
                    },
                    track: None,
                });
                continue;
            }
            let role = if u == room.users.start {
                "facilitator"
            } else {
                "participant"
            };
            plans.push(Plan {
                user: u,
                topic: format!("realtime:workshop:{}", room.number),
                join: JoinOpts {
                    presence_key: Some(format!("user-{u}")),
                    resume: None,
                    extra_config: db.join_config(room.number),
                    socketio_namespace: false,
                },
                track: Some(format!(
                    r#"{{"user":"user-{u}","name":"Participant {u}","role":"{role}"}}"#
                )),
            });
        }
    }
    let room_of = Arc::new(room_of);
    let mut partial = Partial {
        users: plans.len() as u64,
        workshops: rooms.len() as u64,
        workshop_min: rooms.iter().map(|r| r.users.len() as u64).min().unwrap_or(0),
        workshop_max: rooms.iter().map(|r| r.users.len() as u64).max().unwrap_or(0),
        ..Partial::default()
    };
    eprintln!(
        "worker {}: {} users in {} workshops ({}..{} per workshop)",
        ctx.worker_index, partial.users, partial.workshops, partial.workshop_min, partial.workshop_max
    );

    let receiver = {
        let stats = ctx.stats.clone();
        let room_of = room_of.clone();
        let db = db.clone();
        move |user: usize, r: client::Reader| {
            let room = room_of[&user].clone();
            receive(user, room, r, stats.clone(), db.clone())
        }
    };
    let started = Instant::now();
    let writers = session::connect_all(ctx, conn, plans, receiver).await;
    for (u, _) in &writers {
        room_of[u].joined.fetch_add(1, Ordering::Relaxed);
    }
    partial.connected = writers.len() as u64;
    partial.connect_seconds = started.elapsed().as_secs_f64();
    let stop = Arc::new(tokio::sync::Notify::new());
    session::spawn_heartbeats(
        writers.iter().map(|(_, w)| w.clone()).collect(),
        conn.vsn.clone(),
        stop.clone(),
    );

    let go = ctx.ready().await?;
    let cpu0 = crate::proc::cpu_seconds(None)?;
    let until = go + Duration::from_secs(args.duration);
    let rates = Rates {
        chat_per_min: args.chat_rate,
        typing_per_min: args.typing_rate,
        cursor_per_min: args.cursor_rate * 60.0,
    };
    let mut publishers = Vec::with_capacity(writers.len());
    for (u, w) in writers {
        let room = room_of[&u].clone();
        if u == room.users.start
            && let Some(f) = db.facilitator(room.number, u, room.joined.clone(), until, ctx.stats.clone())
        {
            publishers.push(tokio::spawn(f));
        }
        publishers.push(tokio::spawn(publish(
            u,
            room,
            w,
            conn.vsn.clone(),
            rates,
            go,
            until,
            ctx.stats.clone(),
        )));
    }
    for p in publishers {
        let _ = p.await;
    }
    partial.publish_seconds = go.elapsed().as_secs_f64();
    drain(&ctx.stats, Duration::from_secs(10)).await;
    partial.run_seconds = go.elapsed().as_secs_f64();
    partial.client_cpu_seconds = crate::proc::cpu_seconds(None)? - cpu0;
    // Count before the sockets close: stopping the heartbeats drops the writers.
    partial.counts_from(&ctx.stats);
    stop.notify_one();
    Ok(partial)
}

/// Waits until every owed delivery arrived, at most `limit`.
pub async fn drain(stats: &Stats, limit: Duration) {
    let deadline = Instant::now() + limit;
    while stats.unique_received() < stats.expected.load(Ordering::Relaxed) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[derive(Debug, Clone, Copy)]
struct Rates {
    chat_per_min: f64,
    typing_per_min: f64,
    cursor_per_min: f64,
}

/// The events a user sends, by the index `publish` schedules them under;
/// receivers count only these.
const EVENTS: [&str; 3] = ["chat", "typing", "cursor"];

/// One user's chat, typing and cursor broadcasts from `go` until `until`,
/// each at its rate with ±50 % jitter and a random phase, under one
/// sequence.
#[allow(clippy::too_many_arguments)]
async fn publish(
    user: usize,
    room: Arc<Room>,
    writer: session::SharedWriter,
    vsn: String,
    rates: Rates,
    go: Instant,
    until: Instant,
    stats: Arc<Stats>,
) {
    let mut rng = Rng::new(user as u64 ^ 0xC0FFEE);
    let intervals = [rates.chat_per_min, rates.typing_per_min, rates.cursor_per_min]
        .map(|per_min| (per_min > 0.0).then(|| Duration::from_secs_f64(60.0 / per_min)));
    let mut next = intervals.map(|iv| iv.map(|iv| go + iv.mul_f64(rng.unit())));
    let topic = format!("realtime:workshop:{}", room.number);
    let namespace = format!("/workshop:{}", room.number);
    let mut seq = 0u64;
    loop {
        let Some((kind, at)) = next
            .iter()
            .enumerate()
            .filter_map(|(k, at)| at.map(|at| (k, at)))
            .min_by_key(|&(_, at)| at)
        else {
            return;
        };
        if at >= until {
            return;
        }
        tokio::time::sleep_until(at.into()).await;
        let ts = now_micros();
        let event = EVENTS[kind];
        let payload = match kind {
            0 => format!(r#"{{"u":{user},"s":{seq},"ts":{ts},"text":"message {seq} from Participant {user}"}}"#),
            1 => format!(r#"{{"u":{user},"s":{seq},"ts":{ts},"typing":true}}"#),
            _ => format!(
                r#"{{"u":{user},"s":{seq},"ts":{ts},"x":{},"y":{}}}"#,
                rng.next_u64() % 1920,
                rng.next_u64() % 1080
            ),
        };
        let owed = room.joined.load(Ordering::Relaxed).saturating_sub(1);
        let sent = {
            let mut w = writer.lock().await;
            match vsn.as_str() {
                "socketio" => client::send_text(&mut w, &format!(r#"42{namespace},["{event}",{payload}]"#)).await,
                "1.0.0" => {
                    let msg = format!(
                        r#"{{"topic":"{topic}","event":"broadcast","payload":{{"type":"broadcast","event":"{event}","payload":{payload}}},"ref":null,"join_ref":"1"}}"#
                    );
                    client::send_text(&mut w, &msg).await
                }
                _ => {
                    let frame = client::broadcast_push("1", "", &topic, event, payload.as_bytes());
                    client::send_binary(&mut w, &frame).await
                }
            }
        };
        if sent.is_err() {
            return;
        }
        stats.sent.fetch_add(1, Ordering::Relaxed);
        stats.expected.fetch_add(owed, Ordering::Relaxed);
        seq += 1;
        next[kind] = intervals[kind].map(|iv| at + iv.mul_f64(0.5 + rng.unit()));
    }
}

/// One member's receiving side: checks every publisher's sequence and
/// records latency, until the connection closes.
async fn receive(
    user: usize,
    room: Arc<Room>,
    mut r: client::Reader,
    stats: Arc<Stats>,
    db: Arc<dyn WorkshopDatabase>,
) {
    let first = room.users.start;
    // Two streams per publisher: broadcasts (even) and database rows (odd).
    let mut check = SeqCheck::with_publishers(room.users.len() * 2);
    loop {
        let frame = client::recv(&mut r).await;
        let (stamp, stream) = match &frame {
            Incoming::Closed(why) => {
                if stats.disconnected.fetch_add(1, Ordering::Relaxed) < 3 {
                    eprintln!("user {user}: connection closed: {why}");
                }
                stats.connections.fetch_sub(1, Ordering::Relaxed);
                room.joined.fetch_sub(1, Ordering::Relaxed);
                return;
            }
            Incoming::Binary(b) => match client::parse_broadcast(b) {
                Some((event, _, payload)) if EVENTS.iter().any(|e| e.as_bytes() == event) => {
                    match serde_json::from_slice::<Stamp>(payload) {
                        Ok(s) => (s, 0),
                        Err(_) => continue,
                    }
                }
                _ => continue,
            },
            Incoming::Text(t) => {
                if let Some(s) = db.stamp_of(&frame) {
                    (s, 1)
                } else if let Some(s) = text_broadcast_stamp(t).or_else(|| socketio_event_stamp(t)) {
                    (s, 0)
                } else {
                    continue;
                }
            }
        };
        let now = now_micros();
        if stream == 1 {
            stats.record_change_latency(now.saturating_sub(stamp.ts));
        } else {
            stats.record_latency(now.saturating_sub(stamp.ts));
        }
        stats.received.fetch_add(1, Ordering::Relaxed);
        let Some(index) = stamp.u.checked_sub(first) else {
            continue;
        };
        let seen = check.observe(index * 2 + stream, stamp.s);
        SeqCheck::count(&seen, &stats);
    }
}

/// The stamp of a vsn 1.0.0 (JSON) chat or typing broadcast.
fn text_broadcast_stamp(t: &[u8]) -> Option<Stamp> {
    #[derive(serde::Deserialize)]
    struct Inner {
        event: String,
        payload: Stamp,
    }
    #[derive(serde::Deserialize)]
    struct Outer {
        event: String,
        payload: Inner,
    }
    let v: Outer = serde_json::from_slice(t).ok()?;
    (v.event == "broadcast" && EVENTS.contains(&v.payload.event.as_str())).then_some(v.payload.payload)
}

/// The stamp of a Socket.IO event packet on a namespace,
/// `42/workshop:3,["cursor",{…}]` (fanout's endpoint adds the event's
/// position as a last argument).
fn socketio_event_stamp(t: &[u8]) -> Option<Stamp> {
    let rest = t.strip_prefix(b"42/")?;
    let args = &rest[rest.iter().position(|&b| b == b',')? + 1..];
    let args: Vec<&serde_json::value::RawValue> = serde_json::from_slice(args).ok()?;
    let event: &str = serde_json::from_str(args.first()?.get()).ok()?;
    if !EVENTS.contains(&event) {
        return None;
    }
    serde_json::from_str(args.get(1)?.get()).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn socketio_events_are_read_with_or_without_a_position() {
        let s = socketio_event_stamp(br#"42/workshop:3,["cursor",{"u":7,"s":2,"ts":99,"x":1,"y":2}]"#).unwrap();
        assert_eq!((s.u, s.s, s.ts), (7, 2, 99));
        let s = socketio_event_stamp(br#"42/workshop:3,["chat",{"u":1,"s":0,"ts":5,"text":"hi"},"41"]"#).unwrap();
        assert_eq!((s.u, s.s, s.ts), (1, 0, 5));
        assert!(socketio_event_stamp(br#"42/workshop:3,["other",{"u":1,"s":0,"ts":5}]"#).is_none());
        assert!(socketio_event_stamp(br#"42["chat",{"u":1,"s":0,"ts":5}]"#).is_none());
        assert!(socketio_event_stamp(b"2").is_none());
    }

    #[test]
    fn layout_covers_every_user_once_with_varied_sizes() {
        for (users, rooms) in [(500, 20), (10_000, 400), (7, 3), (3, 10)] {
            let l = layout(users, rooms);
            assert_eq!(l.iter().map(|r| r.len()).sum::<usize>(), users);
            assert_eq!(l.first().unwrap().start, 0);
            assert!(l.windows(2).all(|w| w[0].end == w[1].start));
            assert!(l.iter().all(|r| r.len() >= 2.min(users)));
        }
        let l = layout(500, 20);
        let (min, max) = (
            l.iter().map(|r| r.len()).min().unwrap(),
            l.iter().map(|r| r.len()).max().unwrap(),
        );
        assert!(min >= 8 && max <= 55 && max - min >= 10, "{min}..{max}");
    }
}
