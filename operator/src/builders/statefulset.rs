//! One StatefulSet per shard: the shard's replicas, each with its own volume.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{
    StatefulSet, StatefulSetPersistentVolumeClaimRetentionPolicy, StatefulSetSpec,
};
use k8s_openapi::api::core::v1::{
    Container, ContainerPort, EnvVar, EnvVarSource, HTTPGetAction, ObjectFieldSelector,
    PersistentVolumeClaim, PersistentVolumeClaimSpec, PodSpec, PodTemplateSpec, Probe, Volume,
    VolumeMount, VolumeResourceRequirements,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::{
    ClusterRef, NODE_PORT, anti_affinity, container_security_context, default_resources,
    pod_security_context, selector,
};

/// Name of the per-replica volume claim template and its mount.
const DATA_VOLUME: &str = "data";
/// Where the node keeps its redb files.
const DATA_DIR: &str = "/data";

/// The StatefulSet of shard `shard` with `replicas` pods.
///
/// Pods start in parallel: the operator, not pod order, decides who leads. Each pod has a
/// stable DNS name through the shard's headless Service, which the operator puts in the
/// topology, so a replica keeps its address across restarts and rescheduling.
pub fn shard_statefulset(cluster: &ClusterRef<'_>, shard: u32, replicas: i32) -> StatefulSet {
    let name = cluster.shard_name(shard);
    let selector_labels = cluster.shard_selector_labels(shard);
    let spec = cluster.spec;

    // The node derives its replica id from --shard and the ordinal at the end of
    // $POD_NAME; peers and routers learn its address from the operator, which uses the
    // stable DNS name through the headless Service.
    let mut args = vec![
        "node".to_string(),
        "--shard".to_string(),
        shard.to_string(),
        "--listen".to_string(),
        format!("0.0.0.0:{NODE_PORT}"),
        "--data-dir".to_string(),
        DATA_DIR.to_string(),
    ];
    args.extend(super::limit_args(spec));
    // Only when set: an argument added to every pod template would restart every replica
    // of every cluster when the operator is upgraded.
    if spec.replication.log_retain != dataplane::node::DEFAULT_LOG_RETAIN {
        args.extend([
            "--log-retain".to_string(),
            spec.replication.log_retain.to_string(),
        ]);
    }

    let container = Container {
        name: "node".into(),
        image: Some(spec.image.clone()),
        image_pull_policy: cluster.pull_policy(),
        command: Some(vec!["distkv".into()]),
        args: Some(args),
        env: Some(vec![
            field_env("POD_NAME", "metadata.name"),
            field_env("POD_IP", "status.podIP"),
            EnvVar {
                name: "RUST_LOG".into(),
                value: Some("info".into()),
                ..EnvVar::default()
            },
        ]),
        ports: Some(vec![ContainerPort {
            name: Some("http".into()),
            container_port: NODE_PORT,
            protocol: Some("TCP".into()),
            ..ContainerPort::default()
        }]),
        // The node opens its data directory, repairing it if needed, before it listens:
        // up to 10 minutes before liveness starts counting, which would otherwise kill it
        // after about 70 s and start the repair over.
        startup_probe: Some(http_probe("/healthz", 0, 5, 120)),
        readiness_probe: Some(http_probe("/readyz", 2, 5, 3)),
        liveness_probe: Some(http_probe("/healthz", 10, 10, 6)),
        resources: Some(
            spec.resources
                .clone()
                .unwrap_or_else(|| default_resources("100m", "128Mi", "1Gi")),
        ),
        security_context: Some(container_security_context()),
        volume_mounts: Some(vec![
            VolumeMount {
                name: DATA_VOLUME.into(),
                mount_path: DATA_DIR.into(),
                ..VolumeMount::default()
            },
            VolumeMount {
                name: "tmp".into(),
                mount_path: "/tmp".into(),
                ..VolumeMount::default()
            },
        ]),
        ..Container::default()
    };

    let pod_spec = PodSpec {
        containers: vec![container],
        security_context: Some(pod_security_context()),
        affinity: anti_affinity(spec.pod.anti_affinity, &selector_labels),
        node_selector: non_empty(spec.pod.node_selector.clone()),
        tolerations: (!spec.pod.tolerations.is_empty()).then(|| spec.pod.tolerations.clone()),
        service_account_name: spec.pod.service_account_name.clone(),
        // Nodes never call the Kubernetes API.
        automount_service_account_token: Some(false),
        termination_grace_period_seconds: Some(30),
        // The root filesystem is read-only; give the process a writable /tmp.
        volumes: Some(vec![Volume {
            name: "tmp".into(),
            empty_dir: Some(Default::default()),
            ..Volume::default()
        }]),
        ..PodSpec::default()
    };

    StatefulSet {
        metadata: cluster.metadata(name.clone(), &selector_labels),
        spec: Some(StatefulSetSpec {
            replicas: Some(replicas),
            service_name: Some(name),
            selector: selector(&selector_labels),
            pod_management_policy: Some("Parallel".into()),
            // Volumes outlive scale-down and deletion: data is only removed on purpose.
            persistent_volume_claim_retention_policy: Some(
                StatefulSetPersistentVolumeClaimRetentionPolicy {
                    when_deleted: Some("Retain".into()),
                    when_scaled: Some("Retain".into()),
                },
            ),
            template: PodTemplateSpec {
                metadata: Some(cluster.pod_metadata(&selector_labels)),
                spec: Some(pod_spec),
            },
            volume_claim_templates: Some(vec![volume_claim(cluster, &selector_labels)]),
            ..StatefulSetSpec::default()
        }),
        status: None,
    }
}

fn volume_claim(
    cluster: &ClusterRef<'_>,
    labels: &BTreeMap<String, String>,
) -> PersistentVolumeClaim {
    PersistentVolumeClaim {
        metadata: ObjectMeta {
            name: Some(DATA_VOLUME.into()),
            labels: Some(cluster.stable_labels(labels)),
            ..ObjectMeta::default()
        },
        spec: Some(PersistentVolumeClaimSpec {
            access_modes: Some(vec!["ReadWriteOnce".into()]),
            storage_class_name: cluster.spec.storage.storage_class_name.clone(),
            resources: Some(VolumeResourceRequirements {
                requests: Some(BTreeMap::from([(
                    "storage".into(),
                    cluster.spec.storage.size.clone(),
                )])),
                ..VolumeResourceRequirements::default()
            }),
            ..PersistentVolumeClaimSpec::default()
        }),
        status: None,
    }
}

fn field_env(name: &str, path: &str) -> EnvVar {
    EnvVar {
        name: name.into(),
        value_from: Some(EnvVarSource {
            field_ref: Some(ObjectFieldSelector {
                field_path: path.into(),
                ..ObjectFieldSelector::default()
            }),
            ..EnvVarSource::default()
        }),
        ..EnvVar::default()
    }
}

/// An HTTP GET probe on the container's `http` port.
pub(super) fn http_probe(path: &str, initial: i32, period: i32, failures: i32) -> Probe {
    Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.into()),
            port: IntOrString::String("http".into()),
            ..HTTPGetAction::default()
        }),
        initial_delay_seconds: Some(initial),
        period_seconds: Some(period),
        timeout_seconds: Some(2),
        failure_threshold: Some(failures),
        ..Probe::default()
    }
}

