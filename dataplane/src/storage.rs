//! Durable storage of one replica, on redb.
//!
//! Three tables: `kv` keyed by `(slot, key)` so a slot can be scanned, `log` keyed by
//! sequence number for replication, and `meta` for the highest epoch seen and the log
//! positions. Every change goes through one writer thread that drains whatever requests
//! are waiting into a single write transaction and a single fsync (group commit).
//!
//! Every log record keeps the value it replaced (its before-image). That is what lets a
//! replica truncate a log suffix that was never committed: the writes are undone in
//! reverse order, so the data always equals the effect of the log as it now stands.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::mpsc as std_mpsc;
use std::time::Instant;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use redb::{Database, Durability, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};
use tokio::sync::{oneshot, watch};
use xxhash_rust::xxh3::Xxh3;

use crate::slots::Slot;
use crate::wal::{Wal, WalBatch, WalRecord};

const KV: TableDefinition<(u16, &[u8]), &[u8]> = TableDefinition::new("kv");
const LOG: TableDefinition<u64, &[u8]> = TableDefinition::new("log");
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");

const META_STATE: &str = "state";
/// Present while a snapshot is being installed: a replica that crashes then holds a
/// partial copy and must start over from nothing.
const META_SNAPSHOT_PARTIAL: &str = "snapshot_partial";

/// Most requests the writer folds into one transaction; bounds the latency of one commit.
const MAX_BATCH: usize = 4096;

/// How often redb is made durable (a checkpoint), after which the write-ahead log restarts;
/// bounds replay time after a crash.
const CHECKPOINT_EVERY: std::time::Duration = std::time::Duration::from_millis(250);
/// A group commit slower than this is logged: it held up every write of the replica.
const SLOW_COMMIT: std::time::Duration = std::time::Duration::from_millis(50);

/// A place in the replicated log, and the version of every value: the `(epoch, seq)` of
/// the log entry that wrote it. Ordered by epoch, then sequence.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
pub struct Position {
    /// Leadership epoch the entry was written in.
    pub epoch: u64,
    /// Sequence number in the shard's log, from 1, without gaps.
    pub seq: u64,
}

impl Position {
    /// Builds a position.
    pub const fn new(epoch: u64, seq: u64) -> Self {
        Position { epoch, seq }
    }

    /// The ETag form of a version: `"epoch-seq"` with the quotes.
    pub fn etag(&self) -> String {
        format!("\"{}-{}\"", self.epoch, self.seq)
    }

    /// Parses an ETag (with or without quotes, or a weak `W/` prefix).
    pub fn parse_etag(s: &str) -> Option<Position> {
        let s = s.trim();
        let s = s.strip_prefix("W/").unwrap_or(s);
        let s = s.trim_matches('"');
        let (e, q) = s.split_once('-')?;
        Some(Position::new(e.parse().ok()?, q.parse().ok()?))
    }
}

/// What a log entry does to its key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Op {
    /// Store this value.
    Put(Bytes),
    /// Remove the key.
    Delete,
}

/// One entry of the replicated log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogEntry {
    /// Epoch of the leader that wrote it.
    pub epoch: u64,
    /// Its place in the log.
    pub seq: u64,
    /// Slot of the key.
    pub slot: Slot,
    /// The key.
    pub key: Bytes,
    /// The change.
    pub op: Op,
}

impl LogEntry {
    /// The entry's position, which is also the version of the value it writes.
    pub fn position(&self) -> Position {
        Position::new(self.epoch, self.seq)
    }
}

/// A log entry as stored: with the value it replaced, so it can be undone.
#[derive(Serialize, Deserialize)]
struct StoredEntry {
    entry: LogEntry,
    before: Option<(Position, Bytes)>,
}

/// A precondition on a client write, checked inside the write transaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Condition {
    /// Unconditional.
    None,
    /// Only if the current version is this one (`If-Match`).
    IfMatch(Position),
    /// Only if the key does not exist (`If-None-Match: *`).
    IfAbsent,
    /// Only if the key exists (`If-Match: *`).
    IfExists,
}

/// Result of an accepted client write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WriteOutcome {
    /// Version of the value written (for a delete: of the tombstone entry).
    pub version: Position,
    /// Whether the key did not exist before.
    pub created: bool,
}

/// Why a storage request was refused or failed.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum StoreError {
    /// `If-Match` or `If-None-Match` did not hold; nothing was written.
    #[error("precondition failed: the key's current version does not match")]
    PreconditionFailed,
    /// Delete of a key that does not exist; nothing was written.
    #[error("key not found")]
    NotFound,
    /// The request carried an epoch that is no longer current.
    #[error("epoch {request} is not current (replica is at epoch {current})")]
    StaleEpoch {
        /// Epoch the request carried.
        request: u64,
        /// Highest epoch this replica has seen.
        current: u64,
    },
    /// A snapshot stream was malformed.
    #[error("invalid snapshot stream: {0}")]
    BadSnapshot(String),
    /// The disk or database failed; the whole batch was rolled back.
    #[error("storage failure: {0}")]
    Io(String),
    /// The writer thread is gone (the node is shutting down).
    #[error("storage is shut down")]
    Closed,
}

impl From<redb::Error> for StoreError {
    fn from(e: redb::Error) -> Self {
        StoreError::Io(e.to_string())
    }
}

