//! JWT verification for connections and joins.
//!
//! Clients present a JWT as the `apikey` query parameter when they connect
//! and, optionally, as `access_token` in each join and in later
//! `access_token` refreshes. A [`JwtVerifier`] holds every key a token may be
//! signed with: HS256 secrets (several, so a secret can be rotated) and
//! RS256 / ES256 / EdDSA public keys (PEM). Each key is bound to one
//! algorithm, so a token cannot pick a weaker or different one (no `alg:
//! none`, no HS256 token checked against an RSA public key used as an HMAC
//! secret). A token's `kid` selects the key; without a `kid`, every key of
//! the token's algorithm is tried. `exp` is required, `nbf` honoured, and
//! `aud` / `iss` checked when configured, all with the configured leeway.

use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;

/// Why a token was refused. The message is safe to show to the client.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("missing token")]
    Missing,
    #[error("token has expired")]
    Expired,
    #[error("token is not valid yet (nbf)")]
    NotYetValid,
    #[error("invalid token signature")]
    BadSignature,
    #[error("token has no exp claim")]
    MissingExp,
    #[error("token has an unknown key id {0:?}")]
    UnknownKey(String),
    #[error("token algorithm {0} is not accepted (no key for it)")]
    Algorithm(String),
    #[error("token audience is not accepted")]
    Audience,
    #[error("token issuer is not accepted")]
    Issuer,
    /// A refreshed token names another user than the one the channel was
    /// joined as.
    #[error("token is for another user ({}) than the one this channel was joined as ({expected})", .got.as_deref().unwrap_or("no sub"))]
    OtherSubject { got: Option<String>, expected: String },
    #[error("malformed token: {0}")]
    Malformed(String),
}

/// A key that could not be loaded. The message names the key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct KeyError(String);

/// The claims fanout reads from a token. Unknown claims are kept in `extra`
/// (policies read them).
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

impl Claims {
    /// Every claim as one JSON object, as policies read them.
    pub fn to_value(&self) -> serde_json::Value {
        let mut m = self.extra.clone();
        if let Some(sub) = &self.sub {
            m.insert("sub".into(), sub.clone().into());
        }
        if let Some(role) = &self.role {
            m.insert("role".into(), role.clone().into());
        }
        if let Some(exp) = self.exp {
            m.insert("exp".into(), exp.into());
        }
        serde_json::Value::Object(m)
    }

    /// Claims of a request that carries no user token: role `anon`.
    pub fn anon() -> Self {
        Self {
            sub: None,
            role: Some("anon".into()),
            exp: None,
            extra: serde_json::Map::new(),
        }
    }
}

/// The public-key algorithms a PEM key can be bound to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PublicKeyAlg {
    Rs256,
    Es256,
    EdDsa,
}

impl std::str::FromStr for PublicKeyAlg {
    type Err = KeyError;
    fn from_str(s: &str) -> Result<Self, KeyError> {
        match s {
            "RS256" => Ok(Self::Rs256),
            "ES256" => Ok(Self::Es256),
            "EdDSA" => Ok(Self::EdDsa),
            other => Err(KeyError(format!(
                "unknown key algorithm {other:?}: expected RS256, ES256 or EdDSA"
            ))),
        }
    }
}

/// One key, bound to its algorithm and, optionally, a key id.
#[derive(Clone)]
struct Key {
    kid: Option<String>,
    alg: Algorithm,
    key: DecodingKey,
}

/// Keys from a JWKS document, replaced as a whole when it is fetched again
/// (shared by every clone of the verifier that holds it).
#[derive(Default)]
pub struct JwksKeys {
    keys: std::sync::RwLock<Vec<Key>>,
    /// A token named a key id no key has: the document may have a new key.
    unknown_kid: std::sync::atomic::AtomicBool,
}

impl std::fmt::Debug for JwksKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "JwksKeys({} keys)", self.len())
    }
}

impl JwksKeys {
    /// Replaces the keys with those of a JWKS document (`{"keys": [...]}`).
    /// Keys fanout cannot verify with (encryption keys, HMAC keys,
    /// algorithms other than RS256 / ES256 / EdDSA) are skipped; a document
    /// with no usable key is an error and changes nothing. Returns how many
    /// keys were taken.
    pub fn replace(&self, document: &[u8]) -> Result<usize, KeyError> {
        let keys = parse_jwks(document)?;
        let n = keys.len();
        *self.keys.write().unwrap_or_else(|e| e.into_inner()) = keys;
        Ok(n)
    }

