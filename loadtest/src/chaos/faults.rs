//! The faults of a chaos run: what each kind does, how long it keeps its
//! component down, which alerts it must and may fire, and the seeded
//! schedule that injects each kind at least once, one fault at a time.

use std::time::Duration;

use anyhow::Result;
use serde::Serialize;

use super::cluster::Cluster;
use crate::session::Rng;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Kind {
    /// SIGKILL an edge, start it again after the downtime.
    EdgeKill,
    /// SIGTERM an edge (it drains its clients), start it again once it exited.
    EdgeDrain,
    /// SIGKILL one node of the three-node NATS cluster, start it again.
    NatsNodeKill,
    /// SIGKILL the ingester, start it again.
    IngesterKill,
    /// SIGKILL Redis (it keeps nothing), start an empty one again.
    RedisKill,
    /// Restart PostgreSQL (`pg_ctl restart -m fast`).
    PostgresRestart,
}

impl Kind {
    pub const ALL: [Kind; 6] = [
        Kind::EdgeKill,
        Kind::EdgeDrain,
        Kind::NatsNodeKill,
        Kind::IngesterKill,
        Kind::RedisKill,
        Kind::PostgresRestart,
    ];

    /// How long the component stays down: long enough for the alert about
    /// it to fire with the run's time-scaled rules (`for: 1m` is 2 s at the
    /// default scale of 30, the Redis errors' `rate(…[5m])` with `for: 5m`
    /// 20 s). At a smaller scale (a long run, where a 2 s `for:` would
    /// let one busy reading fire an alert) the component stays down the
    /// longer `for:` more.
    fn downtime(self, rng: &mut Rng, scale: u32) -> Duration {
        let base = self.base_downtime(rng);
        let alert_for = self.alert_for().as_secs_f64();
        let scale = f64::from(scale.clamp(1, DEFAULT_SCALE));
        base + Duration::from_secs_f64(alert_for / scale - alert_for / f64::from(DEFAULT_SCALE))
    }

    /// The `for:` of the alert the downtime must outlast (the chart's
    /// rules; the Redis alert's `rate` window already spans it).
    fn alert_for(self) -> Duration {
        match self {
            Kind::EdgeKill | Kind::NatsNodeKill => Duration::from_secs(60),
            Kind::IngesterKill => Duration::from_secs(120),
            Kind::EdgeDrain | Kind::PostgresRestart | Kind::RedisKill => Duration::ZERO,
        }
    }

    /// The downtime at the default time scale.
    fn base_downtime(self, rng: &mut Rng) -> Duration {
        let (lo, hi) = match self {
            Kind::EdgeKill => (4.0, 6.0),
            Kind::EdgeDrain | Kind::PostgresRestart => (0.0, 0.0),
            Kind::NatsNodeKill => (8.0, 12.0),
            Kind::IngesterKill => (8.0, 10.0),
            Kind::RedisKill => (14.0, 17.0),
        };
        Duration::from_secs_f64(lo + (hi - lo) * rng.unit())
    }

