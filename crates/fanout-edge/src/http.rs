//! The two HTTP listeners.
//!
//! Public: `GET /realtime/v1/websocket` (the WebSocket endpoint),
//! `GET /socket.io/` (Socket.IO clients over WebSocket), `GET
//! /rooms/<room>` (plain WebSocket room clients),
//! `POST /realtime/v1/api/broadcast` (realtime-js's REST fallback), the demo
//! page at `/` with its client module `/fanout.js`, and `/healthz`.
//!
//! Admin: `/metrics` (Prometheus text), `/healthz` (alive), `/readyz`
//! (ready for traffic) and `/admin`, the operator's page over the server
//! API. It binds separately so metrics are never exposed
//! through a public ingress.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use fanout_core::{ChannelName, Event};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use metrics_exporter_prometheus::PrometheusHandle;
use serde::Deserialize;
use serde_json::value::RawValue;
use tokio::net::{TcpListener, TcpStream};

use crate::Edge;
use crate::protocol::Vsn;

type Body = Full<Bytes>;

const INDEX_HTML: &str = include_str!("../assets/index.html");
const FANOUT_JS: &str = include_str!("../assets/fanout.js");
const ADMIN_HTML: &str = include_str!("../assets/admin.html");

/// Serves both listeners until the edge's shutdown token is cancelled, then
/// waits (up to `grace`) for every connection and channel task to finish.
pub async fn serve(edge: Arc<Edge>, public: TcpListener, admin: TcpListener, grace: Duration) {
    let public_loop = accept_loop(edge.clone(), public, Listener::Public);
    let admin_loop = accept_loop(edge.clone(), admin, Listener::Admin);
    tokio::join!(public_loop, admin_loop);
    edge.tasks.close();
    if tokio::time::timeout(grace, edge.tasks.wait()).await.is_err() {
        tracing::warn!(
            remaining = edge.tasks.len(),
            "shutdown grace period over; tasks left running"
        );
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Listener {
    Public,
    Admin,
}

async fn accept_loop(edge: Arc<Edge>, listener: TcpListener, which: Listener) {
    loop {
        let (stream, peer) = tokio::select! {
            () = edge.shutdown.cancelled() => break,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    metrics::counter!("fanout_accept_errors_total").increment(1);
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let edge2 = edge.clone();
        edge.tasks.spawn(serve_http(edge2, stream, peer, which));
    }
}

async fn serve_http(edge: Arc<Edge>, stream: TcpStream, peer: SocketAddr, which: Listener) {
    let io = TokioIo::new(stream);
    let svc_edge = edge.clone();
    let service = hyper::service::service_fn(move |req| {
        let edge = svc_edge.clone();
        async move {
            Ok::<_, Infallible>(match which {
                Listener::Public => public_route(edge, req, peer).await,
                Listener::Admin => admin_route(&edge, &req),
            })
        }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(edge.config.limits.handshake_timeout)
        .serve_connection(io, service)
        .with_upgrades();
    tokio::pin!(conn);
    tokio::select! {
        r = conn.as_mut() => {
            if let Err(e) = r {
                if e.is_timeout() {
                    metrics::counter!("fanout_handshake_timeouts_total").increment(1);
                }
                tracing::debug!(error = %e, "http connection error");
            }
        }
        () = edge.shutdown.cancelled() => {
            conn.as_mut().graceful_shutdown();
            let _ = tokio::time::timeout(Duration::from_secs(5), conn).await;
        }
    }
}

fn response(status: StatusCode, content_type: &'static str, body: impl Into<Bytes>) -> Response<Body> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    r
}

/// `{"error": reason}` with `status`, the shape realtime-js and Supabase use.
fn json_error(status: StatusCode, reason: &str) -> Response<Body> {
    let body = serde_json::json!({ "error": reason }).to_string();
    response(status, "application/json", body)
}

fn admin_route(edge: &Edge, req: &Request<Incoming>) -> Response<Body> {
    if req.method() == Method::GET && req.uri().path() == "/admin" {
        return admin_page(edge.config.api_port);
    }
    admin_response(edge.metrics.as_ref(), edge.is_ready(), req)
}

/// The operator's page: plain HTML and JS that ask for an API key and then
/// call the server API on `api_port` of the same host.
fn admin_page(api_port: Option<u16>) -> Response<Body> {
    match api_port {
        Some(port) => {
            let mut r = response(
                StatusCode::OK,
                "text/html; charset=utf-8",
                ADMIN_HTML.replace("{{API_PORT}}", &port.to_string()),
            );
            r.headers_mut()
                .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
            r
        }
        None => json_error(
            StatusCode::NOT_FOUND,
            "the operator's page needs the server API: set API keys (FANOUT_API_KEYS or api.keys_file)",
        ),
    }
}

/// `/metrics`, `/healthz` and `/readyz`, for any role.
fn admin_response(metrics: Option<&PrometheusHandle>, ready: bool, req: &Request<Incoming>) -> Response<Body> {
    match (req.method(), req.uri().path()) {
        (&Method::GET, "/metrics") => match metrics {
            Some(h) => response(StatusCode::OK, "text/plain; version=0.0.4", h.render()),
            None => json_error(StatusCode::NOT_FOUND, "metrics recorder not installed"),
        },
        (&Method::GET, "/healthz") => response(StatusCode::OK, "text/plain", "ok\n"),
        (&Method::GET, "/readyz") => {
            if ready {
                response(StatusCode::OK, "text/plain", "ready\n")
            } else {
                response(StatusCode::SERVICE_UNAVAILABLE, "text/plain", "not ready\n")
            }
        }
        _ => json_error(StatusCode::NOT_FOUND, "not found"),
    }
}

/// Serves only the admin endpoints, for roles without client sockets (the
/// presence role), until `shutdown`.
pub async fn serve_admin(
    listener: TcpListener,
    metrics: Option<PrometheusHandle>,
    ready: Arc<dyn Fn() -> bool + Send + Sync>,
    shutdown: tokio_util::sync::CancellationToken,
) {
    loop {
        let stream = tokio::select! {
            () = shutdown.cancelled() => break,
            r = listener.accept() => match r {
                Ok((s, _)) => s,
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let (metrics, ready) = (metrics.clone(), ready.clone());
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let r = admin_response(metrics.as_ref(), ready(), &req);
                async move { Ok::<_, Infallible>(r) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

async fn public_route(edge: Arc<Edge>, req: Request<Incoming>, peer: SocketAddr) -> Response<Body> {
    let path = req.uri().path().to_owned();
    match (req.method().clone(), path.as_str()) {
        (Method::GET, "/realtime/v1/websocket" | "/realtime/v1/websocket/") => websocket(edge, req, peer),
        (Method::GET | Method::POST, "/socket.io/" | "/socket.io") => socketio(edge, req, peer).await,
        (Method::GET, p) if p.starts_with("/rooms/") => room(edge, req, peer),
        (Method::POST, "/realtime/v1/api/broadcast") => with_cors(rest_broadcast(edge, req).await),
        (Method::POST, p) if p.starts_with("/realtime/v1/api/broadcast/") => with_cors(rest_send(edge, req).await),
        (Method::OPTIONS, p) if p.starts_with("/realtime/v1/api/broadcast") => {
            with_cors(response(StatusCode::NO_CONTENT, "text/plain", ""))
        }
        (Method::GET, "/" | "/index.html") => response(StatusCode::OK, "text/html; charset=utf-8", INDEX_HTML),
        (Method::GET, "/fanout.js") => response(StatusCode::OK, "text/javascript; charset=utf-8", FANOUT_JS),
        (Method::GET, "/healthz") => response(StatusCode::OK, "text/plain", "ok\n"),
        _ => json_error(StatusCode::NOT_FOUND, "not found"),
    }
}

fn with_cors(mut r: Response<Body>) -> Response<Body> {
    let h = r.headers_mut();
    h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, HeaderValue::from_static("*"));
    h.insert(
        header::ACCESS_CONTROL_ALLOW_METHODS,
        HeaderValue::from_static("POST, OPTIONS"),
    );
    h.insert(
        header::ACCESS_CONTROL_ALLOW_HEADERS,
        HeaderValue::from_static("authorization, apikey, content-type, x-client-info"),
    );
    r
}

fn query_param<'a>(query: &'a str, name: &str) -> Option<std::borrow::Cow<'a, str>> {
    query.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        (k == name).then(|| percent_decode(v))
    })
}

fn percent_decode(s: &str) -> std::borrow::Cow<'_, str> {
    if !s.contains(['%', '+']) {
        return std::borrow::Cow::Borrowed(s);
    }
    let hex = |b: u8| char::from(b).to_digit(16).map(|d| d as u8);
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' => match (
                bytes.get(i + 1).copied().and_then(hex),
                bytes.get(i + 2).copied().and_then(hex),
            ) {
                (Some(h), Some(l)) => {
                    out.push(h << 4 | l);
                    i += 2;
                }
                _ => out.push(b'%'),
            },
            b => out.push(b),
        }
        i += 1;
    }
    std::borrow::Cow::Owned(String::from_utf8_lossy(&out).into_owned())
}

/// The request's `apikey` (query parameter or header) and its
/// `Authorization: Bearer` token.
fn request_keys<'a>(
    req: &'a Request<Incoming>,
    query: &'a str,
) -> (Option<std::borrow::Cow<'a, str>>, Option<&'a str>) {
    let apikey = query_param(query, "apikey").or_else(|| {
        req.headers()
            .get("apikey")
            .and_then(|v| v.to_str().ok())
            .map(Into::into)
    });
    let bearer = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer ")));
    (apikey, bearer)
}

