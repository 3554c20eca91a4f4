//! The server API over gRPC (the generated tonic client) and HTTP JSON:
//! against standalone, and against two edges on a private NATS JetStream
//! and Redis, where a publish through either edge's API reaches subscribers
//! on both edges in one order, an idempotency key holds across edges,
//! history reads the shared stream and resuming from its position misses
//! nothing. (realtime-js's view of the same API is
//! `tests/js/protocol/api.test.mjs`.)

use std::time::Duration;

use anyhow::{Context, Result};
use bytes::Bytes;
use fanout_proto::v1;
use fanout_proto::v1::server_api_client::ServerApiClient;
use fanout_tests::{Fanout, Nats, Redis, WsClient, free_port, http_request, join_v1, metric_value};
use serde_json::{Value, json};
use tonic::Code;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

const T: Duration = Duration::from_secs(10);
const KEY: &str = "api-test-key-all-0123456789";
const READ_KEY: &str = "api-test-key-read-0123456789";
const SECRET: &str = "api-test-jwt-secret-at-least-32-bytes";

/// The API listener with a full key and a read-only one, and client tokens.
fn key_args(api_port: u16) -> Vec<String> {
    vec![
        "--api-listen".into(),
        format!("127.0.0.1:{api_port}"),
        "--api-keys".into(),
        format!("{KEY},read:{READ_KEY}"),
        "--jwt-secret".into(),
        SECRET.into(),
    ]
}

fn ws_path(sub: &str) -> String {
    format!(
        "/realtime/v1/websocket?vsn=1.0.0&apikey={}",
        fanout_tests::hs256_token(SECRET, sub)
    )
}

type Client = ServerApiClient<InterceptedService<Channel, Bearer>>;

/// Adds `authorization: Bearer <key>` to every call (none for `None`).
#[derive(Clone)]
struct Bearer(Option<&'static str>);

impl tonic::service::Interceptor for Bearer {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(key) = self.0 {
            req.metadata_mut()
                .insert("authorization", format!("Bearer {key}").parse().unwrap());
        }
        Ok(req)
    }
}

async fn grpc(api_port: u16, key: Option<&'static str>) -> Result<Client> {
    let channel = Channel::from_shared(format!("http://127.0.0.1:{api_port}"))?
        .connect()
        .await
        .context("connecting to the API listener")?;
    Ok(ServerApiClient::with_interceptor(channel, Bearer(key)))
}

fn publish_req(channel: &str, event: &str, payload: Value, key: &str) -> v1::PublishRequest {
    v1::PublishRequest {
        channel: channel.into(),
        event: event.into(),
        payload: Some(v1::publish_request::Payload::Json(payload.to_string())),
        idempotency_key: key.into(),
        ..Default::default()
    }
}

async fn http_publish(api_port: u16, body: Value) -> Result<(u16, Value)> {
    let auth = format!("Bearer {KEY}");
    let (status, text) = http_request(
        api_port,
        "POST",
        "/api/v1/publish",
        &[("authorization", &auth), ("content-type", "application/json")],
        Bytes::from(body.to_string()),
    )
    .await?;
    Ok((status, serde_json::from_str(&text).with_context(|| text.clone())?))
}

/// A raw vsn 1.0.0 subscriber of `topic` on `port`, as user `sub`.
async fn subscriber_as(sub: &str, port: u16, topic: &str, config: Value) -> Result<WsClient> {
    let mut c = WsClient::connect(port, &ws_path(sub)).await?;
    join_v1(&mut c, topic, config, "1").await?;
    Ok(c)
}

async fn subscriber(port: u16, topic: &str, config: Value) -> Result<WsClient> {
    subscriber_as("reader", port, topic, config).await
}

/// The next `n` broadcasts: (event, payload, meta.id).
async fn broadcasts(c: &mut WsClient, n: usize) -> Result<Vec<(String, Value, String)>> {
    let mut got = Vec::new();
    while got.len() < n {
        let v = c.recv_until(T, |v| v["event"] == "broadcast").await?;
        let p = &v["payload"];
        got.push((
            p["event"].as_str().unwrap_or_default().to_owned(),
            p["payload"].clone(),
            p["meta"]["id"].as_str().unwrap_or_default().to_owned(),
        ));
    }
    Ok(got)
}

