//! The control core: pure decisions about leadership, in-sync membership and topology.
//!
//! Two drivers use it: the playground (child processes, a state file) and the operator
//! (Pods, the KvCluster status). Each round a driver observes every replica, calls
//! [`decide`], persists [`Decision::state`] and applies [`Decision::actions`] in order.
//! Nothing here does I/O or reads a clock; time arrives as `now_ms`, a monotonic
//! millisecond counter owned by the driver.
//!
//! Why this is safe, in short:
//! - Every committed write is on every member of the shard's recorded in-sync set, because
//!   the set only grows after the leader confirms it enforces the new member *and* that
//!   member already holds everything committed (see [`ShardControl::epoch_start_seq`]),
//!   while it shrinks in the record before the leader is told. Promotion picks only from
//!   that set, so it never loses a committed write.
//! - Every leadership is granted at an epoch above any epoch observed or recorded for the
//!   shard, so no two replicas ever lead in the same epoch, and fencing on the nodes turns
//!   away a deposed leader.
//! - A leader that might still be serving (unreachable, liveness unknown) is replaced only
//!   after the last lease the control plane granted it has run out, plus a grace period.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::slots::{SLOT_COUNT, even_ranges};
use crate::topology::{ReplicaInfo, Role, ShardInfo, Topology};
use crate::wire::{AckMode, FollowerAck, NodeStatus, Peer, RoleRequest};

/// Consecutive caught-up rounds a follower needs before it is proposed for the in-sync set.
///
/// Together with a minimum caught-up time of `in_sync_timeout_ms` this is the flapping
/// hold-down: a follower must stay caught up for as long as we would wait before declaring
/// it lagging, and for several observations, so one lucky poll does not re-add it.
pub const REJOIN_MIN_ROUNDS: u32 = 3;

/// The desired cluster and the timing knobs of the control loop.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ClusterSpec {
    /// Number of shards.
    pub shards: u32,
    /// Replicas per shard, leader included.
    pub replicas_per_shard: u32,
    /// Fewest in-sync members (leader included) the control plane keeps and a leader needs for writes.
    pub min_in_sync: u32,
    /// How leaders acknowledge writes.
    pub mode: AckMode,
    /// Lease granted to a leader on every renewal.
    pub lease_ms: u64,
    /// Extra wait past the lease before replacing an unreachable leader (delivery delay, clock drift).
    pub failover_grace_ms: u64,
    /// Silence after which a follower leaves the in-sync set; also the rejoin hold-down time.
    pub in_sync_timeout_ms: u64,
    /// Entries a follower may trail the leader by and still be proposed for the in-sync set.
    pub catch_up_lag: u64,
}

/// Why a [`ClusterSpec`] cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpecError {
    /// Shard count is zero or larger than the slot count.
    #[error("shards must be between 1 and {SLOT_COUNT}, got {0}")]
    Shards(u32),
    /// A shard needs at least one replica.
    #[error("replicasPerShard must be at least 1")]
    NoReplicas,
    /// `min_in_sync` is outside `1..=replicas_per_shard`.
    #[error("minInSync must be between 1 and replicasPerShard ({replicas}), got {min}")]
    MinInSync {
        /// The configured minimum.
        min: u32,
        /// Replicas per shard.
        replicas: u32,
    },
    /// A zero lease would make every leader stop serving at once.
    #[error("leaseMs must be positive")]
    ZeroLease,
}

impl ClusterSpec {
    /// Checks the spec; [`decide`] assumes a valid one.
    pub fn validate(&self) -> Result<(), SpecError> {
        if self.shards == 0 || self.shards > u32::from(SLOT_COUNT) {
            return Err(SpecError::Shards(self.shards));
        }
        if self.replicas_per_shard == 0 {
            return Err(SpecError::NoReplicas);
        }
        if self.min_in_sync == 0 || self.min_in_sync > self.replicas_per_shard {
            return Err(SpecError::MinInSync {
                min: self.min_in_sync,
                replicas: self.replicas_per_shard,
            });
        }
        if self.lease_ms == 0 {
            return Err(SpecError::ZeroLease);
        }
        Ok(())
    }

    fn failover_after_ms(&self) -> u64 {
        self.lease_ms.saturating_add(self.failover_grace_ms)
    }
}

/// The id of replica `index` of `shard`, e.g. `s0-r1`.
pub fn replica_id(shard: u32, index: u32) -> String {
    format!("s{shard}-r{index}")
}

