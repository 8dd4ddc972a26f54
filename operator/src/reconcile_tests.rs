//! Reconcile against an in-memory API server and fake replicas: what gets applied, what
//! the status says, and how failover, invalid specs and scaling behave.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use http::Method;
use k8s_openapi::api::core::v1::Pod;
use kube::runtime::events::Reporter;
use kube::runtime::{reflector, watcher};
use serde_json::Value;

use crate::crd::KvCluster;
use crate::metrics::Metrics;
use crate::observe::test_pods;
use crate::reconcile::{Context, reconcile};
use crate::testing::{FakeApi, FakeNodes};

const KVC_PATH: &str = "/apis/distkv.io/v1alpha1/namespaces/kv/kvclusters/demo";

struct Harness {
    api: FakeApi,
    nodes: FakeNodes,
    ctx: Arc<Context>,
    clock: Arc<AtomicU64>,
    kvc: KvCluster,
}

impl Harness {
    fn new(spec_yaml: &str) -> Harness {
        let mut kvc = crate::builders::test_support::cluster(spec_yaml);
        kvc.metadata.generation = Some(1);
        let (api, nodes) = (FakeApi::default(), FakeNodes::default());
        let clock = Arc::new(AtomicU64::new(1_000));
        Harness {
            ctx: Arc::new(operator(&api, &nodes, &clock, None)),
            api,
            nodes,
            clock,
            kvc,
        }
    }

    /// An operator's context over this harness's API server, replicas and clock, with
    /// nothing in memory.
    fn context(&self, instance: Option<&str>) -> Context {
        operator(&self.api, &self.nodes, &self.clock, instance)
    }

    /// A new operator process (a restart, or another replica winning the Lease): same
    /// API server and replicas, nothing in memory.
    fn restart_operator(&mut self) {
        self.ctx = Arc::new(self.context(Some("second")));
    }

    /// Pods for every replica (all ready) and two ready routers; replicas answer.
    fn start_pods(&self) {
        self.api.set_pods(self.ready_pods());
    }

    /// Pods for every replica (all ready) and two ready routers, and replicas that
    /// answer, for the caller to place.
    fn ready_pods(&self) -> Vec<Pod> {
        let mut pods = Vec::new();
        for shard in 0..self.kvc.spec.shards {
            for ordinal in 0..self.kvc.spec.replicas_per_shard {
                pods.push(test_pods::node(shard, ordinal, true, "Running"));
                self.nodes
                    .add(&address(shard, ordinal), &format!("s{shard}-r{ordinal}"));
            }
        }
        pods.push(test_pods::router(1, true));
        pods.push(test_pods::router(2, true));
        pods
    }

    /// One reconcile round after `advance_ms`; the resource then carries the status the
    /// operator wrote, as the controller's cache would.
    async fn round(&mut self, advance_ms: u64) {
        self.clock.fetch_add(advance_ms, Ordering::SeqCst);
        self.api
            .put(KVC_PATH, serde_json::to_value(&self.kvc).unwrap());
        reconcile(Arc::new(self.kvc.clone()), self.ctx.clone())
            .await
            .expect("reconcile succeeds");
        if let Some(stored) = self.api.object(KVC_PATH) {
            self.kvc.status = serde_json::from_value(stored["status"].clone()).unwrap();
        }
    }

    fn status(&self) -> &crate::crd::KvClusterStatus {
        self.kvc.status.as_ref().expect("status written")
    }

    fn condition(&self, type_: &str) -> (String, String) {
        let c = self
            .status()
            .conditions
            .iter()
            .find(|c| c.type_ == type_)
            .unwrap();
        (c.status.clone(), c.reason.clone())
    }

    fn applied(&self) -> Vec<(String, Value)> {
        self.api
            .requests()
            .into_iter()
            .filter(|r| r.method == Method::PATCH && !r.path.ends_with("/status"))
            .map(|r| (r.path, r.body))
            .collect()
    }
}

