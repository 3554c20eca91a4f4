//! The processes of a chaos run, all on loopback with private state: a
//! three-node NATS JetStream cluster, Redis, PostgreSQL (workshop schema),
//! two or more edges, a presence process and an ingester, each one a
//! [`Node`] that can be killed, drained and started again on its ports.

use std::time::Duration;

use anyhow::{Context, Result};
use fanout_tests::{Fanout, NatsCluster, Postgres, Redis, WORKSHOP_ROUTES, free_port};

/// The server-API key the run's publisher and probes use.
pub const API_KEY: &str = "chaos-api-key-0123456789abcdef";

/// Presence timing: heartbeats every second, a crashed edge's users gone
/// from `presence_state` after 3 s and announced gone within one more sweep.
pub const PRESENCE_HEARTBEAT_SECS: u64 = 1;
pub const PRESENCE_TTL_SECS: u64 = 3;
pub const PRESENCE_SWEEP_SECS: u64 = 1;
/// An edge's drain window on SIGTERM.
pub const DRAIN_SECS: u64 = 2;

/// One fanout process, restartable where its clients and scraper expect it.
pub struct Node {
    pub name: String,
    pub role: &'static str,
    pub port: Option<u16>,
    pub admin_port: u16,
    args: Vec<String>,
    proc: Option<Fanout>,
}

impl Node {
    fn new(name: String, role: &'static str, port: Option<u16>, args: Vec<String>) -> Self {
        Self {
            name,
            role,
            port,
            admin_port: free_port(),
            args,
            proc: None,
        }
    }

    pub async fn start(&mut self) -> Result<()> {
        let args: Vec<&str> = self.args.iter().map(String::as_str).collect();
        let p = Fanout::start_on(self.role, self.port, self.admin_port, &args, &[])
            .await
            .with_context(|| format!("starting {}", self.name))?;
        if self.role == "edge" {
            p.wait_ready(Duration::from_secs(30))
                .await
                .with_context(|| format!("{} ready", self.name))?;
        }
        self.proc = Some(p);
        Ok(())
    }

    /// SIGKILL.
    pub fn kill9(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.kill9();
        }
    }

    /// SIGTERM, then waits for the drain and the exit.
    pub async fn drain(&mut self) -> Result<()> {
        if let Some(mut p) = self.proc.take() {
            p.sigterm()?;
            let status = p.wait_exit(Duration::from_secs(DRAIN_SECS + 20)).await?;
            anyhow::ensure!(status.success(), "{} exited with {status} after SIGTERM", self.name);
        }
        Ok(())
    }
}

pub struct Cluster {
    pub nats: NatsCluster,
    pub redis: Redis,
    pub pg: Postgres,
    pub edges: Vec<Node>,
    pub api_ports: Vec<u16>,
    pub presence: Node,
    pub cdc: Node,
}

