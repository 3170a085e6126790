//! The replica side of a request (Dynamo §4.5-4.6): what a node does with its own copy of a
//! key when a coordinator asks it to read, merge or coordinate a write.
//!
//! The logic is pure and runs against the [`Store`] trait, which the node implements over
//! redb inside one transaction (so a read-modify-write is atomic) and the simulation over
//! maps. Owned data and hinted data (replicas held for an unreachable node, §4.6) live in
//! separate tables; a read on a fallback sees both.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::merkle::{leaf_of, MerkleTree};
use crate::reaper::ReapStep;
use crate::ring::{key_position, partition_of_position, NodeId};
use crate::version::{Actor, Object, VersionVector};

/// Where a replica's state for a key lives.
pub trait Store {
    /// The owned copy of `key`.
    fn object(&self, key: &[u8]) -> Option<Object>;
    /// Replace the owned copy of `key`. Implementations keep Merkle trees in step.
    fn set_object(&mut self, key: &[u8], object: Object);
    /// Remove the owned copy of `key` (reaping, or data handed off).
    fn remove_object(&mut self, key: &[u8]);
    /// The copy held for `intended` under a hint.
    fn hint(&self, intended: &str, key: &[u8]) -> Option<Object>;
    /// Replace the hinted copy held for `intended`.
    fn set_hint(&mut self, intended: &str, key: &[u8], object: Object);
    /// Every hinted copy of `key`, whoever it is for.
    fn hints_of_key(&self, key: &[u8]) -> Vec<Object>;
    /// Remove the hinted copy held for `intended`.
    fn remove_hint(&mut self, intended: &str, key: &[u8]);
    /// Up to `limit` hinted copies for nodes not in `exclude`, in a stable order:
    /// (intended, key, object).
    fn scan_hints(&self, limit: usize, exclude: &[NodeId]) -> Vec<(NodeId, Vec<u8>, Object)>;
    /// Up to `limit` owned objects of `partition` whose keys fall in `leaves` (any leaf when
    /// None) and which `keep` accepts, in key order; the scan stops at the limit.
    fn objects_in(
        &self,
        partition: u32,
        leaves: Option<&[u32]>,
        limit: usize,
        keep: &dyn Fn(&Object) -> bool,
    ) -> Vec<(Vec<u8>, Object)>;
    /// The Merkle tree of `partition`.
    fn tree(&self, partition: u32) -> MerkleTree;
    /// Partitions holding at least one owned key.
    fn partitions_held(&self) -> Vec<u32>;
}

/// Limits a replica enforces on writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicaLimits {
    pub max_siblings: usize,
    pub prune_threshold: usize,
}

impl Default for ReplicaLimits {
    fn default() -> Self {
        ReplicaLimits { max_siblings: 100, prune_threshold: crate::version::PRUNE_THRESHOLD_DEFAULT }
    }
}

/// Why a replica refused a write.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
pub enum ReplicaError {
    #[error("key has {0} siblings, over the limit: read it and write back with its context to resolve them")]
    TooManySiblings(usize),
}

/// An operation on one replica's state.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ReplicaOp {
    /// The replica's state of a key: owned and hinted copies merged.
    Read { key: Vec<u8> },
    /// Merge a coordinator's object; with `hint`, into the hinted table for that node.
    Write { key: Vec<u8>, object: Object, hint: Option<NodeId> },
    /// Anti-entropy responder: merge `objects`, then return every owned object of the
    /// partition in `leaves`, so both sides end with the union.
    Exchange { partition: u32, leaves: Vec<u32>, objects: Vec<(Vec<u8>, Object)> },
    /// Up to `limit` objects of a partition in some leaves (or all).
    ReadLeaves { partition: u32, leaves: Option<Vec<u32>>, limit: usize },
    /// A partition's Merkle tree.
    Tree { partition: u32 },
    /// Up to `limit` held hints, skipping those for `exclude`d nodes.
    ScanHints { limit: usize, exclude: Vec<NodeId> },
    /// Drop the hint held for `intended` if it still has this digest (it was delivered).
    RemoveHint { intended: NodeId, key: Vec<u8>, digest: [u8; 16] },
    /// Owned tombstone-only keys of a partition last written before `before_wall_ms`.
    Tombstones { partition: u32, before_wall_ms: u64, limit: usize },
    /// Tombstone reaping, one replica's part: check that it holds exactly a state, or remove
    /// the key if it still does. Answered with `Reaped`.
    Reap(ReapStep),
    /// Drop an owned key if it still has this digest (it was transferred to its owners).
    RemoveObject { key: Vec<u8>, digest: [u8; 16] },
    /// Coordinate a client's write here: apply it under a new dot of `actor`.
    Coordinate {
        key: Vec<u8>,
        context: VersionVector,
        value: Option<Vec<u8>>,
        hint: Option<NodeId>,
        actor: Actor,
        now_ms: u64,
    },
}

