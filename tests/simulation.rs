//! A deterministic simulation of whole ringkv clusters. Each node is the node's own composed
//! core ([`LocalNode`], every stage wired by the same routing the node process uses), built
//! from its config with [`NodeSettings::from_config`], and its storage is the node's store
//! layout ([`StoreState`]) over a fault-injecting wrapper of [`MemEngine`]. Nothing of the
//! protocol lives here: only the harness, the clients and the checks.
//!
//! Modes drawn per seed: half the seeds sign member records (as certificates do; leaves go
//! to the leaver), a third run buffered storage (a crash loses what was committed since the
//! node's last durable commit, made every 100 ms or by an operation that must be durable:
//! each put's coordinating replica, handoff merges). `RINGKV_SIM_SIGNED=0|1` and
//! `RINGKV_SIM_BUFFERED=0|1` force a mode.
//!
//! The harness: a seeded network that drops, delays, duplicates, reorders and partitions
//! messages, each of which crosses the real codec; a virtual clock; a storage executor that
//! commits queued operations in batches (group commit) and injects failed transactions,
//! batches lost to a crash before their acknowledgement, read errors and corrupted rows;
//! crashes, restarts and wiped disks; a node joining; a member leaving. Its operator stops a
//! node for good (data and all) once it counts itself left and another member has heard
//! so; after heal it repeats a leave the cluster lost (one accepted only by a node whose disk
//! was then wiped), and provisions a stopped node again, blank, to leave again if every disk
//! that knew it left was wiped since (no command can mark a node that does not run as left).
//!
//! Clients write keys of the default namespace and of two namespaces the run creates on one
//! node (learned by the others through gossip): one with N=1, one with N=2 and
//! last-write-wins; the checks hold each key to its namespace's N (an lww write counts as
//! superseding all its coordinating replica held).
//!
//! Each run is a chaos phase with clients writing, then heal, then quiet time for gossip,
//! handoff, anti-entropy and reaping, then the checks:
//! - no acknowledged write is lost: it is present on the key's primaries, or each dot it was
//!   written under was superseded (a write's context covered it) or had every copy destroyed
//!   by at least W wipes (or corrupted rows; buffered: one, as only the coordinating
//!   replica's copy is durable);
//! - no acknowledged delete is undone: nothing its acknowledged context covers is back, but
//!   for the concurrent values its own result kept, unless every copy of the tombstone (any
//!   clock or reaped record that saw it) was destroyed the same way;
//! - every partition's primaries have equal Merkle roots (each namespace's tree among its N), one ring epoch everywhere, leavers
//!   are left in every view, no hints held, no partition held by a node that does not
//!   replicate it, no tombstone older than the grace period (plus 5 s) left, and no leaver
//!   counted itself left while it still held data;
//! - siblings bounded for read-modify-write clients.
//!
//! `cargo test --test simulation` runs a default number of seeds; `RINGKV_SIM_SEEDS=N`
//! runs N; `RINGKV_SIM_SEED=S` replays one seed and prints its trace (`RINGKV_SIM_TRACE=msgs`
//! adds every message and storage write); `RINGKV_SIM_SCENARIO` replays with a planted
//! defect or fixed fault rates (see [`scenario_from_env`]). A failure names its seed.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap, VecDeque};

use ringkv::access::Role;
use ringkv::config::Config;
use ringkv::handoff::Planted;
use ringkv::membership::{MemberState, RecordSignature, RecordSigner, Signer};
use ringkv::namespace::{class_of, Namespace, Resolution};
use ringkv::node::{LocalNode, NodeSettings};
use ringkv::ring::NodeId;
use ringkv::stage::{Dest, Effect, Input, Now, Origin, StageId};
use ringkv::store::{
    decode_hint_row, decode_object_row, unseal, Engine, EngineError, MemEngine, MemStore, MemTxn, ReadOnly, ReapedRow,
    StoreError, StoreOp, StoreOutcome, StoreState, Table, TreeId, Visit,
};
use ringkv::version::{Dot, Object, VersionVector};
use ringkv::wire::{AeMessage, Bytes, ClientRequest, ClientResponse, ErrorKind, Message, ReplicaRequest};

const Q: u32 = 16;
const N: usize = 3;
const TICK_MS: u64 = 10;
const REQUEST_MS: u64 = 2000;
/// How long a sender takes to learn that a peer it dialled is down or cut off.
const FAIL_NOTICE_MS: u64 = 150;
/// Tombstones younger than this are kept (`storage.tombstone_grace_ms`).
const GRACE_MS: u64 = 2000;
/// Wall-clock time at virtual time 0.
const WALL_BASE_MS: u64 = 1_700_000_000_000;
/// Connection ids at and above this are clients': client index in bits 32.., op id below.
const CLIENT_CONN: u64 = 1 << 60;
/// The client index of the operator's admin requests.
const ADMIN: u64 = 0xffff;
/// The client id of the reads made once the cluster converged.
const FINAL_READER: u64 = 0xfffe;
/// Acknowledged keys read through the coordinators once the cluster converged.
const FINAL_READS_MAX: usize = 64;
/// Most operations one storage batch commits (`storage.commit_batch_max`).
const BATCH_MAX: usize = 256;
/// Buffered mode: a node's commits become durable this often (storage.flush_interval_ms).
const FLUSH_MS: u64 = 100;
/// Most a client waits between two operations: 30 operations spread over the chaos phase.
const THINK_MS: u64 = 400;
/// Events one run may process before it is declared stuck.
const EVENTS_MAX: u64 = 30_000_000;

/// SplitMix64: the simulation's only source of randomness.
#[derive(Clone)]
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e3779b97f4a7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58476d1ce4e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d049bb133111eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    fn chance(&mut self, p: f64) -> bool {
        p > 0.0 && ((self.next() >> 11) as f64 / (1u64 << 53) as f64) < p
    }
}

/// Node `i`'s config: what an operator would write, with fast timers; `buffered` storage or
/// `sync` (the node's rules differ: who commits durably, whether puts replicate ahead).
fn config(i: usize, buffered: bool) -> Config {
    let durability = if buffered { "buffered" } else { "sync" };
    let text = format!(
        "[node]\nid = \"n{i}\"\nlisten = \"10.0.0.{i}:1\"\ndata_dir = \"/var/lib/ringkv\"\n\
         seeds = [\"10.0.0.1:1\", \"10.0.0.2:1\"]\n\
         [cluster]\nname = \"sim\"\nsecret = \"s3cret\"\npartitions = {Q}\nreplicas = {N}\n\
         [storage]\ndurability = \"{durability}\"\ntombstone_grace_ms = {GRACE_MS}\nreaped_retention_ms = 3600000\ncommit_batch_max = {BATCH_MAX}\n\
         [gossip]\ninterval_ms = 100\n\
         [failure_detector]\nprobe_interval_ms = 100\nprobe_interval_max_ms = 1000\n\
         [coordinator]\nrequest_timeout_ms = {REQUEST_MS}\nreplica_timeout_ms = 300\n\
         [handoff]\ninterval_ms = 300\n\
         [anti_entropy]\ninterval_ms = 500\nmax_inflight = 2\n"
    );
    Config::parse(&text).expect("the simulation's config is valid")
}

/// A write transaction whose puts fail (an I/O error, a full disk): the batch must fail
/// whole and change nothing.
struct FaultyTxn<'a> {
    txn: MemTxn<'a>,
    fail_puts: bool,
}

impl Engine for FaultyTxn<'_> {
    fn get(&self, table: Table, key: &[u8]) -> Result<Option<Vec<u8>>, EngineError> {
        self.txn.get(table, key)
    }
    fn put(&mut self, table: Table, key: &[u8], value: &[u8]) -> Result<(), EngineError> {
        if self.fail_puts {
            return Err(EngineError("injected: no space left on device".into()));
        }
        self.txn.put(table, key, value)
    }
    fn delete(&mut self, table: Table, key: &[u8]) -> Result<(), EngineError> {
        self.txn.delete(table, key)
    }
    fn scan(&self, table: Table, from: &[u8], to: Option<&[u8]>, visit: Visit<'_>) -> Result<(), EngineError> {
        self.txn.scan(table, from, to, visit)
    }
}

#[derive(Debug)]
enum Event {
    /// A message on the wire. `to_inc` is the incarnation it was sent to: a restart breaks
    /// the connection. `notify` is set when it was sent to a node by id (a dial whose
    /// failure the sender hears of).
    Deliver {
        from: usize,
        from_inc: u64,
        to: usize,
        to_inc: u64,
        msg: Message,
        notify: Option<NodeId>,
    },
    /// The sender learns it could not reach `peer`.
    Unreachable {
        node: usize,
        inc: u64,
        peer: NodeId,
    },
    Tick {
        node: usize,
        inc: u64,
    },
    /// The node's storage commits what is queued.
    Flush {
        node: usize,
        inc: u64,
    },
    ClientStep {
        client: usize,
    },
    ClientReply {
        client: usize,
        op: u64,
        response: ClientResponse,
    },
    ClientTimeout {
        client: usize,
        op: u64,
    },
    Restart {
        node: usize,
    },
}

/// A queued storage operation: the stage and token its result goes back to (None for a
/// follow-up the executor itself runs, such as quarantining a row a read batch found bad).
/// A storage operation waiting for a batch: who asked, the operation, whether it must be
/// durable (buffered mode).
type Queued = (Option<(StageId, u64)>, StoreOp, bool);

struct SimNode {
    id: NodeId,
    addr: String,
    settings: NodeSettings,
    /// The engine persists across crashes; the state beside it is rebuilt at every boot.
    store: MemStore,
    /// Buffered mode: the engine as last made durable; a crash goes back to it.
    durable: MemEngine,
    last_flush_ms: u64,
    node: Option<LocalNode>,
    incarnation: u64,
    queue: VecDeque<Queued>,
    flush_scheduled: bool,
    /// Left and stopped by its operator for good.
    removed: bool,
}

/// A write a client has in flight: key, value (None: a delete), W, and the context it was
/// written with.
type PendingWrite = (String, Option<Vec<u8>>, usize, Option<String>);

#[derive(Clone, Copy, Debug, PartialEq)]
enum ClientKind {
    Blind,
    ReadModifyWrite,
}

struct Client {
    kind: ClientKind,
    keys: Vec<String>,
    /// The op in flight: id, and for a read-modify-write, the write to do after the read.
    op: Option<(u64, Option<PendingWrite>)>,
    next_op: u64,
    writes_left: u32,
}

/// Faults on during chaos.
#[derive(Clone, Copy, Debug)]
struct Faults {
    loss: f64,
    duplicate: f64,
    delay_max_ms: u64,
    /// Crashes per node per second, and the chance a crash wipes the disk.
    crash: f64,
    wipe: f64,
    /// Splits (or heals) per second.
    partition: f64,
    /// Per write batch: the transaction fails.
    txn_fail: f64,
    /// Per write batch: the node crashes right after running it, before any acknowledgement.
    batch_crash: f64,
    /// Per operation: a read error.
    read_error: f64,
    /// Rows corrupted per node per second.
    corrupt: f64,
}

const CALM: Faults = Faults {
    loss: 0.0,
    duplicate: 0.0,
    delay_max_ms: 3,
    crash: 0.0,
    wipe: 0.0,
    partition: 0.0,
    txn_fail: 0.0,
    batch_crash: 0.0,
    read_error: 0.0,
    corrupt: 0.0,
};

