//! The cluster bus: NATS subjects sharded by channel, JetStream for history.
//!
//! # Subjects and streams
//! All of a channel's events (broadcasts, presence diffs, database changes;
//! the kind is in the envelope) go to one subject, `fanout.<shard>.<token>`,
//! where `shard = fanout_core::shard_of(channel, S)` and `token` is
//! `fanout_core::subject_token(channel)`. One subject per channel makes
//! retention per channel, and makes `Nats-Last-Sequence` (below) chain every
//! event of the channel, so no kind of event can go missing unnoticed. The shards
//! are split over `R` JetStream streams `FANOUT_0 … FANOUT_{R-1}`; stream `i`
//! owns shards `[i·S/R, (i+1)·S/R)` through one subject filter per shard
//! (`fanout.<shard>.>`), so load spreads over streams and, in a NATS cluster,
//! over servers. Retention is per channel (`max_messages_per_subject`) and by
//! age (`max_age`). Streams are created or updated at start-up, idempotently.
//!
//! # Positions
//! A position is the JetStream stream sequence of the event. It increases
//! within a channel (a channel lives in exactly one stream), which is all the
//! resume contract needs.
//!
//! # Live delivery
//! Every stream republishes each message it stores (JetStream `RePublish`,
//! at most once) to `fanout-live.<original subject>`, with the stream
//! sequence in `Nats-Sequence` and the sequence of the channel's previous
//! event in `Nats-Last-Sequence`. Each channel with local members
//! holds one plain NATS subscription on
//! `fanout-live.fanout.<shard>.<token>`, on a connection kept for live
//! events (so a flood of them never delays a publish ack on the JetStream
//! connection): no JetStream consumer, no pull
//! requests, no per-consumer heartbeats, so the server's cost is a subject
//! match per message and an edge's cost one message per channel.
//!
//! The subscription is registered (and flushed) before the stream's last
//! sequence is read as its `head`, so every event after `head` reaches it
//! unless core NATS drops it. Drops are caught two ways, and a caught drop is
//! filled from the stream (a catch-up: through the stream leader's message
//! API, and a short-lived ordered consumer for a long range; see
//! `CatchUp::read`) before the next live event is handed on, so delivery stays gapless and in
//! order:
//! * a live event whose `Nats-Last-Sequence` is above the last position
//!   delivered shows that the channel's previous event has not arrived
//!   (dropped, or overtaken; should the original still come, it is skipped);
//! * a reconnect to NATS or a slow-consumer report from the client makes
//!   every subscription catch up from its last position (async-nats does not
//!   say which subscription dropped). Each first looks up its channel's
//!   newest stored event, one request, and only a channel that missed
//!   something reads the stream.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_nats::jetstream::{self, consumer, stream};
use bytes::Bytes;
use fanout_core::{ChannelName, Event, Position, shard_of, subject_token};
use futures_util::StreamExt;
use tokio::sync::{Semaphore, mpsc, watch};

use crate::bus::{
    BoxFuture, Bus, BusError, History, HistoryQuery, Published, Replay, Retention, Subscription, unavailable,
};

/// How to reach NATS and lay out the streams.
#[derive(Debug, Clone)]
pub struct NatsConfig {
    /// Seed URLs, e.g. `nats://127.0.0.1:4222`.
    pub urls: Vec<String>,
    /// Optional `.creds` file.
    pub credentials_file: Option<std::path::PathBuf>,
    /// Optional user and password.
    pub user: Option<(String, String)>,
    /// Require TLS.
    pub tls_required: bool,
    /// Number of shards `S` (part of the wire contract: every process of a
    /// cluster must agree).
    pub shards: u32,
    /// Number of JetStream streams `R` the shards are split over.
    pub streams: u32,
    /// Replicas of each stream (1 for a single server).
    pub replicas: usize,
    /// Live events the client buffers per subscription; beyond it, it drops
    /// them and reports a slow consumer (then refilled from the stream).
    pub subscription_capacity: usize,
    pub retention: Retention,
    /// Broadcasts published on core NATS only (never stored): see
    /// [`fanout_core::Ephemeral`].
    pub ephemeral: fanout_core::Ephemeral,
}

impl Default for NatsConfig {
    fn default() -> Self {
        Self {
            urls: vec!["nats://127.0.0.1:4222".into()],
            credentials_file: None,
            user: None,
            tls_required: false,
            shards: 64,
            streams: 4,
            replicas: 1,
            subscription_capacity: 65_536,
            retention: Retention::default(),
            ephemeral: fanout_core::Ephemeral::default(),
        }
    }
}

/// The NATS/JetStream implementation of [`Bus`].
pub struct NatsBus {
    /// JetStream: publishes, stream look-ups, replays and catch-ups.
    client: async_nats::Client,
    /// Live subscriptions only, on a connection of their own: a flood of
    /// live events never queues in front of a publish ack, and the
    /// subscription buffer (`subscription_capacity`) applies to them alone.
    live: async_nats::Client,
    js: jetstream::Context,
    config: NatsConfig,
    link: Arc<Link>,
    /// Consumer reads (see [`CatchUp::read`]) in flight at once.
    consumer_reads: Arc<Semaphore>,
}

/// Consumer reads an edge runs at once. In a NATS cluster every consumer
/// is created and deleted through the meta leader (a Raft proposal each);
/// thousands of clients resuming at once must queue here, not there.
const CONSUMER_READS: usize = 16;

/// Events a read asks the stream leader for one by one before it opens a
/// consumer for the rest (see [`CatchUp::read`]).
const LEADER_READ_EVENTS: usize = 32;

/// How long a replay whose stream read failed (a stream electing a leader,
/// a refused consumer) is retried before the client is told to resync, and
/// the first wait (doubling). Short: the join waits for it, and so does the
/// channel's next join.
const REPLAY_RETRY_FOR: Duration = Duration::from_secs(3);
const REPLAY_RETRY_DELAY: Duration = Duration::from_millis(250);

