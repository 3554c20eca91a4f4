//! The Helm chart (`helm/fanout`), its alert rules and its dashboard.
//!
//! There is no `helm` binary here, so `tests/helm/render.go` renders the
//! chart as Helm 3 does (Go templates, sprig, Helm's own functions);
//! `tests/run.sh` builds it to `target/helm/render` and installs
//! `kubernetes-validate` (offline Kubernetes schemas) and `promtool`. The
//! tests then check what a cluster would get: valid objects, clear refusals
//! of incomplete or mistyped values (the chart's `values.schema.json`), settings the binary really accepts (an edge is
//! started with the chart's environment), and alerts and dashboard panels
//! that only name metrics fanout exports.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::{Command, Output};
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use fanout_tests::{Fanout, Nats, Redis, WsClient, fanout_bin, free_port, nats_args, repo_root};
use serde_json::Value;

fn tool(name: &str) -> PathBuf {
    repo_root().join("target/helm").join(name)
}

fn chart() -> PathBuf {
    repo_root().join("helm/fanout")
}

fn ci_values(name: &str) -> PathBuf {
    chart().join("ci").join(name)
}

fn run(cmd: &mut Command) -> Result<Output> {
    let out = cmd
        .output()
        .with_context(|| format!("running {cmd:?} (tests/run.sh installs it)"))?;
    Ok(out)
}

/// Renders the chart with `values` files (and `extra` flags).
fn render(values: &[PathBuf], extra: &[&str]) -> Result<Output> {
    let mut cmd = Command::new(tool("render"));
    for v in values {
        cmd.arg("-f").arg(v);
    }
    run(cmd.args(extra).arg(chart()))
}

/// Renders and parses the objects, failing with the renderer's error.
fn objects(values: &[PathBuf]) -> Result<Vec<Value>> {
    let out = render(values, &["-json"])?;
    ensure!(
        out.status.success(),
        "render failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(serde_json::from_slice(&out.stdout)?)
}

/// The rendered object of that kind and name.
fn find<'a>(objs: &'a [Value], kind: &str, name: &str) -> Result<&'a Value> {
    objs.iter()
        .find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
        .with_context(|| format!("no {kind} {name}"))
}

