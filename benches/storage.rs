//! Criterion benches of the storage batch path: the core's store on redb as the node's
//! storage stage runs it (group commit: one commit-log record a batch, redb committing many
//! batches at once). Shows what a batch costs and how batching shares it, for `sync` (a
//! synchronous log write a batch) and `buffered` (the page cache) logs, and what a read
//! costs. Run: `cargo bench -p ringkv-storage --bench storage`.

use criterion::{black_box, criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use ringkv::config::Durability;
use ringkv::store::{StoreLimits, StoreOp};
use ringkv::version::{Actor, Object, VersionVector};
use ringkv_storage::Storage;

const KEYS: u64 = 10_000;

fn key(i: u64) -> Vec<u8> {
    format!("bench:{i:010}").into_bytes()
}

fn object(i: u64) -> Object {
    let mut o = Object::new();
    o.update(&VersionVector::new(), Actor(i % 3 + 1), Some(vec![b'x'; 100]), i, 10);
    o
}

fn open(mode: Durability) -> (tempfile::TempDir, Storage) {
    let dir = tempfile::tempdir().expect("temp dir");
    let opened = Storage::open(&dir.path().join("db.redb"), 64, StoreLimits::default(), mode, 1).expect("open");
    let mut s = opened.storage;
    for chunk in (0..KEYS).collect::<Vec<_>>().chunks(1000) {
        let ops = chunk.iter().map(|&i| StoreOp::Write { key: key(i), object: object(i), hint: None }).collect();
        s.run(ops, false, 1, &mut |_, _| {});
    }
    (dir, s)
}

fn writes(c: &mut Criterion) {
    let mut g = c.benchmark_group("storage/replica_writes_100B");
    for mode in [Durability::Sync, Durability::Buffered] {
        let (_dir, mut s) = open(mode);
        let mut i = 0u64;
        // Each write supersedes the key's last one, so every write changes its row.
        let mut objects: Vec<Object> = (0..KEYS).map(object).collect();
        let mut written = 0u64;
        for batch in [1u64, 8, 64] {
            g.throughput(Throughput::Elements(batch));
            g.bench_with_input(BenchmarkId::new(format!("{mode:?}").to_lowercase(), batch), &batch, |b, &n| {
                b.iter(|| {
                    let ops = (0..n)
                        .map(|_| {
                            i = (i + 7919) % KEYS;
                            written += 1;
                            let o = &mut objects[i as usize];
                            let context = o.context();
                            o.update(&context, Actor(7), Some(vec![b'y'; 100]), written, 10);
                            StoreOp::Write { key: key(i), object: o.clone(), hint: None }
                        })
                        .collect();
                    black_box(s.run(ops, false, 1, &mut |_, _| {}))
                })
            });
        }
    }
    g.finish();
}

fn reads(c: &mut Criterion) {
    let mut g = c.benchmark_group("storage/reads_100B");
    let (_dir, mut s) = open(Durability::Sync);
    let mut i = 0u64;
    for batch in [1u64, 8] {
        g.throughput(Throughput::Elements(batch));
        g.bench_with_input(BenchmarkId::from_parameter(batch), &batch, |b, &n| {
            b.iter(|| {
                let ops = (0..n)
                    .map(|_| {
                        i = (i + 7919) % KEYS;
                        StoreOp::Read { key: key(i) }
                    })
                    .collect();
                black_box(s.run(ops, false, 1, &mut |_, _| {}))
            })
        });
    }
    g.finish();
}

/// Row reads as a node's stage actors run them ([`ringkv_storage::Reader`]): of keys holding
/// about ten siblings (what `ringkv bench --workload a` leaves: ten blind writes per key
/// over 1000 keys in 20000 operations), from redb and from the rows of logged batches
/// still in memory (the overlay).
fn row_reads(c: &mut Criterion) {
    let mut g = c.benchmark_group("storage/row_reads_10_siblings");
    let (_dir, mut s) = open(Durability::Sync);
    // Nine more writes a key (ten siblings), each under its own actor and seeing none of the
    // others, committed in redb; then one more for the first keys, whose rows the overlay holds.
    const OVERLAID: u64 = 1000;
    for round in 0..10u64 {
        let keys = if round < 9 { KEYS } else { OVERLAID };
        for chunk in (0..keys).collect::<Vec<_>>().chunks(100) {
            let ops = chunk
                .iter()
                .map(|&i| {
                    let mut o = Object::new();
                    o.update(&VersionVector::new(), Actor(round + 10), Some(vec![b'z'; 100]), round, 10);
                    StoreOp::Write { key: key(i), object: o, hint: None }
                })
                .collect();
            s.run(ops, false, 1, &mut |_, _| {});
        }
        if round == 8 {
            s.settle().expect("settle");
        }
    }
    let reader = s.reader();
    for (place, from, to) in [("overlay", 0, OVERLAID), ("redb", OVERLAID, KEYS)] {
        let mut i = 0u64;
        g.bench_function(place, |b| {
            b.iter(|| {
                i = (i + 7919) % (to - from);
                black_box(reader.run(vec![StoreOp::Read { key: key(from + i) }], 1))
            })
        });
    }
    g.finish();
}

criterion_group!(benches, writes, reads, row_reads);
criterion_main!(benches);
