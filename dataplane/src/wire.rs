//! Bodies of the internal control API (`/internal/*`), shared by nodes, the playground and
//! the operator.

use serde::{Deserialize, Serialize};

use crate::slots::Slot;
use crate::topology::Role;

/// How a leader acknowledges writes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum AckMode {
    /// Acknowledge once every member of the in-sync set holds the write durably.
    #[default]
    Sync,
    /// Acknowledge after the leader's own fsync; a failover may lose the newest writes.
    Async,
}

/// A peer replica of the same shard, as the leader needs it to stream its log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Peer {
    /// Replica id.
    pub id: String,
    /// `host:port` of its HTTP listener.
    pub address: String,
}

/// `POST /internal/role`: the control plane assigns a role at an epoch and renews the lease.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct RoleRequest {
    /// Epoch of this assignment; refused when lower than the highest the node has seen.
    pub epoch: u64,
    /// Role to take.
    pub role: Role,
    /// Address of the leader (for followers); `None` for the leader itself.
    pub leader: Option<String>,
    /// Replica ids of the in-sync set, leader included.
    pub in_sync: Vec<String>,
    /// Lease length; a leader that hears nothing for this long stops serving.
    pub lease_ms: u64,
    /// Every other replica of the shard (the leader streams to these).
    #[serde(default)]
    pub peers: Vec<Peer>,
    /// Slot ranges the shard owns; keys outside them are refused.
    #[serde(default)]
    pub slot_ranges: Vec<(Slot, Slot)>,
    /// Ack mode for client writes.
    #[serde(default)]
    pub mode: AckMode,
    /// Fewest in-sync members (leader included) with which the leader still takes writes.
    #[serde(default = "one")]
    pub min_in_sync: u32,
    /// The control round that sent it. Within one epoch a replica refuses a request from
    /// an earlier round than one it took: requests can arrive late and out of order (a
    /// stopped replica resumes with several queued), and a late one would bring back an
    /// in-sync set the control plane has since changed. 0: unnumbered, always taken.
    #[serde(default)]
    pub round: u64,
}

fn one() -> u32 {
    1
}

/// `GET /internal/status`: what a replica reports about itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct NodeStatus {
    /// Replica id.
    pub id: String,
    /// Current role.
    pub role: Role,
    /// Highest epoch this replica has seen (persisted).
    pub epoch: u64,
    /// Epoch of the last entry in its log.
    pub last_epoch: u64,
    /// Sequence number of the last entry in its log.
    pub last_seq: u64,
    /// Highest sequence number known committed.
    pub commit_seq: u64,
    /// In-sync set as this replica knows it (meaningful on the leader).
    pub in_sync: Vec<String>,
    /// Milliseconds left on the leader lease (0 when expired or not a leader).
    pub lease_remaining_ms: u64,
    /// Number of keys stored.
    pub keys: u64,
    /// Hash over every (key, version, value); equal on two replicas exactly when their data is.
    pub digest: String,
    /// Lowest sequence number still in the log (entries below were trimmed).
    #[serde(default)]
    pub log_start_seq: u64,
    /// Snapshots this replica has installed since it started.
    #[serde(default)]
    pub snapshots_installed: u64,
    /// For a leader: each follower's acknowledged sequence number.
    #[serde(default)]
    pub follower_acks: Vec<FollowerAck>,
    /// Latest control round whose role request it took at its current epoch: a control
    /// plane that lost its own count goes on above it.
    #[serde(default)]
    pub role_round: u64,
}

impl NodeStatus {
    /// The status of a replica that has just started: no role, no data.
    pub fn unassigned(id: impl Into<String>) -> Self {
        NodeStatus {
            id: id.into(),
            role: Role::Unassigned,
            epoch: 0,
            last_epoch: 0,
            last_seq: 0,
            commit_seq: 0,
            in_sync: vec![],
            lease_remaining_ms: 0,
            keys: 0,
            digest: String::new(),
            log_start_seq: 0,
            snapshots_installed: 0,
            follower_acks: vec![],
            role_round: 0,
        }
    }
}

/// A follower's replication progress as its leader sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct FollowerAck {
    /// Replica id of the follower.
    pub id: String,
    /// Highest sequence number it holds durably.
    pub acked_seq: u64,
    /// Milliseconds since it last answered.
    pub last_contact_ms: u64,
}
