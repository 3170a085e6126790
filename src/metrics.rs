//! The figures the stages keep for operators, as plain numbers: counters, gauges and
//! histograms with Prometheus-style names and labels. Each stage fills a [`Report`] on
//! request ([`crate::stage::Stage::report`]); the node exports the reports of all its stages
//! on `GET /metrics` (the node's `metrics` module encodes them with a Prometheus crate). The
//! core holds no metrics library: a report is only data.
//!
//! Names follow Prometheus: a counter's family name is exported with `_total` appended
//! (`ringkv_requests` becomes `ringkv_requests_total`), durations are in seconds.

/// What a family's samples are.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Only ever grows (since the node started).
    Counter,
    /// Goes up and down.
    Gauge,
    /// Observations counted into buckets.
    Histogram,
}

/// One sample's value.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    Count(u64),
    Level(f64),
    Histogram(Histogram),
}

/// One sample of a family: its labels and value.
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    pub labels: Vec<(&'static str, String)>,
    pub value: Value,
}

/// A named metric with its samples.
#[derive(Clone, Debug, PartialEq)]
pub struct Family {
    pub name: &'static str,
    pub help: &'static str,
    pub kind: Kind,
    pub samples: Vec<Sample>,
}

/// The figures of one or more stages.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Report {
    pub families: Vec<Family>,
}

/// Labels as a stage gives them.
pub type Labels<'a> = &'a [(&'static str, &'a str)];

impl Report {
    fn family(&mut self, name: &'static str, help: &'static str, kind: Kind) -> &mut Family {
        let at = match self.families.iter().position(|f| f.name == name) {
            Some(at) => at,
            None => {
                self.families.push(Family { name, help, kind, samples: Vec::new() });
                self.families.len() - 1
            }
        };
        &mut self.families[at]
    }

    fn sample(&mut self, name: &'static str, help: &'static str, kind: Kind, labels: Labels, value: Value) {
        let labels = labels.iter().map(|(k, v)| (*k, v.to_string())).collect();
        self.family(name, help, kind).samples.push(Sample { labels, value });
    }

    /// A counter's value (name without `_total`).
    pub fn counter(&mut self, name: &'static str, help: &'static str, labels: Labels, value: u64) {
        self.sample(name, help, Kind::Counter, labels, Value::Count(value));
    }

    /// A gauge's value.
    pub fn gauge(&mut self, name: &'static str, help: &'static str, labels: Labels, value: f64) {
        self.sample(name, help, Kind::Gauge, labels, Value::Level(value));
    }

    /// A family with no sample yet (so that it is listed, e.g. hints held when there is none).
    pub fn declare(&mut self, name: &'static str, help: &'static str, kind: Kind) {
        self.family(name, help, kind);
    }

    /// A histogram's state.
    pub fn histogram(&mut self, name: &'static str, help: &'static str, labels: Labels, h: &Histogram) {
        self.sample(name, help, Kind::Histogram, labels, Value::Histogram(h.clone()));
    }

    /// Add another report's families (a family reported twice keeps both sets of samples).
    pub fn extend(&mut self, other: Report) {
        for f in other.families {
            let mine = self.family(f.name, f.help, f.kind);
            mine.samples.extend(f.samples);
        }
    }

    /// The value of the sample of `name` with exactly these labels, if reported.
    pub fn get(&self, name: &str, labels: Labels) -> Option<&Value> {
        let f = self.families.iter().find(|f| f.name == name)?;
        f.samples
            .iter()
            .find(|s| {
                s.labels.len() == labels.len() && labels.iter().all(|(k, v)| s.labels.contains(&(*k, v.to_string())))
            })
            .map(|s| &s.value)
    }

    /// A counter's value, 0 when not reported.
    pub fn count(&self, name: &str, labels: Labels) -> u64 {
        match self.get(name, labels) {
            Some(Value::Count(n)) => *n,
            _ => 0,
        }
    }
}

/// Upper bounds, in seconds, of the buckets of request and storage latencies.
pub const LATENCY_BUCKETS_S: &[f64] = &[0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];

/// Observations counted into buckets with fixed upper bounds (and one above the last).
#[derive(Clone, Debug, PartialEq)]
pub struct Histogram {
    bounds: &'static [f64],
    /// Per bucket, not cumulative; one more than `bounds` (the +Inf bucket).
    counts: Vec<u64>,
    sum: f64,
    count: u64,
}

impl Histogram {
    pub fn new(bounds: &'static [f64]) -> Histogram {
        Histogram { bounds, counts: vec![0; bounds.len() + 1], sum: 0.0, count: 0 }
    }

    /// Count one observation.
    pub fn observe(&mut self, v: f64) {
        let at = self.bounds.iter().position(|b| v <= *b).unwrap_or(self.bounds.len());
        if let Some(c) = self.counts.get_mut(at) {
            *c = c.saturating_add(1);
        }
        self.sum += v;
        self.count = self.count.saturating_add(1);
    }

    pub fn sum(&self) -> f64 {
        self.sum
    }

    pub fn count(&self) -> u64 {
        self.count
    }

    /// Each bucket's upper bound and its own count (not cumulative), the last bound +Inf.
    pub fn buckets(&self) -> Vec<(f64, u64)> {
        self.bounds.iter().copied().chain(std::iter::once(f64::INFINITY)).zip(self.counts.iter().copied()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_count_each_observation_once_and_end_at_infinity() {
        let mut h = Histogram::new(&[0.001, 0.01]);
        for v in [0.0, 0.001, 0.005, 3.0] {
            h.observe(v);
        }
        assert_eq!(h.count(), 4);
        assert_eq!(h.buckets(), vec![(0.001, 2), (0.01, 1), (f64::INFINITY, 1)]);
        assert!((h.sum() - 3.006).abs() < 1e-9);
    }

    #[test]
    fn reports_group_samples_by_family_and_find_them_by_labels() {
        let mut r = Report::default();
        r.counter("ringkv_requests", "h", &[("op", "get"), ("result", "ok")], 3);
        let mut other = Report::default();
        other.counter("ringkv_requests", "h", &[("op", "put"), ("result", "ok")], 5);
        other.declare("ringkv_hints_held", "h", Kind::Gauge);
        r.extend(other);
        assert_eq!(r.families.len(), 2);
        assert_eq!(r.count("ringkv_requests", &[("result", "ok"), ("op", "put")]), 5);
        assert_eq!(r.count("ringkv_requests", &[("op", "delete"), ("result", "ok")]), 0);
        assert!(r.families[1].samples.is_empty());
    }
}
