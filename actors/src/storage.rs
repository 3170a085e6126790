//! The Storage stage: one redb file per node, behind two actors.
//!
//! `StorageWorker` runs on a `SyncArbiter` thread because redb blocks. It executes the core's
//! replica logic (`ringkv::replica::execute`) against a redb write transaction, so each
//! read-modify-write is atomic, and keeps one Merkle tree per partition in step with every
//! write (rebuilt from the objects table at start). `Storage` is the front: it collects
//! operations that arrive while a commit is running and sends them as one batch, so
//! concurrent durable writes share one fsync (group commit). A caller hears back only after
//! the batch holding its write committed, with `Durability::Immediate` in "sync" mode.
//! In "buffered" mode commits are not flushed and a timer makes them durable every
//! `storage.flush_interval_ms`.

use std::collections::{BTreeMap, VecDeque};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use redb::{Database, Durability, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};
use ringkv::config::Durability as DurabilityMode;
use ringkv::coordinator::ReplicaRequest;
use ringkv::membership::Member;
use ringkv::merkle::{leaf_of, MerkleTree};
use ringkv::reaper::ReapStep;
use ringkv::replica::{self, ReplicaLimits, ReplicaOp, ReplicaOutcome, Store};
use ringkv::ring::partition_of_position;
use ringkv::version::{Actor as DotActor, Object};
use tokio::sync::oneshot;

const OBJECTS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("objects");
const HINTS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("hints");
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
const META_MEMBERS: &str = "members";

/// The hints table key: the key (length-prefixed), then the intended node's id, so the
/// hints of one key are one range.
fn hint_key(intended: &str, key: &[u8]) -> Vec<u8> {
    let mut out = hint_prefix(key);
    out.extend_from_slice(intended.as_bytes());
    out
}

fn hint_prefix(key: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(4 + key.len() + 8);
    out.extend_from_slice(&(key.len() as u32).to_be_bytes());
    out.extend_from_slice(key);
    out
}

fn split_hint_key(k: &[u8]) -> Option<(&str, &[u8])> {
    let len = u32::from_be_bytes(k.get(..4)?.try_into().ok()?) as usize;
    let key = k.get(4..4 + len)?;
    let intended = std::str::from_utf8(k.get(4 + len..)?).ok()?;
    Some((intended, key))
}

/// Hinted objects of `key` in a hints table.
fn hints_in<T: ReadableTable<&'static [u8], &'static [u8]>>(t: &T, key: &[u8]) -> Vec<Object> {
    let prefix = hint_prefix(key);
    let Ok(range) = t.range(prefix.as_slice()..) else { return Vec::new() };
    range
        .filter_map(|r| r.ok())
        .take_while(|(k, _)| k.value().starts_with(&prefix))
        .filter_map(|(_, v)| decode(v.value()).ok())
        .collect()
}

fn partition_of(key: &[u8], q: u32) -> usize {
    partition_of_position(ringkv::ring::key_position(key), q) as usize
}

/// The objects table key: the partition (so a partition is one range), then the key.
fn object_key(key: &[u8], q: u32) -> Vec<u8> {
    let mut out = Vec::with_capacity(4 + key.len());
    out.extend_from_slice(&(partition_of(key, q) as u32).to_be_bytes());
    out.extend_from_slice(key);
    out
}

/// Owned objects of a partition, optionally only those in some Merkle leaves.
fn objects_in_table<T: ReadableTable<&'static [u8], &'static [u8]>>(
    t: &T,
    partition: u32,
    leaves: Option<&[u32]>,
    limit: usize,
    keep: &dyn Fn(&Object) -> bool,
) -> Vec<(Vec<u8>, Object)> {
    let (lo, hi) = (partition.to_be_bytes(), (partition as u64 + 1).to_be_bytes());
    let hi = if partition == u32::MAX { vec![0xff; 5] } else { hi[4..].to_vec() };
    let Ok(range) = t.range(lo.as_slice()..hi.as_slice()) else { return Vec::new() };
    range
        .filter_map(|r| r.ok())
        .filter_map(|(k, v)| {
            let key = k.value().get(4..)?.to_vec();
            if leaves.is_some_and(|l| !l.contains(&leaf_of(&key))) {
                return None;
            }
            decode(v.value()).ok().filter(|o| keep(o)).map(|o| (key, o))
        })
        .take(limit)
        .collect()
}

