//! One replica (`distkv node`): storage, its role in the shard, the client API for its
//! own slots, and the internal API the leader and the control plane use.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::extract::{DefaultBodyLimit, Query, Request, State};
use axum::http::{HeaderMap, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use bytes::Bytes;
use futures_util::StreamExt;
use serde::Deserialize;
use tokio::task::JoinHandle;

use crate::api::{self, ApiError, Limits, PutResult};
use crate::budget::BodyBudget;
use crate::client::HttpClient;
use crate::metrics::{self, Metrics};
use crate::replication::{
    self, Leadership, ReplicateRequest, SNAPSHOT_STALL, StreamConfig, TransferLog, Uncommitted,
};
use crate::slots::{Slot, slot_for};
use crate::storage::{Condition, Op, Position, SnapshotReader, Store, StoreError};
use crate::topology::Role;
use crate::wire::{NodeStatus, Peer, RoleRequest};

/// Settings of a node.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// Replica id, e.g. `s0-r1`.
    pub id: String,
    /// Data directory.
    pub data_dir: PathBuf,
    /// Key and value limits.
    pub limits: Limits,
    /// How the leader streams its log.
    pub stream: StreamConfig,
    /// The newest log entries kept however far every in-sync member has got (the log is
    /// trimmed only below what they all hold), for followers that restart; a follower
    /// further behind gets a snapshot.
    pub log_retain: u64,
    /// How long a sync write waits for the in-sync set before answering 503.
    pub replication_timeout: Duration,
    /// How long an HTTP connection may go without a byte moving before it is closed.
    pub idle_timeout: Duration,
}

/// Default for `--log-retain`: log entries kept for followers that come back.
pub const DEFAULT_LOG_RETAIN: u64 = 10_000;

impl NodeConfig {
    /// Defaults for a node with this id and data directory.
    pub fn new(id: impl Into<String>, data_dir: impl Into<PathBuf>) -> Self {
        NodeConfig {
            id: id.into(),
            data_dir: data_dir.into(),
            limits: Limits::default(),
            stream: StreamConfig::default(),
            log_retain: DEFAULT_LOG_RETAIN,
            replication_timeout: Duration::from_secs(5),
            idle_timeout: crate::idle::DEFAULT_IDLE,
        }
    }
}

/// The role the control plane gave this replica, and what comes with it.
struct Assignment {
    role: Role,
    epoch: u64,
    leader: Option<String>,
    lease_until: Option<Instant>,
    slot_ranges: Vec<(Slot, Slot)>,
    min_in_sync: u32,
    leadership: Option<Arc<Leadership>>,
    streams: HashMap<String, (String, JoinHandle<()>)>,
    /// Latest control round whose role request was taken at `epoch`.
    role_round: u64,
}

impl Assignment {
    /// Refuses a slot outside this shard's ranges (none known yet: any slot).
    fn check_serves(&self, slot: Slot) -> Result<(), ApiError> {
        let ranges = &self.slot_ranges;
        if ranges.is_empty() || ranges.iter().any(|&(x, y)| x <= slot && slot <= y) {
            return Ok(());
        }
        Err(ApiError::new(
            StatusCode::MISDIRECTED_REQUEST,
            "wrong_shard",
            format!("slot {slot} is not served by this shard"),
        ))
    }

    fn stop_streams(&mut self) {
        for (_, (_, task)) in self.streams.drain() {
            task.abort();
        }
    }

    /// Stops leading: the streams stop, and writes waiting for this leadership's commit
    /// point are answered at once.
    fn end_leadership(&mut self) {
        self.stop_streams();
        if let Some(l) = self.leadership.take() {
            l.end();
        }
        self.lease_until = None;
    }
}

/// A running replica.
pub struct Node {
    cfg: NodeConfig,
    store: Store,
    http: HttpClient,
    /// Connections to the followers this replica streams to while it leads.
    links: Arc<crate::link::Links>,
    metrics: Arc<Metrics>,
    /// Room for the request bodies this replica holds at once.
    bodies: BodyBudget,
    assignment: RwLock<Assignment>,
    follower_commit: AtomicU64,
    snapshots_installed: AtomicU64,
}

/// What a leader-side request may do, captured under the role lock.
struct LeaderView {
    epoch: u64,
    leadership: Arc<Leadership>,
    min_in_sync: usize,
}

