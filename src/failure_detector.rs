//! Failure detection (Dynamo §4.8.3): a purely local view of which peers answer, by
//! phi-accrual (Hayashibara et al., as in Cassandra and Akka).
//!
//! Every `heartbeat_interval_ms` this node pings each member; each answer (and any ping or
//! other success from a peer) is a heartbeat. For each peer the detector keeps the recent
//! intervals between heartbeats and computes its suspicion, phi = -log10(P(a heartbeat
//! still to come after this long)), under an exponential model of the intervals (as
//! Cassandra): phi = elapsed / mean interval * log10(e). A peer is down once phi passes
//! `phi_threshold` (8 by default: a heartbeat 18 mean intervals late, about 4.6 s at the
//! default 250 ms), so one lost packet, or a few, does not mark a healthy peer down, and a
//! dead one is found within a bounded time: intervals longer than [`INTERVAL_CAP`] heartbeat
//! intervals (lost pings, pauses) are left out of the mean. A failed request does not mark
//! a peer down by itself, except a peer never heard from (nothing to accrue from yet).
//! A peer down is probed with exponential backoff (from `probe_interval_ms` up to
//! `probe_interval_max_ms`) until it answers.
//!
//! [`FailureDetectorStage`] hosts it: it sends the pings, hears the answers and the reports
//! of other stages and the transport ([`Signal::Report`], [`Signal::Unreachable`]), and
//! publishes the set of peers down whenever it changes, and every peer's phi for `status`.
//! Peers that leave the membership are forgotten, so the table is bounded by the membership.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Arc;

use crate::membership::MemberState;
use crate::ring::NodeId;
use crate::stage::{Dest, Effect, Ids, Input, Now, Signal, Stage, StageId};
use crate::wire::Message;

/// Heartbeat intervals remembered per peer.
const HISTORY_MAX: usize = 200;
/// Intervals longer than this many heartbeat intervals are not counted in the mean.
pub const INTERVAL_CAP: u64 = 4;
/// log10(e): phi of an exponential distribution per mean interval elapsed.
const LOG10_E: f64 = std::f64::consts::LOG10_E;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Down {
    since_ms: u64,
    next_probe_ms: u64,
    backoff_ms: u64,
}

/// One peer's heartbeat history and state.
#[derive(Clone, Debug, Default)]
struct Peer {
    last_ms: Option<u64>,
    intervals: VecDeque<u64>,
    sum_ms: u64,
    down: Option<Down>,
}

impl Peer {
    fn heartbeat(&mut self, now_ms: u64, cap_ms: u64) {
        if let Some(last) = self.last_ms {
            let interval = now_ms.saturating_sub(last);
            if interval > 0 && interval <= cap_ms {
                if self.intervals.len() == HISTORY_MAX {
                    let old = self.intervals.pop_front().unwrap_or(0);
                    self.sum_ms = self.sum_ms.saturating_sub(old);
                }
                self.intervals.push_back(interval);
                self.sum_ms = self.sum_ms.saturating_add(interval);
            }
        }
        self.last_ms = Some(now_ms.max(self.last_ms.unwrap_or(0)));
    }

    fn mean_ms(&self, default_ms: u64) -> f64 {
        if self.intervals.is_empty() {
            default_ms as f64
        } else {
            self.sum_ms as f64 / self.intervals.len() as f64
        }
    }
}

/// Settings of the detector.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct DetectorSettings {
    pub heartbeat_interval_ms: u64,
    pub phi_threshold: f64,
    pub probe_interval_ms: u64,
    pub probe_interval_max_ms: u64,
}

/// One node's view of its peers' liveness.
#[derive(Clone, Debug)]
pub struct FailureDetector {
    peers: BTreeMap<NodeId, Peer>,
    settings: DetectorSettings,
}

impl FailureDetector {
    pub fn new(settings: DetectorSettings) -> Self {
        let mut settings = settings;
        settings.heartbeat_interval_ms = settings.heartbeat_interval_ms.max(1);
        settings.probe_interval_ms = settings.probe_interval_ms.max(1);
        settings.probe_interval_max_ms = settings.probe_interval_max_ms.max(settings.probe_interval_ms);
        FailureDetector { peers: BTreeMap::new(), settings }
    }

    /// Peers never heard of count as reachable: the first request finds out.
    pub fn is_reachable(&self, peer: &str) -> bool {
        self.peers.get(peer).is_none_or(|p| p.down.is_none())
    }

    /// Since when a peer has been down, if it is.
    pub fn unreachable_since(&self, peer: &str) -> Option<u64> {
        self.peers.get(peer).and_then(|p| p.down.map(|d| d.since_ms))
    }