/// A deliberately broken harness, to show the checks can fail.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Bug {
    None,
    /// The client hears "written" as soon as the coordinating replica stored the write.
    AckAfterLocalWrite,
    /// A store keeps numbering writes under its old actors after a crash or a failed commit,
    /// though writes it sent on ahead of the lost commit carry dots it will issue again.
    ActorsKept,
}

/// How a run is set up beyond its seed.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Scenario {
    bug: Bug,
    planted: Planted,
    /// Many crashes, most of them wiping.
    harsh: bool,
    /// Always make a member leave: the one holding the most hints.
    force_leave: bool,
    /// Fixed rates instead of drawn ones: crashes per node per second, the share of them
    /// that wipe, message loss, splits per second.
    crash: Option<f64>,
    wipe: Option<f64>,
    loss: Option<f64>,
    partition: Option<f64>,
    /// Crashes right after a storage batch, per batch.
    batch_crash: Option<f64>,
    /// Failed storage transactions, per batch.
    txn_fail: Option<f64>,
    /// When the forced leave is asked for (8 s into the run otherwise).
    leave_at: Option<u64>,
}

const NORMAL: Scenario = Scenario {
    bug: Bug::None,
    planted: Planted::None,
    harsh: false,
    force_leave: false,
    crash: None,
    wipe: None,
    loss: None,
    partition: None,
    batch_crash: None,
    txn_fail: None,
    leave_at: None,
};

/// Storage faults injected, by kind.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
struct StorageFaults {
    failed_txns: u64,
    lost_batches: u64,
    read_errors: u64,
    corrupted_rows: u64,
}

/// Copies of data somewhere: sibling dots, and the clocks that remember a key's history
/// (objects, hints, reaped records).
#[derive(Default)]
struct Copies {
    dots: BTreeSet<(Vec<u8>, Dot)>,
    clocks: BTreeMap<Vec<u8>, Vec<VersionVector>>,
}

impl Copies {
    fn add(&mut self, key: &[u8], o: &Object) {
        for s in o.siblings() {
            self.dots.insert((key.to_vec(), s.dot));
        }
        self.clocks.entry(key.to_vec()).or_default().push(o.clock().clone());
    }

    fn add_clock(&mut self, key: &[u8], clock: VersionVector) {
        self.clocks.entry(key.to_vec()).or_default().push(clock);
    }

    fn add_store(&mut self, store: &MemStore) {
        for (k, o) in store.objects() {
            self.add(&k, &o);
        }
        for (_, k, o) in store.hints() {
            self.add(&k, &o);
        }
        for (k, clock) in reaped_rows(&store.engine) {
            self.add_clock(&k, clock);
        }
    }

    /// Whether a tracked write survives here: a value by its sibling, a delete by any clock
    /// that has seen its tombstone (a later write, a reaped record).
    fn holds(&self, key: &[u8], dot: Dot, tomb: bool) -> bool {
        if tomb {
            self.clocks.get(key).is_some_and(|cs| cs.iter().any(|c| c.covers(dot)))
        } else {
            self.dots.contains(&(key.to_vec(), dot))
        }
    }
}

fn reaped_rows(engine: &MemEngine) -> Vec<(Vec<u8>, VersionVector)> {
    engine
        .rows(Table::Reaped)
        .filter_map(|(k, v)| Some((k.get(4..)?.to_vec(), unseal::<ReapedRow>(v).ok()?.clock)))
        .collect()
}

/// The (key, object) pairs a stored row holds, if it decodes.
fn row_copies(table: Table, row_key: &[u8], bytes: &[u8]) -> Option<(Vec<u8>, Object)> {
    match table {
        Table::Objects => Some((row_key.get(4..)?.to_vec(), decode_object_row(bytes).ok()?.object)),
        Table::Hints => {
            let len = u32::from_be_bytes(row_key.get(..4)?.try_into().ok()?) as usize;
            Some((row_key.get(4..4 + len)?.to_vec(), decode_hint_row(bytes).ok()?.object))
        }
        _ => None,
    }
}

/// Objects a message carries, by key.
fn message_copies(msg: &Message, copies: &mut Copies) {
    match msg {
        Message::Replica { request: ReplicaRequest::Write { key, object, .. }, .. } => copies.add(key, object),
        Message::Handoff { objects, .. }
        | Message::AntiEntropy { msg: AeMessage::Push { objects, .. } | AeMessage::Page { objects, .. }, .. } => {
            for (k, o) in objects {
                copies.add(k, o);
            }
        }
        _ => {}
    }
}

fn op_copies(op: &StoreOp, copies: &mut Copies) {
    match op {
        StoreOp::Write { key, object, .. } => copies.add(key, object),
        StoreOp::Merge { objects } => {
            for (k, o) in objects {
                copies.add(k, o);
            }
        }
        _ => {}
    }
}

/// The dots a coordinated write got: siblings with the written value (None: a tombstone)
/// that the write's context had not seen, stamped by this write and newest of their actor.
/// The namespaces every run creates (through an admin request, then gossip): one with N=1,
/// one with N=2 and last-write-wins. Clients name their keys `NAME/KEY`.
fn namespaces() -> &'static [Namespace] {
    static DEFINED: std::sync::LazyLock<Vec<Namespace>> = std::sync::LazyLock::new(|| {
        vec![
            Namespace::create("one", 1, 1, 1, Resolution::Siblings, N, 0, "n1").expect("a valid definition"),
            Namespace::create("last", 2, 1, 1, Resolution::Lww, N, 0, "n1").expect("a valid definition"),
        ]
    });
    &DEFINED
}

/// A client's key as the store holds it: `NAME/KEY` under its namespace's prefix.
fn store_key(key: &str) -> Vec<u8> {
    match key.split_once('/') {
        Some((ns, k)) => match namespaces().iter().find(|d| d.name == ns) {
            Some(d) => d.store_key(k.as_bytes()),
            None => key.as_bytes().to_vec(),
        },
        None => key.as_bytes().to_vec(),
    }
}

/// A client's key as a request names it: its namespace, if any, and the key within it.
fn request_key(key: &str) -> (Option<String>, Bytes) {
    match key.split_once('/') {
        Some((ns, k)) => (Some(ns.to_string()), Bytes::from(k.as_bytes().to_vec())),
        None => (None, Bytes::from(key.as_bytes().to_vec())),
    }
}

/// The merged state of a client's key on its primaries in `ring`.
fn replicas_merged(sim: &Sim, ring: &ringkv::ring::Ring, key: &str) -> Object {
    let stored = store_key(key);
    ring.preference_list(ring.partition_for_key(&stored), n_of(key))
        .primaries
        .iter()
        .filter_map(|id| sim.nodes[sim.index_of(id).expect("member")].store.object(&stored))
        .fold(Object::new(), |a, o| a.merge(&o))
}

/// A stored key as clients name it.
fn sim_key(stored: &[u8]) -> String {
    let class = class_of(stored);
    let rest = String::from_utf8_lossy(&stored[class.prefix.len()..]).into_owned();
    match class.n {
        Some(_) => format!("{}/{rest}", ringkv::namespace::name_of_prefix(class.prefix)),
        None => rest,
    }
}

/// N of a client's key.
fn n_of(key: &str) -> usize {
    class_of(&store_key(key)).n_or(N)
}

/// What an lww write superseded: everything its result's clock covers but its own dot.
fn lww_superseded(o: &Object, dots: &[Dot]) -> VersionVector {
    let mut v = VersionVector::new();
    for (actor, e) in o.clock().iter() {
        let own = dots.iter().any(|d| d.actor == actor && d.counter == e.counter);
        let counter = if own { e.counter - 1 } else { e.counter };
        if counter > 0 {
            v.witness(actor, counter, e.timestamp_ms);
        }
    }
    v
}

fn new_dots(o: &Object, context: &VersionVector, value: &Option<Vec<u8>>, wall_ms: u64) -> Vec<Dot> {
    o.siblings()
        .iter()
        .filter(|s| s.value == *value && !context.covers(s.dot))
        .filter(|s| s.timestamp_ms == wall_ms && o.clock().get(s.dot.actor) == s.dot.counter)
        .map(|s| s.dot)
        .collect()
}

struct Sim {
    seed: u64,
    now: u64,
    seq: u64,
    rng: Rng,
    queue: BinaryHeap<Reverse<(u64, u64)>>,
    events: BTreeMap<u64, Event>,
    processed: u64,
    nodes: Vec<SimNode>,
    clients: Vec<Client>,
    faults: Faults,
    /// Partition groups while split: node index -> group.
    split: Option<Vec<u8>>,
    trace: bool,
    trace_messages: bool,
    scenario: Scenario,
    /// Something the harness itself found wrong (a codec failure, a storage result missing).
    broken: Option<String>,
    // Bookkeeping for the checks.
    /// Acknowledged writes: key, value, W, and the context the acknowledgement returned.
    acked: Vec<(String, Vec<u8>, usize, VersionVector)>,
    /// Acknowledged deletes: key, W, the context the delete was written with, the context
    /// its acknowledgement returned.
    acked_deletes: Vec<(String, usize, VersionVector, VersionVector)>,
    /// Nodes that lost a copy of a tracked write to a wipe or a corrupted row.
    wiped_holders: BTreeMap<(Vec<u8>, Dot), BTreeSet<usize>>,
    /// Tracked writes every copy of which was destroyed: how many nodes had lost one.
    destroyed: BTreeMap<(Vec<u8>, Dot), usize>,
    /// (key, value) -> the dots it was written under (a duplicated request may make two).
    dots_of: BTreeMap<(String, Vec<u8>), Vec<Dot>>,
    /// key -> dots of its committed tombstones.
    tombs: BTreeMap<String, Vec<Dot>>,
    /// (key, tombstone dot) -> the siblings the delete's own result kept (concurrent writes
    /// its context had not seen, which it does not delete).
    kept_by: BTreeMap<(String, Dot), Vec<Dot>>,
    /// key -> the contexts of every committed coordinated write.
    contexts: BTreeMap<String, Vec<VersionVector>>,
    rmw_keys: BTreeSet<String>,
    /// Writes between request and answer: (client, op) -> the write.
    pending_value: BTreeMap<(usize, u64), PendingWrite>,
    /// Leave requests in flight: admin op -> node.
    leave_requests: BTreeMap<u64, NodeId>,
    /// The answers to the final reads, by op.
    final_answers: BTreeMap<u64, ClientResponse>,
    next_admin: u64,
    /// Nodes told to leave.
    left: Vec<NodeId>,
    /// Leavers that were stopped still holding data (reported after the other checks, so a
    /// write lost with it is named first).
    left_holding: Vec<String>,
    wipes: u64,
    storage_faults: StorageFaults,
    /// Tombstones reaped by incarnations that are gone.
    reaped: u64,
    /// Member records signed by their owners (as with certificates): half the seeds.
    signed: bool,
    /// Buffered storage: a crash loses what was committed since the last durable commit
    /// (each put's coordinating replica commits it durably): a third of the seeds.
    buffered: bool,
}

