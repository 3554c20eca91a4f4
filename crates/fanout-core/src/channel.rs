//! Channel names, topics and shards.
//!
//! A client joins the topic `realtime:<name>`; `<name>` is the channel. The
//! channel decides the shard (`shard_of`), and the shard decides which NATS
//! subjects and JetStream stream carry the channel's events.

use std::fmt;
use std::sync::Arc;

/// The prefix every client topic carries.
pub const TOPIC_PREFIX: &str = "realtime:";

/// Longest accepted channel name in bytes. Topics travel in binary frames
/// whose length fields are one byte, so `realtime:` plus the name must fit 255.
pub const MAX_CHANNEL_LEN: usize = 255 - TOPIC_PREFIX.len();

/// Why a topic was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChannelError {
    #[error("topic must start with \"realtime:\"")]
    MissingPrefix,
    #[error("topic \"realtime:\" needs a channel name after the prefix")]
    Empty,
    #[error("channel name is longer than {MAX_CHANNEL_LEN} bytes")]
    TooLong,
    #[error("channel name contains a control character")]
    ControlCharacter,
}

/// The first character of a private channel's internal name. Client names
/// cannot contain control characters, so no public name collides with a
/// private one.
const PRIVATE_MARK: char = '\u{1}';

/// A validated channel name (the part after `realtime:`), cheap to clone.
///
/// A private channel (joined with `config.private: true`) is a namespace of
/// its own, as in Supabase Realtime: `workshop:42` joined privately is not
/// the public `workshop:42`. Its internal name ([`Self::as_str`], used for
/// shards, subjects and keys) carries a mark; [`Self::name`] and
/// [`Self::topic`] are what clients see.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ChannelName(Arc<str>);

impl ChannelName {
    /// Validates a bare channel name.
    pub fn new(name: &str) -> Result<Self, ChannelError> {
        if name.is_empty() {
            return Err(ChannelError::Empty);
        }
        if name.len() > MAX_CHANNEL_LEN {
            return Err(ChannelError::TooLong);
        }
        if name.chars().any(char::is_control) {
            return Err(ChannelError::ControlCharacter);
        }
        Ok(Self(Arc::from(name)))
    }

    /// The private channel of a bare name.
    pub fn private(name: &str) -> Result<Self, ChannelError> {
        Ok(Self::new(name)?.to_private())
    }

    /// The private channel of the same name.
    pub fn to_private(&self) -> Self {
        if self.is_private() {
            self.clone()
        } else {
            Self(Arc::from(format!("{PRIVATE_MARK}{}", self.0)))
        }
    }

    /// This channel, or the private one of the same name.
    pub fn with_privacy(self, private: bool) -> Self {
        if private { self.to_private() } else { self }
    }

    /// Reads back an internal name ([`Self::as_str`]) that travelled between
    /// fanout processes: a private channel's mark is accepted here, never
    /// from a client.
    pub fn from_internal(s: &str) -> Result<Self, ChannelError> {
        match s.strip_prefix(PRIVATE_MARK) {
            Some(name) => Self::private(name),
            None => Self::new(s),
        }
    }

    /// Parses a client topic `realtime:<name>`.
    pub fn from_topic(topic: &str) -> Result<Self, ChannelError> {
        let name = topic.strip_prefix(TOPIC_PREFIX).ok_or(ChannelError::MissingPrefix)?;
        Self::new(name)
    }

    /// Accepts either a bare name or a `realtime:` topic (the REST broadcast
    /// API takes both).
    pub fn from_name_or_topic(s: &str) -> Result<Self, ChannelError> {
        match s.strip_prefix(TOPIC_PREFIX) {
            Some(name) => Self::new(name),
            None => Self::new(s),
        }
    }

    /// The internal name: unique across public and private channels. Shards,
    /// bus subjects and store keys are derived from it.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The name clients know the channel by.
    pub fn name(&self) -> &str {
        self.0.strip_prefix(PRIVATE_MARK).unwrap_or(&self.0)
    }

    /// Joined with `config.private: true`.
    pub fn is_private(&self) -> bool {
        self.0.starts_with(PRIVATE_MARK)
    }

    /// The client topic, `realtime:<name>`.
    pub fn topic(&self) -> String {
        format!("{TOPIC_PREFIX}{}", self.name())
    }
}

impl fmt::Debug for ChannelName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_private() {
            write!(f, "private {:?}", self.name())
        } else {
            write!(f, "{:?}", &*self.0)
        }
    }
}

impl fmt::Display for ChannelName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_private() {
            write!(f, "{} (private)", self.name())
        } else {
            f.write_str(&self.0)
        }
    }
}

/// The shard of a channel: `fnv1a_32(utf8 bytes of the name) mod shards`.
///
/// This mapping is part of the wire contract between edges, the CDC ingester
/// and JetStream stream layout, so it must never change. FNV-1a (32-bit,
/// offset basis `0x811c9dc5`, prime `0x01000193`) is trivial to reimplement
/// in any language. `shards == 0` is treated as 1.
pub fn shard_of(channel: &str, shards: u32) -> u32 {
    let mut hash: u32 = 0x811c_9dc5;
    for byte in channel.as_bytes() {
        hash ^= u32::from(*byte);
        hash = hash.wrapping_mul(0x0100_0193);
    }
    hash % shards.max(1)
}