/// What an operation produced.
///
/// When [`dropped_data`](ReplicaOutcome::dropped_data) is true, local data was dropped: the
/// caller must retire its dot-issuing [`Actor`] and use a fresh one, since a later
/// coordination for that key could otherwise reissue a dot it already gave to a write that
/// lives on elsewhere.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ReplicaOutcome {
    Read(Option<Object>),
    /// The write merged; `changed` is false when the replica already had it all.
    Written {
        changed: bool,
    },
    /// The coordinated object to replicate, or why it was refused.
    Coordinated(Result<Object, ReplicaError>),
    Objects(Vec<(Vec<u8>, Object)>),
    Tree(MerkleTree),
    Hints(Vec<(NodeId, Vec<u8>, Object)>),
    /// Whether a conditional removal happened.
    Removed(bool),
    /// (digest, key) of each tombstone found.
    Tombstones(Vec<([u8; 16], Vec<u8>)>),
    /// `yes`: the replica holds the state (Check), or no longer holds the key (Remove);
    /// `removed`: this operation dropped it.
    Reaped {
        yes: bool,
        removed: bool,
    },
}

impl ReplicaOutcome {
    /// Whether this operation dropped local data (so the dot actor must be retired).
    pub fn dropped_data(&self) -> bool {
        matches!(self, ReplicaOutcome::Removed(true) | ReplicaOutcome::Reaped { removed: true, .. })
    }
}

fn stored<S: Store>(store: &S, key: &[u8], hint: Option<&str>) -> Option<Object> {
    match hint {
        Some(h) => store.hint(h, key),
        None => store.object(key),
    }
}

fn save<S: Store>(store: &mut S, key: &[u8], hint: Option<&str>, object: Object) {
    match hint {
        Some(h) => store.set_hint(h, key, object),
        None => store.set_object(key, object),
    }
}

fn merge_into<S: Store>(store: &mut S, key: &[u8], hint: Option<&str>, object: Object) -> bool {
    let old = stored(store, key, hint);
    let merged = match &old {
        Some(o) => o.merge(&object),
        None => object,
    };
    let changed = old.as_ref() != Some(&merged);
    if changed {
        save(store, key, hint, merged);
    }
    changed
}

/// Carry out one operation against a store.
pub fn execute<S: Store>(store: &mut S, op: ReplicaOp, limits: ReplicaLimits) -> ReplicaOutcome {
    match op {
        ReplicaOp::Exchange { partition, leaves, objects } => {
            for (k, o) in objects {
                merge_into(store, &k, None, o);
            }
            ReplicaOutcome::Objects(store.objects_in(partition, Some(&leaves), usize::MAX, &|_| true))
        }
        ReplicaOp::ReadLeaves { partition, leaves, limit } => {
            ReplicaOutcome::Objects(store.objects_in(partition, leaves.as_deref(), limit, &|_| true))
        }
        ReplicaOp::Tree { partition } => ReplicaOutcome::Tree(store.tree(partition)),
        ReplicaOp::Tombstones { partition, before_wall_ms, limit } => ReplicaOutcome::Tombstones(
            store
                .objects_in(partition, None, limit, &|o| o.is_deleted() && o.last_modified_ms() < before_wall_ms)
                .into_iter()
                .map(|(k, o)| (o.digest(), k))
                .collect(),
        ),
        ReplicaOp::Reap(ReapStep::Check { key, digest }) => {
            ReplicaOutcome::Reaped { yes: store.object(&key).map(|o| o.digest()) == Some(digest), removed: false }
        }
        ReplicaOp::Reap(ReapStep::Remove { key, digest }) => match store.object(&key).map(|o| o.digest()) {
            Some(d) if d == digest => {
                store.remove_object(&key);
                ReplicaOutcome::Reaped { yes: true, removed: true }
            }
            current => ReplicaOutcome::Reaped { yes: current.is_none(), removed: false },
        },
        ReplicaOp::ScanHints { limit, exclude } => ReplicaOutcome::Hints(store.scan_hints(limit, &exclude)),
        ReplicaOp::RemoveHint { intended, key, digest } => {
            let current = store.hint(&intended, &key).map(|o| o.digest());
            let remove = current == Some(digest);
            if remove {
                store.remove_hint(&intended, &key);
            }
            ReplicaOutcome::Removed(remove)
        }
        ReplicaOp::RemoveObject { key, digest } => {
            let remove = store.object(&key).map(|o| o.digest()) == Some(digest);
            if remove {
                store.remove_object(&key);
            }
            ReplicaOutcome::Removed(remove)
        }
        ReplicaOp::Read { key } => {
            let mut found = store.object(&key);
            for h in store.hints_of_key(&key) {
                found = Some(match found {
                    Some(o) => o.merge(&h),
                    None => h,
                });
            }
            ReplicaOutcome::Read(found)
        }
        ReplicaOp::Write { key, object, hint } => {
            ReplicaOutcome::Written { changed: merge_into(store, &key, hint.as_deref(), object) }
        }
        ReplicaOp::Coordinate { key, context, value, hint, actor, now_ms } => {
            // The new dot's counter must exceed every dot this actor issued for the key, and
            // those may sit in the owned copy or in any hinted copy: start from all of them.
            let mut object = store.object(&key).unwrap_or_default();
            for h in store.hints_of_key(&key) {
                object = object.merge(&h);
            }
            let survivors = object.siblings().iter().filter(|s| !context.covers(s.dot)).count();
            if survivors + 1 > limits.max_siblings {
                return ReplicaOutcome::Coordinated(Err(ReplicaError::TooManySiblings(survivors)));
            }
            object.update(&context, actor, value, now_ms, limits.prune_threshold);
            save(store, &key, hint.as_deref(), object.clone());
            ReplicaOutcome::Coordinated(Ok(object))
        }
    }
}

