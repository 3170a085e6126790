//! Hinted handoff and partition transfer (Dynamo §4.6, §4.9): moving data to the node that
//! should hold it.
//!
//! Hints: a fallback that took a write for an unreachable node keeps it in its hints table;
//! when that node is reachable again, the hint is delivered in a batch and deleted only after
//! the target acknowledged a durable merge, and only if the hint did not change meanwhile.
//! Transfers: after a ring change, a node holding keys of a partition it no longer
//! replicates pushes them in batches to every current replica, and drops each key (again,
//! only if unchanged) once all of them acknowledged.
//!
//! [`Handoff`] schedules both, one batch per admitted unit of work, every `interval_ms`.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use crate::ring::NodeId;
use crate::version::Object;

/// What a batch delivers, and what to drop once it is acknowledged.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BatchKind {
    Hints { intended: NodeId },
    Transfer { partition: u32 },
}

/// What the scheduler wants done.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HandoffAction {
    /// Read up to `limit` hints, skipping those for the `exclude`d (unreachable) nodes so
    /// that many hints for one node that is down cannot starve the others; answer with
    /// `handle_hints`.
    ScanHints {
        limit: usize,
        exclude: Vec<NodeId>,
    },
    /// Read up to `limit` objects of a partition we no longer replicate; answer with
    /// `handle_foreign`.
    ScanPartition {
        partition: u32,
        limit: usize,
    },
    /// Send a batch to each of `to`; every answer comes back through `handle_ack`.
    Send {
        id: u64,
        to: Vec<NodeId>,
        objects: Vec<(Vec<u8>, Object)>,
    },
    /// Every target acknowledged: drop what was delivered, if unchanged.
    RemoveHints {
        intended: NodeId,
        keys: Vec<(Vec<u8>, [u8; 16])>,
    },
    RemoveObjects {
        keys: Vec<(Vec<u8>, [u8; 16])>,
    },
    /// A batch ended (delivered or not): release its admission.
    Finished {
        id: u64,
        delivered: bool,
    },
}

#[derive(Debug)]
struct Batch {
    kind: BatchKind,
    waiting: BTreeSet<NodeId>,
    keys: Vec<(Vec<u8>, [u8; 16])>,
    started_ms: u64,
}

/// One node's handoff scheduler.
#[derive(Debug)]
pub struct Handoff {
    interval_ms: u64,
    timeout_ms: u64,
    batch_keys: usize,
    next_round_ms: u64,
    next_id: u64,
    batches: BTreeMap<u64, Batch>,
    scanning_hints: bool,
    scanning: BTreeSet<u32>,
    outbox: VecDeque<HandoffAction>,
    /// Keys delivered and acknowledged so far.
    pub moved_keys: u64,
}

impl Handoff {
    pub fn new(interval_ms: u64, timeout_ms: u64, batch_keys: usize, now_ms: u64) -> Self {
        Handoff {
            interval_ms: interval_ms.max(1),
            timeout_ms: timeout_ms.max(1),
            batch_keys: batch_keys.max(1),
            next_round_ms: now_ms + interval_ms,
            next_id: 1,
            batches: BTreeMap::new(),
            scanning_hints: false,
            scanning: BTreeSet::new(),
            outbox: VecDeque::new(),
            moved_keys: 0,
        }
    }

    pub fn inflight(&self) -> usize {
        self.batches.len() + self.scanning.len() + self.scanning_hints as usize
    }

    /// Time passed. `foreign` lists partitions this node holds keys of but no longer
    /// replicates; `allowed` is the admission budget (0 pauses); `unreachable` are the
    /// peers the failure detector considers down.
    pub fn handle_tick(&mut self, now_ms: u64, foreign: &[u32], allowed: usize, unreachable: &[NodeId]) {
        let expired: Vec<u64> =
            self.batches.iter().filter(|(_, b)| now_ms >= b.started_ms + self.timeout_ms).map(|(id, _)| *id).collect();
        for id in expired {
            self.batches.remove(&id);
            self.outbox.push_back(HandoffAction::Finished { id, delivered: false });
        }
        if now_ms < self.next_round_ms {
            return;
        }
        self.next_round_ms = now_ms + self.interval_ms;
        if self.inflight() < allowed
            && !self.scanning_hints
            && !self.batches.values().any(|b| matches!(b.kind, BatchKind::Hints { .. }))
        {
            self.scanning_hints = true;
            self.outbox
                .push_back(HandoffAction::ScanHints { limit: self.batch_keys * 4, exclude: unreachable.to_vec() });
        }
        for &p in foreign {
            if self.inflight() >= allowed {
                break;
            }
            let busy = self.scanning.contains(&p)
                || self.batches.values().any(|b| b.kind == BatchKind::Transfer { partition: p });
            if !busy {
                self.scanning.insert(p);
                self.outbox.push_back(HandoffAction::ScanPartition { partition: p, limit: self.batch_keys });
            }
        }
    }

    fn start(&mut self, now_ms: u64, kind: BatchKind, to: Vec<NodeId>, objects: Vec<(Vec<u8>, Object)>) {
        if objects.is_empty() || to.is_empty() {
            return;
        }
        let id = self.next_id;
        self.next_id += 1;
        let keys = objects.iter().map(|(k, o)| (k.clone(), o.digest())).collect();
        self.batches.insert(id, Batch { kind, waiting: to.iter().cloned().collect(), keys, started_ms: now_ms });
        self.outbox.push_back(HandoffAction::Send { id, to, objects });
    }