impl Node {
    /// Opens the store and starts as `Unassigned` at the persisted epoch.
    pub fn open(cfg: NodeConfig) -> Result<Arc<Node>, StoreError> {
        let metrics = Metrics::new(crate::metrics::Exporter::Node);
        let store = Store::open(&cfg.data_dir, metrics.clone())?;
        let epoch = store.state().epoch;
        tracing::info!(id = %cfg.id, epoch, last = ?store.state().last, "replica opened");
        let bodies = cfg.limits.body_budget();
        metrics.watch_bodies(bodies.clone());
        let node = Arc::new(Node {
            cfg,
            store,
            http: HttpClient::new(),
            links: Arc::default(),
            metrics,
            bodies,
            assignment: RwLock::new(Assignment {
                role: Role::Unassigned,
                epoch,
                leader: None,
                lease_until: None,
                slot_ranges: Vec::new(),
                min_in_sync: 1,
                leadership: None,
                streams: HashMap::new(),
                role_round: 0,
            }),
            follower_commit: AtomicU64::new(0),
            snapshots_installed: AtomicU64::new(0),
        });
        tokio::spawn(maintain(Arc::downgrade(&node)));
        Ok(node)
    }

    /// The store (for tests and tools).
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// The HTTP app of this node.
    pub fn app(self: &Arc<Self>) -> Router {
        let kv = get(v1_get).put(v1_put).delete(v1_delete);
        // A leader's batch may exceed the body limit extractors apply by default (2 MiB).
        let batch_limit = self.cfg.stream.max_request_bytes(&self.cfg.limits);
        let app = Router::new()
            .route("/v1/kv/{*key}", kv)
            .route("/v1/kv/", api::empty_key_route())
            .route("/put", post(demo_put))
            .route("/get", get(demo_get))
            .route("/delete", api::demo_delete_route(demo_delete))
            .route("/internal/role", post(set_role))
            .route("/internal/status", get(status))
            .route(
                "/internal/replicate",
                post(replicate).layer(DefaultBodyLimit::max(batch_limit)),
            )
            .route("/internal/snapshot", post(install_snapshot))
            .route("/healthz", get(healthz))
            .route("/readyz", get(readyz))
            .route("/openapi.json", get(crate::openapi::serve))
            .with_state(self.clone());
        metrics::instrument(app, &self.metrics)
    }

    /// Checks that this replica leads its shard right now and may serve `slot`.
    fn leader_view(&self, slot: Slot) -> Result<LeaderView, ApiError> {
        let a = self.assignment.read().unwrap();
        a.check_serves(slot)?;
        let leadership = match (&a.role, &a.leadership) {
            (Role::Leader, Some(l)) if l.deposed().is_none() => l.clone(),
            _ => return Err(ApiError::not_leader(a.epoch, a.leader.clone())),
        };
        if a.lease_until.is_none_or(|t| Instant::now() >= t) {
            return Err(ApiError::unavailable(
                "lease_expired",
                "the leader's lease has run out; waiting for the control plane",
            ));
        }
        Ok(LeaderView {
            epoch: a.epoch,
            leadership,
            min_in_sync: a.min_in_sync as usize,
        })
    }

    /// Checks that this replica may serve a stale read of `slot`.
    fn can_read_stale(&self, slot: Slot) -> Result<(), ApiError> {
        let a = self.assignment.read().unwrap();
        match a.role {
            Role::Unassigned => Err(ApiError::unavailable(
                "not_ready",
                "this replica has not been assigned a role yet",
            )),
            // Another shard's key is absent here: a 404 would be a wrong answer.
            _ => a.check_serves(slot),
        }
    }

    /// Writes through the log; in sync mode waits until every in-sync member holds it.
    async fn write(
        &self,
        key: Bytes,
        op: Op,
        cond: Condition,
    ) -> Result<crate::storage::WriteOutcome, ApiError> {
        let slot = slot_for(&key);
        let view = self.leader_view(slot)?;
        let min = view.min_in_sync;
        let in_sync = view.leadership.in_sync_len();
        if in_sync < min {
            return Err(ApiError::unavailable(
                "not_enough_replicas",
                format!("{in_sync} replicas in sync; at least {min} are required to take writes"),
            ));
        }
        let outcome = match self.store.write(view.epoch, slot, key, op, cond).await {
            Ok(outcome) => outcome,
            // A failed precondition (412) or a missing key (404) tells what the key holds;
            // if that is a write the in-sync set has not confirmed, a failover can undo it,
            // and the answer would show a state that never was.
            Err(
                e @ (StoreError::PreconditionFailed { as_of } | StoreError::NotFound { as_of }),
            ) => {
                self.wait_settled(
                    &view.leadership,
                    as_of,
                    "the key's latest state is not yet on every in-sync replica, so the \
                     condition cannot be decided on it yet; nothing was written; retry",
                )
                .await?;
                return Err(store_error(e));
            }
            Err(e) => return Err(store_error(e)),
        };
        view.leadership.recompute();
        self.wait_committed(&view.leadership, outcome.version.seq)
            .await?;
        Ok(outcome)
    }

