//! Authorization policies, decided at the edge from the token's claims with
//! no database round trip.
//!
//! - **Channels.** A private channel (joined with `config.private: true`)
//!   is a namespace of its own, apart from the public channel of the same
//!   name, and is refused unless a policy allows it: the token's `channels`
//!   claim (names, or prefixes ending in `*`) grants read and write, and
//!   `[[auth.channels]]` rules capture parts of the name and compare them
//!   with claims ([`ChannelRule`]). The first rule whose pattern matches
//!   decides; a rule without `write` grants none. Public channels stay open
//!   to any valid token unless `auth.public_channels = false` closes them.
//! - **Rows.** `[auth.tables."schema.table"]` gives a table's `read` rule,
//!   decided per change against the row (new row, old row for a delete),
//!   and an optional `columns` allow-list ([`TableRule`]). With keys
//!   configured, a table without a rule is refused at join.
//! - **Memberships.** `[auth.memberships.<name>]` names a table of
//!   (user, value) rows; rules read a token's values as `member.<name>`
//!   ([`crate::membership`]), decided against the mirror the caller passes.
//! - Tokens whose `role` is the bypass role (`service_role`, as Supabase's
//!   service key) pass every channel and row policy.
//!
//! The rule language is in [`expr`].

pub mod expr;

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::Deserialize;
use serde_json::Value;

pub use expr::{Context, EvalError, Expr, RowRule, RuleError, Scope};

use crate::membership::{Members, MembershipError, MembershipSet, MembershipSpec};

/// What a token may do on one channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Access {
    /// Join, receive broadcasts and presence.
    pub read: bool,
    /// Send broadcasts (REST included) and track presence.
    pub write: bool,
}

impl Access {
    pub const ALL: Access = Access {
        read: true,
        write: true,
    };
    pub const NONE: Access = Access {
        read: false,
        write: false,
    };
}

/// A channel rule as written in the config file.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChannelRuleSpec {
    pub pattern: String,
    pub read: String,
    #[serde(default)]
    pub write: Option<String>,
}

/// A table rule as written in the config file.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TableRuleSpec {
    pub read: String,
    #[serde(default)]
    pub columns: Option<Vec<String>>,
}

/// A channel pattern: literal text, `{name}` captures (one or more
/// characters other than `:`), and an optional final `*` (any rest).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pattern {
    source: String,
    parts: Vec<Part>,
    rest: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Text(String),
    Capture(String),
}

impl Pattern {
    pub fn parse(source: &str) -> Result<Self, RuleError> {
        let err = |reason: &str| RuleError {
            rule: source.to_owned(),
            reason: reason.to_owned(),
        };
        let (body, rest) = match source.strip_suffix('*') {
            Some(b) => (b, true),
            None => (source, false),
        };
        let mut parts = Vec::new();
        let mut text = String::new();
        let mut chars = body.chars();
        while let Some(c) = chars.next() {
            match c {
                '{' => {
                    let name: String = chars.by_ref().take_while(|&c| c != '}').collect();
                    if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                        return Err(err("a capture is {name}, a plain name in braces"));
                    }
                    if matches!(parts.last(), Some(Part::Capture(_))) && text.is_empty() {
                        return Err(err("two captures need text between them"));
                    }
                    if !text.is_empty() {
                        parts.push(Part::Text(std::mem::take(&mut text)));
                    }
                    if parts.iter().any(|p| p == &Part::Capture(name.clone())) {
                        return Err(err("a capture name is used twice"));
                    }
                    parts.push(Part::Capture(name));
                }
                '}' => return Err(err("unmatched `}`")),
                '*' => return Err(err("`*` may only end a pattern")),
                c => text.push(c),
            }
        }
        if !text.is_empty() {
            parts.push(Part::Text(text));
        }
        if parts.is_empty() && !rest {
            return Err(err("the pattern is empty"));
        }
        Ok(Self {
            source: source.to_owned(),
            parts,
            rest,
        })
    }

    /// The names this pattern captures, in order.
    pub fn captures(&self) -> Vec<String> {
        self.parts
            .iter()
            .filter_map(|p| match p {
                Part::Capture(n) => Some(n.clone()),
                Part::Text(_) => None,
            })
            .collect()
    }

    /// The captures if `name` matches.
    pub fn matches(&self, name: &str) -> Option<Vec<(String, String)>> {
        let mut caps = Vec::new();
        match_parts(&self.parts, self.rest, name, &mut caps).then_some(caps)
    }

    pub fn source(&self) -> &str {
        &self.source
    }
}

