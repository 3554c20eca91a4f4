//! Admission limits and hostile input against a real standalone edge:
//! connections per client IP and per `sub`, the `Origin` allow-list, a
//! slowloris of half-open handshakes, a 16 MiB frame and 1,000 garbage
//! frames. Each trips as documented (the HTTP status and reason, the close
//! code, the metric) while a well-behaved pair on the same edge keeps
//! exchanging broadcasts with nothing lost.

use std::net::IpAddr;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use fanout_tests::{Fanout, Received, WsClient, join_v1, metric_value, v1};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const SECRET: &str = "limits-test-secret-at-least-32-bytes";
const WAIT: Duration = Duration::from_secs(5);

fn token(sub: &str) -> String {
    fanout_tests::hs256_token(SECRET, sub)
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// Two clients on one channel, from their own address, that must keep
/// exchanging broadcasts whatever else happens to the edge.
struct Pair {
    a: WsClient,
    b: WsClient,
    sent: u32,
}

impl Pair {
    async fn join(f: &Fanout) -> Result<Self> {
        let from = Some(ip("127.0.0.9"));
        let mut a = WsClient::connect_from(f.port, &f.ws_path("1.0.0", Some(&token("pair-a"))), from).await?;
        let mut b = WsClient::connect_from(f.port, &f.ws_path("1.0.0", Some(&token("pair-b"))), from).await?;
        join_v1(&mut a, "realtime:pair", json!({}), "1").await?;
        join_v1(&mut b, "realtime:pair", json!({}), "1").await?;
        Ok(Self { a, b, sent: 0 })
    }

    /// One broadcast from a to b, received in order.
    async fn exchange(&mut self) -> Result<()> {
        self.sent += 1;
        let n = self.sent;
        let push = v1(
            "realtime:pair",
            "broadcast",
            json!({"type": "broadcast", "event": "n", "payload": {"n": n}}),
            "2",
        );
        self.a.send_json(&push).await?;
        let got = self
            .b
            .recv_until(WAIT, |v| v["event"] == "broadcast")
            .await
            .with_context(|| format!("the pair's broadcast {n}"))?;
        ensure!(got["payload"]["payload"]["n"] == n, "the pair lost a broadcast: {got}");
        Ok(())
    }
}

/// A WebSocket handshake from `local` with extra headers; the server's
/// answer.
async fn handshake(port: u16, local: &str, path: &str, headers: &str) -> Result<String> {
    fanout_tests::handshake_answer(port, Some(ip(local)), path, headers).await
}

#[tokio::test]
async fn connection_limits_per_ip_and_per_sub_and_the_origin_list_trip_as_documented() -> Result<()> {
    let f = Fanout::start(
        &[
            "--jwt-secret",
            SECRET,
            "--max-connections-per-ip",
            "3",
            "--max-connections-per-sub",
            "2",
            "--allowed-origins",
            "https://app.example",
        ],
        &[],
    )
    .await?;
    let mut pair = Pair::join(&f).await?;

    // Three from 127.0.0.1 (three users) are fine; the fourth is refused.
    let mut held = Vec::new();
    for i in 0..3 {
        let path = f.ws_path("1.0.0", Some(&token(&format!("ip-user-{i}"))));
        held.push(WsClient::connect_from(f.port, &path, Some(ip("127.0.0.1"))).await?);
    }
    let answer = handshake(f.port, "127.0.0.1", &f.ws_path("1.0.0", Some(&token("ip-user-3"))), "").await?;
    ensure!(
        answer.starts_with("HTTP/1.1 429"),
        "a 4th connection from one address: {answer}"
    );
    ensure!(
        answer.contains("too many connections from this address (at most 3)"),
        "{answer}"
    );
    pair.exchange().await?;
    // A closed connection gives its place back.
    drop(held.pop());
    tokio::time::sleep(Duration::from_millis(300)).await;
    let path = f.ws_path("1.0.0", Some(&token("ip-user-3")));
    held.push(WsClient::connect_from(f.port, &path, Some(ip("127.0.0.1"))).await?);

    // Two connections of one user, from anywhere; the third is refused.
    let sub_path = f.ws_path("1.0.0", Some(&token("many-tabs")));
    held.push(WsClient::connect_from(f.port, &sub_path, Some(ip("127.0.0.2"))).await?);
    held.push(WsClient::connect_from(f.port, &sub_path, Some(ip("127.0.0.3"))).await?);
    let answer = handshake(f.port, "127.0.0.4", &sub_path, "").await?;
    ensure!(
        answer.starts_with("HTTP/1.1 429"),
        "a 3rd connection of one user: {answer}"
    );
    ensure!(
        answer.contains("too many connections for this user (at most 2)"),
        "{answer}"
    );
    pair.exchange().await?;

    // Browsers from an origin not on the list are refused; the listed one
    // and clients without an Origin (not browsers) pass.
    let path = f.ws_path("1.0.0", Some(&token("browser")));
    let answer = handshake(f.port, "127.0.0.5", &path, "Origin: https://evil.example\r\n").await?;
    ensure!(answer.starts_with("HTTP/1.1 403"), "a foreign origin: {answer}");
    ensure!(
        answer.contains("origin \\\"https://evil.example\\\" is not allowed"),
        "{answer}"
    );
    let answer = handshake(f.port, "127.0.0.5", &path, "Origin: https://app.example\r\n").await?;
    ensure!(answer.starts_with("HTTP/1.1 101"), "the listed origin: {answer}");
    pair.exchange().await?;

    let m = f.metrics().await?;
    for (reason, n) in [("too_many_per_ip", 1.0), ("too_many_per_sub", 1.0), ("origin", 1.0)] {
        let series = format!("fanout_handshake_rejections_total{{reason=\"{reason}\"}}");
        ensure!(metric_value(&m, &series) == n, "{series} is not {n}:\n{m}");
    }
    Ok(())
}

#[tokio::test]
async fn a_slowloris_a_16_mib_frame_and_1000_garbage_frames_leave_the_edge_healthy() -> Result<()> {
    let f = Fanout::start(&["--jwt-secret", SECRET, "--handshake-timeout-secs", "1"], &[]).await?;
    let mut pair = Pair::join(&f).await?;

    // 50 half-open handshakes: headers that never end. Each is closed once
    // the handshake timeout passes.
    let mut slow = Vec::new();
    for _ in 0..50 {
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", f.port)).await?;
        s.write_all(b"GET /realtime/v1/websocket?vsn=1.0.0 HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
            .await?;
        slow.push(s);
    }
    pair.exchange().await?;
    for s in &mut slow {
        let mut buf = [0u8; 512];
        // hyper may answer 408 before closing; either way the socket ends.
        loop {
            match tokio::time::timeout(WAIT, s.read(&mut buf)).await {
                Ok(Ok(0)) | Ok(Err(_)) => break,
                Ok(Ok(_)) => continue,
                Err(_) => anyhow::bail!("a half-open handshake was still open after {WAIT:?}"),
            }
        }
    }
    pair.exchange().await?;
    let m = f.metrics().await?;
    ensure!(
        metric_value(&m, "fanout_handshake_timeouts_total") >= 50.0,
        "timeouts not counted:\n{m}"
    );

    // A 16 MiB frame is over the 1 MiB limit: 1009, and the edge goes on.
    let mut big = WsClient::connect(f.port, &f.ws_path("1.0.0", Some(&token("big")))).await?;
    let huge = "x".repeat(16 << 20);
    let _ = big.send_text(&huge).await; // the server may close before it is all sent
    match big.recv(WAIT).await {
        Ok(Received::Close(code, reason)) => ensure!(code == 1009, "closed with {code} {reason}"),
        Ok(other) => anyhow::bail!("a 16 MiB frame got {other:?}"),
        Err(_) => {} // reset before the close frame could be read
    }
    pair.exchange().await?;

    // 1,000 garbage frames: each gets an error reply (or the socket a clear
    // close); nothing reaches the channel.
    let mut junk = WsClient::connect(f.port, &f.ws_path("1.0.0", Some(&token("junk")))).await?;
    let mut seed = 0x2545_F491_4F6C_DD1Du64;
    for i in 0..1000 {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let bytes: Vec<u8> = (0..(seed % 200) as usize).map(|j| (seed >> (j % 56)) as u8).collect();
        let text = format!("{i}:{}", String::from_utf8_lossy(&bytes));
        if junk.send_text(&text).await.is_err() {
            break;
        }
    }
    let mut replies = 0;
    while let Ok(r) = junk.recv(Duration::from_millis(500)).await {
        match r {
            Received::Text(t) => {
                let v: serde_json::Value = serde_json::from_str(&t)?;
                ensure!(v["payload"]["status"] == "error", "garbage got {v}");
                replies += 1;
            }
            Received::Close(code, _) => {
                ensure!(
                    code == 1008 || code == 1002 || code == 1007,
                    "garbage closed with {code}"
                );
                break;
            }
            _ => {}
        }
    }
    ensure!(replies > 0, "no error reply to garbage");
    for _ in 0..5 {
        pair.exchange().await?;
    }
    let (status, _) = fanout_tests::http_get(f.port, "/healthz").await?;
    ensure!(status == 200, "healthz {status}");
    Ok(())
}
