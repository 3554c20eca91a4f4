//! [`MemoryBus`]: the in-process bus of standalone mode.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;

use fanout_core::{ChannelName, Event, EventKind, Position, now_ms};
use tokio::sync::mpsc;

use crate::bus::{BoxFuture, Bus, BusError, Replay, Retention, Subscription};

#[derive(Default)]
struct Log {
    last: Position,
    history: VecDeque<Event>,
    subscribers: Vec<mpsc::UnboundedSender<Event>>,
}

impl Log {
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

/// Deduplication ids the memory bus remembers.
const DEDUPE_IDS: usize = 100_000;

/// The most recent deduplication ids, oldest first.
#[derive(Default)]
struct SeenIds {
    set: std::collections::HashSet<String>,
    order: VecDeque<String>,
}

impl SeenIds {
    /// Records `id`; false if it was already there.
    fn insert(&mut self, id: &str) -> bool {
        if self.set.contains(id) {
            return false;
        }
        if self.order.len() == DEDUPE_IDS
            && let Some(old) = self.order.pop_front()
        {
            self.set.remove(&old);
        }
        self.set.insert(id.to_owned());
        self.order.push_back(id.to_owned());
        true
    }
}

/// The in-process bus of standalone mode: per-channel history in memory,
/// bounded by [`Retention`]; deduplication remembers the last 100,000 ids.
pub struct MemoryBus {
    logs: Mutex<HashMap<ChannelName, Log>>,
    seen: Mutex<SeenIds>,
    retention: Retention,
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
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<ChannelName, Log>> {
        self.logs.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn publish_now(&self, mut event: Event) -> Position {
        let now = now_ms();
        let mut logs = self.lock();
        let log = logs.entry(event.channel.clone()).or_default();
        if event.kind != EventKind::PresenceDiff {
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

    fn replay_now(&self, channel: &ChannelName, after: Position, upto: Position) -> Replay {
        let now = now_ms();
        let mut logs = self.lock();
        let Some(log) = logs.get_mut(channel) else {
            return if after == 0 {
                Replay::Events(Vec::new())
            } else {
                Replay::Expired
            };
        };
        log.trim(self.retention, now);
        if after > log.last {
            // A position from the future: the history was lost (restart).
            return Replay::Expired;
        }
        let oldest = log.history.front().map_or(log.last + 1, |e| e.position);
        if after + 1 < oldest && after < upto {
            return Replay::Expired;
        }
        Replay::Events(
            log.history
                .iter()
                .filter(|e| e.position > after && e.position <= upto)
                .cloned()
                .collect(),
        )
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
            let fresh = self.seen.lock().unwrap_or_else(|e| e.into_inner()).insert(&id);
            if fresh {
                self.publish_now(event);
            }
        }
        Box::pin(async { Ok(()) })
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
    async fn dropped_subscription_is_pruned() {
        let bus = MemoryBus::new(Retention::default());
        let sub = bus.subscribe(ChannelName::new("a").unwrap()).await.unwrap();
        drop(sub);
        bus.publish(ev("a", EventKind::Broadcast, 1)).await.unwrap();
        assert!(bus.lock()[&ChannelName::new("a").unwrap()].subscribers.is_empty());
    }
}
