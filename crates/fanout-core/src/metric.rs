//! The metrics a crate emits, declared as data: name, kind, help text, and
//! for a labelled metric its labels (one or two) and every value they take.
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
    /// A second label, for a metric counted by two things (an API call by
    /// method and by result code): every pair of values is a series.
    pub second_label: Option<(&'static str, &'static [&'static str])>,
}

impl Metric {
    pub const fn counter(name: &'static str, help: &'static str) -> Self {
        Self {
            kind: MetricKind::Counter,
            name,
            help,
            label: None,
            second_label: None,
        }
    }

    pub const fn gauge(name: &'static str, help: &'static str) -> Self {
        Self {
            kind: MetricKind::Gauge,
            name,
            help,
            label: None,
            second_label: None,
        }
    }

    pub const fn histogram(name: &'static str, help: &'static str) -> Self {
        Self {
            kind: MetricKind::Histogram,
            name,
            help,
            label: None,
            second_label: None,
        }
    }

    /// The same metric with label `key` taking `values` (its second label
    /// if it has one already).
    pub const fn labelled(self, key: &'static str, values: &'static [&'static str]) -> Self {
        match self.label {
            None => Self {
                label: Some((key, values)),
                ..self
            },
            Some(_) => Self {
                second_label: Some((key, values)),
                ..self
            },
        }
    }

    /// Every series of the metric, as its label pairs: one without labels,
    /// else one per value (per pair of values with two labels).
    pub fn series(&self) -> Vec<Vec<(&'static str, &'static str)>> {
        let one =
            |label: Option<(&'static str, &'static [&'static str])>| -> Vec<Option<(&'static str, &'static str)>> {
                match label {
                    None => vec![None],
                    Some((key, values)) => values.iter().map(|v| Some((key, *v))).collect(),
                }
            };
        let mut all = Vec::new();
        for a in one(self.label) {
            for b in one(self.second_label) {
                all.push(a.into_iter().chain(b).collect());
            }
        }
        all
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn series_of_zero_one_and_two_labels() {
        assert_eq!(Metric::counter("a", "").series(), vec![vec![]]);
        let one = Metric::counter("b", "").labelled("k", &["x", "y"]);
        assert_eq!(one.series(), vec![vec![("k", "x")], vec![("k", "y")]]);
        let two = one.labelled("code", &["ok", "bad"]);
        assert_eq!(
            two.series(),
            vec![
                vec![("k", "x"), ("code", "ok")],
                vec![("k", "x"), ("code", "bad")],
                vec![("k", "y"), ("code", "ok")],
                vec![("k", "y"), ("code", "bad")],
            ]
        );
    }
}