    async fn wait_committed(&self, leadership: &Leadership, seq: u64) -> Result<(), ApiError> {
        let waited = leadership
            .wait_committed(seq, self.cfg.replication_timeout)
            .await;
        match waited {
            Ok(()) => Ok(()),
            Err(Uncommitted::TimedOut) => Err(ApiError::unavailable(
                "replication_timeout",
                "the write is durable on the leader but not yet on every in-sync replica; \
                 its outcome is unknown until the control plane settles the in-sync set",
            )),
            Err(Uncommitted::Ended) => Err(ApiError::unavailable(
                "leadership_ended",
                "the write is durable on the replica that took it, which stopped leading \
                 before every in-sync replica confirmed it; its outcome is unknown until \
                 the new leader settles it",
            )),
        }
    }

    /// [`Node::wait_committed`] for an answer that tells what a key holds (a read, or a
    /// refused condition) as of `seq`: 503 `value_not_committed`, saying `why`, if the
    /// in-sync replicas do not confirm it in time.
    async fn wait_settled(
        &self,
        leadership: &Leadership,
        seq: u64,
        why: &'static str,
    ) -> Result<(), ApiError> {
        self.wait_committed(leadership, seq)
            .await
            .map_err(|_| ApiError::unavailable("value_not_committed", why))
    }

    /// Reads a key. Leader reads see only committed data; stale reads see what is here.
    async fn read(&self, key: &[u8], stale: bool) -> Result<Option<(Position, Bytes)>, ApiError> {
        let slot = slot_for(key);
        if stale {
            self.can_read_stale(slot)?;
            return self.store.get(slot, key).map_err(store_error);
        }
        let view = self.leader_view(slot)?;
        // A value not yet held by every in-sync replica could still vanish in a failover,
        // and so could the delete that left a key absent; wait until it cannot.
        let (found, seq) = self.store.get_settled_at(slot, key).map_err(store_error)?;
        self.wait_settled(
            &view.leadership,
            seq,
            "the key's latest value is not yet on every in-sync replica, so reading it could \
             show a write that a failover undoes; retry, or read with ?consistency=stale",
        )
        .await?;
        Ok(found)
    }

    /// This replica's status, as `GET /internal/status` reports it.
    pub fn status(&self, verify: bool) -> Result<NodeStatus, StoreError> {
        // Positions are always the durable ones. While writes go on, a scan may include a
        // batch whose fsync is still under way; compare replicas' scans when they are quiet.
        let st = self.store.state();
        let (keys, digest) = if verify {
            let scan = self.store.scan_digest()?;
            (scan.keys, scan.digest)
        } else {
            (st.keys, st.digest)
        };
        let a = self.assignment.read().unwrap();
        let (commit_seq, in_sync, follower_acks) = match &a.leadership {
            Some(l) => (l.commit(), l.confirmed_in_sync(), l.follower_acks()),
            None => (
                self.follower_commit.load(Ordering::Relaxed),
                Vec::new(),
                Vec::new(),
            ),
        };
        let lease_remaining_ms = match (a.role, a.lease_until) {
            (Role::Leader, Some(t)) => {
                t.saturating_duration_since(Instant::now()).as_millis() as u64
            }
            _ => 0,
        };
        Ok(NodeStatus {
            id: self.cfg.id.clone(),
            role: a.role,
            epoch: st.epoch.max(a.epoch),
            last_epoch: st.last.epoch,
            last_seq: st.last.seq,
            commit_seq,
            in_sync,
            lease_remaining_ms,
            keys,
            digest: format!("{digest:032x}"),
            log_start_seq: st.base.seq + 1,
            snapshots_installed: self.snapshots_installed.load(Ordering::Relaxed),
            follower_acks,
            role_round: a.role_round,
        })
    }

