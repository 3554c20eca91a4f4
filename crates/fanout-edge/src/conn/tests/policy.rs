//! Channel and row policies, presence keys bound to a claim, and stamped
//! senders, driven through the connection task in memory.

use super::*;
use fanout_core::ChangeType;
use fanout_core::policy::{ChannelRuleSpec, TableRuleSpec};
use jsonwebtoken::{EncodingKey, Header, encode};
use std::collections::BTreeMap;

const SECRET: &[u8] = b"policy-secret";

fn token(claims: Value) -> String {
    let mut claims = claims;
    claims["exp"] = json!(fanout_core::now_ms() / 1000 + 600);
    encode(&Header::default(), &claims, &EncodingKey::from_secret(SECRET)).unwrap()
}

fn claims(c: Value) -> Claims {
    fanout_core::JwtVerifier::hs256(SECRET).verify(&token(c)).unwrap()
}

/// The workshop rules of the README, and three tables.
fn policy(edit: impl FnOnce(&mut Policy)) -> Policy {
    let channels = vec![ChannelRuleSpec {
        pattern: "workshop:{id}".into(),
        read: "{id} in claims.workshops".into(),
        write: Some("{id} in claims.workshops and claims.role == 'facilitator'".into()),
    }];
    let mut tables = BTreeMap::new();
    tables.insert(
        "public.workshop_participants".to_owned(),
        TableRuleSpec {
            read: "session_id in claims.workshops".into(),
            columns: Some(vec!["id".into(), "session_id".into(), "display_name".into()]),
        },
    );
    tables.insert(
        "public.announcements".to_owned(),
        TableRuleSpec {
            read: "public".into(),
            columns: None,
        },
    );
    tables.insert(
        "public.private_notes".to_owned(),
        TableRuleSpec {
            read: "owner == claims.sub".into(),
            columns: None,
        },
    );
    let mut p = Policy::default().with_rules(&channels, &tables).unwrap();
    edit(&mut p);
    p
}

fn secured_edge(policy: Policy) -> Arc<Edge> {
    Edge::new(
        EdgeConfig {
            auth: Some(fanout_core::JwtVerifier::hs256(SECRET)),
            changes: Some(Arc::new(fanout_core::changes::Routes::default())),
            policy: Arc::new(policy),
            ..EdgeConfig::default()
        },
        7,
        Arc::new(MemoryBus::new(Retention::default())),
        Arc::new(MemoryPresence::new(7)),
        None,
        CancellationToken::new(),
    )
}

fn user(edge: &Arc<Edge>, c: Value) -> Client {
    connect_as(edge, 1 << 16, Vsn::V1, Some(claims(c)))
}

fn status(reply: &Value) -> (&str, &str) {
    (
        reply["payload"]["status"].as_str().unwrap_or_default(),
        reply["payload"]["response"]["reason"].as_str().unwrap_or_default(),
    )
}

async fn publish_change(edge: &Edge, table: &str, row: Value) {
    let record = fanout_core::ChangeRecord {
        schema: "public".into(),
        table: table.into(),
        commit_timestamp: "2026-12-01T00:00:00.000Z".into(),
        change_type: ChangeType::Insert,
        columns: row
            .as_object()
            .unwrap()
            .keys()
            .map(|k| fanout_core::record::Column {
                name: k.clone(),
                type_name: "text".into(),
            })
            .collect(),
        record: row.as_object().unwrap().clone(),
        old_record: Default::default(),
        errors: None,
    };
    let channel = fanout_core::changes::table_channel("public", table);
    let ev = Event::change(channel, ChangeType::Insert, Bytes::from(record.to_json()));
    edge.bus.publish(ev).await.unwrap();
}

/// The `record`s of the next `n` change frames (other frames skipped).
async fn changes(c: &mut Client, n: usize) -> Vec<Value> {
    let mut rows = Vec::new();
    while rows.len() < n {
        let v = c.recv().await.json();
        if v["event"] == "postgres_changes" {
            rows.push(v["payload"]["data"]["record"].clone());
        }
    }
    rows
}

