//! What a load process counts while it runs, and the two records it hands
//! to whoever aggregates: a [`Tick`] every second and one [`Partial`] at
//! the end. Both serialize to JSON, so a `--workers` child can stream them
//! to its parent over stdout; histograms travel as raw `(value, count)`
//! pairs, which merge exactly.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

/// Microsecond histogram bounds: 1 µs to 10 min, 3 significant digits.
pub fn new_histogram() -> Histogram<u64> {
    Histogram::<u64>::new_with_bounds(1, 600_000_000, 3).expect("valid histogram bounds")
}

/// A histogram as the (value, count) of every non-empty bucket.
pub type RawHistogram = Vec<(u64, u64)>;

pub fn to_raw(h: &Histogram<u64>) -> RawHistogram {
    h.iter_recorded()
        .map(|v| (v.value_iterated_to(), v.count_at_value()))
        .collect()
}

pub fn add_raw(h: &mut Histogram<u64>, raw: &RawHistogram) {
    for &(value, count) in raw {
        let _ = h.record_n(value.max(1), count);
    }
}

pub fn from_raw(raw: &RawHistogram) -> Histogram<u64> {
    let mut h = new_histogram();
    add_raw(&mut h, raw);
    h
}

/// Live counters of one load process, shared by all its client tasks.
#[derive(Default)]
pub struct Stats {
    /// Connections currently joined.
    pub connections: AtomicU64,
    pub connect_errors: AtomicU64,
    /// Messages published.
    pub sent: AtomicU64,
    /// Deliveries owed: for each message, the receivers joined when it was sent.
    pub expected: AtomicU64,
    /// Deliveries that arrived, duplicates included.
    pub received: AtomicU64,
    pub lost: AtomicU64,
    pub duplicated: AtomicU64,
    pub reordered: AtomicU64,
    /// Connections that closed under a client.
    pub disconnected: AtomicU64,
    /// Clients joined again (on another server) after a disconnect.
    pub reconnected: AtomicU64,
    /// Publish-to-receive latency (µs) of the current second; swapped out by the ticker.
    second: Mutex<Option<Histogram<u64>>>,
    /// Disconnect-to-rejoined times (µs).
    pub reconnect_us: Mutex<Option<Histogram<u64>>>,
    /// Connect + join times (µs).
    pub connect_us: Mutex<Option<Histogram<u64>>>,
    /// Commit-to-receive latency (µs) of database changes alone (they are
    /// also in the per-second latency with the broadcasts).
    pub change_us: Mutex<Option<Histogram<u64>>>,
}

fn record_into(slot: &Mutex<Option<Histogram<u64>>>, us: u64) {
    let mut g = slot.lock().expect("histogram lock");
    let _ = g.get_or_insert_with(new_histogram).record(us.max(1));
}

fn take_raw(slot: &Mutex<Option<Histogram<u64>>>) -> RawHistogram {
    slot.lock()
        .expect("histogram lock")
        .take()
        .map(|h| to_raw(&h))
        .unwrap_or_default()
}

impl Stats {
    pub fn record_latency(&self, us: u64) {
        record_into(&self.second, us);
    }

    /// A database change's latency: in the overall figures and on its own.
    pub fn record_change_latency(&self, us: u64) {
        record_into(&self.second, us);
        record_into(&self.change_us, us);
    }

    pub fn record_reconnect(&self, us: u64) {
        self.reconnected.fetch_add(1, Ordering::Relaxed);
        record_into(&self.reconnect_us, us);
    }

    pub fn record_connect(&self, us: u64) {
        record_into(&self.connect_us, us);
    }

    /// Deliveries received once (duplicates removed).
    pub fn unique_received(&self) -> u64 {
        self.received.load(Ordering::Relaxed) - self.duplicated.load(Ordering::Relaxed)
    }

    /// The tick for second `t`: cumulative counters and this second's latencies.
    pub fn tick(&self, t: u32, client_cpu_seconds: f64) -> Tick {
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        Tick {
            t,
            connections: load(&self.connections),
            sent: load(&self.sent),
            received: load(&self.received),
            lost: load(&self.lost),
            duplicated: load(&self.duplicated),
            reconnected: load(&self.reconnected),
            client_cpu_seconds,
            latency: take_raw(&self.second),
        }
    }

