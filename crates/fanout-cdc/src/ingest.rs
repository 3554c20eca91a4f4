//! The replication loop: slot → decoded changes → bus → slot acknowledgement.
//!
//! One session at a time:
//! 1. Connect a replication session and check the server is set up
//!    (`wal_level = logical`, the publication exists); create the slot if it
//!    is missing. Setup problems are reported with the SQL that fixes them.
//! 2. If another session holds the slot (its `active_pid` is set, or
//!    START_REPLICATION says it is active), this instance is a *standby*: it
//!    checks again every `standby_poll` and takes over once the slot is free.
//!    Postgres lets one session stream a slot at a time, so the slot itself
//!    is the lock; no advisory lock or extra connection is needed.
//! 3. Stream from the slot's confirmed flush position. Whole transactions
//!    are collected at their commit; consecutive committed transactions are
//!    published together (group commit) in commit order, each change with
//!    the deduplication id `<slot>:<commit LSN>:<index in transaction>`.
//!    Only after the bus stored all of them is the slot's position raised to
//!    the last commit's end, so a crash replays at most what was not yet
//!    acknowledged, and the bus drops the replayed ids it already has.

use std::sync::Arc;
use std::time::{Duration, Instant};

use fanout_bus::{Bus, BusError, MemberStore};
use fanout_core::Event;
use fanout_core::changes::Routes;
use fanout_core::membership::MembershipSet;
use futures_util::FutureExt;
use pgwire_replication::{Lsn, PgWireError, ReplicationClient, ReplicationConfig, ReplicationEvent, TlsConfig};
use tokio_util::sync::CancellationToken;

use crate::members::MemberState;
use crate::pgoutput::{self, Message};
use crate::record::{Catalog, RecordError};
use crate::value::commit_timestamp;

/// Settings of the ingester.
#[derive(Debug, Clone)]
pub struct CdcConfig {
    /// `postgres://user:password@host:port/database[?sslmode=disable|require|verify-full]`
    pub database_url: String,
    pub publication: String,
    pub slot: String,
    pub routes: Arc<Routes>,
    /// Records larger than this keep only small values (see [`crate::record`]).
    pub max_record_bytes: usize,
    /// How often a standby checks whether the slot became free.
    pub standby_poll: Duration,
    /// Once shutdown is requested, how long the session may take to finish a
    /// publish in flight and stop the stream before it is dropped.
    pub stop_grace: Duration,
    /// Membership sets to mirror (see [`crate::members`]), and the store
    /// that holds the mirror. Both or neither.
    pub memberships: Vec<MembershipSet>,
    pub members: Option<Arc<dyn MemberStore>>,
}

impl CdcConfig {
    pub fn new(database_url: impl Into<String>) -> Self {
        Self {
            database_url: database_url.into(),
            publication: "fanout".into(),
            slot: "fanout".into(),
            routes: Arc::new(Routes::default()),
            max_record_bytes: 1024 * 1024,
            standby_poll: Duration::from_secs(1),
            stop_grace: Duration::from_secs(10),
            memberships: Vec::new(),
            members: None,
        }
    }
}

