//! The account at the end of a chaos run: what was sent (and whether its
//! publisher was told it was stored), what every client received, and the
//! check that every stored message reached every client that was joined
//! when it was sent, exactly once and in order.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Mutex;

use serde::Serialize;

/// Milliseconds since the run started.
pub type Ms = u64;

/// One message, as its publisher names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub enum Key {
    /// A client broadcast: sender and the sender's sequence number.
    Chat { user: u32, seq: u32 },
    /// A server-API publish (`POST /api/v1/publish`).
    Api(u32),
    /// A committed `workshop_activities` row (its `seq` column).
    Row(u32),
}

/// What the publisher learned.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Outcome {
    /// No answer yet.
    Pending,
    /// Acknowledged (broadcast ack, API 200, COMMIT returned) at this time.
    Acked(Ms),
    /// Refused with an error: it must never be delivered.
    Refused(Ms),
    /// The connection broke before an answer: it may or may not be stored.
    Unknown(Ms),
}

#[derive(Debug, Clone, Copy)]
pub struct Sent {
    pub workshop: u32,
    pub at: Ms,
    pub outcome: Outcome,
}

/// Every message sent during the run, shared by the publishers.
#[derive(Debug, Default)]
pub struct Ledger {
    sent: Mutex<HashMap<Key, Sent>>,
}

impl Ledger {
    pub fn sent(&self, key: Key, workshop: u32, at: Ms) {
        self.sent.lock().expect("ledger").insert(
            key,
            Sent {
                workshop,
                at,
                outcome: Outcome::Pending,
            },
        );
    }

    /// Records the answer for `key` (the first answer wins).
    pub fn answered(&self, key: Key, outcome: Outcome) {
        if let Some(s) = self.sent.lock().expect("ledger").get_mut(&key)
            && s.outcome == Outcome::Pending
        {
            s.outcome = outcome;
        }
    }

    pub fn snapshot(&self) -> HashMap<Key, Sent> {
        self.sent.lock().expect("ledger").clone()
    }
}

/// One delivery to a client.
#[derive(Debug, Clone, Copy)]
pub struct Got {
    pub key: Key,
    pub pos: u64,
    pub at: Ms,
}

/// What one simulated user saw over all its connections.
#[derive(Debug, Default)]
pub struct UserLog {
    pub user: u32,
    pub workshop: u32,
    pub received: Vec<Got>,
    /// When each join (first or resumed) was answered ok.
    pub joins: Vec<Ms>,
    /// When each connection was lost.
    pub drops: Vec<Ms>,
    /// Protocol problems: refused joins, `resync required`, …
    pub problems: Vec<String>,
    /// Joined when the run ended.
    pub live_at_end: bool,
}

/// The verdict.
#[derive(Debug, Default, Serialize)]
pub struct Account {
    /// Messages sent, by what the publisher learned.
    pub sent: u64,
    pub acked: u64,
    pub refused: u64,
    pub unknown: u64,
    /// (client, message) pairs that had to be delivered, and were checked.
    pub checked: u64,
    pub delivered: u64,
    pub lost: u64,
    pub duplicated: u64,
    pub reordered: u64,
    /// Received but never sent, sent to another channel, or refused to its publisher.
    pub phantom: u64,
    /// One message at different positions for different clients.
    pub inconsistent: u64,
    pub resyncs: u64,
    pub reconnects: u64,
    pub users_not_live_at_end: u64,
    pub problems: Vec<String>,
}

impl Account {
    pub fn clean(&self) -> bool {
        self.lost + self.duplicated + self.reordered + self.phantom + self.inconsistent + self.resyncs == 0
            && self.users_not_live_at_end == 0
            && self.checked > 0
    }

    fn problem(&mut self, p: String) {
        if self.problems.len() < 60 {
            self.problems.push(p);
        }
    }
}