fn scan_hints_table<T: ReadableTable<&'static [u8], &'static [u8]>>(
    t: &T,
    limit: usize,
    exclude: &[String],
) -> Vec<(String, Vec<u8>, Object)> {
    let Ok(iter) = t.iter() else { return Vec::new() };
    iter.filter_map(|r| r.ok())
        .filter_map(|(k, v)| {
            let (intended, key) = split_hint_key(k.value())?;
            if exclude.iter().any(|e| e == intended) {
                return None;
            }
            decode(v.value()).ok().map(|o| (intended.to_string(), key.to_vec(), o))
        })
        .take(limit)
        .collect()
}

fn decode(bytes: &[u8]) -> Result<Object, String> {
    rmp_serde::from_slice(bytes).map_err(|e| format!("undecodable stored object: {e}"))
}

fn encode(o: &Object) -> Result<Vec<u8>, String> {
    rmp_serde::to_vec(o).map_err(|e| e.to_string())
}

/// A change to apply to a partition's Merkle tree once the transaction commits.
type TreeDelta = (usize, Vec<u8>, Option<[u8; 16]>, Option<[u8; 16]>);

/// The core's `Store` over one redb write transaction.
struct TxnStore<'a> {
    txn: &'a redb::WriteTransaction,
    trees: &'a [MerkleTree],
    deltas: Vec<TreeDelta>,
    q: u32,
    error: Option<String>,
}

impl TxnStore<'_> {
    fn fail(&mut self, e: impl ToString) {
        if self.error.is_none() {
            self.error = Some(e.to_string());
        }
    }

    fn get(&mut self, def: TableDefinition<&[u8], &[u8]>, key: &[u8]) -> Option<Object> {
        let found = self
            .txn
            .open_table(def)
            .map_err(|e| e.to_string())
            .and_then(|t| t.get(key).map_err(|e| e.to_string()).map(|g| g.map(|v| decode(v.value()))));
        match found {
            Ok(Some(Ok(o))) => Some(o),
            Ok(None) => None,
            Ok(Some(Err(e))) | Err(e) => {
                self.fail(e);
                None
            }
        }
    }

    fn put(&mut self, def: TableDefinition<&[u8], &[u8]>, key: &[u8], o: &Object) {
        let res = encode(o).and_then(|bytes| {
            let mut t = self.txn.open_table(def).map_err(|e| e.to_string())?;
            t.insert(key, bytes.as_slice()).map(|_| ()).map_err(|e| e.to_string())
        });
        if let Err(e) = res {
            self.fail(e);
        }
    }
}

impl Store for TxnStore<'_> {
    fn object(&self, key: &[u8]) -> Option<Object> {
        // A read inside the write transaction; errors surface through `set_object` paths.
        let t = self.txn.open_table(OBJECTS).ok()?;
        let g = t.get(object_key(key, self.q).as_slice()).ok()??;
        decode(g.value()).ok()
    }

    fn set_object(&mut self, key: &[u8], object: Object) {
        let ok = object_key(key, self.q);
        let old = self.get(OBJECTS, &ok).map(|o| o.digest());
        self.put(OBJECTS, &ok, &object);
        self.deltas.push((partition_of(key, self.q), key.to_vec(), old, Some(object.digest())));
    }

    fn remove_object(&mut self, key: &[u8]) {
        let ok = object_key(key, self.q);
        let old = self.get(OBJECTS, &ok).map(|o| o.digest());
        match self.txn.open_table(OBJECTS) {
            Ok(mut t) => {
                if let Err(e) = t.remove(ok.as_slice()) {
                    self.fail(e);
                }
            }
            Err(e) => self.fail(e),
        }
        self.deltas.push((partition_of(key, self.q), key.to_vec(), old, None));
    }

    fn hint(&self, intended: &str, key: &[u8]) -> Option<Object> {
        let t = self.txn.open_table(HINTS).ok()?;
        let g = t.get(hint_key(intended, key).as_slice()).ok()??;
        decode(g.value()).ok()
    }

    fn set_hint(&mut self, intended: &str, key: &[u8], object: Object) {
        self.put(HINTS, &hint_key(intended, key), &object);
    }

    fn hints_of_key(&self, key: &[u8]) -> Vec<Object> {
        match self.txn.open_table(HINTS) {
            Ok(t) => hints_in(&t, key),
            Err(_) => Vec::new(),
        }
    }

    fn remove_hint(&mut self, intended: &str, key: &[u8]) {
        match self.txn.open_table(HINTS) {
            Ok(mut t) => {
                if let Err(e) = t.remove(hint_key(intended, key).as_slice()) {
                    self.fail(e);
                }
            }
            Err(e) => self.fail(e),
        }
    }

    fn scan_hints(&self, limit: usize, exclude: &[String]) -> Vec<(String, Vec<u8>, Object)> {
        match self.txn.open_table(HINTS) {
            Ok(t) => scan_hints_table(&t, limit, exclude),
            Err(_) => Vec::new(),
        }
    }

    fn objects_in(
        &self,
        partition: u32,
        leaves: Option<&[u32]>,
        limit: usize,
        keep: &dyn Fn(&Object) -> bool,
    ) -> Vec<(Vec<u8>, Object)> {
        match self.txn.open_table(OBJECTS) {
            Ok(t) => objects_in_table(&t, partition, leaves, limit, keep),
            Err(_) => Vec::new(),
        }
    }

    fn tree(&self, partition: u32) -> MerkleTree {
        self.trees.get(partition as usize).cloned().unwrap_or_default()
    }

    fn partitions_held(&self) -> Vec<u32> {
        held(self.trees)
    }
}