/// Ingester failures. [`CdcError::is_fatal`] ones need an operator.
#[derive(Debug, thiserror::Error)]
pub enum CdcError {
    #[error("invalid database URL: {0}")]
    Url(String),
    #[error("PostgreSQL is not set up for fanout's change stream: {problem}\n  fix: {fix}")]
    Setup { problem: String, fix: String },
    #[error("the slot is held by another session (pid {0})")]
    SlotBusy(String),
    #[error("replication: {0}")]
    Replication(#[from] PgWireError),
    #[error("undecodable change stream: {0}")]
    Decode(#[from] pgoutput::DecodeError),
    #[error("change record: {0}")]
    Record(#[from] RecordError),
    #[error("publishing changes: {0}")]
    Bus(#[from] BusError),
}

impl CdcError {
    /// Whether retrying cannot help until the configuration or the server
    /// changes.
    pub fn is_fatal(&self) -> bool {
        matches!(self, Self::Url(_) | Self::Setup { .. })
    }
}

/// Changes published in one bus call at most.
const MAX_BATCH: usize = 8192;

/// Runs the ingester until `shutdown`: standby while another instance holds
/// the slot, streaming otherwise, reconnecting with backoff after transient
/// errors. Returns a fatal error (bad URL, server not set up) at once. On
/// shutdown the session in progress ends by itself, within
/// [`CdcConfig::stop_grace`].
pub async fn run(config: CdcConfig, bus: Arc<dyn Bus>, shutdown: CancellationToken) -> Result<(), CdcError> {
    let repl = replication_config(&config)?;
    let mut delay = Duration::from_millis(200);
    let mut said_standby = false;
    loop {
        metrics::gauge!("fanout_cdc_active").set(0.0);
        let session = session(&config, repl.clone(), bus.as_ref(), &shutdown);
        tokio::pin!(session);
        let result = tokio::select! {
            r = &mut session => r,
            () = shutdown.cancelled() => {
                stop(session, config.stop_grace).await;
                return Ok(());
            }
        };
        let wait = match result {
            Ok(()) => return Ok(()),
            Err(e) if e.is_fatal() => return Err(e),
            Err(CdcError::SlotBusy(pid)) => {
                if !said_standby {
                    tracing::info!(slot = %config.slot, holder = %pid, "standby: another session streams the slot; waiting to take over");
                    said_standby = true;
                }
                config.standby_poll
            }
            Err(e) => {
                said_standby = false;
                tracing::warn!(error = %e, retry_in = ?delay, "change stream interrupted; reconnecting");
                metrics::counter!("fanout_cdc_reconnects_total").increment(1);
                let d = delay;
                delay = (delay * 2).min(Duration::from_secs(10));
                d
            }
        };
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            () = shutdown.cancelled() => return Ok(()),
        }
    }
}

/// Lets a session that saw shutdown end by itself, within `grace`.
///
/// The session watches the same token: it finishes a publish in flight
/// (confirming it to the slot only once the bus stored it) and ends the
/// stream cleanly. Dropping it instead would cut both short. The wait is
/// bounded because a publish waits for the bus, however long it takes;
/// dropping it then loses nothing, as the slot was not confirmed past what
/// the bus has.
async fn stop(session: impl Future<Output = Result<(), CdcError>>, grace: Duration) {
    match tokio::time::timeout(grace, session).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::warn!(error = %e, "change stream ended with an error while stopping"),
        Err(_) => tracing::warn!(?grace, "change stream did not stop within the grace period; dropped"),
    }
}

/// Parses the database URL into a replication session configuration.
fn replication_config(config: &CdcConfig) -> Result<ReplicationConfig, CdcError> {
    let url = url::Url::parse(&config.database_url).map_err(|e| CdcError::Url(e.to_string()))?;
    if !matches!(url.scheme(), "postgres" | "postgresql") {
        return Err(CdcError::Url(format!(
            "scheme must be postgres://, not {}://",
            url.scheme()
        )));
    }
    let decode = |s: &str| {
        url::form_urlencoded::parse(format!("x={s}").as_bytes())
            .next()
            .map(|(_, v)| v.into_owned())
            .unwrap_or_default()
    };
    let host = url.host_str().unwrap_or("localhost").to_owned();
    let user = match url.username() {
        "" => "postgres".to_owned(),
        u => decode(u),
    };
    let password = url.password().map(decode).unwrap_or_default();
    let database = url.path().trim_start_matches('/');
    let database = if database.is_empty() {
        user.clone()
    } else {
        decode(database)
    };
    let mut tls = TlsConfig::disabled();
    for (k, v) in url.query_pairs() {
        if k == "sslmode" {
            tls = match v.as_ref() {
                "disable" => TlsConfig::disabled(),
                "require" => TlsConfig::require(),
                "verify-ca" => TlsConfig::verify_ca(None),
                "verify-full" => TlsConfig::verify_full(None),
                other => return Err(CdcError::Url(format!("unsupported sslmode {other:?}"))),
            };
        }
    }
    Ok(ReplicationConfig::new(
        host,
        user,
        password,
        database,
        config.slot.clone(),
        config.publication.clone(),
    )
    .with_port(url.port().unwrap_or(5432))
    .with_tls(tls)
    .with_status_interval(Duration::from_millis(500))
    .with_wakeup_interval(Duration::from_secs(2))
    // Values are decoded as ISO dates and UTC timestamps whatever the
    // server's defaults.
    .with_options("-c datestyle=ISO,YMD -c timezone=UTC -c intervalstyle=iso_8601 -c extra_float_digits=1"))
}

pub(crate) fn quote_literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

pub(crate) fn text(row: &[Option<bytes::Bytes>], i: usize) -> Option<String> {
    row.get(i)?.as_ref().map(|b| String::from_utf8_lossy(b).into_owned())
}

/// Checks the server's setup and the slot on a gated session.
async fn prepare(client: &mut ReplicationClient, config: &CdcConfig) -> Result<(), CdcError> {
    let wal_level = client.simple_query("SHOW wal_level").await?;
    let wal_level = wal_level.first().and_then(|r| text(r, 0)).unwrap_or_default();
    if wal_level != "logical" {
        return Err(CdcError::Setup {
            problem: format!("wal_level is {wal_level:?}, logical replication needs \"logical\""),
            fix: "ALTER SYSTEM SET wal_level = logical; then restart PostgreSQL".into(),
        });
    }
    let publication = client
        .simple_query(&format!(
            "SELECT 1 FROM pg_catalog.pg_publication WHERE pubname = {}",
            quote_literal(&config.publication)
        ))
        .await?;
    if publication.is_empty() {
        return Err(CdcError::Setup {
            problem: format!("publication {:?} does not exist", config.publication),
            fix: format!(
                "CREATE PUBLICATION \"{}\" FOR TABLE <your tables>;  (see deploy/sql/workshop.sql)",
                config.publication
            ),
        });
    }
    let slot = client
        .simple_query(&format!(
            "SELECT plugin, active_pid FROM pg_catalog.pg_replication_slots WHERE slot_name = {}",
            quote_literal(&config.slot)
        ))
        .await?;
    match slot.first() {
        Some(row) => {
            let plugin = text(row, 0).unwrap_or_default();
            if plugin != "pgoutput" {
                return Err(CdcError::Setup {
                    problem: format!("slot {:?} uses plugin {plugin:?}, not pgoutput", config.slot),
                    fix: format!(
                        "SELECT pg_drop_replication_slot({});  (fanout recreates it)",
                        quote_literal(&config.slot)
                    ),
                });
            }
            if let Some(pid) = text(row, 1) {
                return Err(CdcError::SlotBusy(pid));
            }
        }
        None => {
            tracing::info!(slot = %config.slot, "creating the replication slot");
            let created = client
                .simple_query(&format!(
                    "CREATE_REPLICATION_SLOT \"{}\" LOGICAL pgoutput NOEXPORT_SNAPSHOT",
                    config.slot.replace('"', "")
                ))
                .await;
            if let Err(e) = created {
                let msg = e.to_string();
                if msg.contains("already exists") {
                    // Another instance created it at the same moment.
                    return Err(CdcError::SlotBusy("unknown".into()));
                }
                return Err(CdcError::Setup {
                    problem: format!("cannot create replication slot {:?}: {msg}", config.slot),
                    fix: "ALTER ROLE <user> WITH REPLICATION;  and check max_replication_slots".into(),
                });
            }
        }
    }
    Ok(())
}

/// Maps session errors that name a setup problem to [`CdcError::Setup`].
fn classify(e: PgWireError) -> CdcError {
    let msg = e.to_string();
    if msg.contains("is active for PID") {
        CdcError::SlotBusy(msg)
    } else if msg.contains("must be superuser or replication role") || msg.contains("permission denied") {
        CdcError::Setup {
            problem: msg,
            fix: "ALTER ROLE <user> WITH REPLICATION;  (and GRANT SELECT on the published tables)".into(),
        }
    } else if msg.contains("pg_hba.conf") {
        CdcError::Setup {
            problem: msg,
            fix: "allow replication connections for the user in pg_hba.conf: host replication <user> <addr> <method>"
                .into(),
        }
    } else {
        CdcError::Replication(e)
    }
}

/// One transaction being collected.
struct Transaction {
    commit_lsn: u64,
    timestamp: String,
    commit_micros: i64,
    changes: Vec<(String, Event)>,
}

/// The membership mirror this session writes: the sets' state, the
/// snapshot's consistent point and the revision the store last answered.
struct Mirror<'a> {
    store: &'a dyn MemberStore,
    sets: &'a [MembershipSet],
    state: MemberState,
    /// Membership changes of transactions committed before it are in the
    /// snapshot already.
    consistent: u64,
    revision: u64,
}

impl<'a> Mirror<'a> {
    /// Reads the sets at a consistent point and makes the store hold them.
    async fn load(
        config: &'a CdcConfig,
        client: &mut ReplicationClient,
        repl: &ReplicationConfig,
    ) -> Result<Option<Mirror<'a>>, CdcError> {
        let Some(store) = config.members.as_deref() else {
            return Ok(None);
        };
        if config.memberships.is_empty() {
            return Ok(None);
        }
        crate::members::check_tables(client, &config.publication, &config.memberships).await?;
        let started = Instant::now();
        let (state, consistent) = crate::members::snapshot(repl.clone(), &config.slot, &config.memberships).await?;
        let rows = state.rows();
        let revision = store.replace(state.full()).await?;
        metrics::gauge!("fanout_cdc_membership_rows").set(rows as f64);
        metrics::histogram!("fanout_cdc_membership_load_seconds").record(started.elapsed().as_secs_f64());
        tracing::info!(rows, at = %consistent, revision, took = ?started.elapsed(), "membership sets loaded");
        Ok(Some(Mirror {
            store,
            sets: &config.memberships,
            state,
            consistent: consistent.as_u64(),
            revision,
        }))
    }

