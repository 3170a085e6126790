//! The core's pieces working together, as a node would use them: the ring places a key on N
//! replicas, each replica applies writes under the version rules, and Merkle trees over the
//! replicas' partitions find exactly the keys anti-entropy must repair.

use std::collections::BTreeMap;

use ringkv::merkle::{compare_digests, leaf_of, respond, DiffInitiator, DiffStep, MerkleTree};
use ringkv::ring::{NodeSpec, Ring};
use ringkv::version::{Actor, Object, VersionVector};

/// One replica's store of one partition, with its Merkle tree kept up to date.
#[derive(Default, Clone)]
struct Replica {
    objects: BTreeMap<Vec<u8>, Object>,
    tree: MerkleTree,
}

impl Replica {
    fn apply(&mut self, key: &[u8], incoming: &Object) {
        let old = self.objects.get(key).cloned();
        let merged = old.as_ref().map_or_else(|| incoming.clone(), |o| o.merge(incoming));
        self.tree.update(key, old.map(|o| o.digest()).as_ref(), Some(&merged.digest()));
        self.objects.insert(key.to_vec(), merged);
    }

    fn coordinate(&mut self, key: &[u8], ctx: &VersionVector, actor: Actor, value: &[u8], now: u64) -> Object {
        let mut obj = self.objects.get(key).cloned().unwrap_or_default();
        obj.update(ctx, actor, Some(value.to_vec()), now, 10);
        self.apply(key, &obj);
        obj
    }

    fn digests_in(&self, leaves: &[u32]) -> Vec<(Vec<u8>, [u8; 16])> {
        self.objects
            .iter()
            .filter(|(k, _)| leaves.contains(&leaf_of(k)))
            .map(|(k, o)| (k.clone(), o.digest()))
            .collect()
    }
}

fn diff(a: &Replica, b: &Replica) -> Vec<Vec<u8>> {
    let mut init = DiffInitiator::new(a.tree.clone());
    let mut step = init.start();
    let leaves = loop {
        match step {
            DiffStep::Send(req) => step = init.handle_reply(&respond(&b.tree, &req)).unwrap(),
            DiffStep::Done(leaves) => break leaves,
        }
    };
    compare_digests(&a.digests_in(&leaves), &b.digests_in(&leaves))
}

#[test]
fn writes_placed_replicated_diverged_and_repaired() {
    let members: Vec<NodeSpec> = (1..=5).map(|i| NodeSpec::new(format!("n{i}"))).collect();
    let ring = Ring::new(64, 3, &members).unwrap();
    // Every key of partition 0's key space, found by scanning.
    let keys: Vec<Vec<u8>> =
        (0..20_000u32).map(|i| format!("k{i}").into_bytes()).filter(|k| ring.partition_for_key(k) == 0).collect();
    assert!(keys.len() > 100, "enough keys land in partition 0");
    let pl = ring.preference_list(0, 3);
    assert_eq!(pl.primaries.len(), 3);
    let mut replicas: BTreeMap<String, Replica> =
        pl.primaries.iter().map(|n| (n.clone(), Replica::default())).collect();

    // Each key written by its first replica and replicated to all three...
    for (t, k) in keys.iter().enumerate() {
        let obj =
            replicas.get_mut(&pl.primaries[0]).unwrap().coordinate(k, &VersionVector::new(), Actor(1), b"v1", t as u64);
        for n in &pl.primaries[1..] {
            replicas.get_mut(n).unwrap().apply(k, &obj);
        }
    }
    let roots: Vec<u128> = replicas.values().map(|r| r.tree.root()).collect();
    assert!(roots.windows(2).all(|w| w[0] == w[1]), "replicas agree");

    // ...then the third replica misses a few updates (it was down).
    let mut missed: Vec<Vec<u8>> = keys.iter().step_by(37).cloned().collect();
    missed.sort();
    for k in &missed {
        let first = replicas.get_mut(&pl.primaries[0]).unwrap();
        let ctx = first.objects[k].context();
        let obj = first.coordinate(k, &ctx, Actor(1), b"v2", 1_000_000);
        replicas.get_mut(&pl.primaries[1]).unwrap().apply(k, &obj);
    }
    let (a, c) = (&replicas[&pl.primaries[0]], &replicas[&pl.primaries[2]]);
    assert_ne!(a.tree.root(), c.tree.root());
    assert_eq!(diff(a, c), missed, "the exchange finds exactly the missed keys");

    // Repair both ways by merging, and the trees agree again with the newest values.
    let fixes: Vec<(Vec<u8>, Object)> = missed.iter().map(|k| (k.clone(), a.objects[k].clone())).collect();
    let third = replicas.get_mut(&pl.primaries[2]).unwrap();
    for (k, o) in &fixes {
        third.apply(k, o);
    }
    let roots: Vec<u128> = replicas.values().map(|r| r.tree.root()).collect();
    assert!(roots.windows(2).all(|w| w[0] == w[1]));
    for k in &missed {
        let values: Vec<&[u8]> = replicas[&pl.primaries[2]].objects[k].values().collect();
        assert_eq!(values, vec![b"v2".as_slice()]);
    }
}