macro_rules! redb_errors {
    ($($t:ty),*) => {$(
        impl From<$t> for StoreError {
            fn from(e: $t) -> Self { StoreError::from(redb::Error::from(e)) }
        }
    )*};
}
redb_errors!(
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError,
    redb::DatabaseError,
    redb::SetDurabilityError
);

/// What happened to a batch of replicated entries sent by the leader.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum AppendOutcome {
    /// The entries are durable; `last` is now the end of the log.
    Appended {
        /// End of the follower's log.
        last: Position,
    },
    /// The log does not contain `prev`; nothing was written.
    Mismatch {
        /// End of the follower's log.
        last: Position,
        /// When `prev` exists here under another epoch: that epoch and the first seq
        /// this replica holds of it, so the leader can skip back a whole epoch at once.
        conflict: Option<Position>,
    },
}

/// The durable state of the log, published after every commit.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogState {
    /// Highest epoch seen (persisted, for fencing).
    pub epoch: u64,
    /// Last entry in the log.
    pub last: Position,
    /// Last entry removed by trimming or covered by a snapshot; the log starts after it.
    pub base: Position,
    /// Number of keys stored.
    pub keys: u64,
    /// XOR of a 128-bit hash of every (slot, key, version, value): equal on two replicas
    /// exactly when their data is (up to hash collisions), and kept up to date in O(1).
    pub digest: u128,
    /// Number of the last write-ahead-log batch this state includes.
    pub wal_batch: u64,
}

impl LogState {
    fn encode(&self) -> Vec<u8> {
        postcard::to_stdvec(self).expect("log state encodes")
    }
}

/// One key of a snapshot stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotRecord {
    /// Slot of the key.
    pub slot: Slot,
    /// The key.
    pub key: Bytes,
    /// Its version.
    pub version: Position,
    /// Its value.
    pub value: Bytes,
}

/// The commands the writer thread executes, in arrival order, many per transaction.
enum Command {
    Write {
        epoch: u64,
        slot: Slot,
        key: Bytes,
        op: Op,
        cond: Condition,
        reply: oneshot::Sender<Result<WriteOutcome, StoreError>>,
    },
    Append {
        epoch: u64,
        prev: Position,
        entries: Vec<LogEntry>,
        leader_last: u64,
        reply: oneshot::Sender<Result<AppendOutcome, StoreError>>,
    },
    RaiseEpoch {
        epoch: u64,
        reply: oneshot::Sender<Result<u64, StoreError>>,
    },
    Trim {
        upto: u64,
    },
    SnapshotBegin {
        epoch: u64,
        reply: oneshot::Sender<Result<(), StoreError>>,
    },
    SnapshotChunk {
        records: Vec<SnapshotRecord>,
        reply: oneshot::Sender<Result<(), StoreError>>,
    },
    SnapshotEnd {
        at: Position,
        reply: oneshot::Sender<Result<LogState, StoreError>>,
    },
    Checkpoint {
        reply: oneshot::Sender<Result<(), StoreError>>,
    },
}

impl Command {
    /// An upper bound of the bytes this command adds to the write-ahead log (truncations
    /// and trims are recorded by seq only).
    fn wal_estimate(&self) -> u64 {
        let entry = |key: &Bytes, op: &Op| {
            64 + key.len() as u64
                + match op {
                    Op::Put(v) => v.len() as u64,
                    Op::Delete => 0,
                }
        };
        match self {
            Command::Write { key, op, .. } => entry(key, op),
            Command::Append { entries, .. } => {
                64 + entries.iter().map(|e| entry(&e.key, &e.op)).sum::<u64>()
            }
            _ => 64,
        }
    }

    /// Commands whose effects are not in the write-ahead log: their batch commits durably.
    fn needs_checkpoint(&self) -> bool {
        matches!(
            self,
            Command::SnapshotBegin { .. }
                | Command::SnapshotChunk { .. }
                | Command::SnapshotEnd { .. }
                | Command::Checkpoint { .. }
        )
    }
}

/// Observer hooks the writer calls after each commit (metrics).
pub trait CommitObserver: Send + Sync + 'static {
    /// A transaction with `requests` requests committed in `seconds`.
    fn committed(&self, requests: usize, seconds: f64);
}

impl CommitObserver for () {
    fn committed(&self, _: usize, _: f64) {}
}

/// Handle to a replica's storage. Cheap to clone.
#[derive(Clone)]
pub struct Store {
    db: Arc<Database>,
    commands: std_mpsc::Sender<Command>,
    state: watch::Receiver<LogState>,
    staged: watch::Receiver<LogState>,
    path: PathBuf,
}

impl Store {
    /// Opens (or creates) the store in `dir` and starts its writer thread.
    pub fn open(dir: &Path, observer: Arc<dyn CommitObserver>) -> Result<Store, StoreError> {
        std::fs::create_dir_all(dir).map_err(|e| StoreError::Io(e.to_string()))?;
        let path = dir.join("distkv.redb");
        let db = Arc::new(Database::create(&path)?);
        let (state, wiped) = recover(&db)?;
        let io = |e: std::io::Error| StoreError::Io(format!("write-ahead log: {e}"));
        let (mut wal, batches) = Wal::open(&dir.join("wal")).map_err(io)?;
        let state = if wiped {
            state
        } else {
            replay(&db, state, batches)?
        };
        wal.reset();
        let (state_tx, state_rx) = watch::channel(state);
        let (staged_tx, staged_rx) = watch::channel(state);
        let (tx, rx) = std_mpsc::channel();
        let writer = Writer {
            db: db.clone(),
            state,
            published: state_tx,
            staged: staged_tx,
            observer,
            wal,
            checkpointed: Instant::now(),
        };
        std::thread::Builder::new()
            .name("distkv-writer".into())
            .spawn(move || writer.run(rx))
            .map_err(|e| StoreError::Io(e.to_string()))?;
        Ok(Store {
            db,
            commands: tx,
            state: state_rx,
            staged: staged_rx,
            path,
        })
    }

