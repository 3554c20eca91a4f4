//! One typed [`Config`], read in one place: defaults, then the TOML file,
//! then `FANOUT_*` environment variables, then command-line flags.
//!
//! Every setting is declared once in [`SETTINGS`] with its file key, its
//! environment variable, its flag, its help and its default, so none of them
//! can drift apart: the command line is built from the table ([`Flags`]) and
//! the defaults the help shows are the ones used (the README's table and the
//! Helm values follow the same keys). All problems, what the chosen role
//! needs included, are collected and reported together; the binary exits
//! with 64 (`EX_USAGE`) on any of them.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use fanout_core::auth::JwksKeys;
use fanout_core::auth::{KeyError, PublicKeyAlg};
use fanout_core::policy::{ChannelRuleSpec, Policy, TableRuleSpec};
use fanout_core::{JwtVerifier, Limits};
use fanout_edge::jwks::JwksSource;

use crate::roles::Role;

/// The settings of a fanout process.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub listen: SocketAddr,
    pub admin_listen: SocketAddr,
    /// HS256 secret for client JWTs; `None` is insecure dev mode.
    pub jwt_secret: Option<String>,
    /// Token keys and checks beyond `jwt_secret` (`auth.*`).
    pub auth: AuthKeys,
    /// Channel and row policies (`auth.*`), enforced when a key is set.
    pub policy: Policy,
    pub limits: Limits,
    pub history_max_messages: usize,
    pub history_max_age: Duration,
    pub channel_linger: Duration,
    pub drain_window: Duration,
    pub shutdown_grace: Duration,
    /// The Socket.IO endpoint (`socketio.*`).
    pub socketio: fanout_edge::sio::SocketIoConfig,
    /// Broadcasts delivered live only, never stored (`ephemeral.*`).
    pub ephemeral: fanout_core::Ephemeral,
    /// NATS seed URLs (cluster mode), from a comma-separated list.
    pub nats_urls: Vec<String>,
    pub nats_credentials_file: Option<std::path::PathBuf>,
    pub nats_tls_required: bool,
    /// Shards `S`; every process of a cluster must use the same value.
    pub nats_shards: u32,
    pub nats_streams: u32,
    pub nats_replicas: usize,
    pub nats_subscription_capacity: usize,
    /// Redis for cluster presence (`redis://…`); without it edges keep
    /// presence per edge.
    pub redis_url: Option<String>,
    pub presence_heartbeat: Duration,
    pub presence_ttl: Duration,
    pub presence_sweep: Duration,
    /// Where `fanout presence` serves its gRPC API.
    pub presence_grpc_listen: SocketAddr,
    /// Where edges and standalone serve the server API.
    pub api_listen: SocketAddr,
    /// The server API's keys (`api.keys` and `api.keys_file`); none turns
    /// the API off.
    pub api_keys: fanout_core::ApiKeys,
    /// PostgreSQL for the change stream (`postgres://…`): `fanout cdc`
    /// needs it; standalone runs the ingester in-process when it is set.
    pub database_url: Option<String>,
    pub cdc_publication: String,
    pub cdc_slot: String,
    /// Table → channel routing, shared by the ingester and the edges.
    pub cdc_routes: fanout_core::changes::Routes,
    pub cdc_max_record_bytes: usize,
    /// Edges accept `postgres_changes` bindings (a `fanout cdc` feeds the
    /// cluster). Standalone turns it on by itself with a database URL.
    pub postgres_changes: bool,
}

/// One setting, declared once: where it is read from (file key, environment
/// variable, flag) and how `fanout --help` presents it.
pub struct Setting {
    /// Its key in the file, dotted for tables (`limits.max_frame_bytes`).
    pub key: &'static str,
    /// Its environment variable (`FANOUT_MAX_FRAME_BYTES`).
    pub env: &'static str,
    /// Its flag without the dashes (`max-frame-bytes`).
    pub flag: &'static str,
    /// The placeholder of the flag's value in the help (`BYTES`).
    pub value_name: &'static str,
    /// The value used when no source sets it, in the syntax of a flag value;
    /// `None` for settings that are absent by default.
    pub default: Option<&'static str>,
    /// What the setting does, as the help says it.
    pub help: &'static str,
}

impl Setting {
    /// The help line of the flag: what it does, its environment variable and
    /// its default.
    fn help_line(&self) -> String {
        match self.default {
            Some(d) => format!("{} [env: {}] [default: {d}]", self.help, self.env),
            None => format!("{} [env: {}]", self.help, self.env),
        }
    }

    /// The flag as a clap argument. It has no clap default and reads no
    /// environment itself, so it is present only when given on the command
    /// line and [`Config::load`] keeps the precedence of its sources.
    fn arg(&self) -> clap::Arg {
        clap::Arg::new(self.flag)
            .long(self.flag)
            .global(true)
            .action(clap::ArgAction::Set)
            .value_parser(clap::value_parser!(String))
            .value_name(self.value_name)
            .help(self.help_line())
    }
}

macro_rules! settings {
    ($( $key:literal, $env:literal, $flag:literal, $value_name:literal, $default:expr, $help:literal; )*) => {
        /// Every setting fanout reads.
        pub const SETTINGS: &[Setting] = &[ $( Setting {
            key: $key,
            env: $env,
            flag: $flag,
            value_name: $value_name,
            default: $default,
            help: $help,
        }, )* ];
    };
}

