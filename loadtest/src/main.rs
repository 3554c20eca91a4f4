//! `fanout-loadtest`: drives a fanout server (or cluster) with many
//! simulated clients over the Supabase Realtime protocol and reports
//! throughput, latency, delivery correctness and CPU cost.
//!
//! Scenarios (`--scenario`, each bounded by `--users` and `--duration` and
//! stopping by itself):
//! - `workshop` (default): users in workshops of 10–50 with presence,
//!   sending chat and typing broadcasts; every receiver checks every
//!   publisher's sequence and records publish-to-receive latency.
//! - `fanout`: one hot channel, `--users` subscribers, one publisher at
//!   `--rate` messages per second.
//! - `connect-storm`: `--users` connections, each joining a channel, as fast
//!   as `--connect-concurrency` allows.
//! - `reconnect-storm`: the fanout stream over several `--url`s with one
//!   server killed (`--kill-pid`) or drained (`--drain-pid`); clients resume
//!   elsewhere and the run times how long each took to be live again.
//! - `soak`: the workshop load held for `--duration`, with the server's RSS
//!   and latency per `--sample-every` window and their drift.
//! - `idle`: `--users` joined connections held for `--duration`; reports the
//!   server's memory per connection.
//! - `chaos`: starts a cluster of its own (two edges, a three-node NATS
//!   JetStream cluster, Redis, PostgreSQL, `fanout presence`, `fanout cdc`
//!   and a Prometheus with the chart's alert rules), runs the workshop load
//!   with every component killed and restarted on a `--seed`ed schedule, and
//!   accounts for every message per client (see `chaos`).
//!
//! `--workers N` runs the scenario in N child processes (this executable,
//! re-run with a hidden `--worker-index`), each with its share of users and
//! source addresses, and merges their results. The run prints a progress
//! line per second, a summary table at the end, writes `report.json` and
//! `report.html` with `--report <dir>`, and exits non-zero when anything
//! was lost, repeated or reordered.

mod chaos;
mod client;
mod database;
mod fanout;
mod proc;
mod report;
mod run;
mod session;
mod stamp;
mod stats;
mod storm;
mod workshop;

use std::sync::Arc;

use anyhow::{Context, Result};
use clap::{Parser, ValueEnum};

use crate::client::Target;
use crate::run::{AggregateOptions, Ctx};
use crate::session::ConnectOpts;
use crate::stats::Partial;

#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
enum Scenario {
    Workshop,
    Fanout,
    ConnectStorm,
    ReconnectStorm,
    Soak,
    Idle,
    Chaos,
}

/// What server the clients talk to.
#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
enum ServerKind {
    /// fanout (or any Supabase Realtime server).
    Fanout,
    /// nginx + nchan (fanout and idle scenarios), for comparison: --url is
    /// the nginx address (ws://host:port); subscribers use /sub/<channel>,
    /// the publisher POSTs to /pub/<channel>. Any server with that URL
    /// scheme works the same (loadtest/uws: uWebSockets.js).
    Nchan,
    /// Socket.IO 4 (fanout's `/socket.io/` or the Socket.IO server in
    /// loadtest/socketio), fanout, idle and workshop scenarios (a workshop is
    /// a namespace, `/workshop:<n>`): --url is the server's
    /// address (ws://host:port); subscribers open `/socket.io/?EIO=4&
    /// transport=websocket`, CONNECT the main namespace (with --apikey as
    /// `auth.token`) and join the channel with the `join` event; the
    /// publisher POSTs to --api-url `/api/v1/publish`, which both serve.
    Socketio,
}

