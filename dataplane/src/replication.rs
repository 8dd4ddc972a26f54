//! Leader-follower replication of a shard's log.
//!
//! The rules are Raft's log matching, with epochs as terms: the leader sends entries with
//! the position just before them (`prev`); a follower appends only when its log holds
//! `prev` at the same epoch, skips entries it already holds at the same epoch, and cuts
//! its log where an entry's epoch differs (a suffix no leader ever committed). When the
//! leader has trimmed the part of its log a follower needs, it sends a snapshot instead.
//!
//! A follower cannot cut at or below its base (what it trimmed, or took from a snapshot):
//! it trusts the leader's entries up to there only once the leader's log shows the base's
//! own `(epoch, seq)`. In async mode a new leader may lack entries the old one counted as
//! committed, and a follower may have trimmed them; such a follower answers
//! [`AppendOutcome::Diverged`] and the leader sends it a snapshot.
//!
//! The first half of this module is those rules as pure functions over [`LogIndex`]; the
//! second half is the leader's side at run time: one task per follower and the commit
//! position that sync-mode writes wait for.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::api::Limits;
use crate::client::{ClientError, HttpClient, Response};
use crate::link::{LinkRequest, Links};
use crate::storage::{AppendOutcome, LogEntry, Position, Store, StoreError};
use crate::wire::{AckMode, FollowerAck, Peer};

/// Read access to a log, as the matching rules need it.
pub trait LogIndex {
    /// Error of a lookup.
    type Error;
    /// Last entry.
    fn last(&self) -> Position;
    /// Last entry no longer in the log (trimmed or covered by a snapshot); the log holds
    /// `base.seq + 1 ..= last.seq`.
    fn base(&self) -> Position;
    /// Epoch of the entry at `seq`, for `base.seq <= seq <= last.seq`; `None` elsewhere.
    fn epoch_at(&self, seq: u64) -> Result<Option<u64>, Self::Error>;
}

/// What a follower does with a batch of entries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AppendPlan {
    /// Cut the log after `truncate_after` (when set), then append `entries[skip..]`.
    Append {
        /// Last seq to keep, when a divergent suffix must go.
        truncate_after: Option<u64>,
        /// Entries at the front that the log already holds.
        skip: usize,
    },
    /// The log does not hold `prev`; write nothing.
    Mismatch {
        /// `prev` is here under another epoch: that epoch and the first seq of it here.
        conflict: Option<Position>,
    },
    /// The leader's log differs from this one at or below its base; write nothing. The
    /// entries there cannot be cut, so only a snapshot brings this log level.
    Diverged,
}

/// How far back a follower looks for the start of a conflicting epoch; bounds the work of
/// one request (the leader simply asks again from there).
const CONFLICT_SCAN_LIMIT: u64 = 10_000;

/// Decides how a follower applies `entries` (positions, contiguous after `prev`) sent by
/// the leader at `epoch` whose log ends at `leader_last`.
pub fn plan_append<L: LogIndex>(
    log: &L,
    epoch: u64,
    prev: Position,
    entries: &[Position],
    leader_last: u64,
) -> Result<AppendPlan, L::Error> {
    let last = log.last();
    let base = log.base();
    if prev.seq > last.seq {
        // A gap: the follower is behind what the leader assumed.
        return Ok(AppendPlan::Mismatch { conflict: None });
    }
    if below_base_differs(base, epoch, prev, entries, leader_last) {
        return Ok(AppendPlan::Diverged);
    }
    // Entries up to the base are reflected here, unless the batch showed otherwise above.
    let mut skip = base.seq.saturating_sub(prev.seq).min(entries.len() as u64) as usize;
    if prev.seq > base.seq {
        let here = log.epoch_at(prev.seq)?;
        if here != Some(prev.epoch) {
            let Some(epoch) = here else {
                return Ok(AppendPlan::Mismatch { conflict: None });
            };
            let mut first = prev.seq;
            while first > base.seq + 1
                && prev.seq - first < CONFLICT_SCAN_LIMIT
                && log.epoch_at(first - 1)? == Some(epoch)
            {
                first -= 1;
            }
            return Ok(AppendPlan::Mismatch {
                conflict: Some(Position::new(epoch, first)),
            });
        }
    }
    while skip < entries.len() {
        let pos = entries[skip];
        if pos.seq > last.seq {
            break;
        }
        if log.epoch_at(pos.seq)? != Some(pos.epoch) {
            return Ok(AppendPlan::Append {
                truncate_after: Some(pos.seq - 1),
                skip,
            });
        }
        skip += 1;
    }
    // The batch reaches the end of the leader's log, yet this log goes on: what follows
    // was written by older leaders and never reached the current one, so it was never
    // committed. Entries of the current epoch are never cut this way, so a delayed,
    // shorter batch from this same leader cannot undo a newer one.
    let batch_end = prev.seq + entries.len() as u64;
    if skip == entries.len()
        && batch_end == leader_last
        && last.seq > leader_last
        && last.epoch < epoch
    {
        return Ok(AppendPlan::Append {
            truncate_after: Some(leader_last),
            skip,
        });
    }
    Ok(AppendPlan::Append {
        truncate_after: None,
        skip,
    })
}

/// Whether the leader at `epoch`, whose log holds `prev` then `entries` and ends at
/// `leader_last`, differs from a follower's log at or below the follower's `base`.
///
/// The follower no longer holds the entries up to its base, so it compares the one thing
/// it kept: the base's `(epoch, seq)`. Matching there makes both logs identical up to it
/// (log matching); differing anywhere up to it means entries this follower took as
/// committed never reached this leader. Where the batch does not show the leader's entry
/// at the base yet, the follower's entries there have epochs up to the base's: one above
/// it in the batch already differs, and a leader whose log ends before the base will put
/// entries of its own epoch there. Otherwise nothing is known yet, and nothing differs.
fn below_base_differs(
    base: Position,
    epoch: u64,
    prev: Position,
    entries: &[Position],
    leader_last: u64,
) -> bool {
    if prev.seq >= base.seq {
        return prev.seq == base.seq && prev.epoch != base.epoch;
    }
    if let Some(at_base) = entries.get((base.seq - prev.seq - 1) as usize) {
        return at_base.epoch != base.epoch;
    }
    prev.epoch > base.epoch
        || entries.iter().any(|p| p.epoch > base.epoch)
        || (leader_last < base.seq && base.epoch < epoch)
}

