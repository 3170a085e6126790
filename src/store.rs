//! A replica's local store (Dynamo §4, "local persistence engine"; §4.6 hinted replicas;
//! §4.7 Merkle trees): how a node keeps its copies of keys in a plain ordered key-value
//! engine, and every operation the node runs on them.
//!
//! The engine is anything that offers tables of ordered byte keys inside a transaction
//! ([`Engine`]): redb on a node, [`MemEngine`] in tests and the simulation. Everything
//! above the bytes lives here, so both run the same code: the row layout, the checksummed
//! row encoding, merging, coordination of writes under a new dot, Merkle upkeep, hint
//! bookkeeping, reaped-tombstone records, and what happens when a row cannot be read.
//!
//! Tables and row keys:
//! - `objects`: partition (u32 BE) then the key, so a partition is one range. Value: the
//!   object and the actor that coordinates writes into this row (see [`crate::version`]).
//! - `hints`: key length (u32 BE), key, intended node: the hints of a key are one range.
//!   Value: when the hint row was last written, its actor, the object.
//! - `hint_index`: intended node (length-prefixed) then key, so one node's hints are one
//!   range (delivery is served node by node, round-robin).
//! - `reaped`: the object-key layout. Value: when the key's tombstone was reaped and its
//!   clock. Any later merge of that key first drops what the clock covers, so a stale copy
//!   (a hint, a transfer, an exchange from a node that was away) cannot bring a deleted
//!   value back while the record is kept (`storage.reaped_retention_ms`).
//! - `quarantine`: rows that failed their checksum or did not decode, moved aside with
//!   their bytes; the Merkle leaf is recomputed without them, so anti-entropy refills them.
//! - `meta`: the node's member table, its epoch and the count of actors it has drawn.
//!
//! An I/O error fails the operation (and a failed commit the batch); a row that does not
//! decode is never read as "absent": the operation that met it fails with
//! [`StoreError::Corrupt`] and the row is quarantined, without failing the other
//! operations that share its transaction (group commit).
//!
//! [`StoreState::run`] executes a batch against an open transaction and returns each
//! operation's outcome plus the in-memory changes ([`Pending`]) to apply with
//! [`StoreState::commit`] once, and only if, the engine committed.

use std::borrow::Cow;
use std::collections::BTreeMap;

use md5::{Digest, Md5};
use serde::{Deserialize, Serialize};

use crate::membership::Member;
use crate::merkle::{item_hash, leaf_of, Hash, MerkleTree};
use crate::namespace::{self, class_of};
use crate::ring::{key_position, partition_of_position, NodeId};
use crate::version::{Actor, Object, VersionVector};

/// The tables of the layout.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Table {
    Objects,
    Hints,
    HintIndex,
    Reaped,
    Quarantine,
    Meta,
}

impl Table {
    pub const ALL: [Table; 6] =
        [Table::Objects, Table::Hints, Table::HintIndex, Table::Reaped, Table::Quarantine, Table::Meta];

    pub fn name(self) -> &'static str {
        match self {
            Table::Objects => "objects",
            Table::Hints => "hints",
            Table::HintIndex => "hint_index",
            Table::Reaped => "reaped",
            Table::Quarantine => "quarantine",
            Table::Meta => "meta",
        }
    }

    fn tag(self) -> u8 {
        self as u8
    }
}

/// An engine failure (I/O, a transaction that cannot proceed).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct EngineError(pub String);

/// What a scan calls with each row (key, value) in order; it returns false to stop.
pub type Visit<'a> = &'a mut dyn FnMut(&[u8], &[u8]) -> bool;

/// What [`Engine::read`] hands a row's bytes to (None: no row).
pub type Read<'a> = &'a mut dyn FnMut(Option<&[u8]>);

/// One transaction of an ordered key-value engine: the only thing a storage backend
/// implements. Reads see the transaction's own writes.
pub trait Engine {
    fn get(&self, table: Table, key: &[u8]) -> Result<Option<Vec<u8>>, EngineError>;
    /// Hand the row's bytes (None: no row) to `read`, lent rather than copied out where the
    /// engine can: rows are decoded straight from the engine's pages.
    fn read(&self, table: Table, key: &[u8], read: Read<'_>) -> Result<(), EngineError> {
        read(self.get(table, key)?.as_deref());
        Ok(())
    }
    fn put(&mut self, table: Table, key: &[u8], value: &[u8]) -> Result<(), EngineError>;
    fn delete(&mut self, table: Table, key: &[u8]) -> Result<(), EngineError>;
    /// Visit rows with `from <= key < to` (no upper bound when `to` is None) in key order
    /// until `visit` returns false.
    fn scan(&self, table: Table, from: &[u8], to: Option<&[u8]>, visit: Visit<'_>) -> Result<(), EngineError>;
    /// False for a read-only transaction: writes fail and quarantine waits for a later
    /// write batch.
    fn writable(&self) -> bool {
        true
    }
}

/// The reads of one transaction: what a read-only transaction (a snapshot) implements;
/// [`ReadOnly`] makes it an [`Engine`].
pub trait EngineReads {
    fn get(&self, table: Table, key: &[u8]) -> Result<Option<Vec<u8>>, EngineError>;
    /// As [`Engine::read`].
    fn read(&self, table: Table, key: &[u8], read: Read<'_>) -> Result<(), EngineError> {
        read(self.get(table, key)?.as_deref());
        Ok(())
    }
    /// As [`Engine::scan`].
    fn scan(&self, table: Table, from: &[u8], to: Option<&[u8]>, visit: Visit<'_>) -> Result<(), EngineError>;
}

impl<E: EngineReads + ?Sized> EngineReads for &E {
    fn get(&self, table: Table, key: &[u8]) -> Result<Option<Vec<u8>>, EngineError> {
        (**self).get(table, key)
    }
    fn read(&self, table: Table, key: &[u8], read: Read<'_>) -> Result<(), EngineError> {
        (**self).read(table, key, read)
    }
    fn scan(&self, table: Table, from: &[u8], to: Option<&[u8]>, visit: Visit<'_>) -> Result<(), EngineError> {
        (**self).scan(table, from, to, visit)
    }
}

/// A read-only transaction as an [`Engine`]: its writes fail.
pub struct ReadOnly<E>(pub E);

impl<E: EngineReads> Engine for ReadOnly<E> {
    fn get(&self, table: Table, key: &[u8]) -> Result<Option<Vec<u8>>, EngineError> {
        self.0.get(table, key)
    }
    fn read(&self, table: Table, key: &[u8], read: Read<'_>) -> Result<(), EngineError> {
        self.0.read(table, key, read)
    }
    fn put(&mut self, _: Table, _: &[u8], _: &[u8]) -> Result<(), EngineError> {
        Err(EngineError("read-only transaction".into()))
    }
    fn delete(&mut self, _: Table, _: &[u8]) -> Result<(), EngineError> {
        Err(EngineError("read-only transaction".into()))
    }
    fn scan(&self, table: Table, from: &[u8], to: Option<&[u8]>, visit: Visit<'_>) -> Result<(), EngineError> {
        self.0.scan(table, from, to, visit)
    }
    fn writable(&self) -> bool {
        false
    }
}

/// Why an operation failed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
pub enum StoreError {
    #[error("storage I/O failed: {0}")]
    Io(String),
    #[error("a stored row of {table} cannot be read ({detail}); it is quarantined and anti-entropy refills it")]
    Corrupt { table: String, key: Vec<u8>, detail: String },
}

impl From<EngineError> for StoreError {
    fn from(e: EngineError) -> Self {
        StoreError::Io(e.0)
    }
}

/// Limits the store enforces on coordinated writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StoreLimits {
    /// Siblings a key may hold before a write that adds one is refused.
    pub siblings_max: usize,
    /// Clock entries past which a coordinated write prunes the oldest.
    pub prune_threshold: usize,
    /// Bytes a key's siblings may hold together before a write that grows it is refused
    /// (so every object fits in a frame).
    pub object_bytes_max: usize,
}

impl Default for StoreLimits {
    fn default() -> Self {
        StoreLimits {
            siblings_max: 100,
            prune_threshold: crate::version::PRUNE_THRESHOLD_DEFAULT,
            object_bytes_max: 8 * 1024 * 1024,
        }
    }
}

/// Why a coordinated write was refused (the client's request is at fault; nothing changed).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
pub enum Refusal {
    #[error(
        "the key has {0} siblings, over limits.max_siblings: read it and write back with its context to resolve them"
    )]
    TooManySiblings(usize),
    #[error("the key's values would take {bytes} bytes together, over limits.object_bytes_max ({max}): read it and write back with its context to resolve its siblings")]
    TooLarge { bytes: usize, max: usize },
}

/// An operation on a node's local store.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StoreOp {
    /// The node's state of a key, its owned and hinted copies merged, with its digest.
    Read { key: Vec<u8> },
    /// The digest of what `Read` answers (an owned row's stored digest when no hint or
    /// reaped record adds to it: no hashing, and the object is not decoded).
    ReadDigest { key: Vec<u8> },
    /// Merge a state; with `hint`, into the row kept for that node.
    Write { key: Vec<u8>, object: Object, hint: Option<NodeId> },
    /// Coordinate a client's write: apply it under a new dot of the target row's actor.
    Coordinate { key: Vec<u8>, context: VersionVector, value: Option<Vec<u8>>, hint: Option<NodeId>, now_wall_ms: u64 },
    /// Merge states as owned data (handoff, transfer, anti-entropy).
    Merge { objects: Vec<(Vec<u8>, Object)> },
    /// Owned objects of a partition, in `leaves` when given, after key `after`, at most
    /// `bytes_max` bytes (at least one object when any is left).
    Page { tree: TreeId, leaves: Option<Vec<u32>>, after: Option<Vec<u8>>, bytes_max: usize },
    /// One Merkle tree (a partition's keys of one namespace).
    Tree { tree: TreeId },
    /// Hints held for `intended`, after key `after`, at most `bytes_max` bytes.
    HintPage { intended: NodeId, after: Option<Vec<u8>>, bytes_max: usize },
    /// Drop hints held for `intended` that still have these digests (delivered).
    RemoveHints { intended: NodeId, keys: Vec<(Vec<u8>, [u8; 16])> },
    /// Drop owned keys that still have these digests (transferred to their owners).
    RemoveObjects { keys: Vec<(Vec<u8>, [u8; 16])> },
    /// Owned tombstone-only keys of a partition last written before `before_wall_ms`.
    Tombstones { tree: TreeId, before_wall_ms: u64, limit: usize },
    /// Reaping, one replica's part: do we hold exactly this state?
    ReapCheck { key: Vec<u8>, digest: [u8; 16] },
    /// Reaping: remove the key if it still has this state, keeping a reaped record.
    ReapRemove { key: Vec<u8>, digest: [u8; 16] },
    /// Drop reaped records older than `before_wall_ms`, scanning at most `limit` after `after`.
    SweepReaped { after: Option<Vec<u8>>, before_wall_ms: u64, limit: usize },
    /// Trees holding owned keys (with their key counts), and hints held by intended node.
    Inventory,
    /// Key count and Merkle root of each listed partition's default namespace, and of
    /// each other namespace holding keys in it.
    Summaries { partitions: Vec<u32> },
    /// Persist the member table.
    SaveMembers { members: Vec<Member> },
    /// Persist the cluster's namespaces.
    SaveNamespaces { namespaces: Vec<namespace::Namespace> },
    /// Move an unreadable row aside (a read-only batch found it).
    Quarantine { table: Table, row_key: Vec<u8> },
    /// A peer reaped these keys' tombstones: drop what each record covers and keep the
    /// record, as if this replica had taken part in the reaping.
    AdoptReaped { entries: Vec<(Vec<u8>, ReapedRow)> },
    /// The node stops cleanly: every commit is durable (run it durably).
    Close,
}

impl StoreOp {
    /// Whether the operation only reads (it can run in a read transaction, off the writer).
    pub fn is_read_only(&self) -> bool {
        matches!(
            self,
            StoreOp::Read { .. }
                | StoreOp::ReadDigest { .. }
                | StoreOp::Page { .. }
                | StoreOp::Tree { .. }
                | StoreOp::HintPage { .. }
                | StoreOp::Tombstones { .. }
                | StoreOp::ReapCheck { .. }
                | StoreOp::Inventory
                | StoreOp::Summaries { .. }
        )
    }

    /// Whether the operation reads rows and nothing of the store's in-memory state (no
    /// Merkle tree, no hint count): a [`StoreReader`] runs it in any read snapshot, beside
    /// the writer, so a replica read never waits behind a group commit.
    pub fn reads_rows_only(&self) -> bool {
        matches!(self, StoreOp::Read { .. } | StoreOp::ReadDigest { .. } | StoreOp::ReapCheck { .. })
    }
}

/// What an operation produced.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StoreOutcome {
    /// A digest read: the digest of the key's state, None when there is none.
    Digest(Option<[u8; 16]>),
    /// A read: the key's state and its digest, None when there is none.
    State(Option<(Object, [u8; 16])>),
    /// A write merged; `changed` is false when the store had it all.
    Written {
        changed: bool,
    },
    Coordinated(Result<Object, Refusal>),
    /// States merged; how many keys changed, and the keys whose incoming state a reaped
    /// tombstone here covered entirely, with that record (the sender should adopt it).
    Merged {
        changed: usize,
        reaped: Vec<(Vec<u8>, ReapedRow)>,
    },
    /// A page of objects and where the next one starts (None: the end).
    Page {
        objects: Vec<(Vec<u8>, Object)>,
        next: Option<Vec<u8>>,
    },
    Tree(MerkleTree),
    /// Hints: (key, object, when the hint row was last written), and the cursor.
    Hints {
        hints: Vec<(Vec<u8>, Object, u64)>,
        next: Option<Vec<u8>>,
    },
    Removed {
        count: usize,
    },
    Tombstones(Vec<([u8; 16], Vec<u8>)>),
    /// Reaping: `yes` when the replica holds the state (check) or no longer holds the key
    /// (remove).
    Reaped {
        yes: bool,
    },
    Swept {
        removed: usize,
        next: Option<Vec<u8>>,
    },
    Inventory {
        held: Vec<TreeId>,
        hints: BTreeMap<NodeId, u64>,
        /// Owned keys in each held tree (from its Merkle tree: no rows are read).
        tree_keys: BTreeMap<TreeId, u64>,
    },
    Summaries(Vec<PartitionSummary>),
    Done,
}

/// A key's partition.
pub fn partition_of(key: &[u8], q: u32) -> u32 {
    partition_of_position(key_position(key), q)
}

