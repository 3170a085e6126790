//! The commit log: the write-ahead log of a node's store. Dynamo's nodes stored through BDB,
//! which acknowledges a transaction once its log record is flushed; this is the same idea
//! beside redb. A batch's row changes (the puts and deletes the core made through
//! [`crate::WriteEngine`]) are appended to this file as one record: in `sync` mode written
//! through to the disk by one direct, synchronous write; in `buffered` mode written to the
//! page cache, and flushed at once only for a durable batch, else periodically (Cassandra's
//! periodic commit log sync). Redb commits the batch later, with the batches logged after
//! it, without syncing: one sequential write per batch instead of a dozen scattered pages
//! and their flushes.
//!
//! Records belong to one database and one generation. The database's log id is random,
//! chosen when redb is created and kept in it, and secret: a log left by another database
//! (a data directory whose redb file was replaced) replays nothing, and no client can shape
//! a value into a record that replays. A durable redb commit (a checkpoint) holds every batch
//! before it, so it names the next generation in the same transaction and the log starts
//! over from its first byte. At open, the records of the generation redb names are applied,
//! in order, over redb's last durable commit; replaying a record twice is harmless, since a
//! record holds whole rows. A record that does not check (a torn tail: its batch was never
//! acknowledged) ends the replay, as does one of another generation (left from before the
//! last checkpoint).
//!
//! Record: magic `RKL1` (the format's version: a change of the layout below, or of the
//! tables' numbering in [`ringkv::store::Table::ALL`], needs a new one), generation u64,
//! sequence u64, payload length u32, CRC32 of the log id, generation, sequence, length and
//! payload, then the payload: changes, each a table index u8, 0 (put) or 1 (delete), key
//! length u32 and key, then for a put the value length u32 and value. Integers are
//! little-endian.

use std::fs::{File, OpenOptions};
use std::io::{self, Read};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;

const MAGIC: [u8; 4] = *b"RKL1";
const HEADER_BYTES: usize = 4 + 8 + 8 + 4 + 4;

/// Bytes of log written before a batch that would not fit commits durably in redb instead,
/// which starts the log over. Bounds the replay at open and the non-durable redb commits
/// (whose freed pages redb reclaims only at a durable commit).
pub const LOG_BYTES_MAX: u64 = 8 << 20;

/// One row change of a batch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Change {
    pub table: u8,
    pub key: Vec<u8>,
    /// None for a delete.
    pub value: Option<Vec<u8>>,
}

/// One record being written: room for its header, then the payload. A writer keeps one
/// and clears it for each batch, so a batch's changes are written down without allocating.
pub struct Record {
    bytes: Vec<u8>,
}

impl Default for Record {
    fn default() -> Self {
        Record { bytes: vec![0; HEADER_BYTES] }
    }
}

impl Record {
    pub fn clear(&mut self) {
        self.bytes.truncate(HEADER_BYTES);
    }

    pub fn payload(&self) -> &[u8] {
        self.bytes.get(HEADER_BYTES..).unwrap_or_default()
    }

    /// Append a put to the payload.
    pub fn push_put(&mut self, table: u8, key: &[u8], value: &[u8]) {
        self.bytes.extend_from_slice(&[table, 0]);
        push_bytes(&mut self.bytes, key);
        push_bytes(&mut self.bytes, value);
    }

    /// Append a delete to the payload.
    pub fn push_delete(&mut self, table: u8, key: &[u8]) {
        self.bytes.extend_from_slice(&[table, 1]);
        push_bytes(&mut self.bytes, key);
    }
}

fn push_bytes(payload: &mut Vec<u8>, bytes: &[u8]) {
    // Rows are far below 4 GiB (the core bounds values); a longer one would not decode and
    // would end the replay, so it is refused by `append` instead.
    payload.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
    payload.extend_from_slice(bytes);
}

