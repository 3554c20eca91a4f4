//! `fanout presence`: sweeps crashed edges' presences out of Redis and
//! serves the presence gRPC API and the admin endpoints.

use std::sync::Arc;

use anyhow::Context;
use fanout_bus::Bus;

use super::{AdminOnly, Role, connect_nats, connect_redis};
use crate::config::Config;

pub async fn run(config: Config) -> anyhow::Result<()> {
    let start = AdminOnly::start(&config, Role::Presence).await?;
    let bus: Arc<dyn Bus> = Arc::new(connect_nats(&config).await?);
    let redis = connect_redis(config.redis_url.as_deref().unwrap_or_default(), &start.process).await?;
    let sweeper = fanout_presence::Sweeper::new(redis.clone(), bus.clone(), config.presence_sweep);
    let grpc = tokio::net::TcpListener::bind(config.presence_grpc_listen)
        .await
        .with_context(|| format!("binding the gRPC listener on {}", config.presence_grpc_listen))?;
    tracing::info!(
        admin = %start.admin.local_addr()?,
        grpc = %grpc.local_addr()?,
        sweep = ?config.presence_sweep,
        "fanout presence running"
    );
    let grpc_server = tonic::transport::Server::builder()
        .add_service(fanout_presence::PresenceApi::new(redis).into_service())
        .serve_with_incoming_shutdown(
            tokio_stream::wrappers::TcpListenerStream::new(grpc),
            start.process.shutdown.clone().cancelled_owned(),
        );
    start.process.tasks.spawn(async move {
        if let Err(e) = grpc_server.await {
            tracing::warn!(error = %e, "gRPC server ended with an error");
        }
    });
    let process = start.serve_admin(bus);
    sweeper.run(process.shutdown.clone()).await;
    process.shut_down(config.shutdown_grace).await;
    tracing::info!("fanout presence stopped");
    Ok(())
}
