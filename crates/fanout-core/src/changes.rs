//! Database change subscriptions: the `postgres_changes` binding grammar,
//! row filters, and the routing of a table's changes to a channel.
//!
//! A client binding is `{event, schema, table, filter}` with
//! `filter = "<column>=<op>.<value>"` and `op` one of `eq, neq, lt, lte, gt,
//! gte, in` (`in.(a,b,c)`), as in Supabase Realtime. A [`Filter`] is parsed
//! once and evaluated on the decoded row (`record`, or `old_record` for a
//! delete) at the edge.
//!
//! Where a change travels is decided by [`Routes`], shared by the ingester
//! (which publishes) and the edges (which subscribe):
//! - a table with a channel template, e.g.
//!   `public.workshop_activities=workshop:{session_id}`, publishes each row to
//!   the channel named by the template filled with the row's column value, so
//!   a busy table only reaches the edges whose clients watch that workshop.
//!   A binding on such a table must filter `session_id=eq.<value>`;
//! - every other table publishes to one channel, `db:<schema>.<table>`.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

use serde_json::{Map, Value};

use crate::channel::{ChannelError, ChannelName};
use crate::policy::RowRule;

/// Which row events a binding wants.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ChangeEvent {
    All,
    Insert,
    Update,
    Delete,
}

impl ChangeEvent {
    /// Parses `*`, `INSERT`, `UPDATE`, `DELETE` (any case).
    pub fn parse(s: &str) -> Result<Self, BindingError> {
        match s.to_ascii_uppercase().as_str() {
            "*" => Ok(Self::All),
            "INSERT" => Ok(Self::Insert),
            "UPDATE" => Ok(Self::Update),
            "DELETE" => Ok(Self::Delete),
            _ => Err(BindingError::Event(s.to_owned())),
        }
    }

    /// Whether a change of type `change_type` (`INSERT`, …) is wanted.
    pub fn wants(self, change_type: &str) -> bool {
        match self {
            Self::All => true,
            Self::Insert => change_type == "INSERT",
            Self::Update => change_type == "UPDATE",
            Self::Delete => change_type == "DELETE",
        }
    }
}

/// Why a binding or filter was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BindingError {
    #[error("event must be one of *, INSERT, UPDATE, DELETE (got {0:?})")]
    Event(String),
    #[error("schema is required")]
    Schema,
    #[error("table is required: fanout routes changes per table, so schema-wide bindings are not supported")]
    Table,
    #[error("filter {0:?} must look like column=op.value with op one of eq, neq, lt, lte, gt, gte, in")]
    FilterSyntax(String),
    #[error(
        "table {table} is routed by column {column}: the binding needs filter \"{column}=eq.<value>\" \
         (got {got})"
    )]
    RoutedTable { table: String, column: String, got: String },
    #[error("the routed channel name is invalid: {0}")]
    Channel(#[from] ChannelError),
}

/// A filter operator.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FilterOp {
    Eq,
    Neq,
    Lt,
    Lte,
    Gt,
    Gte,
    In,
}

/// A parsed row filter, `column=op.value`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Filter {
    pub column: String,
    pub op: FilterOp,
    /// One value, or several for `in`.
    pub values: Vec<String>,
}

/// Why a filter could not be evaluated on a row. The binding then gets
/// nothing for that row; other bindings are unaffected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FilterEvalError {
    #[error("column {0:?} is not in the row")]
    MissingColumn(String),
    #[error("value {value:?} cannot be compared with column {column:?}")]
    Incomparable { column: String, value: String },
}

