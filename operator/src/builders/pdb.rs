//! One PodDisruptionBudget per shard, and one for the routers.

use std::collections::BTreeMap;

use k8s_openapi::api::policy::v1::{PodDisruptionBudget, PodDisruptionBudgetSpec};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::{COMPONENT_ROUTER, ClusterRef, selector};

/// Lets voluntary disruptions (drains, upgrades) take at most one replica of a shard at a
/// time, so a shard never loses its leader and a follower together. A one-replica shard
/// can still be drained: blocking node maintenance forever would be worse than the
/// short outage its owner chose.
pub fn shard_pdb(cluster: &ClusterRef<'_>, shard: u32) -> PodDisruptionBudget {
    one_at_a_time(
        cluster,
        cluster.shard_name(shard),
        cluster.shard_selector_labels(shard),
    )
}

/// Lets voluntary disruptions take at most one router at a time, so a drain of several
/// Kubernetes nodes cannot take every router of a cluster down together.
pub fn router_pdb(cluster: &ClusterRef<'_>) -> PodDisruptionBudget {
    let labels = cluster.selector_labels(COMPONENT_ROUTER);
    one_at_a_time(cluster, cluster.router_name(), labels)
}

/// A budget named `name` that lets one of the pods `selector_labels` select go at a time.
fn one_at_a_time(
    cluster: &ClusterRef<'_>,
    name: String,
    selector_labels: BTreeMap<String, String>,
) -> PodDisruptionBudget {
    PodDisruptionBudget {
        metadata: cluster.metadata(name, &selector_labels),
        spec: Some(PodDisruptionBudgetSpec {
            max_unavailable: Some(IntOrString::Int(1)),
            selector: Some(selector(&selector_labels)),
            // Evicting a pod that is not running or not ready costs no availability.
            unhealthy_pod_eviction_policy: Some("AlwaysAllow".into()),
            ..PodDisruptionBudgetSpec::default()
        }),
        status: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::builders::test_support::cluster;

    #[test]
    fn allows_one_replica_of_the_shard_down() {
        let kvc = cluster("  shards: 2\n  replicasPerShard: 3\n");
        let c = ClusterRef::new(&kvc, "default").unwrap();
        let pdb = shard_pdb(&c, 1);
        assert_eq!(pdb.metadata.name.as_deref(), Some("demo-s1"));
        let spec = pdb.spec.unwrap();
        assert_eq!(spec.max_unavailable, Some(IntOrString::Int(1)));
        assert!(spec.min_available.is_none());
        let labels = spec.selector.unwrap().match_labels.unwrap();
        assert_eq!(labels["distkv.io/shard"], "1");
        assert_eq!(labels["app.kubernetes.io/instance"], "demo");
    }

    #[test]
    fn allows_one_router_down() {
        let kvc = cluster("  shards: 2\n  replicasPerShard: 3\n  router: {replicas: 3}\n");
        let c = ClusterRef::new(&kvc, "default").unwrap();
        let pdb = router_pdb(&c);
        assert_eq!(pdb.metadata.name.as_deref(), Some("demo-router"));
        assert_eq!(pdb.metadata.namespace.as_deref(), Some("kv"));
        assert_eq!(
            pdb.metadata.owner_references.as_ref().unwrap()[0].uid,
            "1234-uid"
        );
        let spec = pdb.spec.unwrap();
        assert_eq!(spec.max_unavailable, Some(IntOrString::Int(1)));
        assert!(spec.min_available.is_none());
        let labels = spec.selector.unwrap().match_labels.unwrap();
        let deployment = crate::builders::router_deployment(&c);
        assert_eq!(
            Some(&labels),
            deployment.spec.unwrap().selector.match_labels.as_ref(),
            "selects exactly the router pods"
        );
    }
}
