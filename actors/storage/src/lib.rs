//! ringkv's storage engine binding: the core's store layout ([`ringkv::store`]) on redb, one
//! file per node. This crate only moves bytes: [`WriteEngine`] and [`ReadEngine`] give the
//! core the ordered tables of one redb transaction, and [`Storage`] runs batches of
//! operations (the group commit the node's storage stage feeds), and applies the in-memory
//! changes only once a batch is logged. No actix here: the node hosts it on a thread.
//! A batch is acknowledged once its [`commit_log`] record is written: flushed to the disk
//! in `sync` mode and for a batch asked to be durable, left to the page cache otherwise
//! (`buffered` mode, where a process crash loses nothing and the log is flushed every
//! `storage.flush_interval_ms`, as Cassandra's periodic commit log sync). Redb commits the
//! logged batches later, together ([`overlay`] holds their rows for readers meanwhile),
//! without syncing, and syncs only at checkpoints (when the log fills or fails to take a
//! batch, and at a clean stop).

pub mod commit_log;
pub mod overlay;

use std::cell::OnceCell;
use std::hash::{BuildHasher, Hasher};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use commit_log::{CommitLog, LogName, Record};
use overlay::{Overlaid, Overlay};
use redb::{
    Database, Durability, ReadOnlyTable, ReadTransaction, ReadableDatabase, ReadableTable, TableDefinition,
    WriteTransaction,
};
use ringkv::config::Durability as DurabilityMode;
use ringkv::store::{
    Engine, EngineError, EngineReads, OpenReport, Read, ReadOnly, Saved, StoreError, StoreLimits, StoreOp,
    StoreOutcome, StoreReader, StoreState, Table, Visit,
};

type Def = TableDefinition<'static, &'static [u8], &'static [u8]>;

const DEFS: [Def; 6] = [
    TableDefinition::new("objects"),
    TableDefinition::new("hints"),
    TableDefinition::new("hint_index"),
    TableDefinition::new("reaped"),
    TableDefinition::new("quarantine"),
    TableDefinition::new("meta"),
];

/// The database's log id and the generation of the commit log that follows redb's last
/// durable commit (this crate's own table: the core never sees it).
const LOG_NAME: Def = TableDefinition::new("commit_log");
const LOG_NAME_KEY: &[u8] = b"name";

fn index(table: Table) -> usize {
    overlay::table_byte(table) as usize
}

fn def(table: Table) -> Def {
    DEFS[index(table)]
}

fn err(e: impl std::fmt::Display) -> EngineError {
    EngineError(e.to_string())
}

/// The tables of a redb write transaction, each opened when first used.
type Tables<'t> = [OnceCell<redb::Table<'t, &'static [u8], &'static [u8]>>; 6];

self_cell::self_cell!(
    /// A write transaction kept across the batches logged until redb commits them, with the
    /// tables opened in it: a batch opens and closes none (a table's open, a lookup in the
    /// transaction's table tree, and its close cost about a tenth of a one-write batch).
    struct HeldWrite {
        owner: WriteTransaction,
        #[not_covariant]
        dependent: Tables,
    }
);

impl HeldWrite {
    fn begin(db: &Database) -> Result<HeldWrite, redb::TransactionError> {
        Ok(HeldWrite::new(db.begin_write()?, |_| Tables::default()))
    }
}

/// The tables of one redb write transaction, each opened when first used; the row changes
/// are also written down as a [`commit_log`] payload when logging.
pub struct WriteEngine<'t> {
    txn: &'t WriteTransaction,
    tables: Tables<'t>,
    log: Option<Record>,
}

impl<'t> WriteEngine<'t> {
    pub fn new(txn: &'t WriteTransaction) -> Self {
        WriteEngine::logging(txn, Tables::default(), None)
    }

    /// An engine on `tables` (opened in `txn` by the batches before, or not yet) that also
    /// writes its changes down in `record` (cleared first), if any.
    fn logging(txn: &'t WriteTransaction, tables: Tables<'t>, mut record: Option<Record>) -> Self {
        if let Some(r) = &mut record {
            r.clear();
        }
        WriteEngine { txn, tables, log: record }
    }

    fn t(&self, table: Table) -> Result<&redb::Table<'t, &'static [u8], &'static [u8]>, EngineError> {
        let cell = &self.tables[table as usize];
        if let Some(t) = cell.get() {
            return Ok(t);
        }
        let opened = self.txn.open_table(def(table)).map_err(err)?;
        Ok(cell.get_or_init(|| opened))
    }

    fn t_mut(&mut self, table: Table) -> Result<&mut redb::Table<'t, &'static [u8], &'static [u8]>, EngineError> {
        self.t(table)?;
        self.tables[table as usize].get_mut().ok_or_else(|| EngineError("table not open".into()))
    }
}

/// Lend the row `key` of `t` (None: no row) to `read`, from redb's page: the one body of
/// both redb engines' [`Engine::read`].
fn read_row<T: ReadableTable<&'static [u8], &'static [u8]>>(
    t: &T,
    key: &[u8],
    read: Read<'_>,
) -> Result<(), EngineError> {
    read(t.get(key).map_err(err)?.as_ref().map(|g| g.value()));
    Ok(())
}

fn scan_table<T: ReadableTable<&'static [u8], &'static [u8]>>(
    t: &T,
    from: &[u8],
    to: Option<&[u8]>,
    visit: Visit<'_>,
) -> Result<(), EngineError> {
    let range = match to {
        Some(to) if to <= from => return Ok(()),
        Some(to) => t.range(from..to).map_err(err)?,
        None => t.range(from..).map_err(err)?,
    };
    for row in range {
        let (k, v) = row.map_err(err)?;
        if !visit(k.value(), v.value()) {
            break;
        }
    }
    Ok(())
}

impl Engine for WriteEngine<'_> {
    fn get(&self, table: Table, key: &[u8]) -> Result<Option<Vec<u8>>, EngineError> {
        Ok(self.t(table)?.get(key).map_err(err)?.map(|g| g.value().to_vec()))
    }
    fn read(&self, table: Table, key: &[u8], read: Read<'_>) -> Result<(), EngineError> {
        read_row(self.t(table)?, key, read)
    }
    fn put(&mut self, table: Table, key: &[u8], value: &[u8]) -> Result<(), EngineError> {
        self.t_mut(table)?.insert(key, value).map_err(err)?;
        if let Some(log) = &mut self.log {
            log.push_put(overlay::table_byte(table), key, value);
        }
        Ok(())
    }
    fn delete(&mut self, table: Table, key: &[u8]) -> Result<(), EngineError> {
        self.t_mut(table)?.remove(key).map_err(err)?;
        if let Some(log) = &mut self.log {
            log.push_delete(overlay::table_byte(table), key);
        }
        Ok(())
    }
    fn scan(&self, table: Table, from: &[u8], to: Option<&[u8]>, visit: Visit<'_>) -> Result<(), EngineError> {
        scan_table(self.t(table)?, from, to, visit)
    }
}

