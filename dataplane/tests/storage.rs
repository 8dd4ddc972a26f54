//! Integration tests of `dataplane::storage::Store`, through its public API only: client
//! writes, their conditions and epoch fencing; the key count and digest the store maintains;
//! the replicated log (reads, `epoch_at`, trimming, follower appends, the undoing of a
//! divergent suffix); snapshot export and install; restarts after a checkpoint and after a
//! crash; concurrent writers and readers; large values; and `distkv inspect` on the
//! directory a store left.
//!
//! The tests assert behaviour, not how the store keeps its data. A crash is simulated by
//! copying every file of the data directory while the store runs, right after writes were
//! acknowledged, and opening the copy: whatever files the store keeps, each acknowledged
//! write must be in the copy.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use dataplane::replication::{NextStep, next_after_mismatch, step_from};
use dataplane::slots::slot_for;
use dataplane::storage::{
    AppendOutcome, Condition, LogEntry, LogState, Op, Position, SnapshotReader, SnapshotRecord,
    Store, StoreError, WriteOutcome,
};
use futures_util::future::join_all;
use tempfile::{TempDir, tempdir};

/// How long a test waits for something a store does in the background.
const PATIENCE: Duration = Duration::from_secs(10);

/// No limit on the bytes `read_log` returns.
const ANY_SIZE: usize = usize::MAX;

// ---------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------

/// Deterministic pseudo-random numbers (SplitMix64).
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A number in `0..n`.
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    /// True `percent` times out of a hundred.
    fn chance(&mut self, percent: usize) -> bool {
        self.below(100) < percent
    }

    fn bytes(&mut self, len: usize) -> Bytes {
        let mut out = Vec::with_capacity(len + 8);
        while out.len() < len {
            out.extend_from_slice(&self.next().to_le_bytes());
        }
        out.truncate(len);
        Bytes::from(out)
    }

    /// Random bytes, fewer than `max` of them.
    fn bytes_below(&mut self, max: usize) -> Bytes {
        let len = self.below(max);
        self.bytes(len)
    }
}

fn b(s: impl AsRef<[u8]>) -> Bytes {
    Bytes::copy_from_slice(s.as_ref())
}

fn show(key: &[u8]) -> String {
    String::from_utf8_lossy(key).into_owned()
}

