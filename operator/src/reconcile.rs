//! The reconcile pipeline: validate → build → apply → observe → control core → act →
//! status and Events. One call handles one KvCluster; the controller calls it on every
//! change and again after a short interval, which renews the leaders' leases.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dataplane::control::{
    self, Action as ControlAction, ClusterSpec, ControlState, Event as ControlEvent,
};
use dataplane::topology::Topology;
use dataplane::wire::NodeStatus;
use futures::future::join_all;
use futures::{FutureExt, StreamExt};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::{EventType, Reporter};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{Controller, WatchStreamExt, watcher};
use kube::{Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tracing::{debug, info, warn};

use crate::builders::{self, ClusterObjects, ClusterRef};
use crate::crd::KvCluster;
use crate::metrics::Metrics;
use crate::nodes::{NodeControl, ReplicaObserver};
use crate::observe::{self, NodePod};
use crate::scale;
use crate::status::{self, StatusInput};
use crate::validate::validate;

/// Field manager of every server-side apply the operator makes.
pub const FIELD_MANAGER: &str = "distkv-operator";
/// Objects are re-applied at least this often even when unchanged, to undo manual drift.
const REAPPLY_EVERY: Duration = Duration::from_secs(60);

/// Why a reconcile round failed; the controller retries with backoff.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A Kubernetes API call failed.
    #[error("kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    /// The resource lacks a name or namespace.
    #[error("KvCluster without {0}")]
    MissingField(&'static str),
    /// Builders refused the resource.
    #[error(transparent)]
    Build(#[from] builders::BuildError),
}

/// Timing of the control loop not set per cluster.
#[derive(Debug, Clone)]
pub struct Tuning {
    /// A follower silent this long leaves the in-sync set (also the rejoin hold-down).
    pub in_sync_timeout_ms: u64,
    /// How far behind a follower may be and still rejoin the in-sync set.
    pub catch_up_lag: u64,
}

impl Default for Tuning {
    fn default() -> Self {
        Tuning {
            in_sync_timeout_ms: 3000,
            catch_up_lag: 64,
        }
    }
}

/// What one cluster remembers between rounds in this process.
#[derive(Default)]
struct Memory {
    /// The control state (authoritative while this replica leads).
    state: Option<ControlState>,
    /// Hash of the objects last applied and when.
    applied: Option<(u64, Instant)>,
    /// Pods last listed, used while the API server cannot be reached.
    pods: Option<Vec<Pod>>,
    /// Consecutive failed rounds, for the error backoff.
    failures: u32,
}

/// Shared by every reconcile call.
pub struct Context {
    /// Kubernetes client.
    pub client: kube::Client,
    /// Reads replica statuses.
    pub observer: Arc<dyn ReplicaObserver>,
    /// Sends roles and topologies.
    pub control: Arc<dyn NodeControl>,
    /// Who publishes Events (controller name and pod).
    pub reporter: Reporter,
    /// Metrics.
    pub metrics: Metrics,
    /// Milliseconds on a monotonic clock of this process.
    pub clock: Arc<dyn Fn() -> u64 + Send + Sync>,
    /// Control loop timing.
    pub tuning: Tuning,
    /// The operator's pods, kept by its pod watch; without it every round lists them.
    pods: Option<Store<Pod>>,
    memory: Mutex<HashMap<String, Memory>>,
}

impl Context {
    /// A context over `client` and the data plane seams `observer` and `control`.
    pub fn new(
        client: kube::Client,
        observer: Arc<dyn ReplicaObserver>,
        control: Arc<dyn NodeControl>,
        reporter: Reporter,
        metrics: Metrics,
    ) -> Self {
        let start = Instant::now();
        Context {
            reporter,
            client,
            observer,
            control,
            metrics,
            clock: Arc::new(move || start.elapsed().as_millis() as u64),
            tuning: Tuning::default(),
            pods: None,
            memory: Mutex::new(HashMap::new()),
        }
    }

    /// Reads pods from `store`, which the operator's pod watch keeps current, instead of
    /// listing them from the API server every round.
    pub fn with_pod_cache(mut self, store: Store<Pod>) -> Self {
        self.pods = Some(store);
        self
    }

    /// Replaces the clock (tests drive time by hand).
    pub fn with_clock(mut self, clock: Arc<dyn Fn() -> u64 + Send + Sync>) -> Self {
        self.clock = clock;
        self
    }

    /// Drops what is remembered of every KvCluster whose uid is not in `live`: a cluster
    /// deleted in the background is never reconciled again to forget itself.
    pub fn forget_all_but<'a>(&self, live: impl IntoIterator<Item = &'a str>) {
        let live: std::collections::HashSet<&str> = live.into_iter().collect();
        self.memory
            .lock()
            .expect("memory lock is never poisoned")
            .retain(|key, _| live.contains(key.as_str()));
    }

    /// The keys of the KvClusters remembered.
    #[cfg(test)]
    pub(crate) fn remembered(&self) -> Vec<String> {
        let all = self.memory.lock().expect("memory lock is never poisoned");
        all.keys().cloned().collect()
    }

    fn memory<R>(&self, key: &str, f: impl FnOnce(&mut Memory) -> R) -> R {
        let mut all = self.memory.lock().expect("memory lock is never poisoned");
        f(all.entry(key.to_string()).or_default())
    }
}

/// The control core's spec for a KvCluster spec.
pub fn cluster_spec(kvc: &KvCluster, tuning: &Tuning) -> ClusterSpec {
    let spec = &kvc.spec;
    ClusterSpec {
        shards: spec.shards,
        replicas_per_shard: spec.replicas_per_shard,
        min_in_sync: spec.replication.min_in_sync,
        mode: spec.replication.mode.into(),
        lease_ms: spec.replication.lease_ms,
        failover_grace_ms: spec.replication.failover_grace_ms,
        in_sync_timeout_ms: tuning.in_sync_timeout_ms,
        catch_up_lag: tuning.catch_up_lag,
    }
}

/// How soon to run again: often enough to renew leases well before they run out.
pub fn requeue_after(lease_ms: u64) -> Duration {
    Duration::from_millis((lease_ms / 3).clamp(500, 2000))
}

/// One reconcile round for `kvc`.
pub async fn reconcile(kvc: Arc<KvCluster>, ctx: Arc<Context>) -> Result<Action, Error> {
    let started = Instant::now();
    let name = kvc
        .metadata
        .name
        .clone()
        .ok_or(Error::MissingField("name"))?;
    let namespace = kvc.namespace().ok_or(Error::MissingField("namespace"))?;
    let key = kvc
        .metadata
        .uid
        .clone()
        .unwrap_or_else(|| format!("{namespace}/{name}"));
    if kvc.metadata.deletion_timestamp.is_some() {
        // Being deleted (foreground cascade): the garbage collector removes what it owns;
        // applying now would re-create objects it just deleted.
        info!(%namespace, %name, "KvCluster is being deleted; leaving it to the garbage collector");
        ctx.memory
            .lock()
            .expect("memory lock is never poisoned")
            .remove(&key);
        return Ok(Action::await_change());
    }
    let mut cspec = cluster_spec(&kvc, &ctx.tuning);

    // Validate. A refused spec applies nothing; a running cluster keeps being driven with
    // the shape it has, so leases are renewed and failover still works.
    let invalid = validate(&kvc).err();
    if let Some(invalid) = &invalid {
        warn!(%namespace, %name, reason = invalid.reason, "refusing spec: {}", invalid.message);
    }

    // The control state: in memory, else from the status, else fresh (only for a valid spec).
    let mut restored = false;
    let mut state = ctx.memory(&key, |m| m.state.clone()).or_else(|| {
        let loaded = kvc
            .status
            .as_ref()
            .and_then(|s| s.control.as_ref())
            .and_then(status::load_control);
        restored = loaded.is_some();
        loaded
    });
    if state.is_none() && invalid.is_none() {
        state = Some(control::initial_state(&cspec));
    }
    if invalid.is_some()
        && let Some(state) = &state
    {
        // Drive the cluster as it runs: its shard count and replica counts.
        cspec.shards = state.topology.shards.len() as u32;
        let running = state
            .topology
            .shards
            .iter()
            .map(|s| s.replicas.len() as u32)
            .max()
            .unwrap_or(1);
        cspec.replicas_per_shard = running.max(1);
        cspec.min_in_sync = cspec.min_in_sync.clamp(1, cspec.replicas_per_shard);
    }

    let mut api_error: Option<Error> = None;
    // What the status records, before this round changes anything: the fallback for
    // shards whose change cannot be recorded (see `hold_back`).
    let mut recorded = state.clone();

    // Build and apply (valid spec only).
    let mut holds = Vec::new();
    if let (None, Some(state)) = (&invalid, state.as_mut()) {
        let desired = kvc.spec.replicas_per_shard;
        holds = scale::holds(state, kvc.spec.shards, desired, cspec.min_in_sync);
        let sizes = scale::statefulset_sizes(&holds, desired);
        if scale::resize(state, &sizes) {
            info!(%namespace, %name, ?sizes, "replica counts changed");
        }
        let cluster = ClusterRef::new(&kvc, &namespace)?;
        let objects = builders::build_all(&cluster, |shard| sizes[shard as usize] as i32);
        // An API failure must not stop lease renewals: remember it, drive the replicas
        // anyway, and report it at the end of the round.
        if let Err(e) = apply_objects(&ctx, &key, &namespace, &objects).await {
            api_error.get_or_insert(e);
        }
    }

    // Observe pods and replicas.
    let pods = cluster_pods(&ctx, &key, &namespace, &name, &mut api_error).await?;
    let nodes = observe::node_pods(&name, &namespace, &pods);
    let statuses = fetch_statuses(ctx.observer.as_ref(), &nodes).await;

    // Decide.
    let mut events = Vec::new();
    let mut actions = Vec::new();
    if let Some(mut current) = state.take() {
        let observations = observe::observations(&nodes, &statuses);
        // The control core counts a lease from this instant; the roles go out after the
        // status write, and `leases_sent` moves the count to then.
        let now_ms = (ctx.clock)();
        if restored {
            // Loaded from the status (new process or new leader): rebase onto our clock.
            current.resume(now_ms);
            if let Some(recorded) = &mut recorded {
                recorded.resume(now_ms);
            }
        }
        let decision = control::decide(&cspec, &current, &observations, now_ms);
        events = decision.events;
        actions = decision.actions;
        state = Some(decision.state);
    }

    // Record the status, control state included, before acting on it: a new operator
    // (restart, or another replica winning the Lease) promotes from the recorded in-sync
    // set and grants epochs above the recorded ones, so a leader must never be told a
    // smaller set, nor a replica a new leadership, that the record does not hold yet.
    let input = StatusInput {
        kvc: &kvc,
        invalid: invalid.as_ref(),
        state: state.as_ref(),
        nodes: &nodes,
        statuses: &statuses,
        ready_routers: observe::ready_routers(&pods),
        holds: &holds,
        control: state.as_ref().map(status::persisted_control),
    };
    let new_status = status::compute(
        &input,
        k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(k8s_openapi::jiff::Timestamp::now()),
    );
    if kvc.status.as_ref() != Some(&new_status)
        && let Err(e) = patch_status(&ctx, &namespace, &name, &new_status).await
    {
        api_error.get_or_insert(e);
        if let (Some(next), Some(recorded)) = (state.as_mut(), recorded.as_ref()) {
            let held = hold_back(recorded, next, &mut actions);
            if !held.is_empty() {
                warn!(%namespace, %name, ?held, "status not recorded; holding back role changes of these shards");
                events.retain(|e| !held.contains(&event_shard(e)));
            }
        }
    }

    // Act. The leader's lease runs from its role's send time, which a slow status write
    // put well after the decision: so must the wait before it is replaced.
    if let Some(state) = state.as_mut() {
        state.leases_sent(&actions, (ctx.clock)());
    }
    execute(&ctx, &namespace, &nodes, &actions).await;
    if let Some(state) = &state {
        // Every round, so a router that started since the last change catches up within
        // one interval; routers ignore a version they already have.
        push_topology(
            &ctx,
            &state.topology,
            &observe::router_admin_addresses(&pods),
        )
        .await;
    }
    ctx.memory(&key, |m| m.state = state.clone());

    // Events for every role change.
    for event in &events {
        publish_event(&ctx, &kvc, event).await;
    }
    // As acted on: a shard held back keeps the leader it had.
    let shards_serving = state.as_ref().map_or(0, |s| {
        s.topology
            .shards
            .iter()
            .filter(|s| s.leader.is_some())
            .count()
    });
    ctx.metrics
        .shards_serving
        .with_label_values(&[namespace.as_str(), name.as_str()])
        .set(shards_serving as i64);
    if let Some(invalid) = &invalid
        && kvc.status.as_ref().and_then(degraded_reason) != Some(invalid.reason)
    {
        publish(
            &ctx,
            &kvc,
            EventType::Warning,
            invalid.reason,
            "Validate",
            &invalid.message,
        )
        .await;
    }

    if let Some(e) = api_error {
        return Err(e);
    }
    ctx.memory(&key, |m| m.failures = 0);
    let outcome = if invalid.is_some() { "invalid" } else { "ok" };
    ctx.metrics.reconciles.with_label_values(&[outcome]).inc();
    ctx.metrics
        .reconcile_seconds
        .with_label_values(&[name.as_str()])
        .observe(started.elapsed().as_secs_f64());
    Ok(Action::requeue(requeue_after(cspec.lease_ms)))
}

/// The labels every pod of the KvCluster `name` carries, whatever its component.
fn cluster_pod_labels(name: &str) -> [(&'static str, &str); 2] {
    [
        ("app.kubernetes.io/name", "distkv"),
        ("app.kubernetes.io/instance", name),
    ]
}

/// The cluster's pods: from the pod cache once it has been filled, else listed, else
/// (API server unreachable) the last ones listed, with the error kept in `api_error`.
async fn cluster_pods(
    ctx: &Context,
    key: &str,
    namespace: &str,
    name: &str,
    api_error: &mut Option<Error>,
) -> Result<Vec<Pod>, Error> {
    if let Some(store) = &ctx.pods {
        // Before its first list the cache is empty, which would read as every pod gone; a
        // round does not wait for it either, since the round also renews leader leases.
        if let Some(Ok(())) = store.wait_until_ready().now_or_never() {
            let ours = |pod: &Pod| {
                let labels = pod.labels();
                pod.namespace().as_deref() == Some(namespace)
                    && cluster_pod_labels(name)
                        .iter()
                        .all(|(k, v)| labels.get(*k).map(String::as_str) == Some(*v))
            };
            return Ok(store
                .state()
                .into_iter()
                .filter(|pod| ours(pod))
                .map(Arc::unwrap_or_clone)
                .collect());
        }
        debug!(%namespace, %name, "the pod cache is not filled yet; listing pods");
    }
    let selector = cluster_pod_labels(name)
        .map(|(k, v)| format!("{k}={v}"))
        .join(",");
    let listed = Api::<Pod>::namespaced(ctx.client.clone(), namespace)
        .list(&ListParams::default().labels(&selector))
        .await;
    match listed {
        Ok(list) => {
            ctx.memory(key, |m| m.pods = Some(list.items.clone()));
            Ok(list.items)
        }
        Err(e) => match ctx.memory(key, |m| m.pods.clone()) {
            Some(pods) => {
                api_error.get_or_insert(e.into());
                Ok(pods)
            }
            None => Err(e.into()),
        },
    }
}

/// Undoes in `next` the changes of every shard that a new operator, reading `recorded`,
/// could contradict unsafely: a new leader or epoch (it could grant the same epoch to
/// another replica) or a member gone from the in-sync set (it could promote that member,
/// which may lack writes the leader acknowledged without it). Those shards go back to
/// their recorded state and their role requests are dropped from `actions`; leaving a
/// leader's lease to run out is the safe direction. Returns the held-back shard ids.
pub fn hold_back(
    recorded: &ControlState,
    next: &mut ControlState,
    actions: &mut Vec<ControlAction>,
) -> Vec<u32> {
    let mut held = Vec::new();
    for shard in &mut next.topology.shards {
        let Some(before) = recorded.topology.shards.iter().find(|s| s.id == shard.id) else {
            continue;
        };
        let ctl_before = recorded.shards.iter().find(|c| c.shard == shard.id);
        let ctl_after = next.shards.iter().find(|c| c.shard == shard.id);
        let in_sync_before = ctl_before.map(|c| c.in_sync.as_slice()).unwrap_or_default();
        let in_sync_after = ctl_after.map(|c| c.in_sync.as_slice()).unwrap_or_default();
        let unsafe_change = before.leader != shard.leader
            || before.epoch != shard.epoch
            || ctl_before.map(|c| c.max_epoch_seen) != ctl_after.map(|c| c.max_epoch_seen)
            || in_sync_before.iter().any(|m| !in_sync_after.contains(m));
        if !unsafe_change {
            continue;
        }
        *shard = before.clone();
        if let (Some(before), Some(after)) = (
            ctl_before,
            next.shards.iter_mut().find(|c| c.shard == shard.id),
        ) {
            *after = before.clone();
        }
        held.push(shard.id);
        actions.retain(|a| match a {
            ControlAction::SendRole { replica, .. } => {
                dataplane::control::parse_replica_id(replica).map(|(s, _)| s) != Some(shard.id)
            }
            _ => true,
        });
    }
    held
}

/// The shard a control event is about.
fn event_shard(event: &ControlEvent) -> u32 {
    match event {
        ControlEvent::Promoted { shard, .. }
        | ControlEvent::Adopted { shard, .. }
        | ControlEvent::Demoted { shard, .. }
        | ControlEvent::InSyncChanged { shard, .. }
        | ControlEvent::ShardUnavailable { shard, .. }
        | ControlEvent::ShardAvailable { shard } => *shard,
    }
}

fn degraded_reason(status: &crate::crd::KvClusterStatus) -> Option<&str> {
    status
        .conditions
        .iter()
        .find(|c| c.type_ == status::DEGRADED && c.status == "True")
        .map(|c| c.reason.as_str())
}

/// After a failed round: retry with exponential backoff, but never later than the next
/// lease renewal is due; a round that failed on the API server still renewed the leases,
/// and the next must too, or every leader would stop serving.
pub fn error_policy(kvc: Arc<KvCluster>, error: &Error, ctx: Arc<Context>) -> Action {
    let key = kvc.metadata.uid.clone().unwrap_or_else(|| kvc.name_any());
    let failures = ctx.memory(&key, |m| {
        m.failures = m.failures.saturating_add(1);
        // Re-apply everything on the next success: the failed round may have half-applied.
        m.applied = None;
        m.failures
    });
    ctx.metrics.reconciles.with_label_values(&["error"]).inc();
    warn!(cluster = %kvc.name_any(), failures, "reconcile failed: {error}");
    Action::requeue(backoff(failures).min(requeue_after(kvc.spec.replication.lease_ms)))
}

/// Delay after `failures` consecutive failures: 500 ms doubling to 60 s.
pub fn backoff(failures: u32) -> Duration {
    let ms = 500u64.saturating_mul(1u64 << failures.saturating_sub(1).min(10));
    Duration::from_millis(ms.min(60_000))
}

async fn apply_objects(
    ctx: &Context,
    key: &str,
    namespace: &str,
    objects: &ClusterObjects,
) -> Result<(), Error> {
    let fingerprint = fingerprint(objects);
    let fresh = ctx.memory(key, |m| {
        m.applied
            .is_some_and(|(hash, at)| hash == fingerprint && at.elapsed() < REAPPLY_EVERY)
    });
    if fresh {
        return Ok(());
    }
    for shard in &objects.shards {
        apply(ctx, namespace, &shard.service).await?;
        apply(ctx, namespace, &shard.statefulset).await?;
        apply(ctx, namespace, &shard.pdb).await?;
    }
    apply(ctx, namespace, &objects.router_deployment).await?;
    apply(ctx, namespace, &objects.router_service).await?;
    apply(ctx, namespace, &objects.router_pdb).await?;
    ctx.memory(key, |m| m.applied = Some((fingerprint, Instant::now())));
    Ok(())
}

fn fingerprint(objects: &ClusterObjects) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    let mut feed = |v: &dyn erased::Json| v.json().hash(&mut hasher);
    for shard in &objects.shards {
        feed(&shard.service);
        feed(&shard.statefulset);
        feed(&shard.pdb);
    }
    feed(&objects.router_deployment);
    feed(&objects.router_service);
    feed(&objects.router_pdb);
    hasher.finish()
}

mod erased {
    //! Serialization behind a trait object, for hashing objects of different kinds.
    pub trait Json {
        fn json(&self) -> String;
    }
    impl<T: serde::Serialize> Json for T {
        fn json(&self) -> String {
            serde_json::to_string(self).unwrap_or_default()
        }
    }
}

async fn apply<K>(ctx: &Context, namespace: &str, object: &K) -> Result<(), Error>
where
    K: Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
        + Serialize
        + DeserializeOwned
        + Clone
        + std::fmt::Debug,
{
    let name = object
        .meta()
        .name
        .clone()
        .ok_or(Error::MissingField("object name"))?;
    let api: Api<K> = Api::namespaced(ctx.client.clone(), namespace);
    api.patch(
        &name,
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(object),
    )
    .await?;
    debug!(kind = %K::kind(&()), %name, "applied");
    Ok(())
}

async fn fetch_statuses(
    observer: &dyn ReplicaObserver,
    nodes: &[NodePod],
) -> HashMap<String, NodeStatus> {
    let calls = nodes.iter().map(|n| async move {
        match observer.status(&n.address).await {
            Ok(status) => Some((n.replica.clone(), status)),
            Err(e) => {
                debug!(replica = %n.replica, "status unavailable: {e}");
                None
            }
        }
    });
    join_all(calls).await.into_iter().flatten().collect()
}

async fn execute(ctx: &Context, namespace: &str, nodes: &[NodePod], actions: &[ControlAction]) {
    let roles = actions.iter().filter_map(|a| match a {
        ControlAction::SendRole {
            replica,
            address,
            request,
        } => Some(async move {
            if let Err(e) = ctx.control.set_role(address, request).await {
                warn!(%replica, "role not delivered: {e}");
            }
        }),
        _ => None,
    });
    join_all(roles).await;
    let mut restarted = HashSet::new();
    for action in actions {
        if let ControlAction::Restart { replica } = action {
            let Some(pod) = nodes.iter().find(|n| &n.replica == replica) else {
                continue;
            };
            if pod.terminating || !restarted.insert(pod.pod.clone()) {
                continue;
            }
            info!(%replica, pod = %pod.pod, "restarting finished replica pod");
            let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), namespace);
            if let Err(e) = pods.delete(&pod.pod, &DeleteParams::default()).await {
                warn!(pod = %pod.pod, "restart failed: {e}");
            }
        }
    }
    // PublishTopology is served by the push every round makes after the decision.
}