    pub fn len(&self) -> usize {
        self.keys.read().unwrap_or_else(|e| e.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether a token named an unknown key id since the last call (the
    /// refresher then fetches the document early).
    pub fn take_unknown_kid(&self) -> bool {
        self.unknown_kid.swap(false, std::sync::atomic::Ordering::AcqRel)
    }
}

/// The usable keys of a JWKS document.
fn parse_jwks(document: &[u8]) -> Result<Vec<Key>, KeyError> {
    use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, KeyAlgorithm, PublicKeyUse};
    #[derive(Deserialize)]
    struct Doc {
        keys: Vec<serde_json::Value>,
    }
    let doc: Doc = serde_json::from_slice(document)
        .map_err(|e| KeyError(format!("not a JWKS document ({{\"keys\": [...]}}): {e}")))?;
    let mut keys = Vec::new();
    for raw in doc.keys {
        // One key fanout cannot read must not hide the others.
        let Ok(jwk) = serde_json::from_value::<Jwk>(raw) else {
            continue;
        };
        if matches!(jwk.common.public_key_use, Some(PublicKeyUse::Encryption)) {
            continue;
        }
        let alg = match (&jwk.common.key_algorithm, &jwk.algorithm) {
            (Some(KeyAlgorithm::RS256), AlgorithmParameters::RSA(_)) | (None, AlgorithmParameters::RSA(_)) => {
                Algorithm::RS256
            }
            (Some(KeyAlgorithm::ES256), AlgorithmParameters::EllipticCurve(p))
            | (None, AlgorithmParameters::EllipticCurve(p))
                if p.curve == EllipticCurve::P256 =>
            {
                Algorithm::ES256
            }
            (Some(KeyAlgorithm::EdDSA), AlgorithmParameters::OctetKeyPair(p))
            | (None, AlgorithmParameters::OctetKeyPair(p))
                if p.curve == EllipticCurve::Ed25519 =>
            {
                Algorithm::EdDSA
            }
            _ => continue,
        };
        let Ok(key) = DecodingKey::from_jwk(&jwk) else { continue };
        keys.push(Key {
            kid: jwk.common.key_id.clone(),
            alg,
            key,
        });
    }
    if keys.is_empty() {
        return Err(KeyError(
            "the JWKS document has no RS256, ES256 (P-256) or EdDSA (Ed25519) signing key".into(),
        ));
    }
    Ok(keys)
}

/// Verifies tokens against a set of keys. See the module docs.
#[derive(Clone)]
pub struct JwtVerifier {
    keys: Vec<Key>,
    /// Keys of a JWKS document, refreshed by the binary.
    jwks: Option<std::sync::Arc<JwksKeys>>,
    /// Opaque project keys (supabase-js's publishable keys are not JWTs):
    /// a connection that presents one runs as role `anon` until a join's
    /// `access_token` says who the user is.
    project_keys: Vec<Vec<u8>>,
    leeway_secs: u64,
    audience: Vec<String>,
    issuer: Vec<String>,
}

impl std::fmt::Debug for JwtVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let keys: Vec<_> = self.keys.iter().map(|k| (k.kid.as_deref(), k.alg)).collect();
        f.debug_struct("JwtVerifier")
            .field("keys", &keys)
            .field("jwks", &self.jwks)
            .field("project_keys", &self.project_keys.len())
            .field("leeway_secs", &self.leeway_secs)
            .field("audience", &self.audience)
            .field("issuer", &self.issuer)
            .finish()
    }
}

impl Default for JwtVerifier {
    /// No keys yet (every token is refused until one is added).
    fn default() -> Self {
        Self {
            keys: Vec::new(),
            jwks: None,
            project_keys: Vec::new(),
            leeway_secs: 0,
            audience: Vec::new(),
            issuer: Vec::new(),
        }
    }
}

