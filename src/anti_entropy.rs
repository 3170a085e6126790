//! Anti-entropy (Dynamo §4.7): replicas of a partition compare Merkle trees and repair the
//! keys on which they differ, in both directions, so a replica that missed writes (or lost
//! its disk) converges without any client reading its keys.
//!
//! [`AntiEntropy`] is one node's scheduler and initiator. Each round it walks the
//! (partition, peer replica) pairs it is given in turn and starts exchanges while the
//! admission controller's budget allows. An exchange: read our tree; walk the peer's tree
//! level by level ([`crate::merkle::DiffInitiator`]) to the differing leaves; send our
//! objects in those leaves; the peer merges them and answers with its (merged) objects in
//! the same leaves; we merge those. Merging uses the version rules, so repair never loses a
//! write. The responder side is stateless: [`crate::merkle::respond`] and the replica's
//! `Exchange` operation.

use std::collections::{BTreeMap, VecDeque};

use serde::{Deserialize, Serialize};

use crate::merkle::{DiffInitiator, DiffReply, DiffRequest, DiffStep, MerkleTree};
use crate::ring::NodeId;
use crate::version::Object;

/// Messages between the two sides of an exchange.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum AeMessage {
    Diff { partition: u32, request: DiffRequest },
    DiffReply { reply: DiffReply },
    Exchange { partition: u32, leaves: Vec<u32>, objects: Vec<(Vec<u8>, Object)> },
    ExchangeReply { objects: Vec<(Vec<u8>, Object)> },
}

/// What the scheduler wants done.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AeAction {
    /// Read our tree of `partition`; answer with `handle_tree`.
    ReadTree { id: u64, partition: u32 },
    /// Read our objects of `partition` in `leaves`; answer with `handle_leaves`.
    ReadLeaves { id: u64, partition: u32, leaves: Vec<u32> },
    /// Send to the peer; its answer comes back through `handle_reply`.
    Send { id: u64, to: NodeId, msg: AeMessage },
    /// Merge these objects into our owned data.
    Merge { objects: Vec<(Vec<u8>, Object)> },
    /// An exchange ended: `differing_leaves` leaves were repaired (None: it failed).
    Finished { id: u64, partition: u32, peer: NodeId, differing_leaves: Option<usize> },
}

#[derive(Debug)]
struct Exchange {
    partition: u32,
    peer: NodeId,
    started_ms: u64,
    diff: Option<DiffInitiator>,
    leaves: Vec<u32>,
}

/// One node's anti-entropy scheduler.
#[derive(Debug)]
pub struct AntiEntropy {
    interval_ms: u64,
    timeout_ms: u64,
    next_round_ms: u64,
    cursor: usize,
    next_id: u64,
    exchanges: BTreeMap<u64, Exchange>,
    outbox: VecDeque<AeAction>,
    /// Exchanges completed, and how many of them found differences.
    pub completed: u64,
    pub repaired: u64,
}

impl AntiEntropy {
    pub fn new(interval_ms: u64, timeout_ms: u64, now_ms: u64) -> Self {
        AntiEntropy {
            interval_ms: interval_ms.max(1),
            timeout_ms: timeout_ms.max(1),
            next_round_ms: now_ms + interval_ms,
            cursor: 0,
            next_id: 1,
            exchanges: BTreeMap::new(),
            outbox: VecDeque::new(),
            completed: 0,
            repaired: 0,
        }
    }

    pub fn inflight(&self) -> usize {
        self.exchanges.len()
    }

    /// Time passed. `pairs` are the (partition, peer) pairs this node should compare (its
    /// replicated partitions times their other reachable replicas); `allowed` is how many
    /// exchanges may run at once now (the admission budget; 0 pauses).
    pub fn handle_tick(&mut self, now_ms: u64, pairs: &[(u32, NodeId)], allowed: usize) {
        let expired: Vec<u64> = self
            .exchanges
            .iter()
            .filter(|(_, e)| now_ms >= e.started_ms + self.timeout_ms)
            .map(|(id, _)| *id)
            .collect();
        for id in expired {
            self.fail(id);
        }
        if now_ms < self.next_round_ms || pairs.is_empty() {
            return;
        }
        let mut started = 0;
        while self.exchanges.len() < allowed && started < pairs.len() {
            let (partition, peer) = pairs[self.cursor % pairs.len()].clone();
            self.cursor = self.cursor.wrapping_add(1);
            started += 1;
            if self.exchanges.values().any(|e| e.partition == partition && e.peer == peer) {
                continue;
            }
            let id = self.next_id;
            self.next_id += 1;
            self.exchanges.insert(id, Exchange { partition, peer, started_ms: now_ms, diff: None, leaves: Vec::new() });
            self.outbox.push_back(AeAction::ReadTree { id, partition });
        }
        // A full pass over the pairs ends the round.
        if self.cursor % pairs.len() == 0 || self.exchanges.len() >= allowed {
            self.next_round_ms = now_ms + self.interval_ms;
        }
    }