/// Nothing more arrives within a moment (for what must not be delivered).
async fn silent(c: &mut Client) {
    let more = tokio::time::timeout(Duration::from_millis(300), c.read_frame()).await;
    assert!(more.is_err(), "unexpected frame: {:?}", more.ok());
}

#[tokio::test]
async fn private_channels_need_a_policy_and_read_only_tokens_cannot_write() {
    let edge = secured_edge(policy(|_| {}));
    let mut facilitator = user(&edge, json!({"sub": "f", "role": "facilitator", "workshops": [42]}));
    let mut participant = user(&edge, json!({"sub": "p", "role": "authenticated", "workshops": ["42"]}));
    let mut outsider = user(&edge, json!({"sub": "o", "workshops": [7], "channels": ["workshop:9"]}));
    let private = json!({"private": true, "broadcast": {"ack": true}});

    assert_eq!(
        status(&facilitator.join("realtime:workshop:42", private.clone()).await).0,
        "ok"
    );
    assert_eq!(
        status(&participant.join("realtime:workshop:42", private.clone()).await).0,
        "ok"
    );
    let refused = outsider.join("realtime:workshop:42", private.clone()).await;
    let (s, reason) = status(&refused);
    assert_eq!(s, "error");
    assert!(reason.contains("private channel \"workshop:42\""), "{reason}");
    // The `channels` claim grants a channel no rule matches.
    assert_eq!(
        status(&outsider.join("realtime:workshop:9", private.clone()).await).0,
        "ok"
    );
    // The public channel of the same name is another channel, open to all.
    assert_eq!(status(&outsider.join("realtime:workshop:42", json!({})).await).0, "ok");

    // The participant may read, not write: an error reply for each.
    let broadcast = json!({"type": "broadcast", "event": "stage", "payload": {"n": 1}});
    let r = participant
        .push("realtime:workshop:42", "broadcast", broadcast.clone())
        .await;
    let reply = participant.recv_event("phx_reply").await;
    assert_eq!(reply["ref"], r.as_str());
    let (s, reason) = status(&reply);
    assert_eq!(s, "error");
    assert!(reason.contains("may only read"), "{reason}");
    let track = json!({"type": "presence", "event": "track", "payload": {"name": "P"}});
    participant.push("realtime:workshop:42", "presence", track).await;
    let reply = participant.recv_event("phx_reply").await;
    assert!(status(&reply).1.contains("track presence"), "{reply}");

    // The facilitator's broadcast reaches the private channel's readers,
    // not the public channel of the same name.
    facilitator.push("realtime:workshop:42", "broadcast", broadcast).await;
    assert_eq!(facilitator.recv_event("phx_reply").await["payload"]["status"], "ok");
    let got = participant.recv_event("broadcast").await;
    assert_eq!(got["payload"]["payload"], json!({"n": 1}));
    let public = Event::broadcast(
        ChannelName::new("workshop:42").unwrap(),
        "public-marker",
        Bytes::from_static(b"{}"),
        false,
        None,
    );
    edge.bus.publish(public).await.unwrap();
    let got = outsider.recv_event("broadcast").await;
    assert_eq!(
        got["payload"]["event"], "public-marker",
        "the private broadcast stayed private"
    );
}