    /// Applies a role assignment from the control plane.
    async fn assign(
        self: &Arc<Self>,
        req: RoleRequest,
        age_ms: u64,
    ) -> Result<NodeStatus, ApiError> {
        if req.role == Role::Leader && req.lease_ms == 0 {
            return Err(ApiError::bad_request(
                "invalid_role",
                "a leader needs lease_ms > 0",
            ));
        }
        let current = self.store.state().epoch;
        if req.epoch < current {
            return Err(ApiError::stale_epoch(req.epoch, current));
        }
        if req.epoch > current {
            self.store
                .raise_epoch(req.epoch)
                .await
                .map_err(store_error)?;
        }
        {
            let mut a = self.assignment.write().unwrap();
            if req.epoch < a.epoch {
                return Err(ApiError::stale_epoch(req.epoch, a.epoch));
            }
            if req.epoch == a.epoch && req.round != 0 && req.round < a.role_round {
                return Err(ApiError::new(
                    StatusCode::CONFLICT,
                    "stale_round",
                    format!(
                        "this role request is from control round {}; round {} has been taken",
                        req.round, a.role_round
                    ),
                ));
            }
            a.role_round = if req.epoch > a.epoch {
                req.round
            } else {
                a.role_round.max(req.round)
            };
            let same_term = a.epoch == req.epoch && a.role == req.role;
            a.epoch = req.epoch;
            a.role = req.role;
            a.slot_ranges = req.slot_ranges.clone();
            a.min_in_sync = req.min_in_sync.max(1);
            match req.role {
                Role::Leader => {
                    a.leader = None;
                    let reuse =
                        same_term && a.leadership.as_ref().is_some_and(|l| l.mode() == req.mode);
                    if !reuse {
                        a.end_leadership();
                        tracing::info!(id = %self.cfg.id, epoch = req.epoch, "leading");
                        self.metrics.promotions.inc();
                        a.leadership = Some(Leadership::new(
                            self.cfg.id.clone(),
                            req.epoch,
                            req.mode,
                            req.in_sync.clone(),
                            self.store.clone(),
                        ));
                    }
                    let left = req.lease_ms.saturating_sub(age_ms);
                    if left == 0 {
                        tracing::warn!(id = %self.cfg.id, age_ms, "role request arrived after its lease ran out");
                    }
                    a.lease_until = Some(Instant::now() + Duration::from_millis(left));
                    let leadership = a.leadership.clone().expect("set above");
                    if reuse && leadership.in_sync() != req.in_sync {
                        tracing::info!(id = %self.cfg.id, in_sync = ?req.in_sync, "in-sync set changed");
                        self.metrics.in_sync_changes.inc();
                    }
                    leadership.set_in_sync(req.in_sync.clone());
                    self.sync_streams(&mut a, &leadership, &req.peers);
                }
                Role::Follower | Role::Unassigned => {
                    if a.leadership.is_some() {
                        tracing::info!(id = %self.cfg.id, epoch = req.epoch, "stepping down");
                    }
                    a.end_leadership();
                    a.leader = req.leader.clone();
                }
            }
        }
        self.metrics.epoch.set(req.epoch as i64);
        self.status(false).map_err(store_error)
    }

    /// Runs one streaming task per peer, restarting those whose address changed.
    fn sync_streams(&self, a: &mut Assignment, leadership: &Arc<Leadership>, peers: &[Peer]) {
        a.streams.retain(|id, (addr, task)| {
            let keep =
                peers.iter().any(|p| &p.id == id && &p.address == addr) && !task.is_finished();
            if !keep {
                task.abort();
            }
            if !peers.iter().any(|p| &p.id == id) {
                leadership.forget(id);
            }
            keep
        });
        for peer in peers {
            if peer.id == self.cfg.id || a.streams.contains_key(&peer.id) {
                continue;
            }
            let task = tokio::spawn(replication::stream_to_follower(
                leadership.clone(),
                peer.clone(),
                self.http.clone(),
                self.links.clone(),
                self.cfg.stream.clone(),
            ));
            a.streams
                .insert(peer.id.clone(), (peer.address.clone(), task));
        }
    }

    /// A replicate request from a leader.
    async fn on_replicate(&self, req: ReplicateRequest) -> Result<Bytes, ApiError> {
        let ReplicateRequest {
            epoch,
            prev,
            commit,
            leader_last,
            entries,
        } = req;
        // Refused before the epoch is looked at: a malformed batch changes nothing.
        if let Some((place, bad)) = replication::out_of_place(prev, epoch, &entries) {
            return Err(ApiError::bad_request(
                "invalid_batch",
                format!(
                    "entry {}-{} is not entry {place} of epoch {epoch} or below, \
                     the next after {}",
                    bad.epoch, bad.seq, prev.seq
                ),
            ));
        }
        self.observe_epoch(epoch);
        let sent = entries.len() as u64;
        let outcome = self
            .store
            .append(epoch, prev, entries, leader_last)
            .await
            .map_err(store_error)?;
        if let Some(c) = replication::known_committed(&outcome, prev, sent, commit) {
            self.follower_commit.fetch_max(c, Ordering::Relaxed);
        }
        Ok(Bytes::from(
            postcard::to_stdvec(&outcome).expect("outcome encodes"),
        ))
    }

    /// Steps down when a request shows a newer epoch than this replica's role.
    fn observe_epoch(&self, epoch: u64) {
        let mut a = self.assignment.write().unwrap();
        if epoch > a.epoch {
            if a.role == Role::Leader {
                tracing::warn!(id = %self.cfg.id, epoch, "a newer leader exists; stepping down");
            }
            a.end_leadership();
            a.epoch = epoch;
            a.role_round = 0;
            a.role = Role::Follower;
            a.leader = None;
        }
    }