/// How much of its log a follower may count as committed after appending `sent` entries
/// after `prev` with the leader's `commit`: only what this round matched against the
/// leader's log. A longer suffix here may still diverge, and what counts as committed is
/// trimmed into the data for good.
pub fn known_committed(
    outcome: &AppendOutcome,
    prev: Position,
    sent: u64,
    commit: u64,
) -> Option<u64> {
    match outcome {
        AppendOutcome::Appended { .. } => Some(commit.min(prev.seq + sent)),
        AppendOutcome::Mismatch { .. } | AppendOutcome::Diverged { .. } => None,
    }
}

/// The most of the leader's log a follower that refused a batch can still hold: its log
/// ends at `follower_last`, and where it holds another epoch at `prev` (`conflict`), it
/// differs from that epoch's first entry there on.
pub fn held_at_most(follower_last: Position, conflict: Option<Position>) -> u64 {
    match conflict {
        Some(c) => c.seq.saturating_sub(1).min(follower_last.seq),
        None => follower_last.seq,
    }
}

/// What the leader sends a follower next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NextStep {
    /// Entries from this seq on.
    From(u64),
    /// The log no longer holds what the follower needs: a full snapshot.
    Snapshot,
}

/// Where the leader resumes after a follower refused `sent_prev`. Always moves strictly
/// back, so the exchange ends in a match or a snapshot.
pub fn next_after_mismatch<L: LogIndex>(
    leader: &L,
    sent_prev: Position,
    follower_last: Position,
    conflict: Option<Position>,
) -> NextStep {
    let next = match conflict {
        // The follower holds a different epoch at `prev`: retry from the first entry of
        // that epoch it has, so the whole suspect stretch is compared again.
        Some(c) => c.seq.min(sent_prev.seq),
        // A gap: resume right after the follower's last entry.
        None => (follower_last.seq + 1).min(sent_prev.seq),
    };
    step_from(leader, next)
}

/// `From(next)` when the leader still holds the entry before `next`, else a snapshot.
pub fn step_from<L: LogIndex>(leader: &L, next: u64) -> NextStep {
    if next.saturating_sub(1) < leader.base().seq {
        NextStep::Snapshot
    } else {
        NextStep::From(next.max(1))
    }
}

/// `POST /internal/replicate` body (postcard): entries after `prev`, from the leader at `epoch`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ReplicateRequest {
    /// Leader's epoch; the follower refuses a lower one.
    pub epoch: u64,
    /// Position just before the first entry.
    pub prev: Position,
    /// Highest seq the leader knows committed.
    pub commit: u64,
    /// Last seq in the leader's log.
    pub leader_last: u64,
    /// Entries, contiguous from `prev.seq + 1`.
    pub entries: Vec<LogEntry>,
}

/// `POST /internal/replicate` answer (postcard).
pub type ReplicateResponse = AppendOutcome;

/// The first entry of a batch that is not the next one after `prev`, or that claims an
/// epoch above the `epoch` of the leader sending it, with the seq it should have had.
/// Such a batch is malformed: applying part of it would leave the log half changed.
pub fn out_of_place(prev: Position, epoch: u64, entries: &[LogEntry]) -> Option<(u64, &LogEntry)> {
    (prev.seq + 1..)
        .zip(entries)
        .find(|(seq, e)| e.seq != *seq || e.epoch > epoch)
}

/// Settings of the leader's streaming.
#[derive(Debug, Clone)]
pub struct StreamConfig {
    /// Most entries per request.
    pub max_entries: usize,
    /// About the most bytes per request.
    pub max_bytes: usize,
    /// How often an idle leader still contacts each follower (carries the commit seq).
    pub heartbeat: Duration,
    /// Bytes per snapshot chunk.
    pub snapshot_chunk: usize,
}

impl Default for StreamConfig {
    fn default() -> Self {
        StreamConfig {
            max_entries: 2048,
            max_bytes: 4 << 20,
            heartbeat: Duration::from_millis(100),
            snapshot_chunk: 256 << 10,
        }
    }
}

impl StreamConfig {
    /// The largest replicate request a leader with this configuration sends for keys and
    /// values within `limits`: a batch stays within `max_bytes` unless one entry alone is
    /// larger, plus the request's own fields.
    pub fn max_request_bytes(&self, limits: &Limits) -> usize {
        let one_entry = 64 + limits.max_key_bytes + limits.max_value_bytes;
        self.max_bytes.max(one_entry) + 16 * self.max_entries + 1024
    }
}

/// Why a wait for the commit point ended without it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Uncommitted {
    /// The in-sync replicas did not all confirm in time.
    #[error("the in-sync replicas did not confirm in time")]
    TimedOut,
    /// This replica no longer leads at that epoch.
    #[error("the leadership ended")]
    Ended,
}

/// One follower's progress as its leader sees it.
#[derive(Debug, Clone, Copy)]
struct Progress {
    acked: u64,
    last_contact: Instant,
}

/// The leader's view of its followers and of what is committed, for one epoch.
pub struct Leadership {
    self_id: String,
    epoch: u64,
    mode: AckMode,
    in_sync: Mutex<Vec<String>>,
    /// For each in-sync member: the log end when it joined. Entries up to there were
    /// committed without it, so it only counts as in sync once it holds them all.
    join_floor: Mutex<HashMap<String, u64>>,
    progress: Mutex<HashMap<String, Progress>>,
    /// For each follower being rebuilt by snapshot: the log end when the snapshot began,
    /// at or below its position. The log is kept after that, or after what the follower
    /// acknowledged since, if more. Writes go on while a snapshot is copied; were the log
    /// trimmed past its position, the follower would need another snapshot, and under
    /// steady writes, one after another for ever.
    pins: Mutex<HashMap<String, u64>>,
    commit: watch::Sender<u64>,
    store: Store,
    /// Set once this leadership is over: to the higher epoch a follower reported, or to
    /// its own when the control plane ended it.
    deposed: watch::Sender<Option<u64>>,
    started: Instant,
}

impl Leadership {
    /// Starts leading at `epoch`. Followers count as holding nothing until they answer.
    pub fn new(
        self_id: String,
        epoch: u64,
        mode: AckMode,
        in_sync: Vec<String>,
        store: Store,
    ) -> Arc<Self> {
        let l = Arc::new(Leadership {
            self_id,
            epoch,
            mode,
            in_sync: Mutex::new(Vec::new()),
            join_floor: Mutex::new(HashMap::new()),
            progress: Mutex::new(HashMap::new()),
            pins: Mutex::new(HashMap::new()),
            commit: watch::channel(0).0,
            store,
            deposed: watch::channel(None).0,
            started: Instant::now(),
        });
        // At a new epoch every member starts with the whole log still to confirm.
        l.set_in_sync(in_sync);
        l
    }