#[tokio::test]
async fn row_rules_and_column_lists_decide_what_each_subscriber_receives() {
    let edge = secured_edge(policy(|_| {}));
    let mut w7 = user(&edge, json!({"sub": "a", "workshops": [7]}));
    let mut w42 = user(&edge, json!({"sub": "b", "workshops": [42]}));
    let binding = |table: &str, filter: Option<&str>| {
        let mut b = json!({"event": "*", "schema": "public", "table": table});
        if let Some(f) = filter {
            b["filter"] = json!(f);
        }
        b
    };
    // w7's filter asks for workshop 42's rows: the row rule still refuses them.
    let reply = w7
        .join(
            "realtime:feed",
            json!({"postgres_changes": [binding("workshop_participants", Some("session_id=eq.42")), binding("announcements", None)]}),
        )
        .await;
    assert_eq!(status(&reply).0, "ok", "{reply}");
    let reply = w42
        .join(
            "realtime:feed",
            json!({"postgres_changes": [binding("workshop_participants", None), binding("private_notes", None)]}),
        )
        .await;
    assert_eq!(status(&reply).0, "ok", "{reply}");
    // A table without a rule is refused, by name.
    let reply = w42
        .join(
            "realtime:other",
            json!({"postgres_changes": [binding("secrets", None)]}),
        )
        .await;
    let (s, reason) = status(&reply);
    assert_eq!(s, "error");
    assert!(
        reason.contains("public.secrets") && reason.contains("no read rule"),
        "{reason}"
    );

    publish_change(
        &edge,
        "workshop_participants",
        json!({"id": 1, "session_id": 42, "display_name": "Bo", "email": "bo@x"}),
    )
    .await;
    publish_change(
        &edge,
        "workshop_participants",
        json!({"id": 2, "session_id": 7, "display_name": "Al", "email": "al@x"}),
    )
    .await;
    publish_change(&edge, "announcements", json!({"id": 3, "text": "hi"})).await;
    // A row the rule cannot be evaluated on (no `owner`) is skipped by that
    // binding alone (and counted); the next rows still flow.
    publish_change(&edge, "private_notes", json!({"id": 6})).await;
    publish_change(&edge, "private_notes", json!({"id": 4, "owner": "b"})).await;
    publish_change(&edge, "private_notes", json!({"id": 5, "owner": "a"})).await;
    let mut rows42 = changes(&mut w42, 2).await;
    // Two tables are two channels: their changes may interleave either way.
    rows42.sort_by_key(|r| r["id"].as_i64());
    let rows7 = changes(&mut w7, 1).await;
    assert_eq!(
        rows7,
        vec![json!({"id": 3, "text": "hi"})],
        "w7 sees no workshop-42 row"
    );
    assert_eq!(
        rows42,
        vec![
            json!({"id": 1, "session_id": 42, "display_name": "Bo"}),
            json!({"id": 4, "owner": "b"})
        ],
        "w42 sees its workshop without the email column, and its own note"
    );
    silent(&mut w7).await;
    silent(&mut w42).await;
}

#[tokio::test]
async fn a_presence_key_bound_to_sub_cannot_be_taken_and_senders_are_stamped() {
    let edge = secured_edge(policy(|p| {
        p.presence_key_claim = Some("sub".into());
        p.stamp_sender = true;
    }));
    let mut ann = user(&edge, json!({"sub": "ann"}));
    let mut bob = user(&edge, json!({"sub": "bob"}));
    let mut anon = connect_as(&edge, 1 << 16, Vsn::V1, Some(Claims::anon()));

    // Bob asks for Ann's key: refused, with the reason.
    let reply = bob.join("realtime:room", json!({"presence": {"key": "ann"}})).await;
    let (s, reason) = status(&reply);
    assert_eq!(s, "error");
    assert!(reason.contains("bound to the token's sub claim"), "{reason}");
    // Without a key (or with his own) he tracks as himself.
    assert_eq!(
        status(&bob.join("realtime:room", json!({"presence": {"key": "bob"}})).await).0,
        "ok"
    );
    assert_eq!(status(&ann.join("realtime:room", json!({})).await).0, "ok");
    ann.push(
        "realtime:room",
        "presence",
        json!({"type": "presence", "event": "track", "payload": {"n": 1}}),
    )
    .await;
    let diff = bob.recv_event("presence_diff").await;
    assert!(diff["payload"]["joins"].get("ann").is_some(), "{diff}");
    // A token without sub may read, not track.
    assert_eq!(status(&anon.join("realtime:room", json!({})).await).0, "ok");
    anon.push(
        "realtime:room",
        "presence",
        json!({"type": "presence", "event": "track", "payload": {}}),
    )
    .await;
    let reply = anon.recv_event("phx_reply").await;
    assert!(status(&reply).1.contains("which this token lacks"), "{reply}");

    // Receivers see who sent a broadcast, as the edge verified it.
    ann.push(
        "realtime:room",
        "broadcast",
        json!({"type": "broadcast", "event": "hi", "payload": {}}),
    )
    .await;
    let got = bob.recv_event("broadcast").await;
    assert_eq!(got["payload"]["meta"]["sub"], "ann", "{got}");

    // A sub too long for a vsn 2.0.0 frame's meta is refused, not
    // truncated (the REST path shares Edge::stamp_sender).
    let long = "x".repeat(200);
    let mut verbose = user(&edge, json!({ "sub": long }));
    assert_eq!(
        status(
            &verbose
                .join("realtime:room", json!({"presence": {"enabled": false}}))
                .await
        )
        .0,
        "ok"
    );
    verbose
        .push(
            "realtime:room",
            "broadcast",
            json!({"type": "broadcast", "event": "hi", "payload": {}}),
        )
        .await;
    let reply = verbose.recv_event("phx_reply").await;
    assert!(status(&reply).1.contains("sub is longer than 128 bytes"), "{reply}");
}

