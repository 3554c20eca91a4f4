//! The end of a run: one [`Report`] from the aggregate, printed as a table,
//! written as `report.json` and as a self-contained `report.html` (inline
//! SVG plots drawn with plotters; nothing is fetched when it is viewed).

use std::fmt::Write as _;
use std::path::Path;

use anyhow::Result;
use hdrhistogram::Histogram;
use plotters::prelude::*;
use serde::Serialize;

use crate::run::{Aggregate, Second};
use crate::stats::{self, RawHistogram};
use crate::{Args, Scenario};

#[derive(Debug, Clone, Serialize)]
pub struct Latency {
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
}

impl Latency {
    /// Percentiles of a µs histogram, in ms (`None` when empty).
    pub fn of(h: &Histogram<u64>) -> Option<Self> {
        let ms = |q: f64| h.value_at_quantile(q) as f64 / 1000.0;
        (!h.is_empty()).then(|| Self {
            p50: ms(0.5),
            p90: ms(0.9),
            p99: ms(0.99),
            p999: ms(0.999),
            max: h.max() as f64 / 1000.0,
        })
    }

    fn of_raw(raw: &RawHistogram) -> Option<Self> {
        Self::of(&stats::from_raw(raw))
    }
}

#[derive(Debug, Serialize)]
pub struct WorkshopInfo {
    pub workshops: u64,
    pub smallest: u64,
    pub largest: u64,
    pub chat_per_user_per_min: f64,
    pub typing_per_user_per_min: f64,
    pub cursor_per_user_per_s: f64,
}

#[derive(Debug, Serialize)]
pub struct ConnectStorm {
    pub connections_per_second: f64,
    /// Connect + WebSocket upgrade + join reply, per connection.
    pub connect_join_ms: Option<Latency>,
}

#[derive(Debug, Serialize)]
pub struct Reconnect {
    /// Clients whose connection closed under them.
    pub affected: u64,
    /// Of those, joined again on another server.
    pub live_again: u64,
    /// From losing the socket to the rejoin reply.
    pub time_to_live_ms: Option<Latency>,
    /// The most rejoins in one second: a drain spread over its window keeps
    /// this low, a kill makes it the whole edge's share at once.
    pub peak_reconnects_per_second: u64,
    /// From the first second with a rejoin to the last.
    pub reconnect_span_seconds: u64,
}

#[derive(Debug, Serialize)]
pub struct Window {
    /// Seconds since go at the window's start.
    pub start_s: i64,
    pub seconds: usize,
    pub received_per_s: f64,
    pub latency_ms: Option<Latency>,
    pub server_rss_bytes: Option<u64>,
}

#[derive(Debug, Serialize)]
pub struct Soak {
    pub window_seconds: u64,
    pub windows: Vec<Window>,
    /// Last full window's p99 minus the first's, ms.
    pub p99_drift_ms: Option<f64>,
    /// Last window's server RSS minus the first's, bytes.
    pub rss_drift_bytes: Option<i64>,
}

#[derive(Debug, Serialize)]
pub struct Report {
    pub scenario: String,
    pub target: String,
    pub urls: Vec<String>,
    pub users: u64,
    /// Channels the fanout scenario's subscribers were spread over.
    pub channels: u32,
    pub workers: usize,
    pub duration_seconds: u64,
    /// From "go" until the last delivery (or the drain timeout), seconds.
    pub run_seconds: f64,
    pub connected: u64,
    pub connect_errors: u64,
    pub connect_seconds: f64,
    pub messages_sent: u64,
    pub messages_expected: u64,
    pub messages_received: u64,
    pub lost: u64,
    pub duplicated: u64,
    pub reordered: u64,
    pub disconnected: u64,
    pub deliveries_per_second: f64,
    pub latency_ms: Option<Latency>,
    /// Workshop with `--database-url`: the database changes alone, from the
    /// facilitator's INSERT to receipt (send → commit → WAL → ingester →
    /// JetStream → edge → client). They are also in `latency_ms`.
    pub database_change_latency_ms: Option<Latency>,
    /// CPU of all load processes over the run, % of one core.
    pub client_cpu_percent: f64,
    pub client_cpu_percent_per_worker: Vec<f64>,
    /// Set when the load tester itself may have been the bottleneck.
    pub client_bound: Option<String>,
    pub server_cpu_seconds: Option<f64>,
    /// Busy CPU of the whole machine over the run, % of one core.
    pub machine_cpu_percent: Option<f64>,
    /// Of that, what neither the load processes nor --server-pid used
    /// (other programs on the machine), % of one core.
    pub other_cpu_percent: Option<f64>,
    pub server_cpu_us_per_delivery: Option<f64>,
    pub server_rss_start_bytes: Option<u64>,
    pub server_rss_end_bytes: Option<u64>,
    pub server_rss_per_connection_bytes: Option<f64>,
    pub workshop: Option<WorkshopInfo>,
    pub connect_storm: Option<ConnectStorm>,
    pub reconnect: Option<Reconnect>,
    pub soak: Option<Soak>,
    pub errors: Vec<String>,
    /// One entry per second since the processes started (`t` is seconds since go).
    pub timeline: Vec<Second>,
}

