//! A node's configuration: the TOML schema of the user contract (README "Configuration"),
//! parsed and validated.
//!
//! Every section and key is checked: an unknown key, a wrong type or an impossible value
//! (R > N, Q not a power of two, an interval of 0, ...) is a [`ConfigError`] naming the key,
//! so a node refuses to start rather than run with a setting it misread. Every key but the
//! node's identity and the cluster's name and secret has a default. Parsing is pure: reading
//! the file and a `secret_file` is the caller's job.

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

use crate::ring::{PARTITIONS_MAX, PARTITIONS_MIN};
use crate::version::CLOCK_ENTRIES_MAX;

/// A configuration that cannot be used: the key at fault and what is wrong with it.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("config key {key}: {message}")]
pub struct ConfigError {
    pub key: String,
    pub message: String,
}

impl ConfigError {
    fn new(key: &str, message: impl Into<String>) -> Self {
        ConfigError { key: key.to_string(), message: message.into() }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub node: NodeConfig,
    pub cluster: ClusterConfig,
    #[serde(default)]
    pub storage: StorageConfig,
    #[serde(default)]
    pub gossip: GossipConfig,
    #[serde(default)]
    pub failure_detector: FailureDetectorConfig,
    #[serde(default)]
    pub coordinator: CoordinatorConfig,
    #[serde(default)]
    pub handoff: HandoffConfig,
    #[serde(default)]
    pub anti_entropy: AntiEntropyConfig,
    #[serde(default)]
    pub admission: AdmissionConfig,
    #[serde(default)]
    pub limits: LimitsConfig,
    #[serde(default)]
    pub testing: TestingConfig,
    #[serde(default)]
    pub metrics: MetricsConfig,
    /// Mutual TLS against a cluster CA; absent: secret-only mode.
    #[serde(default)]
    pub tls: Option<TlsConfig>,
}

/// `[tls]`: the cluster CA and this side's certificate and key (PEM), as paths relative to
/// the config file's directory.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    pub ca: String,
    pub cert: String,
    pub key: String,
}

impl TlsConfig {
    fn validate(&self, section: &str) -> Result<(), ConfigError> {
        for (key, v) in [("ca", &self.ca), ("cert", &self.cert), ("key", &self.key)] {
            if v.is_empty() {
                return Err(ConfigError::new(&format!("{section}.{key}"), "must name a file"));
            }
        }
        Ok(())
    }
}

/// Shortest cluster secret a node accepts: in secret-only mode the secret is the whole trust
/// boundary, and a short one can be guessed offline from one observed handshake.
pub const SECRET_BYTES_MIN: usize = 16;

/// Check a cluster secret's strength (a node's config load; `key` names where it came from).
pub fn check_secret(key: &str, secret: &[u8]) -> Result<(), ConfigError> {
    if secret.len() < SECRET_BYTES_MIN {
        return Err(ConfigError::new(
            key,
            format!(
                "the secret is {} bytes; use at least {SECRET_BYTES_MIN} random bytes \
                 (for example `openssl rand -hex 16`), or set up [tls]",
                secret.len()
            ),
        ));
    }
    Ok(())
}