/// The keys one Merkle tree covers: a partition's keys of one namespace (`ns` is the
/// namespace's store-key prefix, empty for the default namespace; see [`crate::namespace`]).
/// Anti-entropy, transfers and reaping work tree by tree, each with its namespace's N.
#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct TreeId {
    pub partition: u32,
    #[serde(with = "serde_bytes")]
    pub ns: Vec<u8>,
}

impl TreeId {
    /// The default namespace's tree of `partition`.
    pub fn default_of(partition: u32) -> TreeId {
        TreeId { partition, ns: Vec::new() }
    }

    /// The tree `key` belongs to.
    pub fn of(key: &[u8], q: u32) -> TreeId {
        TreeId { partition: partition_of(key, q), ns: class_of(key).prefix.to_vec() }
    }

    /// Whether `key` belongs to this tree (its partition is checked by the caller's scan).
    pub fn holds(&self, key: &[u8]) -> bool {
        class_of(key).prefix == self.ns.as_slice()
    }

    /// N of this tree's keys, given the cluster's.
    pub fn n_or(&self, cluster_n: usize) -> usize {
        class_of(&self.ns).n_or(cluster_n)
    }

    /// The namespace's name, as `admin partitions` shows it.
    pub fn namespace_name(&self) -> &str {
        namespace::name_of_prefix(&self.ns)
    }

    /// The row keys to scan for this tree: the namespace's rows of the partition (the
    /// default namespace's range also holds the others', which scans skip).
    fn bounds(&self) -> (Vec<u8>, Option<Vec<u8>>) {
        let (lo, hi) = partition_bounds(self.partition);
        if self.ns.is_empty() {
            return (lo, hi);
        }
        let start = [&lo[..], &self.ns].concat();
        let end = prefix_end(&start).or(hi);
        (start, end)
    }
}

/// What a node saved of the cluster: the member table and the namespaces.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Saved {
    pub members: Vec<Member>,
    pub namespaces: Vec<namespace::Namespace>,
}

/// One partition as `admin partitions` shows it: its default namespace's key count and
/// Merkle root, and each other namespace's (name, keys, root) there.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PartitionSummary {
    pub partition: u32,
    pub keys: u64,
    pub root: String,
    pub namespaces: Vec<(String, u64, String)>,
}

fn object_row_key(key: &[u8], q: u32) -> Vec<u8> {
    let mut out = Vec::with_capacity(4 + key.len());
    out.extend_from_slice(&partition_of(key, q).to_be_bytes());
    out.extend_from_slice(key);
    out
}

fn partition_bounds(partition: u32) -> (Vec<u8>, Option<Vec<u8>>) {
    let lo = partition.to_be_bytes().to_vec();
    let hi = partition.checked_add(1).map(|p| p.to_be_bytes().to_vec());
    (lo, hi)
}

fn key_of_object_row(row_key: &[u8]) -> Option<&[u8]> {
    row_key.get(4..)
}

fn hint_prefix(key: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(4 + key.len() + 8);
    out.extend_from_slice(&(key.len() as u32).to_be_bytes());
    out.extend_from_slice(key);
    out
}

fn hint_row_key(key: &[u8], intended: &str) -> Vec<u8> {
    let mut out = hint_prefix(key);
    out.extend_from_slice(intended.as_bytes());
    out
}

fn split_hint_row_key(row: &[u8]) -> Option<(&[u8], &str)> {
    let len = u32::from_be_bytes(row.get(..4)?.try_into().ok()?) as usize;
    let key = row.get(4..4usize.checked_add(len)?)?;
    let intended = std::str::from_utf8(row.get(4 + len..)?).ok()?;
    Some((key, intended))
}

fn index_prefix(intended: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(2 + intended.len() + 16);
    out.extend_from_slice(&(intended.len().min(u16::MAX as usize) as u16).to_be_bytes());
    out.extend_from_slice(intended.as_bytes());
    out
}

fn index_key(intended: &str, key: &[u8]) -> Vec<u8> {
    let mut out = index_prefix(intended);
    out.extend_from_slice(key);
    out
}

fn split_index_key(row: &[u8]) -> Option<(&str, &[u8])> {
    let len = u16::from_be_bytes(row.get(..2)?.try_into().ok()?) as usize;
    let intended = std::str::from_utf8(row.get(2..2 + len)?).ok()?;
    Some((intended, row.get(2 + len..)?))
}

/// The smallest byte string greater than every string starting with `prefix`.
fn prefix_end(prefix: &[u8]) -> Option<Vec<u8>> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return Some(end);
        }
    }
    None
}

/// The first key after `k` in byte order.
fn successor(k: &[u8]) -> Vec<u8> {
    let mut s = k.to_vec();
    s.push(0);
    s
}

/// Row value formats: a format byte, a checksum of the body, the MessagePack body. Format 1
/// checksums with the first 8 bytes of MD5; format 2 (written now) with CRC32, an order of
/// magnitude cheaper on every read and write. Both are read.
const ROW_FORMAT_MD5: u8 = 1;
const ROW_FORMAT: u8 = 2;
const META_MEMBERS: &[u8] = b"members";
const META_NAMESPACES: &[u8] = b"namespaces";
const META_EPOCH: &[u8] = b"epoch";
const META_ACTORS: &[u8] = b"actors";
const META_GENERATION: &[u8] = b"generation";
const META_OPEN: &[u8] = b"open";

/// The checksum of a row body in a format, None for an unknown format.
fn checksum(format: u8, body: &[u8]) -> Option<Vec<u8>> {
    match format {
        ROW_FORMAT_MD5 => Some(Md5::digest(body)[..8].to_vec()),
        ROW_FORMAT => Some(crc32fast::hash(body).to_le_bytes().to_vec()),
        _ => None,
    }
}

/// Encode a row value: a format byte, a checksum of the body, the MessagePack body.
pub fn seal<T: Serialize>(value: &T) -> Result<Vec<u8>, StoreError> {
    // The format byte and room for the checksum, then the body encoded in place.
    let mut out = Vec::with_capacity(ROW_BYTES_GUESS);
    out.extend_from_slice(&[ROW_FORMAT, 0, 0, 0, 0]);
    rmp_serde::encode::write(&mut out, value).map_err(|e| StoreError::Io(format!("cannot encode a row: {e}")))?;
    let sum = crc32fast::hash(&out[5..]).to_le_bytes();
    out[1..5].copy_from_slice(&sum);
    Ok(out)
}

/// Room a row's encoding starts with (most rows fit; a longer one grows as it goes).
const ROW_BYTES_GUESS: usize = 512;

/// Decode a row value written by [`seal`]; an error names what is wrong.
pub fn unseal<T: for<'de> Deserialize<'de>>(bytes: &[u8]) -> Result<T, String> {
    let (&format, rest) = bytes.split_first().ok_or("empty row")?;
    let width = match format {
        ROW_FORMAT_MD5 => 8,
        ROW_FORMAT => 4,
        _ => return Err(format!("unknown row format {format}")),
    };
    let (sum, body) = rest.split_at_checked(width).ok_or("row shorter than its checksum")?;
    if Some(sum) != checksum(format, body).as_deref() {
        return Err("checksum mismatch".into());
    }
    rmp_serde::from_slice(body).map_err(|e| format!("undecodable row: {e}"))
}

/// An owned row: the object and the actor that coordinates writes into this row.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ObjectRow {
    pub actor: Option<Actor>,
    pub object: Object,
    /// The store's generation when `actor` was last used: an actor of an older generation
    /// may have issued dots a crash rolled back, so it is never used again.
    #[serde(default)]
    pub generation: u64,
    /// The object's digest as stored beside it (rows are always written with a fresh one,
    /// by `set_owned`), so that replacing or removing a row and answering a digest read need
    /// not hash the object again (the trees built at start hash every object, and a row
    /// whose stored digest is wrong is written again). None in rows built in memory and in
    /// rows of older data directories: [`ObjectRow::digest`] computes it then.
    #[serde(default)]
    pub stored_digest: Option<u128>,
}

impl ObjectRow {
    /// The object's digest: the stored one when the row was read, else computed.
    pub fn digest(&self) -> [u8; 16] {
        match self.stored_digest {
            Some(d) => d.to_be_bytes(),
            None => self.object.digest(),
        }
    }
}

/// How an owned row is written: its fields and the object's digest computed now, in the
/// layout [`ObjectRow`] reads (without copying the object).
#[derive(Serialize)]
struct ObjectRowOut<'a> {
    actor: Option<Actor>,
    object: &'a Object,
    generation: u64,
    stored_digest: Option<u128>,
}

impl<'a> ObjectRowOut<'a> {
    fn of(row: &'a ObjectRow, digest: [u8; 16]) -> ObjectRowOut<'a> {
        ObjectRowOut {
            actor: row.actor,
            object: &row.object,
            generation: row.generation,
            stored_digest: Some(u128::from_be_bytes(digest)),
        }
    }
}

/// A hinted row: as an owned row, and when it was last written (a hint nobody wrote to
/// for the reaped-record retention expires).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HintRow {
    pub written_wall_ms: u64,
    pub actor: Option<Actor>,
    pub object: Object,
    /// As [`ObjectRow::generation`].
    #[serde(default)]
    pub generation: u64,
}

/// A reaped tombstone's record.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReapedRow {
    pub reaped_wall_ms: u64,
    pub clock: VersionVector,
    /// The digest of the state reaped (absent in records written before it was kept).
    #[serde(default)]
    pub digest: Option<[u8; 16]>,
}

/// Decode a stored owned row, checking the object's invariants.
pub fn decode_object_row(bytes: &[u8]) -> Result<ObjectRow, String> {
    let row: ObjectRow = unseal(bytes)?;
    row.object.validate().map_err(|e| e.to_string())?;
    Ok(row)
}

/// Decode a stored hint row, checking the object's invariants.
pub fn decode_hint_row(bytes: &[u8]) -> Result<HintRow, String> {
    let row: HintRow = unseal(bytes)?;
    row.object.validate().map_err(|e| e.to_string())?;
    Ok(row)
}

/// Decode a reaped tombstone's record, checking its clock (every later merge of the key
/// takes it in, so a bad one would make the key's object invalid).
pub fn decode_reaped_row(bytes: &[u8]) -> Result<ReapedRow, String> {
    let row: ReapedRow = unseal(bytes)?;
    row.clock.validate().map_err(|e| e.to_string())?;
    Ok(row)
}

/// Decode a stored member table.
pub fn decode_members(bytes: &[u8]) -> Result<Vec<Member>, String> {
    unseal(bytes)
}

/// Move an unreadable row of `table` aside into the quarantine table, bytes intact.
fn set_aside(engine: &mut dyn Engine, table: Table, row_key: &[u8], bytes: &[u8]) -> Result<(), EngineError> {
    let mut qk = vec![table.tag()];
    qk.extend_from_slice(row_key);
    engine.put(Table::Quarantine, &qk, bytes)?;
    engine.delete(table, row_key)
}

/// A change to the in-memory state, applied once the batch committed.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Change {
    Tree {
        partition: u32,
        key: Vec<u8>,
        old: Option<[u8; 16]>,
        new: Option<[u8; 16]>,
    },
    Leaf {
        tree: TreeId,
        leaf: u32,
        hash: Hash,
        removed: u64,
    },
    Hints {
        intended: NodeId,
        delta: i64,
    },
    Actors(u64),
    /// The generation is on disk.
    GenerationSaved,
}

/// What a batch changes in memory once committed, and follow-up work.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Pending {
    changes: Vec<Change>,
    /// Rows a read-only batch found unreadable: quarantine them in a write batch.
    pub quarantine: Vec<StoreOp>,
    /// Rows quarantined by this batch, for the log.
    pub quarantined: usize,
    /// Whether the batch wrote anything (a read-only batch needs no commit).
    pub wrote: bool,
}

/// Runs the operations that read rows only ([`StoreOp::reads_rows_only`]) in a read
/// snapshot, with none of the writer's in-memory state: the node serves replica reads on its
/// own thread this way while the writer commits. Any other operation is refused. Rows it
/// finds unreadable come back as quarantine operations for the writer
/// ([`Pending::quarantine`]), as from any read-only batch.
#[derive(Clone, Debug)]
pub struct StoreReader {
    state: StoreState,
}

impl StoreReader {
    pub fn run<E: EngineReads>(&self, engine: E, ops: Vec<StoreOp>, now_wall_ms: u64) -> BatchRun {
        if let Some(op) = ops.iter().find(|op| !op.reads_rows_only()) {
            let e = StoreError::Io(format!("a reader runs row reads only, not {op:?}"));
            return BatchRun {
                outcomes: ops.iter().map(|_| Err(e.clone())).collect(),
                pending: Pending::default(),
                failed: Some(e),
            };
        }
        self.state.run(&mut ReadOnly(engine), ops, now_wall_ms)
    }
}

/// The results of running one batch.
#[derive(Debug)]
pub struct BatchRun {
    pub outcomes: Vec<Result<StoreOutcome, StoreError>>,
    pub pending: Pending,
    /// An engine write failed: the transaction must be aborted; every outcome is an error.
    pub failed: Option<StoreError>,
}

impl Pending {
    /// The batch saves a new generation: the first to write since a commit failed
    /// ([`StoreState::abandon`]). What it numbers, it numbers under that generation, which
    /// is not on disk until the batch is: a restart after a crash would start the same
    /// generation again from the saved one, and number the same dots.
    pub fn saves_generation(&self) -> bool {
        self.changes.iter().any(|c| matches!(c, Change::GenerationSaved))
    }
}

impl BatchRun {
    /// The coordinated writes (by index in the batch) that may go to the other replicas
    /// before the batch commits (sync mode's `replicate_ahead`): all of them, unless the
    /// batch saves a new generation ([`Pending::saves_generation`]); then they wait for the
    /// commit, so that no dot leaves the node under a generation a restart could begin again.
    pub fn ahead(&self) -> impl Iterator<Item = (usize, &StoreOutcome)> {
        let allowed = self.failed.is_none() && !self.pending.saves_generation();
        self.coordinated().filter(move |_| allowed)
    }

    /// Every write the batch coordinated (by index in the batch), whether or not it may go
    /// ahead of the commit.
    pub fn coordinated(&self) -> impl Iterator<Item = (usize, &StoreOutcome)> {
        self.outcomes.iter().enumerate().filter_map(|(k, outcome)| match outcome {
            Ok(o @ StoreOutcome::Coordinated(Ok(_))) => Some((k, o)),
            _ => None,
        })
    }

