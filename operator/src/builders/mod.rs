//! Pure functions from a `KvCluster` to the Kubernetes objects that run it, one per kind.
//!
//! Nothing here talks to the API server: reconcile applies what these return, `render`
//! prints it, and the unit tests read it.

mod pdb;
mod router;
mod service;
mod statefulset;

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    Affinity, Capabilities, PodAffinityTerm, PodAntiAffinity, PodSecurityContext,
    ResourceRequirements, SeccompProfile, SecurityContext, WeightedPodAffinityTerm,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta, OwnerReference};
use kube::Resource;

use crate::crd::{AntiAffinity, KvCluster, KvClusterSpec};

pub use pdb::{router_pdb, shard_pdb};
pub use router::router_deployment;
pub use service::{router_service, shard_service};
pub use statefulset::shard_statefulset;

/// Port of every node's HTTP listener (client API, `/internal/*`, probes, metrics).
pub const NODE_PORT: i32 = 7000;
/// Router's public port inside the pod.
pub const ROUTER_PORT: i32 = 8080;
/// Router's admin port, where the operator pushes the topology.
pub const ROUTER_ADMIN_PORT: i32 = 8081;
/// Uid, group and fsGroup of the distkv user in the image.
pub const RUN_AS_USER: i64 = 10001;
/// Label holding a node pod's shard number.
pub const SHARD_LABEL: &str = "distkv.io/shard";
/// Label values of `app.kubernetes.io/component`.
pub const COMPONENT_NODE: &str = "node";
/// Router component label value.
pub const COMPONENT_ROUTER: &str = "router";
/// Uid used in owner references when rendering a KvCluster that does not exist yet.
pub const PLACEHOLDER_UID: &str = "00000000-0000-0000-0000-000000000000";

/// Why objects could not be built.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// The KvCluster has no `metadata.name`.
    #[error("KvCluster has no metadata.name")]
    MissingName,
}

/// Everything builders need to know about the cluster they build for.
#[derive(Debug, Clone)]
pub struct ClusterRef<'a> {
    /// `metadata.name` of the KvCluster.
    pub name: &'a str,
    /// Namespace every object goes into.
    pub namespace: &'a str,
    /// The spec the objects follow.
    pub spec: &'a KvClusterSpec,
    /// Controller reference to the KvCluster, so deleting it deletes everything.
    pub owner: OwnerReference,
}

impl<'a> ClusterRef<'a> {
    /// Takes name, namespace and owner reference from the resource; `default_namespace`
    /// applies when the manifest names none (as with `render -f`).
    pub fn new(kvc: &'a KvCluster, default_namespace: &'a str) -> Result<Self, BuildError> {
        let name = kvc
            .metadata
            .name
            .as_deref()
            .ok_or(BuildError::MissingName)?;
        let namespace = kvc
            .metadata
            .namespace
            .as_deref()
            .unwrap_or(default_namespace);
        let owner = OwnerReference {
            api_version: KvCluster::api_version(&()).into_owned(),
            kind: KvCluster::kind(&()).into_owned(),
            name: name.to_string(),
            uid: kvc
                .metadata
                .uid
                .clone()
                .unwrap_or_else(|| PLACEHOLDER_UID.to_string()),
            controller: Some(true),
            block_owner_deletion: Some(true),
        };
        Ok(ClusterRef {
            name,
            namespace,
            spec: &kvc.spec,
            owner,
        })
    }

    /// Name of shard `shard`'s StatefulSet, headless Service and PDB.
    pub fn shard_name(&self, shard: u32) -> String {
        shard_object_name(self.name, shard)
    }

    /// Name of the router Deployment and Service.
    pub fn router_name(&self) -> String {
        format!("{}-router", self.name)
    }

    /// Labels that select this cluster's pods of one component (stable: used in selectors).
    pub fn selector_labels(&self, component: &str) -> BTreeMap<String, String> {
        BTreeMap::from([
            ("app.kubernetes.io/name".into(), "distkv".into()),
            ("app.kubernetes.io/instance".into(), self.name.into()),
            ("app.kubernetes.io/component".into(), component.into()),
        ])
    }