    /// The alert that must fire for this fault.
    pub fn required_alert(self) -> Option<&'static str> {
        match self {
            Kind::EdgeKill => Some("FanoutEdgeDown"),
            Kind::NatsNodeKill => Some("FanoutNatsReplicaDown"),
            Kind::IngesterKill => Some("FanoutCdcNotStreaming"),
            Kind::RedisKill => Some("FanoutPresenceStoreErrors"),
            Kind::EdgeDrain | Kind::PostgresRestart => None,
        }
    }

    /// Alerts this fault may also fire (they are about it, too).
    pub fn allowed_alerts(self) -> &'static [&'static str] {
        match self {
            // Every client of the edge reconnects to the other one and
            // resumes there at once (over the drain window for a drain):
            // connections dip until they are back, and the surviving
            // edge's publish latency rises under the storm (thousands of
            // joins and replays in a few seconds). The process is gone
            // between its exit and its restart.
            Kind::EdgeKill | Kind::EdgeDrain => &[
                "FanoutEdgeDown",
                "FanoutConnectionsDropped",
                "FanoutEdgePublishLatencyHigh",
            ],
            Kind::NatsNodeKill => &["FanoutNatsReplicaDown", "FanoutNatsDisconnects", "FanoutPublishErrors"],
            Kind::IngesterKill => &["FanoutCdcNotStreaming", "FanoutCdcLagHigh"],
            Kind::RedisKill => &["FanoutPresenceStoreErrors"],
            Kind::PostgresRestart => &["FanoutCdcNotStreaming", "FanoutCdcLagHigh"],
        }
    }

    /// Alerts about a state this fault leaves behind, which may start any
    /// time after it (not only while it lasts).
    pub fn lasting_alerts(self) -> &'static [&'static str] {
        match self {
            // nats-server 2.9 can leave the restarted node's copy of a
            // stream shifted (see fanout_bus::nats); edges notice it when a
            // read first lands on that replica, however late.
            Kind::NatsNodeKill => &["FanoutNatsReplicaDiverged"],
            _ => &[],
        }
    }
}

/// The alert time scale the base downtimes are made for (the load tester's
/// default `--alert-time-scale`).
pub const DEFAULT_SCALE: u32 = 30;

/// One fault to inject, `at` after the load started.
#[derive(Debug, Clone, Copy)]
pub struct Planned {
    pub kind: Kind,
    /// Which edge or NATS node.
    pub target: usize,
    pub at: Duration,
    pub down: Duration,
}

/// The seeded schedule: from `warmup`, every kind once in a shuffled
/// order, then kinds at random, each 4–7 s after the previous one
/// was restored, until `end` leaves `settle` for the last recovery.
/// Downtimes fit the alerts' time scale `scale`.
pub fn schedule(
    seed: u64,
    warmup: Duration,
    end: Duration,
    settle: Duration,
    edges: usize,
    scale: u32,
) -> Result<Vec<Planned>> {
    let mut rng = Rng::new(seed);
    let mut kinds = Kind::ALL.to_vec();
    for i in (1..kinds.len()).rev() {
        kinds.swap(i, (rng.next_u64() % (i as u64 + 1)) as usize);
    }
    let mut out = Vec::new();
    let mut t = warmup;
    for n in 0usize.. {
        let kind = if n < kinds.len() {
            kinds[n]
        } else {
            Kind::ALL[(rng.next_u64() % Kind::ALL.len() as u64) as usize]
        };
        let down = kind.downtime(&mut rng, scale);
        // A drain or a restart takes a few seconds of its own.
        let busy = down + Duration::from_secs(4);
        if t + busy + settle > end {
            anyhow::ensure!(
                n >= kinds.len(),
                "--duration {}s leaves no room for every fault kind once (about {}s are needed)",
                end.as_secs(),
                (t + busy + settle).as_secs() + 20 * (kinds.len() - n - 1) as u64
            );
            break;
        }
        let target = match kind {
            Kind::EdgeKill | Kind::EdgeDrain => (rng.next_u64() % edges as u64) as usize,
            Kind::NatsNodeKill => (rng.next_u64() % 3) as usize,
            _ => 0,
        };
        out.push(Planned {
            kind,
            target,
            at: t,
            down,
        });
        t += busy + Duration::from_secs_f64(4.0 + 3.0 * rng.unit());
    }
    Ok(out)
}