impl Filter {
    /// Parses `column=op.value` (`in.(a,b)` for `in`).
    pub fn parse(s: &str) -> Result<Self, BindingError> {
        let bad = || BindingError::FilterSyntax(s.to_owned());
        let (column, rest) = s.split_once('=').ok_or_else(bad)?;
        let (op, value) = rest.split_once('.').ok_or_else(bad)?;
        let column = column.trim();
        if column.is_empty() {
            return Err(bad());
        }
        let op = match op {
            "eq" => FilterOp::Eq,
            "neq" => FilterOp::Neq,
            "lt" => FilterOp::Lt,
            "lte" => FilterOp::Lte,
            "gt" => FilterOp::Gt,
            "gte" => FilterOp::Gte,
            "in" => FilterOp::In,
            _ => return Err(bad()),
        };
        let values = if op == FilterOp::In {
            let list = value
                .strip_prefix('(')
                .and_then(|v| v.strip_suffix(')'))
                .ok_or_else(bad)?;
            let values: Vec<String> = list.split(',').map(|v| unquote(v.trim()).to_owned()).collect();
            if values.iter().any(String::is_empty) {
                return Err(bad());
            }
            values
        } else {
            vec![value.to_owned()]
        };
        Ok(Self {
            column: column.to_owned(),
            op,
            values,
        })
    }

    /// Evaluates the filter on a decoded row. SQL semantics for NULL: no
    /// comparison with NULL matches.
    pub fn matches(&self, row: &Map<String, Value>) -> Result<bool, FilterEvalError> {
        let cell = row
            .get(&self.column)
            .ok_or_else(|| FilterEvalError::MissingColumn(self.column.clone()))?;
        if cell.is_null() {
            return Ok(false);
        }
        let cmp = |value: &str| {
            compare(cell, value).ok_or_else(|| FilterEvalError::Incomparable {
                column: self.column.clone(),
                value: value.to_owned(),
            })
        };
        use std::cmp::Ordering::*;
        Ok(match self.op {
            FilterOp::Eq => cmp(&self.values[0])? == Equal,
            FilterOp::Neq => cmp(&self.values[0])? != Equal,
            FilterOp::Lt => cmp(&self.values[0])? == Less,
            FilterOp::Lte => cmp(&self.values[0])? != Greater,
            FilterOp::Gt => cmp(&self.values[0])? == Greater,
            FilterOp::Gte => cmp(&self.values[0])? != Less,
            FilterOp::In => {
                for v in &self.values {
                    if cmp(v)? == Equal {
                        return Ok(true);
                    }
                }
                false
            }
        })
    }
}

impl fmt::Display for Filter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let op = match self.op {
            FilterOp::Eq => "eq",
            FilterOp::Neq => "neq",
            FilterOp::Lt => "lt",
            FilterOp::Lte => "lte",
            FilterOp::Gt => "gt",
            FilterOp::Gte => "gte",
            FilterOp::In => "in",
        };
        if self.op == FilterOp::In {
            write!(f, "{}={op}.(", self.column)?;
            for (i, v) in self.values.iter().enumerate() {
                let sep = if i == 0 { "" } else { "," };
                // Quote a value that would not read back as itself bare
                // (parsing trims each value and strips one pair of quotes),
                // so the printed filter parses to this one and equal
                // filters get equal binding ids.
                if v.trim() != v || unquote(v) != v {
                    write!(f, "{sep}\"{v}\"")?;
                } else {
                    write!(f, "{sep}{v}")?;
                }
            }
            f.write_str(")")
        } else {
            write!(f, "{}={op}.{}", self.column, self.values[0])
        }
    }
}

fn unquote(v: &str) -> &str {
    v.strip_prefix('"').and_then(|v| v.strip_suffix('"')).unwrap_or(v)
}

/// Compares a row cell with a filter value given as text: numbers
/// numerically, booleans as `true`/`false`, strings (text, uuids, ISO
/// timestamps) by bytes. `None` when they cannot be compared.
fn compare(cell: &Value, value: &str) -> Option<std::cmp::Ordering> {
    match cell {
        Value::Number(n) => {
            let v: f64 = value.trim().parse().ok()?;
            n.as_f64()?.partial_cmp(&v)
        }
        Value::Bool(b) => {
            let v = match value {
                "true" | "t" => true,
                "false" | "f" => false,
                _ => return None,
            };
            Some(b.cmp(&v))
        }
        Value::String(s) => Some(s.as_str().cmp(value)),
        _ => None,
    }
}

