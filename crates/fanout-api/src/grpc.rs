//! The gRPC service `fanout.v1.ServerApi` (`proto/fanout/v1/api.proto`).
//! This is the one module of the crate that names the generated protobuf
//! types: it turns requests into [`Api`] calls and answers into messages.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use fanout_core::{ApiScope, Event};
use fanout_proto::v1;
use futures_util::Stream;
use tokio::sync::mpsc;
use tonic::{Request, Response, Status, Streaming};

use fanout_bus::Published;

use crate::ops::{Api, ApiError, Message, Payload, count};

/// Requests of one `PublishStream` handed to the bus together, at most.
const STREAM_BATCH: usize = 256;

/// The tonic service over an [`Api`].
#[derive(Debug, Clone)]
pub struct GrpcApi {
    api: Arc<Api>,
}

impl GrpcApi {
    pub fn new(api: Arc<Api>) -> Self {
        Self { api }
    }

    /// The service, ready to be served (see [`crate::http::serve`]).
    pub fn into_service(self) -> v1::server_api_server::ServerApiServer<Self> {
        v1::server_api_server::ServerApiServer::new(self)
    }

    /// Checks the call's key for `needed`.
    fn authorize<T>(&self, request: &Request<T>, needed: ApiScope) -> Result<(), ApiError> {
        let value = request
            .metadata()
            .get("authorization")
            .map(|v| v.to_str().unwrap_or_default());
        self.api.authorize(value, needed)
    }

    /// Runs one unary call: authorization, the call, the metrics.
    async fn unary<T, R, F>(
        &self,
        method: &'static str,
        needed: ApiScope,
        request: Request<T>,
        call: impl FnOnce(Arc<Api>, T) -> F,
    ) -> Result<Response<R>, Status>
    where
        F: Future<Output = Result<R, ApiError>>,
    {
        let started = Instant::now();
        let result = match self.authorize(&request, needed) {
            Ok(()) => call(self.api.clone(), request.into_inner()).await,
            Err(e) => Err(e),
        };
        count(method, started, result.as_ref().map(|_| ()));
        result.map(Response::new).map_err(status)
    }
}

/// The status of an error.
fn status(e: ApiError) -> Status {
    let message = e.to_string();
    match e {
        ApiError::Unauthenticated(_) => Status::unauthenticated(message),
        ApiError::PermissionDenied(_) => Status::permission_denied(message),
        ApiError::InvalidArgument(_) => Status::invalid_argument(message),
        ApiError::OutOfRange(_) => Status::out_of_range(message),
        ApiError::Unavailable(_) => Status::unavailable(message),
    }
}

fn payload(p: Option<v1::publish_request::Payload>) -> Payload {
    match p {
        Some(v1::publish_request::Payload::Json(s)) => Payload::Json(Bytes::from(s)),
        Some(v1::publish_request::Payload::Binary(b)) => Payload::Binary(b),
        // No payload is an empty object, as in a REST broadcast.
        None => Payload::Json(Bytes::from_static(b"{}")),
    }
}

fn broadcast_payload(p: Option<v1::broadcast_request::Payload>) -> Payload {
    payload(p.map(|p| match p {
        v1::broadcast_request::Payload::Json(s) => v1::publish_request::Payload::Json(s),
        v1::broadcast_request::Payload::Binary(b) => v1::publish_request::Payload::Binary(b),
    }))
}

fn publish_message(api: &Api, r: v1::PublishRequest) -> Result<Message, ApiError> {
    api.message(&r.channel, r.private, &r.event, payload(r.payload), &r.idempotency_key)
}

/// The answer to one publish: its position, or (stream only) its error.
fn publish_response(id: u64, answer: Result<Published, ApiError>) -> v1::PublishResponse {
    match answer {
        Ok(p) => v1::PublishResponse {
            position: p.position.to_string(),
            duplicate: p.duplicate,
            id,
            error: String::new(),
        },
        Err(e) => v1::PublishResponse {
            position: String::new(),
            duplicate: false,
            id,
            error: e.to_string(),
        },
    }
}

