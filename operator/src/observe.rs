//! What the operator sees of a cluster's pods, turned into the control core's observations.

use std::collections::HashMap;

use dataplane::control::{Observation, replica_id};
use dataplane::wire::NodeStatus;
use k8s_openapi::api::core::v1::Pod;

use crate::builders::{
    COMPONENT_NODE, COMPONENT_ROUTER, NODE_PORT, ROUTER_ADMIN_PORT, SHARD_LABEL,
};

/// One node pod as the operator sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodePod {
    /// Replica id, `s{shard}-r{ordinal}`.
    pub replica: String,
    /// Shard number from the pod's label.
    pub shard: u32,
    /// StatefulSet ordinal from the pod's name.
    pub ordinal: u32,
    /// Pod name.
    pub pod: String,
    /// Stable `host:port` of the node: its DNS name through the shard's headless Service.
    pub address: String,
    /// Whether the pod passes its readiness probe.
    pub ready: bool,
    /// `Some(false)` when Kubernetes reports the pod's process finished (phase Failed or
    /// Succeeded); `None` otherwise, since a pod object says nothing certain about a
    /// process that may still run (a force-deleted pod's container can outlive it).
    pub alive: Option<bool>,
    /// Whether the pod is being deleted.
    pub terminating: bool,
}

/// Node pods of cluster `cluster` among `pods`, sorted by replica id; pods whose labels or
/// name do not fit the StatefulSet pattern are ignored.
pub fn node_pods(cluster: &str, namespace: &str, pods: &[Pod]) -> Vec<NodePod> {
    let mut out: Vec<NodePod> = pods
        .iter()
        .filter(|p| component(p) == Some(COMPONENT_NODE))
        .filter_map(|p| {
            let labels = p.metadata.labels.as_ref()?;
            let shard: u32 = labels.get(SHARD_LABEL)?.parse().ok()?;
            let name = p.metadata.name.clone()?;
            let set = crate::builders::shard_object_name(cluster, shard);
            let ordinal: u32 = name.strip_prefix(&format!("{set}-"))?.parse().ok()?;
            let phase = p.status.as_ref().and_then(|s| s.phase.as_deref());
            Some(NodePod {
                replica: replica_id(shard, ordinal),
                shard,
                ordinal,
                address: format!("{name}.{set}.{namespace}.svc:{NODE_PORT}"),
                pod: name,
                ready: is_ready(p),
                alive: matches!(phase, Some("Failed") | Some("Succeeded")).then_some(false),
                terminating: p.metadata.deletion_timestamp.is_some(),
            })
        })
        .collect();
    out.sort_by_key(|n| (n.shard, n.ordinal));
    out
}

