//! The node's metrics: the figures its shell measures itself (storage commits and reads,
//! open connections by role), kept in prometheus-client metrics, and the encoding of those
//! together with the core stages' reports ([`ringkv::metrics::Report`], collected from each
//! stage actor on every scrape) in the Prometheus text format (version 0.0.4).

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric, NoLabelSet};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;
use ringkv::metrics::{Kind, Report, Value, LATENCY_BUCKETS_S};

/// The Content-Type of what [`render`] produces.
pub const CONTENT_TYPE: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

/// Upper bounds of the operations-per-commit buckets.
const BATCH_OPS_BUCKETS: [f64; 11] = [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0];

/// Labels of the open-connections gauge: the peer's role.
pub type RoleLabels = [(&'static str, &'static str); 1];

/// Bucket bounds of the disk timings, in seconds: a synchronous write of a commit log
/// record takes from tens of microseconds (a fast disk) to milliseconds.
const DISK_BUCKETS_S: &[f64] =
    &[0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0];

/// What the shell measures. Clones share the same figures (each metric is reference-counted).
#[derive(Clone, Debug)]
pub struct NodeMetrics {
    /// Storage operations in each committed batch (group commit).
    pub commit_ops: Histogram,
    /// How long each batch took to commit.
    pub commit_seconds: Histogram,
    /// How long each append of a commit log record took, its flush included.
    pub log_append_seconds: Histogram,
    /// How long each redb commit (of logged batches, or a checkpoint) took.
    pub redb_commit_seconds: Histogram,
    /// How long each row read took (run by the stage actors in read snapshots).
    pub read_seconds: Histogram,
    /// Connections open now, by the peer's role (node, read, write, admin).
    pub connections: Family<RoleLabels, Gauge>,
}

impl Default for NodeMetrics {
    fn default() -> Self {
        NodeMetrics {
            commit_ops: Histogram::new(BATCH_OPS_BUCKETS),
            commit_seconds: Histogram::new(LATENCY_BUCKETS_S.iter().copied()),
            log_append_seconds: Histogram::new(DISK_BUCKETS_S.iter().copied()),
            redb_commit_seconds: Histogram::new(DISK_BUCKETS_S.iter().copied()),
            read_seconds: Histogram::new(LATENCY_BUCKETS_S.iter().copied()),
            connections: Family::default(),
        }
    }
}

impl NodeMetrics {
    /// A connection of a peer with `role` opened (`delta` 1) or closed (-1).
    pub fn connection(&self, role: &'static str, delta: i64) {
        self.connections.get_or_create(&[("role", role)]).inc_by(delta);
    }

    fn register(&self, registry: &mut Registry) {
        registry.register(
            "ringkv_storage_commit_batch_ops",
            "Storage operations in each committed batch (group commit)",
            self.commit_ops.clone(),
        );
        registry.register(
            "ringkv_storage_commit_duration_seconds",
            "How long each storage batch took to commit",
            self.commit_seconds.clone(),
        );
        registry.register(
            "ringkv_storage_log_append_duration_seconds",
            "How long each append of a commit log record took, its flush included (in sync mode, the device's write)",
            self.log_append_seconds.clone(),
        );
        registry.register(
            "ringkv_storage_redb_commit_duration_seconds",
            "How long each redb commit took (of the batches logged since the last, or a checkpoint)",
            self.redb_commit_seconds.clone(),
        );
        registry.register(
            "ringkv_storage_read_duration_seconds",
            "How long each read of stored rows took",
            self.read_seconds.clone(),
        );
        registry.register(
            "ringkv_connections",
            "Connections open now, by the peer's role (node, read, write, admin)",
            self.connections.clone(),
        );
    }
}

/// The core stages' reports, encoded on a scrape.
#[derive(Debug)]
struct StageFigures(Report);