fn history_message(e: Event) -> v1::HistoryMessage {
    let payload = if e.binary {
        v1::history_message::Payload::Binary(e.payload)
    } else {
        v1::history_message::Payload::Json(String::from_utf8_lossy(&e.payload).into_owned())
    };
    v1::HistoryMessage {
        event: e.event.to_string(),
        payload: Some(payload),
        position: e.position.to_string(),
        published_at_ms: e.published_at_ms,
    }
}

type PublishStream = Pin<Box<dyn Stream<Item = Result<v1::PublishResponse, Status>> + Send>>;

#[tonic::async_trait]
impl v1::server_api_server::ServerApi for GrpcApi {
    async fn publish(&self, request: Request<v1::PublishRequest>) -> Result<Response<v1::PublishResponse>, Status> {
        self.unary("publish", ApiScope::Publish, request, |api, r| async move {
            let id = r.id;
            let published = api.publish_one(publish_message(&api, r)?).await?;
            Ok(publish_response(id, Ok(published)))
        })
        .await
    }

    async fn broadcast(
        &self,
        request: Request<v1::BroadcastRequest>,
    ) -> Result<Response<v1::BroadcastResponse>, Status> {
        self.unary("broadcast", ApiScope::Publish, request, |api, r| async move {
            let payload = broadcast_payload(r.payload);
            let answers = api
                .broadcast(&r.channels, r.private, &r.event, payload, &r.idempotency_key)
                .await?;
            let results = r
                .channels
                .into_iter()
                .zip(answers)
                .map(|(channel, answer)| match answer {
                    Ok(p) => v1::BroadcastResult {
                        channel,
                        position: p.position.to_string(),
                        duplicate: p.duplicate,
                        error: String::new(),
                    },
                    Err(e) => v1::BroadcastResult {
                        channel,
                        position: String::new(),
                        duplicate: false,
                        error: e.to_string(),
                    },
                })
                .collect();
            Ok(v1::BroadcastResponse { results })
        })
        .await
    }

    type PublishStreamStream = PublishStream;