impl Sim {
    fn new(seed: u64, nodes: usize, trace: bool, scenario: Scenario) -> Sim {
        let mut sim = Sim {
            seed,
            now: 0,
            seq: 0,
            rng: Rng(seed),
            queue: BinaryHeap::new(),
            events: BTreeMap::new(),
            processed: 0,
            nodes: Vec::new(),
            clients: Vec::new(),
            faults: CALM,
            split: None,
            trace,
            trace_messages: trace && std::env::var("RINGKV_SIM_TRACE").is_ok_and(|v| v == "msgs"),
            scenario,
            broken: None,
            acked: Vec::new(),
            acked_deletes: Vec::new(),
            wiped_holders: BTreeMap::new(),
            destroyed: BTreeMap::new(),
            dots_of: BTreeMap::new(),
            tombs: BTreeMap::new(),
            kept_by: BTreeMap::new(),
            contexts: BTreeMap::new(),
            rmw_keys: BTreeSet::new(),
            pending_value: BTreeMap::new(),
            leave_requests: BTreeMap::new(),
            final_answers: BTreeMap::new(),
            next_admin: 1,
            left: Vec::new(),
            left_holding: Vec::new(),
            wipes: 0,
            storage_faults: StorageFaults::default(),
            reaped: 0,
            signed: false,
            buffered: false,
        };
        sim.signed = sim.rng.chance(0.5);
        // RINGKV_SIM_SIGNED=0|1 forces the mode (the draw above still happens, so a seed's run
        // is otherwise the same).
        match std::env::var("RINGKV_SIM_SIGNED").as_deref() {
            Ok("0") => sim.signed = false,
            Ok("1") => sim.signed = true,
            _ => {}
        }
        sim.log(|| format!("member records signed: {}", sim.signed));
        sim.buffered = sim.rng.chance(1.0 / 3.0);
        match std::env::var("RINGKV_SIM_BUFFERED").as_deref() {
            Ok("0") => sim.buffered = false,
            Ok("1") => sim.buffered = true,
            _ => {}
        }
        sim.log(|| format!("buffered storage: {}", sim.buffered));
        for _ in 0..nodes {
            sim.add_node();
        }
        sim
    }

    fn log(&self, what: impl FnOnce() -> String) {
        if self.trace {
            println!("[{:>7} ms] {}", self.now, what());
        }
    }

    fn now(&self) -> Now {
        Now { mono_ms: self.now, wall_ms: WALL_BASE_MS + self.now }
    }

    fn schedule(&mut self, delay: u64, e: Event) {
        self.seq += 1;
        self.events.insert(self.seq, e);
        self.queue.push(Reverse((self.now + delay, self.seq)));
    }

    fn fail(&mut self, what: String) {
        if self.broken.is_none() {
            self.log(|| format!("HARNESS: {what}"));
            self.broken = Some(what);
        }
    }

    fn add_node(&mut self) -> usize {
        let i = self.nodes.len();
        let mut settings = NodeSettings::from_config(&config(i + 1, self.buffered));
        settings.handoff.planted = self.scenario.planted;
        if self.signed {
            let signer = SimSigner(settings.identity.id.clone());
            settings.identity.signer = Some(Signer(std::sync::Arc::new(signer)));
        }
        let store = MemStore::new(Q, settings.store, self.rng.next());
        self.nodes.push(SimNode {
            id: settings.identity.id.clone(),
            addr: settings.identity.addr.clone(),
            settings,
            durable: store.engine.clone(),
            last_flush_ms: 0,
            store,
            node: None,
            incarnation: 0,
            queue: VecDeque::new(),
            flush_scheduled: false,
            removed: false,
        });
        self.boot(i);
        i
    }

    fn is_up(&self, i: usize) -> bool {
        self.nodes[i].node.is_some()
    }

    /// Start node `i` from what its disk holds, as the node process does.
    fn boot(&mut self, i: usize) {
        let fresh_epoch = self.rng.next();
        let now = self.now();
        let n = &mut self.nodes[i];
        n.incarnation += 1;
        let mut txn = n.store.engine.begin();
        let (mut state, report) = match StoreState::open(&mut txn, Q, n.settings.store, fresh_epoch) {
            Ok(x) => x,
            Err(e) => {
                drop(txn);
                let id = n.id.clone();
                return self.fail(format!("{id} cannot open its store: {e}"));
            }
        };
        // As the node does: a store that was not closed retires its actors.
        let keep_actors = self.scenario.bug == Bug::ActorsKept;
        if let Err(e) = if keep_actors { Ok(false) } else { state.start(&mut txn) } {
            drop(txn);
            let id = n.id.clone();
            return self.fail(format!("{id} cannot start its store: {e}"));
        }
        txn.commit();
        n.store.state = state;
        n.durable = n.store.engine.clone();
        n.last_flush_ms = self.now;
        let saved = match StoreState::load_saved(&n.store.engine) {
            Ok(m) => m,
            Err(e) => {
                let id = n.id.clone();
                return self.fail(format!("{id} cannot read its saved members: {e}"));
            }
        };
        n.queue.clear();
        n.flush_scheduled = false;
        n.node = Some(LocalNode::new(&n.settings, saved, now));
        let (inc, id) = (n.incarnation, n.id.clone());
        self.log(|| format!("boot {id} (incarnation {inc}, store {report:?})"));
        let jitter = self.rng.below(TICK_MS);
        self.schedule(jitter, Event::Tick { node: i, inc });
        self.pump(i);
    }

    /// Retire a node's volatile state (its reaping count goes to the run's total).
    fn stop(&mut self, i: usize) {
        if let Some(n) = self.nodes[i].node.take() {
            self.reaped += n.stages.handoff.reaped();
        }
        self.nodes[i].queue.clear();
        self.nodes[i].flush_scheduled = false;
    }

    fn crash(&mut self, i: usize, wipe: bool) {
        self.log(|| format!("crash {} (wipe: {wipe})", self.nodes[i].id));
        self.stop(i);
        if !wipe && self.buffered {
            // What was committed since the last durable commit is gone: not a wipe (it
            // counts for no write's loss allowance), but perhaps the last copy of a write.
            let n = &mut self.nodes[i];
            n.store.engine = n.durable.clone();
            self.note_destroyed();
        }
        if wipe {
            self.nodes[i].durable = MemEngine::new();
            self.wipes += 1;
            let mut here = Copies::default();
            here.add_store(&self.nodes[i].store);
            self.note_holders(i, &here);
            self.nodes[i].store.engine = MemEngine::new();
            self.note_destroyed();
        }
    }

    /// The operator stops a node that has left, for good: its data goes with it.
    fn remove(&mut self, i: usize) {
        self.log(|| {
            let (objects, hints) =
                (self.nodes[i].store.engine.len(Table::Objects), self.nodes[i].store.engine.len(Table::Hints));
            format!(
                "operator stops {}, which has left ({objects} objects and {hints} hints go with it)",
                self.nodes[i].id
            )
        });
        if self.trace {
            // Which of the writes it held exist nowhere else.
            let hints = self.nodes[i].store.hints();
            let engine = std::mem::take(&mut self.nodes[i].store.engine);
            let elsewhere = self.live_copies();
            self.nodes[i].store.engine = engine;
            for (intended, k, o) in hints {
                let only: Vec<Dot> =
                    o.siblings().iter().map(|s| s.dot).filter(|d| !elsewhere.holds(&k, *d, false)).collect();
                self.log(|| {
                    format!(
                        "  hint for {intended}: {} {:?}, only copy of {only:?}",
                        String::from_utf8_lossy(&k),
                        o.values().map(String::from_utf8_lossy).collect::<Vec<_>>()
                    )
                });
            }
        }
        // A node counts itself left only once it holds nothing: what it still holds would
        // leave the cluster with it.
        let (objects, hints) = (self.nodes[i].store.objects().len(), self.nodes[i].store.hints().len());
        if objects + hints > 0 {
            let id = &self.nodes[i].id;
            self.left_holding
                .push(format!("{id} counted itself left while it held {objects} objects and {hints} hints"));
        }
        self.stop(i);
        self.nodes[i].removed = true;
        // Its disk goes too (a new one would open with a fresh epoch).
        self.nodes[i].store.engine = MemEngine::new();
        self.nodes[i].durable = MemEngine::new();
    }

    fn tracked(&self) -> Vec<(Vec<u8>, Dot, bool)> {
        let values = self.dots_of.iter().flat_map(|((k, _), ds)| ds.iter().map(move |d| (store_key(k), *d, false)));
        let tombs = self.tombs.iter().flat_map(|(k, ds)| ds.iter().map(move |d| (store_key(k), *d, true)));
        values.chain(tombs).collect()
    }

    /// Node `i` is about to lose `here`: note it held the tracked writes found there.
    fn note_holders(&mut self, i: usize, here: &Copies) {
        for (k, d, tomb) in self.tracked() {
            if here.holds(&k, d, tomb) {
                self.wiped_holders.entry((k, d)).or_default().insert(i);
            }
        }
    }

    /// Every copy that still exists: in some store, in a storage queue, on the wire.
    fn live_copies(&self) -> Copies {
        let mut c = Copies::default();
        for n in &self.nodes {
            c.add_store(&n.store);
            for (_, op, _) in &n.queue {
                op_copies(op, &mut c);
            }
        }
        for e in self.events.values() {
            if let Event::Deliver { msg, .. } = e {
                message_copies(msg, &mut c);
            }
        }
        c
    }

    /// After a wipe or a corrupted row: tracked writes none of whose copies survive.
    fn note_destroyed(&mut self) {
        let live = self.live_copies();
        for (k, d, tomb) in self.tracked() {
            let kd = (k, d);
            if !self.destroyed.contains_key(&kd) && !live.holds(&kd.0, d, tomb) {
                let wipes = self.wiped_holders.get(&kd).map_or(0, BTreeSet::len);
                self.destroyed.insert(kd, wipes);
            }
        }
    }

    /// Flip a byte of a random owned or hinted row of node `i`.
    fn corrupt_row(&mut self, i: usize) {
        let table = if self.rng.chance(0.5) { Table::Objects } else { Table::Hints };
        let rows: Vec<(Vec<u8>, Vec<u8>)> =
            self.nodes[i].store.engine.rows(table).map(|(k, v)| (k.to_vec(), v.to_vec())).collect();
        if rows.is_empty() {
            return;
        }
        let (row_key, mut bytes) = rows[self.rng.below(rows.len() as u64) as usize].clone();
        let mut here = Copies::default();
        if let Some((k, o)) = row_copies(table, &row_key, &bytes) {
            here.add(&k, &o);
        }
        let at = self.rng.below(bytes.len() as u64) as usize;
        bytes[at] ^= 1 + self.rng.below(255) as u8;
        self.log(|| format!("corrupt a row of {} in {}", table.name(), self.nodes[i].id));
        self.storage_faults.corrupted_rows += 1;
        self.note_holders(i, &here);
        self.nodes[i].store.engine.poke(table, &row_key, bytes);
        self.note_destroyed();
    }

    fn index_of(&self, id: &str) -> Option<usize> {
        self.nodes.iter().position(|n| n.id == id)
    }

    fn connected(&self, a: usize, b: usize) -> bool {
        self.split.as_ref().is_none_or(|g| g.get(a).copied().unwrap_or(0) == g.get(b).copied().unwrap_or(0))
    }

    /// The connection id a message from node `i`'s incarnation `inc` arrives on (replies
    /// go back on it, to that incarnation only).
    fn conn_of(i: usize, inc: u64) -> u64 {
        (inc << 8) | i as u64
    }