    /// The batch must be durable before anything it did is acknowledged, whatever the
    /// durability mode: it saves a new generation ([`Pending::saves_generation`]), and a
    /// crash that lost it after its writes went out would let a restart number their dots
    /// again.
    pub fn must_be_durable(&self) -> bool {
        self.pending.saves_generation()
    }
}

/// What opening a store found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct OpenReport {
    pub objects: u64,
    pub hints: u64,
    pub quarantined: u64,
    /// Rows whose stored digest was not their object's: written again with the right one
    /// (the trees are always built from the objects themselves).
    pub digests_mended: u64,
    /// True when the store was new (no epoch yet): a fresh data directory.
    pub fresh: bool,
}

/// A node's store: the in-memory state kept beside the engine (Merkle trees, hint counts,
/// the actor source), and the operations.
#[derive(Clone, Debug)]
pub struct StoreState {
    q: u32,
    limits: StoreLimits,
    /// The default namespace's tree of each partition.
    trees: Vec<MerkleTree>,
    /// Other namespaces' trees, made when their first key arrives.
    ns_trees: BTreeMap<TreeId, MerkleTree>,
    hint_counts: BTreeMap<NodeId, u64>,
    epoch: u64,
    actors_drawn: u64,
    /// Bumped when a restart or a failed commit may have lost writes whose dots were seen
    /// elsewhere (acknowledged in `buffered` mode, or sent on ahead of their commit): actors
    /// of older generations are retired.
    generation: u64,
    /// A bump not yet on disk ([`StoreState::abandon`]).
    generation_unsaved: bool,
}

fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58476d1ce4e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d049bb133111eb);
    z ^ (z >> 31)
}

fn read_u64(engine: &dyn Engine, key: &[u8]) -> Result<Option<u64>, StoreError> {
    match engine.get(Table::Meta, key)? {
        None => Ok(None),
        Some(b) => {
            let arr: [u8; 8] = b.as_slice().try_into().map_err(|_| StoreError::Corrupt {
                table: "meta".into(),
                key: key.to_vec(),
                detail: "not 8 bytes".into(),
            })?;
            Ok(Some(u64::from_be_bytes(arr)))
        }
    }
}

impl StoreState {
    /// Open a store in a write transaction the caller commits afterwards: read or create
    /// the node's epoch (`fresh_epoch` is used for a new store), rebuild the Merkle trees and
    /// hint counts, and quarantine every row that cannot be read.
    pub fn open<E: Engine>(
        engine: &mut E,
        q: u32,
        limits: StoreLimits,
        fresh_epoch: u64,
    ) -> Result<(StoreState, OpenReport), StoreError> {
        let mut report = OpenReport::default();
        let epoch = match read_u64(engine, META_EPOCH)? {
            Some(e) => e,
            None => {
                report.fresh = true;
                engine.put(Table::Meta, META_EPOCH, &fresh_epoch.to_be_bytes())?;
                fresh_epoch
            }
        };
        let actors_drawn = read_u64(engine, META_ACTORS)?.unwrap_or(0);
        let generation = read_u64(engine, META_GENERATION)?.unwrap_or(0);
        let mut trees = vec![MerkleTree::new(); q as usize];
        let mut ns_trees: BTreeMap<TreeId, MerkleTree> = BTreeMap::new();
        let mut bad: Vec<(Table, Vec<u8>)> = Vec::new();
        let mut mend: Vec<(Vec<u8>, ObjectRow, [u8; 16])> = Vec::new();
        engine.scan(Table::Objects, &[], None, &mut |k, v| {
            match (key_of_object_row(k), decode_object_row(v)) {
                (Some(key), Ok(row)) if object_row_key(key, q) == k => {
                    let id = TreeId::of(key, q);
                    let tree = match id.ns.is_empty() {
                        true => trees.get_mut(id.partition as usize),
                        false => Some(ns_trees.entry(id).or_default()),
                    };
                    // Built from the object itself: a stored digest is trusted only for the
                    // rows this run writes or checked here.
                    let digest = row.object.digest();
                    if let Some(t) = tree {
                        t.insert(key, &digest);
                        report.objects += 1;
                    }
                    if row.stored_digest.is_some_and(|d| d != u128::from_be_bytes(digest)) {
                        mend.push((k.to_vec(), row, digest));
                    }
                }
                _ => bad.push((Table::Objects, k.to_vec())),
            }
            true
        })?;
        let mut hint_counts: BTreeMap<NodeId, u64> = BTreeMap::new();
        let mut indexed: Vec<(String, Vec<u8>)> = Vec::new();
        engine.scan(Table::Hints, &[], None, &mut |k, v| {
            match (split_hint_row_key(k), decode_hint_row(v)) {
                (Some((key, intended)), Ok(_)) => {
                    *hint_counts.entry(intended.to_string()).or_default() += 1;
                    indexed.push((intended.to_string(), key.to_vec()));
                    report.hints += 1;
                }
                _ => bad.push((Table::Hints, k.to_vec())),
            }
            true
        })?;
        // The index must name exactly the readable hints.
        let mut stale_index = Vec::new();
        engine.scan(Table::HintIndex, &[], None, &mut |k, _| {
            stale_index.push(k.to_vec());
            true
        })?;
        for k in stale_index {
            engine.delete(Table::HintIndex, &k)?;
        }
        for (intended, key) in &indexed {
            engine.put(Table::HintIndex, &index_key(intended, key), &[])?;
        }
        for (k, row, digest) in mend {
            let bytes = seal(&ObjectRowOut::of(&row, digest)).map_err(|e| EngineError(e.to_string()))?;
            engine.put(Table::Objects, &k, &bytes)?;
            report.digests_mended += 1;
        }
        for (table, k) in &bad {
            if let Some(bytes) = engine.get(*table, k)? {
                set_aside(engine, *table, k, &bytes)?;
            }
            report.quarantined += 1;
        }
        let state = StoreState {
            q,
            limits,
            trees,
            ns_trees,
            hint_counts,
            epoch,
            actors_drawn,
            generation,
            generation_unsaved: false,
        };
        Ok((state, report))
    }

    /// Mark the store open (in the transaction that opened it). When the last run did not
    /// close it, commits may have been lost with it (buffered durability) or writes sent on
    /// ahead of a commit that never landed (sync durability): begin a new generation, so every
    /// row's actor from before is retired and new actors differ from every one drawn before,
    /// even if the counter rolled back. Returns whether a new generation began.
    pub fn start<E: Engine>(&mut self, engine: &mut E) -> Result<bool, StoreError> {
        let unclean = engine.get(Table::Meta, META_OPEN)?.is_some();
        if unclean {
            self.generation = self.generation.checked_add(1).ok_or(StoreError::Io("generation exhausted".into()))?;
            engine.put(Table::Meta, META_GENERATION, &self.generation.to_be_bytes())?;
        }
        engine.put(Table::Meta, META_OPEN, &[1])?;
        Ok(unclean)
    }

    /// A list saved under `key` in the meta table (empty when none was saved).
    fn load_list<T: for<'de> Deserialize<'de>>(engine: &dyn EngineReads, key: &[u8]) -> Result<Vec<T>, StoreError> {
        match engine.get(Table::Meta, key)? {
            None => Ok(Vec::new()),
            Some(bytes) => {
                unseal(&bytes).map_err(|detail| StoreError::Corrupt { table: "meta".into(), key: key.to_vec(), detail })
            }
        }
    }

    /// The saved namespaces. Each is validated again where it is merged
    /// ([`namespace::Namespaces::merge`]).
    pub fn load_namespaces(engine: &dyn EngineReads) -> Result<Vec<namespace::Namespace>, StoreError> {
        Self::load_list(engine, META_NAMESPACES)
    }

    /// What a node starts from: its saved member table and namespaces.
    pub fn load_saved(engine: &dyn EngineReads) -> Result<Saved, StoreError> {
        Ok(Saved { members: Self::load_members(engine)?, namespaces: Self::load_namespaces(engine)? })
    }

    /// The saved member table.
    pub fn load_members(engine: &dyn EngineReads) -> Result<Vec<Member>, StoreError> {
        Self::load_list(engine, META_MEMBERS)
    }

    pub fn partitions(&self) -> u32 {
        self.q
    }

    /// The default namespace's tree of `partition`.
    pub fn tree(&self, partition: u32) -> Option<&MerkleTree> {
        self.trees.get(partition as usize)
    }

    /// Any tree; a namespace's tree that never held a key is empty.
    pub fn tree_of(&self, id: &TreeId) -> Option<MerkleTree> {
        match id.ns.is_empty() {
            true => self.trees.get(id.partition as usize).cloned(),
            false if id.partition < self.q => Some(self.ns_trees.get(id).cloned().unwrap_or_default()),
            false => None,
        }
    }

    fn tree_mut(&mut self, id: TreeId) -> Option<&mut MerkleTree> {
        match id.ns.is_empty() {
            true => self.trees.get_mut(id.partition as usize),
            false if id.partition < self.q => Some(self.ns_trees.entry(id).or_default()),
            false => None,
        }
    }

    /// Trees holding at least one owned key.
    pub fn held(&self) -> Vec<TreeId> {
        let default = self.trees.iter().enumerate().filter(|(_, t)| t.keys() > 0);
        let mut held: Vec<TreeId> = default.map(|(p, _)| TreeId::default_of(p as u32)).collect();
        held.extend(self.ns_trees.iter().filter(|(_, t)| t.keys() > 0).map(|(id, _)| id.clone()));
        held
    }

    /// Owned keys in each tree holding any.
    pub fn tree_keys(&self) -> BTreeMap<TreeId, u64> {
        let default = self.trees.iter().enumerate().filter(|(_, t)| t.keys() > 0);
        let mut keys: BTreeMap<TreeId, u64> = default.map(|(p, t)| (TreeId::default_of(p as u32), t.keys())).collect();
        keys.extend(self.ns_trees.iter().filter(|(_, t)| t.keys() > 0).map(|(id, t)| (id.clone(), t.keys())));
        keys
    }

    /// What `admin partitions` shows of `partition`.
    pub fn summary(&self, partition: u32) -> Option<PartitionSummary> {
        let t = self.trees.get(partition as usize)?;
        let namespaces = self
            .ns_trees
            .range(TreeId { partition, ns: Vec::new() }..)
            .take_while(|(id, _)| id.partition == partition)
            .filter(|(_, t)| t.keys() > 0)
            .map(|(id, t)| (id.namespace_name().to_string(), t.keys(), t.root_hex()))
            .collect();
        Some(PartitionSummary { partition, keys: t.keys(), root: t.root_hex(), namespaces })
    }

    /// Hints held, by intended node.
    pub fn hint_counts(&self) -> &BTreeMap<NodeId, u64> {
        &self.hint_counts
    }

    /// A reader for the operations that read rows only ([`StoreOp::reads_rows_only`]).
    pub fn reader(&self) -> StoreReader {
        StoreReader {
            state: StoreState {
                q: self.q,
                limits: self.limits,
                trees: Vec::new(),
                ns_trees: BTreeMap::new(),
                hint_counts: BTreeMap::new(),
                epoch: self.epoch,
                actors_drawn: self.actors_drawn,
                generation: self.generation,
                generation_unsaved: false,
            },
        }
    }

    /// Run a batch of operations in one transaction. Nothing in memory changes until
    /// [`commit`](Self::commit) is given the returned [`Pending`].
    /// `now_wall_ms` dates new hint rows and reaped records.
    pub fn run<E: Engine>(&self, engine: &mut E, ops: Vec<StoreOp>, now_wall_ms: u64) -> BatchRun {
        let count = ops.len();
        let mut exec =
            Exec { engine, state: self, pending: Pending::default(), actors_drawn: self.actors_drawn, now_wall_ms };
        let mut outcomes = Vec::with_capacity(count);
        let mut failed = None;
        for op in ops {
            match exec.execute(op) {
                Ok(o) => outcomes.push(Ok(o)),
                Err(Fault::Op(e)) => outcomes.push(Err(e)),
                Err(Fault::Batch(e)) => {
                    failed = Some(e);
                    break;
                }
            }
        }
        if failed.is_none() && self.generation_unsaved && exec.pending.wrote {
            match exec.engine.put(Table::Meta, META_GENERATION, &self.generation.to_be_bytes()) {
                Ok(()) => exec.pending.changes.push(Change::GenerationSaved),
                Err(e) => failed = Some(e.into()),
            }
        }
        if failed.is_none() && exec.actors_drawn != self.actors_drawn {
            match exec.engine.put(Table::Meta, META_ACTORS, &exec.actors_drawn.to_be_bytes()) {
                Ok(()) => exec.pending.changes.push(Change::Actors(exec.actors_drawn)),
                Err(e) => failed = Some(e.into()),
            }
        }
        let mut pending = exec.pending;
        if let Some(e) = &failed {
            // One error for every operation, those after the failing one included.
            outcomes = (0..count).map(|_| Err(e.clone())).collect();
            pending = Pending::default();
        }
        BatchRun { outcomes, pending, failed }
    }

    /// The batch's transaction committed: apply its in-memory changes.
    pub fn commit(&mut self, pending: &Pending) {
        for c in &pending.changes {
            match c {
                Change::Tree { partition, key, old, new } => {
                    let id = TreeId { partition: *partition, ns: class_of(key).prefix.to_vec() };
                    if let Some(t) = self.tree_mut(id) {
                        t.update(key, old.as_ref(), new.as_ref());
                    }
                }
                Change::Leaf { tree, leaf, hash, removed } => {
                    if let Some(t) = self.tree_mut(tree.clone()) {
                        t.set_leaf(*leaf, *hash, *removed);
                    }
                }
                Change::Hints { intended, delta } => {
                    let n = self.hint_counts.entry(intended.clone()).or_default();
                    *n = n.saturating_add_signed(*delta);
                    if *n == 0 {
                        self.hint_counts.remove(intended);
                    }
                }
                Change::Actors(n) => self.actors_drawn = *n,
                Change::GenerationSaved => self.generation_unsaved = false,
            }
        }
    }

    /// A batch computed but did not commit, and its coordinated writes may have been sent
    /// on ahead of the commit ([`crate::stage::Input::Ahead`]): their dots must never be
    /// issued again. Every actor of the current generation retires (the next batch that
    /// writes saves the new generation first).
    pub fn abandon(&mut self) {
        self.generation = self.generation.wrapping_add(1);
        self.generation_unsaved = true;
    }
}

/// What merging one state into an owned row did.
enum Merged {
    Changed,
    Unchanged,
    /// A reaped record here covered the whole incoming state (and no row exists).
    Reaped(ReapedRow),
}