impl JwtVerifier {
    /// A verifier for HS256 tokens signed with `secret`.
    pub fn hs256(secret: &[u8]) -> Self {
        Self::default().with_hs256(None, secret)
    }

    /// Adds an HS256 secret (with the key id tokens signed with it carry, if any).
    pub fn with_hs256(mut self, kid: Option<&str>, secret: &[u8]) -> Self {
        self.keys.push(Key {
            kid: kid.map(str::to_owned),
            alg: Algorithm::HS256,
            key: DecodingKey::from_secret(secret),
        });
        self
    }

    /// Also verifies with the keys of a JWKS document, whatever they are at
    /// the time of each check.
    pub fn with_jwks(mut self, jwks: std::sync::Arc<JwksKeys>) -> Self {
        self.jwks = Some(jwks);
        self
    }

    /// Adds an opaque project key (see [`Self::verify_apikey`]).
    pub fn with_project_key(mut self, key: &str) -> Self {
        self.project_keys.push(key.as_bytes().to_vec());
        self
    }

    /// Adds a PEM public key for `alg`.
    pub fn with_public_key(mut self, kid: Option<&str>, alg: PublicKeyAlg, pem: &[u8]) -> Result<Self, KeyError> {
        let (alg, key) = match alg {
            PublicKeyAlg::Rs256 => (Algorithm::RS256, DecodingKey::from_rsa_pem(pem)),
            PublicKeyAlg::Es256 => (Algorithm::ES256, DecodingKey::from_ec_pem(pem)),
            PublicKeyAlg::EdDsa => (Algorithm::EdDSA, DecodingKey::from_ed_pem(pem)),
        };
        let key = key.map_err(|e| KeyError(format!("not a {alg:?} public key in PEM: {e}")))?;
        self.keys.push(Key {
            kid: kid.map(str::to_owned),
            alg,
            key,
        });
        Ok(self)
    }

    /// Seconds of clock difference accepted on `exp` and `nbf`.
    pub fn with_leeway(mut self, secs: u64) -> Self {
        self.leeway_secs = secs;
        self
    }

    /// Accepted audiences: a token must name one of them in `aud`.
    pub fn with_audience(mut self, audience: Vec<String>) -> Self {
        self.audience = audience;
        self
    }

    /// Accepted issuers: a token's `iss` must be one of them.
    pub fn with_issuer(mut self, issuer: Vec<String>) -> Self {
        self.issuer = issuer;
        self
    }

    /// How many keys it holds.
    /// Token keys, project keys and a JWKS document (counted as one, since
    /// its keys change).
    pub fn key_count(&self) -> usize {
        self.keys.len() + self.project_keys.len() + usize::from(self.jwks.is_some())
    }

    fn validation(&self, alg: Algorithm) -> Validation {
        let mut v = Validation::new(alg);
        v.leeway = self.leeway_secs;
        v.validate_nbf = true;
        // A configured audience or issuer is required, not only checked when present.
        let mut required = vec!["exp"];
        if self.audience.is_empty() {
            v.validate_aud = false;
        } else {
            v.set_audience(&self.audience);
            required.push("aud");
        }
        if !self.issuer.is_empty() {
            v.set_issuer(&self.issuer);
            required.push("iss");
        }
        v.set_required_spec_claims(&required);
        v
    }

    /// Checks a connection's `apikey`: one of the opaque project keys
    /// (compared in constant time) runs as role `anon`; anything else must
    /// be a valid JWT.
    pub fn verify_apikey(&self, key: &str) -> Result<Claims, AuthError> {
        if self.is_project_key(key) {
            return Ok(Claims::anon());
        }
        self.verify(key)
    }

    /// Whether `key` is one of the opaque project keys.
    pub fn is_project_key(&self, key: &str) -> bool {
        // Every key is compared, whatever matched, so the time taken says
        // nothing about which bytes were right.
        self.project_keys
            .iter()
            .fold(false, |found, k| constant_time_eq(k, key.as_bytes()) | found)
    }