    pub fn take_reconnect_raw(&self) -> RawHistogram {
        take_raw(&self.reconnect_us)
    }

    pub fn take_connect_raw(&self) -> RawHistogram {
        take_raw(&self.connect_us)
    }
}

/// One second of one load process.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Tick {
    /// Seconds since the process started.
    pub t: u32,
    pub connections: u64,
    /// Cumulative counters.
    pub sent: u64,
    pub received: u64,
    pub lost: u64,
    pub duplicated: u64,
    /// Clients live again after losing their server (reconnect storm).
    #[serde(default)]
    pub reconnected: u64,
    /// Cumulative CPU time of the load process.
    pub client_cpu_seconds: f64,
    /// Latencies (µs) recorded in this second.
    pub latency: RawHistogram,
}

/// The end result of one load process (the whole run, or one worker's share).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Partial {
    pub users: u64,
    pub connected: u64,
    pub connect_errors: u64,
    pub connect_seconds: f64,
    pub messages_sent: u64,
    pub messages_expected: u64,
    pub messages_received: u64,
    pub lost: u64,
    pub duplicated: u64,
    pub reordered: u64,
    pub disconnected: u64,
    pub reconnected: u64,
    /// Seconds from "go" until publishing stopped.
    pub publish_seconds: f64,
    /// Seconds from "go" until the last delivery arrived or the drain timed out.
    pub run_seconds: f64,
    /// This process's CPU time from "go" to the end.
    pub client_cpu_seconds: f64,
    pub reconnect_us: RawHistogram,
    pub connect_us: RawHistogram,
    #[serde(default)]
    pub change_us: RawHistogram,
    /// Workshop scenario: number of workshops this process ran.
    pub workshops: u64,
    /// Workshop scenario: smallest and largest workshop.
    pub workshop_min: u64,
    pub workshop_max: u64,
}

impl Partial {
    /// Fills the counters from `stats`; `lost` also counts deliveries that
    /// never came (owed minus received once).
    pub fn counts_from(&mut self, stats: &Stats) {
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        self.messages_sent = load(&stats.sent);
        self.messages_expected = load(&stats.expected);
        self.messages_received = load(&stats.received);
        self.duplicated = load(&stats.duplicated);
        self.reordered = load(&stats.reordered);
        let missing = self.messages_expected.saturating_sub(stats.unique_received());
        self.lost = load(&stats.lost).max(missing);
        self.disconnected = load(&stats.disconnected);
        self.reconnected = load(&stats.reconnected);
        self.connect_errors = load(&stats.connect_errors);
        self.reconnect_us = stats.take_reconnect_raw();
        self.connect_us = stats.take_connect_raw();
        self.change_us = take_raw(&stats.change_us);
    }

    /// Adds another process's share.
    pub fn merge(&mut self, o: &Partial) {
        self.users += o.users;
        self.connected += o.connected;
        self.connect_errors += o.connect_errors;
        self.connect_seconds = self.connect_seconds.max(o.connect_seconds);
        self.messages_sent += o.messages_sent;
        self.messages_expected += o.messages_expected;
        self.messages_received += o.messages_received;
        self.lost += o.lost;
        self.duplicated += o.duplicated;
        self.reordered += o.reordered;
        self.disconnected += o.disconnected;
        self.reconnected += o.reconnected;
        self.publish_seconds = self.publish_seconds.max(o.publish_seconds);
        self.run_seconds = self.run_seconds.max(o.run_seconds);
        self.client_cpu_seconds += o.client_cpu_seconds;
        self.reconnect_us.extend_from_slice(&o.reconnect_us);
        self.connect_us.extend_from_slice(&o.connect_us);
        self.change_us.extend_from_slice(&o.change_us);
        self.workshops += o.workshops;
        self.workshop_min = match (self.workshop_min, o.workshop_min) {
            (0, b) => b,
            (a, 0) => a,
            (a, b) => a.min(b),
        };
        self.workshop_max = self.workshop_max.max(o.workshop_max);
    }
}

/// Per-publisher order check of one receiver: counts gaps as lost, a
/// repeat as duplicated, and a late arrival of a missing one as reordered
/// (taking it back out of lost).
#[derive(Default)]
pub struct SeqCheck {
    next: Vec<u64>,
    /// Sequences skipped over, by publisher (only filled when gaps happen).
    missing: std::collections::HashSet<(u32, u64)>,
}

