//! The cluster bus: NATS subjects sharded by channel, JetStream for history.
//!
//! # Subjects and streams
//! A channel's events go to `fanout.<shard>.<kind>.<token>`, where
//! `shard = fanout_core::shard_of(channel, S)`, `kind` is `bcast`, `presence`
//! or `db`, and `token` is `fanout_core::subject_token(channel)`. The shards
//! are split over `R` JetStream streams `FANOUT_0 … FANOUT_{R-1}`; stream `i`
//! owns shards `[i·S/R, (i+1)·S/R)` through one subject filter per shard
//! (`fanout.<shard>.>`), so load spreads over streams and, in a NATS cluster,
//! over servers. Retention is per subject (`max_messages_per_subject`) and by
//! age (`max_age`). Streams are created or updated at start-up, idempotently.
//!
//! # Positions
//! A position is the JetStream stream sequence of the event. It increases
//! within a channel (a channel lives in exactly one stream), which is all the
//! resume contract needs.
//!
//! # Subscriptions
//! Each channel with local members holds one ordered pull consumer filtered
//! on `fanout.<shard>.*.<token>`, started just after the stream's last
//! sequence at subscribe time (the subscription's `head`). Ordered consumers
//! recreate themselves after a NATS reconnect, from the last sequence they
//! delivered, so nothing published meanwhile is skipped.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_nats::jetstream::{self, consumer, stream};
use fanout_core::{ChannelName, Event, EventKind, Position, shard_of, subject_token};
use futures_util::StreamExt;
use tokio::sync::{mpsc, watch};

use crate::bus::{BoxFuture, Bus, BusError, Replay, Retention, Subscription};

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
    pub retention: Retention,
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
            retention: Retention::default(),
        }
    }
}

/// The NATS/JetStream implementation of [`Bus`].
pub struct NatsBus {
    client: async_nats::Client,
    js: jetstream::Context,
    config: NatsConfig,
    connected: Arc<AtomicBool>,
    /// Bumped on every (re)connect: subscriptions then recreate their
    /// consumers from the last sequence they delivered, at once, instead of
    /// waiting for missed heartbeats.
    reconnects: watch::Sender<u64>,
}

impl std::fmt::Debug for NatsBus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NatsBus")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