    /// Epoch of this leadership.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Ack mode.
    pub fn mode(&self) -> AckMode {
        self.mode
    }

    /// Replaces the in-sync set (the control plane's decision) and recomputes the commit.
    /// Writes wait for a new member at once; it is reported in sync only once caught up.
    pub fn set_in_sync(&self, in_sync: Vec<String>) {
        let end = self.store.state().last.seq;
        {
            let mut floors = self.join_floor.lock().unwrap();
            floors.retain(|id, _| in_sync.contains(id));
            for id in &in_sync {
                floors.entry(id.clone()).or_insert(end);
            }
        }
        *self.in_sync.lock().unwrap() = in_sync;
        self.recompute();
    }

    /// The in-sync set the control plane asked for, leader included: writes wait for all.
    pub fn in_sync(&self) -> Vec<String> {
        self.in_sync.lock().unwrap().clone()
    }

    /// Size of the in-sync set, without copying it (checked on every write).
    pub fn in_sync_len(&self) -> usize {
        self.in_sync.lock().unwrap().len()
    }

    /// The members that hold every committed entry: the leader and each member that has
    /// acknowledged the log end as of its joining. Only these may be promoted.
    pub fn confirmed_in_sync(&self) -> Vec<String> {
        let in_sync = self.in_sync.lock().unwrap();
        let floors = self.join_floor.lock().unwrap();
        let progress = self.progress.lock().unwrap();
        in_sync
            .iter()
            .filter(|id| {
                **id == self.self_id
                    || progress
                        .get(*id)
                        .is_some_and(|p| p.acked >= floors.get(*id).copied().unwrap_or(0))
            })
            .cloned()
            .collect()
    }

    /// Highest committed seq.
    pub fn commit(&self) -> u64 {
        *self.commit.borrow()
    }

    /// Waits until `seq` is committed, for at most `limit`; gives up as soon as this
    /// leadership is over, since its commit point will not move again.
    pub async fn wait_committed(&self, seq: u64, limit: Duration) -> Result<(), Uncommitted> {
        if self.commit() >= seq {
            return Ok(());
        }
        let mut commit = self.commit.subscribe();
        let mut over = self.deposed.subscribe();
        let wait = async {
            tokio::select! {
                r = commit.wait_for(|c| *c >= seq) => r.map(drop).map_err(|_| Uncommitted::Ended),
                _ = over.wait_for(Option::is_some) => Err(Uncommitted::Ended),
            }
        };
        tokio::time::timeout(limit, wait)
            .await
            .unwrap_or(Err(Uncommitted::TimedOut))
    }

    /// Ends this leadership on the control plane's word (a new role or term).
    pub fn end(&self) {
        self.deposed.send_if_modified(|d| {
            let first = d.is_none();
            d.get_or_insert(self.epoch);
            first
        });
    }

    /// Set once this leadership is over (see the field).
    pub fn deposed(&self) -> Option<u64> {
        *self.deposed.borrow()
    }

    /// Each follower's acknowledged seq and time since contact.
    pub fn follower_acks(&self) -> Vec<FollowerAck> {
        let mut acks: Vec<FollowerAck> = self
            .progress
            .lock()
            .unwrap()
            .iter()
            .map(|(id, p)| FollowerAck {
                id: id.clone(),
                acked_seq: p.acked,
                last_contact_ms: p.last_contact.elapsed().as_millis() as u64,
            })
            .collect();
        acks.sort_by(|a, b| a.id.cmp(&b.id));
        acks
    }

    /// Lowest seq held durably by every in-sync member, the leader's own log included.
    pub fn min_in_sync_ack(&self) -> u64 {
        let own = self.store.state().last.seq;
        let in_sync = self.in_sync.lock().unwrap();
        let progress = self.progress.lock().unwrap();
        in_sync
            .iter()
            .filter(|id| **id != self.self_id)
            .map(|id| progress.get(id).map_or(0, |p| p.acked))
            .fold(own, u64::min)
    }

    /// Highest seq the log may be trimmed to: what every in-sync member holds, what is
    /// committed, and what followers being rebuilt by snapshot still need.
    pub fn trim_floor(&self) -> u64 {
        let floor = self.min_in_sync_ack().min(self.commit());
        let pins = self.pins.lock().unwrap();
        let progress = self.progress.lock().unwrap();
        pins.iter()
            .map(|(id, &at)| progress.get(id).map_or(at, |p| p.acked.max(at)))
            .fold(floor, u64::min)
    }

    /// Keeps the log after `seq`, and then after what `follower` acknowledges, for
    /// `follower`, which a snapshot is rebuilding.
    fn pin(&self, follower: &str, seq: u64) {
        self.pins.lock().unwrap().insert(follower.to_string(), seq);
    }

    /// Lets the log be trimmed past `follower` again.
    fn unpin(&self, follower: &str) {
        self.pins.lock().unwrap().remove(follower);
    }

    /// Recomputes the commit seq after the log grew, a follower answered or the in-sync
    /// set changed. It never moves back.
    pub fn recompute(&self) {
        let commit = match self.mode {
            AckMode::Async => self.store.state().last.seq,
            AckMode::Sync => self.min_in_sync_ack(),
        };
        self.commit.send_if_modified(|c| {
            let moved = commit > *c;
            if moved {
                *c = commit;
            }
            moved
        });
    }

    /// Lists a follower as its stream starts: acknowledged nothing until it answers (a
    /// follower started again may hold less than it did), and silent since this
    /// leadership began if it is new (so the control plane can time it out like any
    /// other).
    fn register(&self, follower: &str) {
        self.progress
            .lock()
            .unwrap()
            .entry(follower.to_string())
            .and_modify(|p| p.acked = 0)
            .or_insert(Progress {
                acked: 0,
                last_contact: self.started,
            });
    }

    /// Caps what `follower` counts as holding at `seq`, after it answered that its log
    /// holds no more of this one. Below what it acknowledged, it came back with less
    /// (storage lost or replaced behind the same address, so its stream never started
    /// again): it is reported in sync again only once it holds the whole log as of now,
    /// not just as of its joining, so the control plane stops counting it for promotion.
    fn lower_ack(&self, follower: &str, seq: u64) {
        let lowered = match self.progress.lock().unwrap().get_mut(follower) {
            Some(p) if seq < p.acked => {
                p.acked = seq;
                true
            }
            _ => false,
        };
        if lowered {
            let end = self.store.state().last.seq;
            if let Some(floor) = self.join_floor.lock().unwrap().get_mut(follower) {
                *floor = (*floor).max(end);
            }
        }
    }

    /// Drops a follower that is no longer a peer of the shard.
    pub fn forget(&self, follower: &str) {
        self.progress.lock().unwrap().remove(follower);
    }