    /// The suspicion of `peer` at `now_ms` (0 for a peer never heard from).
    pub fn phi(&self, now_ms: u64, peer: &str) -> f64 {
        match self.peers.get(peer) {
            Some(p) => match p.last_ms {
                Some(last) => {
                    let elapsed = now_ms.saturating_sub(last) as f64;
                    elapsed / p.mean_ms(self.settings.heartbeat_interval_ms).max(1.0) * LOG10_E
                }
                None => 0.0,
            },
            None => 0.0,
        }
    }

    /// A heartbeat from `peer` (an answer, a ping, any success). True if it was down.
    pub fn handle_success(&mut self, now_ms: u64, peer: &str) -> bool {
        let cap = self.settings.heartbeat_interval_ms.saturating_mul(INTERVAL_CAP);
        let p = self.peers.entry(peer.to_string()).or_default();
        p.heartbeat(now_ms, cap);
        p.down.take().is_some()
    }

    /// A request to `peer` failed or timed out. Only a peer never heard from is marked down
    /// by it (true if so); for the others phi decides.
    pub fn handle_failure(&mut self, now_ms: u64, peer: &str) -> bool {
        let p = self.peers.entry(peer.to_string()).or_default();
        if p.last_ms.is_some() || p.down.is_some() {
            return false;
        }
        let probe = self.settings.probe_interval_ms;
        p.down = Some(Down { since_ms: now_ms, next_probe_ms: now_ms.saturating_add(probe), backoff_ms: probe });
        true
    }

    /// Mark down every peer whose phi passed the threshold; the peers newly down.
    pub fn convict(&mut self, now_ms: u64) -> Vec<NodeId> {
        let suspects: Vec<NodeId> = self
            .peers
            .iter()
            .filter(|(id, p)| {
                p.down.is_none() && p.last_ms.is_some() && self.phi(now_ms, id) > self.settings.phi_threshold
            })
            .map(|(id, _)| id.clone())
            .collect();
        let probe = self.settings.probe_interval_ms;
        for id in &suspects {
            if let Some(p) = self.peers.get_mut(id) {
                p.down =
                    Some(Down { since_ms: now_ms, next_probe_ms: now_ms.saturating_add(probe), backoff_ms: probe });
            }
        }
        suspects
    }

    /// Start watching `peer` (a member): as if heard from now, so a member that never
    /// answers is convicted in bounded time.
    pub fn watch(&mut self, now_ms: u64, peer: &str) {
        self.peers.entry(peer.to_string()).or_default().last_ms.get_or_insert(now_ms);
    }

    /// Forget a peer (it left the cluster).
    pub fn remove(&mut self, peer: &str) {
        self.peers.remove(peer);
    }

    /// Peers down and due for a probe now; each one's next probe is pushed back (doubling).
    pub fn poll_probes(&mut self, now_ms: u64) -> Vec<NodeId> {
        let max = self.settings.probe_interval_max_ms;
        let mut due = Vec::new();
        for (id, p) in self.peers.iter_mut() {
            if let Some(d) = p.down {
                if now_ms >= d.next_probe_ms {
                    let backoff = d.backoff_ms.saturating_mul(2).min(max);
                    p.down = Some(Down { next_probe_ms: now_ms.saturating_add(backoff), backoff_ms: backoff, ..d });
                    due.push(id.clone());
                }
            }
        }
        due
    }

    /// When the next probe of a peer down is due.
    pub fn poll_timeout(&self) -> Option<u64> {
        self.peers.values().filter_map(|p| p.down.map(|d| d.next_probe_ms)).min()
    }

    /// Every peer with an entry.
    pub fn peers(&self) -> impl Iterator<Item = &NodeId> {
        self.peers.keys()
    }

    pub fn unreachable(&self) -> Vec<NodeId> {
        self.peers.iter().filter(|(_, p)| p.down.is_some()).map(|(k, _)| k.clone()).collect()
    }

    pub fn settings(&self) -> DetectorSettings {
        self.settings
    }
}

/// The failure detector stage.
pub struct FailureDetectorStage {
    fd: FailureDetector,
    me: NodeId,
    /// The members to send heartbeats to (all but this node and those that left).
    members: BTreeSet<NodeId>,
    next_heartbeat_ms: u64,
    published: Arc<BTreeSet<NodeId>>,
    ids: Ids,
    effects: VecDeque<Effect>,
}

impl FailureDetectorStage {
    pub fn new(fd: FailureDetector, me: NodeId) -> Self {
        FailureDetectorStage {
            fd,
            me,
            members: BTreeSet::new(),
            next_heartbeat_ms: 0,
            published: Arc::default(),
            ids: Ids::default(),
            effects: VecDeque::new(),
        }
    }