impl Collector for StageFigures {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        for f in &self.0.families {
            let kind = match f.kind {
                Kind::Counter => MetricType::Counter,
                Kind::Gauge => MetricType::Gauge,
                Kind::Histogram => MetricType::Histogram,
            };
            // Help ends with a period, as prometheus-client writes it for registered metrics.
            let help = format!("{}.", f.help);
            let mut metric = encoder.encode_descriptor(f.name, &help, None, kind)?;
            for s in &f.samples {
                let labels: Vec<(&str, &str)> = s.labels.iter().map(|(k, v)| (*k, v.as_str())).collect();
                let value = SampleValue(&s.value);
                if labels.is_empty() {
                    value.encode(metric.encode_family(&NoLabels)?)?;
                } else {
                    value.encode(metric.encode_family(&labels)?)?;
                }
            }
        }
        Ok(())
    }
}

/// An empty label set (a sample of a family without labels).
struct NoLabels;

impl prometheus_client::encoding::EncodeLabelSet for NoLabels {
    fn encode(&self, _: &mut prometheus_client::encoding::LabelSetEncoder) -> Result<(), std::fmt::Error> {
        Ok(())
    }
}

/// One sample's value, as prometheus-client encodes it.
#[derive(Debug)]
struct SampleValue<'a>(&'a Value);

impl EncodeMetric for SampleValue<'_> {
    fn encode(&self, mut encoder: prometheus_client::encoding::MetricEncoder) -> Result<(), std::fmt::Error> {
        match self.0 {
            Value::Count(n) => encoder.encode_counter::<NoLabelSet, _, u64>(n, None),
            Value::Level(v) => encoder.encode_gauge(v),
            Value::Histogram(h) => encoder.encode_histogram::<NoLabelSet>(h.sum(), h.count(), &h.buckets(), None),
        }
    }

    fn metric_type(&self) -> MetricType {
        match self.0 {
            Value::Count(_) => MetricType::Counter,
            Value::Level(_) => MetricType::Gauge,
            Value::Histogram(_) => MetricType::Histogram,
        }
    }
}

/// The Prometheus text of the stages' `report` and the shell's figures.
pub fn render(report: Report, shell: &NodeMetrics) -> String {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(StageFigures(report)));
    shell.register(&mut registry);
    let mut out = String::new();
    if let Err(e) = prometheus_client::encoding::prometheus_text::encode(&mut out, &registry) {
        tracing::warn!(error = %e, "metrics could not be encoded");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stage_figures_and_shell_figures_are_one_exposition() {
        let mut report = Report::default();
        report.counter("ringkv_requests", "Client requests", &[("op", "put"), ("result", "ok")], 20);
        report.counter("ringkv_read_repairs", "Read repairs", &[], 2);
        report.gauge("ringkv_transfers_pending", "Pending", &[], 3.0);
        let mut h = ringkv::metrics::Histogram::new(LATENCY_BUCKETS_S);
        h.observe(0.002);
        report.histogram("ringkv_request_duration_seconds", "Durations", &[("op", "put")], &h);
        let shell = NodeMetrics::default();
        shell.commit_ops.observe(3.0);
        shell.log_append_seconds.observe(0.0004);
        shell.connection("admin", 1);
        let text = render(report, &shell);
        for line in [
            "ringkv_requests_total{op=\"put\",result=\"ok\"} 20",
            "ringkv_read_repairs_total 2",
            "ringkv_transfers_pending 3.0",
            "ringkv_request_duration_seconds_bucket{op=\"put\",le=\"0.0025\"} 1",
            "ringkv_request_duration_seconds_count{op=\"put\"} 1",
            "ringkv_storage_commit_batch_ops_sum 3.0",
            "ringkv_storage_log_append_duration_seconds_bucket{le=\"0.0005\"} 1",
            "ringkv_storage_redb_commit_duration_seconds_count 0",
            "ringkv_connections{role=\"admin\"} 1",
        ] {
            assert!(text.lines().any(|l| l == line), "{line:?} missing from\n{text}");
        }
        assert!(text.contains("# TYPE ringkv_requests_total counter"), "{text}");
    }
}