/// What the driver saw of one replica this round.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Observation {
    /// Replica id, e.g. `s0-r1`.
    pub replica: String,
    /// Shard the replica belongs to.
    pub shard: u32,
    /// Current `host:port`, when the driver knows it.
    pub address: Option<String>,
    /// Its `GET /internal/status`; `None` when it could not be reached.
    pub status: Option<NodeStatus>,
    /// `Some(false)`: the driver knows the process or Pod is dead; `None`: unknown.
    pub process_alive: Option<bool>,
}

/// Remembered between rounds by the driver (playground: a file; operator: KvCluster status).
///
/// Times in here are in the clock of the driver that wrote them. A driver that loads this
/// in a new process must call [`ControlState::resume`] first; otherwise a clock that jumped
/// forward could make a leader's lease look expired while it still runs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ControlState {
    /// The topology as last published.
    pub topology: Topology,
    /// Per-shard bookkeeping, one per topology shard.
    #[serde(default)]
    pub shards: Vec<ShardControl>,
}

/// Why a shard cannot take writes right now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Unavailable {
    /// No leader yet, and not every replica is reachable to pick one safely.
    AwaitingReplicas,
    /// The leader is unreachable and its lease may still be running.
    LeaderUnreachable,
    /// The promoted replica has not taken its role yet.
    AwaitingLeader,
    /// The leader is gone and no in-sync replica is reachable to replace it.
    NoInSyncReplica,
}

/// Control bookkeeping of one shard.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ShardControl {
    /// Shard id.
    pub shard: u32,
    /// In-sync set that counts for promotion (leader included), in replica order.
    #[serde(default)]
    pub in_sync: Vec<String>,
    /// Followers the leader was asked to add whose membership it has not confirmed yet.
    #[serde(default)]
    pub pending_in_sync: Vec<String>,
    /// When the control plane last sent the current leader its role (granting a lease).
    #[serde(default)]
    pub lease_granted_ms: u64,
    /// Highest epoch ever observed or assigned in this shard.
    #[serde(default)]
    pub max_epoch_seen: u64,
    /// The leader's last sequence number when its leadership began.
    ///
    /// Every write committed before this epoch is at or below it, so a follower that has
    /// acknowledged this far at the current epoch holds all of them; the leader's own
    /// `commit_seq` may lag behind right after a failover.
    #[serde(default)]
    pub epoch_start_seq: u64,
    /// Why the shard cannot take writes; events fire only when this changes.
    #[serde(default)]
    pub unavailable: Option<Unavailable>,
    /// Per-replica bookkeeping, in replica order.
    #[serde(default)]
    pub replicas: Vec<ReplicaControl>,
}

/// Control bookkeeping of one replica.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ReplicaControl {
    /// Replica id.
    pub id: String,
    /// Start of its current caught-up streak.
    #[serde(default)]
    pub caught_up_since_ms: Option<u64>,
    /// Rounds in its current caught-up streak.
    #[serde(default)]
    pub caught_up_rounds: u32,
    /// First round of its current unreachable streak.
    #[serde(default)]
    pub unreachable_since_ms: Option<u64>,
}

/// The outcome of one control round.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Decision {
    /// What the driver must do, in order.
    pub actions: Vec<Action>,
    /// What happened, for logs, Kubernetes Events and metrics.
    pub events: Vec<Event>,
    /// State to persist and pass to the next round.
    pub state: ControlState,
}

/// Something the driver must do.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Action {
    /// `POST /internal/role` to `address`; re-sending is idempotent and renews the lease.
    SendRole {
        /// Replica id.
        replica: String,
        /// Where to send it.
        address: String,
        /// The assignment.
        request: RoleRequest,
    },
    /// Push this topology to every router.
    PublishTopology(Topology),
    /// Start the replica's process again (the driver applies its own backoff).
    Restart {
        /// Replica id.
        replica: String,
    },
}