fn match_parts(parts: &[Part], rest: bool, s: &str, caps: &mut Vec<(String, String)>) -> bool {
    match parts.split_first() {
        None => rest || s.is_empty(),
        Some((Part::Text(t), more)) => s
            .strip_prefix(t.as_str())
            .is_some_and(|s| match_parts(more, rest, s, caps)),
        Some((Part::Capture(name), more)) => {
            // One or more characters other than `:`, the shortest that lets
            // the rest match.
            let limit = s.find(':').unwrap_or(s.len());
            for end in s[..limit].char_indices().map(|(i, c)| i + c.len_utf8()) {
                caps.push((name.clone(), s[..end].to_owned()));
                if match_parts(more, rest, &s[end..], caps) {
                    return true;
                }
                caps.pop();
            }
            false
        }
    }
}

/// One `[[auth.channels]]` rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChannelRule {
    pub pattern: Pattern,
    pub read: Expr,
    pub write: Option<Expr>,
}

impl ChannelRule {
    pub fn from_spec(spec: &ChannelRuleSpec, sets: &BTreeMap<String, MembershipSet>) -> Result<Self, RuleError> {
        let pattern = Pattern::parse(&spec.pattern)?;
        let captures = pattern.captures();
        let scope = Scope::Channel { captures: &captures };
        let parse = |rule: &str| Expr::parse_with_sets(rule, scope, sets);
        Ok(Self {
            read: parse(&spec.read)?,
            write: spec.write.as_deref().map(parse).transpose()?,
            pattern,
        })
    }
}

/// One `[auth.tables."schema.table"]` rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableRule {
    pub read: Expr,
    /// Only these columns reach subscribers (`None`: all).
    pub columns: Option<Arc<[String]>>,
}

impl TableRule {
    pub fn from_spec(
        table: &str,
        spec: &TableRuleSpec,
        sets: &BTreeMap<String, MembershipSet>,
    ) -> Result<Self, RuleError> {
        let err = |reason: &str| RuleError {
            rule: table.to_owned(),
            reason: reason.to_owned(),
        };
        match table.split_once('.') {
            Some((schema, name)) if !schema.is_empty() && !name.is_empty() => {}
            _ => return Err(err("a table rule is keyed by \"schema.table\"")),
        }
        if spec.columns.as_ref().is_some_and(Vec::is_empty) {
            return Err(err(
                "columns = [] would send nothing; list the columns subscribers may see",
            ));
        }
        Ok(Self {
            read: Expr::parse_with_sets(&spec.read, Scope::Row, sets)?,
            columns: spec.columns.clone().map(Arc::from),
        })
    }
}

/// Every policy of one server. [`Policy::default`] is what a server with
/// keys but no rules does: private channels need the `channels` claim,
/// public channels are open, tables need a rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    /// The claim listing the channels a token may use (`channels`).
    pub channels_claim: String,
    /// Public channels are open to any valid token (`true`), or refused.
    pub public_channels: bool,
    pub channel_rules: Vec<ChannelRule>,
    /// Table rules by `schema.table`.
    pub tables: BTreeMap<String, TableRule>,
    /// Tokens with this `role` pass every policy (`service_role`).
    pub bypass_role: Option<String>,
    /// Bind each presence key to this claim (`sub`): a client can only
    /// track as itself.
    pub presence_key_claim: Option<String>,
    /// Stamp each client broadcast's `meta.sub` with the sender's `sub`.
    pub stamp_sender: bool,
    /// Membership sets by name (`member.<name>` in rules).
    pub memberships: BTreeMap<String, MembershipSet>,
}

impl Default for Policy {
    fn default() -> Self {
        Self {
            channels_claim: "channels".into(),
            public_channels: true,
            channel_rules: Vec::new(),
            tables: BTreeMap::new(),
            bypass_role: Some("service_role".into()),
            presence_key_claim: None,
            stamp_sender: false,
            memberships: BTreeMap::new(),
        }
    }
}

impl Policy {
    /// Parses every rule; all problems are returned together.
    pub fn with_rules(
        self,
        channels: &[ChannelRuleSpec],
        tables: &BTreeMap<String, TableRuleSpec>,
    ) -> Result<Self, Vec<RuleError>> {
        self.with_memberships(&BTreeMap::new(), channels, tables)
    }

