//! The body of `POST /realtime/v1/api/broadcast`
//! (`{"messages": [{"topic", "event", "payload", "private"}]}`), parsed as
//! the handler does. Asserts, beyond not panicking: an accepted body gives
//! one broadcast per message, in order, on the channel its topic names, with
//! its event (1 to 255 bytes) and its payload byte for byte (`{}` when
//! absent), which is JSON text; a private message on the private channel of
//! that name; each reaches vsn 1.0.0 and 2.0.0 members unchanged. A refused body has a reason for the 400.
#![no_main]

use fanout_core::{ChannelName, EventKind};
use fanout_edge::fuzzing::rest_broadcast_body;
use fanout_fuzz::{check_broadcast_frames, is_json_text};
use libfuzzer_sys::fuzz_target;
use serde::Deserialize;
use serde_json::value::RawValue;

/// The documented shape, as the test reads it.
#[derive(Deserialize)]
struct Body<'a> {
    #[serde(borrow)]
    messages: Vec<Message<'a>>,
}

#[derive(Deserialize)]
struct Message<'a> {
    topic: String,
    event: String,
    #[serde(borrow, default)]
    payload: Option<&'a RawValue>,
    #[serde(default)]
    private: bool,
}

fuzz_target!(|data: &[u8]| {
    match rest_broadcast_body(data) {
        Ok(events) => {
            let body: Body<'_> = serde_json::from_slice(data).expect("an accepted body has the documented shape");
            assert_eq!(events.len(), body.messages.len(), "one event per message");
            for (ev, msg) in events.iter().zip(&body.messages) {
                assert_eq!(ev.kind, EventKind::Broadcast);
                assert!(!ev.binary);
                let named = ChannelName::from_name_or_topic(&msg.topic).map(|c| c.with_privacy(msg.private));
                assert_eq!(Ok(&ev.channel), named.as_ref());
                assert_eq!(ev.channel.is_private(), msg.private);
                assert_eq!(&*ev.event, msg.event);
                assert!((1..=255).contains(&ev.event.len()));
                let expected = msg.payload.map_or("{}", RawValue::get);
                assert_eq!(&ev.payload[..], expected.as_bytes());
                assert!(is_json_text(&ev.payload));
                check_broadcast_frames(&ev.channel.topic(), &ev.event, &ev.payload, false);
            }
        }
        Err(reason) => assert!(!reason.is_empty()),
    }
});