    pub fn detector(&self) -> &FailureDetector {
        &self.fd
    }

    fn publish_if_changed(&mut self) {
        let now: BTreeSet<NodeId> = self.fd.unreachable().into_iter().collect();
        if now != *self.published {
            self.published = Arc::new(now);
            self.effects.push_back(Effect::Signal(Signal::Down(self.published.clone())));
        }
    }

    fn report(&mut self, now_ms: u64, node: &str, ok: bool) {
        if node == self.me {
            return;
        }
        let changed = if ok { self.fd.handle_success(now_ms, node) } else { self.fd.handle_failure(now_ms, node) };
        if changed {
            if ok {
                tracing::info!(peer = %node, "peer reachable again");
            } else {
                tracing::warn!(peer = %node, "peer unreachable (never heard from)");
            }
        }
    }

    /// Heartbeats to every member up, then convictions, probes of those down, and every
    /// member's phi for `status`.
    fn tick(&mut self, now_ms: u64) {
        if now_ms >= self.next_heartbeat_ms {
            self.next_heartbeat_ms = now_ms.saturating_add(self.fd.settings().heartbeat_interval_ms);
            let up: Vec<NodeId> = self.members.iter().filter(|m| self.fd.is_reachable(m)).cloned().collect();
            for peer in up {
                let id = self.ids.issue();
                self.effects.push_back(Effect::Send { to: Dest::Node(peer), msg: Message::Ping { id } });
            }
            for peer in self.fd.convict(now_ms) {
                tracing::warn!(peer = %peer, phi_threshold = self.fd.settings().phi_threshold, "peer down: phi passed the threshold");
            }
            let phis: Vec<(NodeId, u64)> =
                self.members.iter().map(|m| (m.clone(), (self.fd.phi(now_ms, m) * 100.0).round() as u64)).collect();
            self.effects.push_back(Effect::Signal(Signal::Suspicion(Arc::new(phis))));
        }
        for peer in self.fd.poll_probes(now_ms) {
            let id = self.ids.issue();
            self.effects.push_back(Effect::Send { to: Dest::Node(peer), msg: Message::Ping { id } });
        }
    }
}

impl Stage for FailureDetectorStage {
    fn id(&self) -> StageId {
        StageId::FailureDetector
    }

    fn handle(&mut self, now: Now, input: Input) {
        match input {
            // Only a coordinator replicates ahead of a commit.
            Input::Ahead { .. } => {}
            Input::Message { from, msg: Message::Ping { id } } => {
                self.effects.push_back(Effect::Send { to: Dest::Conn(from.conn), msg: Message::Pong { id } });
                if let Some(n) = from.node {
                    self.report(now.mono_ms, &n, true);
                }
            }
            Input::Message { from, msg: Message::Pong { .. } } => {
                if let Some(n) = from.node {
                    self.report(now.mono_ms, &n, true);
                }
            }
            Input::Message { .. } | Input::Stored { .. } => {}
            Input::Tick { .. } => self.tick(now.mono_ms),
            Input::Signal(Signal::Report { node, ok }) => self.report(now.mono_ms, &node, ok),
            Input::Signal(Signal::Unreachable { node }) => self.report(now.mono_ms, &node, false),
            Input::Signal(Signal::View(v)) => {
                let members: BTreeSet<NodeId> = v
                    .members
                    .iter()
                    .filter(|m| m.state != MemberState::Left && m.id != self.me)
                    .map(|m| m.id.clone())
                    .collect();
                let gone: Vec<NodeId> = self.fd.peers().filter(|p| !members.contains(*p)).cloned().collect();
                for p in gone {
                    self.fd.remove(&p);
                }
                for m in &members {
                    self.fd.watch(now.mono_ms, m);
                }
                self.members = members;
            }
            Input::Signal(_) => {}
        }
        self.publish_if_changed();
    }

    fn poll_effect(&mut self) -> Option<Effect> {
        self.effects.pop_front()
    }

