//! Phoenix Presence semantics for one channel.
//!
//! A channel's presence is a map from a presence key (the client's
//! `config.presence.key`, or a server-made UUID) to a list of metas, one per
//! tracking connection. Each meta carries a unique `phx_ref`. Clients get the
//! whole map once (`presence_state`) and then `presence_diff`s of joins and
//! leaves; updating a meta is a leave of the old `phx_ref` plus a join of the
//! new one, which is how the Phoenix client merges it.

use serde_json::{Map, Value};
use std::collections::BTreeMap;

use crate::event::Origin;

/// One tracked presence: a connection's meta under a key.
#[derive(Debug, Clone, PartialEq)]
struct Entry {
    key: String,
    phx_ref: String,
    meta: Map<String, Value>,
}

impl Entry {
    fn meta_json(&self) -> Value {
        client_meta(&self.phx_ref, &self.meta)
    }
}

/// A unique `phx_ref`: the tracking node's id (low 32 bits) and a counter
/// of that node, e.g. `F3a9c-1f`.
pub fn phx_ref(node: u64, n: u64) -> String {
    format!("F{:x}-{n:x}", node & 0xffff_ffff)
}

/// A meta as clients see it: `{"phx_ref": …, …meta}`. A `phx_ref` inside
/// the user's meta is ignored, so a client cannot forge another's ref.
pub fn client_meta(phx_ref: &str, meta: &Map<String, Value>) -> Value {
    let mut m = Map::with_capacity(meta.len() + 1);
    m.insert("phx_ref".into(), Value::String(phx_ref.to_owned()));
    for (k, v) in meta {
        if k != "phx_ref" {
            m.insert(k.clone(), v.clone());
        }
    }
    Value::Object(m)
}

/// Joins and leaves to announce, in `presence_diff` shape.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PresenceDiff {
    pub joins: BTreeMap<String, Vec<Value>>,
    pub leaves: BTreeMap<String, Vec<Value>>,
}

impl PresenceDiff {
    pub fn is_empty(&self) -> bool {
        self.joins.is_empty() && self.leaves.is_empty()
    }

    /// `{"joins": {key: {"metas": [...]}}, "leaves": {...}}`.
    pub fn to_json(&self) -> Value {
        fn side(m: &BTreeMap<String, Vec<Value>>) -> Value {
            Value::Object(
                m.iter()
                    .map(|(k, metas)| (k.clone(), serde_json::json!({ "metas": metas })))
                    .collect(),
            )
        }
        serde_json::json!({ "joins": side(&self.joins), "leaves": side(&self.leaves) })
    }

    /// Appends another diff's joins and leaves to this one.
    pub fn merge(&mut self, other: PresenceDiff) {
        for (k, v) in other.joins {
            self.joins.entry(k).or_default().extend(v);
        }
        for (k, v) in other.leaves {
            self.leaves.entry(k).or_default().extend(v);
        }
    }
}

/// The presences of one channel, at most one per connection.
#[derive(Debug, Clone, Default)]
pub struct PresenceSet {
    by_conn: BTreeMap<Origin, Entry>,
}

impl PresenceSet {
    pub fn is_empty(&self) -> bool {
        self.by_conn.is_empty()
    }

    pub fn len(&self) -> usize {
        self.by_conn.len()
    }

    /// Tracks (or updates) the presence of `conn` under `key` with `meta`.
    /// `phx_ref` must be unique; the caller makes it.
    pub fn track(&mut self, conn: Origin, key: &str, meta: Map<String, Value>, phx_ref: String) -> PresenceDiff {
        let mut diff = PresenceDiff::default();
        let entry = Entry {
            key: key.to_owned(),
            phx_ref,
            meta,
        };
        let mut join_meta = entry.meta_json();
        if let Some(old) = self.by_conn.insert(conn, entry) {
            if let Value::Object(m) = &mut join_meta {
                m.insert("phx_ref_prev".into(), Value::String(old.phx_ref.clone()));
            }
            diff.leaves.entry(old.key.clone()).or_default().push(old.meta_json());
        }
        diff.joins.entry(key.to_owned()).or_default().push(join_meta);
        diff
    }

    /// Removes the presence of `conn`, if any.
    pub fn untrack(&mut self, conn: Origin) -> PresenceDiff {
        let mut diff = PresenceDiff::default();
        if let Some(old) = self.by_conn.remove(&conn) {
            diff.leaves.entry(old.key.clone()).or_default().push(old.meta_json());
        }
        diff
    }

    /// Every presence as `(connection, key, phx_ref, meta)`, ordered by
    /// connection: what a store needs to write its presences out again
    /// (e.g. to Redis after an outage), with the refs clients already know.
    pub fn entries(&self) -> impl Iterator<Item = (Origin, &str, &str, &Map<String, Value>)> {
        self.by_conn
            .iter()
            .map(|(conn, e)| (*conn, e.key.as_str(), e.phx_ref.as_str(), &e.meta))
    }