async fn push_topology(ctx: &Context, topology: &Topology, routers: &[String]) {
    let pushes = routers.iter().map(|addr| async move {
        if let Err(e) = ctx.control.push_topology(addr, topology).await {
            debug!(router = %addr, "topology push failed: {e}");
        }
    });
    join_all(pushes).await;
}

async fn patch_status(
    ctx: &Context,
    namespace: &str,
    name: &str,
    status: &crate::crd::KvClusterStatus,
) -> Result<(), Error> {
    let api: Api<KvCluster> = Api::namespaced(ctx.client.clone(), namespace);
    let body = serde_json::json!({
        "apiVersion": KvCluster::api_version(&()),
        "kind": KvCluster::kind(&()),
        "status": status,
    });
    api.patch_status(
        name,
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&body),
    )
    .await?;
    Ok(())
}

/// Kubernetes Event reason and type for a control core event.
pub fn event_reason(event: &ControlEvent) -> (EventType, &'static str) {
    match event {
        ControlEvent::Promoted { previous: None, .. } => (EventType::Normal, "LeaderElected"),
        ControlEvent::Promoted { .. } => (EventType::Normal, "LeaderPromoted"),
        ControlEvent::Adopted { .. } => (EventType::Normal, "LeaderAdopted"),
        ControlEvent::Demoted { .. } => (EventType::Warning, "LeaderDemoted"),
        ControlEvent::InSyncChanged { .. } => (EventType::Normal, "InSyncChanged"),
        ControlEvent::ShardUnavailable { .. } => (EventType::Warning, "ShardUnavailable"),
        ControlEvent::ShardAvailable { .. } => (EventType::Normal, "ShardAvailable"),
    }
}