    /// Applies a change of a membership table from a transaction
    /// committed at `commit_lsn` (skipped when the snapshot has it).
    fn apply(&mut self, commit_lsn: u64, change: &fanout_core::ChangeRecord) {
        if commit_lsn < self.consistent {
            return;
        }
        for set in self.sets {
            if set.schema == change.schema && set.table == change.table {
                self.state.apply(set, change);
            }
        }
    }

    /// Writes the users changed since the last write; returns the revision
    /// the changes published after it must be decided against.
    async fn write(&mut self) -> Result<u64, CdcError> {
        let updates = self.state.take_updates();
        if !updates.is_empty() {
            let n = updates.len() as u64;
            self.revision = self.revision.max(self.store.update(updates).await?);
            metrics::counter!("fanout_cdc_membership_updates_total").increment(n);
            metrics::gauge!("fanout_cdc_membership_rows").set(self.state.rows() as f64);
        }
        Ok(self.revision)
    }
}

/// Committed transactions waiting to be published.
#[derive(Default)]
struct Pending {
    changes: Vec<(String, Event)>,
    transactions: u64,
    /// End of the last commit in the batch: the slot position to confirm.
    end_lsn: Option<Lsn>,
    /// Commit time of the last transaction, microseconds since 2000.
    last_commit_micros: i64,
}

