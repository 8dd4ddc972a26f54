//! Changing `replicasPerShard`: how many pods each StatefulSet keeps, and the matching
//! change to the control state's replica lists.
//!
//! A StatefulSet always removes its highest ordinals, so scaling down must not cut below a
//! shard's leader: that shard keeps `leader ordinal + 1` pods until leadership moves to a
//! lower ordinal (a failover). Followers are removed; a leader never is.
//!
//! Nor may it take the in-sync set below `minInSync` while lower ordinals are still
//! catching up: writes would stop until they do. The shard keeps the in-sync pods it
//! needs until enough of the replicas it keeps are in sync.

use dataplane::control::{ControlState, parse_replica_id, replica_id};
use dataplane::topology::{ReplicaInfo, Role};

/// Ordinal of a replica id `s{shard}-r{ordinal}`.
pub fn ordinal(replica: &str) -> Option<u32> {
    parse_replica_id(replica).map(|(_, ordinal)| ordinal)
}

/// Why a shard keeps more pods than `replicasPerShard` asks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hold {
    /// Its leader sits on an ordinal at or above the size asked.
    Leader,
    /// Fewer than this many of the replicas it would keep are in sync.
    InSync(usize),
}

/// The size `shard` keeps instead of `desired`, and why; `None` when it can shrink (or
/// grow) to `desired` now.
pub fn hold(
    state: &ControlState,
    shard: u32,
    desired: u32,
    min_in_sync: u32,
) -> Option<(u32, Hold)> {
    let topology = state.topology.shards.iter().find(|s| s.id == shard)?;
    let for_leader = topology
        .leader
        .as_deref()
        .and_then(ordinal)
        .map(|leader| (leader + 1, Hold::Leader));
    let mut in_sync: Vec<u32> = state
        .shards
        .iter()
        .find(|c| c.shard == shard)
        .map(|c| c.in_sync.iter().filter_map(|id| ordinal(id)).collect())
        .unwrap_or_default();
    in_sync.sort_unstable();
    // A set already below minInSync is not held to it: only kept from shrinking further.
    let needed = (min_in_sync as usize).min(in_sync.len());
    // The fewest pods that keep `needed` in-sync members: up to the needed-th lowest.
    let for_in_sync = needed
        .checked_sub(1)
        .map(|i| (in_sync[i] + 1, Hold::InSync(needed)));
    [for_leader, for_in_sync]
        .into_iter()
        .flatten()
        .filter(|&(size, _)| size > desired)
        .max_by_key(|&(size, why)| (size, why == Hold::Leader))
}

/// [`hold`] of every shard.
pub fn holds(
    state: &ControlState,
    shards: u32,
    desired: u32,
    min_in_sync: u32,
) -> Vec<Option<(u32, Hold)>> {
    (0..shards)
        .map(|shard| hold(state, shard, desired, min_in_sync))
        .collect()
}

/// StatefulSet size per shard: `desired`, or more while the shard is held back.
pub fn statefulset_sizes(holds: &[Option<(u32, Hold)>], desired: u32) -> Vec<u32> {
    holds
        .iter()
        .map(|h| h.map_or(desired, |(size, _)| size))
        .collect()
}

/// Makes each shard in `state` list exactly replicas `0..sizes[shard]`: new replicas join
/// unassigned; removed ones leave the topology and the in-sync bookkeeping. Returns whether
/// anything changed (the topology version is then raised, so routers learn of it).
///
/// Dropping a member from the recorded in-sync set before the leader hears of it is the
/// safe direction: promotion only ever picks from the recorded set.
pub fn resize(state: &mut ControlState, sizes: &[u32]) -> bool {
    let mut changed = false;
    for shard in &mut state.topology.shards {
        let Some(&size) = sizes.get(shard.id as usize) else {
            continue;
        };
        let before = shard.replicas.len();
        shard.replicas.retain(|r| {
            ordinal(&r.id).is_some_and(|o| o < size)
                || shard.leader.as_deref() == Some(r.id.as_str())
        });
        for ord in 0..size {
            let id = replica_id(shard.id, ord);
            if !shard.replicas.iter().any(|r| r.id == id) {
                shard.replicas.push(ReplicaInfo {
                    id,
                    address: String::new(),
                    role: if shard.leader.is_some() {
                        Role::Follower
                    } else {
                        Role::Unassigned
                    },
                    in_sync: false,
                });
            }
        }
        shard.replicas.sort_by_key(|r| ordinal(&r.id));
        if shard.replicas.len() != before {
            changed = true;
        }
        let kept: Vec<String> = shard.replicas.iter().map(|r| r.id.clone()).collect();
        if let Some(ctl) = state.shards.iter_mut().find(|c| c.shard == shard.id) {
            ctl.in_sync.retain(|id| kept.contains(id));
            ctl.pending_in_sync.retain(|id| kept.contains(id));
            ctl.replicas.retain(|r| kept.contains(&r.id));
        }
    }
    if changed {
        state.topology.version += 1;
    }
    changed
}

#[cfg(test)]
mod tests {
    use super::*;
    use dataplane::control::{ClusterSpec, initial_state};
    use dataplane::wire::AckMode;

    fn state(shards: u32, replicas: u32) -> ControlState {
        initial_state(&ClusterSpec {
            shards,
            replicas_per_shard: replicas,
            min_in_sync: 1,
            mode: AckMode::Sync,
            lease_ms: 5000,
            failover_grace_ms: 1000,
            in_sync_timeout_ms: 3000,
            catch_up_lag: 64,
        })
    }