/// An operator process: its context over `api`, `nodes` and `clock`, nothing in memory.
fn operator(
    api: &FakeApi,
    nodes: &FakeNodes,
    clock: &Arc<AtomicU64>,
    instance: Option<&str>,
) -> Context {
    let c = clock.clone();
    Context::new(
        api.client(),
        Arc::new(nodes.clone()),
        Arc::new(nodes.clone()),
        Reporter {
            controller: "distkv-operator".into(),
            instance: instance.map(str::to_owned),
        },
        Metrics::new(),
    )
    .with_clock(Arc::new(move || c.load(Ordering::SeqCst)))
}

fn address(shard: u32, ordinal: u32) -> String {
    format!("demo-s{shard}-{ordinal}.demo-s{shard}.kv.svc:7000")
}

#[tokio::test]
async fn creating_a_kvcluster_applies_the_expected_objects() {
    let mut h = Harness::new("  shards: 2\n  replicasPerShard: 3\n  replication: {minInSync: 2}\n");
    h.round(0).await;

    let patches: Vec<_> = h
        .api
        .requests()
        .into_iter()
        .filter(|r| r.method == Method::PATCH && !r.path.ends_with("/status"))
        .collect();
    let paths: Vec<&str> = patches.iter().map(|r| r.path.as_str()).collect();
    assert_eq!(
        paths,
        [
            "/api/v1/namespaces/kv/services/demo-s0",
            "/apis/apps/v1/namespaces/kv/statefulsets/demo-s0",
            "/apis/policy/v1/namespaces/kv/poddisruptionbudgets/demo-s0",
            "/api/v1/namespaces/kv/services/demo-s1",
            "/apis/apps/v1/namespaces/kv/statefulsets/demo-s1",
            "/apis/policy/v1/namespaces/kv/poddisruptionbudgets/demo-s1",
            "/apis/apps/v1/namespaces/kv/deployments/demo-router",
            "/api/v1/namespaces/kv/services/demo-router",
            "/apis/policy/v1/namespaces/kv/poddisruptionbudgets/demo-router",
        ]
    );
    for p in &patches {
        assert!(
            p.query.contains("fieldManager=distkv-operator"),
            "{}",
            p.query
        );
        assert!(
            p.query.contains("force=true"),
            "server-side apply owns its fields: {}",
            p.query
        );
        assert_eq!(p.body["metadata"]["ownerReferences"][0]["uid"], "1234-uid");
    }
    let sts = h
        .api
        .object("/apis/apps/v1/namespaces/kv/statefulsets/demo-s1")
        .unwrap();
    assert_eq!(sts["spec"]["replicas"], 3);

    assert_eq!(h.status().current_shards, Some(2));
    assert_eq!(h.status().observed_generation, Some(1));
    assert_eq!(
        h.condition("Available"),
        ("False".into(), "ShardsUnavailable".into())
    );
    assert_eq!(
        h.condition("Progressing"),
        ("True".into(), "PodsStarting".into())
    );

    // Nothing changed: no re-apply and no status write on the next round.
    h.api.clear_requests();
    h.round(1000).await;
    assert!(
        h.applied().is_empty(),
        "unchanged objects are not re-applied every round"
    );
    assert!(
        !h.api.requests().iter().any(|r| r.path.ends_with("/status")),
        "unchanged status is not rewritten"
    );
}

#[tokio::test]
async fn status_follows_observed_replicas_and_routers_get_the_topology() {
    let mut h = Harness::new("  shards: 2\n  replicasPerShard: 3\n  replication: {minInSync: 2}\n");
    h.start_pods();
    h.round(0).await;
    h.round(1000).await;

    let status = h.status().clone();
    assert_eq!(status.leaders.as_deref(), Some("2/2"));
    assert_eq!(status.ready.as_deref(), Some("6/6"));
    for (i, shard) in status.shards.iter().enumerate() {
        assert_eq!(shard.leader.as_deref(), Some(format!("s{i}-r0").as_str()));
        assert_eq!(shard.epoch, 1);
        assert_eq!(shard.ready_replicas, 3);
        assert_eq!(shard.in_sync.len(), 3, "identical logs start in sync");
        assert_eq!(shard.replicas[0].role, "leader");
        assert_eq!(shard.replicas[1].role, "follower");
    }
    assert_eq!(
        h.condition("Available"),
        ("True".into(), "AllShardsServing".into())
    );
    assert_eq!(
        h.condition("Degraded"),
        ("False".into(), "AsExpected".into())
    );
    assert_eq!(
        h.condition("Progressing"),
        ("False".into(), "Reconciled".into())
    );
    let elected: Vec<_> = h
        .api
        .events()
        .into_iter()
        .filter(|(r, _)| r == "LeaderElected")
        .collect();
    assert_eq!(elected.len(), 2, "{:?}", h.api.events());

    // Both routers hold the topology the status reports.
    let pushes = h.nodes.pushes();
    for router in ["10.1.0.1:8081", "10.1.0.2:8081"] {
        let last = pushes
            .iter()
            .filter(|(a, _)| a == router)
            .map(|(_, v)| *v)
            .max();
        assert_eq!(last, Some(status.topology_version), "{router}");
    }
}