    /// Path of the database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The log state as of the last commit.
    pub fn state(&self) -> LogState {
        *self.state.borrow()
    }

    /// A receiver that wakes on every commit.
    pub fn subscribe(&self) -> watch::Receiver<LogState> {
        self.state.clone()
    }

    /// The log as readers of the database see it: ahead of [`Store::state`] by the batch
    /// whose write-ahead-log sync is under way. A leader streams from here, so its
    /// followers store a batch while its own fsync runs; nothing counts as committed
    /// until [`Store::state`] holds it too.
    pub fn staged(&self) -> LogState {
        *self.staged.borrow()
    }

    /// A receiver that wakes whenever [`Store::staged`] moves.
    pub fn subscribe_staged(&self) -> watch::Receiver<LogState> {
        self.staged.clone()
    }

    async fn call<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<Result<T, StoreError>>) -> Command,
    ) -> Result<T, StoreError> {
        let (tx, rx) = oneshot::channel();
        self.commands
            .send(make(tx))
            .map_err(|_| StoreError::Closed)?;
        rx.await.map_err(|_| StoreError::Closed)?
    }

    /// A client write on the leader at `epoch`: appended to the log and applied, durably.
    pub async fn write(
        &self,
        epoch: u64,
        slot: Slot,
        key: Bytes,
        op: Op,
        cond: Condition,
    ) -> Result<WriteOutcome, StoreError> {
        self.call(|reply| Command::Write {
            epoch,
            slot,
            key,
            op,
            cond,
            reply,
        })
        .await
    }

    /// Entries from the leader at `epoch`, following `prev` in its log, which ends at
    /// `leader_last`.
    pub async fn append(
        &self,
        epoch: u64,
        prev: Position,
        entries: Vec<LogEntry>,
        leader_last: u64,
    ) -> Result<AppendOutcome, StoreError> {
        self.call(|reply| Command::Append {
            epoch,
            prev,
            entries,
            leader_last,
            reply,
        })
        .await
    }

    /// Raises the persisted epoch to at least `epoch`; refuses a lower one.
    pub async fn raise_epoch(&self, epoch: u64) -> Result<u64, StoreError> {
        self.call(|reply| Command::RaiseEpoch { epoch, reply })
            .await
    }

    /// Makes everything durable in redb and empties the write-ahead log (clean shutdown).
    pub async fn checkpoint(&self) -> Result<(), StoreError> {
        self.call(|reply| Command::Checkpoint { reply }).await
    }

    /// Drops log entries up to and including `upto` (never past the end of the log).
    pub fn trim(&self, upto: u64) {
        let _ = self.commands.send(Command::Trim { upto });
    }

    /// Starts replacing all data with a snapshot sent by the leader at `epoch`.
    pub async fn snapshot_begin(&self, epoch: u64) -> Result<(), StoreError> {
        self.call(|reply| Command::SnapshotBegin { epoch, reply })
            .await
    }

    /// Stores one chunk of a snapshot being installed.
    pub async fn snapshot_chunk(&self, records: Vec<SnapshotRecord>) -> Result<(), StoreError> {
        self.call(|reply| Command::SnapshotChunk { records, reply })
            .await
    }

    /// Finishes a snapshot taken at `at`: the log restarts after it.
    pub async fn snapshot_end(&self, at: Position) -> Result<LogState, StoreError> {
        self.call(|reply| Command::SnapshotEnd { at, reply }).await
    }

    /// Reads a key: its version and value.
    pub fn get(&self, slot: Slot, key: &[u8]) -> Result<Option<(Position, Bytes)>, StoreError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(KV)?;
        Ok(table.get((slot, key))?.map(|v| {
            let (pos, value) = decode_value(v.value());
            (pos, Bytes::copy_from_slice(value))
        }))
    }

    /// Reads log entries `from..=upto`, at most `max_entries` of them (and about
    /// `max_bytes`).
    pub fn read_log(
        &self,
        from: u64,
        upto: u64,
        max_entries: usize,
        max_bytes: usize,
    ) -> Result<Vec<LogEntry>, StoreError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(LOG)?;
        let mut out = Vec::new();
        let mut bytes = 0;
        for item in table.range(from..=upto)? {
            let (_, v) = item?;
            let raw = v.value();
            bytes += raw.len();
            let stored: StoredEntry = decode_stored(raw)?;
            out.push(stored.entry);
            if out.len() >= max_entries || bytes >= max_bytes {
                break;
            }
        }
        Ok(out)
    }

    /// Epoch of the entry at `seq`, if the log (or its base) still holds it, as readers
    /// of the database see it (see [`Store::staged`]).
    pub fn epoch_at(&self, seq: u64) -> Result<Option<u64>, StoreError> {
        let state = self.staged();
        if seq == state.base.seq {
            return Ok(Some(state.base.epoch));
        }
        let txn = self.db.begin_read()?;
        let table = txn.open_table(LOG)?;
        table.get(seq)?.map(|v| entry_epoch(v.value())).transpose()
    }

    /// Streams a consistent copy of every key into `sink`, framed by [`SnapshotCodec`],
    /// `chunk_bytes` at a time. Blocking: run it on a blocking thread. Returns the
    /// position the copy is consistent with.
    pub fn export_snapshot(
        &self,
        chunk_bytes: usize,
        mut sink: impl FnMut(Bytes) -> bool,
    ) -> Result<Position, StoreError> {
        let txn = self.db.begin_read()?;
        let meta = txn.open_table(META)?;
        let state = read_state(&meta)?;
        let table = txn.open_table(KV)?;
        let mut buf = BytesMut::with_capacity(chunk_bytes + 1024);
        SnapshotCodec::put_header(&mut buf, state.last);
        for item in table.iter()? {
            let (k, v) = item?;
            let (slot, key) = k.value();
            let (version, value) = decode_value(v.value());
            SnapshotCodec::put_record(&mut buf, slot, key, version, value);
            if buf.len() >= chunk_bytes && !sink(buf.split().freeze()) {
                return Err(StoreError::Io("snapshot receiver went away".into()));
            }
        }
        if !buf.is_empty() && !sink(buf.split().freeze()) {
            return Err(StoreError::Io("snapshot receiver went away".into()));
        }
        Ok(state.last)
    }

    /// Recomputes key count and digest by scanning every key (the maintained values in
    /// [`LogState`] must equal these; tests check that they do).
    pub fn scan_digest(&self) -> Result<(u64, u128), StoreError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(KV)?;
        let mut keys = 0;
        let mut digest = 0u128;
        for item in table.iter()? {
            let (k, v) = item?;
            let (slot, key) = k.value();
            let (version, value) = decode_value(v.value());
            keys += 1;
            digest ^= record_hash(slot, key, version, value);
        }
        Ok((keys, digest))
    }
}

