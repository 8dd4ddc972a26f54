//! The KvCluster status: a pure function of the spec, the control state and what was observed.

use std::collections::HashMap;

use dataplane::control::ControlState;
use dataplane::wire::NodeStatus;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

use crate::crd::{KvCluster, KvClusterStatus, ReplicaStatus, ShardStatus};
use crate::observe::NodePod;
use crate::scale::Hold;
use crate::validate::InvalidSpec;

/// Condition: every shard has a serving leader and at least one router is ready.
pub const AVAILABLE: &str = "Available";
/// Condition: the cluster is moving toward the spec (pods starting, scale held back).
pub const PROGRESSING: &str = "Progressing";
/// Condition: something needs attention (invalid spec, shard without leader, under-replicated).
pub const DEGRADED: &str = "Degraded";

/// Everything a status is computed from.
pub struct StatusInput<'a> {
    /// The resource as last read.
    pub kvc: &'a KvCluster,
    /// Why the spec is refused, if it is.
    pub invalid: Option<&'a InvalidSpec>,
    /// Control state after this round (`None` before a valid spec was ever seen).
    pub state: Option<&'a ControlState>,
    /// The cluster's node pods.
    pub nodes: &'a [NodePod],
    /// Replica statuses that answered this round, by replica id.
    pub statuses: &'a HashMap<String, NodeStatus>,
    /// Ready router pods.
    pub ready_routers: usize,
    /// Per shard, the size it keeps above the spec and why, while a scale-down waits.
    pub holds: &'a [Option<(u32, Hold)>],
    /// The persisted form of the control state.
    pub control: Option<serde_json::Value>,
}

