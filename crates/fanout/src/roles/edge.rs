//! The roles that hold client sockets: `standalone` (everything in memory,
//! with the ingester in-process when a database URL is set) and `edge` (a
//! cluster edge over NATS, with Redis presence when configured).

use std::sync::Arc;

use anyhow::Context;
use fanout_bus::{
    Bus, Control, MemberStore, MemoryBus, MemoryControl, MemoryMembers, MemoryPresence, NatsControl, PresenceStore,
};
use fanout_edge::{Edge, EdgeConfig};
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpListener;

use super::{Role, bind_admin, cdc_config, connect_nats, connect_redis, open_members, retention};
use crate::config::Config;
use crate::process::Process;

pub async fn standalone(config: Config) -> anyhow::Result<()> {
    let bus: Arc<dyn Bus> = Arc::new(MemoryBus::new(retention(&config)).with_ephemeral(config.ephemeral.clone()));
    let mut start = Start::bind(&config, Role::Standalone).await?;
    let node = Edge::random_node();
    // Membership sets live in memory, written by the in-process ingester.
    let members = (!config.policy.memberships.is_empty()).then(MemoryMembers::new);
    if let Some(members) = &members {
        start.edge_config.members = members.mirror();
        if config.database_url.is_none() {
            tracing::warn!("auth.memberships is set but no database.url: the membership sets stay empty");
        }
    }
    if let Some(mut cdc) = cdc_config(&config) {
        cdc.members = members.map(|m| m as Arc<dyn MemberStore>);
        // The in-process ingester: a setup problem is logged and leaves the
        // rest of the server running.
        let (bus, shutdown) = (bus.clone(), start.process.shutdown.clone());
        start.process.tasks.spawn(async move {
            if let Err(e) = fanout_cdc::run(cdc, bus, shutdown).await {
                tracing::error!("change stream stopped: {e}");
            }
        });
    }
    let presence = Arc::new(MemoryPresence::new(node));
    let seams = Seams {
        bus,
        presence,
        control: Arc::new(MemoryControl::default()),
    };
    start.serve(&config, Role::Standalone, seams, node).await
}

pub async fn edge(config: Config) -> anyhow::Result<()> {
    let nats = connect_nats(&config).await?;
    let client = nats.client();
    let mut start = Start::bind(&config, Role::Edge).await?;
    if let Some(members) = open_members(&config, &nats, &start.process.shutdown).await? {
        start.edge_config.members = members.mirror();
    }
    start
        .process
        .tasks
        .spawn(nats.watch_stream_health(start.process.shutdown.clone()));
    let bus: Arc<dyn Bus> = Arc::new(nats);
    let control: Arc<dyn Control> = Arc::new(
        NatsControl::new(client, start.process.shutdown.clone())
            .await
            .context("subscribing to the control subjects on NATS")?,
    );
    let node = Edge::random_node();
    let presence: Arc<dyn PresenceStore> = match &config.redis_url {
        Some(url) => {
            let conn = connect_redis(url, &start.process).await?;
            fanout_presence::RedisPresence::start(
                conn,
                node,
                timing(&config),
                start.process.shutdown.clone(),
                &start.process.tasks,
            )
        }
        None => {
            tracing::warn!(
                "no --redis-url: presence is kept per edge (users on other edges are not in presence_state)"
            );
            Arc::new(MemoryPresence::new(node))
        }
    };
    let seams = Seams { bus, presence, control };
    start.serve(&config, Role::Edge, seams, node).await
}

/// What an edge role plugs in: the bus, the presence store and the control.
struct Seams {
    bus: Arc<dyn Bus>,
    presence: Arc<dyn PresenceStore>,
    control: Arc<dyn Control>,
}