#[tokio::test]
async fn a_dead_leader_is_replaced_at_a_higher_epoch_after_its_lease() {
    let mut h = Harness::new(
        "  shards: 1\n  replicasPerShard: 3\n  replication: {minInSync: 2, leaseMs: 5000, failoverGraceMs: 1000}\n",
    );
    h.start_pods();
    h.round(0).await;
    h.round(1000).await;
    assert_eq!(h.status().shards[0].leader.as_deref(), Some("s0-r0"));

    // The leader's pod dies: not ready and silent.
    h.nodes.take_down(&address(0, 0));
    let mut pods = vec![test_pods::node(0, 0, false, "Running")];
    pods.extend([
        test_pods::node(0, 1, true, "Running"),
        test_pods::node(0, 2, true, "Running"),
    ]);
    pods.push(test_pods::router(1, true));
    h.api.set_pods(pods);

    h.round(1000).await;
    assert_eq!(
        h.status().shards[0].leader.as_deref(),
        Some("s0-r0"),
        "no promotion while the old leader's lease may still run"
    );
    for _ in 0..8 {
        h.round(1000).await;
    }
    let shard = &h.status().shards[0];
    let leader = shard.leader.clone().unwrap();
    assert_ne!(leader, "s0-r0");
    assert_eq!(shard.epoch, 2);
    assert_eq!(h.condition("Available").0, "True");

    let promoted: Vec<_> = h
        .api
        .events()
        .into_iter()
        .filter(|(r, _)| r == "LeaderPromoted")
        .collect();
    assert_eq!(promoted.len(), 1, "{:?}", h.api.events());
    assert!(
        promoted[0].1.contains("replacing s0-r0"),
        "{}",
        promoted[0].1
    );
    let ordinal: u32 = leader.trim_start_matches("s0-r").parse().unwrap();
    assert!(
        h.nodes
            .roles()
            .iter()
            .any(|(addr, req)| addr == &address(0, ordinal)
                && req.role == dataplane::topology::Role::Leader
                && req.epoch == 2)
    );
}

/// A lease runs from when its role goes out, which is after the status write: if that
/// write is slow, the wait before replacing an unreachable leader must count from the
/// send, or the new leader is promoted while the old one may still serve on its lease.
#[tokio::test]
async fn a_slow_status_write_does_not_shorten_the_wait_for_a_lost_leaders_lease() {
    let mut h = Harness::new(
        "  shards: 1\n  replicasPerShard: 2\n  replication: {minInSync: 1, leaseMs: 5000, failoverGraceMs: 1000}\n",
    );
    h.start_pods();
    // The first status write takes 2 s (a loaded API server).
    let (clock, once) = (h.clock.clone(), Arc::new(std::sync::Once::new()));
    h.api.on_request(
        "/status",
        Arc::new(move || {
            once.call_once(|| {
                clock.fetch_add(2_000, Ordering::SeqCst);
            })
        }),
    );
    h.round(0).await;
    assert_eq!(h.status().shards[0].leader.as_deref(), Some("s0-r0"));
    // The leader role went out after the write: its lease runs 5 s from there.
    let sent = h.clock.load(Ordering::SeqCst);
    assert_eq!(sent, 3_000);
    let lease_ends = sent + 5_000;

    h.nodes.take_down(&address(0, 0));
    let mut pods = vec![test_pods::node(0, 0, false, "Running")];
    pods.push(test_pods::node(0, 1, true, "Running"));
    pods.push(test_pods::router(1, true));
    h.api.set_pods(pods);
    while h.clock.load(Ordering::SeqCst) + 500 < lease_ends + 1_000 {
        h.round(500).await;
        assert_eq!(
            h.status().shards[0].leader.as_deref(),
            Some("s0-r0"),
            "promoted at {} ms while s0-r0's lease (to {lease_ends} ms) plus grace may run",
            h.clock.load(Ordering::SeqCst)
        );
    }
    for _ in 0..4 {
        h.round(500).await;
    }
    assert_eq!(h.status().shards[0].leader.as_deref(), Some("s0-r1"));
}

