//! [`MemoryBus`]: the in-process bus of standalone mode.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;

use fanout_core::{ChannelName, Event, EventKind, Position, now_ms};
use tokio::sync::mpsc;

use crate::bus::{
    BoxFuture, Bus, BusError, History, HistoryQuery, Published, Replay, Retention, Subscription, dedupe_window,
};

#[derive(Default)]
struct Log {
    last: Position,
    history: VecDeque<Event>,
    subscribers: Vec<mpsc::UnboundedSender<Event>>,
}

impl Log {
    /// Whether some of the events in `(after, upto]` are no longer kept (or
    /// `after` is from the future: the history was lost in a restart).
    fn missing(&self, after: Position, upto: Position) -> bool {
        let oldest = self.history.front().map_or(self.last + 1, |e| e.position);
        after > self.last || (after + 1 < oldest && after < upto)
    }

    /// The kept events after `after`, in order.
    fn after(&self, after: Position) -> impl Iterator<Item = &Event> {
        self.history.iter().skip_while(move |e| e.position <= after)
    }

    fn trim(&mut self, retention: Retention, now_ms: u64) {
        while self.history.len() > retention.max_messages {
            self.history.pop_front();
        }
        let max_age_ms = retention.max_age.as_millis() as u64;
        while let Some(front) = self.history.front() {
            if now_ms.saturating_sub(front.published_at_ms) > max_age_ms {
                self.history.pop_front();
            } else {
                break;
            }
        }
    }
}

/// Deduplication ids the memory bus remembers at most (besides its window).
const DEDUPE_IDS: usize = 100_000;

/// The deduplication ids seen within the window, oldest first, with the
/// position each one's event got.
#[derive(Default)]
struct SeenIds {
    positions: HashMap<String, Position>,
    order: VecDeque<(String, u64)>,
}

impl SeenIds {
    /// Forgets the ids older than `window_ms` (and the oldest beyond
    /// [`DEDUPE_IDS`]).
    fn expire(&mut self, now_ms: u64, window_ms: u64) {
        while let Some((id, at)) = self.order.front() {
            if self.order.len() <= DEDUPE_IDS && now_ms.saturating_sub(*at) <= window_ms {
                break;
            }
            self.positions.remove(id);
            self.order.pop_front();
        }
    }

    fn get(&self, id: &str) -> Option<Position> {
        self.positions.get(id).copied()
    }

    fn insert(&mut self, id: String, position: Position, now_ms: u64) {
        self.positions.insert(id.clone(), position);
        self.order.push_back((id, now_ms));
    }
}

/// The in-process bus of standalone mode: per-channel history in memory,
/// bounded by [`Retention`]; deduplication remembers the ids of the last
/// [`dedupe_window`] (at most 100,000 of them).
pub struct MemoryBus {
    logs: Mutex<HashMap<ChannelName, Log>>,
    seen: Mutex<SeenIds>,
    retention: Retention,
    ephemeral: fanout_core::Ephemeral,
}

impl std::fmt::Debug for MemoryBus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryBus")
            .field("retention", &self.retention)
            .finish_non_exhaustive()
    }
}

impl MemoryBus {
    pub fn new(retention: Retention) -> Self {
        Self {
            logs: Mutex::new(HashMap::new()),
            seen: Mutex::new(SeenIds::default()),
            retention,
            ephemeral: fanout_core::Ephemeral::default(),
        }
    }