    /// Trims the log: below what every in-sync member holds and what followers being
    /// rebuilt by snapshot need (leader) or what is committed (follower), keeping
    /// `log_retain` entries for followers that come back.
    fn trim_log(&self) {
        let st = self.store.state();
        let safe = match &self.assignment.read().unwrap().leadership {
            Some(l) => l.trim_floor(),
            None => self.follower_commit.load(Ordering::Relaxed),
        };
        let upto = safe.min(st.last.seq.saturating_sub(self.cfg.log_retain));
        // Trim in steps, not on every write.
        if upto > st.base.seq + 256.min(self.cfg.log_retain.max(1)) {
            self.store.trim(upto);
        }
    }
}

/// Background upkeep: metrics gauges and log trimming.
async fn maintain(node: std::sync::Weak<Node>) {
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    loop {
        tick.tick().await;
        let Some(node) = node.upgrade() else { return };
        let st = node.store.state();
        node.metrics.keys.set(st.keys as i64);
        node.metrics.applied_seq.set(st.last.seq as i64);
        let commit = match &node.assignment.read().unwrap().leadership {
            Some(l) => l.commit(),
            None => node.follower_commit.load(Ordering::Relaxed),
        };
        node.metrics.commit_seq.set(commit as i64);
        node.trim_log();
    }
}

fn store_error(e: StoreError) -> ApiError {
    match e {
        StoreError::PreconditionFailed { .. } => ApiError::precondition_failed(),
        StoreError::NotFound { .. } => ApiError::key_not_found(),
        StoreError::StaleEpoch { request, current } => ApiError::stale_epoch(request, current),
        StoreError::BadSnapshot(m) => ApiError::bad_request("invalid_snapshot", m),
        e @ StoreError::Installing => ApiError::unavailable("snapshot_installing", e.to_string()),
        StoreError::Closed => {
            ApiError::unavailable("shutting_down", "the replica is shutting down")
        }
        StoreError::Io(m) => ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "storage_error", m),
    }
}

type NodeState = State<Arc<Node>>;

/// `GET /v1/kv/{key}`: the raw value with its version as `ETag`.
#[utoipa::path(get, path = "/v1/kv/{key}", tag = "kv",
    params(("key" = String, Path, description = "The key (percent-encoded; may contain /)"),
           ("consistency" = Option<String>, Query, description = "`stale` lets a follower answer"),
           ("If-None-Match" = Option<String>, Header, description = "ETags the client holds: 304 if one is current")),
    responses((status = 200, description = "The value", content_type = "application/octet-stream"),
              (status = 304, description = "The client's copy is current"),
              (status = 400, description = "Empty key", body = api::ErrorBody),
              (status = 404, description = "No such key", body = api::ErrorBody),
              (status = 413, description = "Key too large", body = api::ErrorBody),
              (status = 503, description = "No leader, lease expired, or the value is not yet confirmed", body = api::ErrorBody),
              (status = 504, description = "The replica did not answer in time", body = api::ErrorBody)))]
pub async fn v1_get(State(node): NodeState, req: Request) -> Result<Response, ApiError> {
    // Taken whole: extractors would copy the URI and the headers of every read.
    let (uri, headers) = (req.uri(), req.headers());
    let key = api::key_from_path(uri.path(), &node.cfg.limits)?;
    match node.read(&key, api::wants_stale(uri.query())?).await? {
        Some((version, _)) if api::not_modified(headers, version) => {
            Ok(api::not_modified_response(version))
        }
        Some((version, value)) => Ok(api::value_response(version, value)),
        None => Err(ApiError::key_not_found()),
    }
}

/// `PUT /v1/kv/{key}`: stores the raw body; `If-Match` / `If-None-Match: *` make it conditional.
#[utoipa::path(put, path = "/v1/kv/{key}", tag = "kv",
    params(("key" = String, Path, description = "The key"),
           ("If-Match" = Option<String>, Header, description = "Write only if the version matches"),
           ("If-None-Match" = Option<String>, Header, description = "`*`: create only")),
    request_body(content = Vec<u8>, content_type = "application/octet-stream"),
    responses((status = 201, description = "Created", body = PutResult),
              (status = 200, description = "Overwritten", body = PutResult),
              (status = 400, description = "Bad key or precondition", body = api::ErrorBody),
              (status = 412, description = "Precondition failed", body = api::ErrorBody),
              (status = 413, description = "Key or value too large", body = api::ErrorBody),
              (status = 503, description = "Not enough in-sync replicas, the outcome is unknown, the state a condition failed on is not yet confirmed, or request bodies hold all the room for them", body = api::ErrorBody),
              (status = 504, description = "The replica did not answer in time; the outcome is unknown", body = api::ErrorBody)))]
pub async fn v1_put(
    State(node): NodeState,
    uri: Uri,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    // The body first: an answer that leaves it unread costs the client its connection.
    let limit = node.cfg.limits.max_value_bytes;
    let (value, _held) = api::read_body(&headers, body, limit, "value", &node.bodies).await?;
    let key = api::key_from_path(uri.path(), &node.cfg.limits)?;
    let cond = api::condition(&headers)?;
    let out = node.write(key.clone(), Op::Put(value), cond).await?;
    let status = if out.created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    let body = PutResult {
        key: api::key_text(&key),
        version: format!("{}-{}", out.version.epoch, out.version.seq),
        created: out.created,
    };
    Ok((
        status,
        [(axum::http::header::ETAG, api::etag_header(out.version))],
        axum::Json(body),
    )
        .into_response())
}

