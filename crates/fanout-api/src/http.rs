//! The API listener: gRPC (HTTP/2, `content-type: application/grpc`) and
//! HTTP JSON under `/api/v1/` on one port, told apart per request.
//!
//! | Method and path | Body or query | Answer |
//! |---|---|---|
//! | `POST /api/v1/publish` | `{channel, event, payload \| payload_base64, idempotency_key?, private?}` | `{position, duplicate}` |
//! | `POST /api/v1/broadcast` | `{channels, event, payload \| payload_base64, idempotency_key?, private?}` | `{results: [{channel, position, duplicate} \| {channel, error}]}` |
//! | `GET /api/v1/history` | `channel, limit?, after?, private?` | `{messages: [{event, payload \| payload_base64, position, published_at_ms}], position}` |
//! | `GET /api/v1/presence` | `channel, private?` | `{presences: {key: {metas: [...]}}}` |
//! | `GET /api/v1/presence_stats` | `channel, private?` | `{clients, users}` |
//! | `GET /api/v1/channels` | `pattern?, limit?` | `{channels: [{channel, private, subscribers}], edges}` |
//! | `GET /api/v1/info` | | `{nodes: [{node, connections, channels, uptime_secs}]}` |
//! | `POST /api/v1/disconnect` | `{sub, reason?, reconnect?}` | `{connections, edges}` |
//! | `POST /api/v1/unsubscribe` | `{sub, channel, private?, reason?}` | `{connections, edges}` |
//!
//! Errors are `{"error": reason, "code": code}` with 400 (invalid
//! argument), 401 (no or unknown key), 403 (the key's scope), 404, 405,
//! 410 (a history position no longer retained), 413 and 503 (bus or
//! presence store unavailable).

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use bytes::Bytes;
use fanout_core::ApiScope;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower_service::Service as _;

use crate::grpc::GrpcApi;
use crate::ops::{Api, ApiError, Payload, count};

type Body = tonic::body::Body;

/// How long an HTTP/1 client may take to send a request's headers.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves the API on `listener` until `shutdown`; connections run on
/// `tasks`, so the process can wait for calls in flight.
pub async fn serve(listener: TcpListener, api: Arc<Api>, shutdown: CancellationToken, tasks: TaskTracker) {
    let grpc = GrpcApi::new(api.clone()).into_service();
    loop {
        let (stream, _) = tokio::select! {
            () = shutdown.cancelled() => break,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(error = %e, "API accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        // Answers are small and a caller often waits for each one: without
        // this, Nagle's algorithm holds a response's last segment back
        // until the previous one is acknowledged.
        if let Err(e) = stream.set_nodelay(true) {
            tracing::debug!(error = %e, "TCP_NODELAY not set on an API connection");
        }
        let (api, grpc, shutdown) = (api.clone(), grpc.clone(), shutdown.clone());
        tasks.spawn(async move {
            let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                let (api, mut grpc) = (api.clone(), grpc.clone());
                async move {
                    if is_grpc(&req) {
                        grpc.call(req).await
                    } else {
                        Ok::<_, Infallible>(route(&api, req).await)
                    }
                }
            });
            let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            // A client that never finishes its request headers is let go.
            builder
                .http1()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT);
            let conn = builder.serve_connection(TokioIo::new(stream), service);
            tokio::pin!(conn);
            tokio::select! {
                r = conn.as_mut() => {
                    if let Err(e) = r {
                        tracing::debug!(error = %e, "API connection error");
                    }
                }
                () = shutdown.cancelled() => {
                    conn.as_mut().graceful_shutdown();
                    let _ = tokio::time::timeout(Duration::from_secs(5), conn).await;
                }
            }
        });
    }
}

fn is_grpc<B>(req: &Request<B>) -> bool {
    req.headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/grpc"))
}

fn respond(status: StatusCode, body: &Value) -> Response<Body> {
    let mut r = Response::new(Body::new(Full::new(Bytes::from(body.to_string()))));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    // Any origin may call (the operator's page is served from the admin
    // port): the key travels in a header a page must be given, never in a
    // cookie, so another site gains nothing.
    r.headers_mut()
        .insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, HeaderValue::from_static("*"));
    r
}

