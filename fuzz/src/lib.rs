//! Checks shared by fanout's fuzz targets (`fuzz_targets/*.rs`).
//!
//! Each target feeds arbitrary bytes to one decoder or parser and asserts
//! properties of what comes out; the properties that several targets share
//! live here:
//! - [`check_text`]: a text message decoded under one vsn decodes to the
//!   same [`Inbound`] when its raw JSON parts are spliced into the other
//!   vsn's shape, and [`check_inbound`] holds for it;
//! - [`check_inbound`]: a decoded message's refs are what [`peek_refs`]
//!   reads, a broadcast is within the wire limits and its JSON payload is
//!   JSON text, and every frame the server would send back (the reply, or
//!   the broadcast to vsn 1.0.0 and 2.0.0 members) is well formed and carries
//!   the client's values unchanged;
//! - [`check_error_reply`]: the error reply to a message that did not decode
//!   is well formed and addressed to what [`peek_refs`] read;
//! - [`block_on`]: drives a future whose I/O is always ready, without a
//!   runtime (the frame target's reader is in memory).
//!
//! Nothing here catches a panic: a panic in the code under test is a finding.

use std::future::Future;
use std::pin::pin;
use std::task::{Context, Poll, Waker};

use fanout_core::ChannelName;
use fanout_edge::protocol::{Encoder, Inbound, Request, Vsn, decode_text, peek_refs};
use serde::Deserialize;
use serde_json::value::RawValue;

/// Polls `f` to completion. The futures given here only wait on in-memory
/// I/O that is always ready, so `Pending` means the code under test is stuck
/// (a hang is a finding, not something to wait out).
pub fn block_on<F: Future>(f: F) -> F::Output {
    let mut f = pin!(f);
    let mut cx = Context::from_waker(Waker::noop());
    for _ in 0..1_000_000 {
        if let Poll::Ready(v) = f.as_mut().poll(&mut cx) {
            return v;
        }
    }
    panic!("future still pending after 1,000,000 polls over always-ready I/O");
}

/// Whether `bytes` is one JSON value in UTF-8 text (what a JSON broadcast
/// payload must be: it is spliced verbatim into frames for other clients).
pub fn is_json_text(bytes: &[u8]) -> bool {
    std::str::from_utf8(bytes).is_ok_and(|s| serde_json::from_str::<Box<RawValue>>(s).is_ok())
}

/// `bytes` without the JSON whitespace (space, tab, CR, LF) around it.
pub fn trim_json_whitespace(bytes: &[u8]) -> &[u8] {
    let ws = |b: &u8| matches!(b, b' ' | b'\t' | b'\r' | b'\n');
    let start = bytes.iter().position(|b| !ws(b)).unwrap_or(bytes.len());
    let end = bytes.iter().rposition(|b| !ws(b)).map_or(start, |i| i + 1);
    &bytes[start..end]
}

/// The payload of an unfragmented, unmasked server frame (as
/// `fanout_edge::frame::encode` builds them), checking its header.
pub fn server_frame_payload(frame: &[u8]) -> (u8, &[u8]) {
    assert!(frame.len() >= 2, "server frame shorter than a header");
    assert_eq!(frame[0] & 0xf0, 0x80, "server frame is not FIN without RSV bits");
    assert_eq!(frame[1] & 0x80, 0, "server frames are never masked");
    let (len, at) = match frame[1] & 0x7f {
        126 => (usize::from(u16::from_be_bytes([frame[2], frame[3]])), 4),
        127 => (
            usize::try_from(u64::from_be_bytes(frame[2..10].try_into().unwrap())).unwrap(),
            10,
        ),
        n => (usize::from(n), 2),
    };
    assert_eq!(
        frame.len(),
        at + len,
        "server frame length field disagrees with its size"
    );
    (frame[0] & 0x0f, &frame[at..])
}

/// A JSON message as the server sends it, in either vsn, with the payload
/// kept raw.
struct Outbound<'a> {
    join_ref: Option<String>,
    r#ref: Option<String>,
    topic: String,
    event: String,
    payload: &'a RawValue,
}

fn parse_outbound(vsn: Vsn, text: &[u8]) -> Outbound<'_> {
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct V1<'a> {
        topic: String,
        event: String,
        #[serde(borrow)]
        payload: &'a RawValue,
        r#ref: Option<String>,
        join_ref: Option<String>,
    }
    match vsn {
        Vsn::V1 => {
            let m: V1<'_> = serde_json::from_slice(text)
                .unwrap_or_else(|e| panic!("outbound vsn 1 frame is not a message ({e}): {text:?}"));
            Outbound {
                join_ref: m.join_ref,
                r#ref: m.r#ref,
                topic: m.topic,
                event: m.event,
                payload: m.payload,
            }
        }
        Vsn::V2 => {
            #[allow(clippy::type_complexity)]
            let m: (Option<String>, Option<String>, String, String, &RawValue) = serde_json::from_slice(text)
                .unwrap_or_else(|e| panic!("outbound vsn 2 frame is not a message ({e}): {text:?}"));
            Outbound {
                join_ref: m.0,
                r#ref: m.1,
                topic: m.2,
                event: m.3,
                payload: m.4,
            }
        }
    }
}