fn unavailable(e: impl std::fmt::Display) -> BusError {
    BusError::Unavailable(e.to_string())
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
        let connected = Arc::new(AtomicBool::new(false));
        let flag = connected.clone();
        let (reconnects, _) = watch::channel(0u64);
        let bump = reconnects.clone();
        let mut opts = async_nats::ConnectOptions::new()
            .name("fanout")
            .retry_on_initial_connect()
            .require_tls(config.tls_required)
            .event_callback(move |event| {
                let flag = flag.clone();
                let bump = bump.clone();
                async move {
                    match event {
                        async_nats::Event::Connected => {
                            flag.store(true, Ordering::Release);
                            bump.send_modify(|n| *n += 1);
                            tracing::info!("connected to NATS");
                        }
                        async_nats::Event::Disconnected => {
                            flag.store(false, Ordering::Release);
                            metrics::counter!("fanout_bus_disconnects_total").increment(1);
                            tracing::warn!("disconnected from NATS; reconnecting");
                        }
                        other => tracing::debug!(event = %other, "NATS event"),
                    }
                }
            });
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
        let client = opts.connect(addrs).await.map_err(unavailable)?;
        let js = jetstream::new(client.clone());
        let bus = Self {
            client,
            js,
            config,
            connected,
            reconnects,
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
        bus.connected.store(true, Ordering::Release);
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
            duplicate_window: Duration::from_secs(120).min(self.config.retention.max_age),
            storage: stream::StorageType::File,
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
                self.js
                    .update_stream(cfg.clone())
                    .await
                    .map_err(|e| BusError::Rejected(format!("updating stream {}: {e}", cfg.name)))?;
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

    /// `fanout.<shard>.<kind>.<token>`.
    pub fn subject(&self, channel: &ChannelName, kind: EventKind) -> String {
        let kind = match kind {
            EventKind::Broadcast => "bcast",
            EventKind::PresenceDiff => "presence",
            EventKind::PostgresChange => "db",
        };
        format!(
            "fanout.{}.{kind}.{}",
            self.shard(channel),
            subject_token(channel.as_str())
        )
    }

    /// The filter matching every event of a channel.
    fn filter(&self, channel: &ChannelName) -> String {
        format!("fanout.{}.*.{}", self.shard(channel), subject_token(channel.as_str()))
    }

    async fn stream(&self, channel: &ChannelName) -> Result<stream::Stream, BusError> {
        self.js.get_stream(self.stream_name(channel)).await.map_err(unavailable)
    }

    async fn subscribe_now(&self, channel: ChannelName) -> Result<Subscription, BusError> {
        let mut stream = self.stream(&channel).await?;
        let head = stream.info().await.map_err(unavailable)?.state.last_sequence;
        let stream_name = self.stream_name(&channel);
        let filter = self.filter(&channel);
        let mut messages = ordered(&self.js, &stream_name, &filter, head + 1).await?;
        let (tx, rx) = mpsc::unbounded_channel();
        let js = self.js.clone();
        let mut reconnects = self.reconnects.subscribe();
        reconnects.mark_unchanged();
        metrics::gauge!("fanout_bus_subscriptions").increment(1.0);
        tokio::spawn(async move {
            let mut last = head;
            'run: loop {
                tokio::select! {
                    () = tx.closed() => break,
                    changed = reconnects.changed() => {
                        if changed.is_err() {
                            break;
                        }
                        // Recreate from the last delivered sequence: nothing
                        // is skipped and nothing repeats.
                        let mut delay = Duration::from_millis(100);
                        loop {
                            match ordered(&js, &stream_name, &filter, last + 1).await {
                                Ok(m) => {
                                    messages = m;
                                    break;
                                }
                                Err(e) => {
                                    tracing::debug!(error = %e, "recreating consumer failed; retrying");
                                    if tx.is_closed() {
                                        break 'run;
                                    }
                                    tokio::time::sleep(delay).await;
                                    delay = (delay * 2).min(Duration::from_secs(2));
                                }
                            }
                        }
                    }
                    next = messages.next() => match next {
                        Some(Ok(msg)) => {
                            let Ok(info) = msg.info() else { continue };
                            let seq = info.stream_sequence;
                            if seq <= last {
                                continue;
                            }
                            last = seq;
                            match fanout_proto::decode_event(&msg.payload, seq) {
                                Ok(ev) => {
                                    if tx.send(ev).is_err() {
                                        break;
                                    }
                                }
                                Err(e) => {
                                    metrics::counter!("fanout_bus_decode_errors_total").increment(1);
                                    tracing::warn!(error = %e, subject = %msg.subject, "undecodable event skipped");
                                }
                            }
                        }
                        Some(Err(e)) => {
                            // The ordered consumer recreates itself; keep reading.
                            tracing::debug!(error = %e, "ordered consumer error");
                        }
                        None => break,
                    },
                }
            }
            metrics::gauge!("fanout_bus_subscriptions").decrement(1.0);
        });
        Ok(Subscription { head, events: rx })
    }

    async fn replay_now(&self, channel: ChannelName, after: Position, upto: Position) -> Result<Replay, BusError> {
        let stream = self.stream(&channel).await?;
        // The client's last position must still be retained: retention drops
        // the oldest messages of a subject first, so if that one is there,
        // nothing after it is missing.
        if after > 0 {
            match stream.get_raw_message(after).await {
                Ok(m)
                    if m.subject
                        .as_str()
                        .ends_with(&format!(".{}", subject_token(channel.as_str()))) => {}
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
        let mut messages = ordered(&self.js, &self.stream_name(&channel), &self.filter(&channel), after + 1).await?;
        let mut events = Vec::new();
        loop {
            let next = tokio::time::timeout(Duration::from_secs(5), messages.next())
                .await
                .map_err(|_| unavailable("replay timed out"))?;
            let Some(msg) = next else { break };
            let msg = msg.map_err(unavailable)?;
            let info = msg.info().map_err(unavailable)?;
            let (seq, pending) = (info.stream_sequence, info.pending);
            if seq > upto {
                break;
            }
            if let Ok(ev) = fanout_proto::decode_event(&msg.payload, seq) {
                events.push(ev);
            }
            if seq == upto || pending == 0 {
                break;
            }
        }
        Ok(Replay::Events(events))
    }
}

/// An ordered pull consumer of `filter` in `stream` from sequence `start`.
async fn ordered(
    js: &jetstream::Context,
    stream: &str,
    filter: &str,
    start: Position,
) -> Result<consumer::pull::Ordered, BusError> {
    let stream = js.get_stream(stream).await.map_err(unavailable)?;
    let consumer = stream
        .create_consumer(consumer::pull::OrderedConfig {
            filter_subject: filter.to_owned(),
            deliver_policy: consumer::DeliverPolicy::ByStartSequence {
                start_sequence: start.max(1),
            },
            // Pull requests expire (and heartbeats are checked) every few
            // seconds, so a consumer lost without a reconnect event is
            // recreated within about ten seconds.
            max_expires: Duration::from_secs(10),
            ..Default::default()
        })
        .await
        .map_err(unavailable)?;
    consumer.messages().await.map_err(unavailable)
}

/// Publishes in flight at once in [`Bus::publish_deduplicated`].
const PUBLISH_CHUNK: usize = 1024;

impl Bus for NatsBus {
    fn publish(&self, event: Event) -> BoxFuture<'_, Result<Position, BusError>> {
        Box::pin(async move {
            let subject = self.subject(&event.channel, event.kind);
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
                    let subject = self.subject(&event.channel, event.kind);
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
        Box::pin(self.replay_now(channel, after, upto))
    }

    fn is_ready(&self) -> bool {
        self.connected.load(Ordering::Acquire)
            && self.client.connection_state() == async_nats::connection::State::Connected
    }
}