impl Cluster {
    /// Starts everything, with `workshops` workshop sessions in the database.
    pub async fn start(edges: usize, workshops: u32) -> Result<Self> {
        let nats = NatsCluster::start().await.context("the NATS cluster")?;
        let redis = Redis::start().await.context("Redis")?;
        let pg = Postgres::start().await.context("PostgreSQL")?;
        pg.apply_workshop_schema()?;
        pg.psql(&format!(
            "INSERT INTO workshop_sessions (id, title) SELECT g, 'chaos ' || g FROM generate_series(1, {workshops}) g"
        ))?;
        let nats_args = nats.fanout_args();
        let shared = |extra: &[&str]| -> Vec<String> {
            let mut v = nats_args.clone();
            v.extend(extra.iter().map(|s| (*s).to_owned()));
            v
        };
        let (heartbeat, ttl, sweep) = (
            PRESENCE_HEARTBEAT_SECS.to_string(),
            PRESENCE_TTL_SECS.to_string(),
            PRESENCE_SWEEP_SECS.to_string(),
        );
        let presence_timing = [
            "--presence-heartbeat-secs",
            heartbeat.as_str(),
            "--presence-ttl-secs",
            ttl.as_str(),
        ];
        let redis_url = redis.url();
        let pg_url = pg.url();
        let drain = DRAIN_SECS.to_string();
        let mut edge_nodes = Vec::new();
        let mut api_ports = Vec::new();
        for i in 0..edges {
            let api = free_port();
            let listen = format!("127.0.0.1:{api}");
            let mut extra = vec![
                "--redis-url",
                redis_url.as_str(),
                "--api-listen",
                listen.as_str(),
                "--api-keys",
                API_KEY,
                "--postgres-changes",
                "true",
                "--cdc-routes",
                WORKSHOP_ROUTES,
                "--drain-secs",
                drain.as_str(),
                "--history-max-messages",
                "1000000",
                "--history-max-age-secs",
                "7200",
                "--messages-per-second",
                "0",
                "--joins-per-second",
                "0",
            ];
            extra.extend(presence_timing);
            edge_nodes.push(Node::new(
                format!("edge-{i}"),
                "edge",
                Some(free_port()),
                shared(&extra),
            ));
            api_ports.push(api);
        }
        let grpc = format!("127.0.0.1:{}", free_port());
        let mut presence_extra = vec![
            "--redis-url",
            redis_url.as_str(),
            "--presence-grpc-listen",
            grpc.as_str(),
            "--presence-sweep-secs",
            sweep.as_str(),
        ];
        presence_extra.extend(presence_timing);
        let presence = Node::new("presence".into(), "presence", None, shared(&presence_extra));
        let cdc = Node::new(
            "cdc".into(),
            "cdc",
            None,
            shared(&["--database-url", pg_url.as_str(), "--cdc-routes", WORKSHOP_ROUTES]),
        );
        let mut me = Self {
            nats,
            redis,
            pg,
            edges: edge_nodes,
            api_ports,
            presence,
            cdc,
        };
        for e in &mut me.edges {
            e.start().await?;
        }
        me.presence.start().await?;
        me.cdc.start().await?;
        me.wait_cdc_active(Duration::from_secs(30)).await?;
        Ok(me)
    }

    /// Every fanout process: (name, role, admin port), for the scraper.
    pub fn targets(&self) -> Vec<(String, &'static str, u16)> {
        self.edges
            .iter()
            .chain([&self.presence, &self.cdc])
            .map(|n| (n.name.clone(), n.role, n.admin_port))
            .collect()
    }

    /// Waits until the ingester streams (its `fanout_cdc_active` is 1).
    pub async fn wait_cdc_active(&self, timeout: Duration) -> Result<()> {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            if let Ok((200, m)) = fanout_tests::http_get(self.cdc.admin_port, "/metrics").await
                && fanout_tests::metric_value(&m, "fanout_cdc_active") == 1.0
            {
                return Ok(());
            }
            anyhow::ensure!(
                std::time::Instant::now() < deadline,
                "the ingester did not stream within {timeout:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The edge holding the most WebSocket connections now (clients leave
    /// a drained or killed edge for the others, so a fixed choice could hit
    /// an empty one); `prefer` on a tie.
    pub async fn busiest_edge(&self, prefer: usize) -> usize {
        let mut best = (prefer, -1.0);
        for (i, e) in self.edges.iter().enumerate() {
            let n = match fanout_tests::http_get(e.admin_port, "/metrics").await {
                Ok((200, m)) => fanout_tests::metric_value(&m, "fanout_connections"),
                _ => continue,
            };
            if n > best.1 || (n == best.1 && i == prefer) {
                best = (i, n);
            }
        }
        best.0
    }

    /// The edges' WebSocket URLs.
    pub fn edge_urls(&self) -> Vec<String> {
        self.edges
            .iter()
            .map(|e| format!("ws://127.0.0.1:{}/realtime/v1", e.port.expect("an edge listens")))
            .collect()
    }
}