/// How an operation failed: alone, or taking its whole batch with it.
enum Fault {
    Op(StoreError),
    Batch(StoreError),
}

impl From<EngineError> for Fault {
    fn from(e: EngineError) -> Self {
        Fault::Batch(e.into())
    }
}

type Run<T> = Result<T, Fault>;

struct Exec<'a, E: Engine> {
    engine: &'a mut E,
    state: &'a StoreState,
    pending: Pending,
    actors_drawn: u64,
    now_wall_ms: u64,
}

impl<E: Engine> Exec<'_, E> {
    fn q(&self) -> u32 {
        self.state.q
    }

    fn limits(&self) -> StoreLimits {
        self.state.limits
    }

    /// A new actor for a row created here: unique to this node's epoch and never reused.
    fn fresh_actor(&mut self) -> Actor {
        self.actors_drawn = self.actors_drawn.wrapping_add(1);
        let generation = mix(self.state.generation.wrapping_mul(0x9e3779b97f4a7c15) ^ 0x5bd1e995);
        Actor(mix(self.state.epoch ^ mix(self.actors_drawn) ^ generation))
    }

    fn put(&mut self, table: Table, key: &[u8], value: &[u8]) -> Run<()> {
        self.pending.wrote = true;
        Ok(self.engine.put(table, key, value)?)
    }

    fn delete(&mut self, table: Table, key: &[u8]) -> Run<()> {
        self.pending.wrote = true;
        Ok(self.engine.delete(table, key)?)
    }

    /// Quarantine a row whose bytes are `bytes`, and count it.
    fn set_aside(&mut self, table: Table, row_key: &[u8], bytes: &[u8]) -> Run<()> {
        self.pending.wrote = true;
        self.pending.quarantined += 1;
        Ok(set_aside(self.engine, table, row_key, bytes)?)
    }

    /// A row that cannot be read: move it aside (or, in a read-only batch, ask for that),
    /// and fail the operation that met it.
    fn corrupt(&mut self, table: Table, row_key: &[u8], detail: String) -> Run<Fault> {
        if self.engine.writable() {
            self.quarantine(table, row_key)?;
        } else {
            self.pending.quarantine.push(StoreOp::Quarantine { table, row_key: row_key.to_vec() });
        }
        let key = match table {
            Table::Objects | Table::Reaped => key_of_object_row(row_key).unwrap_or_default().to_vec(),
            Table::Hints => split_hint_row_key(row_key).map(|(k, _)| k.to_vec()).unwrap_or_default(),
            _ => row_key.to_vec(),
        };
        Ok(Fault::Op(StoreError::Corrupt { table: table.name().into(), key, detail }))
    }

    fn quarantine(&mut self, table: Table, row_key: &[u8]) -> Run<()> {
        let Some(bytes) = self.engine.get(table, row_key)? else { return Ok(()) };
        // Someone may have rewritten the row since a read batch flagged it.
        let readable = match table {
            Table::Objects => decode_object_row(&bytes).is_ok(),
            Table::Hints => decode_hint_row(&bytes).is_ok(),
            Table::Reaped => decode_reaped_row(&bytes).is_ok(),
            _ => false,
        };
        if readable {
            return Ok(());
        }
        self.set_aside(table, row_key, &bytes)?;
        match table {
            Table::Objects => {
                if let Some(key) = key_of_object_row(row_key) {
                    let key = key.to_vec();
                    self.rebuild_leaf(&key)?;
                }
            }
            Table::Hints => {
                if let Some((key, intended)) = split_hint_row_key(row_key) {
                    let (key, intended) = (key.to_vec(), intended.to_string());
                    self.delete(Table::HintIndex, &index_key(&intended, &key))?;
                    self.pending.changes.push(Change::Hints { intended, delta: -1 });
                }
            }
            _ => {}
        }
        Ok(())
    }

    /// Recompute the Merkle leaf of `key` from the rows that remain (one row of it was
    /// quarantined, so its digest is unknown).
    fn rebuild_leaf(&mut self, key: &[u8]) -> Run<()> {
        let (q, tree, leaf) = (self.q(), TreeId::of(key, self.q()), leaf_of(key));
        let (lo, hi) = tree.bounds();
        let mut hash: Hash = 0;
        let mut unreadable = Vec::new();
        self.engine.scan(Table::Objects, &lo, hi.as_deref(), &mut |k, v| {
            if let Some(key) = key_of_object_row(k) {
                if leaf_of(key) == leaf && tree.holds(key) {
                    match decode_object_row(v) {
                        Ok(row) if object_row_key(key, q) == k => hash ^= item_hash(key, &row.object.digest()),
                        _ => unreadable.push(k.to_vec()),
                    }
                }
            }
            true
        })?;
        let removed = 1 + unreadable.len() as u64;
        for k in unreadable {
            if let Some(bytes) = self.engine.get(Table::Objects, &k)? {
                self.set_aside(Table::Objects, &k, &bytes)?;
            }
        }
        self.pending.changes.push(Change::Leaf { tree, leaf, hash, removed });
        Ok(())
    }

    /// The node's state of a key: its owned object with every hinted copy merged in; and
    /// the owned row's digest when that is the whole state.
    fn with_hints(&mut self, key: &[u8], owned: Option<ObjectRow>) -> Run<Option<(Object, Option<[u8; 16]>)>> {
        let hints = self.hints_of(key)?;
        self.with_these_hints(key, owned, hints)
    }

    fn with_these_hints(
        &mut self,
        key: &[u8],
        owned: Option<ObjectRow>,
        hints: Vec<(NodeId, HintRow)>,
    ) -> Run<Option<(Object, Option<[u8; 16]>)>> {
        if hints.is_empty() {
            return Ok(owned.map(|r| {
                let stored = r.stored_digest.map(u128::to_be_bytes);
                (r.object, stored)
            }));
        }
        let mut found = owned.map(|r| r.object);
        for (_, h) in hints {
            found = Some(match found {
                Some(o) => o.merge(&h.object),
                None => h.object,
            });
        }
        // A hint may hold what a reaped tombstone of the key covered.
        if let (Some(o), Some(r)) = (found.as_mut(), self.reaped(key)?) {
            *o = o.merge(&Object::from_clock(r.clock));
        }
        Ok(found.map(|o| (o, None)))
    }

    /// The stored digest of `key`'s owned row without decoding its object: `Some(None)`
    /// when there is no row, None when the row has no readable stored digest (decode it).
    fn peek_owned_digest(&mut self, key: &[u8]) -> Run<Option<Option<[u8; 16]>>> {
        /// An owned row's fields, all but the digest skipped.
        #[derive(Deserialize)]
        struct RowDigest {
            _actor: serde::de::IgnoredAny,
            _object: serde::de::IgnoredAny,
            #[serde(default)]
            _generation: serde::de::IgnoredAny,
            #[serde(default)]
            stored_digest: Option<u128>,
        }
        let mut peeked = None;
        self.engine.read(Table::Objects, &object_row_key(key, self.q()), &mut |bytes| {
            peeked = match bytes.map(unseal::<RowDigest>) {
                None => Some(None),
                Some(Ok(RowDigest { stored_digest: Some(d), .. })) => Some(Some(d.to_be_bytes())),
                Some(_) => None,
            }
        })?;
        Ok(peeked)
    }

    /// The row `rk` of `table`, decoded by `decode` straight from the engine's bytes (None: no
    /// row); a row that does not decode is quarantined ([`Exec::corrupt`]), never read as absent.
    fn decoded<T>(&mut self, table: Table, rk: &[u8], decode: fn(&[u8]) -> Result<T, String>) -> Run<Option<T>> {
        let mut decoded = Ok(None);
        self.engine.read(table, rk, &mut |bytes| decoded = bytes.map(decode).transpose())?;
        match decoded {
            Ok(row) => Ok(row),
            Err(detail) => Err(self.corrupt(table, rk, detail)?),
        }
    }

    fn owned(&mut self, key: &[u8]) -> Run<Option<ObjectRow>> {
        self.decoded(Table::Objects, &object_row_key(key, self.q()), decode_object_row)
    }

    /// Write the row of `object` (coordinated by `actor` in `generation`) in place of a row
    /// whose digest was `old` (None: no row).
    fn set_owned(
        &mut self,
        key: &[u8],
        old: Option<[u8; 16]>,
        actor: Option<Actor>,
        object: &Object,
        generation: u64,
    ) -> Run<()> {
        let new = object.digest();
        let out = ObjectRowOut { actor, object, generation, stored_digest: Some(u128::from_be_bytes(new)) };
        let bytes = seal(&out).map_err(Fault::Op)?;
        self.put(Table::Objects, &object_row_key(key, self.q()), &bytes)?;
        self.pending.changes.push(Change::Tree {
            partition: partition_of(key, self.q()),
            key: key.to_vec(),
            old,
            new: Some(new),
        });
        Ok(())
    }

    fn remove_owned(&mut self, key: &[u8], old: &ObjectRow) -> Run<()> {
        self.delete(Table::Objects, &object_row_key(key, self.q()))?;
        self.pending.changes.push(Change::Tree {
            partition: partition_of(key, self.q()),
            key: key.to_vec(),
            old: Some(old.digest()),
            new: None,
        });
        Ok(())
    }

    fn hint(&mut self, key: &[u8], intended: &str) -> Run<Option<HintRow>> {
        self.decoded(Table::Hints, &hint_row_key(key, intended), decode_hint_row)
    }

    /// Every hinted copy of `key`, by intended node.
    fn hints_of(&mut self, key: &[u8]) -> Run<Vec<(NodeId, HintRow)>> {
        let prefix = hint_prefix(key);
        let end = prefix_end(&prefix);
        let mut found = Vec::new();
        self.engine.scan(Table::Hints, &prefix, end.as_deref(), &mut |k, v| {
            found.push((k.to_vec(), v.to_vec()));
            true
        })?;
        let mut out = Vec::with_capacity(found.len());
        for (rk, bytes) in found {
            let Some((_, intended)) = split_hint_row_key(&rk) else { continue };
            let intended = intended.to_string();
            match decode_hint_row(&bytes) {
                Ok(row) => out.push((intended, row)),
                Err(detail) => return Err(self.corrupt(Table::Hints, &rk, detail)?),
            }
        }
        Ok(out)
    }

    fn set_hint(&mut self, key: &[u8], intended: &str, existed: bool, row: &HintRow) -> Run<()> {
        let bytes = seal(row).map_err(Fault::Op)?;
        self.put(Table::Hints, &hint_row_key(key, intended), &bytes)?;
        if !existed {
            self.put(Table::HintIndex, &index_key(intended, key), &[])?;
            self.pending.changes.push(Change::Hints { intended: intended.to_string(), delta: 1 });
        }
        Ok(())
    }

    fn reaped(&mut self, key: &[u8]) -> Run<Option<ReapedRow>> {
        // A record that does not decode fails the operation and is quarantined (a retry then
        // proceeds without it).
        self.decoded(Table::Reaped, &object_row_key(key, self.q()), decode_reaped_row)
    }

    /// Merge `incoming` into the owned copy of `key`, first dropping what a reaped
    /// tombstone of the key covered. Returns whether the stored state changed.
    fn merge_owned(&mut self, key: &[u8], incoming: &Object) -> Run<bool> {
        Ok(matches!(self.merge_owned_noting(key, incoming)?, Merged::Changed))
    }

    fn merge_owned_noting(&mut self, key: &[u8], incoming: &Object) -> Run<Merged> {
        let current = match self.owned(key) {
            Ok(c) => c,
            // A merge brings a whole state: the unreadable row is quarantined and the
            // incoming state stored (this is how anti-entropy refills it).
            Err(Fault::Op(StoreError::Corrupt { .. })) if self.engine.writable() => None,
            Err(e) => return Err(e),
        };
        // The incoming state as it is, or taken together with a reaped record of the key
        // (only then copied).
        let incoming = match self.reaped(key)? {
            Some(r) => {
                let taken = incoming.merge(&Object::from_clock(r.clock.clone()));
                if current.is_none() && taken.siblings().is_empty() {
                    return Ok(Merged::Reaped(r));
                }
                Cow::Owned(taken)
            }
            None => Cow::Borrowed(incoming),
        };
        let (actor, generation, old) = match &current {
            Some(row) => (row.actor, row.generation, Some(&row.object)),
            None => (None, 0, None),
        };
        let old_digest = current.as_ref().map(ObjectRow::digest);
        let merged = match old {
            Some(o) => o.merge(&incoming),
            None => incoming.into_owned(),
        };
        if old == Some(&merged) {
            return Ok(Merged::Unchanged);
        }
        self.set_owned(key, old_digest, actor, &merged, generation)?;
        if old.is_none() {
            // The key lives again: its own clock carries the reaped record from now on.
            self.delete(Table::Reaped, &object_row_key(key, self.q()))?;
        }
        Ok(Merged::Changed)
    }

    fn execute(&mut self, op: StoreOp) -> Run<StoreOutcome> {
        match op {
            StoreOp::ReadDigest { key } => {
                let hints = self.hints_of(&key)?;
                if hints.is_empty() {
                    if let Some(digest) = self.peek_owned_digest(&key)? {
                        return Ok(StoreOutcome::Digest(digest));
                    }
                }
                let owned = self.owned(&key)?;
                let state = self.with_these_hints(&key, owned, hints)?;
                Ok(StoreOutcome::Digest(state.map(|(o, stored)| stored.unwrap_or_else(|| o.digest()))))
            }
            StoreOp::Read { key } => {
                let owned = self.owned(&key)?;
                let state = self.with_hints(&key, owned)?;
                Ok(StoreOutcome::State(state.map(|(o, stored)| {
                    let digest = stored.unwrap_or_else(|| o.digest());
                    (o, digest)
                })))
            }
            StoreOp::Write { key, object, hint: None } => {
                Ok(StoreOutcome::Written { changed: self.merge_owned(&key, &object)? })
            }
            StoreOp::Write { key, object, hint: Some(intended) } => {
                let current = self.hint(&key, &intended)?;
                let (row, existed) = match current {
                    Some(mut row) => {
                        if !row.object.merge_from(&object) {
                            return Ok(StoreOutcome::Written { changed: false });
                        }
                        // A fresh write into the row: it is not an old hint any more.
                        row.written_wall_ms = self.now_wall_ms;
                        (row, true)
                    }
                    None => (HintRow { written_wall_ms: self.now_wall_ms, actor: None, object, generation: 0 }, false),
                };
                self.set_hint(&key, &intended, existed, &row)?;
                Ok(StoreOutcome::Written { changed: true })
            }
            StoreOp::Coordinate { key, context, value, hint, now_wall_ms } => {
                self.coordinate(key, context, value, hint, now_wall_ms)
            }
            StoreOp::Merge { objects } => {
                let mut changed = 0;
                let mut reaped = Vec::new();
                for (key, object) in objects {
                    match self.merge_owned_noting(&key, &object)? {
                        Merged::Changed => changed += 1,
                        Merged::Unchanged => {}
                        Merged::Reaped(r) => reaped.push((key, r)),
                    }
                }
                Ok(StoreOutcome::Merged { changed, reaped })
            }
            StoreOp::AdoptReaped { entries } => {
                let mut count = 0;
                for (key, rec) in entries {
                    if rec.clock.validate().is_err() {
                        continue;
                    }
                    let covered = Object::from_clock(rec.clock.clone());
                    match self.owned(&key) {
                        Ok(Some(row)) => {
                            let merged = row.object.merge(&covered);
                            if merged.siblings().is_empty() {
                                self.remove_owned(&key, &row)?;
                                let bytes = seal(&rec).map_err(Fault::Op)?;
                                self.put(Table::Reaped, &object_row_key(&key, self.q()), &bytes)?;
                                count += 1;
                            } else if merged != row.object {
                                self.set_owned(&key, Some(row.digest()), row.actor, &merged, row.generation)?;
                            }
                        }
                        Ok(None) => {
                            if self.reaped(&key)?.is_none() {
                                let bytes = seal(&rec).map_err(Fault::Op)?;
                                self.put(Table::Reaped, &object_row_key(&key, self.q()), &bytes)?;
                            }
                        }
                        Err(Fault::Op(_)) => continue,
                        Err(e) => return Err(e),
                    }
                }
                Ok(StoreOutcome::Removed { count })
            }
            StoreOp::Page { tree, leaves, after, bytes_max } => {
                let (objects, next) = self.page(&tree, leaves.as_deref(), after, bytes_max)?;
                Ok(StoreOutcome::Page { objects, next })
            }
            StoreOp::Tree { tree } => Ok(StoreOutcome::Tree(self.state.tree_of(&tree).unwrap_or_default())),
            StoreOp::HintPage { intended, after, bytes_max } => self.hint_page(&intended, after, bytes_max),
            StoreOp::RemoveHints { intended, keys } => {
                let mut count = 0;
                for (key, digest) in keys {
                    let current = match self.hint(&key, &intended) {
                        Ok(c) => c,
                        Err(Fault::Op(_)) => continue,
                        Err(e) => return Err(e),
                    };
                    if current.is_some_and(|r| r.object.digest() == digest) {
                        self.delete(Table::Hints, &hint_row_key(&key, &intended))?;
                        self.delete(Table::HintIndex, &index_key(&intended, &key))?;
                        self.pending.changes.push(Change::Hints { intended: intended.clone(), delta: -1 });
                        count += 1;
                    }
                }
                Ok(StoreOutcome::Removed { count })
            }
            StoreOp::RemoveObjects { keys } => {
                let mut count = 0;
                for (key, digest) in keys {
                    let current = match self.owned(&key) {
                        Ok(c) => c,
                        Err(Fault::Op(_)) => continue,
                        Err(e) => return Err(e),
                    };
                    if let Some(row) = current.filter(|r| r.digest() == digest) {
                        self.remove_owned(&key, &row)?;
                        count += 1;
                    }
                }
                Ok(StoreOutcome::Removed { count })
            }
            StoreOp::Tombstones { tree, before_wall_ms, limit } => {
                let (lo, hi) = tree.bounds();
                let mut found = Vec::new();
                let mut bad = Vec::new();
                self.engine.scan(Table::Objects, &lo, hi.as_deref(), &mut |k, v| {
                    if key_of_object_row(k).is_some_and(|key| !tree.holds(key)) {
                        return true;
                    }
                    match decode_object_row(v) {
                        Ok(row) => {
                            let o = &row.object;
                            if o.is_deleted() && o.last_modified_ms() < before_wall_ms {
                                if let Some(key) = key_of_object_row(k) {
                                    found.push((row.digest(), key.to_vec()));
                                }
                            }
                        }
                        Err(detail) => bad.push((k.to_vec(), detail)),
                    }
                    found.len() < limit
                })?;
                for (k, detail) in bad {
                    self.corrupt(Table::Objects, &k, detail)?;
                }
                Ok(StoreOutcome::Tombstones(found))
            }
            StoreOp::ReapCheck { key, digest } => {
                let yes = match self.owned(&key)? {
                    Some(row) => row.digest() == digest,
                    // Reaped here already, this very state: a removal that reached this
                    // replica but not every other one. Agree, so they can finish it.
                    None => self.reaped(&key)?.is_some_and(|r| r.digest == Some(digest)),
                };
                Ok(StoreOutcome::Reaped { yes })
            }
            StoreOp::ReapRemove { key, digest } => match self.owned(&key)? {
                Some(row) if row.digest() == digest => {
                    self.remove_owned(&key, &row)?;
                    let rec = ReapedRow {
                        reaped_wall_ms: self.now_wall_ms,
                        clock: row.object.clock().clone(),
                        digest: Some(digest),
                    };
                    let bytes = seal(&rec).map_err(Fault::Op)?;
                    self.put(Table::Reaped, &object_row_key(&key, self.q()), &bytes)?;
                    Ok(StoreOutcome::Reaped { yes: true })
                }
                current => Ok(StoreOutcome::Reaped { yes: current.is_none() }),
            },
            StoreOp::SweepReaped { after, before_wall_ms, limit } => {
                let from = after.as_deref().map(successor).unwrap_or_default();
                let mut seen = 0usize;
                let mut last = None;
                let mut expired = Vec::new();
                self.engine.scan(Table::Reaped, &from, None, &mut |k, v| {
                    seen += 1;
                    last = Some(k.to_vec());
                    if decode_reaped_row(v).map_or(true, |r| r.reaped_wall_ms < before_wall_ms) {
                        expired.push(k.to_vec());
                    }
                    seen < limit.max(1)
                })?;
                let removed = expired.len();
                for k in expired {
                    self.delete(Table::Reaped, &k)?;
                }
                let next = if seen >= limit.max(1) { last } else { None };
                Ok(StoreOutcome::Swept { removed, next })
            }
            StoreOp::Inventory => Ok(StoreOutcome::Inventory {
                held: self.state.held(),
                hints: self.state.hint_counts.clone(),
                tree_keys: self.state.tree_keys(),
            }),
            StoreOp::Summaries { partitions } => {
                Ok(StoreOutcome::Summaries(partitions.into_iter().filter_map(|p| self.state.summary(p)).collect()))
            }
            StoreOp::SaveMembers { members } => {
                let bytes = seal(&members).map_err(Fault::Op)?;
                self.put(Table::Meta, META_MEMBERS, &bytes)?;
                Ok(StoreOutcome::Done)
            }
            StoreOp::SaveNamespaces { namespaces } => {
                let bytes = seal(&namespaces).map_err(Fault::Op)?;
                self.put(Table::Meta, META_NAMESPACES, &bytes)?;
                Ok(StoreOutcome::Done)
            }
            StoreOp::Quarantine { table, row_key } => {
                self.quarantine(table, &row_key)?;
                Ok(StoreOutcome::Done)
            }
            StoreOp::Close => {
                self.delete(Table::Meta, META_OPEN)?;
                Ok(StoreOutcome::Done)
            }
        }
    }

    fn coordinate(
        &mut self,
        key: Vec<u8>,
        context: VersionVector,
        value: Option<Vec<u8>>,
        hint: Option<NodeId>,
        now_wall_ms: u64,
    ) -> Run<StoreOutcome> {
        let owned = self.owned(&key)?;
        let hints = self.hints_of(&key)?;
        let reaped = self.reaped(&key)?;
        let current = self.state.generation;
        // What the owned row's own write needs of it, before its object is taken.
        let owned_actor = owned.as_ref().filter(|r| r.generation == current).and_then(|r| r.actor);
        let owned_digest = owned.as_ref().map(ObjectRow::digest);
        // The state to coordinate on: every local copy, and what a reaped tombstone covered.
        let mut merged = owned.map(|r| r.object).unwrap_or_default();
        for (_, h) in &hints {
            merged = merged.merge(&h.object);
        }
        if let Some(r) = &reaped {
            merged = merged.merge(&Object::from_clock(r.clock.clone()));
        }
        // Last write wins: a write supersedes all this replica holds, whatever the client saw.
        let context = match class_of(&key).resolution {
            namespace::Resolution::Lww => {
                let mut all = context;
                all.merge(merged.clock());
                all
            }
            namespace::Resolution::Siblings => context,
        };
        let survivors = merged.siblings().iter().filter(|s| !context.covers(s.dot)).count();
        let limits = self.limits();
        if survivors + 1 > limits.siblings_max {
            return Ok(StoreOutcome::Coordinated(Err(Refusal::TooManySiblings(survivors))));
        }
        // The row the write lands in, and the actor that numbers its writes.
        let (target_actor, old_owned, old_hint) = match &hint {
            None => (owned_actor, owned_digest, None),
            Some(h) => {
                let row = hints.iter().find(|(i, _)| i == h).map(|(_, r)| r.clone());
                (row.as_ref().filter(|r| r.generation == current).and_then(|r| r.actor), None, row)
            }
        };
        let mut actor = match target_actor {
            Some(a) => a,
            None => self.fresh_actor(),
        };
        let dot = match merged.next_dot(&context, actor) {
            Ok(d) => d,
            Err(_) => {
                // Only a context naming a counter near the limit gets here: continue the
                // row under a fresh actor, whose counters no context can have named.
                actor = self.fresh_actor();
                merged.next_dot(&context, actor).map_err(|e| Fault::Op(StoreError::Io(e.to_string())))?
            }
        };
        let mut object = merged;
        object.apply_write(&context, dot, value, now_wall_ms, limits.prune_threshold);
        let bytes = object.value_bytes();
        if bytes > limits.object_bytes_max {
            return Ok(StoreOutcome::Coordinated(Err(Refusal::TooLarge { bytes, max: limits.object_bytes_max })));
        }
        match hint {
            None => {
                self.set_owned(&key, old_owned, Some(actor), &object, current)?;
                if old_owned.is_none() && reaped.is_some() {
                    self.delete(Table::Reaped, &object_row_key(&key, self.q()))?;
                }
            }
            Some(intended) => {
                let row = HintRow {
                    written_wall_ms: now_wall_ms,
                    actor: Some(actor),
                    object: object.clone(),
                    generation: current,
                };
                self.set_hint(&key, &intended, old_hint.is_some(), &row)?;
            }
        }
        Ok(StoreOutcome::Coordinated(Ok(object)))
    }

    #[allow(clippy::type_complexity)]
    fn page(
        &mut self,
        tree: &TreeId,
        leaves: Option<&[u32]>,
        after: Option<Vec<u8>>,
        bytes_max: usize,
    ) -> Run<(Vec<(Vec<u8>, Object)>, Option<Vec<u8>>)> {
        let (lo, hi) = tree.bounds();
        // A cursor from elsewhere (another partition's key) never widens the scan.
        let from = match after {
            Some(k) => successor(&object_row_key(&k, self.q())).max(lo),
            None => lo,
        };
        let mut objects: Vec<(Vec<u8>, Object)> = Vec::new();
        let mut bytes = 0usize;
        let mut more = false;
        let mut bad = Vec::new();
        self.engine.scan(Table::Objects, &from, hi.as_deref(), &mut |k, v| {
            let Some(key) = key_of_object_row(k) else { return true };
            if !tree.holds(key) || leaves.is_some_and(|l| !l.contains(&leaf_of(key))) {
                return true;
            }
            match decode_object_row(v) {
                Ok(row) => {
                    let size = crate::wire::entry_bytes(key, &row.object);
                    if !objects.is_empty() && bytes.saturating_add(size) > bytes_max {
                        more = true;
                        return false;
                    }
                    bytes = bytes.saturating_add(size);
                    objects.push((key.to_vec(), row.object));
                }
                Err(detail) => bad.push((k.to_vec(), detail)),
            }
            true
        })?;
        for (k, detail) in bad {
            self.corrupt(Table::Objects, &k, detail)?;
        }
        let next = if more { objects.last().map(|(k, _)| k.clone()) } else { None };
        Ok((objects, next))
    }

    fn hint_page(&mut self, intended: &str, after: Option<Vec<u8>>, bytes_max: usize) -> Run<StoreOutcome> {
        let prefix = index_prefix(intended);
        let end = prefix_end(&prefix);
        let from = match after {
            Some(k) => successor(&index_key(intended, &k)),
            None => prefix.clone(),
        };
        let mut keys = Vec::new();
        self.engine.scan(Table::HintIndex, &from, end.as_deref(), &mut |k, _| {
            if let Some((_, key)) = split_index_key(k) {
                keys.push(key.to_vec());
            }
            keys.len() <= 4096
        })?;
        let mut hints = Vec::new();
        let mut bytes = 0usize;
        let mut next = None;
        for key in keys {
            let row = match self.hint(&key, intended) {
                Ok(Some(r)) => r,
                Ok(None) => continue,
                Err(Fault::Op(_)) => continue,
                Err(e) => return Err(e),
            };
            let size = crate::wire::entry_bytes(&key, &row.object);
            if !hints.is_empty() && bytes.saturating_add(size) > bytes_max {
                next = hints.last().map(|(k, _, _): &(Vec<u8>, Object, u64)| k.clone());
                break;
            }
            bytes = bytes.saturating_add(size);
            hints.push((key, row.object, row.written_wall_ms));
        }
        Ok(StoreOutcome::Hints { hints, next })
    }
}