/// The changes of a payload, or None when it does not decode (it passed its CRC, so only a
/// bug writes such a payload).
pub fn decode_changes(mut payload: &[u8]) -> Option<Vec<Change>> {
    let mut changes = Vec::new();
    while !payload.is_empty() {
        let (&table, rest) = payload.split_first()?;
        let (&op, rest) = rest.split_first()?;
        let (key, rest) = take_bytes(rest)?;
        let (value, rest) = match op {
            0 => {
                let (value, rest) = take_bytes(rest)?;
                (Some(value.to_vec()), rest)
            }
            1 => (None, rest),
            _ => return None,
        };
        changes.push(Change { table, key: key.to_vec(), value });
        payload = rest;
    }
    Some(changes)
}

fn take_bytes(bytes: &[u8]) -> Option<(&[u8], &[u8])> {
    let len = u32::from_le_bytes(bytes.get(..4)?.try_into().ok()?) as usize;
    let end = 4usize.checked_add(len)?;
    Some((bytes.get(4..end)?, bytes.get(end..)?))
}

/// Which log a record belongs to: the database's random log id and the generation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LogName {
    pub id: u64,
    pub generation: u64,
}

fn checksum(name: LogName, sequence: u64, payload: &[u8]) -> u32 {
    let LogName { id, generation } = name;
    let mut h = crc32fast::Hasher::new();
    h.update(&id.to_le_bytes());
    h.update(&generation.to_le_bytes());
    h.update(&sequence.to_le_bytes());
    h.update(&(payload.len() as u32).to_le_bytes());
    h.update(payload);
    h.finalize()
}

fn header(name: LogName, sequence: u64, payload: &[u8]) -> [u8; HEADER_BYTES] {
    let mut out = [0u8; HEADER_BYTES];
    out[..4].copy_from_slice(&MAGIC);
    out[4..12].copy_from_slice(&name.generation.to_le_bytes());
    out[12..20].copy_from_slice(&sequence.to_le_bytes());
    out[20..24].copy_from_slice(&(payload.len() as u32).to_le_bytes());
    out[24..].copy_from_slice(&checksum(name, sequence, payload).to_le_bytes());
    out
}

/// One record, ready to write (the tests' way to lay out logs by hand).
#[cfg(test)]
fn encode_record(name: LogName, sequence: u64, payload: &[u8]) -> Vec<u8> {
    let mut out = header(name, sequence, payload).to_vec();
    out.extend_from_slice(payload);
    out
}

/// The payloads of the log `name`'s records from the start of `log`, in order, up to the
/// first record that is not the next one of that log or does not check.
pub fn scan(log: &[u8], name: LogName) -> Vec<&[u8]> {
    let mut payloads = Vec::new();
    let mut at = 0usize;
    while let Some(header) = at.checked_add(HEADER_BYTES).and_then(|end| log.get(at..end)) {
        let word = |from: usize| u64::from_le_bytes(header[from..from + 8].try_into().unwrap_or_default());
        let half = |from: usize| u32::from_le_bytes(header[from..from + 4].try_into().unwrap_or_default());
        let (record_generation, sequence, len, crc) = (word(4), word(12), half(20) as usize, half(24));
        if header[..4] != MAGIC || record_generation != name.generation || sequence != payloads.len() as u64 {
            break;
        }
        let Some(payload) = (at + HEADER_BYTES).checked_add(len).and_then(|end| log.get(at + HEADER_BYTES..end)) else {
            break;
        };
        if checksum(name, sequence, payload) != crc {
            break;
        }
        payloads.push(payload);
        at += HEADER_BYTES + len;
    }
    payloads
}

/// The unit of direct writes: the log is written in whole blocks at block offsets.
const BLOCK_BYTES: usize = 4096;

// Direct writes never grow the file: the log's size is a whole number of blocks.
const _: () = assert!(LOG_BYTES_MAX % BLOCK_BYTES as u64 == 0);

/// A synced log's direct writes: one direct, synchronous write per record (O_DIRECT and
/// O_DSYNC: no page cache, no separate flush call; about a third less CPU than a write and
/// an fdatasync).
struct Direct {
    file: File,
    /// The bytes of the log's last, partly written block (before the offset): a direct
    /// write rewrites the whole block, and these bytes again as they were, so a torn write
    /// cannot damage an acknowledged record.
    tail: Vec<u8>,
    /// Room for one write, aligned to a block in memory as direct I/O needs.
    buffer: Vec<u8>,
}

