//! The roles of the binary, one subcommand each, and what they share: NATS,
//! the change-stream settings, and the start of the roles that serve only
//! the admin endpoints.

mod cdc;
mod edge;
mod presence;

use std::sync::Arc;

use anyhow::Context;
use fanout_bus::{Bus, NatsBus, NatsConfig, Retention};
use fanout_core::metric::Metric;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpListener;

use crate::config::Config;
use crate::process::Process;

/// What a `fanout` process runs.
#[derive(clap::Subcommand, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Everything in one process with an in-memory bus and presence (the default).
    Standalone,
    /// A stateless edge of a cluster: events go through NATS JetStream (needs --nats-url;
    /// with --redis-url, presence is shared through Redis).
    Edge,
    /// The presence role: expires crashed edges' users from Redis and announces their
    /// leaves (needs --nats-url and --redis-url; run one or more).
    Presence,
    /// The change-data-capture ingester: PostgreSQL changes into JetStream (needs
    /// --database-url and --nats-url; run two for failover: one streams, the other waits).
    Cdc,
}

impl Role {
    /// The metrics this role emits with `config`, by crate: registered at
    /// zero when it starts, so its first scrape shows every one of them.
    pub fn metrics(self, config: &Config) -> Vec<&'static [Metric]> {
        let mut tables = match self {
            // The memory bus and presence emit nothing of their own.
            Self::Standalone if config.database_url.is_some() => vec![fanout_edge::METRICS, fanout_cdc::METRICS],
            Self::Standalone => vec![fanout_edge::METRICS],
            Self::Edge if config.redis_url.is_some() => {
                vec![
                    fanout_edge::METRICS,
                    fanout_bus::METRICS,
                    fanout_presence::STORE_METRICS,
                ]
            }
            Self::Edge => vec![fanout_edge::METRICS, fanout_bus::METRICS],
            Self::Presence => vec![fanout_bus::METRICS, fanout_presence::SWEEPER_METRICS],
            Self::Cdc => vec![fanout_bus::METRICS, fanout_cdc::METRICS],
        };
        if self.serves_api(config) {
            tables.push(fanout_api::METRICS);
        }
        tables
    }

    /// Whether the role serves the server API: the roles that hold client
    /// sockets do, when API keys are configured.
    pub fn serves_api(self, config: &Config) -> bool {
        matches!(self, Self::Standalone | Self::Edge) && !config.api_keys.is_empty()
    }

    /// The subcommand's name.
    pub fn name(self) -> &'static str {
        match self {
            Self::Standalone => "standalone",
            Self::Edge => "edge",
            Self::Presence => "presence",
            Self::Cdc => "cdc",
        }
    }

    /// Runs the role with a configuration already checked for it, until
    /// SIGTERM/SIGINT (or a fatal error).
    pub async fn run(self, config: Config) -> anyhow::Result<()> {
        match self {
            Self::Standalone => edge::standalone(config).await,
            Self::Edge => edge::edge(config).await,
            Self::Presence => presence::run(config).await,
            Self::Cdc => cdc::run(config).await,
        }
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

fn retention(config: &Config) -> Retention {
    Retention {
        max_messages: config.history_max_messages,
        max_age: config.history_max_age,
    }
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
        ephemeral: config.ephemeral.clone(),
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

/// The ingester's settings, `None` without a database URL.
fn cdc_config(config: &Config) -> Option<fanout_cdc::CdcConfig> {
    let mut c = fanout_cdc::CdcConfig::new(config.database_url.clone()?);
    c.publication = config.cdc_publication.clone();
    c.slot = config.cdc_slot.clone();
    c.routes = Arc::new(config.cdc_routes.clone());
    c.max_record_bytes = config.cdc_max_record_bytes;
    c.stop_grace = config.shutdown_grace;
    c.memberships = config.policy.memberships.values().cloned().collect();
    Some(c)
}

/// The membership bucket on NATS, when membership sets are configured:
/// the cdc role writes it, edges watch it into their mirror.
async fn open_members(
    config: &Config,
    nats: &NatsBus,
    shutdown: &tokio_util::sync::CancellationToken,
) -> anyhow::Result<Option<Arc<fanout_bus::NatsMembers>>> {
    if config.policy.memberships.is_empty() {
        return Ok(None);
    }
    let members = fanout_bus::NatsMembers::open(nats, shutdown.clone())
        .await
        .context("opening the membership bucket on NATS JetStream")?;
    Ok(Some(members))
}

async fn bind_admin(config: &Config) -> anyhow::Result<TcpListener> {
    TcpListener::bind(config.admin_listen)
        .await
        .with_context(|| format!("binding the admin listener on {}", config.admin_listen))
}

/// A role without a public listener (`presence`, `cdc`), started: its
/// process (cancelled on SIGTERM/SIGINT from here on), the metrics recorder
/// and the bound admin listener.
struct AdminOnly {
    process: Process,
    metrics: PrometheusHandle,
    admin: TcpListener,
}

impl AdminOnly {
    async fn start(config: &Config, role: Role) -> anyhow::Result<Self> {
        let process = Process::new();
        let metrics = crate::recorder::install(&process, &role.metrics(config))?;
        let admin = bind_admin(config).await?;
        process.cancel_on_signal();
        Ok(Self {
            process,
            metrics,
            admin,
        })
    }

    /// Serves the admin endpoints in a task of the process, ready while
    /// `bus` is.
    fn serve_admin(self, bus: Arc<dyn Bus>) -> Process {
        self.process.tasks.spawn(fanout_edge::http::serve_admin(
            self.admin,
            Some(self.metrics),
            Arc::new(move || bus.is_ready()),
            self.process.shutdown.clone(),
        ));
        self.process
    }
}
