//! Realtime protocol steps shared by the scenarios: join (optionally with
//! presence and a resume position), track, heartbeats, and connecting many
//! users with bounded concurrency.

use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use tokio::sync::{Mutex, Notify, Semaphore};

use crate::client::{self, Incoming, Target};
use crate::run::Ctx;

/// How a client joins its channel.
#[derive(Debug, Clone, Default)]
pub struct JoinOpts {
    /// Join with presence enabled under this key (disabled when `None`).
    pub presence_key: Option<String>,
    /// Resume after this position (`config.resume.after`).
    pub resume: Option<u64>,
    /// More `config` members, e.g. `"postgres_changes":[…]` (a JSON fragment
    /// without the surrounding braces).
    pub extra_config: Option<String>,
    /// Socket.IO: the topic is a namespace (`/workshop:3`) to CONNECT, whose
    /// emits reach its other sockets, instead of a channel to `join` on the
    /// main namespace.
    pub socketio_namespace: bool,
}

/// Joins `topic` and waits for the ok reply (skipping anything before it).
pub async fn join(
    r: &mut client::Reader,
    w: &mut client::Writer,
    topic: &str,
    vsn: &str,
    opts: &JoinOpts,
) -> Result<()> {
    let resume = opts
        .resume
        .map_or_else(String::new, |p| format!(r#","resume":{{"after":"{p}"}}"#));
    let presence = match &opts.presence_key {
        Some(k) => format!(r#"{{"enabled":true,"key":"{k}"}}"#),
        None => r#"{"enabled":false}"#.to_owned(),
    };
    let extra = opts.extra_config.as_ref().map_or_else(String::new, |e| format!(",{e}"));
    let config = format!(r#"{{"broadcast":{{"self":false}},"presence":{presence}{resume}{extra}}}"#);
    let msg = if vsn == "1.0.0" {
        format!(r#"{{"topic":"{topic}","event":"phx_join","payload":{{"config":{config}}},"ref":"1","join_ref":"1"}}"#)
    } else {
        format!(r#"["1","1","{topic}","phx_join",{{"config":{config}}}]"#)
    };
    client::send_text(w, &msg).await?;
    await_ok_reply(r, "join").await
}

/// Tracks a presence with `meta` (a JSON object) and waits for the ok reply.
pub async fn track(r: &mut client::Reader, w: &mut client::Writer, topic: &str, vsn: &str, meta: &str) -> Result<()> {
    let payload = format!(r#"{{"type":"presence","event":"track","payload":{meta}}}"#);
    let msg = if vsn == "1.0.0" {
        format!(r#"{{"topic":"{topic}","event":"presence","payload":{payload},"ref":"2","join_ref":"1"}}"#)
    } else {
        format!(r#"["1","2","{topic}","presence",{payload}]"#)
    };
    client::send_text(w, &msg).await?;
    await_ok_reply(r, "track").await
}

/// Waits up to 30 s for the next `phx_reply`; fails unless it is `ok`.
pub async fn await_ok_reply(r: &mut client::Reader, what: &str) -> Result<()> {
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

/// The loopback source address of user `i`: process `worker` uses its own
/// `per_worker` addresses (127.0.0.1 … for worker 0, the next ones for worker 1 …).
pub fn source_ip(i: usize, per_worker: u8, worker: usize) -> Option<IpAddr> {
    let n = usize::from(per_worker.max(1));
    let host = (1 + worker * n + i % n).min(254) as u8;
    Some(IpAddr::from([127, 0, 0, host]))
}

/// One user to connect.
#[derive(Debug, Clone)]
pub struct Plan {
    /// Global user number.
    pub user: usize,
    pub topic: String,
    pub join: JoinOpts,
    /// Presence meta to track after joining.
    pub track: Option<String>,
}

/// Common connection settings.
#[derive(Debug, Clone)]
pub struct ConnectOpts {
    pub targets: Vec<Target>,
    pub vsn: String,
    pub apikey: Option<String>,
    pub source_ips: u8,
    pub concurrency: usize,
    /// Talk to nginx + nchan instead: subscribe with a WebSocket to
    /// `/sub/<topic>` (no join, no presence), publish with POST `/pub/<topic>`.
    pub nchan: bool,
    /// Talk Socket.IO 4 instead: `/socket.io/` over WebSocket, CONNECT,
    /// then the `join` event with an ack (see [`socketio_join`]).
    pub socketio: bool,
}

pub type SharedWriter = Arc<Mutex<client::Writer>>;

/// Connects and joins every planned user (with bounded concurrency),
/// spawning `on_joined` for each. Counts joined connections, errors and
/// connect+join times in `ctx.stats`. Returns the writers, by user.
pub async fn connect_all<F, Fut>(
    ctx: &Ctx,
    opts: &ConnectOpts,
    plans: Vec<Plan>,
    on_joined: F,
) -> Vec<(usize, SharedWriter)>
where
    F: Fn(usize, client::Reader) -> Fut + Send + Sync + 'static + Clone,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let sem = Arc::new(Semaphore::new(opts.concurrency.max(1)));
    let mut handles = Vec::with_capacity(plans.len());
    for plan in plans {
        let permit = sem.clone().acquire_owned().await.expect("semaphore");
        let target = opts.targets[plan.user % opts.targets.len()].clone();
        let vsn = opts.vsn.clone();
        let apikey = opts.apikey.clone();
        let src = source_ip(plan.user, opts.source_ips, ctx.worker_index);
        let on_joined = on_joined.clone();
        let stats = ctx.stats.clone();
        let nchan = opts.nchan;
        let socketio = opts.socketio;
        handles.push(tokio::spawn(async move {
            let _permit = permit;
            let t0 = Instant::now();
            let (r, w) = if nchan {
                client::connect_path(&target, &nchan_path("sub", &plan.topic), src).await?
            } else if socketio {
                let (mut r, mut w) = client::connect_path(&target, SOCKETIO_PATH, src).await?;
                if plan.join.socketio_namespace {
                    socketio_connect(&mut r, &mut w, Some(&plan.topic), apikey.as_deref()).await?;
                } else {
                    socketio_join(&mut r, &mut w, &plan.topic, apikey.as_deref()).await?;
                }
                (r, w)
            } else {
                let (mut r, mut w) = client::connect(&target, &vsn, apikey.as_deref(), src).await?;
                join(&mut r, &mut w, &plan.topic, &vsn, &plan.join).await?;
                if let Some(meta) = &plan.track {
                    track(&mut r, &mut w, &plan.topic, &vsn, meta).await?;
                }
                (r, w)
            };
            stats.record_connect(t0.elapsed().as_micros() as u64);
            stats.connections.fetch_add(1, Ordering::Relaxed);
            tokio::spawn(on_joined(plan.user, r));
            anyhow::Ok((plan.user, Arc::new(Mutex::new(w))))
        }));
    }
    let mut writers = Vec::with_capacity(handles.len());
    let mut first_error = None;
    for h in handles {
        let e = match h.await {
            Ok(Ok(w)) => {
                writers.push(w);
                continue;
            }
            Ok(Err(e)) => e.to_string(),
            Err(e) => e.to_string(),
        };
        ctx.stats.connect_errors.fetch_add(1, Ordering::Relaxed);
        first_error.get_or_insert(e);
    }
    if let Some(e) = first_error {
        eprintln!(
            "{} connections failed; first error: {e}",
            ctx.stats.connect_errors.load(Ordering::Relaxed)
        );
    }
    writers
}

/// Socket.IO's endpoint, Engine.IO 4 over WebSocket.
pub const SOCKETIO_PATH: &str = "/socket.io/?EIO=4&transport=websocket";

/// The next text frame, or why there is none.
async fn next_text(r: &mut client::Reader) -> Result<String> {
    loop {
        match client::recv(r).await {
            client::Incoming::Text(t) => return Ok(String::from_utf8_lossy(&t).into_owned()),
            client::Incoming::Binary(_) => continue,
            client::Incoming::Closed(why) => anyhow::bail!("closed: {why}"),
        }
    }
}

/// After the Engine.IO open packet: CONNECTs namespace `nsp` (the main
/// one when `None`) with `token` as `auth.token`, and waits for the answer.
pub async fn socketio_connect(
    r: &mut client::Reader,
    w: &mut client::Writer,
    nsp: Option<&str>,
    token: Option<&str>,
) -> Result<()> {
    let open = next_text(r).await?;
    anyhow::ensure!(
        open.starts_with("0{"),
        "expected the Engine.IO open packet, got {open:?}"
    );
    let prefix = nsp.map_or_else(|| "40".to_owned(), |n| format!("40{n},"));
    let auth = token.map_or_else(String::new, |t| format!(r#"{{"token":{}}}"#, serde_json::json!(t)));
    client::send_text(w, &format!("{prefix}{auth}")).await?;
    loop {
        let p = next_text(r).await?;
        if p.starts_with(&prefix) {
            return Ok(());
        }
        anyhow::ensure!(!p.starts_with("44"), "CONNECT refused: {p}");
    }
}

/// CONNECTs the main namespace, then joins `topic`'s channel with the
/// `join` event and waits for its ack.
pub async fn socketio_join(
    r: &mut client::Reader,
    w: &mut client::Writer,
    topic: &str,
    token: Option<&str>,
) -> Result<()> {
    socketio_connect(r, w, None, token).await?;
    let channel = topic.strip_prefix("realtime:").unwrap_or(topic);
    client::send_text(w, &format!(r#"421["join",{}]"#, serde_json::json!(channel))).await?;
    loop {
        let p = next_text(r).await?;
        if let Some(ack) = p.strip_prefix("431") {
            anyhow::ensure!(ack.contains(r#""ok":true"#), "join refused: {ack}");
            return Ok(());
        }
    }
}

/// The nchan location for `topic` (`realtime:bench:fanout` → `/sub/bench-fanout`).
pub fn nchan_path(kind: &str, topic: &str) -> String {
    let name = topic.strip_prefix("realtime:").unwrap_or(topic).replace(':', "-");
    format!("/{kind}/{name}")
}

/// Sends a heartbeat on every writer every 25 s until `stop`, spread
/// evenly over the 25 s (as independent clients would be) rather than all
/// at once, which would be a burst no real population produces.
pub fn spawn_heartbeats(writers: Vec<SharedWriter>, vsn: String, stop: Arc<Notify>) {
    if writers.is_empty() {
        return;
    }
    if vsn == "nchan" {
        // No heartbeats there, but the writers must live on: dropping one
        // half-closes its socket, and the server then ends the subscription.
        tokio::spawn(async move {
            stop.notified().await;
            drop(writers);
        });
        return;
    }
    tokio::spawn(async move {
        let period = Duration::from_secs(25);
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + period, period / writers.len() as u32);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
        for n in 0u64.. {
            tokio::select! {
                _ = tick.tick() => {}
                () = stop.notified() => break,
            }
            let msg = if vsn == "socketio" {
                // An Engine.IO pong: both servers count it as a heartbeat.
                "3".to_owned()
            } else if vsn == "1.0.0" {
                format!(r#"{{"topic":"phoenix","event":"heartbeat","payload":{{}},"ref":"h{n}"}}"#)
            } else {
                format!(r#"[null,"h{n}","phoenix","heartbeat",{{}}]"#)
            };
            let w = &writers[n as usize % writers.len()];
            let _ = client::send_text(&mut *w.lock().await, &msg).await;
        }
    });
}

/// Microseconds since the Unix epoch (the origin timestamp in messages).
pub fn now_micros() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

/// The position in a kind-4 frame's metadata (`{"id":"N"}`).
pub fn position_of(meta: &[u8]) -> Option<u64> {
    #[derive(serde::Deserialize)]
    struct Meta {
        id: String,
    }
    serde_json::from_slice::<Meta>(meta).ok()?.id.parse().ok()
}

/// A small deterministic random generator (splitmix64), so runs are
/// repeatable without a dependency.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}