#[tokio::test]
async fn an_invalid_spec_sets_degraded_and_applies_nothing() {
    let mut h = Harness::new("  shards: 1\n  replicasPerShard: 3\n  replication: {minInSync: 4}\n");
    h.round(0).await;
    assert!(h.applied().is_empty(), "applied {:?}", h.applied());
    assert_eq!(
        h.condition("Degraded"),
        ("True".into(), "InvalidSpec".into())
    );
    assert_eq!(h.condition("Available").0, "False");
    assert!(
        h.api
            .events()
            .iter()
            .any(|(r, n)| r == "InvalidSpec" && n.contains("minInSync"))
    );
}

#[tokio::test]
async fn changing_shards_is_refused_but_the_running_cluster_is_still_driven() {
    let mut h = Harness::new("  shards: 2\n  replicasPerShard: 2\n");
    h.start_pods();
    h.round(0).await;
    h.round(1000).await;
    assert_eq!(h.status().leaders.as_deref(), Some("2/2"));

    h.kvc.spec.shards = 3;
    h.kvc.metadata.generation = Some(2);
    h.api.clear_requests();
    let roles_before = h.nodes.roles().len();
    h.round(1000).await;
    assert!(h.applied().is_empty(), "nothing applied for a refused spec");
    let (status, reason) = h.condition("Degraded");
    assert_eq!(
        (status.as_str(), reason.as_str()),
        ("True", "ReshardingUnsupported")
    );
    assert_eq!(h.status().current_shards, Some(2));
    assert!(
        h.nodes.roles().len() > roles_before,
        "leases are still renewed"
    );
    assert_eq!(h.status().leaders.as_deref(), Some("2/2"));
}

#[tokio::test]
async fn scale_down_removes_followers_but_never_a_leader() {
    let mut h = Harness::new("  shards: 2\n  replicasPerShard: 3\n");
    h.start_pods();
    // Shard 0's longest log is on its highest ordinal, so that replica leads.
    h.nodes.set_log(&address(0, 2), 1, 10);
    h.round(0).await;
    h.round(1000).await;
    assert_eq!(h.status().shards[0].leader.as_deref(), Some("s0-r2"));
    assert_eq!(h.status().shards[1].leader.as_deref(), Some("s1-r0"));

    h.kvc.spec.replicas_per_shard = 1;
    h.kvc.metadata.generation = Some(2);
    h.round(1000).await;
    let replicas = |shard: u32| {
        h.api
            .object(&format!(
                "/apis/apps/v1/namespaces/kv/statefulsets/demo-s{shard}"
            ))
            .unwrap()["spec"]["replicas"]
            .as_i64()
            .unwrap()
    };
    assert_eq!(replicas(0), 3, "shard 0 keeps the pod its leader runs in");
    assert_eq!(replicas(1), 1, "shard 1 drops its followers");
    assert_eq!(
        h.condition("Progressing"),
        ("True".into(), "ScaleDownWaitingForLeader".into())
    );
    let shard0: Vec<_> = h.status().shards[0]
        .replicas
        .iter()
        .map(|r| r.id.clone())
        .collect();
    assert!(shard0.contains(&"s0-r2".to_string()));
    let shard1: Vec<_> = h.status().shards[1]
        .replicas
        .iter()
        .map(|r| r.id.clone())
        .collect();
    assert_eq!(shard1, ["s1-r0"]);
    assert_eq!(h.status().shards[1].in_sync, ["s1-r0"]);
}