/// A client's file: `[client]` with the nodes to reach and either certificates or the
/// cluster secret. (A node's own config also serves a client, as the node's operator.)
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientFile {
    pub client: ClientConfig,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientConfig {
    /// Nodes to reach first (the client learns the rest of the cluster from them).
    pub nodes: Vec<String>,
    /// The cluster's name: needed with a secret (proofs are bound to it); with certificates
    /// the CA names the cluster and this may be left out.
    #[serde(default)]
    pub cluster: String,
    #[serde(default)]
    pub secret: Option<String>,
    #[serde(default)]
    pub secret_file: Option<String>,
    #[serde(default)]
    pub ca: Option<String>,
    #[serde(default)]
    pub cert: Option<String>,
    #[serde(default)]
    pub key: Option<String>,
}

impl ClientConfig {
    /// The certificates, when the file gives them.
    pub fn tls(&self) -> Option<TlsConfig> {
        match (&self.ca, &self.cert, &self.key) {
            (Some(ca), Some(cert), Some(key)) => {
                Some(TlsConfig { ca: ca.clone(), cert: cert.clone(), key: key.clone() })
            }
            _ => None,
        }
    }

    pub fn node_addrs(&self) -> Vec<SocketAddr> {
        self.nodes.iter().filter_map(|s| s.parse().ok()).collect()
    }

    /// The largest frame a client takes: a node's with the default limits.
    pub fn frame_bytes_max(&self) -> usize {
        frame_bytes(OBJECT_BYTES_DEFAULT, batch_bytes_default())
    }
}

impl ClientFile {
    /// Parse and validate a client file's text.
    pub fn parse(text: &str) -> Result<ClientFile, ConfigError> {
        let file: ClientFile = deserialize(text)?;
        let c = &file.client;
        if c.nodes.is_empty() {
            return Err(ConfigError::new("client.nodes", "list at least one node address"));
        }
        for n in &c.nodes {
            parse_addr("client.nodes", n)?;
        }
        let certs = [&c.ca, &c.cert, &c.key].iter().filter(|v| v.is_some()).count();
        let secret = c.secret.is_some() || c.secret_file.is_some();
        match (certs, secret) {
            (3, false) => {
                if let Some(t) = c.tls() {
                    t.validate("client")?;
                }
            }
            (0, true) => {
                if c.secret.is_some() && c.secret_file.is_some() {
                    return Err(ConfigError::new("client.secret", "give secret or secret_file, not both"));
                }
                if c.secret.as_deref() == Some("") || c.secret_file.as_deref() == Some("") {
                    return Err(ConfigError::new("client.secret", "must not be empty"));
                }
                if c.cluster.is_empty() {
                    return Err(ConfigError::new(
                        "client.cluster",
                        "name the cluster (a secret's proofs are bound to it)",
                    ));
                }
            }
            (0, false) => {
                return Err(ConfigError::new("client", "give ca, cert and key (certificates) or secret / secret_file"))
            }
            (_, true) => return Err(ConfigError::new("client", "give certificates or a secret, not both")),
            _ => return Err(ConfigError::new("client", "give all three of ca, cert and key")),
        }
        Ok(file)
    }

    /// Whether a config file's text is a client file (has a `[client]` table) rather than a
    /// node's config.
    pub fn is_client_file(text: &str) -> bool {
        toml::from_str::<toml::Table>(text).is_ok_and(|t| t.contains_key("client"))
    }
}

/// Deserialize TOML, naming the key and line of the first error.
fn deserialize<T: serde::de::DeserializeOwned>(text: &str) -> Result<T, ConfigError> {
    let de = toml::Deserializer::new(text);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        // The span is in bytes and need not fall on a character boundary: count newlines.
        let line = inner
            .span()
            .map(|s| text.as_bytes()[..s.start.min(text.len())].iter().filter(|&&b| b == b'\n').count() + 1);
        let mut message = inner.message().to_string();
        if let Some(l) = line {
            message = format!("{message} (line {l})");
        }
        let key = if path == "." || path.is_empty() { "(top level)".to_string() } else { path };
        ConfigError { key, message }
    })
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeConfig {
    /// Unique and stable across restarts.
    pub id: String,
    /// QUIC address for peers and clients.
    pub listen: String,
    pub data_dir: String,
    /// At least one; a new node joins through them.
    pub seeds: Vec<String>,
    #[serde(default)]
    pub zone: Option<String>,
    #[serde(default = "one")]
    pub weight: u32,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterConfig {
    pub name: String,
    #[serde(default)]
    pub secret: Option<String>,
    #[serde(default)]
    pub secret_file: Option<String>,
    /// Q: fixed when the cluster is created.
    #[serde(default = "partitions_default")]
    pub partitions: u32,
    /// N.
    #[serde(default = "three")]
    pub replicas: u32,
    /// R.
    #[serde(default = "two")]
    pub read_quorum: u32,
    /// W.
    #[serde(default = "two")]
    pub write_quorum: u32,
    /// Clock entries past which a write prunes the oldest.
    #[serde(default = "prune_default")]
    pub clock_prune_threshold: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Durability {
    /// A write is on disk before it is acknowledged.
    Sync,
    /// Writes are flushed every `flush_interval_ms`; a crash of the machine (not of the
    /// process alone) may lose the last interval.
    Buffered,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StorageConfig {
    #[serde(default = "durability_default")]
    pub durability: Durability,
    #[serde(default = "flush_default")]
    pub flush_interval_ms: u64,
    /// Most operations in one commit log record (group commit).
    #[serde(default = "batch_default")]
    pub commit_batch_max: u32,
    /// A tombstone is reaped once every replica holds it and it is older than this.
    #[serde(default = "grace_default")]
    pub tombstone_grace_ms: u64,
    /// How long a replica remembers a reaped tombstone's clock (so no stale copy brings the
    /// value back), and how long a hint may wait for delivery.
    #[serde(default = "retention_default")]
    pub reaped_retention_ms: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GossipConfig {
    #[serde(default = "gossip_interval_default")]
    pub interval_ms: u64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FailureDetectorConfig {
    /// First probe of a peer down after this long; doubles up to the max.
    #[serde(default = "probe_min_default")]
    pub probe_interval_ms: u64,
    #[serde(default = "probe_max_default")]
    pub probe_interval_max_ms: u64,
    /// How often each member is pinged: the heartbeats phi is computed from.
    #[serde(default = "heartbeat_default")]
    pub heartbeat_interval_ms: u64,
    /// Suspicion above which a peer is down (phi-accrual; Cassandra's default is 8).
    #[serde(default = "phi_default")]
    pub phi_threshold: f64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CoordinatorConfig {
    /// A request not answered by its quorum in this time fails as unavailable.
    #[serde(default = "request_timeout_default")]
    pub request_timeout_ms: u64,
    /// A replica that has not answered in this time is replaced by the next fallback.
    #[serde(default = "replica_timeout_default")]
    pub replica_timeout_ms: u64,
    /// Client requests in flight on this node; more are refused as overloaded.
    #[serde(default = "inflight_default")]
    pub max_inflight: u32,
    /// The share of gets, in percent, that read every replica and repair any stale one
    /// (the paper's read of all N); the others read R replicas, this node first, and
    /// repair only those (as Cassandra does). 100 reads every replica on every get.
    #[serde(default = "read_repair_percent_default")]
    pub read_repair_percent: u8,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HandoffConfig {
    #[serde(default = "handoff_interval_default")]
    pub interval_ms: u64,
    /// Initial run-time limit on concurrent handoff batches; 0 pauses.
    #[serde(default = "two")]
    pub max_inflight: u32,
    /// Tombstones examined per reaping round.
    #[serde(default = "handoff_batch_default")]
    pub batch_keys: u32,
    /// Encoded bytes in one handoff or transfer batch (a larger object travels alone).
    #[serde(default = "batch_bytes_default")]
    pub batch_bytes: u64,
    /// Initial run-time limit on the bytes a second hints and transfers move; 0: unlimited.
    #[serde(default)]
    pub bytes_per_sec: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AntiEntropyConfig {
    #[serde(default = "ae_interval_default")]
    pub interval_ms: u64,
    /// Initial run-time limit on concurrent Merkle exchanges; 0 pauses.
    #[serde(default = "one")]
    pub max_inflight: u32,
    /// Encoded bytes in one page of an exchange (a larger object travels alone).
    #[serde(default = "batch_bytes_default")]
    pub page_bytes: u64,
    /// Initial run-time limit on the bytes a second exchanges move; 0: unlimited.
    #[serde(default)]
    pub bytes_per_sec: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdmissionConfig {
    /// Foreground p99 latency above which background budgets shrink.
    #[serde(default = "latency_target_default")]
    pub latency_target_ms: u64,
    /// Sliding window the foreground p99 is measured over.
    #[serde(default = "latency_window_default")]
    pub latency_window_ms: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsConfig {
    #[serde(default = "value_bytes_default")]
    pub max_value_bytes: u64,
    #[serde(default = "key_bytes_default")]
    pub max_key_bytes: u64,
    /// Siblings a key may hold before writes to it are refused.
    #[serde(default = "siblings_default")]
    pub max_siblings: u32,
    /// Bytes a key's values may take together before a write that grows it is refused;
    /// frames are sized from it, so every object can be read, replicated and handed off.
    #[serde(default = "object_bytes_default")]
    pub object_bytes_max: u64,
}

/// `[metrics]`: the node's HTTP listener for Prometheus (`GET /metrics`), the cluster page
/// (`/`) and its JSON (`/api/cluster`). Absent: no listener.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// IP:port (TCP) to listen on.
    #[serde(default)]
    pub listen: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TestingConfig {
    /// Enables `ringkv admin fault`.
    #[serde(default)]
    pub fault_injection: bool,
}

fn one() -> u32 {
    1
}
fn two() -> u32 {
    2
}
fn three() -> u32 {
    3
}
fn partitions_default() -> u32 {
    64
}
fn prune_default() -> u32 {
    crate::version::PRUNE_THRESHOLD_DEFAULT as u32
}
fn durability_default() -> Durability {
    Durability::Sync
}
fn flush_default() -> u64 {
    100
}
fn batch_default() -> u32 {
    256
}
fn grace_default() -> u64 {
    3_600_000
}
fn retention_default() -> u64 {
    7 * 24 * 3_600_000
}
fn batch_bytes_default() -> u64 {
    4 * 1024 * 1024
}
/// Default `limits.object_bytes_max`.
pub const OBJECT_BYTES_DEFAULT: u64 = 8 * 1024 * 1024;

fn object_bytes_default() -> u64 {
    OBJECT_BYTES_DEFAULT
}
fn gossip_interval_default() -> u64 {
    1000
}
fn heartbeat_default() -> u64 {
    250
}
fn phi_default() -> f64 {
    8.0
}
fn probe_min_default() -> u64 {
    250
}
fn probe_max_default() -> u64 {
    5000
}
fn request_timeout_default() -> u64 {
    5000
}
fn replica_timeout_default() -> u64 {
    1000
}
fn inflight_default() -> u32 {
    2048
}
fn read_repair_percent_default() -> u8 {
    10
}
fn handoff_interval_default() -> u64 {
    5000
}
fn handoff_batch_default() -> u32 {
    100
}
fn ae_interval_default() -> u64 {
    30000
}
fn latency_target_default() -> u64 {
    50
}
fn latency_window_default() -> u64 {
    10000
}
/// Default `limits.max_value_bytes`.
pub const VALUE_BYTES_DEFAULT: u64 = 1024 * 1024;

fn value_bytes_default() -> u64 {
    VALUE_BYTES_DEFAULT
}
fn key_bytes_default() -> u64 {
    4096
}
fn siblings_default() -> u32 {
    100
}

macro_rules! section_default {
    ($t:ty) => {
        impl Default for $t {
            fn default() -> Self {
                // An empty table takes every key's default.
                toml::from_str("").expect("every key of this section has a default")
            }
        }
    };
}
section_default!(StorageConfig);
section_default!(GossipConfig);
section_default!(FailureDetectorConfig);
section_default!(CoordinatorConfig);
section_default!(HandoffConfig);
section_default!(AntiEntropyConfig);
section_default!(AdmissionConfig);
section_default!(LimitsConfig);

/// Largest value size a node accepts: a value must fit in one frame with room to spare.
pub const VALUE_BYTES_LIMIT: u64 = 8 * 1024 * 1024;
/// Largest `limits.object_bytes_max`.
pub const OBJECT_BYTES_LIMIT: u64 = 64 * 1024 * 1024;

impl Config {
    /// Parse and validate a config file's text.
    pub fn parse(text: &str) -> Result<Config, ConfigError> {
        let config: Config = deserialize(text)?;
        config.validate()?;
        Ok(config)
    }

    /// Check every value against what the node can run with.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let n = &self.node;
        if n.id.is_empty() {
            return Err(ConfigError::new("node.id", "must not be empty"));
        }
        if n.id.len() > 64 || !n.id.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)) {
            return Err(ConfigError::new("node.id", "use at most 64 letters, digits, '-', '_' or '.'"));
        }
        parse_addr("node.listen", &n.listen)?;
        if let Some(listen) = &self.metrics.listen {
            parse_addr("metrics.listen", listen)?;
        }
        if n.data_dir.is_empty() {
            return Err(ConfigError::new("node.data_dir", "must not be empty"));
        }
        if n.seeds.is_empty() {
            return Err(ConfigError::new("node.seeds", "list at least one seed address (this node's own is fine)"));
        }
        for s in &n.seeds {
            parse_addr("node.seeds", s)?;
        }
        // The bounds peers hold this node's member record to (`Member::validate`).
        if matches!(&n.zone, Some(z) if z.is_empty() || z.len() > 64) {
            return Err(ConfigError::new("node.zone", "must be 1..=64 bytes when given"));
        }
        if n.weight == 0 || n.weight > 1000 {
            return Err(ConfigError::new("node.weight", "must be in 1..=1000"));
        }

        if let Some(t) = &self.tls {
            t.validate("tls")?;
        }
        let c = &self.cluster;
        if c.name.is_empty() {
            return Err(ConfigError::new("cluster.name", "must not be empty"));
        }
        match (&c.secret, &c.secret_file) {
            (Some(_), Some(_)) => {
                return Err(ConfigError::new("cluster.secret", "give secret or secret_file, not both"));
            }
            (None, None) if self.tls.is_none() => {
                return Err(ConfigError::new("cluster.secret", "give secret or secret_file (or set up [tls])"))
            }
            (Some(s), None) if s.is_empty() => return Err(ConfigError::new("cluster.secret", "must not be empty")),
            (None, Some(f)) if f.is_empty() => {
                return Err(ConfigError::new("cluster.secret_file", "must not be empty"));
            }
            _ => {}
        }
        if !c.partitions.is_power_of_two() || !(PARTITIONS_MIN..=PARTITIONS_MAX).contains(&c.partitions) {
            return Err(ConfigError::new(
                "cluster.partitions",
                format!("{} is not a power of two in {PARTITIONS_MIN}..={PARTITIONS_MAX}", c.partitions),
            ));
        }
        if c.replicas == 0 || c.replicas > 16 {
            return Err(ConfigError::new("cluster.replicas", format!("{} is not in 1..=16", c.replicas)));
        }
        for (key, q) in [("cluster.read_quorum", c.read_quorum), ("cluster.write_quorum", c.write_quorum)] {
            if q == 0 || q > c.replicas {
                return Err(ConfigError::new(key, format!("{q} is not in 1..=cluster.replicas ({})", c.replicas)));
            }
        }
        // A coordinated write keeps at most max(threshold, live siblings) clock entries, and
        // a clock past CLOCK_ENTRIES_MAX does not decode.
        if c.clock_prune_threshold < 2 || c.clock_prune_threshold as usize > CLOCK_ENTRIES_MAX {
            return Err(ConfigError::new(
                "cluster.clock_prune_threshold",
                format!("must be in 2..={CLOCK_ENTRIES_MAX}"),
            ));
        }

        positive("storage.flush_interval_ms", self.storage.flush_interval_ms)?;
        positive("storage.commit_batch_max", self.storage.commit_batch_max as u64)?;
        positive("storage.tombstone_grace_ms", self.storage.tombstone_grace_ms)?;
        if self.storage.reaped_retention_ms < self.storage.tombstone_grace_ms {
            return Err(ConfigError::new("storage.reaped_retention_ms", "must be at least storage.tombstone_grace_ms"));
        }
        positive("gossip.interval_ms", self.gossip.interval_ms)?;
        positive("failure_detector.probe_interval_ms", self.failure_detector.probe_interval_ms)?;
        positive("failure_detector.heartbeat_interval_ms", self.failure_detector.heartbeat_interval_ms)?;
        let phi = self.failure_detector.phi_threshold;
        if !(phi.is_finite() && (1.0..=32.0).contains(&phi)) {
            return Err(ConfigError::new("failure_detector.phi_threshold", format!("{phi} is not in 1..=32")));
        }
        if self.failure_detector.probe_interval_max_ms < self.failure_detector.probe_interval_ms {
            return Err(ConfigError::new(
                "failure_detector.probe_interval_max_ms",
                "must be at least failure_detector.probe_interval_ms",
            ));
        }
        positive("coordinator.request_timeout_ms", self.coordinator.request_timeout_ms)?;
        positive("coordinator.replica_timeout_ms", self.coordinator.replica_timeout_ms)?;
        positive("coordinator.max_inflight", self.coordinator.max_inflight as u64)?;
        if self.coordinator.read_repair_percent > 100 {
            let p = self.coordinator.read_repair_percent;
            return Err(ConfigError::new("coordinator.read_repair_percent", format!("{p} is not in 0..=100")));
        }
        positive("handoff.interval_ms", self.handoff.interval_ms)?;
        positive("handoff.batch_keys", self.handoff.batch_keys as u64)?;
        positive("handoff.batch_bytes", self.handoff.batch_bytes)?;
        positive("anti_entropy.page_bytes", self.anti_entropy.page_bytes)?;
        positive("anti_entropy.interval_ms", self.anti_entropy.interval_ms)?;
        positive("admission.latency_target_ms", self.admission.latency_target_ms)?;
        positive("admission.latency_window_ms", self.admission.latency_window_ms)?;
        let l = &self.limits;
        if l.max_value_bytes == 0 || l.max_value_bytes > VALUE_BYTES_LIMIT {
            return Err(ConfigError::new("limits.max_value_bytes", format!("must be in 1..={VALUE_BYTES_LIMIT}")));
        }
        if l.max_key_bytes == 0 || l.max_key_bytes > 65536 {
            return Err(ConfigError::new("limits.max_key_bytes", "must be in 1..=65536"));
        }
        if l.max_siblings == 0 || l.max_siblings as usize > CLOCK_ENTRIES_MAX {
            return Err(ConfigError::new("limits.max_siblings", format!("must be in 1..={CLOCK_ENTRIES_MAX}")));
        }
        if l.object_bytes_max < l.max_value_bytes || l.object_bytes_max > OBJECT_BYTES_LIMIT {
            return Err(ConfigError::new(
                "limits.object_bytes_max",
                format!("must be in limits.max_value_bytes ({})..={OBJECT_BYTES_LIMIT}", l.max_value_bytes),
            ));
        }
        for (key, v) in [
            ("handoff.batch_bytes", self.handoff.batch_bytes),
            ("anti_entropy.page_bytes", self.anti_entropy.page_bytes),
        ] {
            if v > OBJECT_BYTES_LIMIT {
                return Err(ConfigError::new(key, format!("must be at most {OBJECT_BYTES_LIMIT}")));
            }
        }
        Ok(())
    }

    /// The largest frame this node sends or accepts: room for two objects at their limit
    /// (a read repair merges two), or a batch or page at its limit, plus framing.
    pub fn frame_bytes_max(&self) -> usize {
        frame_bytes(self.limits.object_bytes_max, self.handoff.batch_bytes.max(self.anti_entropy.page_bytes))
    }

    pub fn listen_addr(&self) -> SocketAddr {
        // Validated at parse time.
        self.node.listen.parse().unwrap_or_else(|_| SocketAddr::from(([127, 0, 0, 1], 0)))
    }

    /// Where the metrics listener binds, when `[metrics] listen` is set (validated at parse time).
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics.listen.as_ref().and_then(|l| l.parse().ok())
    }

    pub fn seed_addrs(&self) -> Vec<SocketAddr> {
        self.node.seeds.iter().filter_map(|s| s.parse().ok()).collect()
    }
}

/// The largest frame for these object and batch limits: room for two objects at their limit
/// (a read repair merges two), or a batch or page at its limit, plus framing.
fn frame_bytes(object_bytes_max: u64, batch_bytes: u64) -> usize {
    let (object, batch) = (object_bytes_max as usize, batch_bytes as usize);
    crate::wire::FRAME_BYTES_MAX_DEFAULT.max(2 * object + 1024 * 1024).max(batch + object + 1024 * 1024)
}

fn parse_addr(key: &str, text: &str) -> Result<SocketAddr, ConfigError> {
    text.parse().map_err(|_| ConfigError::new(key, format!("{text:?} is not an IP:port address")))
}

fn positive(key: &str, v: u64) -> Result<(), ConfigError> {
    if v == 0 {
        Err(ConfigError::new(key, "must be greater than 0"))
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
[node]
id = "n1"
listen = "127.0.0.1:7101"
data_dir = "data/n1"
seeds = ["127.0.0.1:7101"]

[cluster]
name = "dev"
secret = "change-me"
"#;

    fn with(section_edit: &str) -> String {
        format!("{GOOD}\n{section_edit}\n")
    }

    fn err_key(text: &str) -> String {
        Config::parse(text).unwrap_err().key
    }

    #[test]
    fn minimal_config_takes_defaults() {
        let c = Config::parse(GOOD).unwrap();
        assert_eq!(c.cluster.partitions, 64);
        assert_eq!((c.cluster.replicas, c.cluster.read_quorum, c.cluster.write_quorum), (3, 2, 2));
        assert_eq!(c.storage.durability, Durability::Sync);
        assert_eq!(c.handoff.max_inflight, 2);
        assert_eq!(c.anti_entropy.max_inflight, 1);
        assert_eq!(c.limits.max_value_bytes, 1 << 20);
        assert!(!c.testing.fault_injection);
        assert_eq!(c.node.weight, 1);
    }

    #[test]
    fn the_design_example_parses() {
        let text = include_str!("../config/node.toml");
        let c = Config::parse(text).unwrap();
        assert_eq!(c.node.id, "n1");
        for f in ["n1", "n2", "n3"] {
            let text =
                std::fs::read_to_string(format!("{}/config/cluster/{f}.toml", env!("CARGO_MANIFEST_DIR"))).unwrap();
            assert_eq!(Config::parse(&text).unwrap().node.id, f);
        }
    }

    #[test]
    fn unknown_keys_are_named() {
        let e = Config::parse(&GOOD.replace("name = \"dev\"", "name = \"dev\"\nreplcas = 3")).unwrap_err();
        assert_eq!(e.key, "cluster.replcas");
        assert!(e.message.contains("unknown field"), "{e}");
        assert_eq!(err_key(&with("[gossip]\nintervall_ms = 5")), "gossip.intervall_ms");
        assert_eq!(err_key(&with("[nonsense]\nx = 1")), "nonsense");
    }

    #[test]
    fn wrong_types_are_named() {
        let e = Config::parse(&GOOD.replace("secret = \"change-me\"", "secret = \"x\"\npartitions = \"many\""))
            .unwrap_err();
        assert_eq!(e.key, "cluster.partitions");
        assert_eq!(err_key(&with("[storage]\ndurability = \"sometimes\"")), "storage.durability");
        assert_eq!(err_key(&with("[handoff]\nmax_inflight = -1")), "handoff.max_inflight");
        assert_eq!(err_key(&with("[coordinator]\nread_repair_percent = 0.5")), "coordinator.read_repair_percent");
    }

    #[test]
    fn impossible_values_are_named() {
        let cases: Vec<(String, &str)> = vec![
            (GOOD.replace("id = \"n1\"", "id = \"\""), "node.id"),
            (GOOD.replace("id = \"n1\"", "id = \"n 1\""), "node.id"),
            (GOOD.replace("listen = \"127.0.0.1:7101\"", "listen = \"localhost\""), "node.listen"),
            (GOOD.replace("seeds = [\"127.0.0.1:7101\"]", "seeds = []"), "node.seeds"),
            (GOOD.replace("seeds = [\"127.0.0.1:7101\"]", "seeds = [\"x\"]"), "node.seeds"),
            (GOOD.replace("secret = \"change-me\"", ""), "cluster.secret"),
            (GOOD.replace("secret = \"change-me\"", "secret = \"\""), "cluster.secret"),
            (GOOD.replace("secret = \"change-me\"", "secret = \"a\"\nsecret_file = \"b\""), "cluster.secret"),
            (GOOD.replace("secret = \"change-me\"", "secret = \"a\"\npartitions = 48"), "cluster.partitions"),
            (GOOD.replace("secret = \"change-me\"", "secret = \"a\"\npartitions = 8192"), "cluster.partitions"),
            (GOOD.replace("secret = \"change-me\"", "secret = \"a\"\nreplicas = 0"), "cluster.replicas"),
            (GOOD.replace("secret = \"change-me\"", "secret = \"a\"\nread_quorum = 4"), "cluster.read_quorum"),
            (
                GOOD.replace(
                    "secret = \"change-me\"",
                    "secret = \"a\"\nreplicas = 1\nwrite_quorum = 2\nread_quorum = 1",
                ),
                "cluster.write_quorum",
            ),
            (with("[gossip]\ninterval_ms = 0"), "gossip.interval_ms"),
            (with("[coordinator]\nread_repair_percent = 101"), "coordinator.read_repair_percent"),
            (with("[handoff]\ninterval_ms = 0"), "handoff.interval_ms"),
            (with("[anti_entropy]\ninterval_ms = 0"), "anti_entropy.interval_ms"),
            (with("[limits]\nmax_value_bytes = 0"), "limits.max_value_bytes"),
            (with("[storage]\nflush_interval_ms = 0"), "storage.flush_interval_ms"),
            (with("[storage]\ntombstone_grace_ms = 10\nreaped_retention_ms = 5"), "storage.reaped_retention_ms"),
            (with("[limits]\nmax_value_bytes = 100\nobject_bytes_max = 99"), "limits.object_bytes_max"),
            (with("[handoff]\nbatch_bytes = 0"), "handoff.batch_bytes"),
            (with("[metrics]\nlisten = \"localhost:9100\""), "metrics.listen"),
            (with("[metrics]\nlisten = 9100"), "metrics.listen"),
            (with("[node2]\n"), "node2"),
            // Found by fuzzing: accepted, though peers refuse such a member record, or the
            // node's own clocks would not decode.
            (GOOD.replace("seeds = [", &format!("zone = \"{}\"\nseeds = [", "z".repeat(65))), "node.zone"),
            (
                GOOD.replace("secret = \"change-me\"", "secret = \"a\"\nclock_prune_threshold = 1025"),
                "cluster.clock_prune_threshold",
            ),
            (with("[limits]\nmax_siblings = 1025"), "limits.max_siblings"),
        ];
        for (text, key) in cases {
            assert_eq!(err_key(&text), key, "{text}");
        }
    }

    #[test]
    fn metrics_listener_is_optional() {
        assert_eq!(Config::parse(&with("")).unwrap().metrics_addr(), None);
        let on = Config::parse(&with("[metrics]\nlisten = \"127.0.0.1:9100\"")).unwrap();
        assert_eq!(on.metrics_addr(), Some("127.0.0.1:9100".parse().unwrap()));
    }

    #[test]
    fn zero_inflight_is_allowed_and_pauses() {
        let c = Config::parse(&with("[anti_entropy]\nmax_inflight = 0\n[handoff]\nmax_inflight = 0")).unwrap();
        assert_eq!((c.anti_entropy.max_inflight, c.handoff.max_inflight), (0, 0));
    }

    #[test]
    fn an_error_inside_a_multibyte_character_is_reported_not_a_panic() {
        // Found by fuzzing: the parser's error span can start inside a character, and slicing
        // the text there to count lines panicked.
        for text in ["r=\"\\\u{FFFD}", "r=\"\\é", "[node]\nid = \"\\é"] {
            let e = Config::parse(text).unwrap_err();
            assert!(e.message.contains("line"), "{e}");
        }
        assert!(Config::parse("[node]\nid = \"\\é").unwrap_err().message.ends_with("(line 2)"));
    }

    #[test]
    fn error_message_says_key_and_line() {
        let e = Config::parse(&GOOD.replace("secret = \"change-me\"", "secret = \"x\"\npartitions = \"many\""))
            .unwrap_err();
        let text = e.to_string();
        assert!(text.starts_with("config key cluster.partitions:"), "{text}");
        assert!(text.contains("line"), "{text}");
    }

    #[test]
    fn with_tls_the_secret_is_optional() {
        let tls = GOOD.replace("secret = \"change-me\"", "")
            + "\n[tls]\nca = \"ca.crt\"\ncert = \"n1.crt\"\nkey = \"n1.key\"\n";
        let c = Config::parse(&tls).unwrap();
        assert_eq!(c.tls.map(|t| t.cert), Some("n1.crt".to_string()));
        assert!(Config::parse(&tls.replace("key = \"n1.key\"", "")).unwrap_err().to_string().contains("key"));
        assert_eq!(err_key(&tls.replace("key = \"n1.key\"", "key = \"\"")), "tls.key");
    }

    #[test]
    fn short_secrets_are_refused_naming_the_key() {
        assert_eq!(check_secret("cluster.secret", b"change-me").map_err(|e| e.key), Err("cluster.secret".to_string()));
        assert!(check_secret("cluster.secret", b"0123456789abcdef").is_ok());
    }

    #[test]
    fn client_files() {
        let certs = "[client]\nnodes = [\"127.0.0.1:7101\"]\nca = \"ca.crt\"\ncert = \"ops.crt\"\nkey = \"ops.key\"\n";
        assert!(ClientFile::is_client_file(certs));
        assert!(!ClientFile::is_client_file(GOOD));
        let f = ClientFile::parse(certs).unwrap();
        assert_eq!(f.client.tls().map(|t| t.key), Some("ops.key".to_string()));
        assert_eq!(f.client.node_addrs().len(), 1);
        let secret = "[client]\nnodes = [\"127.0.0.1:7101\"]\ncluster = \"dev\"\nsecret = \"s\"\n";
        assert!(ClientFile::parse(secret).is_ok());
        let key = |t: &str| ClientFile::parse(t).unwrap_err().key;
        assert_eq!(key(&secret.replace("cluster = \"dev\"\n", "")), "client.cluster");
        assert_eq!(key("[client]\nnodes = []\nsecret = \"s\"\ncluster = \"c\"\n"), "client.nodes");
        assert_eq!(key("[client]\nnodes = [\"nowhere\"]\nsecret = \"s\"\ncluster = \"c\"\n"), "client.nodes");
        assert_eq!(key(&certs.replace("key = \"ops.key\"\n", "")), "client");
        assert_eq!(key(&format!("{certs}secret = \"s\"\n")), "client");
        assert_eq!(key("[client]\nnodes = [\"127.0.0.1:1\"]\n"), "client");
        assert_eq!(key(&format!("{certs}colour = 1\n")), "client.colour");
    }
}
