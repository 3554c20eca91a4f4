//! From decoded pgoutput row messages to the change records clients get.
//!
//! A record is a [`fanout_core::ChangeRecord`], the shape Supabase Realtime
//! sends as `postgres_changes` `data` (realtime-js turns it into `{schema,
//! table, commit_timestamp, eventType, new, old, errors}`). How its rows are
//! filled from the WAL:
//!
//! - `record` is the new row (empty for a delete); `old_record` is what the
//!   table's REPLICA IDENTITY puts in the WAL: the key columns under
//!   DEFAULT/INDEX (only when the key changed, for an update), every column
//!   under FULL, nothing under NOTHING.
//! - An unchanged TOASTed column of an update is not in the WAL: it is taken
//!   from the old row when REPLICA IDENTITY FULL provides it, and otherwise
//!   left out of `record`.
//! - A record larger than the configured limit keeps only values of at most
//!   64 bytes, and `errors` says `Error 413: Payload Too Large`, as Supabase
//!   does.

use std::collections::HashMap;

use fanout_core::record::{ChangeRecord, ChangeType, Column};
use serde_json::{Map, Value};

use crate::pgoutput::{Datum, Message, Oid, OldTuple, Relation, Tuple};
use crate::value::{builtin_type_name, text_to_json};

/// Largest value kept in a record that was over the size limit.
const SMALL_VALUE_BYTES: usize = 64;

/// Why a row message could not be turned into a record.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RecordError {
    #[error("row message for relation {0} arrived before its Relation message")]
    UnknownRelation(Oid),
    #[error("relation {relation} has {columns} columns but the row has {values} values")]
    ColumnCount {
        relation: String,
        columns: usize,
        values: usize,
    },
}

/// What the stream told us about relations and types so far. pgoutput sends
/// a Relation message before the first change of a table in each session,
/// and again when the table changes shape.
#[derive(Debug, Default)]
pub struct Catalog {
    relations: HashMap<Oid, Relation>,
    types: HashMap<Oid, String>,
}

/// A change record, ready to publish.
#[derive(Debug, Clone, PartialEq)]
pub struct Record {
    pub change: ChangeRecord,
    /// `change` as JSON, within the size limit: what is published.
    pub json: String,
}

impl Catalog {
    /// Remembers Relation and Type messages; ignores the rest.
    pub fn learn(&mut self, message: &Message) {
        match message {
            Message::Relation(r) => {
                self.relations.insert(r.id, r.clone());
            }
            Message::Type { oid, name, .. } => {
                self.types.insert(*oid, name.clone());
            }
            _ => {}
        }
    }

    fn type_name(&self, oid: Oid) -> String {
        builtin_type_name(oid)
            .map(str::to_owned)
            .or_else(|| self.types.get(&oid).cloned())
            .unwrap_or_else(|| oid.to_string())
    }

    /// Builds the record of an Insert, Update or Delete message; `None` for
    /// other messages.
    pub fn record(
        &self,
        message: &Message,
        commit_timestamp: &str,
        max_record_bytes: usize,
    ) -> Result<Option<Record>, RecordError> {
        let (relation, change_type, new, old) = match message {
            Message::Insert { relation, new } => (*relation, ChangeType::Insert, Some(new), None),
            Message::Update { relation, old, new } => (*relation, ChangeType::Update, Some(new), old.as_ref()),
            Message::Delete { relation, old } => (*relation, ChangeType::Delete, None, Some(old)),
            _ => return Ok(None),
        };
        let rel = self
            .relations
            .get(&relation)
            .ok_or(RecordError::UnknownRelation(relation))?;
        for tuple in new.into_iter().chain(old.map(|(_, t)| t)) {
            if tuple.len() != rel.columns.len() {
                return Err(RecordError::ColumnCount {
                    relation: format!("{}.{}", rel.namespace, rel.name),
                    columns: rel.columns.len(),
                    values: tuple.len(),
                });
            }
        }
        let old_record = match old {
            Some((kind, tuple)) => row(rel, tuple, None, |i| *kind == OldTuple::Full || rel.columns[i].key),
            None => Map::new(),
        };
        let record = match new {
            Some(tuple) => {
                let full_old = old.filter(|(k, _)| *k == OldTuple::Full).map(|(_, t)| t);
                row(rel, tuple, full_old, |_| true)
            }
            None => Map::new(),
        };
        let columns = rel
            .columns
            .iter()
            .map(|c| Column {
                name: c.name.clone(),
                type_name: self.type_name(c.type_oid),
            })
            .collect();
        let mut change = ChangeRecord {
            schema: rel.namespace.clone(),
            table: rel.name.clone(),
            commit_timestamp: commit_timestamp.to_owned(),
            change_type,
            columns,
            record,
            old_record,
            errors: None,
        };
        let mut json = change.to_json();
        if json.len() > max_record_bytes {
            for m in [&mut change.record, &mut change.old_record] {
                m.retain(|_, v| v.to_string().len() <= SMALL_VALUE_BYTES);
            }
            change.errors = Some(vec!["Error 413: Payload Too Large".into()]);
            json = change.to_json();
        }
        Ok(Some(Record { change, json }))
    }
}

