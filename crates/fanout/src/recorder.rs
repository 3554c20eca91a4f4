//! The Prometheus recorder behind `/metrics`, installed once per process.

use anyhow::Context;
use fanout_core::metric::{Metric, MetricKind};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

use crate::process::Process;

/// Installs the Prometheus recorder, registers `tables` (the metrics of the
/// crates this role runs: see `Role::metrics`), and keeps its histograms
/// fresh in a task of `process` until shutdown.
pub fn install(process: &Process, tables: &[&'static [Metric]]) -> anyhow::Result<PrometheusHandle> {
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
    // Descriptions and series go to the installed recorder, so they come
    // after it.
    for metric in tables.iter().flat_map(|t| t.iter()) {
        register(metric);
    }
    Ok(handle)
}

/// Describes `metric` and creates its series at zero (one per label value,
/// or per pair of values with two labels), so the first scrape already
/// shows it: a counter at 0, a gauge at 0, a histogram with empty buckets.
fn register(metric: &Metric) {
    let name = metric.name;
    match metric.kind {
        MetricKind::Counter => metrics::describe_counter!(name, metric.help),
        MetricKind::Gauge => metrics::describe_gauge!(name, metric.help),
        MetricKind::Histogram => metrics::describe_histogram!(name, metric.help),
    }
    for pairs in metric.series() {
        let labels: Vec<metrics::Label> = pairs.iter().map(|(k, v)| metrics::Label::new(*k, *v)).collect();
        match metric.kind {
            MetricKind::Counter => metrics::counter!(name, labels).increment(0),
            MetricKind::Gauge => metrics::gauge!(name, labels).increment(0.0),
            // Registering is enough: the exporter renders a histogram with
            // its buckets at 0 until the first sample.
            MetricKind::Histogram => drop(metrics::histogram!(name, labels)),
        }
    }
}
