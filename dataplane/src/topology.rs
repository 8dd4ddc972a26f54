//! The cluster topology: which shard owns which slots, who leads it, at which epoch.
//!
//! The control plane (playground or operator) owns the topology and pushes every new
//! version to the routers; routers and `GET /v1/cluster` only read it.

use serde::{Deserialize, Serialize};

use crate::slots::{SLOT_COUNT, Slot};

/// A replica's role within its shard.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Takes writes and streams its log to the followers.
    Leader,
    /// Applies the leader's log; serves only `?consistency=stale` reads.
    Follower,
    /// Has not been told its role yet (fresh start) and serves nothing.
    Unassigned,
}

/// One replica as the topology records it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ReplicaInfo {
    /// Stable replica name, e.g. `s0-r1`.
    pub id: String,
    /// `host:port` of the replica's HTTP listener.
    pub address: String,
    /// Role the control plane assigned.
    pub role: Role,
    /// Whether the replica is in the shard's in-sync set.
    pub in_sync: bool,
}

/// One shard: a contiguous set of slot ranges served by one leader and its followers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ShardInfo {
    /// Shard number, `0..shards`.
    pub id: u32,
    /// Epoch of the current leadership; rises on every leader change.
    pub epoch: u64,
    /// Replica id of the leader, if the shard has one.
    pub leader: Option<String>,
    /// Inclusive slot ranges this shard owns.
    pub slot_ranges: Vec<(Slot, Slot)>,
    /// Every replica of the shard, leader included.
    pub replicas: Vec<ReplicaInfo>,
}

impl ShardInfo {
    /// Address of the shard's leader, if known.
    pub fn leader_address(&self) -> Option<&str> {
        let leader = self.leader.as_deref()?;
        self.replicas
            .iter()
            .find(|r| r.id == leader)
            .map(|r| r.address.as_str())
    }

    /// Whether `slot` belongs to this shard.
    pub fn owns(&self, slot: Slot) -> bool {
        self.slot_ranges
            .iter()
            .any(|&(a, b)| a <= slot && slot <= b)
    }
}

/// A versioned map of the whole cluster.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Topology {
    /// Rises with every change; a router ignores a topology older than the one it has.
    pub version: u64,
    /// Number of hash slots (always 16384).
    pub slots: u16,
    /// Every shard, ordered by id.
    pub shards: Vec<ShardInfo>,
}

impl Default for Topology {
    fn default() -> Self {
        Topology {
            version: 0,
            slots: SLOT_COUNT,
            shards: Vec::new(),
        }
    }
}

/// Why a topology cannot be used.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TopologyError {
    /// A slot is owned by no shard.
    #[error("slot {0} is owned by no shard")]
    Unowned(Slot),
    /// A slot is owned by two shards.
    #[error("slot {0} is owned by shards {1} and {2}")]
    Overlap(Slot, u32, u32),
    /// A range is reversed or out of bounds.
    #[error("shard {0} has an invalid slot range {1}..={2}")]
    BadRange(u32, Slot, Slot),
    /// The slot count is not 16384.
    #[error("topology declares {0} slots; distkv uses 16384")]
    SlotCount(u16),
    /// No shard at all: every key would be unavailable.
    #[error("topology has no shards; it must assign every slot to one")]
    NoShards,
}

impl Topology {
    /// Builds the table from slot to shard index, checking every slot has exactly one owner.
    pub fn slot_table(&self) -> Result<Vec<u32>, TopologyError> {
        if self.slots != SLOT_COUNT {
            return Err(TopologyError::SlotCount(self.slots));
        }
        if self.shards.is_empty() {
            return Err(TopologyError::NoShards);
        }
        let mut owner = vec![u32::MAX; usize::from(SLOT_COUNT)];
        for (index, shard) in self.shards.iter().enumerate() {
            for &(a, b) in &shard.slot_ranges {
                if a > b || b >= SLOT_COUNT {
                    return Err(TopologyError::BadRange(shard.id, a, b));
                }
                for slot in a..=b {
                    let cell = &mut owner[usize::from(slot)];
                    if *cell != u32::MAX {
                        return Err(TopologyError::Overlap(
                            slot,
                            self.shards[*cell as usize].id,
                            shard.id,
                        ));
                    }
                    *cell = index as u32;
                }
            }
        }
        if let Some(slot) = owner.iter().position(|&o| o == u32::MAX) {
            return Err(TopologyError::Unowned(slot as Slot));
        }
        Ok(owner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::slots::even_ranges;

    fn topo(ranges: Vec<Vec<(Slot, Slot)>>) -> Topology {
        Topology {
            version: 1,
            slots: SLOT_COUNT,
            shards: ranges
                .into_iter()
                .enumerate()
                .map(|(i, slot_ranges)| ShardInfo {
                    id: i as u32,
                    epoch: 1,
                    leader: None,
                    slot_ranges,
                    replicas: vec![],
                })
                .collect(),
        }
    }

    #[test]
    fn even_split_is_a_valid_table() {
        let t = topo(even_ranges(3).into_iter().map(|r| vec![r]).collect());
        let table = t.slot_table().unwrap();
        assert_eq!(table[0], 0);
        assert_eq!(table[16383], 2);
    }

    #[test]
    fn gaps_and_overlaps_are_rejected() {
        let gap = topo(vec![vec![(0, 100)], vec![(102, 16383)]]);
        assert_eq!(gap.slot_table(), Err(TopologyError::Unowned(101)));
        let overlap = topo(vec![vec![(0, 200)], vec![(100, 16383)]]);
        assert_eq!(overlap.slot_table(), Err(TopologyError::Overlap(100, 0, 1)));
        let reversed = topo(vec![vec![(5, 1)]]);
        assert_eq!(reversed.slot_table(), Err(TopologyError::BadRange(0, 5, 1)));
        assert_eq!(topo(vec![]).slot_table(), Err(TopologyError::NoShards));
    }
}
