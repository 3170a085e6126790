//! The rows of acknowledged batches that redb has not committed yet. A batch is acknowledged
//! once its [`crate::commit_log`] record is written; redb commits the batches of several
//! records in one transaction (fewer commits, each one cheaper per row), and until it does,
//! readers on other threads see those rows here, over redb's last commit. This is the
//! memtable of a log-structured store, bounded by the batches and bytes the writer lets wait.

use std::collections::BTreeMap;
use std::ops::Bound;

use ringkv::store::{EngineError, EngineReads, Read, Table, Visit};

use crate::commit_log::Change;

/// Row changes since redb's last commit, by table: a value, or None for a row deleted since.
#[derive(Debug, Default)]
pub struct Overlay {
    tables: [BTreeMap<Vec<u8>, Option<Vec<u8>>>; Table::ALL.len()],
    bytes: usize,
}

/// What one change costs in memory beyond its key and value, about: the map's slot and the
/// two buffers' headers and allocation rounding.
pub const ENTRY_BYTES: usize = 64;

pub(crate) fn table_byte(table: Table) -> u8 {
    Table::ALL.iter().position(|t| *t == table).unwrap_or(0) as u8
}

impl Overlay {
    /// Take in one batch's changes, in order (a later change of a row replaces an earlier one).
    pub fn extend(&mut self, changes: Vec<Change>) {
        for Change { table, key, value } in changes {
            let bytes = ENTRY_BYTES + key.len() + value.as_ref().map_or(0, Vec::len);
            self.bytes = self.bytes.saturating_add(bytes);
            // The writer numbers tables by Table::ALL, so every change has its table.
            if let Some(rows) = self.tables.get_mut(usize::from(table)) {
                rows.insert(key, value);
            }
        }
    }

    /// Redb committed every change held here.
    pub fn clear(&mut self) {
        self.tables.iter_mut().for_each(BTreeMap::clear);
        self.bytes = 0;
    }

    /// Bytes taken in since the last clear: keys, values and [`ENTRY_BYTES`] a change (rows
    /// changed twice count twice).
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    pub fn is_empty(&self) -> bool {
        self.tables.iter().all(BTreeMap::is_empty)
    }

    /// The row's change: Some(None) when it was deleted, None when it did not change.
    fn get(&self, table: Table, key: &[u8]) -> Option<Option<&[u8]>> {
        self.rows(table).get(key).map(Option::as_deref)
    }

    /// The changes of rows with `from <= key < to`, in key order.
    fn range<'a>(
        &'a self,
        table: Table,
        from: &[u8],
        to: Option<&'a [u8]>,
    ) -> impl Iterator<Item = (&'a [u8], Option<&'a [u8]>)> + 'a {
        // An empty range when `to <= from` (a range whose end comes first would panic).
        let end = to.map_or(Bound::Unbounded, |to| Bound::Excluded(to.max(from)));
        self.rows(table).range::<[u8], _>((Bound::Included(from), end)).map(|(k, v)| (k.as_slice(), v.as_deref()))
    }

    fn rows(&self, table: Table) -> &BTreeMap<Vec<u8>, Option<Vec<u8>>> {
        &self.tables[usize::from(table_byte(table)) % Table::ALL.len()]
    }
}

/// A snapshot: `base` (a snapshot of redb's last commit) with `overlay` over it.
pub struct Overlaid<'a, E> {
    pub base: &'a E,
    pub overlay: &'a Overlay,
}

