//! Metrics as an operator meets them: every series a role exports is on
//! `/metrics` from its first scrape (at zero unless already counted), in text `promtool check metrics`
//! accepts; and every metric the code emits is declared in its crate's table
//! (so nothing can be emitted that a fresh process would not show).

use std::collections::BTreeSet;
use std::io::Write;
use std::process::{Command, Stdio};

use anyhow::{Context, Result};
use fanout_core::metric::{Metric, MetricKind};
use fanout_tests::{Fanout, Nats, Postgres, Redis, repo_root};

/// A kind as Prometheus's `# TYPE` line and the `metrics::…!` macros name it.
fn kind_name(kind: MetricKind) -> &'static str {
    match kind {
        MetricKind::Counter => "counter",
        MetricKind::Gauge => "gauge",
        MetricKind::Histogram => "histogram",
    }
}

/// Checks that `text` (a first scrape) has every series of `tables` at zero
/// and that promtool finds nothing wrong with it.
fn assert_all_at_zero(text: &str, tables: &[&[Metric]]) -> Result<()> {
    let mut missing = Vec::new();
    for m in tables.iter().flat_map(|t| t.iter()) {
        let kind = kind_name(m.kind);
        if !text.contains(&format!("# TYPE {} {kind}\n", m.name)) {
            missing.push(format!("{} ({kind})", m.name));
            continue;
        }
        // Each series, by its line's start (name and labels). Its value is
        // 0 unless the process already counted something (its first
        // heartbeat, say), so the value is only checked to be a number.
        let series: Vec<String> = match (m.kind, m.label) {
            (MetricKind::Histogram, _) => vec![format!("{}_count ", m.name)],
            (_, None) => vec![format!("{} ", m.name)],
            (_, Some((key, values))) => values.iter().map(|v| format!("{}{{{key}=\"{v}\"}} ", m.name)).collect(),
        };
        for s in series {
            let value = text
                .lines()
                .find_map(|l| l.strip_prefix(s.as_str()))
                .and_then(|v| v.trim().parse::<f64>().ok());
            if value.is_none() {
                missing.push(s);
            }
        }
    }
    anyhow::ensure!(missing.is_empty(), "missing from the first scrape: {missing:?}\n{text}");
    let promtool = repo_root().join("target/helm/promtool");
    let mut child = Command::new(&promtool)
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("{} (tests/run.sh unpacks it)", promtool.display()))?;
    child.stdin.take().context("stdin")?.write_all(text.as_bytes())?;
    let out = child.wait_with_output()?;
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    anyhow::ensure!(
        out.status.success() && said.trim().is_empty(),
        "promtool check metrics: {said}"
    );
    Ok(())
}

#[tokio::test]
async fn standalone_serves_every_series_from_the_first_scrape() -> Result<()> {
    let f = Fanout::start(&[], &[]).await?;
    assert_all_at_zero(&f.metrics().await?, &[fanout_edge::METRICS])
}

#[tokio::test]
async fn every_cluster_role_serves_every_series_from_the_first_scrape() -> Result<()> {
    let nats = Nats::start().await?;
    let redis = Redis::start().await?;
    let url = redis.url();
    let edge = Fanout::start_edge(&nats, &["--redis-url", &url]).await?;
    assert_all_at_zero(
        &edge.metrics().await?,
        &[
            fanout_edge::METRICS,
            fanout_bus::METRICS,
            fanout_presence::STORE_METRICS,
        ],
    )?;
    let presence = Fanout::start_presence(&nats, &redis, &[]).await?;
    assert_all_at_zero(
        &presence.metrics().await?,
        &[fanout_bus::METRICS, fanout_presence::SWEEPER_METRICS],
    )?;
    let pg = Postgres::start().await?;
    pg.apply_workshop_schema()?;
    let cdc = Fanout::start_cdc(&nats, &pg, &[]).await?;
    assert_all_at_zero(&cdc.metrics().await?, &[fanout_bus::METRICS, fanout_cdc::METRICS])
}