    fn record_ack(&self, follower: &str, acked: u64) {
        self.progress.lock().unwrap().insert(
            follower.to_string(),
            Progress {
                acked,
                last_contact: Instant::now(),
            },
        );
        self.recompute();
    }

    fn depose(&self, epoch: u64) {
        tracing::warn!(
            epoch = self.epoch,
            newer = epoch,
            "a follower knows a newer epoch; stepping down"
        );
        self.deposed.send_replace(Some(epoch));
    }
}

/// Streams the leader's log to one follower until the task is aborted (role change) or
/// the leader learns it was deposed.
///
/// Batches go over the `links` (one connection per follower, shared with nothing else
/// that waits); snapshots, long streams, over `http`.
pub async fn stream_to_follower(
    leadership: Arc<Leadership>,
    peer: Peer,
    http: HttpClient,
    links: Arc<Links>,
    cfg: StreamConfig,
) {
    let store = leadership.store.clone();
    leadership.register(&peer.id);
    // However the stream ends (aborted included), it holds back no trimming after.
    let _unpin = Unpin {
        leadership: leadership.clone(),
        follower: peer.id.clone(),
    };
    // Staged, not durable: followers store a batch while the leader's own fsync runs.
    let mut changes = store.subscribe_staged();
    // Optimistic start: assume the follower is level; a mismatch walks back.
    let mut next = store.staged().last.seq + 1;
    // The follower's log differs below its base: no entries fix that, whatever this log
    // still holds.
    let mut diverged = false;
    let mut backoff = Backoff::default();
    loop {
        if leadership.deposed().is_some() {
            return;
        }
        let step = if diverged {
            NextStep::Snapshot
        } else {
            step_from(&store, next)
        };
        let step = match step {
            NextStep::Snapshot => {
                // The snapshot's position is at least this; the entries after it are what
                // the follower asks for next.
                leadership.pin(&peer.id, store.state().last.seq);
                match send_snapshot(&leadership, &peer, &http, &cfg).await {
                    Ok(at) => {
                        leadership.record_ack(&peer.id, at.seq);
                        next = at.seq + 1;
                        diverged = false;
                        backoff = Backoff::default();
                    }
                    Err(e) => {
                        tracing::warn!(follower = %peer.id, error = %e, "snapshot transfer failed");
                        leadership.unpin(&peer.id);
                        backoff.wait().await;
                    }
                }
                continue;
            }
            NextStep::From(n) => n,
        };
        next = step;
        // Whatever is staged from here on wakes the wait below; what is staged now, this
        // round sends.
        changes.borrow_and_update();
        let result = replicate_once(&leadership, &peer, &links, &cfg, next).await;
        match result {
            Ok(Sent::Matched { through }) => {
                leadership.record_ack(&peer.id, through);
                next = through + 1;
                backoff = Backoff::default();
                if store.staged().last.seq <= through {
                    // Caught up: from here on it is kept up like any follower.
                    leadership.unpin(&peer.id);
                    // Level with the leader: wait for new entries rather than send an
                    // empty round (the commit point reaches the follower with the next
                    // batch or the heartbeat).
                    let _ = tokio::time::timeout(cfg.heartbeat, changes.changed()).await;
                }
            }
            Ok(Sent::Mismatch {
                prev,
                last,
                conflict,
            }) => {
                tracing::info!(follower = %peer.id, ?prev, ?last, ?conflict, "follower log differs; walking back");
                leadership.lower_ack(&peer.id, held_at_most(last, conflict));
                next = match next_after_mismatch(&store, prev, last, conflict) {
                    NextStep::From(n) => n,
                    NextStep::Snapshot => 0,
                };
            }
            Ok(Sent::Diverged { base }) => {
                tracing::warn!(follower = %peer.id, ?base, "follower's log differs at or below its base");
                leadership.lower_ack(&peer.id, 0);
                diverged = true;
            }
            Err(StreamError::Stale(epoch)) => {
                leadership.depose(epoch);
                return;
            }
            Err(e) => {
                tracing::debug!(follower = %peer.id, error = %e, "replication request failed");
                // A follower that stopped answering holds back no trimming: the log keeps
                // `--log-retain` entries for it like for any other.
                leadership.unpin(&peer.id);
                backoff.wait().await;
            }
        }
    }
}

/// Releases a follower's pin on the log when its stream ends.
struct Unpin {
    leadership: Arc<Leadership>,
    follower: String,
}

impl Drop for Unpin {
    fn drop(&mut self) {
        self.leadership.unpin(&self.follower);
    }
}

/// The pause after a failed round: 20 ms, doubling up to 1 s while rounds keep failing.
struct Backoff(Duration);

impl Default for Backoff {
    fn default() -> Self {
        Backoff(Duration::from_millis(20))
    }
}

impl Backoff {
    async fn wait(&mut self) {
        tokio::time::sleep(self.0).await;
        self.0 = (self.0 * 2).min(Duration::from_secs(1));
    }
}

/// The result of one replicate request.
enum Sent {
    Matched {
        through: u64,
    },
    Mismatch {
        prev: Position,
        last: Position,
        conflict: Option<Position>,
    },
    Diverged {
        base: Position,
    },
}