/// Something that happened this round.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Event {
    /// `replica` leads `shard` from `epoch` on; `previous` is `None` at bootstrap and equals
    /// `replica` when only the epoch was raised.
    Promoted {
        /// Shard id.
        shard: u32,
        /// New leader.
        replica: String,
        /// Its epoch.
        epoch: u64,
        /// The leader it replaces.
        previous: Option<String>,
    },
    /// A running leader the state did not know about (lost or stale state) was taken over as is.
    Adopted {
        /// Shard id.
        shard: u32,
        /// The running leader.
        replica: String,
        /// Its epoch.
        epoch: u64,
    },
    /// A replica still acting as leader at a stale epoch was told to follow.
    Demoted {
        /// Shard id.
        shard: u32,
        /// The stale leader.
        replica: String,
        /// The epoch it claimed.
        stale_epoch: u64,
        /// The shard's current epoch.
        epoch: u64,
    },
    /// The in-sync set that counts for promotion changed.
    InSyncChanged {
        /// Shard id.
        shard: u32,
        /// New set, leader included.
        in_sync: Vec<String>,
    },
    /// The shard stopped being able to take writes.
    ShardUnavailable {
        /// Shard id.
        shard: u32,
        /// Why.
        reason: Unavailable,
    },
    /// The shard has a serving leader again.
    ShardAvailable {
        /// Shard id.
        shard: u32,
    },
}

impl fmt::Display for Unavailable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Unavailable::AwaitingReplicas => {
                "waiting for every replica to report before electing a leader"
            }
            Unavailable::LeaderUnreachable => {
                "leader unreachable; waiting for its lease to run out"
            }
            Unavailable::AwaitingLeader => "waiting for the promoted replica to take its role",
            Unavailable::NoInSyncReplica => "leader lost and no in-sync replica reachable",
        })
    }
}

impl fmt::Display for Event {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Event::Promoted {
                shard,
                replica,
                epoch,
                previous: None,
            } => write!(
                f,
                "shard {shard}: {replica} elected leader at epoch {epoch}"
            ),
            Event::Promoted {
                shard,
                replica,
                epoch,
                previous: Some(previous),
            } if previous == replica => {
                write!(
                    f,
                    "shard {shard}: {replica} keeps leading at new epoch {epoch}"
                )
            }
            Event::Promoted {
                shard,
                replica,
                epoch,
                previous: Some(previous),
            } => write!(
                f,
                "shard {shard}: {replica} promoted to leader at epoch {epoch}, replacing {previous}"
            ),
            Event::Adopted {
                shard,
                replica,
                epoch,
            } => write!(
                f,
                "shard {shard}: adopted running leader {replica} at epoch {epoch}"
            ),
            Event::Demoted {
                shard,
                replica,
                stale_epoch,
                epoch,
            } => write!(
                f,
                "shard {shard}: {replica} still leads at stale epoch {stale_epoch}; demoted to follower at epoch {epoch}"
            ),
            Event::InSyncChanged { shard, in_sync } => {
                write!(
                    f,
                    "shard {shard}: in-sync set is now [{}]",
                    in_sync.join(", ")
                )
            }
            Event::ShardUnavailable { shard, reason } => {
                write!(f, "shard {shard} unavailable: {reason}")
            }
            Event::ShardAvailable { shard } => write!(f, "shard {shard} available again"),
        }
    }
}

/// A cluster nobody has led yet: version 0 topology, no leaders, slots split evenly.
pub fn initial_state(spec: &ClusterSpec) -> ControlState {
    let shards = (0..spec.shards)
        .zip(even_ranges(spec.shards))
        .map(|(id, range)| ShardInfo {
            id,
            epoch: 0,
            leader: None,
            slot_ranges: vec![range],
            replicas: (0..spec.replicas_per_shard)
                .map(|r| ReplicaInfo {
                    id: replica_id(id, r),
                    address: String::new(),
                    role: Role::Unassigned,
                    in_sync: false,
                })
                .collect(),
        })
        .collect::<Vec<_>>();
    let controls = shards.iter().map(ShardControl::for_shard).collect();
    ControlState {
        topology: Topology {
            version: 0,
            shards,
            ..Topology::default()
        },
        shards: controls,
    }
}

impl ControlState {
    /// Rebases every remembered time onto a new driver clock, after loading persisted state.
    ///
    /// Treats the last lease grant as happening now, which can only delay a failover, and
    /// restarts every hold-down, which can only delay a rejoin.
    pub fn resume(&mut self, now_ms: u64) {
        for ctl in &mut self.shards {
            ctl.lease_granted_ms = now_ms;
            for r in &mut ctl.replicas {
                r.caught_up_since_ms = None;
                r.caught_up_rounds = 0;
                if r.unreachable_since_ms.is_some() {
                    r.unreachable_since_ms = Some(now_ms);
                }
            }
        }
    }
}

