//! Tombstone reaping. A delete writes a tombstone (a sibling without a value) so that a
//! replica that missed the delete cannot bring the value back when replicas merge. A
//! tombstone can go once every replica of its key holds exactly the same tombstone-only state
//! and a grace period has passed (within it, a replica that was away can still learn of the
//! delete by read repair, hinted handoff or anti-entropy, and nothing is resurrected).
//!
//! [`Reaper`] is one node's scheduler: each round it scans one partition it replicates for
//! tombstones older than the grace period, asks every replica whether it holds the same state
//! (by digest), and only if all say yes asks each to remove the key if still unchanged.
//! Each replica that removes the key keeps a small reaped record of the tombstone's clock
//! (see [`crate::store`]), so a stale copy that arrives later cannot bring the value back.
//! The handoff stage hosts the reaper and runs it only while background work is allowed.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use crate::ring::NodeId;
use crate::store::TreeId;
use crate::wire::ReapStep;

/// What the reaper wants done.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ReapAction {
    /// List this node's tombstone-only keys of `tree` last written before
    /// `before_wall_ms`; answer with `handle_tombstones`.
    Scan { tree: TreeId, before_wall_ms: u64, limit: usize },
    /// Send a step to a replica (possibly this node); answer with `handle_answer`.
    Send { id: u64, to: NodeId, step: ReapStep },
}

#[derive(Debug)]
struct Candidate {
    key: Vec<u8>,
    digest: [u8; 16],
    replicas: Vec<NodeId>,
    waiting: BTreeSet<NodeId>,
    removing: bool,
    started_ms: u64,
}

/// One node's tombstone reaper.
#[derive(Debug)]
pub struct Reaper {
    interval_ms: u64,
    grace_ms: u64,
    timeout_ms: u64,
    batch: usize,
    next_round_ms: u64,
    cursor: usize,
    next_id: u64,
    scanning: Option<(TreeId, Vec<NodeId>)>,
    candidates: BTreeMap<u64, Candidate>,
    outbox: VecDeque<ReapAction>,
    /// Keys every replica removed.
    pub reaped: u64,
}

impl Reaper {
    pub fn new(interval_ms: u64, grace_ms: u64, batch: usize, now_ms: u64) -> Self {
        Reaper {
            interval_ms: interval_ms.max(1),
            grace_ms,
            timeout_ms: 10_000,
            batch: batch.max(1),
            next_round_ms: now_ms.saturating_add(interval_ms),
            cursor: 0,
            next_id: 1,
            scanning: None,
            candidates: BTreeMap::new(),
            outbox: VecDeque::new(),
            reaped: 0,
        }
    }

    /// Time passed. `partitions` are the trees (a partition's keys of one namespace) this
    /// node replicates with their N replicas, and only those whose replicas are all
    /// reachable (a replica that is away could not confirm).
    pub fn handle_tick(&mut self, now_ms: u64, wall_ms: u64, partitions: &[(TreeId, Vec<NodeId>)]) {
        self.candidates.retain(|_, c| now_ms < c.started_ms.saturating_add(self.timeout_ms));
        if now_ms < self.next_round_ms
            || partitions.is_empty()
            || self.scanning.is_some()
            || !self.candidates.is_empty()
        {
            return;
        }
        self.next_round_ms = now_ms.saturating_add(self.interval_ms);
        let (tree, replicas) = partitions[self.cursor % partitions.len()].clone();
        self.cursor = self.cursor.wrapping_add(1);
        self.scanning = Some((tree.clone(), replicas));
        let before_wall_ms = wall_ms.saturating_sub(self.grace_ms);
        self.outbox.push_back(ReapAction::Scan { tree, before_wall_ms, limit: self.batch });
    }

    /// Tombstones found by a scan: (key, digest of its state).
    pub fn handle_tombstones(&mut self, now_ms: u64, found: Vec<([u8; 16], Vec<u8>)>) {
        let Some((_, replicas)) = self.scanning.take() else { return };
        for (digest, key) in found.into_iter().take(self.batch) {
            let id = self.next_id;
            self.next_id = self.next_id.wrapping_add(1);
            for to in &replicas {
                let step = ReapStep::Check { key: key.clone(), digest };
                self.outbox.push_back(ReapAction::Send { id, to: to.clone(), step });
            }
            let waiting = replicas.iter().cloned().collect();
            self.candidates.insert(
                id,
                Candidate { key, digest, replicas: replicas.clone(), waiting, removing: false, started_ms: now_ms },
            );
        }
    }

    /// A replica answered a step: `yes` means it holds that state (Check) or removed it or
    /// no longer has the key (Remove).
    pub fn handle_answer(&mut self, id: u64, from: &str, yes: bool) {
        let Some(c) = self.candidates.get_mut(&id) else { return };
        if !yes {
            // Someone differs (or could not answer): keep the tombstone for now.
            self.candidates.remove(&id);
            return;
        }
        c.waiting.remove(from);
        if !c.waiting.is_empty() {
            return;
        }
        if c.removing {
            self.reaped = self.reaped.saturating_add(1);
            self.candidates.remove(&id);
            return;
        }
        c.removing = true;
        c.waiting = c.replicas.iter().cloned().collect();
        for to in c.replicas.clone() {
            let step = ReapStep::Remove { key: c.key.clone(), digest: c.digest };
            self.outbox.push_back(ReapAction::Send { id, to, step });
        }
    }

    pub fn poll_action(&mut self) -> Option<ReapAction> {
        self.outbox.pop_front()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn drain(r: &mut Reaper) -> Vec<ReapAction> {
        std::iter::from_fn(|| r.poll_action()).collect()
    }

    fn replicas() -> Vec<(TreeId, Vec<NodeId>)> {
        vec![(TreeId::default_of(3), vec!["a".into(), "b".into(), "c".into()])]
    }

    #[test]
    fn reaps_only_when_every_replica_agrees() {
        let mut r = Reaper::new(100, 1000, 10, 0);
        r.handle_tick(100, 50_000, &replicas());
        assert_eq!(
            drain(&mut r),
            vec![ReapAction::Scan { tree: TreeId::default_of(3), before_wall_ms: 49_000, limit: 10 }]
        );
        r.handle_tombstones(100, vec![([7; 16], b"k".to_vec())]);
        assert_eq!(drain(&mut r).len(), 3, "a check to each replica");
        r.handle_answer(1, "a", true);
        r.handle_answer(1, "b", true);
        assert!(drain(&mut r).is_empty());
        r.handle_answer(1, "c", true);
        let removes = drain(&mut r);
        assert_eq!(removes.len(), 3);
        assert!(removes.iter().all(|a| matches!(a, ReapAction::Send { step: ReapStep::Remove { .. }, .. })));
        for n in ["a", "b", "c"] {
            r.handle_answer(1, n, true);
        }
        assert_eq!(r.reaped, 1);
    }

    #[test]
    fn one_dissenting_replica_keeps_the_tombstone() {
        let mut r = Reaper::new(100, 1000, 10, 0);
        r.handle_tick(100, 50_000, &replicas());
        drain(&mut r);
        r.handle_tombstones(100, vec![([7; 16], b"k".to_vec())]);
        drain(&mut r);
        r.handle_answer(1, "a", true);
        r.handle_answer(1, "b", false);
        r.handle_answer(1, "c", true);
        assert!(drain(&mut r).is_empty(), "no removal is sent");
        assert_eq!(r.reaped, 0);
    }
}