/// What the two connections' event callbacks report.
struct Link {
    js_up: AtomicBool,
    live_up: AtomicBool,
    /// Bumped on every reconnect and slow-consumer report of the live
    /// connection: live subscriptions then catch up from the last position
    /// they delivered.
    resyncs: watch::Sender<u64>,
}

impl std::fmt::Debug for NatsBus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NatsBus")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

/// One client connection; `live` marks the live-subscription connection.
async fn connect_client(config: &NatsConfig, link: &Arc<Link>, live: bool) -> Result<async_nats::Client, BusError> {
    let events = link.clone();
    let mut opts = async_nats::ConnectOptions::new()
        .name(if live { "fanout-live" } else { "fanout" })
        .retry_on_initial_connect()
        .require_tls(config.tls_required)
        .event_callback(move |event| {
            let link = events.clone();
            async move {
                let up = if live { &link.live_up } else { &link.js_up };
                let role = if live { "live" } else { "jetstream" };
                match event {
                    async_nats::Event::Connected => {
                        up.store(true, Ordering::Release);
                        if live {
                            link.resyncs.send_modify(|n| *n += 1);
                        }
                        tracing::info!(connection = role, "connected to NATS");
                    }
                    async_nats::Event::Disconnected => {
                        up.store(false, Ordering::Release);
                        metrics::counter!("fanout_bus_disconnects_total").increment(1);
                        tracing::warn!(connection = role, "disconnected from NATS; reconnecting");
                    }
                    async_nats::Event::SlowConsumer(sid) if live => {
                        // The client dropped live events of a subscription:
                        // every subscription refills from the stream.
                        link.resyncs.send_modify(|n| *n += 1);
                        metrics::counter!("fanout_bus_slow_consumer_events_total").increment(1);
                        tracing::debug!(sid, "live NATS subscription fell behind; catching up from JetStream");
                    }
                    other => tracing::debug!(connection = role, event = %other, "NATS event"),
                }
            }
        });
    if live {
        opts = opts.subscription_capacity(config.subscription_capacity.max(1));
    }
    if let Some(path) = &config.credentials_file {
        opts = opts.credentials_file(path).await.map_err(unavailable)?;
    }
    if let Some((user, pass)) = &config.user {
        opts = opts.user_and_password(user.clone(), pass.clone());
    }
    let addrs: Vec<async_nats::ServerAddr> = config
        .urls
        .iter()
        .map(|u| u.parse())
        .collect::<Result<_, _>>()
        .map_err(|e| BusError::Rejected(format!("bad NATS URL: {e}")))?;
    opts.connect(addrs).await.map_err(unavailable)
}

/// How often [`NatsBus::watch_stream_health`] reads the streams' cluster info.
pub const STREAM_HEALTH_EVERY: Duration = Duration::from_secs(2);

/// A follower the stream leader has not heard from for this long is gone:
/// Raft heartbeats come every second on an idle stream, and appends more
/// often on a busy one. The server itself calls a silent follower "not
/// current" only after 10 s (nats-server 2.9's lost-quorum interval) and
/// rarely "offline", so a node killed for less than that would never show.
const PEER_SILENT: Duration = Duration::from_secs(3);

/// Replicas of a stream that cannot take part in its quorum: every one
/// while it has no leader, else the followers offline, not current, or
/// silent for longer than [`PEER_SILENT`].
fn replicas_unavailable(cluster: &stream::ClusterInfo, configured: usize) -> usize {
    if cluster.leader.is_none() {
        return configured.max(1);
    }
    cluster
        .replicas
        .iter()
        .filter(|p| p.offline || !p.current || p.active > PEER_SILENT)
        .count()
}

/// What a consumer read does with the next message it is handed.
#[derive(Debug, PartialEq, Eq)]
enum Take {
    Keep,
    /// At or before the start: not part of the read.
    Skip,
    /// Past the end: the read is over.
    Stop,
}

/// The range `(after, upto]` a consumer read collects, and how many of the
/// channel's events it still expects (the consumer's pending count when it
/// was created; events published later come live instead).
///
/// The read must check the start itself: async-nats's ordered consumer,
/// when it recreates its server-side consumer (after missed heartbeats, a
/// reconnect or a deleted consumer) before it has handed on a message,
/// recreates it with `DeliverPolicy::All`, not the start sequence it was
/// given, and hands on the channel's history from its oldest event. Seen
/// under the chaos run's load as a resuming client getting its first
/// events again, at their old positions.
#[derive(Debug)]
struct ReadRange {
    after: Position,
    upto: Option<Position>,
    remaining: u64,
}

impl ReadRange {
    fn new(after: Position, upto: Option<Position>, pending: u64) -> Self {
        Self {
            after,
            upto,
            remaining: pending,
        }
    }

    fn done(&self) -> bool {
        self.remaining == 0
    }

    /// The message at stream position `seq`, with `pending` more of the
    /// channel's messages behind it on the server.
    fn take(&mut self, seq: Position, pending: u64) -> Take {
        if seq <= self.after {
            return Take::Skip;
        }
        if self.upto.is_some_and(|upto| seq > upto) {
            self.remaining = 0;
            return Take::Stop;
        }
        self.remaining = (self.remaining - 1).min(pending);
        if self.upto == Some(seq) {
            self.remaining = 0;
        }
        Take::Keep
    }
}

/// One stream's replica reading across successive look-ups. A failed
/// look-up counts every replica only when the one before it failed too: a
/// stream electing a leader (its leader's node was lost) stays unanswered
/// for seconds, but a single unanswered look-up is as often a request timed
/// out on a busy server, and counting it made a healthy cluster under load
/// read as one with a node down.
#[derive(Debug, Default)]
struct ReplicaReading {
    value: usize,
    failed_before: bool,
}

impl ReplicaReading {
    /// The reading after a look-up that found `looked_up` replicas missing
    /// (`None`: it failed), of `configured`.
    fn update(&mut self, looked_up: Option<usize>, configured: usize) -> usize {
        match looked_up {
            Some(missing) => {
                self.value = missing;
                self.failed_before = false;
            }
            None if self.failed_before => self.value = configured.max(1),
            None => self.failed_before = true,
        }
        self.value
    }
}