/// An in-memory engine: a map per table, with transactions as undo logs. The simulation
/// wraps it to inject faults; unit tests use it as is.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MemEngine {
    rows: BTreeMap<MemRow, Vec<u8>>,
}

impl MemEngine {
    pub fn new() -> Self {
        Self::default()
    }

    /// Start a write transaction.
    pub fn begin(&mut self) -> MemTxn<'_> {
        MemTxn { engine: self, undo: Vec::new() }
    }

    /// Rows of one table, for checks.
    pub fn rows(&self, table: Table) -> impl Iterator<Item = (&[u8], &[u8])> {
        self.rows
            .range((table, Vec::new())..)
            .take_while(move |((t, _), _)| *t == table)
            .map(|((_, k), v)| (k.as_slice(), v.as_slice()))
    }

    /// Overwrite a row's bytes (fault injection).
    pub fn poke(&mut self, table: Table, key: &[u8], value: Vec<u8>) {
        self.rows.insert((table, key.to_vec()), value);
    }

    pub fn len(&self, table: Table) -> usize {
        self.rows(table).count()
    }

    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    fn scan_rows(
        rows: &BTreeMap<(Table, Vec<u8>), Vec<u8>>,
        table: Table,
        from: &[u8],
        to: Option<&[u8]>,
        visit: Visit<'_>,
    ) {
        for ((t, k), v) in rows.range((table, from.to_vec())..) {
            if *t != table || to.is_some_and(|to| k.as_slice() >= to) {
                break;
            }
            if !visit(k, v) {
                break;
            }
        }
    }
}