/// No broadcast arrives for a while.
async fn quiet(c: &mut WsClient) -> Result<()> {
    match c
        .recv_until(Duration::from_millis(400), |v| v["event"] == "broadcast")
        .await
    {
        Ok(v) => anyhow::bail!("unexpected broadcast {v}"),
        Err(_) => Ok(()),
    }
}

/// The behaviour both modes share. `apis` are the API ports of the edges
/// (one in standalone), `ports` their public ports.
async fn exercise(apis: &[u16], ports: &[u16], admin: &Fanout) -> Result<()> {
    let room = format!("workshop:{}", free_port());
    let topic = format!("realtime:{room}");
    let mut subs = Vec::new();
    for &port in ports {
        subs.push(subscriber(port, &topic, json!({})).await?);
    }

    // gRPC and HTTP publishes, alternating over every edge's API, arrive
    // everywhere in one order with the positions the API answered.
    let mut positions = Vec::new();
    for n in 0..6u64 {
        let api = apis[n as usize % apis.len()];
        let position = if n % 2 == 0 {
            let r = grpc(api, Some(KEY))
                .await?
                .publish(publish_req(&room, "user_signed_up", json!({"n": n}), ""))
                .await?
                .into_inner();
            assert!(!r.duplicate);
            r.position
        } else {
            let (status, body) = http_publish(
                api,
                json!({"channel": room, "event": "user_moved", "payload": {"n": n}}),
            )
            .await?;
            assert_eq!(status, 200, "{body}");
            body["position"].as_str().unwrap().to_owned()
        };
        positions.push(position);
    }
    for s in &mut subs {
        let got = broadcasts(s, 6).await?;
        let ns: Vec<u64> = got.iter().map(|(_, p, _)| p["n"].as_u64().unwrap()).collect();
        assert_eq!(ns, (0..6).collect::<Vec<_>>(), "in publish order");
        let ids: Vec<String> = got.iter().map(|(_, _, id)| id.clone()).collect();
        assert_eq!(ids, positions, "meta.id is the answered position");
        assert_eq!(got[0].0, "user_signed_up");
        assert_eq!(got[1].0, "user_moved");
    }

    // The same idempotency key through every edge's API: one delivery.
    let mut answers = Vec::new();
    for &api in apis.iter().chain(apis) {
        let r = grpc(api, Some(KEY))
            .await?
            .publish(publish_req(&room, "user_signed_up", json!({"once": true}), "signup-42"))
            .await?
            .into_inner();
        answers.push((r.position, r.duplicate));
    }
    assert!(!answers[0].1, "{answers:?}");
    assert!(
        answers[1..].iter().all(|(p, dup)| *dup && *p == answers[0].0),
        "{answers:?}"
    );
    for s in &mut subs {
        let got = broadcasts(s, 1).await?;
        assert_eq!(got[0].1, json!({"once": true}));
        quiet(s).await?;
    }

    // History through the last edge: what was published, oldest first.
    let mut reader = grpc(*apis.last().unwrap(), Some(READ_KEY)).await?;
    let h = reader
        .history(v1::HistoryRequest {
            channel: room.clone(),
            limit: 3,
            ..Default::default()
        })
        .await?
        .into_inner();
    let ns: Vec<Value> = h
        .messages
        .iter()
        .map(|m| match &m.payload {
            Some(v1::history_message::Payload::Json(s)) => serde_json::from_str(s).unwrap(),
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(ns, vec![json!({"n": 4}), json!({"n": 5}), json!({"once": true})]);
    assert_eq!(h.position, answers[0].0, "the channel's newest position");
    let next = reader
        .history(v1::HistoryRequest {
            channel: room.clone(),
            limit: 1,
            after: h.messages[0].position.clone(),
            ..Default::default()
        })
        .await?
        .into_inner();
    assert_eq!(next.messages.len(), 1, "after a position, at most the limit");
    assert_eq!(next.messages[0].position, h.messages[1].position);
    assert_eq!(next.position, h.position);

    // A client that saw message 4 resumes from its position on the first
    // edge: 5 and the once-message replayed, then live.
    let after = h.messages[0].position.clone();
    let mut resumed = subscriber(ports[0], &topic, json!({"resume": {"after": after}})).await?;
    http_publish(
        apis[0],
        json!({"channel": room, "event": "user_removed", "payload": {"n": 9}}),
    )
    .await?;
    let got = broadcasts(&mut resumed, 3).await?;
    let payloads: Vec<Value> = got.iter().map(|(_, p, _)| p.clone()).collect();
    assert_eq!(payloads, vec![json!({"n": 5}), json!({"once": true}), json!({"n": 9})]);
    quiet(&mut resumed).await?;

    // PublishStream: answers in order, one per request; a bad request gets
    // its error and the stream goes on.
    let requests: Vec<v1::PublishRequest> = (0..200u64)
        .map(|i| {
            let mut r = publish_req(&room, "cursor", json!({"i": i}), "");
            r.id = i;
            if i == 100 {
                r.event = String::new();
            }
            r
        })
        .collect();
    let mut stream = grpc(apis[0], Some(KEY))
        .await?
        .publish_stream(tokio_stream::iter(requests))
        .await?
        .into_inner();
    let mut acks = Vec::new();
    while let Some(ack) = stream.message().await? {
        acks.push(ack);
    }
    assert_eq!(acks.len(), 200);
    assert!(
        acks.iter().enumerate().all(|(i, a)| a.id == i as u64),
        "in request order"
    );
    assert!(acks[100].error.contains("event"), "{:?}", acks[100]);
    let stored: Vec<u64> = acks
        .iter()
        .filter(|a| a.error.is_empty())
        .map(|a| a.position.parse().unwrap())
        .collect();
    assert_eq!(stored.len(), 199);
    assert!(stored.windows(2).all(|w| w[0] < w[1]), "positions increase");
    for s in &mut subs {
        let got = broadcasts(s, 1 + 199).await?;
        let is: Vec<u64> = got[1..].iter().map(|(_, p, _)| p["i"].as_u64().unwrap()).collect();
        let want: Vec<u64> = (0..200).filter(|&i| i != 100).collect();
        assert_eq!(is, want);
    }

    // Broadcast: a result per channel.
    let other = format!("{room}-b");
    let r = grpc(apis[0], Some(KEY))
        .await?
        .broadcast(v1::BroadcastRequest {
            channels: vec![room.clone(), other.clone()],
            event: "stage".into(),
            payload: Some(v1::broadcast_request::Payload::Json("{\"stage\": 2}".into())),
            ..Default::default()
        })
        .await?
        .into_inner();
    assert_eq!(r.results.len(), 2);
    assert_eq!(r.results[1].channel, other);
    assert!(
        r.results.iter().all(|x| x.error.is_empty() && !x.position.is_empty()),
        "{r:?}"
    );

    // Refusals: codes, not silence, and nothing published.
    let bad = grpc(apis[0], None)
        .await?
        .publish(publish_req(&room, "e", json!(1), ""))
        .await;
    assert_eq!(bad.unwrap_err().code(), Code::Unauthenticated);
    let bad = grpc(apis[0], Some(READ_KEY))
        .await?
        .publish(publish_req(&room, "e", json!(1), ""))
        .await;
    assert_eq!(bad.unwrap_err().code(), Code::PermissionDenied);
    let mut not_json = publish_req(&room, "e", json!(1), "");
    not_json.payload = Some(v1::publish_request::Payload::Json("{oops".into()));
    let bad = grpc(apis[0], Some(KEY)).await?.publish(not_json).await.unwrap_err();
    assert_eq!(bad.code(), Code::InvalidArgument);
    assert!(bad.message().contains("not valid JSON"), "{bad:?}");
    let bad = reader
        .history(v1::HistoryRequest {
            channel: room.clone(),
            after: "9999999".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(bad.code(), Code::OutOfRange);
    let bad = grpc(apis[0], Some(READ_KEY))
        .await?
        .publish_stream(tokio_stream::iter(vec![publish_req(&room, "e", json!(1), "")]))
        .await;
    assert_eq!(bad.unwrap_err().code(), Code::PermissionDenied);
    for s in &mut subs {
        let got = broadcasts(s, 1).await?;
        assert_eq!(got[0].0, "stage");
        quiet(s).await?;
    }

    commands(apis, ports).await?;

    let m = admin.metrics().await?;
    assert!(
        metric_value(
            &m,
            "fanout_api_requests_total{method=\"publish\",code=\"permission_denied\"}"
        ) >= 1.0,
        "{m}"
    );
    assert!(metric_value(&m, "fanout_api_requests_total{method=\"publish_stream\",code=\"ok\"}") >= 199.0);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_api_against_standalone() -> Result<()> {
    let api = free_port();
    let args = key_args(api);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let f = Fanout::start(&args, &[]).await?;
    exercise(&[api], &[f.port], &f).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_api_across_two_edges() -> Result<()> {
    let nats = Nats::start().await?;
    let redis = Redis::start().await?;
    let (api_a, api_b) = (free_port(), free_port());
    let start = async |api: u16| {
        let mut args = key_args(api);
        args.extend(["--redis-url".into(), redis.url()]);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        Fanout::start_edge(&nats, &args).await
    };
    let a = start(api_a).await?;
    let b = start(api_b).await?;
    exercise(&[api_a, api_b], &[a.port, b.port], &a).await?;

    // Presence through the API of the other edge (shared through Redis).
    let room = "workshop:presence";
    let mut member = WsClient::connect(b.port, &ws_path("alice")).await?;
    join_v1(
        &mut member,
        &format!("realtime:{room}"),
        json!({"presence": {"key": "alice"}}),
        "1",
    )
    .await?;
    member
        .send_json(&fanout_tests::v1(
            &format!("realtime:{room}"),
            "presence",
            json!({"type": "presence", "event": "track", "payload": {"name": "Alice"}}),
            "2",
        ))
        .await?;
    let mut reader = grpc(api_a, Some(READ_KEY)).await?;
    let mut stats = None;
    for _ in 0..50 {
        let s = reader
            .presence_stats(v1::PresenceRequest {
                channel: room.into(),
                private: false,
            })
            .await?
            .into_inner();
        if s.clients == 1 {
            stats = Some(s);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let stats = stats.context("edge A's API never saw the presence tracked on edge B")?;
    assert_eq!((stats.clients, stats.users), (1, 1));
    let p = reader
        .presence(v1::PresenceRequest {
            channel: room.into(),
            private: false,
        })
        .await?
        .into_inner();
    assert_eq!(p.presences.len(), 1);
    assert_eq!(p.presences[0].key, "alice");
    let meta: Value = serde_json::from_str(&p.presences[0].metas[0].meta_json)?;
    assert_eq!(meta, json!({"name": "Alice"}));
    assert!(!p.presences[0].metas[0].phx_ref.is_empty());
    Ok(())
}

/// Keys are checked at start: a short key or an unreadable key file stops
/// the process with a reason that names no key.
#[tokio::test]
async fn bad_api_keys_stop_the_start() -> Result<()> {
    let run = async |args: &[&str]| -> Result<String> {
        let out = tokio::process::Command::new(fanout_tests::fanout_bin())
            .args(args)
            .args([
                "--listen",
                "127.0.0.1:0",
                "--admin-listen",
                "127.0.0.1:0",
                "--api-listen",
                "127.0.0.1:0",
            ])
            .output()
            .await?;
        assert!(!out.status.success(), "started with {args:?}");
        Ok(String::from_utf8_lossy(&out.stderr).into_owned())
    };
    let e = run(&["--api-keys", "0123456789abcdef-good,secret-ish"]).await?;
    assert!(
        e.contains("API key #2 is shorter than 16") && !e.contains("secret-ish"),
        "{e}"
    );
    let e = run(&["--api-keys-file", "/nonexistent/keys"]).await?;
    assert!(e.contains("api.keys_file /nonexistent/keys"), "{e}");
    Ok(())
}

/// The close frame's code and reason, past any text frames before it.
async fn close_frame(c: &mut WsClient) -> Result<(u16, String)> {
    loop {
        match c.recv(T).await? {
            fanout_tests::Received::Close(code, reason) => return Ok((code, reason)),
            fanout_tests::Received::Text(_) => continue,
            other => anyhow::bail!("expected a close, got {other:?}"),
        }
    }
}

/// Channels, Info, Unsubscribe and Disconnect reach every edge.
async fn commands(apis: &[u16], ports: &[u16]) -> Result<()> {
    let room = format!("review:{}", free_port());
    let topic = format!("realtime:{room}");
    // Two users on every edge; "kick" also in a second channel.
    let mut kicked = Vec::new();
    let mut staying = Vec::new();
    for &port in ports {
        let mut c = subscriber_as("kick", port, &topic, json!({})).await?;
        join_v1(&mut c, &format!("{topic}-side"), json!({}), "2").await?;
        kicked.push(c);
        staying.push(subscriber_as("stay", port, &topic, json!({})).await?);
    }
    let mut api = grpc(apis[0], Some(KEY)).await?;
    let edges = ports.len() as u32;

    let info = api.info(v1::InfoRequest {}).await?.into_inner();
    assert_eq!(info.nodes.len(), ports.len(), "{info:?}");
    assert!(
        info.nodes.iter().all(|n| n.connections >= 2 && n.node.len() == 16),
        "{info:?}"
    );

    let found = api
        .channels(v1::ChannelsRequest {
            pattern: format!("{room}*"),
            limit: 0,
        })
        .await?
        .into_inner();
    assert_eq!(found.edges, edges);
    let counts: Vec<(String, u64)> = found
        .channels
        .iter()
        .map(|c| (c.channel.clone(), c.subscribers))
        .collect();
    assert_eq!(
        counts,
        vec![
            (room.clone(), 2 * ports.len() as u64),
            (format!("{room}-side"), ports.len() as u64)
        ],
        "summed over every edge, busiest first"
    );
    let (status, body) = http_request(
        apis[apis.len() - 1],
        "GET",
        &format!("/api/v1/channels?pattern={room}-s*"),
        &[("authorization", &format!("Bearer {READ_KEY}"))],
        Bytes::new(),
    )
    .await?;
    assert_eq!(status, 200, "{body}");
    let body: Value = serde_json::from_str(&body)?;
    assert_eq!(
        body["channels"],
        json!([{"channel": format!("{room}-side"), "private": false, "subscribers": ports.len()}])
    );

    // Unsubscribe "kick" from the side channel: a system message and
    // phx_close there, and the socket stays.
    let r = api
        .unsubscribe(v1::UnsubscribeRequest {
            sub: "kick".into(),
            channel: format!("{room}-side"),
            private: false,
            reason: "removed from the side room".into(),
        })
        .await?
        .into_inner();
    assert_eq!((r.connections, r.edges), (ports.len() as u64, edges));
    for c in &mut kicked {
        let system = c.recv_until(T, |v| v["event"] == "system").await?;
        assert_eq!(system["topic"], format!("{topic}-side"));
        assert_eq!(system["payload"]["message"], "removed from the side room");
        let close = c.recv_until(T, |v| v["event"] == "phx_close").await?;
        assert_eq!(close["topic"], format!("{topic}-side"));
    }

    // A read key may not disconnect anyone.
    let denied = grpc(apis[0], Some(READ_KEY))
        .await?
        .disconnect(v1::DisconnectRequest {
            sub: "kick".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied);

    // Disconnect "kick" for good: its channel closes, then the socket, with
    // the reason, on every edge; "stay" keeps receiving.
    let r = api
        .disconnect(v1::DisconnectRequest {
            sub: "kick".into(),
            reason: "removed by a moderator".into(),
            reconnect: false,
        })
        .await?
        .into_inner();
    assert_eq!((r.connections, r.edges), (ports.len() as u64, edges));
    for c in &mut kicked {
        let close = c.recv_until(T, |v| v["event"] == "phx_close").await?;
        assert_eq!(close["topic"], topic);
        assert_eq!(close_frame(c).await?, (1008, "removed by a moderator".into()));
    }
    // With reconnect allowed: the socket closes with 1012, channels as they were.
    let mut again = Vec::new();
    for &port in ports {
        again.push(subscriber_as("kick", port, &topic, json!({})).await?);
    }
    let (status, body) = http_request(
        apis[apis.len() - 1],
        "POST",
        "/api/v1/disconnect",
        &[("authorization", &format!("Bearer {KEY}"))],
        Bytes::from(json!({"sub": "kick", "reason": "new token needed", "reconnect": true}).to_string()),
    )
    .await?;
    assert_eq!(status, 200, "{body}");
    assert_eq!(serde_json::from_str::<Value>(&body)?["connections"], ports.len());
    for c in &mut again {
        assert_eq!(close_frame(c).await?, (1012, "new token needed".into()));
    }
    http_publish(apis[0], json!({"channel": room, "event": "after", "payload": {}})).await?;
    for c in &mut staying {
        let got = broadcasts(c, 1).await?;
        assert_eq!(got[0].0, "after");
    }
    Ok(())
}