fn held(trees: &[MerkleTree]) -> Vec<u32> {
    trees.iter().enumerate().filter(|(_, t)| t.keys() > 0).map(|(p, _)| p as u32).collect()
}

/// The core's `Store` over a redb read transaction, for batches of reads only.
struct ReadStore<'a> {
    objects: redb::ReadOnlyTable<&'static [u8], &'static [u8]>,
    hints: redb::ReadOnlyTable<&'static [u8], &'static [u8]>,
    trees: &'a [MerkleTree],
    q: u32,
}

impl Store for ReadStore<'_> {
    fn object(&self, key: &[u8]) -> Option<Object> {
        decode(self.objects.get(object_key(key, self.q).as_slice()).ok()??.value()).ok()
    }
    fn set_object(&mut self, _: &[u8], _: Object) {
        debug_assert!(false, "a read batch never writes");
    }
    fn remove_object(&mut self, _: &[u8]) {
        debug_assert!(false, "a read batch never writes");
    }
    fn hint(&self, intended: &str, key: &[u8]) -> Option<Object> {
        decode(self.hints.get(hint_key(intended, key).as_slice()).ok()??.value()).ok()
    }
    fn set_hint(&mut self, _: &str, _: &[u8], _: Object) {
        debug_assert!(false, "a read batch never writes");
    }
    fn hints_of_key(&self, key: &[u8]) -> Vec<Object> {
        hints_in(&self.hints, key)
    }
    fn remove_hint(&mut self, _: &str, _: &[u8]) {
        debug_assert!(false, "a read batch never writes");
    }
    fn scan_hints(&self, limit: usize, exclude: &[String]) -> Vec<(String, Vec<u8>, Object)> {
        scan_hints_table(&self.hints, limit, exclude)
    }
    fn objects_in(
        &self,
        partition: u32,
        leaves: Option<&[u32]>,
        limit: usize,
        keep: &dyn Fn(&Object) -> bool,
    ) -> Vec<(Vec<u8>, Object)> {
        objects_in_table(&self.objects, partition, leaves, limit, keep)
    }
    fn tree(&self, partition: u32) -> MerkleTree {
        self.trees.get(partition as usize).cloned().unwrap_or_default()
    }
    fn partitions_held(&self) -> Vec<u32> {
        held(self.trees)
    }
}

/// The redb side: executes batches in one transaction each.
pub struct StorageWorker {
    db: Arc<Database>,
    trees: Vec<MerkleTree>,
    q: u32,
    durability: DurabilityMode,
    limits: ReplicaLimits,
}

impl Actor for StorageWorker {
    type Context = SyncContext<Self>;
}

