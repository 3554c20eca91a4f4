//! A private Prometheus (the server from Debian's `prometheus` package,
//! unpacked by tests/run.sh) that scrapes every fanout process of a chaos
//! run each second with the Helm chart's alert rules loaded, and the
//! questions the run asks it over its HTTP API.
//!
//! The rules are the chart's files with every duration (`for:`, range
//! selectors, `offset`) divided by the run's time scale, so an alert meant
//! to fire after minutes fires after seconds in a short run; expressions
//! and thresholds are unchanged. A time scale of 1 loads them as shipped.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::Value;

pub struct Prometheus {
    child: Child,
    pub port: u16,
    dir: PathBuf,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// One alert's firing, in seconds since the Unix epoch.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Firing {
    pub alert: String,
    pub labels: String,
    pub from: f64,
    pub to: f64,
}

impl Prometheus {
    /// Starts `bin` scraping `targets` (name, role, admin port) with the
    /// rule files `rules`, their durations divided by `scale`.
    pub async fn start(
        bin: &Path,
        targets: &[(String, &'static str, u16)],
        rules: &[PathBuf],
        scale: u32,
    ) -> Result<Self> {
        anyhow::ensure!(
            bin.is_file(),
            "{} not found: tests/run.sh unpacks it from Debian's prometheus package",
            bin.display()
        );
        let port = fanout_tests::free_port();
        let dir = std::env::temp_dir().join(format!("fanout-chaos-prometheus-{}-{port}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let mut rule_files = Vec::new();
        for (i, r) in rules.iter().enumerate() {
            let text = std::fs::read_to_string(r).with_context(|| format!("reading {}", r.display()))?;
            let out = dir.join(format!("rules-{i}.yaml"));
            std::fs::write(&out, scale_durations(&text, scale))?;
            rule_files.push(format!("  - {}\n", out.display()));
        }
        let static_configs: String = targets
            .iter()
            .map(|(name, role, admin)| {
                format!(
                    "      - targets: ['127.0.0.1:{admin}']\n        labels: {{instance: '{name}', role: '{role}'}}\n"
                )
            })
            .collect();
        let config = format!(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 900ms\n  evaluation_interval: 1s\n\
             rule_files:\n{}scrape_configs:\n  - job_name: fanout\n    static_configs:\n{static_configs}",
            rule_files.concat()
        );
        std::fs::write(dir.join("prometheus.yml"), config)?;
        let child = Command::new(bin)
            .arg(format!("--config.file={}", dir.join("prometheus.yml").display()))
            .arg(format!("--storage.tsdb.path={}", dir.join("data").display()))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .arg("--log.level=warn")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("log"))?)
            .spawn()
            .with_context(|| format!("spawning {}", bin.display()))?;
        let me = Self { child, port, dir };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok((200, _)) = fanout_tests::http_get(port, "/-/ready").await {
                break;
            }
            if Instant::now() > deadline {
                let log = std::fs::read_to_string(me.dir.join("log")).unwrap_or_default();
                bail!("Prometheus was not ready within 30 s: {log}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Ok(me)
    }

    async fn get(&self, path: &str) -> Result<Value> {
        let (status, body) = fanout_tests::http_get(self.port, path).await?;
        anyhow::ensure!(status == 200, "Prometheus {path}: {status} {body}");
        let v: Value = serde_json::from_str(&body)?;
        anyhow::ensure!(v["status"] == "success", "Prometheus {path}: {body}");
        Ok(v["data"].clone())
    }

    /// The rules Prometheus loaded (how many alerting rules).
    pub async fn alert_rules(&self) -> Result<usize> {
        let data = self.get("/api/v1/rules?type=alert").await?;
        Ok(data["groups"]
            .as_array()
            .map_or(0, |g| g.iter().map(|g| g["rules"].as_array().map_or(0, Vec::len)).sum()))
    }

    /// Alerts pending or firing now: (name, state).
    pub async fn active_alerts(&self) -> Result<Vec<(String, String)>> {
        let data = self.get("/api/v1/alerts").await?;
        Ok(data["alerts"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|a| {
                (
                    a["labels"]["alertname"].as_str().unwrap_or("").to_owned(),
                    a["state"].as_str().unwrap_or("").to_owned(),
                )
            })
            .collect())
    }

    /// Waits (at most a minute) until every target has been scraped and is
    /// up, and no alert is pending or firing: Prometheus's scrape manager
    /// starts its targets seconds after the server is ready, and until then
    /// an `absent()` rule would start pending on a healthy cluster.
    pub async fn wait_settled(&self, targets: usize) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let data = self.get("/api/v1/targets?state=active").await?;
            let up = data["activeTargets"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|t| t["health"] == "up")
                .count();
            let active = self.active_alerts().await?;
            if up == targets && active.is_empty() {
                return Ok(());
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "Prometheus did not settle within 60 s: {up} of {targets} targets up, alerts {active:?}"
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// The value of an instant query `q` that yields one number (0 when it
    /// yields none).
    pub async fn scalar(&self, q: &str) -> Result<f64> {
        let data = self.get(&format!("/api/v1/query?query={}", encode(q))).await?;
        Ok(data["result"][0]["value"][1]
            .as_str()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0))
    }

    /// Every alert that fired between `from` and `to` (Unix seconds), from
    /// the `ALERTS` series, one entry per uninterrupted firing.
    pub async fn firings(&self, from: f64, to: f64) -> Result<Vec<Firing>> {
        let q = encode(r#"ALERTS{alertstate="firing"}"#);
        let data = self
            .get(&format!(
                "/api/v1/query_range?query={q}&start={from:.3}&end={to:.3}&step=1"
            ))
            .await?;
        let mut out = Vec::new();
        for series in data["result"].as_array().into_iter().flatten() {
            let m = &series["metric"];
            let alert = m["alertname"].as_str().unwrap_or("").to_owned();
            let labels = m
                .as_object()
                .map(|o| {
                    o.iter()
                        .filter(|(k, _)| !matches!(k.as_str(), "__name__" | "alertname" | "alertstate" | "severity"))
                        .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or("")))
                        .collect::<Vec<_>>()
                        .join(",")
                })
                .unwrap_or_default();
            let mut current: Option<(f64, f64)> = None;
            for point in series["values"].as_array().into_iter().flatten() {
                let t = point[0].as_f64().unwrap_or(0.0);
                current = match current {
                    Some((a, b)) if t - b <= 2.5 => Some((a, t)),
                    Some((a, b)) => {
                        out.push(Firing {
                            alert: alert.clone(),
                            labels: labels.clone(),
                            from: a,
                            to: b,
                        });
                        Some((t, t))
                    }
                    None => Some((t, t)),
                };
            }
            if let Some((a, b)) = current {
                out.push(Firing {
                    alert: alert.clone(),
                    labels: labels.clone(),
                    from: a,
                    to: b,
                });
            }
        }
        out.sort_by(|a, b| a.from.total_cmp(&b.from));
        Ok(out)
    }
}

/// Percent-encodes a query parameter.
fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// `text` (a rule file) with each duration after `for:`, inside `[...]` and
/// after `offset` divided by `scale` (at least one second).
pub fn scale_durations(text: &str, scale: u32) -> String {
    if scale <= 1 {
        return text.to_owned();
    }
    let scale_one = |d: &str| -> Option<String> {
        let (num, unit) = d.split_at(d.find(|c: char| !c.is_ascii_digit())?);
        let n: u64 = num.parse().ok()?;
        let secs = n * match unit {
            "s" => 1,
            "m" => 60,
            "h" => 3600,
            _ => return None,
        };
        Some(format!("{}s", (secs / u64::from(scale)).max(1)))
    };
    let mut out = String::with_capacity(text.len());
    for line in text.lines() {
        let trimmed = line.trim_start();
        if let Some(d) = trimmed.strip_prefix("for:")
            && let Some(scaled) = scale_one(d.trim())
        {
            out.push_str(&line[..line.len() - trimmed.len()]);
            out.push_str("for: ");
            out.push_str(&scaled);
            out.push('\n');
            continue;
        }
        if trimmed.starts_with('#') || trimmed.starts_with("summary:") || trimmed.starts_with("description:") {
            out.push_str(line);
            out.push('\n');
            continue;
        }
        let mut rest = line;
        while !rest.is_empty() {
            // The next `[dur]` or `offset dur`.
            let bracket = rest.find('[');
            let offset = rest.find("offset ");
            let (at, skip, close) = match (bracket, offset) {
                (Some(b), Some(o)) if o < b => (o, 7, None),
                (Some(b), _) => (b, 1, Some(']')),
                (None, Some(o)) => (o, 7, None),
                (None, None) => {
                    out.push_str(rest);
                    break;
                }
            };
            out.push_str(&rest[..at + skip]);
            rest = &rest[at + skip..];
            let end = match close {
                Some(c) => rest.find(c).unwrap_or(rest.len()),
                None => rest.find(|c: char| !c.is_ascii_alphanumeric()).unwrap_or(rest.len()),
            };
            match scale_one(&rest[..end]) {
                Some(s) => out.push_str(&s),
                None => out.push_str(&rest[..end]),
            }
            rest = &rest[end..];
        }
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_are_scaled_and_nothing_else_changes() {
        let rule = "      - alert: X\n        expr: |\n          sum(rate(a_total[5m])) > 0.5 * sum(b offset 10m)\n        for: 2m\n        annotations:\n          summary: \"over 10 minutes [5m]\"\n";
        let scaled = scale_durations(rule, 30);
        assert!(
            scaled.contains("sum(rate(a_total[10s])) > 0.5 * sum(b offset 20s)"),
            "{scaled}"
        );
        assert!(scaled.contains("        for: 4s\n"), "{scaled}");
        assert!(scaled.contains("summary: \"over 10 minutes [5m]\""), "{scaled}");
        assert_eq!(scale_durations(rule, 1), rule);
        assert!(scale_durations("  for: 1m\n", 120).contains("for: 1s"));
    }
}
