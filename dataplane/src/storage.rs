//! Durable storage of one replica, on redb.
//!
//! Three tables: `kv` keyed by slot, a hash of the key, and the key, `log` keyed by
//! sequence number for replication, and `meta` for the highest epoch seen and the log
//! positions. Every change goes through one writer thread that drains whatever requests
//! are waiting into one batch, made durable by one write-ahead-log append and one fsync
//! (group commit).
//!
//! The writer does not write batches to redb. It applies them to an in-memory [`Layer`]
//! that readers consult before redb; every 125 ms that layer is frozen and a flusher
//! thread writes it to redb in one durable transaction, while the writer goes on with a
//! new one. A redb commit and its B-tree page copies are thus paid eight times a second
//! rather than per batch, and never on a client's write path.
//!
//! Every log record keeps the value it replaced (its before-image). That is what lets a
//! replica truncate a log suffix that was never committed: the writes are undone in
//! reverse order, so the data always equals the effect of the log as it now stands.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::mpsc as std_mpsc;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use redb::{Database, Durability, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};
use tokio::sync::{oneshot, watch};
use xxhash_rust::xxh3::Xxh3;

use crate::slots::Slot;
use crate::wal::{Wal, WalBatch, WalRecord};

/// Keyed by [`kv_key`]: the slot, then a hash of the key, so a slot's keys sit together
/// in random order. Keys written in ascending order would otherwise always land at the
/// end of a leaf, and redb's even splits would leave every leaf half empty.
const KV: TableDefinition<(u32, &[u8]), &[u8]> = TableDefinition::new("kv");
/// The `kv` table as distkv kept it until keys were spread within their slot: keyed by
/// `(slot, key)`, each value led by its version as two little-endian `u64`s. Converted at
/// open (see [`convert_old_kv`]).
const OLD_KV: TableDefinition<(u16, &[u8]), &[u8]> = TableDefinition::new("kv");
/// Where [`convert_old_kv`] builds the new table before it takes the old one's name.
const KV_CONVERTING: TableDefinition<(u32, &[u8]), &[u8]> = TableDefinition::new("kv.converting");
const LOG: TableDefinition<u64, &[u8]> = TableDefinition::new("log");
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");

const META_STATE: &str = "state";
/// Present while a snapshot is being installed: a replica that crashes then holds a
/// partial copy and must start over from nothing.
const META_SNAPSHOT_PARTIAL: &str = "snapshot_partial";

/// Most requests the writer folds into one transaction; bounds the latency of one commit.
const MAX_BATCH: usize = 4096;

/// Most bytes of values and keys the writer folds into one transaction, once it has
/// one request: 4096 values of a MiB would not fit one write-ahead-log frame (its length
/// is 32 bits), and would hold gigabytes in memory at once.
const MAX_BATCH_BYTES: u64 = 64 << 20;

/// Times the writer yields to let more requests join a batch, while each yield brings
/// more: three gave 3–6% more PUTs at 64 connections than one, in alternating runs.
const GATHER_ROUNDS: usize = 3;
/// How often the writer's layer is frozen and written to redb durably, which frees its
/// write-ahead-log file; bounds the memory it holds and replay time after a crash. The
/// pages redb copies in one flush are free for reuse only after the next, so a shorter
/// period keeps the file smaller: 125 ms against 250 ms took a million 100-byte values
/// from 2.13x to 1.97x their size on disk, at the same PUT rate.
const FLUSH_EVERY: Duration = Duration::from_millis(125);
/// A group commit slower than this is logged: it held up every write of the replica.
const SLOW_COMMIT: Duration = Duration::from_millis(50);

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
#[derive(Clone, Serialize, Deserialize)]
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
    PreconditionFailed {
        /// The log end the key was checked at: the refusal stands once that is committed.
        as_of: u64,
    },
    /// Delete of a key that does not exist; nothing was written.
    #[error("key not found")]
    NotFound {
        /// The log end the key was found absent at, as for `PreconditionFailed`.
        as_of: u64,
    },
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
    /// A client write arrived while a snapshot install is under way; nothing was written.
    #[error("a snapshot install is under way; the replica takes no writes until it ends")]
    Installing,
    /// The disk or database failed, or a request broke the log's rules; no key or log
    /// entry was changed.
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
    /// The leader's log differs from this one at or below `base`, which cannot be cut:
    /// only a snapshot brings it level. Nothing was written.
    Diverged {
        /// Start of the follower's log: the last entry it trimmed or took from a snapshot.
        base: Position,
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

    /// The state of a store whose data and log were discarded: the epoch and the log's
    /// batch numbering stay, as they only ever rise.
    fn emptied(self) -> LogState {
        LogState {
            epoch: self.epoch,
            wal_batch: self.wal_batch,
            ..LogState::default()
        }
    }
}

/// What a full scan of the data found, and the state it is consistent with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Scan {
    /// The log state as of the newest applied batch, which the scan includes; it may be
    /// one batch ahead of [`Store::state`].
    pub state: LogState,
    /// Keys found.
    pub keys: u64,
    /// Digest of the keys found, computed as [`LogState::digest`] is.
    pub digest: u128,
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
        reply: oneshot::Sender<Result<u64, StoreError>>,
    },
    SnapshotChunk {
        install: u64,
        records: Vec<SnapshotRecord>,
        reply: oneshot::Sender<Result<(), StoreError>>,
    },
    SnapshotEnd {
        install: u64,
        at: Position,
        reply: oneshot::Sender<Result<LogState, StoreError>>,
    },
    Checkpoint {
        reply: oneshot::Sender<Result<(), StoreError>>,
    },
    /// Answered once everything is in redb and neither thread holds the database.
    Close {
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
                | Command::Close { .. }
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
    layers: Arc<RwLock<Layers>>,
    commands: std_mpsc::Sender<Command>,
    state: watch::Receiver<LogState>,
    staged: watch::Receiver<LogState>,
    path: PathBuf,
}

