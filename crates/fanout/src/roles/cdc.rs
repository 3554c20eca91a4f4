//! `fanout cdc`: the change-data-capture ingester. One instance streams the
//! replication slot, others stand by until it is free.

use std::sync::Arc;

use anyhow::Context;
use fanout_bus::Bus;

use super::{AdminOnly, Role, cdc_config, connect_nats, open_members};
use crate::config::Config;

pub async fn run(config: Config) -> anyhow::Result<()> {
    let start = AdminOnly::start(&config, Role::Cdc).await?;
    let nats = connect_nats(&config).await?;
    let members = open_members(&config, &nats, &start.process.shutdown).await?;
    let bus: Arc<dyn Bus> = Arc::new(nats);
    let process = start.serve_admin(bus.clone());
    let mut cdc = cdc_config(&config).context("database URL")?;
    cdc.members = members.map(|m| m as Arc<dyn fanout_bus::MemberStore>);
    tracing::info!(slot = %cdc.slot, publication = %cdc.publication, "fanout cdc starting");
    let result = fanout_cdc::run(cdc, bus, process.shutdown.clone()).await;
    // The ingester ends on shutdown or on a fatal error; either way the
    // admin listener stops with it.
    process.shut_down(config.shutdown_grace).await;
    result.context("change stream")?;
    tracing::info!("fanout cdc stopped");
    Ok(())
}
