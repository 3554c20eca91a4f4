//! Membership sets: who may see a workshop as rows of a database table
//! (`workshop_participants`), mirrored where every edge can read it, for
//! policies that follow memberships the way RLS policies do.
//!
//! A set is configured as `[auth.memberships.<name>]` with the table, its
//! user column (compared with a claim of the token, `sub` by default) and
//! its value column ([`MembershipSpec`]). Rules read it as
//! `member.<name>`: the values of the set's rows whose user column is the
//! token's claim, e.g. `session_id in member.workshops` (see
//! [`crate::policy::expr`]).
//!
//! The ingester keeps the mirror: it loads each table from a snapshot at
//! a known replication position, then applies the table's changes from
//! the stream in commit order. Edges only read it, through [`Members`].
//! This module holds what both sides agree on: the spec, the user key of
//! a token ([`user_of`]) and the mirror's key layout ([`mirror_key`],
//! [`parse_mirror_key`]).

use std::sync::Arc;

use serde::Deserialize;
use serde_json::Value;

/// `[auth.memberships.<name>]` as written in the config file.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MembershipSpec {
    /// `schema.table` (a bare name is `public.<name>`).
    pub table: String,
    /// The column naming the user, compared with [`Self::claim`].
    pub user: String,
    /// The column whose values make up the user's set.
    pub value: String,
    /// The claim a token's user is read from (`sub`).
    #[serde(default)]
    pub claim: Option<String>,
}

/// A validated membership set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MembershipSet {
    pub name: String,
    pub schema: String,
    pub table: String,
    pub user_column: String,
    pub value_column: String,
    /// The claim path (dotted) the token's user is read from.
    pub claim: Vec<String>,
}

/// A membership spec that cannot work.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("auth.memberships.{set}: {reason}")]
pub struct MembershipError {
    pub set: String,
    pub reason: String,
}

impl MembershipSet {
    pub fn from_spec(name: &str, spec: &MembershipSpec) -> Result<Self, MembershipError> {
        let err = |reason: &str| MembershipError {
            set: name.to_owned(),
            reason: reason.to_owned(),
        };
        if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            return Err(err("a set name is letters, digits and _ (it is read as member.<name>)"));
        }
        let (schema, table) = match spec.table.split_once('.') {
            Some((s, t)) if !s.is_empty() && !t.is_empty() => (s, t),
            Some(_) => return Err(err("table is \"schema.table\"")),
            None if !spec.table.is_empty() => ("public", spec.table.as_str()),
            None => return Err(err("table is \"schema.table\"")),
        };
        if spec.user.is_empty() || spec.value.is_empty() {
            return Err(err("user and value name the table's user column and value column"));
        }
        if spec.user == spec.value {
            return Err(err("user and value must be two different columns"));
        }
        let claim: Vec<String> = spec
            .claim
            .as_deref()
            .unwrap_or("sub")
            .split('.')
            .map(str::to_owned)
            .collect();
        if claim.iter().any(String::is_empty) {
            return Err(err("claim is a claim name (or a dotted path)"));
        }
        Ok(Self {
            name: name.to_owned(),
            schema: schema.to_owned(),
            table: table.to_owned(),
            user_column: spec.user.clone(),
            value_column: spec.value.clone(),
            claim,
        })
    }

    /// `schema.table`.
    pub fn qualified_table(&self) -> String {
        format!("{}.{}", self.schema, self.table)
    }
}

/// The memberships an edge can read: the values of `set` for `user`.
/// Implemented by the mirror the bus keeps; policies only read it.
pub trait Members: Send + Sync {
    /// The values of `set`'s rows whose user column is `user` (`None` or
    /// empty when there are none).
    fn values(&self, set: &str, user: &str) -> Option<Arc<[Value]>>;
}

/// No memberships at all (a server without `auth.memberships`).
#[derive(Debug, Clone, Copy, Default)]
pub struct NoMembers;

impl Members for NoMembers {
    fn values(&self, _set: &str, _user: &str) -> Option<Arc<[Value]>> {
        None
    }
}