impl Store {
    /// Opens (or creates) the store in `dir` and starts its writer and flusher threads.
    pub fn open(dir: &Path, observer: Arc<dyn CommitObserver>) -> Result<Store, StoreError> {
        std::fs::create_dir_all(dir).map_err(|e| StoreError::Io(e.to_string()))?;
        // A new directory's name is durable only once its parent is synced; before, a
        // crash could lose it with every acknowledged write inside.
        if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::File::open(parent)
                .and_then(|d| d.sync_all())
                .map_err(|e| StoreError::Io(format!("syncing {}: {e}", parent.display())))?;
        }
        let path = dir.join("distkv.redb");
        let db = Arc::new(Database::create(&path)?);
        let io = |e: std::io::Error| StoreError::Io(format!("write-ahead log: {e}"));
        let (wal, batches) = Wal::open(dir).map_err(io)?;
        let state = recover(&db, &batches)?;
        let state = replay(&db, state, batches)?;
        let layers = Arc::new(RwLock::new(Layers::new(state)));
        let (state_tx, state_rx) = watch::channel(state);
        let (staged_tx, staged_rx) = watch::channel(state);
        let (tx, rx) = std_mpsc::channel();
        let (to_flusher, frozen) = std_mpsc::channel();
        let (flushed_tx, flushed) = std_mpsc::channel();
        let spawn = |name: &str, run: Box<dyn FnOnce() + Send>| {
            std::thread::Builder::new()
                .name(name.into())
                .spawn(run)
                .map_err(|e| StoreError::Io(e.to_string()))
        };
        let flusher_db = db.clone();
        let flusher_thread = spawn(
            "distkv-flusher",
            Box::new(move || flusher(&flusher_db, frozen, flushed_tx)),
        )?;
        let writer = Writer {
            db: db.clone(),
            layers: layers.clone(),
            lower: None,
            to_flusher,
            flushed,
            flushing: false,
            published: state_tx,
            staged: staged_tx,
            observer,
            wal,
            active_since: Instant::now(),
            installs: Installs::default(),
            closing: Vec::new(),
        };
        spawn(
            "distkv-writer",
            Box::new(move || writer.run(rx, flusher_thread)),
        )?;
        Ok(Store {
            db,
            layers,
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

    /// Makes everything durable in redb and stops the writer and flusher threads, for a
    /// clean shutdown. Reads still work; writes fail with [`StoreError::Closed`]. Dropping
    /// the last handle afterwards closes redb cleanly, so the next open needs no repair
    /// and a stopped replica can be inspected.
    pub async fn close(&self) -> Result<(), StoreError> {
        self.call(|reply| Command::Close { reply }).await
    }

    /// Drops log entries up to and including `upto` (never past the end of the log).
    pub fn trim(&self, upto: u64) {
        let _ = self.commands.send(Command::Trim { upto });
    }

    /// Starts replacing all data with a snapshot sent by the leader at `epoch`. Returns
    /// the install's number, which its chunks and end must name: they are refused once
    /// another install began or a higher epoch was seen.
    ///
    /// This wipes the replica at once, so a receiver calls it only once the stream's
    /// header has arrived and checked out ([`SnapshotReader::header`]): a request whose
    /// body is no snapshot must be refused with the replica as it was.
    pub async fn snapshot_begin(&self, epoch: u64) -> Result<u64, StoreError> {
        self.call(|reply| Command::SnapshotBegin { epoch, reply })
            .await
    }

    /// Stores one chunk of snapshot install `install`.
    pub async fn snapshot_chunk(
        &self,
        install: u64,
        records: Vec<SnapshotRecord>,
    ) -> Result<(), StoreError> {
        self.call(|reply| Command::SnapshotChunk {
            install,
            records,
            reply,
        })
        .await
    }

    /// Finishes snapshot install `install`, taken at `at`: the log restarts after it.
    pub async fn snapshot_end(&self, install: u64, at: Position) -> Result<LogState, StoreError> {
        self.call(|reply| Command::SnapshotEnd { install, at, reply })
            .await
    }

    /// Reads a key: its version and value.
    pub fn get(&self, slot: Slot, key: &[u8]) -> Result<Option<(Position, Bytes)>, StoreError> {
        self.get_settled_at(slot, key).map(|(found, _)| found)
    }

    /// [`Store::get`], with the log seq the answer rests on: the value's version, or for
    /// an absent key a seq at or after the delete that removed it (which may be any entry
    /// applied so far, as an absent key has no version of its own).
    pub fn get_settled_at(
        &self,
        slot: Slot,
        key: &[u8],
    ) -> Result<(Option<(Position, Bytes)>, u64), StoreError> {
        let settled_at = |found: Option<(Position, Bytes)>, applied: u64| {
            let seq = found.as_ref().map_or(applied, |(version, _)| version.seq);
            (found, seq)
        };
        let layers = self.layers.read().unwrap();
        let applied = layers.active.state.last.seq;
        if let Seen::Here(found) = layers.key(key) {
            return Ok(settled_at(found, applied));
        }
        drop(layers);
        // No layer holds the key now, so redb has its latest value: the writer drops a
        // layer only after redb committed it, and after it staged its state.
        let txn = self.db.begin_read()?;
        let found = kv_get(&txn.open_table(KV)?, slot, key)?;
        if found.is_some() {
            return Ok(settled_at(found, applied));
        }
        Ok(settled_at(found, applied.max(self.staged().last.seq)))
    }

    /// Reads log entries `from..=upto`, at most `max_entries` of them and at most
    /// `max_bytes` as `entry_bytes` counts them (a first entry larger than that comes alone).
    pub fn read_log(
        &self,
        from: u64,
        upto: u64,
        max_entries: usize,
        max_bytes: usize,
    ) -> Result<Vec<LogEntry>, StoreError> {
        // Held throughout, so no layer is dropped between looking in it and in redb.
        let layers = self.layers.read().unwrap();
        let mut lower = None;
        let mut out = Vec::new();
        let mut bytes = 0;
        for seq in from..=upto {
            let entry = match layers.entry(seq) {
                Seen::Here(Some(stored)) => stored.entry.clone(),
                Seen::Here(None) => break,
                Seen::Below => {
                    let table = match &lower {
                        Some(t) => t,
                        None => lower.insert(self.db.begin_read()?.open_table(LOG)?),
                    };
                    match log_get(table, seq)? {
                        Some(stored) => stored.entry,
                        None => break,
                    }
                }
            };
            // A batch stays within `max_bytes` unless its first entry alone exceeds it: a
            // follower sizes what it accepts by that.
            let size = entry_bytes(&entry);
            if !out.is_empty() && bytes + size > max_bytes {
                break;
            }
            bytes += size;
            out.push(entry);
            if out.len() >= max_entries || bytes >= max_bytes {
                break;
            }
        }
        Ok(out)
    }

    /// Epoch of the entry at `seq`, if the log (or its base) still holds it, as readers
    /// see it (see [`Store::staged`]).
    pub fn epoch_at(&self, seq: u64) -> Result<Option<u64>, StoreError> {
        {
            // The base and the entries from one view: a trim applied a moment ago is in
            // the layers before it is in `staged()`.
            let layers = self.layers.read().unwrap();
            let base = layers.active.state.base;
            if seq == base.seq {
                return Ok(Some(base.epoch));
            }
            if let Seen::Here(found) = layers.entry(seq) {
                return Ok(found.map(|s| s.entry.epoch));
            }
        }
        let txn = self.db.begin_read()?;
        Ok(log_get(&txn.open_table(LOG)?, seq)?.map(|s| s.entry.epoch))
    }

    /// Streams a consistent copy of every key into `sink`, framed as [`SnapshotReader`]
    /// reads it, `chunk_bytes` at a time, all but its end. Blocking: run it on a blocking
    /// thread.
    pub fn export_snapshot(
        &self,
        chunk_bytes: usize,
        mut sink: impl FnMut(Bytes) -> bool,
    ) -> Result<Exported, StoreError> {
        // Copy what redb holds once it holds everything written so far: the copy then
        // reaches past anything the log has dropped by now.
        let (tx, rx) = oneshot::channel();
        self.commands
            .send(Command::Checkpoint { reply: tx })
            .map_err(|_| StoreError::Closed)?;
        rx.blocking_recv().map_err(|_| StoreError::Closed)??;
        let txn = self.db.begin_read()?;
        let meta = txn.open_table(META)?;
        let state = read_state(&meta)?;
        let table = txn.open_table(KV)?;
        let mut buf = BytesMut::with_capacity(chunk_bytes + 1024);
        SnapshotCodec::put_header(&mut buf, state.last);
        let mut records = 0;
        for item in table.iter()? {
            let (k, v) = item?;
            let (stored, key) = k.value();
            let (version, value) = decode_value(v.value())?;
            SnapshotCodec::put_record(&mut buf, kv_slot(stored), key, version, value);
            records += 1;
            if buf.len() >= chunk_bytes && !sink(buf.split().freeze()) {
                return Err(StoreError::Io("snapshot receiver went away".into()));
            }
        }
        if !buf.is_empty() && !sink(buf.split().freeze()) {
            return Err(StoreError::Io("snapshot receiver went away".into()));
        }
        SnapshotCodec::put_end(&mut buf, records);
        Ok(Exported {
            at: state.last,
            end: buf.freeze(),
        })
    }

    /// Recomputes key count and digest by scanning every key. The maintained values in
    /// the returned state must equal these; tests check that they do.
    pub fn scan_digest(&self) -> Result<Scan, StoreError> {
        // One view of the layers and of redb, taken under the lock; writes go on while
        // redb is scanned.
        let (state, recent, wiped, txn) = {
            let layers = self.layers.read().unwrap();
            let (recent, wiped) = layers.all_keys();
            (layers.active.state, recent, wiped, self.db.begin_read()?)
        };
        let mut keys = 0;
        let mut digest = 0u128;
        let mut count = |slot, key: &[u8], version, value: &[u8]| {
            keys += 1;
            digest ^= record_hash(slot, key, version, value);
        };
        if !wiped {
            for item in txn.open_table(KV)?.iter()? {
                let (k, v) = item?;
                let (stored, key) = k.value();
                if !recent.contains_key(key) {
                    let (version, value) = decode_value(v.value())?;
                    count(kv_slot(stored), key, version, value);
                }
            }
        }
        for (key, (slot, found)) in &recent {
            if let Some((version, value)) = found {
                count(*slot, key, *version, value);
            }
        }
        Ok(Scan {
            state,
            keys,
            digest,
        })
    }
}

/// A snapshot streamed by [`Store::export_snapshot`] but for its end.
#[derive(Debug)]
pub struct Exported {
    /// The position the copy is consistent with.
    pub at: Position,
    /// The last bytes of the stream. A receiver installs the snapshot only once they
    /// arrive, so a sender that fails, or finds `at` is not committed, ends the stream
    /// without them and nothing is installed.
    pub end: Bytes,
}

/// Framing of the snapshot stream: a header with the position the copy is consistent
/// with, then records `slot u16 | key len u32 | key | epoch u64 | seq u64 | value len u32 | value`,
/// then the end: [`SNAPSHOT_END`] where a slot would be, and the number of records.
struct SnapshotCodec;

/// Version 2 has the end marker; a receiver of version 1 would install a stream cut short.
const SNAPSHOT_MAGIC: &[u8; 8] = b"DKVSNAP2";
const SNAPSHOT_HEADER: usize = 8 + 16;
/// In the place of a record's slot, which is always lower, marks the end of the stream.
const SNAPSHOT_END: u16 = u16::MAX;

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

    fn put_end(buf: &mut BytesMut, records: u64) {
        buf.put_u16(SNAPSHOT_END);
        buf.put_u64(records);
    }

    /// Takes the header off the front of `buf` once it has arrived whole.
    fn take_header(buf: &mut BytesMut) -> Result<Option<Position>, StoreError> {
        // The magic is checked on as much of it as has arrived, so a stream of another
        // version, or not a snapshot at all, is refused before a receiver waits for more.
        let magic = buf.len().min(SNAPSHOT_MAGIC.len());
        if buf[..magic] != SNAPSHOT_MAGIC[..magic] {
            return Err(StoreError::BadSnapshot(
                "not a snapshot stream of this version of distkv".into(),
            ));
        }
        if buf.len() < SNAPSHOT_HEADER {
            return Ok(None);
        }
        buf.advance(8);
        let epoch = buf.get_u64();
        let seq = buf.get_u64();
        Ok(Some(Position::new(epoch, seq)))
    }

    /// Takes every record that has arrived whole off the front of `buf`, up to the end.
    fn take_records(buf: &mut BytesMut) -> Vec<SnapshotRecord> {
        let mut out = Vec::new();
        loop {
            if buf.len() < 6 || Self::at_end(buf) {
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

    fn at_end(buf: &[u8]) -> bool {
        buf.len() >= 2 && u16::from_be_bytes([buf[0], buf[1]]) == SNAPSHOT_END
    }

    /// Takes the end off the front of `buf` once it has arrived whole: the number of
    /// records the sender sent.
    fn take_end(buf: &mut BytesMut) -> Option<u64> {
        if buf.len() < 10 || !Self::at_end(buf) {
            return None;
        }
        buf.advance(2);
        Some(buf.get_u64())
    }
}

/// Reads a snapshot stream as it arrives, in pieces cut anywhere.
#[derive(Debug, Default)]
pub struct SnapshotReader {
    buf: BytesMut,
    at: Option<Position>,
    records: u64,
    ended: bool,
}

impl SnapshotReader {
    /// Takes the next piece of the stream; returns the records it completes.
    pub fn push(&mut self, piece: &[u8]) -> Result<Vec<SnapshotRecord>, StoreError> {
        if self.ended {
            return Err(StoreError::BadSnapshot("bytes after the end".into()));
        }
        self.buf.extend_from_slice(piece);
        if self.at.is_none() {
            self.at = SnapshotCodec::take_header(&mut self.buf)?;
            if self.at.is_none() {
                return Ok(Vec::new());
            }
        }
        let records = SnapshotCodec::take_records(&mut self.buf);
        self.records += records.len() as u64;
        if let Some(sent) = SnapshotCodec::take_end(&mut self.buf) {
            if sent != self.records {
                return Err(StoreError::BadSnapshot(format!(
                    "{} records arrived of {sent} sent",
                    self.records
                )));
            }
            if !self.buf.is_empty() {
                return Err(StoreError::BadSnapshot("bytes after the end".into()));
            }
            self.ended = true;
        }
        Ok(records)
    }

    /// The position in the stream's header, once the header has arrived and checked out.
    pub fn header(&self) -> Option<Position> {
        self.at
    }

    /// The position the snapshot was taken at, if the stream arrived whole.
    pub fn finish(self) -> Result<Position, StoreError> {
        match (self.at, self.ended) {
            (Some(at), true) => Ok(at),
            (None, _) => Err(StoreError::BadSnapshot(
                "the stream ended before its header".into(),
            )),
            (Some(_), false) => Err(StoreError::BadSnapshot(
                "the stream ended before its end: the sender gave up".into(),
            )),
        }
    }
}

/// The `kv` table's key for `key`: its slot in the high half, a hash of the key below.
fn kv_key(slot: Slot, key: &[u8]) -> (u32, &[u8]) {
    let spread = xxhash_rust::xxh3::xxh3_64(key) as u16;
    ((u32::from(slot) << 16) | u32::from(spread), key)
}

/// The slot a `kv` table key belongs to.
fn kv_slot(stored: u32) -> Slot {
    (stored >> 16) as Slot
}

/// A stored value: its version in postcard (two varints, usually 4 to 6 bytes, not 16),
/// then the value's bytes.
fn encode_value(version: Position, value: &[u8]) -> Vec<u8> {
    let out = Vec::with_capacity(20 + value.len());
    let mut out = postcard::to_extend(&version, out).expect("a position encodes");
    out.extend_from_slice(value);
    out
}

fn decode_value(raw: &[u8]) -> Result<(Position, &[u8]), StoreError> {
    postcard::take_from_bytes(raw)
        .map_err(|e| StoreError::Io(format!("corrupt value in the kv table: {e}")))
}

fn decode_stored(raw: &[u8]) -> Result<StoredEntry, StoreError> {
    postcard::from_bytes(raw).map_err(|e| StoreError::Io(format!("corrupt log entry: {e}")))
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

/// Loads the state at open; wipes a half-installed snapshot (and says so). `batches` are
/// those of the write-ahead log: a wipe drops the changes they hold, but not the epochs
/// they raised, and numbers the log past them, in the same transaction.
fn recover(db: &Database, batches: &[WalBatch]) -> Result<LogState, StoreError> {
    let txn = db.begin_write()?;
    let state = {
        let mut meta = txn.open_table(META)?;
        let mut state = read_state(&meta)?;
        if meta.get(META_SNAPSHOT_PARTIAL)?.is_some() {
            tracing::warn!("found a partially installed snapshot; discarding local data");
            txn.delete_table(KV)?;
            txn.delete_table(LOG)?;
            // An epoch raised after the snapshot began was acknowledged, so it must hold
            // after the wipe; the log is numbered past every batch it holds.
            let newer = batches.iter().filter(|b| b.number > state.wal_batch);
            state.epoch = newer
                .flat_map(|b| &b.records)
                .filter_map(|r| match r {
                    WalRecord::Epoch(e) => Some(*e),
                    _ => None,
                })
                .fold(state.epoch, u64::max);
            let newest = batches.last().map_or(0, |b| b.number);
            state.wal_batch = state.wal_batch.max(newest);
            state = state.emptied();
            meta.remove(META_SNAPSHOT_PARTIAL)?;
            meta.insert(META_STATE, state.encode().as_slice())?;
        }
        match txn.open_table(KV) {
            Ok(_) => {}
            Err(redb::TableError::TableTypeMismatch { .. }) => convert_old_kv(&txn)?,
            Err(e) => return Err(e.into()),
        }
        txn.open_table(LOG)?;
        state
    };
    txn.commit()?;
    Ok(state)
}

/// Rewrites a `kv` table of the older format ([`OLD_KV`]) in the current one, within the
/// caller's transaction: the directory holds either the old table or the new, never half.
fn convert_old_kv(txn: &redb::WriteTransaction) -> Result<(), StoreError> {
    let started = Instant::now();
    let mut rows = 0u64;
    {
        let old = txn.open_table(OLD_KV)?;
        let mut new = txn.open_table(KV_CONVERTING)?;
        for item in old.iter()? {
            let (k, v) = item?;
            let (slot, key) = k.value();
            let raw = v.value();
            if raw.len() < 16 {
                return Err(StoreError::Io("corrupt value in the older kv table".into()));
            }
            let epoch = u64::from_le_bytes(raw[..8].try_into().expect("8 bytes"));
            let seq = u64::from_le_bytes(raw[8..16].try_into().expect("8 bytes"));
            let value = encode_value(Position::new(epoch, seq), &raw[16..]);
            new.insert(kv_key(slot, key), value.as_slice())?;
            rows += 1;
        }
    }
    txn.delete_table(OLD_KV)?;
    txn.rename_table(KV_CONVERTING, KV)?;
    tracing::info!(
        rows,
        ms = started.elapsed().as_millis() as u64,
        "converted the kv table to the current key format"
    );
    Ok(())
}

fn kv_get(
    table: &impl ReadableTable<(u32, &'static [u8]), &'static [u8]>,
    slot: Slot,
    key: &[u8],
) -> Result<Option<(Position, Bytes)>, StoreError> {
    let Some(v) = table.get(kv_key(slot, key))? else {
        return Ok(None);
    };
    let (pos, value) = decode_value(v.value())?;
    Ok(Some((pos, Bytes::copy_from_slice(value))))
}

fn log_get(
    table: &impl ReadableTable<u64, &'static [u8]>,
    seq: u64,
) -> Result<Option<StoredEntry>, StoreError> {
    table
        .get(seq)?
        .map(|v| decode_stored(v.value()))
        .transpose()
}

/// About the bytes an entry takes, for size limits.
/// What an entry counts for against a batch's byte budget: its key and value and a bound
/// of its encoding's other fields.
fn entry_bytes(entry: &LogEntry) -> usize {
    32 + entry.key.len()
        + match &entry.op {
            Op::Put(v) => v.len(),
            Op::Delete => 0,
        }
}

/// Redoes the write-ahead-log batches the last flush does not hold and makes them durable
/// in redb. Returns the state, numbered past every batch found, so that a batch left over
/// in a log file can never pass for a new one.
fn replay(db: &Database, st: LogState, batches: Vec<WalBatch>) -> Result<LogState, StoreError> {
    let newest = batches.last().map_or(0, |b| b.number);
    let mut pending = Vec::new();
    for batch in batches {
        if batch.number == st.wal_batch + 1 + pending.len() as u64 {
            pending.push(batch);
        } else if batch.number > st.wal_batch {
            tracing::error!(
                number = batch.number,
                "write-ahead log has a gap; ignoring the batches after it"
            );
            break;
        }
    }
    if pending.is_empty() && newest <= st.wal_batch {
        return Ok(st);
    }
    tracing::info!(batches = pending.len(), from = ?st.last, "replaying the write-ahead log");
    let mut layers = Layers::new(st);
    let lower = Lower::open(db)?;
    let mut tx = Tx {
        layers: &mut layers,
        lower: &lower,
        wal: Vec::new(),
    };
    for batch in pending {
        for record in batch.records {
            match record {
                WalRecord::Epoch(e) => tx.changed().state.epoch = tx.st().epoch.max(e),
                WalRecord::Apply(entry) => tx.apply(entry)?,
                WalRecord::TruncateAfter(seq) => tx.truncate_after(seq)?,
                WalRecord::Trim(seq) => tx.trim(seq),
            }
        }
    }
    drop(lower);
    let mut layer = layers.active;
    layer.state.wal_batch = layer.state.wal_batch.max(newest);
    write_layer(db, &layer)?;
    tracing::info!(last = ?layer.state.last, "write-ahead log replayed");
    Ok(layer.state)
}

/// What the layers know of a key or log entry: its newest state, or nothing, so that
/// redb has it.
enum Seen<T> {
    Here(T),
    Below,
}

/// A key's slot and its newest value and version, `None` once removed.
type KeyChange = (Slot, Option<(Position, Bytes)>);

/// Changes not yet written to redb, from one stretch of time.
#[derive(Default)]
struct Layer {
    /// The newest value of every key changed here, `None` once removed.
    kv: HashMap<Bytes, KeyChange>,
    /// Log entries stored here, `None` for one a truncation removed.
    log: BTreeMap<u64, Option<StoredEntry>>,
    /// Log entries up to this seq were trimmed (0: none).
    trimmed: u64,
    /// Everything beneath this layer is gone: a snapshot install began here.
    wiped: bool,
    /// A snapshot install began (`Some(true)`) or finished (`Some(false)`) here.
    snapshot_partial: Option<bool>,
    /// The log state after this layer's changes.
    state: LogState,
    /// Whether it holds any change at all.
    dirty: bool,
}

impl Layer {
    /// Discards every key and log entry, here and beneath, keeping the epoch: a snapshot
    /// install begins (`partial`), or one that never ended is given up.
    fn wipe(&mut self, partial: bool) {
        self.dirty = true;
        self.kv.clear();
        self.log.clear();
        self.wiped = true;
        self.snapshot_partial = Some(partial);
        self.state = self.state.emptied();
    }
}

/// The writer's layer, and the one before it while the flusher writes it to redb.
struct Layers {
    active: Layer,
    frozen: Option<Arc<Layer>>,
}

impl Layers {
    fn new(state: LogState) -> Layers {
        Layers {
            active: Layer {
                state,
                ..Layer::default()
            },
            frozen: None,
        }
    }

    /// Newest first.
    fn each(&self) -> impl Iterator<Item = &Layer> {
        std::iter::once(&self.active).chain(self.frozen.as_deref())
    }

    fn key(&self, key: &[u8]) -> Seen<Option<(Position, Bytes)>> {
        for layer in self.each() {
            if let Some((_, found)) = layer.kv.get(key) {
                return Seen::Here(found.clone());
            }
            if layer.wiped {
                return Seen::Here(None);
            }
        }
        Seen::Below
    }

    fn entry(&self, seq: u64) -> Seen<Option<&StoredEntry>> {
        for layer in self.each() {
            if let Some(found) = layer.log.get(&seq) {
                return Seen::Here(found.as_ref());
            }
            if seq <= layer.trimmed || layer.wiped {
                return Seen::Here(None);
            }
        }
        Seen::Below
    }

    /// Every key the layers hold with its newest change (sharing, not copying, the bytes),
    /// and whether they hide all of redb.
    fn all_keys(&self) -> (HashMap<Bytes, KeyChange>, bool) {
        let mut out = HashMap::new();
        for layer in self.each() {
            for (key, change) in &layer.kv {
                out.entry(key.clone()).or_insert_with(|| change.clone());
            }
            if layer.wiped {
                return (out, true);
            }
        }
        (out, false)
    }
}

/// Writes a frozen layer to redb in one durable transaction.
fn write_layer(db: &Database, layer: &Layer) -> Result<(), StoreError> {
    let mut txn = db.begin_write()?;
    txn.set_durability(Durability::Immediate)?;
    {
        let mut kv = txn.open_table(KV)?;
        let mut log = txn.open_table(LOG)?;
        let mut meta = txn.open_table(META)?;
        if layer.wiped {
            kv.retain(|_, _| false)?;
            log.retain(|_, _| false)?;
        }
        if layer.trimmed > 0 {
            log.retain_in(..=layer.trimmed, |_, _| false)?;
        }
        // In table order: neighbouring inserts then touch the same pages.
        let mut keys: Vec<_> = layer
            .kv
            .iter()
            .map(|(key, (slot, found))| (kv_key(*slot, key), found))
            .collect();
        keys.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        for (at, found) in keys {
            match found {
                Some((version, value)) => {
                    kv.insert(at, encode_value(*version, value).as_slice())?;
                }
                None => {
                    kv.remove(at)?;
                }
            }
        }
        for (seq, found) in &layer.log {
            match found {
                Some(stored) => {
                    let raw =
                        postcard::to_stdvec(stored).map_err(|e| StoreError::Io(e.to_string()))?;
                    log.insert(*seq, raw.as_slice())?;
                }
                None => {
                    log.remove(*seq)?;
                }
            }
        }
        match layer.snapshot_partial {
            Some(true) => drop(meta.insert(META_SNAPSHOT_PARTIAL, [1u8].as_slice())?),
            Some(false) => drop(meta.remove(META_SNAPSHOT_PARTIAL)?),
            None => {}
        }
        meta.insert(META_STATE, layer.state.encode().as_slice())?;
    }
    txn.commit()?;
    Ok(())
}

/// The flusher thread: writes each frozen layer to redb, then tells the writer. A failed
/// write stops the process: redb refuses every later write once one failed, and the
/// layer's batches are safe in their log file for the restart to replay.
fn flusher(db: &Database, frozen: std_mpsc::Receiver<Arc<Layer>>, done: std_mpsc::Sender<()>) {
    while let Ok(layer) = frozen.recv() {
        if let Err(e) = write_layer(db, &layer) {
            stop("writing changes to the database failed", &e);
        }
        if done.send(()).is_err() {
            return;
        }
    }
}

/// redb as the writer reads it beneath its layers.
struct Lower {
    kv: redb::ReadOnlyTable<(u32, &'static [u8]), &'static [u8]>,
    log: redb::ReadOnlyTable<u64, &'static [u8]>,
}

impl Lower {
    fn open(db: &Database) -> Result<Lower, StoreError> {
        let txn = db.begin_read()?;
        Ok(Lower {
            kv: txn.open_table(KV)?,
            log: txn.open_table(LOG)?,
        })
    }

    fn get(&self, slot: Slot, key: &[u8]) -> Option<(Position, Bytes)> {
        kv_get(&self.kv, slot, key).unwrap_or_else(|e| stop(READ_FAILED, &e))
    }

    fn entry(&self, seq: u64) -> Option<StoredEntry> {
        log_get(&self.log, seq).unwrap_or_else(|e| stop(READ_FAILED, &e))
    }
}

/// Why the writer stops when it cannot read redb: it may be halfway through a change it
/// cannot take back.
const READ_FAILED: &str = "reading the database failed while applying changes";

/// Stops the process after a failure storage cannot recover from in place; a restart
/// replays the write-ahead log, which still holds every acknowledged change.
fn stop(what: &str, e: &StoreError) -> ! {
    tracing::error!(error = %e, "{what}; stopping");
    std::process::abort();
}

/// Stops the process when the flusher thread is gone: a frozen layer's batches must stay
/// in their log file until redb holds them, and without a flusher it never will.
fn flusher_gone() -> ! {
    tracing::error!("the flusher thread is gone; stopping");
    std::process::abort();
}

struct Writer {
    db: Arc<Database>,
    layers: Arc<RwLock<Layers>>,
    /// redb as of the frozen layer's start, until the flusher has written that layer.
    lower: Option<Lower>,
    to_flusher: std_mpsc::Sender<Arc<Layer>>,
    flushed: std_mpsc::Receiver<()>,
    /// A frozen layer is being written.
    flushing: bool,
    published: watch::Sender<LogState>,
    /// Moves as soon as a batch is visible to readers, before its log sync.
    staged: watch::Sender<LogState>,
    observer: Arc<dyn CommitObserver>,
    wal: Wal,
    /// When the active layer began.
    active_since: Instant,
    installs: Installs,
    /// Who asked the store to close: answered once this thread has let go of redb.
    closing: Vec<oneshot::Sender<Result<(), StoreError>>>,
}

/// The snapshot install under way. Two leaders' streams may reach a replica at once (the
/// older one not yet told it was deposed): only the latest install, and only while no
/// higher epoch has been seen, may write.
#[derive(Default)]
struct Installs {
    started: u64,
    current: Option<(u64, u64)>,
    /// The last install given up before its end, with its epoch.
    abandoned: Option<(u64, u64)>,
}

impl Installs {
    /// Starts an install for the leader at `epoch`; returns its number.
    fn begin(&mut self, epoch: u64) -> u64 {
        self.started += 1;
        self.current = Some((self.started, epoch));
        self.started
    }

    /// Whether install `id` may still write, the replica being at epoch `now`.
    fn check(&self, id: u64, now: u64) -> Result<(), StoreError> {
        // One given up for a higher epoch is answered as if it were still under way: its
        // sender learns it was deposed.
        let given_up = self
            .abandoned
            .filter(|&(gone, epoch)| gone == id && epoch < now);
        match self.current.or(given_up) {
            Some((current, epoch)) if current == id && epoch == now => Ok(()),
            Some((current, epoch)) if current == id => Err(StoreError::StaleEpoch {
                request: epoch,
                current: now,
            }),
            _ => Err(StoreError::BadSnapshot(
                "a newer snapshot install replaced this one".into(),
            )),
        }
    }
}

/// A reply owed once the batch is durable.
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
    fn send(self, state: LogState) {
        match self {
            Reply::Write(tx, r) => drop(tx.send(r)),
            Reply::Append(tx, r) => drop(tx.send(r)),
            Reply::Epoch(tx, r) => drop(tx.send(r)),
            Reply::Unit(tx, r) => drop(tx.send(r)),
            Reply::State(tx) => drop(tx.send(Ok(state))),
        }
    }
}

impl Writer {
    fn run(mut self, rx: std_mpsc::Receiver<Command>, flusher: std::thread::JoinHandle<()>) {
        while self.closing.is_empty()
            && let Ok(first) = rx.recv()
        {
            let mut bytes = first.wal_estimate();
            let mut batch = vec![first];
            // Requests come in bursts (a connection's frames are dispatched together); let
            // the rest of the burst arrive so it shares this commit, for as long as it
            // keeps arriving.
            for _ in 0..GATHER_ROUNDS {
                std::thread::yield_now();
                let before = batch.len();
                while batch.len() < MAX_BATCH && bytes < MAX_BATCH_BYTES {
                    match rx.try_recv() {
                        Ok(cmd) => {
                            bytes += cmd.wal_estimate();
                            batch.push(cmd);
                        }
                        Err(_) => break,
                    }
                }
                if batch.len() == before {
                    break;
                }
            }
            let started = Instant::now();
            let n = batch.len();
            let state = self.commit(batch);
            let took = started.elapsed();
            self.observer.committed(n, took.as_secs_f64());
            if took >= SLOW_COMMIT {
                // Every write on this replica waited this long; say why it was slow.
                tracing::warn!(
                    ms = took.as_millis() as u64,
                    requests = n,
                    flushing = self.flushing,
                    wal_bytes = self.wal.len(),
                    "slow group commit"
                );
            }
            tracing::trace!(?state, "committed");
        }
        // Every handle is gone, or the store is closing: leave nothing to replay.
        self.drain();
        let closing = std::mem::take(&mut self.closing);
        // The database closes cleanly only once no thread holds it: this one lets go of
        // its handle and read transaction, and the flusher ends with its queue.
        drop(self);
        if flusher.join().is_err() {
            tracing::error!("the flusher thread panicked");
        }
        for reply in closing {
            let _ = reply.send(Ok(()));
        }
    }

    /// Applies a batch, makes it durable and answers its requests; returns the state.
    fn commit(&mut self, batch: Vec<Command>) -> LogState {
        if self.ends_install(&batch) {
            self.abandon_install();
        }
        // Changes that are not in the write-ahead log (a snapshot's data) are made durable
        // by writing everything to redb, before and after them.
        let durable_in_redb = batch.iter().any(Command::needs_checkpoint);
        if durable_in_redb {
            self.drain();
        } else {
            // The batch's frame size is not known yet; its keys and values bound it.
            self.maybe_freeze(batch.iter().map(Command::wal_estimate).sum());
        }
        let (records, replies, state) = self.apply(batch);
        self.staged.send_replace(state);
        if durable_in_redb {
            self.drain();
        } else if !records.is_empty() {
            let logged = self.wal.append(&WalBatch {
                number: state.wal_batch,
                records,
            });
            if let Err(e) = logged {
                // Readers may have seen changes the log does not hold: carrying on could
                // acknowledge a write that a crash loses. Stop; a restart replays what did
                // reach the disk.
                tracing::error!(error = %e, path = %self.wal.path().display(), "write-ahead log failed; stopping");
                std::process::abort();
            }
        }
        self.published.send_replace(state);
        for r in replies {
            r.send(state);
        }
        state
    }

    /// Whether `batch` means the install under way will never end: entries from a
    /// leader at its epoch or a newer one, streamed from its log instead; or an epoch
    /// above the install's, at which its chunks and end are refused. A replica promoted
    /// then must not serve, nor take writes on, half a snapshot that a restart discards
    /// with every write made since.
    fn ends_install(&self, batch: &[Command]) -> bool {
        let Some((_, install)) = self.installs.current else {
            return false;
        };
        let current = self.layers.read().unwrap().active.state.epoch;
        // Raised in the batch that began it: nothing abandoned it then.
        install < current
            || batch.iter().any(|c| match c {
                Command::Append { epoch, .. } => *epoch >= current,
                Command::RaiseEpoch { epoch, .. } => *epoch > install,
                _ => false,
            })
    }

    /// Drops what an install that never ended (its sender died or was deposed) stored: the
    /// records of a snapshot that may hold writes never committed, under a log that says
    /// empty. Entries a leader streams next start from that empty log and must not land
    /// on them. The wipe is durable, and the install no longer marked partial, before
    /// any entry is applied: once this replica acknowledges entries, a restart must not
    /// discard them as half of a snapshot.
    fn abandon_install(&mut self) {
        tracing::warn!("a snapshot install never ended; discarding what it stored");
        self.installs.abandoned = self.installs.current.take();
        // Nothing frozen below: the wipe then covers everything.
        self.drain();
        self.layers.write().unwrap().active.wipe(false);
        self.drain();
    }

    /// Runs a batch's commands against the active layer. Replies are collected, not
    /// sent, so nobody hears "done" before the fsync.
    fn apply(&mut self, batch: Vec<Command>) -> (Vec<WalRecord>, Vec<Reply>, LogState) {
        let mut replies = Vec::with_capacity(batch.len());
        if self.lower.is_none() {
            self.lower = Some(Lower::open(&self.db).unwrap_or_else(|e| stop(READ_FAILED, &e)));
        }
        let mut layers = self.layers.write().unwrap();
        let mut tx = Tx {
            layers: &mut layers,
            lower: self.lower.as_ref().expect("opened above"),
            wal: Vec::new(),
        };
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
                    // Only the install's own sender leads at its epoch; a write here would
                    // land on half a snapshot.
                    let r = match self.installs.current {
                        Some(_) if epoch == tx.st().epoch => Err(StoreError::Installing),
                        _ => tx.client_write(epoch, slot, key, op, cond),
                    };
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
                Command::Trim { upto } => tx.trim(upto),
                Command::SnapshotBegin { epoch, reply } => {
                    let r = tx.raise_epoch(epoch).map(|()| {
                        tx.changed().wipe(true);
                        self.installs.begin(epoch)
                    });
                    replies.push(Reply::Epoch(reply, r));
                }
                Command::SnapshotChunk {
                    install,
                    records,
                    reply,
                } => {
                    let r = self.installs.check(install, tx.st().epoch).map(|()| {
                        for r in records {
                            let before = tx.current(r.slot, &r.key);
                            tx.set_kv(r.slot, r.key, &before, Some((r.version, r.value)));
                        }
                    });
                    replies.push(Reply::Unit(reply, r));
                }
                Command::SnapshotEnd { install, at, reply } => {
                    match self.installs.check(install, tx.st().epoch) {
                        Ok(()) => {
                            self.installs.current = None;
                            let layer = tx.changed();
                            layer.snapshot_partial = Some(false);
                            layer.state.last = at;
                            layer.state.base = at;
                            replies.push(Reply::State(reply));
                        }
                        // Refused before anything changed: no need to wait for the sync.
                        Err(e) => drop(reply.send(Err(e))),
                    }
                }
                Command::Checkpoint { reply } => replies.push(Reply::Unit(reply, Ok(()))),
                Command::Close { reply } => self.closing.push(reply),
            }
        }
        let records = std::mem::take(&mut tx.wal);
        if !records.is_empty() {
            layers.active.state.wal_batch += 1;
        }
        (records, replies, layers.active.state)
    }

    /// Freezes the active layer when it is due, or when the write-ahead-log file has no
    /// room left for a batch of `estimate` bytes.
    fn maybe_freeze(&mut self, estimate: u64) {
        self.collect_flushed(false);
        let full = !self.wal.has_room(estimate);
        let due = full || self.active_since.elapsed() >= FLUSH_EVERY;
        if !due {
            return;
        }
        if !self.layers.read().unwrap().active.dirty {
            // Idle until now: the layer starts with this batch, rather than being frozen
            // and flushed with this batch alone.
            self.active_since = Instant::now();
            return;
        }
        if self.flushing {
            if !full {
                return;
            }
            // The other log file still holds the frozen layer's batches.
            self.collect_flushed(true);
        }
        self.freeze();
    }

    /// Hands the active layer to the flusher; the next batch goes to the other log file.
    fn freeze(&mut self) {
        debug_assert!(!self.flushing);
        let layer = {
            let mut layers = self.layers.write().unwrap();
            let next = Layers::new(layers.active.state).active;
            let layer = Arc::new(std::mem::replace(&mut layers.active, next));
            layers.frozen = Some(layer.clone());
            layer
        };
        self.wal.switch();
        self.active_since = Instant::now();
        if self.to_flusher.send(layer).is_err() {
            flusher_gone();
        }
        self.flushing = true;
    }

    /// Drops the frozen layer once the flusher has written it (waiting for that if
    /// `wait`).
    fn collect_flushed(&mut self, wait: bool) {
        if !self.flushing {
            return;
        }
        let received = if wait {
            self.flushed
                .recv()
                .map_err(|_| std_mpsc::TryRecvError::Disconnected)
        } else {
            self.flushed.try_recv()
        };
        match received {
            Ok(()) => {
                self.layers.write().unwrap().frozen = None;
                self.lower = None;
                self.flushing = false;
            }
            Err(std_mpsc::TryRecvError::Empty) => {}
            Err(std_mpsc::TryRecvError::Disconnected) => flusher_gone(),
        }
    }

    /// Writes every change to redb and waits until it is durable there.
    fn drain(&mut self) {
        self.collect_flushed(true);
        if self.layers.read().unwrap().active.dirty {
            self.freeze();
            self.collect_flushed(true);
        }
    }
}

/// The writer's view of one batch: the active layer it changes, over the frozen layer
/// and redb.
struct Tx<'a> {
    layers: &'a mut Layers,
    lower: &'a Lower,
    /// What this batch did, for the write-ahead log.
    wal: Vec<WalRecord>,
}

impl Tx<'_> {
    fn st(&self) -> &LogState {
        &self.layers.active.state
    }

    /// The active layer, to change it.
    fn changed(&mut self) -> &mut Layer {
        self.layers.active.dirty = true;
        &mut self.layers.active
    }

    /// Refuses an epoch below the highest seen; otherwise makes it the highest seen.
    fn raise_epoch(&mut self, epoch: u64) -> Result<(), StoreError> {
        let current = self.st().epoch;
        if epoch < current {
            return Err(StoreError::StaleEpoch {
                request: epoch,
                current,
            });
        }
        if epoch > current {
            self.changed().state.epoch = epoch;
            self.wal.push(WalRecord::Epoch(epoch));
        }
        Ok(())
    }

    fn current(&self, slot: Slot, key: &[u8]) -> Option<(Position, Bytes)> {
        match self.layers.key(key) {
            Seen::Here(found) => found,
            Seen::Below => self.lower.get(slot, key),
        }
    }

    fn entry(&self, seq: u64) -> Option<StoredEntry> {
        match self.layers.entry(seq) {
            Seen::Here(found) => found.cloned(),
            Seen::Below => self.lower.entry(seq),
        }
    }

    /// Replaces a key's value `old` (as read) with `new`, keeping count and digest.
    fn set_kv(
        &mut self,
        slot: Slot,
        key: Bytes,
        old: &Option<(Position, Bytes)>,
        new: Option<(Position, Bytes)>,
    ) {
        let layer = self.changed();
        if let Some((version, value)) = old {
            layer.state.digest ^= record_hash(slot, &key, *version, value);
            layer.state.keys -= 1;
        }
        if let Some((version, value)) = &new {
            layer.state.digest ^= record_hash(slot, &key, *version, value);
            layer.state.keys += 1;
        }
        layer.kv.insert(key, (slot, new));
    }

    /// Appends one entry to the log and applies it, keeping the before-image.
    fn apply(&mut self, entry: LogEntry) -> Result<(), StoreError> {
        let before = self.current(entry.slot, &entry.key);
        self.apply_over(entry, before)
    }

    /// [`Tx::apply`] of an entry whose key now holds `before`.
    fn apply_over(
        &mut self,
        entry: LogEntry,
        before: Option<(Position, Bytes)>,
    ) -> Result<(), StoreError> {
        let last = self.st().last.seq;
        if entry.seq != last + 1 {
            return Err(StoreError::Io(format!(
                "refusing a log gap: entry {} after {last}",
                entry.seq
            )));
        }
        // Copies: the layer holds them for a while, and a request's bytes may share an
        // allocation with a whole read buffer.
        let entry = LogEntry {
            key: Bytes::copy_from_slice(&entry.key),
            op: match entry.op {
                Op::Put(value) => Op::Put(Bytes::copy_from_slice(&value)),
                Op::Delete => Op::Delete,
            },
            ..entry
        };
        let new = match &entry.op {
            Op::Put(value) => Some((entry.position(), value.clone())),
            Op::Delete => None,
        };
        self.set_kv(entry.slot, entry.key.clone(), &before, new);
        self.wal.push(WalRecord::Apply(entry.clone()));
        let layer = self.changed();
        layer.state.last = entry.position();
        layer
            .log
            .insert(entry.seq, Some(StoredEntry { entry, before }));
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
        let st = *self.st();
        if epoch != st.epoch {
            return Err(StoreError::StaleEpoch {
                request: epoch,
                current: st.epoch,
            });
        }
        let before = self.current(slot, &key);
        let current = before.as_ref().map(|(version, _)| *version);
        // Taken here, with the check: once the caller looks, a new leader's entries may
        // have cut this log back, and a refusal decided on entries no longer in it would
        // seem to wait only for ones committed long ago.
        let as_of = st.last.seq;
        let failed = StoreError::PreconditionFailed { as_of };
        match (cond, current) {
            (Condition::IfMatch(want), Some(have)) if want == have => {}
            (Condition::IfMatch(_), _) => return Err(failed),
            (Condition::IfAbsent, Some(_)) => return Err(failed),
            (Condition::IfExists, None) => return Err(failed),
            _ => {}
        }
        if op == Op::Delete && current.is_none() {
            return Err(StoreError::NotFound { as_of });
        }
        let version = Position::new(epoch, st.last.seq + 1);
        let entry = LogEntry {
            epoch,
            seq: version.seq,
            slot,
            key,
            op,
        };
        self.apply_over(entry, before)?;
        Ok(WriteOutcome {
            version,
            created: current.is_none(),
        })
    }

    fn epoch_at(&self, seq: u64) -> Option<u64> {
        let base = self.st().base;
        if seq == base.seq {
            return Some(base.epoch);
        }
        self.entry(seq).map(|s| s.entry.epoch)
    }

    fn append(
        &mut self,
        epoch: u64,
        prev: Position,
        entries: Vec<LogEntry>,
        leader_last: u64,
    ) -> Result<AppendOutcome, StoreError> {
        self.raise_epoch(epoch)?;
        // Checked before the log changes: an entry refused halfway would leave the
        // batch half applied.
        if let Some((place, bad)) = crate::replication::out_of_place(prev, epoch, &entries) {
            return Err(StoreError::Io(format!(
                "refusing entries that do not follow {} one by one within epoch {epoch}: \
                 entry {}-{} at place {place}",
                prev.seq, bad.epoch, bad.seq
            )));
        }
        let positions: Vec<Position> = entries.iter().map(LogEntry::position).collect();
        let plan =
            crate::replication::plan_append(&TxLog(self), epoch, prev, &positions, leader_last)?;
        match plan {
            crate::replication::AppendPlan::Mismatch { conflict } => Ok(AppendOutcome::Mismatch {
                last: self.st().last,
                conflict,
            }),
            crate::replication::AppendPlan::Diverged => Ok(AppendOutcome::Diverged {
                base: self.st().base,
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
                Ok(AppendOutcome::Appended {
                    last: self.st().last,
                })
            }
        }
    }

    /// Undoes and removes every entry after `after`, newest first.
    fn truncate_after(&mut self, after: u64) -> Result<(), StoreError> {
        let st = *self.st();
        if after < st.base.seq {
            return Err(StoreError::Io(format!(
                "cannot truncate to {after}: log starts after {}",
                st.base.seq
            )));
        }
        // Everything is read before anything changes: a missing entry refuses the whole.
        let doomed = (after + 1..=st.last.seq)
            .map(|seq| {
                self.entry(seq)
                    .ok_or_else(|| StoreError::Io(format!("log entry {seq} is missing")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let epoch = self.epoch_at(after).unwrap_or(0);
        tracing::warn!(
            from = after + 1,
            to = st.last.seq,
            "truncating a divergent log suffix"
        );
        for StoredEntry { entry, before } in doomed.into_iter().rev() {
            let now = self.current(entry.slot, &entry.key);
            self.set_kv(entry.slot, entry.key, &now, before);
            self.changed().log.insert(entry.seq, None);
        }
        self.changed().state.last = Position::new(epoch, after);
        self.wal.push(WalRecord::TruncateAfter(after));
        Ok(())
    }

    fn trim(&mut self, upto: u64) {
        let st = *self.st();
        let upto = upto.min(st.last.seq);
        if upto <= st.base.seq {
            return;
        }
        let epoch = self.epoch_at(upto).unwrap_or(st.base.epoch);
        let layer = self.changed();
        layer.log = layer.log.split_off(&(upto + 1));
        layer.trimmed = upto;
        layer.state.base = Position::new(epoch, upto);
        self.wal.push(WalRecord::Trim(upto));
    }
}

/// The log of an open transaction, as the pure append rules see it.
struct TxLog<'x, 'a>(&'x Tx<'a>);

impl crate::replication::LogIndex for TxLog<'_, '_> {
    type Error = StoreError;
    fn last(&self) -> Position {
        self.0.st().last
    }
    fn base(&self) -> Position {
        self.0.st().base
    }
    fn epoch_at(&self, seq: u64) -> Result<Option<u64>, StoreError> {
        Ok(self.0.epoch_at(seq))
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
    if !path.exists() {
        return Err(StoreError::Io(format!("no database at {}", path.display())));
    }
    // Read-only: a report must not change what it reports on (a writable open rewrites
    // the allocator state when it closes).
    let db = redb::ReadOnlyDatabase::open(&path).map_err(|e| match e {
        redb::DatabaseError::RepairAborted => StoreError::Io(
            "the replica did not shut down cleanly, and reading it needs a repair that \
             writes to it: start the replica once (it repairs and replays its log), stop \
             it, then inspect it"
                .into(),
        ),
        e => StoreError::from(e),
    })?;
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
        wal_bytes: size(&dir.join("wal.0")) + size(&dir.join("wal.1")),
        tables: vec![
            space("kv", kv.len()?, kv.stats()?),
            space("log", log.len()?, log.stats()?),
        ],
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_round_trip_with_their_version() {
        for (epoch, seq) in [
            (0, 0),
            (1, 127),
            (1, 128),
            (3, 333_360),
            (u64::MAX, u64::MAX),
        ] {
            let version = Position::new(epoch, seq);
            let raw = encode_value(version, b"value");
            assert_eq!(decode_value(&raw).unwrap(), (version, &b"value"[..]));
        }
        assert_eq!(encode_value(Position::new(1, 100_000), b"").len(), 1 + 3);
    }

    #[test]
    fn a_cut_or_overlong_version_is_corrupt_not_a_panic() {
        let raw = encode_value(Position::new(1, 1 << 40), b"");
        assert!(decode_value(&raw[..raw.len() - 1]).is_err());
        assert!(decode_value(&[0x80; 11]).is_err());
        assert!(decode_value(&[]).is_err());
    }

    /// A directory whose `kv` table is in the older format opens with every key, version
    /// and value as they were, and the maintained count and digest still match a scan.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_kv_table_in_the_older_format_is_converted_at_open() {
        let dir = tempfile::tempdir().unwrap();
        let keys: Vec<Bytes> = (0..500u32)
            .map(|i| Bytes::from(format!("key-{i:08}")))
            .collect();
        let store = Store::open(dir.path(), Arc::new(())).unwrap();
        store.raise_epoch(3).await.unwrap();
        for (i, key) in keys.iter().enumerate() {
            let value = Bytes::from(vec![i as u8; i % 50]);
            let slot = crate::slots::slot_for(key);
            let op = Op::Put(value);
            store
                .write(3, slot, key.clone(), op, Condition::None)
                .await
                .unwrap();
        }
        let before: Vec<_> = keys
            .iter()
            .map(|k| store.get(crate::slots::slot_for(k), k).unwrap())
            .collect();
        let state = store.state();
        store.checkpoint().await.unwrap();
        drop(store);

        // Rewrite the table as the older format kept it.
        let path = dir.path().join("distkv.redb");
        // The dropped store's threads may hold the database a moment longer.
        let deadline = Instant::now() + Duration::from_secs(10);
        let db = loop {
            match Database::open(&path) {
                Ok(db) => break db,
                Err(redb::DatabaseError::DatabaseAlreadyOpen) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(5))
                }
                Err(e) => panic!("{e}"),
            }
        };
        let txn = db.begin_write().unwrap();
        let rows: Vec<(u32, Vec<u8>, Vec<u8>)> = txn
            .open_table(KV)
            .unwrap()
            .iter()
            .unwrap()
            .map(|item| {
                let (k, v) = item.unwrap();
                let (at, key) = k.value();
                (at, key.to_vec(), v.value().to_vec())
            })
            .collect();
        assert_eq!(rows.len(), keys.len());
        txn.delete_table(KV).unwrap();
        {
            let mut old = txn.open_table(OLD_KV).unwrap();
            for (at, key, raw) in &rows {
                let (version, value) = decode_value(raw).unwrap();
                let mut v = version.epoch.to_le_bytes().to_vec();
                v.extend_from_slice(&version.seq.to_le_bytes());
                v.extend_from_slice(value);
                old.insert((kv_slot(*at), key.as_slice()), v.as_slice())
                    .unwrap();
            }
        }
        txn.commit().unwrap();
        drop(db);

        let store = Store::open(dir.path(), Arc::new(())).unwrap();
        assert_eq!(store.state(), state);
        let after: Vec<_> = keys
            .iter()
            .map(|k| store.get(crate::slots::slot_for(k), k).unwrap())
            .collect();
        assert_eq!(after, before);
        let scan = store.scan_digest().unwrap();
        assert_eq!((scan.keys, scan.digest), (state.keys, state.digest));
        // And it is the current format from now on: writes go on after a restart.
        let key = Bytes::from_static(b"after");
        let slot = crate::slots::slot_for(&key);
        let op = Op::Put(Bytes::from_static(b"v"));
        store
            .write(3, slot, key.clone(), op, Condition::None)
            .await
            .unwrap();
        assert!(store.get(slot, &key).unwrap().is_some());
    }

    #[test]
    fn table_keys_keep_the_slot_and_spread_keys_within_it() {
        use crate::slots::slot_for;
        let mut keys: Vec<Vec<u8>> = (0..1000u32)
            .flat_map(|i| [format!("key-{i:08}"), format!("{{user}}:{i:08}")])
            .map(String::into_bytes)
            .collect();
        keys.push(Vec::new());
        let mut stored: Vec<_> = keys.iter().map(|k| (kv_key(slot_for(k), k), k)).collect();
        for ((at, key), _) in &stored {
            assert_eq!(kv_slot(*at), slot_for(key));
        }
        stored.sort();
        assert!(
            stored
                .windows(2)
                .all(|w| kv_slot(w[0].0.0) <= kv_slot(w[1].0.0))
        );
        // The 1000 `{user}` keys share a slot. Written in ascending order, they must not
        // sit in that order in the table: that is what keeps redb's leaves full.
        let tagged: Vec<_> = stored
            .iter()
            .filter(|(_, k)| k.starts_with(b"{user}"))
            .collect();
        assert_eq!(tagged.len(), 1000);
        let ascending = tagged.windows(2).filter(|w| w[0].1 < w[1].1).count();
        assert!(
            (300..700).contains(&ascending),
            "{ascending} of 999 in key order"
        );
    }
}
