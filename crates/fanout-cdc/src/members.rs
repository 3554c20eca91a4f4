//! The membership mirror's writer: each membership table
//! ([`fanout_core::membership`]) loaded from a snapshot that is consistent
//! with a known WAL position, then kept current from the change stream.
//!
//! # Exactly once between snapshot and stream
//! The snapshot is read in a transaction that uses the snapshot of a
//! temporary logical slot created for it (`CREATE_REPLICATION_SLOT …
//! TEMPORARY LOGICAL pgoutput USE_SNAPSHOT`): it sees exactly the
//! transactions that commit before the slot's consistent point `C`, and a
//! logical slot decodes exactly those that commit at or after it. So the
//! stream applies a membership row change only if its transaction's commit
//! LSN is at or after `C`; earlier ones (the main slot replays from its
//! older confirmed position) are already in the snapshot. Nothing is missed
//! or applied twice, whatever the main slot replays after a crash.
//!
//! # What is kept
//! Per set and user, each value with the number of rows that give it (a
//! user may be in a workshop twice, through two rows). A user's values in
//! the mirror are those with a count above zero. Deletes and key-changing
//! updates need the old row's user and value columns: the table's REPLICA
//! IDENTITY must cover them (FULL, or a primary key / identity index that
//! includes both), which [`check_tables`] verifies with the fix to run.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use fanout_bus::MemberUpdate;
use fanout_core::ChangeType;
use fanout_core::membership::{MembershipSet, key_text};
use fanout_core::record::ChangeRecord;
use pgwire_replication::{Lsn, ReplicationClient, ReplicationConfig};
use serde_json::{Map, Value};

use crate::ingest::{CdcError, quote_literal, text};

/// Every set's rows, counted. See the module docs.
#[derive(Debug, Default)]
pub struct MemberState {
    sets: HashMap<String, HashMap<String, Vec<(Value, u32)>>>,
    /// (set, user) changed since the last [`Self::take_updates`].
    touched: HashSet<(String, String)>,
    /// Rows counted in, over every set.
    rows: u64,
}

impl MemberState {
    /// Counts one row in.
    pub fn add(&mut self, set: &str, user: String, value: Value) {
        let values = self
            .sets
            .entry(set.to_owned())
            .or_default()
            .entry(user.clone())
            .or_default();
        match values.iter_mut().find(|(v, _)| *v == value) {
            Some((_, n)) => *n += 1,
            None => values.push((value, 1)),
        }
        self.rows += 1;
        self.touched.insert((set.to_owned(), user));
    }

    /// Counts one row out (a row never counted in is ignored).
    pub fn remove(&mut self, set: &str, user: String, value: &Value) {
        let Some(users) = self.sets.get_mut(set) else { return };
        let Some(values) = users.get_mut(&user) else { return };
        if let Some(i) = values.iter().position(|(v, _)| v == value) {
            values[i].1 -= 1;
            self.rows -= 1;
            if values[i].1 == 0 {
                values.remove(i);
            }
        }
        if values.is_empty() {
            users.remove(&user);
        }
        self.touched.insert((set.to_owned(), user));
    }

    fn values(&self, set: &str, user: &str) -> Option<Arc<[Value]>> {
        let values = self.sets.get(set)?.get(user)?;
        (!values.is_empty()).then(|| values.iter().map(|(v, _)| v.clone()).collect())
    }

    /// The users' current values for every (set, user) changed since the
    /// last call.
    pub fn take_updates(&mut self) -> Vec<MemberUpdate> {
        let touched = std::mem::take(&mut self.touched);
        touched
            .into_iter()
            .map(|(set, user)| {
                let values = self.values(&set, &user);
                (set, user, values)
            })
            .collect()
    }

    /// Every (set, user) with its values: what the mirror must hold.
    pub fn full(&self) -> HashMap<(String, String), Arc<[Value]>> {
        self.sets
            .iter()
            .flat_map(|(set, users)| {
                users.iter().filter(|(_, v)| !v.is_empty()).map(move |(user, values)| {
                    (
                        (set.clone(), user.clone()),
                        values.iter().map(|(v, _)| v.clone()).collect(),
                    )
                })
            })
            .collect()
    }

    /// Rows counted in every set.
    pub fn rows(&self) -> u64 {
        self.rows
    }