/// `DELETE /v1/kv/{key}`: 204, or 404 when missing; `If-Match` makes it conditional.
#[utoipa::path(delete, path = "/v1/kv/{key}", tag = "kv",
    params(("key" = String, Path, description = "The key"),
           ("If-Match" = Option<String>, Header, description = "Delete only if the version matches")),
    responses((status = 204, description = "Deleted"),
              (status = 400, description = "Bad key or precondition", body = api::ErrorBody),
              (status = 404, description = "No such key", body = api::ErrorBody),
              (status = 412, description = "Precondition failed", body = api::ErrorBody),
              (status = 413, description = "Key too large", body = api::ErrorBody),
              (status = 503, description = "Not enough in-sync replicas, the outcome is unknown, or the state a condition failed on is not yet confirmed", body = api::ErrorBody),
              (status = 504, description = "The replica did not answer in time; the outcome is unknown", body = api::ErrorBody)))]
pub async fn v1_delete(
    State(node): NodeState,
    uri: Uri,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let key = api::key_from_path(uri.path(), &node.cfg.limits)?;
    let cond = api::condition(&headers)?;
    if cond == Condition::IfAbsent {
        return Err(ApiError::bad_request(
            "invalid_precondition",
            "If-None-Match does not apply to DELETE",
        ));
    }
    node.write(key, Op::Delete, cond).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// Demo API `POST /put` with `{"key", "value"}`.
#[utoipa::path(post, path = "/put", tag = "demo",
    request_body = api::DemoPut,
    responses((status = 200, description = "`{\"status\":\"Successful\"}`"),
              (status = 400, description = "Invalid JSON or missing fields"),
              (status = 413, description = "Body, key or value too large"),
              (status = 503, description = "Not enough in-sync replicas, the outcome is unknown, or request bodies hold all the room for them"),
              (status = 504, description = "The replica did not answer in time; the outcome is unknown")))]
pub async fn demo_put(State(node): NodeState, headers: HeaderMap, body: Body) -> Response {
    let run = async {
        let limit = node.cfg.limits.max_json_bytes();
        let (body, _held) = api::read_body(&headers, body, limit, "body", &node.bodies).await?;
        let put = api::parse_demo_put(&body, &node.cfg.limits)?;
        node.write(
            Bytes::from(put.key),
            Op::Put(Bytes::from(put.value)),
            Condition::None,
        )
        .await
    };
    match run.await {
        Ok(_) => axum::Json(serde_json::json!({"status": "Successful"})).into_response(),
        Err(e) => e.into_demo(),
    }
}

/// Query of the demo API.
#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct DemoQuery {
    /// The key.
    pub key: Option<String>,
}

/// Demo API `GET /get?key=K`: `{"key","value"}`, or 200 `{"status":"Key not found"}`.
#[utoipa::path(get, path = "/get", tag = "demo", params(DemoQuery),
    responses((status = 200, description = "`{\"key\",\"value\"}` or `{\"status\":\"Key not found\"}`"),
              (status = 400, description = "Missing or invalid key"),
              (status = 406, description = "The value is not UTF-8 text"),
              (status = 413, description = "Key too large"),
              (status = 503, description = "No leader, or the value is not yet confirmed"),
              (status = 504, description = "The replica did not answer in time")))]
pub async fn demo_get(State(node): NodeState, uri: Uri) -> Response {
    let run = async {
        let key = api::demo_key(uri.query(), &node.cfg.limits)?;
        node.read(&key, api::wants_stale(uri.query())?)
            .await
            .map(|v| (key, v))
    };
    match run.await {
        // The key is text: demo_key refuses any other.
        Ok((key, Some((_, value)))) => match std::str::from_utf8(&value) {
            Ok(value) => axum::Json(serde_json::json!({
                "key": String::from_utf8_lossy(&key),
                "value": value,
            }))
            .into_response(),
            // A JSON string cannot carry it; a lossy one would hand back other bytes.
            Err(_) => ApiError::new(
                StatusCode::NOT_ACCEPTABLE,
                "value_not_text",
                "the value is not UTF-8 text, which this API's JSON cannot carry; read it \
                 with GET /v1/kv/{key}",
            )
            .into_demo(),
        },
        Ok((_, None)) => demo_not_found(),
        Err(e) => e.into_demo(),
    }
}

