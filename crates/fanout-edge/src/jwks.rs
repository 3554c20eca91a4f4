//! The JWKS document behind `auth.jwks`: read from a file or fetched from an
//! `http://` URL when the edge starts, then again every refresh interval,
//! and soon after a token names a key id no key has (a key was just
//! published). A refresh that fails keeps the keys the edge had, so a
//! document server's outage refuses no one who was accepted before it.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use fanout_core::auth::JwksKeys;
use http_body_util::{BodyExt, Empty, Limited};
use hyper::Uri;
use hyper_util::rt::TokioIo;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// The largest JWKS document accepted.
const MAX_DOCUMENT_BYTES: usize = 1 << 20;
/// A fetch that takes longer than this fails.
const FETCH_TIMEOUT: Duration = Duration::from_secs(10);
/// Refreshes asked for by unknown key ids are at least this far apart, so
/// tokens with made-up key ids cannot make the edge hammer the document.
const MIN_EARLY_REFRESH_GAP: Duration = Duration::from_secs(5);

/// Where the document comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JwksSource {
    File(PathBuf),
    Http(Uri),
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
    /// An `http://` URL, or a file path. `https://` is refused (fetch it
    /// into a file, or serve it over http inside the cluster).
    pub fn parse(s: &str) -> Result<Self, String> {
        if s.starts_with("https://") {
            return Err(format!(
                "auth.jwks {s:?}: https URLs are not supported yet; mount the document as a file \
                 (refreshed by a sidecar) or serve it over http inside the cluster"
            ));
        }
        if s.starts_with("http://") {
            let uri: Uri = s.parse().map_err(|e| format!("auth.jwks {s:?}: {e}"))?;
            if uri.host().is_none() {
                return Err(format!("auth.jwks {s:?}: no host"));
            }
            return Ok(Self::Http(uri));
        }
        if s.is_empty() {
            return Err("auth.jwks is empty".into());
        }
        Ok(Self::File(PathBuf::from(s)))
    }

    fn name(&self) -> String {
        match self {
            Self::File(p) => p.display().to_string(),
            Self::Http(u) => u.to_string(),
        }
    }

    /// The document's bytes.
    pub async fn fetch(&self) -> Result<Bytes, JwksError> {
        match self {
            Self::File(p) => tokio::fs::read(p)
                .await
                .map(Bytes::from)
                .map_err(|e| JwksError::File(p.display().to_string(), e)),
            Self::Http(uri) => match tokio::time::timeout(FETCH_TIMEOUT, get(uri)).await {
                Ok(r) => r,
                Err(_) => Err(JwksError::Fetch(
                    uri.to_string(),
                    format!("no answer within {FETCH_TIMEOUT:?}"),
                )),
            },
        }
    }
}

async fn get(uri: &Uri) -> Result<Bytes, JwksError> {
    let fail = |e: String| JwksError::Fetch(uri.to_string(), e);
    let host = uri.host().unwrap_or_default();
    let port = uri.port_u16().unwrap_or(80);
    let stream = tokio::net::TcpStream::connect((host, port))
        .await
        .map_err(|e| fail(e.to_string()))?;
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
        assert_eq!(
            JwksSource::parse("/etc/fanout/jwks.json"),
            Ok(JwksSource::File("/etc/fanout/jwks.json".into()))
        );
        assert!(matches!(
            JwksSource::parse("http://auth:9999/.well-known/jwks.json"),
            Ok(JwksSource::Http(_))
        ));
        assert!(
            JwksSource::parse("https://x/jwks.json")
                .unwrap_err()
                .contains("not supported")
        );
        assert!(JwksSource::parse("").is_err());
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