/// Framing of the snapshot stream: a header with the position the copy is consistent
/// with, then records `slot u16 | key len u32 | key | epoch u64 | seq u64 | value len u32 | value`.
pub struct SnapshotCodec;

const SNAPSHOT_MAGIC: &[u8; 8] = b"DKVSNAP1";
const SNAPSHOT_HEADER: usize = 8 + 16;

impl SnapshotCodec {
    fn put_header(buf: &mut BytesMut, at: Position) {
        buf.put_slice(SNAPSHOT_MAGIC);
        buf.put_u64(at.epoch);
        buf.put_u64(at.seq);
    }

    fn put_record(buf: &mut BytesMut, slot: Slot, key: &[u8], version: Position, value: &[u8]) {
        buf.put_u16(slot);
        buf.put_u32(key.len() as u32);
        buf.put_slice(key);
        buf.put_u64(version.epoch);
        buf.put_u64(version.seq);
        buf.put_u32(value.len() as u32);
        buf.put_slice(value);
    }

    /// Takes the header off the front of `buf` once it has arrived whole.
    pub fn take_header(buf: &mut BytesMut) -> Result<Option<Position>, StoreError> {
        if buf.len() < SNAPSHOT_HEADER {
            return Ok(None);
        }
        if &buf[..8] != SNAPSHOT_MAGIC {
            return Err(StoreError::BadSnapshot("bad magic".into()));
        }
        buf.advance(8);
        let epoch = buf.get_u64();
        let seq = buf.get_u64();
        Ok(Some(Position::new(epoch, seq)))
    }

    /// Takes every record that has arrived whole off the front of `buf`.
    pub fn take_records(buf: &mut BytesMut) -> Vec<SnapshotRecord> {
        let mut out = Vec::new();
        loop {
            if buf.len() < 6 {
                return out;
            }
            let klen = u32::from_be_bytes(buf[2..6].try_into().unwrap()) as usize;
            let vlen_at = 6 + klen + 16;
            if buf.len() < vlen_at + 4 {
                return out;
            }
            let vlen = u32::from_be_bytes(buf[vlen_at..vlen_at + 4].try_into().unwrap()) as usize;
            if buf.len() < vlen_at + 4 + vlen {
                return out;
            }
            let mut rec = buf.split_to(vlen_at + 4 + vlen).freeze();
            let slot = rec.get_u16();
            rec.advance(4);
            let key = rec.split_to(klen);
            let epoch = rec.get_u64();
            let seq = rec.get_u64();
            rec.advance(4);
            out.push(SnapshotRecord {
                slot,
                key,
                version: Position::new(epoch, seq),
                value: rec,
            });
        }
    }
}

fn encode_value(version: Position, value: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(16 + value.len());
    out.extend_from_slice(&version.epoch.to_le_bytes());
    out.extend_from_slice(&version.seq.to_le_bytes());
    out.extend_from_slice(value);
    out
}

fn decode_value(raw: &[u8]) -> (Position, &[u8]) {
    let epoch = u64::from_le_bytes(raw[..8].try_into().unwrap());
    let seq = u64::from_le_bytes(raw[8..16].try_into().unwrap());
    (Position::new(epoch, seq), &raw[16..])
}

fn decode_stored(raw: &[u8]) -> Result<StoredEntry, StoreError> {
    postcard::from_bytes(raw).map_err(|e| StoreError::Io(format!("corrupt log entry: {e}")))
}

fn entry_epoch(raw: &[u8]) -> Result<u64, StoreError> {
    Ok(decode_stored(raw)?.entry.epoch)
}