    /// Carry out node `i`'s effects until it has none. Row reads run at once in a read
    /// snapshot of the committed store, beside the write queue, as the node runs them;
    /// their results go in when the node has no effect left.
    fn pump(&mut self, i: usize) {
        let mut read = VecDeque::new();
        for _ in 0..1_000_000 {
            let now = self.now();
            let Some(node) = self.nodes[i].node.as_mut() else { return };
            let Some((stage, effect)) = node.poll_effect() else {
                let Some((stage, input)) = read.pop_front() else { return };
                node.input(now, stage, input);
                continue;
            };
            match effect {
                Effect::Send { to, msg } => self.send(i, to, msg),
                Effect::Store { token, op, .. } if op.reads_rows_only() => {
                    let result = self.read_now(i, op);
                    read.push_back((stage, Input::Stored { token, result }));
                }
                Effect::Store { token, op, durable } => self.enqueue(i, Some((stage, token)), op, durable),
                Effect::Signal(_) | Effect::Peers(_) | Effect::Block(_) => {}
            }
        }
        let id = self.nodes[i].id.clone();
        self.fail(format!("{id} never stops producing effects"));
    }

    /// An injected read error for one storage operation, at the run's rate (counted).
    fn read_error(&mut self) -> Option<StoreError> {
        if !self.rng.chance(self.faults.read_error) {
            return None;
        }
        self.storage_faults.read_errors += 1;
        Some(StoreError::Io("injected: read error".into()))
    }

    /// Run a row read on node `i`'s committed store now; unreadable rows it finds are queued
    /// for quarantine. Reads fail as injected.
    fn read_now(&mut self, i: usize, op: StoreOp) -> Result<StoreOutcome, StoreError> {
        if let Some(e) = self.read_error() {
            return Err(e);
        }
        let now = self.now();
        let store = &mut self.nodes[i].store;
        let mut run = store.state.reader().run(&store.engine, vec![op], now.wall_ms);
        for op in std::mem::take(&mut run.pending.quarantine) {
            self.enqueue(i, None, op, false);
        }
        run.outcomes.pop().unwrap_or_else(|| Err(StoreError::Io("no outcome".into())))
    }

    fn enqueue(&mut self, i: usize, to: Option<(StageId, u64)>, op: StoreOp, durable: bool) {
        if self.trace_messages && !op.is_read_only() {
            self.log(|| format!("{} stores {op:?}", self.nodes[i].id));
        }
        let n = &mut self.nodes[i];
        n.queue.push_back((to, op, durable));
        if !n.flush_scheduled {
            n.flush_scheduled = true;
            let inc = n.incarnation;
            let delay = 1 + self.rng.below(3);
            self.schedule(delay, Event::Flush { node: i, inc });
        }
    }

    /// Make sure what is left in node `i`'s queue gets a batch.
    fn kick(&mut self, i: usize) {
        let n = &mut self.nodes[i];
        if !n.queue.is_empty() && !n.flush_scheduled && n.node.is_some() {
            n.flush_scheduled = true;
            let inc = n.incarnation;
            self.schedule(1, Event::Flush { node: i, inc });
        }
    }

    /// Put a message on the wire from node `i`.
    fn send(&mut self, i: usize, to: Dest, msg: Message) {
        let from_inc = self.nodes[i].incarnation;
        match to {
            Dest::Conn(c) if c >= CLIENT_CONN => {
                let client = ((c - CLIENT_CONN) >> 32) as usize;
                let Some(msg) = self.codec(msg) else { return };
                match msg {
                    Message::ClientReply { id, response, .. } => {
                        self.schedule(1, Event::ClientReply { client, op: id, response })
                    }
                    other => self.fail(format!("a client was sent {other:?}")),
                }
            }
            Dest::Conn(c) => {
                let (j, inc) = ((c & 0xff) as usize, c >> 8);
                // A reply on a connection whose other end restarted goes nowhere.
                if j < self.nodes.len() && self.nodes[j].incarnation == inc && self.is_up(j) {
                    self.transmit(i, j, msg, None);
                }
            }
            Dest::Node(id) => match self.index_of(&id) {
                Some(j) if self.is_up(j) && self.connected(i, j) => self.transmit(i, j, msg, Some(id)),
                _ => {
                    if self.trace_messages {
                        self.log(|| format!("{} -> {id} cannot connect: {msg:?}", self.nodes[i].id));
                    }
                    self.schedule(FAIL_NOTICE_MS, Event::Unreachable { node: i, inc: from_inc, peer: id })
                }
            },
            Dest::Addr(a) => match self.nodes.iter().position(|n| n.addr == a) {
                Some(j) if self.is_up(j) && self.connected(i, j) => self.transmit(i, j, msg, None),
                _ => {}
            },
        }
    }

    fn transmit(&mut self, from: usize, to: usize, msg: Message, notify: Option<NodeId>) {
        let (from_inc, to_inc) = (self.nodes[from].incarnation, self.nodes[to].incarnation);
        if from == to {
            self.schedule(0, Event::Deliver { from, from_inc, to, to_inc, msg, notify });
            return;
        }
        if self.rng.chance(self.faults.loss) {
            return;
        }
        let delay = 1 + self.rng.below(self.faults.delay_max_ms);
        if self.rng.chance(self.faults.duplicate) {
            let d2 = 1 + self.rng.below(self.faults.delay_max_ms);
            let copy = Event::Deliver { from, from_inc, to, to_inc, msg: msg.clone(), notify: notify.clone() };
            self.schedule(d2, copy);
        }
        self.schedule(delay, Event::Deliver { from, from_inc, to, to_inc, msg, notify });
    }

    /// Every message crosses the real codec.
    fn codec(&mut self, msg: Message) -> Option<Message> {
        let decoded = ringkv::wire::encode_frame(&msg).and_then(|frame| {
            ringkv::wire::decode_frame(&frame, ringkv::wire::FRAME_BYTES_MAX_DEFAULT).map(|m| m.map(|(m, _)| m))
        });
        match decoded {
            Ok(Some(m)) => Some(m),
            Ok(None) => {
                self.fail(format!("a whole frame did not decode as a message: {msg:?}"));
                None
            }
            Err(e) => {
                self.fail(format!("the codec refused a message ({e}): {msg:?}"));
                None
            }
        }
    }

    fn deliver(&mut self, from: usize, from_inc: u64, to: usize, to_inc: u64, msg: Message, notify: Option<NodeId>) {
        let reachable = self.is_up(to) && self.nodes[to].incarnation == to_inc && self.connected(from, to);
        if !reachable {
            // The connection broke under the message: the dialling side hears of it.
            if let Some(peer) = notify {
                self.schedule(FAIL_NOTICE_MS, Event::Unreachable { node: from, inc: from_inc, peer });
            }
            return;
        }
        let Some(msg) = self.codec(msg) else { return };
        if self.trace_messages {
            self.log(|| format!("{} -> {}: {msg:?}", self.nodes[from].id, self.nodes[to].id));
        }
        let now = self.now();
        let origin = Origin::node(Sim::conn_of(from, from_inc), self.nodes[from].id.clone());
        if let Some(node) = self.nodes[to].node.as_mut() {
            node.message(now, origin, msg);
        }
        self.pump(to);
    }

    /// Run node `i`'s queued storage operations as one batch, as its storage executor does.
    fn flush(&mut self, i: usize) {
        if !self.is_up(i) {
            return;
        }
        self.nodes[i].flush_scheduled = false;
        let take = self.nodes[i].queue.len().min(BATCH_MAX);
        let batch: Vec<Queued> = self.nodes[i].queue.drain(..take).collect();
        if batch.is_empty() {
            return;
        }
        let f = self.faults;
        let now = self.now();
        // A read error fails one operation, which is then not run at all.
        let mut results: Vec<Option<Result<StoreOutcome, StoreError>>> = vec![None; batch.len()];
        let mut ops = Vec::new();
        let mut run_index = Vec::new();
        for (k, (_, op, _)) in batch.iter().enumerate() {
            match self.read_error() {
                Some(e) => results[k] = Some(Err(e)),
                None => {
                    ops.push(op.clone());
                    run_index.push(k);
                }
            }
        }
        let read_only = ops.iter().all(StoreOp::is_read_only);
        // Coordinated writes computed by a batch that ran, by index in `ops`: handed to their
        // stage ahead of the commit (as the node's storage thread does), whether it then
        // commits or not.
        let mut computed: Vec<(usize, StoreOutcome)> = Vec::new();
        let mut sent_ahead: Vec<usize> = Vec::new();
        let mut committed = false;
        let mut made_durable = false;
        let mut crash = false;
        let mut follow_ups = Vec::new();
        if !ops.is_empty() {
            let count = ops.len();
            let (outcomes, failed) = if read_only {
                // Reads run on the committed engine, with no transaction to commit.
                let store = &mut self.nodes[i].store;
                let run = store.state.run(&mut ReadOnly(&store.engine), ops.clone(), now.wall_ms);
                if run.failed.is_none() {
                    store.state.commit(&run.pending);
                }
                follow_ups = run.pending.quarantine;
                (run.outcomes, run.failed)
            } else {
                let fail_puts = self.rng.chance(f.txn_fail);
                // The commit itself fails, after the batch ran (its coordinated writes went
                // ahead): the store must never issue their dots again.
                let fail_commit = !fail_puts && self.rng.chance(f.txn_fail);
                crash = self.rng.chance(f.batch_crash);
                let commit_before_crash = self.rng.chance(0.5);
                let keep_actors = self.scenario.bug == Bug::ActorsKept;
                let store = &mut self.nodes[i].store;
                let mut txn = FaultyTxn { txn: store.engine.begin(), fail_puts };
                let run = store.state.run(&mut txn, ops.clone(), now.wall_ms);
                if run.failed.is_none() {
                    computed = run.coordinated().map(|(k, o)| (k, o.clone())).collect();
                }
                // What goes ahead of the commit: the store says which (not a write numbered
                // under a generation the batch itself saves).
                sent_ahead = run.ahead().map(|(k, _)| k).collect();
                let mut commit_failed = false;
                if run.failed.is_some() {
                    drop(txn);
                    if fail_puts {
                        self.storage_faults.failed_txns += 1;
                    }
                } else if crash && !commit_before_crash {
                    drop(txn);
                } else if fail_commit {
                    drop(txn);
                    self.storage_faults.failed_txns += 1;
                    if !keep_actors {
                        store.state.abandon();
                    }
                    commit_failed = true;
                } else {
                    txn.txn.commit();
                    store.state.commit(&run.pending);
                    committed = true;
                    let must_be_durable = run.must_be_durable();
                    follow_ups = run.pending.quarantine;
                    // A durable commit persists every commit before it (as redb's does).
                    made_durable = !self.buffered || batch.iter().any(|(_, _, durable)| *durable) || must_be_durable;
                }
                if commit_failed {
                    let e = StoreError::Io("commit failed".into());
                    ((0..count).map(|_| Err(e.clone())).collect(), None)
                } else {
                    (run.outcomes, run.failed)
                }
            };
            if made_durable {
                let n = &mut self.nodes[i];
                n.durable = n.store.engine.clone();
            }
            if outcomes.len() != count {
                let id = self.nodes[i].id.clone();
                return self.fail(format!(
                    "{id}'s store answered a batch of {count} operations with {} outcomes (failed: {failed:?})",
                    outcomes.len()
                ));
            }
            for (j, o) in &computed {
                // It may reach other replicas, committed here or not: its dots are tracked.
                self.coordinated(&ops[*j], o);
            }
            for (&k, outcome) in run_index.iter().zip(outcomes) {
                results[k] = Some(outcome);
            }
        }
        let removes = ops.iter().any(|op| matches!(op, StoreOp::RemoveHints { .. } | StoreOp::RemoveObjects { .. }));
        if !ops.is_empty() && !read_only && (!committed || removes) {
            // The batch's writes are gone, or it dropped copies handed to another node:
            // perhaps the last copy of some write (an anti-entropy page from a node wiped
            // since, seed 2217 of harsh,leave; a hint acknowledged by a node wiped before
            // the acknowledgement arrived, seed 327).
            self.note_destroyed();
        }
        if !computed.is_empty() {
            for (j, outcome) in computed.into_iter().filter(|(j, _)| sent_ahead.contains(j)) {
                let Some((stage, token)) = batch[run_index[j]].0 else { continue };
                if let Some(node) = self.nodes[i].node.as_mut() {
                    node.input(now, stage, Input::Ahead { token, outcome });
                }
            }
            self.pump(i);
        }
        if crash {
            self.storage_faults.lost_batches += 1;
            self.log(|| format!("{} crashes after a batch (committed: {committed})", self.nodes[i].id));
            self.crash(i, false);
            let down_ms = 200 + self.rng.below(3000);
            self.schedule(down_ms, Event::Restart { node: i });
            return;
        }
        for op in follow_ups {
            self.enqueue(i, None, op, false);
        }
        self.kick(i);
        for ((to, _, _), result) in batch.into_iter().zip(results) {
            let (Some((stage, token)), Some(result)) = (to, result) else { continue };
            if let Some(node) = self.nodes[i].node.as_mut() {
                node.input(now, stage, Input::Stored { token, result });
            }
        }
        self.pump(i);
    }

