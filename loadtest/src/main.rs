//! `fanout-loadtest`: drives a fanout server (or cluster) with many
//! simulated clients over the Supabase Realtime protocol and reports
//! throughput, latency, delivery correctness and CPU cost.
//!
//! Scenarios:
//! - `fanout`: one hot channel, `--users` subscribers, one publisher at
//!   `--rate` messages per second for `--duration` seconds. Every message
//!   carries its sequence number and send time; every subscriber checks for
//!   gaps, duplicates and reordering and records publish-to-receive latency.
//! - `idle`: `--users` connections that join a channel each and stay idle
//!   (heartbeating); reports the server's memory per connection.

mod client;
mod proc;

use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::{Parser, ValueEnum};
use hdrhistogram::Histogram;
use serde::Serialize;
use tokio::sync::{Mutex, Semaphore};

use crate::client::{Incoming, Target};

#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
enum Scenario {
    Fanout,
    Idle,
}

#[derive(Parser, Debug)]
#[command(
    name = "fanout-loadtest",
    version,
    about = "Load generator for fanout (Supabase Realtime protocol)"
)]
struct Args {
    /// Scenario to run.
    #[arg(long, value_enum, default_value = "fanout")]
    scenario: Scenario,
    /// Server URL(s), comma-separated; clients are spread over them.
    #[arg(long, default_value = "ws://127.0.0.1:4000/realtime/v1", value_delimiter = ',')]
    url: Vec<String>,
    /// Simulated users (subscribers or idle connections).
    #[arg(long, default_value_t = 500)]
    users: usize,
    /// Messages per second from the publisher (fanout scenario).
    #[arg(long, default_value_t = 10)]
    rate: u32,
    /// Seconds of publishing (fanout) or holding (idle).
    #[arg(long, default_value_t = 60)]
    duration: u64,
    /// Payload padding in bytes added to each message.
    #[arg(long, default_value_t = 0)]
    payload_bytes: usize,
    /// Protocol version of the clients.
    #[arg(long, default_value = "2.0.0")]
    vsn: String,
    /// JWT to pass as apikey, if the server needs one.
    #[arg(long, env = "FANOUT_LOADTEST_APIKEY")]
    apikey: Option<String>,
    /// Loopback source addresses to spread connections over (127.0.0.1 … 127.0.0.N).
    #[arg(long, default_value_t = 4)]
    source_ips: u8,
    /// Connection attempts in flight at once.
    #[arg(long, default_value_t = 256)]
    connect_concurrency: usize,
    /// Idle scenario: each user also tracks a presence after joining.
    #[arg(long)]
    track: bool,
    /// Server pid, to report its CPU time per delivered message and its memory.
    #[arg(long)]
    server_pid: Option<u32>,
    /// Fanout scenario: kill -9 this pid (an edge in --url) after --kill-after
    /// seconds of publishing; its clients reconnect to another --url with
    /// their last position and the run checks nothing was lost or repeated.
    #[arg(long)]
    kill_pid: Option<u32>,
    /// Seconds into publishing at which --kill-pid is killed.
    #[arg(long, default_value_t = 5)]
    kill_after: u64,
    /// Write report.json into this directory.
    #[arg(long)]
    report: Option<std::path::PathBuf>,
}

/// What every receiver counts.
#[derive(Default)]
struct Counters {
    received: AtomicU64,
    lost: AtomicU64,
    duplicated: AtomicU64,
    reordered: AtomicU64,
    disconnected: AtomicU64,
    reconnected: AtomicU64,
    reconnect_max_us: AtomicU64,
}

#[derive(Debug, Serialize)]
struct Latency {
    p50: f64,
    p90: f64,
    p99: f64,
    p999: f64,
    max: f64,
}

#[derive(Debug, Serialize)]
struct Report {
    scenario: String,
    users: usize,
    connect_errors: u64,
    connect_seconds: f64,
    messages_sent: u64,
    messages_expected: u64,
    messages_received: u64,
    lost: u64,
    duplicated: u64,
    reordered: u64,
    disconnected: u64,
    publish_seconds: f64,
    deliveries_per_second: f64,
    latency_ms: Option<Latency>,
    server_cpu_seconds: Option<f64>,
    server_cpu_us_per_delivery: Option<f64>,
    client_cpu_percent: f64,
    server_rss_before_bytes: Option<u64>,
    server_rss_after_bytes: Option<u64>,
    server_rss_per_connection_bytes: Option<f64>,
    /// Clients that lost their connection and resumed on another server.
    reconnected: u64,
    /// Longest time from losing a connection to being joined again, ms.
    reconnect_max_ms: Option<f64>,
}

