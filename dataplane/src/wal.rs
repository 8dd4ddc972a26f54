//! The write-ahead log that makes a group commit durable with one write and one
//! `fdatasync`, instead of a durable redb commit that writes every dirty B-tree page.
//!
//! Each batch the writer commits is written as one frame: `len u32 | crc32 u32 | payload`,
//! the payload a postcard [`WalBatch`]. The log is two files, `wal.0` and `wal.1`, used in
//! turn: the batches of the changes storage holds in memory go to one while the changes
//! logged in the other are being written to redb. Once redb holds those durably, the
//! other file is free and the next switch starts it over at offset 0.
//!
//! Each file is zero-filled to its capacity once and then only overwritten in place, so
//! an `fdatasync` has data to flush but no metadata. On ext4 that matters: a size change
//! makes the sync commit the journal, and in ordered mode the journal first writes back
//! every other file's dirty data (here redb's), which stalled every replica's commits
//! together for up to 200 ms.
//!
//! On open, frames are read from the start of each file while they are intact and their
//! batch numbers follow one another; the remains of an earlier cycle, or a torn last frame
//! (a crash mid-write), end a file there. That is safe: redb durably holds every batch of
//! an earlier cycle before its file starts over, and nobody was told a torn batch was
//! saved.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::storage::LogEntry;

/// Bytes each log file is zero-filled to. A file holds the batches of one layer, about
/// 125 ms of writes; a file that fills first freezes its layer early. 1 MiB kept 64 KiB
/// values as fast as 2 MiB did, and the zero-filled files count against the disk.
pub const CAPACITY: u64 = 1 << 20;

/// One change the writer made, enough to redo it on top of the last checkpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum WalRecord {
    /// The highest epoch seen rose.
    Epoch(u64),
    /// An entry was appended to the log and applied.
    Apply(LogEntry),
    /// The log was cut after this seq (its suffix undone).
    TruncateAfter(u64),
    /// Log entries up to this seq were dropped.
    Trim(u64),
}

/// The records of one transaction, numbered so a replay skips what a checkpoint holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WalBatch {
    /// Rises by one per batch; the checkpoint records the last one it includes.
    pub number: u64,
    /// The changes, in order.
    pub records: Vec<WalRecord>,
}

/// One of the two files of the log.
struct Segment {
    file: File,
    path: PathBuf,
    len: u64,
}

impl Segment {
    /// Opens (or creates) the file, zero-filled to [`CAPACITY`], and reads its batches.
    fn open(path: PathBuf) -> std::io::Result<(Segment, Vec<WalBatch>)> {
        let mut file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(&path)?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes)?;
        let batches = parse(&bytes);
        if (bytes.len() as u64) < CAPACITY {
            // Zero-fill once: later writes overwrite allocated, written blocks only.
            let zeros = vec![0u8; (CAPACITY - bytes.len() as u64) as usize];
            file.write_all(&zeros)?;
            file.sync_all()?;
        }
        Ok((Segment { file, path, len: 0 }, batches))
    }
}

/// The open write-ahead log: two files, one of them current.
pub struct Wal {
    segments: [Segment; 2],
    current: usize,
}

impl Wal {
    /// Opens (or creates) the log in `dir` and reads the batches both files hold, in
    /// order of their numbers. The log then starts over: the caller makes what it needs
    /// of them durable elsewhere before appending.
    pub fn open(dir: &Path) -> std::io::Result<(Wal, Vec<WalBatch>)> {
        let (first, mut batches) = Segment::open(dir.join("wal.0"))?;
        let (second, more) = Segment::open(dir.join("wal.1"))?;
        // A file's fsync does not make its name durable; the directory's does. Without
        // it a crash soon after the first start could lose a log file of acknowledged
        // batches (and the database file created just before).
        File::open(dir)?.sync_all()?;
        batches.extend(more);
        batches.sort_by_key(|b| b.number);
        let wal = Wal {
            segments: [first, second],
            current: 0,
        };
        Ok((wal, batches))
    }

