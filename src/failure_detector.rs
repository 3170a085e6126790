//! Failure detection (Dynamo §4.8.3): a purely local view of which peers answer.
//!
//! A peer whose request times out or whose connection fails is marked unreachable at once,
//! so coordinators skip it instead of waiting on every request. It is then probed with
//! exponential backoff (from `probe_interval_ms` up to `probe_interval_max_ms`) until a
//! probe or any other message from it succeeds, which marks it reachable again.
//!
//! [`FailureDetectorStage`] hosts it: other stages report timeouts and the transport
//! reports peers it cannot reach ([`Signal::Unreachable`]); any message from a peer
//! believed down clears it; probes are pings. Whenever the set of peers believed down
//! changes it is published to the stages that route around them. Peers that leave the
//! membership are forgotten, so the table is bounded by the membership.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Arc;

use crate::membership::MemberState;
use crate::ring::NodeId;
use crate::stage::{Dest, Effect, Ids, Input, Now, Signal, Stage, StageId};
use crate::wire::Message;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Health {
    Reachable,
    Unreachable { since_ms: u64, next_probe_ms: u64, backoff_ms: u64 },
}

/// One node's view of its peers' reachability.
#[derive(Clone, Debug)]
pub struct FailureDetector {
    peers: BTreeMap<NodeId, Health>,
    probe_min_ms: u64,
    probe_max_ms: u64,
}

impl FailureDetector {
    pub fn new(probe_min_ms: u64, probe_max_ms: u64) -> Self {
        FailureDetector {
            peers: BTreeMap::new(),
            probe_min_ms: probe_min_ms.max(1),
            probe_max_ms: probe_max_ms.max(probe_min_ms),
        }
    }

    /// Peers never heard of count as reachable: the first request finds out.
    pub fn is_reachable(&self, peer: &str) -> bool {
        !matches!(self.peers.get(peer), Some(Health::Unreachable { .. }))
    }

    /// Since when a peer has been unreachable, if it is.
    pub fn unreachable_since(&self, peer: &str) -> Option<u64> {
        match self.peers.get(peer) {
            Some(Health::Unreachable { since_ms, .. }) => Some(*since_ms),
            _ => None,
        }
    }

    /// A request to `peer` succeeded, or a message came from it. True if it was unreachable.
    pub fn handle_success(&mut self, _now_ms: u64, peer: &str) -> bool {
        let was = !self.is_reachable(peer);
        self.peers.insert(peer.to_string(), Health::Reachable);
        was
    }

    /// A request to `peer` failed or timed out. True if it was reachable until now.
    pub fn handle_failure(&mut self, now_ms: u64, peer: &str) -> bool {
        match self.peers.get(peer) {
            Some(Health::Unreachable { .. }) => false,
            _ => {
                let h = Health::Unreachable {
                    since_ms: now_ms,
                    next_probe_ms: now_ms.saturating_add(self.probe_min_ms),
                    backoff_ms: self.probe_min_ms,
                };
                self.peers.insert(peer.to_string(), h);
                true
            }
        }
    }

    /// Forget a peer (it left the cluster).
    pub fn remove(&mut self, peer: &str) {
        self.peers.remove(peer);
    }

    /// Peers due for a probe now; each one's next probe is pushed back (doubling).
    pub fn poll_probes(&mut self, now_ms: u64) -> Vec<NodeId> {
        let mut due = Vec::new();
        for (id, h) in self.peers.iter_mut() {
            if let Health::Unreachable { since_ms, next_probe_ms, backoff_ms } = *h {
                if now_ms >= next_probe_ms {
                    let backoff = backoff_ms.saturating_mul(2).min(self.probe_max_ms);
                    *h = Health::Unreachable {
                        since_ms,
                        next_probe_ms: now_ms.saturating_add(backoff),
                        backoff_ms: backoff,
                    };
                    due.push(id.clone());
                }
            }
        }
        due
    }

    /// When the next probe is due.
    pub fn poll_timeout(&self) -> Option<u64> {
        self.peers
            .values()
            .filter_map(|h| match h {
                Health::Unreachable { next_probe_ms, .. } => Some(*next_probe_ms),
                Health::Reachable => None,
            })
            .min()
    }

    /// Every peer with an entry.
    pub fn peers(&self) -> impl Iterator<Item = &NodeId> {
        self.peers.keys()
    }

    pub fn unreachable(&self) -> Vec<NodeId> {
        self.peers.iter().filter(|(_, h)| matches!(h, Health::Unreachable { .. })).map(|(k, _)| k.clone()).collect()
    }
}

/// The failure detector stage.
pub struct FailureDetectorStage {
    fd: FailureDetector,
    me: NodeId,
    published: Arc<BTreeSet<NodeId>>,
    ids: Ids,
    effects: VecDeque<Effect>,
}

impl FailureDetectorStage {
    pub fn new(fd: FailureDetector, me: NodeId) -> Self {
        FailureDetectorStage { fd, me, published: Arc::default(), ids: Ids::default(), effects: VecDeque::new() }
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
                tracing::warn!(peer = %node, "peer unreachable");
            }
        }
    }
}

impl Stage for FailureDetectorStage {
    fn id(&self) -> StageId {
        StageId::FailureDetector
    }

    fn handle(&mut self, now: Now, input: Input) {
        match input {
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
            Input::Tick { .. } => {
                for peer in self.fd.poll_probes(now.mono_ms) {
                    let id = self.ids.issue();
                    self.effects.push_back(Effect::Send { to: Dest::Node(peer), msg: Message::Ping { id } });
                }
            }
            Input::Signal(Signal::Report { node, ok }) => self.report(now.mono_ms, &node, ok),
            Input::Signal(Signal::Unreachable { node }) => self.report(now.mono_ms, &node, false),
            Input::Signal(Signal::View(v)) => {
                let members: BTreeSet<&str> =
                    v.members.iter().filter(|m| m.state != MemberState::Left).map(|m| m.id.as_str()).collect();
                let gone: Vec<NodeId> = self.fd.peers().filter(|p| !members.contains(p.as_str())).cloned().collect();
                for p in gone {
                    self.fd.remove(&p);
                }
            }
            Input::Signal(_) => {}
        }
        self.publish_if_changed();
    }

    fn poll_effect(&mut self) -> Option<Effect> {
        self.effects.pop_front()
    }

    fn poll_timeout(&self) -> Option<u64> {
        self.fd.poll_timeout()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failure_marks_unreachable_and_probes_back_off() {
        let mut fd = FailureDetector::new(100, 800);
        assert!(fd.is_reachable("b"));
        assert!(fd.handle_failure(10, "b"));
        assert!(!fd.handle_failure(20, "b"), "already unreachable");
        assert!(!fd.is_reachable("b"));
        assert_eq!(fd.poll_timeout(), Some(110));
        assert!(fd.poll_probes(109).is_empty());
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
        assert_eq!(fd.unreachable_since("b"), Some(10));
        assert!(fd.handle_success(5000, "b"));
        assert!(fd.is_reachable("b"));
        assert_eq!(fd.poll_timeout(), None);
    }
}