/// Checks the request's credentials when auth is on: a user token in
/// `Authorization` (supabase-js sends the session's there) wins; otherwise
/// the `apikey`, a JWT or an opaque project key (role `anon`).
fn authenticate(
    edge: &Edge,
    req: &Request<Incoming>,
    query: &str,
) -> Result<Option<fanout_core::Claims>, fanout_core::AuthError> {
    let Some(verifier) = &edge.config.auth else {
        return Ok(None);
    };
    match request_keys(req, query) {
        (_, Some(bearer)) if !verifier.is_project_key(bearer) => verifier.verify(bearer).map(Some),
        (Some(apikey), _) => verifier.verify_apikey(&apikey).map(Some),
        (None, Some(bearer)) => verifier.verify_apikey(bearer).map(Some),
        (None, None) => Err(fanout_core::AuthError::Missing),
    }
}

/// Why a REST broadcast is refused under the channel policies, if it is;
/// stamps the sender when configured ([`Edge::stamp_sender`]).
fn refuse_write(edge: &Edge, ev: &mut Event, claims: Option<&fanout_core::Claims>) -> Option<String> {
    edge.config.auth.as_ref()?;
    let policy = &edge.config.policy;
    let value = claims.map_or(serde_json::Value::Null, fanout_core::Claims::to_value);
    if !policy
        .channel_access(
            ev.channel.name(),
            ev.channel.is_private(),
            &value,
            &*edge.config.members,
        )
        .write
    {
        return Some(format!(
            "not allowed to broadcast on {}: no policy grants it to this token",
            ev.channel
        ));
    }
    edge.stamp_sender(ev, claims.and_then(|c| c.sub.as_deref())).err()
}