impl NatsBus {
    /// Connects (retrying until NATS answers) and creates or updates the
    /// streams.
    pub async fn connect(config: NatsConfig) -> Result<Self, BusError> {
        if config.shards == 0 || config.streams == 0 || config.streams > config.shards {
            return Err(BusError::Rejected(format!(
                "need 1 <= streams ({}) <= shards ({})",
                config.streams, config.shards
            )));
        }
        let link = Arc::new(Link {
            js_up: AtomicBool::new(false),
            live_up: AtomicBool::new(false),
            resyncs: watch::channel(0u64).0,
        });
        let client = connect_client(&config, &link, false).await?;
        let live = connect_client(&config, &link, true).await?;
        let js = jetstream::new(client.clone());
        let bus = Self {
            client,
            live,
            js,
            config,
            link,
            consumer_reads: Arc::new(Semaphore::new(CONSUMER_READS)),
        };
        // NATS may still be starting (or briefly away): keep trying, saying
        // why, rather than exiting into a restart loop.
        let mut delay = Duration::from_millis(200);
        loop {
            match bus.ensure_streams().await {
                Ok(()) => break,
                Err(BusError::Unavailable(e)) => {
                    tracing::warn!(error = %e, "JetStream not reachable yet; retrying");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(5));
                }
                Err(e) => return Err(e),
            }
        }
        // The first connect may come before the callbacks are in place;
        // from here on they track the links (and `is_ready` also asks the
        // clients themselves).
        bus.link.js_up.store(true, Ordering::Release);
        bus.link.live_up.store(true, Ordering::Release);
        Ok(bus)
    }

    /// Stream `i`'s configuration.
    fn stream_config(&self, i: u32) -> stream::Config {
        let (s, r) = (self.config.shards, self.config.streams);
        let first = i * s / r;
        let end = (i + 1) * s / r;
        stream::Config {
            name: format!("FANOUT_{i}"),
            subjects: (first..end).map(|shard| format!("fanout.{shard}.>")).collect(),
            max_messages_per_subject: self.config.retention.max_messages as i64,
            max_age: self.config.retention.max_age,
            num_replicas: self.config.replicas,
            duplicate_window: crate::bus::dedupe_window(self.config.retention),
            storage: stream::StorageType::File,
            republish: Some(stream::Republish {
                source: ">".into(),
                destination: format!("{LIVE_PREFIX}.>"),
                headers_only: false,
            }),
            ..Default::default()
        }
    }

    /// Creates every stream, or updates it to the current configuration.
    async fn ensure_streams(&self) -> Result<(), BusError> {
        for i in 0..self.config.streams {
            let cfg = self.stream_config(i);
            // Edges starting together race to create the same stream: the
            // loser's create fails ("subjects overlap"), and its next look-up
            // finds the stream and updates it instead.
            let mut attempt = 1;
            loop {
                match self.ensure_stream(&cfg).await {
                    Ok(()) => break,
                    Err(e) if attempt < 5 => {
                        tracing::debug!(error = %e, stream = %cfg.name, "stream set-up raced; retrying");
                        tokio::time::sleep(Duration::from_millis(50 * attempt)).await;
                        attempt += 1;
                    }
                    Err(e) => return Err(e),
                }
            }
        }
        Ok(())
    }

    /// Creates one stream, or updates it to `cfg`.
    async fn ensure_stream(&self, cfg: &stream::Config) -> Result<(), BusError> {
        match self.js.get_stream(&cfg.name).await {
            Ok(_) => {
                self.js.update_stream(cfg.clone()).await.map_err(|e| {
                    let republish_fixed = matches!(
                        e.kind(),
                        async_nats::jetstream::context::CreateStreamErrorKind::JetStream(ref js)
                            if js.error_code() == REPUBLISH_IMMUTABLE
                    );
                    BusError::Rejected(if republish_fixed {
                        format!(
                            "stream {} exists without the live republish this fanout needs, and this NATS \
                             server (before 2.10) cannot add it to an existing stream: upgrade NATS, or delete \
                             the FANOUT_* streams (`nats stream rm {}`; their history is lost and resuming \
                             clients get `resync required`) and start the edges again",
                            cfg.name, cfg.name
                        )
                    } else {
                        format!("updating stream {}: {e}", cfg.name)
                    })
                })?;
            }
            Err(e)
                if matches!(
                    e.kind(),
                    async_nats::jetstream::context::GetStreamErrorKind::JetStream(_)
                ) =>
            {
                self.js
                    .create_stream(cfg.clone())
                    .await
                    .map_err(|e| BusError::Rejected(format!("creating stream {}: {e}", cfg.name)))?;
            }
            Err(e) => return Err(unavailable(format!("looking up stream {}: {e}", cfg.name))),
        }
        Ok(())
    }

    fn shard(&self, channel: &ChannelName) -> u32 {
        shard_of(channel.as_str(), self.config.shards)
    }

    fn stream_name(&self, channel: &ChannelName) -> String {
        format!(
            "FANOUT_{}",
            self.shard(channel) * self.config.streams / self.config.shards
        )
    }

    /// How many replicas the streams keep.
    pub fn replicas(&self) -> usize {
        self.config.replicas
    }

    /// Watches the replicas of fanout's streams until `shutdown`: every
    /// [`STREAM_HEALTH_EVERY`] it reads each stream's cluster info and sets
    /// `fanout_bus_stream_replicas_unavailable` to the most replicas any one
    /// stream is missing (offline, not current or silent, or all of them
    /// while it has no leader: [`replicas_unavailable`]). On a three-node
    /// cluster with `replicas = 3`, 1 means a node is down and one more loss
    /// stops publishing; a stream without
    /// replicas (one server) reads 0 while it answers. Two look-ups in a
    /// row that fail count every replica: only a stream leader answers, so a
    /// stream electing one (its leader's node was lost) cannot be told from
    /// one that is gone, and neither serves ([`ReplicaReading`]).
    pub fn watch_stream_health(
        &self,
        shutdown: tokio_util::sync::CancellationToken,
    ) -> impl std::future::Future<Output = ()> + Send + 'static {
        let js = self.js.clone();
        let names: Vec<String> = (0..self.config.streams).map(|i| format!("FANOUT_{i}")).collect();
        let replicas = self.config.replicas;
        async move {
            let mut readings: Vec<ReplicaReading> = names.iter().map(|_| ReplicaReading::default()).collect();
            let mut tick = tokio::time::interval(STREAM_HEALTH_EVERY);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    () = shutdown.cancelled() => return,
                }
                // The stream's leader answers its info: with none elected
                // (or none reachable from here) the request fails. All
                // streams at once, each within one period: one after the
                // other, with the client's 5 s request timeout, a lost
                // leader took a reading 10 s per failed round, longer than
                // a node's restart.
                let looked_up = futures_util::future::join_all(names.iter().map(|name| {
                    let js = js.clone();
                    async move {
                        match tokio::time::timeout(STREAM_HEALTH_EVERY, js.get_stream(name)).await {
                            Ok(Ok(s)) => Some(
                                s.cached_info()
                                    .cluster
                                    .as_ref()
                                    .map_or(0, |c| replicas_unavailable(c, replicas)),
                            ),
                            Ok(Err(e)) => {
                                tracing::debug!(stream = %name, error = %e, "stream health look-up failed");
                                None
                            }
                            Err(_) => {
                                tracing::debug!(stream = %name, "stream health look-up timed out");
                                None
                            }
                        }
                    }
                }))
                .await;
                let mut worst = 0;
                for (found, reading) in looked_up.into_iter().zip(&mut readings) {
                    worst = worst.max(reading.update(found, replicas));
                }
                metrics::gauge!("fanout_bus_stream_replicas_unavailable").set(worst as f64);
            }
        }
    }

    /// The publishing connection, for the control seam
    /// ([`NatsControl`](crate::NatsControl)) to share.
    pub fn client(&self) -> async_nats::Client {
        self.client.clone()
    }

    /// `fanout.<shard>.<token>`: the one subject of all a channel's events.
    pub fn subject(&self, channel: &ChannelName) -> String {
        format!("fanout.{}.{}", self.shard(channel), subject_token(channel.as_str()))
    }

    /// The live (republished) subject of a channel.
    fn live_subject(&self, channel: &ChannelName) -> String {
        format!("{LIVE_PREFIX}.{}", self.subject(channel))
    }

    /// Where a channel's stored events are read from.
    fn catch_up(&self, channel: &ChannelName) -> CatchUp {
        CatchUp {
            js: self.js.clone(),
            stream: self.stream_name(channel),
            filter: self.subject(channel),
            consumer_reads: self.consumer_reads.clone(),
        }
    }

    async fn subscribe_now(&self, channel: ChannelName) -> Result<Subscription, BusError> {
        let mut live = self
            .live
            .subscribe(self.live_subject(&channel))
            .await
            .map_err(unavailable)?;
        // The server must know the subscription before `head` is read (on
        // the other connection): then every event stored after `head` is
        // republished to it.
        self.live.flush().await.map_err(unavailable)?;
        let stream = self
            .js
            .get_stream(self.stream_name(&channel))
            .await
            .map_err(unavailable)?;
        let head = stream.cached_info().state.last_sequence;
        let source = self.catch_up(&channel);
        let (tx, rx) = mpsc::unbounded_channel();
        let mut resyncs = self.link.resyncs.subscribe();
        resyncs.mark_unchanged();
        metrics::gauge!("fanout_bus_subscriptions").increment(1.0);
        tokio::spawn(async move {
            let mut last = head;
            loop {
                let msg = tokio::select! {
                    biased;
                    () = tx.closed() => break,
                    changed = resyncs.changed() => {
                        if changed.is_err() {
                            break;
                        }
                        resyncs.mark_unchanged();
                        match source.fill(&tx, &mut last, None, "resync").await {
                            Some(()) => continue,
                            None => break,
                        }
                    }
                    msg = live.next() => match msg {
                        Some(msg) => msg,
                        None => break,
                    },
                };
                if msg.headers.as_ref().is_some_and(|h| h.get(EPHEMERAL_HEADER).is_some()) {
                    // Live only: no position, nothing to catch up.
                    if !hand_on(&tx, &msg, 0) {
                        break;
                    }
                    continue;
                }
                let Some((seq, previous)) = republished_positions(&msg) else {
                    metrics::counter!("fanout_bus_decode_errors_total").increment(1);
                    tracing::warn!(subject = %msg.subject, "live event without stream positions skipped");
                    continue;
                };
                // A reconnect reported meanwhile: the stream first, so this
                // event cannot overtake the ones missed before it.
                if resyncs.has_changed().unwrap_or(false) {
                    resyncs.mark_unchanged();
                    if source.fill(&tx, &mut last, Some(seq - 1), "resync").await.is_none() {
                        break;
                    }
                }
                if seq <= last {
                    // At or before the subscription's start, or already
                    // refilled by a catch-up: an event that came late.
                    let why = if seq <= head { "before_start" } else { "refilled" };
                    metrics::counter!("fanout_bus_live_events_skipped_total", "why" => why).increment(1);
                    continue;
                }
                if previous > last {
                    // The channel's previous event has not been delivered.
                    if source.fill(&tx, &mut last, Some(seq - 1), "gap").await.is_none() {
                        break;
                    }
                }
                last = seq;
                if !hand_on(&tx, &msg, seq) {
                    break;
                }
            }
            metrics::gauge!("fanout_bus_subscriptions").decrement(1.0);
        });
        Ok(Subscription { head, events: rx })
    }

    /// The first `limit` stored events in `(after, upto]`, or `Expired`.
    async fn replay_now(
        &self,
        channel: ChannelName,
        after: Position,
        upto: Position,
        limit: usize,
    ) -> Result<Replay, BusError> {
        let source = self.catch_up(&channel);
        // The client's last position must still be retained: retention drops
        // the oldest messages of a channel (its subject) first, so if that one is there,
        // nothing after it is missing.
        if after > 0 {
            match source.stream().await?.get_raw_message(after).await {
                Ok(m) if m.subject.as_str() == source.filter => {}
                Ok(_) => return Ok(Replay::Expired),
                Err(e) if e.kind() == stream::LastRawMessageErrorKind::NoMessageFound => return Ok(Replay::Expired),
                Err(e) => return Err(unavailable(e)),
            }
        }
        if after >= upto {
            // Nothing missed (the client may even be ahead of this edge, if
            // it came from a faster one; the hub skips what it already saw).
            return Ok(Replay::Events(Vec::new()));
        }
        Ok(Replay::Events(source.read(after, Some(upto), limit).await?))
    }
}

