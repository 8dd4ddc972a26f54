//! Services: a headless one per shard (stable replica DNS names) and the router's.

use k8s_openapi::api::core::v1::{Service, ServicePort, ServiceSpec};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::{COMPONENT_ROUTER, ClusterRef, NODE_PORT};

/// The headless Service of shard `shard`, named like its StatefulSet.
///
/// It publishes not-ready pods too: a fresh replica is not ready until the operator gives
/// it a role, and the operator and the shard's leader must reach it to do so.
pub fn shard_service(cluster: &ClusterRef<'_>, shard: u32) -> Service {
    let selector_labels = cluster.shard_selector_labels(shard);
    Service {
        metadata: cluster.metadata(cluster.shard_name(shard), &selector_labels),
        spec: Some(ServiceSpec {
            cluster_ip: Some("None".into()),
            publish_not_ready_addresses: Some(true),
            selector: Some(selector_labels),
            ports: Some(vec![ServicePort {
                name: Some("http".into()),
                port: NODE_PORT,
                target_port: Some(IntOrString::String("http".into())),
                protocol: Some("TCP".into()),
                ..ServicePort::default()
            }]),
            ..ServiceSpec::default()
        }),
        status: None,
    }
}

/// The router Service clients use: only the public port, never the admin port.
pub fn router_service(cluster: &ClusterRef<'_>) -> Service {
    let selector_labels = cluster.selector_labels(COMPONENT_ROUTER);
    let router = &cluster.spec.router;
    Service {
        metadata: cluster.metadata(cluster.router_name(), &selector_labels),
        spec: Some(ServiceSpec {
            type_: Some(router.service_type.as_str().into()),
            selector: Some(selector_labels),
            ports: Some(vec![ServicePort {
                name: Some("http".into()),
                port: router.port,
                target_port: Some(IntOrString::String("http".into())),
                node_port: router.node_port,
                protocol: Some("TCP".into()),
                ..ServicePort::default()
            }]),
            ..ServiceSpec::default()
        }),
        status: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::builders::test_support::cluster;

    #[test]
    fn shard_service_is_headless_and_publishes_unready_pods() {
        let kvc = cluster("  shards: 2\n  replicasPerShard: 3\n");
        let c = ClusterRef::new(&kvc, "default").unwrap();
        let svc = shard_service(&c, 1);
        assert_eq!(svc.metadata.name.as_deref(), Some("demo-s1"));
        let spec = svc.spec.unwrap();
        assert_eq!(spec.cluster_ip.as_deref(), Some("None"));
        assert_eq!(spec.publish_not_ready_addresses, Some(true));
        assert_eq!(spec.selector.unwrap()["distkv.io/shard"], "1");
        assert_eq!(spec.ports.unwrap()[0].port, 7000);
    }

    #[test]
    fn router_service_exposes_only_the_public_port() {
        let kvc = cluster(
            "  shards: 1\n  replicasPerShard: 1\n  router: {serviceType: NodePort, port: 80, nodePort: 30080}\n",
        );
        let c = ClusterRef::new(&kvc, "default").unwrap();
        let svc = router_service(&c);
        assert_eq!(svc.metadata.name.as_deref(), Some("demo-router"));
        let spec = svc.spec.unwrap();
        assert_eq!(spec.type_.as_deref(), Some("NodePort"));
        let ports = spec.ports.unwrap();
        assert_eq!(ports.len(), 1, "the admin port stays private");
        assert_eq!(ports[0].port, 80);
        assert_eq!(ports[0].node_port, Some(30080));
        assert_eq!(
            spec.selector.unwrap()["app.kubernetes.io/component"],
            "router"
        );
    }
}