/// Escapes a channel name into one valid NATS subject token.
///
/// NATS tokens may not contain `.`, `*`, `>` or whitespace. ASCII letters,
/// digits, `-` and `_` pass through; every other byte becomes `%XX`
/// (uppercase hex), so the mapping is injective and reversible.
pub fn subject_token(channel: &str) -> String {
    let mut out = String::with_capacity(channel.len());
    for &b in channel.as_bytes() {
        if b.is_ascii_alphanumeric() || b == b'-' || b == b'_' {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Reverses [`subject_token`]. Returns `None` for a malformed token.
pub fn channel_from_token(token: &str) -> Option<String> {
    let bytes = token.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = token.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// Whether `name` matches `pattern`, where `*` stands for any run of
/// characters (and nothing else is special).
pub fn glob(pattern: &str, name: &str) -> bool {
    let parts: Vec<&str> = pattern.split('*').collect();
    let (first, rest) = parts.split_first().expect("split yields one part at least");
    let Some(mut tail) = name.strip_prefix(first) else {
        return false;
    };
    let Some((last, middle)) = rest.split_last() else {
        return tail.is_empty();
    };
    for part in middle {
        match tail.find(part) {
            Some(i) => tail = &tail[i + part.len()..],
            None => return false,
        }
    }
    tail.len() >= last.len() && tail.ends_with(last)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs() {
        for (p, n, want) in [
            ("workshop:*", "workshop:42", true),
            ("workshop:*", "workshop:", true),
            ("workshop:*", "room:1", false),
            ("*:42", "workshop:42", true),
            ("*", "anything", true),
            ("a*b*c", "aXbYc", true),
            ("a*b*c", "aXcYb", false),
            ("ab*ba", "aba", false),
            ("exact", "exact", true),
            ("exact", "exactly", false),
        ] {
            assert_eq!(glob(p, n), want, "{p} ~ {n}");
        }
    }

    #[test]
    fn topics_parse_and_refuse() {
        assert_eq!(
            ChannelName::from_topic("realtime:workshop:42").unwrap().as_str(),
            "workshop:42"
        );
        assert_eq!(ChannelName::from_topic("realtime:"), Err(ChannelError::Empty));
        assert_eq!(ChannelName::from_topic("phoenix"), Err(ChannelError::MissingPrefix));
        assert_eq!(
            ChannelName::from_topic(&format!("realtime:{}", "x".repeat(247))),
            Err(ChannelError::TooLong)
        );
        assert!(ChannelName::from_topic(&format!("realtime:{}", "x".repeat(246))).is_ok());
        assert_eq!(
            ChannelName::from_topic("realtime:a\nb"),
            Err(ChannelError::ControlCharacter)
        );
        assert_eq!(
            ChannelName::from_name_or_topic("room").unwrap().topic(),
            "realtime:room"
        );
        // A private channel is apart from the public one, and a client
        // cannot forge its mark.
        let private = ChannelName::private("workshop:42").unwrap();
        let public = ChannelName::new("workshop:42").unwrap();
        assert_ne!(private, public);
        assert_eq!(
            (private.name(), private.topic().as_str()),
            ("workshop:42", "realtime:workshop:42")
        );
        assert!(private.is_private() && !public.is_private());
        assert_eq!(ChannelName::from_internal(private.as_str()), Ok(private.clone()));
        assert_eq!(ChannelName::from_internal(public.as_str()), Ok(public));
        assert_eq!(
            ChannelName::from_topic(&format!("realtime:{}", private.as_str())),
            Err(ChannelError::ControlCharacter)
        );
        assert_eq!(
            ChannelName::from_internal(&format!("{PRIVATE_MARK}{PRIVATE_MARK}x")),
            Err(ChannelError::ControlCharacter)
        );
    }

    #[test]
    fn shard_mapping_is_stable() {
        // Reference values: FNV-1a 32 of the name. These pin the contract;
        // changing them breaks every running cluster.
        assert_eq!(shard_of("", 1 << 31), 0x811c_9dc5 % (1 << 31));
        assert_eq!(shard_of("a", u32::MAX), 0xe40c_292c);
        assert_eq!(shard_of("foobar", u32::MAX), 0xbf9c_f968);
        assert_eq!(shard_of("workshop:42", 64), shard_of("workshop:42", 64));
        assert!(shard_of("workshop:42", 64) < 64);
        assert_eq!(shard_of("anything", 0), 0);
    }

    #[test]
    fn subject_tokens_round_trip() {
        for name in ["workshop:42", "a.b*c>d e", "ünï", "plain-name_1", "%41"] {
            let token = subject_token(name);
            assert!(
                token.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_%".contains(&b)),
                "{token}"
            );
            assert_eq!(channel_from_token(&token).as_deref(), Some(name));
        }
        assert_eq!(subject_token("workshop:42"), "workshop%3A42");
        assert_eq!(channel_from_token("%4"), None);
    }
}