/// Why a transfer to a follower failed.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    /// The follower has seen a higher epoch.
    #[error("follower is at a higher epoch {0}")]
    Stale(u64),
    /// HTTP failure.
    #[error(transparent)]
    Http(#[from] ClientError),
    /// Local storage failure.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A snapshot's position was not committed.
    #[error("snapshot not committed: {0}")]
    Uncommitted(#[from] Uncommitted),
    /// The follower answered something unreadable.
    #[error("bad answer from follower: {0}")]
    Protocol(String),
}

async fn replicate_once(
    leadership: &Leadership,
    peer: &Peer,
    links: &Links,
    cfg: &StreamConfig,
    next: u64,
) -> Result<Sent, StreamError> {
    let store = &leadership.store;
    let prev_seq = next - 1;
    let prev_epoch = store.epoch_at(prev_seq)?.unwrap_or(0);
    let prev = Position::new(prev_epoch, prev_seq);
    let leader_last = store.staged().last.seq;
    let entries = if leader_last >= next {
        // Up to `leader_last` only: a batch staged since it was read waits for the next
        // round, so the request never reaches past the end it names.
        store.read_log(next, leader_last, cfg.max_entries, cfg.max_bytes)?
    } else {
        Vec::new()
    };
    let n = entries.len() as u64;
    let req = ReplicateRequest {
        epoch: leadership.epoch,
        prev,
        commit: leadership.commit(),
        leader_last,
        entries,
    };
    let body = postcard::to_stdvec(&req).map_err(|e| StreamError::Protocol(e.to_string()))?;
    let request = LinkRequest {
        method: &hyper::Method::POST,
        target: "/internal/replicate",
        headers: crate::link::no_headers(),
        pass: &[],
        body: &body,
    };
    let resp = links
        .send(&peer.address, request, round_limit(body.len()))
        .await?;
    check_answer(&resp, leadership.epoch)?;
    let outcome: ReplicateResponse =
        postcard::from_bytes(&resp.body).map_err(|e| StreamError::Protocol(e.to_string()))?;
    Ok(match outcome {
        // Only what was checked against `prev` counts: a follower may hold a longer,
        // divergent suffix that the next batch will cut.
        AppendOutcome::Appended { .. } => Sent::Matched {
            through: prev_seq + n,
        },
        AppendOutcome::Mismatch { last, conflict } => Sent::Mismatch {
            prev,
            last,
            conflict,
        },
        AppendOutcome::Diverged { base } => Sent::Diverged { base },
    })
}

/// What one replication round may take beyond sending its request: the follower stores
/// and syncs the batch, and answers.
const ROUND_BASE: Duration = Duration::from_secs(5);

/// The slowest link a replication round is given time for. A round's limit grows with
/// its size: under a fixed limit, a batch (or a single large value) that a slow link
/// cannot carry in time is sent again and again, and never arrives.
const ROUND_MIN_BYTES_PER_SEC: f64 = (1 << 20) as f64;

/// How long a replication round of `bytes` may take.
fn round_limit(bytes: usize) -> Duration {
    ROUND_BASE + Duration::from_secs_f64(bytes as f64 / ROUND_MIN_BYTES_PER_SEC)
}

/// How long a snapshot's end waits for its position to be committed.
const SNAPSHOT_COMMIT_WAIT: Duration = Duration::from_secs(10);

/// Longest a snapshot stream may stand still before either side gives it up. The whole
/// has no limit: a large shard's snapshot takes as long as it takes. The leader holds
/// back the stream's end until the snapshot's position is committed, which takes a
/// replication round, and at most [`SNAPSHOT_COMMIT_WAIT`].
pub const SNAPSHOT_STALL: Duration = Duration::from_secs(30);

/// How often a snapshot under way is logged, on both sides.
const SNAPSHOT_PROGRESS_EVERY: Duration = Duration::from_secs(10);

async fn send_snapshot(
    leadership: &Leadership,
    peer: &Peer,
    http: &HttpClient,
    cfg: &StreamConfig,
) -> Result<Position, StreamError> {
    tracing::info!(follower = %peer.id, "follower needs entries the log no longer has; sending a snapshot");
    let started = Instant::now();
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(4);
    let store = leadership.store.clone();
    let chunk = cfg.snapshot_chunk;
    let records = tx.clone();
    let sent = Arc::new(AtomicU64::new(0));
    let counted = sent.clone();
    let follower = peer.id.clone();
    let export = tokio::task::spawn_blocking(move || {
        let mut progress = TransferLog::new(started);
        store.export_snapshot(chunk, |b| {
            let bytes = counted.fetch_add(b.len() as u64, Ordering::Relaxed) + b.len() as u64;
            if progress.due() {
                tracing::info!(%follower, mib = bytes >> 20, secs = started.elapsed().as_secs(), "sending a snapshot");
            }
            records.blocking_send(b).is_ok()
        })
    });
    let path = format!("/internal/snapshot?epoch={}", leadership.epoch);
    let sending = http.post_stream(&peer.address, &path, rx, SNAPSHOT_STALL);
    let ending = async move {
        let exported = export
            .await
            .map_err(|e| StreamError::Protocol(e.to_string()))??;
        // The follower makes the snapshot's position the base of its log, and a base is
        // never cut: it must be committed, or a failover could undo entries below it and
        // leave the follower diverged for good. Without the end, nothing is installed.
        leadership
            .wait_committed(exported.at.seq, SNAPSHOT_COMMIT_WAIT)
            .await?;
        tx.send(exported.end)
            .await
            .map_err(|_| StreamError::Protocol("the snapshot stream closed early".into()))?;
        Ok::<_, StreamError>(exported.at)
    };
    let (resp, at) = tokio::join!(sending, ending);
    let at = at?;
    let resp = resp?;
    check_answer(&resp, leadership.epoch)?;
    tracing::info!(
        follower = %peer.id,
        ?at,
        mib = sent.load(Ordering::Relaxed) >> 20,
        secs = started.elapsed().as_secs_f64(),
        "snapshot sent"
    );
    Ok(at)
}

/// When a long transfer is next due to be logged: a large snapshot takes minutes, and
/// both sides say every 10 s how far it got.
pub struct TransferLog {
    next: Instant,
}

impl TransferLog {
    /// Progress of a transfer that began at `started`.
    pub fn new(started: Instant) -> Self {
        TransferLog {
            next: started + SNAPSHOT_PROGRESS_EVERY,
        }
    }

    /// Whether it is time to log again; if so, the next time is one period on.
    pub fn due(&mut self) -> bool {
        let now = Instant::now();
        let due = now >= self.next;
        if due {
            self.next = now + SNAPSHOT_PROGRESS_EVERY;
        }
        due
    }
}

/// A follower's refusal as an error: 409 means it knows an epoch newer than `epoch`.
fn check_answer(resp: &Response, epoch: u64) -> Result<(), StreamError> {
    if resp.status == hyper::StatusCode::CONFLICT {
        return Err(StreamError::Stale(
            crate::api::epoch_in_error(&resp.body).unwrap_or(epoch + 1),
        ));
    }
    if !resp.status.is_success() {
        return Err(StreamError::Protocol(format!(
            "status {}: {}",
            resp.status,
            String::from_utf8_lossy(&resp.body)
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A log as a list of epochs: `epochs[i]` is the epoch of seq `base.seq + 1 + i`.
    struct VecLog {
        base: Position,
        epochs: Vec<u64>,
    }

    fn log(base: (u64, u64), epochs: &[u64]) -> VecLog {
        VecLog {
            base: Position::new(base.0, base.1),
            epochs: epochs.to_vec(),
        }
    }

    impl LogIndex for VecLog {
        type Error = ();
        fn last(&self) -> Position {
            match self.epochs.last() {
                Some(&e) => Position::new(e, self.base.seq + self.epochs.len() as u64),
                None => self.base,
            }
        }
        fn base(&self) -> Position {
            self.base
        }
        fn epoch_at(&self, seq: u64) -> Result<Option<u64>, ()> {
            if seq == self.base.seq {
                return Ok(Some(self.base.epoch));
            }
            if seq < self.base.seq {
                return Ok(None);
            }
            Ok(self.epochs.get((seq - self.base.seq - 1) as usize).copied())
        }
    }

    fn entries(from: u64, epochs: &[u64]) -> Vec<Position> {
        epochs
            .iter()
            .enumerate()
            .map(|(i, &e)| Position::new(e, from + i as u64))
            .collect()
    }

    fn p(e: u64, s: u64) -> Position {
        Position::new(e, s)
    }

    /// What a leader with `leader` sends from `next`: its `prev` and at most `max` entries.
    fn leader_round(leader: &VecLog, next: u64, max: u64) -> (Position, Vec<Position>) {
        let at = |s| p(leader.epoch_at(s).unwrap().unwrap(), s);
        let last = leader.last().seq.min(next.saturating_add(max - 1));
        (at(next - 1), (next..=last).map(at).collect())
    }

    fn append(truncate_after: Option<u64>, skip: usize) -> Result<AppendPlan, ()> {
        Ok(AppendPlan::Append {
            truncate_after,
            skip,
        })
    }

    fn mismatch(conflict: Option<Position>) -> Result<AppendPlan, ()> {
        Ok(AppendPlan::Mismatch { conflict })
    }

    fn put(epoch: u64, seq: u64) -> LogEntry {
        LogEntry {
            epoch,
            seq,
            slot: 0,
            key: Bytes::from_static(b"k"),
            op: crate::storage::Op::Put(Bytes::from_static(b"v")),
        }
    }

    #[test]
    fn a_batch_must_follow_prev_one_by_one_within_its_epoch() {
        let prev = p(1, 4);
        let place = |batch: &[LogEntry]| out_of_place(prev, 2, batch).map(|(at, e)| (at, e.seq));
        assert_eq!(place(&[]), None);
        assert_eq!(place(&[put(1, 5), put(2, 6), put(2, 7)]), None);
        assert_eq!(place(&[put(2, 6)]), Some((5, 6)), "a gap after prev");
        assert_eq!(place(&[put(2, 5), put(2, 5)]), Some((6, 5)), "a repeat");
        assert_eq!(place(&[put(2, 5), put(2, 7)]), Some((6, 7)), "a hole");
        assert_eq!(
            place(&[put(2, 5), put(3, 6)]),
            Some((6, 6)),
            "an epoch above the sender's"
        );
    }

    #[test]
    fn empty_log_accepts_from_the_start() {
        let l = log((0, 0), &[]);
        assert_eq!(
            plan_append(&l, 1, p(0, 0), &entries(1, &[1, 1]), 2),
            append(None, 0)
        );
    }

    #[test]
    fn empty_log_refuses_a_later_prev() {
        let l = log((0, 0), &[]);
        assert_eq!(
            plan_append(&l, 1, p(1, 5), &entries(6, &[1]), 6),
            mismatch(None)
        );
    }

    #[test]
    fn gap_is_a_mismatch_without_conflict() {
        let l = log((0, 0), &[1, 1, 1]);
        assert_eq!(
            plan_append(&l, 1, p(1, 7), &entries(8, &[1]), 8),
            mismatch(None)
        );
    }

    #[test]
    fn matching_prev_appends() {
        let l = log((0, 0), &[1, 1, 2]);
        assert_eq!(
            plan_append(&l, 2, p(2, 3), &entries(4, &[2, 2]), 5),
            append(None, 0)
        );
    }

    #[test]
    fn entries_already_held_are_skipped_not_truncated() {
        // A duplicate delivery of entries 2..3 must not cut entries 4..5.
        let l = log((0, 0), &[1, 1, 1, 1, 1]);
        assert_eq!(
            plan_append(&l, 1, p(1, 1), &entries(2, &[1, 1]), 9),
            append(None, 2)
        );
    }

    #[test]
    fn a_longer_suffix_from_older_epochs_is_cut_at_the_leader_end() {
        // The deposed leader wrote 4..6 at epoch 1; the new leader (epoch 2) ends at 3.
        let l = log((0, 0), &[1, 1, 1, 1, 1, 1]);
        assert_eq!(plan_append(&l, 2, p(1, 3), &[], 3), append(Some(3), 0));
        // Entries of the current epoch are never cut by a shorter (delayed) batch.
        let l = log((0, 0), &[1, 1, 2, 2, 2]);
        assert_eq!(plan_append(&l, 2, p(2, 3), &[], 3), append(None, 0));
    }

    #[test]
    fn divergent_suffix_is_cut_at_the_first_differing_epoch() {
        // Seqs 4..5 were written by a deposed leader at epoch 2; the new leader (epoch 3)
        // has 4 at epoch 3.
        let l = log((0, 0), &[1, 1, 1, 2, 2]);
        assert_eq!(
            plan_append(&l, 3, p(1, 3), &entries(4, &[3, 3]), 5),
            append(Some(3), 0)
        );
    }

    #[test]
    fn conflicting_prev_reports_the_start_of_the_conflicting_epoch() {
        let l = log((0, 0), &[1, 1, 2, 2, 2]);
        assert_eq!(
            plan_append(&l, 3, p(3, 5), &entries(6, &[3]), 6),
            mismatch(Some(p(2, 3)))
        );
    }

    #[test]
    fn epoch_boundary_at_prev_matches() {
        let l = log((0, 0), &[1, 1, 2]);
        assert_eq!(
            plan_append(&l, 3, p(1, 2), &entries(3, &[2, 3]), 4),
            append(None, 1)
        );
    }

    #[test]
    fn entries_covered_by_a_snapshot_are_skipped() {
        // Base at 10 from a snapshot; the leader resends from 8.
        let l = log((2, 10), &[2]);
        assert_eq!(
            plan_append(&l, 2, p(2, 7), &entries(8, &[2, 2, 2, 2, 2]), 12),
            append(None, 4)
        );
    }

    fn diverged() -> Result<AppendPlan, ()> {
        Ok(AppendPlan::Diverged)
    }

    #[test]
    fn a_trimmed_prefix_the_leader_lacks_is_diverged() {
        // Trimmed to 15 under the leader of epoch 1; the leader of epoch 2 had only 1..=5
        // of it and wrote 6..=25.
        let l = log((1, 15), &[1; 5]);
        let new = entries(6, &[2; 20]);
        assert_eq!(plan_append(&l, 2, p(1, 5), &new, 25), diverged());
        // Walked back to the base itself, or from it, the answer is the same.
        assert_eq!(plan_append(&l, 2, p(2, 15), &new[10..], 25), diverged());
        assert_eq!(
            plan_append(&l, 2, p(0, 0), &entries(1, &[1; 5]), 25),
            append(None, 5)
        );
        assert_eq!(
            plan_append(&l, 2, p(1, 5), &new[..3], 25),
            diverged(),
            "an epoch above the base's at or below it"
        );
        assert_eq!(plan_append(&l, 2, p(2, 7), &[], 25), diverged());
        // The leader's log ends before the base: it will write its own epoch there.
        assert_eq!(plan_append(&l, 2, p(1, 5), &[], 5), diverged());
    }

    #[test]
    fn a_trimmed_prefix_is_trusted_once_the_leader_shows_the_base() {
        let l = log((1, 15), &[1; 5]);
        // The leader's entry at the base has its epoch: both logs agree up to there.
        let same = entries(11, &[1, 1, 1, 1, 1, 1, 1, 2]);
        assert_eq!(plan_append(&l, 2, p(1, 10), &same, 18), append(Some(17), 7));
        assert_eq!(
            plan_append(&l, 2, p(1, 15), &same[5..], 18),
            append(Some(17), 2)
        );
        // A batch that stops short of the base shows nothing wrong yet: nothing to do.
        assert_eq!(
            plan_append(&l, 2, p(1, 5), &entries(6, &[1; 3]), 18),
            append(None, 3)
        );
        // A shorter log of the leader of the base's own epoch is a delayed batch.
        let l = log((2, 15), &[2; 5]);
        assert_eq!(
            plan_append(&l, 2, p(2, 5), &entries(6, &[2; 3]), 8),
            append(None, 3)
        );
    }

    /// Follower and leader logs (the epoch of each entry) that share a prefix and then
    /// differ, for the simulations below.
    const DIVERGING: &[(&[u64], &[u64])] = &[
        (&[1, 2, 2, 4, 4, 4, 4], &[1, 2, 3, 3, 5]),
        (&[1, 1, 1, 1, 1, 1], &[1, 1]),
        (&[2, 2, 2], &[1, 3, 3, 3]),
    ];

    /// Plays the leader and follower rules against each other, batches of at most three
    /// entries, for followers trimmed at every point of their log: a follower keeps its
    /// trimmed prefix only when it equals the leader's, and otherwise gets a snapshot.
    #[test]
    fn a_trimmed_follower_keeps_only_a_prefix_equal_to_the_leaders() {
        let shapes: &[(&[u64], &[u64])] = &[
            (
                &[1; 20],
                &[
                    1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2,
                ],
            ),
            (&[1; 20], &[1; 5]),
            (&[1; 10], &[1; 12]),
            (&[1, 1, 1, 2, 2, 2], &[1, 1, 1, 3, 3]),
            (&[1, 1, 2, 2], &[1, 1, 2, 2, 3, 3]),
        ];
        for (follower, leader) in shapes.iter().chain(DIVERGING) {
            let leader_log = log((0, 0), leader);
            let epoch = leader.iter().chain(follower.iter()).max().unwrap() + 1;
            for trim in 0..=follower.len() {
                let base = p(if trim == 0 { 0 } else { follower[trim - 1] }, trim as u64);
                let mut f = log((base.epoch, base.seq), &follower[trim..]);
                let mut prefix = follower[..trim].to_vec();
                let mut snapshots = 0;
                let mut next = leader_log.last().seq + 1;
                for _round in 0..50 {
                    let (prev, batch) = leader_round(&leader_log, next, 3);
                    match plan_append(&f, epoch, prev, &batch, leader_log.last().seq).unwrap() {
                        AppendPlan::Append {
                            truncate_after,
                            skip,
                        } => {
                            if let Some(t) = truncate_after {
                                assert!(t >= f.base.seq, "cut below the base");
                                f.epochs.truncate((t - f.base.seq) as usize);
                            }
                            if let Some(first) = batch.get(skip) {
                                assert_eq!(first.seq, f.last().seq + 1, "a gap");
                            }
                            f.epochs.extend(batch[skip..].iter().map(|p| p.epoch));
                            if prev.seq + batch.len() as u64 == leader_log.last().seq {
                                break;
                            }
                            next = prev.seq + batch.len() as u64 + 1;
                        }
                        AppendPlan::Mismatch { conflict } => {
                            next = match next_after_mismatch(&leader_log, prev, f.last(), conflict)
                            {
                                NextStep::From(n) => n,
                                NextStep::Snapshot => panic!("the leader trims nothing"),
                            };
                        }
                        AppendPlan::Diverged => {
                            snapshots += 1;
                            f = log((leader_log.last().epoch, leader_log.last().seq), &[]);
                            prefix = leader.to_vec();
                            break;
                        }
                    }
                }
                let whole: Vec<u64> = prefix.iter().chain(&f.epochs).copied().collect();
                let case = format!("follower {follower:?} trimmed to {trim}, leader {leader:?}");
                assert_eq!(&whole, leader, "{case}: did not converge");
                let prefix_differs = leader.get(..trim) != Some(&follower[..trim]);
                assert_eq!(
                    snapshots > 0,
                    prefix_differs,
                    "{case}: snapshots {snapshots}"
                );
            }
        }
    }

    /// A write waiting for the commit point of a leadership that ends (a new role or
    /// term) is answered at once rather than after the whole replication timeout.
    #[tokio::test]
    async fn a_wait_for_the_commit_point_ends_with_the_leadership() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), Arc::new(())).unwrap();
        let peers = vec!["me".to_string(), "other".to_string()];
        let leadership = Leadership::new("me".into(), 1, AckMode::Sync, peers, store.clone());
        assert_eq!(leadership.wait_committed(0, Duration::ZERO).await, Ok(()));
        let limit = Duration::from_millis(50);
        assert_eq!(
            leadership.wait_committed(1, limit).await,
            Err(Uncommitted::TimedOut),
            "nothing confirms seq 1"
        );
        let waiting = tokio::spawn({
            let leadership = leadership.clone();
            async move { leadership.wait_committed(1, Duration::from_secs(10)).await }
        });
        tokio::task::yield_now().await;
        leadership.end();
        assert_eq!(waiting.await.unwrap(), Err(Uncommitted::Ended));
        assert_eq!(leadership.deposed(), Some(1));
    }

    /// A follower's stream started again (a new address: the process restarted) counts
    /// nothing it acknowledged before; a follower no longer a peer is not reported.
    #[tokio::test]
    async fn a_restarted_follower_starts_from_nothing_and_a_removed_one_is_forgotten() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), Arc::new(())).unwrap();
        let leadership = Leadership::new("me".into(), 1, AckMode::Sync, vec![], store);
        let acked = |l: &Leadership| -> Vec<(String, u64)> {
            l.follower_acks()
                .into_iter()
                .map(|a| (a.id, a.acked_seq))
                .collect()
        };
        leadership.register("f");
        leadership.record_ack("f", 5);
        assert_eq!(acked(&leadership), vec![("f".to_string(), 5)]);
        leadership.register("f");
        assert_eq!(acked(&leadership), vec![("f".to_string(), 0)]);
        leadership.forget("f");
        assert_eq!(acked(&leadership), vec![]);
    }

    /// A follower that answers with a shorter log than it acknowledged (its volume was
    /// replaced behind the same address, so its stream never started again) stops being
    /// reported in sync: the control plane must not promote it for what it no longer has.
    #[tokio::test]
    async fn a_follower_back_with_less_than_it_acknowledged_is_no_longer_reported_in_sync() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), Arc::new(())).unwrap();
        store.raise_epoch(1).await.unwrap();
        let put = |k: &'static str| {
            let key = Bytes::from_static(k.as_bytes());
            let slot = crate::slots::slot_for(&key);
            let op = crate::storage::Op::Put(Bytes::from_static(b"v"));
            store.write(1, slot, key, op, crate::storage::Condition::None)
        };
        put("a").await.unwrap();
        let members = vec!["me".to_string(), "f".to_string()];
        let leadership = Leadership::new("me".into(), 1, AckMode::Sync, members, store.clone());
        leadership.register("f");
        leadership.record_ack("f", 1);
        for k in ["b", "c", "d", "e"] {
            put(k).await.unwrap();
        }
        leadership.record_ack("f", 5);
        assert_eq!(leadership.confirmed_in_sync(), vec!["me", "f"]);
        // The stream's next batch (prev 1-5) finds an empty log there.
        leadership.lower_ack("f", held_at_most(p(0, 0), None));
        assert_eq!(leadership.confirmed_in_sync(), vec!["me"]);
        // Catching up past where it joined (1) is not enough: it lacks 2..=5.
        leadership.record_ack("f", 3);
        assert_eq!(leadership.confirmed_in_sync(), vec!["me"]);
        leadership.record_ack("f", 5);
        assert_eq!(leadership.confirmed_in_sync(), vec!["me", "f"]);
        assert_eq!(held_at_most(p(1, 9), Some(p(1, 4))), 3);
        assert_eq!(held_at_most(p(1, 2), Some(p(1, 4))), 2);
        assert_eq!(held_at_most(p(2, 7), None), 7);
    }

    #[test]
    fn a_follower_counts_as_committed_only_what_the_round_matched() {
        let appended = AppendOutcome::Appended { last: p(3, 50) };
        // Its log runs to 50, but only 10..=12 were checked against the leader's.
        assert_eq!(known_committed(&appended, p(2, 9), 3, 40), Some(12));
        assert_eq!(known_committed(&appended, p(2, 9), 3, 11), Some(11));
        assert_eq!(
            known_committed(&appended, p(2, 9), 0, 40),
            Some(9),
            "a heartbeat"
        );
        let refused = AppendOutcome::Mismatch {
            last: p(1, 50),
            conflict: Some(p(1, 20)),
        };
        assert_eq!(known_committed(&refused, p(2, 30), 3, 40), None);
    }

    #[test]
    fn leader_walks_back_to_the_follower_end_on_a_gap() {
        let leader = log((0, 0), &[1; 20]);
        assert_eq!(
            next_after_mismatch(&leader, p(1, 20), p(1, 7), None),
            NextStep::From(8)
        );
    }

    #[test]
    fn leader_walks_back_a_whole_epoch_on_conflict() {
        let leader = log((0, 0), &[1, 1, 3, 3, 3, 3]);
        assert_eq!(
            next_after_mismatch(&leader, p(3, 5), p(2, 5), Some(p(2, 3))),
            NextStep::From(3)
        );
    }

    #[test]
    fn leader_sends_a_snapshot_when_it_trimmed_what_is_needed() {
        let leader = log((1, 100), &[1, 1]);
        assert_eq!(
            next_after_mismatch(&leader, p(1, 102), p(1, 40), None),
            NextStep::Snapshot
        );
        // Exactly at the base is still fine: the base's epoch is known.
        assert_eq!(
            next_after_mismatch(&leader, p(1, 102), p(1, 100), None),
            NextStep::From(101)
        );
    }

    #[test]
    fn mismatch_always_moves_back() {
        let leader = log((0, 0), &[1; 50]);
        for sent in 1..50 {
            for last in 0..60 {
                if let NextStep::From(n) =
                    next_after_mismatch(&leader, p(1, sent), p(1, last), None)
                {
                    assert!(
                        n <= sent,
                        "sent prev {sent}, follower last {last}, next {n}"
                    );
                }
            }
        }
    }

    /// Plays the leader and follower rules against each other until they agree, for many
    /// pairs of logs that share a prefix and then diverge.
    #[test]
    fn follower_converges_to_the_leader_log() {
        let shapes: &[(&[u64], &[u64])] = &[
            (&[], &[1, 1, 1]),
            (&[1, 1, 1], &[1, 1, 1, 1, 1]),
            (&[1, 1, 2, 2, 2], &[1, 1, 3, 3]),
        ];
        for (follower, leader) in shapes.iter().chain(DIVERGING) {
            let leader_log = log((0, 0), leader);
            // Any leader change raises the epoch above every entry either log holds.
            let epoch = leader.iter().chain(follower.iter()).max().unwrap() + 1;
            let mut f = follower.to_vec();
            let mut next = leader_log.last().seq + 1;
            for _round in 0..20 {
                let (prev, batch) = leader_round(&leader_log, next, u64::MAX);
                let fl = log((0, 0), &f);
                match plan_append(&fl, epoch, prev, &batch, leader_log.last().seq).unwrap() {
                    AppendPlan::Append {
                        truncate_after,
                        skip,
                    } => {
                        if let Some(t) = truncate_after {
                            f.truncate(t as usize);
                        }
                        f.extend(batch[skip..].iter().map(|p| p.epoch));
                        break;
                    }
                    AppendPlan::Mismatch { conflict } => {
                        next = match next_after_mismatch(&leader_log, prev, fl.last(), conflict) {
                            NextStep::From(n) => n,
                            NextStep::Snapshot => panic!("no trimming here"),
                        };
                    }
                    AppendPlan::Diverged => panic!("nothing trimmed, nothing below a base"),
                }
            }
            assert_eq!(&f, leader, "follower {follower:?} did not converge");
        }
    }
}