/// Injects `p` and restores the component; returns what was hit, and a
/// problem the fault ran into that fails the run without ending it.
pub async fn inject(cluster: &mut Cluster, p: &Planned) -> Result<(String, Option<String>)> {
    let mut problem = None;
    let target = match p.kind {
        Kind::EdgeKill => {
            let i = cluster.busiest_edge(p.target).await;
            let e = &mut cluster.edges[i];
            e.kill9();
            tokio::time::sleep(p.down).await;
            e.start().await?;
            e.name.clone()
        }
        Kind::EdgeDrain => {
            let i = cluster.busiest_edge(p.target).await;
            let e = &mut cluster.edges[i];
            e.drain().await?;
            e.start().await?;
            e.name.clone()
        }
        Kind::NatsNodeKill => {
            cluster.nats.kill(p.target);
            tokio::time::sleep(p.down).await;
            cluster.nats.restart(p.target).await?;
            format!("nats-n{}", p.target)
        }
        Kind::IngesterKill => {
            cluster.cdc.kill9();
            tokio::time::sleep(p.down).await;
            cluster.cdc.start().await?;
            cluster.cdc.name.clone()
        }
        Kind::RedisKill => {
            cluster.redis.kill();
            tokio::time::sleep(p.down).await;
            cluster.redis.restart().await?;
            "redis".into()
        }
        Kind::PostgresRestart => {
            let pg = &cluster.pg;
            // pg_ctl blocks until the server is back. A fast shutdown that
            // does not finish is a finding: the run goes on after an
            // immediate one, and fails.
            if let Err(e) = tokio::task::block_in_place(|| pg.restart()) {
                problem = Some(format!("PostgreSQL's fast shutdown did not finish within 90 s: {e:#}"));
                tokio::task::block_in_place(|| pg.restart_immediate())?;
            }
            "postgres".into()
        }
    };
    Ok((target, problem))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_schedule_is_seeded_has_every_kind_and_fits_the_run() {
        let s = |seed| {
            schedule(
                seed,
                Duration::from_secs(15),
                Duration::from_secs(170),
                Duration::from_secs(20),
                2,
                DEFAULT_SCALE,
            )
        };
        let a = s(7).unwrap();
        let b = s(7).unwrap();
        assert_eq!(format!("{a:?}"), format!("{b:?}"), "same seed, same schedule");
        assert_ne!(format!("{a:?}"), format!("{:?}", s(8).unwrap()));
        for k in Kind::ALL {
            assert!(a.iter().any(|p| p.kind == k), "{k:?} missing from {a:?}");
        }
        assert!(
            a.windows(2).all(|w| w[0].at + w[0].down < w[1].at),
            "one fault at a time"
        );
        let last = a.last().unwrap();
        assert!(last.at + last.down + Duration::from_secs(20) <= Duration::from_secs(170));
        assert!(
            schedule(
                1,
                Duration::from_secs(15),
                Duration::from_secs(60),
                Duration::from_secs(20),
                2,
                DEFAULT_SCALE,
            )
            .is_err()
        );
    }

    #[test]
    fn at_a_smaller_alert_scale_faults_outlast_the_longer_for() {
        let plan = |scale| {
            schedule(
                3,
                Duration::from_secs(15),
                Duration::from_secs(600),
                Duration::from_secs(20),
                2,
                scale,
            )
            .unwrap()
        };
        let kinds_at = |scale| plan(scale).into_iter().map(|p| (p.kind, p.down)).collect::<Vec<_>>();
        let (at30, at10) = (kinds_at(DEFAULT_SCALE), kinds_at(10));
        for (kind, down) in at10
            .iter()
            .filter(|(k, _)| *k == Kind::NatsNodeKill || *k == Kind::EdgeKill)
        {
            // `for: 1m` is 6 s at a scale of 10: 4 s more than at 30.
            let (_, base) = at30.iter().find(|(k, _)| k == kind).unwrap();
            assert!(*down >= Duration::from_secs(60 / 10), "{kind:?} down {down:?}");
            assert!(*down > *base, "{kind:?}: {down:?} at 10, {base:?} at 30");
        }
        let redis = |v: &[(Kind, Duration)]| v.iter().find(|(k, _)| *k == Kind::RedisKill).map(|x| x.1);
        assert_eq!(
            redis(&at30),
            redis(&at10),
            "the Redis alert's window already spans its for:"
        );
    }
}
