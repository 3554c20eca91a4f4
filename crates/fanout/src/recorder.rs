//! The Prometheus recorder behind `/metrics`, installed once per process.

use anyhow::Context;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

use crate::process::Process;

/// Installs the Prometheus recorder, describes every crate's metrics, and
/// keeps its histograms fresh in a task of `process` until shutdown.
pub fn install(process: &Process) -> anyhow::Result<PrometheusHandle> {
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(
            Matcher::Suffix("_seconds".into()),
            &[
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
            ],
        )
        .context("histogram buckets")?
        .install_recorder()
        .context("installing the metrics recorder")?;
    let upkeep = handle.clone();
    let shutdown = process.shutdown.clone();
    process.tasks.spawn(async move {
        let mut tick = tokio::time::interval(std::time::Duration::from_secs(5));
        loop {
            tokio::select! {
                _ = tick.tick() => upkeep.run_upkeep(),
                () = shutdown.cancelled() => break,
            }
        }
    });
    // Descriptions go to the installed recorder, so they come after it. Each
    // crate describes the metrics it emits; every role describes them all,
    // and the exporter shows a description only with a metric the process
    // emitted.
    fanout_edge::describe_metrics();
    fanout_bus::describe_metrics();
    fanout_cdc::describe_metrics();
    fanout_presence::describe_metrics();
    Ok(handle)
}