    /// A coordinated write was computed (it may reach other replicas whether or not its batch
    /// commits): note its dot and context for the checks.
    fn coordinated(&mut self, op: &StoreOp, outcome: &StoreOutcome) {
        let StoreOp::Coordinate { key, context, value, now_wall_ms, .. } = op else { return };
        let StoreOutcome::Coordinated(Ok(o)) = outcome else { return };
        let k = sim_key(key);
        let dots = new_dots(o, context, value, *now_wall_ms);
        // An lww write supersedes all its coordinator held, whatever context it came with.
        let superseded = match class_of(key).resolution {
            Resolution::Lww => lww_superseded(o, &dots),
            Resolution::Siblings => context.clone(),
        };
        self.contexts.entry(k.clone()).or_default().push(superseded);
        match value {
            Some(v) => {
                let entry = self.dots_of.entry((k.clone(), v.clone())).or_default();
                for d in dots {
                    if !entry.contains(&d) {
                        entry.push(d);
                    }
                }
                if self.scenario.bug == Bug::AckAfterLocalWrite {
                    // The planted bug: the client hears back now, on one durable copy.
                    let waiting = self
                        .pending_value
                        .iter()
                        .find(|(&(c, op), (pk, pv, _, _))| {
                            *pk == k
                                && pv.as_ref() == Some(v)
                                && self.clients[c].op.as_ref().is_some_and(|(o, _)| *o == op)
                        })
                        .map(|(&at, _)| at);
                    if let Some((client, op)) = waiting {
                        let response = ClientResponse::Written { context: o.context().encode_context() };
                        self.schedule(1, Event::ClientReply { client, op, response });
                    }
                }
            }
            None => {
                let kept: Vec<Dot> = o.siblings().iter().map(|s| s.dot).collect();
                for d in dots {
                    self.kept_by.insert((k.clone(), d), kept.clone());
                    let entry = self.tombs.entry(k.clone()).or_default();
                    if !entry.contains(&d) {
                        entry.push(d);
                    }
                }
            }
        }
    }

    fn tick(&mut self, i: usize) {
        let now = self.now();
        let Sim { nodes, rng, .. } = self;
        let Some(node) = nodes[i].node.as_mut() else { return };
        node.tick(now, &mut || rng.next());
        // The node's shell keeps a stage's timer when it would fire early rather than late
        // (actors/node/src/stage_actor.rs), so stages get ticks before their deadlines:
        // every fourth round, tick the stages that are not due as well.
        if rng.next() % 4 == 0 {
            node.tick_early(now, &mut || rng.next());
        }
        self.pump(i);
        self.operator(i);
    }

    fn sees_left(&self, viewer: usize, id: &str) -> bool {
        self.nodes[viewer]
            .node
            .as_ref()
            .and_then(|n| n.stages.gossip.membership().member(id).map(|m| m.state))
            .is_some_and(|s| s == MemberState::Left)
    }

    /// A node that sees itself left is stopped for good by its operator, once the cluster
    /// has heard (some other live member sees it left too).
    fn operator(&mut self, i: usize) {
        let id = self.nodes[i].id.clone();
        if !self.sees_left(i, &id) {
            return;
        }
        if (0..self.nodes.len()).any(|j| j != i && self.sees_left(j, &id)) {
            self.remove(i);
        }
    }

    fn up_nodes(&self) -> Vec<usize> {
        (0..self.nodes.len()).filter(|&i| self.is_up(i)).collect()
    }

    fn client_send(&mut self, i: usize, client: u64, op: u64, request: ClientRequest) {
        let conn = CLIENT_CONN + (client << 32) + op;
        let Some(msg) = self.codec(Message::Client { id: op, request }) else { return };
        let now = self.now();
        if let Some(node) = self.nodes[i].node.as_mut() {
            node.message(now, Origin::client(conn, Role::Admin), msg);
        }
        self.pump(i);
    }

    /// The operator asks node `via` to make `node` leave.
    fn admin_leave(&mut self, via: usize, node: NodeId) {
        // With signed records only the leaver can record its leave: ask it, when it runs.
        let via = match self.index_of(&node) {
            Some(l) if self.signed && self.is_up(l) => l,
            _ => via,
        };
        let op = self.next_admin;
        self.next_admin += 1;
        self.log(|| format!("admin: {node} leaves (via {})", self.nodes[via].id));
        self.leave_requests.insert(op, node.clone());
        self.client_send(via, ADMIN, op, ClientRequest::Leave { node });
    }

    fn client_step(&mut self, c: usize) {
        if self.clients[c].op.is_some() || self.clients[c].writes_left == 0 {
            return;
        }
        let live = self.up_nodes();
        if live.is_empty() {
            self.schedule(100, Event::ClientStep { client: c });
            return;
        }
        let node = live[self.rng.below(live.len() as u64) as usize];
        let cl = &mut self.clients[c];
        let key = cl.keys[(self.rng.next() % cl.keys.len() as u64) as usize].clone();
        let op_id = cl.next_op;
        cl.next_op += 1;
        let n = n_of(&key);
        let w = 1 + self.rng.below(n as u64) as usize;
        let value = format!("c{c}-{op_id}").into_bytes();
        let delete = self.rng.chance(0.1);
        let (ns, kb) = request_key(&key);
        let (request, then) = match cl.kind {
            ClientKind::Blind => {
                self.pending_value.insert((c, op_id), (key.clone(), Some(value.clone()), w, None));
                let request = ClientRequest::Put {
                    key: kb,
                    context: None,
                    value: Some(Bytes::from(value)),
                    w: Some(w as u8),
                    ns,
                };
                (request, None)
            }
            ClientKind::ReadModifyWrite => {
                let r = 1 + self.rng.below(n as u64) as u8;
                (
                    ClientRequest::Get { key: kb, r: Some(r), ns },
                    Some((key.clone(), (!delete).then_some(value), w, None)),
                )
            }
        };
        self.clients[c].op = Some((op_id, then));
        self.clients[c].writes_left -= 1;
        self.log(|| format!("client {c} op {op_id} on {} key {key}: {request:?}", self.nodes[node].id));
        self.schedule(REQUEST_MS + 500, Event::ClientTimeout { client: c, op: op_id });
        self.client_send(node, c as u64, op_id, request);
    }

    fn client_reply(&mut self, c: usize, op_id: u64, response: ClientResponse) {
        if c as u64 == FINAL_READER {
            self.final_answers.insert(op_id, response);
            return;
        }
        if c as u64 == ADMIN {
            let Some(node) = self.leave_requests.remove(&op_id) else { return };
            self.log(|| format!("admin: leave of {node} answered {response:?}"));
            if matches!(response, ClientResponse::Document { .. }) && !self.left.contains(&node) {
                self.left.push(node);
            }
            return;
        }
        let Some((cur, then)) = self.clients[c].op.clone() else { return };
        if cur != op_id {
            return;
        }
        self.log(|| format!("client {c} op {op_id} answered {response:?}"));
        match (then, &response) {
            (Some((key, value, w, _)), ClientResponse::Values { context, .. }) => {
                // The read half of a read-modify-write: now write with its context.
                let live = self.up_nodes();
                if live.is_empty() {
                    self.clients[c].op = None;
                    self.schedule(10, Event::ClientStep { client: c });
                    return;
                }
                let node = live[self.rng.below(live.len() as u64) as usize];
                self.clients[c].op = Some((op_id, None));
                self.pending_value.insert((c, op_id), (key.clone(), value.clone(), w, context.clone()));
                let (ns, kb) = request_key(&key);
                let request = ClientRequest::Put {
                    key: kb,
                    context: context.clone(),
                    value: value.map(Bytes::from),
                    w: Some(w as u8),
                    ns,
                };
                self.client_send(node, c as u64, op_id, request);
            }
            (_, ClientResponse::Written { context }) => {
                if let Some((key, value, w, written_with)) = self.pending_value.remove(&(c, op_id)) {
                    let now = self.now;
                    let decode = |t: &str| VersionVector::decode_context(t, now).expect("a context the cluster made");
                    let ack = decode(context.as_str());
                    match value {
                        Some(v) => self.acked.push((key, v, w, ack)),
                        None => {
                            let with = written_with.as_deref().map(decode).unwrap_or_default();
                            self.acked_deletes.push((key, w, with, ack));
                        }
                    }
                }
                self.clients[c].op = None;
                let d = 1 + self.rng.below(THINK_MS);
                self.schedule(d, Event::ClientStep { client: c });
            }
            _ => {
                self.pending_value.remove(&(c, op_id));
                self.clients[c].op = None;
                let d = 1 + self.rng.below(THINK_MS);
                self.schedule(d, Event::ClientStep { client: c });
            }
        }
    }