fn forbidden(reason: &str) -> Response<Body> {
    metrics::counter!("fanout_client_errors_total", "reason" => "forbidden").increment(1);
    json_error(StatusCode::FORBIDDEN, reason)
}

fn unauthorized(e: fanout_core::AuthError) -> Response<Body> {
    metrics::counter!("fanout_handshake_rejections_total", "reason" => "unauthorized").increment(1);
    json_error(StatusCode::UNAUTHORIZED, &format!("unauthorized: {e}"))
}

/// The client's address: the configured proxy header's first address, or
/// the TCP peer.
fn client_ip(edge: &Edge, req: &Request<Incoming>, peer: SocketAddr) -> std::net::IpAddr {
    edge.config
        .limits
        .client_ip_header
        .as_deref()
        .and_then(|h| req.headers().get(h))
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(',').next())
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| peer.ip())
}

fn refused(r: &crate::admission::Refusal) -> Response<Body> {
    metrics::counter!("fanout_handshake_rejections_total", "reason" => r.label()).increment(1);
    json_error(r.status(), &r.to_string())
}

fn websocket(edge: Arc<Edge>, req: Request<Incoming>, peer: SocketAddr) -> Response<Body> {
    let query = req.uri().query().unwrap_or("").to_owned();
    let Some(vsn) = Vsn::parse(query_param(&query, "vsn").as_deref()) else {
        metrics::counter!("fanout_handshake_rejections_total", "reason" => "bad_request").increment(1);
        return json_error(StatusCode::BAD_REQUEST, "unsupported vsn: use 1.0.0 or 2.0.0");
    };
    if let Err(r) = check_upgrade(&edge, &req) {
        return r;
    }
    let claims = match authenticate(&edge, &req, &query) {
        Ok(c) => c,
        Err(e) => return unauthorized(e),
    };
    let sub = claims.as_ref().and_then(|c| c.sub.clone());
    upgrade(edge, req, peer, sub.as_deref(), move |edge, parts| {
        crate::conn::serve(edge, parts, vsn, claims)
    })
}