/// Open (or create) the node's database and rebuild the Merkle trees from it.
pub fn open(path: &Path, q: u32, durability: DurabilityMode, limits: ReplicaLimits) -> Result<StorageWorker, String> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    }
    let db = Database::create(path).map_err(|e| format!("cannot open {}: {e}", path.display()))?;
    {
        let txn = db.begin_write().map_err(|e| e.to_string())?;
        txn.open_table(OBJECTS).map_err(|e| e.to_string())?;
        txn.open_table(HINTS).map_err(|e| e.to_string())?;
        txn.open_table(META).map_err(|e| e.to_string())?;
        txn.commit().map_err(|e| e.to_string())?;
    }
    let mut trees = vec![MerkleTree::new(); q as usize];
    let mut bad = 0u64;
    {
        let txn = db.begin_read().map_err(|e| e.to_string())?;
        let t = txn.open_table(OBJECTS).map_err(|e| e.to_string())?;
        for row in t.iter().map_err(|e| e.to_string())? {
            let (k, v) = row.map_err(|e| e.to_string())?;
            match (k.value().get(4..), decode(v.value())) {
                (Some(key), Ok(o)) => trees[partition_of(key, q)].insert(key, &o.digest()),
                _ => bad += 1,
            }
        }
    }
    if bad > 0 {
        tracing::warn!(bad, "objects that cannot be decoded were skipped; anti-entropy will refill them");
    }
    Ok(StorageWorker { db: Arc::new(db), trees, q, durability, limits })
}

impl StorageWorker {
    /// The saved member table, if any.
    pub fn load_members(&self) -> Result<Vec<Member>, String> {
        let txn = self.db.begin_read().map_err(|e| e.to_string())?;
        let t = txn.open_table(META).map_err(|e| e.to_string())?;
        match t.get(META_MEMBERS).map_err(|e| e.to_string())? {
            Some(v) => rmp_serde::from_slice(v.value()).map_err(|e| format!("saved membership is unreadable: {e}")),
            None => Ok(Vec::new()),
        }
    }

    fn begin(&self) -> Result<redb::WriteTransaction, String> {
        let mut txn = self.db.begin_write().map_err(|e| e.to_string())?;
        let d = match self.durability {
            DurabilityMode::Sync => Durability::Immediate,
            DurabilityMode::Buffered => Durability::None,
        };
        txn.set_durability(d).map_err(|e| e.to_string())?;
        Ok(txn)
    }

    fn run_batch(&mut self, ops: Vec<ReplicaOp>) -> Result<Vec<ReplicaOutcome>, String> {
        let read_only = |op: &ReplicaOp| {
            matches!(
                op,
                ReplicaOp::Read { .. }
                    | ReplicaOp::ReadLeaves { .. }
                    | ReplicaOp::Tree { .. }
                    | ReplicaOp::ScanHints { .. }
                    | ReplicaOp::Tombstones { .. }
                    | ReplicaOp::Reap(ReapStep::Check { .. })
            )
        };
        if ops.iter().all(read_only) {
            // Reads alone need no commit, and so no fsync.
            let txn = self.db.begin_read().map_err(|e| e.to_string())?;
            let mut store = ReadStore {
                objects: txn.open_table(OBJECTS).map_err(|e| e.to_string())?,
                hints: txn.open_table(HINTS).map_err(|e| e.to_string())?,
                trees: &self.trees,
                q: self.q,
            };
            return Ok(ops.into_iter().map(|op| replica::execute(&mut store, op, self.limits)).collect());
        }
        let txn = self.begin()?;
        let (outcomes, deltas) = {
            let mut store = TxnStore { txn: &txn, trees: &self.trees, deltas: Vec::new(), q: self.q, error: None };
            let outcomes: Vec<ReplicaOutcome> =
                ops.into_iter().map(|op| replica::execute(&mut store, op, self.limits)).collect();
            if let Some(e) = store.error {
                return Err(e);
            }
            (outcomes, store.deltas)
        };
        txn.commit().map_err(|e| e.to_string())?;
        for (p, key, old, new) in deltas {
            self.trees[p].update(&key, old.as_ref(), new.as_ref());
        }
        Ok(outcomes)
    }
}

/// Execute a batch of operations in one transaction.
#[derive(Message)]
#[rtype(result = "Result<Vec<ReplicaOutcome>, String>")]
struct Batch(Vec<ReplicaOp>);

impl Handler<Batch> for StorageWorker {
    type Result = Result<Vec<ReplicaOutcome>, String>;
    fn handle(&mut self, msg: Batch, _: &mut Self::Context) -> Self::Result {
        self.run_batch(msg.0)
    }
}

/// Read-only and maintenance requests.
#[derive(Message, Debug)]
#[rtype(result = "Result<Answer, String>")]
pub enum Query {
    /// Key count and Merkle root of each listed partition.
    Partitions(Vec<u32>),
    /// Hints held, counted by intended node.
    HintCounts,
    SaveMembers(Vec<Member>),
    /// Make buffered commits durable.
    Flush,
    /// Partitions holding at least one owned key.
    Held,
}

