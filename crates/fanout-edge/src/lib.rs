//! The fanout edge: the process that holds client WebSockets.
//!
//! An edge terminates WebSockets (hyper + fastwebsockets), speaks the
//! Supabase Realtime protocol (Phoenix Channels, vsn 1.0.0 and 2.0.0), and
//! fans each channel event out to its local sockets. It is stateless: what it
//! shares with other edges goes through the two seams of `fanout-bus`, the
//! [`Bus`] (events) and the [`PresenceStore`] (who is online). Standalone mode plugs
//! in the in-memory implementations; cluster mode plugs in NATS and Redis.
//!
//! # Layout
//! - [`http`]: the public listener (WebSocket, REST broadcast, demo page)
//!   and the admin listener (`/metrics`, `/healthz`, `/readyz`).
//! - `conn`: one task per connection: decode, apply limits, act.
//! - [`protocol`]: the Supabase Realtime codecs; [`sio`]: the Socket.IO
//!   front (Engine.IO v4 + Socket.IO v5, its own connection task);
//!   `room`: the plain WebSocket room front (`/rooms/<room>`);
//!   [`wire`]: how each member's protocol frames an event; [`frame`]:
//!   pre-encoded server frames.
//! - [`hub`]: one task per channel with local members; encodes each event
//!   once per protocol version and writes the shared bytes to every member.
//! - [`writer`]: the per-connection write path with its bounded queue.
//! - [`control`]: the edge's answers to cluster commands (channels,
//!   disconnect, unsubscribe) from the server API.
//! - `fuzzing` (cargo feature `fuzzing`, for `fuzz/` only): the private
//!   parsers the fuzz targets drive (frames, REST body, join bindings).
//!
//! # What it does not do
//! The edge never talks to Postgres and keeps no durable state: a restarted
//! edge loses nothing that clients cannot get back by rejoining (with
//! `config.resume` for history).

pub mod admission;
mod conn;
pub mod control;
use fanout_core::metric::Metric;

pub mod frame;
#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub mod fuzzing;
pub mod http;
pub mod hub;
pub mod jwks;
pub mod protocol;
mod ratelimit;
mod reader;
mod room;
pub mod sio;
pub mod wire;
pub mod writer;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use fanout_core::policy::Policy;
use fanout_core::{JwtVerifier, Limits};
use metrics_exporter_prometheus::PrometheusHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::hub::Hub;
use fanout_bus::{Bus, PresenceStore};

/// Edge settings (the binary builds them from file, environment and flags).
#[derive(Debug, Clone)]
pub struct EdgeConfig {
    /// `None` runs without authentication (insecure dev mode; the binary
    /// only allows it on loopback).
    pub auth: Option<JwtVerifier>,
    pub limits: Limits,
    /// How long a channel with no local members keeps its bus subscription.
    pub channel_linger: Duration,
    /// On shutdown, client sockets are closed at random moments spread over
    /// this window, so reconnections spread over the other edges.
    pub drain_window: Duration,
    /// `postgres_changes` routing, `None` when no change stream runs (joins
    /// with `postgres_changes` bindings are then refused).
    pub changes: Option<Arc<fanout_core::changes::Routes>>,
    /// How long a join waits for the change feeds it needs to go live.
    pub feed_timeout: Duration,
    /// Channel and row policies, enforced when `auth` is set.
    pub policy: Arc<Policy>,
    /// The port of the server API, when this process serves it: the
    /// operator's page (`/admin` on the admin listener) calls it there.
    pub api_port: Option<u16>,
    /// The Socket.IO endpoint (`/socket.io/`).
    pub socketio: sio::SocketIoConfig,
    /// The membership sets `member.<set>` rules read (empty without
    /// `auth.memberships`): the in-process store's mirror standalone, the
    /// watched bucket's in a cluster.
    pub members: Arc<fanout_bus::MemberMirror>,
}

impl Default for EdgeConfig {
    fn default() -> Self {
        Self {
            auth: None,
            limits: Limits::default(),
            channel_linger: Duration::from_secs(2),
            drain_window: Duration::ZERO,
            changes: None,
            feed_timeout: Duration::from_secs(10),
            policy: Arc::default(),
            api_port: None,
            socketio: sio::SocketIoConfig::default(),
            members: fanout_bus::MemberMirror::new(),
        }
    }
}