    /// Validates the membership sets, then parses every rule (which may
    /// read them as `member.<name>`); all problems are returned together.
    pub fn with_memberships(
        mut self,
        memberships: &BTreeMap<String, MembershipSpec>,
        channels: &[ChannelRuleSpec],
        tables: &BTreeMap<String, TableRuleSpec>,
    ) -> Result<Self, Vec<RuleError>> {
        let mut errors = Vec::new();
        for (name, spec) in memberships {
            match MembershipSet::from_spec(name, spec) {
                Ok(set) => {
                    self.memberships.insert(name.clone(), set);
                }
                Err(MembershipError { set, reason }) => errors.push(RuleError {
                    rule: format!("auth.memberships.{set}"),
                    reason,
                }),
            }
        }
        let sets = &self.memberships;
        for spec in channels {
            match ChannelRule::from_spec(spec, sets) {
                Ok(r) => self.channel_rules.push(r),
                Err(e) => errors.push(e),
            }
        }
        for (table, spec) in tables {
            match TableRule::from_spec(table, spec, sets) {
                Ok(r) => {
                    self.tables.insert(table.clone(), r);
                }
                Err(e) => errors.push(e),
            }
        }
        if errors.is_empty() { Ok(self) } else { Err(errors) }
    }

    /// Whether the claims carry the bypass role.
    pub fn bypasses(&self, claims: &Value) -> bool {
        self.bypass_role
            .as_deref()
            .is_some_and(|r| claims.get("role").and_then(Value::as_str) == Some(r))
    }

    /// What `claims` may do on the channel `name` (its visible name),
    /// private or not, with memberships as `members` has them now.
    pub fn channel_access(&self, name: &str, private: bool, claims: &Value, members: &dyn Members) -> Access {
        if self.bypasses(claims) {
            return Access::ALL;
        }
        if !private {
            return if self.public_channels {
                Access::ALL
            } else {
                Access::NONE
            };
        }
        let mut access = Access::NONE;
        if let Some(Value::Array(list)) = claims.get(&self.channels_claim)
            && list
                .iter()
                .filter_map(Value::as_str)
                .any(|p| claim_pattern_matches(p, name))
        {
            access = Access::ALL;
        }
        if let Some((rule, captures)) = self
            .channel_rules
            .iter()
            .find_map(|r| r.pattern.matches(name).map(|c| (r, c)))
        {
            let ctx = Context {
                claims,
                captures: &captures,
                members,
            };
            let decide = |e: &Expr| e.eval(ctx).unwrap_or(false);
            access.read |= decide(&rule.read);
            access.write |= rule.write.as_ref().is_some_and(decide);
        }
        access
    }

    /// Whether the channel rule deciding `name` reads membership sets: its
    /// access can change when a membership row does.
    pub fn channel_reads_members(&self, name: &str) -> bool {
        self.channel_rules
            .iter()
            .find(|r| r.pattern.matches(name).is_some())
            .is_some_and(|r| r.read.reads_members() || r.write.as_ref().is_some_and(Expr::reads_members))
    }

    /// The rule of a table, if configured.
    pub fn table(&self, schema: &str, table: &str) -> Option<&TableRule> {
        self.tables.get(&format!("{schema}.{table}"))
    }
}

