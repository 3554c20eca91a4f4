//! The membership mirror: every membership set's (user → values), kept
//! where every edge can read it, and the seam the change ingester writes
//! it through.
//!
//! - [`MemberMirror`] is one process's copy: what policies read (it is a
//!   [`Members`]), the *revision* it has reached, and a feed of the users
//!   whose memberships changed (edges re-decide those users' channels).
//! - [`MemberStore`] is the writer's side. [`MemoryMembers`] writes the
//!   mirror in place (standalone); [`NatsMembers`] writes a JetStream
//!   key-value bucket, one key per (set, user) holding the user's values
//!   as a JSON array, and keeps a mirror from a watch of the bucket.
//!
//! Ordering is by revision. A store answers every write with the
//! revision it reached (the bucket's stream sequence), the ingester stamps
//! each change it publishes after that write with it
//! ([`fanout_core::Event::memberships`]), and an edge delivers such a
//! change only once its mirror has reached the stamp
//! ([`MemberMirror::wait_for`]): a change committed after a membership row
//! is never decided against a mirror that lacks the row.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use async_nats::jetstream;
use bytes::Bytes;
use fanout_core::membership::{Members, mirror_key, parse_mirror_key};
use futures_util::StreamExt;
use serde_json::Value;
use tokio::sync::{broadcast, watch};
use tokio_util::sync::CancellationToken;

use crate::bus::{BoxFuture, BusError, unavailable};

/// One user's values in one set; `None` removes the user from the set.
pub type MemberUpdate = (String, String, Option<Arc<[Value]>>);

/// A user whose memberships changed in the mirror.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemberChange {
    pub set: String,
    pub user: String,
}

/// Users' values by set, then by user.
type Sets = HashMap<String, HashMap<String, Arc<[Value]>>>;

/// One process's copy of the membership sets. See the module docs.
pub struct MemberMirror {
    sets: RwLock<Sets>,
    /// Values held over every set and user (the `fanout_members_rows` gauge).
    rows: std::sync::atomic::AtomicUsize,
    revision: watch::Sender<u64>,
    /// Whether the initial load is complete (joins may be decided).
    ready: watch::Sender<bool>,
    changes: broadcast::Sender<MemberChange>,
}

impl Default for MemberMirror {
    fn default() -> Self {
        Self {
            sets: RwLock::default(),
            rows: std::sync::atomic::AtomicUsize::new(0),
            revision: watch::Sender::new(0),
            ready: watch::Sender::new(false),
            changes: broadcast::Sender::new(4096),
        }
    }
}

impl std::fmt::Debug for MemberMirror {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemberMirror")
            .field("revision", &self.revision())
            .field("ready", &self.is_ready())
            .finish_non_exhaustive()
    }
}

impl Members for MemberMirror {
    fn values(&self, set: &str, user: &str) -> Option<Arc<[Value]>> {
        self.sets
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(set)?
            .get(user)
            .cloned()
    }
}

