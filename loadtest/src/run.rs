//! Running a scenario in one or several processes.
//!
//! Every load process (the only one, or each `--workers` child) runs the
//! scenario with a [`Ctx`]: it connects its share of users, says it is
//! ready, waits for "go", runs, and meanwhile reports a [`Tick`] every
//! second and a [`Partial`] at the end. A child writes these as JSON lines
//! on stdout and reads "go" from stdin; a single process hands them over a
//! channel. The [`aggregate`] loop merges them per second (live progress
//! line, latency timeline, server samples) and into one result.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::sync::{mpsc, watch};

use crate::proc;
use crate::stats::{self, Partial, Stats, Tick};

/// What a load process tells the aggregator.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Msg {
    /// Connected; waiting for "go".
    Ready,
    Tick(Tick),
    Result(Partial),
    Failed {
        error: String,
    },
}

enum Out {
    Local(mpsc::UnboundedSender<(usize, Msg)>),
    Stdout,
}

/// What a scenario gets: its share of the work, the counters, and the
/// start barrier.
pub struct Ctx {
    pub stats: Arc<Stats>,
    pub worker_index: usize,
    pub worker_count: usize,
    out: Out,
    go: Option<watch::Receiver<bool>>,
}

impl Ctx {
    fn emit(&self, msg: Msg) {
        match &self.out {
            Out::Local(tx) => {
                let _ = tx.send((self.worker_index, msg));
            }
            Out::Stdout => {
                use std::io::Write;
                let line = serde_json::to_string(&msg).expect("serializable message");
                let mut out = std::io::stdout().lock();
                let _ = writeln!(out, "{line}");
                let _ = out.flush();
            }
        }
    }

    /// Says this process has connected and waits until every process has.
    /// Returns when the measured part of the run should start.
    pub async fn ready(&self) -> Result<Instant> {
        self.emit(Msg::Ready);
        match &self.go {
            Some(rx) => {
                let mut rx = rx.clone();
                rx.wait_for(|go| *go).await.context("aggregator went away")?;
            }
            None => {
                let mut line = String::new();
                BufReader::new(tokio::io::stdin())
                    .read_line(&mut line)
                    .await
                    .context("reading go from the parent")?;
                if line.trim() != "go" {
                    bail!("parent said {line:?} instead of go");
                }
            }
        }
        Ok(Instant::now())
    }

    /// The `n`th of `total` items that belong to this process.
    pub fn owns(&self, n: usize) -> bool {
        n % self.worker_count == self.worker_index
    }
}

/// Runs `scenario` in this process, with a ticker, and reports its result.
async fn run_process<F, Fut>(ctx: Arc<Ctx>, scenario: F)
where
    F: FnOnce(Arc<Ctx>) -> Fut,
    Fut: std::future::Future<Output = Result<Partial>>,
{
    let last_t = Arc::new(AtomicU32::new(0));
    let ticker = {
        let ctx = ctx.clone();
        let last_t = last_t.clone();
        tokio::spawn(async move {
            let start = tokio::time::Instant::now();
            for t in 1u32.. {
                tokio::time::sleep_until(start + Duration::from_secs(u64::from(t))).await;
                let cpu = proc::cpu_seconds(None).unwrap_or(0.0);
                ctx.emit(Msg::Tick(ctx.stats.tick(t, cpu)));
                last_t.store(t, Ordering::SeqCst);
            }
        })
    };
    let result = scenario(ctx.clone()).await;
    ticker.abort();
    let _ = ticker.await;
    // Whatever was recorded since the last tick.
    let t = last_t.load(Ordering::SeqCst) + 1;
    let cpu = proc::cpu_seconds(None).unwrap_or(0.0);
    ctx.emit(Msg::Tick(ctx.stats.tick(t, cpu)));
    match result {
        Ok(p) => ctx.emit(Msg::Result(p)),
        Err(e) => ctx.emit(Msg::Failed {
            error: format!("{e:#}"),
        }),
    }
}