/// `/socket.io/?EIO=4&transport=…`: an Engine.IO v4 session over
/// WebSocket, or over HTTP long-polling (GET opens and polls, POST sends)
/// until the client upgrades it (`transport=websocket&sid=…`). Its
/// namespaces authenticate in their CONNECT packets.
async fn socketio(edge: Arc<Edge>, req: Request<Incoming>, peer: SocketAddr) -> Response<Body> {
    let query = req.uri().query().unwrap_or("").to_owned();
    // Socket.IO's own error bodies: {code, message}.
    let refuse = |code: u8, message: &str| {
        metrics::counter!("fanout_handshake_rejections_total", "reason" => "bad_request").increment(1);
        let body = serde_json::json!({ "code": code, "message": message }).to_string();
        response(StatusCode::BAD_REQUEST, "application/json", body)
    };
    if query_param(&query, "EIO").as_deref() != Some("4") {
        return refuse(
            5,
            "Unsupported protocol version: this server speaks Engine.IO 4 (socket.io-client 3 and 4)",
        );
    }
    let transport = query_param(&query, "transport").map(std::borrow::Cow::into_owned);
    let session = match query_param(&query, "sid") {
        Some(sid) => match edge.polling.get(&sid) {
            Some(s) => Some(s),
            None => {
                return refuse(
                    1,
                    "Session ID unknown (polling sessions live on the edge that opened them)",
                );
            }
        },
        None => None,
    };
    let text = |body: String| response(StatusCode::OK, "text/plain; charset=UTF-8", body);
    match (transport.as_deref(), session, req.method().clone()) {
        (Some("websocket"), None, Method::GET) => {
            if let Err(r) = check_upgrade(&edge, &req) {
                return r;
            }
            upgrade(edge, req, peer, None, crate::sio::serve)
        }
        (Some("websocket"), Some(session), Method::GET) => {
            if let Err(r) = check_upgrade(&edge, &req) {
                return r;
            }
            // The session already holds its connection slot.
            spawn_upgraded(edge, req, move |edge, read, write, leftover| {
                crate::sio::polling::upgrade(edge, session, read, write, leftover)
            })
        }
        (Some("polling"), None, Method::GET) => {
            if let Err(r) = check_ready_and_origin(&edge, &req) {
                return r;
            }
            let ip = client_ip(&edge, &req, peer);
            match edge.admit(Some(ip), None) {
                Ok(slot) => text(crate::sio::polling::open(edge, slot).await),
                Err(r) => refused(&r),
            }
        }
        (Some("polling"), Some(session), Method::GET) => match session.poll().await {
            Some(body) => text(body),
            None => refuse(3, "Bad request: a GET is already waiting on this session"),
        },
        (Some("polling"), Some(session), Method::POST) => {
            let limit = edge.config.limits.max_frame_bytes;
            let body = match Limited::new(req.into_body(), limit).collect().await {
                Ok(b) => b.to_bytes(),
                Err(_) => {
                    return refuse(
                        3,
                        &format!("Bad request: a POST body is at most {limit} bytes (maxPayload)"),
                    );
                }
            };
            match session.post(&body).await {
                Ok(()) => text("ok".to_owned()),
                Err(reason) => refuse(3, &format!("Bad request: {reason}")),
            }
        }
        (Some("websocket" | "polling"), ..) => refuse(3, "Bad request: wrong method or a missing sid"),
        _ => refuse(0, "Transport unknown: use polling or websocket"),
    }
}