/// A client's `postgres_changes` binding, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Binding {
    /// The id the join reply gives it and every matching change carries in
    /// `ids`. Derived from the binding's content, so equal bindings on
    /// different edges get the same id.
    pub id: u32,
    pub event: ChangeEvent,
    pub schema: String,
    pub table: String,
    pub filter: Option<Filter>,
    /// The table's row rule bound to the subscriber's claims (see
    /// [`crate::policy`]); `None` when every row may be sent.
    pub access: Option<Arc<RowRule>>,
    /// The table's column allow-list; `None` sends every column.
    pub columns: Option<Arc<[String]>>,
}

impl Binding {
    /// Validates a binding as realtime-js sends it.
    pub fn new(event: &str, schema: &str, table: Option<&str>, filter: Option<&str>) -> Result<Self, BindingError> {
        let event_kind = ChangeEvent::parse(event)?;
        if schema.is_empty() || schema == "*" {
            return Err(BindingError::Schema);
        }
        let table = match table {
            Some(t) if !t.is_empty() && t != "*" => t,
            _ => return Err(BindingError::Table),
        };
        let filter = filter.filter(|f| !f.is_empty()).map(Filter::parse).transpose()?;
        let id = binding_id(event, schema, table, filter.as_ref());
        Ok(Self {
            id,
            event: event_kind,
            schema: schema.to_owned(),
            table: table.to_owned(),
            filter,
            access: None,
            columns: None,
        })
    }

    /// Whether a change of `change_type` to `schema.table` is for this
    /// binding, before its filter.
    pub fn wants(&self, schema: &str, table: &str, change_type: &str) -> bool {
        self.schema == schema && self.table == table && self.event.wants(change_type)
    }
}

/// FNV-1a over the binding's fields, kept to 31 bits so it is a safe
/// integer everywhere.
fn binding_id(event: &str, schema: &str, table: &str, filter: Option<&Filter>) -> u32 {
    let filter = filter.map(ToString::to_string).unwrap_or_default();
    let mut h: u32 = 0x811c_9dc5;
    for part in [event.to_ascii_uppercase().as_str(), schema, table, filter.as_str()] {
        for b in part.bytes().chain([0u8]) {
            h ^= u32::from(b);
            h = h.wrapping_mul(0x0100_0193);
        }
    }
    h & 0x7fff_ffff
}

/// How changes of one table are routed.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Route {
    /// Template text before and after `{column}`.
    prefix: String,
    column: String,
    suffix: String,
}

/// Why a routing specification was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid change route {spec:?}: {reason}")]
pub struct RouteError {
    pub spec: String,
    pub reason: &'static str,
}

/// Table → channel routing, shared by the ingester and the edges. See the
/// module docs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Routes {
    tables: HashMap<(String, String), Route>,
}

impl Routes {
    /// Parses `schema.table=<template>` entries separated by commas, where
    /// the template contains exactly one `{column}`; e.g.
    /// `public.workshop_activities=workshop:{session_id}`. Empty → no routes.
    pub fn parse(spec: &str) -> Result<Self, RouteError> {
        let mut tables = HashMap::new();
        for entry in spec.split(',').map(str::trim).filter(|e| !e.is_empty()) {
            let err = |reason| RouteError {
                spec: entry.to_owned(),
                reason,
            };
            let (table, template) = entry
                .split_once('=')
                .ok_or_else(|| err("expected schema.table=channel-template"))?;
            let (schema, table) = table
                .trim()
                .split_once('.')
                .ok_or_else(|| err("the table must be schema-qualified, e.g. public.messages"))?;
            let open = template
                .find('{')
                .ok_or_else(|| err("the template needs one {column}"))?;
            let close = template[open..]
                .find('}')
                .map(|i| i + open)
                .ok_or_else(|| err("unclosed { in the template"))?;
            let column = &template[open + 1..close];
            if column.is_empty() || template[close + 1..].contains('{') {
                return Err(err("the template needs exactly one non-empty {column}"));
            }
            tables.insert(
                (schema.to_owned(), table.to_owned()),
                Route {
                    prefix: template[..open].trim_start().to_owned(),
                    column: column.to_owned(),
                    suffix: template[close + 1..].trim_end().to_owned(),
                },
            );
        }
        Ok(Self { tables })
    }

