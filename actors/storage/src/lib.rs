//! ringkv's storage engine binding: the core's store layout ([`ringkv::store`]) on redb, one
//! file per node. This crate only moves bytes: [`WriteEngine`] and [`ReadEngine`] give the
//! core the ordered tables of one redb transaction, and [`Storage`] runs batches of
//! operations in one transaction each (the group commit the node's storage stage feeds),
//! durably when asked or when the node is in `sync` mode, and applies the in-memory
//! changes only after the commit succeeded. No actix here: the node hosts it on a thread.

use std::cell::OnceCell;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use redb::{
    Database, Durability, ReadOnlyTable, ReadTransaction, ReadableDatabase, ReadableTable, TableDefinition,
    WriteTransaction,
};
use ringkv::config::Durability as DurabilityMode;
use ringkv::store::{
    Engine, EngineError, OpenReport, Saved, StoreError, StoreLimits, StoreOp, StoreOutcome, StoreReader, StoreState,
    Table,
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

fn def(table: Table) -> Def {
    DEFS[Table::ALL.iter().position(|t| *t == table).unwrap_or(0)]
}

fn err(e: impl std::fmt::Display) -> EngineError {
    EngineError(e.to_string())
}

/// The tables of one redb write transaction, each opened when first used.
pub struct WriteEngine<'t> {
    txn: &'t WriteTransaction,
    tables: [OnceCell<redb::Table<'t, &'static [u8], &'static [u8]>>; 6],
}

impl<'t> WriteEngine<'t> {
    pub fn new(txn: &'t WriteTransaction) -> Result<Self, EngineError> {
        Ok(WriteEngine { txn, tables: Default::default() })
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

fn scan_table<T: ReadableTable<&'static [u8], &'static [u8]>>(
    t: &T,
    from: &[u8],
    to: Option<&[u8]>,
    visit: &mut dyn FnMut(&[u8], &[u8]) -> bool,
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
    fn put(&mut self, table: Table, key: &[u8], value: &[u8]) -> Result<(), EngineError> {
        self.t_mut(table)?.insert(key, value).map_err(err)?;
        Ok(())
    }
    fn delete(&mut self, table: Table, key: &[u8]) -> Result<(), EngineError> {
        self.t_mut(table)?.remove(key).map_err(err)?;
        Ok(())
    }
    fn scan(
        &self,
        table: Table,
        from: &[u8],
        to: Option<&[u8]>,
        visit: &mut dyn FnMut(&[u8], &[u8]) -> bool,
    ) -> Result<(), EngineError> {
        scan_table(self.t(table)?, from, to, visit)
    }
}

/// The tables of one redb read transaction, each opened when first used: a snapshot,
/// writes refused.
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

impl Engine for ReadEngine {
    fn get(&self, table: Table, key: &[u8]) -> Result<Option<Vec<u8>>, EngineError> {
        Ok(self.t(table)?.get(key).map_err(err)?.map(|g| g.value().to_vec()))
    }
    fn put(&mut self, _: Table, _: &[u8], _: &[u8]) -> Result<(), EngineError> {
        Err(EngineError("read-only transaction".into()))
    }
    fn delete(&mut self, _: Table, _: &[u8]) -> Result<(), EngineError> {
        Err(EngineError("read-only transaction".into()))
    }
    fn scan(
        &self,
        table: Table,
        from: &[u8],
        to: Option<&[u8]>,
        visit: &mut dyn FnMut(&[u8], &[u8]) -> bool,
    ) -> Result<(), EngineError> {
        scan_table(self.t(table)?, from, to, visit)
    }
    fn writable(&self) -> bool {
        false
    }
}

/// One node's redb file and its store state.
pub struct Storage {
    db: Arc<Database>,
    state: StoreState,
    mode: DurabilityMode,
    snapshot: Snapshot,
}

/// The read snapshot (a read transaction and the tables opened in it) that readers share
/// until the next commit: the writer drops it once a commit succeeded and before anyone
/// hears of that commit, so a read that starts after a write's acknowledgement always
/// sees the write, and no snapshot outlives a commit to pin pages the commit freed.
type Snapshot = Arc<Mutex<Option<ReadEngine>>>;

fn lock(snapshot: &Snapshot) -> MutexGuard<'_, Option<ReadEngine>> {
    // A reader that panicked left nothing half-done: the snapshot is read-only.
    snapshot.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Runs row reads ([`StoreOp::reads_rows_only`]) in read snapshots of the database, on the
/// caller's thread: a replica read never waits behind the writer's group commit.
#[derive(Clone)]
pub struct Reader {
    db: Arc<Database>,
    reader: StoreReader,
    snapshot: Snapshot,
}

impl Reader {
    /// The outcomes, and the operations the writer must run after (quarantines of rows
    /// found unreadable).
    pub fn run(&self, ops: Vec<StoreOp>, now_wall_ms: u64) -> (Vec<Result<StoreOutcome, StoreError>>, Vec<StoreOp>) {
        let mut snapshot = lock(&self.snapshot);
        let engine = match snapshot.take() {
            Some(engine) => engine,
            None => match self.db.begin_read() {
                Ok(txn) => ReadEngine::new(txn),
                Err(e) => return (ops.iter().map(|_| Err(StoreError::Io(e.to_string()))).collect(), Vec::new()),
            },
        };
        let run = self.reader.run(snapshot.insert(engine), ops, now_wall_ms);
        (run.outcomes, run.pending.quarantine)
    }
}

/// What opening found.
pub struct Opened {
    pub storage: Storage,
    pub saved: Saved,
    pub report: OpenReport,
}

impl Storage {
    /// Open (or create) the node's database; `fresh_epoch` becomes the node's epoch if the
    /// database is new. Rebuilds the Merkle trees and quarantines unreadable rows.
    pub fn open(
        path: &Path,
        q: u32,
        limits: StoreLimits,
        mode: DurabilityMode,
        fresh_epoch: u64,
    ) -> Result<Opened, String> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        }
        let db = Database::create(path).map_err(|e| format!("cannot open {}: {e}", path.display()))?;
        let mut txn = db.begin_write().map_err(|e| e.to_string())?;
        txn.set_durability(Durability::Immediate).map_err(|e| e.to_string())?;
        let (state, report) = {
            let mut engine = WriteEngine::new(&txn)
                .map_err(|e| format!("{}: {e} (a data directory of an older ringkv cannot be read)", path.display()))?;
            let (mut state, report) =
                StoreState::open(&mut engine, q, limits, fresh_epoch).map_err(|e| e.to_string())?;
            if state.start(&mut engine).map_err(|e| e.to_string())? {
                tracing::warn!("the last run did not stop cleanly: writes are numbered under new actors from now on");
            }
            (state, report)
        };
        txn.commit().map_err(|e| e.to_string())?;
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
        let storage = Storage { db: Arc::new(db), state, mode, snapshot: Snapshot::default() };
        Ok(Opened { storage, saved, report })
    }

    /// A reader of this database for the operations that read rows only, to run on any
    /// thread beside this writer.
    pub fn reader(&self) -> Reader {
        Reader { db: self.db.clone(), reader: self.state.reader(), snapshot: self.snapshot.clone() }
    }

    pub fn state(&self) -> &StoreState {
        &self.state
    }

    /// Run a batch in one transaction: a read transaction when every operation only reads,
    /// else a write transaction committed durably when `durable` or in `sync` mode. The
    /// in-memory state changes only after the commit. Unreadable rows that a read batch met
    /// are quarantined right after, in a write transaction of their own. `ahead` hears each
    /// coordinated write (by its index in `ops`) once computed, before the commit
    /// ([`ringkv::stage::Input::Ahead`]); a commit that then fails retires the store's
    /// actors ([`StoreState::abandon`]).
    pub fn run(
        &mut self,
        ops: Vec<StoreOp>,
        durable: bool,
        now_wall_ms: u64,
        ahead: &mut dyn FnMut(usize, &StoreOutcome),
    ) -> Vec<Result<StoreOutcome, StoreError>> {
        let n = ops.len();
        let failed = |e: String| (0..n).map(|_| Err(StoreError::Io(e.clone()))).collect();
        if ops.iter().all(StoreOp::is_read_only) {
            let run = match self.db.begin_read() {
                Ok(txn) => self.state.run(&mut ReadEngine::new(txn), ops, now_wall_ms),
                Err(e) => return failed(e.to_string()),
            };
            if !run.pending.quarantine.is_empty() {
                let _ = self.run(run.pending.quarantine, false, now_wall_ms, &mut |_, _| {});
            }
            return run.outcomes;
        }
        let mut txn = match self.db.begin_write() {
            Ok(t) => t,
            Err(e) => return failed(e.to_string()),
        };
        let d = if durable || self.mode == DurabilityMode::Sync { Durability::Immediate } else { Durability::None };
        if let Err(e) = txn.set_durability(d) {
            return failed(e.to_string());
        }
        let run = {
            let mut engine = match WriteEngine::new(&txn) {
                Ok(e) => e,
                Err(e) => return failed(e.0),
            };
            self.state.run(&mut engine, ops, now_wall_ms)
        };
        if run.failed.is_some() {
            let _ = txn.abort();
            return run.outcomes;
        }
        for (k, outcome) in run.outcomes.iter().enumerate() {
            if let Ok(o @ StoreOutcome::Coordinated(Ok(_))) = outcome {
                ahead(k, o);
            }
        }
        if let Err(e) = txn.commit() {
            tracing::error!(error = %e, "storage commit failed");
            self.state.abandon();
            return failed(e.to_string());
        }
        *lock(&self.snapshot) = None;
        self.state.commit(&run.pending);
        if run.pending.quarantined > 0 {
            tracing::warn!(rows = run.pending.quarantined, "unreadable rows quarantined; anti-entropy refills them");
        }
        run.outcomes
    }

    /// Make every buffered commit durable.
    pub fn flush(&mut self) -> Result<(), String> {
        let mut txn = self.db.begin_write().map_err(|e| e.to_string())?;
        txn.set_durability(Durability::Immediate).map_err(|e| e.to_string())?;
        txn.commit().map_err(|e| e.to_string())
    }

    /// A clean stop: everything durable, and the store marked closed.
    pub fn close(&mut self, now_wall_ms: u64) -> Result<(), String> {
        match self.run(vec![StoreOp::Close], true, now_wall_ms, &mut |_, _| {}).pop() {
            Some(Ok(_)) => Ok(()),
            Some(Err(e)) => Err(e.to_string()),
            None => Err("no outcome".into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ringkv::version::VersionVector;

    fn coordinate(key: &str) -> StoreOp {
        StoreOp::Coordinate {
            key: key.as_bytes().to_vec(),
            context: VersionVector::new(),
            value: Some(vec![1; 10]),
            hint: None,
            now_wall_ms: 1,
        }
    }

    #[test]
    fn a_reader_sees_every_committed_batch_and_runs_row_reads_only() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Storage::open(&dir.path().join("db.redb"), 16, StoreLimits::default(), DurabilityMode::Sync, 1)
            .unwrap()
            .storage;
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

    #[test]
    fn batches_survive_reopen_and_rebuild_the_same_trees() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db.redb");
        let o = Storage::open(&path, 16, StoreLimits::default(), DurabilityMode::Sync, 1).unwrap();
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
        let o = Storage::open(&path, 16, StoreLimits::default(), DurabilityMode::Sync, 2).unwrap();
        assert!(!o.report.fresh);
        assert_eq!(o.report.objects, 50);
        assert_eq!((0..16).map(|p| o.storage.state().tree(p).unwrap().root()).collect::<Vec<_>>(), roots);
    }
}
