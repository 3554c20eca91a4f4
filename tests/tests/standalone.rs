//! The real `fanout` binary, driven by raw WebSocket clients: shutdown,
//! configuration errors, slow consumers, resume and metrics.

use std::time::Duration;

use anyhow::Result;
use fanout_tests::{Fanout, Received, WsClient, http_request, join_v1, metric_value, v1};
use serde_json::json;

const T: Duration = Duration::from_secs(5);

#[tokio::test]
async fn sigterm_closes_sockets_with_1001_and_exits_0() -> Result<()> {
    let mut srv = Fanout::start(&[], &[]).await?;
    let mut c = WsClient::connect(srv.port, &srv.ws_path("1.0.0", None)).await?;
    join_v1(&mut c, "realtime:room", json!({}), "1").await?;
    srv.sigterm()?;
    let got = loop {
        match c.recv(T).await? {
            Received::Text(t) if t.contains("presence_state") => continue,
            other => break other,
        }
    };
    assert_eq!(got, Received::Close(1001, "server shutting down".into()));
    let status = srv.wait_exit(Duration::from_secs(10)).await?;
    assert!(status.success(), "exit status {status}");
    Ok(())
}

#[tokio::test]
async fn bad_configuration_exits_64_listing_every_problem() -> Result<()> {
    let dir = std::env::temp_dir().join(format!("fanout-cfg-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let file = dir.join("fanout.toml");
    std::fs::write(
        &file,
        "listen = \"not an address\"\nunknown_key = 1\n[limits]\nmax_frame_bytes = 10\n",
    )?;
    let out = std::process::Command::new(fanout_tests::fanout_bin())
        .args(["--config", file.to_str().unwrap(), "--admin-listen", "127.0.0.1:0"])
        .env("FANOUT_MAX_CHANNELS_PER_CONNECTION", "lots")
        .output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "stderr: {stderr}");
    for needle in [
        "config key listen",
        "unknown config key \"unknown_key\"",
        "FANOUT_MAX_CHANNELS_PER_CONNECTION",
        "max_frame_bytes must be at least 1024",
    ] {
        assert!(stderr.contains(needle), "missing {needle:?} in: {stderr}");
    }
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

#[tokio::test]
async fn public_bind_without_a_secret_is_refused() -> Result<()> {
    let out = std::process::Command::new(fanout_tests::fanout_bin())
        .args(["--listen", "0.0.0.0:0", "--admin-listen", "127.0.0.1:0"])
        .env_remove("FANOUT_JWT_SECRET")
        .output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "stderr: {stderr}");
    assert!(stderr.contains("without a JWT secret"), "{stderr}");
    Ok(())
}

/// A client that stops reading is cut off with a reason once its queue is
/// full, while a healthy member of the same channel gets every message in
/// order and without stalling.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_consumer_is_dropped_and_never_slows_the_channel() -> Result<()> {
    let srv = Fanout::start(&["--outbound-queue-frames", "32", "--messages-per-second", "0"], &[]).await?;
    let path = srv.ws_path("1.0.0", None);
    let mut slow = WsClient::connect(srv.port, &path).await?;
    join_v1(&mut slow, "realtime:hot", json!({}), "1").await?;
    let mut healthy = WsClient::connect(srv.port, &path).await?;
    join_v1(&mut healthy, "realtime:hot", json!({}), "1").await?;
    let mut publisher = WsClient::connect(srv.port, &path).await?;
    join_v1(&mut publisher, "realtime:hot", json!({}), "1").await?;

    // 400 messages of 64 KiB (25 MiB): far more than the kernel buffers of
    // a socket nobody reads (about 4 MiB here), so the slow client's queue
    // must overflow.
    let blob = "x".repeat(64 * 1024);
    let n = 400;
    // The healthy client is never more than 8 messages behind (well within
    // its 32-frame queue): the publisher waits for a permit per message,
    // and the reader returns one per message received.
    let window = std::sync::Arc::new(tokio::sync::Semaphore::new(8));
    let permits = window.clone();
    let reader = tokio::spawn(async move {
        let mut seen = Vec::new();
        while seen.len() < n {
            let v = healthy.recv_json(Duration::from_secs(20)).await?;
            if v["event"] == "broadcast" {
                seen.push(v["payload"]["payload"]["seq"].as_u64().unwrap());
                permits.add_permits(1);
            }
        }
        anyhow::Ok(seen)
    });
    for seq in 0..n {
        window.acquire().await?.forget();
        let msg = v1(
            "realtime:hot",
            "broadcast",
            json!({"type": "broadcast", "event": "blob", "payload": {"seq": seq, "blob": blob}}),
            &format!("m{seq}"),
        );
        publisher.send_json(&msg).await?;
    }
    let seen = reader.await??;
    assert_eq!(
        seen,
        (0..n as u64).collect::<Vec<_>>(),
        "healthy client got everything in order"
    );

    // The slow client now drains what the kernel buffered, then finds the close frame.
    let mut close = None;
    for _ in 0..1000 {
        match slow.recv(T).await {
            Ok(Received::Close(code, reason)) => {
                close = Some((code, reason));
                break;
            }
            Ok(_) => continue,
            Err(_) => break,
        }
    }
    let metrics = srv.metrics().await?;
    assert!(
        metric_value(&metrics, "fanout_slow_consumer_disconnects_total") >= 1.0,
        "{metrics}"
    );
    // The close frame is best effort (the socket is full when it is sent);
    // when it arrives it must carry the reason.
    if let Some((code, reason)) = close {
        assert_eq!(code, 1008);
        assert!(reason.starts_with("slow consumer"), "{reason}");
    }
    Ok(())
}

