//! `fanout`: the realtime fan-out server. One binary, one subcommand per
//! role; with no subcommand it runs `standalone`.

mod config;
mod process;
mod roles;

use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::Parser;
use fanout_bus::{Bus, MemoryBus, MemoryPresence, NatsBus, NatsConfig, PresenceStore, Retention};
use fanout_core::JwtVerifier;
use fanout_edge::{Edge, EdgeConfig};
use tokio::net::TcpListener;

use crate::config::{Config, ConfigErrors, Flags, Sources};
use crate::process::Process;
use crate::roles::Role;

/// jemalloc keeps memory per connection low: large buffers sit on their own
/// pages, so their untouched parts are never resident, and its size classes
/// waste less than glibc's on the many small per-connection objects.
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// EX_USAGE from sysexits.h: bad command line or configuration.
const EX_USAGE: u8 = 64;

#[derive(Parser, Debug)]
#[command(
    name = "fanout",
    version,
    about = "Self-hosted realtime pub/sub fan-out, compatible with Supabase Realtime clients",
    long_about = "fanout serves the Supabase Realtime protocol (Phoenix Channels, vsn 1.0.0 and 2.0.0) \
so an unmodified @supabase/realtime-js client can broadcast, track presence and resume after reconnects.\n\n\
Settings come from defaults, then the TOML file (--config / FANOUT_CONFIG), then FANOUT_* environment \
variables, then flags. Every flag below names its environment variable.",
    after_help = "With no subcommand, fanout runs `standalone`: everything in one process, in memory."
)]
struct Cli {
    #[command(subcommand)]
    role: Option<Role>,
    /// TOML config file [env: FANOUT_CONFIG].
    #[arg(long, global = true, value_name = "FILE")]
    config: Option<std::path::PathBuf>,
    // One flag per setting, built from the settings table.
    #[command(flatten)]
    flags: Flags,
}

fn load_config(cli: &Cli, role: Role) -> Result<Config, ConfigErrors> {
    let env = |k: &str| std::env::var(k).ok();
    let path = cli.config.clone().or_else(|| env("FANOUT_CONFIG").map(Into::into));
    let file = match path {
        Some(p) => Sources::read_file(&p)?,
        None => toml::Table::new(),
    };
    Config::load(
        &Sources {
            file,
            env: &env,
            flags: cli.flags.0.clone(),
        },
        role,
    )
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let role = cli.role.unwrap_or(Role::Standalone);
    let config = match load_config(&cli, role) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("fanout: {e}");
            return ExitCode::from(EX_USAGE);
        }
    };
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("fanout: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match role {
            Role::Standalone => standalone(config).await,
            Role::Edge => edge(config).await,
            Role::Presence => presence(config).await,
            Role::Cdc => cdc(config).await,
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("fanout: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Installs the Prometheus recorder, describes every crate's metrics, and
/// keeps its histograms fresh in a task of `process` until shutdown.
fn install_metrics(process: &Process) -> anyhow::Result<metrics_exporter_prometheus::PrometheusHandle> {
    use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(
            Matcher::Suffix("_seconds".into()),
            &[
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
            ],
        )
        .context("histogram buckets")?
        .install_recorder()
        .context("installing the metrics recorder")?;
    let upkeep = handle.clone();
    let shutdown = process.shutdown.clone();
    process.tasks.spawn(async move {
        let mut tick = tokio::time::interval(std::time::Duration::from_secs(5));
        loop {
            tokio::select! {
                _ = tick.tick() => upkeep.run_upkeep(),
                () = shutdown.cancelled() => break,
            }
        }
    });
    // Descriptions go to the installed recorder, so they come after it. Each
    // crate describes the metrics it emits; every role describes them all,
    // and the exporter shows a description only with a metric the process
    // emitted.
    fanout_edge::describe_metrics();
    fanout_bus::describe_metrics();
    fanout_cdc::describe_metrics();
    // fanout_presence::describe_metrics(); (added when the presence split lands)
    Ok(handle)
}

/// Raises the open-file soft limit to the hard limit: each client socket is
/// one file.
fn raise_nofile_limit() {
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(n) => tracing::debug!(limit = n, "open-file limit"),
        Err(e) => tracing::warn!(error = %e, "could not raise the open-file limit"),
    }
}

fn retention(config: &Config) -> Retention {
    Retention {
        max_messages: config.history_max_messages,
        max_age: config.history_max_age,
    }
}

async fn standalone(config: Config) -> anyhow::Result<()> {
    let bus = Arc::new(MemoryBus::new(retention(&config)));
    serve(config, bus, Role::Standalone).await
}

fn nats_config(config: &Config) -> NatsConfig {
    NatsConfig {
        urls: config.nats_urls.clone(),
        credentials_file: config.nats_credentials_file.clone(),
        user: None,
        tls_required: config.nats_tls_required,
        shards: config.nats_shards,
        streams: config.nats_streams,
        replicas: config.nats_replicas,
        subscription_capacity: config.nats_subscription_capacity,
        retention: retention(config),
    }
}

async fn connect_nats(config: &Config) -> anyhow::Result<NatsBus> {
    let nats = nats_config(config);
    tracing::info!(urls = ?nats.urls, shards = nats.shards, streams = nats.streams, "connecting to NATS");
    NatsBus::connect(nats).await.context("setting up NATS JetStream")
}

/// Connects to Redis, retrying until it answers or shutdown.
async fn connect_redis(url: &str, process: &Process) -> anyhow::Result<redis::aio::ConnectionManager> {
    let mut delay = std::time::Duration::from_millis(200);
    loop {
        match fanout_presence::connect(url).await {
            Ok(c) => return Ok(c),
            Err(e) => tracing::warn!(error = %e, "Redis not reachable yet; retrying"),
        }
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            () = process.shutdown.cancelled() => anyhow::bail!("shut down before Redis answered"),
        }
        delay = (delay * 2).min(std::time::Duration::from_secs(5));
    }
}