impl NatsBus {
    async fn history_now(&self, channel: ChannelName, query: HistoryQuery) -> Result<History, BusError> {
        let source = self.catch_up(&channel);
        let head = source.newest().await?;
        let events = match query {
            HistoryQuery::Last { limit } => source.read_last(limit).await?,
            HistoryQuery::After { after, limit } => match self.replay_now(channel, after, head, limit).await? {
                Replay::Expired => return Ok(History::Expired { head }),
                Replay::Events(events) => events,
            },
        };
        // Events stored after `head` was read may have come along.
        let head = events.last().map_or(head, |e| e.position.max(head));
        Ok(History::Events { events, head })
    }
}

/// JetStream's "stream configuration update can not change RePublish"
/// (servers before 2.10).
const REPUBLISH_IMMUTABLE: async_nats::jetstream::ErrorCode = async_nats::jetstream::ErrorCode(10052);

/// Prefix of the subjects streams republish stored events to.
const LIVE_PREFIX: &str = "fanout-live";

/// Decodes a live message as the event at `position` and hands it to the
/// subscriber (an undecodable one is counted and skipped); false once the
/// subscriber is gone.
fn hand_on(tx: &mpsc::UnboundedSender<Event>, msg: &async_nats::Message, position: Position) -> bool {
    match fanout_proto::decode_event(&msg.payload, position) {
        Ok(ev) => tx.send(ev).is_ok(),
        Err(e) => {
            metrics::counter!("fanout_bus_decode_errors_total").increment(1);
            tracing::warn!(error = %e, subject = %msg.subject, "undecodable event skipped");
            true
        }
    }
}