/// The tables of one redb read transaction, each opened when first used: a snapshot
/// ([`ReadOnly`] makes it an [`Engine`] whose writes fail).
pub struct ReadEngine {
    txn: ReadTransaction,
    tables: [OnceCell<ReadOnlyTable<&'static [u8], &'static [u8]>>; 6],
}

impl ReadEngine {
    pub fn new(txn: ReadTransaction) -> Self {
        ReadEngine { txn, tables: Default::default() }
    }

    fn t(&self, table: Table) -> Result<&ReadOnlyTable<&'static [u8], &'static [u8]>, EngineError> {
        let cell = &self.tables[table as usize];
        if let Some(t) = cell.get() {
            return Ok(t);
        }
        let opened = self.txn.open_table(def(table)).map_err(err)?;
        Ok(cell.get_or_init(|| opened))
    }
}

impl EngineReads for ReadEngine {
    fn get(&self, table: Table, key: &[u8]) -> Result<Option<Vec<u8>>, EngineError> {
        Ok(self.t(table)?.get(key).map_err(err)?.map(|g| g.value().to_vec()))
    }
    fn read(&self, table: Table, key: &[u8], read: Read<'_>) -> Result<(), EngineError> {
        read_row(self.t(table)?, key, read)
    }
    fn scan(&self, table: Table, from: &[u8], to: Option<&[u8]>, visit: Visit<'_>) -> Result<(), EngineError> {
        scan_table(self.t(table)?, from, to, visit)
    }
}

/// One node's redb file and its store state.
pub struct Storage {
    shared: Shared,
    state: StoreState,
    mode: DurabilityMode,
    /// The commit log (None only while the database is opened again).
    log: Option<CommitLog>,
    /// The log redb's last durable commit named.
    log_name: LogName,
    /// The record each batch's changes are written down in, kept from batch to batch.
    record: Record,
    /// How to open the database again.
    path: PathBuf,
    q: u32,
    limits: StoreLimits,
    fresh_epoch: u64,
    /// A commit failed: redb refuses every write until the database is opened again, which
    /// the next batch does first.
    broken: bool,
    /// Opening again failed: batches fail at once until then (it rebuilds every tree).
    reopen_not_before: Option<Instant>,
    /// The write transaction holding the batches logged since redb's last commit (their
    /// rows are in the shared [`Overlay`] for readers), and how many.
    txn: Option<HeldWrite>,
    unsettled_batches: usize,
    /// What the last batches' disk work took, until the caller takes it.
    timings: Timings,
}

/// How long the disk work of the batches run since the last [`Storage::take_timings`] took,
/// for metrics: it tells the device's share of a commit from the CPU's.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Timings {
    /// Each append of a commit log record, its flush included (`sync`: the device's write).
    pub log_appends: Vec<Duration>,
    /// Each redb commit of logged batches ([`Storage::settle`]) and each checkpoint.
    pub redb_commits: Vec<Duration>,
}

/// Timings kept at most of each kind until taken (more are not noted).
const TIMINGS_MAX: usize = 1024;

impl Timings {
    fn note(list: &mut Vec<Duration>, took: Duration) {
        if list.len() < TIMINGS_MAX {
            list.push(took);
        }
    }
}

/// Logged batches redb commits together at most ([`Storage::settle`]): one redb commit per
/// this many group commits of the log, or sooner when their rows take
/// [`UNSETTLED_BYTES_MAX`], which bounds the overlay's memory.
pub const UNSETTLED_BATCHES_MAX: usize = 256;
pub const UNSETTLED_BYTES_MAX: usize = 4 << 20;

/// How long after a failed attempt to open the database again the next one waits.
const REOPEN_BACKOFF: std::time::Duration = std::time::Duration::from_secs(1);

/// The database, the read snapshot (a read transaction and the tables opened in it) that
/// readers share until the next commit, and the rows of the batches logged since that
/// commit: the writer adds a logged batch's rows to the overlay before anyone hears of the
/// batch, and drops the snapshot and clears the overlay together once redb committed them,
/// so a read that starts after a write's acknowledgement always sees the write, and no
/// snapshot outlives a commit to pin pages the commit freed. No database while the writer
/// opens it again after a failure.
#[derive(Default)]
struct Open {
    db: Option<Arc<Database>>,
    snapshot: Option<ReadEngine>,
    overlay: Overlay,
}

type Shared = Arc<Mutex<Open>>;

fn lock(shared: &Shared) -> MutexGuard<'_, Open> {
    // A reader that panicked left nothing half-done (its snapshot and the overlay are
    // read-only to it); the writer changes the overlay with plain inserts and clears.
    shared.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Runs row reads ([`StoreOp::reads_rows_only`]) in read snapshots of the database, on the
/// caller's thread: a replica read never waits behind the writer's group commit.
#[derive(Clone)]
pub struct Reader {
    reader: StoreReader,
    shared: Shared,
}

impl Reader {
    /// The outcomes, and the operations the writer must run after (quarantines of rows
    /// found unreadable).
    pub fn run(&self, ops: Vec<StoreOp>, now_wall_ms: u64) -> (Vec<Result<StoreOutcome, StoreError>>, Vec<StoreOp>) {
        let mut guard = lock(&self.shared);
        let open = &mut *guard;
        let failed = |e: String| (ops.iter().map(|_| Err(StoreError::Io(e.clone()))).collect(), Vec::new());
        let engine = match (open.snapshot.take(), &open.db) {
            (Some(engine), _) => engine,
            (None, Some(db)) => match db.begin_read() {
                Ok(txn) => ReadEngine::new(txn),
                Err(e) => return failed(e.to_string()),
            },
            (None, None) => return failed("the storage is being opened again after a failed commit".into()),
        };
        let snapshot = &*open.snapshot.insert(engine);
        let run = if open.overlay.is_empty() {
            self.reader.run(snapshot, ops, now_wall_ms)
        } else {
            self.reader.run(Overlaid { base: snapshot, overlay: &open.overlay }, ops, now_wall_ms)
        };
        (run.outcomes, run.pending.quarantine)
    }
}

