//! `connect-storm` (open `--users` connections, each joining a channel, as
//! fast as `--connect-concurrency` allows, and time each connect+join) and
//! `idle` (hold `--users` joined connections for `--duration`, for the
//! server's memory per connection).

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::Result;

use crate::Args;
use crate::client::{self, Incoming};
use crate::run::Ctx;
use crate::session::{self, ConnectOpts, JoinOpts, Plan};
use crate::stats::{Partial, Stats};

fn plans(args: &Args, ctx: &Ctx, prefix: &str) -> Vec<Plan> {
    (0..args.users)
        .filter(|&u| ctx.owns(u))
        .map(|u| Plan {
            user: u,
            topic: format!("realtime:{prefix}:{}", u % 100),
            join: JoinOpts {
                presence_key: args.track.then(|| format!("user-{u}")),
                ..JoinOpts::default()
            },
            track: args.track.then(|| format!(r#"{{"user":{u}}}"#)),
        })
        .collect()
}

/// Counts a connection closing under its client.
fn watch_close(
    stats: Arc<Stats>,
) -> impl Fn(usize, client::Reader) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>
+ Clone
+ Send
+ Sync
+ 'static {
    move |_u, mut r| {
        let stats = stats.clone();
        Box::pin(async move {
            loop {
                if let Incoming::Closed(_) = client::recv(&mut r).await {
                    stats.disconnected.fetch_add(1, Ordering::Relaxed);
                    stats.connections.fetch_sub(1, Ordering::Relaxed);
                    return;
                }
            }
        })
    }
}

pub async fn connect_storm(args: &Args, conn: &ConnectOpts, ctx: &Ctx) -> Result<Partial> {
    let plans = plans(args, ctx, "storm");
    let mut partial = Partial {
        users: plans.len() as u64,
        ..Partial::default()
    };
    // Every process starts its storm at the same moment.
    let go = ctx.ready().await?;
    let cpu0 = crate::proc::cpu_seconds(None)?;
    let conn = ConnectOpts {
        concurrency: conn.concurrency.div_ceil(ctx.worker_count),
        ..conn.clone()
    };
    let writers = session::connect_all(ctx, &conn, plans, watch_close(ctx.stats.clone())).await;
    partial.connected = writers.len() as u64;
    partial.connect_seconds = go.elapsed().as_secs_f64();
    // The client's CPU during the storm itself.
    partial.run_seconds = partial.connect_seconds;
    partial.client_cpu_seconds = crate::proc::cpu_seconds(None)? - cpu0;
    eprintln!(
        "worker {}: {} connections joined in {:.2} s",
        ctx.worker_index, partial.connected, partial.connect_seconds
    );
    // Hold them a moment, so the server's memory can be sampled.
    tokio::time::sleep(Duration::from_secs(3)).await;
    partial.counts_from(&ctx.stats);
    Ok(partial)
}

pub async fn idle(args: &Args, conn: &ConnectOpts, ctx: &Ctx) -> Result<Partial> {
    let plans = plans(args, ctx, "idle");
    let mut partial = Partial {
        users: plans.len() as u64,
        ..Partial::default()
    };
    let started = Instant::now();
    let writers = session::connect_all(ctx, conn, plans, watch_close(ctx.stats.clone())).await;
    partial.connected = writers.len() as u64;
    partial.connect_seconds = started.elapsed().as_secs_f64();
    let stop = Arc::new(tokio::sync::Notify::new());
    session::spawn_heartbeats(
        writers.into_iter().map(|(_, w)| w).collect(),
        conn.vsn.clone(),
        stop.clone(),
    );
    let go = ctx.ready().await?;
    let cpu0 = crate::proc::cpu_seconds(None)?;
    tokio::time::sleep(Duration::from_secs(args.duration)).await;
    partial.run_seconds = go.elapsed().as_secs_f64();
    partial.client_cpu_seconds = crate::proc::cpu_seconds(None)? - cpu0;
    // Count before the sockets close: stopping the heartbeats drops the writers.
    partial.counts_from(&ctx.stats);
    stop.notify_one();
    Ok(partial)
}