fn non_empty(map: BTreeMap<String, String>) -> Option<BTreeMap<String, String>> {
    (!map.is_empty()).then_some(map)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::builders::test_support::cluster;
    use crate::builders::{ClusterRef, SHARD_LABEL};

    fn build(spec: &str, shard: u32, replicas: i32) -> StatefulSet {
        let kvc = cluster(spec);
        let c = ClusterRef::new(&kvc, "default").unwrap();
        shard_statefulset(&c, shard, replicas)
    }

    fn pod_spec(sts: &StatefulSet) -> &PodSpec {
        sts.spec.as_ref().unwrap().template.spec.as_ref().unwrap()
    }

    #[test]
    fn runs_the_node_for_its_shard_with_a_stable_address() {
        let sts = build("  shards: 3\n  replicasPerShard: 3\n", 2, 3);
        let spec = sts.spec.as_ref().unwrap();
        assert_eq!(sts.metadata.name.as_deref(), Some("demo-s2"));
        assert_eq!(spec.replicas, Some(3));
        assert_eq!(spec.service_name.as_deref(), Some("demo-s2"));
        let c = &pod_spec(&sts).containers[0];
        assert_eq!(c.command.as_deref(), Some(&["distkv".to_string()][..]));
        let args = c.args.as_ref().unwrap().join(" ");
        assert_eq!(
            args,
            "node --shard 2 --listen 0.0.0.0:7000 --data-dir /data"
        );
        let env: Vec<_> = c
            .env
            .as_ref()
            .unwrap()
            .iter()
            .map(|e| e.name.as_str())
            .collect();
        assert!(env.contains(&"POD_NAME"));
    }

    #[test]
    fn passes_a_log_retention_other_than_the_nodes_default() {
        let args = |yaml: &str| {
            let sts = build(yaml, 0, 1);
            pod_spec(&sts).containers[0].args.clone().unwrap().join(" ")
        };
        let base = "  shards: 1\n  replicasPerShard: 1\n";
        assert!(!args(base).contains("--log-retain"));
        let set = format!("{base}  replication: {{logRetain: 500000}}\n");
        assert!(
            args(&set).ends_with("--log-retain 500000"),
            "{}",
            args(&set)
        );
    }

    #[test]
    fn selector_matches_template_and_is_per_shard() {
        let sts = build("  shards: 2\n  replicasPerShard: 1\n", 1, 1);
        let spec = sts.spec.as_ref().unwrap();
        let selector = spec.selector.match_labels.as_ref().unwrap();
        let template = spec
            .template
            .metadata
            .as_ref()
            .unwrap()
            .labels
            .as_ref()
            .unwrap();
        for (k, v) in selector {
            assert_eq!(
                template.get(k),
                Some(v),
                "template lacks selector label {k}"
            );
        }
        assert_eq!(selector[SHARD_LABEL], "1");
    }

    #[test]
    fn has_a_volume_claim_with_size_and_class() {
        let sts = build(
            "  shards: 1\n  replicasPerShard: 1\n  storage: {size: 5Gi, storageClassName: fast}\n",
            0,
            1,
        );
        let pvc = &sts
            .spec
            .as_ref()
            .unwrap()
            .volume_claim_templates
            .as_ref()
            .unwrap()[0];
        let pvc_spec = pvc.spec.as_ref().unwrap();
        assert_eq!(pvc_spec.storage_class_name.as_deref(), Some("fast"));
        let requests = pvc_spec
            .resources
            .as_ref()
            .unwrap()
            .requests
            .as_ref()
            .unwrap();
        assert_eq!(requests["storage"].0, "5Gi");
        let mounts = pod_spec(&sts).containers[0].volume_mounts.as_ref().unwrap();
        assert!(
            mounts
                .iter()
                .any(|m| m.name == "data" && m.mount_path == "/data")
        );
    }

    #[test]
    fn volume_claim_templates_do_not_change_with_the_image() {
        // The API server refuses any change to volumeClaimTemplates, so one that followed
        // the image would make every upgrade's apply fail.
        let spec = "  shards: 1\n  replicasPerShard: 1\n  image: reg.io/distkv:";
        let claims = |tag: &str| {
            build(&format!("{spec}{tag}\n"), 0, 1)
                .spec
                .unwrap()
                .volume_claim_templates
        };
        let (old, new) = (claims("1.0.0"), claims("1.1.0"));
        assert_eq!(old, new);
        let labels = old.unwrap()[0].metadata.labels.clone().unwrap();
        assert!(
            !labels.contains_key("app.kubernetes.io/version"),
            "{labels:?}"
        );
        assert_eq!(labels["app.kubernetes.io/instance"], "demo");
        assert_eq!(labels[SHARD_LABEL], "0");
    }

    #[test]
    fn probes_hit_readyz_and_healthz() {
        let sts = build("  shards: 1\n  replicasPerShard: 1\n", 0, 1);
        let c = &pod_spec(&sts).containers[0];
        let path = |p: &Option<Probe>| p.as_ref().unwrap().http_get.as_ref().unwrap().path.clone();
        assert_eq!(path(&c.readiness_probe).as_deref(), Some("/readyz"));
        assert_eq!(path(&c.liveness_probe).as_deref(), Some("/healthz"));
    }

    #[test]
    fn liveness_waits_for_a_startup_probe_that_allows_ten_minutes() {
        // A node opens (and may repair) its data directory before it listens; liveness
        // alone would restart it after about 70 s, in the middle of that.
        let sts = build("  shards: 1\n  replicasPerShard: 1\n", 0, 1);
        let c = &pod_spec(&sts).containers[0];
        let startup = c.startup_probe.as_ref().expect("a startup probe");
        let get = startup.http_get.as_ref().unwrap();
        assert_eq!(get.path.as_deref(), Some("/healthz"));
        assert_eq!(get.port, IntOrString::String("http".into()));
        let allowed = startup.period_seconds.unwrap() * startup.failure_threshold.unwrap();
        assert!(allowed >= 600, "only {allowed}s to start");
    }

    #[test]
    fn is_hardened() {
        let sts = build("  shards: 1\n  replicasPerShard: 1\n", 0, 1);
        let pod = pod_spec(&sts);
        assert_eq!(
            pod.security_context.as_ref().unwrap().run_as_non_root,
            Some(true)
        );
        let sc = pod.containers[0].security_context.as_ref().unwrap();
        assert_eq!(sc.read_only_root_filesystem, Some(true));
        assert_eq!(sc.allow_privilege_escalation, Some(false));
        assert_eq!(
            sc.capabilities.as_ref().unwrap().drop.as_deref(),
            Some(&["ALL".to_string()][..])
        );
        assert!(
            pod.containers[0]
                .resources
                .as_ref()
                .unwrap()
                .limits
                .is_some()
        );
    }

    #[test]
    fn anti_affinity_is_preferred_by_default_and_configurable() {
        let sts = build("  shards: 1\n  replicasPerShard: 3\n", 0, 3);
        let aa = pod_spec(&sts)
            .affinity
            .as_ref()
            .unwrap()
            .pod_anti_affinity
            .as_ref()
            .unwrap();
        let preferred = aa
            .preferred_during_scheduling_ignored_during_execution
            .as_ref()
            .unwrap();
        let term = &preferred[0].pod_affinity_term;
        assert_eq!(term.topology_key, "kubernetes.io/hostname");
        let labels = term
            .label_selector
            .as_ref()
            .unwrap()
            .match_labels
            .as_ref()
            .unwrap();
        assert_eq!(labels[SHARD_LABEL], "0");

        let sts = build(
            "  shards: 1\n  replicasPerShard: 3\n  pod: {antiAffinity: none}\n",
            0,
            3,
        );
        assert!(pod_spec(&sts).affinity.is_none());
        let sts = build(
            "  shards: 1\n  replicasPerShard: 3\n  pod: {antiAffinity: required}\n",
            0,
            3,
        );
        let aa = pod_spec(&sts)
            .affinity
            .as_ref()
            .unwrap()
            .pod_anti_affinity
            .as_ref()
            .unwrap();
        assert!(
            aa.required_during_scheduling_ignored_during_execution
                .is_some()
        );
    }

    #[test]
    fn pod_overrides_and_limits_are_applied() {
        let sts = build(
            "  shards: 1\n  replicasPerShard: 1\n  limits: {maxKeyBytes: 512, maxValueBytes: 1048576}\n  pod:\n    labels: {team: kv, app.kubernetes.io/name: evil}\n    annotations: {a: b}\n    nodeSelector: {disk: ssd}\n    tolerations: [{key: dedicated, operator: Exists, effect: NoSchedule}]\n",
            0,
            1,
        );
        let spec = sts.spec.as_ref().unwrap();
        let meta = spec.template.metadata.as_ref().unwrap();
        let labels = meta.labels.as_ref().unwrap();
        assert_eq!(labels["team"], "kv");
        assert_eq!(labels["app.kubernetes.io/name"], "distkv", "our labels win");
        assert_eq!(meta.annotations.as_ref().unwrap()["a"], "b");
        let pod = pod_spec(&sts);
        assert_eq!(pod.node_selector.as_ref().unwrap()["disk"], "ssd");
        assert_eq!(
            pod.tolerations.as_ref().unwrap()[0].key.as_deref(),
            Some("dedicated")
        );
        let args = pod.containers[0].args.as_ref().unwrap().join(" ");
        assert!(
            args.contains("--max-key-bytes 512 --max-value-bytes 1048576"),
            "{args}"
        );
    }
}