/// A database opened, its log replayed.
struct Parts {
    db: Database,
    state: StoreState,
    report: OpenReport,
    saved: Saved,
    log: CommitLog,
    log_name: LogName,
}

/// The log redb names; a new random log id at generation 0 when it names none (a new
/// database, or one from before the commit log).
fn read_log_name(txn: &WriteTransaction) -> Result<LogName, EngineError> {
    let table = txn.open_table(LOG_NAME).map_err(err)?;
    let Some(row) = table.get(LOG_NAME_KEY).map_err(err)? else {
        let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
        hasher.write_u128(
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos(),
        );
        hasher.write_u32(std::process::id());
        return Ok(LogName { id: hasher.finish(), generation: 0 });
    };
    let word = |from: usize| row.value().get(from..from + 8).and_then(|b| b.try_into().ok()).map(u64::from_le_bytes);
    match (word(0), word(8), row.value().len()) {
        (Some(id), Some(generation), 16) => Ok(LogName { id, generation }),
        _ => Err(EngineError("the commit log's name is not 16 bytes".into())),
    }
}

/// Name the log's next generation in a transaction about to commit durably.
fn next_generation(txn: &WriteTransaction, name: LogName) -> Result<LogName, EngineError> {
    let generation =
        name.generation.checked_add(1).ok_or_else(|| EngineError("commit log generations ran out".into()))?;
    let mut row = name.id.to_le_bytes().to_vec();
    row.extend_from_slice(&generation.to_le_bytes());
    txn.open_table(LOG_NAME).map_err(err)?.insert(LOG_NAME_KEY, row.as_slice()).map_err(err)?;
    Ok(LogName { id: name.id, generation })
}

/// Apply the commit log's payloads, in order.
fn replay_into(engine: &mut WriteEngine<'_>, payloads: &[Vec<u8>]) -> Result<(), EngineError> {
    for (n, payload) in payloads.iter().enumerate() {
        let bad = || EngineError(format!("record {n} of the commit log does not decode"));
        for change in commit_log::decode_changes(payload).ok_or_else(bad)? {
            let table = *Table::ALL.get(change.table as usize).ok_or_else(bad)?;
            match change.value {
                Some(value) => engine.put(table, &change.key, &value)?,
                None => engine.delete(table, &change.key)?,
            }
        }
    }
    Ok(())
}

/// What opening found.
pub struct Opened {
    pub storage: Storage,
    pub saved: Saved,
    pub report: OpenReport,
}

impl Parts {
    fn open(path: &Path, q: u32, limits: StoreLimits, mode: DurabilityMode, fresh_epoch: u64) -> Result<Parts, String> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        }
        let db = Database::create(path).map_err(|e| format!("cannot open {}: {e}", path.display()))?;
        let mut txn = db.begin_write().map_err(|e| e.to_string())?;
        txn.set_durability(Durability::Immediate).map_err(|e| e.to_string())?;
        let log_name = read_log_name(&txn).map_err(|e| format!("{}: {e}", path.display()))?;
        let log_path = path.with_extension("commit-log");
        let (mut log, replay) = CommitLog::open(&log_path, log_name, mode == DurabilityMode::Sync)
            .map_err(|e| format!("cannot open {}: {e}", log_path.display()))?;
        let (state, report) = {
            let mut engine = WriteEngine::new(&txn);
            replay_into(&mut engine, &replay).map_err(|e| {
                format!("{}: {e}; move the data directory aside to rejoin as a new node", log_path.display())
            })?;
            if !replay.is_empty() {
                tracing::info!(batches = replay.len(), "commit log replayed");
            }
            let (mut state, report) =
                StoreState::open(&mut engine, q, limits, fresh_epoch).map_err(|e| e.to_string())?;
            if state.start(&mut engine).map_err(|e| e.to_string())? {
                tracing::warn!("the last run did not stop cleanly: writes are numbered under new actors from now on");
            }
            (state, report)
        };
        let log_name = next_generation(&txn, log_name).map_err(|e| e.to_string())?;
        txn.commit().map_err(|e| e.to_string())?;
        log.restart(log_name.generation);
        let saved = {
            let read = db.begin_read().map_err(|e| e.to_string())?;
            let engine = ReadEngine::new(read);
            StoreState::load_saved(&engine)
                .map_err(|e| format!("{}: the saved membership cannot be read ({e}); move the data directory aside to rejoin as a new node", path.display()))?
        };
        if report.quarantined > 0 {
            tracing::warn!(rows = report.quarantined, "unreadable rows quarantined; anti-entropy refills them");
        }
        if report.digests_mended > 0 {
            tracing::warn!(rows = report.digests_mended, "rows with a wrong stored digest written again");
        }
        Ok(Parts { db, state, report, saved, log, log_name })
    }
}

impl Storage {
    /// Open (or create) the node's database; `fresh_epoch` becomes the node's epoch if the
    /// database is new. Replays the commit log, rebuilds the Merkle trees and quarantines
    /// unreadable rows.
    pub fn open(
        path: &Path,
        q: u32,
        limits: StoreLimits,
        mode: DurabilityMode,
        fresh_epoch: u64,
    ) -> Result<Opened, String> {
        let Parts { db, state, report, saved, log, log_name } = Parts::open(path, q, limits, mode, fresh_epoch)?;
        let log = Some(log);
        let storage = Storage {
            shared: Arc::new(Mutex::new(Open { db: Some(Arc::new(db)), snapshot: None, overlay: Overlay::default() })),
            state,
            mode,
            log,
            log_name,
            path: path.to_path_buf(),
            q,
            limits,
            fresh_epoch,
            broken: false,
            reopen_not_before: None,
            record: Record::default(),
            txn: None,
            unsettled_batches: 0,
            timings: Timings::default(),
        };
        Ok(Opened { storage, saved, report })
    }

    /// Open the database again after a failed commit, as at a start: redb's last durable
    /// commit, then the commit log (every acknowledged batch since). Readers fail until it
    /// is open.
    fn reopen(&mut self) -> Result<(), String> {
        let now = Instant::now();
        if self.reopen_not_before.is_some_and(|t| now < t) {
            return Err("the storage failed and is not open yet".into());
        }
        self.txn = None;
        self.unsettled_batches = 0;
        *lock(&self.shared) = Open::default();
        // What `buffered` mode logged must not wait for a flush that a failed reopen delays.
        if let Some(mut log) = self.log.take() {
            if let Err(e) = log.sync() {
                tracing::error!(error = %e, "commit log sync failed before opening the storage again");
            }
        }
        let parts = Parts::open(&self.path, self.q, self.limits, self.mode, self.fresh_epoch).map_err(|e| {
            self.reopen_not_before = Some(now + REOPEN_BACKOFF);
            format!("opening the storage again after a failed commit failed: {e}")
        })?;
        tracing::warn!(objects = parts.report.objects, "storage opened again after a failed commit");
        self.state = parts.state;
        self.log = Some(parts.log);
        self.log_name = parts.log_name;
        lock(&self.shared).db = Some(Arc::new(parts.db));
        self.broken = false;
        self.reopen_not_before = None;
        Ok(())
    }

