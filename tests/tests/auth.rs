//! Token keys at the edge: public keys (ES256, EdDSA) selected by `kid`,
//! algorithm bound to each key, audience required when configured, and
//! key files checked at start-up. The keys are the fixtures of
//! `crates/fanout-core/testdata/keys` (generated with openssl).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
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

/// The server's answer to a WebSocket upgrade request for `path`.
async fn handshake_answer(port: u16, path: &str) -> Result<String> {
    fanout_tests::handshake_answer(port, None, path, "").await
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

/// A JWKS document server on loopback whose document (and status) the test
/// changes; it counts the fetches.
struct JwksServer {
    port: u16,
    doc: std::sync::Arc<std::sync::Mutex<(u16, String)>>,
    fetches: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl JwksServer {
    async fn start(doc: String) -> Result<Self> {
        Self::start_on("127.0.0.1", None, doc).await
    }

    /// Serves https with the test CA's certificate (for `localhost` and
    /// 127.0.0.1) when `tls` is set.
    async fn start_on(ip: &str, tls: Option<tokio_rustls::TlsAcceptor>, doc: String) -> Result<Self> {
        let listener = tokio::net::TcpListener::bind((ip, 0)).await?;
        let port = listener.local_addr()?.port();
        let state = std::sync::Arc::new(std::sync::Mutex::new((200u16, doc)));
        let fetches = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let (s, f) = (state.clone(), fetches.clone());
        tokio::spawn(async move {
            while let Ok((sock, _)) = listener.accept().await {
                let (status, body) = s.lock().unwrap().clone();
                let (f, tls) = (f.clone(), tls.clone());
                tokio::spawn(async move {
                    match tls {
                        None => answer(sock, &f, status, &body).await,
                        // A client that does not trust the certificate
                        // hangs up during the handshake.
                        Some(tls) => {
                            if let Ok(sock) = tls.accept(sock).await {
                                answer(sock, &f, status, &body).await;
                            }
                        }
                    }
                });
            }
        });
        Ok(Self {
            port,
            doc: state,
            fetches,
        })
    }

    fn set(&self, status: u16, doc: &str) {
        *self.doc.lock().unwrap() = (status, doc.to_owned());
    }
}

/// Reads one request and answers it with `status` and `body`.
async fn answer<S>(mut sock: S, fetches: &std::sync::atomic::AtomicUsize, status: u16, body: &str)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let mut buf = [0u8; 2048];
    let _ = sock.read(&mut buf).await;
    fetches.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    let resp = format!(
        "HTTP/1.1 {status} X\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = sock.write_all(resp.as_bytes()).await;
    let _ = sock.shutdown().await;
}

fn tls_path(name: &str) -> std::path::PathBuf {
    repo_root().join("crates/fanout-edge/testdata/tls").join(name)
}

/// The test server's certificate, signed by `testdata/tls/ca.pem`.
fn test_tls_acceptor() -> Result<tokio_rustls::TlsAcceptor> {
    use tokio_rustls::rustls;
    use tokio_rustls::rustls::pki_types::pem::PemObject;
    use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let certs = CertificateDer::pem_file_iter(tls_path("server.pem"))?.collect::<Result<Vec<_>, _>>()?;
    let key = PrivateKeyDer::from_pem_file(tls_path("server.key"))?;
    let config =
        rustls::ServerConfig::builder_with_provider(std::sync::Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_single_cert(certs, key)?;
    Ok(tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(config)))
}

/// An https JWKS URL is trusted through `auth.jwks_ca_file` (a private CA)
/// and the certificate must name the host; either failure stops the edge at
/// start with the TLS reason.
#[tokio::test]
async fn a_jwks_url_over_https_with_a_private_ca() -> Result<()> {
    let server = JwksServer::start_on("127.0.0.1", Some(test_tls_acceptor()?), jwks_doc(&["ec-jwk"])).await?;
    let ca = tls_path("ca.pem").display().to_string();
    for host in ["127.0.0.1", "localhost"] {
        let url = format!("https://{host}:{}/.well-known/jwks.json", server.port);
        let f = Fanout::start(&["--auth-jwks", &url, "--auth-jwks-ca-file", &ca], &[]).await?;
        let ec = EncodingKey::from_ec_pem(&std::fs::read(key_path("ec.key"))?)?;
        let t = token(
            Algorithm::ES256,
            Some("ec-jwk"),
            &ec,
            json!({"sub": "u", "exp": now() + 60}),
        );
        WsClient::connect(f.port, &f.ws_path("1.0.0", Some(&t))).await?;
    }
    // The servers run on this test's runtime: wait for the edge without
    // blocking it.
    let starts = async |args: Vec<String>| -> Result<String> {
        let out = tokio::process::Command::new(fanout_tests::fanout_bin())
            .args(&args)
            .args(["--admin-listen", "127.0.0.1:0", "--listen", "127.0.0.1:0"])
            .output()
            .await?;
        assert!(!out.status.success(), "an edge started with {args:?}");
        Ok(String::from_utf8_lossy(&out.stderr).into_owned())
    };
    // Without the private CA, the system's roots do not vouch for it.
    let url = format!("https://127.0.0.1:{}/.well-known/jwks.json", server.port);
    let stderr = starts(vec!["--auth-jwks".into(), url]).await?;
    assert!(
        stderr.contains("UnknownIssuer") || stderr.contains("no CA certificate is trusted"),
        "{stderr}"
    );
    // An address the certificate does not name.
    let other = JwksServer::start_on("127.0.0.2", Some(test_tls_acceptor()?), jwks_doc(&["ec-jwk"])).await?;
    let url = format!("https://127.0.0.2:{}/.well-known/jwks.json", other.port);
    let stderr = starts(vec![
        "--auth-jwks".into(),
        url,
        "--auth-jwks-ca-file".into(),
        ca.clone(),
    ])
    .await?;
    assert!(
        stderr.contains("certificate not valid for name \"127.0.0.2\""),
        "{stderr}"
    );
    // A CA file without auth.jwks is a mistake, said at start.
    let stderr = starts(vec!["--auth-jwks-ca-file".into(), ca]).await?;
    assert!(
        stderr.contains("auth.jwks_ca_file is set without auth.jwks"),
        "{stderr}"
    );
    Ok(())
}

fn jwks_doc(keys: &[&str]) -> String {
    let all: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(key_path("jwks.json")).unwrap()).unwrap();
    let picked: Vec<_> = all["keys"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|k| keys.contains(&k["kid"].as_str().unwrap_or_default()))
        .cloned()
        .collect();
    json!({ "keys": picked }).to_string()
}

/// A key is published, then the old one retired: new tokens follow the
/// document, a client connected with a still-valid token is never
/// disconnected, and a failed fetch keeps the keys.
#[tokio::test]
async fn jwks_rotation_disconnects_no_client_with_a_valid_token() -> Result<()> {
    let server = JwksServer::start(jwks_doc(&["ec-jwk"])).await?;
    let url = format!("http://127.0.0.1:{}/.well-known/jwks.json", server.port);
    let f = Fanout::start(&["--auth-jwks", &url, "--auth-jwks-refresh-secs", "1"], &[]).await?;
    let ec = EncodingKey::from_ec_pem(&std::fs::read(key_path("ec.key"))?)?;
    let ed = EncodingKey::from_ed_pem(&std::fs::read(key_path("ed.key"))?)?;
    let claims = json!({"sub": "u1", "exp": now() + 600});
    let old = token(Algorithm::ES256, Some("ec-jwk"), &ec, claims.clone());
    let new = token(Algorithm::EdDSA, Some("ed-jwk"), &ed, claims.clone());

    let mut a = WsClient::connect(f.port, &f.ws_path("1.0.0", Some(&old))).await?;
    fanout_tests::join_v1(&mut a, "realtime:rotation", json!({}), "1").await?;
    assert!(
        handshake_answer(f.port, &f.ws_path("1.0.0", Some(&new)))
            .await?
            .starts_with("HTTP/1.1 401"),
        "the new key is not published yet"
    );

    // Published: the unknown kid asks for an early refresh.
    server.set(200, &jwks_doc(&["ec-jwk", "ed-jwk"]));
    let mut b = None;
    for _ in 0..40 {
        if let Ok(c) = WsClient::connect(f.port, &f.ws_path("1.0.0", Some(&new))).await {
            b = Some(c);
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let mut b = b.context("a token of the newly published key was never accepted")?;
    fanout_tests::join_v1(&mut b, "realtime:rotation", json!({}), "1").await?;

    // Retired: new connections with the old key are refused...
    server.set(200, &jwks_doc(&["ed-jwk"]));
    let mut refused = false;
    for _ in 0..40 {
        if WsClient::connect(f.port, &f.ws_path("1.0.0", Some(&old)))
            .await
            .is_err()
        {
            refused = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert!(refused, "the retired key still opened connections");
    let answer = handshake_answer(f.port, &f.ws_path("1.0.0", Some(&old))).await?;
    assert!(
        answer.starts_with("HTTP/1.1 401") && answer.contains("unknown key id"),
        "{answer}"
    );
    // ...but the client that connected with it keeps its channel.
    let push = json!({"topic": "realtime:rotation", "event": "broadcast", "ref": "2",
        "payload": {"type": "broadcast", "event": "hi", "payload": {"from": "b"}}});
    b.send_json(&push).await?;
    let got = a
        .recv_until(Duration::from_secs(5), |v| v["event"] == "broadcast")
        .await?;
    assert_eq!(got["payload"]["payload"]["from"], "b");

    // The document server fails: the keys stay.
    server.set(500, "oops");
    let before = server.fetches.load(std::sync::atomic::Ordering::SeqCst);
    while server.fetches.load(std::sync::atomic::Ordering::SeqCst) < before + 2 {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let c = WsClient::connect(f.port, &f.ws_path("1.0.0", Some(&new))).await;
    assert!(c.is_ok(), "a failed refresh dropped the keys");
    let m = f.metrics().await?;
    assert!(
        fanout_tests::metric_value(&m, "fanout_jwks_refreshes_total{result=\"error\"}") >= 1.0,
        "{m}"
    );
    assert_eq!(fanout_tests::metric_value(&m, "fanout_jwks_keys"), 1.0);
    Ok(())
}

#[tokio::test]
async fn a_jwks_file_is_read_at_start_and_a_bad_one_stops_the_edge() -> Result<()> {
    let f = Fanout::start(&["--auth-jwks", &key_path("jwks.json")], &[]).await?;
    let rs = EncodingKey::from_rsa_pem(&std::fs::read(key_path("rsa.key"))?)?;
    let t = token(
        Algorithm::RS256,
        Some("rsa-jwk"),
        &rs,
        json!({"sub": "u", "exp": now() + 60}),
    );
    WsClient::connect(f.port, &f.ws_path("1.0.0", Some(&t))).await?;
    let out = std::process::Command::new(fanout_tests::fanout_bin())
        .args([
            "--auth-jwks",
            &key_path("ec.pub"),
            "--admin-listen",
            "127.0.0.1:0",
            "--listen",
            "127.0.0.1:0",
        ])
        .output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "an edge started with a PEM file as its JWKS");
    assert!(stderr.contains("not a JWKS document"), "{stderr}");
    Ok(())
}