impl Direct {
    /// Write `bytes` at `offset`, which follows the tail.
    fn write(&mut self, offset: u64, bytes: &[u8]) -> io::Result<()> {
        // The last block again, then the record, then zeros to the block's end.
        let block = offset - self.tail.len() as u64;
        let len = self.tail.len() + bytes.len();
        let padded = len.div_ceil(BLOCK_BYTES) * BLOCK_BYTES;
        self.buffer.clear();
        self.buffer.resize(padded + BLOCK_BYTES, 0);
        let start = self.buffer.as_ptr().align_offset(BLOCK_BYTES).min(BLOCK_BYTES);
        let out = &mut self.buffer[start..start + padded];
        out[..self.tail.len()].copy_from_slice(&self.tail);
        out[self.tail.len()..len].copy_from_slice(bytes);
        self.file.write_all_at(out, block)?;
        let last = len & !(BLOCK_BYTES - 1);
        self.tail.clear();
        self.tail.extend_from_slice(&out[last..len]);
        Ok(())
    }
}

/// The open log file of one node, positioned after the last record of its generation.
/// Records go to the page cache, then to the disk by an fdatasync when the log is synced,
/// when a record must be durable, or when asked ([`CommitLog::sync`]); or, for a synced
/// log where the file system takes them, by direct writes.
pub struct CommitLog {
    file: File,
    direct: Option<Direct>,
    /// Every record is flushed before `append` returns.
    synced: bool,
    /// Records were written since the last flush.
    unsynced: bool,
    /// Tests: the next flush fails (after the write reached the file).
    #[cfg(test)]
    fail_next_flush: bool,
    name: LogName,
    sequence: u64,
    offset: u64,
}