impl<E: EngineReads> EngineReads for Overlaid<'_, E> {
    fn get(&self, table: Table, key: &[u8]) -> Result<Option<Vec<u8>>, EngineError> {
        match self.overlay.get(table, key) {
            Some(changed) => Ok(changed.map(<[u8]>::to_vec)),
            None => self.base.get(table, key),
        }
    }
    fn read(&self, table: Table, key: &[u8], read: Read<'_>) -> Result<(), EngineError> {
        match self.overlay.get(table, key) {
            Some(changed) => {
                read(changed);
                Ok(())
            }
            None => self.base.read(table, key, read),
        }
    }
    fn scan(&self, table: Table, from: &[u8], to: Option<&[u8]>, visit: Visit<'_>) -> Result<(), EngineError> {
        if to.is_some_and(|to| to <= from) {
            return Ok(());
        }
        let mut changes = self.overlay.range(table, from, to).peekable();
        let mut stopped = false;
        // Each base row: first the changed rows before it, then the row itself unless it changed.
        self.base.scan(table, from, to, &mut |key, value| {
            while let Some((k, v)) = changes.next_if(|(k, _)| *k <= key) {
                let same = k == key;
                if let Some(v) = v {
                    if !visit(k, v) {
                        stopped = true;
                        return false;
                    }
                }
                if same {
                    return true;
                }
            }
            if !visit(key, value) {
                stopped = true;
                return false;
            }
            true
        })?;
        if !stopped {
            for (k, v) in changes {
                if let Some(v) = v {
                    if !visit(k, v) {
                        break;
                    }
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Rows of any table, by (table, key).
    type Rows = BTreeMap<(u8, Vec<u8>), Vec<u8>>;

    /// A base for the overlaid reads: rows in memory.
    struct Base(Rows);

    impl EngineReads for Base {
        fn get(&self, table: Table, key: &[u8]) -> Result<Option<Vec<u8>>, EngineError> {
            Ok(self.0.get(&(table_byte(table), key.to_vec())).cloned())
        }
        fn scan(&self, table: Table, from: &[u8], to: Option<&[u8]>, visit: Visit<'_>) -> Result<(), EngineError> {
            let t = table_byte(table);
            for ((rt, k), v) in self.0.range((t, from.to_vec())..) {
                if *rt != t || to.is_some_and(|to| k.as_slice() >= to) || !visit(k, v) {
                    break;
                }
            }
            Ok(())
        }
    }

    fn scanned(
        e: &dyn EngineReads,
        table: Table,
        from: &[u8],
        to: Option<&[u8]>,
        limit: usize,
    ) -> Vec<(Vec<u8>, Vec<u8>)> {
        let mut out = Vec::new();
        e.scan(table, from, to, &mut |k, v| {
            out.push((k.to_vec(), v.to_vec()));
            out.len() < limit
        })
        .unwrap();
        out
    }

    /// The bytes `read` lends for a row, copied out.
    fn lent(e: &dyn EngineReads, table: Table, key: &[u8]) -> Option<Vec<u8>> {
        let mut out = None;
        e.read(table, key, &mut |bytes| out = bytes.map(<[u8]>::to_vec)).unwrap();
        out
    }

    fn change(table: Table, key: &[u8], value: Option<u8>) -> Change {
        Change { table: table_byte(table), key: key.to_vec(), value: value.map(|v| vec![v]) }
    }

    #[test]
    fn changed_rows_hide_the_base_and_deleted_rows_read_as_absent() {
        let objects = table_byte(Table::Objects);
        let base = Base(
            [((objects, vec![1]), vec![10]), ((objects, vec![2]), vec![20]), ((objects, vec![3]), vec![30])].into(),
        );
        let mut overlay = Overlay::default();
        overlay.extend(vec![
            change(Table::Objects, &[2], Some(21)),
            change(Table::Objects, &[3], None),
            change(Table::Hints, &[1], Some(99)),
            change(Table::Objects, &[4], Some(40)),
        ]);
        let e = Overlaid { base: &base, overlay: &overlay };
        let get = |k: u8| e.get(Table::Objects, &[k]).unwrap().map(|v| v[0]);
        assert_eq!((get(1), get(2), get(3), get(4), get(5)), (Some(10), Some(21), None, Some(40), None));
        let read = |k: u8| lent(&e, Table::Objects, &[k]).map(|v| v[0]);
        assert_eq!((read(1), read(2), read(3), read(4), read(5)), (Some(10), Some(21), None, Some(40), None));
        assert_eq!(e.get(Table::Hints, &[1]).unwrap(), Some(vec![99]), "each table apart");
        let rows: Vec<(u8, u8)> =
            scanned(&e, Table::Objects, &[0], None, 100).iter().map(|(k, v)| (k[0], v[0])).collect();
        assert_eq!(rows, vec![(1, 10), (2, 21), (4, 40)]);
        assert_eq!(overlay.bytes(), 4 * ENTRY_BYTES + 4 + 3);
        overlay.clear();
        assert!(overlay.is_empty() && overlay.bytes() == 0);
    }

    fn key() -> impl Strategy<Value = Vec<u8>> {
        proptest::collection::vec(0u8..3, 0..3)
    }

    fn table() -> impl Strategy<Value = Table> {
        prop_oneof![Just(Table::Objects), Just(Table::Hints)]
    }

    proptest! {
        /// Reading through the overlay is reading the base with the changes applied, in
        /// order, over several batches and tables; keys of up to 3 bytes from a small
        /// alphabet, so some are prefixes of others.
        #[test]
        fn reads_through_the_overlay_match_the_changes_applied(
            base in proptest::collection::btree_map((prop_oneof![Just(0u8), Just(1u8)], key()), any::<u8>().prop_map(|v| vec![v]), 0..16),
            batches in proptest::collection::vec(
                proptest::collection::vec((table(), key(), proptest::option::of(any::<u8>())), 0..8), 0..4),
            scan_table in table(),
            from in key(),
            to in proptest::option::of(key()),
            limit in 1usize..40,
        ) {
            let mut applied: Rows = base.clone();
            let mut overlay = Overlay::default();
            for batch in &batches {
                for (t, k, v) in batch {
                    let row = (table_byte(*t), k.clone());
                    match v {
                        Some(v) => applied.insert(row, vec![*v]),
                        None => applied.remove(&row),
                    };
                }
                overlay.extend(batch.iter().map(|(t, k, v)| change(*t, k, *v)).collect());
            }
            let (base, applied) = (Base(base), Base(applied));
            let e = Overlaid { base: &base, overlay: &overlay };
            prop_assert_eq!(
                scanned(&e, scan_table, &from, to.as_deref(), limit),
                scanned(&applied, scan_table, &from, to.as_deref(), limit)
            );
            for t in [Table::Objects, Table::Hints] {
                for k in [vec![], vec![0], vec![1, 2], vec![2, 2], vec![0, 1, 2]] {
                    prop_assert_eq!(e.get(t, &k).unwrap(), applied.get(t, &k).unwrap());
                    prop_assert_eq!(lent(&e, t, &k), applied.get(t, &k).unwrap());
                }
            }
        }
    }
}