fn record_hash(slot: Slot, key: &[u8], version: Position, value: &[u8]) -> u128 {
    let mut h = Xxh3::new();
    h.update(&slot.to_le_bytes());
    h.update(&(key.len() as u64).to_le_bytes());
    h.update(key);
    h.update(&version.epoch.to_le_bytes());
    h.update(&version.seq.to_le_bytes());
    h.update(value);
    h.digest128()
}

fn read_state(
    meta: &impl ReadableTable<&'static str, &'static [u8]>,
) -> Result<LogState, StoreError> {
    match meta.get(META_STATE)? {
        Some(v) => postcard::from_bytes(v.value())
            .map_err(|e| StoreError::Io(format!("corrupt meta state: {e}"))),
        None => Ok(LogState::default()),
    }
}

/// Loads the state at open; wipes a half-installed snapshot (and says so).
fn recover(db: &Database) -> Result<(LogState, bool), StoreError> {
    let txn = db.begin_write()?;
    let mut wiped = false;
    let state = {
        let mut meta = txn.open_table(META)?;
        let mut state = read_state(&meta)?;
        if meta.get(META_SNAPSHOT_PARTIAL)?.is_some() {
            tracing::warn!("found a partially installed snapshot; discarding local data");
            txn.delete_table(KV)?;
            txn.delete_table(LOG)?;
            // The epoch and the log's batch numbering only ever rise.
            state = LogState {
                epoch: state.epoch,
                wal_batch: state.wal_batch,
                ..LogState::default()
            };
            meta.remove(META_SNAPSHOT_PARTIAL)?;
            meta.insert(META_STATE, state.encode().as_slice())?;
            wiped = true;
        }
        txn.open_table(KV)?;
        txn.open_table(LOG)?;
        state
    };
    txn.commit()?;
    Ok((state, wiped))
}

/// Redoes the write-ahead-log batches the last checkpoint does not hold, then checkpoints.
fn replay(db: &Database, mut st: LogState, batches: Vec<WalBatch>) -> Result<LogState, StoreError> {
    let pending: Vec<WalBatch> = batches
        .into_iter()
        .filter(|b| b.number > st.wal_batch)
        .collect();
    if pending.is_empty() {
        return Ok(st);
    }
    tracing::info!(batches = pending.len(), from = ?st.last, "replaying the write-ahead log");
    let mut txn = db.begin_write()?;
    txn.set_durability(Durability::Immediate)?;
    in_tables(&txn, &mut st, |tx, _| {
        for batch in pending {
            for record in batch.records {
                match record {
                    WalRecord::Epoch(e) => tx.st.epoch = tx.st.epoch.max(e),
                    WalRecord::Apply(entry) => tx.apply(entry)?,
                    WalRecord::TruncateAfter(seq) => tx.truncate_after(seq)?,
                    WalRecord::Trim(seq) => tx.trim(seq)?,
                }
            }
            tx.st.wal_batch = batch.number;
        }
        Ok(())
    })?;
    txn.commit()?;
    tracing::info!(last = ?st.last, "write-ahead log replayed");
    Ok(st)
}

struct Writer {
    db: Arc<Database>,
    state: LogState,
    published: watch::Sender<LogState>,
    /// Moves as soon as a batch is visible in the database, before its log sync.
    staged: watch::Sender<LogState>,
    observer: Arc<dyn CommitObserver>,
    wal: Wal,
    checkpointed: Instant,
}

/// A reply owed once the transaction commits (or fails).
enum Reply {
    Write(
        oneshot::Sender<Result<WriteOutcome, StoreError>>,
        Result<WriteOutcome, StoreError>,
    ),
    Append(
        oneshot::Sender<Result<AppendOutcome, StoreError>>,
        Result<AppendOutcome, StoreError>,
    ),
    Epoch(
        oneshot::Sender<Result<u64, StoreError>>,
        Result<u64, StoreError>,
    ),
    Unit(
        oneshot::Sender<Result<(), StoreError>>,
        Result<(), StoreError>,
    ),
    State(oneshot::Sender<Result<LogState, StoreError>>),
}

impl Reply {
    fn send(self, state: LogState, failure: Option<&StoreError>) {
        fn fail<T>(
            failure: Option<&StoreError>,
            r: Result<T, StoreError>,
        ) -> Result<T, StoreError> {
            match failure {
                Some(e) => Err(e.clone()),
                None => r,
            }
        }
        match self {
            Reply::Write(tx, r) => drop(tx.send(fail(failure, r))),
            Reply::Append(tx, r) => drop(tx.send(fail(failure, r))),
            Reply::Epoch(tx, r) => drop(tx.send(fail(failure, r))),
            Reply::Unit(tx, r) => drop(tx.send(fail(failure, r))),
            Reply::State(tx) => drop(tx.send(fail(failure, Ok(state)))),
        }
    }
}