    /// Checks the signature (with the key the token's `kid` and algorithm
    /// select), expiry, `nbf`, audience and issuer; returns the claims.
    pub fn verify(&self, token: &str) -> Result<Claims, AuthError> {
        use jsonwebtoken::errors::ErrorKind;
        if token.is_empty() {
            return Err(AuthError::Missing);
        }
        let header = jsonwebtoken::decode_header(token).map_err(|e| AuthError::Malformed(e.to_string()))?;
        let jwks = self
            .jwks
            .as_ref()
            .map(|j| j.keys.read().unwrap_or_else(|e| e.into_inner()));
        let all = self.keys.iter().chain(jwks.iter().flat_map(|k| k.iter()));
        let by_kid: Vec<&Key> = match &header.kid {
            Some(kid) => {
                let keys: Vec<&Key> = all.filter(|k| k.kid.as_deref() == Some(kid)).collect();
                if keys.is_empty() {
                    if let Some(j) = &self.jwks {
                        j.unknown_kid.store(true, std::sync::atomic::Ordering::Release);
                    }
                    return Err(AuthError::UnknownKey(kid.clone()));
                }
                keys
            }
            None => all.collect(),
        };
        let candidates: Vec<&Key> = by_kid.into_iter().filter(|k| k.alg == header.alg).collect();
        if candidates.is_empty() {
            return Err(AuthError::Algorithm(format!("{:?}", header.alg)));
        }
        for key in candidates {
            match jsonwebtoken::decode::<Claims>(token, &key.key, &self.validation(key.alg)) {
                Ok(data) => return Ok(data.claims),
                // Another key of the same algorithm may be the one (rotation).
                Err(e) if matches!(e.kind(), ErrorKind::InvalidSignature) => continue,
                // The signature was good (it is checked first): the claims are not.
                Err(e) => {
                    return Err(match e.kind() {
                        ErrorKind::ExpiredSignature => AuthError::Expired,
                        ErrorKind::ImmatureSignature => AuthError::NotYetValid,
                        ErrorKind::InvalidAudience => AuthError::Audience,
                        ErrorKind::InvalidIssuer => AuthError::Issuer,
                        ErrorKind::MissingRequiredClaim(c) if c == "exp" => AuthError::MissingExp,
                        ErrorKind::MissingRequiredClaim(c) if c == "aud" => AuthError::Audience,
                        ErrorKind::MissingRequiredClaim(c) if c == "iss" => AuthError::Issuer,
                        _ => AuthError::Malformed(e.to_string()),
                    });
                }
            }
        }
        Err(AuthError::BadSignature)
    }
}

/// What a server-API key may do. `All` includes the admin operations
/// (disconnecting users); `Publish` and `Read` are for backends that need
/// only one side.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ApiScope {
    /// Publish and broadcast.
    Publish,
    /// History, presence, channels and cluster information.
    Read,
    /// Everything, including disconnect and unsubscribe.
    All,
}

impl ApiScope {
    /// Whether a key with this scope may call an operation that needs
    /// `needed`.
    pub fn allows(self, needed: ApiScope) -> bool {
        self == Self::All || self == needed
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Publish => "publish",
            Self::Read => "read",
            Self::All => "all",
        }
    }
}

/// The server API's keys: opaque secrets, each with its scope, separate
/// from client tokens. Written `KEY` (scope `all`) or `SCOPE:KEY` with
/// scope `publish`, `read` or `all`. Compared in constant time; never
/// printed (`Debug` shows only how many there are).
#[derive(Clone, Default, PartialEq, Eq)]
pub struct ApiKeys(Vec<(Vec<u8>, ApiScope)>);

impl std::fmt::Debug for ApiKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ApiKeys({} keys)", self.0.len())
    }
}

/// The shortest API key accepted: a guessable key is a hole.
pub const MIN_API_KEY_BYTES: usize = 16;