    /// Writes a batch after the last one of the current file and waits until it is on
    /// disk. A batch larger than the whole file is written anyway: the file grows.
    pub fn append(&mut self, batch: &WalBatch) -> std::io::Result<()> {
        // The payload is encoded after room for the header, which is filled in after.
        let mut frame = postcard::to_extend(batch, vec![0u8; 8]).map_err(std::io::Error::other)?;
        // Never wraps: a wrapped length would make this batch, and every one after it in
        // the file, unreadable at replay, after they were acknowledged.
        let len = u32::try_from(frame.len() - 8).map_err(|_| {
            std::io::Error::other(format!(
                "a batch of {} bytes is too large for one frame",
                frame.len()
            ))
        })?;
        let crc = crc32(&frame[8..]);
        frame[..4].copy_from_slice(&len.to_le_bytes());
        frame[4..8].copy_from_slice(&crc.to_le_bytes());
        let seg = &mut self.segments[self.current];
        seg.file.write_all_at(&frame, seg.len)?;
        seg.file.sync_data()?;
        seg.len += frame.len() as u64;
        Ok(())
    }

    /// Whether a batch of about `bytes` still fits before the zero-filled end of the
    /// current file.
    pub fn has_room(&self, bytes: u64) -> bool {
        self.len() + bytes + 8 <= CAPACITY
    }

    /// Makes the other file current, starting it over. Its batches must be durable in
    /// redb by now. Nothing is erased: the next frame overwrites its first, and what
    /// follows that no longer continues the numbering.
    pub fn switch(&mut self) {
        self.current = 1 - self.current;
        self.segments[self.current].len = 0;
    }

    /// Bytes of the current file's cycle.
    pub fn len(&self) -> u64 {
        self.segments[self.current].len
    }

    /// Whether the current file's cycle is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Path of the current file.
    pub fn path(&self) -> &Path {
        &self.segments[self.current].path
    }
}

/// The intact, consecutively numbered batches at the front of `bytes`.
fn parse(bytes: &[u8]) -> Vec<WalBatch> {
    let mut batches: Vec<WalBatch> = Vec::new();
    let mut at = 0;
    while bytes.len() - at >= 8 {
        let len = u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap()) as usize;
        let crc = u32::from_le_bytes(bytes[at + 4..at + 8].try_into().unwrap());
        if len == 0 {
            break;
        }
        let Some(payload) = bytes.get(at + 8..at + 8 + len) else {
            break;
        };
        if crc32(payload) != crc {
            break;
        }
        let Ok(batch) = postcard::from_bytes::<WalBatch>(payload) else {
            break;
        };
        if batches.last().is_some_and(|b| batch.number != b.number + 1) {
            break;
        }
        batches.push(batch);
        at += 8 + len;
    }
    batches
}

