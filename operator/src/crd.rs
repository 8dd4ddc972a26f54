//! The `KvCluster` custom resource (`distkv.io/v1alpha1`, short name `kvc`).
//!
//! The schema carries the validation the API server can do by itself (ranges, enums, CEL
//! rules); `validate` in this crate repeats it for `render` and adds the checks that need
//! the previous state (such as refusing a change of `shards`).

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{ResourceRequirements, Toleration};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{CustomResource, CustomResourceExt, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// API group of every distkv resource.
pub const GROUP: &str = "distkv.io";
/// Default data plane image when the spec names none.
pub const DEFAULT_IMAGE: &str = "distkv:dev";

/// Desired state of a distkv cluster: shards, replicas, image, storage, replication, router.
// Each printcolumn(...) repeats `type_ = ..`; clippy reads them as one duplicated attribute.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "distkv.io",
    version = "v1alpha1",
    kind = "KvCluster",
    plural = "kvclusters",
    shortname = "kvc",
    category = "distkv",
    namespaced,
    status = "KvClusterStatus",
    derive = "PartialEq",
    doc = "A sharded, replicated distkv key-value cluster managed by distkv-operator.",
    printcolumn(name = "Shards", type_ = "integer", json_path = ".spec.shards"),
    printcolumn(
        name = "Replicas",
        type_ = "integer",
        json_path = ".spec.replicasPerShard"
    ),
    printcolumn(name = "Ready", type_ = "string", json_path = ".status.ready"),
    printcolumn(name = "Leaders", type_ = "string", json_path = ".status.leaders"),
    printcolumn(name = "Mode", type_ = "string", json_path = ".spec.replication.mode"),
    printcolumn(
        name = "Available",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Available\")].status"
    ),
    printcolumn(
        name = "Degraded",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Degraded\")].reason",
        priority = 1
    ),
    printcolumn(
        name = "Topology",
        type_ = "integer",
        json_path = ".status.topologyVersion",
        priority = 1
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[x_kube(validation = Rule::new("self.replication.minInSync <= self.replicasPerShard").message("replication.minInSync must not exceed replicasPerShard"))]
#[serde(rename_all = "camelCase")]
pub struct KvClusterSpec {
    /// Number of shards. Fixed once the cluster exists: resharding is not supported yet.
    #[schemars(range(min = 1, max = 128))]
    pub shards: u32,
    /// Replicas per shard, leader included.
    #[schemars(range(min = 1, max = 9))]
    pub replicas_per_shard: u32,
    /// Container image holding the `distkv` binary.
    #[serde(default = "default_image")]
    #[schemars(length(min = 1))]
    pub image: String,
    /// Image pull policy for node and router pods.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_pull_policy: Option<PullPolicy>,
    /// CPU and memory for each node container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
    /// Persistent volume for each replica.
    #[serde(default)]
    pub storage: StorageSpec,
    /// How writes are replicated within a shard.
    #[serde(default)]
    pub replication: ReplicationSpec,
    /// The stateless routers that clients talk to.
    #[serde(default)]
    pub router: RouterSpec,
    /// Size limits the nodes enforce before storing anything.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limits: Option<LimitsSpec>,
    /// Extra settings for every node and router pod.
    #[serde(default)]
    pub pod: PodOverrides,
}

fn default_image() -> String {
    DEFAULT_IMAGE.to_string()
}

/// Kubernetes image pull policy.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum PullPolicy {
    /// Pull on every start.
    Always,
    /// Pull when the node lacks the image.
    IfNotPresent,
    /// Never pull (images loaded with `kind load`).
    Never,
}

impl PullPolicy {
    /// The string Kubernetes expects.
    pub fn as_str(self) -> &'static str {
        match self {
            PullPolicy::Always => "Always",
            PullPolicy::IfNotPresent => "IfNotPresent",
            PullPolicy::Never => "Never",
        }
    }
}

/// Persistent storage of one replica.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct StorageSpec {
    /// Requested size of each replica's volume, e.g. `1Gi`.
    #[serde(default = "default_storage_size")]
    pub size: Quantity,
    /// Storage class; the cluster default when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage_class_name: Option<String>,
}

fn default_storage_size() -> Quantity {
    Quantity("1Gi".to_string())
}

impl Default for StorageSpec {
    fn default() -> Self {
        StorageSpec {
            size: default_storage_size(),
            storage_class_name: None,
        }
    }
}

/// Acknowledgement mode of client writes.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum ReplicationMode {
    /// Answer once every in-sync replica has the write durably.
    #[default]
    Sync,
    /// Answer after the leader's own fsync; a failover may lose the newest writes.
    Async,
}

impl From<ReplicationMode> for dataplane::wire::AckMode {
    fn from(mode: ReplicationMode) -> Self {
        match mode {
            ReplicationMode::Sync => dataplane::wire::AckMode::Sync,
            ReplicationMode::Async => dataplane::wire::AckMode::Async,
        }
    }
}

