//! vsn 2.0.0 binary frames through `decode_binary` (kind 3, "user broadcast
//! push", as realtime-js sends every `channel.send({type: "broadcast"})`).
//! Asserts, beyond not panicking: a decoded frame is a broadcast; built
//! again as a kind-3 frame (without the metadata, which fanout ignores) it
//! decodes to the same `Inbound`; `peek_refs` reads the same refs and topic;
//! a JSON payload is JSON text and every member receives it unchanged (see
//! `fanout_fuzz::check_inbound`); a refused frame's error reply is
//! well formed.
#![no_main]

use fanout_edge::protocol::{Request, Vsn, decode_binary};
use fanout_fuzz::{check_error_reply, check_inbound};
use libfuzzer_sys::fuzz_target;

fn kind3(join_ref: &str, r#ref: &str, topic: &str, event: &str, binary: bool, payload: &[u8]) -> Vec<u8> {
    let len = |s: &str| u8::try_from(s.len()).expect("decoded fields came from one length byte");
    let mut v = vec![
        3,
        len(join_ref),
        len(r#ref),
        len(topic),
        len(event),
        0,
        if binary { 0 } else { 1 },
    ];
    for s in [join_ref, r#ref, topic, event] {
        v.extend_from_slice(s.as_bytes());
    }
    v.extend_from_slice(payload);
    v
}

fuzz_target!(|data: &[u8]| {
    match decode_binary(data) {
        Ok(m) => {
            check_inbound(Vsn::V2, true, data, &m);
            let Request::Broadcast(Ok(b)) = &m.request else {
                panic!("a kind-3 frame decoded to {:?}", m.request);
            };
            let again = kind3(
                m.join_ref.as_deref().unwrap_or(""),
                m.r#ref.as_deref().unwrap_or(""),
                &m.topic,
                &b.event,
                b.binary,
                &b.payload,
            );
            assert_eq!(
                decode_binary(&again).as_ref(),
                Ok(&m),
                "re-encoded frame decodes differently"
            );
        }
        Err(e) => check_error_reply(Vsn::V2, true, data, &format!("invalid message: {e}")),
    }
});
