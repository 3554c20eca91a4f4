//! How a member's connection frames what the hub delivers.
//!
//! The hub is one fan-out for every protocol front: a channel's members may
//! speak Supabase Realtime (Phoenix Channels, either version), Socket.IO or
//! plain room JSON. Each event is encoded at most once per [`Wire`] (a slot
//! per kind in the batch) and the same bytes go to every member of that
//! kind, so a message published by any protocol reaches members of every
//! protocol.

use bytes::Bytes;
use fanout_core::Event;

use crate::protocol::{Encoder, Vsn};
use crate::sio;

/// A member's framing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Wire {
    /// Supabase Realtime, per protocol version.
    Phoenix(Vsn),
    /// Socket.IO on the main namespace: a room joined with the `join`
    /// event; events arrive as `socket.on(event)` on `/`.
    SocketIoRoom,
    /// Socket.IO on the channel's own namespace `/<channel>`. With
    /// `offsets`, each event carries its position as its last argument
    /// (connection-state recovery).
    SocketIoNamespace { offsets: bool },
    /// A room client (`/rooms/<room>`): JSON objects, presence as join
    /// and leave notices per user (see `room.rs`).
    Room,
}

impl Wire {
    /// Distinct encodings of one event (one cache slot each).
    pub const SLOTS: usize = 6;

    /// This framing's cache slot, below [`Self::SLOTS`].
    pub fn slot(self) -> usize {
        match self {
            Self::Phoenix(vsn) => vsn as usize,
            Self::SocketIoRoom => 2,
            Self::SocketIoNamespace { offsets: false } => 3,
            Self::SocketIoNamespace { offsets: true } => 4,
            Self::Room => 5,
        }
    }

    /// The Phoenix protocol version, for what only Supabase clients get
    /// (presence, database changes, `system` messages).
    pub fn vsn(self) -> Option<Vsn> {
        match self {
            Self::Phoenix(vsn) => Some(vsn),
            _ => None,
        }
    }

    /// The frame(s) of a broadcast or presence diff for this framing;
    /// `topic` is the channel's Phoenix topic and `name` its name. `None`
    /// for what this framing does not deliver (see [`Encoder::event`];
    /// Socket.IO clients get broadcasts only; a room's presence notices
    /// come from the channel task's roster, not from one event).
    pub fn event(self, topic: &str, name: &str, ev: &Event, replayed: bool) -> Option<Bytes> {
        match self {
            Self::Phoenix(vsn) => Encoder(vsn).event(topic, ev, replayed),
            Self::SocketIoRoom => sio::packet::event_frames(None, ev, false),
            Self::SocketIoNamespace { offsets } => sio::packet::event_frames(Some(name), ev, offsets),
            Self::Room => crate::room::event_frame(ev),
        }
    }

    /// The frame of a database change whose bindings `ids` matched, with
    /// `data` its record as this member may see it. `None` for framings
    /// without database changes (rooms).
    pub fn change(
        self,
        topic: &str,
        name: &str,
        ev: &Event,
        data: &[u8],
        ids: &[u32],
        replayed: bool,
    ) -> Option<Bytes> {
        match self {
            Self::Phoenix(vsn) => Some(Encoder(vsn).change(topic, ev, data, ids, replayed)),
            Self::SocketIoRoom => Some(sio::packet::change_frame(None, ev, data, false)),
            Self::SocketIoNamespace { offsets } => Some(sio::packet::change_frame(Some(name), ev, data, offsets)),
            Self::Room => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_distinct_and_in_range() {
        let all = [
            Wire::Phoenix(Vsn::V1),
            Wire::Phoenix(Vsn::V2),
            Wire::SocketIoRoom,
            Wire::SocketIoNamespace { offsets: false },
            Wire::SocketIoNamespace { offsets: true },
            Wire::Room,
        ];
        let mut slots: Vec<usize> = all.iter().map(|w| w.slot()).collect();
        slots.sort_unstable();
        slots.dedup();
        assert_eq!(slots.len(), all.len());
        assert!(slots.iter().all(|&s| s < Wire::SLOTS));
    }
}