fn timing(config: &Config) -> fanout_presence::Timing {
    fanout_presence::Timing {
        heartbeat: config.presence_heartbeat,
        ttl: config.presence_ttl,
    }
}

async fn edge(config: Config) -> anyhow::Result<()> {
    let bus = connect_nats(&config).await?;
    serve(config, Arc::new(bus), Role::Edge).await
}

/// The start shared by the roles without a public listener (`presence`,
/// `cdc`): the process (cancelled on SIGTERM/SIGINT from here on), the
/// metrics recorder and the bound admin listener.
async fn start_admin_only(
    config: &Config,
) -> anyhow::Result<(Process, metrics_exporter_prometheus::PrometheusHandle, TcpListener)> {
    let process = Process::new();
    let metrics = install_metrics(&process)?;
    let admin = TcpListener::bind(config.admin_listen)
        .await
        .with_context(|| format!("binding the admin listener on {}", config.admin_listen))?;
    process.cancel_on_signal();
    Ok((process, metrics, admin))
}

/// Serves the admin endpoints of an admin-only role in a task of `process`,
/// ready while `bus` is.
fn spawn_admin(
    process: &Process,
    admin: TcpListener,
    metrics: metrics_exporter_prometheus::PrometheusHandle,
    bus: Arc<dyn Bus>,
) {
    process.tasks.spawn(fanout_edge::http::serve_admin(
        admin,
        Some(metrics),
        Arc::new(move || bus.is_ready()),
        process.shutdown.clone(),
    ));
}

/// The presence role: sweeps crashed edges' presences, serves the admin
/// endpoints.
async fn presence(config: Config) -> anyhow::Result<()> {
    let (process, metrics, admin) = start_admin_only(&config).await?;
    let bus: Arc<dyn Bus> = Arc::new(connect_nats(&config).await?);
    let redis = connect_redis(config.redis_url.as_deref().unwrap_or_default(), &process).await?;
    let sweeper = fanout_presence::Sweeper::new(redis.clone(), bus.clone(), config.presence_sweep);
    let grpc = tokio::net::TcpListener::bind(config.presence_grpc_listen)
        .await
        .with_context(|| format!("binding the gRPC listener on {}", config.presence_grpc_listen))?;
    tracing::info!(
        admin = %admin.local_addr()?,
        grpc = %grpc.local_addr()?,
        sweep = ?config.presence_sweep,
        "fanout presence running"
    );
    let grpc_server = tonic::transport::Server::builder()
        .add_service(fanout_presence::PresenceApi::new(redis).into_service())
        .serve_with_incoming_shutdown(
            tokio_stream::wrappers::TcpListenerStream::new(grpc),
            process.shutdown.clone().cancelled_owned(),
        );
    process.tasks.spawn(async move {
        if let Err(e) = grpc_server.await {
            tracing::warn!(error = %e, "gRPC server ended with an error");
        }
    });
    spawn_admin(&process, admin, metrics, bus.clone());
    sweeper.run(process.shutdown.clone()).await;
    process.shut_down(config.shutdown_grace).await;
    tracing::info!("fanout presence stopped");
    Ok(())
}

