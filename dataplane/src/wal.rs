//! The write-ahead log that makes a group commit durable with one write and one
//! `fdatasync`, instead of a durable redb commit that writes every dirty B-tree page.
//!
//! Each batch the writer commits is written as one frame: `len u32 | crc32 u32 | payload`,
//! the payload a postcard [`WalBatch`]. redb itself commits without fsync and is made
//! durable by a checkpoint from time to time, after which the log starts over at offset 0.
//!
//! The file is zero-filled to its capacity once and then only overwritten in place, so an
//! `fdatasync` has data to flush but no metadata. On ext4 that matters: a size change
//! makes the sync commit the journal, and in ordered mode the journal first writes back
//! every other file's dirty data (here redb's), which stalled every replica's commits
//! together for up to 200 ms.
//!
//! On open, frames are read from the start while they are intact and their batch numbers
//! follow one another; the remains of an earlier cycle, or a torn last frame (a crash
//! mid-write), end the log there. That is safe: nobody was told such a batch was saved.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::storage::LogEntry;

/// Bytes the log file is zero-filled to; checkpoints restart it long before it fills.
pub const CAPACITY: u64 = 4 << 20;

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

/// An open write-ahead log file.
pub struct Wal {
    file: File,
    path: PathBuf,
    len: u64,
}

impl Wal {
    /// Opens (or creates) the log and reads the batches of its current cycle.
    pub fn open(path: &Path) -> std::io::Result<(Wal, Vec<WalBatch>)> {
        let mut file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(path)?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes)?;
        let (batches, valid) = parse(&bytes);
        if (bytes.len() as u64) < CAPACITY {
            // Zero-fill once: later writes overwrite allocated, written blocks only.
            let zeros = vec![0u8; (CAPACITY - bytes.len() as u64) as usize];
            file.write_all(&zeros)?;
            file.sync_all()?;
        }
        let wal = Wal {
            file,
            path: path.to_path_buf(),
            len: valid as u64,
        };
        Ok((wal, batches))
    }

    /// Writes a batch after the last one and waits until it is on disk.
    pub fn append(&mut self, batch: &WalBatch) -> std::io::Result<()> {
        let payload = postcard::to_stdvec(batch).map_err(std::io::Error::other)?;
        let mut frame = Vec::with_capacity(payload.len() + 8);
        frame.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        frame.extend_from_slice(&crc32(&payload).to_le_bytes());
        frame.extend_from_slice(&payload);
        self.file.write_all_at(&frame, self.len)?;
        self.file.sync_data()?;
        self.len += frame.len() as u64;
        Ok(())
    }

    /// Whether a batch of about `bytes` still fits before the zero-filled end (a batch
    /// that does not is made durable by a checkpoint instead).
    pub fn has_room(&self, bytes: u64) -> bool {
        self.len + bytes + 8 <= CAPACITY
    }

    /// Starts the log over (after a checkpoint made everything in it durable in redb).
    /// Nothing is erased: the next frame overwrites the first, and what follows it no
    /// longer continues the numbering.
    pub fn reset(&mut self) {
        self.len = 0;
    }

    /// Bytes of the current cycle.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether the current cycle is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Path of the file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// The intact, consecutively numbered batches at the front of `bytes`, and how many
/// bytes they span.
fn parse(bytes: &[u8]) -> (Vec<WalBatch>, usize) {
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
    (batches, at)
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

    #[test]
    fn batches_survive_a_reopen_and_a_torn_tail_is_cut() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("wal");
        let (mut wal, found) = Wal::open(&path).unwrap();
        assert!(found.is_empty());
        assert_eq!(std::fs::metadata(&path).unwrap().len(), CAPACITY);
        wal.append(&batch(1)).unwrap();
        wal.append(&batch(2)).unwrap();
        let whole = wal.len();
        drop(wal);
        // A crash in the middle of a third write leaves half a frame.
        let f = OpenOptions::new().write(true).open(&path).unwrap();
        f.write_all_at(&[200, 0, 0, 0, 1, 2, 3], whole).unwrap();
        drop(f);
        let (mut wal, found) = Wal::open(&path).unwrap();
        assert_eq!(found, vec![batch(1), batch(2)]);
        assert_eq!(wal.len(), whole);
        // The file keeps its size: writes only ever overwrite.
        assert_eq!(std::fs::metadata(&path).unwrap().len(), CAPACITY);
        wal.append(&batch(3)).unwrap();
        drop(wal);
        let (_, found) = Wal::open(&path).unwrap();
        assert_eq!(found.len(), 3);
    }

    #[test]
    fn after_a_reset_the_old_cycle_is_not_replayed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("wal");
        let (mut wal, _) = Wal::open(&path).unwrap();
        for n in 1..=5 {
            wal.append(&batch(n)).unwrap();
        }
        // A checkpoint: the log starts over, and batch 6 overwrites batch 1.
        wal.reset();
        assert!(wal.is_empty());
        wal.append(&batch(6)).unwrap();
        drop(wal);
        // Batches 2..5 still follow on disk, but 2 does not continue 6.
        let (wal, found) = Wal::open(&path).unwrap();
        assert_eq!(found, vec![batch(6)]);
        assert!(wal.has_room(1000));
        assert!(!wal.has_room(CAPACITY));
    }

    #[test]
    fn a_corrupted_frame_ends_the_log() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("wal");
        let (mut wal, _) = Wal::open(&path).unwrap();
        wal.append(&batch(1)).unwrap();
        wal.append(&batch(2)).unwrap();
        let end = wal.len();
        drop(wal);
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[end as usize - 1] ^= 0xFF;
        std::fs::write(&path, &bytes).unwrap();
        let (_, found) = Wal::open(&path).unwrap();
        assert_eq!(found, vec![batch(1)]);
    }
}