async fn publish_event(ctx: &Context, kvc: &KvCluster, event: &ControlEvent) {
    let (type_, reason) = event_reason(event);
    info!(cluster = %kvc.name_any(), reason, "{event}");
    ctx.metrics
        .control_events
        .with_label_values(&[reason])
        .inc();
    publish(ctx, kvc, type_, reason, "Control", &event.to_string()).await;
}

/// Creates one `events.k8s.io/v1` Event about `kvc`.
///
/// Each role change gets its own Event rather than going through kube's deduplicating
/// recorder, which folds events with the same reason into a series that keeps the first
/// message: a second failover of a shard would then show the first one's leader.
async fn publish(
    ctx: &Context,
    kvc: &KvCluster,
    type_: EventType,
    reason: &str,
    action: &str,
    note: &str,
) {
    use k8s_openapi::api::events::v1::Event;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
    let now = k8s_openapi::jiff::Timestamp::now();
    let namespace = kvc.namespace().unwrap_or_else(|| "default".into());
    let event = Event {
        metadata: ObjectMeta {
            name: Some(format!("{}.{:x}", kvc.name_any(), now.as_nanosecond())),
            namespace: Some(namespace.clone()),
            ..ObjectMeta::default()
        },
        event_time: Some(MicroTime(now)),
        type_: Some(match type_ {
            EventType::Normal => "Normal".into(),
            EventType::Warning => "Warning".into(),
        }),
        reason: Some(reason.to_string()),
        action: Some(action.to_string()),
        note: Some(note.chars().take(1000).collect()),
        regarding: Some(kvc.object_ref(&())),
        reporting_controller: Some(ctx.reporter.controller.clone()),
        reporting_instance: Some(
            ctx.reporter
                .instance
                .clone()
                .unwrap_or_else(|| ctx.reporter.controller.clone()),
        ),
        ..Event::default()
    };
    let api: Api<Event> = Api::namespaced(ctx.client.clone(), &namespace);
    if let Err(e) = api.create(&kube::api::PostParams::default(), &event).await {
        warn!("event not recorded: {e}");
    }
}