/// Polls `done` every millisecond until it holds, failing the test after `limit`.
async fn wait_until(what: &str, limit: Duration, mut done: impl FnMut() -> bool) {
    let start = Instant::now();
    while !done() {
        assert!(start.elapsed() < limit, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// Opens the store in `dir`. The threads of a store whose handles were just dropped may
/// hold its database for a moment longer: an open refused for that is retried.
async fn open(dir: &Path) -> Store {
    let start = Instant::now();
    loop {
        let path = dir.to_path_buf();
        let opened = tokio::task::spawn_blocking(move || Store::open(&path, Arc::new(())))
            .await
            .unwrap();
        match opened {
            Ok(store) => return store,
            Err(StoreError::Io(msg))
                if msg.to_lowercase().contains("already open") && start.elapsed() < PATIENCE =>
            {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            Err(e) => panic!("opening the store in {}: {e}", dir.display()),
        }
    }
}

/// A new store in a new directory.
async fn fresh() -> (TempDir, Store) {
    let dir = tempdir().unwrap();
    let store = open(dir.path()).await;
    (dir, store)
}

/// A new store raised to `epoch`, as a replica becomes leader before it takes writes.
async fn leader(epoch: u64) -> (TempDir, Store) {
    let (dir, store) = fresh().await;
    assert_eq!(store.raise_epoch(epoch).await, Ok(epoch));
    (dir, store)
}

fn dir_of(store: &Store) -> PathBuf {
    store.path().parent().unwrap().to_path_buf()
}

/// Closes the store and drops the handle, which closes its database: no background work
/// on the directory remains.
async fn close(store: Store) {
    store.close().await.unwrap();
    drop(store);
}

/// A clean restart: checkpoint, drop the only handle, open the directory again.
async fn restart(store: Store) -> Store {
    let dir = dir_of(&store);
    close(store).await;
    open(&dir).await
}

/// Simulates a crash of the store running in `dir`: copies every file of the directory
/// to a new one, as it is at this moment. Log files (named `wal…`) are copied before
/// everything else: a flush to the database that lands between the two copies then only
/// makes the database copy newer than the log copies, never older than what they need.
async fn crash_copy(dir: &Path) -> TempDir {
    let from = dir.to_path_buf();
    tokio::task::spawn_blocking(move || {
        let to = tempdir().unwrap();
        copy_dir(&from, to.path());
        to
    })
    .await
    .unwrap()
}

fn copy_dir(from: &Path, to: &Path) {
    let mut paths: Vec<PathBuf> = std::fs::read_dir(from)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    let is_log = |p: &Path| p.file_name().unwrap().to_string_lossy().starts_with("wal");
    paths.sort_by_key(|p| (!is_log(p), p.clone()));
    for path in paths {
        let target = to.join(path.file_name().unwrap());
        if path.is_dir() {
            std::fs::create_dir(&target).unwrap();
            copy_dir(&path, &target);
            continue;
        }
        match std::fs::copy(&path, &target) {
            Ok(_) => {}
            // Removed since it was listed: what it held is elsewhere by now.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => panic!("copying {}: {e}", path.display()),
        }
    }
}

async fn write(
    store: &Store,
    epoch: u64,
    key: &[u8],
    op: Op,
    cond: Condition,
) -> Result<WriteOutcome, StoreError> {
    store.write(epoch, slot_for(key), b(key), op, cond).await
}

async fn put(store: &Store, epoch: u64, key: &[u8], value: impl Into<Bytes>) -> WriteOutcome {
    let op = Op::Put(value.into());
    write(store, epoch, key, op, Condition::None)
        .await
        .unwrap_or_else(|e| panic!("put {}: {e}", show(key)))
}

async fn del(store: &Store, epoch: u64, key: &[u8]) -> WriteOutcome {
    write(store, epoch, key, Op::Delete, Condition::None)
        .await
        .unwrap_or_else(|e| panic!("delete {}: {e}", show(key)))
}

fn get(store: &Store, key: &[u8]) -> Option<(Position, Bytes)> {
    store.get(slot_for(key), key).unwrap()
}

/// What each key should hold; `None` for a key that must be absent.
type Model = HashMap<Bytes, Option<(Position, Bytes)>>;

/// The parts of the log state that describe the data and the log: epoch, last, base, key
/// count, digest (not how the store keeps them).
fn data_state(s: &LogState) -> (u64, Position, Position, u64, u128) {
    (s.epoch, s.last, s.base, s.keys, s.digest)
}

/// The key count and digest the store maintains equal those of a full scan.
fn assert_digest_consistent(store: &Store) {
    let scan = store.scan_digest().unwrap();
    assert_eq!(
        (scan.keys, scan.digest),
        (scan.state.keys, scan.state.digest),
        "maintained key count and digest differ from a scan"
    );
}

/// Every key of `model` reads back as the model says, the store holds no other key, and
/// its maintained count and digest are right.
fn assert_matches(store: &Store, model: &Model) {
    for (key, want) in model {
        assert_eq!(get(store, key), *want, "key {}", show(key));
    }
    let present = model.values().filter(|v| v.is_some()).count() as u64;
    assert_eq!(store.state().keys, present, "number of keys");
    assert_digest_consistent(store);
}

/// Two replicas hold the same data: count, digest (maintained and scanned), the given
/// keys, and the log entries after the later base of the two.
fn assert_same_data<'k>(a: &Store, b: &Store, keys: impl IntoIterator<Item = &'k Bytes>) {
    let (sa, sb) = (a.state(), b.state());
    assert_eq!(
        (sa.keys, sa.digest),
        (sb.keys, sb.digest),
        "key count and digest"
    );
    let (scan_a, scan_b) = (a.scan_digest().unwrap(), b.scan_digest().unwrap());
    assert_eq!((scan_a.keys, scan_a.digest), (scan_b.keys, scan_b.digest));
    assert_digest_consistent(a);
    for key in keys {
        assert_eq!(get(a, key), get(b, key), "key {}", show(key));
    }
    assert_eq!(sa.last, sb.last, "end of the log");
    let from = sa.base.seq.max(sb.base.seq) + 1;
    assert_eq!(
        a.read_log(from, sa.last.seq, usize::MAX, ANY_SIZE).unwrap(),
        b.read_log(from, sb.last.seq, usize::MAX, ANY_SIZE).unwrap(),
        "log entries {from}.."
    );
}

/// 500 keys of several shapes: plain, binary, and hash-tagged ones that share slots.
fn key_set(n: usize) -> Vec<Bytes> {
    (0..n)
        .map(|i| match i % 5 {
            0 => b(format!("{{tag{}}}:field-{i}", i % 7)),
            1 => b([0xFF, i as u8, (i >> 8) as u8, 0, b'k']),
            _ => b(format!("key-{i}")),
        })
        .collect()
}

/// What a write of [`random_writes`] must come to.
#[derive(Debug)]
enum Expect {
    Ok {
        created: bool,
    },
    /// A failed condition.
    Failed,
    /// A delete of a missing key.
    Missing,
}

/// Runs `rounds` rounds of client writes at `epoch`. Each round writes up to 40 distinct
/// keys of `keys` at once (unconditional and conditional puts, overwrites and deletes,
/// and writes bound to fail), checks every outcome against `model`, and updates it. A
/// failed write must not use up a log position.
async fn random_writes(
    store: &Store,
    epoch: u64,
    keys: &[Bytes],
    model: &mut Model,
    rng: &mut Rng,
    rounds: usize,
) {
    for _ in 0..rounds {
        let mut chosen = HashSet::new();
        let n = 1 + rng.below(40.min(keys.len()));
        while chosen.len() < n {
            chosen.insert(rng.below(keys.len()));
        }
        let mut ops = Vec::new();
        for i in chosen {
            let key = keys[i].clone();
            let value = rng.bytes_below(100);
            let r = rng.below(100);
            let (op, cond, expect) = match model.get(&key).cloned().flatten() {
                Some((version, _)) => {
                    let wrong = Position::new(version.epoch, version.seq + 1 + rng.below(9) as u64);
                    match r {
                        0..35 => (
                            Op::Put(value),
                            Condition::None,
                            Expect::Ok { created: false },
                        ),
                        35..50 => (
                            Op::Put(value),
                            Condition::IfMatch(version),
                            Expect::Ok { created: false },
                        ),
                        50..55 => (Op::Put(value), Condition::IfMatch(wrong), Expect::Failed),
                        55..60 => (Op::Put(value), Condition::IfAbsent, Expect::Failed),
                        60..65 => (
                            Op::Put(value),
                            Condition::IfExists,
                            Expect::Ok { created: false },
                        ),
                        65..85 => (Op::Delete, Condition::None, Expect::Ok { created: false }),
                        _ => (
                            Op::Delete,
                            Condition::IfMatch(version),
                            Expect::Ok { created: false },
                        ),
                    }
                }
                None => match r {
                    0..50 => (
                        Op::Put(value),
                        Condition::None,
                        Expect::Ok { created: true },
                    ),
                    50..65 => (
                        Op::Put(value),
                        Condition::IfAbsent,
                        Expect::Ok { created: true },
                    ),
                    65..75 => (Op::Put(value), Condition::IfExists, Expect::Failed),
                    75..80 => (
                        Op::Put(value),
                        Condition::IfMatch(Position::new(epoch, 1)),
                        Expect::Failed,
                    ),
                    80..92 => (Op::Delete, Condition::None, Expect::Missing),
                    _ => (Op::Delete, Condition::IfExists, Expect::Failed),
                },
            };
            ops.push((key, op, cond, expect));
        }
        let before = store.state().last;
        let outcomes = join_all(
            ops.iter()
                .map(|(key, op, cond, _)| write(store, epoch, key, op.clone(), *cond)),
        )
        .await;
        let mut versions = Vec::new();
        for ((key, op, cond, expect), got) in ops.into_iter().zip(outcomes) {
            let what = format!("{op:?} {} if {cond:?}", show(&key));
            match (expect, got) {
                (Expect::Ok { created }, Ok(out)) => {
                    assert_eq!(out.created, created, "{what}: created");
                    assert_eq!(out.version.epoch, epoch, "{what}: version");
                    assert!(out.version > before, "{what}: version {:?}", out.version);
                    versions.push(out.version.seq);
                    let now = match op {
                        Op::Put(value) => Some((out.version, value)),
                        Op::Delete => None,
                    };
                    model.insert(key, now);
                }
                // Decided on the log as of the round's start or later: the refusals of a
                // round's writes may come between its successes.
                (Expect::Failed, Err(StoreError::PreconditionFailed { as_of }))
                | (Expect::Missing, Err(StoreError::NotFound { as_of })) => {
                    assert!(as_of >= before.seq, "{what}: decided as of {as_of}");
                }
                (Expect::Ok { .. }, Err(e)) => panic!("{what}: refused: {e}"),
                (want, got) => panic!("{what}: wanted {want:?}, got {got:?}"),
            }
        }
        // The successful writes took the positions right after the previous end, once each.
        versions.sort_unstable();
        let n = versions.len() as u64;
        assert_eq!(
            versions,
            (before.seq + 1..=before.seq + n).collect::<Vec<_>>()
        );
        assert_eq!(store.state().last.seq, before.seq + n);
    }
}

/// Exports a snapshot of `store` in chunks of about `chunk_bytes` (on a blocking thread,
/// as it must be); returns its position and the whole stream's chunks, its end last.
async fn export(store: &Store, chunk_bytes: usize) -> (Position, Vec<Bytes>) {
    let store = store.clone();
    tokio::task::spawn_blocking(move || {
        let mut chunks = Vec::new();
        let exported = store
            .export_snapshot(chunk_bytes, |chunk| {
                chunks.push(chunk);
                true
            })
            .unwrap();
        chunks.push(exported.end);
        (exported.at, chunks)
    })
    .await
    .unwrap()
}

/// Whether `r` is the refusal of a snapshot stream or install.
fn bad<T>(r: Result<T, StoreError>) -> bool {
    matches!(r, Err(StoreError::BadSnapshot(_)))
}

/// The records of a whole snapshot stream.
fn records_of(chunks: &[Bytes]) -> Vec<SnapshotRecord> {
    let mut reader = SnapshotReader::default();
    let records = reader.push(&chunks.concat()).unwrap();
    reader.finish().unwrap();
    records
}

/// Installs a snapshot stream into `store` as a follower receives it from the leader at
/// `epoch`: the stream arrives in pieces of `piece` bytes, which cut records anywhere.
async fn install(store: &Store, epoch: u64, chunks: &[Bytes], piece: usize) -> LogState {
    let stream = chunks.concat();
    let mut id = None;
    let mut reader = SnapshotReader::default();
    for part in stream.chunks(piece) {
        let records = reader.push(part).unwrap();
        if id.is_none() && reader.header().is_some() {
            id = Some(store.snapshot_begin(epoch).await.unwrap());
        }
        if !records.is_empty() {
            store.snapshot_chunk(id.unwrap(), records).await.unwrap();
        }
    }
    let at = reader.finish().expect("the stream arrived whole");
    let id = id.expect("begun at the header");
    let st = store.snapshot_end(id, at).await.unwrap();
    assert_eq!((st.last, st.base), (at, at));
    st
}

/// Brings `follower` level with `leader` as a leader does: entries after the end it
/// guesses the follower has, stepping back on a mismatch, and a snapshot once its log no
/// longer reaches back far enough or the follower's differs below its base. Returns how
/// many snapshots that took.
async fn replicate(leader: &Store, follower: &Store) -> usize {
    let epoch = leader.state().epoch;
    let mut snapshots = 0;
    let mut step = step_from(leader, leader.state().last.seq + 1);
    for _ in 0..100 {
        let last = leader.state().last;
        let next = match step {
            NextStep::From(next) => next,
            NextStep::Snapshot => {
                let (at, chunks) = export(leader, 4096).await;
                install(follower, epoch, &chunks, 1000).await;
                snapshots += 1;
                step = step_from(leader, at.seq + 1);
                continue;
            }
        };
        let prev_epoch = leader.epoch_at(next - 1).unwrap();
        let prev = Position::new(prev_epoch.expect("the leader holds prev"), next - 1);
        let entries = leader.read_log(next, last.seq, 64, ANY_SIZE).unwrap();
        match follower
            .append(epoch, prev, entries, last.seq)
            .await
            .unwrap()
        {
            AppendOutcome::Appended { last: theirs } if theirs == last => return snapshots,
            AppendOutcome::Appended { last: theirs } => step = step_from(leader, theirs.seq + 1),
            AppendOutcome::Mismatch {
                last: theirs,
                conflict,
            } => step = next_after_mismatch(leader, prev, theirs, conflict),
            AppendOutcome::Diverged { .. } => step = NextStep::Snapshot,
        }
    }
    panic!("the follower did not catch up");
}

/// Spawns `f` for each of `n` tasks and waits for them all; returns their results.
async fn spawn_all<T, F, Fut>(n: usize, f: F) -> Vec<T>
where
    T: Send + 'static,
    F: Fn(usize) -> Fut,
    Fut: Future<Output = T> + Send + 'static,
{
    let tasks: Vec<_> = (0..n).map(|i| tokio::spawn(f(i))).collect();
    let mut out = Vec::with_capacity(n);
    for t in tasks {
        out.push(t.await.expect("task panicked"));
    }
    out
}

// ---------------------------------------------------------------------------------------
// Client writes
// ---------------------------------------------------------------------------------------

#[test]
fn positions_order_by_epoch_then_seq_and_round_trip_as_etags() {
    assert!(Position::new(1, 100) < Position::new(2, 1));
    assert!(Position::new(2, 1) < Position::new(2, 2));
    let p = Position::new(7, 42);
    assert_eq!(p.etag(), "\"7-42\"");
    assert_eq!(Position::parse_etag(&p.etag()), Some(p));
    assert_eq!(Position::parse_etag("W/\"7-42\""), Some(p));
    assert_eq!(Position::parse_etag("7-42"), Some(p));
    assert_eq!(Position::parse_etag("\"7-\""), None);
    assert_eq!(Position::parse_etag("*"), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn put_get_overwrite_and_delete() {
    let (dir, store) = fresh().await;
    assert_eq!(store.path(), dir.path().join("distkv.redb"));
    assert_eq!(data_state(&store.state()), data_state(&LogState::default()));
    assert_eq!(get(&store, b"a"), None);
    assert_eq!(store.raise_epoch(3).await, Ok(3));
    let mut changes = store.subscribe();
    changes.mark_unchanged();

    let out = put(&store, 3, b"a", "one").await;
    assert_eq!(
        out,
        WriteOutcome {
            version: Position::new(3, 1),
            created: true
        }
    );
    assert!(changes.has_changed().unwrap(), "a commit wakes subscribers");
    // An acknowledged write is in the published state, and readers see it.
    assert_eq!(store.state().last, Position::new(3, 1));
    assert_eq!(get(&store, b"a"), Some((Position::new(3, 1), b("one"))));

    let out = put(&store, 3, b"a", "two").await;
    assert_eq!((out.version, out.created), (Position::new(3, 2), false));
    assert_eq!(get(&store, b"a"), Some((Position::new(3, 2), b("two"))));
    let out = put(&store, 3, b"b", "").await;
    assert_eq!((out.version, out.created), (Position::new(3, 3), true));
    assert_eq!(get(&store, b"b"), Some((Position::new(3, 3), Bytes::new())));
    assert_eq!(store.state().keys, 2);

    // A delete is a log entry too; its version is the tombstone's.
    let out = del(&store, 3, b"a").await;
    assert_eq!((out.version, out.created), (Position::new(3, 4), false));
    assert_eq!(get(&store, b"a"), None);
    let st = store.state();
    assert_eq!((st.last, st.keys), (Position::new(3, 4), 1));
    assert_eq!(store.staged(), st, "nothing is in flight");
    assert_digest_consistent(&store);

    // Deleting a missing key is refused and changes nothing.
    for key in [&b"a"[..], b"never"] {
        let r = write(&store, 3, key, Op::Delete, Condition::None).await;
        assert_eq!(r, Err(StoreError::NotFound { as_of: 4 }));
        assert_eq!(data_state(&store.state()), data_state(&st));
    }
    assert_eq!(store.read_log(5, 10, 10, ANY_SIZE).unwrap(), vec![]);

    // A deleted key can be created again; positions go on.
    let out = put(&store, 3, b"a", "three").await;
    assert_eq!((out.version, out.created), (Position::new(3, 5), true));
    assert_eq!(get(&store, b"a"), Some((Position::new(3, 5), b("three"))));
    assert_eq!(store.state().keys, 2);
    assert_digest_consistent(&store);
    close(store).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_conditions_change_nothing() {
    let (_dir, store) = leader(1).await;
    let v1 = put(&store, 1, b"k", "v1").await.version;
    let put_if = |cond| write(&store, 1, b"k", Op::Put(b("x")), cond);
    let missing_if = |op, cond| write(&store, 1, b"missing", op, cond);

    // Each of these is refused, and leaves the data and the log as they were.
    let st = store.state();
    let stale = Position::new(1, v1.seq + 1);
    let refused = [
        put_if(Condition::IfMatch(stale)).await,
        put_if(Condition::IfMatch(Position::new(0, v1.seq))).await,
        put_if(Condition::IfAbsent).await,
        write(&store, 1, b"k", Op::Delete, Condition::IfMatch(stale)).await,
        write(&store, 1, b"k", Op::Delete, Condition::IfAbsent).await,
        missing_if(Op::Put(b("x")), Condition::IfExists).await,
        missing_if(Op::Put(b("x")), Condition::IfMatch(v1)).await,
        missing_if(Op::Delete, Condition::IfExists).await,
        missing_if(Op::Delete, Condition::IfMatch(v1)).await,
    ];
    for (i, r) in refused.into_iter().enumerate() {
        let as_of = v1.seq;
        assert_eq!(r, Err(StoreError::PreconditionFailed { as_of }), "case {i}");
    }
    assert_eq!(data_state(&store.state()), data_state(&st));
    assert_eq!(get(&store, b"k"), Some((v1, b("v1"))));
    assert_eq!(get(&store, b"missing"), None);

    // And these hold.
    let out = put_if(Condition::IfMatch(v1)).await.unwrap();
    assert_eq!((out.version, out.created), (Position::new(1, 2), false));
    let out = put_if(Condition::IfExists).await.unwrap();
    assert_eq!((out.version, out.created), (Position::new(1, 3), false));
    let out = missing_if(Op::Put(b("m")), Condition::IfAbsent)
        .await
        .unwrap();
    assert_eq!((out.version, out.created), (Position::new(1, 4), true));
    // The old version no longer matches.
    assert_eq!(
        put_if(Condition::IfMatch(v1)).await,
        Err(StoreError::PreconditionFailed { as_of: 4 })
    );
    let now = get(&store, b"k").unwrap().0;
    assert_eq!(now, Position::new(1, 3));
    let out = write(&store, 1, b"k", Op::Delete, Condition::IfMatch(now))
        .await
        .unwrap();
    assert_eq!(out.version, Position::new(1, 5));
    assert_eq!(get(&store, b"k"), None);
    let out = missing_if(Op::Delete, Condition::IfExists).await.unwrap();
    assert_eq!(out.version, Position::new(1, 6));
    assert_eq!(store.state().keys, 0);
    assert_digest_consistent(&store);
    close(store).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conditional_writes_under_contention_have_one_winner() {
    let (_dir, store) = leader(1).await;

    // Twenty creators race to create one key: exactly one wins.
    let results = spawn_all(20, |t| {
        let store = store.clone();
        async move {
            let op = Op::Put(b(format!("owner-{t}")));
            write(&store, 1, b"lock", op, Condition::IfAbsent).await
        }
    })
    .await;
    let winners: Vec<usize> = (0..20).filter(|&t| results[t].is_ok()).collect();
    assert_eq!(winners.len(), 1, "{results:?}");
    for r in results.iter().filter(|r| r.is_err()) {
        assert!(
            matches!(r, Err(StoreError::PreconditionFailed { .. })),
            "{r:?}"
        );
    }
    let won = results[winners[0]].clone().unwrap();
    assert!(won.created);
    let owner = b(format!("owner-{}", winners[0]));
    assert_eq!(get(&store, b"lock"), Some((won.version, owner)));

    // Eight tasks increment a counter by compare-and-swap: no increment is lost.
    put(&store, 1, b"counter", "0").await;
    const TASKS: usize = 8;
    const EACH: usize = 25;
    let retries = spawn_all(TASKS, |_| {
        let store = store.clone();
        async move {
            let mut retries = 0;
            for _ in 0..EACH {
                loop {
                    let (version, value) = get(&store, b"counter").unwrap();
                    let n: usize = std::str::from_utf8(&value).unwrap().parse().unwrap();
                    let op = Op::Put(b((n + 1).to_string()));
                    match write(&store, 1, b"counter", op, Condition::IfMatch(version)).await {
                        Ok(_) => break,
                        Err(StoreError::PreconditionFailed { .. }) => retries += 1,
                        Err(e) => panic!("increment: {e}"),
                    }
                }
            }
            retries
        }
    })
    .await;
    let (version, value) = get(&store, b"counter").unwrap();
    assert_eq!(value, b((TASKS * EACH).to_string()));
    // Two writes before the counter, its creation, and one per increment; no failed
    // attempt took a position.
    assert_eq!(version.seq, 2 + (TASKS * EACH) as u64);
    assert_eq!(store.state().last, version);
    eprintln!(
        "compare-and-swap retries: {}",
        retries.iter().sum::<usize>()
    );
    assert_digest_consistent(&store);
    close(store).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_are_fenced_by_the_current_epoch() {
    let (dir, store) = fresh().await;
    // A replica takes writes at the epoch it was raised to (as a node does when it becomes
    // leader), and at no other.
    let stale = |request, current| StoreError::StaleEpoch { request, current };
    assert_eq!(put_result(&store, 1, b"k").await, Err(stale(1, 0)));
    assert_eq!(store.raise_epoch(2).await, Ok(2));
    assert_eq!(store.state().epoch, 2);
    assert_eq!(store.state().last, Position::default());
    assert_eq!(put_result(&store, 1, b"k").await, Err(stale(1, 2)));
    assert_eq!(put_result(&store, 3, b"k").await, Err(stale(3, 2)));
    assert_eq!(put(&store, 2, b"k", "v").await.version, Position::new(2, 1));
    assert_eq!(put(&store, 2, b"k", "w").await.version, Position::new(2, 2));

    // The epoch never goes down; raising to the current one is harmless.
    let st = store.state();
    assert_eq!(store.raise_epoch(1).await, Err(stale(1, 2)));
    assert_eq!(store.raise_epoch(2).await, Ok(2));
    assert_eq!(data_state(&store.state()), data_state(&st));
    // A refused write changes nothing either.
    assert_eq!(
        write(&store, 1, b"k", Op::Delete, Condition::None).await,
        Err(stale(1, 2))
    );
    assert_eq!(data_state(&store.state()), data_state(&st));

    // A new leader's versions go on from the end of the log, in its own epoch.
    assert_eq!(store.raise_epoch(5).await, Ok(5));
    assert_eq!(put_result(&store, 2, b"k").await, Err(stale(2, 5)));
    let out = put(&store, 5, b"k", "x").await;
    assert_eq!((out.version, out.created), (Position::new(5, 3), false));
    assert_eq!(store.epoch_at(2).unwrap(), Some(2));
    assert_eq!(store.epoch_at(3).unwrap(), Some(5));

    // Other requests carrying an old epoch are refused as well.
    let entries = store.read_log(3, 3, 1, ANY_SIZE).unwrap();
    assert_eq!(
        store.append(4, Position::new(2, 2), entries, 3).await,
        Err(stale(4, 5))
    );
    assert_eq!(store.snapshot_begin(4).await, Err(stale(4, 5)));
    assert_eq!(get(&store, b"k"), Some((Position::new(5, 3), b("x"))));

    // The epoch is durable: a raise alone survives a crash, and a restart.
    assert_eq!(store.raise_epoch(7).await, Ok(7));
    let copy = crash_copy(dir.path()).await;
    let copied = open(copy.path()).await;
    assert_eq!(copied.state().epoch, 7);
    assert_eq!(put_result(&copied, 5, b"k").await, Err(stale(5, 7)));
    close(copied).await;
    let store = restart(store).await;
    assert_eq!(store.state().epoch, 7);
    assert_eq!(put(&store, 7, b"k", "y").await.version, Position::new(7, 4));
    close(store).await;
}

async fn put_result(store: &Store, epoch: u64, key: &[u8]) -> Result<WriteOutcome, StoreError> {
    write(store, epoch, key, Op::Put(b("value")), Condition::None).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_count_and_digest_follow_a_random_workload() {
    let (_dir, store) = leader(1).await;
    let keys = key_set(500);
    let mut model = Model::new();
    let mut rng = Rng::new(1);
    for _ in 0..6 {
        random_writes(&store, 1, &keys, &mut model, &mut rng, 25).await;
        assert_matches(&store, &model);
    }
    // A new epoch goes on over the same data.
    store.raise_epoch(2).await.unwrap();
    random_writes(&store, 2, &keys, &mut model, &mut rng, 25).await;
    assert_matches(&store, &model);
    assert!(store.state().keys > 100, "the workload leaves many keys");
    assert!(
        model.values().filter(|v| v.is_none()).count() > 50,
        "and deletes many"
    );
    // A store that ends up empty has digest 0.
    for key in &keys {
        if model.get(key).is_some_and(Option::is_some) {
            del(&store, 2, key).await;
        }
    }
    assert_eq!((store.state().keys, store.state().digest), (0, 0));
    assert_digest_consistent(&store);
    close(store).await;
}

// ---------------------------------------------------------------------------------------
// The log
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_log_epoch_at_and_trim() {
    let (dir, store) = leader(1).await;
    // Seqs 1..=5 at epoch 1, 6..=10 at epoch 2, seq 7 a delete.
    let mut written = Vec::new();
    for seq in 1..=10u64 {
        if seq == 6 {
            store.raise_epoch(2).await.unwrap();
        }
        let epoch = if seq <= 5 { 1 } else { 2 };
        let key = b(format!("k{}", seq % 4));
        let op = match seq {
            7 => Op::Delete,
            _ => Op::Put(b(format!("v{seq}"))),
        };
        let out = write(&store, epoch, &key, op.clone(), Condition::None)
            .await
            .unwrap();
        assert_eq!(out.version, Position::new(epoch, seq));
        let slot = slot_for(&key);
        written.push(LogEntry {
            epoch,
            seq,
            slot,
            key,
            op,
        });
    }
    let log = |from, upto, n, bytes| store.read_log(from, upto, n, bytes).unwrap();
    assert_eq!(log(1, 10, 100, ANY_SIZE), written);
    assert_eq!(log(3, 6, 100, ANY_SIZE), written[2..6]);
    assert_eq!(log(1, 10, 3, ANY_SIZE), written[..3]);
    assert_eq!(
        log(1, 10, 100, 1),
        written[..1],
        "a size limit still returns one"
    );
    // Each of these entries counts 36 bytes (32 plus a 2-byte key and value).
    assert_eq!(
        log(1, 10, 100, 4 * 36 - 1),
        written[..3],
        "a batch stays within its byte budget"
    );
    assert_eq!(log(9, 20, 100, ANY_SIZE), written[8..], "stops at the end");
    assert!(log(11, 20, 100, ANY_SIZE).is_empty());
    assert!(log(5, 4, 100, ANY_SIZE).is_empty());
    assert_eq!(written[0].position(), Position::new(1, 1));
    let epoch_at = |seq| store.epoch_at(seq).unwrap();
    assert_eq!(epoch_at(0), Some(0), "the empty start of the log");
    assert_eq!(epoch_at(5), Some(1));
    assert_eq!(epoch_at(6), Some(2));
    assert_eq!(epoch_at(10), Some(2));
    assert_eq!(epoch_at(11), None);

    let data = |s: &Store| (s.state().keys, s.state().digest);
    let before = data(&store);
    // Trim is fire-and-forget; a later request of the same store is handled after it.
    store.trim(4);
    store.checkpoint().await.unwrap();
    assert_eq!(store.state().base, Position::new(1, 4));
    assert_eq!(data(&store), before, "trimming drops log entries, not data");
    assert!(log(1, 10, 100, ANY_SIZE).iter().all(|e| e.seq > 4));
    assert_eq!(log(5, 10, 100, ANY_SIZE), written[4..]);
    assert_eq!(epoch_at(4), Some(1), "the base's epoch is kept");
    assert_eq!(epoch_at(3), None);
    assert_eq!(get(&store, b"k1"), Some((Position::new(2, 9), b("v9"))));

    // Trimming below the base does nothing; past the end stops at the end.
    store.trim(2);
    written.push(LogEntry {
        epoch: 2,
        seq: 11,
        slot: slot_for(b"k0"),
        key: b("k0"),
        op: Op::Put(b("v11")),
    });
    assert_eq!(
        put(&store, 2, b"k0", "v11").await.version,
        Position::new(2, 11)
    );
    assert_eq!(store.state().base, Position::new(1, 4));
    assert_eq!(log(5, 11, 100, ANY_SIZE), written[4..]);
    store.trim(100);
    assert_eq!(
        put(&store, 2, b"k0", "v12").await.version,
        Position::new(2, 12)
    );
    assert_eq!(store.state().base, Position::new(2, 11));
    assert!(log(5, 12, 100, ANY_SIZE).iter().all(|e| e.seq > 11));
    assert_eq!(log(12, 12, 1, ANY_SIZE).len(), 1);
    assert_eq!(epoch_at(11), Some(2));
    assert_eq!(epoch_at(12), Some(2));
    assert_digest_consistent(&store);

    // Base and log survive a crash and a restart.
    let copy = crash_copy(dir.path()).await;
    let copied = open(copy.path()).await;
    assert_same_data(&copied, &store, written.iter().map(|e| &e.key));
    assert_eq!(copied.state().base, Position::new(2, 11));
    close(copied).await;
    let wanted = data_state(&store.state());
    let store = restart(store).await;
    assert_eq!(data_state(&store.state()), wanted);
    assert_eq!(store.read_log(12, 12, 1, ANY_SIZE).unwrap()[0].seq, 12);
    close(store).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn follower_appends_in_order_and_refuses_mismatches() {
    let (_ld, lead) = leader(1).await;
    let keys: Vec<Bytes> = (0..4).map(|i| b(format!("k{i}"))).collect();
    for i in 0..6 {
        put(&lead, 1, &keys[i % 4], format!("v{i}")).await;
    }
    del(&lead, 1, &keys[1]).await;
    let e = lead.read_log(1, 7, 100, ANY_SIZE).unwrap();
    assert_eq!(e.len(), 7);
    let (_fd, fol) = fresh().await;
    let at = Position::new;
    let appended = |seq| Ok(AppendOutcome::Appended { last: at(1, seq) });

    assert_eq!(
        fol.append(1, at(0, 0), e[..3].to_vec(), 7).await,
        appended(3)
    );
    assert_eq!(fol.state().epoch, 1, "an append raises the epoch");
    let st = fol.state();

    // A gap: the follower lacks prev.
    assert_eq!(
        fol.append(1, at(1, 5), e[5..].to_vec(), 7).await,
        Ok(AppendOutcome::Mismatch {
            last: at(1, 3),
            conflict: None
        })
    );
    // prev is there under another epoch: the follower names the first seq it holds of
    // that epoch.
    assert_eq!(
        fol.append(1, at(0, 3), e[3..].to_vec(), 7).await,
        Ok(AppendOutcome::Mismatch {
            last: at(1, 3),
            conflict: Some(at(1, 1))
        })
    );
    // A batch with a hole in it, or an entry from a later epoch than its sender's, is
    // refused whole: nothing of it is applied.
    let holed = vec![e[3].clone(), e[4].clone(), e[6].clone()];
    let mut later = e[3..5].to_vec();
    later[1].epoch = 2;
    for bad in [holed, later] {
        assert!(matches!(
            fol.append(1, at(1, 3), bad, 7).await,
            Err(StoreError::Io(_))
        ));
        assert_eq!(data_state(&fol.state()), data_state(&st));
    }
    // A duplicate delivery.
    assert_eq!(
        fol.append(1, at(0, 0), e[..3].to_vec(), 7).await,
        appended(3)
    );
    assert_eq!(data_state(&fol.state()), data_state(&st));
    // An overlapping batch: what is held is skipped.
    assert_eq!(
        fol.append(1, at(1, 2), e[2..].to_vec(), 7).await,
        appended(7)
    );
    assert_same_data(&lead, &fol, &keys);
    assert_eq!(get(&fol, &keys[1]), None);
    assert_eq!(get(&fol, &keys[0]), Some((at(1, 5), b("v4"))));
    // An empty batch at the end is a heartbeat.
    assert_eq!(fol.append(1, at(1, 7), vec![], 7).await, appended(7));
    // A request from an older leader is refused.
    assert_eq!(
        fol.append(0, at(1, 7), vec![], 7).await,
        Err(StoreError::StaleEpoch {
            request: 0,
            current: 1
        })
    );
    // More writes on the leader follow.
    let mut model: Model = keys.iter().map(|k| (k.clone(), get(&lead, k))).collect();
    let mut rng = Rng::new(2);
    random_writes(&lead, 1, &keys, &mut model, &mut rng, 20).await;
    assert_eq!(replicate(&lead, &fol).await, 0);
    assert_same_data(&lead, &fol, &keys);
    close(lead).await;
    close(fol).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn append_undoes_a_divergent_suffix_of_a_deposed_leader() {
    let at = Position::new;
    let keys: Vec<Bytes> = (1..=10).map(|i| b(format!("k{i}"))).collect();
    let k = |i: usize| &keys[i - 1][..];
    // `old` leads at epoch 1; `new` follows it up to seq 4.
    let (old_dir, old) = leader(1).await;
    for i in 1..=4 {
        put(&old, 1, k(i), format!("v{i}")).await;
    }
    let (_new_dir, new) = fresh().await;
    let first = old.read_log(1, 4, 100, ANY_SIZE).unwrap();
    assert_eq!(
        new.append(1, at(0, 0), first, 4).await,
        Ok(AppendOutcome::Appended { last: at(1, 4) })
    );
    // Cut off, `old` goes on at epoch 1 (an overwrite, a delete, a new key) ...
    put(&old, 1, k(1), "old5").await;
    del(&old, 1, k(2)).await;
    put(&old, 1, k(9), "old7").await;
    // ... while `new` becomes leader at epoch 2 and writes seqs 5 and 6.
    new.raise_epoch(2).await.unwrap();
    put(&new, 2, k(3), "new5").await;
    put(&new, 2, k(10), "new6").await;

    // `new` sends seq 6 after (2, 5); `old` holds seq 5 from epoch 1, which it has from seq 1.
    let six = new.read_log(6, 6, 1, ANY_SIZE).unwrap();
    let refused = old.append(2, at(2, 5), six, 6).await.unwrap();
    let conflict = Some(at(1, 1));
    assert_eq!(
        refused,
        AppendOutcome::Mismatch {
            last: at(1, 7),
            conflict
        }
    );
    // Fenced: `old` takes no more writes of its epoch, and its data has not changed.
    assert_eq!(old.state().epoch, 2);
    assert_eq!(
        put_result(&old, 1, k(4)).await,
        Err(StoreError::StaleEpoch {
            request: 1,
            current: 2
        })
    );
    assert_eq!(get(&old, k(9)), Some((at(1, 7), b("old7"))));
    assert_eq!(
        next_after_mismatch(&new, at(2, 5), at(1, 7), conflict),
        NextStep::From(1)
    );

    // From the start: seqs 1..=4 match, 5..=7 are undone, the new leader's 5..=6 applied.
    let all = new.read_log(1, 6, 100, ANY_SIZE).unwrap();
    assert_eq!(
        old.append(2, at(0, 0), all, 6).await,
        Ok(AppendOutcome::Appended { last: at(2, 6) })
    );
    assert_eq!(
        get(&old, k(1)),
        Some((at(1, 1), b("v1"))),
        "overwrite undone"
    );
    assert_eq!(get(&old, k(2)), Some((at(1, 2), b("v2"))), "delete undone");
    assert_eq!(get(&old, k(9)), None, "creation undone");
    assert_eq!(get(&old, k(3)), Some((at(2, 5), b("new5"))));
    assert_eq!(get(&old, k(10)), Some((at(2, 6), b("new6"))));
    assert!(old.read_log(7, 10, 10, ANY_SIZE).unwrap().is_empty());
    assert_eq!(old.epoch_at(5).unwrap(), Some(2));
    assert_same_data(&old, &new, &keys);

    // The undoing survives a crash.
    let copy = crash_copy(old_dir.path()).await;
    let copied = open(copy.path()).await;
    assert_same_data(&copied, &new, &keys);
    close(copied).await;

    // And replication goes on from there.
    let mut model: Model = keys.iter().map(|k| (k.clone(), get(&new, k))).collect();
    let mut rng = Rng::new(3);
    random_writes(&new, 2, &keys, &mut model, &mut rng, 10).await;
    assert_eq!(replicate(&new, &old).await, 0);
    assert_matches(&old, &model);
    assert_same_data(&old, &new, &keys);
    close(old).await;
    close(new).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn append_cuts_an_older_epoch_suffix_at_the_leader_end() {
    let at = Position::new;
    let keys: Vec<Bytes> = (1..=6).map(|i| b(format!("k{i}"))).collect();
    let (_old_dir, old) = leader(1).await;
    for key in &keys[..4] {
        put(&old, 1, key, "v").await;
    }
    let (_new_dir, new) = fresh().await;
    let first = old.read_log(1, 4, 100, ANY_SIZE).unwrap();
    new.append(1, at(0, 0), first, 4).await.unwrap();
    // Seqs 5 and 6 of `old` never reach `new`, which leads at epoch 2 without writing.
    put(&old, 1, &keys[0], "overwritten").await;
    del(&old, 1, &keys[1]).await;
    new.raise_epoch(2).await.unwrap();

    // The leader's log ends at 4: a heartbeat after (1, 4) cuts what follows.
    assert_eq!(
        old.append(2, at(1, 4), vec![], 4).await,
        Ok(AppendOutcome::Appended { last: at(1, 4) })
    );
    assert_same_data(&old, &new, &keys);
    assert_eq!(get(&old, &keys[1]), Some((at(1, 2), b("v"))));

    // Entries of the current epoch are never cut by a delayed, shorter message.
    put(&new, 2, &keys[4], "new5").await;
    del(&new, 2, &keys[2]).await;
    let tail = new.read_log(5, 6, 10, ANY_SIZE).unwrap();
    let six = Ok(AppendOutcome::Appended { last: at(2, 6) });
    assert_eq!(old.append(2, at(1, 4), tail.clone(), 6).await, six);
    let st = old.state();
    assert_eq!(old.append(2, at(1, 4), vec![], 4).await, six);
    assert_eq!(old.append(2, at(1, 4), tail[..1].to_vec(), 5).await, six);
    assert_eq!(data_state(&old.state()), data_state(&st));
    assert_same_data(&old, &new, &keys);
    close(old).await;
    close(new).await;
}

// ---------------------------------------------------------------------------------------
// Snapshots
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_replaces_the_receivers_data_and_appends_continue_after_it() {
    let keys = key_set(300);
    let mut rng = Rng::new(4);
    let (_sd, source) = leader(3).await;
    let mut model = Model::new();
    random_writes(&source, 3, &keys, &mut model, &mut rng, 40).await;

    // The receiver holds data of its own: keys only it has, and some of the source's keys
    // with other values and versions.
    let (_rd, receiver) = leader(1).await;
    let mut own = Vec::new();
    for (i, theirs) in keys.iter().take(50).enumerate() {
        let key = if i % 2 == 0 {
            b(format!("own-{i}"))
        } else {
            theirs.clone()
        };
        put(&receiver, 1, &key, format!("receiver-{i}")).await;
        own.push(key);
    }
    for key in own {
        model.entry(key).or_insert(None);
    }

    let (at, chunks) = export(&source, 4096).await;
    assert_eq!(
        at,
        source.state().last,
        "the snapshot is as of the end of the log"
    );
    assert!(chunks.len() > 1);
    let st = install(&receiver, 3, &chunks, 1000).await;
    assert_eq!(data_state(&st), data_state(&receiver.state()));
    assert_eq!(receiver.state().epoch, 3);
    assert_eq!((receiver.state().last, receiver.state().base), (at, at));
    assert_eq!(
        (st.keys, st.digest),
        (source.state().keys, source.state().digest)
    );
    assert_matches(&receiver, &model);
    assert!(
        receiver
            .read_log(1, at.seq + 10, 100, ANY_SIZE)
            .unwrap()
            .is_empty()
    );
    assert_eq!(receiver.epoch_at(at.seq).unwrap(), Some(at.epoch));

    // The receiver takes the source's next entries as a follower.
    random_writes(&source, 3, &keys, &mut model, &mut rng, 5).await;
    let last = source.state().last;
    let next = source
        .read_log(at.seq + 1, last.seq, 1000, ANY_SIZE)
        .unwrap();
    assert_eq!(
        receiver.append(3, at, next, last.seq).await,
        Ok(AppendOutcome::Appended { last })
    );
    assert_matches(&receiver, &model);
    assert_same_data(&receiver, &source, &keys);
    // Entries from before the snapshot are already reflected: resent, they change nothing.
    let all = source.read_log(1, last.seq, usize::MAX, ANY_SIZE).unwrap();
    assert_eq!(
        receiver.append(3, Position::default(), all, last.seq).await,
        Ok(AppendOutcome::Appended { last })
    );
    assert_same_data(&receiver, &source, &keys);
    let receiver = restart(receiver).await;
    assert_matches(&receiver, &model);

    // Record by record (a chunk per record), into a fresh store.
    let (at, chunks) = export(&source, 1).await;
    assert!(chunks.len() > 1);
    let (_fd, fresh_one) = fresh().await;
    install(&fresh_one, 3, &chunks, usize::MAX).await;
    assert_eq!(fresh_one.state().last, at);
    assert_same_data(&fresh_one, &source, &keys);
    close(fresh_one).await;

    // The snapshot of an empty store empties the receiver.
    let (_ed, empty) = leader(3).await;
    let (at, chunks) = export(&empty, 4096).await;
    assert_eq!(at, Position::default());
    install(&receiver, 3, &chunks, 7).await;
    assert_eq!((receiver.state().keys, receiver.state().digest), (0, 0));
    for key in model.keys() {
        assert_eq!(get(&receiver, key), None);
    }
    assert_digest_consistent(&receiver);
    close(receiver).await;
    close(source).await;
    close(empty).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_stream_counts_only_when_it_arrives_whole() {
    let (_sd, source) = leader(1).await;
    for i in 0..20 {
        put(&source, 1, format!("k{i}").as_bytes(), "v").await;
    }
    let (at, chunks) = export(&source, 64).await;
    let stream = chunks.concat();
    let end = chunks.last().unwrap().len();
    assert_eq!(end, 10, "the end: a marker and the count of records");

    let mut whole = SnapshotReader::default();
    assert_eq!(whole.push(&stream).unwrap().len(), 20);
    assert_eq!(whole.finish(), Ok(at));
    // Cut anywhere before its end, it installs nothing: a sender that gave up, or held
    // back the end because the position was not committed.
    for cut in [0, 5, 30, stream.len() - end, stream.len() - 1] {
        let mut reader = SnapshotReader::default();
        reader.push(&stream[..cut]).unwrap();
        assert!(
            bad(reader.finish()),
            "stream cut at {cut} of {}",
            stream.len()
        );
    }
    // Bytes after the end, an end that counts other records, another version, garbage.
    let mut reader = SnapshotReader::default();
    let mut longer = stream.clone();
    longer.push(0);
    assert!(bad(reader.push(&longer)));
    let mut miscounted = stream.clone();
    *miscounted.last_mut().unwrap() += 1;
    assert!(bad(SnapshotReader::default().push(&miscounted)));
    let mut older = stream.clone();
    older[..8].copy_from_slice(b"DKVSNAP1");
    assert!(bad(SnapshotReader::default().push(&older)));
    assert!(bad(SnapshotReader::default().push(&[0u8; 64])));
    // A receiver begins the install, which wipes it, once the header is known good: the
    // header is known only once whole, and another version or garbage is refused on its
    // first bytes rather than once 24 have arrived.
    let mut reader = SnapshotReader::default();
    for piece in stream[..24].chunks(5) {
        assert_eq!(reader.header(), None);
        assert!(reader.push(piece).unwrap().is_empty());
    }
    assert_eq!(reader.header(), Some(at));
    assert!(bad(SnapshotReader::default().push(b"DKVSNAP1")));
    assert!(bad(SnapshotReader::default().push(b"{}")));
    close(source).await;
}

/// An install is fenced by its number and epoch: a second stream (say, a deposed leader's
/// still running) or a raised epoch makes the first one's chunks and end fail, and
/// nothing of them lands.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_older_snapshot_install_is_refused() {
    let (_sd, source) = leader(5).await;
    put(&source, 5, b"k", "v").await;
    let (at, chunks) = export(&source, 1 << 20).await;
    let records = records_of(&chunks);
    let (_rd, receiver) = fresh().await;

    let first = receiver.snapshot_begin(5).await.unwrap();
    let second = receiver.snapshot_begin(5).await.unwrap();
    assert!(bad(receiver.snapshot_chunk(first, records.clone()).await));
    assert!(bad(receiver.snapshot_end(first, at).await));
    assert_eq!(get(&receiver, b"k"), None);
    receiver
        .snapshot_chunk(second, records.clone())
        .await
        .unwrap();
    assert_eq!(receiver.raise_epoch(6).await, Ok(6));
    let stale = Err(StoreError::StaleEpoch {
        request: 5,
        current: 6,
    });
    assert_eq!(receiver.snapshot_chunk(second, records).await, stale);
    assert_eq!(receiver.snapshot_end(second, at).await.map(|_| ()), stale);
    assert_eq!(receiver.state().last, Position::default(), "not installed");
    // The leader of epoch 6 installs from the start.
    install(&receiver, 6, &chunks, 7).await;
    assert_eq!(get(&receiver, b"k").map(|(_, v)| v), Some(b("v")));
    close(receiver).await;
    close(source).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_behind_a_trimmed_log_catches_up_by_snapshot() {
    let keys = key_set(100);
    let mut rng = Rng::new(5);
    let mut model = Model::new();
    let (_ld, lead) = leader(1).await;
    random_writes(&lead, 1, &keys, &mut model, &mut rng, 10).await;
    let (_fd, fol) = fresh().await;
    assert_eq!(replicate(&lead, &fol).await, 0);
    random_writes(&lead, 1, &keys, &mut model, &mut rng, 10).await;
    let last = lead.state().last.seq;
    lead.trim(last - 3);
    lead.checkpoint().await.unwrap();
    assert_eq!(lead.state().base.seq, last - 3);
    random_writes(&lead, 1, &keys, &mut model, &mut rng, 3).await;

    // The follower's end is before the leader's base: only a snapshot brings it level.
    assert_eq!(replicate(&lead, &fol).await, 1);
    assert_matches(&fol, &model);
    assert_same_data(&fol, &lead, &keys);
    random_writes(&lead, 1, &keys, &mut model, &mut rng, 5).await;
    assert_eq!(replicate(&lead, &fol).await, 0);
    assert_matches(&fol, &model);
    close(lead).await;
    close(fol).await;
}

/// Async mode lets a follower trim entries the next leader never had. Leader A (epoch 1)
/// writes 1..=20; L2 holds 1..=5, F3 all of them and trims to 15. L2, promoted at epoch
/// 2, writes 6..=25. F3's trimmed prefix holds A's 6..=15 where L2 has its own: it cannot
/// cut there, so it must not take L2's entries over it, only a snapshot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_whose_trimmed_prefix_diverged_catches_up_by_snapshot() {
    let keys: Vec<Bytes> = (0..40).map(|i| b(format!("dk{i}"))).collect();
    let (_ad, a) = leader(1).await;
    for key in &keys[..20] {
        put(&a, 1, key, "from-A").await;
    }
    let (_l2d, l2) = fresh().await;
    let (_f3d, f3) = fresh().await;
    let origin = Position::default();
    let upto = |n| a.read_log(1, n, 100, ANY_SIZE).unwrap();
    assert!(matches!(
        l2.append(1, origin, upto(5), 20).await,
        Ok(AppendOutcome::Appended { .. })
    ));
    assert!(matches!(
        f3.append(1, origin, upto(20), 20).await,
        Ok(AppendOutcome::Appended { .. })
    ));
    f3.trim(15);
    f3.checkpoint().await.unwrap();
    assert_eq!(f3.state().base, Position::new(1, 15));
    l2.raise_epoch(2).await.unwrap();
    for key in &keys[20..] {
        put(&l2, 2, key, "from-L2").await;
    }
    assert_eq!(l2.state().last, Position::new(2, 25));

    assert_eq!(
        replicate(&l2, &f3).await,
        1,
        "only a snapshot brings F3 level"
    );
    assert_eq!(f3.state().last, Position::new(2, 25));
    assert_same_data(&f3, &l2, &keys);
    for key in &keys[5..20] {
        assert_eq!(get(&f3, key), None, "A's {} never reached L2", show(key));
    }
    // From there F3 follows L2 entry by entry.
    put(&l2, 2, b"after", "x").await;
    assert_eq!(replicate(&l2, &f3).await, 0);
    assert_same_data(&f3, &l2, &keys);
    close(a).await;
    close(l2).await;
    close(f3).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_during_snapshot_install_leaves_an_empty_store() {
    let keys = key_set(100);
    let mut rng = Rng::new(6);
    let mut model = Model::new();
    let (_sd, source) = leader(5).await;
    random_writes(&source, 5, &keys, &mut model, &mut rng, 10).await;
    let (_rd, receiver) = leader(1).await;
    put(&receiver, 1, b"mine", "x").await;

    let (_, chunks) = export(&source, 1 << 20).await;
    let records = records_of(&chunks);
    assert!(records.len() > 10);
    let id = receiver.snapshot_begin(5).await.unwrap();
    receiver
        .snapshot_chunk(id, records[..records.len() / 2].to_vec())
        .await
        .unwrap();
    // Neither the old data nor half a snapshot may come back: the copy starts from nothing,
    // at the snapshot's epoch.
    let copy = crash_copy(&dir_of(&receiver)).await;
    let copied = open(copy.path()).await;
    let st = copied.state();
    assert_eq!(
        (st.epoch, st.last, st.base),
        (5, Position::default(), Position::default())
    );
    assert_eq!((st.keys, st.digest), (0, 0));
    assert_eq!(get(&copied, b"mine"), None);
    assert_digest_consistent(&copied);
    // From there it can be sent the snapshot again.
    install(&copied, 5, &chunks, 4096).await;
    assert_same_data(&copied, &source, &keys);
    close(copied).await;
    close(receiver).await;
    close(source).await;
}

/// A leader at epoch 5 holding `pairs`, and a fresh replica whose install of the
/// leader's snapshot has every record but was never ended.
struct StalledInstall {
    _dirs: (TempDir, TempDir),
    source: Store,
    receiver: Store,
    chunks: Vec<Bytes>,
    id: u64,
}

async fn stalled_install(pairs: &[(&[u8], &str)]) -> StalledInstall {
    let (source_dir, source) = leader(5).await;
    for (key, value) in pairs {
        put(&source, 5, key, b(value)).await;
    }
    let (_, chunks) = export(&source, 1 << 20).await;
    let (receiver_dir, receiver) = fresh().await;
    let id = receiver.snapshot_begin(5).await.unwrap();
    receiver
        .snapshot_chunk(id, records_of(&chunks))
        .await
        .unwrap();
    StalledInstall {
        _dirs: (source_dir, receiver_dir),
        source,
        receiver,
        chunks,
        id,
    }
}

/// A replica whose snapshot install stalled can still be raised to a new epoch. That
/// raise was acknowledged, so the crash that discards the half snapshot must keep it: a
/// deposed leader's appends stay fenced off.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_epoch_raised_during_a_snapshot_install_survives_a_crash() {
    let StalledInstall {
        _dirs,
        source,
        receiver,
        chunks,
        ..
    } = stalled_install(&[(b"k", "v")]).await;
    assert_eq!(receiver.raise_epoch(7).await, Ok(7));

    // A crash right after the raise; then a crash of the copy right after it opened.
    let copy = crash_copy(&dir_of(&receiver)).await;
    let copied = open(copy.path()).await;
    let st = copied.state();
    assert_eq!((st.epoch, st.last, st.keys), (7, Position::default(), 0));
    assert!(matches!(
        copied.snapshot_begin(6).await,
        Err(StoreError::StaleEpoch {
            request: 6,
            current: 7
        })
    ));
    let again = crash_copy(copy.path()).await;
    close(copied).await;
    let reopened = open(again.path()).await;
    assert_eq!(reopened.state().epoch, 7);
    // From there the snapshot can be installed at the new epoch.
    install(&reopened, 7, &chunks, 4096).await;
    assert_eq!(get(&reopened, b"k").map(|(_, v)| v), Some(b("v")));
    close(reopened).await;
    close(receiver).await;
    close(source).await;
}

/// A replica promoted while a snapshot install stalled takes client writes at its new
/// epoch. Each acknowledged one must survive a crash, and none may land on half a
/// snapshot: the install can no longer end, so the raise discards what it stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_acknowledged_after_a_stalled_install_survives_a_crash() {
    let StalledInstall {
        _dirs,
        source,
        receiver,
        id,
        ..
    } = stalled_install(&[(b"k", "v"), (b"other", "w")]).await;
    assert_eq!(receiver.raise_epoch(6).await, Ok(6));
    let out = put(&receiver, 6, b"acked", "yes").await;
    assert_eq!(out.version, Position::new(6, 1));
    // Without a crash: the half snapshot is gone, the write is all there is.
    assert_eq!(get(&receiver, b"k"), None);
    assert_eq!(receiver.state().keys, 1);
    assert_digest_consistent(&receiver);
    // The stalled install can no longer end.
    assert!(
        receiver
            .snapshot_end(id, Position::new(5, 2))
            .await
            .is_err()
    );

    let copy = crash_copy(&dir_of(&receiver)).await;
    let copied = open(copy.path()).await;
    let st = copied.state();
    assert_eq!((st.epoch, st.last, st.keys), (6, Position::new(6, 1), 1));
    assert_eq!(get(&copied, b"acked").map(|(_, v)| v), Some(b("yes")));
    assert_eq!(get(&copied, b"k"), None);
    assert_digest_consistent(&copied);
    assert_same_data(&copied, &receiver, [&b("acked"), &b("k"), &b("other")]);
    close(copied).await;
    close(receiver).await;
    close(source).await;
}

/// A client write at the epoch of an install under way (its sender's own epoch, so no
/// replica may lead at it here) is refused: it would land on half a snapshot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_write_during_a_snapshot_install_is_refused() {
    let StalledInstall {
        _dirs,
        source,
        receiver,
        id,
        ..
    } = stalled_install(&[(b"k", "v")]).await;
    assert_eq!(
        write(&receiver, 5, b"x", Op::Put(b("y")), Condition::None).await,
        Err(StoreError::Installing)
    );
    // The install is not disturbed: it ends, and then writes are taken again.
    let st = receiver
        .snapshot_end(id, source.state().last)
        .await
        .unwrap();
    assert_eq!(st.last, source.state().last);
    assert_eq!(get(&receiver, b"x"), None);
    assert_same_data(&receiver, &source, [&b("k")]);
    put(&receiver, 5, b"x", "y").await;
    close(receiver).await;
    close(source).await;
}

// ---------------------------------------------------------------------------------------
// Restarts and crashes
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_after_checkpoint_keeps_everything() {
    let keys = key_set(200);
    let mut rng = Rng::new(7);
    let mut model = Model::new();
    let (_dir, store) = leader(1).await;
    random_writes(&store, 1, &keys, &mut model, &mut rng, 20).await;
    store.raise_epoch(2).await.unwrap();
    random_writes(&store, 2, &keys, &mut model, &mut rng, 20).await;
    store.trim(store.state().last.seq / 2);
    random_writes(&store, 2, &keys, &mut model, &mut rng, 5).await;
    let st = store.state();
    let log = store
        .read_log(st.base.seq + 1, st.last.seq, usize::MAX, ANY_SIZE)
        .unwrap();
    assert_eq!(log.len() as u64, st.last.seq - st.base.seq);

    let store = restart(store).await;
    assert_eq!(data_state(&store.state()), data_state(&st));
    assert_matches(&store, &model);
    let again = store
        .read_log(st.base.seq + 1, st.last.seq, usize::MAX, ANY_SIZE)
        .unwrap();
    assert_eq!(again, log);
    // It goes on where it stopped.
    let out = put(&store, 2, b"after", "restart").await;
    assert_eq!(out.version, Position::new(2, st.last.seq + 1));
    model.insert(b("after"), Some((out.version, b("restart"))));
    // A restart with nothing new in between changes nothing.
    let st = store.state();
    let store = restart(restart(store).await).await;
    assert_eq!(data_state(&store.state()), data_state(&st));
    assert_matches(&store, &model);
    close(store).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_copy_holds_every_acknowledged_write() {
    let keys = key_set(300);
    let mut rng = Rng::new(8);
    let mut model = Model::new();
    let (dir, store) = leader(1).await;
    for round in 0..3 {
        random_writes(&store, 1, &keys, &mut model, &mut rng, 30).await;
        if round == 1 {
            store.trim(store.state().last.seq - 10);
            random_writes(&store, 1, &keys, &mut model, &mut rng, 1).await;
        }
        // Right after the acknowledgements, nothing flushed on purpose.
        let copy = crash_copy(dir.path()).await;
        let copied = open(copy.path()).await;
        assert_eq!(data_state(&copied.state()), data_state(&store.state()));
        assert_matches(&copied, &model);
        assert_same_data(&copied, &store, &keys);

        // The copy is a working store: it goes on from its end, and a crash of the copy
        // after more writes keeps those too (nothing replayed at its open comes back).
        let mut copied_model = model.clone();
        let mut copied_rng = Rng::new(100 + round);
        random_writes(&copied, 1, &keys, &mut copied_model, &mut copied_rng, 5).await;
        let again = crash_copy(copy.path()).await;
        let reopened = open(again.path()).await;
        assert_eq!(data_state(&reopened.state()), data_state(&copied.state()));
        assert_matches(&reopened, &copied_model);
        close(reopened).await;
        close(copied).await;
    }
    close(store).await;
}

/// Raises its flag when dropped by a panicking thread (a writer task that failed).
struct PanicFlag(Arc<AtomicBool>);

impl Drop for PanicFlag {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.0.store(true, Ordering::SeqCst);
        }
    }
}

/// A write acknowledged in [`crash_copies_during_concurrent_writes_hold_every_acknowledged_write`].
#[derive(Clone)]
struct Acked {
    key: Bytes,
    version: Position,
    value: Option<Bytes>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_copies_during_concurrent_writes_hold_every_acknowledged_write() {
    const TASKS: usize = 64;
    const EACH: usize = 320;
    const KEYS_EACH: usize = 8;
    let (dir, store) = leader(1).await;
    // Each task owns its keys, so each key's writes are ordered by its task.
    let key_of = |t: usize, i: usize| b(format!("t{t}-k{i}"));
    let all_keys: Vec<Bytes> = (0..TASKS)
        .flat_map(|t| (0..KEYS_EACH).map(move |i| key_of(t, i)))
        .collect();
    let histories: Arc<Vec<Mutex<Vec<Acked>>>> =
        Arc::new((0..TASKS).map(|_| Mutex::new(Vec::new())).collect());
    let acked = Arc::new(AtomicUsize::new(0));
    let failed = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let tasks: Vec<_> = (0..TASKS)
        .map(|t| {
            let (store, histories, acked) = (store.clone(), histories.clone(), acked.clone());
            let flag = PanicFlag(failed.clone());
            tokio::spawn(async move {
                let _flag = flag;
                let mut rng = Rng::new(1000 + t as u64);
                let mut present = [false; KEYS_EACH];
                for i in 0..EACH {
                    let k = rng.below(KEYS_EACH);
                    let key = key_of(t, k);
                    let value = (!present[k] || !rng.chance(15)).then(|| {
                        let mut v = format!("t{t}-i{i}-").into_bytes();
                        v.extend_from_slice(&rng.bytes_below(48));
                        Bytes::from(v)
                    });
                    let out = match &value {
                        Some(v) => put(&store, 1, &key, v.clone()).await,
                        None => del(&store, 1, &key).await,
                    };
                    assert_eq!(out.created, !present[k] && value.is_some());
                    present[k] = value.is_some();
                    let version = out.version;
                    histories[t].lock().unwrap().push(Acked {
                        key,
                        version,
                        value,
                    });
                    acked.fetch_add(1, Ordering::SeqCst);
                }
            })
        })
        .collect();

    // Copies taken while the writers run, each right after some acknowledgements.
    let mut copies = Vec::new();
    for threshold in [1_500, 5_000, 9_000, 13_000, 17_000] {
        wait_until("acknowledgements", Duration::from_secs(60), || {
            acked.load(Ordering::SeqCst) >= threshold || failed.load(Ordering::SeqCst)
        })
        .await;
        if failed.load(Ordering::SeqCst) {
            break; // The writer's panic is reported below.
        }
        let counts: Vec<usize> = histories.iter().map(|h| h.lock().unwrap().len()).collect();
        copies.push((crash_copy(dir.path()).await, counts));
    }
    for task in tasks {
        task.await.expect("writer panicked");
    }
    eprintln!("{} writes in {:?}", TASKS * EACH, started.elapsed());
    // And one once everything is acknowledged.
    let counts: Vec<usize> = histories.iter().map(|h| h.lock().unwrap().len()).collect();
    copies.push((crash_copy(dir.path()).await, counts));

    let histories: Vec<Vec<Acked>> = histories
        .iter()
        .map(|h| h.lock().unwrap().clone())
        .collect();
    // Every write took one position, from 1 on, without gaps.
    let mut seqs: Vec<u64> = histories.iter().flatten().map(|a| a.version.seq).collect();
    seqs.sort_unstable();
    let total = (TASKS * EACH) as u64;
    assert_eq!(seqs, (1..=total).collect::<Vec<_>>());
    assert_eq!(store.state().last, Position::new(1, total));

    for (n, (copy, counts)) in copies.iter().enumerate() {
        let copied = open(copy.path()).await;
        let end = copied.state().last;
        // Every write acknowledged before the copy began is in it ...
        let needed = histories
            .iter()
            .zip(counts)
            .flat_map(|(h, &c)| &h[..c])
            .map(|a| a.version.seq)
            .max()
            .unwrap_or(0);
        assert!(
            end.seq >= needed,
            "copy {n} ends at {end:?}, before acknowledged write {needed}"
        );
        // ... and it holds exactly the effect of the log up to its end.
        let mut expected: HashMap<&Bytes, Option<(Position, Bytes)>> =
            all_keys.iter().map(|k| (k, None)).collect();
        for a in histories
            .iter()
            .flatten()
            .filter(|a| a.version.seq <= end.seq)
        {
            expected.insert(&a.key, a.value.clone().map(|v| (a.version, v)));
        }
        for (key, want) in &expected {
            assert_eq!(
                get(&copied, key),
                *want,
                "copy {n} (end {end:?}), key {}",
                show(key)
            );
        }
        let present = expected.values().filter(|v| v.is_some()).count() as u64;
        assert_eq!(copied.state().keys, present, "copy {n}");
        assert_digest_consistent(&copied);
        if n == copies.len() - 1 {
            assert_eq!(data_state(&copied.state()), data_state(&store.state()));
        }
        close(copied).await;
    }
    assert_digest_consistent(&store);
    close(store).await;
}

// ---------------------------------------------------------------------------------------
// Concurrency
// ---------------------------------------------------------------------------------------

/// What one writer of [`concurrent_writers_and_readers`] saw.
struct Seen {
    /// Its acknowledged writes to shared keys: key, version, value.
    shared_writes: Vec<(Bytes, Position, Bytes)>,
    /// What its reads of shared keys returned.
    reads: Vec<(Bytes, Position, Bytes)>,
    /// Its acknowledged writes of any key, by version.
    versions: Vec<Position>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writers_and_readers() {
    const TASKS: usize = 64;
    const EACH: usize = 200;
    const SHARED: usize = 16;
    const PRIVATE: usize = 4;
    let (_dir, store) = leader(1).await;
    let shared: Arc<Vec<Bytes>> = Arc::new((0..SHARED).map(|i| b(format!("shared-{i}"))).collect());
    // The highest acknowledged version of each shared key.
    let floors: Arc<Mutex<HashMap<Bytes, Position>>> = Arc::default();

    let seen = spawn_all(TASKS, |t| {
        let (store, shared, floors) = (store.clone(), shared.clone(), floors.clone());
        async move {
            let mut rng = Rng::new(2000 + t as u64);
            let mut mine: Vec<Option<(Position, Bytes)>> = vec![None; PRIVATE];
            let mut seen = Seen {
                shared_writes: Vec::new(),
                reads: Vec::new(),
                versions: Vec::new(),
            };
            for i in 0..EACH {
                let value = b(format!("t{t}-i{i}"));
                if rng.chance(50) {
                    let key = shared[rng.below(SHARED)].clone();
                    let out = put(&store, 1, &key, value.clone()).await;
                    let mut floors = floors.lock().unwrap();
                    let floor = floors.entry(key.clone()).or_default();
                    *floor = (*floor).max(out.version);
                    drop(floors);
                    seen.shared_writes.push((key, out.version, value));
                    seen.versions.push(out.version);
                } else {
                    // A private key: its owner reads back exactly what it wrote.
                    let k = rng.below(PRIVATE);
                    let key = b(format!("private-{t}-{k}"));
                    let out = if mine[k].is_some() && rng.chance(30) {
                        mine[k] = None;
                        del(&store, 1, &key).await
                    } else {
                        let out = put(&store, 1, &key, value.clone()).await;
                        mine[k] = Some((out.version, value));
                        out
                    };
                    seen.versions.push(out.version);
                    assert_eq!(get(&store, &key), mine[k], "read back {}", show(&key));
                }
                // So does any of its keys, however long ago it wrote it.
                let k = rng.below(PRIVATE);
                let key = format!("private-{t}-{k}");
                assert_eq!(get(&store, key.as_bytes()), mine[k], "read {key}");
                // A read never goes back behind a write acknowledged before it began.
                let key = &shared[rng.below(SHARED)];
                let floor = floors.lock().unwrap().get(key).copied();
                let got = get(&store, key);
                if let Some(floor) = floor {
                    let (version, _) = got.as_ref().expect("an acknowledged key is there");
                    assert!(
                        *version >= floor,
                        "{}: read {version:?} after {floor:?} was acknowledged",
                        show(key)
                    );
                }
                if let Some((version, value)) = got {
                    seen.reads.push((key.clone(), version, value));
                }
            }
            for (k, want) in mine.iter().enumerate() {
                assert_eq!(get(&store, format!("private-{t}-{k}").as_bytes()), *want);
            }
            seen
        }
    })
    .await;

    // Every write took one position, without gaps.
    let mut seqs: Vec<u64> = seen
        .iter()
        .flat_map(|s| &s.versions)
        .map(|v| v.seq)
        .collect();
    seqs.sort_unstable();
    assert_eq!(seqs, (1..=(TASKS * EACH) as u64).collect::<Vec<_>>());
    assert_eq!(store.state().last.seq, (TASKS * EACH) as u64);

    // Each shared key holds its write with the highest version; every read returned a
    // version and value some writer wrote.
    let mut written: HashMap<(Bytes, Position), Bytes> = HashMap::new();
    let mut newest: HashMap<Bytes, (Position, Bytes)> = HashMap::new();
    for (key, version, value) in seen.iter().flat_map(|s| &s.shared_writes) {
        written.insert((key.clone(), *version), value.clone());
        let best = newest
            .entry(key.clone())
            .or_insert((*version, value.clone()));
        if *version > best.0 {
            *best = (*version, value.clone());
        }
    }
    for key in shared.iter() {
        assert_eq!(get(&store, key), newest.get(key).cloned(), "{}", show(key));
    }
    let reads = seen.iter().flat_map(|s| &s.reads);
    let mut count = 0;
    for (key, version, value) in reads {
        assert_eq!(
            written.get(&(key.clone(), *version)),
            Some(value),
            "{} read at {version:?}",
            show(key)
        );
        count += 1;
    }
    assert!(count > TASKS * EACH / 2);
    assert_digest_consistent(&store);
    close(store).await;
}

// ---------------------------------------------------------------------------------------
// Large values
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_values_round_trip_across_a_crash_and_a_restart() {
    const MIB: usize = 1 << 20;
    let mut rng = Rng::new(9);
    let mut model = Model::new();
    let (dir, store) = leader(1).await;

    // Five 1 MiB values written together, then one of 6 MiB, among small writes.
    let big: Vec<(Bytes, Bytes)> = (0..5)
        .map(|i| (b(format!("mib-{i}")), rng.bytes(MIB)))
        .collect();
    let outs = join_all(big.iter().map(|(k, v)| put(&store, 1, k, v.clone()))).await;
    for ((key, value), out) in big.iter().zip(outs) {
        model.insert(key.clone(), Some((out.version, value.clone())));
    }
    for i in 0..20 {
        let key = b(format!("small-{i}"));
        let out = put(&store, 1, &key, format!("s{i}")).await;
        model.insert(key, Some((out.version, b(format!("s{i}")))));
    }
    let six = rng.bytes(6 * MIB);
    let out = put(&store, 1, b"six-mib", six.clone()).await;
    model.insert(b("six-mib"), Some((out.version, six.clone())));
    assert_matches(&store, &model);
    let entry = store
        .read_log(out.version.seq, out.version.seq, 1, ANY_SIZE)
        .unwrap();
    assert_eq!(entry[0].op, Op::Put(six.clone()));

    let check_copy = async |model: &Model| {
        let copy = crash_copy(dir.path()).await;
        let copied = open(copy.path()).await;
        assert_eq!(data_state(&copied.state()), data_state(&store.state()));
        assert_matches(&copied, model);
        close(copied).await;
    };
    check_copy(&model).await;

    // Large replaced by small, small by large, a large one deleted.
    let out = put(&store, 1, b"mib-0", "tiny").await;
    model.insert(b("mib-0"), Some((out.version, b("tiny"))));
    let grown = rng.bytes(MIB + 3);
    let out = put(&store, 1, b"small-0", grown.clone()).await;
    model.insert(b("small-0"), Some((out.version, grown)));
    del(&store, 1, b"mib-1").await;
    model.insert(b("mib-1"), None);
    let six2 = rng.bytes(6 * MIB);
    let out = put(&store, 1, b"six-mib", six2.clone()).await;
    model.insert(b("six-mib"), Some((out.version, six2)));
    assert_matches(&store, &model);
    check_copy(&model).await;

    let store = restart(store).await;
    assert_matches(&store, &model);

    // Records larger than a chunk go whole into the snapshot stream.
    let (at, chunks) = export(&store, 64 << 10).await;
    let (_od, other) = fresh().await;
    install(&other, 1, &chunks, 300_000).await;
    assert_eq!(other.state().last, at);
    assert_matches(&other, &model);
    close(other).await;
    close(store).await;
}

// ---------------------------------------------------------------------------------------
// distkv inspect
// ---------------------------------------------------------------------------------------

/// The largest group commit seen.
#[derive(Default)]
struct LargestCommit(AtomicUsize);

impl dataplane::storage::CommitObserver for LargestCommit {
    fn committed(&self, requests: usize, _: f64) {
        self.0.fetch_max(requests, Ordering::Relaxed);
    }
}

/// Large values queued at once are committed in several batches of at most 64 MiB (and
/// one value), not in one frame whose length would not fit its 32 bits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_commit_holds_at_most_64_mib_of_values() {
    let dir = tempdir().unwrap();
    let largest = Arc::new(LargestCommit::default());
    let observer = largest.clone();
    let path = dir.path().to_path_buf();
    let store = tokio::task::spawn_blocking(move || Store::open(&path, observer))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(store.raise_epoch(1).await, Ok(1));
    let value = Bytes::from(vec![7u8; 1 << 20]);
    let keys: Vec<String> = (0..80).map(|i| format!("big-{i}")).collect();
    join_all(
        keys.iter()
            .map(|k| put(&store, 1, k.as_bytes(), value.clone())),
    )
    .await;
    let most = largest.0.load(Ordering::Relaxed);
    assert!(
        (1..=65).contains(&most),
        "a commit of {most} values of 1 MiB"
    );
    for k in &keys {
        assert_eq!(get(&store, k.as_bytes()).unwrap().1.len(), 1 << 20);
    }
}

/// A closed store still answers reads and refuses writes; a reopen finds every key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closed_store_still_reads_refuses_writes_and_reopens_with_every_key() {
    let keys = key_set(50);
    let (dir, store) = leader(2).await;
    for key in &keys {
        put(&store, 2, key, b(format!("v-{}", show(key)))).await;
    }
    let state = store.state();
    store.close().await.unwrap();
    for key in &keys {
        assert_eq!(get(&store, key).unwrap().1, b(format!("v-{}", show(key))));
    }
    let refused = write(&store, 2, b"late", Op::Put(b("x")), Condition::None).await;
    assert_eq!(refused, Err(StoreError::Closed));
    drop(store);

    let store = open(dir.path()).await;
    assert_eq!(data_state(&store.state()), data_state(&state));
    for key in &keys {
        assert_eq!(get(&store, key).unwrap().1, b(format!("v-{}", show(key))));
    }
    assert_eq!(get(&store, b"late"), None);
}

/// `distkv inspect` reports a stopped replica's rows and files as JSON, and refuses, naming
/// the directory, one it cannot read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inspect_reports_a_stopped_replicas_space() {
    let keys = key_set(300);
    let (dir, store) = leader(2).await;
    for key in &keys {
        put(&store, 2, key, vec![7u8; 100]).await;
    }
    let state = store.state();
    close(store).await;

    let run = |dir: &Path| {
        std::process::Command::new(env!("CARGO_BIN_EXE_distkv"))
            .args(["inspect", "--data-dir"])
            .arg(dir)
            .output()
            .unwrap()
    };
    let out = run(dir.path());
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let file = dir.path().join("distkv.redb");
    let bytes = std::fs::read(&file).unwrap();
    assert!(run(dir.path()).status.success());
    assert!(
        std::fs::read(&file).unwrap() == bytes,
        "inspect changed the database"
    );
    assert_eq!(report["state"]["keys"], keys.len() as u64);
    assert_eq!(report["state"]["last"]["seq"], state.last.seq);
    let kv = &report["tables"][0];
    assert_eq!(
        (kv["name"].as_str(), kv["rows"].as_u64()),
        (Some("kv"), Some(300))
    );
    assert!(kv["stored_bytes"].as_u64().unwrap() >= 300 * 100);
    assert!(report["wal_bytes"].as_u64().unwrap() > 0);
    assert!(report["db_file_bytes"].as_u64().unwrap() > 0);

    let missing = dir.path().join("nothing-here");
    let out = run(&missing);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("cannot read") && err.contains("nothing-here"),
        "{err}"
    );
    assert!(
        !missing.exists(),
        "inspect created the directory it was asked to read"
    );
}