impl ShardControl {
    fn for_shard(shard: &ShardInfo) -> ShardControl {
        ShardControl {
            shard: shard.id,
            ..ShardControl::default()
        }
    }

    /// A clock that went backwards means a new driver clock; fall back to `resume` semantics.
    fn clamp_clock(&mut self, now: u64) {
        self.lease_granted_ms = self.lease_granted_ms.min(now);
        for r in &mut self.replicas {
            if r.caught_up_since_ms.is_some_and(|t| t > now) {
                r.caught_up_since_ms = None;
                r.caught_up_rounds = 0;
            }
            if let Some(t) = &mut r.unreachable_since_ms {
                *t = (*t).min(now);
            }
        }
    }
}

/// Runs one control round: observe, decide, and return actions, events and the next state.
pub fn decide(
    spec: &ClusterSpec,
    state: &ControlState,
    observations: &[Observation],
    now_ms: u64,
) -> Decision {
    let mut state = state.clone();
    let mut actions = Vec::new();
    let mut events = Vec::new();
    let ControlState { topology, shards } = &mut state;
    // Align bookkeeping with the topology so a hand-edited or older state still works.
    *shards = topology
        .shards
        .iter()
        .map(|s| {
            shards
                .iter()
                .find(|c| c.shard == s.id)
                .cloned()
                .unwrap_or_else(|| ShardControl::for_shard(s))
        })
        .collect();
    let mut changed = false;
    for (shard, ctl) in topology.shards.iter_mut().zip(shards.iter_mut()) {
        let before = shard.clone();
        ShardRound::new(
            spec,
            shard,
            ctl,
            observations,
            now_ms,
            &mut actions,
            &mut events,
        )
        .run();
        changed |= *shard != before;
    }
    if changed {
        topology.version += 1;
        actions.push(Action::PublishTopology(topology.clone()));
    }
    Decision {
        actions,
        events,
        state,
    }
}

/// How the driver sees one replica this round.
#[derive(Clone, Copy)]
enum Seen<'o> {
    /// It answered its status.
    Up(&'o NodeStatus),
    /// It did not answer and the driver knows its process is dead.
    Dead,
    /// It did not answer; it may still be running.
    Unknown,
}

impl<'o> Seen<'o> {
    fn of(observation: Option<&'o Observation>) -> Seen<'o> {
        match observation {
            Some(Observation {
                status: Some(status),
                ..
            }) => Seen::Up(status),
            // A replica that answers is alive whatever the driver believes, so "dead" needs both.
            Some(Observation {
                process_alive: Some(false),
                ..
            }) => Seen::Dead,
            _ => Seen::Unknown,
        }
    }

    fn status(self) -> Option<&'o NodeStatus> {
        match self {
            Seen::Up(s) => Some(s),
            _ => None,
        }
    }
}

/// Where the shard's leadership stands after this round's leadership decision.
#[derive(Clone, Copy)]
enum Lead {
    /// Nobody leads yet.
    Absent,
    /// `idx` leads and gets its role (and lease); `settled` when it already led at this
    /// epoch before this round, so its report describes the current assignment.
    Serving { idx: usize, settled: bool },
    /// `idx` is recorded as leader but must not get a lease now.
    Lost { idx: usize },
}

/// Log position used to rank replicas: later epoch first, then longer log.
fn position(s: &NodeStatus) -> (u64, u64) {
    (s.last_epoch, s.last_seq)
}

/// Refreshes the per-replica role and in-sync flags of the topology from the control state.
fn refresh_replicas(shard: &mut ShardInfo, ctl: &ShardControl) {
    let has_leader = shard.leader.is_some();
    for r in &mut shard.replicas {
        r.role = if shard.leader.as_deref() == Some(r.id.as_str()) {
            Role::Leader
        } else if has_leader {
            Role::Follower
        } else {
            Role::Unassigned
        };
        r.in_sync = ctl.in_sync.contains(&r.id);
    }
}

struct ShardRound<'a, 'o> {
    spec: &'a ClusterSpec,
    shard: &'a mut ShardInfo,
    ctl: &'a mut ShardControl,
    seen: Vec<Seen<'o>>,
    addresses: Vec<Option<&'o str>>,
    now: u64,
    actions: &'a mut Vec<Action>,
    events: &'a mut Vec<Event>,
}