#[derive(Debug)]
pub enum Answer {
    Partitions(Vec<(u32, u64, String)>),
    HintCounts(BTreeMap<String, u64>),
    Held(Vec<u32>),
    Done,
}

impl Handler<Query> for StorageWorker {
    type Result = Result<Answer, String>;
    fn handle(&mut self, q: Query, _: &mut Self::Context) -> Self::Result {
        match q {
            Query::Partitions(ps) => Ok(Answer::Partitions(
                ps.into_iter()
                    .filter_map(|p| self.trees.get(p as usize).map(|t| (p, t.keys(), t.root_hex())))
                    .collect(),
            )),
            Query::HintCounts => {
                let txn = self.db.begin_read().map_err(|e| e.to_string())?;
                let t = txn.open_table(HINTS).map_err(|e| e.to_string())?;
                let mut counts = BTreeMap::new();
                if t.len().map_err(|e| e.to_string())? > 0 {
                    for row in t.iter().map_err(|e| e.to_string())? {
                        let (k, _) = row.map_err(|e| e.to_string())?;
                        if let Some((intended, _)) = split_hint_key(k.value()) {
                            *counts.entry(intended.to_string()).or_insert(0) += 1;
                        }
                    }
                }
                Ok(Answer::HintCounts(counts))
            }
            Query::SaveMembers(members) => {
                let bytes = rmp_serde::to_vec(&members).map_err(|e| e.to_string())?;
                let mut txn = self.db.begin_write().map_err(|e| e.to_string())?;
                txn.set_durability(Durability::Immediate).map_err(|e| e.to_string())?;
                txn.open_table(META)
                    .map_err(|e| e.to_string())?
                    .insert(META_MEMBERS, bytes.as_slice())
                    .map_err(|e| e.to_string())?;
                txn.commit().map_err(|e| e.to_string())?;
                Ok(Answer::Done)
            }
            Query::Held => Ok(Answer::Held(held(&self.trees))),
            Query::Flush => {
                let mut txn = self.db.begin_write().map_err(|e| e.to_string())?;
                txn.set_durability(Durability::Immediate).map_err(|e| e.to_string())?;
                txn.commit().map_err(|e| e.to_string())?;
                Ok(Answer::Done)
            }
        }
    }
}

/// The front of the Storage stage: group commit.
pub struct Storage {
    worker: Addr<StorageWorker>,
    /// This node's dot issuer for writes it coordinates (a fresh epoch per start).
    actor: DotActor,
    pending: VecDeque<(ReplicaOp, oneshot::Sender<Result<ReplicaOutcome, String>>)>,
    busy: bool,
    batch_max: usize,
    pending_max: usize,
    flush_interval: Option<Duration>,
}

impl Storage {
    pub fn new(
        worker: Addr<StorageWorker>,
        actor: DotActor,
        batch_max: usize,
        flush_interval: Option<Duration>,
    ) -> Self {
        Storage {
            worker,
            actor,
            pending: VecDeque::new(),
            busy: false,
            batch_max: batch_max.max(1),
            pending_max: 64 * 1024,
            flush_interval,
        }
    }

    fn kick(&mut self, ctx: &mut Context<Self>) {
        if self.busy || self.pending.is_empty() {
            return;
        }
        self.busy = true;
        let n = self.pending.len().min(self.batch_max);
        let (ops, replies): (Vec<_>, Vec<_>) = self.pending.drain(..n).unzip();
        self.worker
            .send(Batch(ops))
            .into_actor(self)
            .map(move |res, act, ctx| {
                let res = res.unwrap_or_else(|e| Err(format!("storage worker gone: {e}")));
                match res {
                    Ok(outcomes) => {
                        if outcomes.iter().any(ReplicaOutcome::dropped_data) {
                            // Local data was dropped: never issue dots from this epoch again.
                            act.actor = DotActor(rand::random());
                        }
                        for (tx, out) in replies.into_iter().zip(outcomes) {
                            let _ = tx.send(Ok(out));
                        }
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "storage commit failed");
                        for tx in replies {
                            let _ = tx.send(Err(e.clone()));
                        }
                    }
                }
                act.busy = false;
                act.kick(ctx);
            })
            .spawn(ctx);
    }
}

impl Actor for Storage {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        ctx.set_mailbox_capacity(64 * 1024);
        if let Some(every) = self.flush_interval {
            ctx.run_interval(every, |act, _| {
                act.worker.do_send(Query::Flush);
            });
        }
    }
}