/// A stored event read back at `seq`; an undecodable one is counted and
/// skipped.
fn decode_stored(payload: &[u8], seq: Position) -> Option<Event> {
    match fanout_proto::decode_event(payload, seq) {
        Ok(ev) => Some(ev),
        Err(e) => {
            metrics::counter!("fanout_bus_decode_errors_total").increment(1);
            tracing::warn!(error = %e, seq, "undecodable stored event skipped");
            None
        }
    }
}

/// `Nats-Sequence` and `Nats-Last-Sequence` of a republished message.
fn republished_positions(msg: &async_nats::Message) -> Option<(Position, Position)> {
    let headers = msg.headers.as_ref()?;
    let number = |name: &str| headers.get(name)?.as_str().parse::<u64>().ok();
    // Stream sequences start at 1; anything else did not come from a stream.
    let seq = number("Nats-Sequence").filter(|&seq| seq > 0)?;
    Some((seq, number("Nats-Last-Sequence").unwrap_or(0)))
}

/// Reads a channel's stored events from its stream: for replays and to fill
/// what the live subscription missed.
struct CatchUp {
    js: jetstream::Context,
    stream: String,
    filter: String,
    consumer_reads: Arc<Semaphore>,
}

/// What [`CatchUp::read_via_leader`] read, and whether it reached the end
/// of its range (false: it stopped at its budget of requests).
struct LeaderRead {
    events: Vec<Event>,
    /// The range's end it read to (the channel's newest event, for an
    /// open-ended read).
    upto: Position,
    /// The last position it looked at (`after` if none).
    last: Position,
}

impl LeaderRead {
    /// Whether it read to the end of its range.
    fn complete(&self) -> bool {
        self.last >= self.upto
    }
}

impl CatchUp {
    /// The stream, without asking the server for its info (one round trip
    /// fewer: nothing here needs it).
    async fn stream(&self) -> Result<stream::Stream<()>, BusError> {
        self.js.get_stream_no_info(&self.stream).await.map_err(unavailable)
    }

    /// The position of the channel's newest stored event (0: none stored).
    async fn newest(&self) -> Result<Position, BusError> {
        match self.stream().await?.get_last_raw_message_by_subject(&self.filter).await {
            Ok(m) => Ok(m.sequence),
            Err(e) if e.kind() == stream::LastRawMessageErrorKind::NoMessageFound => Ok(0),
            Err(e) => Err(unavailable(e)),
        }
    }

    /// The channel's events after `after`, up to `upto` (or all there are),
    /// at most `limit` of them.
    ///
    /// The first [`LEADER_READ_EVENTS`] come from the stream leader's
    /// message API, one request per event ([`Self::read_via_leader`]):
    /// most reads (a client resuming after seconds away, a subscription
    /// refilling a dropped event) end there, without a consumer. A longer
    /// range goes on with an ordered consumer ([`Self::read_by_consumer`]).
    /// Consumers are what a storm of resuming clients must not multiply: in
    /// a NATS cluster each one is created and deleted through the meta
    /// leader, and nats-server 2.15 refused them with "maximum consumers
    /// limit reached" (10026, though no limit was configured) when 3,000
    /// clients resumed at once in the chaos run; each refusal made a client
    /// resync. So at most [`CONSUMER_READS`] run at once per edge.
    async fn read(&self, after: Position, upto: Option<Position>, limit: usize) -> Result<Vec<Event>, BusError> {
        let first = self.read_via_leader(after, upto, limit, LEADER_READ_EVENTS).await?;
        if first.complete() || first.events.len() >= limit {
            metrics::counter!("fanout_bus_stream_reads_total", "via" => "leader").increment(1);
            return Ok(first.events);
        }
        let mut events = first.events;
        let _permit = self.consumer_reads.acquire().await.map_err(unavailable)?;
        metrics::counter!("fanout_bus_stream_reads_total", "via" => "consumer").increment(1);
        let rest = self
            .read_by_consumer(first.last, Some(first.upto), limit - events.len())
            .await?;
        events.extend(rest);
        Ok(events)
    }

