//! Failure detection (Dynamo §4.8.3): a purely local view of which peers answer.
//!
//! A peer whose request times out or whose connection fails is marked unreachable at once,
//! so coordinators skip it instead of waiting on every request. It is then probed with
//! exponential backoff (from `probe_interval_ms` up to `probe_interval_max_ms`) until a
//! probe or any other message from it succeeds, which marks it reachable again.

use std::collections::BTreeMap;

use crate::ring::NodeId;

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
                    next_probe_ms: now_ms + self.probe_min_ms,
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
                    let backoff = (backoff_ms * 2).min(self.probe_max_ms);
                    *h = Health::Unreachable { since_ms, next_probe_ms: now_ms + backoff, backoff_ms: backoff };
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

    pub fn unreachable(&self) -> Vec<NodeId> {
        self.peers.iter().filter(|(_, h)| matches!(h, Health::Unreachable { .. })).map(|(k, _)| k.clone()).collect()
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