/// The error reply the connection sends to a message that did not decode:
/// well formed, and addressed to the refs and topic [`peek_refs`] read.
pub fn check_error_reply(vsn: Vsn, binary: bool, bytes: &[u8], reason: &str) {
    let (join_ref, r#ref, topic) = peek_refs(vsn, binary, bytes);
    let topic = topic.as_deref().unwrap_or("phoenix");
    let frame = Encoder(vsn).error_reply(join_ref.as_deref(), r#ref.as_deref(), topic, reason);
    let (opcode, text) = server_frame_payload(&frame);
    assert_eq!(opcode, 1, "replies are text frames");
    let out = parse_outbound(vsn, text);
    assert_eq!((out.join_ref, out.r#ref), (join_ref, r#ref));
    assert_eq!((out.topic.as_str(), out.event.as_str()), (topic, "phx_reply"));
    #[derive(Deserialize)]
    struct Reply {
        status: String,
        response: Reason,
    }
    #[derive(Deserialize)]
    struct Reason {
        reason: String,
    }
    let reply: Reply = serde_json::from_str(out.payload.get()).expect("error reply payload");
    assert_eq!(
        (reply.status.as_str(), reply.response.reason.as_str()),
        ("error", reason)
    );
}

/// Properties of a decoded message (`bytes` is what it was decoded from).
pub fn check_inbound(vsn: Vsn, binary: bool, bytes: &[u8], m: &Inbound) {
    // The refs a failed decode would be answered with are the refs of a
    // successful one (empty binary fields mean "none" on both sides).
    let (join_ref, r#ref, topic) = peek_refs(vsn, binary, bytes);
    assert_eq!(
        (&join_ref, &r#ref),
        (&m.join_ref, &m.r#ref),
        "peek_refs disagrees with the decoder"
    );
    let expected_topic = if binary && m.topic.is_empty() {
        None
    } else {
        Some(m.topic.clone())
    };
    assert_eq!(topic, expected_topic, "peek_refs reads another topic");

    // The ok reply the connection would send is well formed and addressed
    // to this message.
    let frame = Encoder(vsn).reply(m.join_ref.as_deref(), m.r#ref.as_deref(), &m.topic, true, "{}");
    let out = parse_outbound(vsn, server_frame_payload(&frame).1);
    assert_eq!(
        (&out.join_ref, &out.r#ref, &out.topic),
        (&m.join_ref, &m.r#ref, &m.topic)
    );

    if let Request::Broadcast(Ok(b)) = &m.request {
        assert!(b.event.len() <= 255, "broadcast event longer than its length byte");
        if !b.binary {
            assert!(
                is_json_text(&b.payload),
                "a JSON broadcast payload is not JSON text: {:?}",
                b.payload
            );
        }
        // Only joined channels get broadcasts; a joinable topic is a valid
        // channel. What other members receive must carry the same values.
        if ChannelName::from_topic(&m.topic).is_ok() {
            check_broadcast_frames(&m.topic, &b.event, &b.payload, b.binary);
        }
    }
}

/// The frames a broadcast is delivered as, to vsn 1.0.0 members (a JSON
/// push; none for a binary payload) and vsn 2.0.0 members (binary kind 4).
pub fn check_broadcast_frames(topic: &str, event: &str, payload: &[u8], binary: bool) {
    let meta = r#"{"id":"7"}"#;
    match Encoder(Vsn::V1).broadcast(topic, event, payload, meta, binary) {
        None => assert!(binary, "a JSON broadcast was not encoded for vsn 1.0.0"),
        Some(frame) => {
            assert!(!binary, "a binary broadcast was encoded as JSON");
            let (opcode, text) = server_frame_payload(&frame);
            assert_eq!(opcode, 1);
            let out = parse_outbound(Vsn::V1, text);
            assert_eq!((out.topic.as_str(), out.event.as_str()), (topic, "broadcast"));
            assert_eq!((out.join_ref, out.r#ref), (None, None));
            #[derive(Deserialize)]
            #[serde(deny_unknown_fields)]
            struct Push<'a> {
                r#type: String,
                event: String,
                #[serde(borrow)]
                payload: &'a RawValue,
                #[serde(borrow)]
                meta: &'a RawValue,
            }
            let push: Push<'_> = serde_json::from_str(out.payload.get()).expect("broadcast push payload");
            assert_eq!((push.r#type.as_str(), push.event.as_str()), ("broadcast", event));
            // The payload travels verbatim; JSON reads it without the
            // whitespace around it.
            assert_eq!(
                push.payload.get().as_bytes(),
                trim_json_whitespace(payload),
                "the payload changed on the way out"
            );
            assert_eq!(push.meta.get(), meta);
        }
    }
    let frame = Encoder(Vsn::V2)
        .broadcast(topic, event, payload, meta, binary)
        .expect("vsn 2.0.0 gets every broadcast");
    let (opcode, body) = server_frame_payload(&frame);
    assert_eq!(opcode, 2, "vsn 2.0.0 broadcasts are binary frames");
    // kind 4: kind, topic_len, event_len, meta_len, encoding, then the fields.
    assert!(body.len() >= 5);
    assert_eq!(body[0], 4);
    let (tl, el, ml) = (usize::from(body[1]), usize::from(body[2]), usize::from(body[3]));
    assert_eq!(body[4], if binary { 0 } else { 1 });
    let rest = &body[5..];
    assert_eq!(&rest[..tl], topic.as_bytes());
    assert_eq!(&rest[tl..tl + el], event.as_bytes());
    assert_eq!(&rest[tl + el..tl + el + ml], meta.as_bytes());
    assert_eq!(&rest[tl + el + ml..], payload);
}

/// The raw parts of a vsn 1.0.0 object, as the test's own view of the wire
/// format: absent refs are null.
#[derive(Deserialize)]
struct V1Parts<'a> {
    #[serde(borrow)]
    topic: &'a RawValue,
    #[serde(borrow)]
    event: &'a RawValue,
    #[serde(borrow)]
    payload: &'a RawValue,
    #[serde(borrow, default, rename = "ref")]
    r#ref: Option<&'a RawValue>,
    #[serde(borrow, default)]
    join_ref: Option<&'a RawValue>,
}

/// The same message in the other vsn's text shape, built from the raw JSON
/// of each part (so strings, numbers and payload bytes are unchanged), or
/// `None` when `bytes` does not have the shape of a `vsn` message.
pub fn splice_to_other_vsn(vsn: Vsn, bytes: &[u8]) -> Option<Vec<u8>> {
    let raw = |v: Option<&RawValue>| v.map_or("null", RawValue::get).to_owned();
    match vsn {
        Vsn::V1 => {
            let p: V1Parts<'_> = serde_json::from_slice(bytes).ok()?;
            Some(
                format!(
                    "[{},{},{},{},{}]",
                    raw(p.join_ref),
                    raw(p.r#ref),
                    p.topic.get(),
                    p.event.get(),
                    p.payload.get()
                )
                .into_bytes(),
            )
        }
        Vsn::V2 => {
            let parts: Vec<&RawValue> = serde_json::from_slice(bytes).ok()?;
            let [join_ref, r#ref, topic, event, payload] = parts[..] else {
                return None;
            };
            Some(
                format!(
                    r#"{{"topic":{},"event":{},"payload":{},"ref":{},"join_ref":{}}}"#,
                    topic.get(),
                    event.get(),
                    payload.get(),
                    r#ref.get(),
                    join_ref.get()
                )
                .into_bytes(),
            )
        }
    }
}

/// The text-frame target body: decode under `vsn`, check the result, and
/// check that both serializers agree on the same message (for UTF-8 input).
pub fn check_text(vsn: Vsn, bytes: &[u8]) {
    let decoded = decode_text(vsn, bytes);
    // A text message is UTF-8: the frame reader closes the connection on
    // one that is not (the `frames` target checks that), so the decoder is
    // never given other bytes. They must not panic it; the properties are
    // for what it is given.
    if std::str::from_utf8(bytes).is_err() {
        return;
    }
    match &decoded {
        Ok(m) => check_inbound(vsn, false, bytes, m),
        Err(e) => check_error_reply(vsn, false, bytes, &format!("invalid message: {e}")),
    }
    let other = match vsn {
        Vsn::V1 => Vsn::V2,
        Vsn::V2 => Vsn::V1,
    };
    if let Some(spliced) = splice_to_other_vsn(vsn, bytes) {
        let again = decode_text(other, &spliced);
        match (&decoded, &again) {
            (Ok(a), Ok(b)) => assert_eq!(a, b, "vsn 1 and vsn 2 decode the same message differently"),
            (Err(_), Err(_)) => {}
            _ => panic!(
                "one vsn decodes what the other refuses: {decoded:?} vs {again:?} for {:?}",
                String::from_utf8_lossy(&spliced)
            ),
        }
    }
}