    /// The consumer part of [`Self::read`].
    ///
    /// JetStream may place the ordered consumer on any replica of the
    /// stream, which numbers events by that replica's copy. A replica can
    /// disagree with its leader: nats-server 2.9 stores a message twice on a
    /// node that is killed and restarted under load, and from there on that
    /// node's copy is shifted by one while it reports itself current
    /// (nats-server#4174; the chaos run found it). So the read is checked
    /// against the leader, which numbers the live events and answers the
    /// message API: the last event read must be the leader's at its
    /// position, and an empty read must agree that the channel has nothing
    /// in range. When they disagree, the range is read again through the
    /// leader, one request per event, and
    /// `fanout_bus_replica_divergence_total` counts it.
    async fn read_by_consumer(
        &self,
        after: Position,
        upto: Option<Position>,
        limit: usize,
    ) -> Result<Vec<Event>, BusError> {
        let (events, last) = self.read_consumer(after, upto, limit).await?;
        if self.agrees_with_leader(after, upto, last).await? {
            return Ok(events);
        }
        metrics::counter!("fanout_bus_replica_divergence_total").increment(1);
        tracing::warn!(
            stream = %self.stream,
            subject = %self.filter,
            after,
            "a JetStream replica's copy of the stream disagrees with its leader's (a nats-server bug); reading through the leader"
        );
        Ok(self.read_via_leader(after, upto, limit, usize::MAX).await?.events)
    }

    /// Whether the leader has the same last event (position and bytes) as
    /// a consumer read, or, for an empty read, no event of the channel in
    /// `(after, upto]`.
    async fn agrees_with_leader(
        &self,
        after: Position,
        upto: Option<Position>,
        last: Option<(Position, Bytes)>,
    ) -> Result<bool, BusError> {
        let stream = self.stream().await?;
        match last {
            Some((seq, payload)) => match stream.get_raw_message(seq).await {
                Ok(m) => Ok(m.subject.as_str() == self.filter && m.payload == payload),
                Err(e) if e.kind() == stream::LastRawMessageErrorKind::NoMessageFound => Ok(false),
                Err(e) => Err(unavailable(e)),
            },
            None => {
                let Some(upto) = upto.filter(|&upto| upto > after) else {
                    // Open-ended and empty: what comes later comes live.
                    return Ok(true);
                };
                match stream.get_first_raw_message_by_subject(&self.filter, after + 1).await {
                    Ok(m) => Ok(m.sequence > upto),
                    Err(e) if e.kind() == stream::LastRawMessageErrorKind::NoMessageFound => Ok(true),
                    Err(e) => Err(unavailable(e)),
                }
            }
        }
    }

    /// [`Self::read`] through the stream leader's message API: each
    /// request returns the channel's next event at or after a position. At
    /// most `limit` events, in at most `requests` requests.
    async fn read_via_leader(
        &self,
        after: Position,
        upto: Option<Position>,
        limit: usize,
        requests: usize,
    ) -> Result<LeaderRead, BusError> {
        let stream = self.stream().await?;
        // Open-ended: up to what is stored now (later events come live).
        let upto = match upto {
            Some(upto) => upto,
            None => self.newest().await?,
        };
        let mut read = LeaderRead {
            events: Vec::new(),
            upto,
            last: after,
        };
        for _ in 0..requests {
            if read.last >= upto || read.events.len() >= limit {
                break;
            }
            let m = match stream
                .get_first_raw_message_by_subject(&self.filter, read.last + 1)
                .await
            {
                Ok(m) => m,
                Err(e) if e.kind() == stream::LastRawMessageErrorKind::NoMessageFound => {
                    read.last = upto;
                    break;
                }
                Err(e) => return Err(unavailable(e)),
            };
            if m.sequence > upto {
                read.last = upto;
                break;
            }
            read.last = m.sequence;
            read.events.extend(decode_stored(&m.payload, m.sequence));
        }
        Ok(read)
    }

    /// The consumer read behind [`Self::read`], and the last event's
    /// position and bytes as the consumer's replica has them.
    async fn read_consumer(
        &self,
        after: Position,
        upto: Option<Position>,
        limit: usize,
    ) -> Result<(Vec<Event>, Option<(Position, Bytes)>), BusError> {
        let consumer = self
            .stream()
            .await?
            .create_consumer(consumer::pull::OrderedConfig {
                filter_subject: self.filter.clone(),
                deliver_policy: consumer::DeliverPolicy::ByStartSequence {
                    start_sequence: after + 1,
                },
                ..Default::default()
            })
            .await
            .map_err(unavailable)?;
        // The consumer knows how many of the channel's events it starts
        // with: an empty range ends here instead of in a wait, and a busy
        // channel cannot keep the read going forever (what is published
        // after this point comes live).
        let mut range = ReadRange::new(after, upto, consumer.cached_info().num_pending);
        let mut events = Vec::new();
        let mut last = None;
        if range.done() {
            return Ok((events, last));
        }
        let mut messages = consumer.messages().await.map_err(unavailable)?;
        while !range.done() && events.len() < limit {
            let next = tokio::time::timeout(Duration::from_secs(5), messages.next())
                .await
                .map_err(|_| unavailable("reading the stream timed out"))?;
            let Some(msg) = next else { break };
            let msg = msg.map_err(unavailable)?;
            let info = msg.info().map_err(unavailable)?;
            let seq = info.stream_sequence;
            match range.take(seq, info.pending) {
                Take::Skip => continue,
                Take::Stop => break,
                Take::Keep => {
                    events.extend(decode_stored(&msg.payload, seq));
                    last = Some((seq, msg.payload.clone()));
                }
            }
        }
        Ok((events, last))
    }