#[tokio::test]
async fn scale_down_waits_while_it_would_take_the_in_sync_set_below_min_in_sync() {
    let mut h = Harness::new("  shards: 1\n  replicasPerShard: 3\n  replication: {minInSync: 2}\n");
    h.start_pods();
    h.round(0).await;
    h.round(1000).await;
    // r1 stops answering and leaves the in-sync set; r0 (leader) and r2 remain.
    h.nodes.take_down(&address(0, 1));
    for _ in 0..6 {
        h.round(1000).await;
    }
    assert_eq!(h.status().shards[0].in_sync, ["s0-r0", "s0-r2"]);

    // Down to 2 would remove r2 and leave the leader alone in the set: writes would stop.
    h.kvc.spec.replicas_per_shard = 2;
    h.kvc.metadata.generation = Some(2);
    h.round(1000).await;
    let replicas = h
        .api
        .object("/apis/apps/v1/namespaces/kv/statefulsets/demo-s0")
        .unwrap()["spec"]["replicas"]
        .as_i64();
    assert_eq!(replicas, Some(3));
    assert_eq!(
        h.condition("Progressing"),
        ("True".into(), "ScaleDownWaitingForInSync".into())
    );
    assert_eq!(h.status().shards[0].in_sync, ["s0-r0", "s0-r2"]);
}

#[tokio::test]
async fn a_new_operator_carries_on_from_the_status() {
    let mut h = Harness::new("  shards: 1\n  replicasPerShard: 3\n  replication: {minInSync: 2}\n");
    h.start_pods();
    h.round(0).await;
    h.round(1000).await;
    let before = h.status().shards[0].clone();
    assert_eq!(before.epoch, 1);

    h.restart_operator();
    h.api.clear_requests();
    h.round(1000).await;
    h.round(1000).await;
    let after = &h.status().shards[0];
    assert_eq!(after.leader, before.leader, "no new election");
    assert_eq!(after.epoch, 1, "no new epoch");
    assert_eq!(after.in_sync, before.in_sync);
    assert!(
        !h.api.events().iter().any(|(r, _)| r.starts_with("Leader")),
        "{:?}",
        h.api.events()
    );
}

#[tokio::test]
async fn api_server_failures_do_not_stop_lease_renewals() {
    let mut h = Harness::new("  shards: 1\n  replicasPerShard: 3\n");
    h.start_pods();
    h.round(0).await;
    h.round(1000).await;
    assert_eq!(h.status().leaders.as_deref(), Some("1/1"));

    // Applies, pod lists and status writes all fail from now on.
    h.api.fail_paths("/namespaces/kv/");
    h.kvc.metadata.generation = Some(2);
    h.kvc.spec.router.replicas = 3; // forces a re-apply, which fails
    let roles_before = h.nodes.roles().len();
    h.api.put(KVC_PATH, serde_json::to_value(&h.kvc).unwrap());
    let result = reconcile(Arc::new(h.kvc.clone()), h.ctx.clone()).await;
    assert!(result.is_err(), "the failure is reported");
    let renewed: Vec<_> = h.nodes.roles()[roles_before..].to_vec();
    assert!(
        renewed
            .iter()
            .any(|(_, r)| r.role == dataplane::topology::Role::Leader),
        "the leader still got its lease: {renewed:?}"
    );
    let error = result.unwrap_err();
    let kvc = Arc::new(h.kvc.clone());
    let mut last = None;
    for _ in 0..12 {
        last = Some(crate::reconcile::error_policy(
            kvc.clone(),
            &error,
            h.ctx.clone(),
        ));
    }
    assert_eq!(
        last.unwrap(),
        kube::runtime::controller::Action::requeue(crate::reconcile::requeue_after(5000)),
        "after many failures, still retried no later than the next renewal"
    );
}