// Columns: file key, environment variable, flag, value name, default, help.
settings! {
    "listen", "FANOUT_LISTEN", "listen", "ADDR", Some("127.0.0.1:4000"),
        "Public address: WebSocket, REST broadcast, demo page";
    "admin_listen", "FANOUT_ADMIN_LISTEN", "admin-listen", "ADDR", Some("127.0.0.1:9600"),
        "Admin address: /metrics, /healthz, /readyz";
    "jwt_secret", "FANOUT_JWT_SECRET", "jwt-secret", "SECRET", None,
        "HS256 secret for client JWTs; without it (or another key) fanout runs in insecure dev mode on loopback only";
    "auth.hs256_secrets", "FANOUT_AUTH_HS256_SECRETS", "auth-hs256-secrets", "SECRETS", None,
        "More HS256 secrets, comma-separated, each accepted (for rotation)";
    "auth.public_keys", "FANOUT_AUTH_PUBLIC_KEYS", "auth-public-keys", "KEYS", None,
        "Public keys for RS256/ES256/EdDSA tokens, comma-separated [kid=]ALG:/path/key.pem";
    "auth.audience", "FANOUT_AUTH_AUDIENCE", "auth-audience", "AUD", None,
        "Accepted token audiences, comma-separated; when set, aud is required";
    "auth.issuer", "FANOUT_AUTH_ISSUER", "auth-issuer", "ISS", None,
        "Accepted token issuers, comma-separated; when set, iss is required";
    "auth.leeway_secs", "FANOUT_AUTH_LEEWAY_SECS", "auth-leeway-secs", "SECS", Some("0"),
        "Clock difference accepted on exp and nbf";
    "auth.jwks", "FANOUT_AUTH_JWKS", "auth-jwks", "FILE|URL", None,
        "A JWKS document of public keys (picked by kid): a file, or an http:// or https:// URL fetched at start and refreshed";
    "auth.jwks_ca_file", "FANOUT_AUTH_JWKS_CA_FILE", "auth-jwks-ca-file", "FILE", None,
        "PEM CA certificates an https:// JWKS server's certificate may chain to, besides the system's";
    "auth.jwks_refresh_secs", "FANOUT_AUTH_JWKS_REFRESH_SECS", "auth-jwks-refresh-secs", "SECS", Some("300"),
        "Refresh the JWKS document this often (and soon after a token names an unknown kid)";
    "auth.project_keys", "FANOUT_AUTH_PROJECT_KEYS", "auth-project-keys", "KEYS", None,
        "Opaque project keys (e.g. supabase-js publishable keys), comma-separated: a connection with one runs as \
         role anon until a join's access_token names the user";
    "auth.channels_claim", "FANOUT_AUTH_CHANNELS_CLAIM", "auth-channels-claim", "CLAIM", Some("channels"),
        "Claim listing the private channels a token may use (names, or prefixes ending in *)";
    "auth.public_channels", "FANOUT_AUTH_PUBLIC_CHANNELS", "auth-public-channels", "BOOL", Some("true"),
        "Public (not private) channels are open to any valid token; false refuses them";
    "auth.bypass_role", "FANOUT_AUTH_BYPASS_ROLE", "auth-bypass-role", "ROLE", Some("service_role"),
        "Tokens with this role pass every channel and row policy (empty: none do)";
    "auth.bind_presence_key", "FANOUT_AUTH_BIND_PRESENCE_KEY", "auth-bind-presence-key", "BOOL", Some("false"),
        "Bind each presence key to the claim auth.presence_key_claim: a client can only track as itself";
    "auth.presence_key_claim", "FANOUT_AUTH_PRESENCE_KEY_CLAIM", "auth-presence-key-claim", "CLAIM", Some("sub"),
        "The claim presence keys are bound to";
    "auth.stamp_sender", "FANOUT_AUTH_STAMP_SENDER", "auth-stamp-sender", "BOOL", Some("false"),
        "Stamp each broadcast's meta.sub with the sender's verified sub";
    "auth.channels", "FANOUT_AUTH_CHANNELS", "auth-channels", "RULES", None,
        "Channel rules ([[auth.channels]] with pattern, read, write); as a variable or flag, a TOML inline array: \
         [{pattern = 'workshop:{id}', read = '{id} in claims.workshops'}]";
    "auth.tables", "FANOUT_AUTH_TABLES", "auth-tables", "RULES", None,
        "Row rules per table ([auth.tables.\"schema.table\"] with read, columns); as a variable or flag, a TOML \
         inline table: {'public.notes' = {read = 'user_id == claims.sub'}}";
    "auth.memberships", "FANOUT_AUTH_MEMBERSHIPS", "auth-memberships", "SETS", None,
        "Membership sets rules read as member.<name> ([auth.memberships.<name>] with table, user, value and \
         optionally claim, default sub), mirrored by the ingester from the table; as a variable or flag, a TOML \
         inline table: {workshops = {table = 'public.workshop_participants', user = 'user_id', value = 'session_id'}}";
    "limits.max_frame_bytes", "FANOUT_MAX_FRAME_BYTES", "max-frame-bytes", "BYTES", Some("1048576"),
        "Largest client message in bytes";
    "limits.max_channels_per_connection", "FANOUT_MAX_CHANNELS_PER_CONNECTION", "max-channels-per-connection", "N",
        Some("100"),
        "Channels one connection may join";
    "limits.outbound_queue_frames", "FANOUT_OUTBOUND_QUEUE_FRAMES", "outbound-queue-frames", "N", Some("16384"),
        "Frames queued per connection before it is dropped as a slow consumer";
    "limits.messages_per_second", "FANOUT_MESSAGES_PER_SECOND", "messages-per-second", "N", Some("1000"),
        "Messages per second per connection (bursts of twice that; 0 = unlimited)";
    "limits.joins_per_second", "FANOUT_JOINS_PER_SECOND", "joins-per-second", "N", Some("50"),
        "Joins per second per connection (0 = unlimited)";
    "limits.max_connections", "FANOUT_MAX_CONNECTIONS", "max-connections", "N", Some("100000"),
        "Client connections per process; more get HTTP 429";
    "limits.idle_timeout_secs", "FANOUT_IDLE_TIMEOUT_SECS", "idle-timeout-secs", "SECS", Some("60"),
        "Close connections silent for this long; clients heartbeat every 25 s";
    "limits.max_connections_per_ip", "FANOUT_MAX_CONNECTIONS_PER_IP", "max-connections-per-ip", "N", Some("0"),
        "Client connections per client IP; more get HTTP 429 (0 = unlimited)";
    "limits.max_connections_per_sub", "FANOUT_MAX_CONNECTIONS_PER_SUB", "max-connections-per-sub", "N", Some("0"),
        "Client connections per user (the token's sub); more get HTTP 429 (0 = unlimited)";
    "limits.allowed_origins", "FANOUT_ALLOWED_ORIGINS", "allowed-origins", "ORIGINS", None,
        "Origins browser handshakes may come from, comma-separated (* any); others get HTTP 403. Unset: any";
    "limits.client_ip_header", "FANOUT_CLIENT_IP_HEADER", "client-ip-header", "HEADER", None,
        "Header naming the client IP behind a proxy (its first address, e.g. x-forwarded-for); unset: the peer address";
    "limits.write_delay_ms", "FANOUT_WRITE_DELAY_MS", "write-delay-ms", "MS", Some("0"),
        "Write window: frames for one connection within it leave in one write at its end (fewer syscalls for many small frames, up to MS more latency; 0 = off)";
    "limits.handshake_timeout_secs", "FANOUT_HANDSHAKE_TIMEOUT_SECS", "handshake-timeout-secs", "SECS", Some("10"),
        "An HTTP request (a WebSocket handshake included) must arrive whole within this long";
    "history.max_messages", "FANOUT_HISTORY_MAX_MESSAGES", "history-max-messages", "N", Some("10000"),
        "Messages kept per channel for resume";
    "history.max_age_secs", "FANOUT_HISTORY_MAX_AGE_SECS", "history-max-age-secs", "SECS", Some("300"),
        "Age limit of messages kept for resume";
    "channel_linger_ms", "FANOUT_CHANNEL_LINGER_MS", "channel-linger-ms", "MS", Some("2000"),
        "Keep a channel's bus subscription this long after its last local member left";
    "ephemeral.events", "FANOUT_EPHEMERAL_EVENTS", "ephemeral-events", "NAMES", None,
        "Broadcast event names delivered live only, never stored, replayed or caught up (e.g. cursor,typing); set the same on every process";
    "ephemeral.channels", "FANOUT_EPHEMERAL_CHANNELS", "ephemeral-channels", "PATTERNS", None,
        "Channel name patterns (* any run) whose broadcasts are ephemeral, comma-separated (e.g. cursors:*)";
    "socketio.join_event", "FANOUT_SOCKETIO_JOIN_EVENT", "socketio-join-event", "NAME", Some("join"),
        "Socket.IO: the main namespace's event that joins a channel (socket.emit(NAME, channel, ack))";
    "socketio.leave_event", "FANOUT_SOCKETIO_LEAVE_EVENT", "socketio-leave-event", "NAME", Some("leave"),
        "Socket.IO: the main namespace's event that leaves a channel";
    "socketio.ping_interval_ms", "FANOUT_SOCKETIO_PING_INTERVAL_MS", "socketio-ping-interval-ms", "MS", Some("25000"),
        "Socket.IO: the server pings each connection this often (Engine.IO pingInterval)";
    "socketio.ping_timeout_ms", "FANOUT_SOCKETIO_PING_TIMEOUT_MS", "socketio-ping-timeout-ms", "MS", Some("20000"),
        "Socket.IO: close a connection whose pong takes longer than this (Engine.IO pingTimeout)";
    "socketio.recovery", "FANOUT_SOCKETIO_RECOVERY", "socketio-recovery", "BOOL", Some("true"),
        "Socket.IO: connection-state recovery on channel namespaces (pid, and each event's position as its last argument)";
    "drain_secs", "FANOUT_DRAIN_SECS", "drain-secs", "SECS", Some("0"),
        "On SIGTERM, close client sockets spread over this window";
    "shutdown_grace_secs", "FANOUT_SHUTDOWN_GRACE_SECS", "shutdown-grace-secs", "SECS", Some("10"),
        "After draining, wait at most this long for tasks to finish";
    "nats.url", "FANOUT_NATS_URL", "nats-url", "URLS", None,
        "NATS seed URLs, comma-separated; required by `edge`";
    "nats.credentials_file", "FANOUT_NATS_CREDENTIALS_FILE", "nats-credentials-file", "FILE", None,
        "NATS credentials (.creds) file";
    "nats.tls_required", "FANOUT_NATS_TLS_REQUIRED", "nats-tls-required", "BOOL", Some("false"),
        "Require TLS to NATS";
    "nats.shards", "FANOUT_NATS_SHARDS", "nats-shards", "N", Some("64"),
        "Channel shards; every process of a cluster must agree";
    "nats.streams", "FANOUT_NATS_STREAMS", "nats-streams", "N", Some("4"),
        "JetStream streams the shards are split over";
    "nats.replicas", "FANOUT_NATS_REPLICAS", "nats-replicas", "N", Some("1"),
        "Replicas per JetStream stream";
    "nats.subscription_capacity", "FANOUT_NATS_SUBSCRIPTION_CAPACITY", "nats-subscription-capacity", "N",
        Some("65536"),
        "Live events buffered per NATS subscription before the client drops them (dropped ones are then \
         refilled from JetStream)";
    "redis.url", "FANOUT_REDIS_URL", "redis-url", "URL", None,
        "Redis URL for cluster presence, e.g. redis://127.0.0.1:6379";
    "presence.heartbeat_secs", "FANOUT_PRESENCE_HEARTBEAT_SECS", "presence-heartbeat-secs", "SECS", Some("5"),
        "Edge heartbeat to Redis, one pipelined round trip per edge";
    "presence.ttl_secs", "FANOUT_PRESENCE_TTL_SECS", "presence-ttl-secs", "SECS", Some("15"),
        "A silent edge's users expire after this long";
    "presence.sweep_secs", "FANOUT_PRESENCE_SWEEP_SECS", "presence-sweep-secs", "SECS", Some("5"),
        "How often the presence role sweeps for crashed edges";
    "presence.grpc_listen", "FANOUT_PRESENCE_GRPC_LISTEN", "presence-grpc-listen", "ADDR", Some("127.0.0.1:50051"),
        "Where `fanout presence` serves its gRPC API";
    "api.listen", "FANOUT_API_LISTEN", "api-listen", "ADDR", Some("127.0.0.1:9700"),
        "Server API address (gRPC and HTTP JSON under /api/v1/), served by edges and standalone when API keys are set";
    "api.keys", "FANOUT_API_KEYS", "api-keys", "KEYS", None,
        "Server API keys, comma-separated, each KEY or SCOPE:KEY with scope publish, read or all (at least 16 characters)";
    "api.keys_file", "FANOUT_API_KEYS_FILE", "api-keys-file", "FILE", None,
        "A file of server API keys, one per line (# comments), e.g. a mounted Secret";
    "database.url", "FANOUT_DATABASE_URL", "database-url", "URL", None,
        "PostgreSQL URL for the change stream, postgres://user:pass@host:port/db[?sslmode=require]; required by \
         `cdc`, runs the ingester in-process in `standalone`";
    "cdc.publication", "FANOUT_CDC_PUBLICATION", "cdc-publication", "NAME", Some("fanout"),
        "Publication the ingester streams";
    "cdc.slot", "FANOUT_CDC_SLOT", "cdc-slot", "NAME", Some("fanout"),
        "Logical replication slot, created if missing";
    "cdc.routes", "FANOUT_CDC_ROUTES", "cdc-routes", "ROUTES", None,
        "Tables routed to per-row channels, e.g. public.workshop_activities=workshop:{session_id} \
         (comma-separated); other tables go to db:<schema>.<table>. Edges and cdc must agree";
    "cdc.max_record_bytes", "FANOUT_CDC_MAX_RECORD_BYTES", "cdc-max-record-bytes", "BYTES", Some("1048576"),
        "Change records above this size keep only small values and carry a 413 error";
    "postgres_changes", "FANOUT_POSTGRES_CHANGES", "postgres-changes", "BOOL", Some("false"),
        "Accept postgres_changes bindings (an edge fed by `fanout cdc`); on by itself with --database-url";
}