/// Runs as a `--workers` child: messages on stdout, "go" from stdin.
pub async fn run_worker<F, Fut>(index: usize, count: usize, scenario: F)
where
    F: FnOnce(Arc<Ctx>) -> Fut,
    Fut: std::future::Future<Output = Result<Partial>>,
{
    let ctx = Arc::new(Ctx {
        stats: Arc::new(Stats::default()),
        worker_index: index,
        worker_count: count,
        out: Out::Stdout,
        go: None,
    });
    run_process(ctx, scenario).await;
}

/// Runs the scenario in this process and aggregates it.
pub async fn run_single<F, Fut>(opts: AggregateOptions, scenario: F) -> Result<Aggregate>
where
    F: FnOnce(Arc<Ctx>) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = Result<Partial>> + Send + 'static,
{
    let (tx, rx) = mpsc::unbounded_channel();
    let (go_tx, go_rx) = watch::channel(false);
    let ctx = Arc::new(Ctx {
        stats: Arc::new(Stats::default()),
        worker_index: 0,
        worker_count: 1,
        out: Out::Local(tx),
        go: Some(go_rx),
    });
    tokio::spawn(run_process(ctx, scenario));
    aggregate(rx, 1, opts, move || {
        let _ = go_tx.send(true);
    })
    .await
}

/// Starts `count` copies of this executable as workers (same arguments plus
/// `--worker-index i --worker-count count`) and aggregates them.
pub async fn run_parent(count: usize, opts: AggregateOptions) -> Result<Aggregate> {
    let exe = std::env::current_exe().context("finding my own executable")?;
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (tx, rx) = mpsc::unbounded_channel();
    let mut stdins = Vec::with_capacity(count);
    let mut children = Vec::with_capacity(count);
    for i in 0..count {
        let mut child = tokio::process::Command::new(&exe)
            .args(&args)
            .args(["--worker-index", &i.to_string(), "--worker-count", &count.to_string()])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting worker {i}"))?;
        stdins.push(child.stdin.take().context("worker stdin")?);
        let stdout = child.stdout.take().context("worker stdout")?;
        let tx = tx.clone();
        tokio::spawn(async move {
            let mut lines = BufReader::new(stdout).lines();
            let mut finished = false;
            while let Ok(Some(line)) = lines.next_line().await {
                match serde_json::from_str::<Msg>(&line) {
                    Ok(m) => {
                        finished |= matches!(m, Msg::Result(_) | Msg::Failed { .. });
                        let _ = tx.send((i, m));
                    }
                    Err(e) => eprintln!("worker {i}: unreadable line ({e}): {line}"),
                }
            }
            if !finished {
                let _ = tx.send((
                    i,
                    Msg::Failed {
                        error: "exited without a result".into(),
                    },
                ));
            }
        });
        children.push(child);
    }
    drop(tx);
    let stdins = Arc::new(tokio::sync::Mutex::new(stdins));
    let result = aggregate(rx, count, opts, move || {
        let stdins = stdins.clone();
        tokio::spawn(async move {
            for s in stdins.lock().await.iter_mut() {
                let _ = s.write_all(b"go\n").await;
                let _ = s.flush().await;
            }
        });
    })
    .await;
    for mut c in children {
        let _ = c.wait().await;
    }
    result
}

/// What the aggregator needs besides the messages.
#[derive(Debug, Clone)]
pub struct AggregateOptions {
    /// Server process(es) to sample; CPU and RSS are summed over them.
    pub server_pids: Vec<u32>,
    /// Print a progress line per second.
    pub progress: bool,
}

/// One second of the whole run.
#[derive(Debug, Clone, Serialize)]
pub struct Second {
    /// Seconds since "go" (negative while connecting).
    pub t: i64,
    pub connections: u64,
    pub sent_per_s: u64,
    pub received_per_s: u64,
    /// Clients that rejoined (after losing their server) in this second.
    pub reconnects_per_s: u64,
    pub p50_ms: Option<f64>,
    pub p99_ms: Option<f64>,
    pub max_ms: Option<f64>,
    /// CPU of all load processes in this second, % of one core.
    pub client_cpu_percent: f64,
    pub server_rss_bytes: Option<u64>,
    pub server_cpu_percent: Option<f64>,
    /// CPU of the whole machine in this second, % of one core.
    pub machine_cpu_percent: Option<f64>,
    #[serde(skip)]
    pub latency: Option<Histogram<u64>>,
}