/// Resume contract: a client that rejoins with the last position it saw gets
/// the missed messages (marked replayed) and then the live stream, with no
/// gap and no duplicate.
#[tokio::test]
async fn resume_replays_missed_messages_then_goes_live() -> Result<()> {
    let srv = Fanout::start(&[], &[]).await?;
    let path = srv.ws_path("1.0.0", None);
    let mut publisher = WsClient::connect(srv.port, &path).await?;
    join_v1(&mut publisher, "realtime:w", json!({"broadcast": {"ack": true}}), "1").await?;
    let publish = |seq: u32| {
        v1(
            "realtime:w",
            "broadcast",
            json!({"type": "broadcast", "event": "e", "payload": {"seq": seq}}),
            &format!("p{seq}"),
        )
    };

    let mut sub = WsClient::connect(srv.port, &path).await?;
    join_v1(&mut sub, "realtime:w", json!({}), "1").await?;
    // A member that stays: once it has seen a message, the channel has
    // dispatched it, so a later join must get it as a replay.
    let mut witness = WsClient::connect(srv.port, &path).await?;
    join_v1(&mut witness, "realtime:w", json!({}), "1").await?;
    for seq in 0..3 {
        publisher.send_json(&publish(seq)).await?;
    }
    let mut last_id = String::new();
    for seq in 0..3 {
        let v = sub.recv_until(T, |v| v["event"] == "broadcast").await?;
        assert_eq!(v["payload"]["payload"]["seq"], seq);
        last_id = v["payload"]["meta"]["id"].as_str().unwrap().to_owned();
    }
    drop(sub);
    for seq in 3..6 {
        publisher.send_json(&publish(seq)).await?;
        publisher.recv_until(T, |v| v["event"] == "phx_reply").await?;
    }
    for seq in 0..6 {
        let v = witness.recv_until(T, |v| v["event"] == "broadcast").await?;
        assert_eq!(v["payload"]["payload"]["seq"], seq);
    }
    let mut sub = WsClient::connect(srv.port, &path).await?;
    join_v1(&mut sub, "realtime:w", json!({"resume": {"after": last_id}}), "2").await?;
    publisher.send_json(&publish(6)).await?;
    let mut got = Vec::new();
    for _ in 3..7 {
        let v = sub.recv_until(T, |v| v["event"] == "broadcast").await?;
        got.push((
            v["payload"]["payload"]["seq"].as_u64().unwrap(),
            v["payload"]["meta"]["replayed"] == true,
        ));
    }
    // Messages the channel dispatched before the rejoin are replayed, then
    // the live stream follows: every message once, in order.
    let seqs: Vec<u64> = got.iter().map(|(s, _)| *s).collect();
    assert_eq!(seqs, vec![3, 4, 5, 6], "{got:?}");
    assert!(
        got[..3].iter().all(|(_, replayed)| *replayed),
        "the missed messages are replays: {got:?}"
    );
    assert!(!got[3].1, "a message published after the rejoin is live: {got:?}");
    Ok(())
}