    /// The database, opened again first after a failed commit.
    fn db(&mut self) -> Result<Arc<Database>, String> {
        if self.broken {
            self.reopen()?;
        }
        lock(&self.shared).db.clone().ok_or_else(|| "the storage is not open".to_string())
    }

    /// A reader of this database for the operations that read rows only, to run on any
    /// thread beside this writer.
    pub fn reader(&self) -> Reader {
        Reader { reader: self.state.reader(), shared: self.shared.clone() }
    }

    pub fn state(&self) -> &StoreState {
        &self.state
    }

    /// Run a batch: in a read transaction when every operation only reads, else in the
    /// write transaction of the logged batches, its record appended to the commit log
    /// (flushed when `durable` or in `sync` mode), or, when the log cannot take it, committed
    /// durably in redb. The in-memory state changes only once it is logged or committed.
    /// Unreadable rows that a read batch met are quarantined right after, in a write
    /// transaction of their own. `ahead` hears each coordinated write (by its index in
    /// `ops`) once computed, before the commit ([`ringkv::stage::Input::Ahead`]); a commit
    /// that then fails retires the store's actors ([`StoreState::abandon`]).
    pub fn run(
        &mut self,
        ops: Vec<StoreOp>,
        durable: bool,
        now_wall_ms: u64,
        ahead: &mut dyn FnMut(usize, &StoreOutcome),
    ) -> Vec<Result<StoreOutcome, StoreError>> {
        let n = ops.len();
        let failed = |e: String| (0..n).map(|_| Err(StoreError::Io(e.clone()))).collect();
        let read_only = ops.iter().all(StoreOp::is_read_only);
        // A read transaction sees redb's commits only.
        if read_only && !self.broken {
            if let Err(e) = self.settle() {
                return failed(e);
            }
        }
        let db = match self.db() {
            Ok(db) => db,
            Err(e) => return failed(e),
        };
        if read_only {
            let run = match db.begin_read() {
                Ok(txn) => self.state.run(&mut ReadOnly(ReadEngine::new(txn)), ops, now_wall_ms),
                Err(e) => return failed(e.to_string()),
            };
            if !run.pending.quarantine.is_empty() {
                let _ = self.run(run.pending.quarantine, false, now_wall_ms, &mut |_, _| {});
            }
            return run.outcomes;
        }
        let mut txn = match self.write_txn(&db) {
            Ok(t) => t,
            Err(e) => return failed(e),
        };
        let (run, record) = txn.with_dependent_mut(|txn, tables| {
            let record = self.log.is_some().then(|| std::mem::take(&mut self.record));
            let mut engine = WriteEngine::logging(txn, std::mem::take(tables), record);
            let run = self.state.run(&mut engine, ops, now_wall_ms);
            *tables = engine.tables;
            (run, engine.log)
        });
        if let Some(e) = &run.failed {
            // redb keeps an I/O error that a write met and refuses to commit until the
            // database is opened again.
            tracing::error!(error = %e, "a storage write failed");
            let _ = txn.into_owner().abort();
            self.broken = true;
            return run.outcomes;
        }
        for (k, outcome) in run.ahead() {
            ahead(k, outcome);
        }
        // A batch that saves a new generation is durable before it is acknowledged.
        let durable = durable || run.must_be_durable();
        // Durable once logged (a batch that changed nothing needs no record); a batch the
        // log cannot take commits durably in redb, which starts the log over.
        let logged = match (&mut self.log, record) {
            (Some(log), Some(mut record)) => {
                let len = record.payload().len();
                let logged = if len == 0 {
                    // Nothing to log, but a durable batch (a handoff's merge, whose sender
                    // drops its copy on the answer) still needs what it holds on the disk.
                    match durable {
                        true => log.sync().ok().map(|()| Vec::new()),
                        false => Some(Vec::new()),
                    }
                } else if !log.fits(len) {
                    None
                } else {
                    let started = Instant::now();
                    let appended = log.append(&mut record, durable);
                    Timings::note(&mut self.timings.log_appends, started.elapsed());
                    match appended {
                        Err(e) => {
                            tracing::warn!(error = %e, "commit log append failed: the batch commits durably in redb");
                            None
                        }
                        // The record was just written from these changes, so they decode; if
                        // they did not, the batch would commit durably below (safe, if slow).
                        Ok(()) => commit_log::decode_changes(record.payload()),
                    }
                };
                self.record = record;
                logged
            }
            _ => None,
        };
        if let Some(changes) = logged {
            // Durable in the log: redb commits it with the next batches, and readers see
            // its rows in the overlay until then.
            self.txn = Some(txn);
            self.unsettled_batches = self.unsettled_batches.saturating_add(1);
            let overlay_bytes = {
                let mut open = lock(&self.shared);
                open.overlay.extend(changes);
                open.overlay.bytes()
            };
            self.state.commit(&run.pending);
            if self.unsettled_batches >= UNSETTLED_BATCHES_MAX || overlay_bytes >= UNSETTLED_BYTES_MAX {
                if let Err(e) = self.settle() {
                    // Nothing is lost: the next batch opens the database again and replays the log.
                    tracing::error!(error = %e, "storage commit of logged batches failed");
                }
            }
        } else {
            // A batch the log could not take is made durable in redb, which starts the log over.
            if let Err(e) = self.commit(txn.into_owner(), true) {
                tracing::error!(error = %e, "storage commit failed");
                self.state.abandon();
                return failed(e);
            }
            self.committed();
            self.state.commit(&run.pending);
        }
        if run.pending.quarantined > 0 {
            tracing::warn!(rows = run.pending.quarantined, "unreadable rows quarantined; anti-entropy refills them");
        }
        run.outcomes
    }

