//! `--scenario chaos`: a workshop load (broadcasts with acks, presence,
//! server-API publishes and database changes through `fanout cdc`) against
//! two or more edges on a three-node NATS JetStream cluster, while a seeded
//! schedule kills and restarts every component in turn: an edge (SIGKILL),
//! an edge drained with SIGTERM, a NATS node, the ingester, Redis, and a
//! PostgreSQL restart. The run starts every process itself (private state,
//! loopback ports) and a real Prometheus that scrapes them with the Helm
//! chart's alert rules.
//!
//! At the end it accounts for every message per channel and per client
//! ([`account::check`]), checks that presence converged to the connected
//! users within its bound, times each fault's recovery, and asks
//! Prometheus which alerts fired: each fault's own alert must have fired
//! and every alert must have resolved, and none unrelated to a fault may
//! have fired. It exits non-zero on any failure.

mod account;
mod clients;
mod cluster;
mod faults;
mod prom;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use self::account::{Account, Key, Ledger, Ms, Outcome, Sent, UserLog};
use self::clients::{UserPlan, World};
use self::cluster::Cluster;
use self::faults::{Kind, Planned};
use crate::client::Target;

/// What a client alone needs to notice a dead connection and reconnect:
/// realtime-js's heartbeat interval (25 s) plus its first reconnect step (1 s).
pub const CLIENT_NOTICE_MS: u64 = 26_000;
/// An event that took longer than this from send to its last receiver (or
/// was not acknowledged) was disturbed by the fault before it.
const DISTURBED_MS: u64 = 1_000;
/// Load before the first fault (the alert rules' rate windows fill).
const WARMUP: Duration = Duration::from_secs(15);
/// After the last fault is restored, before publishing stops.
const SETTLE: Duration = Duration::from_secs(20);

/// The knobs of a run (from the load tester's flags).
#[derive(Debug, Clone)]
pub struct Options {
    pub seed: u64,
    pub users: u32,
    pub workshops: u32,
    pub edges: usize,
    pub duration: Duration,
    pub chat_every: Duration,
    pub api_every: Duration,
    pub row_every: Duration,
    pub alert_time_scale: u32,
    pub prometheus: PathBuf,
    pub report: Option<PathBuf>,
}

#[derive(Debug, Serialize)]
struct FaultReport {
    kind: Kind,
    target: String,
    at_ms: Ms,
    restored_ms: Ms,
    /// From the fault to every affected client live again (rejoined, and
    /// every disturbed message delivered or answered).
    recovery_ms: Ms,
    /// `recovery_ms` / [`CLIENT_NOTICE_MS`].
    recovery_vs_client_notice: f64,
    clients_disconnected: usize,
    messages_disturbed: usize,
    alert_required: Option<&'static str>,
    alert_fired: bool,
}