/// What [`SeqCheck::observe`] made of one message.
#[derive(Debug, PartialEq, Eq)]
pub enum Seen {
    InOrder,
    /// Jumped ahead; this many were skipped.
    Gap(u64),
    Duplicate,
    Late,
}

impl SeqCheck {
    pub fn with_publishers(n: usize) -> Self {
        Self {
            next: vec![0; n],
            missing: Default::default(),
        }
    }

    /// Sequence `seq` from publisher `publisher` (an index below the count given).
    pub fn observe(&mut self, publisher: usize, seq: u64) -> Seen {
        if publisher >= self.next.len() {
            self.next.resize(publisher + 1, 0);
        }
        let next = &mut self.next[publisher];
        if seq == *next {
            *next += 1;
            Seen::InOrder
        } else if seq > *next {
            let skipped = seq - *next;
            // Remember a bounded number of holes, to tell late from duplicate.
            for s in *next..seq {
                if self.missing.len() >= 100_000 {
                    break;
                }
                self.missing.insert((publisher as u32, s));
            }
            *next = seq + 1;
            Seen::Gap(skipped)
        } else if self.missing.remove(&(publisher as u32, seq)) {
            Seen::Late
        } else {
            Seen::Duplicate
        }
    }

    /// Applies what `observe` returned to the shared counters.
    pub fn count(seen: &Seen, stats: &Stats) -> bool {
        match seen {
            Seen::InOrder => true,
            Seen::Gap(n) => {
                stats.lost.fetch_add(*n, Ordering::Relaxed);
                true
            }
            Seen::Late => {
                stats.lost.fetch_sub(1, Ordering::Relaxed);
                stats.reordered.fetch_add(1, Ordering::Relaxed);
                true
            }
            Seen::Duplicate => {
                stats.duplicated.fetch_add(1, Ordering::Relaxed);
                false
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seq_check_tells_gaps_duplicates_and_late_arrivals_apart() {
        let mut c = SeqCheck::with_publishers(2);
        assert_eq!(c.observe(0, 0), Seen::InOrder);
        assert_eq!(c.observe(0, 1), Seen::InOrder);
        assert_eq!(c.observe(0, 1), Seen::Duplicate);
        assert_eq!(c.observe(0, 4), Seen::Gap(2));
        assert_eq!(c.observe(0, 2), Seen::Late);
        assert_eq!(c.observe(0, 2), Seen::Duplicate);
        assert_eq!(c.observe(1, 0), Seen::InOrder);
        assert_eq!(c.observe(5, 0), Seen::InOrder);
    }

    #[test]
    fn database_changes_count_overall_and_on_their_own_across_workers() {
        let (one, two) = (Stats::default(), Stats::default());
        one.record_latency(1_000);
        one.record_change_latency(40_000);
        two.record_change_latency(60_000);
        // The per-second histogram holds both kinds.
        assert_eq!(from_raw(&one.tick(1, 0.0).latency).len(), 2);
        let (mut merged, mut other) = (Partial::default(), Partial::default());
        merged.counts_from(&one);
        other.counts_from(&two);
        // Through JSON, as a worker's share reaches the parent.
        let other: Partial = serde_json::from_str(&serde_json::to_string(&other).unwrap()).unwrap();
        merged.merge(&other);
        let changes = from_raw(&merged.change_us);
        assert_eq!(changes.len(), 2);
        assert_eq!(changes.min(), 40_000);
        assert!(changes.max() >= 60_000);
    }

    #[test]
    fn raw_histograms_merge_exactly() {
        let mut a = new_histogram();
        let mut b = new_histogram();
        for v in [10, 200, 3_000, 45_000] {
            a.record(v).unwrap();
            b.record(v * 3).unwrap();
        }
        let mut m = from_raw(&to_raw(&a));
        add_raw(&mut m, &to_raw(&b));
        let mut direct = a.clone();
        direct.add(&b).unwrap();
        assert_eq!(m.len(), direct.len());
        for q in [0.5, 0.9, 0.99, 1.0] {
            assert_eq!(m.value_at_quantile(q), direct.value_at_quantile(q));
        }
    }
}