    /// Make every acknowledged batch durable: `buffered` mode's periodic flush. The commit
    /// log is synced (a checkpoint when that fails, or when there is no log).
    pub fn flush(&mut self) -> Result<(), String> {
        if let Some(log) = &mut self.log {
            match log.sync() {
                Ok(()) => return Ok(()),
                Err(e) => tracing::warn!(error = %e, "commit log sync failed: checkpointing instead"),
            }
        }
        self.checkpoint()
    }

    /// Commit everything durably in redb (the logged batches too), and start the log over.
    pub fn checkpoint(&mut self) -> Result<(), String> {
        let db = self.db()?;
        let txn = self.write_txn(&db)?;
        self.commit(txn.into_owner(), true)?;
        self.committed();
        Ok(())
    }

    /// Commit the logged batches waiting in the open write transaction, if any (without
    /// syncing: the log holds them). A failure loses nothing: the storage is broken, and
    /// opening it again replays the log; readers see the overlay until then.
    pub fn settle(&mut self) -> Result<(), String> {
        let Some(txn) = self.txn.take() else {
            return Ok(());
        };
        self.commit(txn.into_owner(), false)?;
        self.committed();
        Ok(())
    }

    /// The write transaction of the logged batches, or a new one when none waits. A
    /// failure leaves the storage broken until it is opened again.
    fn write_txn(&mut self, db: &Database) -> Result<HeldWrite, String> {
        self.txn.take().map_or_else(|| HeldWrite::begin(db), Ok).map_err(|e| {
            self.broken = true;
            e.to_string()
        })
    }

    /// Redb committed everything: readers start from a new snapshot, with no overlay.
    fn committed(&mut self) {
        self.unsettled_batches = 0;
        let mut open = lock(&self.shared);
        open.snapshot = None;
        open.overlay.clear();
    }

    /// Commit `txn`: durably when `checkpoint`, naming the log's next generation, which then
    /// starts over. A failure leaves the storage broken until it is opened again.
    fn commit(&mut self, txn: WriteTransaction, checkpoint: bool) -> Result<(), String> {
        let started = Instant::now();
        let committed = self.commit_untimed(txn, checkpoint);
        Timings::note(&mut self.timings.redb_commits, started.elapsed());
        committed
    }

    /// The disk work of the batches run since the last call ([`Timings`]).
    pub fn take_timings(&mut self) -> Timings {
        std::mem::take(&mut self.timings)
    }

    fn commit_untimed(&mut self, mut txn: WriteTransaction, checkpoint: bool) -> Result<(), String> {
        let name = self.log_name;
        let committed = (|| {
            let next = checkpoint.then(|| next_generation(&txn, name)).transpose().map_err(|e| e.0)?;
            txn.set_durability(if checkpoint { Durability::Immediate } else { Durability::None })
                .map_err(|e| e.to_string())?;
            txn.commit().map_err(|e| e.to_string())?;
            Ok::<_, String>(next)
        })();
        match committed {
            Ok(next) => {
                if let Some(next) = next {
                    self.restart_log(next);
                }
                Ok(())
            }
            Err(e) => {
                self.broken = true;
                Err(e)
            }
        }
    }

    /// A durable commit naming `name` succeeded: the log starts over.
    fn restart_log(&mut self, name: LogName) {
        self.log_name = name;
        if let Some(log) = &mut self.log {
            log.restart(name.generation);
        }
    }