    /// The channel a table's change goes to. `row` is the new row (the old
    /// one for a delete). A routed row without the column goes to the
    /// table channel, and the caller should report it.
    pub fn channel_for_change(&self, schema: &str, table: &str, row: &Map<String, Value>) -> ChannelName {
        if let Some(route) = self.tables.get(&(schema.to_owned(), table.to_owned()))
            && let Some(value) = row.get(&route.column).and_then(cell_text)
            && let Ok(c) = ChannelName::new(&format!("{}{value}{}", route.prefix, route.suffix))
        {
            return c;
        }
        table_channel(schema, table)
    }

    /// The channel an edge subscribes to for a binding.
    pub fn channel_for_binding(&self, binding: &Binding) -> Result<ChannelName, BindingError> {
        let Some(route) = self.tables.get(&(binding.schema.clone(), binding.table.clone())) else {
            return Ok(table_channel(&binding.schema, &binding.table));
        };
        match &binding.filter {
            Some(f) if f.op == FilterOp::Eq && f.column == route.column => Ok(ChannelName::new(&format!(
                "{}{}{}",
                route.prefix, f.values[0], route.suffix
            ))?),
            other => Err(BindingError::RoutedTable {
                table: format!("{}.{}", binding.schema, binding.table),
                column: route.column.clone(),
                got: other
                    .as_ref()
                    .map_or_else(|| "no filter".to_owned(), |f| format!("filter {:?}", f.to_string())),
            }),
        }
    }

    /// The column a table's rows are routed by, if it is routed.
    pub fn routed_by(&self, schema: &str, table: &str) -> Option<&str> {
        self.tables
            .get(&(schema.to_owned(), table.to_owned()))
            .map(|r| r.column.as_str())
    }

    /// Bindings for every change that reaches `channel`'s name, for clients
    /// that take a channel's changes whole instead of binding tables
    /// themselves (Socket.IO): the table of a table channel
    /// (`db:<schema>.<table>`), and each routed table whose template gives
    /// the name, filtered on its column's value (so a change reaches
    /// exactly the channel it was routed to). Sorted by id.
    pub fn bindings_for_channel(&self, channel: &ChannelName) -> Vec<Binding> {
        let name = channel.name();
        let mut out = Vec::new();
        if let Some((schema, table)) = name.strip_prefix("db:").and_then(|t| t.split_once('.'))
            && self.routed_by(schema, table).is_none()
            && let Ok(b) = Binding::new("*", schema, Some(table), None)
        {
            out.push(b);
        }
        for ((schema, table), route) in &self.tables {
            let value = name
                .strip_prefix(route.prefix.as_str())
                .and_then(|r| r.strip_suffix(route.suffix.as_str()))
                .filter(|v| !v.is_empty());
            if let Some(value) = value
                && let Ok(b) = Binding::new("*", schema, Some(table), Some(&format!("{}=eq.{value}", route.column)))
            {
                out.push(b);
            }
        }
        out.sort_by_key(|b| b.id);
        out
    }

    /// Whether no table is routed by a column.
    pub fn is_empty(&self) -> bool {
        self.tables.is_empty()
    }
}

/// The channel of an unrouted table: `db:<schema>.<table>`.
pub fn table_channel(schema: &str, table: &str) -> ChannelName {
    // Schema and table names are at most 63 bytes each, so this is valid.
    ChannelName::new(&format!("db:{schema}.{table}")).unwrap_or_else(|_| ChannelName::new("db:invalid").unwrap())
}