impl Report {
    pub fn build(args: &Args, scenario_name: &str, agg: Aggregate) -> Self {
        let p = &agg.partial;
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
        let client_cpu_percent: f64 = agg.client_cpu_percent_per_worker.iter().sum();
        let busiest = agg.client_cpu_percent_per_worker.iter().copied().fold(0.0, f64::max);
        let client_bound = if busiest >= 90.0 {
            Some(format!(
                "a load process used {busiest:.0} % of a core: the client may have been the bottleneck"
            ))
        } else if client_cpu_percent >= 90.0 * cores {
            Some(format!(
                "the load processes used {client_cpu_percent:.0} % of {cores} cores: the client may have been the bottleneck"
            ))
        } else {
            None
        };
        let run = p.run_seconds.max(1e-6);
        let machine_cpu_percent = agg.machine_cpu_seconds.map(|m| m * 100.0 / run);
        let other_cpu_percent = machine_cpu_percent
            .map(|m| (m - client_cpu_percent - agg.server_cpu_seconds.map_or(0.0, |c| c * 100.0 / run)).max(0.0));
        let rss_end = agg.seconds.iter().rev().find_map(|s| s.server_rss_bytes);
        let per_conn = match (args.scenario, agg.server_rss_at_start, agg.server_rss_after_go) {
            (Scenario::Idle, Some(b), Some(a)) if p.connected > 0 => Some((a as f64 - b as f64) / p.connected as f64),
            _ => None,
        };
        let workshop = matches!(args.scenario, Scenario::Workshop | Scenario::Soak).then(|| WorkshopInfo {
            workshops: p.workshops,
            smallest: p.workshop_min,
            largest: p.workshop_max,
            chat_per_user_per_min: args.chat_rate,
            typing_per_user_per_min: args.typing_rate,
            cursor_per_user_per_s: args.cursor_rate,
        });
        let connect_storm = (args.scenario == Scenario::ConnectStorm).then(|| ConnectStorm {
            connections_per_second: p.connected as f64 / p.connect_seconds.max(1e-6),
            connect_join_ms: Latency::of_raw(&p.connect_us),
        });
        let reconnect = (p.disconnected > 0 || args.scenario == Scenario::ReconnectStorm).then(|| Reconnect {
            affected: p.disconnected,
            live_again: p.reconnected,
            time_to_live_ms: Latency::of_raw(&p.reconnect_us),
            peak_reconnects_per_second: agg.seconds.iter().map(|s| s.reconnects_per_s).max().unwrap_or(0),
            reconnect_span_seconds: {
                let with: Vec<i64> = agg
                    .seconds
                    .iter()
                    .filter(|s| s.reconnects_per_s > 0)
                    .map(|s| s.t)
                    .collect();
                with.first().zip(with.last()).map_or(0, |(a, b)| (b - a + 1) as u64)
            },
        });
        let soak = (args.scenario == Scenario::Soak)
            .then(|| soak_windows(&agg.seconds, args.sample_every.max(1), args.duration));
        Self {
            scenario: scenario_name.to_owned(),
            target: format!("{:?}", args.target).to_lowercase(),
            urls: args.url.clone(),
            users: args.users as u64,
            channels: args.channels,
            workers: args.workers.max(1),
            duration_seconds: args.duration,
            run_seconds: p.run_seconds,
            connected: p.connected,
            connect_errors: p.connect_errors,
            connect_seconds: p.connect_seconds,
            messages_sent: p.messages_sent,
            messages_expected: p.messages_expected,
            messages_received: p.messages_received,
            lost: p.lost,
            duplicated: p.duplicated,
            reordered: p.reordered,
            disconnected: p.disconnected,
            deliveries_per_second: p.messages_received as f64 / p.run_seconds.max(1e-6),
            latency_ms: Latency::of(&agg.latency),
            database_change_latency_ms: Latency::of_raw(&p.change_us),
            client_cpu_percent,
            client_cpu_percent_per_worker: agg.client_cpu_percent_per_worker.clone(),
            client_bound,
            server_cpu_seconds: agg.server_cpu_seconds,
            machine_cpu_percent,
            other_cpu_percent,
            server_cpu_us_per_delivery: agg
                .server_cpu_seconds
                .filter(|_| p.messages_received > 0)
                .map(|c| c * 1e6 / p.messages_received as f64),
            server_rss_start_bytes: agg.server_rss_at_start,
            server_rss_end_bytes: rss_end,
            server_rss_per_connection_bytes: per_conn,
            workshop,
            connect_storm,
            reconnect,
            soak,
            errors: agg.errors.clone(),
            timeline: agg.seconds,
        }
    }

