//! The local fan-out hub: one task per channel with local subscribers.
//!
//! Each channel task owns the channel's member list and its single bus
//! subscription, so everything a member sees of a channel (join reply,
//! `presence_state`, replayed history, live events) is sequenced by one
//! task, in one order, with no lock on the delivery path. An event is
//! encoded at most once per [`Wire`] (protocol front and version) and the
//! same `Bytes` go to every member's [`ConnWriter`].
//!
//! A channel task is started by the first join and retires after the last
//! member left and a short linger passed, dropping its bus subscription; the
//! linger avoids churn when a client leaves and rejoins.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use fanout_core::changes::Binding;
use fanout_core::membership::Members;
use fanout_core::{ChangeRecord, ChannelName, Event, EventKind, Origin, Position};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::protocol::{Encoder, Vsn};
use crate::room::Roster;
use crate::wire::Wire;
use crate::writer::ConnWriter;
use fanout_bus::{Bus, MemberMirror, PresenceStore, Replay, Subscription};

/// One connection's membership in a channel: either the channel's own
/// topic, or a *change feed*, the database changes routed to this channel
/// delivered under another topic the connection joined.
#[derive(Debug)]
pub struct Member {
    /// Membership id, unique within this process: the connection id for a
    /// channel's own topic, a fresh id for a change feed.
    pub conn: u64,
    pub origin: Origin,
    /// How this member's connection frames events.
    pub wire: Wire,
    /// `config.broadcast.self`: receive one's own broadcasts.
    pub receive_own: bool,
    /// Receive `presence_state` and `presence_diff`.
    pub presence: bool,
    /// Skip history events at or below this position: the member resumed
    /// from it, possibly coming from an edge that was ahead of this one.
    /// Set by the channel task from the join's `resume_after`.
    pub skip_through: Position,
    /// `Some(topic)` for a change feed: only database changes are
    /// delivered, addressed to `topic`.
    pub feed_topic: Option<Arc<str>>,
    /// The member's `postgres_changes` bindings served by this channel.
    pub changes: Option<Arc<[Binding]>>,
    pub writer: Arc<ConnWriter>,
}

/// A join, handed to the channel task.
#[derive(Debug)]
pub struct JoinRequest {
    pub member: Member,
    /// Frames sent before anything else: the encoded `phx_reply` for the
    /// join and notices after it, sent by the channel task so that every
    /// event after them reaches the member. Empty for a change feed.
    pub reply: Vec<Bytes>,
    /// `config.resume.after`: replay history after this position first.
    pub resume_after: Option<Position>,
    /// Sent instead of `reply` when `resume_after` cannot be replayed (no
    /// longer retained, or history unavailable). `None`: `reply`, then a
    /// `system` message saying a resync is required (Phoenix members).
    pub reply_if_lost: Option<Vec<Bytes>>,
    /// A room member's own user (when tracked): its welcome lists it even
    /// before the channel task has seen the diff that tracked it.
    pub room_user: Option<String>,
    /// Told once the member is registered behind the channel's live bus
    /// subscription: every event published from then on reaches it.
    pub ready: Option<oneshot::Sender<()>>,
}

enum Command {
    Join(JoinRequest),
    Leave { conn: u64 },
    EnablePresence { conn: u64, vsn: Vsn },
    SetChanges { conn: u64, changes: Arc<[Binding]> },
}

struct Entry {
    tx: mpsc::UnboundedSender<Command>,
    members: usize,
    generation: u64,
}

struct Inner {
    bus: Arc<dyn Bus>,
    presence: Arc<dyn PresenceStore>,
    /// The membership sets row rules read (`member.<set>`); `None` when
    /// none are configured (changes' membership stamps are then ignored).
    members: Option<Arc<MemberMirror>>,
    channels: Mutex<HashMap<ChannelName, Entry>>,
    next_generation: std::sync::atomic::AtomicU64,
    linger: Duration,
    tasks: TaskTracker,
    shutdown: CancellationToken,
}

/// The hub. Cheap to clone.
#[derive(Clone)]
pub struct Hub {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Hub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hub")
            .field("channels", &self.channel_count())
            .finish_non_exhaustive()
    }
}