/// `GET /rooms/<room>?token=…&sessionId=…[&private=true]`: a plain
/// WebSocket room client. Without a token in the URL (or `apikey` /
/// `Authorization`), the first message must bring it.
fn room(edge: Arc<Edge>, req: Request<Incoming>, peer: SocketAddr) -> Response<Body> {
    let query = req.uri().query().unwrap_or("").to_owned();
    let raw = req.uri().path().trim_start_matches("/rooms/").to_owned();
    let name = percent_decode(&raw).into_owned();
    let private = query_param(&query, "private").as_deref() == Some("true");
    let channel = match ChannelName::new(&name) {
        Ok(c) => c.with_privacy(private),
        Err(e) => {
            metrics::counter!("fanout_handshake_rejections_total", "reason" => "bad_request").increment(1);
            return json_error(StatusCode::BAD_REQUEST, &format!("invalid room {name:?}: {e}"));
        }
    };
    if let Err(r) = check_upgrade(&edge, &req) {
        return r;
    }
    let token = query_param(&query, "token").map(std::borrow::Cow::into_owned);
    let (claims, await_auth) = match (&edge.config.auth, token) {
        (None, _) => (None, false),
        (Some(verifier), Some(token)) => {
            let claims = verifier.verify_apikey(&token);
            match claims {
                Ok(c) => (Some(c), false),
                Err(e) => return unauthorized(e),
            }
        }
        (Some(_), None) => match authenticate(&edge, &req, &query) {
            Ok(c) => (c, false),
            Err(fanout_core::AuthError::Missing) => (None, true),
            Err(e) => return unauthorized(e),
        },
    };
    let client = crate::room::RoomClient {
        channel,
        session: query_param(&query, "sessionId")
            .map(std::borrow::Cow::into_owned)
            .filter(|s| !s.is_empty() && s.len() <= 128)
            .unwrap_or_else(|| uuid::Uuid::new_v4().simple().to_string()),
        dev_user: query_param(&query, "user").map(std::borrow::Cow::into_owned),
        sub: claims.as_ref().and_then(|c| c.sub.clone()),
        claims,
        await_auth,
    };
    let sub = client.sub.clone();
    upgrade(edge, req, peer, sub.as_deref(), move |edge, parts| {
        crate::room::serve(edge, parts, client)
    })
}

/// What every WebSocket front checks before it upgrades: an upgrade
/// request, a node that takes traffic, an allowed `Origin`.
#[allow(clippy::result_large_err)]
fn check_upgrade(edge: &Edge, req: &Request<Incoming>) -> Result<(), Response<Body>> {
    if !fastwebsockets::upgrade::is_upgrade_request(req) {
        return Err(json_error(
            StatusCode::BAD_REQUEST,
            "expected a WebSocket upgrade request",
        ));
    }
    check_ready_and_origin(edge, req)
}

/// A node that takes traffic and an allowed `Origin`.
#[allow(clippy::result_large_err)]
fn check_ready_and_origin(edge: &Edge, req: &Request<Incoming>) -> Result<(), Response<Body>> {
    if !edge.is_ready() {
        metrics::counter!("fanout_handshake_rejections_total", "reason" => "draining").increment(1);
        return Err(json_error(
            StatusCode::SERVICE_UNAVAILABLE,
            "server is draining; connect to another node",
        ));
    }
    let origin = req.headers().get(header::ORIGIN).and_then(|v| v.to_str().ok());
    edge.admission.check_origin(origin).map_err(|r| refused(&r))
}

/// Admits the client (connection limits, as `sub` when known) and
/// upgrades; `serve` then runs the connection over the TCP stream's halves
/// and the bytes read past the handshake.
fn upgrade<F, Fut>(
    edge: Arc<Edge>,
    req: Request<Incoming>,
    peer: SocketAddr,
    sub: Option<&str>,
    serve: F,
) -> Response<Body>
where
    F: FnOnce(Arc<Edge>, crate::conn::SocketParts<tokio::net::tcp::OwnedReadHalf>) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let ip = client_ip(&edge, &req, peer);
    let slot = match edge.admit(Some(ip), sub) {
        Ok(slot) => slot,
        Err(r) => return refused(&r),
    };
    // Dropping the slot (a failed upgrade) gives it back.
    spawn_upgraded(edge, req, move |edge, read, write, leftover| {
        let parts = crate::conn::SocketParts {
            read,
            write: Box::new(write),
            leftover,
            slot,
        };
        serve(edge, parts)
    })
}