fn now_micros() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

fn source_ip(i: usize, n: u8) -> Option<IpAddr> {
    let n = n.max(1);
    Some(IpAddr::from([127, 0, 0, 1 + (i % usize::from(n)) as u8]))
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(n) if (n as usize) < args.users + 64 => {
            eprintln!(
                "warning: open-file limit {n} is below --users {}; use several processes",
                args.users
            )
        }
        _ => {}
    }
    let targets: Vec<Target> = args.url.iter().map(|u| Target::parse(u)).collect::<Result<_>>()?;
    let report = match args.scenario {
        Scenario::Fanout => fanout(&args, &targets).await?,
        Scenario::Idle => idle(&args, &targets).await?,
    };
    print_summary(&report);
    if let Some(dir) = &args.report {
        std::fs::create_dir_all(dir)?;
        let path = dir.join("report.json");
        std::fs::write(&path, serde_json::to_string_pretty(&report)?)?;
        println!("report written to {}", path.display());
    }
    if report.lost > 0 || report.duplicated > 0 || report.reordered > 0 {
        std::process::exit(1);
    }
    Ok(())
}

/// Joins `topic` and waits for the ok reply (skipping presence_state).
async fn join(r: &mut client::Reader, w: &mut client::Writer, topic: &str, vsn: &str) -> Result<()> {
    join_from(r, w, topic, vsn, None).await
}