/// CRC-32 (IEEE), table-driven.
fn crc32(data: &[u8]) -> u32 {
    static TABLE: std::sync::OnceLock<[u32; 256]> = std::sync::OnceLock::new();
    let table = TABLE.get_or_init(|| {
        let mut t = [0u32; 256];
        for (i, slot) in t.iter_mut().enumerate() {
            let mut c = i as u32;
            for _ in 0..8 {
                c = if c & 1 != 0 {
                    0xEDB8_8320 ^ (c >> 1)
                } else {
                    c >> 1
                };
            }
            *slot = c;
        }
        t
    });
    !data.iter().fold(!0u32, |c, &b| {
        table[((c ^ u32::from(b)) & 0xFF) as usize] ^ (c >> 8)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::Op;
    use bytes::Bytes;

    fn batch(number: u64) -> WalBatch {
        WalBatch {
            number,
            records: vec![
                WalRecord::Epoch(2),
                WalRecord::Apply(LogEntry {
                    epoch: 2,
                    seq: number,
                    slot: 7,
                    key: Bytes::from("k"),
                    op: Op::Put(Bytes::from("v")),
                }),
                WalRecord::TruncateAfter(1),
                WalRecord::Trim(1),
            ],
        }
    }

    #[test]
    fn crc_matches_the_standard_check_value() {
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
    }

    fn numbers(batches: &[WalBatch]) -> Vec<u64> {
        batches.iter().map(|b| b.number).collect()
    }

    #[test]
    fn batches_survive_a_reopen_and_a_torn_tail_is_cut() {
        let dir = tempfile::tempdir().unwrap();
        let (mut wal, found) = Wal::open(dir.path()).unwrap();
        assert!(found.is_empty());
        for name in ["wal.0", "wal.1"] {
            assert_eq!(
                std::fs::metadata(dir.path().join(name)).unwrap().len(),
                CAPACITY
            );
        }
        wal.append(&batch(1)).unwrap();
        wal.append(&batch(2)).unwrap();
        let whole = wal.len();
        drop(wal);
        // A crash in the middle of a third write leaves half a frame.
        let f = OpenOptions::new()
            .write(true)
            .open(dir.path().join("wal.0"))
            .unwrap();
        f.write_all_at(&[200, 0, 0, 0, 1, 2, 3], whole).unwrap();
        drop(f);
        let (wal, found) = Wal::open(dir.path()).unwrap();
        assert_eq!(found, vec![batch(1), batch(2)]);
        // The log starts over; the files keep their size: writes only ever overwrite.
        assert!(wal.is_empty());
        assert_eq!(
            std::fs::metadata(dir.path().join("wal.0")).unwrap().len(),
            CAPACITY
        );
    }

    #[test]
    fn a_switch_keeps_the_other_file_and_starts_the_next_one_over() {
        let dir = tempfile::tempdir().unwrap();
        let (mut wal, _) = Wal::open(dir.path()).unwrap();
        for n in 1..=5 {
            wal.append(&batch(n)).unwrap();
        }
        wal.switch();
        assert!(wal.is_empty());
        wal.append(&batch(6)).unwrap();
        wal.append(&batch(7)).unwrap();
        // Batches 1..5 are durable elsewhere by now: batch 8 overwrites batch 1.
        wal.switch();
        assert!(wal.path().ends_with("wal.0"));
        wal.append(&batch(8)).unwrap();
        drop(wal);
        // Batches 2..5 still follow 8 in wal.0, but 2 does not continue 8.
        let (wal, found) = Wal::open(dir.path()).unwrap();
        assert_eq!(numbers(&found), vec![6, 7, 8]);
        assert!(wal.has_room(1000));
        assert!(!wal.has_room(CAPACITY));
    }

    #[test]
    fn a_batch_larger_than_a_file_grows_it() {
        let dir = tempfile::tempdir().unwrap();
        let (mut wal, _) = Wal::open(dir.path()).unwrap();
        let mut big = batch(1);
        big.records = vec![WalRecord::Apply(LogEntry {
            epoch: 1,
            seq: 1,
            slot: 0,
            key: Bytes::from("k"),
            op: Op::Put(Bytes::from(vec![7u8; CAPACITY as usize + 1])),
        })];
        assert!(!wal.has_room(CAPACITY + 1));
        wal.append(&big).unwrap();
        wal.append(&batch(2)).unwrap();
        drop(wal);
        let (_, found) = Wal::open(dir.path()).unwrap();
        assert_eq!(found, vec![big, batch(2)]);
    }

    #[test]
    fn a_corrupted_frame_ends_the_log() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("wal.0");
        let (mut wal, _) = Wal::open(dir.path()).unwrap();
        wal.append(&batch(1)).unwrap();
        wal.append(&batch(2)).unwrap();
        let end = wal.len();
        drop(wal);
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[end as usize - 1] ^= 0xFF;
        std::fs::write(&path, &bytes).unwrap();
        let (_, found) = Wal::open(dir.path()).unwrap();
        assert_eq!(found, vec![batch(1)]);
    }
}
