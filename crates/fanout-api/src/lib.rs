//! The server API: how application backends publish to channels and read
//! their history and presence, without a client socket.
//!
//! Most events in a live app come from a backend (a signup written to the
//! database, a facilitator's action handled by an API server). This crate
//! serves them on a listener of its own (`--api-listen`, default
//! `127.0.0.1:9700`), never the public client listener, in two forms on the
//! same port: the gRPC service `fanout.v1.ServerApi` (`proto/fanout/v1/api.proto`,
//! with a streaming publish for high rates) and HTTP JSON under `/api/v1/`.
//! Every call carries an API key (`Authorization: Bearer <key>`), separate
//! from client tokens, with a scope (`publish`, `read` or `all`).
//!
//! # Layout
//! - [`ops`]: the operations, free of any transport: [`Api`] checks keys
//!   and requests and calls the seams.
//! - [`grpc`]: the tonic service over [`Api`] (the one module naming the
//!   generated types).
//! - [`http`]: the listener (gRPC and JSON told apart per request) and the
//!   JSON routes.
//!
//! # What it does not do
//! It holds no client sockets. A publish goes onto the same [`fanout_bus::Bus`] a
//! client broadcast does, so the edges deliver it; history and presence
//! are read from the same seams (`Bus::history`, `PresenceStore::state`)
//! in standalone and cluster mode alike.

use fanout_core::metric::Metric;

pub mod grpc;
pub mod http;
pub mod ops;

pub use ops::{Api, ApiError, Payload};

/// Every metric the API emits, for the binary to describe and register at
/// zero (see [`fanout_core::metric`]).
pub const METRICS: &[Metric] = &[
    Metric::counter(
        "fanout_api_requests_total",
        "Server API calls (each PublishStream message counts once), by method and result code.",
    )
    .labelled("method", ops::METHODS)
    .labelled("code", ops::CODES),
    Metric::histogram(
        "fanout_api_request_seconds",
        "Time to answer a server API call (a PublishStream batch for its messages), by method.",
    )
    .labelled("method", ops::METHODS),
];
