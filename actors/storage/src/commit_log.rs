//! The commit log: the write-ahead log of `sync` mode. Dynamo's nodes stored through BDB,
//! which acknowledges a transaction once its log record is flushed; this is the same idea
//! beside redb. A batch's row changes (the puts and deletes the core made through
//! [`crate::WriteEngine`]) are appended to this file as one record and flushed with one
//! fdatasync, while redb commits the batch without syncing: one sequential page per batch
//! instead of a dozen scattered ones.
//!
//! Records belong to a generation. A durable redb commit (a checkpoint) holds every batch
//! before it, so it names the next generation in the same transaction and the log starts
//! over from its first byte. At open, the records of the generation redb names are applied,
//! in order, over redb's last durable commit; replaying a record twice is harmless, since a
//! record holds whole rows. A record that does not check (a torn tail: its batch was never
//! acknowledged) ends the replay, as does one of another generation (left from before the
//! last checkpoint).
//!
//! Record: magic `RKVL`, generation u64, sequence u64, payload length u32, CRC32 of the
//! generation, sequence, length and payload, then the payload: changes, each a table
//! index u8, 0 (put) or 1 (delete), key length u32 and key, then for a put the value
//! length u32 and value. Integers are little-endian.

use std::fs::{File, OpenOptions};
use std::io::{self, Read};
use std::os::unix::fs::FileExt;
use std::path::Path;

const MAGIC: [u8; 4] = *b"RKVL";
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

/// Append a put to a payload.
pub fn push_put(payload: &mut Vec<u8>, table: u8, key: &[u8], value: &[u8]) {
    payload.extend_from_slice(&[table, 0]);
    push_bytes(payload, key);
    push_bytes(payload, value);
}

/// Append a delete to a payload.
pub fn push_delete(payload: &mut Vec<u8>, table: u8, key: &[u8]) {
    payload.extend_from_slice(&[table, 1]);
    push_bytes(payload, key);
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

fn checksum(generation: u64, sequence: u64, payload: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(&generation.to_le_bytes());
    h.update(&sequence.to_le_bytes());
    h.update(&(payload.len() as u32).to_le_bytes());
    h.update(payload);
    h.finalize()
}

/// One record, ready to write.
pub fn encode_record(generation: u64, sequence: u64, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_BYTES + payload.len());
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&generation.to_le_bytes());
    out.extend_from_slice(&sequence.to_le_bytes());
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(&checksum(generation, sequence, payload).to_le_bytes());
    out.extend_from_slice(payload);
    out
}

/// The payloads of `generation`'s records from the start of `log`, in order, up to the
/// first record that is not the next one of that generation or does not check.
pub fn scan(log: &[u8], generation: u64) -> Vec<&[u8]> {
    let mut payloads = Vec::new();
    let mut at = 0usize;
    while let Some(header) = at.checked_add(HEADER_BYTES).and_then(|end| log.get(at..end)) {
        let word = |from: usize| u64::from_le_bytes(header[from..from + 8].try_into().unwrap_or_default());
        let half = |from: usize| u32::from_le_bytes(header[from..from + 4].try_into().unwrap_or_default());
        let (record_generation, sequence, len, crc) = (word(4), word(12), half(20) as usize, half(24));
        if header[..4] != MAGIC || record_generation != generation || sequence != payloads.len() as u64 {
            break;
        }
        let Some(payload) = (at + HEADER_BYTES).checked_add(len).and_then(|end| log.get(at + HEADER_BYTES..end)) else {
            break;
        };
        if checksum(generation, sequence, payload) != crc {
            break;
        }
        payloads.push(payload);
        at += HEADER_BYTES + len;
    }
    payloads
}

/// The open log file of one node, positioned after the last record of its generation.
pub struct CommitLog {
    file: File,
    generation: u64,
    sequence: u64,
    offset: u64,
}