/// The answer to a CORS preflight.
fn preflight() -> Response<Body> {
    let mut r = respond(StatusCode::NO_CONTENT, &Value::Null);
    *r.body_mut() = Body::empty();
    let h = r.headers_mut();
    h.insert(
        header::ACCESS_CONTROL_ALLOW_METHODS,
        HeaderValue::from_static("GET, POST"),
    );
    h.insert(
        header::ACCESS_CONTROL_ALLOW_HEADERS,
        HeaderValue::from_static("authorization, content-type"),
    );
    h.insert(header::ACCESS_CONTROL_MAX_AGE, HeaderValue::from_static("600"));
    r
}

fn error_response(e: &ApiError) -> Response<Body> {
    let status = match e {
        ApiError::Unauthenticated(_) => StatusCode::UNAUTHORIZED,
        ApiError::PermissionDenied(_) => StatusCode::FORBIDDEN,
        ApiError::InvalidArgument(_) => StatusCode::BAD_REQUEST,
        ApiError::OutOfRange(_) => StatusCode::GONE,
        ApiError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
    };
    let mut r = respond(status, &json!({"error": e.to_string(), "code": e.code()}));
    if status == StatusCode::UNAUTHORIZED {
        r.headers_mut()
            .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    }
    r
}

/// What a route answers before it is rendered.
type Answer = Result<Value, ApiError>;

async fn route(api: &Api, req: Request<Incoming>) -> Response<Body> {
    if req.method() == Method::OPTIONS {
        return preflight();
    }
    let started = Instant::now();
    let path = req.uri().path().to_owned();
    let (method, needed) = match path.as_str() {
        "/api/v1/publish" => ("publish", ApiScope::Publish),
        "/api/v1/broadcast" => ("broadcast", ApiScope::Publish),
        "/api/v1/history" => ("history", ApiScope::Read),
        "/api/v1/presence" => ("presence", ApiScope::Read),
        "/api/v1/presence_stats" => ("presence_stats", ApiScope::Read),
        "/api/v1/channels" => ("channels", ApiScope::Read),
        "/api/v1/info" => ("info", ApiScope::Read),
        "/api/v1/disconnect" => ("disconnect", ApiScope::All),
        "/api/v1/unsubscribe" => ("unsubscribe", ApiScope::All),
        _ => {
            return respond(
                StatusCode::NOT_FOUND,
                &json!({"error": format!("no API route {path}; see /api/v1/publish, /broadcast, /history, /presence, /presence_stats, /channels, /info, /disconnect, /unsubscribe"), "code": "not_found"}),
            );
        }
    };
    let wants_post = matches!(method, "publish" | "broadcast" | "disconnect" | "unsubscribe");
    let allowed = if wants_post { Method::POST } else { Method::GET };
    if req.method() != allowed {
        return respond(
            StatusCode::METHOD_NOT_ALLOWED,
            &json!({"error": format!("{path} takes {allowed}"), "code": "method_not_allowed"}),
        );
    }
    let authorization = req
        .headers()
        .get(header::AUTHORIZATION)
        .map(|v| v.to_str().unwrap_or_default().to_owned());
    let answer: Answer = match api.authorize(authorization.as_deref(), needed) {
        Err(e) => Err(e),
        Ok(()) if wants_post => match read_body(api, req.into_body()).await {
            Ok(body) => match method {
                "publish" => publish(api, &body).await,
                "broadcast" => broadcast(api, &body).await,
                "disconnect" => disconnect(api, &body).await,
                _ => unsubscribe(api, &body).await,
            },
            Err(response) => {
                count(method, started, Err(&ApiError::InvalidArgument(String::new())));
                return response;
            }
        },
        Ok(()) => {
            let query = Query::parse(req.uri().query().unwrap_or(""));
            match method {
                "history" => history(api, &query).await,
                "presence" => presence(api, &query).await,
                "presence_stats" => presence_stats(api, &query).await,
                "channels" => channels(api, &query).await,
                _ => info(api).await,
            }
        }
    };
    count(method, started, answer.as_ref().map(|_| ()));
    match answer {
        Ok(body) => respond(StatusCode::OK, &body),
        Err(e) => error_response(&e),
    }
}