/// A value as user key or membership text: strings as they are, numbers in
/// decimal; anything else (null, lists, objects) names no user.
pub fn key_text(v: &Value) -> Option<String> {
    match v {
        Value::String(s) if !s.is_empty() => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

/// The user a token is for in a set: its claim at `path`, as text.
pub fn user_of(claims: &Value, path: &[String]) -> Option<String> {
    let mut v = claims;
    for seg in path {
        v = v.get(seg)?;
    }
    key_text(v)
}

/// The mirror's key of (`set`, `user`): `<set>.<user>`, with a user that
/// is not only `[A-Za-z0-9_-]` written as `=` and its unpadded base64url
/// (`=` is in neither alphabet, so the two never collide). Keys fit the
/// NATS key-value alphabet.
pub fn mirror_key(set: &str, user: &str) -> String {
    let plain = !user.is_empty()
        && user
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if plain {
        format!("{set}.{user}")
    } else {
        format!("{set}.={}", base64url(user.as_bytes()))
    }
}

/// The (`set`, `user`) a mirror key names, if it is one.
pub fn parse_mirror_key(key: &str) -> Option<(String, String)> {
    let (set, user) = key.split_once('.')?;
    let user = match user.strip_prefix('=') {
        Some(encoded) => String::from_utf8(unbase64url(encoded)?).ok()?,
        None => user.to_owned(),
    };
    (!set.is_empty() && !user.is_empty()).then(|| (set.to_owned(), user))
}

const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";

fn base64url(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len() * 4 / 3 + 3);
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, &b)| n | (u32::from(b) << (16 - 8 * i)));
        for i in 0..=chunk.len() {
            out.push(B64[((n >> (18 - 6 * i)) & 63) as usize] as char);
        }
    }
    out
}

fn unbase64url(s: &str) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(s.len() * 3 / 4);
    let (mut acc, mut bits) = (0u32, 0u32);
    for c in s.bytes() {
        let v = B64.iter().position(|&x| x == c)? as u32;
        acc = (acc << 6) | v;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn specs_are_validated() {
        let spec = |table: &str, user: &str, value: &str| MembershipSpec {
            table: table.into(),
            user: user.into(),
            value: value.into(),
            claim: None,
        };
        let s = MembershipSet::from_spec(
            "workshops",
            &spec("public.workshop_participants", "user_id", "session_id"),
        )
        .unwrap();
        assert_eq!(s.qualified_table(), "public.workshop_participants");
        assert_eq!(s.claim, vec!["sub".to_owned()]);
        assert_eq!(
            MembershipSet::from_spec("w", &spec("participants", "u", "v"))
                .unwrap()
                .schema,
            "public"
        );
        for (name, bad) in [
            ("w", spec("public.", "u", "v")),
            ("w", spec("", "u", "v")),
            ("w", spec("t", "", "v")),
            ("w", spec("t", "u", "u")),
            ("bad-name", spec("t", "u", "v")),
        ] {
            assert!(MembershipSet::from_spec(name, &bad).is_err(), "{name} {bad:?}");
        }
    }

    #[test]
    fn users_come_from_claims_as_text() {
        let claims = json!({"sub": "u1", "app": {"uid": 7}, "empty": ""});
        assert_eq!(user_of(&claims, &["sub".into()]), Some("u1".into()));
        assert_eq!(user_of(&claims, &["app".into(), "uid".into()]), Some("7".into()));
        assert_eq!(user_of(&claims, &["empty".into()]), None);
        assert_eq!(user_of(&claims, &["missing".into()]), None);
    }

    #[test]
    fn mirror_keys_round_trip_any_user() {
        for user in [
            "0b9c7e0e-4f5a-4c9e-9d7e-1a2b3c4d5e6f",
            "user_1",
            "a@b.example",
            "ü",
            "x.y",
            "=",
            "ab",
            "abc",
            "abcd",
        ] {
            let key = mirror_key("workshops", user);
            assert!(
                key.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_=.".contains(&b)),
                "{key}"
            );
            assert_eq!(key.matches('.').count(), 1, "{key}");
            assert_eq!(parse_mirror_key(&key), Some(("workshops".into(), user.into())), "{key}");
        }
        assert_eq!(mirror_key("w", "u-1"), "w.u-1");
        assert_eq!(parse_mirror_key("nodot"), None);
        assert_eq!(parse_mirror_key("w.=!!"), None);
    }
}