impl MemberMirror {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Applies `updates` and raises the revision to `revision` (never
    /// lowers it); every changed user is announced.
    pub fn apply(&self, revision: u64, updates: impl IntoIterator<Item = MemberUpdate>) {
        let mut changed = Vec::new();
        {
            let mut sets = self.sets.write().unwrap_or_else(|e| e.into_inner());
            let (mut added, mut removed) = (0, 0);
            for (set, user, values) in updates {
                let users = sets.entry(set.clone()).or_default();
                let new = values.filter(|v| !v.is_empty());
                added += new.as_ref().map_or(0, |v| v.len());
                let old = match new.clone() {
                    Some(v) => users.insert(user.clone(), v),
                    None => users.remove(&user),
                };
                removed += old.as_ref().map_or(0, |v| v.len());
                if old != new {
                    changed.push(MemberChange { set, user });
                }
            }
            use std::sync::atomic::Ordering::Relaxed;
            let rows = (self.rows.load(Relaxed) + added).saturating_sub(removed);
            self.rows.store(rows, Relaxed);
            metrics::gauge!("fanout_members_rows").set(rows as f64);
        }
        self.revision.send_if_modified(|r| {
            let raise = revision > *r;
            if raise {
                *r = revision;
            }
            raise
        });
        metrics::gauge!("fanout_members_revision").set(self.revision() as f64);
        metrics::counter!("fanout_members_updates_total").increment(changed.len() as u64);
        for c in changed {
            // No receiver is fine: nobody needs to re-decide anything.
            let _ = self.changes.send(c);
        }
    }

    /// The revision the mirror has reached.
    pub fn revision(&self) -> u64 {
        *self.revision.borrow()
    }

    /// Waits until the mirror reached `revision`, at most `timeout`; false
    /// if it did not.
    pub async fn wait_for(&self, revision: u64, timeout: Duration) -> bool {
        if self.revision() >= revision {
            return true;
        }
        let mut rx = self.revision.subscribe();
        tokio::time::timeout(timeout, rx.wait_for(|r| *r >= revision))
            .await
            .is_ok_and(|r| r.is_ok())
    }

    /// Marks the initial load complete.
    pub fn set_ready(&self) {
        self.ready.send_replace(true);
    }

    pub fn is_ready(&self) -> bool {
        *self.ready.borrow()
    }

    /// Waits for the initial load, at most `timeout`; false if it is not
    /// complete by then.
    pub async fn wait_ready(&self, timeout: Duration) -> bool {
        let mut rx = self.ready.subscribe();
        tokio::time::timeout(timeout, rx.wait_for(|r| *r))
            .await
            .is_ok_and(|r| r.is_ok())
    }

    /// The users whose memberships change from now on. A receiver that
    /// lags gets [`broadcast::error::RecvError::Lagged`]: it then must
    /// re-decide every user.
    pub fn changes(&self) -> broadcast::Receiver<MemberChange> {
        self.changes.subscribe()
    }

    /// Every (set, user) with its values: for a writer to diff against.
    pub fn snapshot(&self) -> HashMap<(String, String), Arc<[Value]>> {
        let sets = self.sets.read().unwrap_or_else(|e| e.into_inner());
        sets.iter()
            .flat_map(|(set, users)| users.iter().map(move |(u, v)| ((set.clone(), u.clone()), v.clone())))
            .collect()
    }

    /// The updates that turn the mirror into `state`.
    pub fn diff(&self, state: &HashMap<(String, String), Arc<[Value]>>) -> Vec<MemberUpdate> {
        let current = self.snapshot();
        let mut updates: Vec<MemberUpdate> = state
            .iter()
            .filter(|(k, v)| current.get(*k) != Some(*v))
            .map(|((s, u), v)| (s.clone(), u.clone(), Some(v.clone())))
            .collect();
        updates.extend(
            current
                .keys()
                .filter(|k| !state.contains_key(*k))
                .map(|(s, u)| (s.clone(), u.clone(), None)),
        );
        updates
    }
}

/// The writer's side of the mirror (the change ingester). See the module
/// docs for the revisions each write answers.
pub trait MemberStore: std::fmt::Debug + Send + Sync + 'static {
    /// Makes the stored sets exactly `state` (an ingester's snapshot):
    /// writes the users that differ, removes those no longer there.
    /// Returns the revision reached.
    fn replace(&self, state: HashMap<(String, String), Arc<[Value]>>) -> BoxFuture<'_, Result<u64, BusError>>;
    /// Writes these users' values (`None`: no longer in the set). Returns
    /// the revision reached.
    fn update(&self, updates: Vec<MemberUpdate>) -> BoxFuture<'_, Result<u64, BusError>>;
    /// The mirror this process reads.
    fn mirror(&self) -> Arc<MemberMirror>;
}

/// The in-process store of standalone mode: writes are the mirror's.
#[derive(Debug, Default)]
pub struct MemoryMembers {
    mirror: Arc<MemberMirror>,
    next: std::sync::Mutex<u64>,
}

impl MemoryMembers {
    pub fn new() -> Arc<Self> {
        let store = Arc::new(Self::default());
        store.mirror.set_ready();
        store
    }

    fn write(&self, updates: Vec<MemberUpdate>) -> u64 {
        let mut next = self.next.lock().unwrap_or_else(|e| e.into_inner());
        *next += 1;
        self.mirror.apply(*next, updates);
        *next
    }
}

impl MemberStore for MemoryMembers {
    fn replace(&self, state: HashMap<(String, String), Arc<[Value]>>) -> BoxFuture<'_, Result<u64, BusError>> {
        let updates = self.mirror.diff(&state);
        Box::pin(async move { Ok(self.write(updates)) })
    }

    fn update(&self, updates: Vec<MemberUpdate>) -> BoxFuture<'_, Result<u64, BusError>> {
        Box::pin(async move { Ok(self.write(updates)) })
    }

    fn mirror(&self) -> Arc<MemberMirror> {
        self.mirror.clone()
    }
}

/// The bucket every process of a cluster shares.
pub const BUCKET: &str = "fanout_members";

/// Writes acknowledged together at most.
const WRITE_CHUNK: usize = 1024;

/// The mirror in a JetStream key-value bucket. Every process that opens
/// it watches the bucket into its [`MemberMirror`], until `shutdown`.
pub struct NatsMembers {
    js: jetstream::Context,
    /// The bucket's stream.
    stream: jetstream::stream::Stream,
    mirror: Arc<MemberMirror>,
}