    /// Applies one row change of a membership table.
    pub fn apply(&mut self, set: &MembershipSet, change: &ChangeRecord) {
        let pair = |row: &Map<String, Value>| -> Option<(String, Value)> {
            let user = key_text(row.get(&set.user_column)?)?;
            let value = row.get(&set.value_column).filter(|v| !v.is_null())?.clone();
            Some((user, value))
        };
        let old = match change.change_type {
            ChangeType::Insert => None,
            // Without the old row (REPLICA IDENTITY DEFAULT and the key
            // unchanged) the user and value are the new row's: the key
            // covers both.
            ChangeType::Update => pair(&change.old_record).or_else(|| pair(&change.record)),
            ChangeType::Delete => pair(&change.old_record),
        };
        if let Some((user, value)) = old {
            self.remove(&set.name, user, &value);
        }
        if change.change_type != ChangeType::Delete
            && let Some((user, value)) = pair(&change.record)
        {
            self.add(&set.name, user, value);
        }
    }
}

fn ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

/// Checks each membership table is published and its REPLICA IDENTITY
/// gives the user and value columns of deleted rows.
pub async fn check_tables(
    client: &mut ReplicationClient,
    publication: &str,
    sets: &[MembershipSet],
) -> Result<(), CdcError> {
    for set in sets {
        let table = set.qualified_table();
        let published = client
            .simple_query(&format!(
                "SELECT 1 FROM pg_catalog.pg_publication_tables WHERE pubname = {} AND schemaname = {} AND tablename = {}",
                quote_literal(publication),
                quote_literal(&set.schema),
                quote_literal(&set.table)
            ))
            .await?;
        if published.is_empty() {
            return Err(CdcError::Setup {
                problem: format!(
                    "membership table {table} (auth.memberships.{}) is not in publication {publication:?}",
                    set.name
                ),
                fix: format!(
                    "ALTER PUBLICATION {} ADD TABLE {}.{};",
                    ident(publication),
                    ident(&set.schema),
                    ident(&set.table)
                ),
            });
        }
        let identity = client
            .simple_query(&format!(
                "SELECT c.relreplident::text, coalesce((SELECT string_agg(a.attname::text, ',') \
                 FROM pg_catalog.pg_index i JOIN pg_catalog.pg_attribute a \
                 ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey) \
                 WHERE i.indrelid = c.oid AND ((c.relreplident = 'd' AND i.indisprimary) \
                 OR (c.relreplident = 'i' AND i.indisreplident))), '') \
                 FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
                 WHERE n.nspname = {} AND c.relname = {}",
                quote_literal(&set.schema),
                quote_literal(&set.table)
            ))
            .await?;
        let row = identity.first();
        let kind = row.and_then(|r| text(r, 0)).unwrap_or_default();
        let key: Vec<String> = row
            .and_then(|r| text(r, 1))
            .unwrap_or_default()
            .split(',')
            .map(str::to_owned)
            .collect();
        let covered = kind == "f" || [&set.user_column, &set.value_column].iter().all(|c| key.contains(c));
        if !covered {
            return Err(CdcError::Setup {
                problem: format!(
                    "membership table {table}: its REPLICA IDENTITY does not include {} and {}, so a deleted row would not say whose membership ended",
                    set.user_column, set.value_column
                ),
                fix: format!(
                    "ALTER TABLE {}.{} REPLICA IDENTITY FULL;",
                    ident(&set.schema),
                    ident(&set.table)
                ),
            });
        }
    }
    Ok(())
}

/// Reads every membership table at one consistent point: the snapshot of
/// a temporary slot, and that slot's consistent point (see the module
/// docs). The session (and with it the slot) ends when this returns.
pub async fn snapshot(
    repl: ReplicationConfig,
    slot: &str,
    sets: &[MembershipSet],
) -> Result<(MemberState, Lsn), CdcError> {
    let mut client = ReplicationClient::connect_gated(repl).await?;
    client
        .simple_query("BEGIN READ ONLY ISOLATION LEVEL REPEATABLE READ")
        .await?;
    let temp = format!("{}_members_{:08x}", slot.replace('"', ""), rand::random::<u32>());
    let created = client
        .simple_query(&format!(
            "CREATE_REPLICATION_SLOT \"{temp}\" TEMPORARY LOGICAL pgoutput USE_SNAPSHOT"
        ))
        .await
        .map_err(|e| {
            // Only a full slot table needs an operator; anything else (a
            // broken session) is retried like any replication error.
            if e.to_string().contains("replication slots are in use") {
                CdcError::Setup {
                    problem: format!(
                        "cannot create the temporary slot that reads the membership tables consistently: {e}"
                    ),
                    fix: "raise max_replication_slots by one (fanout's slot plus one while a snapshot is read)".into(),
                }
            } else {
                CdcError::Replication(e)
            }
        })?;
    let consistent = created
        .first()
        .and_then(|r| text(r, 1))
        .and_then(|s| Lsn::parse(&s).ok())
        .ok_or_else(|| CdcError::Setup {
            problem: "CREATE_REPLICATION_SLOT returned no consistent point".into(),
            fix: "check the server's logs".into(),
        })?;
    let mut state = MemberState::default();
    for set in sets {
        let rows = client
            .simple_query(&format!(
                "SELECT {user}::text, to_jsonb({value})::text FROM {schema}.{table} WHERE {user} IS NOT NULL AND {value} IS NOT NULL",
                user = ident(&set.user_column),
                value = ident(&set.value_column),
                schema = ident(&set.schema),
                table = ident(&set.table),
            ))
            .await?;
        for row in &rows {
            let (Some(user), Some(value)) = (text(row, 0), text(row, 1)) else {
                continue;
            };
            let Ok(value) = serde_json::from_str::<Value>(&value) else {
                continue;
            };
            if !user.is_empty() {
                state.add(&set.name, user, value);
            }
        }
    }
    client.simple_query("COMMIT").await?;
    state.touched.clear();
    drop(client);
    Ok((state, consistent))
}

