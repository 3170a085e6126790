//! Criterion benches of the core's hot paths: placement (MD5 + preference list), clock
//! merge, Merkle update and diff, and frame encode/decode.
//! Run: `cargo bench -p ringkv --bench core`.

use criterion::{black_box, criterion_group, criterion_main, BatchSize, Criterion};
use ringkv::merkle::{respond, DiffInitiator, DiffStep, MerkleTree};
use ringkv::ring::{NodeSpec, Ring};
use ringkv::version::{Actor, Object, VersionVector};
use ringkv::wire::ReplicaRequest;
use ringkv::wire::{decode_frame, encode_frame, Message, FRAME_BYTES_MAX_DEFAULT};

fn placement(c: &mut Criterion) {
    let members: Vec<NodeSpec> = (0..16).map(|i| NodeSpec::new(format!("n{i}"))).collect();
    let ring = Ring::new(1024, 3, &members).unwrap();
    let keys: Vec<Vec<u8>> = (0..1024u32).map(|i| format!("user:{i:08}").into_bytes()).collect();
    let mut i = 0;
    c.bench_function("placement/md5_partition_16B_key", |b| {
        b.iter(|| {
            i = (i + 1) % keys.len();
            black_box(ring.partition_for_key(&keys[i]))
        })
    });
    c.bench_function("placement/preference_list_n3_of_16_nodes_q1024", |b| {
        b.iter(|| {
            i = (i + 1) % keys.len();
            black_box(ring.preference_list(ring.partition_for_key(&keys[i]), 3))
        })
    });
    c.bench_function("placement/rebalance_add_17th_node_q1024", |b| {
        let mut bigger = members.clone();
        bigger.push(NodeSpec::new("n16"));
        b.iter(|| black_box(ring.rebalance(&bigger).unwrap()))
    });
}

fn diverged(writes: u64) -> (Object, Object) {
    let mut base = Object::new();
    for w in 0..writes {
        let ctx = base.context();
        base.update(&ctx, Actor(w % 5), Some(vec![0; 100]), w, 10);
    }
    let (mut a, mut b) = (base.clone(), base.clone());
    a.update(&VersionVector::new(), Actor(1), Some(vec![1; 100]), 100, 10);
    b.update(&VersionVector::new(), Actor(2), Some(vec![2; 100]), 101, 10);
    (a, b)
}

fn clocks(c: &mut Criterion) {
    let (a, b) = diverged(20);
    c.bench_function("version/merge_two_siblings_5_actors", |bch| bch.iter(|| black_box(a.merge(&b))));
    let ctx = a.context();
    c.bench_function("version/update_with_context", |bch| {
        bch.iter_batched(
            || a.clone(),
            |mut o| black_box(o.update(&ctx, Actor(3), Some(vec![0; 100]), 200, 10)),
            BatchSize::SmallInput,
        )
    });
    c.bench_function("version/digest", |bch| bch.iter(|| black_box(a.digest())));
}

fn merkle(c: &mut Criterion) {
    let mut tree = MerkleTree::new();
    let keys: Vec<Vec<u8>> = (0..10_000u32).map(|i| i.to_be_bytes().to_vec()).collect();
    for k in &keys {
        tree.insert(k, &[1; 16]);
    }
    let mut i = 0;
    c.bench_function("merkle/update_one_key", |b| {
        b.iter(|| {
            i = (i + 1) % keys.len();
            tree.update(&keys[i], Some(&[1; 16]), Some(&[2; 16]));
            tree.update(&keys[i], Some(&[2; 16]), Some(&[1; 16]));
        })
    });
    let mut other = tree.clone();
    for k in keys.iter().step_by(1000) {
        other.update(k, Some(&[1; 16]), Some(&[3; 16]));
    }
    c.bench_function("merkle/diff_10k_keys_10_differ", |b| {
        b.iter(|| {
            let mut init = DiffInitiator::new(tree.clone());
            let mut step = init.start();
            loop {
                match step {
                    DiffStep::Send(req) => step = init.handle_reply(&respond(&other, &req)).unwrap(),
                    DiffStep::Done(leaves) => break black_box(leaves),
                }
            }
        })
    });
}

fn wire(c: &mut Criterion) {
    let (a, _) = diverged(3);
    let request = ReplicaRequest::Write { key: b"user:00000001".to_vec(), object: a, hint: None };
    let msg = Message::Replica { id: 42, request };
    c.bench_function("wire/encode_replica_write_100B", |b| b.iter(|| black_box(encode_frame(&msg).unwrap())));
    let frame = encode_frame(&msg).unwrap();
    c.bench_function("wire/decode_replica_write_100B", |b| {
        b.iter(|| black_box(decode_frame(&frame, FRAME_BYTES_MAX_DEFAULT).unwrap()))
    });
}

criterion_group!(benches, placement, clocks, merkle, wire);
criterion_main!(benches);