fn cell_text(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_channel_s_bindings_cover_exactly_the_changes_routed_to_it() {
        let routes =
            Routes::parse("public.activities=workshop:{session_id},public.notes=workshop:{session_id}").unwrap();
        let ch = |n: &str| ChannelName::new(n).unwrap();
        let b = routes.bindings_for_channel(&ch("workshop:42"));
        let mut tables: Vec<(&str, String)> = b
            .iter()
            .map(|b| {
                (
                    b.table.as_str(),
                    b.filter.as_ref().map(ToString::to_string).unwrap_or_default(),
                )
            })
            .collect();
        tables.sort();
        assert_eq!(
            tables,
            [
                ("activities", "session_id=eq.42".to_owned()),
                ("notes", "session_id=eq.42".to_owned())
            ]
        );
        for binding in &b {
            assert_eq!(
                routes.channel_for_binding(binding).unwrap(),
                ch("workshop:42"),
                "the same route back"
            );
        }
        let row = json!({"session_id": 42}).as_object().cloned().unwrap();
        assert!(b[0].filter.as_ref().unwrap().matches(&row).unwrap());
        let unrouted = routes.bindings_for_channel(&ch("db:public.signups"));
        assert_eq!(unrouted.len(), 1);
        assert_eq!(
            (unrouted[0].table.as_str(), unrouted[0].filter.is_none()),
            ("signups", true)
        );
        assert!(
            routes.bindings_for_channel(&ch("db:public.activities")).is_empty(),
            "a routed table's changes never go to its table channel"
        );
        assert!(routes.bindings_for_channel(&ch("lobby")).is_empty());
    }

    fn row(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    #[test]
    fn filters_parse_and_print() {
        let f = Filter::parse("id=eq.42").unwrap();
        assert_eq!(
            (f.column.as_str(), f.op, f.values.clone()),
            ("id", FilterOp::Eq, vec!["42".to_owned()])
        );
        assert_eq!(f.to_string(), "id=eq.42");
        let f = Filter::parse("status=in.(open,\"in review\")").unwrap();
        assert_eq!(f.values, vec!["open", "in review"]);
        // A value may itself contain dots and equals signs.
        assert_eq!(Filter::parse("email=eq.a.b=c@x.io").unwrap().values, vec!["a.b=c@x.io"]);
        for bad in [
            "id",
            "id=42",
            "id=like.4%",
            "=eq.1",
            "id=in.1,2",
            "id=in.()",
            "id=in.(1,,2)",
        ] {
            assert!(
                matches!(Filter::parse(bad), Err(BindingError::FilterSyntax(_))),
                "{bad}"
            );
        }
    }

    /// Found by the `filter` fuzz target: an `in` value that keeps its
    /// spaces or quotes only because it was quoted printed without the
    /// quotes, so the printed filter (which the binding id is made of)
    /// parsed to another filter.
    #[test]
    fn filters_print_in_values_so_they_parse_back() {
        for text in [
            "status=in.(o!\0n,\" nrmei\0ew\")",
            "tag=in.(\" a \",b)",
            "tag=in.(\"\"x\"\")",
            "tag=in.(\"\"x)",
            "tag=in.(\"\u{a0}x\")",
        ] {
            let f = Filter::parse(text).unwrap();
            let printed = f.to_string();
            assert_eq!(
                Filter::parse(&printed),
                Ok(f.clone()),
                "{text:?} printed as {printed:?}"
            );
            assert_eq!(Filter::parse(&printed).unwrap().to_string(), printed);
        }
        assert_eq!(Filter::parse("tag=in.(\" a \",b)").unwrap().values, vec![" a ", "b"]);
        // Values that read back as themselves bare are printed bare.
        assert_eq!(
            Filter::parse("status=in.(open,\"in review\")").unwrap().to_string(),
            "status=in.(open,in review)"
        );
    }

    #[test]
    fn filters_compare_by_the_cell_type() {
        let r = row(json!({"n": 10, "s": "b", "t": true, "z": null, "ts": "2026-01-02T00:00:00"}));
        let m = |f: &str| Filter::parse(f).unwrap().matches(&r);
        assert_eq!(m("n=eq.10"), Ok(true));
        assert_eq!(m("n=eq.10.0"), Ok(true));
        assert_eq!(m("n=neq.10"), Ok(false));
        assert_eq!(m("n=lt.11"), Ok(true));
        assert_eq!(m("n=lte.10"), Ok(true));
        assert_eq!(m("n=gt.10"), Ok(false));
        assert_eq!(m("n=gte.10"), Ok(true));
        assert_eq!(m("n=in.(1,10)"), Ok(true));
        assert_eq!(m("n=in.(1,2)"), Ok(false));
        assert_eq!(m("s=gt.a"), Ok(true));
        assert_eq!(m("s=eq.b"), Ok(true));
        assert_eq!(m("t=eq.true"), Ok(true));
        assert_eq!(m("ts=gte.2026-01-01"), Ok(true));
        // NULL never matches, even neq.
        assert_eq!(m("z=eq.1"), Ok(false));
        assert_eq!(m("z=neq.1"), Ok(false));
        assert!(matches!(m("missing=eq.1"), Err(FilterEvalError::MissingColumn(_))));
        assert!(matches!(m("n=eq.abc"), Err(FilterEvalError::Incomparable { .. })));
        assert!(matches!(m("t=eq.maybe"), Err(FilterEvalError::Incomparable { .. })));
    }

    #[test]
    fn bindings_validate_and_get_stable_ids() {
        let a = Binding::new("*", "public", Some("messages"), Some("room=eq.1")).unwrap();
        let b = Binding::new("*", "public", Some("messages"), Some("room=eq.1")).unwrap();
        let c = Binding::new("INSERT", "public", Some("messages"), Some("room=eq.1")).unwrap();
        assert_eq!(a.id, b.id);
        assert_ne!(a.id, c.id);
        assert!(a.id <= 0x7fff_ffff);
        // The id is pinned: it must not change between versions, since
        // edges of different versions may serve the same client.
        assert_eq!(Binding::new("*", "public", Some("t"), None).unwrap().id, 734_909_094);
        assert!(a.wants("public", "messages", "UPDATE"));
        assert!(!c.wants("public", "messages", "UPDATE"));
        assert!(!a.wants("public", "other", "INSERT"));
        assert_eq!(
            Binding::new("TRUNCATE", "public", Some("t"), None),
            Err(BindingError::Event("TRUNCATE".into()))
        );
        assert_eq!(Binding::new("*", "public", None, None), Err(BindingError::Table));
        assert_eq!(Binding::new("*", "public", Some("*"), None), Err(BindingError::Table));
        assert_eq!(Binding::new("*", "", Some("t"), None), Err(BindingError::Schema));
    }

    #[test]
    fn routes_send_rows_to_their_channel() {
        let routes = Routes::parse(
            "public.workshop_activities=workshop:{session_id}, public.workshop_stage_submissions=workshop:{session_id}",
        )
        .unwrap();
        let r = row(json!({"id": 1, "session_id": 42}));
        assert_eq!(
            routes.channel_for_change("public", "workshop_activities", &r).as_str(),
            "workshop:42"
        );
        assert_eq!(
            routes.channel_for_change("public", "workshop_sessions", &r).as_str(),
            "db:public.workshop_sessions"
        );
        // Without the column (e.g. a delete under REPLICA IDENTITY DEFAULT),
        // the table channel.
        assert_eq!(
            routes
                .channel_for_change("public", "workshop_activities", &row(json!({"id": 1})))
                .as_str(),
            "db:public.workshop_activities"
        );
        let b = Binding::new("*", "public", Some("workshop_activities"), Some("session_id=eq.42")).unwrap();
        assert_eq!(routes.channel_for_binding(&b).unwrap().as_str(), "workshop:42");
        let b = Binding::new("*", "public", Some("workshop_activities"), Some("kind=eq.chat")).unwrap();
        assert!(matches!(
            routes.channel_for_binding(&b),
            Err(BindingError::RoutedTable { .. })
        ));
        let b = Binding::new("*", "public", Some("workshop_sessions"), Some("id=eq.1")).unwrap();
        assert_eq!(
            routes.channel_for_binding(&b).unwrap().as_str(),
            "db:public.workshop_sessions"
        );
    }

    #[test]
    fn bad_routes_are_refused() {
        for bad in [
            "workshop_activities=w:{id}",
            "public.t",
            "public.t=w:{}",
            "public.t=w",
            "public.t=w:{a}{b}",
        ] {
            assert!(Routes::parse(bad).is_err(), "{bad}");
        }
        assert!(Routes::parse("").unwrap().is_empty());
    }
}