impl std::fmt::Debug for NatsMembers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NatsMembers").finish_non_exhaustive()
    }
}

impl NatsMembers {
    /// Opens (creating it if needed) the bucket on `bus`'s NATS, with as
    /// many replicas as its streams, and starts the watch that keeps this
    /// process's mirror.
    pub async fn open(bus: &crate::NatsBus, shutdown: CancellationToken) -> Result<Arc<Self>, BusError> {
        let replicas = bus.replicas();
        let js = jetstream::new(bus.client());
        // The bucket's stream, created here rather than by the client's
        // `create_key_value`, which first asks for the account's info in a
        // form NATS 2.9 does not answer; the configuration is the one a
        // key-value bucket has (one value per key, rollups, direct gets),
        // so NATS's own `nats kv` tools read it.
        let name = format!("KV_{BUCKET}");
        let stream = match js.get_stream(&name).await {
            Ok(stream) => stream,
            Err(_) => {
                let created = js
                    .create_stream(jetstream::stream::Config {
                        name: name.clone(),
                        description: Some("fanout membership sets: <set>.<user> -> JSON array of values".into()),
                        subjects: vec![format!("$KV.{BUCKET}.>")],
                        max_messages_per_subject: 1,
                        allow_rollup: true,
                        deny_delete: true,
                        allow_direct: true,
                        discard: jetstream::stream::DiscardPolicy::New,
                        num_replicas: replicas.max(1),
                        storage: jetstream::stream::StorageType::File,
                        ..Default::default()
                    })
                    .await;
                if let Err(e) = created {
                    // Another process may have created it meanwhile.
                    tracing::debug!(error = %e, "membership bucket creation raced");
                }
                js.get_stream(&name).await.map_err(unavailable)?
            }
        };
        let mirror = MemberMirror::new();
        tokio::spawn(watch_bucket(stream.clone(), mirror.clone(), shutdown));
        Ok(Arc::new(Self { js, stream, mirror }))
    }

    /// Publishes `updates` pipelined, then awaits their acks; the last
    /// ack's sequence is the revision reached.
    async fn write(&self, updates: Vec<MemberUpdate>) -> Result<u64, BusError> {
        let mut revision = 0;
        let mut updates = updates.into_iter().peekable();
        while updates.peek().is_some() {
            let mut acks = Vec::with_capacity(WRITE_CHUNK);
            for (set, user, values) in updates.by_ref().take(WRITE_CHUNK) {
                let subject = format!("$KV.{BUCKET}.{}", mirror_key(&set, &user));
                let message = match values.filter(|v| !v.is_empty()) {
                    Some(values) => jetstream::message::PublishMessage::build().payload(Bytes::from(
                        serde_json::to_vec(&*values).unwrap_or_else(|_| b"[]".to_vec()),
                    )),
                    None => jetstream::message::PublishMessage::build().header("KV-Operation", "DEL"),
                };
                acks.push(self.js.send_publish(subject, message).await.map_err(unavailable)?);
            }
            for ack in acks {
                revision = revision.max(ack.await.map_err(unavailable)?.sequence);
            }
        }
        Ok(revision)
    }

    /// The bucket's last revision (0 when empty).
    async fn last_revision(&self) -> Result<u64, BusError> {
        let mut stream = self.stream.clone();
        Ok(stream.info().await.map_err(unavailable)?.state.last_sequence)
    }
}

impl MemberStore for NatsMembers {
    fn replace(&self, state: HashMap<(String, String), Arc<[Value]>>) -> BoxFuture<'_, Result<u64, BusError>> {
        Box::pin(async move {
            // Diff against the bucket as it is now: the watch must have
            // delivered all of it first.
            let last = self.last_revision().await?;
            if !self.mirror.wait_for(last, Duration::from_secs(60)).await {
                return Err(BusError::Unavailable(format!(
                    "the membership bucket's watch did not reach revision {last} within 60 s"
                )));
            }
            let updates = self.mirror.diff(&state);
            let written = self.write(updates).await?;
            Ok(written.max(last))
        })
    }

    fn update(&self, updates: Vec<MemberUpdate>) -> BoxFuture<'_, Result<u64, BusError>> {
        Box::pin(self.write(updates))
    }

    fn mirror(&self) -> Arc<MemberMirror> {
        self.mirror.clone()
    }
}