    /// Whether the run should fail: anything lost, repeated or out of
    /// order, a process that failed, or (connect-storm) a failed connection.
    pub fn failed(&self) -> bool {
        self.lost > 0
            || self.duplicated > 0
            || self.reordered > 0
            || !self.errors.is_empty()
            || (self.connect_storm.is_some() && self.connect_errors > 0)
    }

    /// The summary table as a string.
    pub fn summary(&self) -> String {
        let mut s = String::new();
        for (k, v) in self.rows() {
            let _ = writeln!(s, "{k:<34} {v}");
        }
        s
    }

    /// The summary as (label, value) rows.
    fn rows(&self) -> Vec<(String, String)> {
        let mut rows = Vec::new();
        let mut row = |k: &str, v: String| rows.push((k.to_owned(), v));
        row("scenario", format!("{} (target {})", self.scenario, self.target));
        row("users / connected", format!("{} / {}", self.users, self.connected));
        if self.channels > 1 {
            row("channels", self.channels.to_string());
        }
        row("load processes", self.workers.to_string());
        row("connect errors", self.connect_errors.to_string());
        row("connect time", format!("{:.1} s", self.connect_seconds));
        if let Some(w) = &self.workshop {
            row(
                "workshops (size)",
                format!("{} ({}..{} users)", w.workshops, w.smallest, w.largest),
            );
            row(
                "chat / typing / cursor per user",
                format!(
                    "{} / {} per min / {} per s",
                    w.chat_per_user_per_min, w.typing_per_user_per_min, w.cursor_per_user_per_s
                ),
            );
        }
        if let Some(c) = &self.connect_storm {
            row("connections per second", format!("{:.0}", c.connections_per_second));
            if let Some(l) = &c.connect_join_ms {
                row(
                    "connect+join ms p50/p99/max",
                    format!("{:.1} / {:.1} / {:.1}", l.p50, l.p99, l.max),
                );
            }
        }
        if self.messages_sent > 0 || self.messages_expected > 0 {
            row("messages sent", self.messages_sent.to_string());
            row("deliveries expected", self.messages_expected.to_string());
            row("deliveries received", self.messages_received.to_string());
            row(
                "lost / dup / reordered",
                format!("{} / {} / {}", self.lost, self.duplicated, self.reordered),
            );
            row("deliveries per second", format!("{:.0}", self.deliveries_per_second));
        }
        if let Some(l) = &self.latency_ms {
            row(
                "latency ms p50/p90/p99/p99.9/max",
                format!(
                    "{:.2} / {:.2} / {:.2} / {:.2} / {:.2}",
                    l.p50, l.p90, l.p99, l.p999, l.max
                ),
            );
        }
        if let Some(l) = &self.database_change_latency_ms {
            row(
                "of which database changes ms p50/p99/max",
                format!("{:.2} / {:.2} / {:.2}", l.p50, l.p99, l.max),
            );
        }
        if let Some(r) = &self.reconnect {
            row(
                "disconnected / live again",
                format!("{} / {}", r.affected, r.live_again),
            );
            if let Some(l) = &r.time_to_live_ms {
                row(
                    "time to live again ms p50/p99/max",
                    format!("{:.0} / {:.0} / {:.0}", l.p50, l.p99, l.max),
                );
            }
        }
        if let Some(soak) = &self.soak {
            for w in &soak.windows {
                row(
                    &format!("window from {:>4} s", w.start_s),
                    format!(
                        "p99 {} ms, RSS {}",
                        w.latency_ms.as_ref().map_or("-".into(), |l| format!("{:.2}", l.p99)),
                        w.server_rss_bytes.map_or("-".into(), mib)
                    ),
                );
            }
            row(
                "drift (last - first window)",
                format!(
                    "p99 {} ms, RSS {}",
                    soak.p99_drift_ms.map_or("-".into(), |d| format!("{d:+.2}")),
                    soak.rss_drift_bytes
                        .map_or("-".into(), |d| format!("{:+.1} MiB", d as f64 / 1048576.0))
                ),
            );
        }
        if let Some(c) = self.server_cpu_seconds {
            row(
                "server CPU",
                format!("{:.0} % of a core ({c:.1} s)", c * 100.0 / self.run_seconds.max(1e-6)),
            );
        }
        if let Some(c) = self.server_cpu_us_per_delivery {
            row("server CPU per delivery", format!("{c:.2} us"));
        }
        if let Some(p) = self.server_rss_per_connection_bytes {
            row("server RSS per connection", format!("{p:.0} B"));
        }
        if let Some(r) = self.server_rss_end_bytes {
            row("server RSS at end", mib(r));
        }
        row(
            "client CPU",
            format!(
                "{:.0} % of a core (per process: {})",
                self.client_cpu_percent,
                self.client_cpu_percent_per_worker
                    .iter()
                    .map(|c| format!("{c:.0} %"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        );
        if let Some(m) = self.machine_cpu_percent {
            row(
                "machine CPU (all processes)",
                format!(
                    "{m:.0} % of a core; not client or server: {:.0} %",
                    self.other_cpu_percent.unwrap_or(0.0)
                ),
            );
        }
        if let Some(b) = &self.client_bound {
            row("WARNING", b.clone());
        }
        for e in &self.errors {
            row("ERROR", e.clone());
        }
        rows
    }

    /// Writes `report.json` and `report.html` into `dir`.
    pub fn write(&self, dir: &Path, latency: &Histogram<u64>) -> Result<()> {
        std::fs::create_dir_all(dir)?;
        std::fs::write(dir.join("report.json"), serde_json::to_string_pretty(self)?)?;
        std::fs::write(dir.join("report.html"), self.html(latency)?)?;
        Ok(())
    }

    fn html(&self, latency: &Histogram<u64>) -> Result<String> {
        let mut h = String::new();
        let verdict = if self.failed() {
            "<span class=bad>FAILED</span>"
        } else {
            "<span class=ok>OK</span>"
        };
        write!(
            h,
            "<!doctype html><html><head><meta charset=utf-8><title>fanout-loadtest: {sc}</title><style>\
             body{{font-family:sans-serif;margin:16px;color:#222}}h1{{font-size:22px;margin:0 0 8px}}\
             table{{border-collapse:collapse;font-size:13px}}td{{padding:2px 12px 2px 0;vertical-align:top}}\
             td:first-child{{color:#555}}.ok{{color:#080;font-weight:bold}}.bad{{color:#b00;font-weight:bold}}\
             .grid{{display:grid;grid-template-columns:{W}px {W}px;gap:8px 16px}}</style></head><body>\
             <h1>fanout-loadtest: {sc} {verdict}</h1><div class=grid><div><table>",
            sc = esc(&self.scenario)
        )?;
        for (k, v) in self.rows() {
            write!(h, "<tr><td>{}</td><td>{}</td></tr>", esc(&k), esc(&v))?;
        }
        write!(
            h,
            "<tr><td>urls</td><td>{}</td></tr></table></div>",
            esc(&self.urls.join(", "))
        )?;
        h.push_str(&latency_over_time(&self.timeline)?);
        h.push_str(&percentiles(latency)?);
        h.push_str(&throughput_over_time(&self.timeline)?);
        h.push_str("</div></body></html>\n");
        Ok(h)
    }
}

fn mib(b: u64) -> String {
    format!("{:.1} MiB", b as f64 / 1048576.0)
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

/// Per-window latency and server RSS over the measured part of the run.
fn soak_windows(seconds: &[Second], every: u64, duration: u64) -> Soak {
    let mut windows = Vec::new();
    let measured: Vec<&Second> = seconds.iter().filter(|s| s.t >= 1 && s.t <= duration as i64).collect();
    for chunk in measured.chunks(every as usize) {
        let mut h = stats::new_histogram();
        for s in chunk {
            if let Some(l) = &s.latency {
                let _ = h.add(l);
            }
        }
        windows.push(Window {
            start_s: chunk[0].t - 1,
            seconds: chunk.len(),
            received_per_s: chunk.iter().map(|s| s.received_per_s as f64).sum::<f64>() / chunk.len() as f64,
            latency_ms: Latency::of(&h),
            server_rss_bytes: chunk.iter().rev().find_map(|s| s.server_rss_bytes),
        });
    }
    let full: Vec<&Window> = windows.iter().filter(|w| w.seconds as u64 == every).collect();
    let (first, last) = (full.first(), full.last());
    let p99 = |w: Option<&&Window>| w.and_then(|w| w.latency_ms.as_ref()).map(|l| l.p99);
    let rss = |w: Option<&&Window>| w.and_then(|w| w.server_rss_bytes);
    Soak {
        window_seconds: every,
        p99_drift_ms: p99(last).zip(p99(first)).map(|(a, b)| a - b),
        rss_drift_bytes: rss(last).zip(rss(first)).map(|(a, b)| a as i64 - b as i64),
        windows,
    }
}

const W: u32 = 580;
const H: u32 = 340;

fn chart_error(e: impl std::fmt::Display) -> anyhow::Error {
    anyhow::anyhow!("drawing the report: {e}")
}

/// p50 and p99 of each second since go.
fn latency_over_time(seconds: &[Second]) -> Result<String> {
    let pts: Vec<(i64, f64, f64)> = seconds
        .iter()
        .filter(|s| s.t >= 0)
        .filter_map(|s| Some((s.t, s.p50_ms?, s.p99_ms?)))
        .collect();
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (W, H)).into_drawing_area();
        root.fill(&WHITE).map_err(chart_error)?;
        let x_max = pts.last().map_or(1, |p| p.0).max(1);
        let y_max = pts.iter().map(|p| p.2).fold(1.0, f64::max) * 1.1;
        let mut chart = ChartBuilder::on(&root)
            .caption("Publish-to-receive latency per second", ("sans-serif", 18))
            .margin(10)
            .x_label_area_size(36)
            .y_label_area_size(52)
            .build_cartesian_2d(0i64..x_max, 0f64..y_max)
            .map_err(chart_error)?;
        chart
            .configure_mesh()
            .x_desc("seconds since start of load")
            .y_desc("ms")
            .draw()
            .map_err(chart_error)?;
        chart
            .draw_series(LineSeries::new(pts.iter().map(|p| (p.0, p.1)), BLUE.stroke_width(2)))
            .map_err(chart_error)?
            .label("p50")
            .legend(|(x, y)| PathElement::new([(x, y), (x + 16, y)], BLUE.stroke_width(2)));
        chart
            .draw_series(LineSeries::new(pts.iter().map(|p| (p.0, p.2)), RED.stroke_width(2)))
            .map_err(chart_error)?
            .label("p99")
            .legend(|(x, y)| PathElement::new([(x, y), (x + 16, y)], RED.stroke_width(2)));
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperLeft)
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()
            .map_err(chart_error)?;
        root.present().map_err(chart_error)?;
    }
    Ok(svg)
}

/// Latency at each percentile of the whole run, on a "nines" axis.
fn percentiles(h: &Histogram<u64>) -> Result<String> {
    // x = number of nines: 0 → p0, 1 → p90, 2 → p99, 3 → p99.9, 4 → p99.99.
    let pts: Vec<(f64, f64)> = if h.is_empty() {
        Vec::new()
    } else {
        (0..=200)
            .map(|i| {
                let x = f64::from(i) / 50.0;
                let q = 1.0 - 10f64.powf(-x);
                (x, h.value_at_quantile(q) as f64 / 1000.0)
            })
            .collect()
    };
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (W, H)).into_drawing_area();
        root.fill(&WHITE).map_err(chart_error)?;
        let y_max = pts.iter().map(|p| p.1).fold(1.0, f64::max) * 1.1;
        let mut chart = ChartBuilder::on(&root)
            .caption("Latency by percentile (whole run)", ("sans-serif", 18))
            .margin(10)
            .margin_right(30)
            .x_label_area_size(36)
            .y_label_area_size(52)
            .build_cartesian_2d(0f64..4f64, 0f64..y_max)
            .map_err(chart_error)?;
        chart
            .configure_mesh()
            .x_labels(5)
            .x_label_formatter(&|x| match x.round() as i64 {
                0 => "p0".into(),
                1 => "p90".into(),
                2 => "p99".into(),
                3 => "p99.9".into(),
                _ => "p99.99".into(),
            })
            .x_desc("percentile")
            .y_desc("ms")
            .draw()
            .map_err(chart_error)?;
        chart
            .draw_series(LineSeries::new(pts, GREEN.stroke_width(2)))
            .map_err(chart_error)?;
        root.present().map_err(chart_error)?;
    }
    Ok(svg)
}