#[tokio::test]
async fn a_shrunk_in_sync_set_reaches_the_leader_only_once_recorded() {
    // minInSync 1, so a silent follower may leave the in-sync set.
    let mut h = Harness::new("  shards: 1\n  replicasPerShard: 3\n  replication: {minInSync: 1}\n");
    h.start_pods();
    h.round(0).await;
    h.round(1000).await;
    let recorded = h.status().shards[0].in_sync.clone();
    assert_eq!(recorded, ["s0-r0", "s0-r1", "s0-r2"]);

    // Status writes fail from now on, and s0-r2 goes silent for longer than the in-sync
    // timeout: the control core drops it from the set.
    h.api.fail_paths("/kvclusters/demo/status");
    h.nodes.take_down(&address(0, 2));
    let roles_before = h.nodes.roles().len();
    for _ in 0..6 {
        h.clock.fetch_add(1000, std::sync::atomic::Ordering::SeqCst);
        let _ = reconcile(Arc::new(h.kvc.clone()), h.ctx.clone()).await;
    }
    let stored: crate::crd::KvClusterStatus =
        serde_json::from_value(h.api.object(KVC_PATH).unwrap()["status"].clone()).unwrap();
    assert_eq!(
        stored.shards[0].in_sync, recorded,
        "the write really failed"
    );
    // A new operator would promote from the recorded set, so the leader must never be
    // told (and commit writes with) a set the record does not cover: s0-r2 would then be
    // a promotion candidate lacking acknowledged writes.
    for (addr, request) in &h.nodes.roles()[roles_before..] {
        if request.role == dataplane::topology::Role::Leader {
            for member in &recorded {
                assert!(
                    request.in_sync.contains(member),
                    "leader {addr} told in-sync {:?} while the record says {recorded:?}",
                    request.in_sync
                );
            }
        }
    }
}

#[tokio::test]
async fn changing_storage_is_refused_instead_of_failing_every_apply() {
    let mut h = Harness::new("  shards: 2\n  replicasPerShard: 2\n  storage: {size: 1Gi}\n");
    h.start_pods();
    h.round(0).await;
    h.round(1000).await;

    // A StatefulSet's volumeClaimTemplates cannot change: the API server would answer 422
    // to the first shard's apply in every round, so nothing after it (other shards, the
    // router, an image upgrade) would ever be applied again.
    h.kvc.spec.storage.size = k8s_openapi::apimachinery::pkg::api::resource::Quantity("2Gi".into());
    h.kvc.spec.image = "distkv:v2".into();
    h.kvc.metadata.generation = Some(2);
    h.api.clear_requests();
    h.round(1000).await;
    assert!(
        !h.applied().iter().any(|(p, _)| p.contains("statefulsets")),
        "a StatefulSet with other volumeClaimTemplates was applied"
    );
    assert_eq!(
        h.condition("Degraded"),
        ("True".into(), "StorageImmutable".into())
    );
    assert_eq!(h.status().leaders.as_deref(), Some("2/2"));

    // Back to the running size: accepted again, the upgrade goes through.
    h.kvc.spec.storage.size = k8s_openapi::apimachinery::pkg::api::resource::Quantity("1Gi".into());
    h.kvc.metadata.generation = Some(3);
    h.round(1000).await;
    assert_eq!(h.condition("Degraded").0, "False");
    assert!(h.applied().iter().any(|(p, _)| p.contains("statefulsets")));
}

#[tokio::test]
async fn an_image_upgrade_is_applied_to_every_shard_and_the_router() {
    let mut h = Harness::new("  shards: 2\n  replicasPerShard: 2\n  image: distkv:v1\n");
    h.start_pods();
    h.round(0).await;

    h.kvc.spec.image = "distkv:v2".into();
    h.kvc.metadata.generation = Some(2);
    h.round(1000).await;
    for path in [
        "/apis/apps/v1/namespaces/kv/statefulsets/demo-s0",
        "/apis/apps/v1/namespaces/kv/statefulsets/demo-s1",
        "/apis/apps/v1/namespaces/kv/deployments/demo-router",
    ] {
        let object = h.api.object(path).unwrap();
        assert_eq!(
            object["spec"]["template"]["spec"]["containers"][0]["image"], "distkv:v2",
            "{path}"
        );
    }
}