/// An in-memory [`Store`], for tests and the simulation, with Merkle trees kept in step.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MemStore {
    pub q: u32,
    pub objects: BTreeMap<Vec<u8>, Object>,
    pub hints: BTreeMap<(NodeId, Vec<u8>), Object>,
    pub trees: BTreeMap<u32, MerkleTree>,
}

impl Default for MemStore {
    fn default() -> Self {
        MemStore::new(64)
    }
}

impl MemStore {
    pub fn new(q: u32) -> Self {
        MemStore { q, objects: BTreeMap::new(), hints: BTreeMap::new(), trees: BTreeMap::new() }
    }

    pub fn partition(&self, key: &[u8]) -> u32 {
        partition_of_position(key_position(key), self.q)
    }
}

impl Store for MemStore {
    fn object(&self, key: &[u8]) -> Option<Object> {
        self.objects.get(key).cloned()
    }
    fn set_object(&mut self, key: &[u8], object: Object) {
        let p = self.partition(key);
        let old = self.objects.get(key).map(|o| o.digest());
        self.trees.entry(p).or_default().update(key, old.as_ref(), Some(&object.digest()));
        self.objects.insert(key.to_vec(), object);
    }
    fn remove_object(&mut self, key: &[u8]) {
        let p = self.partition(key);
        if let Some(old) = self.objects.remove(key) {
            self.trees.entry(p).or_default().update(key, Some(&old.digest()), None);
        }
    }
    fn hint(&self, intended: &str, key: &[u8]) -> Option<Object> {
        self.hints.get(&(intended.to_string(), key.to_vec())).cloned()
    }
    fn set_hint(&mut self, intended: &str, key: &[u8], object: Object) {
        self.hints.insert((intended.to_string(), key.to_vec()), object);
    }
    fn hints_of_key(&self, key: &[u8]) -> Vec<Object> {
        self.hints.iter().filter(|((_, k), _)| k == key).map(|(_, o)| o.clone()).collect()
    }
    fn remove_hint(&mut self, intended: &str, key: &[u8]) {
        self.hints.remove(&(intended.to_string(), key.to_vec()));
    }
    fn scan_hints(&self, limit: usize, exclude: &[NodeId]) -> Vec<(NodeId, Vec<u8>, Object)> {
        self.hints
            .iter()
            .filter(|((n, _), _)| !exclude.contains(n))
            .take(limit)
            .map(|((n, k), o)| (n.clone(), k.clone(), o.clone()))
            .collect()
    }
    fn objects_in(
        &self,
        partition: u32,
        leaves: Option<&[u32]>,
        limit: usize,
        keep: &dyn Fn(&Object) -> bool,
    ) -> Vec<(Vec<u8>, Object)> {
        self.objects
            .iter()
            .filter(|(k, o)| {
                self.partition(k) == partition && leaves.is_none_or(|l| l.contains(&leaf_of(k))) && keep(o)
            })
            .take(limit)
            .map(|(k, o)| (k.clone(), o.clone()))
            .collect()
    }
    fn tree(&self, partition: u32) -> MerkleTree {
        self.trees.get(&partition).cloned().unwrap_or_default()
    }
    fn partitions_held(&self) -> Vec<u32> {
        self.trees.iter().filter(|(_, t)| t.keys() > 0).map(|(p, _)| *p).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A client write of `value` to key "k" with `ctx`, coordinated by Actor(9).
    fn coordinate_op(ctx: &VersionVector, value: &[u8], hint: Option<&str>) -> ReplicaOp {
        ReplicaOp::Coordinate {
            key: b"k".to_vec(),
            context: ctx.clone(),
            value: Some(value.to_vec()),
            hint: hint.map(str::to_string),
            actor: Actor(9),
            now_ms: 1,
        }
    }

    fn coordinate(store: &mut MemStore, ctx: &VersionVector, value: &[u8], hint: Option<&str>) -> Object {
        match execute(store, coordinate_op(ctx, value, hint), ReplicaLimits::default()) {
            ReplicaOutcome::Coordinated(Ok(o)) => o,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn coordinate_then_replicate_then_read() {
        let (mut a, mut b) = (MemStore::default(), MemStore::default());
        let o = coordinate(&mut a, &VersionVector::new(), b"v", None);
        let w = ReplicaOp::Write { key: b"k".to_vec(), object: o.clone(), hint: None };
        assert_eq!(execute(&mut b, w.clone(), ReplicaLimits::default()), ReplicaOutcome::Written { changed: true });
        assert_eq!(execute(&mut b, w, ReplicaLimits::default()), ReplicaOutcome::Written { changed: false });
        assert_eq!(
            execute(&mut b, ReplicaOp::Read { key: b"k".to_vec() }, ReplicaLimits::default()),
            ReplicaOutcome::Read(Some(o))
        );
    }

    #[test]
    fn hinted_writes_are_kept_apart_but_read() {
        let mut f = MemStore::default();
        let o = coordinate(&mut MemStore::default(), &VersionVector::new(), b"v", None);
        let w = ReplicaOp::Write { key: b"k".to_vec(), object: o.clone(), hint: Some("n3".into()) };
        execute(&mut f, w, ReplicaLimits::default());
        assert!(f.objects.is_empty());
        assert_eq!(f.hint("n3", b"k"), Some(o.clone()));
        assert_eq!(
            execute(&mut f, ReplicaOp::Read { key: b"k".to_vec() }, ReplicaLimits::default()),
            ReplicaOutcome::Read(Some(o))
        );
    }

    #[test]
    fn coordination_counts_dots_in_every_local_copy() {
        // The node held a hint for n3 that it coordinated; now it coordinates as owner.
        let mut s = MemStore::default();
        let first = coordinate(&mut s, &VersionVector::new(), b"x", Some("n3"));
        let second = coordinate(&mut s, &VersionVector::new(), b"y", None);
        let d1 = first.siblings()[0].dot;
        assert!(second.siblings().iter().any(|x| x.dot == d1 && x.value.as_deref() == Some(b"x".as_slice())));
        assert_eq!(second.siblings().len(), 2, "distinct dots, both values kept");
    }

    #[test]
    fn reaping_removes_only_an_unchanged_state() {
        let mut s = MemStore::default();
        let o = coordinate(&mut s, &VersionVector::new(), b"x", None);
        let step = |remove: bool, digest| {
            let key = b"k".to_vec();
            ReplicaOp::Reap(if remove { ReapStep::Remove { key, digest } } else { ReapStep::Check { key, digest } })
        };
        let l = ReplicaLimits::default();
        assert_eq!(execute(&mut s, step(false, o.digest()), l), ReplicaOutcome::Reaped { yes: true, removed: false });
        assert_eq!(execute(&mut s, step(false, [0; 16]), l), ReplicaOutcome::Reaped { yes: false, removed: false });
        assert_eq!(execute(&mut s, step(true, [0; 16]), l), ReplicaOutcome::Reaped { yes: false, removed: false });
        let out = execute(&mut s, step(true, o.digest()), l);
        assert_eq!(out, ReplicaOutcome::Reaped { yes: true, removed: true });
        assert!(out.dropped_data() && s.objects.is_empty());
        // Already gone: the replica agrees, and nothing more was dropped.
        let again = execute(&mut s, step(true, o.digest()), l);
        assert_eq!(again, ReplicaOutcome::Reaped { yes: true, removed: false });
        assert!(!again.dropped_data());
    }

    #[test]
    fn sibling_limit_refuses_and_changes_nothing() {
        let mut s = MemStore::default();
        let limits = ReplicaLimits { max_siblings: 2, prune_threshold: 10 };
        for v in [b"a", b"b"] {
            let op = coordinate_op(&VersionVector::new(), v, None);
            assert!(matches!(execute(&mut s, op, limits), ReplicaOutcome::Coordinated(Ok(_))));
        }
        let before = s.clone();
        let blind = coordinate_op(&VersionVector::new(), b"c", None);
        assert_eq!(execute(&mut s, blind, limits), ReplicaOutcome::Coordinated(Err(ReplicaError::TooManySiblings(2))));
        assert_eq!(s, before);
        // A write that resolves them is accepted.
        let ctx = s.objects[b"k".as_slice()].context();
        assert!(matches!(execute(&mut s, coordinate_op(&ctx, b"c", None), limits), ReplicaOutcome::Coordinated(Ok(_))));
    }
}
