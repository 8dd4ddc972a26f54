//! Changing `replicasPerShard`: how many pods each StatefulSet keeps, and the matching
//! change to the control state's replica lists.
//!
//! A StatefulSet always removes its highest ordinals, so scaling down must not cut below a
//! shard's leader: that shard keeps `leader ordinal + 1` pods until leadership moves to a
//! lower ordinal (a failover). Followers are removed; a leader never is.

use dataplane::control::{ControlState, parse_replica_id, replica_id};
use dataplane::topology::{ReplicaInfo, Role};

/// Ordinal of a replica id `s{shard}-r{ordinal}`.
pub fn ordinal(replica: &str) -> Option<u32> {
    parse_replica_id(replica).map(|(_, ordinal)| ordinal)
}

/// StatefulSet size per shard: `desired`, or more while the shard's leader sits on an
/// ordinal at or above it.
pub fn statefulset_sizes(state: &ControlState, shards: u32, desired: u32) -> Vec<u32> {
    (0..shards)
        .map(|shard| {
            let leader = state
                .topology
                .shards
                .iter()
                .find(|s| s.id == shard)
                .and_then(|s| s.leader.as_deref())
                .and_then(ordinal);
            match leader {
                Some(ord) if ord >= desired => ord + 1,
                _ => desired,
            }
        })
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
        let sizes = statefulset_sizes(&s, 1, 2);
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
        let sizes = statefulset_sizes(&s, 2, 1);
        assert_eq!(sizes, [3, 1], "shard 0 keeps its leader's ordinal");
        resize(&mut s, &sizes);
        assert!(ids(&s, 0).contains(&"s0-r2".to_string()));
        assert_eq!(ids(&s, 1), ["s1-r0"]);
        // Even if asked directly for fewer, the leader stays in the topology.
        resize(&mut s, &[1, 1]);
        assert_eq!(ids(&s, 0), ["s0-r0", "s0-r2"]);
    }
}