#[tokio::test]
async fn resume_past_retention_says_resync_required() -> Result<()> {
    let srv = Fanout::start(&["--history-max-messages", "2"], &[]).await?;
    let path = srv.ws_path("2.0.0", None);
    let mut publisher = WsClient::connect(srv.port, &path).await?;
    publisher
        .send_text(r#"["1","1","realtime:w","phx_join",{"config":{"broadcast":{"ack":true}}}]"#)
        .await?;
    publisher.recv_json(T).await?;
    for seq in 0..5 {
        publisher
            .send_text(&format!(r#"["1","p{seq}","realtime:w","broadcast",{{"type":"broadcast","event":"e","payload":{{"seq":{seq}}}}}]"#))
            .await?;
        publisher.recv_json(T).await?;
    }
    let mut sub = WsClient::connect(srv.port, &path).await?;
    sub.send_text(r#"["1","1","realtime:w","phx_join",{"config":{"resume":{"after":"1"}}}]"#)
        .await?;
    let reply = sub.recv_json(T).await?;
    assert_eq!(reply[4]["status"], "ok", "{reply}");
    let system = sub.recv_until(T, |v| v[3] != "presence_state").await?;
    assert_eq!(system[3], "system", "{system}");
    assert_eq!(system[4]["status"], "error");
    assert!(
        system[4]["message"].as_str().unwrap().starts_with("resync required"),
        "{system}"
    );
    Ok(())
}

#[tokio::test]
async fn metrics_count_connections_and_deliveries() -> Result<()> {
    let srv = Fanout::start(&[], &[]).await?;
    let path = srv.ws_path("1.0.0", None);
    let mut a = WsClient::connect(srv.port, &path).await?;
    join_v1(&mut a, "realtime:m", json!({"broadcast": {"self": true}}), "1").await?;
    a.send_json(&v1(
        "realtime:m",
        "broadcast",
        json!({"type": "broadcast", "event": "e", "payload": {}}),
        "2",
    ))
    .await?;
    a.recv_until(T, |v| v["event"] == "broadcast").await?;
    let m = srv.metrics().await?;
    assert_eq!(metric_value(&m, "fanout_connections"), 1.0, "{m}");
    assert_eq!(metric_value(&m, "fanout_channels"), 1.0, "{m}");
    assert!(metric_value(&m, "fanout_messages_delivered_total") >= 1.0, "{m}");
    assert!(m.contains("fanout_publish_to_dispatch_seconds_bucket"), "{m}");
    let (status, _) = http_request(srv.admin_port, "GET", "/readyz", &[], Default::default()).await?;
    assert_eq!(status, 200);
    let (status, _) = http_request(srv.port, "GET", "/metrics", &[], Default::default()).await?;
    assert_eq!(status, 404, "metrics are not on the public listener");
    Ok(())
}

/// Fragmented messages are reassembled, and the size limit applies to the
/// whole message, not to each fragment.
#[tokio::test]
async fn fragmented_messages_are_reassembled_and_limited() -> Result<()> {
    let srv = Fanout::start(&["--max-frame-bytes", "2048"], &[]).await?;
    let path = srv.ws_path("1.0.0", None);
    let mut c = WsClient::connect(srv.port, &path).await?;
    let join = v1("realtime:frag", "phx_join", json!({"config": {}}), "1").to_string();
    c.send_fragmented(&join, 10).await?;
    let reply = c.recv_until(T, |v| v["event"] == "phx_reply").await?;
    assert_eq!(reply["payload"]["status"], "ok", "{reply}");

    // 3 KiB in 1 KiB fragments: every fragment is under the limit, the
    // message is not.
    let big = v1(
        "realtime:frag",
        "broadcast",
        json!({"type": "broadcast", "event": "e", "payload": {"x": "y".repeat(3000)}}),
        "2",
    )
    .to_string();
    // The server may close before the last fragments are sent.
    let _ = c.send_fragmented(&big, 1024).await;
    let got = loop {
        match c.recv(T).await? {
            Received::Close(code, reason) => break (code, reason),
            Received::Text(_) | Received::Binary(_) => continue,
        }
    };
    assert_eq!(got, (1009, "message larger than 2048 bytes".to_owned()));
    Ok(())
}