/// Demo API `GET|DELETE /delete?key=K`.
#[utoipa::path(method(get, delete), path = "/delete", tag = "demo", params(DemoQuery),
    responses((status = 200, description = "`{\"status\":\"Delete successful\"}` or `{\"status\":\"Key not found\"}`"),
              (status = 400, description = "Missing or invalid key"),
              (status = 413, description = "Key too large"),
              (status = 503, description = "Not enough in-sync replicas, the outcome is unknown, or the missing key's state is not yet confirmed"),
              (status = 504, description = "The replica did not answer in time; the outcome is unknown")))]
pub async fn demo_delete(State(node): NodeState, uri: Uri) -> Response {
    let run = async {
        let key = api::demo_key(uri.query(), &node.cfg.limits)?;
        node.write(key, Op::Delete, Condition::None).await
    };
    match run.await {
        Ok(_) => axum::Json(serde_json::json!({"status": "Delete successful"})).into_response(),
        Err(e) if e.code == "not_found" => demo_not_found(),
        Err(e) => e.into_demo(),
    }
}

/// The demo's answer for a missing key: 200, as its clients expect.
pub fn demo_not_found() -> Response {
    axum::Json(serde_json::json!({"status": "Key not found"})).into_response()
}

async fn set_role(
    State(node): NodeState,
    headers: HeaderMap,
    body: Bytes,
) -> Result<axum::Json<NodeStatus>, ApiError> {
    let req: RoleRequest = serde_json::from_slice(&body)
        .map_err(|e| ApiError::bad_request("invalid_json", format!("invalid role request: {e}")))?;
    // A request that waited (in a socket buffer of a stopped process, say) must not grant
    // a lease running past what the control plane counted on: count from its send time.
    // Clock skew between machines is what the control plane's grace period covers.
    let age_ms = headers
        .get(crate::client::ISSUED_AT_HEADER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        .map_or(0, |sent| crate::client::unix_ms().saturating_sub(sent));
    node.assign(req, age_ms).await.map(axum::Json)
}

#[derive(Deserialize)]
struct StatusQuery {
    verify: Option<String>,
}

async fn status(
    State(node): NodeState,
    Query(q): Query<StatusQuery>,
) -> Result<axum::Json<NodeStatus>, ApiError> {
    let verify = q.verify.is_some_and(|v| v != "0" && v != "false");
    let node2 = node.clone();
    let st = tokio::task::spawn_blocking(move || node2.status(verify))
        .await
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()))?
        .map_err(store_error)?;
    Ok(axum::Json(st))
}

async fn replicate(State(node): NodeState, body: Bytes) -> Result<Response, ApiError> {
    let req: ReplicateRequest = postcard::from_bytes(&body)
        .map_err(|e| ApiError::bad_request("invalid_batch", format!("cannot decode batch: {e}")))?;
    let out = node.on_replicate(req).await?;
    Ok((
        [(axum::http::header::CONTENT_TYPE, "application/octet-stream")],
        out,
    )
        .into_response())
}

#[derive(Deserialize)]
struct SnapshotQuery {
    epoch: u64,
}

/// Receives a snapshot stream and replaces this replica's data with it.
async fn install_snapshot(
    State(node): NodeState,
    Query(q): Query<SnapshotQuery>,
    req: Request,
) -> Result<axum::Json<Position>, ApiError> {
    // A deposed leader's stream need not be read to be refused; the install checks the
    // epoch again when it begins, as it may have risen meanwhile.
    let current = node.store.state().epoch;
    if q.epoch < current {
        return Err(ApiError::stale_epoch(q.epoch, current));
    }
    let mut stream = req.into_body().into_data_stream();
    let mut reader = SnapshotReader::default();
    // The install wipes this replica, and the epoch it raises can depose a leader; a
    // request is refused with nothing changed unless it carries a snapshot, so both wait
    // for a header that checks out. A stream that breaks after it is a partial install,
    // which the store discards (on the next entries or at reopen).
    let mut install = None;
    let started = std::time::Instant::now();
    let mut progress = TransferLog::new(started);
    let (mut bytes, mut count) = (0u64, 0u64);
    loop {
        // A sender that went quiet after its header would leave this replica wiped and
        // half installed; it gives up, and the leader starts over.
        let next = tokio::time::timeout(SNAPSHOT_STALL, stream.next())
            .await
            .map_err(|_| {
                ApiError::new(
                    StatusCode::REQUEST_TIMEOUT,
                    "snapshot_stalled",
                    format!("no snapshot data for {}s", SNAPSHOT_STALL.as_secs()),
                )
            })?;
        let Some(chunk) = next else { break };
        let chunk = chunk.map_err(|e| ApiError::bad_request("invalid_snapshot", e.to_string()))?;
        let records = reader.push(&chunk).map_err(store_error)?;
        bytes += chunk.len() as u64;
        count += records.len() as u64;
        if progress.due() {
            tracing::info!(id = %node.cfg.id, records = count, mib = bytes >> 20, secs = started.elapsed().as_secs(), "installing a snapshot");
        }
        if install.is_none() && reader.header().is_some() {
            node.observe_epoch(q.epoch);
            let begun = node
                .store
                .snapshot_begin(q.epoch)
                .await
                .map_err(store_error)?;
            install = Some(begun);
        }
        if let Some(install) = install
            && !records.is_empty()
        {
            node.store
                .snapshot_chunk(install, records)
                .await
                .map_err(store_error)?;
        }
    }
    let at = reader.finish().map_err(store_error)?;
    let install = install.expect("a stream that arrived whole had a header, which began it");
    node.store
        .snapshot_end(install, at)
        .await
        .map_err(store_error)?;
    node.snapshots_installed.fetch_add(1, Ordering::Relaxed);
    node.metrics.snapshots_installed.inc();
    node.follower_commit.fetch_max(at.seq, Ordering::Relaxed);
    tracing::info!(
        id = %node.cfg.id,
        ?at,
        records = count,
        mib = bytes >> 20,
        secs = started.elapsed().as_secs_f64(),
        "snapshot installed"
    );
    Ok(axum::Json(at))
}