/// A snapshot: [`ReadOnly`] reads through it, [`MemEngine::begin`] writes.
impl EngineReads for MemEngine {
    fn get(&self, table: Table, key: &[u8]) -> Result<Option<Vec<u8>>, EngineError> {
        Ok(self.rows.get(&(table, key.to_vec())).cloned())
    }
    fn scan(&self, table: Table, from: &[u8], to: Option<&[u8]>, visit: Visit<'_>) -> Result<(), EngineError> {
        MemEngine::scan_rows(&self.rows, table, from, to, visit);
        Ok(())
    }
}

/// A write transaction on a [`MemEngine`]: changes apply at once and are undone by
/// [`rollback`](MemTxn::rollback) (or by dropping it without [`commit`](MemTxn::commit)).
pub struct MemTxn<'a> {
    engine: &'a mut MemEngine,
    /// Each change's row and its value before the change.
    undo: Vec<(MemRow, Option<Vec<u8>>)>,
}

type MemRow = (Table, Vec<u8>);

impl MemTxn<'_> {
    pub fn commit(mut self) {
        self.undo.clear();
    }

    pub fn rollback(self) {
        drop(self);
    }
}

impl Drop for MemTxn<'_> {
    fn drop(&mut self) {
        while let Some((k, old)) = self.undo.pop() {
            match old {
                Some(v) => self.engine.rows.insert(k, v),
                None => self.engine.rows.remove(&k),
            };
        }
    }
}

impl Engine for MemTxn<'_> {
    fn get(&self, table: Table, key: &[u8]) -> Result<Option<Vec<u8>>, EngineError> {
        Ok(self.engine.rows.get(&(table, key.to_vec())).cloned())
    }
    fn put(&mut self, table: Table, key: &[u8], value: &[u8]) -> Result<(), EngineError> {
        let k = (table, key.to_vec());
        let old = self.engine.rows.insert(k.clone(), value.to_vec());
        self.undo.push((k, old));
        Ok(())
    }
    fn delete(&mut self, table: Table, key: &[u8]) -> Result<(), EngineError> {
        let k = (table, key.to_vec());
        let old = self.engine.rows.remove(&k);
        self.undo.push((k, old));
        Ok(())
    }
    fn scan(&self, table: Table, from: &[u8], to: Option<&[u8]>, visit: Visit<'_>) -> Result<(), EngineError> {
        MemEngine::scan_rows(&self.engine.rows, table, from, to, visit);
        Ok(())
    }
}

/// A store in memory with its state: open, run batches, commit. For unit tests and tools.
#[derive(Clone, Debug)]
pub struct MemStore {
    pub engine: MemEngine,
    pub state: StoreState,
}

impl MemStore {
    pub fn new(q: u32, limits: StoreLimits, epoch: u64) -> MemStore {
        let mut engine = MemEngine::new();
        let mut txn = engine.begin();
        let (state, _) = StoreState::open(&mut txn, q, limits, epoch).expect("a fresh in-memory store opens");
        txn.commit();
        MemStore { engine, state }
    }

    /// Run one operation in its own transaction.
    pub fn run(&mut self, op: StoreOp) -> Result<StoreOutcome, StoreError> {
        self.run_batch(vec![op]).pop().unwrap_or_else(|| Err(StoreError::Io("no outcome".into())))
    }

    /// Run a batch in one transaction, committing unless an engine write failed.
    pub fn run_batch(&mut self, ops: Vec<StoreOp>) -> Vec<Result<StoreOutcome, StoreError>> {
        self.run_batch_at(ops, 0)
    }

    /// [`run_batch`](Self::run_batch) at a given wall-clock time.
    pub fn run_batch_at(&mut self, ops: Vec<StoreOp>, now_wall_ms: u64) -> Vec<Result<StoreOutcome, StoreError>> {
        let mut txn = self.engine.begin();
        let run = self.state.run(&mut txn, ops, now_wall_ms);
        if run.failed.is_none() {
            txn.commit();
            self.state.commit(&run.pending);
        }
        run.outcomes
    }

    /// The owned object of `key`, if readable.
    pub fn object(&self, key: &[u8]) -> Option<Object> {
        let bytes = self.engine.rows.get(&(Table::Objects, object_row_key(key, self.state.q)))?;
        decode_object_row(bytes).ok().map(|r| r.object)
    }

    /// Every readable owned object.
    pub fn objects(&self) -> Vec<(Vec<u8>, Object)> {
        self.engine
            .rows(Table::Objects)
            .filter_map(|(k, v)| Some((key_of_object_row(k)?.to_vec(), decode_object_row(v).ok()?.object)))
            .collect()
    }

