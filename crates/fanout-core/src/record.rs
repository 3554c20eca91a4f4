//! The change record: one row change as it travels from the ingester to the
//! edges, and as clients receive it in `postgres_changes` `data`.
//!
//! ```json
//! {"schema":"public","table":"messages","commit_timestamp":"2026-11-22T03:16:45.123Z",
//!  "type":"UPDATE","columns":[{"name":"id","type":"int8"}],
//!  "record":{"id":1},"old_record":{"id":1},"errors":null}
//! ```
//!
//! This is the one definition of that contract: `fanout-cdc` builds a
//! [`ChangeRecord`] from the WAL and publishes [`ChangeRecord::to_json`];
//! the edge reads it back with [`ChangeRecord::from_json`] to evaluate
//! bindings, and forwards the published bytes unchanged.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// What happened to the row.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum ChangeType {
    Insert,
    Update,
    Delete,
}

impl ChangeType {
    /// `INSERT`, `UPDATE` or `DELETE`, as on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Insert => "INSERT",
            Self::Update => "UPDATE",
            Self::Delete => "DELETE",
        }
    }
}

/// One column of the changed table: its name and type name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Column {
    pub name: String,
    #[serde(rename = "type")]
    pub type_name: String,
}

/// One row change. See the module docs for the wire shape.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChangeRecord {
    pub schema: String,
    pub table: String,
    /// ISO-8601 UTC with milliseconds, e.g. `2026-11-22T03:16:45.123Z`.
    pub commit_timestamp: String,
    #[serde(rename = "type")]
    pub change_type: ChangeType,
    #[serde(default)]
    pub columns: Vec<Column>,
    /// The new row; empty for a delete.
    #[serde(default)]
    pub record: Map<String, Value>,
    /// What the table's REPLICA IDENTITY puts in the WAL for the old row.
    #[serde(default)]
    pub old_record: Map<String, Value>,
    /// `null`, or reasons the record is incomplete (e.g. `Error 413: Payload Too Large`).
    #[serde(default)]
    pub errors: Option<Vec<String>>,
}

impl ChangeRecord {
    /// The row that routing and filters look at: the new row, or the old
    /// one for a delete (a deleted row has no new values).
    pub fn row(&self) -> &Map<String, Value> {
        match self.change_type {
            ChangeType::Delete => &self.old_record,
            ChangeType::Insert | ChangeType::Update => &self.record,
        }
    }

    /// The record as published on the bus and sent to clients.
    pub fn to_json(&self) -> String {
        // Serializing plain maps, strings and vectors cannot fail.
        serde_json::to_string(self).unwrap_or_default()
    }

    /// Reads a published record back.
    pub fn from_json(bytes: &[u8]) -> Result<Self, serde_json::Error> {
        serde_json::from_slice(bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn record(change_type: ChangeType) -> ChangeRecord {
        ChangeRecord {
            schema: "public".into(),
            table: "t".into(),
            commit_timestamp: "2026-11-22T03:16:45.123Z".into(),
            change_type,
            columns: vec![Column {
                name: "id".into(),
                type_name: "int8".into(),
            }],
            record: json!({"id": 2}).as_object().cloned().unwrap(),
            old_record: json!({"id": 1}).as_object().cloned().unwrap(),
            errors: None,
        }
    }

    #[test]
    fn wire_shape_round_trips() {
        let r = record(ChangeType::Update);
        let v: Value = serde_json::from_str(&r.to_json()).unwrap();
        assert_eq!(
            v,
            json!({"schema": "public", "table": "t", "commit_timestamp": "2026-11-22T03:16:45.123Z",
                   "type": "UPDATE", "columns": [{"name": "id", "type": "int8"}],
                   "record": {"id": 2}, "old_record": {"id": 1}, "errors": null})
        );
        assert_eq!(ChangeRecord::from_json(r.to_json().as_bytes()).unwrap(), r);
    }

    #[test]
    fn a_delete_is_judged_by_its_old_row() {
        assert_eq!(record(ChangeType::Delete).row()["id"], json!(1));
        assert_eq!(record(ChangeType::Insert).row()["id"], json!(2));
        assert_eq!(record(ChangeType::Update).row()["id"], json!(2));
    }

    #[test]
    fn refuses_what_is_not_a_record() {
        assert!(ChangeRecord::from_json(br#"{"schema":"public"}"#).is_err());
        assert!(
            ChangeRecord::from_json(br#"{"schema":"a","table":"b","commit_timestamp":"","type":"MERGE"}"#).is_err()
        );
    }
}