/// The flags of every setting in [`SETTINGS`], as clap arguments of the
/// whole command line (`#[command(flatten)]`): the values given, by flag name.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Flags(pub BTreeMap<&'static str, String>);

impl clap::FromArgMatches for Flags {
    fn from_arg_matches(matches: &clap::ArgMatches) -> Result<Self, clap::Error> {
        let mut flags = Self::default();
        flags.update_from_arg_matches(matches)?;
        Ok(flags)
    }

    fn update_from_arg_matches(&mut self, matches: &clap::ArgMatches) -> Result<(), clap::Error> {
        for s in SETTINGS {
            if let Some(v) = matches.get_one::<String>(s.flag) {
                self.0.insert(s.flag, v.clone());
            }
        }
        Ok(())
    }
}

impl clap::Args for Flags {
    fn augment_args(cmd: clap::Command) -> clap::Command {
        cmd.args(SETTINGS.iter().map(Setting::arg))
    }

    fn augment_args_for_update(cmd: clap::Command) -> clap::Command {
        Self::augment_args(cmd)
    }
}

/// The token keys and checks of `auth.*`, with the public keys' PEM read
/// (and parsed) at load, so a bad key file is a configuration error.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct AuthKeys {
    pub hs256_secrets: Vec<String>,
    /// The JWKS document (`auth.jwks`), read and refreshed by the edge.
    pub jwks: Option<JwksSource>,
    pub jwks_refresh: Duration,
    /// Opaque project keys (never logged: `Debug` shows only their count).
    pub project_keys: ProjectKeys,
    /// (key id, algorithm, PEM bytes).
    pub public_keys: Vec<(Option<String>, PublicKeyAlg, Vec<u8>)>,
    pub audience: Vec<String>,
    pub issuer: Vec<String>,
    pub leeway_secs: u64,
}

