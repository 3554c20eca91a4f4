//! The JWKS document behind `auth.jwks`: read from a file or fetched from an
//! `http://` or `https://` URL when the edge starts, then again every refresh interval,
//! and soon after a token names a key id no key has (a key was just
//! published). A refresh that fails keeps the keys the edge had, so a
//! document server's outage refuses no one who was accepted before it.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use fanout_core::auth::JwksKeys;
use http_body_util::{BodyExt, Empty, Limited};
use hyper::Uri;
use hyper_util::rt::TokioIo;
use tokio::time::Instant;
use tokio_rustls::rustls;
use tokio_util::sync::CancellationToken;

/// The largest JWKS document accepted.
const MAX_DOCUMENT_BYTES: usize = 1 << 20;
/// A fetch that takes longer than this fails.
const FETCH_TIMEOUT: Duration = Duration::from_secs(10);
/// Refreshes asked for by unknown key ids are at least this far apart, so
/// tokens with made-up key ids cannot make the edge hammer the document.
const MIN_EARLY_REFRESH_GAP: Duration = Duration::from_secs(5);

/// Where the document comes from.
#[derive(Debug, Clone)]
pub enum JwksSource {
    File(PathBuf),
    Http(Uri),
    /// An `https://` URL, with the roots its server's certificate must chain
    /// to.
    Https(Uri, Arc<rustls::ClientConfig>),
}

/// Two sources are the same when they name the same document (the TLS
/// set-up is derived from the configuration, not compared).
impl PartialEq for JwksSource {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (Self::File(a), Self::File(b)) => a == b,
            (Self::Http(a), Self::Http(b)) | (Self::Https(a, _), Self::Https(b, _)) => a == b,
            _ => false,
        }
    }
}

/// Why the document could not be had.
#[derive(Debug, thiserror::Error)]
pub enum JwksError {
    #[error("cannot read {0}: {1}")]
    File(String, std::io::Error),
    #[error("fetching {0}: {1}")]
    Fetch(String, String),
    #[error("{0}: HTTP {1}")]
    Status(String, u16),
    #[error("{0}: {1}")]
    Document(String, fanout_core::auth::KeyError),
}

impl JwksSource {
    /// An `http://` or `https://` URL, or a file path. An https server's
    /// certificate must chain to the system's roots (Debian's
    /// ca-certificates) or, when given, to the CA certificates in the PEM
    /// file `ca_file` (`auth.jwks_ca_file`, for a private CA).
    pub fn parse(s: &str, ca_file: Option<&Path>) -> Result<Self, String> {
        let url = |s: &str| -> Result<Uri, String> {
            let uri: Uri = s.parse().map_err(|e| format!("auth.jwks {s:?}: {e}"))?;
            if uri.host().is_none() {
                return Err(format!("auth.jwks {s:?}: no host"));
            }
            Ok(uri)
        };
        if s.starts_with("https://") {
            return Ok(Self::Https(url(s)?, Arc::new(tls_config(ca_file)?)));
        }
        if ca_file.is_some() {
            return Err("auth.jwks_ca_file is set but auth.jwks is not an https:// URL".into());
        }
        if s.starts_with("http://") {
            return Ok(Self::Http(url(s)?));
        }
        if s.is_empty() {
            return Err("auth.jwks is empty".into());
        }
        Ok(Self::File(PathBuf::from(s)))
    }

    fn name(&self) -> String {
        match self {
            Self::File(p) => p.display().to_string(),
            Self::Http(u) | Self::Https(u, _) => u.to_string(),
        }
    }

    /// The document's bytes.
    pub async fn fetch(&self) -> Result<Bytes, JwksError> {
        match self {
            Self::File(p) => tokio::fs::read(p)
                .await
                .map(Bytes::from)
                .map_err(|e| JwksError::File(p.display().to_string(), e)),
            Self::Http(uri) => within_timeout(uri, get(uri, None)).await,
            Self::Https(uri, tls) => within_timeout(uri, get(uri, Some(tls))).await,
        }
    }
}