    /// The channel's newest `limit` stored events. JetStream reads a
    /// subject forwards only, so this reads what the channel retains (at
    /// most its history limit) and keeps the tail.
    async fn read_last(&self, limit: usize) -> Result<Vec<Event>, BusError> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let mut events = self.read(0, None, usize::MAX).await?;
        let skip = events.len().saturating_sub(limit);
        events.drain(..skip);
        Ok(events)
    }

    /// Hands on the events after `*last` (up to `upto`) and advances
    /// `*last`; retries while NATS is away. `None` once nobody listens.
    async fn fill(
        &self,
        tx: &mpsc::UnboundedSender<Event>,
        last: &mut Position,
        upto: Option<Position>,
        reason: &'static str,
    ) -> Option<()> {
        if upto.is_some_and(|upto| upto <= *last) {
            return Some(());
        }
        if upto.is_none() && self.newest().await.is_ok_and(|newest| newest <= *last) {
            // A resync asks every channel, and most missed nothing: one
            // direct look at the channel's newest event settles that
            // without a consumer. (Failing that, the catch-up below
            // retries until NATS answers.)
            metrics::counter!("fanout_bus_resyncs_without_catch_up_total").increment(1);
            return Some(());
        }
        metrics::counter!("fanout_bus_catch_ups_total", "reason" => reason).increment(1);
        let mut delay = Duration::from_millis(100);
        let events = loop {
            match self.read(*last, upto, usize::MAX).await {
                Ok(events) => break events,
                Err(e) => {
                    tracing::debug!(error = %e, "catching up from the stream failed; retrying");
                    if tx.is_closed() {
                        return None;
                    }
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(2));
                }
            }
        };
        metrics::counter!("fanout_bus_caught_up_events_total").increment(events.len() as u64);
        for ev in events {
            if ev.position > *last {
                *last = ev.position;
                tx.send(ev).ok()?;
            }
        }
        Some(())
    }
}

/// Publishes in flight at once in [`Bus::publish_deduplicated`].
const PUBLISH_CHUNK: usize = 1024;

/// Marks an event published on core NATS only, straight to the live
/// subject: it has no stream position.
const EPHEMERAL_HEADER: &str = "Fanout-Ephemeral";

impl NatsBus {
    /// Publishes an ephemeral event to its channel's live subject, where
    /// every edge with members of the channel listens; no store, no ack.
    /// Events from one publisher keep their order (one connection).
    async fn publish_ephemeral(&self, event: &Event) -> Result<(), BusError> {
        let mut headers = async_nats::HeaderMap::new();
        headers.insert(EPHEMERAL_HEADER, "1");
        self.client
            .publish_with_headers(
                self.live_subject(&event.channel),
                headers,
                fanout_proto::encode_event(event),
            )
            .await
            .map_err(unavailable)?;
        metrics::counter!("fanout_bus_ephemeral_published_total").increment(1);
        Ok(())
    }
}

