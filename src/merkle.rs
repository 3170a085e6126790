//! Merkle trees for anti-entropy (Dynamo §4.7): one tree per partition, so two replicas can
//! find the keys on which they differ by exchanging a few hashes rather than every key.
//!
//! The tree has a fixed shape: [`LEAVES`] leaves under [`FANOUT`]-way internal nodes. A key
//! falls into the leaf picked by the low bits of its MD5 (the high bits pick its partition);
//! the leaf holds the XOR of `MD5(key, object digest)` over its keys, and every internal node
//! the XOR of its children. So an update is O(depth): XOR the change into one leaf and its
//! ancestors. Two replicas with the same live contents have the same root whatever order the
//! writes arrived in.
//!
//! [`DiffInitiator`] and [`respond`] compare two trees held on different nodes, level by
//! level, as messages: the initiator sends hashes of the nodes still in doubt, the responder
//! names the ones that differ, and after [`DEPTH`] round trips the initiator knows the
//! differing leaves. [`compare_digests`] then narrows those leaves to keys.

use std::collections::BTreeMap;

use md5::{Digest, Md5};
use serde::{Deserialize, Serialize};

use crate::ring::key_position;

/// Children per internal node.
pub const FANOUT: usize = 32;
/// Levels below the root.
pub const DEPTH: usize = 2;
/// Number of leaves: FANOUT^DEPTH.
pub const LEAVES: usize = FANOUT * FANOUT;

/// A 128-bit hash.
pub type Hash = u128;

/// The leaf a key falls into.
pub fn leaf_of(key: &[u8]) -> u32 {
    (key_position(key) as usize % LEAVES) as u32
}

/// The hash one key contributes to its leaf.
pub fn item_hash(key: &[u8], digest: &[u8; 16]) -> Hash {
    let mut h = Md5::new();
    h.update((key.len() as u64).to_be_bytes());
    h.update(key);
    h.update(digest);
    u128::from_be_bytes(h.finalize().into())
}

/// A fixed-shape Merkle tree: `levels[0]` is the root, `levels[DEPTH]` the leaves.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MerkleTree {
    levels: Vec<Vec<Hash>>,
    keys: u64,
}

impl Default for MerkleTree {
    fn default() -> Self {
        Self::new()
    }
}

impl MerkleTree {
    pub fn new() -> Self {
        let levels = (0..=DEPTH).map(|l| vec![0; FANOUT.pow(l as u32)]).collect();
        MerkleTree { levels, keys: 0 }
    }

    pub fn root(&self) -> Hash {
        self.levels[0][0]
    }

    /// The root as 32 hex digits, as `ringkv admin partitions` shows it.
    pub fn root_hex(&self) -> String {
        format!("{:032x}", self.root())
    }

    /// Number of keys in the tree.
    pub fn keys(&self) -> u64 {
        self.keys
    }

    /// The hash of node `index` at `level`, if it exists.
    pub fn node(&self, level: usize, index: u32) -> Option<Hash> {
        self.levels.get(level)?.get(index as usize).copied()
    }

    /// Record a change of `key` from `old` to `new` digest (None: absent).
    pub fn update(&mut self, key: &[u8], old: Option<&[u8; 16]>, new: Option<&[u8; 16]>) {
        if old == new {
            return;
        }
        let delta = old.map_or(0, |d| item_hash(key, d)) ^ new.map_or(0, |d| item_hash(key, d));
        match (old.is_some(), new.is_some()) {
            (false, true) => self.keys += 1,
            (true, false) => self.keys = self.keys.saturating_sub(1),
            _ => {}
        }
        let mut index = leaf_of(key) as usize;
        for level in (0..=DEPTH).rev() {
            self.levels[level][index] ^= delta;
            index /= FANOUT;
        }
    }

    /// Replace a leaf's hash with `hash` (recomputed from the store after a row had to be
    /// quarantined, whose digest is unknown) and its key count by `keys_removed` fewer.
    pub fn set_leaf(&mut self, leaf: u32, hash: Hash, keys_removed: u64) {
        let Some(old) = self.levels[DEPTH].get(leaf as usize).copied() else { return };
        let delta = old ^ hash;
        let mut index = leaf as usize;
        for level in (0..=DEPTH).rev() {
            self.levels[level][index] ^= delta;
            index /= FANOUT;
        }
        self.keys = self.keys.saturating_sub(keys_removed);
    }

    /// Insert a key not yet in the tree.
    pub fn insert(&mut self, key: &[u8], digest: &[u8; 16]) {
        self.update(key, None, Some(digest));
    }
}