impl<'a, 'o> ShardRound<'a, 'o> {
    fn new(
        spec: &'a ClusterSpec,
        shard: &'a mut ShardInfo,
        ctl: &'a mut ShardControl,
        observations: &'o [Observation],
        now: u64,
        actions: &'a mut Vec<Action>,
        events: &'a mut Vec<Event>,
    ) -> Self {
        let found: Vec<Option<&'o Observation>> = shard
            .replicas
            .iter()
            .map(|r| {
                observations
                    .iter()
                    .find(|o| o.shard == shard.id && o.replica == r.id)
            })
            .collect();
        ShardRound {
            spec,
            seen: found.iter().map(|o| Seen::of(*o)).collect(),
            addresses: found
                .iter()
                .map(|o| {
                    o.and_then(|o| o.address.as_deref())
                        .filter(|a| !a.is_empty())
                })
                .collect(),
            shard,
            ctl,
            now,
            actions,
            events,
        }
    }

    fn run(mut self) {
        self.ctl.clamp_clock(self.now);
        self.observe();
        let before = self.ctl.in_sync.clone();
        let lead = self.leadership();
        if let Lead::Serving { idx, settled: true } = lead {
            self.maintain_in_sync(idx);
        }
        self.send_roles(lead);
        refresh_replicas(self.shard, self.ctl);
        if self.ctl.in_sync != before {
            self.events.push(Event::InSyncChanged {
                shard: self.shard.id,
                in_sync: self.ctl.in_sync.clone(),
            });
        }
    }

    fn id(&self, idx: usize) -> &str {
        &self.shard.replicas[idx].id
    }

    fn index_of(&self, id: &str) -> Option<usize> {
        self.shard.replicas.iter().position(|r| r.id == id)
    }