/// Deliveries and connections per second since the processes started.
fn throughput_over_time(seconds: &[Second]) -> Result<String> {
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (W, H)).into_drawing_area();
        root.fill(&WHITE).map_err(chart_error)?;
        let x_min = seconds.first().map_or(0, |s| s.t);
        let x_max = seconds.last().map_or(1, |s| s.t).max(x_min + 1);
        let y_max = seconds
            .iter()
            .map(|s| s.received_per_s.max(s.connections) as f64)
            .fold(1.0, f64::max)
            * 1.1;
        let mut chart = ChartBuilder::on(&root)
            .caption("Deliveries/s and open connections", ("sans-serif", 18))
            .margin(10)
            .x_label_area_size(36)
            .y_label_area_size(64)
            .build_cartesian_2d(x_min..x_max, 0f64..y_max)
            .map_err(chart_error)?;
        chart
            .configure_mesh()
            .x_desc("seconds since start of load (negative: connecting)")
            .draw()
            .map_err(chart_error)?;
        let purple = RGBColor(120, 60, 160);
        chart
            .draw_series(LineSeries::new(
                seconds.iter().map(|s| (s.t, s.received_per_s as f64)),
                BLUE.stroke_width(2),
            ))
            .map_err(chart_error)?
            .label("deliveries/s")
            .legend(|(x, y)| PathElement::new([(x, y), (x + 16, y)], BLUE.stroke_width(2)));
        chart
            .draw_series(LineSeries::new(
                seconds.iter().map(|s| (s.t, s.connections as f64)),
                purple.stroke_width(2),
            ))
            .map_err(chart_error)?
            .label("connections")
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 16, y)], purple.stroke_width(2)));
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperLeft)
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()
            .map_err(chart_error)?;
        root.present().map_err(chart_error)?;
    }
    Ok(svg)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn second(t: i64, p99_us: u64, rss: u64) -> Second {
        let mut h = stats::new_histogram();
        h.record(p99_us).unwrap();
        Second {
            t,
            connections: 10,
            sent_per_s: 1,
            received_per_s: 9,
            reconnects_per_s: 0,
            p50_ms: None,
            p99_ms: None,
            max_ms: None,
            client_cpu_percent: 0.0,
            server_rss_bytes: Some(rss),
            server_cpu_percent: None,
            machine_cpu_percent: None,
            latency: Some(h),
        }
    }

    #[test]
    fn soak_drift_compares_the_first_and_last_full_windows() {
        // Connecting (t <= 0) and draining (t > duration) seconds are left out.
        let mut seconds = vec![second(-1, 900_000, 1)];
        for t in 1..=10 {
            seconds.push(second(t, if t <= 5 { 2_000 } else { 5_000 }, 1000 + t as u64));
        }
        seconds.push(second(11, 900_000, 1));
        let soak = soak_windows(&seconds, 5, 10);
        assert_eq!(soak.windows.len(), 2);
        assert_eq!(soak.windows[0].start_s, 0);
        assert_eq!(soak.windows[1].start_s, 5);
        let drift = soak.p99_drift_ms.unwrap();
        assert!((drift - 3.0).abs() < 0.01, "{drift}");
        assert_eq!(soak.rss_drift_bytes, Some(5));
    }
}
