//! Tokens through `JwtVerifier::verify`, as a client sends them in
//! `apikey` and `access_token`: the input once as a token, and once as a
//! header and claims (split at the first NUL byte) signed with the
//! verifier's HS256 secret, so that the checks after the signature (claims,
//! `exp`, `nbf`, `aud`) are reached too. The verifier holds an HS256
//! secret and RS256, ES256 and EdDSA public keys with key ids, a leeway and
//! an audience. Asserts, beyond not panicking: the empty token is
//! `Missing`; an accepted token has three parts, an `exp` that has not
//! passed (within the leeway), an `nbf` (when present) that has come, and
//! the configured audience.
#![no_main]

use std::sync::LazyLock;
use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use fanout_core::auth::{AuthError, JwtVerifier, PublicKeyAlg};
use jsonwebtoken::{Algorithm, EncodingKey};
use libfuzzer_sys::fuzz_target;
use serde_json::Value;

const SECRET: &[u8] = b"fuzz-secret";
const LEEWAY: u64 = 30;
const AUDIENCE: &str = "authenticated";
const RSA_PUB: &[u8] = include_bytes!("../../crates/fanout-core/testdata/keys/rsa.pub");
const EC_PUB: &[u8] = include_bytes!("../../crates/fanout-core/testdata/keys/ec.pub");
const ED_PUB: &[u8] = include_bytes!("../../crates/fanout-core/testdata/keys/ed.pub");

static VERIFIER: LazyLock<JwtVerifier> = LazyLock::new(|| {
    JwtVerifier::hs256(SECRET)
        .with_public_key(Some("rsa-1"), PublicKeyAlg::Rs256, RSA_PUB)
        .unwrap()
        .with_public_key(Some("ec-1"), PublicKeyAlg::Es256, EC_PUB)
        .unwrap()
        .with_public_key(Some("ed-1"), PublicKeyAlg::EdDsa, ED_PUB)
        .unwrap()
        .with_leeway(LEEWAY)
        .with_audience(vec![AUDIENCE.to_owned()])
});

fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs()
}

fn check(token: &str) {
    let result = VERIFIER.verify(token);
    if token.is_empty() {
        assert_eq!(result, Err(AuthError::Missing));
    }
    let Ok(claims) = result else {
        return;
    };
    assert_eq!(token.split('.').count(), 3, "accepted a token without three parts");
    let exp = claims.exp.expect("an accepted token has exp");
    assert!(
        exp.saturating_add(LEEWAY) >= now(),
        "accepted an expired token (exp {exp})"
    );
    if let Some(nbf) = claims.extra.get("nbf") {
        let nbf = nbf.as_f64().expect("an accepted nbf is a number");
        assert!(
            nbf <= (now() + LEEWAY) as f64,
            "accepted a token before its nbf ({nbf})"
        );
    }
    let aud = claims.extra.get("aud").expect("an accepted token has the audience");
    let has = |v: &Value| v.as_str() == Some(AUDIENCE);
    assert!(
        has(aud) || aud.as_array().is_some_and(|a| a.iter().any(has)),
        "accepted audience {aud}"
    );
}

fuzz_target!(|data: &[u8]| {
    if let Ok(token) = std::str::from_utf8(data) {
        check(token);
    }
    let (header, claims) = match data.iter().position(|&b| b == 0) {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (&br#"{"alg":"HS256","typ":"JWT"}"#[..], data),
    };
    let message = format!("{}.{}", URL_SAFE_NO_PAD.encode(header), URL_SAFE_NO_PAD.encode(claims));
    let signature = jsonwebtoken::crypto::sign(message.as_bytes(), &EncodingKey::from_secret(SECRET), Algorithm::HS256)
        .expect("HMAC signing does not fail");
    check(&format!("{message}.{signature}"));
});