    fn run_until(&mut self, until: u64, chaos: bool) {
        while let Some(&Reverse((t, id))) = self.queue.peek() {
            if t > until || self.broken.is_some() {
                break;
            }
            self.queue.pop();
            self.now = t;
            self.processed += 1;
            if self.processed > EVENTS_MAX {
                let seed = self.seed;
                self.fail(format!("seed {seed}: over {EVENTS_MAX} events by {t} ms, the run does not settle"));
                break;
            }
            let Some(e) = self.events.remove(&id) else { continue };
            match e {
                Event::Deliver { from, from_inc, to, to_inc, msg, notify } => {
                    self.deliver(from, from_inc, to, to_inc, msg, notify)
                }
                Event::Unreachable { node, inc, peer } => {
                    if self.nodes[node].incarnation == inc {
                        let now = self.now();
                        if let Some(n) = self.nodes[node].node.as_mut() {
                            n.unreachable(now, peer);
                        }
                        self.pump(node);
                    }
                }
                Event::Tick { node, inc } => {
                    if self.is_up(node) && self.nodes[node].incarnation == inc {
                        if self.buffered && self.now >= self.nodes[node].last_flush_ms + FLUSH_MS {
                            let n = &mut self.nodes[node];
                            n.durable = n.store.engine.clone();
                            n.last_flush_ms = self.now;
                        }
                        self.tick(node);
                        if chaos {
                            self.chaos(node);
                        }
                        if self.is_up(node) && self.nodes[node].incarnation == inc {
                            self.schedule(TICK_MS, Event::Tick { node, inc });
                        }
                    }
                }
                Event::Flush { node, inc } => {
                    if self.nodes[node].incarnation == inc {
                        self.flush(node);
                    }
                }
                Event::ClientStep { client } => self.client_step(client),
                Event::Restart { node } => {
                    if !self.is_up(node) && !self.nodes[node].removed {
                        self.log(|| format!("restart {}", self.nodes[node].id));
                        self.boot(node);
                    }
                }
                Event::ClientReply { client, op, response } => self.client_reply(client, op, response),
                Event::ClientTimeout { client, op } => {
                    if self.clients[client].op.as_ref().is_some_and(|(o, _)| *o == op) {
                        let response =
                            ClientResponse::Error { kind: ErrorKind::Unavailable, message: "client timeout".into() };
                        self.client_reply(client, op, response);
                    }
                }
            }
        }
        if self.broken.is_none() {
            self.now = until;
        }
    }

    /// Random faults, decided on node `i`'s tick.
    fn chaos(&mut self, i: usize) {
        let f = self.faults;
        let per_tick = TICK_MS as f64 / 1000.0;
        if self.rng.chance(f.corrupt * per_tick) {
            self.corrupt_row(i);
        }
        // A forced leaver is a healthy node being decommissioned: it does not crash.
        let spared = self.scenario.force_leave && self.left.contains(&self.nodes[i].id);
        if self.rng.chance(f.crash * per_tick) && !spared {
            let wipe = self.rng.chance(f.wipe);
            self.crash(i, wipe);
            let down_ms = 200 + self.rng.below(3000);
            self.schedule(down_ms, Event::Restart { node: i });
            return;
        }
        let first = (0..self.nodes.len()).find(|&j| !self.nodes[j].removed);
        if first == Some(i) && self.rng.chance(f.partition * per_tick) {
            if self.split.is_some() {
                self.log(|| "heal partition".into());
                self.split = None;
            } else {
                let groups: Vec<u8> = (0..self.nodes.len()).map(|_| self.rng.below(2) as u8).collect();
                self.log(|| format!("partition {groups:?}"));
                self.split = Some(groups);
            }
        }
    }

    /// After heal, the operator repeats a leave no live node knows of (it is idempotent): one
    /// accepted by a single node that lost its disk before gossiping it is lost with it. A
    /// stopped node that no live node knows as left (every disk that recorded it left was
    /// wiped since, so an older record of it, up or leaving, won) is provisioned again,
    /// blank, to leave again: nothing else can mark a member that does not run as left.
    fn repeat_leaves(&mut self) {
        for node in self.left.clone() {
            let l = self.index_of(&node).expect("a member");
            if self.nodes[l].removed {
                let seen: Vec<Option<MemberState>> = self
                    .up_nodes()
                    .into_iter()
                    .map(|j| self.nodes[j].node.as_ref().expect("up").stages.gossip.membership().member(&node))
                    .map(|m| m.map(|m| m.state))
                    .collect();
                let ghost = seen.iter().any(Option::is_some) && !seen.contains(&Some(MemberState::Left));
                if ghost {
                    self.log(|| {
                        format!("operator: {node} is listed as {seen:?}; it is provisioned blank to leave again")
                    });
                    self.nodes[l].removed = false;
                    self.boot(l);
                }
                continue;
            }
            let known = (0..self.nodes.len()).any(|j| {
                self.nodes[j]
                    .node
                    .as_ref()
                    .is_some_and(|n| n.stages.gossip.membership().member(&node).is_some_and(|m| !m.state.in_ring()))
            });
            let via = self.up_nodes().into_iter().find(|&j| j != l);
            if let (false, false, Some(via)) = (self.nodes[l].removed, known, via) {
                self.admin_leave(via, node);
            }
        }
    }

    /// The forced leaver: an up node holding hints and no owned data, or (once `any`) the one
    /// holding the most hints.
    fn forced_leaver(&self, any: bool) -> Option<usize> {
        let held =
            |i: usize| (self.nodes[i].store.engine.len(Table::Hints), self.nodes[i].store.engine.len(Table::Objects));
        let up = (0..self.nodes.len()).filter(|&i| self.is_up(i) && held(i).0 > 0);
        let blank = up.clone().filter(|&i| held(i).1 == 0).max_by_key(|&i| (held(i).0, Reverse(i)));
        blank.or_else(|| if any { up.max_by_key(|&i| (held(i).0, Reverse(i))) } else { None })
    }
}

/// How a run ended.
#[derive(Clone, Debug, Default, PartialEq)]
struct Stats {
    acked: usize,
    /// Of them, in the namespaces with N=1 and with last-write-wins.
    acked_n1: usize,
    acked_lww: usize,
    deletes: usize,
    nodes: usize,
    joined: bool,
    left: usize,
    wipes: u64,
    faults: StorageFaults,
    reaped: u64,
    converged_at_ms: u64,
    signed: bool,
    buffered: bool,
}

/// Signed member records, as certificates make them on the node: node X's "signature" is an
/// MD5 keyed by X's id, so only X makes its own; the core's rule (a record counts only when
/// its owner signed it) is the node's.
struct SimSigner(NodeId);

fn sim_signature(id: &str, content: &[u8]) -> Vec<u8> {
    use md5::{Digest, Md5};
    Md5::new().chain_update(b"sim key of ").chain_update(id).chain_update(content).finalize().to_vec()
}

impl RecordSigner for SimSigner {
    fn sign(&self, content: &[u8]) -> Option<RecordSignature> {
        Some(RecordSignature { cert: self.0.as_bytes().to_vec(), sig: sim_signature(&self.0, content) })
    }

    fn verify(&self, id: &str, content: &[u8], s: &RecordSignature) -> bool {
        s.cert == id.as_bytes() && s.sig == sim_signature(id, content)
    }
}

fn clients_done(sim: &Sim) -> bool {
    sim.clients.iter().all(|c| c.writes_left == 0 && c.op.is_none())
}