    /// A clean stop: the store marked closed, and everything durable in redb (the commit
    /// log starts over).
    pub fn close(&mut self, now_wall_ms: u64) -> Result<(), String> {
        match self.run(vec![StoreOp::Close], true, now_wall_ms, &mut |_, _| {}).pop() {
            Some(Ok(_)) => self.checkpoint(),
            Some(Err(e)) => Err(e.to_string()),
            None => Err("no outcome".into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ringkv::version::VersionVector;

    fn write(key: &str, context: VersionVector, value: Option<Vec<u8>>) -> StoreOp {
        StoreOp::Coordinate { key: key.as_bytes().to_vec(), context, value, hint: None, now_wall_ms: 1 }
    }

    fn coordinate(key: &str) -> StoreOp {
        write(key, VersionVector::new(), Some(vec![1; 10]))
    }

    /// The storage in `dir`.
    fn open(dir: &Path, mode: DurabilityMode, epoch: u64) -> Opened {
        Storage::open(&dir.join("db.redb"), 16, StoreLimits::default(), mode, epoch).unwrap()
    }

    /// Run the test `test` again in a child process, with `var` naming `dir`.
    fn in_child(test: &str, var: &str, dir: &Path) -> std::process::Output {
        std::process::Command::new(std::env::current_exe().unwrap())
            .args(["--exact", &format!("tests::{test}"), "--nocapture"])
            .env(var, dir)
            .output()
            .unwrap()
    }

    fn read_object(s: &Storage, key: &str) -> Option<ringkv::version::Object> {
        match s.reader().run(vec![StoreOp::Read { key: key.as_bytes().to_vec() }], 1).0.pop() {
            Some(Ok(StoreOutcome::State(state))) => state.map(|(object, _)| object),
            other => panic!("read {key}: {other:?}"),
        }
    }

    const CRASH_DIR: &str = "RINGKV_STORAGE_CRASH_DIR";
    const BATCHES: usize = 150;

    /// In a child process (this test run again with [`CRASH_DIR`] set): acknowledged batches
    /// in `mode`, some deleting what earlier ones wrote, then an exit that closes
    /// nothing, as a crash would: redb's non-durable commits are lost with the process, and
    /// only what the commit log holds can bring them back. 4 values of 16 KB a batch fill
    /// the log past its capacity on the way, so the run also checkpoints.
    fn crash_child(dir: &Path, mode: DurabilityMode) -> ! {
        let mut s = open(dir, mode, 1).storage;
        for batch in 0..BATCHES {
            let mut ops: Vec<StoreOp> =
                (0..4).map(|i| write(&format!("k{batch}-{i}"), VersionVector::new(), Some(vec![i; 16_000]))).collect();
            if batch > 0 {
                let context = read_object(&s, &format!("k{}-0", batch - 1)).unwrap().context();
                ops.push(write(&format!("k{}-0", batch - 1), context, None));
            }
            let out = s.run(ops, false, 1, &mut |_, _| {});
            assert!(out.iter().all(|r| matches!(r, Ok(StoreOutcome::Coordinated(Ok(_))))), "{out:?}");
            println!("acknowledged {batch}");
        }
        std::process::exit(0)
    }

    /// A data directory after [`crash_child`] ran in it (in the mode `test` asks for).
    fn crashed_in(test: &str, var: &str) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        let child = in_child(test, var, dir.path());
        let stdout = String::from_utf8_lossy(&child.stdout);
        assert_eq!(stdout.lines().filter(|l| l.starts_with("acknowledged ")).count(), BATCHES, "{stdout}");
        dir
    }

    fn crashed() -> tempfile::TempDir {
        crashed_in("acknowledged_batches_survive_a_crash_through_the_commit_log", CRASH_DIR)
    }

    #[test]
    fn acknowledged_batches_survive_a_crash_through_the_commit_log() {
        if let Some(dir) = std::env::var_os(CRASH_DIR) {
            crash_child(Path::new(&dir), DurabilityMode::Sync);
        }
        assert_every_batch_is_there(crashed(), DurabilityMode::Sync);
    }

    const BUFFERED_CRASH_DIR: &str = "RINGKV_STORAGE_BUFFERED_CRASH_DIR";

    /// `buffered` mode flushes nothing per batch, but its records are in the page cache
    /// when the process dies, so a crash of the process alone loses no acknowledged batch.
    #[test]
    fn buffered_mode_loses_no_acknowledged_batch_when_the_process_dies() {
        if let Some(dir) = std::env::var_os(BUFFERED_CRASH_DIR) {
            crash_child(Path::new(&dir), DurabilityMode::Buffered);
        }
        let test = "buffered_mode_loses_no_acknowledged_batch_when_the_process_dies";
        assert_every_batch_is_there(crashed_in(test, BUFFERED_CRASH_DIR), DurabilityMode::Buffered);
    }

    fn assert_every_batch_is_there(dir: tempfile::TempDir, mode: DurabilityMode) {
        let o = open(dir.path(), mode, 2);
        assert_eq!(o.report.objects, 4 * BATCHES as u64, "every acknowledged write is there");
        for batch in 0..BATCHES {
            for i in 0..4u8 {
                let object = read_object(&o.storage, &format!("k{batch}-{i}")).unwrap();
                let deleted = i == 0 && batch + 1 < BATCHES;
                assert_eq!(object.is_deleted(), deleted, "k{batch}-{i}");
                if !deleted {
                    assert_eq!(object.values().collect::<Vec<_>>(), vec![&vec![i; 16_000][..]]);
                }
            }
        }
    }

    const FULL_DIR: &str = "RINGKV_STORAGE_FULL_DIR";

    fn set_file_size_max(bytes: libc::rlim_t) {
        let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
        // SAFETY: plain system calls on a local struct.
        unsafe {
            assert_eq!(libc::getrlimit(libc::RLIMIT_FSIZE, &mut limit), 0);
            limit.rlim_cur = bytes.min(limit.rlim_max);
            assert_eq!(libc::setrlimit(libc::RLIMIT_FSIZE, &limit), 0);
        }
    }

    /// In a child process (the file size limit is the process's): the disk fills up (a file
    /// size limit, past the commit log's size), commits fail, then space comes back. The
    /// storage opens the database again by itself and loses no acknowledged batch.
    fn full_child(dir: &Path) -> ! {
        // SAFETY: ignoring a signal; writes past the limit then fail with EFBIG instead.
        unsafe { libc::signal(libc::SIGXFSZ, libc::SIG_IGN) };
        let mut s = open(dir, DurabilityMode::Sync, 1).storage;
        set_file_size_max(commit_log::LOG_BYTES_MAX + (64 << 10));
        let (mut acknowledged, mut failures, mut lifted_at) = (Vec::new(), 0, None);
        let mut failures_with_space = 0;
        for batch in 0..2000 {
            if failures >= 3 && lifted_at.is_none() {
                set_file_size_max(libc::RLIM_INFINITY);
                lifted_at = Some(acknowledged.len());
            }
            let key = format!("k{batch}");
            let out = s.run(vec![write(&key, VersionVector::new(), Some(vec![7; 16_000]))], false, 1, &mut |_, _| {});
            match &out[0] {
                Ok(StoreOutcome::Coordinated(Ok(_))) => acknowledged.push(key),
                _ => {
                    failures += 1;
                    if lifted_at.is_some() {
                        // An attempt to open again that failed waits before the next.
                        failures_with_space += 1;
                        std::thread::sleep(REOPEN_BACKOFF);
                    }
                }
            }
            if lifted_at.is_some_and(|n| acknowledged.len() >= n + 20) || failures_with_space > 3 {
                break;
            }
        }
        assert!(failures >= 3, "the disk never filled up");
        assert!(lifted_at.is_some_and(|n| acknowledged.len() >= n + 20), "writes succeed again once there is space");
        let missing: Vec<&String> = acknowledged.iter().filter(|k| read_object(&s, k).is_none()).collect();
        assert!(missing.is_empty(), "lost before the restart: {missing:?}");
        let closed = s.close(1);
        assert!(closed.is_ok(), "the storage works again: {closed:?}");
        drop(s);
        let s = open(dir, DurabilityMode::Sync, 2).storage;
        let missing: Vec<&String> = acknowledged.iter().filter(|k| read_object(&s, k).is_none()).collect();
        assert!(missing.is_empty(), "lost after the restart: {missing:?}");
        println!("recovered: {} acknowledged, {failures} failed", acknowledged.len());
        std::process::exit(0)
    }

    #[test]
    fn a_full_disk_fails_commits_until_space_returns_and_loses_no_acknowledged_write() {
        if let Some(dir) = std::env::var_os(FULL_DIR) {
            full_child(Path::new(&dir));
        }
        let dir = tempfile::tempdir().unwrap();
        let test = "a_full_disk_fails_commits_until_space_returns_and_loses_no_acknowledged_write";
        let child = in_child(test, FULL_DIR, dir.path());
        let (stdout, stderr) = (String::from_utf8_lossy(&child.stdout), String::from_utf8_lossy(&child.stderr));
        assert!(child.status.success() && stdout.contains("recovered: "), "{stdout}\n{stderr}");
    }

    #[test]
    fn a_node_restarted_in_buffered_mode_replays_what_sync_mode_logged() {
        let dir = crashed();
        let buffered = open(dir.path(), DurabilityMode::Buffered, 2);
        assert_eq!(buffered.report.objects, 4 * BATCHES as u64);
    }

    #[test]
    fn a_new_database_beside_an_old_commit_log_replays_none_of_it() {
        let dir = tempfile::tempdir().unwrap();
        let open = |epoch| open(dir.path(), DurabilityMode::Sync, epoch);
        let mut s = open(1).storage;
        for i in 0..10 {
            s.run(vec![coordinate(&format!("k{i}"))], false, 1, &mut |_, _| {});
        }
        s.close(1).unwrap();
        drop(s);
        std::fs::remove_file(dir.path().join("db.redb")).unwrap();
        let fresh = open(2);
        assert_eq!(fresh.report.objects, 0);
        drop(fresh);
        assert_eq!(open(3).report.objects, 0, "the old database's records stay out of the new one");
    }

    #[test]
    fn a_reader_sees_every_committed_batch_and_runs_row_reads_only() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = open(dir.path(), DurabilityMode::Sync, 1).storage;
        let reader = s.reader();
        let read = |k: &str| StoreOp::Read { key: k.as_bytes().to_vec() };
        assert_eq!(reader.run(vec![read("a")], 1).0, vec![Ok(StoreOutcome::State(None))]);
        let mut aheads = Vec::new();
        let written = s.run(vec![coordinate("a")], false, 1, &mut |k, o| aheads.push((k, o.clone())));
        let Some(Ok(StoreOutcome::Coordinated(Ok(object)))) = written.into_iter().next() else { panic!() };
        assert_eq!(aheads, vec![(0, StoreOutcome::Coordinated(Ok(object.clone())))], "heard before the commit");
        let (outcomes, follow) = reader.run(vec![read("a"), read("b")], 1);
        let digest = object.digest();
        assert_eq!(outcomes, vec![Ok(StoreOutcome::State(Some((object, digest)))), Ok(StoreOutcome::State(None))]);
        assert!(follow.is_empty());
        let (refused, _) = reader.run(vec![StoreOp::Tree { tree: ringkv::store::TreeId::default_of(0) }], 1);
        assert!(refused[0].is_err());
    }

    /// The bytes an engine's `read` lends for a row, copied out.
    fn lent(read: impl FnOnce(Read<'_>) -> Result<(), EngineError>) -> Option<Vec<u8>> {
        let mut out = None;
        read(&mut |bytes| out = bytes.map(<[u8]>::to_vec)).unwrap();
        out
    }

    /// Rows are decoded straight from redb's pages: what `read` lends is what `get` copies,
    /// in a write transaction (its own uncommitted rows included) and in a snapshot.
    #[test]
    fn redb_engines_lend_the_rows_they_copy() {
        let dir = tempfile::tempdir().unwrap();
        let db = Database::create(dir.path().join("lend.redb")).unwrap();
        let keys: [&[u8]; 3] = [b"a", b"b", b"absent"];
        let txn = db.begin_write().unwrap();
        {
            let mut w = WriteEngine::new(&txn);
            w.put(Table::Objects, b"a", b"one").unwrap();
            w.put(Table::Hints, b"b", &[7u8; 3000]).unwrap();
            for t in [Table::Objects, Table::Hints] {
                for k in keys {
                    assert_eq!(lent(|r| w.read(t, k, r)), w.get(t, k).unwrap(), "{t:?} {k:?}");
                }
            }
            assert_eq!(lent(|r| w.read(Table::Objects, b"a", r)), Some(b"one".to_vec()));
        }
        txn.commit().unwrap();
        let r = ReadEngine::new(db.begin_read().unwrap());
        for t in [Table::Objects, Table::Hints] {
            for k in keys {
                assert_eq!(lent(|f| r.read(t, k, f)), r.get(t, k).unwrap(), "{t:?} {k:?}");
            }
        }
        assert_eq!(lent(|f| r.read(Table::Hints, b"b", f)), Some(vec![7u8; 3000]));
    }

    /// The metrics hear of each batch's disk work once: one log append per logged batch,
    /// one redb commit per settle or checkpoint; taking them starts the count over.
    #[test]
    fn each_log_append_and_redb_commit_is_timed_once() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = open(dir.path(), DurabilityMode::Sync, 1).storage;
        s.checkpoint().unwrap();
        s.take_timings();
        for i in 0..3 {
            s.run(vec![coordinate(&format!("k{i}"))], false, 1, &mut |_, _| {});
        }
        let read = s.run(vec![StoreOp::Read { key: b"k0".to_vec() }], false, 1, &mut |_, _| {});
        assert!(matches!(read[..], [Ok(StoreOutcome::State(Some(_)))]));
        let timed = s.take_timings();
        // The read-only batch settled the three logged ones first.
        assert_eq!((timed.log_appends.len(), timed.redb_commits.len()), (3, 1));
        s.settle().unwrap();
        assert_eq!(s.take_timings(), Timings::default(), "nothing waited: no commit");
        s.checkpoint().unwrap();
        let timed = s.take_timings();
        assert_eq!((timed.log_appends.len(), timed.redb_commits.len()), (0, 1));
        assert!(timed.redb_commits.iter().all(|d| *d > Duration::ZERO));
    }

    /// Whether redb's last commit holds `key`'s row (what a fresh read transaction sees).
    fn committed_in_redb(s: &Storage, key: &str) -> bool {
        let db = lock(&s.shared).db.clone().unwrap();
        let engine = ReadEngine::new(db.begin_read().unwrap());
        let run = s.state().reader().run(&engine, vec![StoreOp::Read { key: key.as_bytes().to_vec() }], 1);
        matches!(run.outcomes[..], [Ok(StoreOutcome::State(Some(_)))])
    }

    #[test]
    fn logged_batches_wait_for_one_redb_commit_and_readers_see_them_meanwhile() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = open(dir.path(), DurabilityMode::Sync, 1).storage;
        // Nothing waits for redb: the count below starts from zero.
        s.checkpoint().unwrap();
        for i in 0..UNSETTLED_BATCHES_MAX - 1 {
            s.run(vec![coordinate(&format!("k{i}"))], false, 1, &mut |_, _| {});
        }
        assert!(!committed_in_redb(&s, "k0"), "logged, not yet committed in redb");
        assert!(read_object(&s, "k0").is_some(), "a reader sees it all the same");
        let context = read_object(&s, "k1").unwrap().context();
        s.run(vec![write("k1", context, None)], false, 1, &mut |_, _| {});
        assert!(committed_in_redb(&s, "k0"), "the batch that reached the bound committed them all");
        assert!(read_object(&s, "k1").unwrap().is_deleted());
        s.run(vec![coordinate("late")], false, 1, &mut |_, _| {});
        let page = StoreOp::Page {
            tree: ringkv::store::TreeId::default_of(ringkv::store::partition_of(b"late", 16)),
            leaves: None,
            after: None,
            bytes_max: 1 << 20,
        };
        let out = s.run(vec![page], false, 1, &mut |_, _| {});
        assert!(
            matches!(&out[0], Ok(StoreOutcome::Page { objects, .. }) if objects.iter().any(|(k, _)| k == b"late")),
            "a read batch on the writer commits what waits first: {out:?}"
        );
        assert!(committed_in_redb(&s, "late"));
        s.run(vec![coordinate("unsettled")], false, 1, &mut |_, _| {});
        drop(s);
        let s = open(dir.path(), DurabilityMode::Sync, 2).storage;
        assert!(read_object(&s, "unsettled").is_some(), "replayed from the log");
    }