/// Answers the WebSocket handshake and runs `serve` on the upgraded TCP
/// stream's halves once the client has it.
fn spawn_upgraded<F, Fut>(edge: Arc<Edge>, mut req: Request<Incoming>, serve: F) -> Response<Body>
where
    F: FnOnce(Arc<Edge>, tokio::net::tcp::OwnedReadHalf, tokio::net::tcp::OwnedWriteHalf, Bytes) -> Fut
        + Send
        + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (resp, upgrade) = match fastwebsockets::upgrade::upgrade(&mut req) {
        Ok(x) => x,
        Err(e) => {
            return json_error(StatusCode::BAD_REQUEST, &format!("bad WebSocket handshake: {e}"));
        }
    };
    let edge2 = edge.clone();
    // This task lives as long as the connection, and a future keeps what it
    // captured for its whole life: `serve` (which holds the connection's
    // claims and admission slot until it is called) goes in boxed, and the
    // upgrade's own state lives in `upgraded_halves`, which is done before
    // the connection is served.
    let serve = Box::new(serve);
    edge.tasks.spawn(async move {
        if let Some((read, write, leftover)) = upgraded_halves(upgrade).await {
            serve(edge2, read, write, leftover).await;
        }
    });
    let (parts, _) = resp.into_parts();
    Response::from_parts(parts, Full::new(Bytes::new()))
}

/// The TCP halves of an upgraded connection, and the bytes hyper had read
/// past the handshake.
async fn upgraded_halves(
    upgrade: fastwebsockets::upgrade::UpgradeFut,
) -> Option<(tokio::net::tcp::OwnedReadHalf, tokio::net::tcp::OwnedWriteHalf, Bytes)> {
    let upgraded = match upgrade.await {
        Ok(ws) => ws.into_inner().into_inner(),
        Err(e) => {
            tracing::debug!(error = %e, "upgrade failed");
            return None;
        }
    };
    match upgraded.downcast::<TokioIo<TcpStream>>() {
        Ok(parts) => {
            let stream = parts.io.into_inner();
            let _ = stream.set_nodelay(true);
            let (read, write) = stream.into_split();
            Some((read, write, parts.read_buf))
        }
        Err(_) => {
            tracing::error!("upgraded connection is not a TCP stream");
            None
        }
    }
}

#[derive(Deserialize)]
struct RestBroadcast<'a> {
    #[serde(borrow)]
    messages: Vec<RestMessage<'a>>,
}

#[derive(Deserialize)]
struct RestMessage<'a> {
    topic: String,
    event: String,
    #[serde(borrow, default)]
    payload: Option<&'a RawValue>,
    #[serde(default)]
    private: bool,
}

/// Why a REST broadcast body was refused (the 400 response's `error`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum RestBodyError {
    #[error("invalid body: {0}; expected {{\"messages\": [{{\"topic\", \"event\", \"payload\"}}]}}")]
    Json(String),
    #[error("messages[{index}].topic: {error}")]
    Topic {
        index: usize,
        error: fanout_core::ChannelError,
    },
    #[error("messages[{0}].event must be 1 to 255 bytes")]
    Event(usize),
}

/// The events of a REST broadcast body, `{messages: [{topic, event,
/// payload, private}]}`, all checked before any is published. No I/O, so
/// the fuzz targets call it directly.
pub(crate) fn parse_rest_broadcast(body: &[u8]) -> Result<Vec<Event>, RestBodyError> {
    let parsed: RestBroadcast<'_> = serde_json::from_slice(body).map_err(|e| RestBodyError::Json(e.to_string()))?;
    let mut events = Vec::with_capacity(parsed.messages.len());
    for (index, m) in parsed.messages.iter().enumerate() {
        // A private channel is a namespace apart from the public one.
        let channel = ChannelName::from_name_or_topic(&m.topic)
            .map(|c| c.with_privacy(m.private))
            .map_err(|error| RestBodyError::Topic { index, error })?;
        if m.event.is_empty() || m.event.len() > 255 {
            return Err(RestBodyError::Event(index));
        }
        let payload = m.payload.map_or_else(
            || Bytes::from_static(b"{}"),
            |p| Bytes::copy_from_slice(p.get().as_bytes()),
        );
        events.push(Event::broadcast(channel, &m.event, payload, false, None));
    }
    Ok(events)
}

/// `POST /realtime/v1/api/broadcast` `{messages: [{topic, event, payload}]}`
/// → 202 once every message is on the bus.
async fn rest_broadcast(edge: Arc<Edge>, req: Request<Incoming>) -> Response<Body> {
    let query = req.uri().query().unwrap_or("").to_owned();
    let claims = match authenticate(&edge, &req, &query) {
        Ok(c) => c,
        Err(e) => return unauthorized(e),
    };
    let Some(body) = read_body(&edge, req.into_body()).await else {
        return too_large(&edge);
    };
    let events = match parse_rest_broadcast(&body) {
        Ok(events) => events,
        Err(e) => return json_error(StatusCode::BAD_REQUEST, &e.to_string()),
    };
    let mut events = events;
    for (i, ev) in events.iter_mut().enumerate() {
        if let Some(reason) = refuse_write(&edge, ev, claims.as_ref()) {
            return forbidden(&format!("messages[{i}]: {reason}"));
        }
    }
    publish_rest(&edge, events).await
}