impl Hub {
    pub fn new(
        bus: Arc<dyn Bus>,
        presence: Arc<dyn PresenceStore>,
        members: Option<Arc<MemberMirror>>,
        linger: Duration,
        tasks: TaskTracker,
        shutdown: CancellationToken,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                bus,
                presence,
                members,
                channels: Mutex::new(HashMap::new()),
                next_generation: std::sync::atomic::AtomicU64::new(1),
                linger,
                tasks,
                shutdown,
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<ChannelName, Entry>> {
        self.inner.channels.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Channels with a running task (local subscribers or lingering).
    pub fn channel_count(&self) -> usize {
        self.lock().len()
    }

    /// Every channel with a task, with its local members.
    pub fn members(&self) -> Vec<(ChannelName, usize)> {
        self.lock().iter().map(|(c, e)| (c.clone(), e.members)).collect()
    }

    /// Adds a member; the channel task sends the join reply, then the
    /// presence state (if enabled), then replayed history (if asked), then
    /// live events.
    pub fn join(&self, channel: &ChannelName, request: JoinRequest) {
        let mut channels = self.lock();
        let entry = channels.entry(channel.clone()).or_insert_with(|| {
            let generation = self
                .inner
                .next_generation
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let (tx, rx) = mpsc::unbounded_channel();
            let task = ChannelTask {
                hub: self.clone(),
                topic: channel.topic(),
                channel: channel.clone(),
                generation,
                shards: Vec::new(),
                index: HashMap::new(),
                last: 0,
                roster: None,
            };
            self.inner.tasks.spawn(task.run(rx));
            metrics::gauge!("fanout_channels").increment(1.0);
            Entry {
                tx,
                members: 0,
                generation,
            }
        });
        entry.members += 1;
        // The task only exits after removing its entry under this lock, so
        // the receiver is alive.
        let _ = entry.tx.send(Command::Join(request));
    }

    /// Turns presence on for a member that joined without it (its first
    /// `track` does, as in Supabase Realtime): it gets the channel's
    /// `presence_state` now, in order with its other frames, then every
    /// `presence_diff`.
    pub fn enable_presence(&self, channel: &ChannelName, conn: u64, vsn: Vsn) {
        if let Some(entry) = self.lock().get(channel) {
            let _ = entry.tx.send(Command::EnablePresence { conn, vsn });
        }
    }

    /// Replaces a member's `postgres_changes` bindings (their row rules
    /// re-bound to a refreshed token's claims); changes after this use them.
    pub fn set_changes(&self, channel: &ChannelName, conn: u64, changes: Arc<[Binding]>) {
        if let Some(entry) = self.lock().get(channel) {
            let _ = entry.tx.send(Command::SetChanges { conn, changes });
        }
    }

    /// Removes a member (no-op if it was already dropped as a slow consumer).
    pub fn leave(&self, channel: &ChannelName, conn: u64) {
        let mut channels = self.lock();
        if let Some(entry) = channels.get_mut(channel) {
            entry.members = entry.members.saturating_sub(1);
            let _ = entry.tx.send(Command::Leave { conn });
        }
    }

    /// Called by an idle channel task: retires it if no join arrived since.
    fn try_retire(&self, channel: &ChannelName, generation: u64) -> bool {
        let mut channels = self.lock();
        match channels.get(channel) {
            Some(e) if e.generation == generation && e.members == 0 => {
                channels.remove(channel);
                metrics::gauge!("fanout_channels").decrement(1.0);
                true
            }
            _ => false,
        }
    }
}

/// The mirror to decide `member.<set>` with (none configured: no sets).
fn members_of(members: &Option<Arc<MemberMirror>>) -> &dyn Members {
    match members {
        Some(m) => &**m,
        None => &fanout_core::membership::NoMembers,
    }
}

/// How long a change waits for the membership mirror to reach its stamp.
const MEMBERS_WAIT: Duration = Duration::from_secs(10);

/// Events taken from the bus in one go when several are waiting.
const MAX_BATCH: usize = 64;

/// Members per fan-out shard. A channel's members are spread over shard
/// tasks of at most this many, so a big channel's writes run on every core
/// and no task holds a worker thread for long.
const SHARD_SIZE: usize = 256;

/// Events to deliver, shared by every shard of a channel. Each event is
/// encoded at most once per protocol version, by whichever shard needs it
/// first.
struct Batch {
    topic: String,
    /// When the channel task handed the batch to its shards.
    created: std::time::Instant,
    events: Vec<Event>,
    encoded: Vec<[OnceLock<Option<Bytes>>; Wire::SLOTS]>,
    /// Database changes, decoded once for filtering.
    changes: Vec<OnceLock<Option<Change>>>,
    /// Database change frames by (event, topic, matching binding ids, vsn):
    /// members with the same topic and bindings share one encoding.
    change_frames: Mutex<HashMap<ChangeFrameKey, Bytes>>,
    /// The membership sets row rules read.
    members: Option<Arc<MemberMirror>>,
}

impl Batch {
    /// The channel's name, the topic without `realtime:` (Socket.IO
    /// namespaces are `/<name>`).
    fn name(&self) -> &str {
        self.topic
            .strip_prefix(fanout_core::channel::TOPIC_PREFIX)
            .unwrap_or(&self.topic)
    }

    fn frame(&self, i: usize, wire: Wire) -> Option<&Bytes> {
        self.encoded[i][wire.slot()]
            .get_or_init(|| wire.event(&self.topic, self.name(), &self.events[i], false))
            .as_ref()
    }

    /// The frame of database change `i` for `m`, if any of its bindings
    /// matches (filter and row rule).
    fn change_frame(&self, i: usize, m: &Member, channel_topic: &Arc<str>) -> Option<Bytes> {
        let bindings = m.changes.as_deref()?;
        let change = self.changes[i]
            .get_or_init(|| Change::decode(&self.events[i].payload))
            .as_ref()?;
        let matched = change.matching(bindings, members_of(&self.members));
        if matched.ids.is_empty() {
            return None;
        }
        let topic = m.feed_topic.as_ref().unwrap_or(channel_topic).clone();
        let mut frames = self.change_frames.lock().unwrap_or_else(|e| e.into_inner());
        let key = (i, topic, matched.ids, m.wire, matched.columns.is_some());
        if let Some(f) = frames.get(&key) {
            return Some(f.clone());
        }
        let data = change.data(&self.events[i].payload, matched.columns.as_deref());
        let f = m
            .wire
            .change(&key.1, self.name(), &self.events[i], &data, &key.2, false)?;
        frames.insert(key, f.clone());
        Some(f)
    }
}

/// (event index, topic, matching binding ids, framing, columns
/// stripped). The column allow-list is the table's, the same for every
/// binding of it, but a member with the bypass role gets every column: the
/// last field keeps the two encodings apart.
type ChangeFrameKey = (usize, Arc<str>, Vec<u32>, Wire, bool);

/// A database change, decoded once per batch for its bindings.
struct Change {
    record: ChangeRecord,
    /// The record with only the allow-listed columns, made once.
    trimmed: OnceLock<Bytes>,
}

/// The bindings a change is for, and the columns it may show.
struct Matched {
    ids: Vec<u32>,
    columns: Option<Arc<[String]>>,
}

impl Change {
    fn decode(payload: &[u8]) -> Option<Self> {
        match ChangeRecord::from_json(payload) {
            Ok(record) => Some(Self {
                record,
                trimmed: OnceLock::new(),
            }),
            Err(e) => {
                tracing::warn!(error = %e, "undecodable database change skipped");
                None
            }
        }
    }

    /// The bindings this change is for. A filter or row rule that cannot
    /// be evaluated on the row only excludes its own binding, and is
    /// counted.
    fn matching(&self, bindings: &[Binding], members: &dyn Members) -> Matched {
        let r = &self.record;
        let row = r.row();
        let mut columns = None;
        let mut ids: Vec<u32> = bindings
            .iter()
            .filter(|b| b.wants(&r.schema, &r.table, r.change_type.as_str()))
            .filter(|b| match &b.filter {
                None => true,
                Some(f) => f.matches(row).unwrap_or_else(|e| {
                    metrics::counter!("fanout_change_filter_errors_total").increment(1);
                    tracing::debug!(error = %e, filter = %f, "change filter failed for one binding");
                    false
                }),
            })
            .filter(|b| match &b.access {
                None => true,
                Some(rule) => rule.allows(row, members).unwrap_or_else(|e| {
                    metrics::counter!("fanout_row_policy_errors_total").increment(1);
                    tracing::debug!(error = %e, rule = rule.source(), "row rule failed for one binding");
                    false
                }),
            })
            .map(|b| {
                if columns.is_none() {
                    columns = b.columns.clone();
                }
                b.id
            })
            .collect();
        ids.sort_unstable();
        ids.dedup();
        Matched { ids, columns }
    }

    /// The record as sent: the published bytes, or a copy with only
    /// `columns` (in the record, the old record and the column list).
    fn data(&self, payload: &Bytes, columns: Option<&[String]>) -> Bytes {
        let Some(columns) = columns else {
            return payload.clone();
        };
        self.trimmed
            .get_or_init(|| {
                let keep = |name: &String| columns.contains(name);
                let mut r = self.record.clone();
                r.record.retain(|k, _| keep(k));
                r.old_record.retain(|k, _| keep(k));
                r.columns.retain(|c| keep(&c.name));
                Bytes::from(r.to_json())
            })
            .clone()
    }
}

enum ShardCommand {
    /// Send `preface` (join reply, presence state, replay) then deliver
    /// live events to `member`.
    Add {
        member: Member,
        preface: Vec<Bytes>,
    },
    Remove {
        conn: u64,
    },
    /// Send `state` to `conn`, then deliver presence diffs to it.
    EnablePresence {
        conn: u64,
        state: Bytes,
    },
    SetChanges {
        conn: u64,
        changes: Arc<[Binding]>,
    },
    Deliver {
        batch: Arc<Batch>,
        channel_topic: Arc<str>,
    },
}

struct ShardHandle {
    tx: mpsc::UnboundedSender<ShardCommand>,
    len: usize,
}

struct ChannelTask {
    hub: Hub,
    channel: ChannelName,
    topic: String,
    generation: u64,
    shards: Vec<ShardHandle>,
    /// conn id → index in `shards`.
    index: HashMap<u64, usize>,
    /// Position of the last history event dispatched (or the subscription
    /// head): the boundary between replay and live delivery.
    last: Position,
    /// Who is in the channel per user, kept from the first room member's
    /// join on (room clients get join and leave notices from it).
    roster: Option<Roster>,
}

impl ChannelTask {
    async fn run(mut self, mut commands: mpsc::UnboundedReceiver<Command>) {
        let Some(mut sub) = self.subscribe().await else {
            return;
        };
        self.last = sub.head;
        let mut idle_since = Some(Instant::now());
        loop {
            let linger_until = idle_since.map(|t| t + self.hub.inner.linger);
            tokio::select! {
                biased;
                cmd = commands.recv() => match cmd {
                    Some(Command::Join(req)) => {
                        self.join(req).await;
                        idle_since = None;
                    }
                    Some(Command::Leave { conn }) => {
                        self.remove(conn);
                        if self.index.is_empty() {
                            idle_since = Some(Instant::now());
                        }
                    }
                    Some(Command::EnablePresence { conn, vsn }) => self.enable_presence(conn, vsn).await,
                    Some(Command::SetChanges { conn, changes }) => {
                        if let Some(&shard) = self.index.get(&conn) {
                            let _ = self.shards[shard].tx.send(ShardCommand::SetChanges { conn, changes });
                        }
                    }
                    None => break,
                },
                ev = sub.events.recv() => match ev {
                    Some(ev) => {
                        // Take whatever else is already waiting: under load
                        // each member then gets one write per batch.
                        let mut batch = vec![ev];
                        while batch.len() < MAX_BATCH {
                            match sub.events.try_recv() {
                                Ok(ev) => batch.push(ev),
                                Err(_) => break,
                            }
                        }
                        self.await_members(&batch).await;
                        self.dispatch(batch);
                    }
                    None => {
                        // The bus ended our subscription (transport restart):
                        // take a new one. Events in between are recoverable
                        // by resume; live members may miss them.
                        tracing::warn!(channel = %self.channel, "bus subscription ended; resubscribing");
                        match self.subscribe().await {
                            Some(s) => sub = s,
                            None => break,
                        }
                    }
                },
                () = self.hub.inner.shutdown.cancelled(), if self.index.is_empty() => {
                    self.hub.try_retire(&self.channel, self.generation);
                    break;
                }
                () = sleep_until_opt(linger_until) => {
                    if self.hub.try_retire(&self.channel, self.generation) {
                        break;
                    }
                    idle_since = Some(Instant::now());
                }
            }
        }
    }

    /// Holds a batch until the membership mirror reached the revision its
    /// changes were stamped with (the ingester's membership writes before
    /// them), so a change committed after a membership row is decided with
    /// it. Bounded: past [`MEMBERS_WAIT`] the batch goes out as the mirror
    /// stands, and the wait is counted.
    async fn await_members(&self, batch: &[Event]) {
        let Some(stamp) = batch.iter().map(|e| e.memberships).max().filter(|&s| s > 0) else {
            return;
        };
        let Some(members) = &self.hub.inner.members else {
            return;
        };
        if members.revision() >= stamp {
            return;
        }
        let started = Instant::now();
        let reached = members.wait_for(stamp, MEMBERS_WAIT).await;
        metrics::histogram!("fanout_members_wait_seconds").record(started.elapsed().as_secs_f64());
        if !reached {
            metrics::counter!("fanout_members_wait_timeouts_total").increment(1);
            tracing::warn!(
                channel = %self.channel,
                stamp,
                reached = members.revision(),
                "membership mirror did not reach a change's revision in time; delivering as it stands"
            );
        }
    }

    /// Subscribes with backoff until it works or the process shuts down.
    async fn subscribe(&self) -> Option<Subscription> {
        let mut delay = Duration::from_millis(100);
        loop {
            match self.hub.inner.bus.subscribe(self.channel.clone()).await {
                Ok(s) => return Some(s),
                Err(e) => {
                    tracing::warn!(channel = %self.channel, error = %e, "bus subscribe failed; retrying");
                    tokio::select! {
                        () = tokio::time::sleep(delay) => {}
                        () = self.hub.inner.shutdown.cancelled() => return None,
                    }
                    delay = (delay * 2).min(Duration::from_secs(5));
                }
            }
        }
    }

    async fn join(&mut self, req: JoinRequest) {
        let JoinRequest {
            mut member,
            reply,
            resume_after,
            reply_if_lost,
            room_user,
            ready,
        } = req;
        // A rejoin by the same connection replaces the old membership.
        self.remove(member.conn);
        let wire = member.wire;
        let mut preface = reply;
        if member.presence
            && let Some(vsn) = wire.vsn()
        {
            preface.push(self.presence_state(Encoder(vsn)).await);
        }
        if wire == Wire::Room {
            preface.push(self.roster_welcome(room_user.as_deref()).await);
        }
        if let Some(after) = resume_after {
            let lost = match self.hub.inner.bus.replay(self.channel.clone(), after, self.last).await {
                Ok(Replay::Events(events)) => {
                    member.skip_through = after;
                    metrics::counter!("fanout_replayed_messages_total").increment(events.len() as u64);
                    preface.extend(events.iter().filter_map(|ev| match ev.kind {
                        EventKind::PostgresChange => {
                            let change = Change::decode(&ev.payload)?;
                            let matched =
                                change.matching(member.changes.as_deref()?, members_of(&self.hub.inner.members));
                            if matched.ids.is_empty() {
                                return None;
                            }
                            let data = change.data(&ev.payload, matched.columns.as_deref());
                            wire.change(&self.topic, self.channel.name(), ev, &data, &matched.ids, true)
                        }
                        _ => wire.event(&self.topic, self.channel.name(), ev, true),
                    }));
                    None
                }
                Ok(Replay::Expired) => {
                    metrics::counter!("fanout_resync_required_total").increment(1);
                    Some(format!(
                        "resync required: messages after position {after} are no longer retained"
                    ))
                }
                Err(e) => Some(format!("resync required: history unavailable ({e})")),
            };
            match (lost, reply_if_lost, wire.vsn()) {
                (None, ..) => {}
                (Some(_), Some(instead), _) => preface = instead,
                (Some(message), None, Some(vsn)) => {
                    preface.push(Encoder(vsn).system(&self.topic, "broadcast", false, &message, self.channel.name()))
                }
                (Some(_), None, None) => {}
            }
        }
        let shard = match self.shards.iter().position(|s| s.len < SHARD_SIZE) {
            Some(i) => i,
            None => {
                let (tx, rx) = mpsc::unbounded_channel();
                self.hub.inner.tasks.spawn(run_shard(rx));
                self.shards.push(ShardHandle { tx, len: 0 });
                self.shards.len() - 1
            }
        };
        self.shards[shard].len += 1;
        self.index.insert(member.conn, shard);
        let _ = self.shards[shard].tx.send(ShardCommand::Add { member, preface });
        if let Some(ready) = ready {
            let _ = ready.send(());
        }
    }

    /// The channel's `presence_state` frame (or the store's error, as a
    /// `system` message).
    async fn presence_state(&self, enc: Encoder) -> Bytes {
        match self.hub.inner.presence.state(&self.channel).await {
            Ok(state) => enc.push(&self.topic, "presence_state", &state.to_string()),
            Err(e) => enc.system(&self.topic, "presence", false, &e.to_string(), self.channel.name()),
        }
    }

    /// A room member's welcome. The roster is built from the presence
    /// state at the first room join (between two batches, like a
    /// `presence_state`) and follows every diff dispatched after it.
    async fn roster_welcome(&mut self, own: Option<&str>) -> Bytes {
        if self.roster.is_none() {
            match self.hub.inner.presence.state(&self.channel).await {
                Ok(state) => self.roster = Some(Roster::from_state(&state)),
                Err(e) => {
                    let error = serde_json::json!({ "type": "error", "error": format!("presence unavailable: {e}") });
                    return crate::frame::encode(crate::frame::Opcode::Text, error.to_string().as_bytes());
                }
            }
        }
        self.roster.as_ref().map(|r| r.welcome(own)).unwrap_or_default()
    }

    /// The state is read here, between two batches, so the member misses
    /// no diff after it: diffs dispatched before are in the state.
    async fn enable_presence(&mut self, conn: u64, vsn: Vsn) {
        let Some(&shard) = self.index.get(&conn) else {
            return;
        };
        let state = self.presence_state(Encoder(vsn)).await;
        let _ = self.shards[shard].tx.send(ShardCommand::EnablePresence { conn, state });
    }

    fn remove(&mut self, conn: u64) {
        if let Some(i) = self.index.remove(&conn) {
            self.shards[i].len -= 1;
            let _ = self.shards[i].tx.send(ShardCommand::Remove { conn });
        }
    }

    fn dispatch(&mut self, batch: Vec<Event>) {
        // Drop redeliveries (positions at or below what was dispatched).
        let mut events = Vec::with_capacity(batch.len());
        for ev in batch {
            if ev.position != 0 {
                if ev.position <= self.last {
                    continue;
                }
                self.last = ev.position;
            }
            events.push(ev);
        }
        if events.is_empty() {
            return;
        }
        let now = fanout_core::now_ms();
        for ev in &events {
            if ev.published_at_ms > 0 {
                let lag = now.saturating_sub(ev.published_at_ms);
                metrics::histogram!("fanout_publish_to_dispatch_seconds").record(lag as f64 / 1000.0);
            }
        }
        let encoded: Vec<[OnceLock<Option<Bytes>>; Wire::SLOTS]> = events
            .iter()
            .map(|_| std::array::from_fn(|_| OnceLock::new()))
            .collect();
        if let Some(roster) = &mut self.roster {
            for (ev, slots) in events.iter().zip(&encoded) {
                if ev.kind == EventKind::PresenceDiff {
                    let _ = slots[Wire::Room.slot()].set(roster.apply(&ev.payload));
                }
            }
        }
        let changes = events.iter().map(|_| OnceLock::new()).collect();
        let batch = Arc::new(Batch {
            topic: self.topic.clone(),
            created: std::time::Instant::now(),
            events,
            encoded,
            changes,
            change_frames: Mutex::new(HashMap::new()),
            members: self.hub.inner.members.clone(),
        });
        let channel_topic: Arc<str> = Arc::from(self.topic.as_str());
        for shard in self.shards.iter().filter(|s| s.len > 0) {
            let _ = shard.tx.send(ShardCommand::Deliver {
                batch: batch.clone(),
                channel_topic: channel_topic.clone(),
            });
        }
    }
}

/// One shard of a channel's members: writes each batch to its members.
async fn run_shard(mut commands: mpsc::UnboundedReceiver<ShardCommand>) {
    let mut members: Vec<Member> = Vec::new();
    let mut frames: Vec<Bytes> = Vec::new();
    while let Some(cmd) = commands.recv().await {
        match cmd {
            ShardCommand::Add { member, preface } => {
                // Count the member before its join reply can reach it, so a
                // client that saw SUBSCRIBED is already in the metric.
                metrics::gauge!("fanout_channel_members").increment(1.0);
                if member.writer.send_many(&preface).is_ok() {
                    members.push(member);
                } else {
                    metrics::gauge!("fanout_channel_members").decrement(1.0);
                }
            }
            ShardCommand::Remove { conn } => {
                if let Some(i) = members.iter().position(|m| m.conn == conn) {
                    members.swap_remove(i);
                    metrics::gauge!("fanout_channel_members").decrement(1.0);
                }
            }
            ShardCommand::EnablePresence { conn, state } => {
                if let Some(m) = members.iter_mut().find(|m| m.conn == conn) {
                    m.presence = true;
                    // A failed send means the connection is closing.
                    let _ = m.writer.send(state);
                }
            }
            ShardCommand::SetChanges { conn, changes } => {
                if let Some(m) = members.iter_mut().find(|m| m.conn == conn) {
                    m.changes = Some(changes);
                }
            }
            ShardCommand::Deliver { batch, channel_topic } => {
                let mut delivered = 0u64;
                let before = members.len();
                members.retain(|m| {
                    frames.clear();
                    for (i, ev) in batch.events.iter().enumerate() {
                        if ev.position != 0 && ev.position <= m.skip_through {
                            continue;
                        }
                        match ev.kind {
                            EventKind::PostgresChange => {
                                if let Some(f) = batch.change_frame(i, m, &channel_topic) {
                                    frames.push(f);
                                }
                                continue;
                            }
                            _ if m.feed_topic.is_some() => continue,
                            EventKind::Broadcast if !m.receive_own && ev.origin == Some(m.origin) => continue,
                            EventKind::PresenceDiff if !m.presence => continue,
                            // A room tab's own arrival and departure are
                            // not news to it.
                            EventKind::PresenceDiff if m.wire == Wire::Room && ev.origin == Some(m.origin) => continue,
                            _ => {}
                        }
                        if let Some(f) = batch.frame(i, m.wire) {
                            frames.push(f.clone());
                        }
                    }
                    if frames.is_empty() {
                        return true;
                    }
                    // A member whose connection is closing (or too slow) is
                    // dropped here; its connection's leave is then a no-op.
                    let ok = m.writer.send_many(&frames).is_ok();
                    if ok {
                        delivered += frames.len() as u64;
                    }
                    ok
                });
                metrics::gauge!("fanout_channel_members").decrement((before - members.len()) as f64);
                metrics::counter!("fanout_messages_delivered_total").increment(delivered);
                // From dispatch to this shard's last write: the slowest shard
                // of a batch is when its last member got the event.
                metrics::histogram!("fanout_shard_write_seconds").record(batch.created.elapsed().as_secs_f64());
            }
        }
    }
    metrics::gauge!("fanout_channel_members").decrement(members.len() as f64);
}

async fn sleep_until_opt(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}