    fn fail(&mut self, id: u64) {
        if let Some(e) = self.exchanges.remove(&id) {
            self.outbox.push_back(AeAction::Finished {
                id,
                partition: e.partition,
                peer: e.peer,
                differing_leaves: None,
            });
        }
    }

    /// Our tree of the exchange's partition.
    pub fn handle_tree(&mut self, id: u64, tree: MerkleTree) {
        let Some(e) = self.exchanges.get_mut(&id) else { return };
        let mut diff = DiffInitiator::new(tree);
        if let DiffStep::Send(request) = diff.start() {
            let msg = AeMessage::Diff { partition: e.partition, request };
            self.outbox.push_back(AeAction::Send { id, to: e.peer.clone(), msg });
        }
        e.diff = Some(diff);
    }

    /// Our objects in the differing leaves.
    pub fn handle_leaves(&mut self, id: u64, objects: Vec<(Vec<u8>, Object)>) {
        let Some(e) = self.exchanges.get(&id) else { return };
        let msg = AeMessage::Exchange { partition: e.partition, leaves: e.leaves.clone(), objects };
        self.outbox.push_back(AeAction::Send { id, to: e.peer.clone(), msg });
    }

    /// The peer answered.
    pub fn handle_reply(&mut self, id: u64, msg: AeMessage) {
        let Some(e) = self.exchanges.get_mut(&id) else { return };
        match msg {
            AeMessage::DiffReply { reply } => {
                let Some(diff) = e.diff.as_mut() else { return self.fail(id) };
                match diff.handle_reply(&reply) {
                    Ok(DiffStep::Send(request)) => {
                        let msg = AeMessage::Diff { partition: e.partition, request };
                        self.outbox.push_back(AeAction::Send { id, to: e.peer.clone(), msg });
                    }
                    Ok(DiffStep::Done(leaves)) if leaves.is_empty() => {
                        let e = self.exchanges.remove(&id).expect("present");
                        self.completed += 1;
                        self.outbox.push_back(AeAction::Finished {
                            id,
                            partition: e.partition,
                            peer: e.peer,
                            differing_leaves: Some(0),
                        });
                    }
                    Ok(DiffStep::Done(leaves)) => {
                        e.leaves = leaves.clone();
                        self.outbox.push_back(AeAction::ReadLeaves { id, partition: e.partition, leaves });
                    }
                    Err(_) => self.fail(id),
                }
            }
            AeMessage::ExchangeReply { objects } => {
                let e = self.exchanges.remove(&id).expect("present");
                self.completed += 1;
                self.repaired += 1;
                self.outbox.push_back(AeAction::Merge { objects });
                let n = e.leaves.len();
                self.outbox.push_back(AeAction::Finished {
                    id,
                    partition: e.partition,
                    peer: e.peer,
                    differing_leaves: Some(n),
                });
            }
            _ => self.fail(id),
        }
    }

    /// The peer could not be reached.
    pub fn handle_failure(&mut self, id: u64) {
        self.fail(id);
    }

    pub fn poll_action(&mut self) -> Option<AeAction> {
        self.outbox.pop_front()
    }