/// Everything the checks look at, or the first thing that is wrong.
fn check(sim: &Sim) -> Result<(), String> {
    let live: Vec<usize> = (0..sim.nodes.len()).filter(|&i| !sim.nodes[i].removed).collect();
    if let Some(&i) = live.iter().find(|&&i| !sim.is_up(i)) {
        return Err(format!("{} is not up after healing", sim.nodes[i].id));
    }
    let mut rings = Vec::new();
    let mut epochs = BTreeSet::new();
    for &i in &live {
        let mut m = sim.nodes[i].node.as_ref().expect("up").stages.gossip.membership().clone();
        epochs.insert(m.epoch());
        rings.push(m.ring().ok_or_else(|| format!("{} has no ring", sim.nodes[i].id))?);
    }
    if epochs.len() != 1 || rings.windows(2).any(|w| w[0] != w[1]) {
        return Err(format!("rings differ: epochs {epochs:?}"));
    }
    let ring = rings[0].clone();
    for l in &sim.left {
        let seen: Vec<Option<MemberState>> = live
            .iter()
            .map(|&i| sim.nodes[i].node.as_ref().expect("up").stages.gossip.membership().member(l).map(|m| m.state))
            .collect();
        // Left everywhere; or unknown everywhere, once every disk that knew it was wiped.
        if !(seen.iter().all(|s| *s == Some(MemberState::Left)) || seen.iter().all(Option::is_none)) {
            let ids: Vec<&str> = live.iter().map(|&i| sim.nodes[i].id.as_str()).collect();
            return Err(format!("{l} was told to leave, but {ids:?} see it as {seen:?}"));
        }
    }
    for n in &sim.nodes {
        if sim.left.contains(&n.id) != n.removed {
            return Err(format!("{} was told to leave: {}, is stopped: {}", n.id, sim.left.contains(&n.id), n.removed));
        }
    }
    let members: BTreeSet<&str> = ring.members().iter().map(|m| m.id.as_str()).collect();
    let expected: BTreeSet<&str> = live.iter().map(|&i| sim.nodes[i].id.as_str()).collect();
    if members != expected {
        return Err(format!("the ring has members {members:?}, the cluster is {expected:?}"));
    }
    for &i in &live {
        let n = &sim.nodes[i];
        let hints = n.store.engine.len(Table::Hints);
        if hints > 0 {
            return Err(format!("{} still holds {hints} hints", n.id));
        }
        let held: BTreeSet<TreeId> = n.store.objects().iter().map(|(k, _)| TreeId::of(k, Q)).collect();
        if let Some(t) = held.iter().find(|t| !ring.is_replica(t.partition, t.n_or(N), &n.id)) {
            return Err(format!(
                "{} still holds partition {} of {}, which it does not replicate",
                n.id,
                t.partition,
                t.namespace_name()
            ));
        }
    }
    let old = WALL_BASE_MS + sim.now.saturating_sub(GRACE_MS + 5000);
    for &i in &live {
        let n = &sim.nodes[i];
        if let Some((k, o)) = n.store.objects().into_iter().find(|(_, o)| o.is_deleted() && o.last_modified_ms() < old)
        {
            return Err(format!(
                "{} keeps an old tombstone for {} (written {} ms ago)",
                n.id,
                String::from_utf8_lossy(&k),
                WALL_BASE_MS + sim.now - o.last_modified_ms()
            ));
        }
    }
    let prefixes: Vec<Vec<u8>> =
        std::iter::once(Vec::new()).chain(namespaces().iter().map(Namespace::prefix)).collect();
    for p in 0..Q {
        for ns in &prefixes {
            let tree = TreeId { partition: p, ns: ns.clone() };
            let prim = ring.preference_list(p, tree.n_or(N)).primaries;
            let roots: BTreeSet<u128> = prim
                .iter()
                .map(|id| {
                    sim.nodes[sim.index_of(id).expect("member")].store.state.tree_of(&tree).map_or(0, |t| t.root())
                })
                .collect();
            if roots.len() != 1 {
                let name = tree.namespace_name();
                let held: Vec<(String, Vec<(String, Object)>)> = prim
                    .iter()
                    .map(|id| {
                        let objects = sim.nodes[sim.index_of(id).expect("member")].store.objects();
                        let mine = objects.into_iter().filter(|(k, _)| TreeId::of(k, Q) == tree);
                        (id.clone(), mine.map(|(k, o)| (sim_key(&k), o)).collect())
                    })
                    .collect();
                let known: Vec<(String, usize)> = live
                    .iter()
                    .map(|&i| {
                        let n = &sim.nodes[i];
                        (n.id.clone(), n.node.as_ref().map_or(0, |x| x.stages.gossip.namespaces().len()))
                    })
                    .collect();
                return Err(format!(
                    "partition {p} of {name}: replicas {prim:?} have different Merkle roots: {held:?} \
                     (namespaces known: {known:?})"
                ));
            }
        }
    }
    let final_object = |key: &str| replicas_merged(sim, &ring, key);
    // Every copy of a write was destroyed, by at least W wipes or corrupted rows: it had no
    // copy left at some point, and at least W distinct nodes lost theirs. (Counted at the
    // end, not when the last stored copy went: a coordinator still holds the object in
    // memory and may send it on, to a fallback, after the stored copies went; seed 167 of
    // harsh,leave: a corrupted row on the coordinator and a wipe, then a hint delivered to
    // a third node that was wiped too.)
    let destroyed = |key: &str, dots: &[Dot], w: usize| {
        !dots.is_empty()
            && dots.iter().all(|d| {
                let kd = (store_key(key), *d);
                // Buffered: one durable copy (the coordinating replica's) is all a write
                // has; its loss needs a wipe.
                let wipes_needed = if sim.buffered { 1 } else { w };
                sim.destroyed.contains_key(&kd) && sim.wiped_holders.get(&kd).is_some_and(|h| h.len() >= wipes_needed)
            })
    };
    for (key, v, w, ack) in &sim.acked {
        let obj = final_object(key);
        if obj.values().any(|x| x == v.as_slice()) {
            continue;
        }
        let dots = sim.dots_of.get(&(key.clone(), v.clone())).cloned().unwrap_or_default();
        // The acknowledged attempt's dots (an earlier attempt of a retried put may also
        // exist and is held to nothing).
        let acked_dots: Vec<Dot> = dots.iter().copied().filter(|d| ack.covers(*d)).collect();
        // Allowed by the contract, for each dot the acknowledged value was written under:
        // W durable copies, and at least W of the nodes holding them lost their disks (or
        // rows) before the write spread further; or a later write superseded it (some
        // write's context covered it).
        let ctxs = sim.contexts.get(key).cloned().unwrap_or_default();
        let gone = |d: &Dot| destroyed(key, &[*d], *w) || ctxs.iter().any(|c| c.covers(*d));
        if acked_dots.is_empty() || !acked_dots.iter().all(gone) {
            let twins: Vec<String> = sim
                .dots_of
                .iter()
                .filter(|((k, other), ds)| k == key && other != v && ds.iter().any(|d| dots.contains(d)))
                .map(|((_, other), _)| String::from_utf8_lossy(other).into_owned())
                .collect();
            let covered: Vec<bool> = dots.iter().map(|d| ctxs.iter().any(|c| c.covers(*d))).collect();
            let seen: Vec<u64> = dots.iter().map(|d| obj.clock().get(d.actor)).collect();
            return Err(format!(
                "acknowledged write {:?} (W={w}) to {key} is lost (dots {dots:?}, covered by a context {covered:?}, \
                 final clock has counters {seen:?}, other writes with the same dot: {twins:?}, wiped holders {:?}, \
                 destroyed {:?})",
                String::from_utf8_lossy(v),
                dots.iter().map(|d| sim.wiped_holders.get(&(store_key(key), *d)).cloned()).collect::<Vec<_>>(),
                dots.iter().map(|d| sim.destroyed.get(&(store_key(key), *d)).copied()).collect::<Vec<_>>(),
            ));
        }
    }
    for (key, w, with, ack) in &sim.acked_deletes {
        // The delete's tombstone: new to the context it was written with, seen by its ack.
        let tombs: Vec<Dot> = sim
            .tombs
            .get(key)
            .into_iter()
            .flatten()
            .copied()
            .filter(|d| ack.covers(*d) && !with.covers(*d) && ack.get(d.actor) == d.counter)
            .collect();
        // What the delete's result kept beside its tombstone was concurrent with it and is
        // not deleted; everything else its context covers is.
        let kept: BTreeSet<Dot> =
            tombs.iter().filter_map(|d| sim.kept_by.get(&(key.clone(), *d))).flatten().copied().collect();
        let obj = final_object(key);
        let back: Vec<(Dot, String)> = obj
            .siblings()
            .iter()
            .filter(|s| s.value.is_some() && ack.covers(s.dot) && !kept.contains(&s.dot))
            .map(|s| (s.dot, String::from_utf8_lossy(s.value.as_deref().unwrap_or_default()).into_owned()))
            .collect();
        if back.is_empty() {
            continue;
        }
        if destroyed(key, &tombs, *w) {
            continue;
        }
        return Err(format!(
            "acknowledged delete (W={w}) of {key} is undone: {back:?} are back although its context covers them \
             (tombstone dots {tombs:?}, wiped holders {:?}, destroyed {:?})",
            tombs.iter().map(|d| sim.wiped_holders.get(&(store_key(key), *d)).cloned()).collect::<Vec<_>>(),
            tombs.iter().map(|d| sim.destroyed.get(&(store_key(key), *d)).copied()).collect::<Vec<_>>(),
        ));
    }
    for key in &sim.rmw_keys {
        let n = final_object(key).siblings().len();
        if n > 12 {
            return Err(format!("{key} has {n} siblings under read-modify-write clients"));
        }
    }
    Ok(())
}

fn run_seed(seed: u64, scenario: Scenario, trace: bool) -> Result<Stats, String> {
    let mut setup = Rng(seed ^ 0x5eed);
    let nodes = 3 + setup.below(4) as usize;
    let mut sim = Sim::new(seed, nodes, trace, scenario);
    // Keys of the default namespace, and of each namespace of [`namespaces`].
    let keys = |p: &str| -> Vec<String> {
        let mut k: Vec<String> = (0..6).map(|k| format!("{p}{k}")).collect();
        k.extend(["one", "last"].iter().flat_map(|ns| (0..2).map(move |i| format!("{ns}/{p}{i}"))));
        k
    };
    let (blind_keys, rmw_keys) = (keys("b"), keys("r"));
    sim.rmw_keys = rmw_keys.iter().cloned().collect();
    for c in 0..4 {
        let (kind, keys) = if c % 2 == 0 {
            (ClientKind::Blind, blind_keys.clone())
        } else {
            (ClientKind::ReadModifyWrite, rmw_keys.clone())
        };
        sim.clients.push(Client { kind, keys, op: None, next_op: 1, writes_left: 30 });
    }
    sim.run_until(3000, false);
    // The namespaces, created on one node: the others learn them by gossip.
    for (op, d) in namespaces().iter().enumerate() {
        let create = ClientRequest::NamespaceCreate {
            name: d.name.clone(),
            n: Some(d.n),
            r: Some(d.r),
            w: Some(d.w),
            resolution: Some(d.resolution.as_str().to_string()),
        };
        sim.client_send(0, ADMIN, 1_000_000 + op as u64, create);
    }
    sim.faults = Faults {
        loss: setup.below(10) as f64 / 100.0,
        duplicate: setup.below(5) as f64 / 100.0,
        delay_max_ms: 1 + setup.below(40),
        crash: if scenario.harsh { 0.5 } else { setup.below(30) as f64 / 100.0 },
        wipe: if scenario.harsh { 0.8 } else { setup.below(40) as f64 / 100.0 },
        partition: setup.below(20) as f64 / 100.0,
        txn_fail: setup.below(20) as f64 / 1000.0,
        batch_crash: setup.below(4) as f64 / 1000.0,
        read_error: setup.below(20) as f64 / 1000.0,
        corrupt: setup.below(10) as f64 / 100.0,
    };
    let f = &mut sim.faults;
    f.crash = scenario.crash.unwrap_or(f.crash);
    f.wipe = scenario.wipe.unwrap_or(f.wipe);
    f.loss = scenario.loss.unwrap_or(f.loss);
    f.partition = scenario.partition.unwrap_or(f.partition);
    f.batch_crash = scenario.batch_crash.unwrap_or(f.batch_crash);
    f.txn_fail = scenario.txn_fail.unwrap_or(f.txn_fail);
    sim.log(|| format!("{nodes} nodes; chaos: {:?}", sim.faults));
    for c in 0..sim.clients.len() {
        sim.schedule(setup.below(50), Event::ClientStep { client: c });
    }
    // Some runs have a node join, and some make a member leave (an admin command on some
    // live node).
    let joined = setup.chance(0.4);
    let leaver = if scenario.force_leave {
        Some(usize::MAX)
    } else {
        (nodes >= 4 && setup.chance(0.4)).then(|| setup.below(nodes as u64) as usize)
    };
    let leave_at = scenario.leave_at.unwrap_or(8000);
    let mut leaver = leaver;
    let mut t = 3000;
    while t < 12_000 {
        t += 100;
        sim.run_until(t, true);
        if t == 6000 && joined {
            let i = sim.add_node();
            sim.log(|| format!("join {}", sim.nodes[i].id));
        }
        // Never below N members: a cluster that small cannot keep N copies of anything.
        let members = sim.nodes.iter().filter(|n| !n.removed).count();
        if t < leave_at || members <= N {
            continue;
        }
        // The forced leaver holds hints, once one does: preferably one holding nothing else
        // (a blank node that stood in for others), or else the one holding the most.
        let l = match leaver {
            Some(usize::MAX) => sim.forced_leaver(t >= leave_at + 2000),
            other => other,
        };
        // Asked on some other live node; a forced leave on the leaver itself.
        let up = sim.up_nodes();
        let via = match scenario.force_leave {
            true => l.filter(|&l| sim.is_up(l)),
            false => up.iter().copied().find(|&j| Some(j) != l).or(up.first().copied()),
        };
        if let (Some(l), Some(via)) = (l, via) {
            let id = sim.nodes[l].id.clone();
            sim.admin_leave(via, id);
            leaver = None;
        }
    }
    // Heal: faults off, every node that has not left back up.
    sim.faults = CALM;
    sim.split = None;
    for i in 0..sim.nodes.len() {
        if !sim.is_up(i) && !sim.nodes[i].removed {
            sim.log(|| format!("heal: restart {}", sim.nodes[i].id));
            sim.boot(i);
        }
    }
    let mut t = 12_000;
    while !clients_done(&sim) && t < 60_000 && sim.broken.is_none() {
        sim.repeat_leaves();
        t += 500;
        sim.run_until(t, false);
    }
    if let Some(e) = sim.broken.take() {
        return Err(e);
    }
    if !clients_done(&sim) {
        return Err("clients never finished".into());
    }
    // Quiet time for gossip, hinted handoff, transfers, anti-entropy and reaping; stop once
    // everything holds.
    let heal_start = t;
    let mut last = Err(String::new());
    while t < heal_start + 120_000 {
        sim.repeat_leaves();
        t += 1000;
        sim.run_until(t, false);
        if let Some(e) = sim.broken.take() {
            return Err(e);
        }
        last = check(&sim);
        if let Err(e) = &last {
            sim.log(|| format!("not converged: {e}"));
        }
        if last.is_ok() {
            break;
        }
    }
    let last = last.and_then(|()| sim.left_holding.first().map_or(Ok(()), |e| Err(e.clone())));
    let last = last.and_then(|()| final_reads(&mut sim, t));
    let reaped =
        sim.reaped + sim.nodes.iter().filter_map(|n| n.node.as_ref()).map(|n| n.stages.handoff.reaped()).sum::<u64>();
    last.map(|()| Stats {
        acked: sim.acked.len(),
        acked_n1: sim.acked.iter().filter(|(k, ..)| k.starts_with("one/")).count(),
        acked_lww: sim.acked.iter().filter(|(k, ..)| k.starts_with("last/")).count(),
        deletes: sim.acked_deletes.len(),
        nodes: sim.nodes.len(),
        joined,
        left: sim.left.len(),
        wipes: sim.wipes,
        faults: sim.storage_faults,
        reaped,
        converged_at_ms: t - heal_start,
        signed: sim.signed,
        buffered: sim.buffered,
    })
}