    /// Sorts ids into replica order and drops unknown ones, so sets compare and print stably.
    fn ordered<'s>(&self, ids: impl IntoIterator<Item = &'s str>) -> Vec<String> {
        let set: BTreeSet<&str> = ids.into_iter().collect();
        self.shard
            .replicas
            .iter()
            .filter(|r| set.contains(r.id.as_str()))
            .map(|r| r.id.clone())
            .collect()
    }

    /// Records addresses, epochs and reachability; asks for restarts of dead replicas.
    fn observe(&mut self) {
        for (r, addr) in self.shard.replicas.iter_mut().zip(&self.addresses) {
            if let Some(addr) = addr {
                if r.address != *addr {
                    r.address = (*addr).to_owned();
                }
            }
        }
        let old = std::mem::take(&mut self.ctl.replicas);
        self.ctl.replicas = self
            .shard
            .replicas
            .iter()
            .map(|r| {
                old.iter()
                    .find(|c| c.id == r.id)
                    .cloned()
                    .unwrap_or_else(|| ReplicaControl {
                        id: r.id.clone(),
                        ..ReplicaControl::default()
                    })
            })
            .collect();
        for (i, seen) in self.seen.iter().enumerate() {
            let rc = &mut self.ctl.replicas[i];
            match seen {
                Seen::Up(_) => rc.unreachable_since_ms = None,
                Seen::Dead | Seen::Unknown => {
                    rc.unreachable_since_ms.get_or_insert(self.now);
                }
            }
            if let Seen::Dead = seen {
                self.actions.push(Action::Restart {
                    replica: rc.id.clone(),
                });
            }
        }
        let observed = self
            .seen
            .iter()
            .filter_map(|s| s.status())
            .map(|s| s.epoch)
            .max()
            .unwrap_or(0);
        self.ctl.max_epoch_seen = self.ctl.max_epoch_seen.max(self.shard.epoch).max(observed);
    }

    fn set_unavailable(&mut self, reason: Option<Unavailable>) {
        if self.ctl.unavailable == reason {
            return;
        }
        self.ctl.unavailable = reason;
        let shard = self.shard.id;
        self.events.push(match reason {
            Some(reason) => Event::ShardUnavailable { shard, reason },
            None => Event::ShardAvailable { shard },
        });
    }

    /// The best reachable replica passing `eligible`: highest `(last_epoch, last_seq)`, then lowest index.
    fn best(&self, eligible: impl Fn(usize, &NodeStatus) -> bool) -> Option<usize> {
        let mut best: Option<(usize, (u64, u64))> = None;
        for (i, seen) in self.seen.iter().enumerate() {
            let Some(s) = seen.status() else { continue };
            if !eligible(i, s) {
                continue;
            }
            if best.is_none_or(|(_, pos)| position(s) > pos) {
                best = Some((i, position(s)));
            }
        }
        best.map(|(i, _)| i)
    }

    /// Makes `idx` the leader at `epoch` with `in_sync` as the confirmed set.
    fn install(&mut self, idx: usize, epoch: u64, in_sync: Vec<String>, start_seq: u64) {
        let id = self.id(idx).to_owned();
        let mut in_sync = self.ordered(in_sync.iter().map(String::as_str));
        if !in_sync.contains(&id) {
            in_sync.push(id.clone());
            in_sync = self.ordered(in_sync.iter().map(String::as_str));
        }
        self.shard.leader = Some(id);
        self.shard.epoch = epoch;
        self.ctl.max_epoch_seen = self.ctl.max_epoch_seen.max(epoch);
        self.ctl.in_sync = in_sync;
        self.ctl.pending_in_sync.clear();
        self.ctl.lease_granted_ms = self.now;
        self.ctl.epoch_start_seq = start_seq;
        for r in &mut self.ctl.replicas {
            r.caught_up_since_ms = None;
            r.caught_up_rounds = 0;
        }
        self.set_unavailable(None);
    }

    /// Grants leadership to `idx` at a fresh epoch above everything seen.
    fn promote(&mut self, idx: usize, in_sync: Vec<String>, previous: Option<String>) -> Lead {
        let epoch = self.ctl.max_epoch_seen + 1;
        let start_seq = self.seen[idx].status().map_or(0, |s| s.last_seq);
        self.install(idx, epoch, in_sync, start_seq);
        self.events.push(Event::Promoted {
            shard: self.shard.id,
            replica: self.id(idx).to_owned(),
            epoch,
            previous,
        });
        Lead::Serving {
            idx,
            settled: false,
        }
    }

    fn leadership(&mut self) -> Lead {
        if let Some(idx) = self.adoptable() {
            return self.adopt(idx);
        }
        let Some(li) = self.shard.leader.as_deref().and_then(|l| self.index_of(l)) else {
            return self.bootstrap();
        };
        let epoch = self.shard.epoch;
        let seen = self.seen[li];
        match seen {
            Seen::Up(s) if s.role == Role::Leader && s.epoch == epoch => {
                if self.ctl.max_epoch_seen > epoch {
                    // Someone saw a higher epoch (state restored from an older copy) and
                    // would refuse our requests; re-grant the same leadership above it.
                    let in_sync = self.ctl.in_sync.clone();
                    let previous = Some(self.id(li).to_owned());
                    return self.promote(li, in_sync, previous);
                }
                self.set_unavailable(None);
                Lead::Serving {
                    idx: li,
                    settled: true,
                }
            }
            // Never took the promotion (request lost, or restarted before it arrived):
            // it holds no lease at this epoch, so offering it again is safe.
            Seen::Up(s) if s.epoch < epoch => {
                self.set_unavailable(Some(Unavailable::AwaitingLeader));
                Lead::Serving {
                    idx: li,
                    settled: false,
                }
            }
            // Restarted (nodes come up Unassigned and keep no lease) or known dead: it
            // cannot be serving, so there is nothing to wait for.
            Seen::Up(_) | Seen::Dead => self.fail_over(li),
            Seen::Unknown => {
                let silent = self.now.saturating_sub(self.ctl.lease_granted_ms);
                if silent > self.spec.failover_after_ms() {
                    self.fail_over(li)
                } else {
                    self.set_unavailable(Some(Unavailable::LeaderUnreachable));
                    Lead::Lost { idx: li }
                }
            }
        }
    }

    /// A reachable replica leading at an epoch above the recorded one: our state is stale.
    fn adoptable(&self) -> Option<usize> {
        let epoch = self.shard.epoch;
        let mut best: Option<(usize, (u64, u64, u64))> = None;
        for (i, seen) in self.seen.iter().enumerate() {
            let Some(s) = seen.status() else { continue };
            if s.role != Role::Leader || s.epoch <= epoch {
                continue;
            }
            let key = (s.epoch, s.last_epoch, s.last_seq);
            if best.is_none_or(|(_, k)| key > k) {
                best = Some((i, key));
            }
        }
        best.map(|(i, _)| i)
    }

    fn adopt(&mut self, idx: usize) -> Lead {
        let Some(s) = self.seen[idx].status() else {
            return Lead::Absent;
        };
        let leader = self.id(idx).to_owned();
        // Keep asking for the set the leader enforces, so adopting never weakens
        // durability, but count only the leader until the rest prove they are caught up.
        let pending = self.ordered(
            s.in_sync
                .iter()
                .map(String::as_str)
                .filter(|id| *id != leader),
        );
        self.install(idx, s.epoch, vec![leader.clone()], s.last_seq);
        self.ctl.pending_in_sync = pending;
        self.events.push(Event::Adopted {
            shard: self.shard.id,
            replica: leader,
            epoch: s.epoch,
        });
        Lead::Serving {
            idx,
            settled: false,
        }
    }

    fn bootstrap(&mut self) -> Lead {
        let all_up = !self.seen.is_empty() && self.seen.iter().all(|s| matches!(s, Seen::Up(_)));
        if !all_up {
            self.set_unavailable(Some(Unavailable::AwaitingReplicas));
            return Lead::Absent;
        }
        // With every replica reporting, the longest log of the latest epoch holds every
        // write that was ever committed, whatever state was lost.
        let Some(idx) = self.best(|_, _| true) else {
            return Lead::Absent;
        };
        let top = self.seen[idx].status().map(position);
        // Equal (last_epoch, last_seq) means an identical log, so those start in sync.
        let in_sync = self
            .seen
            .iter()
            .enumerate()
            .filter(|(_, s)| s.status().map(position) == top)
            .map(|(i, _)| self.id(i).to_owned())
            .collect();
        self.promote(idx, in_sync, None)
    }

    fn fail_over(&mut self, li: usize) -> Lead {
        let old = self.id(li).to_owned();
        let in_sync: BTreeSet<String> = self.ctl.in_sync.iter().cloned().collect();
        let candidate = self.best(|i, s| {
            let id = &self.shard.replicas[i].id;
            in_sync.contains(id) && !(s.role == Role::Leader && i != li)
        });
        let Some(idx) = candidate else {
            self.set_unavailable(Some(Unavailable::NoInSyncReplica));
            return Lead::Lost { idx: li };
        };
        // Remaining members hold every committed write and the new leader will wait for
        // them; the old leader may have missed nothing but must rejoin like anyone else.
        let carried = self
            .ctl
            .in_sync
            .iter()
            .filter(|id| **id != old)
            .cloned()
            .chain([self.id(idx).to_owned()])
            .collect();
        self.promote(idx, carried, Some(old))
    }

    /// Confirms, drops and proposes in-sync members while a settled leader reports.
    fn maintain_in_sync(&mut self, li: usize) {
        let Some(ls) = self.seen[li].status() else {
            return;
        };
        let leader = self.id(li).to_owned();
        let acks: BTreeMap<&str, &FollowerAck> = ls
            .follower_acks
            .iter()
            .map(|a| (a.id.as_str(), a))
            .collect();
        let reported: BTreeSet<&str> = ls.in_sync.iter().map(String::as_str).collect();
        let holds_committed = ls.commit_seq.max(self.ctl.epoch_start_seq);

        // What the leader does not report it does not enforce, so it stops counting.
        let mut in_sync: Vec<String> = self
            .ctl
            .in_sync
            .iter()
            .filter(|id| **id == leader || reported.contains(id.as_str()))
            .cloned()
            .collect();
        if !in_sync.contains(&leader) {
            in_sync.push(leader.clone());
        }
        let mut pending = Vec::new();
        for p in std::mem::take(&mut self.ctl.pending_in_sync) {
            if in_sync.contains(&p) || p == leader {
                continue;
            }
            let enforced = reported.contains(p.as_str());
            let caught_up = acks
                .get(p.as_str())
                .is_some_and(|a| a.acked_seq >= holds_committed);
            if enforced && caught_up {
                in_sync.push(p);
            } else {
                pending.push(p);
            }
        }

        let min = self.spec.min_in_sync.max(1) as usize;
        for i in (0..self.shard.replicas.len()).filter(|&i| i != li) {
            let id = self.id(i).to_owned();
            if !self.should_drop(i, &acks) {
                continue;
            }
            pending.retain(|p| *p != id);
            if in_sync.contains(&id) && in_sync.len() > min {
                in_sync.retain(|m| *m != id);
            }
        }

        for i in (0..self.shard.replicas.len()).filter(|&i| i != li) {
            let id = self.id(i).to_owned();
            if in_sync.contains(&id) || pending.contains(&id) {
                let rc = &mut self.ctl.replicas[i];
                rc.caught_up_since_ms = None;
                rc.caught_up_rounds = 0;
                continue;
            }
            let caught_up = self.caught_up(i, ls, &acks);
            let (now, hold) = (self.now, self.spec.in_sync_timeout_ms);
            let rc = &mut self.ctl.replicas[i];
            if !caught_up {
                rc.caught_up_since_ms = None;
                rc.caught_up_rounds = 0;
                continue;
            }
            let since = *rc.caught_up_since_ms.get_or_insert(now);
            rc.caught_up_rounds += 1;
            if rc.caught_up_rounds >= REJOIN_MIN_ROUNDS && now.saturating_sub(since) >= hold {
                pending.push(id);
            }
        }

        self.ctl.in_sync = self.ordered(in_sync.iter().map(String::as_str));
        self.ctl.pending_in_sync = self.ordered(pending.iter().map(String::as_str));
    }

    fn should_drop(&self, i: usize, acks: &BTreeMap<&str, &FollowerAck>) -> bool {
        let timeout = self.spec.in_sync_timeout_ms;
        match self.seen[i] {
            Seen::Dead => true,
            Seen::Unknown => self.ctl.replicas[i]
                .unreachable_since_ms
                .is_some_and(|t| self.now.saturating_sub(t) > timeout),
            // A replica still claiming leadership is not following anyone.
            Seen::Up(s) => {
                s.role == Role::Leader
                    || acks
                        .get(self.id(i))
                        .is_some_and(|a| a.last_contact_ms > timeout)
            }
        }
    }

    fn caught_up(&self, i: usize, ls: &NodeStatus, acks: &BTreeMap<&str, &FollowerAck>) -> bool {
        let Some(s) = self.seen[i].status() else {
            return false;
        };
        s.role == Role::Follower
            && s.epoch == self.shard.epoch
            && acks.get(self.id(i)).is_some_and(|a| {
                a.last_contact_ms <= self.spec.in_sync_timeout_ms
                    && ls.last_seq.saturating_sub(a.acked_seq) <= self.spec.catch_up_lag
            })
    }

    /// Sends every reachable replica its assignment; this is also what renews the lease.
    fn send_roles(&mut self, lead: Lead) {
        let (li, serving) = match lead {
            Lead::Absent => return,
            Lead::Serving { idx, .. } => (idx, true),
            Lead::Lost { idx } => (idx, false),
        };
        let requested = self.ordered(
            self.ctl
                .in_sync
                .iter()
                .chain(&self.ctl.pending_in_sync)
                .map(String::as_str),
        );
        let leader_address =
            Some(self.shard.replicas[li].address.clone()).filter(|a| !a.is_empty());
        let epoch = self.shard.epoch;
        // Leader first, so followers that act at once find it already leading.
        let order = std::iter::once(li).chain((0..self.shard.replicas.len()).filter(|&i| i != li));
        for i in order.collect::<Vec<_>>() {
            let Some(s) = self.seen[i].status() else {
                continue;
            };
            let replica = &self.shard.replicas[i];
            if replica.address.is_empty() {
                continue;
            }
            let is_leader = i == li;
            if is_leader && !serving {
                continue;
            }
            if !is_leader && s.role == Role::Leader {
                self.events.push(Event::Demoted {
                    shard: self.shard.id,
                    replica: replica.id.clone(),
                    stale_epoch: s.epoch,
                    epoch,
                });
            }
            let request = RoleRequest {
                epoch,
                role: if is_leader {
                    Role::Leader
                } else {
                    Role::Follower
                },
                leader: if is_leader {
                    None
                } else {
                    leader_address.clone()
                },
                in_sync: requested.clone(),
                lease_ms: self.spec.lease_ms,
                peers: self
                    .shard
                    .replicas
                    .iter()
                    .filter(|p| p.id != replica.id && !p.address.is_empty())
                    .map(|p| Peer {
                        id: p.id.clone(),
                        address: p.address.clone(),
                    })
                    .collect(),
                slot_ranges: self.shard.slot_ranges.clone(),
                mode: self.spec.mode,
                min_in_sync: self.spec.min_in_sync,
            };
            self.actions.push(Action::SendRole {
                replica: replica.id.clone(),
                address: replica.address.clone(),
                request,
            });
            if is_leader {
                self.ctl.lease_granted_ms = self.now;
            }
        }
    }
}