/// Carry out a replica request on this node's data.
#[derive(Message)]
#[rtype(result = "Result<ReplicaOutcome, String>")]
pub struct Execute(pub ReplicaRequest);

impl Storage {
    fn enqueue(&mut self, op: ReplicaOp, ctx: &mut Context<Self>) -> ResponseFuture<Result<ReplicaOutcome, String>> {
        if self.pending.len() >= self.pending_max {
            return Box::pin(async { Err("storage overloaded".into()) });
        }
        let (tx, rx) = oneshot::channel();
        self.pending.push_back((op, tx));
        self.kick(ctx);
        Box::pin(async move { rx.await.unwrap_or_else(|_| Err("storage stopped".into())) })
    }
}

/// Run any replica operation (background stages use these).
#[derive(Message)]
#[rtype(result = "Result<ReplicaOutcome, String>")]
pub struct Run(pub ReplicaOp);

/// Run `op` on `storage`; None if it failed (the failure is logged by the storage stage).
pub fn run(storage: &Addr<Storage>, op: ReplicaOp) -> impl std::future::Future<Output = Option<ReplicaOutcome>> {
    let s = storage.clone();
    async move { s.send(Run(op)).await.ok().and_then(|r| r.ok()) }
}

impl Handler<Run> for Storage {
    type Result = ResponseFuture<Result<ReplicaOutcome, String>>;
    fn handle(&mut self, msg: Run, ctx: &mut Context<Self>) -> Self::Result {
        self.enqueue(msg.0, ctx)
    }
}

impl Handler<Execute> for Storage {
    type Result = ResponseFuture<Result<ReplicaOutcome, String>>;

    fn handle(&mut self, msg: Execute, ctx: &mut Context<Self>) -> Self::Result {
        let Some(op) = msg.0.into_op(self.actor, crate::clock::wall_ms()) else {
            return Box::pin(async { Err("a forwarded put is not a storage operation".into()) });
        };
        self.enqueue(op, ctx)
    }
}

/// Pass a query through to the worker.
impl Handler<Query> for Storage {
    type Result = ResponseFuture<Result<Answer, String>>;
    fn handle(&mut self, q: Query, _: &mut Context<Self>) -> Self::Result {
        let worker = self.worker.clone();
        Box::pin(async move { worker.send(q).await.unwrap_or_else(|e| Err(e.to_string())) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hint_keys_round_trip() {
        let k = hint_key("n3", b"user:1");
        assert_eq!(split_hint_key(&k), Some(("n3", b"user:1".as_slice())));
        assert_eq!(split_hint_key(&[0, 0, 0, 9, b'a']), None);
        assert_eq!(split_hint_key(&hint_key("n3", b"")), Some(("n3", b"".as_slice())));
        assert_eq!(split_hint_key(&[]), None);
    }

    #[test]
    fn batch_writes_survive_reopen_and_rebuild_trees() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db.redb");
        let mut w = open(&path, 16, DurabilityMode::Sync, ReplicaLimits::default()).unwrap();
        let ops = (0..50u32)
            .map(|i| ReplicaOp::Coordinate {
                key: format!("k{i}").into_bytes(),
                context: Default::default(),
                value: Some(vec![1; 10]),
                hint: None,
                actor: DotActor(1),
                now_ms: 1,
            })
            .collect();
        let out = w.run_batch(ops).unwrap();
        assert_eq!(out.len(), 50);
        // A partition scan stops at its limit, in key order, within the partition.
        let p = (0..16).find(|&p| w.trees[p as usize].keys() >= 3).unwrap();
        let scan = w.run_batch(vec![ReplicaOp::ReadLeaves { partition: p, leaves: None, limit: 2 }]).unwrap();
        let ReplicaOutcome::Objects(objs) = &scan[0] else { panic!("{scan:?}") };
        assert_eq!(objs.len(), 2);
        assert!(objs.windows(2).all(|x| x[0].0 < x[1].0));
        assert!(objs.iter().all(|(k, _)| partition_of(k, 16) == p as usize));
        let roots: Vec<u128> = w.trees.iter().map(|t| t.root()).collect();
        drop(w);
        let w = open(&path, 16, DurabilityMode::Sync, ReplicaLimits::default()).unwrap();
        assert_eq!(w.trees.iter().map(|t| t.root()).collect::<Vec<_>>(), roots);
        assert_eq!(w.trees.iter().map(|t| t.keys()).sum::<u64>(), 50);
    }
}