/// Joins `topic`, resuming after position `resume` when given.
async fn join_from(
    r: &mut client::Reader,
    w: &mut client::Writer,
    topic: &str,
    vsn: &str,
    resume: Option<u64>,
) -> Result<()> {
    let resume = resume.map_or_else(String::new, |p| format!(r#","resume":{{"after":"{p}"}}"#));
    let config = format!(r#"{{"broadcast":{{"self":false}},"presence":{{"enabled":false}}{resume}}}"#);
    let msg = if vsn == "1.0.0" {
        format!(r#"{{"topic":"{topic}","event":"phx_join","payload":{{"config":{config}}},"ref":"1","join_ref":"1"}}"#)
    } else {
        format!(r#"["1","1","{topic}","phx_join",{{"config":{config}}}]"#)
    };
    client::send_text(w, &msg).await?;
    await_ok_reply(r, "join").await
}

/// Tracks a presence `{"user": i}` and waits for the ok reply.
async fn track_presence(
    r: &mut client::Reader,
    w: &mut client::Writer,
    topic: &str,
    vsn: &str,
    i: usize,
) -> Result<()> {
    let payload = format!(r#"{{"type":"presence","event":"track","payload":{{"user":{i}}}}}"#);
    let msg = if vsn == "1.0.0" {
        format!(r#"{{"topic":"{topic}","event":"presence","payload":{payload},"ref":"2","join_ref":"1"}}"#)
    } else {
        format!(r#"["1","2","{topic}","presence",{payload}]"#)
    };
    client::send_text(w, &msg).await?;
    await_ok_reply(r, "track").await
}

/// Waits up to 30 s for the next `phx_reply`; fails unless it is `ok`.
async fn await_ok_reply(r: &mut client::Reader, what: &str) -> Result<()> {
    loop {
        match tokio::time::timeout(Duration::from_secs(30), client::recv(r)).await {
            Err(_) => bail!("{what} reply timed out"),
            Ok(Incoming::Text(t)) => {
                let s = String::from_utf8_lossy(&t);
                if s.contains("phx_reply") {
                    if s.contains(r#""status":"ok""#) {
                        return Ok(());
                    }
                    bail!("{what} refused: {s}");
                }
            }
            Ok(Incoming::Binary(_)) => {}
            Ok(Incoming::Closed(why)) => bail!("connection closed during {what}: {why}"),
        }
    }
}

/// Connects and joins `users` clients (with bounded concurrency), spawning
/// `on_joined` for each. Returns the writers (for heartbeats) and the
/// number of failures.
async fn connect_all<F, Fut>(
    args: &Args,
    targets: &[Target],
    topic_of: impl Fn(usize) -> String,
    on_joined: F,
) -> (Vec<Arc<Mutex<client::Writer>>>, u64)
where
    F: Fn(usize, client::Reader) -> Fut + Send + Sync + 'static + Clone,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let sem = Arc::new(Semaphore::new(args.connect_concurrency.max(1)));
    let mut handles = Vec::with_capacity(args.users);
    for i in 0..args.users {
        let permit = sem.clone().acquire_owned().await.expect("semaphore");
        let target = targets[i % targets.len()].clone();
        let vsn = args.vsn.clone();
        let apikey = args.apikey.clone();
        let src = source_ip(i, args.source_ips);
        let topic = topic_of(i);
        let on_joined = on_joined.clone();
        let track = args.track;
        handles.push(tokio::spawn(async move {
            let _permit = permit;
            let (mut r, mut w) = client::connect(&target, &vsn, apikey.as_deref(), src).await?;
            join(&mut r, &mut w, &topic, &vsn).await?;
            if track {
                track_presence(&mut r, &mut w, &topic, &vsn, i).await?;
            }
            tokio::spawn(on_joined(i, r));
            anyhow::Ok(Arc::new(Mutex::new(w)))
        }));
    }
    let mut writers = Vec::with_capacity(args.users);
    let mut errors = 0;
    let mut first_error = None;
    for h in handles {
        match h.await {
            Ok(Ok(w)) => writers.push(w),
            Ok(Err(e)) => {
                errors += 1;
                first_error.get_or_insert(e.to_string());
            }
            Err(e) => {
                errors += 1;
                first_error.get_or_insert(e.to_string());
            }
        }
    }
    if let Some(e) = first_error {
        eprintln!("{errors} connections failed; first error: {e}");
    }
    (writers, errors)
}

/// Sends a heartbeat on every writer every 25 s until `stop`.
fn spawn_heartbeats(writers: Vec<Arc<Mutex<client::Writer>>>, vsn: String, stop: Arc<tokio::sync::Notify>) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(25));
        tick.tick().await;
        let mut n = 0u64;
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                () = stop.notified() => break,
            }
            n += 1;
            let msg = if vsn == "1.0.0" {
                format!(r#"{{"topic":"phoenix","event":"heartbeat","payload":{{}},"ref":"h{n}"}}"#)
            } else {
                format!(r#"[null,"h{n}","phoenix","heartbeat",{{}}]"#)
            };
            for w in &writers {
                let _ = client::send_text(&mut *w.lock().await, &msg).await;
            }
        }
    });
}

async fn fanout(args: &Args, targets: &[Target]) -> Result<Report> {
    let topic = "realtime:bench:fanout".to_owned();
    let counters = Arc::new(Counters::default());
    let (hist_tx, mut hist_rx) = tokio::sync::mpsc::unbounded_channel::<Histogram<u64>>();
    let expected_total = args.rate as u64 * args.duration;
    let started = Instant::now();
    let failover = args.kill_pid.is_some();
    let receiver = {
        let counters = counters.clone();
        let hist_tx = hist_tx.clone();
        let targets = targets.to_vec();
        let vsn = args.vsn.clone();
        let apikey = args.apikey.clone();
        let source_ips = args.source_ips;
        let topic = topic.clone();
        move |i: usize, mut r: client::Reader| {
            let counters = counters.clone();
            let hist_tx = hist_tx.clone();
            let targets = targets.clone();
            let vsn = vsn.clone();
            let apikey = apikey.clone();
            let topic = topic.clone();
            async move {
                let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("histogram");
                let mut seen_seqs = vec![0u64; (expected_total as usize).div_ceil(64)];
                let mut next_seq = 0u64;
                let mut seen = 0u64;
                let mut last_id = 0u64;
                // Keeps the socket's write half open after a reconnect.
                let mut _writer = None;
                loop {
                    let (payload, id) = match client::recv(&mut r).await {
                        Incoming::Binary(b) => match client::parse_broadcast(&b) {
                            Some((_, meta, p)) => (p.to_vec(), position_of(meta)),
                            None => continue,
                        },
                        Incoming::Text(t) => {
                            // vsn 1.0.0 broadcasts are JSON objects.
                            match serde_json::from_slice::<serde_json::Value>(&t) {
                                Ok(v) if v["event"] == "broadcast" => (
                                    v["payload"]["payload"].to_string().into_bytes(),
                                    v["payload"]["meta"]["id"].as_str().and_then(|s| s.parse().ok()),
                                ),
                                _ => continue,
                            }
                        }
                        Incoming::Closed(_) => {
                            counters.disconnected.fetch_add(1, Ordering::Relaxed);
                            if !failover {
                                break;
                            }
                            // Resume on the next server, from the last position seen.
                            let lost_at = Instant::now();
                            let mut resumed = None;
                            for attempt in 0..60 {
                                let target = &targets[(i + 1 + attempt) % targets.len()];
                                let src = source_ip(i, source_ips);
                                if let Ok((mut nr, mut nw)) =
                                    client::connect(target, &vsn, apikey.as_deref(), src).await
                                {
                                    let resume = (last_id > 0).then_some(last_id);
                                    if join_from(&mut nr, &mut nw, &topic, &vsn, resume).await.is_ok() {
                                        resumed = Some((nr, nw));
                                        break;
                                    }
                                }
                                tokio::time::sleep(Duration::from_millis(250)).await;
                            }
                            let Some((nr, nw)) = resumed else { break };
                            r = nr;
                            _writer = Some(nw);
                            let took = lost_at.elapsed().as_micros() as u64;
                            counters.reconnected.fetch_add(1, Ordering::Relaxed);
                            counters.reconnect_max_us.fetch_max(took, Ordering::Relaxed);
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
                    let now = now_micros();
                    let _ = hist.record(now.saturating_sub(m.ts).max(1));
                    counters.received.fetch_add(1, Ordering::Relaxed);
                    let (word, bit) = ((m.seq / 64) as usize, m.seq % 64);
                    if let Some(w) = seen_seqs.get_mut(word) {
                        if *w & (1 << bit) != 0 {
                            counters.duplicated.fetch_add(1, Ordering::Relaxed);
                            continue;
                        }
                        *w |= 1 << bit;
                    }
                    seen += 1;
                    if m.seq == next_seq {
                        next_seq += 1;
                    } else if m.seq > next_seq {
                        counters.lost.fetch_add(m.seq - next_seq, Ordering::Relaxed);
                        next_seq = m.seq + 1;
                    } else {
                        // Late: counted lost when skipped, so undo that.
                        counters.lost.fetch_sub(1, Ordering::Relaxed);
                        counters.reordered.fetch_add(1, Ordering::Relaxed);
                    }
                    if seen >= expected_total {
                        break;
                    }
                }
                let _ = hist_tx.send(hist);
            }
        }
    };
    let (writers, connect_errors) = connect_all(args, targets, |_| topic.clone(), receiver).await;
    let connect_seconds = started.elapsed().as_secs_f64();
    let subscribers = writers.len() as u64;
    println!("{subscribers} subscribers joined in {connect_seconds:.1} s ({connect_errors} errors)");
    let stop = Arc::new(tokio::sync::Notify::new());
    spawn_heartbeats(writers, args.vsn.clone(), stop.clone());

    // The publisher is its own connection (not a subscriber).
    let publisher_target = targets.last().expect("at least one --url");
    let (mut pr, mut pw) = client::connect(publisher_target, "2.0.0", args.apikey.as_deref(), None).await?;
    join(&mut pr, &mut pw, &topic, "2.0.0").await?;
    tokio::spawn(async move { while !matches!(client::recv(&mut pr).await, Incoming::Closed(_)) {} });
    tokio::time::sleep(Duration::from_millis(500)).await;

    let server_cpu0 = args.server_pid.map(|p| proc::cpu_seconds(Some(p))).transpose()?;
    let client_cpu0 = proc::cpu_seconds(None)?;
    let received0 = counters.received.load(Ordering::Relaxed);
    let pad = "x".repeat(args.payload_bytes);
    let interval = Duration::from_secs_f64(1.0 / f64::from(args.rate.max(1)));
    let t0 = Instant::now();
    let mut last_print = Instant::now();
    let mut killed = false;
    for seq in 0..expected_total {
        if let Some(pid) = args.kill_pid
            && !killed
            && t0.elapsed() >= Duration::from_secs(args.kill_after)
        {
            killed = true;
            eprintln!("[{:>5.1}s] kill -9 {pid}", t0.elapsed().as_secs_f64());
            let _ = std::process::Command::new("kill")
                .args(["-9", &pid.to_string()])
                .status();
        }
        let due = t0 + interval.mul_f64(seq as f64);
        tokio::time::sleep_until(due.into()).await;
        let payload = if pad.is_empty() {
            format!(r#"{{"seq":{seq},"ts":{}}}"#, now_micros())
        } else {
            format!(r#"{{"seq":{seq},"ts":{},"pad":"{pad}"}}"#, now_micros())
        };
        let frame = client::broadcast_push("1", "", &topic, "bench", payload.as_bytes());
        client::send_binary(&mut pw, &frame).await.context("publishing")?;
        if last_print.elapsed() > Duration::from_secs(2) {
            last_print = Instant::now();
            let got = counters.received.load(Ordering::Relaxed) - received0;
            eprintln!(
                "[{:>5.1}s] sent {} / {expected_total}, delivered {got} ({:.0}/s)",
                t0.elapsed().as_secs_f64(),
                seq + 1,
                got as f64 / t0.elapsed().as_secs_f64()
            );
        }
    }
    let publish_seconds = t0.elapsed().as_secs_f64();
    let expected = expected_total * subscribers;
    let deadline = Instant::now() + Duration::from_secs(if failover { 30 } else { 10 });
    while counters.received.load(Ordering::Relaxed) - counters.duplicated.load(Ordering::Relaxed) < expected
        && Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let drain_seconds = t0.elapsed().as_secs_f64();
    let server_cpu = match (args.server_pid, server_cpu0) {
        (Some(p), Some(c0)) => Some(proc::cpu_seconds(Some(p))? - c0),
        _ => None,
    };
    let client_cpu = proc::cpu_seconds(None)? - client_cpu0;
    stop.notify_one();
    drop(hist_tx);
    let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    let merge_deadline = Instant::now() + Duration::from_secs(2);
    let mut merged = 0;
    while merged < subscribers && Instant::now() < merge_deadline {
        match tokio::time::timeout(Duration::from_millis(200), hist_rx.recv()).await {
            Ok(Some(h)) => {
                hist.add(&h)?;
                merged += 1;
            }
            Ok(None) => break,
            Err(_) => {}
        }
    }
    let received = counters.received.load(Ordering::Relaxed);
    let missing_at_end = expected.saturating_sub(received - counters.duplicated.load(Ordering::Relaxed));
    let ms = |q: f64| hist.value_at_quantile(q) as f64 / 1000.0;
    Ok(Report {
        scenario: "fanout".into(),
        users: args.users,
        connect_errors,
        connect_seconds,
        messages_sent: expected_total,
        messages_expected: expected,
        messages_received: received,
        lost: counters.lost.load(Ordering::Relaxed).max(missing_at_end),
        duplicated: counters.duplicated.load(Ordering::Relaxed),
        reordered: counters.reordered.load(Ordering::Relaxed),
        disconnected: counters.disconnected.load(Ordering::Relaxed),
        publish_seconds,
        deliveries_per_second: received as f64 / drain_seconds.max(publish_seconds),
        latency_ms: (!hist.is_empty()).then(|| Latency {
            p50: ms(0.5),
            p90: ms(0.9),
            p99: ms(0.99),
            p999: ms(0.999),
            max: hist.max() as f64 / 1000.0,
        }),
        server_cpu_seconds: server_cpu,
        server_cpu_us_per_delivery: server_cpu.map(|c| c * 1e6 / received.max(1) as f64),
        client_cpu_percent: client_cpu * 100.0 / drain_seconds,
        server_rss_before_bytes: None,
        server_rss_after_bytes: None,
        server_rss_per_connection_bytes: None,
        reconnected: counters.reconnected.load(Ordering::Relaxed),
        reconnect_max_ms: (counters.reconnected.load(Ordering::Relaxed) > 0)
            .then(|| counters.reconnect_max_us.load(Ordering::Relaxed) as f64 / 1000.0),
    })
}

async fn idle(args: &Args, targets: &[Target]) -> Result<Report> {
    let rss_before = args.server_pid.map(proc::rss_bytes).transpose()?;
    let counters = Arc::new(Counters::default());
    let started = Instant::now();
    let on_joined = {
        let counters = counters.clone();
        move |_i: usize, mut r: client::Reader| {
            let counters = counters.clone();
            async move {
                loop {
                    if let Incoming::Closed(_) = client::recv(&mut r).await {
                        counters.disconnected.fetch_add(1, Ordering::Relaxed);
                        break;
                    }
                }
            }
        }
    };
    let (writers, connect_errors) =
        connect_all(args, targets, |i| format!("realtime:idle:{}", i % 100), on_joined).await;
    let connect_seconds = started.elapsed().as_secs_f64();
    println!(
        "{} connections joined in {connect_seconds:.1} s ({connect_errors} errors)",
        writers.len()
    );
    let held = writers.len();
    let stop = Arc::new(tokio::sync::Notify::new());
    spawn_heartbeats(writers.clone(), args.vsn.clone(), stop.clone());
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss_after_connect = args.server_pid.map(proc::rss_bytes).transpose()?;
    let hold_until = Instant::now() + Duration::from_secs(args.duration);
    while Instant::now() < hold_until {
        tokio::time::sleep(Duration::from_secs(5)).await;
        let rss = args.server_pid.map(proc::rss_bytes).transpose()?.unwrap_or(0);
        eprintln!(
            "holding {held} connections, {} dropped, server RSS {:.1} MiB",
            counters.disconnected.load(Ordering::Relaxed),
            rss as f64 / 1048576.0
        );
    }
    stop.notify_one();
    let per_conn = match (rss_before, rss_after_connect) {
        (Some(b), Some(a)) if held > 0 => Some((a as f64 - b as f64) / held as f64),
        _ => None,
    };
    Ok(Report {
        scenario: "idle".into(),
        users: args.users,
        connect_errors,
        connect_seconds,
        messages_sent: 0,
        messages_expected: 0,
        messages_received: 0,
        lost: 0,
        duplicated: 0,
        reordered: 0,
        disconnected: counters.disconnected.load(Ordering::Relaxed),
        publish_seconds: 0.0,
        deliveries_per_second: 0.0,
        latency_ms: None,
        server_cpu_seconds: None,
        server_cpu_us_per_delivery: None,
        client_cpu_percent: 0.0,
        server_rss_before_bytes: rss_before,
        server_rss_after_bytes: rss_after_connect,
        server_rss_per_connection_bytes: per_conn,
        reconnected: 0,
        reconnect_max_ms: None,
    })
}

/// The position in a kind-4 frame's metadata (`{"id":"N"}`).
fn position_of(meta: &[u8]) -> Option<u64> {
    #[derive(serde::Deserialize)]
    struct Meta {
        id: String,
    }
    serde_json::from_slice::<Meta>(meta).ok()?.id.parse().ok()
}

fn print_summary(r: &Report) {
    println!("\n== fanout-loadtest: {} ==", r.scenario);
    println!("users                {:>12}", r.users);
    println!("connect errors       {:>12}", r.connect_errors);
    println!("connect time         {:>10.1} s", r.connect_seconds);
    if r.scenario == "fanout" {
        println!("messages sent        {:>12}", r.messages_sent);
        println!("deliveries expected  {:>12}", r.messages_expected);
        println!("deliveries received  {:>12}", r.messages_received);
        println!(
            "lost / dup / reorder {:>12}",
            format!("{} / {} / {}", r.lost, r.duplicated, r.reordered)
        );
        println!("deliveries per sec   {:>12.0}", r.deliveries_per_second);
        if let Some(l) = &r.latency_ms {
            println!(
                "latency ms p50/p90/p99/p99.9/max  {:.2} / {:.2} / {:.2} / {:.2} / {:.2}",
                l.p50, l.p90, l.p99, l.p999, l.max
            );
        }
        if let Some(c) = r.server_cpu_us_per_delivery {
            println!("server CPU per delivery {:>9.2} us", c);
        }
        println!("client CPU           {:>10.0} %", r.client_cpu_percent);
    }
    if let Some(p) = r.server_rss_per_connection_bytes {
        println!("server RSS per conn  {:>10.0} B", p);
    }
    println!("disconnected         {:>12}", r.disconnected);
    if r.reconnected > 0 {
        println!("reconnected          {:>12}", r.reconnected);
        println!("slowest reconnect    {:>10.0} ms", r.reconnect_max_ms.unwrap_or(0.0));
    }
}