impl AuthKeys {
    /// Reads `auth.public_keys` entries (`[kid=]ALG:path`), each file once.
    fn read_public_keys(spec: &str, errors: &mut Vec<String>) -> Vec<(Option<String>, PublicKeyAlg, Vec<u8>)> {
        let mut keys = Vec::new();
        for entry in list(spec) {
            let (kid, rest) = match entry.split_once('=') {
                Some((kid, rest)) => (Some(kid.to_owned()), rest),
                None => (None, entry.as_str()),
            };
            let Some((alg, path)) = rest.split_once(':') else {
                errors.push(format!(
                    "auth.public_keys entry {entry:?}: expected [kid=]ALG:/path/key.pem"
                ));
                continue;
            };
            let alg = match alg.parse::<PublicKeyAlg>() {
                Ok(a) => a,
                Err(e) => {
                    errors.push(format!("auth.public_keys entry {entry:?}: {e}"));
                    continue;
                }
            };
            let pem = match std::fs::read(path) {
                Ok(p) => p,
                Err(e) => {
                    errors.push(format!("auth.public_keys: cannot read {path}: {e}"));
                    continue;
                }
            };
            if let Err(e) = JwtVerifier::default().with_public_key(kid.as_deref(), alg, &pem) {
                errors.push(format!("auth.public_keys: {path}: {e}"));
                continue;
            }
            keys.push((kid, alg, pem));
        }
        keys
    }

    /// The verifier for `jwt_secret` and these keys; `None` when there is no
    /// key at all (insecure dev mode). A key that no longer parses is an
    /// error, never a fall-back to dev mode.
    pub fn verifier(
        &self,
        jwt_secret: Option<&str>,
        jwks: Option<std::sync::Arc<JwksKeys>>,
    ) -> Result<Option<JwtVerifier>, KeyError> {
        let secrets = jwt_secret
            .into_iter()
            .chain(self.hs256_secrets.iter().map(String::as_str));
        let mut v = JwtVerifier::default();
        for secret in secrets {
            v = v.with_hs256(None, secret.as_bytes());
        }
        for (kid, alg, pem) in &self.public_keys {
            v = v.with_public_key(kid.as_deref(), *alg, pem)?;
        }
        for key in &self.project_keys.0 {
            v = v.with_project_key(key);
        }
        if let Some(jwks) = jwks {
            v = v.with_jwks(jwks);
        }
        Ok((v.key_count() > 0).then(|| {
            v.with_audience(self.audience.clone())
                .with_issuer(self.issuer.clone())
                .with_leeway(self.leeway_secs)
        }))
    }
}

/// Opaque project keys; `Debug` prints only how many there are.
#[derive(Clone, PartialEq, Eq, Default)]
pub struct ProjectKeys(pub Vec<String>);

impl std::fmt::Debug for ProjectKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ProjectKeys({} keys)", self.0.len())
    }
}

/// `auth.channels`: an array of tables in the file, a TOML inline array in
/// a variable or flag.
#[derive(Debug, Clone, Default, serde::Deserialize)]
#[serde(transparent)]
struct ChannelRules(Vec<ChannelRuleSpec>);

/// `auth.tables`: a table of tables in the file, a TOML inline table in a
/// variable or flag.
#[derive(Debug, Clone, Default, serde::Deserialize)]
#[serde(transparent)]
struct TableRules(BTreeMap<String, TableRuleSpec>);

/// `auth.memberships`: a table of tables in the file, a TOML inline table
/// in a variable or flag.
#[derive(Debug, Clone, Default, serde::Deserialize)]
#[serde(transparent)]
struct MembershipSets(BTreeMap<String, fanout_core::membership::MembershipSpec>);

impl FromStr for MembershipSets {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        inline_toml(s)
    }
}

/// Parses a one-line TOML value (an inline array or table).
fn inline_toml<T: serde::de::DeserializeOwned>(s: &str) -> Result<T, String> {
    #[derive(serde::Deserialize)]
    struct Wrap<T> {
        v: T,
    }
    toml::from_str::<Wrap<T>>(&format!("v = {s}"))
        .map(|w| w.v)
        .map_err(|e| e.message().to_owned())
}

impl FromStr for ChannelRules {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        inline_toml(s)
    }
}

impl FromStr for TableRules {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        inline_toml(s)
    }
}

/// A comma-separated list, trimmed, without empty entries.
/// API keys from a file: one per line (`KEY` or `SCOPE:KEY`), blank lines
/// and `#` comments skipped. Errors name lines, never keys.
fn read_api_keys_file(path: &Path) -> Result<fanout_core::ApiKeys, String> {
    let text = std::fs::read_to_string(path).map_err(|e| e.to_string())?;
    let lines = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'));
    fanout_core::ApiKeys::parse(lines)
}

fn list(s: &str) -> Vec<String> {
    s.split(',')
        .map(|x| x.trim().to_owned())
        .filter(|x| !x.is_empty())
        .collect()
}