async fn session(
    config: &CdcConfig,
    repl: ReplicationConfig,
    bus: &dyn Bus,
    shutdown: &CancellationToken,
) -> Result<(), CdcError> {
    let setup = async {
        let mut client = ReplicationClient::connect_gated(repl.clone()).await.map_err(classify)?;
        // The session authenticates in the background: a refused login or a
        // missing privilege surfaces on the first query.
        prepare(&mut client, config).await.map_err(|e| match e {
            CdcError::Replication(e) => classify(e),
            other => other,
        })?;
        // Before the stream starts: its first changes may need the sets.
        let mirror = Mirror::load(config, &mut client, &repl).await.map_err(|e| match e {
            CdcError::Replication(e) => classify(e),
            other => other,
        })?;
        client.start().await.map_err(classify)?;
        client.wait_started().await.map_err(classify)?;
        Ok::<_, CdcError>((client, mirror))
    };
    // Nothing is published before the stream starts, so shutdown need not
    // wait for a setup (a connect to an unreachable server can take long).
    let (mut client, mut mirror) = tokio::select! {
        client = setup => client?,
        () = shutdown.cancelled() => return Ok(()),
    };
    tracing::info!(slot = %config.slot, publication = %config.publication, "streaming changes");
    metrics::gauge!("fanout_cdc_active").set(1.0);

    let mut catalog = Catalog::default();
    let mut tx: Option<Transaction> = None;
    let mut pending = Pending::default();
    loop {
        // Publish what is committed once nothing more is waiting (or the
        // batch is full), so a burst of small transactions shares one
        // round of acknowledgements.
        let event = if tx.is_none() && pending.end_lsn.is_some() {
            match client.recv().now_or_never() {
                Some(ev) if pending.changes.len() < MAX_BATCH => ev,
                Some(ev) => {
                    flush(&client, bus, &mut pending, mirror.as_mut()).await?;
                    ev
                }
                None => {
                    flush(&client, bus, &mut pending, mirror.as_mut()).await?;
                    continue;
                }
            }
        } else {
            tokio::select! {
                ev = client.recv() => ev,
                () = shutdown.cancelled() => {
                    // Waits for the replication worker to end the stream
                    // (CopyDone), so the process does not exit under it.
                    client.shutdown().await.map_err(classify)?;
                    return Ok(());
                }
            }
        };
        let Some(event) = event.map_err(classify)? else {
            return Err(CdcError::Replication(PgWireError::Protocol(
                "replication stream ended".into(),
            )));
        };
        match event {
            ReplicationEvent::Begin {
                final_lsn,
                commit_time_micros,
                ..
            } => {
                tx = Some(Transaction {
                    commit_lsn: final_lsn.as_u64(),
                    timestamp: commit_timestamp(commit_time_micros),
                    commit_micros: commit_time_micros,
                    changes: Vec::new(),
                });
            }
            ReplicationEvent::XLogData { data, .. } => {
                let message = pgoutput::decode(&data)?;
                catalog.learn(&message);
                if let Message::Truncate { .. } = message {
                    // Supabase Realtime does not deliver truncates either.
                    metrics::counter!("fanout_cdc_truncates_skipped_total").increment(1);
                    continue;
                }
                let Some(t) = tx.as_mut() else { continue };
                if let Some(record) = catalog.record(&message, &t.timestamp, config.max_record_bytes)? {
                    let change = &record.change;
                    if let Some(m) = mirror.as_mut() {
                        m.apply(t.commit_lsn, change);
                    }
                    let channel = config
                        .routes
                        .channel_for_change(&change.schema, &change.table, change.row());
                    if let Some(column) = config.routes.routed_by(&change.schema, &change.table)
                        && change.row().get(column).is_none_or(|v| v.is_null())
                    {
                        // Typically a delete under REPLICA IDENTITY DEFAULT: the
                        // old row has only the key. It goes to the table
                        // channel, which routed bindings do not watch.
                        metrics::counter!("fanout_cdc_unroutable_changes_total").increment(1);
                        tracing::warn!(
                            table = %format!("{}.{}", change.schema, change.table),
                            column,
                            "a {} has no {column} to route by; set REPLICA IDENTITY FULL on the table",
                            change.change_type.as_str()
                        );
                    }
                    let id = format!("{}:{:X}:{}", config.slot, t.commit_lsn, t.changes.len());
                    t.changes
                        .push((id, Event::change(channel, change.change_type, record.json.into())));
                }
            }
            ReplicationEvent::Commit { end_lsn, .. } => {
                if let Some(t) = tx.take() {
                    pending.changes.extend(t.changes);
                    pending.transactions += 1;
                    pending.last_commit_micros = t.commit_micros;
                }
                pending.end_lsn = Some(end_lsn);
            }
            ReplicationEvent::KeepAlive { wal_end, .. } if tx.is_none() && pending.end_lsn.is_none() => {
                // Idle: every commit the server sent before this heartbeat
                // is published and confirmed, so its WAL position is done
                // with too. Without this the slot's confirmed position
                // stays at the last published commit while unrelated writes
                // move the WAL on, and a fast shutdown of PostgreSQL waits
                // (up to wal_sender_timeout) for the walsender's client to
                // confirm the shutdown checkpoint.
                confirm(&client, wal_end);
            }
            _ => {}
        }
    }
}