    /// Delivers the broadcasts `ephemeral` matches live only: no position,
    /// no history.
    pub fn with_ephemeral(mut self, ephemeral: fanout_core::Ephemeral) -> Self {
        self.ephemeral = ephemeral;
        self
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<ChannelName, Log>> {
        self.logs.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn publish_now(&self, mut event: Event) -> Position {
        let now = now_ms();
        let mut logs = self.lock();
        let log = logs.entry(event.channel.clone()).or_default();
        if event.kind != EventKind::PresenceDiff && !self.ephemeral.matches(&event) {
            log.last += 1;
            event.position = log.last;
            log.history.push_back(event.clone());
            log.trim(self.retention, now);
        } else {
            event.position = 0;
        }
        let position = event.position;
        log.subscribers.retain(|tx| tx.send(event.clone()).is_ok());
        if log.subscribers.is_empty() && log.history.is_empty() && log.last == 0 {
            logs.remove(&event.channel);
        }
        position
    }

    /// Publishes `event` unless `id` was seen within the window.
    fn publish_once_now(&self, id: String, event: Event) -> Published {
        let now = now_ms();
        // Held across the publish, so two publishes of one id cannot both
        // miss each other.
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        seen.expire(now, dedupe_window(self.retention).as_millis() as u64);
        if let Some(position) = seen.get(&id) {
            return Published {
                position,
                duplicate: true,
            };
        }
        let position = self.publish_now(event);
        seen.insert(id, position, now);
        Published {
            position,
            duplicate: false,
        }
    }

    /// Runs `f` on the channel's log trimmed to retention (an empty log for
    /// a channel nothing was published on).
    fn with_log<T>(&self, channel: &ChannelName, f: impl FnOnce(&Log) -> T) -> T {
        let now = now_ms();
        let mut logs = self.lock();
        match logs.get_mut(channel) {
            Some(log) => {
                log.trim(self.retention, now);
                f(log)
            }
            None => f(&Log::default()),
        }
    }

    fn history_now(&self, channel: &ChannelName, query: HistoryQuery) -> History {
        self.with_log(channel, |log| {
            let head = log.last;
            let events = match query {
                HistoryQuery::Last { limit } => {
                    let skip = log.history.len().saturating_sub(limit);
                    log.history.iter().skip(skip).cloned().collect()
                }
                HistoryQuery::After { after, limit } => {
                    if log.missing(after, head) {
                        return History::Expired { head };
                    }
                    log.after(after).take(limit).cloned().collect()
                }
            };
            History::Events { events, head }
        })
    }

    fn replay_now(&self, channel: &ChannelName, after: Position, upto: Position) -> Replay {
        self.with_log(channel, |log| {
            if log.missing(after, upto) {
                return Replay::Expired;
            }
            Replay::Events(log.after(after).take_while(|e| e.position <= upto).cloned().collect())
        })
    }
}

impl Bus for MemoryBus {
    fn publish(&self, event: Event) -> BoxFuture<'_, Result<Position, BusError>> {
        let position = self.publish_now(event);
        Box::pin(async move { Ok(position) })
    }

    fn subscribe(&self, channel: ChannelName) -> BoxFuture<'_, Result<Subscription, BusError>> {
        let (tx, rx) = mpsc::unbounded_channel();
        let mut logs = self.lock();
        let log = logs.entry(channel).or_default();
        log.subscribers.push(tx);
        let head = log.last;
        Box::pin(async move { Ok(Subscription { head, events: rx }) })
    }