#[tokio::test]
async fn a_refreshed_token_with_fewer_claims_ends_what_it_no_longer_grants() {
    let edge = secured_edge(policy(|_| {}));
    let mut c = user(&edge, json!({"sub": "u", "workshops": [42, 7]}));
    let binding = json!({"event": "INSERT", "schema": "public", "table": "workshop_participants"});
    assert_eq!(
        status(&c.join("realtime:workshop:42", json!({"private": true})).await).0,
        "ok"
    );
    assert_eq!(
        status(&c.join("realtime:rows", json!({"postgres_changes": [binding]})).await).0,
        "ok"
    );
    // The new token drops workshop 42 and keeps 7.
    let fewer = token(json!({"sub": "u", "workshops": [7]}));
    for topic in ["realtime:workshop:42", "realtime:rows"] {
        c.push(topic, "access_token", json!({"access_token": fewer})).await;
    }
    let system = c.recv_event("system").await;
    assert_eq!(system["topic"], "realtime:workshop:42");
    assert!(
        system["payload"]["message"]
            .as_str()
            .unwrap()
            .contains("access revoked"),
        "{system}"
    );
    // Once the heartbeat is answered, both refreshes were handled.
    let r = c.push("phoenix", "heartbeat", json!({})).await;
    while c.recv_event("phx_reply").await["ref"] != r.as_str() {}
    // The row rule of the feed now uses the new claims: 42's rows stop.
    publish_change(
        &edge,
        "workshop_participants",
        json!({"id": 1, "session_id": 42, "display_name": "x"}),
    )
    .await;
    publish_change(
        &edge,
        "workshop_participants",
        json!({"id": 2, "session_id": 7, "display_name": "y"}),
    )
    .await;
    let rows = changes(&mut c, 1).await;
    assert_eq!(rows, vec![json!({"id": 2, "session_id": 7, "display_name": "y"})]);
}

/// The bypass role sees every column; a subscriber beside it on the same
/// topic and binding still gets only the allowed ones (the two encodings
/// must not share a frame).
#[tokio::test]
async fn the_bypass_role_and_a_subscriber_on_one_binding_get_their_own_columns() {
    let edge = secured_edge(policy(|_| {}));
    let binding = json!({"event": "INSERT", "schema": "public", "table": "workshop_participants"});
    let mut backend = user(&edge, json!({"sub": "svc", "role": "service_role"}));
    let mut member = user(&edge, json!({"sub": "m", "workshops": [42]}));
    for c in [&mut backend, &mut member] {
        let reply = c
            .join("realtime:rows", json!({"postgres_changes": [binding.clone()]}))
            .await;
        assert_eq!(status(&reply).0, "ok", "{reply}");
    }
    publish_change(
        &edge,
        "workshop_participants",
        json!({"id": 1, "session_id": 42, "display_name": "x", "email": "x@y"}),
    )
    .await;
    assert_eq!(
        changes(&mut backend, 1).await,
        vec![json!({"id": 1, "session_id": 42, "display_name": "x", "email": "x@y"})]
    );
    assert_eq!(
        changes(&mut member, 1).await,
        vec![json!({"id": 1, "session_id": 42, "display_name": "x"})]
    );
}