impl ApiKeys {
    /// Parses key entries (`KEY` or `SCOPE:KEY`). The error names the
    /// entry by position, never by its text.
    pub fn parse<'a>(entries: impl IntoIterator<Item = &'a str>) -> Result<Self, String> {
        let mut keys = Vec::new();
        for (i, entry) in entries.into_iter().enumerate() {
            let entry = entry.trim();
            let (scope, key) = match entry.split_once(':') {
                Some(("publish", key)) => (ApiScope::Publish, key),
                Some(("read", key)) => (ApiScope::Read, key),
                Some(("all", key)) => (ApiScope::All, key),
                _ => (ApiScope::All, entry),
            };
            if key.len() < MIN_API_KEY_BYTES {
                return Err(format!(
                    "API key #{} is shorter than {MIN_API_KEY_BYTES} characters",
                    i + 1
                ));
            }
            if !key.bytes().all(|b| b.is_ascii_graphic()) {
                return Err(format!(
                    "API key #{} has spaces or non-ASCII characters (an HTTP Bearer token cannot carry them)",
                    i + 1
                ));
            }
            keys.push((key.as_bytes().to_vec(), scope));
        }
        Ok(Self(keys))
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// The scope of `presented`, if it is one of the keys. Every key is
    /// compared, whatever matched, so the time taken says nothing about
    /// which key or bytes were right.
    pub fn scope_of(&self, presented: &str) -> Option<ApiScope> {
        self.0.iter().fold(None, |found, (key, scope)| {
            let hit = constant_time_eq(key, presented.as_bytes());
            if hit && found.is_none() { Some(*scope) } else { found }
        })
    }

    /// Both key sets together (config and a mounted file).
    pub fn extend(&mut self, other: ApiKeys) {
        self.0.extend(other.0);
    }
}

