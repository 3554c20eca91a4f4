//! The `fanout` scenario (`--users` subscribers of one hot channel, or
//! spread over `--channels`; one publisher sending `--rate` messages per
//! second to each channel) and `reconnect-storm`, which is the same stream
//! with a server killed (`--kill-pid`, SIGKILL) or drained (`--drain-pid`,
//! SIGTERM) part way: its clients reconnect to another `--url` with the last
//! position they saw (`config.resume.after`), and the run measures how long
//! each took to be joined again and whether anything was lost or repeated.
//!
//! With `--workers`, every process holds its share of subscribers and
//! process 0 also publishes.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use crate::client::{self, Incoming};
use crate::run::Ctx;
use crate::session::{self, ConnectOpts, JoinOpts, Plan, now_micros, position_of, source_ip};
use crate::stats::{Partial, SeqCheck, Stats};
use crate::{Args, Target};

const TOPIC: &str = "realtime:bench:fanout";

/// The topic of channel `c` of `channels`: [`TOPIC`] itself when there is
/// only one.
fn topic(c: usize, channels: u32) -> String {
    if channels <= 1 {
        TOPIC.to_owned()
    } else {
        format!("{TOPIC}-{c}")
    }
}

/// A server to take away part way through the run.
#[derive(Debug, Clone, Copy)]
enum Failure {
    Kill(u32),
    Drain(u32),
}

pub async fn run(args: &Args, conn: &ConnectOpts, ctx: &Ctx) -> Result<Partial> {
    let failure = match (args.kill_pid, args.drain_pid) {
        (Some(p), _) => Some(Failure::Kill(p)),
        (None, Some(p)) => Some(Failure::Drain(p)),
        (None, None) => None,
    };
    let per_subscriber = u64::from(args.rate) * args.duration;
    let channels = args.channels.max(1);
    let plans: Vec<Plan> = (0..args.users)
        .filter(|&u| ctx.owns(u))
        .map(|u| Plan {
            user: u,
            topic: topic(u % channels as usize, channels),
            join: JoinOpts::default(),
            track: None,
        })
        .collect();
    let mut partial = Partial {
        users: plans.len() as u64,
        ..Partial::default()
    };
    let receiver = {
        let stats = ctx.stats.clone();
        let conn = conn.clone();
        let worker = ctx.worker_index;
        move |user: usize, r: client::Reader| {
            receive(
                Subscriber {
                    user,
                    topic: topic(user % channels as usize, channels),
                    worker,
                },
                r,
                stats.clone(),
                conn.clone(),
                failure.is_some(),
                per_subscriber,
            )
        }
    };
    let started = Instant::now();
    let writers = session::connect_all(ctx, conn, plans, receiver).await;
    let topics: Vec<String> = (0..channels as usize).map(|c| topic(c, channels)).collect();
    partial.connected = writers.len() as u64;
    partial.connect_seconds = started.elapsed().as_secs_f64();
    eprintln!(
        "worker {}: {} subscribers joined in {:.1} s",
        ctx.worker_index, partial.connected, partial.connect_seconds
    );
    let stop = Arc::new(tokio::sync::Notify::new());
    session::spawn_heartbeats(
        writers.into_iter().map(|(_, w)| w).collect(),
        conn.vsn.clone(),
        stop.clone(),
    );

    // Process 0 publishes, on its own connection (not a subscriber).
    let publisher = if ctx.worker_index == 0 {
        let target = conn.targets.last().context("at least one --url")?;
        if conn.nchan {
            Some(Publisher::Nchan(
                client::HttpPublisher::connect(target, &session::nchan_path("pub", TOPIC), &[]).await?,
            ))
        } else if let Some(url) = &args.api_url {
            let api =
                Target::parse(&url.replacen("http://", "ws://", 1)).context("--api-url must be http://host:port")?;
            let auth = format!(
                "Bearer {}",
                args.api_key.as_deref().context("--api-url needs --api-key")?
            );
            Some(Publisher::Api(
                client::HttpPublisher::connect(&api, "/api/v1/publish", &[("Authorization", &auth)]).await?,
            ))
        } else {
            let (mut pr, mut pw) = client::connect(target, "2.0.0", conn.apikey.as_deref(), None).await?;
            for t in &topics {
                session::join(&mut pr, &mut pw, t, "2.0.0", &JoinOpts::default()).await?;
            }
            tokio::spawn(async move { while !matches!(client::recv(&mut pr).await, Incoming::Closed(_)) {} });
            Some(Publisher::Realtime(pw))
        }
    } else {
        None
    };
    tokio::time::sleep(Duration::from_millis(500)).await;

    let go = ctx.ready().await?;
    let cpu0 = crate::proc::cpu_seconds(None)?;
    ctx.stats
        .expected
        .fetch_add(per_subscriber * partial.connected, Ordering::Relaxed);
    let drain_limit = Duration::from_secs(if failure.is_some() { 30 } else { 10 });
    if let Some(mut pw) = publisher {
        publish(args, &mut pw, &topics, failure, &ctx.stats, per_subscriber).await?;
        partial.publish_seconds = go.elapsed().as_secs_f64();
        crate::workshop::drain(&ctx.stats, drain_limit).await;
    } else {
        partial.publish_seconds = args.duration as f64;
        crate::workshop::drain(&ctx.stats, Duration::from_secs(args.duration) + drain_limit).await;
    }
    partial.run_seconds = go.elapsed().as_secs_f64();
    partial.client_cpu_seconds = crate::proc::cpu_seconds(None)? - cpu0;
    // Count before the sockets close: stopping the heartbeats drops the writers.
    partial.counts_from(&ctx.stats);
    stop.notify_one();
    Ok(partial)
}