/// Writes the membership changes of the pending transactions, publishes
/// their changes (stamped with the mirror's revision), then confirms their
/// position to the slot.
async fn flush(
    client: &ReplicationClient,
    bus: &dyn Bus,
    pending: &mut Pending,
    mirror: Option<&mut Mirror<'_>>,
) -> Result<(), CdcError> {
    let mut batch = std::mem::take(pending);
    if let Some(m) = mirror {
        let revision = m.write().await?;
        for (_, ev) in &mut batch.changes {
            ev.memberships = revision;
        }
    }
    let started = Instant::now();
    let n = batch.changes.len() as u64;
    if n > 0 {
        bus.publish_deduplicated(batch.changes).await?;
        metrics::histogram!("fanout_cdc_publish_seconds").record(started.elapsed().as_secs_f64());
        // Commit in Postgres → acknowledged by the bus.
        let commit_unix_ms = batch.last_commit_micros / 1000 + 946_684_800_000;
        let lag_ms = (fanout_core::now_ms() as i64 - commit_unix_ms).max(0);
        metrics::histogram!("fanout_cdc_commit_to_ack_seconds").record(lag_ms as f64 / 1000.0);
    }
    metrics::counter!("fanout_cdc_changes_published_total").increment(n);
    metrics::counter!("fanout_cdc_transactions_total").increment(batch.transactions);
    if let Some(lsn) = batch.end_lsn {
        confirm(client, lsn);
    }
    Ok(())
}