fn cdc_config(config: &Config) -> Option<fanout_cdc::CdcConfig> {
    let mut c = fanout_cdc::CdcConfig::new(config.database_url.clone()?);
    c.publication = config.cdc_publication.clone();
    c.slot = config.cdc_slot.clone();
    c.routes = Arc::new(config.cdc_routes.clone());
    c.max_record_bytes = config.cdc_max_record_bytes;
    c.stop_grace = config.shutdown_grace;
    Some(c)
}

/// The change-data-capture role: one streams the slot, others stand by.
async fn cdc(config: Config) -> anyhow::Result<()> {
    let (process, metrics, admin) = start_admin_only(&config).await?;
    let bus: Arc<dyn Bus> = Arc::new(connect_nats(&config).await?);
    spawn_admin(&process, admin, metrics, bus.clone());
    let cdc = cdc_config(&config).context("database URL")?;
    tracing::info!(slot = %cdc.slot, publication = %cdc.publication, "fanout cdc starting");
    let result = fanout_cdc::run(cdc, bus, process.shutdown.clone()).await;
    // The ingester ends on shutdown or on a fatal error; either way the
    // admin listener stops with it.
    process.shut_down(config.shutdown_grace).await;
    result.context("change stream")?;
    tracing::info!("fanout cdc stopped");
    Ok(())
}

/// Pending connections the public listener's accept queue holds: a burst of
/// reconnecting clients (an edge drained or crashed) must not overflow it,
/// or their SYNs are dropped and retried a second later. The kernel caps it
/// at `net.core.somaxconn`.
const ACCEPT_BACKLOG: u32 = 4096;

/// Binds `addr` with [`ACCEPT_BACKLOG`] (tokio's `bind` uses a smaller one).
fn bind_with_backlog(addr: std::net::SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(ACCEPT_BACKLOG)
}

/// Binds the listeners and serves until SIGTERM/SIGINT.
async fn serve(config: Config, bus: Arc<dyn Bus>, role: Role) -> anyhow::Result<()> {
    raise_nofile_limit();
    let process = Process::new();
    let metrics = install_metrics(&process)?;
    let public = bind_with_backlog(config.listen)
        .with_context(|| format!("binding the public listener on {}", config.listen))?;
    let admin = TcpListener::bind(config.admin_listen)
        .await
        .with_context(|| format!("binding the admin listener on {}", config.admin_listen))?;
    let auth = match &config.jwt_secret {
        Some(secret) => Some(JwtVerifier::hs256(secret.as_bytes())),
        None => {
            tracing::warn!(
                "INSECURE DEV MODE: no JWT secret configured (FANOUT_JWT_SECRET); any client may connect. \
                 Loopback only. Never run this way in production."
            );
            None
        }
    };
    let edge_config = EdgeConfig {
        auth,
        limits: config.limits.clone(),
        channel_linger: config.channel_linger,
        drain_window: config.drain_window,
        changes: config.postgres_changes.then(|| Arc::new(config.cdc_routes.clone())),
        ..EdgeConfig::default()
    };
    let node = Edge::random_node();
    let presence: Arc<dyn PresenceStore> = match (&config.redis_url, role) {
        (Some(url), Role::Edge) => {
            let conn = connect_redis(url, &process).await?;
            fanout_presence::RedisPresence::start(conn, node, timing(&config), process.shutdown.clone())
        }
        (None, Role::Edge) => {
            tracing::warn!(
                "no --redis-url: presence is kept per edge (users on other edges are not in presence_state)"
            );
            Arc::new(MemoryPresence::new(node))
        }
        _ => Arc::new(MemoryPresence::new(node)),
    };
    if role == Role::Standalone
        && let Some(cdc) = cdc_config(&config)
    {
        // The in-process ingester: a setup problem is logged and leaves the
        // rest of the server running.
        let (bus, shutdown) = (bus.clone(), process.shutdown.clone());
        process.tasks.spawn(async move {
            if let Err(e) = fanout_cdc::run(cdc, bus, shutdown).await {
                tracing::error!("change stream stopped: {e}");
            }
        });
    }
    let edge = Edge::new(
        edge_config,
        node,
        bus,
        presence,
        Some(metrics),
        process.shutdown.clone(),
    );
    tracing::info!(
        public = %public.local_addr()?,
        admin = %admin.local_addr()?,
        "fanout {role} listening (demo page at http://{}/)",
        public.local_addr()?
    );
    process.cancel_on_signal();
    fanout_edge::http::serve(edge, public, admin, config.drain_window + config.shutdown_grace).await;
    // The edge's own tasks are done (or their grace is over); what is left
    // are the process's: the ingester and the metrics upkeep, which watch
    // the same token and stop along with the edge.
    process.shut_down(config.shutdown_grace).await;
    tracing::info!("fanout stopped");
    Ok(())
}