    /// Selector labels of one shard's node pods.
    pub fn shard_selector_labels(&self, shard: u32) -> BTreeMap<String, String> {
        let mut labels = self.selector_labels(COMPONENT_NODE);
        labels.insert(SHARD_LABEL.into(), shard.to_string());
        labels
    }

    /// The selector labels plus the recommended labels that never change for the life of
    /// an object; the only ones a StatefulSet's volumeClaimTemplates may carry, since the
    /// API server refuses any later change to those.
    pub fn stable_labels(&self, selector: &BTreeMap<String, String>) -> BTreeMap<String, String> {
        let mut labels = selector.clone();
        labels.insert("app.kubernetes.io/part-of".into(), "distkv".into());
        labels.insert(
            "app.kubernetes.io/managed-by".into(),
            "distkv-operator".into(),
        );
        labels
    }

    /// Every label an object carries: the stable labels plus the version of its image.
    pub fn labels(&self, selector: &BTreeMap<String, String>) -> BTreeMap<String, String> {
        let mut labels = self.stable_labels(selector);
        if let Some(tag) = image_tag(&self.spec.image) {
            labels.insert("app.kubernetes.io/version".into(), tag);
        }
        labels
    }

    /// Metadata of a top-level object: name, namespace, labels, owner reference.
    pub fn metadata(&self, name: String, selector: &BTreeMap<String, String>) -> ObjectMeta {
        ObjectMeta {
            name: Some(name),
            namespace: Some(self.namespace.to_string()),
            labels: Some(self.labels(selector)),
            owner_references: Some(vec![self.owner.clone()]),
            ..ObjectMeta::default()
        }
    }

    /// Metadata of a pod template: the user's labels and annotations, ours winning.
    pub fn pod_metadata(&self, selector: &BTreeMap<String, String>) -> ObjectMeta {
        let mut labels = self.spec.pod.labels.clone();
        labels.extend(self.labels(selector));
        ObjectMeta {
            labels: Some(labels),
            annotations: non_empty(self.spec.pod.annotations.clone()),
            ..ObjectMeta::default()
        }
    }

    /// Image pull policy for every container.
    pub fn pull_policy(&self) -> Option<String> {
        self.spec.image_pull_policy.map(|p| p.as_str().to_string())
    }
}

/// Name of shard `shard`'s objects for the cluster called `cluster`.
pub fn shard_object_name(cluster: &str, shard: u32) -> String {
    format!("{cluster}-s{shard}")
}

/// The tag of an image reference (`repo:tag`), if it has one that is a valid label value.
fn image_tag(image: &str) -> Option<String> {
    let last = image.rsplit('/').next()?;
    let last = last.split('@').next()?;
    let (_, tag) = last.split_once(':')?;
    let valid = !tag.is_empty()
        && tag.len() <= 63
        && tag
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    valid.then(|| tag.to_string())
}

fn non_empty(map: BTreeMap<String, String>) -> Option<BTreeMap<String, String>> {
    (!map.is_empty()).then_some(map)
}

/// `--max-key-bytes` / `--max-value-bytes` for nodes and routers, from `spec.limits`.
pub fn limit_args(spec: &KvClusterSpec) -> Vec<String> {
    let mut args = Vec::new();
    if let Some(limits) = &spec.limits {
        if let Some(max) = limits.max_key_bytes {
            args.extend(["--max-key-bytes".to_string(), max.to_string()]);
        }
        if let Some(max) = limits.max_value_bytes {
            args.extend(["--max-value-bytes".to_string(), max.to_string()]);
        }
    }
    args
}

/// Label selector matching exactly `labels`.
pub fn selector(labels: &BTreeMap<String, String>) -> LabelSelector {
    LabelSelector {
        match_labels: Some(labels.clone()),
        ..LabelSelector::default()
    }
}