impl CommitLog {
    /// Open the log at `path` (created, and filled with zeros up to [`LOG_BYTES_MAX`] so that
    /// appends never change its size, when it is shorter), and the payloads of the log
    /// `name`'s records, to replay. The log continues after them until the next
    /// [`CommitLog::restart`]. A `synced` log writes every record through to the disk (by
    /// direct writes where the file system allows them); another one syncs when asked.
    pub fn open(path: &Path, name: LogName, synced: bool) -> io::Result<(CommitLog, Vec<Vec<u8>>)> {
        let mut file = OpenOptions::new().read(true).write(true).create(true).truncate(false).open(path)?;
        // Records are appended only below LOG_BYTES_MAX.
        let mut bytes = Vec::new();
        (&mut file).take(LOG_BYTES_MAX).read_to_end(&mut bytes)?;
        let payloads: Vec<Vec<u8>> = scan(&bytes, name).into_iter().map(<[u8]>::to_vec).collect();
        if (bytes.len() as u64) < LOG_BYTES_MAX {
            let zeros = vec![0u8; (LOG_BYTES_MAX as usize).saturating_sub(bytes.len())];
            file.write_all_at(&zeros, bytes.len() as u64)?;
            file.sync_all()?;
            // The file's name must outlive a power cut as well as its bytes.
            if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                File::open(dir)?.sync_all()?;
            }
        }
        let offset: u64 = payloads.iter().map(|p| (HEADER_BYTES + p.len()) as u64).sum();
        let sequence = payloads.len() as u64;
        let direct = match synced {
            true => match OpenOptions::new().write(true).custom_flags(libc::O_DIRECT | libc::O_DSYNC).open(path) {
                Ok(file) => {
                    let block = (offset as usize) & !(BLOCK_BYTES - 1);
                    let tail = bytes.get(block..offset as usize).unwrap_or_default().to_vec();
                    Some(Direct { file, tail, buffer: Vec::new() })
                }
                Err(e) => {
                    tracing::info!(error = %e, "no direct I/O for the commit log: each record is written, then flushed");
                    None
                }
            },
            false => None,
        };
        let log = CommitLog {
            file,
            direct,
            synced,
            unsynced: false,
            #[cfg(test)]
            fail_next_flush: false,
            name,
            sequence,
            offset,
        };
        Ok((log, payloads))
    }

    /// Make every appended record durable (nothing to do when none waits).
    pub fn sync(&mut self) -> io::Result<()> {
        if self.unsynced {
            self.file.sync_data()?;
            self.unsynced = false;
        }
        Ok(())
    }

    /// Whether records were written since the last flush.
    pub fn is_unsynced(&self) -> bool {
        self.unsynced
    }

    /// Whether records go to the disk by direct writes.
    pub fn is_direct(&self) -> bool {
        self.direct.is_some()
    }

    fn write_buffered(&mut self, bytes: &[u8], durable: bool) -> io::Result<()> {
        self.file.write_all_at(bytes, self.offset)?;
        #[cfg(test)]
        if std::mem::take(&mut self.fail_next_flush) {
            return Err(io::Error::other("injected flush failure"));
        }
        self.unsynced = true;
        if self.synced || durable {
            self.sync()?;
        }
        Ok(())
    }

    /// Whether a payload of `len` bytes still fits before [`LOG_BYTES_MAX`].
    pub fn fits(&self, len: usize) -> bool {
        self.offset.saturating_add((HEADER_BYTES + len) as u64) <= LOG_BYTES_MAX
    }

    /// Append one record, and flush it when the log is synced or `durable`: once this
    /// returns Ok, a crash of the process replays its payload, and a crash of the machine
    /// does too if it was flushed (or a later [`CommitLog::sync`] returned).
    pub fn append(&mut self, record: &mut Record, durable: bool) -> io::Result<()> {
        let payload_len = record.payload().len();
        if !self.fits(payload_len) {
            return Err(io::Error::other("the record does not fit in the commit log"));
        }
        let header = header(self.name, self.sequence, record.payload());
        record.bytes[..HEADER_BYTES].copy_from_slice(&header);
        let mut written = match &mut self.direct {
            Some(direct) => direct.write(self.offset, &record.bytes),
            None => self.write_buffered(&record.bytes, durable),
        };
        if written.as_ref().is_err_and(|e| e.raw_os_error() == Some(libc::EINVAL)) && self.direct.is_some() {
            // The file system opened the file for direct I/O but refuses the writes (an
            // alignment it needs beyond a block): write, then flush, from now on.
            tracing::warn!("the commit log's direct writes are refused: each record is written, then flushed");
            self.direct = None;
            written = self.write_buffered(&record.bytes, durable);
        }
        if let Err(e) = written {
            // The record may be on the disk all the same, and its batch now depends on the
            // caller's fallback (a durable redb commit): if that fails too, the batch fails,
            // so the record must not replay. Best effort: a record whose magic cannot be
            // erased may replay.
            let _ = self.file.write_all_at(&[0u8; 4], self.offset).and_then(|()| self.file.sync_data());
            return Err(e);
        }
        self.offset += record.bytes.len() as u64;
        self.sequence += 1;
        Ok(())
    }

    /// Start `generation` from the log's first byte: redb's durable commit naming it holds
    /// everything the log held.
    pub fn restart(&mut self, generation: u64) {
        self.name.generation = generation;
        self.sequence = 0;
        self.offset = 0;
        if let Some(direct) = &mut self.direct {
            direct.tail.clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn record(i: u8) -> Record {
        let mut r = Record::default();
        r.push_put(0, &[i; 3], &vec![i; i as usize]);
        r.push_delete(2, &[i, i]);
        r
    }

    fn payload(i: u8) -> Vec<u8> {
        record(i).payload().to_vec()
    }

    fn name(generation: u64) -> LogName {
        LogName { id: 0x5eed, generation }
    }

    #[test]
    fn changes_round_trip() {
        let changes = decode_changes(&payload(5)).unwrap();
        assert_eq!(
            changes,
            vec![
                Change { table: 0, key: vec![5; 3], value: Some(vec![5; 5]) },
                Change { table: 2, key: vec![5, 5], value: None }
            ]
        );
        assert_eq!(decode_changes(&[0, 7, 0, 0, 0, 0]), None, "an unknown operation");
        assert_eq!(decode_changes(&[0, 0, 9, 0, 0, 0, 1]), None, "a key longer than the payload");
    }

    #[test]
    fn appends_replay_until_a_restart_and_a_restarted_log_hides_the_old_records() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("commit.log");
        let (mut log, replay) = CommitLog::open(&path, name(7), true).unwrap();
        assert!(replay.is_empty());
        assert_eq!(std::fs::metadata(&path).unwrap().len(), LOG_BYTES_MAX);
        for i in 0..3 {
            log.append(&mut record(i), true).unwrap();
        }
        drop(log);
        let replay = |n: LogName| CommitLog::open(&path, n, true).unwrap().1;
        assert_eq!(replay(name(7)), (0..3).map(payload).collect::<Vec<_>>());
        assert!(replay(name(8)).is_empty(), "another generation replays nothing");
        assert!(replay(LogName { id: 1, generation: 7 }).is_empty(), "another database's log replays nothing");
        let mut log = CommitLog::open(&path, name(7), true).unwrap().0;
        log.append(&mut record(3), true).unwrap();
        log.restart(8);
        log.append(&mut record(9), true).unwrap();
        drop(log);
        assert_eq!(replay(name(8)), vec![payload(9)]);
        assert!(replay(name(7)).is_empty(), "overwritten from the start");
        assert_eq!(std::fs::metadata(&path).unwrap().len(), LOG_BYTES_MAX, "appends never grow the file");
    }

    #[test]
    fn direct_writes_leave_the_same_log_as_buffered_ones() {
        let dir = tempfile::tempdir().unwrap();
        let paths = [dir.path().join("direct.log"), dir.path().join("buffered.log")];
        let mut logs = [true, false].map(|synced| CommitLog::open(&paths[usize::from(!synced)], name(3), synced));
        let [Ok((direct, _)), Ok((buffered, _))] = &mut logs else { panic!("opened") };
        if !direct.is_direct() {
            eprintln!("skipped: this file system takes no direct writes");
            return;
        }
        assert!(!buffered.is_direct());
        // Records smaller and larger than a block, crossing block ends; a reopen mid-block.
        let sizes = [10usize, 5000, 3, 4060, 4096, 9000, 1, 70];
        let record = |n: usize| {
            let mut r = Record::default();
            r.push_put(1, &n.to_le_bytes(), &vec![n as u8; n]);
            r
        };
        for (k, &n) in sizes.iter().enumerate() {
            if k == 4 {
                *direct = CommitLog::open(&paths[0], name(3), true).unwrap().0;
            }
            direct.append(&mut record(n), true).unwrap();
            buffered.append(&mut record(n), k % 2 == 0).unwrap();
        }
        buffered.sync().unwrap();
        let expected: Vec<Vec<u8>> = sizes.iter().map(|&n| record(n).payload().to_vec()).collect();
        for path in &paths {
            assert_eq!(CommitLog::open(path, name(3), true).unwrap().1, expected, "{}", path.display());
        }
        assert_eq!(std::fs::read(&paths[0]).unwrap(), std::fs::read(&paths[1]).unwrap());
        direct.restart(4);
        direct.append(&mut record(7), true).unwrap();
        assert_eq!(CommitLog::open(&paths[0], name(4), true).unwrap().1, vec![record(7).payload().to_vec()]);
    }

    #[test]
    fn a_record_whose_append_failed_does_not_replay_and_the_next_takes_its_place() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("commit.log");
        let (mut log, _) = CommitLog::open(&path, name(1), false).unwrap();
        log.append(&mut record(1), true).unwrap();
        log.fail_next_flush = true;
        assert!(log.append(&mut record(2), true).is_err());
        assert_eq!(CommitLog::open(&path, name(1), false).unwrap().1, vec![payload(1)], "written, then erased");
        log.append(&mut record(3), false).unwrap();
        log.sync().unwrap();
        assert_eq!(CommitLog::open(&path, name(1), false).unwrap().1, vec![payload(1), payload(3)]);
    }

    #[test]
    fn a_record_forged_without_the_log_id_does_not_replay() {
        let mut log = encode_record(name(4), 0, &payload(1));
        let forged = |id| encode_record(LogName { id, generation: 4 }, 1, &payload(2));
        let mut guessed = log.clone();
        guessed.extend(forged(0x5eed));
        assert_eq!(scan(&guessed, name(4)).len(), 2, "with the id, the record would replay");
        log.extend(forged(0));
        assert_eq!(scan(&log, name(4)), vec![&payload(1)[..]]);
    }

    #[test]
    fn a_record_past_the_capacity_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = CommitLog::open(&dir.path().join("commit.log"), name(0), true).unwrap().0;
        let mut big = Record::default();
        big.push_put(0, b"k", &vec![1u8; LOG_BYTES_MAX as usize]);
        assert!(!log.fits(big.payload().len()));
        assert!(log.append(&mut big, true).is_err());
        let fits = LOG_BYTES_MAX as usize - HEADER_BYTES;
        assert!(log.fits(fits) && !log.fits(fits + 1), "a record may end exactly at the capacity");
    }

    proptest! {
        /// A log cut anywhere, or with any byte changed, replays a prefix of what was
        /// appended: every record before the damage and nothing after it.
        #[test]
        fn damage_replays_a_prefix(
            lens in proptest::collection::vec(0usize..40, 0..8),
            cut in any::<prop::sample::Index>(),
            flip in any::<prop::sample::Index>(),
            bit in 0u8..8,
        ) {
            let payloads: Vec<Vec<u8>> = lens.iter().enumerate().map(|(i, &n)| vec![i as u8; n]).collect();
            let mut log = Vec::new();
            let mut ends = Vec::new();
            for (i, p) in payloads.iter().enumerate() {
                log.extend(encode_record(name(3), i as u64, p));
                ends.push(log.len());
            }
            log.extend(encode_record(name(2), payloads.len() as u64, b"stale"));
            let whole: Vec<Vec<u8>> = scan(&log, name(3)).into_iter().map(<[u8]>::to_vec).collect();
            prop_assert_eq!(&whole, &payloads);
            let at = cut.index(log.len() + 1);
            let kept = ends.iter().filter(|&&e| e <= at).count();
            prop_assert_eq!(scan(&log[..at], name(3)).len(), kept);
            let mut flipped = log.clone();
            if !flipped.is_empty() {
                let at = flip.index(flipped.len());
                flipped[at] ^= 1 << bit;
                let got: Vec<Vec<u8>> = scan(&flipped, name(3)).into_iter().map(<[u8]>::to_vec).collect();
                let intact = ends.iter().filter(|&&e| e <= at).count();
                prop_assert_eq!(&got, &payloads[..intact].to_vec());
            }
        }

        /// Records written over an older generation's replay alone, whatever the older bytes
        /// hold after them: even a record of the new generation with the right sequence,
        /// planted in a value (as a client could), does not check without the log id.
        #[test]
        fn old_bytes_after_the_records_replay_nothing(
            old in proptest::collection::vec(0usize..60, 1..10),
            new in proptest::collection::vec(0usize..40, 0..4),
        ) {
            let mut log = Vec::new();
            for (i, &n) in old.iter().enumerate() {
                let forged = encode_record(LogName { id: 0, generation: 3 }, (new.len() + i) as u64, &payload(9));
                let mut value = forged.clone();
                value.resize(n.max(forged.len()), 0);
                let mut r = Record::default();
                r.push_put(0, b"k", &value);
                log.extend(encode_record(name(2), i as u64, r.payload()));
            }
            let mut start = Vec::new();
            for (i, &n) in new.iter().enumerate() {
                start.extend(encode_record(name(3), i as u64, &vec![7u8; n]));
            }
            let end = start.len().min(log.len());
            log[..end].copy_from_slice(&start[..end]);
            if start.len() > log.len() {
                log.extend_from_slice(&start[end..]);
            }
            let got = scan(&log, name(3));
            prop_assert_eq!(got.len(), new.len());
            prop_assert!(got.iter().all(|p| p.iter().all(|&b| b == 7)));
        }
    }
}