    /// Buffered mode flushes the log only for durable batches, and for a durable batch that
    /// changes nothing too: what it answers for (a merge a handoff's sender then drops) may
    /// sit in records a non-durable batch wrote.
    #[test]
    fn buffered_mode_flushes_the_log_for_every_durable_batch_and_only_for_those() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = open(dir.path(), DurabilityMode::Buffered, 1).storage;
        let unsynced = |s: &Storage| s.log.as_ref().unwrap().is_unsynced();
        let object = coordinated(&mut s, "k");
        s.flush().unwrap();
        assert!(!unsynced(&s));
        let write = || StoreOp::Write { key: b"r".to_vec(), object: object.clone(), hint: None };
        let out = s.run(vec![write()], false, 1, &mut |_, _| {});
        assert_eq!(out, vec![Ok(StoreOutcome::Written { changed: true })]);
        assert!(unsynced(&s), "a replica's write waits for the flush timer");
        let out = s.run(vec![write()], true, 1, &mut |_, _| {});
        assert_eq!(out, vec![Ok(StoreOutcome::Written { changed: false })]);
        assert!(!unsynced(&s), "a durable batch that changed nothing flushed what it answers for");
        s.run(vec![coordinate("d")], true, 1, &mut |_, _| {});
        assert!(!unsynced(&s), "a durable batch is flushed before its answer");
    }

    /// Coordinate a write of `key` and return the object written.
    fn coordinated(s: &mut Storage, key: &str) -> ringkv::version::Object {
        match s.run(vec![coordinate(key)], false, 1, &mut |_, _| {}).pop() {
            Some(Ok(StoreOutcome::Coordinated(Ok(object)))) => object,
            other => panic!("write {key}: {other:?}"),
        }
    }

    fn remove(s: &mut Storage, key: &str, object: &ringkv::version::Object) {
        let out = s.run(
            vec![StoreOp::RemoveObjects { keys: vec![(key.as_bytes().to_vec(), object.digest())] }],
            false,
            1,
            &mut |_, _| {},
        );
        assert!(matches!(out[..], [Ok(StoreOutcome::Removed { count: 1 })]), "{out:?}");
    }

    /// Readers on other threads, racing the writer: a write is visible from its
    /// acknowledgement on, and a row removed stays removed, through logged batches, settles
    /// and checkpoints.
    #[test]
    fn readers_racing_the_writer_see_every_acknowledged_write_and_no_removed_row() {
        use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
        let dir = tempfile::tempdir().unwrap();
        let mut s = open(dir.path(), DurabilityMode::Buffered, 1).storage;
        let (written, removed, done) =
            (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)), Arc::new(AtomicBool::new(false)));
        let readers: Vec<_> = (0..2)
            .map(|_| {
                let (reader, written, removed, done) = (s.reader(), written.clone(), removed.clone(), done.clone());
                std::thread::spawn(move || {
                    let mut checks = 0u64;
                    let read = |key: String| match reader.run(vec![StoreOp::Read { key: key.into_bytes() }], 1).0.pop()
                    {
                        Some(Ok(StoreOutcome::State(state))) => state.is_some(),
                        other => panic!("read: {other:?}"),
                    };
                    while !done.load(Ordering::Acquire) && checks < 1_000_000 {
                        let (w, r) = (written.load(Ordering::Acquire), removed.load(Ordering::Acquire));
                        // Odd keys stay; even ones are removed one write later.
                        if let Some(k) = (0..w).rev().find(|k| k % 2 == 1) {
                            assert!(read(format!("w{k}")), "acknowledged write w{k} unseen");
                        }
                        if r > 0 {
                            assert!(!read(format!("w{}", r - 1)), "removed row w{} seen again", r - 1);
                        }
                        checks += 1;
                    }
                    checks
                })
            })
            .collect();
        let mut objects = Vec::new();
        for i in 0..600 {
            objects.push(coordinated(&mut s, &format!("w{i}")));
            written.store(i + 1, Ordering::Release);
            if i % 2 == 1 {
                // Remove the write before last: a row deleted in the overlay, over redb or not.
                let k = i - 1;
                remove(&mut s, &format!("w{k}"), &objects[k]);
                removed.store(k + 1, Ordering::Release);
            }
            match i % 97 {
                0 => s.settle().unwrap(),
                50 => s.checkpoint().unwrap(),
                _ => {}
            }
        }
        done.store(true, Ordering::Release);
        for r in readers {
            assert!(r.join().unwrap() > 0);
        }
    }

    #[test]
    fn batches_survive_reopen_and_rebuild_the_same_trees() {
        let dir = tempfile::tempdir().unwrap();
        let o = open(dir.path(), DurabilityMode::Sync, 1);
        assert!(o.report.fresh);
        let mut s = o.storage;
        let out = s.run((0..50).map(|i| coordinate(&format!("k{i}"))).collect(), false, 1, &mut |_, _| {});
        assert!(out.iter().all(|r| matches!(r, Ok(StoreOutcome::Coordinated(Ok(_))))));
        let p = (0..16).find(|&p| s.state().tree(p).unwrap().keys() >= 3).unwrap();
        let page = s.run(
            vec![StoreOp::Page { tree: ringkv::store::TreeId::default_of(p), leaves: None, after: None, bytes_max: 1 }],
            false,
            1,
            &mut |_, _| {},
        );
        assert!(matches!(&page[0], Ok(StoreOutcome::Page { objects, next: Some(_) }) if objects.len() == 1));
        s.run(vec![StoreOp::SaveMembers { members: Vec::new() }], true, 1, &mut |_, _| {});
        let roots: Vec<u128> = (0..16).map(|p| s.state().tree(p).unwrap().root()).collect();
        drop(s);
        let o = open(dir.path(), DurabilityMode::Sync, 2);
        assert!(!o.report.fresh);
        assert_eq!(o.report.objects, 50);
        assert_eq!((0..16).map(|p| o.storage.state().tree(p).unwrap().root()).collect::<Vec<_>>(), roots);
    }
}