#[derive(Parser, Debug)]
#[command(
    name = "fanout-loadtest",
    version,
    about = "Load generator for fanout (Supabase Realtime protocol)"
)]
struct Args {
    /// Scenario to run.
    #[arg(long, value_enum, default_value = "workshop")]
    scenario: Scenario,
    /// What kind of server --url points at.
    #[arg(long, value_enum, default_value = "fanout")]
    target: ServerKind,
    /// Server URL(s), comma-separated; clients are spread over them.
    #[arg(long, default_value = "ws://127.0.0.1:4000/realtime/v1", value_delimiter = ',')]
    url: Vec<String>,
    /// Simulated users (connections).
    #[arg(long, default_value_t = 500)]
    users: usize,
    /// Workshops the users are spread over (workshop, soak) [default: users / 25].
    #[arg(long)]
    workshops: Option<usize>,
    /// Seconds of load (publishing, or holding for idle).
    #[arg(long, default_value_t = 60)]
    duration: u64,
    /// Chat messages per user per minute (workshop, soak).
    #[arg(long, default_value_t = 2.0)]
    chat_rate: f64,
    /// Typing notifications per user per minute (workshop, soak).
    #[arg(long, default_value_t = 6.0)]
    typing_rate: f64,
    /// Cursor moves per user per second (workshop, soak): each goes to the
    /// user's whole workshop, as a shared whiteboard's pointers do.
    #[arg(long, default_value_t = 0.0)]
    cursor_rate: f64,
    /// Workshop, soak: PostgreSQL URL (schema deploy/sql/workshop.sql). Each
    /// workshop's facilitator then writes activity rows that every member
    /// receives back as postgres_changes through fanout's change stream.
    #[arg(long, env = "FANOUT_LOADTEST_DATABASE_URL")]
    database_url: Option<String>,
    /// Activity rows per facilitator per minute (with --database-url).
    #[arg(long, default_value_t = 6.0)]
    activity_rate: f64,
    /// Messages per second from the publisher (fanout, reconnect-storm).
    #[arg(long, default_value_t = 10)]
    rate: u32,
    /// Fanout, reconnect-storm: channels the subscribers are spread over
    /// (round robin); the publisher sends `--rate` messages per second to
    /// each of them, spread evenly over the second.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    channels: u32,
    /// Fanout: publish through the server API at this `http://host:port`
    /// (`POST /api/v1/publish`, pipelined on one keep-alive connection)
    /// instead of a client socket, to compare the two side by side.
    #[arg(long)]
    api_url: Option<String>,
    /// The server API key for --api-url.
    #[arg(long, env = "FANOUT_LOADTEST_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    /// Payload padding in bytes added to each message (fanout, reconnect-storm).
    #[arg(long, default_value_t = 0)]
    payload_bytes: usize,
    /// Soak: seconds per sampling window (RSS and latency).
    #[arg(long, default_value_t = 10)]
    sample_every: u64,
    /// Protocol version of the clients.
    #[arg(long, default_value = "2.0.0")]
    vsn: String,
    /// JWT to pass as apikey, if the server needs one.
    #[arg(long, env = "FANOUT_LOADTEST_APIKEY")]
    apikey: Option<String>,
    /// HS256 secret: mint an apikey JWT (with `exp`) instead of passing --apikey.
    #[arg(long, env = "FANOUT_JWT_SECRET", hide_env_values = true)]
    jwt_secret: Option<String>,
    /// More claims for the minted JWT, a JSON object (e.g. '{"workshops": [0]}'
    /// for a server with row or channel policies).
    #[arg(long, value_parser = parse_claims)]
    jwt_claims: Option<serde_json::Map<String, serde_json::Value>>,
    /// Mint the JWT with ES256 and this PEM private key instead of HS256.
    #[arg(long)]
    jwt_es256_key: Option<std::path::PathBuf>,
    /// Loopback source addresses per load process (127.0.0.1 … 127.0.0.N for
    /// the first, the next N for the second …), for more than ~28,000
    /// connections per address pair.
    #[arg(long, default_value_t = 4)]
    source_ips: u8,
    /// Connection attempts in flight at once (over all load processes).
    #[arg(long, default_value_t = 256)]
    connect_concurrency: usize,
    /// Idle / connect-storm: each user also tracks a presence after joining.
    #[arg(long)]
    track: bool,
    /// Server pid(s), comma-separated: CPU per delivered message and memory
    /// (/proc), summed over them (e.g. nginx's workers).
    #[arg(long, value_delimiter = ',')]
    server_pid: Vec<u32>,
    /// Fanout / reconnect-storm: kill -9 this pid (a server in --url) after
    /// --kill-after seconds; its clients resume on another --url.
    #[arg(long)]
    kill_pid: Option<u32>,
    /// Reconnect-storm: send SIGTERM to this pid instead (the server drains).
    #[arg(long)]
    drain_pid: Option<u32>,
    /// Seconds into publishing at which --kill-pid / --drain-pid is signalled.
    #[arg(long, default_value_t = 5)]
    kill_after: u64,
    /// Load processes (each may hold at most as many sockets as its open-file limit).
    #[arg(long, default_value_t = 1)]
    workers: usize,
    /// Write report.json and report.html into this directory.
    #[arg(long)]
    report: Option<std::path::PathBuf>,
    /// No per-second progress line.
    #[arg(long)]
    quiet: bool,
    /// Chaos: the seed of the fault schedule and of the users' timing.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Chaos: edges to start.
    #[arg(long, default_value_t = 2)]
    edges: usize,
    /// Chaos: divide the alert rules' durations (`for:`, rate windows,
    /// `offset`) by this, so that alerts meant to fire after minutes fire
    /// within a short run (1: as shipped).
    #[arg(long, default_value_t = 30)]
    alert_time_scale: u32,
    /// Chaos: the Prometheus server binary.
    #[arg(long, default_value = "target/helm/prometheus")]
    prometheus: std::path::PathBuf,
    /// Set on the child processes of --workers.
    #[arg(long, hide = true)]
    worker_index: Option<usize>,
    #[arg(long, hide = true, default_value_t = 1)]
    worker_count: usize,
}