/// Replication within a shard.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ReplicationSpec {
    /// `sync` (default) or `async`.
    #[serde(default)]
    pub mode: ReplicationMode,
    /// Fewest in-sync replicas (leader included) with which a leader still takes writes.
    #[serde(default = "default_min_in_sync")]
    #[schemars(range(min = 1, max = 9))]
    pub min_in_sync: u32,
    /// Leader lease; a leader that is not renewed for this long stops serving.
    #[serde(default = "default_lease_ms")]
    #[schemars(range(min = 1000, max = 60000))]
    pub lease_ms: u64,
    /// Extra wait after a lease could have expired before a new leader is promoted.
    #[serde(default = "default_failover_grace_ms")]
    #[schemars(range(min = 0, max = 60000))]
    pub failover_grace_ms: u64,
    /// Newest log entries a leader keeps for followers that come back. A restarted
    /// follower that missed more is rebuilt from a full snapshot of its shard instead, so
    /// raise it until a pod restart's worth of writes fits (each entry holds its value and
    /// the one it replaced).
    #[serde(default = "default_log_retain")]
    #[schemars(range(min = 0, max = 1_000_000_000))]
    pub log_retain: u64,
}

fn default_min_in_sync() -> u32 {
    1
}
fn default_lease_ms() -> u64 {
    5000
}
fn default_failover_grace_ms() -> u64 {
    1000
}
fn default_log_retain() -> u64 {
    dataplane::node::DEFAULT_LOG_RETAIN
}

impl Default for ReplicationSpec {
    fn default() -> Self {
        ReplicationSpec {
            mode: ReplicationMode::Sync,
            min_in_sync: default_min_in_sync(),
            lease_ms: default_lease_ms(),
            failover_grace_ms: default_failover_grace_ms(),
            log_retain: default_log_retain(),
        }
    }
}

/// Kubernetes Service type of the router Service.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum ServiceType {
    /// Reachable inside the cluster only.
    #[default]
    ClusterIP,
    /// Also on a port of every node (used by the kind port mapping).
    NodePort,
    /// Through the cloud's load balancer.
    LoadBalancer,
}

impl ServiceType {
    /// The string Kubernetes expects.
    pub fn as_str(self) -> &'static str {
        match self {
            ServiceType::ClusterIP => "ClusterIP",
            ServiceType::NodePort => "NodePort",
            ServiceType::LoadBalancer => "LoadBalancer",
        }
    }
}

/// The router Deployment and its Service.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("!has(self.nodePort) || self.serviceType != 'ClusterIP'").message("router.nodePort needs serviceType NodePort or LoadBalancer"))]
pub struct RouterSpec {
    /// Number of router pods.
    #[serde(default = "default_router_replicas")]
    #[schemars(range(min = 1, max = 64))]
    pub replicas: i32,
    /// Type of the router Service.
    #[serde(default)]
    pub service_type: ServiceType,
    /// Port of the router Service.
    #[serde(default = "default_router_port")]
    #[schemars(range(min = 1, max = 65535))]
    pub port: i32,
    /// Fixed node port (NodePort / LoadBalancer only), e.g. 30080 for the kind port mapping.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 30000, max = 32767))]
    pub node_port: Option<i32>,
    /// CPU and memory for each router container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
}

fn default_router_replicas() -> i32 {
    2
}
fn default_router_port() -> i32 {
    8080
}

impl Default for RouterSpec {
    fn default() -> Self {
        RouterSpec {
            replicas: default_router_replicas(),
            service_type: ServiceType::ClusterIP,
            port: default_router_port(),
            node_port: None,
            resources: None,
        }
    }
}

/// Size limits enforced by every node.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LimitsSpec {
    /// Largest key in bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = dataplane::api::MAX_KEY_LIMIT))]
    pub max_key_bytes: Option<u32>,
    /// Largest value in bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = dataplane::api::MAX_VALUE_LIMIT))]
    pub max_value_bytes: Option<u32>,
}

/// How replicas of one shard are spread over Kubernetes nodes.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum AntiAffinity {
    /// Spread replicas of a shard over nodes when the scheduler can (default).
    #[default]
    Preferred,
    /// Never put two replicas of a shard on one node; pods stay Pending otherwise.
    Required,
    /// No anti-affinity (single-node test clusters).
    None,
}

/// Extra metadata and scheduling settings for every pod the operator creates.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PodOverrides {
    /// Labels added to every pod (the operator's own labels win on conflict).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// Annotations added to every pod.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
    /// Node selector for every pod.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub node_selector: BTreeMap<String, String>,
    /// Tolerations for every pod.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tolerations: Vec<Toleration>,
    /// Anti-affinity between replicas of the same shard.
    #[serde(default)]
    pub anti_affinity: AntiAffinity,
    /// Service account for node and router pods; the namespace default when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_account_name: Option<String>,
}

