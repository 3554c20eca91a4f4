//! Token keys at the edge: public keys (ES256, EdDSA) selected by `kid`,
//! algorithm bound to each key, audience required when configured, and
//! key files checked at start-up. The keys are the fixtures of
//! `crates/fanout-core/testdata/keys` (generated with openssl).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Result;
use fanout_tests::{Fanout, WsClient, repo_root};
use jsonwebtoken::{Algorithm, EncodingKey, Header, encode};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn key_path(name: &str) -> String {
    repo_root()
        .join("crates/fanout-core/testdata/keys")
        .join(name)
        .display()
        .to_string()
}

fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs()
}

/// The server's whole answer to a WebSocket upgrade request for `path`.
async fn handshake_answer(port: u16, path: &str) -> Result<String> {
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    let req = format!(
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\nConnection: close\r\n\r\n"
    );
    s.write_all(req.as_bytes()).await?;
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut answer)).await??;
    Ok(String::from_utf8_lossy(&answer).into_owned())
}

fn token(alg: Algorithm, kid: Option<&str>, key: &EncodingKey, claims: serde_json::Value) -> String {
    let mut header = Header::new(alg);
    header.kid = kid.map(str::to_owned);
    encode(&header, &claims, key).unwrap()
}

#[tokio::test]
async fn public_keys_by_kid_with_an_audience() -> Result<()> {
    let keys = format!("ec-1=ES256:{},EdDSA:{}", key_path("ec.pub"), key_path("ed.pub"));
    let f = Fanout::start(&["--auth-public-keys", &keys, "--auth-audience", "fanout"], &[]).await?;
    let ec = EncodingKey::from_ec_pem(&std::fs::read(key_path("ec.key"))?)?;
    let ed = EncodingKey::from_ed_pem(&std::fs::read(key_path("ed.key"))?)?;
    let good = json!({"sub": "u1", "exp": now() + 60, "aud": "fanout"});

    for t in [
        token(Algorithm::ES256, Some("ec-1"), &ec, good.clone()),
        token(Algorithm::EdDSA, None, &ed, good.clone()),
    ] {
        let mut c = WsClient::connect(f.port, &f.ws_path("1.0.0", Some(&t))).await?;
        c.send_json(&json!({"topic": "phoenix", "event": "heartbeat", "payload": {}, "ref": "1"}))
            .await?;
        let reply = c.recv_json(Duration::from_secs(5)).await?;
        assert_eq!(reply["payload"]["status"], "ok", "{reply}");
    }

    let refused = [
        (
            token(Algorithm::ES256, Some("ec-2"), &ec, good.clone()),
            "unknown key id",
        ),
        (
            token(
                Algorithm::HS256,
                None,
                &EncodingKey::from_secret(b"guess"),
                good.clone(),
            ),
            "algorithm HS256",
        ),
        (
            token(
                Algorithm::ES256,
                Some("ec-1"),
                &ec,
                json!({"exp": now() + 60, "aud": "other"}),
            ),
            "audience",
        ),
        (
            token(Algorithm::ES256, Some("ec-1"), &ec, json!({"exp": now() + 60})),
            "audience",
        ),
    ];
    for (t, why) in refused {
        assert!(
            WsClient::connect(f.port, &f.ws_path("1.0.0", Some(&t))).await.is_err(),
            "a token that should fail with {why:?} was accepted"
        );
        // The handshake's answer says why.
        let answer = handshake_answer(f.port, &f.ws_path("1.0.0", Some(&t))).await?;
        assert!(
            answer.starts_with("HTTP/1.1 401") && answer.contains(why),
            "expected 401 with {why:?}: {answer}"
        );
    }
    Ok(())
}

#[tokio::test]
async fn bad_key_settings_exit_64_naming_each() -> Result<()> {
    let keys = format!(
        "ES256:/nonexistent/key.pem,HS512:{},ec=ES256:{}",
        key_path("ec.pub"),
        key_path("rsa.pub")
    );
    let out = std::process::Command::new(fanout_tests::fanout_bin())
        .args(["--auth-public-keys", &keys, "--admin-listen", "127.0.0.1:0"])
        .output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "stderr: {stderr}");
    for needle in [
        "cannot read /nonexistent/key.pem",
        "unknown key algorithm \"HS512\"",
        "rsa.pub",
    ] {
        assert!(stderr.contains(needle), "missing {needle:?} in: {stderr}");
    }
    // A public key alone is a key: a public address is allowed without FANOUT_JWT_SECRET.
    let out = std::process::Command::new(fanout_tests::fanout_bin())
        .args([
            "--auth-public-keys",
            &format!("ES256:{}", key_path("ec.pub")),
            "--listen",
            "0.0.0.0:0",
        ])
        .args(["--admin-listen", "127.0.0.1:0", "--nats-url", "", "cdc"])
        .output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("without a JWT secret"), "{stderr}");
    Ok(())
}