/// Pod-level hardening shared by nodes and routers: non-root, fixed uid, default seccomp.
pub fn pod_security_context() -> PodSecurityContext {
    PodSecurityContext {
        run_as_non_root: Some(true),
        run_as_user: Some(RUN_AS_USER),
        run_as_group: Some(RUN_AS_USER),
        fs_group: Some(RUN_AS_USER),
        // Volumes are chowned only when their root is wrong, not on every start.
        fs_group_change_policy: Some("OnRootMismatch".into()),
        seccomp_profile: Some(SeccompProfile {
            type_: "RuntimeDefault".into(),
            ..SeccompProfile::default()
        }),
        ..PodSecurityContext::default()
    }
}

/// Container-level hardening: read-only root filesystem, no privilege escalation, no capabilities.
pub fn container_security_context() -> SecurityContext {
    SecurityContext {
        allow_privilege_escalation: Some(false),
        read_only_root_filesystem: Some(true),
        run_as_non_root: Some(true),
        privileged: Some(false),
        capabilities: Some(Capabilities {
            drop: Some(vec!["ALL".into()]),
            ..Capabilities::default()
        }),
        ..SecurityContext::default()
    }
}

/// Resources used when the spec gives none: enough to start, a memory cap so one
/// replica cannot starve a node.
pub fn default_resources(
    cpu: &str,
    memory_request: &str,
    memory_limit: &str,
) -> ResourceRequirements {
    ResourceRequirements {
        requests: Some(BTreeMap::from([
            ("cpu".into(), Quantity(cpu.into())),
            ("memory".into(), Quantity(memory_request.into())),
        ])),
        limits: Some(BTreeMap::from([(
            "memory".into(),
            Quantity(memory_limit.into()),
        )])),
        ..ResourceRequirements::default()
    }
}

/// Anti-affinity spreading pods that match `labels` over Kubernetes nodes.
pub fn anti_affinity(mode: AntiAffinity, labels: &BTreeMap<String, String>) -> Option<Affinity> {
    let term = PodAffinityTerm {
        label_selector: Some(selector(labels)),
        topology_key: "kubernetes.io/hostname".into(),
        ..PodAffinityTerm::default()
    };
    let pod_anti_affinity = match mode {
        AntiAffinity::None => return None,
        AntiAffinity::Preferred => PodAntiAffinity {
            preferred_during_scheduling_ignored_during_execution: Some(vec![
                WeightedPodAffinityTerm {
                    weight: 100,
                    pod_affinity_term: term,
                },
            ]),
            ..PodAntiAffinity::default()
        },
        AntiAffinity::Required => PodAntiAffinity {
            required_during_scheduling_ignored_during_execution: Some(vec![term]),
            ..PodAntiAffinity::default()
        },
    };
    Some(Affinity {
        pod_anti_affinity: Some(pod_anti_affinity),
        ..Affinity::default()
    })
}

/// Every object of one cluster, in the order they are applied.
#[derive(Debug, Clone)]
pub struct ClusterObjects {
    /// Per shard: headless Service, StatefulSet, PodDisruptionBudget.
    pub shards: Vec<ShardObjects>,
    /// The router Deployment.
    pub router_deployment: k8s_openapi::api::apps::v1::Deployment,
    /// The router Service.
    pub router_service: k8s_openapi::api::core::v1::Service,
    /// At most one router voluntarily down at a time.
    pub router_pdb: k8s_openapi::api::policy::v1::PodDisruptionBudget,
}

/// The objects of one shard.
#[derive(Debug, Clone)]
pub struct ShardObjects {
    /// Headless Service giving each replica a stable DNS name.
    pub service: k8s_openapi::api::core::v1::Service,
    /// The replicas.
    pub statefulset: k8s_openapi::api::apps::v1::StatefulSet,
    /// At most one replica voluntarily down at a time.
    pub pdb: k8s_openapi::api::policy::v1::PodDisruptionBudget,
}