    /// Every readable hint: (intended, key, object).
    pub fn hints(&self) -> Vec<(NodeId, Vec<u8>, Object)> {
        self.engine
            .rows(Table::Hints)
            .filter_map(|(k, v)| {
                let (key, intended) = split_hint_row_key(k)?;
                Some((intended.to_string(), key.to_vec(), decode_hint_row(v).ok()?.object))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store() -> MemStore {
        MemStore::new(16, StoreLimits::default(), 7)
    }

    /// A put of `value` to `key` with context `ctx`, coordinated here.
    fn coordinate_op(key: &[u8], ctx: &VersionVector, value: &[u8], hint: Option<&str>) -> StoreOp {
        StoreOp::Coordinate {
            key: key.to_vec(),
            context: ctx.clone(),
            value: Some(value.to_vec()),
            hint: hint.map(str::to_string),
            now_wall_ms: 1,
        }
    }

    /// Open the store in `engine` and mark it open, as a node's start does: the state, and
    /// whether a new generation began (the last run did not close it).
    fn open_started(engine: &mut MemEngine) -> (StoreState, bool) {
        let mut txn = engine.begin();
        let (mut state, _) = StoreState::open(&mut txn, 16, StoreLimits::default(), 3).unwrap();
        let bumped = state.start(&mut txn).unwrap();
        txn.commit();
        (state, bumped)
    }

    fn coordinate(s: &mut MemStore, key: &[u8], ctx: &VersionVector, value: &[u8], hint: Option<&str>) -> Object {
        match s.run(coordinate_op(key, ctx, value, hint)) {
            Ok(StoreOutcome::Coordinated(Ok(o))) => o,
            other => panic!("{other:?}"),
        }
    }

    fn row_key(key: &[u8]) -> Vec<u8> {
        object_row_key(key, 16)
    }

    #[test]
    fn namespaced_keys_have_their_own_trees_and_lww_writes_supersede_all() {
        use crate::namespace::{Namespace, Resolution};
        let mut s = store();
        let lww = Namespace::create("last", 2, 1, 1, Resolution::Lww, 3, 0, "n1").unwrap();
        let k = lww.store_key(b"k");
        coordinate(&mut s, &k, &VersionVector::new(), b"a", None);
        // A blind write supersedes what the replica holds under lww, not under siblings.
        let o = coordinate(&mut s, &k, &VersionVector::new(), b"b", None);
        assert_eq!(o.values().collect::<Vec<_>>(), vec![b"b".as_slice()]);
        coordinate(&mut s, b"k", &VersionVector::new(), b"a", None);
        let o = coordinate(&mut s, b"k", &VersionVector::new(), b"b", None);
        assert_eq!(o.values().count(), 2);
        // Each key in its own tree: the default tree does not see the namespaced key.
        let tree = TreeId::of(&k, 16);
        assert_eq!(tree.namespace_name(), "last");
        assert_eq!(tree.n_or(3), 2);
        assert_eq!(s.state.tree_of(&tree).map(|t| t.keys()), Some(1));
        assert_eq!(
            s.state.tree(partition_of(&k, 16)).map(|t| t.keys()),
            Some(u64::from(partition_of(b"k", 16) == tree.partition))
        );
        let page = s.run(StoreOp::Page { tree: tree.clone(), leaves: None, after: None, bytes_max: 1 << 20 }).unwrap();
        assert!(matches!(page, StoreOutcome::Page { objects, .. } if objects.len() == 1 && objects[0].0 == k));
        assert!(s.state.held().contains(&tree));
        let summary = s.state.summary(tree.partition).unwrap();
        assert_eq!(
            summary.namespaces.iter().map(|(n, keys, _)| (n.as_str(), *keys)).collect::<Vec<_>>(),
            vec![("last", 1)]
        );
    }

    #[test]
    fn coordinate_then_replicate_then_read() {
        let (mut a, mut b) = (store(), store());
        let o = coordinate(&mut a, b"k", &VersionVector::new(), b"v", None);
        let w = StoreOp::Write { key: b"k".to_vec(), object: o.clone(), hint: None };
        assert_eq!(b.run(w.clone()), Ok(StoreOutcome::Written { changed: true }));
        assert_eq!(b.run(w), Ok(StoreOutcome::Written { changed: false }));
        let digest = o.digest();
        assert_eq!(b.run(StoreOp::Read { key: b"k".to_vec() }), Ok(StoreOutcome::State(Some((o, digest)))));
    }

    #[test]
    fn hinted_writes_are_kept_apart_but_read_and_counted() {
        let mut f = store();
        let o = coordinate(&mut store(), b"k", &VersionVector::new(), b"v", None);
        f.run(StoreOp::Write { key: b"k".to_vec(), object: o.clone(), hint: Some("n3".into()) }).unwrap();
        assert!(f.objects().is_empty());
        assert_eq!(f.hints(), vec![("n3".to_string(), b"k".to_vec(), o.clone())]);
        assert_eq!(f.state.hint_counts().get("n3"), Some(&1));
        assert_eq!(f.run(StoreOp::Read { key: b"k".to_vec() }), Ok(StoreOutcome::State(Some((o.clone(), o.digest())))));
        let page = f.run(StoreOp::HintPage { intended: "n3".into(), after: None, bytes_max: 1 << 20 }).unwrap();
        assert!(matches!(&page, StoreOutcome::Hints { hints, next: None } if hints.len() == 1));
        let removed = f.run(StoreOp::RemoveHints { intended: "n3".into(), keys: vec![(b"k".to_vec(), o.digest())] });
        assert_eq!(removed, Ok(StoreOutcome::Removed { count: 1 }));
        assert!(f.hints().is_empty() && f.state.hint_counts().is_empty());
        assert_eq!(f.engine.len(Table::HintIndex), 0);
    }

    #[test]
    fn a_row_keeps_its_actor_across_writes_and_restarts_and_a_new_row_gets_a_new_one() {
        let mut s = store();
        let mut ctx = VersionVector::new();
        for i in 0..20u8 {
            let o = coordinate(&mut s, b"k", &ctx, &[i], None);
            ctx = o.context();
            // A restart: the same engine opened again.
            let mut txn = s.engine.begin();
            let (state, report) = StoreState::open(&mut txn, 16, StoreLimits::default(), 99).unwrap();
            txn.commit();
            assert!(!report.fresh);
            s.state = state;
        }
        assert_eq!(s.object(b"k").unwrap().clock().len(), 1, "one row, one actor, restarts or not");
        // The row goes (handed off) and comes back by a merge: a new actor numbers its writes,
        // so the new write is not covered by the old entry's counter.
        let old = s.object(b"k").unwrap();
        s.run(StoreOp::RemoveObjects { keys: vec![(b"k".to_vec(), old.digest())] }).unwrap();
        let blind = coordinate(&mut s, b"k", &VersionVector::new(), b"new", None);
        let elsewhere = old.clone();
        let merged = elsewhere.merge(&blind);
        assert_eq!(merged.values().count(), 2, "the blind write survives next to the old value: {merged:?}");
    }

    #[test]
    fn after_a_crash_that_lost_buffered_commits_no_dot_is_issued_twice() {
        // Buffered durability: a write is acknowledged (and replicated to `peer`) but the
        // crash loses it here, with the actor counter. Without a new generation, the next
        // blind write on the rolled-back row would reuse the lost write's dot.
        let mut s = store();
        let (state, bumped) = open_started(&mut s.engine);
        assert!(!bumped, "a first start is clean");
        s.state = state;
        coordinate(&mut s, b"k", &VersionVector::new(), b"flushed", None);
        let flushed = s.engine.clone();
        let lost = coordinate(&mut s, b"k", &VersionVector::new(), b"lost", None);
        let peer = lost.clone();
        // The crash: back to the last flush, and the store was never closed.
        s.engine = flushed;
        let (state, bumped) = open_started(&mut s.engine);
        s.state = state;
        let after = coordinate(&mut s, b"k", &VersionVector::new(), b"after", None);
        let merged = peer.merge(&after);
        let mut values: Vec<&[u8]> = merged.values().collect();
        values.sort();
        assert_eq!(values, vec![b"after".as_slice(), b"flushed", b"lost"], "nothing swallowed");
        assert!(bumped);
        // A clean stop needs no new generation; any other stop does (in sync mode too, as a
        // write may have gone to other replicas ahead of its commit).
        s.run(StoreOp::Close).unwrap();
        assert!(!open_started(&mut s.engine).1);
        assert!(open_started(&mut s.engine).1);
    }

    #[test]
    fn a_batch_that_did_not_commit_never_has_its_dots_issued_again() {
        // A coordinated write is computed and sent on ahead of its commit, which fails.
        let mut s = store();
        coordinate(&mut s, b"k", &VersionVector::new(), b"kept", None);
        let before = s.engine.clone();
        let sent = coordinate(&mut s, b"k", &VersionVector::new(), b"sent ahead", None);
        s.engine = before;
        s.state.abandon();
        let after = coordinate(&mut s, b"k", &VersionVector::new(), b"after", None);
        let merged = sent.merge(&after);
        let mut values: Vec<&[u8]> = merged.values().collect();
        values.sort();
        assert_eq!(values, vec![b"after".as_slice(), b"kept", b"sent ahead"], "no dot issued twice");
        // The new generation was saved with that batch: a restart keeps it.
        let mut txn = s.engine.begin();
        let (state, _) = StoreState::open(&mut txn, 16, StoreLimits::default(), 3).unwrap();
        assert_eq!(state.generation, s.state.generation);
        assert!(!s.state.generation_unsaved);
    }

    #[test]
    fn a_write_numbered_under_a_generation_not_yet_on_disk_waits_for_its_commit() {
        // A commit fails (a new generation, in memory only); the next batch numbers a write
        // under it, and fails too; the node crashes and starts again from the saved
        // generation, as a new one: the same generation the failed batch used. Its write must
        // not have left the node ahead of the commit: its dot is issued again after the
        // restart (seed 1682 of harsh with batch crashes and failed commits; seed 451).
        let mut s = store();
        s.state = open_started(&mut s.engine).0;
        coordinate(&mut s, b"k", &VersionVector::new(), b"kept", None);
        s.state.abandon();
        let op = coordinate_op(b"k", &VersionVector::new(), b"numbered under the unsaved generation", None);
        let mut txn = s.engine.begin();
        let run = s.state.run(&mut txn, vec![op], 1);
        assert!(run.failed.is_none() && run.pending.saves_generation() && run.must_be_durable());
        let sent_ahead: Vec<Object> = run
            .ahead()
            .filter_map(|(_, o)| match o {
                StoreOutcome::Coordinated(Ok(object)) => Some(object.clone()),
                _ => None,
            })
            .collect();
        drop(txn);
        s.state.abandon();
        let (state, bumped) = open_started(&mut s.engine);
        assert!(bumped, "the crash left the store open");
        s.state = state;
        let after = coordinate(&mut s, b"k", &VersionVector::new(), b"after", None);
        for sent in &sent_ahead {
            let merged = sent.merge(&after);
            let values: Vec<&[u8]> = merged.values().collect();
            assert!(values.contains(&b"after".as_slice()) && values.len() == 3, "a dot issued twice: {merged:?}");
        }
        assert!(sent_ahead.is_empty(), "nothing numbered under an unsaved generation goes ahead of its commit");
        // Once a batch saved the generation, coordinated writes go ahead again.
        let mut txn = s.engine.begin();
        let run = s.state.run(&mut txn, vec![coordinate_op(b"k", &VersionVector::new(), b"later", None)], 2);
        assert!(!run.must_be_durable() && run.ahead().count() == 1);
    }

    #[test]
    fn hinted_and_owned_rows_number_writes_apart() {
        // The node held a hint it coordinated; now it coordinates as owner: distinct dots.
        let mut s = store();
        let first = coordinate(&mut s, b"k", &VersionVector::new(), b"x", Some("n3"));
        let second = coordinate(&mut s, b"k", &VersionVector::new(), b"y", None);
        let d1 = first.siblings()[0].dot;
        assert!(second.siblings().iter().any(|x| x.dot == d1 && x.value.as_deref() == Some(b"x".as_slice())));
        assert_eq!(second.siblings().len(), 2);
    }

    #[test]
    fn a_context_at_the_counter_limit_moves_the_row_to_a_fresh_actor() {
        let mut s = store();
        let o = coordinate(&mut s, b"k", &VersionVector::new(), b"x", None);
        let actor = o.siblings()[0].dot.actor;
        let mut ctx = VersionVector::new();
        ctx.witness(actor, crate::version::COUNTER_MAX, 0);
        let after = coordinate(&mut s, b"k", &ctx, b"y", None);
        let dot = after.siblings().iter().find(|x| x.value.as_deref() == Some(b"y".as_slice())).unwrap().dot;
        assert_ne!(dot.actor, actor);
        assert!(!ctx.covers(dot), "the new write is not already seen");
        assert_eq!(after.values().collect::<Vec<_>>(), vec![b"y".as_slice()]);
    }

    #[test]
    fn sibling_and_size_limits_refuse_and_change_nothing() {
        let mut s = MemStore::new(16, StoreLimits { siblings_max: 2, prune_threshold: 10, object_bytes_max: 8 }, 1);
        coordinate(&mut s, b"k", &VersionVector::new(), b"a", None);
        coordinate(&mut s, b"k", &VersionVector::new(), b"b", None);
        let before = s.engine.clone();
        let blind = StoreOp::Coordinate {
            key: b"k".to_vec(),
            context: VersionVector::new(),
            value: Some(b"c".to_vec()),
            hint: None,
            now_wall_ms: 1,
        };
        assert_eq!(s.run(blind), Ok(StoreOutcome::Coordinated(Err(Refusal::TooManySiblings(2)))));
        assert_eq!(s.engine, before);
        let ctx = s.object(b"k").unwrap().context();
        let big = StoreOp::Coordinate {
            key: b"k".to_vec(),
            context: ctx.clone(),
            value: Some(vec![0; 9]),
            hint: None,
            now_wall_ms: 1,
        };
        assert_eq!(s.run(big), Ok(StoreOutcome::Coordinated(Err(Refusal::TooLarge { bytes: 9, max: 8 }))));
        assert_eq!(s.engine, before);
        coordinate(&mut s, b"k", &ctx, b"c", None);
    }

    #[test]
    fn pages_are_bounded_by_bytes_and_resume_after_the_cursor() {
        let mut s = store();
        let keys: Vec<Vec<u8>> = (0..400u32).map(|i| format!("k{i}").into_bytes()).collect();
        for k in &keys {
            coordinate(&mut s, k, &VersionVector::new(), &[7; 100], None);
        }
        let p = partition_of(&keys[0], 16);
        let expected: Vec<Vec<u8>> = {
            let mut v: Vec<Vec<u8>> = keys.iter().filter(|k| partition_of(k, 16) == p).cloned().collect();
            v.sort();
            v
        };
        let mut got = Vec::new();
        let mut after = None;
        for _ in 0..1000 {
            match s
                .run(StoreOp::Page { tree: TreeId::default_of(p), leaves: None, after: after.clone(), bytes_max: 600 })
                .unwrap()
            {
                StoreOutcome::Page { objects, next } => {
                    assert!(!objects.is_empty() && objects.len() <= 4, "{}", objects.len());
                    got.extend(objects.into_iter().map(|(k, _)| k));
                    match next {
                        Some(n) => after = Some(n),
                        None => break,
                    }
                }
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(got, expected);
        // One object larger than the budget still travels, alone.
        match s.run(StoreOp::Page { tree: TreeId::default_of(p), leaves: None, after: None, bytes_max: 1 }).unwrap() {
            StoreOutcome::Page { objects, next } => assert!(objects.len() == 1 && next.is_some()),
            other => panic!("{other:?}"),
        }
    }

    /// Every owned row is written with its object's digest, which replacing the row, removing
    /// it and rebuilding the trees at start then use instead of hashing the object again;
    /// rows of older data directories, without one, still read and count right.
    #[test]
    fn rows_carry_their_digest_and_rows_without_one_still_count() {
        let mut s = store();
        let a = coordinate(&mut s, b"a", &VersionVector::new(), b"1", None);
        coordinate(&mut s, b"a", &VersionVector::new(), b"2", None);
        coordinate(&mut s, b"b", &a.context(), b"3", None);
        let mut other = Object::new();
        other.update(&VersionVector::new(), Actor(99), Some(b"4".to_vec()), 2, 10);
        s.run(StoreOp::Write { key: b"b".to_vec(), object: other.clone(), hint: None }).unwrap();
        s.run(StoreOp::Merge { objects: vec![(b"c".to_vec(), other.clone())] }).unwrap();
        for (k, v) in s.engine.rows(Table::Objects) {
            let row = decode_object_row(v).unwrap();
            assert_eq!(row.stored_digest, Some(u128::from_be_bytes(row.object.digest())), "{k:?}");
        }
        // Write row c back in the older layout (no digest): it reads, and its digest is computed.
        let c = s.object(b"c").unwrap();
        let old_layout = seal(&(None::<Actor>, &c, 0u64)).unwrap();
        s.engine.poke(Table::Objects, &row_key(b"c"), old_layout);
        let row = decode_object_row(s.engine.get(Table::Objects, &row_key(b"c")).unwrap().as_deref().unwrap()).unwrap();
        assert_eq!((row.stored_digest, row.digest()), (None, c.digest()));
        // A row whose stored digest is not its object's (no write of ours makes one; a
        // checksum collision could) is written again with the right one at start.
        let b = s.object(b"b").unwrap();
        let wrong = ObjectRowOut { actor: None, object: &b, generation: 0, stored_digest: Some(7) };
        s.engine.poke(Table::Objects, &row_key(b"b"), seal(&wrong).unwrap());
        // The trees built at start are the running ones: built from the objects themselves.
        let trees: Vec<Option<MerkleTree>> = (0..16).map(|p| s.state.tree(p).cloned()).collect();
        let mut txn = s.engine.begin();
        let (reopened, report) = StoreState::open(&mut txn, 16, StoreLimits::default(), 7).unwrap();
        txn.commit();
        assert_eq!((0..16).map(|p| reopened.tree(p).cloned()).collect::<Vec<_>>(), trees);
        assert_eq!(report.digests_mended, 1);
        let row = decode_object_row(s.engine.get(Table::Objects, &row_key(b"b")).unwrap().as_deref().unwrap()).unwrap();
        assert_eq!((row.stored_digest, row.object), (Some(u128::from_be_bytes(b.digest())), b));
        // Removing the older row by its digest removes it and empties its leaf's share.
        let removed = s.run(StoreOp::RemoveObjects { keys: vec![(b"c".to_vec(), c.digest())] }).unwrap();
        assert_eq!(removed, StoreOutcome::Removed { count: 1 });
        let mut expected = trees[partition_of(b"c", 16) as usize].clone().unwrap();
        expected.update(b"c", Some(&c.digest()), None);
        assert_eq!(s.state.tree(partition_of(b"c", 16)), Some(&expected));
    }

    /// A digest read answers the digest of what a read answers: the stored one for an owned
    /// row alone, computed when hints add to it, None when there is nothing.
    #[test]
    fn a_digest_read_is_the_digest_of_the_read() {
        let mut s = store();
        let digest_of = |s: &mut MemStore, k: &[u8]| {
            let read = s.run(StoreOp::Read { key: k.to_vec() }).unwrap();
            let digest = s.run(StoreOp::ReadDigest { key: k.to_vec() }).unwrap();
            let StoreOutcome::State(state) = read else { panic!("{read:?}") };
            let o = state.map(|(o, d)| {
                assert_eq!(d, o.digest(), "{k:?}: a read's digest is its object's");
                o
            });
            assert_eq!(digest, StoreOutcome::Digest(o.as_ref().map(Object::digest)), "{k:?}");
            o
        };
        assert_eq!(digest_of(&mut s, b"k"), None);
        coordinate(&mut s, b"k", &VersionVector::new(), b"1", None);
        coordinate(&mut s, b"k", &VersionVector::new(), b"2", Some("n9"));
        let both = digest_of(&mut s, b"k").unwrap();
        assert_eq!(both.siblings().len(), 2, "the owned row and the hint");
        coordinate(&mut s, b"j", &VersionVector::new(), b"3", None);
        let j = digest_of(&mut s, b"j").unwrap();
        // A row of the older layout (no stored digest) is decoded and hashed.
        s.engine.poke(Table::Objects, &row_key(b"j"), seal(&(None::<Actor>, &j, 0u64)).unwrap());
        assert_eq!(digest_of(&mut s, b"j"), Some(j));
        // An unreadable row is not answered from: it is quarantined, as by a read.
        s.engine.poke(Table::Objects, &row_key(b"j"), vec![ROW_FORMAT, 0, 0, 0, 0, 1]);
        let run = s.state.run(&mut s.engine.begin(), vec![StoreOp::ReadDigest { key: b"j".to_vec() }], 0);
        assert!(matches!(&run.outcomes[..], [Err(StoreError::Corrupt { .. })]), "{run:?}");
        assert_eq!(run.pending.quarantined, 1, "{run:?}");
    }

    #[test]
    fn rows_of_both_formats_read_and_a_flipped_bit_in_either_is_caught() {
        let row = ObjectRow { actor: Some(Actor(9)), object: Object::new(), generation: 3, stored_digest: None };
        let now = seal(&row).unwrap();
        assert_eq!(now[0], ROW_FORMAT);
        let body = rmp_serde::to_vec(&row).unwrap();
        let old = [vec![ROW_FORMAT_MD5], Md5::digest(&body)[..8].to_vec(), body].concat();
        for bytes in [now, old] {
            assert_eq!(unseal::<ObjectRow>(&bytes), Ok(row.clone()));
            for i in 1..bytes.len() {
                let mut bad = bytes.clone();
                bad[i] ^= 0x10;
                assert!(unseal::<ObjectRow>(&bad).is_err(), "flip at {i} of format {} not caught", bytes[0]);
            }
        }
        assert!(unseal::<ObjectRow>(&[7, 0, 0, 0, 0]).unwrap_err().contains("unknown row format"));
    }

    #[test]
    fn a_reader_answers_row_reads_as_the_writer_does_and_refuses_the_rest() {
        let mut s = store();
        let o = coordinate(&mut s, b"k", &VersionVector::new(), b"v", None);
        let h = coordinate(&mut MemStore::new(16, StoreLimits::default(), 8), b"k", &VersionVector::new(), b"w", None);
        s.run(StoreOp::Write { key: b"k".to_vec(), object: h, hint: Some("n3".into()) }).unwrap();
        let reader = s.state.reader();
        let ops = || {
            vec![
                StoreOp::Read { key: b"k".to_vec() },
                StoreOp::Read { key: b"absent".to_vec() },
                StoreOp::ReapCheck { key: b"k".to_vec(), digest: o.digest() },
            ]
        };
        let by_reader = reader.run(&s.engine, ops(), 0);
        assert!(by_reader.failed.is_none());
        assert_eq!(by_reader.outcomes, s.clone().run_batch(ops()));
        assert!(
            matches!(&by_reader.outcomes[0], Ok(StoreOutcome::State(Some((merged, _)))) if merged.siblings().len() == 2)
        );
        // Anything that needs the writer's state or writes is refused, and nothing changes.
        let before = s.engine.clone();
        for op in [
            StoreOp::Tree { tree: TreeId::default_of(0) },
            StoreOp::Write { key: b"x".to_vec(), object: o.clone(), hint: None },
        ] {
            let run = reader.run(&s.engine, vec![op], 0);
            assert!(run.failed.is_some() && run.outcomes.iter().all(Result::is_err));
        }
        assert_eq!(s.engine, before);
        // An unreadable row is an error and comes back as a quarantine for the writer.
        let mut bytes = s.engine.get(Table::Objects, &row_key(b"k")).unwrap().unwrap();
        bytes[0] ^= 0x55;
        s.engine.poke(Table::Objects, &row_key(b"k"), bytes);
        let run = reader.run(&s.engine, vec![StoreOp::Read { key: b"k".to_vec() }], 0);
        assert!(matches!(&run.outcomes[0], Err(StoreError::Corrupt { .. })));
        assert!(matches!(&run.pending.quarantine[..], [StoreOp::Quarantine { table: Table::Objects, .. }]));
    }

    #[test]
    fn a_corrupt_row_is_an_error_then_quarantined_and_its_leaf_recomputed() {
        let mut s = store();
        let mut peer = store();
        for i in 0..50u32 {
            let k = format!("k{i}").into_bytes();
            let o = coordinate(&mut s, &k, &VersionVector::new(), b"v", None);
            peer.run(StoreOp::Write { key: k, object: o, hint: None }).unwrap();
        }
        let victim = b"k7".to_vec();
        let p = partition_of(&victim, 16);
        assert_eq!(s.state.tree(p).unwrap().root(), peer.state.tree(p).unwrap().root());
        let mut bytes = s.engine.get(Table::Objects, &row_key(&victim)).unwrap().unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 0x55;
        s.engine.poke(Table::Objects, &row_key(&victim), bytes);
        // Never read as absent: the read fails, and the other writes of the batch commit.
        let other = b"k8".to_vec();
        let other_obj = peer.object(&other).unwrap();
        let out = s.run_batch(vec![
            StoreOp::Read { key: victim.clone() },
            StoreOp::Coordinate {
                key: other.clone(),
                context: other_obj.context(),
                value: Some(b"w".to_vec()),
                hint: None,
                now_wall_ms: 2,
            },
        ]);
        assert!(matches!(&out[0], Err(StoreError::Corrupt { .. })), "{out:?}");
        assert!(matches!(&out[1], Ok(StoreOutcome::Coordinated(Ok(_)))));
        assert_eq!(s.engine.len(Table::Quarantine), 1);
        assert_eq!(s.run(StoreOp::Read { key: victim.clone() }), Ok(StoreOutcome::State(None)));
        // The tree no longer claims the key; a merge from the peer (anti-entropy) refills it.
        let refill = peer.object(&victim).unwrap();
        s.run(StoreOp::Merge { objects: vec![(victim.clone(), refill)] }).unwrap();
        peer.run(StoreOp::Write { key: other.clone(), object: s.object(&other).unwrap(), hint: None }).unwrap();
        assert_eq!(s.state.tree(p).unwrap().root(), peer.state.tree(p).unwrap().root());
        assert_eq!(s.state.tree(p).unwrap().keys(), peer.state.tree(p).unwrap().keys());
    }

    #[test]
    fn a_read_only_batch_asks_for_quarantine_later() {
        let mut s = store();
        coordinate(&mut s, b"k", &VersionVector::new(), b"v", None);
        s.engine.poke(Table::Objects, &row_key(b"k"), vec![1, 2, 3]);
        let run = s.state.run(&mut ReadOnly(&s.engine), vec![StoreOp::Read { key: b"k".to_vec() }], 0);
        assert!(matches!(run.outcomes[0], Err(StoreError::Corrupt { .. })));
        assert_eq!(run.pending.quarantine.len(), 1);
        for op in run.pending.quarantine {
            s.run(op).unwrap();
        }
        assert_eq!(s.engine.len(Table::Objects), 0);
        assert_eq!(s.state.held(), Vec::<TreeId>::new());
    }

    #[test]
    fn open_quarantines_bad_rows_and_rebuilds() {
        let mut s = store();
        for i in 0..10u32 {
            coordinate(&mut s, format!("k{i}").as_bytes(), &VersionVector::new(), b"v", Some("n2"));
            coordinate(&mut s, format!("k{i}").as_bytes(), &VersionVector::new(), b"v", None);
        }
        s.engine.poke(Table::Objects, &row_key(b"k1"), vec![9]);
        s.engine.poke(Table::Hints, &hint_row_key(b"k2", "n2"), vec![9]);
        let mut txn = s.engine.begin();
        let (state, report) = StoreState::open(&mut txn, 16, StoreLimits::default(), 5).unwrap();
        txn.commit();
        assert_eq!((report.objects, report.hints, report.quarantined), (9, 9, 2));
        assert_eq!(state.hint_counts().get("n2"), Some(&9));
        assert_eq!(state.trees.iter().map(|t| t.keys()).sum::<u64>(), 9);
        assert_eq!(s.engine.len(Table::HintIndex), 9);
    }

    #[test]
    fn a_reaped_record_keeps_stale_copies_out() {
        let mut s = store();
        let v = coordinate(&mut s, b"k", &VersionVector::new(), b"old", None);
        let stale = v.clone();
        let del =
            StoreOp::Coordinate { key: b"k".to_vec(), context: v.context(), value: None, hint: None, now_wall_ms: 5 };
        let Ok(StoreOutcome::Coordinated(Ok(tomb))) = s.run(del) else { panic!() };
        assert_eq!(
            s.run(StoreOp::ReapRemove { key: b"k".to_vec(), digest: tomb.digest() }),
            Ok(StoreOutcome::Reaped { yes: true })
        );
        assert!(s.object(b"k").is_none());
        // A stale copy arrives by handoff: nothing comes back.
        let reaped = match s.run(StoreOp::Merge { objects: vec![(b"k".to_vec(), stale.clone())] }) {
            Ok(StoreOutcome::Merged { changed: 0, reaped }) => reaped,
            other => panic!("{other:?}"),
        };
        assert!(s.object(b"k").is_none());
        // The stale holder (a replica that joined after the reaping) is told, and adopts it.
        assert_eq!(reaped.len(), 1);
        let mut late = store();
        late.run(StoreOp::Merge { objects: vec![(b"k".to_vec(), stale.clone())] }).unwrap();
        assert!(late.object(b"k").is_some());
        assert_eq!(late.run(StoreOp::AdoptReaped { entries: reaped }), Ok(StoreOutcome::Removed { count: 1 }));
        assert!(late.object(b"k").is_none());
        assert_eq!(late.state.tree(partition_of(b"k", 16)).unwrap().keys(), 0);
        let again = late.run(StoreOp::Merge { objects: vec![(b"k".to_vec(), stale.clone())] });
        assert!(matches!(again, Ok(StoreOutcome::Merged { changed: 0, .. })));
        // A write the delete did not cover survives, and carries the reaped clock on.
        let mut concurrent = Object::new();
        concurrent.update(&VersionVector::new(), Actor(99), Some(b"new".to_vec()), 6, 10);
        let both = stale.merge(&concurrent);
        s.run(StoreOp::Merge { objects: vec![(b"k".to_vec(), both)] }).unwrap();
        let now = s.object(b"k").unwrap();
        assert_eq!(now.values().collect::<Vec<_>>(), vec![b"new".as_slice()]);
        assert_eq!(now.merge(&stale), now, "the stale value stays out for good");
        assert_eq!(s.engine.len(Table::Reaped), 0);
    }

    #[test]
    fn a_reaped_record_with_a_bad_clock_is_unreadable_and_goes() {
        // Found by fuzzing: a record that unsealed but held a counter of 0 (or past
        // COUNTER_MAX) was merged into the key's state, which then failed validation.
        let mut clock = VersionVector::new();
        clock.witness(Actor(5), 0, 1);
        let bad = seal(&ReapedRow { reaped_wall_ms: 1, clock, digest: None }).unwrap();
        assert!(unseal::<ReapedRow>(&bad).is_ok());
        assert!(decode_reaped_row(&bad).is_err());
        let mut s = store();
        s.engine.poke(Table::Reaped, &row_key(b"k"), bad);
        let mut o = Object::new();
        o.update(&VersionVector::new(), Actor(9), Some(b"v".to_vec()), 1, 10);
        // Never read as absent: the merge that meets it fails and the record is set aside...
        let merge = StoreOp::Merge { objects: vec![(b"k".to_vec(), o.clone())] };
        assert!(matches!(s.run(merge.clone()), Err(StoreError::Corrupt { .. })));
        assert_eq!((s.engine.len(Table::Reaped), s.engine.len(Table::Quarantine)), (0, 1));
        // ...and the next one stores a valid, readable object.
        s.run(merge).unwrap();
        assert_eq!(s.object(b"k"), Some(o), "stored, valid, and readable");
    }

    #[test]
    fn a_replica_that_reaped_a_state_agrees_to_reap_it_elsewhere() {
        // Found by the simulation (seed 29): a reaping's removal reached two replicas but
        // was lost on its way to the third, which kept the tombstone for good: the others
        // answered its checks "no" (no row) and dropped its anti-entropy pushes (reaped).
        let (mut a, mut b) = (store(), store());
        let v = coordinate(&mut a, b"k", &VersionVector::new(), b"v", None);
        let del =
            StoreOp::Coordinate { key: b"k".to_vec(), context: v.context(), value: None, hint: None, now_wall_ms: 5 };
        let Ok(StoreOutcome::Coordinated(Ok(tomb))) = a.run(del) else { panic!() };
        b.run(StoreOp::Write { key: b"k".to_vec(), object: tomb.clone(), hint: None }).unwrap();
        let d = tomb.digest();
        let remove = StoreOp::ReapRemove { key: b"k".to_vec(), digest: d };
        assert_eq!(a.run(remove.clone()), Ok(StoreOutcome::Reaped { yes: true }));
        // b missed the removal; its own reaping asks a, which reaped exactly that state.
        assert_eq!(a.run(StoreOp::ReapCheck { key: b"k".to_vec(), digest: d }), Ok(StoreOutcome::Reaped { yes: true }));
        let other = StoreOp::ReapCheck { key: b"k".to_vec(), digest: [7; 16] };
        assert_eq!(a.run(other), Ok(StoreOutcome::Reaped { yes: false }), "another state is not agreed to");
        assert_eq!(a.run(remove.clone()), Ok(StoreOutcome::Reaped { yes: true }));
        assert_eq!(b.run(remove), Ok(StoreOutcome::Reaped { yes: true }));
        assert!(b.object(b"k").is_none());
        assert_eq!(a.state.tree(partition_of(b"k", 16)), b.state.tree(partition_of(b"k", 16)));
        // A record written before records kept the digest still reads, and agrees to nothing.
        let old = seal(&(9u64, tomb.clock().clone())).unwrap();
        assert_eq!(decode_reaped_row(&old).map(|r| r.digest), Ok(None));
    }

    /// A transaction whose puts fail once `puts_left` of them went through (a full disk).
    struct FailingAfter<'a>(MemTxn<'a>, usize);

    impl Engine for FailingAfter<'_> {
        fn get(&self, t: Table, k: &[u8]) -> Result<Option<Vec<u8>>, EngineError> {
            self.0.get(t, k)
        }
        fn put(&mut self, t: Table, k: &[u8], v: &[u8]) -> Result<(), EngineError> {
            if self.1 == 0 {
                return Err(EngineError("disk full".into()));
            }
            self.1 -= 1;
            self.0.put(t, k, v)
        }
        fn delete(&mut self, t: Table, k: &[u8]) -> Result<(), EngineError> {
            self.0.delete(t, k)
        }
        fn scan(
            &self,
            t: Table,
            f: &[u8],
            to: Option<&[u8]>,
            v: &mut dyn FnMut(&[u8], &[u8]) -> bool,
        ) -> Result<(), EngineError> {
            self.0.scan(t, f, to, v)
        }
    }

    #[test]
    fn a_failed_engine_write_fails_the_whole_batch_and_changes_nothing() {
        let mut s = store();
        let before = (s.engine.clone(), s.state.trees.clone());
        let state = s.state.clone();
        let mut txn = FailingAfter(s.engine.begin(), 0);
        let op = StoreOp::Coordinate {
            key: b"k".to_vec(),
            context: VersionVector::new(),
            value: Some(b"v".to_vec()),
            hint: None,
            now_wall_ms: 1,
        };
        let run = state.run(&mut txn, vec![op, StoreOp::Read { key: b"x".to_vec() }], 0);
        drop(txn);
        assert!(run.failed.is_some());
        assert!(run.outcomes.iter().all(|o| matches!(o, Err(StoreError::Io(_)))));
        assert_eq!((s.engine.clone(), s.state.trees.clone()), before);
    }

    #[test]
    fn a_failed_batch_answers_every_operation_with_an_error() {
        // A put that fails midway through a batch: the operations before it ran, the ones
        // after it never did; each caller must still hear back.
        let mut s = store();
        let state = s.state.clone();
        let before = s.engine.clone();
        let write = |k: &str| StoreOp::Coordinate {
            key: k.as_bytes().to_vec(),
            context: VersionVector::new(),
            value: Some(b"v".to_vec()),
            hint: None,
            now_wall_ms: 1,
        };
        let ops =
            vec![StoreOp::Read { key: b"x".to_vec() }, write("a"), write("b"), StoreOp::Read { key: b"y".to_vec() }];
        let mut txn = FailingAfter(s.engine.begin(), 1);
        let run = state.run(&mut txn, ops, 0);
        drop(txn);
        assert!(run.failed.is_some());
        assert_eq!(run.outcomes.len(), 4, "{:?}", run.outcomes);
        assert!(run.outcomes.iter().all(|o| matches!(o, Err(StoreError::Io(_)))));
        assert_eq!(s.engine, before);
    }

    #[test]
    fn members_round_trip_and_corruption_is_an_error() {
        let mut s = store();
        s.run(StoreOp::SaveMembers { members: Vec::new() }).unwrap();
        assert_eq!(StoreState::load_members(&s.engine), Ok(Vec::new()));
        s.engine.poke(Table::Meta, META_MEMBERS, vec![1, 0, 0]);
        assert!(matches!(StoreState::load_members(&s.engine), Err(StoreError::Corrupt { .. })));
    }

    #[test]
    fn key_layouts_round_trip() {
        assert_eq!(split_hint_row_key(&hint_row_key(b"user:1", "n3")), Some((b"user:1".as_slice(), "n3")));
        assert_eq!(split_hint_row_key(&[0, 0, 0, 9, b'a']), None);
        assert_eq!(split_hint_row_key(&[]), None);
        assert_eq!(split_index_key(&index_key("n3", b"k")), Some(("n3", b"k".as_slice())));
        assert_eq!(prefix_end(&[1, 0xff]), Some(vec![2]));
        assert_eq!(prefix_end(&[0xff]), None);
        assert_eq!(partition_bounds(u32::MAX).1, None);
    }
}