/// Checks every user's deliveries against the ledger. A message is
/// *stored* if its publisher was told so, or if any client received it
/// (an unanswered publish may have been stored); every client must receive
/// every stored message of its channel sent after its first join, once, at
/// one position shared by all clients, in increasing positions.
pub fn check(sent: &HashMap<Key, Sent>, logs: &[UserLog]) -> Account {
    let mut a = Account {
        sent: sent.len() as u64,
        ..Account::default()
    };
    for s in sent.values() {
        match s.outcome {
            Outcome::Acked(_) => a.acked += 1,
            Outcome::Refused(_) => a.refused += 1,
            Outcome::Unknown(_) | Outcome::Pending => a.unknown += 1,
        }
    }
    let mut stored: BTreeMap<u32, HashSet<Key>> = BTreeMap::new();
    for (k, s) in sent {
        if matches!(s.outcome, Outcome::Acked(_)) {
            stored.entry(s.workshop).or_default().insert(*k);
        }
    }
    for log in logs {
        for g in &log.received {
            if let Some(s) = sent.get(&g.key)
                && s.workshop == log.workshop
                && !matches!(s.outcome, Outcome::Refused(_))
            {
                stored.entry(s.workshop).or_default().insert(g.key);
            }
        }
    }
    for log in logs {
        a.reconnects += log.joins.len().saturating_sub(1) as u64;
        a.delivered += log.received.len() as u64;
        if !log.live_at_end {
            a.users_not_live_at_end += 1;
            a.problem(format!("user {} was not joined at the end", log.user));
        }
        for p in &log.problems {
            if p.contains("resync") {
                a.resyncs += 1;
            }
            a.problem(format!("user {}: {p}", log.user));
        }
        let mut seen = HashMap::new();
        let mut last_pos = 0u64;
        let mut last_seq: HashMap<u32, u32> = HashMap::new();
        for g in &log.received {
            match sent.get(&g.key) {
                None => {
                    a.phantom += 1;
                    a.problem(format!("user {}: {:?} was never sent", log.user, g.key));
                }
                Some(s) if s.workshop != log.workshop => {
                    a.phantom += 1;
                    a.problem(format!(
                        "user {}: {:?} belongs to workshop {}",
                        log.user, g.key, s.workshop
                    ));
                }
                Some(Sent {
                    outcome: Outcome::Refused(_),
                    ..
                }) => {
                    a.phantom += 1;
                    a.problem(format!("user {}: {:?} was refused to its publisher", log.user, g.key));
                }
                Some(_) => {}
            }
            if let Some(first) = seen.insert(g.key, *g) {
                a.duplicated += 1;
                a.problem(format!(
                    "user {}: {:?} (sent at {} ms) twice: at {} ms (position {}), at {} ms (position {})",
                    log.user,
                    g.key,
                    sent.get(&g.key).map_or(0, |s| s.at),
                    first.at,
                    first.pos,
                    g.at,
                    g.pos
                ));
                continue;
            }
            let mut out_of_order = g.pos <= last_pos;
            if let Key::Chat { user, seq } = g.key {
                let prev = last_seq.insert(user, seq);
                out_of_order |= prev.is_some_and(|p| p >= seq);
            }
            if out_of_order {
                a.reordered += 1;
                a.problem(format!(
                    "user {}: {:?} at position {} after position {last_pos}",
                    log.user, g.key, g.pos
                ));
            }
            last_pos = last_pos.max(g.pos);
        }
        let Some(&joined) = log.joins.first() else {
            continue;
        };
        for k in stored.get(&log.workshop).into_iter().flatten() {
            if sent[k].at < joined {
                continue;
            }
            a.checked += 1;
            if !seen.contains_key(k) {
                a.lost += 1;
                a.problem(format!(
                    "user {}: {k:?} (sent at {} ms) never arrived",
                    log.user, sent[k].at
                ));
            }
        }
    }
    // Last, so the problems above (with a user and times) come first.
    let mut position: HashMap<Key, u64> = HashMap::new();
    for g in logs.iter().flat_map(|log| &log.received) {
        match position.get(&g.key) {
            Some(&p) if p != g.pos => {
                a.inconsistent += 1;
                a.problem(format!(
                    "{:?} at position {} for one client, {p} for another",
                    g.key, g.pos
                ));
            }
            _ => {
                position.insert(g.key, g.pos);
            }
        }
    }
    a
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sent(entries: &[(Key, u32, Ms, Outcome)]) -> HashMap<Key, Sent> {
        entries
            .iter()
            .map(|&(k, workshop, at, outcome)| (k, Sent { workshop, at, outcome }))
            .collect()
    }

    fn log(user: u32, joined: Ms, got: &[(Key, u64)]) -> UserLog {
        UserLog {
            user,
            workshop: 1,
            received: got.iter().map(|&(key, pos)| Got { key, pos, at: 0 }).collect(),
            joins: vec![joined],
            live_at_end: true,
            ..UserLog::default()
        }
    }

    const A: Key = Key::Chat { user: 9, seq: 1 };
    const B: Key = Key::Chat { user: 9, seq: 2 };
    const R: Key = Key::Row(1);

    #[test]
    fn a_complete_ordered_account_is_clean() {
        let s = sent(&[
            (A, 1, 10, Outcome::Acked(11)),
            (B, 1, 20, Outcome::Acked(21)),
            (R, 1, 30, Outcome::Acked(31)),
        ]);
        let a = check(
            &s,
            &[log(1, 5, &[(A, 1), (B, 2), (R, 3)]), log(2, 15, &[(B, 2), (R, 3)])],
        );
        assert!(a.clean(), "{a:?}");
        assert_eq!(a.checked, 5);
    }

    #[test]
    fn losses_duplicates_reorders_and_phantoms_are_counted() {
        let s = sent(&[
            (A, 1, 10, Outcome::Acked(11)),
            (B, 1, 20, Outcome::Acked(21)),
            (Key::Api(1), 1, 20, Outcome::Refused(21)),
        ]);
        let lost = check(&s, &[log(1, 5, &[(A, 1)])]);
        assert_eq!((lost.lost, lost.clean()), (1, false));
        let dup = check(&s, &[log(1, 5, &[(A, 1), (A, 1), (B, 2)])]);
        assert_eq!(dup.duplicated, 1);
        let reordered = check(&s, &[log(1, 5, &[(B, 2), (A, 1)])]);
        assert_eq!(reordered.reordered, 1);
        let phantom = check(&s, &[log(1, 5, &[(A, 1), (B, 2), (Key::Api(1), 3), (Key::Row(7), 4)])]);
        assert_eq!(phantom.phantom, 2);
        let split = check(&s, &[log(1, 5, &[(A, 1), (B, 2)]), log(2, 5, &[(A, 1), (B, 3)])]);
        assert_eq!(split.inconsistent, 1);
    }

    #[test]
    fn an_unanswered_publish_one_client_got_is_owed_to_every_client() {
        let s = sent(&[(A, 1, 10, Outcome::Unknown(12))]);
        let a = check(&s, &[log(1, 5, &[(A, 1)]), log(2, 5, &[])]);
        assert_eq!(a.lost, 1);
        // Nobody got it: it was not stored, and nothing is owed.
        assert!(check(&s, &[log(1, 5, &[]), log(2, 5, &[])]).lost == 0);
    }

    #[test]
    fn messages_sent_before_a_clients_first_join_are_not_owed_to_it() {
        let s = sent(&[(A, 1, 10, Outcome::Acked(11)), (B, 1, 20, Outcome::Acked(21))]);
        let a = check(&s, &[log(1, 15, &[(B, 2)])]);
        assert!(a.clean(), "{a:?}");
    }
}