async fn within_timeout(uri: &Uri, fetch: impl Future<Output = Result<Bytes, JwksError>>) -> Result<Bytes, JwksError> {
    tokio::time::timeout(FETCH_TIMEOUT, fetch).await.unwrap_or_else(|_| {
        Err(JwksError::Fetch(
            uri.to_string(),
            format!("no answer within {FETCH_TIMEOUT:?}"),
        ))
    })
}

/// The TLS client configuration for an https document: ring (the provider
/// async-nats already links), the system's roots and `ca_file`'s.
fn tls_config(ca_file: Option<&Path>) -> Result<rustls::ClientConfig, String> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    // Unreadable system certificates are skipped, as every TLS client does.
    let (_, _) = roots.add_parsable_certificates(rustls_native_certs::load_native_certs().certs);
    if let Some(path) = ca_file {
        let name = path.display();
        let certs = CertificateDer::pem_file_iter(path)
            .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
            .map_err(|e| format!("auth.jwks_ca_file {name}: {e}"))?;
        if certs.is_empty() {
            return Err(format!("auth.jwks_ca_file {name}: no CERTIFICATE in it"));
        }
        for cert in certs {
            roots.add(cert).map_err(|e| format!("auth.jwks_ca_file {name}: {e}"))?;
        }
    }
    if roots.is_empty() {
        return Err(
            "auth.jwks is an https:// URL but no CA certificate is trusted: install ca-certificates or set auth.jwks_ca_file"
                .into(),
        );
    }
    rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .map(|b| b.with_root_certificates(roots).with_no_client_auth())
        .map_err(|e| format!("TLS set-up: {e}"))
}

async fn get(uri: &Uri, tls: Option<&Arc<rustls::ClientConfig>>) -> Result<Bytes, JwksError> {
    let fail = |e: String| JwksError::Fetch(uri.to_string(), e);
    let host = uri.host().unwrap_or_default();
    let port = uri.port_u16().unwrap_or(if tls.is_some() { 443 } else { 80 });
    let stream = tokio::net::TcpStream::connect((host, port))
        .await
        .map_err(|e| fail(e.to_string()))?;
    match tls {
        None => request(uri, stream).await,
        Some(config) => {
            // An IP literal in brackets names an address, not a DNS name.
            let name = host.trim_start_matches('[').trim_end_matches(']');
            let server = rustls::pki_types::ServerName::try_from(name.to_owned())
                .map_err(|e| fail(format!("server name {name:?}: {e}")))?;
            let stream = tokio_rustls::TlsConnector::from(config.clone())
                .connect(server, stream)
                .await
                .map_err(|e| fail(format!("TLS: {e}")))?;
            request(uri, stream).await
        }
    }
}

/// One GET of `uri` over an open connection.
async fn request<S>(uri: &Uri, stream: S) -> Result<Bytes, JwksError>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static,
{
    let fail = |e: String| JwksError::Fetch(uri.to_string(), e);
    let host = uri.host().unwrap_or_default();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| fail(e.to_string()))?;
    let conn = tokio::spawn(conn);
    let path = uri.path_and_query().map_or("/", |p| p.as_str());
    let authority = uri.authority().map_or(host.to_owned(), |a| a.to_string());
    let req = hyper::Request::get(path)
        .header(hyper::header::HOST, authority)
        .header(hyper::header::ACCEPT, "application/json")
        .body(Empty::<Bytes>::new())
        .map_err(|e| fail(e.to_string()))?;
    let resp = sender.send_request(req).await.map_err(|e| fail(e.to_string()))?;
    if !resp.status().is_success() {
        conn.abort();
        return Err(JwksError::Status(uri.to_string(), resp.status().as_u16()));
    }
    let body = Limited::new(resp.into_body(), MAX_DOCUMENT_BYTES)
        .collect()
        .await
        .map_err(|e| fail(format!("reading the body: {e}")))?
        .to_bytes();
    conn.abort();
    Ok(body)
}