fn kinds_and_names(objs: &[Value]) -> BTreeSet<(String, String)> {
    objs.iter()
        .map(|o| {
            (
                o["kind"].as_str().unwrap_or_default().to_owned(),
                o["metadata"]["name"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect()
}

#[test]
fn every_ci_values_file_renders_objects_kubernetes_accepts() -> Result<()> {
    let dir = std::env::temp_dir().join(format!("fanout-helm-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    for name in ["minimal-values.yaml", "full-values.yaml"] {
        let out = render(&[ci_values(name)], &[])?;
        ensure!(out.status.success(), "{name}: {}", String::from_utf8_lossy(&out.stderr));
        let file = dir.join(name);
        std::fs::write(&file, &out.stdout)?;
        let check = run(Command::new(tool("venv/bin/kubernetes-validate"))
            .args(["--strict", "-k", "1.29.0"])
            .arg(&file))?;
        ensure!(
            check.status.success(),
            "{name} does not validate:\n{}{}",
            String::from_utf8_lossy(&check.stdout),
            String::from_utf8_lossy(&check.stderr)
        );
    }
    std::fs::remove_dir_all(&dir)?;

    // What each values file deploys.
    let minimal_objs = objects(&[ci_values("minimal-values.yaml")])?;
    let minimal = kinds_and_names(&minimal_objs);
    let expected: BTreeSet<(String, String)> = [
        ("Deployment", "fanout-edge"),
        ("Service", "fanout-edge"),
        ("Service", "fanout-edge-admin"),
        ("PodDisruptionBudget", "fanout-edge"),
        ("Secret", "fanout-jwt"),
        ("ConfigMap", "fanout-config"),
    ]
    .into_iter()
    .map(|(k, n)| (k.to_owned(), n.to_owned()))
    .collect();
    assert_eq!(minimal, expected, "minimal values: edges only, per-edge presence");

    let full = objects(&[ci_values("full-values.yaml")])?;
    let names = kinds_and_names(&full);
    for want in [
        ("Deployment", "fanout-presence"),
        ("Service", "fanout-presence"),
        ("PodDisruptionBudget", "fanout-presence"),
        ("Deployment", "fanout-cdc"),
        ("PodDisruptionBudget", "fanout-cdc"),
        ("HorizontalPodAutoscaler", "fanout-edge"),
        ("ServiceMonitor", "fanout"),
        ("PrometheusRule", "fanout"),
        ("PrometheusRule", "fanout-cdc"),
        ("ConfigMap", "fanout-dashboard"),
        ("Service", "fanout-api"),
    ] {
        assert!(
            names.contains(&(want.0.to_owned(), want.1.to_owned())),
            "full values lack {want:?}"
        );
    }
    assert!(
        !names.iter().any(|(k, _)| k == "Secret"),
        "an existing JWT Secret must not be created again"
    );
    // The autoscaler owns the replica count.
    let edge = find(&full, "Deployment", "fanout-edge")?;
    assert!(edge["spec"].get("replicas").is_none());
    // The pre-stop pause (5 s) and draining (20 s) must finish inside the
    // pod's grace period, with the shutdown grace (10 s) and a margin.
    assert_eq!(edge["spec"]["template"]["spec"]["terminationGracePeriodSeconds"], 40);
    // Metrics never on the client-facing Service.
    let public = find(&full, "Service", "fanout-edge")?;
    let ports: Vec<&str> = public["spec"]["ports"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|p| p["name"].as_str())
        .collect();
    assert_eq!(ports, ["ws"]);
    // Socket.IO long-polling sessions stay on their edge when asked.
    assert_eq!(public["spec"]["sessionAffinity"], "ClientIP");
    let minimal_public = find(&minimal_objs, "Service", "fanout-edge")?;
    assert_eq!(minimal_public["spec"]["sessionAffinity"], "None");
    // The server API has its own cluster-internal Service.
    let api = find(&full, "Service", "fanout-api")?;
    assert_eq!(api["spec"]["type"], "ClusterIP");
    assert_eq!(api["spec"]["ports"][0]["targetPort"], "api");
    // Every scraped target carries its role, which FanoutEdgeDown selects
    // on (up{role="edge"}): from the admin Services' component label.
    let monitor = find(&full, "ServiceMonitor", "fanout")?;
    let relabel = &monitor["spec"]["endpoints"][0]["relabelings"][0];
    assert_eq!(relabel["targetLabel"], "role");
    assert_eq!(
        relabel["sourceLabels"][0],
        "__meta_kubernetes_service_label_app_kubernetes_io_component"
    );
    let edge_admin = find(&full, "Service", "fanout-edge-admin")?;
    assert_eq!(edge_admin["metadata"]["labels"]["app.kubernetes.io/component"], "edge");
    // The dashboard ConfigMap carries valid JSON.
    let cm = find(&full, "ConfigMap", "fanout-dashboard")?;
    let dashboard: Value = serde_json::from_str(cm["data"]["fanout.json"].as_str().context("fanout.json")?)?;
    assert_eq!(dashboard["uid"], "fanout-overview");
    Ok(())
}

#[test]
fn incomplete_or_mistyped_values_are_refused_with_the_reason() -> Result<()> {
    let dir = std::env::temp_dir().join(format!("fanout-helm-bad-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let cases = [
        ("no-nats.yaml", "jwt: {secret: s}\n", "nats.url is required"),
        (
            "no-jwt.yaml",
            "nats: {url: 'nats://n:4222'}\n",
            "set jwt.existingSecret or jwt.secret",
        ),
        (
            "cdc-no-db.yaml",
            "nats: {url: 'nats://n:4222'}\njwt: {secret: s}\ncdc: {enabled: true}\n",
            "cdc.databaseSecret is required",
        ),
        // values.schema.json, checked as Helm checks it: a typo and a wrong type.
        (
            "typo.yaml",
            "nats: {url: 'nats://n:4222'}\njwt: {secret: s}\nedge: {replica: 3, drainSecs: ten}\n",
            "- edge: Additional property replica is not allowed\n- edge.drainSecs: Invalid type. Expected: integer, given: string",
        ),
    ];
    for (file, yaml, reason) in cases {
        let path = dir.join(file);
        std::fs::write(&path, yaml)?;
        let out = render(&[path], &[])?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{file} rendered");
        // (each line on its own: the schema's errors come in no set order)
        for line in reason.lines() {
            assert!(stderr.contains(line), "{file}: expected {line:?}, got {stderr}");
        }
    }
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

/// The `env` of a rendered container: literal values, and secret references
/// resolved with `secret`.
fn container_env(deployment: &Value, secret: &str) -> Vec<(String, String)> {
    deployment["spec"]["template"]["spec"]["containers"][0]["env"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|e| {
            let value = match e["value"].as_str() {
                Some(v) => v.to_owned(),
                None => secret.to_owned(),
            };
            (e["name"].as_str().unwrap_or_default().to_owned(), value)
        })
        .collect()
}

#[test]
fn every_setting_the_chart_passes_is_one_the_binary_knows() -> Result<()> {
    let full = objects(&[ci_values("full-values.yaml")])?;
    let mut roles = 0;
    for d in full.iter().filter(|o| o["kind"] == "Deployment") {
        let role = d["spec"]["template"]["spec"]["containers"][0]["args"][0]
            .as_str()
            .context("role argument")?;
        let help = run(Command::new(fanout_bin()).args([role, "--help"]))?;
        ensure!(help.status.success(), "fanout {role} --help failed");
        let help = String::from_utf8_lossy(&help.stdout);
        for (name, _) in container_env(d, "") {
            assert!(
                help.contains(&format!("[env: {name}")),
                "the chart sets {name} for `fanout {role}`, which does not know it"
            );
        }
        roles += 1;
    }
    assert_eq!(roles, 3, "edge, presence and cdc");
    Ok(())
}

#[tokio::test]
async fn an_edge_starts_and_is_ready_with_the_charts_environment() -> Result<()> {
    let nats = Nats::start().await?;
    let redis = Redis::start().await?;
    let full = objects(&[ci_values("full-values.yaml")])?;
    let edge = find(&full, "Deployment", "fanout-edge")?;
    // The config file the chart renders from `config`, with whole numbers
    // as TOML integers (values arrive as floats).
    let toml = find(&full, "ConfigMap", "fanout-config")?["data"]["fanout.toml"]
        .as_str()
        .context("fanout.toml")?
        .to_owned();
    for line in [
        "postgres_changes = true",
        "[limits]",
        "max_connections = 50000",
        "max_age_secs = 600",
        "bind_presence_key = true",
        r#"channels = [{ "pattern" = "workshop:{id}", "read" = "{id} in claims.workshops", "write" = "{id} in claims.workshops and claims.role == 'facilitator'" }]"#,
    ] {
        assert!(toml.lines().any(|l| l == line), "{line:?} not in\n{toml}");
    }
    let config = std::env::temp_dir().join(format!("fanout-helm-{}.toml", std::process::id()));
    std::fs::write(&config, &toml)?;
    // The chart's environment as the pod gets it: the JWT secret resolved
    // from its Secret, the config file from its ConfigMap. The addresses of
    // the cluster's services do not exist here: flags (which win over the
    // environment and the file) point the edge at loopback instead, and the
    // NATS credentials file is not mounted. An unknown key or a bad value in
    // either would stop the edge (exit 64).
    // The PEM keys the chart mounts from auth.keysSecret are the test key
    // files here.
    let keys_dir = repo_root().join("crates/fanout-core/testdata/keys/");
    let api_port = free_port();
    let env: Vec<(String, String)> = container_env(edge, "chart-test-secret")
        .into_iter()
        .filter(|(k, _)| k != "FANOUT_NATS_CREDENTIALS_FILE")
        .map(|(k, v)| match k.as_str() {
            "FANOUT_CONFIG" => (k, config.display().to_string()),
            // Loopback here, as every test listener.
            "FANOUT_API_LISTEN" => {
                assert_eq!(v, "0.0.0.0:9700");
                (k, format!("127.0.0.1:{api_port}"))
            }
            "FANOUT_AUTH_PUBLIC_KEYS" => {
                assert_eq!(v, "2026-12=ES256:/etc/fanout/keys/ec.pub");
                let v = v.replace("/etc/fanout/keys/", &keys_dir.display().to_string());
                (k, v)
            }
            _ => (k, v),
        })
        .collect();
    assert!(
        env.iter().any(|(k, _)| k == "FANOUT_AUTH_PROJECT_KEYS"),
        "project keys from their Secret"
    );
    let env_refs: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let (nurl, rurl) = (nats.url(), redis.url());
    let mut args = nats_args(&nurl).to_vec();
    args.extend(["--nats-replicas", "1", "--redis-url", rurl.as_str()]);
    let fanout = Fanout::start_role("edge", free_port(), &args, &env_refs).await?;
    fanout.wait_ready(Duration::from_secs(15)).await?;
    // The secret is in force: a client without a token is refused (401).
    let Err(refused) = WsClient::connect(fanout.port, &fanout.ws_path("1.0.0", None)).await else {
        bail!("an edge with the chart's JWT secret accepted a client without a token");
    };
    assert!(
        format!("{refused:#}").contains("401"),
        "refused, but not as unauthorized: {refused:#}"
    );
    // The API keys from their Secret open the server API.
    let (status, body) = fanout_tests::http_request(
        api_port,
        "GET",
        "/api/v1/info",
        &[("authorization", "Bearer chart-test-secret")],
        bytes::Bytes::new(),
    )
    .await?;
    assert_eq!(status, 200, "{body}");
    std::fs::remove_file(&config)?;
    Ok(())
}

/// Every alert rule the chart deploys links its runbook entry
/// (docs/RUNBOOKS.md), and has a promtool unit test in which it fires.
#[test]
fn every_alert_has_a_runbook_entry_and_a_unit_test_that_fires_it() -> Result<()> {
    let full = objects(&[ci_values("full-values.yaml")])?;
    let runbooks = std::fs::read_to_string(repo_root().join("docs/RUNBOOKS.md"))?;
    let tests = std::fs::read_to_string(repo_root().join("tests/helm/alerts_test.yaml"))?;
    let test_lines: Vec<&str> = tests.lines().map(str::trim).collect();
    // `alertname: X` followed by a non-empty `exp_alerts:` list.
    let fired: BTreeSet<&str> = test_lines
        .windows(2)
        .filter(|w| w[1] == "exp_alerts:")
        .filter_map(|w| w[0].strip_prefix("alertname: "))
        .collect();
    let mut alerts = 0;
    for rule_set in full.iter().filter(|o| o["kind"] == "PrometheusRule") {
        for group in rule_set["spec"]["groups"].as_array().context("groups")? {
            for rule in group["rules"].as_array().context("rules")? {
                let name = rule["alert"].as_str().context("an alert rule")?;
                let url = rule["annotations"]["runbook_url"].as_str().unwrap_or_default();
                ensure!(
                    url == format!("docs/RUNBOOKS.md#{}", name.to_lowercase()),
                    "{name}: runbook_url {url:?}"
                );
                ensure!(
                    runbooks.lines().any(|l| l == format!("## {name}")),
                    "{name}: no entry in docs/RUNBOOKS.md"
                );
                ensure!(
                    fired.contains(name),
                    "{name}: no unit test in alerts_test.yaml fires it"
                );
                alerts += 1;
            }
        }
    }
    ensure!(alerts >= 16, "only {alerts} alert rules rendered");
    let entries = runbooks.lines().filter(|l| l.starts_with("## ")).count();
    ensure!(entries == alerts, "{entries} runbook entries for {alerts} alerts");
    Ok(())
}

#[test]
fn alert_rules_pass_promtool_and_their_unit_tests() -> Result<()> {
    let check = run(Command::new(tool("promtool"))
        .args(["check", "rules"])
        .arg(chart().join("files/alerts.yaml"))
        .arg(chart().join("files/alerts-cdc.yaml")))?;
    ensure!(check.status.success(), "{}", String::from_utf8_lossy(&check.stdout));
    let tests = repo_root().join("tests/helm/alerts_test.yaml");
    let test = run(Command::new(tool("promtool")).args(["test", "rules"]).arg(&tests))?;
    ensure!(
        test.status.success(),
        "{}{}",
        String::from_utf8_lossy(&test.stdout),
        String::from_utf8_lossy(&test.stderr)
    );
    Ok(())
}

/// Every `fanout_*` metric name in `text`, without histogram suffixes.
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let bytes = text.as_bytes();
    let mut i = 0;
    while let Some(at) = text[i..].find("fanout_") {
        let start = i + at;
        let mut end = start;
        while end < bytes.len() && (bytes[end].is_ascii_lowercase() || bytes[end] == b'_') {
            end += 1;
        }
        let name = &text[start..end];
        let name = name
            .strip_suffix("_bucket")
            .or_else(|| name.strip_suffix("_sum"))
            .or_else(|| name.strip_suffix("_count"))
            .unwrap_or(name);
        // A bare `fanout_` is a prefix in a regex, not a name.
        if name != "fanout_" {
            names.insert(name.to_owned());
        }
        i = end;
    }
    names
}

/// The metric names the code registers: string literals `"fanout_…"`.
fn exported_metrics() -> Result<BTreeSet<String>> {
    let mut found = BTreeSet::new();
    let mut dirs = vec![repo_root().join("crates")];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir)? {
            let path = entry?.path();
            if path.is_dir() {
                dirs.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                let text = std::fs::read_to_string(&path)?;
                for part in text.split('"').skip(1).step_by(2) {
                    if part.starts_with("fanout_") && part.bytes().all(|b| b.is_ascii_lowercase() || b == b'_') {
                        found.insert(part.to_owned());
                    }
                }
            }
        }
    }
    Ok(found)
}

#[test]
fn alerts_and_dashboard_name_only_metrics_fanout_exports() -> Result<()> {
    let exported = exported_metrics()?;
    if !exported.contains("fanout_connections") {
        bail!("found no metric names in crates/: {exported:?}");
    }
    for file in ["files/alerts.yaml", "files/alerts-cdc.yaml", "files/dashboard.json"] {
        let text = std::fs::read_to_string(chart().join(file))?;
        let used = metric_names(&text);
        assert!(used.len() >= 3, "{file} names only {used:?}");
        let unknown: Vec<_> = used.difference(&exported).collect();
        assert!(
            unknown.is_empty(),
            "{file} names metrics fanout does not export: {unknown:?}"
        );
    }
    Ok(())
}