/// A `channels` claim entry: an exact name, or a prefix ending in `*`.
fn claim_pattern_matches(pattern: &str, name: &str) -> bool {
    match pattern.strip_suffix('*') {
        Some(prefix) => name.starts_with(prefix),
        None => pattern == name,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::membership::NoMembers;
    use serde_json::json;

    fn workshop_policy() -> Policy {
        let rules: Vec<ChannelRuleSpec> = toml_rules(
            r#"
            [[channels]]
            pattern = "workshop:{id}"
            read  = "{id} in claims.workshops"
            write = "{id} in claims.workshops and claims.role == 'facilitator'"
            [[channels]]
            pattern = "lobby:*"
            read = "true"
            "#,
        );
        Policy::default().with_rules(&rules, &BTreeMap::new()).unwrap()
    }

    fn toml_rules(s: &str) -> Vec<ChannelRuleSpec> {
        #[derive(Deserialize)]
        struct File {
            channels: Vec<ChannelRuleSpec>,
        }
        toml::from_str::<File>(s).unwrap().channels
    }

    #[test]
    fn channel_rules_capture_and_compare() {
        let p = workshop_policy();
        let facilitator = json!({"workshops": [42], "role": "facilitator"});
        let participant = json!({"workshops": ["42"], "role": "authenticated"});
        assert_eq!(
            p.channel_access("workshop:42", true, &facilitator, &NoMembers),
            Access::ALL
        );
        assert_eq!(
            p.channel_access("workshop:42", true, &participant, &NoMembers),
            Access {
                read: true,
                write: false
            }
        );
        assert_eq!(
            p.channel_access("workshop:7", true, &participant, &NoMembers),
            Access::NONE
        );
        // A capture does not span `:`.
        assert_eq!(
            p.channel_access("workshop:42:notes", true, &facilitator, &NoMembers),
            Access::NONE
        );
        assert!(p.channel_access("lobby:x:y", true, &json!({}), &NoMembers).read);
        // Public channels are open unless closed.
        assert_eq!(
            p.channel_access("workshop:7", false, &participant, &NoMembers),
            Access::ALL
        );
        let closed = Policy {
            public_channels: false,
            ..p.clone()
        };
        assert_eq!(
            closed.channel_access("workshop:7", false, &participant, &NoMembers),
            Access::NONE
        );
        // The service role passes everything.
        assert_eq!(
            closed.channel_access("x", true, &json!({"role": "service_role"}), &NoMembers),
            Access::ALL
        );
    }

    #[test]
    fn the_channels_claim_grants_names_and_prefixes() {
        let p = Policy::default();
        let c = json!({"channels": ["workshop:42", "workshop:7:*"]});
        assert_eq!(p.channel_access("workshop:42", true, &c, &NoMembers), Access::ALL);
        assert_eq!(p.channel_access("workshop:7:chat", true, &c, &NoMembers), Access::ALL);
        assert_eq!(p.channel_access("workshop:4", true, &c, &NoMembers), Access::NONE);
        assert_eq!(p.channel_access("workshop:420", true, &c, &NoMembers), Access::NONE);
        let renamed = Policy {
            channels_claim: "rooms".into(),
            ..Policy::default()
        };
        assert_eq!(
            renamed.channel_access("workshop:42", true, &c, &NoMembers),
            Access::NONE
        );
        assert_eq!(
            renamed.channel_access("a", true, &json!({"rooms": ["a"]}), &NoMembers),
            Access::ALL
        );
    }

    #[test]
    fn patterns() {
        let p = Pattern::parse("org:{org}:room-{room}").unwrap();
        assert_eq!(
            p.matches("org:5:room-a1"),
            Some(vec![("org".into(), "5".into()), ("room".into(), "a1".into())])
        );
        assert_eq!(p.matches("org::room-a"), None);
        assert_eq!(p.matches("org:5:room-"), None);
        let reason = |s: &str| Pattern::parse(s).unwrap_err().reason;
        assert!(reason("a{}").contains("capture"));
        assert!(reason("a*b").contains("end"));
        assert!(reason("{a}{b}").contains("text between"));
        assert!(reason("{a}:{a}").contains("twice"));
        assert!(Pattern::parse("*").unwrap().matches("anything").is_some());
    }

    #[test]
    fn table_rules_check_their_key_and_columns() {
        let spec = |read: &str, columns: Option<Vec<&str>>| TableRuleSpec {
            read: read.into(),
            columns: columns.map(|c| c.into_iter().map(String::from).collect()),
        };
        let mut tables = BTreeMap::new();
        tables.insert("public.announcements".to_owned(), spec("public", None));
        tables.insert(
            "public.workshop_participants".to_owned(),
            spec("session_id in claims.workshops", Some(vec!["id", "session_id"])),
        );
        let p = Policy::default().with_rules(&[], &tables).unwrap();
        assert!(p.table("public", "announcements").is_some());
        assert_eq!(
            p.table("public", "workshop_participants").unwrap().columns.as_deref(),
            Some(&["id".to_owned(), "session_id".to_owned()][..])
        );
        assert!(p.table("public", "private_notes").is_none());

        let mut bad = BTreeMap::new();
        bad.insert("announcements".to_owned(), spec("public", None));
        bad.insert("public.x".to_owned(), spec("public", Some(vec![])));
        bad.insert("public.y".to_owned(), spec("user_id ==", None));
        let errors = Policy::default().with_rules(&[], &bad).unwrap_err();
        assert_eq!(errors.len(), 3, "{errors:?}");
    }
}