impl Bus for NatsBus {
    fn publish(&self, event: Event) -> BoxFuture<'_, Result<Position, BusError>> {
        Box::pin(async move {
            if self.config.ephemeral.matches(&event) {
                return self.publish_ephemeral(&event).await.map(|()| 0);
            }
            let subject = self.subject(&event.channel);
            let payload = fanout_proto::encode_event(&event);
            let ack = self.js.publish(subject, payload).await.map_err(unavailable)?;
            let ack = ack.await.map_err(unavailable)?;
            Ok(ack.sequence)
        })
    }

    fn publish_deduplicated(&self, events: Vec<(String, Event)>) -> BoxFuture<'_, Result<(), BusError>> {
        Box::pin(async move {
            // Pipelined: a chunk is sent in order over the one connection,
            // then its acks are awaited together. The `Nats-Msg-Id` header
            // makes JetStream drop a re-sent id within the stream's
            // duplicate window.
            let mut events = events.into_iter().peekable();
            while events.peek().is_some() {
                let mut acks = Vec::with_capacity(PUBLISH_CHUNK);
                for (id, event) in events.by_ref().take(PUBLISH_CHUNK) {
                    let subject = self.subject(&event.channel);
                    let publish = jetstream::message::PublishMessage::build()
                        .message_id(id)
                        .payload(fanout_proto::encode_event(&event));
                    acks.push(self.js.send_publish(subject, publish).await.map_err(unavailable)?);
                }
                for ack in acks {
                    ack.await.map_err(unavailable)?;
                }
            }
            Ok(())
        })
    }

    fn subscribe(&self, channel: ChannelName) -> BoxFuture<'_, Result<Subscription, BusError>> {
        Box::pin(self.subscribe_now(channel))
    }

    fn replay(&self, channel: ChannelName, after: Position, upto: Position) -> BoxFuture<'_, Result<Replay, BusError>> {
        Box::pin(async move {
            // A client told to resync reloads everything; a failed read is
            // worth a few short retries first (a stream electing a leader
            // answers again within seconds).
            let give_up = tokio::time::Instant::now() + REPLAY_RETRY_FOR;
            let mut delay = REPLAY_RETRY_DELAY;
            loop {
                match self.replay_now(channel.clone(), after, upto, usize::MAX).await {
                    Err(BusError::Unavailable(e)) if tokio::time::Instant::now() + delay < give_up => {
                        metrics::counter!("fanout_bus_replay_retries_total").increment(1);
                        tracing::debug!(error = %e, "replay failed; retrying");
                        tokio::time::sleep(delay).await;
                        delay *= 2;
                    }
                    answer => return answer,
                }
            }
        })
    }

    fn publish_batch(&self, batch: Vec<(Option<String>, Event)>) -> BoxFuture<'_, Vec<Result<Published, BusError>>> {
        Box::pin(async move {
            // Sent in order over the one connection, so a channel's events
            // are stored in batch order; the acks are awaited afterwards.
            // Once a send fails, the rest are not sent (they would land out
            // of order after a reconnect).
            let mut sent = Vec::with_capacity(batch.len());
            let mut failed: Option<BusError> = None;
            for (id, event) in batch {
                if let Some(e) = &failed {
                    sent.push(Err(e.clone()));
                    continue;
                }
                if self.config.ephemeral.matches(&event) {
                    // Not stored, so never a duplicate: no id to check.
                    match self.publish_ephemeral(&event).await {
                        Ok(()) => sent.push(Ok(None)),
                        Err(e) => {
                            failed = Some(e.clone());
                            sent.push(Err(e));
                        }
                    }
                    continue;
                }
                let subject = self.subject(&event.channel);
                let mut publish =
                    jetstream::message::PublishMessage::build().payload(fanout_proto::encode_event(&event));
                if let Some(id) = id {
                    publish = publish.message_id(id);
                }
                match self.js.send_publish(subject, publish).await {
                    Ok(ack) => sent.push(Ok(Some(ack))),
                    Err(e) => {
                        let e = unavailable(e);
                        failed = Some(e.clone());
                        sent.push(Err(e));
                    }
                }
            }
            let mut answers = Vec::with_capacity(sent.len());
            for ack in sent {
                // A duplicate's ack carries the sequence of the message
                // stored under that id first.
                answers.push(match ack {
                    Ok(Some(ack)) => ack.await.map_err(unavailable).map(|ack| Published {
                        position: ack.sequence,
                        duplicate: ack.duplicate,
                    }),
                    Ok(None) => Ok(Published {
                        position: 0,
                        duplicate: false,
                    }),
                    Err(e) => Err(e),
                });
            }
            answers
        })
    }

    fn history(&self, channel: ChannelName, query: HistoryQuery) -> BoxFuture<'_, Result<History, BusError>> {
        Box::pin(self.history_now(channel, query))
    }

    fn is_ready(&self) -> bool {
        use async_nats::connection::State;
        self.link.js_up.load(Ordering::Acquire)
            && self.link.live_up.load(Ordering::Acquire)
            && self.client.connection_state() == State::Connected
            && self.live.connection_state() == State::Connected
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Cluster info as NATS 2.9 answers `$JS.API.STREAM.INFO` for an R3
    /// stream, with the given leader and followers (name, current, offline).
    fn cluster(leader: Option<&str>, followers: &[(&str, bool, bool)]) -> stream::ClusterInfo {
        cluster_seen(leader, followers, 1_000_000)
    }

    /// Followers last seen `active_ns` ago.
    fn cluster_seen(leader: Option<&str>, followers: &[(&str, bool, bool)], active_ns: u64) -> stream::ClusterInfo {
        let replicas: Vec<serde_json::Value> = followers
            .iter()
            .map(|(name, current, offline)| {
                serde_json::json!({"name": name, "current": current, "active": active_ns, "offline": offline})
            })
            .collect();
        serde_json::from_value(serde_json::json!({"name": "fanout", "leader": leader, "replicas": replicas}))
            .expect("cluster info")
    }

    #[test]
    fn replicas_unavailable_counts_followers_out_of_the_quorum() {
        assert_eq!(
            replicas_unavailable(&cluster(Some("n0"), &[("n1", true, false), ("n2", true, false)]), 3),
            0
        );
        assert_eq!(
            replicas_unavailable(&cluster(Some("n0"), &[("n1", true, false), ("n2", false, true)]), 3),
            1
        );
        // A follower restarted and still catching up is not current.
        assert_eq!(
            replicas_unavailable(&cluster(Some("n0"), &[("n1", false, false), ("n2", true, false)]), 3),
            1
        );
        assert_eq!(
            replicas_unavailable(&cluster(None, &[("n1", false, true), ("n2", false, true)]), 3),
            3
        );
        // A killed follower stays "current" for 10 s; its silence shows first.
        let silent = cluster_seen(Some("n0"), &[("n1", true, false), ("n2", true, false)], 3_500_000_000);
        assert_eq!(replicas_unavailable(&silent, 3), 2);
        let heartbeat_ago = cluster_seen(Some("n0"), &[("n1", true, false)], 900_000_000);
        assert_eq!(replicas_unavailable(&heartbeat_ago, 3), 0);
    }

    #[test]
    fn a_read_keeps_its_range_when_the_consumer_starts_over_from_the_oldest_event() {
        // Positions 10, 12 and 15 are the channel's events after 9.
        let mut r = ReadRange::new(9, None, 3);
        assert_eq!(r.take(10, 2), Take::Keep);
        assert!(!r.done());
        // The consumer was recreated with DeliverPolicy::All: the channel's
        // oldest events come again, and do not count against the range.
        for seq in [1, 4, 7, 9] {
            assert_eq!(r.take(seq, 5), Take::Skip, "position {seq}");
        }
        assert!(!r.done());
        assert_eq!(r.take(12, 1), Take::Keep);
        assert_eq!(r.take(15, 0), Take::Keep);
        assert!(r.done(), "events published after the read began come live");

        let mut bounded = ReadRange::new(0, Some(12), 10);
        assert_eq!(bounded.take(10, 9), Take::Keep);
        assert_eq!(bounded.take(12, 8), Take::Keep);
        assert!(bounded.done(), "the read ends at its upper bound");
        let mut past = ReadRange::new(0, Some(11), 10);
        assert_eq!(past.take(13, 8), Take::Stop);
        assert!(past.done());
    }

    #[test]
    fn one_failed_look_up_keeps_the_reading_and_two_count_every_replica() {
        let mut r = ReplicaReading::default();
        assert_eq!(r.update(Some(0), 3), 0);
        assert_eq!(r.update(None, 3), 0, "one timeout is not a lost stream");
        assert_eq!(r.update(Some(1), 3), 1);
        assert_eq!(r.update(None, 3), 1);
        assert_eq!(r.update(None, 3), 3, "no leader for two look-ups");
        assert_eq!(r.update(None, 3), 3);
        assert_eq!(r.update(Some(0), 3), 0);
        assert_eq!(r.update(None, 1), 0);
        assert_eq!(
            r.update(None, 1),
            1,
            "a stream without replicas reads 1 when it is gone"
        );
    }
}