/// Runs the controller until the process ends: KvClusters and their pods trigger
/// reconciles. The operator's own status writes trigger one more round, which finds the
/// status unchanged (it holds nothing clock-dependent) and writes nothing.
pub async fn run(ctx: Context, namespace: Option<String>) {
    let client = ctx.client.clone();
    let (clusters, pods): (Api<KvCluster>, Api<Pod>) = match &namespace {
        Some(ns) => (
            Api::namespaced(client.clone(), ns),
            Api::namespaced(client, ns),
        ),
        None => (Api::all(client.clone()), Api::all(client)),
    };
    let pod_config = watcher::Config::default()
        .labels("app.kubernetes.io/name=distkv,app.kubernetes.io/managed-by=distkv-operator");
    // One pod watch both triggers rounds and keeps the cache every round reads pods from.
    let (pod_cache, pod_writer) = reflector::store();
    let pod_events = reflector::reflector(pod_writer, watcher(pods, pod_config))
        .default_backoff()
        .touched_objects();
    let ctx = Arc::new(ctx.with_pod_cache(pod_cache));
    let controller = Controller::new(clusters, watcher::Config::default().any_semantic());
    let known = controller.store();
    let forget = ctx.clone();
    controller
        .watches_stream(pod_events, |pod: Pod| {
            let ns = pod.namespace()?;
            let instance = pod.labels().get("app.kubernetes.io/instance")?.clone();
            Some(ObjectRef::<KvCluster>::new(&instance).within(&ns))
        })
        .shutdown_on_signal()
        .run(reconcile, error_policy, ctx)
        .for_each(|result| {
            match result {
                // A pod event for a KvCluster that is gone: it was deleted.
                Err(kube::runtime::controller::Error::ObjectNotFound(_)) => {
                    let live: Vec<String> = known.state().iter().filter_map(|k| k.uid()).collect();
                    forget.forget_all_but(live.iter().map(String::as_str));
                }
                Err(e) => debug!("reconcile dispatch: {e}"),
                Ok(_) => {}
            }
            std::future::ready(())
        })
        .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requeue_renews_leases_in_time() {
        assert_eq!(requeue_after(5000), Duration::from_millis(1666));
        assert_eq!(requeue_after(60000), Duration::from_secs(2));
        assert_eq!(requeue_after(1000), Duration::from_millis(500));
    }

    #[test]
    fn the_kubernetes_docs_list_every_event_reason() {
        use dataplane::control::Unavailable;
        let docs = include_str!("../../docs/kubernetes.md");
        let shard = 0;
        let replica = || "s0-r0".to_string();
        // One of each variant; event_reason's exhaustive match names any new one.
        let control = [
            ControlEvent::Promoted {
                shard,
                replica: replica(),
                epoch: 1,
                previous: None,
            },
            ControlEvent::Promoted {
                shard,
                replica: replica(),
                epoch: 2,
                previous: Some("s0-r1".into()),
            },
            ControlEvent::Adopted {
                shard,
                replica: replica(),
                epoch: 1,
            },
            ControlEvent::Demoted {
                shard,
                replica: replica(),
                stale_epoch: 1,
                epoch: 2,
            },
            ControlEvent::InSyncChanged {
                shard,
                in_sync: vec![replica()],
            },
            ControlEvent::ShardUnavailable {
                shard,
                reason: Unavailable::NoInSyncReplica,
            },
            ControlEvent::ShardAvailable { shard },
        ];
        let reasons = control.iter().map(|e| event_reason(e).1);
        // A refused spec is announced with its Degraded reason.
        let refused = [
            "InvalidSpec",
            "InvalidName",
            "ReshardingUnsupported",
            "StorageImmutable",
        ];
        for reason in reasons.chain(refused) {
            assert!(
                docs.contains(&format!("`{reason}`")),
                "docs/kubernetes.md does not list the {reason} Event"
            );
        }
    }

    #[test]
    fn backoff_doubles_to_a_minute() {
        assert_eq!(backoff(1), Duration::from_millis(500));
        assert_eq!(backoff(2), Duration::from_secs(1));
        assert_eq!(backoff(4), Duration::from_secs(4));
        assert_eq!(backoff(30), Duration::from_secs(60));
    }
}
