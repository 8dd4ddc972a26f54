//! The router Deployment.

use k8s_openapi::api::apps::v1::{Deployment, DeploymentSpec};
use k8s_openapi::api::core::v1::{
    Container, ContainerPort, EnvVar, PodSpec, PodTemplateSpec, Volume, VolumeMount,
};

use super::statefulset::http_probe;
use super::{
    COMPONENT_ROUTER, ClusterRef, ROUTER_ADMIN_PORT, ROUTER_PORT, anti_affinity,
    container_security_context, default_resources, pod_security_context, selector,
};

/// Stateless routers. A new router pod starts with no topology and is not ready until the
/// operator pushes one to its admin port, which it does on the pod's first observation.
pub fn router_deployment(cluster: &ClusterRef<'_>) -> Deployment {
    let selector_labels = cluster.selector_labels(COMPONENT_ROUTER);
    let spec = cluster.spec;
    let port = |name: &str, number: i32| ContainerPort {
        name: Some(name.into()),
        container_port: number,
        protocol: Some("TCP".into()),
        ..ContainerPort::default()
    };
    let container = Container {
        name: "router".into(),
        image: Some(spec.image.clone()),
        image_pull_policy: cluster.pull_policy(),
        command: Some(vec!["distkv".into()]),
        // Routers enforce the size limits too, so oversized requests stop at the edge.
        args: Some(
            [
                "router".to_string(),
                "--listen".to_string(),
                format!("0.0.0.0:{ROUTER_PORT}"),
                "--admin-listen".to_string(),
                format!("0.0.0.0:{ROUTER_ADMIN_PORT}"),
            ]
            .into_iter()
            .chain(super::limit_args(spec))
            .collect(),
        ),
        env: Some(vec![EnvVar {
            name: "RUST_LOG".into(),
            value: Some("info".into()),
            ..EnvVar::default()
        }]),
        ports: Some(vec![
            port("http", ROUTER_PORT),
            port("admin", ROUTER_ADMIN_PORT),
        ]),
        readiness_probe: Some(http_probe("/readyz", 1, 3, 2)),
        liveness_probe: Some(http_probe("/healthz", 5, 10, 6)),
        resources: Some(
            spec.router
                .resources
                .clone()
                .unwrap_or_else(|| default_resources("50m", "64Mi", "256Mi")),
        ),
        security_context: Some(container_security_context()),
        volume_mounts: Some(vec![VolumeMount {
            name: "tmp".into(),
            mount_path: "/tmp".into(),
            ..VolumeMount::default()
        }]),
        ..Container::default()
    };
    Deployment {
        metadata: cluster.metadata(cluster.router_name(), &selector_labels),
        spec: Some(DeploymentSpec {
            replicas: Some(spec.router.replicas),
            selector: selector(&selector_labels),
            template: PodTemplateSpec {
                metadata: Some(cluster.pod_metadata(&selector_labels)),
                spec: Some(PodSpec {
                    containers: vec![container],
                    security_context: Some(pod_security_context()),
                    affinity: anti_affinity(spec.pod.anti_affinity, &selector_labels).map(soften),
                    node_selector: (!spec.pod.node_selector.is_empty())
                        .then(|| spec.pod.node_selector.clone()),
                    tolerations: (!spec.pod.tolerations.is_empty())
                        .then(|| spec.pod.tolerations.clone()),
                    service_account_name: spec.pod.service_account_name.clone(),
                    automount_service_account_token: Some(false),
                    volumes: Some(vec![Volume {
                        name: "tmp".into(),
                        empty_dir: Some(Default::default()),
                        ..Volume::default()
                    }]),
                    ..PodSpec::default()
                }),
            },
            ..DeploymentSpec::default()
        }),
        status: None,
    }
}

/// Routers hold no data, so spreading them is only ever a preference: a required rule
/// would block rollouts on small clusters for no safety gain.
fn soften(
    mut affinity: k8s_openapi::api::core::v1::Affinity,
) -> k8s_openapi::api::core::v1::Affinity {
    if let Some(aa) = affinity.pod_anti_affinity.as_mut()
        && let Some(required) = aa
            .required_during_scheduling_ignored_during_execution
            .take()
    {
        aa.preferred_during_scheduling_ignored_during_execution = Some(
            required
                .into_iter()
                .map(|term| k8s_openapi::api::core::v1::WeightedPodAffinityTerm {
                    weight: 100,
                    pod_affinity_term: term,
                })
                .collect(),
        );
    }
    affinity
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::builders::test_support::cluster;

    #[test]
    fn runs_routers_with_public_and_admin_ports() {
        let kvc = cluster("  shards: 1\n  replicasPerShard: 1\n  router: {replicas: 3}\n");
        let c = ClusterRef::new(&kvc, "default").unwrap();
        let d = router_deployment(&c);
        let spec = d.spec.unwrap();
        assert_eq!(spec.replicas, Some(3));
        let pod = spec.template.spec.unwrap();
        let container = &pod.containers[0];
        assert_eq!(
            container.args.as_ref().unwrap().join(" "),
            "router --listen 0.0.0.0:8080 --admin-listen 0.0.0.0:8081"
        );
        let ports: Vec<_> = container
            .ports
            .as_ref()
            .unwrap()
            .iter()
            .map(|p| (p.name.clone().unwrap(), p.container_port))
            .collect();
        assert_eq!(
            ports,
            [("http".to_string(), 8080), ("admin".to_string(), 8081)]
        );
        let sc = container.security_context.as_ref().unwrap();
        assert_eq!(sc.read_only_root_filesystem, Some(true));
        assert_eq!(
            container
                .readiness_probe
                .as_ref()
                .unwrap()
                .http_get
                .as_ref()
                .unwrap()
                .path
                .as_deref(),
            Some("/readyz")
        );
    }

    #[test]
    fn routers_enforce_the_size_limits() {
        let kvc = cluster("  shards: 1\n  replicasPerShard: 1\n  limits: {maxValueBytes: 4096}\n");
        let c = ClusterRef::new(&kvc, "default").unwrap();
        let pod = router_deployment(&c).spec.unwrap().template.spec.unwrap();
        let args = pod.containers[0].args.as_ref().unwrap().join(" ");
        assert!(args.ends_with("--max-value-bytes 4096"), "{args}");
    }

    #[test]
    fn router_anti_affinity_is_never_required() {
        let kvc = cluster("  shards: 1\n  replicasPerShard: 1\n  pod: {antiAffinity: required}\n");
        let c = ClusterRef::new(&kvc, "default").unwrap();
        let pod = router_deployment(&c).spec.unwrap().template.spec.unwrap();
        let aa = pod.affinity.unwrap().pod_anti_affinity.unwrap();
        assert!(
            aa.required_during_scheduling_ignored_during_execution
                .is_none()
        );
        assert_eq!(
            aa.preferred_during_scheduling_ignored_during_execution
                .unwrap()[0]
                .pod_affinity_term
                .label_selector
                .as_ref()
                .unwrap()
                .match_labels
                .as_ref()
                .unwrap()["app.kubernetes.io/component"],
            "router"
        );
    }
}