/// A tuple as a JSON object of the columns `keep` selects. Unchanged
/// TOASTed values come from `old` when it has them, else they are left out.
fn row(rel: &Relation, tuple: &Tuple, old: Option<&Tuple>, keep: impl Fn(usize) -> bool) -> Map<String, Value> {
    let mut out = Map::with_capacity(tuple.len());
    for (i, (column, datum)) in rel.columns.iter().zip(tuple).enumerate() {
        if !keep(i) {
            continue;
        }
        let datum = match (datum, old.map(|o| &o[i])) {
            (Datum::UnchangedToast, Some(d)) => d,
            _ => datum,
        };
        let value = match datum {
            Datum::Null => Value::Null,
            Datum::UnchangedToast => continue,
            Datum::Text(b) => text_to_json(column.type_oid, &String::from_utf8_lossy(b)),
            Datum::Binary(b) => Value::String(format!("\\x{}", hex(b))),
        };
        out.insert(column.name.clone(), value);
    }
    out
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pgoutput::{Column, ReplicaIdentity};
    use bytes::Bytes;
    use serde_json::json;

    fn relation(identity: ReplicaIdentity) -> Message {
        let col = |name: &str, oid, key| Column {
            key,
            name: name.into(),
            type_oid: oid,
            type_modifier: -1,
        };
        Message::Relation(Relation {
            id: 7,
            namespace: "public".into(),
            name: "notes".into(),
            replica_identity: identity,
            columns: vec![col("id", 20, true), col("body", 25, false), col("meta", 3802, false)],
        })
    }

    fn text(s: &str) -> Datum {
        Datum::Text(Bytes::copy_from_slice(s.as_bytes()))
    }

    fn catalog(identity: ReplicaIdentity) -> Catalog {
        let mut c = Catalog::default();
        c.learn(&relation(identity));
        c
    }

    fn parse(r: &Record) -> Value {
        serde_json::from_str(&r.json).unwrap()
    }

    #[test]
    fn insert_has_typed_values_and_columns() {
        let c = catalog(ReplicaIdentity::Default);
        let msg = Message::Insert {
            relation: 7,
            new: vec![text("1"), text("hi"), text(r#"{"a":[1,2]}"#)],
        };
        let r = c.record(&msg, "2026-11-22T00:00:00.000Z", 1 << 20).unwrap().unwrap();
        assert_eq!(
            parse(&r),
            json!({
                "schema": "public", "table": "notes", "commit_timestamp": "2026-11-22T00:00:00.000Z",
                "type": "INSERT",
                "columns": [{"name":"id","type":"int8"},{"name":"body","type":"text"},{"name":"meta","type":"jsonb"}],
                "record": {"id": 1, "body": "hi", "meta": {"a": [1, 2]}},
                "old_record": {}, "errors": null,
            })
        );
        assert_eq!(r.change.row()["id"], json!(1));
    }

    #[test]
    fn delete_under_default_identity_keeps_only_the_key() {
        let c = catalog(ReplicaIdentity::Default);
        let msg = Message::Delete {
            relation: 7,
            old: (OldTuple::Key, vec![text("5"), Datum::Null, Datum::Null]),
        };
        let r = c.record(&msg, "t", 1 << 20).unwrap().unwrap();
        let v = parse(&r);
        assert_eq!(v["type"], "DELETE");
        assert_eq!(v["old_record"], json!({"id": 5}));
        assert_eq!(v["record"], json!({}));
        assert_eq!(r.change.row(), v["old_record"].as_object().unwrap());
    }

    #[test]
    fn unchanged_toast_comes_from_the_full_old_row_or_is_left_out() {
        let full = catalog(ReplicaIdentity::Full);
        let msg = Message::Update {
            relation: 7,
            old: Some((OldTuple::Full, vec![text("1"), text("long body"), Datum::Null])),
            new: vec![text("1"), Datum::UnchangedToast, text("[]")],
        };
        let v = parse(&full.record(&msg, "t", 1 << 20).unwrap().unwrap());
        assert_eq!(v["record"], json!({"id": 1, "body": "long body", "meta": []}));
        assert_eq!(v["old_record"], json!({"id": 1, "body": "long body", "meta": null}));

        let default = catalog(ReplicaIdentity::Default);
        let msg = Message::Update {
            relation: 7,
            old: None,
            new: vec![text("1"), Datum::UnchangedToast, Datum::Null],
        };
        let v = parse(&default.record(&msg, "t", 1 << 20).unwrap().unwrap());
        assert_eq!(v["record"], json!({"id": 1, "meta": null}));
        assert_eq!(v["old_record"], json!({}));
    }

    #[test]
    fn oversized_records_keep_small_values_and_say_so() {
        let c = catalog(ReplicaIdentity::Default);
        let big = "x".repeat(10_000);
        let msg = Message::Insert {
            relation: 7,
            new: vec![text("1"), text(&big), Datum::Null],
        };
        let r = c.record(&msg, "t", 4096).unwrap().unwrap();
        let v = parse(&r);
        assert!(r.json.len() < 4096);
        assert_eq!(v["record"], json!({"id": 1, "meta": null}));
        assert_eq!(v["errors"], json!(["Error 413: Payload Too Large"]));
    }

    #[test]
    fn unknown_relations_and_bad_shapes_are_errors() {
        let c = Catalog::default();
        let msg = Message::Insert {
            relation: 9,
            new: vec![],
        };
        assert_eq!(c.record(&msg, "t", 1024), Err(RecordError::UnknownRelation(9)));
        let c = catalog(ReplicaIdentity::Default);
        let msg = Message::Insert {
            relation: 7,
            new: vec![text("1")],
        };
        assert!(matches!(
            c.record(&msg, "t", 1024),
            Err(RecordError::ColumnCount { .. })
        ));
        assert_eq!(
            c.record(
                &Message::Truncate {
                    options: 0,
                    relations: vec![7]
                },
                "t",
                1024
            ),
            Ok(None)
        );
    }

    #[test]
    fn custom_types_use_the_type_message_name() {
        let mut c = Catalog::default();
        c.learn(&Message::Type {
            oid: 90_000,
            namespace: "public".into(),
            name: "mood".into(),
        });
        assert_eq!(c.type_name(90_000), "mood");
        assert_eq!(c.type_name(23), "int4");
        assert_eq!(c.type_name(90_001), "90001");
    }
}