/// Fetches the document into `keys`; how many keys it has. On any error
/// `keys` keep what they had. Counted in `fanout_jwks_refreshes_total`.
pub async fn refresh(source: &JwksSource, keys: &JwksKeys) -> Result<usize, JwksError> {
    let result = match source.fetch().await {
        Ok(doc) => keys.replace(&doc).map_err(|e| JwksError::Document(source.name(), e)),
        Err(e) => Err(e),
    };
    let label = if result.is_ok() { "ok" } else { "error" };
    metrics::counter!("fanout_jwks_refreshes_total", "result" => label).increment(1);
    metrics::gauge!("fanout_jwks_keys").set(keys.len() as f64);
    result
}

/// Refreshes `keys` every `every`, and early (at most every few seconds)
/// after a token named an unknown key id, until `shutdown`.
pub async fn run_refresher(source: JwksSource, keys: Arc<JwksKeys>, every: Duration, shutdown: CancellationToken) {
    let mut last = Instant::now();
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(Duration::from_millis(250)) => {}
        }
        let due = last.elapsed() >= every;
        let early = last.elapsed() >= MIN_EARLY_REFRESH_GAP.min(every) && keys.take_unknown_kid();
        if !(due || early) {
            continue;
        }
        last = Instant::now();
        match refresh(&source, &keys).await {
            Ok(n) => tracing::debug!(keys = n, "JWKS refreshed"),
            Err(e) => tracing::warn!(error = %e, "JWKS refresh failed; keeping the keys from before"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sources() {
        assert!(matches!(
            JwksSource::parse("/etc/fanout/jwks.json", None),
            Ok(JwksSource::File(p)) if p == Path::new("/etc/fanout/jwks.json")
        ));
        assert!(matches!(
            JwksSource::parse("http://auth:9999/.well-known/jwks.json", None),
            Ok(JwksSource::Http(_))
        ));
        assert!(matches!(
            JwksSource::parse("https://auth/jwks.json", Some(&tls_file("ca.pem"))),
            Ok(JwksSource::Https(..))
        ));
        assert!(JwksSource::parse("", None).is_err());
        assert!(JwksSource::parse("http://", None).is_err());
        let e = JwksSource::parse("http://auth/jwks.json", Some(&tls_file("ca.pem"))).unwrap_err();
        assert!(e.contains("not an https:// URL"), "{e}");
        let e = JwksSource::parse("https://auth/jwks.json", Some(&tls_file("missing.pem"))).unwrap_err();
        assert!(e.contains("missing.pem"), "{e}");
        let e = JwksSource::parse("https://auth/jwks.json", Some(&tls_file("server.key"))).unwrap_err();
        assert!(e.contains("no CERTIFICATE"), "{e}");
    }

    fn tls_file(name: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata/tls").join(name)
    }

    #[tokio::test]
    async fn a_failed_refresh_keeps_the_keys() {
        let dir = std::env::temp_dir().join(format!("fanout-jwks-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("jwks.json");
        let doc = include_bytes!("../../fanout-core/testdata/keys/jwks-ec-only.json");
        std::fs::write(&path, doc).unwrap();
        let keys = JwksKeys::default();
        let source = JwksSource::File(path.clone());
        assert_eq!(refresh(&source, &keys).await.unwrap(), 1);
        std::fs::write(&path, b"{\"keys\": \"broken\"}").unwrap();
        assert!(matches!(refresh(&source, &keys).await, Err(JwksError::Document(..))));
        std::fs::remove_file(&path).unwrap();
        assert!(matches!(refresh(&source, &keys).await, Err(JwksError::File(..))));
        assert_eq!(keys.len(), 1, "the keys from before stay");
        let _ = std::fs::remove_dir(&dir);
    }
}