    async fn publish_stream(
        &self,
        request: Request<Streaming<v1::PublishRequest>>,
    ) -> Result<Response<Self::PublishStreamStream>, Status> {
        let started = Instant::now();
        if let Err(e) = self.authorize(&request, ApiScope::Publish) {
            count("publish_stream", started, Err(&e));
            return Err(status(e));
        }
        let mut requests = request.into_inner();
        let api = self.api.clone();
        let (tx, rx) = mpsc::channel::<Result<v1::PublishResponse, Status>>(STREAM_BATCH * 2);
        tokio::spawn(async move {
            // Whatever requests have arrived are published as one pipelined
            // batch, and answered in order; a bad request is answered with
            // its error and the stream goes on.
            let mut batch: Vec<v1::PublishRequest> = Vec::with_capacity(STREAM_BATCH);
            loop {
                let first = match requests.message().await {
                    Ok(Some(r)) => r,
                    Ok(None) => break,
                    Err(e) => {
                        tracing::debug!(error = %e, "PublishStream request stream ended with an error");
                        break;
                    }
                };
                batch.push(first);
                while batch.len() < STREAM_BATCH {
                    match futures_util::FutureExt::now_or_never(requests.message()) {
                        Some(Ok(Some(r))) => batch.push(r),
                        _ => break,
                    }
                }
                let started = Instant::now();
                let mut checked = Vec::with_capacity(batch.len());
                let mut messages = Vec::with_capacity(batch.len());
                for r in batch.drain(..) {
                    let id = r.id;
                    match publish_message(&api, r) {
                        Ok(m) => {
                            checked.push((id, None));
                            messages.push(m);
                        }
                        Err(e) => checked.push((id, Some(e))),
                    }
                }
                let mut answers = api.publish(messages).await.into_iter();
                for (id, refused) in checked {
                    let answer = match refused {
                        Some(e) => Err(e),
                        None => answers
                            .next()
                            .unwrap_or_else(|| Err(ApiError::Unavailable("the bus gave no answer".into()))),
                    };
                    count("publish_stream", started, answer.as_ref().map(|_| ()));
                    if tx.send(Ok(publish_response(id, answer))).await.is_err() {
                        return;
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))))
    }

    async fn history(&self, request: Request<v1::HistoryRequest>) -> Result<Response<v1::HistoryResponse>, Status> {
        self.unary("history", ApiScope::Read, request, |api, r| async move {
            let page = api
                .history(&r.channel, r.private, Some(r.limit as usize), Some(&r.after))
                .await?;
            Ok(v1::HistoryResponse {
                messages: page.messages.into_iter().map(history_message).collect(),
                position: page.position.to_string(),
            })
        })
        .await
    }

    async fn presence(&self, request: Request<v1::PresenceRequest>) -> Result<Response<v1::PresenceResponse>, Status> {
        self.unary("presence", ApiScope::Read, request, |api, r| async move {
            let state = api.presence(&r.channel, r.private).await?;
            let presences = state
                .as_object()
                .into_iter()
                .flatten()
                .map(|(key, entry)| v1::PresenceKey {
                    key: key.clone(),
                    metas: entry["metas"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .map(|meta| {
                            let mut meta = meta.as_object().cloned().unwrap_or_default();
                            let phx_ref = match meta.remove("phx_ref") {
                                Some(serde_json::Value::String(s)) => s,
                                _ => String::new(),
                            };
                            v1::PresenceMeta {
                                phx_ref,
                                meta_json: serde_json::Value::Object(meta).to_string(),
                            }
                        })
                        .collect(),
                })
                .collect();
            Ok(v1::PresenceResponse { presences })
        })
        .await
    }

    async fn presence_stats(
        &self,
        request: Request<v1::PresenceRequest>,
    ) -> Result<Response<v1::PresenceStatsResponse>, Status> {
        self.unary("presence_stats", ApiScope::Read, request, |api, r| async move {
            let stats = api.presence_stats(&r.channel, r.private).await?;
            Ok(v1::PresenceStatsResponse {
                clients: stats.clients,
                users: stats.users,
            })
        })
        .await
    }

    async fn channels(&self, request: Request<v1::ChannelsRequest>) -> Result<Response<v1::ChannelsResponse>, Status> {
        self.unary("channels", ApiScope::Read, request, |api, r| async move {
            let found = api.channels(&r.pattern, Some(r.limit as usize)).await?;
            Ok(v1::ChannelsResponse {
                channels: found
                    .value
                    .into_iter()
                    .map(|c| v1::ChannelInfo {
                        channel: c.channel.name().to_owned(),
                        private: c.channel.is_private(),
                        subscribers: c.subscribers,
                    })
                    .collect(),
                edges: found.edges,
            })
        })
        .await
    }

    async fn info(&self, request: Request<v1::InfoRequest>) -> Result<Response<v1::InfoResponse>, Status> {
        self.unary("info", ApiScope::Read, request, |api, _| async move {
            let nodes = api
                .info()
                .await?
                .into_iter()
                .map(|n| v1::NodeInfo {
                    node: n.node,
                    connections: n.connections,
                    channels: n.channels,
                    uptime_secs: n.uptime_secs,
                })
                .collect();
            Ok(v1::InfoResponse { nodes })
        })
        .await
    }

    async fn disconnect(
        &self,
        request: Request<v1::DisconnectRequest>,
    ) -> Result<Response<v1::DisconnectResponse>, Status> {
        self.unary("disconnect", ApiScope::All, request, |api, r| async move {
            let done = api.disconnect(&r.sub, &r.reason, r.reconnect).await?;
            Ok(v1::DisconnectResponse {
                connections: done.value,
                edges: done.edges,
            })
        })
        .await
    }

    async fn unsubscribe(
        &self,
        request: Request<v1::UnsubscribeRequest>,
    ) -> Result<Response<v1::UnsubscribeResponse>, Status> {
        self.unary("unsubscribe", ApiScope::All, request, |api, r| async move {
            let done = api.unsubscribe(&r.sub, &r.channel, r.private, &r.reason).await?;
            Ok(v1::UnsubscribeResponse {
                connections: done.value,
                edges: done.edges,
            })
        })
        .await
    }
}