#[derive(Debug, Serialize)]
struct Report {
    seed: u64,
    users: u32,
    workshops: u32,
    edges: usize,
    nats_nodes: usize,
    duration_secs: u64,
    alert_time_scale: u32,
    account: Account,
    faults: Vec<FaultReport>,
    presence_converged_after_ms: Option<Ms>,
    presence_bound_ms: Ms,
    alert_rules_loaded: usize,
    alerts: Vec<prom::Firing>,
    alert_problems: Vec<String>,
    /// A fault that could not be injected as planned (it was forced).
    fault_problems: Vec<String>,
    alerts_resolved: bool,
    /// Stream reads an edge found numbered unlike the stream leader (a
    /// nats-server 2.9 bug after a node is killed) and re-read through it.
    nats_replica_divergences: u64,
    /// Stream reads (replays, catch-ups) by how: the leader's message API
    /// alone, or with a consumer for a long range's rest.
    stream_reads_via_leader: u64,
    stream_reads_via_consumer: u64,
    /// Replays retried after a failed stream read.
    replay_retries: u64,
    passed: bool,
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// Runs the chaos scenario; `Ok(false)` when the account or the alerts failed.
pub async fn run(o: Options) -> Result<bool> {
    let plan = faults::schedule(o.seed, WARMUP, o.duration, SETTLE, o.edges, o.alert_time_scale)?;
    eprintln!(
        "chaos: seed {}, {} users in {} workshops, {} edges, {} faults over {} s",
        o.seed,
        o.users,
        o.workshops,
        o.edges,
        plan.len(),
        o.duration.as_secs()
    );
    let mut cluster = Cluster::start(o.edges, o.workshops).await?;
    let root = fanout_tests::repo_root();
    let rules = [
        root.join("helm/fanout/files/alerts.yaml"),
        root.join("helm/fanout/files/alerts-cdc.yaml"),
    ];
    let prometheus = prom::Prometheus::start(&o.prometheus, &cluster.targets(), &rules, o.alert_time_scale).await?;
    let alert_rules_loaded = prometheus.alert_rules().await?;
    anyhow::ensure!(alert_rules_loaded > 0, "Prometheus loaded no alert rules");
    prometheus.wait_settled(cluster.targets().len()).await?;

    let world = Arc::new(World {
        t0: Instant::now(),
        edges: cluster
            .edge_urls()
            .iter()
            .map(|u| Target::parse(u))
            .collect::<Result<_>>()?,
        api_ports: cluster.api_ports.clone(),
        api_key: cluster::API_KEY.into(),
        ledger: Ledger::default(),
        stop_sending: CancellationToken::new(),
        stop: CancellationToken::new(),
    });
    let t0_unix = unix_now();
    let users: Vec<_> = (0..o.users)
        .map(|u| {
            let plan = UserPlan {
                user: u,
                workshop: 1 + u % o.workshops,
                chat_every: o.chat_every,
                seed: o.seed ^ (u64::from(u) << 20),
            };
            tokio::spawn(clients::user(world.clone(), plan))
        })
        .collect();
    wait_all_joined(&world, &cluster, &o).await?;
    let load_start = Instant::now();
    let api = tokio::spawn(clients::api_publisher(world.clone(), o.api_every, o.workshops));
    let rows = tokio::spawn(clients::row_writer(
        world.clone(),
        cluster.pg.url(),
        o.row_every,
        o.workshops,
    ));
    let probe = tokio::spawn(clients::presence_probe(world.clone(), Duration::from_millis(250)));

    let mut injected: Vec<(Planned, String, Ms, Ms)> = Vec::new();
    let mut fault_problems: Vec<String> = Vec::new();
    for p in &plan {
        tokio::time::sleep_until((load_start + p.at).into()).await;
        let at = world.now();
        eprintln!(
            "chaos: {:>6.1} s  {:?} (down {:.1} s)",
            at as f64 / 1000.0,
            p.kind,
            p.down.as_secs_f64()
        );
        let (target, problem) = faults::inject(&mut cluster, p)
            .await
            .with_context(|| format!("injecting {:?}", p.kind))?;
        if let Some(problem) = problem {
            eprintln!("chaos: {problem}");
            fault_problems.push(format!("{:?} at {at} ms: {problem}", p.kind));
        }
        injected.push((*p, target, at, world.now()));
    }
    let last_restored = injected.last().map_or(world.now(), |f| f.3);
    let presence_bound_ms =
        (cluster::PRESENCE_TTL_SECS + cluster::PRESENCE_SWEEP_SECS + cluster::PRESENCE_HEARTBEAT_SECS) * 1000 + 1000;
    let converged = presence_converged(&world, &o, Duration::from_millis(presence_bound_ms) + SETTLE).await;
    let presence_converged_after_ms = converged.map(|t| t.saturating_sub(last_restored));
    tokio::time::sleep_until((load_start + o.duration).into()).await;
    world.stop_sending.cancel();
    let _ = api.await;
    let _ = rows.await;
    let probe = probe.await.unwrap_or_default();
    // The last deliveries (and replays) arrive.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let clients_left = world.now();
    world.stop.cancel();
    let mut logs = Vec::new();
    for u in users {
        logs.push(u.await.context("a user task panicked")?);
    }
    let sent = world.ledger.snapshot();
    let account = account::check(&sent, &logs);

    // Every alert resolves once its fault is over (rate windows roll off).
    let resolve_deadline = Instant::now() + Duration::from_secs(120);
    let alerts_resolved = loop {
        let active = prometheus.active_alerts().await?;
        if active.is_empty() {
            break true;
        }
        if Instant::now() > resolve_deadline {
            eprintln!("chaos: still active after 120 s: {active:?}");
            break false;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    };
    let firings = prometheus.firings(t0_unix, unix_now()).await?;
    // Counters restart with their edge: increase() adds across restarts.
    let run_secs = (unix_now() - t0_unix).ceil() as u64 + 10;
    let total = async |series: &str| -> Result<u64> {
        let query = format!("sum(increase({series}[{run_secs}s]))");
        Ok(prometheus.scalar(&query).await?.round() as u64)
    };
    let nats_replica_divergences = total("fanout_bus_replica_divergence_total").await?;
    let stream_reads_via_leader = total("fanout_bus_stream_reads_total{via=\"leader\"}").await?;
    let stream_reads_via_consumer = total("fanout_bus_stream_reads_total{via=\"consumer\"}").await?;
    let replay_retries = total("fanout_bus_replay_retries_total").await?;
    let (faults, alert_problems) = judge(&injected, &firings, t0_unix, clients_left, &sent, &logs, &probe);

    let presence_ok = presence_converged_after_ms.is_some_and(|t| t <= presence_bound_ms);
    let passed = account.clean()
        && fault_problems.is_empty()
        && alert_problems.is_empty()
        && alerts_resolved
        && presence_ok
        && faults.iter().all(|f| f.alert_required.is_none() || f.alert_fired);
    let report = Report {
        seed: o.seed,
        users: o.users,
        workshops: o.workshops,
        edges: o.edges,
        nats_nodes: 3,
        duration_secs: o.duration.as_secs(),
        alert_time_scale: o.alert_time_scale,
        account,
        faults,
        presence_converged_after_ms,
        presence_bound_ms,
        alert_rules_loaded,
        alerts: firings,
        alert_problems,
        fault_problems,
        alerts_resolved,
        nats_replica_divergences,
        stream_reads_via_leader,
        stream_reads_via_consumer,
        replay_retries,
        passed,
    };
    print_summary(&report);
    if let Some(dir) = &o.report {
        std::fs::create_dir_all(dir)?;
        std::fs::write(dir.join("chaos.json"), serde_json::to_string_pretty(&report)?)?;
        println!("report written to {}/chaos.json", dir.display());
    }
    if let Some(secs) = std::env::var("FANOUT_CHAOS_HOLD_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
    {
        // For a post-mortem: the servers stay up (NATS at the URLs below).
        eprintln!(
            "chaos: holding the cluster for {secs} s; NATS at {}",
            cluster.nats.urls()
        );
        tokio::time::sleep(Duration::from_secs(secs)).await;
    }
    Ok(passed)
}

/// Waits (at most a minute) until every user joined once.
async fn wait_all_joined(world: &World, cluster: &Cluster, o: &Options) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let mut joined = 0.0;
        for e in &cluster.edges {
            if let Ok((200, m)) = fanout_tests::http_get(e.admin_port, "/metrics").await {
                joined += fanout_tests::metric_value(&m, "fanout_channel_members");
            }
        }
        if joined >= f64::from(o.users) {
            return Ok(());
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "only {joined} of {} users joined within 60 s ({} ms into the run)",
            o.users,
            world.now()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Polls every workshop's presence on every edge until each holds exactly
/// its users, once each; the time it did, or `None` within `limit`.
async fn presence_converged(world: &World, o: &Options, limit: Duration) -> Option<Ms> {
    let deadline = Instant::now() + limit;
    let expected: BTreeMap<u32, HashSet<String>> = (0..o.users).fold(BTreeMap::new(), |mut m, u| {
        m.entry(1 + u % o.workshops)
            .or_insert_with(HashSet::new)
            .insert(format!("user-{u}"));
        m
    });
    while Instant::now() < deadline {
        let mut all = true;
        'check: for &port in &world.api_ports {
            for (w, users) in &expected {
                match clients::presence_of(world, port, *w).await {
                    Ok(p) if p.len() == users.len() && p.iter().all(|(k, n)| *n == 1 && users.contains(k)) => {}
                    _ => {
                        all = false;
                        break 'check;
                    }
                }
            }
        }
        if all {
            return Some(world.now());
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    None
}

/// Each fault's recovery and whether its alert fired; and the alert
/// problems: a required alert that did not fire, or one that fired with no
/// fault it is about. `clients_left` is when the run closed every client's
/// connection: the connection-loss alert it fires from then on is the run's
/// own end, not a fault.
fn judge(
    injected: &[(Planned, String, Ms, Ms)],
    firings: &[prom::Firing],
    t0_unix: f64,
    clients_left: Ms,
    sent: &HashMap<Key, Sent>,
    logs: &[UserLog],
    probe: &[(Ms, bool)],
) -> (Vec<FaultReport>, Vec<String>) {
    // When each message reached its last receiver.
    let mut last_delivery: HashMap<Key, Ms> = HashMap::new();
    for log in logs {
        for g in &log.received {
            let e = last_delivery.entry(g.key).or_insert(g.at);
            *e = (*e).max(g.at);
        }
    }
    // An alert is about a fault when it starts between the fault and
    // `ALERT_SLACK` after its restoration.
    const ALERT_SLACK_MS: u64 = 40_000;
    let to_ms = |unix: f64| ((unix - t0_unix) * 1000.0).max(0.0) as u64;
    let mut reports = Vec::new();
    for (i, (p, target, at, restored)) in injected.iter().enumerate() {
        let window_end = injected.get(i + 1).map_or(u64::MAX, |n| n.2);
        let dropped: Vec<&UserLog> = logs
            .iter()
            .filter(|l| l.drops.iter().any(|&d| d >= *at && d <= restored + 2_000))
            .collect();
        let rejoined = dropped
            .iter()
            .filter_map(|l| l.joins.iter().copied().find(|&j| j >= *at))
            .max()
            .unwrap_or(*at);
        let disturbed: Vec<Ms> = sent
            .iter()
            .filter(|(_, s)| s.at >= *at && s.at < window_end)
            .filter_map(|(k, s)| {
                let delivered = last_delivery.get(k).copied();
                let answered = match s.outcome {
                    Outcome::Acked(t) | Outcome::Refused(t) | Outcome::Unknown(t) => t,
                    Outcome::Pending => s.at,
                };
                let done = delivered.unwrap_or(answered).max(answered);
                let bad = !matches!(s.outcome, Outcome::Acked(_)) || done - s.at > DISTURBED_MS;
                bad.then_some(done)
            })
            .collect();
        let presence_back = {
            let in_window: Vec<&(Ms, bool)> = probe.iter().filter(|(t, _)| *t >= *at && *t < window_end).collect();
            match in_window.iter().rposition(|(_, ok)| !ok) {
                Some(last_fail) => in_window
                    .get(last_fail + 1)
                    .map_or(window_end.min(*restored), |(t, _)| *t),
                None => *at,
            }
        };
        let recovered = rejoined
            .max(disturbed.iter().copied().max().unwrap_or(*at))
            .max(presence_back);
        let recovery_ms = recovered - at;
        // It fired when it starts within the fault's window, or was still
        // firing (from the same kind of fault just before: a second Redis
        // kill within the first one's `rate` window) until the component
        // was back.
        let alert_fired = p.kind.required_alert().is_some_and(|name| {
            firings.iter().any(|f| {
                let (from, to) = (to_ms(f.from), to_ms(f.to));
                f.alert == name
                    && ((from >= *at && from <= restored + ALERT_SLACK_MS) || (from < *at && to >= *restored))
            })
        });
        reports.push(FaultReport {
            kind: p.kind,
            target: target.clone(),
            at_ms: *at,
            restored_ms: *restored,
            recovery_ms,
            recovery_vs_client_notice: recovery_ms as f64 / CLIENT_NOTICE_MS as f64,
            clients_disconnected: dropped.len(),
            messages_disturbed: disturbed.len(),
            alert_required: p.kind.required_alert(),
            alert_fired,
        });
    }
    let mut problems = Vec::new();
    for r in &reports {
        if let (Some(name), false) = (r.alert_required, r.alert_fired) {
            problems.push(format!(
                "{name} did not fire for {:?} of {} at {} ms",
                r.kind, r.target, r.at_ms
            ));
        }
    }
    for f in firings {
        let start = to_ms(f.from);
        let name = f.alert.as_str();
        let run_ended = name == "FanoutConnectionsDropped" && start >= clients_left;
        let explained = run_ended
            || injected.iter().any(|(p, _, at, restored)| {
                start >= *at
                    && ((p.kind.allowed_alerts().contains(&name) && start <= restored + ALERT_SLACK_MS)
                        || p.kind.lasting_alerts().contains(&name))
            });
        if !explained {
            problems.push(format!(
                "{} ({}) fired at {} ms with no fault it is about",
                f.alert, f.labels, start
            ));
        }
    }
    (reports, problems)
}

fn print_summary(r: &Report) {
    let a = &r.account;
    println!("\n== fanout-loadtest chaos (seed {}) ==", r.seed);
    println!(
        "{} users in {} workshops on {} edges, {} NATS nodes (R3), {} s; alert rules x1/{} in time",
        r.users, r.workshops, r.edges, r.nats_nodes, r.duration_secs, r.alert_time_scale
    );
    println!(
        "messages sent {} (acked {}, refused {}, unanswered {}); deliveries {}",
        a.sent, a.acked, a.refused, a.unknown, a.delivered
    );
    println!(
        "checked {}  lost {}  duplicated {}  reordered {}  phantom {}  inconsistent {}  resyncs {}  reconnects {}",
        a.checked, a.lost, a.duplicated, a.reordered, a.phantom, a.inconsistent, a.resyncs, a.reconnects
    );
    println!(
        "{:<17} {:<9} {:>8} {:>9} {:>9} {:>7} {:>9}  alert",
        "fault", "target", "at s", "down s", "recov s", "/26 s", "clients"
    );
    for f in &r.faults {
        println!(
            "{:<17} {:<9} {:>8.1} {:>9.1} {:>9.2} {:>7.3} {:>9}  {}",
            format!("{:?}", f.kind),
            f.target,
            f.at_ms as f64 / 1000.0,
            (f.restored_ms - f.at_ms) as f64 / 1000.0,
            f.recovery_ms as f64 / 1000.0,
            f.recovery_vs_client_notice,
            f.clients_disconnected,
            match (f.alert_required, f.alert_fired) {
                (Some(n), true) => format!("{n} fired"),
                (Some(n), false) => format!("{n} DID NOT FIRE"),
                (None, _) => "-".into(),
            }
        );
    }
    match r.presence_converged_after_ms {
        Some(t) => println!(
            "presence converged {:.1} s after the last fault was restored (bound {:.1} s)",
            t as f64 / 1000.0,
            r.presence_bound_ms as f64 / 1000.0
        ),
        None => println!("presence DID NOT converge"),
    }
    println!(
        "stream reads re-read through the leader (a NATS replica disagreed): {}",
        r.nats_replica_divergences
    );
    println!(
        "stream reads: {} through the leader alone, {} went on with a consumer; replays retried: {}",
        r.stream_reads_via_leader, r.stream_reads_via_consumer, r.replay_retries
    );
    println!("alerts fired ({} rules loaded):", r.alert_rules_loaded);
    for f in &r.alerts {
        println!("  {} {{{}}} for {:.0} s", f.alert, f.labels, f.to - f.from + 1.0);
    }
    for p in a.problems.iter().chain(&r.alert_problems).chain(&r.fault_problems) {
        println!("  problem: {p}");
    }
    if !r.alerts_resolved {
        println!("  problem: alerts still active at the end");
    }
    println!("{}", if r.passed { "PASSED" } else { "FAILED" });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn firing(alert: &str, from_ms: u64) -> prom::Firing {
        prom::Firing {
            alert: alert.into(),
            labels: String::new(),
            from: 1000.0 + from_ms as f64 / 1000.0,
            to: 1010.0 + from_ms as f64 / 1000.0,
        }
    }

    #[test]
    fn alerts_are_judged_against_the_faults_and_the_runs_end() {
        let drain = Planned {
            kind: Kind::EdgeDrain,
            target: 0,
            at: Duration::from_secs(10),
            down: Duration::ZERO,
        };
        let injected = [(drain, "edge-0".to_owned(), 10_000, 12_000)];
        let judge_one = |f: prom::Firing| judge(&injected, &[f], 1000.0, 200_000, &HashMap::new(), &[], &[]).1;
        // The drain's edge is gone between its exit and its restart.
        assert!(judge_one(firing("FanoutEdgeDown", 12_500)).is_empty());
        // Connections lost long after the drain, while the clients are still
        // running, are something the run did not cause.
        let unexplained = judge_one(firing("FanoutConnectionsDropped", 150_000));
        assert_eq!(unexplained.len(), 1, "{unexplained:?}");
        assert!(unexplained[0].contains("with no fault it is about"), "{unexplained:?}");
        // Once the run closed every client's connection, losing them is its
        // own end.
        assert!(judge_one(firing("FanoutConnectionsDropped", 204_000)).is_empty());
        // Any other alert after the end still needs a fault.
        assert_eq!(judge_one(firing("FanoutCdcNotStreaming", 204_000)).len(), 1);
    }

    #[test]
    fn an_alert_still_firing_from_the_fault_before_counts_for_the_next() {
        let kill = |at_s| Planned {
            kind: Kind::RedisKill,
            target: 0,
            at: Duration::from_secs(at_s),
            down: Duration::from_secs(15),
        };
        let injected = [
            (kill(10), "redis".to_owned(), 10_000, 25_000),
            (kill(35), "redis".to_owned(), 35_000, 50_000),
        ];
        let fired = |from_ms: u64, to_ms: u64| {
            let f = prom::Firing {
                alert: "FanoutPresenceStoreErrors".into(),
                labels: String::new(),
                from: 1000.0 + from_ms as f64 / 1000.0,
                to: 1000.0 + to_ms as f64 / 1000.0,
            };
            let (faults, _) = judge(&injected, &[f], 1000.0, 200_000, &HashMap::new(), &[], &[]);
            faults.iter().map(|r| r.alert_fired).collect::<Vec<_>>()
        };
        // Firing from the first kill until after the second one was over.
        assert_eq!(fired(20_000, 70_000), [true, true]);
        // Ended while Redis was down again: not an alert about the second.
        assert_eq!(fired(20_000, 40_000), [true, false]);
    }
}