/// Hashes the initiator holds for nodes still in doubt at one level.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiffRequest {
    pub level: u8,
    pub nodes: Vec<(u32, Hash)>,
}

/// The indices, among those asked about, whose hashes differ on the responder.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiffReply {
    pub level: u8,
    pub differing: Vec<u32>,
}

/// What a diff exchange does next.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DiffStep {
    /// Send this request to the responder and feed its reply back.
    Send(DiffRequest),
    /// The exchange is over: these leaves differ (empty: the trees are equal).
    Done(Vec<u32>),
}

/// A reply that does not answer the request in flight.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DiffError {
    #[error("reply for level {got}, expected level {expected}")]
    WrongLevel { expected: u8, got: u8 },
    #[error("reply names node {0}, which was not asked about")]
    NotAsked(u32),
    #[error("no request is in flight")]
    NotWaiting,
}

/// The initiating side of a tree comparison: holds a snapshot of its own tree.
#[derive(Clone, Debug)]
pub struct DiffInitiator {
    tree: MerkleTree,
    asked: Option<DiffRequest>,
}

impl DiffInitiator {
    pub fn new(tree: MerkleTree) -> Self {
        DiffInitiator { tree, asked: None }
    }

    /// The first request: the root.
    pub fn start(&mut self) -> DiffStep {
        self.ask(DiffRequest { level: 0, nodes: vec![(0, self.tree.root())] })
    }

    fn ask(&mut self, req: DiffRequest) -> DiffStep {
        self.asked = Some(req.clone());
        DiffStep::Send(req)
    }

    /// Feed the responder's reply; the next request, or the differing leaves.
    pub fn handle_reply(&mut self, reply: &DiffReply) -> Result<DiffStep, DiffError> {
        let asked = self.asked.as_ref().ok_or(DiffError::NotWaiting)?;
        if reply.level != asked.level {
            return Err(DiffError::WrongLevel { expected: asked.level, got: reply.level });
        }
        let mut differing = reply.differing.clone();
        differing.sort_unstable();
        differing.dedup();
        if let Some(&bad) = differing.iter().find(|i| asked.nodes.binary_search_by_key(*i, |n| n.0).is_err()) {
            return Err(DiffError::NotAsked(bad));
        }
        let level = asked.level as usize;
        if differing.is_empty() || level == DEPTH {
            self.asked = None;
            return Ok(DiffStep::Done(if level == DEPTH { differing } else { Vec::new() }));
        }
        let nodes = differing
            .iter()
            .flat_map(|&i| (0..FANOUT as u32).map(move |c| i * FANOUT as u32 + c))
            .map(|c| (c, self.tree.levels[level + 1][c as usize]))
            .collect();
        Ok(self.ask(DiffRequest { level: (level + 1) as u8, nodes }))
    }
}

/// The responding side: which of the asked nodes differ from `tree`. Stateless; unknown
/// levels and indices count as differing so a confused peer learns nothing false.
pub fn respond(tree: &MerkleTree, req: &DiffRequest) -> DiffReply {
    let differing =
        req.nodes.iter().filter(|(i, h)| tree.node(req.level as usize, *i) != Some(*h)).map(|(i, _)| *i).collect();
    DiffReply { level: req.level, differing }
}