fn timing(config: &Config) -> fanout_presence::Timing {
    fanout_presence::Timing {
        heartbeat: config.presence_heartbeat,
        ttl: config.presence_ttl,
    }
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

/// An edge role up to the choice of its bus and presence: the process, the
/// metrics recorder, both listeners bound and the edge's settings.
struct Start {
    process: Process,
    metrics: PrometheusHandle,
    public: TcpListener,
    admin: TcpListener,
    /// The server API's listener, when API keys are set.
    api: Option<TcpListener>,
    edge_config: EdgeConfig,
}

impl Start {
    async fn bind(config: &Config, role: Role) -> anyhow::Result<Self> {
        raise_nofile_limit();
        let process = Process::new();
        let metrics = crate::recorder::install(&process, &role.metrics(config))?;
        let public = bind_with_backlog(config.listen)
            .with_context(|| format!("binding the public listener on {}", config.listen))?;
        let admin = bind_admin(config).await?;
        let api = if role.serves_api(config) {
            Some(
                TcpListener::bind(config.api_listen)
                    .await
                    .with_context(|| format!("binding the server API listener on {}", config.api_listen))?,
            )
        } else {
            None
        };
        // The JWKS document is read (fetched) now, so an edge that cannot
        // verify tokens does not start; then it is refreshed in the background.
        let jwks = match &config.auth.jwks {
            Some(source) => {
                let keys = Arc::new(fanout_core::auth::JwksKeys::default());
                let n = fanout_edge::jwks::refresh(source, &keys)
                    .await
                    .context("loading the JWKS document (auth.jwks)")?;
                tracing::info!(keys = n, "JWKS loaded");
                process.tasks.spawn(fanout_edge::jwks::run_refresher(
                    source.clone(),
                    keys.clone(),
                    config.auth.jwks_refresh,
                    process.shutdown.clone(),
                ));
                Some(keys)
            }
            None => None,
        };
        let auth = config
            .auth
            .verifier(config.jwt_secret.as_deref(), jwks)
            .context("loading the token keys")?;
        if auth.is_none() {
            tracing::warn!(
                "INSECURE DEV MODE: no JWT secret configured (FANOUT_JWT_SECRET); any client may connect. \
                 Loopback only. Never run this way in production."
            );
        }
        let edge_config = EdgeConfig {
            auth,
            limits: config.limits.clone(),
            channel_linger: config.channel_linger,
            drain_window: config.drain_window,
            changes: config.postgres_changes.then(|| Arc::new(config.cdc_routes.clone())),
            policy: Arc::new(config.policy.clone()),
            api_port: api.as_ref().map(|l| l.local_addr().map(|a| a.port())).transpose()?,
            socketio: config.socketio.clone(),
            ..EdgeConfig::default()
        };
        Ok(Self {
            process,
            metrics,
            public,
            admin,
            api,
            edge_config,
        })
    }

    /// Serves an edge over its `seams` until SIGTERM/SIGINT, then
    /// waits for the edge's tasks (in `http::serve`) and the process's.
    async fn serve(self, config: &Config, role: Role, seams: Seams, node: u64) -> anyhow::Result<()> {
        let Seams { bus, presence, control } = seams;
        let Self {
            process,
            metrics,
            public,
            admin,
            api,
            edge_config,
        } = self;
        let edge = Edge::new(
            edge_config,
            node,
            bus,
            presence,
            Some(metrics),
            process.shutdown.clone(),
        );
        // Every edge answers the API's cluster commands, whether or not it
        // serves the API itself.
        control
            .serve(format!("{node:016x}"), edge.commands(), process.shutdown.clone())
            .await
            .context("serving control commands")?;
        if let Some(listener) = api {
            tracing::info!(api = %listener.local_addr()?, keys = config.api_keys.len(), "server API listening");
            let api = fanout_api::Api::new(
                edge.bus.clone(),
                edge.presence.clone(),
                control,
                config.api_keys.clone(),
                config.limits.max_frame_bytes,
            );
            process.tasks.spawn(fanout_api::http::serve(
                listener,
                Arc::new(api),
                process.shutdown.clone(),
                process.tasks.clone(),
            ));
        } else {
            tracing::info!("server API off: no API keys (FANOUT_API_KEYS or api.keys_file)");
        }
        tracing::info!(
            public = %public.local_addr()?,
            admin = %admin.local_addr()?,
            "fanout {role} listening (demo page at http://{}/)",
            public.local_addr()?
        );
        process.cancel_on_signal();
        fanout_edge::http::serve(edge, public, admin, config.drain_window + config.shutdown_grace).await;
        // The edge's own tasks are done (or their grace is over); what is
        // left are the process's: the ingester and the metrics upkeep, which
        // watch the same token and stop along with the edge.
        process.shut_down(config.shutdown_grace).await;
        tracing::info!("fanout stopped");
        Ok(())
    }
}

/// Raises the open-file soft limit to the hard limit: each client socket is
/// one file.
fn raise_nofile_limit() {
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(n) => tracing::debug!(limit = n, "open-file limit"),
        Err(e) => tracing::warn!(error = %e, "could not raise the open-file limit"),
    }
}