/// How the publisher sends.
enum Publisher {
    /// A Realtime client sending binary broadcast pushes.
    Realtime(client::Writer),
    /// POSTs to nchan's publisher location.
    Nchan(client::HttpPublisher),
    /// POSTs to fanout's server API (`/api/v1/publish`).
    Api(client::HttpPublisher),
}

/// Sends `count` messages to each of `topics` at `--rate` per topic (in
/// turn, evenly spaced), each `{"seq", "ts"}` (plus padding) with `seq`
/// counted per topic, taking the `failure` server away after
/// `--kill-after` seconds.
async fn publish(
    args: &Args,
    pw: &mut Publisher,
    topics: &[String],
    failure: Option<Failure>,
    stats: &Stats,
    count: u64,
) -> Result<()> {
    let pad = "x".repeat(args.payload_bytes);
    let n = topics.len().max(1) as u64;
    let interval = Duration::from_secs_f64(1.0 / f64::from(args.rate.max(1)) / n as f64);
    let nchan_paths: Vec<String> = topics.iter().map(|t| session::nchan_path("pub", t)).collect();
    let t0 = Instant::now();
    let mut failed = false;
    for i in 0..count * n {
        let (seq, c) = (i / n, (i % n) as usize);
        if let Some(f) = failure
            && !failed
            && t0.elapsed() >= Duration::from_secs(args.kill_after)
        {
            failed = true;
            let (signal, pid) = match f {
                Failure::Kill(p) => ("-KILL", p),
                Failure::Drain(p) => ("-TERM", p),
            };
            eprintln!("[{:>5.1}s] kill {signal} {pid}", t0.elapsed().as_secs_f64());
            let _ = std::process::Command::new("kill")
                .args([signal, &pid.to_string()])
                .status();
        }
        tokio::time::sleep_until((t0 + interval.mul_f64(i as f64)).into()).await;
        let payload = if pad.is_empty() {
            format!(r#"{{"seq":{seq},"ts":{}}}"#, now_micros())
        } else {
            format!(r#"{{"seq":{seq},"ts":{},"pad":"{pad}"}}"#, now_micros())
        };
        match pw {
            Publisher::Realtime(w) => {
                let frame = client::broadcast_push("1", "", &topics[c], "bench", payload.as_bytes());
                client::send_binary(w, &frame).await.context("publishing")?;
            }
            Publisher::Nchan(p) => p
                .post_to(&nchan_paths[c], payload.as_bytes())
                .await
                .context("publishing to nchan")?,
            Publisher::Api(p) => {
                let channel = topics[c].trim_start_matches("realtime:");
                let body = format!(r#"{{"channel":"{channel}","event":"bench","payload":{payload}}}"#);
                p.post(body.as_bytes())
                    .await
                    .context("publishing through the server API")?;
            }
        }
        stats.sent.fetch_add(1, Ordering::Relaxed);
    }
    if let Publisher::Nchan(p) | Publisher::Api(p) = pw {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let refused = p.refused.load(Ordering::Relaxed);
        if refused > 0 {
            eprintln!(
                "the HTTP publisher's server refused {refused} of {} publishes",
                count * n
            );
        }
    }
    Ok(())
}

/// Who a subscriber is: its user number, its channel and its load process.
struct Subscriber {
    user: usize,
    topic: String,
    worker: usize,
}

/// One subscriber: checks the sequence, records latency, and (when a
/// server is to fail) resumes on the next `--url` after a disconnect.
async fn receive(
    who: Subscriber,
    mut r: client::Reader,
    stats: Arc<Stats>,
    conn: ConnectOpts,
    failover: bool,
    expected: u64,
) {
    let Subscriber { user, topic, worker } = who;
    let mut check = SeqCheck::with_publishers(1);
    let mut unique = 0u64;
    let mut last_id = 0u64;
    // Keeps the socket's write half open after a reconnect.
    let mut _writer = None;
    while unique < expected {
        let (payload, id) = match client::recv(&mut r).await {
            Incoming::Binary(b) => match client::parse_broadcast(&b) {
                Some((_, meta, p)) => (p.to_vec(), position_of(meta)),
                None => continue,
            },
            Incoming::Text(t) => match serde_json::from_slice::<serde_json::Value>(&t) {
                // nchan delivers the published body as it was.
                Ok(v) if v.get("seq").is_some() => (t, None),
                // A Socket.IO event: 42["bench", payload].
                _ if t.starts_with(b"42[") => match serde_json::from_slice::<serde_json::Value>(&t[2..]) {
                    Ok(v) => (v[1].to_string().into_bytes(), None),
                    Err(_) => continue,
                },
                // vsn 1.0.0 broadcasts are JSON objects.
                Ok(v) if v["event"] == "broadcast" => (
                    v["payload"]["payload"].to_string().into_bytes(),
                    v["payload"]["meta"]["id"].as_str().and_then(|s| s.parse().ok()),
                ),
                _ => continue,
            },
            Incoming::Closed(why) => {
                if stats.disconnected.fetch_add(1, Ordering::Relaxed) < 3 {
                    eprintln!("user {user}: connection closed: {why}");
                }
                stats.connections.fetch_sub(1, Ordering::Relaxed);
                if !failover {
                    return;
                }
                let Some((nr, nw, took)) = resume(user, &topic, &conn, worker, last_id).await else {
                    return;
                };
                r = nr;
                _writer = Some(nw);
                stats.connections.fetch_add(1, Ordering::Relaxed);
                stats.record_reconnect(took.as_micros() as u64);
                continue;
            }
        };
        #[derive(serde::Deserialize)]
        struct Msg {
            seq: u64,
            ts: u64,
        }
        let Ok(m) = serde_json::from_slice::<Msg>(&payload) else {
            continue;
        };
        if let Some(id) = id {
            last_id = last_id.max(id);
        }
        stats.record_latency(now_micros().saturating_sub(m.ts));
        stats.received.fetch_add(1, Ordering::Relaxed);
        if SeqCheck::count(&check.observe(0, m.seq), &stats) {
            unique += 1;
        }
    }
}

/// Reconnects `user` to the next `--url`s in turn (for up to ~60 tries)
/// and joins after `last_id`. Returns the new socket and how long it took.
async fn resume(
    user: usize,
    topic: &str,
    conn: &ConnectOpts,
    worker: usize,
    last_id: u64,
) -> Option<(client::Reader, client::Writer, Duration)> {
    let lost_at = Instant::now();
    for attempt in 0..60 {
        let target: &Target = &conn.targets[(user + 1 + attempt) % conn.targets.len()];
        let src = source_ip(user, conn.source_ips, worker);
        if let Ok((mut nr, mut nw)) = client::connect(target, &conn.vsn, conn.apikey.as_deref(), src).await {
            let opts = JoinOpts {
                resume: (last_id > 0).then_some(last_id),
                ..JoinOpts::default()
            };
            if session::join(&mut nr, &mut nw, topic, &conn.vsn, &opts).await.is_ok() {
                return Some((nr, nw, lost_at.elapsed()));
            }
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    None
}