    /// Removes every presence tracked by connections of `node` (a crashed
    /// edge). Returns one diff for all of them.
    pub fn remove_node(&mut self, node: u64) -> PresenceDiff {
        let gone: Vec<Origin> = self.by_conn.keys().filter(|o| o.node == node).copied().collect();
        let mut diff = PresenceDiff::default();
        for conn in gone {
            diff.merge(self.untrack(conn));
        }
        diff
    }

    /// The whole map in `presence_state` shape: `{key: {"metas": [...]}}`.
    pub fn state_json(&self) -> Value {
        let mut by_key: BTreeMap<&str, Vec<Value>> = BTreeMap::new();
        for e in self.by_conn.values() {
            by_key.entry(&e.key).or_default().push(e.meta_json());
        }
        Value::Object(
            by_key
                .into_iter()
                .map(|(k, metas)| (k.to_owned(), serde_json::json!({ "metas": metas })))
                .collect(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn conn(n: u64) -> Origin {
        Origin { node: 1, connection: n }
    }

    fn meta(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    #[test]
    fn track_update_untrack() {
        let mut set = PresenceSet::default();
        let d = set.track(conn(1), "alice", meta(json!({"name": "Alice"})), "r1".into());
        assert_eq!(
            d.to_json(),
            json!({"joins": {"alice": {"metas": [{"phx_ref": "r1", "name": "Alice"}]}}, "leaves": {}})
        );
        set.track(conn(2), "alice", meta(json!({"name": "Alice 2nd tab"})), "r2".into());
        set.track(conn(3), "bob", meta(json!({"name": "Bob"})), "r3".into());
        assert_eq!(
            set.state_json(),
            json!({
                "alice": {"metas": [{"phx_ref": "r1", "name": "Alice"}, {"phx_ref": "r2", "name": "Alice 2nd tab"}]},
                "bob": {"metas": [{"phx_ref": "r3", "name": "Bob"}]}
            })
        );

        // An update is a leave of the old ref plus a join of the new one.
        let d = set.track(
            conn(3),
            "bob",
            meta(json!({"name": "Bob", "typing": true})),
            "r4".into(),
        );
        assert_eq!(
            d.to_json(),
            json!({
                "joins": {"bob": {"metas": [{"phx_ref": "r4", "phx_ref_prev": "r3", "name": "Bob", "typing": true}]}},
                "leaves": {"bob": {"metas": [{"phx_ref": "r3", "name": "Bob"}]}}
            })
        );

        let d = set.untrack(conn(1));
        assert_eq!(d.leaves["alice"], vec![json!({"phx_ref": "r1", "name": "Alice"})]);
        assert!(set.untrack(conn(1)).is_empty(), "untrack twice is a no-op");
        assert_eq!(set.len(), 2);
    }

    #[test]
    fn user_meta_cannot_forge_phx_ref() {
        let mut set = PresenceSet::default();
        set.track(conn(1), "k", meta(json!({"phx_ref": "forged", "a": 1})), "real".into());
        assert_eq!(set.state_json(), json!({"k": {"metas": [{"phx_ref": "real", "a": 1}]}}));
    }

    #[test]
    fn entries_are_the_current_presences_with_their_refs() {
        let mut set = PresenceSet::default();
        set.track(conn(2), "bob", meta(json!({"name": "Bob"})), "r1".into());
        set.track(conn(1), "alice", meta(json!({"name": "Alice"})), "r2".into());
        // An update replaces the entry: only the new ref and meta are listed.
        set.track(conn(2), "bob", meta(json!({"typing": true})), "r3".into());
        set.track(conn(3), "carol", Map::new(), "r4".into());
        set.untrack(conn(3));
        let entries: Vec<_> = set
            .entries()
            .map(|(o, k, r, m)| (o, k.to_owned(), r.to_owned(), Value::Object(m.clone())))
            .collect();
        assert_eq!(
            entries,
            vec![
                (conn(1), "alice".to_owned(), "r2".to_owned(), json!({"name": "Alice"})),
                (conn(2), "bob".to_owned(), "r3".to_owned(), json!({"typing": true})),
            ]
        );
    }

    #[test]
    fn remove_node_drops_only_that_node() {
        let mut set = PresenceSet::default();
        set.track(conn(1), "a", Map::new(), "r1".into());
        set.track(Origin { node: 2, connection: 1 }, "b", Map::new(), "r2".into());
        let d = set.remove_node(1);
        assert_eq!(d.leaves.keys().collect::<Vec<_>>(), vec!["a"]);
        assert_eq!(set.state_json(), json!({"b": {"metas": [{"phx_ref": "r2"}]}}));
    }
}