/// What a crate's sources emit: `fanout_…` names with their kinds, and
/// (metric, literal label value) pairs (`"reason" => "x"`).
struct Emitted {
    names: BTreeSet<(String, &'static str)>,
    labels: BTreeSet<(String, String)>,
}

fn emitted(crate_dir: &str) -> Result<Emitted> {
    let mut names = BTreeSet::new();
    let mut labels = BTreeSet::new();
    let mut dirs = vec![repo_root().join(crate_dir).join("src")];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir)? {
            let path = entry?.path();
            if path.is_dir() {
                dirs.push(path);
                continue;
            }
            if path.extension().is_none_or(|e| e != "rs") {
                continue;
            }
            let text = std::fs::read_to_string(&path)?;
            // The edge's refusals: `reply_err(m, "label", …)` and
            // `BadPayload { label: "…" }` end up in `fanout_client_errors_total`.
            let refusal = |at: &str| {
                let rest = at.trim_start();
                let rest = rest.strip_prefix('&').unwrap_or(rest);
                let rest = rest.strip_prefix("m,")?.trim_start().strip_prefix('"')?;
                rest.split('"').next().map(str::to_owned)
            };
            for (at, _) in text.match_indices("reply_err(") {
                if let Some(value) = refusal(&text[at + "reply_err(".len()..]) {
                    labels.insert(("fanout_client_errors_total".to_owned(), value));
                }
            }
            for (at, _) in text.match_indices("label: \"") {
                let value = text[at + "label: \"".len()..].split('"').next().unwrap_or("");
                labels.insert(("fanout_client_errors_total".to_owned(), value.to_owned()));
            }
            for kind in ["counter", "gauge", "histogram"] {
                let call = format!("metrics::{kind}!(");
                for (at, _) in text.match_indices(&call) {
                    let rest = text[at + call.len()..].trim_start();
                    let Some(name) = rest.strip_prefix('"').and_then(|r| r.split('"').next()) else {
                        continue; // a name from a variable (the recorder's own loop)
                    };
                    names.insert((name.to_owned(), kind));
                    // `"key" => "value"` inside this call, before its `)`.
                    let args = &rest[..rest.find(')').unwrap_or(rest.len())];
                    if let Some((_, v)) = args.split_once("=> \"") {
                        labels.insert((name.to_owned(), v.split('"').next().unwrap_or("").to_owned()));
                    }
                }
            }
        }
    }
    Ok(Emitted { names, labels })
}

#[test]
fn every_emitted_metric_and_label_is_declared() -> Result<()> {
    let crates: [(&str, &[&[Metric]]); 4] = [
        ("crates/fanout-edge", &[fanout_edge::METRICS]),
        ("crates/fanout-bus", &[fanout_bus::METRICS]),
        ("crates/fanout-cdc", &[fanout_cdc::METRICS]),
        (
            "crates/fanout-presence",
            &[fanout_presence::STORE_METRICS, fanout_presence::SWEEPER_METRICS],
        ),
    ];
    let mut problems = Vec::new();
    for (dir, tables) in crates {
        let declared: Vec<&Metric> = tables.iter().flat_map(|t| t.iter()).collect();
        let Emitted { names, labels } = emitted(dir)?;
        anyhow::ensure!(!names.is_empty(), "found no metrics in {dir}: the scan is broken");
        for (name, kind) in &names {
            let found = declared.iter().find(|m| m.name == name);
            let declared_kind = found.map(|m| kind_name(m.kind));
            if declared_kind != Some(*kind) {
                problems.push(format!("{dir} emits {kind} {name}, declared as {declared_kind:?}"));
            }
        }
        for (name, value) in &labels {
            let ok = declared
                .iter()
                .find(|m| m.name == name)
                .and_then(|m| m.label)
                .is_some_and(|(_, values)| values.contains(&value.as_str()));
            if !ok {
                problems.push(format!("{dir} emits {name} with label value {value:?}, not declared"));
            }
        }
    }
    anyhow::ensure!(problems.is_empty(), "{problems:#?}");
    Ok(())
}