/// Equal bytes, in time that depends only on the lengths.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{EncodingKey, Header, encode};

    #[test]
    fn api_keys_and_scopes() {
        let keys = ApiKeys::parse([
            "0123456789abcdef-full",
            "publish:0123456789abcdef-pub",
            "read:0123456789abcdef-read",
        ])
        .unwrap();
        assert_eq!(keys.scope_of("0123456789abcdef-full"), Some(ApiScope::All));
        assert_eq!(keys.scope_of("0123456789abcdef-pub"), Some(ApiScope::Publish));
        assert_eq!(keys.scope_of("0123456789abcdef-read"), Some(ApiScope::Read));
        assert_eq!(keys.scope_of("0123456789abcdef-rea"), None);
        assert_eq!(keys.scope_of(""), None);
        assert_eq!(keys.scope_of("publish:0123456789abcdef-pub"), None);
        assert!(ApiScope::All.allows(ApiScope::Publish));
        assert!(ApiScope::Read.allows(ApiScope::Read));
        assert!(!ApiScope::Read.allows(ApiScope::Publish));
        assert!(!ApiScope::Publish.allows(ApiScope::All));
        let e = ApiKeys::parse(["0123456789abcdef-ok", "read:tiny-key"]).unwrap_err();
        assert!(e.contains("#2") && !e.contains("tiny-key"), "{e}");
        assert!(ApiKeys::parse(["0123456789abcdef with space"]).is_err());
        assert_eq!(format!("{keys:?}"), "ApiKeys(3 keys)");
    }
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

    const KEYS: [(&str, &str); 3] = [
        (
            include_str!("../testdata/keys/rsa.key"),
            include_str!("../testdata/keys/rsa.pub"),
        ),
        (
            include_str!("../testdata/keys/ec.key"),
            include_str!("../testdata/keys/ec.pub"),
        ),
        (
            include_str!("../testdata/keys/ed.key"),
            include_str!("../testdata/keys/ed.pub"),
        ),
    ];

    fn signed(alg: Algorithm, kid: Option<&str>, key: &EncodingKey, claims: serde_json::Value) -> String {
        let mut header = Header::new(alg);
        header.kid = kid.map(str::to_owned);
        encode(&header, &claims, key).unwrap()
    }

    fn private(i: usize) -> EncodingKey {
        let pem = KEYS[i].0.as_bytes();
        match i {
            0 => EncodingKey::from_rsa_pem(pem).unwrap(),
            1 => EncodingKey::from_ec_pem(pem).unwrap(),
            _ => EncodingKey::from_ed_pem(pem).unwrap(),
        }
    }

    fn all_keys() -> JwtVerifier {
        JwtVerifier::default()
            .with_hs256(None, b"old-secret")
            .with_hs256(None, b"new-secret")
            .with_public_key(Some("rsa-1"), PublicKeyAlg::Rs256, KEYS[0].1.as_bytes())
            .unwrap()
            .with_public_key(Some("ec-1"), PublicKeyAlg::Es256, KEYS[1].1.as_bytes())
            .unwrap()
            .with_public_key(Some("ed-1"), PublicKeyAlg::EdDsa, KEYS[2].1.as_bytes())
            .unwrap()
    }

    #[test]
    fn every_configured_key_verifies_its_own_tokens() {
        let v = all_keys();
        let claims = serde_json::json!({"sub": "u1", "exp": now() + 60});
        for secret in [&b"old-secret"[..], b"new-secret"] {
            let t = token(secret, claims.clone());
            assert_eq!(
                v.verify(&t).unwrap().sub.as_deref(),
                Some("u1"),
                "rotation: both secrets work"
            );
        }
        for (i, (alg, kid)) in [
            (Algorithm::RS256, "rsa-1"),
            (Algorithm::ES256, "ec-1"),
            (Algorithm::EdDSA, "ed-1"),
        ]
        .into_iter()
        .enumerate()
        {
            let t = signed(alg, Some(kid), &private(i), claims.clone());
            assert_eq!(v.verify(&t).unwrap().sub.as_deref(), Some("u1"), "{alg:?}");
            // Without a kid, every key of the algorithm is tried.
            let t = signed(alg, None, &private(i), claims.clone());
            assert!(v.verify(&t).is_ok(), "{alg:?} without kid");
        }
    }

    #[test]
    fn hostile_tokens_are_refused_by_name() {
        let v = all_keys();
        let claims = serde_json::json!({"sub": "u1", "exp": now() + 60});
        let check = |t: String, want: AuthError| assert_eq!(v.verify(&t), Err(want));
        check(
            signed(Algorithm::RS256, Some("nope"), &private(0), claims.clone()),
            AuthError::UnknownKey("nope".into()),
        );
        // The right key id, another algorithm: the key is bound to its own.
        check(
            signed(
                Algorithm::HS256,
                Some("rsa-1"),
                &EncodingKey::from_secret(KEYS[0].1.as_bytes()),
                claims.clone(),
            ),
            AuthError::Algorithm("HS256".into()),
        );
        // HS/RS confusion: an HMAC over the RSA public key, without a kid,
        // only meets the HS256 secrets, which it does not match.
        check(token(KEYS[0].1.as_bytes(), claims.clone()), AuthError::BadSignature);
        check(
            signed(
                Algorithm::ES256,
                Some("ec-1"),
                &private(1),
                serde_json::json!({"exp": now() - 5}),
            ),
            AuthError::Expired,
        );
        check(
            signed(
                Algorithm::ES256,
                Some("ec-1"),
                &private(1),
                serde_json::json!({"exp": now() + 60, "nbf": now() + 30}),
            ),
            AuthError::NotYetValid,
        );
        // A key of another kind under the same algorithm fails the signature.
        let other_ec = signed(Algorithm::ES256, Some("ed-1"), &private(1), claims.clone());
        check(other_ec, AuthError::Algorithm("ES256".into()));
        // alg none: no key accepts it (jsonwebtoken has no such algorithm).
        // {"alg":"none","typ":"JWT"} . {"sub":"u1","exp":9999999999} . (no signature)
        let none = "eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.eyJzdWIiOiJ1MSIsImV4cCI6OTk5OTk5OTk5OX0.";
        assert!(
            matches!(v.verify(none), Err(AuthError::Malformed(_))),
            "{:?}",
            v.verify(none)
        );
    }

    #[test]
    fn audience_issuer_and_leeway() {
        let v = JwtVerifier::hs256(b"s")
            .with_audience(vec!["fanout".into()])
            .with_issuer(vec!["https://auth.example".into()]);
        let ok = serde_json::json!({"exp": now() + 60, "aud": "fanout", "iss": "https://auth.example"});
        assert!(v.verify(&token(b"s", ok)).is_ok());
        let t = token(
            b"s",
            serde_json::json!({"exp": now() + 60, "aud": "other", "iss": "https://auth.example"}),
        );
        assert_eq!(v.verify(&t), Err(AuthError::Audience));
        let t = token(
            b"s",
            serde_json::json!({"exp": now() + 60, "iss": "https://auth.example"}),
        );
        assert_eq!(v.verify(&t), Err(AuthError::Audience), "aud required when configured");
        let t = token(
            b"s",
            serde_json::json!({"exp": now() + 60, "aud": "fanout", "iss": "https://evil"}),
        );
        assert_eq!(v.verify(&t), Err(AuthError::Issuer));
        let lenient = JwtVerifier::hs256(b"s").with_leeway(30);
        assert!(
            lenient
                .verify(&token(b"s", serde_json::json!({"exp": now() - 10})))
                .is_ok(),
            "within leeway"
        );
        assert_eq!(
            lenient.verify(&token(b"s", serde_json::json!({"exp": now() - 60}))),
            Err(AuthError::Expired)
        );
    }

    #[test]
    fn bad_keys_and_algorithms_are_named() {
        assert!(
            "HS512"
                .parse::<PublicKeyAlg>()
                .unwrap_err()
                .to_string()
                .contains("HS512")
        );
        let e = JwtVerifier::default()
            .with_public_key(None, PublicKeyAlg::Rs256, b"not a pem")
            .unwrap_err();
        assert!(e.to_string().contains("RS256"), "{e}");
    }

    #[test]
    fn an_opaque_project_key_runs_as_anon_and_is_not_a_token() {
        let v = JwtVerifier::hs256(b"s").with_project_key("sb_publishable_abc123");
        assert_eq!(v.verify_apikey("sb_publishable_abc123"), Ok(Claims::anon()));
        assert!(matches!(
            v.verify_apikey("sb_publishable_abc124"),
            Err(AuthError::Malformed(_))
        ));
        assert!(matches!(
            v.verify_apikey("sb_publishable_abc12"),
            Err(AuthError::Malformed(_))
        ));
        // A project key is never accepted where a user token is expected.
        assert!(v.verify("sb_publishable_abc123").is_err());
        let user = token(b"s", serde_json::json!({"exp": now() + 60, "sub": "u1"}));
        assert_eq!(v.verify_apikey(&user).unwrap().sub.as_deref(), Some("u1"));
        assert!(!format!("{v:?}").contains("abc123"), "keys are never printed");
        assert_eq!(v.key_count(), 2);
    }

    #[test]
    fn jwks_keys_verify_by_kid_and_rotate_without_touching_other_keys() {
        let jwks = std::sync::Arc::new(JwksKeys::default());
        // The encryption key, the HMAC key and nothing else are skipped.
        assert_eq!(jwks.replace(include_bytes!("../testdata/keys/jwks.json")), Ok(3));
        let v = JwtVerifier::hs256(b"s").with_jwks(jwks.clone());
        let claims = serde_json::json!({"sub": "u1", "exp": now() + 60});
        let es = signed(Algorithm::ES256, Some("ec-jwk"), &private(1), claims.clone());
        let ed = signed(Algorithm::EdDSA, Some("ed-jwk"), &private(2), claims.clone());
        let rs = signed(Algorithm::RS256, Some("rsa-jwk"), &private(0), claims.clone());
        for t in [&es, &ed, &rs] {
            assert_eq!(v.verify(t).unwrap().sub.as_deref(), Some("u1"));
        }
        // An HS256 token with the JWKS's `oct` key id is not checked against it.
        let hs = signed(
            Algorithm::HS256,
            Some("hmac"),
            &EncodingKey::from_secret(b"secret"),
            claims.clone(),
        );
        assert_eq!(v.verify(&hs), Err(AuthError::UnknownKey("hmac".into())));
        assert!(jwks.take_unknown_kid(), "an unknown kid asks for a refresh");
        assert!(!jwks.take_unknown_kid());

        // Rotation: the new document keeps only the EC key.
        assert_eq!(
            jwks.replace(include_bytes!("../testdata/keys/jwks-ec-only.json")),
            Ok(1)
        );
        assert!(v.verify(&es).is_ok());
        assert_eq!(v.verify(&rs), Err(AuthError::UnknownKey("rsa-jwk".into())));
        // A bad document changes nothing.
        assert!(jwks.replace(b"{\"keys\": []}").is_err());
        assert!(jwks.replace(b"not json").is_err());
        assert!(v.verify(&es).is_ok());
        // The HS256 secret still works beside the JWKS.
        assert!(v.verify(&token(b"s", claims)).is_ok());
    }
}