#[cfg(test)]
mod tests {
    use super::*;
    use fanout_core::membership::MembershipSpec;
    use serde_json::json;

    fn set() -> MembershipSet {
        MembershipSet::from_spec(
            "workshops",
            &MembershipSpec {
                table: "public.workshop_participants".into(),
                user: "user_id".into(),
                value: "session_id".into(),
                claim: None,
            },
        )
        .unwrap()
    }

    fn change(kind: ChangeType, record: Value, old: Value) -> ChangeRecord {
        ChangeRecord {
            schema: "public".into(),
            table: "workshop_participants".into(),
            commit_timestamp: String::new(),
            change_type: kind,
            columns: vec![],
            record: record.as_object().cloned().unwrap_or_default(),
            old_record: old.as_object().cloned().unwrap_or_default(),
            errors: None,
        }
    }

    #[test]
    fn rows_are_counted_in_and_out() {
        let s = set();
        let mut state = MemberState::default();
        let row = |u: &str, w: i64| json!({"id": 1, "user_id": u, "session_id": w});
        state.apply(&s, &change(ChangeType::Insert, row("u1", 7), json!({})));
        state.apply(&s, &change(ChangeType::Insert, row("u1", 42), json!({})));
        // A second row for the same workshop.
        state.apply(&s, &change(ChangeType::Insert, row("u1", 42), json!({})));
        let mut updates = state.take_updates();
        assert_eq!(updates.len(), 1);
        let (_, user, values) = updates.remove(0);
        assert_eq!(user, "u1");
        assert_eq!(values.as_deref(), Some(&[json!(7), json!(42)][..]));
        assert_eq!(state.rows(), 3);
        // One of the two rows for 42 goes: still a member.
        state.apply(&s, &change(ChangeType::Delete, json!({}), row("u1", 42)));
        assert_eq!(state.take_updates()[0].2.as_deref(), Some(&[json!(7), json!(42)][..]));
        // An update moves u1 from 7 to 9 (old row given: REPLICA IDENTITY FULL).
        state.apply(&s, &change(ChangeType::Update, row("u1", 9), row("u1", 7)));
        assert_eq!(state.take_updates()[0].2.as_deref(), Some(&[json!(42), json!(9)][..]));
        // An update without the old row (key unchanged) changes nothing.
        state.apply(&s, &change(ChangeType::Update, row("u1", 9), json!({})));
        assert_eq!(state.take_updates()[0].2.as_deref(), Some(&[json!(42), json!(9)][..]));
        // Last rows go: the user leaves the set.
        state.apply(&s, &change(ChangeType::Delete, json!({}), row("u1", 42)));
        state.apply(&s, &change(ChangeType::Delete, json!({}), row("u1", 9)));
        assert_eq!(state.take_updates(), vec![("workshops".into(), "u1".into(), None)]);
        assert!(state.full().is_empty());
        // Rows without a user or value, and deletes never counted, do nothing harmful.
        state.apply(
            &s,
            &change(ChangeType::Insert, json!({"user_id": null, "session_id": 1}), json!({})),
        );
        state.apply(&s, &change(ChangeType::Delete, json!({}), row("u9", 1)));
        assert!(state.full().is_empty());
        assert_eq!(state.rows(), 0, "every counted row went");
    }
}