/// One edge's shared state.
pub struct Edge {
    pub config: EdgeConfig,
    /// Random per process start; tells this edge's connections apart from
    /// other edges' in event origins.
    pub node: u64,
    pub hub: Hub,
    pub bus: Arc<dyn Bus>,
    pub presence: Arc<dyn PresenceStore>,
    metrics: Option<PrometheusHandle>,
    next_conn: AtomicU64,
    admission: Arc<admission::Admission>,
    /// Every connection's control mailbox, for disconnect and unsubscribe.
    pub(crate) sessions: control::Sessions,
    /// Socket.IO sessions on HTTP long-polling.
    pub(crate) polling: sio::polling::Registry,
    draining: AtomicBool,
    /// Every task the edge starts, so shutdown can wait for them.
    pub tasks: TaskTracker,
    /// Cancelled when the edge must stop.
    pub shutdown: CancellationToken,
}

impl std::fmt::Debug for Edge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Edge")
            .field("node", &self.node)
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl Edge {
    /// A fresh random node id, for [`Edge::new`] and the presence store.
    pub fn random_node() -> u64 {
        rand::random()
    }

    /// Builds an edge over the given seams; `node` identifies this process
    /// in event origins and presence entries ([`Edge::random_node`]). `metrics` renders `/metrics`
    /// (the binary installs the global recorder once).
    pub fn new(
        config: EdgeConfig,
        node: u64,
        bus: Arc<dyn Bus>,
        presence: Arc<dyn PresenceStore>,
        metrics: Option<PrometheusHandle>,
        shutdown: CancellationToken,
    ) -> Arc<Self> {
        let tasks = TaskTracker::new();
        // Membership sets configured: changes wait for the mirror, and
        // users whose memberships change have their channels re-decided.
        let members = (!config.policy.memberships.is_empty()).then(|| config.members.clone());
        let follow = members.is_some();
        let hub = Hub::new(
            bus.clone(),
            presence.clone(),
            members,
            config.channel_linger,
            tasks.clone(),
            shutdown.clone(),
        );
        let admission = Arc::new(admission::Admission::new(&config.limits));
        let edge = Arc::new(Self {
            node,
            config,
            hub,
            bus,
            presence,
            metrics,
            next_conn: AtomicU64::new(1),
            admission,
            sessions: control::Sessions::default(),
            polling: sio::polling::Registry::default(),
            draining: AtomicBool::new(false),
            tasks,
            shutdown,
        });
        if follow {
            edge.tasks.spawn(control::follow_memberships(
                Arc::downgrade(&edge),
                edge.shutdown.clone(),
            ));
        }
        edge
    }

    pub(crate) fn next_conn_id(&self) -> u64 {
        self.next_conn.fetch_add(1, Ordering::Relaxed)
    }

    /// Reserves a connection slot for a client at `ip` as `sub`, or says
    /// which limit it would cross ([`admission`]).
    fn admit(&self, ip: Option<std::net::IpAddr>, sub: Option<&str>) -> Result<admission::Slot, admission::Refusal> {
        self.admission.admit(ip, sub)
    }

    /// Stamps `ev` with the sender's `sub` when the policy asks for it
    /// (and a key is configured), for client and REST broadcasts alike.
    /// Refused when the `sub` would not fit the 255-byte `meta` of a vsn
    /// 2.0.0 frame; the message is the refusal's reason.
    pub(crate) fn stamp_sender(&self, ev: &mut fanout_core::Event, sub: Option<&str>) -> Result<(), String> {
        if self.config.auth.is_none() || !self.config.policy.stamp_sender {
            return Ok(());
        }
        match sub {
            Some(sub) if sub.len() > MAX_STAMPED_SUB => Err(format!(
                "cannot stamp the sender: sub is longer than {MAX_STAMPED_SUB} bytes"
            )),
            sub => {
                ev.sender = sub.map(Arc::from);
                Ok(())
            }
        }
    }

    /// The edge's answers to cluster commands, for
    /// [`fanout_bus::Control::serve`].
    pub fn commands(self: &Arc<Self>) -> Arc<dyn fanout_bus::CommandHandler> {
        Arc::new(control::EdgeCommands::new(self))
    }

    /// Open client connections.
    pub fn connection_count(&self) -> usize {
        self.admission.count()
    }

    /// Ready to take traffic: not draining and the bus is reachable.
    pub fn is_ready(&self) -> bool {
        !self.draining.load(Ordering::Acquire) && !self.shutdown.is_cancelled() && self.bus.is_ready()
    }

    /// A random delay within the drain window.
    async fn drain_delay(&self) {
        self.draining.store(true, Ordering::Release);
        let window = self.config.drain_window;
        if !window.is_zero() {
            let ms = rand::random_range(0..window.as_millis().max(1) as u64);
            tokio::time::sleep(Duration::from_millis(ms)).await;
        }
    }
}

/// The longest `sub` stamped into a broadcast's `meta` (which a vsn 2.0.0
/// frame limits to 255 bytes).
const MAX_STAMPED_SUB: usize = 128;

