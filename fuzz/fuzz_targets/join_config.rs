//! The `phx_join` payload (`{"config": {broadcast, presence,
//! postgres_changes, private, resume}, "access_token"}`) as the connection
//! reads it, with the `postgres_changes` bindings validated against a
//! server with no change stream and one with a routed table. Asserts,
//! beyond not panicking: a join with bindings is refused without a change
//! stream; an accepted set of bindings echoes each binding as sent plus its
//! id, the id that `Binding::new` gives that binding (31 bits); every
//! binding is served once, by the joined channel itself when the routes
//! send its table there and by another channel's feed otherwise; a
//! binding's filter prints to text that parses back to the same filter.
#![no_main]

use std::sync::LazyLock;

use fanout_core::ChannelName;
use fanout_core::changes::{Binding, Filter, Routes};
use fanout_edge::fuzzing::join_bindings;
use fanout_edge::protocol::{BindingSpec, Request};
use libfuzzer_sys::fuzz_target;
use serde_json::value::RawValue;

const TOPIC: &str = "realtime:workshop:42";

static ROUTES: LazyLock<Routes> =
    LazyLock::new(|| Routes::parse("public.workshop_activities=workshop:{session_id}").unwrap());

fn check_bindings(routes: Option<&Routes>, channel: &ChannelName, raw: &[serde_json::Value]) {
    let Ok(b) = join_bindings(routes, channel, raw) else {
        return;
    };
    let routes = match routes {
        Some(r) => r,
        None => {
            assert!(raw.is_empty(), "bindings accepted with no change stream");
            assert!(b.reply.is_empty() && b.own.is_empty() && b.feeds.is_empty());
            return;
        }
    };
    assert_eq!(b.reply.len(), raw.len(), "the reply echoes every binding");
    let fed: usize = b.feeds.iter().map(|(_, v)| v.len()).sum();
    assert_eq!(b.own.len() + fed, raw.len(), "every binding is served once");
    let (mut own, mut feeds) = (b.own.iter(), b.feeds.clone());
    for (value, echo) in raw.iter().zip(&b.reply) {
        let spec = BindingSpec::from_value(value).expect("an accepted binding is a binding");
        let binding = Binding::new(&spec.event, &spec.schema, spec.table.as_deref(), spec.filter.as_deref())
            .expect("an accepted binding is valid");
        assert!(binding.id <= 0x7fff_ffff);
        assert_eq!(
            echo["id"],
            serde_json::Value::from(binding.id),
            "the reply's id is the binding's"
        );
        let mut sent = value.as_object().expect("a binding is an object").clone();
        let mut echoed = echo.as_object().expect("the echo is an object").clone();
        sent.remove("id");
        echoed.remove("id");
        assert_eq!(sent, echoed, "the reply changes a binding");
        if let Some(f) = &binding.filter {
            let printed = f.to_string();
            assert_eq!(Filter::parse(&printed).as_ref(), Ok(f), "filter prints as {printed:?}");
        }
        let source = routes
            .channel_for_binding(&binding)
            .expect("an accepted binding has a source");
        if &source == channel {
            assert_eq!(own.next(), Some(&binding), "own bindings out of order");
        } else {
            let (_, list) = feeds
                .iter_mut()
                .find(|(c, _)| c == &source)
                .expect("the binding's feed is joined");
            assert_eq!(list.first(), Some(&binding), "feed bindings out of order");
            list.remove(0);
        }
    }
    assert!(own.next().is_none());
    assert!(feeds.iter().all(|(c, l)| l.is_empty() && c != channel));
}

fuzz_target!(|data: &[u8]| {
    let Ok(payload) = serde_json::from_slice::<Box<RawValue>>(data) else {
        return;
    };
    let Request::Join(join) = Request::parse(TOPIC, "phx_join", &payload) else {
        panic!("phx_join is not a join");
    };
    let Ok(join) = join else {
        return;
    };
    let channel = ChannelName::from_topic(TOPIC).unwrap();
    let raw = &join.config.postgres_changes;
    check_bindings(None, &channel, raw);
    check_bindings(Some(&ROUTES), &channel, raw);
});