impl Writer {
    fn run(mut self, rx: std_mpsc::Receiver<Command>) {
        while let Ok(first) = rx.recv() {
            let mut batch = vec![first];
            // Requests come in bursts (a connection's frames are dispatched together); let
            // the rest of the burst arrive so it shares this commit.
            std::thread::yield_now();
            while batch.len() < MAX_BATCH {
                match rx.try_recv() {
                    Ok(cmd) => batch.push(cmd),
                    Err(_) => break,
                }
            }
            let started = Instant::now();
            let n = batch.len();
            let mut replies = Vec::with_capacity(n);
            let mut next = self.state;
            let result = self.execute(batch, &mut next, &mut replies);
            match result {
                Ok(()) => {
                    self.state = next;
                    self.published.send_replace(next);
                    let took = started.elapsed();
                    self.observer.committed(n, took.as_secs_f64());
                    if took >= SLOW_COMMIT {
                        // Every write on this replica waited this long; say why it was slow.
                        tracing::warn!(
                            ms = took.as_millis() as u64,
                            requests = n,
                            checkpoint = self.checkpointed.elapsed() < took,
                            wal_bytes = self.wal.len(),
                            "slow group commit"
                        );
                    }
                    for r in replies {
                        r.send(next, None);
                    }
                }
                Err(e) => {
                    tracing::error!(error = %e, "write transaction failed; batch rolled back");
                    for r in replies {
                        r.send(self.state, Some(&e));
                    }
                }
            }
        }
        // Every handle is gone: leave nothing to replay.
        let mut st = self.state;
        if let Err(e) = self.execute(
            vec![Command::Checkpoint {
                reply: oneshot::channel().0,
            }],
            &mut st,
            &mut Vec::new(),
        ) {
            tracing::warn!(error = %e, "final checkpoint failed; the log will be replayed");
        }
    }

    /// Runs a batch in one transaction. Replies are collected, not sent, so nobody hears
    /// "done" before the fsync.
    fn execute(
        &mut self,
        batch: Vec<Command>,
        st: &mut LogState,
        replies: &mut Vec<Reply>,
    ) -> Result<(), StoreError> {
        // The batch's frame size is not known yet; its keys and values bound it.
        let estimate: u64 = batch.iter().map(Command::wal_estimate).sum();
        let checkpoint = batch.iter().any(Command::needs_checkpoint)
            || self.checkpointed.elapsed() >= CHECKPOINT_EVERY
            || !self.wal.has_room(estimate);
        let mut txn = self.db.begin_write()?;
        // Between checkpoints redb commits without fsync: the write-ahead log append below
        // is what makes the batch durable.
        txn.set_durability(if checkpoint {
            Durability::Immediate
        } else {
            Durability::None
        })?;
        let records = in_tables(&txn, st, |tx, meta| {
            for cmd in batch {
                match cmd {
                    Command::Write {
                        epoch,
                        slot,
                        key,
                        op,
                        cond,
                        reply,
                    } => {
                        let r = tx.client_write(epoch, slot, key, op, cond);
                        replies.push(Reply::Write(reply, r));
                    }
                    Command::Append {
                        epoch,
                        prev,
                        entries,
                        leader_last,
                        reply,
                    } => {
                        let r = tx.append(epoch, prev, entries, leader_last);
                        replies.push(Reply::Append(reply, r));
                    }
                    Command::RaiseEpoch { epoch, reply } => {
                        let r = tx.raise_epoch(epoch).map(|()| epoch);
                        replies.push(Reply::Epoch(reply, r));
                    }
                    Command::Trim { upto } => tx.trim(upto)?,
                    Command::SnapshotBegin { epoch, reply } => {
                        let r = if let Err(e) = tx.raise_epoch(epoch) {
                            Err(e)
                        } else {
                            meta.insert(META_SNAPSHOT_PARTIAL, [1u8].as_slice())?;
                            tx.kv.retain(|_, _| false)?;
                            tx.log.retain(|_, _| false)?;
                            tx.st.keys = 0;
                            tx.st.digest = 0;
                            tx.st.last = Position::default();
                            tx.st.base = Position::default();
                            Ok(())
                        };
                        replies.push(Reply::Unit(reply, r));
                    }
                    Command::SnapshotChunk { records, reply } => {
                        for r in &records {
                            tx.put_kv(r.slot, &r.key, r.version, &r.value)?;
                        }
                        replies.push(Reply::Unit(reply, Ok(())));
                    }
                    Command::SnapshotEnd { at, reply } => {
                        meta.remove(META_SNAPSHOT_PARTIAL)?;
                        tx.st.last = at;
                        tx.st.base = at;
                        replies.push(Reply::State(reply));
                    }
                    Command::Checkpoint { reply } => replies.push(Reply::Unit(reply, Ok(()))),
                }
            }
            let records = std::mem::take(&mut tx.wal);
            if !records.is_empty() {
                tx.st.wal_batch += 1;
            }
            Ok(records)
        })?;
        txn.commit()?;
        self.staged.send_replace(*st);
        let logged = if checkpoint {
            self.checkpointed = Instant::now();
            self.wal.reset();
            Ok(())
        } else if records.is_empty() {
            Ok(())
        } else {
            self.wal.append(&WalBatch {
                number: st.wal_batch,
                records,
            })
        };
        if let Err(e) = logged {
            // redb now holds changes the log may not: carrying on could acknowledge a
            // write that a crash loses. Stop; a restart replays what did reach the disk.
            tracing::error!(error = %e, path = %self.wal.path().display(), "write-ahead log failed; stopping");
            std::process::abort();
        }
        Ok(())
    }
}