/// Every metric the edge emits, for the binary to describe and register
/// at zero when it installs the recorder (see [`fanout_core::metric`]).
pub const METRICS: &[Metric] = &[
    Metric::gauge("fanout_connections", "Open client WebSocket connections."),
    Metric::counter(
        "fanout_members_rechecks_total",
        "Connections told to re-decide their private channels after a membership change.",
    ),
    Metric::histogram(
        "fanout_members_wait_seconds",
        "Time a batch of database changes waited for the membership mirror to reach its revision.",
    ),
    Metric::counter(
        "fanout_members_wait_timeouts_total",
        "Batches delivered before the membership mirror reached their revision (the wait is bounded).",
    ),
    Metric::counter(
        "fanout_connections_opened_total",
        "Client WebSocket connections accepted.",
    ),
    Metric::counter(
        "fanout_connections_closed_total",
        "Client connections closed, by reason.",
    )
    .labelled("reason", frame::CLOSE_LABELS),
    Metric::counter(
        "fanout_accept_errors_total",
        "Failed accepts on the public or admin listener (e.g. out of file descriptors).",
    ),
    Metric::counter(
        "fanout_handshake_rejections_total",
        "WebSocket handshakes refused, by reason.",
    )
    .labelled(
        "reason",
        &[
            "unauthorized",
            "bad_request",
            "draining",
            "too_many",
            "too_many_per_ip",
            "too_many_per_sub",
            "origin",
        ],
    ),
    Metric::counter(
        "fanout_handshake_timeouts_total",
        "HTTP connections closed because a request (a handshake) did not arrive whole in time.",
    ),
    Metric::counter(
        "fanout_socketio_connections_total",
        "Socket.IO (Engine.IO over WebSocket) connections accepted.",
    ),
    Metric::counter(
        "fanout_socketio_polling_sessions_total",
        "Socket.IO sessions opened over HTTP long-polling.",
    ),
    Metric::counter(
        "fanout_socketio_upgrades_total",
        "Socket.IO polling sessions upgraded to WebSocket.",
    ),
    Metric::counter(
        "fanout_room_connections_total",
        "Room (/rooms/<room>) WebSocket connections accepted.",
    ),
    Metric::gauge("fanout_channels", "Channels with a running fan-out task on this node."),
    Metric::gauge(
        "fanout_channel_members",
        "Channel memberships (connection x channel) on this node.",
    ),
    Metric::counter("fanout_joins_total", "Channel joins accepted."),
    Metric::counter("fanout_client_messages_total", "Client messages decoded and handled."),
    Metric::counter("fanout_client_errors_total", "Client messages refused, by reason.")
        .labelled("reason", conn::CLIENT_ERROR_LABELS),
    Metric::counter(
        "fanout_broadcasts_published_total",
        "Broadcasts from client sockets handed to the bus.",
    ),
    Metric::counter(
        "fanout_rest_broadcasts_total",
        "REST broadcast requests whose events are all on the bus.",
    ),
    Metric::counter(
        "fanout_bus_publish_errors_total",
        "Broadcasts and presence diffs the bus did not accept.",
    ),
    Metric::counter(
        "fanout_messages_delivered_total",
        "Frames handed to client sockets by the fan-out.",
    ),
    Metric::histogram(
        "fanout_publish_to_dispatch_seconds",
        "Time from publish to the start of local fan-out.",
    ),
    Metric::histogram(
        "fanout_shard_write_seconds",
        "Time from a batch's dispatch until a shard (up to 256 members) finished writing it.",
    ),
    Metric::counter(
        "fanout_slow_consumer_disconnects_total",
        "Connections closed because their outbound queue was full.",
    ),
    Metric::counter(
        "fanout_token_expirations_total",
        "Connections whose access token expired (their channels were closed).",
    ),
    Metric::counter(
        "fanout_replayed_messages_total",
        "Events replayed to members that joined with resume.",
    ),
    Metric::counter(
        "fanout_resync_required_total",
        "Resumes from a position no longer in history (the member was told to resync).",
    ),
    Metric::gauge(
        "fanout_jwks_keys",
        "Signing keys in the JWKS document (auth.jwks) the edge verifies with.",
    ),
    Metric::counter(
        "fanout_jwks_refreshes_total",
        "Fetches of the JWKS document, by result (an error keeps the keys from before).",
    )
    .labelled("result", &["ok", "error"]),
    Metric::counter(
        "fanout_row_policy_errors_total",
        "Row rules that could not be evaluated on a change (missing column, wrong type): only that binding skipped it.",
    ),
    Metric::counter(
        "fanout_change_filter_errors_total",
        "postgres_changes filters that could not be evaluated on a row (the binding skipped it).",
    ),
];