/// Builds every object for `cluster`; `replicas(shard)` is the StatefulSet size, which
/// reconcile may hold above the spec while a leader still sits on an ordinal being removed.
pub fn build_all(cluster: &ClusterRef<'_>, replicas: impl Fn(u32) -> i32) -> ClusterObjects {
    let shards = (0..cluster.spec.shards)
        .map(|shard| ShardObjects {
            service: shard_service(cluster, shard),
            statefulset: shard_statefulset(cluster, shard, replicas(shard)),
            pdb: shard_pdb(cluster, shard),
        })
        .collect();
    ClusterObjects {
        shards,
        router_deployment: router_deployment(cluster),
        router_service: router_service(cluster),
        router_pdb: router_pdb(cluster),
    }
}

#[cfg(test)]
pub(crate) mod test_support {
    use crate::crd::KvCluster;

    /// A KvCluster as a user would write it, with a uid as the API server would add.
    pub fn cluster(spec_yaml: &str) -> KvCluster {
        let mut kvc: KvCluster = serde_yaml::from_str(&format!(
            "apiVersion: distkv.io/v1alpha1\nkind: KvCluster\nmetadata: {{name: demo, namespace: kv}}\nspec:\n{spec_yaml}"
        ))
        .unwrap();
        kvc.metadata.uid = Some("1234-uid".into());
        kvc
    }
}

#[cfg(test)]
mod tests {
    use super::test_support::cluster;
    use super::*;

    #[test]
    fn labels_follow_the_recommended_set() {
        let kvc = cluster("  shards: 1\n  replicasPerShard: 1\n  image: reg.io/distkv:1.2.3\n");
        let c = ClusterRef::new(&kvc, "default").unwrap();
        let labels = c.labels(&c.shard_selector_labels(0));
        assert_eq!(labels["app.kubernetes.io/name"], "distkv");
        assert_eq!(labels["app.kubernetes.io/instance"], "demo");
        assert_eq!(labels["app.kubernetes.io/component"], "node");
        assert_eq!(labels["app.kubernetes.io/managed-by"], "distkv-operator");
        assert_eq!(labels["app.kubernetes.io/version"], "1.2.3");
        assert_eq!(labels[SHARD_LABEL], "0");
    }

    #[test]
    fn owner_reference_is_a_controller_reference_to_the_cluster() {
        let kvc = cluster("  shards: 1\n  replicasPerShard: 1\n");
        let c = ClusterRef::new(&kvc, "default").unwrap();
        assert_eq!(c.namespace, "kv");
        assert_eq!(c.owner.kind, "KvCluster");
        assert_eq!(c.owner.api_version, "distkv.io/v1alpha1");
        assert_eq!(c.owner.uid, "1234-uid");
        assert_eq!(c.owner.controller, Some(true));
    }

    #[test]
    fn image_tags_become_version_labels_only_when_valid() {
        assert_eq!(image_tag("distkv:dev"), Some("dev".into()));
        assert_eq!(image_tag("localhost:5000/distkv"), None);
        assert_eq!(image_tag("localhost:5000/distkv:v1"), Some("v1".into()));
        assert_eq!(image_tag("distkv@sha256:abc"), None);
    }

    #[test]
    fn build_all_makes_three_objects_per_shard_and_three_for_routers() {
        let kvc = cluster("  shards: 3\n  replicasPerShard: 2\n");
        let c = ClusterRef::new(&kvc, "default").unwrap();
        let objects = build_all(&c, |_| 2);
        assert_eq!(objects.shards.len(), 3);
        let names: Vec<_> = objects
            .shards
            .iter()
            .map(|s| s.statefulset.metadata.name.clone().unwrap())
            .collect();
        assert_eq!(names, ["demo-s0", "demo-s1", "demo-s2"]);
        for shard in &objects.shards {
            for owners in [
                &shard.service.metadata.owner_references,
                &shard.statefulset.metadata.owner_references,
                &shard.pdb.metadata.owner_references,
            ] {
                assert_eq!(owners.as_ref().unwrap()[0].uid, "1234-uid");
            }
        }
        assert_eq!(
            objects.router_deployment.metadata.name.as_deref(),
            Some("demo-router")
        );
        assert_eq!(
            objects.router_pdb.metadata.name.as_deref(),
            Some("demo-router")
        );
    }
}