/// Admin addresses (`podIP:8081`) of the cluster's running router pods.
pub fn router_admin_addresses(pods: &[Pod]) -> Vec<String> {
    pods.iter()
        .filter(|p| component(p) == Some(COMPONENT_ROUTER))
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .filter(|p| p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running"))
        .filter_map(|p| p.status.as_ref()?.pod_ip.clone())
        .map(|ip| {
            if ip.contains(':') {
                format!("[{ip}]:{ROUTER_ADMIN_PORT}")
            } else {
                format!("{ip}:{ROUTER_ADMIN_PORT}")
            }
        })
        .collect()
}

/// Number of ready router pods.
pub fn ready_routers(pods: &[Pod]) -> usize {
    pods.iter()
        .filter(|p| component(p) == Some(COMPONENT_ROUTER) && is_ready(p))
        .count()
}

/// The control core's view: one observation per node pod, with its status when it answered.
pub fn observations(nodes: &[NodePod], statuses: &HashMap<String, NodeStatus>) -> Vec<Observation> {
    nodes
        .iter()
        .map(|n| Observation {
            replica: n.replica.clone(),
            shard: n.shard,
            address: Some(n.address.clone()),
            // A node that reports another id is not the replica we think it is.
            status: statuses
                .get(&n.replica)
                .filter(|s| s.id == n.replica)
                .cloned(),
            process_alive: n.alive,
        })
        .collect()
}

fn component(pod: &Pod) -> Option<&str> {
    pod.metadata
        .labels
        .as_ref()?
        .get("app.kubernetes.io/component")
        .map(String::as_str)
}

fn is_ready(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

#[cfg(test)]
pub(crate) mod test_pods {
    //! Pods as the API server would return them, for tests.
    use k8s_openapi::api::core::v1::Pod;

    /// A node pod of cluster `demo` in namespace `kv`.
    pub fn node(shard: u32, ordinal: u32, ready: bool, phase: &str) -> Pod {
        serde_json::from_value(serde_json::json!({
            "metadata": {
                "name": format!("demo-s{shard}-{ordinal}"),
                "namespace": "kv",
                "labels": {
                    "app.kubernetes.io/name": "distkv",
                    "app.kubernetes.io/instance": "demo",
                    "app.kubernetes.io/component": "node",
                    "distkv.io/shard": shard.to_string(),
                }
            },
            "status": {
                "phase": phase,
                "podIP": format!("10.0.{shard}.{ordinal}"),
                "conditions": [{"type": "Ready", "status": if ready { "True" } else { "False" }}]
            }
        }))
        .unwrap()
    }

    /// A router pod of cluster `demo`.
    pub fn router(index: u32, ready: bool) -> Pod {
        serde_json::from_value(serde_json::json!({
            "metadata": {
                "name": format!("demo-router-abc-{index}"),
                "namespace": "kv",
                "labels": {
                    "app.kubernetes.io/name": "distkv",
                    "app.kubernetes.io/instance": "demo",
                    "app.kubernetes.io/component": "router",
                }
            },
            "status": {
                "phase": "Running",
                "podIP": format!("10.1.0.{index}"),
                "conditions": [{"type": "Ready", "status": if ready { "True" } else { "False" }}]
            }
        }))
        .unwrap()
    }
}

#[cfg(test)]
mod tests {
    use super::test_pods::{node, router};
    use super::*;

    #[test]
    fn node_pods_get_replica_ids_and_stable_addresses() {
        let pods = vec![
            node(1, 0, true, "Running"),
            node(0, 2, false, "Running"),
            router(0, true),
        ];
        let nodes = node_pods("demo", "kv", &pods);
        assert_eq!(nodes.len(), 2);
        assert_eq!(nodes[0].replica, "s0-r2");
        assert_eq!(nodes[0].address, "demo-s0-2.demo-s0.kv.svc:7000");
        assert!(!nodes[0].ready);
        assert_eq!(nodes[1].replica, "s1-r0");
        assert!(nodes[1].ready);
        assert_eq!(nodes[1].alive, None);
    }

    #[test]
    fn only_a_finished_pod_counts_as_dead() {
        let nodes = node_pods(
            "demo",
            "kv",
            &[node(0, 0, false, "Failed"), node(0, 1, false, "Pending")],
        );
        assert_eq!(nodes[0].alive, Some(false));
        assert_eq!(nodes[1].alive, None);
    }

    #[test]
    fn pods_of_other_clusters_are_ignored() {
        // Same labels but a name from another StatefulSet (e.g. a cluster "demo-x").
        let mut pod = node(0, 0, true, "Running");
        pod.metadata.name = Some("other-s0-0".into());
        assert!(node_pods("demo", "kv", &[pod]).is_empty());
    }

    #[test]
    fn routers_are_addressed_on_their_admin_port() {
        let pods = vec![
            router(1, true),
            router(2, false),
            node(0, 0, true, "Running"),
        ];
        assert_eq!(
            router_admin_addresses(&pods),
            ["10.1.0.1:8081", "10.1.0.2:8081"]
        );
        assert_eq!(ready_routers(&pods), 1);
    }

    #[test]
    fn observations_carry_status_only_when_the_id_matches() {
        let nodes = node_pods(
            "demo",
            "kv",
            &[node(0, 0, true, "Running"), node(0, 1, true, "Running")],
        );
        let status = |id: &str| NodeStatus {
            role: dataplane::topology::Role::Follower,
            epoch: 1,
            last_epoch: 1,
            last_seq: 5,
            commit_seq: 5,
            ..NodeStatus::unassigned(id)
        };
        let statuses = HashMap::from([
            ("s0-r0".to_string(), status("s0-r0")),
            ("s0-r1".to_string(), status("s9-r9")),
        ]);
        let obs = observations(&nodes, &statuses);
        assert!(obs[0].status.is_some());
        assert!(
            obs[1].status.is_none(),
            "a node answering with another id is not trusted"
        );
        assert_eq!(
            obs[1].address.as_deref(),
            Some("demo-s0-1.demo-s0.kv.svc:7000")
        );
    }
}
