//! The short seeded chaos run (issue 18): `fanout-loadtest --scenario chaos`
//! starts two edges, a three-node NATS cluster, Redis, PostgreSQL, the
//! presence role, an ingester and a private Prometheus with the chart's alert
//! rules, puts a workshop load on them and kills or restarts every component
//! kind at least once. The load tester fails on any lost, duplicated,
//! reordered or phantom message, on presence that does not converge, and on
//! an alert that did not fire, did not resolve or was unrelated; this test
//! runs it and reads its report.

use std::process::Command;

use anyhow::{Context, Result, ensure};
use fanout_tests::{fanout_bin, repo_root};

#[test]
fn every_message_is_accounted_for_while_every_component_is_killed() -> Result<()> {
    let loadtest = fanout_bin().with_file_name("fanout-loadtest");
    ensure!(loadtest.is_file(), "{} is not built", loadtest.display());
    let report = std::env::temp_dir().join(format!("fanout-chaos-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&report);
    let status = Command::new(&loadtest)
        .args([
            "--scenario",
            "chaos",
            "--seed",
            "7",
            "--users",
            "300",
            "--duration",
            "150",
        ])
        .args(["--chat-rate", "12", "--rate", "5", "--activity-rate", "6"])
        .arg("--prometheus")
        .arg(repo_root().join("target/helm/prometheus"))
        .arg("--report")
        .arg(&report)
        .status()
        .context("running fanout-loadtest")?;
    let text = std::fs::read_to_string(report.join("chaos.json")).context("the run wrote no chaos.json")?;
    let r: serde_json::Value = serde_json::from_str(&text)?;
    let a = &r["account"];
    for what in [
        "lost",
        "duplicated",
        "reordered",
        "phantom",
        "inconsistent",
        "resyncs",
        "users_not_live_at_end",
    ] {
        ensure!(a[what] == 0, "{what}: {} in {text}", a[what]);
    }
    ensure!(
        a["checked"].as_u64().unwrap_or(0) > 10_000,
        "too few deliveries checked: {}",
        a["checked"]
    );
    let kinds: Vec<&str> = r["faults"]
        .as_array()
        .context("faults")?
        .iter()
        .filter_map(|f| f["kind"].as_str())
        .collect();
    for kind in [
        "edge-kill",
        "edge-drain",
        "nats-node-kill",
        "ingester-kill",
        "redis-kill",
        "postgres-restart",
    ] {
        ensure!(kinds.contains(&kind), "no {kind} among the faults {kinds:?}");
    }
    ensure!(
        r["alert_problems"].as_array().is_some_and(Vec::is_empty),
        "alerts: {}",
        r["alert_problems"]
    );
    ensure!(r["alerts_resolved"] == true, "alerts still firing at the end");
    ensure!(r["passed"] == true && status.success(), "the chaos run failed: {text}");
    let _ = std::fs::remove_dir_all(&report);
    Ok(())
}
