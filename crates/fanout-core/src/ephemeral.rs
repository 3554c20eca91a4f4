//! Which broadcasts are ephemeral: cursor moves, typing indicators,
//! "is editing" notices, worthless a second later. An ephemeral broadcast
//! is delivered live to the members connected now and never stored,
//! replayed or caught up; it has no position (0). Everything else keeps the
//! resume contract.
//!
//! A broadcast is ephemeral when its event name is one of the listed names,
//! or its channel's name matches one of the listed patterns (`*` matches
//! any run of characters, as [`crate::channel::glob`]).

use crate::channel::glob;
use crate::event::{Event, EventKind};

/// The configured ephemeral events. Empty: every broadcast is stored.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Ephemeral {
    events: Vec<String>,
    channels: Vec<String>,
}

impl Ephemeral {
    /// From event names and channel patterns (empty entries ignored).
    pub fn new<E, C>(events: E, channels: C) -> Self
    where
        E: IntoIterator,
        E::Item: Into<String>,
        C: IntoIterator,
        C::Item: Into<String>,
    {
        let keep = |v: Vec<String>| v.into_iter().filter(|s| !s.is_empty()).collect();
        Self {
            events: keep(events.into_iter().map(Into::into).collect()),
            channels: keep(channels.into_iter().map(Into::into).collect()),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.events.is_empty() && self.channels.is_empty()
    }

    /// Whether `ev` travels live only.
    pub fn matches(&self, ev: &Event) -> bool {
        ev.kind == EventKind::Broadcast
            && (self.events.iter().any(|e| e.as_str() == &*ev.event)
                || self.channels.iter().any(|p| glob(p, ev.channel.name())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ChannelName;
    use bytes::Bytes;

    fn broadcast(channel: &str, event: &str) -> Event {
        Event::broadcast(
            ChannelName::new(channel).unwrap(),
            event,
            Bytes::from_static(b"{}"),
            false,
            None,
        )
    }

    #[test]
    fn by_event_name_or_channel_pattern_and_only_broadcasts() {
        let e = Ephemeral::new(["cursor", "typing", ""], ["cursors:*"]);
        assert!(e.matches(&broadcast("workshop:1", "cursor")));
        assert!(e.matches(&broadcast("workshop:1", "typing")));
        assert!(!e.matches(&broadcast("workshop:1", "chat")));
        assert!(e.matches(&broadcast("cursors:workshop:1", "chat")));
        assert!(!e.matches(&broadcast("workshop:cursors", "chat")));
        let diff = Event::presence_diff(ChannelName::new("cursors:1").unwrap(), &Default::default(), None);
        assert!(!e.matches(&diff), "presence diffs keep their own path");
        assert!(Ephemeral::new(Vec::<String>::new(), [""]).is_empty());
        assert!(!Ephemeral::default().matches(&broadcast("cursors:1", "cursor")));
    }
}