/// Observed state, written by the operator only.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct KvClusterStatus {
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `Available`, `Progressing` and `Degraded`.
    #[serde(default)]
    pub conditions: Vec<Condition>,
    /// Ready replicas over desired, e.g. `9/9`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready: Option<String>,
    /// Shards with a leader over shards, e.g. `3/3`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub leaders: Option<String>,
    /// Version of the topology last pushed to the routers.
    #[serde(default)]
    pub topology_version: u64,
    /// Shard count the cluster was created with; a different `spec.shards` is refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current_shards: Option<u32>,
    /// Storage the replicas' volumes were created with; a different `spec.storage` is
    /// refused, since a StatefulSet's volume claim templates cannot change.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current_storage: Option<StorageSpec>,
    /// Per-shard leadership and replica health.
    #[serde(default)]
    pub shards: Vec<ShardStatus>,
    /// The control core's state (leaders, epochs, in-sync sets), so a restarted or newly
    /// elected operator carries on where the last one stopped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "preserve_unknown_object")]
    pub control: Option<serde_json::Value>,
}

/// One shard as the operator sees it.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ShardStatus {
    /// Shard number.
    pub id: u32,
    /// Epoch of the current leadership.
    pub epoch: u64,
    /// Replica id of the leader, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub leader: Option<String>,
    /// Pods of this shard that pass their readiness probe.
    pub ready_replicas: i32,
    /// Replica ids in the in-sync set, leader included.
    #[serde(default)]
    pub in_sync: Vec<String>,
    /// Each replica's last report.
    #[serde(default)]
    pub replicas: Vec<ReplicaStatus>,
}

/// One replica as the operator last observed it.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ReplicaStatus {
    /// Replica id, e.g. `s0-r1`.
    pub id: String,
    /// `leader`, `follower`, `unassigned` or `unreachable`.
    pub role: String,
    /// Whether the pod is Ready.
    pub ready: bool,
}

fn preserve_unknown_object(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "type": "object",
        "x-kubernetes-preserve-unknown-fields": true,
    })
}

/// The CRD as YAML, exactly as `distkv-operator crd` prints it and `crds/kvcluster.yaml` holds it.
pub fn crd_yaml() -> String {
    let crd = KvCluster::crd();
    let body = serde_yaml::to_string(&crd).expect("a CRD always serializes");
    format!(
        "# Generated by `distkv-operator crd`; do not edit. A test fails when it drifts.\n---\n{body}"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crd_names_group_and_short_name() {
        let crd = KvCluster::crd();
        assert_eq!(crd.spec.group, GROUP);
        assert_eq!(crd.spec.names.short_names, Some(vec!["kvc".to_string()]));
        assert_eq!(crd.spec.versions[0].name, "v1alpha1");
        assert!(
            crd.spec.versions[0]
                .subresources
                .as_ref()
                .and_then(|s| s.status.as_ref())
                .is_some(),
            "status subresource"
        );
    }

    #[test]
    fn schema_carries_ranges_enums_and_cel_rule() {
        let json = serde_json::to_value(KvCluster::crd()).unwrap();
        let spec = &json["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"];
        assert_eq!(spec["properties"]["shards"]["minimum"].as_f64(), Some(1.0));
        assert_eq!(
            spec["properties"]["replicasPerShard"]["minimum"].as_f64(),
            Some(1.0)
        );
        let modes = &spec["properties"]["replication"]["properties"]["mode"]["enum"];
        assert_eq!(modes, &serde_json::json!(["sync", "async"]));
        let rules = spec["x-kubernetes-validations"].to_string();
        assert!(rules.contains("self.replication.minInSync <= self.replicasPerShard"));
    }

    #[test]
    fn crd_files_match_the_rust_types() {
        // The chart ships its own copy because Helm installs CRDs only from its crds/ folder.
        for file in ["crds/kvcluster.yaml", "charts/distkv/crds/kvcluster.yaml"] {
            let path = format!("{}/../{file}", env!("CARGO_MANIFEST_DIR"));
            let on_disk = std::fs::read_to_string(&path).unwrap_or_default();
            assert!(
                on_disk == crd_yaml(),
                "{file} is stale: run `cargo run -p operator --bin distkv-operator -- crd > {file}`"
            );
        }
    }

    #[test]
    fn minimal_spec_gets_defaults() {
        let spec: KvClusterSpec = serde_yaml::from_str("shards: 3\nreplicasPerShard: 2\n").unwrap();
        assert_eq!(spec.image, DEFAULT_IMAGE);
        assert_eq!(spec.replication.mode, ReplicationMode::Sync);
        assert_eq!(spec.replication.min_in_sync, 1);
        assert_eq!(spec.router.replicas, 2);
        assert_eq!(spec.storage.size.0, "1Gi");
    }
}