/// Everything the processes reported, merged.
#[derive(Debug)]
pub struct Aggregate {
    pub partial: Partial,
    /// Each process's CPU over its run, % of one core.
    pub client_cpu_percent_per_worker: Vec<f64>,
    pub seconds: Vec<Second>,
    pub latency: Histogram<u64>,
    pub server_rss_at_start: Option<u64>,
    pub server_rss_after_go: Option<u64>,
    pub server_cpu_seconds: Option<f64>,
    /// Busy CPU of the whole machine from "go" to the end, seconds.
    pub machine_cpu_seconds: Option<f64>,
    pub errors: Vec<String>,
}

/// Merges `sources` processes' messages until all have finished. Calls
/// `go` once all are ready.
pub async fn aggregate(
    mut rx: mpsc::UnboundedReceiver<(usize, Msg)>,
    sources: usize,
    opts: AggregateOptions,
    go: impl FnOnce(),
) -> Result<Aggregate> {
    let started = Instant::now();
    let server_rss =
        |pids: &[u32]| (!pids.is_empty()).then(|| pids.iter().filter_map(|&p| proc::rss_bytes(p).ok()).sum::<u64>());
    let server_cpu = |pids: &[u32]| {
        (!pids.is_empty()).then(|| {
            pids.iter()
                .filter_map(|&p| proc::cpu_seconds(Some(p)).ok())
                .sum::<f64>()
        })
    };
    let mut out = Aggregate {
        partial: Partial::default(),
        client_cpu_percent_per_worker: vec![0.0; sources],
        seconds: Vec::new(),
        latency: stats::new_histogram(),
        server_rss_at_start: server_rss(&opts.server_pids),
        server_rss_after_go: None,
        server_cpu_seconds: None,
        machine_cpu_seconds: None,
        errors: Vec::new(),
    };
    let mut go = Some(go);
    // Sources that said ready, or failed before they could: "go" waits for all.
    let mut ready = vec![false; sources];
    let mut go_t: Option<u32> = None;
    let mut go_instant = None;
    let mut server_cpu_at_go = None;
    let mut machine_at_go = None;
    let machine = || proc::machine_busy_seconds().ok();
    let mut prev_machine = machine();
    let mut finished = vec![false; sources];
    // Ticks not yet merged, per source, by second.
    let mut pending: Vec<HashMap<u32, Tick>> = vec![HashMap::new(); sources];
    let mut latest: Vec<Tick> = vec![Tick::default(); sources];
    let mut next_t = 1u32;
    let mut prev_total = Tick::default();
    let mut prev_server_cpu = server_cpu(&opts.server_pids);
    let mut prev_at = Instant::now();
    let mut results = 0;
    while results < sources {
        let Some((i, msg)) = rx.recv().await else { break };
        let failed = matches!(msg, Msg::Failed { .. });
        match msg {
            Msg::Ready => ready[i] = true,
            Msg::Tick(t) => {
                pending[i].insert(t.t, t);
            }
            Msg::Result(p) => {
                if p.run_seconds > 0.0 {
                    out.client_cpu_percent_per_worker[i] = p.client_cpu_seconds * 100.0 / p.run_seconds;
                }
                out.partial.merge(&p);
                finished[i] = true;
                results += 1;
            }
            Msg::Failed { error } => {
                eprintln!("load process {i} failed: {error}");
                out.errors.push(format!("process {i}: {error}"));
                finished[i] = true;
                results += 1;
            }
        }
        // A process that failed before it was ready must not hold the others.
        ready[i] |= failed;
        if ready.iter().all(|r| *r)
            && let Some(go) = go.take()
        {
            go_t = Some(started.elapsed().as_secs() as u32);
            go_instant = Some(Instant::now());
            server_cpu_at_go = server_cpu(&opts.server_pids);
            machine_at_go = machine();
            eprintln!("all {sources} load process(es) connected: go");
            go();
        }
        // Merge every second that all sources have reported (or are done with).
        loop {
            let complete = (0..sources)
                .all(|s| pending[s].contains_key(&next_t) || (finished[s] && pending[s].keys().all(|&k| k < next_t)));
            let any = (0..sources).any(|s| pending[s].contains_key(&next_t));
            if !complete || !any {
                break;
            }
            let mut hist: Option<Histogram<u64>> = None;
            for s in 0..sources {
                if let Some(t) = pending[s].remove(&next_t) {
                    if !t.latency.is_empty() {
                        stats::add_raw(hist.get_or_insert_with(stats::new_histogram), &t.latency);
                    }
                    latest[s] = t;
                }
            }
            let total = Tick {
                t: next_t,
                connections: latest.iter().map(|t| t.connections).sum(),
                sent: latest.iter().map(|t| t.sent).sum(),
                received: latest.iter().map(|t| t.received).sum(),
                lost: latest.iter().map(|t| t.lost).sum(),
                duplicated: latest.iter().map(|t| t.duplicated).sum(),
                reconnected: latest.iter().map(|t| t.reconnected).sum(),
                client_cpu_seconds: latest.iter().map(|t| t.client_cpu_seconds).sum(),
                latency: Vec::new(),
            };
            let now = Instant::now();
            let dt = now.duration_since(prev_at).as_secs_f64().max(0.001);
            prev_at = now;
            let cpu_now = server_cpu(&opts.server_pids);
            let server_cpu_percent = match (cpu_now, prev_server_cpu) {
                (Some(a), Some(b)) => Some((a - b) * 100.0 / dt),
                _ => None,
            };
            prev_server_cpu = cpu_now;
            let machine_now = machine();
            let machine_cpu_percent = machine_now.zip(prev_machine).map(|(a, b)| (a - b) * 100.0 / dt);
            prev_machine = machine_now;
            let rss = server_rss(&opts.server_pids);
            if out.server_rss_after_go.is_none()
                && go_instant.is_some_and(|g: Instant| g.elapsed() >= Duration::from_secs(2))
            {
                out.server_rss_after_go = rss;
            }
            let ms = |h: &Histogram<u64>, q: f64| h.value_at_quantile(q) as f64 / 1000.0;
            let second = Second {
                t: i64::from(next_t),
                connections: total.connections,
                sent_per_s: total.sent.saturating_sub(prev_total.sent),
                received_per_s: total.received.saturating_sub(prev_total.received),
                reconnects_per_s: total.reconnected.saturating_sub(prev_total.reconnected),
                p50_ms: hist.as_ref().map(|h| ms(h, 0.5)),
                p99_ms: hist.as_ref().map(|h| ms(h, 0.99)),
                max_ms: hist.as_ref().map(|h| h.max() as f64 / 1000.0),
                client_cpu_percent: (total.client_cpu_seconds - prev_total.client_cpu_seconds).max(0.0) * 100.0,
                server_rss_bytes: rss,
                server_cpu_percent,
                machine_cpu_percent,
                latency: hist,
            };
            if let Some(h) = &second.latency {
                out.latency.add(h)?;
            }
            if opts.progress {
                eprintln!(
                    "[{:>5}s] conns {:>6} | sent {:>6}/s | recv {:>8}/s | p99 {:>8} | lost {} dup {} | client CPU {:>3.0}%{}{}",
                    second.t,
                    second.connections,
                    second.sent_per_s,
                    second.received_per_s,
                    second.p99_ms.map_or("-".to_owned(), |p| format!("{p:.1} ms")),
                    total.lost,
                    total.duplicated,
                    second.client_cpu_percent,
                    second
                        .server_cpu_percent
                        .map_or(String::new(), |c| format!(" | server CPU {c:.0}%")),
                    second
                        .machine_cpu_percent
                        .map_or(String::new(), |c| format!(" | machine {c:.0}%")),
                );
            }
            out.seconds.push(second);
            prev_total = total;
            next_t += 1;
        }
    }
    // Times were seconds since start; make them seconds since "go".
    let go_t = i64::from(go_t.unwrap_or(0));
    for s in &mut out.seconds {
        s.t -= go_t;
    }
    out.machine_cpu_seconds = machine().zip(machine_at_go).map(|(a, b)| a - b);
    if let (Some(a), Some(b)) = (server_cpu(&opts.server_pids), server_cpu_at_go) {
        out.server_cpu_seconds = Some(a - b);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn worker_messages_survive_the_json_line_protocol() {
        let mut h = stats::new_histogram();
        h.record(1234).unwrap();
        let tick = Msg::Tick(Tick {
            t: 3,
            received: 7,
            latency: stats::to_raw(&h),
            ..Tick::default()
        });
        let line = serde_json::to_string(&tick).unwrap();
        assert!(!line.contains('\n'));
        match serde_json::from_str::<Msg>(&line).unwrap() {
            Msg::Tick(t) => {
                assert_eq!((t.t, t.received), (3, 7));
                assert_eq!(stats::from_raw(&t.latency).max(), h.max());
            }
            other => panic!("{other:?}"),
        }
        let result = Msg::Result(Partial {
            users: 5,
            lost: 1,
            ..Partial::default()
        });
        match serde_json::from_str::<Msg>(&serde_json::to_string(&result).unwrap()).unwrap() {
            Msg::Result(p) => assert_eq!((p.users, p.lost), (5, 1)),
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            serde_json::from_str::<Msg>(r#"{"type":"ready"}"#).unwrap(),
            Msg::Ready
        ));
    }

    #[tokio::test]
    async fn a_process_failing_before_ready_does_not_hold_the_others() {
        let (tx, rx) = mpsc::unbounded_channel();
        tx.send((0, Msg::Ready)).unwrap();
        tx.send((
            1,
            Msg::Failed {
                error: "no server".into(),
            },
        ))
        .unwrap();
        tx.send((0, Msg::Result(Partial::default()))).unwrap();
        let mut went = false;
        let opts = AggregateOptions {
            server_pids: Vec::new(),
            progress: false,
        };
        let agg = aggregate(rx, 2, opts, || went = true).await.unwrap();
        assert!(went);
        assert_eq!(agg.errors.len(), 1);
    }

    #[tokio::test]
    async fn aggregate_merges_seconds_across_processes() {
        let (tx, rx) = mpsc::unbounded_channel();
        let tick = |t: u32, received: u64, us: u64| {
            let mut h = stats::new_histogram();
            h.record(us).unwrap();
            Msg::Tick(Tick {
                t,
                received,
                connections: 1,
                latency: stats::to_raw(&h),
                ..Tick::default()
            })
        };
        for (i, m) in [
            (0, Msg::Ready),
            (1, Msg::Ready),
            (0, tick(1, 10, 1_000)),
            (1, tick(1, 20, 3_000)),
            (0, tick(2, 15, 1_000)),
            (
                0,
                Msg::Result(Partial {
                    users: 1,
                    ..Partial::default()
                }),
            ),
            (1, tick(2, 40, 1_000)),
            (1, tick(3, 41, 1_000)),
            (
                1,
                Msg::Result(Partial {
                    users: 2,
                    ..Partial::default()
                }),
            ),
        ] {
            tx.send((i, m)).unwrap();
        }
        let mut went = false;
        let opts = AggregateOptions {
            server_pids: Vec::new(),
            progress: false,
        };
        let agg = aggregate(rx, 2, opts, || went = true).await.unwrap();
        assert!(went);
        assert_eq!(agg.partial.users, 3);
        let per_s: Vec<u64> = agg.seconds.iter().map(|s| s.received_per_s).collect();
        // Process 0 finished after second 2; its last count stays in the total.
        assert_eq!(per_s, vec![30, 25, 1]);
        assert_eq!(agg.seconds[0].connections, 2);
        assert_eq!(agg.latency.len(), 5);
    }
}