impl Args {
    fn scenario_name(&self) -> String {
        self.scenario
            .to_possible_value()
            .map_or_else(|| format!("{:?}", self.scenario), |v| v.get_name().to_owned())
    }
}

fn parse_claims(s: &str) -> Result<serde_json::Map<String, serde_json::Value>, String> {
    serde_json::from_str(s).map_err(|e| format!("--jwt-claims must be a JSON object: {e}"))
}

/// Which key signs the minted `apikey`.
enum Signer<'a> {
    Hs256(&'a str),
    Es256(&'a std::path::Path),
}

/// A token for `apikey`, valid for the run plus an hour, with `extra` claims.
fn mint_jwt(
    signer: Signer<'_>,
    seconds: u64,
    extra: Option<&serde_json::Map<String, serde_json::Value>>,
) -> Result<String> {
    use jsonwebtoken::{Algorithm, EncodingKey, Header, encode};
    let exp = session::now_micros() / 1_000_000 + seconds + 3600;
    let mut claims = serde_json::json!({"sub": "fanout-loadtest", "role": "authenticated", "exp": exp});
    for (k, v) in extra.into_iter().flatten() {
        claims[k] = v.clone();
    }
    let (header, key) = match signer {
        Signer::Hs256(secret) => (Header::default(), EncodingKey::from_secret(secret.as_bytes())),
        Signer::Es256(path) => {
            let pem = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
            let key = EncodingKey::from_ec_pem(&pem).context("--jwt-es256-key is not an EC private key (PEM)")?;
            (Header::new(Algorithm::ES256), key)
        }
    };
    encode(&header, &claims, &key).context("minting the JWT")
}

/// Runs `args.scenario` in one load process.
async fn scenario(args: Arc<Args>, ctx: Arc<Ctx>) -> Result<Partial> {
    let conn = ConnectOpts {
        targets: args.url.iter().map(|u| Target::parse(u)).collect::<Result<_>>()?,
        // nchan has no protocol version and no heartbeats; Socket.IO has
        // its own.
        vsn: match args.target {
            ServerKind::Nchan => "nchan".into(),
            ServerKind::Socketio => "socketio".into(),
            ServerKind::Fanout => args.vsn.clone(),
        },
        apikey: args.apikey.clone(),
        source_ips: args.source_ips,
        concurrency: args.connect_concurrency,
        nchan: args.target == ServerKind::Nchan,
        socketio: args.target == ServerKind::Socketio,
    };
    if conn.nchan && !matches!(args.scenario, Scenario::Fanout | Scenario::Idle) {
        anyhow::bail!("--target nchan supports the fanout and idle scenarios");
    }
    if conn.socketio && !matches!(args.scenario, Scenario::Fanout | Scenario::Idle | Scenario::Workshop) {
        anyhow::bail!("--target socketio supports the fanout, idle and workshop scenarios");
    }
    if conn.socketio && args.database_url.is_some() {
        anyhow::bail!("--database-url needs --target fanout (postgres_changes)");
    }
    if conn.socketio && args.scenario == Scenario::Fanout && args.api_url.is_none() {
        anyhow::bail!("--target socketio publishes through --api-url (POST /api/v1/publish)");
    }
    match args.scenario {
        Scenario::Workshop | Scenario::Soak => workshop::run(&args, &conn, &ctx).await,
        Scenario::Fanout | Scenario::ReconnectStorm => fanout::run(&args, &conn, &ctx).await,
        Scenario::ConnectStorm => storm::connect_storm(&args, &conn, &ctx).await,
        Scenario::Idle => storm::idle(&args, &conn, &ctx).await,
        Scenario::Chaos => anyhow::bail!("--scenario chaos starts its own servers (see chaos_main)"),
    }
}

/// `--scenario chaos`, in this process (it starts the servers itself).
async fn chaos_main(args: &Args) -> Result<()> {
    let per_minute = |rate: f64, what: &str| -> Result<std::time::Duration> {
        anyhow::ensure!(rate > 0.0, "{what} must be above 0");
        Ok(std::time::Duration::from_secs_f64(60.0 / rate))
    };
    let workshops = args.workshops.unwrap_or(args.users / 25).max(2) as u32;
    let prometheus = if args.prometheus.is_absolute() {
        args.prometheus.clone()
    } else {
        fanout_tests::repo_root().join(&args.prometheus)
    };
    let options = chaos::Options {
        seed: args.seed,
        users: args.users as u32,
        workshops,
        edges: args.edges.max(2),
        duration: std::time::Duration::from_secs(args.duration),
        chat_every: per_minute(args.chat_rate, "--chat-rate")?,
        api_every: std::time::Duration::from_secs_f64(1.0 / f64::from(args.rate.max(1))),
        row_every: per_minute(args.activity_rate * f64::from(workshops), "--activity-rate")?,
        alert_time_scale: args.alert_time_scale.max(1),
        prometheus,
        report: args.report.clone(),
    };
    if !chaos::run(options).await? {
        std::process::exit(1);
    }
    Ok(())
}

#[tokio::main]
async fn main() -> Result<()> {
    let mut args = Args::parse();
    // Each socket is a file; take all this process may have.
    let limit = rlimit::increase_nofile_limit(u64::MAX).unwrap_or(1024) as usize;
    if args.apikey.is_none() {
        let signer = match (&args.jwt_es256_key, &args.jwt_secret) {
            (Some(key), _) => Some(Signer::Es256(key)),
            (None, Some(secret)) => Some(Signer::Hs256(secret)),
            (None, None) => None,
        };
        if let Some(signer) = signer {
            args.apikey = Some(mint_jwt(signer, args.duration, args.jwt_claims.as_ref())?);
        }
    }
    if args.scenario == Scenario::ReconnectStorm && args.kill_pid.is_none() && args.drain_pid.is_none() {
        anyhow::bail!("reconnect-storm needs --kill-pid or --drain-pid (and two or more --url)");
    }
    if args.scenario == Scenario::Chaos {
        return chaos_main(&args).await;
    }
    let args = Arc::new(args);
    if let Some(index) = args.worker_index {
        let count = args.worker_count.max(1);
        run::run_worker(index, count, |ctx| scenario(args.clone(), ctx)).await;
        return Ok(());
    }
    let workers = args.workers.max(1);
    let per_process = args.users.div_ceil(workers);
    if limit < per_process + 64 {
        eprintln!("warning: open-file limit {limit} is below {per_process} users per process; use more --workers");
    }
    let opts = AggregateOptions {
        server_pids: args.server_pid.clone(),
        progress: !args.quiet,
    };
    let agg = if workers > 1 {
        run::run_parent(workers, opts).await?
    } else {
        let a = args.clone();
        run::run_single(opts, move |ctx| scenario(a, ctx)).await?
    };
    let latency = agg.latency.clone();
    let report = report::Report::build(&args, &args.scenario_name(), agg);
    println!("\n== fanout-loadtest ==");
    print!("{}", report.summary());
    if let Some(dir) = &args.report {
        report.write(dir, &latency)?;
        println!("report written to {}/report.json and report.html", dir.display());
    }
    if report.failed() {
        std::process::exit(1);
    }
    Ok(())
}