    fn replay(&self, channel: ChannelName, after: Position, upto: Position) -> BoxFuture<'_, Result<Replay, BusError>> {
        let r = self.replay_now(&channel, after, upto);
        Box::pin(async move { Ok(r) })
    }

    fn publish_deduplicated(&self, events: Vec<(String, Event)>) -> BoxFuture<'_, Result<(), BusError>> {
        for (id, event) in events {
            self.publish_once_now(id, event);
        }
        Box::pin(async { Ok(()) })
    }

    fn publish_batch(&self, batch: Vec<(Option<String>, Event)>) -> BoxFuture<'_, Vec<Result<Published, BusError>>> {
        let answers = batch
            .into_iter()
            .map(|(id, event)| {
                Ok(match id {
                    Some(id) => self.publish_once_now(id, event),
                    None => Published {
                        position: self.publish_now(event),
                        duplicate: false,
                    },
                })
            })
            .collect();
        Box::pin(async move { answers })
    }

    fn history(&self, channel: ChannelName, query: HistoryQuery) -> BoxFuture<'_, Result<History, BusError>> {
        let history = self.history_now(&channel, query);
        Box::pin(async move { Ok(history) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use std::sync::Arc;
    use std::time::Duration;

    fn ev(channel: &str, kind: EventKind, n: u32) -> Event {
        Event {
            channel: ChannelName::new(channel).unwrap(),
            kind,
            event: Arc::from("e"),
            payload: Bytes::from(n.to_string()),
            binary: false,
            origin: None,
            position: 0,
            published_at_ms: now_ms(),
            sender: None,
            memberships: 0,
        }
    }

    #[tokio::test]
    async fn positions_order_and_presence() {
        let bus = MemoryBus::new(Retention::default());
        let ch = ChannelName::new("a").unwrap();
        assert_eq!(bus.publish(ev("a", EventKind::Broadcast, 1)).await, Ok(1));
        let mut sub = bus.subscribe(ch.clone()).await.unwrap();
        assert_eq!(sub.head, 1);
        assert_eq!(bus.publish(ev("a", EventKind::Broadcast, 2)).await, Ok(2));
        assert_eq!(bus.publish(ev("a", EventKind::PresenceDiff, 3)).await, Ok(0));
        assert_eq!(
            bus.publish(ev("b", EventKind::Broadcast, 4)).await,
            Ok(1),
            "positions are per channel"
        );
        assert_eq!(bus.publish(ev("a", EventKind::Broadcast, 5)).await, Ok(3));
        let got: Vec<_> = (0..3).map(|_| sub.events.try_recv().unwrap()).collect();
        assert_eq!(got.iter().map(|e| e.position).collect::<Vec<_>>(), vec![2, 0, 3]);
        assert_eq!(got[1].payload, Bytes::from("3"));
        assert!(sub.events.try_recv().is_err(), "nothing from channel b");
    }

    #[tokio::test]
    async fn ephemeral_broadcasts_are_delivered_live_and_never_stored() {
        let mut cursor = ev("a", EventKind::Broadcast, 2);
        cursor.event = "cursor".into();
        let bus = MemoryBus::new(Retention::default()).with_ephemeral(fanout_core::Ephemeral::new(["cursor"], [""]));
        let ch = ChannelName::new("a").unwrap();
        let mut sub = bus.subscribe(ch.clone()).await.unwrap();
        assert_eq!(bus.publish(ev("a", EventKind::Broadcast, 1)).await, Ok(1));
        assert_eq!(bus.publish(cursor).await, Ok(0), "no position");
        assert_eq!(
            bus.publish(ev("a", EventKind::Broadcast, 3)).await,
            Ok(2),
            "stored positions go on"
        );
        let got: Vec<_> = (0..3).map(|_| sub.events.try_recv().unwrap()).collect();
        assert_eq!(got.iter().map(|e| e.position).collect::<Vec<_>>(), vec![1, 0, 2]);
        match bus.replay(ch, 0, 2).await.unwrap() {
            Replay::Events(events) => assert_eq!(events.iter().map(|e| e.position).collect::<Vec<_>>(), vec![1, 2]),
            Replay::Expired => panic!("history is there"),
        }
    }

    #[tokio::test]
    async fn replay_ranges_and_expiry() {
        let bus = MemoryBus::new(Retention {
            max_messages: 5,
            max_age: Duration::from_secs(60),
        });
        let ch = ChannelName::new("a").unwrap();
        for n in 1..=8 {
            bus.publish(ev("a", EventKind::Broadcast, n)).await.unwrap();
        }
        // Retained: 4..=8.
        let positions = |r: Replay| match r {
            Replay::Events(v) => v.iter().map(|e| e.position).collect::<Vec<_>>(),
            Replay::Expired => panic!("expired"),
        };
        assert_eq!(
            positions(bus.replay(ch.clone(), 3, 8).await.unwrap()),
            vec![4, 5, 6, 7, 8]
        );
        assert_eq!(positions(bus.replay(ch.clone(), 5, 7).await.unwrap()), vec![6, 7]);
        assert_eq!(
            positions(bus.replay(ch.clone(), 8, 8).await.unwrap()),
            Vec::<u64>::new()
        );
        assert_eq!(bus.replay(ch.clone(), 2, 8).await.unwrap(), Replay::Expired);
        assert_eq!(bus.replay(ch.clone(), 99, 8).await.unwrap(), Replay::Expired);
        let unknown = ChannelName::new("never").unwrap();
        assert_eq!(bus.replay(unknown.clone(), 0, 0).await.unwrap(), Replay::Events(vec![]));
        assert_eq!(bus.replay(unknown, 3, 0).await.unwrap(), Replay::Expired);
    }

    #[tokio::test]
    async fn history_last_after_and_expiry() {
        let bus = MemoryBus::new(Retention {
            max_messages: 5,
            max_age: Duration::from_secs(60),
        });
        let ch = ChannelName::new("a").unwrap();
        let positions = |h: History| match h {
            History::Events { events, head } => (events.iter().map(|e| e.position).collect::<Vec<_>>(), head),
            History::Expired { head } => panic!("expired at {head}"),
        };
        assert_eq!(
            positions(bus.history(ch.clone(), HistoryQuery::Last { limit: 3 }).await.unwrap()),
            (vec![], 0)
        );
        for n in 1..=8 {
            bus.publish(ev("a", EventKind::Broadcast, n)).await.unwrap();
        }
        bus.publish(ev("a", EventKind::PresenceDiff, 9)).await.unwrap();
        let last = |limit| HistoryQuery::Last { limit };
        let after = |after, limit| HistoryQuery::After { after, limit };
        assert_eq!(
            positions(bus.history(ch.clone(), last(3)).await.unwrap()),
            (vec![6, 7, 8], 8)
        );
        assert_eq!(
            positions(bus.history(ch.clone(), last(100)).await.unwrap()),
            (vec![4, 5, 6, 7, 8], 8),
            "only what is retained, and no presence diffs"
        );
        assert_eq!(
            positions(bus.history(ch.clone(), after(5, 2)).await.unwrap()),
            (vec![6, 7], 8)
        );
        assert_eq!(
            positions(bus.history(ch.clone(), after(3, 100)).await.unwrap()),
            (vec![4, 5, 6, 7, 8], 8)
        );
        assert_eq!(
            positions(bus.history(ch.clone(), after(8, 10)).await.unwrap()),
            (vec![], 8)
        );
        assert_eq!(
            bus.history(ch.clone(), after(2, 10)).await.unwrap(),
            History::Expired { head: 8 }
        );
        assert_eq!(
            bus.history(ch.clone(), after(9, 10)).await.unwrap(),
            History::Expired { head: 8 }
        );
        let never = ChannelName::new("never").unwrap();
        assert_eq!(
            bus.history(never, after(1, 10)).await.unwrap(),
            History::Expired { head: 0 }
        );
    }

    #[tokio::test]
    async fn a_batch_deduplicates_and_answers_the_first_position() {
        let bus = MemoryBus::new(Retention::default());
        let ch = ChannelName::new("a").unwrap();
        let mut sub = bus.subscribe(ch.clone()).await.unwrap();
        let once = |id: &str, n| (Some(id.to_owned()), ev("a", EventKind::Broadcast, n));
        let answers = bus
            .publish_batch(vec![
                once("k1", 1),
                (None, ev("a", EventKind::Broadcast, 2)),
                once("k1", 1),
            ])
            .await;
        assert_eq!(
            answers,
            vec![
                Ok(Published {
                    position: 1,
                    duplicate: false
                }),
                Ok(Published {
                    position: 2,
                    duplicate: false
                }),
                Ok(Published {
                    position: 1,
                    duplicate: true
                }),
            ]
        );
        let other = bus.publish_batch(vec![once("k2", 3)]).await;
        assert_eq!(
            other,
            vec![Ok(Published {
                position: 3,
                duplicate: false
            })]
        );
        let got: Vec<_> = std::iter::from_fn(|| sub.events.try_recv().ok())
            .map(|e| e.position)
            .collect();
        assert_eq!(got, vec![1, 2, 3], "the retry was not delivered");
    }

    #[test]
    fn seen_ids_expire_by_age() {
        let mut seen = SeenIds::default();
        seen.insert("old".into(), 1, 1_000);
        seen.insert("new".into(), 2, 50_000);
        seen.expire(121_500, 120_000);
        assert_eq!(seen.get("old"), None);
        assert_eq!(seen.get("new"), Some(2));
    }

    #[tokio::test]
    async fn dropped_subscription_is_pruned() {
        let bus = MemoryBus::new(Retention::default());
        let sub = bus.subscribe(ChannelName::new("a").unwrap()).await.unwrap();
        drop(sub);
        bus.publish(ev("a", EventKind::Broadcast, 1)).await.unwrap();
        assert!(bus.lock()[&ChannelName::new("a").unwrap()].subscribers.is_empty());
    }
}