    fn ids(state: &ControlState, shard: usize) -> Vec<String> {
        state.topology.shards[shard]
            .replicas
            .iter()
            .map(|r| r.id.clone())
            .collect()
    }

    #[test]
    fn ordinals_parse_from_replica_ids() {
        assert_eq!(ordinal("s0-r2"), Some(2));
        assert_eq!(ordinal("s12-r10"), Some(10));
        assert_eq!(ordinal("nonsense"), None);
    }

    #[test]
    fn scale_up_adds_unassigned_replicas_and_bumps_the_version() {
        let mut s = state(2, 1);
        let version = s.topology.version;
        assert!(resize(&mut s, &[3, 3]));
        assert_eq!(ids(&s, 1), ["s1-r0", "s1-r1", "s1-r2"]);
        assert_eq!(s.topology.version, version + 1);
        assert!(
            !resize(&mut s, &[3, 3]),
            "resizing to the same size changes nothing"
        );
    }

    #[test]
    fn scale_down_removes_followers_and_their_in_sync_membership() {
        let mut s = state(1, 3);
        s.topology.shards[0].leader = Some("s0-r0".into());
        s.shards[0].in_sync = vec!["s0-r0".into(), "s0-r1".into(), "s0-r2".into()];
        let sizes = statefulset_sizes(&holds(&s, 1, 2, 2), 2);
        assert_eq!(sizes, [2]);
        assert!(resize(&mut s, &sizes));
        assert_eq!(ids(&s, 0), ["s0-r0", "s0-r1"]);
        assert_eq!(s.shards[0].in_sync, ["s0-r0", "s0-r1"]);
    }

    #[test]
    fn scale_down_never_removes_a_leader() {
        let mut s = state(2, 3);
        s.topology.shards[0].leader = Some("s0-r2".into());
        s.topology.shards[1].leader = Some("s1-r0".into());
        let sizes = statefulset_sizes(&holds(&s, 2, 1, 1), 1);
        assert_eq!(sizes, [3, 1], "shard 0 keeps its leader's ordinal");
        assert_eq!(hold(&s, 0, 1, 1), Some((3, Hold::Leader)));
        resize(&mut s, &sizes);
        assert!(ids(&s, 0).contains(&"s0-r2".to_string()));
        assert_eq!(ids(&s, 1), ["s1-r0"]);
        // Even if asked directly for fewer, the leader stays in the topology.
        resize(&mut s, &[1, 1]);
        assert_eq!(ids(&s, 0), ["s0-r0", "s0-r2"]);
    }

    #[test]
    fn scale_down_keeps_the_in_sync_replicas_min_in_sync_needs() {
        // 4 replicas, minInSync 2, down to 2: r1 is still catching up, r2 and r3 are in
        // sync. Removing r2 and r3 would leave the leader alone in the set.
        let mut s = state(1, 4);
        s.topology.shards[0].leader = Some("s0-r0".into());
        s.shards[0].in_sync = vec!["s0-r0".into(), "s0-r2".into(), "s0-r3".into()];
        assert_eq!(hold(&s, 0, 2, 2), Some((3, Hold::InSync(2))));
        assert_eq!(statefulset_sizes(&holds(&s, 1, 2, 2), 2), [3]);
        resize(&mut s, &[3]);
        assert_eq!(s.shards[0].in_sync, ["s0-r0", "s0-r2"], "still two in sync");
        // Once r1 has caught up, the shard goes down to the size asked.
        s.shards[0].in_sync.push("s0-r1".into());
        assert_eq!(hold(&s, 0, 2, 2), None);
        assert_eq!(statefulset_sizes(&holds(&s, 1, 2, 2), 2), [2]);
        // minInSync 1 asks only for the leader, which is always kept.
        s.shards[0].in_sync = vec!["s0-r0".into(), "s0-r3".into()];
        assert_eq!(hold(&s, 0, 2, 1), None);
    }

    #[test]
    fn a_set_already_below_min_in_sync_is_only_kept_from_shrinking() {
        let mut s = state(1, 3);
        s.topology.shards[0].leader = Some("s0-r0".into());
        s.shards[0].in_sync = vec!["s0-r0".into(), "s0-r2".into()];
        // minInSync 3 cannot be met by 2 members: keep both of them, no more.
        assert_eq!(hold(&s, 0, 1, 3), Some((3, Hold::InSync(2))));
        s.shards[0].in_sync = vec!["s0-r0".into()];
        assert_eq!(hold(&s, 0, 1, 3), None);
    }

    #[test]
    fn the_larger_of_both_holds_wins() {
        let mut s = state(1, 4);
        // The leader on r1 alone would keep 2 pods; its in-sync partner r3 needs 4.
        s.topology.shards[0].leader = Some("s0-r1".into());
        s.shards[0].in_sync = vec!["s0-r1".into(), "s0-r3".into()];
        assert_eq!(hold(&s, 0, 1, 2), Some((4, Hold::InSync(2))));
        assert_eq!(hold(&s, 0, 1, 1), Some((2, Hold::Leader)));
        // On the same pod count, the leader is the reason given.
        s.shards[0].in_sync = vec!["s0-r0".into(), "s0-r1".into()];
        assert_eq!(hold(&s, 0, 1, 2), Some((2, Hold::Leader)));
    }
}