    /// Hints read from storage: one batch for the first intended node that is reachable.
    pub fn handle_hints(
        &mut self,
        now_ms: u64,
        hints: Vec<(NodeId, Vec<u8>, Object)>,
        reachable: impl Fn(&str) -> bool,
    ) {
        self.scanning_hints = false;
        let mut by_node: BTreeMap<NodeId, Vec<(Vec<u8>, Object)>> = BTreeMap::new();
        for (n, k, o) in hints {
            if reachable(&n) {
                by_node.entry(n).or_default().push((k, o));
            }
        }
        if let Some((intended, mut objects)) = by_node.into_iter().next() {
            objects.truncate(self.batch_keys);
            self.start(now_ms, BatchKind::Hints { intended: intended.clone() }, vec![intended], objects);
        }
    }

    /// Objects of a partition we no longer replicate, and its current replicas (all must be
    /// reachable, else the batch waits for a later round).
    pub fn handle_foreign(
        &mut self,
        now_ms: u64,
        partition: u32,
        objects: Vec<(Vec<u8>, Object)>,
        owners: Vec<NodeId>,
        reachable: impl Fn(&str) -> bool,
    ) {
        self.scanning.remove(&partition);
        if owners.iter().all(|o| reachable(o)) {
            self.start(now_ms, BatchKind::Transfer { partition }, owners, objects);
        }
    }

    /// `from` acknowledged (`ok`) or refused batch `id`.
    pub fn handle_ack(&mut self, id: u64, from: &str, ok: bool) {
        let Some(b) = self.batches.get_mut(&id) else { return };
        if !ok {
            self.batches.remove(&id);
            self.outbox.push_back(HandoffAction::Finished { id, delivered: false });
            return;
        }
        b.waiting.remove(from);
        if b.waiting.is_empty() {
            let b = self.batches.remove(&id).expect("present");
            self.moved_keys += b.keys.len() as u64;
            self.outbox.push_back(match b.kind {
                BatchKind::Hints { intended } => HandoffAction::RemoveHints { intended, keys: b.keys },
                BatchKind::Transfer { .. } => HandoffAction::RemoveObjects { keys: b.keys },
            });
            self.outbox.push_back(HandoffAction::Finished { id, delivered: true });
        }
    }

    pub fn poll_action(&mut self) -> Option<HandoffAction> {
        self.outbox.pop_front()
    }

    pub fn poll_timeout(&self) -> u64 {
        let expiry = self.batches.values().map(|b| b.started_ms + self.timeout_ms).min();
        expiry.map_or(self.next_round_ms, |x| x.min(self.next_round_ms))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::version::{Actor, VersionVector};

    fn obj(v: u8) -> Object {
        let mut o = Object::new();
        o.update(&VersionVector::new(), Actor(1), Some(vec![v]), 1, 10);
        o
    }

    fn drain(h: &mut Handoff) -> Vec<HandoffAction> {
        std::iter::from_fn(|| h.poll_action()).collect()
    }

    #[test]
    fn hints_go_to_reachable_nodes_and_are_dropped_after_ack() {
        let mut h = Handoff::new(100, 1000, 10, 0);
        h.handle_tick(100, &[], 1, &["n9".to_string()]);
        assert_eq!(drain(&mut h), vec![HandoffAction::ScanHints { limit: 40, exclude: vec!["n9".to_string()] }]);
        let hints = vec![("n2".into(), b"a".to_vec(), obj(1)), ("n3".into(), b"b".to_vec(), obj(2))];
        h.handle_hints(100, hints, |n| n == "n3");
        let a = drain(&mut h);
        assert!(
            matches!(&a[..], [HandoffAction::Send { id: 1, to, objects }] if to == &vec!["n3".to_string()] && objects.len() == 1)
        );
        h.handle_ack(1, "n3", true);
        let a = drain(&mut h);
        assert_eq!(
            a,
            vec![
                HandoffAction::RemoveHints { intended: "n3".into(), keys: vec![(b"b".to_vec(), obj(2).digest())] },
                HandoffAction::Finished { id: 1, delivered: true }
            ]
        );
        assert_eq!(h.moved_keys, 1);
    }

    #[test]
    fn transfers_need_every_owner_and_unacked_batches_expire() {
        let mut h = Handoff::new(100, 1000, 10, 0);
        h.handle_tick(100, &[5], 2, &[]);
        let a = drain(&mut h);
        assert!(a.contains(&HandoffAction::ScanPartition { partition: 5, limit: 10 }));
        h.handle_foreign(100, 5, vec![(b"k".to_vec(), obj(1))], vec!["n1".into(), "n2".into()], |_| true);
        drain(&mut h);
        h.handle_ack(1, "n1", true);
        assert!(drain(&mut h).is_empty(), "n2 has not acknowledged");
        h.handle_tick(1200, &[], 0, &[]);
        assert_eq!(drain(&mut h), vec![HandoffAction::Finished { id: 1, delivered: false }]);
        assert_eq!(h.moved_keys, 0);
    }

    #[test]
    fn zero_budget_pauses() {
        let mut h = Handoff::new(100, 1000, 10, 0);
        h.handle_tick(100, &[1, 2], 0, &[]);
        assert!(drain(&mut h).is_empty());
    }
}