/// Keys whose digests differ between two listings of the same leaves: present on one side
/// only, or present on both with different digests. Sorted.
pub fn compare_digests(mine: &[(Vec<u8>, [u8; 16])], theirs: &[(Vec<u8>, [u8; 16])]) -> Vec<Vec<u8>> {
    let theirs: BTreeMap<&[u8], &[u8; 16]> = theirs.iter().map(|(k, d)| (k.as_slice(), d)).collect();
    let mine_map: BTreeMap<&[u8], &[u8; 16]> = mine.iter().map(|(k, d)| (k.as_slice(), d)).collect();
    let mut out: Vec<Vec<u8>> = mine_map
        .iter()
        .filter(|(k, d)| theirs.get(*k) != Some(*d))
        .map(|(k, _)| k.to_vec())
        .chain(theirs.keys().filter(|k| !mine_map.contains_key(*k)).map(|k| k.to_vec()))
        .collect();
    out.sort();
    out.dedup();
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    fn digest(v: u8) -> [u8; 16] {
        [v; 16]
    }

    fn tree_of(items: &BTreeMap<Vec<u8>, u8>) -> MerkleTree {
        let mut t = MerkleTree::new();
        for (k, v) in items {
            t.insert(k, &digest(*v));
        }
        t
    }

    /// Run a full exchange between two trees as two parties would.
    fn exchange(a: &MerkleTree, b: &MerkleTree) -> (Vec<u32>, usize) {
        let mut init = DiffInitiator::new(a.clone());
        let mut step = init.start();
        let mut rounds = 0;
        loop {
            match step {
                DiffStep::Send(req) => {
                    rounds += 1;
                    step = init.handle_reply(&respond(b, &req)).unwrap();
                }
                DiffStep::Done(leaves) => return (leaves, rounds),
            }
        }
    }

    #[test]
    fn empty_trees_agree() {
        assert_eq!(MerkleTree::new().root(), 0);
        assert_eq!(exchange(&MerkleTree::new(), &MerkleTree::new()), (vec![], 1));
    }

    #[test]
    fn update_and_remove_restore_root() {
        let mut t = MerkleTree::new();
        t.insert(b"a", &digest(1));
        let r1 = t.root();
        t.update(b"b", None, Some(&digest(2)));
        t.update(b"b", Some(&digest(2)), Some(&digest(3)));
        t.update(b"b", Some(&digest(3)), None);
        assert_eq!(t.root(), r1);
        assert_eq!(t.keys(), 1);
    }

    #[test]
    fn one_differing_key_is_found_in_depth_plus_one_rounds() {
        let items: BTreeMap<Vec<u8>, u8> = (0..500u32).map(|i| (i.to_be_bytes().to_vec(), 7)).collect();
        let a = tree_of(&items);
        let mut other = items.clone();
        other.insert(42u32.to_be_bytes().to_vec(), 8);
        let b = tree_of(&other);
        let (leaves, rounds) = exchange(&a, &b);
        assert_eq!(leaves, vec![leaf_of(&42u32.to_be_bytes())]);
        assert_eq!(rounds, DEPTH + 1);
    }

    #[test]
    fn bad_replies_are_errors() {
        let mut init = DiffInitiator::new(MerkleTree::new());
        assert_eq!(init.handle_reply(&DiffReply { level: 0, differing: vec![] }), Err(DiffError::NotWaiting));
        init.start();
        assert_eq!(
            init.handle_reply(&DiffReply { level: 1, differing: vec![] }),
            Err(DiffError::WrongLevel { expected: 0, got: 1 })
        );
        assert_eq!(init.handle_reply(&DiffReply { level: 0, differing: vec![5] }), Err(DiffError::NotAsked(5)));
    }

    #[test]
    fn responder_treats_unknown_nodes_as_differing() {
        let req = DiffRequest { level: 9, nodes: vec![(0, 0)] };
        assert_eq!(respond(&MerkleTree::new(), &req).differing, vec![0]);
    }

    fn items() -> impl Strategy<Value = BTreeMap<Vec<u8>, u8>> {
        proptest::collection::btree_map(proptest::collection::vec(any::<u8>(), 1..6), 0u8..4, 0..200)
    }

    proptest! {
        #[test]
        fn root_is_independent_of_insert_order(items in items(), seed in any::<u64>()) {
            let mut entries: Vec<_> = items.iter().collect();
            // A deterministic shuffle from the seed.
            let mut s = seed | 1;
            for i in (1..entries.len()).rev() {
                s ^= s << 13; s ^= s >> 7; s ^= s << 17;
                entries.swap(i, (s % (i as u64 + 1)) as usize);
            }
            let mut t = MerkleTree::new();
            for (k, v) in entries { t.insert(k, &digest(*v)); }
            prop_assert_eq!(t, tree_of(&items));
        }

        #[test]
        fn equal_contents_iff_equal_roots(a in items(), b in items()) {
            prop_assert_eq!(a == b, tree_of(&a).root() == tree_of(&b).root());
        }

        #[test]
        fn diff_finds_exactly_the_differing_keys(a in items(), b in items()) {
            let (ta, tb) = (tree_of(&a), tree_of(&b));
            let (leaves, _) = exchange(&ta, &tb);
            let in_leaves = |m: &BTreeMap<Vec<u8>, u8>| -> Vec<(Vec<u8>, [u8; 16])> {
                m.iter().filter(|(k, _)| leaves.contains(&leaf_of(k))).map(|(k, v)| (k.clone(), digest(*v))).collect()
            };
            let found = compare_digests(&in_leaves(&a), &in_leaves(&b));
            let mut expected: Vec<Vec<u8>> = a.keys().chain(b.keys())
                .filter(|k| a.get(*k) != b.get(*k)).cloned().collect();
            expected.sort();
            expected.dedup();
            prop_assert_eq!(found, expected);
        }
    }
}