/// `POST /realtime/v1/api/broadcast/<channel>/events/<event>` with the
/// payload as the body (JSON, or raw bytes as `application/octet-stream`):
/// realtime-js's `channel.httpSend()`. 202 once it is on the bus.
async fn rest_send(edge: Arc<Edge>, req: Request<Incoming>) -> Response<Body> {
    let query = req.uri().query().unwrap_or("").to_owned();
    let claims = match authenticate(&edge, &req, &query) {
        Ok(c) => c,
        Err(e) => return unauthorized(e),
    };
    let path = req
        .uri()
        .path()
        .trim_start_matches("/realtime/v1/api/broadcast/")
        .to_owned();
    let Some((channel, event)) = path.split_once("/events/") else {
        return json_error(
            StatusCode::NOT_FOUND,
            "expected /realtime/v1/api/broadcast/<channel>/events/<event>",
        );
    };
    let (channel, event) = (percent_decode(channel).into_owned(), percent_decode(event).into_owned());
    let private = query_param(&query, "private").as_deref() == Some("true");
    let channel = match ChannelName::from_name_or_topic(&channel).map(|c| c.with_privacy(private)) {
        Ok(c) => c,
        Err(e) => return json_error(StatusCode::BAD_REQUEST, &format!("channel: {e}")),
    };
    if event.is_empty() || event.len() > 255 {
        return json_error(StatusCode::BAD_REQUEST, "event must be 1 to 255 bytes");
    }
    let binary = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/octet-stream"));
    let Some(body) = read_body(&edge, req.into_body()).await else {
        return too_large(&edge);
    };
    if !binary && let Err(e) = crate::protocol::json_text(&body) {
        let detail = match e {
            crate::protocol::DecodeError::Json(detail) => detail,
            other => other.to_string(),
        };
        return json_error(StatusCode::BAD_REQUEST, &format!("body is not JSON: {detail}"));
    }
    let mut ev = Event::broadcast(channel, &event, body, binary, None);
    if let Some(reason) = refuse_write(&edge, &mut ev, claims.as_ref()) {
        return forbidden(&reason);
    }
    publish_rest(&edge, vec![ev]).await
}

/// A REST request body, or `None` when it is larger than the frame limit.
async fn read_body(edge: &Edge, body: Incoming) -> Option<Bytes> {
    Limited::new(body, edge.config.limits.max_frame_bytes)
        .collect()
        .await
        .ok()
        .map(|b| b.to_bytes())
}

fn too_large(edge: &Edge) -> Response<Body> {
    let max = edge.config.limits.max_frame_bytes;
    json_error(StatusCode::PAYLOAD_TOO_LARGE, &format!("body larger than {max} bytes"))
}

/// Publishes REST broadcasts in order: 202 once all are on the bus, 503 at
/// the first that is not.
async fn publish_rest(edge: &Edge, events: Vec<Event>) -> Response<Body> {
    for ev in events {
        if let Err(e) = edge.bus.publish(ev).await {
            metrics::counter!("fanout_bus_publish_errors_total").increment(1);
            return json_error(
                StatusCode::SERVICE_UNAVAILABLE,
                &format!("broadcast not delivered: {e}"),
            );
        }
    }
    metrics::counter!("fanout_rest_broadcasts_total").increment(1);
    response(StatusCode::ACCEPTED, "application/json", "{}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_params() {
        let q = "apikey=a%2Eb%2Ec&vsn=2.0.0&log_level=info&flag";
        assert_eq!(query_param(q, "apikey").as_deref(), Some("a.b.c"));
        assert_eq!(query_param(q, "vsn").as_deref(), Some("2.0.0"));
        assert_eq!(query_param(q, "flag").as_deref(), Some(""));
        assert_eq!(query_param(q, "missing"), None);
        assert_eq!(percent_decode("bad%zz%4"), "bad%zz%4");
        assert_eq!(percent_decode("a+b"), "a b");
        assert_eq!(percent_decode("%é%C3%A9"), "%é\u{e9}");
    }
}