#[tokio::test]
async fn a_kvcluster_being_deleted_is_left_to_the_garbage_collector() {
    let mut h = Harness::new("  shards: 1\n  replicasPerShard: 2\n");
    h.start_pods();
    h.round(0).await;
    h.round(1000).await;

    // `kubectl delete --cascade=foreground`: the KvCluster stays, with a deletion
    // timestamp, until the garbage collector has removed what it owns.
    h.kvc.metadata.deletion_timestamp = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
        k8s_openapi::jiff::Timestamp::now(),
    ));
    h.kvc.metadata.finalizers = Some(vec!["foregroundDeletion".into()]);
    h.kvc.spec.router.replicas = 3; // any change would be re-applied
    h.api.clear_requests();
    let roles_before = h.nodes.roles().len();
    reconcile(Arc::new(h.kvc.clone()), h.ctx.clone())
        .await
        .expect("reconcile succeeds");
    assert!(
        h.applied().is_empty(),
        "objects re-created while being deleted: {:?}",
        h.applied().iter().map(|(p, _)| p).collect::<Vec<_>>()
    );
    assert_eq!(h.nodes.roles().len(), roles_before, "no roles sent");
}

#[tokio::test]
async fn a_deleted_kvcluster_is_forgotten() {
    let mut h = Harness::new("  shards: 1\n  replicasPerShard: 2\n");
    h.start_pods();
    h.round(0).await;
    let key = h.ctx.remembered();
    assert_eq!(key.len(), 1, "one cluster remembered after a round");
    h.ctx.forget_all_but(key.iter().map(String::as_str));
    assert_eq!(h.ctx.remembered(), key, "a live cluster is kept");
    // Deleted in the background: no other reconcile comes for it.
    h.ctx.forget_all_but(["uid-of-another-cluster"]);
    assert!(h.ctx.remembered().is_empty());
}

/// A pod cache filled with `pods` as the pod watch's first list fills it.
fn filled_cache(pods: Vec<Pod>) -> (reflector::Store<Pod>, reflector::store::Writer<Pod>) {
    let (store, mut writer) = reflector::store();
    writer.apply_watcher_event(&watcher::Event::Init);
    for pod in pods {
        writer.apply_watcher_event(&watcher::Event::InitApply(pod));
    }
    writer.apply_watcher_event(&watcher::Event::InitDone);
    (store, writer)
}

#[tokio::test]
async fn pods_are_read_from_the_watch_cache_instead_of_listed_every_round() {
    let mut h = Harness::new("  shards: 2\n  replicasPerShard: 2\n");
    let mut pods = h.ready_pods();
    // Routers of another cluster, and of a same-named cluster in another namespace, share
    // the operator's cache: they are not this cluster's.
    let mut other = test_pods::router(3, true);
    other
        .metadata
        .labels
        .as_mut()
        .unwrap()
        .insert("app.kubernetes.io/instance".into(), "other".into());
    let mut elsewhere = test_pods::router(4, true);
    elsewhere.metadata.namespace = Some("elsewhere".into());
    pods.extend([other, elsewhere]);
    let (cache, _writer) = filled_cache(pods);
    h.ctx = Arc::new(h.context(None).with_pod_cache(cache));
    // The API server lists no pods at all: what the operator sees comes from its cache.
    h.round(0).await;
    h.round(1000).await;

    assert_eq!(h.status().leaders.as_deref(), Some("2/2"));
    assert_eq!(h.status().ready.as_deref(), Some("4/4"));
    let listed: Vec<_> = h
        .api
        .requests()
        .into_iter()
        .filter(|r| r.method == Method::GET && r.path.ends_with("/pods"))
        .collect();
    assert!(listed.is_empty(), "{listed:?}");
    let mut pushed: Vec<String> = h.nodes.pushes().into_iter().map(|(a, _)| a).collect();
    pushed.sort();
    pushed.dedup();
    assert_eq!(pushed, ["10.1.0.1:8081", "10.1.0.2:8081"]);
}

#[tokio::test]
async fn without_a_filled_pod_cache_pods_are_listed() {
    let mut h = Harness::new("  shards: 2\n  replicasPerShard: 2\n");
    h.start_pods();
    // A cache whose first list has not come in: rounds do not wait for it.
    let (cache, _writer) = reflector::store::<Pod>();
    h.ctx = Arc::new(h.context(None).with_pod_cache(cache));
    h.round(0).await;
    h.round(1000).await;

    assert_eq!(h.status().leaders.as_deref(), Some("2/2"));
    assert!(
        h.api
            .requests()
            .iter()
            .any(|r| r.method == Method::GET && r.path.ends_with("/pods"))
    );
}