/// Keeps `mirror` equal to the bucket: every entry from the start, then
/// every change; after an interruption, from the revision after the last
/// one applied. The mirror is ready once it reached the revision the
/// bucket had when the read started.
///
/// An ordered pull consumer on the bucket's stream, rather than the
/// client's key-value watch: that one filters with `filter_subjects`, which
/// NATS before 2.10 does not know.
async fn watch_bucket(stream: jetstream::stream::Stream, mirror: Arc<MemberMirror>, shutdown: CancellationToken) {
    let prefix = format!("$KV.{BUCKET}.");
    let mut delay = Duration::from_millis(100);
    loop {
        let started = async {
            let mut stream = stream.clone();
            let last = stream.info().await.map_err(unavailable)?.state.last_sequence;
            let consumer = stream
                .create_consumer(jetstream::consumer::pull::OrderedConfig {
                    filter_subject: format!("{prefix}>"),
                    deliver_policy: jetstream::consumer::DeliverPolicy::ByStartSequence {
                        start_sequence: mirror.revision() + 1,
                    },
                    ..Default::default()
                })
                .await
                .map_err(unavailable)?;
            let messages = consumer.messages().await.map_err(unavailable)?;
            Ok::<_, BusError>((last, messages))
        };
        let (last, mut messages) = tokio::select! {
            r = started => match r {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(error = %e, "membership bucket read not started; retrying");
                    tokio::select! {
                        () = tokio::time::sleep(delay) => {}
                        () = shutdown.cancelled() => return,
                    }
                    delay = (delay * 2).min(Duration::from_secs(5));
                    continue;
                }
            },
            () = shutdown.cancelled() => return,
        };
        delay = Duration::from_millis(100);
        if mirror.revision() >= last {
            mirror.set_ready();
        }
        loop {
            let message = tokio::select! {
                m = messages.next() => m,
                () = shutdown.cancelled() => return,
            };
            let message = match message {
                Some(Ok(m)) => m,
                Some(Err(e)) => {
                    tracing::warn!(error = %e, "membership bucket read failed; restarting it");
                    break;
                }
                None => break,
            };
            let Ok(info) = message.info() else { continue };
            let revision = info.stream_sequence;
            if revision <= mirror.revision() {
                // Applied already: async-nats's ordered consumer, recreated
                // before it handed on a message, starts again from the
                // bucket's first entry instead of the start sequence, and
                // re-applying old entries would bring back, for a moment,
                // memberships since revoked.
                continue;
            }
            let key = message.subject.as_str().strip_prefix(&prefix).unwrap_or_default();
            let Some((set, user)) = parse_mirror_key(key) else {
                tracing::warn!(key, "membership bucket key skipped: not <set>.<user>");
                mirror.apply(revision, []);
                continue;
            };
            let deleted = message
                .headers
                .as_ref()
                .and_then(|h| h.get("KV-Operation"))
                .is_some_and(|op| matches!(op.as_str(), "DEL" | "PURGE"));
            let values = if deleted {
                None
            } else {
                match serde_json::from_slice::<Vec<Value>>(&message.payload) {
                    Ok(v) => Some(Arc::from(v)),
                    Err(e) => {
                        tracing::warn!(key, error = %e, "membership entry is not a JSON array; read as empty");
                        None
                    }
                }
            };
            mirror.apply(revision, [(set, user, values)]);
            if !mirror.is_ready() && revision >= last {
                mirror.set_ready();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn vals(v: Vec<Value>) -> Option<Arc<[Value]>> {
        Some(Arc::from(v))
    }

    #[tokio::test]
    async fn the_memory_store_applies_writes_in_revision_order() {
        let store = MemoryMembers::new();
        let mirror = store.mirror();
        let mut changes = mirror.changes();
        assert!(mirror.is_ready());
        let r1 = store
            .update(vec![("w".into(), "u1".into(), vals(vec![json!(7)]))])
            .await
            .unwrap();
        assert!(mirror.wait_for(r1, Duration::from_millis(1)).await);
        assert_eq!(mirror.values("w", "u1").as_deref(), Some(&[json!(7)][..]));
        assert_eq!(
            changes.recv().await.unwrap(),
            MemberChange {
                set: "w".into(),
                user: "u1".into()
            }
        );
        // Replace: u1 gone, u2 added; both announced.
        let state = HashMap::from([(("w".to_owned(), "u2".to_owned()), Arc::from(vec![json!(42)]))]);
        let r2 = store.replace(state).await.unwrap();
        assert!(r2 > r1);
        assert_eq!(mirror.values("w", "u1"), None);
        let mut announced = vec![changes.recv().await.unwrap().user, changes.recv().await.unwrap().user];
        announced.sort();
        assert_eq!(announced, ["u1", "u2"]);
        // Writing the same values again announces nothing.
        store
            .update(vec![("w".into(), "u2".into(), vals(vec![json!(42)]))])
            .await
            .unwrap();
        assert!(changes.try_recv().is_err());
        // A revision not reached yet times out.
        assert!(!mirror.wait_for(r2 + 100, Duration::from_millis(10)).await);
    }
}