/// The body, within the size limit, or the answer that refuses it.
async fn read_body(api: &Api, body: Incoming) -> Result<Bytes, Response<Body>> {
    let limit = api.max_body();
    match Limited::new(body, limit).collect().await {
        Ok(b) => Ok(b.to_bytes()),
        Err(_) => Err(respond(
            StatusCode::PAYLOAD_TOO_LARGE,
            &json!({"error": format!("request body over {limit} bytes"), "code": "invalid_argument"}),
        )),
    }
}

/// The body of `/publish` (`channel`) and of `/broadcast` (`channels`).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct MessageBody<'a> {
    #[serde(default)]
    channel: Option<String>,
    #[serde(default)]
    channels: Option<Vec<String>>,
    event: String,
    #[serde(borrow, default)]
    payload: Option<&'a RawValue>,
    #[serde(default)]
    payload_base64: Option<String>,
    #[serde(default)]
    idempotency_key: String,
    #[serde(default)]
    private: bool,
}

fn parse_json<'a, T: Deserialize<'a>>(body: &'a [u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| ApiError::InvalidArgument(format!("request body: {e}")))
}

/// `payload` (JSON) or `payload_base64` (binary), not both; none is `{}`.
fn body_payload(json: Option<&RawValue>, base64: Option<&str>) -> Result<Payload, ApiError> {
    match (json, base64) {
        (Some(_), Some(_)) => Err(ApiError::InvalidArgument(
            "give payload or payload_base64, not both".into(),
        )),
        (Some(raw), None) => Ok(Payload::Json(Bytes::copy_from_slice(raw.get().as_bytes()))),
        (None, Some(b)) => base64::engine::general_purpose::STANDARD
            .decode(b)
            .map(|b| Payload::Binary(Bytes::from(b)))
            .map_err(|e| ApiError::InvalidArgument(format!("payload_base64: {e}"))),
        (None, None) => Ok(Payload::Json(Bytes::from_static(b"{}"))),
    }
}

async fn publish(api: &Api, body: &[u8]) -> Answer {
    let b: MessageBody<'_> = parse_json(body)?;
    let channel = match (b.channel, b.channels) {
        (Some(c), None) => c,
        (_, Some(_)) => {
            return Err(ApiError::InvalidArgument(
                "publish takes one channel; POST /api/v1/broadcast takes channels".into(),
            ));
        }
        (None, None) => {
            return Err(ApiError::InvalidArgument(
                "request body: missing field `channel`".into(),
            ));
        }
    };
    let payload = body_payload(b.payload, b.payload_base64.as_deref())?;
    let message = api.message(&channel, b.private, &b.event, payload, &b.idempotency_key)?;
    let published = api.publish_one(message).await?;
    Ok(json!({"position": published.position.to_string(), "duplicate": published.duplicate}))
}

async fn broadcast(api: &Api, body: &[u8]) -> Answer {
    let b: MessageBody<'_> = parse_json(body)?;
    let channels = match (b.channel, b.channels) {
        (None, Some(c)) => c,
        (Some(_), _) => {
            return Err(ApiError::InvalidArgument(
                "broadcast takes channels (a list); POST /api/v1/publish takes one channel".into(),
            ));
        }
        (None, None) => {
            return Err(ApiError::InvalidArgument(
                "request body: missing field `channels`".into(),
            ));
        }
    };
    let payload = body_payload(b.payload, b.payload_base64.as_deref())?;
    let answers = api
        .broadcast(&channels, b.private, &b.event, payload, &b.idempotency_key)
        .await?;
    let results: Vec<Value> = channels
        .iter()
        .zip(answers)
        .map(|(channel, answer)| match answer {
            Ok(p) => json!({"channel": channel, "position": p.position.to_string(), "duplicate": p.duplicate}),
            Err(e) => json!({"channel": channel, "error": e.to_string()}),
        })
        .collect();
    Ok(json!({ "results": results }))
}