/// Runs `work` on the tables of `txn`, then stores the state it leaves: every change,
/// by the writer or by the replay at open, goes through here.
fn in_tables<R>(
    txn: &redb::WriteTransaction,
    st: &mut LogState,
    work: impl FnOnce(
        &mut Tx<'_, '_>,
        &mut redb::Table<'_, &'static str, &'static [u8]>,
    ) -> Result<R, StoreError>,
) -> Result<R, StoreError> {
    let mut kv = txn.open_table(KV)?;
    let mut log = txn.open_table(LOG)?;
    let mut meta = txn.open_table(META)?;
    let mut tx = Tx {
        kv: &mut kv,
        log: &mut log,
        st,
        wal: Vec::new(),
    };
    let out = work(&mut tx, &mut meta)?;
    meta.insert(META_STATE, tx.st.encode().as_slice())?;
    Ok(out)
}

/// The tables and state of one open write transaction.
struct Tx<'a, 't> {
    kv: &'a mut redb::Table<'t, (u16, &'static [u8]), &'static [u8]>,
    log: &'a mut redb::Table<'t, u64, &'static [u8]>,
    st: &'a mut LogState,
    /// What this transaction did, for the write-ahead log.
    wal: Vec<WalRecord>,
}

impl Tx<'_, '_> {
    /// Refuses an epoch below the highest seen; otherwise makes it the highest seen.
    fn raise_epoch(&mut self, epoch: u64) -> Result<(), StoreError> {
        if epoch < self.st.epoch {
            return Err(StoreError::StaleEpoch {
                request: epoch,
                current: self.st.epoch,
            });
        }
        if epoch > self.st.epoch {
            self.st.epoch = epoch;
            self.wal.push(WalRecord::Epoch(epoch));
        }
        Ok(())
    }

    fn current(&self, slot: Slot, key: &[u8]) -> Result<Option<(Position, Bytes)>, StoreError> {
        Ok(self.kv.get((slot, key))?.map(|v| {
            let (pos, value) = decode_value(v.value());
            (pos, Bytes::copy_from_slice(value))
        }))
    }

    fn put_kv(
        &mut self,
        slot: Slot,
        key: &[u8],
        version: Position,
        value: &[u8],
    ) -> Result<(), StoreError> {
        let old = self
            .kv
            .insert((slot, key), encode_value(version, value).as_slice())?;
        match old {
            Some(old) => {
                let (v, val) = decode_value(old.value());
                self.st.digest ^= record_hash(slot, key, v, val);
            }
            None => self.st.keys += 1,
        }
        self.st.digest ^= record_hash(slot, key, version, value);
        Ok(())
    }

    fn remove_kv(&mut self, slot: Slot, key: &[u8]) -> Result<(), StoreError> {
        if let Some(old) = self.kv.remove((slot, key))? {
            let (v, val) = decode_value(old.value());
            self.st.digest ^= record_hash(slot, key, v, val);
            self.st.keys -= 1;
        }
        Ok(())
    }

    /// Appends one entry to the log and applies it, keeping the before-image.
    fn apply(&mut self, entry: LogEntry) -> Result<(), StoreError> {
        if entry.seq != self.st.last.seq + 1 {
            return Err(StoreError::Io(format!(
                "refusing a log gap: entry {} after {}",
                entry.seq, self.st.last.seq
            )));
        }
        let before = self.current(entry.slot, &entry.key)?;
        match &entry.op {
            Op::Put(value) => self.put_kv(entry.slot, &entry.key, entry.position(), value)?,
            Op::Delete => self.remove_kv(entry.slot, &entry.key)?,
        }
        self.st.last = entry.position();
        self.wal.push(WalRecord::Apply(entry.clone()));
        let seq = entry.seq;
        let stored = postcard::to_stdvec(&StoredEntry { entry, before })
            .map_err(|e| StoreError::Io(e.to_string()))?;
        self.log.insert(seq, stored.as_slice())?;
        Ok(())
    }

    fn client_write(
        &mut self,
        epoch: u64,
        slot: Slot,
        key: Bytes,
        op: Op,
        cond: Condition,
    ) -> Result<WriteOutcome, StoreError> {
        if epoch != self.st.epoch {
            return Err(StoreError::StaleEpoch {
                request: epoch,
                current: self.st.epoch,
            });
        }
        let current = self
            .kv
            .get((slot, key.as_ref()))?
            .map(|v| decode_value(v.value()).0);
        match (cond, current) {
            (Condition::IfMatch(want), Some(have)) if want == have => {}
            (Condition::IfMatch(_), _) => return Err(StoreError::PreconditionFailed),
            (Condition::IfAbsent, Some(_)) => return Err(StoreError::PreconditionFailed),
            (Condition::IfExists, None) => return Err(StoreError::PreconditionFailed),
            _ => {}
        }
        if op == Op::Delete && current.is_none() {
            return Err(StoreError::NotFound);
        }
        let version = Position::new(epoch, self.st.last.seq + 1);
        self.apply(LogEntry {
            epoch,
            seq: version.seq,
            slot,
            key,
            op,
        })?;
        Ok(WriteOutcome {
            version,
            created: current.is_none(),
        })
    }

    fn epoch_at(&self, seq: u64) -> Result<Option<u64>, StoreError> {
        if seq == self.st.base.seq {
            return Ok(Some(self.st.base.epoch));
        }
        self.log
            .get(seq)?
            .map(|v| entry_epoch(v.value()))
            .transpose()
    }

