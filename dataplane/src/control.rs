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

/// The shard and index a [`replica_id`] names, e.g. `(0, 1)` for `s0-r1`.
pub fn parse_replica_id(id: &str) -> Option<(u32, u32)> {
    let (shard, index) = id.strip_prefix('s')?.split_once("-r")?;
    Some((shard.parse().ok()?, index.parse().ok()?))
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
    /// When the current leader was made leader (promoted or adopted).
    #[serde(default)]
    pub installed_ms: u64,
    /// Highest epoch ever observed or assigned in this shard.
    #[serde(default)]
    pub max_epoch_seen: u64,
    /// Numbers the rounds that send this shard's replicas their roles, so a replica can
    /// tell a request that arrived late from the latest ([`RoleRequest::round`]). Never
    /// below what a replica reports having taken, should this state be lost.
    #[serde(default)]
    pub role_round: u64,
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
    /// Highest epoch it has reported. Replicas persist their epoch, so a lower report
    /// means its storage was lost or replaced: it holds nothing it acknowledged before.
    #[serde(default)]
    pub epoch: u64,
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
    /// Counts the leases that `actions` grant from `now_ms`, when the driver sends them.
    ///
    /// [`decide`] counts a lease from its own `now_ms`, while a leader counts it from when
    /// its role was sent. A driver that does anything slow in between (the operator
    /// records its status first) calls this right before sending, or a failover could
    /// start while the old leader still serves on its lease.
    pub fn leases_sent(&mut self, actions: &[Action], now_ms: u64) {
        for action in actions {
            let Action::SendRole {
                replica, request, ..
            } = action
            else {
                continue;
            };
            if request.role != Role::Leader {
                continue;
            }
            let Some(shard) = self.topology.shards.iter().find(|s| {
                s.leader.as_deref() == Some(replica.as_str()) && s.epoch == request.epoch
            }) else {
                continue;
            };
            if let Some(ctl) = self.shards.iter_mut().find(|c| c.shard == shard.id) {
                ctl.lease_granted_ms = ctl.lease_granted_ms.max(now_ms);
            }
        }
    }

    /// Rebases every remembered time onto a new driver clock, after loading persisted state.
    ///
    /// Treats the last lease grant as happening now, which can only delay a failover, and
    /// restarts every hold-down, which can only delay a rejoin.
    pub fn resume(&mut self, now_ms: u64) {
        for ctl in &mut self.shards {
            ctl.lease_granted_ms = now_ms;
            ctl.installed_ms = now_ms;
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
        self.installed_ms = self.installed_ms.min(now);
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
    /// Replicas that report a lower epoch than they did before: their storage is gone.
    lost: Vec<bool>,
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
            lost: vec![false; found.len()],
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
        let before = self.ctl.in_sync.clone();
        self.observe();
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
            if let Some(addr) = addr.filter(|a| r.address != *a) {
                r.address = addr.to_owned();
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
                Seen::Up(s) => {
                    rc.unreachable_since_ms = None;
                    self.lost[i] = s.epoch < rc.epoch;
                    rc.epoch = rc.epoch.max(s.epoch);
                    self.ctl.role_round = self.ctl.role_round.max(s.role_round);
                }
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
        // A replica that lost its storage no longer holds the writes it acknowledged: it
        // stops counting at once, before anything is promoted, and rejoins like any other.
        let lost: BTreeSet<&str> = (0..self.lost.len())
            .filter(|&i| self.lost[i])
            .map(|i| self.shard.replicas[i].id.as_str())
            .collect();
        self.ctl.in_sync.retain(|id| !lost.contains(id.as_str()));
        self.ctl
            .pending_in_sync
            .retain(|id| !lost.contains(id.as_str()));
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
        self.ctl.installed_ms = self.now;
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
        if self.lost[li] {
            // Back with empty storage: whatever it reports, it neither leads nor holds
            // the shard's writes, and its old process is gone.
            return self.fail_over(li);
        }
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
            // it holds no lease at this epoch, so offering it again is safe. One that
            // answers but keeps failing to take it (its disk is full, say) is offered it for
            // a lease and a grace; then, if another in-sync replica could lead, no more,
            // and once no request it could still take is that young, the other replaces it.
            Seen::Up(s) if s.epoch < epoch => {
                let wait = self.spec.failover_after_ms();
                let given_up = self.now.saturating_sub(self.ctl.installed_ms) > wait
                    && self.candidate(li, true).is_some();
                if given_up && self.now.saturating_sub(self.ctl.lease_granted_ms) > wait {
                    return self.replace(li, true);
                }
                self.set_unavailable(Some(Unavailable::AwaitingLeader));
                if given_up {
                    Lead::Lost { idx: li }
                } else {
                    Lead::Serving {
                        idx: li,
                        settled: false,
                    }
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
        self.replace(li, false)
    }

    /// The best in-sync replica to lead in place of `li`: none that leads otherwise, and
    /// not `li` itself when it is the one that failed to take the role (`not_again`).
    fn candidate(&self, li: usize, not_again: bool) -> Option<usize> {
        self.best(|i, s| {
            let member = self.ctl.in_sync.contains(&self.shard.replicas[i].id);
            let other_leader = s.role == Role::Leader && i != li;
            member && !other_leader && !(not_again && i == li)
        })
    }

    /// Promotes [`Self::candidate`] in place of `li`.
    fn replace(&mut self, li: usize, not_again: bool) -> Lead {
        let old = self.id(li).to_owned();
        let Some(idx) = self.candidate(li, not_again) else {
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
            // Kept at the floor, a dead member makes sync writes wait (and end as 503).
            // Async writes wait for nobody: kept, it would let a lone leader go on taking
            // them, hold back its log's trimming for as long as it is gone, and still count
            // as promotable while holding none of them. Dropped, the set is below
            // `min_in_sync` and the leader refuses writes until it is back.
            let floor = match self.spec.mode {
                AckMode::Sync => min,
                AckMode::Async => 1,
            };
            if in_sync.contains(&id) && in_sync.len() > floor {
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
        self.ctl.role_round += 1;
        let round = self.ctl.role_round;
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
                round,
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

#[cfg(test)]
mod tests {
    use super::*;

    const T0: u64 = 100_000;
    const LEASE: u64 = 1_000;
    const GRACE: u64 = 500;
    const TIMEOUT: u64 = 600;

    fn spec(replicas: u32, min_in_sync: u32) -> ClusterSpec {
        ClusterSpec {
            shards: 1,
            replicas_per_shard: replicas,
            min_in_sync,
            mode: AckMode::Sync,
            lease_ms: LEASE,
            failover_grace_ms: GRACE,
            in_sync_timeout_ms: TIMEOUT,
            catch_up_lag: 10,
        }
    }

    fn addr(id: &str) -> String {
        format!("{id}.distkv:7000")
    }

    fn shard_of(id: &str) -> u32 {
        id[1..id.find('-').unwrap()].parse().unwrap()
    }

    /// A reachable replica; starts as a fresh, empty, unassigned node.
    struct Node(NodeStatus);

    fn node(id: &str) -> Node {
        Node(NodeStatus::unassigned(id))
    }

    impl Node {
        fn role(mut self, role: Role, epoch: u64) -> Self {
            self.0.role = role;
            self.0.epoch = epoch;
            self
        }
        fn leader(self, epoch: u64) -> Self {
            self.role(Role::Leader, epoch)
        }
        fn follower(self, epoch: u64) -> Self {
            self.role(Role::Follower, epoch)
        }
        fn unassigned(self, epoch: u64) -> Self {
            self.role(Role::Unassigned, epoch)
        }
        /// Log position `(last_epoch, last_seq)`; a leader's commit point follows it.
        fn at(mut self, last_epoch: u64, last_seq: u64) -> Self {
            self.0.last_epoch = last_epoch;
            self.0.last_seq = last_seq;
            self.0.commit_seq = last_seq;
            self
        }
        fn in_sync(mut self, ids: &[&str]) -> Self {
            self.0.in_sync = ids.iter().map(|s| s.to_string()).collect();
            self
        }
        fn ack(mut self, id: &str, acked_seq: u64, last_contact_ms: u64) -> Self {
            self.0.follower_acks.push(FollowerAck {
                id: id.into(),
                acked_seq,
                last_contact_ms,
            });
            self
        }
        fn obs(self) -> Observation {
            let id = self.0.id.clone();
            Observation {
                shard: shard_of(&id),
                address: Some(addr(&id)),
                replica: id,
                status: Some(self.0),
                process_alive: Some(true),
            }
        }
    }

    fn dead(id: &str) -> Observation {
        Observation {
            replica: id.into(),
            shard: shard_of(id),
            address: Some(addr(id)),
            status: None,
            process_alive: Some(false),
        }
    }

    /// Unreachable, liveness unknown (partition, SIGSTOP).
    fn silent(id: &str) -> Observation {
        Observation {
            process_alive: None,
            ..dead(id)
        }
    }

    /// A shard settled at epoch 3: `ids[0]` leads, every other one follows, all at seq 100.
    fn settled(ids: &[&str]) -> Vec<Observation> {
        let followers = ids[1..]
            .iter()
            .map(|id| node(id).follower(3).at(3, 100).obs());
        std::iter::once(healthy(ids[0], 3, 100, ids).obs())
            .chain(followers)
            .collect()
    }

    /// Leader report with every listed follower fully caught up and the set confirmed.
    fn healthy(id: &str, epoch: u64, seq: u64, in_sync: &[&str]) -> Node {
        let mut n = node(id).leader(epoch).at(epoch, seq).in_sync(in_sync);
        for f in in_sync.iter().filter(|f| **f != id) {
            n = n.ack(f, seq, 50);
        }
        n
    }

    /// Shard 0 already running: `leader` at `epoch`, `in_sync` confirmed, lease granted at T0.
    fn running(spec: &ClusterSpec, leader: &str, epoch: u64, in_sync: &[&str]) -> ControlState {
        let mut st = initial_state(spec);
        for shard in &mut st.topology.shards {
            for r in &mut shard.replicas {
                r.address = addr(&r.id);
            }
        }
        let shard = &mut st.topology.shards[0];
        shard.leader = Some(leader.into());
        shard.epoch = epoch;
        let ctl = &mut st.shards[0];
        ctl.in_sync = in_sync.iter().map(|s| s.to_string()).collect();
        ctl.lease_granted_ms = T0;
        ctl.max_epoch_seen = epoch;
        refresh_replicas(shard, ctl);
        st.topology.version = 5;
        st
    }

    fn roles<'d>(d: &'d Decision, id: &str) -> Vec<&'d RoleRequest> {
        d.actions
            .iter()
            .filter_map(|a| match a {
                Action::SendRole {
                    replica, request, ..
                } if replica == id => Some(request),
                _ => None,
            })
            .collect()
    }

    fn role<'d>(d: &'d Decision, id: &str) -> &'d RoleRequest {
        let r = roles(d, id);
        assert_eq!(
            r.len(),
            1,
            "expected one SendRole to {id}: {:#?}",
            d.actions
        );
        r[0]
    }

    fn leader_requests(d: &Decision) -> Vec<(&str, u64)> {
        d.actions
            .iter()
            .filter_map(|a| match a {
                Action::SendRole {
                    replica, request, ..
                } if request.role == Role::Leader => Some((replica.as_str(), request.epoch)),
                _ => None,
            })
            .collect()
    }

    fn leader(d: &Decision) -> (Option<&str>, u64) {
        let s = &d.state.topology.shards[0];
        (s.leader.as_deref(), s.epoch)
    }

    fn promotions(d: &Decision) -> Vec<(&str, u64)> {
        d.events
            .iter()
            .filter_map(|e| match e {
                Event::Promoted { replica, epoch, .. } => Some((replica.as_str(), *epoch)),
                _ => None,
            })
            .collect()
    }

    fn restarts(d: &Decision) -> Vec<&str> {
        d.actions
            .iter()
            .filter_map(|a| match a {
                Action::Restart { replica } => Some(replica.as_str()),
                _ => None,
            })
            .collect()
    }

    fn published(d: &Decision) -> Option<&Topology> {
        d.actions.iter().find_map(|a| match a {
            Action::PublishTopology(t) => Some(t),
            _ => None,
        })
    }

    fn in_sync(d: &Decision) -> Vec<&str> {
        d.state.shards[0]
            .in_sync
            .iter()
            .map(String::as_str)
            .collect()
    }

    fn ids(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn replica_ids_parse_back_to_shard_and_index() {
        assert_eq!(parse_replica_id(&replica_id(12, 3)), Some((12, 3)));
        for bad in ["", "s1", "r1", "s-r1", "s1-r", "x1-r2", "s1-r2x", "s1-rr2"] {
            assert_eq!(parse_replica_id(bad), None, "{bad}");
        }
    }

    #[test]
    fn fresh_cluster_elects_r0_at_epoch_1_in_every_shard() {
        let spec = ClusterSpec {
            shards: 2,
            ..spec(3, 2)
        };
        let obs: Vec<Observation> = (0..2)
            .flat_map(|s| (0..3).map(move |r| node(&replica_id(s, r)).obs()))
            .collect();
        let d = decide(&spec, &initial_state(&spec), &obs, T0);

        let ranges = even_ranges(2);
        for shard in 0..2u32 {
            let info = &d.state.topology.shards[shard as usize];
            assert_eq!(
                (info.leader.as_deref(), info.epoch),
                (Some(replica_id(shard, 0).as_str()), 1)
            );
            let (r0, r1, r2) = (
                replica_id(shard, 0),
                replica_id(shard, 1),
                replica_id(shard, 2),
            );
            let lead = role(&d, &r0);
            assert_eq!(lead.role, Role::Leader);
            assert_eq!(lead.epoch, 1);
            assert_eq!(lead.leader, None);
            assert_eq!(lead.in_sync, vec![r0.clone(), r1.clone(), r2.clone()]);
            assert_eq!(lead.lease_ms, LEASE);
            assert_eq!(lead.min_in_sync, 2);
            assert_eq!(lead.mode, AckMode::Sync);
            assert_eq!(lead.slot_ranges, vec![ranges[shard as usize]]);
            let peers: Vec<(&str, &str)> = lead
                .peers
                .iter()
                .map(|p| (p.id.as_str(), p.address.as_str()))
                .collect();
            assert_eq!(
                peers,
                vec![
                    (r1.as_str(), addr(&r1).as_str()),
                    (r2.as_str(), addr(&r2).as_str())
                ]
            );
            for f in [&r1, &r2] {
                let req = role(&d, f);
                assert_eq!((req.role, req.epoch), (Role::Follower, 1));
                assert_eq!(req.leader, Some(addr(&r0)));
            }
        }
        assert_eq!(promotions(&d), vec![("s0-r0", 1), ("s1-r0", 1)]);
        assert!(d.events.contains(&Event::Promoted {
            shard: 0,
            replica: "s0-r0".into(),
            epoch: 1,
            previous: None
        }));
        let t = published(&d).expect("bootstrap publishes");
        assert_eq!(t.version, 1);
        assert!(t.slot_table().is_ok());
        assert_eq!(t.shards[0].leader_address(), Some(addr("s0-r0").as_str()));
        assert!(t.shards[0].replicas.iter().all(|r| r.in_sync));
    }

    #[test]
    fn bootstrap_waits_until_every_replica_reports() {
        let spec = spec(3, 1);
        let obs = vec![node("s0-r0").obs(), node("s0-r1").obs(), silent("s0-r2")];
        let d = decide(&spec, &initial_state(&spec), &obs, T0);
        assert_eq!(leader(&d), (None, 0));
        assert!(leader_requests(&d).is_empty() && roles(&d, "s0-r0").is_empty());
        // Learning addresses is a change (routers and `GET /v1/cluster` show them), nothing else is.
        let t = published(&d).expect("addresses learned");
        assert_eq!(t.version, 1);
        assert!(
            t.shards[0]
                .replicas
                .iter()
                .all(|r| r.role == Role::Unassigned && !r.in_sync)
        );
        assert_eq!(
            d.events,
            vec![Event::ShardUnavailable {
                shard: 0,
                reason: Unavailable::AwaitingReplicas
            }]
        );
        // The same situation again is not news.
        let again = decide(&spec, &d.state, &obs, T0 + 200);
        assert!(again.events.is_empty() && again.actions.is_empty());
    }

    #[test]
    fn bootstrap_with_existing_data_never_picks_less_data() {
        // (epoch seen, last_epoch, last_seq) per replica.
        type Case = (
            &'static str,
            [(u64, u64, u64); 3],
            &'static str,
            u64,
            &'static [&'static str],
        );
        let cases: [Case; 4] = [
            (
                "fresh",
                [(0, 0, 0); 3],
                "s0-r0",
                1,
                &["s0-r0", "s0-r1", "s0-r2"],
            ),
            (
                "longest log wins",
                [(3, 3, 10), (3, 3, 12), (3, 3, 11)],
                "s0-r1",
                4,
                &["s0-r1"],
            ),
            (
                "later epoch beats longer log",
                [(4, 3, 50), (4, 4, 20), (4, 4, 20)],
                "s0-r1",
                5,
                &["s0-r1", "s0-r2"],
            ),
            (
                "epoch above every observed",
                [(2, 2, 5), (9, 2, 5), (1, 1, 1)],
                "s0-r0",
                10,
                &["s0-r0", "s0-r1"],
            ),
        ];
        let spec = spec(3, 1);
        for (name, nodes, winner, epoch, expected_in_sync) in cases {
            let obs: Vec<Observation> = nodes
                .iter()
                .enumerate()
                .map(|(i, &(e, le, ls))| node(&format!("s0-r{i}")).unassigned(e).at(le, ls).obs())
                .collect();
            let d = decide(&spec, &initial_state(&spec), &obs, T0);
            assert_eq!(leader(&d), (Some(winner), epoch), "{name}");
            assert_eq!(leader_requests(&d), vec![(winner, epoch)], "{name}");
            assert_eq!(in_sync(&d), expected_in_sync.to_vec(), "{name}");
        }
    }

    #[test]
    fn leader_known_dead_or_restarted_fails_over_at_once() {
        type Case = (&'static str, Vec<Observation>, &'static str, u64);
        let spec = spec(3, 1);
        let all = ["s0-r0", "s0-r1", "s0-r2"];
        let cases: Vec<Case> = vec![
            (
                "known dead: best in-sync follower at epoch+1",
                vec![
                    dead("s0-r0"),
                    node("s0-r1").follower(3).at(3, 100).obs(),
                    node("s0-r2").follower(3).at(3, 105).obs(),
                ],
                "s0-r2",
                4,
            ),
            (
                "restarted (unassigned at the current epoch)",
                vec![
                    node("s0-r0").unassigned(3).at(3, 104).obs(),
                    node("s0-r1").follower(3).at(3, 100).obs(),
                    node("s0-r2").follower(3).at(3, 105).obs(),
                ],
                "s0-r2",
                4,
            ),
            (
                "restarted leader with the most data leads again, at a new epoch",
                vec![
                    node("s0-r0").unassigned(3).at(3, 110).obs(),
                    node("s0-r1").follower(3).at(3, 100).obs(),
                    node("s0-r2").follower(3).at(3, 105).obs(),
                ],
                "s0-r0",
                4,
            ),
            (
                "new epoch is above every observed epoch",
                vec![
                    dead("s0-r0"),
                    node("s0-r1").follower(7).at(3, 100).obs(),
                    node("s0-r2").follower(3).at(3, 99).obs(),
                ],
                "s0-r1",
                8,
            ),
        ];
        for (name, obs, winner, epoch) in cases {
            let d = decide(&spec, &running(&spec, "s0-r0", 3, &all), &obs, T0 + 10);
            assert_eq!(leader(&d), (Some(winner), epoch), "{name}");
            assert_eq!(promotions(&d), vec![(winner, epoch)], "{name}");
            // One leader, at the new epoch; the old leadership is never renewed.
            assert_eq!(leader_requests(&d), vec![(winner, epoch)], "{name}");
            assert!(
                d.actions
                    .iter()
                    .all(|a| !matches!(a, Action::SendRole { request, .. } if request.epoch == 3)),
                "{name}"
            );
            assert!(
                d.events.iter().any(
                    |e| matches!(e, Event::Promoted { previous: Some(p), .. } if p == "s0-r0")
                )
            );
            assert_eq!(published(&d).map(|t| t.version), Some(6), "{name}");
        }
        let d = decide(
            &spec,
            &running(&spec, "s0-r0", 3, &all),
            &[
                dead("s0-r0"),
                node("s0-r1").follower(3).obs(),
                node("s0-r2").follower(3).obs(),
            ],
            T0,
        );
        assert_eq!(restarts(&d), vec!["s0-r0"]);
        assert!(roles(&d, "s0-r0").is_empty());
    }

    #[test]
    fn unreachable_leader_is_replaced_only_after_lease_and_grace() {
        let spec = spec(3, 1);
        let all = ["s0-r0", "s0-r1", "s0-r2"];
        let obs = vec![
            silent("s0-r0"),
            node("s0-r1").follower(3).at(3, 50).obs(),
            node("s0-r2").follower(3).at(3, 52).obs(),
        ];
        let start = running(&spec, "s0-r0", 3, &all);

        // Exactly at the boundary the old lease may still run; one millisecond later it cannot.
        let at_edge = decide(&spec, &start, &obs, T0 + LEASE + GRACE);
        assert_eq!(leader(&at_edge), (Some("s0-r0"), 3));
        assert!(leader_requests(&at_edge).is_empty());
        let after = decide(&spec, &start, &obs, T0 + LEASE + GRACE + 1);
        assert_eq!(leader(&after), (Some("s0-r2"), 4));

        // Round by round, waiting must not extend the deadline, and followers keep their role.
        let mut st = start.clone();
        let mut promoted_at = None;
        let mut unreachable_events = 0;
        for now in (T0 + 200..=T0 + 2_000).step_by(200) {
            let d = decide(&spec, &st, &obs, now);
            unreachable_events += d
                .events
                .iter()
                .filter(|e| {
                    matches!(
                        e,
                        Event::ShardUnavailable {
                            reason: Unavailable::LeaderUnreachable,
                            ..
                        }
                    )
                })
                .count();
            if promoted_at.is_none() && !promotions(&d).is_empty() {
                promoted_at = Some(now);
            }
            if promoted_at.is_none() {
                assert!(roles(&d, "s0-r0").is_empty());
                for f in ["s0-r1", "s0-r2"] {
                    let r = role(&d, f);
                    assert_eq!(
                        (r.role, r.epoch, r.leader.clone()),
                        (Role::Follower, 3, Some(addr("s0-r0")))
                    );
                }
            }
            st = d.state;
        }
        assert_eq!(promoted_at, Some(T0 + 1_600));
        assert_eq!(unreachable_events, 1);

        // A leader that comes back in time (SIGCONT) keeps its leadership and is renewed.
        let waiting = decide(&spec, &start, &obs, T0 + 800).state;
        let back = vec![
            healthy("s0-r0", 3, 52, &all).obs(),
            node("s0-r1").follower(3).at(3, 52).obs(),
            node("s0-r2").follower(3).at(3, 52).obs(),
        ];
        let d = decide(&spec, &waiting, &back, T0 + 1_000);
        assert!(promotions(&d).is_empty());
        assert_eq!(leader_requests(&d), vec![("s0-r0", 3)]);
        assert!(d.events.contains(&Event::ShardAvailable { shard: 0 }));
        // And the deadline now counts from this renewal.
        let later = decide(&spec, &d.state, &obs, T0 + 1_000 + LEASE + GRACE);
        assert!(promotions(&later).is_empty());
    }

    #[test]
    fn every_reachable_replica_gets_its_assignment_each_round() {
        let spec = spec(3, 1);
        let all = ["s0-r0", "s0-r1", "s0-r2"];
        let st = running(&spec, "s0-r0", 3, &all);
        let obs = vec![
            healthy("s0-r0", 3, 40, &all).obs(),
            node("s0-r1").follower(3).at(3, 40).obs(),
            node("s0-r2").follower(3).at(3, 40).obs(),
        ];
        let d = decide(&spec, &st, &obs, T0 + 200);
        assert_eq!(d.actions.len(), 3, "{:#?}", d.actions);
        let lead = role(&d, "s0-r0");
        assert_eq!(
            (lead.role, lead.epoch, lead.lease_ms),
            (Role::Leader, 3, LEASE)
        );
        assert_eq!(lead.in_sync, ids(&all));
        assert_eq!(lead.peers.len(), 2);
        for f in ["s0-r1", "s0-r2"] {
            assert_eq!(role(&d, f).leader, Some(addr("s0-r0")));
        }
        assert_eq!(d.state.shards[0].lease_granted_ms, T0 + 200);
        assert!(published(&d).is_none());

        // Unreachable replicas get nothing; the grant time only moves when the leader is sent its role.
        let obs = vec![
            silent("s0-r0"),
            node("s0-r1").follower(3).obs(),
            silent("s0-r2"),
        ];
        let d = decide(&spec, &st, &obs, T0 + 200);
        assert_eq!(d.actions.len(), 1);
        role(&d, "s0-r1");
        assert_eq!(d.state.shards[0].lease_granted_ms, T0);
    }

    #[test]
    fn lagging_or_lost_follower_leaves_the_in_sync_set() {
        let spec = spec(3, 1);
        let all = ["s0-r0", "s0-r1", "s0-r2"];
        // (case, r2 observation, r2 ack contact ms, r2 unreachable for ms, dropped)
        let cases: [(&str, Observation, u64, Option<u64>, bool); 6] = [
            ("known dead", dead("s0-r2"), 50, None, true),
            (
                "unreachable within timeout",
                silent("s0-r2"),
                50,
                Some(TIMEOUT),
                false,
            ),
            (
                "unreachable past timeout",
                silent("s0-r2"),
                50,
                Some(TIMEOUT + 1),
                true,
            ),
            (
                "leader heard it within timeout",
                node("s0-r2").follower(3).at(3, 90).obs(),
                TIMEOUT,
                None,
                false,
            ),
            (
                "leader lost contact",
                node("s0-r2").follower(3).at(3, 90).obs(),
                TIMEOUT + 1,
                None,
                true,
            ),
            (
                "healthy",
                node("s0-r2").follower(3).at(3, 100).obs(),
                50,
                None,
                false,
            ),
        ];
        let now = T0 + 200;
        for (name, r2, contact, unreachable_for, dropped) in cases {
            let mut st = running(&spec, "s0-r0", 3, &all);
            st.shards[0].replicas = all
                .iter()
                .map(|id| ReplicaControl {
                    id: id.to_string(),
                    unreachable_since_ms: if *id == "s0-r2" {
                        unreachable_for.map(|ms| now - ms)
                    } else {
                        None
                    },
                    ..ReplicaControl::default()
                })
                .collect();
            let lead = node("s0-r0")
                .leader(3)
                .at(3, 100)
                .in_sync(&all)
                .ack("s0-r1", 100, 50)
                .ack("s0-r2", 90, contact);
            let obs = vec![lead.obs(), node("s0-r1").follower(3).at(3, 100).obs(), r2];
            let d = decide(&spec, &st, &obs, now);
            let expected: &[&str] = if dropped { &["s0-r0", "s0-r1"] } else { &all };
            assert_eq!(in_sync(&d), expected.to_vec(), "{name}");
            // Writes go on: the leader is told the smaller set in the same round.
            assert_eq!(role(&d, "s0-r0").in_sync, ids(expected), "{name}");
            assert_eq!(leader(&d), (Some("s0-r0"), 3), "{name}");
            assert_eq!(published(&d).is_some(), dropped, "{name}");
            if dropped {
                assert!(
                    !published(&d).unwrap().shards[0].replicas[2].in_sync,
                    "{name}"
                );
                assert!(d.events.contains(&Event::InSyncChanged {
                    shard: 0,
                    in_sync: ids(expected)
                }));
            }
            assert_eq!(
                restarts(&d),
                if name == "known dead" {
                    vec!["s0-r2"]
                } else {
                    vec![]
                },
                "{name}"
            );
        }
    }

    #[test]
    fn min_in_sync_is_never_undercut() {
        // (replicas, min, dead followers, in-sync afterwards)
        type Case = (u32, u32, &'static [&'static str], &'static [&'static str]);
        let cases: [Case; 4] = [
            (3, 2, &["s0-r1", "s0-r2"], &["s0-r0", "s0-r2"]),
            (2, 2, &["s0-r1"], &["s0-r0", "s0-r1"]),
            (3, 1, &["s0-r1", "s0-r2"], &["s0-r0"]),
            (3, 3, &["s0-r2"], &["s0-r0", "s0-r1", "s0-r2"]),
        ];
        for (replicas, min, down, expected) in cases {
            let spec = spec(replicas, min);
            let all: Vec<String> = (0..replicas).map(|r| replica_id(0, r)).collect();
            let all: Vec<&str> = all.iter().map(String::as_str).collect();
            let mut st = running(&spec, "s0-r0", 3, &all);
            let obs: Vec<Observation> = all
                .iter()
                .map(|id| match *id {
                    "s0-r0" => healthy("s0-r0", 3, 10, &all).obs(),
                    id if down.contains(&id) => dead(id),
                    id => node(id).follower(3).at(3, 10).obs(),
                })
                .collect();
            // Twice: the floor holds round after round, not just once.
            for round in 0..2 {
                let d = decide(&spec, &st, &obs, T0 + 200 * (round + 1));
                assert_eq!(
                    in_sync(&d),
                    expected.to_vec(),
                    "{replicas}/{min} round {round}"
                );
                assert_eq!(role(&d, "s0-r0").in_sync, ids(expected));
                assert!(d.state.shards[0].in_sync.len() >= min as usize);
                st = d.state;
            }
        }
    }

    #[test]
    fn async_mode_drops_a_dead_member_even_below_min_in_sync() {
        // Async writes wait for no follower: a dead one kept in the set at the floor would
        // let the leader take writes alone and hold its log untrimmed for as long as the
        // follower is gone. Dropped, the set is below the minimum and writes stop.
        let spec = ClusterSpec {
            mode: AckMode::Async,
            ..spec(2, 2)
        };
        let both = ["s0-r0", "s0-r1"];
        let st = running(&spec, "s0-r0", 3, &both);
        let obs = [healthy("s0-r0", 3, 10, &both).obs(), dead("s0-r1")];
        let d = decide(&spec, &st, &obs, T0 + 200);
        assert_eq!(in_sync(&d), vec!["s0-r0"]);
        let lead = role(&d, "s0-r0");
        assert_eq!(lead.in_sync, ids(&["s0-r0"]));
        assert!(lead.in_sync.len() < lead.min_in_sync as usize);
    }

    #[test]
    fn both_replicas_down_means_no_promotion_until_an_in_sync_one_returns() {
        let spec = spec(2, 1);
        let both = ["s0-r0", "s0-r1"];
        let st = running(&spec, "s0-r0", 3, &both);
        let d = decide(&spec, &st, &[dead("s0-r0"), dead("s0-r1")], T0 + 200);
        assert!(promotions(&d).is_empty());
        assert!(
            d.actions
                .iter()
                .all(|a| matches!(a, Action::Restart { .. }))
        );
        assert_eq!(restarts(&d), vec!["s0-r0", "s0-r1"]);
        assert_eq!(leader(&d), (Some("s0-r0"), 3));
        assert_eq!(
            in_sync(&d),
            both.to_vec(),
            "no leader, so nobody is dropped"
        );
        assert!(d.events.contains(&Event::ShardUnavailable {
            shard: 0,
            reason: Unavailable::NoInSyncReplica
        }));

        // The in-sync follower comes back first: it holds every committed write.
        let back = decide(
            &spec,
            &d.state,
            &[dead("s0-r0"), node("s0-r1").unassigned(3).at(3, 7).obs()],
            T0 + 400,
        );
        assert_eq!(leader(&back), (Some("s0-r1"), 4));
        assert_eq!(in_sync(&back), vec!["s0-r1"]);

        // Had the follower already been dropped, its return alone changes nothing...
        let st = running(&spec, "s0-r0", 3, &["s0-r0"]);
        let only_r1 = [dead("s0-r0"), node("s0-r1").unassigned(3).at(3, 9).obs()];
        let d = decide(&spec, &st, &only_r1, T0 + 200);
        assert!(promotions(&d).is_empty() && leader_requests(&d).is_empty());
        assert_eq!(leader(&d), (Some("s0-r0"), 3));
        // ...and the old leader, once back, leads again at a new epoch.
        let d = decide(
            &spec,
            &d.state,
            &[
                node("s0-r0").unassigned(3).at(3, 5).obs(),
                node("s0-r1").unassigned(3).at(3, 9).obs(),
            ],
            T0 + 400,
        );
        assert_eq!(leader(&d), (Some("s0-r0"), 4));
        assert_eq!(role(&d, "s0-r1").role, Role::Follower);
    }

    #[test]
    fn most_up_to_date_in_sync_replica_wins_never_an_out_of_sync_one() {
        type Case = (
            &'static str,
            &'static [&'static str],
            (u64, u64),
            (u64, u64),
            &'static str,
        );
        let cases: [Case; 4] = [
            (
                "both in sync, longer log wins",
                &["s0-r0", "s0-r1", "s0-r2"],
                (5, 90),
                (5, 95),
                "s0-r2",
            ),
            (
                "ties go to the lower index",
                &["s0-r0", "s0-r1", "s0-r2"],
                (5, 95),
                (5, 95),
                "s0-r1",
            ),
            (
                "later epoch beats longer log",
                &["s0-r0", "s0-r1", "s0-r2"],
                (6, 1),
                (5, 500),
                "s0-r1",
            ),
            (
                "more data but not in sync loses",
                &["s0-r0", "s0-r1"],
                (5, 90),
                (5, 120),
                "s0-r1",
            ),
        ];
        let spec = spec(3, 1);
        for (name, members, r1, r2, winner) in cases {
            let obs = vec![
                dead("s0-r0"),
                node("s0-r1").follower(6).at(r1.0, r1.1).obs(),
                node("s0-r2").follower(6).at(r2.0, r2.1).obs(),
            ];
            let d = decide(&spec, &running(&spec, "s0-r0", 6, members), &obs, T0);
            assert_eq!(leader(&d), (Some(winner), 7), "{name}");
        }
    }

    /// Runs rounds 200 ms apart in which the leader enforces whatever it was last told.
    struct Rounds {
        spec: ClusterSpec,
        state: ControlState,
        now: u64,
        told: Vec<String>,
    }

    impl Rounds {
        fn round(&mut self, r2_acked: u64, r2_contact: u64) -> Decision {
            self.now += 200;
            let told: Vec<&str> = self.told.iter().map(String::as_str).collect();
            let lead = node("s0-r0")
                .leader(3)
                .at(3, 100)
                .in_sync(&told)
                .ack("s0-r1", 100, 20)
                .ack("s0-r2", r2_acked, r2_contact);
            let obs = vec![
                lead.obs(),
                node("s0-r1").follower(3).at(3, 100).obs(),
                node("s0-r2").follower(3).at(3, r2_acked).obs(),
            ];
            let d = decide(&self.spec, &self.state, &obs, self.now);
            self.told = role(&d, "s0-r0").in_sync.clone();
            self.state = d.state.clone();
            d
        }
    }

    #[test]
    fn flapping_follower_is_held_down_then_rejoins_only_when_confirmed() {
        let spec = spec(3, 1);
        let pair = ["s0-r0", "s0-r1"];
        let mut r = Rounds {
            state: running(&spec, "s0-r0", 3, &pair),
            spec,
            now: T0,
            told: ids(&pair),
        };
        // Caught up (lag 0), lagging (lag 50 > catch_up_lag 10), or silent to the leader.
        let patterns: [&[(u64, u64)]; 3] = [
            &[(100, 20), (50, 20)],
            &[(100, 20), (100, 20), (50, 20)],
            &[(100, 20), (100, 20), (100, TIMEOUT + 1)],
        ];
        for pattern in patterns {
            for i in 0..12 {
                let (acked, contact) = pattern[i % pattern.len()];
                let d = r.round(acked, contact);
                assert!(
                    !r.told.contains(&"s0-r2".to_string()),
                    "flapping follower proposed"
                );
                assert_eq!(in_sync(&d), pair.to_vec());
                assert!(published(&d).is_none());
            }
        }

        // Steady: proposed only after REJOIN_MIN_ROUNDS rounds and in_sync_timeout_ms caught up.
        let mut proposed_after = None;
        for i in 1..=10 {
            r.round(100, 20);
            if r.told.contains(&"s0-r2".to_string()) {
                proposed_after = Some(i);
                break;
            }
        }
        // Rounds at +0, +200, +400, +600 ms: the fourth is the first with 600 ms caught up.
        assert_eq!(proposed_after, Some(4));
        assert_eq!(
            in_sync(&Decision {
                actions: vec![],
                events: vec![],
                state: r.state.clone()
            }),
            pair.to_vec()
        );

        // The leader enforces it but it has not acknowledged everything committed: not yet.
        let d = r.round(95, 20);
        assert_eq!(in_sync(&d), pair.to_vec());
        assert!(r.told.contains(&"s0-r2".to_string()));
        // Now it has: it counts, and routers learn about it.
        let d = r.round(100, 20);
        assert_eq!(in_sync(&d), vec!["s0-r0", "s0-r1", "s0-r2"]);
        assert!(d.events.contains(&Event::InSyncChanged {
            shard: 0,
            in_sync: ids(&["s0-r0", "s0-r1", "s0-r2"])
        }));
        assert!(published(&d).unwrap().shards[0].replicas[2].in_sync);
    }

    #[test]
    fn in_sync_counts_only_what_the_leader_enforces() {
        let spec = spec(3, 1);
        let pair = ["s0-r0", "s0-r1"];
        let mut st = running(&spec, "s0-r0", 3, &pair);
        st.shards[0].pending_in_sync = ids(&["s0-r2"]);
        let obs = |leader_reports: &[&str]| {
            vec![
                node("s0-r0")
                    .leader(3)
                    .at(3, 100)
                    .in_sync(leader_reports)
                    .ack("s0-r1", 100, 20)
                    .ack("s0-r2", 100, 20)
                    .obs(),
                node("s0-r1").follower(3).at(3, 100).obs(),
                node("s0-r2").follower(3).at(3, 100).obs(),
            ]
        };
        let d = decide(&spec, &st, &obs(&pair), T0 + 200);
        assert_eq!(in_sync(&d), pair.to_vec());
        assert_eq!(role(&d, "s0-r0").in_sync, ids(&["s0-r0", "s0-r1", "s0-r2"]));
        let d = decide(&spec, &st, &obs(&["s0-r0", "s0-r1", "s0-r2"]), T0 + 200);
        assert_eq!(in_sync(&d), vec!["s0-r0", "s0-r1", "s0-r2"]);

        // Right after a failover the leader's commit point may lag; the epoch start bounds it.
        st.shards[0].epoch_start_seq = 120;
        let d = decide(&spec, &st, &obs(&["s0-r0", "s0-r1", "s0-r2"]), T0 + 200);
        assert_eq!(in_sync(&d), pair.to_vec());

        // A member the leader no longer reports stops counting, so it cannot be promoted.
        let all = ["s0-r0", "s0-r1", "s0-r2"];
        let st = running(&spec, "s0-r0", 3, &all);
        let d = decide(&spec, &st, &obs(&["s0-r0", "s0-r2"]), T0 + 200);
        assert_eq!(in_sync(&d), vec!["s0-r0", "s0-r2"]);
        let obs = [
            dead("s0-r0"),
            node("s0-r1").follower(3).at(3, 120).obs(),
            node("s0-r2").follower(3).at(3, 100).obs(),
        ];
        assert_eq!(
            leader(&decide(&spec, &d.state, &obs, T0 + 400)),
            (Some("s0-r2"), 4)
        );
    }

    #[test]
    fn promoted_replica_that_missed_its_role_is_offered_it_again() {
        let spec = spec(2, 1);
        // r1 was promoted at epoch 4 but the request never arrived: it still follows epoch 3.
        let st = running(&spec, "s0-r1", 4, &["s0-r1"]);
        let obs = [dead("s0-r0"), node("s0-r1").follower(3).at(3, 20).obs()];
        let d = decide(&spec, &st, &obs, T0 + 5_000);
        assert!(promotions(&d).is_empty());
        assert_eq!(leader_requests(&d), vec![("s0-r1", 4)]);
        assert!(d.events.contains(&Event::ShardUnavailable {
            shard: 0,
            reason: Unavailable::AwaitingLeader
        }));
        let taken = [dead("s0-r0"), healthy("s0-r1", 4, 20, &["s0-r1"]).obs()];
        let d = decide(&spec, &d.state, &taken, T0 + 5_200);
        assert!(d.events.contains(&Event::ShardAvailable { shard: 0 }));
    }

    #[test]
    fn a_promoted_replica_that_never_takes_the_role_is_replaced_once_no_lease_can_run() {
        let spec = spec(3, 1);
        let all = ["s0-r0", "s0-r1", "s0-r2"];
        let followers = |epoch| {
            [
                node("s0-r1").follower(epoch).at(3, 100).obs(),
                node("s0-r2").follower(3).at(3, 100).obs(),
            ]
        };
        let [r1, r2] = followers(3);
        let mut d = decide(
            &spec,
            &running(&spec, "s0-r0", 3, &all),
            &[dead("s0-r0"), r1, r2],
            T0,
        );
        assert_eq!(leader(&d), (Some("s0-r1"), 4));
        // r1 answers every round but never takes epoch 4 (it cannot write it, say).
        let (mut last_offer, mut replaced) = (T0, None);
        for now in (T0 + 100..T0 + 10_000).step_by(100) {
            let [r1, r2] = followers(3);
            d = decide(&spec, &d.state, &[dead("s0-r0"), r1, r2], now);
            if leader_requests(&d).contains(&("s0-r1", 4)) {
                last_offer = now;
            }
            if leader(&d).1 > 4 {
                replaced = Some(now);
                break;
            }
        }
        let replaced = replaced.expect("another replica takes over");
        assert_eq!(leader(&d), (Some("s0-r2"), 5));
        // It was offered the role for a lease and a grace, and replaced only once no offer
        // it could still take was younger than that.
        assert!(
            last_offer >= T0 + LEASE + GRACE,
            "offers stopped at {last_offer}"
        );
        assert!(
            replaced > last_offer + LEASE + GRACE,
            "replaced at {replaced}"
        );
        assert!(!in_sync(&d).contains(&"s0-r1"));
    }

    #[test]
    fn each_round_numbers_its_role_requests_above_any_a_replica_took() {
        let spec = spec(2, 1);
        let both = ["s0-r0", "s0-r1"];
        let seen = settled(&both);
        let first = decide(&spec, &running(&spec, "s0-r0", 3, &both), &seen, T0 + 100);
        let next = decide(&spec, &first.state, &seen, T0 + 200);
        let round = |d: &Decision, id: &str| role(d, id).round;
        assert!(round(&first, "s0-r0") > 0);
        assert!(round(&next, "s0-r0") > round(&first, "s0-r0"));
        assert_eq!(round(&next, "s0-r1"), round(&next, "s0-r0"));
        // A control plane that lost its state goes on above what the leader took, or its
        // requests would all be refused as late ones.
        let mut took = healthy("s0-r0", 3, 100, &both).obs();
        took.status.as_mut().unwrap().role_round = 500;
        let fresh = running(&spec, "s0-r0", 3, &both);
        let d = decide(&spec, &fresh, &[took, seen[1].clone()], T0 + 300);
        assert!(round(&d, "s0-r0") > 500);
    }

    #[test]
    fn a_leader_back_with_empty_storage_is_not_offered_its_leadership_again() {
        let spec = spec(3, 1);
        let all = ["s0-r0", "s0-r1", "s0-r2"];
        let d = decide(
            &spec,
            &running(&spec, "s0-r0", 3, &all),
            &settled(&all),
            T0 + 100,
        );
        assert_eq!(leader_requests(&d), vec![("s0-r0", 3)]);
        // r0's volume was replaced (PVC deleted, disk lost) and its Pod came back before
        // the lease ran out: it answers as a fresh node at epoch 0, with nothing stored.
        let wiped = [
            node("s0-r0").obs(),
            node("s0-r1").follower(3).at(3, 100).obs(),
            node("s0-r2").follower(3).at(3, 100).obs(),
        ];
        let d = decide(&spec, &d.state, &wiped, T0 + 300);
        assert!(
            !leader_requests(&d).contains(&("s0-r0", 3)),
            "an empty replica must not lead epoch 3, whose entries its followers hold"
        );
        assert_eq!(leader(&d), (Some("s0-r1"), 4));
        assert!(!in_sync(&d).contains(&"s0-r0"));
    }

    #[test]
    fn an_in_sync_replica_back_with_empty_storage_is_never_promoted() {
        let spec = spec(2, 1);
        let both = ["s0-r0", "s0-r1"];
        let d = decide(
            &spec,
            &running(&spec, "s0-r0", 3, &both),
            &settled(&both),
            T0 + 100,
        );
        assert_eq!(in_sync(&d), both.to_vec());
        // r1 lost its volume and came back empty while r0 went down: r0 alone holds the
        // 100 committed entries.
        let d = decide(
            &spec,
            &d.state,
            &[dead("s0-r0"), node("s0-r1").obs()],
            T0 + 300,
        );
        assert!(promotions(&d).is_empty(), "{:?}", d.events);
        assert!(leader_requests(&d).is_empty());
        assert_eq!(in_sync(&d), vec!["s0-r0"]);
        // r0 returns: it leads again, and r1 rejoins only by catching up.
        let back = [
            node("s0-r0").unassigned(3).at(3, 100).obs(),
            node("s0-r1").follower(3).obs(),
        ];
        let d = decide(&spec, &d.state, &back, T0 + 500);
        assert_eq!(leader(&d), (Some("s0-r0"), 4));
        assert_eq!(in_sync(&d), vec!["s0-r0"]);
    }

    #[test]
    fn a_replica_that_answers_is_alive_whatever_the_driver_believes() {
        let spec = spec(2, 1);
        let both = ["s0-r0", "s0-r1"];
        let mut leader_obs = healthy("s0-r0", 3, 9, &both).obs();
        let mut follower_obs = node("s0-r1").follower(3).at(3, 9).obs();
        // E.g. a Pod already marked terminating whose process still serves.
        leader_obs.process_alive = Some(false);
        follower_obs.process_alive = Some(false);
        let d = decide(
            &spec,
            &running(&spec, "s0-r0", 3, &both),
            &[leader_obs, follower_obs],
            T0 + 200,
        );
        assert!(promotions(&d).is_empty());
        assert!(restarts(&d).is_empty());
        assert_eq!(in_sync(&d), both.to_vec());
        assert_eq!(leader_requests(&d), vec![("s0-r0", 3)]);
    }

    #[test]
    fn returning_old_leader_is_demoted_and_not_in_sync() {
        let spec = spec(3, 1);
        let st = running(&spec, "s0-r1", 5, &["s0-r1", "s0-r2"]);
        // r0 led epoch 4 and wrote entries nobody acknowledged (divergent, and longer).
        let obs = vec![
            node("s0-r0").leader(4).at(4, 999).obs(),
            healthy("s0-r1", 5, 40, &["s0-r1", "s0-r2"]).obs(),
            node("s0-r2").follower(5).at(5, 40).obs(),
        ];
        let d = decide(&spec, &st, &obs, T0 + 200);
        let req = role(&d, "s0-r0");
        assert_eq!(
            (req.role, req.epoch, req.leader.clone()),
            (Role::Follower, 5, Some(addr("s0-r1")))
        );
        assert_eq!(leader_requests(&d), vec![("s0-r1", 5)]);
        assert!(d.events.contains(&Event::Demoted {
            shard: 0,
            replica: "s0-r0".into(),
            stale_epoch: 4,
            epoch: 5
        }));
        assert_eq!(in_sync(&d), vec!["s0-r1", "s0-r2"]);
        assert!(!role(&d, "s0-r1").in_sync.contains(&"s0-r0".to_string()));
        assert!(published(&d).is_none());

        // Following now, with a long log, it still cannot be promoted: it is not in sync.
        let obs = vec![
            node("s0-r0").follower(5).at(5, 45).obs(),
            dead("s0-r1"),
            node("s0-r2").follower(5).at(5, 40).obs(),
        ];
        let d = decide(&spec, &d.state, &obs, T0 + 400);
        assert_eq!(leader(&d), (Some("s0-r2"), 6));
    }

    #[test]
    fn epochs_always_rise_above_anything_seen() {
        let spec = spec(3, 1);
        let all = ["s0-r0", "s0-r1", "s0-r2"];
        // A follower has seen epoch 9 (state restored from an old copy): re-grant above it.
        let obs = vec![
            healthy("s0-r0", 3, 10, &all).obs(),
            node("s0-r1").follower(9).at(3, 10).obs(),
            node("s0-r2").follower(3).at(3, 10).obs(),
        ];
        let d = decide(&spec, &running(&spec, "s0-r0", 3, &all), &obs, T0);
        assert_eq!(leader(&d), (Some("s0-r0"), 10));
        assert!(
            d.actions
                .iter()
                .all(|a| !matches!(a, Action::SendRole { request, .. } if request.epoch != 10))
        );
        // An epoch seen once is remembered after the replica that showed it disappears.
        let obs = vec![
            dead("s0-r0"),
            silent("s0-r1"),
            node("s0-r2").follower(10).at(10, 12).obs(),
        ];
        let d = decide(&spec, &d.state, &obs, T0 + 200);
        assert_eq!(leader(&d), (Some("s0-r2"), 11));
    }

    #[test]
    fn running_leader_is_adopted_when_state_was_lost() {
        let spec = spec(2, 1);
        let obs = vec![
            node("s0-r0")
                .leader(7)
                .at(7, 30)
                .in_sync(&["s0-r0", "s0-r1"])
                .ack("s0-r1", 30, 20)
                .obs(),
            node("s0-r1").follower(7).at(7, 30).obs(),
        ];
        let d = decide(&spec, &initial_state(&spec), &obs, T0);
        assert!(promotions(&d).is_empty());
        assert!(d.events.contains(&Event::Adopted {
            shard: 0,
            replica: "s0-r0".into(),
            epoch: 7
        }));
        assert_eq!(leader(&d), (Some("s0-r0"), 7));
        assert_eq!(in_sync(&d), vec!["s0-r0"]);
        // The set it enforces is still asked for; the follower counts once it proves caught up.
        assert_eq!(role(&d, "s0-r0").in_sync, ids(&["s0-r0", "s0-r1"]));
        let d = decide(&spec, &d.state, &obs, T0 + 200);
        assert_eq!(in_sync(&d), vec!["s0-r0", "s0-r1"]);
    }

    #[test]
    fn topology_version_bumps_only_on_change() {
        let spec = spec(3, 1);
        let all = ["s0-r0", "s0-r1", "s0-r2"];
        let fresh: Vec<Observation> = all.iter().map(|id| node(id).obs()).collect();
        let d = decide(&spec, &initial_state(&spec), &fresh, T0);
        assert_eq!(published(&d).map(|t| t.version), Some(1));
        let steady = vec![
            healthy("s0-r0", 1, 0, &all).obs(),
            node("s0-r1").follower(1).obs(),
            node("s0-r2").follower(1).obs(),
        ];
        let mut st = d.state;
        for i in 1..=3 {
            let d = decide(&spec, &st, &steady, T0 + 200 * i);
            assert!(published(&d).is_none());
            assert_eq!(d.state.topology.version, 1);
            st = d.state;
        }
        // An address change is news.
        let mut moved = steady.clone();
        moved[1].address = Some("10.0.0.9:7000".into());
        let d = decide(&spec, &st, &moved, T0 + 1_000);
        let t = published(&d).expect("address change publishes");
        assert_eq!(
            (t.version, t.shards[0].replicas[1].address.as_str()),
            (2, "10.0.0.9:7000")
        );
        assert!(
            matches!(&d.actions[1], Action::SendRole { replica, address, .. } if replica == "s0-r1" && address == "10.0.0.9:7000")
        );
        assert!(
            role(&d, "s0-r0")
                .peers
                .iter()
                .any(|p| p.address == "10.0.0.9:7000")
        );
        // So is an in-sync change, once; then quiet again.
        let mut lost = moved.clone();
        lost[2] = dead("s0-r2");
        let d = decide(&spec, &d.state, &lost, T0 + 1_200);
        assert_eq!(published(&d).map(|t| t.version), Some(3));
        let d = decide(&spec, &d.state, &lost, T0 + 1_400);
        assert!(published(&d).is_none());
        assert_eq!(d.state.topology.version, 3);
    }

    #[test]
    fn a_new_driver_clock_never_shortens_the_wait() {
        let spec = spec(2, 1);
        let st = running(&spec, "s0-r0", 3, &["s0-r0", "s0-r1"]);
        let obs = [silent("s0-r0"), node("s0-r1").follower(3).obs()];
        // The playground restarted and its monotonic clock starts near zero.
        for mut loaded in [st.clone(), {
            let mut s = st.clone();
            s.resume(50);
            s
        }] {
            let d = decide(&spec, &loaded, &obs, 50);
            assert!(promotions(&d).is_empty());
            loaded = d.state;
            assert!(promotions(&decide(&spec, &loaded, &obs, 50 + LEASE + GRACE)).is_empty());
            assert_eq!(
                promotions(&decide(&spec, &loaded, &obs, 51 + LEASE + GRACE)),
                vec![("s0-r1", 4)]
            );
        }
        // A clock that jumped forward is only safe through `resume`.
        let mut st = st;
        st.resume(T0 * 10);
        assert!(promotions(&decide(&spec, &st, &obs, T0 * 10 + 1)).is_empty());
    }

    #[test]
    fn spec_validation() {
        let ok = spec(3, 2);
        assert_eq!(ok.validate(), Ok(()));
        let cases = [
            (
                ClusterSpec {
                    shards: 0,
                    ..ok.clone()
                },
                SpecError::Shards(0),
            ),
            (
                ClusterSpec {
                    replicas_per_shard: 0,
                    ..ok.clone()
                },
                SpecError::NoReplicas,
            ),
            (
                ClusterSpec {
                    min_in_sync: 4,
                    ..ok.clone()
                },
                SpecError::MinInSync {
                    min: 4,
                    replicas: 3,
                },
            ),
            (
                ClusterSpec {
                    min_in_sync: 0,
                    ..ok.clone()
                },
                SpecError::MinInSync {
                    min: 0,
                    replicas: 3,
                },
            ),
            (
                ClusterSpec {
                    lease_ms: 0,
                    ..ok.clone()
                },
                SpecError::ZeroLease,
            ),
        ];
        for (spec, err) in cases {
            assert_eq!(spec.validate(), Err(err));
        }
    }

    #[test]
    fn events_read_well() {
        let e = Event::Promoted {
            shard: 1,
            replica: "s1-r2".into(),
            epoch: 4,
            previous: Some("s1-r0".into()),
        };
        assert_eq!(
            e.to_string(),
            "shard 1: s1-r2 promoted to leader at epoch 4, replacing s1-r0"
        );
        let e = Event::ShardUnavailable {
            shard: 0,
            reason: Unavailable::NoInSyncReplica,
        };
        assert_eq!(
            e.to_string(),
            "shard 0 unavailable: leader lost and no in-sync replica reachable"
        );
    }

    /// A whole shard of simulated nodes with crashes, partitions, lost messages and restarts.
    mod sim {
        use super::*;

        struct SimNode {
            id: String,
            alive: bool,
            cut: bool,
            role: Role,
            epoch: u64,
            /// Epoch of the entry at each sequence number (index = seq - 1).
            log: Vec<u64>,
            leader: Option<String>,
            in_sync: Vec<String>,
            min_in_sync: u32,
            lease_until: u64,
            /// Follower id → (acked seq, when).
            acks: BTreeMap<String, (u64, u64)>,
            commit: u64,
        }

        pub(super) struct Sim {
            spec: ClusterSpec,
            state: ControlState,
            nodes: Vec<SimNode>,
            now: u64,
            rng: u64,
            /// Epoch of every committed entry, by sequence number.
            committed: Vec<u64>,
            /// Who took leadership at which epoch.
            leaders: BTreeMap<u64, String>,
            published: u64,
        }

        impl Sim {
            pub(super) fn new(seed: u64, replicas: u32, min_in_sync: u32) -> Sim {
                let spec = ClusterSpec {
                    failover_grace_ms: 200,
                    catch_up_lag: 0,
                    ..spec(replicas, min_in_sync)
                };
                let nodes = (0..replicas)
                    .map(|r| SimNode {
                        id: replica_id(0, r),
                        alive: true,
                        cut: false,
                        role: Role::Unassigned,
                        epoch: 0,
                        log: vec![],
                        leader: None,
                        in_sync: vec![],
                        min_in_sync: 1,
                        lease_until: 0,
                        acks: BTreeMap::new(),
                        commit: 0,
                    })
                    .collect();
                Sim {
                    state: initial_state(&spec),
                    spec,
                    nodes,
                    now: T0,
                    rng: seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1,
                    committed: vec![],
                    leaders: BTreeMap::new(),
                    published: 0,
                }
            }

            fn rand(&mut self, n: u64) -> u64 {
                self.rng ^= self.rng << 13;
                self.rng ^= self.rng >> 7;
                self.rng ^= self.rng << 17;
                self.rng % n
            }

            pub(super) fn committed(&self) -> usize {
                self.committed.len()
            }

            pub(super) fn step(&mut self, faults: bool) {
                if faults {
                    let n = self.nodes.len() as u64;
                    let victim = self.rand(n) as usize;
                    match self.rand(100) {
                        0..=3 => self.nodes[victim].alive = false,
                        4..=7 => self.nodes[victim].cut = true,
                        8..=15 => self.nodes.iter_mut().for_each(|n| n.cut = false),
                        _ => {}
                    }
                } else {
                    self.nodes.iter_mut().for_each(|n| n.cut = false);
                }
                self.replicate();
                self.check_reads();
                let observations = self.observe();
                let d = decide(&self.spec, &self.state, &observations, self.now);
                self.state = d.state;
                for action in d.actions {
                    self.apply(action, faults);
                }
                self.now += 200;
            }

            fn reachable(n: &SimNode) -> bool {
                n.alive && !n.cut
            }

            /// A leader holding a lease answers reads from its own state; that is only
            /// linearizable if it holds every committed write.
            fn check_reads(&self) {
                for l in self
                    .nodes
                    .iter()
                    .filter(|n| n.alive && n.role == Role::Leader && n.lease_until > self.now)
                {
                    for (k, e) in self.committed.iter().enumerate() {
                        assert_eq!(
                            l.log.get(k),
                            Some(e),
                            "{} serves stale reads: misses committed entry {}",
                            l.id,
                            k + 1
                        );
                    }
                }
            }

            /// Every serving leader takes one write and commits what its in-sync set holds.
            fn replicate(&mut self) {
                for li in 0..self.nodes.len() {
                    let l = &self.nodes[li];
                    // A cut leader still serves clients on its side of the partition until its lease ends.
                    if !l.alive || l.role != Role::Leader || l.lease_until <= self.now {
                        continue;
                    }
                    let (epoch, lid, cut) = (l.epoch, l.id.clone(), l.cut);
                    self.nodes[li].log.push(epoch);
                    let log = self.nodes[li].log.clone();
                    let mut acked = vec![];
                    for f in self.nodes.iter_mut().filter(|f| f.id != lid) {
                        let follows = Self::reachable(f) && !cut && f.role == Role::Follower;
                        if follows && f.epoch == epoch && f.leader.as_deref() == Some(lid.as_str())
                        {
                            f.log = log.clone();
                            acked.push(f.id.clone());
                        }
                    }
                    let now = self.now;
                    let l = &mut self.nodes[li];
                    for id in acked {
                        l.acks.insert(id, (log.len() as u64, now));
                    }
                    let len = log.len() as u64;
                    let enough = l.in_sync.len() >= l.min_in_sync as usize
                        && l.in_sync.contains(&l.id)
                        && l.in_sync
                            .iter()
                            .filter(|m| **m != l.id)
                            .all(|m| l.acks.get(m).is_some_and(|&(a, at)| a == len && at == now));
                    if enough {
                        l.commit = len;
                        for (k, &e) in log.iter().enumerate() {
                            match self.committed.get(k) {
                                Some(&c) => assert_eq!(
                                    c,
                                    e,
                                    "committed entry {} overwritten by {lid}",
                                    k + 1
                                ),
                                None => self.committed.push(e),
                            }
                        }
                    }
                }
            }

            fn observe(&self) -> Vec<Observation> {
                self.nodes
                    .iter()
                    .map(|n| Observation {
                        replica: n.id.clone(),
                        shard: 0,
                        address: Some(addr(&n.id)),
                        status: Self::reachable(n).then(|| NodeStatus {
                            id: n.id.clone(),
                            role: n.role,
                            epoch: n.epoch,
                            last_epoch: n.log.last().copied().unwrap_or(0),
                            last_seq: n.log.len() as u64,
                            commit_seq: n.commit,
                            in_sync: if n.role == Role::Leader {
                                n.in_sync.clone()
                            } else {
                                vec![]
                            },
                            lease_remaining_ms: n.lease_until.saturating_sub(self.now),
                            keys: 0,
                            digest: String::new(),
                            log_start_seq: 0,
                            snapshots_installed: 0,
                            role_round: 0,
                            follower_acks: if n.role == Role::Leader {
                                n.acks
                                    .iter()
                                    .map(|(id, &(acked, at))| FollowerAck {
                                        id: id.clone(),
                                        acked_seq: acked,
                                        last_contact_ms: self.now - at,
                                    })
                                    .collect()
                            } else {
                                vec![]
                            },
                        }),
                        process_alive: if !n.alive {
                            Some(false)
                        } else if n.cut {
                            None
                        } else {
                            Some(true)
                        },
                    })
                    .collect()
            }

            fn apply(&mut self, action: Action, faults: bool) {
                let lost = faults && self.rand(100) < 5;
                match action {
                    Action::SendRole {
                        replica, request, ..
                    } => {
                        let now = self.now;
                        let committed = self.committed.clone();
                        let highest = self.leaders.keys().next_back().copied().unwrap_or(0);
                        let n = self.nodes.iter_mut().find(|n| n.id == replica).unwrap();
                        if lost || !Self::reachable(n) || request.epoch < n.epoch {
                            return;
                        }
                        match request.role {
                            Role::Leader => {
                                if !(n.role == Role::Leader && n.epoch == request.epoch) {
                                    assert!(
                                        !self.leaders.contains_key(&request.epoch),
                                        "two leaderships at epoch {}: {:?} and {replica}",
                                        request.epoch,
                                        self.leaders.get(&request.epoch)
                                    );
                                    assert!(
                                        request.epoch > highest,
                                        "leadership at epoch {} after {highest}",
                                        request.epoch
                                    );
                                    for (k, e) in committed.iter().enumerate() {
                                        assert_eq!(
                                            n.log.get(k),
                                            Some(e),
                                            "new leader {replica} misses committed entry {}",
                                            k + 1
                                        );
                                    }
                                    self.leaders.insert(request.epoch, replica.clone());
                                    n.acks.clear();
                                    n.commit = 0;
                                }
                                n.role = Role::Leader;
                                n.leader = None;
                                n.lease_until = now + request.lease_ms;
                            }
                            Role::Follower => {
                                n.role = Role::Follower;
                                n.leader = request
                                    .leader
                                    .map(|a| a.trim_end_matches(".distkv:7000").to_string());
                                n.lease_until = 0;
                                n.acks.clear();
                            }
                            Role::Unassigned => {}
                        }
                        n.epoch = request.epoch;
                        n.in_sync = request.in_sync;
                        n.min_in_sync = request.min_in_sync;
                    }
                    Action::Restart { replica } => {
                        if self.rand(2) == 0 {
                            let n = self.nodes.iter_mut().find(|n| n.id == replica).unwrap();
                            assert!(!n.alive, "restart of a live replica");
                            *n = SimNode {
                                alive: true,
                                cut: false,
                                role: Role::Unassigned,
                                leader: None,
                                in_sync: vec![],
                                lease_until: 0,
                                acks: BTreeMap::new(),
                                commit: 0,
                                id: std::mem::take(&mut n.id),
                                log: std::mem::take(&mut n.log),
                                ..*n
                            };
                        }
                    }
                    Action::PublishTopology(t) => {
                        assert!(t.version > self.published);
                        assert!(t.slot_table().is_ok());
                        assert!(t.shards.iter().all(|s| {
                            s.replicas.iter().filter(|r| r.role == Role::Leader).count() <= 1
                        }));
                        self.published = t.version;
                    }
                }
            }

            /// After healing: a serving leader, every replica in sync, writes committing.
            pub(super) fn assert_recovered(&self, seed: u64) {
                let shard = &self.state.topology.shards[0];
                let leader = shard
                    .leader
                    .as_deref()
                    .unwrap_or_else(|| panic!("seed {seed}: no leader"));
                let l = self.nodes.iter().find(|n| n.id == leader).unwrap();
                assert_eq!(
                    (l.role, l.epoch),
                    (Role::Leader, shard.epoch),
                    "seed {seed}"
                );
                assert_eq!(
                    self.state.shards[0].in_sync.len(),
                    self.nodes.len(),
                    "seed {seed}: {:?}",
                    self.state.shards[0]
                );
            }
        }
    }

    #[test]
    fn simulated_faults_never_yield_two_leaders_in_an_epoch_or_lose_a_commit() {
        for seed in 1..=40u64 {
            for (replicas, min) in [(2, 1), (3, 1), (3, 2)] {
                let mut sim =
                    sim::Sim::new(seed * 31 + u64::from(replicas * 7 + min), replicas, min);
                for _ in 0..400 {
                    sim.step(true);
                }
                for _ in 0..60 {
                    sim.step(false);
                }
                sim.assert_recovered(seed);
                let before = sim.committed();
                for _ in 0..5 {
                    sim.step(false);
                }
                assert!(
                    sim.committed() > before,
                    "seed {seed}: writes do not go on after recovery"
                );
            }
        }
    }
}