    fn poll_timeout(&self) -> Option<u64> {
        let heartbeat = (!self.members.is_empty()).then_some(self.next_heartbeat_ms);
        match (heartbeat, self.fd.poll_timeout()) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> DetectorSettings {
        DetectorSettings {
            heartbeat_interval_ms: 100,
            phi_threshold: 8.0,
            probe_interval_ms: 100,
            probe_interval_max_ms: 800,
        }
    }

    /// A tiny deterministic generator for jitter and loss.
    struct Lcg(u64);
    impl Lcg {
        fn next(&mut self) -> u64 {
            self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            self.0 >> 33
        }
        fn chance(&mut self, p: f64) -> bool {
            (self.next() % 1_000_000) as f64 / 1_000_000.0 < p
        }
    }

    #[test]
    fn phi_grows_with_silence_and_a_dead_peer_is_convicted_in_bounded_time() {
        let mut fd = FailureDetector::new(settings());
        for t in 0..50u64 {
            fd.handle_success(t * 100, "b");
        }
        let last = 4900;
        assert!(fd.phi(last, "b") < 0.01);
        assert!(fd.phi(last + 100, "b") < 0.5, "one interval late is hardly suspicious");
        assert!(fd.phi(last + 1000, "b") > fd.phi(last + 500, "b"), "suspicion grows with silence");
        let mut t = last;
        while fd.convict(t).is_empty() {
            t += 10;
            assert!(t < last + 10_000, "never convicted");
        }
        // phi 8 under an exponential model: 8 / log10(e) = 18.4 mean intervals.
        assert!((1800..=1900).contains(&(t - last)), "convicted {} ms after the last heartbeat", t - last);
        assert!(!fd.is_reachable("b"));
        assert_eq!(fd.unreachable_since("b"), Some(t));
        assert!(fd.handle_success(t + 5, "b"), "a heartbeat brings it back");
        assert!(fd.is_reachable("b"));
    }

    #[test]
    fn a_failed_request_alone_does_not_mark_a_peer_heard_from_down() {
        let mut fd = FailureDetector::new(settings());
        fd.handle_success(0, "b");
        fd.handle_success(100, "b");
        assert!(!fd.handle_failure(150, "b"));
        assert!(fd.is_reachable("b"));
        assert!(fd.handle_failure(150, "never-heard"), "nothing to accrue from: down at once");
        assert!(!fd.is_reachable("never-heard"));
    }

    #[test]
    fn down_peers_are_probed_with_backoff() {
        let mut fd = FailureDetector::new(settings());
        assert!(fd.handle_failure(10, "b"));
        assert_eq!(fd.poll_timeout(), Some(110));
        let mut probes = Vec::new();
        let mut t = 110;
        while t < 5000 {
            if !fd.poll_probes(t).is_empty() {
                probes.push(t);
            }
            t += 10;
        }
        let gaps: Vec<u64> = probes.windows(2).map(|w| w[1] - w[0]).collect();
        assert_eq!(&gaps[..3], &[200, 400, 800]);
        assert!(gaps[3..].iter().all(|&g| g == 800), "capped at the max: {gaps:?}");
        assert!(fd.handle_success(5000, "b"));
        assert_eq!(fd.poll_timeout(), None);
    }

    /// The figures of record: heartbeats every 250 ms with up to 30 ms of jitter and the
    /// simulation's worst message loss (4%, each of ping and pong), over ten virtual hours:
    /// no false conviction; a peer that dies is convicted within a bounded time.
    #[test]
    fn false_positives_under_loss_and_detection_time() {
        let s = DetectorSettings { heartbeat_interval_ms: 250, ..settings() };
        let mut rng = Lcg(7);
        let mut false_positives = 0;
        let mut detections = Vec::new();
        for run in 0..10u64 {
            let mut fd = FailureDetector::new(s);
            let hour_ms = 3_600_000;
            let dies_at = if run % 2 == 0 { Some(hour_ms / 2 + run * 7919) } else { None };
            let mut t = 0;
            let mut convicted_at = None;
            while t < hour_ms {
                let alive = dies_at.is_none_or(|d| t < d);
                let lost = rng.chance(0.04) || rng.chance(0.04);
                if alive && !lost {
                    fd.handle_success(t + rng.next() % 30, "b");
                }
                t += 250;
                if !fd.convict(t).is_empty() {
                    match dies_at {
                        Some(d) if t >= d => {
                            convicted_at.get_or_insert(t);
                        }
                        _ => false_positives += 1,
                    }
                }
                if alive && !fd.is_reachable("b") && dies_at.is_none_or(|d| t < d) {
                    fd.handle_success(t, "b");
                }
            }
            if let (Some(d), Some(c)) = (dies_at, convicted_at) {
                detections.push(c - d);
            }
        }
        println!(
            "phi-accrual, 250 ms heartbeats, 4% loss each way, 10 h: {false_positives} false convictions; \
                  dead peer convicted after {detections:?} ms"
        );
        assert_eq!(false_positives, 0);
        assert_eq!(detections.len(), 5);
        assert!(detections.iter().all(|&d| d <= 6_000), "{detections:?}");
    }
}