/// Everything wrong with a configuration, reported at once.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid configuration:\n  - {}", .0.join("\n  - "))]
pub struct ConfigErrors(pub Vec<String>);

/// Where settings come from, lowest precedence first.
pub struct Sources<'a> {
    /// The parsed TOML file (empty without one).
    pub file: toml::Table,
    /// Environment lookup (a closure so tests can pass a map).
    pub env: &'a dyn Fn(&str) -> Option<String>,
    /// Flag values by flag name (only flags given on the command line).
    pub flags: BTreeMap<&'static str, String>,
}

impl Sources<'_> {
    /// Reads a TOML file into a table.
    pub fn read_file(path: &Path) -> Result<toml::Table, ConfigErrors> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigErrors(vec![format!("cannot read config file {}: {e}", path.display())]))?;
        text.parse::<toml::Table>()
            .map_err(|e| ConfigErrors(vec![format!("config file {}: {e}", path.display())]))
    }
}

struct Reader<'a, 'b> {
    src: &'b Sources<'a>,
    used: BTreeSet<&'static str>,
    errors: Vec<String>,
}

impl Reader<'_, '_> {
    fn setting(key: &str) -> &'static Setting {
        SETTINGS
            .iter()
            .find(|s| s.key == key)
            .unwrap_or_else(|| panic!("undeclared setting {key}"))
    }

    fn file_value(&self, key: &str) -> Option<&toml::Value> {
        let mut parts = key.split('.');
        let first = parts.next()?;
        let mut v = self.src.file.get(first)?;
        for p in parts {
            v = v.as_table()?.get(p)?;
        }
        Some(v)
    }

    /// flag, then environment, then file, then the setting's default.
    fn get<T>(&mut self, key: &'static str) -> T
    where
        T: FromStr + serde::de::DeserializeOwned,
        T::Err: std::fmt::Display,
    {
        if let Some(v) = self.opt(key) {
            return v;
        }
        // The defaults are the table's, the same text the help shows; a
        // setting read this way must have one that parses (the unit tests
        // load every setting from its default).
        let default = Self::setting(key)
            .default
            .unwrap_or_else(|| panic!("setting {key} has no default"));
        default
            .parse()
            .unwrap_or_else(|e| panic!("default of {key} ({default:?}) does not parse: {e}"))
    }

    /// flag, then environment, then file; `None` when absent or invalid
    /// (invalid values are recorded as errors).
    fn opt<T>(&mut self, key: &'static str) -> Option<T>
    where
        T: FromStr + serde::de::DeserializeOwned,
        T::Err: std::fmt::Display,
    {
        let s = Self::setting(key);
        self.used.insert(key);
        let raw = if let Some(v) = self.src.flags.get(s.flag) {
            Some((v.clone(), format!("--{}", s.flag)))
        } else {
            (self.src.env)(s.env).map(|v| (v, s.env.to_owned()))
        };
        match raw {
            Some((v, origin)) => match v.parse::<T>() {
                Ok(t) => Some(t),
                Err(e) => {
                    self.errors.push(format!("{origin}={v:?}: {e}"));
                    None
                }
            },
            None => match T::deserialize(self.file_value(key)?.clone()) {
                Ok(t) => Some(t),
                Err(e) => {
                    self.errors.push(format!("config key {key}: {e}"));
                    None
                }
            },
        }
    }

    /// Every file key that no setting read.
    fn unknown_file_keys(&self) -> Vec<String> {
        let mut out = Vec::new();
        for (k, v) in &self.src.file {
            match v.as_table() {
                Some(t) if SETTINGS.iter().any(|s| s.key.starts_with(&format!("{k}."))) => {
                    for sub in t.keys() {
                        let full = format!("{k}.{sub}");
                        if !self.used.contains(full.as_str()) {
                            out.push(full);
                        }
                    }
                }
                _ => {
                    if !self.used.contains(k.as_str()) {
                        out.push(k.clone());
                    }
                }
            }
        }
        out
    }
}

/// The policies of `auth.*`; rule problems are recorded as errors.
fn read_policy(r: &mut Reader<'_, '_>) -> Policy {
    let channels = r.opt::<ChannelRules>("auth.channels").unwrap_or_default();
    let tables = r.opt::<TableRules>("auth.tables").unwrap_or_default();
    let memberships = r.opt::<MembershipSets>("auth.memberships").unwrap_or_default();
    let bypass: String = r.get("auth.bypass_role");
    let bind_presence: bool = r.get("auth.bind_presence_key");
    let presence_claim: String = r.get("auth.presence_key_claim");
    let base = Policy {
        channels_claim: r.get("auth.channels_claim"),
        public_channels: r.get("auth.public_channels"),
        bypass_role: (!bypass.is_empty()).then_some(bypass),
        presence_key_claim: bind_presence.then_some(presence_claim),
        stamp_sender: r.get("auth.stamp_sender"),
        ..Policy::default()
    };
    match base.clone().with_memberships(&memberships.0, &channels.0, &tables.0) {
        Ok(policy) => policy,
        Err(errors) => {
            r.errors.extend(errors.into_iter().map(|e| format!("auth policy: {e}")));
            base
        }
    }
}

impl Config {
    /// Builds the configuration of `role` from its sources, or every reason
    /// it is bad, the role's own needs included.
    pub fn load(src: &Sources<'_>, role: Role) -> Result<Self, ConfigErrors> {
        let mut r = Reader {
            src,
            used: BTreeSet::new(),
            errors: Vec::new(),
        };
        let limits = Limits {
            max_frame_bytes: r.get("limits.max_frame_bytes"),
            max_channels_per_connection: r.get("limits.max_channels_per_connection"),
            outbound_queue_frames: r.get("limits.outbound_queue_frames"),
            messages_per_second: r.get("limits.messages_per_second"),
            joins_per_second: r.get("limits.joins_per_second"),
            max_connections: r.get("limits.max_connections"),
            max_connections_per_ip: r.get("limits.max_connections_per_ip"),
            max_connections_per_sub: r.get("limits.max_connections_per_sub"),
            allowed_origins: r
                .opt::<String>("limits.allowed_origins")
                .map(|s| list(&s))
                .unwrap_or_default(),
            client_ip_header: r
                .opt::<String>("limits.client_ip_header")
                .filter(|s| !s.is_empty())
                .map(|s| s.to_ascii_lowercase()),
            handshake_timeout: Duration::from_secs(r.get("limits.handshake_timeout_secs")),
            idle_timeout: Duration::from_secs(r.get("limits.idle_timeout_secs")),
            write_delay: Duration::from_millis(r.get("limits.write_delay_ms")),
        };
        let public_keys = r.opt::<String>("auth.public_keys");
        let jwks_spec = r.opt::<String>("auth.jwks");
        let jwks_ca_file = r.opt::<String>("auth.jwks_ca_file").filter(|s| !s.is_empty());
        let config = Config {
            listen: r.get("listen"),
            admin_listen: r.get("admin_listen"),
            jwt_secret: r.opt::<String>("jwt_secret").filter(|s| !s.is_empty()),
            auth: AuthKeys {
                hs256_secrets: r
                    .opt::<String>("auth.hs256_secrets")
                    .map(|s| list(&s))
                    .unwrap_or_default(),
                public_keys: Vec::new(),
                audience: r.opt::<String>("auth.audience").map(|s| list(&s)).unwrap_or_default(),
                issuer: r.opt::<String>("auth.issuer").map(|s| list(&s)).unwrap_or_default(),
                leeway_secs: r.get("auth.leeway_secs"),
                jwks: None,
                jwks_refresh: Duration::from_secs(r.get("auth.jwks_refresh_secs")),
                project_keys: ProjectKeys(
                    r.opt::<String>("auth.project_keys")
                        .map(|s| list(&s))
                        .unwrap_or_default(),
                ),
            },
            policy: Policy::default(),
            limits,
            history_max_messages: r.get("history.max_messages"),
            history_max_age: Duration::from_secs(r.get("history.max_age_secs")),
            channel_linger: Duration::from_millis(r.get("channel_linger_ms")),
            drain_window: Duration::from_secs(r.get("drain_secs")),
            shutdown_grace: Duration::from_secs(r.get("shutdown_grace_secs")),
            ephemeral: fanout_core::Ephemeral::new(
                r.opt::<String>("ephemeral.events")
                    .map(|s| list(&s))
                    .unwrap_or_default(),
                r.opt::<String>("ephemeral.channels")
                    .map(|s| list(&s))
                    .unwrap_or_default(),
            ),
            socketio: fanout_edge::sio::SocketIoConfig {
                ping_interval: Duration::from_millis(r.get("socketio.ping_interval_ms")),
                ping_timeout: Duration::from_millis(r.get("socketio.ping_timeout_ms")),
                join_event: r.get("socketio.join_event"),
                leave_event: r.get("socketio.leave_event"),
                recovery: r.get("socketio.recovery"),
            },
            nats_urls: r.opt::<String>("nats.url").map(|s| list(&s)).unwrap_or_default(),
            nats_credentials_file: r.opt::<String>("nats.credentials_file").map(Into::into),
            nats_tls_required: r.get("nats.tls_required"),
            nats_shards: r.get("nats.shards"),
            nats_streams: r.get("nats.streams"),
            nats_replicas: r.get("nats.replicas"),
            nats_subscription_capacity: r.get("nats.subscription_capacity"),
            redis_url: r.opt::<String>("redis.url").filter(|s| !s.is_empty()),
            presence_heartbeat: Duration::from_secs(r.get("presence.heartbeat_secs")),
            presence_ttl: Duration::from_secs(r.get("presence.ttl_secs")),
            presence_sweep: Duration::from_secs(r.get("presence.sweep_secs")),
            presence_grpc_listen: r.get("presence.grpc_listen"),
            api_listen: r.get("api.listen"),
            api_keys: fanout_core::ApiKeys::default(),
            database_url: r.opt::<String>("database.url").filter(|s| !s.is_empty()),
            cdc_publication: r.get("cdc.publication"),
            cdc_slot: r.get("cdc.slot"),
            cdc_routes: Default::default(),
            cdc_max_record_bytes: r.get("cdc.max_record_bytes"),
            postgres_changes: r.get("postgres_changes"),
        };
        let mut config = config;
        let api_keys = r.opt::<String>("api.keys").unwrap_or_default();
        match fanout_core::ApiKeys::parse(list(&api_keys).iter().map(String::as_str)) {
            Ok(keys) => config.api_keys = keys,
            Err(e) => r.errors.push(format!("api.keys: {e}")),
        }
        if let Some(path) = r.opt::<String>("api.keys_file").filter(|s| !s.is_empty()) {
            match read_api_keys_file(Path::new(&path)) {
                Ok(keys) => config.api_keys.extend(keys),
                Err(e) => r.errors.push(format!("api.keys_file {path}: {e}")),
            }
        }
        match fanout_core::changes::Routes::parse(&r.opt::<String>("cdc.routes").unwrap_or_default()) {
            Ok(routes) => config.cdc_routes = routes,
            Err(e) => r.errors.push(e.to_string()),
        }
        if config.database_url.is_some() {
            config.postgres_changes = true;
        }
        config.policy = read_policy(&mut r);
        let mut errors = std::mem::take(&mut r.errors);
        for k in r.unknown_file_keys() {
            errors.push(format!("unknown config key {k:?}"));
        }
        if config.limits.max_frame_bytes < 1024 {
            errors.push("limits.max_frame_bytes must be at least 1024".into());
        }
        if config.limits.max_channels_per_connection == 0 {
            errors.push("limits.max_channels_per_connection must be at least 1".into());
        }
        if config.limits.outbound_queue_frames == 0 {
            errors.push("limits.outbound_queue_frames must be at least 1".into());
        }
        if config.nats_shards == 0 || config.nats_streams == 0 || config.nats_streams > config.nats_shards {
            errors.push("nats.streams must be between 1 and nats.shards".into());
        }
        let sio = &config.socketio;
        if sio.join_event.is_empty() || sio.leave_event.is_empty() || sio.join_event == sio.leave_event {
            errors.push("socketio.join_event and socketio.leave_event must be two different, non-empty names".into());
        }
        if sio.ping_interval.is_zero() || sio.ping_timeout.is_zero() {
            errors.push("socketio.ping_interval_ms and socketio.ping_timeout_ms must be above 0".into());
        }
        if config.presence_heartbeat.is_zero() || config.presence_ttl <= config.presence_heartbeat {
            errors.push("presence.ttl_secs must be larger than presence.heartbeat_secs (and both above 0)".into());
        }
        if config.cdc_slot.is_empty()
            || !config
                .cdc_slot
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
        {
            errors.push("cdc.slot must be lower-case letters, digits and underscores".into());
        }
        if config.presence_sweep.is_zero() {
            errors.push("presence.sweep_secs must be at least 1".into());
        }
        match (jwks_spec, jwks_ca_file) {
            (Some(spec), ca_file) => match JwksSource::parse(&spec, ca_file.as_deref().map(Path::new)) {
                Ok(source) => config.auth.jwks = Some(source),
                Err(e) => errors.push(e),
            },
            (None, Some(_)) => errors.push("auth.jwks_ca_file is set without auth.jwks".into()),
            (None, None) => {}
        }
        if config.auth.jwks_refresh.is_zero() {
            errors.push("auth.jwks_refresh_secs must be at least 1".into());
        }
        if let Some(spec) = public_keys {
            config.auth.public_keys = AuthKeys::read_public_keys(&spec, &mut errors);
        }
        let no_key = config.jwt_secret.is_none()
            && config.auth.hs256_secrets.is_empty()
            && config.auth.public_keys.is_empty()
            && config.auth.project_keys.0.is_empty()
            && config.auth.jwks.is_none();
        if no_key && !config.listen.ip().is_loopback() {
            errors.push(format!(
                "refusing to listen on {} without a JWT secret: set FANOUT_JWT_SECRET (or --jwt-secret), or listen on a loopback address for insecure dev mode",
                config.listen
            ));
        }
        errors.extend(config.role_problem(role));
        if errors.is_empty() {
            Ok(config)
        } else {
            Err(ConfigErrors(errors))
        }
    }

    /// What `role` needs that this configuration lacks, if anything.
    fn role_problem(&self, role: Role) -> Option<String> {
        let nats = !self.nats_urls.is_empty();
        let problem = match role {
            Role::Standalone => return None,
            Role::Edge if !nats => "`fanout edge` needs NATS: set --nats-url or FANOUT_NATS_URL",
            Role::Presence if !nats || self.redis_url.is_none() => {
                "`fanout presence` needs --nats-url (FANOUT_NATS_URL) and --redis-url (FANOUT_REDIS_URL)"
            }
            Role::Cdc if !nats || self.database_url.is_none() => {
                "`fanout cdc` needs --database-url (FANOUT_DATABASE_URL) and --nats-url (FANOUT_NATS_URL)"
            }
            Role::Edge | Role::Presence | Role::Cdc => return None,
        };
        Some(problem.to_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(file: &str, env: &[(&str, &str)], flags: &[(&'static str, &str)]) -> Result<Config, ConfigErrors> {
        load_for(Role::Standalone, file, env, flags)
    }

    fn load_for(
        role: Role,
        file: &str,
        env: &[(&str, &str)],
        flags: &[(&'static str, &str)],
    ) -> Result<Config, ConfigErrors> {
        let env: BTreeMap<String, String> = env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        let lookup = move |k: &str| env.get(k).cloned();
        let src = Sources {
            file: file.parse().unwrap(),
            env: &lookup,
            flags: flags.iter().map(|(k, v)| (*k, v.to_string())).collect(),
        };
        Config::load(&src, role)
    }

    #[test]
    fn defaults_are_loopback_dev_mode() {
        // Loading with no sources reads every setting from its default in the
        // table, so a default that does not parse fails here.
        let c = load("", &[], &[]).unwrap();
        assert_eq!(c.listen, "127.0.0.1:4000".parse().unwrap());
        assert_eq!(c.admin_listen, "127.0.0.1:9600".parse().unwrap());
        assert_eq!(c.jwt_secret, None);
        // The limits' defaults live in fanout-core too; the help must show
        // the same ones.
        assert_eq!(c.limits, Limits::default());
    }

    /// The settings' flags as the binary builds them.
    fn command() -> clap::Command {
        <Flags as clap::Args>::augment_args(clap::Command::new("fanout"))
    }

    #[test]
    fn every_setting_has_a_flag_clap_accepts() {
        command().debug_assert();
        let unique = |f: fn(&Setting) -> &str| SETTINGS.iter().map(f).collect::<BTreeSet<_>>().len();
        assert_eq!(unique(|s| s.key), SETTINGS.len(), "file keys are unique");
        assert_eq!(unique(|s| s.env), SETTINGS.len(), "environment variables are unique");
        assert_eq!(unique(|s| s.flag), SETTINGS.len(), "flags are unique");
        for s in SETTINGS {
            assert!(s.env.starts_with("FANOUT_"), "{}", s.env);
            let matches = command()
                .try_get_matches_from(["fanout", &format!("--{}", s.flag), "v"])
                .unwrap_or_else(|e| panic!("--{}: {e}", s.flag));
            let flags = <Flags as clap::FromArgMatches>::from_arg_matches(&matches).unwrap();
            assert_eq!(flags.0, BTreeMap::from([(s.flag, "v".to_owned())]), "--{}", s.flag);
        }
        let none = <Flags as clap::FromArgMatches>::from_arg_matches(&command().get_matches_from(["fanout"])).unwrap();
        assert!(none.0.is_empty(), "flags not given are absent: {none:?}");
    }

    #[test]
    fn the_help_names_every_environment_variable_and_default() {
        let help = command().render_long_help().to_string();
        for s in SETTINGS {
            let line = match s.default {
                Some(d) => format!("[env: {}] [default: {d}]", s.env),
                None => format!("[env: {}]", s.env),
            };
            assert!(help.contains(&line), "{line:?} not in the help:\n{help}");
            assert!(
                help.contains(&format!("--{} <{}>", s.flag, s.value_name)),
                "--{}",
                s.flag
            );
        }
    }

    #[test]
    fn each_role_says_what_it_needs_with_every_other_problem() {
        let needs = |role, env: &[(&str, &str)]| {
            let err = load_for(role, "", env, &[("cdc-slot", "Bad-Slot")]).unwrap_err();
            assert_eq!(err.0.len(), 2, "{err}");
            assert!(err.0[0].contains("cdc.slot"), "{err}");
            err.0[1].clone()
        };
        let nats = ("FANOUT_NATS_URL", "nats://127.0.0.1:4222");
        let redis = ("FANOUT_REDIS_URL", "redis://127.0.0.1:6379");
        let database = ("FANOUT_DATABASE_URL", "postgres://127.0.0.1/app");
        assert_eq!(
            needs(Role::Edge, &[]),
            "`fanout edge` needs NATS: set --nats-url or FANOUT_NATS_URL"
        );
        let presence = "`fanout presence` needs --nats-url (FANOUT_NATS_URL) and --redis-url (FANOUT_REDIS_URL)";
        assert_eq!(needs(Role::Presence, &[]), presence);
        assert_eq!(needs(Role::Presence, &[nats]), presence);
        assert_eq!(needs(Role::Presence, &[redis]), presence);
        let cdc = "`fanout cdc` needs --database-url (FANOUT_DATABASE_URL) and --nats-url (FANOUT_NATS_URL)";
        assert_eq!(needs(Role::Cdc, &[]), cdc);
        assert_eq!(needs(Role::Cdc, &[nats]), cdc);
        assert_eq!(needs(Role::Cdc, &[database]), cdc);

        for (role, env) in [
            (Role::Standalone, &[][..]),
            (Role::Edge, &[nats][..]),
            (Role::Presence, &[nats, redis][..]),
            (Role::Cdc, &[nats, database][..]),
        ] {
            load_for(role, "", env, &[]).unwrap_or_else(|e| panic!("{role:?}: {e}"));
        }
    }

    #[test]
    fn precedence_is_flag_env_file_default() {
        let file = "listen = \"127.0.0.1:1\"\n[limits]\nmax_frame_bytes = 2048\nmax_channels_per_connection = 7\n";
        let c = load(
            file,
            &[("FANOUT_LISTEN", "127.0.0.1:2"), ("FANOUT_MAX_FRAME_BYTES", "4096")],
            &[("listen", "127.0.0.1:3")],
        )
        .unwrap();
        assert_eq!(c.listen.port(), 3, "flag wins");
        assert_eq!(c.limits.max_frame_bytes, 4096, "env beats file");
        assert_eq!(c.limits.max_channels_per_connection, 7, "file beats default");
    }

    #[test]
    fn reports_every_problem_at_once() {
        let file = "bogus = 1\nlisten = 5\n[limits]\nmax_frame_bytes = \"x\"\nnope = 2\n";
        let err = load(
            file,
            &[("FANOUT_MAX_CHANNELS_PER_CONNECTION", "many")],
            &[("admin-listen", "nowhere")],
        )
        .unwrap_err();
        let all = err.0.join("\n");
        for needle in [
            "bogus",
            "config key listen",
            "limits.max_frame_bytes",
            "limits.nope",
            "FANOUT_MAX_CHANNELS_PER_CONNECTION",
            "--admin-listen",
        ] {
            assert!(all.contains(needle), "missing {needle:?} in:\n{all}");
        }
        assert_eq!(err.0.len(), 6, "{all}");
    }

    #[test]
    fn public_bind_needs_a_secret() {
        let err = load("", &[], &[("listen", "0.0.0.0:4000")]).unwrap_err();
        assert!(err.0[0].contains("without a JWT secret"), "{err}");
        let ok = load("", &[("FANOUT_JWT_SECRET", "s3cret")], &[("listen", "0.0.0.0:4000")]).unwrap();
        assert_eq!(ok.jwt_secret.as_deref(), Some("s3cret"));
    }

    #[test]
    fn token_keys_from_file_and_environment() {
        let keys = concat!(env!("CARGO_MANIFEST_DIR"), "/../fanout-core/testdata/keys");
        let file = format!(
            "[auth]\npublic_keys = \"ec-1=ES256:{keys}/ec.pub, EdDSA:{keys}/ed.pub\"\naudience = \"fanout, app\"\nleeway_secs = 5\n"
        );
        let c = load(
            &file,
            &[("FANOUT_AUTH_HS256_SECRETS", "old, new")],
            &[("listen", "0.0.0.0:4000")],
        )
        .unwrap();
        assert_eq!(c.auth.hs256_secrets, ["old", "new"]);
        assert_eq!(c.auth.audience, ["fanout", "app"]);
        assert_eq!(c.auth.leeway_secs, 5);
        let kinds: Vec<_> = c
            .auth
            .public_keys
            .iter()
            .map(|(kid, alg, _)| (kid.as_deref(), *alg))
            .collect();
        assert_eq!(
            kinds,
            [(Some("ec-1"), PublicKeyAlg::Es256), (None, PublicKeyAlg::EdDsa)]
        );
        let v = c.auth.verifier(None, None).unwrap().expect("keys make a verifier");
        assert_eq!(v.key_count(), 4, "two secrets and two public keys");
        assert!(
            AuthKeys::default().verifier(None, None).unwrap().is_none(),
            "no key: dev mode"
        );

        let err = load(
            "",
            &[(
                "FANOUT_AUTH_PUBLIC_KEYS",
                &format!("ES256:{keys}/rsa.pub,nonsense,XS1:{keys}/ec.pub"),
            )],
            &[],
        )
        .unwrap_err();
        assert_eq!(err.0.len(), 3, "each bad entry named: {err}");
    }

    #[test]
    fn change_stream_settings() {
        let c = load(
            "[cdc]\nroutes = \"public.workshop_activities=workshop:{session_id}\"\n",
            &[("FANOUT_DATABASE_URL", "postgres://127.0.0.1/app")],
            &[],
        )
        .unwrap();
        assert!(c.postgres_changes, "a database URL turns postgres_changes on");
        assert!(!c.cdc_routes.is_empty());
        assert_eq!((c.cdc_slot.as_str(), c.cdc_publication.as_str()), ("fanout", "fanout"));
        let err = load("", &[("FANOUT_CDC_ROUTES", "nodot=x:{y}")], &[("cdc-slot", "Bad-Slot")]).unwrap_err();
        assert_eq!(err.0.len(), 2, "{err}");
    }

    #[test]
    fn membership_sets_as_the_readme_spells_them() {
        let file = r#"
[auth.memberships.workshops]
table = "public.workshop_participants"
user  = "user_id"
value = "session_id"

[auth.tables."public.workshop_activities"]
read = "session_id in member.workshops"

[[auth.channels]]
pattern = "workshop:{id}"
read  = "{id} in member.workshops"
write = "{id} in member.workshops"
"#;
        let c = load(file, &[], &[]).unwrap();
        let set = &c.policy.memberships["workshops"];
        assert_eq!(
            (
                set.qualified_table().as_str(),
                set.user_column.as_str(),
                set.value_column.as_str()
            ),
            ("public.workshop_participants", "user_id", "session_id")
        );
        assert!(c.policy.channel_reads_members("workshop:42"));
        assert!(
            c.policy
                .table("public", "workshop_activities")
                .unwrap()
                .read
                .reads_members()
        );
        // The same as an environment variable.
        let c = load(
            "",
            &[(
                "FANOUT_AUTH_MEMBERSHIPS",
                "{teams = {table = 'team_members', user = 'uid', value = 'team_id', claim = 'app.uid'}}",
            )],
            &[],
        )
        .unwrap();
        assert_eq!(c.policy.memberships["teams"].claim, ["app", "uid"]);
        // A rule naming a set that is not configured, and a bad set, are errors.
        let err = load(
            "[auth.memberships.bad]\ntable = \"t\"\nuser = \"u\"\nvalue = \"u\"\n\n[auth.tables.\"public.x\"]\nread = \"a in member.other\"\n",
            &[],
            &[],
        )
        .unwrap_err();
        assert_eq!(err.0.len(), 2, "{err}");
    }
}