/// Confirms to the slot that everything up to `lsn` is done with.
fn confirm(client: &ReplicationClient, lsn: Lsn) {
    client.update_applied_lsn(lsn);
    metrics::gauge!("fanout_cdc_confirmed_lsn").set(lsn.as_u64() as f64);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn database_urls_parse_into_sessions() {
        let mut c = CdcConfig::new("postgres://fan%40out:p%2Fw@db.internal:6543/app?sslmode=require");
        c.slot = "s1".into();
        let r = replication_config(&c).unwrap();
        assert_eq!(
            (
                r.host.as_str(),
                r.port,
                r.user.as_str(),
                r.password.as_str(),
                r.database.as_str()
            ),
            ("db.internal", 6543, "fan@out", "p/w", "app")
        );
        assert_eq!(r.slot, "s1");
        assert!(r.tls.mode.requires_tls());
        let r = replication_config(&CdcConfig::new("postgresql://127.0.0.1")).unwrap();
        assert_eq!(
            (r.port, r.user.as_str(), r.database.as_str()),
            (5432, "postgres", "postgres")
        );
        assert!(!r.tls.mode.requires_tls());
        for bad in ["mysql://x/y", "not a url", "postgres://h/db?sslmode=sometimes"] {
            let e = replication_config(&CdcConfig::new(bad)).unwrap_err();
            assert!(e.is_fatal(), "{bad}: {e}");
        }
    }

    #[test]
    fn literals_are_quoted() {
        assert_eq!(quote_literal("a'b"), "'a''b'");
    }
}