/// Once the cluster converged, a get of acknowledged keys through any live node, with any
/// R, answers the converged state: every sibling of the replicas' merged object (the newest
/// alone under last-write-wins). Checks the coordinators' read path (digest reads, reads in
/// full, merging) against the stores.
fn final_reads(sim: &mut Sim, t: u64) -> Result<(), String> {
    let ring = sim.nodes.iter().find_map(|n| n.node.as_ref()?.stages.gossip.membership().clone().ring());
    let Some(ring) = ring else { return Err("no ring to read with".into()) };
    let keys: BTreeSet<String> = sim.acked.iter().map(|(k, ..)| k.clone()).take(FINAL_READS_MAX).collect();
    let live = sim.up_nodes();
    let mut asked = BTreeMap::new();
    for (op, key) in keys.iter().enumerate() {
        let (ns, kb) = request_key(key);
        // Via a node that knows the key's namespace (wipes may have taken the definition
        // from some, or all: harsh,leave seed 4).
        let knows = |i: &usize| {
            ns.as_deref().is_none_or(|name| {
                sim.nodes[*i].node.as_ref().is_some_and(|n| n.stages.gossip.namespaces().get(name).is_some())
            })
        };
        let able: Vec<usize> = live.iter().copied().filter(knows).collect();
        if able.is_empty() {
            continue;
        }
        let node = able[sim.rng.below(able.len() as u64) as usize];
        let r = 1 + sim.rng.below(n_of(key) as u64) as u8;
        let request = ClientRequest::Get { key: kb, r: Some(r), ns };
        asked.insert(op as u64, (key.clone(), node, r));
        sim.client_send(node, FINAL_READER, op as u64, request);
    }
    sim.run_until(t + 5000, false);
    for (op, (key, node, r)) in asked {
        let merged = replicas_merged(sim, &ring, &key);
        let mut expected: Vec<Vec<u8>> = if class_of(&store_key(&key)).resolution == Resolution::Lww {
            ringkv::namespace::newest(merged.siblings()).and_then(|s| s.value.clone()).into_iter().collect()
        } else {
            merged.values().map(<[u8]>::to_vec).collect()
        };
        expected.sort();
        let via = &sim.nodes[node].id;
        match sim.final_answers.get(&op) {
            Some(ClientResponse::Values { values, .. }) => {
                let mut got: Vec<Vec<u8>> = values.iter().map(|v| v.to_vec()).collect();
                got.sort();
                if got != expected {
                    return Err(format!(
                        "a get of {key} via {via} with R={r} answered {} values, the replicas hold {} \
                         (answered {got:?}, held {expected:?})",
                        got.len(),
                        expected.len()
                    ));
                }
            }
            other => return Err(format!("a get of {key} via {via} with R={r} after convergence answered {other:?}")),
        }
    }
    Ok(())
}

fn seeds_from_env(default: u64) -> Vec<u64> {
    if let Ok(s) = std::env::var("RINGKV_SIM_SEED") {
        return vec![s.parse().expect("RINGKV_SIM_SEED is a number")];
    }
    let n = std::env::var("RINGKV_SIM_SEEDS").ok().and_then(|s| s.parse().ok()).unwrap_or(default);
    (1..=n).collect()
}

/// The scenario of a replay: `RINGKV_SIM_SCENARIO` lists any of `harsh`, `leave`,
/// `ack-early`, `leave-ignores-hints`, `transfer-to-self`, and `crash=`, `wipe=`, `loss=`,
/// `partition=` rates (comma-separated).
fn scenario_from_env() -> Scenario {
    let mut s = NORMAL;
    for word in std::env::var("RINGKV_SIM_SCENARIO").unwrap_or_default().split(',').filter(|w| !w.is_empty()) {
        match word {
            "harsh" => s.harsh = true,
            "leave" => s.force_leave = true,
            "ack-early" => s.bug = Bug::AckAfterLocalWrite,
            "keep-actors" => s.bug = Bug::ActorsKept,
            "leave-ignores-hints" => s.planted = Planted::LeaveIgnoresHints,
            "transfer-to-self" => s.planted = Planted::TransferToSelf,
            other => {
                let (k, v) = other.split_once('=').unwrap_or_else(|| panic!("RINGKV_SIM_SCENARIO: unknown {other:?}"));
                let v: f64 = v.parse().expect("a rate");
                match k {
                    "crash" => s.crash = Some(v),
                    "wipe" => s.wipe = Some(v),
                    "loss" => s.loss = Some(v),
                    "partition" => s.partition = Some(v),
                    "batch_crash" => s.batch_crash = Some(v),
                    "txn_fail" => s.txn_fail = Some(v),
                    "leave_at" => s.leave_at = Some(v as u64),
                    _ => panic!("RINGKV_SIM_SCENARIO: unknown {k:?}"),
                }
            }
        }
    }
    s
}

#[test]
fn simulated_clusters_lose_no_acknowledged_write_and_converge() {
    let trace = std::env::var("RINGKV_SIM_SEED").is_ok();
    let scenario = scenario_from_env();
    let seeds = seeds_from_env(40);
    let started = std::time::Instant::now();
    let mut total = Stats::default();
    let mut joins = 0;
    let mut signed = 0;
    let mut buffered = 0;
    let mut slowest = 0;
    for &seed in &seeds {
        match run_seed(seed, scenario, trace) {
            Ok(s) => {
                total.acked += s.acked;
                total.acked_n1 += s.acked_n1;
                total.acked_lww += s.acked_lww;
                total.deletes += s.deletes;
                total.left += s.left;
                total.wipes += s.wipes;
                total.reaped += s.reaped;
                total.faults.failed_txns += s.faults.failed_txns;
                total.faults.lost_batches += s.faults.lost_batches;
                total.faults.read_errors += s.faults.read_errors;
                total.faults.corrupted_rows += s.faults.corrupted_rows;
                joins += s.joined as usize;
                signed += s.signed as usize;
                buffered += s.buffered as usize;
                slowest = slowest.max(s.converged_at_ms);
            }
            Err(e) => panic!(
                "seed {seed} failed: {e}\nreplay: RINGKV_SIM_SEED={seed} cargo test -p ringkv --test simulation \
                 simulated_clusters -- --nocapture"
            ),
        }
    }
    let f = total.faults;
    println!(
        "{} seeds ({signed} with signed member records, {buffered} buffered) passed in {:.1}s: {} acknowledged writes ({} in an N=1 namespace, {} in an lww one) and {} acknowledged deletes checked, {joins} joins, \
         {} leaves, {} wipes, storage faults: {} failed transactions, {} batches lost to crashes, {} read errors, \
         {} corrupted rows; {} tombstones reaped, slowest convergence {slowest} ms of virtual time",
        seeds.len(),
        started.elapsed().as_secs_f64(),
        total.acked,
        total.acked_n1,
        total.acked_lww,
        total.deletes,
        total.left,
        total.wipes,
        f.failed_txns,
        f.lost_batches,
        f.read_errors,
        f.corrupted_rows,
        total.reaped,
    );
    assert!(total.acked > 0, "the runs acknowledged writes");
    assert!(total.acked_n1 > 0 && total.acked_lww > 0, "the runs acknowledged writes in both namespaces");
}

#[test]
fn same_seed_same_run() {
    let a = run_seed(7, NORMAL, false);
    let b = run_seed(7, NORMAL, false);
    assert_eq!(a, b);
}

/// A seed among the CI seeds (1..=40) on which `with` fails the checks: the first whose
/// failure names `prefer` (a write lost is the plainest evidence), else the first to fail;
/// then the same seed, with the same faults, passes without the defect.
fn caught(name: &str, with: Scenario, without: Scenario, prefer: &str) {
    let mut first = None;
    for seed in 1..=40u64 {
        if let Err(e) = run_seed(seed, with, false) {
            let preferred = e.contains(prefer);
            first.get_or_insert((seed, e));
            if preferred {
                first = Some((seed, run_seed(seed, with, false).unwrap_err()));
                break;
            }
        }
    }
    let (seed, e) = first.unwrap_or_else(|| panic!("no seed in 1..=40 caught {name}"));
    println!("seed {seed} caught {name}: {e}");
    if let Err(e) = run_seed(seed, without, false) {
        panic!("seed {seed} fails without {name} too, so the check proves nothing: {e}");
    }
    println!("seed {seed} passes without {name}");
}

#[test]
fn the_checks_catch_a_coordinator_that_acks_too_early() {
    // Many crashes, most of them wiping: a write acknowledged on one copy dies with it.
    let harsh = Scenario { harsh: true, ..NORMAL };
    let with = Scenario { bug: Bug::AckAfterLocalWrite, ..harsh };
    caught("a coordinator acking after its own write", with, harsh, "lost");
}

#[test]
fn the_checks_catch_a_leaver_that_drops_its_hints() {
    // A member holding hints is decommissioned early in the chaos (it does not crash, the
    // others do, most crashes wiping): the hints it drops are sometimes a write's last copy.
    let setup = Scenario { force_leave: true, leave_at: Some(4000), crash: Some(0.5), wipe: Some(0.9), ..NORMAL };
    let with = Scenario { planted: Planted::LeaveIgnoresHints, ..setup };
    caught("a leaver that ignores its hints", with, setup, "lost");
}

#[test]
fn the_checks_catch_transfers_to_self() {
    let with = Scenario { planted: Planted::TransferToSelf, ..NORMAL };
    caught("transfers that include this node", with, NORMAL, "");
}

#[test]
fn the_checks_catch_a_store_that_issues_a_dot_again_after_a_failed_commit() {
    // Commits fail often, after their batch ran: a coordinated write already sent on to the
    // other replicas ahead of its commit must keep its dot to itself.
    let failing = Scenario { txn_fail: Some(0.2), ..NORMAL };
    let with = Scenario { bug: Bug::ActorsKept, ..failing };
    caught("actors kept after a commit that failed", with, failing, "lost");
}

/// Seeds that once failed, each for the defect named; they pass since it was mended. (The
/// runs depend on every random draw, so a change to the harness or the node may move a seed
/// off its old path; the defects stay covered by the seed counts run before each stop.)
#[test]
fn seeds_that_once_failed_pass() {
    let harsh_leave = Scenario { harsh: true, force_leave: true, ..NORMAL };
    for (seed, scenario, defect) in [
        (142, harsh_leave, "a leaving node's coordinator stored a hint after the node counted itself left"),
        (108, harsh_leave, "no node knew the namespaces any more, and their trees were never exchanged"),
        (1649, NORMAL, "a buffered seed's nodes ran sync mode's rules"),
        (
            451,
            Scenario { txn_fail: Some(0.2), batch_crash: Some(0.02), ..NORMAL },
            "a write numbered under a generation not yet on disk went ahead of its commit, which failed; \
             after a crash the restart began the same generation and issued its dot again",
        ),
    ] {
        if let Err(e) = run_seed(seed, scenario, false) {
            panic!("seed {seed} ({defect}) fails again: {e}");
        }
    }
}