/// The status to write; condition transition times carry over from `kvc.status` when a
/// condition's status did not change, so an unchanged cluster yields an identical status.
pub fn compute(input: &StatusInput<'_>, now: Time) -> KvClusterStatus {
    let spec = &input.kvc.spec;
    let old = input.kvc.status.clone().unwrap_or_default();
    let desired_total = spec.shards * spec.replicas_per_shard;

    let mut shards = Vec::new();
    let mut leaders = 0;
    let mut unavailable = Vec::new();
    let mut under_replicated = Vec::new();
    if let Some(state) = input.state {
        for (shard, ctl) in state.topology.shards.iter().zip(&state.shards) {
            let serving = shard.leader.is_some() && ctl.unavailable.is_none();
            if serving {
                leaders += 1;
            } else {
                let why = ctl
                    .unavailable
                    .map(|u| u.to_string())
                    .unwrap_or_else(|| "no leader yet".to_string());
                unavailable.push(format!("shard {}: {why}", shard.id));
            }
            if serving && (ctl.in_sync.len() as u32) < spec.replication.min_in_sync {
                under_replicated.push(format!(
                    "shard {}: {} of {} required in-sync replicas",
                    shard.id,
                    ctl.in_sync.len(),
                    spec.replication.min_in_sync
                ));
            }
            let replicas = shard
                .replicas
                .iter()
                .map(|r| {
                    let pod = input.nodes.iter().find(|n| n.replica == r.id);
                    let role = match input.statuses.get(&r.id) {
                        Some(s) => serde_json::to_value(s.role)
                            .ok()
                            .and_then(|v| v.as_str().map(str::to_string))
                            .unwrap_or_default(),
                        None => "unreachable".to_string(),
                    };
                    ReplicaStatus {
                        id: r.id.clone(),
                        role,
                        ready: pod.is_some_and(|p| p.ready),
                    }
                })
                .collect();
            shards.push(ShardStatus {
                id: shard.id,
                epoch: shard.epoch,
                leader: shard.leader.clone(),
                ready_replicas: input
                    .nodes
                    .iter()
                    .filter(|n| n.shard == shard.id && n.ready)
                    .count() as i32,
                in_sync: ctl.in_sync.clone(),
                replicas,
            });
        }
    }
    let shard_count = input
        .state
        .map_or(spec.shards, |s| s.topology.shards.len() as u32);
    let ready_nodes = input
        .nodes
        .iter()
        .filter(|n| n.ready && n.ordinal < spec.replicas_per_shard)
        .count() as u32;

    let available = input.state.is_some() && leaders == shard_count && input.ready_routers > 0;
    let available_cond = if available {
        cond(
            AVAILABLE,
            true,
            "AllShardsServing",
            format!(
                "{leaders}/{shard_count} shards have a serving leader; {} router(s) ready",
                input.ready_routers
            ),
        )
    } else if input.state.is_none() {
        cond(
            AVAILABLE,
            false,
            "NotStarted",
            "no valid spec has been applied yet".to_string(),
        )
    } else if leaders < shard_count {
        cond(
            AVAILABLE,
            false,
            "ShardsUnavailable",
            unavailable.join("; "),
        )
    } else {
        cond(
            AVAILABLE,
            false,
            "RoutersNotReady",
            "no router pod is ready".to_string(),
        )
    };

    let holds = || {
        input
            .holds
            .iter()
            .enumerate()
            .filter_map(|(shard, h)| h.map(|(size, why)| (shard, size, why)))
    };
    let held: Vec<String> = holds()
        .map(|(shard, size, why)| match why {
            Hold::Leader => format!(
                "shard {shard} keeps {size} replicas until its leader moves below ordinal {}",
                spec.replicas_per_shard
            ),
            Hold::InSync(needed) => format!(
                "shard {shard} keeps {size} replicas until {needed} of its first {} are in sync",
                spec.replicas_per_shard
            ),
        })
        .collect();
    let held_reason = if holds().any(|(_, _, why)| why == Hold::Leader) {
        "ScaleDownWaitingForLeader"
    } else {
        "ScaleDownWaitingForInSync"
    };
    let progressing_cond = if input.invalid.is_some() {
        cond(
            PROGRESSING,
            false,
            "SpecRefused",
            "the current spec is not applied".to_string(),
        )
    } else if !held.is_empty() {
        cond(PROGRESSING, true, held_reason, held.join("; "))
    } else if ready_nodes < desired_total || (input.ready_routers as i32) < spec.router.replicas {
        cond(
            PROGRESSING,
            true,
            "PodsStarting",
            format!(
                "{ready_nodes}/{desired_total} replicas and {}/{} routers ready",
                input.ready_routers, spec.router.replicas
            ),
        )
    } else {
        cond(
            PROGRESSING,
            false,
            "Reconciled",
            format!(
                "{desired_total} replicas and {} routers ready",
                spec.router.replicas
            ),
        )
    };

    let degraded_cond = if let Some(invalid) = input.invalid {
        cond(DEGRADED, true, invalid.reason, invalid.message.clone())
    } else if input.state.is_some() && leaders < shard_count {
        cond(DEGRADED, true, "ShardUnavailable", unavailable.join("; "))
    } else if !under_replicated.is_empty() {
        cond(
            DEGRADED,
            true,
            "UnderReplicated",
            under_replicated.join("; "),
        )
    } else {
        cond(
            DEGRADED,
            false,
            "AsExpected",
            "no problems detected".to_string(),
        )
    };

    let generation = input.kvc.metadata.generation;
    let conditions = [available_cond, progressing_cond, degraded_cond]
        .into_iter()
        .map(|mut c| {
            c.observed_generation = generation;
            let previous = old.conditions.iter().find(|o| o.type_ == c.type_);
            c.last_transition_time = match previous {
                Some(p) if p.status == c.status => p.last_transition_time.clone(),
                _ => now.clone(),
            };
            c
        })
        .collect();

    KvClusterStatus {
        observed_generation: generation,
        conditions,
        ready: Some(format!("{ready_nodes}/{desired_total}")),
        leaders: Some(format!("{leaders}/{shard_count}")),
        topology_version: input
            .state
            .map_or(old.topology_version, |s| s.topology.version),
        current_shards: input
            .state
            .map(|s| s.topology.shards.len() as u32)
            .or(old.current_shards),
        // Recorded once a valid spec was applied; kept while a spec is refused.
        current_storage: match (input.invalid, input.state) {
            (None, Some(_)) => Some(spec.storage.clone()),
            _ => old.current_storage,
        },
        shards: if input.state.is_some() {
            shards
        } else {
            old.shards
        },
        control: input.control.clone().or(old.control),
    }
}

fn cond(type_: &str, status: bool, reason: &str, message: String) -> Condition {
    Condition {
        type_: type_.to_string(),
        status: if status { "True" } else { "False" }.to_string(),
        reason: reason.to_string(),
        message,
        observed_generation: None,
        last_transition_time: Time(k8s_openapi::jiff::Timestamp::UNIX_EPOCH),
    }
}

/// The control state as stored in the status: the clock-dependent fields are cleared,
/// since a reader must `resume` them anyway, and keeping them would change the status
/// (and cost an API write) on every round.
pub fn persisted_control(state: &ControlState) -> serde_json::Value {
    let mut state = state.clone();
    for ctl in &mut state.shards {
        ctl.lease_granted_ms = 0;
        for r in &mut ctl.replicas {
            r.caught_up_since_ms = None;
            r.caught_up_rounds = 0;
            r.unreachable_since_ms = r.unreachable_since_ms.map(|_| 0);
        }
    }
    serde_json::to_value(state).expect("the control state always serializes")
}