    pub fn poll_timeout(&self) -> u64 {
        let expiry = self.exchanges.values().map(|e| e.started_ms + self.timeout_ms).min();
        expiry.map_or(self.next_round_ms, |x| x.min(self.next_round_ms))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::merkle::respond;
    use crate::replica::{execute, MemStore, ReplicaLimits, ReplicaOp, ReplicaOutcome, Store};
    use crate::version::{Actor, VersionVector};

    fn write(s: &mut MemStore, key: &str, v: &str, actor: u64) {
        let op = ReplicaOp::Coordinate {
            key: key.as_bytes().to_vec(),
            context: VersionVector::new(),
            value: Some(v.as_bytes().to_vec()),
            hint: None,
            actor: Actor(actor),
            now_ms: 1,
        };
        execute(s, op, ReplicaLimits::default());
    }

    /// Run every action of `ae` on node `a` against peer `b` until quiet.
    fn run(ae: &mut AntiEntropy, a: &mut MemStore, b: &mut MemStore) -> Vec<AeAction> {
        let mut finished = Vec::new();
        while let Some(action) = ae.poll_action() {
            match action {
                AeAction::ReadTree { id, partition } => ae.handle_tree(id, a.tree(partition)),
                AeAction::ReadLeaves { id, partition, leaves } => {
                    ae.handle_leaves(id, a.objects_in(partition, Some(&leaves), usize::MAX, &|_| true))
                }
                AeAction::Merge { objects } => {
                    for (key, object) in objects {
                        execute(a, ReplicaOp::Write { key, object, hint: None }, ReplicaLimits::default());
                    }
                }
                AeAction::Send { id, msg, .. } => {
                    let reply = match msg {
                        AeMessage::Diff { partition, request } => {
                            AeMessage::DiffReply { reply: respond(&b.tree(partition), &request) }
                        }
                        AeMessage::Exchange { partition, leaves, objects } => {
                            match execute(
                                b,
                                ReplicaOp::Exchange { partition, leaves, objects },
                                ReplicaLimits::default(),
                            ) {
                                ReplicaOutcome::Objects(objects) => AeMessage::ExchangeReply { objects },
                                other => panic!("{other:?}"),
                            }
                        }
                        other => panic!("{other:?}"),
                    };
                    ae.handle_reply(id, reply);
                }
                f @ AeAction::Finished { .. } => finished.push(f),
            }
        }
        finished
    }

    #[test]
    fn exchange_repairs_both_sides() {
        let (mut a, mut b) = (MemStore::new(8), MemStore::new(8));
        for i in 0..200 {
            let k = format!("k{i}");
            write(&mut a, &k, "v", 1);
            let o = a.object(k.as_bytes()).unwrap();
            b.set_object(k.as_bytes(), o);
        }
        write(&mut a, "only-a", "x", 1);
        write(&mut b, "only-b", "y", 2);
        write(&mut b, "k7", "concurrent", 2);
        let pairs: Vec<(u32, NodeId)> = (0..8).map(|p| (p, "b".to_string())).collect();
        let mut ae = AntiEntropy::new(100, 1000, 0);
        ae.handle_tick(100, &pairs, 8);
        let finished = run(&mut ae, &mut a, &mut b);
        assert_eq!(finished.len(), 8);
        for p in 0..8 {
            assert_eq!(a.tree(p).root(), b.tree(p).root(), "partition {p}");
        }
        let k7: Vec<&[u8]> = a.objects[b"k7".as_slice()].values().collect();
        assert_eq!(k7.len(), 2, "the concurrent write became a sibling, nothing lost");
        assert!(a.objects.contains_key(b"only-b".as_slice()) && b.objects.contains_key(b"only-a".as_slice()));
        // Equal replicas: the next round finds nothing and ends after one round trip each.
        ae.handle_tick(300, &pairs, 8);
        let finished = run(&mut ae, &mut a, &mut b);
        assert!(finished.iter().all(|f| matches!(f, AeAction::Finished { differing_leaves: Some(0), .. })));
    }

    #[test]
    fn budget_bounds_exchanges_and_zero_pauses() {
        let pairs: Vec<(u32, NodeId)> = (0..8).map(|p| (p, "b".to_string())).collect();
        let mut ae = AntiEntropy::new(100, 1000, 0);
        ae.handle_tick(100, &pairs, 0);
        assert!(ae.poll_action().is_none());
        ae.handle_tick(200, &pairs, 2);
        assert_eq!(ae.inflight(), 2);
        // A silent peer: the exchanges time out and are reported as failed.
        ae.handle_tick(1300, &pairs, 0);
        assert_eq!(ae.inflight(), 0);
        let failed = std::iter::from_fn(|| ae.poll_action())
            .filter(|a| matches!(a, AeAction::Finished { differing_leaves: None, .. }))
            .count();
        assert_eq!(failed, 2);
    }
}