    fn append(
        &mut self,
        epoch: u64,
        prev: Position,
        entries: Vec<LogEntry>,
        leader_last: u64,
    ) -> Result<AppendOutcome, StoreError> {
        self.raise_epoch(epoch)?;
        let positions: Vec<Position> = entries.iter().map(LogEntry::position).collect();
        let plan =
            crate::replication::plan_append(&TxLog(self), epoch, prev, &positions, leader_last)?;
        match plan {
            crate::replication::AppendPlan::Mismatch { conflict } => Ok(AppendOutcome::Mismatch {
                last: self.st.last,
                conflict,
            }),
            crate::replication::AppendPlan::Append {
                truncate_after,
                skip,
            } => {
                if let Some(after) = truncate_after {
                    self.truncate_after(after)?;
                }
                for entry in entries.into_iter().skip(skip) {
                    self.apply(entry)?;
                }
                Ok(AppendOutcome::Appended { last: self.st.last })
            }
        }
    }

    /// Undoes and removes every entry after `after`, newest first.
    fn truncate_after(&mut self, after: u64) -> Result<(), StoreError> {
        if after < self.st.base.seq {
            return Err(StoreError::Io(format!(
                "cannot truncate to {after}: log starts after {}",
                self.st.base.seq
            )));
        }
        let doomed: Vec<u64> = self
            .log
            .range(after + 1..)?
            .map(|r| r.map(|(k, _)| k.value()))
            .collect::<Result<_, _>>()?;
        tracing::warn!(
            from = after + 1,
            to = self.st.last.seq,
            "truncating a divergent log suffix"
        );
        for seq in doomed.into_iter().rev() {
            let raw = self.log.remove(seq)?.expect("listed entry exists");
            let stored = decode_stored(raw.value())?;
            drop(raw);
            let StoredEntry { entry, before } = stored;
            match before {
                Some((version, value)) => self.put_kv(entry.slot, &entry.key, version, &value)?,
                None => self.remove_kv(entry.slot, &entry.key)?,
            }
        }
        let epoch = self.epoch_at(after)?.unwrap_or(0);
        self.st.last = Position::new(epoch, after);
        self.wal.push(WalRecord::TruncateAfter(after));
        Ok(())
    }

    fn trim(&mut self, upto: u64) -> Result<(), StoreError> {
        let upto = upto.min(self.st.last.seq);
        if upto <= self.st.base.seq {
            return Ok(());
        }
        let epoch = self.epoch_at(upto)?.unwrap_or(self.st.base.epoch);
        let from = self.st.base.seq + 1;
        self.log.retain_in(from..=upto, |_, _| false)?;
        self.st.base = Position::new(epoch, upto);
        self.wal.push(WalRecord::Trim(upto));
        Ok(())
    }
}

/// The log of an open transaction, as the pure append rules see it.
struct TxLog<'x, 'a, 't>(&'x Tx<'a, 't>);

impl crate::replication::LogIndex for TxLog<'_, '_, '_> {
    type Error = StoreError;
    fn last(&self) -> Position {
        self.0.st.last
    }
    fn base(&self) -> Position {
        self.0.st.base
    }
    fn epoch_at(&self, seq: u64) -> Result<Option<u64>, StoreError> {
        self.0.epoch_at(seq)
    }
}

/// The store's own log, read outside the writer (the leader's view when it replicates):
/// everything the database holds, including a batch whose log sync is still running.
impl crate::replication::LogIndex for Store {
    type Error = StoreError;
    fn last(&self) -> Position {
        self.staged().last
    }
    fn base(&self) -> Position {
        self.staged().base
    }
    fn epoch_at(&self, seq: u64) -> Result<Option<u64>, StoreError> {
        Store::epoch_at(self, seq)
    }
}

/// Where a replica's disk space goes (`distkv inspect`).
#[derive(Debug, Clone, Serialize)]
pub struct SpaceReport {
    /// Log state as of the last durable checkpoint.
    pub state: LogState,
    /// Size of `distkv.redb`.
    pub db_file_bytes: u64,
    /// Size of the write-ahead log.
    pub wal_bytes: u64,
    /// Rows and page use of each table.
    pub tables: Vec<TableSpace>,
}

/// Page use of one table.
#[derive(Debug, Clone, Serialize)]
pub struct TableSpace {
    /// Table name.
    pub name: &'static str,
    /// Rows.
    pub rows: u64,
    /// Bytes of keys and values stored in leaves.
    pub stored_bytes: u64,
    /// Bytes of B-tree bookkeeping.
    pub metadata_bytes: u64,
    /// Bytes of pages left unused by page splits.
    pub fragmented_bytes: u64,
    /// Leaf and branch pages.
    pub pages: u64,
}

/// Reports the space use of a stopped replica's data directory.
pub fn inspect(dir: &Path) -> Result<SpaceReport, StoreError> {
    use redb::ReadableTableMetadata;
    let path = dir.join("distkv.redb");
    let db = Database::open(&path)?;
    let txn = db.begin_read()?;
    let state = read_state(&txn.open_table(META)?)?;
    let kv = txn.open_table(KV)?;
    let log = txn.open_table(LOG)?;
    let space = |name, rows, st: redb::TableStats| TableSpace {
        name,
        rows,
        stored_bytes: st.stored_bytes(),
        metadata_bytes: st.metadata_bytes(),
        fragmented_bytes: st.fragmented_bytes(),
        pages: st.leaf_pages() + st.branch_pages(),
    };
    let size = |p: &Path| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0);
    Ok(SpaceReport {
        state,
        db_file_bytes: size(&path),
        wal_bytes: size(&dir.join("wal")),
        tables: vec![
            space("kv", kv.len()?, kv.stats()?),
            space("log", log.len()?, log.stats()?),
        ],
    })
}
