//! The metrics a crate emits, declared as data: name, kind, help text, and
//! for a labelled metric its one label and every value it takes.
//!
//! Each crate lists its metrics in a `METRICS` table; the binary describes
//! and registers the tables of the crates a role runs, at zero, when it
//! installs the recorder. So a fresh process already serves every series on
//! `/metrics`: dashboards have a baseline, `rate()` has a first sample, and
//! an alert can tell "idle" (0) from "broken" (absent).

/// What kind of series a metric is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MetricKind {
    Counter,
    Gauge,
    Histogram,
}

/// One metric a crate emits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Metric {
    pub kind: MetricKind,
    pub name: &'static str,
    pub help: &'static str,
    /// The metric's label and all its values, if it has one (labels come
    /// from small fixed sets, never from channel or user ids).
    pub label: Option<(&'static str, &'static [&'static str])>,
}

impl Metric {
    pub const fn counter(name: &'static str, help: &'static str) -> Self {
        Self {
            kind: MetricKind::Counter,
            name,
            help,
            label: None,
        }
    }

    pub const fn gauge(name: &'static str, help: &'static str) -> Self {
        Self {
            kind: MetricKind::Gauge,
            name,
            help,
            label: None,
        }
    }

    pub const fn histogram(name: &'static str, help: &'static str) -> Self {
        Self {
            kind: MetricKind::Histogram,
            name,
            help,
            label: None,
        }
    }

    /// The same metric with label `key` taking `values`.
    pub const fn labelled(self, key: &'static str, values: &'static [&'static str]) -> Self {
        Self {
            label: Some((key, values)),
            ..self
        }
    }
}