async fn healthz() -> impl IntoResponse {
    axum::Json(serde_json::json!({"status": "ok"}))
}

async fn readyz(State(node): NodeState) -> Response {
    let a = node.assignment.read().unwrap();
    let ready = match a.role {
        Role::Leader => a.lease_until.is_some_and(|t| Instant::now() < t),
        Role::Follower => true,
        Role::Unassigned => false,
    };
    let body = serde_json::json!({"ready": ready, "role": a.role, "epoch": a.epoch});
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, axum::Json(body)).into_response()
}

/// Serves a node on `listener` (HTTP, and the routers' [`crate::link`]) until `shutdown`
/// resolves, answering what it has read first.
pub async fn serve(
    node: Arc<Node>,
    listener: tokio::net::TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let idle = node.cfg.idle_timeout;
    crate::link::serve(listener, node.app(), idle, shutdown).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::replication::ReplicateRequest;
    use crate::wire::AckMode;

    fn lead(in_sync: &[&str]) -> RoleRequest {
        RoleRequest {
            epoch: 1,
            role: Role::Leader,
            leader: None,
            in_sync: in_sync.iter().map(|s| s.to_string()).collect(),
            lease_ms: 60_000,
            peers: vec![Peer {
                id: "f".into(),
                // Nobody listens: the follower never acknowledges.
                address: "127.0.0.1:1".into(),
            }],
            slot_ranges: vec![],
            mode: AckMode::Sync,
            min_in_sync: 1,
            round: 0,
        }
    }

    /// A leader refuses a compare-and-set on a write not yet committed; in the same
    /// writer batch, a newer leader's first round cuts that write away. The refusal must
    /// not go out as a 412: it was decided on a state the key never kept. (Decided on the
    /// log end read after the batch, it waited only for entries committed long before.)
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_refusal_decided_on_a_write_a_newer_leader_cuts_is_not_answered_412() {
        let dir = tempfile::tempdir().unwrap();
        let node = Node::open(NodeConfig::new("me", dir.path())).unwrap();
        node.assign(lead(&["me"]), 0).await.unwrap();
        let key = Bytes::from_static(b"k");
        let put = |v: &'static str, cond| node.write(key.clone(), Op::Put(Bytes::from(v)), cond);
        let v1 = put("v1", Condition::None).await.unwrap().version;
        // From here writes wait for a follower that never answers: v2 stays uncommitted.
        node.assign(lead(&["me", "f"]), 0).await.unwrap();
        let pending = tokio::spawn({
            let node = node.clone();
            let key = key.clone();
            async move {
                node.write(key, Op::Put(Bytes::from("v2")), Condition::None)
                    .await
            }
        });
        while node.store.staged().last.seq < 2 {
            tokio::task::yield_now().await;
        }
        // A durable checkpoint keeps the writer busy while the compare-and-set and the
        // newer leader's round queue up behind it, in that order, for one batch.
        let busy = node.store.checkpoint();
        let newer = ReplicateRequest {
            epoch: 2,
            prev: v1,
            commit: v1.seq,
            leader_last: v1.seq,
            entries: vec![],
        };
        let (_, cas, cut) = tokio::join!(
            busy,
            put("v3", Condition::IfMatch(v1)),
            node.on_replicate(newer)
        );
        cut.expect("the newer leader's round is taken");
        assert_eq!(node.store.state().last, v1, "v2 was cut away");
        let refused = cas.expect_err("the key no longer holds v1 at this leader");
        assert_eq!(
            (refused.status, refused.code),
            (StatusCode::SERVICE_UNAVAILABLE, "value_not_committed")
        );
        assert!(pending.await.unwrap().is_err());
    }
}