/// The query string of a GET, decoded.
struct Query(Vec<(String, String)>);

impl Query {
    fn parse(q: &str) -> Self {
        Self(url::form_urlencoded::parse(q.as_bytes()).into_owned().collect())
    }

    fn get(&self, name: &str) -> Option<&str> {
        self.0.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }

    fn channel(&self) -> Result<&str, ApiError> {
        self.get("channel")
            .ok_or_else(|| ApiError::InvalidArgument("the channel query parameter is missing".into()))
    }

    fn limit(&self) -> Result<Option<usize>, ApiError> {
        self.get("limit")
            .map(|l| {
                l.parse::<usize>()
                    .map_err(|_| ApiError::InvalidArgument(format!("limit {l:?} is not a number")))
            })
            .transpose()
    }

    fn private(&self) -> Result<bool, ApiError> {
        match self.get("private") {
            None | Some("false") => Ok(false),
            Some("true") => Ok(true),
            Some(v) => Err(ApiError::InvalidArgument(format!(
                "private must be true or false, not {v:?}"
            ))),
        }
    }
}

async fn history(api: &Api, q: &Query) -> Answer {
    let page = api
        .history(q.channel()?, q.private()?, q.limit()?, q.get("after"))
        .await?;
    let messages: Vec<Value> = page
        .messages
        .iter()
        .map(|e| {
            let mut m = json!({
                "event": &*e.event,
                "position": e.position.to_string(),
                "published_at_ms": e.published_at_ms,
            });
            if e.binary {
                m["payload_base64"] = Value::String(base64::engine::general_purpose::STANDARD.encode(&e.payload));
            } else {
                // Stored payloads were checked to be JSON when published.
                m["payload"] = serde_json::from_slice(&e.payload).unwrap_or(Value::Null);
            }
            m
        })
        .collect();
    Ok(json!({"messages": messages, "position": page.position.to_string()}))
}

async fn presence(api: &Api, q: &Query) -> Answer {
    let state = api.presence(q.channel()?, q.private()?).await?;
    Ok(json!({ "presences": state }))
}

async fn presence_stats(api: &Api, q: &Query) -> Answer {
    let s = api.presence_stats(q.channel()?, q.private()?).await?;
    Ok(json!({"clients": s.clients, "users": s.users}))
}

async fn channels(api: &Api, q: &Query) -> Answer {
    let found = api.channels(q.get("pattern").unwrap_or(""), q.limit()?).await?;
    let channels: Vec<Value> = found
        .value
        .iter()
        .map(|c| json!({"channel": c.channel.name(), "private": c.channel.is_private(), "subscribers": c.subscribers}))
        .collect();
    Ok(json!({"channels": channels, "edges": found.edges}))
}

async fn info(api: &Api) -> Answer {
    let nodes: Vec<Value> = api
        .info()
        .await?
        .iter()
        .map(|n| json!({"node": n.node, "connections": n.connections, "channels": n.channels, "uptime_secs": n.uptime_secs}))
        .collect();
    Ok(json!({ "nodes": nodes }))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DisconnectBody {
    sub: String,
    #[serde(default)]
    reason: String,
    #[serde(default)]
    reconnect: bool,
}

async fn disconnect(api: &Api, body: &[u8]) -> Answer {
    let b: DisconnectBody = parse_json(body)?;
    let done = api.disconnect(&b.sub, &b.reason, b.reconnect).await?;
    Ok(json!({"connections": done.value, "edges": done.edges}))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct UnsubscribeBody {
    sub: String,
    channel: String,
    #[serde(default)]
    private: bool,
    #[serde(default)]
    reason: String,
}

async fn unsubscribe(api: &Api, body: &[u8]) -> Answer {
    let b: UnsubscribeBody = parse_json(body)?;
    let done = api.unsubscribe(&b.sub, &b.channel, b.private, &b.reason).await?;
    Ok(json!({"connections": done.value, "edges": done.edges}))
}