impl CommitLog {
    /// Open the log at `path` (created, and filled with zeros up to [`LOG_BYTES_MAX`] so that
    /// appends never change its size, when `create` and it is shorter), and the payloads of
    /// `generation`'s records, to replay. The log continues after them until the next
    /// [`CommitLog::restart`].
    pub fn open(path: &Path, generation: u64, create: bool) -> io::Result<(Option<CommitLog>, Vec<Vec<u8>>)> {
        let mut file = match OpenOptions::new().read(true).write(true).create(create).truncate(false).open(path) {
            Ok(file) => file,
            Err(e) if e.kind() == io::ErrorKind::NotFound && !create => return Ok((None, Vec::new())),
            Err(e) => return Err(e),
        };
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes)?;
        let payloads: Vec<Vec<u8>> = scan(&bytes, generation).into_iter().map(<[u8]>::to_vec).collect();
        if create && (bytes.len() as u64) < LOG_BYTES_MAX {
            let zeros = vec![0u8; (LOG_BYTES_MAX as usize).saturating_sub(bytes.len())];
            file.write_all_at(&zeros, bytes.len() as u64)?;
            file.sync_all()?;
        }
        let offset = payloads.iter().map(|p| (HEADER_BYTES + p.len()) as u64).sum();
        let sequence = payloads.len() as u64;
        Ok((Some(CommitLog { file, generation, sequence, offset }), payloads))
    }

    /// Whether a payload of `len` bytes still fits before [`LOG_BYTES_MAX`].
    pub fn fits(&self, len: usize) -> bool {
        self.offset.saturating_add((HEADER_BYTES + len) as u64) <= LOG_BYTES_MAX
    }

    /// Append one record and flush it: once this returns Ok, a crash replays the payload.
    pub fn append(&mut self, payload: &[u8]) -> io::Result<()> {
        if !self.fits(payload.len()) {
            return Err(io::Error::other("the record does not fit in the commit log"));
        }
        let record = encode_record(self.generation, self.sequence, payload);
        self.file.write_all_at(&record, self.offset)?;
        self.file.sync_data()?;
        self.offset += record.len() as u64;
        self.sequence += 1;
        Ok(())
    }

    /// Start `generation` from the log's first byte: redb's durable commit naming it holds
    /// everything the log held.
    pub fn restart(&mut self, generation: u64) {
        self.generation = generation;
        self.sequence = 0;
        self.offset = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn payload(i: u8) -> Vec<u8> {
        let mut p = Vec::new();
        push_put(&mut p, 0, &[i; 3], &vec![i; i as usize]);
        push_delete(&mut p, 2, &[i, i]);
        p
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
        let (log, replay) = CommitLog::open(&path, 7, true).unwrap();
        assert!(replay.is_empty());
        let mut log = log.unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().len(), LOG_BYTES_MAX);
        for i in 0..3 {
            log.append(&payload(i)).unwrap();
        }
        drop(log);
        assert_eq!(CommitLog::open(&path, 7, true).unwrap().1, (0..3).map(payload).collect::<Vec<_>>());
        assert!(CommitLog::open(&path, 8, true).unwrap().1.is_empty(), "another generation replays nothing");
        let mut log = CommitLog::open(&path, 7, true).unwrap().0.unwrap();
        log.append(&payload(3)).unwrap();
        log.restart(8);
        log.append(&payload(9)).unwrap();
        drop(log);
        assert_eq!(CommitLog::open(&path, 8, true).unwrap().1, vec![payload(9)]);
        assert!(CommitLog::open(&path, 7, true).unwrap().1.is_empty(), "overwritten from the start");
        assert_eq!(std::fs::metadata(&path).unwrap().len(), LOG_BYTES_MAX, "appends never grow the file");
        let (none, replay) = CommitLog::open(&dir.path().join("absent.log"), 1, false).unwrap();
        assert!(none.is_none() && replay.is_empty());
    }

    #[test]
    fn a_record_past_the_capacity_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = CommitLog::open(&dir.path().join("commit.log"), 0, true).unwrap().0.unwrap();
        let big = vec![1u8; LOG_BYTES_MAX as usize];
        assert!(!log.fits(big.len()));
        assert!(log.append(&big).is_err());
        assert!(log.fits(1000));
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
                log.extend(encode_record(3, i as u64, p));
                ends.push(log.len());
            }
            log.extend(encode_record(2, payloads.len() as u64, b"stale"));
            let whole: Vec<Vec<u8>> = scan(&log, 3).into_iter().map(<[u8]>::to_vec).collect();
            prop_assert_eq!(&whole, &payloads);
            let at = cut.index(log.len() + 1);
            let kept = ends.iter().filter(|&&e| e <= at).count();
            prop_assert_eq!(scan(&log[..at], 3).len(), kept);
            let mut flipped = log.clone();
            if !flipped.is_empty() {
                let at = flip.index(flipped.len());
                flipped[at] ^= 1 << bit;
                let got: Vec<Vec<u8>> = scan(&flipped, 3).into_iter().map(<[u8]>::to_vec).collect();
                let intact = ends.iter().filter(|&&e| e <= at).count();
                prop_assert_eq!(&got, &payloads[..intact].to_vec());
            }
        }
    }
}
