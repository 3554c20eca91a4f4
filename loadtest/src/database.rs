//! The database step of the workshop scenario: each workshop's facilitator
//! writes activity rows to PostgreSQL, and every member receives them back
//! through fanout's change stream as `postgres_changes`, sequence-checked and
//! timed like the broadcasts (the latency is send → commit → WAL → ingester
//! → bus → edge → client).
//!
//! The scenario runs the step through [`WorkshopDatabase`]: [`Postgres`]
//! is that step, [`NoDatabase`] leaves it out. [`Postgres`] needs the schema
//! of `deploy/sql/workshop.sql` and a fanout whose `cdc.routes` sends
//! `public.workshop_activities` to `workshop:{session_id}`.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::client::Incoming;
use crate::stamp::Stamp;
use crate::stats::Stats;
use anyhow::{Context, Result};

type BoxFuture = Pin<Box<dyn Future<Output = ()> + Send>>;

/// The seam for the database step of the workshop scenario: facilitators
/// write rows that come back to every member as `postgres_changes`, checked
/// and timed like the broadcasts. An implementation subscribes the channel
/// through [`join_config`], runs each facilitator's writes through
/// [`facilitator`] (counting every row in `stats.sent` and the members it
/// is owed to in `stats.expected`), and turns incoming change frames back
/// into [`Stamp`]s with [`stamp_of`].
///
/// [`join_config`]: WorkshopDatabase::join_config
/// [`facilitator`]: WorkshopDatabase::facilitator
/// [`stamp_of`]: WorkshopDatabase::stamp_of
pub trait WorkshopDatabase: Send + Sync + 'static {
    /// More join `config` for workshop `n`'s channel, e.g. a
    /// `"postgres_changes":[…]` member.
    fn join_config(&self, _workshop: usize) -> Option<String> {
        None
    }

    /// The writes of facilitator `user` of `workshop` (with `members` joined
    /// users) until `until`.
    fn facilitator(
        &self,
        _workshop: usize,
        _user: usize,
        _members: Arc<AtomicU64>,
        _until: Instant,
        _stats: Arc<Stats>,
    ) -> Option<BoxFuture> {
        None
    }

    /// The stamp of a `postgres_changes` frame, if `frame` is one.
    fn stamp_of(&self, _frame: &Incoming) -> Option<Stamp> {
        None
    }
}

/// Broadcast only: the workshop load without a database.
pub struct NoDatabase;

impl WorkshopDatabase for NoDatabase {}

/// Facilitators' writes to PostgreSQL, one shared connection per process.
pub struct Postgres {
    client: Arc<tokio_postgres::Client>,
    /// Activity rows per facilitator per minute.
    per_minute: f64,
}

impl Postgres {
    /// Connects and makes sure sessions `workshops` exist (id = the
    /// workshop's number, so rows route to `workshop:<n>`).
    pub async fn connect(url: &str, workshops: impl Iterator<Item = usize>, per_minute: f64) -> Result<Self> {
        let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
            .await
            .with_context(|| format!("connecting to {url}"))?;
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                eprintln!("database connection ended: {e}");
            }
        });
        let insert = client
            .prepare(
                "INSERT INTO workshop_sessions (id, title) VALUES ($1::bigint, 'load test ' || $1::bigint::text) \
                 ON CONFLICT (id) DO NOTHING",
            )
            .await
            .context("workshop_sessions missing? apply deploy/sql/workshop.sql")?;
        for n in workshops {
            client.execute(&insert, &[&(n as i64)]).await?;
        }
        Ok(Self {
            client: Arc::new(client),
            per_minute,
        })
    }
}

impl WorkshopDatabase for Postgres {
    fn join_config(&self, workshop: usize) -> Option<String> {
        Some(format!(
            r#""postgres_changes":[{{"event":"INSERT","schema":"public","table":"workshop_activities","filter":"session_id=eq.{workshop}"}}]"#
        ))
    }

    fn facilitator(
        &self,
        workshop: usize,
        user: usize,
        members: Arc<AtomicU64>,
        until: Instant,
        stats: Arc<Stats>,
    ) -> Option<BoxFuture> {
        if self.per_minute <= 0.0 {
            return None;
        }
        let client = self.client.clone();
        let period = Duration::from_secs_f64(60.0 / self.per_minute);
        Some(Box::pin(async move {
            let insert = match client
                .prepare(
                    "INSERT INTO workshop_activities (session_id, kind, seq, body) VALUES ($1, 'stage', $2, $3::text::jsonb)",
                )
                .await
            {
                Ok(s) => s,
                Err(e) => return eprintln!("facilitator {user}: {e}"),
            };
            // Spread the facilitators over the first period.
            let mut next = Instant::now() + period.mul_f64((workshop % 97) as f64 / 97.0);
            let mut seq = 0u64;
            while next < until {
                tokio::time::sleep_until(next.into()).await;
                next += period;
                let stamp = Stamp {
                    u: user,
                    s: seq,
                    ts: crate::session::now_micros(),
                };
                let body = serde_json::to_string(&stamp).unwrap_or_default();
                // Every member joined now is owed the row, the facilitator too
                // (changes have no `self: false`).
                let owed = members.load(Ordering::Relaxed);
                match client
                    .execute(&insert, &[&(workshop as i64), &(seq as i64), &body])
                    .await
                {
                    Ok(_) => {
                        stats.sent.fetch_add(1, Ordering::Relaxed);
                        stats.expected.fetch_add(owed, Ordering::Relaxed);
                        seq += 1;
                    }
                    Err(e) => {
                        eprintln!("facilitator {user}: insert failed: {e}");
                        return;
                    }
                }
            }
        }))
    }

    fn stamp_of(&self, frame: &Incoming) -> Option<Stamp> {
        parse_stamp(frame)
    }
}

/// The stamp in a `postgres_changes` frame's row (`record.body`), for vsn
/// 1.0.0 objects and vsn 2.0.0 arrays.
fn parse_stamp(frame: &Incoming) -> Option<Stamp> {
    let Incoming::Text(t) = frame else { return None };
    let v: serde_json::Value = serde_json::from_slice(t).ok()?;
    let (event, payload) = match &v {
        serde_json::Value::Array(a) => (a.get(3)?, a.get(4)?),
        serde_json::Value::Object(o) => (o.get("event")?, o.get("payload")?),
        _ => return None,
    };
    if event != "postgres_changes" {
        return None;
    }
    serde_json::from_value(payload["data"]["record"]["body"].clone()).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn change_frames_give_back_their_stamp() {
        let body = r#"{"u":3,"s":7,"ts":1700000000000000}"#;
        let data =
            format!(r#"{{"ids":[1],"data":{{"type":"INSERT","record":{{"body":{body}}}}},"meta":{{"id":"9"}}}}"#);
        let v2 = format!(r#"[null,null,"realtime:workshop:1","postgres_changes",{data}]"#);
        let v1 = format!(r#"{{"topic":"realtime:workshop:1","event":"postgres_changes","payload":{data},"ref":null}}"#);
        for frame in [v1, v2] {
            let s = stamp_of_text(&frame).unwrap();
            assert_eq!((s.u, s.s, s.ts), (3, 7, 1_700_000_000_000_000));
        }
        let broadcast = r#"[null,null,"realtime:workshop:1","broadcast",{"event":"chat","payload":{}}]"#;
        assert!(stamp_of_text(broadcast).is_none());
    }

    fn stamp_of_text(t: &str) -> Option<Stamp> {
        parse_stamp(&Incoming::Text(t.as_bytes().to_vec()))
    }
}