/// Reads a persisted control state back; the caller must `resume` it onto its own clock
/// before deciding with it.
pub fn load_control(value: &serde_json::Value) -> Option<ControlState> {
    serde_json::from_value(value.clone()).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::builders::test_support::cluster;
    use dataplane::control::{ClusterSpec, initial_state};
    use dataplane::wire::AckMode;

    fn spec() -> ClusterSpec {
        ClusterSpec {
            shards: 2,
            replicas_per_shard: 2,
            min_in_sync: 2,
            mode: AckMode::Sync,
            lease_ms: 5000,
            failover_grace_ms: 1000,
            in_sync_timeout_ms: 3000,
            catch_up_lag: 64,
        }
    }

    fn t(secs: i64) -> Time {
        Time(k8s_openapi::jiff::Timestamp::from_second(secs).unwrap())
    }

    #[test]
    fn a_fresh_cluster_is_not_available_and_progressing() {
        let kvc = cluster("  shards: 2\n  replicasPerShard: 2\n");
        let state = initial_state(&spec());
        let statuses = HashMap::new();
        let status = compute(
            &StatusInput {
                kvc: &kvc,
                invalid: None,
                state: Some(&state),
                nodes: &[],
                statuses: &statuses,
                ready_routers: 0,
                holds: &[None, None],
                control: None,
            },
            t(100),
        );
        let get = |ty: &str| {
            status
                .conditions
                .iter()
                .find(|c| c.type_ == ty)
                .unwrap()
                .clone()
        };
        assert_eq!(get(AVAILABLE).status, "False");
        assert_eq!(get(AVAILABLE).reason, "ShardsUnavailable");
        assert_eq!(get(PROGRESSING).reason, "PodsStarting");
        assert_eq!(status.leaders.as_deref(), Some("0/2"));
        assert_eq!(status.ready.as_deref(), Some("0/4"));
        assert_eq!(status.current_shards, Some(2));
    }

    #[test]
    fn transition_times_survive_unchanged_conditions() {
        let mut kvc = cluster("  shards: 2\n  replicasPerShard: 2\n");
        let state = initial_state(&spec());
        let statuses = HashMap::new();
        fn input<'a>(
            kvc: &'a KvCluster,
            state: &'a ControlState,
            statuses: &'a HashMap<String, NodeStatus>,
        ) -> StatusInput<'a> {
            StatusInput {
                kvc,
                invalid: None,
                state: Some(state),
                nodes: &[],
                statuses,
                ready_routers: 0,
                holds: &[None, None],
                control: None,
            }
        }
        let first = compute(&input(&kvc, &state, &statuses), t(100));
        kvc.status = Some(first.clone());
        let second = compute(&input(&kvc, &state, &statuses), t(200));
        assert_eq!(
            first, second,
            "an unchanged cluster gives an identical status"
        );
    }

    #[test]
    fn an_invalid_spec_is_degraded_with_its_reason() {
        let kvc = cluster("  shards: 2\n  replicasPerShard: 2\n");
        let invalid = InvalidSpec {
            reason: "ReshardingUnsupported",
            message: "no".into(),
        };
        let statuses = HashMap::new();
        let status = compute(
            &StatusInput {
                kvc: &kvc,
                invalid: Some(&invalid),
                state: None,
                nodes: &[],
                statuses: &statuses,
                ready_routers: 0,
                holds: &[],
                control: None,
            },
            t(1),
        );
        let degraded = status
            .conditions
            .iter()
            .find(|c| c.type_ == DEGRADED)
            .unwrap();
        assert_eq!(
            (degraded.status.as_str(), degraded.reason.as_str()),
            ("True", "ReshardingUnsupported")
        );
    }

    #[test]
    fn persisted_control_round_trips_without_clock_fields() {
        let mut state = initial_state(&spec());
        state.shards[0].lease_granted_ms = 12345;
        let value = persisted_control(&state);
        assert_eq!(value["shards"][0]["leaseGrantedMs"], 0);
        let mut back = load_control(&value).unwrap();
        assert_eq!(back.topology, state.topology);
        back.resume(999);
        assert_eq!(
            back.shards[0].lease_granted_ms, 999,
            "resume treats the lease as granted now"
        );
    }
}
