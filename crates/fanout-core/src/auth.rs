//! JWT verification for connections and joins.
//!
//! Clients present a JWT as the `apikey` query parameter when they connect
//! and, optionally, as `access_token` in each join and in later
//! `access_token` refreshes. fanout checks the signature (HS256 with a shared
//! secret) and `exp`, with no leeway.

use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;

/// Why a token was refused. The message is safe to show to the client.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("missing token")]
    Missing,
    #[error("token has expired")]
    Expired,
    #[error("invalid token signature")]
    BadSignature,
    #[error("token has no exp claim")]
    MissingExp,
    #[error("malformed token: {0}")]
    Malformed(String),
}

/// The claims fanout reads from a token. Unknown claims are kept in `extra`
/// (row policies read them in later versions).
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Claims {
    #[serde(default)]
    pub sub: Option<String>,
    #[serde(default)]
    pub role: Option<String>,
    /// Expiry, seconds since the Unix epoch. Always present in a verified
    /// token (the verifier requires it); optional here only so that a token
    /// without it is reported as [`AuthError::MissingExp`].
    #[serde(default)]
    pub exp: Option<u64>,
    #[serde(flatten)]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

/// Verifies HS256 tokens against one shared secret.
#[derive(Clone)]
pub struct JwtVerifier {
    key: DecodingKey,
    validation: Validation,
}

impl std::fmt::Debug for JwtVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwtVerifier").finish_non_exhaustive()
    }
}

impl JwtVerifier {
    /// A verifier for HS256 tokens signed with `secret`.
    pub fn hs256(secret: &[u8]) -> Self {
        let mut validation = Validation::new(Algorithm::HS256);
        validation.leeway = 0;
        validation.validate_aud = false;
        validation.set_required_spec_claims(&["exp"]);
        Self {
            key: DecodingKey::from_secret(secret),
            validation,
        }
    }

    /// Checks the signature and expiry and returns the claims.
    pub fn verify(&self, token: &str) -> Result<Claims, AuthError> {
        use jsonwebtoken::errors::ErrorKind;
        if token.is_empty() {
            return Err(AuthError::Missing);
        }
        jsonwebtoken::decode::<Claims>(token, &self.key, &self.validation)
            .map(|data| data.claims)
            .map_err(|e| match e.kind() {
                ErrorKind::ExpiredSignature => AuthError::Expired,
                ErrorKind::InvalidSignature => AuthError::BadSignature,
                ErrorKind::MissingRequiredClaim(c) if c == "exp" => AuthError::MissingExp,
                _ => AuthError::Malformed(e.to_string()),
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{EncodingKey, Header, encode};
    use std::time::{SystemTime, UNIX_EPOCH};

    fn now() -> u64 {
        SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs()
    }

    fn token(secret: &[u8], claims: serde_json::Value) -> String {
        encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(secret),
        )
        .unwrap()
    }

    #[test]
    fn accepts_valid_and_refuses_bad_tokens() {
        let v = JwtVerifier::hs256(b"secret");
        let ok = token(
            b"secret",
            serde_json::json!({"sub": "u1", "role": "authenticated", "exp": now() + 60, "workshops": [1]}),
        );
        let claims = v.verify(&ok).unwrap();
        assert_eq!(claims.sub.as_deref(), Some("u1"));
        assert_eq!(claims.extra["workshops"], serde_json::json!([1]));

        let forged = token(b"other", serde_json::json!({"exp": now() + 60}));
        assert_eq!(v.verify(&forged), Err(AuthError::BadSignature));
        let expired = token(b"secret", serde_json::json!({"exp": now() - 1}));
        assert_eq!(v.verify(&expired), Err(AuthError::Expired));
        let no_exp = token(b"secret", serde_json::json!({"sub": "u"}));
        assert_eq!(v.verify(&no_exp), Err(AuthError::MissingExp));
        assert_eq!(v.verify(""), Err(AuthError::Missing));
        assert!(matches!(v.verify("not.a.jwt"), Err(AuthError::Malformed(_))));
    }
}
